//! `finelens inspect`: what a checkpoint or a Hugging Face text model folder holds, and with
//! `--spectral` WeightWatcher's reading of every weight matrix ([`finelens_drift::spectrum`]).

use std::fmt::Write as _;
use std::path::Path;

use finelens_drift::weights::{checkpoint_spectra, LayerSpectrum};
use finelens_models::bert::{canonical_name, WEIGHTS_FILE};

use crate::error::{PipelineError, Result};
use crate::inputs::{CheckpointSummary, ModelSource};
use crate::text::{inspect_text, is_model_folder};

/// The summary of `path` (a checkpoint, read as `source` says, or a text model folder) as text
/// or JSON; with `spectral`, each weight matrix's spectrum after it.
pub fn inspect(path: &Path, source: &ModelSource, spectral: bool, json: bool) -> Result<String> {
    // Serialising these plain structs cannot fail; the error names the file if it ever does.
    let js = |error| PipelineError::Json {
        path: path.to_owned(),
        error,
    };
    let (summary, text, spectra) = if is_model_folder(path) {
        let s = inspect_text(path)?;
        let spectra = spectral
            .then(|| checkpoint_spectra(&path.join(WEIGHTS_FILE), Some(canonical_name), None))
            .transpose()?;
        (
            serde_json::to_value(&s).map_err(js)?,
            s.to_string(),
            spectra,
        )
    } else {
        let s = CheckpointSummary::of(&source.checkpoint()?);
        let spectra = spectral
            .then(|| checkpoint_spectra(path, None, None))
            .transpose()?;
        (
            serde_json::to_value(&s).map_err(js)?,
            s.to_string(),
            spectra,
        )
    };
    Ok(match (json, spectra) {
        (true, None) => serde_json::to_string_pretty(&summary).map_err(js)?,
        (true, Some(spectra)) => {
            let mut v = summary;
            v["spectra"] = serde_json::to_value(&spectra).map_err(js)?;
            serde_json::to_string_pretty(&v).map_err(js)?
        }
        (false, None) => text,
        (false, Some(spectra)) => format!("{text}\n\n{}", spectra_table(&spectra)),
    })
}

/// One line per weight matrix, then how many WeightWatcher would call over-fit, well trained
/// and under-trained.
pub fn spectra_table(spectra: &[LayerSpectrum]) -> String {
    let fmt = |v: Option<f64>, p: usize| v.map_or("—".to_owned(), |v| format!("{v:.p$}"));
    let mut out = String::from(
        "weight matrices (WeightWatcher: ESD of WᵀW, power-law tail fit; conv kernels as out × in·k·k)\n",
    );
    let _ = writeln!(
        out,
        "{:<40} {:>16} {:>6} {:>5} {:>6} {:>9} {:>8} {:>5}  reading",
        "tensor", "shape", "α", "±", "α̂", "log λmax", "MP rank", "traps"
    );
    let mut counts = [0usize; 3];
    for l in spectra {
        let s = &l.spectrum;
        let shape = l
            .shape
            .iter()
            .map(|d| d.to_string())
            .collect::<Vec<_>>()
            .join("×");
        let reading = s.alpha.map_or("no fit (too few eigenvalues)", |a| {
            let i = finelens_drift::spectrum::reading_index(a);
            counts[i] += 1;
            finelens_drift::spectrum::READINGS[i]
        });
        let _ = writeln!(
            out,
            "{:<40} {:>16} {:>6} {:>5} {:>6} {:>9.3} {:>8.3} {:>5}  {reading}",
            l.name,
            shape,
            fmt(s.alpha, 2),
            fmt(s.alpha_sigma, 2),
            fmt(s.alpha_weighted, 2),
            s.log_spectral_norm,
            s.mp_soft_rank,
            s.correlation_traps,
        );
    }
    let _ = write!(
        out,
        "{} matrices: {} over-fit (α < 2), {} well trained, {} under-trained (α > 6)",
        spectra.len(),
        counts[0],
        counts[1],
        counts[2]
    );
    out
}
