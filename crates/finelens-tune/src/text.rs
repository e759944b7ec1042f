//! Fine-tuning BERT-family encoders on labelled text: tokenized batches for the training loop
//! (shuffled per epoch, padded per batch, dropout seeded per step), freeze policies in BERT's
//! terms, AdamW's usual exclusions from weight decay, and the run (an optional linear probe, then
//! fine-tuning; the best epoch handed to the caller to save).

use candle_core::{Device, Tensor};
use finelens_models::bert::{Bert, BertSpec, ENCODER};
use finelens_models::{Mode, ParamStore, TokenBatch};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::error::{Result, TuneError};
use crate::metrics::{cross_entropy, Metrics};
use crate::phases::{lp_ft, run_phases, PhaseEvent, PhaseHooks, ResumeState};
use crate::train::{fit_task, Batches, EpochRecord, Progress, Supervised, TrainConfig};
use crate::{glob_match, TrainingKind, TrainingRecord};

/// One tokenized, labelled text.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizedSample {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
    pub label: usize,
}

/// The data of a text run.
pub struct TextData<'a> {
    pub train: &'a [TokenizedSample],
    pub val: &'a [TokenizedSample],
    pub class_names: &'a [String],
    /// The tokenizer's padding id.
    pub pad_id: u32,
}

/// Samples as one batch padded to the longest, and their labels.
pub fn pad_batch(
    samples: &[&TokenizedSample],
    pad_id: u32,
    device: &Device,
) -> Result<(TokenBatch, Tensor)> {
    let ids: Vec<&[u32]> = samples.iter().map(|s| s.ids.as_slice()).collect();
    let types: Vec<&[u32]> = samples.iter().map(|s| s.type_ids.as_slice()).collect();
    let labels: Vec<u32> = samples.iter().map(|s| s.label as u32).collect();
    Ok((
        TokenBatch::padded(&ids, Some(&types), pad_id, device)?,
        Tensor::from_vec(labels, samples.len(), device)?,
    ))
}

/// Evaluate `model` on `samples` (eval mode, batches of `batch_size`).
pub fn evaluate_text(
    model: &Bert,
    samples: &[TokenizedSample],
    pad_id: u32,
    batch_size: usize,
    class_names: &[String],
) -> Result<Metrics> {
    let k = model.spec().classes;
    let mut confusion = vec![vec![0usize; k]; k];
    let mut loss_sum = 0f64;
    for chunk in samples.chunks(batch_size.max(1)) {
        let refs: Vec<&TokenizedSample> = chunk.iter().collect();
        let (batch, labels) = pad_batch(&refs, pad_id, &Device::Cpu)?;
        let logits = model.forward(&batch, Mode::Eval)?.detach();
        loss_sum +=
            cross_entropy(&logits, &labels)?.to_scalar::<f32>()? as f64 * chunk.len() as f64;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        for (s, p) in chunk.iter().zip(pred) {
            if s.label < k {
                confusion[s.label][p as usize] += 1;
            }
        }
    }
    Ok(Metrics::from_confusion(confusion, loss_sum, class_names))
}

struct TextTask<'a> {
    model: &'a Bert,
    data: &'a TextData<'a>,
    batch_size: usize,
    seed: u64,
}

impl Supervised for TextTask<'_> {
    fn train_len(&self) -> usize {
        self.data.train.len()
    }

    fn val_len(&self) -> usize {
        self.data.val.len()
    }

    fn train_batches(&self, epoch: u64) -> Result<Batches<'_>> {
        // Shuffled by (seed, epoch), dropout by (seed, epoch, step): an epoch draws the same
        // batches and masks however the run got there.
        let mut order: Vec<usize> = (0..self.data.train.len()).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(epoch);
        order.shuffle(&mut rng);
        let chunks: Vec<Vec<usize>> = order
            .chunks(self.batch_size)
            .map(<[usize]>::to_vec)
            .collect();
        Ok(Box::new(chunks.into_iter().enumerate().map(
            move |(step, idx)| {
                let refs: Vec<&TokenizedSample> =
                    idx.iter().map(|&i| &self.data.train[i]).collect();
                let (batch, labels) = pad_batch(&refs, self.data.pad_id, &Device::Cpu)?;
                self.model.reseed_dropout(
                    self.seed ^ (epoch << 32) ^ (step as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15),
                );
                Ok((self.model.forward(&batch, Mode::Train)?, labels))
            },
        )))
    }

    fn validate(&self) -> Result<Metrics> {
        evaluate_text(
            self.model,
            self.data.val,
            self.data.pad_id,
            self.batch_size,
            self.data.class_names,
        )
    }
}

/// Which of a BERT's weights stay frozen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TextFreeze {
    /// Train everything.
    None,
    /// Train only the head (a linear probe).
    HeadOnly,
    /// Freeze the embeddings.
    Embeddings,
    /// Freeze the embeddings and encoder layers `from..=to`.
    Layers(usize, usize),
    /// Train the last N encoder layers, the pooler and the head.
    Last(usize),
    /// Freeze the parameters matching any of these globs.
    Globs(Vec<String>),
}

impl TextFreeze {
    /// `none`, `head-only`, `embeddings`, `encoder.layer.A-B`, `last:N`, or comma-separated globs.
    pub fn parse(s: &str) -> Result<Self> {
        let bad = |why: &str| TuneError::Config(format!("freeze policy `{s}`: {why}"));
        Ok(match s {
            "none" => TextFreeze::None,
            "head-only" => TextFreeze::HeadOnly,
            "embeddings" => TextFreeze::Embeddings,
            _ => {
                if let Some(n) = s.strip_prefix("last:") {
                    TextFreeze::Last(
                        n.parse()
                            .map_err(|_| bad("last:N needs a whole number of layers"))?,
                    )
                } else if let Some(range) = s.strip_prefix("encoder.layer.") {
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    let (a, b): (usize, usize) = (
                        a.parse().map_err(|_| bad("expected encoder.layer.A-B"))?,
                        b.parse().map_err(|_| bad("expected encoder.layer.A-B"))?,
                    );
                    if a > b {
                        return Err(bad("the first layer comes after the last"));
                    }
                    TextFreeze::Layers(a, b)
                } else {
                    let globs: Vec<String> = s
                        .split(',')
                        .map(|g| g.trim().to_owned())
                        .filter(|g| !g.is_empty())
                        .collect();
                    if globs.is_empty() {
                        return Err(bad("empty"));
                    }
                    TextFreeze::Globs(globs)
                }
            }
        })
    }

    /// Mark `store`'s weights trainable or frozen for `spec`; the number frozen. Freezing every
    /// weight is an error.
    pub fn apply(&self, store: &mut ParamStore, spec: &BertSpec) -> Result<usize> {
        let layers = spec.config.num_hidden_layers;
        let layer_of = |n: &str| -> Option<usize> {
            n.strip_prefix(ENCODER)?
                .strip_prefix("encoder.layer.")?
                .split('.')
                .next()?
                .parse()
                .ok()
        };
        let in_head = |n: &str| n.starts_with("classifier");
        let embeddings = |n: &str| n.starts_with(&format!("{ENCODER}embeddings."));
        let trainable = |n: &str| -> bool {
            match self {
                TextFreeze::None => true,
                TextFreeze::HeadOnly => in_head(n),
                TextFreeze::Embeddings => !embeddings(n),
                TextFreeze::Layers(a, b) => {
                    !embeddings(n) && !layer_of(n).is_some_and(|l| (*a..=*b).contains(&l))
                }
                TextFreeze::Last(k) => {
                    in_head(n)
                        || n.starts_with(&format!("{ENCODER}pooler."))
                        || layer_of(n).is_some_and(|l| l + k >= layers)
                }
                TextFreeze::Globs(g) => !g.iter().any(|g| glob_match(g, n)),
            }
        };
        store.set_trainable(trainable);
        let names: Vec<&str> = store.names().collect();
        let frozen = names.iter().filter(|n| !store.is_trainable(n)).count();
        if frozen == names.len() {
            return Err(TuneError::Config(format!(
                "freeze policy {self:?} freezes every parameter: nothing would train"
            )));
        }
        Ok(frozen)
    }
}

/// AdamW's usual exclusions (BERT's recipe): no weight decay on biases and LayerNorm weights.
pub fn decays(name: &str) -> bool {
    !(name.ends_with(".bias") || name.contains("LayerNorm"))
}

/// A text fine-tuning run.
pub struct TextFinetuneJob<'a> {
    pub spec: BertSpec,
    /// The encoder's tensors and the head's (fresh or kept).
    pub store: ParamStore,
    pub freeze: TextFreeze,
    pub freeze_spec: String,
    /// LP-FT (Kumar et al. 2022): the first `lp_epochs` of `config.epochs` train the head alone.
    pub lp_epochs: usize,
    pub config: TrainConfig,
    pub data: TextData<'a>,
    /// Where the parent came from (recorded), and its weights' SHA-256.
    pub parent: std::path::PathBuf,
    pub parent_sha256: String,
    /// Where the resumable state is written after every epoch.
    pub state: &'a std::path::Path,
    /// Continue from `state` if it exists (it must come from a run with the same settings and
    /// the same tokenized data).
    pub resume: bool,
}

/// What a resumed run must agree on with the run that wrote the state: the settings, the
/// classes and a hash of every token id and label (a changed tokenizer or `--max-length` counts).
fn fingerprint(job: &TextFinetuneJob) -> String {
    // FNV-1a over the samples.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut eat = |x: u64| {
        for b in x.to_le_bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
        }
    };
    for set in [job.data.train, job.data.val] {
        eat(set.len() as u64);
        for s in set {
            eat(s.label as u64);
            eat(s.ids.len() as u64);
            s.ids.iter().chain(&s.type_ids).for_each(|&i| eat(i as u64));
        }
    }
    serde_json::json!({
        "parent": job.parent_sha256,
        "config": job.config,
        "spec": job.spec,
        "freeze": job.freeze_spec,
        "lp_epochs": job.lp_epochs,
        "classes": job.data.class_names,
        "data": format!("{h:016x}"),
    })
    .to_string()
}

/// What a text run reports as it goes.
pub enum TextEvent<'a> {
    Phase {
        name: &'static str,
        epochs: usize,
        frozen: usize,
        weights: usize,
    },
    Progress(Progress<'a>),
}

pub struct TextFinetuneOutcome {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
    pub store: ParamStore,
}

/// Fine-tune: phases as [`crate::finetune::run`]'s (and resumable like them); after every epoch
/// with a lower validation loss, `save_best(store, record)` (the caller writes the model folder,
/// atomically).
pub fn run_text(
    job: TextFinetuneJob,
    save_best: &mut dyn FnMut(&ParamStore, &TrainingRecord) -> Result<()>,
    events: &mut dyn FnMut(TextEvent),
) -> Result<TextFinetuneOutcome> {
    let cfg = &job.config;
    cfg.check()?;
    let phases = lp_ft(
        TextFreeze::HeadOnly,
        job.freeze.clone(),
        job.lp_epochs,
        cfg.epochs,
    )?;
    let param = |n: &str| {
        let mult = if n.starts_with("classifier") {
            1.0
        } else {
            cfg.backbone_lr_mult
        };
        (mult, decays(n))
    };
    let state = ResumeState {
        path: job.state,
        fingerprint: fingerprint(&job),
        resume: job.resume,
    };
    let mut store = job.store;
    let outcome = run_phases(
        &mut store,
        cfg,
        &phases,
        &state,
        PhaseHooks {
            freeze: &|policy: &TextFreeze, store| {
                let frozen = policy.apply(store, &job.spec)?;
                Ok((frozen, store.names().count()))
            },
            fit: &mut |store, phase_cfg, start, progress| {
                let model = Bert::new(job.spec.clone(), store)?;
                let task = TextTask {
                    model: &model,
                    data: &job.data,
                    batch_size: cfg.batch_size,
                    seed: cfg.seed,
                };
                fit_task(&task, store, phase_cfg, &param, start, progress)?;
                Ok(())
            },
            save_best: &mut |store, history, best_epoch| {
                save_best(
                    store,
                    &TrainingRecord {
                        kind: TrainingKind::FineTune,
                        config: cfg.clone(),
                        train_images: job.data.train.len(),
                        val_images: job.data.val.len(),
                        parent: Some(job.parent.clone()),
                        freeze: Some(job.freeze_spec.clone()),
                        lp_epochs: Some(job.lp_epochs),
                        best_epoch: Some(best_epoch),
                        history: TrainingRecord::history_of(history),
                    },
                )
            },
            events: &mut |e| match e {
                PhaseEvent::Begin {
                    phase,
                    frozen,
                    weights,
                } => events(TextEvent::Phase {
                    name: phase.name,
                    epochs: phase.epochs,
                    frozen,
                    weights,
                }),
                PhaseEvent::Progress(p) => events(TextEvent::Progress(p)),
            },
        },
    )?;
    Ok(TextFinetuneOutcome {
        history: outcome.history,
        best_epoch: outcome.best_epoch,
        store,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use finelens_models::bert::{BertConfig, TextHead};
    use finelens_models::params::ParamKind;

    fn tiny() -> BertSpec {
        BertSpec {
            config: BertConfig {
                vocab_size: 20,
                hidden_size: 16,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                intermediate_size: 32,
                max_position_embeddings: 16,
                ..BertConfig::all_minilm_l6()
            },
            classes: 2,
            head: TextHead::Cls,
        }
    }

    /// Class 1's sentences contain token 5 somewhere; class 0's never do.
    fn data(n: usize, seed: u64) -> Vec<TokenizedSample> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n)
            .map(|i| {
                use rand::Rng;
                let label = i % 2;
                let len = rng.random_range(3..8);
                let mut ids: Vec<u32> = (0..len).map(|_| rng.random_range(6..20)).collect();
                if label == 1 {
                    let at = rng.random_range(0..len);
                    ids[at] = 5;
                }
                ids.insert(0, 1);
                ids.push(2);
                TokenizedSample {
                    type_ids: vec![0; ids.len()],
                    ids,
                    label,
                }
            })
            .collect()
    }

    fn cfg(epochs: usize) -> TrainConfig {
        TrainConfig {
            epochs,
            batch_size: 8,
            lr: 1e-3,
            optimizer: crate::OptimizerConfig::adamw(0.01),
            warmup_epochs: Some(1.0),
            backbone_lr_mult: 1.0,
            seed: 4,
            patience: None,
            decay: crate::Decay::Linear,
            max_grad_norm: Some(1.0),
        }
    }

    fn job<'a>(
        data: TextData<'a>,
        epochs: usize,
        state: &'a std::path::Path,
        resume: bool,
    ) -> TextFinetuneJob<'a> {
        let spec = tiny();
        let store = ParamStore::init(&spec.param_specs(), 3, &Device::Cpu).unwrap();
        TextFinetuneJob {
            spec,
            store,
            freeze: TextFreeze::None,
            freeze_spec: "none".into(),
            lp_epochs: 1,
            config: cfg(epochs),
            data,
            parent: "tiny".into(),
            parent_sha256: "0".into(),
            state,
            resume,
        }
    }

    fn weights(o: &TextFinetuneOutcome) -> Vec<f32> {
        o.store
            .iter()
            .flat_map(|(_, t, _)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap())
            .collect()
    }

    #[test]
    fn a_tiny_bert_learns_a_keyword_task_deterministically() {
        let (train, val) = (data(96, 1), data(32, 2));
        let classes = ["no".to_owned(), "yes".to_owned()];
        let dir = tempfile::tempdir().unwrap();
        let state = dir.path().join("last.safetensors");
        let run = || {
            let data = TextData {
                train: &train,
                val: &val,
                class_names: &classes,
                pad_id: 0,
            };
            let mut saves = 0;
            let out = run_text(
                job(data, 10, &state, false),
                &mut |_, _| {
                    saves += 1;
                    Ok(())
                },
                &mut |_| {},
            )
            .unwrap();
            assert!(saves >= 1);
            out
        };
        let a = run();
        let best = &a.history[a.best_epoch];
        assert!(
            best.val.accuracy >= 0.9,
            "{:?}",
            a.history.iter().map(|h| h.val.accuracy).collect::<Vec<_>>()
        );
        let b = run();
        assert_eq!(weights(&a), weights(&b), "same seed, same weights");
    }

    /// A run interrupted after its first fine-tuning epoch (the state it had written then is
    /// kept) and resumed ends with the uninterrupted run's weights, bit for bit: the shuffling,
    /// dropout masks, schedule and AdamW's moments all pick up where they were.
    #[test]
    fn a_resumed_text_run_ends_with_the_uninterrupted_weights() {
        let (train, val) = (data(48, 5), data(16, 6));
        let classes = ["no".to_owned(), "yes".to_owned()];
        let data = || TextData {
            train: &train,
            val: &val,
            class_names: &classes,
            pad_id: 0,
        };
        let dir = tempfile::tempdir().unwrap();
        let (state, cut) = (dir.path().join("whole"), dir.path().join("cut"));
        let mut copied = false;
        let whole = run_text(
            job(data(), 4, &state, false),
            &mut |_, _| Ok(()),
            &mut |e| {
                if let TextEvent::Progress(Progress::Epoch(r, _)) = e {
                    // Epoch 1 is the first fine-tuning epoch (epoch 0 was the linear probe).
                    if r.epoch == 1 {
                        std::fs::copy(&state, &cut).unwrap();
                        copied = true;
                    }
                }
            },
        )
        .unwrap();
        assert!(copied);
        let mut epochs_run = Vec::new();
        let resumed = run_text(job(data(), 4, &cut, true), &mut |_, _| Ok(()), &mut |e| {
            if let TextEvent::Progress(Progress::Epoch(r, _)) = e {
                epochs_run.push(r.epoch);
            }
        })
        .unwrap();
        assert_eq!(
            epochs_run,
            [2, 3],
            "only the epochs after the cut run again"
        );
        assert_eq!(
            resumed.history,
            whole
                .history
                .iter()
                .cloned()
                .map(|mut r| {
                    r.seconds = resumed.history[r.epoch].seconds;
                    r.images_per_second = resumed.history[r.epoch].images_per_second;
                    r
                })
                .collect::<Vec<_>>()
        );
        assert_eq!(weights(&whole), weights(&resumed));
        assert_eq!(whole.best_epoch, resumed.best_epoch);

        // A state from other settings is refused.
        let mut other = job(data(), 4, &cut, true);
        other.config.seed = 5;
        let e = run_text(other, &mut |_, _| Ok(()), &mut |_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("cannot resume"), "{e}");
    }

    #[test]
    fn freeze_policies_in_bert_terms() {
        let spec = tiny();
        let mut store = ParamStore::init(&spec.param_specs(), 0, &Device::Cpu).unwrap();
        let trainable = |store: &ParamStore| -> Vec<String> {
            store
                .iter()
                .filter(|(n, _, k)| *k == ParamKind::Weight && store.is_trainable(n))
                .map(|(n, _, _)| n.to_owned())
                .collect()
        };
        TextFreeze::parse("head-only")
            .unwrap()
            .apply(&mut store, &spec)
            .unwrap();
        assert!(trainable(&store)
            .iter()
            .all(|n| n.starts_with("classifier")));
        TextFreeze::parse("embeddings")
            .unwrap()
            .apply(&mut store, &spec)
            .unwrap();
        assert!(trainable(&store).iter().all(|n| !n.contains("embeddings")));
        assert!(trainable(&store)
            .iter()
            .any(|n| n.contains("encoder.layer.0.")));
        TextFreeze::parse("encoder.layer.0-0")
            .unwrap()
            .apply(&mut store, &spec)
            .unwrap();
        assert!(!trainable(&store)
            .iter()
            .any(|n| n.contains("encoder.layer.0.") || n.contains("embeddings")));
        assert!(trainable(&store)
            .iter()
            .any(|n| n.contains("encoder.layer.1.")));
        TextFreeze::parse("last:1")
            .unwrap()
            .apply(&mut store, &spec)
            .unwrap();
        let t = trainable(&store);
        assert!(
            t.iter().any(|n| n.contains("encoder.layer.1."))
                && t.iter().any(|n| n.contains("pooler"))
        );
        assert!(!t.iter().any(|n| n.contains("encoder.layer.0.")));
        assert!(TextFreeze::parse("*")
            .unwrap()
            .apply(&mut store, &spec)
            .is_err());
        assert!(TextFreeze::parse("encoder.layer.3-1").is_err());
        assert!(decays("bert.encoder.layer.0.intermediate.dense.weight"));
        assert!(!decays("bert.encoder.layer.0.output.LayerNorm.weight"));
        assert!(!decays("classifier.bias"));
    }
}
