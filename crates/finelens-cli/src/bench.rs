//! `finelens bench …`: the benchmarks the libraries define, run and printed (speed is measured
//! here, never in tests).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use finelens_pipeline::{bench, write_json};

#[derive(Subcommand)]
pub enum BenchCommand {
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
pub struct BenchDemoArgs {
    /// Where the timed demo writes its outputs.
    #[arg(long, default_value = "target/bench-demo")]
    pub out: PathBuf,
}

#[derive(Args)]
pub struct BenchDriftArgs {
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
pub struct BenchExplainArgs {
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
pub struct BenchTrainArgs {
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

/// Run a benchmark job with its lines printed, and write its figures to `json` when given.
fn run<T: serde::Serialize>(
    json: &Option<PathBuf>,
    job: impl FnOnce(finelens_pipeline::Progress) -> finelens_pipeline::Result<T>,
) -> Result<()> {
    let figures = crate::progress::run(job)?;
    if let Some(p) = json {
        write_json(p, &figures)?;
    }
    Ok(())
}

pub fn bench_train(a: BenchTrainArgs) -> Result<()> {
    run(&a.json, |p| bench::train(a.steps, a.batch_size, a.quick, p))
}

pub fn bench_explain(a: BenchExplainArgs) -> Result<()> {
    run(&a.json, |p| {
        bench::explain(a.repeats, &a.ig_batches, a.quick, p)
    })
}

pub fn bench_drift(a: BenchDriftArgs) -> Result<()> {
    run(&a.json, |p| {
        bench::drift(a.gigabytes, &a.dir, a.cka_images, p)
    })
}
