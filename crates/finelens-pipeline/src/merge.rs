//! Merging sharded runs: the partial results of every shard of one run become the result one
//! run over the whole set would have written.

use std::path::{Path, PathBuf};

use finelens_audit::run::AuditPartial;
use finelens_report::html::{Card, Figure};

use crate::audit::{self, AuditDocument, AuditOutcome, AuditShard, DriftPartial};
use crate::error::{input, settings, PipelineError, Result};
use crate::explain::ExplainReport;
use crate::output::{create_dir, read_json, write_json, OutputDir, Versioned};
use crate::page::{self, PageInput};
use crate::progress::{Event, Progress};
use crate::shard::Shard;

/// Copy a directory tree (an image's outputs) into `to`.
fn copy_tree(from: &Path, to: &Path) -> Result<()> {
    create_dir(to)?;
    let io = |path: &Path| {
        let path = path.to_owned();
        move |error| PipelineError::Io { path, error }
    };
    for entry in std::fs::read_dir(from).map_err(io(from))? {
        let entry = entry.map_err(io(from))?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        if src.is_dir() {
            copy_tree(&src, &dst)?;
        } else {
            std::fs::copy(&src, &dst).map_err(io(&src))?;
        }
    }
    Ok(())
}

/// What every shard must agree on: the same model, classes, methods, preprocessing, target
/// and input set.
fn same_run(a: &ExplainReport, b: &ExplainReport) -> bool {
    a.sha256 == b.sha256
        && a.classes == b.classes
        && a.methods == b.methods
        && a.preprocess == b.preprocess
        && a.target == b.target
        && a.total_images == b.total_images
}

/// Check that `dirs` hold every shard of one run exactly once: each names its shard (`None`:
/// a whole run), and `same(k)` says whether part k is the same run as part 0 (`differ` says
/// what would differ).
fn check_cover(
    dirs: &[PathBuf],
    shards: &[Option<Shard>],
    same: &dyn Fn(usize) -> bool,
    differ: &str,
) -> Result<()> {
    let count = match shards[0] {
        Some(s) => s.count,
        None => {
            return Err(input(
                &dirs[0],
                "not a shard's output (it covers the whole set)",
            ))
        }
    };
    let mut seen = vec![None; count];
    for (k, (dir, shard)) in dirs.iter().zip(shards).enumerate() {
        let Some(s) = shard.filter(|s| s.count == count) else {
            return Err(input(dir, format!("not one of {count} shards")));
        };
        if !same(k) {
            return Err(input(
                dir,
                format!("another run than {}'s ({differ})", dirs[0].display()),
            ));
        }
        if let Some(other) = seen[s.index].replace(dir) {
            return Err(input(dir, format!("shard {s} is also {}", other.display())));
        }
    }
    if let Some(missing) = seen.iter().position(Option::is_none) {
        return Err(settings(format!(
            "merge: shard {missing}/{count} is missing"
        )));
    }
    Ok(())
}

/// Merge the explain outputs of every shard (`dirs`, in any order) into `out`.
pub fn merge_explain(
    dirs: &[PathBuf],
    out: &Path,
    force: bool,
    progress: Progress,
) -> Result<ExplainReport> {
    if dirs.is_empty() {
        return Err(settings("merge: no shard directory given"));
    }
    OutputDir::check(out, force)?;
    let parts: Vec<ExplainReport> = dirs
        .iter()
        .map(|d| read_json(&d.join("explain.json")))
        .collect::<Result<_>>()?;
    check_cover(
        dirs,
        &parts.iter().map(|p| p.shard).collect::<Vec<_>>(),
        &|k| same_run(&parts[0], &parts[k]),
        "model, classes, methods, preprocessing, target or input set differ",
    )?;
    let count = parts.len();
    let mut merged = parts[0].clone();
    merged.shard = None;
    merged.images = parts.iter().flat_map(|p| p.images.clone()).collect();
    merged.images.sort_by_key(|i| i.index);
    merged.skipped = parts.iter().flat_map(|p| p.skipped.clone()).collect();
    merged.skipped.sort_by(|a, b| a.path.cmp(&b.path));
    merged.skipped.dedup();
    progress(Event::Stage {
        name: "merge",
        total: merged.images.len(),
        unit: "images",
    });
    OutputDir::create(out, force)?.run(|dir| {
        let mut done = 0;
        for (src, p) in dirs.iter().zip(&parts) {
            for img in &p.images {
                copy_tree(&src.join(&img.id), &dir.join(&img.id))?;
                done += 1;
                progress(Event::Advance {
                    done,
                    item: &img.id,
                });
            }
        }
        progress(Event::StageEnd);
        write_json(&dir.join("explain.json"), &merged)
    })?;
    progress(Event::Info(format!(
        "merged {} shards: {} image(s) → {}",
        count,
        merged.images.len(),
        out.join("explain.json").display()
    )));
    Ok(merged)
}

/// Merge every shard of an audit (`dirs`, each holding a `partial.json`, in any order) into the
/// report one run over the whole set writes: `report.json`, `index.html` and its figures, the
/// gallery from the shards' pictures.
///
/// Every per-image figure, and so every verdict but CKA's, is the single run's; the means agree
/// to float rounding. CKA is the same minibatch estimator over other minibatches (see
/// [`finelens_drift::MinibatchCka`]), so it moves by that estimator's noise.
pub fn merge_audit(
    dirs: &[PathBuf],
    out: &Path,
    force: bool,
    progress: Progress,
) -> Result<AuditOutcome> {
    if dirs.is_empty() {
        return Err(settings("merge: no shard directory given"));
    }
    OutputDir::check(out, force)?;
    let parts: Vec<AuditShard> = dirs
        .iter()
        .map(|d| read_json(&d.join("partial.json")))
        .collect::<Result<_>>()?;
    let same = |k: usize| {
        let (a, b) = (&parts[0], &parts[k]);
        a.checkpoint.sha256 == b.checkpoint.sha256
            && a.checkpoint.classes == b.checkpoint.classes
            && a.partial.methods == b.partial.methods
            && a.preprocess == b.preprocess
            && a.total_images == b.total_images
            && a.base == b.base
            && a.seed == b.seed
            && a.require_all == b.require_all
            && a.drift.is_some() == b.drift.is_some()
    };
    check_cover(
        dirs,
        &parts.iter().map(|p| Some(p.shard)).collect::<Vec<_>>(),
        &same,
        "model, classes, methods, preprocessing, input set, base or seed differ",
    )?;
    let first = &parts[0];
    let mut cards: Vec<(usize, Card)> = Vec::new();
    for (dir, p) in dirs.iter().zip(&parts) {
        for c in &p.gallery {
            let figures = c
                .figures
                .iter()
                .map(|f| {
                    let path = dir.join(&f.file);
                    std::fs::read(&path)
                        .map(|png| Figure {
                            caption: f.caption.clone(),
                            png,
                        })
                        .map_err(|error| PipelineError::Io { path, error })
                })
                .collect::<Result<_>>()?;
            cards.push((
                c.index,
                Card {
                    title: c.title.clone(),
                    caption: c.caption.clone(),
                    figures,
                    tokens: Vec::new(),
                    confidence: c.confidence,
                    error: c.error,
                },
            ));
        }
    }
    cards.sort_by_key(|c| c.0);
    let drift: Option<Vec<DriftPartial>> = parts.iter().map(|p| p.drift.clone()).collect();
    let partial = AuditPartial::merge(parts.iter().map(|p| p.partial.clone()).collect())?;
    let s = audit::summarise(
        partial,
        drift,
        &first.checkpoint.classes,
        &first.policy,
        first.require_all,
    )?;
    let document = AuditDocument {
        schema_version: AuditDocument::SCHEMA.into(),
        checkpoint: first.checkpoint.clone(),
        base: first.base.clone(),
        data: first.data.clone(),
        masks: first.masks.clone(),
        preprocess: first.preprocess.clone(),
        policy: first.policy.clone(),
        require_all: first.require_all,
        verdicts: s.verdicts,
        pass: s.pass,
        audit: s.report,
        drift: s.drift,
        seed: first.seed,
        finelens_version: env!("CARGO_PKG_VERSION").into(),
        command_line: first.command_line.clone(),
        // Compute time: the shards' seconds added up.
        seconds: parts.iter().map(|p| p.seconds).sum(),
    };
    let blocks = page::audit_blocks(&PageInput {
        name: &first.checkpoint.path.display().to_string(),
        document: &document,
        card: &first.model_card,
        gallery: cards.into_iter().map(|c| c.1).collect(),
    })?;
    audit::write_report(out, force, &document, &blocks, progress)?;
    Ok(AuditOutcome { document, blocks })
}
