//! Attribution: which parts of an input made a classifier produce a given output.
//!
//! Every method has one call shape — [`Attributor::attribute`]: (model, inputs N×C×H×W in the
//! model's normalised space, one target class per input) → one [`Attribution`] per input, with the
//! input's shape (Grad-CAM: 1×H×W) and per-input diagnostics. Settings are plain structs checked
//! by [`Attributor::check`] before any work. The quadrature rules and baselines that integrated
//! gradients uses live in their own modules, as in Captum.
//!
//! Models should be built from a frozen store (`ParamStore::frozen_as`): explaining needs no
//! weight gradient, and with detached weights backward computes the input gradient only.

pub mod attention;
pub mod baseline;
pub mod bench;
pub mod error;
pub mod grad_cam;
pub mod gradient_shap;
pub mod integrated_gradients;
pub mod layer;
pub mod occlusion;
pub mod quadrature;
pub mod registry;
pub mod rules;
pub mod saliency;
pub mod segments;
pub mod surrogate;
pub mod target;
#[cfg(test)]
mod testutil;

use candle_core::{DType, Tensor};
use finelens_models::Classifier;
use ndarray::Array3;

pub use baseline::{Baseline, Normalisation};
pub use error::{AttribError, Result};
pub use grad_cam::GradCam;
pub use integrated_gradients::IntegratedGradients;
pub use layer::{LayerConductance, LayerIntegratedGradients, NeuronIntegratedGradients};
pub use occlusion::{Fill, Occlusion};
pub use quadrature::Rule;
pub use registry::{
    BaselineSpec, BuildContext, FillSpec, Method, MethodOptions, MethodSpec, TokenBaseline,
};
pub use saliency::{Aggregate, GradientKind, Saliency, SmoothGrad};
pub use surrogate::{FeaturePerturbation, Surrogate};
pub use target::{input_gradients, predict, target_logits, EmbeddingNorm, Prediction, Target};

/// How an attribution's values read, which decides how it is drawn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sign {
    /// Positive and negative evidence (a diverging colour map centred on zero).
    Signed,
    /// Magnitudes only (a sequential colour map).
    Absolute,
}

/// Integrated gradients' completeness axiom, Σᵢ attributionᵢ = F(x) − F(x′), checked.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Completeness {
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub attribution_sum: f64,
    /// F(x) − F(x′) for the target logit (x′ averaged over the baselines).
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub output_difference: f64,
    /// |Σ attributions − (F(x) − F(x′))|.
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub delta: f64,
    /// `delta` / |F(x) − F(x′)|.
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub relative_delta: f64,
}

impl Completeness {
    /// The check of Σ attributions (`attribution_sum`) against F(x) − F(x′).
    pub fn of(attribution_sum: f64, output_difference: f64) -> Completeness {
        let delta = (attribution_sum - output_difference).abs();
        Completeness {
            attribution_sum,
            output_difference,
            delta,
            relative_delta: delta / output_difference.abs().max(f64::MIN_POSITIVE),
        }
    }
}

/// One input's attribution.
#[derive(Debug, Clone)]
pub struct Attribution {
    /// C×H×W (Grad-CAM: 1×H×W), in the model's normalised input space.
    pub map: Array3<f32>,
    pub target: usize,
    pub completeness: Option<Completeness>,
    /// KernelSHAP, LIME and feature ablation: the surrogate's fit and the evaluations spent.
    pub surrogate: Option<Surrogate>,
}

/// One attribution method.
pub trait Attributor {
    /// The method's name in outputs and file names (`integrated_gradients`).
    fn name(&self) -> &'static str;

    fn sign(&self) -> Sign;

    /// Validate the settings against the model before any work.
    fn check(&self, model: &dyn Classifier) -> Result<()>;

    /// The attributions without the checks; call [`Attributor::attribute`].
    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>>;

    /// Check the settings, attribute, and refuse a NaN or infinite result (naming the input's
    /// index in the batch).
    fn attribute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        self.check(model)?;
        let n = x.dims4()?.0;
        if targets.len() != n {
            return Err(error::settings(
                self.name(),
                format!("{} targets for {n} inputs", targets.len()),
            ));
        }
        let out = self.compute(model, x, targets)?;
        if let Some(input) = out
            .iter()
            .position(|a| !a.map.iter().all(|v| v.is_finite()))
        {
            return Err(AttribError::NonFinite {
                method: self.name(),
                input,
            });
        }
        Ok(out)
    }
}

/// Bytes of activations kept for backward per input value, for batching gradient passes. From
/// a measurement: a plain candle ResNet-18 forward + backward at batch 50 × 3×224×224 peaked at
/// 11.5 GB, ≈ 1,530 bytes per input value; rounded up.
const BACKWARD_BYTES_PER_INPUT_VALUE: usize = 1_600;

/// Memory one batched gradient pass may use by default ("fits in a few GB").
pub const DEFAULT_GRADIENT_MEMORY: usize = 2 << 30;

/// The largest batch of C×H×W inputs whose forward + backward fits in
/// [`DEFAULT_GRADIENT_MEMORY`]: 8 at 224×224, 106 at 64×64.
pub fn default_internal_batch(c: usize, h: usize, w: usize) -> usize {
    (DEFAULT_GRADIENT_MEMORY / (BACKWARD_BYTES_PER_INPUT_VALUE * c * h * w).max(1)).max(1)
}

/// Split an N×C×H×W tensor into per-input C×H×W arrays (as f32).
pub(crate) fn to_maps(t: &Tensor) -> Result<Vec<Array3<f32>>> {
    let (n, c, h, w) = t.dims4()?;
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.chunks(c * h * w)
        .take(n)
        .map(|chunk| Array3::from_shape_vec((c, h, w), chunk.to_vec()).expect("sizes agree"))
        .collect())
}

/// One input's attribution from its map (1×C×H×W) and F(x) − F(x′), with the completeness
/// check of the map's sum against it.
pub(crate) fn checked_attribution(
    map: &Tensor,
    target: usize,
    output_difference: f64,
) -> Result<Attribution> {
    let attribution_sum: f64 = map.to_dtype(DType::F64)?.sum_all()?.to_scalar()?;
    Ok(Attribution {
        map: to_maps(map)?.remove(0),
        target,
        completeness: Some(Completeness::of(attribution_sum, output_difference)),
        surrogate: None,
    })
}

/// One attribution per input of a batch of maps (N×C×H×W), without a completeness check.
pub(crate) fn plain_attributions(maps: &Tensor, targets: &[usize]) -> Result<Vec<Attribution>> {
    Ok(to_maps(maps)?
        .into_iter()
        .zip(targets)
        .map(|(map, &target)| Attribution {
            map,
            target,
            completeness: None,
            surrogate: None,
        })
        .collect())
}

/// One attribution per input of `x` (N×C×H×W), each from `one` on that input alone (1×C×H×W)
/// and its target: for the methods that explain input by input.
pub(crate) fn each_input(
    x: &Tensor,
    targets: &[usize],
    mut one: impl FnMut(&Tensor, usize) -> Result<Attribution>,
) -> Result<Vec<Attribution>> {
    targets
        .iter()
        .enumerate()
        .map(|(i, &t)| one(&x.narrow(0, i, 1)?, t))
        .collect()
}

/// Chunks of at most `batch` items from `0..n`.
pub(crate) fn chunks(n: usize, batch: usize) -> impl Iterator<Item = std::ops::Range<usize>> {
    let batch = batch.max(1);
    (0..n.div_ceil(batch)).map(move |i| i * batch..((i + 1) * batch).min(n))
}
