//! Occlusion (Zeiler & Fergus 2014): slide a window over the input, replace what it covers, and
//! attribute the drop in the target logit, F(x) − F(x with the window replaced), to the covered
//! cells, averaged over the windows that covered each cell (Captum's `Occlusion`). The window
//! spans all channels; cells no window covers get 0.

use candle_core::Tensor;
use finelens_models::Classifier;
use ndarray::Array3;

use crate::baseline::{Baseline, Normalisation};
use crate::error::{settings, Result};
use crate::target::target_logits;
use crate::{chunks, each_input, Attribution, Attributor, Sign};

/// What an occluded window is filled with.
#[derive(Debug, Clone)]
pub enum Fill {
    /// A constant in normalised space (0 = the dataset mean colour).
    Value(f32),
    /// The corresponding cells of a baseline.
    Baseline(Baseline),
}

#[derive(Debug, Clone)]
pub struct Occlusion {
    /// Side of the square window, in pixels.
    pub window: usize,
    pub stride: usize,
    pub fill: Fill,
    /// Occluded copies per forward pass.
    pub internal_batch: usize,
    pub normalisation: Normalisation,
}

impl Occlusion {
    fn starts(&self, len: usize) -> Vec<usize> {
        (0..=(len - self.window) / self.stride)
            .map(|i| i * self.stride)
            .collect()
    }

    fn attribute_one(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        target: usize,
    ) -> Result<Attribution> {
        let (_, c, h, w) = x.dims4()?;
        let fill = match &self.fill {
            Fill::Value(v) => (x.ones_like()? * *v as f64)?,
            Fill::Baseline(b) => {
                let mut bs = b.materialise(x, &self.normalisation)?;
                if bs.len() != 1 {
                    return Err(settings(self.name(), "occlusion takes a single baseline"));
                }
                bs.remove(0)
            }
        };
        let windows: Vec<(usize, usize)> = self
            .starts(h)
            .into_iter()
            .flat_map(|y| self.starts(w).into_iter().map(move |x| (y, x)))
            .collect();
        let fx = target_logits(model, x, &[target])?[0];
        let mut sum = vec![0f64; h * w];
        let mut count = vec![0u32; h * w];
        for range in chunks(windows.len(), self.internal_batch) {
            let batch = &windows[range];
            // x·(1 − m) + fill·m with a 0/1 mask m per window: exact, so cells outside the
            // window keep their values bit for bit, in the input's dtype.
            let mut mask = vec![0f32; batch.len() * h * w];
            for (k, &(y0, x0)) in batch.iter().enumerate() {
                for y in y0..y0 + self.window {
                    mask[k * h * w + y * w + x0..][..self.window].fill(1.0);
                }
            }
            let m =
                Tensor::from_vec(mask, (batch.len(), 1, h, w), x.device())?.to_dtype(x.dtype())?;
            let keep = (1.0 - &m)?;
            let occluded = (x.broadcast_mul(&keep)? + fill.broadcast_mul(&m)?)?;
            let f = target_logits(model, &occluded, &vec![target; batch.len()])?;
            for (&(y0, x0), fo) in batch.iter().zip(f) {
                for y in y0..y0 + self.window {
                    for xx in x0..x0 + self.window {
                        sum[y * w + xx] += fx - fo;
                        count[y * w + xx] += 1;
                    }
                }
            }
        }
        let plane: Vec<f32> = sum
            .iter()
            .zip(&count)
            .map(|(s, &n)| if n == 0 { 0.0 } else { (s / n as f64) as f32 })
            .collect();
        let map = Array3::from_shape_fn((c, h, w), |(_, y, xx)| plane[y * w + xx]);
        Ok(Attribution {
            map,
            target,
            completeness: None,
            surrogate: None,
        })
    }
}

impl Attributor for Occlusion {
    fn name(&self) -> &'static str {
        "occlusion"
    }

    fn sign(&self) -> Sign {
        Sign::Signed
    }

    fn check(&self, _: &dyn Classifier) -> Result<()> {
        if self.window == 0 || self.stride == 0 || self.internal_batch == 0 {
            return Err(settings(
                self.name(),
                "window, stride and internal batch must be at least 1",
            ));
        }
        if let Fill::Baseline(b) = &self.fill {
            b.check(self.name())?;
        }
        Ok(())
    }

    fn compute(
        &self,
        model: &dyn Classifier,
        x: &Tensor,
        targets: &[usize],
    ) -> Result<Vec<Attribution>> {
        let (_, _, h, w) = x.dims4()?;
        if self.window > h.min(w) {
            return Err(settings(
                self.name(),
                format!("window {} is larger than the {h}×{w} input", self.window),
            ));
        }
        each_input(x, targets, |xi, t| self.attribute_one(model, xi, t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testutil::{randn, RegionModel};
    use candle_core::DType;
    use finelens_models::checkpoint::{IMAGENET_MEAN, IMAGENET_STD};

    /// Logit 0 of `RegionModel` is Σ x² over channel 0 of the top-left quadrant. With windows that
    /// tile the image and a zero fill, each window's drop is the Σ x² it hides: exactly that
    /// inside the quadrant, exactly 0 elsewhere.
    #[test]
    fn a_model_that_looks_at_one_quadrant_gets_nothing_elsewhere() {
        let (h, w) = (16, 16);
        let x = randn((1, 2, h, w), DType::F64, 5);
        let occ = Occlusion {
            window: 4,
            stride: 4,
            fill: Fill::Value(0.0),
            internal_batch: 5,
            normalisation: Normalisation {
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
        };
        let a = occ.attribute(&RegionModel, &x, &[0]).unwrap().remove(0);
        let v: Vec<f64> = x.flatten_all().unwrap().to_vec1().unwrap();
        for y in 0..h {
            for xx in 0..w {
                let got = a.map[[0, y, xx]] as f64;
                assert_eq!(
                    a.map[[1, y, xx]] as f64,
                    got,
                    "channels share the window's value"
                );
                if y < h / 2 && xx < w / 2 {
                    let (y0, x0) = (y / 4 * 4, xx / 4 * 4);
                    let hidden: f64 = (y0..y0 + 4)
                        .flat_map(|yy| (x0..x0 + 4).map(move |x2| (yy, x2)))
                        .map(|(yy, x2)| v[yy * w + x2].powi(2))
                        .sum();
                    assert!(
                        (got - hidden).abs() < 1e-5 * hidden.max(1.0),
                        "({y},{xx}): {got} vs {hidden}"
                    );
                } else {
                    assert_eq!(got, 0.0, "({y}, {xx}) outside the quadrant");
                }
            }
        }
        // Overlapping windows average: a stride-2 run still gives nothing outside the quadrant
        // beyond the windows that straddle it.
        let occ2 = Occlusion { stride: 2, ..occ };
        let b = occ2.attribute(&RegionModel, &x, &[0]).unwrap().remove(0);
        assert!(b
            .map
            .slice(ndarray::s![.., 12.., ..])
            .iter()
            .all(|v| *v == 0.0));
        assert!(b
            .map
            .slice(ndarray::s![.., .., 12..])
            .iter()
            .all(|v| *v == 0.0));
    }

    #[test]
    fn a_window_larger_than_the_input_is_an_error() {
        let x = randn((1, 2, 4, 4), DType::F32, 1);
        let occ = Occlusion {
            window: 5,
            stride: 1,
            fill: Fill::Value(0.0),
            internal_batch: 4,
            normalisation: Normalisation {
                mean: IMAGENET_MEAN,
                std: IMAGENET_STD,
            },
        };
        let e = occ
            .attribute(&RegionModel, &x, &[0])
            .unwrap_err()
            .to_string();
        assert!(e.contains("larger than the 4×4 input"), "{e}");
    }
}
