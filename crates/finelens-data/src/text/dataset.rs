//! Labelled text sets: CSV, TSV or JSONL files with a text and a label per record (column names
//! configurable), or a folder per class of `.txt` files. Classes are the sorted label names, as
//! ImageFolder's are the sorted folder names, unless a model's class list is given.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::{io_err, DataError, Result};
use crate::image_folder::stratified_split;

/// One labelled text.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSample {
    pub text: String,
    pub label: usize,
    /// Where it came from: `file:line`, or the `.txt` file.
    pub source: String,
    /// Character spans `[start, end)` that carry the label, when known (the synthetic tasks'
    /// cue words): the text analogue of an image's object mask.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rationale: Vec<(usize, usize)>,
}

/// The names of the text and label fields.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Columns {
    pub text: String,
    pub label: String,
}

impl Default for Columns {
    fn default() -> Self {
        Columns {
            text: "text".into(),
            label: "label".into(),
        }
    }
}

/// A labelled text set.
#[derive(Debug, Clone)]
pub struct TextSet {
    pub path: PathBuf,
    pub classes: Vec<String>,
    pub samples: Vec<TextSample>,
    /// Records left out (an empty text), with the reason.
    pub skipped: Vec<(String, String)>,
}

/// One record before its label is mapped to a class.
struct Record {
    text: String,
    label: String,
    source: String,
    rationale: Vec<(usize, usize)>,
}

fn bad(path: &Path, line: Option<usize>, reason: impl Into<String>) -> DataError {
    let at = match line {
        Some(l) => format!("{}:{l}", path.display()),
        None => path.display().to_string(),
    };
    DataError::Text {
        at,
        reason: reason.into(),
    }
}

fn read_delimited(path: &Path, delimiter: u8, columns: &Columns) -> Result<Vec<Record>> {
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(delimiter)
        .flexible(false)
        .from_path(path)
        .map_err(|e| bad(path, None, e.to_string()))?;
    let headers = reader
        .headers()
        .map_err(|e| bad(path, Some(1), csv_reason(&e)))?
        .clone();
    let find = |name: &str| {
        headers.iter().position(|h| h == name).ok_or_else(|| {
            bad(
                path,
                Some(1),
                format!(
                    "no column `{name}` (columns: {})",
                    headers.iter().collect::<Vec<_>>().join(", ")
                ),
            )
        })
    };
    let (t, l) = (find(&columns.text)?, find(&columns.label)?);
    // An optional `rationale` column: the spans as JSON, `[[start, end], …]`, empty for none.
    let r = headers.iter().position(|h| h == RATIONALE_FIELD);
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| {
            let line = e.position().map(|p| p.line() as usize);
            bad(path, line, csv_reason(&e))
        })?;
        let line = record.position().map_or(0, |p| p.line() as usize);
        let rationale = match r.map(|r| record[r].trim()) {
            Some(cell) if !cell.is_empty() => {
                let v = serde_json::from_str(cell).map_err(|e| not_spans(path, line, e))?;
                spans(v).map_err(|e| not_spans(path, line, e))?
            }
            _ => Vec::new(),
        };
        out.push(Record {
            text: record[t].to_owned(),
            label: record[l].trim().to_owned(),
            source: format!("{}:{line}", path.display()),
            rationale,
        });
    }
    Ok(out)
}

fn csv_reason(e: &csv::Error) -> String {
    match e.kind() {
        csv::ErrorKind::Utf8 { .. } => "not UTF-8 text".into(),
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => format!("{len} fields where the header has {expected_len}"),
        _ => e.to_string(),
    }
}

/// The field or column of a record's rationale: character spans `[[start, end], …]`.
pub const RATIONALE_FIELD: &str = "rationale";

fn spans(v: serde_json::Value) -> serde_json::Result<Vec<(usize, usize)>> {
    serde_json::from_value(v)
}

fn not_spans(path: &Path, line: usize, e: impl std::fmt::Display) -> DataError {
    bad(
        path,
        Some(line),
        format!("`{RATIONALE_FIELD}` is not a list of [start, end]: {e}"),
    )
}

/// A rationale's spans must be non-empty and inside the text (character offsets, end exclusive).
fn check_rationale(r: &Record) -> Result<()> {
    let n = r.text.chars().count();
    match r.rationale.iter().find(|&&(a, b)| a >= b || b > n) {
        Some(&(a, b)) => Err(DataError::Text {
            at: r.source.clone(),
            reason: format!(
                "rationale span [{a}, {b}) is {} the text's {n} characters",
                if a >= b {
                    "empty, not a span of"
                } else {
                    "outside"
                }
            ),
        }),
        None => Ok(()),
    }
}

fn read_jsonl(path: &Path, columns: &Columns) -> Result<Vec<Record>> {
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let mut out = Vec::new();
    for (k, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let line = k + 1;
        let text = std::str::from_utf8(raw).map_err(|_| bad(path, Some(line), "not UTF-8 text"))?;
        if text.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| bad(path, Some(line), format!("not a JSON object: {e}")))?;
        let field = |name: &str| -> Result<String> {
            match v.get(name) {
                Some(serde_json::Value::String(s)) => Ok(s.clone()),
                Some(serde_json::Value::Number(n)) => Ok(n.to_string()),
                Some(serde_json::Value::Bool(b)) => Ok(b.to_string()),
                Some(_) => Err(bad(path, Some(line), format!("`{name}` is not a string"))),
                None => Err(bad(path, Some(line), format!("no field `{name}`"))),
            }
        };
        let rationale = match v.get(RATIONALE_FIELD) {
            Some(r) => spans(r.clone()).map_err(|e| not_spans(path, line, e))?,
            None => Vec::new(),
        };
        out.push(Record {
            text: field(&columns.text)?,
            label: field(&columns.label)?.trim().to_owned(),
            source: format!("{}:{line}", path.display()),
            rationale,
        });
    }
    Ok(out)
}

fn read_folder(root: &Path) -> Result<Vec<Record>> {
    let mut out = Vec::new();
    let mut classes: Vec<PathBuf> = std::fs::read_dir(root)
        .map_err(io_err(root))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect();
    classes.sort();
    if classes.is_empty() {
        return Err(bad(
            root,
            None,
            "no class folders (expected <dir>/<class>/<text>.txt)",
        ));
    }
    for dir in classes {
        let label = dir
            .file_name()
            .expect("a folder")
            .to_string_lossy()
            .into_owned();
        let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io_err(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "txt"))
            .collect();
        files.sort();
        for f in files {
            let bytes = std::fs::read(&f).map_err(io_err(&f))?;
            let text = String::from_utf8(bytes).map_err(|_| bad(&f, None, "not UTF-8 text"))?;
            out.push(Record {
                text: text.trim_end_matches(['\n', '\r']).to_owned(),
                label: label.clone(),
                source: f.display().to_string(),
                rationale: Vec::new(),
            });
        }
    }
    Ok(out)
}

impl TextSet {
    /// Read `path` (`.csv`, `.tsv`, `.jsonl`, or a folder of class folders). With `classes`
    /// (a model's), every label must be one of them; without, the classes are the labels found,
    /// sorted. An empty text is skipped (listed in `skipped`).
    pub fn read(path: &Path, columns: &Columns, classes: Option<&[String]>) -> Result<TextSet> {
        let ext = path
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase());
        let records = if path.is_dir() {
            read_folder(path)?
        } else if !path.exists() {
            return Err(DataError::Io {
                path: path.to_owned(),
                error: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file"),
            });
        } else {
            match ext.as_deref() {
                Some("csv") => read_delimited(path, b',', columns)?,
                Some("tsv") => read_delimited(path, b'\t', columns)?,
                Some("jsonl") => read_jsonl(path, columns)?,
                _ => {
                    return Err(bad(
                        path,
                        None,
                        "not a text set (expected .csv, .tsv, .jsonl or a folder per class)",
                    ))
                }
            }
        };
        let classes: Vec<String> = match classes {
            Some(c) => c.to_vec(),
            None => records
                .iter()
                .map(|r| r.label.clone())
                .collect::<BTreeSet<_>>()
                .into_iter()
                .collect(),
        };
        let mut samples = Vec::new();
        let mut skipped = Vec::new();
        for r in records {
            if r.text.trim().is_empty() {
                skipped.push((r.source, "empty text".to_owned()));
                continue;
            }
            check_rationale(&r)?;
            let Some(label) = classes.iter().position(|c| *c == r.label) else {
                return Err(DataError::Text {
                    at: r.source,
                    reason: format!(
                        "label `{}` is not one of the classes ({})",
                        r.label,
                        classes.join(", ")
                    ),
                });
            };
            samples.push(TextSample {
                text: r.text,
                label,
                source: r.source,
                rationale: r.rationale,
            });
        }
        if samples.is_empty() {
            return Err(bad(path, None, "no labelled text"));
        }
        Ok(TextSet {
            path: path.to_owned(),
            classes,
            samples,
            skipped,
        })
    }

    /// A seeded, stratified split (see [`stratified_split`]).
    pub fn split(
        &self,
        val_fraction: f64,
        seed: u64,
    ) -> Result<(Vec<TextSample>, Vec<TextSample>)> {
        stratified_split(
            &self.samples,
            self.classes.len(),
            |s| s.label,
            val_fraction,
            seed,
        )
    }
}

/// Write samples as JSONL (`text`, `label` as the class name, `rationale`), atomically.
pub fn write_jsonl(path: &Path, samples: &[TextSample], classes: &[String]) -> Result<()> {
    #[derive(Serialize)]
    struct Line<'a> {
        text: &'a str,
        label: &'a str,
        #[serde(skip_serializing_if = "<[_]>::is_empty")]
        rationale: &'a [(usize, usize)],
    }
    let mut out = String::new();
    for s in samples {
        let line = Line {
            text: &s.text,
            label: &classes[s.label],
            rationale: &s.rationale,
        };
        out.push_str(&serde_json::to_string(&line).expect("plain data serialises"));
        out.push('\n');
    }
    let tmp = path.with_extension("jsonl.tmp");
    std::fs::write(&tmp, out).map_err(io_err(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    }

    #[test]
    fn reads_csv_tsv_jsonl_and_folders_alike() {
        let d = tempfile::tempdir().unwrap();
        let cols = Columns::default();
        let csv = write(
            d.path(),
            "a.csv",
            b"id,text,label\n1,\"Great, really great\",pos\n2,\"Dull\nand long\",neg\n3,,pos\n",
        );
        let s = TextSet::read(&csv, &cols, None).unwrap();
        assert_eq!(s.classes, ["neg", "pos"]);
        assert_eq!(s.samples.len(), 2);
        assert_eq!(s.samples[0].text, "Great, really great");
        assert_eq!(s.samples[1].text, "Dull\nand long");
        assert_eq!((s.samples[0].label, s.samples[1].label), (1, 0));
        assert_eq!(s.skipped.len(), 1, "the empty text is skipped");
        assert!(s.skipped[0].0.ends_with("a.csv:5"), "{:?}", s.skipped);

        let tsv = write(d.path(), "a.tsv", b"sentence\tsentiment\nfine\t1\nbad\t0\n");
        let cols2 = Columns {
            text: "sentence".into(),
            label: "sentiment".into(),
        };
        let s = TextSet::read(&tsv, &cols2, None).unwrap();
        assert_eq!(s.classes, ["0", "1"]);

        let jsonl = write(
            d.path(),
            "a.jsonl",
            "{\"text\": \"Crème brûlée\", \"label\": 1, \"rationale\": [[0, 5]]}\n\n{\"text\": \"meh\", \"label\": 0}\n"
                .as_bytes(),
        );
        let s = TextSet::read(&jsonl, &cols, None).unwrap();
        assert_eq!(s.samples[0].rationale, vec![(0, 5)]);
        assert_eq!(s.samples[1].source, format!("{}:3", jsonl.display()));

        for (class, text) in [("neg", "awful"), ("pos", "lovely")] {
            std::fs::create_dir_all(d.path().join("f").join(class)).unwrap();
            write(
                &d.path().join("f").join(class),
                "1.txt",
                format!("{text}\n").as_bytes(),
            );
        }
        let s = TextSet::read(&d.path().join("f"), &cols, None).unwrap();
        assert_eq!(s.classes, ["neg", "pos"]);
        assert_eq!(s.samples[1].text, "lovely");

        // A model's classes: the labels map to them, and a stranger is an error naming the line.
        let classes = ["neg".to_owned(), "pos".to_owned(), "mixed".to_owned()];
        let s = TextSet::read(&csv, &cols, Some(&classes)).unwrap();
        assert_eq!(s.classes.len(), 3);
        let e = TextSet::read(&tsv, &cols2, Some(&classes))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.tsv:2: label `1` is not one of the classes (neg, pos, mixed)"),
            "{e}"
        );
    }

    #[test]
    fn bad_files_are_one_line_errors_naming_the_place() {
        let d = tempfile::tempdir().unwrap();
        let cols = Columns::default();
        let err = |p: &Path| TextSet::read(p, &cols, None).unwrap_err().to_string();
        let p = write(d.path(), "nolabel.csv", b"text,stars\nok,5\n");
        assert!(err(&p).contains("nolabel.csv:1: no column `label` (columns: text, stars)"));
        let p = write(d.path(), "latin1.csv", b"text,label\ncaf\xe9,pos\n");
        assert!(
            err(&p).contains("latin1.csv:2: not UTF-8 text"),
            "{}",
            err(&p)
        );
        let p = write(d.path(), "ragged.csv", b"text,label\nok,pos,extra\n");
        assert!(
            err(&p).contains("ragged.csv:2: 3 fields where the header has 2"),
            "{}",
            err(&p)
        );
        let p = write(
            d.path(),
            "bad.jsonl",
            b"{\"text\": \"ok\", \"label\": \"a\"}\n{\"text\": 3\n",
        );
        assert!(
            err(&p).contains("bad.jsonl:2: not a JSON object"),
            "{}",
            err(&p)
        );
        let p = write(d.path(), "nolabel.jsonl", b"{\"text\": \"ok\"}\n");
        assert!(err(&p).contains("nolabel.jsonl:1: no field `label`"));
        let p = write(d.path(), "x.parquet", b"");
        assert!(err(&p).contains("not a text set"));
        assert!(err(&d.path().join("missing.csv")).contains("no such file"));
        // Rationales: spans inside the text (in characters: "Crème" is 5), in JSONL and CSV.
        let p = write(
            d.path(),
            "outside.jsonl",
            "{\"text\": \"Crème\", \"label\": \"a\", \"rationale\": [[2, 6]]}\n".as_bytes(),
        );
        assert!(
            err(&p).contains(
                "outside.jsonl:1: rationale span [2, 6) is outside the text's 5 characters"
            ),
            "{}",
            err(&p)
        );
        let p = write(
            d.path(),
            "spans.csv",
            b"text,label,rationale\ngood film,a,\"[[0, 4]]\"\nbad,b,\nmeh,b,\"[[1, 1]]\"\n",
        );
        assert!(
            err(&p).contains("spans.csv:4: rationale span [1, 1) is empty"),
            "{}",
            err(&p)
        );
        let p = write(
            d.path(),
            "notspans.csv",
            b"text,label,rationale\nok,a,0-4\n",
        );
        assert!(
            err(&p).contains("notspans.csv:2: `rationale` is not a list of [start, end]"),
            "{}",
            err(&p)
        );
        let good = write(
            d.path(),
            "spans2.csv",
            b"text,label,rationale\ngood film,a,\"[[0, 4], [5, 9]]\"\nbad,b,\n",
        );
        let s = TextSet::read(&good, &cols, None).unwrap();
        assert_eq!(s.samples[0].rationale, vec![(0, 4), (5, 9)]);
        assert!(s.samples[1].rationale.is_empty());
        for e in [err(&d.path().join("latin1.csv")), err(&p)] {
            assert_eq!(e.lines().count(), 1, "{e}");
        }
    }

    #[test]
    fn jsonl_round_trips_and_splits_are_stratified() {
        let d = tempfile::tempdir().unwrap();
        let classes = vec!["a".to_owned(), "b".to_owned()];
        let samples: Vec<TextSample> = (0..20)
            .map(|i| TextSample {
                text: format!("text {i}"),
                label: i % 2,
                source: String::new(),
                rationale: if i == 3 { vec![(0, 4)] } else { vec![] },
            })
            .collect();
        let p = d.path().join("s.jsonl");
        write_jsonl(&p, &samples, &classes).unwrap();
        let s = TextSet::read(&p, &Columns::default(), None).unwrap();
        assert_eq!(s.classes, classes);
        for (a, b) in s.samples.iter().zip(&samples) {
            assert_eq!(
                (&a.text, a.label, &a.rationale),
                (&b.text, b.label, &b.rationale)
            );
        }
        let (train, val) = s.split(0.2, 7).unwrap();
        assert_eq!((train.len(), val.len()), (16, 4));
        assert_eq!(val.iter().filter(|v| v.label == 0).count(), 2);
        let again = s.split(0.2, 7).unwrap();
        assert_eq!(again.1, val);
    }
}
