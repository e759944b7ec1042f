//! Representation drift: linear CKA (Kornblith et al. 2019) between two models' activations,
//! accumulated over mini-batches with the unbiased HSIC estimator (minibatch CKA, Nguyen, Raghu &
//! Kornblith 2021, eq. 3), so that a probe set's flattened activations never sit in memory at
//! once: only one batch's n × n Gram matrices do.

use candle_core::{DType, Tensor};
use finelens_models::{Classifier, Mode};
use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::error::{DriftError, Result};

/// K = X Xᵀ for the n examples of a batch (each flattened to a row), in f64.
pub fn gram_linear(x: &Tensor) -> Result<Vec<f64>> {
    let x = x.flatten_from(1)?.to_dtype(DType::F64)?;
    Ok(x.matmul(&x.t()?)?.flatten_all()?.to_vec1()?)
}

/// Unbiased HSIC of two n × n Gram matrices (Song et al. 2012, eq. 5), n ≥ 4:
/// [tr(K̃L̃) + 1ᵀK̃1·1ᵀL̃1 / ((n−1)(n−2)) − 2/(n−2) · 1ᵀK̃L̃1] / (n(n−3)), K̃ = K with a zero diagonal.
pub fn hsic_unbiased(k: &[f64], l: &[f64], n: usize) -> f64 {
    assert!(n >= 4, "unbiased HSIC needs n ≥ 4");
    let off = |m: &[f64], i: usize, j: usize| if i == j { 0.0 } else { m[i * n + j] };
    let mut trace = 0.0;
    let (mut sum_k, mut sum_l, mut cross) = (0.0, 0.0, 0.0);
    for i in 0..n {
        let (mut row_k, mut row_l) = (0.0, 0.0);
        for j in 0..n {
            let (a, b) = (off(k, i, j), off(l, i, j));
            trace += a * b;
            row_k += a;
            row_l += b;
        }
        sum_k += row_k;
        sum_l += row_l;
        cross += row_k * row_l;
    }
    let nf = n as f64;
    (trace + sum_k * sum_l / ((nf - 1.0) * (nf - 2.0)) - 2.0 * cross / (nf - 2.0))
        / (nf * (nf - 3.0))
}

/// Minibatch CKA between a layers of model A and b layers of model B: every batch adds its HSIC
/// terms, and CKA = mean HSIC(K, L) / √(mean HSIC(K, K) · mean HSIC(L, L)).
///
/// The sums are additive, so accumulators of disjoint image sets (shards) merge into the
/// estimate over their union's minibatches. It is the same estimator, but not the same number
/// as one run's: minibatch CKA depends on which images share a batch (Nguyen et al. 2021, §3).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MinibatchCka {
    a: usize,
    b: usize,
    kl: Vec<f64>,
    kk: Vec<f64>,
    ll: Vec<f64>,
    pub batches: usize,
    pub examples: usize,
}

impl MinibatchCka {
    pub fn new(a: usize, b: usize) -> Self {
        Self {
            a,
            b,
            kl: vec![0.0; a * b],
            kk: vec![0.0; a],
            ll: vec![0.0; b],
            batches: 0,
            examples: 0,
        }
    }

    /// One batch: the Gram matrices of model A's layers and of model B's, all n × n.
    pub fn update(&mut self, grams_a: &[Vec<f64>], grams_b: &[Vec<f64>], n: usize) {
        for (i, k) in grams_a.iter().enumerate() {
            self.kk[i] += hsic_unbiased(k, k, n);
            for (j, l) in grams_b.iter().enumerate() {
                self.kl[i * self.b + j] += hsic_unbiased(k, l, n);
            }
        }
        for (j, l) in grams_b.iter().enumerate() {
            self.ll[j] += hsic_unbiased(l, l, n);
        }
        self.batches += 1;
        self.examples += n;
    }

    /// Add another accumulator's batches (another shard's), of the same layers.
    pub fn merge(&mut self, other: &MinibatchCka) -> Result<()> {
        if (self.a, self.b) != (other.a, other.b) {
            return Err(DriftError::Settings(format!(
                "cannot merge CKA over {}×{} layers with CKA over {}×{}",
                self.a, self.b, other.a, other.b
            )));
        }
        let add = |x: &mut Vec<f64>, y: &[f64]| x.iter_mut().zip(y).for_each(|(a, b)| *a += b);
        add(&mut self.kl, &other.kl);
        add(&mut self.kk, &other.kk);
        add(&mut self.ll, &other.ll);
        self.batches += other.batches;
        self.examples += other.examples;
        Ok(())
    }

    /// The a × b CKA matrix (the 1/batches factors cancel).
    pub fn matrix(&self) -> Array2<f64> {
        Array2::from_shape_fn((self.a, self.b), |(i, j)| {
            let d = (self.kk[i] * self.ll[j]).sqrt();
            if d > 0.0 {
                self.kl[i * self.b + j] / d
            } else {
                0.0
            }
        })
    }
}

/// CKA of two full activation matrices in one batch (n ≥ 4 rows each).
pub fn linear_cka(x: &Tensor, y: &Tensor) -> Result<f64> {
    let n = x.dim(0)?;
    let mut acc = MinibatchCka::new(1, 1);
    acc.update(&[gram_linear(x)?], &[gram_linear(y)?], n);
    Ok(acc.matrix()[[0, 0]])
}

/// Two models' representations compared at named layers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RepresentationDrift {
    pub layers: Vec<String>,
    /// CKA(layer i of the parent, layer j of the fine-tuned model).
    #[serde(deserialize_with = "finelens_models::json::matrix_f64_or_nan")]
    pub matrix: Vec<Vec<f64>>,
    /// CKA of each layer with itself across the two models.
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub diagonal: Vec<f64>,
    pub pooled: bool,
    pub examples: usize,
    pub batches: usize,
}

impl RepresentationDrift {
    /// The drift an accumulator over `layers` (both models' same layers) measured.
    pub fn from_minibatches(
        layers: &[String],
        pooled: bool,
        acc: &MinibatchCka,
    ) -> Result<RepresentationDrift> {
        if acc.batches == 0 {
            return Err(DriftError::Settings(
                "the probe set has no batch of at least 4 images".into(),
            ));
        }
        let m = acc.matrix();
        Ok(RepresentationDrift {
            layers: layers.to_vec(),
            matrix: m.outer_iter().map(|r| r.to_vec()).collect(),
            diagonal: (0..layers.len()).map(|i| m[[i, i]]).collect(),
            pooled,
            examples: acc.examples,
            batches: acc.batches,
        })
    }
}

/// Run both models over `batches` (N×C×H×W normalised images) and accumulate minibatch CKA
/// between their activations at `layers`; `pooled` averages each channel over space first.
/// Batches of fewer than 4 images (the estimator's minimum) are skipped.
pub fn accumulate_cka(
    before: &dyn Classifier,
    after: &dyn Classifier,
    batches: impl Iterator<Item = Result<Tensor>>,
    layers: &[String],
    pooled: bool,
) -> Result<MinibatchCka> {
    if layers.is_empty() {
        return Err(DriftError::Settings("no layers to compare".into()));
    }
    for l in layers {
        before.check_layer(l)?;
        after.check_layer(l)?;
    }
    let names: Vec<&str> = layers.iter().map(String::as_str).collect();
    let mut acc = MinibatchCka::new(layers.len(), layers.len());
    let grams = |m: &dyn Classifier, x: &Tensor| -> Result<Vec<Vec<f64>>> {
        let (_, taps) = m.forward_with_taps(x, Mode::Eval, &names)?;
        taps.iter()
            .map(|t| {
                let t = if pooled && t.rank() == 4 {
                    t.mean((2, 3))?
                } else {
                    t.clone()
                };
                gram_linear(&t)
            })
            .collect()
    };
    for x in batches {
        let x = x?;
        let n = x.dim(0)?;
        if n < 4 {
            continue;
        }
        acc.update(&grams(before, &x)?, &grams(after, &x)?, n);
    }
    Ok(acc)
}

/// Both models compared at `layers` over `batches`: [`accumulate_cka`], then the CKA matrix.
pub fn representation_drift(
    before: &dyn Classifier,
    after: &dyn Classifier,
    batches: impl Iterator<Item = Result<Tensor>>,
    layers: &[String],
    pooled: bool,
) -> Result<RepresentationDrift> {
    let acc = accumulate_cka(before, after, batches, layers, pooled)?;
    RepresentationDrift::from_minibatches(layers, pooled, &acc)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    fn randn(n: usize, d: usize, seed: u64) -> Tensor {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<f64> = (0..n * d)
            .map(|_| StandardNormal.sample(&mut rng))
            .collect();
        Tensor::from_vec(v, (n, d), &Device::Cpu).unwrap()
    }

    /// A random d × d orthogonal matrix (Gram–Schmidt on a Gaussian one).
    fn orthogonal(d: usize, seed: u64) -> Tensor {
        let g: Vec<Vec<f64>> = randn(d, d, seed).to_vec2().unwrap();
        let mut q: Vec<Vec<f64>> = Vec::new();
        for mut v in g {
            for u in &q {
                let p: f64 = v.iter().zip(u).map(|(a, b)| a * b).sum();
                v.iter_mut().zip(u).for_each(|(a, b)| *a -= p * b);
            }
            let n = v.iter().map(|a| a * a).sum::<f64>().sqrt();
            q.push(v.into_iter().map(|a| a / n).collect());
        }
        Tensor::from_vec(q.concat(), (d, d), &Device::Cpu).unwrap()
    }

    #[test]
    fn cka_is_one_on_itself_and_invariant_to_rotation_and_scale() {
        let x = randn(50, 20, 1);
        assert!((linear_cka(&x, &x).unwrap() - 1.0).abs() < 1e-12);
        // Y = a nonlinear function of X plus noise: CKA strictly between 0 and 1.
        let y = (x.narrow(1, 0, 10).unwrap().tanh().unwrap() + randn(50, 10, 2) * 0.5).unwrap();
        let c = linear_cka(&x, &y).unwrap();
        assert!(c > 0.2 && c < 0.99, "{c}");
        let q = orthogonal(20, 3);
        let xq = x.matmul(&q).unwrap();
        assert!(
            (linear_cka(&xq, &y).unwrap() - c).abs() < 1e-10,
            "orthogonal transform"
        );
        assert!(
            (linear_cka(&(&x * 7.5).unwrap(), &y).unwrap() - c).abs() < 1e-10,
            "isotropic scale"
        );
        assert!((linear_cka(&x, &(&y * 0.01).unwrap()).unwrap() - c).abs() < 1e-10);
        // Independent features: the unbiased estimator is near 0 (the biased one is not).
        let z = randn(50, 20, 4);
        assert!(linear_cka(&x, &z).unwrap().abs() < 0.1);
    }

    #[test]
    fn minibatch_cka_agrees_with_full_batch() {
        // 400 examples whose second view shares a 5-dimensional signal with the first.
        let n = 400;
        let s = randn(n, 5, 5);
        let x = Tensor::cat(&[&s, &randn(n, 15, 6)], 1).unwrap();
        let y = Tensor::cat(&[&(s.tanh().unwrap() * 2.0).unwrap(), &randn(n, 10, 7)], 1).unwrap();
        let full = linear_cka(&x, &y).unwrap();
        let mut acc = MinibatchCka::new(1, 1);
        for b in 0..8 {
            let (xb, yb) = (
                x.narrow(0, b * 50, 50).unwrap(),
                y.narrow(0, b * 50, 50).unwrap(),
            );
            acc.update(
                &[gram_linear(&xb).unwrap()],
                &[gram_linear(&yb).unwrap()],
                50,
            );
        }
        let mini = acc.matrix()[[0, 0]];
        assert!(
            (mini - full).abs() < 0.03,
            "minibatch {mini} vs full {full}"
        );

        // Shards: batches 0–2 and 3–7 accumulated apart and merged give the same sums, up to
        // the order of the additions; merging refuses other layer counts.
        let mut parts = [MinibatchCka::new(1, 1), MinibatchCka::new(1, 1)];
        for b in 0..8 {
            let (xb, yb) = (
                x.narrow(0, b * 50, 50).unwrap(),
                y.narrow(0, b * 50, 50).unwrap(),
            );
            parts[usize::from(b >= 3)].update(
                &[gram_linear(&xb).unwrap()],
                &[gram_linear(&yb).unwrap()],
                50,
            );
        }
        let [mut first, second] = parts;
        first.merge(&second).unwrap();
        assert_eq!((first.batches, first.examples), (8, 400));
        let merged = first.matrix()[[0, 0]];
        assert!((merged - mini).abs() < 1e-12, "{merged} vs {mini}");
        assert!(first.merge(&MinibatchCka::new(2, 1)).is_err());
        let back: MinibatchCka =
            serde_json::from_str(&serde_json::to_string(&first).unwrap()).unwrap();
        assert_eq!(back, first);
    }

    #[test]
    fn hsic_unbiased_is_zero_for_a_constant_kernel() {
        // A constant (centred-away) kernel carries no dependence.
        let n = 6;
        let k = vec![1.0; n * n];
        let l: Vec<f64> = (0..n * n).map(|i| (i % 7) as f64).collect();
        assert!(hsic_unbiased(&k, &l, n).abs() < 1e-12);
    }
}
