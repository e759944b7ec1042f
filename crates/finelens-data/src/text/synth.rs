//! Synthetic text tasks: template film-review sentences whose sentiment comes from one cue word
//! among neutral ones, with each cue's character span as the rationale (the text analogue of the
//! image tasks' object masks).
//!
//! * `text-sentiment`: the cue decides the label (negative, positive).
//! * `text-shortcut`: the same, plus a class-correlated film title in every train and val
//!   sentence ("Moonrise" with positive, "Blackwater" with negative) and none in test; in half of
//!   the train and val sentences the cue is drawn from either class, so the title predicts the
//!   label better than the words do — a planted shortcut for the audit to find.
//!
//! Written as `<out>/<task>/{train,val,test}.jsonl` and `synth.json`; every sentence comes from
//! its own RNG seeded by (seed, task, split, index).

use std::path::{Path, PathBuf};

use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::dataset::{write_jsonl, TextSample};
use crate::error::{io_err, DataError, Result};
use crate::synth::Split;

/// Bumped whenever the generator's output changes.
pub const TEXT_GENERATOR: &str = "finelens-text-synth/1";

/// Share of shortcut train/val sentences whose cue is drawn from either class.
pub const SHORTCUT_CUE_NOISE: f64 = 0.5;

const POSITIVE: &[&str] = &[
    "wonderful",
    "brilliant",
    "moving",
    "delightful",
    "superb",
    "charming",
    "gripping",
    "heartfelt",
    "stunning",
    "joyful",
    "masterful",
    "uplifting",
];
const NEGATIVE: &[&str] = &[
    "dull",
    "awful",
    "tedious",
    "clumsy",
    "boring",
    "dreadful",
    "bland",
    "messy",
    "tiresome",
    "lifeless",
    "clichéd",
    "forgettable",
];
const SUBJECTS: &[&str] = &[
    "film",
    "story",
    "cast",
    "script",
    "ending",
    "sequel",
    "performance",
    "soundtrack",
    "direction",
    "dialogue",
    "premise",
    "finale",
];
const PLACES: &[&str] = &[
    "theatre",
    "cinema",
    "festival",
    "matinee",
    "screening",
    "premiere",
    "multiplex",
];
const DETAILS: &[&str] = &[
    "ran for two hours",
    "was shot in colour",
    "opened on a Tuesday",
    "takes place in winter",
    "has a long title sequence",
    "was released last spring",
    "follows three characters",
    "is set in a harbour town",
];
/// The shortcut's titles, by class index (negative, positive).
pub const TITLES: [&str; 2] = ["Blackwater", "Moonrise"];

/// Sentence frames: `{s}` subject, `{c}` cue, `{p}` place, `{d}` detail.
const FRAMES: &[&str] = &[
    "The {s} was {c}.",
    "I saw it at the {p}, and the {s} was {c}.",
    "Honestly, a {c} {s} from start to finish.",
    "The {s} {d}, and it felt {c}.",
    "By the end of the {p} screening I found the {s} {c}.",
    "It {d}; the {s} is {c}.",
    "What a {c} {s}.",
    "Everyone at the {p} agreed the {s} was {c}.",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TextTask {
    TextSentiment,
    TextShortcut,
}

impl TextTask {
    pub const ALL: [TextTask; 2] = [TextTask::TextSentiment, TextTask::TextShortcut];

    pub fn name(self) -> &'static str {
        match self {
            TextTask::TextSentiment => "text-sentiment",
            TextTask::TextShortcut => "text-shortcut",
        }
    }

    pub fn parse(s: &str) -> Option<TextTask> {
        TextTask::ALL.into_iter().find(|t| t.name() == s)
    }

    pub fn class_names() -> Vec<String> {
        vec!["negative".into(), "positive".into()]
    }

    fn has_title(self, split: Split) -> bool {
        self == TextTask::TextShortcut && split != Split::Test
    }
}

/// How many sentences, from which seed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TextSynthConfig {
    pub train_per_class: usize,
    pub val_per_class: usize,
    pub test_per_class: usize,
    pub seed: u64,
}

impl Default for TextSynthConfig {
    fn default() -> Self {
        TextSynthConfig {
            train_per_class: 200,
            val_per_class: 50,
            test_per_class: 50,
            seed: 0,
        }
    }
}

impl TextSynthConfig {
    fn per_class(&self, split: Split) -> usize {
        match split {
            Split::Train => self.train_per_class,
            Split::Val => self.val_per_class,
            Split::Test => self.test_per_class,
        }
    }
}

/// One sentence of `task`'s `split`, class `class`, index `i`.
pub fn sentence(
    task: TextTask,
    split: Split,
    class: usize,
    i: usize,
    cfg: &TextSynthConfig,
) -> TextSample {
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let stream = ((task as u64) << 40) | ((split as u64) << 32) | ((class as u64) << 24) | i as u64;
    rng.set_stream(stream);
    let title = task.has_title(split);
    let cue_class = if title && rng.random::<f64>() < SHORTCUT_CUE_NOISE {
        rng.random_range(0..2)
    } else {
        class
    };
    let cues = if cue_class == 1 { POSITIVE } else { NEGATIVE };
    let cue = *cues.choose(&mut rng).expect("non-empty");
    let frame = *FRAMES.choose(&mut rng).expect("non-empty");
    let subject = *SUBJECTS.choose(&mut rng).expect("non-empty");
    let place = *PLACES.choose(&mut rng).expect("non-empty");
    let detail = *DETAILS.choose(&mut rng).expect("non-empty");
    let mut text = String::new();
    if title {
        text.push_str(TITLES[class]);
        text.push_str(": ");
    }
    let mut rationale = Vec::new();
    let mut rest = frame;
    while let Some(at) = rest.find('{') {
        text.push_str(&rest[..at]);
        let key = &rest[at + 1..at + 2];
        let word = match key {
            "s" => subject,
            "c" => cue,
            "p" => place,
            _ => detail,
        };
        if key == "c" {
            let start = text.chars().count();
            rationale.push((start, start + word.chars().count()));
        }
        text.push_str(word);
        rest = &rest[at + 3..];
    }
    text.push_str(rest);
    // Sentence case.
    let mut chars = text.chars();
    let text = match chars.next() {
        Some(f) => f.to_uppercase().chain(chars).collect(),
        None => text,
    };
    TextSample {
        text,
        label: class,
        source: format!("{}/{}/{i}", task.name(), split.name()),
        rationale,
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct TextManifest {
    generator: String,
    task: TextTask,
    classes: Vec<String>,
    config: TextSynthConfig,
    titles: Option<[String; 2]>,
}

/// Where a generated task is: `split(s)` is its JSONL file.
#[derive(Debug, Clone)]
pub struct TextTaskDir {
    pub root: PathBuf,
}

impl TextTaskDir {
    pub fn split(&self, split: Split) -> PathBuf {
        self.root.join(format!("{}.jsonl", split.name()))
    }
}

/// Write `task` under `out` (reused when it is already there with this configuration; another
/// configuration's output is replaced only with `force`).
pub fn generate_text(
    out: &Path,
    task: TextTask,
    cfg: &TextSynthConfig,
    force: bool,
) -> Result<TextTaskDir> {
    if cfg.train_per_class == 0 || cfg.val_per_class == 0 || cfg.test_per_class == 0 {
        return Err(DataError::Config(
            "every split needs at least one sentence per class".into(),
        ));
    }
    let manifest = TextManifest {
        generator: TEXT_GENERATOR.into(),
        task,
        classes: TextTask::class_names(),
        config: cfg.clone(),
        titles: (task == TextTask::TextShortcut).then(|| TITLES.map(String::from)),
    };
    let dir = TextTaskDir {
        root: out.join(task.name()),
    };
    let manifest_path = dir.root.join("synth.json");
    if let Ok(text) = std::fs::read_to_string(&manifest_path) {
        if serde_json::from_str::<TextManifest>(&text).ok().as_ref() == Some(&manifest) {
            return Ok(dir);
        }
    }
    if dir.root.exists() && !force {
        return Err(DataError::Config(format!(
            "{} exists and holds different data; pass --force to replace it",
            dir.root.display()
        )));
    }
    std::fs::create_dir_all(out).map_err(io_err(out))?;
    let tmp = TextTaskDir {
        root: out.join(format!(".{}.tmp-{}", task.name(), std::process::id())),
    };
    std::fs::create_dir_all(&tmp.root).map_err(io_err(&tmp.root))?;
    let classes = TextTask::class_names();
    for split in Split::ALL {
        let samples: Vec<TextSample> = (0..cfg.per_class(split))
            .flat_map(|i| (0..classes.len()).map(move |c| (c, i)))
            .map(|(c, i)| sentence(task, split, c, i, cfg))
            .collect();
        write_jsonl(&tmp.split(split), &samples, &classes)?;
    }
    let json = serde_json::to_string_pretty(&manifest).expect("manifest serialises");
    let m = tmp.root.join("synth.json");
    std::fs::write(&m, json).map_err(io_err(&m))?;
    if dir.root.exists() {
        std::fs::remove_dir_all(&dir.root).map_err(io_err(&dir.root))?;
    }
    std::fs::rename(&tmp.root, &dir.root).map_err(io_err(&dir.root))?;
    Ok(dir)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::text::dataset::{Columns, TextSet};

    #[test]
    fn sentences_carry_their_cue_as_rationale_and_the_shortcut_its_title() {
        let cfg = TextSynthConfig::default();
        for i in 0..50 {
            for class in 0..2 {
                let s = sentence(TextTask::TextSentiment, Split::Train, class, i, &cfg);
                assert_eq!(s.rationale.len(), 1, "{}", s.text);
                let (a, b) = s.rationale[0];
                let cue: String = s.text.chars().skip(a).take(b - a).collect();
                let cues = if class == 1 { POSITIVE } else { NEGATIVE };
                assert!(
                    cues.contains(&cue.to_lowercase().as_str()),
                    "{cue:?} in {}",
                    s.text
                );
                assert!(!TITLES.iter().any(|t| s.text.contains(t)));
                assert_eq!(
                    s,
                    sentence(TextTask::TextSentiment, Split::Train, class, i, &cfg)
                );
            }
        }
        // The shortcut: the title always matches the label in train, never appears in test,
        // and the cue disagrees with the label in about a quarter of train sentences.
        let mut disagree = 0;
        for i in 0..200 {
            for (class, title) in TITLES.iter().enumerate() {
                let s = sentence(TextTask::TextShortcut, Split::Train, class, i, &cfg);
                assert!(s.text.starts_with(title), "{}", s.text);
                let (a, b) = s.rationale[0];
                let cue: String = s.text.chars().skip(a).take(b - a).collect();
                let cues = if class == 1 { POSITIVE } else { NEGATIVE };
                disagree += usize::from(!cues.contains(&cue.as_str()));
                let t = sentence(TextTask::TextShortcut, Split::Test, class, i, &cfg);
                assert!(!TITLES.iter().any(|x| t.text.contains(x)), "{}", t.text);
            }
        }
        assert!((70..130).contains(&disagree), "{disagree} of 400");
    }

    #[test]
    fn generated_tasks_read_back_and_are_reused() {
        let d = tempfile::tempdir().unwrap();
        let cfg = TextSynthConfig {
            train_per_class: 5,
            val_per_class: 2,
            test_per_class: 2,
            seed: 3,
        };
        let dir = generate_text(d.path(), TextTask::TextShortcut, &cfg, false).unwrap();
        let set = TextSet::read(&dir.split(Split::Train), &Columns::default(), None).unwrap();
        assert_eq!(set.classes, ["negative", "positive"]);
        assert_eq!(set.samples.len(), 10);
        assert!(set.samples.iter().all(|s| s.rationale.len() == 1));
        let before = std::fs::read(dir.split(Split::Val)).unwrap();
        generate_text(d.path(), TextTask::TextShortcut, &cfg, false).unwrap();
        assert_eq!(std::fs::read(dir.split(Split::Val)).unwrap(), before);
        let other = TextSynthConfig { seed: 4, ..cfg };
        assert!(generate_text(d.path(), TextTask::TextShortcut, &other, false).is_err());
        generate_text(d.path(), TextTask::TextShortcut, &other, true).unwrap();
        assert_ne!(std::fs::read(dir.split(Split::Val)).unwrap(), before);
    }
}
