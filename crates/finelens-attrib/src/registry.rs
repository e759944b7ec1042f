//! One method registry: every attribution method by name, its settings parsed from text, one
//! named default per setting, and one [`build`] that `explain`, `drift` and `audit` share.
//!
//! A method spec is the method's name, optionally followed by `:` and `key=value` settings:
//! `integrated_gradients:steps=64,rule=gausslegendre,baseline=blur:8`. In a list of methods
//! (`saliency,integrated_gradients:steps=32,rule=trapezoid,grad_cam`) an item holding `=` before
//! any `:` continues the previous method's settings. Averaged baselines are joined with `+`
//! inside a spec (`baseline=zeros+blur`), with `+` or `,` on their own.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::error::{settings, AttribError, Result};
use crate::gradient_shap::GradientShap;
use crate::layer::{LayerConductance, LayerIntegratedGradients, NeuronIntegratedGradients};
use crate::rules::{DeepLift, GuidedGradCam, GuidedGradient, Lrp};
use crate::surrogate::{FeaturePerturbation, Kind};
use crate::{
    Aggregate, Attributor, Baseline, Fill, GradCam, GradientKind, IntegratedGradients,
    Normalisation, Occlusion, Rule, Saliency, SmoothGrad,
};
use finelens_models::rules::{BackwardRule, LrpRules};

/// Integrated gradients' quadrature nodes. 64 Gauss–Legendre nodes keep the completeness gap
/// under 2% on the trained resnet-mini (the README's table) and under the audit's 5% gate.
pub const DEFAULT_IG_STEPS: usize = 64;
/// Gauss–Legendre converges fastest on smooth stretches of the path (see `quadrature`).
pub const DEFAULT_IG_RULE: Rule = Rule::GaussLegendre;
/// Layer conductance's equal intervals on the input path: its trapezoid sum converges like
/// integrated gradients' Riemann rules, so it takes IG's node count.
pub const DEFAULT_CONDUCTANCE_STEPS: usize = DEFAULT_IG_STEPS;
/// SmoothGrad's noisy samples: Smilkov et al. 2017 find little change beyond 20–50.
pub const DEFAULT_SMOOTHGRAD_SAMPLES: usize = 20;
/// SmoothGrad's noise σ as a share of the input's value range: the paper's 10–20% sweet spot.
pub const DEFAULT_SMOOTHGRAD_NOISE: f32 = 0.15;
/// DeepLiftShap's and GradientSHAP's baseline distribution when none is given (a text model's:
/// `pad`): this many seeded uniform-noise
/// images (Captum leaves the distribution to the caller; noise is the input-free choice).
pub const DEFAULT_SHAP_BASELINES: u64 = 8;
/// GradientSHAP's samples (Captum's default is 5; as many as SmoothGrad's for a steadier map).
pub const DEFAULT_GRADIENT_SHAP_SAMPLES: usize = 20;
/// Superpixels for feature ablation, KernelSHAP and LIME: about 80 pixels each at 64×64,
/// 1,000 at 224×224 (LIME's tutorials use 50–100).
pub const DEFAULT_SEGMENTS: usize = 50;
/// KernelSHAP's and LIME's coalitions: four per superpixel at the default 50, enough for the
/// weighted fit to be well determined.
pub const DEFAULT_SURROGATE_SAMPLES: usize = 200;
/// LRP's stabiliser (Captum's `EpsilonRule` default): small enough that relevance is conserved
/// wherever a denominator is not itself tiny.
pub const DEFAULT_LRP_EPSILON: f64 = 1e-9;
/// LRP's γ for the convolutions (Montavon et al. 2019 use 0.25 in the lower layers).
pub const DEFAULT_LRP_GAMMA: f64 = 0.25;
/// Occlusion's window, as a share of the input side (an eighth: objects span several windows).
pub const DEFAULT_OCCLUSION_WINDOW_DIVISOR: usize = 8;

/// Every attribution method, in the order outputs list them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Method {
    Gradient,
    Saliency,
    GradientXInput,
    Smoothgrad,
    SmoothgradSq,
    Vargrad,
    IntegratedGradients,
    /// Integrated gradients' expectation over a baseline distribution and random points.
    GradientShap,
    GradCam,
    Occlusion,
    /// DeepLIFT, rescale rule (ReLU networks).
    Deeplift,
    /// DeepLIFT averaged over a distribution of baselines (ReLU networks).
    DeepliftShap,
    /// Guided backpropagation (ReLU networks).
    GuidedBackprop,
    /// Deconvolution (ReLU networks).
    Deconvolution,
    /// Guided backpropagation × Grad-CAM (ReLU networks).
    GuidedGradCam,
    /// Integrated gradients of the network above a layer, in its activation space.
    LayerIntegratedGradients,
    /// Layer conductance (Dhamdhere et al. 2018): integrated gradients' flow through a layer.
    LayerConductance,
    /// Integrated gradients of one channel's activation.
    NeuronIntegratedGradients,
    /// F(x) − F(x with one superpixel or token off), per feature.
    FeatureAblation,
    /// KernelSHAP over superpixels or tokens (Lundberg & Lee 2017).
    KernelShap,
    /// LIME over superpixels or tokens (Ribeiro et al. 2016).
    Lime,
    /// Layer-wise relevance propagation (ReLU networks; Montavon et al. 2019).
    Lrp,
    /// Text models: the attention the classifier's token pays in the last layer.
    Attention,
    /// Text models: attention rollout (Abnar & Zuidema 2020).
    AttentionRollout,
    /// Text models: gradient-weighted attention rollout (Chefer, Gur & Wolf 2021).
    GradAttention,
}

impl Method {
    pub const ALL: [Method; 22] = [
        Method::Gradient,
        Method::Saliency,
        Method::GradientXInput,
        Method::Smoothgrad,
        Method::SmoothgradSq,
        Method::Vargrad,
        Method::IntegratedGradients,
        Method::GradientShap,
        Method::GradCam,
        Method::Occlusion,
        Method::Deeplift,
        Method::DeepliftShap,
        Method::GuidedBackprop,
        Method::Deconvolution,
        Method::GuidedGradCam,
        Method::LayerIntegratedGradients,
        Method::LayerConductance,
        Method::NeuronIntegratedGradients,
        Method::FeatureAblation,
        Method::KernelShap,
        Method::Lime,
        Method::Lrp,
    ];

    /// The methods defined by backward rules on ReLU and max-pool ([`crate::rules`]): for
    /// ReLU networks (the ResNets), not for text models.
    pub const RELU_RULES: [Method; 6] = [
        Method::Deeplift,
        Method::DeepliftShap,
        Method::GuidedBackprop,
        Method::Deconvolution,
        Method::GuidedGradCam,
        Method::Lrp,
    ];

    /// The attention views, which only text models (transformers) have.
    pub const TEXT_ONLY: [Method; 3] = [
        Method::Attention,
        Method::AttentionRollout,
        Method::GradAttention,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Method::Attention => "attention",
            Method::AttentionRollout => "attention_rollout",
            Method::GradAttention => "grad_attention",
            Method::Gradient => "gradient",
            Method::Saliency => "saliency",
            Method::GradientXInput => "gradient_x_input",
            Method::Smoothgrad => "smoothgrad",
            Method::SmoothgradSq => "smoothgrad_sq",
            Method::Vargrad => "vargrad",
            Method::IntegratedGradients => "integrated_gradients",
            Method::GradientShap => "gradient_shap",
            Method::GradCam => "grad_cam",
            Method::Occlusion => "occlusion",
            Method::Deeplift => "deeplift",
            Method::DeepliftShap => "deeplift_shap",
            Method::GuidedBackprop => "guided_backprop",
            Method::Deconvolution => "deconvolution",
            Method::GuidedGradCam => "guided_grad_cam",
            Method::LayerIntegratedGradients => "layer_integrated_gradients",
            Method::LayerConductance => "layer_conductance",
            Method::NeuronIntegratedGradients => "neuron_integrated_gradients",
            Method::FeatureAblation => "feature_ablation",
            Method::KernelShap => "kernel_shap",
            Method::Lime => "lime",
            Method::Lrp => "lrp",
        }
    }

    /// The settings a spec may give this method.
    pub fn keys(self) -> &'static [&'static str] {
        match self {
            Method::Gradient | Method::Saliency | Method::GradientXInput => &[],
            Method::Smoothgrad | Method::SmoothgradSq | Method::Vargrad => {
                &["samples", "noise", "seed", "internal_batch"]
            }
            Method::IntegratedGradients => &["steps", "rule", "baseline", "seed", "internal_batch"],
            Method::LayerIntegratedGradients => &[
                "layer",
                "steps",
                "rule",
                "baseline",
                "seed",
                "internal_batch",
            ],
            Method::LayerConductance => &["layer", "steps", "baseline", "seed", "internal_batch"],
            Method::NeuronIntegratedGradients => &[
                "layer",
                "channel",
                "steps",
                "rule",
                "baseline",
                "seed",
                "internal_batch",
            ],
            Method::GradientShap => &["samples", "noise", "baseline", "seed", "internal_batch"],
            Method::GradCam | Method::GuidedGradCam => &["layer"],
            Method::FeatureAblation => &["segments", "baseline", "seed", "internal_batch"],
            Method::KernelShap | Method::Lime => {
                &["segments", "samples", "baseline", "seed", "internal_batch"]
            }
            Method::Deeplift | Method::DeepliftShap => &["baseline", "seed"],
            Method::GuidedBackprop | Method::Deconvolution => &[],
            Method::Lrp => &["epsilon", "gamma", "first_layer"],
            Method::Attention | Method::AttentionRollout | Method::GradAttention => &[],
            Method::Occlusion => &[
                "window",
                "stride",
                "fill",
                "baseline",
                "seed",
                "internal_batch",
            ],
        }
    }

    fn names() -> String {
        let of = |ms: &[Method]| ms.iter().map(|m| m.name()).collect::<Vec<_>>().join(", ");
        let general: Vec<Method> = Method::ALL
            .into_iter()
            .filter(|m| !Method::RELU_RULES.contains(m))
            .collect();
        format!(
            "{} (images and text); {} (ReLU networks: the ResNets); {} (text)",
            of(&general),
            of(&Method::RELU_RULES),
            of(&Method::TEXT_ONLY)
        )
    }
}

impl fmt::Display for Method {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for Method {
    type Err = AttribError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim().to_ascii_lowercase().replace('-', "_");
        Ok(match s.as_str() {
            "gradient" => Method::Gradient,
            "saliency" => Method::Saliency,
            "gradient_x_input" | "input_x_gradient" => Method::GradientXInput,
            "smoothgrad" => Method::Smoothgrad,
            "smoothgrad_sq" => Method::SmoothgradSq,
            "vargrad" => Method::Vargrad,
            "integrated_gradients" | "ig" => Method::IntegratedGradients,
            "gradient_shap" | "gradientshap" => Method::GradientShap,
            "grad_cam" | "gradcam" => Method::GradCam,
            "occlusion" => Method::Occlusion,
            "deeplift" | "deep_lift" => Method::Deeplift,
            "deeplift_shap" | "deep_lift_shap" => Method::DeepliftShap,
            "guided_backprop" | "guided_backpropagation" => Method::GuidedBackprop,
            "deconvolution" => Method::Deconvolution,
            "guided_grad_cam" | "guided_gradcam" => Method::GuidedGradCam,
            "layer_integrated_gradients" | "layer_ig" => Method::LayerIntegratedGradients,
            "layer_conductance" | "conductance" => Method::LayerConductance,
            "neuron_integrated_gradients" | "neuron_ig" => Method::NeuronIntegratedGradients,
            "feature_ablation" | "ablation" => Method::FeatureAblation,
            "kernel_shap" | "kernelshap" => Method::KernelShap,
            "lime" => Method::Lime,
            "lrp" => Method::Lrp,
            "attention" => Method::Attention,
            "attention_rollout" | "rollout" => Method::AttentionRollout,
            "grad_attention" => Method::GradAttention,
            other => {
                return Err(settings(
                    "methods",
                    format!("unknown method `{other}`; methods are: {}", Method::names()),
                ))
            }
        })
    }
}

/// A baseline as written (`zeros`, `black`, `blur[:SIGMA]`, `noise[:K]`, `image:PATH`, several
/// averaged); [`build`] turns it into a [`Baseline`] for a given input size.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum BaselineSpec {
    Zeros,
    Black,
    /// σ in pixels; `None` is a tenth of the input side (blurs shapes away, keeps colour layout).
    Blur(Option<f32>),
    /// K seeded uniform-noise images.
    Noise(u64),
    Image(PathBuf),
    /// Text models: word embeddings of other tokens (the special tokens keep theirs).
    Tokens(TokenBaseline),
    Average(Vec<BaselineSpec>),
}

/// Text baselines, on the word-embedding layer (Captum's BERT tutorial uses `pad`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenBaseline {
    /// `[CLS] [PAD] … [PAD] [SEP]`: every token but the special ones replaced by padding.
    Pad,
    /// Every token, the special ones too, replaced by padding.
    PadAll,
    /// `[CLS] [MASK] … [MASK] [SEP]`.
    Mask,
}

impl TokenBaseline {
    pub fn name(self) -> &'static str {
        match self {
            TokenBaseline::Pad => "pad",
            TokenBaseline::PadAll => "pad-all",
            TokenBaseline::Mask => "mask",
        }
    }
}

impl FromStr for BaselineSpec {
    type Err = AttribError;

    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: String| settings("baseline", reason);
        let mut parts = Vec::new();
        for item in s.split([',', '+']).map(str::trim) {
            let (name, arg) = item.split_once(':').unwrap_or((item, ""));
            parts.push(match name {
                "zeros" => BaselineSpec::Zeros,
                "black" => BaselineSpec::Black,
                "blur" if arg.is_empty() => BaselineSpec::Blur(None),
                "blur" => BaselineSpec::Blur(Some(arg.parse().map_err(|_| {
                    bad(format!("`{item}`: sigma must be a number"))
                })?)),
                "noise" if arg.is_empty() => BaselineSpec::Noise(1),
                "noise" => match arg.parse() {
                    Ok(0) | Err(_) => {
                        return Err(bad(format!("`{item}`: K must be a count of at least 1")))
                    }
                    Ok(k) => BaselineSpec::Noise(k),
                },
                "image" if !arg.is_empty() => BaselineSpec::Image(PathBuf::from(arg)),
                "pad" => BaselineSpec::Tokens(TokenBaseline::Pad),
                "pad-all" => BaselineSpec::Tokens(TokenBaseline::PadAll),
                "mask" => BaselineSpec::Tokens(TokenBaseline::Mask),
                _ => {
                    return Err(bad(format!(
                        "unknown baseline `{item}`; baselines are zeros, black, blur[:SIGMA], noise[:K], image:PATH (images), pad, pad-all, mask (text)"
                    )))
                }
            });
        }
        Ok(if parts.len() == 1 {
            parts.remove(0)
        } else {
            BaselineSpec::Average(parts)
        })
    }
}

impl fmt::Display for BaselineSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BaselineSpec::Zeros => f.write_str("zeros"),
            BaselineSpec::Black => f.write_str("black"),
            BaselineSpec::Blur(None) => f.write_str("blur"),
            BaselineSpec::Blur(Some(s)) => write!(f, "blur:{s}"),
            BaselineSpec::Noise(k) => write!(f, "noise:{k}"),
            BaselineSpec::Image(p) => write!(f, "image:{}", p.display()),
            BaselineSpec::Tokens(t) => f.write_str(t.name()),
            BaselineSpec::Average(v) => {
                let parts: Vec<String> = v.iter().map(|b| b.to_string()).collect();
                f.write_str(&parts.join("+"))
            }
        }
    }
}

impl From<BaselineSpec> for String {
    fn from(b: BaselineSpec) -> String {
        b.to_string()
    }
}

impl TryFrom<String> for BaselineSpec {
    type Error = AttribError;
    fn try_from(s: String) -> Result<Self> {
        s.parse()
    }
}

/// What an occlusion window is filled with, as written: a value in normalised space or
/// `baseline`; for text, `delete` removes the occluded tokens instead.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FillSpec {
    Value(f32),
    Baseline,
    Delete,
}

impl FromStr for FillSpec {
    type Err = AttribError;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim() {
            "baseline" => Ok(FillSpec::Baseline),
            "delete" => Ok(FillSpec::Delete),
            v => v.parse().map(FillSpec::Value).map_err(|_| {
                settings(
                    "occlusion",
                    format!("fill `{v}`: expected a number, `baseline` or (text) `delete`"),
                )
            }),
        }
    }
}

/// Settings a spec may give; `None` falls back to the shared defaults ([`MethodOptions::or`])
/// and then to the named constants above. With the `cli` feature these are also the flags
/// every command that attributes takes (explain, drift, audit): the help is these comments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct MethodOptions {
    /// Integrated gradients: quadrature steps (default 64).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub steps: Option<usize>,
    /// Integrated gradients: quadrature rule (riemann_left, riemann_right, riemann_middle,
    /// riemann_trapezoid, gausslegendre; default gausslegendre).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub rule: Option<Rule>,
    /// Baseline for integrated gradients, DeepLIFT, the layer methods, what feature ablation,
    /// KernelSHAP and LIME switch features off to, and occlusion with fill `baseline`: zeros, black,
    /// blur[:SIGMA], noise[:K] (K seeded draws), image:PATH; several, joined by `+` or commas,
    /// are averaged (default zeros).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub baseline: Option<BaselineSpec>,
    /// Inputs per gradient pass for integrated gradients, SmoothGrad and occlusion (default: from
    /// the input size, to stay within about 2 GB).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub internal_batch: Option<usize>,
    /// SmoothGrad and GradientSHAP: noisy samples (default 20); KernelSHAP and LIME: coalitions
    /// evaluated (default 200).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub samples: Option<usize>,
    /// SmoothGrad: noise σ as a fraction of the input's value range (default 0.15).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub noise: Option<f32>,
    /// Seed for SmoothGrad's noise, noise baselines and (audit) the random pixel orders and
    /// re-initialised weights (default 0).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub seed: Option<u64>,
    /// Grad-CAM and the layer and neuron methods: the layer (default: the model's last spatial
    /// layer).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub layer: Option<String>,
    /// Neuron integrated gradients: the layer's channel (default: each input's most active).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub channel: Option<usize>,
    /// LRP: the stabiliser ε of every rule's denominator (default 1e-9, Captum's).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub epsilon: Option<f64>,
    /// LRP: the γ-rule's weight on positive contributions in the convolutions (default 0.25;
    /// 0 gives the ε-rule).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub gamma: Option<f64>,
    /// LRP: the first convolution's rule, `zb` (zᴮ: pixels bounded by the normalisation's range;
    /// the default) or `zplus` (z⁺).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub first_layer: Option<String>,
    /// Feature ablation, KernelSHAP and LIME: SLIC superpixels per image (default 50; a text's
    /// features are its tokens).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub segments: Option<usize>,
    /// Occlusion: window side in pixels (default: input size / 8).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub window: Option<usize>,
    /// Occlusion: window stride (default: half the window).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub stride: Option<usize>,
    /// Occlusion: what fills the window, a value in normalised space or `baseline` (default 0);
    /// for text, the token baseline's token ([MASK] by default) or `delete` (the tokens removed).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[cfg_attr(feature = "cli", arg(long))]
    pub fill: Option<FillSpec>,
}

impl MethodOptions {
    /// These settings, with `fallback`'s where these have none.
    pub fn or(&self, fallback: &MethodOptions) -> MethodOptions {
        MethodOptions {
            steps: self.steps.or(fallback.steps),
            rule: self.rule.or(fallback.rule),
            baseline: self.baseline.clone().or_else(|| fallback.baseline.clone()),
            internal_batch: self.internal_batch.or(fallback.internal_batch),
            samples: self.samples.or(fallback.samples),
            noise: self.noise.or(fallback.noise),
            seed: self.seed.or(fallback.seed),
            layer: self.layer.clone().or_else(|| fallback.layer.clone()),
            channel: self.channel.or(fallback.channel),
            segments: self.segments.or(fallback.segments),
            epsilon: self.epsilon.or(fallback.epsilon),
            gamma: self.gamma.or(fallback.gamma),
            first_layer: self
                .first_layer
                .clone()
                .or_else(|| fallback.first_layer.clone()),
            window: self.window.or(fallback.window),
            stride: self.stride.or(fallback.stride),
            fill: self.fill.or(fallback.fill),
        }
    }

    fn set(&mut self, method: Method, key: &str, value: &str) -> Result<()> {
        if !method.keys().contains(&key) {
            let keys = method.keys();
            return Err(settings(
                "methods",
                format!(
                    "{method} takes {}; `{key}` is not one of them",
                    if keys.is_empty() {
                        "no settings".to_owned()
                    } else {
                        format!("the settings {}", keys.join(", "))
                    }
                ),
            ));
        }
        let num = |what: &str| settings("methods", format!("{method}: {key}={value}: {what}"));
        match key {
            "steps" => self.steps = Some(value.parse().map_err(|_| num("expected a count"))?),
            "rule" => self.rule = Some(Rule::parse(value)?),
            "baseline" => self.baseline = Some(value.parse()?),
            "internal_batch" => {
                self.internal_batch = Some(value.parse().map_err(|_| num("expected a count"))?)
            }
            "samples" => self.samples = Some(value.parse().map_err(|_| num("expected a count"))?),
            "noise" => self.noise = Some(value.parse().map_err(|_| num("expected a number"))?),
            "seed" => self.seed = Some(value.parse().map_err(|_| num("expected an integer"))?),
            "layer" => self.layer = Some(value.to_owned()),
            "channel" => self.channel = Some(value.parse().map_err(|_| num("expected a count"))?),
            "epsilon" => self.epsilon = Some(value.parse().map_err(|_| num("expected a number"))?),
            "first_layer" => self.first_layer = Some(value.to_owned()),
            "gamma" => self.gamma = Some(value.parse().map_err(|_| num("expected a number"))?),
            "segments" => self.segments = Some(value.parse().map_err(|_| num("expected a count"))?),
            "window" => self.window = Some(value.parse().map_err(|_| num("expected a count"))?),
            "stride" => self.stride = Some(value.parse().map_err(|_| num("expected a count"))?),
            "fill" => self.fill = Some(value.parse()?),
            _ => unreachable!("keys() lists only the keys handled here"),
        }
        Ok(())
    }
}

/// One method and the settings its spec gave.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodSpec {
    pub method: Method,
    #[serde(default)]
    pub options: MethodOptions,
}

impl MethodSpec {
    pub fn new(method: Method) -> Self {
        Self {
            method,
            options: MethodOptions::default(),
        }
    }

    /// A comma-separated list of specs, or `all` (every method with its defaults). Names must
    /// not repeat.
    pub fn parse_list(text: &str) -> Result<Vec<MethodSpec>> {
        if text.trim() == "all" {
            return Ok(Method::ALL.map(MethodSpec::new).to_vec());
        }
        let mut out: Vec<MethodSpec> = Vec::new();
        for item in text.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let continues = match (item.find('='), item.find(':')) {
                (Some(eq), Some(colon)) => eq < colon,
                (Some(_), None) => true,
                _ => false,
            };
            match out.last_mut() {
                Some(last) if continues => {
                    let (k, v) = item.split_once('=').expect("holds `=`");
                    last.options.set(last.method, k.trim(), v.trim())?;
                }
                None if continues => {
                    return Err(settings(
                        "methods",
                        format!("`{item}` comes before any method name"),
                    ))
                }
                _ => {
                    let spec: MethodSpec = item.parse()?;
                    if out.iter().any(|o| o.method == spec.method) {
                        return Err(settings(
                            "methods",
                            format!("`{}` is listed twice", spec.method),
                        ));
                    }
                    out.push(spec);
                }
            }
        }
        if out.is_empty() {
            return Err(settings("methods", "no method given"));
        }
        Ok(out)
    }
}

impl FromStr for MethodSpec {
    type Err = AttribError;

    /// One spec: `name` or `name:key=value[,key=value…]`.
    fn from_str(s: &str) -> Result<Self> {
        let (name, rest) = s.split_once(':').unwrap_or((s, ""));
        let mut spec = MethodSpec::new(name.parse()?);
        for kv in rest.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (k, v) = kv.split_once('=').ok_or_else(|| {
                settings(
                    "methods",
                    format!("{}: `{kv}` is not key=value", spec.method),
                )
            })?;
            spec.options.set(spec.method, k.trim(), v.trim())?;
        }
        Ok(spec)
    }
}

impl fmt::Display for MethodSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.method.name())
    }
}

/// What building a method needs to know about the inputs it will explain.
pub struct BuildContext<'a> {
    pub normalisation: Normalisation,
    /// Channels, height, width of one input.
    pub input: (usize, usize, usize),
    /// Loads `image:PATH` baselines through the model's preprocessing (1×C×H×W).
    pub load_image: &'a dyn Fn(&Path) -> Result<Tensor>,
    /// A text model's input under a token baseline (1×C×H×W, as the input); `None` for images.
    pub tokens: Option<&'a dyn Fn(TokenBaseline) -> Result<Tensor>>,
}

impl BuildContext<'_> {
    /// The baseline a spec describes, at this input size.
    pub fn baseline(&self, spec: &BaselineSpec, seed: u64) -> Result<Baseline> {
        Ok(match spec {
            BaselineSpec::Zeros => Baseline::Zeros,
            BaselineSpec::Black => Baseline::Black,
            BaselineSpec::Blur(sigma) => Baseline::Blur {
                sigma: sigma.unwrap_or(self.input.1.max(self.input.2) as f32 / 10.0),
            },
            BaselineSpec::Noise(1) => Baseline::UniformNoise { seed },
            BaselineSpec::Noise(k) => Baseline::Average(
                (0..*k)
                    .map(|i| Baseline::UniformNoise { seed: seed + i })
                    .collect(),
            ),
            BaselineSpec::Image(p) => Baseline::Image((self.load_image)(p)?),
            BaselineSpec::Tokens(t) => match self.tokens {
                Some(tokens) => Baseline::Image(tokens(*t)?),
                None => {
                    return Err(settings(
                        "baseline",
                        format!("`{}` is a text model's baseline", t.name()),
                    ))
                }
            },
            BaselineSpec::Average(v) => Baseline::Average(
                v.iter()
                    .map(|b| self.baseline(b, seed))
                    .collect::<Result<Vec<_>>>()?,
            ),
        })
    }
}

/// The method a spec describes, its unset settings taken from the named defaults.
pub fn build(spec: &MethodSpec, ctx: &BuildContext) -> Result<Box<dyn Attributor>> {
    let o = &spec.options;
    let seed = o.seed.unwrap_or(0);
    let smoothgrad = |aggregate| -> Box<dyn Attributor> {
        Box::new(SmoothGrad {
            internal_batch: o.internal_batch,
            ..SmoothGrad::new(
                o.samples.unwrap_or(DEFAULT_SMOOTHGRAD_SAMPLES),
                o.noise.unwrap_or(DEFAULT_SMOOTHGRAD_NOISE),
                aggregate,
                seed,
            )
        })
    };
    let baseline = || ctx.baseline(o.baseline.as_ref().unwrap_or(&BaselineSpec::Zeros), seed);
    let ig = || -> Result<IntegratedGradients> {
        Ok(IntegratedGradients {
            steps: o.steps.unwrap_or(DEFAULT_IG_STEPS),
            rule: o.rule.unwrap_or(DEFAULT_IG_RULE),
            baseline: baseline()?,
            internal_batch: o.internal_batch,
            normalisation: ctx.normalisation,
        })
    };
    let (c, h, w) = ctx.input;
    let method: Box<dyn Attributor> = match spec.method {
        Method::Attention | Method::AttentionRollout | Method::GradAttention => {
            return Err(settings(
                spec.method.name(),
                "an attention view: it explains text models (transformers) only",
            ))
        }
        Method::Gradient => Box::new(Saliency {
            kind: GradientKind::Signed,
        }),
        Method::Saliency => Box::new(Saliency {
            kind: GradientKind::Absolute,
        }),
        Method::GradientXInput => Box::new(Saliency {
            kind: GradientKind::TimesInput,
        }),
        Method::Smoothgrad => smoothgrad(Aggregate::Mean),
        Method::SmoothgradSq => smoothgrad(Aggregate::MeanOfSquares),
        Method::Vargrad => smoothgrad(Aggregate::Variance),
        Method::IntegratedGradients => Box::new(ig()?),
        Method::LayerIntegratedGradients => Box::new(LayerIntegratedGradients {
            layer: o.layer.clone(),
            ig: ig()?,
        }),
        Method::LayerConductance => Box::new(LayerConductance {
            layer: o.layer.clone(),
            steps: o.steps.unwrap_or(DEFAULT_CONDUCTANCE_STEPS),
            baseline: baseline()?,
            internal_batch: o.internal_batch,
            normalisation: ctx.normalisation,
        }),
        Method::NeuronIntegratedGradients => Box::new(NeuronIntegratedGradients {
            layer: o.layer.clone(),
            channel: o.channel,
            ig: ig()?,
        }),
        Method::GradCam => Box::new(GradCam {
            layer: o.layer.clone(),
        }),
        Method::FeatureAblation | Method::KernelShap | Method::Lime => {
            let off = match (&o.baseline, ctx.tokens.is_some()) {
                (Some(b), _) => b.clone(),
                (None, true) => BaselineSpec::Tokens(TokenBaseline::Pad),
                (None, false) => BaselineSpec::Zeros,
            };
            Box::new(FeaturePerturbation {
                kind: match spec.method {
                    Method::FeatureAblation => Kind::Ablation,
                    Method::KernelShap => Kind::KernelShap,
                    _ => Kind::Lime,
                },
                segments: o.segments.unwrap_or(DEFAULT_SEGMENTS),
                samples: o.samples.unwrap_or(DEFAULT_SURROGATE_SAMPLES),
                baseline: ctx.baseline(&off, seed)?,
                seed,
                internal_batch: o.internal_batch,
                normalisation: ctx.normalisation,
            })
        }
        Method::GradientShap => {
            let distribution = match (&o.baseline, ctx.tokens.is_some()) {
                (Some(b), _) => b.clone(),
                (None, true) => BaselineSpec::Tokens(TokenBaseline::Pad),
                (None, false) => BaselineSpec::Noise(DEFAULT_SHAP_BASELINES),
            };
            Box::new(GradientShap {
                samples: o.samples.unwrap_or(DEFAULT_GRADIENT_SHAP_SAMPLES),
                noise: o.noise.unwrap_or(0.0),
                baseline: ctx.baseline(&distribution, seed)?,
                normalisation: ctx.normalisation,
                seed,
                internal_batch: o.internal_batch,
            })
        }
        m if Method::RELU_RULES.contains(&m) && ctx.tokens.is_some() => {
            return Err(settings(
                m.name(),
                "its backward rules are ReLU's and max-pool's: it explains ReLU networks (the ResNets), not a transformer's GELU, softmax and LayerNorm",
            ))
        }
        Method::Deeplift => Box::new(DeepLift {
            baseline: baseline()?,
            normalisation: ctx.normalisation,
            name: "deeplift",
        }),
        Method::DeepliftShap => Box::new(DeepLift {
            baseline: ctx.baseline(
                o.baseline
                    .as_ref()
                    .unwrap_or(&BaselineSpec::Noise(DEFAULT_SHAP_BASELINES)),
                seed,
            )?,
            normalisation: ctx.normalisation,
            name: "deeplift_shap",
        }),
        Method::Lrp => {
            let n = ctx.normalisation;
            let bounds = match o.first_layer.as_deref().unwrap_or("zb") {
                "zb" => Some((
                    [0, 1, 2].map(|c| (-n.mean[c] / n.std[c]) as f64),
                    [0, 1, 2].map(|c| ((1.0 - n.mean[c]) / n.std[c]) as f64),
                )),
                "zplus" => None,
                other => {
                    return Err(settings(
                        "lrp",
                        format!("first_layer `{other}`: expected zb or zplus"),
                    ))
                }
            };
            Box::new(Lrp {
                rules: LrpRules {
                    epsilon: o.epsilon.unwrap_or(DEFAULT_LRP_EPSILON),
                    gamma: o.gamma.unwrap_or(DEFAULT_LRP_GAMMA),
                    bounds,
                },
            })
        }
        Method::GuidedBackprop => Box::new(GuidedGradient {
            rule: BackwardRule::GuidedBackprop,
        }),
        Method::Deconvolution => Box::new(GuidedGradient {
            rule: BackwardRule::Deconvolution,
        }),
        Method::GuidedGradCam => Box::new(GuidedGradCam {
            grad_cam: GradCam {
                layer: o.layer.clone(),
            },
        }),
        Method::Occlusion => {
            let window = o
                .window
                .unwrap_or((h.min(w) / DEFAULT_OCCLUSION_WINDOW_DIVISOR).max(1));
            let fill = match o.fill.unwrap_or(FillSpec::Value(0.0)) {
                FillSpec::Value(v) => Fill::Value(v),
                FillSpec::Baseline => Fill::Baseline(baseline()?),
                FillSpec::Delete => {
                    return Err(settings(
                        "occlusion",
                        "fill `delete` removes tokens from a text; an image's window takes a number or `baseline`",
                    ))
                }
            };
            Box::new(Occlusion {
                window,
                // Half-window steps: every pixel is covered by up to four windows.
                stride: o.stride.unwrap_or((window / 2).max(1)),
                fill,
                internal_batch: o
                    .internal_batch
                    .unwrap_or_else(|| crate::default_internal_batch(c, h, w)),
                normalisation: ctx.normalisation,
            })
        }
    };
    Ok(method)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_with_settings_and_continuations() {
        let v = MethodSpec::parse_list(
            "saliency,integrated_gradients:steps=32,rule=trapezoid,baseline=zeros+blur:8,grad_cam:layer=layer3",
        )
        .unwrap();
        assert_eq!(
            v.iter().map(|s| s.method).collect::<Vec<_>>(),
            [
                Method::Saliency,
                Method::IntegratedGradients,
                Method::GradCam
            ]
        );
        let ig = &v[1].options;
        assert_eq!(ig.steps, Some(32));
        assert_eq!(ig.rule, Some(Rule::RiemannTrapezoid));
        assert_eq!(
            ig.baseline,
            Some(BaselineSpec::Average(vec![
                BaselineSpec::Zeros,
                BaselineSpec::Blur(Some(8.0))
            ]))
        );
        assert_eq!(v[2].options.layer.as_deref(), Some("layer3"));
        assert_eq!(
            MethodSpec::parse_list("all").unwrap().len(),
            Method::ALL.len()
        );
        assert_eq!(
            MethodSpec::parse_list("ig").unwrap()[0].method,
            Method::IntegratedGradients
        );
    }

    #[test]
    fn bad_specs_are_named() {
        let err = |s: &str| MethodSpec::parse_list(s).unwrap_err().to_string();
        assert!(
            err("saliency,anchors").contains("unknown method `anchors`"),
            "{}",
            err("anchors")
        );
        assert!(err("saliency:steps=3").contains("saliency takes no settings"));
        assert!(err("integrated_gradients:samples=3").contains("`samples` is not one of them"));
        assert!(err("ig:steps=many").contains("steps=many: expected a count"));
        assert!(err("ig,ig").contains("listed twice"));
        assert!(err("steps=3").contains("before any method"));
        assert!(err("").contains("no method given"));
        assert!(err("ig:baseline=plaid").contains("unknown baseline `plaid`"));
        assert!(err("ig:baseline=noise:0").contains("at least 1"));
        assert!(
            err("occlusion:fill=grey").contains("expected a number, `baseline` or (text) `delete`")
        );
    }

    #[test]
    fn baselines_round_trip_through_text() {
        for s in [
            "zeros",
            "black",
            "blur",
            "blur:2.5",
            "noise:3",
            "image:a/b.png",
            "zeros+blur:8",
        ] {
            let b: BaselineSpec = s.parse().unwrap();
            assert_eq!(b.to_string(), s);
            assert_eq!(b.to_string().parse::<BaselineSpec>().unwrap(), b);
        }
        // The CLI's comma-separated form averages too.
        assert_eq!(
            "zeros,black".parse::<BaselineSpec>().unwrap(),
            "zeros+black".parse::<BaselineSpec>().unwrap()
        );
    }

    #[test]
    fn fallbacks_fill_only_unset_settings() {
        let spec: MethodSpec = "integrated_gradients:steps=8".parse().unwrap();
        let shared = MethodOptions {
            steps: Some(99),
            rule: Some(Rule::RiemannLeft),
            ..Default::default()
        };
        let o = spec.options.or(&shared);
        assert_eq!((o.steps, o.rule), (Some(8), Some(Rule::RiemannLeft)));
    }

    #[test]
    fn build_applies_the_named_defaults() {
        let load = |_: &Path| -> Result<Tensor> { unreachable!("no image baseline here") };
        let ctx = BuildContext {
            normalisation: Normalisation {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            input: (3, 64, 64),
            load_image: &load,
            tokens: None,
        };
        for m in Method::ALL {
            let built = build(&MethodSpec::new(m), &ctx).unwrap();
            assert_eq!(built.name(), m.name());
        }
        let ctx_baseline = ctx
            .baseline(&"blur+noise:2".parse().unwrap(), 5)
            .unwrap()
            .name();
        assert_eq!(
            ctx_baseline,
            "average of [blur:6.4, average of [noise(seed 5), noise(seed 6)]]"
        );
    }
}
