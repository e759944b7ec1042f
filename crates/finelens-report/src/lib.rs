//! Rendering for finelens. This crate knows nothing of models or candle: it takes plain numbers
//! and strings (and `ndarray` arrays) and returns encoded images, which the caller writes (atomically) where it wants.

pub mod drift_plot;
pub mod heatmap;
pub mod html;
pub mod npy;
pub mod plot;

pub use heatmap::{heatmap_png, overlay_png, reduce_channels, ChannelReduce, Scale};
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

/// PNG bytes of 8-bit RGB pixels, row-major: the one encoder every figure goes through.
pub fn encode_png(rgb: &[u8], width: u32, height: u32, what: &str) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(rgb, width, height, image::ExtendedColorType::Rgb8)
        .map_err(|e| ReportError::Draw {
            what: what.into(),
            reason: e.to_string(),
        })?;
    Ok(png)
}
