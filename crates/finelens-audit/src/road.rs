//! ROAD, RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci 2022): deletion curves
//! whose removed pixels are filled by *noisy linear imputation* instead of a constant or a blur,
//! so that the image stays in the data's distribution and the mask's shape cannot leak the class.
//!
//! Each removed pixel becomes the weighted mean of its eight neighbours (direct ones 1/6,
//! diagonal ones 1/12, as the paper's imputer), the removed neighbours being unknowns too: one
//! sparse, symmetric, diagonally dominant system per image, shared by the channels, solved by
//! conjugate gradients preconditioned by a multigrid V-cycle on the pixel grid; then Gaussian noise of σ = [`ROAD_NOISE`] (in the model's normalised
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
    let mut out = x.to_vec();
    if removed.iter().all(|&r| !r) {
        return out;
    }
    let fine = Grid::new(h, w, |y, x| removed[y * w + x]);
    let mut solver = Solver::new(fine);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    for ch in 0..c {
        let u = solver.solve(&x[ch * hw..][..hw]);
        // Noise in row-major order of the removed pixels, channel after channel.
        for p in (0..hw).filter(|&p| removed[p]) {
            let e: f32 = StandardNormal.sample(&mut rng);
            out[ch * hw + p] = u[p] as f32 + sigma * e;
        }
    }
    out
}

/// The weight of a direct (edge-sharing) neighbour and of a diagonal one.
const DIRECT: f64 = 1.0 / 6.0;
const DIAGONAL: f64 = 1.0 / 12.0;

/// Conjugate gradients stop at this relative residual: the imputed values' error is then far
/// below the noise added to them (σ = 0.01 on values of order 1).
const TOLERANCE: f64 = 1e-6;

/// Damping of the Jacobi smoother: the stencil's D⁻¹A has its spectrum in (0, 4/3], so ω = 0.8
/// damps the high frequencies by at least |1 − 0.8·4/3| ≈ 0.07 … 0.47 per sweep and keeps the
/// V-cycle positive definite (ω·λ < 2).
const OMEGA: f64 = 0.8;

/// Jacobi sweeps before and after each coarse-grid correction (the same number both ways keeps the
/// V-cycle symmetric): two roughly halved the iterations one needed on ROAD's holes.
const SMOOTHING_SWEEPS: usize = 2;

/// Jacobi sweeps on the coarsest grid (a few pixels a side), enough to nearly solve it.
const COARSEST_SWEEPS: usize = 40;

/// A grid stops being coarsened at this side.
const COARSEST_SIDE: usize = 4;

/// One grid of the hierarchy: h×w pixels in a ring of zeros (so the 3×3 stencil needs no bounds
/// checks), the removed pixels its unknowns. Every vector on it is zero off the unknowns.
struct Grid {
    h: usize,
    w: usize,
    /// 1 at an unknown, 0 at a kept pixel and on the ring.
    mask: Vec<f64>,
    /// A's diagonal at the unknowns (the summed weights of the neighbours inside the image),
    /// 0 elsewhere; and its inverse (0 elsewhere).
    diag: Vec<f64>,
    inv_diag: Vec<f64>,
}

impl Grid {
    fn new(h: usize, w: usize, unknown: impl Fn(usize, usize) -> bool) -> Self {
        let s = w + 2;
        let mut mask = vec![0.0; (h + 2) * s];
        let (mut diag, mut inv_diag) = (mask.clone(), mask.clone());
        for y in 0..h {
            for x in 0..w {
                if !unknown(y, x) {
                    continue;
                }
                let i = (y + 1) * s + x + 1;
                let inside = |dy: isize, dx: isize| {
                    let (ny, nx) = (y as isize + dy, x as isize + dx);
                    ny >= 0 && nx >= 0 && ny < h as isize && nx < w as isize
                };
                let mut d = 0.0;
                for (dy, dx) in [(-1, 0), (1, 0), (0, -1), (0, 1)] {
                    d += if inside(dy, dx) { DIRECT } else { 0.0 };
                }
                for (dy, dx) in [(-1, -1), (-1, 1), (1, -1), (1, 1)] {
                    d += if inside(dy, dx) { DIAGONAL } else { 0.0 };
                }
                // A pixel with no neighbour at all (a 1×1 image) has nothing to be imputed from:
                // its row is 0 = 0 and it stays 0.
                if d > 0.0 {
                    mask[i] = 1.0;
                    diag[i] = d;
                    inv_diag[i] = 1.0 / d;
                }
            }
        }
        Self {
            h,
            w,
            mask,
            diag,
            inv_diag,
        }
    }

    fn stride(&self) -> usize {
        self.w + 2
    }

    fn zeros(&self) -> Vec<f64> {
        vec![0.0; self.mask.len()]
    }

    /// out = A·v: at each unknown, diag·v minus the weighted sum of its neighbours' v; 0
    /// elsewhere. With v the kept pixels' values (0 at the unknowns), −A·v is the right-hand
    /// side: what the kept neighbours contribute to each unknown.
    fn apply(&self, v: &[f64], out: &mut [f64]) {
        let (s, w) = (self.stride(), self.w);
        for y in 1..=self.h {
            let r = y * s;
            // Nine shifted views of equal length, so the loop has no bounds checks and vectorises.
            let row = |o: usize| &v[o..o + w];
            let (ul, uc, ur) = (row(r - s), row(r - s + 1), row(r - s + 2));
            let (ml, mc, mr) = (row(r), row(r + 1), row(r + 2));
            let (dl, dc, dr) = (row(r + s), row(r + s + 1), row(r + s + 2));
            let (mask, diag) = (&self.mask[r + 1..][..w], &self.diag[r + 1..][..w]);
            let out = &mut out[r + 1..][..w];
            for x in 0..w {
                let direct = uc[x] + dc[x] + ml[x] + mr[x];
                let diagonal = ul[x] + ur[x] + dl[x] + dr[x];
                out[x] = diag[x] * mc[x] - mask[x] * (DIRECT * direct + DIAGONAL * diagonal);
            }
        }
    }

    /// out = Pᵀ·t on the coarser grid `coarse` (0 off its unknowns): each coarse node gathers
    /// its fine node and the eight around it with bilinear weights (1, ½ on the axes, ¼ on the
    /// diagonals; the ring absorbs the edges).
    fn restrict(&self, t: &[f64], coarse: &Grid, out: &mut [f64]) {
        let (s, cs) = (self.stride(), coarse.stride());
        for y in 0..coarse.h {
            let c = (2 * y + 1) * s;
            let (a, b, d) = (&t[c - s..c], &t[c..c + s], &t[c + s..c + 2 * s]);
            let mask = &coarse.mask[(y + 1) * cs..][..cs];
            let out = &mut out[(y + 1) * cs..][..cs];
            for x in 0..coarse.w {
                let j = 2 * x + 1;
                let across = |v: &[f64]| 0.5 * v[j - 1] + v[j] + 0.5 * v[j + 1];
                out[x + 1] = mask[x + 1] * (0.5 * across(a) + across(b) + 0.5 * across(d));
            }
        }
    }

    /// e += P·v for `v` on the coarser grid `coarse`: bilinear interpolation (fine node (2y, 2x)
    /// takes coarse node (y, x); the nodes between, the mean of their two or four coarse
    /// neighbours), kept to this grid's unknowns.
    fn prolong(&self, coarse: &Grid, v: &[f64], e: &mut [f64]) {
        let (s, cs) = (self.stride(), coarse.stride());
        let mut line = vec![0.0; cs];
        for y in 0..self.h {
            // The coarse row interpolated to this fine row (coarse rows are padded: row y/2 + 1).
            let (lo, hi) = (y / 2 + 1, y.div_ceil(2) + 1);
            for (l, (a, b)) in line
                .iter_mut()
                .zip(v[lo * cs..][..cs].iter().zip(&v[hi * cs..][..cs]))
            {
                *l = 0.5 * (a + b);
            }
            let r = (y + 1) * s;
            for x in 0..self.w {
                let i = r + x + 1;
                let value = 0.5 * (line[x / 2 + 1] + line[x.div_ceil(2) + 1]);
                e[i] += self.mask[i] * value;
            }
        }
    }

    /// The next coarser grid (every other pixel each way, ⌈h/2⌉ × ⌈w/2⌉), a node unknown when
    /// its fine pixel is (taking in the fine unknowns' 3×3 neighbourhoods instead spreads the
    /// coarse problem past the kept pixels that bound the fine one, and doubled the iterations
    /// on ROAD's holes); None when this one is small enough to smooth to convergence.
    fn coarser(&self) -> Option<Grid> {
        if self.h.min(self.w) <= COARSEST_SIDE {
            return None;
        }
        let s = self.stride();
        Some(Grid::new(self.h.div_ceil(2), self.w.div_ceil(2), |y, x| {
            self.mask[(2 * y + 1) * s + 2 * x + 1] != 0.0
        }))
    }
}

/// A grid and the vectors its V-cycle works in.
struct Level {
    grid: Grid,
    /// The residual handed down, the correction handed back, scratch.
    r: Vec<f64>,
    e: Vec<f64>,
    t: Vec<f64>,
}

/// Conjugate gradients on A·u = b, preconditioned by one multigrid V-cycle (bilinear
/// prolongation P, restriction Pᵀ, the stencil rediscretised on each coarser grid, two damped
/// Jacobi sweeps before and after): a Jacobi preconditioner needs iterations in proportion to the
/// removed region's width (hundreds for ROAD's 50–90% shares of a 224-px image), the V-cycle a
/// roughly constant few. The V-cycle is symmetric and positive definite, so CG converges to A's
/// solution whatever the coarse grids approximate (Briggs, Henson & McCormick, *A Multigrid
/// Tutorial*, 2000; Tatebe 1993 for multigrid-preconditioned CG).
struct Solver {
    levels: Vec<Level>,
    u: Vec<f64>,
    r: Vec<f64>,
    p: Vec<f64>,
    ap: Vec<f64>,
}

impl Solver {
    fn new(fine: Grid) -> Self {
        let mut grids = vec![fine];
        while let Some(g) = grids.last().and_then(Grid::coarser) {
            grids.push(g);
        }
        let levels = grids
            .into_iter()
            .map(|grid| Level {
                r: grid.zeros(),
                e: grid.zeros(),
                t: grid.zeros(),
                grid,
            })
            .collect::<Vec<_>>();
        let z = levels[0].grid.zeros();
        Self {
            levels,
            u: z.clone(),
            r: z.clone(),
            p: z.clone(),
            ap: z,
        }
    }

    /// The unknowns' values (indexed h·w like `plane`, kept pixels 0) given the kept pixels'
    /// values in `plane` (h×w).
    fn solve(&mut self, plane: &[f32]) -> Vec<f64> {
        let Solver {
            levels,
            u,
            r,
            p,
            ap,
        } = self;
        let g = &levels[0].grid;
        let (h, w, s) = (g.h, g.w, g.stride());
        // b = −A·(kept values): p holds the kept plane for the moment.
        for y in 0..h {
            for x in 0..w {
                let i = (y + 1) * s + x + 1;
                p[i] = (1.0 - g.mask[i]) * plane[y * w + x] as f64;
            }
        }
        g.apply(p, ap);
        for (ri, &a) in r.iter_mut().zip(ap.iter()) {
            *ri = -a;
        }
        u.fill(0.0);
        let target = TOLERANCE * TOLERANCE * dot(r, r).max(f64::MIN_POSITIVE);
        levels[0].r.copy_from_slice(r);
        v_cycle(levels);
        p.copy_from_slice(&levels[0].e);
        let mut rz = dot(r, &levels[0].e);
        for _ in 0..MAX_ITERATIONS {
            if dot(r, r) <= target {
                break;
            }
            levels[0].grid.apply(p, ap);
            let alpha = rz / dot(p, ap);
            for i in 0..u.len() {
                u[i] += alpha * p[i];
                r[i] -= alpha * ap[i];
            }
            levels[0].r.copy_from_slice(r);
            v_cycle(levels);
            let z = &levels[0].e;
            let rz_next = dot(r, z);
            let beta = rz_next / rz;
            rz = rz_next;
            for i in 0..p.len() {
                p[i] = z[i] + beta * p[i];
            }
        }
        let mut values = vec![0.0; h * w];
        for y in 0..h {
            values[y * w..][..w].copy_from_slice(&u[(y + 1) * s + 1..][..w]);
        }
        values
    }
}

/// Σ aᵢbᵢ in eight running sums (a single one would be a serial chain of additions).
fn dot(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f64 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for k in 0..8 {
            sums[k] += x[k] * y[k];
        }
    }
    sums.iter().sum::<f64>() + tail
}

/// A safety net: the V-cycle preconditioned iteration converges in a few dozen.
const MAX_ITERATIONS: usize = 1000;

/// levels[0].e = M⁻¹·levels[0].r, one V-cycle from the finest grid down.
fn v_cycle(levels: &mut [Level]) {
    let (level, coarser) = levels.split_first_mut().expect("at least one level");
    let Level { grid, r, e, t } = level;
    // Pre-smoothing from e = 0: the first damped Jacobi sweep is e = ω·D⁻¹·r.
    for ((e, &r), &d) in e.iter_mut().zip(r.iter()).zip(&grid.inv_diag) {
        *e = OMEGA * d * r;
    }
    for _ in 1..SMOOTHING_SWEEPS {
        jacobi(grid, r, e, t);
    }
    let Some(next) = coarser.first_mut() else {
        for _ in 1..COARSEST_SWEEPS {
            jacobi(grid, r, e, t);
        }
        return;
    };
    // Restrict the residual r − A·e with Pᵀ, correct with the coarse grid's e prolonged by P.
    grid.apply(e, t);
    for (t, &r) in t.iter_mut().zip(r.iter()) {
        *t = r - *t;
    }
    grid.restrict(t, &next.grid, &mut next.r);
    v_cycle(coarser);
    grid.prolong(&coarser[0].grid, &coarser[0].e, e);
    for _ in 0..SMOOTHING_SWEEPS {
        jacobi(grid, r, e, t);
    }
}

/// One damped Jacobi sweep on A·e = r: e += ω·D⁻¹·(r − A·e).
fn jacobi(grid: &Grid, r: &[f64], e: &mut [f64], t: &mut [f64]) {
    grid.apply(e, t);
    for i in 0..e.len() {
        e[i] += OMEGA * grid.inv_diag[i] * (r[i] - t[i]);
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

    /// The imputation's defining equations, on holes the multigrid's coarse grids matter for: a
    /// large block, a block touching two edges of the image, and 90% of the pixels scattered at
    /// random, on odd, non-square sizes, with smooth but non-linear data (so nothing is exact by
    /// accident). Without noise every removed pixel must equal its in-image neighbours' weighted
    /// mean (the diagonal normalising at the image's edge) to float precision.
    #[test]
    fn every_imputed_pixel_is_its_neighbours_weighted_mean() {
        let (c, h, w) = (3, 45, 62);
        let x: Vec<f32> = (0..c * h * w)
            .map(|i| {
                let (ch, p) = (i / (h * w), i % (h * w));
                let (y, x) = ((p / w) as f32, (p % w) as f32);
                (0.21 * y + ch as f32).sin() * (0.13 * x).cos() + 0.01 * x * y / (1.0 + ch as f32)
            })
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let holes: Vec<Vec<bool>> = vec![
            (0..h * w)
                .map(|p| (5..38).contains(&(p / w)) && (8..50).contains(&(p % w)))
                .collect(),
            (0..h * w).map(|p| p / w < 20 && p % w < 30).collect(),
            (0..h * w)
                .map(|_| rand::Rng::random_bool(&mut rng, 0.9))
                .collect(),
        ];
        for (k, removed) in holes.iter().enumerate() {
            let out = impute(&x, (c, h, w), removed, 0.0, 3);
            for ch in 0..c {
                let plane = &out[ch * h * w..][..h * w];
                for p in (0..h * w).filter(|&p| removed[p]) {
                    let (y, xx) = ((p / w) as isize, (p % w) as isize);
                    let (mut sum, mut weight) = (0.0f64, 0.0f64);
                    for dy in -1..=1isize {
                        for dx in -1..=1isize {
                            let (ny, nx) = (y + dy, xx + dx);
                            if (dy, dx) == (0, 0)
                                || ny < 0
                                || nx < 0
                                || ny >= h as isize
                                || nx >= w as isize
                            {
                                continue;
                            }
                            let wt = if dy == 0 || dx == 0 { DIRECT } else { DIAGONAL };
                            sum += wt * plane[ny as usize * w + nx as usize] as f64;
                            weight += wt;
                        }
                    }
                    let mean = sum / weight;
                    assert!(
                        (plane[p] as f64 - mean).abs() < 2e-5,
                        "hole {k}, channel {ch}, pixel ({y}, {xx}): {} vs {mean}",
                        plane[p]
                    );
                }
                for p in (0..h * w).filter(|&p| !removed[p]) {
                    assert_eq!(plane[p], x[ch * h * w + p]);
                }
            }
        }
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
