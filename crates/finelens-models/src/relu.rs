//! ReLU as one parallel pass each way.
//!
//! candle's `relu` runs single-threaded, and its backward builds the mask from the input with four
//! more sweeps (`ge`, `zeros_like`, `to_dtype`, `mul`). Here the forward splits across the rayon
//! pool and the backward reads the mask off the output, dx = dy·[y > 0], as PyTorch's
//! `threshold_backward` does (so the gradient at exactly 0 is 0, PyTorch's convention; candle's
//! is 1).

use candle_core::{CpuStorage, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{run2, Pointwise};
use crate::rules::{backward_rule, BackwardRule, DEEPLIFT_EPS};

/// Values per rayon task: small tensors are not worth a split.
const CHUNK: usize = 1 << 14;

/// max(x, 0), element-wise; its backward follows the thread's [`BackwardRule`].
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    match backward_rule() {
        BackwardRule::Gradient | BackwardRule::Lrp => OP.apply(x),
        BackwardRule::GuidedBackprop => GUIDED.apply(x),
        BackwardRule::Deconvolution => DECONVOLUTION.apply(x),
        BackwardRule::DeepLiftRescale => {
            if x.dims().first().is_none_or(|n| !n.is_multiple_of(2)) {
                candle_core::bail!(
                    "relu: DeepLIFT needs a batch of inputs followed by as many references"
                );
            }
            RESCALE.apply(x)
        }
    }
}

/// The plain ReLU's backward outside the graph, dx = dy·[y > 0] from the output y: for a batch
/// norm that applies the ReLU itself ([`crate::batch_norm::batch_norm_train`]).
pub(crate) fn relu_backward(y: &Tensor, dy: &Tensor) -> candle_core::Result<Tensor> {
    OP.backward_of(y, dy)
}

/// relu(a + b) as one op: a residual block's last step. Under the plain gradient both operands
/// get dy·[y > 0] — one graph node and one sweep each way, where the sum and the ReLU were two
/// nodes (candle's add runs on the calling thread alone, and each node's input gradient is
/// zeros plus the gradient: an allocation and two more sweeps). Under the rules that change a
/// ReLU's backward it is the two ops.
pub fn add_relu(a: &Tensor, b: &Tensor) -> candle_core::Result<Tensor> {
    if backward_rule() != BackwardRule::Gradient {
        return relu(&(a + b)?);
    }
    if a.dims() != b.dims() {
        candle_core::bail!("add_relu: shapes {:?} and {:?} differ", a.dims(), b.dims());
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    if a.track_op() || b.track_op() {
        a.apply_op2(&b, AddRelu)
    } else {
        a.apply_op2_no_bwd(&b, &AddRelu)
    }
}

struct AddRelu;

impl CustomOp2 for AddRelu {
    fn name(&self) -> &'static str {
        "finelens-add-relu"
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
            add_relu_kernel,
            add_relu_kernel,
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let g = relu_backward(y, grad)?;
        Ok((a.track_op().then(|| g.clone()), b.track_op().then_some(g)))
    }
}

fn add_relu_kernel<T: Float + Send + Sync>(a: &[T], b: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); a.len()];
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| {
            for ((o, &a), &b) in o.iter_mut().zip(a).zip(b) {
                *o = (a + b).max(T::zero());
            }
        });
    out
}

static OP: Pointwise = Pointwise {
    names: ("finelens-relu", "finelens-relu-backward"),
    from_output: true,
    forward: (forward, forward),
    backward: (backward, backward),
};

static GUIDED: Pointwise = Pointwise {
    names: ("finelens-relu", "finelens-relu-guided-backward"),
    from_output: true,
    forward: (forward, forward),
    backward: (guided, guided),
};

static DECONVOLUTION: Pointwise = Pointwise {
    names: ("finelens-relu", "finelens-relu-deconvolution-backward"),
    from_output: true,
    forward: (forward, forward),
    backward: (deconvolution, deconvolution),
};

static RESCALE: Pointwise = Pointwise {
    names: ("finelens-relu", "finelens-relu-rescale-backward"),
    from_output: false,
    forward: (forward, forward),
    backward: (rescale, rescale),
};

fn forward<T: Float + Send + Sync>(x: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); x.len()];
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| {
            for (o, &v) in o.iter_mut().zip(x) {
                *o = if v > T::zero() { v } else { T::zero() };
            }
        });
    out
}

fn backward<T: Float + Send + Sync>(y: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(o, (y, dy))| {
            for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
                *o = if y > T::zero() { d } else { T::zero() };
            }
        });
    out
}

/// dx = dy·[y > 0]·[dy > 0].
fn guided<T: Float + Send + Sync>(y: &[T], dy: &[T]) -> Vec<T> {
    let mut out = vec![T::zero(); y.len()];
    out.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(o, (y, dy))| {
            for ((o, &y), &d) in o.iter_mut().zip(y).zip(dy) {
                *o = if y > T::zero() && d > T::zero() {
                    d
                } else {
                    T::zero()
                };
            }
        });
    out
}

/// dx = max(dy, 0).
fn deconvolution<T: Float + Send + Sync>(_y: &[T], dy: &[T]) -> Vec<T> {
    forward(dy)
}

/// DeepLIFT's rescale rule over a batch of inputs and then references: both halves get the
/// multiplier (relu(x) − relu(x′)) / (x − x′) of their pair, or the gradient's [x > 0] where
/// |x − x′| < eps.
fn rescale<T: Float + Send + Sync>(x: &[T], dy: &[T]) -> Vec<T> {
    let half = x.len() / 2;
    let eps = T::from(DEEPLIFT_EPS).unwrap();
    let relu = |v: T| if v > T::zero() { v } else { T::zero() };
    let (xi, xr) = x.split_at(half);
    let multipliers: Vec<T> = xi
        .par_iter()
        .zip(xr)
        .with_min_len(CHUNK)
        .map(|(&a, &b)| {
            let d = a - b;
            if d.abs() < eps {
                if a > T::zero() {
                    T::one()
                } else {
                    T::zero()
                }
            } else {
                (relu(a) - relu(b)) / d
            }
        })
        .collect();
    let mut out = vec![T::zero(); x.len()];
    for (o, dy) in out.chunks_mut(half.max(1)).zip(dy.chunks(half.max(1))) {
        o.par_iter_mut()
            .zip(dy.par_iter().zip(&multipliers))
            .with_min_len(CHUNK)
            .for_each(|(o, (&d, &m))| *o = d * m);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, randn};
    use candle_core::{DType, Var};

    #[test]
    fn matches_candle_away_from_zero_and_masks_by_the_output() {
        for dtype in [DType::F32, DType::F64] {
            // Odd length over several rayon chunks.
            let x = Var::from_tensor(&randn((3, 5, 61, 59), 0.0, 1.0, dtype, 9)).unwrap();
            let r = randn(x.dims(), 0.0, 1.0, dtype, 10);
            let ours = relu(&x).unwrap();
            let theirs = x.relu().unwrap();
            assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&theirs * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert_eq!(max_abs_diff(g0.get(&x).unwrap(), g1.get(&x).unwrap()), 0.0);
        }
        // At exactly 0 the gradient is 0 (PyTorch's convention).
        let x =
            Var::from_tensor(&Tensor::new(&[-1f32, 0.0, 2.0], &candle_core::Device::Cpu).unwrap())
                .unwrap();
        let g = relu(&x).unwrap().sum_all().unwrap().backward().unwrap();
        assert_eq!(
            g.get(&x).unwrap().to_vec1::<f32>().unwrap(),
            vec![0.0, 0.0, 1.0]
        );
        assert!(!relu(&x.as_tensor().detach()).unwrap().track_op());
    }

    /// relu(a + b) as one op against the sum then the ReLU: the same values and both operands'
    /// gradients, in f32 and f64 over several rayon chunks; an untracked operand gets none, and
    /// under a rule that changes the ReLU's backward it is the two ops (guided backprop's mask).
    #[test]
    fn add_relu_is_the_sum_then_the_relu() {
        for dtype in [DType::F32, DType::F64] {
            let a = Var::from_tensor(&randn((3, 5, 61, 59), 0.0, 1.0, dtype, 11)).unwrap();
            let b = Var::from_tensor(&randn((3, 5, 61, 59), 0.0, 1.0, dtype, 12)).unwrap();
            let r = randn(a.dims(), 0.0, 1.0, dtype, 13);
            let ours = add_relu(&a, &b).unwrap();
            let composed = relu(&(a.as_tensor() + b.as_tensor()).unwrap()).unwrap();
            assert_eq!(max_abs_diff(&ours, &composed), 0.0);
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&composed * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&a, &b] {
                assert_eq!(max_abs_diff(g0.get(v).unwrap(), g1.get(v).unwrap()), 0.0);
            }
            let frozen = b.as_tensor().detach();
            let g = (add_relu(&a, &frozen).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            assert!(g.get(&frozen).is_none());
            assert_eq!(max_abs_diff(g.get(&a).unwrap(), g0.get(&a).unwrap()), 0.0);
        }
        use crate::rules::{with_backward_rule, BackwardRule};
        let dev = &candle_core::Device::Cpu;
        let a = Var::from_tensor(&Tensor::new(&[1.0f64, 2.0, -3.0], dev).unwrap()).unwrap();
        let b = Tensor::new(&[0.5f64, -1.0, 1.0], dev).unwrap();
        let dy = Tensor::new(&[1.0f64, -1.0, 1.0], dev).unwrap();
        let g = with_backward_rule(BackwardRule::GuidedBackprop, || {
            (add_relu(&a, &b).unwrap() * &dy)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap()
        });
        assert_eq!(
            g.get(&a).unwrap().to_vec1::<f64>().unwrap(),
            vec![1.0, 0.0, 0.0]
        );
        assert!(add_relu(&a, &b.reshape((3, 1)).unwrap()).is_err());
    }

    /// The rules' backward passes, element by element: guided dy·[y > 0]·[dy > 0],
    /// deconvolution max(dy, 0), and DeepLIFT's (relu(x) − relu(x′))/(x − x′) for both halves of
    /// an input–reference batch, the gradient's [x > 0] where x = x′.
    #[test]
    fn the_rules_backward_passes_have_their_closed_forms() {
        use crate::rules::{with_backward_rule, BackwardRule};
        let dev = &candle_core::Device::Cpu;
        // Inputs, then references: crossing zero, both positive, both negative, equal.
        let x = Tensor::new(&[[2.0f64, 3.0, -1.0, 0.5], [-2.0, 1.0, -4.0, 0.5]], dev).unwrap();
        let dy = Tensor::new(&[[1.0f64, -2.0, 3.0, 4.0], [0.5, 0.5, 0.5, -1.0]], dev).unwrap();
        let grad = |rule| -> Vec<Vec<f64>> {
            let v = Var::from_tensor(&x).unwrap();
            let y = with_backward_rule(rule, || relu(&v)).unwrap();
            let g = (y * &dy).unwrap().sum_all().unwrap().backward().unwrap();
            g.get(&v).unwrap().to_vec2().unwrap()
        };
        assert_eq!(
            grad(BackwardRule::GuidedBackprop),
            [[1.0, 0.0, 0.0, 4.0], [0.0, 0.5, 0.0, 0.0]]
        );
        assert_eq!(
            grad(BackwardRule::Deconvolution),
            [[1.0, 0.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.0]]
        );
        // Multipliers: (2 − 0)/(2 − −2) = ½, (3 − 1)/(3 − 1) = 1, 0, and [0.5 > 0] = 1.
        let m = [0.5, 1.0, 0.0, 1.0];
        let want: Vec<Vec<f64>> = dy
            .to_vec2::<f64>()
            .unwrap()
            .iter()
            .map(|row| row.iter().zip(m).map(|(d, m)| d * m).collect())
            .collect();
        assert_eq!(grad(BackwardRule::DeepLiftRescale), want);
    }
}
