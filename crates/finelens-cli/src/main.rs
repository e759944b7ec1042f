//! The `finelens` command. It parses arguments into job settings and calls one
//! `finelens-pipeline` job per command; every capability lives in a library crate.

mod audit;
mod bench;
mod drift;
mod explain;
mod progress;
mod train;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use finelens_data::synth::SynthConfig;
use finelens_models::Arch;
use finelens_pipeline::inputs::CheckpointSummary;
use finelens_pipeline::merge;
use finelens_pipeline::{ModelSource, PreprocessSettings};

/// The shipped pretrained checkpoint (resnet-mini trained on the synthetic `pretrain` task).
const FIXTURE: &str = "fixtures/resnet-mini-pretrain.safetensors";
/// Where the demo and the fixture recipe put generated synthetic data.
const DATA_DIR: &str = "fixtures/data";
/// Where the demo writes its outputs.
const DEMO_DIR: &str = "reports/demo";

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
    /// fixture, fine-tune it on a clean and a shortcut task, explain, measure drift, audit both.
    Demo(DemoArgs),
    /// Datasets: generate the synthetic shape tasks.
    #[command(subcommand)]
    Data(DataCommand),
    /// Print a checkpoint's architecture, classes, parameter count and metadata.
    Inspect(InspectArgs),
    /// Evaluate a checkpoint on an ImageFolder: accuracy, per-class precision/recall/F1, confusion.
    Eval(train::EvalArgs),
    /// Train a model from a seeded random initialisation on an ImageFolder (how the fixture is made).
    Train(train::TrainArgs),
    /// Fine-tune a pretrained checkpoint on a new ImageFolder task: new head, freezing,
    /// discriminative learning rates; keeps the epoch with the lowest validation loss.
    Finetune(train::FinetuneArgs),
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
    /// Combine the outputs of every shard of one `explain --shard I/N` or `audit --shard I/N`
    /// run into what a single run would have written (an audit's exit status as `audit`'s).
    Merge(MergeArgs),
    /// Benchmarks (speed is measured here, never in tests).
    #[command(subcommand)]
    Bench(bench::BenchCommand),
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
    fn source(&self, path: &Path) -> Result<ModelSource> {
        Ok(ModelSource {
            arch: self.arch.as_deref().map(Arch::parse).transpose()?,
            ..ModelSource::new(path)
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
struct MergeArgs {
    /// The shards' output directories, in any order.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    /// Where the merged output goes.
    #[arg(long)]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
}

#[derive(Args)]
struct DemoArgs {
    /// The pretrained checkpoint to fine-tune.
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
    use bench::BenchCommand as B;
    match cli.command {
        Command::Audit(a) => return Ok(if audit::audit_cmd(a)? { 0 } else { 1 }),
        Command::Demo(a) => demo(a).map(|_| ()),
        Command::Data(DataCommand::Synth(a)) => synth_cmd(a),
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => train::eval_cmd(a),
        Command::Train(a) => train::train_cmd(a),
        Command::Finetune(a) => train::finetune_cmd(a),
        Command::Explain(a) => explain::explain_cmd(a),
        Command::Drift(a) => drift::drift_cmd(a),
        Command::Merge(a) if a.shards[0].join("partial.json").is_file() => {
            let merged = progress::run(|p| merge::merge_audit(&a.shards, &a.out, a.force, p))?;
            return Ok(if merged.document.pass { 0 } else { 1 });
        }
        Command::Merge(a) => {
            progress::run(|p| merge::merge_explain(&a.shards, &a.out, a.force, p)).map(|_| ())
        }
        Command::Bench(B::Drift(a)) => bench::bench_drift(a),
        Command::Bench(B::Demo(a)) => {
            let s = demo(DemoArgs {
                fixture: PathBuf::from(FIXTURE),
                data: PathBuf::from(DATA_DIR),
                out: a.out,
            })?;
            println!(
                "\nbench demo: {s:.1} s end to end with {} rayon threads ({} the 5-minute target)",
                finelens_pipeline::bench::rayon_threads(),
                if s < 300.0 { "within" } else { "OVER" }
            );
            Ok(())
        }
        Command::Bench(B::Train(a)) => bench::bench_train(a),
        Command::Bench(B::Explain(a)) => bench::bench_explain(a),
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

fn synth_cmd(a: SynthArgs) -> Result<()> {
    let cfg = SynthConfig {
        size: a.size,
        train_per_class: a.train_per_class,
        val_per_class: a.val_per_class,
        test_per_class: a.test_per_class,
        seed: a.seed,
    };
    progress::run(|p| finelens_pipeline::train::synthesise(&a.out, &a.task, &cfg, a.force, p))
}

fn inspect(a: InspectArgs) -> Result<()> {
    let summary = CheckpointSummary::of(&a.ckpt.source(&a.checkpoint)?.checkpoint()?);
    if a.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        println!("{summary}");
    }
    Ok(())
}

/// Run the demo; its running time in seconds.
fn demo(a: DemoArgs) -> Result<f64> {
    let data = if a.data == Path::new(DATA_DIR) {
        project_path(Path::new("fixtures")).join("data")
    } else {
        a.data
    };
    let settings = finelens_pipeline::demo::DemoSettings {
        fixture: project_path(&a.fixture),
        data,
        out: a.out,
        command_line: std::env::args().collect(),
    };
    let outcome = progress::run(|p| finelens_pipeline::demo::demo(&settings, p))?;
    println!("\n{outcome}");
    Ok(outcome.seconds)
}
