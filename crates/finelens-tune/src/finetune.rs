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
