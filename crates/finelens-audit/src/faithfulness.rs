//! Faithfulness: deletion and insertion curves (Petsiuk, Das & Saenko 2018, RISE §4.1). Pixels
//! are taken in order of relevance; deletion replaces them one share at a time and watches the
//! target's probability fall, insertion starts from the replaced image and puts them back. A
//! faithful map makes deletion fall fast (low AUC) and insertion rise fast (high AUC) — compared
//! with a random order of the same pixels.

use candle_core::{DType, Tensor};
use finelens_models::{Classifier, Mode};
use ndarray::Array2;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// One image's curves: the target's probability after each step (step 0 = no pixel moved).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Curves {
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub deletion: Vec<f64>,
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub insertion: Vec<f64>,
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub deletion_random: Vec<f64>,
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub insertion_random: Vec<f64>,
}

/// Area under a curve sampled at evenly spaced fractions of [0, 1] (trapezoid rule).
pub fn auc(curve: &[f64]) -> f64 {
    if curve.len() < 2 {
        return curve.first().copied().unwrap_or(0.0);
    }
    let h = 1.0 / (curve.len() - 1) as f64;
    curve.windows(2).map(|w| (w[0] + w[1]) * h / 2.0).sum()
}

/// Softmax probability of `target` for each image of a batch.
fn probabilities(model: &dyn Classifier, x: &Tensor, target: usize) -> Result<Vec<f64>> {
    let logits = model.forward(x, Mode::Eval)?.to_dtype(DType::F64)?;
    let p = candle_core::Tensor::exp(&logits.broadcast_sub(&logits.max_keepdim(1)?)?)?;
    let p = p.broadcast_div(&p.sum_keepdim(1)?)?;
    Ok(p.narrow(1, target, 1)?.flatten_all()?.to_vec1()?)
}

/// The images after moving the first k·(HW/steps) pixels of `order` from `from` to `to`, for
/// k = 0..=steps, as one batch.
fn path(from: &[f32], to: &[f32], order: &[usize], c: usize, hw: usize, steps: usize) -> Vec<f32> {
    let mut out = Vec::with_capacity((steps + 1) * from.len());
    let mut cur = from.to_vec();
    out.extend_from_slice(&cur);
    for k in 1..=steps {
        let (lo, hi) = ((k - 1) * hw / steps, k * hw / steps);
        for &p in &order[lo..hi] {
            for ch in 0..c {
                cur[ch * hw + p] = to[ch * hw + p];
            }
        }
        out.extend_from_slice(&cur);
    }
    out
}

/// Deletion and insertion curves for one image `x` (1×C×H×W) given its relevance map (H×W) and
/// the replacement image (the "removed" pixels, e.g. a blurred copy), with `steps` steps, and the
/// same for a random pixel order drawn from `seed`.
pub fn curves(
    model: &dyn Classifier,
    x: &Tensor,
    relevance: &Array2<f32>,
    replacement: &Tensor,
    target: usize,
    steps: usize,
    seed: u64,
) -> Result<Curves> {
    let (deletion, insertion) = along(
        model,
        x,
        replacement,
        &relevance_order(relevance),
        target,
        steps,
    )?;
    let (deletion_random, insertion_random) =
        random_curves(model, x, replacement, target, steps, seed)?;
    Ok(Curves {
        deletion,
        insertion,
        deletion_random,
        insertion_random,
    })
}

/// The deletion and insertion curves of a random pixel order drawn from `seed`. They depend on
/// the image, not on any map, so an audit draws them once per image for all its methods.
pub fn random_curves(
    model: &dyn Classifier,
    x: &Tensor,
    replacement: &Tensor,
    target: usize,
    steps: usize,
    seed: u64,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (_, _, h, w) = x.dims4()?;
    let mut random: Vec<usize> = (0..h * w).collect();
    random.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
    along(model, x, replacement, &random, target, steps)
}

/// Pixels (flat H×W indices) from the most to the least relevant.
pub fn relevance_order(relevance: &Array2<f32>) -> Vec<usize> {
    let flat: Vec<f32> = relevance.iter().copied().collect();
    let mut order: Vec<usize> = (0..flat.len()).collect();
    order.sort_by(|&a, &b| flat[b].total_cmp(&flat[a]));
    order
}

/// (deletion, insertion) along `order`: each curve is one batch of `steps` + 1 images.
pub fn along(
    model: &dyn Classifier,
    x: &Tensor,
    replacement: &Tensor,
    order: &[usize],
    target: usize,
    steps: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    let (_, c, h, w) = x.dims4()?;
    let hw = h * w;
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let rv: Vec<f32> = replacement.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let run = |from: &[f32], to: &[f32]| -> Result<Vec<f64>> {
        let batch = path(from, to, order, c, hw, steps);
        let t = Tensor::from_vec(batch, (steps + 1, c, h, w), x.device())?.to_dtype(x.dtype())?;
        probabilities(model, &t, target)
    };
    Ok((run(&xv, &rv)?, run(&rv, &xv)?))
}

/// Mean AUCs over images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Faithfulness {
    pub images: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub deletion_auc: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub insertion_auc: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub deletion_auc_random: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub insertion_auc_random: f64,
    /// (random deletion AUC − deletion AUC) + (insertion AUC − random insertion AUC): above 0
    /// when the map orders pixels better than chance.
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub gain_over_random: f64,
}

pub fn summarise(all: &[Curves]) -> Faithfulness {
    let mean =
        |f: &dyn Fn(&Curves) -> f64| all.iter().map(f).sum::<f64>() / all.len().max(1) as f64;
    let (d, i) = (mean(&|c| auc(&c.deletion)), mean(&|c| auc(&c.insertion)));
    let (dr, ir) = (
        mean(&|c| auc(&c.deletion_random)),
        mean(&|c| auc(&c.insertion_random)),
    );
    Faithfulness {
        images: all.len(),
        deletion_auc: d,
        insertion_auc: i,
        deletion_auc_random: dr,
        insertion_auc_random: ir,
        gain_over_random: (dr - d) + (i - ir),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use finelens_models::resnet::Hook;

    #[test]
    fn auc_of_known_curves() {
        assert!((auc(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        assert!((auc(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
        assert!((auc(&[1.0, 0.0, 0.0, 0.0, 0.0]) - 0.125).abs() < 1e-12);
    }

    /// Two logits: 0 and half the sum of 4 "evidence" pixels. The map that names those pixels
    /// deletes (inserts) the evidence first: deletion falls (insertion rises) at once, and the
    /// random order lags.
    struct Evidence;
    impl Classifier for Evidence {
        fn forward_hooked(
            &self,
            x: &Tensor,
            _: Mode,
            _: Option<Hook>,
        ) -> finelens_models::Result<Tensor> {
            let flat = x.flatten_from(1)?;
            let ev = (flat.narrow(1, 0, 4)?.sum_keepdim(1)? * 0.5)?;
            Ok(Tensor::cat(&[&ev.zeros_like()?, &ev], 1)?)
        }
        fn layer_names(&self) -> Vec<String> {
            vec![]
        }
        fn num_classes(&self) -> usize {
            2
        }
    }

    #[test]
    fn a_faithful_map_beats_random_order() {
        let (h, w) = (8, 8);
        let x = Tensor::ones((1, 1, h, w), DType::F32, &Device::Cpu).unwrap();
        let zero = x.zeros_like().unwrap();
        let rel = Array2::from_shape_fn((h, w), |(y, x)| if y == 0 && x < 4 { 1.0 } else { 0.0 });
        let c = curves(&Evidence, &x, &rel, &zero, 1, 16, 0).unwrap();
        // After the first step (4 pixels) the evidence is gone (p = ½), or all there (σ(2)).
        let full = 1.0 / (1.0 + (-2f64).exp());
        assert!((c.deletion[0] - full).abs() < 1e-6 && (c.deletion[1] - 0.5).abs() < 1e-9);
        assert!((c.insertion[0] - 0.5).abs() < 1e-9 && (c.insertion[1] - full).abs() < 1e-6);
        let f = summarise(&[c]);
        assert!(f.deletion_auc < f.deletion_auc_random - 0.1, "{f:?}");
        assert!(f.insertion_auc > f.insertion_auc_random + 0.1, "{f:?}");
        assert!(f.gain_over_random > 0.2);
    }
}
