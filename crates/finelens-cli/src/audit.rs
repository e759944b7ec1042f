//! `finelens audit`: every explanation check on a checkpoint, a policy's pass/fail table, and
//! `report.json`; exit status 0 when all pass, 1 when a check fails, 2 on a usage or input error.
//! Wiring only: the checks are `finelens-audit`'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use finelens_attrib::{
    Attributor, GradCam, GradientKind, IntegratedGradients, Normalisation, Saliency,
};
use finelens_audit::policy::{all_pass, Policy};
use finelens_audit::run::{audit, AuditImage, AuditSettings, Rebuild};
use finelens_audit::sanity::resnet_stages;
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, Preprocess};
use finelens_drift::{representation_drift, weight_drift, WeightDriftOptions};
use finelens_models::{Classifier, ParamStore, ResNet};
use ndarray::Array2;
use serde_json::json;

use crate::{on_bad, preprocess_of, write_json, CheckpointArgs};

#[derive(Args)]
pub struct AuditArgs {
    /// The checkpoint to audit.
    checkpoint: PathBuf,
    #[command(flatten)]
    ckpt: CheckpointArgs,
    /// Images to audit: an ImageFolder (labels give accuracy) or a folder of images.
    #[arg(long)]
    data: PathBuf,
    /// Object masks mirroring --data (<masks>/<class>/<image>.png, white = object); by default
    /// <task>/masks/<split> beside <task>/images/<split> when it exists.
    #[arg(long)]
    masks: Option<PathBuf>,
    /// Audit without masks even when they exist.
    #[arg(long)]
    no_masks: bool,
    /// The checkpoint this one was fine-tuned from: adds weight and representation drift.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Thresholds (TOML: [check] threshold = value); without it the documented defaults.
    #[arg(long)]
    policy: Option<PathBuf>,
    /// Methods to check, comma-separated; the first is the one the policy gates on:
    /// integrated_gradients, saliency, gradient, gradient_x_input, grad_cam.
    #[arg(long, default_value = "integrated_gradients,saliency,grad_cam")]
    methods: String,
    /// Images audited (taken across classes in turn).
    #[arg(long, default_value_t = 48)]
    limit: usize,
    /// Images used by the randomisation sanity check.
    #[arg(long, default_value_t = 4)]
    sanity_images: usize,
    /// Integrated gradients' steps (64 keeps the completeness gap under 5% on resnet-mini).
    #[arg(long, default_value_t = 64)]
    steps: usize,
    /// Seed for the random pixel orders and re-initialised weights.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Fail on an image that cannot be decoded instead of skipping it.
    #[arg(long)]
    strict: bool,
    /// Output directory (report.json); refused when it exists, unless --force.
    #[arg(long, default_value = "reports/audit")]
    out: PathBuf,
    /// Replace an existing output directory (the new one is complete before the old one goes).
    #[arg(long)]
    force: bool,
}

/// `finelens audit`'s arguments parsed from a list (the demo audits as a user would).
#[derive(clap::Parser)]
struct Standalone {
    #[command(flatten)]
    args: AuditArgs,
}

impl AuditArgs {
    pub fn from_args(args: &[&std::ffi::OsStr]) -> Result<Self> {
        use clap::Parser;
        let argv = std::iter::once(std::ffi::OsStr::new("audit")).chain(args.iter().copied());
        Ok(Standalone::try_parse_from(argv)?.args)
    }
}

fn methods(spec: &str, norm: Normalisation, steps: usize) -> Result<Vec<Box<dyn Attributor>>> {
    spec.split(',')
        .map(|m| -> Result<Box<dyn Attributor>> {
            Ok(match m.trim() {
                "integrated_gradients" | "ig" => Box::new(IntegratedGradients {
                    steps,
                    ..IntegratedGradients::new(norm)
                }),
                "saliency" => Box::new(Saliency {
                    kind: GradientKind::Absolute,
                }),
                "gradient" => Box::new(Saliency {
                    kind: GradientKind::Signed,
                }),
                "gradient_x_input" => Box::new(Saliency {
                    kind: GradientKind::TimesInput,
                }),
                "grad_cam" => Box::new(GradCam::default()),
                other => bail!(
                    "--methods: unknown method `{other}`; use integrated_gradients, saliency, gradient, gradient_x_input or grad_cam"
                ),
            })
        })
        .collect()
}

/// `<task>/images/<split>` → `<task>/masks/<split>`, when that exists.
fn default_masks(data: &Path) -> Option<PathBuf> {
    let split = data.file_name()?;
    let images = data.parent()?;
    (images.file_name()? == "images")
        .then(|| images.parent().map(|t| t.join("masks").join(split)))
        .flatten()
        .filter(|m| m.is_dir())
}

/// A mask image through the model's evaluation geometry, thresholded at half.
fn load_mask(path: &Path, pre: &Preprocess) -> Result<Array2<bool>> {
    let rgb = load_rgb(path)?;
    let m = pre.eval_image(&rgb);
    let s = pre.size;
    Ok(Array2::from_shape_fn((s, s), |(y, x)| {
        m.get_pixel(x as u32, y as u32).0[0] > 127
    }))
}

pub fn audit_cmd(a: AuditArgs) -> Result<bool> {
    let policy = match &a.policy {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .with_context(|| format!("{}: cannot read the policy", p.display()))?;
            Policy::parse(p, &text)?
        }
        None => Policy::default(),
    };
    if a.out.exists() && !a.force {
        bail!(
            "{}: the report directory exists; pass --force to replace it",
            a.out.display()
        );
    }
    let started = Instant::now();
    let ck = a.ckpt.load(&a.checkpoint)?;
    let pre = preprocess_of(&ck.meta);
    let norm = Normalisation {
        mean: pre.mean,
        std: pre.std,
    };
    let methods = methods(&a.methods, norm, a.steps)?;
    let config = ck.config()?;
    let store = ck.store.frozen_as(DType::F32)?;
    let model = ResNet::new(config, &store)?;
    for m in &methods {
        m.check(&model)?;
    }

    let inputs = Inputs::discover(&a.data, on_bad(a.strict), Some(a.limit))?;
    for (p, why) in &inputs.skipped {
        eprintln!("warning: skipping {}: {why}", p.display());
    }
    let masks_root = if a.no_masks {
        None
    } else {
        a.masks.clone().or_else(|| default_masks(&a.data))
    };
    if let Some(m) = &masks_root {
        if !m.is_dir() {
            bail!("{}: the mask folder does not exist", m.display());
        }
    }
    let classes = &ck.meta.class_names;
    let mut images = Vec::new();
    for (path, label) in &inputs.images {
        let img = match load_rgb(path) {
            Ok(i) => i,
            Err(e) if !a.strict => {
                eprintln!("warning: skipping {e}");
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        let rel = path.strip_prefix(&inputs.root).unwrap_or(path);
        let mask = match &masks_root {
            Some(root) => {
                let mp = root.join(rel);
                if !mp.is_file() {
                    bail!(
                        "{}: no mask for {} (the mask folder must mirror the images)",
                        mp.display(),
                        path.display()
                    );
                }
                Some(load_mask(&mp, &pre)?)
            }
            None => None,
        };
        let x = Tensor::from_vec(
            pre.normalise(&pre.eval_image(&img)),
            (1, 3, pre.size, pre.size),
            &Device::Cpu,
        )?;
        images.push(AuditImage {
            id: rel
                .with_extension("")
                .to_string_lossy()
                .replace(['/', '\\'], "__"),
            path: path.clone(),
            label: label
                .as_ref()
                .and_then(|l| classes.iter().position(|c| c == l)),
            x,
            mask,
        });
    }
    if images.is_empty() {
        bail!("{}: no image could be read", a.data.display());
    }
    let build = |s: &ParamStore| -> finelens_audit::Result<Box<dyn Classifier>> {
        Ok(Box::new(ResNet::new(config, s)?))
    };
    let rebuild = Rebuild {
        store: &ck.store,
        specs: config.param_specs(),
        build: &build,
        stages: resnet_stages(4),
    };
    let settings = AuditSettings {
        methods,
        sanity_images: a.sanity_images,
        faithfulness_steps: 16,
        blur_sigma: pre.size as f32 / 10.0,
        pointing_tolerance: 0,
        seed: a.seed,
    };
    println!(
        "auditing {} on {} image(s){} with {}",
        a.checkpoint.display(),
        images.len(),
        if masks_root.is_some() {
            " with masks"
        } else {
            ""
        },
        settings
            .methods
            .iter()
            .map(|m| m.name())
            .collect::<Vec<_>>()
            .join(", ")
    );
    let report = audit(&model, &rebuild, &images, classes, &settings)?;
    let mut figures = report.figures.clone();

    let mut drift = serde_json::Value::Null;
    if let Some(base) = &a.base {
        let w = weight_drift(base, &a.checkpoint, WeightDriftOptions::default())?;
        let b = a.ckpt.load(base)?;
        let bs = b.store.frozen_as(DType::F32)?;
        let bm = ResNet::new(b.config()?, &bs)?;
        let xs: Vec<Tensor> = images.iter().map(|i| i.x.clone()).collect();
        let layers: Vec<String> = ["layer1", "layer2", "layer3", "layer4", "avgpool"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let rep = representation_drift(
            &bm,
            &model,
            xs.chunks(16).map(|c| Ok(Tensor::cat(c, 0)?)),
            &layers,
            false,
        )?;
        figures.insert("drift.min_cka_penultimate".into(), rep.diagonal[4]);
        drift = json!({"weights": w, "representation": rep});
    }
    let verdicts = policy.evaluate(&figures);
    let pass = all_pass(&verdicts);

    println!(
        "{:<14} {:<36} {:>9} {:>11}  verdict",
        "check", "threshold", "figure", "limit"
    );
    for v in &verdicts {
        println!(
            "{:<14} {:<36} {:>9} {:>4} {:>6.3}  {}",
            v.check,
            v.key,
            v.figure.map_or("—".into(), |f| format!("{f:.3}")),
            match v.bound {
                finelens_audit::policy::Bound::Min => "≥",
                finelens_audit::policy::Bound::Max => "≤",
            },
            v.threshold,
            match v.pass {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "not measured",
            }
        );
    }
    let doc = json!({
        "checkpoint": {"path": a.checkpoint, "sha256": ck.sha256, "arch": ck.meta.arch.name(), "classes": classes},
        "base": a.base,
        "data": a.data,
        "masks": masks_root,
        "policy": policy,
        "verdicts": verdicts,
        "pass": pass,
        "audit": report,
        "drift": drift,
        "seed": a.seed,
        "finelens_version": env!("CARGO_PKG_VERSION"),
        "command_line": std::env::args().collect::<Vec<_>>(),
        "seconds": started.elapsed().as_secs_f64(),
    });
    write_report_dir(&a.out, a.force, |dir| {
        write_json(&dir.join("report.json"), &doc)
    })?;
    println!(
        "{} — report in {} ({:.1} s)",
        if pass {
            "all checks pass"
        } else {
            "some checks FAIL"
        },
        a.out.display(),
        started.elapsed().as_secs_f64()
    );
    Ok(pass)
}

/// Write a report directory completely under a temporary name beside `out`, then put it in
/// place: a reader never sees half a report, and an old one is replaced only by a whole new one.
fn write_report_dir(out: &Path, force: bool, fill: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let parent = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent)
        .with_context(|| format!("{}: cannot create directory", parent.display()))?;
    let name = out
        .file_name()
        .map_or("report".into(), |n| n.to_string_lossy().into_owned());
    let tmp = parent.join(format!(".{name}.partial-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp)
        .with_context(|| format!("{}: cannot create directory", tmp.display()))?;
    if let Err(e) = fill(&tmp) {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e);
    }
    if out.exists() {
        if !force {
            let _ = std::fs::remove_dir_all(&tmp);
            bail!(
                "{}: the report directory exists; pass --force to replace it",
                out.display()
            );
        }
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        std::fs::rename(out, &old)
            .with_context(|| format!("{}: cannot move the old report aside", out.display()))?;
        std::fs::rename(&tmp, out)
            .with_context(|| format!("{}: cannot put the report in place", out.display()))?;
        let _ = std::fs::remove_dir_all(&old);
    } else {
        std::fs::rename(&tmp, out)
            .with_context(|| format!("{}: cannot put the report in place", out.display()))?;
    }
    Ok(())
}
