//! The layers a ResNet is made of, built from a [`ParamStore`] by state-dict prefix.

use candle_core::{DType, Tensor};

use crate::error::{ModelError, Result};
use crate::params::{Init, ParamSpec, ParamStore};

/// Train mode uses batch statistics and updates the running ones; eval mode uses the running ones.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// torchvision's `BatchNorm2d` defaults.
pub const BN_EPS: f64 = 1e-5;
pub const BN_MOMENTUM: f64 = 0.1;

pub fn conv_specs(specs: &mut Vec<ParamSpec>, prefix: &str, out: usize, inp: usize, k: usize) {
    specs.push(ParamSpec::weight(
        format!("{prefix}.weight"),
        &[out, inp, k, k],
        Init::KaimingNormalFanOut,
    ));
}

pub fn bn_specs(specs: &mut Vec<ParamSpec>, prefix: &str, c: usize) {
    specs.push(ParamSpec::weight(
        format!("{prefix}.weight"),
        &[c],
        Init::Ones,
    ));
    specs.push(ParamSpec::weight(
        format!("{prefix}.bias"),
        &[c],
        Init::Zeros,
    ));
    specs.push(ParamSpec::buffer(
        format!("{prefix}.running_mean"),
        &[c],
        DType::F32,
        Init::Zeros,
    ));
    specs.push(ParamSpec::buffer(
        format!("{prefix}.running_var"),
        &[c],
        DType::F32,
        Init::Ones,
    ));
    specs.push(ParamSpec::buffer(
        format!("{prefix}.num_batches_tracked"),
        &[],
        DType::I64,
        Init::Zeros,
    ));
}

pub fn linear_specs(specs: &mut Vec<ParamSpec>, prefix: &str, out: usize, inp: usize) {
    let init = Init::LinearUniform { fan_in: inp };
    specs.push(ParamSpec::weight(
        format!("{prefix}.weight"),
        &[out, inp],
        init,
    ));
    specs.push(ParamSpec::weight(format!("{prefix}.bias"), &[out], init));
}

/// A bias-free 2-D convolution (ResNet convolutions carry no bias; batch norm follows).
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
}

impl Conv2d {
    pub fn load(store: &ParamStore, prefix: &str, stride: usize, padding: usize) -> Result<Self> {
        Ok(Self {
            weight: store.tensor(&format!("{prefix}.weight"))?,
            stride,
            padding,
        })
    }

    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::conv::conv2d(
            x,
            &self.weight,
            self.stride,
            self.padding,
        )?)
    }
}

/// `bn(conv(x))`. Where the batch norm is an affine map (eval mode, or frozen), it is folded
/// into the convolution, conv(x; W·s) + t, so that neither pass sweeps the activations for it
/// (forward and backward are the same function of x up to rounding).
pub fn conv_bn(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, mode: Mode) -> Result<Tensor> {
    match folded(conv, bn, mode)? {
        Some((weight, shift)) => Ok(crate::conv::conv2d_biased(
            x,
            &weight,
            &shift,
            conv.stride,
            conv.padding,
        )?),
        None => bn.forward(&conv.forward(x)?, mode),
    }
}

/// relu(bn(conv(x))): [`conv_bn`] then a ReLU, which a train-mode batch norm applies itself.
pub fn conv_bn_relu(conv: &Conv2d, bn: &BatchNorm2d, x: &Tensor, mode: Mode) -> Result<Tensor> {
    match folded(conv, bn, mode)? {
        Some((weight, shift)) => {
            let y = crate::conv::conv2d_biased(x, &weight, &shift, conv.stride, conv.padding)?;
            Ok(crate::relu::relu(&y)?)
        }
        None => bn.forward_relu(&conv.forward(x)?, mode),
    }
}

/// The convolution with its batch norm folded in, (W·s, t), where the batch norm is affine.
pub(crate) fn folded(
    conv: &Conv2d,
    bn: &BatchNorm2d,
    mode: Mode,
) -> Result<Option<(Tensor, Tensor)>> {
    let Some((weight, scale, shift)) = affine_parts(conv, bn, mode)? else {
        return Ok(None);
    };
    let c_out = scale.dim(0)?;
    let weight = weight.broadcast_mul(&scale.reshape((c_out, 1, 1, 1))?)?;
    Ok(Some((weight, shift)))
}

/// The convolution and its batch norm as s ⊙ (W ∗ x) + t, (W, s, t), where the batch norm is
/// affine: for an op that applies s itself rather than scaling every weight on every pass.
pub(crate) fn affine_parts(
    conv: &Conv2d,
    bn: &BatchNorm2d,
    mode: Mode,
) -> Result<Option<(Tensor, Tensor, Tensor)>> {
    Ok(bn
        .affine(mode)?
        .map(|(scale, shift)| (conv.weight.clone(), scale, shift)))
}

/// `nn.Linear`: y = x Wᵀ + b.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
    bias: Tensor,
}

impl Linear {
    pub fn load(store: &ParamStore, prefix: &str) -> Result<Self> {
        Ok(Self {
            weight: store.tensor(&format!("{prefix}.weight"))?,
            bias: store.tensor(&format!("{prefix}.bias"))?,
        })
    }

    /// One op ([`crate::linear`]): the bias rides in the GEMM, and a frozen weight costs no
    /// gradient.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(crate::linear::linear(x, &self.weight, &self.bias)?)
    }

    /// The weight (out × in) and the bias.
    pub(crate) fn parts(&self) -> [&Tensor; 2] {
        [&self.weight, &self.bias]
    }
}

/// `nn.BatchNorm2d` on the per-channel kernels of [`crate::batch_norm`] (candle-nn's has no
/// backward; composed of candle ops it spent a quarter of a training step in single-threaded
/// reductions).
///
/// Train mode normalises by the batch mean and *biased* variance and updates the running
/// statistics with the *unbiased* variance, `r ← (1 − m)·r + m·batch`, m = 0.1, exactly as
/// PyTorch does. A batch-norm layer whose weight is frozen runs in eval mode even while the rest
/// of the model trains, so a frozen layer's statistics stay bit-identical too.
#[derive(Debug, Clone)]
pub struct BatchNorm2d {
    weight: Tensor,
    bias: Tensor,
    running_mean: candle_core::Var,
    running_var: candle_core::Var,
    num_batches_tracked: candle_core::Var,
    frozen: bool,
    name: String,
}

impl BatchNorm2d {
    pub fn load(store: &ParamStore, prefix: &str) -> Result<Self> {
        let w = format!("{prefix}.weight");
        Ok(Self {
            weight: store.tensor(&w)?,
            bias: store.tensor(&format!("{prefix}.bias"))?,
            running_mean: store.var(&format!("{prefix}.running_mean"))?.clone(),
            running_var: store.var(&format!("{prefix}.running_var"))?.clone(),
            num_batches_tracked: store.var(&format!("{prefix}.num_batches_tracked"))?.clone(),
            frozen: !store.is_trainable(&w),
            name: prefix.to_owned(),
        })
    }

    /// In eval mode (or frozen) the layer is y = x·s + t per channel, s = γ/√(σ² + ε) and
    /// t = β − μ·s from the running statistics: (s, t), graph-tracked when γ and β are trained.
    /// In train mode, `None`.
    pub fn affine(&self, mode: Mode) -> Result<Option<(Tensor, Tensor)>> {
        if mode == Mode::Train && !self.frozen {
            return Ok(None);
        }
        let scale =
            (self.weight.clone() / (self.running_var.as_detached_tensor() + BN_EPS)?.sqrt()?)?;
        let shift = (&self.bias - (self.running_mean.as_detached_tensor() * &scale)?)?;
        Ok(Some((scale, shift)))
    }

    pub fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_then(x, mode, false)
    }

    /// relu(bn(x)). In train mode the ReLU runs inside the batch norm's op (one graph node: see
    /// [`crate::batch_norm::batch_norm_train`]) when ReLUs take their plain gradient; otherwise,
    /// and for the affine (eval-mode) layer, it is the ReLU op after it.
    pub fn forward_relu(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_then(x, mode, true)
    }

    fn forward_then(&self, x: &Tensor, mode: Mode, relu: bool) -> Result<Tensor> {
        if let Some((scale, shift)) = self.affine(mode)? {
            let y = crate::batch_norm::channel_affine(x, &scale, &shift)?;
            return Ok(if relu { crate::relu::relu(&y)? } else { y });
        }
        let fused = relu && crate::rules::backward_rule() == crate::rules::BackwardRule::Gradient;
        let (n, _, h, w) = x.dims4()?;
        let count = n * h * w;
        if count < 2 {
            return Err(ModelError::Config(format!(
                "{}: batch norm in train mode needs more than one value per channel (batch {n}, {h}×{w})",
                self.name
            )));
        }
        let (y, mean, var) =
            crate::batch_norm::batch_norm_train(x, &self.weight, &self.bias, BN_EPS, fused)?;
        let y = if relu && !fused {
            crate::relu::relu(&y)?
        } else {
            y
        };

        let m = BN_MOMENTUM;
        let dtype = self.running_mean.dtype();
        let batch_mean = Tensor::new(mean, x.device())?.to_dtype(dtype)?;
        let unbiased: Vec<f64> = var
            .iter()
            .map(|v| v * count as f64 / (count - 1) as f64)
            .collect();
        let unbiased = Tensor::new(unbiased, x.device())?.to_dtype(dtype)?;
        let rm = ((self.running_mean.as_detached_tensor() * (1.0 - m))? + (batch_mean * m)?)?;
        let rv = ((self.running_var.as_detached_tensor() * (1.0 - m))? + (unbiased * m)?)?;
        self.running_mean.set(&rm)?;
        self.running_var.set(&rv)?;
        let nbt = (self.num_batches_tracked.as_detached_tensor()
            + Tensor::ones((), DType::I64, x.device())?)?;
        self.num_batches_tracked.set(&nbt)?;
        Ok(y)
    }
}

/// Layer normalisation over the last dimension (Ba, Kiros & Hinton 2016), `nn.LayerNorm`:
/// (x − mean) / √(biased var + eps) · weight + bias, as one op with a hand-written backward
/// ([`crate::layer_norm`]); candle-nn's fused `layer_norm` has no backward and silently gives zero
/// gradients (shared/CANDLE-NOTES.md).
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    Ok(crate::layer_norm::layer_norm(x, weight, bias, eps)?)
}

/// Softmax over the last dimension as one op with a hand-written backward ([`crate::softmax`]);
/// candle-nn's `softmax_last_dim` has no backward.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    Ok(crate::softmax::softmax_last_dim(x)?)
}

/// Attention weights: softmax(scale·scores) over the keys, padding keys (`keep` false, N × keys)
/// at weight 0, as one op ([`crate::softmax::attention_softmax`]).
pub fn attention_softmax(
    scores: &Tensor,
    scale: f64,
    keep: Option<std::sync::Arc<Vec<bool>>>,
) -> Result<Tensor> {
    Ok(crate::softmax::attention_softmax(scores, scale, keep)?)
}

/// GELU with the exact erf form, x·½(1 + erf(x/√2)) (Hendrycks & Gimpel 2016; BERT's `gelu`), as
/// one op with the exact derivative ([`crate::gelu`]): candle's fused `gelu_erf` backward rounds
/// 1/√(2π) to six digits.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    Ok(crate::gelu::gelu_erf(x)?)
}

impl Linear {
    /// Over the last dimension of an input of any rank (N×T×in → N×T×out).
    pub fn forward_nd(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (rows, inp) = (
            dims[..dims.len() - 1].iter().product::<usize>(),
            dims[dims.len() - 1],
        );
        let y = self.forward(&x.reshape((rows, inp))?)?;
        let mut out = dims;
        *out.last_mut().expect("rank ≥ 1") = y.dim(1)?;
        Ok(y.reshape(out)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn store(c: usize) -> ParamStore {
        let mut specs = Vec::new();
        bn_specs(&mut specs, "bn", c);
        ParamStore::init(&specs, 0, &Device::Cpu).unwrap()
    }

    #[test]
    fn train_mode_normalises_and_updates_running_stats_like_torch() {
        let s = store(2);
        let bn = BatchNorm2d::load(&s, "bn").unwrap();
        // Channel 0 holds 1..=8, channel 1 holds 10·(1..=8), batch of 2 × 2×2.
        let mut v = Vec::new();
        for n in 0..2 {
            for c in 0..2 {
                for i in 0..4 {
                    v.push(((n * 4 + i + 1) * if c == 0 { 1 } else { 10 }) as f32);
                }
            }
        }
        let x = Tensor::from_vec(v, (2, 2, 2, 2), &Device::Cpu).unwrap();
        let y = bn.forward(&x, Mode::Train).unwrap();
        let mean_y: Vec<f32> = y
            .mean_keepdim((0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert!(mean_y.iter().all(|m| m.abs() < 1e-5));
        // Mean 4.5, unbiased variance of 1..=8 is 6; running = 0.9·init + 0.1·batch.
        let rm: Vec<f32> = s.var("bn.running_mean").unwrap().to_vec1().unwrap();
        let rv: Vec<f32> = s.var("bn.running_var").unwrap().to_vec1().unwrap();
        assert!(
            (rm[0] - 0.45).abs() < 1e-6 && (rm[1] - 4.5).abs() < 1e-5,
            "{rm:?}"
        );
        assert!(
            (rv[0] - (0.9 + 0.6)).abs() < 1e-5 && (rv[1] - (0.9 + 60.0)).abs() < 1e-3,
            "{rv:?}"
        );
        let nbt: i64 = s
            .var("bn.num_batches_tracked")
            .unwrap()
            .to_scalar()
            .unwrap();
        assert_eq!(nbt, 1);

        // Eval mode uses the running statistics and changes nothing.
        let before: Vec<f32> = s.var("bn.running_mean").unwrap().to_vec1().unwrap();
        let y_eval = bn.forward(&x, Mode::Eval).unwrap();
        let after: Vec<f32> = s.var("bn.running_mean").unwrap().to_vec1().unwrap();
        assert_eq!(before, after);
        let first: f32 = y_eval
            .flatten_all()
            .unwrap()
            .get(0)
            .unwrap()
            .to_scalar()
            .unwrap();
        assert!((first - (1.0 - 0.45) / (1.5f32 + 1e-5).sqrt()).abs() < 1e-5);
    }

    #[test]
    fn frozen_batch_norm_stays_in_eval_mode() {
        let mut s = store(2);
        s.set_trainable(|_| false);
        let bn = BatchNorm2d::load(&s, "bn").unwrap();
        let x = crate::testutil::randn((4, 2, 3, 3), 0.0, 1.0, DType::F32, 0);
        bn.forward(&x, Mode::Train).unwrap();
        let rm: Vec<f32> = s.var("bn.running_mean").unwrap().to_vec1().unwrap();
        assert_eq!(rm, vec![0.0, 0.0]);
    }

    #[test]
    fn single_value_per_channel_is_an_error() {
        let bn = BatchNorm2d::load(&store(3), "bn").unwrap();
        let x = Tensor::zeros((1, 3, 1, 1), DType::F32, &Device::Cpu).unwrap();
        assert!(bn.forward(&x, Mode::Train).is_err());
        assert!(bn.forward(&x, Mode::Eval).is_ok());
    }

    /// Folding an eval-mode batch norm into the convolution changes nothing but rounding: the
    /// output and the gradients of the input, the kernel, γ and β agree with conv then BN.
    #[test]
    fn folded_conv_bn_matches_conv_then_batch_norm() {
        let mut specs = Vec::new();
        conv_specs(&mut specs, "conv", 6, 4, 3);
        bn_specs(&mut specs, "bn", 6);
        let s = ParamStore::init(&specs, 3, &Device::Cpu).unwrap();
        // Running statistics and an affine part away from the identity.
        let rand =
            |n: usize, mean: f64, seed: u64| crate::testutil::randn(n, mean, 0.3, DType::F32, seed);
        s.var("bn.running_mean")
            .unwrap()
            .set(&rand(6, 0.2, 1))
            .unwrap();
        s.var("bn.running_var")
            .unwrap()
            .set(&rand(6, 1.5, 2))
            .unwrap();
        s.var("bn.weight").unwrap().set(&rand(6, 1.0, 3)).unwrap();
        s.var("bn.bias").unwrap().set(&rand(6, 0.0, 4)).unwrap();
        let conv = Conv2d::load(&s, "conv", 2, 1).unwrap();
        let bn = BatchNorm2d::load(&s, "bn").unwrap();
        let x = candle_core::Var::from_tensor(&crate::testutil::randn(
            (3, 4, 9, 8),
            0.0,
            1.0,
            DType::F32,
            5,
        ))
        .unwrap();
        let folded = conv_bn(&conv, &bn, &x, Mode::Eval).unwrap();
        let plain = bn.forward(&conv.forward(&x).unwrap(), Mode::Eval).unwrap();
        let r = crate::testutil::randn(folded.dims(), 0.0, 1.0, DType::F32, 6);
        assert!(crate::testutil::max_rel_diff(&folded, &plain) < 1e-5);
        let g0 = (&folded * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let g1 = (&plain * &r)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for name in ["conv.weight", "bn.weight", "bn.bias"] {
            let v = s.var(name).unwrap();
            let e = crate::testutil::max_rel_diff(g0.get(v).unwrap(), g1.get(v).unwrap());
            assert!(e < 1e-5, "{name}: {e}");
        }
        assert!(crate::testutil::max_rel_diff(g0.get(&x).unwrap(), g1.get(&x).unwrap()) < 1e-5);
    }
}
