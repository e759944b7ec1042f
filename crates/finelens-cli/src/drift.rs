//! `finelens drift`: arguments → `finelens_pipeline::drift`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_attrib::MethodSpec;
use finelens_pipeline::drift::{run_drift, DriftSettings};

use crate::CheckpointArgs;
use finelens_attrib::MethodOptions;
use finelens_pipeline::{output::OutputSettings, PreprocessSettings};

#[derive(Args)]
pub struct DriftArgs {
    /// The parent (pretrained) checkpoint.
    before: PathBuf,
    /// The fine-tuned checkpoint.
    after: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    /// Probe images for representation and explanation drift: an image folder or ImageFolder,
    /// or `synth` (the synthetic pretraining task's test images, drawn in memory); `none` skips both.
    #[arg(long, default_value = "synth")]
    probe: String,
    /// At most this many probe images (taken across classes in turn).
    #[arg(long, default_value_t = 300)]
    limit: usize,
    /// Probe images per forward pass (minibatch CKA needs at least 4).
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Layers compared by CKA, comma-separated (default: the model's representation layers,
    /// as the model describes them).
    #[arg(long, value_delimiter = ',')]
    layers: Vec<String>,
    /// CKA on channel-pooled activations (each channel averaged over space).
    #[arg(long)]
    pooled: bool,
    /// The method spec for explanation drift (see `explain --methods`), e.g.
    /// `integrated_gradients:steps=32`.
    #[arg(long, default_value = "integrated_gradients")]
    explain_method: String,
    #[command(flatten)]
    method_settings: MethodOptions,
    /// Probe images whose explanations are compared (0 skips explanation drift).
    #[arg(long, default_value_t = 16)]
    explain_images: usize,
    /// Share of the most strongly attributed pixels whose overlap (IoU) is reported.
    #[arg(long, default_value_t = 0.1)]
    top_fraction: f64,
    /// Spectral figures: none, norms (σ₁, stable rank) or esd (also WeightWatcher's α, α̂, traps).
    #[arg(long, value_enum, default_value = "norms")]
    spectral: finelens_pipeline::drift::Spectral,
    /// Fail on a probe image that cannot be decoded instead of skipping it.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    output: OutputSettings,
}

impl DriftArgs {
    pub fn settings(&self) -> Result<DriftSettings> {
        Ok(DriftSettings {
            before: self.ckpt.source(&self.before)?,
            after: self.ckpt.source(&self.after)?,
            preprocess: self.pre.clone(),
            probe: self.probe.parse()?,
            limit: self.limit,
            batch_size: self.batch_size,
            layers: self.layers.clone(),
            pooled: self.pooled,
            explain_method: self.explain_method.parse::<MethodSpec>()?,
            shared: self.method_settings.clone(),
            explain_images: self.explain_images,
            top_fraction: self.top_fraction,
            spectral: self.spectral,
            strict: self.strict,
            out: self.output.dir("drift"),
            force: self.output.force,
        })
    }
}

pub fn drift_cmd(a: DriftArgs) -> Result<()> {
    let s = a.settings()?;
    crate::progress::run(|p| run_drift(&s, p))
}
