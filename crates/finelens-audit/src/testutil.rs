//! What this crate's tests share.

use candle_core::Tensor;
use finelens_models::resnet::Hook;
use finelens_models::{Classifier, Mode};

/// F(x) = w·vec(x) as class 0 and its negation as class 1.
pub struct Linear {
    pub w: Tensor,
}

impl Classifier for Linear {
    fn forward_hooked(
        &self,
        x: &Tensor,
        _: Mode,
        _: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        let one = x.flatten_from(1)?.matmul(&self.w.unsqueeze(1)?)?;
        Ok(Tensor::cat(&[&one, &one.neg()?], 1)?)
    }
    fn layer_names(&self) -> Vec<String> {
        vec!["fc".into()]
    }
    fn num_classes(&self) -> usize {
        2
    }
}
