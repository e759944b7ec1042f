//! Explanation speed, for `finelens bench explain`: milliseconds per image at batch 1 for the
//! forward pass, forward + backward to the input, and each method at its usual settings.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use finelens_models::checkpoint::{IMAGENET_MEAN, IMAGENET_STD};
use finelens_models::{Arch, Classifier, Head, Mode, ModelConfig, ParamStore, ResNet};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use crate::error::Result;
use crate::registry::build;
use crate::{
    input_gradients, Aggregate, Attributor, BuildContext, GradCam, GradientKind,
    IntegratedGradients, MethodSpec, Normalisation, Saliency, SmoothGrad,
};

/// What one benchmark measured; times are the median over repeats, in ms per image.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExplainTimings {
    pub arch: String,
    pub size: usize,
    pub classes: usize,
    pub repeats: usize,
    pub forward_ms: f64,
    pub forward_backward_ms: f64,
    pub saliency_ms: f64,
    pub smoothgrad_20_ms: f64,
    /// IG-50 with the fastest internal batch.
    pub integrated_gradients_50_ms: f64,
    pub integrated_gradients_50_batch: usize,
    /// IG-50 time for every internal batch tried.
    pub integrated_gradients_50_by_batch: Vec<(usize, f64)>,
    pub grad_cam_ms: f64,
    /// The other methods ([`OTHER_METHODS`]), built through the registry with its defaults:
    /// (label, ms).
    pub other_ms: Vec<(String, f64)>,
    /// Peak resident memory while this model was benchmarked (Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// The methods timed beyond the peer's five, as specs (registry defaults otherwise): 50 steps
/// where a method integrates, like IG-50.
/// (label, spec).
pub const OTHER_METHODS: [(&str, &str); 11] = [
    ("DeepLIFT", "deeplift"),
    ("guided backprop", "guided_backprop"),
    ("guided Grad-CAM", "guided_grad_cam"),
    ("GradientSHAP-20", "gradient_shap"),
    ("LRP (zᴮ, γ, ε)", "lrp"),
    (
        "layer IG-50 (layer4)",
        "layer_integrated_gradients:steps=50",
    ),
    ("layer conductance-50", "layer_conductance:steps=50"),
    ("neuron IG-50", "neuron_integrated_gradients:steps=50"),
    ("feature ablation (50 SLIC)", "feature_ablation"),
    ("KernelSHAP-200", "kernel_shap"),
    ("LIME-200", "lime"),
];

/// The median of `repeats` timings of `f` in ms, after one warm-up call.
pub fn median_ms(repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    f()?; // warm-up: first-touch allocations, thread pool start
    let mut t = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        t.push(start.elapsed().as_secs_f64() * 1e3);
    }
    t.sort_by(f64::total_cmp);
    Ok(t[t.len() / 2])
}

/// Time the methods on a randomly initialised `arch` with `classes` outputs (weights frozen, as
/// when explaining) on one seeded random image of `size`×`size`.
pub fn explain_timings(
    arch: Arch,
    size: usize,
    classes: usize,
    repeats: usize,
    ig_batches: &[usize],
) -> Result<ExplainTimings> {
    finelens_models::memory::reset_peak_rss();
    let dev = Device::Cpu;
    let config = ModelConfig::new(arch, classes, Head::Linear)?;
    let store = ParamStore::init(&config.param_specs(), 0, &dev)?.frozen_as(DType::F32)?;
    let model = ResNet::new(config, &store)?;
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let v: Vec<f32> = (0..3 * size * size)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    let x = Tensor::from_vec(v, (1, 3, size, size), &dev)?;
    let targets = [0usize];
    let norm = Normalisation {
        mean: IMAGENET_MEAN,
        std: IMAGENET_STD,
    };
    let repeats = repeats.max(1);
    let run = |m: &dyn Attributor| -> Result<()> { m.attribute(&model, &x, &targets).map(|_| ()) };

    let forward_ms = median_ms(repeats, || {
        model.forward(&x, Mode::Eval)?;
        Ok(())
    })?;
    let forward_backward_ms = median_ms(repeats, || {
        input_gradients(&model, &x, &targets).map(|_| ())
    })?;
    let saliency_ms = median_ms(repeats, || {
        run(&Saliency {
            kind: GradientKind::Absolute,
        })
    })?;
    let smoothgrad_20_ms = median_ms(repeats, || {
        run(&SmoothGrad::new(20, 0.15, Aggregate::Mean, 0))
    })?;
    let mut by_batch = Vec::new();
    for &b in ig_batches {
        let ig = IntegratedGradients {
            internal_batch: Some(b),
            ..IntegratedGradients::new(norm)
        };
        by_batch.push((b, median_ms(repeats, || run(&ig))?));
    }
    let &(best_batch, best_ms) = by_batch
        .iter()
        .min_by(|a, b| a.1.total_cmp(&b.1))
        .unwrap_or(&(0, f64::NAN));
    let grad_cam_ms = median_ms(repeats, || run(&GradCam::default()))?;
    let ctx = BuildContext {
        normalisation: norm,
        input: (3, size, size),
        load_image: &|p| {
            Err(crate::error::settings(
                "bench",
                format!("no image baselines here ({})", p.display()),
            ))
        },
        tokens: None,
    };
    let mut other_ms = Vec::new();
    for (label, spec) in OTHER_METHODS {
        let method = build(&spec.parse::<MethodSpec>()?, &ctx)?;
        other_ms.push((
            label.to_owned(),
            median_ms(repeats, || run(method.as_ref()))?,
        ));
    }
    Ok(ExplainTimings {
        arch: arch.name().into(),
        size,
        classes,
        repeats,
        forward_ms,
        forward_backward_ms,
        saliency_ms,
        smoothgrad_20_ms,
        integrated_gradients_50_ms: best_ms,
        integrated_gradients_50_batch: best_batch,
        integrated_gradients_50_by_batch: by_batch,
        grad_cam_ms,
        other_ms,
        peak_rss_bytes: finelens_models::memory::peak_rss_bytes(),
    })
}

/// The figures as a table (ms per image), as `finelens bench explain` prints them.
impl std::fmt::Display for ExplainTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {} {}×{}", self.arch, self.size, self.size)?;
        writeln!(
            f,
            "    forward                      {:>9.1}",
            self.forward_ms
        )?;
        writeln!(
            f,
            "    forward + backward to input  {:>9.1}",
            self.forward_backward_ms
        )?;
        writeln!(
            f,
            "    saliency                     {:>9.1}",
            self.saliency_ms
        )?;
        writeln!(
            f,
            "    SmoothGrad-20                {:>9.1}",
            self.smoothgrad_20_ms
        )?;
        writeln!(
            f,
            "    IG-50 (internal batch {:>2})    {:>9.1}   [{}]",
            self.integrated_gradients_50_batch,
            self.integrated_gradients_50_ms,
            self.integrated_gradients_50_by_batch
                .iter()
                .map(|(b, ms)| format!("batch {b}: {ms:.0}"))
                .collect::<Vec<_>>()
                .join(", ")
        )?;
        writeln!(
            f,
            "    Grad-CAM                     {:>9.1}",
            self.grad_cam_ms
        )?;
        for (label, ms) in &self.other_ms {
            writeln!(f, "    {label:<28} {ms:>9.1}")?;
        }
        write!(
            f,
            "    peak resident memory         {:>9}",
            finelens_models::memory::mib(self.peak_rss_bytes)
        )
    }
}
