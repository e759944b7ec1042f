/// Training errors: one line, naming the setting or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum TuneError {
    #[error("invalid training settings: {0}")]
    Config(String),
    #[error("loss became {value} at epoch {epoch}, batch {step}; stopping (the best checkpoint so far is kept); try a lower learning rate")]
    NonFiniteLoss {
        epoch: usize,
        step: usize,
        value: f32,
    },
    /// Boxed: a model error carries paths and shapes, and would make every `Result` here large.
    #[error("validation loss became {value} after epoch {epoch}; stopping (the best checkpoint so far is kept); try a lower learning rate")]
    NonFiniteValidation { epoch: usize, value: f64 },
    #[error(transparent)]
    Model(Box<finelens_models::ModelError>),
    #[error(transparent)]
    Data(#[from] finelens_data::DataError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, TuneError>;

impl From<finelens_models::ModelError> for TuneError {
    fn from(e: finelens_models::ModelError) -> Self {
        TuneError::Model(Box::new(e))
    }
}
