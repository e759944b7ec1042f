//! ROAD, RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022): deletion curves
//! whose removed pixels are filled by *noisy linear imputation* instead of a constant or a blur,
//! so that the image stays in the data's distribution and the mask's shape cannot leak the class.
//!
//! Each removed pixel becomes the weighted mean of its eight neighbours (direct ones 1/6,
//! diagonal ones 1/12, as the paper's imputer), the removed neighbours being unknowns too: one
//! sparse, symmetric, diagonally dominant system per image, shared by the channels, solved by
//! conjugate gradients; then Gaussian noise of σ = [`ROAD_NOISE`] (in the model's normalised
//! units) is added to the imputed values. Removing the most relevant pixels first (MoRF) should
//! drop the target's probability fast; removing the least relevant first (LeRF), slowly.

use candle_core::{DType, Tensor};
use finelens_models::{Classifier, Mode};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::Result;
use crate::faithfulness::auc;
#[cfg(doc)]
use crate::faithfulness::relevance_order;

/// The shares of pixels removed, as in the paper's curves (10% … 90%).
pub const ROAD_PERCENTAGES: [f64; 9] = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9];

/// The imputation noise σ (the paper's 0.01 on [0, 1] images is ≈ 0.04 in ImageNet-normalised
/// units; we keep the paper's value in the model's units, so it is slightly gentler).
pub const ROAD_NOISE: f32 = 0.01;

/// The neighbours and their weights.
const NEIGHBOURS: [(isize, isize, f64); 8] = [
    (-1, 0, 1.0 / 6.0),
    (1, 0, 1.0 / 6.0),
    (0, -1, 1.0 / 6.0),
    (0, 1, 1.0 / 6.0),
    (-1, -1, 1.0 / 12.0),
    (-1, 1, 1.0 / 12.0),
    (1, -1, 1.0 / 12.0),
    (1, 1, 1.0 / 12.0),
];

/// `x` (C×H×W, flat) with the pixels `removed` (H×W) replaced by the linear imputation of their
/// neighbours plus N(0, σ²) noise drawn from `seed`; the other pixels unchanged.
pub fn impute(
    x: &[f32],
    (c, h, w): (usize, usize, usize),
    removed: &[bool],
    sigma: f32,
    seed: u64,
) -> Vec<f32> {
    let hw = h * w;
    let unknown: Vec<usize> = (0..hw).filter(|&p| removed[p]).collect();
    let mut slot = vec![usize::MAX; hw];
    for (k, &p) in unknown.iter().enumerate() {
        slot[p] = k;
    }
    // Row k: diag[k]·u_k − Σ w·u_j (removed neighbours) = Σ w·x (kept neighbours). Both sums are
    // kept as flat rows (row k's entries at [start[k], start[k + 1])).
    let mut system = Sparse::default();
    let mut known = Sparse::default();
    for &p in &unknown {
        let (y, xx) = ((p / w) as isize, (p % w) as isize);
        let mut d = 0.0;
        for &(dy, dx, wt) in &NEIGHBOURS {
            let (ny, nx) = (y + dy, xx + dx);
            if ny < 0 || nx < 0 || ny >= h as isize || nx >= w as isize {
                continue;
            }
            let q = ny as usize * w + nx as usize;
            d += wt;
            if removed[q] {
                system.push(slot[q], wt);
            } else {
                known.push(q, wt);
            }
        }
        system.end_row(d);
        known.end_row(0.0);
    }
    let mut out = x.to_vec();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut cg = Workspace::new(unknown.len());
    let mut b = vec![0f64; unknown.len()];
    for ch in 0..c {
        let plane = &x[ch * hw..][..hw];
        for (k, bk) in b.iter_mut().enumerate() {
            *bk = known.row(k).map(|(q, wt)| wt * plane[q] as f64).sum();
        }
        let u = cg.solve(&system, &b);
        for (k, &p) in unknown.iter().enumerate() {
            let e: f32 = StandardNormal.sample(&mut rng);
            out[ch * hw + p] = u[k] as f32 + sigma * e;
        }
    }
    out
}

/// Rows of (column, weight) entries stored flat, with a diagonal per row.
#[derive(Default)]
struct Sparse {
    start: Vec<usize>,
    column: Vec<usize>,
    weight: Vec<f64>,
    diag: Vec<f64>,
}

impl Sparse {
    fn push(&mut self, column: usize, weight: f64) {
        if self.start.is_empty() {
            self.start.push(0);
        }
        self.column.push(column);
        self.weight.push(weight);
    }

    fn end_row(&mut self, diag: f64) {
        if self.start.is_empty() {
            self.start.push(0);
        }
        self.start.push(self.column.len());
        self.diag.push(diag);
    }

    fn row(&self, k: usize) -> impl Iterator<Item = (usize, f64)> + '_ {
        let r = self.start[k]..self.start[k + 1];
        self.column[r.clone()]
            .iter()
            .copied()
            .zip(self.weight[r].iter().copied())
    }
}

/// Conjugate gradients' vectors, reused across the channels.
struct Workspace {
    u: Vec<f64>,
    r: Vec<f64>,
    z: Vec<f64>,
    p: Vec<f64>,
    ap: Vec<f64>,
}

impl Workspace {
    fn new(n: usize) -> Self {
        let v = || vec![0f64; n];
        Self {
            u: v(),
            r: v(),
            z: v(),
            p: v(),
            ap: v(),
        }
    }

    /// Solves A·u = b for A = diag − the rows' entries (symmetric, diagonally dominant) by
    /// Jacobi-preconditioned conjugate gradients, to a relative residual of 1e-6: the imputed
    /// values' error is then far below the noise added to them (σ = 0.01 on values of order 1),
    /// at half the iterations 1e-12 takes.
    fn solve(&mut self, a: &Sparse, b: &[f64]) -> &[f64] {
        let n = b.len();
        let dot = |x: &[f64], y: &[f64]| x.iter().zip(y).map(|(x, y)| x * y).sum::<f64>();
        let Workspace { u, r, z, p, ap } = self;
        u.fill(0.0);
        r.copy_from_slice(b);
        for k in 0..n {
            z[k] = r[k] / a.diag[k];
        }
        p.copy_from_slice(z);
        let mut rz = dot(r, z);
        let target = 1e-12 * dot(b, b).max(f64::MIN_POSITIVE);
        for _ in 0..10 * n.max(10) {
            if dot(r, r) <= target {
                break;
            }
            for k in 0..n {
                ap[k] = a.diag[k] * p[k] - a.row(k).map(|(j, wt)| wt * p[j]).sum::<f64>();
            }
            let alpha = rz / dot(p, ap);
            for k in 0..n {
                u[k] += alpha * p[k];
                r[k] -= alpha * ap[k];
                z[k] = r[k] / a.diag[k];
            }
            let rz_next = dot(r, z);
            let beta = rz_next / rz;
            rz = rz_next;
            for k in 0..n {
                p[k] = z[k] + beta * p[k];
            }
        }
        u
    }
}

/// One image's ROAD curves: the target's probability with each share of [`ROAD_PERCENTAGES`]
/// removed, most relevant pixels first (MoRF) and least relevant first (LeRF).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RoadCurves {
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub morf: Vec<f64>,
    #[serde(deserialize_with = "finelens_models::json::vec_f64_or_nan")]
    pub lerf: Vec<f64>,
}

/// ROAD's curves for one image `x` (1×C×H×W) and its pixels in decreasing relevance
/// ([`relevance_order`] of its map).
pub fn road_curves(
    model: &dyn Classifier,
    x: &Tensor,
    order: &[usize],
    target: usize,
    seed: u64,
) -> Result<RoadCurves> {
    let (_, c, h, w) = x.dims4()?;
    let hw = h * w;
    let xv: Vec<f32> = x.to_dtype(DType::F32)?.flatten_all()?.to_vec1()?;
    let m = 2 * ROAD_PERCENTAGES.len();
    // The 18 imputations are independent: one per core at a time.
    let images: Vec<Vec<f32>> = (0..m)
        .into_par_iter()
        .map(|j| {
            let (most_first, share) = (
                j < ROAD_PERCENTAGES.len(),
                ROAD_PERCENTAGES[j % ROAD_PERCENTAGES.len()],
            );
            let k = (share * hw as f64).round() as usize;
            let mut removed = vec![false; hw];
            let picked = if most_first {
                &order[..k]
            } else {
                &order[hw - k..]
            };
            for &p in picked {
                removed[p] = true;
            }
            let s = seed ^ (j as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
            impute(&xv, (c, h, w), &removed, ROAD_NOISE, s)
        })
        .collect();
    let batch = images.concat();
    let t = Tensor::from_vec(batch, (m, c, h, w), x.device())?.to_dtype(x.dtype())?;
    let logits = model.forward(&t, Mode::Eval)?.to_dtype(DType::F64)?;
    let p = logits.broadcast_sub(&logits.max_keepdim(1)?)?.exp()?;
    let p: Vec<f64> = p
        .broadcast_div(&p.sum_keepdim(1)?)?
        .narrow(1, target, 1)?
        .flatten_all()?
        .to_vec1()?;
    let n = ROAD_PERCENTAGES.len();
    Ok(RoadCurves {
        morf: p[..n].to_vec(),
        lerf: p[n..].to_vec(),
    })
}

/// A method's ROAD figures, means over the images: the areas under the MoRF and LeRF curves
/// (over the removed shares) and their gap, LeRF − MoRF, above 0 when the map ranks pixels
/// better than its reverse.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Road {
    pub images: usize,
    pub percentages: Vec<f64>,
    /// Mean probability per share removed.
    pub morf: Vec<f64>,
    pub lerf: Vec<f64>,
    pub morf_auc: f64,
    pub lerf_auc: f64,
    pub gap: f64,
}

impl Road {
    pub fn summarise(all: &[RoadCurves]) -> Option<Road> {
        let n = all.len();
        if n == 0 {
            return None;
        }
        let mean = |f: &dyn Fn(&RoadCurves) -> &Vec<f64>| -> Vec<f64> {
            (0..ROAD_PERCENTAGES.len())
                .map(|i| all.iter().map(|c| f(c)[i]).sum::<f64>() / n as f64)
                .collect()
        };
        let (morf, lerf) = (mean(&|c| &c.morf), mean(&|c| &c.lerf));
        let (morf_auc, lerf_auc) = (auc(&morf), auc(&lerf));
        Some(Road {
            images: n,
            percentages: ROAD_PERCENTAGES.to_vec(),
            morf,
            lerf,
            morf_auc,
            lerf_auc,
            gap: lerf_auc - morf_auc,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A linear ramp is its own neighbours' weighted mean (the weights are symmetric and sum to
    /// 1), so without noise the imputation gives it back exactly — for any hole that leaves a
    /// kept pixel around it, including holes touching each other; kept pixels never change.
    #[test]
    fn imputation_restores_a_linear_ramp_and_adds_the_noise_asked_for() {
        let (c, h, w) = (2, 12, 15);
        let ramp: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (ch, p) = (i / (h * w), i % (h * w));
                let (y, x) = ((p / w) as f32, (p % w) as f32);
                0.3 * y - 0.2 * x + ch as f32
            })
            .collect();
        // Interior holes: a 3×4 block, a diagonal line, scattered pixels.
        let mut removed = vec![false; h * w];
        for y in 3..6 {
            for x in 4..8 {
                removed[y * w + x] = true;
            }
        }
        for k in 2..9 {
            removed[k * w + k + 4] = true;
        }
        for p in [9 * w + 2, 10 * w + 12, 7 * w + 11] {
            removed[p] = true;
        }
        let out = impute(&ramp, (c, h, w), &removed, 0.0, 1);
        for (i, (a, b)) in out.iter().zip(&ramp).enumerate() {
            assert!((a - b).abs() < 1e-4, "pixel {i}: {a} vs {b}");
        }
        // With noise σ the imputed pixels scatter by σ around the ramp; kept ones are exact.
        let sigma = 0.5;
        let noisy = impute(&ramp, (c, h, w), &removed, sigma, 2);
        let mut sq = Vec::new();
        for ch in 0..c {
            for p in 0..h * w {
                let (a, b) = (noisy[ch * h * w + p], ramp[ch * h * w + p]);
                if removed[p] {
                    sq.push(((a - b) as f64).powi(2));
                } else {
                    assert_eq!(a, b);
                }
            }
        }
        let sd = (sq.iter().sum::<f64>() / sq.len() as f64).sqrt();
        assert!((sd - sigma as f64).abs() < 0.15, "σ {sd}");
        // Seeded.
        assert_eq!(noisy, impute(&ramp, (c, h, w), &removed, sigma, 2));
    }

    #[test]
    fn summaries_are_means_and_their_areas() {
        let n = ROAD_PERCENTAGES.len();
        let c = |m: f64, l: f64| RoadCurves {
            morf: vec![m; n],
            lerf: vec![l; n],
        };
        let r = Road::summarise(&[c(0.2, 0.9), c(0.4, 0.7)]).unwrap();
        assert!((r.morf_auc - 0.3).abs() < 1e-12 && (r.lerf_auc - 0.8).abs() < 1e-12);
        assert!((r.gap - 0.5).abs() < 1e-12);
        assert!(Road::summarise(&[]).is_none());
    }
}
