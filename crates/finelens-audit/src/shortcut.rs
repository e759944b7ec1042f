//! Shortcut detection: does a class's evidence come from the object, or from something else that
//! happens to go with the class (a watermark, a border, a planted patch)?
//!
//! * With masks: the class's mean share of positive relevance *outside* the object.
//! * Without masks: a fixed hotspot. Each image's |relevance| is normalised to sum 1 and the maps
//!   are averaged per class; an object that moves from image to image spreads this mean map out,
//!   a fixed cue piles it up. Concentration is the share of the mean map's mass in its top
//!   [`HOTSPOT_SHARE`] of pixels (uniform: that share itself).

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::localisation::relevance_mass_accuracy;

/// The share of pixels that counts as the hotspot.
pub const HOTSPOT_SHARE: f64 = 0.02;

/// One class's shortcut statistics.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClassShortcut {
    pub class: String,
    pub images: usize,
    /// Mean share of positive relevance outside the object mask (None without masks).
    pub mass_outside_mask: Option<f64>,
    /// Share of the class-mean |relevance| in its hottest [`HOTSPOT_SHARE`] of pixels.
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub hotspot_concentration: f64,
    /// Bounding box (y0, x0, y1, x1), inclusive, of the class-mean map's pixels at half its
    /// maximum or more: where the hotspot is.
    pub hotspot_box: (usize, usize, usize, usize),
}

/// The sum, over a class's images, of each map's |relevance| normalised to total 1: what the
/// hotspot statistics need, and what shards of an image set add up.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HotspotSum {
    pub height: usize,
    pub width: usize,
    pub images: usize,
    /// Row-major, height × width.
    pub sum: Vec<f64>,
}

impl HotspotSum {
    pub fn new(height: usize, width: usize) -> Self {
        HotspotSum {
            height,
            width,
            images: 0,
            sum: vec![0.0; height * width],
        }
    }

    pub fn add(&mut self, map: &Array2<f32>) {
        let total: f64 = map.iter().map(|v| v.abs() as f64).sum();
        if total > 0.0 {
            for (a, v) in self.sum.iter_mut().zip(map.iter()) {
                *a += v.abs() as f64 / total;
            }
        }
        self.images += 1;
    }

    /// Another part of the same class's images (another shard).
    pub fn merge(&mut self, other: &HotspotSum) {
        for (a, b) in self.sum.iter_mut().zip(&other.sum) {
            *a += b;
        }
        self.images += other.images;
    }

    /// The class's statistics; `outside` holds each image's share of positive relevance off the
    /// object (empty without masks).
    pub fn statistics(&self, class: &str, outside: Option<&[f64]>) -> ClassShortcut {
        let (h, w) = (self.height, self.width);
        let n = self.images.max(1) as f64;
        let mut idx: Vec<((usize, usize), f64)> = self
            .sum
            .iter()
            .enumerate()
            .map(|(k, v)| ((k / w.max(1), k % w.max(1)), v / n))
            .collect();
        idx.sort_by(|a, b| b.1.total_cmp(&a.1));
        let k = ((h * w) as f64 * HOTSPOT_SHARE).ceil().max(1.0) as usize;
        let total: f64 = idx.iter().map(|p| p.1).sum();
        let top = &idx[..k.min(idx.len())];
        let concentration = if total > 0.0 {
            top.iter().map(|p| p.1).sum::<f64>() / total
        } else {
            0.0
        };
        let peak = idx.first().map_or(0.0, |p| p.1);
        let bbox = idx
            .iter()
            .take_while(|p| peak > 0.0 && p.1 >= peak / 2.0)
            .fold((usize::MAX, usize::MAX, 0, 0), |b, ((y, x), _)| {
                (b.0.min(*y), b.1.min(*x), b.2.max(*y), b.3.max(*x))
            });
        ClassShortcut {
            class: class.to_owned(),
            images: self.images,
            mass_outside_mask: outside.map(|v| v.iter().sum::<f64>() / v.len().max(1) as f64),
            hotspot_concentration: concentration,
            hotspot_box: if peak > 0.0 { bbox } else { (0, 0, 0, 0) },
        }
    }
}

/// Statistics for one class from its images' relevance maps and (optionally) masks.
pub fn class_shortcut(
    class: &str,
    maps: &[Array2<f32>],
    masks: Option<&[Array2<bool>]>,
) -> ClassShortcut {
    let (h, w) = maps.first().map_or((0, 0), |m| m.dim());
    let mut sum = HotspotSum::new(h, w);
    for m in maps {
        sum.add(m);
    }
    let outside: Option<Vec<f64>> = masks.map(|ms| {
        maps.iter()
            .zip(ms)
            .filter_map(|(r, m)| relevance_mass_accuracy(r, m).map(|inside| 1.0 - inside))
            .collect()
    });
    sum.statistics(class, outside.as_deref())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A square of relevance at a position: fixed for the "shortcut" class, moving for the other.
    fn blob(h: usize, y: usize, x: usize) -> Array2<f32> {
        Array2::from_shape_fn((h, h), |(i, j)| {
            if (y..y + 3).contains(&i) && (x..x + 3).contains(&j) {
                1.0
            } else {
                0.001
            }
        })
    }

    #[test]
    fn a_fixed_cue_concentrates_and_a_moving_object_does_not() {
        let fixed: Vec<_> = (0..10).map(|_| blob(32, 1, 1)).collect();
        let moving: Vec<_> = (0..20).map(|i| blob(32, 5 * i % 29, 11 * i % 29)).collect();
        let a = class_shortcut("patch", &fixed, None);
        let b = class_shortcut("shape", &moving, None);
        assert!(a.hotspot_concentration > 0.5, "{}", a.hotspot_concentration);
        assert!(
            b.hotspot_concentration < 0.25,
            "{}",
            b.hotspot_concentration
        );
        assert_eq!(a.hotspot_box, (1, 1, 3, 3));
        // With masks on the moving objects, the fixed cue's mass is outside them.
        let masks: Vec<Array2<bool>> = (0..10)
            .map(|i| blob(32, 3 * i % 28 + 10, 7 * i % 28).mapv(|v| v > 0.5))
            .collect();
        let c = class_shortcut("patch", &fixed, Some(&masks));
        assert!(c.mass_outside_mask.unwrap() > 0.9);
    }
}
