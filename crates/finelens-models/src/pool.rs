//! 2-D max and average pooling with correct gradients.
//!
//! candle 0.11's `max_pool2d`/`avg_pool2d` have no backward when kernel ≠ stride (the ResNet stem's
//! 3×3/2 pool with padding 1), and where they do, the max-pool gradient is divided by k² and both
//! are wrong on sizes that don't divide evenly (see shared/CANDLE-NOTES.md). These are our own CPU
//! kernels, registered as candle custom ops so that autograd routes through them. Semantics follow
//! PyTorch's `F.max_pool2d` / `F.avg_pool2d` with `ceil_mode=False`:
//! max pool pads with −∞ and sends each output's gradient to the *first* maximum of its window
//! (row-major scan; a NaN counts as a maximum, so NaNs propagate); average pool divides by the
//! window size clipped to the padded input (`count_include_pad=True`) or by the number of real
//! input cells it covers (`count_include_pad=False`).

use crate::kernel::{contiguous, run3};
use crate::rules::{backward_rule, BackwardRule};
use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

/// Kernel, stride and padding of a square 2-D pooling window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pool2d {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl Pool2d {
    pub fn new(kernel: usize, stride: usize, padding: usize) -> Self {
        Self {
            kernel,
            stride,
            padding,
        }
    }

    /// Output length along one axis (floor mode), or an error for an impossible window.
    pub fn out_len(&self, len: usize) -> candle_core::Result<usize> {
        let Pool2d {
            kernel,
            stride,
            padding,
        } = *self;
        if kernel == 0 || stride == 0 {
            candle_core::bail!(
                "pool2d: kernel and stride must be positive, got k={kernel} s={stride}"
            );
        }
        // PyTorch rejects padding over half the kernel: a window could then hold only padding.
        if 2 * padding > kernel {
            candle_core::bail!("pool2d: padding {padding} must be at most half of kernel {kernel}");
        }
        if len + 2 * padding < kernel {
            candle_core::bail!(
                "pool2d: input length {len} (+2×{padding} padding) is smaller than kernel {kernel}"
            );
        }
        Ok((len + 2 * padding - kernel) / stride + 1)
    }

    /// Input rows (or columns) `[start, end)` covered by output index `o`, clipped to the input,
    /// and the window size clipped to the *padded* input (PyTorch's `count_include_pad` divisor).
    fn window(&self, o: usize, len: usize) -> (usize, usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let end_padded = (start + self.kernel as isize).min((len + self.padding) as isize);
        let padded_count = (end_padded - start) as usize;
        let lo = start.max(0) as usize;
        let hi = (end_padded.min(len as isize)).max(0) as usize;
        (lo, hi, padded_count)
    }
}

fn dims4(layout: &Layout, op: &str) -> candle_core::Result<(usize, usize, usize, usize)> {
    match layout.shape().dims() {
        &[n, c, h, w] => Ok((n, c, h, w)),
        d => candle_core::bail!("{op}: expected an N×C×H×W tensor, got shape {d:?}"),
    }
}

/// A pooling kernel over one contiguous N×C×H×W input, generic over the float type.
trait PlaneKernel {
    fn run<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        x: &[T],
        dims: (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Shape)>;
}

/// Runs `kernel` on f32 or f64 storage (the dtypes finelens differentiates in).
fn dispatch<K: PlaneKernel>(
    kernel: &K,
    name: &str,
    s: &CpuStorage,
    l: &Layout,
) -> candle_core::Result<(CpuStorage, Shape)> {
    let dims = dims4(l, name)?;
    match s {
        CpuStorage::F32(v) => kernel
            .run(contiguous(v, l, name)?, dims)
            .map(|(o, sh)| (CpuStorage::F32(o), sh)),
        CpuStorage::F64(v) => kernel
            .run(contiguous(v, l, name)?, dims)
            .map(|(o, sh)| (CpuStorage::F64(o), sh)),
        _ => candle_core::bail!(
            "{name}: only f32 and f64 are supported, got {:?}",
            s.dtype()
        ),
    }
}

/// Index (within the plane) of the first maximum of output cell (oy, ox), or None for an empty window.
fn argmax<T: Float>(
    plane: &[T],
    w: usize,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
) -> Option<usize> {
    let mut best: Option<(usize, T)> = None;
    for y in y0..y1 {
        for x in x0..x1 {
            let v = plane[y * w + x];
            match best {
                None => best = Some((y * w + x, v)),
                Some((_, b)) if v > b || (v.is_nan() && !b.is_nan()) => best = Some((y * w + x, v)),
                _ => {}
            }
        }
    }
    best.map(|(i, _)| i)
}

/// Index (within the plane) of the first cell of window (y0..y1, x0..x1), row-major, equal to
/// `m` — or the first NaN when `m` is NaN: [`argmax`]'s choice, given the window's maximum.
fn first_equal<T: Float>(
    plane: &[T],
    w: usize,
    (y0, y1): (usize, usize),
    (x0, x1): (usize, usize),
    m: T,
) -> Option<usize> {
    let hit = |v: T| if m.is_nan() { v.is_nan() } else { v == m };
    (y0..y1).find_map(|y| {
        plane[y * w + x0..y * w + x1]
            .iter()
            .position(|&v| hit(v))
            .map(|j| y * w + x0 + j)
    })
}

/// The larger of `m` and `v`, or NaN when either is (PyTorch's max pool propagates NaNs).
#[inline]
fn nan_max<T: Float>(m: T, v: T) -> T {
    if v > m || v.is_nan() {
        v
    } else {
        m
    }
}

struct MaxPool2d {
    pool: Pool2d,
    /// Backward by DeepLIFT's rescale rule (the batch: inputs, then references).
    rescale: bool,
}

impl PlaneKernel for MaxPool2d {
    fn run<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        x: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let p = self.pool;
        let (oh, ow) = (p.out_len(h)?, p.out_len(w)?);
        let mut out = vec![T::zero(); n * c * oh * ow];
        // Separably: for each output row, the window's rows' maximum at every input column
        // (whole rows at a time, which vectorises), then the windows' maxima along that one row
        // — the same values as the 2-D scan (a NaN wins either way), in k + k comparisons per
        // output rather than k², and only the second pass strided.
        let columns: Vec<_> = (0..ow).map(|ox| p.window(ox, w)).collect();
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                let mut down = vec![T::neg_infinity(); w];
                for (oy, o) in o.chunks_mut(ow).enumerate() {
                    let (y0, y1, _) = p.window(oy, h);
                    down.fill(T::neg_infinity());
                    for line in plane[y0 * w..y1 * w].chunks(w) {
                        for (m, &v) in down.iter_mut().zip(line) {
                            *m = nan_max(*m, v);
                        }
                    }
                    for (m, &(x0, x1, _)) in o.iter_mut().zip(&columns) {
                        *m = down[x0..x1]
                            .iter()
                            .fold(T::neg_infinity(), |m, &v| nan_max(m, v));
                    }
                }
            });
        Ok((out, Shape::from((n, c, oh, ow))))
    }
}

impl CustomOp1 for MaxPool2d {
    fn name(&self) -> &'static str {
        "finelens-max-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, self.name(), s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let grad_res = grad_res.contiguous()?;
        Ok(Some(arg.apply_op3_no_bwd(
            res,
            &grad_res,
            &MaxPool2dBackward {
                pool: self.pool,
                rescale: self.rescale,
            },
        )?))
    }
}

/// Scatters each output gradient to its window's first maximum in the (saved) input — or, by
/// DeepLIFT's rescale rule (Captum's `maxpool` rule), for each pair of an input plane and its
/// reference plane, sends g·(M − y′) to the input's maximum and g′·(y − M) to the reference's
/// (M = max(y, y′), so the two sum to g·(y − y′) when g = g′, as the rule keeps them), and
/// divides what each position got by its Δx (the gradient where |Δx| < eps).
struct MaxPool2dBackward {
    pool: Pool2d,
    rescale: bool,
}

impl MaxPool2dBackward {
    /// The rescale rule over planes `[inputs…, references…]`.
    fn rescale<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        x: &[T],
        g: &[T],
        (planes, h, w): (usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Vec<T> {
        let p = self.pool;
        let half = planes / 2;
        let eps = T::from(crate::rules::DEEPLIFT_EPS).unwrap();
        let pairs: Vec<(Vec<T>, Vec<T>)> = (0..half)
            .into_par_iter()
            .map(|k| {
                let (a, b) = (&x[k * h * w..][..h * w], &x[(k + half) * h * w..][..h * w]);
                let (ga, gb) = (
                    &g[k * oh * ow..][..oh * ow],
                    &g[(k + half) * oh * ow..][..oh * ow],
                );
                // What the rule sends to each position, and the plain gradients.
                let (mut sent, mut da, mut db) = (
                    vec![T::zero(); h * w],
                    vec![T::zero(); h * w],
                    vec![T::zero(); h * w],
                );
                for oy in 0..oh {
                    let (y0, y1, _) = p.window(oy, h);
                    for ox in 0..ow {
                        let (x0, x1, _) = p.window(ox, w);
                        let o = oy * ow + ox;
                        if let (Some(ia), Some(ib)) = (
                            argmax(a, w, (y0, y1), (x0, x1)),
                            argmax(b, w, (y0, y1), (x0, x1)),
                        ) {
                            let m = Float::max(a[ia], b[ib]);
                            sent[ia] += ga[o] * (m - b[ib]);
                            sent[ib] += gb[o] * (a[ia] - m);
                            da[ia] += ga[o];
                            db[ib] += gb[o];
                        }
                    }
                }
                for i in 0..h * w {
                    let d = a[i] - b[i];
                    if d.abs() >= eps {
                        da[i] = sent[i] / d;
                        db[i] = sent[i] / d;
                    }
                }
                (da, db)
            })
            .collect();
        let mut dx = vec![T::zero(); x.len()];
        for (k, (da, db)) in pairs.into_iter().enumerate() {
            dx[k * h * w..][..h * w].copy_from_slice(&da);
            dx[(k + half) * h * w..][..h * w].copy_from_slice(&db);
        }
        dx
    }

    /// dx from the input `x`, the forward's output `y` (its window maxima) and `g`.
    fn bwd<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        x: &[T],
        y: &[T],
        g: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
        (oh, ow): (usize, usize),
    ) -> Vec<T> {
        if self.rescale {
            return self.rescale(x, g, (n * c, h, w), (oh, ow));
        }
        // Each window's first maximum is the first cell equal to the window's maximum, which
        // the forward computed: an early-exit equality scan instead of a running comparison
        // with NaN rules at every cell.
        let p = self.pool;
        let mut dx = vec![T::zero(); n * c * h * w];
        // The windows once a call, not once an output cell (as the forward does).
        let rows: Vec<_> = (0..oh).map(|oy| p.window(oy, h)).collect();
        let columns: Vec<_> = (0..ow).map(|ox| p.window(ox, w)).collect();
        dx.par_chunks_mut(h * w)
            .zip(x.par_chunks(h * w).zip(g.par_chunks(oh * ow)))
            .zip(y.par_chunks(oh * ow))
            .for_each(|((d, (plane, gp)), yp)| {
                for (&(y0, y1, _), (yr, gr)) in rows.iter().zip(yp.chunks(ow).zip(gp.chunks(ow))) {
                    for ((&(x0, x1, _), &m), &gv) in columns.iter().zip(yr).zip(gr) {
                        if let Some(i) = first_equal(plane, w, (y0, y1), (x0, x1), m) {
                            d[i] += gv;
                        }
                    }
                }
            });
        dx
    }
}

impl CustomOp3 for MaxPool2dBackward {
    fn name(&self) -> &'static str {
        "finelens-max-pool2d-backward"
    }

    /// (x, y, g): the input, the forward's output and the output's gradient.
    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let dims @ (n, c, h, w) = dims4(l1, self.name())?;
        let out = (self.pool.out_len(h)?, self.pool.out_len(w)?);
        let expected = n * c * out.0 * out.1;
        for (what, l) in [("output", l2), ("gradient", l3)] {
            if l.shape().elem_count() != expected {
                candle_core::bail!(
                    "max-pool2d backward: the {what} has {} elements, expected {expected}",
                    l.shape().elem_count()
                );
            }
        }
        let storage = run3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, y, g| self.bwd(x, y, g, dims, out),
            |x, y, g| self.bwd(x, y, g, dims, out),
        )?;
        Ok((storage, l1.shape().clone()))
    }
}

struct AvgPool2d {
    pool: Pool2d,
    count_include_pad: bool,
}

impl AvgPool2d {
    fn divisor(
        &self,
        (y0, y1, py): (usize, usize, usize),
        (x0, x1, px): (usize, usize, usize),
    ) -> usize {
        if self.count_include_pad {
            py * px
        } else {
            (y1 - y0) * (x1 - x0)
        }
    }
}

impl PlaneKernel for AvgPool2d {
    fn run<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        x: &[T],
        (n, c, h, w): (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        let p = self.pool;
        let (oh, ow) = (p.out_len(h)?, p.out_len(w)?);
        let mut out = vec![T::zero(); n * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, plane)| {
                for oy in 0..oh {
                    let wy = p.window(oy, h);
                    for ox in 0..ow {
                        let wx = p.window(ox, w);
                        let mut sum = T::zero();
                        for y in wy.0..wy.1 {
                            for x in wx.0..wx.1 {
                                sum += plane[y * w + x];
                            }
                        }
                        o[oy * ow + ox] = sum / T::from(self.divisor(wy, wx)).unwrap();
                    }
                }
            });
        Ok((out, Shape::from((n, c, oh, ow))))
    }
}

impl CustomOp1 for AvgPool2d {
    fn name(&self) -> &'static str {
        "finelens-avg-pool2d"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, self.name(), s, l)
    }

    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let (_, _, h, w) = arg.dims4()?;
        let grad_res = grad_res.contiguous()?;
        let op = AvgPool2dBackward {
            pool: self.pool,
            count_include_pad: self.count_include_pad,
            h,
            w,
        };
        Ok(Some(grad_res.apply_op1_no_bwd(&op)?))
    }
}

/// Spreads each output gradient evenly (by the forward's divisor) over its window.
struct AvgPool2dBackward {
    pool: Pool2d,
    count_include_pad: bool,
    h: usize,
    w: usize,
}

impl PlaneKernel for AvgPool2dBackward {
    fn run<T: Float + WithDType + std::ops::AddAssign>(
        &self,
        g: &[T],
        (n, c, oh, ow): (usize, usize, usize, usize),
    ) -> candle_core::Result<(Vec<T>, Shape)> {
        if self.pool.out_len(self.h)? != oh || self.pool.out_len(self.w)? != ow {
            candle_core::bail!(
                "avg-pool2d backward: gradient shape does not match the pooled input"
            );
        }
        let (h, w, p) = (self.h, self.w, self.pool);
        let fwd = AvgPool2d {
            pool: p,
            count_include_pad: self.count_include_pad,
        };
        let mut dx = vec![T::zero(); n * c * h * w];
        dx.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(d, gp)| {
                for oy in 0..oh {
                    let wy = p.window(oy, h);
                    for ox in 0..ow {
                        let wx = p.window(ox, w);
                        let share = gp[oy * ow + ox] / T::from(fwd.divisor(wy, wx)).unwrap();
                        for y in wy.0..wy.1 {
                            for x in wx.0..wx.1 {
                                d[y * w + x] += share;
                            }
                        }
                    }
                }
            });
        Ok((dx, Shape::from((n, c, h, w))))
    }
}

impl CustomOp1 for AvgPool2dBackward {
    fn name(&self) -> &'static str {
        "finelens-avg-pool2d-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        dispatch(self, self.name(), s, l)
    }
}

/// Max pooling over an N×C×H×W tensor (PyTorch semantics, floor mode), differentiable; under
/// DeepLIFT's rule ([`crate::rules`]) its backward is the rescale rule's.
pub fn max_pool2d(x: &Tensor, pool: Pool2d) -> candle_core::Result<Tensor> {
    let rescale = backward_rule() == BackwardRule::DeepLiftRescale;
    if rescale && x.dims().first().is_none_or(|n| n % 2 != 0) {
        candle_core::bail!(
            "max-pool2d: DeepLIFT needs a batch of inputs followed by as many references"
        );
    }
    x.contiguous()?.apply_op1(MaxPool2d { pool, rescale })
}

/// Average pooling over an N×C×H×W tensor (PyTorch semantics, floor mode), differentiable.
pub fn avg_pool2d(
    x: &Tensor,
    pool: Pool2d,
    count_include_pad: bool,
) -> candle_core::Result<Tensor> {
    x.contiguous()?.apply_op1(AvgPool2d {
        pool,
        count_include_pad,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, randn};
    use candle_core::{DType, Device, Var};

    /// Central finite differences of L(x) = Σ r ⊙ pool(x) against autograd, in f64.
    /// The random weights r make every output's gradient distinct, so a wrong routing or a
    /// wrong scale (candle's 1/k²) shows up; a random input has no ties, so max pool is
    /// differentiable at x.
    fn check_gradient(pool: Pool2d, h: usize, w: usize, avg: Option<bool>, seed: u64) {
        let dev = Device::Cpu;
        let x = randn((2, 3, h, w), 0.0, 1.0, DType::F64, seed);
        let apply = |t: &Tensor| match avg {
            None => max_pool2d(t, pool).unwrap(),
            Some(cip) => avg_pool2d(t, pool, cip).unwrap(),
        };
        let r = randn(apply(&x).shape().clone(), 0.0, 1.0, DType::F64, seed + 1);
        let mut loss = |v: &[f64]| {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), &dev).unwrap();
            (apply(&t) * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };

        let xv = Var::from_tensor(&x).unwrap();
        let l = (apply(xv.as_tensor()) * &r).unwrap().sum_all().unwrap();
        let grads = l.backward().unwrap();
        let g: Vec<f64> = grads
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();

        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut max_err = 0f64;
        for (i, gi) in g.iter().enumerate() {
            let fd = central_difference(&mut loss, &base, i);
            max_err = max_err.max((fd - gi).abs() / (1.0 + fd.abs()));
        }
        assert!(
            max_err < 1e-6,
            "{pool:?} on {h}×{w} (avg={avg:?}): max relative error {max_err:e}"
        );
    }

    const CASES: &[(usize, usize, usize, usize, usize)] = &[
        // (kernel, stride, padding, h, w): the ResNet stem, kernel == stride (where candle is wrong),
        // overlapping windows, odd sizes that don't divide evenly, non-square inputs.
        (3, 2, 1, 8, 8),
        (3, 2, 1, 7, 9),
        (2, 2, 0, 6, 6),
        (2, 2, 0, 7, 5),
        (3, 1, 1, 5, 6),
        (3, 3, 0, 10, 11),
        (4, 2, 2, 9, 7),
        (5, 3, 2, 11, 8),
    ];

    #[test]
    fn max_pool_gradient_matches_finite_differences() {
        for (i, &(k, s, p, h, w)) in CASES.iter().enumerate() {
            check_gradient(Pool2d::new(k, s, p), h, w, None, i as u64);
        }
    }

    #[test]
    fn avg_pool_gradient_matches_finite_differences() {
        for (i, &(k, s, p, h, w)) in CASES.iter().enumerate() {
            check_gradient(Pool2d::new(k, s, p), h, w, Some(true), 100 + i as u64);
            check_gradient(Pool2d::new(k, s, p), h, w, Some(false), 200 + i as u64);
        }
    }

    #[test]
    fn max_pool_forward_matches_hand_computed_values() {
        // 1×1×4×4 input 0..16, 3×3 window, stride 2, padding 1 (the ResNet stem's pool).
        let x = Tensor::arange(0f32, 16.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 1, 4, 4))
            .unwrap();
        let y = max_pool2d(&x, Pool2d::new(3, 2, 1)).unwrap();
        let v: Vec<f32> = y.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(v, vec![5.0, 7.0, 13.0, 15.0]);
    }

    /// The separable forward gives the 2-D scan's values, and the backward routes each output's
    /// gradient to the scan's first maximum, on every case's geometry with ties (values from five
    /// levels) and NaNs (which must win their windows).
    #[test]
    fn separable_max_pool_matches_the_window_scan() {
        for (i, &(k, s, p, h, w)) in CASES.iter().enumerate() {
            let pool = Pool2d::new(k, s, p);
            let (n, c) = (2, 3);
            let mut x: Vec<f64> = (0..n * c * h * w)
                // Five levels: ties within rows and across them in most windows.
                .map(|j| (((j * 7919 + i * 31) % 13) / 3) as f64 - 2.0)
                .collect();
            let at = (i * 5) % x.len();
            x[at] = f64::NAN;
            let t = Var::from_vec(x.clone(), (n, c, h, w), &Device::Cpu).unwrap();
            let out = max_pool2d(t.as_tensor(), pool).unwrap();
            let y: Vec<f64> = out.flatten_all().unwrap().to_vec1().unwrap();
            let (oh, ow) = (pool.out_len(h).unwrap(), pool.out_len(w).unwrap());
            // Distinct upstream gradients, so a wrong routing shows.
            let r: Vec<f64> = (0..y.len()).map(|j| 1.0 + j as f64).collect();
            let rt = Tensor::from_vec(r.clone(), out.dims(), &Device::Cpu).unwrap();
            let grads = (&out * &rt).unwrap().sum_all().unwrap().backward().unwrap();
            let dx: Vec<f64> = grads
                .get(&t)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let mut want_dx = vec![0.0; x.len()];
            for (q, plane) in x.chunks(h * w).enumerate() {
                for oy in 0..oh {
                    for ox in 0..ow {
                        let (y0, y1, _) = pool.window(oy, h);
                        let (x0, x1, _) = pool.window(ox, w);
                        let first = argmax(plane, w, (y0, y1), (x0, x1)).unwrap();
                        let (want, o) = (plane[first], (q * oh + oy) * ow + ox);
                        want_dx[q * h * w + first] += r[o];
                        let got = y[o];
                        assert!(
                            got == want || (got.is_nan() && want.is_nan()),
                            "case {i}, plane {q}, ({oy}, {ox}): {got} vs {want}"
                        );
                    }
                }
            }
            assert_eq!(
                dx, want_dx,
                "case {i}: gradient routed elsewhere than the first maximum"
            );
        }
    }

    #[test]
    fn avg_pool_divisor_follows_count_include_pad() {
        let x = Tensor::ones((1, 1, 3, 3), DType::F32, &Device::Cpu).unwrap();
        let with_pad: Vec<f32> = avg_pool2d(&x, Pool2d::new(3, 2, 1), true)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let without: Vec<f32> = avg_pool2d(&x, Pool2d::new(3, 2, 1), false)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        // The corner window covers 4 real cells of 9: 4/9 counting padding, 1 without.
        assert!((with_pad[0] - 4.0 / 9.0).abs() < 1e-6);
        assert!(without.iter().all(|v| (v - 1.0).abs() < 1e-6));
    }

    #[test]
    fn max_pool_sends_whole_gradient_to_first_maximum_on_ties() {
        // All-equal input: every window's gradient goes to its first cell, undivided
        // (candle's own 2×2 max pool would give 0.25 here).
        let x = Var::from_tensor(&Tensor::ones((1, 1, 4, 4), DType::F32, &Device::Cpu).unwrap())
            .unwrap();
        let y = max_pool2d(x.as_tensor(), Pool2d::new(2, 2, 0)).unwrap();
        let g = y.sum_all().unwrap().backward().unwrap();
        let gx: Vec<f32> = g
            .get(x.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let expected = [
            1., 0., 1., 0., 0., 0., 0., 0., 1., 0., 1., 0., 0., 0., 0., 0.,
        ];
        assert_eq!(gx, expected);
    }

    #[test]
    fn impossible_windows_are_errors_not_panics() {
        let x = Tensor::zeros((1, 1, 2, 2), DType::F32, &Device::Cpu).unwrap();
        assert!(max_pool2d(&x, Pool2d::new(5, 1, 0)).is_err());
        assert!(max_pool2d(&x, Pool2d::new(2, 0, 0)).is_err());
        assert!(max_pool2d(&x, Pool2d::new(2, 1, 2)).is_err());
        assert!(max_pool2d(
            &Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap(),
            Pool2d::new(1, 1, 0)
        )
        .is_err());
    }

    /// DeepLIFT's rule through max-pool alone: with the same output gradient r on an input and
    /// its reference, Σ (x − x′) ⊙ dx = Σ r ⊙ (y − y′) exactly (Captum's `maxpool` rule), with
    /// the ResNet stem's padded 3×3/2 window and odd sizes; the rule is off again afterwards.
    #[test]
    fn deeplift_rule_sums_to_the_output_difference() {
        use crate::rules::{backward_rule, with_backward_rule, BackwardRule};
        let pool = Pool2d::new(3, 2, 1);
        let x = randn((4, 3, 9, 11), 0.0, 1.0, DType::F64, 21);
        let v = Var::from_tensor(&x).unwrap();
        let y = with_backward_rule(BackwardRule::DeepLiftRescale, || max_pool2d(&v, pool)).unwrap();
        assert_eq!(backward_rule(), BackwardRule::Gradient);
        let r = randn((2, 3, 5, 6), 0.0, 1.0, DType::F64, 22);
        let r2 = Tensor::cat(&[&r, &r], 0).unwrap();
        let g = (&y * &r2).unwrap().sum_all().unwrap().backward().unwrap();
        let dx = g.get(&v).unwrap();
        let (xi, xr) = (x.narrow(0, 0, 2).unwrap(), x.narrow(0, 2, 2).unwrap());
        let (yi, yr) = (y.narrow(0, 0, 2).unwrap(), y.narrow(0, 2, 2).unwrap());
        let lhs: f64 = ((xi - xr).unwrap() * dx.narrow(0, 0, 2).unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        let rhs: f64 = ((yi - yr).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!(
            (lhs - rhs).abs() < 1e-12 * (1.0 + rhs.abs()),
            "{lhs} vs {rhs}"
        );
        // An odd batch cannot hold inputs and their references.
        let odd = randn((3, 1, 4, 4), 0.0, 1.0, DType::F64, 23);
        assert!(
            with_backward_rule(BackwardRule::DeepLiftRescale, || max_pool2d(&odd, pool)).is_err()
        );
    }
}
