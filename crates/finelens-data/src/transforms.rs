//! Image decoding and the torchvision-style transforms: resize + centre crop for evaluation,
//! random resized crop + horizontal flip for training, then per-channel normalisation into a
//! C×H×W float array.

use std::path::Path;

use image::imageops::{self, FilterType};
use image::RgbImage;
use rand::Rng;

use crate::error::{DataError, Result};

/// Decode any supported image to 8-bit RGB: greyscale is replicated, alpha dropped (as PIL's
/// `convert("RGB")` does) and 16-bit channels scaled to 8 bits.
pub fn load_rgb(path: &Path) -> Result<RgbImage> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .with_guessed_format()
        .map_err(|e| DataError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })?
        .decode()
        .map_err(|e| DataError::Decode {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    Ok(img.to_rgb8())
}

/// Geometry and normalisation that every use of a model shares (from its checkpoint metadata).
#[derive(Debug, Clone, PartialEq)]
pub struct Preprocess {
    /// Side of the square model input.
    pub size: usize,
    /// The evaluation resize is `size / crop_pct` on the shorter side, then a centre crop of
    /// `size` (torchvision's 224-of-256 is 0.875; 1.0 keeps the whole image).
    pub crop_pct: f32,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Training-time randomness, torchvision's `RandomResizedCrop` + `RandomHorizontalFlip`.
#[derive(Debug, Clone, PartialEq)]
pub struct Augment {
    /// Range of the crop's area as a share of the image (torchvision: 0.08–1.0).
    pub scale: (f32, f32),
    /// Range of the crop's aspect ratio (torchvision: 3/4–4/3).
    pub ratio: (f32, f32),
    pub hflip: bool,
}

impl Default for Augment {
    fn default() -> Self {
        Self {
            scale: (0.08, 1.0),
            ratio: (3.0 / 4.0, 4.0 / 3.0),
            hflip: true,
        }
    }
}

impl Augment {
    pub fn check(&self) -> Result<()> {
        let (s0, s1) = self.scale;
        let (r0, r1) = self.ratio;
        if !(s0 > 0.0 && s0 <= s1 && s1 <= 1.0) {
            return Err(DataError::Config(format!(
                "crop scale range {s0}..{s1} must satisfy 0 < min ≤ max ≤ 1"
            )));
        }
        if !(r0 > 0.0 && r0 <= r1) {
            return Err(DataError::Config(format!(
                "crop ratio range {r0}..{r1} must satisfy 0 < min ≤ max"
            )));
        }
        Ok(())
    }
}

impl Preprocess {
    pub fn check(&self) -> Result<()> {
        if self.size == 0 {
            return Err(DataError::Config("input size must be positive".into()));
        }
        if !(self.crop_pct > 0.0 && self.crop_pct <= 1.0) {
            return Err(DataError::Config(format!(
                "crop_pct {} must be in (0, 1]",
                self.crop_pct
            )));
        }
        if self.std.iter().any(|s| !s.is_finite() || *s <= 0.0) {
            return Err(DataError::Config(format!(
                "normalisation std {:?} must be positive",
                self.std
            )));
        }
        Ok(())
    }

    /// Evaluation geometry: resize the shorter side to `size / crop_pct`, centre-crop `size`.
    pub fn eval_image(&self, img: &RgbImage) -> RgbImage {
        let resize_to = ((self.size as f32 / self.crop_pct).round() as u32).max(self.size as u32);
        let (w, h) = img.dimensions();
        let (nw, nh) = if w <= h {
            (
                resize_to,
                ((h as u64 * resize_to as u64) / w as u64).max(1) as u32,
            )
        } else {
            (
                ((w as u64 * resize_to as u64) / h as u64).max(1) as u32,
                resize_to,
            )
        };
        let resized = if (nw, nh) == (w, h) {
            img.clone()
        } else {
            imageops::resize(img, nw, nh, FilterType::Triangle)
        };
        let s = self.size as u32;
        imageops::crop_imm(&resized, (nw - s) / 2, (nh - s) / 2, s, s).to_image()
    }

    /// Training geometry: a random crop of random area and aspect ratio, resized to `size`,
    /// flipped half the time. Falls back to a centre crop after 10 tries, as torchvision does.
    pub fn train_image<R: Rng>(&self, img: &RgbImage, aug: &Augment, rng: &mut R) -> RgbImage {
        let (w, h) = img.dimensions();
        let area = (w * h) as f32;
        let mut crop = None;
        for _ in 0..10 {
            let target = area * rng.random_range(aug.scale.0..=aug.scale.1);
            let log_ratio = rng.random_range(aug.ratio.0.ln()..=aug.ratio.1.ln());
            let ar = log_ratio.exp();
            let cw = (target * ar).sqrt().round() as u32;
            let ch = (target / ar).sqrt().round() as u32;
            if cw > 0 && ch > 0 && cw <= w && ch <= h {
                let x = rng.random_range(0..=w - cw);
                let y = rng.random_range(0..=h - ch);
                crop = Some((x, y, cw, ch));
                break;
            }
        }
        let (x, y, cw, ch) = crop.unwrap_or_else(|| {
            let s = w.min(h);
            ((w - s) / 2, (h - s) / 2, s, s)
        });
        let s = self.size as u32;
        let mut out = imageops::resize(
            &imageops::crop_imm(img, x, y, cw, ch).to_image(),
            s,
            s,
            FilterType::Triangle,
        );
        if aug.hflip && rng.random_bool(0.5) {
            imageops::flip_horizontal_in_place(&mut out);
        }
        out
    }

    /// C×H×W floats, `(pixel/255 − mean) / std` per channel (torchvision's `ToTensor` + `Normalize`).
    pub fn normalise(&self, img: &RgbImage) -> Vec<f32> {
        let (w, h) = img.dimensions();
        let plane = (w * h) as usize;
        let mut out = vec![0f32; 3 * plane];
        for (i, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + i] = (px[c] as f32 / 255.0 - self.mean[c]) / self.std[c];
            }
        }
        out
    }

    /// The inverse of [`Preprocess::normalise`], back to an RGB image (clamped) for display.
    pub fn denormalise(&self, chw: &[f32], size: usize) -> RgbImage {
        let plane = size * size;
        RgbImage::from_fn(size as u32, size as u32, |x, y| {
            let i = y as usize * size + x as usize;
            let v = |c: usize| {
                ((chw[c * plane + i] * self.std[c] + self.mean[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            };
            image::Rgb([v(0), v(1), v(2)])
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use image::{DynamicImage, ImageBuffer, Luma, LumaA, Rgba};
    use rand::SeedableRng;

    fn pre(size: usize, crop_pct: f32) -> Preprocess {
        Preprocess {
            size,
            crop_pct,
            mean: [0.5, 0.5, 0.5],
            std: [0.25, 0.5, 1.0],
        }
    }

    #[test]
    fn grey_alpha_and_sixteen_bit_become_rgb8() {
        let d = tempfile::tempdir().unwrap();
        let grey = d.path().join("g.png");
        ImageBuffer::<Luma<u8>, _>::from_pixel(3, 2, Luma([200]))
            .save(&grey)
            .unwrap();
        let alpha = d.path().join("a.png");
        ImageBuffer::<Rgba<u8>, _>::from_pixel(3, 2, Rgba([10, 20, 30, 0]))
            .save(&alpha)
            .unwrap();
        let deep = d.path().join("d.png");
        DynamicImage::ImageLumaA16(ImageBuffer::<LumaA<u16>, _>::from_pixel(
            3,
            2,
            LumaA([65535, 65535]),
        ))
        .save(&deep)
        .unwrap();
        assert_eq!(load_rgb(&grey).unwrap().get_pixel(0, 0).0, [200, 200, 200]);
        assert_eq!(load_rgb(&alpha).unwrap().get_pixel(2, 1).0, [10, 20, 30]);
        assert_eq!(load_rgb(&deep).unwrap().get_pixel(1, 1).0, [255, 255, 255]);
    }

    #[test]
    fn eval_resizes_shorter_side_and_centre_crops() {
        // 40×20 image whose left half is black and right half white: crop 10 at crop_pct 1
        // resizes to 20×10 and keeps columns 5..15, straddling the edge at 10.
        let img = RgbImage::from_fn(40, 20, |x, _| {
            if x < 20 {
                image::Rgb([0; 3])
            } else {
                image::Rgb([255; 3])
            }
        });
        let out = pre(10, 1.0).eval_image(&img);
        assert_eq!(out.dimensions(), (10, 10));
        assert_eq!(out.get_pixel(0, 5).0, [0; 3]);
        assert_eq!(out.get_pixel(9, 5).0, [255; 3]);
        // Already the right size with crop_pct 1: untouched.
        let same = RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8, y as u8, 7]));
        assert_eq!(pre(8, 1.0).eval_image(&same), same);
        assert_eq!(pre(8, 0.875).eval_image(&same).dimensions(), (8, 8));
    }

    #[test]
    fn train_crops_are_seeded_and_sized() {
        let img = RgbImage::from_fn(30, 20, |x, y| image::Rgb([x as u8 * 8, y as u8 * 12, 0]));
        let p = pre(16, 1.0);
        let aug = Augment::default();
        let a = p.train_image(&img, &aug, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        let b = p.train_image(&img, &aug, &mut rand_chacha::ChaCha8Rng::seed_from_u64(3));
        assert_eq!(a, b);
        assert_eq!(a.dimensions(), (16, 16));
        assert!(Augment {
            scale: (0.5, 0.1),
            ..Augment::default()
        }
        .check()
        .is_err());
    }

    #[test]
    fn normalise_and_denormalise_round_trip() {
        let p = pre(2, 1.0);
        let img = RgbImage::from_fn(2, 2, |x, y| image::Rgb([x as u8 * 255, y as u8 * 255, 128]));
        let v = p.normalise(&img);
        assert_eq!(v.len(), 12);
        assert!((v[0] - (0.0 - 0.5) / 0.25).abs() < 1e-6);
        assert!((v[4 + 3] - (1.0 - 0.5) / 0.5).abs() < 1e-6);
        assert_eq!(p.denormalise(&v, 2), img);
    }
}
