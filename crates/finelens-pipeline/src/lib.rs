//! Whole finelens jobs, above the analysis crates: train, fine-tune, evaluate, explain, drift,
//! audit, and the demo that runs them in turn.
//!
//! Every job has the same shape (cargo's `ops` over its commands): a settings struct checked once
//! before any work (`check()`), a progress callback ([`progress::Event`]) that a front end draws,
//! an output directory written under a temporary name and renamed into place
//! ([`output::OutputDir`]), and a typed, versioned result that is also what the job writes as
//! JSON and what [`output::read_json`] reads back. The `finelens` binary only turns arguments
//! into settings and calls one job; tests and other programs call the same jobs.

pub mod audit;
pub mod bench;
pub mod demo;
pub mod drift;
pub mod error;
pub mod explain;
pub mod inputs;
pub mod inspect;
pub mod merge;
pub mod output;
pub mod page;
pub mod progress;
pub mod shard;
pub mod text;
pub mod text_audit;
pub mod text_drift;
pub mod text_explain;
pub mod train;

pub use error::{Context, PipelineError, Result};
pub use inputs::{ModelSource, PreprocessSettings};
pub use output::{read_json, write_json, OutputDir, Versioned};
pub use progress::{Event, Progress};
