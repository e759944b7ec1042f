//! Drift between a parent checkpoint and a model fine-tuned from it: which weights moved
//! ([`weights`]), how the representations changed ([`cka`]), and whether the explanations agree
//! ([`explanation`]).

pub mod bench;
pub mod cka;
pub mod error;
pub mod explanation;
pub mod spectrum;
pub mod weights;

pub use cka::{
    accumulate_cka, linear_cka, representation_drift, MinibatchCka, RepresentationDrift,
};
pub use error::{DriftError, Result};
pub use explanation::{pearson, spearman, top_k_iou};
pub use weights::{
    weight_drift, weight_drift_described, GroupDrift, TensorDrift, WeightDrift, WeightDriftOptions,
};
