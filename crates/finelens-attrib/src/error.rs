/// Attribution errors: one line, naming the method, setting or input at fault.
#[derive(Debug, thiserror::Error)]
pub enum AttribError {
    #[error("{method}: {reason}")]
    Settings {
        method: &'static str,
        reason: String,
    },
    #[error("target class {index} is out of range; valid classes: {valid}")]
    TargetOutOfRange { index: usize, valid: String },
    #[error("unknown target class `{name}`; valid classes: {valid}")]
    UnknownClass { name: String, valid: String },
    #[error("{method} produced a non-finite attribution (NaN or ±inf) for input {input}")]
    NonFinite { method: &'static str, input: usize },
    /// Boxed: a model error carries paths and shapes, and would make every `Result` here large.
    #[error(transparent)]
    Model(Box<finelens_models::ModelError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AttribError>;

impl From<finelens_models::ModelError> for AttribError {
    fn from(e: finelens_models::ModelError) -> Self {
        AttribError::Model(Box::new(e))
    }
}

/// A settings error for `method`.
pub(crate) fn settings(method: &'static str, reason: impl Into<String>) -> AttribError {
    AttribError::Settings {
        method,
        reason: reason.into(),
    }
}

/// A method's internal batch, when set, holds at least one input.
pub(crate) fn check_internal_batch(
    method: &'static str,
    internal_batch: Option<usize>,
) -> Result<()> {
    if internal_batch == Some(0) {
        return Err(settings(method, "internal batch must be at least 1"));
    }
    Ok(())
}
