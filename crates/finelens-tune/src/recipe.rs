//! A training recipe as a command line gives it: the flags behind `finelens train` and
//! `finetune`, turned into a [`TrainConfig`].

use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::optim::OptimizerConfig;
use crate::train::{Decay, TrainConfig};

/// The optimiser a recipe names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum OptimizerKind {
    /// SGD with momentum (PyTorch's update rule).
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

/// Hyperparameters of a run.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Recipe {
    /// Passes over the training set.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 10))]
    pub epochs: usize,
    /// Examples per batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub batch_size: usize,
    /// Peak learning rate.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.05))]
    pub lr: f64,
    /// The optimiser.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = OptimizerKind::Sgd))]
    pub optimizer: OptimizerKind,
    /// SGD momentum.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.9))]
    pub momentum: f64,
    /// Use Nesterov momentum (SGD).
    #[cfg_attr(feature = "cli", arg(long))]
    pub nesterov: bool,
    /// Weight decay (L2 for SGD, decoupled for AdamW; text models exclude biases and LayerNorm
    /// weights, as BERT's recipe does).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 5e-4))]
    pub weight_decay: f64,
    /// Linear warm-up (in epochs) before the decay; 0 for none.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub warmup_epochs: f64,
    /// The decay after warm-up: cosine, or linear (BERT's).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = Decay::Cosine))]
    pub decay: Decay,
    /// Keep the learning rate constant instead of warm-up + decay.
    #[cfg_attr(feature = "cli", arg(long))]
    pub constant_lr: bool,
    /// Clip the gradients' global L2 norm to this before each step (BERT recipes use 1).
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_grad_norm: Option<f64>,
    /// Seed for initialisation, shuffling, augmentation and dropout.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0))]
    pub seed: u64,
    /// Stop early after this many epochs without a lower validation loss.
    #[cfg_attr(feature = "cli", arg(long))]
    pub patience: Option<usize>,
}

impl Recipe {
    /// The configuration, checked; `backbone_lr_mult` scales the backbone's rate.
    pub fn config(&self, backbone_lr_mult: f64) -> Result<TrainConfig> {
        let optimizer = match self.optimizer {
            OptimizerKind::Sgd => {
                OptimizerConfig::sgd(self.momentum, self.nesterov, self.weight_decay)
            }
            OptimizerKind::Adamw => OptimizerConfig::adamw(self.weight_decay),
        };
        let cfg = TrainConfig {
            epochs: self.epochs,
            batch_size: self.batch_size,
            lr: self.lr,
            optimizer,
            warmup_epochs: (!self.constant_lr).then_some(self.warmup_epochs),
            backbone_lr_mult,
            seed: self.seed,
            patience: self.patience,
            decay: self.decay,
            max_grad_norm: self.max_grad_norm,
        };
        cfg.check()?;
        Ok(cfg)
    }
}
