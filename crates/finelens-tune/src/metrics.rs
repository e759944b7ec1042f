//! Classification loss and evaluation metrics.

use candle_core::{DType, Device, Tensor};
use finelens_data::{Loader, Sample};
use finelens_models::{Classifier, Mode};
use serde::{Deserialize, Serialize};

use crate::error::Result;

/// Mean cross-entropy of `logits` (N × K) against `labels` (N, u32): −mean log softmax[label].
/// The log-sum-exp is shifted by the detached row maximum for stability; the gradient is
/// (softmax − one-hot)/N.
pub fn cross_entropy(logits: &Tensor, labels: &Tensor) -> Result<Tensor> {
    let max = logits.max_keepdim(1)?.detach();
    let shifted = logits.broadcast_sub(&max)?;
    let lse = shifted.exp()?.sum_keepdim(1)?.log()?;
    let log_p = shifted.broadcast_sub(&lse)?;
    let picked = log_p.gather(&labels.to_dtype(DType::U32)?.unsqueeze(1)?, 1)?;
    Ok(picked.mean_all()?.neg()?)
}

/// Per-class precision, recall and F1.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    pub class: String,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub precision: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub recall: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub f1: f64,
    pub support: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub loss: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub accuracy: f64,
    pub count: usize,
    /// `confusion[true][predicted]`.
    pub confusion: Vec<Vec<usize>>,
    pub per_class: Vec<ClassMetrics>,
}

impl Metrics {
    /// Metrics from a confusion matrix and the summed loss.
    pub fn from_confusion(
        confusion: Vec<Vec<usize>>,
        loss_sum: f64,
        class_names: &[String],
    ) -> Self {
        let k = confusion.len();
        let count: usize = confusion.iter().flatten().sum();
        let correct: usize = (0..k).map(|i| confusion[i][i]).sum();
        let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
        let per_class = (0..k)
            .map(|c| {
                let tp = confusion[c][c];
                let predicted: usize = (0..k).map(|t| confusion[t][c]).sum();
                let support: usize = confusion[c].iter().sum();
                let (p, r) = (ratio(tp, predicted), ratio(tp, support));
                ClassMetrics {
                    class: class_names.get(c).cloned().unwrap_or_else(|| c.to_string()),
                    precision: p,
                    recall: r,
                    f1: if p + r > 0.0 {
                        2.0 * p * r / (p + r)
                    } else {
                        0.0
                    },
                    support,
                }
            })
            .collect();
        Self {
            loss: if count == 0 {
                f64::NAN
            } else {
                loss_sum / count as f64
            },
            accuracy: ratio(correct, count),
            count,
            confusion,
            per_class,
        }
    }
}

/// Evaluate `model` (eval mode) on `samples`, streaming batches through `loader`.
pub fn evaluate(
    model: &dyn Classifier,
    samples: &[Sample],
    loader: &Loader,
    class_names: &[String],
    device: &Device,
) -> Result<Metrics> {
    let k = model.num_classes();
    let mut confusion = vec![vec![0usize; k]; k];
    let mut loss_sum = 0f64;
    for batch in loader.epoch(samples, 0, device)? {
        let batch = batch?;
        let logits = model.forward(&batch.images, Mode::Eval)?.detach();
        let n = batch.samples.len();
        loss_sum += cross_entropy(&logits, &batch.labels)?.to_scalar::<f32>()? as f64 * n as f64;
        let pred: Vec<u32> = logits.argmax(1)?.to_vec1()?;
        let truth: Vec<u32> = batch.labels.to_vec1()?;
        for (t, p) in truth.iter().zip(pred) {
            if (*t as usize) < k {
                confusion[*t as usize][p as usize] += 1;
            }
        }
    }
    Ok(Metrics::from_confusion(confusion, loss_sum, class_names))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    #[test]
    fn cross_entropy_value_and_gradient_match_closed_forms() {
        let dev = Device::Cpu;
        let logits = Var::new(&[[1.0f32, 2.0, 3.0], [0.5, -1.0, 0.0]], &dev).unwrap();
        let labels = Tensor::new(&[2u32, 0], &dev).unwrap();
        let loss = cross_entropy(logits.as_tensor(), &labels).unwrap();
        let row = |z: [f32; 3], y: usize| {
            let lse = z.iter().map(|v| v.exp()).sum::<f32>().ln();
            (lse - z[y], z.map(|v| (v - lse).exp()))
        };
        let (l0, p0) = row([1.0, 2.0, 3.0], 2);
        let (l1, p1) = row([0.5, -1.0, 0.0], 0);
        assert!((loss.to_scalar::<f32>().unwrap() - (l0 + l1) / 2.0).abs() < 1e-6);
        let g: Vec<Vec<f32>> = loss
            .backward()
            .unwrap()
            .get(logits.as_tensor())
            .unwrap()
            .to_vec2()
            .unwrap();
        for c in 0..3 {
            assert!((g[0][c] - (p0[c] - (c == 2) as u8 as f32) / 2.0).abs() < 1e-6);
            assert!((g[1][c] - (p1[c] - (c == 0) as u8 as f32) / 2.0).abs() < 1e-6);
        }
    }

    #[test]
    fn metrics_from_confusion() {
        let names = vec!["a".to_string(), "b".to_string()];
        // 3 a's: 2 right, 1 called b; 1 b: right.
        let m = Metrics::from_confusion(vec![vec![2, 1], vec![0, 1]], 4.0, &names);
        assert_eq!(m.accuracy, 0.75);
        assert_eq!(m.loss, 1.0);
        assert_eq!(m.per_class[0].precision, 1.0);
        assert!((m.per_class[0].recall - 2.0 / 3.0).abs() < 1e-12);
        assert_eq!(m.per_class[1].precision, 0.5);
        assert!((m.per_class[1].f1 - 2.0 / 3.0).abs() < 1e-12);
    }
}
