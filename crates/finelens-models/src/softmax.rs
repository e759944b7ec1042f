//! Softmax over the last dimension as one op with a hand-written backward.
//!
//! Composed of candle ops (max, subtract, exp, sum, divide) it is five passes forward and more
//! backward over every attention score; here each row is one pass each way, rows in parallel.
//! With y = softmax(x) over a row, the backward is dx = y ⊙ (dy − ⟨dy, y⟩), read off the output.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{run1, run2};

/// Rows per rayon task at least, so that short rows are not a task each.
const MIN_VALUES_PER_TASK: usize = 4096;

/// softmax(x) over the last dimension, differentiable.
pub fn softmax_last_dim(x: &Tensor) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    let x = x.contiguous()?;
    if x.track_op() {
        x.apply_op1(Softmax { d })
    } else {
        x.apply_op1_no_bwd(&Softmax { d })
    }
}

#[derive(Debug, Clone, Copy)]
struct Softmax {
    d: usize,
}

impl Softmax {
    fn min_rows(&self) -> usize {
        (MIN_VALUES_PER_TASK / self.d.max(1)).max(1)
    }

    fn forward<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(self.d.max(1))
            .zip(x.par_chunks(self.d.max(1)))
            .with_min_len(self.min_rows())
            .for_each(|(y, x)| {
                // Subtracting the row's maximum keeps exp in range; softmax does not change.
                let max = x.iter().fold(T::neg_infinity(), |m, &v| m.max(v));
                let mut sum = T::zero();
                for (y, &v) in y.iter_mut().zip(x) {
                    *y = (v - max).exp();
                    sum = sum + *y;
                }
                for y in y.iter_mut() {
                    *y = *y / sum;
                }
            });
        y
    }

    fn backward<T: Float + Send + Sync>(&self, y: &[T], dy: &[T]) -> Vec<T> {
        let mut dx = vec![T::zero(); y.len()];
        dx.par_chunks_mut(self.d.max(1))
            .zip(
                y.par_chunks(self.d.max(1))
                    .zip(dy.par_chunks(self.d.max(1))),
            )
            .with_min_len(self.min_rows())
            .for_each(|(dx, (y, dy))| {
                let dot = y.iter().zip(dy).fold(T::zero(), |s, (&a, &b)| s + a * b);
                for ((dx, &y), &dy) in dx.iter_mut().zip(y).zip(dy) {
                    *dx = y * (dy - dot);
                }
            });
        dx
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
        Ok(Some(y.detach().apply_op2_no_bwd(&grad, &Backward(*self))?))
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
}
