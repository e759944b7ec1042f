//! Streaming mini-batches: images are decoded and transformed a batch at a time (in parallel),
//! so memory holds one batch whatever the dataset's size. Shuffling and augmentation are seeded
//! per epoch and per sample, so results don't depend on thread scheduling.

use candle_core::{Device, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use crate::error::{DataError, Result};
use crate::image_folder::{OnBadImage, Sample};
use crate::transforms::{load_rgb, Augment, Preprocess};

/// SplitMix64 finaliser: derives independent seeds from (seed, stream, index).
pub fn mix_seed(seed: u64, stream: u64, index: u64) -> u64 {
    let mut z = seed
        ^ stream.wrapping_mul(0x9E37_79B9_7F4A_7C15)
        ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// One mini-batch: N×3×S×S normalised images, N labels (u32), and the samples they came from.
pub struct Batch {
    pub images: Tensor,
    pub labels: Tensor,
    pub samples: Vec<Sample>,
}

/// How to turn samples into batches.
#[derive(Debug, Clone)]
pub struct Loader {
    pub preprocess: Preprocess,
    /// Training augmentation; `None` for the evaluation transform.
    pub augment: Option<Augment>,
    pub batch_size: usize,
    /// Shuffle the order each epoch (seeded) — training; `false` keeps the given order.
    pub shuffle: bool,
    pub seed: u64,
    pub on_bad: OnBadImage,
}

impl Loader {
    pub fn check(&self) -> Result<()> {
        if self.batch_size == 0 {
            return Err(DataError::Config("batch size must be at least 1".into()));
        }
        self.preprocess.check()?;
        if let Some(a) = &self.augment {
            a.check()?;
        }
        Ok(())
    }

    /// The batches of one epoch, in order. `skipped` collects images that failed to decode
    /// under [`OnBadImage::Skip`].
    pub fn epoch<'a>(
        &'a self,
        samples: &'a [Sample],
        epoch: u64,
        device: &'a Device,
    ) -> Result<Epoch<'a>> {
        self.check()?;
        let mut order: Vec<usize> = (0..samples.len()).collect();
        if self.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(mix_seed(
                self.seed, 1, epoch,
            )));
        }
        Ok(Epoch {
            loader: self,
            samples,
            order,
            pos: 0,
            epoch,
            device,
            skipped: Vec::new(),
        })
    }

    /// The model input for one image file (evaluation transform), 1×3×S×S.
    pub fn load_one(&self, path: &std::path::Path, device: &Device) -> Result<Tensor> {
        self.preprocess.check()?;
        let img = self.preprocess.eval_image(&load_rgb(path)?);
        let s = self.preprocess.size;
        Ok(Tensor::from_vec(
            self.preprocess.normalise(&img),
            (1, 3, s, s),
            device,
        )?)
    }
}

pub struct Epoch<'a> {
    loader: &'a Loader,
    samples: &'a [Sample],
    order: Vec<usize>,
    pos: usize,
    epoch: u64,
    device: &'a Device,
    pub skipped: Vec<(std::path::PathBuf, String)>,
}

impl Epoch<'_> {
    pub fn num_batches(&self) -> usize {
        self.order.len().div_ceil(self.loader.batch_size)
    }
}

impl Iterator for Epoch<'_> {
    type Item = Result<Batch>;

    fn next(&mut self) -> Option<Self::Item> {
        let l = self.loader;
        while self.pos < self.order.len() {
            let idx = &self.order[self.pos..(self.pos + l.batch_size).min(self.order.len())];
            self.pos += idx.len();
            let decoded: Vec<(usize, Result<Vec<f32>>)> = idx
                .par_iter()
                .map(|&i| {
                    let s = &self.samples[i];
                    let r = load_rgb(&s.path).map(|img| {
                        let img = match &l.augment {
                            Some(aug) => {
                                let mut rng = ChaCha8Rng::seed_from_u64(mix_seed(
                                    l.seed,
                                    2 + self.epoch,
                                    i as u64,
                                ));
                                l.preprocess.train_image(&img, aug, &mut rng)
                            }
                            None => l.preprocess.eval_image(&img),
                        };
                        l.preprocess.normalise(&img)
                    });
                    (i, r)
                })
                .collect();
            let mut data =
                Vec::with_capacity(decoded.len() * 3 * l.preprocess.size * l.preprocess.size);
            let mut labels = Vec::new();
            let mut samples = Vec::new();
            for (i, r) in decoded {
                match r {
                    Ok(v) => {
                        data.extend(v);
                        labels.push(self.samples[i].label as u32);
                        samples.push(self.samples[i].clone());
                    }
                    Err(e) => match (l.on_bad, e) {
                        (OnBadImage::Skip, DataError::Decode { path, reason }) => {
                            self.skipped.push((path, reason))
                        }
                        (_, e) => return Some(Err(e)),
                    },
                }
            }
            if samples.is_empty() {
                continue;
            }
            let s = l.preprocess.size;
            let n = samples.len();
            let batch = (|| {
                Ok(Batch {
                    images: Tensor::from_vec(data, (n, 3, s, s), self.device)?,
                    labels: Tensor::from_vec(labels, n, self.device)?,
                    samples,
                })
            })();
            return Some(batch);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn dataset(dir: &std::path::Path) -> Vec<Sample> {
        (0..5)
            .map(|i| {
                let path = dir.join(format!("{i}.png"));
                image::RgbImage::from_pixel(8, 8, image::Rgb([i as u8 * 40, 0, 0]))
                    .save(&path)
                    .unwrap();
                Sample { path, label: i % 2 }
            })
            .collect()
    }

    fn loader(shuffle: bool, on_bad: OnBadImage) -> Loader {
        Loader {
            preprocess: Preprocess {
                size: 8,
                crop_pct: 1.0,
                mean: [0.0; 3],
                std: [1.0; 3],
            },
            augment: None,
            batch_size: 2,
            shuffle,
            seed: 4,
            on_bad,
        }
    }

    #[test]
    fn batches_cover_every_sample_once_with_seeded_order() {
        let d = tempfile::tempdir().unwrap();
        let samples = dataset(d.path());
        let l = loader(true, OnBadImage::Fail);
        let order = |epoch| -> Vec<PathBuf> {
            l.epoch(&samples, epoch, &Device::Cpu)
                .unwrap()
                .flat_map(|b| b.unwrap().samples.into_iter().map(|s| s.path))
                .collect()
        };
        let (a, b, c) = (order(0), order(0), order(1));
        assert_eq!(a, b);
        assert_ne!(a, c);
        let mut sorted = a.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            samples.iter().map(|s| s.path.clone()).collect::<Vec<_>>()
        );
        let first = l
            .epoch(&samples, 0, &Device::Cpu)
            .unwrap()
            .next()
            .unwrap()
            .unwrap();
        assert_eq!(first.images.dims(), &[2, 3, 8, 8]);
        assert_eq!(first.labels.dims(), &[2]);
    }

    #[test]
    fn undecodable_images_are_skipped_or_fatal() {
        let d = tempfile::tempdir().unwrap();
        let mut samples = dataset(d.path());
        let bad = d.path().join("bad.png");
        std::fs::write(&bad, b"\x89PNG\r\n\x1a\n truncated").unwrap();
        samples.push(Sample {
            path: bad,
            label: 0,
        });
        let l = loader(false, OnBadImage::Skip);
        let mut ep = l.epoch(&samples, 0, &Device::Cpu).unwrap();
        let n: usize = ep.by_ref().map(|b| b.unwrap().samples.len()).sum();
        assert_eq!(n, 5);
        assert_eq!(ep.skipped.len(), 1);
        let l = loader(false, OnBadImage::Fail);
        let err = l
            .epoch(&samples, 0, &Device::Cpu)
            .unwrap()
            .find_map(|b| b.err())
            .unwrap();
        assert!(
            err.to_string().contains("bad.png: cannot decode image"),
            "{err}"
        );
        let zero = Loader {
            batch_size: 0,
            ..loader(false, OnBadImage::Fail)
        };
        assert!(zero.epoch(&samples, 0, &Device::Cpu).is_err());
    }
}
