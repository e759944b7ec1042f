//! Perturbation methods over features — SLIC superpixels on an image, tokens on a text
//! ([`crate::segments`]) — each feature either kept (z = 1: the input's values) or switched off
//! (z = 0: the baseline's):
//!
//! * **feature ablation** (Captum's `FeatureAblation`): φ_g = F(x) − F(x with feature g off);
//!   M + 1 evaluations.
//! * **KernelSHAP** (Lundberg & Lee 2017, Theorem 2): the weighted linear fit of F over
//!   coalitions z with the Shapley kernel π(z) = (M − 1) / (C(M, |z|)·|z|·(M − |z|)), solved
//!   exactly under the efficiency constraint Σφ = F(x) − F(x′) (as the `shap` library does).
//!   When the budget covers all 2ᴹ − 2 coalitions they are enumerated and φ are the exact
//!   Shapley values; otherwise sizes are drawn in proportion to the kernel's mass and each
//!   coalition is paired with its complement, seeded.
//! * **LIME** (Ribeiro, Singh & Guestrin 2016): the weighted linear fit (with intercept) over
//!   coalitions drawn feature by feature with probability ½, weighted by
//!   exp(−d²/σ²) with d the cosine distance from the all-on z and σ = [`LIME_KERNEL_WIDTH`]
//!   (LIME's image default), plus the input itself; solved exactly by weighted least squares
//!   (Captum's default surrogate is a Lasso).
//!
//! Each feature's value is spread evenly over its elements (channels × positions), so a map sums
//! to Σφ and the heat map shows relevance per pixel (Captum gives every element the whole φ).
//! The surrogate's weighted R² and the number of model evaluations are reported.

use candle_core::{DType, Tensor};
use finelens_models::{Classifier, InputKind};
use rand::seq::index::sample;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::baseline::{Baseline, Normalisation};
use crate::error::{check_internal_batch, settings, Result};
use crate::segments::{slic, Segments};
use crate::target::target_logits;
use crate::{
    chunks, default_internal_batch, each_input, Attribution, Attributor, Completeness, Sign,
};

/// LIME's kernel width for images (its `LimeImageExplainer` default).
pub const LIME_KERNEL_WIDTH: f64 = 0.25;

/// How well a surrogate explains the model on its samples.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Surrogate {
    /// Weighted R² of the linear fit on the evaluated coalitions (1: the model is linear in
    /// the features there); `None` for feature ablation, which fits nothing.
    pub r2: Option<f64>,
    /// Model evaluations spent.
    pub evaluations: usize,
}

/// Which perturbation method.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Ablation,
    KernelShap,
    Lime,
}

#[derive(Debug, Clone)]
pub struct FeaturePerturbation {
    pub kind: Kind,
    /// Superpixels asked of SLIC (images; a text's features are its tokens).
    pub segments: usize,
    /// Coalitions evaluated (KernelSHAP, LIME).
    pub samples: usize,
    /// What a switched-off feature becomes (several: their mean).
    pub baseline: Baseline,
    pub seed: u64,
    pub internal_batch: Option<usize>,
    pub normalisation: Normalisation,
}

impl FeaturePerturbation {
    /// The features of input `x` (1×C×H×W): a text's tokens, or SLIC on the de-normalised image.
    pub fn features(&self, model: &dyn Classifier, x: &Tensor) -> Result<Segments> {
        let (_, c, h, w) = x.dims4()?;
        if model.describe().input == InputKind::TokenIds {
            return Ok(Segments::rows(h, w));
        }
        let mut v: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
        for ch in 0..c {
            let (m, s) = (
                self.normalisation.mean[ch % 3],
                self.normalisation.std[ch % 3],
            );
            v[ch * h * w..][..h * w]
                .iter_mut()
                .for_each(|p| *p = *p * s + m);
        }
        Ok(slic(&v, (c, h, w), self.segments))
    }

    /// One input (1×C×H×W): φ per feature, spread over the feature's elements.
    fn attribute_one(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let (_, c, h, w) = x.dims4()?;
        let seg = self.features(model, x)?;
        let m = seg.count;
        let baselines = self.baseline.materialise(x, &self.normalisation)?;
        let mean = (Tensor::cat(&baselines, 0)?.mean_keepdim(0))?;
        let flat = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?)
        };
        let (xv, bv) = (flat(x)?, flat(&mean)?);
        let (hw, per) = (h * w, c * h * w);
        let batch = self
            .internal_batch
            .unwrap_or_else(|| default_internal_batch(c, h, w));
        // F_target at x_z = z ⊙ x + (1 − z) ⊙ x′ for each coalition z.
        let eval = |zs: &[Vec<bool>]| -> Result<Vec<f64>> {
            let mut out = Vec::with_capacity(zs.len());
            for range in chunks(zs.len(), batch) {
                let mut v = Vec::with_capacity(range.len() * per);
                for z in &zs[range.clone()] {
                    v.extend((0..per).map(|i| if z[seg.ids[i % hw]] { xv[i] } else { bv[i] }));
                }
                let t =
                    Tensor::from_vec(v, (range.len(), c, h, w), x.device())?.to_dtype(x.dtype())?;
                out.extend(target_logits(model, &t, &vec![target; range.len()])?);
            }
            Ok(out)
        };
        let (phi, surrogate, completeness) = match self.kind {
            Kind::Ablation => {
                let mut zs = vec![vec![true; m]];
                for g in 0..m {
                    let mut z = vec![true; m];
                    z[g] = false;
                    zs.push(z);
                }
                let f = eval(&zs)?;
                let phi: Vec<f64> = f[1..].iter().map(|fg| f[0] - fg).collect();
                let s = Surrogate {
                    r2: None,
                    evaluations: zs.len(),
                };
                (phi, s, None)
            }
            Kind::KernelShap => {
                let ends = eval(&[vec![true; m], vec![false; m]])?;
                let (f1, f0) = (ends[0], ends[1]);
                let (zs, weights) = shapley_coalitions(m, self.samples, self.seed);
                let f = eval(&zs)?;
                let (phi, r2) = constrained_fit(&zs, &f, &weights, f0, f1);
                let attribution_sum = phi.iter().sum();
                let s = Surrogate {
                    r2: Some(r2),
                    evaluations: zs.len() + 2,
                };
                (phi, s, Some(Completeness::of(attribution_sum, f1 - f0)))
            }
            Kind::Lime => {
                let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
                let mut zs = vec![vec![true; m]];
                while zs.len() < self.samples {
                    zs.push((0..m).map(|_| rng.random::<bool>()).collect());
                }
                let weights: Vec<f64> = zs
                    .iter()
                    .map(|z| {
                        let on = z.iter().filter(|&&b| b).count() as f64;
                        // Cosine distance between z and the all-on vector.
                        let d = 1.0 - (on / m as f64).sqrt();
                        (-(d * d) / (LIME_KERNEL_WIDTH * LIME_KERNEL_WIDTH)).exp()
                    })
                    .collect();
                let f = eval(&zs)?;
                let (coef, r2) = weighted_fit(&zs, &f, &weights);
                let s = Surrogate {
                    r2: Some(r2),
                    evaluations: zs.len(),
                };
                (coef[1..].to_vec(), s, None)
            }
        };
        let sizes = seg.sizes();
        let map: Vec<f32> = (0..c * hw)
            .map(|i| {
                let g = seg.ids[i % hw];
                (phi[g] / (c * sizes[g]) as f64) as f32
            })
            .collect();
        Ok(Attribution {
            map: ndarray::Array3::from_shape_vec((c, h, w), map).expect("sizes agree"),
            target,
            completeness,
            surrogate: Some(surrogate),
        })
    }
}

/// KernelSHAP's coalitions (neither empty nor full) and their regression weights: all of them
/// with the Shapley kernel's weights when `budget` covers them, else `budget` drawn with sizes
/// in proportion to the kernel's mass per size, each with its complement, weight 1.
fn shapley_coalitions(m: usize, budget: usize, seed: u64) -> (Vec<Vec<bool>>, Vec<f64>) {
    if m < 2 {
        return (Vec::new(), Vec::new());
    }
    let all = if m < 63 { (1u64 << m) - 2 } else { u64::MAX };
    if (budget as u64) >= all {
        let mut zs = Vec::with_capacity(all as usize);
        let mut weights = Vec::with_capacity(all as usize);
        for bits in 1..(1u64 << m) - 1 {
            let z: Vec<bool> = (0..m).map(|g| bits >> g & 1 == 1).collect();
            let k = bits.count_ones() as usize;
            weights.push((m - 1) as f64 / (binomial(m, k) * (k * (m - k)) as f64));
            zs.push(z);
        }
        return (zs, weights);
    }
    // The kernel's total mass on size k is (M − 1) / (k·(M − k)).
    let mass: Vec<f64> = (1..m)
        .map(|k| (m - 1) as f64 / (k * (m - k)) as f64)
        .collect();
    let total: f64 = mass.iter().sum();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut zs = Vec::with_capacity(budget);
    while zs.len() + 1 < budget.max(2) {
        let mut u = rng.random::<f64>() * total;
        let mut k = 1;
        for (i, w) in mass.iter().enumerate() {
            k = i + 1;
            if u < *w {
                break;
            }
            u -= w;
        }
        let mut z = vec![false; m];
        for g in sample(&mut rng, m, k) {
            z[g] = true;
        }
        let complement: Vec<bool> = z.iter().map(|b| !b).collect();
        zs.push(z);
        zs.push(complement);
    }
    let n = zs.len();
    (zs, vec![1.0; n])
}

fn binomial(n: usize, k: usize) -> f64 {
    (0..k).fold(1.0, |acc, i| acc * (n - i) as f64 / (i + 1) as f64)
}

/// min Σᵢ wᵢ (yᵢ − zᵢ·φ − f0)² subject to Σφ = f1 − f0: the last feature is eliminated,
/// φ_M = (f1 − f0) − Σ_{j<M} φ_j, leaving an unconstrained weighted least-squares problem.
/// Returns φ and the weighted R² of the fit on the coalitions.
fn constrained_fit(
    zs: &[Vec<bool>],
    y: &[f64],
    weights: &[f64],
    f0: f64,
    f1: f64,
) -> (Vec<f64>, f64) {
    let m = zs.first().map_or(1, |z| z.len());
    let total = f1 - f0;
    if m == 1 || zs.is_empty() {
        return (vec![total / m as f64; m], 1.0);
    }
    let last = m - 1;
    let rows: Vec<Vec<f64>> = zs
        .iter()
        .map(|z| {
            let zm = z[last] as u8 as f64;
            (0..last).map(|j| z[j] as u8 as f64 - zm).collect()
        })
        .collect();
    let target: Vec<f64> = zs
        .iter()
        .zip(y)
        .map(|(z, y)| y - f0 - z[last] as u8 as f64 * total)
        .collect();
    let head = solve_weighted(&rows, &target, weights);
    let mut phi = head.clone();
    phi.push(total - head.iter().sum::<f64>());
    let predicted: Vec<f64> = zs
        .iter()
        .map(|z| {
            f0 + z
                .iter()
                .zip(&phi)
                .map(|(&b, p)| b as u8 as f64 * p)
                .sum::<f64>()
        })
        .collect();
    (phi, r_squared(y, &predicted, weights))
}

/// Weighted least squares with an intercept: y ≈ β₀ + Σ_g β_g z_g. Returns β (intercept first)
/// and the weighted R².
fn weighted_fit(zs: &[Vec<bool>], y: &[f64], weights: &[f64]) -> (Vec<f64>, f64) {
    let rows: Vec<Vec<f64>> = zs
        .iter()
        .map(|z| {
            std::iter::once(1.0)
                .chain(z.iter().map(|&b| b as u8 as f64))
                .collect()
        })
        .collect();
    let beta = solve_weighted(&rows, y, weights);
    let predicted: Vec<f64> = rows
        .iter()
        .map(|r| r.iter().zip(&beta).map(|(a, b)| a * b).sum())
        .collect();
    let r2 = r_squared(y, &predicted, weights);
    (beta, r2)
}

/// argmin_β Σᵢ wᵢ (yᵢ − rowᵢ·β)² by the normal equations and a Cholesky factorisation; a ridge
/// of 1e-10 × the mean diagonal keeps an under-determined system (fewer coalitions than
/// features) solvable, giving its minimum-norm-like answer.
fn solve_weighted(rows: &[Vec<f64>], y: &[f64], weights: &[f64]) -> Vec<f64> {
    let p = rows.first().map_or(0, |r| r.len());
    let mut a = vec![0f64; p * p];
    let mut b = vec![0f64; p];
    for ((r, &yi), &wi) in rows.iter().zip(y).zip(weights) {
        for i in 0..p {
            if r[i] == 0.0 {
                continue;
            }
            let wr = wi * r[i];
            b[i] += wr * yi;
            for j in 0..p {
                a[i * p + j] += wr * r[j];
            }
        }
    }
    let mean_diag = (0..p).map(|i| a[i * p + i]).sum::<f64>() / p.max(1) as f64;
    let ridge = 1e-10 * mean_diag.max(f64::MIN_POSITIVE);
    for i in 0..p {
        a[i * p + i] += ridge;
    }
    // Cholesky: A = L·Lᵀ, in place in the lower triangle.
    for j in 0..p {
        let mut d = a[j * p + j];
        for k in 0..j {
            d -= a[j * p + k] * a[j * p + k];
        }
        let d = d.max(ridge).sqrt();
        a[j * p + j] = d;
        for i in j + 1..p {
            let mut s = a[i * p + j];
            for k in 0..j {
                s -= a[i * p + k] * a[j * p + k];
            }
            a[i * p + j] = s / d;
        }
    }
    for i in 0..p {
        let mut s = b[i];
        for k in 0..i {
            s -= a[i * p + k] * b[k];
        }
        b[i] = s / a[i * p + i];
    }
    for i in (0..p).rev() {
        let mut s = b[i];
        for k in i + 1..p {
            s -= a[k * p + i] * b[k];
        }
        b[i] = s / a[i * p + i];
    }
    b
}

fn r_squared(y: &[f64], predicted: &[f64], weights: &[f64]) -> f64 {
    let wsum: f64 = weights.iter().sum();
    let mean = y.iter().zip(weights).map(|(y, w)| y * w).sum::<f64>() / wsum;
    let (mut res, mut tot) = (0.0, 0.0);
    for ((y, p), w) in y.iter().zip(predicted).zip(weights) {
        res += w * (y - p).powi(2);
        tot += w * (y - mean).powi(2);
    }
    if tot <= f64::MIN_POSITIVE {
        1.0
    } else {
        1.0 - res / tot
    }
}

impl Attributor for FeaturePerturbation {
    fn name(&self) -> &'static str {
        match self.kind {
            Kind::Ablation => "feature_ablation",
            Kind::KernelShap => "kernel_shap",
            Kind::Lime => "lime",
        }
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        if self.segments == 0 {
            return Err(settings(self.name(), "segments must be at least 1"));
        }
        if self.kind != Kind::Ablation && self.samples < 2 {
            return Err(settings(self.name(), "samples must be at least 2"));
        }
        check_internal_batch(self.name(), self.internal_batch)?;
        self.baseline.check(self.name())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        each_input(x, targets, |xi, t| self.attribute_one(model, xi, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{randn, LinearModel};
    use candle_core::Device;
    use finelens_models::resnet::Hook;
    use finelens_models::Mode;

    const PLAIN: Normalisation = Normalisation {
        mean: [0.0; 3],
        std: [1.0; 3],
    };

    /// Four flat-coloured quadrants (SLIC finds exactly these four segments), values in [0, 1].
    fn quadrants(h: usize, w: usize) -> Tensor {
        let colours = [
            [0.9, 0.1, 0.1],
            [0.1, 0.8, 0.2],
            [0.1, 0.2, 0.9],
            [0.9, 0.9, 0.1],
        ];
        let mut v = vec![0f64; 3 * h * w];
        for p in 0..h * w {
            let q = (p / w >= h / 2) as usize * 2 + (p % w >= w / 2) as usize;
            for ch in 0..3 {
                v[ch * h * w + p] = colours[q][ch];
            }
        }
        Tensor::from_vec(v, (1, 3, h, w), &Device::Cpu).unwrap()
    }

    fn method(kind: Kind, segments: usize, samples: usize) -> FeaturePerturbation {
        FeaturePerturbation {
            kind,
            segments,
            samples,
            baseline: Baseline::Zeros,
            seed: 3,
            internal_batch: Some(7),
            normalisation: PLAIN,
        }
    }

    /// Per segment: the map's sum over the segment's elements.
    fn per_segment(a: &Attribution, seg: &Segments) -> Vec<f64> {
        let (c, h, w) = a.map.dim();
        let mut out = vec![0f64; seg.count];
        for (i, v) in a.map.iter().enumerate() {
            out[seg.ids[i % (h * w)]] += *v as f64;
        }
        let _ = c;
        out
    }

    /// F(x) = W·x + b is linear in every coalition, so all three methods give each superpixel
    /// g exactly Σ_{i∈g} wᵢ(xᵢ − x′ᵢ), and the surrogates fit perfectly (R² = 1) — whether
    /// KernelSHAP enumerates or samples.
    #[test]
    fn linear_model_gives_each_superpixel_its_share_exactly() {
        let (h, w) = (12, 16);
        let x = (quadrants(h, w)
            + randn((1, 3, h, w), DType::F64, 1)
                .affine(0.05, 0.0)
                .unwrap())
        .unwrap();
        let weight = randn((2, 3 * h * w, 1, 1), DType::F64, 2)
            .reshape((2, 3 * h * w))
            .unwrap();
        let model = LinearModel {
            weight: weight.clone(),
            bias: Tensor::new(&[0.5f64, -0.2], &Device::Cpu).unwrap(),
        };
        let contribution: Vec<f64> = (x.flatten_all().unwrap() * weight.get(1).unwrap())
            .unwrap()
            .to_vec1()
            .unwrap();
        for (kind, segments, samples) in [
            (Kind::Ablation, 6, 0),
            (Kind::KernelShap, 6, 10_000),
            (Kind::KernelShap, 12, 40),
            (Kind::Lime, 6, 60),
        ] {
            let m = method(kind, segments, samples);
            let seg = m.features(&model, &x).unwrap();
            assert!(seg.count >= 3, "{} segments", seg.count);
            let mut want = vec![0f64; seg.count];
            for (i, v) in contribution.iter().enumerate() {
                want[seg.ids[i % (h * w)]] += v;
            }
            let a = m.attribute(&model, &x, &[1]).unwrap().remove(0);
            for (g, (got, want)) in per_segment(&a, &seg).iter().zip(&want).enumerate() {
                assert!(
                    (got - want).abs() < 1e-5 * (1.0 + want.abs()),
                    "{kind:?} ({samples}): segment {g}: {got} vs {want}"
                );
            }
            let s = a.surrogate.unwrap();
            if kind != Kind::Ablation {
                assert!(s.r2.unwrap() > 1.0 - 1e-9, "{kind:?}: R² {:?}", s.r2);
            }
            let coalitions = (1 << seg.count) - 2;
            let evaluations = match kind {
                Kind::Ablation => seg.count + 1,
                Kind::KernelShap if samples >= coalitions => coalitions + 2,
                Kind::KernelShap => samples + 2,
                Kind::Lime => samples,
            };
            assert_eq!(s.evaluations, evaluations, "{kind:?}");
        }
    }

    /// F = a·b + c with a, b, c the mean of channel 0 over three of the four quadrants: with
    /// the zero baseline the Shapley values are ab/2, ab/2, c and 0 (the product's credit split
    /// evenly, the fourth quadrant a dummy); KernelSHAP enumerating all 14 coalitions gives them
    /// exactly, sampling keeps efficiency (Σφ = F(x) − F(x′)) exactly; feature ablation gives
    /// ab, ab, c, 0; LIME's linear fit cannot be perfect (R² < 1) and repeats with its seed.
    #[test]
    fn shapley_values_of_a_product() {
        struct Product;
        impl Classifier for Product {
            fn forward_hooked(
                &self,
                x: &Tensor,
                _: Mode,
                _: Option<Hook>,
            ) -> finelens_models::Result<Tensor> {
                let (_, _, h, w) = x.dims4()?;
                let q = |y: usize, xx: usize| -> finelens_models::Result<Tensor> {
                    Ok(x.narrow(1, 0, 1)?
                        .narrow(2, y * h / 2, h / 2)?
                        .narrow(3, xx * w / 2, w / 2)?
                        .flatten_from(1)?
                        .mean_keepdim(1)?)
                };
                let f = ((q(0, 0)? * q(0, 1)?)? + q(1, 0)?)?;
                Ok(Tensor::cat(&[&f, &f.neg()?], 1)?)
            }
            fn layer_names(&self) -> Vec<String> {
                Vec::new()
            }
            fn num_classes(&self) -> usize {
                2
            }
        }
        let (h, w) = (12, 16);
        let x = quadrants(h, w);
        let (a, b, c) = (0.9, 0.1, 0.1);
        let shap = method(Kind::KernelShap, 4, 100)
            .attribute(&Product, &x, &[0])
            .unwrap();
        let seg = method(Kind::KernelShap, 4, 100)
            .features(&Product, &x)
            .unwrap();
        assert_eq!(seg.count, 4);
        // Segment ids follow the scan: top-left 0, top-right 1, bottom-left 2, bottom-right 3.
        let got = per_segment(&shap[0], &seg);
        for (g, want) in [a * b / 2.0, a * b / 2.0, c, 0.0].iter().enumerate() {
            assert!(
                (got[g] - want).abs() < 1e-6,
                "Shapley {g}: {} vs {want}",
                got[g]
            );
        }
        assert_eq!(shap[0].surrogate.unwrap().evaluations, 16);
        let sampled = method(Kind::KernelShap, 4, 6)
            .attribute(&Product, &x, &[0])
            .unwrap();
        let cpl = sampled[0].completeness.unwrap();
        assert!((cpl.output_difference - (a * b + c)).abs() < 1e-6 && cpl.delta < 1e-6);

        let ablation = method(Kind::Ablation, 4, 0)
            .attribute(&Product, &x, &[0])
            .unwrap();
        let got = per_segment(&ablation[0], &seg);
        for (g, want) in [a * b, a * b, c, 0.0].iter().enumerate() {
            assert!(
                (got[g] - want).abs() < 1e-6,
                "ablation {g}: {} vs {want}",
                got[g]
            );
        }
        let lime = |seed| {
            let mut m = method(Kind::Lime, 4, 64);
            m.seed = seed;
            m.attribute(&Product, &x, &[0]).unwrap().remove(0)
        };
        let (l1, l2, l3) = (lime(1), lime(1), lime(2));
        assert_eq!(l1.map, l2.map);
        assert_ne!(l1.map, l3.map);
        let r2 = l1.surrogate.unwrap().r2.unwrap();
        assert!(r2 > 0.0 && r2 < 1.0 - 1e-6, "LIME R² {r2}");
    }

    #[test]
    fn bad_settings_are_refused() {
        let x = quadrants(8, 8);
        let model = LinearModel {
            weight: randn((2, 192, 1, 1), DType::F64, 2)
                .reshape((2, 192))
                .unwrap(),
            bias: Tensor::new(&[0.0f64, 0.0], &Device::Cpu).unwrap(),
        };
        for (m, needle) in [
            (method(Kind::Lime, 0, 10), "segments must be at least 1"),
            (method(Kind::KernelShap, 4, 1), "samples must be at least 2"),
        ] {
            let e = m.attribute(&model, &x, &[0]).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
    }
}
