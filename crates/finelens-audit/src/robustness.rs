//! Robustness of an explanation to small input changes, Quantus's three estimates from one set
//! of seeded perturbations x̃ = x + u, u uniform in [−r, r] per value with r = [`RADIUS`] × the
//! input's value range (Yeh et al. 2019's sampling):
//!
//! * **max-sensitivity** and **avg-sensitivity** (Yeh, Hsieh, Suggala, Inouye & Ravikumar 2019):
//!   the largest and the mean of ‖a(x̃) − a(x)‖ / ‖a(x)‖ over [`SAMPLES`] perturbations;
//! * **local Lipschitz estimate** (Alvarez-Melis & Jaakkola 2018): the largest
//!   ‖a(x̃) − a(x)‖ / ‖x̃ − x‖.
//!
//! Norms are Euclidean over the attribution's values (C×H×W as the method gives them). The
//! perturbed inputs keep the prediction's class as the target, so the map, not the target,
//! changes.

use candle_core::{DType, Tensor};
use finelens_attrib::Attributor;
use finelens_models::Classifier;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Perturbations per image (Quantus's default is 200 for max-sensitivity; each costs one
/// attribution, so an audit takes a handful on the randomisation check's images).
pub const SAMPLES: usize = 8;
/// The perturbation radius, as a share of the input's value range.
pub const RADIUS: f32 = 0.02;

/// One image's estimates.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageRobustness {
    pub max_sensitivity: f64,
    pub avg_sensitivity: f64,
    pub local_lipschitz: f64,
}

fn norm(v: &[f32]) -> f64 {
    v.iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt()
}

/// The estimates for one image `x` (1×C×H×W) and the map `method` gives it for `target`.
pub fn robustness(
    model: &dyn Classifier,
    method: &dyn Attributor,
    x: &Tensor,
    map: &[f32],
    target: usize,
    seed: u64,
) -> Result<ImageRobustness> {
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let (lo, hi) = xv
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let r = RADIUS * (hi - lo);
    let base = norm(map).max(f64::MIN_POSITIVE);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let (mut max_s, mut sum_s, mut lipschitz) = (0f64, 0f64, 0f64);
    for _ in 0..SAMPLES {
        let u: Vec<f32> = xv.iter().map(|_| rng.random_range(-r..=r)).collect();
        let noisy: Vec<f32> = xv.iter().zip(&u).map(|(a, b)| a + b).collect();
        let xt = Tensor::from_vec(noisy, x.shape(), x.device())?.to_dtype(x.dtype())?;
        let a = method.attribute(model, &xt, &[target])?.remove(0);
        let diff: Vec<f32> = a.map.iter().zip(map).map(|(p, q)| p - q).collect();
        let d = norm(&diff);
        let s = d / base;
        max_s = max_s.max(s);
        sum_s += s;
        lipschitz = lipschitz.max(d / norm(&u).max(f64::MIN_POSITIVE));
    }
    Ok(ImageRobustness {
        max_sensitivity: max_s,
        avg_sensitivity: sum_s / SAMPLES as f64,
        local_lipschitz: lipschitz,
    })
}

/// A method's means over the images.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Robustness {
    pub images: usize,
    pub max_sensitivity: f64,
    pub avg_sensitivity: f64,
    pub local_lipschitz: f64,
}

impl Robustness {
    pub fn summarise(all: &[ImageRobustness]) -> Option<Robustness> {
        let n = all.len();
        let mean = |f: fn(&ImageRobustness) -> f64| all.iter().map(f).sum::<f64>() / n as f64;
        (n > 0).then(|| Robustness {
            images: n,
            max_sensitivity: mean(|r| r.max_sensitivity),
            avg_sensitivity: mean(|r| r.avg_sensitivity),
            local_lipschitz: mean(|r| r.local_lipschitz),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::Linear;
    use candle_core::Device;
    use finelens_attrib::{GradientKind, Saliency};
    use rand_distr::{Distribution, StandardNormal};

    /// On a linear model the gradient is w everywhere: no sensitivity at all. Gradient × input
    /// changes by w ⊙ u, so its Lipschitz estimate lies between min |w| and max |w|, and its
    /// sensitivity is ‖w ⊙ u‖ / ‖w ⊙ x‖ — small for a small radius.
    #[test]
    fn closed_forms_on_a_linear_model() {
        let n = 3 * 8 * 8;
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let w: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let x: Vec<f32> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
        let dev = Device::Cpu;
        let model = Linear {
            w: Tensor::from_vec(w.clone(), n, &dev).unwrap(),
        };
        let xt = Tensor::from_vec(x.clone(), (1, 3, 8, 8), &dev).unwrap();
        for (kind, zero) in [
            (GradientKind::Signed, true),
            (GradientKind::TimesInput, false),
        ] {
            let m = Saliency { kind };
            let map: Vec<f32> = m
                .attribute(&model, &xt, &[0])
                .unwrap()
                .remove(0)
                .map
                .iter()
                .copied()
                .collect();
            let r = robustness(&model, &m, &xt, &map, 0, 7).unwrap();
            if zero {
                assert_eq!((r.max_sensitivity, r.local_lipschitz), (0.0, 0.0), "{r:?}");
            } else {
                let (lo, hi) = w.iter().fold((f64::INFINITY, 0f64), |(a, b), v| {
                    (a.min(v.abs() as f64), b.max(v.abs() as f64))
                });
                assert!(
                    r.local_lipschitz >= lo && r.local_lipschitz <= hi + 1e-6,
                    "{r:?}"
                );
                assert!(r.max_sensitivity > 0.0 && r.max_sensitivity < 0.2, "{r:?}");
                assert!(r.avg_sensitivity <= r.max_sensitivity);
            }
            // Seeded.
            assert_eq!(r, robustness(&model, &m, &xt, &map, 0, 7).unwrap());
        }
    }
}
