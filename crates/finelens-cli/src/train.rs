//! `finelens train`, `finetune` and `eval`: arguments → `finelens_pipeline::train` jobs.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_models::{Arch, Head, TextHead};
use finelens_pipeline::text::{self, TextFinetuneSettings, TextReading};
use finelens_pipeline::train::{
    self, DataSplit, EvalSettings, FinetuneSettings, Reading, TrainSettings,
};
use finelens_pipeline::{write_json, PreprocessSettings};
use finelens_tune::recipe::Recipe;
use finelens_tune::HeadChoice;

use crate::progress::run;
use crate::CheckpointArgs;

#[derive(Args)]
pub struct EvalArgs {
    /// The checkpoint (.safetensors), or a fine-tuned text model folder.
    checkpoint: PathBuf,
    /// An ImageFolder: <data>/<class>/<image>. Its classes must be the checkpoint's. For a text
    /// model, a .csv, .tsv, .jsonl or folder per class whose labels are among its classes.
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
    #[command(flatten)]
    text: TextReading,
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
    hp: Recipe,
    #[command(flatten)]
    reading: Reading,
}

#[derive(Args)]
pub struct FinetuneArgs {
    /// The pretrained checkpoint (.safetensors), or a Hugging Face text model folder
    /// (config.json, model.safetensors, tokenizer.json; then --train is a .csv, .tsv, .jsonl or
    /// a folder per class of .txt files, and the output folder is a model folder too).
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    #[command(flatten)]
    split: DataSplit,
    /// New classifier head: linear, or mlp:N (GAP → Dense(N) → ReLU → Dense(classes)); or
    /// keep, to continue with the checkpoint's own head (the data must have its classes). For a
    /// text model folder: cls (= linear: pooler → linear), mean (mean over tokens → linear),
    /// mlp:N, or keep.
    #[arg(long, default_value = "linear")]
    head: String,
    /// LP-FT: train only the head for this many of the --epochs first, then fine-tune under
    /// --freeze for the rest (Kumar et al. 2022).
    #[arg(long, default_value_t = 0)]
    lp_epochs: usize,
    /// What stays frozen: head-only (linear probe), last:N (train the last N residual blocks —
    /// for text, encoder layers and the pooler — and the head), none, or comma-separated globs
    /// of parameter names to freeze; for text also embeddings and encoder.layer.A-B (with the
    /// embeddings).
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
    hp: Recipe,
    #[command(flatten)]
    reading: Reading,
    #[command(flatten)]
    text: TextReading,
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
    if text::is_model_folder(&a.checkpoint) {
        let s = TextFinetuneSettings {
            model: a.checkpoint.clone(),
            train: a.split.train.clone(),
            val: a.split.val.clone(),
            val_fraction: a.split.val_fraction,
            reading: a.text.clone(),
            head: match a.head.as_str() {
                "keep" => None,
                "linear" => Some(TextHead::Cls),
                h => Some(h.parse()?),
            },
            freeze: a.freeze.clone(),
            lp_epochs: a.lp_epochs,
            config: a.hp.config(a.backbone_lr_mult)?,
            out: a.out.clone(),
            resume: a.resume,
        };
        return run(|p| text::finetune_text(&s, p)).map(drop);
    }
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
    if text::is_model_folder(&a.checkpoint) {
        let s = text::TextEvalSettings {
            model: a.checkpoint.clone(),
            data: a.data.clone(),
            reading: a.text.clone(),
            batch_size: a.batch_size,
        };
        let r = run(|p| text::evaluate_text_model(&s, p))?;
        println!("{}", train::metrics_table(&r.metrics));
        return a.json.as_ref().map_or(Ok(()), |p| Ok(write_json(p, &r)?));
    }
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
