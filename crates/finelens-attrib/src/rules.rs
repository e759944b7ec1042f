//! Methods that change how ReLU and max-pool send gradients back ([`finelens_models::rules`]):
//! DeepLIFT with the rescale rule and DeepLiftShap (Shrikumar, Greenside & Kundaje 2017;
//! Lundberg & Lee 2017), guided backpropagation and deconvolution (Springenberg et al. 2015;
//! Zeiler & Fergus 2014), guided Grad-CAM (Selvaraju et al. 2017) and LRP (Montavon et al.
//! 2019), whose rules reach the convolutions and the dense head too. The model is not forked:
//! the rule is chosen for the forward pass, and its ops keep it for their backward.
//!
//! The rules are defined on ReLU and max-pool, so these methods are for models whose only
//! nonlinearities are those (the ResNets); a BERT's GELU, softmax and LayerNorm have none.

use candle_core::Tensor;
use finelens_models::rules::{with_backward_rule, with_lrp, BackwardRule, LrpRules};
use finelens_models::Classifier;

use crate::baseline::{Baseline, Normalisation};
use crate::error::{settings, Result};
use crate::grad_cam::GradCam;
use crate::target::input_gradients;
use crate::{checked_attribution, each_input, plain_attributions, Attribution, Attributor, Sign};

/// DeepLIFT (rescale rule): (x − x′) ⊙ the multipliers backpropagated from the target logit.
/// Summation-to-delta holds exactly: Σ attributions = F(x) − F(x′). Over several baselines
/// (an [`Baseline::Average`]) the attributions are averaged — DeepLiftShap — and sum to
/// F(x) − mean F(x′).
#[derive(Debug, Clone)]
pub struct DeepLift {
    pub baseline: Baseline,
    pub normalisation: Normalisation,
    /// The method's name in outputs: `deeplift` or `deeplift_shap`.
    pub name: &'static str,
}

impl DeepLift {
    fn attribute_one(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let baselines = self.baseline.materialise(x, &self.normalisation)?;
        let k = baselines.len();
        // Every baseline's reference beside its own copy of the input: [x, …, x, x′₁, …, x′ₖ].
        let inputs = Tensor::cat(&vec![x.clone(); k], 0)?;
        let references = Tensor::cat(&baselines, 0)?;
        let batch = Tensor::cat(&[&inputs, &references], 0)?;
        // The target logit of both halves is differentiated: the rule keeps their gradients
        // equal, which makes max-pool's rule exact.
        let (f, g) = with_backward_rule(BackwardRule::DeepLiftRescale, || {
            input_gradients(model, &batch, &vec![target; 2 * k])
        })?;
        let multipliers = g.narrow(0, 0, k)?;
        let map = ((&inputs - &references)? * multipliers)?
            .sum_keepdim(0)?
            .affine(1.0 / k as f64, 0.0)?;
        let output_difference =
            (f[..k].iter().sum::<f64>() - f[k..].iter().sum::<f64>()) / k as f64;
        checked_attribution(&map, target, output_difference)
    }
}

impl Attributor for DeepLift {
    fn name(&self) -> &'static str {
        self.name
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        self.baseline.check(self.name)
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

/// Guided backpropagation or deconvolution: the gradient with ReLU's backward rule replaced.
#[derive(Debug, Clone)]
pub struct GuidedGradient {
    /// [`BackwardRule::GuidedBackprop`] or [`BackwardRule::Deconvolution`].
    pub rule: BackwardRule,
}

impl GuidedGradient {
    fn maps(&self, model: &dyn Classifier, x: &Tensor, targets: &[usize]) -> Result<Tensor> {
        let (_, g) = with_backward_rule(self.rule, || input_gradients(model, x, targets))?;
        Ok(g)
    }
}

impl Attributor for GuidedGradient {
    fn name(&self) -> &'static str {
        match self.rule {
            BackwardRule::Deconvolution => "deconvolution",
            _ => "guided_backprop",
        }
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        match self.rule {
            BackwardRule::GuidedBackprop | BackwardRule::Deconvolution => Ok(()),
            other => Err(settings(
                self.name(),
                format!("not a guided rule: {other:?}"),
            )),
        }
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        plain_attributions(&self.maps(model, x, targets)?, targets)
    }
}

/// Guided Grad-CAM: guided backpropagation's map times Grad-CAM's, upsampled to the input
/// (Captum's `GuidedGradCam`).
#[derive(Debug, Clone)]
pub struct GuidedGradCam {
    pub grad_cam: GradCam,
}

impl Attributor for GuidedGradCam {
    fn name(&self) -> &'static str {
        "guided_grad_cam"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, model: &dyn Classifier) -> Result<()> {
        self.grad_cam.check(model)
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let guided = GuidedGradient {
            rule: BackwardRule::GuidedBackprop,
        }
        .compute(model, x, targets)?;
        let cams = self.grad_cam.compute(model, x, targets)?;
        Ok(guided
            .into_iter()
            .zip(cams)
            .map(|(g, cam)| Attribution {
                // 1×H×W broadcast over the channels.
                map: &g.map * &cam.map,
                target: g.target,
                completeness: None,
                surrogate: None,
            })
            .collect())
    }
}

/// Layer-wise relevance propagation (Montavon et al. 2019) with the composite their overview
/// recommends for convolutional networks: zᴮ (pixels within the normalisation's bounds) or z⁺ at
/// the first convolution, the γ-rule at the others
/// (ε-rule when γ = 0), the ε-rule at the dense head, relevance through ReLU and max-pool as the
/// gradient, residual adds split in proportion, batch norm folded into its convolution
/// ([`finelens_models::rules`]). R = x ⊙ the modified gradient of the target logit. The
/// "completeness" reported is conservation: Σ R against the logit F(x) itself, which LRP
/// distributes (biases and ε absorb the difference; with no bias it holds to ε).
#[derive(Debug, Clone, Copy)]
pub struct Lrp {
    pub rules: LrpRules,
}

impl Attributor for Lrp {
    fn name(&self) -> &'static str {
        "lrp"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        let LrpRules { epsilon, gamma, .. } = self.rules;
        if !(epsilon.is_finite() && epsilon >= 0.0 && gamma.is_finite() && gamma >= 0.0) {
            return Err(settings(
                self.name(),
                format!("epsilon and gamma must be finite and ≥ 0, got {epsilon} and {gamma}"),
            ));
        }
        Ok(())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        finelens_models::rules::take_input_relevance();
        let (logits, g) = with_lrp(self.rules, || input_gradients(model, x, targets))?;
        // A zᴮ first layer leaves the input's relevance itself; otherwise it is x ⊙ the message.
        let maps = match finelens_models::rules::take_input_relevance() {
            Some(r) => r,
            None => (x * g)?,
        };
        (0..targets.len())
            .map(|i| checked_attribution(&maps.narrow(0, i, 1)?, targets[i], logits[i]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::target::target_logits;
    use crate::testutil::{fixture_image, fixture_model, flat, randn, LinearModel, IMAGENET};
    use candle_core::DType;
    use candle_core::Device;
    use finelens_models::resnet::{Head, Hook, ModelConfig};
    use finelens_models::{Arch, Mode, ParamStore, ResNet};

    /// F(x) = W₂·relu(W₁·vec(x)), with finelens's ReLU (which the rules switch).
    struct TwoLayer {
        w1: Tensor,
        w2: Tensor,
    }

    impl Classifier for TwoLayer {
        fn forward_hooked(
            &self,
            x: &Tensor,
            _: Mode,
            _: Option<Hook>,
        ) -> finelens_models::Result<Tensor> {
            let h = finelens_models::relu::relu(&x.flatten_from(1)?.matmul(&self.w1.t()?)?)?;
            Ok(h.matmul(&self.w2.t()?)?)
        }
        fn layer_names(&self) -> Vec<String> {
            vec!["fc".into()]
        }
        fn num_classes(&self) -> usize {
            self.w2.dim(0).unwrap()
        }
    }

    fn deeplift(baseline: Baseline) -> DeepLift {
        DeepLift {
            baseline,
            normalisation: IMAGENET,
            name: "deeplift",
        }
    }

    /// Summation-to-delta, Σ attributions = F(x) − F(x′), to f64 rounding through every op a
    /// ResNet has — convolutions, batch norm, max-pool, residual adds, average pool — for one
    /// baseline and averaged over several (DeepLiftShap), checked against the logits computed
    /// apart; and the rule is not the gradient: DeepLIFT differs from (x − x′) ⊙ ∂F/∂x there.
    #[test]
    fn deeplift_sums_to_the_output_difference_through_resnets() {
        let mini = fixture_model(DType::F64);
        let config = ModelConfig::new(Arch::ResNet18, 4, Head::Linear).unwrap();
        let store = ParamStore::init(&config.param_specs(), 5, &Device::Cpu)
            .unwrap()
            .frozen_as(DType::F64)
            .unwrap();
        let r18 = ResNet::new(config, &store).unwrap();
        let x = Tensor::cat(
            &[
                fixture_image(1, 0, DType::F64),
                fixture_image(4, 2, DType::F64),
            ],
            0,
        )
        .unwrap();
        let small = randn((1, 3, 40, 40), DType::F64, 3);
        let cases: [(&dyn Classifier, &Tensor, &[usize]); 2] =
            [(&mini, &x, &[1, 4]), (&r18, &small, &[2])];
        for (model, x, targets) in cases {
            for baseline in [
                Baseline::Zeros,
                Baseline::Blur { sigma: 3.0 },
                Baseline::Average(vec![
                    Baseline::Black,
                    Baseline::UniformNoise { seed: 1 },
                    Baseline::UniformNoise { seed: 2 },
                ]),
            ] {
                let out = deeplift(baseline.clone())
                    .attribute(model, x, targets)
                    .unwrap();
                for (i, a) in out.iter().enumerate() {
                    let xi = x.narrow(0, i, 1).unwrap();
                    let bs = baseline.materialise(&xi, &IMAGENET).unwrap();
                    let fb = target_logits(
                        model,
                        &Tensor::cat(&bs, 0).unwrap(),
                        &vec![a.target; bs.len()],
                    )
                    .unwrap();
                    let fx = target_logits(model, &xi, &[a.target]).unwrap()[0];
                    let want = fx - fb.iter().sum::<f64>() / bs.len() as f64;
                    let sum: f64 = a.map.iter().map(|&v| v as f64).sum();
                    let c = a.completeness.unwrap();
                    assert!((c.output_difference - want).abs() < 1e-9 * (1.0 + want.abs()));
                    // The map is stored in f32: its sum carries f32 rounding, the f64 one not.
                    assert!(c.relative_delta < 1e-9, "{}: {c:?}", baseline.name());
                    assert!(
                        (sum - want).abs() < 1e-5 * (1.0 + want.abs()),
                        "{sum} vs {want}"
                    );
                }
                // Not the gradient: with a blurred reference, ReLUs and windows change state
                // between x′ and x, and DeepLIFT is not (x − x′) ⊙ ∂F/∂x(x). (From a zero
                // reference a bias-free ReLU network gives exactly that — Ancona et al. 2018 —
                // as the random resnet18, whose batch norms have no shift yet, would.)
                if let Baseline::Blur { .. } = baseline {
                    let (_, g) = input_gradients(model, x, targets).unwrap();
                    let mut reference = Vec::new();
                    for i in 0..targets.len() {
                        let xi = x.narrow(0, i, 1).unwrap();
                        let b = baseline.materialise(&xi, &IMAGENET).unwrap().remove(0);
                        reference.extend(flat(
                            &((&xi - b).unwrap() * g.narrow(0, i, 1).unwrap()).unwrap(),
                        ));
                    }
                    let ours: Vec<f64> = out
                        .iter()
                        .flat_map(|a| a.map.iter().map(|&v| v as f64))
                        .collect();
                    let scale = ours.iter().fold(0f64, |m, v| m.max(v.abs()));
                    let gap = ours
                        .iter()
                        .zip(&reference)
                        .map(|(a, b)| (a - b).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        gap > 1e-2 * scale,
                        "DeepLIFT is the gradient's: the rule did not apply ({gap} of {scale})"
                    );
                }
            }
        }
    }

    /// On a linear model every multiplier is the weight: DeepLIFT is (x − x′) ⊙ W, as IG is.
    #[test]
    fn deeplift_is_exact_on_a_linear_model() {
        let (c, h, w) = (3, 4, 5);
        let weight = randn((2, c * h * w, 1, 1), DType::F64, 1)
            .reshape((2, c * h * w))
            .unwrap();
        let model = LinearModel {
            weight: weight.clone(),
            bias: Tensor::new(&[0.5f64, -0.25], &Device::Cpu).unwrap(),
        };
        let x = randn((1, c, h, w), DType::F64, 2);
        let a = deeplift(Baseline::Black)
            .attribute(&model, &x, &[1])
            .unwrap()
            .remove(0);
        let b = Baseline::Black
            .materialise(&x, &IMAGENET)
            .unwrap()
            .remove(0);
        let want =
            flat(&((&x - &b).unwrap().flatten_all().unwrap() * weight.get(1).unwrap()).unwrap());
        for (got, want) in a.map.iter().zip(&want) {
            assert!((*got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()));
        }
    }

    /// F = w₂·relu(W₁x): the gradient is W₁ᵀ(m ⊙ w₂) with m = [W₁x > 0]; guided
    /// backpropagation keeps only the positive w₂ there, W₁ᵀ(m ⊙ w₂⁺); deconvolution ignores the
    /// mask, W₁ᵀ w₂⁺. Guided Grad-CAM is guided backpropagation times Grad-CAM's upsampled map.
    #[test]
    fn guided_rules_have_their_closed_forms() {
        let (d, k) = (2 * 3 * 3, 7);
        let w1 = randn((k, d, 1, 1), DType::F64, 4).reshape((k, d)).unwrap();
        let w2 = randn((1, k, 1, 1), DType::F64, 5).reshape((1, k)).unwrap();
        let model = TwoLayer {
            w1: w1.clone(),
            w2: w2.clone(),
        };
        let x = randn((1, 2, 3, 3), DType::F64, 6);
        let pre = flat(&x.flatten_from(1).unwrap().matmul(&w1.t().unwrap()).unwrap());
        let (w1v, w2v) = (flat(&w1), flat(&w2));
        let expect = |coef: &dyn Fn(usize) -> f64| -> Vec<f64> {
            (0..d)
                .map(|j| (0..k).map(|i| w1v[i * d + j] * coef(i)).sum())
                .collect()
        };
        let positive = |i: usize| w2v[i].max(0.0);
        let guided = expect(&|i| if pre[i] > 0.0 { positive(i) } else { 0.0 });
        let deconvolution = expect(&positive);
        for (rule, want) in [
            (BackwardRule::GuidedBackprop, guided),
            (BackwardRule::Deconvolution, deconvolution),
        ] {
            let a = GuidedGradient { rule }
                .attribute(&model, &x, &[0])
                .unwrap()
                .remove(0);
            for (got, want) in a.map.iter().zip(&want) {
                assert!(
                    (*got as f64 - want).abs() < 1e-6 * (1.0 + want.abs()),
                    "{rule:?}"
                );
            }
        }
        // Some unit is inactive and some output weight negative, so the three differ.
        assert!(pre.iter().any(|&p| p <= 0.0) && w2v.iter().any(|&w| w < 0.0));

        let mini = fixture_model(DType::F32);
        let x = fixture_image(2, 1, DType::F32);
        let gg = GuidedGradCam {
            grad_cam: GradCam::default(),
        }
        .attribute(&mini, &x, &[2])
        .unwrap()
        .remove(0);
        let g = GuidedGradient {
            rule: BackwardRule::GuidedBackprop,
        }
        .attribute(&mini, &x, &[2])
        .unwrap()
        .remove(0);
        let cam = GradCam::default()
            .attribute(&mini, &x, &[2])
            .unwrap()
            .remove(0);
        assert_eq!(gg.map.dim(), g.map.dim());
        let want = &g.map * &cam.map;
        assert_eq!(gg.map, want);
        // The rule is off again afterwards: the plain gradient is back.
        assert_eq!(
            finelens_models::rules::backward_rule(),
            BackwardRule::Gradient
        );
    }

    /// With no bias anywhere (batch norm at its initial β = 0, μ = 0, a zero head bias) every
    /// LRP rule conserves relevance: z⁺ and γ divide by exactly the sum they distribute, ReLU and
    /// max-pool pass it on, adds split it, average pooling is linear — so Σ R = F(x) to ε, through
    /// resnet-mini and a resnet18, for the γ composite and the plain ε-rule. With the trained
    /// fixture's biases it is not conserved (they absorb relevance), and the report says so.
    #[test]
    fn lrp_conserves_relevance_without_biases() {
        let bias_free = |arch: Arch, classes: usize| {
            let config = ModelConfig::new(arch, classes, Head::Linear).unwrap();
            let specs = config.param_specs();
            let store = ParamStore::init(&specs, 7, &Device::Cpu).unwrap();
            let tensors = store
                .iter()
                .map(|(n, t, _)| {
                    let t = if n == "fc.bias" {
                        t.zeros_like().unwrap()
                    } else {
                        t
                    };
                    (n.to_owned(), t)
                })
                .collect();
            let store = ParamStore::from_tensors(&specs, tensors, std::path::Path::new("-"), "x")
                .unwrap()
                .frozen_as(DType::F64)
                .unwrap();
            ResNet::new(config, &store).unwrap()
        };
        let (mini, r18) = (bias_free(Arch::ResNetMini, 6), bias_free(Arch::ResNet18, 4));
        let x = fixture_image(2, 1, DType::F64);
        let small = randn((1, 3, 40, 40), DType::F64, 3);
        for (model, x) in [(&mini, &x), (&r18, &small)] {
            let zb = Some(([-3.0; 3], [3.0; 3]));
            for (gamma, bounds) in [(0.25, None), (0.0, None), (0.25, zb)] {
                let lrp = Lrp {
                    rules: LrpRules {
                        epsilon: 1e-12,
                        gamma,
                        bounds,
                    },
                };
                let a = lrp.attribute(model, x, &[1]).unwrap().remove(0);
                let c = a.completeness.unwrap();
                let logit = target_logits(model, x, &[1]).unwrap()[0];
                assert!((c.output_difference - logit).abs() < 1e-12 * logit.abs().max(1.0));
                assert!(c.relative_delta < 1e-6, "γ = {gamma}, {bounds:?}: {c:?}");
            }
        }
        let trained = fixture_model(DType::F64);
        let a = Lrp {
            rules: LrpRules {
                epsilon: 1e-9,
                gamma: 0.25,
                bounds: None,
            },
        }
        .attribute(&trained, &x, &[2])
        .unwrap()
        .remove(0);
        assert!(a.map.iter().all(|v| v.is_finite()));
        assert!(a.completeness.unwrap().relative_delta > 1e-3);
        assert_eq!(
            finelens_models::rules::backward_rule(),
            BackwardRule::Gradient
        );
    }
}
