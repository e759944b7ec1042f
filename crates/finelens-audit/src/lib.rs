//! The audit a fine-tuned model goes through before it ships: are its explanations about the
//! model ([`sanity`]), faithful to it ([`faithfulness`], [`road`], [`perturbation`]), stable
//! ([`robustness`]), on the object ([`localisation`]), free of shortcuts ([`shortcut`]), how
//! concentrated ([`complexity`]) — and does it pass the team's thresholds ([`policy`])?

pub mod complexity;
pub mod error;
pub mod faithfulness;
pub mod localisation;
pub mod perturbation;
pub mod policy;
pub mod road;
pub mod robustness;
pub mod run;
pub mod sanity;
pub mod shortcut;
pub mod similarity;
#[cfg(test)]
mod testutil;

pub use error::{AuditError, Result};
