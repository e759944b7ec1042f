//! Small classifiers with known attributions, and seeded inputs, for this crate's tests.

use candle_core::{DType, Device, Tensor};
use finelens_models::resnet::Hook;
use finelens_models::{Classifier, Mode};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

pub fn randn(dims: (usize, usize, usize, usize), dtype: DType, seed: u64) -> Tensor {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let n = dims.0 * dims.1 * dims.2 * dims.3;
    let v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(&mut rng)).collect();
    Tensor::from_vec(v, dims, &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

/// F(x) = W·vec(x) + b: integrated gradients is exactly (x − x′) ⊙ W for it.
pub struct LinearModel {
    /// K × (C·H·W).
    pub weight: Tensor,
    pub bias: Tensor,
}

impl Classifier for LinearModel {
    fn forward_hooked(
        &self,
        x: &Tensor,
        _: Mode,
        _: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        let flat = x.flatten_from(1)?;
        Ok(flat.matmul(&self.weight.t()?)?.broadcast_add(&self.bias)?)
    }
    fn layer_names(&self) -> Vec<String> {
        vec!["fc".into()]
    }
    fn num_classes(&self) -> usize {
        self.weight.dim(0).unwrap()
    }
}

/// Two logits. Logit 0 = Σ over the top-left quadrant of channel 0 of x², so only that quadrant
/// matters; logit 1 = the mean of ReLU(`features`) over channel 1 of the region rows 0..h/2,
/// columns w/2..w of an inner layer `features` = x itself, named for Grad-CAM.
pub struct RegionModel;

impl Classifier for RegionModel {
    fn forward_hooked(
        &self,
        x: &Tensor,
        _: Mode,
        mut hook: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let mut feat = x.clone();
        if let Some(hk) = hook.as_mut() {
            if let Some(r) = hk("features", &feat)? {
                feat = r;
            }
        }
        let quadrant = feat
            .narrow(1, 0, 1)?
            .narrow(2, 0, h / 2)?
            .narrow(3, 0, w / 2)?
            .sqr()?
            .flatten_from(1)?
            .sum_keepdim(1)?;
        let region = feat
            .narrow(1, 1, 1)?
            .narrow(2, 0, h / 2)?
            .narrow(3, w / 2, w - w / 2)?
            .relu()?
            .flatten_from(1)?
            .mean_keepdim(1)?;
        let logits = Tensor::cat(&[quadrant, region], 1)?;
        if let Some(hk) = hook.as_mut() {
            if let Some(r) = hk("fc", &logits)? {
                return Ok(r);
            }
        }
        Ok(logits)
    }
    fn layer_names(&self) -> Vec<String> {
        vec!["features".into(), "fc".into()]
    }
    fn num_classes(&self) -> usize {
        2
    }
    fn last_spatial_layer(&self) -> Option<String> {
        Some("features".into())
    }
}

/// ImageNet's normalisation, the fixtures'.
pub const IMAGENET: crate::Normalisation = crate::Normalisation {
    mean: finelens_models::checkpoint::IMAGENET_MEAN,
    std: finelens_models::checkpoint::IMAGENET_STD,
};

/// The shipped pretrained resnet-mini, frozen, in `dtype`.
pub fn fixture_model(dtype: DType) -> finelens_models::ResNet {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/resnet-mini-pretrain.safetensors");
    let ck = finelens_models::checkpoint::load(&path, None).unwrap();
    let store = ck.store.frozen_as(dtype).unwrap();
    finelens_models::ResNet::new(ck.config().unwrap(), &store).unwrap()
}

/// A synthetic pretraining-task image (64×64, the fixture's input), normalised, 1×3×64×64.
pub fn fixture_image(class: usize, index: usize, dtype: DType) -> Tensor {
    use finelens_data::synth::{render, Split, SynthConfig, Task};
    let cfg = SynthConfig::default();
    let img = render(Task::Pretrain, Split::Test, class, index, &cfg).image;
    let pre = finelens_data::transforms::Preprocess {
        size: 64,
        crop_pct: 1.0,
        mean: finelens_models::checkpoint::IMAGENET_MEAN,
        std: finelens_models::checkpoint::IMAGENET_STD,
    };
    Tensor::from_vec(pre.normalise(&img), (1, 3, 64, 64), &Device::Cpu)
        .unwrap()
        .to_dtype(dtype)
        .unwrap()
}

pub fn flat(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}
