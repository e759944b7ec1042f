//! The whole audit of one model on one set of images: every check, for every method, and the
//! figures a policy gates on (taken from the primary method, the first one).

use std::path::PathBuf;

use candle_core::Tensor;
use finelens_attrib::{predict, Attributor, Completeness, Target};
use finelens_models::{Classifier, ParamSpec, ParamStore};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::complexity::{Complexity, MapComplexity};
use crate::error::{AuditError, Result};
use crate::faithfulness::{self, Curves, Faithfulness};
use crate::localisation::{
    localisation, relevance as relevance_of, ImageLocalisation, Localisation,
};
use crate::perturbation::{perturbation_scores, Perturbation, PerturbationScores};
use crate::policy::{Figure, Figures};
use crate::road::{road_curves, Road, RoadCurves};
use crate::robustness::{robustness, ImageRobustness, Robustness};
use crate::sanity::{parameter_randomisation, ImageSanity, Sanity, Stage, StageSimilarity};
use crate::shortcut::{ClassShortcut, HotspotSum};
use crate::similarity::{normalised_magnitude, rank_correlation, ssim};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// One image to audit, preprocessed for the model.
pub struct AuditImage {
    /// Its place in the whole image set (in a shard, too): seeds and the choice of the images
    /// the randomisation check uses follow it, so shards reproduce one run.
    pub index: usize,
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
    /// The randomisation check uses the images whose index in the set is below this.
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
    /// Faithfulness correlation, monotonicity and infidelity for every method, not only the
    /// gated one (`finelens evaluate`).
    pub every_method: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageResult {
    /// The image's place in the whole set.
    pub index: usize,
    pub id: String,
    pub path: PathBuf,
    pub label: Option<usize>,
    pub predicted: usize,
    pub probability: f32,
    pub correct: Option<bool>,
    /// Integrated gradients' completeness, when IG is among the methods.
    pub completeness: Option<Completeness>,
}

/// What one method's map of one image gives every check.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodFindings {
    pub curves: Curves,
    /// With a mask.
    pub localisation: Option<ImageLocalisation>,
    /// Sparseness and complexity of |relevance|; `None` for a map of zeros.
    #[serde(default)]
    pub complexity: Option<MapComplexity>,
    /// ROAD's MoRF and LeRF curves.
    #[serde(default)]
    pub road: Option<RoadCurves>,
    /// Faithfulness correlation and monotonicity (the primary method's).
    #[serde(default)]
    pub perturbation: Option<PerturbationScores>,
    /// For the images the randomisation check uses: the map's similarity with the map of a
    /// random other class (Sixt et al. 2020's random logit test).
    #[serde(default)]
    pub random_logit: Option<StageSimilarity>,
    /// For the same images: max/avg-sensitivity and the local Lipschitz estimate.
    #[serde(default)]
    pub robustness: Option<ImageRobustness>,
    /// For the images the randomisation check uses.
    pub sanity: Option<ImageSanity>,
}

/// One image's part of the audit: the map step, before any figure is computed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageFindings {
    pub image: ImageResult,
    /// In the methods' order.
    pub methods: Vec<MethodFindings>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MethodInfo {
    pub name: String,
    /// Whether its maps are signed (for the gallery's colour scale).
    pub signed: bool,
}

/// The primary method's hotspot sum for one predicted class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassHotspot {
    pub class: usize,
    pub sum: HotspotSum,
}

/// Everything an audit of some images found, before the figures: what a shard writes, and what
/// shards of one image set merge into.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditPartial {
    pub methods: Vec<MethodInfo>,
    /// Randomisation stages, in the order they were randomised.
    pub stages: Vec<String>,
    /// In the order of their index.
    pub images: Vec<ImageFindings>,
    /// By class index.
    pub hotspots: Vec<ClassHotspot>,
    /// Per method, each image's relevance map (H×W): for the report's gallery. Not written; a
    /// merge renders the gallery from the shards' pictures.
    #[serde(skip)]
    pub relevance: Vec<Vec<Array2<f32>>>,
}

impl AuditPartial {
    /// Shards of one image set as one: the same methods and stages, no image twice.
    pub fn merge(parts: Vec<AuditPartial>) -> Result<AuditPartial> {
        let mut parts = parts.into_iter();
        let Some(mut merged) = parts.next() else {
            return Err(AuditError::Settings("nothing to merge".into()));
        };
        merged.relevance.clear();
        for p in parts {
            if p.methods != merged.methods || p.stages != merged.stages {
                return Err(AuditError::Settings(
                    "the parts audit different methods or randomisation stages".into(),
                ));
            }
            merged.images.extend(p.images);
            for h in p.hotspots {
                match merged.hotspots.iter_mut().find(|m| m.class == h.class) {
                    Some(m) => m.sum.merge(&h.sum),
                    None => merged.hotspots.push(h),
                }
            }
        }
        merged.images.sort_by_key(|i| i.image.index);
        if let Some(w) = merged
            .images
            .windows(2)
            .find(|w| w[0].image.index == w[1].image.index)
        {
            return Err(AuditError::Settings(format!(
                "image {} ({}) is in two parts",
                w[0].image.index, w[0].image.id
            )));
        }
        merged.hotspots.sort_by_key(|h| h.class);
        Ok(merged)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MethodResult {
    pub method: String,
    pub sanity: Sanity,
    pub faithfulness: Faithfulness,
    pub localisation: Option<Localisation>,
    #[serde(default)]
    pub complexity: Option<Complexity>,
    #[serde(default)]
    pub road: Option<Road>,
    #[serde(default)]
    pub perturbation: Option<Perturbation>,
    /// Mean similarity between the maps of the predicted class and of a random other one.
    #[serde(default)]
    pub random_logit: Option<RandomLogit>,
    #[serde(default)]
    pub robustness: Option<Robustness>,
}

/// The random logit test (Sixt, Granz & Landgraf 2020): a map that explains the class should
/// change with the class; Spearman ρ and SSIM of |relevance| between the predicted class's map
/// and a random other class's, averaged over the images (low is good).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct RandomLogit {
    pub images: usize,
    pub spearman: f64,
    pub ssim: f64,
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
    /// method's maps are signed: for the report's gallery (empty after a merge).
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

/// Run every check on `images` and keep what each image gives (the map step). The explained
/// class is the model's prediction. An empty list is a shard with nothing to do.
pub fn examine(
    model: &dyn Classifier,
    rebuild: &Rebuild,
    images: &[AuditImage],
    settings: &AuditSettings,
    progress: &mut dyn FnMut(AuditProgress),
) -> Result<AuditPartial> {
    if settings.methods.is_empty() {
        return Err(AuditError::Settings(
            "an audit needs at least one method".into(),
        ));
    }
    for m in &settings.methods {
        m.check(model)?;
    }
    let mut results = Vec::new();
    for img in images {
        let p = predict(model, &img.x, &Target::Predicted)?.remove(0);
        results.push(ImageResult {
            index: img.index,
            id: img.id.clone(),
            path: img.path.clone(),
            label: img.label,
            predicted: p.predicted,
            probability: p.probabilities[p.predicted],
            correct: img.label.map(|l| l == p.predicted),
            completeness: None,
        });
    }
    let mut findings: Vec<Vec<MethodFindings>> = images.iter().map(|_| Vec::new()).collect();
    let mut relevance = Vec::new();
    let mut hotspots: Vec<ClassHotspot> = Vec::new();
    let mut random_curves: Vec<Option<(Vec<f64>, Vec<f64>)>> = vec![None; images.len()];
    for (mi, method) in settings.methods.iter().enumerate() {
        let mut maps = Vec::new();
        let mut full_maps = std::collections::HashMap::new();
        progress(AuditProgress::Phase {
            name: format!("{}: attributions and faithfulness", method.name()),
            total: images.len(),
            unit: "images",
        });
        for (k, img) in images.iter().enumerate() {
            let target = results[k].predicted;
            let a = method.attribute(model, &img.x, &[target])?.remove(0);
            // The robustness check (below) perturbs the randomisation check's images and
            // compares with their maps: keep those.
            if img.index < settings.sanity_images {
                full_maps.insert(k, a.map.iter().copied().collect::<Vec<f32>>());
            }
            // The completeness gate is integrated gradients' (DeepLIFT reports one too).
            if let (Some(c), "integrated_gradients") = (a.completeness, method.name()) {
                results[k].completeness = Some(c);
            }
            let rel = relevance_of(&a.map);
            let mut replacement = settings
                .replacement
                .materialise(&img.x, &settings.normalisation)?;
            if replacement.len() != 1 {
                return Err(AuditError::Settings(
                    "the faithfulness replacement must be a single baseline".into(),
                ));
            }
            let replacement = replacement.remove(0);
            let steps = settings.faithfulness_steps;
            // The random order's curves depend on the image alone: drawn for the first method,
            // reused by the others.
            if random_curves[k].is_none() {
                random_curves[k] = Some(faithfulness::random_curves(
                    model,
                    &img.x,
                    &replacement,
                    target,
                    steps,
                    settings.seed + img.index as u64,
                )?);
            }
            let (deletion_random, insertion_random) =
                random_curves[k].clone().expect("drawn above");
            let order = faithfulness::relevance_order(&rel);
            let (deletion, insertion) =
                faithfulness::along(model, &img.x, &replacement, &order, target, steps)?;
            let curves = Curves {
                deletion,
                insertion,
                deletion_random,
                insertion_random,
            };
            if mi == 0 {
                let (h, w) = rel.dim();
                let at = match hotspots.iter().position(|c| c.class == target) {
                    Some(at) => at,
                    None => {
                        hotspots.push(ClassHotspot {
                            class: target,
                            sum: HotspotSum::new(h, w),
                        });
                        hotspots.len() - 1
                    }
                };
                hotspots[at].sum.add(&rel);
            }
            findings[k].push(MethodFindings {
                curves,
                localisation: img
                    .mask
                    .as_ref()
                    .map(|m| ImageLocalisation::of(&rel, m, settings.pointing_tolerance)),
                complexity: MapComplexity::of(rel.iter().copied()),
                random_logit: None,
                robustness: None,
                // 128 forward passes an image: for the gated method only, unless evaluating.
                perturbation: if mi == 0 || settings.every_method {
                    Some(perturbation_scores(
                        model,
                        &img.x,
                        &rel,
                        &replacement,
                        target,
                        settings.seed + img.index as u64,
                    )?)
                } else {
                    None
                },
                road: Some(road_curves(
                    model,
                    &img.x,
                    &order,
                    target,
                    settings.seed + img.index as u64,
                )?),
                sanity: None,
            });
            maps.push(rel);
            progress(AuditProgress::Step {
                done: k + 1,
                item: &img.id,
            });
        }
        relevance.push(maps);
        let chosen: Vec<usize> = (0..images.len())
            .filter(|&k| images[k].index < settings.sanity_images)
            .collect();
        if chosen.is_empty() {
            continue;
        }
        // The random logit test: explain another class, drawn per image, and compare.
        let classes = model.num_classes();
        if classes > 1 {
            for &k in &chosen {
                let mut rng =
                    ChaCha8Rng::seed_from_u64(settings.seed ^ 0x5EED ^ images[k].index as u64);
                let target = results[k].predicted;
                let other = (target + 1 + rng.random_range(0..classes - 1)) % classes;
                let a = method.attribute(model, &images[k].x, &[other])?.remove(0);
                let rel = relevance_of(&a.map);
                let own = &relevance[mi][k];
                findings[k][mi].random_logit = Some(StageSimilarity {
                    stage: format!("class {other}"),
                    spearman: rank_correlation(own, &rel),
                    ssim: ssim(&normalised_magnitude(own), &normalised_magnitude(&rel)),
                });
            }
        }
        for &k in &chosen {
            let target = results[k].predicted;
            findings[k][mi].robustness = Some(robustness(
                model,
                method.as_ref(),
                &images[k].x,
                &full_maps[&k],
                target,
                settings.seed ^ 0x0B05 ^ images[k].index as u64,
            )?);
        }
        progress(AuditProgress::Phase {
            name: format!("{}: randomisation sanity check", method.name()),
            total: crate::sanity::sanity_steps(rebuild.stages.len(), chosen.len()),
            unit: "maps",
        });
        let mut done = 0;
        let inputs: Vec<(&Tensor, usize)> = chosen
            .iter()
            .map(|&k| (&images[k].x, results[k].predicted))
            .collect();
        let sanity = parameter_randomisation(
            rebuild.store,
            &rebuild.specs,
            rebuild.build,
            &rebuild.stages,
            method.as_ref(),
            &inputs,
            settings.seed,
            &mut |item| {
                done += 1;
                progress(AuditProgress::Step { done, item });
            },
        )?;
        for (&k, s) in chosen.iter().zip(sanity) {
            findings[k][mi].sanity = Some(s);
        }
    }
    hotspots.sort_by_key(|h| h.class);
    Ok(AuditPartial {
        methods: settings
            .methods
            .iter()
            .map(|m| MethodInfo {
                name: m.name().into(),
                signed: m.sign() == finelens_attrib::Sign::Signed,
            })
            .collect(),
        stages: rebuild.stages.iter().map(|s| s.name.clone()).collect(),
        images: results
            .into_iter()
            .zip(findings)
            .map(|(image, methods)| ImageFindings { image, methods })
            .collect(),
        hotspots,
        relevance,
    })
}

/// The figures from what the images gave (the reduce step); `class_names` index the classes.
pub fn summarise(partial: AuditPartial, class_names: &[String]) -> Result<AuditReport> {
    let Some(primary) = partial.methods.first() else {
        return Err(AuditError::Settings(
            "an audit needs at least one method".into(),
        ));
    };
    if partial.images.is_empty() {
        return Err(AuditError::Settings(
            "an audit needs at least one image".into(),
        ));
    }
    let images = &partial.images;
    let mut methods = Vec::new();
    for (mi, info) in partial.methods.iter().enumerate() {
        let curves: Vec<Curves> = images
            .iter()
            .map(|i| i.methods[mi].curves.clone())
            .collect();
        let located: Vec<&ImageLocalisation> = images
            .iter()
            .filter_map(|i| i.methods[mi].localisation.as_ref())
            .collect();
        let sanity: Vec<&ImageSanity> = images
            .iter()
            .filter_map(|i| i.methods[mi].sanity.as_ref())
            .collect();
        methods.push(MethodResult {
            method: info.name.clone(),
            sanity: Sanity::summarise(&info.name, &partial.stages, &sanity),
            faithfulness: faithfulness::summarise(&curves),
            localisation: (!located.is_empty()).then(|| localisation(&located)),
            complexity: Complexity::summarise(
                &images
                    .iter()
                    .filter_map(|i| i.methods[mi].complexity)
                    .collect::<Vec<_>>(),
            ),
            random_logit: {
                let r: Vec<&StageSimilarity> = images
                    .iter()
                    .filter_map(|i| i.methods[mi].random_logit.as_ref())
                    .collect();
                let n = r.len();
                (n > 0).then(|| RandomLogit {
                    images: n,
                    spearman: r.iter().map(|s| s.spearman).sum::<f64>() / n as f64,
                    ssim: r.iter().map(|s| s.ssim).sum::<f64>() / n as f64,
                })
            },
            robustness: Robustness::summarise(
                &images
                    .iter()
                    .filter_map(|i| i.methods[mi].robustness)
                    .collect::<Vec<_>>(),
            ),
            perturbation: Perturbation::summarise(
                &images
                    .iter()
                    .filter_map(|i| i.methods[mi].perturbation)
                    .collect::<Vec<_>>(),
            ),
            road: Road::summarise(
                &images
                    .iter()
                    .filter_map(|i| i.methods[mi].road.clone())
                    .collect::<Vec<_>>(),
            ),
        });
    }

    // Shortcuts, per predicted class, from the primary method.
    let mut shortcut = Vec::new();
    for h in &partial.hotspots {
        let Some(name) = class_names.get(h.class) else {
            return Err(AuditError::Settings(format!(
                "class {} is not among the {} classes",
                h.class,
                class_names.len()
            )));
        };
        let mine = images.iter().filter(|i| i.image.predicted == h.class);
        let outside: Vec<f64> = mine
            .clone()
            .filter_map(|i| i.methods[0].localisation.and_then(|l| l.mass_accuracy))
            .map(|inside| 1.0 - inside)
            .collect();
        let masked = mine.clone().any(|i| i.methods[0].localisation.is_some());
        shortcut.push(h.sum.statistics(name, masked.then_some(&outside[..])));
    }

    let mut figures = Figures::new();
    let first = &methods[0];
    if first.sanity.images > 0 {
        figures.insert(
            Figure::SanityMaxSpearman,
            first.sanity.fully_randomised_spearman(),
        );
    }
    figures.insert(
        Figure::FaithfulnessMinGain,
        first.faithfulness.gain_over_random,
    );
    if let Some(r) = &first.road {
        figures.insert(Figure::FaithfulnessMinRoadGap, r.gap);
    }
    insert_quantus_figures(
        &mut figures,
        first.perturbation.as_ref(),
        first.robustness.as_ref(),
        first.random_logit.as_ref(),
        first.complexity.as_ref(),
    );
    if let Some(l) = &first.localisation {
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
    let results: Vec<ImageResult> = images.iter().map(|i| i.image.clone()).collect();
    let completeness: Vec<Completeness> = results.iter().filter_map(|r| r.completeness).collect();
    if let Some(v) = pooled_relative_delta(&completeness) {
        figures.insert(Figure::CompletenessMaxMeanRelativeDelta, v);
    }
    let labelled: Vec<bool> = results.iter().filter_map(|r| r.correct).collect();
    let accuracy = (!labelled.is_empty())
        .then(|| labelled.iter().filter(|c| **c).count() as f64 / labelled.len() as f64);
    let primary = primary.name.clone();
    let relevance = partial
        .relevance
        .into_iter()
        .zip(&partial.methods)
        .map(|(maps, m)| (maps, m.signed))
        .collect();
    Ok(AuditReport {
        images: results,
        methods,
        shortcut,
        accuracy,
        figures,
        relevance,
        primary,
    })
}

/// Run every check on every image and compute the figures: [`examine`], then [`summarise`].
pub fn audit(
    model: &dyn Classifier,
    rebuild: &Rebuild,
    images: &[AuditImage],
    class_names: &[String],
    settings: &AuditSettings,
    progress: &mut dyn FnMut(AuditProgress),
) -> Result<AuditReport> {
    summarise(
        examine(model, rebuild, images, settings, progress)?,
        class_names,
    )
}

/// Σᵢ |δᵢ| / Σᵢ |F(xᵢ) − F(x′)|: the mean completeness gap relative to the mean output change.
/// A mean of per-image ratios explodes on one image whose output barely moves from the
/// baseline's (|F(x) − F(x′)| ≈ 0), however exact its attribution, and fails a sound audit.
/// The gated method's Quantus figures — perturbation, robustness, random logit, complexity —
/// where measured, into the figures the policy reads (the image and the text audit alike).
pub fn insert_quantus_figures(
    figures: &mut Figures,
    perturbation: Option<&Perturbation>,
    robustness: Option<&Robustness>,
    random_logit: Option<&RandomLogit>,
    complexity: Option<&Complexity>,
) {
    if let Some(p) = perturbation {
        figures.insert(
            Figure::FaithfulnessMinCorrelation,
            p.faithfulness_correlation,
        );
        figures.insert(Figure::FaithfulnessMinMonotonicity, p.monotonicity);
        figures.insert(Figure::FaithfulnessMaxInfidelity, p.infidelity);
    }
    if let Some(r) = robustness {
        figures.insert(Figure::RobustnessMaxSensitivity, r.max_sensitivity);
    }
    if let Some(r) = random_logit {
        figures.insert(Figure::SanityMaxRandomLogitSsim, r.ssim);
    }
    if let Some(c) = complexity {
        figures.insert(Figure::ComplexityMinSparseness, c.mean_sparseness);
        figures.insert(
            Figure::ComplexityMaxRelativeEntropy,
            c.mean_relative_complexity,
        );
    }
}

pub fn pooled_relative_delta(images: &[Completeness]) -> Option<f64> {
    let gap: f64 = images.iter().map(|c| c.delta.abs()).sum();
    let moved: f64 = images.iter().map(|c| c.output_difference.abs()).sum();
    (!images.is_empty()).then(|| gap / moved.max(f64::MIN_POSITIVE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn image(sum: f64, difference: f64) -> Completeness {
        let delta = (sum - difference).abs();
        Completeness {
            attribution_sum: sum,
            output_difference: difference,
            delta,
            relative_delta: delta / difference.abs(),
        }
    }

    #[test]
    fn pooled_relative_delta_is_not_dominated_by_an_image_that_barely_moves() {
        // Three images 1% off, and one whose output moves by 0.006 with a gap of 0.018: its own
        // ratio is 3, the mean of ratios 0.76, the pooled figure (0.02 + 0.03 + 0.01 + 0.018) /
        // (2 + 3 + 1 + 0.006).
        let images = [
            image(2.02, 2.0),
            image(-3.03, -3.0),
            image(0.99, 1.0),
            image(-0.012, 0.006),
        ];
        let pooled = pooled_relative_delta(&images).unwrap();
        assert!((pooled - 0.078 / 6.006).abs() < 1e-12, "{pooled}");
        let mean: f64 = images.iter().map(|c| c.relative_delta).sum::<f64>() / 4.0;
        assert!(mean > 0.7, "{mean}");
        assert_eq!(pooled_relative_delta(&[]), None);
        // Exact attributions give 0, not NaN, even when nothing moved.
        assert_eq!(pooled_relative_delta(&[image(0.0, 0.0)]), Some(0.0));
    }
}
