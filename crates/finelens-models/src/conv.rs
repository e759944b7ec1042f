//! 2-D convolution whose backward computes only the gradients that are needed, and computes the
//! input gradient as one GEMM plus a col2im scatter.
//!
//! candle 0.11's conv backward always computes both gradients: the kernel's even when the kernel
//! is a plain (frozen) tensor, and the input's, through a direct-loop `conv_transpose2d`, even when
//! the input is an image that needs none (see shared/CANDLE-NOTES.md). Explaining a model wants the
//! input gradient only; training never wants the stem's input gradient. Here the forward is
//! candle's own (im2col + GEMM) on detached operands, and a custom op routes the gradient:
//!
//! * input:  dX = col2im(Wᵀ · dY), W reshaped to C_out × (C_in·k·k): the adjoint of im2col + GEMM;
//! * kernel: dW = X ⋆ dY (candle's formula), only when the kernel is tracked (a trainable `Var`).

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// `F.conv2d(x, weight, stride=stride, padding=padding)` (no bias, no dilation, no groups) with a
/// backward that skips gradients nobody asked for.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let y = x.detach().conv2d(&weight.detach(), padding, stride, 1, 1)?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    x.apply_op3(weight, &y, ConvGrad { stride, padding })
}

/// Returns the precomputed convolution (its third operand) and, in backward, the gradients of the
/// first two.
struct ConvGrad {
    stride: usize,
    padding: usize,
}

impl CustomOp3 for ConvGrad {
    fn name(&self) -> &'static str {
        "finelens-conv2d"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        y: &CpuStorage,
        ly: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let Some((start, end)) = ly.contiguous_offsets() else {
            candle_core::bail!("finelens-conv2d: the convolution output must be contiguous");
        };
        let out = match y {
            CpuStorage::F32(v) => CpuStorage::F32(v[start..end].to_vec()),
            CpuStorage::F64(v) => CpuStorage::F64(v[start..end].to_vec()),
            other => candle_core::bail!(
                "finelens-conv2d: only f32 and f64 are supported, got {:?}",
                other.dtype()
            ),
        };
        Ok((out, ly.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Gradients are values, never graph: detach so that no gradient keeps a forward alive.
        let grad = grad.detach();
        let dx = if x.track_op() {
            Some(self.input_grad(&grad, &weight.detach(), x.dims4()?)?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            Some(self.kernel_grad(&grad, &x.detach(), weight.dims4()?)?)
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

impl ConvGrad {
    /// dX = col2im(Wᵀ · dY): one GEMM over the whole batch, then a scatter-add.
    fn input_grad(
        &self,
        grad: &Tensor,
        weight: &Tensor,
        (n, c_in, h, w): (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let (c_out, _, k, _) = weight.dims4()?;
        let (_, _, oh, ow) = grad.dims4()?;
        // dY as C_out × (N·L), L = oh·ow, so that a single GEMM covers the batch.
        let g = grad
            .transpose(0, 1)?
            .contiguous()?
            .reshape((c_out, n * oh * ow))?;
        let cols = weight
            .reshape((c_out, c_in * k * k))?
            .t()?
            .matmul(&g)?
            .contiguous()?;
        cols.apply_op1_no_bwd(&Col2Im {
            n,
            c: c_in,
            h,
            w,
            k,
            stride: self.stride,
            padding: self.padding,
            oh,
            ow,
        })
    }

    /// dW = X ⋆ dY with batch and channels swapped (candle's own formula), cropped to k × k when
    /// the stride leaves a remainder.
    fn kernel_grad(
        &self,
        grad: &Tensor,
        x: &Tensor,
        (_, _, kh, kw): (usize, usize, usize, usize),
    ) -> candle_core::Result<Tensor> {
        let g = x
            .transpose(0, 1)?
            .conv2d(&grad.transpose(0, 1)?, self.padding, 1, self.stride, 1)?
            .transpose(0, 1)?;
        let (_, _, gh, gw) = g.dims4()?;
        if gh != kh || gw != kw {
            g.narrow(2, 0, kh)?.narrow(3, 0, kw)?.contiguous()
        } else {
            g.contiguous()
        }
    }
}

/// The adjoint of im2col: sums each column entry back into the input cell it was read from.
/// Input: (C·k·k) × (N·oh·ow), rows ordered (c, ky, kx) like a kernel reshaped to C_out × C·k·k.
struct Col2Im {
    n: usize,
    c: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Col2Im {
    fn run<T: Float + Send + Sync + std::ops::AddAssign>(&self, cols: &[T]) -> Vec<T> {
        let Col2Im {
            n,
            c,
            h,
            w,
            k,
            stride,
            padding,
            oh,
            ow,
        } = *self;
        let l = oh * ow;
        let row_len = n * l;
        let mut out = vec![T::zero(); n * c * h * w];
        // One output plane per task: planes are disjoint, so the scatter needs no atomics.
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, o)| {
                let (img, ch) = (plane / c, plane % c);
                for ky in 0..k {
                    for kx in 0..k {
                        let row = &cols[((ch * k + ky) * k + kx) * row_len + img * l..][..l];
                        for oy in 0..oh {
                            let iy = (oy * stride + ky) as isize - padding as isize;
                            if iy < 0 || iy >= h as isize {
                                continue;
                            }
                            let dst = &mut o[iy as usize * w..][..w];
                            let src = &row[oy * ow..][..ow];
                            for (ox, &v) in src.iter().enumerate() {
                                let ix = (ox * stride + kx) as isize - padding as isize;
                                if ix >= 0 && ix < w as isize {
                                    dst[ix as usize] += v;
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Col2Im {
    fn name(&self) -> &'static str {
        "finelens-col2im"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let expected = (self.c * self.k * self.k, self.n * self.oh * self.ow);
        if l.shape().dims() != [expected.0, expected.1] {
            candle_core::bail!(
                "finelens-col2im: expected columns of shape {expected:?}, got {:?}",
                l.shape()
            );
        }
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("finelens-col2im: columns must be contiguous");
        };
        let shape = Shape::from((self.n, self.c, self.h, self.w));
        match s {
            CpuStorage::F32(v) => Ok((CpuStorage::F32(self.run(&v[start..end])), shape)),
            CpuStorage::F64(v) => Ok((CpuStorage::F64(self.run(&v[start..end])), shape)),
            other => candle_core::bail!(
                "finelens-col2im: only f32 and f64 are supported, got {:?}",
                other.dtype()
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::randn;
    use candle_core::{DType, Var};

    /// (input N×C×H×W, C_out, k, stride, padding): the ResNet shapes (7×7/2 stem, 3×3/1 and /2,
    /// 1×1/2 downsample) on odd sizes where a stride leaves cells that no window reads.
    type Case = ((usize, usize, usize, usize), usize, usize, usize, usize);
    const CASES: [Case; 6] = [
        ((2, 3, 11, 9), 4, 7, 2, 3),
        ((2, 4, 7, 7), 5, 3, 1, 1),
        ((3, 4, 9, 8), 6, 3, 2, 1),
        ((2, 6, 7, 7), 3, 1, 2, 0),
        ((1, 2, 5, 6), 3, 3, 3, 0),
        ((2, 3, 6, 5), 2, 2, 1, 0),
    ];

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar()
            .unwrap()
    }

    /// Both gradients against central finite differences of L = Σ r ⊙ conv(x, w) in f64 (exact up
    /// to rounding: L is linear in each operand), and against candle's own backward where that
    /// one works (candle derives the transposed conv's output padding from the height alone, so
    /// on non-square inputs with a stride it fails with a shape mismatch).
    #[test]
    fn gradients_match_finite_differences_and_candle() {
        use crate::testutil::central_difference;
        for (i, &(dims, c_out, k, stride, padding)) in CASES.iter().enumerate() {
            let seed = 10 * i as u64;
            let x = Var::from_tensor(&randn(dims, 0.0, 1.0, DType::F64, seed)).unwrap();
            let w = Var::from_tensor(&randn(
                (c_out, dims.1, k, k),
                0.0,
                0.5,
                DType::F64,
                seed + 1,
            ))
            .unwrap();
            let ours = conv2d(&x, &w, stride, padding).unwrap();
            // A non-uniform upstream gradient: weight each output by a fixed random tensor.
            let r = randn(ours.dims(), 0.0, 1.0, DType::F64, seed + 2);
            let grads = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let loss = |x: &Tensor, w: &Tensor| -> f64 {
                (x.conv2d(w, padding, stride, 1, 1).unwrap() * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            for (name, v) in [("input", &x), ("kernel", &w)] {
                let flat: Vec<f64> = v.flatten_all().unwrap().to_vec1().unwrap();
                let mut f = |p: &[f64]| {
                    let t = Tensor::from_slice(p, v.dims(), v.device()).unwrap();
                    if name == "input" {
                        loss(&t, w.as_tensor())
                    } else {
                        loss(x.as_tensor(), &t)
                    }
                };
                let fd: Vec<f64> = (0..flat.len())
                    .map(|j| central_difference(&mut f, &flat, j))
                    .collect();
                let fd = Tensor::from_vec(fd, v.dims(), v.device()).unwrap();
                let err = max_abs_diff(grads.get(v).unwrap(), &fd);
                assert!(err < 1e-6, "case {i}: {name} gradient off by {err}");
            }
            if dims.2 == dims.3 {
                let theirs = x.conv2d(&w, padding, stride, 1, 1).unwrap();
                let gt = (theirs * &r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for v in [&x, &w] {
                    let err = max_abs_diff(grads.get(v).unwrap(), gt.get(v).unwrap());
                    assert!(err < 1e-12, "case {i}: differs from candle by {err}");
                }
            }
        }
    }

    #[test]
    fn untracked_operands_get_no_gradient() {
        let x = Var::from_tensor(&randn((1, 2, 5, 5), 0.0, 1.0, DType::F32, 1)).unwrap();
        let w = randn((3, 2, 3, 3), 0.0, 1.0, DType::F32, 2);
        let g = conv2d(&x, &w, 1, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&x).is_some());
        assert!(g.get(&w).is_none());

        // A plain image into a trainable kernel: only the kernel's gradient.
        let img = randn((1, 2, 5, 5), 0.0, 1.0, DType::F32, 3);
        let wv = Var::from_tensor(&w).unwrap();
        let g = conv2d(&img, &wv, 2, 1)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        assert!(g.get(&wv).is_some());
        assert!(g.get(&img).is_none());

        // Nothing tracked: no graph at all.
        assert!(!conv2d(&img, &w, 1, 0).unwrap().track_op());
    }
}
