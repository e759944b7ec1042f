//! finelens's token attributions on a real all-MiniLM-L6-v2 match Captum's on the same weights
//! and tokens (`scripts/text_attrib_reference.py`, committed in fixtures/text/): integrated
//! gradients (Gauss–Legendre 50, `pad` baseline, on the word embeddings — Captum's
//! `LayerIntegratedGradients` on `bert.embeddings.word_embeddings`) per token with correlation
//! ≥ 0.999 and the same sum to 1%; saliency (the gradient's norm per token) and gradient × input
//! to float precision.
//!
//! Skipped when the model is absent, unless FINELENS_REQUIRE_TEXT_MODEL is set (CI sets it).

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use finelens_attrib::{
    Attributor, Baseline, GradientKind, IntegratedGradients, Normalisation, Rule, Saliency,
};
use finelens_data::text::TextTokenizer;
use finelens_models::bert::{read_hf_folder, Bert, OnWordEmbeddings, TextHead};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn model_dir() -> Option<PathBuf> {
    let dir = std::env::var_os("FINELENS_TEXT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| root().join(".cache/models/all-minilm-l6-v2"));
    if dir.join("model.safetensors").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("FINELENS_REQUIRE_TEXT_MODEL").is_none(),
        "{} is missing: run scripts/fetch-models.sh",
        dir.display()
    );
    eprintln!("skipped: no text model at {}", dir.display());
    None
}

fn floats(v: &serde_json::Value) -> Vec<f64> {
    serde_json::from_value(v.clone()).unwrap()
}

fn pearson(a: &[f64], b: &[f64]) -> f64 {
    let n = a.len() as f64;
    let (ma, mb) = (a.iter().sum::<f64>() / n, b.iter().sum::<f64>() / n);
    let cov: f64 = a.iter().zip(b).map(|(x, y)| (x - ma) * (y - mb)).sum();
    let va: f64 = a.iter().map(|x| (x - ma).powi(2)).sum();
    let vb: f64 = b.iter().map(|y| (y - mb).powi(2)).sum();
    cov / (va * vb).sqrt()
}

/// The largest difference relative to the largest magnitude.
fn relative_gap(ours: &[f64], theirs: &[f64]) -> f64 {
    let scale = theirs.iter().fold(0f64, |m, v| m.max(v.abs()));
    let worst = ours
        .iter()
        .zip(theirs)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    worst / scale
}

#[test]
fn token_attributions_match_captum() {
    let Some(dir) = model_dir() else { return };
    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root().join("fixtures/text/captum-attributions.json")).unwrap(),
    )
    .unwrap();
    let classes = expected["classes"].as_u64().unwrap() as usize;
    let folder = read_hf_folder(&dir).unwrap();
    let (spec, store) = folder.store(TextHead::Cls, classes, 0).unwrap();
    // scripts/text_parity.py's deterministic classifier: W[i][j] = 0.05 sin(0.37 i + 0.11 j + 0.5).
    let h = spec.config.hidden_size;
    let w: Vec<f32> = (0..classes * h)
        .map(|k| (0.05 * (0.37 * (k / h) as f64 + 0.11 * (k % h) as f64 + 0.5).sin()) as f32)
        .collect();
    let b: Vec<f32> = (0..classes).map(|i| 0.01 * (i + 1) as f32).collect();
    let set = |name: &str, t: Tensor| store.var(name).unwrap().set(&t).unwrap();
    set(
        "classifier.weight",
        Tensor::from_vec(w, (classes, h), &Device::Cpu).unwrap(),
    );
    set(
        "classifier.bias",
        Tensor::from_vec(b, classes, &Device::Cpu).unwrap(),
    );
    let bert = Bert::new(spec.clone(), &store.frozen_as(DType::F32).unwrap()).unwrap();
    let tok = TextTokenizer::from_file(&dir.join("tokenizer.json"), 128).unwrap();
    let pad = spec.config.pad_token_id;
    for case in expected["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let e = tok.encode(text).unwrap();
        let ids: Vec<u32> = serde_json::from_value(case["ids"].clone()).unwrap();
        assert_eq!(e.ids, ids, "{text}: tokenized as Python does");
        let t = ids.len();
        let row = |v: &[u32]| Tensor::from_vec(v.to_vec(), (1, t), &Device::Cpu).unwrap();
        let model = OnWordEmbeddings {
            bert: &bert,
            type_ids: row(&e.type_ids),
            mask: Tensor::ones((1, t), DType::U32, &Device::Cpu).unwrap(),
        };
        let x = model.input(&row(&ids)).unwrap();
        let base_ids: Vec<u32> = ids
            .iter()
            .zip(&e.word_ids)
            .map(|(&i, w)| if w.is_none() { i } else { pad })
            .collect();
        let target = case["target"].as_u64().unwrap() as usize;
        let per_token = |map: &ndarray::Array3<f32>, norm: bool| -> Vec<f64> {
            map.as_slice()
                .unwrap()
                .chunks(h)
                .map(|r| {
                    if norm {
                        r.iter().map(|v| (*v as f64).powi(2)).sum::<f64>().sqrt()
                    } else {
                        r.iter().map(|v| *v as f64).sum()
                    }
                })
                .collect()
        };
        let ig = IntegratedGradients {
            steps: 50,
            rule: Rule::GaussLegendre,
            baseline: Baseline::Image(model.input(&row(&base_ids)).unwrap()),
            internal_batch: Some(10),
            ..IntegratedGradients::new(Normalisation {
                mean: [0.0; 3],
                std: [1.0; 3],
            })
        }
        .attribute(&model, &x, &[target])
        .unwrap()
        .remove(0);
        let ours = per_token(&ig.map, false);
        let theirs = floats(&case["integrated_gradients"]);
        let r = pearson(&ours, &theirs);
        let (s0, s1) = (ours.iter().sum::<f64>(), theirs.iter().sum::<f64>());
        eprintln!("{text}: IG correlation {r:.6}, sums {s0:.6e} vs {s1:.6e}");
        assert!(r >= 0.999, "{text}: IG correlation {r}");
        assert!(
            (s0 - s1).abs() <= 0.01 * s1.abs(),
            "{text}: IG sum {s0} vs {s1}"
        );
        // Completeness to float precision: a BERT is smooth along the path, so Gauss–Legendre
        // converges fast (Captum's own delta for GL-50 is in the reference).
        let c = ig.completeness.as_ref().expect("IG reports completeness");
        eprintln!(
            "{text}: GL-50 delta {:.2e} (relative {:.2e}; Captum's {:.2e})",
            c.delta,
            c.relative_delta,
            case["integrated_gradients_delta"].as_f64().unwrap().abs()
        );
        assert!(
            c.delta < 1e-5 + 1e-3 * c.output_difference.abs(),
            "{text}: {c:?}"
        );
        for (kind, key, norm) in [
            (GradientKind::Absolute, "saliency", true),
            (GradientKind::TimesInput, "gradient_x_input", false),
        ] {
            let a = Saliency { kind }
                .attribute(&model, &x, &[target])
                .unwrap()
                .remove(0);
            let gap = relative_gap(&per_token(&a.map, norm), &floats(&case[key]));
            eprintln!("{text}: {key} largest gap {gap:.2e} of the largest score");
            assert!(gap < 1e-4, "{text}: {key} differs by {gap}");
        }
    }
}
