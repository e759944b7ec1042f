//! Layer normalisation over the last dimension (Ba, Kiros & Hinton 2016) as one op with a
//! hand-written backward.
//!
//! Composed of candle ops, `nn.LayerNorm` is eleven passes over the activations forward and more
//! backward, most single-threaded. Here each pass runs the rows in parallel; the row statistics
//! are recomputed in the backward (one contiguous pass) rather than kept.
//!
//! With D values per row, x̂ = (x − μ)/σ, σ = √(biased var + ε), y = γ·x̂ + β, and g = dy·γ:
//!   dβ = Σ_rows dy,   dγ = Σ_rows dy·x̂,   dx = (g − mean(g) − x̂·mean(g·x̂)) / σ.
//! dγ and dβ are summed over fixed blocks of rows in parallel and the blocks' partial sums added
//! in order, so the result does not depend on how rayon split the work.

use candle_core::{CpuStorage, CustomOp3, Layout, Shape, Tensor};
use num_traits::Float;
use rayon::prelude::*;

use crate::kernel::run3;

/// Rows per block of the parameter-gradient sums.
const BLOCK: usize = 64;

/// `F.layer_norm(x, (D,), weight, bias, eps)` over the last dimension, differentiable in all three.
pub fn layer_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    let d = x.dim(candle_core::D::Minus1)?;
    if weight.dims() != [d] || bias.dims() != [d] {
        candle_core::bail!(
            "layer_norm: weight {:?} and bias {:?} do not fit rows of {d}",
            weight.dims(),
            bias.dims()
        );
    }
    let (x, weight, bias) = (x.contiguous()?, weight.contiguous()?, bias.contiguous()?);
    let op = LayerNorm { d, eps };
    if x.track_op() || weight.track_op() || bias.track_op() {
        x.apply_op3(&weight, &bias, op)
    } else {
        x.apply_op3_no_bwd(&weight, &bias, &op)
    }
}

/// The kernels, on rows of `d` values.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LayerNorm {
    pub d: usize,
    pub eps: f64,
}

impl LayerNorm {
    /// (μ, 1/σ) of one row, in f64.
    fn stats<T: Float>(&self, row: &[T]) -> (f64, f64) {
        let n = row.len() as f64;
        let mean = row.iter().map(|v| v.to_f64().unwrap()).sum::<f64>() / n;
        let var = row
            .iter()
            .map(|v| {
                let c = v.to_f64().unwrap() - mean;
                c * c
            })
            .sum::<f64>()
            / n;
        (mean, 1.0 / (var + self.eps).sqrt())
    }

    pub fn forward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], b: &[T]) -> Vec<T> {
        let mut y = vec![T::zero(); x.len()];
        y.par_chunks_mut(self.d)
            .zip(x.par_chunks(self.d))
            .with_min_len(16)
            .for_each(|(y, x)| {
                let (mean, inv) = self.stats(x);
                let (mean, inv) = (T::from(mean).unwrap(), T::from(inv).unwrap());
                for (((y, &x), &w), &b) in y.iter_mut().zip(x).zip(w).zip(b) {
                    *y = (x - mean) * inv * w + b;
                }
            });
        y
    }

    /// dx alone (γ and β frozen), in place: `g` holds dy on entry.
    pub fn input_grad_in_place<T: Float + Send + Sync>(&self, x: &[T], w: &[T], g: &mut [T]) {
        g.par_chunks_mut(self.d)
            .zip(x.par_chunks(self.d))
            .with_min_len(16)
            .for_each(|(g, x)| row_input_grad(x, w, self.stats(x), g));
    }

    /// dx, and (dγ, dβ) as one 2×D buffer.
    fn backward<T: Float + Send + Sync>(&self, x: &[T], w: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let d = self.d;
        let mut dx = dy.to_vec();
        let partial: Vec<Vec<f64>> = dx
            .par_chunks_mut(BLOCK * d)
            .zip(x.par_chunks(BLOCK * d))
            .map(|(dx, x)| {
                // Σ dγ and Σ dβ of this block's rows.
                let mut sums = vec![0f64; 2 * d];
                for (g, x) in dx.chunks_mut(d).zip(x.chunks(d)) {
                    let (mean, inv) = self.stats(x);
                    for j in 0..d {
                        let xh = (x[j].to_f64().unwrap() - mean) * inv;
                        let dyj = g[j].to_f64().unwrap();
                        sums[j] += dyj * xh;
                        sums[d + j] += dyj;
                    }
                    row_input_grad(x, w, (mean, inv), g);
                }
                sums
            })
            .collect();
        let mut total = vec![0f64; 2 * d];
        for p in &partial {
            for (t, v) in total.iter_mut().zip(p) {
                *t += v;
            }
        }
        (dx, total.into_iter().map(|v| T::from(v).unwrap()).collect())
    }
}

/// One row's dx = (g − mean(g) − x̂·mean(g·x̂))/σ, g = dy·γ, in place (`g` holds dy on entry),
/// from the row's (μ, 1/σ); in f64.
fn row_input_grad<T: Float>(x: &[T], w: &[T], (mean, inv): (f64, f64), g: &mut [T]) {
    let d = x.len();
    let (mut g_mean, mut gx_mean) = (0f64, 0f64);
    for j in 0..d {
        let xh = (x[j].to_f64().unwrap() - mean) * inv;
        let gj = g[j].to_f64().unwrap() * w[j].to_f64().unwrap();
        g_mean += gj;
        gx_mean += gj * xh;
    }
    g_mean /= d as f64;
    gx_mean /= d as f64;
    for j in 0..d {
        let xh = (x[j].to_f64().unwrap() - mean) * inv;
        let gj = g[j].to_f64().unwrap() * w[j].to_f64().unwrap();
        g[j] = T::from((gj - g_mean - xh * gx_mean) * inv).unwrap();
    }
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "finelens-layer-norm"
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
        let out = run3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, b| self.forward(x, w, b),
            |x, w, b| self.forward(x, w, b),
        )?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        weight: &Tensor,
        bias: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let grad = grad.detach().contiguous()?;
        // (x, γ) → packed [dx | dγ | dβ]: one pass computes all three.
        let packed = x
            .detach()
            .apply_op3_no_bwd(&weight.detach(), &grad, &Backward(*self))?;
        let n = x.elem_count();
        let d = self.d;
        let flat = packed.flatten_all()?;
        let dx = x
            .track_op()
            .then(|| flat.narrow(0, 0, n)?.reshape(x.shape()))
            .transpose()?;
        let dw = weight
            .track_op()
            .then(|| flat.narrow(0, n, d))
            .transpose()?;
        let db = bias
            .track_op()
            .then(|| flat.narrow(0, n + d, d))
            .transpose()?;
        Ok((dx, dw, db))
    }
}

/// The backward pass as an op over (x, γ, dy), returning dx, dγ and dβ end to end.
struct Backward(LayerNorm);

impl CustomOp3 for Backward {
    fn name(&self) -> &'static str {
        "finelens-layer-norm-backward"
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
        let n = l1.shape().elem_count() + 2 * self.0.d;
        // [dx | dγ | dβ]
        fn packed<T>((mut dx, params): (Vec<T>, Vec<T>)) -> Vec<T> {
            dx.extend(params);
            dx
        }
        let out = run3(
            self.name(),
            (s1, l1),
            (s2, l2),
            (s3, l3),
            |x, w, dy| packed(self.0.backward(x, w, dy)),
            |x, w, dy| packed(self.0.backward(x, w, dy)),
        )?;
        Ok((out, Shape::from(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, max_rel_diff, randn};
    use candle_core::{DType, Var};

    /// Layer norm composed of candle ops (what `nn::layer_norm` ran before this op).
    fn composed(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Tensor {
        let last = candle_core::D::Minus1;
        let centred = x.broadcast_sub(&x.mean_keepdim(last).unwrap()).unwrap();
        let var = centred.sqr().unwrap().mean_keepdim(last).unwrap();
        let normed = centred
            .broadcast_div(&(var + eps).unwrap().sqrt().unwrap())
            .unwrap();
        normed
            .broadcast_mul(weight)
            .unwrap()
            .broadcast_add(bias)
            .unwrap()
    }

    /// Output and all three gradients against the composed ops, over more rows than one block
    /// (and a partial last block), in f64 and f32.
    #[test]
    fn matches_the_composed_ops() {
        for (dims, dtype, tol) in [
            ((3usize, 50usize, 24usize), DType::F64, 1e-12),
            ((2, 70, 384), DType::F32, 1e-5),
        ] {
            let x = Var::from_tensor(&randn(dims, 0.5, 2.0, dtype, 1)).unwrap();
            let w = Var::from_tensor(&randn(dims.2, 1.0, 0.3, dtype, 2)).unwrap();
            let b = Var::from_tensor(&randn(dims.2, 0.0, 0.3, dtype, 3)).unwrap();
            let r = randn(dims, 0.0, 1.0, dtype, 4);
            let ours = layer_norm(&x, &w, &b, 1e-12).unwrap();
            let reference = composed(&x, &w, &b, 1e-12);
            assert!(max_rel_diff(&ours, &reference) < tol, "{dims:?}");
            let g0 = (&ours * &r).unwrap().sum_all().unwrap().backward().unwrap();
            let g1 = (&reference * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            for (name, v) in [("x", &x), ("weight", &w), ("bias", &b)] {
                let e = max_rel_diff(g0.get(v).unwrap(), g1.get(v).unwrap());
                assert!(e < tol, "{dims:?} {name}: {e}");
            }
        }
    }

    #[test]
    fn input_gradient_matches_finite_differences() {
        let x = Var::from_tensor(&randn((2, 3, 5), 0.0, 1.0, DType::F64, 7)).unwrap();
        let w = randn(5, 1.0, 0.3, DType::F64, 8);
        let b = randn(5, 0.0, 0.3, DType::F64, 9);
        let r = randn((2, 3, 5), 0.0, 1.0, DType::F64, 10);
        let loss = |t: &Tensor| -> f64 {
            (layer_norm(t, &w, &b, 1e-5).unwrap() * &r)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        let g = (layer_norm(&x, &w, &b, 1e-5).unwrap() * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let ours: Vec<f64> = g.get(&x).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let flat: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut f = |p: &[f64]| loss(&Tensor::from_slice(p, (2, 3, 5), x.device()).unwrap());
        for (j, a) in ours.iter().enumerate() {
            let e = central_difference(&mut f, &flat, j);
            assert!((a - e).abs() < 1e-6 * (1.0 + e.abs()), "x[{j}]: {a} vs {e}");
        }
        // Plain parameters get no gradient.
        assert!(g.get(&w).is_none() && g.get(&b).is_none());
    }
}
