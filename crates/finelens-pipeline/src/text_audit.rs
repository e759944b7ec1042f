//! The audit of a text model folder on a labelled text set: the image audit's checks in tokens,
//! gated by the same policy (its figures mean the same with tokens for pixels and rationales for
//! object masks).
//!
//! * **sanity**: cascading randomisation (Adebayo et al. 2018) from the head down through the
//!   pooler, `encoder.layer.L-1 … 0` and the embeddings, and independent randomisation of each
//!   stage alone; Spearman ρ of |token scores| with the trained model's, per stage. The policy
//!   gates the fully randomised model's.
//! * **faithfulness**: deletion and insertion curves over tokens (word tokens replaced by
//!   `[MASK]` in the map's order, the target's probability; Petsiuk et al. 2018) against a seeded
//!   random order, the gain = (random − map) deletion AUC + (map − random) insertion AUC; and
//!   ERASER's comprehensiveness (probability drop when the top k% tokens are removed) and
//!   sufficiency (drop when only they are kept) for k ∈ {1, 5, 10, 20, 50}% against random
//!   tokens (DeYoung et al. 2020), reported.
//! * **plausibility** (`localisation`), where texts carry rationales (character spans): the share
//!   of positive relevance on rationale tokens, the share of texts whose top token is in the
//!   rationale (pointing game), token F1 of the top-|R| tokens and AUPRC, reported.
//! * **shortcut**: per predicted class, the mean share of positive relevance outside the
//!   rationale, and how concentrated the class's relevance is on its single most relevant word
//!   (lower-cased, over the class's texts); that word is flagged when it holds most of the
//!   class's relevance and is in none of its rationales.
//! * **completeness**: Σ|δ| / Σ|F(x) − F(baseline)| of integrated gradients.
//! * **drift** (with `--base`): weight drift per stage, linear CKA per layer of the mean token
//!   vector and attention drift, as `finelens drift` measures them; the policy gates the CKA of
//!   the encoder's output (the last layer's mean over tokens).
//!
//! The report (`report.json`, `index.html`) adds the model card (architecture, lineage, training
//! configuration and curves), the confusion matrix, a gallery of coloured texts sortable by
//! confidence or errors, the drift figures and the provenance.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finelens_attrib::{BaselineSpec, Method, MethodSpec, TokenBaseline};
use finelens_audit::complexity::{Complexity, MapComplexity};
use finelens_audit::policy::{all_pass, Figure, Figures, Policy, Verdict};
use finelens_data::text::{Columns, TextSet, TextTokenizer};
use finelens_drift::cka::RepresentationDrift;
use finelens_drift::{spearman, WeightDrift};
use finelens_models::bert::{Bert, TokenBatch};
use finelens_models::{Mode, ParamStore};
use finelens_report::heatmap::{colour, outlier_threshold, Scale};
use finelens_report::html::{render, Block, Card, Cell, Page, Span, Status};
use finelens_tune::TrainingRecord;
use serde::{Deserialize, Serialize};

use crate::audit::AuditJob;
use crate::error::{input, settings, Result};
use crate::output::{write_file, write_json, OutputDir, Versioned};
use crate::progress::{Event, Progress};
use crate::text::{load_text_model, TextModel, DEFAULT_MAX_LENGTH};
use crate::text_drift::AttentionDrift;
use crate::text_explain::TextInput;

/// ERASER's k, as fractions of a text's word tokens.
pub const ERASER_K: [f64; 5] = [0.01, 0.05, 0.10, 0.20, 0.50];

/// A class's relevance counts as held by one word when that word has more than this share.
pub const SHORTCUT_WORD_SHARE: f64 = 0.5;

/// Forward passes per batch of token variants.
const VARIANT_BATCH: usize = 32;

/// What the audit found for one text.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AuditedText {
    pub source: String,
    pub text: String,
    pub label: String,
    pub predicted: String,
    pub probability: f32,
    pub tokens: Vec<String>,
    /// The gated method's score per token (Σ over hidden units).
    pub relevance: Vec<f32>,
    /// Per token: inside a rationale span (`None` without rationales).
    pub in_rationale: Option<Vec<bool>>,
    pub deletion_auc: f64,
    pub insertion_auc: f64,
    pub random_deletion_auc: f64,
    pub random_insertion_auc: f64,
    /// Per ERASER k: (comprehensiveness, sufficiency, random comprehensiveness, random sufficiency).
    pub eraser: Vec<[f64; 4]>,
    pub mass_on_rationale: Option<f64>,
    pub pointing: Option<bool>,
    pub token_f1: Option<f64>,
    pub auprc: Option<f64>,
    /// Integrated gradients: |Σ attributions − ΔF| and |ΔF|.
    pub completeness: Option<(f64, f64)>,
    /// Sparseness and complexity of |relevance| over the word tokens.
    #[serde(default)]
    pub complexity: Option<MapComplexity>,
}

/// ERASER's figures at one k.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Eraser {
    pub k: f64,
    pub comprehensiveness: f64,
    pub sufficiency: f64,
    pub random_comprehensiveness: f64,
    pub random_sufficiency: f64,
}

/// One predicted class's shortcut statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassShortcut {
    pub class: String,
    pub texts: usize,
    /// Mean share of positive relevance outside the rationale.
    pub mass_outside_rationale: Option<f64>,
    /// The word holding the most of the class's positive relevance, and its share.
    pub top_word: String,
    pub top_word_share: f64,
    /// The top word holds most of the class's relevance and is in none of its rationales.
    pub flagged: bool,
}

/// Spearman ρ of |token scores| with the trained model's, per randomised stage.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextSanity {
    /// The stage and every stage above it random (head first).
    pub cascading: Vec<(String, f64)>,
    /// Only the stage random.
    pub independent: Vec<(String, f64)>,
}

/// What the model card says beyond the report: the encoder, lineage and training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextModelCard {
    pub architecture: String,
    pub max_length: usize,
    pub parent_sha256: Option<String>,
    pub training: Option<TrainingRecord>,
}

impl TextModelCard {
    fn of(m: &TextModel) -> TextModelCard {
        let c = &m.spec.config;
        TextModelCard {
            architecture: format!(
                "BERT encoder: {} layers, {} wide, {} heads; head {}",
                c.num_hidden_layers, c.hidden_size, c.num_attention_heads, m.spec.head
            ),
            max_length: m
                .record
                .as_ref()
                .map_or(DEFAULT_MAX_LENGTH, |r| r.max_length),
            parent_sha256: m.record.as_ref().map(|r| r.parent_sha256.clone()),
            training: m.record.as_ref().map(|r| r.training.clone()),
        }
    }
}

/// Drift from the base (`--base`), as `finelens drift` measures it on the audited texts.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextAuditDrift {
    pub weights: WeightDrift,
    /// Linear CKA per layer of the mean token vector.
    pub representation: RepresentationDrift,
    pub attention: AttentionDrift,
}

/// `report.json` of a text audit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextAuditReport {
    pub schema_version: String,
    pub model: PathBuf,
    pub sha256: String,
    pub classes: Vec<String>,
    pub data: PathBuf,
    pub base: Option<PathBuf>,
    pub method: String,
    pub accuracy: f64,
    pub model_card: TextModelCard,
    pub policy: Policy,
    pub verdicts: Vec<Verdict>,
    pub pass: bool,
    pub figures: BTreeMap<String, f64>,
    pub sanity: TextSanity,
    pub eraser: Vec<Eraser>,
    /// The gated method's complexity over the texts (Quantus's sparseness and complexity).
    pub complexity: Option<Complexity>,
    pub shortcut: Vec<ClassShortcut>,
    pub drift: Option<TextAuditDrift>,
    pub texts: Vec<AuditedText>,
    pub seed: u64,
    pub finelens_version: String,
    pub seconds: f64,
    pub command_line: Vec<String>,
}

impl Versioned for TextAuditReport {
    const SCHEMA: &'static str = "finelens-text-audit/2";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// Every class's probability for each token sequence (padded per batch).
fn class_probabilities(bert: &Bert, variants: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(variants.len());
    for chunk in variants.chunks(VARIANT_BATCH) {
        let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let batch = TokenBatch::padded(&rows, None, pad, &Device::Cpu)?;
        let logits: Vec<Vec<f64>> = bert
            .forward(&batch, Mode::Eval)?
            .to_dtype(DType::F64)?
            .to_vec2()?;
        out.extend(logits.into_iter().map(|l| {
            let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        }));
    }
    Ok(out)
}

/// The target's probability for each token sequence.
fn probabilities(bert: &Bert, variants: &[Vec<u32>], pad: u32, target: usize) -> Result<Vec<f64>> {
    Ok(class_probabilities(bert, variants, pad)?
        .into_iter()
        .map(|p| p[target])
        .collect())
}

/// Fisher–Yates with SplitMix64 draws: a random order that depends only on the seed.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut state = seed;
    let mut next = || {
        state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    for i in (1..v.len()).rev() {
        let j = (next() % (i as u64 + 1)) as usize;
        v.swap(i, j);
    }
}

/// Area under a curve sampled at evenly spaced fractions 0 … 1 (trapezoid).
fn auc(curve: &[f64]) -> f64 {
    if curve.len() < 2 {
        return curve.first().copied().unwrap_or(0.0);
    }
    let n = (curve.len() - 1) as f64;
    curve.windows(2).map(|w| 0.5 * (w[0] + w[1])).sum::<f64>() / n
}

/// Average precision of ranking by `scores` against the positives `labels`.
fn average_precision(scores: &[f32], labels: &[bool]) -> Option<f64> {
    let positives = labels.iter().filter(|l| **l).count();
    if positives == 0 {
        return None;
    }
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]).then(a.cmp(&b)));
    let (mut hits, mut sum) = (0usize, 0f64);
    for (rank, &i) in order.iter().enumerate() {
        if labels[i] {
            hits += 1;
            sum += hits as f64 / (rank + 1) as f64;
        }
    }
    Some(sum / positives as f64)
}

/// The faithfulness curves and ERASER figures of one text, given the word tokens in the map's
/// order and in a random order, and `full`, the target's probability on the whole text (every
/// curve's unmasked end).
#[allow(clippy::too_many_arguments)]
fn faithfulness(
    bert: &Bert,
    ids: &[u32],
    words: &[usize],
    order: &[usize],
    random: &[usize],
    (mask_id, pad): (u32, u32),
    target: usize,
    full: f64,
) -> Result<([f64; 4], Vec<[f64; 4]>)> {
    let n = words.len();
    let masked = |hide: &[usize]| -> Vec<u32> {
        let mut v = ids.to_vec();
        for &i in hide {
            v[i] = mask_id;
        }
        v
    };
    // Deletion masks the first j tokens of the order (j = 1 … n), insertion all but them
    // (j = 0 … n − 1); the unmasked text, both curves' other end, is `full`.
    let curves = |order: &[usize]| -> Result<(f64, f64)> {
        let mut variants = Vec::with_capacity(2 * n);
        for j in 1..=n {
            variants.push(masked(&order[..j]));
        }
        for j in 0..n {
            variants.push(masked(&order[j..]));
        }
        let p = probabilities(bert, &variants, pad, target)?;
        let deletion: Vec<f64> = std::iter::once(full)
            .chain(p[..n].iter().copied())
            .collect();
        let insertion: Vec<f64> = p[n..]
            .iter()
            .copied()
            .chain(std::iter::once(full))
            .collect();
        Ok((auc(&deletion), auc(&insertion)))
    };
    let (del, ins) = curves(order)?;
    let (rdel, rins) = curves(random)?;
    // ERASER: remove tokens from the sequence (comprehensiveness) or keep only them and the
    // special tokens (sufficiency).
    let mut eraser = Vec::new();
    for k in ERASER_K {
        let m = ((k * n as f64).round() as usize).clamp(1, n);
        let mut variants = Vec::new();
        for top in [&order[..m], &random[..m]] {
            variants.push(
                (0..ids.len())
                    .filter(|i| !top.contains(i))
                    .map(|i| ids[i])
                    .collect::<Vec<u32>>(),
            );
            variants.push(
                (0..ids.len())
                    .filter(|i| top.contains(i) || !words.contains(i))
                    .map(|i| ids[i])
                    .collect(),
            );
        }
        let p = probabilities(bert, &variants, pad, target)?;
        eraser.push([full - p[0], full - p[1], full - p[2], full - p[3]]);
    }
    Ok(([del, ins, rdel, rins], eraser))
}

/// Token scores (Σ over hidden units), and integrated gradients' (|δ|, |ΔF|).
type Scored = (Vec<f32>, Option<(f64, f64)>);

/// The gated method's token scores for one text under `bert`.
struct Scorer<'a> {
    spec: &'a MethodSpec,
    hidden: usize,
    pad: u32,
}

impl Scorer<'_> {
    /// (Σ-over-hidden token scores, IG's (|δ|, |ΔF|)).
    fn scores(
        &self,
        bert: &Bert,
        ids: &[u32],
        word_ids: &[Option<u32>],
        target: usize,
    ) -> Result<Scored> {
        let input = TextInput::new(bert, ids, &vec![0; ids.len()], word_ids)?;
        let method = input.methods([self.spec], self.pad, None)?.remove(0);
        let a = method
            .attribute(&input.model, &input.x, &[target])?
            .remove(0);
        let scores = a
            .map
            .as_slice()
            .expect("standard layout")
            .chunks(self.hidden)
            .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() as f32)
            .collect();
        Ok((
            scores,
            a.completeness.map(|c| (c.delta, c.output_difference.abs())),
        ))
    }
}

/// Spearman ρ of |scores| over the word tokens.
fn rank_similarity(a: &[f32], b: &[f32], words: &[usize]) -> f64 {
    let pick = |v: &[f32]| -> Vec<f32> { words.iter().map(|&i| v[i].abs()).collect() };
    spearman(&pick(a), &pick(b))
}

/// Audit a text model folder (`job.model`) on a labelled text set (`job.data`); exit status as
/// the image audit's: `Ok(true)` when every measured check passes.
pub fn audit_text(job: &AuditJob, progress: Progress) -> Result<TextAuditReport> {
    OutputDir::check(&job.out, job.force)?;
    let started = std::time::Instant::now();
    let dir = job.model.path.clone();
    let m = load_text_model(&dir)?;
    let policy = match &job.policy {
        Some(p) => {
            let text = std::fs::read_to_string(p)
                .map_err(|e| input(p, format!("cannot read the policy: {e}")))?;
            Policy::parse(p, &text)?
        }
        None => Policy::default(),
    };
    let first = job
        .methods
        .iter()
        .find(|s| {
            !matches!(s.method, Method::GradCam | Method::Occlusion)
                && !Method::TEXT_ONLY.contains(&s.method)
                && !Method::RELU_RULES.contains(&s.method)
        })
        .ok_or_else(|| settings("audit: no gradient method to gate on (integrated_gradients, saliency, gradient_x_input…)"))?;
    let mut spec = MethodSpec {
        method: first.method,
        options: first.options.or(&job.shared),
    };
    if spec.method == Method::IntegratedGradients && spec.options.baseline.is_none() {
        spec.options.baseline = Some(BaselineSpec::Tokens(TokenBaseline::Pad));
    }
    let max_length = m
        .record
        .as_ref()
        .map_or(DEFAULT_MAX_LENGTH, |r| r.max_length);
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), max_length)?;
    let columns = Columns {
        text: "text".into(),
        label: "label".into(),
    };
    let set = TextSet::read(&job.data, &columns, Some(&m.classes))?;
    for (at, why) in &set.skipped {
        progress(Event::Warning(format!("warning: skipping {at}: {why}")));
    }
    let samples: Vec<_> = set.samples.iter().take(job.limit).collect();
    if samples.is_empty() {
        return Err(input(&job.data, "no text to audit"));
    }
    let pad = m.spec.config.pad_token_id;
    let mask_id = tok.token_id("[MASK]").ok_or_else(|| {
        input(
            dir.join("tokenizer.json"),
            "the tokenizer has no [MASK] token",
        )
    })?;
    let bert = Bert::new(m.spec.clone(), &m.store.frozen_as(DType::F32)?)?;
    let scorer = Scorer {
        spec: &spec,
        hidden: m.spec.config.hidden_size,
        pad,
    };
    progress(Event::Info(format!(
        "auditing {} on {} text(s) of {} with {}",
        dir.display(),
        samples.len(),
        job.data.display(),
        spec
    )));
    progress(Event::Stage {
        name: "audit",
        total: samples.len(),
        unit: "texts",
    });
    let mut texts = Vec::new();
    let mut encoded = Vec::new();
    for (k, s) in samples.iter().enumerate() {
        let e = tok.encode(&s.text)?;
        let words: Vec<usize> = (0..e.ids.len())
            .filter(|&i| e.word_ids[i].is_some())
            .collect();
        if words.is_empty() {
            return Err(input(Path::new(&s.source), "a text of special tokens only"));
        }
        let probs = class_probabilities(&bert, std::slice::from_ref(&e.ids), pad)?.remove(0);
        let predicted = (0..probs.len())
            .max_by(|&a, &b| probs[a].total_cmp(&probs[b]))
            .expect("classes");
        let (relevance, completeness) = scorer.scores(&bert, &e.ids, &e.word_ids, predicted)?;
        let mut order = words.clone();
        order.sort_by(|&a, &b| relevance[b].total_cmp(&relevance[a]).then(a.cmp(&b)));
        let mut random = words.clone();
        shuffle(
            &mut random,
            job.seed ^ (k as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let (curves, eraser) = faithfulness(
            &bert,
            &e.ids,
            &words,
            &order,
            &random,
            (mask_id, pad),
            predicted,
            probs[predicted],
        )?;
        let in_rationale: Option<Vec<bool>> = (!s.rationale.is_empty()).then(|| {
            e.offsets
                .iter()
                .zip(&e.word_ids)
                .map(|(&(a, b), w)| w.is_some() && s.rationale.iter().any(|&(x, y)| a < y && x < b))
                .collect()
        });
        let (mut mass, mut pointing, mut f1, mut ap) = (None, None, None, None);
        if let Some(r) = &in_rationale {
            let positive = |i: usize| relevance[i].max(0.0) as f64;
            let total: f64 = words.iter().map(|&i| positive(i)).sum();
            let on: f64 = words.iter().filter(|&&i| r[i]).map(|&i| positive(i)).sum();
            mass = Some(if total > 0.0 { on / total } else { 0.0 });
            pointing = Some(r[order[0]]);
            let size = words.iter().filter(|&&i| r[i]).count();
            if size > 0 {
                let hits = order[..size.min(order.len())]
                    .iter()
                    .filter(|&&i| r[i])
                    .count();
                f1 = Some(hits as f64 / size as f64);
                let w_scores: Vec<f32> = words.iter().map(|&i| relevance[i]).collect();
                let w_labels: Vec<bool> = words.iter().map(|&i| r[i]).collect();
                ap = average_precision(&w_scores, &w_labels);
            }
        }
        let complexity = MapComplexity::of(words.iter().map(|&i| relevance[i]));
        texts.push(AuditedText {
            complexity,
            source: s.source.clone(),
            text: s.text.clone(),
            label: m.classes[s.label].clone(),
            predicted: m.classes[predicted].clone(),
            probability: probs[predicted] as f32,
            tokens: e.tokens.clone(),
            relevance,
            in_rationale,
            deletion_auc: curves[0],
            insertion_auc: curves[1],
            random_deletion_auc: curves[2],
            random_insertion_auc: curves[3],
            eraser,
            mass_on_rationale: mass,
            pointing,
            token_f1: f1,
            auprc: ap,
            completeness,
        });
        encoded.push((e, words, predicted));
        progress(Event::Advance {
            done: k + 1,
            item: &s.source,
        });
    }
    progress(Event::StageEnd);

    // Sanity: cascading randomisation from the head down, then each stage alone, on the first
    // texts.
    let stages = m.spec.describe().stages;
    let fresh = ParamStore::init(
        &m.spec.param_specs(),
        job.seed.wrapping_add(1),
        &Device::Cpu,
    )?;
    let n_sanity = job.sanity_images.min(texts.len());
    let randomised_rho = |prefixes: &[String]| -> Result<f64> {
        let tensors: BTreeMap<String, Tensor> = m
            .store
            .iter()
            .map(|(n, t, _)| {
                let from = if prefixes.iter().any(|p| n.starts_with(p.as_str())) {
                    fresh.tensor(n)?
                } else {
                    t
                };
                Ok((n.to_owned(), from))
            })
            .collect::<Result<_>>()?;
        let store = ParamStore::from_tensors(&m.spec.param_specs(), tensors, &dir, "bert")?;
        let random_bert = Bert::new(m.spec.clone(), &store.frozen_as(DType::F32)?)?;
        let mut rho = 0.0;
        for (t, (e, words, target)) in texts.iter().zip(&encoded).take(n_sanity) {
            let (r, _) = scorer.scores(&random_bert, &e.ids, &e.word_ids, *target)?;
            rho += rank_similarity(&t.relevance, &r, words);
        }
        Ok(rho / n_sanity as f64)
    };
    let mut sanity = TextSanity {
        cascading: Vec::new(),
        independent: Vec::new(),
    };
    progress(Event::Stage {
        name: "sanity",
        total: 2 * stages.len(),
        unit: "randomised models",
    });
    let mut cascade: Vec<String> = Vec::new();
    for stage in stages.iter().rev() {
        cascade.extend(stage.prefixes.iter().cloned());
        sanity
            .cascading
            .push((stage.name.clone(), randomised_rho(&cascade)?));
        progress(Event::Advance {
            done: sanity.cascading.len(),
            item: &stage.name,
        });
    }
    for stage in stages.iter().rev() {
        sanity
            .independent
            .push((stage.name.clone(), randomised_rho(&stage.prefixes)?));
        progress(Event::Advance {
            done: stages.len() + sanity.independent.len(),
            item: &stage.name,
        });
    }
    progress(Event::StageEnd);

    // Shortcuts, per predicted class.
    let mut shortcut = Vec::new();
    for (c, class) in m.classes.iter().enumerate() {
        let mine: Vec<usize> = (0..texts.len()).filter(|&i| encoded[i].2 == c).collect();
        if mine.is_empty() {
            continue;
        }
        let mut by_word: BTreeMap<String, f64> = BTreeMap::new();
        let mut in_rationales: std::collections::BTreeSet<String> = Default::default();
        let mut outside = Vec::new();
        for &i in &mine {
            let (e, _, _) = &encoded[i];
            let t = &texts[i];
            let chars: Vec<char> = t.text.chars().collect();
            let word_text = |j: usize| -> String {
                let (a, b) = e.offsets[j];
                chars[a.min(chars.len())..b.min(chars.len())]
                    .iter()
                    .collect::<String>()
                    .to_lowercase()
            };
            // Sub-word tokens gather under their word: join each word's pieces.
            let mut word_of: BTreeMap<u32, (String, f64, bool)> = BTreeMap::new();
            for j in 0..e.ids.len() {
                if let Some(w) = e.word_ids[j] {
                    let entry = word_of.entry(w).or_insert((String::new(), 0.0, false));
                    entry.0.push_str(&word_text(j));
                    entry.1 += t.relevance[j] as f64;
                    entry.2 |= t.in_rationale.as_ref().is_some_and(|r| r[j]);
                }
            }
            for (w, rel, in_r) in word_of.into_values() {
                *by_word.entry(w.clone()).or_default() += rel.max(0.0);
                if in_r {
                    in_rationales.insert(w);
                }
            }
            if let Some(mass) = t.mass_on_rationale {
                outside.push(1.0 - mass);
            }
        }
        let total: f64 = by_word.values().sum();
        let (top_word, top) = by_word
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map(|(w, v)| (w.clone(), *v))
            .unwrap_or_default();
        let share = if total > 0.0 { top / total } else { 0.0 };
        shortcut.push(ClassShortcut {
            class: class.clone(),
            texts: mine.len(),
            mass_outside_rationale: (!outside.is_empty())
                .then(|| outside.iter().sum::<f64>() / outside.len() as f64),
            flagged: share > SHORTCUT_WORD_SHARE && !in_rationales.contains(&top_word),
            top_word,
            top_word_share: share,
        });
    }

    // The figures the policy gates on.
    let mean = |v: Vec<f64>| -> Option<f64> {
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    };
    let mut figures = Figures::new();
    if let Some(&(_, rho)) = sanity.cascading.last() {
        figures.insert(Figure::SanityMaxSpearman, rho);
    }
    if let Some(g) = mean(
        texts
            .iter()
            .map(|t| {
                (t.random_deletion_auc - t.deletion_auc)
                    + (t.insertion_auc - t.random_insertion_auc)
            })
            .collect(),
    ) {
        figures.insert(Figure::FaithfulnessMinGain, g);
    }
    if let Some(v) = mean(texts.iter().filter_map(|t| t.mass_on_rationale).collect()) {
        figures.insert(Figure::LocalisationMinMassAccuracy, v);
    }
    if let Some(v) = mean(
        texts
            .iter()
            .filter_map(|t| t.pointing.map(|p| f64::from(u8::from(p))))
            .collect(),
    ) {
        figures.insert(Figure::LocalisationMinPointingGame, v);
    }
    if let Some(v) = shortcut
        .iter()
        .filter_map(|c| c.mass_outside_rationale)
        .max_by(f64::total_cmp)
    {
        figures.insert(Figure::ShortcutMaxMassOutsideMask, v);
    }
    if let Some(v) = shortcut
        .iter()
        .map(|c| c.top_word_share)
        .max_by(f64::total_cmp)
    {
        figures.insert(Figure::ShortcutMaxHotspotConcentration, v);
    }
    let complexity = Complexity::summarise(
        &texts
            .iter()
            .filter_map(|t| t.complexity)
            .collect::<Vec<_>>(),
    );
    if let Some(c) = &complexity {
        figures.insert(Figure::ComplexityMinSparseness, c.mean_sparseness);
        figures.insert(
            Figure::ComplexityMaxRelativeEntropy,
            c.mean_relative_complexity,
        );
    }
    let (deltas, diffs): (f64, f64) = texts
        .iter()
        .filter_map(|t| t.completeness)
        .fold((0.0, 0.0), |(a, b), (d, f)| (a + d, b + f));
    if diffs > 0.0 {
        figures.insert(Figure::CompletenessMaxMeanRelativeDelta, deltas / diffs);
    }
    let drift = match &job.base {
        Some(base) => {
            let texts: Vec<String> = samples.iter().map(|s| s.text.clone()).collect();
            let d = base_drift(&base.path, &m, &tok, &texts, progress)?;
            let last = format!("encoder.layer.{}", m.spec.config.num_hidden_layers - 1);
            if let Some(k) = d.representation.layers.iter().position(|l| *l == last) {
                figures.insert(Figure::DriftMinCkaPenultimate, d.representation.diagonal[k]);
            }
            Some(d)
        }
        None => None,
    };
    let verdicts = policy.evaluate(&figures, job.require_all);
    let pass = all_pass(&verdicts);
    let eraser = ERASER_K
        .iter()
        .enumerate()
        .map(|(i, &k)| {
            let at =
                |j: usize| texts.iter().map(|t| t.eraser[i][j]).sum::<f64>() / texts.len() as f64;
            Eraser {
                k,
                comprehensiveness: at(0),
                sufficiency: at(1),
                random_comprehensiveness: at(2),
                random_sufficiency: at(3),
            }
        })
        .collect();
    let accuracy =
        texts.iter().filter(|t| t.label == t.predicted).count() as f64 / texts.len() as f64;
    let report = TextAuditReport {
        schema_version: TextAuditReport::SCHEMA.into(),
        model: dir.clone(),
        sha256: m.sha256.clone(),
        classes: m.classes.clone(),
        data: job.data.clone(),
        base: job.base.as_ref().map(|b| b.path.clone()),
        method: spec.to_string(),
        accuracy,
        model_card: TextModelCard::of(&m),
        policy,
        pass,
        figures: figures.iter().map(|(f, v)| (f.id(), *v)).collect(),
        verdicts,
        sanity,
        eraser,
        complexity,
        shortcut,
        drift,
        texts,
        seed: job.seed,
        finelens_version: env!("CARGO_PKG_VERSION").into(),
        seconds: started.elapsed().as_secs_f64(),
        command_line: job.command_line.clone(),
    };
    progress(Event::Info(summary(&report)));
    OutputDir::create(&job.out, job.force)?.run(|out| {
        write_json(&out.join("report.json"), &report)?;
        write_file(&out.join("index.html"), render(&page(&report)?).as_bytes())
    })?;
    progress(Event::Info(format!(
        "report: {}",
        job.out.join("index.html").display()
    )));
    Ok(report)
}

/// Drift of the audited model from the base folder on the audited texts: weights per stage,
/// linear CKA per layer of the mean token vector — for the policy, the encoder's output, the
/// sentence embedding; not the pooler's or the [CLS] vector's: a sentence-transformers
/// checkpoint (all-MiniLM) trained neither (it mean-pools), so fine-tuning a `cls` head rewrites
/// them like a head, whatever happened to what the encoder knew — and attention drift.
fn base_drift(
    base: &Path,
    m: &TextModel,
    tok: &TextTokenizer,
    texts: &[String],
    progress: Progress,
) -> Result<TextAuditDrift> {
    let parent = crate::text_drift::parent_of(base, m)?;
    let weights = crate::text_drift::weight_drift(base, &m.dir, m, crate::drift::Spectral::Esd)?;
    let b0 = Bert::new(parent.spec.clone(), &parent.store.frozen_as(DType::F32)?)?;
    let b1 = Bert::new(m.spec.clone(), &m.store.frozen_as(DType::F32)?)?;
    let (representation, attention) = crate::text_drift::probe_drift(
        &b0,
        &b1,
        tok,
        texts,
        &m.spec.describe().representation_layers,
        true,
        texts.len().max(crate::drift::MIN_CKA_BATCH),
        m.spec.config.num_hidden_layers,
        m.spec.config.num_attention_heads,
        progress,
    )?;
    Ok(TextAuditDrift {
        weights,
        representation,
        attention,
    })
}

/// The audit's account for a terminal: verdicts, then the shortcut and ERASER lines.
fn summary(r: &TextAuditReport) -> String {
    let mut lines = vec![crate::page::verdict_table(&r.verdicts)];
    for c in &r.shortcut {
        lines.push(format!(
            "class {}: {} texts, top word `{}` holds {:.0}% of its relevance{}",
            c.class,
            c.texts,
            c.top_word,
            100.0 * c.top_word_share,
            if c.flagged {
                " — FLAGGED: in no rationale"
            } else {
                ""
            }
        ));
    }
    lines.push(format!(
        "ERASER (k: comprehensiveness / sufficiency, random in brackets): {}",
        r.eraser
            .iter()
            .map(|e| format!(
                "{:.0}%: {:.3} [{:.3}] / {:.3} [{:.3}]",
                100.0 * e.k,
                e.comprehensiveness,
                e.random_comprehensiveness,
                e.sufficiency,
                e.random_sufficiency
            ))
            .collect::<Vec<_>>()
            .join(", ")
    ));
    lines.push(if r.pass {
        "verdict: all checks pass".into()
    } else {
        "verdict: FLAGGED — some checks fail".into()
    });
    lines.join("\n")
}

fn page(r: &TextAuditReport) -> Result<Page> {
    Ok(Page {
        title: format!(
            "finelens text audit: {}",
            if r.pass { "all checks pass" } else { "FLAGGED" }
        ),
        blocks: blocks(r)?,
    })
}

/// A text's tokens coloured by relevance (blue against, red for the class; clipped at the
/// outlier threshold as image maps are), each token's score on hover.
fn coloured_tokens(t: &AuditedText) -> Vec<Span> {
    let limit = outlier_threshold(t.relevance.iter().copied(), 2.0);
    let limit = if limit > 0.0 { limit } else { 1.0 };
    t.tokens
        .iter()
        .zip(&t.relevance)
        .enumerate()
        .map(|(j, (tok, &v))| {
            let rationale = t.in_rationale.as_ref().is_some_and(|r| r[j]);
            Span {
                text: tok.clone(),
                colour: colour((v / limit).clamp(-1.0, 1.0), Scale::Diverging),
                title: format!(
                    "{tok} {v:+.4}{}",
                    if rationale { " (rationale)" } else { "" }
                ),
            }
        })
        .collect()
}

/// Per stage: the cascading and the independent randomisation's ρ.
fn sanity_table(s: &TextSanity) -> Block {
    Block::Table(
        [
            "randomised stage",
            "cascading (it and above)",
            "independent (it alone)",
        ]
        .map(String::from)
        .to_vec(),
        s.cascading
            .iter()
            .zip(&s.independent)
            .map(|((stage, c), (_, i))| {
                vec![
                    Cell::Text(stage.clone()),
                    Cell::Number(*c, 3),
                    Cell::Number(*i, 3),
                ]
            })
            .collect(),
    )
}

/// The report's blocks (the demo's page shows them too).
pub fn blocks(r: &TextAuditReport) -> Result<Vec<Block>> {
    let mut b = vec![Block::Paragraph(format!(
        "{} (sha256 {}) audited on {} ({} texts, accuracy {:.1}%) with {}{}.",
        r.model.display(),
        &r.sha256[..12.min(r.sha256.len())],
        r.data.display(),
        r.texts.len(),
        100.0 * r.accuracy,
        r.method,
        r.base
            .as_ref()
            .map(|b| format!(", against the base {}", b.display()))
            .unwrap_or_default()
    ))];
    b.push(Block::Paragraph(
        "The policy is the image audit's: read its pixels as tokens, its images as texts and its \
         object masks as the texts' rationales; the hotspot concentration is the share of a \
         class's relevance held by its single most relevant word."
            .into(),
    ));
    b.extend(crate::page::verdict_blocks(r.pass, &r.verdicts));

    b.push(Block::Heading(3, "Model card".into()));
    let card = &r.model_card;
    let mut facts = vec![
        ("architecture", card.architecture.clone()),
        ("classes", r.classes.join(", ")),
        ("input", format!("up to {} tokens", card.max_length)),
        (
            "audited data",
            format!("{} ({} texts)", r.data.display(), r.texts.len()),
        ),
        (
            "accuracy on the audited texts",
            format!("{:.1}%", 100.0 * r.accuracy),
        ),
        (
            "parent model (SHA-256)",
            card.parent_sha256
                .clone()
                .unwrap_or_else(|| "none recorded".into()),
        ),
    ];
    if let Some(t) = &card.training {
        facts.push((
            "training configuration",
            serde_json::to_string(&t.config).expect("plain data serialises"),
        ));
    }
    b.push(crate::page::facts(facts));
    if let Some(t) = &card.training {
        b.extend(crate::page::training_curves(t)?);
    }
    let index = |name: &str| r.classes.iter().position(|c| c == name);
    let labelled: Vec<(usize, usize)> = r
        .texts
        .iter()
        .filter_map(|t| Some((index(&t.label)?, index(&t.predicted)?)))
        .collect();
    b.extend(crate::page::confusion(&r.classes, &labelled, "texts"));

    b.push(Block::Heading(3, "Texts".into()));
    b.push(Block::Paragraph(format!(
        "Each text's tokens coloured by {} for the predicted class (blue against, red for; a \
         token's score on hover); cards with a red border are errors.",
        r.method
    )));
    b.push(Block::Gallery(
        r.texts
            .iter()
            .map(|t| Card {
                title: t.source.clone(),
                caption: format!(
                    "predicted {} ({:.1}%), true {}",
                    t.predicted,
                    100.0 * t.probability,
                    t.label
                ),
                figures: Vec::new(),
                tokens: coloured_tokens(t),
                confidence: t.probability as f64,
                error: t.label != t.predicted,
            })
            .collect(),
    ));

    b.push(Block::Heading(3, "Shortcuts".into()));
    b.push(Block::Table(
        [
            "class",
            "texts",
            "relevance outside the rationale",
            "top word",
            "its share",
            "flag",
        ]
        .map(String::from)
        .to_vec(),
        r.shortcut
            .iter()
            .map(|c| {
                vec![
                    Cell::Text(c.class.clone()),
                    Cell::Number(c.texts as f64, 0),
                    Cell::Number(c.mass_outside_rationale.unwrap_or(f64::NAN), 3),
                    Cell::Text(c.top_word.clone()),
                    Cell::Number(c.top_word_share, 3),
                    if c.flagged {
                        Cell::Badge("in no rationale".into(), Status::Fail)
                    } else {
                        Cell::Text(String::new())
                    },
                ]
            })
            .collect(),
    ));
    b.push(Block::Heading(3, "Faithfulness (ERASER)".into()));
    b.push(Block::Table(
        ["k", "comprehensiveness", "random", "sufficiency", "random"]
            .map(String::from)
            .to_vec(),
        r.eraser
            .iter()
            .map(|e| {
                vec![
                    Cell::Text(format!("{:.0}%", 100.0 * e.k)),
                    Cell::Number(e.comprehensiveness, 3),
                    Cell::Number(e.random_comprehensiveness, 3),
                    Cell::Number(e.sufficiency, 3),
                    Cell::Number(e.random_sufficiency, 3),
                ]
            })
            .collect(),
    ));
    if let Some(c) = &r.complexity {
        b.push(Block::Paragraph(format!(
            "Complexity of |{}| over the word tokens (Quantus; mean of {} texts): sparseness (Gini \
             index, Chalasani et al. 2020) {:.3}; entropy {:.3} nats, {:.3} of its maximum \
             (Bhatt et al. 2020).",
            r.method, c.maps, c.mean_sparseness, c.mean_complexity, c.mean_relative_complexity
        )));
    }
    b.push(Block::Heading(3, "Sanity: parameter randomisation".into()));
    b.push(Block::Paragraph(
        "Spearman ρ of |token scores| between the trained model and the model with stages \
         re-initialised (Adebayo et al. 2018); low means the scores depend on those weights."
            .into(),
    ));
    b.push(sanity_table(&r.sanity));

    if let Some(d) = &r.drift {
        b.push(Block::Heading(3, "Drift from the base".into()));
        let (bars, cka) = crate::drift::drift_figures(&d.weights, Some(&d.representation))?;
        for (png, alt) in [
            (bars, "relative change per layer"),
            (cka, "CKA between the base's and the audited model's layers"),
        ] {
            if let Some(png) = png {
                b.push(Block::Image {
                    png,
                    alt: alt.into(),
                });
            }
        }
        b.push(crate::text_drift::layer_table(
            &d.weights,
            &d.representation,
            &d.attention,
            "CKA (mean token vector)",
        ));
        b.extend(crate::drift::alpha_table(&d.weights));
    }
    b.push(Block::Heading(3, "Provenance".into()));
    b.push(crate::page::facts(vec![
        ("model", r.model.display().to_string()),
        ("sha256", r.sha256.clone()),
        (
            "base",
            r.base
                .as_ref()
                .map_or("none".into(), |b| b.display().to_string()),
        ),
        ("seed", r.seed.to_string()),
        ("finelens", r.finelens_version.clone()),
        ("seconds", format!("{:.1}", r.seconds)),
        ("command line", r.command_line.join(" ")),
    ]));
    Ok(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn areas_and_average_precision_have_their_closed_forms() {
        assert!((auc(&[1.0, 0.0]) - 0.5).abs() < 1e-12);
        assert!((auc(&[1.0, 1.0, 1.0]) - 1.0).abs() < 1e-12);
        // Positives ranked first: AP 1; last of three with one positive: 1/3.
        assert_eq!(
            average_precision(&[0.9, 0.1, 0.5], &[true, false, false]),
            Some(1.0)
        );
        assert_eq!(
            average_precision(&[0.1, 0.9, 0.5], &[true, false, false]),
            Some(1.0 / 3.0)
        );
        assert_eq!(average_precision(&[0.1], &[false]), None);
    }
}
