//! Backward rules for a model's piecewise-linear nonlinearities (ReLU, max-pool): the gradient,
//! or one of the modified rules attribution methods define on them, chosen per thread while the
//! model runs forward — the ops keep the rule for their backward, so the model is not forked.
//!
//! * guided backpropagation (Springenberg et al. 2015): ReLU passes a gradient only where both
//!   its input and the gradient are positive;
//! * deconvolution (Zeiler & Fergus 2014, as Springenberg et al. state it): ReLU passes the
//!   positive part of the gradient, whatever its input;
//! * DeepLIFT's rescale rule (Shrikumar et al. 2017), with Captum's layout: the batch is the
//!   inputs followed by as many references, and each nonlinearity multiplies the gradient by
//!   Δy/Δx between an input and its reference (the gradient where |Δx| < [`DEEPLIFT_EPS`]);
//!   max-pool sends each window's Δy to the input's (or reference's) maximum and divides by its
//!   Δx. Every other op of a ResNet (convolution, eval-mode batch norm, residual add, average
//!   pool, linear) is linear, so the input's multipliers times Δx sum to F(x) − F(x′) exactly.

use std::cell::Cell;

/// How ReLU and max-pool send gradients back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BackwardRule {
    #[default]
    Gradient,
    GuidedBackprop,
    Deconvolution,
    /// DeepLIFT's rescale rule; the batch is N inputs followed by their N references.
    DeepLiftRescale,
}

/// Below this |Δx| DeepLIFT falls back to the gradient (Captum's default eps).
pub const DEEPLIFT_EPS: f64 = 1e-10;

thread_local! {
    static RULE: Cell<BackwardRule> = const { Cell::new(BackwardRule::Gradient) };
}

/// The rule ops built on this thread now take.
pub fn backward_rule() -> BackwardRule {
    RULE.with(Cell::get)
}

/// Run `f` (a forward pass) with `rule` for every ReLU and max-pool it builds; the rule before
/// is restored afterwards, also when `f` fails or panics.
pub fn with_backward_rule<R>(rule: BackwardRule, f: impl FnOnce() -> R) -> R {
    struct Restore(BackwardRule);
    impl Drop for Restore {
        fn drop(&mut self) {
            RULE.with(|r| r.set(self.0));
        }
    }
    let _restore = Restore(RULE.with(|r| r.replace(rule)));
    f()
}
