//! WeightWatcher's per-layer spectral analysis (Martin & Mahoney 2021, "Implicit
//! self-regularization in deep neural networks"; the `weightwatcher` package): the empirical
//! spectral density (ESD) of a weight matrix — the eigenvalues λ = σ² of WᵀW, unnormalised as
//! WeightWatcher's default — and what it says about training:
//!
//! * **α**: the exponent of a power law p(λ) ∝ λ^−α fitted to the ESD's tail by maximum likelihood,
//!   α = 1 + n / Σ ln(λᵢ / λ_min), with λ_min the candidate that minimises the Kolmogorov–Smirnov
//!   distance between the tail and the fit (Clauset, Shalizi & Newman 2009, as the `powerlaw`
//!   package fits continuous data). WeightWatcher's reading: α < 2 over-fit (over-correlated),
//!   2–6 well trained, > 6 under-trained.
//! * **α̂** = α · log₁₀ λ_max (WeightWatcher's `alpha_weighted`), and **log spectral norm**
//!   log₁₀ λ_max.
//! * **Marchenko–Pastur soft rank** λ⁺ / λ_max, λ⁺ = N·σ²·(1 + √(M/N))² the edge of the bulk a
//!   matrix of i.i.d. entries with W's element variance σ² would have (N ≥ M its sides): near 1,
//!   W looks random; near 0, a few directions dominate.
//! * **correlation traps**: the eigenvalues above λ⁺ (plus [`TRAP_MARGIN`] for finite-size
//!   fluctuations) of W with its elements randomly permuted (seeded) — a permutation destroys
//!   correlations, so what stays above the bulk are single large elements.
//!
//! A convolution's kernel (out × in × k × k) is read as one out × (in·k·k) matrix, its rows the
//! output channels' filters (not per k×k slice).

use finelens_models::kernel::{gemm_into, View};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

/// Candidate tails shorter than this are not fitted (the MLE's error is (α − 1)/√n).
pub const MIN_TAIL: usize = 10;

/// A randomised matrix's eigenvalue counts as a trap above (1 + this) · λ⁺.
pub const TRAP_MARGIN: f64 = 0.1;

/// One matrix's spectral figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Spectrum {
    /// Eigenvalues of WᵀW (the smaller side's count).
    pub eigenvalues: usize,
    pub lambda_max: f64,
    /// The power-law fit of the tail; `None` with fewer than [`MIN_TAIL`] positive eigenvalues.
    pub alpha: Option<f64>,
    /// The fit's standard error, (α − 1)/√n.
    pub alpha_sigma: Option<f64>,
    pub lambda_min: Option<f64>,
    pub tail: Option<usize>,
    /// The Kolmogorov–Smirnov distance of the fit.
    pub ks_distance: Option<f64>,
    pub alpha_weighted: Option<f64>,
    pub log_spectral_norm: f64,
    pub mp_soft_rank: f64,
    pub correlation_traps: usize,
}

/// WeightWatcher's readings of α, in order of α.
pub const READINGS: [&str; 3] = [
    "over-fit (α < 2)",
    "well trained (2 ≤ α ≤ 6)",
    "under-trained (α > 6)",
];

/// Which of [`READINGS`] α falls in.
pub fn reading_index(alpha: f64) -> usize {
    if alpha < 2.0 {
        0
    } else if alpha <= 6.0 {
        1
    } else {
        2
    }
}

/// WeightWatcher's reading of α.
pub fn reading(alpha: f64) -> &'static str {
    READINGS[reading_index(alpha)]
}

/// The spectrum of a rows × cols matrix (row-major); `seed` permutes it for the traps.
pub fn spectrum(w: &[f32], rows: usize, cols: usize, seed: u64) -> Spectrum {
    // The matrix's and its shuffled copy's eigenproblems are independent: one per core.
    let (mut evals, shuffled) = rayon::join(
        || eigenvalues_of_gram(w, rows, cols),
        || {
            let mut shuffled = w.to_vec();
            shuffled.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
            eigenvalues_of_gram(&shuffled, rows, cols)
        },
    );
    evals.sort_by(f64::total_cmp);
    let lambda_max = evals.last().copied().unwrap_or(0.0).max(0.0);
    let fit = fit_power_law(&evals);
    let (n, m) = (rows.max(cols) as f64, rows.min(cols) as f64);
    let count = w.len().max(1) as f64;
    let mean = w.iter().map(|&v| v as f64).sum::<f64>() / count;
    let variance = w.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / count;
    let edge = n * variance * (1.0 + (m / n).sqrt()).powi(2);
    let traps = shuffled
        .into_iter()
        .filter(|&l| l > (1.0 + TRAP_MARGIN) * edge)
        .count();
    Spectrum {
        eigenvalues: evals.len(),
        lambda_max,
        alpha: fit.map(|f| f.alpha),
        alpha_sigma: fit.map(|f| (f.alpha - 1.0) / (f.tail as f64).sqrt()),
        lambda_min: fit.map(|f| f.xmin),
        tail: fit.map(|f| f.tail),
        ks_distance: fit.map(|f| f.ks),
        alpha_weighted: fit.map(|f| f.alpha * lambda_max.log10()),
        log_spectral_norm: lambda_max.log10(),
        mp_soft_rank: if lambda_max > 0.0 {
            edge / lambda_max
        } else {
            0.0
        },
        correlation_traps: traps,
    }
}

/// A power-law fit of a tail.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PowerLaw {
    pub alpha: f64,
    pub xmin: f64,
    pub tail: usize,
    pub ks: f64,
}

/// Clauset et al.'s fit of `values` (sorted ascending): for each distinct candidate x_min with at
/// least [`MIN_TAIL`] values at or above it, α = 1 + n / Σ ln(x/x_min) over that tail and the KS
/// distance maxₖ |(1 − (xₖ/x_min)^(1−α)) − k/n| over the tail's sorted values (k = 0 … n − 1, as
/// the `powerlaw` package computes it); the candidate with the smallest distance wins. Unlike
/// `powerlaw` 2.0's default, no candidate is dropped for an α outside [0, 3]: WeightWatcher's
/// reading needs α up to 6 and beyond.
pub fn fit_power_law(values: &[f64]) -> Option<PowerLaw> {
    let x: Vec<f64> = values.iter().copied().filter(|v| *v > 0.0).collect();
    let mut best: Option<PowerLaw> = None;
    let mut i = 0;
    while i + MIN_TAIL <= x.len() {
        let xmin = x[i];
        let tail = &x[i..];
        let n = tail.len() as f64;
        let logs: f64 = tail.iter().map(|v| (v / xmin).ln()).sum();
        if logs > 0.0 {
            let alpha = 1.0 + n / logs;
            let ks = tail
                .iter()
                .enumerate()
                .map(|(k, v)| {
                    let f = 1.0 - (v / xmin).powf(1.0 - alpha);
                    (f - k as f64 / n).abs()
                })
                .fold(0.0, f64::max);
            if best.is_none_or(|b| ks < b.ks) {
                best = Some(PowerLaw {
                    alpha,
                    xmin,
                    tail: tail.len(),
                    ks,
                });
            }
        }
        // The next distinct value.
        while i < x.len() && x[i] == xmin {
            i += 1;
        }
    }
    best
}

/// Eigenvalues of WᵀW (or WWᵀ, the smaller: they share the non-zero ones) of a rows × cols
/// matrix.
pub fn eigenvalues_of_gram(w: &[f32], rows: usize, cols: usize) -> Vec<f64> {
    if rows == 0 || cols == 0 {
        return Vec::new();
    }
    // The smaller side's vectors as rows of `v` (k × len).
    let (k, len, v): (usize, usize, Vec<f64>) = if rows <= cols {
        (rows, cols, w.iter().map(|&x| x as f64).collect())
    } else {
        let mut t = vec![0f64; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = w[r * cols + c] as f64;
            }
        }
        (cols, rows, t)
    };
    // G = V·Vᵀ by GEMM in f64 (a word-embedding matrix, 30,522 × 384, is 9 GFLOP: a plain
    // dot-product loop took seconds).
    let mut gram = vec![0f64; k * k];
    let vm = View::rows(&v, k, len);
    gemm_into(&mut gram, k, vm, vm.t(), false);
    symmetric_eigenvalues(gram, k)
}

/// Eigenvalues of a symmetric n × n matrix (row-major): Householder reduction to tridiagonal
/// form, then the implicit QL algorithm with Wilkinson shifts (Numerical Recipes' `tred2` and
/// `tqli`, eigenvalues only).
pub fn symmetric_eigenvalues(mut a: Vec<f64>, n: usize) -> Vec<f64> {
    if n == 0 {
        return Vec::new();
    }
    let mut d = vec![0f64; n];
    let mut e = vec![0f64; n];
    // tred2 without the eigenvectors.
    for i in (1..n).rev() {
        let l = i - 1;
        let mut h = 0.0;
        if l > 0 {
            let scale: f64 = (0..=l).map(|k| a[i * n + k].abs()).sum();
            if scale == 0.0 {
                e[i] = a[i * n + l];
            } else {
                for k in 0..=l {
                    a[i * n + k] /= scale;
                    h += a[i * n + k] * a[i * n + k];
                }
                let f = a[i * n + l];
                let g = if f >= 0.0 { -h.sqrt() } else { h.sqrt() };
                e[i] = scale * g;
                h -= f * g;
                a[i * n + l] = f - g;
                let mut f = 0.0;
                for j in 0..=l {
                    let mut g = 0.0;
                    for k in 0..=j {
                        g += a[j * n + k] * a[i * n + k];
                    }
                    for k in j + 1..=l {
                        g += a[k * n + j] * a[i * n + k];
                    }
                    e[j] = g / h;
                    f += e[j] * a[i * n + j];
                }
                let hh = f / (h + h);
                for j in 0..=l {
                    let f = a[i * n + j];
                    let g = e[j] - hh * f;
                    e[j] = g;
                    for k in 0..=j {
                        a[j * n + k] -= f * e[k] + g * a[i * n + k];
                    }
                }
            }
        } else {
            e[i] = a[i * n + l];
        }
        d[i] = h;
    }
    for i in 0..n {
        d[i] = a[i * n + i];
    }
    // tqli.
    for i in 1..n {
        e[i - 1] = e[i];
    }
    e[n - 1] = 0.0;
    for l in 0..n {
        let mut iter = 0;
        loop {
            let mut m = l;
            while m + 1 < n {
                let dd = d[m].abs() + d[m + 1].abs();
                if e[m].abs() <= f64::EPSILON * dd {
                    break;
                }
                m += 1;
            }
            if m == l {
                break;
            }
            iter += 1;
            if iter > 60 {
                break;
            }
            let mut g = (d[l + 1] - d[l]) / (2.0 * e[l]);
            let mut r = g.hypot(1.0);
            g = d[m] - d[l] + e[l] / (g + if g >= 0.0 { r.abs() } else { -r.abs() });
            let (mut s, mut c, mut p) = (1.0, 1.0, 0.0);
            let mut underflow = false;
            let mut i = m;
            while i > l {
                i -= 1;
                let f = s * e[i];
                let b = c * e[i];
                r = f.hypot(g);
                e[i + 1] = r;
                if r == 0.0 {
                    d[i + 1] -= p;
                    e[m] = 0.0;
                    underflow = true;
                    break;
                }
                s = f / r;
                c = g / r;
                g = d[i + 1] - p;
                r = (d[i] - g) * s + 2.0 * c * b;
                p = s * r;
                d[i + 1] = g + p;
                g = c * r - b;
            }
            if underflow {
                continue;
            }
            d[l] -= p;
            e[l] = g;
            e[m] = 0.0;
        }
    }
    d
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// The tridiagonal Toeplitz matrix (2 on the diagonal, −1 beside it) has eigenvalues
    /// 2 − 2cos(kπ/(n+1)); a random symmetric matrix's eigenvalues keep its trace and Frobenius
    /// norm.
    #[test]
    fn eigenvalues_have_their_closed_forms_and_invariants() {
        let n = 37;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            a[i * n + i] = 2.0;
            if i + 1 < n {
                a[i * n + i + 1] = -1.0;
                a[(i + 1) * n + i] = -1.0;
            }
        }
        let mut got = symmetric_eigenvalues(a, n);
        got.sort_by(f64::total_cmp);
        for (k, g) in got.iter().enumerate() {
            let want = 2.0 - 2.0 * ((k + 1) as f64 * std::f64::consts::PI / (n + 1) as f64).cos();
            assert!((g - want).abs() < 1e-12, "{k}: {g} vs {want}");
        }
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let n = 50;
        let mut a = vec![0f64; n * n];
        for i in 0..n {
            for j in 0..=i {
                let v: f64 = StandardNormal.sample(&mut rng);
                a[i * n + j] = v;
                a[j * n + i] = v;
            }
        }
        let trace: f64 = (0..n).map(|i| a[i * n + i]).sum();
        let frobenius: f64 = a.iter().map(|v| v * v).sum();
        let l = symmetric_eigenvalues(a, n);
        assert!((l.iter().sum::<f64>() - trace).abs() < 1e-9);
        assert!((l.iter().map(|v| v * v).sum::<f64>() - frobenius).abs() < 1e-8 * frobenius);
    }

    /// The Gram matrix's eigenvalues are the squared singular values: for W = diag(s) padded
    /// with zero rows (and its transpose), exactly s².
    #[test]
    fn gram_eigenvalues_are_squared_singular_values() {
        let s = [3.0f32, 1.5, 0.5, 2.0];
        let (rows, cols) = (6, 4);
        let mut w = vec![0f32; rows * cols];
        for (i, &v) in s.iter().enumerate() {
            w[i * cols + i] = v;
        }
        let mut wt = vec![0f32; rows * cols];
        for r in 0..rows {
            for c in 0..cols {
                wt[c * rows + r] = w[r * cols + c];
            }
        }
        let mut want: Vec<f64> = s.iter().map(|&v| (v as f64).powi(2)).collect();
        want.sort_by(f64::total_cmp);
        for (m, r, c) in [(&w, rows, cols), (&wt, cols, rows)] {
            let mut got = eigenvalues_of_gram(m, r, c);
            got.sort_by(f64::total_cmp);
            assert_eq!(got.len(), 4);
            for (g, w) in got.iter().zip(&want) {
                assert!((g - w).abs() < 1e-12, "{g} vs {w}");
            }
        }
    }

    /// 4,000 draws from a Pareto law with α = 2.5 above x_min = 1 (inverse CDF): the fit finds
    /// α within three standard errors and x_min near 1.
    #[test]
    fn the_fit_recovers_a_known_power_law() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut x: Vec<f64> = (0..4000)
            .map(|_| (1.0 - rng.random::<f64>()).powf(-1.0 / 1.5))
            .collect();
        x.sort_by(f64::total_cmp);
        let f = fit_power_law(&x).unwrap();
        let sigma = (f.alpha - 1.0) / (f.tail as f64).sqrt();
        assert!((f.alpha - 2.5).abs() < 3.0 * sigma + 0.02, "{f:?}");
        assert!(f.xmin < 1.5 && f.tail > 1000, "{f:?}");
        assert!(fit_power_law(&x[..5]).is_none(), "too short a tail");
    }

    /// Against scripts/spectrum_reference.py (numpy's eigvalsh and the same fit in numpy, on
    /// matrices it generated): eigenvalues, α, x_min, the KS distance and the soft rank agree;
    /// the planted large element is a correlation trap, Gaussian noise has none.
    #[test]
    fn matches_the_numpy_reference() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/spectra/reference.json");
        let doc: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        assert_eq!(doc["min_tail"], MIN_TAIL);
        for case in doc["cases"].as_array().unwrap() {
            let name = case["name"].as_str().unwrap();
            let (rows, cols) = (
                case["rows"].as_u64().unwrap() as usize,
                case["cols"].as_u64().unwrap() as usize,
            );
            let w: Vec<f32> = serde_json::from_value(case["matrix"].clone()).unwrap();
            let mut evals = eigenvalues_of_gram(&w, rows, cols);
            evals.sort_by(f64::total_cmp);
            let want: Vec<f64> = serde_json::from_value(case["eigenvalues"].clone()).unwrap();
            let top = want.last().unwrap();
            for (g, w) in evals.iter().zip(&want) {
                assert!((g - w).abs() < 1e-9 * top, "{name}: {g} vs {w}");
            }
            let s = spectrum(&w, rows, cols, 1);
            let fit = &case["fit"];
            let close = |a: f64, b: &serde_json::Value| {
                (a - b.as_f64().unwrap()).abs() < 1e-6 * (1.0 + a.abs())
            };
            assert!(
                close(s.alpha.unwrap(), &fit["alpha"]),
                "{name}: {s:?} vs {fit}"
            );
            assert!(
                close(s.lambda_min.unwrap(), &fit["xmin"]),
                "{name}: {s:?} vs {fit}"
            );
            assert!(
                close(s.ks_distance.unwrap(), &fit["ks"]),
                "{name}: {s:?} vs {fit}"
            );
            assert_eq!(s.tail.unwrap() as u64, fit["tail"].as_u64().unwrap());
            assert!(close(s.mp_soft_rank, &case["mp_soft_rank"]), "{name}");
            match name {
                "gaussian" => assert_eq!(s.correlation_traps, 0, "{s:?}"),
                "spiked" => assert!(s.correlation_traps >= 1, "{s:?}"),
                // Its eigenvalues were drawn from a Pareto law with α = 3.
                "power_law" => {
                    let (a, e) = (s.alpha.unwrap(), s.alpha_sigma.unwrap());
                    assert!((a - 3.0).abs() < 3.0 * e, "{s:?}");
                }
                _ => {}
            }
        }
    }
}
