//! Output directories and JSON documents.
//!
//! A job writes its whole directory under a temporary name beside the destination and renames it
//! into place when it is done, so a reader never sees half a report; an existing destination is
//! replaced only with `force`, and only by a complete new one. A job that fails part-way keeps
//! what it wrote, renamed `<out>.partial`, and says so.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{input, PipelineError, Result};

/// A JSON document finelens writes: a struct with a `schema_version`, read back through the same
/// struct.
pub trait Versioned: Serialize + DeserializeOwned {
    /// `finelens-<kind>/<major>`; bumped when a field's meaning changes.
    const SCHEMA: &'static str;
    fn schema_version(&self) -> &str;
}

/// Write `value` as pretty JSON, atomically (temporary file + rename).
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(|error| PipelineError::Json {
        path: path.to_owned(),
        error,
    })?;
    write_file(path, text.as_bytes())
}

/// Read a document written by [`write_json`], refusing another schema.
pub fn read_json<T: Versioned>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|error| PipelineError::Io {
        path: path.to_owned(),
        error,
    })?;
    let version: serde_json::Value =
        serde_json::from_str(&text).map_err(|error| PipelineError::Json {
            path: path.to_owned(),
            error,
        })?;
    match version.get("schema_version").and_then(|v| v.as_str()) {
        Some(v) if v == T::SCHEMA => {}
        Some(v) => {
            return Err(input(
                path,
                format!("schema {v}; this finelens reads {}", T::SCHEMA),
            ))
        }
        None => return Err(input(path, format!("not a {} document", T::SCHEMA))),
    }
    serde_json::from_value(version).map_err(|error| PipelineError::Json {
        path: path.to_owned(),
        error,
    })
}

/// Write bytes atomically, creating the parent directory.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_dir(dir)?;
    }
    finelens_models::checkpoint::write_atomic(path, bytes)?;
    Ok(())
}

pub fn create_dir(dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir)
        .map_err(|e| input(dir, format!("cannot create output directory: {e}")))
}

/// A PNG's bytes.
pub fn png_bytes(img: &image::RgbImage) -> Result<Vec<u8>> {
    Ok(finelens_report::heatmap::png(img)?)
}

/// Where a job writes, as a command line gives it.
#[derive(Debug, Clone)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct OutputSettings {
    /// Output directory (default: reports/<command>). Refused when it exists, unless --force;
    /// written under a temporary name and renamed into place once complete; a run that fails
    /// keeps what it wrote as <out>.partial.
    #[cfg_attr(feature = "cli", arg(long))]
    pub out: Option<PathBuf>,
    /// Replace an existing output directory (the new one is complete before the old one goes).
    #[cfg_attr(feature = "cli", arg(long))]
    pub force: bool,
}

impl OutputSettings {
    /// The directory: as given, or `reports/<command>`.
    pub fn dir(&self, command: &str) -> PathBuf {
        self.out
            .clone()
            .unwrap_or_else(|| Path::new("reports").join(command))
    }
}

/// An output directory being written: files go to [`OutputDir::path`], a temporary directory
/// beside the destination, until [`OutputDir::commit`] puts it in place.
pub struct OutputDir {
    out: PathBuf,
    tmp: PathBuf,
    force: bool,
    open: bool,
}

impl OutputDir {
    /// Refuse an existing destination unless `force`: call it before any long work.
    pub fn check(out: &Path, force: bool) -> Result<()> {
        if out.exists() && !force {
            return Err(input(
                out,
                "the output directory exists; pass --force to replace it",
            ));
        }
        Ok(())
    }

    pub fn create(out: &Path, force: bool) -> Result<Self> {
        Self::check(out, force)?;
        let parent = parent_of(out);
        create_dir(parent)?;
        let tmp = parent.join(format!(".{}.partial-{}", name_of(out), std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        create_dir(&tmp)?;
        Ok(Self {
            out: out.to_owned(),
            tmp,
            force,
            open: true,
        })
    }

    /// Where the files go while the job runs.
    pub fn path(&self) -> &Path {
        &self.tmp
    }

    /// The destination.
    pub fn destination(&self) -> &Path {
        &self.out
    }

    /// Put the finished directory in place (moving an old one aside, then removing it).
    pub fn commit(mut self) -> Result<PathBuf> {
        self.open = false;
        let io = |path: &Path| {
            let path = path.to_owned();
            move |error| PipelineError::Io { path, error }
        };
        if self.out.exists() {
            if !self.force {
                let _ = std::fs::remove_dir_all(&self.tmp);
                return Err(input(
                    &self.out,
                    "the output directory exists; pass --force to replace it",
                ));
            }
            let old = parent_of(&self.out).join(format!(
                ".{}.old-{}",
                name_of(&self.out),
                std::process::id()
            ));
            std::fs::rename(&self.out, &old).map_err(io(&self.out))?;
            std::fs::rename(&self.tmp, &self.out).map_err(io(&self.out))?;
            let _ = std::fs::remove_dir_all(&old);
        } else {
            std::fs::rename(&self.tmp, &self.out).map_err(io(&self.out))?;
        }
        Ok(self.out.clone())
    }

    /// After a failure: keep what was written as `<out>.partial` and name it in the error.
    pub fn fail(mut self, error: PipelineError) -> PipelineError {
        self.open = false;
        let kept = PathBuf::from(format!("{}.partial", self.out.display()));
        let _ = std::fs::remove_dir_all(&kept);
        match std::fs::rename(&self.tmp, &kept) {
            Ok(()) => PipelineError::Partial {
                inner: Box::new(error),
                kept,
            },
            Err(_) => {
                let _ = std::fs::remove_dir_all(&self.tmp);
                error
            }
        }
    }

    /// Run `fill` in this directory: commit on success, keep the partial output on failure.
    pub fn run<T>(self, fill: impl FnOnce(&Path) -> Result<T>) -> Result<T> {
        match fill(&self.tmp) {
            Ok(v) => {
                self.commit()?;
                Ok(v)
            }
            Err(e) => Err(self.fail(e)),
        }
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.open {
            let _ = std::fs::remove_dir_all(&self.tmp);
        }
    }
}

fn parent_of(out: &Path) -> &Path {
    out.parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

fn name_of(out: &Path) -> String {
    out.file_name()
        .map_or("output".into(), |n| n.to_string_lossy().into_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_directory_appears_whole_or_not_at_all() {
        let d = tempfile::tempdir().unwrap();
        let out = d.path().join("report");
        OutputDir::create(&out, false)
            .unwrap()
            .run(|dir| write_file(&dir.join("a.txt"), b"one"))
            .unwrap();
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"one");
        // Refused without force, before any work.
        assert!(OutputDir::create(&out, false)
            .err()
            .unwrap()
            .to_string()
            .contains("pass --force"));
        // A failed run leaves the old directory as it was and keeps its own output apart.
        let e = OutputDir::create(&out, true)
            .unwrap()
            .run(|dir| -> Result<()> {
                write_file(&dir.join("b.txt"), b"two")?;
                Err(PipelineError::Settings("boom".into()))
            })
            .unwrap_err();
        assert!(
            e.to_string().starts_with("boom (outputs so far are in"),
            "{e}"
        );
        assert_eq!(std::fs::read(out.join("a.txt")).unwrap(), b"one");
        assert!(!out.join("b.txt").exists());
        assert_eq!(
            std::fs::read(d.path().join("report.partial/b.txt")).unwrap(),
            b"two"
        );
        // With force, a complete new directory replaces the old one.
        OutputDir::create(&out, true)
            .unwrap()
            .run(|dir| write_file(&dir.join("c.txt"), b"three"))
            .unwrap();
        assert!(!out.join("a.txt").exists() && out.join("c.txt").exists());
        // No temporary directory is left behind.
        let names: Vec<String> = std::fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert!(names.iter().all(|n| !n.starts_with('.')), "{names:?}");
    }

    #[derive(Debug, PartialEq, Serialize, serde::Deserialize)]
    struct Doc {
        schema_version: String,
        x: f64,
    }

    impl Versioned for Doc {
        const SCHEMA: &'static str = "finelens-test/1";
        fn schema_version(&self) -> &str {
            &self.schema_version
        }
    }

    #[test]
    fn documents_round_trip_and_other_schemas_are_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("doc.json");
        let doc = Doc {
            schema_version: Doc::SCHEMA.into(),
            x: 1.5,
        };
        write_json(&p, &doc).unwrap();
        assert_eq!(read_json::<Doc>(&p).unwrap(), doc);
        std::fs::write(&p, r#"{"schema_version": "finelens-test/9", "x": 1}"#).unwrap();
        let e = read_json::<Doc>(&p).unwrap_err().to_string();
        assert!(
            e.contains("schema finelens-test/9; this finelens reads finelens-test/1"),
            "{e}"
        );
        std::fs::write(&p, r#"{"x": 1}"#).unwrap();
        assert!(read_json::<Doc>(&p).is_err());
    }
}
