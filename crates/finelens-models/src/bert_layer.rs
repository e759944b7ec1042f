//! A BERT encoder layer as one op with a hand-written backward: the path for frozen weights in
//! eval mode (explaining, auditing and evaluating a text model).
//!
//! Composed of ops, a layer is about 25 graph nodes, and candle's backward hands every node's
//! input its gradient as zeros plus the gradient (`GradStore::or_insert`, then `add`): ≈ 50
//! million values zeroed and added per layer of an IG batch of 50 × 64 tokens, a fifth of the
//! time, and splitting and merging the heads are four copies more each way. Here Q, K and V come
//! from three GEMMs into one buffer (rows × 3·hidden), attention runs per (sequence, head) on
//! strided views of it, and the backward computes the input's gradient only, from what the
//! forward kept: Q/K/V, the attention probabilities, both residual sums before their layer
//! norms, and the feed-forward's pre-activation.
//!
//! With x: rows × H (rows = N·T), A heads of d = H/A values and the key mask m:
//!
//! * forward: [Q K V] = x·[W_q W_k W_v]ᵀ + b, P_h = softmax(Q_h K_hᵀ/√d; m), C_h = P_h V_h,
//!   r₁ = C·W_oᵀ + b_o + x, x₁ = LN₁(r₁), u = x₁·W_iᵀ + b_i, r₂ = GELU(u)·W₂ᵀ + b₂ + x₁,
//!   y = LN₂(r₂);
//! * backward from dy: dr₂ = LN₂′(dy), du = GELU′(u) ⊙ (dr₂·W₂), dx₁ = dr₂ + du·W_i,
//!   dr₁ = LN₁′(dx₁), dC = dr₁·W_o, dP_h = dC_h V_hᵀ, dV_h = P_hᵀ dC_h, dS_h = softmax′(dP_h)/√d,
//!   dQ_h = dS_h K_h, dK_h = dS_hᵀ Q_h, dx = dr₁ + [dQ dK dV]·[W_q W_k W_v].

use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use rayon::prelude::*;

use crate::gelu::{self, Erf};
use crate::kernel::{gemm_into, gemm_serial_into, try_run1, Kept, View};
use crate::layer_norm::LayerNorm;
use crate::softmax::{softmax_backward_in_place, softmax_in_place};

const NAME: &str = "finelens-bert-layer";

/// Where each parameter sits in [`bert_layer`]'s `params`.
const WQ: usize = 0;
const BQ: usize = 1;
const WK: usize = 2;
const BK: usize = 3;
const WV: usize = 4;
const BV: usize = 5;
const WO: usize = 6;
const BO: usize = 7;
const G1: usize = 8;
const B1: usize = 9;
const WI: usize = 10;
const BI: usize = 11;
const W2: usize = 12;
const B2: usize = 13;
const G2: usize = 14;
const BE2: usize = 15;

/// One encoder layer (exact-erf GELU) of `x` (N × T × H), differentiable in `x` only.
/// `params`: W_q, b_q, W_k, b_k, W_v, b_v (self-attention), W_o, b_o, γ₁, β₁ (its output and
/// layer norm), W_i, b_i (intermediate), W₂, b₂, γ₂, β₂ (output and layer norm), with
/// `torch.nn.Linear`'s out × in weights; `keep` marks the keys that count (N × T; `None`: all).
pub(crate) fn bert_layer(
    x: &Tensor,
    heads: usize,
    eps: f64,
    keep: Option<Arc<Vec<bool>>>,
    params: [&Tensor; 16],
) -> candle_core::Result<Tensor> {
    let (n, t, h) = x.dims3()?;
    let inter = params[WI].dim(0)?;
    let expected: [&[usize]; 16] = [
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h, h],
        &[h],
        &[h],
        &[h],
        &[inter, h],
        &[inter],
        &[h, inter],
        &[h],
        &[h],
        &[h],
    ];
    if heads == 0 || h % heads != 0 {
        candle_core::bail!("{NAME}: {h} hidden values do not split into {heads} heads");
    }
    if let Some(i) = (0..16).find(|&i| params[i].dims() != expected[i]) {
        candle_core::bail!(
            "{NAME}: parameter {i} has shape {:?}, expected {:?}",
            params[i].dims(),
            expected[i]
        );
    }
    if keep.as_ref().is_some_and(|k| k.len() != n * t) {
        candle_core::bail!("{NAME}: the key mask is not N × T");
    }
    let params = params
        .iter()
        .map(|p| p.to_dtype(x.dtype())?.contiguous())
        .collect::<candle_core::Result<Vec<_>>>()?;
    let x = x.contiguous()?;
    let op = BertLayer {
        dims: Dims {
            n,
            t,
            h,
            heads,
            inter,
        },
        eps,
        keep,
        params,
        saved: Kept::default(),
        keep_activations: x.track_op(),
    };
    if x.track_op() {
        x.apply_op1(op)
    } else {
        x.apply_op1_no_bwd(&op)
    }
}

#[derive(Debug, Clone, Copy)]
struct Dims {
    n: usize,
    t: usize,
    h: usize,
    heads: usize,
    inter: usize,
}

impl Dims {
    fn rows(&self) -> usize {
        self.n * self.t
    }

    /// Values per head.
    fn d(&self) -> usize {
        self.h / self.heads
    }

    /// (sequence, head) of attention block `i`.
    fn block(&self, i: usize) -> (usize, usize) {
        (i / self.heads, i % self.heads)
    }
}

/// What the backward reads, per float type.
struct Saved<T> {
    /// rows × 3H: Q, K and V side by side.
    qkv: Vec<T>,
    /// N × A × T × T.
    probs: Vec<T>,
    r1: Vec<T>,
    u: Vec<T>,
    r2: Vec<T>,
}

/// The float types the op runs on.
trait Elem: Erf + WithDType {}

impl<T: Erf + WithDType> Elem for T {}

struct BertLayer {
    dims: Dims,
    eps: f64,
    keep: Option<Arc<Vec<bool>>>,
    params: Vec<Tensor>,
    /// The forward's activations, a [`Saved`], for the backward (only when x is tracked).
    saved: Kept,
    keep_activations: bool,
}

/// Each row of `x` (rows of `b.len()`) plus `b`.
fn plus_rows<T: Elem>(x: &[T], b: &[T]) -> Vec<T> {
    let mut y = x.to_vec();
    y.par_chunks_mut(b.len())
        .with_min_len(64)
        .for_each(|row| row.iter_mut().zip(b).for_each(|(v, &b)| *v += b));
    y
}

/// `b` repeated `rows` times.
fn rows_of<T: Elem>(b: &[T], rows: usize) -> Vec<T> {
    let mut y = Vec::with_capacity(rows * b.len());
    for _ in 0..rows {
        y.extend_from_slice(b);
    }
    y
}

impl BertLayer {
    fn scale(&self) -> f64 {
        1.0 / (self.dims.d() as f64).sqrt()
    }

    fn keep_of(&self, s: usize) -> Option<&[bool]> {
        let t = self.dims.t;
        self.keep.as_ref().map(|k| &k[s * t..(s + 1) * t])
    }

    /// Q_h, K_h and V_h of attention block `i` in a rows × 3H buffer.
    fn heads_of<'a, T>(&self, qkv: &'a [T], i: usize) -> [View<'a, T>; 3] {
        let Dims { t, h, .. } = self.dims;
        let (s, a) = self.dims.block(i);
        let base = s * t * 3 * h + a * self.dims.d();
        [0, h, 2 * h].map(|o| View::strided(&qkv[base + o..], t, self.dims.d(), 3 * h))
    }

    /// Per-(sequence, head) blocks of `parts` × T × d values each, written into a rows ×
    /// (`parts`·H) buffer at their heads' columns.
    fn merge_heads<T: Elem>(&self, blocks: &[Vec<T>], parts: usize) -> Vec<T> {
        let Dims { t, h, heads, .. } = self.dims;
        let d = self.dims.d();
        let width = parts * h;
        let mut out = vec![T::zero(); self.dims.rows() * width];
        out.par_chunks_mut(t * width)
            .enumerate()
            .for_each(|(s, dst)| {
                for a in 0..heads {
                    let block = &blocks[s * heads + a];
                    for p in 0..parts {
                        for tau in 0..t {
                            dst[tau * width + p * h + a * d..][..d]
                                .copy_from_slice(&block[(p * t + tau) * d..][..d]);
                        }
                    }
                }
            });
        out
    }

    fn forward<T: Elem>(&self, x: &[T], p: &[&[T]]) -> (Vec<T>, Saved<T>) {
        let Dims {
            n,
            t,
            h,
            heads,
            inter,
        } = self.dims;
        let (rows, d, scale) = (self.dims.rows(), self.dims.d(), self.scale());
        let mut qkv = Vec::with_capacity(rows * 3 * h);
        for _ in 0..rows {
            for b in [BQ, BK, BV] {
                qkv.extend_from_slice(p[b]);
            }
        }
        for (j, w) in [WQ, WK, WV].into_iter().enumerate() {
            gemm_into(
                &mut qkv[j * h..],
                3 * h,
                View::rows(x, rows, h),
                View::rows(p[w], h, h).t(),
                true,
            );
        }
        let mut probs = vec![T::zero(); n * heads * t * t];
        let context: Vec<Vec<T>> = probs
            .par_chunks_mut(t * t)
            .enumerate()
            .map(|(i, pr)| {
                let [q, k, v] = self.heads_of(&qkv, i);
                gemm_serial_into(pr, t, q, k.t(), false);
                let keep = self.keep_of(self.dims.block(i).0);
                pr.chunks_mut(t)
                    .for_each(|row| softmax_in_place(row, scale, keep));
                let mut c = vec![T::zero(); t * d];
                gemm_serial_into(&mut c, d, View::rows(pr, t, t), v, false);
                c
            })
            .collect();
        let context = self.merge_heads(&context, 1);
        let mut r1 = plus_rows(x, p[BO]);
        gemm_into(
            &mut r1,
            h,
            View::rows(&context, rows, h),
            View::rows(p[WO], h, h).t(),
            true,
        );
        let ln = LayerNorm {
            d: h,
            eps: self.eps,
        };
        let x1 = ln.forward(&r1, p[G1], p[B1]);
        let mut u = rows_of(p[BI], rows);
        gemm_into(
            &mut u,
            inter,
            View::rows(&x1, rows, h),
            View::rows(p[WI], inter, h).t(),
            true,
        );
        let g = gelu::forward(&u);
        let mut r2 = plus_rows(&x1, p[B2]);
        gemm_into(
            &mut r2,
            h,
            View::rows(&g, rows, inter),
            View::rows(p[W2], h, inter).t(),
            true,
        );
        let y = ln.forward(&r2, p[G2], p[BE2]);
        (
            y,
            Saved {
                qkv,
                probs,
                r1,
                u,
                r2,
            },
        )
    }

    fn backward<T: Elem>(&self, s: &Saved<T>, p: &[&[T]], dy: &[T]) -> Vec<T> {
        let Dims {
            n,
            t,
            h,
            heads,
            inter,
        } = self.dims;
        let (rows, d, scale) = (self.dims.rows(), self.dims.d(), self.scale());
        let ln = LayerNorm {
            d: h,
            eps: self.eps,
        };
        let mut dx1 = dy.to_vec();
        ln.input_grad_in_place(&s.r2, p[G2], &mut dx1);
        // dx1 holds dr₂ now; the feed-forward's input gradient adds to it.
        let mut dg = vec![T::zero(); rows * inter];
        gemm_into(
            &mut dg,
            inter,
            View::rows(&dx1, rows, h),
            View::rows(p[W2], h, inter),
            false,
        );
        let du = gelu::backward(&s.u, &dg);
        drop(dg);
        gemm_into(
            &mut dx1,
            h,
            View::rows(&du, rows, inter),
            View::rows(p[WI], inter, h),
            true,
        );
        drop(du);
        ln.input_grad_in_place(&s.r1, p[G1], &mut dx1);
        let dr1 = dx1;
        let mut dc = vec![T::zero(); rows * h];
        gemm_into(
            &mut dc,
            h,
            View::rows(&dr1, rows, h),
            View::rows(p[WO], h, h),
            false,
        );
        let blocks: Vec<Vec<T>> = (0..n * heads)
            .into_par_iter()
            .map(|i| {
                let [q, k, v] = self.heads_of(&s.qkv, i);
                let (seq, a) = self.dims.block(i);
                let probs = &s.probs[i * t * t..][..t * t];
                let pr = View::rows(probs, t, t);
                let dch = View::strided(&dc[seq * t * h + a * d..], t, d, h);
                // [dQ_h | dK_h | dV_h], each T × d.
                let mut out = vec![T::zero(); 3 * t * d];
                gemm_serial_into(&mut out[2 * t * d..], d, pr.t(), dch, false);
                let mut ds = vec![T::zero(); t * t];
                gemm_serial_into(&mut ds, t, dch, v.t(), false);
                ds.chunks_mut(t)
                    .zip(probs.chunks(t))
                    .for_each(|(g, y)| softmax_backward_in_place(g, y, scale));
                let ds = View::rows(&ds, t, t);
                gemm_serial_into(&mut out[..t * d], d, ds, k, false);
                gemm_serial_into(&mut out[t * d..2 * t * d], d, ds.t(), q, false);
                out
            })
            .collect();
        drop(dc);
        let dqkv = self.merge_heads(&blocks, 3);
        drop(blocks);
        let mut dx = dr1;
        for (j, w) in [WQ, WK, WV].into_iter().enumerate() {
            gemm_into(
                &mut dx,
                h,
                View::strided(&dqkv[j * h..], rows, h, 3 * h),
                View::rows(p[w], h, h),
                true,
            );
        }
        dx
    }

    fn run_forward<T: Elem>(&self, x: &[T]) -> candle_core::Result<Vec<T>> {
        let keep = self.keep_activations;
        self.saved
            .forward(NAME, &self.params, keep, |p| self.forward(x, p))
    }

    fn run_backward<T: Elem>(&self, dy: &[T]) -> candle_core::Result<Vec<T>> {
        self.saved.backward(NAME, &self.params, |s: &Saved<T>, p| {
            self.backward(s, p, dy)
        })
    }
}

impl CustomOp1 for BertLayer {
    fn name(&self) -> &'static str {
        NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = try_run1(
            NAME,
            (s, l),
            |x| self.run_forward(x),
            |x| self.run_forward(x),
        )?;
        Ok((out, l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        Ok(Some(grad.apply_op1_no_bwd(&Backward(self))?))
    }
}

/// dx from dy, with the layer's saved activations.
struct Backward<'a>(&'a BertLayer);

impl CustomOp1 for Backward<'_> {
    fn name(&self) -> &'static str {
        "finelens-bert-layer-backward"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = try_run1(
            NAME,
            (s, l),
            |dy| self.0.run_backward(dy),
            |dy| self.0.run_backward(dy),
        )?;
        Ok((out, l.shape().clone()))
    }
}
