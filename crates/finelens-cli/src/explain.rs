//! `finelens explain`: arguments → `finelens_pipeline::explain`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_attrib::{MethodOptions, MethodSpec, Rule};
use finelens_pipeline::explain::{explain, ExplainSettings};
use finelens_report::heatmap;

use crate::{CheckpointArgs, PreprocessArgs};

#[derive(Args)]
pub struct ExplainArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    /// An image, a folder of images, or an ImageFolder (<dir>/<class>/<image>).
    input: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessArgs,
    /// Comma-separated method specs, or `all`: gradient, saliency (|gradient|), gradient_x_input,
    /// smoothgrad, smoothgrad_sq, vargrad, integrated_gradients (ig), grad_cam, occlusion. A
    /// spec may carry its own settings: `integrated_gradients:steps=32,rule=trapezoid,baseline=blur+zeros`.
    #[arg(long, default_value = "saliency,integrated_gradients,grad_cam")]
    methods: String,
    #[command(flatten)]
    method_settings: MethodArgs,
    /// Output directory: <id>/<method>.npy|.png|_overlay.png per image, and explain.json.
    /// Written under a temporary name and renamed into place; a run that fails keeps what it
    /// wrote as <out>.partial.
    #[arg(long, default_value = "reports/explain")]
    out: PathBuf,
    /// Replace an existing output directory.
    #[arg(long)]
    force: bool,
    /// The class explained: predicted, a class index, or a class name.
    #[arg(long, default_value = "predicted")]
    target: String,
    /// Explain at most this many images (taken across classes in turn for an ImageFolder).
    #[arg(long)]
    limit: Option<usize>,
    /// Fail on an image that cannot be decoded instead of skipping it with a warning.
    #[arg(long)]
    strict: bool,
    /// Explain only shard I of N (0 ≤ I < N), chosen by a stable hash of each image's path;
    /// `finelens merge` combines the shards' outputs (deploy/ has Kubernetes and Slurm examples).
    #[arg(long, value_name = "I/N")]
    shard: Option<finelens_pipeline::shard::Shard>,
    /// Heat maps: clip the largest values holding this percentage of the attribution mass
    /// (Captum's outlier_perc).
    #[arg(long, default_value_t = heatmap::DEFAULT_OUTLIER_PERC)]
    outlier_perc: f32,
}

/// Settings the methods share unless a method's own spec says otherwise (explain, drift and
/// audit take the same flags).
#[derive(Args)]
pub struct MethodArgs {
    /// Integrated gradients: quadrature steps (default 64).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Integrated gradients: quadrature rule (riemann_left, riemann_right, riemann_middle,
    /// riemann_trapezoid, gausslegendre; default gausslegendre).
    #[arg(long)]
    pub rule: Option<String>,
    /// Baseline for integrated gradients (and occlusion with --fill baseline): zeros, black,
    /// blur[:SIGMA], noise[:K] (K seeded draws), image:PATH; several, comma-separated, are
    /// averaged (default zeros).
    #[arg(long)]
    pub baseline: Option<String>,
    /// Inputs per gradient pass for integrated gradients, SmoothGrad and occlusion (default: from
    /// the input size, to stay within about 2 GB).
    #[arg(long)]
    pub internal_batch: Option<usize>,
    /// SmoothGrad: noisy samples (default 20).
    #[arg(long)]
    pub samples: Option<usize>,
    /// SmoothGrad: noise σ as a fraction of the input's value range (default 0.15).
    #[arg(long)]
    pub noise: Option<f32>,
    /// Seed for SmoothGrad's noise, noise baselines and (audit) the random pixel orders and
    /// re-initialised weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Grad-CAM: the layer (default: the model's last spatial layer).
    #[arg(long)]
    pub layer: Option<String>,
    /// Occlusion: window side in pixels (default: input size / 8).
    #[arg(long)]
    pub window: Option<usize>,
    /// Occlusion: window stride (default: half the window).
    #[arg(long)]
    pub stride: Option<usize>,
    /// Occlusion: what fills the window, a value in normalised space or `baseline` (default 0).
    #[arg(long)]
    pub fill: Option<String>,
}

impl MethodArgs {
    pub fn shared(&self) -> Result<MethodOptions> {
        Ok(MethodOptions {
            steps: self.steps,
            rule: self.rule.as_deref().map(Rule::parse).transpose()?,
            baseline: self.baseline.as_deref().map(str::parse).transpose()?,
            internal_batch: self.internal_batch,
            samples: self.samples,
            noise: self.noise,
            seed: Some(self.seed),
            layer: self.layer.clone(),
            window: self.window,
            stride: self.stride,
            fill: self.fill.as_deref().map(str::parse).transpose()?,
        })
    }
}

impl ExplainArgs {
    pub fn settings(&self) -> Result<ExplainSettings> {
        Ok(ExplainSettings {
            model: self.ckpt.source(&self.checkpoint)?,
            preprocess: self.pre.settings(),
            input: self.input.clone(),
            methods: MethodSpec::parse_list(&self.methods)?,
            shared: self.method_settings.shared()?,
            target: self.target.clone(),
            limit: self.limit,
            strict: self.strict,
            outlier_perc: self.outlier_perc,
            out: self.out.clone(),
            force: self.force,
            shard: self.shard,
        })
    }
}

pub fn explain_cmd(a: ExplainArgs) -> Result<()> {
    let s = a.settings()?;
    crate::progress::run(|p| explain(&s, p)).map(|_| ())
}
