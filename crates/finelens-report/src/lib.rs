//! Rendering for finelens. This crate knows nothing of models or candle: it takes plain numbers
//! and strings and returns encoded images, which the caller writes (atomically) where it wants.

pub mod plot;

pub use plot::{training_curves, Series};

/// Rendering errors.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("cannot draw {what}: {reason}")]
    Draw { what: String, reason: String },
    #[error("nothing to plot: {0}")]
    Empty(String),
}

pub type Result<T> = std::result::Result<T, ReportError>;
