use std::path::PathBuf;

/// Drift errors: one line, naming the file, tensor or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum DriftError {
    // Not named `source`: the message already holds the cause, and a `source` would print it
    // twice in an error chain.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a safetensors checkpoint ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("the checkpoints have different architectures: {0}")]
    ArchMismatch(String),
    #[error("{path}: tensor {tensor} contains NaN or infinite values")]
    NonFinite { path: PathBuf, tensor: String },
    #[error("{path}: tensor {tensor} has dtype {dtype}, which drift cannot read")]
    Dtype {
        path: PathBuf,
        tensor: String,
        dtype: String,
    },
    #[error("invalid drift settings: {0}")]
    Settings(String),
    /// Boxed: a model error carries paths and shapes, and would make every `Result` here large.
    #[error(transparent)]
    Model(Box<finelens_models::ModelError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DriftError>;

impl From<finelens_models::ModelError> for DriftError {
    fn from(e: finelens_models::ModelError) -> Self {
        DriftError::Model(Box::new(e))
    }
}
