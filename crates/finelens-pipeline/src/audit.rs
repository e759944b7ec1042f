//! The audit job: every explanation check on one checkpoint and one image set, a policy's
//! pass/fail table, `report.json`, the page `index.html` and its figures as PNG files.

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::Tensor;
use finelens_attrib::{BaselineSpec, MethodOptions, MethodSpec};
use finelens_audit::policy::{all_pass, Figure, Policy, Verdict};
use finelens_audit::run::{
    AuditImage, AuditPartial, AuditProgress, AuditReport, AuditSettings, Rebuild,
};
use finelens_audit::sanity::randomisation_stages;
use finelens_data::transforms::load_rgb;
use finelens_data::Preprocess;
use finelens_drift::{
    accumulate_cka, weight_drift_described, MinibatchCka, RepresentationDrift, WeightDrift,
};
use finelens_models::{Classifier, ParamStore};
use finelens_report::html::{render, Block, Page};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::drift::{explanation_drift, ExplanationDrift};
use crate::error::{input, settings, Context, Result};
use crate::inputs::{self, LoadedModel, ModelSource, PreprocessRecord, PreprocessSettings};
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::page::{self, ModelCard, PageInput};
use crate::progress::{Event, Progress};
use crate::shard::Shard;

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
    /// `finelens evaluate`: every metric for every method, and no gate.
    pub evaluate: bool,
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
    /// Audit only this shard of the images: [`audit_shard`] writes `partial.json` and the
    /// gallery's pictures, and [`crate::merge::merge_audit`] makes the report from every shard.
    pub shard: Option<Shard>,
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

/// What some images (a shard) measured of the drift from the base: the CKA sums over their
/// minibatches and the explanation drift of those among the first
/// [`EXPLANATION_DRIFT_IMAGES`]. Weight drift does not depend on the images: shard 0 measures it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriftPartial {
    pub weights: Option<WeightDrift>,
    pub layers: Vec<String>,
    /// The layer whose CKA the policy gates on (the model's embedding).
    pub embedding_layer: String,
    pub cka: MinibatchCka,
    /// The explanation drift's images, by index in the whole set.
    pub explained: Vec<usize>,
    pub explanation: ExplanationDrift,
}

impl DriftPartial {
    /// Every shard's part as one run's drift: CKA over the union of their minibatches,
    /// explanation drift in the images' order.
    pub fn finish(parts: Vec<DriftPartial>) -> Result<AuditDrift> {
        let mut parts = parts.into_iter();
        let Some(mut all) = parts.next() else {
            return Err(settings("no drift to merge"));
        };
        let mut per_image: Vec<(usize, f64, f64)> = Vec::new();
        let mut take = |p: &DriftPartial| {
            for (k, &i) in p.explained.iter().enumerate() {
                per_image.push((i, p.explanation.spearman[k], p.explanation.top_iou[k]));
            }
        };
        take(&all);
        for p in parts {
            if p.layers != all.layers {
                return Err(settings("the shards compared different layers"));
            }
            all.cka.merge(&p.cka)?;
            take(&p);
            all.weights = all.weights.or(p.weights);
        }
        per_image.sort_by_key(|p| p.0);
        let Some(weights) = all.weights else {
            return Err(settings(
                "no shard measured weight drift (shard 0 does): is shard 0 among them?",
            ));
        };
        let mut explanation = all.explanation;
        explanation.spearman = per_image.iter().map(|p| p.1).collect();
        explanation.top_iou = per_image.iter().map(|p| p.2).collect();
        explanation.mean_spearman = mean(&explanation.spearman);
        explanation.mean_top_iou = mean(&explanation.top_iou);
        Ok(AuditDrift {
            weights,
            representation: RepresentationDrift::from_minibatches(&all.layers, false, &all.cka)?,
            explanation,
        })
    }
}

/// The mean, NaN for no value (not a figure that passes).
fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len() as f64
}

/// The audit, as written, and the page blocks describing it (the demo puts several audits on
/// one page).
#[derive(Debug)]
pub struct AuditOutcome {
    pub document: AuditDocument,
    pub blocks: Vec<Block>,
}

/// One picture of the gallery, as a shard wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GalleryFigure {
    pub caption: String,
    /// Relative to the shard's directory.
    pub file: PathBuf,
}

/// One card of the gallery, as a shard wrote it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GalleryCard {
    pub index: usize,
    pub title: String,
    pub caption: String,
    pub confidence: f64,
    pub error: bool,
    pub figures: Vec<GalleryFigure>,
}

/// `partial.json`: what one shard of an audit found, before any figure.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditShard {
    pub schema_version: String,
    pub shard: Shard,
    /// Images in the whole set (all shards).
    pub total_images: usize,
    pub checkpoint: CheckpointRecord,
    pub model_card: ModelCard,
    pub base: Option<PathBuf>,
    pub data: PathBuf,
    pub masks: Option<PathBuf>,
    pub preprocess: PreprocessRecord,
    pub policy: Policy,
    pub require_all: bool,
    pub partial: AuditPartial,
    pub drift: Option<DriftPartial>,
    pub gallery: Vec<GalleryCard>,
    pub seed: u64,
    pub finelens_version: String,
    pub command_line: Vec<String>,
    pub seconds: f64,
}

impl Versioned for AuditShard {
    const SCHEMA: &'static str = "finelens-audit-shard/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
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
) -> Result<(Vec<AuditImage>, usize)> {
    let found = inputs::discover(&job.data, job.strict, Some(job.limit), progress)?;
    let mut images = Vec::new();
    for (index, (path, label)) in found.images.iter().enumerate() {
        let rel = path.strip_prefix(&found.root).unwrap_or(path);
        if job.shard.is_some_and(|s| !s.contains(rel)) {
            continue;
        }
        let Some((_, x)) = inputs::read_image(path, pre, job.strict, progress)? else {
            continue;
        };
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
            index,
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
    if images.is_empty() && job.shard.is_none() {
        return Err(input(&job.data, "no image could be read"));
    }
    Ok((images, found.images.len()))
}

/// What the audit of a shard or of the whole set measured, before any figure.
struct Examined {
    policy: Policy,
    model: LoadedModel,
    pre: Preprocess,
    masks: Option<PathBuf>,
    images: Vec<AuditImage>,
    total_images: usize,
    partial: AuditPartial,
    drift: Option<DriftPartial>,
    started: Instant,
}

fn examine(job: &AuditJob, progress: Progress) -> Result<Examined> {
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
    let (images, total_images) = audit_images(job, &pre, classes, masks_root.as_deref(), progress)?;
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
        every_method: job.evaluate,
    };
    progress(Event::Info(format!(
        "auditing {} on {} image(s){}{} with {}",
        job.model.path.display(),
        images.len(),
        job.shard
            .map_or(String::new(), |s| format!(" (shard {s} of {total_images})")),
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
    let partial =
        finelens_audit::run::examine(model, &rebuild, &images, &settings, &mut |p| match p {
            AuditProgress::Phase { name, total, unit } => progress(Event::Stage {
                name: &name,
                total,
                unit,
            }),
            AuditProgress::Step { done, item } => progress(Event::Advance { done, item }),
        })?;
    progress(Event::StageEnd);

    let drift = match &job.base {
        Some(base) => {
            let weights = if job.shard.is_none_or(|s| s.index == 0) {
                Some(weight_drift_described(
                    &base.path,
                    &job.model.path,
                    // The report lists WeightWatcher's α per matrix, before and after.
                    crate::drift::Spectral::Esd.options(),
                    Some(description.clone()),
                )?)
            } else {
                None
            };
            let b = base.load()?;
            let ba = b.analysed()?;
            let xs: Vec<Tensor> = images.iter().map(|i| i.x.clone()).collect();
            let layers = description.representation_layers.clone();
            let cka = accumulate_cka(
                ba.model.as_ref(),
                model,
                xs.chunks(CKA_BATCH).map(|c| Ok(Tensor::cat(c, 0)?)),
                &layers,
                false,
            )?;
            let explained: Vec<usize> = (0..images.len())
                .filter(|&k| images[k].index < EXPLANATION_DRIFT_IMAGES)
                .collect();
            let probes: Vec<Tensor> = explained.iter().map(|&k| xs[k].clone()).collect();
            let explanation = explanation_drift(
                ba.model.as_ref(),
                model,
                b.info.classes == ck.info.classes,
                settings.methods[0].as_ref(),
                &probes,
                EXPLANATION_DRIFT_TOP_FRACTION,
            )
            .context("explanation drift from the base")?;
            Some(DriftPartial {
                weights,
                embedding_layer: description.embedding_layer.clone(),
                layers,
                cka,
                explained: explained.iter().map(|&k| images[k].index).collect(),
                explanation,
            })
        }
        None => None,
    };
    Ok(Examined {
        policy,
        model: ck,
        pre: pre.clone(),
        masks: masks_root,
        images,
        total_images,
        partial,
        drift,
        started,
    })
}

/// The report from what the whole set gave: figures, drift, verdicts.
pub(crate) struct Summary {
    pub report: AuditReport,
    pub drift: Option<AuditDrift>,
    pub verdicts: Vec<Verdict>,
    pub pass: bool,
}

pub(crate) fn summarise(
    partial: AuditPartial,
    drift: Option<Vec<DriftPartial>>,
    classes: &[String],
    policy: &Policy,
    require_all: bool,
) -> Result<Summary> {
    let mut report = finelens_audit::run::summarise(partial, classes)?;
    let embedding = drift
        .as_ref()
        .and_then(|d| d.first())
        .map(|d| d.embedding_layer.clone());
    let drift = drift.map(DriftPartial::finish).transpose()?;
    if let (Some(d), Some(e)) = (&drift, embedding) {
        let r = &d.representation;
        if let Some(k) = r.layers.iter().position(|l| *l == e) {
            report
                .figures
                .insert(Figure::DriftMinCkaPenultimate, r.diagonal[k]);
        }
    }
    let verdicts = policy.evaluate(&report.figures, require_all);
    let pass = all_pass(&verdicts);
    Ok(Summary {
        report,
        drift,
        verdicts,
        pass,
    })
}

/// Write an audit's directory: `report.json`, the page's figures and `index.html`.
pub(crate) fn write_report(
    out: &Path,
    force: bool,
    document: &AuditDocument,
    blocks: &[Block],
    progress: Progress,
) -> Result<()> {
    let page = Page {
        title: format!(
            "finelens audit: {}",
            document
                .checkpoint
                .path
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        ),
        blocks: blocks.to_vec(),
    };
    let files = page::figure_files(blocks);
    OutputDir::create(out, force)?.run(|dir| {
        write_json(&dir.join("report.json"), document)?;
        for (name, bytes) in &files {
            write_file(&dir.join(name), bytes)?;
        }
        write_file(&dir.join("index.html"), render(&page).as_bytes())
    })?;
    progress(Event::Info(page::verdict_table(&document.verdicts)));
    progress(Event::Info(format!(
        "{} — report in {} ({:.1} s)",
        if document.pass {
            "all checks pass"
        } else {
            "some checks FAIL"
        },
        out.display(),
        document.seconds
    )));
    Ok(())
}

/// `finelens evaluate`: the audit with every metric for every method ([`AuditJob::evaluate`]),
/// its report written as the audit's, then one row per method; no gate. A text model folder
/// gets the text audit with every gradient method measured.
pub fn evaluate(job: &AuditJob, progress: Progress) -> Result<()> {
    let job = AuditJob {
        evaluate: true,
        ..job.clone()
    };
    let rows: Vec<_> = if crate::text::is_model_folder(&job.model.path) {
        crate::text_audit::audit_text(&job, progress)?
            .methods
            .iter()
            .map(|m| m.row())
            .collect()
    } else {
        audit(&job, progress)?
            .document
            .audit
            .methods
            .iter()
            .map(|m| {
                let p = m.perturbation;
                (
                    m.method.clone(),
                    [
                        Some(m.sanity.fully_randomised_spearman()),
                        Some(m.faithfulness.gain_over_random),
                        m.road.as_ref().map(|r| r.gap),
                        p.map(|p| p.faithfulness_correlation),
                        p.map(|p| p.monotonicity),
                        p.map(|p| p.infidelity),
                        m.robustness.map(|r| r.max_sensitivity),
                        m.random_logit.map(|r| r.ssim),
                        m.complexity.as_ref().map(|c| c.mean_sparseness),
                        m.complexity.as_ref().map(|c| c.mean_relative_complexity),
                        m.localisation.as_ref().map(|l| l.relevance_mass_accuracy),
                        m.localisation.as_ref().map(|l| l.pointing_game_hit_rate),
                    ],
                )
            })
            .collect()
    };
    progress(Event::Info(method_table(&rows)));
    Ok(())
}

/// Quantus's figures, one row per method (— where not measured): the method and, in
/// [`method_table`]'s column order, its figures.
pub type MethodRow = (String, [Option<f64>; 12]);

/// Quantus's figures, one row per method (— where not measured).
pub fn method_table(methods: &[MethodRow]) -> String {
    let heads = [
        "method", "ρ rand", "gain", "ROAD", "corr", "monot", "infid", "max-sens", "logit",
        "sparse", "entropy", "mass", "point",
    ];
    let mut out = heads
        .iter()
        .enumerate()
        .map(|(i, h)| {
            if i == 0 {
                format!("{h:<28}")
            } else {
                format!("{h:>9}")
            }
        })
        .collect::<String>();
    for (method, cells) in methods {
        out.push_str(&format!("\n{method:<28}"));
        for c in cells {
            out.push_str(&match c {
                Some(v) if v.is_finite() => format!("{v:>9.3}"),
                _ => format!("{:>9}", "—"),
            });
        }
    }
    out.push_str(
        "\nρ rand: Spearman with every weight random (low is good); gain: deletion/insertion over \
         random; ROAD: LeRF − MoRF; corr, monot: faithfulness and monotonicity correlation; \
         infid: infidelity at the best scale (low is good); max-sens: max-sensitivity; logit: \
         random-logit SSIM (low is good); sparse, entropy: Gini and relative entropy; mass, \
         point: relevance mass accuracy and pointing game against the masks (texts: the \
         rationales; ROAD is images' only)",
    );
    out
}

/// Run the audit of the whole set and write its directory; the outcome says whether every check
/// passed. A job with a shard is [`audit_shard`]'s.
/// `finelens audit`: a text model folder's audit ([`crate::text_audit`]) or a checkpoint's;
/// whether every measured check passed.
pub fn run_audit(job: &AuditJob, progress: Progress) -> Result<bool> {
    if crate::text::is_model_folder(&job.model.path) {
        return Ok(crate::text_audit::audit_text(job, progress)?.pass);
    }
    Ok(audit(job, progress)?.document.pass)
}

pub fn audit(job: &AuditJob, progress: Progress) -> Result<AuditOutcome> {
    if let Some(s) = job.shard {
        return Err(settings(format!(
            "audit: shard {s} writes a partial result (audit_shard), not a report"
        )));
    }
    let e = examine(job, progress)?;
    let classes = &e.model.info.classes;
    let gallery = page::gallery_cards(&e.partial, classes, &e.images, &e.pre)?;
    let s = summarise(
        e.partial,
        e.drift.map(|d| vec![d]),
        classes,
        &e.policy,
        job.require_all,
    )?;
    let document = AuditDocument {
        schema_version: AuditDocument::SCHEMA.into(),
        checkpoint: CheckpointRecord {
            path: job.model.path.clone(),
            sha256: e.model.sha256.clone(),
            arch: e.model.info.arch.clone(),
            classes: classes.clone(),
        },
        base: job.base.as_ref().map(|b| b.path.clone()),
        data: job.data.clone(),
        masks: e.masks,
        preprocess: (&e.pre).into(),
        policy: e.policy,
        require_all: job.require_all,
        verdicts: s.verdicts,
        pass: s.pass,
        audit: s.report,
        drift: s.drift,
        seed: job.seed,
        finelens_version: env!("CARGO_PKG_VERSION").into(),
        command_line: job.command_line.clone(),
        seconds: e.started.elapsed().as_secs_f64(),
    };
    let blocks = page::audit_blocks(&PageInput {
        name: &job.model.path.display().to_string(),
        document: &document,
        card: &ModelCard::of(&e.model)?,
        gallery: gallery.into_iter().map(|(c, _)| c).collect(),
    })?;
    write_report(&job.out, job.force, &document, &blocks, progress)?;
    Ok(AuditOutcome { document, blocks })
}

/// Audit one shard of the images: `partial.json` (what each image gave, no figure) and the
/// gallery's pictures, for [`crate::merge::merge_audit`].
pub fn audit_shard(job: &AuditJob, progress: Progress) -> Result<AuditShard> {
    let Some(shard) = job.shard else {
        return Err(settings("audit_shard: the job names no shard"));
    };
    if crate::text::is_model_folder(&job.model.path) {
        return Err(settings(crate::text_explain::NOT_SHARDED));
    }
    let e = examine(job, progress)?;
    let classes = &e.model.info.classes;
    let cards = page::gallery_cards(&e.partial, classes, &e.images, &e.pre)?;
    let mut gallery = Vec::new();
    let mut files = Vec::new();
    for (card, index) in cards {
        let mut figures = Vec::new();
        for (k, f) in card.figures.iter().enumerate() {
            let file = page::gallery_file(&card.title, k, &f.caption);
            files.push((file.clone(), f.png.clone()));
            figures.push(GalleryFigure {
                caption: f.caption.clone(),
                file: file.into(),
            });
        }
        gallery.push(GalleryCard {
            index,
            title: card.title,
            caption: card.caption,
            confidence: card.confidence,
            error: card.error,
            figures,
        });
    }
    let document = AuditShard {
        schema_version: AuditShard::SCHEMA.into(),
        shard,
        total_images: e.total_images,
        checkpoint: CheckpointRecord {
            path: job.model.path.clone(),
            sha256: e.model.sha256.clone(),
            arch: e.model.info.arch.clone(),
            classes: classes.clone(),
        },
        model_card: ModelCard::of(&e.model)?,
        base: job.base.as_ref().map(|b| b.path.clone()),
        data: job.data.clone(),
        masks: e.masks,
        preprocess: (&e.pre).into(),
        policy: e.policy,
        require_all: job.require_all,
        partial: e.partial,
        drift: e.drift,
        gallery,
        seed: job.seed,
        finelens_version: env!("CARGO_PKG_VERSION").into(),
        command_line: job.command_line.clone(),
        seconds: e.started.elapsed().as_secs_f64(),
    };
    OutputDir::create(&job.out, job.force)?.run(|dir| {
        write_json(&dir.join("partial.json"), &document)?;
        for (name, bytes) in &files {
            write_file(&dir.join(name), bytes)?;
        }
        Ok(())
    })?;
    progress(Event::Info(format!(
        "shard {shard}: {} image(s) audited — partial result in {}; `finelens merge` the {} shards for the report",
        document.partial.images.len(),
        job.out.display(),
        shard.count
    )));
    Ok(document)
}
