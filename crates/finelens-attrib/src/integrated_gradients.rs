//! Integrated gradients (Sundararajan, Taly & Yan 2017, eq. 1):
//!
//!   IGᵢ(x) = (xᵢ − x′ᵢ) · ∫₀¹ ∂F(x′ + α(x − x′))/∂xᵢ dα,
//!
//! the integral taken by a quadrature rule. Path points are evaluated `internal_batch` at a time
//! and folded into a running weighted sum, so memory does not grow with the number of steps.
//! Completeness (Σᵢ IGᵢ = F(x) − F(x′)) holds for the exact integral; its residual is reported
//! for every input as the check that the step count suffices.

use candle_core::Tensor;
use finelens_models::Classifier;

use crate::baseline::{Baseline, Normalisation};
use crate::error::{check_internal_batch, Result};
use crate::quadrature::Rule;
use crate::target::{input_gradients, target_logits};
use crate::{
    checked_attribution, chunks, default_internal_batch, each_input, Attribution, Attributor, Sign,
};

#[derive(Debug, Clone)]
pub struct IntegratedGradients {
    pub steps: usize,
    pub rule: Rule,
    pub baseline: Baseline,
    /// Path points per gradient pass; `None` picks one from the input size.
    pub internal_batch: Option<usize>,
    /// The model's input normalisation (for the black and noise baselines).
    pub normalisation: Normalisation,
}

impl IntegratedGradients {
    /// Captum's defaults: 50 steps, Gauss–Legendre, zero baseline.
    pub fn new(normalisation: Normalisation) -> Self {
        Self {
            steps: 50,
            rule: Rule::GaussLegendre,
            baseline: Baseline::Zeros,
            internal_batch: None,
            normalisation,
        }
    }

    /// The batch size used for C×H×W inputs.
    pub fn batch_for(&self, c: usize, h: usize, w: usize) -> usize {
        self.internal_batch
            .unwrap_or_else(|| default_internal_batch(c, h, w))
            .min(self.steps)
            .max(1)
    }

    /// One input (1×C×H×W): its attribution and completeness.
    fn attribute_one(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let (_, c, h, w) = x.dims4()?;
        let nodes = self.rule.nodes(self.steps)?;
        let batch = self.batch_for(c, h, w);
        let baselines = self.baseline.materialise(x, &self.normalisation)?;
        let mut total: Option<Tensor> = None;
        for b in &baselines {
            let diff = (x - b)?;
            let mut integral: Option<Tensor> = None;
            for range in chunks(nodes.len(), batch) {
                let m = range.len();
                let (alphas, weights): (Vec<f64>, Vec<f64>) = nodes[range].iter().copied().unzip();
                let column = |v: Vec<f64>| -> Result<Tensor> {
                    Ok(Tensor::from_vec(v, (m, 1, 1, 1), x.device())?.to_dtype(x.dtype())?)
                };
                let points = diff.broadcast_mul(&column(alphas)?)?.broadcast_add(b)?;
                let (_, g) = input_gradients(model, &points, &vec![target; m])?;
                let weighted = g.broadcast_mul(&column(weights)?)?.sum_keepdim(0)?;
                integral = Some(match integral {
                    Some(acc) => (acc + weighted)?,
                    None => weighted,
                });
            }
            let attr = (diff * integral.expect("steps ≥ 1"))?;
            total = Some(match total {
                Some(acc) => (acc + attr)?,
                None => attr,
            });
        }
        let map = (total.expect("at least one baseline") / baselines.len() as f64)?;
        checked_attribution(
            &map,
            target,
            output_difference(model, x, &baselines, target)?,
        )
    }
}

/// F(x) − mean F(x′) over the baselines, for the target logit: what a path method's
/// attributions should sum to.
pub(crate) fn output_difference(
    model: &dyn Classifier,
    x: &Tensor,
    baselines: &[Tensor],
    target: usize,
) -> Result<f64> {
    let fx = target_logits(model, x, &[target])?[0];
    let fb = target_logits(
        model,
        &Tensor::cat(baselines, 0)?,
        &vec![target; baselines.len()],
    )?;
    Ok(fx - fb.iter().sum::<f64>() / baselines.len() as f64)
}

impl Attributor for IntegratedGradients {
    fn name(&self) -> &'static str {
        "integrated_gradients"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        self.rule.nodes(self.steps)?;
        check_internal_batch(self.name(), self.internal_batch)?;
        self.baseline.check(self.name())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        each_input(x, targets, |xi, t| self.attribute_one(model, xi, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixture_image, fixture_model, randn, LinearModel, IMAGENET};
    use candle_core::DType;

    /// For F(x) = W·x + b the gradient is W everywhere on the path, so IG = (x − x′) ⊙ W for any
    /// rule and step count, and completeness holds to rounding.
    #[test]
    fn linear_model_gives_the_closed_form() {
        let (c, h, w) = (3, 5, 4);
        let weight = randn((2, c * h * w, 1, 1), DType::F64, 1)
            .reshape((2, c * h * w))
            .unwrap();
        let model = LinearModel {
            weight: weight.clone(),
            bias: Tensor::new(&[0.3f64, -1.0], &candle_core::Device::Cpu).unwrap(),
        };
        let x = randn((2, c, h, w), DType::F64, 2);
        let baselines = [
            Baseline::Zeros,
            Baseline::Black,
            Baseline::Blur { sigma: 1.0 },
            Baseline::Average(vec![Baseline::UniformNoise { seed: 3 }, Baseline::Black]),
        ];
        for rule in Rule::ALL {
            for baseline in &baselines {
                let ig = IntegratedGradients {
                    steps: 7,
                    rule,
                    baseline: baseline.clone(),
                    internal_batch: Some(3),
                    normalisation: IMAGENET,
                };
                let targets = [1, 0];
                let out = ig.attribute(&model, &x, &targets).unwrap();
                for (i, a) in out.iter().enumerate() {
                    let xi = x.narrow(0, i, 1).unwrap();
                    let bs = baseline.materialise(&xi, &IMAGENET).unwrap();
                    let wt = weight
                        .narrow(0, targets[i], 1)
                        .unwrap()
                        .reshape((1, c, h, w))
                        .unwrap();
                    let mut expected = vec![0f64; c * h * w];
                    for b in &bs {
                        let e: Vec<f64> = ((&xi - b).unwrap() * &wt)
                            .unwrap()
                            .flatten_all()
                            .unwrap()
                            .to_vec1()
                            .unwrap();
                        for (acc, v) in expected.iter_mut().zip(e) {
                            *acc += v / bs.len() as f64;
                        }
                    }
                    for (got, want) in a.map.iter().zip(&expected) {
                        assert!(
                            (*got as f64 - want).abs() < 1e-5 * (1.0 + want.abs()),
                            "{rule:?} {}: {got} vs {want}",
                            baseline.name()
                        );
                    }
                    let cpl = a.completeness.unwrap();
                    assert!(cpl.delta < 1e-9, "{rule:?}: delta {}", cpl.delta);
                }
            }
        }
    }

    /// Completeness on the trained resnet-mini, from 16 to 1,024 steps, for every rule. ReLU
    /// networks are piecewise linear along the path, so the error comes from the kinks and falls
    /// roughly as 1/steps for every rule (Gauss–Legendre has no edge here, and the fall need not be
    /// monotone). The table is printed; the bounds are asserted.
    #[test]
    fn completeness_delta_falls_with_steps_on_resnet_mini() {
        let model = fixture_model(DType::F32);
        let x = fixture_image(5, 3, DType::F32);
        let target = crate::predict(&model, &x, &crate::Target::Predicted).unwrap()[0].target;
        let steps = [16, 32, 64, 128, 256, 512, 1024];
        eprintln!("relative completeness delta |Σ IG − (F(x) − F(0))| / |F(x) − F(0)|, resnet-mini 64×64:");
        eprintln!(
            "{:>18} {}",
            "steps",
            steps.map(|s| format!("{s:>8}")).join("")
        );
        for rule in Rule::ALL {
            let mut row = Vec::new();
            for &n in &steps {
                let ig = IntegratedGradients {
                    steps: n,
                    rule,
                    ..IntegratedGradients::new(IMAGENET)
                };
                let a = ig.attribute(&model, &x, &[target]).unwrap();
                row.push(a[0].completeness.unwrap().relative_delta);
            }
            eprintln!(
                "{:>18} {}",
                rule.name(),
                row.iter()
                    .map(|d| format!("{:>7.3}%", d * 100.0))
                    .collect::<String>()
            );
            assert!(
                row[4] < 0.01,
                "{rule:?}: {:.3}% at 256 steps",
                row[4] * 100.0
            );
            assert!(
                row[6] < 0.002,
                "{rule:?}: {:.3}% at 1024 steps",
                row[6] * 100.0
            );
        }
    }

    /// The running sum over internal batches gives the one-batch answer.
    #[test]
    fn internal_batching_does_not_change_the_result() {
        let model = fixture_model(DType::F32);
        let x = fixture_image(1, 2, DType::F32);
        let run = |batch| {
            IntegratedGradients {
                steps: 12,
                internal_batch: Some(batch),
                baseline: Baseline::Black,
                ..IntegratedGradients::new(IMAGENET)
            }
            .attribute(&model, &x, &[1])
            .unwrap()
            .remove(0)
        };
        let (one, many) = (run(12), run(5));
        let scale = one.map.iter().fold(0f32, |m, v| m.max(v.abs()));
        let err = (&one.map - &many.map)
            .iter()
            .fold(0f32, |m, v| m.max(v.abs()));
        assert!(
            err <= 1e-5 * scale,
            "batched IG differs by {err} (scale {scale})"
        );
    }

    #[test]
    fn bad_settings_are_named() {
        let model = crate::testutil::RegionModel;
        let x = Tensor::zeros((1, 2, 4, 4), DType::F32, &candle_core::Device::Cpu).unwrap();
        let mut ig = IntegratedGradients::new(IMAGENET);
        ig.steps = 0;
        let e = ig.attribute(&model, &x, &[0]).unwrap_err().to_string();
        assert!(e.contains("steps must be at least 1"), "{e}");
        ig.steps = 10;
        ig.internal_batch = Some(0);
        assert!(ig.attribute(&model, &x, &[0]).is_err());
    }
}
