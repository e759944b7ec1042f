//! Baselines for integrated gradients and occlusion: the reference input x′ that "means absence".
//!
//! Every baseline is built in the model's normalised input space. Which one to use changes the
//! answer (Sturmfels, Lundberg & Lee 2020, "Visualizing the Impact of Feature Attribution
//! Baselines", Distill): a black baseline cannot attribute to black pixels, a blurred one only to
//! detail, and averaging over several (expected gradients, Erion et al. 2021) hedges between them.

use candle_core::Tensor;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::{settings, Result};

/// The per-channel normalisation the model's inputs went through: x = (pixel − mean) / std.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Normalisation {
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// A reference input.
#[derive(Debug, Clone)]
pub enum Baseline {
    /// All zeros in normalised space (the dataset mean colour).
    Zeros,
    /// A black image (pixel value 0), normalised.
    Black,
    /// The input blurred by a Gaussian of standard deviation `sigma` pixels.
    Blur { sigma: f32 },
    /// Uniform noise in pixel space [0, 1], normalised; seeded.
    UniformNoise { seed: u64 },
    /// A given image, already preprocessed to the model's input (C×H×W or 1×C×H×W).
    Image(Tensor),
    /// Attributions averaged over several baselines (expected-gradients style).
    Average(Vec<Baseline>),
}

impl Baseline {
    pub fn name(&self) -> String {
        match self {
            Baseline::Zeros => "zeros".into(),
            Baseline::Black => "black".into(),
            Baseline::Blur { sigma } => format!("blur:{sigma}"),
            Baseline::UniformNoise { seed } => format!("noise(seed {seed})"),
            Baseline::Image(_) => "image".into(),
            Baseline::Average(bs) => format!(
                "average of [{}]",
                bs.iter().map(|b| b.name()).collect::<Vec<_>>().join(", ")
            ),
        }
    }

    pub(crate) fn check(&self, method: &'static str) -> Result<()> {
        match self {
            Baseline::Blur { sigma } if !(sigma.is_finite() && *sigma > 0.0) => Err(settings(
                method,
                format!("blur sigma must be positive, got {sigma}"),
            )),
            Baseline::Average(bs) if bs.is_empty() => {
                Err(settings(method, "an average of no baselines"))
            }
            Baseline::Average(bs) => bs.iter().try_for_each(|b| b.check(method)),
            _ => Ok(()),
        }
    }

    /// The concrete baselines (one per averaged member) for input `x` (1×C×H×W).
    pub fn materialise(&self, x: &Tensor, norm: &Normalisation) -> Result<Vec<Tensor>> {
        let (_, c, h, w) = x.dims4()?;
        let dev = x.device();
        let per_channel = |f: &dyn Fn(usize) -> f32| -> Result<Tensor> {
            let mut v = Vec::with_capacity(c * h * w);
            for ch in 0..c {
                v.extend(std::iter::repeat_n(f(ch), h * w));
            }
            Ok(Tensor::from_vec(v, (1, c, h, w), dev)?.to_dtype(x.dtype())?)
        };
        Ok(match self {
            Baseline::Zeros => vec![x.zeros_like()?],
            Baseline::Black => vec![per_channel(&|ch| -norm.mean[ch % 3] / norm.std[ch % 3])?],
            Baseline::Blur { sigma } => {
                let v: Vec<f32> = x
                    .to_dtype(candle_core::DType::F32)?
                    .flatten_all()?
                    .to_vec1()?;
                let blurred = gaussian_blur(&v, c, h, w, *sigma);
                vec![Tensor::from_vec(blurred, (1, c, h, w), dev)?.to_dtype(x.dtype())?]
            }
            Baseline::UniformNoise { seed } => {
                let mut rng = ChaCha8Rng::seed_from_u64(*seed);
                let mut v = Vec::with_capacity(c * h * w);
                for ch in 0..c {
                    let (m, s) = (norm.mean[ch % 3], norm.std[ch % 3]);
                    v.extend((0..h * w).map(|_| (rng.random::<f32>() - m) / s));
                }
                vec![Tensor::from_vec(v, (1, c, h, w), dev)?.to_dtype(x.dtype())?]
            }
            Baseline::Image(t) => {
                let t = if t.rank() == 3 {
                    t.unsqueeze(0)?
                } else {
                    t.clone()
                };
                if t.dims() != x.dims() {
                    return Err(settings(
                        "baseline",
                        format!(
                            "the baseline image has shape {:?}, the input {:?}",
                            t.dims(),
                            x.dims()
                        ),
                    ));
                }
                vec![t.to_dtype(x.dtype())?]
            }
            Baseline::Average(bs) => {
                let mut out = Vec::new();
                for b in bs {
                    out.extend(b.materialise(x, norm)?);
                }
                out
            }
        })
    }
}

/// Separable Gaussian blur of C planes, truncated at 3σ, edges clamped. Normalisation is affine
/// per channel and the kernel sums to 1, so blurring normalised values equals normalising the
/// blurred pixels.
pub fn gaussian_blur(x: &[f32], c: usize, h: usize, w: usize, sigma: f32) -> Vec<f32> {
    let radius = (3.0 * sigma).ceil() as isize;
    let mut kernel: Vec<f32> = (-radius..=radius)
        .map(|d| (-(d * d) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = kernel.iter().sum();
    kernel.iter_mut().for_each(|k| *k /= total);
    let clamp = |i: isize, n: usize| i.clamp(0, n as isize - 1) as usize;
    let mut tmp = vec![0f32; x.len()];
    let mut out = vec![0f32; x.len()];
    for ch in 0..c {
        let plane = &x[ch * h * w..][..h * w];
        let t = &mut tmp[ch * h * w..][..h * w];
        for y in 0..h {
            for xx in 0..w {
                t[y * w + xx] = kernel
                    .iter()
                    .enumerate()
                    .map(|(k, kv)| kv * plane[y * w + clamp(xx as isize + k as isize - radius, w)])
                    .sum();
            }
        }
        let o = &mut out[ch * h * w..][..h * w];
        for y in 0..h {
            for xx in 0..w {
                o[y * w + xx] = kernel
                    .iter()
                    .enumerate()
                    .map(|(k, kv)| kv * t[clamp(y as isize + k as isize - radius, h) * w + xx])
                    .sum();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    const IMAGENET: Normalisation = Normalisation {
        mean: [0.485, 0.456, 0.406],
        std: [0.229, 0.224, 0.225],
    };

    #[test]
    fn black_is_zero_pixels_and_blur_keeps_constants() {
        let x = Tensor::ones((1, 3, 4, 5), candle_core::DType::F32, &Device::Cpu).unwrap();
        let b = Baseline::Black.materialise(&x, &IMAGENET).unwrap();
        let v: Vec<f32> = b[0].flatten_all().unwrap().to_vec1().unwrap();
        assert!((v[0] * 0.229 + 0.485).abs() < 1e-6);
        assert!((v[59] * 0.225 + 0.406).abs() < 1e-6);
        // A constant image is its own blur.
        let blurred = gaussian_blur(&[2.0; 3 * 20], 3, 4, 5, 1.5);
        assert!(blurred.iter().all(|v| (v - 2.0).abs() < 1e-5));
        // Blur preserves the mean of an impulse far from the edges and spreads it.
        let mut imp = vec![0f32; 21 * 21];
        imp[10 * 21 + 10] = 1.0;
        let b = gaussian_blur(&imp, 1, 21, 21, 2.0);
        assert!((b.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(b[10 * 21 + 10] < 0.1 && b[10 * 21 + 12] > 0.0);
    }

    #[test]
    fn noise_is_seeded_and_averages_expand() {
        let x = Tensor::zeros((1, 3, 4, 4), candle_core::DType::F32, &Device::Cpu).unwrap();
        let a = Baseline::UniformNoise { seed: 7 }
            .materialise(&x, &IMAGENET)
            .unwrap();
        let b = Baseline::UniformNoise { seed: 7 }
            .materialise(&x, &IMAGENET)
            .unwrap();
        let va: Vec<f32> = a[0].flatten_all().unwrap().to_vec1().unwrap();
        let vb: Vec<f32> = b[0].flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(va, vb);
        let avg = Baseline::Average(vec![Baseline::Zeros, Baseline::UniformNoise { seed: 1 }]);
        assert_eq!(avg.materialise(&x, &IMAGENET).unwrap().len(), 2);
        assert!(Baseline::Average(vec![]).check("ig").is_err());
        assert!(Baseline::Blur { sigma: -1.0 }.check("ig").is_err());
    }
}
