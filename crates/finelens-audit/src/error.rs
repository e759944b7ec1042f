use std::path::PathBuf;

/// Audit errors: one line, naming the file, line or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    #[error("{path}:{line}: {reason}")]
    Policy {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("invalid audit settings: {0}")]
    Settings(String),
    /// Boxed: attribution and model errors carry paths and shapes.
    #[error(transparent)]
    Attrib(Box<finelens_attrib::AttribError>),
    #[error(transparent)]
    Model(Box<finelens_models::ModelError>),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, AuditError>;

impl From<finelens_attrib::AttribError> for AuditError {
    fn from(e: finelens_attrib::AttribError) -> Self {
        AuditError::Attrib(Box::new(e))
    }
}

impl From<finelens_models::ModelError> for AuditError {
    fn from(e: finelens_models::ModelError) -> Self {
        AuditError::Model(Box::new(e))
    }
}
