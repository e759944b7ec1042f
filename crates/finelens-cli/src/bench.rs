//! `finelens bench …`: the benchmarks the libraries define, run and printed (speed is measured
//! here, never in tests).

use std::path::PathBuf;

use anyhow::Result;
use clap::{Args, Subcommand};
use finelens_pipeline::bench::{
    DriftBenchSettings, ExplainBench, TextBench, TextExplainBench, TrainBench,
};
use finelens_pipeline::{bench, write_json};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Training throughput (images/s) for resnet-mini at 64×64 and resnet18 at 224×224, batch 32.
    Train(WithJson<TrainBench>),
    /// Explanation speed (ms/image, batch 1), resnet18 at 224 and 64, resnet-mini at 64.
    Explain(WithJson<ExplainBench>),
    /// The demo end to end, timed (target: under 5 minutes on 2 cores).
    Demo(BenchDemoArgs),
    /// Weight drift (GB/s, peak memory) and minibatch CKA over 2,000 probe images (seconds).
    Drift(WithJson<DriftBenchSettings>),
    /// Text fine-tuning throughput (sentences/s, peak memory) for all-MiniLM-L6-v2's shape at
    /// 64 tokens, batch 16; scripts/peer_text_bench.py is the PyTorch peer.
    Text(WithJson<TextBench>),
    /// Token attributions of all-MiniLM-L6-v2's shape (Captum: scripts/peer_text_explain_bench.py).
    TextExplain(WithJson<TextExplainBench>),
}

#[derive(Args)]
pub struct BenchDemoArgs {
    /// Where the timed demo writes its outputs.
    #[arg(long, default_value = "target/bench-demo")]
    pub out: PathBuf,
}

/// A benchmark's settings and where its figures may go.
#[derive(Args)]
pub struct WithJson<T: Args> {
    #[command(flatten)]
    settings: T,
    /// Also write the figures as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// Run a benchmark job with its lines printed, and write its figures to `--json` when given.
fn run<T: Args, F: serde::Serialize>(
    a: WithJson<T>,
    job: impl FnOnce(&T, finelens_pipeline::Progress) -> finelens_pipeline::Result<F>,
) -> Result<()> {
    let figures = crate::progress::run(|p| job(&a.settings, p))?;
    if let Some(p) = &a.json {
        write_json(p, &figures)?;
    }
    Ok(())
}

pub fn bench(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Train(a) => run(a, bench::train),
        BenchCommand::Explain(a) => run(a, bench::explain),
        BenchCommand::Drift(a) => run(a, bench::drift),
        BenchCommand::Text(a) => run(a, bench::text),
        BenchCommand::TextExplain(a) => run(a, bench::text_explain),
        BenchCommand::Demo(a) => crate::bench_demo(a.out),
    }
}
