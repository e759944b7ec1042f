//! Sanity checks by model-parameter randomisation (Adebayo et al. 2018, §3.1). Re-initialise the
//! weights stage by stage, from the head down to the stem (cascading), or one stage at a time
//! (independent), and compare each method's maps with the trained model's. A map that explains
//! the *model* must change when the model is destroyed; one that barely changes shows the input
//! (edges, colours), whatever the weights — it fails.

use candle_core::{DType, Tensor};
use finelens_attrib::Attributor;
use finelens_models::{Classifier, ModelDescription, ParamKind, ParamSpec, ParamStore};
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::localisation::relevance;
use crate::similarity::{normalised_magnitude, rank_correlation, ssim};

/// A group of parameters randomised together: those whose names start with one of `prefixes`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub prefixes: Vec<String>,
}

/// A model's stages from the head down (its own description): the order of cascading
/// randomisation.
pub fn randomisation_stages(desc: &ModelDescription) -> Vec<Stage> {
    desc.stages_from_head()
        .map(|s| Stage {
            name: s.name.clone(),
            prefixes: s.prefixes.clone(),
        })
        .collect()
}

/// One image's map under a randomised model compared with the trained model's.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Similarity {
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub spearman: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub ssim: f64,
}

/// One image's similarities, a pair per stage in randomisation order: the part of the check an
/// image (and so a shard) contributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageSanity {
    pub cascading: Vec<Similarity>,
    pub independent: Vec<Similarity>,
}

/// Mean similarity of the randomised model's maps to the trained model's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StageSimilarity {
    /// For cascading: every stage down to and including this one is random.
    pub stage: String,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub spearman: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub ssim: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Sanity {
    pub method: String,
    pub images: usize,
    pub cascading: Vec<StageSimilarity>,
    pub independent: Vec<StageSimilarity>,
}

impl Sanity {
    /// Rank correlation with the trained maps once every weight is random (the last cascading
    /// stage): the figure a policy gates on.
    pub fn fully_randomised_spearman(&self) -> f64 {
        self.cascading.last().map_or(1.0, |s| s.spearman)
    }

    /// The check over images: each stage's similarities averaged in the images' order.
    pub fn summarise(method: &str, stages: &[String], images: &[&ImageSanity]) -> Sanity {
        // No image: NaN, not a figure that would pass.
        let n = images.len() as f64;
        let mean = |k: usize, pick: fn(&ImageSanity) -> &[Similarity]| StageSimilarity {
            stage: stages[k].clone(),
            spearman: images.iter().map(|i| pick(i)[k].spearman).sum::<f64>() / n,
            ssim: images.iter().map(|i| pick(i)[k].ssim).sum::<f64>() / n,
        };
        Sanity {
            method: method.to_owned(),
            images: images.len(),
            cascading: (0..stages.len())
                .map(|k| mean(k, |i| &i.cascading))
                .collect(),
            independent: (0..stages.len())
                .map(|k| mean(k, |i| &i.independent))
                .collect(),
        }
    }
}

/// `store` with the weights under `stages` taken from `fresh`.
fn randomised(store: &ParamStore, fresh: &ParamStore, stages: &[&Stage]) -> Result<ParamStore> {
    let out = store.frozen_as(DType::F32)?;
    for (name, t, kind) in fresh.iter() {
        if kind == ParamKind::Weight
            && stages
                .iter()
                .any(|s| s.prefixes.iter().any(|p| name.starts_with(p.as_str())))
        {
            out.var(name)?.set(&t)?;
        }
    }
    Ok(out)
}

fn relevance_map(
    model: &dyn Classifier,
    method: &dyn Attributor,
    x: &Tensor,
    target: usize,
) -> Result<ndarray::Array2<f32>> {
    Ok(relevance(
        &method.attribute(model, x, &[target])?.remove(0).map,
    ))
}

/// Run the cascading and independent randomisation of `stages` for `method` on `images` (each
/// 1×C×H×W with the class to explain, fixed from the trained model), re-initialising from
/// `specs` with `seed`; `done` hears of each map explained: the trained model's, then each
/// randomised model's (two per stage), image by image, [`sanity_steps`] in all. One map of a
/// ResNet-18 at 224 px takes seconds, a whole randomised model over its images half a minute.
///
/// Each image is explained on its own, so its similarities do not depend on which other images
/// share the run: shards of an image set give the figures one run would.
#[allow(clippy::too_many_arguments)]
pub fn parameter_randomisation(
    store: &ParamStore,
    specs: &[ParamSpec],
    build: &dyn Fn(&ParamStore) -> Result<Box<dyn Classifier>>,
    stages: &[Stage],
    method: &dyn Attributor,
    images: &[(&Tensor, usize)],
    seed: u64,
    done: &mut dyn FnMut(&str),
) -> Result<Vec<ImageSanity>> {
    let mut out = vec![
        ImageSanity {
            cascading: Vec::new(),
            independent: Vec::new(),
        };
        images.len()
    ];
    if images.is_empty() {
        return Ok(out);
    }
    let n = images.len();
    let mut maps = |model: &dyn Classifier, what: &str| -> Result<Vec<ndarray::Array2<f32>>> {
        images
            .iter()
            .enumerate()
            .map(|(i, (x, t))| {
                let m = relevance_map(model, method, x, *t)?;
                done(&format!("{what}, image {} of {n}", i + 1));
                Ok(m)
            })
            .collect()
    };
    let device = images[0].0.device();
    let fresh = ParamStore::init(specs, seed, device)?;
    let trained = build(&store.frozen_as(DType::F32)?)?;
    let reference = maps(trained.as_ref(), "the trained model")?;
    let mut compare = |stages: &[&Stage], what: &str| -> Result<Vec<Similarity>> {
        let model = build(&randomised(store, &fresh, stages)?)?;
        Ok(reference
            .iter()
            .zip(maps(model.as_ref(), what)?)
            .map(|(a, b)| Similarity {
                spearman: rank_correlation(a, &b),
                ssim: ssim(&normalised_magnitude(a), &normalised_magnitude(&b)),
            })
            .collect())
    };
    for k in 0..stages.len() {
        let upto: Vec<&Stage> = stages[..=k].iter().collect();
        let cascading = compare(&upto, &format!("cascading down to {}", stages[k].name))?;
        for (o, s) in out.iter_mut().zip(cascading) {
            o.cascading.push(s);
        }
        let independent = compare(&[&stages[k]], &format!("{} alone", stages[k].name))?;
        for (o, s) in out.iter_mut().zip(independent) {
            o.independent.push(s);
        }
    }
    Ok(out)
}

/// The steps [`parameter_randomisation`] reports for `stages` stages and `images` images: every
/// image's map from the trained model and from two randomised models per stage.
pub fn sanity_steps(stages: usize, images: usize) -> usize {
    (1 + 2 * stages) * images
}

#[cfg(test)]
mod tests {
    use super::*;
    use finelens_attrib::{GradientKind, Saliency};
    use finelens_models::ResNet;

    #[test]
    fn gradients_fail_to_survive_randomisation_and_nothing_randomised_changes_nothing() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/resnet-mini-pretrain.safetensors");
        let ck = finelens_models::checkpoint::load(&path, None).unwrap();
        let cfg = ck.config().unwrap();
        let pre = finelens_data::Preprocess {
            size: 64,
            crop_pct: 1.0,
            mean: ck.meta.mean,
            std: ck.meta.std,
        };
        let synth = finelens_data::SynthConfig::default();
        let images: Vec<f32> = (0..2)
            .flat_map(|i| {
                let img = finelens_data::synth::render(
                    finelens_data::Task::Pretrain,
                    finelens_data::Split::Test,
                    i,
                    0,
                    &synth,
                )
                .image;
                pre.normalise(&img)
            })
            .collect();
        let x = Tensor::from_vec(images, (2, 3, 64, 64), &candle_core::Device::Cpu).unwrap();
        let build =
            |s: &ParamStore| -> Result<Box<dyn Classifier>> { Ok(Box::new(ResNet::new(cfg, s)?)) };
        let method = Saliency {
            kind: GradientKind::Absolute,
        };
        let stages = randomisation_stages(&cfg.describe());
        let (x0, x1) = (x.narrow(0, 0, 1).unwrap(), x.narrow(0, 1, 1).unwrap());
        let mut steps = Vec::new();
        let per_image = parameter_randomisation(
            &ck.store,
            &cfg.param_specs(),
            &build,
            &stages,
            &method,
            &[(&x0, 0), (&x1, 1)],
            7,
            &mut |item| steps.push(item.to_owned()),
        )
        .unwrap();
        // Every map is a step: the trained model's and two randomised models' per stage.
        assert_eq!(steps.len(), sanity_steps(stages.len(), 2));
        assert_eq!(steps[0], "the trained model, image 1 of 2");
        assert_eq!(
            steps[2],
            format!("cascading down to {}, image 1 of 2", stages[0].name)
        );
        let names: Vec<String> = stages.iter().map(|s| s.name.clone()).collect();
        let s = Sanity::summarise("saliency", &names, &per_image.iter().collect::<Vec<_>>());
        assert_eq!(s.cascading.len(), 6);
        assert_eq!(s.independent.len(), 6);
        assert_eq!(s.cascading[5].stage, "stem");
        // Randomising every weight destroys the saliency map's ranking (Adebayo et al.: gradients
        // pass this check).
        assert!(s.fully_randomised_spearman() < 0.5, "{:?}", s.cascading);
        assert!(
            s.cascading.iter().all(|c| c.spearman < 0.999),
            "{:?}",
            s.cascading
        );

        // With no stage randomised the maps are the trained model's own.
        let fresh = ParamStore::init(&cfg.param_specs(), 7, &candle_core::Device::Cpu).unwrap();
        let same = build(&randomised(&ck.store, &fresh, &[]).unwrap()).unwrap();
        let trained = build(&ck.store.frozen_as(DType::F32).unwrap()).unwrap();
        let a = relevance_map(same.as_ref(), &method, &x1, 1).unwrap();
        let b = relevance_map(trained.as_ref(), &method, &x1, 1).unwrap();
        assert_eq!(a, b);
    }
}
