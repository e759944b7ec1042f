//! Drift speed and memory, for `finelens bench drift`: weight drift over a pair of generated
//! checkpoints of a given size (throughput against the bytes read, and peak resident memory), and
//! minibatch CKA over a probe set.

use std::path::Path;
use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use finelens_models::{Arch, Head, ModelConfig, ParamStore, ResNet};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::Serialize;

use crate::error::{DriftError, Result};
use crate::weights::{weight_drift, WeightDriftOptions};

#[derive(Debug, Clone, Serialize)]
pub struct WeightDriftBench {
    pub checkpoint_bytes: u64,
    pub tensors: usize,
    pub largest_tensor_bytes: u64,
    pub seconds: f64,
    /// Tensor bytes read from both files per second.
    pub gigabytes_per_second: f64,
    /// Peak resident memory during the drift pass (Linux: VmHWM after a reset).
    pub peak_rss_bytes: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct CkaBench {
    pub arch: String,
    pub size: usize,
    pub images: usize,
    pub batch: usize,
    pub layers: Vec<String>,
    pub seconds: f64,
}

fn io(path: &Path) -> impl Fn(std::io::Error) -> DriftError + '_ {
    move |error| DriftError::Io {
        path: path.to_owned(),
        error,
    }
}

/// Write a safetensors file of `tensors` f32 matrices `rows × cols` with seeded values, streamed
/// in pieces (never the whole file in memory). With `base_seed` set, values are those of
/// `base_seed` plus 1% noise from `seed`: a "fine-tuned" copy.
pub fn write_generated_checkpoint(
    path: &Path,
    tensors: usize,
    rows: usize,
    cols: usize,
    seed: u64,
    base_seed: Option<u64>,
) -> Result<()> {
    let bytes_per = (rows * cols * 4) as u64;
    let mut header = String::from("{");
    for t in 0..tensors {
        let (s, e) = (t as u64 * bytes_per, (t as u64 + 1) * bytes_per);
        header.push_str(&format!(
            "\"layer{t}.weight\":{{\"dtype\":\"F32\",\"shape\":[{rows},{cols}],\"data_offsets\":[{s},{e}]}},"
        ));
    }
    header.pop();
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut rng = ChaCha8Rng::seed_from_u64(base_seed.unwrap_or(seed));
    let mut noise = ChaCha8Rng::seed_from_u64(seed);
    let scale = 1.0 / (cols as f32).sqrt();
    finelens_models::checkpoint::write_atomic_with(path, |f| {
        f.write_all(&(header.len() as u64).to_le_bytes())?;
        f.write_all(header.as_bytes())?;
        let mut piece = Vec::with_capacity(1 << 20);
        for _ in 0..tensors {
            let mut left = rows * cols;
            while left > 0 {
                let m = left.min(1 << 18);
                piece.clear();
                for _ in 0..m {
                    // Uniform(−√3, √3)·scale has unit variance times scale; cheap to draw.
                    let mut v = (rng.random::<f32>() * 2.0 - 1.0) * 1.732 * scale;
                    if base_seed.is_some() {
                        v += (noise.random::<f32>() * 2.0 - 1.0) * 0.01732 * scale;
                    }
                    piece.extend_from_slice(&v.to_le_bytes());
                }
                f.write_all(&piece)?;
                left -= m;
            }
        }
        Ok(())
    })?;
    Ok(())
}

/// Generate two checkpoints of about `gigabytes` each in `dir` (kept for reuse when present)
/// and time the weight-drift pass over them (statistics without spectral norms: the streaming
/// part whose speed is bounded by memory bandwidth).
pub fn weight_drift_bench(dir: &Path, gigabytes: f64) -> Result<WeightDriftBench> {
    let (rows, cols) = (4096, 4096);
    let tensor_bytes = (rows * cols * 4) as u64;
    let tensors = ((gigabytes * (1u64 << 30) as f64) / tensor_bytes as f64)
        .round()
        .max(1.0) as usize;
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let a = dir.join(format!("drift-bench-{tensors}x{rows}x{cols}-a.safetensors"));
    let b = dir.join(format!("drift-bench-{tensors}x{rows}x{cols}-b.safetensors"));
    if !a.exists() {
        write_generated_checkpoint(&a, tensors, rows, cols, 1, None)?;
    }
    if !b.exists() {
        write_generated_checkpoint(&b, tensors, rows, cols, 2, Some(1))?;
    }
    finelens_models::memory::reset_peak_rss();
    let start = Instant::now();
    let d = weight_drift(
        &a,
        &b,
        WeightDriftOptions {
            spectral: false,
            ..Default::default()
        },
    )?;
    let seconds = start.elapsed().as_secs_f64();
    Ok(WeightDriftBench {
        checkpoint_bytes: std::fs::metadata(&a).map_err(io(&a))?.len(),
        tensors,
        largest_tensor_bytes: tensor_bytes,
        seconds,
        gigabytes_per_second: d.bytes_read as f64 / seconds / 1e9,
        peak_rss_bytes: finelens_models::memory::peak_rss_bytes(),
    })
}

/// Minibatch CKA between two randomly initialised resnet-minis over `images` seeded random
/// 64×64 inputs at five layers.
pub fn cka_bench(images: usize, batch: usize) -> Result<CkaBench> {
    let dev = Device::Cpu;
    let cfg = ModelConfig::new(Arch::ResNetMini, 10, Head::Linear)?;
    let a = ParamStore::init(&cfg.param_specs(), 1, &dev)?.frozen_as(DType::F32)?;
    let b = ParamStore::init(&cfg.param_specs(), 2, &dev)?.frozen_as(DType::F32)?;
    let (ma, mb) = (ResNet::new(cfg, &a)?, ResNet::new(cfg, &b)?);
    let layers = cfg.describe().representation_layers;
    let size = 64;
    let batches = (0..images.div_ceil(batch)).map(|i| {
        let n = batch.min(images - i * batch);
        let mut rng = ChaCha8Rng::seed_from_u64(i as u64);
        let v: Vec<f32> = (0..n * 3 * size * size)
            .map(|_| rng.random::<f32>() * 2.0 - 1.0)
            .collect();
        Ok(Tensor::from_vec(v, (n, 3, size, size), &dev)?)
    });
    let start = Instant::now();
    crate::cka::representation_drift(&ma, &mb, batches, &layers, false)?;
    Ok(CkaBench {
        arch: Arch::ResNetMini.name().into(),
        size,
        images,
        batch,
        layers,
        seconds: start.elapsed().as_secs_f64(),
    })
}

impl std::fmt::Display for WeightDriftBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / (1u64 << 20) as f64;
        write!(
            f,
            "  weight drift: {} tensors of {:.0} MiB, {:.2} s → {:.2} GB/s of tensor data read; peak RSS {}",
            self.tensors,
            mib(self.largest_tensor_bytes),
            self.seconds,
            self.gigabytes_per_second,
            self.peak_rss_bytes.map_or("unknown".into(), |b| format!(
                "{:.0} MiB ({:.1}× the largest tensor)",
                mib(b),
                b as f64 / self.largest_tensor_bytes as f64
            ))
        )
    }
}

impl std::fmt::Display for CkaBench {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  minibatch CKA: {} images at {}×{}, batch {}, layers {}: {:.2} s",
            self.images,
            self.size,
            self.size,
            self.batch,
            self.layers.join(", "),
            self.seconds
        )
    }
}
