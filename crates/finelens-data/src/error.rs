use std::path::PathBuf;

/// Data errors: one line naming the file and the cause.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    // Not named `source`: the message already holds the cause, and a `source` would print it
    // twice in an error chain.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: cannot decode image ({reason})")]
    Decode { path: PathBuf, reason: String },
    #[error("{path}: not a directory of class folders")]
    NotADirectory { path: PathBuf },
    #[error("{path}: no class folders found (expected root/<class>/<image>.png)")]
    NoClasses { path: PathBuf },
    #[error("{path}: no readable images (.png, .jpg, .jpeg)")]
    NoImages { path: PathBuf },
    #[error("{path}: class folder has no readable images (.png, .jpg, .jpeg)")]
    EmptyClass { path: PathBuf },
    #[error("{path}: cannot write image ({reason})")]
    Encode { path: PathBuf, reason: String },
    /// A text set's record or file (`file:line` when the line is known).
    #[error("{at}: {reason}")]
    Text { at: String, reason: String },
    #[error("invalid data settings: {0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, DataError>;

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> DataError + '_ {
    move |error| DataError::Io {
        path: path.to_owned(),
        error,
    }
}
