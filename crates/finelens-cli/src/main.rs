//! The `finelens` command. It parses arguments and wires the library crates together; every
//! capability lives in a library crate.

mod audit;
mod drift;
mod explain;
mod progress;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use clap::{Args, Parser, Subcommand};
use finelens_attrib::{BaselineSpec, Method, MethodOptions, MethodSpec};
use finelens_data::synth::{self, Split, SynthConfig, Task};
use finelens_data::{Augment, ImageFolder, Loader, OnBadImage, Preprocess, Sample};
use finelens_models::checkpoint::{self, Metadata};
use finelens_models::{Arch, Head, ModelConfig, ParamStore, ResNet};
use finelens_pipeline::{ModelSource, PreprocessSettings};
use finelens_tune::{
    evaluate, fit, history_json, FinetuneEvent, FinetuneJob, HeadChoice, Metrics, OptimizerConfig,
    Start, TrainConfig, TrainData,
};

/// The shipped pretrained checkpoint (resnet-mini trained on the synthetic `pretrain` task).
const FIXTURE: &str = "fixtures/resnet-mini-pretrain.safetensors";
/// Where the demo and the fixture recipe put generated synthetic data.
const DATA_DIR: &str = "fixtures/data";
/// Where the demo writes its outputs.
const DEMO_DIR: &str = "reports/demo";
/// The demo's fine-tuning run: 6 epochs reach ≥ 90% validation accuracy in under a minute.
/// The demo's fine-tuning recipe, the same for the clean and the shortcut task: 8 epochs of AdamW
/// at 0.005 take the clean task over 90% validation accuracy and let the shortcut model latch on
/// to the planted patch (100% validation, near chance on the patch-free test split).
const DEMO_EPOCHS: usize = 8;
const DEMO_LR: f64 = 0.005;
/// Test images the demo explains: two per class of the fine-tuning task.
const DEMO_EXPLAIN_IMAGES: usize = 8;
/// The methods the demo explains with.
const DEMO_METHODS: &str = "saliency,smoothgrad,integrated_gradients,grad_cam,occlusion";

#[derive(Parser)]
#[command(
    name = "finelens",
    version,
    about = "Fine-tune image classifiers, then explain, compare and audit them."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the demo on the shipped fixtures: generate the synthetic tasks, evaluate the pretrained
    /// fixture on the pretraining task's test split, and fine-tune it on the fine-tuning task.
    Demo(DemoArgs),
    /// Datasets: generate the synthetic shape tasks.
    #[command(subcommand)]
    Data(DataCommand),
    /// Print a checkpoint's architecture, classes, parameter count and metadata.
    Inspect(InspectArgs),
    /// Evaluate a checkpoint on an ImageFolder: accuracy, per-class precision/recall/F1, confusion.
    Eval(EvalArgs),
    /// Train a model from a seeded random initialisation on an ImageFolder (how the fixture is made).
    Train(TrainArgs),
    /// Fine-tune a pretrained checkpoint on a new ImageFolder task: new head, freezing,
    /// discriminative learning rates; keeps the epoch with the lowest validation loss.
    Finetune(FinetuneArgs),
    /// Attribute a model's predictions to input pixels: saliency, SmoothGrad, integrated
    /// gradients, Grad-CAM, occlusion; writes .npy arrays, heat maps, overlays and explain.json.
    Explain(explain::ExplainArgs),
    /// Where a fine-tuned checkpoint moved from its parent: weight drift per tensor, layer, block
    /// and stage; representation drift (CKA) and explanation drift on a probe set.
    Drift(drift::DriftArgs),
    /// Audit a checkpoint's explanations before shipping it: randomisation sanity checks,
    /// faithfulness, localisation against masks, shortcut detection, completeness, drift from a
    /// base; a policy's pass/fail table. Exit status 0 = all pass, 1 = a check fails, 2 = error.
    Audit(audit::AuditArgs),
    /// Benchmarks (speed is measured here, never in tests).
    #[command(subcommand)]
    Bench(BenchCommand),
}

#[derive(Subcommand)]
enum BenchCommand {
    /// Training throughput (images/s) for resnet-mini at 64×64 and resnet18 at 224×224, batch 32.
    Train(BenchTrainArgs),
    /// Explanation speed (ms/image, batch 1) for resnet18 at 224×224 and resnet-mini at 64×64:
    /// forward, forward + backward to the input, saliency, SmoothGrad-20, IG-50, Grad-CAM.
    Explain(BenchExplainArgs),
    /// The demo end to end (fine-tuning both tasks, explaining, drift, both audits, the page),
    /// timed: the target is under 5 minutes on 2 cores.
    Demo(BenchDemoArgs),
    /// Weight drift over two generated checkpoints (GB/s, peak resident memory) and minibatch
    /// CKA over 2,000 probe images for resnet-mini's five tapped layers (seconds).
    Drift(BenchDriftArgs),
}

#[derive(Args)]
struct BenchDemoArgs {
    /// Where the timed demo writes its outputs.
    #[arg(long, default_value = "target/bench-demo")]
    out: PathBuf,
}

#[derive(Args)]
struct BenchDriftArgs {
    /// Size of each generated checkpoint, in GiB.
    #[arg(long, default_value_t = 1.0)]
    gigabytes: f64,
    /// Where the generated checkpoints are written (and reused by later runs).
    #[arg(long, default_value = "target/drift-bench")]
    dir: PathBuf,
    /// Probe images for the CKA figure.
    #[arg(long, default_value_t = 2000)]
    cka_images: usize,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchExplainArgs {
    /// Timed repeats per figure (the median is printed), after one warm-up run.
    #[arg(long, default_value_t = 3)]
    repeats: usize,
    /// Internal batch sizes to try for IG-50 (the fastest is reported).
    #[arg(long, value_delimiter = ',', default_value = "5,10,25,50")]
    ig_batches: Vec<usize>,
    /// Skip resnet18 at 224×224.
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Args)]
struct BenchTrainArgs {
    /// Timed optimiser steps per model (after one warm-up step).
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Images per batch.
    #[arg(long, default_value_t = 32)]
    batch_size: usize,
    /// Skip resnet18 at 224×224 (it takes minutes on 2 cores).
    #[arg(long)]
    quick: bool,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

#[derive(Subcommand)]
enum DataCommand {
    /// Write synthetic shape tasks as ImageFolders with a ground-truth mask per image.
    Synth(SynthArgs),
}

#[derive(Args)]
struct SynthArgs {
    /// Output directory; each task goes to <out>/<task>/{images,masks}/<split>/<class>/.
    #[arg(long, default_value = DATA_DIR)]
    out: PathBuf,
    /// Which task: pretrain, finetune, shortcut, or all.
    #[arg(long, default_value = "all")]
    task: String,
    /// Image side in pixels.
    #[arg(long, default_value_t = 64)]
    size: usize,
    /// Training images per class.
    #[arg(long, default_value_t = 200)]
    train_per_class: usize,
    /// Validation images per class.
    #[arg(long, default_value_t = 50)]
    val_per_class: usize,
    /// Test images per class.
    #[arg(long, default_value_t = 50)]
    test_per_class: usize,
    /// Random seed; the same seed writes the same images.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Replace a task directory that holds different data.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
pub(crate) struct CheckpointArgs {
    /// Architecture, required for a checkpoint without finelens metadata (e.g. a torchvision
    /// state dict): resnet18, resnet34, resnet50, resnet-mini.
    #[arg(long)]
    arch: Option<String>,
}

impl CheckpointArgs {
    fn load(&self, path: &Path) -> Result<checkpoint::Checkpoint> {
        Ok(self.source(path)?.load()?)
    }

    fn source(&self, path: &Path) -> Result<ModelSource> {
        Ok(ModelSource {
            path: path.to_owned(),
            arch: self.arch.as_deref().map(Arch::parse).transpose()?,
        })
    }
}

/// How images become model inputs; each overrides what the checkpoint records (for a bare
/// checkpoint: the architecture's size, crop 0.875, ImageNet's mean and std).
#[derive(Args)]
pub(crate) struct PreprocessArgs {
    /// Input side in pixels.
    #[arg(long)]
    input_size: Option<usize>,
    /// Share of the resized image the centre crop keeps: the shorter side is resized to
    /// input-size / crop-pct (torchvision's 0.875). 1 resizes the shorter side to the input
    /// size exactly, so an image already at that size is used as it is.
    #[arg(long)]
    crop_pct: Option<f32>,
    /// Normalisation mean, three comma-separated values.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    mean: Option<Vec<f32>>,
    /// Normalisation std, three comma-separated values.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    std: Option<Vec<f32>>,
}

impl PreprocessArgs {
    fn settings(&self) -> PreprocessSettings {
        let three = |v: &Option<Vec<f32>>| v.as_deref().map(|v| [v[0], v[1], v[2]]);
        PreprocessSettings {
            input_size: self.input_size,
            crop_pct: self.crop_pct,
            mean: three(&self.mean),
            std: three(&self.std),
        }
    }
}

#[derive(Args)]
struct InspectArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DataArgs {
    /// Fail on an image file that cannot be decoded instead of skipping it with a warning.
    #[arg(long)]
    strict: bool,
    /// Images per batch.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
}

#[derive(Args)]
struct EvalArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    /// An ImageFolder: <data>/<class>/<image>. Its classes must be the checkpoint's.
    #[arg(long)]
    data: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    data_args: DataArgs,
    /// Also write the metrics as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Where training and validation images come from.
#[derive(Args)]
struct SplitArgs {
    /// Training ImageFolder: <train>/<class>/<image>.
    #[arg(long)]
    train: PathBuf,
    /// Validation ImageFolder; without it, --val-fraction of --train is held out (seeded).
    #[arg(long)]
    val: Option<PathBuf>,
    /// Share of each class held out for validation when --val is not given.
    #[arg(long, default_value_t = 0.2)]
    val_fraction: f64,
}

impl SplitArgs {
    /// Class names, training and validation samples: two folders with the same classes, or a
    /// seeded split of one.
    fn load(&self, seed: u64, strict: bool) -> Result<(Vec<String>, Vec<Sample>, Vec<Sample>)> {
        let tf = open_folder(&self.train, strict)?;
        let (t, v) = match &self.val {
            Some(v) => {
                let vf = open_folder(v, strict)?;
                if vf.classes != tf.classes {
                    bail!(
                        "{}: classes [{}] differ from the training folder's [{}]",
                        v.display(),
                        vf.classes.join(", "),
                        tf.classes.join(", ")
                    );
                }
                (tf.samples.clone(), vf.samples)
            }
            None => tf.split(self.val_fraction, seed)?,
        };
        Ok((tf.classes, t, v))
    }
}

#[derive(Args)]
struct TrainArgs {
    #[command(flatten)]
    split: SplitArgs,
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
    data_args: DataArgs,
}

#[derive(Args)]
struct FinetuneArgs {
    /// The pretrained checkpoint (.safetensors).
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    split: SplitArgs,
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
    data_args: DataArgs,
}

#[derive(Args)]
struct Hyperparams {
    /// Passes over the training set.
    #[arg(long, default_value_t = 10)]
    epochs: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f64,
    /// sgd or adamw.
    #[arg(long, default_value = "sgd")]
    optimizer: String,
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
    /// Smallest random-resized-crop area as a share of the image (torchvision: 0.08).
    #[arg(long, default_value_t = 0.6)]
    crop_scale_min: f32,
    /// Seed for initialisation, shuffling and augmentation.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Stop early after this many epochs without a lower validation loss.
    #[arg(long)]
    patience: Option<usize>,
}

impl Hyperparams {
    fn train_config(&self, batch_size: usize) -> Result<TrainConfig> {
        let optimizer = match self.optimizer.as_str() {
            "sgd" => OptimizerConfig::sgd(self.momentum, self.nesterov, self.weight_decay),
            "adamw" => OptimizerConfig::adamw(self.weight_decay),
            o => bail!("unknown optimizer `{o}` (expected sgd or adamw)"),
        };
        let cfg = TrainConfig {
            epochs: self.epochs,
            batch_size,
            lr: self.lr,
            optimizer,
            warmup_epochs: (!self.constant_lr).then_some(self.warmup_epochs),
            backbone_lr_mult: 1.0,
            seed: self.seed,
            patience: self.patience,
        };
        cfg.check()?;
        Ok(cfg)
    }
}

#[derive(Args)]
struct DemoArgs {
    /// The pretrained checkpoint to evaluate.
    #[arg(long, default_value = FIXTURE)]
    fixture: PathBuf,
    /// Where the synthetic data is generated (reused when already there).
    #[arg(long, default_value = DATA_DIR)]
    data: PathBuf,
    /// Where the demo's outputs go.
    #[arg(long, default_value = DEMO_DIR)]
    out: PathBuf,
}

fn main() -> ExitCode {
    // Rust ignores SIGPIPE, so `finelens inspect m.safetensors | head` would panic on the closed
    // pipe. Restore the Unix default: the process ends quietly when its reader goes away.
    #[cfg(unix)]
    // SAFETY: called before any other thread exists; SIG_DFL is a valid handler for SIGPIPE.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    keep_freed_memory();
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc returns every freed block above its mmap threshold (at most 32 MB) to the kernel, so a
/// gradient pass that allocates the same large activations again takes fresh, zero-filled pages:
/// page faults were ≈ 8% of explaining time at 224×224. Raising both thresholds keeps freed
/// memory for reuse; the resident size stays at its peak, which the internal batch bounds.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any allocation-heavy work.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 1 << 30);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Exit status: 0 on success, 1 when an audit check fails (2, from `main`, on an error).
fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Audit(a) => return Ok(if audit::audit_cmd(a)? { 0 } else { 1 }),
        Command::Demo(a) => demo(a),
        Command::Data(DataCommand::Synth(a)) => synth_cmd(a),
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => eval_cmd(a),
        Command::Train(a) => train_cmd(a),
        Command::Finetune(a) => finetune_cmd(a),
        Command::Explain(a) => explain::explain_cmd(a),
        Command::Drift(a) => drift::drift_cmd(a),
        Command::Bench(BenchCommand::Drift(a)) => bench_drift(a),
        Command::Bench(BenchCommand::Demo(a)) => {
            let start = Instant::now();
            demo(DemoArgs {
                fixture: PathBuf::from(FIXTURE),
                data: PathBuf::from(DATA_DIR),
                out: a.out,
            })?;
            let s = start.elapsed().as_secs_f64();
            println!(
                "\nbench demo: {s:.1} s end to end with {} rayon threads ({} the 5-minute target)",
                rayon_threads(),
                if s < 300.0 { "within" } else { "OVER" }
            );
            Ok(())
        }
        Command::Bench(BenchCommand::Train(a)) => bench_train(a),
        Command::Bench(BenchCommand::Explain(a)) => bench_explain(a),
    }?;
    Ok(0)
}

/// A default path under the project: as given when it exists from here, else under the
/// workspace this binary was built from (so the demo also runs from another directory).
fn project_path(p: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        return p.to_owned();
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let candidate = root.join(p);
    if candidate.exists() {
        candidate
    } else {
        p.to_owned()
    }
}

fn synth_config(a: &SynthArgs) -> SynthConfig {
    SynthConfig {
        size: a.size,
        train_per_class: a.train_per_class,
        val_per_class: a.val_per_class,
        test_per_class: a.test_per_class,
        seed: a.seed,
    }
}

fn synth_cmd(a: SynthArgs) -> Result<()> {
    let tasks = if a.task == "all" {
        Task::ALL.to_vec()
    } else {
        vec![Task::parse(&a.task)?]
    };
    let cfg = synth_config(&a);
    for task in tasks {
        let t = Instant::now();
        let dir = synth::generate(&a.out, task, &cfg, a.force)?;
        println!(
            "{}: {} classes → {} ({:.1} s)",
            task.name(),
            task.shapes().len(),
            dir.root.display(),
            t.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

fn inspect(a: InspectArgs) -> Result<()> {
    let ck = a.ckpt.load(&a.checkpoint)?;
    if a.json {
        let v = serde_json::json!({
            "path": ck.path,
            "sha256": ck.sha256,
            "parameters": ck.store.num_weights(),
            "tensors": ck.store.names().count(),
            "metadata_recorded": ck.meta_recorded,
            "metadata": ck.meta,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let m = &ck.meta;
    println!("checkpoint   {}", ck.path.display());
    println!("sha256       {}", ck.sha256);
    println!("arch         {} (head {})", m.arch, m.head);
    println!(
        "parameters   {} in {} tensors",
        ck.store.num_weights(),
        ck.store.names().count()
    );
    println!(
        "classes      {}: {}",
        m.num_classes,
        m.class_names.join(", ")
    );
    println!(
        "input        {0}×{0}, crop {1}, mean {2:?}, std {3:?}",
        m.input_size, m.crop_pct, m.mean, m.std
    );
    println!(
        "parent       {}",
        m.parent_sha256.as_deref().unwrap_or("none")
    );
    println!(
        "seed         {}",
        m.seed.map_or("none".into(), |s| s.to_string())
    );
    if !ck.meta_recorded {
        println!("metadata     none recorded: classes, input size and normalisation are defaults");
    }
    if let Some(t) = &m.training {
        println!("training     {}", serde_json::to_string(t)?);
    }
    Ok(())
}

fn on_bad(strict: bool) -> OnBadImage {
    if strict {
        OnBadImage::Fail
    } else {
        OnBadImage::Skip
    }
}

fn open_folder(root: &Path, strict: bool) -> Result<ImageFolder> {
    let f = ImageFolder::open(root, on_bad(strict))?;
    for (p, why) in &f.skipped {
        eprintln!("warning: skipping {}: {why}", p.display());
    }
    Ok(f)
}

fn preprocess_of(meta: &Metadata) -> Preprocess {
    Preprocess {
        size: meta.input_size,
        crop_pct: meta.crop_pct,
        mean: meta.mean,
        std: meta.std,
    }
}

fn eval_loader(pre: Preprocess, d: &DataArgs) -> Loader {
    Loader {
        preprocess: pre,
        augment: None,
        batch_size: d.batch_size,
        shuffle: false,
        seed: 0,
        on_bad: on_bad(d.strict),
    }
}

/// Evaluate a loaded checkpoint on an ImageFolder whose classes must match its own.
fn evaluate_checkpoint(
    ck: &checkpoint::Checkpoint,
    folder: &ImageFolder,
    d: &DataArgs,
) -> Result<Metrics> {
    if folder.classes != ck.meta.class_names {
        bail!(
            "{}: classes [{}] do not match the checkpoint's [{}]",
            folder.root.display(),
            folder.classes.join(", "),
            ck.meta.class_names.join(", ")
        );
    }
    let model = ResNet::new(ck.config()?, &ck.store)?;
    let loader = eval_loader(preprocess_of(&ck.meta), d);
    Ok(evaluate(
        &model,
        &folder.samples,
        &loader,
        &ck.meta.class_names,
        &Device::Cpu,
    )?)
}

fn print_metrics(m: &Metrics) {
    println!(
        "accuracy {:.2}% on {} images, loss {:.4}",
        100.0 * m.accuracy,
        m.count,
        m.loss
    );
    println!(
        "{:<16} {:>9} {:>9} {:>9} {:>8}",
        "class", "precision", "recall", "f1", "support"
    );
    for c in &m.per_class {
        println!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            c.class, c.precision, c.recall, c.f1, c.support
        );
    }
}

fn write_json(path: &Path, value: &impl serde::Serialize) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: cannot create directory", dir.display()))?;
    }
    checkpoint::write_atomic(path, serde_json::to_string_pretty(value)?.as_bytes())?;
    Ok(())
}

fn eval_cmd(a: EvalArgs) -> Result<()> {
    let ck = a.ckpt.load(&a.checkpoint)?;
    let folder = open_folder(&a.data, a.data_args.strict)?;
    let m = evaluate_checkpoint(&ck, &folder, &a.data_args)?;
    print_metrics(&m);
    if let Some(p) = &a.json {
        write_json(p, &m)?;
    }
    Ok(())
}

/// Create `dir` (for outputs) up front, so an unwritable destination fails before training.
fn ensure_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .with_context(|| format!("{}: cannot create output directory", dir.display()))
}

fn train_loader(pre: &Preprocess, hp: &Hyperparams, d: &DataArgs) -> Result<Loader> {
    let l = Loader {
        preprocess: pre.clone(),
        augment: Some(Augment {
            scale: (hp.crop_scale_min, 1.0),
            ..Augment::default()
        }),
        batch_size: d.batch_size,
        shuffle: true,
        seed: hp.seed,
        on_bad: on_bad(d.strict),
    };
    l.check()?;
    Ok(l)
}

fn train_cmd(a: TrainArgs) -> Result<()> {
    let arch = Arch::parse(&a.arch)?;
    let head = Head::parse(&a.head)?;
    let cfg = a.hp.train_config(a.data_args.batch_size)?;
    // Fail on an unwritable destination before spending minutes training.
    ensure_dir(
        a.out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    let (classes, train, val) = a.split.load(a.hp.seed, a.data_args.strict)?;
    let config = ModelConfig::new(arch, classes.len(), head)?;
    let mut meta = Metadata::inferred(config);
    meta.class_names = classes.clone();
    meta.input_size = a.size.unwrap_or(arch.default_input_size());
    meta.crop_pct = 1.0;
    meta.seed = Some(a.hp.seed);
    let pre = preprocess_of(&meta);
    let train_loader = train_loader(&pre, &a.hp, &a.data_args)?;
    let val_loader = eval_loader(pre, &a.data_args);
    let store = ParamStore::init(&config.param_specs(), a.hp.seed, &Device::Cpu)?;
    let model = ResNet::new(config, &store)?;
    println!(
        "training {arch} ({} parameters) on {} images, validating on {}, {} classes",
        store.num_weights(),
        train.len(),
        val.len(),
        classes.len()
    );
    let data = TrainData {
        train: &train,
        val: &val,
        train_loader: &train_loader,
        eval_loader: &val_loader,
        class_names: &classes,
        device: &Device::Cpu,
    };
    let mut bar = progress::Reporter::new();
    let history = fit(
        &model,
        &store,
        &data,
        &cfg,
        &|_| 1.0,
        Start::default(),
        &mut |p| bar.train(p),
    )?;
    bar.finish();
    let last = history.last().expect("at least one epoch");
    meta.training = Some(serde_json::json!({
        "kind": "from-scratch",
        "config": cfg,
        "train_images": train.len(),
        "val_images": val.len(),
        "history": history_json(&history),
    }));
    let sha = checkpoint::save(&a.out, &store, &meta)?;
    println!(
        "saved {} (sha256 {}), validation accuracy {:.2}%",
        a.out.display(),
        &sha[..12],
        100.0 * last.val.accuracy
    );
    Ok(())
}

fn finetune_cmd(a: FinetuneArgs) -> Result<()> {
    let parent = a.ckpt.load(&a.checkpoint)?;
    let head = match a.head.as_str() {
        "keep" => HeadChoice::Keep,
        h => HeadChoice::New(Head::parse(h)?),
    };
    let freeze = finelens_tune::FreezePolicy::parse(&a.freeze)?;
    let mut cfg = a.hp.train_config(a.data_args.batch_size)?;
    cfg.backbone_lr_mult = a.backbone_lr_mult;
    cfg.check()?;
    ensure_dir(&a.out)?;
    let (classes, train, val) = a.split.load(a.hp.seed, a.data_args.strict)?;
    let pre = preprocess_of(&parent.meta);
    let train_loader = train_loader(&pre, &a.hp, &a.data_args)?;
    let val_loader = eval_loader(pre, &a.data_args);
    let model_path = a.out.join("model.safetensors");
    let job = FinetuneJob {
        parent: &parent,
        head,
        freeze,
        lp_epochs: a.lp_epochs,
        config: cfg,
        data: TrainData {
            train: &train,
            val: &val,
            train_loader: &train_loader,
            eval_loader: &val_loader,
            class_names: &classes,
            device: &Device::Cpu,
        },
        checkpoint: &model_path,
        freeze_spec: a.freeze.clone(),
        state: &a.out.join("last.safetensors"),
        resume: a.resume,
    };
    let mut bar = progress::Reporter::new();
    let outcome = finelens_tune::finetune::run(&job, &mut |e| match e {
        FinetuneEvent::Phase {
            name,
            epochs,
            frozen,
            weights,
        } => {
            bar.finish();
            println!(
                "{name}: {} from {} (sha256 {}), {epochs} epochs on {} images, validating on {}, {} classes; {frozen} of {weights} parameter tensors frozen",
                parent.meta.arch,
                parent.path.display(),
                &parent.sha256[..12],
                train.len(),
                val.len(),
                classes.len(),
            );
        }
        FinetuneEvent::FreezesNothing => eprintln!(
            "warning: --freeze {} matches no parameter; everything trains",
            a.freeze
        ),
        FinetuneEvent::Progress(p) => bar.train(p),
    });
    bar.finish();
    let outcome = outcome.with_context(|| a.split.train.display().to_string())?;
    let best = &outcome.history[outcome.best_epoch];
    let metrics = serde_json::json!({
        "best_epoch": outcome.best_epoch,
        "val": best.val,
        "history": history_json(&outcome.history),
        "parent_sha256": parent.sha256,
        "checkpoint": model_path,
    });
    write_json(&a.out.join("metrics.json"), &metrics)?;
    let curves = a.out.join("curves.png");
    write_curves(&curves, &outcome.history)?;
    println!(
        "best epoch {} of {}: validation accuracy {:.2}%, loss {:.4}",
        outcome.best_epoch + 1,
        outcome.history.len(),
        100.0 * best.val.accuracy,
        best.val.loss
    );
    println!(
        "checkpoint {}
metrics    {}
curves     {}",
        model_path.display(),
        a.out.join("metrics.json").display(),
        curves.display()
    );
    Ok(())
}

/// Loss and accuracy per epoch, train and validation, as a PNG (written atomically).
fn write_curves(path: &Path, history: &[finelens_tune::EpochRecord]) -> Result<()> {
    let series =
        |name: &str, f: &dyn Fn(&finelens_tune::EpochRecord) -> f64| finelens_report::Series {
            name: name.into(),
            values: history.iter().map(f).collect(),
        };
    let png = finelens_report::training_curves(
        &[
            series("train", &|r| r.train_loss),
            series("val", &|r| r.val.loss),
        ],
        &[
            series("train", &|r| r.train_accuracy),
            series("val", &|r| r.val.accuracy),
        ],
    )?;
    checkpoint::write_atomic(path, &png)?;
    Ok(())
}

fn bench_train(a: BenchTrainArgs) -> Result<()> {
    if a.steps == 0 || a.batch_size == 0 {
        bail!("--steps and --batch-size must be at least 1");
    }
    let mut cases = vec![(Arch::ResNetMini, 64)];
    if !a.quick {
        cases.push((Arch::ResNet18, 224));
    }
    println!("training throughput: forward (train mode) + cross-entropy + backward + SGD step, batch {}, {} rayon threads", a.batch_size, rayon_threads());
    let mut results = Vec::new();
    for (arch, size) in cases {
        let t = finelens_tune::bench::train_throughput(arch, size, a.batch_size, a.steps)?;
        println!(
            "  {:<12} {:>3}×{:<3}  {:>8.2} s/step  {:>8.1} images/s",
            t.arch, size, size, t.seconds_per_step, t.images_per_second
        );
        results.push(t);
    }
    if let Some(p) = &a.json {
        write_json(p, &results)?;
    }
    Ok(())
}

fn bench_explain(a: BenchExplainArgs) -> Result<()> {
    if a.repeats == 0 || a.ig_batches.is_empty() || a.ig_batches.contains(&0) {
        bail!("--repeats and every --ig-batches entry must be at least 1");
    }
    let mut cases = vec![(Arch::ResNetMini, 64, 6)];
    if !a.quick {
        // ImageNet's 1000 classes, as in the reference figures.
        cases.insert(0, (Arch::ResNet18, 224, 1000));
    }
    println!(
        "explanation time, ms per image at batch 1 (median of {}), {} rayon threads",
        a.repeats,
        rayon_threads()
    );
    let mut results = Vec::new();
    for (arch, size, classes) in cases {
        let t =
            finelens_attrib::bench::explain_timings(arch, size, classes, a.repeats, &a.ig_batches)?;
        println!("  {} {}×{}", t.arch, size, size);
        println!("    forward                      {:>9.1}", t.forward_ms);
        println!(
            "    forward + backward to input  {:>9.1}",
            t.forward_backward_ms
        );
        println!("    saliency                     {:>9.1}", t.saliency_ms);
        println!(
            "    SmoothGrad-20                {:>9.1}",
            t.smoothgrad_20_ms
        );
        println!(
            "    IG-50 (internal batch {:>2})    {:>9.1}   [{}]",
            t.integrated_gradients_50_batch,
            t.integrated_gradients_50_ms,
            t.integrated_gradients_50_by_batch
                .iter()
                .map(|(b, ms)| format!("batch {b}: {ms:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("    Grad-CAM                     {:>9.1}", t.grad_cam_ms);
        results.push(t);
    }
    if let Some(p) = &a.json {
        write_json(p, &results)?;
    }
    Ok(())
}

fn bench_drift(a: BenchDriftArgs) -> Result<()> {
    if a.gigabytes.is_nan() || a.gigabytes <= 0.0 || a.cka_images < 4 {
        bail!("--gigabytes must be positive and --cka-images at least 4");
    }
    println!(
        "drift: {} rayon threads; generating (once) two {:.1} GiB checkpoints in {}",
        rayon_threads(),
        a.gigabytes,
        a.dir.display()
    );
    let w = finelens_drift::bench::weight_drift_bench(&a.dir, a.gigabytes)?;
    println!(
        "  weight drift: {} tensors of {:.0} MiB, {:.2} s → {:.2} GB/s of tensor data read; peak RSS {}",
        w.tensors,
        w.largest_tensor_bytes as f64 / (1u64 << 20) as f64,
        w.seconds,
        w.gigabytes_per_second,
        w.peak_rss_bytes.map_or("unknown".into(), |b| format!(
            "{:.0} MiB ({:.1}× the largest tensor)",
            b as f64 / (1u64 << 20) as f64,
            b as f64 / w.largest_tensor_bytes as f64
        ))
    );
    let c = finelens_drift::bench::cka_bench(a.cka_images, 100)?;
    println!(
        "  minibatch CKA: {} images at {}×{}, batch {}, layers {}: {:.2} s",
        c.images,
        c.size,
        c.size,
        c.batch,
        c.layers.join(", "),
        c.seconds
    );
    if let Some(p) = &a.json {
        write_json(p, &serde_json::json!({"weights": w, "cka": c}))?;
    }
    Ok(())
}

fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    })
}

fn demo(a: DemoArgs) -> Result<()> {
    let start = Instant::now();
    let fixture = project_path(&a.fixture);
    let ck = checkpoint::load(&fixture, None)
        .with_context(|| "loading the demo fixture (regenerate it with `just fixtures`)")?;
    let data_root = if a.data == Path::new(DATA_DIR) {
        project_path(Path::new("fixtures")).join("data")
    } else {
        a.data.clone()
    };
    // The same generator settings as the fixture recipe, so the pretraining task matches.
    let cfg = SynthConfig::default();
    println!("finelens demo: synthetic data in {}", data_root.display());
    for task in Task::ALL {
        // The demo owns its data folder: data from another generator version is replaced.
        let dir = synth::generate(&data_root, task, &cfg, true)?;
        println!(
            "  {:<9} {} classes, {}/{}/{} images per class (train/val/test) → {}",
            task.name(),
            task.shapes().len(),
            cfg.train_per_class,
            cfg.val_per_class,
            cfg.test_per_class,
            dir.root.display()
        );
    }
    println!(
        "\npretrained fixture: {} ({}, {} classes, sha256 {})",
        fixture.display(),
        ck.meta.arch,
        ck.meta.num_classes,
        &ck.sha256[..12]
    );
    let test = synth::TaskDir {
        root: data_root.join(Task::Pretrain.name()),
    }
    .images(Split::Test);
    let folder = open_folder(&test, true)?;
    let m = evaluate_checkpoint(
        &ck,
        &folder,
        &DataArgs {
            strict: true,
            batch_size: 64,
        },
    )?;
    print_metrics(&m);
    let out = a.out.join("pretrain-test-metrics.json");
    write_json(&out, &m)?;
    println!("metrics written to {}", out.display());

    // Fine-tune the fixture on the fine-tuning task (other classes) and, with the same recipe,
    // on its shortcut variant: a new head, the whole network trained with AdamW.
    let ft = synth::TaskDir {
        root: data_root.join(Task::Finetune.name()),
    };
    let sc = synth::TaskDir {
        root: data_root.join(Task::Shortcut.name()),
    };
    for (task, dir, out) in [
        (Task::Finetune, &ft, "finetune"),
        (Task::Shortcut, &sc, "shortcut"),
    ] {
        println!("\nfine-tuning the fixture on the {} task", task.name());
        finetune_cmd(FinetuneArgs {
            checkpoint: fixture.clone(),
            ckpt: CheckpointArgs { arch: None },
            split: SplitArgs {
                train: dir.images(Split::Train),
                val: Some(dir.images(Split::Val)),
                val_fraction: 0.2,
            },
            head: "linear".into(),
            lp_epochs: 0,
            freeze: "none".into(),
            backbone_lr_mult: 1.0,
            out: a.out.join(out),
            resume: false,
            hp: Hyperparams {
                epochs: DEMO_EPOCHS,
                lr: DEMO_LR,
                optimizer: "adamw".into(),
                momentum: 0.9,
                nesterov: false,
                weight_decay: 0.05,
                warmup_epochs: 0.5,
                constant_lr: false,
                crop_scale_min: 0.6,
                seed: 0,
                patience: None,
            },
            data_args: DataArgs {
                strict: true,
                batch_size: 32,
            },
        })?;
    }

    // Explain the fine-tuned model on a few test images, every class in turn.
    let model = a.out.join("finetune/model.safetensors");
    let mut bar = progress::Reporter::new();
    println!("\nexplaining the fine-tuned model on its test split");
    let explained = finelens_pipeline::explain::explain(
        &finelens_pipeline::explain::ExplainSettings {
            model: ModelSource::new(&model),
            preprocess: PreprocessSettings::default(),
            input: ft.images(Split::Test),
            methods: MethodSpec::parse_list(DEMO_METHODS)?,
            shared: MethodOptions::default(),
            target: "predicted".into(),
            limit: Some(DEMO_EXPLAIN_IMAGES),
            strict: true,
            outlier_perc: finelens_report::heatmap::DEFAULT_OUTLIER_PERC,
            out: a.out.join("explain"),
            force: true,
        },
        &mut |e| bar.event(e),
    );
    bar.finish();
    explained?;

    // Where fine-tuning moved the fixture: weights, representations and explanations on the
    // pretraining task's test images (the parent's own data).
    println!("\ndrift from the fixture to the fine-tuned model");
    let drift = finelens_pipeline::drift::drift(
        &finelens_pipeline::drift::DriftSettings {
            before: ModelSource::new(&fixture),
            after: ModelSource::new(&model),
            preprocess: PreprocessSettings::default(),
            probe: finelens_pipeline::drift::Probe::Folder(test.clone()),
            limit: 300,
            batch_size: 50,
            layers: Vec::new(),
            pooled: false,
            explain_method: MethodSpec::new(Method::IntegratedGradients),
            shared: MethodOptions::default(),
            explain_images: 16,
            top_fraction: 0.1,
            spectral: true,
            strict: true,
            out: a.out.join("drift"),
            force: true,
        },
        &mut |e| bar.event(e),
    );
    bar.finish();
    let drift = drift?;

    // Audit both on their validation images (the shortcut's carry the patch), against the
    // fixture as base, with the default policy.
    let mut verdicts = Vec::new();
    for (name, dir) in [("finetune", &ft), ("shortcut", &sc)] {
        println!("\nauditing the {name} model");
        let out = a.out.join(format!("audit-{name}"));
        let outcome = audit::run_audit(&finelens_pipeline::audit::AuditJob {
            model: ModelSource::new(a.out.join(name).join("model.safetensors")),
            preprocess: PreprocessSettings::default(),
            data: dir.images(Split::Val),
            masks: None,
            no_masks: false,
            base: Some(ModelSource::new(&fixture)),
            policy: None,
            require_all: false,
            methods: MethodSpec::parse_list("integrated_gradients,saliency,grad_cam")?,
            shared: MethodOptions::default(),
            limit: 48,
            replacement: BaselineSpec::Blur(None),
            sanity_images: 4,
            seed: 0,
            strict: true,
            out: out.clone(),
            force: true,
            command_line: std::env::args().collect(),
        })?;
        verdicts.push((name, outcome.document.pass, out, outcome.blocks));
    }
    // One page for both: the summary first, then each model's audit.
    let mut page = finelens_report::html::Page {
        title: "finelens demo: a clean and a shortcut fine-tune of the same checkpoint".into(),
        blocks: vec![
            finelens_report::html::Block::Paragraph(format!(
                "The pretrained fixture {} was fine-tuned with one recipe on the clean task and on \
                 its shortcut variant, whose corner patch gives the class away; both were audited \
                 on their validation images against the fixture with the default policy.",
                fixture.display()
            )),
            finelens_report::html::Block::Badges(
                verdicts
                    .iter()
                    .map(|(name, pass, _, _)| {
                        if *pass {
                            (
                                format!("{name}: all checks pass"),
                                finelens_report::html::Status::Pass,
                            )
                        } else {
                            (
                                format!("{name}: FLAGGED"),
                                finelens_report::html::Status::Fail,
                            )
                        }
                    })
                    .collect(),
            ),
        ],
    };
    if let Some(ex) = &drift.explanation {
        page.blocks
            .push(finelens_report::html::Block::Paragraph(format!(
                "Explanation drift from the fixture to the clean model ({} on the embedding norm, \
             pretraining test images): Spearman ρ of |attribution| {:.3}, overlap of the top \
             10% pixels {:.3}. Each model's weight and representation drift is in its section.",
                ex.method, ex.mean_spearman, ex.mean_top_iou
            )));
    }
    for (_, _, _, blocks) in &verdicts {
        page.blocks.extend(blocks.iter().cloned());
    }
    let index = a.out.join("index.html");
    checkpoint::write_atomic(&index, finelens_report::html::render(&page).as_bytes())?;
    println!();
    for (name, pass, out, _) in &verdicts {
        println!(
            "{name:<9} {}  ({})",
            if *pass {
                "passes every check"
            } else {
                "FLAGGED: some checks fail"
            },
            out.join("report.json").display()
        );
    }
    println!("\nreport: {}", index.display());
    println!("done in {:.1} s", start.elapsed().as_secs_f64());
    Ok(())
}
