//! Inverted dropout (Srivastava et al. 2014; `F.dropout`): each unit kept with probability
//! 1 − p and scaled by 1/(1 − p), or zeroed — as one parallel op whose mask is a function of
//! (seed, element index), so it needs no stored mask, does not depend on how the work is split
//! between threads, and the backward is the same op applied to the gradient.
//!
//! The mask bit of element i is SplitMix64's output for the counter i under the seed (Steele,
//! Lea & Flood 2014): a uniform in [0, 1) from its top 53 bits, kept when below 1 − p. Drawing
//! one value per element from a sequential stream instead cost a single-threaded pass per
//! dropout, ten of them per BERT layer and step, plus a mask tensor and a multiply each way.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::run1;

/// Elements per parallel task.
const CHUNK: usize = 1 << 14;

/// `x` with each element kept (and scaled by 1/(1 − p)) or zeroed, the mask drawn from `seed`.
/// `p` must be in [0, 1).
pub fn dropout(x: &Tensor, p: f64, seed: u64) -> candle_core::Result<Tensor> {
    if !(0.0..1.0).contains(&p) {
        candle_core::bail!("dropout: probability {p} must be in [0, 1)");
    }
    let x = x.contiguous()?;
    let op = Dropout {
        keep: 1.0 - p,
        seed,
    };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[derive(Debug, Clone, Copy)]
struct Dropout {
    keep: f64,
    seed: u64,
}

/// SplitMix64's output for counter `i` of the stream `seed`.
fn splitmix64(seed: u64, i: u64) -> u64 {
    let mut z = seed.wrapping_add((i + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl Dropout {
    /// Whether element `i` is kept.
    fn kept(&self, i: usize) -> bool {
        ((splitmix64(self.seed, i as u64) >> 11) as f64) * (1.0 / (1u64 << 53) as f64) < self.keep
    }

    fn apply<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let scale = T::from(1.0 / self.keep).expect("a finite scale");
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(CHUNK)
            .zip(x.par_chunks(CHUNK))
            .enumerate()
            .for_each(|(c, (y, x))| {
                for (j, (y, &x)) in y.iter_mut().zip(x).enumerate() {
                    if self.kept(c * CHUNK + j) {
                        *y = x * scale;
                    }
                }
            });
        y
    }
}

impl CustomOp1 for Dropout {
    fn name(&self) -> &'static str {
        "finelens-dropout"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run1(self.name(), (s, l), |x| self.apply(x), |x| self.apply(x))?;
        Ok((out, l.shape().clone()))
    }

    /// dx = dy·mask/(1 − p): the same mask, so the same op.
    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.detach().contiguous()?.apply_op1_no_bwd(self)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device, Var};

    fn ones(n: usize) -> Var {
        Var::ones(n, DType::F32, &Device::Cpu).unwrap()
    }

    /// About 1 − p of the units are kept, each scaled by exactly 1/(1 − p); the rest are 0.
    #[test]
    fn keeps_the_expected_fraction_scaled() {
        let n = 1 << 20;
        for p in [0.1, 0.5] {
            let y: Vec<f32> = dropout(&ones(n), p, 7).unwrap().to_vec1().unwrap();
            let scale = (1.0 / (1.0 - p)) as f32;
            assert!(y.iter().all(|&v| v == 0.0 || v == scale));
            let kept = y.iter().filter(|&&v| v != 0.0).count() as f64 / n as f64;
            // Binomial standard deviation at n = 2^20 is below 5e-4.
            assert!((kept - (1.0 - p)).abs() < 3e-3, "p {p}: kept {kept}");
        }
    }

    /// One seed, one mask (whatever the dtype); another seed, another mask; p = 0 is the identity.
    #[test]
    fn the_mask_is_a_function_of_the_seed() {
        let x = crate::testutil::randn(5000, 0.0, 1.0, DType::F64, 1);
        let a: Vec<f64> = dropout(&x, 0.3, 1).unwrap().to_vec1().unwrap();
        let b: Vec<f64> = dropout(&x, 0.3, 1).unwrap().to_vec1().unwrap();
        let c: Vec<f64> = dropout(&x, 0.3, 2).unwrap().to_vec1().unwrap();
        let f: Vec<f32> = dropout(&x.to_dtype(DType::F32).unwrap(), 0.3, 1)
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(a.iter().zip(&f).all(|(a, f)| (*a == 0.0) == (*f == 0.0)));
        let id: Vec<f64> = dropout(&x, 0.0, 3).unwrap().to_vec1().unwrap();
        assert_eq!(id, x.to_vec1::<f64>().unwrap());
        assert!(dropout(&x, 1.0, 0).is_err());
    }

    /// The gradient of Σ w·dropout(x) is w times the mask's scale: zero exactly where the output
    /// was dropped (even where x itself is 0).
    #[test]
    fn the_gradient_follows_the_mask() {
        let n = 3 * CHUNK + 17;
        let x = Var::from_tensor(&crate::testutil::randn(n, 0.0, 1.0, DType::F32, 2)).unwrap();
        let w = crate::testutil::randn(n, 0.0, 1.0, DType::F32, 3);
        let y = dropout(&x, 0.25, 9).unwrap();
        let g = (&y * &w).unwrap().sum_all().unwrap().backward().unwrap();
        let g: Vec<f32> = g.get(&x).unwrap().to_vec1().unwrap();
        let (y, x, w): (Vec<f32>, Vec<f32>, Vec<f32>) = (
            y.to_vec1().unwrap(),
            x.as_tensor().to_vec1().unwrap(),
            w.to_vec1().unwrap(),
        );
        let scale = (1.0 / 0.75f64) as f32;
        for i in 0..n {
            let want = if y[i] == 0.0 { 0.0 } else { w[i] * scale };
            assert_eq!(g[i], want, "element {i}");
            assert!(y[i] == 0.0 || y[i] == x[i] * scale);
        }
        let zeros = Var::zeros(4, DType::F32, &Device::Cpu).unwrap();
        let g = dropout(&zeros, 0.5, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let kept: Vec<f32> = g.get(&zeros).unwrap().to_vec1().unwrap();
        let mask = Dropout { keep: 0.5, seed: 1 };
        for (i, k) in kept.iter().enumerate() {
            assert_eq!(*k, if mask.kept(i) { 2.0 } else { 0.0 });
        }
    }
}
