//! A fine-tuning run as phases (an optional linear probe, then fine-tuning under a freeze policy)
//! over one parameter store, keeping the epoch with the lowest validation loss and, after every
//! epoch, a resumable state: weights, optimiser moments and history in one file, written
//! atomically. Image and text runs differ only in their model, data and freeze policies, which
//! the caller supplies as closures.

use std::path::Path;

use candle_core::{DType, Device, Tensor};
use finelens_models::ParamStore;

use crate::error::{Result, TuneError};
use crate::optim::{Optimizer, OptimizerState};
use crate::train::{EpochRecord, Progress, Start, TrainConfig};

/// Header key of the resumable state.
const RESUME_KEY: &str = "finelens-resume";

/// One phase: its name, which weights train, how many epochs.
pub struct Phase<P> {
    pub name: &'static str,
    pub policy: P,
    pub epochs: usize,
}

/// The phases of an LP-FT run (Kumar et al. 2022): `lp_epochs` of `probe` (when > 0), then the
/// rest of `epochs` under `freeze`.
pub fn lp_ft<P>(probe: P, freeze: P, lp_epochs: usize, epochs: usize) -> Result<Vec<Phase<P>>> {
    if lp_epochs >= epochs {
        return Err(TuneError::Config(format!(
            "--lp-epochs {lp_epochs} must be fewer than --epochs {epochs} (LP-FT fine-tunes after probing)"
        )));
    }
    let mut phases = Vec::new();
    if lp_epochs > 0 {
        phases.push(Phase {
            name: "linear probe",
            policy: probe,
            epochs: lp_epochs,
        });
    }
    phases.push(Phase {
        name: "fine-tune",
        policy: freeze,
        epochs: epochs - lp_epochs,
    });
    Ok(phases)
}

/// Where the resumable state lives, and what a run must agree on to continue from it.
pub struct ResumeState<'a> {
    pub path: &'a Path,
    /// The run's settings and data, serialised: a state written under others is refused.
    pub fingerprint: String,
    /// Continue from `path` if it exists.
    pub resume: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct ResumeHeader {
    fingerprint: String,
    history: Vec<EpochRecord>,
    best: Option<(f64, usize)>,
    optimizer_steps: u64,
}

/// What a run ends with.
pub struct PhasesOutcome {
    pub history: Vec<EpochRecord>,
    pub best_epoch: usize,
}

/// What a run reports as it goes.
pub enum PhaseEvent<'a, P> {
    /// A phase begins: its policy left `frozen` of `weights` parameter tensors frozen.
    Begin {
        phase: &'a Phase<P>,
        frozen: usize,
        weights: usize,
    },
    /// Every step and epoch (epochs numbered over the whole run).
    Progress(Progress<'a>),
}

/// Applies a policy to the store: (frozen, all) parameter tensors.
pub type Freeze<'h, P> = &'h dyn Fn(&P, &mut ParamStore) -> Result<(usize, usize)>;
/// Trains over the store for the config's epochs from a start, reporting progress.
pub type Fit<'h> =
    &'h mut dyn FnMut(&ParamStore, &TrainConfig, Start, &mut dyn FnMut(Progress)) -> Result<()>;
/// Writes the best model so far, given the history and the best epoch.
pub type SaveBest<'h> = &'h mut dyn FnMut(&ParamStore, &[EpochRecord], usize) -> Result<()>;

/// The caller's side of a run.
pub struct PhaseHooks<'h, P> {
    /// Apply a policy to the store: (frozen, weights) parameter tensors.
    pub freeze: Freeze<'h, P>,
    /// Train the model over the store for `cfg.epochs` epochs from `start`, reporting through
    /// the progress callback (`crate::fit` or `crate::fit_task` with the caller's model and data).
    pub fit: Fit<'h>,
    /// Write the best model so far, given the history up to its epoch (atomically).
    pub save_best: SaveBest<'h>,
    pub events: &'h mut dyn FnMut(PhaseEvent<P>),
}

/// Run `phases` over `store`; with `state.resume` and an existing state, continue where it ended
/// (bit-identical to an uninterrupted run: batches, augmentation and dropout are seeded by epoch
/// and step, and the optimiser's moments and step count are restored).
pub fn run_phases<P>(
    store: &mut ParamStore,
    cfg: &TrainConfig,
    phases: &[Phase<P>],
    state: &ResumeState,
    hooks: PhaseHooks<P>,
) -> Result<PhasesOutcome> {
    cfg.check()?;
    let PhaseHooks {
        freeze,
        fit,
        save_best,
        events,
    } = hooks;
    let (mut saved_optimizer, mut history, mut best) = if state.resume && state.path.exists() {
        let (opt, history, best) = restore(store, state)?;
        (Some(opt), history, best)
    } else {
        (None, Vec::new(), None)
    };
    let mut phase_start = 0;
    for phase in phases {
        let done_here = history.len().saturating_sub(phase_start).min(phase.epochs);
        phase_start += phase.epochs;
        if done_here == phase.epochs {
            continue;
        }
        let (frozen, weights) = freeze(&phase.policy, store)?;
        events(PhaseEvent::Begin {
            phase,
            frozen,
            weights,
        });
        let offset = phase_start - phase.epochs;
        let phase_cfg = TrainConfig {
            epochs: phase.epochs,
            ..cfg.clone()
        };
        // The optimiser's moments carry over only within the phase that saved them.
        let start = Start {
            epoch: done_here,
            optimizer: if done_here > 0 {
                saved_optimizer.take()
            } else {
                None
            },
        };
        let store: &ParamStore = store;
        let mut failed: Option<TuneError> = None;
        fit(store, &phase_cfg, start, &mut |p| match p {
            Progress::Epoch(r, opt) => {
                let mut r = r.clone();
                r.epoch += offset;
                history.push(r.clone());
                if failed.is_none() {
                    // Atomic writes: an interruption leaves the previous best intact.
                    if best.is_none_or(|(l, _)| r.val.loss < l) {
                        best = Some((r.val.loss, r.epoch));
                        failed = save_best(store, &history, r.epoch).err();
                    }
                    if failed.is_none() {
                        failed = save_state(state, store, opt, &history, best).err();
                    }
                }
                events(PhaseEvent::Progress(Progress::Epoch(&r, opt)));
            }
            step => events(PhaseEvent::Progress(step)),
        })?;
        if let Some(e) = failed {
            return Err(e);
        }
    }
    let (_, best_epoch) = best.expect("every phase has at least one epoch");
    Ok(PhasesOutcome {
        history,
        best_epoch,
    })
}

/// Everything needed to continue after the epoch just finished.
fn save_state(
    state: &ResumeState,
    store: &ParamStore,
    opt: &Optimizer,
    history: &[EpochRecord],
    best: Option<(f64, usize)>,
) -> Result<()> {
    let saved = opt.state();
    let mut tensors: Vec<(String, Tensor)> =
        store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect();
    for (i, (first, second)) in saved.moments.into_iter().enumerate() {
        // A marker per parameter, so that a parameter without moments yet still counts.
        tensors.push((
            format!("optimizer.{i}.present"),
            Tensor::zeros(1, DType::U8, &Device::Cpu)?,
        ));
        if let Some(m) = first {
            tensors.push((format!("optimizer.{i}.first"), m));
        }
        if let Some(m) = second {
            tensors.push((format!("optimizer.{i}.second"), m));
        }
    }
    let header = ResumeHeader {
        fingerprint: state.fingerprint.clone(),
        history: history.to_vec(),
        best,
        optimizer_steps: saved.steps,
    };
    let header = std::collections::HashMap::from([(
        RESUME_KEY.to_string(),
        serde_json::to_string(&header).expect("serialisable"),
    )]);
    Ok(finelens_models::checkpoint::save_state(
        state.path, tensors, header,
    )?)
}

/// Load the state into `store`: the optimiser's state, the history and the best epoch so far.
#[allow(clippy::type_complexity)]
fn restore(
    store: &mut ParamStore,
    state: &ResumeState,
) -> Result<(OptimizerState, Vec<EpochRecord>, Option<(f64, usize)>)> {
    let (tensors, header) = finelens_models::checkpoint::load_state(state.path)?;
    let bad =
        |why: &str| TuneError::Config(format!("{}: cannot resume: {why}", state.path.display()));
    let h: ResumeHeader = header
        .get(RESUME_KEY)
        .and_then(|j| serde_json::from_str(j).ok())
        .ok_or_else(|| bad("no resumable state in the file"))?;
    if h.fingerprint != state.fingerprint {
        return Err(bad(
            "it was written by a run with other settings or data; rerun with the same arguments",
        ));
    }
    for name in store.names().map(str::to_owned).collect::<Vec<_>>() {
        let t = tensors
            .get(&name)
            .ok_or_else(|| bad(&format!("tensor {name} is missing")))?;
        store
            .var(&name)?
            .set(&t.to_dtype(store.var(&name)?.dtype())?)?;
    }
    let mut moments = Vec::new();
    for i in 0.. {
        let get = |k: &str| tensors.get(&format!("optimizer.{i}.{k}")).cloned();
        if !tensors.contains_key(&format!("optimizer.{i}.present")) {
            break;
        }
        moments.push((get("first"), get("second")));
    }
    Ok((
        OptimizerState {
            steps: h.optimizer_steps,
            moments,
        },
        h.history,
        h.best,
    ))
}
