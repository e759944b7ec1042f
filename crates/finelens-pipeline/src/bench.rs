//! Benchmarks as jobs: each checks its settings, reports every figure as it is measured
//! (`Event::Info`, one line each) and returns them typed, for `--json`. Speed is measured here,
//! never in tests.

use std::path::PathBuf;

use finelens_models::Arch;
use serde::Serialize;

use crate::error::{settings, Result};
use crate::progress::{Event, Progress};

/// The number of threads candle's CPU kernels use.
pub fn rayon_threads() -> String {
    std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| {
        std::thread::available_parallelism().map_or("?".into(), |n| n.to_string())
    })
}

/// The cases a benchmark runs: resnet-mini at 64×64, and resnet18 at 64×64 and 224×224 (the
/// PyTorch peer's sizes) unless `quick`.
fn cases(quick: bool) -> Vec<(Arch, usize)> {
    let mut c = vec![(Arch::ResNetMini, 64)];
    if !quick {
        c.extend([(Arch::ResNet18, 64), (Arch::ResNet18, 224)]);
    }
    c
}

/// Training throughput (images/s) for resnet-mini at 64×64 and resnet18 at 64×64 and 224×224.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TrainBench {
    /// Timed optimiser steps per model (after one warm-up step).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub steps: usize,
    /// Images per batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32))]
    pub batch_size: usize,
    /// Skip resnet18 (it takes minutes on 2 cores).
    #[cfg_attr(feature = "cli", arg(long))]
    pub quick: bool,
    /// The optimiser: sgd (momentum 0.9) or adamw.
    #[cfg_attr(feature = "cli", arg(long, default_value = "sgd"))]
    pub optimizer: String,
}

/// Training images/s: forward (train mode) + cross-entropy + backward + optimiser step.
pub fn train(
    TrainBench {
        steps,
        batch_size,
        quick,
        optimizer,
    }: &TrainBench,
    progress: Progress,
) -> Result<Vec<finelens_tune::bench::Throughput>> {
    let (steps, batch_size) = (*steps, *batch_size);
    if steps == 0 || batch_size == 0 {
        return Err(settings("bench: steps and batch size must be at least 1"));
    }
    let adamw = match optimizer.as_str() {
        "sgd" => false,
        "adamw" => true,
        other => {
            return Err(settings(format!(
                "bench: unknown optimizer {other:?} (sgd or adamw)"
            )))
        }
    };
    progress(Event::Info(format!(
        "training throughput: forward (train mode) + cross-entropy + backward + {optimizer} step, batch {batch_size}, {} rayon threads",
        rayon_threads()
    )));
    cases(*quick)
        .into_iter()
        .map(|(arch, size)| {
            let t = finelens_tune::bench::train_throughput(arch, size, batch_size, steps, adamw)?;
            progress(Event::Info(t.to_string()));
            Ok(t)
        })
        .collect()
}

/// Explanation speed (ms/image, batch 1) for resnet18 at 224×224 and 64×64 and resnet-mini at
/// 64×64.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct ExplainBench {
    /// Timed repeats per figure (the median is printed), after one warm-up run.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub repeats: usize,
    /// Internal batch sizes to try for IG-50 (the fastest is reported).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_delimiter = ',', default_value = "5,10,25,50")
    )]
    pub ig_batches: Vec<usize>,
    /// Skip resnet18.
    #[cfg_attr(feature = "cli", arg(long))]
    pub quick: bool,
}

/// Explanation ms per image at batch 1 (median of `repeats`).
pub fn explain(
    ExplainBench {
        repeats,
        ig_batches,
        quick,
    }: &ExplainBench,
    progress: Progress,
) -> Result<Vec<finelens_attrib::bench::ExplainTimings>> {
    let (repeats, quick) = (*repeats, *quick);
    if repeats == 0 || ig_batches.is_empty() || ig_batches.contains(&0) {
        return Err(settings(
            "bench: repeats and every IG internal batch must be at least 1",
        ));
    }
    progress(Event::Info(format!(
        "explanation time, ms per image at batch 1 (median of {repeats}), {} rayon threads",
        rayon_threads()
    )));
    let mut out = Vec::new();
    // resnet18 first, with 10 classes as the Captum peer (shared/peer-bench/captum_bench.py).
    for (arch, size) in cases(quick).into_iter().rev() {
        let classes = if arch == Arch::ResNet18 { 10 } else { 6 };
        let t = finelens_attrib::bench::explain_timings(arch, size, classes, repeats, ig_batches)?;
        progress(Event::Info(t.to_string()));
        out.push(t);
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct DriftBench {
    pub weights: finelens_drift::bench::WeightDriftBench,
    pub cka: finelens_drift::bench::CkaBench,
}

/// Weight drift over two generated checkpoints (GB/s, peak resident memory) and minibatch CKA
/// over probe images for resnet-mini's five tapped layers (seconds).
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct DriftBenchSettings {
    /// Size of each generated checkpoint, in GiB.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1.0))]
    pub gigabytes: f64,
    /// Where the generated checkpoints are written (and reused by later runs).
    #[cfg_attr(feature = "cli", arg(long, default_value = "target/drift-bench"))]
    pub dir: PathBuf,
    /// Probe images for the CKA figure.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 2000))]
    pub cka_images: usize,
}

/// Weight drift over two generated checkpoints of `gigabytes` each (kept in `dir`), and
/// minibatch CKA over `cka_images` probe images.
pub fn drift(
    DriftBenchSettings {
        gigabytes,
        dir,
        cka_images,
    }: &DriftBenchSettings,
    progress: Progress,
) -> Result<DriftBench> {
    let (gigabytes, cka_images) = (*gigabytes, *cka_images);
    if gigabytes.is_nan() || gigabytes <= 0.0 || cka_images < crate::drift::MIN_CKA_BATCH {
        return Err(settings(
            "bench: the checkpoint size must be positive and the CKA images at least 4",
        ));
    }
    progress(Event::Info(format!(
        "drift: {} rayon threads; generating (once) two {gigabytes:.1} GiB checkpoints in {}",
        rayon_threads(),
        dir.display()
    )));
    let weights = finelens_drift::bench::weight_drift_bench(dir, gigabytes)?;
    progress(Event::Info(weights.to_string()));
    let cka = finelens_drift::bench::cka_bench(cka_images, 100)?;
    progress(Event::Info(cka.to_string()));
    Ok(DriftBench { weights, cka })
}

/// Text fine-tuning throughput (sentences/s) for an all-MiniLM-L6-v2-shaped encoder.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TextBench {
    /// Timed optimiser steps (after one warm-up step).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 5))]
    pub steps: usize,
    /// Sentences per batch.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 16))]
    pub batch_size: usize,
    /// Tokens per sentence.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub tokens: usize,
}

/// Fine-tuning steps of all-MiniLM-L6-v2's shape: train mode with dropout, cross-entropy,
/// backward, AdamW. Compare with `scripts/peer_text_bench.py`, interleaved.
pub fn text(s: &TextBench, progress: Progress) -> Result<finelens_tune::bench::TextThroughput> {
    if s.steps == 0 || s.batch_size == 0 || !(2..=512).contains(&s.tokens) {
        return Err(settings(
            "bench: steps and batch size must be at least 1, tokens between 2 and 512",
        ));
    }
    progress(Event::Info(format!(
        "text fine-tuning throughput: all-MiniLM-L6-v2's shape, {} rayon threads",
        rayon_threads()
    )));
    let t = finelens_tune::bench::text_throughput(
        "all-MiniLM-L6-v2",
        finelens_models::bert::BertConfig::all_minilm_l6(),
        s.tokens,
        s.batch_size,
        s.steps,
    )?;
    progress(Event::Info(t.to_string()));
    Ok(t)
}

/// Token attribution speed (ms per sentence) for an all-MiniLM-L6-v2-shaped classifier.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct TextExplainBench {
    /// Timed repeats per figure (the median is printed), after one warm-up run.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 3))]
    pub repeats: usize,
    /// Tokens in the sentence ([CLS] and [SEP] included).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 64))]
    pub tokens: usize,
    /// Internal batch sizes to time IG-50 with.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_delimiter = ',', default_value = "10,50")
    )]
    pub ig_batches: Vec<usize>,
}

/// What [`text_explain`] measured.
#[derive(Debug, Clone, Serialize)]
pub struct TextExplainTimings {
    pub model: String,
    pub tokens: usize,
    pub repeats: usize,
    pub forward_ms: f64,
    pub saliency_ms: f64,
    pub gradient_x_input_ms: f64,
    /// Integrated gradients, Gauss–Legendre 50, `pad` baseline, per internal batch.
    pub integrated_gradients_50_by_batch: Vec<(usize, f64)>,
    pub peak_rss_bytes: Option<u64>,
}

impl std::fmt::Display for TextExplainTimings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "  {} · {} tokens", self.model, self.tokens)?;
        writeln!(
            f,
            "    forward                      {:>9.1} ms",
            self.forward_ms
        )?;
        writeln!(
            f,
            "    saliency                     {:>9.1} ms",
            self.saliency_ms
        )?;
        writeln!(
            f,
            "    gradient × input             {:>9.1} ms",
            self.gradient_x_input_ms
        )?;
        for (b, ms) in &self.integrated_gradients_50_by_batch {
            writeln!(f, "    IG-50, internal batch {b:<6} {ms:>9.1} ms")?;
        }
        write!(
            f,
            "    peak resident memory         {:>9}",
            finelens_models::memory::mib(self.peak_rss_bytes)
        )
    }
}

/// Token attributions on the word embeddings of a randomly initialised classifier of
/// all-MiniLM-L6-v2's shape (2 classes; speed does not depend on the weights) for one sentence of
/// random word tokens between [CLS] and [SEP]: the methods `finelens explain` runs on a text
/// model folder. Compare with `scripts/peer_text_explain_bench.py` (Captum), interleaved by
/// `scripts/peer_bench.py --only text-explain`.
pub fn text_explain(s: &TextExplainBench, progress: Progress) -> Result<TextExplainTimings> {
    use candle_core::{DType, Device};
    use finelens_attrib::{BaselineSpec, Method, MethodSpec, TokenBaseline};
    use finelens_models::bert::{Bert, BertConfig, BertSpec, TextHead};
    use finelens_models::{Classifier, Mode, ParamStore};

    if s.repeats == 0 || s.ig_batches.is_empty() || s.ig_batches.contains(&0) {
        return Err(settings(
            "bench: repeats and every IG internal batch must be at least 1",
        ));
    }
    let config = BertConfig::all_minilm_l6();
    if !(3..=config.max_position_embeddings).contains(&s.tokens) {
        return Err(settings(format!(
            "bench: tokens must be between 3 and {}",
            config.max_position_embeddings
        )));
    }
    progress(Event::Info(format!(
        "token attribution time, ms per sentence (median of {}), {} rayon threads",
        s.repeats,
        rayon_threads()
    )));
    finelens_models::memory::reset_peak_rss();
    let spec = BertSpec {
        config,
        classes: 2,
        head: TextHead::Cls,
    };
    let store = ParamStore::init(&spec.param_specs(), 0, &Device::Cpu)?;
    let bert = Bert::new(spec, &store.frozen_as(DType::F32)?)?;
    // [CLS] = 101, [SEP] = 102, [PAD] = 0 as in BERT's vocabulary; word tokens from a fixed
    // linear congruence over the word-piece range.
    let ids: Vec<u32> = std::iter::once(101)
        .chain((1..s.tokens - 1).map(|i| 1000 + (i as u32 * 7919) % 29000))
        .chain(std::iter::once(102))
        .collect();
    let word_ids: Vec<Option<u32>> = (0..s.tokens)
        .map(|i| (i > 0 && i + 1 < s.tokens).then_some(i as u32))
        .collect();
    let input = crate::text_explain::TextInput::new(&bert, &ids, &vec![0; s.tokens], &word_ids)?;
    let time = |spec: &MethodSpec| -> Result<f64> {
        let m = input.methods([spec], 0, None)?.remove(0);
        Ok(finelens_attrib::bench::median_ms(s.repeats, || {
            m.attribute(&input.model, &input.x, &[1])?;
            Ok(())
        })?)
    };
    let forward_ms = finelens_attrib::bench::median_ms(s.repeats, || {
        input.model.forward(&input.x, Mode::Eval)?;
        Ok(())
    })?;
    let saliency_ms = time(&MethodSpec::new(Method::Saliency))?;
    let gradient_x_input_ms = time(&MethodSpec::new(Method::GradientXInput))?;
    let mut by_batch = Vec::new();
    for &b in &s.ig_batches {
        let mut spec = MethodSpec::new(Method::IntegratedGradients);
        spec.options.steps = Some(50);
        spec.options.baseline = Some(BaselineSpec::Tokens(TokenBaseline::Pad));
        spec.options.internal_batch = Some(b);
        by_batch.push((b, time(&spec)?));
    }
    let t = TextExplainTimings {
        model: "all-MiniLM-L6-v2 (random weights)".into(),
        tokens: s.tokens,
        repeats: s.repeats,
        forward_ms,
        saliency_ms,
        gradient_x_input_ms,
        integrated_gradients_50_by_batch: by_batch,
        peak_rss_bytes: finelens_models::memory::peak_rss_bytes(),
    };
    progress(Event::Info(t.to_string()));
    Ok(t)
}
