//! Drift of a text model folder from its parent: how far fine-tuning moved each weight (by
//! Hugging Face's names, whichever spelling each folder uses; grouped into the embeddings, each
//! `encoder.layer.N`, the pooler and the head), each layer's representations (minibatch linear
//! CKA of the [CLS] vector — or, with `--pooled`, the mean over tokens; the embeddings' always,
//! their [CLS] row being the same for every text — on probe texts), each
//! head's attention (the mean Jensen–Shannon distance between the two models' attention
//! distributions, row by row) and the explanations (Spearman ρ and top-k overlap of per-token
//! |integrated gradients|).

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use finelens_attrib::{BaselineSpec, EmbeddingNorm, Method, MethodSpec, Target, TokenBaseline};
use finelens_data::text::synth::sentence;
use finelens_data::text::{TextSynthConfig, TextTask, TextTokenizer};
use finelens_data::Split;
use finelens_drift::cka::{gram_linear, MinibatchCka, RepresentationDrift};
use finelens_drift::explanation::{spearman, top_k_iou};
use finelens_drift::{weight_drift_described, WeightDrift, WeightDriftOptions};
use finelens_models::bert::{canonical_name, read_hf_folder, Bert, OnWordEmbeddings, WEIGHTS_FILE};
use finelens_models::{checkpoint, Classifier, Mode};
use finelens_report::html::{Block, Cell};
use serde::{Deserialize, Serialize};

use crate::drift::{DriftSettings, ExplanationDrift, FileRef, Probe, MIN_CKA_BATCH};
use crate::error::{input, settings, Result};
use crate::output::{OutputDir, Versioned};
use crate::progress::{Event, Progress};
use crate::text::{load_text_model, TextModel, DEFAULT_MAX_LENGTH};
use crate::text_explain::TextInput;

/// How far each attention head's distributions moved.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AttentionDrift {
    /// Per layer, per head: the mean over probe texts and query tokens of the Jensen–Shannon
    /// distance (√ of the divergence, base 2: 0 the same distribution, 1 disjoint ones).
    pub js_distance: Vec<Vec<f64>>,
    pub texts: usize,
}

/// `drift.json` of a text model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TextDriftReport {
    pub schema_version: String,
    pub before: FileRef,
    pub after: FileRef,
    pub weights: WeightDrift,
    pub representation: Option<RepresentationDrift>,
    pub attention: Option<AttentionDrift>,
    pub explanation: Option<ExplanationDrift>,
}

impl Versioned for TextDriftReport {
    const SCHEMA: &'static str = "finelens-text-drift/1";
    fn schema_version(&self) -> &str {
        &self.schema_version
    }
}

/// The parent: a folder with a classifier as it is; a bare encoder (all-MiniLM's) with the
/// child's kind of head freshly initialised (representations and attention do not depend on it).
pub(crate) fn parent_of(dir: &Path, child: &TextModel) -> Result<TextModel> {
    if let Ok(m) = load_text_model(dir) {
        return Ok(m);
    }
    let folder = read_hf_folder(dir)?;
    let (spec, store) = folder.store(child.spec.head, child.classes.len(), 0)?;
    Ok(TextModel {
        dir: dir.to_owned(),
        sha256: folder.sha256.clone(),
        spec,
        classes: Vec::new(),
        store,
        record: None,
    })
}

/// How far each weight of the folder `after_dir` (read as `after`) moved from `before_dir`'s, by
/// Hugging Face's names whichever spelling each folder uses, grouped by `after`'s stages.
pub(crate) fn weight_drift(
    before_dir: &Path,
    after_dir: &Path,
    after: &TextModel,
    spectral: crate::drift::Spectral,
) -> Result<WeightDrift> {
    Ok(weight_drift_described(
        &before_dir.join(WEIGHTS_FILE),
        &after_dir.join(WEIGHTS_FILE),
        WeightDriftOptions {
            canonical: Some(canonical_name),
            ..spectral.options()
        },
        Some(after.spec.describe()),
    )?)
}

/// The probe texts: a text set or `.txt` file, or the synthetic sentiment task's test sentences.
fn probe_texts(s: &DriftSettings) -> Result<Vec<String>> {
    Ok(match &s.probe {
        Probe::None => Vec::new(),
        Probe::Folder(p) => crate::text_explain::read_texts(p, None, Some(s.limit))?
            .into_iter()
            .map(|(_, text, _)| text)
            .collect(),
        Probe::Synth => {
            let cfg = TextSynthConfig::default();
            (0..cfg.test_per_class)
                .flat_map(|i| (0..2).map(move |c| (c, i)))
                .map(|(c, i)| sentence(TextTask::TextSentiment, Split::Test, c, i, &cfg).text)
                .take(s.limit)
                .collect()
        }
    })
}

/// Per layer: its weights' relative change, the CKA of its representations (`cka` names which)
/// and its attention's Jensen–Shannon distance averaged over heads.
pub(crate) fn layer_table(
    weights: &WeightDrift,
    rep: &RepresentationDrift,
    att: &AttentionDrift,
    cka: &str,
) -> Block {
    Block::Table(
        [
            "layer",
            "weights ‖ΔW‖/‖W₀‖",
            cka,
            "attention drift (JS distance, mean over heads)",
        ]
        .map(String::from)
        .to_vec(),
        rep.layers
            .iter()
            .zip(&rep.diagonal)
            .map(|(l, c)| {
                let js = l
                    .strip_prefix("encoder.layer.")
                    .and_then(|i| i.parse::<usize>().ok())
                    .and_then(|i| att.js_distance.get(i))
                    .map_or(f64::NAN, |h| h.iter().sum::<f64>() / h.len().max(1) as f64);
                let moved = weights
                    .stages
                    .iter()
                    .find(|g| g.name == *l)
                    .map_or(f64::NAN, |g| g.relative_l2_change);
                vec![
                    Cell::Text(l.clone()),
                    Cell::Number(moved, 4),
                    Cell::Number(*c, 3),
                    Cell::Number(js, 3),
                ]
            })
            .collect(),
    )
}

/// Jensen–Shannon distance between two distributions (base 2, in [0, 1]).
pub fn js_distance(p: &[f32], q: &[f32]) -> f64 {
    let kl = |a: f64, m: f64| if a > 0.0 { a * (a / m).log2() } else { 0.0 };
    let d: f64 = p
        .iter()
        .zip(q)
        .map(|(&a, &b)| {
            let (a, b) = (a as f64, b as f64);
            let m = 0.5 * (a + b);
            0.5 * kl(a, m) + 0.5 * kl(b, m)
        })
        .sum();
    d.max(0.0).sqrt()
}

/// Per text of a minibatch, per layer, one model's representation vector.
type Minibatch = Vec<Vec<Vec<f32>>>;

/// One text through one model: the representation vectors at `layers` and every attention.
struct Pass {
    vectors: Vec<Vec<f32>>,
    attention: Vec<Vec<f32>>,
}

fn pass(
    model: &OnWordEmbeddings,
    x: &Tensor,
    names: &[&str],
    layers: usize,
    pooled: bool,
) -> Result<Pass> {
    let (_, taps) = model.forward_with_taps(x, Mode::Eval, names)?;
    let mut vectors = Vec::with_capacity(layers);
    for (t, name) in taps[..layers].iter().zip(names) {
        let t = t.to_dtype(DType::F32)?;
        // At `embeddings` the [CLS] row is the same for every text (its word, position 0, type
        // 0, normalised): no representation to compare, so the embeddings are always pooled.
        let v = match t.rank() {
            3 if pooled || *name == "embeddings" => t.mean(1)?.flatten_all()?,
            3 => t.narrow(1, 0, 1)?.flatten_all()?,
            _ => t.flatten_all()?,
        };
        vectors.push(v.to_vec1()?);
    }
    let attention = taps[layers..]
        .iter()
        .map(|a| Ok(a.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?))
        .collect::<Result<_>>()?;
    Ok(Pass { vectors, attention })
}

/// Both models over the probe texts: minibatch CKA at `layers` and the attention's
/// Jensen–Shannon drift per layer and head.
#[allow(clippy::too_many_arguments)]
pub(crate) fn probe_drift(
    b0: &Bert,
    b1: &Bert,
    tok: &TextTokenizer,
    texts: &[String],
    layers: &[String],
    pooled: bool,
    batch_size: usize,
    n_layers: usize,
    heads: usize,
    progress: Progress,
) -> Result<(RepresentationDrift, AttentionDrift)> {
    let attention_names: Vec<String> = (0..n_layers)
        .map(|i| format!("encoder.layer.{i}.attention"))
        .collect();
    let names: Vec<&str> = layers
        .iter()
        .chain(&attention_names)
        .map(String::as_str)
        .collect();
    let mut acc = MinibatchCka::new(layers.len(), layers.len());
    let mut js = vec![vec![0f64; heads]; n_layers];
    let mut rows = 0usize;
    let mut batch: (Minibatch, Minibatch) = (Vec::new(), Vec::new());
    let flush = |batch: &mut (Minibatch, Minibatch), acc: &mut MinibatchCka| -> Result<()> {
        let n = batch.0.len();
        if n >= MIN_CKA_BATCH {
            let grams = |side: &Minibatch| -> Result<Vec<Vec<f64>>> {
                (0..layers.len())
                    .map(|l| {
                        let d = side[0][l].len();
                        let flat: Vec<f32> =
                            side.iter().flat_map(|v| v[l].iter().copied()).collect();
                        Ok(gram_linear(&Tensor::from_vec(flat, (n, d), &Device::Cpu)?)?)
                    })
                    .collect()
            };
            acc.update(&grams(&batch.0)?, &grams(&batch.1)?, n);
        }
        batch.0.clear();
        batch.1.clear();
        Ok(())
    };
    progress(Event::Stage {
        name: "probe",
        total: texts.len(),
        unit: "texts",
    });
    for (k, text) in texts.iter().enumerate() {
        let e = tok.encode(text)?;
        let t = e.ids.len();
        let row = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, t), &Device::Cpu);
        let on = |b| -> Result<OnWordEmbeddings> {
            Ok(OnWordEmbeddings {
                bert: b,
                type_ids: row(&e.type_ids)?,
                mask: Tensor::ones((1, t), DType::U32, &Device::Cpu)?,
            })
        };
        let (m0, m1) = (on(b0)?, on(b1)?);
        let ids = row(&e.ids)?;
        let p0 = pass(&m0, &m0.input(&ids)?, &names, layers.len(), pooled)?;
        let p1 = pass(&m1, &m1.input(&ids)?, &names, layers.len(), pooled)?;
        for (l, (a0, a1)) in p0.attention.iter().zip(&p1.attention).enumerate() {
            for (h, js_h) in js[l].iter_mut().enumerate() {
                for r in 0..t {
                    let at = (h * t + r) * t;
                    *js_h += js_distance(&a0[at..at + t], &a1[at..at + t]);
                }
            }
        }
        rows += t;
        batch.0.push(p0.vectors);
        batch.1.push(p1.vectors);
        if batch.0.len() == batch_size {
            flush(&mut batch, &mut acc)?;
        }
        progress(Event::Advance {
            done: k + 1,
            item: "",
        });
    }
    flush(&mut batch, &mut acc)?;
    progress(Event::StageEnd);
    let rep = RepresentationDrift::from_minibatches(layers, pooled, &acc)?;
    let js_distance = js
        .into_iter()
        .map(|l| l.into_iter().map(|v| v / rows.max(1) as f64).collect())
        .collect();
    Ok((
        rep,
        AttentionDrift {
            js_distance,
            texts: texts.len(),
        },
    ))
}

/// Weight, representation, attention and explanation drift of the text model folder `s.after`
/// from `s.before`.
pub fn drift_text(s: &DriftSettings, progress: Progress) -> Result<TextDriftReport> {
    if s.batch_size < MIN_CKA_BATCH {
        return Err(settings(format!(
            "the probe batch size must be at least {MIN_CKA_BATCH} (the unbiased CKA estimator's minimum), got {}",
            s.batch_size
        )));
    }
    OutputDir::check(&s.out, s.force)?;
    let started = Instant::now();
    let (before_dir, after_dir) = (&s.before.path, &s.after.path);
    let after = load_text_model(after_dir)?;
    let before = parent_of(before_dir, &after)?;
    if before.spec.config.hidden_size != after.spec.config.hidden_size
        || before.spec.config.num_hidden_layers != after.spec.config.num_hidden_layers
    {
        return Err(input(
            before_dir,
            format!(
                "a {}-layer, {}-wide encoder; {} has {} layers, {} wide",
                before.spec.config.num_hidden_layers,
                before.spec.config.hidden_size,
                after_dir.display(),
                after.spec.config.num_hidden_layers,
                after.spec.config.hidden_size
            ),
        ));
    }
    let (w0, w1) = (before_dir.join(WEIGHTS_FILE), after_dir.join(WEIGHTS_FILE));
    let weights = weight_drift(before_dir, after_dir, &after, s.spectral)?;
    progress(Event::Info(crate::drift::weight_summary(&weights)));

    let mut report = TextDriftReport {
        schema_version: TextDriftReport::SCHEMA.into(),
        before: FileRef {
            path: before_dir.clone(),
            sha256: checkpoint::sha256_file(&w0)?,
        },
        after: FileRef {
            path: after_dir.clone(),
            sha256: checkpoint::sha256_file(&w1)?,
        },
        weights,
        representation: None,
        attention: None,
        explanation: None,
    };

    let texts = probe_texts(s)?;
    if s.probe != Probe::None {
        if texts.len() < MIN_CKA_BATCH {
            return Err(settings(format!(
                "the probe set has {} text(s); CKA needs at least {MIN_CKA_BATCH}",
                texts.len()
            )));
        }
        let max_length = after
            .record
            .as_ref()
            .map_or(DEFAULT_MAX_LENGTH, |r| r.max_length);
        let tok = TextTokenizer::from_file(&after_dir.join("tokenizer.json"), max_length)?;
        let b0 = Bert::new(before.spec.clone(), &before.store.frozen_as(DType::F32)?)?;
        let b1 = Bert::new(after.spec.clone(), &after.store.frozen_as(DType::F32)?)?;
        let layers = if s.layers.is_empty() {
            after.spec.describe().representation_layers
        } else {
            s.layers.clone()
        };
        let known = b1.layer_names();
        if let Some(l) = layers.iter().find(|l| !known.contains(l)) {
            return Err(settings(format!(
                "unknown layer `{l}`; layers are: {}",
                known.join(", ")
            )));
        }
        let t0 = Instant::now();
        let (rep, attention) = probe_drift(
            &b0,
            &b1,
            &tok,
            &texts,
            &layers,
            s.pooled,
            s.batch_size,
            after.spec.config.num_hidden_layers,
            after.spec.config.num_attention_heads,
            progress,
        )?;
        let js = attention.js_distance.clone();
        let mut lines = vec![format!(
            "representation drift: linear CKA of the {} on {} probe texts in {:.1} s",
            if s.pooled {
                "mean token vector"
            } else {
                "[CLS] vector"
            },
            rep.examples,
            t0.elapsed().as_secs_f64()
        )];
        for (l, c) in rep.layers.iter().zip(&rep.diagonal) {
            lines.push(format!("  {l:<28} {c:>7.4}"));
        }
        lines.push("attention drift (mean Jensen–Shannon distance per layer, over heads):".into());
        for (i, l) in js.iter().enumerate() {
            lines.push(format!(
                "  encoder.layer.{i:<14} {:>7.4}",
                l.iter().sum::<f64>() / l.len().max(1) as f64
            ));
        }
        progress(Event::Info(lines.join("\n")));
        report.representation = Some(rep);
        report.attention = Some(attention);
        if s.explain_images > 0 {
            let ex = explanation_drift(s, &b0, &b1, &before, &after, &tok, &texts)?;
            progress(Event::Info(format!(
                "explanation drift ({}, target: {}): Spearman ρ of per-token |attribution| {:.3}, top-{:.0}% token overlap {:.3} (mean of {} texts)",
                ex.method,
                if before.classes == after.classes { "the predicted class's logit" } else { "the pooled vector's norm" },
                ex.mean_spearman,
                s.top_fraction * 100.0,
                ex.mean_top_iou,
                ex.spearman.len()
            )));
            report.explanation = Some(ex);
        }
    }
    crate::drift::write_drift(
        s,
        (&report.weights, report.representation.as_ref()),
        &report,
        started,
        progress,
    )?;
    Ok(report)
}

/// Per-token |attribution| (the sum over hidden units) of both models on the first
/// `explain_images` probe texts: Spearman ρ and the overlap of the top fraction of tokens. With
/// the same classes the after model's predicted logit is explained, otherwise the norm of the
/// pooled vector (the head's input), as for images.
#[allow(clippy::too_many_arguments)]
fn explanation_drift(
    s: &DriftSettings,
    b0: &Bert,
    b1: &Bert,
    before: &TextModel,
    after: &TextModel,
    tok: &TextTokenizer,
    texts: &[String],
) -> Result<ExplanationDrift> {
    let same = before.classes == after.classes;
    let mut spec = MethodSpec {
        method: s.explain_method.method,
        options: s.explain_method.options.or(&s.shared),
    };
    if spec.method == Method::IntegratedGradients && spec.options.baseline.is_none() {
        spec.options.baseline = Some(BaselineSpec::Tokens(TokenBaseline::Pad));
    }
    let pad = after.spec.config.pad_token_id;
    let (mut rho, mut iou) = (Vec::new(), Vec::new());
    for text in texts.iter().take(s.explain_images) {
        let e = tok.encode(text)?;
        let hidden = after.spec.config.hidden_size;
        let mut scores = Vec::new();
        let mut target = None;
        for b in [b1, b0] {
            let input = TextInput::new(b, &e.ids, &e.type_ids, &e.word_ids)?;
            let (model, x) = (&input.model, &input.x);
            let norm = EmbeddingNorm {
                model,
                layer: "pooler".into(),
            };
            let explained: &dyn Classifier = if same { model } else { &norm };
            let method = input.methods([&spec], pad, None)?.remove(0);
            let c = match target {
                Some(c) => c,
                None => {
                    let c = if same {
                        finelens_attrib::predict(explained, x, &Target::Predicted)?[0].target
                    } else {
                        0
                    };
                    target = Some(c);
                    c
                }
            };
            let a = method.attribute(explained, x, &[c])?.remove(0);
            let map = a.map.as_slice().expect("standard layout");
            scores.push(
                map.chunks(hidden)
                    .map(|r| r.iter().sum::<f32>().abs())
                    .collect::<Vec<f32>>(),
            );
        }
        rho.push(spearman(&scores[0], &scores[1]));
        iou.push(top_k_iou(&scores[0], &scores[1], s.top_fraction));
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    Ok(ExplanationDrift {
        method: spec.method.name().into(),
        target: if same {
            crate::drift::DriftTarget::ClassLogit
        } else {
            crate::drift::DriftTarget::EmbeddingNorm
        },
        top_fraction: s.top_fraction,
        mean_spearman: mean(&rho),
        mean_top_iou: mean(&iou),
        spearman: rho,
        top_iou: iou,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jensen_shannon_distance_is_zero_on_equal_and_one_on_disjoint() {
        let p = [0.2, 0.3, 0.5];
        assert!(js_distance(&p, &p).abs() < 1e-12);
        assert!((js_distance(&[1.0, 0.0], &[0.0, 1.0]) - 1.0).abs() < 1e-12);
        let (a, b) = ([0.9, 0.1], [0.5, 0.5]);
        let d = js_distance(&a, &b);
        assert!(d > 0.0 && d < 1.0 && (d - js_distance(&b, &a)).abs() < 1e-15);
        // By hand: M = (0.7, 0.3); JS = ½KL(a‖M) + ½KL(b‖M) in bits.
        let kl = |p: [f64; 2], m: [f64; 2]| -> f64 {
            p.iter().zip(m).map(|(p, m)| p * (p / m).log2()).sum()
        };
        let want = (0.5 * kl([0.9, 0.1], [0.7, 0.3]) + 0.5 * kl([0.5, 0.5], [0.7, 0.3])).sqrt();
        assert!((d - want).abs() < 1e-7, "{d} vs {want}");
    }
}
