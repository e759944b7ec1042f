//! A set explained in three shards and merged equals the unsharded run, image for image and
//! array for array.

use std::path::{Path, PathBuf};

use finelens_attrib::{MethodOptions, MethodSpec};
use finelens_data::synth::{self, Split, SynthConfig, Task};
use finelens_pipeline::explain::{explain, ExplainReport, ExplainSettings};
use finelens_pipeline::merge::merge_explain;
use finelens_pipeline::progress::quiet;
use finelens_pipeline::shard::Shard;
use finelens_pipeline::{ModelSource, PreprocessSettings};

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet-mini-pretrain.safetensors")
}

fn settings(input: &Path, out: PathBuf, shard: Option<Shard>) -> ExplainSettings {
    ExplainSettings {
        model: ModelSource::new(fixture()),
        preprocess: PreprocessSettings::default(),
        input: input.to_owned(),
        methods: MethodSpec::parse_list(
            "saliency,integrated_gradients:steps=8,smoothgrad:samples=3,grad_cam",
        )
        .unwrap(),
        shared: MethodOptions::default(),
        target: "predicted".into(),
        limit: None,
        strict: true,
        outlier_perc: 2.0,
        out,
        force: false,
        shard,
    }
}

/// The report without timings (the only thing two runs may differ in).
fn untimed(mut r: ExplainReport) -> ExplainReport {
    for img in &mut r.images {
        for m in img.methods.values_mut() {
            m.seconds = 0.0;
        }
    }
    r
}

#[test]
fn three_shards_merged_equal_one_run() {
    let d = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        size: 64,
        train_per_class: 1,
        val_per_class: 2,
        test_per_class: 1,
        seed: 0,
    };
    let input = synth::generate(d.path(), Task::Pretrain, &cfg, false)
        .unwrap()
        .images(Split::Val);
    let whole = explain(&settings(&input, d.path().join("whole"), None), &mut quiet).unwrap();
    assert_eq!(whole.images.len(), 12);

    let shards: Vec<PathBuf> = (0..3)
        .map(|i| {
            let out = d.path().join(format!("shard{i}"));
            let part = explain(
                &settings(&input, out.clone(), Some(Shard { index: i, count: 3 })),
                &mut quiet,
            )
            .unwrap();
            assert!(part.images.len() < 12, "a shard holds part of the set");
            out
        })
        .collect();
    // In any order.
    let order = [shards[2].clone(), shards[0].clone(), shards[1].clone()];
    let merged = merge_explain(&order, &d.path().join("merged"), false, &mut quiet).unwrap();

    // Paths differ only in the output directory; per-image results are equal exactly.
    let whole_doc = untimed(whole);
    let mut merged_doc = untimed(merged);
    assert_eq!(merged_doc.images.len(), 12);
    merged_doc.shard = None;
    fn first_difference(
        a: &serde_json::Value,
        b: &serde_json::Value,
        at: String,
    ) -> Option<String> {
        use serde_json::Value::*;
        match (a, b) {
            (Object(x), Object(y)) => x.iter().find_map(|(k, v)| match y.get(k) {
                Some(w) => first_difference(v, w, format!("{at}.{k}")),
                None => Some(format!("{at}.{k} missing")),
            }),
            (Array(x), Array(y)) => x
                .iter()
                .zip(y)
                .enumerate()
                .find_map(|(i, (v, w))| first_difference(v, w, format!("{at}[{i}]"))),
            _ => (a != b).then(|| format!("{at}: {a} vs {b}")),
        }
    }
    let (a, b) = (
        serde_json::to_value(&merged_doc).unwrap(),
        serde_json::to_value(&whole_doc).unwrap(),
    );
    assert_eq!(first_difference(&a, &b, String::new()), None);
    assert_eq!(merged_doc, whole_doc);
    for img in &whole_doc.images {
        for m in img.methods.values() {
            let a = std::fs::read(d.path().join("whole").join(&m.npy)).unwrap();
            let b = std::fs::read(d.path().join("merged").join(&m.npy)).unwrap();
            assert_eq!(a, b, "{} differs", m.npy);
        }
    }

    // A missing, repeated or foreign shard is refused.
    let e = merge_explain(&shards[..2], &d.path().join("m2"), false, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard 2/3 is missing"), "{e}");
    let twice = [shards[0].clone(), shards[0].clone(), shards[1].clone()];
    let e = merge_explain(&twice, &d.path().join("m3"), false, &mut quiet)
        .unwrap_err()
        .to_string();
    assert!(e.contains("shard 0/3 is also"), "{e}");
    let e = merge_explain(
        &[d.path().join("whole")],
        &d.path().join("m4"),
        false,
        &mut quiet,
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("not a shard's output"), "{e}");
}
