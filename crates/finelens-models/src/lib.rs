//! Classifier architectures for finelens: the ResNet family with torchvision's parameter names and
//! BERT-family text encoders with Hugging Face's, differentiable pooling and batch norm (candle's own have gaps, see shared/CANDLE-NOTES.md),
//! named activation hooks, and safetensors checkpoints with metadata.

pub mod backprop;
pub mod batch_norm;
pub mod bert;
mod bert_layer;
pub mod checkpoint;
pub mod conv;
pub mod describe;
pub mod dropout;
pub mod error;
pub mod gelu;
pub mod json;
pub mod kernel;
pub mod layer_norm;
pub mod linear;
pub mod memory;
pub mod nn;
pub mod params;
pub mod pool;
pub mod relu;
mod residual_block;
pub mod resnet;
pub mod rules;
pub mod softmax;
#[cfg(test)]
mod testutil;
mod winograd;

pub use backprop::backward;
pub use bert::{Bert, BertConfig, BertSpec, TextHead, TokenBatch};
pub use checkpoint::{Checkpoint, Metadata};
pub use describe::{InputKind, ModelDescription, Stage};
pub use error::{ModelError, Result};
pub use nn::Mode;
pub use params::{ParamKind, ParamSpec, ParamStore};
pub use resnet::{Arch, Classifier, Head, ModelConfig, ResNet};
