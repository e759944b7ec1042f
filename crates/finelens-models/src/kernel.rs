//! What this crate's CPU kernels share: the contiguous data of an operand, running a kernel
//! written once for `T: Float` on f32 or f64 storage, and element-wise ops with a backward.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

/// Runs `f` on a thread of rayon's global pool and waits for it. Called from the main thread,
/// the work between parallel sections would otherwise run beside the pool's threads, which spin
/// for a while after each section, one thread more than the cores: on 2 cores the spinning took
/// ≈ 8% of explaining time. On a pool thread, the serial work *is* one of the pool's threads.
pub fn on_pool<R: Send>(f: impl FnOnce() -> R + Send) -> R {
    rayon::scope(|_| f())
}

/// Keeps candle's element-wise ops on the thread that calls them. Candle 0.11 splits an
/// element-wise op over 64 K values between the caller and its own pool of threads (as many more
/// as rayon has), whose threads then spin 25,000 rounds waiting for the next op: on 2 cores a
/// third thread spinning beside rayon's two, ≈ 11% of a 64-px training step's samples. Without
/// that pool (`CANDLE_NUM_THREADS=1`) training at 64 px ran ≈ 10% faster (5 alternating runs,
/// median 129 → 142 images/s), and explaining, text fine-tuning and text attributions measured
/// the same or faster (two alternating runs each: the machine's noise); the ops it serialises
/// are memory-bound adds and fills. Call first thing in `main`, before any other thread starts
/// (setting the environment is only sound then); a user's own `CANDLE_NUM_THREADS` wins.
pub fn serial_candle_elementwise() {
    if std::env::var_os("CANDLE_NUM_THREADS").is_none() {
        std::env::set_var("CANDLE_NUM_THREADS", "1");
    }
}

/// The contiguous values of one operand (a custom op's storage and layout).
pub fn contiguous<'a, T>(data: &'a [T], layout: &Layout, op: &str) -> candle_core::Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("{op}: operands must be contiguous"),
    }
}

/// `f` on the values of `tensors` (CPU, contiguous, of type T), read in place: the frozen
/// parameters an op holds beside its graph operands.
pub(crate) fn with_slices<T: candle_core::WithDType, R>(
    op: &str,
    tensors: &[Tensor],
    f: impl FnOnce(&[&[T]]) -> R,
) -> candle_core::Result<R> {
    let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
    let mut slices = Vec::with_capacity(guards.len());
    for (storage, layout) in &guards {
        let candle_core::Storage::Cpu(cpu) = &**storage else {
            candle_core::bail!("{op}: parameters must be on the CPU");
        };
        slices.push(contiguous(T::cpu_storage_as_slice(cpu)?, layout, op)?);
    }
    Ok(f(&slices))
}

/// One operand's kernel, on f32 or f64 storage.
pub(crate) fn run1(
    op: &str,
    operand: (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    try_run1(op, operand, |a| Ok(f32(a)), |a| Ok(f64(a)))
}

/// [`run1`] for a kernel that can fail.
pub(crate) fn try_run1(
    op: &str,
    (s, l): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32]) -> candle_core::Result<Vec<f32>>,
    f64: impl FnOnce(&[f64]) -> candle_core::Result<Vec<f64>>,
) -> candle_core::Result<CpuStorage> {
    Ok(match s {
        CpuStorage::F32(a) => CpuStorage::F32(f32(contiguous(a, l, op)?)?),
        CpuStorage::F64(a) => CpuStorage::F64(f64(contiguous(a, l, op)?)?),
        other => candle_core::bail!(
            "{op}: only f32 and f64 are supported, got {:?}",
            other.dtype()
        ),
    })
}

/// Two operands' kernel, on f32 or f64 storage (both the same).
pub(crate) fn run2(
    op: &str,
    first: (&CpuStorage, &Layout),
    second: (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32], &[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    try_run2(
        op,
        first,
        second,
        |a, b| Ok(f32(a, b)),
        |a, b| Ok(f64(a, b)),
    )
}

/// [`run2`] for a kernel that can fail.
pub(crate) fn try_run2(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32], &[f32]) -> candle_core::Result<Vec<f32>>,
    f64: impl FnOnce(&[f64], &[f64]) -> candle_core::Result<Vec<f64>>,
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2) {
        (CpuStorage::F32(a), CpuStorage::F32(b)) => {
            CpuStorage::F32(f32(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?)
        }
        (CpuStorage::F64(a), CpuStorage::F64(b)) => {
            CpuStorage::F64(f64(contiguous(a, l1, op)?, contiguous(b, l2, op)?)?)
        }
        (a, b) => candle_core::bail!(
            "{op}: operands must be both f32 or both f64, got {:?} and {:?}",
            a.dtype(),
            b.dtype()
        ),
    })
}

/// What a fused op's forward keeps for its backward, of whichever float type it ran on.
#[derive(Default)]
pub(crate) struct Kept(std::sync::Mutex<Option<Box<dyn std::any::Any + Send>>>);

impl Kept {
    /// A fused op's forward on its frozen `params` (read in place): the output, and what it
    /// returns for the backward put here when `keep` (a backward will follow).
    pub fn forward<T: candle_core::WithDType, S: std::any::Any + Send>(
        &self,
        op: &str,
        params: &[Tensor],
        keep: bool,
        forward: impl FnOnce(&[&[T]]) -> (Vec<T>, S),
    ) -> candle_core::Result<Vec<T>> {
        let (y, kept) = with_slices(op, params, forward)?;
        if keep {
            self.put(kept);
        }
        Ok(y)
    }

    /// The matching backward: `backward` on what the forward kept and the frozen `params`.
    pub fn backward<T: candle_core::WithDType, S: std::any::Any>(
        &self,
        op: &str,
        params: &[Tensor],
        backward: impl FnOnce(&S, &[&[T]]) -> Vec<T>,
    ) -> candle_core::Result<Vec<T>> {
        self.with(op, |kept: &S| {
            with_slices(op, params, |p| backward(kept, p))
        })?
    }

    fn put<S: std::any::Any + Send>(&self, s: S) {
        *self.0.lock().expect("not poisoned") = Some(Box::new(s));
    }

    /// `f` on what the forward kept; an error when it kept nothing of type S.
    fn with<S: std::any::Any, R>(
        &self,
        op: &str,
        f: impl FnOnce(&S) -> R,
    ) -> candle_core::Result<R> {
        let kept = self.0.lock().expect("not poisoned");
        match kept.as_ref().and_then(|k| k.downcast_ref::<S>()) {
            Some(s) => Ok(f(s)),
            None => candle_core::bail!("{op}: backward without the forward's activations"),
        }
    }
}

/// Three operands' kernel, on f32 or f64 storage (all the same).
pub(crate) fn run3(
    op: &str,
    (s1, l1): (&CpuStorage, &Layout),
    (s2, l2): (&CpuStorage, &Layout),
    (s3, l3): (&CpuStorage, &Layout),
    f32: impl FnOnce(&[f32], &[f32], &[f32]) -> Vec<f32>,
    f64: impl FnOnce(&[f64], &[f64], &[f64]) -> Vec<f64>,
) -> candle_core::Result<CpuStorage> {
    Ok(match (s1, s2, s3) {
        (CpuStorage::F32(a), CpuStorage::F32(b), CpuStorage::F32(c)) => CpuStorage::F32(f32(
            contiguous(a, l1, op)?,
            contiguous(b, l2, op)?,
            contiguous(c, l3, op)?,
        )),
        (CpuStorage::F64(a), CpuStorage::F64(b), CpuStorage::F64(c)) => CpuStorage::F64(f64(
            contiguous(a, l1, op)?,
            contiguous(b, l2, op)?,
            contiguous(c, l3, op)?,
        )),
        (a, _, _) => candle_core::bail!(
            "{op}: operands must be all f32 or all f64, got {:?} first",
            a.dtype()
        ),
    })
}

/// A kernel over one operand, per float type.
pub(crate) type Kernel1 = (fn(&[f32]) -> Vec<f32>, fn(&[f64]) -> Vec<f64>);

/// A kernel over two operands, per float type.
pub(crate) type Kernel2 = (
    fn(&[f32], &[f32]) -> Vec<f32>,
    fn(&[f64], &[f64]) -> Vec<f64>,
);

/// An element-wise op with a hand-written backward: y = f(x), and dx = g(s, dy) where s is the
/// op's input or its output (`from_output`), each written once per float type.
pub(crate) struct Pointwise {
    /// The op's name and its backward's.
    pub names: (&'static str, &'static str),
    pub from_output: bool,
    pub forward: Kernel1,
    pub backward: Kernel2,
}

impl Pointwise {
    /// f(x), differentiable when x is tracked.
    pub fn apply(&'static self, x: &Tensor) -> candle_core::Result<Tensor> {
        let x = x.contiguous()?;
        if x.track_op() {
            x.apply_op1(Forward(self))
        } else {
            x.apply_op1_no_bwd(&Forward(self))
        }
    }

    /// dx = g(s, dy) outside the graph, s the op's saved input or output: for an op that ends
    /// in this one (a batch norm ending in a ReLU).
    pub fn backward_of(
        &'static self,
        saved: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Tensor> {
        let grad = grad.detach().contiguous()?;
        saved
            .detach()
            .contiguous()?
            .apply_op2_no_bwd(&grad, &Backward(self))
    }
}

struct Forward(&'static Pointwise);

impl CustomOp1 for Forward {
    fn name(&self) -> &'static str {
        self.0.names.0
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let (f32, f64) = self.0.forward;
        Ok((run1(self.0.names.0, (s, l), f32, f64)?, l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let saved = if self.0.from_output { y } else { x };
        Ok(Some(self.0.backward_of(saved, grad)?))
    }
}

/// dx from (the saved tensor, dy).
struct Backward(&'static Pointwise);

impl CustomOp2 for Backward {
    fn name(&self) -> &'static str {
        self.0.names.1
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (f32, f64) = self.0.backward;
        let out = run2(self.0.names.1, (s1, l1), (s2, l2), f32, f64)?;
        Ok((out, l1.shape().clone()))
    }
}

/// A matrix over a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct View<'a, T> {
    pub(crate) data: &'a [T],
    pub(crate) rows: usize,
    pub(crate) cols: usize,
    pub(crate) rs: usize,
    pub(crate) cs: usize,
}

impl<'a, T> View<'a, T> {
    /// Row-major.
    pub fn rows(data: &'a [T], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// Row-major rows of `cols` values, `rs` apart: a block of columns of a wider matrix.
    pub fn strided(data: &'a [T], rows: usize, cols: usize, rs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs: 1,
        }
    }

    /// The transpose, without a copy.
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn fits(&self) -> bool {
        self.rows == 0
            || self.cols == 0
            || (self.rows - 1) * self.rs + (self.cols - 1) * self.cs < self.data.len()
    }
}

/// dst = a·b, or dst += a·b with `accumulate`; dst is row-major with row stride `dst_rs`. The
/// `gemm` crate candle runs on, multi-threaded on the rayon pool.
pub fn gemm_into<T: Float + 'static>(
    dst: &mut [T],
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    accumulate: bool,
) {
    let threads = rayon::current_num_threads();
    let parallelism = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    gemm_on(dst, dst_rs, a, b, accumulate, parallelism);
}

/// [`gemm_into`] with the inner dimension split between the pool's threads: each thread a serial
/// GEMM over its share of k into a buffer of its own (the first into dst), the buffers summed
/// into dst at the end. `gemm` shares a product among threads by blocks of the output, so a
/// small output with a long inner dimension — a convolution's kernel gradient, C_out × C_in·k·k
/// summed over every pixel of the batch — leaves a core idle or splits too finely: a 64-px
/// ResNet-18's stem and layer1 kernel gradients ran at 84 and 194 GFLOP/s on two cores, against
/// 380–440 for products `gemm` splits well.
pub fn gemm_split_inner_into<T: Float + Send + Sync + 'static>(
    dst: &mut [T],
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    accumulate: bool,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    let parts = rayon::current_num_threads().min(k / MIN_INNER_PART).max(1);
    if parts == 1 || m == 0 || n == 0 {
        return gemm_into(dst, dst_rs, a, b, accumulate);
    }
    assert!(
        a.cols == b.rows && a.fits() && b.fits(),
        "gemm_split_inner_into: operands out of shape"
    );
    // Part p's share of the inner dimension: columns of a, rows of b.
    let share = |p: usize| {
        let (k0, k1) = (p * k / parts, (p + 1) * k / parts);
        let a = View {
            data: &a.data[k0 * a.cs..],
            cols: k1 - k0,
            ..a
        };
        let b = View {
            data: &b.data[k0 * b.rs..],
            rows: k1 - k0,
            ..b
        };
        (a, b)
    };
    let mut partial = Scratch::new((parts - 1) * m * n);
    rayon::join(
        || {
            let (a, b) = share(0);
            gemm_serial_into(dst, dst_rs, a, b, accumulate);
        },
        || {
            partial
                .par_chunks_mut(m * n)
                .enumerate()
                .for_each(|(i, buf)| {
                    let (a, b) = share(i + 1);
                    gemm_serial_into(buf, n, a, b, false);
                })
        },
    );
    dst.par_chunks_mut(dst_rs)
        .take(m)
        .enumerate()
        .for_each(|(i, row)| {
            for part in partial.chunks_exact(m * n) {
                for (d, &v) in row[..n].iter_mut().zip(&part[i * n..][..n]) {
                    *d = *d + v;
                }
            }
        });
}

/// The shortest share of the inner dimension [`gemm_split_inner_into`] gives a thread.
const MIN_INNER_PART: usize = 256;

/// [`gemm_into`] on the calling thread alone: for small products that are themselves one of
/// many tasks in parallel (attention's per-head products).
pub fn gemm_serial_into<T: Float + 'static>(
    dst: &mut [T],
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    accumulate: bool,
) {
    gemm_on(dst, dst_rs, a, b, accumulate, gemm::Parallelism::None);
}

fn gemm_on<T: Float + 'static>(
    dst: &mut [T],
    dst_rs: usize,
    a: View<T>,
    b: View<T>,
    accumulate: bool,
    parallelism: gemm::Parallelism,
) {
    let (m, n, k) = (a.rows, b.cols, a.cols);
    assert!(
        a.cols == b.rows && a.fits() && b.fits(),
        "gemm_into: operands out of shape"
    );
    assert!(
        m == 0 || n == 0 || (m - 1) * dst_rs + n <= dst.len(),
        "gemm_into: destination out of shape"
    );
    if m == 0 || n == 0 {
        return;
    }
    // SAFETY: the asserts above keep every index `gemm` touches inside the three slices, and dst
    // (borrowed mutably) cannot alias a or b.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            accumulate,
            a.data.as_ptr(),
            a.cs as isize,
            a.rs as isize,
            b.data.as_ptr(),
            b.cs as isize,
            b.rs as isize,
            T::one(),
            T::one(),
            false,
            false,
            false,
            parallelism,
        );
    }
}

/// `dst` (cols × rows, row-major) = the transpose of `src` (rows × cols, row-major), one band of
/// [`BAND`] destination rows per task. Each 16 × BAND block goes through a buffer on the stack,
/// so every destination cache line is written whole, at once: written in place, a band's rows
/// (a power-of-two-ish stride apart for conv kernels: 4,608 floats for 512 × 3 × 3) fell into
/// two cache sets, and the lines being filled evicted each other (3 ms for a 512 × 4,608 kernel).
pub(crate) fn transpose_into<T: Float + Send + Sync>(
    src: &[T],
    rows: usize,
    cols: usize,
    dst: &mut [T],
) {
    const BAND: usize = 32;
    const LINE: usize = 16;
    assert!(
        src.len() == rows * cols && dst.len() == rows * cols,
        "transpose_into: operands out of shape"
    );
    if rows == 0 || cols == 0 {
        return;
    }
    use rayon::prelude::*;
    dst.par_chunks_mut(BAND * rows)
        .enumerate()
        .for_each(|(band, out)| {
            let c0 = band * BAND;
            let cw = out.len() / rows;
            let mut buf = [[T::zero(); LINE]; BAND];
            for r0 in (0..rows).step_by(LINE) {
                let rh = LINE.min(rows - r0);
                for (i, line) in src[r0 * cols..].chunks(cols).take(rh).enumerate() {
                    for (b, &v) in buf.iter_mut().zip(&line[c0..c0 + cw]) {
                        b[i] = v;
                    }
                }
                for (c, b) in buf.iter().take(cw).enumerate() {
                    out[c * rows + r0..][..rh].copy_from_slice(&b[..rh]);
                }
            }
        });
}

/// A work buffer of at least `len` values, taken from this thread's pool and given back on drop,
/// for large temporaries that a kernel overwrites before it reads them: allocating and zeroing
/// them on every call cost as much as a 56×56 Winograd convolution's transforms (tens of MB a
/// call). It derefs to exactly `len` values, whatever the previous user left in them. At most
/// [`SCRATCH_KEPT`] buffers stay in a thread's pool.
pub(crate) struct Scratch<T: 'static>(Vec<T>, usize);

/// Buffers a thread's pool keeps between calls (a Winograd call uses three, im2col two).
const SCRATCH_KEPT: usize = 4;

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<Box<dyn std::any::Any>>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

impl<T: Float + 'static> Scratch<T> {
    pub(crate) fn new(len: usize) -> Self {
        if len == 0 {
            return Self(Vec::new(), 0);
        }
        // The smallest pooled buffer that is long enough, else the longest (grown): a small
        // request does not take the buffer a large one would then have to allocate again.
        let taken = SCRATCH.with(|pool| {
            let mut pool = pool.borrow_mut();
            let lens: Vec<(usize, usize)> = (0..pool.len())
                .filter_map(|i| pool[i].downcast_ref::<Vec<T>>().map(|v| (i, v.len())))
                .collect();
            let fits = lens
                .iter()
                .filter(|&&(_, n)| n >= len)
                .min_by_key(|&&(_, n)| n);
            let at = fits.or_else(|| lens.iter().max_by_key(|&&(_, n)| n));
            at.map(|&(i, _)| pool.swap_remove(i))
        });
        let mut v = taken
            .and_then(|b| b.downcast::<Vec<T>>().ok())
            .map_or_else(Vec::new, |b| *b);
        if v.len() < len {
            v.resize(len, T::zero());
        }
        Self(v, len)
    }
}

impl<T: 'static> Drop for Scratch<T> {
    fn drop(&mut self) {
        let v = std::mem::take(&mut self.0);
        if v.is_empty() {
            return;
        }
        SCRATCH.with(|pool| {
            let mut pool = pool.borrow_mut();
            if pool.len() < SCRATCH_KEPT {
                pool.push(Box::new(v));
            }
        });
    }
}

impl<T: 'static> std::ops::Deref for Scratch<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.0[..self.1]
    }
}

impl<T: 'static> std::ops::DerefMut for Scratch<T> {
    fn deref_mut(&mut self) -> &mut [T] {
        &mut self.0[..self.1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The inner-dimension split gives the plain product, into a destination wider than the
    /// product (a row stride past n), with and without accumulating, over 1, 2 and 3 threads
    /// (parts of unequal length) and with k too short to split; f64, against the sum written out.
    #[test]
    fn split_inner_gemm_equals_the_product() {
        let value =
            |i: usize, salt: usize| ((i * 7919 + salt * 104_729) % 1009) as f64 / 504.5 - 1.0;
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            for (m, n, k) in [(5, 7, 1001), (3, 2, 3 * MIN_INNER_PART + 1), (4, 6, 100)] {
                let a: Vec<f64> = (0..m * k).map(|i| value(i, 1)).collect();
                // b as the transpose of a row-major n × k matrix, like a kernel gradient's dYᵀ.
                let b: Vec<f64> = (0..n * k).map(|i| value(i, 2)).collect();
                let dst_rs = n + 3;
                for accumulate in [false, true] {
                    let start: Vec<f64> = (0..m * dst_rs).map(|i| value(i, 3)).collect();
                    let mut dst = start.clone();
                    pool.install(|| {
                        gemm_split_inner_into(
                            &mut dst,
                            dst_rs,
                            View::rows(&a, m, k),
                            View::rows(&b, n, k).t(),
                            accumulate,
                        )
                    });
                    for i in 0..m {
                        for j in 0..dst_rs {
                            let expected = if j < n {
                                let sum: f64 = (0..k).map(|p| a[i * k + p] * b[j * k + p]).sum();
                                sum + if accumulate {
                                    start[i * dst_rs + j]
                                } else {
                                    0.0
                                }
                            } else {
                                start[i * dst_rs + j]
                            };
                            let got = dst[i * dst_rs + j];
                            assert!(
                                (got - expected).abs() < 1e-10,
                                "{threads} threads, {m}×{n}×{k}, accumulate {accumulate}: \
                                 ({i}, {j}) is {got}, not {expected}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// Every element lands at its transposed place, for shapes that are and are not multiples
    /// of the tile, and one-wide ones.
    #[test]
    fn transpose_moves_every_element() {
        for (rows, cols) in [
            (1, 1),
            (1, 70),
            (70, 1),
            (32, 32),
            (33, 65),
            (100, 7),
            (64, 576),
        ] {
            let src: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            let mut dst = vec![f32::NAN; rows * cols];
            transpose_into(&src, rows, cols, &mut dst);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(
                        dst[c * rows + r],
                        src[r * cols + c],
                        "{rows}×{cols} at ({r}, {c})"
                    );
                }
            }
        }
    }

    /// A buffer comes back to the next request that fits (no allocation), a small request takes
    /// the smallest buffer that fits rather than the largest, types do not mix, and the pool
    /// keeps at most SCRATCH_KEPT buffers.
    #[test]
    fn scratch_reuses_the_best_fitting_buffer() {
        // Each test runs on its own thread: this pool starts empty.
        let (big, small) = (Scratch::<f32>::new(1000), Scratch::<f32>::new(10));
        let (big_at, small_at) = (big.as_ptr(), small.as_ptr());
        drop((big, small));
        let a = Scratch::<f32>::new(5);
        assert_eq!(
            a.as_ptr(),
            small_at,
            "a small request took the large buffer"
        );
        let b = Scratch::<f32>::new(600);
        assert_eq!(b.as_ptr(), big_at);
        assert_eq!(b.len(), 600);
        let c = Scratch::<f64>::new(5);
        assert!(c.iter().all(|&v| v == 0.0), "a new buffer starts zeroed");
        drop((a, b, c));
        let many: Vec<Scratch<f32>> = (0..SCRATCH_KEPT + 3).map(|_| Scratch::new(8)).collect();
        drop(many);
        assert_eq!(SCRATCH.with(|pool| pool.borrow().len()), SCRATCH_KEPT);
    }
}
