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
//! * **Quantus's figures** in tokens: faithfulness correlation, monotonicity and infidelity
//!   with [MASK] as the removal ([`token_perturbation_scores`]; ROAD's imputation is for pixels —
//!   a BERT was pretrained to read [MASK], the in-distribution removal ROAD builds for images);
//!   on the randomisation check's texts max/avg-sensitivity and the local Lipschitz estimate of
//!   the word-embedding map, and the random-logit test (SSIM of |scores| as a 1-D signal); the
//!   sparseness and entropy of |scores|. Gated on the first method; `finelens evaluate`
//!   measures every gradient method asked for.
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
use finelens_attrib::{Attribution, Attributor};
use finelens_attrib::{BaselineSpec, Method, MethodSpec, TokenBaseline};
use finelens_audit::complexity::{Complexity, MapComplexity};
use finelens_audit::perturbation::{token_perturbation_scores, Perturbation, PerturbationScores};
use finelens_audit::policy::{all_pass, Figure, Figures, Policy, Verdict};
use finelens_audit::robustness::{robustness, ImageRobustness, Robustness};
use finelens_audit::run::RandomLogit;
use finelens_audit::sanity::StageSimilarity;
use finelens_audit::similarity::{normalised_magnitude, ssim};
use finelens_data::text::{Columns, Encoded, TextSet, TextTokenizer};
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
    /// Faithfulness correlation, monotonicity and infidelity over the word tokens.
    #[serde(default)]
    pub perturbation: Option<PerturbationScores>,
    /// On the randomisation check's texts: max/avg-sensitivity and the local Lipschitz
    /// estimate of the word-embedding map.
    #[serde(default)]
    pub robustness: Option<ImageRobustness>,
    /// On the randomisation check's texts: the map of a random other class, compared.
    #[serde(default)]
    pub random_logit: Option<StageSimilarity>,
}

/// Quantus's figures for one method over the texts: the gated method's, and with
/// `finelens evaluate` every gradient method's.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextMethodResult {
    pub method: String,
    pub texts: usize,
    /// (random − map) deletion AUC + (map − random) insertion AUC.
    pub gain_over_random: f64,
    pub perturbation: Option<Perturbation>,
    pub robustness: Option<Robustness>,
    pub random_logit: Option<RandomLogit>,
    pub complexity: Option<Complexity>,
    /// Spearman ρ of |token scores| with every weight random, on the randomisation check's
    /// texts.
    pub randomised_spearman: Option<f64>,
    pub mass_on_rationale: Option<f64>,
    pub pointing_game: Option<f64>,
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
    /// Quantus's figures per method: the gated method first, then (`finelens evaluate`) every
    /// other gradient method asked for.
    pub methods: Vec<TextMethodResult>,
    pub shortcut: Vec<ClassShortcut>,
    pub drift: Option<TextAuditDrift>,
    pub texts: Vec<AuditedText>,
    pub seed: u64,
    pub finelens_version: String,
    pub seconds: f64,
    pub command_line: Vec<String>,
}

impl Versioned for TextAuditReport {
    const SCHEMA: &'static str = "finelens-text-audit/3";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// Every class's logit for each token sequence (padded per batch).
fn class_logits(bert: &Bert, variants: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f64>>> {
    let mut out = Vec::with_capacity(variants.len());
    for chunk in variants.chunks(VARIANT_BATCH) {
        let rows: Vec<&[u32]> = chunk.iter().map(Vec::as_slice).collect();
        let batch = TokenBatch::padded(&rows, None, pad, &Device::Cpu)?;
        out.extend(
            bert.forward(&batch, Mode::Eval)?
                .to_dtype(DType::F64)?
                .to_vec2::<f64>()?,
        );
    }
    Ok(out)
}

/// Every class's probability for each token sequence.
fn class_probabilities(bert: &Bert, variants: &[Vec<u32>], pad: u32) -> Result<Vec<Vec<f64>>> {
    Ok(class_logits(bert, variants, pad)?
        .into_iter()
        .map(|l| {
            let max = l.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let e: Vec<f64> = l.iter().map(|v| (v - max).exp()).collect();
            let z: f64 = e.iter().sum();
            e.into_iter().map(|v| v / z).collect()
        })
        .collect())
}

/// The target's probability for each token sequence.
fn probabilities(bert: &Bert, variants: &[Vec<u32>], pad: u32, target: usize) -> Result<Vec<f64>> {
    Ok(class_probabilities(bert, variants, pad)?
        .into_iter()
        .map(|p| p[target])
        .collect())
}

/// SplitMix64's step: the next state and its draw.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fisher–Yates with SplitMix64 draws: a random order that depends only on the seed.
fn shuffle(v: &mut [usize], seed: u64) {
    let mut state = seed;
    for i in (1..v.len()).rev() {
        let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
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

/// One method's explanation of one text.
struct Scored {
    /// Per token, Σ over hidden units.
    scores: Vec<f32>,
    /// Per token, the first-order prediction of the logit's drop when it is masked,
    /// (eᵢ − e_[MASK])ᵀφᵢ: infidelity's Iᵀφ.
    first_order: Vec<f64>,
    /// Integrated gradients: (|δ|, |ΔF|).
    completeness: Option<(f64, f64)>,
    /// When asked for: max/avg-sensitivity and the local Lipschitz estimate.
    robustness: Option<ImageRobustness>,
}

/// One method's token scores for a text under a model.
struct Scorer<'a> {
    spec: &'a MethodSpec,
    hidden: usize,
    pad: u32,
    mask_id: u32,
}

impl Scorer<'_> {
    fn attribute<'b>(
        &self,
        bert: &'b Bert,
        ids: &[u32],
        word_ids: &[Option<u32>],
        target: usize,
    ) -> Result<(TextInput<'b>, Box<dyn Attributor>, Attribution)> {
        let input = TextInput::new(bert, ids, &vec![0; ids.len()], word_ids)?;
        let method = input
            .methods([self.spec], self.pad, Some(self.mask_id))?
            .remove(0);
        let a = method
            .attribute(&input.model, &input.x, &[target])?
            .remove(0);
        Ok((input, method, a))
    }

    fn scores(
        &self,
        bert: &Bert,
        ids: &[u32],
        word_ids: &[Option<u32>],
        target: usize,
    ) -> Result<Scored> {
        self.scores_with(bert, ids, word_ids, target, None)
    }

    /// [`Self::scores`], and with `robustness_seed` Quantus's robustness estimates from the same
    /// attribution, the word embeddings perturbed (every token's, the special tokens' too: they
    /// are the input as the method sees it).
    fn scores_with(
        &self,
        bert: &Bert,
        ids: &[u32],
        word_ids: &[Option<u32>],
        target: usize,
        robustness_seed: Option<u64>,
    ) -> Result<Scored> {
        let (input, method, a) = self.attribute(bert, ids, word_ids, target)?;
        let map = a.map.as_slice().expect("standard layout");
        let x: Vec<f32> = input.x.flatten_all()?.to_vec1()?;
        let mask: Vec<f32> = input
            .model
            .input(&Tensor::new(&[[self.mask_id]], &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1()?;
        let scores = map
            .chunks(self.hidden)
            .map(|r| r.iter().map(|&v| v as f64).sum::<f64>() as f32)
            .collect();
        let first_order = map
            .chunks(self.hidden)
            .zip(x.chunks(self.hidden))
            .map(|(phi, e)| {
                phi.iter()
                    .zip(e)
                    .zip(&mask)
                    .map(|((&p, &e), &m)| p as f64 * (e - m) as f64)
                    .sum()
            })
            .collect();
        let robustness = robustness_seed
            .map(|seed| robustness(&input.model, method.as_ref(), &input.x, map, target, seed))
            .transpose()?;
        Ok(Scored {
            scores,
            first_order,
            completeness: a.completeness.map(|c| (c.delta, c.output_difference.abs())),
            robustness,
        })
    }
}

/// What one method's explanation of one text scores.
struct OnText {
    scored: Scored,
    curves: [f64; 4],
    eraser: Vec<[f64; 4]>,
    perturbation: PerturbationScores,
    complexity: Option<MapComplexity>,
    /// (mass on the rationale, pointing, token F1, AUPRC), where the text has rationales.
    plausibility: [Option<f64>; 4],
    random_logit: Option<StageSimilarity>,
}

/// One text as the checks read it.
struct Read<'a> {
    e: &'a Encoded,
    /// The word tokens' positions.
    words: &'a [usize],
    in_rationale: Option<&'a [bool]>,
    target: usize,
    /// The target's probability on the whole text.
    full: f64,
    /// Its index among the audited texts (seeds the random draws).
    index: usize,
}

/// The model under audit and what the checks share.
struct Checks<'a> {
    bert: &'a Bert,
    mask_id: u32,
    pad: u32,
    classes: usize,
    seed: u64,
}

impl Checks<'_> {
    /// Every check of one method on one text; robustness and the random logit test only on the
    /// randomisation check's texts (`sanity`), as for images.
    fn measure(&self, scorer: &Scorer, t: &Read, sanity: bool) -> Result<OnText> {
        let (bert, ids, words) = (self.bert, &t.e.ids, t.words);
        let mix = (t.index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let robustness_seed = sanity.then_some(self.seed ^ 0x0B05 ^ mix);
        let scored = scorer.scores_with(bert, ids, &t.e.word_ids, t.target, robustness_seed)?;
        let rel = &scored.scores;
        let mut order = words.to_vec();
        order.sort_by(|&a, &b| rel[b].total_cmp(&rel[a]).then(a.cmp(&b)));
        let mut random = words.to_vec();
        shuffle(&mut random, self.seed ^ mix);
        let (curves, eraser) = faithfulness(
            bert,
            ids,
            words,
            &order,
            &random,
            (self.mask_id, self.pad),
            t.target,
            t.full,
        )?;
        let perturbation = token_perturbation_scores(
            |variants: &[Vec<usize>]| -> Result<Vec<f64>> {
                let masked: Vec<Vec<u32>> = variants
                    .iter()
                    .map(|hide| {
                        let mut v = ids.clone();
                        for &i in hide {
                            v[i] = self.mask_id;
                        }
                        v
                    })
                    .collect();
                Ok(class_logits(bert, &masked, self.pad)?
                    .into_iter()
                    .map(|l| l[t.target])
                    .collect())
            },
            words,
            rel,
            &scored.first_order,
            self.seed ^ 0xFA17 ^ mix,
        )?;
        let mut random_logit = None;
        if sanity && self.classes > 1 {
            let mut state = self.seed ^ 0x5EED ^ mix;
            let draw = splitmix64(&mut state) % (self.classes as u64 - 1);
            let other = (t.target + 1 + draw as usize) % self.classes;
            let theirs = scorer.scores(bert, ids, &t.e.word_ids, other)?.scores;
            let row =
                |v: &[f32]| ndarray::Array2::from_shape_fn((1, words.len()), |(_, j)| v[words[j]]);
            random_logit = Some(StageSimilarity {
                stage: format!("class {other}"),
                spearman: rank_similarity(rel, &theirs, words),
                ssim: ssim(
                    &normalised_magnitude(&row(rel)),
                    &normalised_magnitude(&row(&theirs)),
                ),
            });
        }
        Ok(OnText {
            complexity: MapComplexity::of(words.iter().map(|&i| rel[i])),
            plausibility: t
                .in_rationale
                .map_or([None; 4], |r| plausibility(rel, &order, words, r)),
            scored,
            curves,
            eraser,
            perturbation,
            random_logit,
        })
    }
}

/// Against a text's rationale (per token, inside a span): the share of positive relevance on
/// it, whether the top token is in it (pointing), token F1 of the top-|R| tokens, and AUPRC.
fn plausibility(rel: &[f32], order: &[usize], words: &[usize], r: &[bool]) -> [Option<f64>; 4] {
    let positive = |i: usize| rel[i].max(0.0) as f64;
    let total: f64 = words.iter().map(|&i| positive(i)).sum();
    let on: f64 = words.iter().filter(|&&i| r[i]).map(|&i| positive(i)).sum();
    let mass = if total > 0.0 { on / total } else { 0.0 };
    let pointing = f64::from(u8::from(r[order[0]]));
    let size = words.iter().filter(|&&i| r[i]).count();
    let (mut f1, mut ap) = (None, None);
    if size > 0 {
        let hits = order[..size.min(order.len())]
            .iter()
            .filter(|&&i| r[i])
            .count();
        f1 = Some(hits as f64 / size as f64);
        let w_scores: Vec<f32> = words.iter().map(|&i| rel[i]).collect();
        let w_labels: Vec<bool> = words.iter().map(|&i| r[i]).collect();
        ap = average_precision(&w_scores, &w_labels);
    }
    [Some(mass), Some(pointing), f1, ap]
}

impl TextMethodResult {
    fn summarise(method: String, on: &[OnText], randomised_spearman: Option<f64>) -> Self {
        let mean = |v: Vec<f64>| (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64);
        let robust: Vec<ImageRobustness> = on.iter().filter_map(|o| o.scored.robustness).collect();
        let logit: Vec<&StageSimilarity> =
            on.iter().filter_map(|o| o.random_logit.as_ref()).collect();
        TextMethodResult {
            method,
            texts: on.len(),
            gain_over_random: mean(
                on.iter()
                    .map(|o| (o.curves[2] - o.curves[0]) + (o.curves[1] - o.curves[3]))
                    .collect(),
            )
            .unwrap_or(f64::NAN),
            perturbation: Perturbation::summarise(
                &on.iter().map(|o| o.perturbation).collect::<Vec<_>>(),
            ),
            robustness: Robustness::summarise(&robust),
            random_logit: (!logit.is_empty()).then(|| RandomLogit {
                images: logit.len(),
                spearman: logit.iter().map(|l| l.spearman).sum::<f64>() / logit.len() as f64,
                ssim: logit.iter().map(|l| l.ssim).sum::<f64>() / logit.len() as f64,
            }),
            complexity: Complexity::summarise(
                &on.iter().filter_map(|o| o.complexity).collect::<Vec<_>>(),
            ),
            randomised_spearman,
            mass_on_rationale: mean(on.iter().filter_map(|o| o.plausibility[0]).collect()),
            pointing_game: mean(on.iter().filter_map(|o| o.plausibility[1]).collect()),
        }
    }

    /// The row of `finelens evaluate`'s table (the image audit's columns; ROAD is images' only).
    pub fn row(&self) -> crate::audit::MethodRow {
        let p = self.perturbation;
        (
            self.method.clone(),
            [
                self.randomised_spearman,
                Some(self.gain_over_random),
                None,
                p.map(|p| p.faithfulness_correlation),
                p.map(|p| p.monotonicity),
                p.map(|p| p.infidelity),
                self.robustness.map(|r| r.max_sensitivity),
                self.random_logit.map(|r| r.ssim),
                self.complexity.as_ref().map(|c| c.mean_sparseness),
                self.complexity.as_ref().map(|c| c.mean_relative_complexity),
                self.mass_on_rationale,
                self.pointing_game,
            ],
        )
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
    // The methods that give every token a score on the word embeddings; the first is gated,
    // `finelens evaluate` measures them all.
    let gradient = |s: &&MethodSpec| {
        !matches!(s.method, Method::GradCam | Method::Occlusion)
            && !Method::TEXT_ONLY.contains(&s.method)
            && !Method::RELU_RULES.contains(&s.method)
    };
    let specs: Vec<MethodSpec> = job
        .methods
        .iter()
        .filter(gradient)
        .take(if job.evaluate { usize::MAX } else { 1 })
        .map(|s| {
            let mut spec = MethodSpec {
                method: s.method,
                options: s.options.or(&job.shared),
            };
            if spec.method == Method::IntegratedGradients && spec.options.baseline.is_none() {
                spec.options.baseline = Some(BaselineSpec::Tokens(TokenBaseline::Pad));
            }
            spec
        })
        .collect();
    let Some(spec) = specs.first() else {
        return Err(settings("audit: no gradient method to gate on (integrated_gradients, saliency, gradient_x_input…)"));
    };
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
    let scorer_of = |spec| Scorer {
        spec,
        hidden: m.spec.config.hidden_size,
        pad,
        mask_id,
    };
    let scorer = scorer_of(spec);
    let checks = Checks {
        bert: &bert,
        mask_id,
        pad,
        classes: m.classes.len(),
        seed: job.seed,
    };
    let n_sanity = job.sanity_images.min(samples.len());
    progress(Event::Info(format!(
        "auditing {} on {} text(s) of {} with {}",
        dir.display(),
        samples.len(),
        job.data.display(),
        specs
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", ")
    )));
    progress(Event::Stage {
        name: "audit",
        total: samples.len() * specs.len(),
        unit: "texts",
    });
    let mut texts = Vec::new();
    let mut encoded = Vec::new();
    let mut gated = Vec::new();
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
        let in_rationale: Option<Vec<bool>> = (!s.rationale.is_empty()).then(|| {
            e.offsets
                .iter()
                .zip(&e.word_ids)
                .map(|(&(a, b), w)| w.is_some() && s.rationale.iter().any(|&(x, y)| a < y && x < b))
                .collect()
        });
        let on = checks.measure(
            &scorer,
            &Read {
                e: &e,
                words: &words,
                in_rationale: in_rationale.as_deref(),
                target: predicted,
                full: probs[predicted],
                index: k,
            },
            k < n_sanity,
        )?;
        let [mass, pointing, f1, ap] = on.plausibility;
        texts.push(AuditedText {
            complexity: on.complexity,
            perturbation: Some(on.perturbation),
            robustness: on.scored.robustness,
            random_logit: on.random_logit.clone(),
            source: s.source.clone(),
            text: s.text.clone(),
            label: m.classes[s.label].clone(),
            predicted: m.classes[predicted].clone(),
            probability: probs[predicted] as f32,
            tokens: e.tokens.clone(),
            relevance: on.scored.scores.clone(),
            in_rationale,
            deletion_auc: on.curves[0],
            insertion_auc: on.curves[1],
            random_deletion_auc: on.curves[2],
            random_insertion_auc: on.curves[3],
            eraser: on.eraser.clone(),
            mass_on_rationale: mass,
            pointing: pointing.map(|p| p > 0.5),
            token_f1: f1,
            auprc: ap,
            completeness: on.scored.completeness,
        });
        gated.push(on);
        encoded.push((e, words, predicted));
        progress(Event::Advance {
            done: k + 1,
            item: &s.source,
        });
    }
    // `finelens evaluate`: the other methods on the same texts.
    let mut others = Vec::new();
    for (mi, spec) in specs.iter().enumerate().skip(1) {
        let scorer = scorer_of(spec);
        let mut on = Vec::new();
        for (k, ((e, words, target), t)) in encoded.iter().zip(&texts).enumerate() {
            on.push(checks.measure(
                &scorer,
                &Read {
                    e,
                    words,
                    in_rationale: t.in_rationale.as_deref(),
                    target: *target,
                    full: t.probability as f64,
                    index: k,
                },
                k < n_sanity,
            )?);
            progress(Event::Advance {
                done: mi * texts.len() + k + 1,
                item: &t.source,
            });
        }
        others.push((spec, on));
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
    let randomised = |prefixes: &[String]| -> Result<Bert> {
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
        Ok(Bert::new(m.spec.clone(), &store.frozen_as(DType::F32)?)?)
    };
    // Spearman ρ of a method's |token scores| (`own`, per text) under a randomised model with
    // the trained model's, on the randomisation check's texts.
    let rho = |scorer: &Scorer, own: &[&[f32]], random: &Bert| -> Result<f64> {
        let mut rho = 0.0;
        for ((e, words, target), own) in encoded.iter().zip(own).take(n_sanity) {
            let r = scorer.scores(random, &e.ids, &e.word_ids, *target)?.scores;
            rho += rank_similarity(own, &r, words);
        }
        Ok(rho / n_sanity as f64)
    };
    let relevance: Vec<&[f32]> = texts.iter().map(|t| t.relevance.as_slice()).collect();
    let randomised_rho =
        |prefixes: &[String]| -> Result<f64> { rho(&scorer, &relevance, &randomised(prefixes)?) };
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
    let mut methods = vec![TextMethodResult::summarise(
        spec.to_string(),
        &gated,
        sanity.cascading.last().map(|c| c.1),
    )];
    if !others.is_empty() {
        let all: Vec<String> = stages.iter().flat_map(|s| s.prefixes.clone()).collect();
        let random = randomised(&all)?;
        for (spec, on) in &others {
            let own: Vec<&[f32]> = on.iter().map(|o| o.scored.scores.as_slice()).collect();
            let r = rho(&scorer_of(spec), &own, &random)?;
            methods.push(TextMethodResult::summarise(spec.to_string(), on, Some(r)));
        }
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
    let first = &methods[0];
    finelens_audit::run::insert_quantus_figures(
        &mut figures,
        first.perturbation.as_ref(),
        first.robustness.as_ref(),
        first.random_logit.as_ref(),
        first.complexity.as_ref(),
    );
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
        methods,
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
    let na = |v: Option<f64>| v.map_or("—".into(), |v| format!("{v:.3}"));
    for m in &r.methods {
        let p = m.perturbation;
        lines.push(format!(
            "{}: faithfulness correlation {}, monotonicity {}, infidelity {}, max-sensitivity {}, \
             random-logit SSIM {}, sparseness {}",
            m.method,
            na(p.map(|p| p.faithfulness_correlation)),
            na(p.map(|p| p.monotonicity)),
            na(p.map(|p| p.infidelity)),
            na(m.robustness.map(|r| r.max_sensitivity)),
            na(m.random_logit.map(|r| r.ssim)),
            na(m.complexity.as_ref().map(|c| c.mean_sparseness)),
        ));
    }
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
    b.push(Block::Heading(3, "Quantus's figures per method".into()));
    b.push(Block::Paragraph(
        "Over the word tokens, [MASK] standing in for a removed token: faithfulness correlation \
         (Bhatt et al. 2020; random quarters of the words, Pearson of their score sums with the \
         logit's drop), monotonicity (Nguyen & Martínez 2020; each word alone, Spearman of \
         |score| with |logit change|), infidelity (Yeh et al. 2019; the same subsets, the scores' \
         first-order prediction (e − e_[MASK])ᵀφ against the drop, at the best scale; low is \
         good). On the randomisation check's texts: max- and avg-sensitivity and the local \
         Lipschitz estimate (Yeh et al. 2019; Alvarez-Melis & Jaakkola 2018; the word embeddings \
         perturbed by 2% of their range, 8 draws), the random-logit test (Sixt et al. 2020; \
         SSIM of |scores| as a 1-D signal against a random other class's; low is good) and ρ with \
         every weight random. Sparseness (Gini; Chalasani et al. 2020) and relative entropy \
         (Bhatt et al. 2020) of |scores|; relevance mass and pointing against the rationales."
            .into(),
    ));
    let opt = |v: Option<f64>| Cell::Number(v.unwrap_or(f64::NAN), 3);
    b.push(Block::Table(
        [
            "method",
            "ρ, all random",
            "gain over random",
            "faithfulness corr.",
            "monotonicity",
            "infidelity",
            "max-sensitivity",
            "avg-sensitivity",
            "local Lipschitz",
            "SSIM, random logit",
            "sparseness",
            "relative entropy",
            "mass on rationale",
            "pointing",
        ]
        .map(String::from)
        .to_vec(),
        r.methods
            .iter()
            .map(|m| {
                let (p, rb) = (m.perturbation, m.robustness);
                vec![
                    Cell::Text(m.method.clone()),
                    opt(m.randomised_spearman),
                    Cell::Number(m.gain_over_random, 3),
                    opt(p.map(|p| p.faithfulness_correlation)),
                    opt(p.map(|p| p.monotonicity)),
                    opt(p.map(|p| p.infidelity)),
                    opt(rb.map(|r| r.max_sensitivity)),
                    opt(rb.map(|r| r.avg_sensitivity)),
                    opt(rb.map(|r| r.local_lipschitz)),
                    opt(m.random_logit.map(|r| r.ssim)),
                    opt(m.complexity.as_ref().map(|c| c.mean_sparseness)),
                    opt(m.complexity.as_ref().map(|c| c.mean_relative_complexity)),
                    opt(m.mass_on_rationale),
                    opt(m.pointing_game),
                ]
            })
            .collect(),
    ));
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
