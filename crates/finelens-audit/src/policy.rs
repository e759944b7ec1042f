//! Policy gates: thresholds per check, from a TOML file over documented defaults, turned into a
//! pass/fail table that a CI job gates a deployment on.
//!
//! ```toml
//! [sanity]
//! max_spearman_after_randomisation = 0.5
//! [localisation]
//! min_relevance_mass_accuracy = 0.3
//! ```

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{AuditError, Result};

/// Which side of the threshold passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Bound {
    /// The figure must be at least the threshold.
    Min,
    /// The figure must be at most the threshold.
    Max,
}

/// Every figure a policy can gate on. Serialised as `check.key`
/// (`sanity.max_spearman_after_randomisation`), as policies and verdicts name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub enum Figure {
    SanityMaxSpearman,
    FaithfulnessMinGain,
    LocalisationMinMassAccuracy,
    LocalisationMinPointingGame,
    ShortcutMaxMassOutsideMask,
    ShortcutMaxHotspotConcentration,
    CompletenessMaxMeanRelativeDelta,
    DriftMinCkaPenultimate,
    ComplexityMinSparseness,
    ComplexityMaxRelativeEntropy,
    FaithfulnessMinRoadGap,
    FaithfulnessMinCorrelation,
    FaithfulnessMinMonotonicity,
    SanityMaxRandomLogitSsim,
    RobustnessMaxSensitivity,
    FaithfulnessMaxInfidelity,
}

impl Figure {
    pub const ALL: [Figure; 16] = [
        Figure::SanityMaxSpearman,
        Figure::FaithfulnessMinGain,
        Figure::LocalisationMinMassAccuracy,
        Figure::LocalisationMinPointingGame,
        Figure::ShortcutMaxMassOutsideMask,
        Figure::ShortcutMaxHotspotConcentration,
        Figure::CompletenessMaxMeanRelativeDelta,
        Figure::DriftMinCkaPenultimate,
        Figure::ComplexityMinSparseness,
        Figure::ComplexityMaxRelativeEntropy,
        Figure::FaithfulnessMinRoadGap,
        Figure::FaithfulnessMinCorrelation,
        Figure::FaithfulnessMinMonotonicity,
        Figure::SanityMaxRandomLogitSsim,
        Figure::RobustnessMaxSensitivity,
        Figure::FaithfulnessMaxInfidelity,
    ];

    /// The figure's definition.
    pub fn rule(self) -> &'static Rule {
        RULES
            .iter()
            .find(|r| r.figure == self)
            .expect("RULES defines every figure")
    }

    /// `check.key`.
    pub fn id(self) -> String {
        let r = self.rule();
        id(r.check, r.key)
    }
}

impl From<Figure> for String {
    fn from(f: Figure) -> String {
        f.id()
    }
}

impl TryFrom<String> for Figure {
    type Error = String;
    fn try_from(s: String) -> std::result::Result<Self, String> {
        Figure::ALL
            .into_iter()
            .find(|f| f.id() == s)
            .ok_or_else(|| format!("unknown policy figure `{s}`"))
    }
}

/// The figures an audit measured.
pub type Figures = BTreeMap<Figure, f64>;

/// A threshold's definition: check, key, bound, default, and what the figure means.
pub struct Rule {
    pub figure: Figure,
    pub check: &'static str,
    pub key: &'static str,
    pub bound: Bound,
    pub default: f64,
    pub meaning: &'static str,
}

/// Every threshold a policy may set, with its default and a sentence a reviewer can read.
pub const RULES: &[Rule] = &[
    Rule {
        figure: Figure::SanityMaxSpearman,
        check: "sanity",
        key: "max_spearman_after_randomisation",
        bound: Bound::Max,
        default: 0.5,
        meaning: "rank correlation between the trained model's maps and those of the same model with every weight re-initialised; a high value means the maps show the input, not the model (Adebayo et al. 2018)",
    },
    Rule {
        figure: Figure::FaithfulnessMinGain,
        check: "faithfulness",
        key: "min_gain_over_random",
        bound: Bound::Min,
        default: 0.0,
        meaning: "how much better than a random pixel order the map's order deletes and inserts the evidence for the prediction (deletion and insertion AUCs, Petsiuk et al. 2018)",
    },
    Rule {
        figure: Figure::LocalisationMinMassAccuracy,
        check: "localisation",
        key: "min_relevance_mass_accuracy",
        bound: Bound::Min,
        default: 0.25,
        meaning: "share of the positive attribution that falls on the object (Arras et al. 2022)",
    },
    Rule {
        figure: Figure::LocalisationMinPointingGame,
        check: "localisation",
        key: "min_pointing_game",
        bound: Bound::Min,
        default: 0.5,
        meaning: "share of images whose most attributed pixel is on the object (Zhang et al. 2018)",
    },
    Rule {
        figure: Figure::ShortcutMaxMassOutsideMask,
        check: "shortcut",
        key: "max_mass_outside_mask",
        bound: Bound::Max,
        default: 0.85,
        meaning: "for the worst class, the mean share of positive attribution outside the object: evidence taken from something other than the object",
    },
    Rule {
        figure: Figure::ShortcutMaxHotspotConcentration,
        check: "shortcut",
        key: "max_hotspot_concentration",
        bound: Bound::Max,
        default: 0.25,
        meaning: "for the worst class, the share of its mean attribution map in the hottest 2% of pixels: evidence that sits in the same place in every image, whatever the object",
    },
    Rule {
        figure: Figure::CompletenessMaxMeanRelativeDelta,
        check: "completeness",
        key: "max_mean_relative_delta",
        bound: Bound::Max,
        default: 0.05,
        meaning: "mean gap, over the images, between the sum of integrated gradients and F(x) − F(baseline) (Sundararajan et al.'s completeness), relative to the mean |F(x) − F(baseline)|; larger means too few integration steps",
    },
    Rule {
        figure: Figure::DriftMinCkaPenultimate,
        check: "drift",
        key: "min_cka_penultimate",
        bound: Bound::Min,
        default: 0.2,
        meaning: "linear CKA between the base and the fine-tuned model's penultimate representations; near 0, fine-tuning replaced what the base model knew",
    },
    Rule {
        figure: Figure::FaithfulnessMinRoadGap,
        check: "faithfulness",
        key: "min_road_gap",
        bound: Bound::Min,
        default: 0.0,
        meaning: "ROAD (Rong et al. 2022): the area under the target's probability as the least relevant pixels are removed minus that as the most relevant are, removed pixels filled by noisy linear imputation (no out-of-distribution holes); above 0 when the map ranks the evidence better than its reverse",
    },
    Rule {
        figure: Figure::FaithfulnessMinCorrelation,
        check: "faithfulness",
        key: "min_correlation",
        bound: Bound::Min,
        default: 0.0,
        meaning: "faithfulness correlation (Bhatt et al. 2020): Pearson correlation, over random subsets of pixels, between the attribution they hold and the drop of the logit when they are replaced (for text: random quarters of the words, replaced by [MASK]); above 0 when the map's sums predict what removing pixels does",
    },
    Rule {
        figure: Figure::FaithfulnessMinMonotonicity,
        check: "faithfulness",
        key: "min_monotonicity",
        bound: Bound::Min,
        default: 0.0,
        meaning: "monotonicity correlation (Nguyen & Martínez 2020): Spearman correlation, over an 8×8 grid of patches (for text: each word), between a patch's |attribution| and how much replacing it alone changes the logit",
    },
    Rule {
        figure: Figure::FaithfulnessMaxInfidelity,
        check: "faithfulness",
        key: "max_infidelity",
        bound: Bound::Max,
        default: 1.0,
        meaning: "infidelity (Yeh et al. 2019) at the best scale, relative: 1 − max(Σ a·Δf, 0)² / (Σ a² · Σ Δf²) over the random subsets, a the attribution times the change the replacement makes, Δf the logit's drop; 0 when the map predicts every drop to first order, 1 when it predicts none (report-only by default)",
    },
    Rule {
        figure: Figure::SanityMaxRandomLogitSsim,
        check: "sanity",
        key: "max_random_logit_ssim",
        bound: Bound::Max,
        default: 1.0,
        meaning: "random logit test (Sixt et al. 2020): SSIM between the maps of the predicted class and of a random other class on the randomisation check's images; near 1, the map does not depend on the class it explains (report-only by default)",
    },
    Rule {
        figure: Figure::RobustnessMaxSensitivity,
        check: "robustness",
        key: "max_sensitivity",
        bound: Bound::Max,
        default: 10.0,
        meaning: "max-sensitivity (Yeh et al. 2019): the largest relative change of the map, ‖a(x̃) − a(x)‖/‖a(x)‖, over 8 inputs perturbed by 2% of their range (for text: the word embeddings), on the randomisation check's images or texts (report-only by default)",
    },
    // Report-only by default (no explanation fails them); a team that wants concise maps sets them.
    Rule {
        figure: Figure::ComplexityMinSparseness,
        check: "complexity",
        key: "min_sparseness",
        bound: Bound::Min,
        default: 0.0,
        meaning: "mean Gini index of |attribution| (Chalasani et al. 2020): 0 when spread evenly over the input, near 1 when a few pixels or tokens hold it",
    },
    Rule {
        figure: Figure::ComplexityMaxRelativeEntropy,
        check: "complexity",
        key: "max_relative_entropy",
        bound: Bound::Max,
        default: 1.0,
        meaning: "mean entropy of |attribution| as a distribution, relative to its maximum ln n (Bhatt et al. 2020's complexity): 1 when spread evenly, 0 when one pixel or token holds it all",
    },
];

/// Thresholds in force: the defaults, overridden by a policy file.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Policy {
    pub thresholds: BTreeMap<String, f64>,
    pub source: Option<String>,
}

fn id(check: &str, key: &str) -> String {
    format!("{check}.{key}")
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            thresholds: RULES
                .iter()
                .map(|r| (id(r.check, r.key), r.default))
                .collect(),
            source: None,
        }
    }
}

/// 1-based line of byte `offset` in `text`.
fn line_of(text: &str, offset: usize) -> usize {
    text[..offset.min(text.len())].matches('\n').count() + 1
}

/// The line where `key` is set inside section `[check]` (or the section header itself).
fn find_line(text: &str, check: &str, key: Option<&str>) -> usize {
    let mut in_section = false;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            in_section = t.trim_matches(|c| c == '[' || c == ']').trim() == check;
            if in_section && key.is_none() {
                return i + 1;
            }
            continue;
        }
        if let Some(k) = key {
            if in_section && t.split('=').next().map(str::trim) == Some(k) {
                return i + 1;
            }
        }
    }
    1
}

impl Policy {
    /// Read a policy file: sections are checks, keys thresholds (numbers). Unknown checks or keys
    /// and malformed values are errors naming the line.
    pub fn parse(path: &Path, text: &str) -> Result<Self> {
        let err = |line: usize, reason: String| AuditError::Policy {
            path: path.to_owned(),
            line,
            reason,
        };
        let table: toml::Table = text.parse().map_err(|e: toml::de::Error| {
            let line = e.span().map_or(1, |s| line_of(text, s.start));
            err(line, e.message().to_owned())
        })?;
        let mut policy = Policy {
            source: Some(path.display().to_string()),
            ..Policy::default()
        };
        let checks: Vec<&str> = {
            let mut c: Vec<&str> = RULES.iter().map(|r| r.check).collect();
            c.dedup();
            c
        };
        for (check, value) in &table {
            let Some(section) = value.as_table() else {
                return Err(err(
                    find_line(text, check, None).max(line_of_key(text, check)),
                    format!("`{check}` must be a [section] of thresholds"),
                ));
            };
            if !checks.contains(&check.as_str()) {
                return Err(err(
                    find_line(text, check, None),
                    format!("unknown check `{check}`; checks are: {}", checks.join(", ")),
                ));
            }
            for (key, v) in section {
                let line = find_line(text, check, Some(key));
                let Some(rule) = RULES.iter().find(|r| r.check == check && r.key == key) else {
                    let keys: Vec<&str> = RULES
                        .iter()
                        .filter(|r| r.check == check)
                        .map(|r| r.key)
                        .collect();
                    return Err(err(
                        line,
                        format!(
                            "unknown threshold `{key}` for check `{check}`; it has: {}",
                            keys.join(", ")
                        ),
                    ));
                };
                let x = v
                    .as_float()
                    .or_else(|| v.as_integer().map(|i| i as f64))
                    .filter(|x| x.is_finite())
                    .ok_or_else(|| err(line, format!("`{key}` must be a number, got {v}")))?;
                policy.thresholds.insert(id(rule.check, rule.key), x);
            }
        }
        Ok(policy)
    }

    /// The verdict of every threshold for the measured `figures`. A figure not measured (no
    /// masks, no base checkpoint…) is reported as such; it fails only under `require_all`.
    pub fn evaluate(&self, figures: &Figures, require_all: bool) -> Vec<Verdict> {
        RULES
            .iter()
            .map(|r| {
                let threshold = self.thresholds[&r.figure.id()];
                let figure = figures.get(&r.figure).copied();
                let pass = match figure {
                    Some(f) => Some(match r.bound {
                        Bound::Min => f >= threshold,
                        Bound::Max => f <= threshold,
                    }),
                    None if require_all => Some(false),
                    None => None,
                };
                Verdict {
                    check: r.check.into(),
                    key: r.key.into(),
                    figure,
                    threshold,
                    bound: r.bound,
                    pass,
                    meaning: r.meaning.into(),
                }
            })
            .collect()
    }
}

fn line_of_key(text: &str, key: &str) -> usize {
    text.lines()
        .position(|l| l.trim_start().starts_with(key))
        .map_or(1, |i| i + 1)
}

/// One row of the pass/fail table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verdict {
    pub check: String,
    pub key: String,
    pub figure: Option<f64>,
    pub threshold: f64,
    pub bound: Bound,
    /// None: not measured (no masks, no base checkpoint…).
    pub pass: Option<bool>,
    pub meaning: String,
}

/// True when no measured check failed.
pub fn all_pass(verdicts: &[Verdict]) -> bool {
    verdicts.iter().all(|v| v.pass != Some(false))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_overrides_and_verdicts() {
        let p = Policy::parse(
            Path::new("p.toml"),
            "# gates\n[sanity]\nmax_spearman_after_randomisation = 0.3\n\n[localisation]\nmin_pointing_game = 1\n",
        )
        .unwrap();
        assert_eq!(p.thresholds["sanity.max_spearman_after_randomisation"], 0.3);
        assert_eq!(p.thresholds["localisation.min_pointing_game"], 1.0);
        assert_eq!(p.thresholds["shortcut.max_hotspot_concentration"], 0.25);
        let figures: Figures = [
            (Figure::SanityMaxSpearman, 0.31),
            (Figure::LocalisationMinPointingGame, 1.0),
        ]
        .into();
        let v = p.evaluate(&figures, false);
        let get = |k: &str| v.iter().find(|x| x.key == k).unwrap().pass;
        assert_eq!(get("max_spearman_after_randomisation"), Some(false));
        assert_eq!(get("min_pointing_game"), Some(true));
        assert_eq!(get("max_mass_outside_mask"), None);
        assert!(!all_pass(&v));

        // Everything measured and within bounds passes; under require_all a figure not measured
        // fails, and only that one.
        let good: Figures = Figure::ALL
            .into_iter()
            .map(|f| (f, Policy::default().thresholds[&f.id()]))
            .collect();
        assert!(all_pass(&Policy::default().evaluate(&good, true)));
        let mut partial = good.clone();
        partial.remove(&Figure::DriftMinCkaPenultimate);
        assert!(all_pass(&Policy::default().evaluate(&partial, false)));
        let strict = Policy::default().evaluate(&partial, true);
        assert_eq!(strict.iter().filter(|v| v.pass == Some(false)).count(), 1);
    }

    /// The shipped example writes out every default: it parses, and changes nothing.
    #[test]
    fn the_example_policy_is_the_defaults() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/policy.toml");
        let p = Policy::parse(&path, &std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(p.thresholds, Policy::default().thresholds);
        assert_eq!(p.thresholds.len(), RULES.len());
    }

    #[test]
    fn figures_serialise_as_their_policy_names() {
        for f in Figure::ALL {
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.id()));
            assert_eq!(serde_json::from_str::<Figure>(&json).unwrap(), f);
        }
        assert!(serde_json::from_str::<Figure>("\"sanity.typo\"").is_err());
    }

    #[test]
    fn bad_policies_name_the_line() {
        let path = Path::new("policy.toml");
        let e = Policy::parse(
            path,
            "[sanity]\nmax_spearman_after_randomisation = 0.5\n[vibes]\nx = 1\n",
        )
        .unwrap_err()
        .to_string();
        assert!(e.starts_with("policy.toml:3: unknown check `vibes`"), "{e}");
        let e = Policy::parse(path, "[shortcut]\n\nmax_hotspot = 0.2\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("policy.toml:3: unknown threshold `max_hotspot`"),
            "{e}"
        );
        let e = Policy::parse(path, "[drift]\nmin_cka_penultimate = \"high\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("policy.toml:2: `min_cka_penultimate` must be a number"),
            "{e}"
        );
        let e = Policy::parse(path, "[sanity]\nmax_spearman_after_randomisation = = 2\n")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("policy.toml:2:"), "{e}");
    }
}
