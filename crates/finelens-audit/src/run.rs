//! The whole audit of one model on one set of images: every check, for every method, and the
//! figures a policy gates on (taken from the primary method, the first one).

use std::path::PathBuf;

use candle_core::Tensor;
use finelens_attrib::{predict, Attributor, Completeness, Target};
use finelens_models::{Classifier, ParamSpec, ParamStore};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::{AuditError, Result};
use crate::faithfulness::{self, Faithfulness};
use crate::localisation::{localisation, relevance, Localisation};
use crate::policy::{Figure, Figures};
use crate::sanity::{parameter_randomisation, Sanity, Stage};
use crate::shortcut::{class_shortcut, ClassShortcut};

/// One image to audit, preprocessed for the model.
pub struct AuditImage {
    pub id: String,
    pub path: PathBuf,
    /// The true class, when the images come from an ImageFolder.
    pub label: Option<usize>,
    /// 1×C×H×W, normalised.
    pub x: Tensor,
    /// H×W ground truth (true = object), in the model's input geometry.
    pub mask: Option<Array2<bool>>,
}

/// What the randomisation check needs to rebuild the model with other weights.
pub struct Rebuild<'a> {
    pub store: &'a ParamStore,
    pub specs: Vec<ParamSpec>,
    pub build: &'a dyn Fn(&ParamStore) -> Result<Box<dyn Classifier>>,
    pub stages: Vec<Stage>,
}

pub struct AuditSettings {
    /// The first is the primary method: the policy gates on its figures.
    pub methods: Vec<Box<dyn Attributor>>,
    /// Images (the first ones) used by the randomisation check.
    pub sanity_images: usize,
    /// Steps of the deletion and insertion curves.
    pub faithfulness_steps: usize,
    /// What deleted pixels are replaced with (RISE uses a blurred copy for insertion and a
    /// constant for deletion; one replacement serves both here), and the normalisation the
    /// baseline is built in.
    pub replacement: finelens_attrib::Baseline,
    pub normalisation: finelens_attrib::Normalisation,
    pub pointing_tolerance: usize,
    pub seed: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageResult {
    pub id: String,
    pub path: PathBuf,
    pub label: Option<usize>,
    pub predicted: usize,
    pub probability: f32,
    pub correct: Option<bool>,
    /// Integrated gradients' completeness, when IG is among the methods.
    pub completeness: Option<Completeness>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub sanity: Sanity,
    pub faithfulness: Faithfulness,
    pub localisation: Option<Localisation>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditReport {
    pub images: Vec<ImageResult>,
    pub methods: Vec<MethodResult>,
    /// Per class, from the primary method.
    pub shortcut: Vec<ClassShortcut>,
    pub accuracy: Option<f64>,
    /// The figures the policy gates on.
    pub figures: Figures,
    /// Per method (in `methods` order), the relevance map (H×W) of every image and whether the
    /// method's maps are signed: for the report's gallery.
    #[serde(skip)]
    pub relevance: Vec<(Vec<Array2<f32>>, bool)>,
    /// The method the policy gates on.
    pub primary: String,
}

/// What the audit reports as it goes: long audits (a ResNet-18 at 224×224) take minutes per
/// method, and a log needs a line at least every few seconds of work.
pub enum AuditProgress<'a> {
    /// A phase begins: `total` steps of `unit`.
    Phase {
        name: String,
        total: usize,
        unit: &'static str,
    },
    /// `done` steps of the current phase are finished; `item` names the last.
    Step { done: usize, item: &'a str },
}

/// Run every check. The explained class is the model's prediction.
pub fn audit(
    model: &dyn Classifier,
    rebuild: &Rebuild,
    images: &[AuditImage],
    class_names: &[String],
    settings: &AuditSettings,
    progress: &mut dyn FnMut(AuditProgress),
) -> Result<AuditReport> {
    if images.is_empty() || settings.methods.is_empty() {
        return Err(AuditError::Settings(
            "an audit needs at least one image and one method".into(),
        ));
    }
    for m in &settings.methods {
        m.check(model)?;
    }
    let mut results = Vec::new();
    let mut targets = Vec::new();
    for img in images {
        let p = predict(model, &img.x, &Target::Predicted)?.remove(0);
        targets.push(p.predicted);
        results.push(ImageResult {
            id: img.id.clone(),
            path: img.path.clone(),
            label: img.label,
            predicted: p.predicted,
            probability: p.probabilities[p.predicted],
            correct: img.label.map(|l| l == p.predicted),
            completeness: None,
        });
    }
    let mut methods = Vec::new();
    let mut all_relevance: Vec<(Vec<Array2<f32>>, bool)> = Vec::new();
    for method in &settings.methods {
        let mut curves = Vec::new();
        let mut pairs = Vec::new();
        let mut maps = Vec::new();
        progress(AuditProgress::Phase {
            name: format!("{}: attributions and faithfulness", method.name()),
            total: images.len(),
            unit: "images",
        });
        for (k, img) in images.iter().enumerate() {
            let a = method.attribute(model, &img.x, &[targets[k]])?.remove(0);
            if let Some(c) = a.completeness {
                results[k].completeness = Some(c);
            }
            let rel = relevance(&a.map);
            let mut replacement = settings
                .replacement
                .materialise(&img.x, &settings.normalisation)?;
            if replacement.len() != 1 {
                return Err(AuditError::Settings(
                    "the faithfulness replacement must be a single baseline".into(),
                ));
            }
            let replacement = replacement.remove(0);
            curves.push(faithfulness::curves(
                model,
                &img.x,
                &rel,
                &replacement,
                targets[k],
                settings.faithfulness_steps,
                settings.seed + k as u64,
            )?);
            if let Some(m) = &img.mask {
                pairs.push((rel.clone(), m.clone()));
            }
            maps.push(rel);
            progress(AuditProgress::Step {
                done: k + 1,
                item: &img.id,
            });
        }
        all_relevance.push((maps, method.sign() == finelens_attrib::Sign::Signed));
        let n = settings.sanity_images.clamp(1, images.len());
        let xs = Tensor::cat(
            &images[..n].iter().map(|i| i.x.clone()).collect::<Vec<_>>(),
            0,
        )?;
        progress(AuditProgress::Phase {
            name: format!("{}: randomisation sanity check", method.name()),
            total: 2 * rebuild.stages.len(),
            unit: "randomised models",
        });
        let mut done = 0;
        let sanity = parameter_randomisation(
            rebuild.store,
            &rebuild.specs,
            rebuild.build,
            &rebuild.stages,
            method.as_ref(),
            &xs,
            &targets[..n],
            settings.seed,
            &mut |item| {
                done += 1;
                progress(AuditProgress::Step { done, item });
            },
        )?;
        methods.push(MethodResult {
            method: method.name().into(),
            sanity,
            faithfulness: faithfulness::summarise(&curves),
            localisation: (!pairs.is_empty())
                .then(|| localisation(&pairs, settings.pointing_tolerance)),
        });
    }

    // Shortcuts, per predicted class, from the primary method.
    let mut shortcut = Vec::new();
    for (ci, name) in class_names.iter().enumerate() {
        let idx: Vec<usize> = (0..images.len()).filter(|&k| targets[k] == ci).collect();
        if idx.is_empty() {
            continue;
        }
        let maps: Vec<Array2<f32>> = idx.iter().map(|&k| all_relevance[0].0[k].clone()).collect();
        let masks: Option<Vec<Array2<bool>>> =
            idx.iter().map(|&k| images[k].mask.clone()).collect();
        shortcut.push(class_shortcut(name, &maps, masks.as_deref()));
    }

    let mut figures = Figures::new();
    let primary = &methods[0];
    figures.insert(
        Figure::SanityMaxSpearman,
        primary.sanity.fully_randomised_spearman(),
    );
    figures.insert(
        Figure::FaithfulnessMinGain,
        primary.faithfulness.gain_over_random,
    );
    if let Some(l) = &primary.localisation {
        figures.insert(
            Figure::LocalisationMinMassAccuracy,
            l.relevance_mass_accuracy,
        );
        figures.insert(
            Figure::LocalisationMinPointingGame,
            l.pointing_game_hit_rate,
        );
    }
    let worst = |f: &dyn Fn(&ClassShortcut) -> Option<f64>| {
        shortcut
            .iter()
            .filter_map(f)
            .fold(None, |m: Option<f64>, v| Some(m.map_or(v, |m| m.max(v))))
    };
    if let Some(v) = worst(&|c| c.mass_outside_mask) {
        figures.insert(Figure::ShortcutMaxMassOutsideMask, v);
    }
    if let Some(v) = worst(&|c| Some(c.hotspot_concentration)) {
        figures.insert(Figure::ShortcutMaxHotspotConcentration, v);
    }
    let deltas: Vec<f64> = results
        .iter()
        .filter_map(|r| r.completeness.map(|c| c.relative_delta))
        .collect();
    if !deltas.is_empty() {
        figures.insert(
            Figure::CompletenessMaxMeanRelativeDelta,
            deltas.iter().sum::<f64>() / deltas.len() as f64,
        );
    }
    let labelled: Vec<bool> = results.iter().filter_map(|r| r.correct).collect();
    let accuracy = (!labelled.is_empty())
        .then(|| labelled.iter().filter(|c| **c).count() as f64 / labelled.len() as f64);
    Ok(AuditReport {
        images: results,
        methods,
        shortcut,
        accuracy,
        figures,
        relevance: all_relevance,
        primary: settings.methods[0].name().into(),
    })
}
