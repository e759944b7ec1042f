//! How concentrated an explanation is, Quantus's complexity metrics, on |relevance|:
//!
//! * **sparseness**: the Gini index of the values sorted ascending,
//!   G = Σᵢ (2i − n − 1)·xᵢ / (n·Σ x) (Chalasani et al. 2020): 0 when every value is the same,
//!   (n − 1)/n when one holds everything;
//! * **complexity**: the Shannon entropy (nats) of pᵢ = xᵢ / Σ x (Bhatt et al. 2020): ln n when
//!   every value is the same, 0 when one holds everything; also reported relative to ln n (the
//!   policy's figure: comparable across input sizes).
//!
//! A map of zeros has neither (no evidence to spread) and is left out of the means.

use serde::{Deserialize, Serialize};

/// One map's figures.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MapComplexity {
    pub sparseness: f64,
    pub complexity: f64,
    /// complexity / ln n, in [0, 1].
    pub relative_complexity: f64,
}

impl MapComplexity {
    /// The figures of |values|; `None` for a map of zeros (or of fewer than two values).
    pub fn of(values: impl IntoIterator<Item = f32>) -> Option<MapComplexity> {
        let mut x: Vec<f64> = values.into_iter().map(|v| (v as f64).abs()).collect();
        let n = x.len();
        let total: f64 = x.iter().sum();
        if n < 2 || !(total > 0.0 && total.is_finite()) {
            return None;
        }
        x.sort_by(f64::total_cmp);
        let gini = x
            .iter()
            .enumerate()
            .map(|(i, v)| (2.0 * (i + 1) as f64 - n as f64 - 1.0) * v)
            .sum::<f64>()
            / (n as f64 * total);
        let entropy = -x
            .iter()
            .filter(|v| **v > 0.0)
            .map(|v| {
                let p = v / total;
                p * p.ln()
            })
            .sum::<f64>();
        Some(MapComplexity {
            sparseness: gini,
            complexity: entropy,
            relative_complexity: entropy / (n as f64).ln(),
        })
    }
}

/// A method's means over the maps that had evidence.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Complexity {
    pub mean_sparseness: f64,
    pub mean_complexity: f64,
    pub mean_relative_complexity: f64,
    pub maps: usize,
}

impl Complexity {
    pub fn summarise(maps: &[MapComplexity]) -> Option<Complexity> {
        let n = maps.len();
        let mean = |f: fn(&MapComplexity) -> f64| maps.iter().map(f).sum::<f64>() / n as f64;
        (n > 0).then(|| Complexity {
            mean_sparseness: mean(|m| m.sparseness),
            mean_complexity: mean(|m| m.complexity),
            mean_relative_complexity: mean(|m| m.relative_complexity),
            maps: n,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closed_forms_on_constant_one_hot_and_two_level_maps() {
        let n = 64;
        let flat = MapComplexity::of(vec![0.5f32; n]).unwrap();
        assert!(flat.sparseness.abs() < 1e-12);
        assert!((flat.complexity - (n as f64).ln()).abs() < 1e-12);
        assert!((flat.relative_complexity - 1.0).abs() < 1e-12);
        let mut one = vec![0f32; n];
        one[17] = -3.0; // the magnitude counts, not the sign
        let one = MapComplexity::of(one).unwrap();
        assert!((one.sparseness - (n - 1) as f64 / n as f64).abs() < 1e-12);
        assert_eq!((one.complexity, one.relative_complexity), (0.0, 0.0));
        // Half the values 1, half 0: G = ½, H = ln(n/2).
        let half: Vec<f32> = (0..n).map(|i| (i % 2) as f32).collect();
        let h = MapComplexity::of(half.clone()).unwrap();
        assert!((h.sparseness - 0.5).abs() < 1e-12);
        assert!((h.complexity - (n as f64 / 2.0).ln()).abs() < 1e-12);
        // Neither depends on the order or the scale of the values.
        let mut shuffled = half.clone();
        shuffled.reverse();
        let scaled: Vec<f32> = half.iter().map(|v| 7.0 * v).collect();
        assert_eq!(MapComplexity::of(shuffled), Some(h));
        let s = MapComplexity::of(scaled).unwrap();
        assert!(
            (s.sparseness - h.sparseness).abs() < 1e-12
                && (s.complexity - h.complexity).abs() < 1e-12
        );
        // No evidence, no figures; the means skip nothing they were not given.
        assert_eq!(MapComplexity::of(vec![0f32; n]), None);
        assert_eq!(Complexity::summarise(&[]), None);
        let m = Complexity::summarise(&[flat, one]).unwrap();
        assert!((m.mean_relative_complexity - 0.5).abs() < 1e-12 && m.maps == 2);
    }
}
