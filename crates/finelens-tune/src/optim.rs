//! Optimisers with PyTorch's update rules. candle-nn's `SGD` has no momentum, nesterov or weight
//! decay, so both are written here. Each parameter carries a learning-rate multiplier, which is
//! how a backbone trains at a fraction of the head's rate (discriminative fine-tuning).

use candle_core::backprop::GradStore;
use candle_core::{DType, Tensor, Var};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Result, TuneError};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum OptimizerConfig {
    /// `torch.optim.SGD`: g ← ∇ + λp; b ← μb + g (b₀ = g); step along b, or g + μb with nesterov.
    Sgd {
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    /// `torch.optim.AdamW` (Loshchilov & Hutter 2019): decoupled decay p ← p − ηλp, then Adam.
    Adamw {
        beta1: f64,
        beta2: f64,
        eps: f64,
        weight_decay: f64,
    },
}

impl OptimizerConfig {
    pub fn sgd(momentum: f64, nesterov: bool, weight_decay: f64) -> Self {
        OptimizerConfig::Sgd {
            momentum,
            nesterov,
            weight_decay,
        }
    }

    /// AdamW with PyTorch's defaults (β = 0.9, 0.999; ε = 1e-8).
    pub fn adamw(weight_decay: f64) -> Self {
        OptimizerConfig::Adamw {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay,
        }
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(TuneError::Config(m));
        match *self {
            OptimizerConfig::Sgd {
                momentum,
                nesterov,
                weight_decay,
            } => {
                if !(0.0..1.0).contains(&momentum) {
                    return bad(format!("momentum {momentum} must be in [0, 1)"));
                }
                if nesterov && momentum == 0.0 {
                    return bad("nesterov needs a momentum above 0".into());
                }
                if weight_decay < 0.0 {
                    return bad(format!("weight decay {weight_decay} must be ≥ 0"));
                }
            }
            OptimizerConfig::Adamw {
                beta1,
                beta2,
                eps,
                weight_decay,
            } => {
                if !(0.0..1.0).contains(&beta1) || !(0.0..1.0).contains(&beta2) {
                    return bad(format!("AdamW betas ({beta1}, {beta2}) must be in [0, 1)"));
                }
                if eps <= 0.0 || weight_decay < 0.0 {
                    return bad(format!(
                        "AdamW eps {eps} must be > 0 and weight decay {weight_decay} ≥ 0"
                    ));
                }
            }
        }
        Ok(())
    }
}

/// A snapshot of an optimiser's state (see [`Optimizer::state`]).
#[derive(Debug, Clone)]
pub struct OptimizerState {
    pub steps: u64,
    pub moments: Vec<(Option<Tensor>, Option<Tensor>)>,
}

struct Slot {
    var: Var,
    lr_mult: f64,
    /// Whether weight decay applies (not to biases and LayerNorm weights in transformer recipes).
    decay: bool,
    /// The momentum buffer or Adam's first moment, and Adam's second, in the parameter's float
    /// type: plain memory, which each step rewrites in place.
    first: Option<Buffer>,
    second: Option<Buffer>,
}

/// A moment buffer's values: plain CPU storage of the parameter's float type.
type Buffer = candle_core::CpuStorage;

/// The buffer as a tensor of `like`'s shape (a copy: the buffer goes on changing).
fn buffer_tensor(b: &Buffer, like: &Tensor) -> candle_core::Result<Tensor> {
    match b {
        Buffer::F32(v) => Tensor::from_slice(v, like.shape(), like.device()),
        Buffer::F64(v) => Tensor::from_slice(v, like.shape(), like.device()),
        _ => candle_core::bail!("optimiser: moment buffers are f32 or f64"),
    }
}

/// A tensor's values in `dtype` (the parameter's) as a buffer.
fn buffer_of(t: &Tensor, dtype: DType) -> Result<Buffer> {
    let t = t.to_dtype(dtype)?.flatten_all()?;
    Ok(match dtype {
        DType::F32 => Buffer::F32(t.to_vec1()?),
        DType::F64 => Buffer::F64(t.to_vec1()?),
        other => {
            return Err(TuneError::Config(format!(
                "optimiser: parameters must be f32 or f64, not {other:?}"
            )))
        }
    })
}

/// The float types a parameter can have, with their values in CPU storage (a parameter's or a
/// moment buffer's).
trait Element: num_traits::Float + candle_core::WithDType + Send + Sync {
    fn values(s: &mut Buffer) -> Option<&mut Vec<Self>>;
}

impl Element for f32 {
    fn values(s: &mut Buffer) -> Option<&mut Vec<Self>> {
        match s {
            Buffer::F32(v) => Some(v),
            _ => None,
        }
    }
}

impl Element for f64 {
    fn values(s: &mut Buffer) -> Option<&mut Vec<Self>> {
        match s {
            Buffer::F64(v) => Some(v),
            _ => None,
        }
    }
}

pub struct Optimizer {
    config: OptimizerConfig,
    slots: Vec<Slot>,
    steps: u64,
}

impl Optimizer {
    /// `params`: (variable, learning-rate multiplier); weight decay applies to all.
    pub fn new(config: OptimizerConfig, params: Vec<(Var, f64)>) -> Result<Self> {
        Self::with_decay(
            config,
            params.into_iter().map(|(v, m)| (v, m, true)).collect(),
        )
    }

    /// `params`: (variable, learning-rate multiplier, whether weight decay applies to it).
    pub fn with_decay(config: OptimizerConfig, params: Vec<(Var, f64, bool)>) -> Result<Self> {
        config.check()?;
        let slots = params
            .into_iter()
            .map(|(var, lr_mult, decay)| Slot {
                var,
                lr_mult,
                decay,
                first: None,
                second: None,
            })
            .collect();
        Ok(Self {
            config,
            slots,
            steps: 0,
        })
    }

    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The moments (momentum buffer, or Adam's first and second moments) per parameter, in the
    /// order the parameters were given, and the step count: what a resumed run needs.
    pub fn state(&self) -> OptimizerState {
        let tensor = |b: &Option<Buffer>, like: &Tensor| {
            b.as_ref().map(|b| {
                buffer_tensor(b, like).expect("a buffer has its parameter's length and type")
            })
        };
        OptimizerState {
            steps: self.steps,
            moments: self
                .slots
                .iter()
                .map(|s| {
                    let like = s.var.as_tensor();
                    (tensor(&s.first, like), tensor(&s.second, like))
                })
                .collect(),
        }
    }

    /// Continue from a saved [`OptimizerState`] of an optimiser over the same parameters.
    pub fn restore(&mut self, state: OptimizerState) -> Result<()> {
        if state.moments.len() != self.slots.len() {
            return Err(TuneError::Config(format!(
                "saved optimiser state has {} parameters, this run trains {}",
                state.moments.len(),
                self.slots.len()
            )));
        }
        for (slot, (first, second)) in self.slots.iter_mut().zip(state.moments) {
            for m in [&first, &second].into_iter().flatten() {
                if m.dims() != slot.var.dims() {
                    return Err(TuneError::Config(format!(
                        "saved optimiser state has shape {:?} for a parameter of shape {:?}",
                        m.dims(),
                        slot.var.dims()
                    )));
                }
            }
            let dtype = slot.var.dtype();
            slot.first = first.map(|m| buffer_of(&m, dtype)).transpose()?;
            slot.second = second.map(|m| buffer_of(&m, dtype)).transpose()?;
        }
        self.steps = state.steps;
        Ok(())
    }

    /// One update at learning rate `lr`. Parameters without a gradient are left untouched.
    pub fn step(&mut self, grads: &GradStore, lr: f64) -> Result<()> {
        self.steps += 1;
        let t = self.steps as i32;
        for s in self.slots.iter_mut() {
            let Some(g) = grads.get(s.var.as_tensor()) else {
                continue;
            };
            // candle's backward detaches every gradient except a leaf variable's, whose gradient
            // still carries the op that made it — and through it the whole step's forward graph.
            // Kept in a momentum buffer, each step's graph would stay alive (≈ 65 MB a step for
            // resnet-mini at batch 32, until the process is killed). The update below reads the
            // gradient's values only, into the parameter and buffers of its own.
            let g = g.detach().contiguous()?;
            let lr = lr * s.lr_mult;
            let rule = match self.config {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => Rule::Sgd {
                    lr,
                    momentum,
                    nesterov,
                    weight_decay: if s.decay { weight_decay } else { 0.0 },
                },
                OptimizerConfig::Adamw {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => Rule::Adamw {
                    lr,
                    beta1,
                    beta2,
                    eps,
                    shrink: if s.decay {
                        1.0 - lr * weight_decay
                    } else {
                        1.0
                    },
                    correction1: 1.0 - beta1.powi(t),
                    correction2: 1.0 - beta2.powi(t),
                },
            };
            match s.var.dtype() {
                DType::F32 => update::<f32>(rule, s, &g)?,
                DType::F64 => update::<f64>(rule, s, &g)?,
                other => {
                    return Err(TuneError::Config(format!(
                        "optimiser: parameters must be f32 or f64, not {other:?}"
                    )))
                }
            }
        }
        Ok(())
    }
}

/// One parameter's update rule at this step, its scalars resolved.
#[derive(Clone, Copy)]
enum Rule {
    Sgd {
        lr: f64,
        momentum: f64,
        nesterov: bool,
        weight_decay: f64,
    },
    Adamw {
        lr: f64,
        beta1: f64,
        beta2: f64,
        eps: f64,
        /// 1 − ηλ, the decoupled decay's factor (1 without decay).
        shrink: f64,
        /// 1 − βᵗ, Adam's bias corrections.
        correction1: f64,
        correction2: f64,
    },
}

/// Values per rayon task of an update.
const CHUNK: usize = 1 << 14;

/// One parameter's step in place, in a single parallel pass over its values: the parameter's
/// storage and its moment buffers are rewritten where they are. Composed of candle's element-wise
/// ops, AdamW was a dozen passes and as many allocations a tensor; one pass into new tensors,
/// then `Var::set`'s copy, still allocated and zero-filled three tensors the size of the model
/// and swept it twice more (resnet18's AdamW step 12–13 ms).
fn update<T: Element>(rule: Rule, s: &mut Slot, g: &Tensor) -> Result<()> {
    let n = s.var.elem_count();
    if g.elem_count() != n || g.dtype() != s.var.dtype() {
        return Err(TuneError::Config(format!(
            "optimiser: a gradient of shape {:?} ({:?}) for a parameter of shape {:?} ({:?})",
            g.dims(),
            g.dtype(),
            s.var.dims(),
            s.var.dtype()
        )));
    }
    // A moment not yet kept is zero: b₁ = μ·0 + g₁ = g₁, m₁ = β₁·0 + (1 − β₁)g₁, as torch.
    let needs = match rule {
        Rule::Sgd { momentum, .. } => [momentum > 0.0, false],
        Rule::Adamw { .. } => [true, true],
    };
    for (slot, need) in [&mut s.first, &mut s.second].into_iter().zip(needs) {
        if need && slot.is_none() {
            *slot = Some(T::to_cpu_storage_owned(vec![T::zero(); n]));
        }
    }
    // Checked before any buffer is taken out, so that an error leaves the state as it was.
    let fits = |b: &mut Option<Buffer>| {
        b.as_mut()
            .is_none_or(|b| T::values(b).is_some_and(|v| v.len() == n))
    };
    if !fits(&mut s.first) || !fits(&mut s.second) {
        return Err(TuneError::Config(
            "optimiser: a moment buffer does not fit its parameter".into(),
        ));
    }
    let take = |b: &mut Option<Buffer>| -> Vec<T> {
        b.as_mut()
            .and_then(T::values)
            .map(std::mem::take)
            .unwrap_or_default()
    };
    let step = Step {
        rule,
        moments: std::cell::RefCell::new((take(&mut s.first), take(&mut s.second))),
    };
    let result = s.var.as_tensor().inplace_op2(g, &step);
    // The buffers go back whatever happened, so that a failed step loses no state.
    let (first, second) = step.moments.into_inner();
    for (slot, v) in [(&mut s.first, first), (&mut s.second, second)] {
        if let Some(b) = slot.as_mut().and_then(T::values) {
            *b = v;
        }
    }
    Ok(result?)
}

/// The update as an in-place op on the parameter's storage, reading the gradient's, with the
/// moment buffers it rewrites.
struct Step<T> {
    rule: Rule,
    moments: std::cell::RefCell<(Vec<T>, Vec<T>)>,
}

impl<T: Element> candle_core::InplaceOp2 for Step<T> {
    fn name(&self) -> &'static str {
        "finelens-optimiser-step"
    }

    fn cpu_fwd(
        &self,
        p: &mut candle_core::CpuStorage,
        lp: &candle_core::Layout,
        g: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        let name = self.name();
        let g = finelens_models::kernel::contiguous(T::cpu_storage_as_slice(g)?, lg, name)?;
        let Some((start, end)) = lp.contiguous_offsets() else {
            candle_core::bail!("{name}: the parameter is not contiguous");
        };
        let Some(p) = T::values(p) else {
            candle_core::bail!("{name}: the parameter's storage is not {:?}", T::DTYPE);
        };
        let p = &mut p[start..end];
        let mut moments = self.moments.borrow_mut();
        let (first, second) = &mut *moments;
        apply(self.rule, p, g, first, second);
        Ok(())
    }
}

/// The rule over one parameter's values, `first` and `second` empty where the rule keeps none.
fn apply<T: Element>(rule: Rule, p: &mut [T], g: &[T], first: &mut [T], second: &mut [T]) {
    let c = |v: f64| T::from(v).expect("a float converts to f32 and f64");
    match rule {
        Rule::Sgd {
            lr,
            momentum,
            nesterov,
            weight_decay,
        } => {
            // torch.optim.SGD: g ← ∇ + λp; b ← μb + g (b₀ = g); step along b, or g + μb.
            let (lr, mu, wd) = (c(lr), c(momentum), c(weight_decay));
            if momentum == 0.0 {
                p.par_chunks_mut(CHUNK)
                    .zip(g.par_chunks(CHUNK))
                    .for_each(|(p, g)| {
                        for (p, &g) in p.iter_mut().zip(g) {
                            *p = *p - lr * (g + wd * *p);
                        }
                    });
                return;
            }
            p.par_chunks_mut(CHUNK)
                .zip(first.par_chunks_mut(CHUNK))
                .zip(g.par_chunks(CHUNK))
                .for_each(|((p, b), g)| {
                    for ((p, b), &g) in p.iter_mut().zip(b).zip(g) {
                        let gi = g + wd * *p;
                        *b = mu * *b + gi;
                        let d = if nesterov { gi + mu * *b } else { *b };
                        *p -= lr * d;
                    }
                });
        }
        Rule::Adamw {
            lr,
            beta1,
            beta2,
            eps,
            shrink,
            correction1,
            correction2,
        } => {
            // torch.optim.AdamW: p ← (1 − ηλ)p; m ← β₁m + (1 − β₁)g; v ← β₂v + (1 − β₂)g²;
            // p ← p − η m̂ / (√v̂ + ε), m̂ = m / (1 − β₁ᵗ), v̂ = v / (1 − β₂ᵗ).
            let (lr, b1, b2, eps) = (c(lr), c(beta1), c(beta2), c(eps));
            let (shrink, c1, c2) = (c(shrink), c(correction1), c(correction2));
            let one = T::one();
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(
                    first
                        .par_chunks_mut(CHUNK)
                        .zip(second.par_chunks_mut(CHUNK)),
                )
                .for_each(|((p, g), (m, sq))| {
                    for (((p, &g), m), sq) in p.iter_mut().zip(g).zip(m).zip(sq) {
                        *m = b1 * *m + (one - b1) * g;
                        *sq = b2 * *sq + (one - b2) * g * g;
                        let step = (*m / c1) / ((*sq / c2).sqrt() + eps);
                        *p = shrink * *p - lr * step;
                    }
                });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn run(config: OptimizerConfig, steps: usize) -> Vec<f64> {
        // Minimise f(p) = ½‖p‖² (∇ = p) from p = (1, −2), lr 0.1.
        let p = Var::new(&[1f64, -2.0], &Device::Cpu).unwrap();
        let mut opt = Optimizer::new(config, vec![(p.clone(), 1.0)]).unwrap();
        for _ in 0..steps {
            let loss = (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
            opt.step(&loss.backward().unwrap(), 0.1).unwrap();
        }
        p.to_vec1().unwrap()
    }

    #[test]
    fn sgd_momentum_and_nesterov_match_hand_computed_updates() {
        // Plain SGD: p ← 0.9p each step.
        let v = run(OptimizerConfig::sgd(0.0, false, 0.0), 3);
        assert!((v[0] - 0.9f64.powi(3)).abs() < 1e-12);
        // Momentum 0.5, p₀ = 1: b₁ = 1, p₁ = 0.9; b₂ = 0.5 + 0.9 = 1.4, p₂ = 0.76.
        let v = run(OptimizerConfig::sgd(0.5, false, 0.0), 2);
        assert!((v[0] - 0.76).abs() < 1e-12, "{v:?}");
        // Nesterov: d₁ = g + μb₁ = 1.5, p₁ = 0.85; g₂ = 0.85, b₂ = 0.5 + 0.85 = 1.35,
        // d₂ = 0.85 + 0.675 = 1.525, p₂ = 0.85 − 0.1525 = 0.6975.
        let v = run(OptimizerConfig::sgd(0.5, true, 0.0), 2);
        assert!((v[0] - 0.6975).abs() < 1e-12, "{v:?}");
        // Weight decay 1 doubles the gradient: p ← 0.8p.
        let v = run(OptimizerConfig::sgd(0.0, false, 1.0), 1);
        assert!((v[0] - 0.8).abs() < 1e-12);
    }

    #[test]
    fn adamw_first_step_is_lr_times_sign_and_decay_is_decoupled() {
        // Adam's bias-corrected first step moves each coordinate by lr·g/(|g| + ε) ≈ lr.
        let v = run(OptimizerConfig::adamw(0.0), 1);
        assert!(
            (v[0] - 0.9).abs() < 1e-6 && (v[1] + 1.9).abs() < 1e-6,
            "{v:?}"
        );
        // Decoupled decay 0.5 first scales p by (1 − 0.1·0.5) = 0.95, then the same Adam step.
        let v = run(OptimizerConfig::adamw(0.5), 1);
        assert!((v[0] - 0.85).abs() < 1e-6, "{v:?}");
    }

    #[test]
    fn optimiser_state_holds_no_graph() {
        // A gradient computed through a tracked intermediate (x·w with x a variable).
        let dev = &Device::Cpu;
        for config in [
            OptimizerConfig::sgd(0.9, false, 0.1),
            OptimizerConfig::adamw(0.1),
        ] {
            let w = Var::new(&[1f32, 2.0], dev).unwrap();
            let x = Var::new(&[3f32, 4.0], dev).unwrap();
            let mut opt = Optimizer::new(config, vec![(w.clone(), 1.0)]).unwrap();
            let loss = (x.as_tensor() * w.as_tensor())
                .unwrap()
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap();
            let grads = loss.backward().unwrap();
            assert!(
                grads.get(w.as_tensor()).unwrap().track_op(),
                "candle now detaches leaf gradients: drop the workaround"
            );
            opt.step(&grads, 0.1).unwrap();
            for (first, second) in opt.state().moments {
                for state in [first, second].into_iter().flatten() {
                    assert!(
                        !state.track_op(),
                        "{config:?}: optimiser state keeps a graph alive"
                    );
                }
            }
            for s in &opt.slots {
                assert!(!s.var.as_detached_tensor().track_op());
            }
        }
    }

    /// The moments change in place each step, so a snapshot must be a copy: a later step leaves
    /// it alone, and an optimiser restored from it (over parameters with the snapshot's values)
    /// takes the same next step as the one that went on.
    #[test]
    fn a_snapshot_is_a_copy_and_restores_the_same_next_step() {
        let dev = &Device::Cpu;
        let loss = |p: &Var| (p.as_tensor().sqr().unwrap().sum_all().unwrap() * 0.5).unwrap();
        for config in [
            OptimizerConfig::sgd(0.9, true, 0.01),
            OptimizerConfig::adamw(0.01),
        ] {
            let p = Var::new(&[1f32, -2.0, 0.5], dev).unwrap();
            let mut opt = Optimizer::new(config, vec![(p.clone(), 1.0)]).unwrap();
            for _ in 0..2 {
                opt.step(&loss(&p).backward().unwrap(), 0.1).unwrap();
            }
            let snapshot = opt.state();
            let values = |st: &OptimizerState| -> Vec<Vec<f32>> {
                st.moments
                    .iter()
                    .flat_map(|(a, b)| [a, b])
                    .flatten()
                    .map(|t| t.to_vec1().unwrap())
                    .collect()
            };
            let before = values(&snapshot);
            let q = Var::new(p.to_vec1::<f32>().unwrap().as_slice(), dev).unwrap();
            opt.step(&loss(&p).backward().unwrap(), 0.1).unwrap();
            assert_eq!(
                values(&snapshot),
                before,
                "{config:?}: a step changed a snapshot"
            );
            let mut resumed = Optimizer::new(config, vec![(q.clone(), 1.0)]).unwrap();
            resumed.restore(snapshot).unwrap();
            resumed.step(&loss(&q).backward().unwrap(), 0.1).unwrap();
            assert_eq!(
                q.to_vec1::<f32>().unwrap(),
                p.to_vec1::<f32>().unwrap(),
                "{config:?}"
            );
        }
    }

    #[test]
    fn bad_settings_are_rejected() {
        assert!(OptimizerConfig::sgd(1.0, false, 0.0).check().is_err());
        assert!(OptimizerConfig::sgd(0.0, true, 0.0).check().is_err());
        assert!(OptimizerConfig::sgd(0.9, false, -1.0).check().is_err());
    }

    /// One step of torch's rule for `config` written out element by element in f64: parameter
    /// `p` with gradient `g`, moments `m1`, `m2` (zero before the first step), step `t`.
    #[allow(clippy::too_many_arguments)]
    fn torch_step(
        config: OptimizerConfig,
        t: i32,
        lr: f64,
        decay: bool,
        p: &mut [f64],
        g: &[f64],
        m1: &mut [f64],
        m2: &mut [f64],
    ) {
        for i in 0..p.len() {
            match config {
                OptimizerConfig::Sgd {
                    momentum,
                    nesterov,
                    weight_decay,
                } => {
                    let gi = g[i] + if decay { weight_decay } else { 0.0 } * p[i];
                    let d = if momentum > 0.0 {
                        m1[i] = if t == 1 { gi } else { momentum * m1[i] + gi };
                        if nesterov {
                            gi + momentum * m1[i]
                        } else {
                            m1[i]
                        }
                    } else {
                        gi
                    };
                    p[i] -= lr * d;
                }
                OptimizerConfig::Adamw {
                    beta1,
                    beta2,
                    eps,
                    weight_decay,
                } => {
                    if decay {
                        p[i] *= 1.0 - lr * weight_decay;
                    }
                    m1[i] = beta1 * m1[i] + (1.0 - beta1) * g[i];
                    m2[i] = beta2 * m2[i] + (1.0 - beta2) * g[i] * g[i];
                    let m_hat = m1[i] / (1.0 - beta1.powi(t));
                    let v_hat = m2[i] / (1.0 - beta2.powi(t));
                    p[i] -= lr * m_hat / (v_hat.sqrt() + eps);
                }
            }
        }
    }

    /// Several steps on parameters longer than a task's chunk, with and without weight decay and
    /// at two learning-rate multipliers, the gradient changing every step (g = p ⊙ a + b, a and b
    /// fixed), against torch's update rules written out element by element in f64.
    #[test]
    fn updates_match_the_rules_element_by_element() {
        use rand::{Rng, SeedableRng};
        let n = 3 * CHUNK + 17;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        let mut draw = || -> Vec<f64> { (0..n).map(|_| rng.random_range(-1.0..1.0)).collect() };
        let (p0, a, b) = (draw(), draw(), draw());
        let grad = |p: &[f64]| -> Vec<f64> { (0..n).map(|i| p[i] * a[i] + b[i]).collect() };
        let configs = [
            OptimizerConfig::sgd(0.0, false, 0.1),
            OptimizerConfig::sgd(0.9, false, 0.0),
            OptimizerConfig::sgd(0.8, true, 0.05),
            OptimizerConfig::adamw(0.0),
            OptimizerConfig::adamw(0.3),
        ];
        // (multiplier of p₀, lr multiplier, decay) per parameter.
        let setups = [(1.0, 1.0, true), (-0.5, 0.25, false)];
        let (dev, lr) = (candle_core::Device::Cpu, 0.05);
        for config in configs {
            for dtype in [DType::F64, DType::F32] {
                let tensor = |v: Vec<f64>| {
                    Tensor::from_vec(v, n, &dev)
                        .unwrap()
                        .to_dtype(dtype)
                        .unwrap()
                };
                let (a_t, b_t) = (tensor(a.clone()), tensor(b.clone()));
                let params: Vec<(Var, f64, bool)> = setups
                    .iter()
                    .map(|&(m, mult, decay)| {
                        let p = tensor(p0.iter().map(|v| v * m).collect());
                        (Var::from_tensor(&p).unwrap(), mult, decay)
                    })
                    .collect();
                let mut opt = Optimizer::with_decay(config, params.clone()).unwrap();
                let mut want: Vec<Vec<f64>> = setups
                    .iter()
                    .map(|&(m, _, _)| p0.iter().map(|v| v * m).collect())
                    .collect();
                let mut moments = vec![(vec![0.0; n], vec![0.0; n]); setups.len()];
                for t in 1..=4 {
                    // The loss Σ ½a p² + b p has gradient p ⊙ a + b.
                    let loss = params
                        .iter()
                        .map(|(v, _, _)| {
                            let p = v.as_tensor();
                            ((p.sqr().unwrap() * &a_t).unwrap() * 0.5).unwrap()
                                + (p * &b_t).unwrap()
                        })
                        .map(|l| l.unwrap().sum_all().unwrap())
                        .reduce(|x, y| (x + y).unwrap())
                        .unwrap();
                    opt.step(&loss.backward().unwrap(), lr).unwrap();
                    for ((p, (m1, m2)), &(_, mult, decay)) in
                        want.iter_mut().zip(&mut moments).zip(&setups)
                    {
                        let g = grad(p);
                        torch_step(config, t, lr * mult, decay, p, &g, m1, m2);
                    }
                }
                let tol = if dtype == DType::F64 { 1e-12 } else { 1e-5 };
                for (k, (v, _, _)) in params.iter().enumerate() {
                    let got: Vec<f64> = v
                        .as_tensor()
                        .to_dtype(DType::F64)
                        .unwrap()
                        .to_vec1()
                        .unwrap();
                    let err = got
                        .iter()
                        .zip(&want[k])
                        .map(|(x, y)| (x - y).abs())
                        .fold(0.0, f64::max);
                    assert!(
                        err < tol,
                        "{config:?} {dtype:?} parameter {k}: off by {err}"
                    );
                }
            }
        }
    }
}
