//! GradientSHAP (Lundberg & Lee 2017, as Captum samples it): the expected value of
//! ∂F/∂x(x′ + α(x̃ − x′)) ⊙ (x̃ − x′) over a baseline x′ drawn from a distribution, α ~ U(0, 1) and
//! x̃ = x + Gaussian noise — integrated gradients over a baseline distribution, estimated by
//! sampling: the attributions sum to F(x) − E F(x′) in expectation (exactly for a linear model).

use candle_core::{DType, Tensor};
use finelens_models::Classifier;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::baseline::{Baseline, Normalisation};
use crate::error::Result;
use crate::saliency::check_sampling;
use crate::target::input_gradients;
use crate::{chunks, default_internal_batch, to_maps, Attribution, Attributor, Sign};

#[derive(Debug, Clone)]
pub struct GradientShap {
    pub samples: usize,
    /// The noise σ added to the input, as a fraction of its value range (Captum's `stdevs`,
    /// relative as SmoothGrad's is here); 0 by default, as Captum's.
    pub noise: f32,
    /// The baseline distribution: one baseline, or an average's members drawn uniformly.
    pub baseline: Baseline,
    pub normalisation: Normalisation,
    pub seed: u64,
    pub internal_batch: Option<usize>,
}

impl Attributor for GradientShap {
    fn name(&self) -> &'static str {
        "gradient_shap"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        check_sampling(self.name(), self.samples, self.noise, self.internal_batch)?;
        self.baseline.check(self.name())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let (_, c, h, w) = x.dims4()?;
        let batch = self
            .internal_batch
            .unwrap_or_else(|| default_internal_batch(c, h, w));
        let len = c * h * w;
        let mut out = Vec::with_capacity(targets.len());
        for (i, &target) in targets.iter().enumerate() {
            let xi = x.narrow(0, i, 1)?;
            let values: Vec<f32> = xi.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
            let (lo, hi) = values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let sigma = self.noise * (hi - lo);
            let baselines: Vec<Vec<f32>> = self
                .baseline
                .materialise(&xi, &self.normalisation)?
                .iter()
                .map(|b| Ok(b.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
                .collect::<Result<_>>()?;
            // One stream per input: the same seed gives the same map whatever the batch.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(i as u64);
            let mut total: Option<Tensor> = None;
            for range in chunks(self.samples, batch) {
                let m = range.len();
                let (mut points, mut deltas) =
                    (Vec::with_capacity(m * len), Vec::with_capacity(m * len));
                for _ in 0..m {
                    let b = &baselines[rng.random_range(0..baselines.len())];
                    let alpha: f32 = rng.random();
                    for (&v, &r) in values.iter().zip(b) {
                        let e: f32 = StandardNormal.sample(&mut rng);
                        let noisy = v + sigma * e;
                        points.push(r + alpha * (noisy - r));
                        deltas.push(noisy - r);
                    }
                }
                let as_batch = |v: Vec<f32>| -> Result<Tensor> {
                    Ok(Tensor::from_vec(v, (m, c, h, w), x.device())?.to_dtype(x.dtype())?)
                };
                let (_, g) = input_gradients(model, &as_batch(points)?, &vec![target; m])?;
                let s = (g * as_batch(deltas)?)?.sum_keepdim(0)?;
                total = Some(match total {
                    Some(acc) => (acc + s)?,
                    None => s,
                });
            }
            let map = (total.expect("samples ≥ 1") / self.samples as f64)?;
            out.push(Attribution {
                map: to_maps(&map)?.remove(0),
                target,
                completeness: None,
                surrogate: None,
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixture_image, fixture_model, flat, randn, LinearModel, IMAGENET};
    use candle_core::Device;

    fn shap(baseline: Baseline, noise: f32, seed: u64) -> GradientShap {
        GradientShap {
            samples: 16,
            noise,
            baseline,
            normalisation: IMAGENET,
            seed,
            internal_batch: Some(5),
        }
    }

    /// On F(x) = W·x + b the gradient is W wherever α lands: without noise and with one
    /// baseline every sample is (x − x′) ⊙ W, and so is the mean; with several baselines, the
    /// mean is W ⊙ (x − the mean of the drawn ones), whose sum is F(x) − that mean's logit.
    #[test]
    fn linear_model_gives_the_closed_form() {
        let (c, h, w) = (3, 4, 4);
        let weight = randn((2, c * h * w, 1, 1), DType::F64, 1)
            .reshape((2, c * h * w))
            .unwrap();
        let model = LinearModel {
            weight: weight.clone(),
            bias: Tensor::new(&[0.1f64, 0.2], &Device::Cpu).unwrap(),
        };
        let x = randn((1, c, h, w), DType::F64, 2);
        let a = shap(Baseline::Black, 0.0, 3)
            .attribute(&model, &x, &[0])
            .unwrap()
            .remove(0);
        let b = Baseline::Black
            .materialise(&x, &IMAGENET)
            .unwrap()
            .remove(0);
        let want =
            flat(&((&x - &b).unwrap().flatten_all().unwrap() * weight.get(0).unwrap()).unwrap());
        for (got, want) in a.map.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()));
        }
        // Two baselines: the map is W ⊙ (x − x̄′) for the drawn mixture x̄′ = p·x′₁ + (1 − p)·x′₂,
        // so map / W − (x − x′₂) is the same multiple p of (x′₂ − x′₁) at every position.
        let two = Baseline::Average(vec![Baseline::Black, Baseline::Zeros]);
        let a = shap(two, 0.0, 4)
            .attribute(&model, &x, &[1])
            .unwrap()
            .remove(0);
        let (w1, xv, black) = (flat(&weight.get(1).unwrap()), flat(&x), flat(&b));
        let p: Vec<f64> = (0..xv.len())
            .map(|j| (a.map.as_slice().unwrap()[j] as f64 / w1[j] - xv[j]) / -black[j])
            .collect();
        assert!(p.iter().all(|q| (q - p[0]).abs() < 1e-4), "{p:?}");
        assert!(p[0] > 0.0 && p[0] < 1.0, "both baselines drawn: {}", p[0]);
    }

    /// Seeded: the same seed gives the same map, another seed another (with noise, on a
    /// nonlinear model), whatever the internal batch.
    #[test]
    fn seeds_repeat_and_batches_do_not_matter() {
        let model = fixture_model(DType::F32);
        let x = fixture_image(3, 0, DType::F32);
        let run = |seed, batch| {
            GradientShap {
                internal_batch: Some(batch),
                ..shap(Baseline::UniformNoise { seed: 9 }, 0.1, seed)
            }
            .attribute(&model, &x, &[3])
            .unwrap()
            .remove(0)
            .map
        };
        let a = run(1, 4);
        assert_eq!(a, run(1, 4));
        let b = run(1, 16);
        let gap = a
            .iter()
            .zip(b.iter())
            .map(|(p, q)| (p - q).abs())
            .fold(0f32, f32::max);
        assert!(
            gap < 1e-4 * a.iter().fold(0f32, |m, v| m.max(v.abs())),
            "batching changed it by {gap}"
        );
        assert_ne!(a, run(2, 4));
    }
}
