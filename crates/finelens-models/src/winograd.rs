//! 3×3 convolutions with stride 1 and padding 1 — about five sixths of a ResNet-18's
//! multiply-adds — by Winograd's minimal filtering F(2×2, 3×3) (Lavin & Gray 2016, "Fast
//! Algorithms for Convolutional Neural Networks", §4). Each 2×2 output tile comes from its 4×4
//! input tile d (one pixel of padding around the image) as
//!
//!   Y = Aᵀ [ Σ_c (G g_c Gᵀ) ⊙ (Bᵀ d_c B) ] A,
//!
//! 16 multiplications per channel pair and tile where the direct sum needs 36. Per cell ξ of the
//! 4×4 transformed tile the channel sum is one GEMM, U_ξ (C_out × C_in) · V_ξ (C_in × tiles): 16
//! GEMMs on 2.25× fewer FLOPs than im2col's one, and V is 4× the input where im2col's columns
//! are 9×. F(2×2, 3×3)'s transforms hold only 0, ±1 and ±½, so its rounding stays that of the
//! direct sum; larger tiles (F(4×4, 3×3), 4× fewer multiplications) have transforms with
//! entries up to 8 whose error grows visibly in f32, and are not used.
//!
//! The input gradient of this convolution is the same convolution of dY with the kernel rotated
//! by 180° and its two channel axes swapped, so one routine serves both directions. The kernel's
//! own gradient (training alone needs it) is the forward's transforms transposed: F(3×3, 2×2)
//! over the same tiles, with dY's 2×2 tiles as the filters.

use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::{gemm_serial_into, Scratch, View};

/// Slots (GEMM columns) a chunk of the batch aims at: its transformed input and products stay
/// within a few MB of cache while the 16 GEMMs are still wide. Measured at 56×56 × 64 channels,
/// batch 8, from 256 to 8,192: 1,024 fastest (256 lost 1.5× to chunk overheads, 8,192 1.3× to
/// memory traffic).
const CHUNK_SLOTS: usize = 1024;

/// Cells of a transformed tile (4×4).
const CELLS: usize = 16;

/// What transforming the kernel costs, in the multiply-adds per channel pair it must save to pay
/// for itself: measured on 512 × 512 pairs at ≈ 2–3 ms a call (16·C_out·C_in values written and
/// read back, memory-bound), against ≈ 1 ms for the 115 M multiply-adds of a 7×7 layer.
const KERNEL_TRANSFORM_COST: usize = 2000;

/// Output pixels per image below which im2col stays faster whatever the batch: on a 7×7 plane
/// 20% of the slots hold no tile and the 4×4 tiles overhang by a row and a column, so F(2×2, 3×3)
/// does 73% of im2col's multiply-adds and loses on the transforms; measured against im2col at
/// batch 8, 18 and 32: 7×7, 8×8, 4×4 and 2×2 slower, 16×16 even, 14×14 and 28×28 faster by
/// 1.3–1.5×, 56×56 even to 1.2×.
const MIN_PIXELS: usize = 14 * 14;

/// A 3×3, stride-1, padding-1 convolution's shapes: N images of C_in × H × W in, C_out × H × W
/// out.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Winograd {
    pub(crate) n: usize,
    pub(crate) c_in: usize,
    pub(crate) c_out: usize,
    pub(crate) h: usize,
    pub(crate) w: usize,
}

/// Where an image's tiles sit: `rows` × `cols` slots, tile (ty, tx) at ty·cols + tx. The last
/// column of slots (tx = tw) holds no tile: with it, a tile row's neighbour one slot along is
/// always in the same flat vector, so every transform is one long contiguous sweep over the
/// slots whatever the image's width (its products are computed and ignored: 1/(tw + 1) more
/// GEMM columns, 3% at 56×56 and 20% at 7×7).
#[derive(Debug, Clone, Copy)]
struct Slots {
    rows: usize,
    cols: usize,
}

impl Slots {
    fn of(h: usize, w: usize) -> Self {
        Self {
            rows: h.div_ceil(2),
            cols: w.div_ceil(2) + 1,
        }
    }

    fn len(&self) -> usize {
        self.rows * self.cols
    }
}

impl Winograd {
    /// Whether F(2×2, 3×3) is cheaper than im2col here: a plane of at least [`MIN_PIXELS`], and
    /// the multiply-adds per channel pair it saves over the batch (9 a pixel against 16 a slot)
    /// outweigh transforming the kernel.
    pub(crate) fn pays(&self) -> bool {
        let direct = 9 * self.h * self.w;
        let ours = CELLS * Slots::of(self.h, self.w).len();
        self.h * self.w >= MIN_PIXELS
            && self.n * direct.saturating_sub(ours) >= KERNEL_TRANSFORM_COST
    }

    /// Y = conv(x, s ⊙ w) (+ a bias per output channel): x N×C_in×H×W, w C_out×C_in×3×3, s a
    /// scale per output channel (a folded batch norm's, applied in the kernel transform).
    pub(crate) fn forward<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        w: &[T],
        scale: Option<&[T]>,
        bias: Option<&[T]>,
    ) -> Vec<T> {
        let u = transform_kernel(w, scale, self.c_out, self.c_in, false);
        self.convolve(
            x,
            self.c_in,
            self.c_out,
            &u,
            bias,
            &self.chunks(CHUNK_SLOTS),
        )
    }

    /// dX = conv(dY, rot180(w) with C_in and C_out swapped), the forward's adjoint.
    pub(crate) fn input_grad<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        w: &[T],
        scale: Option<&[T]>,
    ) -> Vec<T> {
        let u = transform_kernel(w, scale, self.c_out, self.c_in, true);
        self.convolve(
            dy,
            self.c_out,
            self.c_in,
            &u,
            None,
            &self.chunks(CHUNK_SLOTS),
        )
    }

    /// dW for [`Self::forward`]'s kernel, by the same transforms transposed: the forward is
    /// y = Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A per tile, so ⟨dy, y⟩ = ⟨Gᵀ[(A dy Aᵀ) ⊙ (Bᵀ d B)]G, g⟩ and
    ///
    ///   dW_oi = Gᵀ [ Σ_tiles (A dY_o Aᵀ) ⊙ (Bᵀ d_i B) ] G,
    ///
    /// the tile sum per cell ξ one GEMM, D_ξ (C_out × tiles) · V_ξᵀ (tiles × C_in), 2.25× fewer
    /// multiply-adds than im2col's and no columns to lay out (the input's transform is the
    /// forward's). Transforms of 0, ±1 and ±½ again: the rounding stays the direct sum's.
    pub(crate) fn kernel_grad<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        x: &[T],
    ) -> Vec<T> {
        self.kernel_grad_in(dy, x, &self.chunks(CHUNK_SLOTS))
    }

    fn kernel_grad_in<T: Float + Send + Sync + 'static>(
        &self,
        dy: &[T],
        x: &[T],
        chunks: &[Vec<Piece>],
    ) -> Vec<T> {
        let (h, w, ci, co) = (self.h, self.w, self.c_in, self.c_out);
        let hw = h * w;
        let slots = Slots::of(h, w);
        let slots_of = |p: &Piece| p.rows.len() * slots.cols;
        let widest = widest_chunk(slots, chunks);
        // V as [c][ξ][slot], D as [o][ξ][slot], the sums M as [ξ][o][c].
        let mut v = Scratch::new(CELLS * ci * (widest | 1));
        let mut d = Scratch::new(CELLS * co * (widest | 1));
        let mut m = vec![T::zero(); CELLS * co * ci];
        for (i, chunk) in chunks.iter().enumerate() {
            let q: usize = chunk.iter().map(slots_of).sum();
            // Each cell's row of slots `qs` apart, an odd number of cache lines' worth: the
            // GEMMs below pack D_ξ and V_ξ (64-plus rows read side by side), and rows a
            // near-power-of-two apart (16·1,008 floats at 16×16, batch 32) all fell into a few
            // cache sets.
            let qs = q | 1;
            let v = &mut v[..CELLS * ci * qs];
            self.transform_chunk(x, ci, chunk, v, qs);
            let d = &mut d[..CELLS * co * qs];
            d.par_chunks_mut(CELLS * qs)
                .enumerate()
                .for_each(|(o, dc)| {
                    let mut at = 0;
                    for p in chunk {
                        let plane = &dy[(p.image * co + o) * hw..][..hw];
                        transform_gradient(plane, (h, w), slots, p.rows.clone(), dc, qs, at);
                        at += slots_of(p);
                    }
                });
            let (v, d) = (&*v, &*d);
            m.par_chunks_mut(co * ci)
                .enumerate()
                .for_each(|(cell, mc)| {
                    gemm_serial_into(
                        mc,
                        ci,
                        View::strided(&d[cell * qs..], co, q, CELLS * qs),
                        View::strided(&v[cell * qs..], ci, q, CELLS * qs).t(),
                        i > 0,
                    );
                });
        }
        // Gᵀ M G per channel pair, Gᵀ = [[1, ½, ½, 0], [0, ½, −½, 0], [0, ½, ½, 1]].
        let half = T::one() / (T::one() + T::one());
        let g = |m: [T; 4]| {
            let (sum, diff) = ((m[1] + m[2]) * half, (m[1] - m[2]) * half);
            [m[0] + sum, diff, sum + m[3]]
        };
        let mut dw = vec![T::zero(); co * ci * 9];
        dw.par_chunks_mut(9).enumerate().for_each(|(pair, out)| {
            let cell = |xi: usize| m[xi * co * ci + pair];
            // Down each column of M, then along each of the three rows.
            let cols: [[T; 3]; 4] =
                std::array::from_fn(|j| g(std::array::from_fn(|i| cell(4 * i + j))));
            for r in 0..3 {
                out[3 * r..][..3].copy_from_slice(&g(std::array::from_fn(|j| cols[j][r])));
            }
        });
        dw
    }

    /// The chunks the batch is transformed in: whole images while they fit [`CHUNK_SLOTS`],
    /// else each image in runs of tile rows of about that many slots.
    fn chunks(&self, target: usize) -> Vec<Vec<Piece>> {
        let slots = Slots::of(self.h, self.w);
        if slots.len() >= target {
            let runs = slots.len().div_ceil(target).min(slots.rows);
            (0..self.n)
                .flat_map(|image| {
                    (0..runs).map(move |r| {
                        vec![Piece {
                            image,
                            rows: r * slots.rows / runs..(r + 1) * slots.rows / runs,
                        }]
                    })
                })
                .collect()
        } else {
            let per = (target / slots.len()).max(1);
            (0..self.n)
                .step_by(per)
                .map(|n0| {
                    (n0..(n0 + per).min(self.n))
                        .map(|image| Piece {
                            image,
                            rows: 0..slots.rows,
                        })
                        .collect()
                })
                .collect()
        }
    }

    /// Bᵀ d B for every channel of `x` (N × `ci` × H × W) and every tile of `chunk`, into `v` as
    /// [c][ξ][slot] with a cell's row of slots `stride` apart, one channel per task.
    fn transform_chunk<T: Float + Send + Sync>(
        &self,
        x: &[T],
        ci: usize,
        chunk: &[Piece],
        v: &mut [T],
        stride: usize,
    ) {
        let (h, w) = (self.h, self.w);
        let hw = h * w;
        let slots = Slots::of(h, w);
        let slots_of = |p: &Piece| p.rows.len() * slots.cols;
        // Each task's scratch fits the chunk's longest piece.
        let piece = chunk.iter().map(slots_of).max().unwrap_or(0);
        v.par_chunks_mut(CELLS * stride)
            .enumerate()
            .for_each(|(c, vc)| {
                let mut scratch = vec![T::zero(); 12 * (piece + slots.cols + 1)];
                let mut at = 0;
                for p in chunk {
                    let plane = &x[(p.image * ci + c) * hw..][..hw];
                    let rows = p.rows.clone();
                    transform_input(plane, (h, w), slots, rows, &mut scratch, vc, stride, at);
                    at += slots_of(p);
                }
            });
    }

    /// The convolution of `x` (N × `ci` × H × W) with the transformed kernel `u` (`co` × 16 ×
    /// `ci`) into N × `co` × H × W, chunk by chunk.
    fn convolve<T: Float + Send + Sync + 'static>(
        &self,
        x: &[T],
        ci: usize,
        co: usize,
        u: &[T],
        bias: Option<&[T]>,
        chunks: &[Vec<Piece>],
    ) -> Vec<T> {
        let (h, w) = (self.h, self.w);
        let hw = h * w;
        let slots = Slots::of(h, w);
        let mut y = vec![T::zero(); self.n * co * hw];
        if self.n == 0 || co == 0 || hw == 0 {
            return y;
        }
        let slots_of = |p: &Piece| p.rows.len() * slots.cols;
        let widest = widest_chunk(slots, chunks);
        // V as [c][ξ][slot] (each channel's rows contiguous, written by one task), the products
        // M as [ξ][o][slot] (each GEMM's destination contiguous).
        let mut v = Scratch::new(CELLS * ci * widest);
        let mut m = Scratch::new(CELLS * co * widest);
        for chunk in chunks {
            let q: usize = chunk.iter().map(slots_of).sum();
            let v = &mut v[..CELLS * ci * q];
            self.transform_chunk(x, ci, chunk, v, q);
            let v = &*v;
            m[..CELLS * co * q]
                .par_chunks_mut(co * q)
                .enumerate()
                .for_each(|(cell, mc)| {
                    gemm_serial_into(
                        mc,
                        q,
                        View::strided(&u[cell * ci..], co, ci, CELLS * ci),
                        View::strided(&v[cell * q..], ci, q, CELLS * q),
                        false,
                    );
                });
            let m = &m[..CELLS * co * q];
            // A chunk's pieces are of consecutive images, one piece an image.
            let first = chunk[0].image;
            y[first * co * hw..(first + chunk.len()) * co * hw]
                .par_chunks_mut(hw)
                .enumerate()
                .for_each(|(plane, out)| {
                    let (i, o) = (plane / co, plane % co);
                    let p = &chunk[i];
                    let at: usize = chunk[..i].iter().map(slots_of).sum();
                    let b = bias.map_or(T::zero(), |b| b[o]);
                    let s = slots_of(p);
                    let mut scratch = vec![T::zero(); 4 * s];
                    let cells = |cell: usize| &m[(cell * co + o) * q + at..][..s];
                    transform_output(cells, b, (h, w), slots, p.rows.clone(), &mut scratch, out);
                });
        }
        y
    }
}

/// The slots of the widest of `chunks`: what the work buffers must hold per cell and channel.
fn widest_chunk(slots: Slots, chunks: &[Vec<Piece>]) -> usize {
    chunks
        .iter()
        .map(|c| c.iter().map(|p| p.rows.len() * slots.cols).sum::<usize>())
        .max()
        .unwrap_or(0)
}

/// Tile rows `rows` of one image: a chunk's share of it.
#[derive(Debug, Clone)]
struct Piece {
    image: usize,
    rows: std::ops::Range<usize>,
}

/// Bᵀ d B for every tile of one channel's plane, into `out` (cell ξ of slot k at
/// ξ·stride + at + k), with Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0], [0, −1, 1, 0], [0, 1, 0, −1]].
///
/// Tile (ty, tx) reads padded rows 2ty..2ty+4 and columns 2tx..2tx+4 (padded index = input
/// index + 1). Split the padded plane by row and column parity into four planes P[rp][cp] of
/// slots (P[rp][cp][a][k] = padded[2a + rp][2k + cp]): the tile's rows are then P[0][·][ty],
/// P[1][·][ty], P[0][·][ty + 1], P[1][·][ty + 1] and its columns E_tx, O_tx, E_tx+1, O_tx+1 —
/// each a shift of a whole plane, so each step is one contiguous sweep over every slot.
#[allow(clippy::too_many_arguments)]
fn transform_input<T: Float>(
    plane: &[T],
    (h, w): (usize, usize),
    slots: Slots,
    rows: std::ops::Range<usize>,
    scratch: &mut [T],
    out: &mut [T],
    stride: usize,
    at: usize,
) {
    let cols = slots.cols;
    let s = rows.len() * cols;
    // The four parity planes, (rows + 1) × cols each, and one spare slot so that every shifted
    // read below stays inside.
    let span = s + cols + 1;
    let (parity, rest) = scratch.split_at_mut(4 * span);
    parity.fill(T::zero());
    // Tile rows ty0..ty1 read padded rows 2ty0..2ty1 + 2, input rows 2ty0 − 1..2ty1 + 1.
    let first = (2 * rows.start).saturating_sub(1);
    let last = (2 * rows.end + 1).min(h);
    for (y, line) in plane.chunks_exact(w).enumerate().take(last).skip(first) {
        // Padded row y + 1, padded columns x + 1: odd input columns land in the even plane.
        let padded = y + 1;
        let (rp, a) = (padded % 2, padded / 2 - rows.start);
        let (even, odd) = parity[2 * rp * span..(2 * rp + 2) * span].split_at_mut(span);
        let (even, odd) = (&mut even[a * cols..][..cols], &mut odd[a * cols..][..cols]);
        for (k, pair) in line.chunks(2).enumerate() {
            odd[k] = pair[0];
            if let Some(&v) = pair.get(1) {
                even[k + 1] = v;
            }
        }
    }
    let p = |rp: usize, cp: usize, shift: usize| &parity[(2 * rp + cp) * span + shift..][..s + 1];
    // Bᵀ down the columns: t0 = d0 − d2, t1 = d1 + d2, t2 = d2 − d1, t3 = d1 − d3, with
    // d0, d1, d2, d3 = P[0][ty], P[1][ty], P[0][ty + 1], P[1][ty + 1].
    let (t, _) = rest.split_at_mut(8 * (s + 1));
    for cp in 0..2 {
        let (d0, d1, d2, d3) = (p(0, cp, 0), p(1, cp, 0), p(0, cp, cols), p(1, cp, cols));
        let (t0, rest) = t[cp * (s + 1)..].split_at_mut(s + 1);
        let (t1, rest) = rest[s + 1..].split_at_mut(s + 1);
        let (t2, rest) = rest[s + 1..].split_at_mut(s + 1);
        let t3 = &mut rest[s + 1..][..s + 1];
        for k in 0..=s {
            t0[k] = d0[k] - d2[k];
            t1[k] = d1[k] + d2[k];
            t2[k] = d2[k] - d1[k];
            t3[k] = d1[k] - d3[k];
        }
    }
    // B along each tile row: (v0, v1, v2, v3) = (E_tx, O_tx, E_tx+1, O_tx+1) of t_i;
    // cells (v0 − v2, v1 + v2, v2 − v1, v1 − v3).
    for i in 0..4 {
        let e = &t[2 * i * (s + 1)..][..s + 1];
        let o = &t[(2 * i + 1) * (s + 1)..][..s + 1];
        let (e0, o0, e1, o1) = (&e[..s], &o[..s], &e[1..], &o[1..]);
        let cell = |j: usize| (4 * i + j) * stride + at;
        for (d, (&a, &b)) in out[cell(0)..][..s].iter_mut().zip(e0.iter().zip(e1)) {
            *d = a - b;
        }
        for (d, (&a, &b)) in out[cell(1)..][..s].iter_mut().zip(o0.iter().zip(e1)) {
            *d = a + b;
        }
        for (d, (&a, &b)) in out[cell(2)..][..s].iter_mut().zip(e1.iter().zip(o0)) {
            *d = a - b;
        }
        for (d, (&a, &b)) in out[cell(3)..][..s].iter_mut().zip(o0.iter().zip(o1)) {
            *d = a - b;
        }
    }
}

/// A g Aᵀ for every 2×2 tile g of one output gradient plane, A = [[1, 0], [1, 1], [1, −1],
/// [0, −1]] (Aᵀ of [`transform_output`]), into `out` laid out as [`transform_input`]'s. The
/// slot column past the last tile, and a tile's row or column past an odd edge, are zeros: they
/// take no part in the sums.
fn transform_gradient<T: Float>(
    plane: &[T],
    (h, w): (usize, usize),
    slots: Slots,
    rows: std::ops::Range<usize>,
    out: &mut [T],
    stride: usize,
    at: usize,
) {
    let tw = slots.cols - 1;
    let at_ = |y: usize, x: usize| {
        if y < h && x < w {
            plane[y * w + x]
        } else {
            T::zero()
        }
    };
    // (p, q) ↦ (p, p + q, p − q, −q), down the tile's columns and then along its rows.
    let a = |p: T, q: T| [p, p + q, p - q, -q];
    for (k, ty) in rows.enumerate() {
        for tx in 0..slots.cols {
            let slot = at + k * slots.cols + tx;
            if tx == tw {
                for cell in 0..CELLS {
                    out[cell * stride + slot] = T::zero();
                }
                continue;
            }
            let (y, x) = (2 * ty, 2 * tx);
            let left = a(at_(y, x), at_(y + 1, x));
            let right = a(at_(y, x + 1), at_(y + 1, x + 1));
            for i in 0..4 {
                for (j, &value) in a(left[i], right[i]).iter().enumerate() {
                    out[(4 * i + j) * stride + slot] = value;
                }
            }
        }
    }
}

/// Aᵀ m A (+ the bias) for every tile of one output plane, with Aᵀ = [[1, 1, 1, 0],
/// [0, 1, −1, −1]]; `cells(ξ)` is cell ξ of every slot. Each cell row i of a tile gives
/// a_i = m_i0 + m_i1 + m_i2 and b_i = m_i1 − m_i2 − m_i3; then y00 = a0 + a1 + a2,
/// y10 = a1 − a2 − a3, y01 = b0 + b1 + b2, y11 = b1 − b2 − b3.
fn transform_output<'a, T: Float + 'a>(
    cells: impl Fn(usize) -> &'a [T],
    bias: T,
    (h, w): (usize, usize),
    slots: Slots,
    rows: std::ops::Range<usize>,
    scratch: &mut [T],
    out: &mut [T],
) {
    let s = rows.len() * slots.cols;
    let (top, bottom) = scratch[..4 * s].split_at_mut(2 * s);
    let (y00, y01) = top.split_at_mut(s);
    let (y10, y11) = bottom.split_at_mut(s);
    let m: [&[T]; CELLS] = std::array::from_fn(|cell| &cells(cell)[..s]);
    for k in 0..s {
        let a = |i: usize| m[4 * i][k] + m[4 * i + 1][k] + m[4 * i + 2][k];
        let b = |i: usize| m[4 * i + 1][k] - m[4 * i + 2][k] - m[4 * i + 3][k];
        let (a0, a1, a2, a3) = (a(0), a(1), a(2), a(3));
        let (b0, b1, b2, b3) = (b(0), b(1), b(2), b(3));
        y00[k] = bias + a0 + a1 + a2;
        y01[k] = bias + b0 + b1 + b2;
        y10[k] = bias + a1 - a2 - a3;
        y11[k] = bias + b1 - b2 - b3;
    }
    // Tiles whose right column falls outside the image (odd widths) write only their left.
    let tw = slots.cols - 1;
    let whole = w / 2;
    for (k, ty) in rows.enumerate() {
        for (row, (left, right)) in [(2 * ty, (&*y00, &*y01)), (2 * ty + 1, (&*y10, &*y11))] {
            if row >= h {
                continue;
            }
            let (left, right) = (
                &left[k * slots.cols..][..tw],
                &right[k * slots.cols..][..tw],
            );
            let line = &mut out[row * w..][..w];
            for (pair, (&a, &b)) in line.chunks_exact_mut(2).zip(left.iter().zip(right)) {
                pair[0] = a;
                pair[1] = b;
            }
            if whole < tw {
                line[2 * whole] = left[whole];
            }
        }
    }
}

/// U = G g Gᵀ for every channel pair, G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]], as
/// rows × 16 × cols (cell ξ of row o at (o·16 + ξ)·cols..). The forward's rows are the output
/// channels and g = w[o][i]; the input gradient's (`adjoint`) rows are the input channels and
/// g = w[i][o] rotated by 180°. Each row's taps are first gathered tap-major, so that the
/// transform is a few sweeps over the columns (a late layer has 512 × 512 pairs, and this runs
/// on every call).
fn transform_kernel<T: Float + Send + Sync + 'static>(
    w: &[T],
    scale: Option<&[T]>,
    c_out: usize,
    c_in: usize,
    adjoint: bool,
) -> Scratch<T> {
    let (rows, cols) = if adjoint {
        (c_in, c_out)
    } else {
        (c_out, c_in)
    };
    let half = T::one() / (T::one() + T::one());
    let mut u = Scratch::new(rows * CELLS * cols);
    u[..rows * CELLS * cols]
        .par_chunks_mut(CELLS * cols)
        .enumerate()
        .for_each(|(o, uo)| {
            // taps[t·cols + i] = g_(o, i)[t / 3][t % 3].
            let mut taps = vec![T::zero(); 21 * cols];
            let (taps, gg) = taps.split_at_mut(9 * cols);
            for i in 0..cols {
                // The output channel's scale: o's in the forward, i's in the adjoint.
                if adjoint {
                    let k = &w[(i * c_in + o) * 9..][..9];
                    let s = scale.map_or(T::one(), |s| s[i]);
                    for t in 0..9 {
                        taps[t * cols + i] = s * k[8 - t];
                    }
                } else {
                    let k = &w[(o * c_in + i) * 9..][..9];
                    let s = scale.map_or(T::one(), |s| s[o]);
                    for t in 0..9 {
                        taps[t * cols + i] = s * k[t];
                    }
                }
            }
            // The 1-D transform of three rows (a, b, c) into four (a, (a+b+c)/2, (a−b+c)/2, c).
            let g1 = |a: &[T], b: &[T], c: &[T], out: &mut [T]| {
                let (o0, rest) = out.split_at_mut(cols);
                let (o1, rest) = rest.split_at_mut(cols);
                let (o2, o3) = rest.split_at_mut(cols);
                o0.copy_from_slice(a);
                o3.copy_from_slice(c);
                for (((d1, d2), &a), (&b, &c)) in
                    o1.iter_mut().zip(o2.iter_mut()).zip(a).zip(b.iter().zip(c))
                {
                    *d1 = (a + b + c) * half;
                    *d2 = (a - b + c) * half;
                }
            };
            // G g, column by column: gg[(s·4 + r)·cols + i] = (G g)[r][s].
            for s in 0..3 {
                let tap = |r: usize| &taps[(3 * r + s) * cols..][..cols];
                g1(tap(0), tap(1), tap(2), &mut gg[4 * s * cols..][..4 * cols]);
            }
            // (G g) Gᵀ, row by row: cells 4r..4r + 4 of U.
            for r in 0..4 {
                let at = |s: usize| &gg[(4 * s + r) * cols..][..cols];
                g1(at(0), at(1), at(2), &mut uo[4 * r * cols..][..4 * cols]);
            }
        });
    u
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conv::Geometry;

    /// `len` standard normal values, seeded.
    fn seeded(len: usize, seed: u64) -> Vec<f64> {
        crate::testutil::randn(len, 0.0, 1.0, candle_core::DType::F64, seed)
            .to_vec1()
            .unwrap()
    }

    /// Odd and even sizes, a single row and column, more output than input channels and fewer.
    const SHAPES: [(usize, usize, usize, usize, usize); 6] = [
        (2, 3, 4, 7, 9),
        (1, 4, 3, 8, 8),
        (3, 2, 5, 1, 5),
        (2, 5, 2, 6, 1),
        (1, 1, 1, 2, 2),
        (4, 6, 7, 5, 3),
    ];

    /// Forward (with and without a bias), input gradient and kernel gradient equal im2col's in
    /// f64, with chunks of every size: runs of one tile row to whole images, one image to all
    /// of them.
    #[test]
    fn matches_im2col_for_every_chunking() {
        for (k, &(n, c_in, c_out, h, w)) in SHAPES.iter().enumerate() {
            let g = Geometry::new((n, c_in, h, w), (c_out, c_in, 3, 3), 1, 1).unwrap();
            let wg = Winograd {
                n,
                c_in,
                c_out,
                h,
                w,
            };
            let seed = 10 * k as u64;
            let x = seeded(n * c_in * h * w, seed);
            let kernel = seeded(c_out * c_in * 9, seed + 1);
            let bias = seeded(c_out, seed + 2);
            let dy = seeded(n * c_out * h * w, seed + 3);
            let want_y = g.im2col_forward(&x, &kernel, None, Some(&bias));
            let want_dx = g.im2col_input_grad(&dy, &kernel, None);
            let want_dw = g.im2col_kernel_grad(&dy, &x);
            let u = transform_kernel(&kernel, None, c_out, c_in, false);
            let ut = transform_kernel(&kernel, None, c_out, c_in, true);
            let slots = n * Slots::of(h, w).len();
            for target in 1..=slots + 1 {
                let chunks = wg.chunks(target);
                let y = wg.convolve(&x, c_in, c_out, &u, Some(&bias), &chunks);
                let dx = wg.convolve(&dy, c_out, c_in, &ut, None, &chunks);
                let dw = wg.kernel_grad_in(&dy, &x, &chunks);
                for (name, got, want) in [
                    ("forward", &y, &want_y),
                    ("input grad", &dx, &want_dx),
                    ("kernel grad", &dw, &want_dw),
                ] {
                    let err = got
                        .iter()
                        .zip(want.iter())
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        err < 1e-12,
                        "{n}×{c_in}×{h}×{w} → {c_out}, chunks of {target} slots: {name} off by {err}"
                    );
                }
            }
            // The public entry points pick their own chunk.
            assert_eq!(
                wg.forward(&x, &kernel, None, Some(&bias)).len(),
                want_y.len()
            );
            assert_eq!(wg.input_grad(&dy, &kernel, None).len(), want_dx.len());
            assert_eq!(wg.kernel_grad(&dy, &x).len(), want_dw.len());
        }
    }

    /// In f32 the result stays within the direct sum's own rounding: against an f64 reference,
    /// Winograd's error is no more than twice im2col's (plus a floor) on a ResNet-sized layer,
    /// forward and kernel gradient.
    #[test]
    fn f32_error_is_that_of_the_direct_sum() {
        let (n, c_in, c_out, h, w) = (2, 64, 32, 14, 13);
        let g = Geometry::new((n, c_in, h, w), (c_out, c_in, 3, 3), 1, 1).unwrap();
        let wg = Winograd {
            n,
            c_in,
            c_out,
            h,
            w,
        };
        let x = seeded(n * c_in * h * w, 7);
        let kernel = seeded(c_out * c_in * 9, 8);
        let exact = g.im2col_forward(&x, &kernel, None, None);
        let x32: Vec<f32> = x.iter().map(|&v| v as f32).collect();
        let k32: Vec<f32> = kernel.iter().map(|&v| v as f32).collect();
        let err = |y: &[f32]| {
            y.iter()
                .zip(&exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max)
        };
        let direct = err(&g.im2col_forward(&x32, &k32, None, None));
        let ours = err(&wg.forward(&x32, &k32, None, None));
        let scale = exact.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(
            ours <= 2.0 * direct + 1e-6 * scale,
            "Winograd's f32 error {ours} against im2col's {direct} (outputs up to {scale})"
        );
        // The kernel gradient, a sum over every pixel of the batch.
        let dy = seeded(n * c_out * h * w, 9);
        let exact = g.im2col_kernel_grad(&dy, &x);
        let dy32: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
        let err = |dw: &[f32]| {
            dw.iter()
                .zip(&exact)
                .map(|(&a, &b)| (a as f64 - b).abs())
                .fold(0.0, f64::max)
        };
        let direct = err(&g.im2col_kernel_grad(&dy32, &x32));
        let ours = err(&wg.kernel_grad(&dy32, &x32));
        let scale = exact.iter().map(|v| v.abs()).fold(0.0, f64::max);
        assert!(
            ours <= 2.0 * direct + 1e-6 * scale,
            "Winograd's f32 kernel gradient error {ours} against im2col's {direct} (up to {scale})"
        );
    }
}
