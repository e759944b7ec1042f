//! `finelens drift`: where a fine-tuned checkpoint moved from its parent — weights per tensor,
//! layer, block and stage; representations (minibatch CKA on a probe set); explanations.
//! Wiring only: the numbers are `finelens-drift`'s, the figures `finelens-report`'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use finelens_attrib::{
    Aggregate, Attributor, EmbeddingNorm, Fill, GradCam, GradientKind, IntegratedGradients,
    Normalisation, Occlusion, Saliency, SmoothGrad, Target,
};
use finelens_data::synth::{render, Split, SynthConfig, Task};
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, Preprocess};
use finelens_drift::{representation_drift, spearman, top_k_iou, weight_drift, WeightDriftOptions};
use finelens_models::checkpoint;
use finelens_models::{Classifier, ResNet};
use serde_json::json;

use crate::{ensure_dir, on_bad, preprocess_of, write_json, CheckpointArgs};

#[derive(Args)]
pub struct DriftArgs {
    /// The parent (pretrained) checkpoint.
    before: PathBuf,
    /// The fine-tuned checkpoint.
    after: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Probe images for representation and explanation drift: an image folder or ImageFolder,
    /// or `synth` (the synthetic pretraining task's test images, drawn in memory); `none` skips both.
    #[arg(long, default_value = "synth")]
    probe: String,
    /// At most this many probe images (taken across classes in turn).
    #[arg(long, default_value_t = 300)]
    limit: usize,
    /// Probe images per forward pass (minibatch CKA needs at least 4).
    #[arg(long, default_value_t = 50)]
    batch_size: usize,
    /// Layers compared by CKA, comma-separated.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "layer1,layer2,layer3,layer4,avgpool"
    )]
    layers: Vec<String>,
    /// CKA on channel-pooled activations (each channel averaged over space).
    #[arg(long)]
    pooled: bool,
    /// Attribution method for explanation drift: saliency, gradient, gradient_x_input,
    /// smoothgrad, integrated_gradients, grad_cam, occlusion.
    #[arg(long, default_value = "integrated_gradients")]
    explain_method: String,
    /// Probe images whose explanations are compared (0 skips explanation drift).
    #[arg(long, default_value_t = 16)]
    explain_images: usize,
    /// Share of the most strongly attributed pixels whose overlap (IoU) is reported.
    #[arg(long, default_value_t = 0.1)]
    top_fraction: f64,
    /// Skip spectral norms and stable ranks (power iteration: many passes over each matrix).
    #[arg(long)]
    no_spectral: bool,
    /// Fail on a probe image that cannot be decoded instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Output directory: drift.json, layers.png (per-layer change), cka.png.
    #[arg(long, default_value = "reports/drift")]
    out: PathBuf,
}

/// `finelens drift`'s arguments parsed from a list (the demo runs drift as a user would).
#[derive(clap::Parser)]
struct Standalone {
    #[command(flatten)]
    args: DriftArgs,
}

impl DriftArgs {
    pub fn from_args(args: &[&std::ffi::OsStr]) -> Result<Self> {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsStr::new("drift")).chain(args.iter().copied());
        Ok(Standalone::try_parse_from(argv)?.args)
    }
}

/// How many layers the summary names.
const SUMMARY_TOP: usize = 5;

/// A method by name with its usual settings, for `drift` and `audit` (`explain` exposes every
/// setting as a flag instead); `flag` names the option in errors.
pub(crate) fn attributor(
    flag: &str,
    name: &str,
    norm: Normalisation,
    size: usize,
    ig_steps: usize,
) -> Result<Box<dyn Attributor>> {
    Ok(match name.trim() {
        "saliency" => Box::new(Saliency {
            kind: GradientKind::Absolute,
        }),
        "gradient" => Box::new(Saliency {
            kind: GradientKind::Signed,
        }),
        "gradient_x_input" => Box::new(Saliency {
            kind: GradientKind::TimesInput,
        }),
        "integrated_gradients" | "ig" => Box::new(IntegratedGradients {
            steps: ig_steps,
            ..IntegratedGradients::new(norm)
        }),
        "grad_cam" => Box::new(GradCam::default()),
        "smoothgrad" => Box::new(SmoothGrad::new(20, 0.15, Aggregate::Mean, 0)),
        "occlusion" => Box::new(Occlusion {
            window: (size / 8).max(1),
            stride: (size / 16).max(1),
            fill: Fill::Value(0.0),
            internal_batch: finelens_attrib::default_internal_batch(3, size, size),
            normalisation: norm,
        }),
        other => bail!(
            "{flag}: unknown method `{other}`; use saliency, gradient, gradient_x_input, smoothgrad, integrated_gradients, grad_cam or occlusion"
        ),
    })
}

/// The probe set as normalised images (C×H×W each), decoded one by one.
fn probe_images(a: &DriftArgs, pre: &Preprocess) -> Result<Vec<Vec<f32>>> {
    if a.probe == "synth" {
        let cfg = SynthConfig {
            size: pre.size,
            ..SynthConfig::default()
        };
        let classes = Task::Pretrain.shapes().len();
        return Ok((0..a.limit)
            .map(|i| {
                let img = render(Task::Pretrain, Split::Test, i % classes, i / classes, &cfg).image;
                pre.normalise(&pre.eval_image(&img))
            })
            .collect());
    }
    let inputs = Inputs::discover(Path::new(&a.probe), on_bad(a.strict), Some(a.limit))?;
    for (p, why) in &inputs.skipped {
        eprintln!("warning: skipping {}: {why}", p.display());
    }
    let mut out = Vec::new();
    for (path, _) in &inputs.images {
        match load_rgb(path) {
            Ok(img) => out.push(pre.normalise(&pre.eval_image(&img))),
            Err(e) if !a.strict => eprintln!("warning: skipping {e}"),
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

fn batch(images: &[Vec<f32>], size: usize) -> Result<Tensor> {
    Ok(Tensor::from_vec(
        images.concat(),
        (images.len(), 3, size, size),
        &Device::Cpu,
    )?)
}

/// |map| summed over channels, flattened: what "where does it look" compares.
pub(crate) fn magnitude(map: &ndarray::Array3<f32>) -> Vec<f32> {
    map.map(|v| v.abs())
        .sum_axis(ndarray::Axis(0))
        .iter()
        .copied()
        .collect()
}

pub fn drift_cmd(a: DriftArgs) -> Result<()> {
    if a.batch_size < 4 {
        bail!("--batch-size must be at least 4 (the unbiased CKA estimator's minimum)");
    }
    if !(a.top_fraction > 0.0 && a.top_fraction <= 1.0) {
        bail!("--top-fraction must be in (0, 1], got {}", a.top_fraction);
    }
    if !["synth", "none"].contains(&a.probe.as_str()) {
        // Refuse an unusable probe set before any output is written.
        Inputs::discover(Path::new(&a.probe), on_bad(a.strict), Some(a.limit))?;
    }
    let started = Instant::now();
    let weights = weight_drift(
        &a.before,
        &a.after,
        WeightDriftOptions {
            spectral: !a.no_spectral,
            ..Default::default()
        },
    )?;
    let sha_before = checkpoint::sha256_file(&a.before)?;
    let sha_after = checkpoint::sha256_file(&a.after)?;
    ensure_dir(&a.out)?;

    println!(
        "weight drift: {} tensors compared ({:.1} MB read), {} batch-norm statistics; added {}, removed {}, reshaped {}",
        weights.tensors.len(),
        weights.bytes_read as f64 / 1e6,
        weights.batch_norm_statistics.len(),
        list(&weights.added),
        list(&weights.removed),
        list(&weights.reshaped.iter().map(|r| r.0.clone()).collect::<Vec<_>>())
    );
    let mut moved: Vec<&finelens_drift::GroupDrift> = weights.layers.iter().collect();
    moved.sort_by(|x, y| y.relative_l2_change.total_cmp(&x.relative_l2_change));
    println!("layers that moved most (‖ΔW‖/‖W₀‖, cosine):");
    for g in moved.iter().take(SUMMARY_TOP) {
        println!(
            "  {:<28} {:>9.4}  {:>7.4}",
            g.name, g.relative_l2_change, g.cosine_similarity
        );
    }
    print!("per stage:");
    for g in &weights.stages {
        print!("  {} {:.4}", g.name, g.relative_l2_change);
    }
    println!();
    let labels: Vec<String> = weights.layers.iter().map(|g| g.name.clone()).collect();
    let values: Vec<f64> = weights
        .layers
        .iter()
        .map(|g| g.relative_l2_change)
        .collect();
    if !labels.is_empty() {
        checkpoint::write_atomic(
            &a.out.join("layers.png"),
            &finelens_report::drift_plot::layer_bars(
                "relative L2 change per layer, ‖W₁ − W₀‖ / ‖W₀‖",
                &labels,
                &values,
            )?,
        )?;
    }

    let mut report = json!({
        "before": {"path": a.before, "sha256": sha_before},
        "after": {"path": a.after, "sha256": sha_after},
        "weights": weights,
        "representation": null,
        "explanation": null,
    });

    if a.probe != "none" {
        let ck0 = a.ckpt.load(&a.before)?;
        let ck1 = a.ckpt.load(&a.after)?;
        let pre = preprocess_of(&ck1.meta);
        if preprocess_of(&ck0.meta) != pre {
            eprintln!("warning: the checkpoints record different preprocessing; the fine-tuned model's is used for both");
        }
        let s0 = ck0.store.frozen_as(DType::F32)?;
        let s1 = ck1.store.frozen_as(DType::F32)?;
        let m0 = ResNet::new(ck0.config()?, &s0)?;
        let m1 = ResNet::new(ck1.config()?, &s1)?;
        let images = probe_images(&a, &pre)?;
        if images.len() < 4 {
            bail!(
                "{}: the probe set has {} readable image(s); CKA needs at least 4",
                a.probe,
                images.len()
            );
        }
        let t = Instant::now();
        let batches = images.chunks(a.batch_size).map(|c| {
            batch(c, pre.size).map_err(|e| finelens_drift::DriftError::Settings(e.to_string()))
        });
        let rep = representation_drift(&m0, &m1, batches, &a.layers, a.pooled)?;
        println!(
            "representation drift: linear CKA (minibatch, unbiased HSIC) on {} probe images in {:.1} s",
            rep.examples,
            t.elapsed().as_secs_f64()
        );
        let mut by_cka: Vec<(usize, f64)> = rep.diagonal.iter().copied().enumerate().collect();
        by_cka.sort_by(|x, y| x.1.total_cmp(&y.1));
        println!("layers whose representations changed most (CKA with the parent's same layer):");
        for (i, c) in by_cka.iter().take(SUMMARY_TOP) {
            println!("  {:<28} {:>7.4}", rep.layers[*i], c);
        }
        checkpoint::write_atomic(
            &a.out.join("cka.png"),
            &finelens_report::drift_plot::matrix_heatmap(
                "linear CKA: parent layers (rows) × fine-tuned layers (columns)",
                &rep.layers,
                &rep.layers,
                &rep.matrix,
            )?,
        )?;
        report["representation"] = serde_json::to_value(&rep)?;

        if a.explain_images > 0 {
            let norm = Normalisation {
                mean: pre.mean,
                std: pre.std,
            };
            let method = attributor("--explain-method", &a.explain_method, norm, pre.size, 32)?;
            let shared = ck0.meta.class_names == ck1.meta.class_names;
            // With different heads the class logits mean different things: explain the norm of
            // the penultimate embedding, which both models have.
            let (e0, e1) = (
                EmbeddingNorm {
                    model: &m0,
                    layer: "avgpool".into(),
                },
                EmbeddingNorm {
                    model: &m1,
                    layer: "avgpool".into(),
                },
            );
            let (c0, c1): (&dyn Classifier, &dyn Classifier) =
                if shared { (&m0, &m1) } else { (&e0, &e1) };
            method.check(c0)?;
            method.check(c1)?;
            let mut rho = Vec::new();
            let mut iou = Vec::new();
            for img in images.iter().take(a.explain_images) {
                let x = batch(std::slice::from_ref(img), pre.size)?;
                let target = if shared {
                    finelens_attrib::predict(&m1, &x, &Target::Predicted)?[0].target
                } else {
                    0
                };
                let a0 = method.attribute(c0, &x, &[target])?.remove(0);
                let a1 = method.attribute(c1, &x, &[target])?.remove(0);
                let (v0, v1) = (magnitude(&a0.map), magnitude(&a1.map));
                rho.push(spearman(&v0, &v1));
                iou.push(top_k_iou(&v0, &v1, a.top_fraction));
            }
            let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
            println!(
                "explanation drift ({}, target: {}): Spearman ρ of |attribution| {:.3}, top-{:.0}% IoU {:.3} (mean of {} images)",
                method.name(),
                if shared { "the predicted class's logit" } else { "the embedding norm" },
                mean(&rho),
                a.top_fraction * 100.0,
                mean(&iou),
                rho.len()
            );
            report["explanation"] = json!({
                "method": method.name(),
                "target": if shared { "class_logit" } else { "embedding_norm" },
                "top_fraction": a.top_fraction,
                "spearman": rho,
                "top_iou": iou,
                "mean_spearman": mean(&rho),
                "mean_top_iou": mean(&iou),
            });
        }
    }
    let path = a.out.join("drift.json");
    write_json(&path, &report).with_context(|| "writing the drift report")?;
    println!(
        "drift written to {} ({:.1} s)",
        path.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn list(v: &[String]) -> String {
    if v.is_empty() {
        "none".into()
    } else {
        v.join(", ")
    }
}
