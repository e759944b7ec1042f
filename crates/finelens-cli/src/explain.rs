//! `finelens explain`: attributions for a set of images, written as .npy, heat maps, overlays and
//! one explain.json. Wiring only: the methods are `finelens-attrib`'s, the pictures
//! `finelens-report`'s.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use finelens_attrib::{
    Aggregate, AttribError, Attributor, Baseline, Fill, GradCam, GradientKind, IntegratedGradients,
    Normalisation, Occlusion, Rule, Saliency, Sign, SmoothGrad, Target,
};
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, Preprocess};
use finelens_models::checkpoint;
use finelens_models::ResNet;
use finelens_report::heatmap::{self, ChannelReduce, Scale};
use serde_json::{json, Value};

use crate::{ensure_dir, on_bad, preprocess_of, write_json, CheckpointArgs};

/// Every method `--methods` accepts, in the order outputs list them.
const METHODS: [&str; 9] = [
    "gradient",
    "saliency",
    "gradient_x_input",
    "smoothgrad",
    "smoothgrad_sq",
    "vargrad",
    "integrated_gradients",
    "grad_cam",
    "occlusion",
];

#[derive(Args)]
pub struct ExplainArgs {
    /// The checkpoint (.safetensors).
    checkpoint: PathBuf,
    /// An image, a folder of images, or an ImageFolder (<dir>/<class>/<image>).
    input: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Comma-separated methods, or `all`: gradient, saliency (|gradient|), gradient_x_input,
    /// smoothgrad, smoothgrad_sq, vargrad, integrated_gradients (ig), grad_cam, occlusion.
    #[arg(long, default_value = "saliency,integrated_gradients,grad_cam")]
    methods: String,
    /// Output directory: <id>/<method>.npy|.png|_overlay.png per image, and explain.json.
    #[arg(long, default_value = "reports/explain")]
    out: PathBuf,
    /// The class explained: predicted, a class index, or a class name.
    #[arg(long, default_value = "predicted")]
    target: String,
    /// Explain at most this many images (taken across classes in turn for an ImageFolder).
    #[arg(long)]
    limit: Option<usize>,
    /// Fail on an image that cannot be decoded instead of skipping it with a warning.
    #[arg(long)]
    strict: bool,
    /// Integrated gradients: quadrature steps.
    #[arg(long, default_value_t = 50)]
    steps: usize,
    /// Integrated gradients: quadrature rule (riemann_left, riemann_right, riemann_middle,
    /// riemann_trapezoid, gausslegendre).
    #[arg(long, default_value = "gausslegendre")]
    rule: String,
    /// Baseline for integrated gradients (and occlusion with --fill baseline): zeros, black,
    /// blur[:SIGMA], noise[:K] (K seeded draws), image:PATH; several, comma-separated, are averaged.
    #[arg(long, default_value = "zeros")]
    baseline: String,
    /// Inputs per gradient pass for integrated gradients, SmoothGrad and occlusion (default: from
    /// the input size, to stay within about 2 GB).
    #[arg(long)]
    internal_batch: Option<usize>,
    /// SmoothGrad: noisy samples.
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// SmoothGrad: noise σ as a fraction of the input's value range.
    #[arg(long, default_value_t = 0.15)]
    noise: f32,
    /// Seed for SmoothGrad's noise and noise baselines.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Grad-CAM: the layer (default: the last convolutional block, layer4 for ResNets).
    #[arg(long)]
    layer: Option<String>,
    /// Occlusion: window side in pixels (default: input size / 8).
    #[arg(long)]
    window: Option<usize>,
    /// Occlusion: window stride (default: half the window).
    #[arg(long)]
    stride: Option<usize>,
    /// Occlusion: what fills the window, a value in normalised space or `baseline`.
    #[arg(long, default_value = "0")]
    fill: String,
    /// Heat maps: clip the largest values holding this percentage of the attribution mass
    /// (Captum's outlier_perc).
    #[arg(long, default_value_t = heatmap::DEFAULT_OUTLIER_PERC)]
    outlier_perc: f32,
    /// Input side for a checkpoint without metadata (default: the architecture's).
    #[arg(long)]
    input_size: Option<usize>,
    /// Normalisation mean, three comma-separated values (default: the checkpoint's, or ImageNet's).
    #[arg(long, value_delimiter = ',', num_args = 3)]
    mean: Option<Vec<f32>>,
    /// Normalisation std, three comma-separated values.
    #[arg(long, value_delimiter = ',', num_args = 3)]
    std: Option<Vec<f32>>,
}

/// `finelens explain`'s arguments parsed from a list (the demo runs explain as a user would).
#[derive(clap::Parser)]
struct Standalone {
    #[command(flatten)]
    args: ExplainArgs,
}

impl ExplainArgs {
    pub fn from_args(args: &[&std::ffi::OsStr]) -> Result<Self> {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsStr::new("explain")).chain(args.iter().copied());
        Ok(Standalone::try_parse_from(argv)?.args)
    }
}

fn three(v: &[f32], what: &str) -> Result<[f32; 3]> {
    match v {
        [a, b, c] => Ok([*a, *b, *c]),
        _ => bail!("--{what} takes three comma-separated values"),
    }
}

/// The baseline spec, parsed; `image:PATH` is loaded through the model's preprocessing.
/// `flag` names the option in errors (`--baseline`, `--replacement`).
pub(crate) fn parse_baseline(
    flag: &str,
    spec: &str,
    seed: u64,
    pre: &Preprocess,
) -> Result<Baseline> {
    let mut parts = Vec::new();
    for item in spec.split(',').map(str::trim) {
        let (name, arg) = item.split_once(':').unwrap_or((item, ""));
        match name {
            "zeros" => parts.push(Baseline::Zeros),
            "black" => parts.push(Baseline::Black),
            "blur" => {
                let sigma = if arg.is_empty() {
                    // A tenth of the side blurs away shapes but keeps the colour layout.
                    pre.size as f32 / 10.0
                } else {
                    arg.parse()
                        .with_context(|| format!("{flag} {item}: sigma must be a number"))?
                };
                parts.push(Baseline::Blur { sigma });
            }
            "noise" => {
                let k: u64 = if arg.is_empty() {
                    1
                } else {
                    arg.parse()
                        .with_context(|| format!("{flag} {item}: K must be a count"))?
                };
                if k == 0 {
                    bail!("{flag} {item}: K must be at least 1");
                }
                parts.extend((0..k).map(|i| Baseline::UniformNoise { seed: seed + i }));
            }
            "image" => {
                let path = Path::new(arg);
                let img = load_rgb(path)?;
                let v = pre.normalise(&pre.eval_image(&img));
                parts.push(Baseline::Image(Tensor::from_vec(
                    v,
                    (1, 3, pre.size, pre.size),
                    &Device::Cpu,
                )?));
            }
            _ => bail!(
                "{flag}: unknown baseline `{item}`; baselines are zeros, black, blur[:SIGMA], noise[:K], image:PATH"
            ),
        }
    }
    Ok(if parts.len() == 1 {
        parts.remove(0)
    } else {
        Baseline::Average(parts)
    })
}

fn parse_methods(a: &ExplainArgs, pre: &Preprocess) -> Result<Vec<Box<dyn Attributor>>> {
    let norm = Normalisation {
        mean: pre.mean,
        std: pre.std,
    };
    let names: Vec<String> = if a.methods.trim() == "all" {
        METHODS.iter().map(|s| s.to_string()).collect()
    } else {
        a.methods
            .split(',')
            .map(|s| s.trim().to_ascii_lowercase().replace('-', "_"))
            .collect()
    };
    let baseline = || parse_baseline("--baseline", &a.baseline, a.seed, pre);
    let smoothgrad = |aggregate| -> Box<dyn Attributor> {
        Box::new(SmoothGrad {
            internal_batch: a.internal_batch,
            ..SmoothGrad::new(a.samples, a.noise, aggregate, a.seed)
        })
    };
    let mut out: Vec<Box<dyn Attributor>> = Vec::new();
    for name in names {
        let m: Box<dyn Attributor> = match name.as_str() {
            "gradient" => Box::new(Saliency {
                kind: GradientKind::Signed,
            }),
            "saliency" => Box::new(Saliency {
                kind: GradientKind::Absolute,
            }),
            "gradient_x_input" | "input_x_gradient" => Box::new(Saliency {
                kind: GradientKind::TimesInput,
            }),
            "smoothgrad" => smoothgrad(Aggregate::Mean),
            "smoothgrad_sq" => smoothgrad(Aggregate::MeanOfSquares),
            "vargrad" => smoothgrad(Aggregate::Variance),
            "integrated_gradients" | "ig" => Box::new(IntegratedGradients {
                steps: a.steps,
                rule: Rule::parse(&a.rule)?,
                baseline: baseline()?,
                internal_batch: a.internal_batch,
                normalisation: norm,
            }),
            "grad_cam" | "gradcam" => Box::new(GradCam {
                layer: a.layer.clone(),
            }),
            "occlusion" => {
                let window = a.window.unwrap_or((pre.size / 8).max(1));
                let fill = match a.fill.as_str() {
                    "baseline" => Fill::Baseline(baseline()?),
                    v => Fill::Value(v.parse().with_context(|| {
                        format!("--fill `{v}`: expected a number or `baseline`")
                    })?),
                };
                Box::new(Occlusion {
                    window,
                    stride: a.stride.unwrap_or((window / 2).max(1)),
                    fill,
                    internal_batch: a.internal_batch.unwrap_or_else(|| {
                        finelens_attrib::default_internal_batch(3, pre.size, pre.size)
                    }),
                    normalisation: norm,
                })
            }
            other => bail!(
                "--methods: unknown method `{other}`; methods are: {}",
                METHODS.join(", ")
            ),
        };
        if out.iter().any(|o| o.name() == m.name()) {
            bail!("--methods: `{}` is listed twice", m.name());
        }
        out.push(m);
    }
    if out.is_empty() {
        bail!("--methods: no method given");
    }
    Ok(out)
}

/// A file-name-safe id for an image, from its path under the input root.
fn image_id(path: &Path, root: &Path) -> String {
    let rel = path.strip_prefix(root).unwrap_or(path).with_extension("");
    let s: String = rel
        .to_string_lossy()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if s.is_empty() {
        "image".into()
    } else {
        s
    }
}

fn scale_of(sign: Sign) -> Scale {
    match sign {
        Sign::Signed => Scale::Diverging,
        Sign::Absolute => Scale::Sequential,
    }
}

pub fn explain_cmd(a: ExplainArgs) -> Result<()> {
    let ck = a.ckpt.load(&a.checkpoint)?;
    let mut pre = preprocess_of(&ck.meta);
    if let Some(s) = a.input_size {
        pre.size = s;
    }
    if let Some(m) = &a.mean {
        pre.mean = three(m, "mean")?;
    }
    if let Some(s) = &a.std {
        pre.std = three(s, "std")?;
    }
    pre.check()?;
    let classes = &ck.meta.class_names;
    let target = Target::parse(&a.target, classes)?;
    let methods = parse_methods(&a, &pre)?;
    let store = ck.store.frozen_as(DType::F32)?;
    let model = ResNet::new(ck.config()?, &store)?;
    for m in &methods {
        m.check(&model)?;
    }
    if a.outlier_perc.is_nan() || !(0.0..100.0).contains(&a.outlier_perc) {
        bail!("--outlier-perc must be in [0, 100), got {}", a.outlier_perc);
    }
    let inputs = Inputs::discover(&a.input, on_bad(a.strict), a.limit)?;
    let mut skipped: Vec<Value> = Vec::new();
    for (p, why) in &inputs.skipped {
        eprintln!("warning: skipping {}: {why}", p.display());
        skipped.push(json!({"path": p, "reason": why}));
    }
    ensure_dir(&a.out)?;

    let method_info: Vec<Value> = methods
        .iter()
        .map(|m| json!({"name": m.name(), "sign": m.sign()}))
        .collect();
    let mut report = json!({
        "checkpoint": ck.path,
        "sha256": ck.sha256,
        "arch": ck.meta.arch.name(),
        "classes": classes,
        "input_size": pre.size,
        "mean": pre.mean,
        "std": pre.std,
        "target": a.target,
        "methods": method_info,
        "settings": {
            "steps": a.steps, "rule": a.rule, "baseline": a.baseline,
            "internal_batch": a.internal_batch, "samples": a.samples, "noise": a.noise,
            "seed": a.seed, "layer": a.layer, "window": a.window, "stride": a.stride,
            "fill": a.fill, "outlier_perc": a.outlier_perc,
        },
        "images": [],
        "skipped": skipped,
    });
    let json_path = a.out.join("explain.json");
    let total = inputs.images.len();
    let progress = Progress::new(total);
    let mut used_ids = std::collections::HashSet::new();
    for (done, (path, label)) in inputs.images.iter().enumerate() {
        let started = Instant::now();
        let img = match load_rgb(path) {
            Ok(img) => img,
            Err(e) if !a.strict => {
                progress.warn(&format!("warning: skipping {e}"));
                report["skipped"]
                    .as_array_mut()
                    .expect("an array")
                    .push(json!({"path": path, "reason": e.to_string()}));
                write_json(&json_path, &report)?;
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let shown = pre.eval_image(&img);
        let x = Tensor::from_vec(
            pre.normalise(&shown),
            (1, 3, pre.size, pre.size),
            &Device::Cpu,
        )?;
        let pred = finelens_attrib::predict(&model, &x, &target)?.remove(0);
        let mut id = image_id(path, &inputs.root);
        if !used_ids.insert(id.clone()) {
            id = format!("{id}_{done}");
            used_ids.insert(id.clone());
        }
        let dir = a.out.join(&id);
        ensure_dir(&dir)?;
        let mut input_png = Vec::new();
        image::DynamicImage::ImageRgb8(shown.clone())
            .write_to(
                &mut std::io::Cursor::new(&mut input_png),
                image::ImageFormat::Png,
            )
            .with_context(|| format!("{}: cannot encode the input image", path.display()))?;
        checkpoint::write_atomic(&dir.join("input.png"), &input_png)?;

        let mut per_method = serde_json::Map::new();
        for m in &methods {
            let t = Instant::now();
            let attr = match m.attribute(&model, &x, &[pred.target]) {
                Ok(mut v) => v.remove(0),
                Err(AttribError::NonFinite { method, .. }) => bail!(
                    "{}: {method} produced a non-finite attribution (NaN or ±inf); outputs so far are in {}",
                    path.display(),
                    a.out.display()
                ),
                Err(e) => return Err(anyhow::Error::new(e).context(format!("{}", path.display()))),
            };
            let seconds = t.elapsed().as_secs_f64();
            let (c, h, w) = attr.map.dim();
            let name = m.name();
            let data: Vec<f32> = attr.map.iter().copied().collect();
            checkpoint::write_atomic(
                &dir.join(format!("{name}.npy")),
                &finelens_report::npy::encode_f32(&[c, h, w], &data),
            )?;
            let scale = scale_of(m.sign());
            let plane = heatmap::reduce_channels(attr.map.view(), ChannelReduce::for_scale(scale));
            checkpoint::write_atomic(
                &dir.join(format!("{name}.png")),
                &heatmap::heatmap_png(plane.view(), scale, a.outlier_perc)?,
            )?;
            checkpoint::write_atomic(
                &dir.join(format!("{name}_overlay.png")),
                &heatmap::overlay_png(&shown, plane.view(), scale, a.outlier_perc)?,
            )?;
            per_method.insert(
                name.into(),
                json!({
                    "npy": format!("{id}/{name}.npy"),
                    "shape": [c, h, w],
                    "heatmap": format!("{id}/{name}.png"),
                    "overlay": format!("{id}/{name}_overlay.png"),
                    "seconds": seconds,
                    "completeness": attr.completeness,
                }),
            );
        }
        let top5: Vec<Value> = pred
            .top_k(5)
            .into_iter()
            .map(|(i, p)| json!({"index": i, "class": classes[i], "probability": p}))
            .collect();
        report["images"]
            .as_array_mut()
            .expect("an array")
            .push(json!({
                "path": path,
                "id": id,
                "label": label,
                "input": format!("{id}/input.png"),
                "target": pred.target,
                "target_class": classes[pred.target],
                "target_probability": pred.probabilities[pred.target],
                "predicted": pred.predicted,
                "predicted_class": classes[pred.predicted],
                "top5": top5,
                "methods": per_method,
            }));
        // Rewritten after every image: an interrupted or failed run leaves a valid explain.json
        // that lists what was written.
        write_json(&json_path, &report)?;
        progress.image(
            done + 1,
            path,
            &classes[pred.predicted],
            started.elapsed().as_secs_f64(),
        );
    }
    progress.finish();
    let n = report["images"].as_array().map_or(0, Vec::len);
    if n == 0 {
        bail!("{}: no image could be explained", a.input.display());
    }
    println!(
        "explained {n} image(s) with {} → {}",
        methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", "),
        json_path.display()
    );
    Ok(())
}

/// A bar on a terminal, one line per image otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
}

impl Progress {
    fn new(total: usize) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "explain [{bar:30}] {pos}/{len} images, ETA {eta}",
                )
                .expect("valid template")
                .progress_chars("=> "),
            );
            b
        });
        Self { bar }
    }

    fn image(&self, done: usize, path: &Path, predicted: &str, seconds: f64) {
        match &self.bar {
            Some(b) => b.set_position(done as u64),
            None => eprintln!(
                "explained {done}: {} (predicted {predicted}) in {seconds:.2} s",
                path.display()
            ),
        }
    }

    fn warn(&self, msg: &str) {
        match &self.bar {
            Some(b) => b.println(msg),
            None => eprintln!("{msg}"),
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
