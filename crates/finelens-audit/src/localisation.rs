//! Localisation against ground-truth object masks: does the explanation point at the object?
//! Relevance is the attribution summed over channels (H×W); only positive relevance counts as
//! evidence *for* the target.

use ndarray::{Array2, Array3, Axis};
use serde::{Deserialize, Serialize};

/// A C×H×W attribution as one H×W relevance map (Σ over channels).
pub fn relevance(map: &Array3<f32>) -> Array2<f32> {
    map.sum_axis(Axis(0))
}

/// Pointing game (Zhang et al. 2018): is the most relevant pixel on the object (or within
/// `tolerance` pixels of it)?
pub fn pointing_game(rel: &Array2<f32>, mask: &Array2<bool>, tolerance: usize) -> bool {
    let (h, w) = rel.dim();
    let Some(((y, x), _)) = rel
        .indexed_iter()
        .filter(|(_, v)| v.is_finite())
        .max_by(|a, b| a.1.total_cmp(b.1))
    else {
        return false;
    };
    let t = tolerance as isize;
    (-t..=t).any(|dy| {
        (-t..=t).any(|dx| {
            let (yy, xx) = (y as isize + dy, x as isize + dx);
            yy >= 0
                && xx >= 0
                && (yy as usize) < h
                && (xx as usize) < w
                && dy * dy + dx * dx <= t * t
                && mask[[yy as usize, xx as usize]]
        })
    })
}

/// Relevance mass accuracy (Arras, Osman & Samek 2022): the share of the positive relevance that
/// falls on the object. `None` when there is no positive relevance.
pub fn relevance_mass_accuracy(rel: &Array2<f32>, mask: &Array2<bool>) -> Option<f64> {
    let (mut inside, mut total) = (0f64, 0f64);
    for (v, &m) in rel.iter().zip(mask.iter()) {
        if *v > 0.0 {
            total += *v as f64;
            if m {
                inside += *v as f64;
            }
        }
    }
    (total > 0.0).then(|| inside / total)
}

/// Relevance rank accuracy (Arras et al. 2022): of the K most relevant pixels, K = the object's
/// size, the share on the object. `None` for an empty mask.
pub fn relevance_rank_accuracy(rel: &Array2<f32>, mask: &Array2<bool>) -> Option<f64> {
    let k = mask.iter().filter(|m| **m).count();
    if k == 0 {
        return None;
    }
    let mut idx: Vec<(f32, bool)> = rel.iter().copied().zip(mask.iter().copied()).collect();
    idx.sort_by(|a, b| b.0.total_cmp(&a.0));
    Some(idx.iter().take(k).filter(|(_, m)| *m).count() as f64 / k as f64)
}

/// Localisation over a set of images.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Localisation {
    pub images: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub pointing_game_hit_rate: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub relevance_mass_accuracy: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub relevance_rank_accuracy: f64,
}

/// One image's scores against its mask.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ImageLocalisation {
    pub pointing_game: bool,
    /// `None` when the map has no positive relevance.
    pub mass_accuracy: Option<f64>,
    /// `None` for an empty mask.
    pub rank_accuracy: Option<f64>,
}

impl ImageLocalisation {
    pub fn of(rel: &Array2<f32>, mask: &Array2<bool>, tolerance: usize) -> Self {
        ImageLocalisation {
            pointing_game: pointing_game(rel, mask, tolerance),
            mass_accuracy: relevance_mass_accuracy(rel, mask),
            rank_accuracy: relevance_rank_accuracy(rel, mask),
        }
    }
}

/// Mean localisation scores over images (a score undefined for an image is left out of its
/// mean).
pub fn localisation(images: &[&ImageLocalisation]) -> Localisation {
    let n = images.len().max(1) as f64;
    let hits = images.iter().filter(|i| i.pointing_game).count();
    let mean = |f: fn(&ImageLocalisation) -> Option<f64>| {
        let v: Vec<f64> = images.iter().filter_map(|i| f(i)).collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    Localisation {
        images: images.len(),
        pointing_game_hit_rate: hits as f64 / n,
        relevance_mass_accuracy: mean(|i| i.mass_accuracy),
        relevance_rank_accuracy: mean(|i| i.rank_accuracy),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ndarray::array;

    #[test]
    fn scores_on_a_hand_made_map() {
        let rel = array![[0.0f32, 1.0, 0.0], [3.0, -5.0, 0.0], [0.0, 0.0, 1.0]];
        let mask = array![
            [false, true, false],
            [true, true, false],
            [false, false, false]
        ];
        assert!(pointing_game(&rel, &mask, 0));
        // Positive mass 5, of which 4 inside.
        assert_eq!(relevance_mass_accuracy(&rel, &mask), Some(0.8));
        // K = 3: the top 3 are 3.0 (in), 1.0 (in) and one of the 1.0/0.0 ties… 3.0, 1.0, 1.0.
        let r = relevance_rank_accuracy(&rel, &mask).unwrap();
        assert!((r - 2.0 / 3.0).abs() < 1e-12, "{r}");
        let off = array![
            [false, false, false],
            [false, false, false],
            [false, false, true]
        ];
        // The maximum (1, 0) is √5 from the mask's cell (2, 2).
        assert!(!pointing_game(&rel, &off, 0));
        assert!(!pointing_game(&rel, &off, 2));
        assert!(pointing_game(&rel, &off, 3));
        assert_eq!(
            relevance_mass_accuracy(&Array2::zeros((2, 2)), &Array2::from_elem((2, 2), true)),
            None
        );
    }
}
