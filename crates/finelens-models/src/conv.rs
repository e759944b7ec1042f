//! 2-D convolution as im2col + GEMM in both directions, streamed over groups of images, with a
//! backward that computes only the gradients that are needed.
//!
//! candle 0.11's conv backward always computes both gradients: the kernel's even when the kernel
//! is a plain (frozen) tensor, and the input's, through a direct-loop `conv_transpose2d`, even when
//! the input is an image that needs none (see shared/CANDLE-NOTES.md); its forward gathers im2col
//! tiles with strided single-element writes. Here, with X̂ = im2col(X) (C_in·k·k rows, one column
//! per output pixel) and W reshaped to C_out × (C_in·k·k):
//!
//! * forward: Y = W · X̂ (+ a bias per output channel, where batch norm was folded in; a frozen
//!   block's batch-norm scale comes apart from W and multiplies W's rows or Y's, whichever are
//!   fewer, rather than every weight on every pass);
//! * input:   dX = col2im(Wᵀ · dY), the adjoint of the forward, only when X is tracked;
//! * kernel:  dW = Σ dY · X̂ᵀ, only when W is tracked (a trainable `Var`); the bias: Σ dY.
//!
//! The columns of a whole batch are nine times the activations of a 3×3 layer (231 MB for a
//! ResNet-18 layer1 at 224 px and batch 32), and allocating, zeroing and page-faulting them every
//! call cost more than a tenth of a training step. Each pass instead walks the batch a group of
//! images at a time through one reused column buffer; a group holds just enough images that the
//! GEMM has [`COLUMNS`] columns, so a late-stage layer (7×7 or 2×2 pixels per image) still feeds
//! both cores and reads the kernel once per group rather than once per image. On narrow outputs
//! (under 12 pixels wide, or 24 with a stride) im2col and col2im gather and scatter through a
//! table of each window cell's input pixel instead of copying row segments of 2–8 values.
//!
//! 3×3 stride-1 layers on planes of 14×14 or more — most of a ResNet's arithmetic at 224 px —
//! take Winograd's F(2×2, 3×3) instead, forward, input gradient and kernel gradient alike
//! ([`crate::winograd`]).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{gemm_into, gemm_split_inner_into, run2, run3, transpose_into, Scratch, View};
use crate::rules::LrpLayer;
use crate::winograd::Winograd;

/// Output columns a GEMM should have at least (as images of one group), when the batch allows:
/// GEMMs of a few hundred columns spend more on packing and on waking the second core than on
/// arithmetic.
const COLUMNS: usize = 1024;

/// At most this many values in the column buffer (16 MB of f32), whatever the group wants.
const MAX_BUFFER: usize = 1 << 22;

/// The most entries [`Geometry::taps`] may have (256 KB): beyond, the table no longer sits in
/// cache beside the rows it serves.
const MAX_TAPS: usize = 1 << 16;

/// `F.conv2d(x, weight, stride=stride, padding=padding)` (no bias, no dilation, no groups) with a
/// backward that skips gradients nobody asked for.
pub fn conv2d(
    x: &Tensor,
    weight: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let g = Geometry::new(x.dims4()?, weight.dims4()?, stride, padding)?;
    let (x, weight) = (x.contiguous()?, weight.contiguous()?);
    if x.track_op() || weight.track_op() {
        x.apply_op2(&weight, Conv(g, crate::rules::lrp_conv()))
    } else {
        x.apply_op2_no_bwd(&weight, &Conv(g, None))
    }
}

/// [`conv2d`] plus a bias per output channel, added as the GEMM's starting value (no extra pass):
/// a convolution with an eval-mode batch norm folded in.
pub fn conv2d_biased(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    stride: usize,
    padding: usize,
) -> candle_core::Result<Tensor> {
    let g = Geometry::new(x.dims4()?, weight.dims4()?, stride, padding)?;
    if bias.dims() != [g.c_out] {
        candle_core::bail!(
            "conv2d: a bias of shape {:?} does not fit {} output channels",
            bias.dims(),
            g.c_out
        );
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    if x.track_op() || weight.track_op() || bias.track_op() {
        x.apply_op3(&weight, &bias, Conv(g, crate::rules::lrp_conv()))
    } else {
        x.apply_op3_no_bwd(&weight, &bias, &Conv(g, None))
    }
}

/// The shapes of one convolution.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Geometry {
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
    pub(crate) fn new(
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

    /// N × C_in × H × W.
    pub(crate) fn input_shape(&self) -> Shape {
        Shape::from((self.n, self.c_in, self.h, self.w))
    }

    /// N × C_out × OH × OW.
    pub(crate) fn output_shape(&self) -> Shape {
        Shape::from((self.n, self.c_out, self.oh, self.ow))
    }

    /// C_in·k·k, the rows of X̂.
    fn rows(&self) -> usize {
        self.c_in * self.k * self.k
    }

    /// Output pixels per image.
    fn pixels(&self) -> usize {
        self.oh * self.ow
    }

    /// Images per GEMM.
    fn group(&self) -> usize {
        let per_image = self.pixels().max(1);
        (COLUMNS / per_image)
            .min(MAX_BUFFER / (self.rows() * per_image).max(1))
            .min(self.n)
            .max(1)
    }

    /// The groups of images: (first image, images).
    fn groups(&self) -> impl Iterator<Item = (usize, usize)> {
        self.groups_of(self.group())
    }

    /// The batch in groups of `g` images (the last one short): (first image, images).
    fn groups_of(&self, g: usize) -> impl Iterator<Item = (usize, usize)> {
        let n = self.n;
        (0..n).step_by(g).map(move |n0| (n0, g.min(n - n0)))
    }

    /// Images per kernel-gradient GEMM: as many as the column buffer holds ([`MAX_BUFFER`]), in
    /// groups of equal size. There the images are the GEMM's inner dimension and the product is
    /// the small dW, so a group of [`COLUMNS`] is a GEMM too short to split well over the cores
    /// plus one more pass over dW: per training step at 64 px, batch 32, the stem's ran at
    /// 90 GFLOP/s (one 32×32 image a group) and layer1's at 190, against 340–450 for the
    /// later layers' longer ones.
    fn kernel_group(&self) -> usize {
        let most = (MAX_BUFFER / (self.rows() * self.pixels()).max(1)).clamp(1, self.n.max(1));
        self.n.div_ceil(self.n.div_ceil(most).max(1)).max(1)
    }

    /// For kernel offset `kk` along an axis of length `len` with `out` outputs: the outputs whose
    /// window reads inside the input, as a range, and the input index of the first of them.
    fn valid(&self, kk: usize, len: usize, out: usize) -> (usize, usize, usize) {
        let (s, p) = (self.stride, self.padding);
        // o·s + kk − p ≥ 0  ⇔  o ≥ ⌈(p − kk)/s⌉;  o·s + kk − p < len  ⇔  o < ⌈(len + p − kk)/s⌉.
        let lo = p.saturating_sub(kk).div_ceil(s);
        let hi = (len + p).saturating_sub(kk).div_ceil(s).min(out);
        let lo = lo.min(hi);
        (lo, hi, (lo * s + kk).saturating_sub(p))
    }

    /// [`Self::valid`] for every kernel row and column, once a call rather than once a plane
    /// (two divisions each: on the 2×2 and 4×4 planes of a 64-px ResNet they cost as much as
    /// the copying).
    #[allow(clippy::type_complexity)]
    fn windows(&self) -> (Vec<(usize, usize, usize)>, Vec<(usize, usize, usize)>) {
        (
            (0..self.k)
                .map(|ky| self.valid(ky, self.h, self.oh))
                .collect(),
            (0..self.k)
                .map(|kx| self.valid(kx, self.w, self.ow))
                .collect(),
        )
    }

    /// Whether im2col and col2im go through [`Self::taps`] rather than row by row: on narrow
    /// outputs, where a row's copy (2–8 values, or a strided loop) costs more in loop overhead
    /// than in memory. Measured per ResNet-18 layer (im2col and col2im, batch 32 at 64 px and 4
    /// at 224 px): the gather took a third to a fifth of the time on 8×8 to 2×2 outputs and on
    /// stride-2 windows into 14×14 ones, about the same at 28×28 with stride 2, and lost on
    /// 14×14 and 16×16 with stride 1 and on the 7×7/2 stem into 32×32.
    fn gathers(&self) -> bool {
        let narrow = if self.stride == 1 { 12 } else { 24 };
        self.ow < narrow
            && self.k * self.k * self.pixels() <= MAX_TAPS
            && self.h * self.w < u32::MAX as usize
    }

    /// For each kernel offset (ky, kx) and output pixel, the input pixel (iy·W + ix) its window
    /// reads, or `u32::MAX` where it reads the padding: out of any plane's range, so the `get`
    /// of a gather or scatter skips it without a branch of its own.
    fn taps(&self) -> Vec<u32> {
        let (s, p) = (self.stride as isize, self.padding as isize);
        let (h, w) = (self.h as isize, self.w as isize);
        let mut taps = Vec::with_capacity(self.k * self.k * self.pixels());
        for ky in 0..self.k as isize {
            for kx in 0..self.k as isize {
                for oy in 0..self.oh as isize {
                    let iy = oy * s + ky - p;
                    for ox in 0..self.ow as isize {
                        let ix = ox * s + kx - p;
                        let inside = (0..h).contains(&iy) && (0..w).contains(&ix);
                        taps.push(if inside {
                            (iy * w + ix) as u32
                        } else {
                            u32::MAX
                        });
                    }
                }
            }
        }
        taps
    }

    /// The columns of images n0..n0+gs into `cols` (rows × gs·L, image i in columns i·L..): rows
    /// ordered (c, ky, kx) like a kernel reshaped to C_out × C_in·k·k; cells the window reads from
    /// the padding are 0.
    fn im2col<T: Float + Send + Sync>(&self, x: &[T], n0: usize, gs: usize, cols: &mut [T]) {
        if self.gathers() {
            self.im2col_gather(x, n0, gs, cols)
        } else {
            self.im2col_rows(x, n0, gs, cols)
        }
    }

    /// [`Self::im2col`] a row segment at a time: copies of whole runs of an input line.
    fn im2col_rows<T: Float + Send + Sync>(&self, x: &[T], n0: usize, gs: usize, cols: &mut [T]) {
        let (l, kk, hw) = (self.pixels(), self.k * self.k, self.h * self.w);
        let width = gs * l;
        let (ys, xs) = self.windows();
        // One input channel per task: its k·k rows, disjoint between tasks.
        cols[..self.rows() * width]
            .par_chunks_mut(kk * width)
            .enumerate()
            .for_each(|(c, rows)| {
                for img in 0..gs {
                    let src = &x[((n0 + img) * self.c_in + c) * hw..][..hw];
                    for (ky, &(y_lo, y_hi, iy0)) in ys.iter().enumerate() {
                        for (kx, &(x_lo, x_hi, ix0)) in xs.iter().enumerate() {
                            let row = &mut rows[(ky * self.k + kx) * width + img * l..][..l];
                            row[..y_lo * self.ow].fill(T::zero());
                            row[y_hi * self.ow..].fill(T::zero());
                            for oy in y_lo..y_hi {
                                let iy = iy0 + (oy - y_lo) * self.stride;
                                let line = &src[iy * self.w..][..self.w];
                                let dst = &mut row[oy * self.ow..][..self.ow];
                                dst[..x_lo].fill(T::zero());
                                dst[x_hi..].fill(T::zero());
                                let dst = &mut dst[x_lo..x_hi];
                                if self.stride == 1 {
                                    dst.copy_from_slice(&line[ix0..ix0 + dst.len()]);
                                } else {
                                    let src = line[ix0..].iter().step_by(self.stride);
                                    for (d, &v) in dst.iter_mut().zip(src) {
                                        *d = v;
                                    }
                                }
                            }
                        }
                    }
                }
            });
    }

    /// [`Self::im2col`] as one gather per column row through [`Self::taps`].
    fn im2col_gather<T: Float + Send + Sync>(&self, x: &[T], n0: usize, gs: usize, cols: &mut [T]) {
        let (l, kk, hw) = (self.pixels(), self.k * self.k, self.h * self.w);
        let width = gs * l;
        let taps = self.taps();
        cols[..self.rows() * width]
            .par_chunks_mut(kk * width)
            .enumerate()
            .for_each(|(c, rows)| {
                for img in 0..gs {
                    let src = &x[((n0 + img) * self.c_in + c) * hw..][..hw];
                    for (row, taps) in rows.chunks_exact_mut(width).zip(taps.chunks_exact(l)) {
                        for (d, &t) in row[img * l..][..l].iter_mut().zip(taps) {
                            *d = src.get(t as usize).copied().unwrap_or(T::zero());
                        }
                    }
                }
            });
    }

    /// The adjoint of [`Self::im2col`]: adds each column entry of images n0..n0+gs back into the
    /// input cell it was read from, in `dx` (the whole batch's N×C_in×H×W gradient).
    fn col2im<T: Float + Send + Sync>(&self, cols: &[T], n0: usize, gs: usize, dx: &mut [T]) {
        if self.gathers() {
            self.col2im_scatter(cols, n0, gs, dx)
        } else {
            self.col2im_rows(cols, n0, gs, dx)
        }
    }

    /// [`Self::col2im`] a row segment at a time.
    fn col2im_rows<T: Float + Send + Sync>(&self, cols: &[T], n0: usize, gs: usize, dx: &mut [T]) {
        let (l, kk, hw) = (self.pixels(), self.k * self.k, self.h * self.w);
        let width = gs * l;
        let (ys, xs) = self.windows();
        // One (image, channel) plane per task: planes are disjoint, so no atomics.
        dx[n0 * self.c_in * hw..(n0 + gs) * self.c_in * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(plane, o)| {
                let (img, c) = (plane / self.c_in, plane % self.c_in);
                let rows = &cols[c * kk * width..][..kk * width];
                for (ky, &(y_lo, y_hi, iy0)) in ys.iter().enumerate() {
                    for (kx, &(x_lo, x_hi, ix0)) in xs.iter().enumerate() {
                        let row = &rows[(ky * self.k + kx) * width + img * l..][..l];
                        for oy in y_lo..y_hi {
                            let iy = iy0 + (oy - y_lo) * self.stride;
                            let dst = &mut o[iy * self.w..][..self.w];
                            let src = &row[oy * self.ow + x_lo..oy * self.ow + x_hi];
                            // Iterators, not indices: no bounds checks, and the stride-1 case
                            // (every 3×3/1 layer) vectorises.
                            if self.stride == 1 {
                                for (d, &v) in dst[ix0..ix0 + src.len()].iter_mut().zip(src) {
                                    *d = *d + v;
                                }
                            } else {
                                let dst = dst[ix0..].iter_mut().step_by(self.stride);
                                for (d, &v) in dst.zip(src) {
                                    *d = *d + v;
                                }
                            }
                        }
                    }
                }
            });
    }

    /// [`Self::col2im`] as one scatter-add per column row through [`Self::taps`].
    fn col2im_scatter<T: Float + Send + Sync>(
        &self,
        cols: &[T],
        n0: usize,
        gs: usize,
        dx: &mut [T],
    ) {
        let (l, kk, hw) = (self.pixels(), self.k * self.k, self.h * self.w);
        let width = gs * l;
        let taps = self.taps();
        dx[n0 * self.c_in * hw..(n0 + gs) * self.c_in * hw]
            .par_chunks_mut(hw)
            .enumerate()
            .for_each(|(plane, o)| {
                let (img, c) = (plane / self.c_in, plane % self.c_in);
                let rows = &cols[c * kk * width..][..kk * width];
                for (row, taps) in rows.chunks_exact(width).zip(taps.chunks_exact(l)) {
                    for (&v, &t) in row[img * l..][..l].iter().zip(taps) {
                        if let Some(d) = o.get_mut(t as usize) {
                            *d = *d + v;
                        }
                    }
                }
            });
    }

    /// dY of images n0..n0+gs as C_out × gs·L, its rows multiplied by `scale` if given: the
    /// batch's own rows for one unscaled image, else gathered into `buf`.
    fn dy_group<'a, T: Float>(
        &self,
        dy: &'a [T],
        n0: usize,
        gs: usize,
        scale: Option<&[T]>,
        buf: &'a mut [T],
    ) -> View<'a, T> {
        let l = self.pixels();
        let width = gs * l;
        let data: &[T] = if gs == 1 && scale.is_none() {
            &dy[n0 * self.c_out * l..][..self.c_out * l]
        } else {
            for img in 0..gs {
                for co in 0..self.c_out {
                    let src = &dy[((n0 + img) * self.c_out + co) * l..][..l];
                    let dst = &mut buf[co * width + img * l..][..l];
                    match scale {
                        Some(s) => {
                            for (d, &v) in dst.iter_mut().zip(src) {
                                *d = s[co] * v;
                            }
                        }
                        None => dst.copy_from_slice(src),
                    }
                }
            }
            &buf[..self.c_out * width]
        };
        View::rows(data, self.c_out, width)
    }

    /// The 3×3, stride-1, padding-1 layers' shapes for [`Winograd`], when this is one.
    fn winograd(&self) -> Option<Winograd> {
        let wg = Winograd {
            n: self.n,
            c_in: self.c_in,
            c_out: self.c_out,
            h: self.h,
            w: self.w,
        };
        (self.k == 3 && self.stride == 1 && self.padding == 1 && wg.pays()).then_some(wg)
    }

    /// Y = (s ⊙ W) ∗ x + b, s and b per output channel (a folded batch norm's scale and shift).
    pub(crate) fn forward<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        w: &[T],
        scale: Option<&[T]>,
        bias: Option<&[T]>,
    ) -> Vec<T> {
        match self.winograd() {
            Some(wg) => wg.forward(x, w, scale, bias),
            None => self.im2col_forward(x, w, scale, bias),
        }
    }

    /// dX for [`Self::forward`]'s (s ⊙ W).
    pub(crate) fn input_grad<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        w: &[T],
        scale: Option<&[T]>,
    ) -> Vec<T> {
        match self.winograd() {
            Some(wg) => wg.input_grad(dy, w, scale),
            None => self.im2col_input_grad(dy, w, scale),
        }
    }

    /// Where im2col applies a per-output-channel scale s: to the kernel's rows (a scaled copy,
    /// C_out × C_in·k·k values) or, when the batch's outputs are fewer (late layers, small
    /// batches: layer4 of a ResNet-18 has 2.4 M weights and 25 K outputs an image at 224 px), to
    /// the output's rows (forward) or dY's (input gradient). Scaling every kernel on every pass
    /// was ≈ 20% of a 64-px forward.
    fn scaled_kernel<T: Float + Send + Sync + 'static>(
        &self,
        w: &[T],
        scale: Option<&[T]>,
    ) -> Option<Scratch<T>> {
        let s = scale?;
        let r = self.rows();
        (r <= self.n * self.pixels()).then(|| {
            let mut k = Scratch::new(self.c_out * r);
            k.par_chunks_mut(r)
                .zip(w.par_chunks(r))
                .zip(s)
                .for_each(|((k, w), &s)| {
                    for (k, &w) in k.iter_mut().zip(w) {
                        *k = s * w;
                    }
                });
            k
        })
    }

    pub(crate) fn im2col_forward<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        w: &[T],
        scale: Option<&[T]>,
        bias: Option<&[T]>,
    ) -> Vec<T> {
        let (l, r) = (self.pixels(), self.rows());
        let mut y = vec![T::zero(); self.n * self.c_out * l];
        let mut cols = Scratch::new(r * self.group() * l);
        let mut out = Scratch::new(if self.group() > 1 {
            self.c_out * self.group() * l
        } else {
            0
        });
        let scaled = self.scaled_kernel(w, scale);
        // The scale still to apply, to the output's rows.
        let post = scale.filter(|_| scaled.is_none());
        let kernel = View::rows(scaled.as_deref().unwrap_or(w), self.c_out, r);
        for (n0, gs) in self.groups() {
            let width = gs * l;
            self.im2col(x, n0, gs, &mut cols);
            let dst: &mut [T] = if gs == 1 {
                &mut y[n0 * self.c_out * l..][..self.c_out * l]
            } else {
                &mut out[..self.c_out * width]
            };
            let accumulate = bias.is_some() && post.is_none();
            if let (Some(b), true) = (bias, accumulate) {
                for (row, &b) in dst.chunks_mut(width).zip(b) {
                    row.fill(b);
                }
            }
            gemm_into(dst, width, kernel, View::rows(&cols, r, width), accumulate);
            if let Some(s) = post {
                dst.par_chunks_mut(width).enumerate().for_each(|(co, row)| {
                    let b = bias.map_or(T::zero(), |b| b[co]);
                    for v in row {
                        *v = s[co] * *v + b;
                    }
                });
            }
            if gs > 1 {
                for img in 0..gs {
                    for co in 0..self.c_out {
                        y[((n0 + img) * self.c_out + co) * l..][..l]
                            .copy_from_slice(&out[co * width + img * l..][..l]);
                    }
                }
            }
        }
        y
    }

    pub(crate) fn im2col_input_grad<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        w: &[T],
        scale: Option<&[T]>,
    ) -> Vec<T> {
        let (l, r) = (self.pixels(), self.rows());
        let mut dx = vec![T::zero(); self.n * self.c_in * self.h * self.w];
        let mut cols = Scratch::new(r * self.group() * l);
        let scaled = self.scaled_kernel(w, scale);
        // (s ⊙ W)ᵀ·dY = Wᵀ·(s ⊙ dY): the scale still to apply goes to dY's rows, gathered.
        let post = scale.filter(|_| scaled.is_none());
        let mut buf = Scratch::new(if self.group() > 1 || post.is_some() {
            self.c_out * self.group() * l
        } else {
            0
        });
        let kernel_t = View::rows(scaled.as_deref().unwrap_or(w), self.c_out, r).t();
        for (n0, gs) in self.groups() {
            let width = gs * l;
            let dy = self.dy_group(dy, n0, gs, post, &mut buf);
            gemm_into(&mut cols[..r * width], width, kernel_t, dy, false);
            self.col2im(&cols, n0, gs, &mut dx);
        }
        dx
    }

    /// dW for [`Self::forward`]'s W: by Winograd's transforms where the forward takes them,
    /// else through im2col.
    fn kernel_grad<T: Float + Send + Sync + 'static>(&self, dy: &[T], x: &[T]) -> Vec<T> {
        match self.winograd() {
            Some(wg) => wg.kernel_grad(dy, x),
            None => self.im2col_kernel_grad(dy, x),
        }
    }

    /// dW = dY·X̂ᵀ, computed as its transpose X̂·dYᵀ and transposed back where the images are
    /// many: `gemm` packs the left-hand factor of its (column-major) product into micro-panels,
    /// and for dW that factor is X̂ (9·C_in × N·L, rows along the long axis) where for dWᵀ it is
    /// dY (C_out × N·L, 9·C_in/C_out times smaller). Packing X̂ took as long as the product
    /// itself at 64 px. Where N·L < C_out (a 64-px ResNet's layer4 at batch 32, 224-px layer4
    /// at batch 8) X̂ is smaller than dW, and packing it costs less than the transpose: there
    /// dW is computed as it is.
    pub(crate) fn im2col_kernel_grad<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        x: &[T],
    ) -> Vec<T> {
        self.kernel_grad_grouped(dy, x, self.kernel_group())
    }

    /// [`Self::kernel_grad`] summed over groups of `group` images.
    fn kernel_grad_grouped<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        x: &[T],
        group: usize,
    ) -> Vec<T> {
        let (l, r, c_out) = (self.pixels(), self.rows(), self.c_out);
        // Min of 15 alternating runs, per layer: 64 px at batch 32, layer4's 3×3 512 → 512
        // (N·L = 128) 6.0 → 4.0 ms and its stride-2 256 → 512 2.2 → 1.2; 224 px at batch 8,
        // layer4's 512 → 512 (392) 8.7 → 6.1; layer3 at 64 px (N·L = 512 = 2·C_out) the same
        // either way, layer2 (2,048 = 16·C_out) 3.2 → 5.4 as it is.
        let direct = group * l < c_out;
        let mut dw = vec![T::zero(); c_out * r];
        let mut dwt = Scratch::new(if direct { 0 } else { r * c_out });
        let mut cols = Scratch::new(r * group * l);
        let mut buf = Scratch::new(if group > 1 { c_out * group * l } else { 0 });
        for (i, (n0, gs)) in self.groups_of(group).enumerate() {
            let width = gs * l;
            self.im2col(x, n0, gs, &mut cols);
            let dy = self.dy_group(dy, n0, gs, None, &mut buf);
            let (xt, dyt) = (View::rows(&cols[..r * width], r, width), dy.t());
            if direct {
                gemm_into(&mut dw, r, dy, xt.t(), i > 0);
                continue;
            }
            // Split the images between the cores when they outnumber the output's larger side
            // twice over (a 64-px ResNet's stem and layer1 at batch 32: 90 → 190 and 190 → 340
            // GFLOP/s; layer2's 1,152 × 128 over 2,048 columns gained nothing measurable).
            if width >= 2 * r.max(c_out) {
                gemm_split_inner_into(&mut dwt, c_out, xt, dyt, i > 0);
            } else {
                gemm_into(&mut dwt, c_out, xt, dyt, i > 0);
            }
        }
        if !direct {
            transpose_into(&dwt, r, c_out, &mut dw);
        }
        dw
    }
}

/// The convolution as a graph op: (x, w) or (x, w, bias), with the LRP rule it was built under.
struct Conv(Geometry, Option<LrpLayer>);

impl Conv {
    fn shape(&self) -> Shape {
        self.0.output_shape()
    }

    /// LRP's message to the input ([`crate::rules`]): g_x = W′ᵀ(g ⊙ z / (z′ + ε·sign z′)), z the
    /// layer's output (bias included), W′ and z′ the rule's weights and activations.
    fn lrp_input(
        &self,
        (x, w, bias): (&Tensor, &Tensor, Option<&Tensor>),
        z: &Tensor,
        grad: &Tensor,
        rule: LrpLayer,
    ) -> candle_core::Result<Tensor> {
        let (x, w, z, grad) = (x.detach(), w.detach(), z.detach(), grad.detach());
        let plain = Conv(self.0, None);
        if let LrpLayer::ZBox { low, high, epsilon } = rule {
            // z′ = Wx − W⁺l − W⁻h (≥ 0 for l ≤ x ≤ h), s = R_z / (z′ + ε), and
            // Rᵢ = xᵢ(Wᵀs)ᵢ − lᵢ(W⁺ᵀs)ᵢ − hᵢ(W⁻ᵀs)ᵢ, left for the caller; the message returned is
            // the plain one.
            let (n, c, h, wd) = x.dims4()?;
            let bound = |v: [f64; 3]| -> candle_core::Result<Tensor> {
                let per: Vec<f64> = (0..c).map(|ch| v[ch % 3]).collect();
                Tensor::from_vec(per, (1, c, 1, 1), x.device())?
                    .to_dtype(x.dtype())?
                    .broadcast_as((n, c, h, wd))?
                    .contiguous()
            };
            let (l, hi) = (bound(low)?, bound(high)?);
            let w = w.contiguous()?;
            let (wp, wn) = (w.relu()?.contiguous()?, w.minimum(0.0)?.contiguous()?);
            let z2 = ((x.apply_op2_no_bwd(&w, &plain)? - l.apply_op2_no_bwd(&wp, &plain)?)?
                - hi.apply_op2_no_bwd(&wn, &plain)?)?;
            let s = crate::rules::lrp_message(&grad, &z, &z2, epsilon)?;
            let back = |k: &Tensor| s.apply_op2_no_bwd(k, &InputGrad(self.0));
            let r = (((&x * back(&w)?)? - (l * back(&wp)?)?)? - (hi * back(&wn)?)?)?;
            crate::rules::put_input_relevance(r);
            return grad.contiguous()?.apply_op2_no_bwd(&w, &InputGrad(self.0));
        }
        let (w2, z2) = match rule {
            LrpLayer::ZBox { .. } => unreachable!("handled above"),
            LrpLayer::Epsilon { .. } => (w, z.clone()),
            LrpLayer::ZPlus { .. } => {
                let w2 = w.relu()?.contiguous()?;
                let z2 = x.apply_op2_no_bwd(&w2, &plain)?;
                (w2, z2)
            }
            LrpLayer::Gamma { gamma, .. } => {
                let w2 = (&w + (w.relu()? * gamma)?)?.contiguous()?;
                let z2 = match bias {
                    Some(b) => {
                        let b2 = (b.detach() + (b.relu()? * gamma)?)?.contiguous()?;
                        x.apply_op3_no_bwd(&w2, &b2, &plain)?
                    }
                    None => x.apply_op2_no_bwd(&w2, &plain)?,
                };
                (w2, z2)
            }
        };
        let s = crate::rules::lrp_message(&grad, &z, &z2, rule.epsilon())?;
        s.apply_op2_no_bwd(&w2, &InputGrad(self.0))
    }

    /// (dx, dw) for the operands that are tracked.
    fn grads(
        &self,
        x: &Tensor,
        w: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        // Gradients are values, never graph: detach so that no gradient keeps a forward alive.
        let grad = grad.detach().contiguous()?;
        let dx = if x.track_op() {
            Some(grad.apply_op2_no_bwd(&w.detach(), &InputGrad(self.0))?)
        } else {
            None
        };
        let dw = if w.track_op() {
            let dw = grad.apply_op2_no_bwd(&x.detach(), &KernelGrad(self.0))?;
            crate::backprop::keep(w, dw)?
        } else {
            None
        };
        Ok((dx, dw))
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "finelens-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let out = run2(
            CustomOp2::name(self),
            (s1, l1),
            (s2, l2),
            |x, w| g.forward(x, w, None, None),
            |x, w| g.forward(x, w, None, None),
        )?;
        Ok((out, self.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        match self.1 {
            // Relevance flows to the input only: LRP explains with frozen weights.
            Some(rule) => Ok((Some(self.lrp_input((x, w, None), y, grad, rule)?), None)),
            None => self.grads(x, w, grad),
        }
    }
}

impl CustomOp3 for Conv {
    fn name(&self) -> &'static str {
        "finelens-conv2d-biased"
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
        let g = self.0;
        let out = run3(
            CustomOp3::name(self),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| g.forward(x, w, None, Some(b)),
            |x, w, b| g.forward(x, w, None, Some(b)),
        )?;
        Ok((out, self.shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        bias: &Tensor,
        y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        if let Some(rule) = self.1 {
            let dx = self.lrp_input((x, w, Some(bias)), y, grad, rule)?;
            return Ok((Some(dx), None, None));
        }
        let (dx, dw) = self.grads(x, w, grad)?;
        let g = self.0;
        let db = if bias.track_op() {
            // Σ over images and pixels: contiguous sums over the pixels first.
            Some(
                grad.detach()
                    .reshape((g.n, g.c_out, g.pixels()))?
                    .sum(2)?
                    .sum(0)?,
            )
        } else {
            None
        };
        Ok((dx, dw, db))
    }
}

/// dX from (dY, W).
struct InputGrad(Geometry);

impl CustomOp2 for InputGrad {
    fn name(&self) -> &'static str {
        "finelens-conv2d-input-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let out = run2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |dy, w| g.input_grad(dy, w, None),
            |dy, w| g.input_grad(dy, w, None),
        )?;
        Ok((out, Shape::from((g.n, g.c_in, g.h, g.w))))
    }
}

/// dW from (dY, X).
struct KernelGrad(Geometry);

impl CustomOp2 for KernelGrad {
    fn name(&self) -> &'static str {
        "finelens-conv2d-kernel-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let g = self.0;
        let out = run2(
            self.name(),
            (s1, l1),
            (s2, l2),
            |dy, x| g.kernel_grad(dy, x),
            |dy, x| g.kernel_grad(dy, x),
        )?;
        Ok((out, Shape::from((g.c_out, g.c_in, g.k, g.k))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{max_abs_diff, randn};
    use candle_core::{DType, Var};

    /// (input N×C×H×W, C_out, k, stride, padding): the ResNet shapes (7×7/2 stem, 3×3/1 and /2,
    /// 1×1/2 downsample) on odd sizes where a stride leaves cells that no window reads.
    type Case = ((usize, usize, usize, usize), usize, usize, usize, usize);
    /// The last two batch several images into one GEMM (7×7 outputs: groups of 5 and 2; 2×2
    /// outputs: one group of 5).
    const CASES: [Case; 8] = [
        ((2, 3, 11, 9), 4, 7, 2, 3),
        ((7, 3, 7, 7), 4, 3, 1, 1),
        ((5, 2, 4, 4), 3, 3, 2, 1),
        ((2, 4, 7, 7), 5, 3, 1, 1),
        ((3, 4, 9, 8), 6, 3, 2, 1),
        ((2, 6, 7, 7), 3, 1, 2, 0),
        ((1, 2, 5, 6), 3, 3, 3, 0),
        ((2, 3, 6, 5), 2, 2, 1, 0),
    ];

    /// A case's input and kernel as f64 variables, seeded.
    fn operands(
        dims: (usize, usize, usize, usize),
        c_out: usize,
        k: usize,
        seed: u64,
    ) -> (Var, Var) {
        let x = Var::from_tensor(&randn(dims, 0.0, 1.0, DType::F64, seed)).unwrap();
        let w = randn((c_out, dims.1, k, k), 0.0, 0.5, DType::F64, seed + 1);
        (x, Var::from_tensor(&w).unwrap())
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
            let (x, w) = operands(dims, c_out, k, seed);
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

    /// A per-output-channel scale given apart (a folded batch norm's) gives what the scaled
    /// kernel gives, forward and input gradient, on each path: Winograd (scale in the kernel
    /// transform), im2col scaling the kernel (fewer weights than outputs) and im2col scaling the
    /// output's and dY's rows (more weights than outputs).
    #[test]
    fn a_scale_apart_equals_the_scaled_kernel() {
        let vals = |shape: &[usize], seed: u64| -> Vec<f64> {
            randn(shape, 0.0, 1.0, DType::F64, seed)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap()
        };
        // (input, C_out, k, stride, padding, path)
        let cases = [
            ((2, 3, 16, 15), 4, 3, 1, 1, "winograd"),
            ((3, 2, 6, 5), 3, 3, 1, 1, "scaled kernel"),
            ((1, 5, 3, 3), 2, 3, 2, 1, "scaled rows"),
            ((4, 8, 2, 2), 5, 3, 1, 1, "scaled rows, grouped"),
        ];
        for (i, &(dims, c_out, k, stride, padding, path)) in cases.iter().enumerate() {
            let g = Geometry::new(dims, (c_out, dims.1, k, k), stride, padding).unwrap();
            let taken = match (g.winograd().is_some(), g.rows() <= g.n * g.pixels()) {
                (true, _) => "winograd",
                (false, true) => "scaled kernel",
                (false, false) if g.group() > 1 => "scaled rows, grouped",
                (false, false) => "scaled rows",
            };
            assert_eq!(taken, path, "case {i} no longer takes its path");
            let seed = 100 + 10 * i as u64;
            let x = vals(&[dims.0, dims.1, dims.2, dims.3], seed);
            let w = vals(&[c_out, dims.1 * k * k], seed + 1);
            let s = vals(&[c_out], seed + 2);
            let t = vals(&[c_out], seed + 3);
            let dy = vals(&[dims.0 * c_out * g.pixels()], seed + 4);
            let sw: Vec<f64> = w
                .chunks(dims.1 * k * k)
                .zip(&s)
                .flat_map(|(row, &s)| row.iter().map(move |&w| s * w))
                .collect();
            let err = |a: &[f64], b: &[f64]| {
                assert_eq!(a.len(), b.len());
                a.iter()
                    .zip(b)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max)
            };
            for bias in [None, Some(&t[..])] {
                let e = err(
                    &g.forward(&x, &w, Some(&s), bias),
                    &g.forward(&x, &sw, None, bias),
                );
                assert!(e < 1e-12, "case {i} ({path}): forward off by {e}");
            }
            let e = err(
                &g.input_grad(&dy, &w, Some(&s)),
                &g.input_grad(&dy, &sw, None),
            );
            assert!(e < 1e-12, "case {i} ({path}): input gradient off by {e}");
        }
    }

    /// im2col's two ways, row copies and the gather through `taps`, give the same columns, and
    /// col2im's the same sums, on every case above and on wider ones (a 7×7/2 stem, odd
    /// widths); and col2im is im2col's adjoint: ⟨im2col(x), c⟩ = ⟨x, col2im(c)⟩.
    #[test]
    fn gathered_columns_equal_copied_rows() {
        let wide: [Case; 3] = [
            ((2, 3, 40, 37), 4, 7, 2, 3),
            ((3, 2, 20, 17), 3, 3, 1, 1),
            ((2, 3, 29, 30), 2, 3, 2, 1),
        ];
        let vals = |len: usize, seed: u64| -> Vec<f64> {
            randn(len, 0.0, 1.0, DType::F64, seed).to_vec1().unwrap()
        };
        for (i, &(dims, c_out, k, stride, padding)) in CASES.iter().chain(&wide).enumerate() {
            let g = Geometry::new(dims, (c_out, dims.1, k, k), stride, padding).unwrap();
            let x = vals(dims.0 * dims.1 * dims.2 * dims.3, 300 + i as u64);
            let mut dx = [vec![0.0; x.len()], vec![0.0; x.len()]];
            for (n0, gs) in g.groups() {
                let len = g.rows() * gs * g.pixels();
                let (mut copied, mut gathered) = (vec![f64::NAN; len], vec![f64::NAN; len]);
                g.im2col_rows(&x, n0, gs, &mut copied);
                g.im2col_gather(&x, n0, gs, &mut gathered);
                assert_eq!(
                    copied, gathered,
                    "case {i}, images {n0}+{gs}: columns differ"
                );
                let c = vals(len, 400 + i as u64 + n0 as u64);
                g.col2im_rows(&c, n0, gs, &mut dx[0]);
                g.col2im_scatter(&c, n0, gs, &mut dx[1]);
                let lhs: f64 = copied.iter().zip(&c).map(|(a, b)| a * b).sum();
                let mut alone = vec![0.0; x.len()];
                g.col2im_scatter(&c, n0, gs, &mut alone);
                let rhs: f64 = x.iter().zip(&alone).map(|(a, b)| a * b).sum();
                assert!(
                    (lhs - rhs).abs() <= 1e-10 * lhs.abs().max(1.0),
                    "case {i}: col2im is not im2col's adjoint ({lhs} vs {rhs})"
                );
            }
            assert_eq!(dx[0], dx[1], "case {i}: col2im's sums differ");
        }
    }

    /// The kernel gradient summed over groups of images equals candle's, over groups of 2 (the
    /// last one short) and the chosen ones, both ways round: as dWᵀ transposed back (many
    /// images, few output channels) and as dW itself (N·L < C_out: the wide layers of small
    /// planes), stride 1 and 2.
    #[test]
    fn kernel_gradient_sums_over_image_groups() {
        // (input, C_out, k, stride, padding, computed as dW itself in groups of 2, all at once)
        for (dims, c_out, k, stride, padding, direct) in [
            ((5, 3, 21, 21), 4, 5, 1, 2, (false, false)),
            ((5, 3, 3, 3), 24, 3, 1, 1, (true, false)),
            ((5, 2, 4, 4), 16, 3, 2, 1, (true, false)),
            ((5, 2, 2, 2), 24, 3, 1, 1, (true, true)),
        ] {
            let g = Geometry::new(dims, (c_out, dims.1, k, k), stride, padding).unwrap();
            assert_eq!(g.groups_of(2).collect::<Vec<_>>(), [(0, 2), (2, 2), (4, 1)]);
            let (x, w) = operands(dims, c_out, k, 91);
            let r = randn(g.output_shape(), 0.0, 1.0, DType::F64, 92);
            let theirs = (x.conv2d(&w, padding, stride, 1, 1).unwrap() * &r).unwrap();
            let expected = theirs.sum_all().unwrap().backward().unwrap();
            let expected: Vec<f64> = expected
                .get(&w)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let xs: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
            let dy: Vec<f64> = r.flatten_all().unwrap().to_vec1().unwrap();
            for (group, direct) in [(2, direct.0), (g.kernel_group(), direct.1)] {
                assert_eq!(
                    group * g.pixels() < c_out,
                    direct,
                    "{dims:?}, groups of {group}"
                );
                let dw = g.kernel_grad_grouped(&dy, &xs, group);
                let err = dw
                    .iter()
                    .zip(&expected)
                    .map(|(a, b)| (a - b).abs())
                    .fold(0.0, f64::max);
                assert!(
                    err < 1e-10,
                    "{dims:?}, groups of {group}: kernel gradient off by {err}"
                );
            }
        }
    }

    /// Kernel-gradient groups are as large as the column buffer allows and of equal size.
    #[test]
    fn kernel_groups_fill_the_buffer_evenly() {
        // A 64-px ResNet-18's stem and layer1 at batch 32, a 224-px layer1 at batch 32.
        for (dims, c_out, k, stride, padding, group) in [
            ((32, 3, 64, 64), 64, 7, 2, 3, 16),
            ((32, 64, 16, 16), 64, 3, 1, 1, 16),
            ((32, 64, 56, 56), 64, 3, 1, 1, 2),
            ((3, 2, 5, 5), 2, 3, 1, 1, 3),
        ] {
            let g = Geometry::new(dims, (c_out, dims.1, k, k), stride, padding).unwrap();
            assert_eq!(g.kernel_group(), group, "{dims:?}");
            assert!(g.rows() * g.pixels() * group <= MAX_BUFFER || group == 1);
        }
    }

    /// A layer large enough to take the Winograd path (checked, so that the test follows the
    /// dispatch if its thresholds move): value and both gradients against candle's conv2d in
    /// f64, with and without a bias, at an odd height.
    #[test]
    fn winograd_layers_match_candle() {
        let (dims, c_out) = ((3, 4, 15, 14), 5);
        let g = Geometry::new(dims, (c_out, dims.1, 3, 3), 1, 1).unwrap();
        assert!(
            g.winograd().is_some(),
            "the case no longer takes the Winograd path"
        );
        let (x, w) = operands(dims, c_out, 3, 77);
        let b = Var::from_tensor(&randn(c_out, 0.0, 1.0, DType::F64, 78)).unwrap();
        let r = randn((3, c_out, 15, 14), 0.0, 1.0, DType::F64, 79);
        let reference = x
            .conv2d(&w, 1, 1, 1, 1)
            .unwrap()
            .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
            .unwrap();
        for (name, ours) in [
            ("plain", conv2d(&x, &w, 1, 1).unwrap()),
            ("biased", conv2d_biased(&x, &w, &b, 1, 1).unwrap()),
        ] {
            let want = if name == "plain" {
                x.conv2d(&w, 1, 1, 1, 1).unwrap()
            } else {
                reference.clone()
            };
            let err = max_abs_diff(&ours, &want);
            assert!(err < 1e-12, "{name}: forward off by {err}");
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&want * &r).unwrap().sum_all().unwrap().backward().unwrap();
            for (v, what) in [(&x, "input"), (&w, "kernel")] {
                let err = max_abs_diff(g0.get(v).unwrap(), g1.get(v).unwrap());
                assert!(err < 1e-10, "{name}: {what} gradient off by {err}");
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

    /// The biased convolution is the plain one plus a per-channel bias, in value and in all three
    /// gradients (the bias's is Σ dY over images and pixels).
    #[test]
    fn bias_adds_per_channel_and_gets_its_gradient() {
        for (i, &(dims, c_out, k, stride, padding)) in CASES.iter().enumerate() {
            let seed = 100 + 10 * i as u64;
            let (x, w) = operands(dims, c_out, k, seed);
            let b = Var::from_tensor(&randn(c_out, 0.0, 1.0, DType::F64, seed + 2)).unwrap();
            let ours = conv2d_biased(&x, &w, &b, stride, padding).unwrap();
            let reference = conv2d(&x, &w, stride, padding)
                .unwrap()
                .broadcast_add(&b.reshape((1, c_out, 1, 1)).unwrap())
                .unwrap();
            assert!(max_abs_diff(&ours, &reference) < 1e-12, "case {i}");
            let r = randn(ours.dims(), 0.0, 1.0, DType::F64, seed + 3);
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for v in [&x, &w, &b] {
                let err = max_abs_diff(g0.get(v).unwrap(), g1.get(v).unwrap());
                assert!(err < 1e-12, "case {i}: gradient off by {err}");
            }
        }
    }

    /// Each LRP rule's relevance against the rule written out: with F = Σⱼ cⱼzⱼ (so Rⱼ = cⱼzⱼ),
    /// Rᵢ = Σⱼ (xᵢw′ᵢⱼ − lᵢw⁺ᵢⱼ − hᵢw⁻ᵢⱼ)Rⱼ / (z′ⱼ ± ε) over every window and tap (l = h = 0 but
    /// for zᴮ) — z⁺ or zᴮ for the first convolution of the pass, then γ (W′ = W + γW⁺,
    /// z′ = W′x + b + γb⁺) or ε (W′ = W).
    #[test]
    fn lrp_rules_match_their_formulas() {
        use crate::rules::{take_input_relevance, with_lrp, LrpRules};
        let ((n, c, h, w), c_out, k, stride, pad) = ((1, 2, 5, 4), 3, 3, 2, 1);
        let x = Var::from_tensor(&randn((n, c, h, w), 0.0, 1.0, DType::F64, 1)).unwrap();
        let kernel = randn((c_out, c, k, k), 0.0, 1.0, DType::F64, 2);
        let bias = randn((c_out, 1, 1, 1), 0.0, 1.0, DType::F64, 3)
            .flatten_all()
            .unwrap();
        let (oh, ow) = (
            (h + 2 * pad - k) / stride + 1,
            (w + 2 * pad - k) / stride + 1,
        );
        let weights = randn((1, c_out, oh, ow), 0.0, 1.0, DType::F64, 4);
        let v = |t: &Tensor| -> Vec<f64> { t.flatten_all().unwrap().to_vec1().unwrap() };
        let (xv, wv, bv, cv) = (v(x.as_tensor()), v(&kernel), v(&bias), v(&weights));
        let (eps, lo, hi) = (0.05, -5.0, 5.0);
        // (later conv of the pass, γ, zᴮ bounds): the first takes z⁺ or zᴮ, later ones γ or ε.
        let box_bounds = Some(([lo; 3], [hi; 3]));
        for (later, gamma, bounds) in [
            (false, 0.3, None),
            (false, 0.3, box_bounds),
            (true, 0.3, None),
            (true, 0.0, None),
        ] {
            let rules = LrpRules {
                epsilon: eps,
                gamma,
                bounds,
            };
            let g = with_lrp(rules, || {
                if later {
                    conv2d(x.as_tensor(), &kernel, stride, pad).unwrap();
                }
                let z = conv2d_biased(x.as_tensor(), &kernel, &bias, stride, pad).unwrap();
                (z * &weights)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            });
            // Only zᴮ leaves the input's relevance itself; the others are x ⊙ the message.
            let left = take_input_relevance();
            assert_eq!(left.is_some(), bounds.is_some() && !later);
            let got = match left {
                Some(r) => v(&r),
                None => v(&(x.as_tensor() * g.get(x.as_tensor()).unwrap()).unwrap()),
            };
            // The rule written out: per tap the numerator's term, per window its bias.
            let term = |xi: usize, wi: usize| -> f64 {
                let (x, w) = (xv[xi], wv[wi]);
                match (later, bounds) {
                    (false, None) => x * w.max(0.0),
                    (false, Some(_)) => x * w - lo * w.max(0.0) - hi * w.min(0.0),
                    (true, _) => x * (w + gamma * w.max(0.0)),
                }
            };
            let b2 = |o: usize| {
                if later {
                    bv[o] + gamma * bv[o].max(0.0)
                } else {
                    0.0
                }
            };
            let mut want = vec![0f64; xv.len()];
            for o in 0..c_out {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let mut taps = Vec::new();
                        for ci in 0..c {
                            for ky in 0..k {
                                for kx in 0..k {
                                    let iy = (oy * stride + ky) as isize - pad as isize;
                                    let ix = (ox * stride + kx) as isize - pad as isize;
                                    if iy >= 0 && ix >= 0 && (iy as usize) < h && (ix as usize) < w
                                    {
                                        let xi = (ci * h + iy as usize) * w + ix as usize;
                                        taps.push((xi, ((o * c + ci) * k + ky) * k + kx));
                                    }
                                }
                            }
                        }
                        let z: f64 =
                            taps.iter().map(|&(xi, wi)| xv[xi] * wv[wi]).sum::<f64>() + bv[o];
                        let z2: f64 =
                            taps.iter().map(|&(xi, wi)| term(xi, wi)).sum::<f64>() + b2(o);
                        let r = cv[(o * oh + oy) * ow + ox] * z;
                        let d = z2 + if z2 >= 0.0 { eps } else { -eps };
                        for &(xi, wi) in &taps {
                            want[xi] += term(xi, wi) * r / d;
                        }
                    }
                }
            }
            for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                assert!(
                    (a - b).abs() < 1e-10 * (1.0 + b.abs()),
                    "({later}, {gamma}, {bounds:?}) {i}: {a} vs {b}"
                );
            }
        }
    }
}
