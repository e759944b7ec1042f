//! Training throughput, for `finelens bench train`: full optimiser steps (forward in train
//! mode, cross-entropy, backward, SGD with momentum or AdamW) on random data, after one warm-up
//! step.

use std::time::Instant;

use candle_core::{DType, Device, Tensor};
use finelens_models::bert::{Bert, BertConfig, BertSpec, TextHead};
use finelens_models::{Arch, Classifier, Head, Mode, ModelConfig, ParamStore, ResNet, TokenBatch};

use crate::error::Result;
use crate::metrics::cross_entropy;
use crate::optim::{Optimizer, OptimizerConfig};

/// What one benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    pub arch: String,
    /// "sgd" (momentum 0.9) or "adamw".
    pub optimizer: String,
    pub size: usize,
    pub batch: usize,
    pub steps: usize,
    pub seconds_per_step: f64,
    pub images_per_second: f64,
    /// Peak resident memory while this model trained (Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// Time `steps` training steps of `arch` at `size`×`size`, batch `batch`, 10 classes, with SGD
/// (momentum 0.9) or, with `adamw`, AdamW (weight decay 0.01), as the PyTorch peer
/// (`shared/peer-bench/torch_train_bench.py`).
pub fn train_throughput(
    arch: Arch,
    size: usize,
    batch: usize,
    steps: usize,
    adamw: bool,
) -> Result<Throughput> {
    finelens_models::memory::reset_peak_rss();
    let dev = Device::Cpu;
    let config = ModelConfig::new(arch, 10, Head::Linear)?;
    let store = ParamStore::init(&config.param_specs(), 0, &dev)?;
    let model = ResNet::new(config, &store)?;
    let params = store
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| (v, 1.0))
        .collect();
    let config = if adamw {
        OptimizerConfig::adamw(0.01)
    } else {
        OptimizerConfig::sgd(0.9, false, 0.0)
    };
    let mut opt = Optimizer::new(config, params)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &dev)?;
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        batch,
        &dev,
    )?;
    let mut step = || -> Result<()> {
        let loss = cross_entropy(&model.forward(&x, Mode::Train)?, &labels)?;
        opt.step(&finelens_models::backward(&loss)?, 1e-3)?;
        Ok(())
    };
    step()?;
    let start = Instant::now();
    for _ in 0..steps {
        step()?;
    }
    let seconds_per_step = start.elapsed().as_secs_f64() / steps as f64;
    Ok(Throughput {
        arch: arch.name().into(),
        optimizer: if adamw { "adamw" } else { "sgd" }.into(),
        size,
        batch,
        steps,
        seconds_per_step,
        images_per_second: batch as f64 / seconds_per_step,
        peak_rss_bytes: finelens_models::memory::peak_rss_bytes(),
    })
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  {:<12} {:>3}×{:<3} {:<6} {:>8.2} s/step  {:>8.1} images/s  peak {}",
            self.arch,
            self.size,
            self.size,
            self.optimizer,
            self.seconds_per_step,
            self.images_per_second,
            finelens_models::memory::mib(self.peak_rss_bytes)
        )
    }
}

/// What the text fine-tuning benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TextThroughput {
    pub model: String,
    pub tokens: usize,
    pub batch: usize,
    pub steps: usize,
    pub seconds_per_step: f64,
    pub sentences_per_second: f64,
    /// Peak resident memory of the process (Linux).
    pub peak_rss_bytes: Option<u64>,
}

/// Time `steps` fine-tuning steps (train mode with dropout, cross-entropy, backward, AdamW with
/// BERT's decay exclusions) of an encoder shaped like `config` with a `cls` head, on `batch`
/// random sentences of `tokens` tokens, after one warm-up step. The weights are a seeded random
/// initialisation: the speed does not depend on them.
pub fn text_throughput(
    name: &str,
    config: BertConfig,
    tokens: usize,
    batch: usize,
    steps: usize,
) -> Result<TextThroughput> {
    let dev = Device::Cpu;
    let vocab = config.vocab_size as u32;
    let spec = BertSpec {
        config,
        classes: 2,
        head: TextHead::Cls,
    };
    let store = ParamStore::init(&spec.param_specs(), 0, &dev)?;
    let model = Bert::new(spec, &store)?;
    let params = store
        .trainable_vars()
        .into_iter()
        .map(|(n, v)| (v, 1.0, crate::text::decays(&n)))
        .collect();
    let mut opt = Optimizer::with_decay(OptimizerConfig::adamw(0.01), params)?;
    let ids: Vec<u32> = (0..batch * tokens)
        .map(|i| 1000 + (i as u32).wrapping_mul(2_654_435_761) % (vocab - 1000))
        .collect();
    let batch_t = TokenBatch {
        ids: Tensor::from_vec(ids, (batch, tokens), &dev)?,
        type_ids: Tensor::zeros((batch, tokens), DType::U32, &dev)?,
        mask: Tensor::ones((batch, tokens), DType::U32, &dev)?,
    };
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 2).collect::<Vec<_>>(),
        batch,
        &dev,
    )?;
    let mut step = |k: u64| -> Result<()> {
        model.reseed_dropout(k);
        let loss = cross_entropy(&model.forward(&batch_t, Mode::Train)?, &labels)?;
        opt.step(&finelens_models::backward(&loss)?, 2e-5)?;
        Ok(())
    };
    step(0)?;
    let start = Instant::now();
    for k in 0..steps {
        step(k as u64 + 1)?;
    }
    let seconds_per_step = start.elapsed().as_secs_f64() / steps as f64;
    Ok(TextThroughput {
        model: name.into(),
        tokens,
        batch,
        steps,
        seconds_per_step,
        sentences_per_second: batch as f64 / seconds_per_step,
        peak_rss_bytes: finelens_models::memory::peak_rss_bytes(),
    })
}

impl std::fmt::Display for TextThroughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  {:<18} {:>3} tokens × {:<3} {:>7.2} s/step  {:>7.1} sentences/s  peak {}",
            self.model,
            self.tokens,
            self.batch,
            self.seconds_per_step,
            self.sentences_per_second,
            finelens_models::memory::mib(self.peak_rss_bytes)
        )
    }
}
