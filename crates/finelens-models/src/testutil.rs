//! Helpers for this crate's tests: seeded inputs (candle's own `randn` is not seeded, and a
//! numerical test must give the same verdict every run) and central finite differences.

use candle_core::{DType, Device, Shape, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

/// N(mean, std²) samples of the given shape and dtype, deterministic for a seed.
pub fn randn(shape: impl Into<Shape>, mean: f64, std: f64, dtype: DType, seed: u64) -> Tensor {
    let shape = shape.into();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let normal = Normal::new(mean, std).unwrap();
    let v: Vec<f64> = (0..shape.elem_count())
        .map(|_| normal.sample(&mut rng))
        .collect();
    Tensor::from_vec(v, shape, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// Central difference (f(x + ε eᵢ) − f(x − ε eᵢ)) / 2ε of a scalar function of a flat vector.
/// Step 1e-7 in f64: truncation ~ε², rounding ~1e-16/ε, and a ReLU kink or max-pool switch
/// inside ±ε is unlikely.
pub fn central_difference(f: &mut dyn FnMut(&[f64]) -> f64, x: &[f64], i: usize) -> f64 {
    const EPS: f64 = 1e-7;
    let mut p = x.to_vec();
    p[i] += EPS;
    let mut q = x.to_vec();
    q[i] -= EPS;
    (f(&p) - f(&q)) / (2.0 * EPS)
}

fn max_abs(t: &Tensor) -> f64 {
    t.abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
        .to_scalar()
        .unwrap()
}

/// max |a − b|, in f64 whatever the dtype.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs(&(a - b).unwrap())
}

/// max |a − b| / max |b|: agreement relative to the reference's scale.
pub fn max_rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    max_abs_diff(a, b) / max_abs(b).max(1e-30)
}
