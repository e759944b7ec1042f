//! Softmax over the last dimension as one op with a hand-written backward.
//!
//! Composed of candle ops (max, subtract, exp, sum, divide) it is five passes forward and more
//! backward over every attention score; here each row is one pass each way, rows in parallel.
//! With y = softmax(s·x) over a row, the backward is dx = s·y ⊙ (dy − ⟨dy, y⟩), read off the
//! output. Attention's form ([`attention_softmax`]) also takes the scores' scale 1/√d and the
//! padding mask, which would otherwise be two more passes each way over every score.

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{run1, run2};

/// Rows per rayon task at least, so that short rows are not a task each.
const MIN_VALUES_PER_TASK: usize = 4096;

/// softmax(x) over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    apply(
        x,
        Softmax {
            d,
            scale: 1.0,
            keys: None,
        },
    )
}

/// Attention weights from the scores `x` (N × heads × queries × keys): softmax(scale·x) over
/// the keys, with the keys `keep` marks false (N × keys, row-major; `None`: every key) given
/// weight exactly 0 — what transformers' additive mask of the dtype's lowest value gives.
/// Differentiable in `x`.
pub fn attention_softmax(
    x: &Tensor,
    scale: f64,
    keep: Option<Arc<Vec<bool>>>,
) -> candle_core::Result<Tensor> {
    let (n, _, _, d) = x.dims4()?;
    // max(s·x) = s·max(x) only for s > 0.
    if scale.is_nan() || scale <= 0.0 {
        candle_core::bail!("attention_softmax: the scale must be positive, got {scale}");
    }
    if keep.as_ref().is_some_and(|k| k.len() != n * d) {
        candle_core::bail!("attention_softmax: the mask is not N × keys");
    }
    apply(
        x,
        Softmax {
            d,
            scale,
            keys: keep.map(|k| (k, x.elem_count() / (n * d).max(1))),
        },
    )
}

fn apply(x: &Tensor, op: Softmax) -> candle_core::Result<Tensor> {
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[derive(Debug, Clone)]
struct Softmax {
    d: usize,
    scale: f64,
    /// The keys' mask (N × keys) and the rows of scores per item (heads × queries).
    keys: Option<(Arc<Vec<bool>>, usize)>,
}

impl Softmax {
    /// The mask of row `r`'s keys, `None` when every key counts.
    fn keep(&self, r: usize) -> Option<&[bool]> {
        self.keys
            .as_ref()
            .map(|(k, rows)| &k[(r / rows) * self.d..][..self.d])
    }

    fn min_rows(&self) -> usize {
        (MIN_VALUES_PER_TASK / self.d.max(1)).max(1)
    }

    fn forward<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let mut y = x.to_vec();
        y.par_chunks_mut(self.d.max(1))
            .enumerate()
            .with_min_len(self.min_rows())
            .for_each(|(r, y)| softmax_in_place(y, self.scale, self.keep(r)));
        y
    }

    fn backward<T: Float + Send + Sync>(&self, y: &[T], dy: &[T]) -> Vec<T> {
        let mut dx = dy.to_vec();
        dx.par_chunks_mut(self.d.max(1))
            .zip(y.par_chunks(self.d.max(1)))
            .with_min_len(self.min_rows())
            .for_each(|(g, y)| softmax_backward_in_place(g, y, self.scale));
        dx
    }
}

/// One row: x ← softmax(scale·x) over the kept keys (`keep`: `None` for all), 0 elsewhere.
pub(crate) fn softmax_in_place<T: Float>(x: &mut [T], scale: f64, keep: Option<&[bool]>) {
    // A row with no key to attend to is uniform, as transformers' all-lowest scores leave it.
    if keep.is_some_and(|k| !k.contains(&true)) {
        let u = T::one() / T::from(x.len()).unwrap();
        x.fill(u);
        return;
    }
    let scale = T::from(scale).unwrap();
    let kept = |j: usize| keep.is_none_or(|k| k[j]);
    // Subtracting the row's maximum keeps exp in range; softmax does not change.
    let max = x
        .iter()
        .enumerate()
        .filter(|&(j, _)| kept(j))
        .fold(T::neg_infinity(), |m, (_, &v)| m.max(v));
    let mut sum = T::zero();
    for (j, v) in x.iter_mut().enumerate() {
        *v = if kept(j) {
            (scale * (*v - max)).exp()
        } else {
            T::zero()
        };
        sum = sum + *v;
    }
    for v in x.iter_mut() {
        *v = *v / sum;
    }
}

/// One row's backward, read off the output y: g ← scale·y ⊙ (g − ⟨g, y⟩), g holding dy.
pub(crate) fn softmax_backward_in_place<T: Float>(g: &mut [T], y: &[T], scale: f64) {
    let scale = T::from(scale).unwrap();
    let dot = y
        .iter()
        .zip(g.iter())
        .fold(T::zero(), |s, (&a, &b)| s + a * b);
    for (g, &y) in g.iter_mut().zip(y) {
        *g = scale * y * (*g - dot);
    }
}

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "finelens-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run1(
            self.name(),
            (s, l),
            |x| self.forward(x),
            |x| self.forward(x),
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        Ok(Some(
            y.detach()
                .apply_op2_no_bwd(&grad, &Backward(self.clone()))?,
        ))
    }
}

/// dx from (y, dy).
struct Backward(Softmax);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        "finelens-softmax-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |y, dy| self.0.backward(y, dy),
            |y, dy| self.0.backward(y, dy),
        )?;
        Ok((out, l1.shape().clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, max_rel_diff, randn};
    use candle_core::{DType, Var};

    /// Softmax composed of candle ops (what `nn::softmax_last_dim` ran before this op).
    fn composed(x: &Tensor) -> Tensor {
        let last = candle_core::D::Minus1;
        let e = x
            .broadcast_sub(&x.max_keepdim(last).unwrap().detach())
            .unwrap()
            .exp()
            .unwrap();
        e.broadcast_div(&e.sum_keepdim(last).unwrap()).unwrap()
    }

    #[test]
    fn matches_the_composed_ops_and_finite_differences() {
        // Rows of attention scores (batch, heads, queries, keys), and a masked-like row with a
        // very negative entry.
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&randn((2, 3, 7, 13), 0.0, 3.0, dtype, 1)).unwrap();
            let r = randn((2, 3, 7, 13), 0.0, 1.0, dtype, 2);
            let (ours, reference) = (softmax_last_dim(&x).unwrap(), composed(&x));
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
        let x = Var::from_tensor(&randn((2, 5), 0.0, 1.0, DType::F64, 3)).unwrap();
        let r = randn((2, 5), 0.0, 1.0, DType::F64, 4);
        let g = (softmax_last_dim(&x).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours: Vec<f64> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut f = |p: &[f64]| -> f64 {
            let t = Tensor::from_slice(p, (2, 5), x.device()).unwrap();
            (softmax_last_dim(&t).unwrap() * &r)
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
        // A row with a -1e9 entry (a masked key): probability 0 there, no NaN.
        let m = Tensor::new(&[[0f32, -1e9, 1.0]], x.device()).unwrap();
        let p: Vec<Vec<f32>> = softmax_last_dim(&m).unwrap().to_vec2().unwrap();
        assert_eq!(p[0][1], 0.0);
        assert!((p[0][0] + p[0][2] - 1.0).abs() < 1e-6);
    }

    /// Attention's form: softmax(s·x + additive mask) as transformers composes it, the masked
    /// keys at the dtype's lowest value — in value and gradient, and by finite differences.
    #[test]
    fn attention_form_scales_and_masks_as_the_composed_ops() {
        let (n, heads, q, k) = (2, 3, 4, 5);
        // Item 0 sees every key; item 1 not keys 1 and 4.
        let keep: Vec<bool> = (0..n * k).map(|i| !matches!(i, 6 | 9)).collect();
        let scale = 1.0 / 8f64.sqrt();
        let composed_attention = |x: &Tensor| -> Tensor {
            let lowest = if x.dtype() == DType::F64 {
                f64::MIN
            } else {
                f32::MIN as f64
            };
            let additive: Vec<f64> = keep.iter().map(|&b| if b { 0.0 } else { lowest }).collect();
            let additive = Tensor::from_vec(additive, (n, 1, 1, k), x.device())
                .unwrap()
                .to_dtype(x.dtype())
                .unwrap();
            composed(&(x * scale).unwrap().broadcast_add(&additive).unwrap())
        };
        let mask = Some(Arc::new(keep.clone()));
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            let x = Var::from_tensor(&randn((n, heads, q, k), 0.0, 3.0, dtype, 5)).unwrap();
            let r = randn((n, heads, q, k), 0.0, 1.0, dtype, 6);
            let ours = attention_softmax(&x, scale, mask.clone()).unwrap();
            let reference = composed_attention(&x);
            assert!(max_rel_diff(&ours, &reference) < tol);
            let p: Vec<f64> = ours
                .to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert!(p[(heads * q) * k..]
                .chunks(k)
                .all(|row| row[1] == 0.0 && row[4] == 0.0));
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(max_rel_diff(g0.get(&x).unwrap(), g1.get(&x).unwrap()) < tol);
        }
        // A row with no key to attend to is uniform, as transformers' all-lowest row is.
        let none = Some(Arc::new(vec![false; k]));
        let u =
            attention_softmax(&randn((1, 1, 2, k), 0.0, 3.0, DType::F64, 9), 1.0, none).unwrap();
        let u: Vec<f64> = u.flatten_all().unwrap().to_vec1().unwrap();
        assert!(
            u.iter().all(|p| (p - 1.0 / k as f64).abs() < 1e-15),
            "{u:?}"
        );
        let x = randn((n, heads, q, k), 0.0, 1.0, DType::F64, 7);
        let r = randn((n, heads, q, k), 0.0, 1.0, DType::F64, 8);
        let v = Var::from_tensor(&x).unwrap();
        let g = (attention_softmax(&v, scale, mask.clone()).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours: Vec<f64> = g.get(&v).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut f = |p: &[f64]| -> f64 {
            let t = Tensor::from_slice(p, (n, heads, q, k), x.device()).unwrap();
            (attention_softmax(&t, scale, mask.clone()).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        for (j, a) in ours.iter().enumerate().step_by(7) {
            let e = central_difference(&mut f, &flat, j);
            assert!((a - e).abs() < 1e-7 * (1.0 + e.abs()), "x[{j}]: {a} vs {e}");
        }
    }
}
