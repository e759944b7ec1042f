//! Backpropagation for training: candle's backward, with the gradients our kernels compute for
//! trainable parameters handed to the gradient store as they are.
//!
//! Candle's backward gives every input of an op its gradient as `zeros + gradient` (an
//! allocation, a zero fill and an add, on the calling thread alone; huggingface/candle#3578 and
//! #3822, both open, would store the first gradient as it is). For a parameter that one op uses,
//! that is a copy of a result already in hand: for a ResNet-18's 11 M weights, 45 MB zeroed,
//! read twice and written each step, ≈ 4.4 ms of single-threaded work (min of 5 steady runs of
//! zeros + add over its 62 parameter shapes). Inside [`backward`], the convolution and linear ops
//! keep a parameter's gradient here instead of returning it to candle, summing if a parameter is
//! used more than once, and [`backward`] moves the sums into the store afterwards. Outside it —
//! explaining, tests, anyone calling candle's `backward` — nothing changes.

use std::cell::RefCell;
use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Tensor, TensorId};

type Kept = HashMap<TensorId, Tensor>;

thread_local! {
    /// The gradients kept during a [`backward`] on this thread (candle runs every op's backward
    /// on the thread that called it), or None outside one.
    static KEPT: RefCell<Option<Kept>> = const { RefCell::new(None) };
}

/// `loss.backward()`, with the gradients of trainable parameters (candle `Var`s) that finelens's
/// convolution and linear ops compute placed in the store directly. The store holds the same
/// gradients as candle's; a parameter that also gets gradients from other ops has them summed
/// in another order (floating-point rounding apart, the same).
pub fn backward(loss: &Tensor) -> candle_core::Result<GradStore> {
    // Restores what was there (None, or an outer call's) however the backward ends, a panic
    // included: a kept map left behind would swallow later plain backwards' gradients.
    struct Scope(Option<Kept>);
    impl Drop for Scope {
        fn drop(&mut self) {
            let outer = self.0.take();
            KEPT.with(|k| *k.borrow_mut() = outer);
        }
    }
    let scope = Scope(KEPT.with(|k| k.borrow_mut().replace(Kept::new())));
    let result = loss.backward();
    let kept = KEPT.with(|k| k.borrow_mut().take()).unwrap_or_default();
    drop(scope);
    let mut grads = result?;
    for (id, grad) in kept {
        let grad = match grads.get_id(id) {
            Some(other) => (other + &grad)?,
            None => grad,
        };
        grads.insert_id(id, grad);
    }
    Ok(grads)
}

/// For an op's backward: `grad` for `param` kept inside a [`backward`] when `param` is a trainable
/// parameter (None returned, for candle to skip), else handed back to be returned to candle.
pub(crate) fn keep(param: &Tensor, grad: Tensor) -> candle_core::Result<Option<Tensor>> {
    if !param.is_variable() {
        return Ok(Some(grad));
    }
    KEPT.with(|k| {
        let mut k = k.borrow_mut();
        let Some(kept) = k.as_mut() else {
            return Ok(Some(grad));
        };
        let sum = match kept.remove(&param.id()) {
            Some(earlier) => (earlier + grad)?,
            None => grad,
        };
        kept.insert(param.id(), sum);
        Ok(None)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use candle_core::{DType, Var};

    /// The same gradients as candle's backward, bit for bit, for a convolution's kernel used
    /// twice (kept and summed), one used once, a linear layer's weight and bias, and an input
    /// (not a parameter: through candle as always); and none kept once the call is over.
    #[test]
    fn gives_candles_gradients() {
        let x = Var::from_tensor(&randn((2, 3, 6, 6), 0.0, 1.0, DType::F64, 1)).unwrap();
        let k1 = Var::from_tensor(&randn((3, 3, 3, 3), 0.0, 0.3, DType::F64, 2)).unwrap();
        let k2 = Var::from_tensor(&randn((4, 3, 3, 3), 0.0, 0.3, DType::F64, 3)).unwrap();
        let w = Var::from_tensor(&randn((5, 4 * 36), 0.0, 0.1, DType::F64, 4)).unwrap();
        let b = Var::from_tensor(&randn(5, 0.0, 0.1, DType::F64, 5)).unwrap();
        let loss = || {
            let h = crate::conv::conv2d(&x, &k1, 1, 1).unwrap();
            let h = crate::conv::conv2d(&h.relu().unwrap(), &k1, 1, 1).unwrap();
            let h = crate::conv::conv2d(&h, &k2, 1, 1).unwrap();
            let h = h.flatten_from(1).unwrap();
            let y = crate::linear::linear(&h, &w, &b).unwrap();
            // k2 also through candle's own ops: its kept gradient and candle's are summed.
            (y.sqr().unwrap().sum_all().unwrap() + k2.sqr().unwrap().sum_all().unwrap()).unwrap()
        };
        let theirs = loss().backward().unwrap();
        let ours = backward(&loss()).unwrap();
        for (name, v) in [("x", &x), ("k1", &k1), ("k2", &k2), ("w", &w), ("b", &b)] {
            let flat = |g: &GradStore| -> Vec<f64> {
                g.get(v).unwrap().flatten_all().unwrap().to_vec1().unwrap()
            };
            let (a, e) = (flat(&ours), flat(&theirs));
            let err = a
                .iter()
                .zip(&e)
                .map(|(a, e)| (a - e).abs() / (1.0 + e.abs()))
                .fold(0.0, f64::max);
            assert!(err < 1e-12, "{name}: off by {err}");
        }
        KEPT.with(|k| assert!(k.borrow().is_none(), "a kept map outlived the call"));
        // A plain backward afterwards is candle's own.
        assert!(loss().backward().unwrap().get(&k1).is_some());
    }

    /// Inside a backward a parameter's gradient is kept (and summed), anything else's handed
    /// back; outside one, everything is handed back.
    #[test]
    fn keeps_parameters_only_inside_a_backward() {
        let v = Var::from_tensor(&randn(3, 0.0, 1.0, DType::F64, 1)).unwrap();
        let plain = randn(3, 0.0, 1.0, DType::F64, 2);
        let g = randn(3, 0.0, 1.0, DType::F64, 3);
        assert!(keep(&v, g.clone()).unwrap().is_some());
        KEPT.with(|k| *k.borrow_mut() = Some(Kept::new()));
        assert!(keep(&v, g.clone()).unwrap().is_none());
        assert!(keep(&v, g.clone()).unwrap().is_none());
        assert!(keep(&plain, g.clone()).unwrap().is_some());
        let kept = KEPT.with(|k| k.borrow_mut().take()).unwrap();
        assert_eq!(kept.len(), 1);
        let twice: Vec<f64> = (&g * 2.0).unwrap().to_vec1().unwrap();
        assert_eq!(kept[&v.id()].to_vec1::<f64>().unwrap(), twice);
    }

    /// A backward that panics inside an op leaves nothing kept behind, so a later plain backward
    /// keeps its gradients.
    #[test]
    fn a_panicking_backward_keeps_nothing() {
        struct Boom;
        impl candle_core::CustomOp1 for Boom {
            fn name(&self) -> &'static str {
                "boom"
            }
            fn cpu_fwd(
                &self,
                s: &candle_core::CpuStorage,
                l: &candle_core::Layout,
            ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
                Ok((s.clone(), l.shape().clone()))
            }
            fn bwd(
                &self,
                _: &Tensor,
                _: &Tensor,
                _: &Tensor,
            ) -> candle_core::Result<Option<Tensor>> {
                panic!("boom")
            }
        }
        let x = Var::from_tensor(&randn((1, 2, 4, 4), 0.0, 1.0, DType::F64, 1)).unwrap();
        let k = Var::from_tensor(&randn((2, 2, 3, 3), 0.0, 0.3, DType::F64, 2)).unwrap();
        // The convolution's backward runs (and keeps k's gradient) before Boom's panics.
        let y = crate::conv::conv2d(&x, &k, 1, 1).unwrap();
        let loss = y.apply_op1(Boom).unwrap().sum_all().unwrap();
        let y2 = crate::conv::conv2d(&x, &k, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap();
        let loss = (loss + y2).unwrap();
        let run = std::panic::AssertUnwindSafe(|| backward(&loss));
        assert!(std::panic::catch_unwind(run).is_err());
        KEPT.with(|kept| assert!(kept.borrow().is_none()));
        let plain = crate::conv::conv2d(&x, &k, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap();
        assert!(plain.backward().unwrap().get(&k).is_some());
    }
}
