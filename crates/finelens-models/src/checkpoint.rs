//! Checkpoints: safetensors files whose tensors carry torchvision's state-dict names, plus finelens
//! metadata (architecture, classes, preprocessing, lineage, training configuration).
//!
//! The metadata lives in the safetensors header under the key `finelens` as JSON. A bare
//! torchvision file (`safetensors.torch.save_file(model.state_dict(), path)`) has none; then a
//! `<stem>.json` beside it is read if present, else the caller names the architecture and the
//! rest is inferred from the tensors (class count and head from `fc`). Files are written to a
//! temporary name in the same directory and renamed, so a reader never sees half a checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{ModelError, Result};
use crate::params::ParamStore;
use crate::resnet::{Arch, Head, ModelConfig};

/// The safetensors header key holding finelens metadata.
pub const METADATA_KEY: &str = "finelens";
/// Bumped when the metadata's meaning changes.
pub const FORMAT: &str = "finelens-checkpoint/1";

/// ImageNet statistics, torchvision's defaults for pretrained models.
pub const IMAGENET_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
pub const IMAGENET_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// What a checkpoint says about itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metadata {
    pub format: String,
    pub arch: Arch,
    pub head: Head,
    pub num_classes: usize,
    pub class_names: Vec<String>,
    /// Side of the square input the model expects.
    pub input_size: usize,
    /// Share of the resized image that the centre crop keeps at evaluation (torchvision's 224/256).
    pub crop_pct: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// SHA-256 of the checkpoint this one was fine-tuned from.
    pub parent_sha256: Option<String>,
    pub seed: Option<u64>,
    /// The training configuration and results, as the trainer recorded them.
    pub training: Option<serde_json::Value>,
    pub finelens_version: String,
}

impl Metadata {
    /// Defaults for a model with no recorded metadata: ImageNet normalisation, numbered classes.
    pub fn inferred(config: ModelConfig) -> Self {
        Self {
            format: FORMAT.into(),
            arch: config.arch,
            head: config.head,
            num_classes: config.num_classes,
            class_names: (0..config.num_classes)
                .map(|i| format!("class_{i}"))
                .collect(),
            input_size: config.arch.default_input_size(),
            crop_pct: 0.875,
            mean: IMAGENET_MEAN,
            std: IMAGENET_STD,
            parent_sha256: None,
            seed: None,
            training: None,
            finelens_version: env!("CARGO_PKG_VERSION").into(),
        }
    }

    pub fn config(&self) -> Result<ModelConfig> {
        ModelConfig::new(self.arch, self.num_classes, self.head)
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let bad = |reason: String| {
            Err(ModelError::Metadata {
                path: path.to_owned(),
                reason,
            })
        };
        if self.class_names.len() != self.num_classes {
            return bad(format!(
                "{} class names for {} classes",
                self.class_names.len(),
                self.num_classes
            ));
        }
        if self.input_size == 0 || !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return bad(format!(
                "input_size {} / crop_pct {} out of range",
                self.input_size, self.crop_pct
            ));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return bad(format!("normalisation std {:?} must be positive", self.std));
        }
        Ok(())
    }
}

/// A loaded checkpoint: its tensors, its metadata, and where it came from.
pub struct Checkpoint {
    pub path: PathBuf,
    pub store: ParamStore,
    pub meta: Metadata,
    /// True when the metadata was recorded (header or sidecar), false when inferred.
    pub meta_recorded: bool,
    pub sha256: String,
}

impl Checkpoint {
    pub fn config(&self) -> Result<ModelConfig> {
        self.meta.config()
    }
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ModelError + '_ {
    move |error| ModelError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Hex SHA-256 of a file.
/// Hex SHA-256 of a file, read in 1 MiB pieces (checkpoints can be larger than memory).
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(io_err(path))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = std::io::Read::read(&mut file, &mut buf).map_err(io_err(path))?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}

/// A checkpoint's recorded metadata (header or sidecar) from its header alone, without reading
/// the tensors; `None` for a bare file.
pub fn read_metadata(path: &Path, bytes: &[u8]) -> Result<Option<Metadata>> {
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| ModelError::Corrupt {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    recorded_metadata(path, header.metadata())
}

/// The parsed header of a safetensors file: metadata and raw tensors.
struct RawCheckpoint {
    tensors: BTreeMap<String, Tensor>,
    header: Option<HashMap<String, String>>,
    sha256: String,
}

fn read_raw(path: &Path) -> Result<RawCheckpoint> {
    if path.is_dir() {
        return Err(ModelError::Io {
            path: path.to_owned(),
            error: std::io::Error::other(
                "a directory, not a checkpoint file (a Hugging Face model folder has a config.json)",
            ),
        });
    }
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let corrupt = |e: safetensors::SafeTensorError| ModelError::Corrupt {
        path: path.to_owned(),
        reason: e.to_string(),
    };
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(corrupt)?;
    let st = safetensors::SafeTensors::deserialize(&bytes).map_err(corrupt)?;
    let mut tensors = BTreeMap::new();
    for (name, view) in st.tensors() {
        use candle_core::safetensors::Load;
        let t = view.load(&Device::Cpu).map_err(|e| ModelError::Corrupt {
            path: path.to_owned(),
            reason: format!("tensor {name}: {e}"),
        })?;
        tensors.insert(name, t);
    }
    Ok(RawCheckpoint {
        tensors,
        header: header.metadata().clone(),
        sha256: sha256_hex(&bytes),
    })
}

/// The JSON file beside a checkpoint: `model.safetensors` → `model.json`.
pub fn sidecar_path(path: &Path) -> PathBuf {
    path.with_extension("json")
}

fn recorded_metadata(
    path: &Path,
    header: &Option<HashMap<String, String>>,
) -> Result<Option<Metadata>> {
    let bad = |reason: String| ModelError::Metadata {
        path: path.to_owned(),
        reason,
    };
    if let Some(json) = header.as_ref().and_then(|h| h.get(METADATA_KEY)) {
        return serde_json::from_str(json)
            .map(Some)
            .map_err(|e| bad(e.to_string()));
    }
    let side = sidecar_path(path);
    if side.is_file() {
        let text = std::fs::read_to_string(&side).map_err(io_err(&side))?;
        return serde_json::from_str(&text)
            .map(Some)
            .map_err(|e| ModelError::Metadata {
                path: side.clone(),
                reason: e.to_string(),
            });
    }
    Ok(None)
}

/// Infer class count and head for `arch` from a bare state dict's `fc` tensors.
fn infer_config(
    path: &Path,
    arch: Arch,
    tensors: &BTreeMap<String, Tensor>,
) -> Result<ModelConfig> {
    let rows = |name: &str| tensors.get(name).and_then(|t| t.dims().first().copied());
    let (classes, head) = if let Some(n) = rows("fc.weight") {
        (n, Head::Linear)
    } else if let (Some(hidden), Some(n)) = (rows("fc.0.weight"), rows("fc.2.weight")) {
        (n, Head::Mlp { hidden })
    } else {
        return Err(ModelError::KeyMismatch {
            path: path.to_owned(),
            arch: arch.name().into(),
            detail: "no classifier head (neither fc.weight nor fc.0.weight/fc.2.weight)".into(),
        });
    };
    ModelConfig::new(arch, classes, head)
}

/// Load a checkpoint. `arch` is required for a file without recorded metadata, and when given
/// for one with metadata it must agree with it.
pub fn load(path: &Path, arch: Option<Arch>) -> Result<Checkpoint> {
    let raw = read_raw(path)?;
    let recorded = recorded_metadata(path, &raw.header)?;
    let meta_recorded = recorded.is_some();
    let meta = match (recorded, arch) {
        (Some(m), Some(a)) if m.arch != a => {
            return Err(ModelError::Metadata {
                path: path.to_owned(),
                reason: format!("checkpoint is {} but --arch {} was given", m.arch, a),
            })
        }
        (Some(m), _) => m,
        (None, Some(a)) => Metadata::inferred(infer_config(path, a, &raw.tensors)?),
        (None, None) => {
            return Err(ModelError::NoArch {
                path: path.to_owned(),
                known: Arch::ALL.map(|a| a.name()).join(", "),
            })
        }
    };
    meta.validate(path)?;
    let config = meta.config()?;
    let store =
        ParamStore::from_tensors(&config.param_specs(), raw.tensors, path, config.arch.name())?;
    Ok(Checkpoint {
        path: path.to_owned(),
        store,
        meta,
        meta_recorded,
        sha256: raw.sha256,
    })
}

/// Write `bytes` to `path` atomically: a temporary file in the same directory, synced, renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    write_atomic_with(path, |w| w.write_all(bytes))
}

/// Write `path` atomically from a writer (for files too large to build in memory): a temporary
/// file in the same directory, buffered, synced and renamed into place (`tempfile`'s persist). On
/// any error the temporary file is removed and `path` is left as it was.
pub fn write_atomic_with(
    path: &Path,
    write: impl FnOnce(&mut dyn Write) -> std::io::Result<()>,
) -> Result<()> {
    let io = |error: std::io::Error| ModelError::Io {
        path: path.to_owned(),
        error,
    };
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_owned(),
        _ => PathBuf::from("."),
    };
    let name = path.file_name().ok_or_else(|| {
        io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a file path",
        ))
    })?;
    let prefix = format!(".{}.", name.to_string_lossy());
    let mut builder = tempfile::Builder::new();
    builder.prefix(&prefix).suffix(".tmp");
    // tempfile creates 0600 files (a temporary file is private); the file we persist is an
    // output, so it gets the permissions any new file would (0666 less the umask).
    #[cfg(unix)]
    builder.permissions(std::os::unix::fs::PermissionsExt::from_mode(0o666));
    let mut tmp = builder.tempfile_in(&dir).map_err(io)?;
    {
        let mut w = std::io::BufWriter::with_capacity(1 << 22, tmp.as_file_mut());
        write(&mut w).map_err(io)?;
        w.flush().map_err(io)?;
    }
    tmp.as_file().sync_all().map_err(io)?;
    tmp.persist(path).map_err(|e| io(e.error))?;
    Ok(())
}

/// Serialise a store and its metadata into safetensors bytes.
pub fn to_bytes(store: &ParamStore, meta: &Metadata) -> Result<Vec<u8>> {
    let json = serde_json::to_string(meta).expect("metadata serialises");
    let header = HashMap::from([(METADATA_KEY.to_string(), json)]);
    let tensors: Vec<(String, Tensor)> = store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect();
    safetensors::serialize(tensors, Some(header))
        .map_err(|e| ModelError::Config(format!("serialising checkpoint: {e}")))
}

/// Save a checkpoint atomically; returns its SHA-256.
pub fn save(path: &Path, store: &ParamStore, meta: &Metadata) -> Result<String> {
    let bytes = to_bytes(store, meta)?;
    write_atomic(path, &bytes)?;
    Ok(sha256_hex(&bytes))
}

/// Save arbitrary named tensors with a string header (a training run's resumable state), atomically.
pub fn save_state(
    path: &Path,
    tensors: Vec<(String, Tensor)>,
    header: HashMap<String, String>,
) -> Result<()> {
    let bytes = safetensors::serialize(tensors, Some(header))
        .map_err(|e| ModelError::Config(format!("serialising {}: {e}", path.display())))?;
    write_atomic(path, &bytes)
}

/// Every tensor of a safetensors file by name, and the file's SHA-256: for model families that
/// finelens metadata does not describe (their own specs check the names and shapes).
pub fn read_tensors(path: &Path) -> Result<(BTreeMap<String, Tensor>, String)> {
    let raw = read_raw(path)?;
    Ok((raw.tensors, raw.sha256))
}

/// A safetensors file, read whole.
pub struct SafetensorsFile {
    pub tensors: BTreeMap<String, Tensor>,
    /// The header's metadata (empty when it has none).
    pub header: HashMap<String, String>,
    pub sha256: String,
}

/// The tensors by name, the header's metadata and the file's SHA-256, in one read.
pub fn read_with_header(path: &Path) -> Result<SafetensorsFile> {
    let raw = read_raw(path)?;
    Ok(SafetensorsFile {
        tensors: raw.tensors,
        header: raw.header.unwrap_or_default(),
        sha256: raw.sha256,
    })
}

/// Read what [`save_state`] wrote: the tensors by name and the header.
pub fn load_state(path: &Path) -> Result<(BTreeMap<String, Tensor>, HashMap<String, String>)> {
    let raw = read_raw(path)?;
    Ok((raw.tensors, raw.header.unwrap_or_default()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    /// An atomically written file gets the permissions a plainly created one gets (the umask's),
    /// not the temporary file's private 0600.
    #[cfg(unix)]
    #[test]
    fn atomic_writes_get_ordinary_permissions() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let (atomic, plain) = (d.path().join("a.json"), d.path().join("b.json"));
        write_atomic(&atomic, b"{}").unwrap();
        std::fs::write(&plain, b"{}").unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&atomic), mode(&plain));
    }

    fn mini_meta() -> (ModelConfig, Metadata) {
        let cfg = ModelConfig::new(Arch::ResNetMini, 3, Head::Linear).unwrap();
        let mut m = Metadata::inferred(cfg);
        m.class_names = vec!["a".into(), "b".into(), "<c>".into()];
        m.seed = Some(9);
        (cfg, m)
    }

    #[test]
    fn save_then_load_round_trips_tensors_and_metadata() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let (cfg, meta) = mini_meta();
        let store = ParamStore::init(&cfg.param_specs(), 3, &Device::Cpu).unwrap();
        let sha = save(&p, &store, &meta).unwrap();
        let ck = load(&p, None).unwrap();
        assert_eq!(ck.meta, meta);
        assert!(ck.meta_recorded);
        assert_eq!(ck.sha256, sha);
        assert_eq!(sha, sha256_file(&p).unwrap());
        for ((n1, t1, _), (n2, t2, _)) in store.iter().zip(ck.store.iter()) {
            assert_eq!(n1, n2);
            let a: Vec<f32> = t1
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let b: Vec<f32> = t2
                .to_dtype(DType::F32)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            assert_eq!(a, b, "{n1}");
        }
        // No temporary file is left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn arch_disagreeing_with_metadata_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.safetensors");
        let (cfg, meta) = mini_meta();
        save(
            &p,
            &ParamStore::init(&cfg.param_specs(), 3, &Device::Cpu).unwrap(),
            &meta,
        )
        .unwrap();
        let e = load(&p, Some(Arch::ResNet18)).err().unwrap().to_string();
        assert!(
            e.contains("checkpoint is resnet-mini but --arch resnet18"),
            "{e}"
        );
    }

    #[test]
    fn unwritable_destination_fails_cleanly() {
        let (cfg, meta) = mini_meta();
        let store = ParamStore::init(&cfg.param_specs(), 3, &Device::Cpu).unwrap();
        let e = save(Path::new("/nonexistent-dir/x/m.safetensors"), &store, &meta)
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("/nonexistent-dir/x/m.safetensors:"), "{e}");
    }
}
