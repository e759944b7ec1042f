//! The drift job: where a fine-tuned checkpoint moved from its parent — weights per tensor,
//! module, block and stage; representations (minibatch CKA) and explanations on a probe set —
//! written as `drift.json`, `layers.png` and `cka.png`.

use std::path::PathBuf;
use std::time::Instant;

use candle_core::Tensor;
use finelens_attrib::{Attributor, EmbeddingNorm, MethodOptions, MethodSpec, Target};
use finelens_data::synth::{render, Split, SynthConfig, Task};
use finelens_drift::{
    representation_drift, spearman, top_k_iou, weight_drift_described, RepresentationDrift,
    WeightDrift, WeightDriftOptions,
};
use finelens_models::{checkpoint, Classifier};
use serde::{Deserialize, Serialize};

use crate::error::{input, settings, Result};
use crate::inputs::{self, check_fraction, ModelSource, PreprocessSettings};
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::progress::{Event, Progress};

/// Where the probe images come from.
#[derive(Debug, Clone, PartialEq)]
pub enum Probe {
    /// The synthetic pretraining task's test images, drawn in memory.
    Synth,
    /// An image folder or ImageFolder.
    Folder(PathBuf),
    /// No probe: weight drift only.
    None,
}

impl std::str::FromStr for Probe {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> std::result::Result<Self, Self::Err> {
        Ok(match s {
            "synth" => Probe::Synth,
            "none" => Probe::None,
            p => Probe::Folder(PathBuf::from(p)),
        })
    }
}

/// What `finelens drift` does.
#[derive(Debug, Clone)]
pub struct DriftSettings {
    pub before: ModelSource,
    pub after: ModelSource,
    pub preprocess: PreprocessSettings,
    pub probe: Probe,
    /// At most this many probe images.
    pub limit: usize,
    /// Probe images per forward pass.
    pub batch_size: usize,
    /// Layers compared by CKA; empty: the model's own representation layers.
    pub layers: Vec<String>,
    pub pooled: bool,
    /// The method explanation drift compares; its settings come from its spec and `shared`.
    pub explain_method: MethodSpec,
    pub shared: MethodOptions,
    /// Probe images whose explanations are compared (0 skips explanation drift).
    pub explain_images: usize,
    pub top_fraction: f64,
    pub spectral: Spectral,
    pub strict: bool,
    pub out: PathBuf,
    pub force: bool,
}

/// The unbiased HSIC estimator needs at least 4 examples per minibatch.
pub const MIN_CKA_BATCH: usize = 4;

impl DriftSettings {
    pub fn check(&self) -> Result<()> {
        if self.batch_size < MIN_CKA_BATCH {
            return Err(settings(format!(
                "the probe batch size must be at least {MIN_CKA_BATCH} (the unbiased CKA estimator's minimum), got {}",
                self.batch_size
            )));
        }
        check_fraction("the top fraction", self.top_fraction)?;
        if let Probe::Folder(p) = &self.probe {
            // Refuse an unusable probe set before any output is written.
            finelens_data::Inputs::discover(p, inputs::on_bad(self.strict), Some(self.limit))?;
        }
        OutputDir::check(&self.out, self.force)
    }
}

/// A file and its SHA-256.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FileRef {
    pub path: PathBuf,
    pub sha256: String,
}

/// `drift.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DriftReport {
    pub schema_version: String,
    pub before: FileRef,
    pub after: FileRef,
    pub weights: WeightDrift,
    pub representation: Option<RepresentationDrift>,
    pub explanation: Option<ExplanationDrift>,
}

impl Versioned for DriftReport {
    const SCHEMA: &'static str = "finelens-drift/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// What both models' explanations are of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DriftTarget {
    /// The fine-tuned model's predicted class, in both (their classes are the same).
    ClassLogit,
    /// The norm of the embedding both models have (their heads differ).
    EmbeddingNorm,
}

/// How far two models' explanations of the same images agree.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplanationDrift {
    pub method: String,
    pub target: DriftTarget,
    pub top_fraction: f64,
    /// Per image: Spearman ρ of |attribution| (summed over channels).
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub spearman: Vec<f64>,
    /// Per image: IoU of the top `top_fraction` pixels.
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub top_iou: Vec<f64>,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub mean_spearman: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub mean_top_iou: f64,
}

/// |map| summed over channels, flattened: what "where does it look" compares.
pub fn magnitude(map: &ndarray::Array3<f32>) -> Vec<f32> {
    map.map(|v| v.abs())
        .sum_axis(ndarray::Axis(0))
        .iter()
        .copied()
        .collect()
}

/// Compare `method`'s maps of `before` and `after` on `images` (1×C×H×W each): the class logit
/// when both have the same classes, else the norm of the embedding both share.
pub fn explanation_drift(
    before: &dyn Classifier,
    after: &dyn Classifier,
    same_classes: bool,
    method: &dyn Attributor,
    images: &[Tensor],
    top_fraction: f64,
) -> Result<ExplanationDrift> {
    let layer = after.describe().embedding_layer;
    let (e0, e1) = (
        EmbeddingNorm {
            model: before,
            layer: layer.clone(),
        },
        EmbeddingNorm {
            model: after,
            layer,
        },
    );
    let (c0, c1): (&dyn Classifier, &dyn Classifier) = if same_classes {
        (before, after)
    } else {
        (&e0, &e1)
    };
    method.check(c0)?;
    method.check(c1)?;
    let (mut rho, mut iou) = (Vec::new(), Vec::new());
    for x in images {
        let target = if same_classes {
            finelens_attrib::predict(after, x, &Target::Predicted)?[0].target
        } else {
            0
        };
        let a0 = method.attribute(c0, x, &[target])?.remove(0);
        let a1 = method.attribute(c1, x, &[target])?.remove(0);
        let (v0, v1) = (magnitude(&a0.map), magnitude(&a1.map));
        rho.push(spearman(&v0, &v1));
        iou.push(top_k_iou(&v0, &v1, top_fraction));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(ExplanationDrift {
        method: method.name().into(),
        target: if same_classes {
            DriftTarget::ClassLogit
        } else {
            DriftTarget::EmbeddingNorm
        },
        top_fraction,
        mean_spearman: mean(&rho),
        mean_top_iou: mean(&iou),
        spearman: rho,
        top_iou: iou,
    })
}

/// The probe set as model inputs (1×C×H×W each), decoded one by one.
fn probe_images(
    s: &DriftSettings,
    pre: &finelens_data::Preprocess,
    progress: Progress,
) -> Result<Vec<Tensor>> {
    match &s.probe {
        Probe::None => Ok(Vec::new()),
        Probe::Synth => {
            let cfg = SynthConfig {
                size: pre.size,
                ..SynthConfig::default()
            };
            let classes = Task::Pretrain.shapes().len();
            (0..s.limit)
                .map(|i| {
                    let img =
                        render(Task::Pretrain, Split::Test, i % classes, i / classes, &cfg).image;
                    Ok(inputs::model_input(pre, &img)?.1)
                })
                .collect()
        }
        Probe::Folder(p) => {
            let found = inputs::discover(p, s.strict, Some(s.limit), progress)?;
            let mut out = Vec::new();
            for (path, _) in &found.images {
                if let Some((_, x)) = inputs::read_image(path, pre, s.strict, progress)? {
                    out.push(x);
                }
            }
            Ok(out)
        }
    }
}

/// How many layers the summary names.
const SUMMARY_TOP: usize = 5;

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}

/// PNG bytes of a figure that may not apply (no layers, no representation drift).
type MaybePng = Option<Vec<u8>>;

/// WeightWatcher's α per weight matrix before and after, with the reading of the after value
/// (a report's table); `None` when no spectrum was fitted (`--spectral esd` not asked).
pub fn alpha_table(weights: &WeightDrift) -> Option<finelens_report::html::Block> {
    use finelens_report::html::{Block, Cell};
    let rows: Vec<Vec<Cell>> = weights
        .tensors
        .iter()
        .filter_map(|t| {
            let (a0, a1) = (
                t.spectrum_before.as_ref()?.alpha?,
                t.spectrum_after.as_ref()?.alpha?,
            );
            Some(vec![
                Cell::Text(t.name.clone()),
                Cell::Number(a0, 2),
                Cell::Number(a1, 2),
                Cell::Number(a1 - a0, 2),
                Cell::Text(finelens_drift::spectrum::reading(a1).into()),
            ])
        })
        .collect();
    (!rows.is_empty()).then(|| {
        Block::Table(
            [
                "weight matrix",
                "α, base",
                "α, this model",
                "Δα",
                "WeightWatcher's reading (α < 2 over-fit, 2–6 well trained, > 6 under-trained)",
            ]
            .map(String::from)
            .to_vec(),
            rows,
        )
    })
}

/// The per-layer bar chart and the CKA matrix of a drift result, as PNGs.
pub fn drift_figures(
    weights: &WeightDrift,
    rep: Option<&RepresentationDrift>,
) -> Result<(MaybePng, MaybePng)> {
    let labels: Vec<String> = weights.layers.iter().map(|g| g.name.clone()).collect();
    let values: Vec<f64> = weights
        .layers
        .iter()
        .map(|g| g.relative_l2_change)
        .collect();
    let bars = if labels.is_empty() {
        None
    } else {
        Some(finelens_report::drift_plot::layer_bars(
            "relative L2 change per layer, ‖W₁ − W₀‖ / ‖W₀‖",
            &labels,
            &values,
        )?)
    };
    let cka = match rep {
        Some(r) => Some(finelens_report::drift_plot::matrix_heatmap(
            "linear CKA: parent layers (rows) × fine-tuned layers (columns)",
            &r.layers,
            &r.layers,
            &r.matrix,
        )?),
        None => None,
    };
    Ok((bars, cka))
}

/// Weight drift for a terminal: what was compared, the layers that moved most, each stage.
pub(crate) fn weight_summary(weights: &WeightDrift) -> String {
    let mut lines = vec![format!(
        "weight drift: {} tensors compared ({:.1} MB read), {} batch-norm statistics; added {}, removed {}, reshaped {}",
        weights.tensors.len(),
        weights.bytes_read as f64 / 1e6,
        weights.batch_norm_statistics.len(),
        list(&weights.added),
        list(&weights.removed),
        list(&weights.reshaped.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
    )];
    let mut moved: Vec<&finelens_drift::GroupDrift> = weights.layers.iter().collect();
    moved.sort_by(|x, y| y.relative_l2_change.total_cmp(&x.relative_l2_change));
    lines.push("layers that moved most (‖ΔW‖/‖W₀‖, cosine):".to_owned());
    for g in moved.iter().take(SUMMARY_TOP) {
        lines.push(format!(
            "  {:<28} {:>9.4}  {:>7.4}",
            g.name, g.relative_l2_change, g.cosine_similarity
        ));
    }
    let fitted: Vec<_> = weights
        .tensors
        .iter()
        .filter_map(|t| {
            Some((
                t,
                t.spectrum_before.as_ref()?.alpha?,
                t.spectrum_after.as_ref()?.alpha?,
            ))
        })
        .collect();
    if !fitted.is_empty() {
        lines.push(
            "WeightWatcher α per matrix, before → after (α < 2 over-fit, 2–6 well trained, > 6 under-trained):"
                .to_owned(),
        );
        for (t, a0, a1) in &fitted {
            lines.push(format!(
                "  {:<28} {a0:>6.2} → {a1:>6.2}  {}",
                t.name,
                finelens_drift::spectrum::reading(*a1)
            ));
        }
    }
    lines.push(format!(
        "per stage:{}",
        weights
            .stages
            .iter()
            .map(|g| format!("  {} {:.4}", g.name, g.relative_l2_change))
            .collect::<String>()
    ));
    lines.join("\n")
}

/// How much of each weight matrix's spectrum drift analyses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum Spectral {
    /// No spectral figure.
    None,
    /// σ₁ and the stable rank (power iteration).
    #[default]
    Norms,
    /// Also WeightWatcher's: the ESD's power-law α, α̂, log spectral norm, MP soft rank, traps.
    Esd,
}

impl Spectral {
    pub fn options(self) -> WeightDriftOptions {
        WeightDriftOptions {
            spectral: self != Spectral::None,
            esd: self == Spectral::Esd,
            ..Default::default()
        }
    }
}

/// `finelens drift`: a text model folder's drift ([`crate::text_drift`]) or a checkpoint's.
pub fn run_drift(s: &DriftSettings, progress: Progress) -> Result<()> {
    if crate::text::is_model_folder(&s.after.path) {
        crate::text_drift::drift_text(s, progress).map(drop)
    } else {
        drift(s, progress).map(drop)
    }
}

pub fn drift(s: &DriftSettings, progress: Progress) -> Result<DriftReport> {
    s.check()?;
    let started = Instant::now();
    let weights = weight_drift_described(
        &s.before.path,
        &s.after.path,
        s.spectral.options(),
        s.after.description()?,
    )?;
    progress(Event::Info(weight_summary(&weights)));

    let mut report = DriftReport {
        schema_version: DriftReport::SCHEMA.into(),
        before: FileRef {
            path: s.before.path.clone(),
            sha256: checkpoint::sha256_file(&s.before.path)?,
        },
        after: FileRef {
            path: s.after.path.clone(),
            sha256: checkpoint::sha256_file(&s.after.path)?,
        },
        weights,
        representation: None,
        explanation: None,
    };

    if s.probe != Probe::None {
        let ck0 = s.before.load()?;
        let ck1 = s.after.load()?;
        let pre = s.preprocess.resolve(&ck1.info)?;
        if s.preprocess.resolve(&ck0.info)? != pre {
            progress(Event::Warning(
                "warning: the checkpoints record different preprocessing; the fine-tuned model's is used for both".into(),
            ));
        }
        let a0 = ck0.analysed()?;
        let a1 = ck1.analysed()?;
        let (m0, m1) = (a0.model.as_ref(), a1.model.as_ref());
        let images = probe_images(s, &pre, progress)?;
        if images.len() < MIN_CKA_BATCH {
            return Err(input(
                match &s.probe {
                    Probe::Folder(p) => p.clone(),
                    _ => PathBuf::from("synth"),
                },
                format!(
                    "the probe set has {} readable image(s); CKA needs at least {MIN_CKA_BATCH}",
                    images.len()
                ),
            ));
        }
        let layers = if s.layers.is_empty() {
            m1.describe().representation_layers
        } else {
            s.layers.clone()
        };
        let t = Instant::now();
        let batches = images.chunks(s.batch_size).map(|c| Ok(Tensor::cat(c, 0)?));
        let rep = representation_drift(m0, m1, batches, &layers, s.pooled)?;
        let mut by_cka: Vec<(usize, f64)> = rep.diagonal.iter().copied().enumerate().collect();
        by_cka.sort_by(|x, y| x.1.total_cmp(&y.1));
        let mut lines = vec![
            format!(
                "representation drift: linear CKA (minibatch, unbiased HSIC) on {} probe images in {:.1} s",
                rep.examples,
                t.elapsed().as_secs_f64()
            ),
            "layers whose representations changed most (CKA with the parent's same layer):"
                .to_owned(),
        ];
        for (i, c) in by_cka.iter().take(SUMMARY_TOP) {
            lines.push(format!("  {:<28} {:>7.4}", rep.layers[*i], c));
        }
        progress(Event::Info(lines.join("\n")));

        if s.explain_images > 0 {
            let method =
                inputs::build_methods(std::slice::from_ref(&s.explain_method), &s.shared, &pre)?
                    .remove(0);
            let same = ck0.info.classes == ck1.info.classes;
            let n = s.explain_images.min(images.len());
            let ex =
                explanation_drift(m0, m1, same, method.as_ref(), &images[..n], s.top_fraction)?;
            progress(Event::Info(format!(
                "explanation drift ({}, target: {}): Spearman ρ of |attribution| {:.3}, top-{:.0}% IoU {:.3} (mean of {} images)",
                ex.method,
                if same { "the predicted class's logit" } else { "the embedding norm" },
                ex.mean_spearman,
                s.top_fraction * 100.0,
                ex.mean_top_iou,
                ex.spearman.len()
            )));
            report.explanation = Some(ex);
        }
        report.representation = Some(rep);
    }
    write_drift(
        s,
        (&report.weights, report.representation.as_ref()),
        &report,
        started,
        progress,
    )?;
    Ok(report)
}

/// Write `drift.json` (`report`) and the weight and CKA figures into `s.out`, atomically.
pub(crate) fn write_drift(
    s: &DriftSettings,
    (weights, rep): (&WeightDrift, Option<&RepresentationDrift>),
    report: &impl Serialize,
    started: Instant,
    progress: Progress,
) -> Result<()> {
    let (bars, cka) = drift_figures(weights, rep)?;
    OutputDir::create(&s.out, s.force)?.run(|dir| {
        if let Some(b) = &bars {
            write_file(&dir.join("layers.png"), b)?;
        }
        if let Some(c) = &cka {
            write_file(&dir.join("cka.png"), c)?;
        }
        write_json(&dir.join("drift.json"), report)
    })?;
    progress(Event::Info(format!(
        "drift written to {} ({:.1} s)",
        s.out.join("drift.json").display(),
        started.elapsed().as_secs_f64()
    )));
    Ok(())
}
