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

/// The error function of candle's CPU kernels (libm's), and GELU's kernels, per float type:
/// f64 exact through libm's erf, f32 through [`fast`].
pub(crate) trait Erf: Float + Send + Sync {
    fn erf(self) -> Self;
    fn forward_chunk(x: &[Self], y: &mut [Self]);
    fn backward_chunk(x: &[Self], dy: &[Self], dx: &mut [Self]);
}

impl Erf for f32 {
    fn erf(self) -> f32 {
        candle_core::cpu::erf::erf_f32(self)
    }
    fn forward_chunk(x: &[f32], y: &mut [f32]) {
        fast::forward_dispatch(x, y)
    }
    fn backward_chunk(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        fast::backward_dispatch(x, dy, dx)
    }
}

impl Erf for f64 {
    fn erf(self) -> f64 {
        candle_core::cpu::erf::erf_f64(self)
    }
    fn forward_chunk(x: &[f64], y: &mut [f64]) {
        forward_exact(x, y)
    }
    fn backward_chunk(x: &[f64], dy: &[f64], dx: &mut [f64]) {
        backward_exact(x, dy, dx)
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
        .for_each(|(y, x)| T::forward_chunk(x, y));
    y
}

pub(crate) fn backward<T: Erf>(x: &[T], dy: &[T]) -> Vec<T> {
    let mut dx = vec![T::zero(); x.len()];
    dx.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (x, dy))| T::backward_chunk(x, dy, dx));
    dx
}

/// 1/√(2π) in full.
const INV_SQRT_2PI: f64 = 0.5 * std::f64::consts::FRAC_2_SQRT_PI / std::f64::consts::SQRT_2;

fn forward_exact<T: Erf>(x: &[T], y: &mut [T]) {
    for (y, &x) in y.iter_mut().zip(x) {
        *y = x * cdf(x);
    }
}

fn backward_exact<T: Erf>(x: &[T], dy: &[T], dx: &mut [T]) {
    let inv_sqrt_2pi = T::from(INV_SQRT_2PI).unwrap();
    let half = T::from(0.5).unwrap();
    for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
        let pdf = (-half * x * x).exp() * inv_sqrt_2pi;
        *dx = dy * (cdf(x) + x * pdf);
    }
}

/// f32 GELU without libm's scalar, branchy erff (a seventh of a BERT's IG time went to it):
/// Φ(x) and e^(−x²/2) from polynomials and one exponential, branch-free so that the loops
/// vectorise (compiled for AVX-512 or AVX2 + FMA when the CPU has them, chosen at run time).
///
/// With a = |x|/√2: for a < 1, Φ = ½ + ½·x/√2·P(a²), P ≈ erf(z)/z (relative error 1.2e-9);
/// otherwise ½·erfc(a) = ½·e^(−a²)·Q(1/a), Q ≈ erfc(a)·e^(a²) on a ∈ [1, 9.5] (relative error
/// 1.1e-8), and Φ = ½·erfc(a) below 0, 1 − ½·erfc(a) above. The coefficients are weighted
/// least-squares fits on Chebyshev nodes against 30-digit erf/erfc (mpmath). a² = x²/2 is
/// carried as two floats (FMA) so that e^(−a²) does not inherit x²'s rounding, which would
/// cost x²·2⁻²⁴ relatively far in the tail. Measured against f64 over [−14, 14]: Φ within
/// 7.5e-7 relatively (the ½ + ½·erf cancellation near x = −√2, as in the erf form itself).
mod fast {
    /// erf(z)/z in powers of z² for |z| ≤ 1.
    const ERF_SMALL: [f32; 7] = [
        std::f32::consts::FRAC_2_SQRT_PI,
        -0.376_126_26,
        0.112_835_85,
        -0.026_853_812,
        0.005_188_327_3,
        -0.000_801_019,
        7.853_848e-5,
    ];
    /// erfc(a)·e^(a²) in powers of s = 2.2353/a − 1.2353 (a ∈ [1, 9.5] ↦ s ∈ [−1, 1]).
    const ERFC_SCALED: [f32; 11] = [
        0.277_369,
        0.182_473_1,
        -0.036_218_42,
        0.003_061_446,
        0.001_765_223,
        -0.001_225_772_8,
        0.000_452_080_3,
        -9.363_84e-5,
        -2.773_377e-5,
        4.432_631e-5,
        -1.602_571_4e-5,
    ];
    const S_SCALE: f32 = 2.235_294;
    const S_SHIFT: f32 = -1.235_294_1;

    #[inline(always)]
    fn horner<const N: usize>(c: &[f32; N], v: f32) -> f32 {
        let mut r = c[N - 1];
        for &a in c[..N - 1].iter().rev() {
            r = r.mul_add(v, a);
        }
        r
    }

    /// e^(−u) for 0 ≤ u < 87: Cody–Waite reduction by ln 2 and a
    /// degree-7 Taylor polynomial on |r| ≤ ln 2 / 2 (truncation 6e-9).
    #[inline(always)]
    fn exp_neg(u: f32) -> f32 {
        let y = -u;
        let k = (y * std::f32::consts::LOG2_E).round_ties_even();
        let r = k.mul_add(-0.693_359_4, y);
        let r = k.mul_add(2.121_944_4e-4, r);
        let p = horner(
            &[
                1.0,
                1.0,
                0.5,
                1.0 / 6.0,
                1.0 / 24.0,
                1.0 / 120.0,
                1.0 / 720.0,
                1.0 / 5040.0,
            ],
            r,
        );
        p * f32::from_bits((((k.max(-126.0) as i32) + 127) << 23) as u32)
    }

    /// (Φ(x), e^(−x²/2)).
    #[inline(always)]
    pub(super) fn cdf_and_gauss(x: f32) -> (f32, f32) {
        let z = x * std::f32::consts::FRAC_1_SQRT_2;
        let small = 0.5 * z.mul_add(horner(&ERF_SMALL, z * z), 1.0);
        // a² = x²/2 = hi + lo exactly.
        let sq = x * x;
        let lo = x.mul_add(x, -sq) * 0.5;
        let hi = sq * 0.5;
        // e^(−a²) underflows past a² = 87 (and x = ±∞ makes lo NaN).
        let gauss = if hi < 87.0 {
            exp_neg(hi) * (1.0 - lo)
        } else {
            0.0
        };
        let s = (std::f32::consts::SQRT_2 / x.abs()).mul_add(S_SCALE, S_SHIFT);
        let tail = 0.5 * gauss * horner(&ERFC_SCALED, s);
        let large = if x < 0.0 { tail } else { 1.0 - tail };
        let cdf = if z.abs() < 1.0 { small } else { large };
        (cdf, gauss)
    }

    #[inline(always)]
    pub(super) fn forward(x: &[f32], y: &mut [f32]) {
        for (y, &x) in y.iter_mut().zip(x) {
            *y = x * cdf_and_gauss(x).0;
        }
    }

    #[inline(always)]
    pub(super) fn backward(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        let inv_sqrt_2pi = super::INV_SQRT_2PI as f32;
        for ((dx, &x), &dy) in dx.iter_mut().zip(x).zip(dy) {
            let (cdf, gauss) = cdf_and_gauss(x);
            *dx = dy * x.mul_add(gauss * inv_sqrt_2pi, cdf);
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    fn forward_avx512(x: &[f32], y: &mut [f32]) {
        forward(x, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn forward_avx2(x: &[f32], y: &mut [f32]) {
        forward(x, y)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,fma")]
    fn backward_avx512(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        backward(x, dy, dx)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn backward_avx2(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        backward(x, dy, dx)
    }

    /// y = GELU(x) on the widest vectors the CPU has; the same numbers on every path (FMA is
    /// exactly rounded, in hardware or not).
    pub(super) fn forward_dispatch(x: &[f32], y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { forward_avx512(x, y) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { forward_avx2(x, y) };
            }
        }
        forward(x, y)
    }

    /// dx = dy·GELU′(x), dispatched as [`forward_dispatch`].
    pub(super) fn backward_dispatch(x: &[f32], dy: &[f32], dx: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") && is_x86_feature_detected!("avx512vl") {
                // SAFETY: the CPU has the features the function is compiled for.
                return unsafe { backward_avx512(x, dy, dx) };
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                return unsafe { backward_avx2(x, dy, dx) };
            }
        }
        backward(x, dy, dx)
    }
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

    /// The f32 kernels against the exact erf form in f64 on a fine grid over [−14, 14], both
    /// sides of the switch at |x| = √2, tiny and huge values: GELU within 1.5e-6 relatively,
    /// its derivative within 1.5e-6 of Φ + |x|·φ (the derivative itself crosses 0), both to
    /// 1e-36 where e^(−x²/2) leaves f32's normal range; the
    /// vectorised and portable paths give the same bits.
    #[test]
    fn fast_f32_kernels_match_the_exact_form() {
        let root2 = std::f32::consts::SQRT_2;
        let mut xs: Vec<f32> = (0..=280_000).map(|i| -14.0 + i as f32 * 1e-4).collect();
        xs.extend([
            0.0, -0.0, 1e-30, -1e-30, 1e-6, -1e-6, 30.0, -30.0, 1e4, -1e4,
        ]);
        for r in [root2, -root2] {
            xs.extend([
                r,
                f32::from_bits(r.to_bits() - 1),
                f32::from_bits(r.to_bits() + 1),
            ]);
        }
        let n = xs.len();
        let dy: Vec<f32> = (0..n).map(|i| 1.0 + (i % 7) as f32 * 0.25).collect();
        let (mut y, mut dx) = (vec![0f32; n], vec![0f32; n]);
        fast::forward_dispatch(&xs, &mut y);
        fast::backward_dispatch(&xs, &dy, &mut dx);
        let (mut y_portable, mut dx_portable) = (vec![0f32; n], vec![0f32; n]);
        fast::forward(&xs, &mut y_portable);
        fast::backward(&xs, &dy, &mut dx_portable);
        assert!(y
            .iter()
            .zip(&y_portable)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        assert!(dx
            .iter()
            .zip(&dx_portable)
            .all(|(a, b)| a.to_bits() == b.to_bits()));
        for i in 0..n {
            let x = xs[i] as f64;
            // Φ through erfc: ½(1 + erf) cancels to 0 in the far negative tail, even in f64.
            let cdf = 0.5 * candle_core::cpu::erf::erfc_f64(-x / std::f64::consts::SQRT_2);
            let pdf = (-0.5 * x * x).exp() * INV_SQRT_2PI;
            let e = (y[i] as f64 - x * cdf).abs();
            assert!(
                e <= 1.5e-6 * (x * cdf).abs() + 1e-36,
                "GELU({x}) = {} vs {}",
                y[i],
                x * cdf
            );
            let d = dy[i] as f64;
            let e = (dx[i] as f64 - d * (cdf + x * pdf)).abs();
            assert!(
                e <= 1.5e-6 * d * (cdf + x.abs() * pdf) + 1e-36,
                "GELU′({x}): {e:.1e}"
            );
        }
        let (mut y, mut dx) = (vec![0f32; 2], vec![0f32; 2]);
        fast::forward_dispatch(&[f32::INFINITY, f32::NAN], &mut y);
        fast::backward_dispatch(&[f32::INFINITY, f32::NAN], &[1.0, 1.0], &mut dx);
        // As the exact form: GELU(∞) = ∞, GELU′(∞) = 1 + ∞·0; NaN stays NaN.
        assert!(y[0] == f32::INFINITY && y[1].is_nan(), "{y:?}");
        assert!(dx[0].is_nan() && dx[1].is_nan(), "{dx:?}");
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
