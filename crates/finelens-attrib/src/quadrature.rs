//! Quadrature rules on [0, 1]: the nodes α and weights w with ∫₀¹ f(α) dα ≈ Σ w·f(α).
//!
//! Integrated gradients integrates the gradient along the straight path from the baseline to the
//! input; which nodes it samples is a separate choice, so the rules live here, apart from any
//! attribution method (as in Captum's `approximation_methods.py`), for IG and its layer variants.

use crate::error::{settings, Result};

/// The rules Captum offers, under its names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    /// α = k/n, k = 0 … n−1.
    RiemannLeft,
    /// α = (k+1)/n.
    RiemannRight,
    /// α = (k+½)/n.
    RiemannMiddle,
    /// α = k/(n−1), end points weighted ½ (needs n ≥ 2).
    RiemannTrapezoid,
    /// Gauss–Legendre: exact for polynomials of degree ≤ 2n−1.
    GaussLegendre,
}

impl Rule {
    pub const ALL: [Rule; 5] = [
        Rule::RiemannLeft,
        Rule::RiemannRight,
        Rule::RiemannMiddle,
        Rule::RiemannTrapezoid,
        Rule::GaussLegendre,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Rule::RiemannLeft => "riemann_left",
            Rule::RiemannRight => "riemann_right",
            Rule::RiemannMiddle => "riemann_middle",
            Rule::RiemannTrapezoid => "riemann_trapezoid",
            Rule::GaussLegendre => "gausslegendre",
        }
    }

    /// Captum's names, plus `left`/`right`/`middle`/`trapezoid`/`gauss-legendre`.
    pub fn parse(s: &str) -> Result<Self> {
        let s = s.to_ascii_lowercase().replace('-', "_");
        Ok(match s.as_str() {
            "riemann_left" | "left" => Rule::RiemannLeft,
            "riemann_right" | "right" => Rule::RiemannRight,
            "riemann_middle" | "middle" => Rule::RiemannMiddle,
            "riemann_trapezoid" | "trapezoid" => Rule::RiemannTrapezoid,
            "gausslegendre" | "gauss_legendre" | "gl" => Rule::GaussLegendre,
            _ => {
                return Err(settings(
                    "integrated gradients",
                    format!(
                        "unknown quadrature rule `{s}`; rules are: {}",
                        Rule::ALL.map(Rule::name).join(", ")
                    ),
                ))
            }
        })
    }

    /// The n nodes and weights on [0, 1]; the weights sum to 1.
    pub fn nodes(self, n: usize) -> Result<Vec<(f64, f64)>> {
        if n == 0 {
            return Err(settings("integrated gradients", "steps must be at least 1"));
        }
        let nf = n as f64;
        Ok(match self {
            Rule::RiemannLeft => (0..n).map(|k| (k as f64 / nf, 1.0 / nf)).collect(),
            Rule::RiemannRight => (0..n).map(|k| ((k + 1) as f64 / nf, 1.0 / nf)).collect(),
            Rule::RiemannMiddle => (0..n).map(|k| ((k as f64 + 0.5) / nf, 1.0 / nf)).collect(),
            Rule::RiemannTrapezoid => {
                if n < 2 {
                    return Err(settings(
                        "integrated gradients",
                        "the trapezoid rule needs at least 2 steps",
                    ));
                }
                let h = 1.0 / (nf - 1.0);
                (0..n)
                    .map(|k| {
                        let w = if k == 0 || k == n - 1 { h / 2.0 } else { h };
                        (k as f64 * h, w)
                    })
                    .collect()
            }
            Rule::GaussLegendre => gauss_legendre(n)
                .into_iter()
                .map(|(x, w)| ((x + 1.0) / 2.0, w / 2.0))
                .collect(),
        })
    }
}

/// Gauss–Legendre nodes and weights on [−1, 1], ascending: the roots of the Legendre polynomial
/// Pₙ by Newton's method from Tricomi's estimate cos(π(k − ¼)/(n + ½)), with
/// wₖ = 2 / ((1 − xₖ²) Pₙ′(xₖ)²) (Abramowitz & Stegun 25.4.29).
fn gauss_legendre(n: usize) -> Vec<(f64, f64)> {
    let mut out = Vec::with_capacity(n);
    for k in 1..=n {
        let mut x = (std::f64::consts::PI * (k as f64 - 0.25) / (n as f64 + 0.5)).cos();
        let mut dp = 0.0;
        for _ in 0..100 {
            // Three-term recurrence: (j+1)P_{j+1} = (2j+1)x P_j − j P_{j−1}.
            let (mut p0, mut p1) = (1.0, x);
            for j in 1..n {
                let p2 = ((2 * j + 1) as f64 * x * p1 - j as f64 * p0) / (j + 1) as f64;
                p0 = p1;
                p1 = p2;
            }
            let pn = if n == 1 { x } else { p1 };
            let pm = if n == 1 { 1.0 } else { p0 };
            dp = n as f64 * (x * pn - pm) / (x * x - 1.0);
            let step = pn / dp;
            x -= step;
            if step.abs() < 1e-15 {
                break;
            }
        }
        out.push((x, 2.0 / ((1.0 - x * x) * dp * dp)));
    }
    out.sort_by(|a, b| a.0.total_cmp(&b.0));
    out
}

impl std::str::FromStr for Rule {
    type Err = crate::AttribError;

    fn from_str(s: &str) -> Result<Self> {
        Rule::parse(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn integrate(rule: Rule, n: usize, f: impl Fn(f64) -> f64) -> f64 {
        rule.nodes(n).unwrap().iter().map(|&(a, w)| w * f(a)).sum()
    }

    #[test]
    fn weights_sum_to_one_and_nodes_lie_in_the_unit_interval() {
        for rule in Rule::ALL {
            for n in [2, 3, 7, 50, 1024] {
                let nodes = rule.nodes(n).unwrap();
                assert_eq!(nodes.len(), n);
                let total: f64 = nodes.iter().map(|p| p.1).sum();
                assert!((total - 1.0).abs() < 1e-12, "{rule:?} n={n}: Σw = {total}");
                assert!(nodes
                    .iter()
                    .all(|p| (0.0..=1.0).contains(&p.0) && p.1 > 0.0));
            }
        }
    }

    #[test]
    fn gauss_legendre_is_exact_to_degree_2n_minus_1() {
        for n in [1, 2, 3, 5, 8] {
            for d in 0..2 * n {
                let got = integrate(Rule::GaussLegendre, n, |a| a.powi(d as i32));
                let exact = 1.0 / (d as f64 + 1.0);
                assert!((got - exact).abs() < 1e-13, "n={n} degree {d}: {got}");
            }
            // …and not beyond: degree 2n is integrated with an error (it is (n!)⁴/((2n+1)((2n)!)³),
            // below 1e-9 from n = 6 on).
            if n > 5 {
                continue;
            }
            let got = integrate(Rule::GaussLegendre, n, |a| a.powi(2 * n as i32));
            assert!((got - 1.0 / (2 * n + 1) as f64).abs() > 1e-9);
        }
    }

    #[test]
    fn riemann_rules_have_their_textbook_errors() {
        // ∫₀¹ α dα = ½: middle and trapezoid are exact on linear functions; left and right are off
        // by ∓1/(2n).
        let n = 10;
        assert!((integrate(Rule::RiemannMiddle, n, |a| a) - 0.5).abs() < 1e-15);
        assert!((integrate(Rule::RiemannTrapezoid, n, |a| a) - 0.5).abs() < 1e-15);
        assert!((integrate(Rule::RiemannLeft, n, |a| a) - (0.5 - 0.05)).abs() < 1e-15);
        assert!((integrate(Rule::RiemannRight, n, |a| a) - (0.5 + 0.05)).abs() < 1e-15);
        // On α², the midpoint error is −1/(12n²) and the trapezoid error +1/(6n'²), n' = n − 1.
        let mid = integrate(Rule::RiemannMiddle, n, |a| a * a) - 1.0 / 3.0;
        assert!((mid + 1.0 / (12.0 * 100.0)).abs() < 1e-14, "{mid}");
        let trap = integrate(Rule::RiemannTrapezoid, n, |a| a * a) - 1.0 / 3.0;
        assert!((trap - 1.0 / (6.0 * 81.0)).abs() < 1e-14, "{trap}");
    }

    #[test]
    fn bad_settings_are_errors() {
        assert!(Rule::RiemannLeft.nodes(0).is_err());
        assert!(Rule::RiemannTrapezoid.nodes(1).is_err());
        assert!(Rule::parse("simpson").is_err());
        assert_eq!(Rule::parse("gauss-legendre").unwrap(), Rule::GaussLegendre);
    }
}
