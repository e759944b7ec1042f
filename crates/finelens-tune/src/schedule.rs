//! Learning-rate schedules, evaluated per optimiser step.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case", tag = "kind")]
pub enum Schedule {
    Constant,
    /// Linear warm-up from 0 over `warmup_steps`, then half-cosine decay to 0 at `total_steps`
    /// (Loshchilov & Hutter 2017, without restarts).
    WarmupCosine {
        warmup_steps: usize,
        total_steps: usize,
    },
    /// Linear warm-up from 0 over `warmup_steps`, then linear decay to 0 at `total_steps`
    /// (transformers' `get_linear_schedule_with_warmup`, BERT's recipe).
    WarmupLinear {
        warmup_steps: usize,
        total_steps: usize,
    },
}

impl Schedule {
    /// The learning rate at 0-based `step` for a peak rate `base`.
    pub fn lr(&self, base: f64, step: usize) -> f64 {
        match *self {
            Schedule::Constant => base,
            Schedule::WarmupCosine {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    base * (step + 1) as f64 / warmup_steps as f64
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                    let t = ((step - warmup_steps) as f64 / span).min(1.0);
                    base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
                }
            }
            Schedule::WarmupLinear {
                warmup_steps,
                total_steps,
            } => {
                if step < warmup_steps {
                    base * (step + 1) as f64 / warmup_steps as f64
                } else {
                    let span = total_steps.saturating_sub(warmup_steps).max(1) as f64;
                    base * (1.0 - ((step - warmup_steps) as f64 / span).min(1.0))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = Schedule::WarmupCosine {
            warmup_steps: 4,
            total_steps: 14,
        };
        assert!((s.lr(1.0, 0) - 0.25).abs() < 1e-12);
        assert!((s.lr(1.0, 3) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 4) - 1.0).abs() < 1e-12);
        assert!((s.lr(1.0, 9) - 0.5).abs() < 1e-12);
        assert!(s.lr(1.0, 14).abs() < 1e-12);
        assert_eq!(Schedule::Constant.lr(0.3, 100), 0.3);
        let l = Schedule::WarmupLinear {
            warmup_steps: 2,
            total_steps: 12,
        };
        assert!((l.lr(1.0, 0) - 0.5).abs() < 1e-12);
        assert!((l.lr(1.0, 2) - 1.0).abs() < 1e-12);
        assert!((l.lr(1.0, 7) - 0.5).abs() < 1e-12);
        assert!(l.lr(1.0, 12).abs() < 1e-12);
    }
}
