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
//! * layer-wise relevance propagation (Montavon, Binder, Lapuschkin, Samek & Müller 2019) as a
//!   modified gradient: with R = z ⊙ g at a layer's output z (bias included), a convolution or
//!   dense layer sends back g_x = W′ᵀ(g ⊙ z / (z′ + ε·sign z′)), so that x ⊙ g_x is the rule's
//!   relevance Σⱼ xᵢw′ᵢⱼRⱼ/(z′ⱼ + ε): the ε-rule (W′ = W, z′ = z) for the dense head, the γ-rule
//!   (W′ = W + γW⁺, z′ = W′x + b + γb⁺) for the convolutions, and for the first convolution of
//!   the pass ([`with_lrp`]) z⁺ (W′ = W⁺, z′ = W⁺x, no bias) or, for pixels bounded by l ≤ x ≤ h,
//!   zᴮ: Rᵢ = Σⱼ (xᵢwᵢⱼ − lᵢw⁺ᵢⱼ − hᵢw⁻ᵢⱼ) Rⱼ / Σᵢ(…), whose denominator is never negative. zᴮ's
//!   relevance is not x times a message, so that layer leaves it in [`take_input_relevance`];
//!   ReLU and max-pool pass the
//!   gradient (relevance goes through ReLU unchanged and to each window's maximum), residual
//!   adds split it in proportion to their inputs (the gradient of an add does exactly that),
//!   and batch norm is folded into the convolution before it.

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
    /// Layer-wise relevance propagation: ReLU and max-pool pass the gradient; convolutions and
    /// dense layers take [`with_lrp`]'s rules.
    Lrp,
}

/// LRP's settings for one forward pass.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LrpRules {
    /// The stabiliser ε added (with z′'s sign) to every denominator.
    pub epsilon: f64,
    /// The γ-rule's weight on positive contributions in the convolutions (0: the ε-rule).
    pub gamma: f64,
    /// The first layer's input bounds per channel (low, high): zᴮ; `None`: z⁺.
    pub bounds: Option<([f64; 3], [f64; 3])>,
}

/// The rule one layer takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LrpLayer {
    /// z⁺: positive weights only, no bias (the first layer).
    ZPlus {
        epsilon: f64,
    },
    /// zᴮ with per-channel input bounds (the first layer, on pixels).
    ZBox {
        low: [f64; 3],
        high: [f64; 3],
        epsilon: f64,
    },
    /// W + γW⁺ and b + γb⁺.
    Gamma {
        gamma: f64,
        epsilon: f64,
    },
    Epsilon {
        epsilon: f64,
    },
}

impl LrpLayer {
    pub fn epsilon(self) -> f64 {
        match self {
            LrpLayer::ZPlus { epsilon }
            | LrpLayer::ZBox { epsilon, .. }
            | LrpLayer::Gamma { epsilon, .. }
            | LrpLayer::Epsilon { epsilon } => epsilon,
        }
    }
}

/// Below this |Δx| DeepLIFT falls back to the gradient (Captum's default eps).
pub const DEEPLIFT_EPS: f64 = 1e-10;

thread_local! {
    static RULE: Cell<BackwardRule> = const { Cell::new(BackwardRule::Gradient) };
    static LRP: Cell<Option<LrpRules>> = const { Cell::new(None) };
    /// Whether this LRP pass has built its first convolution yet.
    static LRP_FIRST_BUILT: Cell<bool> = const { Cell::new(false) };
    /// The input's relevance, left by a zᴮ layer's backward.
    static INPUT_RELEVANCE: std::cell::RefCell<Option<candle_core::Tensor>> =
        const { std::cell::RefCell::new(None) };
}

/// Leave the input's relevance (a zᴮ layer's backward does, on the thread running backward).
pub fn put_input_relevance(r: candle_core::Tensor) {
    INPUT_RELEVANCE.with(|c| *c.borrow_mut() = Some(r));
}

/// The input's relevance a zᴮ layer left during the last backward on this thread, if any.
pub fn take_input_relevance() -> Option<candle_core::Tensor> {
    INPUT_RELEVANCE.with(|c| c.borrow_mut().take())
}

/// Run `f` (a forward pass) under LRP with `rules` (see the module's notes); the state before is
/// restored afterwards, also when `f` fails or panics.
pub fn with_lrp<R>(rules: LrpRules, f: impl FnOnce() -> R) -> R {
    struct Restore(Option<LrpRules>, bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            LRP.with(|l| l.set(self.0));
            LRP_FIRST_BUILT.with(|b| b.set(self.1));
        }
    }
    let _restore = Restore(
        LRP.with(|l| l.replace(Some(rules))),
        LRP_FIRST_BUILT.with(|b| b.replace(false)),
    );
    with_backward_rule(BackwardRule::Lrp, f)
}

/// The rule a convolution built now takes: z⁺ for the first of an LRP pass, then γ (ε when
/// γ = 0); `None` outside LRP.
pub fn lrp_conv() -> Option<LrpLayer> {
    let rules = LRP
        .with(Cell::get)
        .filter(|_| backward_rule() == BackwardRule::Lrp)?;
    Some(if !LRP_FIRST_BUILT.with(|b| b.replace(true)) {
        match rules.bounds {
            Some((low, high)) => LrpLayer::ZBox {
                low,
                high,
                epsilon: rules.epsilon,
            },
            None => LrpLayer::ZPlus {
                epsilon: rules.epsilon,
            },
        }
    } else if rules.gamma > 0.0 {
        LrpLayer::Gamma {
            gamma: rules.gamma,
            epsilon: rules.epsilon,
        }
    } else {
        LrpLayer::Epsilon {
            epsilon: rules.epsilon,
        }
    })
}

/// The message every LRP rule sends back before its weights: s = g ⊙ z / (z′ + ε·sign z′), with
/// g the upstream gradient, z the layer's output and z′ the rule's activations (sign 0 = +1).
pub fn lrp_message(
    grad: &candle_core::Tensor,
    z: &candle_core::Tensor,
    z_rule: &candle_core::Tensor,
    epsilon: f64,
) -> candle_core::Result<candle_core::Tensor> {
    let sign = z_rule.ge(0.0)?.to_dtype(z_rule.dtype())?;
    let denominator = (z_rule + sign.affine(2.0 * epsilon, -epsilon)?)?;
    ((grad * z)? / denominator)?.contiguous()
}

/// The rule a dense layer built now takes: ε; `None` outside LRP.
pub fn lrp_dense() -> Option<LrpLayer> {
    let rules = LRP
        .with(Cell::get)
        .filter(|_| backward_rule() == BackwardRule::Lrp)?;
    Some(LrpLayer::Epsilon {
        epsilon: rules.epsilon,
    })
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
