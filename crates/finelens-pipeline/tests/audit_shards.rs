//! An audit run in three shards and merged gives the single run's report: the same images,
//! the same per-image findings, the same verdicts, every figure but CKA to float rounding (CKA is
//! the same minibatch estimator over other minibatches), and a page with every image.

use std::path::{Path, PathBuf};

use finelens_attrib::{BaselineSpec, MethodOptions, MethodSpec};
use finelens_audit::policy::Figure;
use finelens_data::synth::{self, Split, SynthConfig, Task};
use finelens_models::checkpoint;
use finelens_pipeline::audit::{audit, audit_shard, AuditJob};
use finelens_pipeline::merge::merge_audit;
use finelens_pipeline::progress::quiet;
use finelens_pipeline::shard::Shard;
use finelens_pipeline::{ModelSource, PreprocessSettings};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet-mini-pretrain.safetensors")
}

/// The fixture with every weight moved by seeded noise: a "fine-tuned" model with real drift.
fn perturbed(out: &Path) -> PathBuf {
    let ck = checkpoint::load(&fixture(), None).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let noise = Normal::new(0.0f32, 0.05).unwrap();
    for (name, t, _) in ck.store.iter() {
        let n = t.elem_count();
        let e: Vec<f32> = (0..n).map(|_| noise.sample(&mut rng)).collect();
        let e = candle_core::Tensor::from_vec(e, t.shape(), t.device())
            .unwrap()
            .to_dtype(t.dtype())
            .unwrap();
        let moved = (&t + (t.abs().unwrap() * e).unwrap()).unwrap();
        ck.store.var(name).unwrap().set(&moved).unwrap();
    }
    let path = out.join("moved.safetensors");
    checkpoint::save(&path, &ck.store, &ck.meta).unwrap();
    path
}

fn job(model: &Path, data: &Path, out: PathBuf, shard: Option<Shard>) -> AuditJob {
    AuditJob {
        model: ModelSource::new(model.to_owned()),
        preprocess: PreprocessSettings::default(),
        data: data.to_owned(),
        masks: None,
        no_masks: false,
        base: Some(ModelSource::new(fixture())),
        policy: None,
        require_all: true,
        evaluate: false,
        methods: MethodSpec::parse_list(
            "saliency,integrated_gradients:steps=8,smoothgrad:samples=3",
        )
        .unwrap(),
        shared: MethodOptions::default(),
        limit: 100,
        replacement: BaselineSpec::Blur(None),
        sanity_images: 3,
        seed: 1,
        strict: true,
        out,
        force: false,
        command_line: vec![],
        shard,
    }
}

fn close(a: f64, b: f64) -> bool {
    (a.is_nan() && b.is_nan()) || (a - b).abs() <= 1e-12 * a.abs().max(b.abs()).max(1.0)
}

/// Every number in two JSON documents within float rounding, everything else equal.
fn assert_close(a: &serde_json::Value, b: &serde_json::Value, at: &str) {
    use serde_json::Value::*;
    match (a, b) {
        (Object(x), Object(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: fields differ");
            for (k, v) in x {
                assert_close(v, &y[k], &format!("{at}.{k}"));
            }
        }
        (Array(x), Array(y)) => {
            assert_eq!(x.len(), y.len(), "{at}: lengths differ");
            for (i, (v, w)) in x.iter().zip(y).enumerate() {
                assert_close(v, w, &format!("{at}[{i}]"));
            }
        }
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            assert!(close(x, y), "{at}: {x} vs {y}");
        }
        _ => assert_eq!(a, b, "{at}"),
    }
}

#[test]
fn three_audit_shards_merged_equal_one_run() {
    let d = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        size: 64,
        train_per_class: 1,
        val_per_class: 3,
        test_per_class: 1,
        seed: 0,
    };
    let data = synth::generate(d.path(), Task::Pretrain, &cfg, false)
        .unwrap()
        .images(Split::Val);
    let model = perturbed(d.path());
    let whole = audit(
        &job(&model, &data, d.path().join("whole"), None),
        &mut quiet,
    )
    .unwrap()
    .document;
    assert_eq!(whole.audit.images.len(), 18);
    assert!(whole.masks.is_some(), "the synthetic set has masks");

    let shards: Vec<PathBuf> = (0..3)
        .map(|i| {
            let out = d.path().join(format!("shard{i}"));
            let shard = Some(Shard { index: i, count: 3 });
            let part = audit_shard(&job(&model, &data, out.clone(), shard), &mut quiet).unwrap();
            assert!(
                part.partial.images.len() < 18,
                "a shard holds part of the set"
            );
            out
        })
        .collect();
    let order = [shards[1].clone(), shards[2].clone(), shards[0].clone()];
    let merged = merge_audit(&order, &d.path().join("merged"), false, &mut quiet)
        .unwrap()
        .document;

    // Per image: equal exactly.
    assert_eq!(
        serde_json::to_value(&merged.audit.images).unwrap(),
        serde_json::to_value(&whole.audit.images).unwrap()
    );
    // Per method and per class: means of the same numbers, to float rounding.
    for (part, a, b) in [
        (
            "methods",
            serde_json::to_value(&merged.audit.methods).unwrap(),
            serde_json::to_value(&whole.audit.methods).unwrap(),
        ),
        (
            "shortcut",
            serde_json::to_value(&merged.audit.shortcut).unwrap(),
            serde_json::to_value(&whole.audit.shortcut).unwrap(),
        ),
    ] {
        assert_close(&a, &b, part);
    }
    assert_eq!(merged.audit.methods[0].sanity.images, 3);
    // Every figure, CKA's within its estimator's noise.
    assert_eq!(merged.audit.figures.len(), whole.audit.figures.len());
    for (figure, &v) in &whole.audit.figures {
        let m = merged.audit.figures[figure];
        if *figure == Figure::DriftMinCkaPenultimate {
            assert!((m - v).abs() < 0.1, "CKA {m} vs {v}");
        } else {
            assert!(close(m, v), "{figure:?}: {m} vs {v}");
        }
    }
    let verdicts = |d: &finelens_pipeline::audit::AuditDocument| -> Vec<_> {
        d.verdicts
            .iter()
            .map(|v| (v.check.clone(), v.key.clone(), v.pass))
            .collect()
    };
    assert_eq!(verdicts(&merged), verdicts(&whole));
    assert_eq!(merged.pass, whole.pass);
    let (dm, dw) = (merged.drift.unwrap(), whole.drift.unwrap());
    assert_close(
        &serde_json::to_value(&dm.weights).unwrap(),
        &serde_json::to_value(&dw.weights).unwrap(),
        "weights",
    );
    assert_eq!(dm.explanation, dw.explanation);
    // Batches of 16; a batch under 4 images is skipped (the single run's last 2; a shard's
    // own remainder).
    assert_eq!(dw.representation.examples, 16);
    assert!((4..=18).contains(&dm.representation.examples));
    assert!(dm.representation.diagonal.iter().all(|v| v.is_finite()));

    // The page shows every image, with the single run's pictures.
    let html = std::fs::read_to_string(d.path().join("merged/index.html")).unwrap();
    for img in &whole.audit.images {
        assert!(html.contains(&img.id), "{} is not on the page", img.id);
    }
    let count = |dir: &Path| walk(&dir.join("gallery")).len();
    assert_eq!(
        count(&d.path().join("merged")),
        count(&d.path().join("whole"))
    );
    for f in walk(&d.path().join("whole/gallery")) {
        let rel = f.strip_prefix(d.path().join("whole")).unwrap();
        assert_eq!(
            std::fs::read(&f).unwrap(),
            std::fs::read(d.path().join("merged").join(rel)).unwrap(),
            "{} differs",
            rel.display()
        );
    }

    // A shard cannot pass for a report, nor a report for a shard; a missing shard is named.
    assert!(audit(
        &job(
            &model,
            &data,
            d.path().join("x"),
            Some(Shard { index: 0, count: 3 })
        ),
        &mut quiet
    )
    .is_err());
    let e = merge_audit(&order[..2], &d.path().join("m2"), false, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("is missing"), "{e}");
    let e = merge_audit(
        &[d.path().join("whole")],
        &d.path().join("m3"),
        false,
        &mut quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("partial.json"), "{e}");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out.sort();
    out
}
