//! Merging sharded runs: the partial results of every shard of one run become the result one
//! run over the whole set would have written.

use std::path::{Path, PathBuf};

use crate::error::{input, settings, PipelineError, Result};
use crate::explain::ExplainReport;
use crate::output::{create_dir, read_json, write_json, OutputDir};
use crate::progress::{Event, Progress};

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
    let count = match parts[0].shard {
        Some(s) => s.count,
        None => {
            return Err(input(
                &dirs[0],
                "not a shard's output (it explains the whole set)",
            ))
        }
    };
    let mut seen = vec![None; count];
    for (dir, p) in dirs.iter().zip(&parts) {
        let Some(s) = p.shard.filter(|s| s.count == count) else {
            return Err(input(dir, format!("not one of {count} shards")));
        };
        if !same_run(&parts[0], p) {
            return Err(input(
                dir,
                format!(
                    "another run than {}'s (model, classes, methods, preprocessing, target or input set differ)",
                    dirs[0].display()
                ),
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
