//! How alike two relevance maps are: Spearman's ρ of |relevance| (from `finelens-drift`) and the
//! structural similarity index (Wang et al. 2004), as Adebayo et al. (2018) compare maps.

use ndarray::Array2;

/// Side of SSIM's uniform window (scikit-image's default).
const SSIM_WINDOW: usize = 7;

/// |map| scaled to [0, 1] by its maximum (all-zero stays zero).
pub fn normalised_magnitude(a: &Array2<f32>) -> Array2<f32> {
    let m = a.iter().fold(0f32, |m, v| m.max(v.abs()));
    if m > 0.0 {
        a.mapv(|v| v.abs() / m)
    } else {
        a.mapv(|_| 0.0)
    }
}

/// Mean SSIM over all 7×7 windows (fewer on a side shorter than 7) of two maps with values in [0, 1] (data range 1,
/// K₁ = 0.01, K₂ = 0.03, sample covariances as scikit-image computes them).
pub fn ssim(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    assert_eq!(a.dim(), b.dim(), "maps of different sizes");
    let (h, w) = a.dim();
    // Per axis, so that a row (a text's tokens) gets SSIM's 1-D form, a 1×7 window.
    let (wh, ww) = (SSIM_WINDOW.min(h).max(1), SSIM_WINDOW.min(w).max(1));
    let (c1, c2) = (0.01f64.powi(2), 0.03f64.powi(2));
    let np = (wh * ww) as f64;
    let cov_norm = if np > 1.0 { np / (np - 1.0) } else { 1.0 };
    let mut total = 0.0;
    let mut count = 0usize;
    for y in 0..=h - wh {
        for x in 0..=w - ww {
            let (mut sa, mut sb, mut saa, mut sbb, mut sab) = (0.0, 0.0, 0.0, 0.0, 0.0);
            for i in y..y + wh {
                for j in x..x + ww {
                    let (p, q) = (a[[i, j]] as f64, b[[i, j]] as f64);
                    sa += p;
                    sb += q;
                    saa += p * p;
                    sbb += q * q;
                    sab += p * q;
                }
            }
            let (ma, mb) = (sa / np, sb / np);
            let va = cov_norm * (saa / np - ma * ma);
            let vb = cov_norm * (sbb / np - mb * mb);
            let vab = cov_norm * (sab / np - ma * mb);
            total += ((2.0 * ma * mb + c1) * (2.0 * vab + c2))
                / ((ma * ma + mb * mb + c1) * (va + vb + c2));
            count += 1;
        }
    }
    total / count.max(1) as f64
}

/// Spearman's ρ of the maps' magnitudes.
pub fn rank_correlation(a: &Array2<f32>, b: &Array2<f32>) -> f64 {
    let (x, y): (Vec<f32>, Vec<f32>) = a
        .iter()
        .zip(b.iter())
        .map(|(p, q)| (p.abs(), q.abs()))
        .unzip();
    finelens_drift::spearman(&x, &y)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssim_is_one_for_equal_maps_and_lower_for_different_ones() {
        let a = Array2::from_shape_fn((16, 16), |(y, x)| ((y * 16 + x) % 7) as f32 / 7.0);
        assert!((ssim(&a, &a) - 1.0).abs() < 1e-12);
        let b = Array2::from_shape_fn((16, 16), |(y, x)| ((y * 5 + x * 3) % 11) as f32 / 11.0);
        let s = ssim(&a, &b);
        assert!(s < 0.5, "{s}");
        assert!((rank_correlation(&a, &a) - 1.0).abs() < 1e-12);
        // A row of tokens: the 1-D form, 1 for itself and lower for a shifted pattern.
        let r = a.slice(ndarray::s![0..1, ..]).to_owned();
        assert!((ssim(&r, &r) - 1.0).abs() < 1e-12);
        assert!(ssim(&r, &b.slice(ndarray::s![0..1, ..]).to_owned()) < 0.5);
        assert_eq!(
            normalised_magnitude(&(&a * -2.0)),
            a.mapv(|v| v / (6.0 / 7.0))
        );
    }
}
