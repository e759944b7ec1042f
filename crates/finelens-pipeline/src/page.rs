//! The audit's part of a report page: verdicts, model card, gallery, checks, drift, provenance
//! — typed blocks that `finelens-report` renders (escaping every string).

use finelens_audit::policy::{Bound, Verdict};
use finelens_audit::run::{AuditImage, AuditPartial};
use finelens_data::Preprocess;
use finelens_report::heatmap::{self, Scale};
use finelens_report::html::{Block, Card, Cell, Figure, Status};
use serde::{Deserialize, Serialize};

use crate::audit::{AuditDocument, EXPLANATION_DRIFT_TOP_FRACTION};
use crate::error::Result;
use crate::inputs::LoadedModel;
use crate::output::png_bytes as png;

/// The pass/fail table as text, for a terminal or a log.
pub fn verdict_table(verdicts: &[Verdict]) -> String {
    let mut lines = vec![format!(
        "{:<14} {:<36} {:>9} {:>11}  verdict",
        "check", "threshold", "figure", "limit"
    )];
    for v in verdicts {
        lines.push(format!(
            "{:<14} {:<36} {:>9} {:>4} {:>6.3}  {}",
            v.check,
            v.key,
            v.figure.map_or("—".into(), |f| format!("{f:.3}")),
            bound_sign(v.bound),
            v.threshold,
            verdict_word(v.pass)
        ));
    }
    lines.join("\n")
}

fn bound_sign(b: Bound) -> &'static str {
    match b {
        Bound::Min => "≥",
        Bound::Max => "≤",
    }
}

pub struct PageInput<'a> {
    pub name: &'a str,
    pub document: &'a AuditDocument,
    pub card: &'a ModelCard,
    /// In the images' order.
    pub gallery: Vec<Card>,
}

/// What the page says of the model beyond the report: its head, lineage and training.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModelCard {
    pub architecture: String,
    pub parent_sha256: Option<String>,
    pub training: Option<finelens_tune::TrainingRecord>,
}

impl ModelCard {
    pub fn of(model: &LoadedModel) -> Result<ModelCard> {
        let meta = model.meta.as_ref();
        Ok(ModelCard {
            architecture: match meta {
                Some(m) => format!("{} (head {})", m.arch, m.head),
                None => model.info.arch.clone(),
            },
            parent_sha256: meta.and_then(|m| m.parent_sha256.clone()),
            training: match meta {
                Some(m) => finelens_tune::TrainingRecord::of(m)?,
                None => None,
            },
        })
    }
}

fn status(pass: Option<bool>) -> Status {
    match pass {
        Some(true) => Status::Pass,
        Some(false) => Status::Fail,
        None => Status::Neutral,
    }
}

fn verdict_word(pass: Option<bool>) -> &'static str {
    match pass {
        Some(true) => "pass",
        Some(false) => "FAIL",
        None => "not measured",
    }
}

/// The loss and accuracy per epoch of a training record, when it has epochs.
pub(crate) fn training_curves(t: &finelens_tune::TrainingRecord) -> Result<Option<Block>> {
    if t.history.is_empty() {
        return Ok(None);
    }
    let series =
        |name: &str, f: &dyn Fn(&finelens_tune::EpochSummary) -> f64| finelens_report::Series {
            name: name.into(),
            values: t.history.iter().map(f).collect(),
        };
    let curves = finelens_report::training_curves(
        &[
            series("train_loss", &|e| e.train_loss),
            series("val_loss", &|e| e.val_loss),
        ],
        &[
            series("train_accuracy", &|e| e.train_accuracy),
            series("val_accuracy", &|e| e.val_accuracy),
        ],
    )?;
    Ok(Some(Block::Image {
        png: curves,
        alt: "training curves".into(),
    }))
}

/// The confusion matrix of (true, predicted) class pairs, when there are any; `unit` names what
/// was classified ("images", "texts").
pub(crate) fn confusion(classes: &[String], labelled: &[(usize, usize)], unit: &str) -> Vec<Block> {
    if labelled.is_empty() {
        return Vec::new();
    }
    let mut head = vec![String::new()];
    head.extend(classes.iter().cloned());
    let rows = classes
        .iter()
        .enumerate()
        .map(|(t, name)| {
            std::iter::once(Cell::Text(name.clone()))
                .chain((0..classes.len()).map(|q| {
                    let n = labelled
                        .iter()
                        .filter(|&&(l, pr)| l == t && pr == q)
                        .count();
                    Cell::Number(n as f64, 0)
                }))
                .collect()
        })
        .collect();
    vec![
        Block::Paragraph(format!(
            "Confusion matrix on the audited {unit} (rows: true class, columns: predicted)."
        )),
        Block::Table(head, rows),
    ]
}

pub(crate) fn facts(rows: Vec<(&str, String)>) -> Block {
    Block::Table(
        vec![String::new(), String::new()],
        rows.into_iter()
            .map(|(k, v)| vec![Cell::Text(k.into()), Cell::Text(v)])
            .collect(),
    )
}

/// An audit's badges (the verdict, then each check's) and its verdict table.
pub fn verdict_blocks(pass: bool, verdicts: &[Verdict]) -> Vec<Block> {
    let mut b = Vec::new();
    let mut badges = vec![(
        if pass {
            "all checks pass"
        } else {
            "FLAGGED: checks fail"
        }
        .to_owned(),
        if pass { Status::Pass } else { Status::Fail },
    )];
    badges.extend(verdicts.iter().map(|v| {
        (
            format!("{}.{}: {}", v.check, v.key, verdict_word(v.pass)),
            status(v.pass),
        )
    }));
    b.push(Block::Badges(badges));

    b.push(Block::Heading(3, "Verdicts".into()));
    b.push(Block::Table(
        [
            "check",
            "threshold",
            "figure",
            "limit",
            "verdict",
            "what it means",
        ]
        .map(String::from)
        .to_vec(),
        verdicts
            .iter()
            .map(|v| {
                vec![
                    Cell::Text(v.check.clone()),
                    Cell::Text(v.key.clone()),
                    Cell::Number(v.figure.unwrap_or(f64::NAN), 3),
                    Cell::Text(format!("{} {:.3}", bound_sign(v.bound), v.threshold)),
                    Cell::Badge(verdict_word(v.pass).into(), status(v.pass)),
                    Cell::Text(v.meaning.clone()),
                ]
            })
            .collect(),
    ));
    b
}

/// One model's part of a report page: verdicts, model card, gallery, checks, drift, provenance.
pub fn audit_blocks(p: &PageInput) -> Result<Vec<Block>> {
    let d = p.document;
    let r = &d.audit;
    let classes = &d.checkpoint.classes;
    let mut b = vec![Block::Heading(2, p.name.to_owned())];
    b.extend(verdict_blocks(d.pass, &d.verdicts));

    b.push(Block::Heading(3, "Model card".into()));
    let training = p.card.training.clone();
    let mut card = vec![
        ("architecture", p.card.architecture.clone()),
        ("classes", classes.join(", ")),
        (
            "input",
            format!(
                "{0}×{0}, crop {1}, mean {2:?}, std {3:?}",
                d.preprocess.input_size, d.preprocess.crop_pct, d.preprocess.mean, d.preprocess.std
            ),
        ),
        (
            "audited data",
            format!("{} ({} images)", d.data.display(), r.images.len()),
        ),
        (
            "accuracy on the audited images",
            r.accuracy
                .map_or("no labels".into(), |a| format!("{:.1}%", 100.0 * a)),
        ),
        (
            "parent checkpoint (SHA-256)",
            p.card
                .parent_sha256
                .clone()
                .unwrap_or_else(|| "none recorded".into()),
        ),
    ];
    if let Some(t) = &training {
        card.push((
            "training configuration",
            serde_json::to_string(&t.config).expect("plain data serialises"),
        ));
    }
    b.push(facts(card));
    if let Some(t) = &training {
        b.extend(training_curves(t)?);
    }
    let labelled: Vec<(usize, usize)> = r
        .images
        .iter()
        .filter_map(|i| i.label.map(|l| (l, i.predicted)))
        .collect();
    b.extend(confusion(classes, &labelled, "images"));

    b.push(Block::Heading(3, "Explanations".into()));
    b.push(Block::Paragraph(format!(
        "Per image: the input, its mask, then each method's heat map and overlay ({}); the \
         policy gates on {}. Signed maps are blue (against) to red (for the class), magnitudes \
         dark to yellow.",
        r.methods
            .iter()
            .map(|m| m.method.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        r.primary
    )));
    let cards = p.gallery.clone();
    b.push(Block::Gallery(cards));

    b.push(Block::Heading(3, "Checks per method".into()));
    b.push(Block::Paragraph(
        "Sanity (Adebayo et al. 2018): Spearman ρ and SSIM between the trained model's maps and \
         those of the model with every weight re-initialised; low means the maps depend on the \
         model; the random logit test (Sixt et al. 2020): SSIM with the map of a random other \
         class, low when the map depends on the class; max-sensitivity (Yeh et al. 2019): the \
         largest relative change of the map under 2% input noise. Faithfulness (Petsiuk et al. 2018): deletion AUC (low is good) and insertion AUC \
         (high is good), each against a random pixel order; ROAD (Rong et al. 2022): the same \
         with removed pixels filled by noisy linear imputation, most relevant first (MoRF, low is \
         good) and least relevant first (LeRF, high is good); faithfulness correlation (Bhatt et \
         al. 2020), monotonicity (Nguyen & Martínez 2020) and infidelity (Yeh et al. 2019, at the \
         best scale: 0 when the map predicts each drop to first order, 1 when it predicts none), \
         for the gated method. Localisation: pointing game, \
         relevance mass and rank accuracy against the object masks. Complexity (Quantus): the \
         Gini index of |attribution| (sparseness, Chalasani et al. 2020) and its entropy relative \
         to the maximum (Bhatt et al. 2020)."
            .into(),
    ));
    let rows = r
        .methods
        .iter()
        .map(|m| {
            let last = m.sanity.cascading.last();
            let loc = m.localisation.as_ref();
            let f = &m.faithfulness;
            vec![
                Cell::Text(m.method.clone()),
                Cell::Number(last.map_or(f64::NAN, |s| s.spearman), 3),
                Cell::Number(last.map_or(f64::NAN, |s| s.ssim), 3),
                Cell::Number(m.random_logit.map_or(f64::NAN, |r| r.ssim), 3),
                Cell::Number(m.robustness.map_or(f64::NAN, |r| r.max_sensitivity), 3),
                Cell::Number(f.deletion_auc, 3),
                Cell::Number(f.deletion_auc_random, 3),
                Cell::Number(f.insertion_auc, 3),
                Cell::Number(f.insertion_auc_random, 3),
                Cell::Number(m.road.as_ref().map_or(f64::NAN, |r| r.morf_auc), 3),
                Cell::Number(m.road.as_ref().map_or(f64::NAN, |r| r.lerf_auc), 3),
                Cell::Number(
                    m.perturbation
                        .map_or(f64::NAN, |p| p.faithfulness_correlation),
                    3,
                ),
                Cell::Number(m.perturbation.map_or(f64::NAN, |p| p.monotonicity), 3),
                Cell::Number(m.perturbation.map_or(f64::NAN, |p| p.infidelity), 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.pointing_game_hit_rate), 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.relevance_mass_accuracy), 3),
                Cell::Number(loc.map_or(f64::NAN, |l| l.relevance_rank_accuracy), 3),
                Cell::Number(m.complexity.map_or(f64::NAN, |c| c.mean_sparseness), 3),
                Cell::Number(
                    m.complexity
                        .map_or(f64::NAN, |c| c.mean_relative_complexity),
                    3,
                ),
            ]
        })
        .collect();
    b.push(Block::Table(
        [
            "method",
            "ρ, all random",
            "SSIM, all random",
            "SSIM, random logit",
            "max-sensitivity",
            "deletion AUC",
            "random",
            "insertion AUC",
            "random",
            "ROAD MoRF",
            "ROAD LeRF",
            "faithfulness correlation",
            "monotonicity",
            "infidelity",
            "pointing game",
            "mass accuracy",
            "rank accuracy",
            "sparseness",
            "relative entropy",
        ]
        .map(String::from)
        .to_vec(),
        rows,
    ));
    for m in &r.methods {
        b.push(Block::Paragraph(format!(
            "Randomisation of {}, ρ / SSIM with the trained maps — cascading (every stage down to \
             this one random), then independent (only this stage random):",
            m.method
        )));
        let head: Vec<String> = std::iter::once(String::new())
            .chain(m.sanity.cascading.iter().map(|s| s.stage.clone()))
            .collect();
        let row = |label: &str, stages: &[finelens_audit::sanity::StageSimilarity]| {
            std::iter::once(Cell::Text(label.into()))
                .chain(
                    stages
                        .iter()
                        .map(|s| Cell::Text(format!("{:.3} / {:.3}", s.spearman, s.ssim))),
                )
                .collect()
        };
        b.push(Block::Table(
            head,
            vec![
                row("cascading", &m.sanity.cascading),
                row("independent", &m.sanity.independent),
            ],
        ));
    }

    b.push(Block::Heading(3, "Shortcuts per class".into()));
    b.push(Block::Table(
        [
            "class",
            "images",
            "relevance off the object",
            "hotspot concentration",
            "hotspot (y0, x0, y1, x1)",
        ]
        .map(String::from)
        .to_vec(),
        r.shortcut
            .iter()
            .map(|c| {
                vec![
                    Cell::Text(c.class.clone()),
                    Cell::Number(c.images as f64, 0),
                    Cell::Number(c.mass_outside_mask.unwrap_or(f64::NAN), 3),
                    Cell::Number(c.hotspot_concentration, 3),
                    Cell::Text(format!("{:?}", c.hotspot_box)),
                ]
            })
            .collect(),
    ));
    if let Some(dr) = &d.drift {
        b.push(Block::Heading(3, "Drift from the base".into()));
        let (bars, cka) = crate::drift::drift_figures(&dr.weights, Some(&dr.representation))?;
        if let Some(bars) = bars {
            b.push(Block::Image {
                png: bars,
                alt: "relative change per layer".into(),
            });
        }
        if let Some(cka) = cka {
            b.push(Block::Image {
                png: cka,
                alt: "CKA between the base's and the audited model's layers".into(),
            });
        }
        b.extend(crate::drift::alpha_table(&dr.weights));
        let e = &dr.explanation;
        b.push(Block::Paragraph(format!(
            "Explanation drift ({}, {} images): Spearman ρ of |attribution| between the \
             base's and this model's maps {:.3}; overlap (IoU) of their top {:.0}% pixels {:.3}.",
            e.method,
            e.spearman.len(),
            e.mean_spearman,
            EXPLANATION_DRIFT_TOP_FRACTION * 100.0,
            e.mean_top_iou
        )));
    }
    b.push(Block::Heading(3, "Provenance".into()));
    b.push(facts(vec![
        ("checkpoint", p.name.to_owned()),
        ("sha256", d.checkpoint.sha256.clone()),
        (
            "base",
            d.base
                .as_ref()
                .map_or("none".into(), |b| b.display().to_string()),
        ),
        ("seed", d.seed.to_string()),
        ("finelens", d.finelens_version.clone()),
        ("command line", d.command_line.join(" ")),
    ]));
    Ok(b)
}

/// The gallery's cards, each with its image's index: per image the input, its mask, then each
/// method's heat map and overlay.
pub fn gallery_cards(
    partial: &AuditPartial,
    classes: &[String],
    images: &[AuditImage],
    pre: &Preprocess,
) -> Result<Vec<(Card, usize)>> {
    let mut cards = Vec::new();
    for (k, (img, found)) in images.iter().zip(&partial.images).enumerate() {
        let res = &found.image;
        let v: Vec<f32> = img.x.flatten_all()?.to_vec1()?;
        let shown = pre.denormalise(&v, pre.size);
        let mut figures = vec![Figure {
            caption: "input".into(),
            png: png(&shown)?,
        }];
        if let Some(m) = &img.mask {
            let (h, w) = m.dim();
            let mask = image::RgbImage::from_fn(w as u32, h as u32, |x, y| {
                let on = m[[y as usize, x as usize]];
                image::Rgb(if on { [255; 3] } else { [0; 3] })
            });
            figures.push(Figure {
                caption: "mask".into(),
                png: png(&mask)?,
            });
        }
        for (method, maps) in partial.methods.iter().zip(&partial.relevance) {
            let scale = if method.signed {
                Scale::Diverging
            } else {
                Scale::Sequential
            };
            let rel = &maps[k];
            figures.push(Figure {
                caption: method.name.clone(),
                // Native size: the page scales it up without smoothing.
                png: png(&heatmap::heatmap_rgb(
                    rel.view(),
                    scale,
                    heatmap::DEFAULT_OUTLIER_PERC,
                ))?,
            });
            figures.push(Figure {
                caption: "overlay".into(),
                png: png(&heatmap::overlay_rgb(
                    &shown,
                    rel.view(),
                    scale,
                    heatmap::DEFAULT_OUTLIER_PERC,
                )?)?,
            });
        }
        cards.push((
            Card {
                title: img.id.clone(),
                caption: format!(
                    "predicted {} ({:.1}%){}",
                    classes[res.predicted],
                    100.0 * res.probability,
                    res.label
                        .map_or(String::new(), |l| format!(", true {}", classes[l]))
                ),
                figures,
                tokens: Vec::new(),
                confidence: res.probability as f64,
                error: res.correct == Some(false),
            },
            img.index,
        ));
    }
    Ok(cards)
}

/// A name made file-name safe.
fn safe(s: &str) -> String {
    let t: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    t.trim_matches('-').to_owned()
}

/// Where the `k`th picture of a gallery card is written.
pub fn gallery_file(title: &str, k: usize, caption: &str) -> String {
    format!("gallery/{}/{k}-{}.png", safe(title), safe(caption))
}

/// The page's pictures as files beside it: figures as `<alt>.png`, gallery pictures as
/// `gallery/<image id>/<n>-<caption>.png`, names made file-name safe.
pub fn figure_files(blocks: &[Block]) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    for b in blocks {
        match b {
            Block::Image { png, alt } => out.push((format!("{}.png", safe(alt)), png.clone())),
            Block::Gallery(cards) => {
                for c in cards {
                    for (k, f) in c.figures.iter().enumerate() {
                        out.push((gallery_file(&c.title, k, &f.caption), f.png.clone()));
                    }
                }
            }
            _ => {}
        }
    }
    out
}
