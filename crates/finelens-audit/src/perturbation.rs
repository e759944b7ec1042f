//! Faithfulness by perturbation, Quantus's two correlation metrics:
//!
//! * **faithfulness correlation** (Bhatt, Weller & Moura 2020): for [`CORRELATION_RUNS`] random
//!   subsets S of [`SUBSET_PIXELS`] pixels (seeded), the Pearson correlation between the
//!   relevance the map gives S and the drop of the target's logit when S is replaced by the
//!   replacement image, F(x) − F(x_S). 1: the map's sums predict what removing pixels does.
//! * **monotonicity correlation** (Nguyen & Martínez 2020), on a [`GRID`]×[`GRID`] grid of
//!   patches: the Spearman correlation between each patch's |relevance| and |F(x) − F(x_patch)|,
//!   the logit's change when that patch alone is replaced (the paper perturbs features with
//!   noise and takes the variance; one replacement per patch here).
//!
//! * **infidelity** (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019, eq. 2) on the same random
//!   subsets: how far the attribution's first-order prediction of each drop, Iᵀφ with
//!   I = x − x_S (the map repeated over the channels, as Quantus does), is from the drop itself,
//!   E[(β·Iᵀφ − Δf)²], taken at the best scale β ≥ 0 and divided by E[Δf²] so that it is
//!   scale-free and in [0, 1]: 1 − max(Σ aΔf, 0)² / (Σ a² · Σ Δf²). 0: the map predicts every
//!   drop up to one factor; 1: no better than predicting none (or anti-correlated).
//!
//! The logit, not the probability: the methods explain the logit, and a saturated softmax would
//! hide the changes.

use candle_core::{DType, Tensor};
use finelens_drift::{pearson, spearman};
use finelens_models::{Classifier, Mode};
use ndarray::Array2;
use rand::seq::index::sample;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Random subsets per image (Quantus's default is 100; 64 keeps an audit at 224 px in minutes).
pub const CORRELATION_RUNS: usize = 64;
/// Pixels per subset (Quantus's default), at most a quarter of the image.
pub const SUBSET_PIXELS: usize = 224;
/// Patches per side for monotonicity.
pub const GRID: usize = 8;
/// Perturbed images per forward pass.
const BATCH: usize = 32;

/// One map's perturbation figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct PerturbationScores {
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub faithfulness_correlation: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub monotonicity: f64,
    /// NaN when no replacement moved the logit; absent in reports written before it was
    /// measured.
    #[serde(
        default = "nan",
        deserialize_with = "finelens_models::json::f64_or_nan"
    )]
    pub infidelity: f64,
}

fn nan() -> f64 {
    f64::NAN
}

/// The target logit of every image in `images` (n × C×H×W, flat), in batches.
fn logits(
    model: &dyn Classifier,
    images: &[f32],
    shape: (usize, usize, usize),
    like: &Tensor,
    target: usize,
) -> Result<Vec<f64>> {
    let (c, h, w) = shape;
    let per = c * h * w;
    let mut out = Vec::with_capacity(images.len() / per.max(1));
    for chunk in images.chunks(BATCH * per) {
        let n = chunk.len() / per;
        let t = Tensor::from_vec(chunk.to_vec(), (n, c, h, w), like.device())?
            .to_dtype(like.dtype())?;
        let l = model.forward(&t, Mode::Eval)?.to_dtype(DType::F64)?;
        out.extend(l.narrow(1, target, 1)?.flatten_all()?.to_vec1::<f64>()?);
    }
    Ok(out)
}

/// Both figures for one image `x` (1×C×H×W), its relevance map (H×W) and the replacement image.
pub fn perturbation_scores(
    model: &dyn Classifier,
    x: &Tensor,
    relevance: &Array2<f32>,
    replacement: &Tensor,
    target: usize,
    seed: u64,
) -> Result<PerturbationScores> {
    let (_, c, h, w) = x.dims4()?;
    let hw = h * w;
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rv: Vec<f32> = replacement.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rel: Vec<f32> = relevance.iter().copied().collect();
    let replaced = |pixels: &[usize], into: &mut Vec<f32>| {
        let start = into.len();
        into.extend_from_slice(&xv);
        for &p in pixels {
            for ch in 0..c {
                into[start + ch * hw + p] = rv[ch * hw + p];
            }
        }
    };
    let full = logits(model, &xv, (c, h, w), x, target)?[0];

    let size = SUBSET_PIXELS.min(hw / 4).max(1);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut batch = Vec::with_capacity(CORRELATION_RUNS * xv.len());
    let mut sums = Vec::with_capacity(CORRELATION_RUNS);
    let mut predicted = Vec::with_capacity(CORRELATION_RUNS);
    for _ in 0..CORRELATION_RUNS {
        let subset = sample(&mut rng, hw, size).into_vec();
        sums.push(subset.iter().map(|&p| rel[p] as f64).sum::<f64>());
        predicted.push(
            subset
                .iter()
                .map(|&p| {
                    let change: f32 = (0..c).map(|ch| xv[ch * hw + p] - rv[ch * hw + p]).sum();
                    (rel[p] * change) as f64
                })
                .sum::<f64>(),
        );
        replaced(&subset, &mut batch);
    }
    let drops: Vec<f64> = logits(model, &batch, (c, h, w), x, target)?
        .into_iter()
        .map(|f| full - f)
        .collect();

    let (gh, gw) = (GRID.min(h), GRID.min(w));
    let mut batch = Vec::with_capacity(gh * gw * xv.len());
    let mut mass = Vec::with_capacity(gh * gw);
    for gy in 0..gh {
        for gx in 0..gw {
            let pixels: Vec<usize> = (gy * h / gh..(gy + 1) * h / gh)
                .flat_map(|y| (gx * w / gw..(gx + 1) * w / gw).map(move |x| y * w + x))
                .collect();
            mass.push(pixels.iter().map(|&p| rel[p].abs()).sum::<f32>());
            replaced(&pixels, &mut batch);
        }
    }
    let changes: Vec<f32> = logits(model, &batch, (c, h, w), x, target)?
        .into_iter()
        .map(|f| (full - f).abs() as f32)
        .collect();
    Ok(PerturbationScores::of(
        &sums, &predicted, &drops, &mass, &changes,
    ))
}

/// The three figures over a text's word tokens, [MASK] standing in for the replacement image:
/// subsets of a quarter of the words (at least one) for faithfulness correlation and
/// infidelity, each word alone — a token is the text's patch — for monotonicity.
/// `logits(variants)` is the target's logit for each variant, a variant being the positions to
/// mask (the first is empty: the text itself); `words` the positions that may be masked;
/// `relevance[i]` a position's score and `first_order[i]` its first-order prediction of the drop
/// when it is masked, Iᵢᵀφᵢ with Iᵢ = eᵢ − e_[MASK] in the attributed embedding space.
pub fn token_perturbation_scores<E>(
    mut logits: impl FnMut(&[Vec<usize>]) -> std::result::Result<Vec<f64>, E>,
    words: &[usize],
    relevance: &[f32],
    first_order: &[f64],
    seed: u64,
) -> std::result::Result<PerturbationScores, E> {
    let n = words.len();
    let size = (n / 4).max(1).min(n);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut variants: Vec<Vec<usize>> = vec![Vec::new()];
    if n > 0 {
        for _ in 0..CORRELATION_RUNS {
            variants.push(
                sample(&mut rng, n, size)
                    .into_iter()
                    .map(|k| words[k])
                    .collect(),
            );
        }
        variants.extend(words.iter().map(|&i| vec![i]));
    }
    let f = logits(&variants)?;
    let full = f[0];
    let subsets = &variants[1..variants.len() - n];
    let sum = |s: &[usize], v: &dyn Fn(usize) -> f64| s.iter().map(|&i| v(i)).sum::<f64>();
    let sums: Vec<f64> = subsets
        .iter()
        .map(|s| sum(s, &|i| relevance[i] as f64))
        .collect();
    let predicted: Vec<f64> = subsets
        .iter()
        .map(|s| sum(s, &|i| first_order[i]))
        .collect();
    let drops: Vec<f64> = f[1..=subsets.len()].iter().map(|v| full - v).collect();
    let mass: Vec<f32> = words.iter().map(|&i| relevance[i].abs()).collect();
    let changes: Vec<f32> = f[1 + subsets.len()..]
        .iter()
        .map(|v| (full - v).abs() as f32)
        .collect();
    Ok(PerturbationScores::of(
        &sums, &predicted, &drops, &mass, &changes,
    ))
}

impl PerturbationScores {
    /// From the subsets' relevance sums, first-order predictions and logit drops, and the
    /// patches' (tokens') |relevance| and |logit change|.
    fn of(sums: &[f64], predicted: &[f64], drops: &[f64], mass: &[f32], changes: &[f32]) -> Self {
        PerturbationScores {
            faithfulness_correlation: pearson(sums, drops),
            monotonicity: spearman(mass, changes),
            infidelity: infidelity(predicted, drops),
        }
    }
}

/// Yeh et al.'s infidelity at the best non-negative scale, relative to E[Δf²] (module docs).
pub fn infidelity(predicted: &[f64], drops: &[f64]) -> f64 {
    let dot = |a: &[f64], b: &[f64]| a.iter().zip(b).map(|(x, y)| x * y).sum::<f64>();
    let (ad, aa, dd) = (
        dot(predicted, drops),
        dot(predicted, predicted),
        dot(drops, drops),
    );
    if dd <= f64::MIN_POSITIVE {
        return f64::NAN;
    }
    if aa <= f64::MIN_POSITIVE {
        return 1.0;
    }
    (1.0 - ad.max(0.0).powi(2) / (aa * dd)).max(0.0)
}

/// A method's means over the images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Perturbation {
    pub images: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub faithfulness_correlation: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub monotonicity: f64,
    #[serde(
        default = "nan",
        deserialize_with = "finelens_models::json::f64_or_nan"
    )]
    pub infidelity: f64,
}

impl Perturbation {
    pub fn summarise(all: &[PerturbationScores]) -> Option<Perturbation> {
        let n = all.len();
        (n > 0).then(|| Perturbation {
            images: n,
            faithfulness_correlation: all.iter().map(|s| s.faithfulness_correlation).sum::<f64>()
                / n as f64,
            monotonicity: all.iter().map(|s| s.monotonicity).sum::<f64>() / n as f64,
            infidelity: all.iter().map(|s| s.infidelity).sum::<f64>() / n as f64,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Linear;
    use candle_core::Device;

    /// F(x) = w·vec(x) ([`Linear`]): removing pixels (replacement 0) drops the logit by exactly Σ w·x over
    /// them, so the map w·x (summed over channels) is perfectly faithful — correlation 1 and
    /// monotonicity 1 — its negation −1, and a map blind to the weights is not.
    #[test]
    fn a_perfectly_faithful_map_scores_one_and_its_negation_minus_one() {
        let (c, h, w) = (2, 32, 32);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        use rand_distr::{Distribution, StandardNormal};
        let wv: Vec<f32> = (0..c * h * w)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let xv: Vec<f32> = (0..c * h * w)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        let dev = Device::Cpu;
        let model = Linear {
            w: Tensor::from_vec(wv.clone(), c * h * w, &dev).unwrap(),
        };
        let x = Tensor::from_vec(xv.clone(), (1, c, h, w), &dev).unwrap();
        let zeros = x.zeros_like().unwrap();
        let faithful = Array2::from_shape_fn((h, w), |(y, xx)| {
            (0..c)
                .map(|ch| wv[ch * h * w + y * w + xx] * xv[ch * h * w + y * w + xx])
                .sum::<f32>()
        });
        let s = perturbation_scores(&model, &x, &faithful, &zeros, 0, 3).unwrap();
        assert!((s.faithfulness_correlation - 1.0).abs() < 1e-5, "{s:?}");
        // Monotonicity compares Σ|relevance| with |Σ w·x| per patch: equal when every
        // contribution has one sign, so with |w| and |x| the faithful map scores exactly 1.
        let (wa, xa): (Vec<f32>, Vec<f32>) = (
            wv.iter().map(|v| v.abs()).collect(),
            xv.iter().map(|v| v.abs()).collect(),
        );
        let positive = Linear {
            w: Tensor::from_vec(wa.clone(), c * h * w, &dev).unwrap(),
        };
        let xp = Tensor::from_vec(xa.clone(), (1, c, h, w), &dev).unwrap();
        let map = Array2::from_shape_fn((h, w), |(y, xx)| {
            (0..c)
                .map(|ch| wa[ch * h * w + y * w + xx] * xa[ch * h * w + y * w + xx])
                .sum::<f32>()
        });
        let m = perturbation_scores(&positive, &xp, &map, &zeros, 0, 3).unwrap();
        assert!(
            (m.monotonicity - 1.0).abs() < 1e-9 && (m.faithfulness_correlation - 1.0).abs() < 1e-5,
            "{m:?}"
        );
        let against =
            perturbation_scores(&model, &x, &faithful.mapv(|v| -v), &zeros, 0, 3).unwrap();
        assert!(
            (against.faithfulness_correlation + 1.0).abs() < 1e-5,
            "{against:?}"
        );
        let blind = Array2::from_shape_fn((h, w), |(y, xx)| ((y * 7 + xx * 3) % 5) as f32);
        let b = perturbation_scores(&model, &x, &blind, &zeros, 0, 3).unwrap();
        assert!(b.faithfulness_correlation.abs() < 0.5, "{b:?}");
        // Seeded.
        assert_eq!(
            s,
            perturbation_scores(&model, &x, &faithful, &zeros, 0, 3).unwrap()
        );
    }

    /// On a one-channel linear model F(x) = w·x the gradient w predicts every drop exactly to
    /// first order (Iᵀw = F(x) − F(x − I)): infidelity 0, at any scale (2w too); its negation
    /// predicts the drops backwards: 1; a map blind to w scores near 1.
    #[test]
    fn the_gradient_of_a_linear_model_has_no_infidelity() {
        let (h, w) = (32, 32);
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        use rand_distr::{Distribution, StandardNormal};
        let mut draw = || -> Vec<f32> {
            (0..h * w)
                .map(|_| StandardNormal.sample(&mut rng))
                .collect()
        };
        let (wv, xv) = (draw(), draw());
        let dev = Device::Cpu;
        let model = Linear {
            w: Tensor::from_vec(wv.clone(), h * w, &dev).unwrap(),
        };
        let x = Tensor::from_vec(xv, (1, 1, h, w), &dev).unwrap();
        let zeros = x.zeros_like().unwrap();
        let gradient = Array2::from_shape_vec((h, w), wv).unwrap();
        let score = |map: &Array2<f32>| {
            perturbation_scores(&model, &x, map, &zeros, 0, 5)
                .unwrap()
                .infidelity
        };
        assert!(score(&gradient) < 1e-9, "{}", score(&gradient));
        assert!(score(&gradient.mapv(|v| 2.0 * v)) < 1e-9);
        assert_eq!(score(&gradient.mapv(|v| -v)), 1.0);
        let blind = Array2::from_shape_fn((h, w), |(y, xx)| ((y * 7 + xx * 3) % 5) as f32);
        assert!(score(&blind) > 0.7, "{}", score(&blind));
        // The closed form on its own: a perfect predictor up to scale, then none at all.
        assert!(infidelity(&[1.0, 2.0, -1.0], &[2.0, 4.0, -2.0]) < 1e-12);
        assert_eq!(infidelity(&[0.0, 0.0], &[1.0, 2.0]), 1.0);
        assert!(infidelity(&[1.0], &[0.0]).is_nan());
    }

    /// A bag-of-words logit, F = Σᵢ w[idᵢ]: masking a set of positions drops it by exactly
    /// Σ (w[idᵢ] − w[MASK]) over them, so that map — which is also its own first-order
    /// prediction — scores correlation 1, monotonicity 1 and infidelity 0; its negation −1 and
    /// 1. The special tokens (positions 0 and last) are never masked.
    #[test]
    fn token_scores_of_a_bag_of_words_model() {
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        use rand::Rng;
        use rand_distr::{Distribution, StandardNormal};
        let w: Vec<f64> = (0..50).map(|_| StandardNormal.sample(&mut rng)).collect();
        let mask = 49;
        let ids: Vec<usize> = (0..22).map(|_| rng.random_range(0..49)).collect();
        let words: Vec<usize> = (1..ids.len() - 1).collect();
        let logits = |variants: &[Vec<usize>]| -> std::result::Result<Vec<f64>, ()> {
            Ok(variants
                .iter()
                .map(|hide| {
                    assert!(!hide.contains(&0) && !hide.contains(&(ids.len() - 1)));
                    (0..ids.len())
                        .map(|i| w[if hide.contains(&i) { mask } else { ids[i] }])
                        .sum()
                })
                .collect())
        };
        let exact: Vec<f64> = ids.iter().map(|&id| w[id] - w[mask]).collect();
        let rel: Vec<f32> = exact.iter().map(|&v| v as f32).collect();
        let s = token_perturbation_scores(logits, &words, &rel, &exact, 2).unwrap();
        assert!((s.faithfulness_correlation - 1.0).abs() < 1e-6, "{s:?}");
        assert!((s.monotonicity - 1.0).abs() < 1e-9, "{s:?}");
        assert!(s.infidelity < 1e-9, "{s:?}");
        let neg: Vec<f64> = exact.iter().map(|v| -v).collect();
        let negf: Vec<f32> = rel.iter().map(|v| -v).collect();
        let a = token_perturbation_scores(logits, &words, &negf, &neg, 2).unwrap();
        assert!((a.faithfulness_correlation + 1.0).abs() < 1e-6, "{a:?}");
        assert_eq!(a.infidelity, 1.0);
        // A constant map predicts nothing: no correlation to speak of, infidelity well above 0.
        let flat = vec![1f32; ids.len()];
        let c = token_perturbation_scores(logits, &words, &flat, &vec![1.0; ids.len()], 2).unwrap();
        assert!(
            c.faithfulness_correlation.abs() < 0.3 && c.infidelity > 0.5,
            "{c:?}"
        );
        // Seeded.
        assert_eq!(
            s,
            token_perturbation_scores(logits, &words, &rel, &exact, 2).unwrap()
        );
    }
}
