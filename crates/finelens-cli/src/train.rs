//! `finelens train`, `finetune` and `eval`: arguments → `finelens_pipeline::train` jobs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_models::{Arch, Head};
use finelens_pipeline::train::{
    self, DataSplit, EvalSettings, FinetuneSettings, Reading, TrainSettings,
};
use finelens_pipeline::{write_json, PreprocessSettings};
use finelens_tune::{HeadChoice, OptimizerConfig, TrainConfig};

use crate::progress::run;
use crate::CheckpointArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    /// An ImageFolder: <data>/<class>/<image>. Its classes must be the checkpoint's.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    /// Fail on an image file that cannot be decoded instead of skipping it with a warning.
    #[arg(long)]
    strict: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
pub struct TrainArgs {
    #[command(flatten)]
    split: DataSplit,
    /// Architecture: resnet18, resnet34, resnet50, resnet-mini.
    #[arg(long, default_value = "resnet-mini")]
    arch: String,
    /// Classifier head: linear, or mlp:N (GAP → Dense(N) → ReLU → Dense(classes)).
    #[arg(long, default_value = "linear")]
    head: String,
    /// Input side in pixels (default: the architecture's).
    #[arg(long)]
    size: Option<usize>,
    /// Where to write the checkpoint.
    #[arg(long)]
    out: PathBuf,
    #[command(flatten)]
    hp: Hyperparams,
    #[command(flatten)]
    reading: Reading,
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// The pretrained checkpoint (.safetensors).
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    #[command(flatten)]
    split: DataSplit,
    /// New classifier head: linear, or mlp:N (GAP → Dense(N) → ReLU → Dense(classes)); or
    /// keep, to continue with the checkpoint's own head (the data must have its classes).
    #[arg(long, default_value = "linear")]
    head: String,
    /// LP-FT: train only the head for this many of the --epochs first, then fine-tune under
    /// --freeze for the rest (Kumar et al. 2022).
    #[arg(long, default_value_t = 0)]
    lp_epochs: usize,
    /// What stays frozen: head-only (linear probe), last:N (train the last N residual blocks
    /// and the head), none, or comma-separated globs of parameter names to freeze.
    #[arg(long, default_value = "none")]
    freeze: String,
    /// The backbone's learning rate as a multiple of the head's (discriminative fine-tuning).
    #[arg(long, default_value_t = 1.0)]
    backbone_lr_mult: f64,
    /// Output directory: model.safetensors (best epoch), metrics.json, curves.png, and
    /// last.safetensors (the state after the last completed epoch, for --resume).
    #[arg(long)]
    out: PathBuf,
    /// Continue an interrupted run from --out's last.safetensors (same arguments as the run
    /// that wrote it); the result is the same as an uninterrupted run's.
    #[arg(long)]
    resume: bool,
    #[command(flatten)]
    hp: Hyperparams,
    #[command(flatten)]
    reading: Reading,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum Optimizer {
    /// SGD with momentum (PyTorch's update rule).
    Sgd,
    /// AdamW (decoupled weight decay).
    Adamw,
}

#[derive(Args)]
struct Hyperparams {
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// The optimiser.
    #[arg(long, value_enum, default_value_t = Optimizer::Sgd)]
    optimizer: Optimizer,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f64,
    /// Use Nesterov momentum (SGD).
    #[arg(long)]
    nesterov: bool,
    /// Weight decay (L2 for SGD, decoupled for AdamW).
    #[arg(long, default_value_t = 5e-4)]
    weight_decay: f64,
    /// Linear warm-up (in epochs) before cosine decay; 0 for cosine from the start.
    #[arg(long, default_value_t = 1.0)]
    warmup_epochs: f64,
    /// Keep the learning rate constant instead of warm-up + cosine.
    #[arg(long)]
    constant_lr: bool,
    /// Seed for initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop early after this many epochs without a lower validation loss.
    #[arg(long)]
    patience: Option<usize>,
}

impl Hyperparams {
    fn config(&self, backbone_lr_mult: f64) -> Result<TrainConfig> {
        let optimizer = match self.optimizer {
            Optimizer::Sgd => OptimizerConfig::sgd(self.momentum, self.nesterov, self.weight_decay),
            Optimizer::Adamw => OptimizerConfig::adamw(self.weight_decay),
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
        };
        cfg.check()?;
        Ok(cfg)
    }
}

pub fn train_cmd(a: TrainArgs) -> Result<()> {
    let s = TrainSettings {
        split: a.split,
        arch: Arch::parse(&a.arch)?,
        head: Head::parse(&a.head)?,
        input_size: a.size,
        config: a.hp.config(1.0)?,
        reading: a.reading,
        out: a.out.clone(),
    };
    run(|p| train::train(&s, p)).map(drop)
}

pub fn finetune_cmd(a: FinetuneArgs) -> Result<()> {
    let s = FinetuneSettings {
        parent: a.ckpt.source(&a.checkpoint)?,
        preprocess: a.pre.clone(),
        split: a.split,
        head: match a.head.as_str() {
            "keep" => HeadChoice::Keep,
            h => HeadChoice::New(Head::parse(h)?),
        },
        freeze: a.freeze.clone(),
        lp_epochs: a.lp_epochs,
        config: a.hp.config(a.backbone_lr_mult)?,
        reading: a.reading,
        out: a.out.clone(),
        resume: a.resume,
    };
    run(|p| train::finetune(&s, p)).map(|_| ())
}

pub fn eval_cmd(a: EvalArgs) -> Result<()> {
    let s = EvalSettings {
        model: a.ckpt.source(&a.checkpoint)?,
        preprocess: a.pre.clone(),
        data: a.data.clone(),
        batch_size: a.batch_size,
        strict: a.strict,
    };
    let r = run(|p| train::evaluate(&s, p))?;
    println!("{}", train::metrics_table(&r.metrics));
    if let Some(p) = &a.json {
        write_json(p, &r)?;
    }
    Ok(())
}
