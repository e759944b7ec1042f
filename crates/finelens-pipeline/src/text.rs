//! Text jobs: fine-tune a BERT-family model folder on a labelled text set. The output folder is
//! itself a Hugging Face model folder — `model.safetensors` with Hugging Face's names (and
//! finelens's record in its header), `config.json`, the tokenizer — beside `metrics.json` and
//! `curves.png`, so transformers loads it unchanged (`BertForSequenceClassification` for the
//! `cls` head; the encoder as `BertModel` for the others).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use finelens_data::text::{Columns, TextSample, TextSet, TextTokenizer};
use finelens_models::bert::{read_hf_folder, Bert, BertSpec, HfFolder, TextHead, WEIGHTS_FILE};
use finelens_models::checkpoint::save_state;
use finelens_models::ParamStore;
use finelens_tune::text::{
    evaluate_text, run_text, TextData, TextEvent, TextFinetuneJob, TextFreeze, TokenizedSample,
};
use finelens_tune::{TrainConfig, TrainingRecord};
use serde::{Deserialize, Serialize};

use crate::error::{input, settings, Context, Result};
use crate::output::{create_dir, write_file};
use crate::progress::{Event, Progress};
use crate::train::{write_metrics, EvaluationReport, MetricsReport};

/// Texts are cut at this many tokens unless told otherwise.
pub const DEFAULT_MAX_LENGTH: usize = 128;

/// The safetensors header key of finelens's record in a text model folder.
/// Not the image checkpoints' `finelens` key: tools that read a checkpoint's metadata (weight
/// drift) must not mistake a text record for an image model's.
pub const TEXT_RECORD_KEY: &str = "finelens-text";

/// Where folders written before 2 December 2026 kept the record.
const LEGACY_TEXT_RECORD_KEY: &str = "finelens";

/// How texts are read: their columns and the maximum length in tokens.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TextReading {
    /// Text models: the text column (CSV/TSV header) or field (JSONL).
    #[cfg_attr(feature = "cli", arg(long, default_value = "text"))]
    pub text_column: String,
    /// Text models: the label column or field.
    #[cfg_attr(feature = "cli", arg(long, default_value = "label"))]
    pub label_column: String,
    /// Text models: tokens per text, [CLS] and [SEP] included (default 128, or the length a
    /// fine-tuned model was trained with); longer texts are cut and counted.
    #[cfg_attr(feature = "cli", arg(long))]
    pub max_length: Option<usize>,
}

impl Default for TextReading {
    fn default() -> Self {
        TextReading {
            text_column: "text".into(),
            label_column: "label".into(),
            max_length: None,
        }
    }
}

impl TextReading {
    fn columns(&self) -> Columns {
        Columns {
            text: self.text_column.clone(),
            label: self.label_column.clone(),
        }
    }
}

/// What `finelens finetune` does with a text model folder.
#[derive(Debug, Clone)]
pub struct TextFinetuneSettings {
    /// A Hugging Face model folder (`config.json`, `model.safetensors`, `tokenizer.json`).
    pub model: PathBuf,
    /// A text set (`.csv`, `.tsv`, `.jsonl`, or a folder per class).
    pub train: PathBuf,
    pub val: Option<PathBuf>,
    pub val_fraction: f64,
    pub reading: TextReading,
    /// A new head; `None` keeps the folder's classifier (its classes must be the data's).
    pub head: Option<TextHead>,
    /// `none`, `head-only`, `embeddings`, `encoder.layer.A-B`, `last:N` or globs.
    pub freeze: String,
    pub lp_epochs: usize,
    pub config: TrainConfig,
    /// The model folder written, with `last.safetensors` (the resumable state) beside it.
    pub out: PathBuf,
    /// Continue an interrupted run from `out/last.safetensors`.
    pub resume: bool,
}

/// finelens's record in a text model's `model.safetensors` header.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextModelRecord {
    pub spec: BertSpec,
    pub classes: Vec<String>,
    pub max_length: usize,
    pub parent_sha256: String,
    pub training: TrainingRecord,
}

/// Tokenize a set; the number of texts cut at the maximum length.
fn tokenize(samples: &[TextSample], tok: &TextTokenizer) -> Result<(Vec<TokenizedSample>, usize)> {
    let mut cut = 0;
    let samples = samples
        .iter()
        .map(|s| {
            let e = tok.encode(&s.text)?;
            cut += usize::from(e.truncated);
            Ok(TokenizedSample {
                ids: e.ids,
                type_ids: e.type_ids,
                label: s.label,
            })
        })
        .collect::<Result<_>>()?;
    Ok((samples, cut))
}

fn read_set(
    path: &Path,
    reading: &TextReading,
    classes: Option<&[String]>,
    progress: Progress,
) -> Result<TextSet> {
    let set = TextSet::read(path, &reading.columns(), classes)?;
    for (at, why) in &set.skipped {
        progress(Event::Warning(format!("warning: skipping {at}: {why}")));
    }
    Ok(set)
}

/// Write the model folder: weights with Hugging Face's names and finelens's record, the
/// source's `config.json` made a classifier's, and the tokenizer files.
fn write_model_folder(
    dir: &Path,
    source: &Path,
    store: &ParamStore,
    record: &TextModelRecord,
) -> Result<()> {
    let tensors: Vec<(String, candle_core::Tensor)> =
        store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect();
    let header = HashMap::from([
        // transformers refuses safetensors weights without this.
        ("format".to_owned(), "pt".to_owned()),
        (
            TEXT_RECORD_KEY.to_owned(),
            serde_json::to_string(record).expect("plain data serialises"),
        ),
    ]);
    save_state(&dir.join(WEIGHTS_FILE), tensors, header)?;
    let config_path = source.join("config.json");
    let text =
        std::fs::read_to_string(&config_path).map_err(|e| input(&config_path, e.to_string()))?;
    let mut config: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(&text).map_err(|e| input(&config_path, e.to_string()))?;
    let arch = if record.spec.head == TextHead::Cls {
        "BertForSequenceClassification"
    } else {
        "BertModel"
    };
    config.insert("architectures".into(), serde_json::json!([arch]));
    let id2label: serde_json::Map<String, serde_json::Value> = record
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (i.to_string(), c.clone().into()))
        .collect();
    let label2id: serde_json::Map<String, serde_json::Value> = record
        .classes
        .iter()
        .enumerate()
        .map(|(i, c)| (c.clone(), i.into()))
        .collect();
    config.insert("id2label".into(), id2label.into());
    config.insert("label2id".into(), label2id.into());
    config.insert("finelens_head".into(), record.spec.head.to_string().into());
    write_file(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&config)
            .expect("JSON serialises")
            .as_bytes(),
    )?;
    for name in [
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "vocab.txt",
    ] {
        let from = source.join(name);
        if from.is_file() {
            let bytes = std::fs::read(&from).map_err(|e| input(&from, e.to_string()))?;
            write_file(&dir.join(name), &bytes)?;
        }
    }
    Ok(())
}

/// Fine-tune a text model folder; writes the model folder, `metrics.json` and `curves.png`.
pub fn finetune_text(s: &TextFinetuneSettings, progress: Progress) -> Result<MetricsReport> {
    s.config.check()?;
    let max_length = s.reading.max_length.unwrap_or(DEFAULT_MAX_LENGTH);
    let freeze = TextFreeze::parse(&s.freeze)?;
    let folder = read_hf_folder(&s.model)?;
    let max_positions = folder.config.max_position_embeddings;
    if !(2..=max_positions).contains(&max_length) {
        return Err(settings(format!(
            "max length {max_length} must be between 2 and the model's {max_positions} positions"
        )));
    }
    let tok_path = s.model.join("tokenizer.json");
    let tok = TextTokenizer::from_file(&tok_path, max_length)?;
    if tok.vocab_size() > folder.config.vocab_size {
        return Err(input(
            &tok_path,
            format!(
                "the tokenizer has {} ids but the model's vocabulary {}",
                tok.vocab_size(),
                folder.config.vocab_size
            ),
        ));
    }
    let train_set = read_set(&s.train, &s.reading, None, progress)?;
    let classes = train_set.classes.clone();
    let (train, val) = match &s.val {
        Some(v) => {
            let val_set = read_set(v, &s.reading, Some(&classes), progress)?;
            (train_set.samples.clone(), val_set.samples)
        }
        None => train_set.split(s.val_fraction, s.config.seed)?,
    };
    let (train, cut_train) = tokenize(&train, &tok)?;
    let (val, cut_val) = tokenize(&val, &tok)?;
    if cut_train + cut_val > 0 {
        progress(Event::Info(format!(
            "{} of {} texts were longer than {max_length} tokens and were cut",
            cut_train + cut_val,
            train.len() + val.len(),
        )));
    }
    let (spec, store) = match s.head {
        Some(head) => folder.store(head, classes.len(), s.config.seed)?,
        None => {
            let m = text_model_of(&folder)?;
            if m.classes != classes {
                return Err(settings(format!(
                    "the data has classes [{}] but the model's classifier has [{}]; pass --head cls, mean or mlp:N to replace it",
                    classes.join(", "),
                    m.classes.join(", ")
                )));
            }
            (m.spec, m.store)
        }
    };
    let head = spec.head;
    create_dir(&s.out)?;
    let parent_sha256 = folder.sha256.clone();
    let pad_id = folder.config.pad_token_id;
    let job = TextFinetuneJob {
        spec: spec.clone(),
        store,
        freeze,
        freeze_spec: s.freeze.clone(),
        lp_epochs: s.lp_epochs,
        config: s.config.clone(),
        data: TextData {
            train: &train,
            val: &val,
            class_names: &classes,
            pad_id,
        },
        parent: s.model.clone(),
        parent_sha256: parent_sha256.clone(),
        state: &s.out.join(crate::train::STATE_FILE),
        resume: s.resume,
    };
    let outcome = run_text(
        job,
        &mut |store, training| {
            let record = TextModelRecord {
                spec: spec.clone(),
                classes: classes.clone(),
                max_length,
                parent_sha256: parent_sha256.clone(),
                training: training.clone(),
            };
            write_model_folder(&s.out, &s.model, store, &record)
                .map_err(|e| finelens_tune::TuneError::Config(e.to_string()))
        },
        &mut |e| match e {
            TextEvent::Phase {
                name,
                epochs,
                frozen,
                weights,
            } => progress(Event::Info(format!(
                "{name}: bert ({} layers, hidden {}, head {head}) from {}, {epochs} epochs on {} texts, validating on {}, {} classes; {frozen} of {weights} parameter tensors frozen",
                spec.config.num_hidden_layers,
                spec.config.hidden_size,
                s.model.display(),
                train.len(),
                val.len(),
                classes.len(),
            ))),
            TextEvent::Progress(p) => progress(Event::Train(p)),
        },
    )
    .context(s.train.display())?;
    let report = write_metrics(
        &s.out,
        &outcome.history,
        outcome.best_epoch,
        &parent_sha256,
        &s.out.join(WEIGHTS_FILE),
    )?;
    let best = &outcome.history[outcome.best_epoch];
    progress(Event::Info(format!(
        "best epoch {} of {}: validation accuracy {:.2}%, loss {:.4}\nmodel folder {}",
        outcome.best_epoch + 1,
        outcome.history.len(),
        100.0 * best.val.accuracy,
        best.val.loss,
        s.out.display(),
    )));
    Ok(report)
}

/// Whether `path` is a Hugging Face model folder (a directory with `config.json`).
pub fn is_model_folder(path: &Path) -> bool {
    path.is_dir() && path.join("config.json").is_file()
}

/// A fine-tuned text model folder, read: its spec, classes and finelens's record when it has one.
pub struct TextModel {
    pub dir: PathBuf,
    pub sha256: String,
    pub spec: BertSpec,
    pub classes: Vec<String>,
    pub store: ParamStore,
    pub record: Option<TextModelRecord>,
}

/// Read a model folder with a classifier: finelens's (its record names the head and classes)
/// or transformers' `BertForSequenceClassification` (classes from `id2label`).
pub fn load_text_model(dir: &Path) -> Result<TextModel> {
    text_model_of(&read_hf_folder(dir)?)
}

/// [`load_text_model`] of a folder already read.
fn text_model_of(folder: &HfFolder) -> Result<TextModel> {
    let dir = folder.dir.as_path();
    let weights = dir.join(WEIGHTS_FILE);
    let record: Option<TextModelRecord> = match folder
        .header
        .get(TEXT_RECORD_KEY)
        .or_else(|| folder.header.get(LEGACY_TEXT_RECORD_KEY))
    {
        Some(json) => Some(
            serde_json::from_str(json)
                .map_err(|e| input(&weights, format!("bad finelens record: {e}")))?,
        ),
        None => None,
    };
    let (head, classes) = match &record {
        Some(r) => (r.spec.head, r.classes.clone()),
        None => {
            let Some(k) = folder.classes else {
                return Err(input(
                    dir,
                    "the model has no classifier: fine-tune it first (finelens finetune)",
                ));
            };
            let config_path = dir.join("config.json");
            let text = std::fs::read_to_string(&config_path)
                .map_err(|e| input(&config_path, e.to_string()))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| input(&config_path, e.to_string()))?;
            let classes = (0..k)
                .map(|i| {
                    v["id2label"][i.to_string()]
                        .as_str()
                        .map_or_else(|| format!("LABEL_{i}"), str::to_owned)
                })
                .collect();
            (TextHead::Cls, classes)
        }
    };
    let (spec, store) = folder.store_with_head(head, classes.len())?;
    Ok(TextModel {
        dir: dir.to_owned(),
        sha256: folder.sha256.clone(),
        spec,
        classes,
        store,
        record,
    })
}

/// What `finelens eval` does with a text model folder.
#[derive(Debug, Clone)]
pub struct TextEvalSettings {
    pub model: PathBuf,
    /// A text set whose labels are among the model's classes.
    pub data: PathBuf,
    pub reading: TextReading,
    pub batch_size: usize,
}

/// Evaluate a fine-tuned text model folder on a text set.
pub fn evaluate_text_model(s: &TextEvalSettings, progress: Progress) -> Result<EvaluationReport> {
    let m = load_text_model(&s.model)?;
    let max_length = s
        .reading
        .max_length
        .or(m.record.as_ref().map(|r| r.max_length))
        .unwrap_or(DEFAULT_MAX_LENGTH);
    let tok = TextTokenizer::from_file(&s.model.join("tokenizer.json"), max_length)?;
    let set = read_set(&s.data, &s.reading, Some(&m.classes), progress)?;
    let (samples, cut) = tokenize(&set.samples, &tok)?;
    if cut > 0 {
        progress(Event::Info(format!(
            "{cut} of {} texts were longer than {max_length} tokens and were cut",
            samples.len()
        )));
    }
    let model = Bert::new(m.spec.clone(), &m.store)?;
    let metrics = evaluate_text(
        &model,
        &samples,
        m.spec.config.pad_token_id,
        s.batch_size,
        &m.classes,
    )?;
    Ok(EvaluationReport {
        schema_version: <EvaluationReport as crate::output::Versioned>::SCHEMA.into(),
        checkpoint: s.model.clone(),
        sha256: m.sha256,
        data: s.data.clone(),
        metrics,
    })
}

/// What `finelens inspect` shows of a text model folder.
#[derive(Debug, Clone, Serialize)]
pub struct TextModelSummary {
    pub path: PathBuf,
    pub sha256: String,
    pub model_type: String,
    pub layers: usize,
    pub hidden_size: usize,
    pub attention_heads: usize,
    pub intermediate_size: usize,
    pub vocab_size: usize,
    pub max_positions: usize,
    /// Encoder and classifier weights (the classifier's when the folder has one).
    pub parameters: usize,
    pub tensors: usize,
    /// The classifier's classes, when the folder has one.
    pub classes: Option<Vec<String>>,
    pub head: Option<TextHead>,
    pub record: Option<TextModelRecord>,
}

pub fn inspect_text(dir: &Path) -> Result<TextModelSummary> {
    let folder = read_hf_folder(dir)?;
    let c = &folder.config;
    let (classes, head, record) = match text_model_of(&folder) {
        Ok(m) => (Some(m.classes), Some(m.spec.head), m.record),
        Err(_) if folder.classes.is_none() => (None, None, None),
        Err(e) => return Err(e),
    };
    Ok(TextModelSummary {
        path: dir.to_owned(),
        sha256: folder.sha256.clone(),
        model_type: c.model_type.clone(),
        layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        attention_heads: c.num_attention_heads,
        intermediate_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions: c.max_position_embeddings,
        parameters: folder.tensors.values().map(|t| t.elem_count()).sum(),
        tensors: folder.tensors.len(),
        classes,
        head,
        record,
    })
}

impl std::fmt::Display for TextModelSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "model folder {}", self.path.display())?;
        writeln!(f, "sha256       {} (model.safetensors)", self.sha256)?;
        writeln!(
            f,
            "arch         {} ({} layers, hidden {}, {} heads, feed-forward {})",
            self.model_type,
            self.layers,
            self.hidden_size,
            self.attention_heads,
            self.intermediate_size
        )?;
        writeln!(
            f,
            "vocabulary   {} ids, {} positions",
            self.vocab_size, self.max_positions
        )?;
        writeln!(
            f,
            "parameters   {} in {} tensors",
            self.parameters, self.tensors
        )?;
        match (&self.classes, &self.head) {
            (Some(c), Some(h)) => write!(
                f,
                "classifier   head {h}, {} classes: {}",
                c.len(),
                c.join(", ")
            )?,
            _ => write!(f, "classifier   none (an encoder: fine-tune it to add one)")?,
        }
        if let Some(r) = &self.record {
            write!(
                f,
                "\nfine-tuned   from {} (sha256), max length {}, best epoch {}",
                &r.parent_sha256[..12.min(r.parent_sha256.len())],
                r.max_length,
                r.training
                    .best_epoch
                    .map_or("?".into(), |e| (e + 1).to_string())
            )?;
        }
        Ok(())
    }
}
