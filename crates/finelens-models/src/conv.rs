//! 2-D convolution as im2col + GEMM in both directions, with a backward that computes only the
//! gradients that are needed.
//!
//! candle 0.11's conv backward always computes both gradients: the kernel's even when the kernel
//! is a plain (frozen) tensor, and the input's, through a direct-loop `conv_transpose2d`, even when
//! the input is an image that needs none (see shared/CANDLE-NOTES.md); its forward gathers im2col
//! tiles with strided single-element writes. Here, with X̂ = im2col(X) of shape N × (C_in·k·k) × L
//! (L = output pixels) and W reshaped to C_out × (C_in·k·k):
//!
//! * forward: Y = W · X̂, one GEMM per image (candle's `gemm`, multi-threaded);
//! * input:   dX = col2im(Wᵀ · dY), the adjoint of the forward, only when X is tracked;
//! * kernel:  dW = Σₙ dYₙ · X̂ₙᵀ, only when W is tracked (a trainable `Var`), accumulated by
//!   `gemm` in place image by image.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Shape, Tensor};
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
    let g = Geometry::new(x.dims4()?, weight.dims4()?, stride, padding)?;
    let cols = g.im2col(&x.detach())?;
    let y = g
        .flat_kernel(&weight.detach())?
        .broadcast_left(g.n)?
        .matmul(&cols)?
        .reshape((g.n, g.c_out, g.oh, g.ow))?;
    if !x.track_op() && !weight.track_op() {
        return Ok(y);
    }
    x.apply_op3(weight, &y, ConvGrad(g))
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
struct Geometry {
    n: usize,
    c_in: usize,
    h: usize,
    w: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    padding: usize,
    oh: usize,
    ow: usize,
}

impl Geometry {
    fn new(
        (n, c_in, h, w): (usize, usize, usize, usize),
        (c_out, kc, kh, kw): (usize, usize, usize, usize),
        stride: usize,
        padding: usize,
    ) -> candle_core::Result<Self> {
        if kc != c_in || kh != kw || kh == 0 || stride == 0 {
            candle_core::bail!(
                "conv2d: a {c_out}×{kc}×{kh}×{kw} kernel (stride {stride}) does not fit a {c_in}-channel input"
            );
        }
        if h + 2 * padding < kh || w + 2 * padding < kw {
            candle_core::bail!("conv2d: the {h}×{w} input (padding {padding}) is smaller than the {kh}×{kw} kernel");
        }
        Ok(Self {
            n,
            c_in,
            h,
            w,
            c_out,
            k: kh,
            stride,
            padding,
            oh: (h + 2 * padding - kh) / stride + 1,
            ow: (w + 2 * padding - kw) / stride + 1,
        })
    }

    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// W as C_out × (C_in·k·k).
    fn flat_kernel(&self, weight: &Tensor) -> candle_core::Result<Tensor> {
        weight.reshape((self.c_out, self.rows()))
    }

    fn im2col(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        x.contiguous()?.apply_op1_no_bwd(&Im2Col(*self))
    }

    /// Input cell (y, x) read by output (oy, ox) at kernel offset (ky, kx), if inside the input.
    #[inline]
    fn source(&self, o: usize, kk: usize, len: usize) -> Option<usize> {
        let i = (o * self.stride + kk) as isize - self.padding as isize;
        (i >= 0 && i < len as isize).then_some(i as usize)
    }
}

/// Returns the precomputed convolution (its third operand) and, in backward, the gradients of the
/// first two.
struct ConvGrad(Geometry);

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
        let g = self.0;
        let grad = grad.reshape((g.n, g.c_out, g.oh * g.ow))?;
        let dx = if x.track_op() {
            let cols = g
                .flat_kernel(&weight.detach())?
                .t()?
                .broadcast_left(g.n)?
                .matmul(&grad)?;
            Some(cols.apply_op1_no_bwd(&Col2Im(g))?)
        } else {
            None
        };
        let dw = if weight.track_op() {
            let cols = g.im2col(&x.detach())?;
            Some(grad.contiguous()?.apply_op2_no_bwd(&cols, &KernelGrad(g))?)
        } else {
            None
        };
        Ok((dx, dw, None))
    }
}

/// dW = Σₙ dYₙ · X̂ₙᵀ (C_out × C_in·k·k) from the output gradient (N × C_out × L) and the columns
/// (N × C_in·k·k × L): one GEMM per image accumulating into the same C_out × C_in·k·k buffer, so
/// no N × C_out × C_in·k·k stack of per-image products (300 MB for a ResNet-18 layer4 conv at batch
/// 32) is built and then summed single-threaded.
struct KernelGrad(Geometry);

impl KernelGrad {
    fn run<T: Float + 'static>(&self, dy: &[T], cols: &[T]) -> Vec<T> {
        let g = self.0;
        let (l, r) = (g.oh * g.ow, g.rows());
        let mut dw = vec![T::zero(); g.c_out * r];
        let threads = rayon::current_num_threads();
        let parallelism = if threads > 1 {
            gemm::Parallelism::Rayon(threads)
        } else {
            gemm::Parallelism::None
        };
        for img in 0..g.n {
            let (dy, x) = (
                &dy[img * g.c_out * l..][..g.c_out * l],
                &cols[img * r * l..][..r * l],
            );
            // SAFETY: dst is C_out × R row-major (row stride R); lhs dYₙ is C_out × L row-major;
            // rhs X̂ₙᵀ is L × R read from X̂ₙ (R × L row-major: row stride 1, column stride L).
            // Every index stays inside the slices above.
            unsafe {
                gemm::gemm(
                    g.c_out,
                    r,
                    l,
                    dw.as_mut_ptr(),
                    1,
                    r as isize,
                    img > 0,
                    dy.as_ptr(),
                    1,
                    l as isize,
                    x.as_ptr(),
                    l as isize,
                    1,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        dw
    }
}

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "finelens-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        dy: &CpuStorage,
        l_dy: &Layout,
        cols: &CpuStorage,
        l_cols: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let (Some((a, b)), Some((c, d))) = (l_dy.contiguous_offsets(), l_cols.contiguous_offsets())
        else {
            candle_core::bail!("{}: operands must be contiguous", self.name());
        };
        let out = match (dy, cols) {
            (CpuStorage::F32(dy), CpuStorage::F32(x)) => {
                CpuStorage::F32(self.run(&dy[a..b], &x[c..d]))
            }
            (CpuStorage::F64(dy), CpuStorage::F64(x)) => {
                CpuStorage::F64(self.run(&dy[a..b], &x[c..d]))
            }
            _ => candle_core::bail!("{}: operands must be both f32 or both f64", self.name()),
        };
        Ok((out, Shape::from((g.c_out, g.c_in, g.k, g.k))))
    }
}

/// X (N×C×H×W) → X̂ (N × (C·k·k) × L), rows ordered (c, ky, kx) like a kernel reshaped to
/// C_out × C·k·k; cells the window reads from the padding are 0.
struct Im2Col(Geometry);

impl Im2Col {
    fn run<T: Float + Send + Sync>(&self, x: &[T]) -> Vec<T> {
        let g = self.0;
        let l = g.oh * g.ow;
        let mut out = vec![T::zero(); g.n * g.rows() * l];
        // One (image, channel) per task: k·k rows of L, disjoint between tasks.
        out.par_chunks_mut(g.k * g.k * l)
            .enumerate()
            .for_each(|(plane, rows)| {
                let src = &x[plane * g.h * g.w..][..g.h * g.w];
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let row = &mut rows[(ky * g.k + kx) * l..][..l];
                        for oy in 0..g.oh {
                            let Some(iy) = g.source(oy, ky, g.h) else {
                                continue;
                            };
                            let line = &src[iy * g.w..][..g.w];
                            let dst = &mut row[oy * g.ow..][..g.ow];
                            for (ox, d) in dst.iter_mut().enumerate() {
                                if let Some(ix) = g.source(ox, kx, g.w) {
                                    *d = line[ix];
                                }
                            }
                        }
                    }
                }
            });
        out
    }
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "finelens-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("finelens-im2col: the input must be contiguous");
        };
        let shape = Shape::from((g.n, g.rows(), g.oh * g.ow));
        match s {
            CpuStorage::F32(v) => Ok((CpuStorage::F32(self.run(&v[start..end])), shape)),
            CpuStorage::F64(v) => Ok((CpuStorage::F64(self.run(&v[start..end])), shape)),
            other => candle_core::bail!(
                "finelens-im2col: only f32 and f64 are supported, got {:?}",
                other.dtype()
            ),
        }
    }
}

/// The adjoint of im2col: sums each column entry back into the input cell it was read from.
struct Col2Im(Geometry);

impl Col2Im {
    fn run<T: Float + Send + Sync + std::ops::AddAssign>(&self, cols: &[T]) -> Vec<T> {
        let g = self.0;
        let l = g.oh * g.ow;
        let mut out = vec![T::zero(); g.n * g.c_in * g.h * g.w];
        // One output plane per task: planes are disjoint, so the scatter needs no atomics.
        out.par_chunks_mut(g.h * g.w)
            .enumerate()
            .for_each(|(plane, o)| {
                let rows = &cols[plane * g.k * g.k * l..][..g.k * g.k * l];
                for ky in 0..g.k {
                    for kx in 0..g.k {
                        let row = &rows[(ky * g.k + kx) * l..][..l];
                        for oy in 0..g.oh {
                            let Some(iy) = g.source(oy, ky, g.h) else {
                                continue;
                            };
                            let dst = &mut o[iy * g.w..][..g.w];
                            for (ox, &v) in row[oy * g.ow..][..g.ow].iter().enumerate() {
                                if let Some(ix) = g.source(ox, kx, g.w) {
                                    dst[ix] += v;
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
        let g = self.0;
        let Some((start, end)) = l.contiguous_offsets() else {
            candle_core::bail!("finelens-col2im: columns must be contiguous");
        };
        let shape = Shape::from((g.n, g.c_in, g.h, g.w));
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
            let theirs = x.conv2d(&w, padding, stride, 1, 1).unwrap();
            let err = max_abs_diff(&ours, &theirs);
            assert!(
                err < 1e-12,
                "case {i}: forward differs from candle's by {err}"
            );
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
