//! ReLU as one parallel pass each way.
//!
//! candle's `relu` runs single-threaded, and its backward builds the mask from the input with four
//! more sweeps (`ge`, `zeros_like`, `to_dtype`, `mul`). Here the forward splits across the rayon
//! pool and the backward reads the mask off the output, dx = dy·[y > 0], as PyTorch's
//! `threshold_backward` does (so the gradient at exactly 0 is 0, PyTorch's convention; candle's
//! is 1).

use candle_core::Tensor;
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::Pointwise;

/// Values per rayon task: small tensors are not worth a split.
const CHUNK: usize = 1 << 14;

/// max(x, 0), element-wise.
pub fn relu(x: &Tensor) -> candle_core::Result<Tensor> {
    OP.apply(x)
}

static OP: Pointwise = Pointwise {
    names: ("finelens-relu", "finelens-relu-backward"),
    from_output: true,
    forward: (forward, forward),
    backward: (backward, backward),
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
}
