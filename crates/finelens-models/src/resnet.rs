//! ResNet (He et al. 2016) with torchvision's module and parameter names, so that
//! `layer2.0.downsample.1.running_var` here is the same tensor as in `model.state_dict()`.
//! ResNet-18/34 use the basic block, ResNet-50 the bottleneck (torchvision's "v1.5": stride on the
//! 3×3 convolution). `resnet-mini` keeps ResNet-18's structure and names at a quarter of the
//! width, for 64×64 inputs, fixtures and tests.

use candle_core::Tensor;
use serde::{Deserialize, Serialize};

use crate::describe::{InputKind, ModelDescription, Stage};
use crate::error::{ModelError, Result};
use crate::nn::{
    affine_parts, bn_specs, conv_bn, conv_bn_relu, conv_specs, linear_specs, BatchNorm2d, Conv2d,
    Linear, Mode,
};
use crate::params::{ParamSpec, ParamStore};
use crate::pool::{max_pool2d, Pool2d};
use crate::relu::{add_relu, relu};
use crate::residual_block::{residual_block, Folded};
use crate::rules::{backward_rule, BackwardRule};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    Basic,
    Bottleneck,
}

impl BlockKind {
    fn expansion(self) -> usize {
        match self {
            BlockKind::Basic => 1,
            BlockKind::Bottleneck => 4,
        }
    }
}

/// The architectures finelens knows, by the names users type (`--arch resnet18`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Arch {
    #[serde(rename = "resnet18")]
    ResNet18,
    #[serde(rename = "resnet34")]
    ResNet34,
    #[serde(rename = "resnet50")]
    ResNet50,
    #[serde(rename = "resnet-mini")]
    ResNetMini,
}

impl Arch {
    pub const ALL: [Arch; 4] = [
        Arch::ResNet18,
        Arch::ResNet34,
        Arch::ResNet50,
        Arch::ResNetMini,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Arch::ResNet18 => "resnet18",
            Arch::ResNet34 => "resnet34",
            Arch::ResNet50 => "resnet50",
            Arch::ResNetMini => "resnet-mini",
        }
    }

    pub fn parse(s: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|a| a.name() == s)
            .ok_or_else(|| ModelError::UnknownArch(s.to_owned()))
    }

    /// The input side length the architecture was designed for.
    pub fn default_input_size(self) -> usize {
        match self {
            Arch::ResNetMini => 64,
            _ => 224,
        }
    }

    fn block(self) -> BlockKind {
        match self {
            Arch::ResNet50 => BlockKind::Bottleneck,
            _ => BlockKind::Basic,
        }
    }

    fn depths(self) -> [usize; 4] {
        match self {
            Arch::ResNet18 | Arch::ResNetMini => [2, 2, 2, 2],
            Arch::ResNet34 | Arch::ResNet50 => [3, 4, 6, 3],
        }
    }

    fn widths(self) -> [usize; 4] {
        match self {
            Arch::ResNetMini => [16, 32, 64, 128],
            _ => [64, 128, 256, 512],
        }
    }

    fn stem_width(self) -> usize {
        self.widths()[0]
    }

    /// Width of the globally pooled features that the head sees.
    pub fn feature_dim(self) -> usize {
        self.widths()[3] * self.block().expansion()
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// The classifier head after global average pooling: torchvision's `fc = nn.Linear`, or the
/// Keras-style `fc = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, classes))`
/// (parameter names `fc.0.*` and `fc.2.*`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase", tag = "kind")]
pub enum Head {
    Linear,
    Mlp { hidden: usize },
}

impl Head {
    /// Parses `linear` or `mlp:N`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "linear" => Ok(Head::Linear),
            _ => s
                .strip_prefix("mlp:")
                .and_then(|n| n.parse::<usize>().ok())
                .filter(|&n| n > 0)
                .map(|hidden| Head::Mlp { hidden })
                .ok_or_else(|| ModelError::UnknownHead(s.to_owned())),
        }
    }

    /// Parameter-name prefixes of the head (what a head replacement re-initialises).
    pub fn prefixes(self) -> &'static [&'static str] {
        match self {
            Head::Linear => &["fc."],
            Head::Mlp { .. } => &["fc.0.", "fc.2."],
        }
    }
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Head::Linear => f.write_str("linear"),
            Head::Mlp { hidden } => write!(f, "mlp:{hidden}"),
        }
    }
}

/// Everything needed to lay out a model's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelConfig {
    pub arch: Arch,
    pub num_classes: usize,
    pub head: Head,
}

impl ModelConfig {
    pub fn new(arch: Arch, num_classes: usize, head: Head) -> Result<Self> {
        if num_classes == 0 {
            return Err(ModelError::Config(
                "the model needs at least one class".into(),
            ));
        }
        Ok(Self {
            arch,
            num_classes,
            head,
        })
    }

    /// Every tensor of the model with its torchvision state-dict name, in network order.
    /// The network's stages (stem, layer1…layer4, head), representation layers (each stage's
    /// output and the pooled embedding) and head, from the configuration alone.
    pub fn describe(&self) -> ModelDescription {
        let depths = self.arch.depths();
        let mut stages = vec![Stage {
            name: "stem".into(),
            prefixes: vec!["conv1.".into(), "bn1.".into()],
            blocks: Vec::new(),
        }];
        for (i, &d) in depths.iter().enumerate() {
            let name = format!("layer{}", i + 1);
            stages.push(Stage {
                prefixes: vec![format!("{name}.")],
                blocks: (0..d).map(|b| format!("{name}.{b}")).collect(),
                name,
            });
        }
        let head: Vec<String> = self.head.prefixes().iter().map(|p| p.to_string()).collect();
        stages.push(Stage {
            name: "fc".into(),
            prefixes: vec!["fc.".into()],
            blocks: Vec::new(),
        });
        let mut representation_layers: Vec<String> =
            (1..=depths.len()).map(|i| format!("layer{i}")).collect();
        representation_layers.push("avgpool".into());
        ModelDescription {
            input: InputKind::Image { channels: 3 },
            stages,
            representation_layers,
            embedding_layer: "avgpool".into(),
            head_prefixes: head,
            last_spatial_layer: Some(format!("layer{}", depths.len())),
        }
    }

    pub fn param_specs(&self) -> Vec<ParamSpec> {
        let a = self.arch;
        let mut s = Vec::new();
        conv_specs(&mut s, "conv1", a.stem_width(), 3, 7);
        bn_specs(&mut s, "bn1", a.stem_width());
        let mut inplanes = a.stem_width();
        for (li, (&depth, &width)) in a.depths().iter().zip(a.widths().iter()).enumerate() {
            for bi in 0..depth {
                let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                let p = format!("layer{}.{}", li + 1, bi);
                let out = width * a.block().expansion();
                match a.block() {
                    BlockKind::Basic => {
                        conv_specs(&mut s, &format!("{p}.conv1"), width, inplanes, 3);
                        bn_specs(&mut s, &format!("{p}.bn1"), width);
                        conv_specs(&mut s, &format!("{p}.conv2"), width, width, 3);
                        bn_specs(&mut s, &format!("{p}.bn2"), width);
                    }
                    BlockKind::Bottleneck => {
                        conv_specs(&mut s, &format!("{p}.conv1"), width, inplanes, 1);
                        bn_specs(&mut s, &format!("{p}.bn1"), width);
                        conv_specs(&mut s, &format!("{p}.conv2"), width, width, 3);
                        bn_specs(&mut s, &format!("{p}.bn2"), width);
                        conv_specs(&mut s, &format!("{p}.conv3"), out, width, 1);
                        bn_specs(&mut s, &format!("{p}.bn3"), out);
                    }
                }
                if stride != 1 || inplanes != out {
                    conv_specs(&mut s, &format!("{p}.downsample.0"), out, inplanes, 1);
                    bn_specs(&mut s, &format!("{p}.downsample.1"), out);
                }
                inplanes = out;
            }
        }
        match self.head {
            Head::Linear => linear_specs(&mut s, "fc", self.num_classes, a.feature_dim()),
            Head::Mlp { hidden } => {
                linear_specs(&mut s, "fc.0", hidden, a.feature_dim());
                linear_specs(&mut s, "fc.2", self.num_classes, hidden);
            }
        }
        s
    }
}

struct Block {
    name: String,
    convs: Vec<(Conv2d, BatchNorm2d)>,
    downsample: Option<(Conv2d, BatchNorm2d)>,
}

impl Block {
    fn load(store: &ParamStore, p: &str, kind: BlockKind, stride: usize) -> Result<Self> {
        let cb = |i: usize, stride: usize, pad: usize| -> Result<(Conv2d, BatchNorm2d)> {
            Ok((
                Conv2d::load(store, &format!("{p}.conv{i}"), stride, pad)?,
                BatchNorm2d::load(store, &format!("{p}.bn{i}"))?,
            ))
        };
        let convs = match kind {
            BlockKind::Basic => vec![cb(1, stride, 1)?, cb(2, 1, 1)?],
            BlockKind::Bottleneck => vec![cb(1, 1, 0)?, cb(2, stride, 1)?, cb(3, 1, 0)?],
        };
        let downsample = if store.contains(&format!("{p}.downsample.0.weight")) {
            Some((
                Conv2d::load(store, &format!("{p}.downsample.0"), stride, 0)?,
                BatchNorm2d::load(store, &format!("{p}.downsample.1"))?,
            ))
        } else {
            None
        };
        Ok(Self {
            name: p.to_owned(),
            convs,
            downsample,
        })
    }

    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        if let Some((convs, downsample)) = self.frozen(x, mode)? {
            return Ok(residual_block(x, &convs, downsample.as_ref())?);
        }
        let mut h = x.clone();
        let last = self.convs.len() - 1;
        for (i, (conv, bn)) in self.convs.iter().enumerate() {
            h = if i != last {
                conv_bn_relu(conv, bn, &h, mode)?
            } else {
                conv_bn(conv, bn, &h, mode)?
            };
        }
        let identity = match &self.downsample {
            Some((conv, bn)) => conv_bn(conv, bn, x, mode)?,
            None => x.clone(),
        };
        Ok(add_relu(&h, &identity)?)
    }
}

impl Block {
    /// The block's convolutions with their batch norms folded in, when every batch norm is
    /// affine and nothing is trained (and gradients are plain gradients): then the block runs
    /// as one op ([`residual_block`]) — the same function with a fifth of the graph.
    #[allow(clippy::type_complexity)]
    fn frozen(&self, x: &Tensor, mode: Mode) -> Result<Option<(Vec<Folded>, Option<Folded>)>> {
        if backward_rule() != BackwardRule::Gradient || !x.device().is_cpu() {
            return Ok(None);
        }
        // The scale stays apart from the kernel: the op applies it where it costs least.
        let fold = |(conv, bn): &(Conv2d, BatchNorm2d)| -> Result<Option<Folded>> {
            Ok(affine_parts(conv, bn, mode)?
                .filter(|(w, s, t)| !w.track_op() && !s.track_op() && !t.track_op())
                .map(|(w, s, t)| (w, s, t, conv.stride, conv.padding)))
        };
        let mut convs = Vec::with_capacity(self.convs.len());
        for cb in &self.convs {
            match fold(cb)? {
                Some(f) => convs.push(f),
                None => return Ok(None),
            }
        }
        let downsample = match &self.downsample {
            Some(cb) => match fold(cb)? {
                Some(f) => Some(f),
                None => return Ok(None),
            },
            None => None,
        };
        Ok(Some((convs, downsample)))
    }
}

enum HeadLayers {
    Linear(Linear),
    Mlp(Linear, Linear),
}

/// A ResNet built from a [`ParamStore`]; cheap to rebuild (it holds shared tensors).
pub struct ResNet {
    config: ModelConfig,
    conv1: Conv2d,
    bn1: BatchNorm2d,
    layers: Vec<Vec<Block>>,
    head: HeadLayers,
}

/// The stem's max pool: 3×3, stride 2, padding 1.
const STEM_POOL: Pool2d = Pool2d {
    kernel: 3,
    stride: 2,
    padding: 1,
};

impl ResNet {
    pub fn new(config: ModelConfig, store: &ParamStore) -> Result<Self> {
        let a = config.arch;
        let mut layers = Vec::new();
        for (li, &depth) in a.depths().iter().enumerate() {
            let blocks = (0..depth)
                .map(|bi| {
                    let stride = if li > 0 && bi == 0 { 2 } else { 1 };
                    Block::load(store, &format!("layer{}.{}", li + 1, bi), a.block(), stride)
                })
                .collect::<Result<Vec<_>>>()?;
            layers.push(blocks);
        }
        let head = match config.head {
            Head::Linear => HeadLayers::Linear(Linear::load(store, "fc")?),
            Head::Mlp { .. } => {
                HeadLayers::Mlp(Linear::load(store, "fc.0")?, Linear::load(store, "fc.2")?)
            }
        };
        Ok(Self {
            config,
            conv1: Conv2d::load(store, "conv1", 2, 3)?,
            bn1: BatchNorm2d::load(store, "bn1")?,
            layers,
            head,
        })
    }

    pub fn config(&self) -> ModelConfig {
        self.config
    }
}

/// Sees every named activation in network order and may replace it (return `Some`) — how
/// Grad-CAM, CKA and layer attributions reach inside the network.
pub type Hook<'a> = &'a mut dyn FnMut(&str, &Tensor) -> Result<Option<Tensor>>;

fn tap(hook: &mut Option<Hook>, name: &str, t: Tensor) -> Result<Tensor> {
    match hook {
        Some(h) => Ok(h(name, &t)?.unwrap_or(t)),
        None => Ok(t),
    }
}

/// A classifier over N×3×H×W normalised images: what every analysis crate programs against,
/// so that other model families can join later.
pub trait Classifier {
    /// Logits, N × classes.
    fn forward(&self, x: &Tensor, mode: Mode) -> Result<Tensor> {
        self.forward_hooked(x, mode, None)
    }

    /// Forward with a hook over the named activations (see [`Classifier::layer_names`]).
    fn forward_hooked(&self, x: &Tensor, mode: Mode, hook: Option<Hook>) -> Result<Tensor>;

    /// The names the hook sees, in network order.
    fn layer_names(&self) -> Vec<String>;

    fn num_classes(&self) -> usize;

    /// The last activation with spatial extent, Grad-CAM's default layer.
    fn last_spatial_layer(&self) -> Option<String> {
        self.describe().last_spatial_layer
    }

    /// The model's stages, representation and embedding layers, head and input kind: what the
    /// analyses need to treat every model family alike. The default suits small test models: no
    /// stages, every named activation a representation, the head's input the embedding.
    fn describe(&self) -> ModelDescription {
        let names = self.layer_names();
        ModelDescription {
            input: InputKind::Image { channels: 3 },
            stages: Vec::new(),
            representation_layers: names.clone(),
            embedding_layer: names
                .iter()
                .rev()
                .nth(1)
                .or(names.last())
                .cloned()
                .unwrap_or_default(),
            head_prefixes: Vec::new(),
            last_spatial_layer: None,
        }
    }

    /// An error naming the valid layers when `name` is not one of them.
    fn check_layer(&self, name: &str) -> Result<()> {
        let names = self.layer_names();
        if names.iter().any(|n| n == name) {
            Ok(())
        } else {
            Err(ModelError::UnknownLayer {
                name: name.to_owned(),
                known: names.join(", "),
            })
        }
    }

    /// Logits plus the activations at `layers` (which must be valid names).
    fn forward_with_taps(
        &self,
        x: &Tensor,
        mode: Mode,
        layers: &[&str],
    ) -> Result<(Tensor, Vec<Tensor>)> {
        for l in layers {
            self.check_layer(l)?;
        }
        let mut taken: Vec<Option<Tensor>> = vec![None; layers.len()];
        let mut hook = |name: &str, t: &Tensor| -> Result<Option<Tensor>> {
            for (i, l) in layers.iter().enumerate() {
                if *l == name {
                    taken[i] = Some(t.clone());
                }
            }
            Ok(None)
        };
        let logits = self.forward_hooked(x, mode, Some(&mut hook))?;
        let taps = taken
            .into_iter()
            .map(|t| t.expect("every valid layer is visited"))
            .collect();
        Ok((logits, taps))
    }
}

impl Classifier for ResNet {
    fn forward_hooked(&self, x: &Tensor, mode: Mode, mut hook: Option<Hook>) -> Result<Tensor> {
        let h = if hook.is_none() {
            // Nobody taps conv1, bn1 or relu: fold an eval-mode bn1 into conv1, as in the blocks,
            // or let a train-mode one apply the ReLU.
            conv_bn_relu(&self.conv1, &self.bn1, x, mode)?
        } else {
            let h = tap(&mut hook, "conv1", self.conv1.forward(x)?)?;
            let h = tap(&mut hook, "bn1", self.bn1.forward(&h, mode)?)?;
            tap(&mut hook, "relu", relu(&h)?)?
        };
        let mut h = tap(&mut hook, "maxpool", max_pool2d(&h, STEM_POOL)?)?;
        for (li, blocks) in self.layers.iter().enumerate() {
            for b in blocks {
                h = tap(&mut hook, &b.name, b.forward(&h, mode)?)?;
            }
            h = tap(&mut hook, &format!("layer{}", li + 1), h)?;
        }
        // adaptive_avg_pool2d to 1×1 is a plain mean (and differentiable in candle), then flatten.
        let h = tap(&mut hook, "avgpool", h.mean((2, 3))?)?;
        match &self.head {
            HeadLayers::Linear(fc) => tap(&mut hook, "fc", fc.forward(&h)?),
            HeadLayers::Mlp(fc0, fc2) => {
                let z = tap(&mut hook, "fc.0", fc0.forward(&h)?)?;
                let z = tap(&mut hook, "fc.1", relu(&z)?)?;
                tap(&mut hook, "fc", fc2.forward(&z)?)
            }
        }
    }

    fn layer_names(&self) -> Vec<String> {
        let mut names: Vec<String> = ["conv1", "bn1", "relu", "maxpool"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (li, blocks) in self.layers.iter().enumerate() {
            names.extend(blocks.iter().map(|b| b.name.clone()));
            names.push(format!("layer{}", li + 1));
        }
        names.push("avgpool".into());
        if let HeadLayers::Mlp(..) = self.head {
            names.extend(["fc.0".to_string(), "fc.1".to_string()]);
        }
        names.push("fc".into());
        names
    }

    fn num_classes(&self) -> usize {
        self.config.num_classes
    }

    fn describe(&self) -> ModelDescription {
        self.config.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{central_difference, randn};
    use candle_core::{DType, Device, Var};

    fn mini(classes: usize, head: Head) -> (ModelConfig, ParamStore) {
        let cfg = ModelConfig::new(Arch::ResNetMini, classes, head).unwrap();
        let store = ParamStore::init(&cfg.param_specs(), 1, &Device::Cpu).unwrap();
        (cfg, store)
    }

    #[test]
    fn parameter_names_and_counts_match_torchvision() {
        // Counts of `sum(p.numel() for p in model.parameters())` and `len(model.state_dict())`
        // for torchvision's resnet18/34/50 with 1000 classes.
        for (arch, params, keys) in [
            (Arch::ResNet18, 11_689_512, 122),
            (Arch::ResNet34, 21_797_672, 218),
            (Arch::ResNet50, 25_557_032, 320),
        ] {
            let specs = ModelConfig::new(arch, 1000, Head::Linear)
                .unwrap()
                .param_specs();
            let n: usize = specs
                .iter()
                .filter(|s| s.kind == crate::params::ParamKind::Weight)
                .map(|s| s.shape.iter().product::<usize>())
                .sum();
            assert_eq!(n, params, "{arch}");
            assert_eq!(specs.len(), keys, "{arch}");
        }
        let names: Vec<String> = ModelConfig::new(Arch::ResNet18, 10, Head::Linear)
            .unwrap()
            .param_specs()
            .into_iter()
            .map(|s| s.name)
            .collect();
        for k in [
            "conv1.weight",
            "bn1.running_mean",
            "layer1.0.conv1.weight",
            "layer2.0.downsample.0.weight",
            "layer2.0.downsample.1.bias",
            "layer4.1.bn2.num_batches_tracked",
            "fc.weight",
        ] {
            assert!(names.iter().any(|n| n == k), "{k} missing");
        }
        assert!(!names.iter().any(|n| n == "layer1.0.downsample.0.weight"));
    }

    #[test]
    fn forward_shapes_and_taps() {
        let (cfg, store) = mini(5, Head::Mlp { hidden: 32 });
        let m = ResNet::new(cfg, &store).unwrap();
        let x = randn((2, 3, 64, 64), 0.0, 1.0, DType::F32, 0);
        let (logits, taps) = m
            .forward_with_taps(
                &x,
                Mode::Eval,
                &["conv1", "maxpool", "layer1", "layer4", "avgpool", "fc.1"],
            )
            .unwrap();
        assert_eq!(logits.dims(), &[2, 5]);
        let dims: Vec<Vec<usize>> = taps.iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(
            dims,
            vec![
                vec![2, 16, 32, 32],
                vec![2, 16, 16, 16],
                vec![2, 16, 16, 16],
                vec![2, 128, 2, 2],
                vec![2, 128],
                vec![2, 32]
            ]
        );
        let e = m
            .forward_with_taps(&x, Mode::Eval, &["layer9"])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("unknown layer `layer9`") && e.contains("layer4"),
            "{e}"
        );
    }

    #[test]
    fn resnet50_forward_runs_with_bottlenecks() {
        let cfg = ModelConfig::new(Arch::ResNet50, 3, Head::Linear).unwrap();
        let store = ParamStore::init(&cfg.param_specs(), 0, &Device::Cpu).unwrap();
        let m = ResNet::new(cfg, &store).unwrap();
        let x = randn((1, 3, 64, 64), 0.0, 1.0, DType::F32, 1);
        let (y, t) = m.forward_with_taps(&x, Mode::Eval, &["layer4"]).unwrap();
        assert_eq!(y.dims(), &[1, 3]);
        assert_eq!(t[0].dims(), &[1, 2048, 2, 2]);
    }

    /// Without a hook every eval-mode batch norm is folded into its convolution; with one (any
    /// hook, here one that taps nothing) the stem runs unfolded. Output and input gradient agree.
    #[test]
    fn folded_and_tapped_forward_agree() {
        let (cfg, store) = mini(4, Head::Linear);
        let m = ResNet::new(cfg, &store).unwrap();
        m.forward(&randn((4, 3, 32, 32), 0.5, 2.0, DType::F32, 2), Mode::Train)
            .unwrap();
        let x = Var::from_tensor(&randn((2, 3, 32, 32), 0.0, 1.0, DType::F32, 3)).unwrap();
        let run = |hooked: bool| {
            let mut nothing = |_: &str, _: &Tensor| -> Result<Option<Tensor>> { Ok(None) };
            let hook: Option<Hook> = if hooked { Some(&mut nothing) } else { None };
            let y = m.forward_hooked(&x, Mode::Eval, hook).unwrap();
            let g = y.sum_all().unwrap().backward().unwrap();
            (y, g.get(&x).unwrap().clone())
        };
        let ((y0, g0), (y1, g1)) = (run(false), run(true));
        assert!(crate::testutil::max_rel_diff(&y0, &y1) < 1e-5);
        assert!(crate::testutil::max_rel_diff(&g0, &g1) < 1e-5);
    }

    /// With frozen weights each block is one op (`residual_block`); with trainable ones the
    /// composed ops. Same logits and input gradient, for basic blocks (resnet-mini, strided
    /// blocks with downsamples) and bottlenecks (resnet50), in f64 and f32, odd input sizes.
    #[test]
    fn fused_blocks_match_the_composed_ones() {
        for (arch, size) in [(Arch::ResNetMini, 29), (Arch::ResNet50, 33)] {
            let cfg = ModelConfig::new(arch, 3, Head::Linear).unwrap();
            let store = ParamStore::init(&cfg.param_specs(), 6, &Device::Cpu).unwrap();
            // Running statistics away from their initial values, so the folding is not trivial.
            let warm = randn((4, 3, size, size), 0.5, 2.0, DType::F32, 2);
            ResNet::new(cfg, &store)
                .unwrap()
                .forward(&warm, Mode::Train)
                .unwrap();
            for (dtype, tol) in [(DType::F64, 1e-11), (DType::F32, 2e-5)] {
                let trained = store.cast(dtype).unwrap();
                let frozen = store.frozen_as(dtype).unwrap();
                let x = Var::from_tensor(&randn((2, 3, size, size), 0.0, 1.0, dtype, 3)).unwrap();
                let coef = randn((2, 3), 0.0, 1.0, dtype, 4);
                let run = |s: &ParamStore| {
                    let m = ResNet::new(cfg, s).unwrap();
                    let y = m.forward(x.as_tensor(), Mode::Eval).unwrap();
                    let g = (&y * &coef).unwrap().sum_all().unwrap().backward().unwrap();
                    (y, g.get(x.as_tensor()).unwrap().clone())
                };
                let ((y0, g0), (y1, g1)) = (run(&frozen), run(&trained));
                let (ey, eg) = (
                    crate::testutil::max_rel_diff(&y0, &y1),
                    crate::testutil::max_rel_diff(&g0, &g1),
                );
                assert!(
                    ey < tol && eg < tol,
                    "{arch} {dtype:?}: logits {ey:.1e}, gradient {eg:.1e}"
                );
            }
        }
    }

    /// The whole network's input gradient against central finite differences, in f64 so that
    /// the check is about the graph (pooling routing, batch norm, residuals) and not rounding.
    #[test]
    fn input_gradient_matches_finite_differences() {
        let (cfg, store) = mini(4, Head::Linear);
        // Train the running statistics away from their initial values so eval BN is non-trivial.
        let m = ResNet::new(cfg, &store).unwrap();
        let warm = randn((4, 3, 32, 32), 0.5, 2.0, DType::F32, 2);
        m.forward(&warm, Mode::Train).unwrap();
        let s64 = store.frozen_as(DType::F64).unwrap();
        let m = ResNet::new(cfg, &s64).unwrap();

        let x = randn((1, 3, 24, 24), 0.0, 1.0, DType::F64, 3);
        let xv = Var::from_tensor(&x).unwrap();
        let target = |y: &Tensor| y.narrow(1, 2, 1).unwrap().sum_all().unwrap();
        let g = target(&m.forward(xv.as_tensor(), Mode::Eval).unwrap())
            .backward()
            .unwrap();
        let grad: Vec<f64> = g
            .get(xv.as_tensor())
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let base: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        let mut f = |v: &[f64]| -> f64 {
            let t = Tensor::from_vec(v.to_vec(), x.shape(), &Device::Cpu).unwrap();
            target(&m.forward(&t, Mode::Eval).unwrap())
                .to_scalar()
                .unwrap()
        };
        let scale = grad.iter().fold(0f64, |a, b| a.max(b.abs()));
        let mut worst = 0f64;
        // Every 7th input cell: enough to cover all channels and positions at low cost.
        for i in (0..base.len()).step_by(7) {
            let fd = central_difference(&mut f, &base, i);
            worst = worst.max((fd - grad[i]).abs() / scale);
        }
        assert!(
            worst < 1e-5,
            "max error relative to the largest gradient: {worst:e}"
        );
    }

    /// Weight gradients in train mode (batch statistics, so every sample's output depends on the
    /// whole batch) against central finite differences, in f64. Running statistics change on every
    /// forward in train mode but do not enter the train-mode output, so repeated forwards agree.
    #[test]
    fn train_mode_weight_gradients_match_finite_differences() {
        let cfg = ModelConfig::new(Arch::ResNetMini, 3, Head::Mlp { hidden: 8 }).unwrap();
        let mut specs = cfg.param_specs();
        for s in specs.iter_mut().filter(|s| s.dtype == DType::F32) {
            s.dtype = DType::F64;
        }
        let store = ParamStore::init(&specs, 5, &Device::Cpu).unwrap();
        let m = ResNet::new(cfg, &store).unwrap();
        let x = randn((3, 3, 20, 20), 0.0, 1.0, DType::F64, 4);
        let labels = [0usize, 2, 1];
        // Σ of each sample's logit at its label, weighted to make every row matter differently.
        let objective = |y: &Tensor| -> Tensor {
            let mut total = y
                .narrow(0, 0, 1)
                .unwrap()
                .narrow(1, labels[0], 1)
                .unwrap()
                .sum_all()
                .unwrap();
            for (i, &l) in labels.iter().enumerate().skip(1) {
                let term = y
                    .narrow(0, i, 1)
                    .unwrap()
                    .narrow(1, l, 1)
                    .unwrap()
                    .sum_all()
                    .unwrap();
                total = (total + (term * (i as f64 + 1.0)).unwrap()).unwrap();
            }
            total
        };
        let grads = objective(&m.forward(&x, Mode::Train).unwrap())
            .backward()
            .unwrap();
        for name in [
            "conv1.weight",
            "bn1.weight",
            "layer2.0.downsample.0.weight",
            "layer3.1.bn2.bias",
            "fc.0.weight",
            "fc.2.bias",
        ] {
            let var = store.var(name).unwrap();
            let g: Vec<f64> = grads
                .get(var.as_tensor())
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let base = var.as_detached_tensor().copy().unwrap();
            let flat: Vec<f64> = base.flatten_all().unwrap().to_vec1().unwrap();
            let scale = g.iter().fold(1e-3f64, |a, b| a.max(b.abs()));
            let mut worst = 0f64;
            let mut eval = |v: &[f64]| -> f64 {
                var.set(&Tensor::from_vec(v.to_vec(), base.shape(), &Device::Cpu).unwrap())
                    .unwrap();
                objective(&m.forward(&x, Mode::Train).unwrap())
                    .to_scalar()
                    .unwrap()
            };
            for i in (0..flat.len()).step_by((flat.len() / 6).max(1)) {
                let fd = central_difference(&mut eval, &flat, i);
                worst = worst.max((fd - g[i]).abs() / scale);
            }
            var.set(&base).unwrap();
            assert!(
                worst < 1e-5,
                "{name}: max error relative to the largest gradient {worst:e}"
            );
        }
    }

    #[test]
    fn heads_parse_and_print() {
        assert_eq!(Head::parse("linear").unwrap(), Head::Linear);
        assert_eq!(Head::parse("mlp:1024").unwrap(), Head::Mlp { hidden: 1024 });
        assert_eq!(Head::parse("mlp:1024").unwrap().to_string(), "mlp:1024");
        assert!(Head::parse("mlp:0").is_err());
        assert!(Head::parse("conv").is_err());
        assert_eq!(Arch::parse("resnet-mini").unwrap(), Arch::ResNetMini);
        assert!(Arch::parse("vgg16")
            .unwrap_err()
            .to_string()
            .contains("resnet18"));
    }
}
