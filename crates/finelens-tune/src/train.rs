//! The supervised training loop: stream shuffled, augmented batches, cross-entropy, backward,
//! one optimiser step per batch with a scheduled learning rate, validation after every epoch.

use std::time::Instant;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use finelens_data::{Loader, Sample};
use finelens_models::{Classifier, Mode, ParamStore};
use serde::{Deserialize, Serialize};

use crate::error::{Result, TuneError};
use crate::metrics::{cross_entropy, evaluate, Metrics};
use crate::optim::{Optimizer, OptimizerConfig};
use crate::schedule::Schedule;

/// How to train: validated by [`TrainConfig::check`] before any work.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    pub epochs: usize,
    pub batch_size: usize,
    /// Peak learning rate (the head's; the backbone's is scaled by `backbone_lr_mult`).
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub lr: f64,
    pub optimizer: OptimizerConfig,
    /// Warm-up length in epochs for the warm-up + cosine schedule; `None` keeps the rate constant.
    pub warmup_epochs: Option<f64>,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub backbone_lr_mult: f64,
    pub seed: u64,
    /// Early stopping: end the run after this many epochs without a lower validation loss.
    #[serde(default)]
    pub patience: Option<usize>,
    /// The decay after warm-up: cosine (the image recipes') or linear (BERT's).
    #[serde(default)]
    pub decay: Decay,
    /// Clip the gradients' global L2 norm to this before each step
    /// (`torch.nn.utils.clip_grad_norm_`); BERT recipes use 1.
    #[serde(default)]
    pub max_grad_norm: Option<f64>,
}

/// How the learning rate falls after warm-up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "snake_case")]
pub enum Decay {
    #[default]
    Cosine,
    Linear,
}

impl TrainConfig {
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TuneError::Config(m));
        if self.epochs == 0 {
            return bad("epochs must be at least 1".into());
        }
        if self.batch_size == 0 {
            return bad("batch size must be at least 1".into());
        }
        if !(self.lr > 0.0 && self.lr.is_finite()) {
            return bad(format!(
                "learning rate {} must be a positive number",
                self.lr
            ));
        }
        if !self.backbone_lr_mult.is_finite() || self.backbone_lr_mult < 0.0 {
            return bad(format!(
                "backbone learning-rate multiplier {} must be ≥ 0",
                self.backbone_lr_mult
            ));
        }
        if let Some(w) = self.warmup_epochs {
            if !(w >= 0.0 && w <= self.epochs as f64) {
                return bad(format!(
                    "warm-up of {w} epochs must be between 0 and the {} epochs",
                    self.epochs
                ));
            }
        }
        if let Some(c) = self.max_grad_norm {
            if !(c > 0.0 && c.is_finite()) {
                return bad(format!(
                    "gradient clipping norm {c} must be a positive number"
                ));
            }
        }
        self.optimizer.check()
    }

    fn schedule(&self, steps_per_epoch: usize) -> Schedule {
        match self.warmup_epochs {
            None => Schedule::Constant,
            Some(w) => {
                let warmup_steps = (w * steps_per_epoch as f64).round() as usize;
                let total_steps = self.epochs * steps_per_epoch;
                match self.decay {
                    Decay::Cosine => Schedule::WarmupCosine {
                        warmup_steps,
                        total_steps,
                    },
                    Decay::Linear => Schedule::WarmupLinear {
                        warmup_steps,
                        total_steps,
                    },
                }
            }
        }
    }
}

/// One epoch's numbers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochRecord {
    pub epoch: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub train_accuracy: f64,
    pub val: Metrics,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub lr_end: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub seconds: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub images_per_second: f64,
}

/// What the loop reports as it goes.
pub enum Progress<'a> {
    Step {
        epoch: usize,
        step: usize,
        steps: usize,
        loss: f32,
    },
    /// An epoch ended; the optimiser is there for whoever saves a resumable state.
    Epoch(&'a EpochRecord, &'a Optimizer),
}

/// Where a run starts: from scratch, or part-way (a resumed run).
#[derive(Debug, Clone, Default)]
pub struct Start {
    /// Epochs already done; the next epoch is this index (shuffling and augmentation are seeded
    /// by epoch, so epoch k draws the same batches whether or not the run was interrupted).
    pub epoch: usize,
    pub optimizer: Option<crate::optim::OptimizerState>,
}

/// The data a run needs.
pub struct TrainData<'a> {
    pub train: &'a [Sample],
    pub val: &'a [Sample],
    pub train_loader: &'a Loader,
    pub eval_loader: &'a Loader,
    pub class_names: &'a [String],
    /// Where batches are placed (the model's device).
    pub device: &'a Device,
}

/// An epoch's batches: each one's logits (train mode) and u32 labels.
pub type Batches<'a> = Box<dyn Iterator<Item = Result<(Tensor, Tensor)>> + 'a>;

/// What the training loop needs from a task, whatever the model reads: its batches as logits in
/// train mode with their labels, and validation.
pub trait Supervised {
    /// Training examples (the steps per epoch follow from them).
    fn train_len(&self) -> usize;
    fn val_len(&self) -> usize;
    /// Epoch `epoch`'s batches (shuffled, augmented, with dropout as the task does, all seeded by
    /// epoch and step): each batch's logits in train mode and its u32 labels.
    fn train_batches(&self, epoch: u64) -> Result<Batches<'_>>;
    /// Metrics on the validation set, in eval mode.
    fn validate(&self) -> Result<Metrics>;
}

/// An image classifier on ImageFolder samples.
struct ImageTask<'a> {
    model: &'a dyn Classifier,
    data: &'a TrainData<'a>,
}

impl Supervised for ImageTask<'_> {
    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn val_len(&self) -> usize {
        self.data.val.len()
    }

    fn train_batches(&self, epoch: u64) -> Result<Batches<'_>> {
        let batches = self
            .data
            .train_loader
            .epoch(self.data.train, epoch, self.data.device)?;
        Ok(Box::new(batches.map(move |b| {
            let b = b?;
            Ok((self.model.forward(&b.images, Mode::Train)?, b.labels))
        })))
    }

    fn validate(&self) -> Result<Metrics> {
        evaluate(
            self.model,
            self.data.val,
            self.data.eval_loader,
            self.data.class_names,
            self.data.device,
        )
    }
}

/// Train `model` (built from `store`) in place on images. `lr_mult(name)` gives each trainable
/// parameter's learning-rate multiplier. Returns every epoch's record.
pub fn fit(
    model: &dyn Classifier,
    store: &ParamStore,
    data: &TrainData,
    cfg: &TrainConfig,
    lr_mult: &dyn Fn(&str) -> f64,
    start: Start,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<EpochRecord>> {
    fit_task(
        &ImageTask { model, data },
        store,
        cfg,
        &|n| (lr_mult(n), true),
        start,
        progress,
    )
}

/// Scale `grads` so that their global L2 norm is at most `max` (PyTorch's `clip_grad_norm_`);
/// the norm before clipping.
fn clip_grad_norm(grads: &mut GradStore, vars: &[Var], max: f64) -> Result<f64> {
    let mut total = 0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            total += g
                .sqr()?
                .sum_all()?
                .to_dtype(DType::F64)?
                .to_scalar::<f64>()?;
        }
    }
    let norm = total.sqrt();
    if norm > max {
        let scale = max / (norm + 1e-6);
        for v in vars {
            if let Some(g) = grads.get(v.as_tensor()) {
                let scaled = (g * scale)?;
                grads.insert(v.as_tensor(), scaled);
            }
        }
    }
    Ok(norm)
}

/// Train the model behind `task` (built from `store`) in place. `param(name)` gives each
/// trainable parameter's learning-rate multiplier and whether weight decay applies to it.
pub fn fit_task(
    task: &dyn Supervised,
    store: &ParamStore,
    cfg: &TrainConfig,
    param: &dyn Fn(&str) -> (f64, bool),
    start: Start,
    progress: &mut dyn FnMut(Progress),
) -> Result<Vec<EpochRecord>> {
    cfg.check()?;
    if task.train_len() == 0 || task.val_len() == 0 {
        return Err(TuneError::Config(
            "training and validation sets must both be non-empty".into(),
        ));
    }
    let trainable = store.trainable_vars();
    let vars: Vec<Var> = trainable.iter().map(|(_, v)| v.clone()).collect();
    let params: Vec<_> = trainable
        .into_iter()
        .map(|(n, v)| {
            let (mult, decay) = param(&n);
            (v, mult, decay)
        })
        .collect();
    if params.is_empty() {
        return Err(TuneError::Config(
            "nothing to train: every parameter is frozen".into(),
        ));
    }
    let mut opt = Optimizer::with_decay(cfg.optimizer, params)?;
    if let Some(state) = start.optimizer {
        opt.restore(state)?;
    }
    let steps_per_epoch = task.train_len().div_ceil(cfg.batch_size);
    let schedule = cfg.schedule(steps_per_epoch);
    let mut records = Vec::new();
    for epoch in start.epoch..cfg.epochs {
        let start = Instant::now();
        let (mut loss_sum, mut correct, mut seen) = (0f64, 0usize, 0usize);
        let mut lr = cfg.lr;
        for (step, batch) in task.train_batches(epoch as u64)?.enumerate() {
            let (logits, labels) = batch?;
            let loss = cross_entropy(&logits, &labels)?;
            let value = loss.to_scalar::<f32>()?;
            if !value.is_finite() {
                // Reported 1-based, as the progress lines count.
                return Err(TuneError::NonFiniteLoss {
                    epoch: epoch + 1,
                    step: step + 1,
                    value,
                });
            }
            lr = schedule.lr(cfg.lr, epoch * steps_per_epoch + step);
            let mut grads = finelens_models::backward(&loss)?;
            if let Some(max) = cfg.max_grad_norm {
                clip_grad_norm(&mut grads, &vars, max)?;
            }
            opt.step(&grads, lr)?;
            let n = labels.dim(0)?;
            loss_sum += value as f64 * n as f64;
            let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
            let truth: Vec<u32> = labels.to_vec1()?;
            correct += pred.iter().zip(&truth).filter(|(p, t)| p == t).count();
            seen += n;
            progress(Progress::Step {
                epoch,
                step,
                steps: steps_per_epoch,
                loss: value,
            });
        }
        let train_seconds = start.elapsed().as_secs_f64();
        let val = task.validate()?;
        // A diverged model can keep a finite training loss for a batch or two while its outputs
        // already overflow; never hand such an epoch on (it would be saved as "best").
        if !val.loss.is_finite() {
            return Err(TuneError::NonFiniteValidation {
                epoch: epoch + 1,
                value: val.loss,
            });
        }
        let record = EpochRecord {
            epoch,
            train_loss: loss_sum / seen.max(1) as f64,
            train_accuracy: correct as f64 / seen.max(1) as f64,
            val,
            lr_end: lr,
            seconds: start.elapsed().as_secs_f64(),
            images_per_second: seen as f64 / train_seconds,
        };
        progress(Progress::Epoch(&record, &opt));
        records.push(record);
        if let Some(patience) = cfg.patience {
            if epochs_since_best(&records) >= patience {
                break;
            }
        }
    }
    Ok(records)
}

/// Epochs since the lowest validation loss so far (0 when the last epoch is the best).
pub fn epochs_since_best(records: &[EpochRecord]) -> usize {
    let best = records
        .iter()
        .enumerate()
        .min_by(|a, b| a.1.val.loss.total_cmp(&b.1.val.loss))
        .map_or(0, |(i, _)| i);
    records.len().saturating_sub(best + 1)
}

/// One line a log reads: the epoch's losses, accuracies, final learning rate and speed.
impl std::fmt::Display for EpochRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "epoch {:>3}  train loss {:.4} acc {:.2}%  val loss {:.4} acc {:.2}%  lr {:.2e}  {:.1} s ({:.0} examples/s)",
            self.epoch + 1,
            self.train_loss,
            100.0 * self.train_accuracy,
            self.val.loss,
            100.0 * self.val.accuracy,
            self.lr_end,
            self.seconds,
            self.images_per_second
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use finelens_data::synth::{generate, Split, SynthConfig, Task};
    use finelens_data::{Augment, ImageFolder, OnBadImage, Preprocess};
    use finelens_models::{Arch, Head, ModelConfig, ResNet};

    /// Train resnet-mini for two short epochs and return every tensor's bytes.
    fn run(root: &std::path::Path, seed: u64) -> (Vec<Vec<f32>>, Vec<EpochRecord>) {
        let folder =
            ImageFolder::open(&generate_once(root).images(Split::Train), OnBadImage::Fail).unwrap();
        let (train, val) = folder.split(0.25, seed).unwrap();
        let pre = Preprocess {
            size: 32,
            crop_pct: 1.0,
            mean: [0.5; 3],
            std: [0.25; 3],
        };
        let loader = |augment: Option<Augment>, shuffle| Loader {
            preprocess: pre.clone(),
            augment,
            batch_size: 6,
            shuffle,
            seed,
            on_bad: OnBadImage::Fail,
        };
        let (tl, el) = (loader(Some(Augment::default()), true), loader(None, false));
        let config =
            ModelConfig::new(Arch::ResNetMini, folder.classes.len(), Head::Linear).unwrap();
        let store = ParamStore::init(&config.param_specs(), seed, &Device::Cpu).unwrap();
        let model = ResNet::new(config, &store).unwrap();
        let cfg = TrainConfig {
            epochs: 2,
            batch_size: 6,
            lr: 0.01,
            optimizer: crate::OptimizerConfig::sgd(0.9, true, 1e-4),
            warmup_epochs: Some(1.0),
            backbone_lr_mult: 1.0,
            seed,
            patience: None,
            decay: Decay::Cosine,
            max_grad_norm: None,
        };
        let data = TrainData {
            train: &train,
            val: &val,
            train_loader: &tl,
            eval_loader: &el,
            class_names: &folder.classes,
            device: &Device::Cpu,
        };
        let history = fit(
            &model,
            &store,
            &data,
            &cfg,
            &|_| 1.0,
            Start::default(),
            &mut |_| {},
        )
        .unwrap();
        let weights = store
            .iter()
            .map(|(_, t, _)| {
                t.to_dtype(candle_core::DType::F32)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        (weights, history)
    }

    fn generate_once(root: &std::path::Path) -> finelens_data::synth::TaskDir {
        let cfg = SynthConfig {
            size: 32,
            train_per_class: 4,
            val_per_class: 1,
            test_per_class: 1,
            seed: 3,
        };
        generate(root, Task::Finetune, &cfg, false).unwrap()
    }

    #[test]
    fn same_seed_same_weights_other_seed_other_weights() {
        let d = tempfile::tempdir().unwrap();
        let (a, ha) = run(d.path(), 1);
        let (b, hb) = run(d.path(), 1);
        let (c, _) = run(d.path(), 2);
        assert_eq!(a, b, "two runs with seed 1 differ");
        assert_ne!(a, c);
        assert_eq!(ha.len(), 2);
        assert_eq!(ha[1].train_loss, hb[1].train_loss);
    }

    #[test]
    fn early_stopping_counts_epochs_since_the_best_validation_loss() {
        let rec = |loss: f64| EpochRecord {
            epoch: 0,
            train_loss: 0.0,
            train_accuracy: 0.0,
            val: Metrics::from_confusion(vec![vec![1]], loss, &["a".to_string()]),
            lr_end: 0.0,
            seconds: 0.0,
            images_per_second: 0.0,
        };
        let r: Vec<EpochRecord> = [1.0, 0.5, 0.7, 0.6].into_iter().map(rec).collect();
        assert_eq!(epochs_since_best(&r[..2]), 0);
        assert_eq!(epochs_since_best(&r), 2);
        assert_eq!(epochs_since_best(&[]), 0);
    }

    #[test]
    fn invalid_settings_fail_before_any_work() {
        let base = TrainConfig {
            epochs: 1,
            batch_size: 4,
            lr: 0.1,
            optimizer: crate::OptimizerConfig::sgd(0.9, false, 0.0),
            warmup_epochs: None,
            backbone_lr_mult: 1.0,
            seed: 0,
            patience: None,
            decay: Decay::Cosine,
            max_grad_norm: None,
        };
        assert!(base.check().is_ok());
        for (bad, needle) in [
            (
                TrainConfig {
                    lr: 0.0,
                    ..base.clone()
                },
                "learning rate",
            ),
            (
                TrainConfig {
                    lr: f64::NAN,
                    ..base.clone()
                },
                "learning rate",
            ),
            (
                TrainConfig {
                    batch_size: 0,
                    ..base.clone()
                },
                "batch size",
            ),
            (
                TrainConfig {
                    epochs: 0,
                    ..base.clone()
                },
                "epochs",
            ),
            (
                TrainConfig {
                    warmup_epochs: Some(3.0),
                    ..base.clone()
                },
                "warm-up",
            ),
            (
                TrainConfig {
                    backbone_lr_mult: -1.0,
                    ..base.clone()
                },
                "multiplier",
            ),
        ] {
            let e = bad.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
