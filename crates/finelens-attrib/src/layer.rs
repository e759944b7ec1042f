//! Attributions to and through an inner layer — Captum's layer and neuron methods — built on
//! the model's activation hook ([`finelens_models::resnet::Hook`]):
//!
//! * **Layer integrated gradients**: integrated gradients of the network above the layer,
//!   F(A), along the straight line in the layer's activation space from A(x′) to A(x) (Captum's
//!   `LayerIntegratedGradients`): LIGⱼ = (Aⱼ(x) − Aⱼ(x′)) · ∫₀¹ ∂F/∂Aⱼ(A(x′) + α(A(x) − A(x′))) dα,
//!   and Σⱼ LIGⱼ = F(x) − F(x′) (completeness, in the layer's space).
//! * **Layer conductance** (Dhamdhere, Sundararajan & Yan 2018, eq. 3): how much of integrated
//!   gradients' flow along the *input* path x′ → x passes through each unit,
//!   Condⱼ = ∫₀¹ ∂F/∂Aⱼ · dAⱼ(x′ + α(x − x′))/dα dα, summed over the units = F(x) − F(x′). The
//!   integral is a Riemann–Stieltjes sum over `steps` equal intervals with the gradient averaged
//!   at both ends (trapezoid weights: exact when F is quadratic in A along the path; Captum takes
//!   the left end's gradient).
//! * **Neuron integrated gradients**: integrated gradients of the input for one channel's
//!   summed activation instead of a logit (Captum's `NeuronIntegratedGradients` with a channel
//!   selector); completeness holds against that activation.
//!
//! A layer attribution lives in the layer's space. For the heat maps and the audit it is
//! projected to the input the way Captum's `LayerAttribution.interpolate` does it: a spatial
//! activation (N×C×h×w) is summed over channels and resized bilinearly to the input's H×W; a
//! text model's token activation (N×T×D) already has the input's token × hidden layout. The
//! completeness check is on the layer-space sum (resizing does not keep sums).

use candle_core::{DType, Tensor, Var};
use finelens_models::resnet::Hook;
use finelens_models::{Classifier, Mode, ModelDescription};
use ndarray::{Array3, Axis};

use crate::baseline::{Baseline, Normalisation};
use crate::error::{check_internal_batch, settings, Result};
use crate::grad_cam::upsample_bilinear;
use crate::integrated_gradients::output_difference;
use crate::integrated_gradients::IntegratedGradients;
use crate::target::backward_targets;
use crate::{
    checked_attribution, chunks, default_internal_batch, each_input, Attribution, Attributor, Sign,
};

/// The named layer, or the model's default (its last spatial layer).
pub(crate) fn resolve_layer(
    method: &'static str,
    layer: &Option<String>,
    model: &dyn Classifier,
) -> Result<String> {
    match layer {
        Some(l) => Ok(l.clone()),
        None => model.last_spatial_layer().ok_or_else(|| {
            settings(
                method,
                "the model names no default layer; pass one with layer=NAME",
            )
        }),
    }
}

/// The activation at `layer` for `x` (no gradient).
pub fn activation(model: &dyn Classifier, x: &Tensor, layer: &str) -> Result<Tensor> {
    let (_, taps) = model.forward_with_taps(&x.detach(), Mode::Eval, &[layer])?;
    Ok(taps.into_iter().next().expect("one layer asked").detach())
}

/// The activation A at `layer` and ∂F_{tᵢ}/∂A for each input: the layer's output is replaced by
/// a leaf variable, so backward stops there. The gradient is zero where the targets do not
/// depend on the layer.
pub fn layer_gradients(
    model: &dyn Classifier,
    x: &Tensor,
    layer: &str,
    targets: &[usize],
) -> Result<(Tensor, Tensor)> {
    model.check_layer(layer)?;
    let mut leaf: Option<Var> = None;
    let mut hook = |name: &str, t: &Tensor| -> finelens_models::Result<Option<Tensor>> {
        if name != layer {
            return Ok(None);
        }
        let v = Var::from_tensor(&t.detach())?;
        let out = v.as_tensor().clone();
        leaf = Some(v);
        Ok(Some(out))
    };
    let logits = model.forward_hooked(&x.detach(), Mode::Eval, Some(&mut hook))?;
    let a = leaf.expect("the layer was checked").as_tensor().clone();
    let grads = backward_targets(&logits, targets)?;
    let g = match grads.get(&a) {
        Some(g) => g.detach(),
        None => a.zeros_like()?,
    };
    Ok((a.detach(), g))
}

/// An activation as a batch of C×H×W maps: spatial ones as they are, a token activation
/// N×T×D as N×1×T×D (the text input's layout).
fn as_maps(a: &Tensor, layer: &str, method: &'static str) -> Result<Tensor> {
    match a.rank() {
        4 => Ok(a.clone()),
        3 => Ok(a.unsqueeze(1)?),
        _ => Err(settings(
            method,
            format!(
                "layer `{layer}` has shape {:?}; a layer attribution needs spatial (N×C×h×w) or token (N×T×D) extent",
                a.dims()
            ),
        )),
    }
}

/// A layer-space attribution (C×h×w, or 1×T×D) drawn over an input of shape `input`
/// (C×H×W): channels summed and resized, or the token layout as it is.
fn project(map: Array3<f32>, input: (usize, usize, usize)) -> Array3<f32> {
    let (_, h, w) = input;
    if map.dim() == input {
        return map;
    }
    let summed = map.sum_axis(Axis(0));
    upsample_bilinear(&summed, h, w).insert_axis(Axis(0))
}

/// Per input, a layer-space attribution from `layer_attribution`, [`project`]ed onto the input.
fn projected(
    x: &Tensor,
    targets: &[usize],
    layer_attribution: impl Fn(&Tensor, usize) -> Result<Attribution>,
) -> Result<Vec<Attribution>> {
    let (_, c, h, w) = x.dims4()?;
    each_input(x, targets, |xi, t| {
        let a = layer_attribution(xi, t)?;
        Ok(Attribution {
            map: project(a.map, (c, h, w)),
            ..a
        })
    })
}

/// The network above `layer`, as a classifier of the layer's activation (as C×h×w maps): the
/// forward runs on the one input `x` (repeated to the batch) with the layer's output replaced.
/// Below the layer nothing is tracked, so its gradient is the gradient at the layer.
struct AboveLayer<'a> {
    model: &'a dyn Classifier,
    layer: &'a str,
    /// 1×C×H×W.
    x: &'a Tensor,
    /// The activation's shape for one input.
    shape: Vec<usize>,
}

impl Classifier for AboveLayer<'_> {
    fn forward_hooked(
        &self,
        a: &Tensor,
        mode: Mode,
        mut hook: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        let m = a.dim(0)?;
        let mut dims = self.x.dims().to_vec();
        dims[0] = m;
        let xs = self.x.broadcast_as(dims)?.contiguous()?;
        let mut shape = self.shape.clone();
        shape[0] = m;
        let replacement = a.reshape(shape)?;
        let mut inner = |name: &str, t: &Tensor| -> finelens_models::Result<Option<Tensor>> {
            if name == self.layer {
                return Ok(Some(replacement.clone()));
            }
            match hook.as_mut() {
                Some(h) => h(name, t),
                None => Ok(None),
            }
        };
        self.model.forward_hooked(&xs, mode, Some(&mut inner))
    }

    fn layer_names(&self) -> Vec<String> {
        self.model.layer_names()
    }

    fn num_classes(&self) -> usize {
        self.model.num_classes()
    }

    fn describe(&self) -> ModelDescription {
        self.model.describe()
    }
}

/// Layer integrated gradients at `layer` (default: the model's last spatial layer).
#[derive(Debug, Clone)]
pub struct LayerIntegratedGradients {
    pub layer: Option<String>,
    /// Steps, rule, input-space baseline and internal batch (the baseline's activation is the
    /// path's start).
    pub ig: IntegratedGradients,
}

impl LayerIntegratedGradients {
    /// The attribution in the layer's space (C×h×w, or 1×T×D) with its completeness check.
    pub fn layer_attribution(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let layer = resolve_layer(self.name(), &self.layer, model)?;
        let (_, c, h, w) = x.dims4()?;
        let baselines = self.ig.baseline.materialise(x, &self.ig.normalisation)?;
        // The input's activation and every baseline's, in one forward pass.
        let mut inputs = vec![x.clone()];
        inputs.extend(baselines.iter().cloned());
        let all = activation(model, &Tensor::cat(&inputs, 0)?, &layer)?;
        let a = all.narrow(0, 0, 1)?;
        let maps = as_maps(&a, &layer, self.name())?;
        let starts = (1..inputs.len())
            .map(|k| {
                Ok(Baseline::Image(as_maps(
                    &all.narrow(0, k, 1)?,
                    &layer,
                    self.name(),
                )?))
            })
            .collect::<Result<Vec<_>>>()?;
        let above = AboveLayer {
            model,
            layer: &layer,
            x,
            shape: a.dims().to_vec(),
        };
        let ig = IntegratedGradients {
            baseline: Baseline::Average(starts),
            // The default batch for the layer's size would be too large: each point also runs
            // the network below the layer on the input.
            internal_batch: Some(
                self.ig
                    .internal_batch
                    .unwrap_or_else(|| default_internal_batch(c, h, w)),
            ),
            ..self.ig.clone()
        };
        let mut out = ig.compute(&above, &maps, &[target])?;
        Ok(out.remove(0))
    }
}

impl Attributor for LayerIntegratedGradients {
    fn name(&self) -> &'static str {
        "layer_integrated_gradients"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, model: &dyn Classifier) -> Result<()> {
        Attributor::check(&self.ig, model)?;
        Ok(model.check_layer(&resolve_layer(self.name(), &self.layer, model)?)?)
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        projected(x, targets, |xi, t| self.layer_attribution(model, xi, t))
    }
}

/// Layer conductance at `layer` (default: the model's last spatial layer).
#[derive(Debug, Clone)]
pub struct LayerConductance {
    pub layer: Option<String>,
    /// Equal intervals on the input path (points: steps + 1).
    pub steps: usize,
    pub baseline: Baseline,
    /// Path points per gradient pass; `None` picks one from the input size.
    pub internal_batch: Option<usize>,
    pub normalisation: Normalisation,
}

impl LayerConductance {
    /// The conductance of every unit of the layer (C×h×w, or 1×T×D), with the check of its sum
    /// against F(x) − F(x′). Only two path points' activations and gradients are held at once
    /// across internal batches.
    pub fn layer_attribution(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let layer = resolve_layer(self.name(), &self.layer, model)?;
        let (_, c, h, w) = x.dims4()?;
        let batch = self
            .internal_batch
            .unwrap_or_else(|| default_internal_batch(c, h, w))
            .clamp(1, self.steps + 1);
        let baselines = self.baseline.materialise(x, &self.normalisation)?;
        let mut total: Option<Tensor> = None;
        for b in &baselines {
            let diff = (x - b)?;
            let alphas: Vec<f64> = (0..=self.steps)
                .map(|i| i as f64 / self.steps as f64)
                .collect();
            // The last point of the previous internal batch: (activation, gradient).
            let mut last: Option<(Tensor, Tensor)> = None;
            let mut sum: Option<Tensor> = None;
            for range in chunks(alphas.len(), batch) {
                let m = range.len();
                let column = Tensor::from_vec(alphas[range].to_vec(), (m, 1, 1, 1), x.device())?
                    .to_dtype(x.dtype())?;
                let points = diff.broadcast_mul(&column)?.broadcast_add(b)?;
                let (a, g) = layer_gradients(model, &points, &layer, &vec![target; m])?;
                let (a, g) = (
                    as_maps(&a, &layer, self.name())?,
                    as_maps(&g, &layer, self.name())?,
                );
                let (a, g) = match last.take() {
                    Some((pa, pg)) => (Tensor::cat(&[&pa, &a], 0)?, Tensor::cat(&[&pg, &g], 0)?),
                    None => (a, g),
                };
                let k = a.dim(0)?;
                if k >= 2 {
                    // Σᵢ ½(gᵢ + gᵢ₊₁) ⊙ (aᵢ₊₁ − aᵢ) over the pairs this batch completes.
                    let da = (a.narrow(0, 1, k - 1)? - a.narrow(0, 0, k - 1)?)?;
                    let gm = ((g.narrow(0, 1, k - 1)? + g.narrow(0, 0, k - 1)?)? * 0.5)?;
                    let part = (da * gm)?.sum_keepdim(0)?;
                    sum = Some(match sum {
                        Some(s) => (s + part)?,
                        None => part,
                    });
                }
                last = Some((a.narrow(0, k - 1, 1)?, g.narrow(0, k - 1, 1)?));
            }
            let part = sum.expect("steps ≥ 1 gives two points");
            total = Some(match total {
                Some(t) => (t + part)?,
                None => part,
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

impl Attributor for LayerConductance {
    fn name(&self) -> &'static str {
        "layer_conductance"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, model: &dyn Classifier) -> Result<()> {
        if self.steps == 0 {
            return Err(settings(self.name(), "steps must be at least 1"));
        }
        check_internal_batch(self.name(), self.internal_batch)?;
        self.baseline.check(self.name())?;
        Ok(model.check_layer(&resolve_layer(self.name(), &self.layer, model)?)?)
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        projected(x, targets, |xi, t| self.layer_attribution(model, xi, t))
    }
}

/// One channel's activation at a layer, summed over its positions, as a classifier's single
/// output: what neuron integrated gradients explains.
pub struct ChannelOutput<'a> {
    pub model: &'a dyn Classifier,
    pub layer: String,
    pub channel: usize,
}

impl Classifier for ChannelOutput<'_> {
    fn forward_hooked(
        &self,
        x: &Tensor,
        mode: Mode,
        mut hook: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        let mut taken = None;
        let mut inner = |name: &str, t: &Tensor| -> finelens_models::Result<Option<Tensor>> {
            let replaced = match hook.as_mut() {
                Some(h) => h(name, t)?,
                None => None,
            };
            if name == self.layer {
                taken = Some(replaced.clone().unwrap_or_else(|| t.clone()));
            }
            Ok(replaced)
        };
        self.model.forward_hooked(x, mode, Some(&mut inner))?;
        let a = taken.ok_or_else(|| finelens_models::ModelError::UnknownLayer {
            name: self.layer.clone(),
            known: self.model.layer_names().join(", "),
        })?;
        // The channel axis: 1 for N×C×h×w and N×D, the last for a token activation N×T×D.
        let axis = if a.rank() == 3 { 2 } else { 1 };
        let channels = a.dim(axis)?;
        if self.channel >= channels {
            return Err(finelens_models::ModelError::Config(format!(
                "neuron_integrated_gradients: layer `{}` has {channels} channels; channel={} is out of range",
                self.layer, self.channel
            )));
        }
        let n = a.dim(0)?;
        Ok(a.narrow(axis, self.channel, 1)?
            .reshape((n, ()))?
            .sum_keepdim(1)?)
    }

    fn layer_names(&self) -> Vec<String> {
        self.model.layer_names()
    }

    fn num_classes(&self) -> usize {
        1
    }

    fn describe(&self) -> ModelDescription {
        self.model.describe()
    }
}

/// Neuron integrated gradients for one channel of `layer` (default: the model's last spatial
/// layer); without a channel, each input's most active one (largest summed activation).
#[derive(Debug, Clone)]
pub struct NeuronIntegratedGradients {
    pub layer: Option<String>,
    pub channel: Option<usize>,
    pub ig: IntegratedGradients,
}

impl NeuronIntegratedGradients {
    /// The channel explained for input `x` (1×C×H×W).
    pub fn channel_for(&self, model: &dyn Classifier, x: &Tensor) -> Result<usize> {
        if let Some(c) = self.channel {
            return Ok(c);
        }
        let layer = resolve_layer(self.name(), &self.layer, model)?;
        let a = activation(model, x, &layer)?;
        let axis = if a.rank() == 3 { 2 } else { 1 };
        let totals: Vec<f64> = a
            .to_dtype(DType::F64)?
            .transpose(0, axis)?
            .flatten_from(1)?
            .sum(1)?
            .to_vec1()?;
        Ok((0..totals.len())
            .max_by(|&i, &j| totals[i].total_cmp(&totals[j]))
            .unwrap_or(0))
    }
}

impl Attributor for NeuronIntegratedGradients {
    fn name(&self) -> &'static str {
        "neuron_integrated_gradients"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, model: &dyn Classifier) -> Result<()> {
        Attributor::check(&self.ig, model)?;
        Ok(model.check_layer(&resolve_layer(self.name(), &self.layer, model)?)?)
    }

    /// Input-space maps; each keeps its class target for the record, but its completeness is
    /// against the channel's activation, not a logit.
    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let layer = resolve_layer(self.name(), &self.layer, model)?;
        each_input(x, targets, |xi, t| {
            let neuron = ChannelOutput {
                model,
                layer: layer.clone(),
                channel: self.channel_for(model, xi)?,
            };
            let a = self.ig.compute(&neuron, xi, &[0])?.remove(0);
            Ok(Attribution { target: t, ..a })
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quadrature::Rule;
    use crate::testutil::{fixture_image, fixture_model, randn, IMAGENET};

    /// An inner layer `features` = x² (element-wise) and logits Fₖ = Σⱼ uₖⱼ·fⱼ + wₖⱼ·fⱼ². Above
    /// the layer F is quadratic in A, so layer IG (exact for any Gauss–Legendre rule, the
    /// integrand being linear in α) and conductance (trapezoid weights telescope:
    /// ½(gᵢ + gᵢ₊₁)(aᵢ₊₁ − aᵢ) = u·Δa + w·Δ(a²)) both equal u(a − a′) + w(a² − a′²) at any step
    /// count; the input path is not a straight line in A, so this tells conductance from IG.
    struct Quadratic {
        u: Tensor,
        w: Tensor,
    }

    impl Classifier for Quadratic {
        fn forward_hooked(
            &self,
            x: &Tensor,
            _: Mode,
            mut hook: Option<Hook>,
        ) -> finelens_models::Result<Tensor> {
            let mut f = x.sqr()?;
            if let Some(h) = hook.as_mut() {
                if let Some(r) = h("features", &f)? {
                    f = r;
                }
            }
            let f = f.flatten_from(1)?;
            Ok((f.matmul(&self.u.t()?)? + f.sqr()?.matmul(&self.w.t()?)?)?)
        }
        fn layer_names(&self) -> Vec<String> {
            vec!["features".into()]
        }
        fn num_classes(&self) -> usize {
            2
        }
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.flatten_all().unwrap().to_vec1().unwrap()
    }

    fn ig(steps: usize, baseline: Baseline) -> IntegratedGradients {
        IntegratedGradients {
            steps,
            rule: Rule::GaussLegendre,
            baseline,
            internal_batch: Some(2),
            normalisation: IMAGENET,
        }
    }

    #[test]
    fn closed_forms_on_a_quadratic_model() {
        let dims = (1, 2, 3, 4);
        let per = 2 * 3 * 4;
        let r = |seed| {
            randn((2, per, 1, 1), DType::F64, seed)
                .reshape((2, per))
                .unwrap()
        };
        let model = Quadratic { u: r(1), w: r(2) };
        let x = randn(dims, DType::F64, 3);
        let other = randn(dims, DType::F64, 4);
        let target = 1;
        for baseline in [Baseline::Zeros, Baseline::Image(other.clone())] {
            let xb = baseline.materialise(&x, &IMAGENET).unwrap().remove(0);
            let (a, ab) = (x.sqr().unwrap(), xb.sqr().unwrap());
            let row = |m: &Tensor| m.narrow(0, target, 1).unwrap().reshape(dims).unwrap();
            let want = flat(
                &((row(&model.u) * (&a - &ab).unwrap()).unwrap()
                    + (row(&model.w) * (a.sqr().unwrap() - ab.sqr().unwrap()).unwrap()).unwrap())
                .unwrap(),
            );
            let lig = LayerIntegratedGradients {
                layer: Some("features".into()),
                ig: ig(3, baseline.clone()),
            };
            let cond = LayerConductance {
                layer: Some("features".into()),
                steps: 5,
                baseline: baseline.clone(),
                internal_batch: Some(4),
                normalisation: IMAGENET,
            };
            for (name, out) in [
                ("layer IG", lig.attribute(&model, &x, &[target]).unwrap()),
                (
                    "conductance",
                    cond.attribute(&model, &x, &[target]).unwrap(),
                ),
            ] {
                let got = &out[0];
                assert_eq!(
                    got.map.dim(),
                    (2, 3, 4),
                    "{name}: the layer has the input's shape"
                );
                for (g, w) in got.map.iter().zip(&want) {
                    assert!(
                        (*g as f64 - w).abs() < 1e-5 * (1.0 + w.abs()),
                        "{name}: {g} vs {w}"
                    );
                }
                let c = got.completeness.unwrap();
                assert!(
                    c.delta < 1e-9 * (1.0 + c.output_difference.abs()),
                    "{name}: {c:?}"
                );
            }
            // Neuron IG of channel 1's sum Σ x²: (x − x′)·∫2(x′ + α(x − x′))dα = x² − x′² there.
            let nig = NeuronIntegratedGradients {
                layer: Some("features".into()),
                channel: Some(1),
                ig: ig(2, baseline.clone()),
            };
            let got = nig.attribute(&model, &x, &[target]).unwrap().remove(0);
            assert_eq!(got.target, target);
            let d = flat(&(&a - &ab).unwrap());
            for (i, (g, w)) in got.map.iter().zip(&d).enumerate() {
                let w = if i >= per / 2 { *w } else { 0.0 };
                assert!(
                    (*g as f64 - w).abs() < 1e-6 * (1.0 + w.abs()),
                    "{i}: {g} vs {w}"
                );
            }
            assert!(got.completeness.unwrap().delta < 1e-9);
        }
    }

    /// On the trained resnet-mini: completeness in the layer's space, the projected maps' shapes,
    /// conductance's internal batches and step counts, and the errors for unusable layers.
    #[test]
    fn resnet_mini_layers() {
        let model = fixture_model(DType::F32);
        let x = fixture_image(2, 1, DType::F32);
        let t = crate::predict(&model, &x, &crate::Target::Predicted).unwrap()[0].target;
        let lig = LayerIntegratedGradients {
            layer: Some("layer3".into()),
            ig: IntegratedGradients {
                steps: 64,
                ..IntegratedGradients::new(IMAGENET)
            },
        };
        let a = lig.attribute(&model, &x, &[t]).unwrap().remove(0);
        assert_eq!(a.map.dim(), (1, 64, 64));
        let c = a.completeness.unwrap();
        assert!(c.relative_delta < 0.05, "layer IG at layer3: {c:?}");

        let cond = |layer: &str, steps, batch| LayerConductance {
            layer: Some(layer.into()),
            steps,
            baseline: Baseline::Zeros,
            internal_batch: batch,
            normalisation: IMAGENET,
        };
        // Above layer4 come average pooling and the linear head: F is affine in A there, the
        // gradient constant along the path, and the trapezoid sum exact at any step count.
        let exact = cond("layer4", 4, None)
            .layer_attribution(&model, &x, t)
            .unwrap();
        let c = exact.completeness.unwrap();
        assert!(
            c.relative_delta < 1e-5,
            "conductance at layer4, 4 steps: {c:?}"
        );
        let one = cond("layer3", 8, Some(1))
            .layer_attribution(&model, &x, t)
            .unwrap();
        let all = cond("layer3", 8, None)
            .layer_attribution(&model, &x, t)
            .unwrap();
        let three = cond("layer3", 8, Some(3))
            .layer_attribution(&model, &x, t)
            .unwrap();
        for other in [&all, &three] {
            for (p, q) in one.map.iter().zip(other.map.iter()) {
                assert!((p - q).abs() < 1e-4 * (1.0 + p.abs()), "{p} vs {q}");
            }
        }
        let coarse = one.completeness.unwrap().relative_delta;
        let fine = cond("layer3", 128, None)
            .layer_attribution(&model, &x, t)
            .unwrap();
        let fine = fine.completeness.unwrap().relative_delta;
        eprintln!(
            "conductance at layer3, relative delta: 8 steps {coarse:.4}, 128 steps {fine:.4}"
        );
        assert!(
            fine < 0.03 && fine < coarse,
            "8 steps {coarse}, 128 steps {fine}"
        );

        let nig = NeuronIntegratedGradients {
            layer: Some("layer2".into()),
            channel: None,
            ig: IntegratedGradients {
                steps: 64,
                ..IntegratedGradients::new(IMAGENET)
            },
        };
        let a = nig.attribute(&model, &x, &[t]).unwrap().remove(0);
        assert_eq!(a.map.dim(), (3, 64, 64));
        let c = a.completeness.unwrap();
        assert!(
            c.relative_delta < 0.05 && c.output_difference > 0.0,
            "{c:?}"
        );

        let e = LayerIntegratedGradients {
            layer: Some("avgpool".into()),
            ig: IntegratedGradients::new(IMAGENET),
        }
        .attribute(&model, &x, &[t])
        .unwrap_err()
        .to_string();
        assert!(e.contains("spatial (N×C×h×w) or token"), "{e}");
        let e = NeuronIntegratedGradients {
            channel: Some(100_000),
            ..nig
        }
        .attribute(&model, &x, &[t])
        .unwrap_err()
        .to_string();
        assert!(e.contains("channel=100000 is out of range"), "{e}");
        let e = cond("layer4", 0, None)
            .attribute(&model, &x, &[t])
            .unwrap_err()
            .to_string();
        assert!(e.contains("steps must be at least 1"), "{e}");
    }
}
