use std::path::PathBuf;

/// Job errors: one line, naming the file or setting at fault and the cause.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file or folder the job was given is unusable.
    #[error("{}: {reason}", path.display())]
    Input { path: PathBuf, reason: String },
    #[error("{0}")]
    Settings(String),
    // Fields are not named `source`: the message already holds the cause, and a `source` would
    // print it twice in an error chain.
    #[error("{}: {error}", path.display())]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    /// Another error, with what the job was doing or which file it was reading.
    #[error("{context}: {inner}")]
    Context {
        context: String,
        inner: Box<PipelineError>,
    },
    /// A job that failed part-way, and where what it wrote was kept.
    #[error("{inner} (outputs so far are in {})", kept.display())]
    Partial {
        inner: Box<PipelineError>,
        kept: PathBuf,
    },
    // The crates below: boxed, since their errors carry paths and shapes.
    #[error(transparent)]
    Models(Box<finelens_models::ModelError>),
    #[error(transparent)]
    Data(Box<finelens_data::DataError>),
    #[error(transparent)]
    Tune(Box<finelens_tune::TuneError>),
    #[error(transparent)]
    Attrib(Box<finelens_attrib::AttribError>),
    #[error(transparent)]
    Drift(Box<finelens_drift::DriftError>),
    #[error(transparent)]
    Audit(Box<finelens_audit::AuditError>),
    #[error(transparent)]
    Report(Box<finelens_report::ReportError>),
    #[error(transparent)]
    Candle(Box<candle_core::Error>),
    #[error("{}: cannot read as JSON: {error}", path.display())]
    Json {
        path: PathBuf,
        error: serde_json::Error,
    },
}

pub type Result<T> = std::result::Result<T, PipelineError>;

macro_rules! boxed_from {
    ($($variant:ident: $ty:ty),* $(,)?) => {$(
        impl From<$ty> for PipelineError {
            fn from(e: $ty) -> Self {
                PipelineError::$variant(Box::new(e))
            }
        }
    )*};
}

boxed_from!(
    Models: finelens_models::ModelError,
    Data: finelens_data::DataError,
    Tune: finelens_tune::TuneError,
    Attrib: finelens_attrib::AttribError,
    Drift: finelens_drift::DriftError,
    Audit: finelens_audit::AuditError,
    Report: finelens_report::ReportError,
    Candle: candle_core::Error,
);

/// Adds what was being done to an error's message.
pub trait Context<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T>;
}

impl<T, E: Into<PipelineError>> Context<T> for std::result::Result<T, E> {
    fn context(self, what: impl std::fmt::Display) -> Result<T> {
        self.map_err(|e| PipelineError::Context {
            context: what.to_string(),
            inner: Box::new(e.into()),
        })
    }
}

pub(crate) fn settings(reason: impl Into<String>) -> PipelineError {
    PipelineError::Settings(reason.into())
}

pub(crate) fn input(path: impl Into<PathBuf>, reason: impl Into<String>) -> PipelineError {
    PipelineError::Input {
        path: path.into(),
        reason: reason.into(),
    }
}
