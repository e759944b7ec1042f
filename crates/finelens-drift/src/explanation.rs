//! Explanation drift: how similar two attribution maps of the same input are.

/// Ranks 1..n with ties given their average rank.
fn ranks(v: &[f32]) -> Vec<f64> {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        i = j + 1;
    }
    r
}

/// Pearson's correlation; 1 for two constant sequences, 0 for one.
pub fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let (mut cov, mut va, mut vb) = (0.0, 0.0, 0.0);
    for (x, y) in a.iter().zip(b) {
        cov += (x - ma) * (y - mb);
        va += (x - ma).powi(2);
        vb += (y - mb).powi(2);
    }
    if va == 0.0 || vb == 0.0 {
        return if va == vb { 1.0 } else { 0.0 };
    }
    cov / (va * vb).sqrt()
}

/// Spearman's rank correlation: Pearson's correlation of the ranks (ties averaged).
pub fn spearman(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "maps of different sizes");
    pearson(&ranks(a), &ranks(b))
}

/// Intersection over union of the `fraction` (0, 1] of cells with the largest |value| in each
/// map: do the two maps point at the same place?
pub fn top_k_iou(a: &[f32], b: &[f32], fraction: f64) -> f64 {
    assert_eq!(a.len(), b.len(), "maps of different sizes");
    let k = ((a.len() as f64 * fraction).round() as usize).clamp(1, a.len().max(1));
    let top = |v: &[f32]| {
        let mut idx: Vec<usize> = (0..v.len()).collect();
        idx.sort_by(|&x, &y| v[y].abs().total_cmp(&v[x].abs()));
        let mut mask = vec![false; v.len()];
        idx.into_iter().take(k).for_each(|i| mask[i] = true);
        mask
    };
    let (ta, tb) = (top(a), top(b));
    let inter = ta.iter().zip(&tb).filter(|(x, y)| **x && **y).count();
    let union = ta.iter().zip(&tb).filter(|(x, y)| **x || **y).count();
    if union == 0 {
        1.0
    } else {
        inter as f64 / union as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spearman_and_iou_on_known_cases() {
        let a = [1.0, 2.0, 3.0, 4.0, 5.0];
        assert!((spearman(&a, &[10.0, 20.0, 30.0, 40.0, 50.0]) - 1.0).abs() < 1e-12);
        assert!((spearman(&a, &[5.0, 4.0, 3.0, 2.0, 1.0]) + 1.0).abs() < 1e-12);
        // Monotone but non-linear: still 1.
        assert!((spearman(&a, &[1.0, 8.0, 27.0, 64.0, 125.0]) - 1.0).abs() < 1e-12);
        // With ties: scipy.stats.spearmanr([1,2,2,3], [1,3,2,4]) = 0.9486832980505138.
        assert!(
            (spearman(&[1.0, 2.0, 2.0, 3.0], &[1.0, 3.0, 2.0, 4.0]) - 0.9486832980505138).abs()
                < 1e-12
        );
        assert_eq!(top_k_iou(&a, &a, 0.4), 1.0);
        // Top 2 of a = {3, 4}; of b = {0, 4}: IoU = 1/3.
        assert!((top_k_iou(&a, &[9.0, 0.0, 0.0, 0.0, 8.0], 0.4) - 1.0 / 3.0).abs() < 1e-12);
    }
}
