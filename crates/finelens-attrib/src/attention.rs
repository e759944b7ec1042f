//! Attention views of a transformer classifier: which tokens the classifier's readout attends to.
//! They read the attention probabilities the model shows its hook (`….attention`, N × heads × T ×
//! T, one per layer, rows summing to 1) for one input and give one score per token.
//!
//! * **attention**: the last layer's attention, averaged over heads, in the readout's row.
//! * **attention rollout** (Abnar & Zuidema 2020, "Quantifying Attention Flow in Transformers"):
//!   Bₗ = ½·meanₕ(Aₗ) + ½·I (the residual connection as attention to oneself),
//!   R = B_L ⋯ B₁, the readout's row of R.
//! * **gradient-weighted attention rollout** (Chefer, Gur & Wolf 2021, "Generic
//!   Attention-model Explainability…", their rule for self-attention encoders):
//!   Āₗ = meanₕ[(∂y/∂Aₗ ⊙ Aₗ)⁺], R ← R + Āₗ·R from R = I, layer by layer from the input; the
//!   readout's row of R − I (the identity they start from would give the readout token itself a
//!   1 that says nothing; Chefer et al. drop that token's column instead). It is the Grad-CAM analogue for transformers: attention weighted by how
//!   much the explained logit depends on it, negative evidence dropped.
//!
//! The readout is the token whose final state the head reads ([CLS], row 0) or, for a head that
//! averages over tokens, the mean of the rows.

use candle_core::{DType, Tensor, Var, D};
use finelens_models::{Classifier, Mode};
use ndarray::{Array2, Array3, Axis};

use crate::error::Result;

/// Which row of an attention matrix the classifier reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Readout {
    /// One token's final state (BERT's [CLS] at 0).
    Token(usize),
    /// The mean over tokens (sentence-transformers' pooling).
    Mean,
}

/// One layer's attention, heads × T × T, and the explained logit's gradient with respect to it.
pub struct LayerAttention {
    pub probabilities: Array3<f32>,
    pub gradient: Option<Array3<f32>>,
}

fn array3(t: &Tensor) -> Result<Array3<f32>> {
    let (_, h, r, c) = t.dims4()?;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(Array3::from_shape_vec((h, r, c), v).expect("dims match"))
}

/// The attention of every layer whose name ends in `.attention`, for one input `x` (batch 1), in
/// network order; with `target`, also the gradient of that logit with respect to each.
pub fn attention(
    model: &dyn Classifier,
    x: &Tensor,
    target: Option<usize>,
) -> Result<Vec<LayerAttention>> {
    let mut taken: Vec<(Tensor, Option<Var>)> = Vec::new();
    let mut hook = |name: &str, t: &Tensor| -> finelens_models::Result<Option<Tensor>> {
        if !name.ends_with(".attention") {
            return Ok(None);
        }
        if target.is_some() {
            // A + Z with Z a zero leaf: Z's gradient is the logit's total derivative with respect
            // to A, later layers' attention included (candle keeps only leaves' gradients, and
            // swapping A itself for a leaf would cut the paths through later attention).
            let z = Var::zeros(t.shape(), t.dtype(), t.device())?;
            let through = (t + z.as_tensor())?;
            taken.push((t.detach(), Some(z)));
            Ok(Some(through))
        } else {
            taken.push((t.detach(), None));
            Ok(None)
        }
    };
    let logits = model.forward_hooked(&x.detach(), Mode::Eval, Some(&mut hook))?;
    let grads = match target {
        Some(c) => Some(logits.narrow(D::Minus1, c, 1)?.sum_all()?.backward()?),
        None => None,
    };
    taken
        .iter()
        .map(|(a, v)| {
            let gradient = match (v, &grads) {
                (Some(v), Some(g)) => Some(match g.get(v.as_tensor()) {
                    Some(g) => array3(g)?,
                    // A layer the logit does not depend on: a zero gradient.
                    None => Array3::zeros(array3(a)?.dim()),
                }),
                _ => None,
            };
            Ok(LayerAttention {
                probabilities: array3(a)?,
                gradient,
            })
        })
        .collect()
}

fn readout_row(m: &Array2<f32>, readout: Readout) -> Vec<f32> {
    match readout {
        Readout::Token(i) => m.row(i).to_vec(),
        Readout::Mean => m.mean_axis(Axis(0)).expect("rows").to_vec(),
    }
}

fn head_mean(a: &Array3<f32>) -> Array2<f32> {
    a.mean_axis(Axis(0)).expect("at least one head")
}

/// The last layer's attention, averaged over heads, in the readout's row.
pub fn last_layer(layers: &[LayerAttention], readout: Readout) -> Vec<f32> {
    let last = layers.last().expect("a transformer has layers");
    readout_row(&head_mean(&last.probabilities), readout)
}

/// Attention rollout: R = B_L ⋯ B₁ with Bₗ = ½·meanₕ(Aₗ) + ½·I; the readout's row.
pub fn rollout(layers: &[LayerAttention], readout: Readout) -> Vec<f32> {
    let t = layers[0].probabilities.dim().1;
    let mut r = Array2::<f32>::eye(t);
    for l in layers {
        let b = head_mean(&l.probabilities) * 0.5 + Array2::<f32>::eye(t) * 0.5;
        r = b.dot(&r);
    }
    readout_row(&r, readout)
}

/// Gradient-weighted rollout: R ← R + meanₕ[(∇A ⊙ A)⁺]·R from R = I; the readout's row of R − I.
pub fn grad_rollout(layers: &[LayerAttention], readout: Readout) -> Vec<f32> {
    let t = layers[0].probabilities.dim().1;
    let mut r = Array2::<f32>::eye(t);
    for l in layers {
        let g = l
            .gradient
            .as_ref()
            .expect("grad_rollout needs the attention's gradients");
        let weighted = (g * &l.probabilities).mapv(|v| v.max(0.0));
        r = &r + &head_mean(&weighted).dot(&r);
    }
    readout_row(&(r - Array2::<f32>::eye(t)), readout)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layer(a: Array2<f32>, heads: usize) -> LayerAttention {
        let (r, c) = a.dim();
        let mut p = Array3::zeros((heads, r, c));
        for mut h in p.outer_iter_mut() {
            h.assign(&a);
        }
        LayerAttention {
            probabilities: p,
            gradient: None,
        }
    }

    /// Attention to oneself only: every layer is the identity, and so is the rollout.
    #[test]
    fn rollout_of_self_attention_is_the_identity() {
        let layers: Vec<_> = (0..3).map(|_| layer(Array2::eye(4), 2)).collect();
        assert_eq!(rollout(&layers, Readout::Token(0)), [1.0, 0.0, 0.0, 0.0]);
        assert_eq!(last_layer(&layers, Readout::Token(2)), [0.0, 0.0, 1.0, 0.0]);
    }

    /// Uniform attention U (every entry 1/T) gives B = ½U + ½I, and since U² = U,
    /// Bᴸ = (1 − 2⁻ᴸ)·U + 2⁻ᴸ·I: a closed form for the rollout's rows, which also sum to 1.
    #[test]
    fn rollout_of_uniform_attention_has_its_closed_form() {
        let t = 5;
        let u = Array2::from_elem((t, t), 1.0 / t as f32);
        for l in 1..5 {
            let layers: Vec<_> = (0..l).map(|_| layer(u.clone(), 3)).collect();
            let row = rollout(&layers, Readout::Token(1));
            let keep = 0.5f32.powi(l);
            for (j, v) in row.iter().enumerate() {
                let want = (1.0 - keep) / t as f32 + if j == 1 { keep } else { 0.0 };
                assert!((v - want).abs() < 1e-6, "L {l}, column {j}: {v} vs {want}");
            }
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
            let mean = rollout(&layers, Readout::Mean);
            assert!(mean.iter().all(|v| (v - 1.0 / t as f32).abs() < 1e-6));
        }
    }

    /// With no positive gradient-weighted attention nothing accumulates; with one layer of
    /// weight W, R − I = W.
    #[test]
    fn gradient_rollout_accumulates_positive_evidence_only() {
        let mut a = layer(Array2::from_elem((3, 3), 1.0 / 3.0), 1);
        a.gradient = Some(Array3::from_elem((1, 3, 3), -1.0));
        assert_eq!(grad_rollout(&[a], Readout::Token(0)), [0.0, 0.0, 0.0]);
        let mut a = layer(Array2::from_elem((3, 3), 1.0 / 3.0), 1);
        let mut g = Array3::zeros((1, 3, 3));
        g[[0, 0, 2]] = 3.0;
        a.gradient = Some(g);
        assert_eq!(grad_rollout(&[a], Readout::Token(0)), [0.0, 0.0, 1.0]);
    }
}
