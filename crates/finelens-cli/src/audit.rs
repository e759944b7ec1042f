//! `finelens audit`: every explanation check on a checkpoint, a policy's pass/fail table, and
//! `report.json`; exit status 0 when all pass, 1 when a check fails, 2 on a usage or input error.
//! Wiring only: the checks are `finelens-audit`'s.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use finelens_attrib::{EmbeddingNorm, Normalisation};
use finelens_audit::policy::{all_pass, Policy};
use finelens_audit::run::{audit, AuditImage, AuditSettings, Rebuild};
use finelens_audit::sanity::resnet_stages;
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, Preprocess};
use finelens_drift::{representation_drift, spearman, top_k_iou, weight_drift, WeightDriftOptions};
use finelens_models::checkpoint::{self, Metadata};
use finelens_models::{Classifier, ParamStore, ResNet};
use finelens_report::heatmap::{self, Scale};
use finelens_report::html::{render, Block, Card, Cell, Figure, Page, Status};
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
    /// integrated_gradients, saliency, gradient, gradient_x_input, smoothgrad, grad_cam, occlusion.
    #[arg(long, default_value = "integrated_gradients,saliency,grad_cam")]
    methods: String,
    /// Images audited (taken across classes in turn).
    #[arg(long, default_value_t = 48)]
    limit: usize,
    /// What the faithfulness curves replace pixels with: blur[:SIGMA] (default σ = side/10),
    /// zeros, black, noise, image:PATH.
    #[arg(long, default_value = "blur")]
    replacement: String,
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

/// Images whose explanations are compared with the base's.
const EXPLANATION_DRIFT_IMAGES: usize = 8;

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

/// Run the audit, write `report.json` and `index.html`; true when every check passes.
pub fn audit_cmd(a: AuditArgs) -> Result<bool> {
    Ok(run_audit(a)?.0)
}

/// The audit, its files written, and the page blocks describing it (the demo puts two audits on
/// one page).
pub fn run_audit(a: AuditArgs) -> Result<(bool, Vec<Block>)> {
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
    let methods = a
        .methods
        .split(',')
        .map(|m| crate::drift::attributor("--methods", m, norm, pre.size, a.steps))
        .collect::<Result<Vec<_>>>()?;
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
        replacement: crate::explain::parse_baseline("--replacement", &a.replacement, a.seed, &pre)?,
        normalisation: norm,
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
    let mut explanation_drift = None;
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

        // Explanation drift with the primary method: the class logit when the classes are the
        // base's, else the embedding norm both models have.
        let shared = b.meta.class_names == ck.meta.class_names;
        let e0 = EmbeddingNorm {
            model: &bm,
            layer: "avgpool".into(),
        };
        let e1 = EmbeddingNorm {
            model: &model,
            layer: "avgpool".into(),
        };
        let (c0, c1): (&dyn Classifier, &dyn Classifier) =
            if shared { (&bm, &model) } else { (&e0, &e1) };
        let method = &settings.methods[0];
        let (mut rho, mut iou) = (Vec::new(), Vec::new());
        for (img, res) in images
            .iter()
            .zip(&report.images)
            .take(EXPLANATION_DRIFT_IMAGES)
        {
            let target = if shared { res.predicted } else { 0 };
            let m0 = method.attribute(c0, &img.x, &[target])?.remove(0);
            let m1 = method.attribute(c1, &img.x, &[target])?.remove(0);
            let (v0, v1) = (
                crate::drift::magnitude(&m0.map),
                crate::drift::magnitude(&m1.map),
            );
            rho.push(spearman(&v0, &v1));
            iou.push(top_k_iou(&v0, &v1, 0.1));
        }
        let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
        explanation_drift = Some((method.name().to_owned(), mean(&rho), mean(&iou), rho.len()));
        drift = json!({
            "weights": w,
            "representation": rep,
            "explanation": {
                "method": method.name(),
                "target": if shared { "class_logit" } else { "embedding_norm" },
                "spearman": rho,
                "top_iou": iou,
                "top_fraction": 0.1,
            },
        });
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
    let drift_figures = match &drift {
        serde_json::Value::Null => None,
        d => Some(drift_pngs(d)?),
    };
    let blocks = page_blocks(&PageInput {
        name: &a.checkpoint.display().to_string(),
        pass,
        verdicts: &verdicts,
        meta: &ck.meta,
        sha256: &ck.sha256,
        data: &a.data,
        report: &report,
        images: &images,
        pre: &pre,
        drift: drift_figures,
        explanation_drift,
        base: a.base.as_deref(),
        seed: a.seed,
    })?;
    let page = Page {
        title: format!(
            "finelens audit: {}",
            a.checkpoint
                .file_name()
                .map_or("model".into(), |n| n.to_string_lossy().into_owned())
        ),
        blocks: blocks.clone(),
    };
    let files = figure_files(&blocks);
    write_report_dir(&a.out, a.force, |dir| {
        write_json(&dir.join("report.json"), &doc)?;
        for (name, bytes) in &files {
            let path = dir.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent)
                    .with_context(|| format!("{}: cannot create directory", parent.display()))?;
            }
            checkpoint::write_atomic(&path, bytes)?;
        }
        checkpoint::write_atomic(&dir.join("index.html"), render(&page).as_bytes())?;
        Ok(())
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
    Ok((pass, blocks))
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

/// The layer-drift chart and CKA heat map of a drift result (as `report.json` holds it).
fn drift_pngs(d: &serde_json::Value) -> Result<(Vec<u8>, Vec<u8>)> {
    let layers = d["weights"]["layers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let labels: Vec<String> = layers
        .iter()
        .map(|l| l["name"].as_str().unwrap_or("").to_owned())
        .collect();
    let values: Vec<f64> = layers
        .iter()
        .map(|l| l["relative_l2_change"].as_f64().unwrap_or(f64::NAN))
        .collect();
    let bars = finelens_report::drift_plot::layer_bars(
        "relative L2 change per layer, ‖W₁ − W₀‖ / ‖W₀‖",
        &labels,
        &values,
    )?;
    let rep = &d["representation"];
    let names: Vec<String> = rep["layers"]
        .as_array()
        .map(|v| {
            v.iter()
                .map(|s| s.as_str().unwrap_or("").to_owned())
                .collect()
        })
        .unwrap_or_default();
    let matrix: Vec<Vec<f64>> = rep["matrix"]
        .as_array()
        .map(|rows| {
            rows.iter()
                .map(|r| {
                    r.as_array()
                        .map(|c| c.iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect())
                        .unwrap_or_default()
                })
                .collect()
        })
        .unwrap_or_default();
    let cka = finelens_report::drift_plot::matrix_heatmap(
        "linear CKA: base layers (rows) × audited model's layers (columns)",
        &names,
        &names,
        &matrix,
    )?;
    Ok((bars, cka))
}

struct PageInput<'a> {
    name: &'a str,
    pass: bool,
    verdicts: &'a [finelens_audit::policy::Verdict],
    meta: &'a Metadata,
    sha256: &'a str,
    data: &'a Path,
    report: &'a finelens_audit::run::AuditReport,
    images: &'a [AuditImage],
    pre: &'a Preprocess,
    drift: Option<(Vec<u8>, Vec<u8>)>,
    /// Method, mean Spearman ρ, mean top-10% IoU, images.
    explanation_drift: Option<(String, f64, f64, usize)>,
    base: Option<&'a Path>,
    seed: u64,
}

fn status(pass: Option<bool>) -> Status {
    match pass {
        Some(true) => Status::Pass,
        Some(false) => Status::Fail,
        None => Status::Neutral,
    }
}

fn verdict_word(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "not measured",
    }
}

fn png(img: &image::RgbImage) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    image::DynamicImage::ImageRgb8(img.clone())
        .write_to(&mut std::io::Cursor::new(&mut out), image::ImageFormat::Png)?;
    Ok(out)
}

fn facts(rows: Vec<(&str, String)>) -> Block {
    Block::Table(
        vec![String::new(), String::new()],
        rows.into_iter()
            .map(|(k, v)| vec![Cell::Text(k.into()), Cell::Text(v)])
            .collect(),
    )
}

/// One model's part of a report page: verdicts, model card, gallery, checks, drift, provenance.
fn page_blocks(p: &PageInput) -> Result<Vec<Block>> {
    let r = p.report;
    let classes = &p.meta.class_names;
    let mut b = vec![Block::Heading(2, p.name.to_owned())];
    let mut badges = vec![(
        if p.pass {
            "all checks pass"
        } else {
            "FLAGGED: checks fail"
        }
        .to_owned(),
        if p.pass { Status::Pass } else { Status::Fail },
    )];
    badges.extend(p.verdicts.iter().map(|v| {
        (
            format!("{}.{}: {}", v.check, v.key, verdict_word(v.pass)),
            status(v.pass),
        )
    }));
    b.push(Block::Badges(badges));

    b.push(Block::Heading(3, "Verdicts".into()));
    b.push(Block::Table(
        [
            "check",
            "threshold",
            "figure",
            "limit",
            "verdict",
            "what it means",
        ]
        .map(String::from)
        .to_vec(),
        p.verdicts
            .iter()
            .map(|v| {
                vec![
                    Cell::Text(v.check.clone()),
                    Cell::Text(v.key.clone()),
                    Cell::Number(v.figure.unwrap_or(f64::NAN), 3),
                    Cell::Text(format!(
                        "{} {:.3}",
                        match v.bound {
                            finelens_audit::policy::Bound::Min => "≥",
                            finelens_audit::policy::Bound::Max => "≤",
                        },
                        v.threshold
                    )),
                    Cell::Badge(verdict_word(v.pass).into(), status(v.pass)),
                    Cell::Text(v.meaning.clone()),
                ]
            })
            .collect(),
    ));

    b.push(Block::Heading(3, "Model card".into()));
    let training = p.meta.training.as_ref();
    let mut card = vec![
        (
            "architecture",
            format!("{} (head {})", p.meta.arch, p.meta.head),
        ),
        ("classes", classes.join(", ")),
        (
            "input",
            format!(
                "{0}×{0}, mean {1:?}, std {2:?}",
                p.meta.input_size, p.meta.mean, p.meta.std
            ),
        ),
        (
            "audited data",
            format!("{} ({} images)", p.data.display(), r.images.len()),
        ),
        (
            "accuracy on the audited images",
            r.accuracy
                .map_or("no labels".into(), |a| format!("{:.1}%", 100.0 * a)),
        ),
        (
            "parent checkpoint (SHA-256)",
            p.meta
                .parent_sha256
                .clone()
                .unwrap_or_else(|| "none recorded".into()),
        ),
    ];
    if let Some(t) = training {
        card.push(("training configuration", t["config"].to_string()));
    }
    b.push(facts(card));
    if let Some(history) = training.and_then(|t| t["history"].as_array()) {
        let series = |key: &str| finelens_report::Series {
            name: key.into(),
            values: history
                .iter()
                .map(|e| e[key].as_f64().unwrap_or(f64::NAN))
                .collect(),
        };
        if !history.is_empty() {
            let curves = finelens_report::training_curves(
                &[series("train_loss"), series("val_loss")],
                &[series("train_accuracy"), series("val_accuracy")],
            )?;
            b.push(Block::Image {
                png: curves,
                alt: "training curves".into(),
            });
        }
    }
    let labelled: Vec<(usize, usize)> = r
        .images
        .iter()
        .filter_map(|i| i.label.map(|l| (l, i.predicted)))
        .collect();
    if !labelled.is_empty() {
        b.push(Block::Paragraph(
            "Confusion matrix on the audited images (rows: true class, columns: predicted).".into(),
        ));
        let mut head = vec![String::new()];
        head.extend(classes.iter().cloned());
        let rows = classes
            .iter()
            .enumerate()
            .map(|(t, name)| {
                std::iter::once(Cell::Text(name.clone()))
                    .chain((0..classes.len()).map(|q| {
                        let n = labelled
                            .iter()
                            .filter(|&&(l, pr)| l == t && pr == q)
                            .count();
                        Cell::Number(n as f64, 0)
                    }))
                    .collect()
            })
            .collect();
        b.push(Block::Table(head, rows));
    }

    b.push(Block::Heading(3, "Explanations".into()));
    b.push(Block::Paragraph(format!(
        "Per image: the input, its mask, then each method's heat map and overlay ({}); the \
         policy gates on {}. Signed maps are blue (against) to red (for the class), magnitudes \
         dark to yellow.",
        r.methods
            .iter()
            .map(|m| m.method.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        r.primary
    )));
    let mut cards = Vec::new();
    for (k, (img, res)) in p.images.iter().zip(&r.images).enumerate() {
        let v: Vec<f32> = img.x.flatten_all()?.to_vec1()?;
        let shown = p.pre.denormalise(&v, p.pre.size);
        let mut figures = vec![Figure {
            caption: "input".into(),
            png: png(&shown)?,
        }];
        if let Some(m) = &img.mask {
            let (h, w) = m.dim();
            let mask = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let on = m[[y as usize, x as usize]];
                image::Rgb(if on { [255; 3] } else { [0; 3] })
            });
            figures.push(Figure {
                caption: "mask".into(),
                png: png(&mask)?,
            });
        }
        for (method, (maps, signed)) in r.methods.iter().zip(&r.relevance) {
            let scale = if *signed {
                Scale::Diverging
            } else {
                Scale::Sequential
            };
            let rel = &maps[k];
            figures.push(Figure {
                caption: method.method.clone(),
                // Native size: the page scales it up without smoothing.
                png: png(&heatmap::heatmap_rgb(
                    rel.view(),
                    scale,
                    heatmap::DEFAULT_OUTLIER_PERC,
                ))?,
            });
            figures.push(Figure {
                caption: "overlay".into(),
                png: png(&heatmap::overlay_rgb(
                    &shown,
                    rel.view(),
                    scale,
                    heatmap::DEFAULT_OUTLIER_PERC,
                )?)?,
            });
        }
        cards.push(Card {
            title: img.id.clone(),
            caption: format!(
                "predicted {} ({:.1}%){}",
                classes[res.predicted],
                100.0 * res.probability,
                res.label
                    .map_or(String::new(), |l| format!(", true {}", classes[l]))
            ),
            figures,
            confidence: res.probability as f64,
            error: res.correct == Some(false),
        });
    }
    b.push(Block::Gallery(cards));

    b.push(Block::Heading(3, "Checks per method".into()));
    b.push(Block::Paragraph(
        "Sanity (Adebayo et al. 2018): Spearman ρ and SSIM between the trained model's maps and \
         those of the model with every weight re-initialised; low means the maps depend on the \
         model. Faithfulness (Petsiuk et al. 2018): deletion AUC (low is good) and insertion AUC \
         (high is good), each against a random pixel order. Localisation: pointing game, \
         relevance mass and rank accuracy against the object masks."
            .into(),
    ));
    let rows = r
        .methods
        .iter()
        .map(|m| {
            let last = m.sanity.cascading.last();
            let loc = m.localisation.as_ref();
            let f = &m.faithfulness;
            vec![
                Cell::Text(m.method.clone()),
                Cell::Number(last.map_or(f64::NAN, |s| s.spearman), 3),
                Cell::Number(last.map_or(f64::NAN, |s| s.ssim), 3),
                Cell::Number(f.deletion_auc, 3),
                Cell::Number(f.deletion_auc_random, 3),
                Cell::Number(f.insertion_auc, 3),
                Cell::Number(f.insertion_auc_random, 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.pointing_game_hit_rate), 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.relevance_mass_accuracy), 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.relevance_rank_accuracy), 3),
            ]
        })
        .collect();
    b.push(Block::Table(
        [
            "method",
            "ρ, all random",
            "SSIM, all random",
            "deletion AUC",
            "random",
            "insertion AUC",
            "random",
            "pointing game",
            "mass accuracy",
            "rank accuracy",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    ));
    for m in &r.methods {
        b.push(Block::Paragraph(format!(
            "Randomisation of {}, ρ / SSIM with the trained maps — cascading (every stage down to \
             this one random), then independent (only this stage random):",
            m.method
        )));
        let head: Vec<String> = std::iter::once(String::new())
            .chain(m.sanity.cascading.iter().map(|s| s.stage.clone()))
            .collect();
        let row = |label: &str, stages: &[finelens_audit::sanity::StageSimilarity]| {
            std::iter::once(Cell::Text(label.into()))
                .chain(
                    stages
                        .iter()
                        .map(|s| Cell::Text(format!("{:.3} / {:.3}", s.spearman, s.ssim))),
                )
                .collect()
        };
        b.push(Block::Table(
            head,
            vec![
                row("cascading", &m.sanity.cascading),
                row("independent", &m.sanity.independent),
            ],
        ));
    }

    b.push(Block::Heading(3, "Shortcuts per class".into()));
    b.push(Block::Table(
        [
            "class",
            "images",
            "relevance off the object",
            "hotspot concentration",
            "hotspot (y0, x0, y1, x1)",
        ]
        .map(String::from)
        .to_vec(),
        r.shortcut
            .iter()
            .map(|c| {
                vec![
                    Cell::Text(c.class.clone()),
                    Cell::Number(c.images as f64, 0),
                    Cell::Number(c.mass_outside_mask.unwrap_or(f64::NAN), 3),
                    Cell::Number(c.hotspot_concentration, 3),
                    Cell::Text(format!("{:?}", c.hotspot_box)),
                ]
            })
            .collect(),
    ));
    if let Some((bars, cka)) = &p.drift {
        b.push(Block::Heading(3, "Drift from the base".into()));
        b.push(Block::Image {
            png: bars.clone(),
            alt: "relative change per layer".into(),
        });
        b.push(Block::Image {
            png: cka.clone(),
            alt: "CKA between the base's and the audited model's layers".into(),
        });
        if let Some((method, rho, iou, n)) = &p.explanation_drift {
            b.push(Block::Paragraph(format!(
                "Explanation drift ({method}, {n} images): Spearman ρ of |attribution| between the \
                 base's and this model's maps {rho:.3}; overlap (IoU) of their top 10% pixels \
                 {iou:.3}."
            )));
        }
    }
    b.push(Block::Heading(3, "Provenance".into()));
    b.push(facts(vec![
        ("checkpoint", p.name.to_owned()),
        ("sha256", p.sha256.to_owned()),
        (
            "base",
            p.base.map_or("none".into(), |b| b.display().to_string()),
        ),
        ("seed", p.seed.to_string()),
        ("finelens", env!("CARGO_PKG_VERSION").to_owned()),
        (
            "command line",
            std::env::args().collect::<Vec<_>>().join(" "),
        ),
    ]));
    Ok(b)
}

/// The page's pictures as files beside it: figures as `<alt>.png`, gallery pictures as
/// `gallery/<image id>/<n>-<caption>.png`, names made file-name safe.
fn figure_files(blocks: &[Block]) -> Vec<(String, Vec<u8>)> {
    let safe = |s: &str| -> String {
        let t: String = s
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' {
                    c
                } else {
                    '-'
                }
            })
            .collect();
        t.trim_matches('-').to_owned()
    };
    let mut out = Vec::new();
    for b in blocks {
        match b {
            Block::Image { png, alt } => out.push((format!("{}.png", safe(alt)), png.clone())),
            Block::Gallery(cards) => {
                for c in cards {
                    for (k, f) in c.figures.iter().enumerate() {
                        out.push((
                            format!("gallery/{}/{k}-{}.png", safe(&c.title), safe(&f.caption)),
                            f.png.clone(),
                        ));
                    }
                }
            }
            _ => {}
        }
    }
    out
}
