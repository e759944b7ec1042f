//! Training throughput, for `finelens bench train`: full optimiser steps (forward in train
//! mode, cross-entropy, backward, SGD with momentum) on random data, after one warm-up step.

use std::time::Instant;

use candle_core::{Device, Tensor};
use finelens_models::{Arch, Classifier, Head, Mode, ModelConfig, ParamStore, ResNet};

use crate::error::Result;
use crate::metrics::cross_entropy;
use crate::optim::{Optimizer, OptimizerConfig};

/// What one benchmark measured.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Throughput {
    pub arch: String,
    pub size: usize,
    pub batch: usize,
    pub steps: usize,
    pub seconds_per_step: f64,
    pub images_per_second: f64,
}

/// Time `steps` training steps of `arch` at `size`×`size`, batch `batch`, 10 classes.
pub fn train_throughput(arch: Arch, size: usize, batch: usize, steps: usize) -> Result<Throughput> {
    let dev = Device::Cpu;
    let config = ModelConfig::new(arch, 10, Head::Linear)?;
    let store = ParamStore::init(&config.param_specs(), 0, &dev)?;
    let model = ResNet::new(config, &store)?;
    let params = store
        .trainable_vars()
        .into_iter()
        .map(|(_, v)| (v, 1.0))
        .collect();
    let mut opt = Optimizer::new(OptimizerConfig::sgd(0.9, false, 1e-4), params)?;
    let x = Tensor::randn(0f32, 1.0, (batch, 3, size, size), &dev)?;
    let labels = Tensor::from_vec(
        (0..batch as u32).map(|i| i % 10).collect::<Vec<_>>(),
        batch,
        &dev,
    )?;
    let mut step = || -> Result<()> {
        let loss = cross_entropy(&model.forward(&x, Mode::Train)?, &labels)?;
        opt.step(&loss.backward()?, 1e-3)?;
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
        size,
        batch,
        steps,
        seconds_per_step,
        images_per_second: batch as f64 / seconds_per_step,
    })
}

impl std::fmt::Display for Throughput {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "  {:<12} {:>3}×{:<3}  {:>8.2} s/step  {:>8.1} images/s",
            self.arch, self.size, self.size, self.seconds_per_step, self.images_per_second
        )
    }
}
