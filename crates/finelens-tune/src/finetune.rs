//! What turns a pretrained checkpoint into a fine-tuning run: a new head on the pretrained body,
//! and a policy for which parameters stay frozen.

use finelens_models::{Head, ModelConfig, ParamSpec, ParamStore};

use crate::error::{Result, TuneError};

/// A store for `config` whose body comes from `parent` (by name, shapes checked) and whose head —
/// every tensor under `config.head`'s prefixes — is freshly initialised from `seed`.
pub fn with_new_head(parent: &ParamStore, config: ModelConfig, seed: u64) -> Result<ParamStore> {
    let specs = config.param_specs();
    let is_head = |name: &str| config.head.prefixes().iter().any(|p| name.starts_with(p));
    let fresh = ParamStore::init(&specs, seed, &candle_core::Device::Cpu)?;
    let tensors = specs
        .iter()
        .map(|s: &ParamSpec| {
            let t = if is_head(&s.name) {
                fresh.tensor(&s.name)?
            } else {
                let t = parent.var(&s.name).map_err(|_| {
                    TuneError::Config(format!(
                        "the parent checkpoint has no `{}` for the new model's body",
                        s.name
                    ))
                })?;
                t.as_detached_tensor().copy()?
            };
            Ok((s.name.clone(), t))
        })
        .collect::<Result<std::collections::BTreeMap<_, _>>>()?;
    Ok(ParamStore::from_tensors(
        &specs,
        tensors,
        std::path::Path::new("parent checkpoint"),
        config.arch.name(),
    )?)
}

/// Which parameters stay frozen while fine-tuning.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FreezePolicy {
    /// Train only the head: a linear probe.
    HeadOnly,
    /// Train the head and the last N residual blocks (`layer4.1`, `layer4.0`, …).
    LastBlocks(usize),
    /// Train everything.
    None,
    /// Freeze the parameters whose names match any of these patterns (`*` and `?` wildcards).
    Globs(Vec<String>),
}

impl FreezePolicy {
    /// Parses `head-only`, `last:N`, `none`, or comma-separated glob patterns.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "head-only" => Ok(FreezePolicy::HeadOnly),
            "none" => Ok(FreezePolicy::None),
            _ => {
                if let Some(n) = s.strip_prefix("last:") {
                    return n.parse().map(FreezePolicy::LastBlocks).map_err(|_| {
                        TuneError::Config(format!("`{s}`: last:N needs a whole number of blocks"))
                    });
                }
                let globs: Vec<String> = s
                    .split(',')
                    .map(|g| g.trim().to_owned())
                    .filter(|g| !g.is_empty())
                    .collect();
                if globs.is_empty() {
                    return Err(TuneError::Config("empty freeze policy".into()));
                }
                Ok(FreezePolicy::Globs(globs))
            }
        }
    }

    /// Mark `store`'s weights trainable or frozen; returns how many weight tensors are frozen.
    /// Freezing nothing with globs is allowed (the caller warns); freezing everything is an error.
    pub fn apply(&self, store: &mut ParamStore, head: Head) -> Result<usize> {
        let in_head = |n: &str| head.prefixes().iter().any(|p| n.starts_with(p));
        let blocks = residual_blocks(store);
        let trainable: Box<dyn Fn(&str) -> bool> = match self {
            FreezePolicy::HeadOnly => Box::new(in_head),
            FreezePolicy::None => Box::new(|_| true),
            FreezePolicy::LastBlocks(n) => {
                let keep: Vec<String> = blocks
                    .iter()
                    .rev()
                    .take(*n)
                    .map(|b| format!("{b}."))
                    .collect();
                Box::new(move |name| {
                    in_head(name) || keep.iter().any(|b| name.starts_with(b.as_str()))
                })
            }
            FreezePolicy::Globs(globs) => {
                let globs = globs.clone();
                Box::new(move |name| !globs.iter().any(|g| glob_match(g, name)))
            }
        };
        store.set_trainable(|n| trainable(n));
        let weights: Vec<&str> = store.names().filter(|n| !is_buffer(n)).collect();
        let frozen = weights.iter().filter(|n| !store.is_trainable(n)).count();
        if frozen == weights.len() {
            return Err(TuneError::Config(format!(
                "freeze policy {self:?} freezes every parameter: nothing would train"
            )));
        }
        Ok(frozen)
    }
}

fn is_buffer(name: &str) -> bool {
    name.ends_with(".running_mean")
        || name.ends_with(".running_var")
        || name.ends_with(".num_batches_tracked")
}

/// Residual block prefixes (`layer1.0` …) in network order.
fn residual_blocks(store: &ParamStore) -> Vec<String> {
    let mut blocks: Vec<String> = Vec::new();
    for n in store.names() {
        let mut parts = n.splitn(3, '.');
        if let (Some(layer), Some(idx)) = (parts.next(), parts.next()) {
            if layer.starts_with("layer") && idx.chars().all(|c| c.is_ascii_digit()) {
                let b = format!("{layer}.{idx}");
                if blocks.last() != Some(&b) {
                    blocks.push(b);
                }
            }
        }
    }
    blocks
}

/// Shell-style matching of a whole name: `*` any run of characters, `?` any one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;
    use finelens_models::Arch;

    fn parent() -> (ModelConfig, ParamStore) {
        let cfg = ModelConfig::new(Arch::ResNetMini, 6, Head::Linear).unwrap();
        (
            cfg,
            ParamStore::init(&cfg.param_specs(), 1, &Device::Cpu).unwrap(),
        )
    }

    fn values(s: &ParamStore, n: &str) -> Vec<f32> {
        s.tensor(n)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn new_head_keeps_the_body_and_reinitialises_the_head() {
        let (_, p) = parent();
        let cfg = ModelConfig::new(Arch::ResNetMini, 4, Head::Mlp { hidden: 32 }).unwrap();
        let s = with_new_head(&p, cfg, 9).unwrap();
        assert_eq!(
            values(&s, "layer3.1.conv2.weight"),
            values(&p, "layer3.1.conv2.weight")
        );
        assert_eq!(s.tensor("fc.2.weight").unwrap().dims(), &[4, 32]);
        assert!(!s.contains("fc.weight"));
        // The copy is deep: training the child cannot touch the parent.
        s.var("conv1.weight")
            .unwrap()
            .set(&s.tensor("conv1.weight").unwrap().zeros_like().unwrap())
            .unwrap();
        assert_ne!(values(&p, "conv1.weight"), values(&s, "conv1.weight"));
    }

    #[test]
    fn freeze_policies_select_the_right_tensors() {
        let (cfg, mut s) = parent();
        FreezePolicy::parse("head-only")
            .unwrap()
            .apply(&mut s, cfg.head)
            .unwrap();
        assert_eq!(
            s.trainable_vars()
                .iter()
                .map(|(n, _)| n.as_str())
                .collect::<Vec<_>>(),
            vec!["fc.weight", "fc.bias"]
        );

        FreezePolicy::parse("last:1")
            .unwrap()
            .apply(&mut s, cfg.head)
            .unwrap();
        let t: Vec<String> = s.trainable_vars().into_iter().map(|(n, _)| n).collect();
        assert!(t
            .iter()
            .all(|n| n.starts_with("layer4.1.") || n.starts_with("fc.")));
        assert!(t.contains(&"layer4.1.bn2.weight".to_string()));

        let frozen = FreezePolicy::parse("conv1.*,layer1.*")
            .unwrap()
            .apply(&mut s, cfg.head)
            .unwrap();
        // `conv1.weight`, and six weights in each of layer1's two blocks (the stem's `bn1` is not matched).
        assert_eq!(frozen, 1 + 2 * 6);
        assert!(
            !s.is_trainable("layer1.0.conv2.weight") && s.is_trainable("layer2.0.conv1.weight")
        );

        assert_eq!(
            FreezePolicy::parse("nothing.matches*")
                .unwrap()
                .apply(&mut s, cfg.head)
                .unwrap(),
            0
        );
        let e = FreezePolicy::parse("*")
            .unwrap()
            .apply(&mut s, cfg.head)
            .unwrap_err()
            .to_string();
        assert!(e.contains("freezes every parameter"), "{e}");
        assert!(FreezePolicy::parse("last:x").is_err());
    }

    #[test]
    fn globs_match_whole_names() {
        assert!(glob_match("layer4.*", "layer4.1.conv1.weight"));
        assert!(glob_match("*.bn?.weight", "layer1.0.bn2.weight"));
        assert!(!glob_match("layer4", "layer4.1.conv1.weight"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "acbx"));
        assert!(glob_match("a*b*c", "aXbYbZc"));
    }
}

/// The head of a fine-tuned model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadChoice {
    /// Continue with the parent's head; the data must have the parent's classes.
    Keep,
    /// A freshly initialised head of this kind over the data's classes.
    New(Head),
}

/// Everything a fine-tuning run needs.
pub struct FinetuneJob<'a> {
    pub parent: &'a finelens_models::Checkpoint,
    pub head: HeadChoice,
    pub freeze: FreezePolicy,
    /// LP-FT (Kumar et al. 2022): the first `lp_epochs` of `config.epochs` train the head alone.
    pub lp_epochs: usize,
    pub config: crate::TrainConfig,
    pub data: crate::TrainData<'a>,
    /// Where the best epoch's checkpoint is written (atomically, whenever it improves).
    pub checkpoint: &'a std::path::Path,
    /// Recorded in the checkpoint's training metadata as the user wrote it.
    pub freeze_spec: String,
    /// Where the resumable state is written after every epoch (weights, batch-norm statistics,
    /// optimiser moments, history).
    pub state: &'a std::path::Path,
    /// Continue from `state` if it exists (it must come from a run with the same settings).
    pub resume: bool,
}

/// What a resumed run must agree on with the run that wrote the state.
fn fingerprint(job: &FinetuneJob) -> String {
    #[derive(serde::Serialize)]
    struct Fingerprint<'a> {
        parent: &'a str,
        config: &'a crate::TrainConfig,
        head: String,
        freeze: &'a str,
        lp_epochs: usize,
        classes: &'a [String],
        train: usize,
        val: usize,
    }
    serde_json::to_string(&Fingerprint {
        parent: &job.parent.sha256,
        config: &job.config,
        head: format!("{:?}", job.head),
        freeze: &job.freeze_spec,
        lp_epochs: job.lp_epochs,
        classes: job.data.class_names,
        train: job.data.train.len(),
        val: job.data.val.len(),
    })
    .expect("plain data serialises")
}

/// What a fine-tuning run reports as it goes.
pub enum FinetuneEvent<'a> {
    Phase {
        name: &'static str,
        epochs: usize,
        frozen: usize,
        weights: usize,
    },
    /// A glob freeze policy that matched nothing: legal, but probably not what was meant.
    FreezesNothing,
    Progress(crate::Progress<'a>),
}

pub struct FinetuneOutcome {
    pub history: Vec<crate::EpochRecord>,
    pub best_epoch: usize,
    pub meta: finelens_models::Metadata,
}

/// Fine-tune `job.parent` on `job.data`: choose the head, run the phases (optional linear probe,
/// then fine-tuning under the freeze policy), keep the epoch with the lowest validation loss.
pub fn run(job: &FinetuneJob, events: &mut dyn FnMut(FinetuneEvent)) -> Result<FinetuneOutcome> {
    let parent = job.parent;
    let cfg = &job.config;
    cfg.check()?;
    let classes = job.data.class_names;
    let (config, mut store) = match job.head {
        HeadChoice::Keep => {
            if classes != parent.meta.class_names.as_slice() {
                return Err(TuneError::Config(format!(
                    "the data has {} classes [{}] but the checkpoint's head has {} [{}]; pass --head linear or mlp:N to replace it",
                    classes.len(),
                    classes.join(", "),
                    parent.meta.num_classes,
                    parent.meta.class_names.join(", ")
                )));
            }
            (parent.config()?, parent.store.deep_clone()?)
        }
        HeadChoice::New(head) => {
            let config = ModelConfig::new(parent.meta.arch, classes.len(), head)?;
            (config, with_new_head(&parent.store, config, cfg.seed)?)
        }
    };
    let head = config.head;
    let mut meta = parent.meta.clone();
    meta.head = head;
    meta.num_classes = classes.len();
    meta.class_names = classes.to_vec();
    meta.parent_sha256 = Some(parent.sha256.clone());
    meta.seed = Some(cfg.seed);
    meta.finelens_version = env!("CARGO_PKG_VERSION").into();

    let phases = crate::phases::lp_ft(
        FreezePolicy::HeadOnly,
        job.freeze.clone(),
        job.lp_epochs,
        cfg.epochs,
    )?;
    let is_head = |n: &str| head.prefixes().iter().any(|p| n.starts_with(p));
    let lr_mult = |n: &str| {
        if is_head(n) {
            1.0
        } else {
            cfg.backbone_lr_mult
        }
    };
    let state = crate::phases::ResumeState {
        path: job.state,
        fingerprint: fingerprint(job),
        resume: job.resume,
    };
    let outcome = crate::phases::run_phases(
        &mut store,
        cfg,
        &phases,
        &state,
        crate::phases::PhaseHooks {
            freeze: &|policy: &FreezePolicy, store| {
                let frozen = policy.apply(store, head)?;
                Ok((frozen, store.names().filter(|n| !is_buffer(n)).count()))
            },
            fit: &mut |store, phase_cfg, start, progress| {
                let model = finelens_models::ResNet::new(config, store)?;
                crate::fit(
                    &model, store, &job.data, phase_cfg, &lr_mult, start, progress,
                )?;
                Ok(())
            },
            save_best: &mut |store, history, best_epoch| {
                let mut m = meta.clone();
                crate::TrainingRecord {
                    kind: crate::TrainingKind::FineTune,
                    config: cfg.clone(),
                    train_images: job.data.train.len(),
                    val_images: job.data.val.len(),
                    parent: Some(parent.path.clone()),
                    freeze: Some(job.freeze_spec.clone()),
                    lp_epochs: Some(job.lp_epochs),
                    best_epoch: Some(best_epoch),
                    history: crate::TrainingRecord::history_of(history),
                }
                .record_in(&mut m);
                finelens_models::checkpoint::save(job.checkpoint, store, &m)?;
                Ok(())
            },
            events: &mut |e| match e {
                crate::phases::PhaseEvent::Begin {
                    phase,
                    frozen,
                    weights,
                } => {
                    if frozen == 0 && matches!(phase.policy, FreezePolicy::Globs(_)) {
                        events(FinetuneEvent::FreezesNothing);
                    }
                    events(FinetuneEvent::Phase {
                        name: phase.name,
                        epochs: phase.epochs,
                        frozen,
                        weights,
                    });
                }
                crate::phases::PhaseEvent::Progress(p) => events(FinetuneEvent::Progress(p)),
            },
        },
    )?;
    Ok(FinetuneOutcome {
        history: outcome.history,
        best_epoch: outcome.best_epoch,
        meta,
    })
}
