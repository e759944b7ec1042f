//! Which output an attribution explains, and the model's prediction for each input.

use candle_core::{DType, Tensor, Var};
use finelens_models::{Classifier, Mode};

use crate::error::{AttribError, Result};

/// The class whose logit is explained.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    /// The class the model predicts for each input (the default, as in Captum's examples).
    Predicted,
    Class(usize),
}

fn list_classes(class_names: &[String]) -> String {
    class_names
        .iter()
        .enumerate()
        .map(|(i, n)| format!("{i}={n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

impl Target {
    /// `predicted`, a class index, or a class name.
    pub fn parse(s: &str, class_names: &[String]) -> Result<Self> {
        if s == "predicted" {
            return Ok(Target::Predicted);
        }
        if let Some(i) = class_names.iter().position(|n| n == s) {
            return Ok(Target::Class(i));
        }
        match s.parse::<usize>() {
            Ok(index) if index < class_names.len() => Ok(Target::Class(index)),
            Ok(index) => Err(AttribError::TargetOutOfRange {
                index,
                valid: list_classes(class_names),
            }),
            Err(_) => Err(AttribError::UnknownClass {
                name: s.to_owned(),
                valid: list_classes(class_names),
            }),
        }
    }
}

/// One input's forward pass: logits, softmax probabilities and the explained class.
#[derive(Debug, Clone)]
pub struct Prediction {
    pub logits: Vec<f32>,
    pub probabilities: Vec<f32>,
    pub predicted: usize,
    pub target: usize,
}

impl Prediction {
    /// The k most probable classes, most probable first.
    pub fn top_k(&self, k: usize) -> Vec<(usize, f32)> {
        let mut idx: Vec<usize> = (0..self.probabilities.len()).collect();
        idx.sort_by(|&a, &b| self.probabilities[b].total_cmp(&self.probabilities[a]));
        idx.into_iter()
            .take(k)
            .map(|i| (i, self.probabilities[i]))
            .collect()
    }
}

/// Forward `x` (N×C×H×W) in eval mode and resolve `target` for each input.
pub fn predict(model: &dyn Classifier, x: &Tensor, target: &Target) -> Result<Vec<Prediction>> {
    let logits = model
        .forward(&x.detach(), Mode::Eval)?
        .to_dtype(DType::F32)?;
    let rows: Vec<Vec<f32>> = logits.to_vec2()?;
    let classes = model.num_classes();
    rows.into_iter()
        .map(|logits| {
            let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
            let z: f32 = exp.iter().sum();
            let probabilities: Vec<f32> = exp.iter().map(|e| e / z).collect();
            let predicted = (0..logits.len())
                .max_by(|&a, &b| logits[a].total_cmp(&logits[b]))
                .unwrap_or(0);
            let target = match *target {
                Target::Predicted => predicted,
                Target::Class(c) if c < classes => c,
                Target::Class(index) => {
                    return Err(AttribError::TargetOutOfRange {
                        index,
                        valid: format!("0..{}", classes.saturating_sub(1)),
                    })
                }
            };
            Ok(Prediction {
                logits,
                probabilities,
                predicted,
                target,
            })
        })
        .collect()
}

/// N×K one-hot rows selecting `targets`, in `x`'s dtype.
fn one_hot(targets: &[usize], classes: usize, like: &Tensor) -> Result<Tensor> {
    let mut v = vec![0f32; targets.len() * classes];
    for (i, &t) in targets.iter().enumerate() {
        v[i * classes + t] = 1.0;
    }
    Ok(Tensor::from_vec(v, (targets.len(), classes), like.device())?.to_dtype(like.dtype())?)
}

/// An error unless there is one target per input and each names a class.
fn check_targets(targets: &[usize], n: usize, classes: usize) -> Result<()> {
    if n != targets.len() {
        return Err(crate::error::settings(
            "target",
            format!("{} targets for {n} inputs", targets.len()),
        ));
    }
    match targets.iter().find(|&&t| t >= classes) {
        Some(&index) => Err(AttribError::TargetOutOfRange {
            index,
            valid: format!("0..{}", classes.saturating_sub(1)),
        }),
        None => Ok(()),
    }
}

/// F_{tᵢ}(xᵢ) for each row of `logits`, as an N-vector that stays in the graph.
fn picked(logits: &Tensor, targets: &[usize]) -> Result<Tensor> {
    let (n, classes) = logits.dims2()?;
    check_targets(targets, n, classes)?;
    Ok((logits * one_hot(targets, classes, logits)?)?.sum(1)?)
}

/// The target logits F_{tᵢ}(xᵢ), one per input (no gradient).
pub fn target_logits(model: &dyn Classifier, x: &Tensor, targets: &[usize]) -> Result<Vec<f64>> {
    let logits = model.forward(&x.detach(), Mode::Eval)?;
    Ok(picked(&logits, targets)?.to_dtype(DType::F64)?.to_vec1()?)
}

/// ∂F_{tᵢ}/∂xᵢ for every input of the batch, with the target logits. Differentiating the sum
/// Σᵢ F_{tᵢ}(xᵢ) gives every input's gradient in one backward, since in eval mode each input's
/// logits depend on that input alone. The weights should be detached (`ParamStore::frozen_as`),
/// so that backward computes the input gradient only.
pub fn input_gradients(
    model: &dyn Classifier,
    x: &Tensor,
    targets: &[usize],
) -> Result<(Vec<f64>, Tensor)> {
    let xv = Var::from_tensor(&x.detach())?;
    let logits = model.forward(xv.as_tensor(), Mode::Eval)?;
    let f = picked(&logits, targets)?;
    let values: Vec<f64> = f.to_dtype(DType::F64)?.to_vec1()?;
    let grads = f.sum_all()?.backward()?;
    let g = grads
        .get(xv.as_tensor())
        .ok_or_else(|| {
            crate::error::settings(
                "gradient",
                "the model's output does not depend on its input",
            )
        })?
        .detach();
    Ok((values, g))
}

/// Backward of Σᵢ F_{tᵢ} from logits computed by the caller (Grad-CAM differentiates with
/// respect to an inner activation rather than the input).
pub(crate) fn backward_targets(
    logits: &Tensor,
    targets: &[usize],
) -> Result<candle_core::backprop::GradStore> {
    Ok(picked(logits, targets)?.sum_all()?.backward()?)
}

/// A classifier whose single output is the L2 norm of another's activation at `layer` (the
/// penultimate embedding, `avgpool` for a ResNet): a target two models share even when their heads
/// differ, for comparing a fine-tuned model's explanations with its parent's.
pub struct EmbeddingNorm<'a> {
    pub model: &'a dyn Classifier,
    pub layer: String,
}

impl Classifier for EmbeddingNorm<'_> {
    fn forward_hooked(
        &self,
        x: &Tensor,
        mode: Mode,
        mut hook: Option<finelens_models::resnet::Hook>,
    ) -> finelens_models::Result<Tensor> {
        let mut embedding = None;
        let mut inner = |name: &str, t: &Tensor| -> finelens_models::Result<Option<Tensor>> {
            let replaced = match hook.as_mut() {
                Some(h) => h(name, t)?,
                None => None,
            };
            if name == self.layer {
                embedding = Some(replaced.clone().unwrap_or_else(|| t.clone()));
            }
            Ok(replaced)
        };
        self.model.forward_hooked(x, mode, Some(&mut inner))?;
        let e = embedding.ok_or_else(|| finelens_models::ModelError::UnknownLayer {
            name: self.layer.clone(),
            known: self.model.layer_names().join(", "),
        })?;
        Ok(e.flatten_from(1)?.sqr()?.sum_keepdim(1)?.sqrt()?)
    }

    fn layer_names(&self) -> Vec<String> {
        self.model.layer_names()
    }

    fn num_classes(&self) -> usize {
        1
    }

    fn describe(&self) -> finelens_models::ModelDescription {
        self.model.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_by_name_or_index_and_errors_list_the_classes() {
        let names: Vec<String> = ["cat", "dog", "<b>"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            Target::parse("predicted", &names).unwrap(),
            Target::Predicted
        );
        assert_eq!(Target::parse("dog", &names).unwrap(), Target::Class(1));
        assert_eq!(Target::parse("2", &names).unwrap(), Target::Class(2));
        let e = Target::parse("7", &names).unwrap_err().to_string();
        assert_eq!(
            e,
            "target class 7 is out of range; valid classes: 0=cat, 1=dog, 2=<b>"
        );
        let e = Target::parse("horse", &names).unwrap_err().to_string();
        assert!(e.starts_with("unknown target class `horse`"), "{e}");
    }

    #[test]
    fn embedding_norm_is_the_norm_of_the_pooled_features() {
        let model = crate::testutil::fixture_model(DType::F64);
        let x = crate::testutil::fixture_image(1, 0, DType::F64);
        let (_, taps) = model
            .forward_with_taps(&x, Mode::Eval, &["avgpool"])
            .unwrap();
        let want: f64 = taps[0]
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .sqrt()
            .unwrap()
            .to_scalar()
            .unwrap();
        let e = EmbeddingNorm {
            model: &model,
            layer: "avgpool".into(),
        };
        let got = target_logits(&e, &x, &[0]).unwrap()[0];
        assert!((got - want).abs() < 1e-12 * want);
        // Gradients flow through it: IG's completeness holds on the embedding norm too.
        let ig = crate::IntegratedGradients {
            steps: 256,
            ..crate::IntegratedGradients::new(crate::Normalisation {
                mean: [0.0; 3],
                std: [1.0; 3],
            })
        };
        let a = crate::Attributor::attribute(&ig, &e, &x, &[0]).unwrap();
        assert!(a[0].completeness.unwrap().relative_delta < 0.02);
    }

    #[test]
    fn predictions_have_probabilities_and_top_k() {
        let model = crate::testutil::fixture_model(DType::F32);
        let x = crate::testutil::fixture_image(3, 2, DType::F32);
        let p = predict(&model, &x, &Target::Predicted).unwrap().remove(0);
        let total: f32 = p.probabilities.iter().sum();
        assert!((total - 1.0).abs() < 1e-5);
        let top = p.top_k(5);
        assert_eq!(top.len(), 5);
        assert_eq!(top[0].0, p.predicted);
        assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
        assert_eq!(p.target, p.predicted);
        assert_eq!(predict(&model, &x, &Target::Class(4)).unwrap()[0].target, 4);
    }
}
