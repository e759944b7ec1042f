//! Text: labelled text sets ([`dataset`]), the synthetic sentiment tasks with rationales
//! ([`synth`]) and a Hugging Face tokenizer ([`tokenizer`]).

pub mod dataset;
pub mod synth;
pub mod tokenizer;

pub use dataset::{write_jsonl, Columns, TextSample, TextSet};
pub use synth::{generate_text, TextSynthConfig, TextTask, TextTaskDir};
pub use tokenizer::{Encoded, TextTokenizer};
