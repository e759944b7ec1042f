//! A dense layer, y = x·Wᵀ + b (`torch.nn.Linear`), as one op with a backward that computes only
//! the gradients that are needed.
//!
//! Composed of candle ops the layer is a matmul and a broadcast add: the add is a second pass
//! over the output, its backward a strided single-threaded reduction over the rows (together a
//! tenth of a BERT fine-tuning step), and the matmul's backward always computes both gradients —
//! the weight's even when the weight is a plain (frozen) tensor, as when explaining or training
//! only the upper layers. Here, with x: rows × in, W: out × in:
//!
//! * forward: Y = x·Wᵀ, the GEMM starting from the bias in every row (no extra pass);
//! * input:   dx = dY·W, only when x is tracked;
//! * weight:  dW = dYᵀ·x, only when W is tracked (a trainable `Var`);
//! * bias:    db = Σ_rows dY, parallel over blocks of columns, summed in f64 in row order.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{gemm_into, run1, run2, run3, View};

/// `F.linear(x, weight, bias)` for a 2-D `x` (rows × in), `weight` (out × in), `bias` (out).
pub fn linear(x: &Tensor, weight: &Tensor, bias: &Tensor) -> candle_core::Result<Tensor> {
    let (rows, inp) = x.dims2()?;
    let (out, w_in) = weight.dims2()?;
    if w_in != inp || bias.dims() != [out] {
        candle_core::bail!(
            "linear: a {out}×{w_in} weight and a bias of shape {:?} do not fit {inp} inputs",
            bias.dims()
        );
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let op = Dense {
        rows,
        inp,
        out,
        lrp: None,
    };
    if x.track_op() || weight.track_op() || bias.track_op() {
        let lrp = crate::rules::lrp_dense();
        x.apply_op3(&weight, &bias, Dense { lrp, ..op })
    } else {
        x.apply_op3_no_bwd(&weight, &bias, &op)
    }
}

/// The shapes of one dense layer.
#[derive(Debug, Clone, Copy)]
struct Dense {
    rows: usize,
    inp: usize,
    out: usize,
    /// The LRP rule it was built under ([`crate::rules`]): the ε-rule, input relevance only.
    lrp: Option<crate::rules::LrpLayer>,
}

/// Columns per parallel task of the bias gradient: a cache line or two of each row.
const BLOCK: usize = 32;

impl Dense {
    fn forward<T: Float + Send + Sync + 'static>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let mut y = Vec::with_capacity(self.rows * self.out);
        for _ in 0..self.rows {
            y.extend_from_slice(b);
        }
        gemm_into(
            &mut y,
            self.out,
            View::rows(x, self.rows, self.inp),
            View::rows(w, self.out, self.inp).t(),
            true,
        );
        y
    }

    fn input_grad<T: Float + 'static>(&self, dy: &[T], w: &[T]) -> Vec<T> {
        let mut dx = vec![T::zero(); self.rows * self.inp];
        gemm_into(
            &mut dx,
            self.inp,
            View::rows(dy, self.rows, self.out),
            View::rows(w, self.out, self.inp),
            false,
        );
        dx
    }

    fn weight_grad<T: Float + 'static>(&self, dy: &[T], x: &[T]) -> Vec<T> {
        let mut dw = vec![T::zero(); self.out * self.inp];
        gemm_into(
            &mut dw,
            self.inp,
            View::rows(dy, self.rows, self.out).t(),
            View::rows(x, self.rows, self.inp),
            false,
        );
        dw
    }

    fn bias_grad<T: Float + Send + Sync>(&self, dy: &[T]) -> Vec<T> {
        let mut db = vec![T::zero(); self.out];
        db.par_chunks_mut(BLOCK)
            .enumerate()
            .for_each(|(block, dst)| {
                let first = block * BLOCK;
                let mut acc = [0f64; BLOCK];
                for row in dy.chunks_exact(self.out) {
                    for (a, v) in acc.iter_mut().zip(&row[first..first + dst.len()]) {
                        *a += v.to_f64().unwrap_or(f64::NAN);
                    }
                }
                for (d, a) in dst.iter_mut().zip(acc) {
                    *d = T::from(a).unwrap_or_else(T::nan);
                }
            });
        db
    }
}

impl CustomOp3 for Dense {
    fn name(&self) -> &'static str {
        "finelens-linear"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = run3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| self.forward(x, w, b),
            |x, w, b| self.forward(x, w, b),
        )?;
        Ok((out, Shape::from((self.rows, self.out))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(rule) = self.lrp {
            // LRP-ε: g_x = Wᵀ(g ⊙ z / (z + ε·sign z)), z = y with its bias.
            let z = y.detach();
            let s = crate::rules::lrp_message(&grad.detach(), &z, &z, rule.epsilon())?;
            let dx = s.apply_op2_no_bwd(&w.detach(), &Grad(*self, Wrt::Input))?;
            return Ok((Some(dx), None, None));
        }
        // Gradients are values, never graph: detach so that no gradient keeps a forward alive.
        let grad = grad.detach().contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(&w.detach(), &Grad(*self, Wrt::Input))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = grad.apply_op2_no_bwd(&x.detach(), &Grad(*self, Wrt::Weight))?;
            crate::backprop::keep(w, dw)?
        } else {
            None
        };
        let db = if b.track_op() {
            crate::backprop::keep(b, grad.apply_op1_no_bwd(&BiasGrad(*self))?)?
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

#[derive(Clone, Copy)]
enum Wrt {
    /// dx from (dY, W).
    Input,
    /// dW from (dY, x).
    Weight,
}

struct Grad(Dense, Wrt);

impl CustomOp2 for Grad {
    fn name(&self) -> &'static str {
        match self.1 {
            Wrt::Input => "finelens-linear-input-grad",
            Wrt::Weight => "finelens-linear-weight-grad",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.0;
        let (out, shape) = match self.1 {
            Wrt::Input => (
                run2(
                    self.name(),
                    (s1, l1),
                    (s2, l2),
                    |dy, w| d.input_grad(dy, w),
                    |dy, w| d.input_grad(dy, w),
                )?,
                (d.rows, d.inp),
            ),
            Wrt::Weight => (
                run2(
                    self.name(),
                    (s1, l1),
                    (s2, l2),
                    |dy, x| d.weight_grad(dy, x),
                    |dy, x| d.weight_grad(dy, x),
                )?,
                (d.out, d.inp),
            ),
        };
        Ok((out, Shape::from(shape)))
    }
}

/// db from dY.
struct BiasGrad(Dense);

impl CustomOp1 for BiasGrad {
    fn name(&self) -> &'static str {
        "finelens-linear-bias-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let d = self.0;
        let out = run1(
            self.name(),
            (s, l),
            |dy| d.bias_grad(dy),
            |dy| d.bias_grad(dy),
        )?;
        Ok((out, Shape::from(d.out)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::max_rel_diff;
    use candle_core::{DType, Device, Var};

    /// The composed reference: candle's matmul and broadcast add.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor) -> Tensor {
        x.matmul(&w.t().unwrap()).unwrap().broadcast_add(b).unwrap()
    }

    fn random(shape: &[usize], seed: u64, dtype: DType) -> Var {
        Var::from_tensor(&crate::testutil::randn(shape, 0.0, 1.0, dtype, seed)).unwrap()
    }

    /// Forward and the three gradients agree with the composed ops: to rounding in f64, to 1e-5
    /// relative in f32, on shapes that are not multiples of the bias block or the GEMM tiles.
    #[test]
    fn forward_and_gradients_match_the_composed_ops() {
        for (dtype, tol) in [(DType::F64, 1e-12), (DType::F32, 1e-5)] {
            for (rows, inp, out) in [(1, 1, 1), (7, 33, 65), (130, 384, 96), (64, 40, 1536)] {
                let x = random(&[rows, inp], 1, dtype);
                let w = random(&[out, inp], 2, dtype);
                let b = random(&[out], 3, dtype);
                // A weighted sum, so that every output's gradient differs.
                let probe = random(&[rows, out], 4, dtype);
                let ours = linear(&x, &w, &b).unwrap();
                let theirs = reference(&x, &w, &b);
                assert!(
                    max_rel_diff(&ours, &theirs) < tol,
                    "{dtype:?} {rows}×{inp}→{out}"
                );
                let g1 = (ours * probe.as_tensor()).unwrap().sum_all().unwrap();
                let g2 = (theirs * probe.as_tensor()).unwrap().sum_all().unwrap();
                let (g1, g2) = (g1.backward().unwrap(), g2.backward().unwrap());
                for v in [&x, &w, &b] {
                    let (a, e) = (g1.get(v).unwrap(), g2.get(v).unwrap());
                    assert!(
                        max_rel_diff(a, e) < tol,
                        "{dtype:?} {rows}×{inp}→{out}: {}",
                        max_rel_diff(a, e)
                    );
                }
            }
        }
    }

    /// A frozen (plain) weight and bias get no gradient and cost none; the input's is unchanged.
    #[test]
    fn a_frozen_weight_gets_no_gradient() {
        let x = random(&[5, 8], 1, DType::F32);
        let (w, b) = (
            random(&[3, 8], 2, DType::F32).as_detached_tensor(),
            random(&[3], 3, DType::F32).as_detached_tensor(),
        );
        let y = linear(&x, &w, &b).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
        let want = reference(&x, &w, &b).sum_all().unwrap().backward().unwrap();
        assert!(max_rel_diff(g.get(&x).unwrap(), want.get(&x).unwrap()) < 1e-6);
        // Nothing tracked: no graph at all.
        assert!(!linear(&x.as_detached_tensor(), &w, &b).unwrap().track_op());
    }

    #[test]
    fn shapes_that_do_not_fit_are_refused() {
        let x = Tensor::zeros((2, 4), DType::F32, &Device::Cpu).unwrap();
        let w = Tensor::zeros((3, 5), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap();
        assert!(linear(&x, &w, &b).is_err());
    }
}
