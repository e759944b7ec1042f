//! The tokenizer gives what Python's `tokenizers` gives on awkward strings (accents, curly
//! quotes, CJK, emoji, a very long word, zero-width characters, an empty text): the same ids,
//! token types, *character* offsets and word ids, whole and cut at 16 tokens. The expected values
//! are `scripts/text_parity.py`'s, committed in fixtures/text/.
//!
//! Skipped when the model folder is absent, unless FINELENS_REQUIRE_TEXT_MODEL is set (CI sets it).

use std::path::{Path, PathBuf};

use finelens_data::text::TextTokenizer;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn tokenizer_path() -> Option<PathBuf> {
    let dir = std::env::var_os("FINELENS_TEXT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/all-minilm-l6-v2"));
    let path = dir.join("tokenizer.json");
    if path.is_file() {
        return Some(path);
    }
    if std::env::var_os("FINELENS_REQUIRE_TEXT_MODEL").is_some() {
        panic!(
            "{} is missing and FINELENS_REQUIRE_TEXT_MODEL is set: run scripts/fetch-models.sh",
            path.display()
        );
    }
    eprintln!(
        "skipped: no {} (scripts/fetch-models.sh fetches it)",
        path.display()
    );
    None
}

#[test]
fn tokenizes_like_python() {
    let Some(path) = tokenizer_path() else { return };
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/text/tokenizer-parity.json")).unwrap(),
    )
    .unwrap();
    let max = expected["max_length"].as_u64().unwrap() as usize;
    let whole = TextTokenizer::from_file(&path, 512).unwrap();
    let cut = TextTokenizer::from_file(&path, max).unwrap();
    assert_eq!(whole.vocab_size(), 30_522);
    let cases = expected["cases"].as_array().unwrap();
    assert_eq!(cases.len(), 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let e = whole.encode(text).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(e.ids, ids, "{text:?}");
        let types: Vec<u32> = serde_json::from_value(case["type_ids"].clone()).unwrap();
        assert_eq!(e.type_ids, types, "{text:?}");
        let offsets: Vec<(usize, usize)> = serde_json::from_value(case["offsets"].clone()).unwrap();
        assert_eq!(e.offsets, offsets, "{text:?}: character offsets");
        let words: Vec<Option<u32>> = serde_json::from_value(case["word_ids"].clone()).unwrap();
        assert_eq!(e.word_ids, words, "{text:?}");
        assert!(!e.truncated);
        // The offsets slice the text by characters, as Python indexes strings.
        let chars: Vec<char> = text.chars().collect();
        for (&(a, b), id) in e.offsets.iter().zip(&e.ids) {
            assert!(
                a <= b && b <= chars.len(),
                "{text:?}: token {id} at {a}..{b}"
            );
        }

        let c = cut.encode(text).unwrap();
        let truncated: Vec<u32> = serde_json::from_value(case["truncated_ids"].clone()).unwrap();
        assert_eq!(c.ids, truncated, "{text:?} cut at {max}");
        assert_eq!(c.truncated, ids.len() > max, "{text:?}");
    }
}

#[test]
fn a_missing_or_broken_tokenizer_is_named() {
    let d = tempfile::tempdir().unwrap();
    let missing = d.path().join("tokenizer.json");
    let e = TextTokenizer::from_file(&missing, 128)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.starts_with(&missing.display().to_string()) && e.contains("no tokenizer"),
        "{e}"
    );
    std::fs::write(&missing, "{\"not\": \"a tokenizer\"}").unwrap();
    let e = TextTokenizer::from_file(&missing, 128)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("not a tokenizer.json"), "{e}");
    let e = TextTokenizer::from_file(&missing, 1)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("[CLS] and [SEP]"), "{e}");
}
