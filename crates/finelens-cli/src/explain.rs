//! `finelens explain`: arguments → `finelens_pipeline::explain`.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_attrib::{MethodOptions, MethodSpec};
use finelens_pipeline::explain::{explain, ExplainSettings};
use finelens_pipeline::text_explain;
use finelens_report::heatmap;

use crate::CheckpointArgs;
use finelens_pipeline::{output::OutputSettings, PreprocessSettings};

#[derive(Args)]
pub struct ExplainArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    /// An image, a folder of images, or an ImageFolder (<dir>/<class>/<image>).
    input: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    /// Specs or `all`: gradient, saliency, gradient_x_input, smoothgrad(_sq), vargrad, ig,
    /// grad_cam, gradient_shap, occlusion; deeplift(_shap), guided_backprop, deconvolution,
    /// guided_grad_cam (ReLU nets); attention(_rollout), grad_attention (text). E.g. `ig:steps=32`.
    #[arg(long, default_value = "saliency,integrated_gradients,grad_cam")]
    methods: String,
    #[command(flatten)]
    method_settings: MethodOptions,
    #[command(flatten)]
    output: OutputSettings,
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

impl ExplainArgs {
    pub fn settings(&self) -> Result<ExplainSettings> {
        Ok(ExplainSettings {
            model: self.ckpt.source(&self.checkpoint)?,
            preprocess: self.pre.clone(),
            input: self.input.clone(),
            methods: MethodSpec::parse_list(&self.methods)?,
            shared: self.method_settings.clone(),
            target: self.target.clone(),
            limit: self.limit,
            strict: self.strict,
            outlier_perc: self.outlier_perc,
            out: self.output.dir("explain"),
            force: self.output.force,
            shard: self.shard,
        })
    }
}

pub fn explain_cmd(a: ExplainArgs) -> Result<()> {
    let s = a.settings()?;
    if finelens_pipeline::text::is_model_folder(&a.checkpoint) {
        return crate::progress::run(|p| text_explain::explain_text(&s, p)).map(drop);
    }
    crate::progress::run(|p| explain(&s, p)).map(|_| ())
}
