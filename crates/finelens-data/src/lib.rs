//! Data for finelens: torchvision-style ImageFolder datasets and transforms, streaming
//! mini-batches, deterministic synthetic shape tasks with ground-truth masks, and text through a
//! Hugging Face tokenizer.

pub mod batch;
pub mod error;
pub mod image_folder;
pub mod synth;
pub mod text;
pub mod transforms;

pub use batch::{Batch, Loader};
pub use error::{DataError, Result};
pub use image_folder::{ImageFolder, Inputs, OnBadImage, Sample};
pub use synth::{Split, SynthConfig, Task};
pub use transforms::{Augment, Preprocess};
