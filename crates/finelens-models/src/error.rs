use std::path::PathBuf;

/// Everything that can go wrong building, loading or saving a model. Messages are one line and
/// name the file and the cause, so the CLI can print them as they are.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    // Not named `source`: the message already holds the cause, and a `source` would print it
    // twice in an error chain.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path}: not a valid safetensors file ({reason})")]
    Corrupt { path: PathBuf, reason: String },
    #[error("{path}: does not match {arch}: {detail}")]
    KeyMismatch {
        path: PathBuf,
        arch: String,
        detail: String,
    },
    #[error("{path}: tensor {name} has shape {:?}, {arch} expects {:?}", shapes.found, shapes.expected)]
    Shape {
        path: PathBuf,
        name: String,
        arch: String,
        /// Boxed, so that every `Result` of this crate stays small.
        shapes: Box<ShapeMismatch>,
    },
    #[error("{path}: tensor {name} has dtype {found}, expected {expected}")]
    DType {
        path: PathBuf,
        name: String,
        expected: String,
        found: String,
    },
    #[error("{path}: tensor {name} contains non-finite values (NaN or infinity)")]
    NonFinite { path: PathBuf, name: String },
    #[error("{path}: bad metadata: {reason}")]
    Metadata { path: PathBuf, reason: String },
    #[error("{path}: no finelens metadata and no --arch given; pass --arch (one of: {known})")]
    NoArch { path: PathBuf, known: String },
    #[error("unknown architecture `{0}` (known: resnet18, resnet34, resnet50, resnet-mini)")]
    UnknownArch(String),
    #[error("unknown head `{0}` (expected `linear` or `mlp:N`)")]
    UnknownHead(String),
    #[error("unknown layer `{name}`; layers are: {known}")]
    UnknownLayer { name: String, known: String },
    #[error("invalid model configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

pub type Result<T> = std::result::Result<T, ModelError>;

/// The shape a tensor has and the one its architecture expects.
#[derive(Debug)]
pub struct ShapeMismatch {
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}
