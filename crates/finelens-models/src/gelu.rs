//! GELU with the exact erf form, x·Φ(x) = x·½(1 + erf(x/√2)) (Hendrycks & Gimpel 2016; BERT's
//! `gelu`), as one parallel pass each way.
//!
//! Composed of candle ops it is five passes forward and more backward over BERT's widest
//! activations (the 4×-hidden feed-forward). The backward is the exact derivative,
//! dx = dy·(Φ(x) + x·φ(x)) with φ(x) = e^(−x²/2)/√(2π); candle's fused `gelu_erf` backward rounds
//! 1/√(2π) to six digits.

use candle_core::Tensor;
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::Pointwise;

/// Values per rayon task.
const CHUNK: usize = 1 << 13;

/// x·Φ(x), element-wise, differentiable.
pub fn gelu_erf(x: &Tensor) -> candle_core::Result<Tensor> {
    OP.apply(x)
}

static OP: Pointwise = Pointwise {
    names: ("finelens-gelu-erf", "finelens-gelu-erf-backward"),
    from_output: false,
    forward: (forward, forward),
    backward: (backward, backward),
};

/// The error function of candle's CPU kernels (libm's), per float type.
pub(crate) trait Erf: Float + Send + Sync {
    fn erf(self) -> Self;
}

impl Erf for f32 {
    fn erf(self) -> f32 {
        candle_core::cpu::erf::erf_f32(self)
    }
}

impl Erf for f64 {
    fn erf(self) -> f64 {
        candle_core::cpu::erf::erf_f64(self)
    }
}

/// Φ(x), the standard normal CDF.
fn cdf<T: Erf>(x: T) -> T {
    let half = T::from(0.5).unwrap();
    half * ((x / T::from(std::f64::consts::SQRT_2).unwrap()).erf() + T::one())
}

pub(crate) fn forward<T: Erf>(x: &[T]) -> Vec<T> {
    let mut y = vec![T::zero(); x.len()];
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (y, &x) in y.iter_mut().zip(x) {
                *y = x * cdf(x);
            }
        });
    y
}

pub(crate) fn backward<T: Erf>(x: &[T], dy: &[T]) -> Vec<T> {
    // 1/√(2π) in full.
    let inv_sqrt_2pi =
        T::from(0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2).unwrap();
    let half = T::from(0.5).unwrap();
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| {
            for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
                let pdf = (-half * x * x).exp() * inv_sqrt_2pi;
                *dx = dy * (cdf(x) + x * pdf);
            }
        });
    dx
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, max_rel_diff, randn};
    use candle_core::{DType, Var};

    /// GELU composed of candle ops (what `nn::gelu_erf` ran before this op).
    fn composed(x: &Tensor) -> Tensor {
        let cdf = ((x / std::f64::consts::SQRT_2).unwrap().erf().unwrap() + 1.0).unwrap() * 0.5;
        (x * cdf.unwrap()).unwrap()
    }

    #[test]
    fn matches_the_composed_ops_and_finite_differences() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-6)] {
            // Over several rayon chunks, odd length.
            let x = Var::from_tensor(&randn((3, 61, 97), 0.0, 2.0, dtype, 1)).unwrap();
            let r = randn((3, 61, 97), 0.0, 1.0, dtype, 2);
            let (ours, reference) = (gelu_erf(&x).unwrap(), composed(&x));
            assert!(max_rel_diff(&ours, &reference) < tol);
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(max_rel_diff(g0.get(&x).unwrap(), g1.get(&x).unwrap()) < tol);
        }
        let x = Var::from_tensor(&randn(9, 0.0, 2.0, DType::F64, 3)).unwrap();
        let g = gelu_erf(&x).unwrap().sum_all().unwrap().backward().unwrap();
        let ours: Vec<f64> = g.get(&x).unwrap().to_vec1().unwrap();
        let flat: Vec<f64> = x.to_vec1().unwrap();
        let mut f = |p: &[f64]| -> f64 {
            gelu_erf(&Tensor::from_slice(p, 9, x.device()).unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        for (j, a) in ours.iter().enumerate() {
            let e = central_difference(&mut f, &flat, j);
            assert!((a - e).abs() < 1e-7 * (1.0 + e.abs()), "x[{j}]: {a} vs {e}");
        }
    }
}
