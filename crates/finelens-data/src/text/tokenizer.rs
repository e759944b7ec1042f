//! Text for finelens: a Hugging Face `tokenizer.json` read offline with the `tokenizers` crate,
//! as transformers' fast tokenizers use it.
//!
//! Two things differ from what the file alone would do. A `tokenizer.json` may store fixed
//! padding and truncation (all-MiniLM's pads and cuts every text to 128 tokens); both are cleared,
//! and texts are cut at the caller's `max_length` (batches are padded by
//! `finelens_models::TokenBatch::padded`, to their longest text). And Rust's `encode` gives
//! byte offsets where Python gives character offsets: [`TextTokenizer::encode`] gives character
//! offsets, so spans (rationales, highlighted words) mean the same in both.

use std::path::{Path, PathBuf};

use tokenizers::{Tokenizer, TruncationParams};

use crate::error::{DataError, Result};

/// One text, tokenized.
#[derive(Debug, Clone, PartialEq)]
pub struct Encoded {
    pub ids: Vec<u32>,
    /// The tokens as the vocabulary spells them (`[CLS]`, `play`, `##ing`).
    pub tokens: Vec<String>,
    pub type_ids: Vec<u32>,
    /// Per token, the characters (not bytes) of the text it covers; special tokens cover (0, 0).
    pub offsets: Vec<(usize, usize)>,
    /// Per token, the index of the word it belongs to; `None` for special tokens.
    pub word_ids: Vec<Option<u32>>,
    /// Whether the text was longer than the maximum length and cut.
    pub truncated: bool,
}

/// A tokenizer for one model, cutting texts at `max_length` tokens (special tokens included).
pub struct TextTokenizer {
    inner: Tokenizer,
    path: PathBuf,
    max_length: usize,
}

impl TextTokenizer {
    pub fn from_file(path: &Path, max_length: usize) -> Result<Self> {
        if max_length < 2 {
            return Err(DataError::Config(format!(
                "the maximum length must leave room for [CLS] and [SEP], got {max_length}"
            )));
        }
        let bad = |reason: String| DataError::Decode {
            path: path.to_owned(),
            reason,
        };
        if !path.is_file() {
            return Err(DataError::Io {
                path: path.to_owned(),
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no tokenizer (tokenizer.json) here",
                ),
            });
        }
        let mut inner =
            Tokenizer::from_file(path).map_err(|e| bad(format!("not a tokenizer.json: {e}")))?;
        inner.with_padding(None);
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                ..TruncationParams::default()
            }))
            .map_err(|e| bad(e.to_string()))?;
        Ok(TextTokenizer {
            inner,
            path: path.to_owned(),
            max_length,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The id of a token of the vocabulary (`[MASK]`), if it has one.
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Ids the tokenizer can produce, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Tokenize one text with the special tokens ([CLS] … [SEP] for BERT).
    pub fn encode(&self, text: &str) -> Result<Encoded> {
        let e = self
            .inner
            .encode_char_offsets(text, true)
            .map_err(|e| DataError::Config(format!("cannot tokenize {text:?}: {e}")))?;
        Ok(Encoded {
            ids: e.get_ids().to_vec(),
            tokens: e.get_tokens().to_vec(),
            type_ids: e.get_type_ids().to_vec(),
            offsets: e.get_offsets().to_vec(),
            word_ids: e.get_word_ids().to_vec(),
            truncated: !e.get_overflowing().is_empty(),
        })
    }
}
