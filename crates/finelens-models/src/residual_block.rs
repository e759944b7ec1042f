//! A ResNet block (basic or bottleneck, He et al. 2016) as one op when its batch norms are
//! folded into its convolutions and nothing in it is trained: explaining, auditing, evaluating,
//! and the frozen blocks of a fine-tuning run.
//!
//! Composed of ops, a basic block is five graph nodes (convolution, ReLU, convolution, residual
//! add, ReLU; six with a downsample), and candle's backward gives each node's input its gradient
//! as zeros plus the gradient (`GradStore::or_insert`, then `add`): two sweeps of the block's
//! activations per node. Here the backward is one pass: with the convolutions' folded weights Wᵢ
//! and their ReLU outputs aᵢ,
//!
//! * forward: h₀ = x, aᵢ = ReLU(Wᵢ ∗ aᵢ₋₁ + bᵢ) for all but the last, z = W_L ∗ a_{L−1} + b_L,
//!   y = ReLU(z + s), s = x or the downsample W_d ∗ x + b_d;
//! * backward: g = dy ⊙ [y > 0], then back through the chain dₗ = (Wₗᵀ ⋆ dₗ₊₁) ⊙ [aₗ > 0], and
//!   dx = W₁ᵀ ⋆ d₂ + (g or W_dᵀ ⋆ g): the ReLU masks read off the outputs, as the composed ops
//!   (and PyTorch's `threshold_backward`) do, so the gradient at exactly 0 is 0.
//!
//! A folded weight is Wᵢ = sᵢ ⊙ Kᵢ, the convolution's kernel K scaled per output channel by its
//! batch norm's γ/σ; the op takes K and s apart and the convolutions apply s where it is cheapest
//! ([`Geometry::forward`]), so a pass reads each kernel once instead of first writing a scaled
//! copy of all of them.

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Tensor, WithDType};
use num_traits::Float;
use rayon::prelude::*;

use crate::conv::Geometry;
use crate::kernel::{try_run1, try_run2, Kept};

const NAME: &str = "finelens-residual-block";

/// Values per rayon task of the element-wise passes.
const CHUNK: usize = 1 << 14;

/// One convolution with its batch norm folded in, s ⊙ (K ∗ x) + t: kernel K (C_out × C_in × k ×
/// k), scale s, shift t, stride, padding.
pub(crate) type Folded = (Tensor, Tensor, Tensor, usize, usize);

/// The block of `convs` (a ReLU after each but the last) and `downsample` on `x` (N × C × H × W),
/// differentiable in `x` only (the parameters must not be tracked).
pub(crate) fn residual_block(
    x: &Tensor,
    convs: &[Folded],
    downsample: Option<&Folded>,
) -> candle_core::Result<Tensor> {
    if convs.is_empty() {
        candle_core::bail!("{NAME}: a block needs a convolution");
    }
    let dtype = x.dtype();
    let mut geometry = Vec::with_capacity(convs.len() + 1);
    let mut params = Vec::with_capacity(3 * convs.len() + 3);
    let mut dims = x.dims4()?;
    for (w, s, t, stride, padding) in convs.iter().chain(downsample) {
        let input = if geometry.len() == convs.len() {
            x.dims4()?
        } else {
            dims
        };
        let g = Geometry::new(input, w.dims4()?, *stride, *padding)?;
        dims = g.output_shape().dims4()?;
        geometry.push(g);
        for p in [w, s, t] {
            params.push(p.to_dtype(dtype)?.contiguous()?);
        }
    }
    let out = geometry[convs.len() - 1].output_shape();
    if downsample.is_some_and(|_| geometry[convs.len()].output_shape() != out)
        || (downsample.is_none() && out.dims() != x.dims())
    {
        candle_core::bail!(
            "{NAME}: the residual path's shape does not match the block's output {:?}",
            out.dims()
        );
    }
    let x = x.contiguous()?;
    let op = ResidualBlock {
        geometry,
        convs: convs.len(),
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

/// The float types the op runs on.
trait Elem: Float + WithDType {}

impl<T: Float + WithDType> Elem for T {}

struct ResidualBlock {
    /// The convolutions' shapes, then the downsample's.
    geometry: Vec<Geometry>,
    convs: usize,
    /// Weight, scale and shift of each convolution, then the downsample's.
    params: Vec<Tensor>,
    /// The ReLU outputs inside the block (`Vec<Vec<T>>`), for the backward.
    saved: Kept,
    keep_activations: bool,
}

fn relu_in_place<T: Elem>(v: &mut [T]) {
    v.par_chunks_mut(CHUNK).for_each(|c| {
        for v in c {
            *v = if *v > T::zero() { *v } else { T::zero() };
        }
    });
}

/// g ← g ⊙ [y > 0].
fn mask_in_place<T: Elem>(g: &mut [T], y: &[T]) {
    g.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK))
        .for_each(|(g, y)| {
            for (g, &y) in g.iter_mut().zip(y) {
                *g = if y > T::zero() { *g } else { T::zero() };
            }
        });
}

/// a ← a + b.
fn add_in_place<T: Elem>(a: &mut [T], b: &[T]) {
    a.par_chunks_mut(CHUNK)
        .zip(b.par_chunks(CHUNK))
        .for_each(|(a, b)| a.iter_mut().zip(b).for_each(|(a, &b)| *a += b));
}

impl ResidualBlock {
    fn downsample(&self) -> Option<&Geometry> {
        self.geometry.get(self.convs)
    }

    fn forward<T: Elem>(&self, x: &[T], p: &[&[T]]) -> (Vec<T>, Vec<Vec<T>>) {
        let mut inner: Vec<Vec<T>> = Vec::with_capacity(self.convs - 1);
        let mut z = Vec::new();
        for i in 0..self.convs {
            let input = inner.last().map_or(x, |a| a.as_slice());
            let (w, s, t) = (p[3 * i], p[3 * i + 1], p[3 * i + 2]);
            let mut h = self.geometry[i].forward(input, w, Some(s), Some(t));
            if i + 1 < self.convs {
                relu_in_place(&mut h);
                inner.push(h);
            } else {
                z = h;
            }
        }
        match self.downsample() {
            Some(g) => {
                let d = 3 * self.convs;
                add_in_place(&mut z, &g.forward(x, p[d], Some(p[d + 1]), Some(p[d + 2])));
            }
            None => add_in_place(&mut z, x),
        }
        relu_in_place(&mut z);
        (z, inner)
    }

    fn backward<T: Elem>(&self, inner: &[Vec<T>], y: &[T], p: &[&[T]], dy: &[T]) -> Vec<T> {
        let mut g = dy.to_vec();
        mask_in_place(&mut g, y);
        let last = self.convs - 1;
        let mut d = self.geometry[last].input_grad(&g, p[3 * last], Some(p[3 * last + 1]));
        for i in (0..last).rev() {
            mask_in_place(&mut d, &inner[i]);
            d = self.geometry[i].input_grad(&d, p[3 * i], Some(p[3 * i + 1]));
        }
        match self.downsample() {
            Some(ds) => {
                let d3 = 3 * self.convs;
                add_in_place(&mut d, &ds.input_grad(&g, p[d3], Some(p[d3 + 1])))
            }
            None => add_in_place(&mut d, &g),
        }
        d
    }

    fn run_forward<T: Elem>(&self, x: &[T]) -> candle_core::Result<Vec<T>> {
        let keep = self.keep_activations;
        self.saved
            .forward(NAME, &self.params, keep, |p| self.forward(x, p))
    }

    fn run_backward<T: Elem>(&self, y: &[T], dy: &[T]) -> candle_core::Result<Vec<T>> {
        self.saved
            .backward(NAME, &self.params, |inner: &Vec<Vec<T>>, p| {
                self.backward(inner, y, p, dy)
            })
    }
}

impl CustomOp1 for ResidualBlock {
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
        Ok((out, self.geometry[self.convs - 1].output_shape()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        let grad = grad.detach().contiguous()?;
        Ok(Some(y.detach().apply_op2_no_bwd(&grad, &Backward(self))?))
    }
}

/// dx from (y, dy), with the block's saved activations.
struct Backward<'a>(&'a ResidualBlock);

impl candle_core::CustomOp2 for Backward<'_> {
    fn name(&self) -> &'static str {
        "finelens-residual-block-backward"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let out = try_run2(
            NAME,
            (s1, l1),
            (s2, l2),
            |y, dy| self.0.run_backward(y, dy),
            |y, dy| self.0.run_backward(y, dy),
        )?;
        Ok((out, self.0.geometry[0].input_shape()))
    }
}
