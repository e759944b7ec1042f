//! What jobs read: checkpoints (with the model they describe), preprocessing, images.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, OnBadImage, Preprocess};
use finelens_models::checkpoint::{self, Checkpoint, Metadata};
use finelens_models::{Arch, Classifier, ParamStore, ResNet};
use serde::{Deserialize, Serialize};

use crate::error::{settings, Result};
use crate::progress::{Event, Progress};

/// A checkpoint, and its architecture when the file records none (a bare torchvision state
/// dict).
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub path: PathBuf,
    pub arch: Option<Arch>,
}

impl ModelSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            arch: None,
        }
    }

    pub fn load(&self) -> Result<Checkpoint> {
        Ok(checkpoint::load(&self.path, self.arch)?)
    }
}

/// The model a checkpoint describes, built over `store`. The one place that maps a checkpoint's
/// architecture to its `Classifier`.
pub fn build_model(ck: &Checkpoint, store: &ParamStore) -> Result<Box<dyn Classifier>> {
    Ok(Box::new(ResNet::new(ck.config()?, store)?))
}

/// A model for analysis: every tensor detached (explaining differentiates the input only).
pub struct Analysed {
    pub store: ParamStore,
    pub model: Box<dyn Classifier>,
}

impl Analysed {
    pub fn new(ck: &Checkpoint) -> Result<Self> {
        let store = ck.store.frozen_as(DType::F32)?;
        let model = build_model(ck, &store)?;
        Ok(Self { store, model })
    }
}

/// How images become model inputs, overriding what the checkpoint records (or, for a bare
/// checkpoint, the defaults: the architecture's input size, torchvision's crop of 0.875 and
/// ImageNet's mean and std).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PreprocessSettings {
    pub input_size: Option<usize>,
    /// Share of the resized image the centre crop keeps: the shorter side is resized to
    /// `input_size / crop_pct`. 1 resizes the shorter side to the input size exactly (an image
    /// already at that size is used as it is).
    pub crop_pct: Option<f32>,
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
}

impl PreprocessSettings {
    /// The preprocessing in force for a model with this metadata.
    pub fn resolve(&self, meta: &Metadata) -> Result<Preprocess> {
        let pre = Preprocess {
            size: self.input_size.unwrap_or(meta.input_size),
            crop_pct: self.crop_pct.unwrap_or(meta.crop_pct),
            mean: self.mean.unwrap_or(meta.mean),
            std: self.std.unwrap_or(meta.std),
        };
        pre.check()?;
        Ok(pre)
    }

    /// Record these overrides in checkpoint metadata (what a fine-tuned model was trained with).
    pub fn apply(&self, meta: &mut Metadata) -> Result<()> {
        let pre = self.resolve(meta)?;
        meta.input_size = pre.size;
        meta.crop_pct = pre.crop_pct;
        meta.mean = pre.mean;
        meta.std = pre.std;
        Ok(())
    }
}

/// The preprocessing a result was computed with, as `explain.json` and `report.json` record it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PreprocessRecord {
    pub input_size: usize,
    pub crop_pct: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl From<&Preprocess> for PreprocessRecord {
    fn from(p: &Preprocess) -> Self {
        Self {
            input_size: p.size,
            crop_pct: p.crop_pct,
            mean: p.mean,
            std: p.std,
        }
    }
}

pub fn on_bad(strict: bool) -> OnBadImage {
    if strict {
        OnBadImage::Fail
    } else {
        OnBadImage::Skip
    }
}

/// The images under `path` (a file, a folder, an ImageFolder), skipped files reported.
pub fn discover(
    path: &Path,
    strict: bool,
    limit: Option<usize>,
    progress: Progress,
) -> Result<Inputs> {
    let inputs = Inputs::discover(path, on_bad(strict), limit)?;
    for (p, why) in &inputs.skipped {
        progress(Event::Warning(format!(
            "warning: skipping {}: {why}",
            p.display()
        )));
    }
    Ok(inputs)
}

/// An image as the model sees it: the preprocessed picture and its 1×3×H×W normalised tensor.
pub fn model_input(pre: &Preprocess, img: &image::RgbImage) -> Result<(image::RgbImage, Tensor)> {
    let shown = pre.eval_image(img);
    let x = Tensor::from_vec(
        pre.normalise(&shown),
        (1, 3, pre.size, pre.size),
        &Device::Cpu,
    )?;
    Ok((shown, x))
}

/// Read and preprocess one image; `Ok(None)` when it cannot be decoded and `strict` is off
/// (reported as a warning).
pub fn read_image(
    path: &Path,
    pre: &Preprocess,
    strict: bool,
    progress: Progress,
) -> Result<Option<(image::RgbImage, Tensor)>> {
    match load_rgb(path) {
        Ok(img) => Ok(Some(model_input(pre, &img)?)),
        Err(e) if !strict => {
            progress(Event::Warning(format!("warning: skipping {e}")));
            Ok(None)
        }
        Err(e) => Err(e.into()),
    }
}

/// A file-name-safe id for an image, from its path under the input root.
pub fn image_id(path: &Path, root: &Path) -> String {
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

/// Build methods from their specs for this model's inputs (image baselines are read through the
/// same preprocessing).
pub fn build_methods(
    specs: &[finelens_attrib::MethodSpec],
    shared: &finelens_attrib::MethodOptions,
    pre: &Preprocess,
) -> Result<Vec<Box<dyn finelens_attrib::Attributor>>> {
    let load = image_loader(pre);
    let ctx = build_context(pre, &load);
    specs
        .iter()
        .map(|s| {
            let spec = finelens_attrib::MethodSpec {
                method: s.method,
                options: s.options.or(shared),
            };
            Ok(finelens_attrib::registry::build(&spec, &ctx)?)
        })
        .collect()
}

/// Reads `image:PATH` baselines through the model's preprocessing.
pub fn image_loader(pre: &Preprocess) -> impl Fn(&Path) -> finelens_attrib::Result<Tensor> + '_ {
    move |p: &Path| {
        let img = load_rgb(p).map_err(|e| finelens_attrib::AttribError::Settings {
            method: "baseline",
            reason: e.to_string(),
        })?;
        let v = pre.normalise(&pre.eval_image(&img));
        Ok(Tensor::from_vec(
            v,
            (1, 3, pre.size, pre.size),
            &Device::Cpu,
        )?)
    }
}

/// What the method registry needs to know about this model's inputs.
pub fn build_context<'a>(
    pre: &Preprocess,
    load: &'a dyn Fn(&Path) -> finelens_attrib::Result<Tensor>,
) -> finelens_attrib::BuildContext<'a> {
    finelens_attrib::BuildContext {
        normalisation: normalisation(pre),
        input: (3, pre.size, pre.size),
        load_image: load,
    }
}

pub fn normalisation(pre: &Preprocess) -> finelens_attrib::Normalisation {
    finelens_attrib::Normalisation {
        mean: pre.mean,
        std: pre.std,
    }
}

/// Refuse a share outside (0, 1].
pub(crate) fn check_fraction(what: &str, v: f64) -> Result<()> {
    if v > 0.0 && v <= 1.0 {
        Ok(())
    } else {
        Err(settings(format!("{what} must be in (0, 1], got {v}")))
    }
}

/// What `finelens inspect` reports about a checkpoint.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CheckpointSummary {
    pub path: PathBuf,
    pub sha256: String,
    pub parameters: usize,
    pub tensors: usize,
    /// False when the metadata was inferred (a bare state dict).
    pub metadata_recorded: bool,
    pub metadata: Metadata,
}

impl CheckpointSummary {
    pub fn of(ck: &Checkpoint) -> Self {
        Self {
            path: ck.path.clone(),
            sha256: ck.sha256.clone(),
            parameters: ck.store.num_weights(),
            tensors: ck.store.names().count(),
            metadata_recorded: ck.meta_recorded,
            metadata: ck.meta.clone(),
        }
    }
}

impl std::fmt::Display for CheckpointSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let m = &self.metadata;
        writeln!(f, "checkpoint   {}", self.path.display())?;
        writeln!(f, "sha256       {}", self.sha256)?;
        writeln!(f, "arch         {} (head {})", m.arch, m.head)?;
        writeln!(
            f,
            "parameters   {} in {} tensors",
            self.parameters, self.tensors
        )?;
        writeln!(
            f,
            "classes      {}: {}",
            m.num_classes,
            m.class_names.join(", ")
        )?;
        writeln!(
            f,
            "input        {0}×{0}, crop {1}, mean {2:?}, std {3:?}",
            m.input_size, m.crop_pct, m.mean, m.std
        )?;
        writeln!(
            f,
            "parent       {}",
            m.parent_sha256.as_deref().unwrap_or("none")
        )?;
        write!(
            f,
            "seed         {}",
            m.seed.map_or("none".into(), |s| s.to_string())
        )?;
        if !self.metadata_recorded {
            write!(
                f,
                "\nmetadata     none recorded: classes, input size and normalisation are defaults"
            )?;
        }
        if let Some(t) = &m.training {
            write!(f, "\ntraining     {t}")?;
        }
        Ok(())
    }
}
