//! Supervised training and fine-tuning for finelens: optimisers with PyTorch's update rules,
//! learning-rate schedules, the training loop and evaluation metrics.

pub mod bench;
pub mod error;
pub mod finetune;
pub mod metrics;
pub mod optim;
pub mod phases;
pub mod recipe;
pub mod record;
pub mod schedule;
pub mod text;
pub mod train;

pub use error::{Result, TuneError};
pub use finetune::{
    glob_match, with_new_head, FinetuneEvent, FinetuneJob, FinetuneOutcome, FreezePolicy,
    HeadChoice,
};
pub use metrics::{cross_entropy, evaluate, Metrics};
pub use optim::{Optimizer, OptimizerConfig, OptimizerState};
pub use record::{EpochSummary, TrainingKind, TrainingRecord};
pub use schedule::Schedule;
pub use train::{
    epochs_since_best, fit, fit_task, Decay, EpochRecord, Progress, Start, Supervised, TrainConfig,
    TrainData,
};
