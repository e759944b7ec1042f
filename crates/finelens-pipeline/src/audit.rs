//! The audit job: every explanation check on one checkpoint and one image set, a policy's
//! pass/fail table, `report.json`, the page `index.html` and its figures as PNG files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use finelens_attrib::{BaselineSpec, MethodOptions, MethodSpec};
use finelens_audit::policy::{all_pass, Figure, Policy, Verdict};
use finelens_audit::run::{
    audit as run_checks, AuditImage, AuditProgress, AuditReport, AuditSettings, Rebuild,
};
use finelens_audit::sanity::randomisation_stages;
use finelens_data::transforms::load_rgb;
use finelens_data::Preprocess;
use finelens_drift::{
    representation_drift, weight_drift_described, RepresentationDrift, WeightDrift,
    WeightDriftOptions,
};
use finelens_models::{Classifier, ParamStore};
use finelens_report::html::{render, Block, Page};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::drift::{explanation_drift, ExplanationDrift};
use crate::error::{input, settings, Context, Result};
use crate::inputs::{self, ModelSource, PreprocessRecord, PreprocessSettings};
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::page::{self, PageInput};
use crate::progress::{Event, Progress};

/// Images whose explanations are compared with the base's.
pub const EXPLANATION_DRIFT_IMAGES: usize = 8;
/// The share of pixels whose overlap explanation drift reports.
pub const EXPLANATION_DRIFT_TOP_FRACTION: f64 = 0.1;
/// Steps of the deletion and insertion curves: 16 resolves the AUCs to about 3%.
pub const FAITHFULNESS_STEPS: usize = 16;
/// Probe images per forward pass for the audit's CKA.
const CKA_BATCH: usize = 16;

/// What `finelens audit` does.
#[derive(Debug, Clone)]
pub struct AuditJob {
    pub model: ModelSource,
    pub preprocess: PreprocessSettings,
    /// An ImageFolder (labels give accuracy) or a folder of images.
    pub data: PathBuf,
    /// Object masks mirroring `data`; `None` looks for `<task>/masks/<split>` beside
    /// `<task>/images/<split>`.
    pub masks: Option<PathBuf>,
    pub no_masks: bool,
    /// The checkpoint this one was fine-tuned from: adds weight, representation and explanation
    /// drift.
    pub base: Option<ModelSource>,
    /// A TOML policy file; `None` is the documented defaults.
    pub policy: Option<PathBuf>,
    /// Fail a check the policy gates on that could not be measured (no masks, no base).
    pub require_all: bool,
    /// The first is the method the policy gates on.
    pub methods: Vec<MethodSpec>,
    pub shared: MethodOptions,
    pub limit: usize,
    /// What the faithfulness curves replace pixels with.
    pub replacement: BaselineSpec,
    pub sanity_images: usize,
    pub seed: u64,
    pub strict: bool,
    pub out: PathBuf,
    pub force: bool,
    /// Recorded in the report's provenance (the CLI passes its own command line).
    pub command_line: Vec<String>,
}

impl AuditJob {
    pub fn check(&self) -> Result<()> {
        if self.methods.is_empty() {
            return Err(settings("audit: no method given"));
        }
        if self.sanity_images == 0 {
            return Err(settings(
                "audit: the randomisation check needs at least 1 image (sanity images is 0)",
            ));
        }
        if self.limit == 0 {
            return Err(settings("audit: an image limit of 0 audits nothing"));
        }
        OutputDir::check(&self.out, self.force)
    }
}

/// `report.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditDocument {
    pub schema_version: String,
    pub checkpoint: CheckpointRecord,
    pub base: Option<PathBuf>,
    pub data: PathBuf,
    pub masks: Option<PathBuf>,
    pub preprocess: PreprocessRecord,
    pub policy: Policy,
    pub require_all: bool,
    pub verdicts: Vec<Verdict>,
    pub pass: bool,
    pub audit: AuditReport,
    pub drift: Option<AuditDrift>,
    pub seed: u64,
    pub finelens_version: String,
    pub command_line: Vec<String>,
    pub seconds: f64,
}

impl Versioned for AuditDocument {
    const SCHEMA: &'static str = "finelens-audit/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointRecord {
    pub path: PathBuf,
    pub sha256: String,
    pub arch: String,
    pub classes: Vec<String>,
}

/// Drift from the base checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditDrift {
    pub weights: WeightDrift,
    pub representation: RepresentationDrift,
    pub explanation: ExplanationDrift,
}

/// The audit, as written, and the page blocks describing it (the demo puts several audits on
/// one page).
pub struct AuditOutcome {
    pub document: AuditDocument,
    pub blocks: Vec<Block>,
}

/// `<task>/images/<split>` → `<task>/masks/<split>`, when that exists.
fn default_masks(data: &Path) -> Option<PathBuf> {
    let split = data.file_name()?;
    let images = data.parent()?;
    (images.file_name()? == "images")
        .then(|| images.parent().map(|t| t.join("masks").join(split)))
        .flatten()
        .filter(|m| m.is_dir())
}

/// A mask image through the model's evaluation geometry, thresholded at half.
fn load_mask(path: &Path, pre: &Preprocess) -> Result<Array2<bool>> {
    let rgb = load_rgb(path)?;
    let m = pre.eval_image(&rgb);
    let s = pre.size;
    Ok(Array2::from_shape_fn((s, s), |(y, x)| {
        m.get_pixel(x as u32, y as u32).0[0] > 127
    }))
}

fn read_policy(path: Option<&Path>) -> Result<Policy> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| input(p, format!("cannot read the policy: {e}")))?;
            Ok(Policy::parse(p, &text)?)
        }
        None => Ok(Policy::default()),
    }
}

/// The images to audit, with their masks.
fn audit_images(
    job: &AuditJob,
    pre: &Preprocess,
    classes: &[String],
    masks_root: Option<&Path>,
    progress: Progress,
) -> Result<Vec<AuditImage>> {
    let found = inputs::discover(&job.data, job.strict, Some(job.limit), progress)?;
    let mut images = Vec::new();
    for (path, label) in &found.images {
        let Some((_, x)) = inputs::read_image(path, pre, job.strict, progress)? else {
            continue;
        };
        let rel = path.strip_prefix(&found.root).unwrap_or(path);
        let mask = match masks_root {
            Some(root) => {
                let mp = root.join(rel);
                if !mp.is_file() {
                    return Err(input(
                        &mp,
                        format!(
                            "no mask for {} (the mask folder must mirror the images)",
                            path.display()
                        ),
                    ));
                }
                Some(load_mask(&mp, pre)?)
            }
            None => None,
        };
        images.push(AuditImage {
            id: rel
                .with_extension("")
                .to_string_lossy()
                .replace(['/', '\\'], "__"),
            path: path.clone(),
            label: label
                .as_ref()
                .and_then(|l| classes.iter().position(|c| c == l)),
            x,
            mask,
        });
    }
    if images.is_empty() {
        return Err(input(&job.data, "no image could be read"));
    }
    Ok(images)
}

/// Run the audit and write its directory; the outcome says whether every check passed.
pub fn audit(job: &AuditJob, progress: Progress) -> Result<AuditOutcome> {
    job.check()?;
    let policy = read_policy(job.policy.as_deref())?;
    let started = Instant::now();
    let ck = job.model.load()?;
    let pre = job.preprocess.resolve(&ck.info)?;
    let methods = inputs::build_methods(&job.methods, &job.shared, &pre)?;
    let analysed = ck.analysed()?;
    let model = analysed.model.as_ref();
    for m in &methods {
        m.check(model)?;
    }
    let masks_root = if job.no_masks {
        None
    } else {
        job.masks.clone().or_else(|| default_masks(&job.data))
    };
    if let Some(m) = &masks_root {
        if !m.is_dir() {
            return Err(input(m, "the mask folder does not exist"));
        }
    }
    let classes = &ck.info.classes;
    let images = audit_images(job, &pre, classes, masks_root.as_deref(), progress)?;
    let build = |s: &ParamStore| -> finelens_audit::Result<Box<dyn Classifier>> {
        ck.build(s)
            .map_err(|e| finelens_audit::AuditError::Settings(e.to_string()))
    };
    let description = model.describe();
    let rebuild = Rebuild {
        store: &ck.store,
        specs: ck.param_specs().to_vec(),
        build: &build,
        stages: randomisation_stages(&description),
    };
    let load = inputs::image_loader(&pre);
    let ctx = inputs::build_context(&pre, &load);
    let settings = AuditSettings {
        methods,
        sanity_images: job.sanity_images,
        faithfulness_steps: FAITHFULNESS_STEPS,
        replacement: ctx.baseline(&job.replacement, job.seed)?,
        normalisation: inputs::normalisation(&pre),
        pointing_tolerance: 0,
        seed: job.seed,
    };
    progress(Event::Info(format!(
        "auditing {} on {} image(s){} with {}",
        job.model.path.display(),
        images.len(),
        if masks_root.is_some() {
            " with masks"
        } else {
            ""
        },
        settings
            .methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    )));
    let mut report = run_checks(
        model,
        &rebuild,
        &images,
        classes,
        &settings,
        &mut |p| match p {
            AuditProgress::Phase { name, total, unit } => progress(Event::Stage {
                name: &name,
                total,
                unit,
            }),
            AuditProgress::Step { done, item } => progress(Event::Advance { done, item }),
        },
    )?;
    progress(Event::StageEnd);

    let drift = match &job.base {
        Some(base) => {
            let weights = weight_drift_described(
                &base.path,
                &job.model.path,
                WeightDriftOptions::default(),
                Some(description.clone()),
            )?;
            let b = base.load()?;
            let ba = b.analysed()?;
            let xs: Vec<Tensor> = images.iter().map(|i| i.x.clone()).collect();
            let layers = description.representation_layers.clone();
            let representation = representation_drift(
                ba.model.as_ref(),
                model,
                xs.chunks(CKA_BATCH).map(|c| Ok(Tensor::cat(c, 0)?)),
                &layers,
                false,
            )?;
            if let Some(k) = layers
                .iter()
                .position(|l| *l == description.embedding_layer)
            {
                report
                    .figures
                    .insert(Figure::DriftMinCkaPenultimate, representation.diagonal[k]);
            }
            let n = EXPLANATION_DRIFT_IMAGES.min(xs.len());
            let explanation = explanation_drift(
                ba.model.as_ref(),
                model,
                b.info.classes == ck.info.classes,
                settings.methods[0].as_ref(),
                &xs[..n],
                EXPLANATION_DRIFT_TOP_FRACTION,
            )
            .context("explanation drift from the base")?;
            Some(AuditDrift {
                weights,
                representation,
                explanation,
            })
        }
        None => None,
    };
    let verdicts = policy.evaluate(&report.figures, job.require_all);
    let pass = all_pass(&verdicts);
    progress(Event::Info(page::verdict_table(&verdicts)));
    let document = AuditDocument {
        schema_version: AuditDocument::SCHEMA.into(),
        checkpoint: CheckpointRecord {
            path: job.model.path.clone(),
            sha256: ck.sha256.clone(),
            arch: ck.info.arch.clone(),
            classes: classes.clone(),
        },
        base: job.base.as_ref().map(|b| b.path.clone()),
        data: job.data.clone(),
        masks: masks_root,
        preprocess: (&pre).into(),
        policy,
        require_all: job.require_all,
        verdicts,
        pass,
        audit: report,
        drift,
        seed: job.seed,
        finelens_version: env!("CARGO_PKG_VERSION").into(),
        command_line: job.command_line.clone(),
        seconds: started.elapsed().as_secs_f64(),
    };
    let blocks = page::audit_blocks(&PageInput {
        name: &job.model.path.display().to_string(),
        document: &document,
        model: &ck,
        images: &images,
        pre: &pre,
    })?;
    let page = Page {
        title: format!(
            "finelens audit: {}",
            job.model
                .path
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        ),
        blocks: blocks.clone(),
    };
    let files = page::figure_files(&blocks);
    OutputDir::create(&job.out, job.force)?.run(|dir| {
        write_json(&dir.join("report.json"), &document)?;
        for (name, bytes) in &files {
            write_file(&dir.join(name), bytes)?;
        }
        write_file(&dir.join("index.html"), render(&page).as_bytes())
    })?;
    progress(Event::Info(format!(
        "{} — report in {} ({:.1} s)",
        if pass {
            "all checks pass"
        } else {
            "some checks FAIL"
        },
        job.out.display(),
        started.elapsed().as_secs_f64()
    )));
    Ok(AuditOutcome { document, blocks })
}
