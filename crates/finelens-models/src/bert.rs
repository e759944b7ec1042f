//! BERT-family text encoders (Devlin et al. 2019) with Hugging Face's parameter names, so a
//! `save_pretrained` folder loads as it is and what finelens saves loads back into transformers
//! (`BertForSequenceClassification`). Every op on the gradient path has an exact backward
//! (layer norm, softmax and GELU are composed in [`crate::nn`]; candle-nn's fused ones have no
//! backward and would silently zero the gradients), so fine-tuning moves every weight and
//! attributions through the input embeddings are real.
//!
//! Names: the encoder's tensors live under `bert.` (`bert.encoder.layer.0.attention.self.query
//! .weight`), the head under `classifier.`; a bare `BertModel` file (no `bert.` prefix, as
//! sentence-transformers ships them) is read by adding the prefix.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use crate::bert_layer::bert_layer;
use crate::describe::{InputKind, ModelDescription, Stage};
use crate::error::{ModelError, Result};
use crate::nn::{attention_softmax, gelu_erf, layer_norm, Linear, Mode};
use crate::params::{Init, ParamSpec, ParamStore};
use crate::resnet::Hook;

/// The prefix of the encoder's parameters (`BertForSequenceClassification`'s `bert` module).
pub const ENCODER: &str = "bert.";

/// The `model_type`s finelens reads.
pub const SUPPORTED_MODEL_TYPES: &[&str] = &["bert"];

fn default_positions() -> usize {
    512
}
fn default_type_vocab() -> usize {
    2
}
fn default_eps() -> f64 {
    1e-12
}
fn default_act() -> String {
    "gelu".into()
}
fn default_dropout() -> f64 {
    0.1
}
fn default_init() -> f64 {
    0.02
}
fn default_position_type() -> String {
    "absolute".into()
}

/// The `config.json` fields an encoder is built from (others are ignored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertConfig {
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub intermediate_size: usize,
    #[serde(default = "default_positions")]
    pub max_position_embeddings: usize,
    #[serde(default = "default_type_vocab")]
    pub type_vocab_size: usize,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
    #[serde(default = "default_act")]
    pub hidden_act: String,
    #[serde(default = "default_dropout")]
    pub hidden_dropout_prob: f64,
    #[serde(default = "default_dropout")]
    pub attention_probs_dropout_prob: f64,
    #[serde(default)]
    pub pad_token_id: u32,
    #[serde(default = "default_init")]
    pub initializer_range: f64,
    #[serde(default = "default_position_type")]
    pub position_embedding_type: String,
}

impl BertConfig {
    /// all-MiniLM-L6-v2's shape (6 layers, hidden 384, 12 heads, vocabulary 30,522): the
    /// benchmarks' model.
    pub fn all_minilm_l6() -> BertConfig {
        BertConfig {
            model_type: "bert".into(),
            vocab_size: 30_522,
            hidden_size: 384,
            num_hidden_layers: 6,
            num_attention_heads: 12,
            intermediate_size: 1536,
            max_position_embeddings: 512,
            type_vocab_size: 2,
            layer_norm_eps: 1e-12,
            hidden_act: "gelu".into(),
            hidden_dropout_prob: 0.1,
            attention_probs_dropout_prob: 0.1,
            pad_token_id: 0,
            initializer_range: 0.02,
            position_embedding_type: "absolute".into(),
        }
    }

    /// Refuse what the encoder does not implement, naming the setting.
    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(ModelError::Config(m));
        if !SUPPORTED_MODEL_TYPES.contains(&self.model_type.as_str()) {
            return bad(format!(
                "model_type `{}` is not supported (supported: {})",
                self.model_type,
                SUPPORTED_MODEL_TYPES.join(", ")
            ));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return bad(format!(
                "hidden_size {} is not a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        if Activation::parse(&self.hidden_act).is_none() {
            return bad(format!(
                "hidden_act `{}` is not supported (supported: gelu, gelu_new, gelu_pytorch_tanh, relu)",
                self.hidden_act
            ));
        }
        if self.position_embedding_type != "absolute" {
            return bad(format!(
                "position_embedding_type `{}` is not supported (supported: absolute)",
                self.position_embedding_type
            ));
        }
        for (name, p) in [
            ("hidden_dropout_prob", self.hidden_dropout_prob),
            (
                "attention_probs_dropout_prob",
                self.attention_probs_dropout_prob,
            ),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{name} must be in [0, 1), got {p}"));
            }
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy)]
enum Activation {
    GeluErf,
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "gelu" => Some(Activation::GeluErf),
            "gelu_new" | "gelu_pytorch_tanh" => Some(Activation::GeluTanh),
            "relu" => Some(Activation::Relu),
            _ => None,
        }
    }

    fn apply(self, x: &Tensor) -> Result<Tensor> {
        Ok(match self {
            Activation::GeluErf => gelu_erf(x)?,
            Activation::GeluTanh => x.gelu()?,
            Activation::Relu => x.relu()?,
        })
    }
}

/// The task layer on top of the encoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TextHead {
    /// `BertForSequenceClassification`: the pooler (tanh(W·h[CLS] + b)), dropout, a linear layer.
    Cls,
    /// sentence-transformers' mean over the real tokens, dropout, a linear layer.
    Mean,
    /// The mean, then Dense(N) → ReLU → Dense(classes) (`classifier.0`, `classifier.2`).
    Mlp(usize),
}

impl FromStr for TextHead {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "cls" => Ok(TextHead::Cls),
            "mean" => Ok(TextHead::Mean),
            _ => s
                .strip_prefix("mlp:")
                .and_then(|n| n.parse().ok())
                .filter(|n| *n > 0)
                .map(TextHead::Mlp)
                .ok_or_else(|| {
                    ModelError::Config(format!(
                        "unknown text head `{s}` (expected cls, mean or mlp:N)"
                    ))
                }),
        }
    }
}

impl fmt::Display for TextHead {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TextHead::Cls => f.write_str("cls"),
            TextHead::Mean => f.write_str("mean"),
            TextHead::Mlp(n) => write!(f, "mlp:{n}"),
        }
    }
}

/// An encoder with a head for `classes` classes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BertSpec {
    pub config: BertConfig,
    pub classes: usize,
    pub head: TextHead,
}

impl BertSpec {
    pub fn check(&self) -> Result<()> {
        self.config.check()?;
        if self.classes == 0 {
            return Err(ModelError::Config(
                "a classifier needs at least 1 class".into(),
            ));
        }
        Ok(())
    }

    /// The encoder's tensors, named as `BertModel` names them under [`ENCODER`].
    pub fn encoder_specs(&self) -> Vec<ParamSpec> {
        let c = &self.config;
        let h = c.hidden_size;
        let normal = Init::Normal {
            std: c.initializer_range,
        };
        let mut s = Vec::new();
        let e = format!("{ENCODER}embeddings");
        s.push(ParamSpec::weight(
            format!("{e}.word_embeddings.weight"),
            &[c.vocab_size, h],
            normal,
        ));
        s.push(ParamSpec::weight(
            format!("{e}.position_embeddings.weight"),
            &[c.max_position_embeddings, h],
            normal,
        ));
        s.push(ParamSpec::weight(
            format!("{e}.token_type_embeddings.weight"),
            &[c.type_vocab_size, h],
            normal,
        ));
        layer_norm_specs(&mut s, &format!("{e}.LayerNorm"), h);
        for i in 0..c.num_hidden_layers {
            let l = format!("{ENCODER}encoder.layer.{i}");
            for part in ["query", "key", "value"] {
                dense_specs(&mut s, &format!("{l}.attention.self.{part}"), h, h, normal);
            }
            dense_specs(&mut s, &format!("{l}.attention.output.dense"), h, h, normal);
            layer_norm_specs(&mut s, &format!("{l}.attention.output.LayerNorm"), h);
            dense_specs(
                &mut s,
                &format!("{l}.intermediate.dense"),
                c.intermediate_size,
                h,
                normal,
            );
            dense_specs(
                &mut s,
                &format!("{l}.output.dense"),
                h,
                c.intermediate_size,
                normal,
            );
            layer_norm_specs(&mut s, &format!("{l}.output.LayerNorm"), h);
        }
        dense_specs(&mut s, &format!("{ENCODER}pooler.dense"), h, h, normal);
        s
    }

    /// The head's tensors (`classifier.*`).
    pub fn head_specs(&self) -> Vec<ParamSpec> {
        let h = self.config.hidden_size;
        let normal = Init::Normal {
            std: self.config.initializer_range,
        };
        let mut s = Vec::new();
        match self.head {
            TextHead::Cls | TextHead::Mean => {
                dense_specs(&mut s, "classifier", self.classes, h, normal)
            }
            TextHead::Mlp(n) => {
                dense_specs(&mut s, "classifier.0", n, h, normal);
                dense_specs(&mut s, "classifier.2", self.classes, n, normal);
            }
        }
        s
    }

    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let mut s = self.encoder_specs();
        s.extend(self.head_specs());
        s
    }

    /// Stages from the input to the head: the embeddings, each encoder layer, the pooler, the
    /// head. The pooled vector (`pooler`) is the embedding a head reads.
    pub fn describe(&self) -> ModelDescription {
        let stage = |name: &str, prefix: String| Stage {
            name: name.to_owned(),
            prefixes: vec![prefix],
            blocks: Vec::new(),
        };
        let mut stages = vec![stage("embeddings", format!("{ENCODER}embeddings."))];
        let mut representation = vec!["embeddings".to_owned()];
        for i in 0..self.config.num_hidden_layers {
            let name = format!("encoder.layer.{i}");
            stages.push(stage(&name, format!("{ENCODER}{name}.")));
            representation.push(name);
        }
        stages.push(stage("pooler", format!("{ENCODER}pooler.")));
        stages.push(stage("head", "classifier.".into()));
        representation.push("pooler".into());
        ModelDescription {
            input: InputKind::TokenIds,
            stages,
            representation_layers: representation,
            embedding_layer: "pooler".into(),
            head_prefixes: vec!["classifier.".into()],
            last_spatial_layer: None,
        }
    }
}

fn dense_specs(s: &mut Vec<ParamSpec>, prefix: &str, out: usize, inp: usize, init: Init) {
    s.push(ParamSpec::weight(
        format!("{prefix}.weight"),
        &[out, inp],
        init,
    ));
    s.push(ParamSpec::weight(
        format!("{prefix}.bias"),
        &[out],
        Init::Zeros,
    ));
}

fn layer_norm_specs(s: &mut Vec<ParamSpec>, prefix: &str, h: usize) {
    s.push(ParamSpec::weight(
        format!("{prefix}.weight"),
        &[h],
        Init::Ones,
    ));
    s.push(ParamSpec::weight(
        format!("{prefix}.bias"),
        &[h],
        Init::Zeros,
    ));
}

struct Norm {
    weight: Tensor,
    bias: Tensor,
}

impl Norm {
    fn load(store: &ParamStore, prefix: &str) -> Result<Self> {
        Ok(Norm {
            weight: store.tensor(&format!("{prefix}.weight"))?,
            bias: store.tensor(&format!("{prefix}.bias"))?,
        })
    }
}

struct Layer {
    query: Linear,
    key: Linear,
    value: Linear,
    attention_out: Linear,
    attention_norm: Norm,
    intermediate: Linear,
    output: Linear,
    output_norm: Norm,
}

impl Layer {
    /// The parameters in [`bert_layer`]'s order, when none of them is trained.
    fn frozen(&self) -> Option<[&Tensor; 16]> {
        let [wq, bq] = self.query.parts();
        let [wk, bk] = self.key.parts();
        let [wv, bv] = self.value.parts();
        let [wo, bo] = self.attention_out.parts();
        let [wi, bi] = self.intermediate.parts();
        let [w2, b2] = self.output.parts();
        let (n1, n2) = (&self.attention_norm, &self.output_norm);
        let all = [
            wq, bq, wk, bk, wv, bv, wo, bo, &n1.weight, &n1.bias, wi, bi, w2, b2, &n2.weight,
            &n2.bias,
        ];
        (!all.iter().any(|p| p.track_op())).then_some(all)
    }
}

enum Head {
    Linear(Linear),
    Mlp(Linear, Linear),
}

/// A BERT encoder with a classification head, built from a [`ParamStore`] by name.
pub struct Bert {
    spec: BertSpec,
    activation: Activation,
    word: Tensor,
    position: Tensor,
    token_type: Tensor,
    embedding_norm: Norm,
    layers: Vec<Layer>,
    pooler: Linear,
    head: Head,
    /// Dropout's random stream in train mode: reseeded per step by the trainer (so a resumed
    /// run draws the same masks), advanced by every draw.
    dropout_rng: RefCell<ChaCha8Rng>,
}

/// Token ids, token types and the attention mask of a padded batch (all N × T).
#[derive(Debug, Clone)]
pub struct TokenBatch {
    /// u32 ids.
    pub ids: Tensor,
    /// u32 segment ids (0 for single sentences).
    pub type_ids: Tensor,
    /// 1 for a real token, 0 for padding (any float or integer dtype).
    pub mask: Tensor,
}

impl TokenBatch {
    /// Rows of token ids, each with its token types (all 0 when `type_ids` is `None`), padded
    /// at the end with `pad_id` to the longest row; the mask is 1 on the rows' own tokens.
    pub fn padded(
        ids: &[&[u32]],
        type_ids: Option<&[&[u32]]>,
        pad_id: u32,
        device: &Device,
    ) -> Result<TokenBatch> {
        let (n, t) = (ids.len(), ids.iter().map(|r| r.len()).max().unwrap_or(0));
        let (mut i, mut ty, mut m) = (
            Vec::with_capacity(n * t),
            Vec::with_capacity(n * t),
            Vec::with_capacity(n * t),
        );
        for (k, row) in ids.iter().enumerate() {
            let pad = t - row.len();
            i.extend(row.iter().copied().chain(std::iter::repeat_n(pad_id, pad)));
            match type_ids {
                Some(types) => {
                    ty.extend(types[k].iter().copied().chain(std::iter::repeat_n(0, pad)))
                }
                None => ty.extend(std::iter::repeat_n(0u32, t)),
            }
            m.extend(std::iter::repeat_n(1u32, row.len()).chain(std::iter::repeat_n(0, pad)));
        }
        Ok(TokenBatch {
            ids: Tensor::from_vec(i, (n, t), device)?,
            type_ids: Tensor::from_vec(ty, (n, t), device)?,
            mask: Tensor::from_vec(m, (n, t), device)?,
        })
    }
}

impl Bert {
    pub fn new(spec: BertSpec, store: &ParamStore) -> Result<Self> {
        spec.check()?;
        let t = |name: String| store.tensor(&name);
        let e = format!("{ENCODER}embeddings");
        let layers = (0..spec.config.num_hidden_layers)
            .map(|i| {
                let l = format!("{ENCODER}encoder.layer.{i}");
                Ok(Layer {
                    query: Linear::load(store, &format!("{l}.attention.self.query"))?,
                    key: Linear::load(store, &format!("{l}.attention.self.key"))?,
                    value: Linear::load(store, &format!("{l}.attention.self.value"))?,
                    attention_out: Linear::load(store, &format!("{l}.attention.output.dense"))?,
                    attention_norm: Norm::load(store, &format!("{l}.attention.output.LayerNorm"))?,
                    intermediate: Linear::load(store, &format!("{l}.intermediate.dense"))?,
                    output: Linear::load(store, &format!("{l}.output.dense"))?,
                    output_norm: Norm::load(store, &format!("{l}.output.LayerNorm"))?,
                })
            })
            .collect::<Result<_>>()?;
        let head = match spec.head {
            TextHead::Cls | TextHead::Mean => Head::Linear(Linear::load(store, "classifier")?),
            TextHead::Mlp(_) => Head::Mlp(
                Linear::load(store, "classifier.0")?,
                Linear::load(store, "classifier.2")?,
            ),
        };
        Ok(Bert {
            activation: Activation::parse(&spec.config.hidden_act).expect("checked"),
            word: t(format!("{e}.word_embeddings.weight"))?,
            position: t(format!("{e}.position_embeddings.weight"))?,
            token_type: t(format!("{e}.token_type_embeddings.weight"))?,
            embedding_norm: Norm::load(store, &format!("{e}.LayerNorm"))?,
            layers,
            pooler: Linear::load(store, &format!("{ENCODER}pooler.dense"))?,
            head,
            dropout_rng: RefCell::new(ChaCha8Rng::seed_from_u64(0)),
            spec,
        })
    }

    pub fn spec(&self) -> &BertSpec {
        &self.spec
    }

    /// Restart dropout's stream (the trainer calls it per step with a seed derived from the
    /// run's seed and the step).
    pub fn reseed_dropout(&self, seed: u64) {
        *self.dropout_rng.borrow_mut() = ChaCha8Rng::seed_from_u64(seed);
    }

    /// The word embeddings of `ids` (N × T × hidden): the input attributions are taken against.
    pub fn word_embeddings(&self, ids: &Tensor) -> Result<Tensor> {
        let (n, t) = ids.dims2()?;
        let flat = ids.flatten_all()?.to_dtype(DType::U32)?;
        if let Some(&bad) = flat
            .to_vec1::<u32>()?
            .iter()
            .find(|&&i| i as usize >= self.spec.config.vocab_size)
        {
            return Err(ModelError::Config(format!(
                "token id {bad} is outside the vocabulary ({} ids)",
                self.spec.config.vocab_size
            )));
        }
        Ok(self
            .word
            .index_select(&flat, 0)?
            .reshape((n, t, self.spec.config.hidden_size))?)
    }

    /// Logits (N × classes) of a batch of token ids.
    pub fn forward(&self, batch: &TokenBatch, mode: Mode) -> Result<Tensor> {
        let words = self.word_embeddings(&batch.ids)?;
        self.forward_embeds(&words, &batch.type_ids, &batch.mask, mode, None)
    }

    /// Logits from word embeddings (N × T × hidden, as transformers' `inputs_embeds`): position
    /// and token-type embeddings are added here. The hook sees `embeddings`, each
    /// `encoder.layer.N` (N × T × hidden), each `encoder.layer.N.attention` (the attention
    /// probabilities, N × heads × T × T), `pooler` (the head's input) and `classifier` (logits).
    pub fn forward_embeds(
        &self,
        words: &Tensor,
        type_ids: &Tensor,
        mask: &Tensor,
        mode: Mode,
        mut hook: Option<Hook>,
    ) -> Result<Tensor> {
        let c = &self.spec.config;
        let (n, t, h) = words.dims3()?;
        if t > c.max_position_embeddings {
            return Err(ModelError::Config(format!(
                "{t} tokens exceed the model's {} positions",
                c.max_position_embeddings
            )));
        }
        let dtype = words.dtype();
        let positions = self
            .position
            .narrow(0, 0, t)?
            .to_dtype(dtype)?
            .unsqueeze(0)?;
        let types = self
            .token_type
            .index_select(&type_ids.flatten_all()?.to_dtype(DType::U32)?, 0)?
            .to_dtype(dtype)?
            .reshape((n, t, h))?;
        let x = words.broadcast_add(&positions)?.add(&types)?;
        let x = self.norm(&x, &self.embedding_norm)?;
        let mut x = self.dropout(&x, c.hidden_dropout_prob, mode)?;
        x = tap(&mut hook, "embeddings", x)?;

        // Padding keys get attention weight exactly 0, as transformers' additive mask of the
        // dtype's lowest value gives them; without padding nothing is masked.
        let mask = mask.to_dtype(dtype)?;
        let keep: Vec<bool> = mask
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
            .into_iter()
            .map(|m| m > 0.5)
            .collect();
        let keep = (!keep.iter().all(|&k| k)).then(|| std::sync::Arc::new(keep));
        let heads = c.num_attention_heads;
        let dh = h / heads;
        let split = |y: Tensor| -> Result<Tensor> {
            Ok(y.reshape((n, t, heads, dh))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        // Frozen weights in eval mode with nothing to see inside a layer: one op per layer
        // (`bert_layer`), the same function with a tenth of the graph.
        let fused = mode == Mode::Eval
            && hook.is_none()
            && matches!(self.activation, Activation::GeluErf)
            && crate::rules::backward_rule() == crate::rules::BackwardRule::Gradient
            && x.device().is_cpu();
        for (i, layer) in self.layers.iter().enumerate() {
            if let Some(params) = layer.frozen().filter(|_| fused) {
                x = bert_layer(&x, heads, c.layer_norm_eps, keep.clone(), params)?;
                continue;
            }
            let q = split(layer.query.forward_nd(&x)?)?;
            let k = split(layer.key.forward_nd(&x)?)?;
            let v = split(layer.value.forward_nd(&x)?)?;
            let scores = q.matmul(&k.t()?.contiguous()?)?;
            let probs = attention_softmax(&scores, 1.0 / (dh as f64).sqrt(), keep.clone())?;
            let probs = tap(&mut hook, &format!("encoder.layer.{i}.attention"), probs)?;
            let probs = self.dropout(&probs, c.attention_probs_dropout_prob, mode)?;
            let context = probs
                .matmul(&v)?
                .transpose(1, 2)?
                .contiguous()?
                .reshape((n, t, h))?;
            let a = self.dropout(
                &layer.attention_out.forward_nd(&context)?,
                c.hidden_dropout_prob,
                mode,
            )?;
            let x1 = self.norm(&(a + &x)?, &layer.attention_norm)?;
            let inner = self
                .activation
                .apply(&layer.intermediate.forward_nd(&x1)?)?;
            let o = self.dropout(
                &layer.output.forward_nd(&inner)?,
                c.hidden_dropout_prob,
                mode,
            )?;
            x = self.norm(&(o + x1)?, &layer.output_norm)?;
            x = tap(&mut hook, &format!("encoder.layer.{i}"), x)?;
        }

        let pooled = match self.spec.head {
            TextHead::Cls => self
                .pooler
                .forward(&x.narrow(1, 0, 1)?.squeeze(1)?)?
                .tanh()?,
            TextHead::Mean | TextHead::Mlp(_) => {
                let m = mask.unsqueeze(2)?;
                x.broadcast_mul(&m)?
                    .sum(1)?
                    .broadcast_div(&m.sum(1)?.clamp(1.0, f64::INFINITY)?)?
            }
        };
        let pooled = tap(&mut hook, "pooler", pooled)?;
        let pooled = self.dropout(&pooled, c.hidden_dropout_prob, mode)?;
        let logits = match &self.head {
            Head::Linear(l) => l.forward(&pooled)?,
            Head::Mlp(a, b) => b.forward(&a.forward(&pooled)?.relu()?)?,
        };
        tap(&mut hook, "classifier", logits)
    }

    fn norm(&self, x: &Tensor, n: &Norm) -> Result<Tensor> {
        let dtype = x.dtype();
        layer_norm(
            x,
            &n.weight.to_dtype(dtype)?,
            &n.bias.to_dtype(dtype)?,
            self.spec.config.layer_norm_eps,
        )
    }

    /// Inverted dropout in train mode (kept units scaled by 1/(1 − p)); the identity in eval.
    fn dropout(&self, x: &Tensor, p: f64, mode: Mode) -> Result<Tensor> {
        if mode == Mode::Eval || p == 0.0 {
            return Ok(x.clone());
        }
        // One seed per dropout from the step's stream; the mask is a function of it.
        let seed = self.dropout_rng.borrow_mut().random::<u64>();
        Ok(crate::dropout::dropout(x, p, seed)?)
    }

    /// The names the hook sees, in network order.
    pub fn layer_names(&self) -> Vec<String> {
        let mut names = vec!["embeddings".to_owned()];
        for i in 0..self.spec.config.num_hidden_layers {
            names.push(format!("encoder.layer.{i}.attention"));
            names.push(format!("encoder.layer.{i}"));
        }
        names.push("pooler".into());
        names.push("classifier".into());
        names
    }
}

/// The name a tensor of a BERT folder is compared under across files: Hugging Face's
/// `BertModel` names with the `bert.` prefix (a bare `BertModel` file, like all-MiniLM's, has
/// none; a `BertForSequenceClassification` file has it), the classifier's as they are; the
/// `position_ids` buffer is not a parameter (`None`).
pub fn canonical_name(name: &str) -> Option<String> {
    if name.ends_with("position_ids") {
        None
    } else if name.starts_with(ENCODER) || name.starts_with("classifier.") {
        Some(name.to_owned())
    } else {
        Some(format!("{ENCODER}{name}"))
    }
}

/// One tokenized text's classifier on its word embeddings: the input is N × 1 × T × hidden (N
/// copies or path points of the text's word embeddings — a one-channel "image" of tokens by
/// hidden units, so that the attribution methods apply unchanged), the token types and the
/// attention mask are the text's. Captum's `LayerIntegratedGradients` on
/// `bert.embeddings.word_embeddings` attributes the same input.
pub struct OnWordEmbeddings<'a> {
    pub bert: &'a Bert,
    /// 1 × T token types and attention mask of the text.
    pub type_ids: Tensor,
    pub mask: Tensor,
}

impl OnWordEmbeddings<'_> {
    /// The model's input for `ids` (1 × T): 1 × 1 × T × hidden.
    pub fn input(&self, ids: &Tensor) -> Result<Tensor> {
        Ok(self.bert.word_embeddings(ids)?.unsqueeze(1)?)
    }
}

impl crate::resnet::Classifier for OnWordEmbeddings<'_> {
    fn forward_hooked(&self, x: &Tensor, mode: Mode, hook: Option<Hook>) -> Result<Tensor> {
        let (n, c, t, h) = x.dims4()?;
        if c != 1 {
            return Err(ModelError::Config(format!(
                "word embeddings come as N × 1 × T × hidden, got {c} channels"
            )));
        }
        let rows = |m: &Tensor| -> Result<Tensor> { Ok(m.broadcast_as((n, t))?.contiguous()?) };
        self.bert.forward_embeds(
            &x.reshape((n, t, h))?,
            &rows(&self.type_ids)?,
            &rows(&self.mask)?,
            mode,
            hook,
        )
    }

    fn layer_names(&self) -> Vec<String> {
        self.bert.layer_names()
    }

    fn num_classes(&self) -> usize {
        self.bert.spec().classes
    }

    fn describe(&self) -> ModelDescription {
        self.bert.spec().describe()
    }
}

fn tap(hook: &mut Option<Hook>, name: &str, t: Tensor) -> Result<Tensor> {
    match hook {
        Some(h) => Ok(h(name, &t)?.unwrap_or(t)),
        None => Ok(t),
    }
}

/// A Hugging Face model folder as `save_pretrained` writes it, read: its configuration and its
/// tensors under finelens's names.
pub struct HfFolder {
    pub dir: PathBuf,
    pub config: BertConfig,
    pub tensors: BTreeMap<String, Tensor>,
    pub sha256: String,
    /// The weights file's header metadata (`format`, and finelens's record in a folder it wrote).
    pub header: std::collections::HashMap<String, String>,
    /// The classes of a `classifier` the file carries (a fine-tuned model).
    pub classes: Option<usize>,
}

/// The weights file of a model folder.
pub const WEIGHTS_FILE: &str = "model.safetensors";

/// Read `dir/config.json` and `dir/model.safetensors`. Bare `BertModel` names get the `bert.`
/// prefix; the `position_ids` buffer, a pretraining head (`cls.*`) and old `gamma`/`beta`
/// names are handled as transformers handles them.
pub fn read_hf_folder(dir: &Path) -> Result<HfFolder> {
    let config_path = dir.join("config.json");
    let missing = |path: &Path, what: &str| ModelError::Io {
        path: path.to_owned(),
        error: std::io::Error::new(std::io::ErrorKind::NotFound, what.to_owned()),
    };
    let text = std::fs::read_to_string(&config_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            missing(&config_path, "missing: not a Hugging Face model folder")
        } else {
            ModelError::Io {
                path: config_path.clone(),
                error: e,
            }
        }
    })?;
    let config: BertConfig = serde_json::from_str(&text).map_err(|e| ModelError::Metadata {
        path: config_path.clone(),
        reason: e.to_string(),
    })?;
    config.check().map_err(|e| ModelError::Metadata {
        path: config_path.clone(),
        reason: e.to_string().replace("invalid model configuration: ", ""),
    })?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.is_file() {
        return Err(missing(
            &weights,
            "missing (finelens reads safetensors weights, not pytorch_model.bin)",
        ));
    }
    let crate::checkpoint::SafetensorsFile {
        tensors: raw,
        header,
        sha256,
    } = crate::checkpoint::read_with_header(&weights)?;
    let mut tensors = BTreeMap::new();
    for (name, t) in raw {
        let name = name.replace(".gamma", ".weight").replace(".beta", ".bias");
        if name.ends_with("embeddings.position_ids") || name.starts_with("cls.") {
            continue;
        }
        let name = if name.starts_with(ENCODER) || name.starts_with("classifier") {
            name
        } else {
            format!("{ENCODER}{name}")
        };
        tensors.insert(name, t);
    }
    let words = format!("{ENCODER}embeddings.word_embeddings.weight");
    if let Some(w) = tensors.get(&words) {
        let rows = w.dim(0)?;
        if rows != config.vocab_size {
            return Err(ModelError::Metadata {
                path: config_path,
                reason: format!(
                    "vocab_size is {} but {} has {rows} word embeddings",
                    config.vocab_size,
                    weights.display()
                ),
            });
        }
    }
    let classes = match tensors.get("classifier.weight") {
        Some(w) => Some(w.dim(0)?),
        None => None,
    };
    Ok(HfFolder {
        dir: dir.to_owned(),
        config,
        tensors,
        sha256,
        header,
        classes,
    })
}

impl HfFolder {
    /// The folder's encoder with a fresh `head` for `classes` classes, initialised from `seed`.
    pub fn store(
        &self,
        head: TextHead,
        classes: usize,
        seed: u64,
    ) -> Result<(BertSpec, ParamStore)> {
        self.build(head, classes, Some(seed))
    }

    /// The folder's encoder and its own head (`head` for `classes` classes, as the file holds it).
    pub fn store_with_head(
        &self,
        head: TextHead,
        classes: usize,
    ) -> Result<(BertSpec, ParamStore)> {
        self.build(head, classes, None)
    }

    /// `fresh`: initialise the head from this seed; `None`: take it from the file.
    fn build(
        &self,
        head: TextHead,
        classes: usize,
        fresh: Option<u64>,
    ) -> Result<(BertSpec, ParamStore)> {
        let spec = BertSpec {
            config: self.config.clone(),
            classes,
            head,
        };
        spec.check()?;
        let mut tensors: BTreeMap<String, Tensor> = self
            .tensors
            .iter()
            .filter(|(k, _)| k.starts_with(ENCODER))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let head_specs = spec.head_specs();
        match fresh {
            None => {
                for s in &head_specs {
                    match self.tensors.get(&s.name) {
                        Some(t) if t.dims() == s.shape.as_slice() => {
                            tensors.insert(s.name.clone(), t.clone());
                        }
                        _ => {
                            return Err(ModelError::KeyMismatch {
                                path: self.dir.join(WEIGHTS_FILE),
                                arch: format!("a {head} head for {classes} classes"),
                                detail: format!("no {} of shape {:?}", s.name, s.shape),
                            })
                        }
                    }
                }
            }
            Some(seed) => {
                let fresh = ParamStore::init(&head_specs, seed, &Device::Cpu)?;
                for (name, t, _) in fresh.iter() {
                    tensors.insert(name.to_owned(), t);
                }
            }
        }
        let store = ParamStore::from_tensors(
            &spec.param_specs(),
            tensors,
            &self.dir.join(WEIGHTS_FILE),
            &format!(
                "bert ({} layers, hidden {})",
                spec.config.num_hidden_layers, spec.config.hidden_size
            ),
        )?;
        Ok((spec, store))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, max_rel_diff, randn};
    use candle_core::Var;

    fn tiny(head: TextHead) -> BertSpec {
        BertSpec {
            config: BertConfig {
                vocab_size: 30,
                hidden_size: 8,
                num_hidden_layers: 2,
                num_attention_heads: 2,
                intermediate_size: 16,
                max_position_embeddings: 16,
                // Larger than BERT's 0.02, so that attention and GELU are far from linear.
                initializer_range: 0.5,
                ..BertConfig::all_minilm_l6()
            },
            classes: 3,
            head,
        }
    }

    fn ids(rows: &[&[u32]]) -> TokenBatch {
        TokenBatch::padded(rows, None, 0, &Device::Cpu).unwrap()
    }

    /// Every gradient the model gives — the input embeddings' and a sample of every weight
    /// tensor's — agrees with central finite differences in f64, for each head, with padding in
    /// the batch.
    #[test]
    fn gradients_match_finite_differences_in_f64() {
        for head in [TextHead::Cls, TextHead::Mean, TextHead::Mlp(4)] {
            let spec = tiny(head);
            let store = ParamStore::init(&spec.param_specs(), 3, &Device::Cpu)
                .unwrap()
                .cast(DType::F64)
                .unwrap();
            let model = Bert::new(spec.clone(), &store).unwrap();
            let batch = ids(&[&[2, 7, 9, 4, 3], &[2, 11, 3]]);
            let words = Var::from_tensor(&model.word_embeddings(&batch.ids).unwrap()).unwrap();
            // A fixed, uneven weighting of the logits: every class's gradient counts.
            let coef = randn((2, 3), 0.0, 1.0, DType::F64, 9);
            let loss = |w: &Tensor| -> Tensor {
                let logits = model
                    .forward_embeds(w, &batch.type_ids, &batch.mask, Mode::Eval, None)
                    .unwrap();
                (logits * &coef).unwrap().sum_all().unwrap()
            };
            let grads = loss(words.as_tensor()).backward().unwrap();

            let mut max_err = 0f64;
            let mut check = |var: &Var, name: &str, every: usize| {
                let g: Vec<f64> = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{head}: no gradient for {name}"))
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap();
                let base: Vec<f64> = var.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
                let shape = var.as_tensor().shape().clone();
                for i in (0..base.len()).step_by(every) {
                    let mut f = |v: &[f64]| -> f64 {
                        var.set(&Tensor::from_vec(v.to_vec(), &shape, &Device::Cpu).unwrap())
                            .unwrap();
                        let l = loss(words.as_tensor()).to_scalar::<f64>().unwrap();
                        l
                    };
                    let fd = central_difference(&mut f, &base, i);
                    var.set(&Tensor::from_vec(base.clone(), &shape, &Device::Cpu).unwrap())
                        .unwrap();
                    let err = (fd - g[i]).abs() / (1.0 + fd.abs());
                    assert!(
                        err < 1e-6,
                        "{head} {name}[{i}]: backward {} vs FD {fd}",
                        g[i]
                    );
                    max_err = max_err.max(err);
                }
            };
            check(&words, "input embeddings", 7);
            let mut names = vec![
                "bert.embeddings.position_embeddings.weight",
                "bert.embeddings.LayerNorm.weight",
                "bert.encoder.layer.0.attention.self.query.weight",
                "bert.encoder.layer.0.attention.self.key.bias",
                "bert.encoder.layer.1.attention.self.value.weight",
                "bert.encoder.layer.1.attention.output.LayerNorm.bias",
                "bert.encoder.layer.1.intermediate.dense.weight",
                "bert.encoder.layer.1.output.dense.weight",
            ];
            names.extend(match head {
                TextHead::Cls => vec!["bert.pooler.dense.weight", "classifier.weight"],
                TextHead::Mean => vec!["classifier.weight", "classifier.bias"],
                TextHead::Mlp(_) => vec!["classifier.0.weight", "classifier.2.bias"],
            });
            for name in names {
                check(store.var(name).unwrap(), name, 5);
            }
            eprintln!("{head}: max relative error against finite differences {max_err:.1e}");
        }
    }

    /// With frozen weights in eval mode and no hook, each layer is one op (`bert_layer`): its
    /// logits and input gradient are the composed layers' (a no-op hook forces those), with
    /// padding in the batch, in f64 and f32; in f64 its input gradient agrees with central
    /// finite differences.
    #[test]
    fn fused_layers_match_the_composed_ones() {
        for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-5)] {
            let spec = tiny(TextHead::Cls);
            let store = ParamStore::init(&spec.param_specs(), 4, &Device::Cpu)
                .unwrap()
                .frozen_as(dtype)
                .unwrap();
            let model = Bert::new(spec, &store).unwrap();
            let batch = ids(&[&[2, 7, 9, 4, 12, 3], &[2, 11, 3]]);
            let words = Var::from_tensor(&model.word_embeddings(&batch.ids).unwrap()).unwrap();
            let coef = randn((2, 3), 0.0, 1.0, dtype, 9);
            let run = |composed: bool| -> (Tensor, Tensor) {
                let mut noop = |_: &str, _: &Tensor| -> Result<Option<Tensor>> { Ok(None) };
                let hook: Option<Hook> = composed.then_some(&mut noop);
                let logits = model
                    .forward_embeds(
                        words.as_tensor(),
                        &batch.type_ids,
                        &batch.mask,
                        Mode::Eval,
                        hook,
                    )
                    .unwrap();
                let g = (&logits * &coef)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                (logits, g.get(words.as_tensor()).unwrap().clone())
            };
            let ((l0, g0), (l1, g1)) = (run(false), run(true));
            let (el, eg) = (max_rel_diff(&l0, &l1), max_rel_diff(&g0, &g1));
            assert!(
                el < tol && eg < tol,
                "{dtype:?}: logits {el:.1e}, gradient {eg:.1e}"
            );
            if dtype != DType::F64 {
                continue;
            }
            let g: Vec<f64> = g0.flatten_all().unwrap().to_vec1().unwrap();
            let base: Vec<f64> = words.as_tensor().flatten_all().unwrap().to_vec1().unwrap();
            let shape = words.as_tensor().shape().clone();
            let mut f = |v: &[f64]| -> f64 {
                let w = Tensor::from_vec(v.to_vec(), &shape, &Device::Cpu).unwrap();
                let logits = model
                    .forward_embeds(&w, &batch.type_ids, &batch.mask, Mode::Eval, None)
                    .unwrap();
                (logits * &coef)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar()
                    .unwrap()
            };
            for i in (0..base.len()).step_by(5) {
                let fd = central_difference(&mut f, &base, i);
                assert!(
                    (fd - g[i]).abs() < 1e-6 * (1.0 + fd.abs()),
                    "[{i}]: {} vs {fd}",
                    g[i]
                );
            }
        }
    }

    /// Padding is invisible: a sentence alone and in a padded batch get the same logits.
    #[test]
    fn padding_does_not_change_the_logits() {
        for head in [TextHead::Cls, TextHead::Mean] {
            let spec = tiny(head);
            let store = ParamStore::init(&spec.param_specs(), 5, &Device::Cpu).unwrap();
            let model = Bert::new(spec, &store).unwrap();
            let alone: Vec<f32> = model
                .forward(&ids(&[&[2, 13, 3]]), Mode::Eval)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let batch = ids(&[&[2, 5, 6, 7, 8, 3], &[2, 13, 3]]);
            assert_eq!(
                batch.ids.to_vec2::<u32>().unwrap()[1],
                [2, 13, 3, 0, 0, 0],
                "padded at the end with the pad id"
            );
            assert_eq!(
                batch.mask.to_vec2::<u32>().unwrap(),
                [[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0]]
            );
            let padded = model.forward(&batch, Mode::Eval).unwrap();
            let padded: Vec<f32> = padded.get(1).unwrap().to_vec1().unwrap();
            for (a, b) in alone.iter().zip(&padded) {
                assert!((a - b).abs() < 1e-5, "{head}: {alone:?} vs {padded:?}");
            }
        }
    }

    /// On a real batch in train mode, every tensor on the gradient path gets a non-zero
    /// gradient: a fused op without backward anywhere would leave some all zero (silently).
    #[test]
    fn every_weight_on_the_gradient_path_gets_a_gradient() {
        for head in [TextHead::Cls, TextHead::Mean] {
            let spec = tiny(head);
            let store = ParamStore::init(&spec.param_specs(), 7, &Device::Cpu).unwrap();
            let model = Bert::new(spec, &store).unwrap();
            model.reseed_dropout(1);
            let logits = model
                .forward(
                    &ids(&[&[2, 7, 9, 4, 3], &[2, 11, 3], &[2, 8, 8, 3]]),
                    Mode::Train,
                )
                .unwrap();
            let grads = logits.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            for (name, var) in store.trainable_vars() {
                // The mean head does not read the pooler.
                if head == TextHead::Mean && name.contains("pooler") {
                    assert!(grads.get(var.as_tensor()).is_none(), "{name}");
                    continue;
                }
                let g = grads
                    .get(var.as_tensor())
                    .unwrap_or_else(|| panic!("{head}: {name} has no gradient"));
                let norm = g
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(norm > 0.0, "{head}: {name}'s gradient is all zero");
            }
        }
    }

    #[test]
    fn dropout_is_seeded_and_off_in_eval() {
        let spec = tiny(TextHead::Cls);
        let store = ParamStore::init(&spec.param_specs(), 2, &Device::Cpu).unwrap();
        let model = Bert::new(spec, &store).unwrap();
        let batch = ids(&[&[2, 7, 9, 4, 3]]);
        let run = |mode, seed| -> Vec<f32> {
            model.reseed_dropout(seed);
            let t = model.forward(&batch, mode).unwrap();
            t.flatten_all().unwrap().to_vec1().unwrap()
        };
        assert_eq!(run(Mode::Train, 4), run(Mode::Train, 4));
        assert_ne!(run(Mode::Train, 4), run(Mode::Train, 5));
        assert_eq!(run(Mode::Eval, 4), run(Mode::Eval, 5));
        assert_ne!(run(Mode::Train, 4), run(Mode::Eval, 4));
    }

    #[test]
    fn bad_folders_and_settings_are_named() {
        let d = tempfile::tempdir().unwrap();
        let err = |dir: &Path| read_hf_folder(dir).err().unwrap().to_string();
        let e = err(d.path());
        assert!(
            e.contains("config.json") && e.contains("not a Hugging Face model folder"),
            "{e}"
        );
        let mut cfg = serde_json::to_value(tiny(TextHead::Cls).config).unwrap();
        cfg["model_type"] = "gpt2".into();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        let e = err(d.path());
        assert!(
            e.contains("model_type `gpt2` is not supported (supported: bert)"),
            "{e}"
        );
        cfg["model_type"] = "bert".into();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        let e = err(d.path());
        assert!(e.contains("model.safetensors: missing"), "{e}");
        // A vocabulary that disagrees with the embedding matrix.
        let spec = tiny(TextHead::Cls);
        let store = ParamStore::init(&spec.encoder_specs(), 1, &Device::Cpu).unwrap();
        let tensors: Vec<(String, Tensor)> = store
            .iter()
            .map(|(n, t, _)| (n.trim_start_matches(ENCODER).to_owned(), t))
            .collect();
        candle_core::safetensors::save(
            &tensors
                .into_iter()
                .collect::<std::collections::HashMap<_, _>>(),
            d.path().join(WEIGHTS_FILE),
        )
        .unwrap();
        let folder = read_hf_folder(d.path()).unwrap();
        assert_eq!(folder.classes, None);
        let (_, store) = folder.store(TextHead::Mean, 2, 0).unwrap();
        let e = folder
            .store_with_head(TextHead::Cls, 2)
            .err()
            .unwrap()
            .to_string();
        assert!(e.contains("no classifier.weight of shape [2, 8]"), "{e}");
        assert!(store.contains("bert.encoder.layer.1.output.LayerNorm.weight"));
        cfg["vocab_size"] = 31.into();
        std::fs::write(d.path().join("config.json"), cfg.to_string()).unwrap();
        let e = err(d.path());
        assert!(
            e.contains("vocab_size is 31 but") && e.contains("30 word embeddings"),
            "{e}"
        );
        assert!("mlp:0".parse::<TextHead>().is_err());
        assert_eq!("mlp:8".parse::<TextHead>().unwrap(), TextHead::Mlp(8));
    }
}
