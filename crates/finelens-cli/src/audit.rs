//! `finelens audit`: arguments → `finelens_pipeline::audit`; exit status 0 when every check
//! passes, 1 when one fails, 2 on a usage or input error.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use finelens_pipeline::audit::{audit_shard, run_audit, AuditJob};

use crate::CheckpointArgs;
use finelens_attrib::MethodOptions;
use finelens_pipeline::{output::OutputSettings, PreprocessSettings};

#[derive(Args)]
pub struct AuditArgs {
    /// The checkpoint to audit.
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    #[command(flatten)]
    pre: PreprocessSettings,
    /// Images to audit: an ImageFolder (labels give accuracy) or a folder of images.
    #[arg(long)]
    data: PathBuf,
    /// Object masks mirroring --data (<masks>/<class>/<image>.png, white = object); by default
    /// <task>/masks/<split> beside <task>/images/<split> when it exists.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Audit without masks even when they exist.
    #[arg(long)]
    no_masks: bool,
    /// The checkpoint this one was fine-tuned from: adds weight and representation drift.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Thresholds (TOML: [check] threshold = value); without it the documented defaults.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Fail a check the policy gates on that could not be measured (no masks, no --base)
    /// instead of reporting it as not measured.
    #[arg(long)]
    require_all: bool,
    /// Method specs (see `explain --methods`); the first is the one the policy gates on.
    #[arg(long, default_value = "integrated_gradients,saliency,grad_cam")]
    methods: String,
    #[command(flatten)]
    method_settings: MethodOptions,
    /// Images audited (taken across classes in turn).
    #[arg(long, default_value_t = 48)]
    limit: usize,
    /// What the faithfulness curves replace pixels with: blur[:SIGMA] (default σ = side/10),
    /// zeros, black, noise, image:PATH.
    #[arg(long, default_value = "blur")]
    replacement: String,
    /// Images used by the randomisation sanity check (at least 1).
    #[arg(long, default_value_t = 4)]
    sanity_images: usize,
    /// Fail on an image that cannot be decoded instead of skipping it.
    #[arg(long)]
    strict: bool,
    #[command(flatten)]
    output: OutputSettings,
    /// Audit only shard I of N (0 ≤ I < N, by a stable hash of each image's path): writes
    /// partial.json and the gallery's pictures, no verdict; `finelens merge` makes the report.
    #[arg(long, value_name = "I/N")]
    shard: Option<finelens_pipeline::shard::Shard>,
}

impl AuditArgs {
    pub fn job(&self) -> Result<AuditJob> {
        let base = self
            .base
            .as_ref()
            .map(|b| self.ckpt.source(b))
            .transpose()?;
        Ok(AuditJob {
            model: self.ckpt.source(&self.checkpoint)?,
            preprocess: self.pre.clone(),
            data: self.data.clone(),
            masks: self.masks.clone(),
            no_masks: self.no_masks,
            base,
            policy: self.policy.clone(),
            require_all: self.require_all,
            evaluate: false,
            methods: finelens_attrib::MethodSpec::parse_list(&self.methods)?,
            shared: self.method_settings.clone(),
            limit: self.limit,
            replacement: self
                .replacement
                .parse()
                .map_err(|e| anyhow::anyhow!("--replacement {}: {e}", self.replacement))?,
            sanity_images: self.sanity_images,
            seed: self.method_settings.seed.unwrap_or(0),
            strict: self.strict,
            out: self.output.dir("audit"),
            force: self.output.force,
            command_line: std::env::args().collect(),
            shard: self.shard,
        })
    }
}

/// True when every check passes (a shard has no verdict: true once written).
pub fn audit_cmd(a: AuditArgs) -> Result<bool> {
    let job = a.job()?;
    if job.shard.is_some() {
        return crate::progress::run(|p| audit_shard(&job, p)).map(|_| true);
    }
    crate::progress::run(|p| run_audit(&job, p))
}
