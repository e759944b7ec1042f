//! Named parameters and buffers, created from a model's [`ParamSpec`]s either by seeded
//! initialisation or by loading a checkpoint that is checked key by key against the specs.
//!
//! A model is built from a [`ParamStore`] by name, mirroring PyTorch's `state_dict` keys. A
//! trainable weight is handed to the model as its `Var` (gradients flow to it); a frozen weight or
//! a buffer is handed out detached, so backward never computes a gradient for it and the optimiser
//! cannot move it.

use std::collections::BTreeMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor, Var};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal, Uniform};

use crate::error::{ModelError, Result};

/// Whether a tensor is learned (a weight) or tracked state (batch-norm running statistics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Weight,
    Buffer,
}

/// How a fresh tensor is initialised (torchvision's ResNet defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// N(0, 2/fan_out) with fan_out = out·k·k: `kaiming_normal_(mode="fan_out", nonlinearity="relu")`.
    KaimingNormalFanOut,
    /// U(−1/√fan_in, 1/√fan_in): `nn.Linear`'s default for weight and bias.
    LinearUniform {
        fan_in: usize,
    },
    /// N(0, std²): BERT's `initializer_range` (0.02) for weights and embeddings.
    Normal {
        std: f64,
    },
    Ones,
    Zeros,
}

/// One tensor a model needs: its state-dict name, shape, dtype, role and initialisation.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub kind: ParamKind,
    pub init: Init,
}

impl ParamSpec {
    pub fn weight(name: impl Into<String>, shape: &[usize], init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            dtype: DType::F32,
            kind: ParamKind::Weight,
            init,
        }
    }

    pub fn buffer(name: impl Into<String>, shape: &[usize], dtype: DType, init: Init) -> Self {
        Self {
            name: name.into(),
            shape: shape.to_vec(),
            dtype,
            kind: ParamKind::Buffer,
            init,
        }
    }
}

#[derive(Debug, Clone)]
struct Entry {
    var: Var,
    kind: ParamKind,
    trainable: bool,
}

/// The named tensors of one model, in network order.
#[derive(Debug, Clone)]
pub struct ParamStore {
    entries: BTreeMap<String, Entry>,
    order: Vec<String>,
}

/// How many names an error lists before it says "and N more".
const NAMES_IN_ERRORS: usize = 5;

fn list_names(names: &[&str]) -> String {
    let mut s = names
        .iter()
        .take(NAMES_IN_ERRORS)
        .copied()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > NAMES_IN_ERRORS {
        s.push_str(&format!(" and {} more", names.len() - NAMES_IN_ERRORS));
    }
    s
}

impl ParamStore {
    /// Fresh tensors for `specs`, deterministic for a given seed.
    pub fn init(specs: &[ParamSpec], seed: u64, device: &Device) -> Result<Self> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut store = Self::empty();
        for spec in specs {
            let n: usize = spec.shape.iter().product();
            let values: Vec<f32> = match spec.init {
                Init::Ones => vec![1.0; n],
                Init::Zeros => vec![0.0; n],
                Init::KaimingNormalFanOut => {
                    let fan_out: usize = spec.shape[0] * spec.shape[2..].iter().product::<usize>();
                    let normal =
                        Normal::new(0.0, (2.0 / fan_out as f64).sqrt()).expect("positive std");
                    (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
                }
                Init::Normal { std } => {
                    let normal = Normal::new(0.0, std).expect("positive std");
                    (0..n).map(|_| normal.sample(&mut rng) as f32).collect()
                }
                Init::LinearUniform { fan_in } => {
                    let bound = 1.0 / (fan_in as f64).sqrt();
                    let uniform = Uniform::new_inclusive(-bound, bound).expect("bound > 0");
                    (0..n).map(|_| uniform.sample(&mut rng) as f32).collect()
                }
            };
            let t =
                Tensor::from_vec(values, spec.shape.as_slice(), device)?.to_dtype(spec.dtype)?;
            store.insert(&spec.name, t, spec.kind)?;
        }
        Ok(store)
    }

    /// Check `tensors` against `specs` (same key set, shapes, compatible dtypes) and adopt them.
    /// Floating-point weights in f16/bf16/f64 are converted to f32; integer buffers to i64.
    pub fn from_tensors(
        specs: &[ParamSpec],
        mut tensors: BTreeMap<String, Tensor>,
        path: &Path,
        arch: &str,
    ) -> Result<Self> {
        let missing: Vec<&str> = specs
            .iter()
            .filter(|s| !tensors.contains_key(&s.name))
            .map(|s| s.name.as_str())
            .collect();
        let unexpected: Vec<&str> = tensors
            .keys()
            .filter(|k| !specs.iter().any(|s| &s.name == *k))
            .map(|k| k.as_str())
            .collect();
        if !missing.is_empty() || !unexpected.is_empty() {
            let mut parts = Vec::new();
            if !missing.is_empty() {
                parts.push(format!(
                    "{} missing keys ({})",
                    missing.len(),
                    list_names(&missing)
                ));
            }
            if !unexpected.is_empty() {
                parts.push(format!(
                    "{} unexpected keys ({})",
                    unexpected.len(),
                    list_names(&unexpected)
                ));
            }
            return Err(ModelError::KeyMismatch {
                path: path.to_owned(),
                arch: arch.to_owned(),
                detail: parts.join("; "),
            });
        }
        let mut store = Self::empty();
        for spec in specs {
            let t = tensors.remove(&spec.name).expect("checked above");
            if t.dims() != spec.shape.as_slice() {
                return Err(ModelError::Shape {
                    path: path.to_owned(),
                    name: spec.name.clone(),
                    arch: arch.to_owned(),
                    shapes: Box::new(crate::error::ShapeMismatch {
                        expected: spec.shape.clone(),
                        found: t.dims().to_vec(),
                    }),
                });
            }
            let found = t.dtype();
            let ok = if spec.dtype.is_float() {
                found.is_float()
            } else {
                found.is_int()
            };
            if !ok {
                return Err(ModelError::DType {
                    path: path.to_owned(),
                    name: spec.name.clone(),
                    expected: format!("{:?}", spec.dtype).to_lowercase(),
                    found: format!("{found:?}").to_lowercase(),
                });
            }
            let t = t.to_dtype(spec.dtype)?;
            if spec.dtype.is_float() && !all_finite(&t)? {
                return Err(ModelError::NonFinite {
                    path: path.to_owned(),
                    name: spec.name.clone(),
                });
            }
            store.insert(&spec.name, t, spec.kind)?;
        }
        Ok(store)
    }

    fn empty() -> Self {
        Self {
            entries: BTreeMap::new(),
            order: Vec::new(),
        }
    }

    fn insert(&mut self, name: &str, t: Tensor, kind: ParamKind) -> Result<()> {
        let var = Var::from_tensor(&t)?;
        self.order.push(name.to_owned());
        self.entries.insert(
            name.to_owned(),
            Entry {
                var,
                kind,
                trainable: kind == ParamKind::Weight,
            },
        );
        Ok(())
    }

    fn entry(&self, name: &str) -> Result<&Entry> {
        self.entries
            .get(name)
            .ok_or_else(|| ModelError::Config(format!("no parameter named `{name}` in the store")))
    }

    /// The tensor a model computes with: tracked for trainable weights, detached otherwise.
    pub fn tensor(&self, name: &str) -> Result<Tensor> {
        let e = self.entry(name)?;
        Ok(if e.trainable {
            e.var.as_tensor().clone()
        } else {
            e.var.as_detached_tensor()
        })
    }

    /// The variable behind a name, for state that a forward pass updates (running statistics).
    pub fn var(&self, name: &str) -> Result<&Var> {
        Ok(&self.entry(name)?.var)
    }

    pub fn contains(&self, name: &str) -> bool {
        self.entries.contains_key(name)
    }

    pub fn is_trainable(&self, name: &str) -> bool {
        self.entries.get(name).is_some_and(|e| e.trainable)
    }

    /// Mark weights trainable or frozen; buffers are never trainable. Models built before this
    /// call keep the flags they were built with — rebuild the model after changing them.
    pub fn set_trainable(&mut self, mut trainable: impl FnMut(&str) -> bool) {
        for (name, e) in self.entries.iter_mut() {
            e.trainable = e.kind == ParamKind::Weight && trainable(name);
        }
    }

    /// Names in network order (the order of the model's specs).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.order.iter().map(|s| s.as_str())
    }

    /// (name, tensor, kind) in network order; tensors are detached snapshots.
    pub fn iter(&self) -> impl Iterator<Item = (&str, Tensor, ParamKind)> {
        self.order.iter().map(move |n| {
            let e = &self.entries[n];
            (n.as_str(), e.var.as_detached_tensor(), e.kind)
        })
    }

    /// The trainable weights, in network order, for an optimiser.
    pub fn trainable_vars(&self) -> Vec<(String, Var)> {
        self.order
            .iter()
            .filter(|n| self.entries[*n].trainable)
            .map(|n| (n.clone(), self.entries[n].var.clone()))
            .collect()
    }

    /// Number of learned scalars (weights, not buffers).
    pub fn num_weights(&self) -> usize {
        self.entries
            .values()
            .filter(|e| e.kind == ParamKind::Weight)
            .map(|e| e.var.elem_count())
            .sum()
    }

    /// A deep copy whose tensors no longer share storage with this store's.
    pub fn deep_clone(&self) -> Result<Self> {
        let mut out = Self::empty();
        for n in &self.order {
            let e = &self.entries[n];
            out.insert(n, e.var.as_detached_tensor().copy()?, e.kind)?;
            out.entries.get_mut(n).expect("just inserted").trainable = e.trainable;
        }
        Ok(out)
    }
    /// A copy with floating-point tensors cast to `dtype` and the same weights trainable: an f64
    /// model whose weight gradients a finite-difference test can check.
    pub fn cast(&self, dtype: DType) -> Result<Self> {
        let mut out = self.frozen_as(dtype)?;
        for (n, e) in &self.entries {
            out.entries.get_mut(n).expect("same names").trainable = e.trainable;
        }
        Ok(out)
    }

    /// A frozen copy for analysis: every tensor detached (explaining a model needs no weight
    /// gradient) and floating-point tensors cast to `dtype` (f64 for finite-difference checks).
    pub fn frozen_as(&self, dtype: DType) -> Result<Self> {
        let mut out = Self::empty();
        for n in &self.order {
            let e = &self.entries[n];
            let t = e.var.as_detached_tensor();
            let t = if t.dtype().is_float() {
                t.to_dtype(dtype)?
            } else {
                t.copy()?
            };
            out.insert(n, t, e.kind)?;
        }
        out.set_trainable(|_| false);
        Ok(out)
    }
}

/// True when no element is NaN or ±∞.
pub fn all_finite(t: &Tensor) -> Result<bool> {
    let v: Vec<f32> = t.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    Ok(v.iter().all(|x| x.is_finite()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs() -> Vec<ParamSpec> {
        vec![
            ParamSpec::weight("conv.weight", &[4, 2, 3, 3], Init::KaimingNormalFanOut),
            ParamSpec::weight("fc.weight", &[3, 4], Init::LinearUniform { fan_in: 4 }),
            ParamSpec::buffer("bn.num_batches_tracked", &[], DType::I64, Init::Zeros),
        ]
    }

    #[test]
    fn init_is_seeded_and_follows_the_fan_rules() {
        let a = ParamStore::init(&specs(), 7, &Device::Cpu).unwrap();
        let b = ParamStore::init(&specs(), 7, &Device::Cpu).unwrap();
        let c = ParamStore::init(&specs(), 8, &Device::Cpu).unwrap();
        let va: Vec<f32> = a
            .tensor("fc.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vb: Vec<f32> = b
            .tensor("fc.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let vc: Vec<f32> = c
            .tensor("fc.weight")
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(va, vb);
        assert_ne!(va, vc);
        assert!(va.iter().all(|v| v.abs() <= 0.5));
        assert_eq!(
            a.tensor("bn.num_batches_tracked").unwrap().dtype(),
            DType::I64
        );
        assert_eq!(a.num_weights(), 4 * 2 * 9 + 12);
    }

    #[test]
    fn loading_names_missing_unexpected_and_mismatched_tensors() {
        let dev = Device::Cpu;
        let good = ParamStore::init(&specs(), 0, &dev).unwrap();
        let map = |store: &ParamStore| -> BTreeMap<String, Tensor> {
            store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect()
        };
        let p = Path::new("m.safetensors");

        assert!(ParamStore::from_tensors(&specs(), map(&good), p, "toy").is_ok());

        let mut m = map(&good);
        m.remove("fc.weight");
        m.insert(
            "head.weight".into(),
            Tensor::zeros((3, 4), DType::F32, &dev).unwrap(),
        );
        let e = ParamStore::from_tensors(&specs(), m, p, "toy")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("missing keys (fc.weight)") && e.contains("unexpected keys (head.weight)"),
            "{e}"
        );

        let mut m = map(&good);
        m.insert(
            "fc.weight".into(),
            Tensor::zeros((5, 4), DType::F32, &dev).unwrap(),
        );
        let e = ParamStore::from_tensors(&specs(), m, p, "toy")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("fc.weight has shape [5, 4]") && e.contains("[3, 4]"),
            "{e}"
        );

        let mut m = map(&good);
        m.insert(
            "fc.weight".into(),
            Tensor::zeros((3, 4), DType::I64, &dev).unwrap(),
        );
        let e = ParamStore::from_tensors(&specs(), m, p, "toy")
            .unwrap_err()
            .to_string();
        assert!(e.contains("dtype i64"), "{e}");

        let mut m = map(&good);
        m.insert(
            "fc.weight".into(),
            Tensor::new(&[[f32::NAN; 4]; 3], &dev).unwrap(),
        );
        let e = ParamStore::from_tensors(&specs(), m, p, "toy")
            .unwrap_err()
            .to_string();
        assert!(e.contains("fc.weight contains non-finite"), "{e}");

        // Half-precision weights are accepted and widened.
        let mut m = map(&good);
        let half = m["fc.weight"].to_dtype(DType::F16).unwrap();
        m.insert("fc.weight".into(), half);
        let s = ParamStore::from_tensors(&specs(), m, p, "toy").unwrap();
        assert_eq!(s.tensor("fc.weight").unwrap().dtype(), DType::F32);
    }

    #[test]
    fn frozen_weights_and_buffers_are_detached() {
        let mut s = ParamStore::init(&specs(), 0, &Device::Cpu).unwrap();
        assert!(s.tensor("conv.weight").unwrap().is_variable());
        assert!(!s.tensor("bn.num_batches_tracked").unwrap().is_variable());
        s.set_trainable(|n| n.starts_with("fc"));
        assert!(!s.tensor("conv.weight").unwrap().is_variable());
        assert_eq!(s.trainable_vars().len(), 1);
    }
}
