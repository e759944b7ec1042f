//! Training jobs: train from a seeded initialisation, fine-tune a checkpoint, evaluate one —
//! each with typed settings, progress events and a typed result (`metrics.json`, the
//! evaluation's JSON).

use std::path::{Path, PathBuf};

use candle_core::Device;
use finelens_data::{Augment, ImageFolder, Loader, Preprocess, Sample};
use finelens_models::checkpoint::{self, Metadata};
use finelens_models::{Arch, Head, ModelConfig, ParamStore};
use finelens_tune::{
    fit, EpochRecord, FinetuneEvent, FinetuneJob, FreezePolicy, HeadChoice, Metrics, Start,
    TrainConfig, TrainData, TrainingKind, TrainingRecord,
};
use serde::{Deserialize, Serialize};

use crate::error::{input, Context, Result};
use crate::inputs::{on_bad, LoadedModel, ModelSource, PreprocessSettings};
use crate::output::{create_dir, write_file, write_json, Versioned};

/// The resumable state a fine-tuning run writes after every epoch, in its output directory.
pub const STATE_FILE: &str = "last.safetensors";
use crate::progress::{Event, Progress};

/// Where training and validation images come from: two ImageFolders with the same classes, or
/// a seeded stratified split of one.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DataSplit {
    /// Training ImageFolder: <train>/<class>/<image>.
    #[cfg_attr(feature = "cli", arg(long))]
    pub train: PathBuf,
    /// Validation ImageFolder; without it, val-fraction of the training folder is held out
    /// (stratified, seeded).
    #[cfg_attr(feature = "cli", arg(long))]
    pub val: Option<PathBuf>,
    /// Share of each class held out for validation when no validation folder is given.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.2))]
    pub val_fraction: f64,
}

/// Class names, training samples, validation samples.
pub type Samples = (Vec<String>, Vec<Sample>, Vec<Sample>);

fn open_folder(root: &Path, strict: bool, progress: Progress) -> Result<ImageFolder> {
    let f = ImageFolder::open(root, on_bad(strict))?;
    for (p, why) in &f.skipped {
        progress(Event::Warning(format!(
            "warning: skipping {}: {why}",
            p.display()
        )));
    }
    Ok(f)
}

impl DataSplit {
    pub fn load(&self, seed: u64, strict: bool, progress: Progress) -> Result<Samples> {
        let tf = open_folder(&self.train, strict, progress)?;
        let (t, v) = match &self.val {
            Some(v) => {
                let vf = open_folder(v, strict, progress)?;
                if vf.classes != tf.classes {
                    return Err(input(
                        v,
                        format!(
                            "classes [{}] differ from the training folder's [{}]",
                            vf.classes.join(", "),
                            tf.classes.join(", ")
                        ),
                    ));
                }
                (tf.samples.clone(), vf.samples)
            }
            None => tf.split(self.val_fraction, seed)?,
        };
        Ok((tf.classes, t, v))
    }
}

/// How images are read for training.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct Reading {
    /// Smallest random-resized-crop area as a share of the image (torchvision: 0.08).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 0.6))]
    pub crop_scale_min: f32,
    /// Fail on an image file that cannot be decoded instead of skipping it with a warning.
    #[cfg_attr(feature = "cli", arg(long))]
    pub strict: bool,
}

fn train_loader(pre: &Preprocess, cfg: &TrainConfig, r: &Reading) -> Result<Loader> {
    let l = Loader {
        preprocess: pre.clone(),
        augment: Some(Augment {
            scale: (r.crop_scale_min, 1.0),
            ..Augment::default()
        }),
        batch_size: cfg.batch_size,
        shuffle: true,
        seed: cfg.seed,
        on_bad: on_bad(r.strict),
    };
    l.check()?;
    Ok(l)
}

fn eval_loader(pre: Preprocess, batch_size: usize, strict: bool) -> Loader {
    Loader {
        preprocess: pre,
        augment: None,
        batch_size,
        shuffle: false,
        seed: 0,
        on_bad: on_bad(strict),
    }
}

fn preprocess_of(meta: &Metadata) -> Preprocess {
    Preprocess {
        size: meta.input_size,
        crop_pct: meta.crop_pct,
        mean: meta.mean,
        std: meta.std,
    }
}

/// Loss and accuracy per epoch, train and validation, as a PNG.
pub fn training_curves(history: &[EpochRecord]) -> Result<Vec<u8>> {
    let series = |name: &str, f: &dyn Fn(&EpochRecord) -> f64| finelens_report::Series {
        name: name.into(),
        values: history.iter().map(f).collect(),
    };
    Ok(finelens_report::training_curves(
        &[
            series("train", &|r| r.train_loss),
            series("val", &|r| r.val.loss),
        ],
        &[
            series("train", &|r| r.train_accuracy),
            series("val", &|r| r.val.accuracy),
        ],
    )?)
}

/// A run's data: the split's samples and the loaders that read them (augmented for training).
struct RunData {
    classes: Vec<String>,
    train: Vec<Sample>,
    val: Vec<Sample>,
    train_loader: Loader,
    val_loader: Loader,
}

impl RunData {
    fn load(
        split: &DataSplit,
        config: &TrainConfig,
        reading: &Reading,
        pre: &Preprocess,
        progress: Progress,
    ) -> Result<Self> {
        let (classes, train, val) = split.load(config.seed, reading.strict, progress)?;
        Ok(Self {
            classes,
            train,
            val,
            train_loader: train_loader(pre, config, reading)?,
            val_loader: eval_loader(pre.clone(), config.batch_size, reading.strict),
        })
    }

    fn data(&self) -> TrainData<'_> {
        TrainData {
            train: &self.train,
            val: &self.val,
            train_loader: &self.train_loader,
            eval_loader: &self.val_loader,
            class_names: &self.classes,
            device: &Device::Cpu,
        }
    }
}

/// What `finelens train` does: a model from a seeded initialisation.
#[derive(Debug, Clone)]
pub struct TrainSettings {
    pub split: DataSplit,
    pub arch: Arch,
    pub head: Head,
    /// Input side (default: the architecture's).
    pub input_size: Option<usize>,
    pub config: TrainConfig,
    pub reading: Reading,
    /// The checkpoint written.
    pub out: PathBuf,
}

/// A trained checkpoint.
pub struct TrainOutcome {
    pub sha256: String,
    pub history: Vec<EpochRecord>,
}

pub fn train(s: &TrainSettings, progress: Progress) -> Result<TrainOutcome> {
    s.config.check()?;
    // Fail on an unwritable destination before spending minutes training.
    create_dir(
        s.out
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new(".")),
    )?;
    // Trained from scratch on these images: the whole image, ImageNet's statistics.
    let pre = Preprocess {
        size: s.input_size.unwrap_or(s.arch.default_input_size()),
        crop_pct: 1.0,
        mean: checkpoint::IMAGENET_MEAN,
        std: checkpoint::IMAGENET_STD,
    };
    let run = RunData::load(&s.split, &s.config, &s.reading, &pre, progress)?;
    let (classes, train, val) = (&run.classes, &run.train, &run.val);
    let config = ModelConfig::new(s.arch, classes.len(), s.head)?;
    let mut meta = Metadata::inferred(config);
    meta.class_names = classes.clone();
    meta.input_size = pre.size;
    meta.crop_pct = pre.crop_pct;
    meta.seed = Some(s.config.seed);
    let store = ParamStore::init(&config.param_specs(), s.config.seed, &Device::Cpu)?;
    let model = finelens_models::ResNet::new(config, &store)?;
    progress(Event::Info(format!(
        "training {} ({} parameters) on {} images, validating on {}, {} classes",
        s.arch,
        store.num_weights(),
        train.len(),
        val.len(),
        classes.len()
    )));
    let history = fit(
        &model,
        &store,
        &run.data(),
        &s.config,
        &|_| 1.0,
        Start::default(),
        &mut |p| progress(Event::Train(p)),
    )?;
    TrainingRecord {
        kind: TrainingKind::FromScratch,
        config: s.config.clone(),
        train_images: train.len(),
        val_images: val.len(),
        parent: None,
        freeze: None,
        lp_epochs: None,
        best_epoch: None,
        history: TrainingRecord::history_of(&history),
    }
    .record_in(&mut meta);
    let sha256 = checkpoint::save(&s.out, &store, &meta)?;
    progress(Event::Info(format!(
        "saved {} (sha256 {}), validation accuracy {:.2}%",
        s.out.display(),
        &sha256[..12],
        100.0 * history.last().map_or(f64::NAN, |h| h.val.accuracy)
    )));
    Ok(TrainOutcome { sha256, history })
}

/// What `finelens finetune` does.
#[derive(Debug, Clone)]
pub struct FinetuneSettings {
    pub parent: ModelSource,
    /// Overrides of the parent's preprocessing; recorded in the fine-tuned checkpoint.
    pub preprocess: PreprocessSettings,
    pub split: DataSplit,
    pub head: HeadChoice,
    /// As the user wrote it: `head-only`, `last:N`, `none`, or globs.
    pub freeze: String,
    /// LP-FT: the first epochs train the head alone.
    pub lp_epochs: usize,
    /// The recipe; `backbone_lr_mult` scales the backbone's rate.
    pub config: TrainConfig,
    pub reading: Reading,
    /// The output directory: model.safetensors, metrics.json, curves.png, last.safetensors.
    pub out: PathBuf,
    pub resume: bool,
}

/// `metrics.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetricsReport {
    pub schema_version: String,
    /// Index into `history` of the epoch `checkpoint` holds.
    pub best_epoch: usize,
    pub val: Metrics,
    pub history: Vec<EpochRecord>,
    pub parent_sha256: String,
    pub checkpoint: PathBuf,
}

impl Versioned for MetricsReport {
    const SCHEMA: &'static str = "finelens-metrics/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// Write a fine-tuning run's `metrics.json` and `curves.png` into `out`.
pub fn write_metrics(
    out: &Path,
    history: &[EpochRecord],
    best_epoch: usize,
    parent_sha256: &str,
    checkpoint: &Path,
) -> Result<MetricsReport> {
    let report = MetricsReport {
        schema_version: MetricsReport::SCHEMA.into(),
        best_epoch,
        val: history[best_epoch].val.clone(),
        history: history.to_vec(),
        parent_sha256: parent_sha256.to_owned(),
        checkpoint: checkpoint.to_owned(),
    };
    write_json(&out.join("metrics.json"), &report)?;
    write_file(&out.join("curves.png"), &training_curves(history)?)?;
    Ok(report)
}

pub fn finetune(s: &FinetuneSettings, progress: Progress) -> Result<MetricsReport> {
    let mut parent = s.parent.checkpoint()?;
    s.preprocess.apply(&mut parent.meta)?;
    let freeze = FreezePolicy::parse(&s.freeze)?;
    s.config.check()?;
    create_dir(&s.out)?;
    let run = RunData::load(
        &s.split,
        &s.config,
        &s.reading,
        &preprocess_of(&parent.meta),
        progress,
    )?;
    let (classes, train, val) = (&run.classes, &run.train, &run.val);
    let model_path = s.out.join("model.safetensors");
    let job = FinetuneJob {
        parent: &parent,
        head: s.head,
        freeze,
        lp_epochs: s.lp_epochs,
        config: s.config.clone(),
        data: run.data(),
        checkpoint: &model_path,
        freeze_spec: s.freeze.clone(),
        state: &s.out.join(STATE_FILE),
        resume: s.resume,
    };
    let outcome = finelens_tune::finetune::run(&job, &mut |e| match e {
        FinetuneEvent::Phase {
            name,
            epochs,
            frozen,
            weights,
        } => progress(Event::Info(format!(
            "{name}: {} from {} (sha256 {}), {epochs} epochs on {} images, validating on {}, {} classes; {frozen} of {weights} parameter tensors frozen",
            parent.meta.arch,
            parent.path.display(),
            &parent.sha256[..12],
            train.len(),
            val.len(),
            classes.len(),
        ))),
        FinetuneEvent::FreezesNothing => progress(Event::Warning(format!(
            "warning: the freeze policy {} matches no parameter; everything trains",
            s.freeze
        ))),
        FinetuneEvent::Progress(p) => progress(Event::Train(p)),
    })
    .context(s.split.train.display())?;
    let report = write_metrics(
        &s.out,
        &outcome.history,
        outcome.best_epoch,
        &parent.sha256,
        &model_path,
    )?;
    let best = &outcome.history[outcome.best_epoch];
    progress(Event::Info(format!(
        "best epoch {} of {}: validation accuracy {:.2}%, loss {:.4}\ncheckpoint {}\nmetrics    {}\ncurves     {}",
        outcome.best_epoch + 1,
        outcome.history.len(),
        100.0 * best.val.accuracy,
        best.val.loss,
        model_path.display(),
        s.out.join("metrics.json").display(),
        s.out.join("curves.png").display()
    )));
    Ok(report)
}

/// What `finelens eval` does.
#[derive(Debug, Clone)]
pub struct EvalSettings {
    pub model: ModelSource,
    pub preprocess: PreprocessSettings,
    /// An ImageFolder with the checkpoint's classes.
    pub data: PathBuf,
    pub batch_size: usize,
    pub strict: bool,
}

/// An evaluation, as `finelens eval --json` and the demo write it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvaluationReport {
    pub schema_version: String,
    pub checkpoint: PathBuf,
    pub sha256: String,
    pub data: PathBuf,
    #[serde(flatten)]
    pub metrics: Metrics,
}

impl Versioned for EvaluationReport {
    const SCHEMA: &'static str = "finelens-eval/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// Evaluate a loaded checkpoint on an ImageFolder whose classes must be its own.
pub fn evaluate_model(
    ck: &LoadedModel,
    s: &EvalSettings,
    progress: Progress,
) -> Result<EvaluationReport> {
    let folder = open_folder(&s.data, s.strict, progress)?;
    if folder.classes != ck.info.classes {
        return Err(input(
            &folder.root,
            format!(
                "classes [{}] do not match the checkpoint's [{}]",
                folder.classes.join(", "),
                ck.info.classes.join(", ")
            ),
        ));
    }
    let model = ck.build(&ck.store)?;
    let pre = s.preprocess.resolve(&ck.info)?;
    let loader = eval_loader(pre, s.batch_size, s.strict);
    let metrics = finelens_tune::evaluate(
        model.as_ref(),
        &folder.samples,
        &loader,
        &ck.info.classes,
        &Device::Cpu,
    )?;
    Ok(EvaluationReport {
        schema_version: EvaluationReport::SCHEMA.into(),
        checkpoint: ck.path.clone(),
        sha256: ck.sha256.clone(),
        data: s.data.clone(),
        metrics,
    })
}

pub fn evaluate(s: &EvalSettings, progress: Progress) -> Result<EvaluationReport> {
    let ck = s.model.load()?;
    evaluate_model(&ck, s, progress)
}

/// The metrics as a table, for a terminal.
pub fn metrics_table(m: &Metrics) -> String {
    let mut lines = vec![
        format!(
            "accuracy {:.2}% on {} examples, loss {:.4}",
            100.0 * m.accuracy,
            m.count,
            m.loss
        ),
        format!(
            "{:<16} {:>9} {:>9} {:>9} {:>8}",
            "class", "precision", "recall", "f1", "support"
        ),
    ];
    for c in &m.per_class {
        lines.push(format!(
            "{:<16} {:>9.3} {:>9.3} {:>9.3} {:>8}",
            c.class, c.precision, c.recall, c.f1, c.support
        ));
    }
    lines.join("\n")
}

/// Write the synthetic tasks (`all`, or one by name) under `out`; one line per task.
pub fn synthesise(
    out: &Path,
    task: &str,
    cfg: &finelens_data::SynthConfig,
    force: bool,
    progress: Progress,
) -> Result<()> {
    use finelens_data::text::{generate_text, TextSynthConfig, TextTask};
    use finelens_data::Task;
    if let Some(t) = TextTask::parse(task) {
        let text_cfg = TextSynthConfig {
            train_per_class: cfg.train_per_class,
            val_per_class: cfg.val_per_class,
            test_per_class: cfg.test_per_class,
            seed: cfg.seed,
        };
        let dir = generate_text(out, t, &text_cfg, force)?;
        progress(Event::Info(format!(
            "{}: 2 classes → {}",
            t.name(),
            dir.root.display()
        )));
        return Ok(());
    }
    let tasks = if task == "all" {
        Task::ALL.to_vec()
    } else {
        vec![Task::parse(task)?]
    };
    for task in tasks {
        let t = std::time::Instant::now();
        let dir = finelens_data::synth::generate(out, task, cfg, force)?;
        progress(Event::Info(format!(
            "{}: {} classes → {} ({:.1} s)",
            task.name(),
            task.shapes().len(),
            dir.root.display(),
            t.elapsed().as_secs_f64()
        )));
    }
    Ok(())
}
