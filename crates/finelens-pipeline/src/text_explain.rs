//! Explaining a text model folder: which tokens drove a prediction. The methods of the registry
//! attribute the logit to the word embeddings (as Captum's `LayerIntegratedGradients` on
//! `bert.embeddings.word_embeddings`; position and token-type embeddings and the embedding
//! LayerNorm come after), one text at a time. A method's T × hidden map becomes a score per token
//! — the sum over the hidden units for signed methods, their L2 norm for magnitudes (the
//! gradient norm per token for saliency) — and a score per word from the tokenizer's word ids
//! (the sum for signed methods, the largest |score| for magnitudes; special tokens are scored but
//! belong to no word). Integrated gradients' baselines for text are `pad` (Captum's BERT
//! tutorial: `[CLS] [PAD] … [SEP]`, the default), `pad-all`, `mask` and `zeros`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use finelens_attrib::attention::{self, LayerAttention, Readout};
use finelens_attrib::{
    registry, Attributor, BaselineSpec, BuildContext, Completeness, FillSpec, Method, MethodSpec,
    Normalisation, Sign, Target, TokenBaseline,
};
use finelens_data::text::{Columns, Encoded, TextSet, TextTokenizer};
use finelens_models::bert::{Bert, OnWordEmbeddings, TextHead, TokenBatch};
use finelens_models::Classifier;
use finelens_report::heatmap::{colour, outlier_threshold, Scale};
use finelens_report::html::{render, Block, Cell, Page, Span};
use serde::{Deserialize, Serialize};

use crate::error::{input, settings, Result};
use crate::explain::ExplainSettings;
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::progress::{Event, Progress};
use crate::text::{load_text_model, DEFAULT_MAX_LENGTH};

/// The explanation of one text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextExplanation {
    pub id: String,
    /// Where it came from: `file:line`, or `argument`.
    pub source: String,
    pub text: String,
    pub label: Option<String>,
    pub predicted: String,
    pub probability: f32,
    /// The class whose logit is explained.
    pub target: String,
    pub top_k: Vec<(String, f32)>,
    /// The text was longer than the maximum length and was cut.
    pub truncated: bool,
    pub tokens: Vec<TokenInfo>,
    pub words: Vec<WordInfo>,
    pub methods: BTreeMap<String, TokenScores>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenInfo {
    pub token: String,
    pub id: u32,
    /// Characters `[start, end)` of the text (special tokens: (0, 0)).
    pub start: usize,
    pub end: usize,
    /// The word it belongs to; `None` for special tokens.
    pub word: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WordInfo {
    pub text: String,
    pub start: usize,
    pub end: usize,
}

/// One method's scores for one text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TokenScores {
    pub sign: Sign,
    pub tokens: Vec<f32>,
    pub words: Vec<f32>,
    /// Integrated gradients: Σ attributions against F(x) − F(baseline).
    pub completeness: Option<Completeness>,
    /// KernelSHAP, LIME, feature ablation: the surrogate's fit and the evaluations spent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub surrogate: Option<finelens_attrib::Surrogate>,
    /// The un-summed map, tokens × hidden.
    pub npy: String,
    pub seconds: f64,
}

/// `explain.json` of a text model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextExplainReport {
    pub schema_version: String,
    pub model: PathBuf,
    pub sha256: String,
    pub classes: Vec<String>,
    pub max_length: usize,
    /// The method specs as run.
    pub methods: Vec<String>,
    pub texts: Vec<TextExplanation>,
}

impl Versioned for TextExplainReport {
    const SCHEMA: &'static str = "finelens-text-explain/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// How a method explains a text: through the registry's attribution on the word embeddings, as
/// a view of the attention, or by occluding tokens; Grad-CAM (it needs a spatial layer) does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Embeddings,
    Attention,
    Occlusion,
    None,
}

fn kind(m: Method) -> Kind {
    match m {
        Method::GradCam => Kind::None,
        m if Method::RELU_RULES.contains(&m) => Kind::None,
        Method::Occlusion => Kind::Occlusion,
        Method::Attention | Method::AttentionRollout | Method::GradAttention => Kind::Attention,
        _ => Kind::Embeddings,
    }
}

/// The texts `input` names: a `.csv`/`.tsv`/`.jsonl` set or a folder per class (labels kept; with
/// `classes`, they must be among them), a `.txt` file (one text per line), or else the argument
/// is the text itself.
pub(crate) fn read_texts(
    input: &Path,
    classes: Option<&[String]>,
    limit: Option<usize>,
) -> Result<Vec<(String, String, Option<String>)>> {
    let arg = input.to_string_lossy();
    let mut texts = if !input.exists() {
        vec![("argument".to_owned(), arg.into_owned(), None)]
    } else if input.extension().is_some_and(|e| e == "txt") {
        let text = std::fs::read_to_string(input).map_err(|e| input_err(input, e))?;
        text.lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, l)| (format!("{}:{}", input.display(), i + 1), l.to_owned(), None))
            .collect()
    } else {
        let columns = Columns {
            text: "text".into(),
            label: "label".into(),
        };
        let set = TextSet::read(input, &columns, classes)?;
        set.samples
            .into_iter()
            .map(|s| (s.source, s.text, Some(set.classes[s.label].clone())))
            .collect()
    };
    if let Some(n) = limit {
        texts.truncate(n);
    }
    if texts.is_empty() {
        return Err(input_err(input, "no text to explain"));
    }
    Ok(texts)
}

fn input_err(path: &Path, why: impl ToString) -> crate::error::PipelineError {
    input(path, why.to_string())
}

/// Per-token scores of a tokens × hidden map: Σ over hidden (signed), or the L2 norm.
fn token_scores(map: &[f32], hidden: usize, sign: Sign) -> Vec<f32> {
    map.chunks(hidden)
        .map(|row| match sign {
            Sign::Signed => row.iter().map(|&v| v as f64).sum::<f64>() as f32,
            Sign::Absolute => row.iter().map(|&v| (v as f64).powi(2)).sum::<f64>().sqrt() as f32,
        })
        .collect()
}

/// Word scores from token scores: Σ (signed) or the largest |score| (magnitudes).
fn word_scores(tokens: &[f32], word_of: &[Option<usize>], words: usize, sign: Sign) -> Vec<f32> {
    let mut out = vec![0f32; words];
    for (s, w) in tokens.iter().zip(word_of) {
        if let Some(w) = *w {
            out[w] = match sign {
                Sign::Signed => out[w] + s,
                Sign::Absolute => out[w].max(s.abs()),
            };
        }
    }
    out
}

/// The words of an encoded text (by the tokenizer's word ids), and each token's word index.
fn words_of(text: &str, e: &Encoded) -> (Vec<WordInfo>, Vec<Option<usize>>) {
    let chars: Vec<char> = text.chars().collect();
    let mut words: Vec<WordInfo> = Vec::new();
    let mut index: BTreeMap<u32, usize> = BTreeMap::new();
    let mut word_of = Vec::with_capacity(e.ids.len());
    for (w, &(start, end)) in e.word_ids.iter().zip(&e.offsets) {
        word_of.push(w.map(|w| {
            let k = *index.entry(w).or_insert_with(|| {
                words.push(WordInfo {
                    text: String::new(),
                    start,
                    end,
                });
                words.len() - 1
            });
            let word = &mut words[k];
            word.start = word.start.min(start);
            word.end = word.end.max(end);
            k
        }));
    }
    for w in &mut words {
        w.text = chars[w.start.min(chars.len())..w.end.min(chars.len())]
            .iter()
            .collect();
    }
    (words, word_of)
}

/// One tokenized text as the attribution methods see it: the classifier on its word embeddings
/// and its input, and the registry's methods built with the text's token baselines — `pad` and
/// `pad-all` fill with [PAD], `mask` with [MASK]; the special tokens (those without a word) keep
/// their ids except under `pad-all`.
pub(crate) struct TextInput<'a> {
    pub model: OnWordEmbeddings<'a>,
    pub x: Tensor,
    ids: Vec<u32>,
    word_ids: Vec<Option<u32>>,
}

impl<'a> TextInput<'a> {
    pub(crate) fn new(
        bert: &'a Bert,
        ids: &[u32],
        type_ids: &[u32],
        word_ids: &[Option<u32>],
    ) -> Result<Self> {
        let t = ids.len();
        let model = OnWordEmbeddings {
            bert,
            type_ids: Tensor::from_vec(type_ids.to_vec(), (1, t), &Device::Cpu)?,
            mask: Tensor::ones((1, t), DType::U32, &Device::Cpu)?,
        };
        let x = model.input(&Tensor::from_vec(ids.to_vec(), (1, t), &Device::Cpu)?)?;
        Ok(Self {
            model,
            x,
            ids: ids.to_vec(),
            word_ids: word_ids.to_vec(),
        })
    }

    /// The methods of `specs`, their token baselines this text's.
    pub(crate) fn methods<'s>(
        &self,
        specs: impl IntoIterator<Item = &'s MethodSpec>,
        pad: u32,
        mask_id: Option<u32>,
    ) -> Result<Vec<Box<dyn Attributor>>> {
        let t = self.ids.len();
        let baseline = |b: TokenBaseline| -> finelens_attrib::Result<Tensor> {
            let fill = match b {
                TokenBaseline::Pad | TokenBaseline::PadAll => pad,
                TokenBaseline::Mask => {
                    mask_id.ok_or_else(|| finelens_attrib::AttribError::Settings {
                        method: "baseline",
                        reason: "the tokenizer has no [MASK] token".into(),
                    })?
                }
            };
            let ids: Vec<u32> = self
                .ids
                .iter()
                .zip(&self.word_ids)
                .map(|(&id, w)| {
                    if w.is_none() && b != TokenBaseline::PadAll {
                        id
                    } else {
                        fill
                    }
                })
                .collect();
            Ok(self
                .model
                .input(&Tensor::from_vec(ids, (1, t), &Device::Cpu)?)?)
        };
        let load = |p: &Path| -> finelens_attrib::Result<Tensor> {
            Err(finelens_attrib::AttribError::Settings {
                method: "baseline",
                reason: format!("{}: image baselines do not apply to text", p.display()),
            })
        };
        let ctx = BuildContext {
            normalisation: Normalisation {
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            input: (1, t, self.x.dim(3)?),
            load_image: &load,
            tokens: Some(&baseline),
        };
        Ok(specs
            .into_iter()
            .map(|spec| registry::build(spec, &ctx))
            .collect::<finelens_attrib::Result<_>>()?)
    }
}

/// Text jobs run whole: shards split image sets (a text set is read in seconds).
pub(crate) const NOT_SHARDED: &str =
    "--shard splits image sets; a text model's explanations and audit run whole (drop --shard)";

/// Explain each text of `s.input` with `s.methods` on the text model folder `s.model`.
pub fn explain_text(s: &ExplainSettings, progress: Progress) -> Result<TextExplainReport> {
    if s.shard.is_some() {
        return Err(settings(NOT_SHARDED));
    }
    let dir = s.model.path.clone();
    let m = load_text_model(&dir)?;
    let frozen = m.store.frozen_as(DType::F32)?;
    let bert = Bert::new(m.spec.clone(), &frozen)?;
    let max_length = m
        .record
        .as_ref()
        .map_or(DEFAULT_MAX_LENGTH, |r| r.max_length);
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), max_length)?;
    let target = Target::parse(&s.target, &m.classes)?;
    let mut specs = Vec::new();
    for spec in &s.methods {
        if kind(spec.method) != Kind::None {
            specs.push(MethodSpec {
                method: spec.method,
                options: spec.options.or(&s.shared),
            });
        } else {
            progress(Event::Warning(format!(
                "warning: {} is not available for text models; skipped",
                spec.method.name()
            )));
        }
    }
    if specs.is_empty() {
        return Err(settings(
            "none of the methods applies to text (grad_cam and the ReLU-rule methods do not)",
        ));
    }
    for spec in &mut specs {
        if spec.method == Method::IntegratedGradients && spec.options.baseline.is_none() {
            spec.options.baseline = Some(BaselineSpec::Tokens(TokenBaseline::Pad));
        }
        if let Some(b) = &spec.options.baseline {
            let text_baseline =
                |b: &BaselineSpec| matches!(b, BaselineSpec::Zeros | BaselineSpec::Tokens(_));
            let ok = match b {
                BaselineSpec::Average(v) => v.iter().all(text_baseline),
                b => text_baseline(b),
            };
            if !ok {
                return Err(settings(format!(
                    "baseline `{b}` is an image baseline; text models take pad, pad-all, mask or zeros"
                )));
            }
        }
    }
    let texts = read_texts(&s.input, Some(&m.classes), s.limit)?;
    let hidden = m.spec.config.hidden_size;
    let pad = m.spec.config.pad_token_id;
    let mask_id = tok.token_id("[MASK]");
    let mut report = TextExplainReport {
        schema_version: TextExplainReport::SCHEMA.into(),
        model: dir.clone(),
        sha256: m.sha256.clone(),
        classes: m.classes.clone(),
        max_length,
        methods: specs.iter().map(|s| s.to_string()).collect(),
        texts: Vec::new(),
    };
    OutputDir::create(&s.out, s.force)?.run(|out| {
        progress(Event::Stage {
            name: "explain",
            total: texts.len(),
            unit: "texts",
        });
        for (k, (source, text, label)) in texts.iter().enumerate() {
            let e = tok.encode(text)?;
            let t = e.ids.len();
            let input = TextInput::new(&bert, &e.ids, &e.type_ids, &e.word_ids)?;
            let (model, x) = (&input.model, &input.x);
            let methods = input.methods(
                specs.iter().filter(|spec| kind(spec.method) == Kind::Embeddings),
                pad,
                mask_id,
            )?;
            let pred = finelens_attrib::predict(model, x, &target)?.remove(0);
            let id = format!("{k:03}");
            let (words, word_of) = words_of(text, &e);
            let mut scores = BTreeMap::new();
            for method in &methods {
                let started = Instant::now();
                let attr = method.attribute(model, x, &[pred.target])?.remove(0);
                let map = attr.map.as_slice().expect("standard layout").to_vec();
                let npy = format!("texts/{id}/{}.npy", method.name());
                write_file(
                    &out.join(&npy),
                    &finelens_report::npy::encode_f32(&[t, hidden], &map),
                )?;
                let tokens = token_scores(&map, hidden, method.sign());
                scores.insert(
                    method.name().to_owned(),
                    TokenScores {
                        sign: method.sign(),
                        words: word_scores(&tokens, &word_of, words.len(), method.sign()),
                        tokens,
                        completeness: attr.completeness,
                        surrogate: attr.surrogate,
                        npy,
                        seconds: started.elapsed().as_secs_f64(),
                    },
                );
            }
            let views = Views {
                model,
                x,
                ids: &e.ids,
                word_of: &word_of,
                target: pred.target,
                readout: match m.spec.head {
                    TextHead::Cls => Readout::Token(0),
                    TextHead::Mean | TextHead::Mlp(_) => Readout::Mean,
                },
            };
            let mut layers: Option<Vec<LayerAttention>> = None;
            for spec in specs.iter().filter(|s| kind(s.method) != Kind::Embeddings) {
                let started = Instant::now();
                let name = spec.method.name();
                let npy = format!("texts/{id}/{name}.npy");
                let (tokens, words_scored, sign) = if spec.method == Method::Occlusion {
                    let occluder = match (&spec.options.fill, &spec.options.baseline) {
                        (Some(FillSpec::Delete), _) => Occluder::Delete { pad },
                        (_, None | Some(BaselineSpec::Tokens(TokenBaseline::Mask))) => {
                            Occluder::Replace(mask_id.ok_or_else(|| {
                                settings("occlusion: the tokenizer has no [MASK] token")
                            })?)
                        }
                        (_, Some(BaselineSpec::Tokens(_))) => Occluder::Replace(pad),
                        (_, Some(b)) => {
                            return Err(settings(format!(
                                "occlusion of text replaces tokens with [MASK] (baseline=mask) or [PAD] (baseline=pad), or deletes them (fill=delete), not `{b}`"
                            )))
                        }
                    };
                    let (tokens, words) = views.occlusion(occluder, words.len())?;
                    write_file(
                        &out.join(&npy),
                        &finelens_report::npy::encode_f32(&[t], &tokens),
                    )?;
                    (tokens, Some(words), Sign::Signed)
                } else {
                    if layers.is_none() {
                        layers = Some(attention::attention(model, x, Some(pred.target))?);
                    }
                    let layers = layers.as_ref().expect("just computed");
                    let tokens = match spec.method {
                        Method::Attention => attention::last_layer(layers, views.readout),
                        Method::AttentionRollout => attention::rollout(layers, views.readout),
                        _ => attention::grad_rollout(layers, views.readout),
                    };
                    // Every layer's attention (layers × heads × T × T) beside the raw view.
                    let (all, shape) = if spec.method == Method::Attention {
                        let heads = layers[0].probabilities.dim().0;
                        let v: Vec<f32> = layers
                            .iter()
                            .flat_map(|l| l.probabilities.iter().copied())
                            .collect();
                        (v, vec![layers.len(), heads, t, t])
                    } else {
                        (tokens.clone(), vec![t])
                    };
                    write_file(
                        &out.join(&npy),
                        &finelens_report::npy::encode_f32(&shape, &all),
                    )?;
                    (tokens, None, Sign::Absolute)
                };
                scores.insert(
                    name.to_owned(),
                    TokenScores {
                        sign,
                        words: words_scored
                            .unwrap_or_else(|| word_scores(&tokens, &word_of, words.len(), sign)),
                        tokens,
                        completeness: None,
                        surrogate: None,
                        npy,
                        seconds: started.elapsed().as_secs_f64(),
                    },
                );
            }
            let name = |c: usize| m.classes[c].clone();
            let explained = TextExplanation {
                id: id.clone(),
                source: source.clone(),
                text: text.clone(),
                label: label.clone(),
                predicted: name(pred.predicted),
                probability: pred.probabilities[pred.predicted],
                target: name(pred.target),
                top_k: pred
                    .top_k(m.classes.len().min(5))
                    .into_iter()
                    .map(|(c, p)| (name(c), p))
                    .collect(),
                truncated: e.truncated,
                tokens: e
                    .tokens
                    .iter()
                    .zip(&e.ids)
                    .zip(&e.offsets)
                    .zip(&word_of)
                    .map(|(((token, &id), &(start, end)), &word)| TokenInfo {
                        token: token.clone(),
                        id,
                        start,
                        end,
                        word,
                    })
                    .collect(),
                words,
                methods: scores,
            };
            write_json(&out.join(format!("texts/{id}/tokens.json")), &explained)?;
            report.texts.push(explained);
            progress(Event::Advance {
                done: k + 1,
                item: &id,
            });
        }
        progress(Event::StageEnd);
        write_json(&out.join("explain.json"), &report)?;
        write_file(
            &out.join("index.html"),
            render(&page(&report, s.outlier_perc)).as_bytes(),
        )?;
        Ok(())
    })?;
    progress(Event::Info(format!(
        "explained {} text(s) with {}; {}",
        report.texts.len(),
        report.methods.join(", "),
        s.out.join("index.html").display()
    )));
    Ok(report)
}

/// What the attention views and occlusion of one text need.
struct Views<'a> {
    model: &'a OnWordEmbeddings<'a>,
    x: &'a Tensor,
    ids: &'a [u32],
    word_of: &'a [Option<usize>],
    target: usize,
    readout: Readout,
}

/// What takes an occluded token's place.
#[derive(Debug, Clone, Copy)]
enum Occluder {
    /// Another token ([MASK] or [PAD]): the text keeps its length and positions.
    Replace(u32),
    /// Nothing: the token is removed and the tokens after it move up a position (the copies
    /// of a batch are padded with `pad` and masked).
    Delete { pad: u32 },
}

/// Occluded copies per forward pass.
const OCCLUSION_BATCH: usize = 32;

impl Views<'_> {
    /// F(x) − F(x with the tokens `hide` selects occluded), for each selection.
    fn drops(&self, occluder: Occluder, hides: &[Vec<usize>]) -> Result<Vec<f32>> {
        let t = self.ids.len();
        let target = |logits: Tensor| -> Result<Vec<f32>> {
            Ok(logits
                .narrow(1, self.target, 1)?
                .flatten_all()?
                .to_dtype(DType::F32)?
                .to_vec1()?)
        };
        let full = target(self.model.forward(self.x, finelens_models::Mode::Eval)?)?[0];
        let types: Vec<u32> = self.model.type_ids.flatten_all()?.to_vec1()?;
        let mut out = Vec::with_capacity(hides.len());
        for chunk in hides.chunks(OCCLUSION_BATCH) {
            let logits = match occluder {
                Occluder::Replace(fill) => {
                    let mut ids = Vec::with_capacity(chunk.len() * t);
                    for hide in chunk {
                        let mut v = self.ids.to_vec();
                        for &i in hide {
                            v[i] = fill;
                        }
                        ids.extend(v);
                    }
                    let ids = Tensor::from_vec(ids, (chunk.len(), t), &Device::Cpu)?;
                    let x = self.model.bert.word_embeddings(&ids)?.unsqueeze(1)?;
                    self.model.forward(&x, finelens_models::Mode::Eval)?
                }
                Occluder::Delete { pad } => {
                    let kept = |v: &[u32], hide: &[usize]| -> Vec<u32> {
                        (0..t).filter(|i| !hide.contains(i)).map(|i| v[i]).collect()
                    };
                    let ids: Vec<Vec<u32>> = chunk.iter().map(|h| kept(self.ids, h)).collect();
                    let tys: Vec<Vec<u32>> = chunk.iter().map(|h| kept(&types, h)).collect();
                    let (ids, tys): (Vec<&[u32]>, Vec<&[u32]>) = (
                        ids.iter().map(Vec::as_slice).collect(),
                        tys.iter().map(Vec::as_slice).collect(),
                    );
                    let batch = TokenBatch::padded(&ids, Some(&tys), pad, &Device::Cpu)?;
                    self.model
                        .bert
                        .forward(&batch, finelens_models::Mode::Eval)?
                }
            };
            out.extend(target(logits)?.into_iter().map(|f| full - f));
        }
        Ok(out)
    }

    /// Occlusion by token (each word token occluded alone; special tokens score 0) and by
    /// word (all of a word's tokens at once).
    fn occlusion(&self, occluder: Occluder, words: usize) -> Result<(Vec<f32>, Vec<f32>)> {
        let word_tokens: Vec<usize> = (0..self.ids.len())
            .filter(|&i| self.word_of[i].is_some())
            .collect();
        let by_token = self.drops(
            occluder,
            &word_tokens.iter().map(|&i| vec![i]).collect::<Vec<_>>(),
        )?;
        let mut tokens = vec![0f32; self.ids.len()];
        for (&i, d) in word_tokens.iter().zip(by_token) {
            tokens[i] = d;
        }
        let hides: Vec<Vec<usize>> = (0..words)
            .map(|w| {
                (0..self.ids.len())
                    .filter(|&i| self.word_of[i] == Some(w))
                    .collect()
            })
            .collect();
        Ok((tokens, self.drops(occluder, &hides)?))
    }
}

/// A score with three significant digits, in scientific notation when small.
fn number(v: f32) -> String {
    if v != 0.0 && v.abs() < 0.01 {
        format!("{v:+.2e}")
    } else {
        format!("{v:+.3}")
    }
}

/// The page: per text, its prediction, then each method's tokens coloured (blue–white–red for
/// signed scores, white–red for magnitudes, clipped at the outlier percentage as the image heat
/// maps are) with the score on hover, and a table of the word scores.
fn page(r: &TextExplainReport, outlier_perc: f32) -> Page {
    Page {
        title: "finelens: token attributions".into(),
        blocks: blocks(r, outlier_perc),
    }
}

/// The page's blocks (the demo's page shows them too).
pub fn blocks(r: &TextExplainReport, outlier_perc: f32) -> Vec<Block> {
    let mut blocks = vec![Block::Paragraph(format!(
        "{} (sha256 {}), classes {}; methods {}. Gradient methods attribute to the word \
         embeddings, attention views and occlusion score tokens directly; hover a token for its \
         score.",
        r.model.display(),
        &r.sha256[..12.min(r.sha256.len())],
        r.classes.join(", "),
        r.methods.join(", ")
    ))];
    for t in &r.texts {
        blocks.push(Block::Heading(3, format!("{}: {}", t.id, t.text)));
        blocks.push(Block::Paragraph(format!(
            "predicted {} ({:.1}%){}; explained: {}{}",
            t.predicted,
            100.0 * t.probability,
            t.label
                .as_ref()
                .map(|l| format!(", label {l}"))
                .unwrap_or_default(),
            t.target,
            if t.truncated {
                "; cut at the maximum length"
            } else {
                ""
            }
        )));
        for (name, sc) in &t.methods {
            let limit = outlier_threshold(sc.tokens.iter().copied(), outlier_perc);
            let limit = if limit > 0.0 { limit } else { 1.0 };
            let mut spans = vec![Span {
                text: format!("{name}:"),
                colour: [255, 255, 255],
                title: String::new(),
            }];
            for (tok, &v) in t.tokens.iter().zip(&sc.tokens) {
                // Signed: blue–white–red. Magnitudes: the red half of the same map (white is
                // none), which reads better behind text than the image maps' viridis.
                let n = match sc.sign {
                    Sign::Signed => (v / limit).clamp(-1.0, 1.0),
                    Sign::Absolute => (v.abs() / limit).clamp(0.0, 1.0),
                };
                spans.push(Span {
                    text: tok.token.clone(),
                    colour: colour(n, Scale::Diverging),
                    title: format!("{} {}", tok.token, number(v)),
                });
            }
            blocks.push(Block::Tokens(spans));
            if let Some(c) = &sc.completeness {
                blocks.push(Block::Paragraph(format!(
                    "{name}: Σ attributions {:.4}, F(x) − F(baseline) {:.4}, δ {:.2e}",
                    c.attribution_sum, c.output_difference, c.delta
                )));
            }
        }
        // Word scores: a row per word, a column per method.
        let mut head = vec!["word".to_owned()];
        head.extend(t.methods.keys().cloned());
        let rows = t
            .words
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let mut row = vec![Cell::Text(w.text.clone())];
                row.extend(t.methods.values().map(|sc| Cell::Text(number(sc.words[i]))));
                row
            })
            .collect();
        blocks.push(Block::Table(head, rows));
    }
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    /// "Playing well": [CLS] play ##ing well [SEP] — two words, the first in two tokens.
    fn encoded() -> Encoded {
        Encoded {
            ids: vec![101, 2377, 2075, 2092, 102],
            tokens: ["[CLS]", "play", "##ing", "well", "[SEP]"]
                .map(String::from)
                .to_vec(),
            type_ids: vec![0; 5],
            offsets: vec![(0, 0), (0, 4), (4, 7), (8, 12), (0, 0)],
            word_ids: vec![None, Some(0), Some(0), Some(1), None],
            truncated: false,
        }
    }

    #[test]
    fn sub_word_tokens_aggregate_into_words() {
        let (words, word_of) = words_of("Playing well", &encoded());
        assert_eq!(
            words
                .iter()
                .map(|w| (w.text.as_str(), w.start, w.end))
                .collect::<Vec<_>>(),
            [("Playing", 0, 7), ("well", 8, 12)]
        );
        assert_eq!(word_of, [None, Some(0), Some(0), Some(1), None]);
        // Signed: a word is the sum of its tokens; special tokens belong to no word.
        let tokens = [5.0, 1.0, -3.0, 0.5, 7.0];
        assert_eq!(word_scores(&tokens, &word_of, 2, Sign::Signed), [-2.0, 0.5]);
        // Magnitudes: the largest |score| of its tokens.
        assert_eq!(
            word_scores(&tokens, &word_of, 2, Sign::Absolute),
            [3.0, 0.5]
        );
    }

    /// Occlusion by deletion, batched and padded, gives each token's and each word's
    /// F(x) − F(x without them) as the shorter text alone would; replacement keeps the length.
    #[test]
    fn occlusion_by_deletion_is_the_logit_of_the_shorter_text() {
        use finelens_models::bert::{BertConfig, BertSpec};
        use finelens_models::{Mode, ParamStore};
        for head in [TextHead::Cls, TextHead::Mean] {
            let spec = BertSpec {
                config: BertConfig {
                    vocab_size: 40,
                    hidden_size: 8,
                    num_hidden_layers: 2,
                    num_attention_heads: 2,
                    intermediate_size: 16,
                    max_position_embeddings: 16,
                    initializer_range: 0.5,
                    ..BertConfig::all_minilm_l6()
                },
                classes: 3,
                head,
            };
            let store = ParamStore::init(&spec.param_specs(), 11, &Device::Cpu).unwrap();
            let bert = Bert::new(spec, &store).unwrap();
            // [CLS] a b c d [SEP]; words: {a}, {b, c}, {d}; [PAD] 0, [MASK] 39.
            let ids = [2u32, 7, 9, 11, 13, 3];
            let word_of = [None, Some(0), Some(1), Some(1), Some(2), None];
            let word_ids: Vec<Option<u32>> = word_of.iter().map(|w| w.map(|w| w as u32)).collect();
            let input = TextInput::new(&bert, &ids, &[0; 6], &word_ids).unwrap();
            let views = Views {
                model: &input.model,
                x: &input.x,
                ids: &ids,
                word_of: &word_of,
                target: 1,
                readout: Readout::Token(0),
            };
            let logit = |ids: &[u32]| -> f32 {
                let batch = TokenBatch::padded(&[ids], None, 0, &Device::Cpu).unwrap();
                bert.forward(&batch, Mode::Eval)
                    .unwrap()
                    .to_vec2::<f32>()
                    .unwrap()[0][1]
            };
            let full = logit(&ids);
            let without = |hide: &[usize]| -> Vec<u32> {
                (0..6)
                    .filter(|i| !hide.contains(i))
                    .map(|i| ids[i])
                    .collect()
            };
            let (tokens, words) = views.occlusion(Occluder::Delete { pad: 0 }, 3).unwrap();
            let close = |a: f32, b: f32| (a - b).abs() < 1e-5 * (1.0 + b.abs());
            assert_eq!((tokens[0], tokens[5]), (0.0, 0.0), "special tokens stay");
            for (i, &got) in tokens.iter().enumerate().take(5).skip(1) {
                let want = full - logit(&without(&[i]));
                assert!(close(got, want), "{head} token {i}: {got} vs {want}");
            }
            for (w, hide) in [vec![1], vec![2, 3], vec![4]].iter().enumerate() {
                let want = full - logit(&without(hide));
                assert!(
                    close(words[w], want),
                    "{head} word {w}: {} vs {want}",
                    words[w]
                );
            }
            let (replaced, _) = views.occlusion(Occluder::Replace(39), 3).unwrap();
            let mut masked = ids;
            masked[2] = 39;
            assert!(close(replaced[2], full - logit(&masked)));
            assert!(
                (replaced[2] - tokens[2]).abs() > 1e-4,
                "deleting is not masking"
            );
        }
    }

    #[test]
    fn token_scores_sum_or_take_the_norm_over_hidden_units() {
        let map = [1.0, -2.0, 2.0, 3.0, 0.0, 4.0];
        assert_eq!(token_scores(&map, 3, Sign::Signed), [1.0, 7.0]);
        assert_eq!(token_scores(&map, 3, Sign::Absolute), [3.0, 5.0]);
    }
}
