//! The explain job: attributions for a set of images, written as `.npy` arrays, heat maps,
//! overlays and one `explain.json` (rewritten after every image, so a run that fails part-way
//! leaves a valid record of what it wrote).

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;
use std::time::Instant;

use finelens_attrib::{AttribError, Completeness, MethodOptions, MethodSpec, Sign, Target};
use finelens_report::heatmap::{self, ChannelReduce, Scale};
use serde::{Deserialize, Serialize};

use crate::error::{input, settings, Context, PipelineError, Result};
use crate::inputs::{self, ModelSource, PreprocessRecord, PreprocessSettings};
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::progress::{Event, Progress};
use crate::shard::Shard;

/// What `finelens explain` does.
#[derive(Debug, Clone)]
pub struct ExplainSettings {
    pub model: ModelSource,
    pub preprocess: PreprocessSettings,
    /// An image, a folder of images, or an ImageFolder.
    pub input: PathBuf,
    pub methods: Vec<MethodSpec>,
    /// Settings every method takes unless its own spec says otherwise.
    pub shared: MethodOptions,
    /// `predicted`, a class index or a class name.
    pub target: String,
    pub limit: Option<usize>,
    pub strict: bool,
    /// Heat maps clip the largest values holding this percentage of the mass (Captum's
    /// `outlier_perc`).
    pub outlier_perc: f32,
    pub out: PathBuf,
    pub force: bool,
    /// Explain only this shard of the images.
    pub shard: Option<Shard>,
}

impl ExplainSettings {
    pub fn check(&self) -> Result<()> {
        if self.methods.is_empty() {
            return Err(settings("explain: no method given"));
        }
        if self.outlier_perc.is_nan() || !(0.0..100.0).contains(&self.outlier_perc) {
            return Err(settings(format!(
                "the heat maps' outlier percentage must be in [0, 100), got {}",
                self.outlier_perc
            )));
        }
        if self.limit == Some(0) {
            return Err(settings("explain: an image limit of 0 explains nothing"));
        }
        OutputDir::check(&self.out, self.force)
    }
}

/// `explain.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainReport {
    pub schema_version: String,
    pub checkpoint: PathBuf,
    pub sha256: String,
    pub arch: String,
    pub classes: Vec<String>,
    pub preprocess: PreprocessRecord,
    /// As given: `predicted`, an index or a name.
    pub target: String,
    pub methods: Vec<MethodRecord>,
    pub images: Vec<ExplainedImage>,
    pub skipped: Vec<Skipped>,
    /// Images in the whole input set (all shards).
    pub total_images: usize,
    /// The shard this run explained; `None` for the whole set (or a merge of every shard).
    pub shard: Option<Shard>,
}

impl Versioned for ExplainReport {
    const SCHEMA: &'static str = "finelens-explain/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// A method and the settings it ran with (its spec's, then the shared ones; unset ones are the
/// registry's named defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodRecord {
    pub name: String,
    pub sign: Sign,
    pub settings: MethodOptions,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Skipped {
    pub path: PathBuf,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ExplainedImage {
    /// Its place in the whole input set (in a shard, too).
    pub index: usize,
    pub path: PathBuf,
    /// Its path under the input, file-name safe: the folder its outputs are in.
    pub id: String,
    /// The class folder it came from, for an ImageFolder.
    pub label: Option<String>,
    /// `<id>/input.png`: the image as the model saw it.
    pub input: String,
    pub target: usize,
    pub target_class: String,
    pub target_probability: f32,
    pub predicted: usize,
    pub predicted_class: String,
    pub top5: Vec<ClassProbability>,
    pub methods: BTreeMap<String, MethodOutput>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassProbability {
    pub index: usize,
    pub class: String,
    pub probability: f32,
}

/// One method's outputs for one image; paths are relative to the output directory.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MethodOutput {
    pub npy: String,
    pub shape: [usize; 3],
    pub heatmap: String,
    pub overlay: String,
    pub seconds: f64,
    /// The completeness check of integrated gradients and DeepLIFT (Σ attributions against F(x) − F(x′)).
    pub completeness: Option<Completeness>,
    /// KernelSHAP, LIME, feature ablation: the surrogate's fit and the evaluations spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surrogate: Option<finelens_attrib::Surrogate>,
}

fn scale_of(sign: Sign) -> Scale {
    match sign {
        Sign::Signed => Scale::Diverging,
        Sign::Absolute => Scale::Sequential,
    }
}

/// Run the job: the output directory appears whole when it succeeds; on failure what was written
/// is kept as `<out>.partial`.
pub fn explain(s: &ExplainSettings, progress: Progress) -> Result<ExplainReport> {
    s.check()?;
    let m = s.model.load()?;
    let pre = s.preprocess.resolve(&m.info)?;
    let classes = &m.info.classes;
    let target = Target::parse(&s.target, classes)?;
    let methods = inputs::build_methods(&s.methods, &s.shared, &pre)?;
    let analysed = m.analysed()?;
    let model = analysed.model.as_ref();
    for m in &methods {
        m.check(model)?;
    }
    let found = inputs::discover(&s.input, s.strict, s.limit, progress)?;
    let mut report = ExplainReport {
        schema_version: ExplainReport::SCHEMA.into(),
        checkpoint: m.path.clone(),
        sha256: m.sha256.clone(),
        arch: m.info.arch.clone(),
        classes: classes.clone(),
        preprocess: (&pre).into(),
        target: s.target.clone(),
        methods: methods
            .iter()
            .zip(&s.methods)
            .map(|(m, spec)| MethodRecord {
                name: m.name().into(),
                sign: m.sign(),
                settings: spec.options.or(&s.shared),
            })
            .collect(),
        images: Vec::new(),
        total_images: found.images.len(),
        shard: s.shard,
        skipped: found
            .skipped
            .iter()
            .map(|(p, why)| Skipped {
                path: p.clone(),
                reason: why.clone(),
            })
            .collect(),
    };
    // Ids over the whole set, so that every shard names an image as one run would.
    let mut used_ids = HashSet::new();
    let ids: Vec<String> = found
        .images
        .iter()
        .enumerate()
        .map(|(index, (path, _))| {
            let mut id = inputs::image_id(path, &found.root);
            if !used_ids.insert(id.clone()) {
                id = format!("{id}_{index}");
                used_ids.insert(id.clone());
            }
            id
        })
        .collect();
    let mine: Vec<usize> = (0..found.images.len())
        .filter(|&k| {
            s.shard.is_none_or(|sh| {
                let path = &found.images[k].0;
                sh.contains(path.strip_prefix(&found.root).unwrap_or(path))
            })
        })
        .collect();
    let total = mine.len();
    OutputDir::create(&s.out, s.force)?.run(|dir| {
        let json_path = dir.join("explain.json");
        progress(Event::Stage {
            name: "explain",
            total,
            unit: "images",
        });
        for (done, &index) in mine.iter().enumerate() {
            let (path, label) = &found.images[index];
            let id = ids[index].clone();
            let started = Instant::now();
            let Some((shown, x)) = inputs::read_image(path, &pre, s.strict, progress)? else {
                report.skipped.push(Skipped {
                    path: path.clone(),
                    reason: "cannot be decoded".into(),
                });
                write_json(&json_path, &report)?;
                continue;
            };
            let pred = finelens_attrib::predict(model, &x, &target)?.remove(0);
            let image_dir = dir.join(&id);
            write_file(
                &image_dir.join("input.png"),
                &crate::output::png_bytes(&shown)?,
            )
            .context(path.display())?;
            let mut outputs = BTreeMap::new();
            for m in &methods {
                let t = Instant::now();
                let attr = match m.attribute(model, &x, &[pred.target]) {
                    Ok(mut v) => v.remove(0),
                    Err(AttribError::NonFinite { method, .. }) => {
                        return Err(input(
                            path,
                            format!("{method} produced a non-finite attribution (NaN or ±inf)"),
                        ))
                    }
                    Err(e) => return Err(PipelineError::from(e)).context(path.display()),
                };
                let seconds = t.elapsed().as_secs_f64();
                let (c, h, w) = attr.map.dim();
                let name = m.name();
                let data: Vec<f32> = attr.map.iter().copied().collect();
                write_file(
                    &image_dir.join(format!("{name}.npy")),
                    &finelens_report::npy::encode_f32(&[c, h, w], &data),
                )?;
                let scale = scale_of(m.sign());
                let plane =
                    heatmap::reduce_channels(attr.map.view(), ChannelReduce::for_scale(scale));
                write_file(
                    &image_dir.join(format!("{name}.png")),
                    &heatmap::heatmap_png(plane.view(), scale, s.outlier_perc)?,
                )?;
                write_file(
                    &image_dir.join(format!("{name}_overlay.png")),
                    &heatmap::overlay_png(&shown, plane.view(), scale, s.outlier_perc)?,
                )?;
                outputs.insert(
                    name.to_owned(),
                    MethodOutput {
                        npy: format!("{id}/{name}.npy"),
                        shape: [c, h, w],
                        heatmap: format!("{id}/{name}.png"),
                        overlay: format!("{id}/{name}_overlay.png"),
                        seconds,
                        completeness: attr.completeness,
                        surrogate: attr.surrogate,
                    },
                );
            }
            report.images.push(ExplainedImage {
                index,
                path: path.clone(),
                id: id.clone(),
                label: label.clone(),
                input: format!("{id}/input.png"),
                target: pred.target,
                target_class: classes[pred.target].clone(),
                target_probability: pred.probabilities[pred.target],
                predicted: pred.predicted,
                predicted_class: classes[pred.predicted].clone(),
                top5: pred
                    .top_k(5)
                    .into_iter()
                    .map(|(index, probability)| ClassProbability {
                        index,
                        class: classes[index].clone(),
                        probability,
                    })
                    .collect(),
                methods: outputs,
            });
            // Rewritten after every image: a run that stops part-way leaves a valid record.
            write_json(&json_path, &report)?;
            progress(Event::Advance {
                done: done + 1,
                item: &format!(
                    "{} (predicted {}) in {:.2} s",
                    path.display(),
                    classes[pred.predicted],
                    started.elapsed().as_secs_f64()
                ),
            });
        }
        progress(Event::StageEnd);
        if report.images.is_empty() && s.shard.is_none() {
            return Err(input(&s.input, "no image could be explained"));
        }
        write_json(&json_path, &report)?;
        Ok(())
    })?;
    progress(Event::Info(format!(
        "explained {} image(s) with {} → {}",
        report.images.len(),
        report
            .methods
            .iter()
            .map(|m| m.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        s.out.join("explain.json").display()
    )));
    Ok(report)
}
