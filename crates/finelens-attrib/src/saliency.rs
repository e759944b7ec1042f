//! Gradient saliency (Simonyan, Vedaldi & Zisserman 2014), gradient × input (Shrikumar et al.
//! 2016), and SmoothGrad (Smilkov et al. 2017) with its squared and variance variants (VarGrad,
//! Adebayo et al. 2018).

use candle_core::Tensor;
use finelens_models::Classifier;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::{check_internal_batch, settings, Result};
use crate::target::input_gradients;
use crate::{
    chunks, default_internal_batch, plain_attributions, to_maps, Attribution, Attributor, Sign,
};

/// What the gradient map shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GradientKind {
    /// ∂F/∂x, signed.
    Signed,
    /// |∂F/∂x| (Captum's `Saliency(abs=True)`, the classic saliency map).
    Absolute,
    /// x ⊙ ∂F/∂x.
    TimesInput,
}

#[derive(Debug, Clone)]
pub struct Saliency {
    pub kind: GradientKind,
}

impl Attributor for Saliency {
    fn name(&self) -> &'static str {
        match self.kind {
            GradientKind::Signed => "gradient",
            GradientKind::Absolute => "saliency",
            GradientKind::TimesInput => "gradient_x_input",
        }
    }

    fn sign(&self) -> Sign {
        match self.kind {
            GradientKind::Absolute => Sign::Absolute,
            _ => Sign::Signed,
        }
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        Ok(())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let (_, g) = input_gradients(model, x, targets)?;
        let map = match self.kind {
            GradientKind::Signed => g,
            GradientKind::Absolute => g.abs()?,
            GradientKind::TimesInput => (g * x)?,
        };
        plain_attributions(&map, targets)
    }
}

/// The settings of a method that averages over noisy samples (SmoothGrad, GradientSHAP).
pub(crate) fn check_sampling(
    method: &'static str,
    samples: usize,
    noise: f32,
    internal_batch: Option<usize>,
) -> Result<()> {
    if samples == 0 {
        return Err(settings(method, "samples must be at least 1"));
    }
    if !(noise.is_finite() && noise >= 0.0) {
        return Err(settings(
            method,
            format!("noise must be a non-negative fraction of the input range, got {noise}"),
        ));
    }
    check_internal_batch(method, internal_batch)?;
    Ok(())
}

/// How SmoothGrad combines the noisy gradients g₁ … gₙ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aggregate {
    /// SmoothGrad: mean gᵢ.
    Mean,
    /// SmoothGrad²: mean gᵢ².
    MeanOfSquares,
    /// VarGrad: mean gᵢ² − (mean gᵢ)².
    Variance,
}

#[derive(Debug, Clone)]
pub struct SmoothGrad {
    pub samples: usize,
    /// Noise σ as a fraction of each input's value range (max − min); Smilkov et al. found
    /// 10–20% best.
    pub noise: f32,
    pub aggregate: Aggregate,
    pub seed: u64,
    /// Noisy copies per gradient pass; `None` picks one from the input size.
    pub internal_batch: Option<usize>,
}

impl SmoothGrad {
    pub fn new(samples: usize, noise: f32, aggregate: Aggregate, seed: u64) -> Self {
        Self {
            samples,
            noise,
            aggregate,
            seed,
            internal_batch: None,
        }
    }
}

impl Attributor for SmoothGrad {
    fn name(&self) -> &'static str {
        match self.aggregate {
            Aggregate::Mean => "smoothgrad",
            Aggregate::MeanOfSquares => "smoothgrad_sq",
            Aggregate::Variance => "vargrad",
        }
    }

    fn sign(&self) -> Sign {
        match self.aggregate {
            Aggregate::Mean => Sign::Signed,
            _ => Sign::Absolute,
        }
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        check_sampling(self.name(), self.samples, self.noise, self.internal_batch)
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let (n, c, h, w) = x.dims4()?;
        let batch = self
            .internal_batch
            .unwrap_or_else(|| default_internal_batch(c, h, w));
        let len = c * h * w;
        let mut out = Vec::with_capacity(n);
        for (i, &target) in targets.iter().enumerate() {
            let xi = x.narrow(0, i, 1)?;
            let values: Vec<f32> = xi
                .to_dtype(candle_core::DType::F32)?
                .flatten_all()?
                .to_vec1()?;
            let (lo, hi) = values
                .iter()
                .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                    (a.min(v), b.max(v))
                });
            let sigma = self.noise * (hi - lo);
            // One stream per input: the same seed gives the same maps whatever the batch.
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(i as u64);
            let (mut sum, mut sum_sq): (Option<Tensor>, Option<Tensor>) = (None, None);
            for range in chunks(self.samples, batch) {
                let m = range.len();
                let mut noisy = Vec::with_capacity(m * len);
                for _ in 0..m {
                    noisy.extend(values.iter().map(|&v| {
                        let e: f32 = StandardNormal.sample(&mut rng);
                        v + sigma * e
                    }));
                }
                let xb = Tensor::from_vec(noisy, (m, c, h, w), x.device())?.to_dtype(x.dtype())?;
                let (_, g) = input_gradients(model, &xb, &vec![target; m])?;
                let s = g.sum_keepdim(0)?;
                let s2 = g.sqr()?.sum_keepdim(0)?;
                sum = Some(match sum {
                    Some(acc) => (acc + s)?,
                    None => s,
                });
                sum_sq = Some(match sum_sq {
                    Some(acc) => (acc + s2)?,
                    None => s2,
                });
            }
            let k = self.samples as f64;
            let mean = (sum.expect("samples ≥ 1") / k)?;
            let map = match self.aggregate {
                Aggregate::Mean => mean,
                Aggregate::MeanOfSquares => (sum_sq.expect("samples ≥ 1") / k)?,
                // Clamped at 0: the two means can cross by rounding when the variance is ~0.
                Aggregate::Variance => {
                    ((sum_sq.expect("samples ≥ 1") / k)? - mean.sqr()?)?.relu()?
                }
            };
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
    use crate::testutil::{fixture_image, fixture_model, flat};
    use candle_core::DType;

    /// The saliency path's input gradient against central differences on the trained resnet-mini
    /// in f64, at a sample of input cells; reports the worst error relative to the largest
    /// gradient.
    #[test]
    fn input_gradient_matches_finite_differences_on_resnet_mini() {
        let model = fixture_model(DType::F64);
        let x = fixture_image(2, 0, DType::F64);
        let target = 2;
        let a = Saliency {
            kind: GradientKind::Signed,
        }
        .attribute(&model, &x, &[target])
        .unwrap();
        let grad: Vec<f32> = a[0].map.iter().copied().collect();
        let base = flat(&x);
        let f = |v: &[f64]| -> f64 {
            let t = Tensor::from_slice(v, x.dims(), x.device()).unwrap();
            crate::target_logits(&model, &t, &[target]).unwrap()[0]
        };
        const EPS: f64 = 1e-6;
        let scale = grad.iter().fold(0f64, |m, g| m.max(g.abs() as f64));
        let mut worst = 0f64;
        // Every 53rd cell: all three channels, spread over the image (53 is coprime to 64).
        for i in (0..base.len()).step_by(53) {
            let (mut p, mut q) = (base.clone(), base.clone());
            p[i] += EPS;
            q[i] -= EPS;
            let fd = (f(&p) - f(&q)) / (2.0 * EPS);
            worst = worst.max((fd - grad[i] as f64).abs() / scale);
        }
        eprintln!("saliency vs finite differences: max error / max |gradient| = {worst:.2e}");
        assert!(worst < 1e-4, "max relative error {worst:e}");
    }

    #[test]
    fn smoothgrad_without_noise_is_the_gradient_and_seeds_repeat() {
        let model = fixture_model(DType::F32);
        let x = Tensor::cat(
            &[
                fixture_image(0, 1, DType::F32),
                fixture_image(4, 1, DType::F32),
            ],
            0,
        )
        .unwrap();
        let targets = [0, 4];
        let plain = Saliency {
            kind: GradientKind::Signed,
        }
        .attribute(&model, &x, &targets)
        .unwrap();
        let sg0 = SmoothGrad {
            internal_batch: Some(3),
            ..SmoothGrad::new(5, 0.0, Aggregate::Mean, 1)
        }
        .attribute(&model, &x, &targets)
        .unwrap();
        for (p, s) in plain.iter().zip(&sg0) {
            let scale = p.map.iter().fold(0f32, |m, v| m.max(v.abs()));
            let err = (&p.map - &s.map).iter().fold(0f32, |m, v| m.max(v.abs()));
            assert!(
                err <= 1e-5 * scale,
                "σ = 0 differs from the gradient by {err}"
            );
        }
        let vg0 = SmoothGrad::new(4, 0.0, Aggregate::Variance, 1)
            .attribute(&model, &x, &targets)
            .unwrap();
        let scale = plain[0].map.iter().fold(0f32, |m, v| m.max(v * v));
        assert!(vg0[0].map.iter().all(|v| *v <= 1e-5 * scale));

        let run = |seed| {
            SmoothGrad::new(6, 0.15, Aggregate::Mean, seed)
                .attribute(&model, &x, &targets)
                .unwrap()
        };
        let (a, b, c) = (run(7), run(7), run(8));
        assert_eq!(a[1].map, b[1].map, "same seed, same map");
        assert_ne!(a[1].map, c[1].map, "another seed, another map");
        // Noise does change the map.
        assert_ne!(a[0].map, plain[0].map);
        // SmoothGrad² without noise is the squared gradient; with noise, the mean of squares is
        // at least the square of the mean (Jensen), element by element, over the same draws.
        let sq0 = SmoothGrad::new(4, 0.0, Aggregate::MeanOfSquares, 1)
            .attribute(&model, &x, &targets)
            .unwrap();
        let want = plain[0].map.mapv(|g| g * g);
        let err = (&sq0[0].map - &want)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            err <= 1e-5 * scale,
            "σ = 0: SmoothGrad² differs from g² by {err}"
        );
        let sq = SmoothGrad::new(6, 0.15, Aggregate::MeanOfSquares, 7)
            .attribute(&model, &x, &targets)
            .unwrap();
        for (m2, m) in sq[1].map.iter().zip(a[1].map.iter()) {
            assert!(
                *m2 >= m * m * (1.0 - 1e-5),
                "E[g²] = {m2} < E[g]² = {}",
                m * m
            );
        }
    }

    #[test]
    fn settings_are_checked_before_work() {
        let model = crate::testutil::RegionModel;
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        for bad in [
            SmoothGrad::new(0, 0.1, Aggregate::Mean, 0),
            SmoothGrad::new(4, -0.1, Aggregate::Mean, 0),
            SmoothGrad::new(4, f32::NAN, Aggregate::Mean, 0),
        ] {
            let e = bad.attribute(&model, &x, &[0]).unwrap_err().to_string();
            assert!(e.starts_with("smoothgrad:"), "{e}");
        }
        // A target outside the model's classes.
        let e = Saliency {
            kind: GradientKind::Absolute,
        }
        .attribute(&model, &x, &[5])
        .unwrap_err()
        .to_string();
        assert!(e.contains("out of range"), "{e}");
    }
}
