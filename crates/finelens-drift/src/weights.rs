//! Weight drift: how far each tensor moved between two checkpoints, read straight from the
//! memory-mapped safetensors files one tensor at a time. A tensor's pages are released
//! (`MADV_DONTNEED`) once it has been read, so resident memory stays near the size of the tensor
//! being read whatever the checkpoint's size; only spectral norms copy a tensor (as f32).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};

use finelens_models::checkpoint::{self, Metadata};
use finelens_models::{ModelConfig, ModelDescription};
use memmap2::{Mmap, UncheckedAdvice};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};

use crate::error::{DriftError, Result};
use crate::spectrum::{spectrum, Spectrum};

/// Settings for [`weight_drift`].
#[derive(Debug, Clone, Copy)]
pub struct WeightDriftOptions {
    /// Spectral norms and stable ranks of matrices and conv kernels (power iteration).
    pub spectral: bool,
    /// WeightWatcher's analysis of each matrix's eigenvalue spectrum ([`crate::spectrum`]): one
    /// eigendecomposition of its Gram matrix and one of a shuffled copy, per checkpoint.
    pub esd: bool,
    pub power_iterations: usize,
    /// Each file's tensor names mapped to the names compared, or `None` to leave a tensor out (a
    /// buffer that is not a parameter): two spellings of one model (Hugging Face's `BertModel`
    /// names with and without `bert.`) then compare tensor by tensor. `None`: names as they are.
    pub canonical: Option<fn(&str) -> Option<String>>,
}

impl Default for WeightDriftOptions {
    fn default() -> Self {
        Self {
            spectral: true,
            esd: false,
            power_iterations: POWER_ITERATIONS,
            canonical: None,
        }
    }
}

/// Power-iteration cap; the estimate stops earlier once it changes by less than
/// [`POWER_TOLERANCE`] (relative). σ₁ from power iteration on WᵀW converges like (σ₂/σ₁)^(2k).
pub const POWER_ITERATIONS: usize = 200;
pub const POWER_TOLERANCE: f64 = 1e-9;

/// Σ-statistics of one tensor pair, in f64.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Sums {
    before_sq: f64,
    after_sq: f64,
    diff_sq: f64,
    dot: f64,
    max_abs_diff: f64,
}

impl Sums {
    fn add(self, o: Sums) -> Sums {
        Sums {
            before_sq: self.before_sq + o.before_sq,
            after_sq: self.after_sq + o.after_sq,
            diff_sq: self.diff_sq + o.diff_sq,
            dot: self.dot + o.dot,
            max_abs_diff: self.max_abs_diff.max(o.max_abs_diff),
        }
    }

    /// ‖W₁ − W₀‖ / ‖W₀‖ (∞ when W₀ = 0 and W₁ ≠ 0, 0 when both are 0).
    fn relative_l2_change(&self) -> f64 {
        if self.before_sq > 0.0 {
            (self.diff_sq / self.before_sq).sqrt()
        } else if self.diff_sq > 0.0 {
            f64::INFINITY
        } else {
            0.0
        }
    }

    /// cos(W₀, W₁) of the flattened tensors; undefined (NaN, `null` in JSON) when either is
    /// all zeros, as a freshly initialised bias is.
    fn cosine_similarity(&self) -> f64 {
        let d = (self.before_sq * self.after_sq).sqrt();
        if d > 0.0 {
            self.dot / d
        } else {
            f64::NAN
        }
    }
}

/// What moved in one tensor.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TensorDrift {
    pub name: String,
    pub shape: Vec<usize>,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub relative_l2_change: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub cosine_similarity: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub max_abs_change: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub norm_before: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub norm_after: f64,
    /// For matrices and conv kernels (out × in·k·k): σ₁ before/after.
    pub spectral_norm_before: Option<f64>,
    pub spectral_norm_after: Option<f64>,
    /// ‖W‖²_F / σ₁², before/after.
    pub stable_rank_before: Option<f64>,
    pub stable_rank_after: Option<f64>,
    /// With `esd`: WeightWatcher's figures of the matrix (out × in·k·k), before/after.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spectrum_before: Option<Spectrum>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spectrum_after: Option<Spectrum>,
    #[serde(skip)]
    sums: Sums,
}

/// A group of weight tensors (a layer, a block or a stage) taken together.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GroupDrift {
    pub name: String,
    pub tensors: usize,
    pub parameters: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub relative_l2_change: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub cosine_similarity: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub max_abs_change: f64,
}

/// Two checkpoints' weight drift.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WeightDrift {
    pub before: PathBuf,
    pub after: PathBuf,
    pub arch: Option<String>,
    /// Learned tensors present in both with the same shape, in network order.
    pub tensors: Vec<TensorDrift>,
    /// Batch-norm running statistics (`running_mean`, `running_var`, `num_batches_tracked`).
    pub batch_norm_statistics: Vec<TensorDrift>,
    /// Per module (`layer3.1.conv1`), per block (`layer3.1`), per stage (`layer3`).
    pub layers: Vec<GroupDrift>,
    pub blocks: Vec<GroupDrift>,
    pub stages: Vec<GroupDrift>,
    /// Only in the fine-tuned checkpoint (a new head).
    pub added: Vec<String>,
    /// Only in the parent.
    pub removed: Vec<String>,
    /// In both, with different shapes: (name, before, after).
    pub reshaped: Vec<(String, Vec<usize>, Vec<usize>)>,
    /// Tensor bytes read from both files.
    pub bytes_read: u64,
}

/// Running statistics of batch norm, reported apart from learned weights.
pub fn is_batch_norm_statistic(name: &str) -> bool {
    ["running_mean", "running_var", "num_batches_tracked"]
        .iter()
        .any(|s| name.ends_with(s))
}

/// The module a tensor belongs to: its name without the last component.
pub fn layer_of(name: &str) -> &str {
    name.rsplit_once('.').map_or(name, |(m, _)| m)
}

/// How tensors group into blocks and stages, and which are the head: the model's own
/// description when the checkpoint names its architecture, else by name — the first component
/// is the stage and, when the second is an index (`encoder.3.…`, `layer2.1.…`), the two are the
/// block; a head is `fc`, `classifier` or `head`.
struct Grouping(Option<ModelDescription>);

impl Grouping {
    fn of(meta: [&Option<Metadata>; 2]) -> Self {
        Grouping(
            meta.into_iter()
                .flatten()
                .find_map(|m| m.config().ok())
                .map(|c| c.describe()),
        )
    }

    fn block_of(&self, name: &str) -> String {
        if let Some(b) = self.0.as_ref().and_then(|d| d.block_of(name)) {
            return b;
        }
        let parts: Vec<&str> = name.split('.').collect();
        match parts.as_slice() {
            [stage, index, _, ..] if index.parse::<usize>().is_ok() => format!("{stage}.{index}"),
            _ => parts[0].to_owned(),
        }
    }

    fn stage_of(&self, name: &str) -> String {
        self.0
            .as_ref()
            .and_then(|d| d.stage_of(name))
            .unwrap_or_else(|| name.split('.').next().unwrap_or(name))
            .to_owned()
    }

    fn is_head(&self, name: &str) -> bool {
        match &self.0 {
            Some(d) => d.is_head(name),
            None => {
                let first = name.split('.').next().unwrap_or(name);
                ["fc", "classifier", "head"].contains(&first)
            }
        }
    }
}

/// The system's memory page size (4 KiB on x86-64, 16 or 64 KiB on some ARM kernels): `madvise`
/// ranges must be page-aligned.
fn page_size() -> usize {
    // SAFETY: sysconf only reads a system constant.
    let n = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if n > 0 {
        n as usize
    } else {
        4096
    }
}

/// A checkpoint file mapped into memory.
struct Mapped {
    path: PathBuf,
    map: Mmap,
    meta: Option<Metadata>,
}

impl Mapped {
    fn open(path: &Path) -> Result<Self> {
        let file = std::fs::File::open(path).map_err(|error| DriftError::Io {
            path: path.to_owned(),
            error,
        })?;
        // SAFETY: the mapping is read-only, but it is only as stable as the file under it: a
        // checkpoint rewritten in place while we read gives wrong numbers, and one truncated
        // underneath makes the next read of a vanished page raise SIGBUS and end the process.
        // finelens itself never writes in place (checkpoints are written to a temporary file and
        // renamed, which leaves this mapping's inode intact); the risk is another program.
        let map = unsafe { Mmap::map(&file) }.map_err(|error| DriftError::Io {
            path: path.to_owned(),
            error,
        })?;
        let _ = map.advise(memmap2::Advice::Sequential);
        let meta = checkpoint::read_metadata(path, &map)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            meta,
        })
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.map).map_err(|e| DriftError::Corrupt {
            path: self.path.clone(),
            reason: e.to_string(),
        })
    }

    /// Give the pages of `data` (a slice of this mapping) back: they are only read once.
    fn release(&self, data: &[u8]) {
        let offset = data.as_ptr() as usize - self.map.as_ptr() as usize;
        let page = page_size();
        let start = offset.div_ceil(page) * page;
        let end = (offset + data.len()) / page * page;
        if end > start {
            // SAFETY: a read-only file mapping: dropped pages are read back from the file if
            // touched again, so no data is lost.
            let _ = unsafe {
                self.map
                    .unchecked_advise_range(UncheckedAdvice::DontNeed, start, end - start)
            };
        }
    }
}

/// Values of a tensor's bytes, as f64, in pieces: f32, f64, f16, bf16 and integers.
fn decode(dtype: Dtype, bytes: &[u8], out: &mut Vec<f64>) -> bool {
    out.clear();
    match dtype {
        Dtype::F32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")) as f64),
        ),
        Dtype::F64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| f64::from_le_bytes(c.try_into().expect("8 bytes"))),
        ),
        Dtype::F16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
        Dtype::BF16 => out.extend(
            bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f64()),
        ),
        Dtype::I64 => out.extend(
            bytes
                .chunks_exact(8)
                .map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f64),
        ),
        Dtype::I32 => out.extend(
            bytes
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes(c.try_into().expect("4 bytes")) as f64),
        ),
        _ => return false,
    }
    true
}

/// Elements per parallel piece: large enough to amortise a task, small enough to stay in cache.
const PIECE: usize = 1 << 16;

/// The Σ-statistics of two equally shaped tensors in one parallel pass; `None` when either holds
/// a NaN or infinity (the side is returned).
fn pair_sums(
    dtype0: Dtype,
    b0: &[u8],
    dtype1: Dtype,
    b1: &[u8],
    n: usize,
) -> std::result::Result<Sums, usize> {
    let w0 = b0.len() / n.max(1);
    let w1 = b1.len() / n.max(1);
    let pieces = n.div_ceil(PIECE);
    (0..pieces)
        .into_par_iter()
        .map_init(
            || (Vec::with_capacity(PIECE), Vec::with_capacity(PIECE)),
            |(x0, x1), p| {
                let (s, e) = (p * PIECE, ((p + 1) * PIECE).min(n));
                decode(dtype0, &b0[s * w0..e * w0], x0);
                decode(dtype1, &b1[s * w1..e * w1], x1);
                let mut acc = Sums::default();
                for (&a, &b) in x0.iter().zip(x1.iter()) {
                    if !a.is_finite() {
                        return Err(0);
                    }
                    if !b.is_finite() {
                        return Err(1);
                    }
                    let d = b - a;
                    acc.before_sq += a * a;
                    acc.after_sq += b * b;
                    acc.diff_sq += d * d;
                    acc.dot += a * b;
                    acc.max_abs_diff = acc.max_abs_diff.max(d.abs());
                }
                Ok(acc)
            },
        )
        .try_reduce(Sums::default, |a, b| Ok(a.add(b)))
}

/// σ₁ of a rows × cols matrix (row-major) by power iteration on WᵀW from a seeded start.
pub fn spectral_norm(w: &[f32], rows: usize, cols: usize, max_iter: usize) -> f64 {
    if rows == 0 || cols == 0 {
        return 0.0;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(0);
    let mut v: Vec<f64> = (0..cols).map(|_| StandardNormal.sample(&mut rng)).collect();
    let normalise = |v: &mut Vec<f64>| {
        let n = v.iter().map(|x| x * x).sum::<f64>().sqrt();
        if n > 0.0 {
            v.iter_mut().for_each(|x| *x /= n);
        }
        n
    };
    normalise(&mut v);
    let mut sigma = 0.0;
    for _ in 0..max_iter.max(1) {
        // u = W v (rows in parallel), then v = Wᵀ u.
        let u: Vec<f64> = w
            .par_chunks(cols)
            .map(|row| row.iter().zip(&v).map(|(&a, b)| a as f64 * b).sum())
            .collect();
        let sigma_u = u.iter().map(|x| x * x).sum::<f64>().sqrt();
        let mut next = w
            .par_chunks(cols)
            .zip(u.par_iter())
            .fold(
                || vec![0f64; cols],
                |mut acc, (row, &ui)| {
                    for (a, &x) in acc.iter_mut().zip(row) {
                        *a += x as f64 * ui;
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f64; cols],
                |mut a, b| {
                    a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
                    a
                },
            );
        // ‖Wᵀ W v‖ → σ₁² for the unit v; ‖W v‖ → σ₁ too; use the latter, it is exact at a fixed point.
        normalise(&mut next);
        v = next;
        let converged = (sigma_u - sigma).abs() <= POWER_TOLERANCE * sigma_u;
        sigma = sigma_u;
        if converged {
            break;
        }
    }
    sigma
}

fn as_f32(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let mut out = Vec::new();
    let mut tmp = Vec::new();
    for piece in bytes.chunks(PIECE * dtype.bitsize() / 8) {
        decode(dtype, piece, &mut tmp);
        out.extend(tmp.iter().map(|&x| x as f32));
    }
    out
}

/// One weight matrix's WeightWatcher spectrum (`finelens inspect --spectral`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerSpectrum {
    pub name: String,
    pub shape: Vec<usize>,
    pub spectrum: Spectrum,
}

/// The spectrum ([`spectrum`]) of every weight matrix of one checkpoint — each tensor of rank
/// ≥ 2 that is not a batch-norm statistic, read as rows × the rest like drift reads it — in
/// network order, under the names `canonical` gives (others are skipped; `None` keeps them).
pub fn checkpoint_spectra(
    path: &Path,
    canonical: Option<fn(&str) -> Option<String>>,
    description: Option<ModelDescription>,
) -> Result<Vec<LayerSpectrum>> {
    let m = Mapped::open(path)?;
    let st = m.tensors()?;
    let spelled: HashMap<String, String> = st
        .names()
        .into_iter()
        .filter_map(|n| {
            Some((
                canonical.map_or(Some(n.to_owned()), |f| f(n))?,
                n.to_owned(),
            ))
        })
        .collect();
    let names: HashSet<String> = spelled.keys().cloned().collect();
    let grouping = match description {
        Some(d) => Grouping(Some(d)),
        None => Grouping::of([&m.meta, &m.meta]),
    };
    let mut out = Vec::new();
    for name in network_order([&m.meta, &m.meta], &names, &grouping) {
        let v = st.tensor(&spelled[&name]).expect("listed");
        if v.shape().len() < 2 || is_batch_norm_statistic(&name) {
            continue;
        }
        let mut probe = Vec::new();
        if !decode(v.dtype(), &[], &mut probe) {
            return Err(DriftError::Dtype {
                path: path.to_owned(),
                tensor: name,
                dtype: format!("{:?}", v.dtype()),
            });
        }
        let w = as_f32(v.dtype(), v.data());
        m.release(v.data());
        if !w.iter().all(|x| x.is_finite()) {
            return Err(DriftError::NonFinite {
                path: path.to_owned(),
                tensor: name,
            });
        }
        let rows = v.shape()[0];
        out.push(LayerSpectrum {
            spectrum: spectrum(&w, rows, w.len() / rows.max(1), 0),
            shape: v.shape().to_vec(),
            name,
        });
    }
    Ok(out)
}

/// Names in network order: the model's own order when the metadata names an architecture; then
/// the rest by stage, in the order the model's description lists its stages, and by name.
fn network_order(
    meta: [&Option<Metadata>; 2],
    names: &HashSet<String>,
    grouping: &Grouping,
) -> Vec<String> {
    let mut order = Vec::new();
    let mut seen = HashSet::new();
    for m in meta.into_iter().flatten() {
        if let Ok(cfg) = ModelConfig::new(m.arch, m.num_classes, m.head) {
            for spec in cfg.param_specs() {
                if names.contains(&spec.name) && seen.insert(spec.name.clone()) {
                    order.push(spec.name);
                }
            }
        }
    }
    let stage_rank = |name: &str| {
        grouping
            .0
            .as_ref()
            .and_then(|d| {
                let stage = d.stage_of(name)?;
                d.stages.iter().position(|s| s.name == stage)
            })
            .unwrap_or(usize::MAX)
    };
    let mut rest: Vec<&String> = names.iter().filter(|n| !seen.contains(*n)).collect();
    rest.sort_by_key(|n| (stage_rank(n), n.as_str()));
    order.extend(rest.into_iter().cloned());
    order
}

fn group(tensors: &[TensorDrift], key: impl Fn(&str) -> String) -> Vec<GroupDrift> {
    let mut order: Vec<String> = Vec::new();
    let mut acc: BTreeMap<String, (Sums, usize, usize)> = BTreeMap::new();
    for t in tensors {
        let k = key(&t.name);
        let e = acc.entry(k.clone()).or_insert_with(|| {
            order.push(k);
            (Sums::default(), 0, 0)
        });
        e.0 = e.0.add(t.sums);
        e.1 += 1;
        e.2 += t.shape.iter().product::<usize>();
    }
    order
        .into_iter()
        .map(|k| {
            let (s, tensors, parameters) = acc[&k];
            GroupDrift {
                name: k,
                tensors,
                parameters,
                relative_l2_change: s.relative_l2_change(),
                cosine_similarity: s.cosine_similarity(),
                max_abs_change: s.max_abs_diff,
            }
        })
        .collect()
}

/// Compare `before` (the parent) with `after` (the fine-tuned model), tensor by tensor, grouped
/// by the description the checkpoints' metadata gives (or by name, when they record none).
pub fn weight_drift(before: &Path, after: &Path, opts: WeightDriftOptions) -> Result<WeightDrift> {
    weight_drift_described(before, after, opts, None)
}

/// [`weight_drift`], grouped by `description` when given (a model family whose files carry no
/// finelens metadata describes itself).
pub fn weight_drift_described(
    before: &Path,
    after: &Path,
    opts: WeightDriftOptions,
    description: Option<ModelDescription>,
) -> Result<WeightDrift> {
    let m0 = Mapped::open(before)?;
    let m1 = Mapped::open(after)?;
    if let (Some(a), Some(b)) = (&m0.meta, &m1.meta) {
        if a.arch != b.arch {
            return Err(DriftError::ArchMismatch(format!(
                "{} is {}, {} is {}",
                before.display(),
                a.arch,
                after.display(),
                b.arch
            )));
        }
    }
    let st0 = m0.tensors()?;
    let st1 = m1.tensors()?;
    // Canonical name → the file's own.
    let spelled = |st: &SafeTensors| -> HashMap<String, String> {
        st.names()
            .into_iter()
            .filter_map(|n| {
                let c = match opts.canonical {
                    Some(f) => f(n)?,
                    None => n.to_owned(),
                };
                Some((c, n.to_owned()))
            })
            .collect()
    };
    let (spelled0, spelled1) = (spelled(&st0), spelled(&st1));
    let names0: HashSet<String> = spelled0.keys().cloned().collect();
    let names1: HashSet<String> = spelled1.keys().cloned().collect();
    let all: HashSet<String> = names0.union(&names1).cloned().collect();
    let grouping = match description {
        Some(d) => Grouping(Some(d)),
        None => Grouping::of([&m1.meta, &m0.meta]),
    };
    let order = network_order([&m1.meta, &m0.meta], &all, &grouping);

    let mut out = WeightDrift {
        before: before.to_owned(),
        after: after.to_owned(),
        arch: m1
            .meta
            .as_ref()
            .or(m0.meta.as_ref())
            .map(|m| m.arch.to_string()),
        tensors: Vec::new(),
        batch_norm_statistics: Vec::new(),
        layers: Vec::new(),
        blocks: Vec::new(),
        stages: Vec::new(),
        added: Vec::new(),
        removed: Vec::new(),
        reshaped: Vec::new(),
        bytes_read: 0,
    };
    for name in &order {
        let (v0, v1) = match (names0.contains(name), names1.contains(name)) {
            (true, true) => (
                st0.tensor(&spelled0[name]).expect("listed"),
                st1.tensor(&spelled1[name]).expect("listed"),
            ),
            (false, _) if grouping.is_head(name) => {
                out.added.push(name.clone());
                continue;
            }
            (_, false) if grouping.is_head(name) => {
                out.removed.push(name.clone());
                continue;
            }
            (false, _) => {
                return Err(DriftError::ArchMismatch(format!(
                    "tensor {name} is in {} but not in {}",
                    after.display(),
                    before.display()
                )))
            }
            (_, false) => {
                return Err(DriftError::ArchMismatch(format!(
                    "tensor {name} is in {} but not in {}",
                    before.display(),
                    after.display()
                )))
            }
        };
        if v0.shape() != v1.shape() {
            if grouping.is_head(name) {
                out.reshaped
                    .push((name.clone(), v0.shape().to_vec(), v1.shape().to_vec()));
                continue;
            }
            return Err(DriftError::ArchMismatch(format!(
                "tensor {name} has shape {:?} in {} but {:?} in {}",
                v0.shape(),
                before.display(),
                v1.shape(),
                after.display()
            )));
        }
        for (m, v) in [(&m0, &v0), (&m1, &v1)] {
            let mut probe = Vec::new();
            if !decode(v.dtype(), &[], &mut probe) {
                return Err(DriftError::Dtype {
                    path: m.path.clone(),
                    tensor: name.clone(),
                    dtype: format!("{:?}", v.dtype()),
                });
            }
        }
        let n: usize = v0.shape().iter().product();
        let sums = pair_sums(v0.dtype(), v0.data(), v1.dtype(), v1.data(), n).map_err(|side| {
            DriftError::NonFinite {
                path: if side == 0 { before } else { after }.to_owned(),
                tensor: name.clone(),
            }
        })?;
        let bn = is_batch_norm_statistic(name);
        let matrix = !bn && v0.shape().len() >= 2;
        let (mut sn0, mut sn1, mut esd0, mut esd1) = (None, None, None, None);
        if (opts.spectral || opts.esd) && matrix {
            // One f32 copy of each side serves both analyses.
            let rows = v0.shape()[0];
            let cols = n / rows.max(1);
            let (w0, w1) = (as_f32(v0.dtype(), v0.data()), as_f32(v1.dtype(), v1.data()));
            if opts.spectral {
                sn0 = Some(spectral_norm(&w0, rows, cols, opts.power_iterations));
                sn1 = Some(spectral_norm(&w1, rows, cols, opts.power_iterations));
            }
            if opts.esd {
                esd0 = Some(spectrum(&w0, rows, cols, 0));
                esd1 = Some(spectrum(&w1, rows, cols, 0));
            }
        }
        let stable = |sq: f64, sn: Option<f64>| sn.filter(|s| *s > 0.0).map(|s| sq / (s * s));
        out.bytes_read += (v0.data().len() + v1.data().len()) as u64;
        m0.release(v0.data());
        m1.release(v1.data());
        let t = TensorDrift {
            name: name.clone(),
            shape: v0.shape().to_vec(),
            relative_l2_change: sums.relative_l2_change(),
            cosine_similarity: sums.cosine_similarity(),
            max_abs_change: sums.max_abs_diff,
            norm_before: sums.before_sq.sqrt(),
            norm_after: sums.after_sq.sqrt(),
            spectral_norm_before: sn0,
            spectral_norm_after: sn1,
            stable_rank_before: stable(sums.before_sq, sn0),
            stable_rank_after: stable(sums.after_sq, sn1),
            spectrum_before: esd0,
            spectrum_after: esd1,
            sums,
        };
        if bn {
            out.batch_norm_statistics.push(t);
        } else {
            out.tensors.push(t);
        }
    }
    out.layers = group(&out.tensors, |n| layer_of(n).to_owned());
    out.blocks = group(&out.tensors, |n| grouping.block_of(n));
    out.stages = group(&out.tensors, |n| grouping.stage_of(n));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn write(path: &Path, tensors: &[(&str, Vec<usize>, Vec<f32>)]) {
        let views: Vec<(String, safetensors::tensor::TensorView)> = tensors
            .iter()
            .map(|(n, shape, v)| {
                let bytes: &[u8] =
                    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, v.len() * 4) };
                (
                    n.to_string(),
                    safetensors::tensor::TensorView::new(Dtype::F32, shape.clone(), bytes).unwrap(),
                )
            })
            .collect();
        let bytes = safetensors::serialize(views, None::<HashMap<String, String>>).unwrap();
        std::fs::write(path, bytes).unwrap();
    }

    fn randv(n: usize, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n).map(|_| StandardNormal.sample(&mut rng)).collect()
    }

    /// Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (the reference "SVD":
    /// σᵢ² are the eigenvalues of WᵀW).
    fn jacobi_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
        for _ in 0..100 {
            let off: f64 = (0..n)
                .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
                .map(|(i, j)| a[i * n + j].powi(2))
                .sum();
            if off < 1e-22 {
                break;
            }
            for p in 0..n {
                for q in p + 1..n {
                    let apq = a[p * n + q];
                    if apq.abs() < 1e-300 {
                        continue;
                    }
                    let theta = (a[q * n + q] - a[p * n + p]) / (2.0 * apq);
                    let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                    let t = if theta == 0.0 { 1.0 } else { t };
                    let c = 1.0 / (t * t + 1.0).sqrt();
                    let s = t * c;
                    for k in 0..n {
                        let (akp, akq) = (a[k * n + p], a[k * n + q]);
                        a[k * n + p] = c * akp - s * akq;
                        a[k * n + q] = s * akp + c * akq;
                    }
                    for k in 0..n {
                        let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                        a[p * n + k] = c * apk - s * aqk;
                        a[q * n + k] = s * apk + c * aqk;
                    }
                }
            }
        }
        (0..n).map(|i| a[i * n + i]).collect()
    }

    #[test]
    fn spectral_norm_matches_the_svd() {
        for (rows, cols, seed) in [(5, 3, 1), (3, 7, 2), (8, 8, 3), (16, 12, 4)] {
            let w = randv(rows * cols, seed);
            let mut wtw = vec![0f64; cols * cols];
            for i in 0..cols {
                for j in 0..cols {
                    wtw[i * cols + j] = (0..rows)
                        .map(|r| w[r * cols + i] as f64 * w[r * cols + j] as f64)
                        .sum();
                }
            }
            let top = jacobi_eigenvalues(wtw, cols)
                .into_iter()
                .fold(0f64, f64::max)
                .sqrt();
            let got = spectral_norm(&w, rows, cols, 1000);
            assert!(
                (got - top).abs() < 1e-6 * top,
                "{rows}×{cols}: {got} vs {top}"
            );
        }
        // A known one: diag(3, 2, 1) has σ₁ = 3, stable rank 14/9.
        let d = [3f32, 0., 0., 0., 2., 0., 0., 0., 1.];
        assert!((spectral_norm(&d, 3, 3, 1000) - 3.0).abs() < 1e-9);
    }

    #[test]
    fn identical_checkpoints_have_zero_drift_and_a_perturbation_its_known_size() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        let w = randv(6 * 4 * 3 * 3, 1);
        let fc = randv(5 * 6, 2);
        let base = vec![
            ("layer1.0.conv1.weight", vec![6, 4, 3, 3], w.clone()),
            ("layer1.0.bn1.running_var", vec![6], vec![1.0; 6]),
            ("fc.weight", vec![5, 6], fc.clone()),
        ];
        write(&a, &base);
        write(&b, &base);
        let same = weight_drift(&a, &b, WeightDriftOptions::default()).unwrap();
        for t in &same.tensors {
            assert_eq!(t.relative_l2_change, 0.0, "{}", t.name);
            assert!((t.cosine_similarity - 1.0).abs() < 1e-12);
            assert_eq!(t.max_abs_change, 0.0);
            assert_eq!(t.spectral_norm_before, t.spectral_norm_after);
        }
        assert_eq!(same.batch_norm_statistics.len(), 1);
        // A zero tensor (a bias at its initial value) has no direction: its cosine is
        // undefined, written as null.
        let zero = Sums {
            after_sq: 4.0,
            diff_sq: 4.0,
            ..Sums::default()
        };
        assert!(zero.cosine_similarity().is_nan());
        assert!(Sums::default().cosine_similarity().is_nan());
        assert!(same.added.is_empty() && same.removed.is_empty() && same.reshaped.is_empty());

        // W₁ = W₀ + 0.1·P with P ⊥ ... simplest: scale by 1.1 → relative change 0.1, cosine 1.
        let scaled: Vec<f32> = w.iter().map(|x| x * 1.1).collect();
        write(
            &c,
            &[
                ("layer1.0.conv1.weight", vec![6, 4, 3, 3], scaled),
                ("layer1.0.bn1.running_var", vec![6], vec![2.0; 6]),
                ("fc.0.weight", vec![3, 6], randv(18, 3)),
                ("fc.weight", vec![2, 6], randv(12, 4)),
            ],
        );
        let moved = weight_drift(&a, &c, WeightDriftOptions::default()).unwrap();
        let t = &moved.tensors[0];
        assert!(
            (t.relative_l2_change - 0.1).abs() < 1e-6,
            "{}",
            t.relative_l2_change
        );
        assert!((t.cosine_similarity - 1.0).abs() < 1e-9);
        let (s0, s1) = (
            t.spectral_norm_before.unwrap(),
            t.spectral_norm_after.unwrap(),
        );
        assert!((s1 / s0 - 1.1).abs() < 1e-5, "σ scales with W");
        assert!((t.stable_rank_before.unwrap() - t.stable_rank_after.unwrap()).abs() < 1e-4);
        assert!((moved.batch_norm_statistics[0].relative_l2_change - 1.0).abs() < 1e-12);
        assert_eq!(moved.added, vec!["fc.0.weight"]);
        assert_eq!(moved.reshaped[0].0, "fc.weight");
        assert_eq!(moved.blocks[0].name, "layer1.0");
        assert_eq!(moved.stages[0].name, "layer1");
        assert_eq!(moved.layers[0].name, "layer1.0.conv1");
    }

    #[test]
    fn mismatched_and_non_finite_checkpoints_are_named() {
        let d = tempfile::tempdir().unwrap();
        let (a, b, c) = (d.path().join("a"), d.path().join("b"), d.path().join("c"));
        write(&a, &[("layer1.0.conv1.weight", vec![2, 2], vec![1.0; 4])]);
        write(&b, &[("layer1.0.conv1.weight", vec![4], vec![1.0; 4])]);
        let e = weight_drift(&a, &b, WeightDriftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("different architectures") && e.contains("layer1.0.conv1.weight"),
            "{e}"
        );
        write(
            &c,
            &[(
                "layer1.0.conv1.weight",
                vec![2, 2],
                vec![1.0, f32::NAN, 0.0, 0.0],
            )],
        );
        let e = weight_drift(&a, &c, WeightDriftOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("tensor layer1.0.conv1.weight contains NaN") && e.contains("/c"),
            "{e}"
        );
        write(&c, &[("layer2.0.conv1.weight", vec![2, 2], vec![1.0; 4])]);
        assert!(weight_drift(&a, &c, WeightDriftOptions::default()).is_err());
    }

    /// `inspect --spectral`'s reading: every matrix of rank ≥ 2 (a convolution's kernel as
    /// out × in·k·k), no vector and no batch-norm statistic, each with the spectrum computed
    /// on its own; a NaN weight is an error naming the file and the tensor.
    #[test]
    fn checkpoint_spectra_reads_every_weight_matrix() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("m.safetensors");
        let (conv, fc) = (randv(8 * 3 * 3 * 3, 1), randv(5 * 40, 2));
        write(
            &p,
            &[
                ("conv1.weight", vec![8, 3, 3, 3], conv.clone()),
                ("bn1.running_var", vec![8], vec![1.0; 8]),
                ("bn1.weight", vec![8], vec![1.0; 8]),
                ("fc.weight", vec![5, 40], fc.clone()),
                ("fc.bias", vec![5], vec![0.0; 5]),
            ],
        );
        let got = checkpoint_spectra(&p, None, None).unwrap();
        let names: Vec<&str> = got.iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["conv1.weight", "fc.weight"]);
        assert_eq!(got[0].spectrum, spectrum(&conv, 8, 27, 0));
        assert_eq!(got[1].spectrum, spectrum(&fc, 5, 40, 0));
        assert_eq!(got[0].shape, [8, 3, 3, 3]);
        // Renamed and filtered by `canonical`.
        let only_fc = checkpoint_spectra(
            &p,
            Some(|n: &str| n.starts_with("fc").then(|| format!("head.{n}"))),
            None,
        )
        .unwrap();
        assert_eq!(only_fc.len(), 1);
        assert_eq!(only_fc[0].name, "head.fc.weight");
        let mut bad = fc.clone();
        bad[7] = f32::NAN;
        write(&p, &[("fc.weight", vec![5, 40], bad)]);
        let e = checkpoint_spectra(&p, None, None).unwrap_err().to_string();
        assert!(
            e.contains("m.safetensors") && e.contains("fc.weight"),
            "{e}"
        );
    }
}
