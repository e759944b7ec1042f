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
use finelens_pipeline::demo::{DemoPaths, DATA_DIR};
use finelens_pipeline::merge;
use finelens_pipeline::output::OutputSettings;
use finelens_pipeline::ModelSource;

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
    Demo(DemoPaths),
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
    /// and stage; representation drift (CKA) and explanation drift on a probe set; writes
    /// drift.json, layers.png and cka.png.
    Drift(drift::DriftArgs),
    /// Audit a checkpoint's explanations before shipping it: randomisation sanity checks,
    /// faithfulness, localisation against masks, shortcut detection, completeness, drift from a
    /// base; a policy's pass/fail table; writes report.json, index.html and its figures. Exit
    /// status 0 = all pass, 1 = a check fails, 2 = error.
    Audit(audit::AuditArgs),
    /// Evaluate the explanation methods (not the model: that is `eval`) with Quantus's metrics,
    /// every metric for every method, no gate: the audit's report plus one row per method.
    Evaluate(audit::AuditArgs),
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
    /// Which task: pretrain, finetune, shortcut, or all (the image tasks); text-sentiment or
    /// text-shortcut (JSONL with cue-word rationales).
    #[arg(long, default_value = "all")]
    task: String,
    #[command(flatten)]
    config: SynthConfig,
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

#[derive(Args)]
struct InspectArgs {
    /// The checkpoint (.safetensors), or a Hugging Face text model folder.
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Print as JSON.
    #[arg(long)]
    json: bool,
    /// Also WeightWatcher's spectrum of each weight matrix: power-law α, α̂, log λ_max, MP soft
    /// rank, correlation traps, and the reading of α.
    #[arg(long)]
    spectral: bool,
}

#[derive(Args)]
struct MergeArgs {
    /// The shards' output directories, in any order.
    #[arg(required = true)]
    shards: Vec<PathBuf>,
    #[command(flatten)]
    output: OutputSettings,
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
    finelens_models::kernel::serial_candle_elementwise();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        // --help and --version.
        Err(e) if !e.use_stderr() => e.exit(),
        // A bad argument is one line, like every other error: clap's message without its usage.
        Err(e) => {
            let text = e.render().to_string();
            let lines: Vec<&str> = text
                .lines()
                .take_while(|l| !l.starts_with("Usage:") && !l.starts_with("For more"))
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect();
            eprintln!("{}", lines.join(" "));
            return ExitCode::from(2);
        }
    };
    match finelens_models::kernel::on_pool(|| run(cli)) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// glibc gives freed blocks over 32 MB back to the kernel, so each pass took fresh zero-filled
/// pages (40% of a 224-px training step): one arena (the work runs on rayon's threads), no mmap
/// and a high trim threshold keep freed memory for reuse; the resident size stays at its peak.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any allocation-heavy work.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_MAX, 0);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

/// Exit status: 0 on success, 1 when an audit check fails (2, from `main`, on an error).
fn run(cli: Cli) -> Result<u8> {
    match cli.command {
        Command::Audit(a) => return Ok(if audit::audit_cmd(a)? { 0 } else { 1 }),
        Command::Evaluate(a) => {
            let job = a.job()?;
            progress::run(|p| finelens_pipeline::audit::evaluate(&job, p))
        }
        Command::Demo(a) => demo(a).map(|_| ()),
        Command::Data(DataCommand::Synth(a)) => synth_cmd(a),
        Command::Inspect(a) => inspect(a),
        Command::Eval(a) => train::eval_cmd(a),
        Command::Train(a) => train::train_cmd(a),
        Command::Finetune(a) => train::finetune_cmd(a),
        Command::Explain(a) => explain::explain_cmd(a),
        Command::Drift(a) => drift::drift_cmd(a),
        Command::Merge(a) => {
            let (out, force) = (a.output.dir("merge"), a.output.force);
            if a.shards[0].join("partial.json").is_file() {
                let merged = progress::run(|p| merge::merge_audit(&a.shards, &out, force, p))?;
                return Ok(if merged.document.pass { 0 } else { 1 });
            }
            progress::run(|p| merge::merge_explain(&a.shards, &out, force, p)).map(|_| ())
        }
        Command::Bench(b) => bench::bench(b),
    }?;
    Ok(0)
}

fn synth_cmd(a: SynthArgs) -> Result<()> {
    progress::run(|p| finelens_pipeline::train::synthesise(&a.out, &a.task, &a.config, a.force, p))
}

fn inspect(a: InspectArgs) -> Result<()> {
    let source = a.ckpt.source(&a.checkpoint)?;
    let text = finelens_pipeline::inspect::inspect(&a.checkpoint, &source, a.spectral, a.json)?;
    println!("{text}");
    Ok(())
}

/// Run the demo; its running time in seconds.
fn demo(paths: DemoPaths) -> Result<f64> {
    let settings = paths.settings(std::env::args().collect());
    let outcome = progress::run(|p| finelens_pipeline::demo::demo(&settings, p))?;
    println!("\n{outcome}");
    Ok(outcome.seconds)
}

/// `bench demo`: the demo, timed.
fn bench_demo(out: PathBuf) -> Result<()> {
    let s = demo(DemoPaths::shipped(out))?;
    println!(
        "\nbench demo: {s:.1} s end to end with {} rayon threads ({} the 5-minute target)",
        finelens_pipeline::bench::rayon_threads(),
        if s < 300.0 { "within" } else { "OVER" }
    );
    Ok(())
}
