//! What jobs read: checkpoints (with the model they describe), preprocessing, images.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use finelens_data::transforms::load_rgb;
use finelens_data::{Inputs, OnBadImage, Preprocess};
use finelens_models::checkpoint::{self, Checkpoint, Metadata};
use finelens_models::{
    Arch, Classifier, ModelConfig, ModelDescription, ParamSpec, ParamStore, ResNet,
};
use serde::{Deserialize, Serialize};

use crate::error::{input, settings, Result};
use crate::progress::{Event, Progress};

/// What a job needs to know about a model besides its weights (finelens checkpoints record it
/// in their metadata; a [`ModelFamily`] says it itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelInfo {
    pub arch: String,
    pub classes: Vec<String>,
    pub input_size: usize,
    /// Share of the resized image the evaluation crop keeps.
    pub crop_pct: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl From<&Metadata> for ModelInfo {
    fn from(m: &Metadata) -> Self {
        Self {
            arch: m.arch.name().into(),
            classes: m.class_names.clone(),
            input_size: m.input_size,
            crop_pct: m.crop_pct,
            mean: m.mean,
            std: m.std,
        }
    }
}

/// A kind of model the jobs can load from a safetensors file besides finelens's own: any
/// [`Classifier`] with parameter specs. The ResNets need none (their checkpoints describe
/// themselves); a new family implements this and every analysis job takes it unchanged.
pub trait ModelFamily: Send + Sync + std::fmt::Debug {
    fn info(&self) -> ModelInfo;
    /// Names, shapes and initialisation of every tensor: a file is checked against them, and the
    /// sanity checks re-initialise from them.
    fn param_specs(&self) -> Vec<ParamSpec>;
    fn build(&self, store: &ParamStore) -> finelens_models::Result<Box<dyn Classifier>>;
}

/// A model file, and how to read it: a finelens or torchvision checkpoint (its architecture
/// given when the file records none), or a file of another [`ModelFamily`].
#[derive(Debug, Clone)]
pub struct ModelSource {
    pub path: PathBuf,
    pub arch: Option<Arch>,
    pub family: Option<Arc<dyn ModelFamily>>,
}

impl ModelSource {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            arch: None,
            family: None,
        }
    }

    pub fn of_family(path: impl Into<PathBuf>, family: Arc<dyn ModelFamily>) -> Self {
        Self {
            family: Some(family),
            ..Self::new(path)
        }
    }

    /// The file as a finelens checkpoint (what training and fine-tuning take).
    pub fn checkpoint(&self) -> Result<Checkpoint> {
        if self.family.is_some() {
            return Err(input(
                &self.path,
                "training takes finelens or torchvision checkpoints, not another model family",
            ));
        }
        Ok(checkpoint::load(&self.path, self.arch)?)
    }

    /// How a family without finelens metadata describes itself (weight drift reads the files,
    /// not the model); `None` for finelens checkpoints, whose metadata says it.
    pub fn description(&self) -> Result<Option<ModelDescription>> {
        match &self.family {
            None => Ok(None),
            Some(f) => Ok(Some(
                f.build(&ParamStore::init(&f.param_specs(), 0, &Device::Cpu)?)?
                    .describe(),
            )),
        }
    }

    /// The model, for analysis.
    pub fn load(&self) -> Result<LoadedModel> {
        match &self.family {
            None => Ok(self.checkpoint()?.into()),
            Some(f) => {
                let (tensors, sha256) = checkpoint::read_tensors(&self.path)?;
                let info = f.info();
                let specs = f.param_specs();
                let store = ParamStore::from_tensors(&specs, tensors, &self.path, &info.arch)?;
                Ok(LoadedModel {
                    path: self.path.clone(),
                    sha256,
                    store,
                    info,
                    meta: None,
                    specs,
                    family: Family::Custom(f.clone()),
                })
            }
        }
    }
}

#[derive(Debug, Clone)]
enum Family {
    ResNet(ModelConfig),
    Custom(Arc<dyn ModelFamily>),
}

/// A loaded model file: weights, what it is, and how to build its `Classifier`.
pub struct LoadedModel {
    pub path: PathBuf,
    pub sha256: String,
    pub store: ParamStore,
    pub info: ModelInfo,
    /// finelens metadata (lineage, head, training record), for a finelens checkpoint.
    pub meta: Option<Metadata>,
    specs: Vec<ParamSpec>,
    family: Family,
}

impl From<Checkpoint> for LoadedModel {
    fn from(ck: Checkpoint) -> Self {
        let config = ck
            .config()
            .expect("a loaded checkpoint's metadata is valid");
        Self {
            info: (&ck.meta).into(),
            specs: config.param_specs(),
            path: ck.path,
            sha256: ck.sha256,
            store: ck.store,
            meta: Some(ck.meta),
            family: Family::ResNet(config),
        }
    }
}

impl LoadedModel {
    /// The model over `store` (these weights, or others of the same specs).
    pub fn build(&self, store: &ParamStore) -> Result<Box<dyn Classifier>> {
        Ok(match &self.family {
            Family::ResNet(config) => Box::new(ResNet::new(*config, store)?),
            Family::Custom(f) => f.build(store)?,
        })
    }

    pub fn param_specs(&self) -> &[ParamSpec] {
        &self.specs
    }

    /// The model for analysis: every tensor detached (explaining differentiates the input only).
    pub fn analysed(&self) -> Result<Analysed> {
        let store = self.store.frozen_as(DType::F32)?;
        let model = self.build(&store)?;
        Ok(Analysed { store, model })
    }
}

/// A model with its detached weights.
pub struct Analysed {
    pub store: ParamStore,
    pub model: Box<dyn Classifier>,
}

/// How images become model inputs, overriding what the checkpoint records (or, for a bare
/// checkpoint, the defaults: the architecture's input size, torchvision's crop of 0.875 and
/// ImageNet's mean and std).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct PreprocessSettings {
    /// Input side in pixels.
    #[cfg_attr(feature = "cli", arg(long))]
    pub input_size: Option<usize>,
    /// Share of the resized image the centre crop keeps: the shorter side is resized to
    /// input-size / crop-pct (torchvision's 0.875). 1 resizes the shorter side to the input
    /// size exactly, so an image already at that size is used as it is.
    #[cfg_attr(feature = "cli", arg(long))]
    pub crop_pct: Option<f32>,
    /// Normalisation mean, three comma-separated values.
    #[cfg_attr(feature = "cli", arg(long, value_parser = three_floats))]
    pub mean: Option<[f32; 3]>,
    /// Normalisation std, three comma-separated values.
    #[cfg_attr(feature = "cli", arg(long, value_parser = three_floats))]
    pub std: Option<[f32; 3]>,
}

/// `a,b,c` as three numbers (a mean or std per channel).
#[cfg(feature = "cli")]
fn three_floats(s: &str) -> std::result::Result<[f32; 3], String> {
    let v: Vec<f32> = s
        .split(',')
        .map(|x| x.trim().parse::<f32>())
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| format!("expected three comma-separated numbers: {e}"))?;
    <[f32; 3]>::try_from(v.as_slice())
        .map_err(|_| format!("expected three comma-separated numbers, got {}", v.len()))
}

impl PreprocessSettings {
    /// The preprocessing in force for this model.
    pub fn resolve(&self, info: &ModelInfo) -> Result<Preprocess> {
        let pre = Preprocess {
            size: self.input_size.unwrap_or(info.input_size),
            crop_pct: self.crop_pct.unwrap_or(info.crop_pct),
            mean: self.mean.unwrap_or(info.mean),
            std: self.std.unwrap_or(info.std),
        };
        pre.check()?;
        Ok(pre)
    }

    /// Record these overrides in checkpoint metadata (what a fine-tuned model was trained with).
    pub fn apply(&self, meta: &mut Metadata) -> Result<()> {
        let pre = self.resolve(&ModelInfo::from(&*meta))?;
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
        tokens: None,
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
