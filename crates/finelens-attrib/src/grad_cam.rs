//! Grad-CAM (Selvaraju et al. 2017, eqs. 1–2): weight each channel k of a layer's activation A by
//! the spatial mean of ∂F/∂Aᵏ, sum, and keep the positive part; then upsample to the input size.

use candle_core::Tensor;
use finelens_models::Classifier;
use ndarray::Array2;

use crate::error::{settings, Result};
use crate::layer::{layer_gradients, resolve_layer};
use crate::{Attribution, Attributor, Sign};

#[derive(Debug, Clone, Default)]
pub struct GradCam {
    /// A named activation with spatial extent; `None` takes the model's last convolutional block.
    pub layer: Option<String>,
}

impl GradCam {
    fn layer(&self, model: &dyn Classifier) -> Result<String> {
        resolve_layer("grad_cam", &self.layer, model)
    }

    /// The class activation maps at the layer's resolution, N × h × w.
    pub fn coarse_maps(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Array2<f32>>> {
        let layer = self.layer(model)?;
        let (a, g) = layer_gradients(model, x, &layer, targets)?;
        if a.rank() != 4 {
            return Err(settings(
                "grad_cam",
                format!(
                    "layer `{layer}` has shape {:?}; Grad-CAM needs a layer with spatial extent (N×C×h×w)",
                    a.dims()
                ),
            ));
        }
        let (_, _, h, w) = a.dims4()?;
        // αₖ = (1/Z) Σᵢⱼ ∂F/∂Aᵏᵢⱼ, then ReLU(Σₖ αₖ Aᵏ); a target that does not depend on the
        // layer has a zero gradient and an empty map.
        let cam = a.broadcast_mul(&g.mean_keepdim((2, 3))?)?.sum(1)?.relu()?;
        let v: Vec<f32> = cam
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1()?;
        Ok(v.chunks(h * w)
            .map(|c| Array2::from_shape_vec((h, w), c.to_vec()).expect("sizes agree"))
            .collect())
    }
}

impl Attributor for GradCam {
    fn name(&self) -> &'static str {
        "grad_cam"
    }

    fn sign(&self) -> Sign {
        Sign::Absolute
    }

    fn check(&self, model: &dyn Classifier) -> Result<()> {
        Ok(model.check_layer(&self.layer(model)?)?)
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let (_, _, h, w) = x.dims4()?;
        Ok(self
            .coarse_maps(model, x, targets)?
            .into_iter()
            .zip(targets)
            .map(|(cam, &target)| Attribution {
                map: upsample_bilinear(&cam, h, w).insert_axis(ndarray::Axis(0)),
                target,
                completeness: None,
                surrogate: None,
            })
            .collect::<Vec<_>>())
    }
}

/// Bilinear resize with PyTorch's `align_corners=False` convention (what Captum's
/// `LayerAttribution.interpolate` uses): output pixel centres map to
/// src = (dst + ½)·in/out − ½, clamped at the border.
pub fn upsample_bilinear(a: &Array2<f32>, out_h: usize, out_w: usize) -> Array2<f32> {
    let (h, w) = a.dim();
    let axis = |dst: usize, out: usize, len: usize| -> (usize, usize, f32) {
        let src = ((dst as f32 + 0.5) * len as f32 / out as f32 - 0.5).max(0.0);
        let i0 = (src.floor() as usize).min(len - 1);
        let i1 = (i0 + 1).min(len - 1);
        (i0, i1, src - i0 as f32)
    };
    Array2::from_shape_fn((out_h, out_w), |(y, x)| {
        let (y0, y1, fy) = axis(y, out_h, h);
        let (x0, x1, fx) = axis(x, out_w, w);
        let top = a[[y0, x0]] * (1.0 - fx) + a[[y0, x1]] * fx;
        let bottom = a[[y1, x0]] * (1.0 - fx) + a[[y1, x1]] * fx;
        top * (1.0 - fy) + bottom * fy
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{fixture_image, fixture_model, RegionModel};
    use candle_core::{DType, Device};

    /// Logit 1 of `RegionModel` reads channel 1 in the top-right quadrant. The input holds an
    /// object there in channel 1 (1.0 on a 0.05 background) and a brighter distractor in channel 0
    /// (5.0, bottom-left) that the target ignores. Grad-CAM must weight channel 1 only and so
    /// light up the object: a wrong channel weighting shows the distractor instead.
    #[test]
    fn lights_up_the_region_the_target_depends_on() {
        let (h, w) = (8, 10);
        let mut v = vec![0f32; 2 * h * w];
        for y in 0..h {
            for x in 0..w {
                let region = y < h / 2 && x >= w / 2;
                v[h * w + y * w + x] = if region { 1.0 } else { 0.05 };
                v[y * w + x] = if y >= h / 2 && x < w / 2 { 5.0 } else { 0.0 };
            }
        }
        let x = Tensor::from_vec(v, (1, 2, h, w), &Device::Cpu).unwrap();
        let a = GradCam::default()
            .attribute(&RegionModel, &x, &[1])
            .unwrap()
            .remove(0);
        assert_eq!(a.map.dim(), (1, h, w));
        let (mut inside, mut outside) = (f32::INFINITY, 0f32);
        for y in 0..h {
            for xx in 0..w {
                let v = a.map[[0, y, xx]];
                if y < h / 2 && xx >= w / 2 {
                    inside = inside.min(v);
                } else {
                    outside = outside.max(v);
                }
            }
        }
        assert!(
            inside > 10.0 * outside,
            "inside ≥ {inside}, outside ≤ {outside}"
        );
    }

    #[test]
    fn runs_on_resnet_and_names_bad_layers() {
        let model = fixture_model(DType::F32);
        let x = fixture_image(3, 0, DType::F32);
        let t = crate::predict(&model, &x, &crate::Target::Predicted).unwrap()[0].target;
        let a = GradCam::default().attribute(&model, &x, &[t]).unwrap();
        assert_eq!(a[0].map.dim(), (1, 64, 64));
        assert!(a[0].map.iter().any(|v| *v > 0.0));
        let e = GradCam {
            layer: Some("layer9".into()),
        }
        .attribute(&model, &x, &[3])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("unknown layer `layer9`") && e.contains("layer4.1"),
            "{e}"
        );
        let e = GradCam {
            layer: Some("avgpool".into()),
        }
        .attribute(&model, &x, &[3])
        .unwrap_err()
        .to_string();
        assert!(e.contains("spatial extent"), "{e}");
    }

    #[test]
    fn bilinear_matches_pytorch_align_corners_false() {
        // F.interpolate(torch.tensor([[[[1., 2.], [3., 4.]]]]), size=(4, 4), mode="bilinear")
        let a = Array2::from_shape_vec((2, 2), vec![1.0, 2.0, 3.0, 4.0]).unwrap();
        let up = upsample_bilinear(&a, 4, 4);
        let row0: Vec<f32> = up.row(0).to_vec();
        let row1: Vec<f32> = up.row(1).to_vec();
        assert_eq!(row0, vec![1.0, 1.25, 1.75, 2.0]);
        assert_eq!(row1, vec![1.5, 1.75, 2.25, 2.5]);
        // Same size is the identity.
        assert_eq!(upsample_bilinear(&a, 2, 2), a);
    }
}
