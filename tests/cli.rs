//! End-to-end tests of the `finelens` binary: what a user types, what they see, the exit code.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{DType, Device, Tensor};
use finelens_models::{Arch, Head, ModelConfig, ParamStore};

fn finelens(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(args)
        .output()
        .expect("the binary runs")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A failed run: exit code 2, exactly one line on stderr starting with `error:` and naming
/// `needle` (the file or the cause), and no panic.
fn assert_one_line_error(o: &Output, needle: &str) {
    let err = stderr(o);
    assert_eq!(o.status.code(), Some(2), "stderr: {err}");
    assert!(!err.contains("panicked"), "{err}");
    // Warnings and progress lines (one per epoch or image, in CI logs) may come before it.
    let lines: Vec<&str> = err
        .lines()
        .filter(|l| {
            !["warning:", "explained ", "explain ", "epoch "]
                .iter()
                .any(|p| l.starts_with(p))
        })
        .collect();
    assert_eq!(lines.len(), 1, "expected one error line, got: {err}");
    assert!(
        lines[0].starts_with("error: ") && lines[0].contains(needle),
        "`{needle}` not in: {err}"
    );
}

/// The state dict a torchvision model saves with `safetensors.torch.save_file(model.state_dict())`:
/// every key torchvision has, f32 weights and running stats, i64 `num_batches_tracked`, no metadata.
fn write_torchvision_state_dict(path: &Path, arch: Arch, classes: usize) {
    let cfg = ModelConfig::new(arch, classes, Head::Linear).unwrap();
    let store = ParamStore::init(&cfg.param_specs(), 0, &Device::Cpu).unwrap();
    let tensors: Vec<(String, Tensor)> = store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect();
    let bytes = safetensors::serialize(tensors, None::<HashMap<String, String>>).unwrap();
    std::fs::write(path, bytes).unwrap();
}

fn write_tensors(path: &Path, tensors: Vec<(String, Tensor)>) {
    std::fs::write(
        path,
        safetensors::serialize(tensors, None::<HashMap<String, String>>).unwrap(),
    )
    .unwrap();
}

/// A resnet-mini state dict at `path` with tensor `name` replaced by `change(original)`.
fn write_mini_with(path: &Path, name: &str, change: impl Fn(&Tensor) -> Tensor) {
    let t = mini_tensors().into_iter().map(|(n, v)| {
        let v = if n == name { change(&v) } else { v };
        (n, v)
    });
    write_tensors(path, t.collect());
}

fn mini_tensors() -> Vec<(String, Tensor)> {
    let cfg = ModelConfig::new(Arch::ResNetMini, 3, Head::Linear).unwrap();
    let store = ParamStore::init(&cfg.param_specs(), 0, &Device::Cpu).unwrap();
    store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect()
}

#[test]
fn bare_torchvision_resnet18_loads_with_arch_and_no_conversion() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("resnet18.safetensors");
    write_torchvision_state_dict(&p, Arch::ResNet18, 1000);
    let o = finelens(&["inspect", "--arch", "resnet18", p.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("arch         resnet18 (head linear)"), "{out}");
    assert!(
        out.contains("parameters   11689512 in 122 tensors"),
        "{out}"
    );
    assert!(out.contains("classes      1000:"), "{out}");
    assert!(out.contains("metadata     none recorded"), "{out}");
    // WeightWatcher's reading of each of its 21 weight matrices (20 convolutions and fc).
    let o = finelens(&[
        "inspect",
        "--arch",
        "resnet18",
        "--spectral",
        p.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(
        out.contains("layer4.1.conv2.weight") && out.contains("512×512×3×3"),
        "{out}"
    );
    assert!(out.contains("21 matrices: "), "{out}");

    // Without --arch there is nothing to go on: say so, and list the choices.
    assert_one_line_error(
        &finelens(&["inspect", p.to_str().unwrap()]),
        "no finelens metadata and no --arch",
    );
    // The wrong architecture: name the missing and unexpected keys.
    let o = finelens(&["inspect", "--arch", "resnet34", p.to_str().unwrap()]);
    assert_one_line_error(
        &o,
        "does not match resnet34: 96 missing keys (layer1.2.conv1.weight",
    );
    let o = finelens(&["inspect", "--arch", "resnet50", p.to_str().unwrap()]);
    assert_one_line_error(&o, "resnet50");
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "vgg16", p.to_str().unwrap()]),
        "unknown architecture `vgg16`",
    );
}

#[test]
fn corrupt_missing_and_mismatched_checkpoints_fail_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let arg = |p: &PathBuf| p.to_str().unwrap().to_owned();

    let missing = d.path().join("nope.safetensors");
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&missing)]),
        "nope.safetensors: No such file",
    );

    let garbage = d.path().join("garbage.safetensors");
    std::fs::write(&garbage, b"this is not a safetensors file at all").unwrap();
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&garbage)]),
        "garbage.safetensors: not a valid safetensors file",
    );

    // Truncated: a good file cut in half.
    let truncated = d.path().join("truncated.safetensors");
    write_tensors(&truncated, mini_tensors());
    let bytes = std::fs::read(&truncated).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&truncated)]),
        "truncated.safetensors: not a valid safetensors file",
    );

    let wrong_keys = d.path().join("keys.safetensors");
    let mut t = mini_tensors();
    t.retain(|(n, _)| !n.starts_with("layer4.1"));
    write_tensors(&wrong_keys, t);
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&wrong_keys)]),
        "missing keys (layer4.1.conv1.weight",
    );

    let shape = d.path().join("shape.safetensors");
    write_mini_with(&shape, "layer1.0.conv1.weight", |_| {
        Tensor::zeros((16, 16, 5, 5), DType::F32, &Device::Cpu).unwrap()
    });
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&shape)]),
        "layer1.0.conv1.weight has shape [16, 16, 5, 5], resnet-mini expects [16, 16, 3, 3]",
    );

    let dtype = d.path().join("dtype.safetensors");
    write_mini_with(&dtype, "conv1.weight", |v| v.to_dtype(DType::I64).unwrap());
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&dtype)]),
        "conv1.weight has dtype i64, expected f32",
    );

    let nan = d.path().join("nan.safetensors");
    write_mini_with(&nan, "fc.bias", |_| {
        Tensor::new(&[f32::NAN, 0.0, 0.0], &Device::Cpu).unwrap()
    });
    assert_one_line_error(
        &finelens(&["inspect", "--arch", "resnet-mini", &arg(&nan)]),
        "fc.bias contains non-finite values",
    );
}

/// `finelens data synth` of one task into `out`, with [train, val, test] images per class.
fn synth(out: &Path, task: &str, [train, val, test]: [usize; 3]) {
    let (train, val, test) = (train.to_string(), val.to_string(), test.to_string());
    let o = finelens(&[
        "data",
        "synth",
        "--out",
        out.to_str().unwrap(),
        "--task",
        task,
        "--train-per-class",
        &train,
        "--val-per-class",
        &val,
        "--test-per-class",
        &test,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
}

/// A small ImageFolder under `root`: the synthetic pretraining task's test split (6 classes × 3).
fn small_folder(root: &Path) -> PathBuf {
    synth(root, "pretrain", [2, 1, 3]);
    root.join("pretrain/images/test")
}

#[test]
fn data_synth_is_deterministic() {
    let d = tempfile::tempdir().unwrap();
    let a = small_folder(&d.path().join("a"));
    let b = small_folder(&d.path().join("b"));
    let file = "star/00002.png";
    assert_eq!(
        std::fs::read(a.join(file)).unwrap(),
        std::fs::read(b.join(file)).unwrap()
    );
    assert!(d.path().join("a/pretrain/masks/test").join(file).is_file());
    assert_one_line_error(
        &finelens(&[
            "data",
            "synth",
            "--task",
            "nope",
            "--out",
            d.path().to_str().unwrap(),
        ]),
        "unknown task `nope`",
    );
}

#[test]
fn eval_reports_metrics_and_handles_bad_images_and_outputs() {
    let d = tempfile::tempdir().unwrap();
    let data = small_folder(d.path());
    // A fresh 6-class model with metadata, saved by `train` for one tiny epoch.
    let ck = d.path().join("m.safetensors");
    let o = finelens(&[
        "train",
        "--train",
        data.to_str().unwrap(),
        "--val-fraction",
        "0.34",
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--out",
        ck.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("epoch   1"), "{}", stderr(&o));

    let json = d.path().join("out/metrics.json");
    let o = finelens(&[
        "eval",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("on 18 examples"), "{}", stdout(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(m["count"], 18);
    assert_eq!(m["confusion"].as_array().unwrap().len(), 6);

    // A file with an image ending that isn't an image: skipped with a warning, or fatal with --strict.
    std::fs::write(data.join("circle/broken.png"), b"not a png").unwrap();
    let o = finelens(&[
        "eval",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: skipping") && stderr(&o).contains("broken.png"),
        "{}",
        stderr(&o)
    );
    let o = finelens(&[
        "eval",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--strict",
    ]);
    assert_one_line_error(&o, "broken.png: cannot decode image");
    std::fs::remove_file(data.join("circle/broken.png")).unwrap();

    // An empty class folder.
    std::fs::create_dir(data.join("zzz-empty")).unwrap();
    assert_one_line_error(
        &finelens(&[
            "eval",
            ck.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
        ]),
        "zzz-empty: class folder has no readable images",
    );
    std::fs::remove_dir(data.join("zzz-empty")).unwrap();

    // An output path that can't be written (its parent is a file): error, and nothing half-written.
    let blocker = d.path().join("blocker");
    std::fs::write(&blocker, "a file").unwrap();
    let o = finelens(&[
        "eval",
        ck.to_str().unwrap(),
        "--data",
        data.to_str().unwrap(),
        "--json",
        blocker.join("m.json").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "blocker");
    assert_eq!(std::fs::read_to_string(&blocker).unwrap(), "a file");

    // Training with an impossible learning rate or batch size never starts.
    let out = d.path().join("x.safetensors");
    for (flag, value, needle) in [
        ("--lr", "0", "learning rate 0 must be a positive number"),
        ("--batch-size", "0", "batch size must be at least 1"),
    ] {
        let o = finelens(&[
            "train",
            "--train",
            data.to_str().unwrap(),
            flag,
            value,
            "--out",
            out.to_str().unwrap(),
        ]);
        assert_one_line_error(&o, needle);
    }
    assert!(!d.path().join("x.safetensors").exists());
}

#[test]
fn a_closed_output_pipe_is_not_a_panic() {
    // `finelens inspect m.safetensors | head -1`: the reader goes away before the writer is done.
    let mut child = Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(["inspect", fixture().to_str().unwrap()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    drop(child.stdout.take());
    let out = child.wait_with_output().unwrap();
    assert!(
        !String::from_utf8_lossy(&out.stderr).contains("panicked"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn every_command_documents_its_options() {
    for cmd in [
        vec!["--help"],
        vec!["demo", "--help"],
        vec!["data", "synth", "--help"],
        vec!["inspect", "--help"],
        vec!["eval", "--help"],
        vec!["train", "--help"],
        vec!["finetune", "--help"],
        vec!["bench", "train", "--help"],
        vec!["explain", "--help"],
        vec!["bench", "explain", "--help"],
        vec!["drift", "--help"],
        vec!["audit", "--help"],
        vec!["evaluate", "--help"],
        vec!["merge", "--help"],
        vec!["bench", "drift", "--help"],
    ] {
        let o = finelens(&cmd);
        assert!(o.status.success(), "{cmd:?}");
        let text = stdout(&o);
        // Every option carries a description: after its name, or (long help) on the next line.
        let lines: Vec<&str> = text.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim_start();
            if !(t.starts_with("--") || (t.starts_with('-') && t.contains(", --"))) {
                continue;
            }
            let same_line = t
                .split_once("  ")
                .is_some_and(|(_, d)| !d.trim().is_empty() && !d.trim().starts_with("[default"));
            let next_line = lines.get(i + 1).is_some_and(|n| {
                let n = n.trim();
                !n.is_empty() && !n.starts_with('-') && !n.starts_with("[default")
            });
            assert!(
                same_line || next_line,
                "{cmd:?}: undocumented option: {line}"
            );
        }
    }
}

#[test]
fn demo_evaluates_the_shipped_fixture() {
    let d = tempfile::tempdir().unwrap();
    let text_model = text_model();
    let (data, out_dir) = (d.path().join("data"), d.path().join("out"));
    let mut args = vec![
        "demo",
        "--data",
        data.to_str().unwrap(),
        "--out",
        out_dir.to_str().unwrap(),
    ];
    if let Some(m) = &text_model {
        args.extend(["--text-model", m.to_str().unwrap()]);
    } else {
        // Never a download from a test.
        args.push("--no-text");
    }
    let o = finelens(&args);
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);

    // The text part: the clean task learned (≥ 90% on its test split), the shortcut model right
    // on validation and near chance on the title-free test split; both on the page.
    if text_model.is_some() {
        let acc = |task: &str, file: &str, key: &[&str]| -> f64 {
            let mut v = read_json(&out_dir.join(task).join(file));
            for k in key {
                v = v[*k].clone();
            }
            v.as_f64().unwrap()
        };
        let clean = acc("text-sentiment", "test-metrics.json", &["accuracy"]);
        assert!(clean >= 0.9, "text test accuracy {clean}");
        let val = acc("text-shortcut", "metrics.json", &["val", "accuracy"]);
        let test = acc("text-shortcut", "test-metrics.json", &["accuracy"]);
        assert!(
            val >= 0.95 && test <= 0.75,
            "shortcut: val {val}, test {test}"
        );
        assert!(out.contains("text-sentiment validation"), "{out}");
        let page = std::fs::read_to_string(out_dir.join("index.html")).unwrap();
        assert!(page.contains("all-MiniLM-L6-v2 on the synthetic sentiment tasks"));
        assert!(!out_dir.join("text-sentiment/last.safetensors").exists());
        // The shortcut model's integrated gradients pile on the film title it learned.
        let ex = read_json(&out_dir.join("text-shortcut-explain/explain.json"));
        let on_title = ex["texts"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| {
                let scores = t["methods"]["integrated_gradients"]["words"]
                    .as_array()
                    .unwrap();
                let best = (0..scores.len())
                    .max_by(|&a, &b| {
                        let v = |i: usize| scores[i].as_f64().unwrap().abs();
                        v(a).total_cmp(&v(b))
                    })
                    .unwrap();
                let word = t["words"][best]["text"].as_str().unwrap();
                ["Blackwater", "Moonrise"]
                    .iter()
                    .any(|title| word.contains(title))
            })
            .count();
        assert!(on_title >= 3, "top IG word a title in {on_title} of 4");
        // Drift from the MiniLM: the frozen embeddings did not move, in weights or [CLS].
        let dr = read_json(&out_dir.join("drift-text-sentiment/drift.json"));
        let emb = dr["weights"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == "embeddings")
            .unwrap()["relative_l2_change"]
            .as_f64()
            .unwrap();
        assert_eq!(emb, 0.0);
        let cka0 = dr["representation"]["diagonal"][0].as_f64().unwrap();
        assert!((cka0 - 1.0).abs() < 1e-6, "embeddings CKA {cka0}");
        assert!(page.contains("Drift of the text-sentiment model"));
        // The text audits with the default policy: the clean model passes, the shortcut model is
        // flagged, its top word a title in no rationale.
        let clean = read_json(&out_dir.join("audit-text-sentiment/report.json"));
        assert_eq!(clean["schema_version"], "finelens-text-audit/3");
        assert_eq!(clean["sanity"]["independent"].as_array().unwrap().len(), 9);
        assert_eq!(clean["pass"], true, "{}", clean["verdicts"]);
        // WeightWatcher's α per matrix, before and after, in the drift section: the frozen
        // layers' matrices did not move, so neither did their α.
        let query = clean["drift"]["weights"]["tensors"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == "bert.encoder.layer.0.attention.self.query.weight")
            .unwrap();
        let alpha = |side: &str| query[side]["alpha"].as_f64().unwrap();
        assert_eq!(alpha("spectrum_before"), alpha("spectrum_after"));
        let page = std::fs::read_to_string(out_dir.join("audit-text-sentiment/index.html"));
        assert!(page.unwrap().contains("α, this model"));
        let sc = read_json(&out_dir.join("audit-text-shortcut/report.json"));
        assert_eq!(sc["pass"], false);
        assert!(sc["shortcut"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["flagged"] == true
                && ["blackwater", "moonrise"].contains(&c["top_word"].as_str().unwrap())));
    } else {
        assert!(out.contains("text part skipped: --no-text"), "{out}");
    }
    assert!(out.contains("pretrained fixture"), "{out}");
    let m: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("out/pretrain-test-metrics.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(m["count"], 300);
    // The fixture learned the pretraining task: far above the 1/6 of chance.
    let acc = m["accuracy"].as_f64().unwrap();
    assert!(acc > 0.85, "fixture accuracy {acc}");

    // Fine-tuning the fixture on the new classes reaches at least 90% validation accuracy.
    let ft: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(d.path().join("out/finetune/metrics.json")).unwrap(),
    )
    .unwrap();
    let val = ft["val"]["accuracy"].as_f64().unwrap();
    assert!(val >= 0.90, "fine-tuned validation accuracy {val}");
    assert_eq!(ft["val"]["count"], 200);
    let child =
        finelens_models::checkpoint::load(&d.path().join("out/finetune/model.safetensors"), None)
            .unwrap();
    let parent = finelens_models::checkpoint::load(&fixture(), None).unwrap();
    assert_eq!(child.meta.parent_sha256, Some(parent.sha256));
    assert!(out.contains("best epoch"), "{out}");

    // The fine-tuned model's explanations: two test images per class, six methods, and the
    // model gets most of them right; DeepLIFT sums to F(x) − F(x′) as IG nearly does.
    let ex = read_json(&d.path().join("out/explain/explain.json"));
    let images = ex["images"].as_array().unwrap();
    assert_eq!(images.len(), 8);
    let right = images
        .iter()
        .filter(|i| i["label"] == i["predicted_class"])
        .count();
    assert!(right >= 6, "{right} of 8 test images predicted right");
    for m in [
        "saliency",
        "smoothgrad",
        "integrated_gradients",
        "deeplift",
        "grad_cam",
        "occlusion",
    ] {
        assert!(images[0]["methods"][m]["npy"].is_string(), "{m}");
    }
    for image in images {
        let rel = image["methods"]["deeplift"]["completeness"]["relative_delta"]
            .as_f64()
            .unwrap();
        assert!(rel < 1e-3, "DeepLIFT summation-to-delta off by {rel}");
    }

    // Drift from the fixture: a new head, the body moved, deeper representations moved more.
    let dr = read_json(&d.path().join("out/drift/drift.json"));
    let reshaped: Vec<&str> = dr["weights"]["reshaped"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r[0].as_str().unwrap())
        .collect();
    assert_eq!(reshaped, vec!["fc.weight", "fc.bias"]);
    let diag: Vec<f64> = dr["representation"]["diagonal"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_f64().unwrap())
        .collect();
    assert!(
        diag[0] > diag[4],
        "layer1 keeps more than avgpool: {diag:?}"
    );
    assert_eq!(dr["explanation"]["target"], "embedding_norm");

    // The same recipe on the shortcut task: the clean model passes the audit, the shortcut model
    // is flagged by the shortcut and localisation checks, with its hotspot on the planted patch.
    let clean = read_json(&d.path().join("out/audit-finetune/report.json"));
    let page = std::fs::read_to_string(d.path().join("out/audit-finetune/index.html")).unwrap();
    assert!(page.contains("α, this model") && page.contains("layer4.1.conv2.weight"));
    // ROAD (imputed removal): the clean model's IG map ranks its evidence far better than its
    // reverse.
    let road = &clean["audit"]["methods"][0]["road"];
    assert_eq!(
        road["images"],
        finelens_pipeline::demo::AUDIT_IMAGES,
        "{road}"
    );
    assert!(road["gap"].as_f64().unwrap() > 0.2, "{road}");
    let p = &clean["audit"]["methods"][0]["perturbation"];
    assert!(p["faithfulness_correlation"].as_f64().unwrap() > 0.3, "{p}");
    assert!(clean["audit"]["methods"][1]["perturbation"].is_null());
    // The random logit test on the randomisation check's images: Grad-CAM (the third method)
    // is class-discriminative, its maps for another class look nothing like the prediction's.
    let rl = &clean["audit"]["methods"][2]["random_logit"];
    assert!(rl["ssim"].as_f64().unwrap() < 0.5, "{rl}");
    // Robustness on the same 4 images: IG's map moves, but by less than its own size.
    let rb = &clean["audit"]["methods"][0]["robustness"];
    assert_eq!(rb["images"], 4, "{rb}");
    let s = rb["max_sensitivity"].as_f64().unwrap();
    assert!(s > 0.0 && s < 1.0, "{rb}");
    assert_eq!(clean["pass"], true, "{}", clean["verdicts"]);
    let sc = read_json(&d.path().join("out/audit-shortcut/report.json"));
    assert_eq!(sc["pass"], false);

    // Every document the demo wrote reads back through its typed struct, and writing that
    // struct again gives the same JSON.
    fn round_trip<T: finelens_pipeline::Versioned>(path: &Path) {
        let doc: T = finelens_pipeline::read_json(path).unwrap();
        // Through text, as the file was written: `to_value` would widen f32 figures to f64.
        let again: serde_json::Value =
            serde_json::from_str(&serde_json::to_string(&doc).unwrap()).unwrap();
        assert_eq!(again, read_json(path), "{}", path.display());
    }
    round_trip::<finelens_pipeline::explain::ExplainReport>(
        &d.path().join("out/explain/explain.json"),
    );
    round_trip::<finelens_pipeline::drift::DriftReport>(&d.path().join("out/drift/drift.json"));
    for name in ["audit-finetune", "audit-shortcut"] {
        round_trip::<finelens_pipeline::audit::AuditDocument>(
            &d.path().join("out").join(name).join("report.json"),
        );
    }
    let failed: Vec<String> = sc["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["pass"] == false)
        .map(|v| {
            format!(
                "{}.{}",
                v["check"].as_str().unwrap(),
                v["key"].as_str().unwrap()
            )
        })
        .collect();
    for k in [
        "shortcut.max_mass_outside_mask",
        "shortcut.max_hotspot_concentration",
    ] {
        assert!(failed.contains(&k.to_string()), "{k} not in {failed:?}");
    }
    // The planted patch: side 8 at offset 2 in a 64-pixel image.
    for c in sc["audit"]["shortcut"].as_array().unwrap() {
        let b: Vec<u64> = c["hotspot_box"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap())
            .collect();
        assert!(
            b[2] < 12 && b[3] < 12,
            "{}: hotspot {b:?} is not the patch",
            c["class"]
        );
    }
    assert!(out.contains("shortcut  FLAGGED"), "{out}");

    // Drift from the base, explanations included (different heads: the embedding norm).
    assert_eq!(sc["drift"]["explanation"]["target"], "embedding_norm");
    assert_eq!(
        sc["drift"]["explanation"]["spearman"]
            .as_array()
            .unwrap()
            .len(),
        8
    );

    // The page's figures are also files beside each report.
    for f in [
        "training-curves.png",
        "relative-change-per-layer.png",
        "CKA-between-the-base-s-and-the-audited-model-s-layers.png",
    ] {
        image::open(d.path().join("out/audit-shortcut").join(f)).unwrap();
    }
    let gallery = d.path().join("out/audit-shortcut/gallery");
    let first = std::fs::read_dir(&gallery)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    // input, mask, then a heat map and an overlay for each of the three methods.
    assert_eq!(
        std::fs::read_dir(&first).unwrap().count(),
        8,
        "{}",
        first.display()
    );

    // One self-contained page for both models.
    let html = std::fs::read_to_string(d.path().join("out/index.html")).unwrap();
    assert!(html.contains("finetune: all checks pass") && html.contains("shortcut: FLAGGED"));
    assert!(html.contains("data:image/png;base64,"));
    for needle in ["http://", "https://", "src=\"/"] {
        assert!(!html.contains(needle), "{needle}");
    }
}

fn fixture() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/resnet-mini-pretrain.safetensors")
}

#[test]
fn finetune_head_only_keeps_the_body_bit_identical_and_records_the_parent() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "finetune", [4, 2, 1]);
    let images = d.path().join("finetune/images");
    let out = d.path().join("run");
    let o = finelens(&[
        "finetune",
        fixture().to_str().unwrap(),
        "--train",
        images.join("train").to_str().unwrap(),
        "--val",
        images.join("val").to_str().unwrap(),
        "--head",
        "mlp:16",
        "--freeze",
        "head-only",
        "--epochs",
        "2",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("best epoch"), "{}", stdout(&o));

    let parent = finelens_models::checkpoint::load(&fixture(), None).unwrap();
    let child = finelens_models::checkpoint::load(&out.join("model.safetensors"), None).unwrap();
    assert_eq!(
        child.meta.parent_sha256.as_deref(),
        Some(parent.sha256.as_str())
    );
    assert_eq!(
        child.meta.class_names,
        vec!["arrow", "crescent", "diamond", "heart"]
    );
    assert_eq!(child.meta.head, Head::Mlp { hidden: 16 });
    let mut compared = 0;
    for (name, t, _) in child.store.iter() {
        if name.starts_with("fc.") {
            continue;
        }
        let p = parent.store.tensor(name).unwrap();
        let bytes = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(bytes(&t), bytes(&p), "{name} moved although frozen");
        compared += 1;
    }
    assert_eq!(compared, 120, "every body tensor compared");
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("metrics.json")).unwrap()).unwrap();
    assert_eq!(m["history"].as_array().unwrap().len(), 2);
    assert_eq!(m["parent_sha256"], parent.sha256.as_str());
    let curves = image::open(out.join("curves.png")).unwrap();
    assert_eq!((curves.width(), curves.height()), (960, 360));

    // Freezing everything is an error before any work; a glob that freezes nothing is a warning.
    let args = |freeze: &str, dir: &str| {
        finelens(&[
            "finetune",
            fixture().to_str().unwrap(),
            "--train",
            images.join("train").to_str().unwrap(),
            "--freeze",
            freeze,
            "--epochs",
            "1",
            "--batch-size",
            "8",
            "--out",
            d.path().join(dir).to_str().unwrap(),
        ])
    };
    assert_one_line_error(&args("*", "all"), "freezes every parameter");
    assert!(!d.path().join("all/model.safetensors").exists());
    let o = args("no.such.layer*", "none");
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("warning: the freeze policy no.such.layer* matches no parameter"),
        "{}",
        stderr(&o)
    );
    assert_one_line_error(&args("last:x", "bad"), "last:N needs a whole number");

    // An output directory that can't be created (its parent is a file) fails before any work.
    std::fs::write(d.path().join("file"), "x").unwrap();
    assert_one_line_error(
        &args("none", "file/run"),
        "file/run: cannot create output directory",
    );
}

#[test]
fn finetune_keep_head_lp_ft_and_divergence() {
    let d = tempfile::tempdir().unwrap();
    for task in ["finetune", "pretrain"] {
        synth(d.path(), task, [3, 1, 1]);
    }
    let run = |task: &str, extra: &[&str], out: &str| {
        let train = d.path().join(task).join("images/train");
        let val = d.path().join(task).join("images/val");
        let out = d.path().join(out);
        let mut args = vec![
            "finetune",
            fixture().to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
            "--batch-size",
            "6",
            "--out",
            out.to_str().unwrap(),
        ]
        .into_iter()
        .map(String::from)
        .collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        finelens(&args.iter().map(|s| s.as_str()).collect::<Vec<_>>())
    };

    // Keeping the head needs the checkpoint's classes.
    let o = run("finetune", &["--head", "keep", "--epochs", "1"], "keep-bad");
    assert_one_line_error(
        &o,
        "the data has 4 classes [arrow, crescent, diamond, heart] but the checkpoint's head has 6",
    );
    let o = run(
        "pretrain",
        &["--head", "keep", "--epochs", "1", "--lr", "0.0001"],
        "keep",
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let child =
        finelens_models::checkpoint::load(&d.path().join("keep/model.safetensors"), None).unwrap();
    assert_eq!(child.meta.num_classes, 6);

    // LP-FT: a head-only phase, then the fine-tune, numbered as one run.
    let o = run("finetune", &["--lp-epochs", "1", "--epochs", "2"], "lpft");
    assert!(o.status.success(), "{}", stderr(&o));
    let out = stdout(&o);
    assert!(out.contains("linear probe: resnet-mini"), "{out}");
    assert!(
        out.contains("60 of 62 parameter tensors frozen") && out.contains("fine-tune: resnet-mini"),
        "{out}"
    );
    assert!(stderr(&o).contains("epoch   2"), "{}", stderr(&o));
    let m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.path().join("lpft/metrics.json")).unwrap())
            .unwrap();
    assert_eq!(m["history"].as_array().unwrap().len(), 2);
    assert_one_line_error(
        &run(
            "finetune",
            &["--lp-epochs", "2", "--epochs", "2"],
            "lpft-bad",
        ),
        "--lp-epochs 2 must be fewer than --epochs 2",
    );

    // A learning rate that blows the weights up stops with a clear message, not a NaN checkpoint.
    let o = run(
        "finetune",
        &[
            "--optimizer",
            "sgd",
            "--momentum",
            "0",
            "--lr",
            "1e30",
            "--epochs",
            "1",
        ],
        "diverged",
    );
    assert_one_line_error(&o, "loss became");
    assert!(!d.path().join("diverged/model.safetensors").exists());
}

#[test]
fn resume_after_a_kill_mid_epoch_gives_the_uninterrupted_weights() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "finetune", [40, 4, 1]);
    let args = |out: &Path| -> Vec<String> {
        let images = d.path().join("finetune/images");
        [
            "finetune",
            fixture().to_str().unwrap(),
            "--train",
            images.join("train").to_str().unwrap(),
            "--val",
            images.join("val").to_str().unwrap(),
            "--lp-epochs",
            "1",
            "--epochs",
            "3",
            "--optimizer",
            "sgd",
            "--lr",
            "0.01",
            "--batch-size",
            "8",
            "--out",
            out.to_str().unwrap(),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    };
    let whole = d.path().join("whole");
    let o = Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(args(&whole))
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // Start the same run and kill it as soon as epoch 3 has begun: the linear probe and one
    // fine-tuning epoch are done, so resuming must restore the optimiser's momentum mid-phase.
    let cut = d.path().join("cut");
    let mut child = Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(args(&cut))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let mut killed_after = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line.starts_with("epoch   2") {
            child.kill().unwrap();
            killed_after = Some(line);
            break;
        }
    }
    child.wait().unwrap();
    assert!(
        killed_after.is_some(),
        "the run ended before it could be interrupted"
    );
    let state: serde_json::Value = {
        let (_, header) =
            finelens_models::checkpoint::load_state(&cut.join("last.safetensors")).unwrap();
        serde_json::from_str(&header["finelens-resume"]).unwrap()
    };
    assert!(
        state["history"].as_array().unwrap().len() < 3,
        "the kill came too late to test resuming"
    );

    let mut resumed = args(&cut);
    resumed.push("--resume".into());
    let o = Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(&resumed)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", stderr(&o));

    // The final state — weights, batch-norm statistics, optimiser moments — is bit-identical.
    let (a, _) = finelens_models::checkpoint::load_state(&whole.join("last.safetensors")).unwrap();
    let (b, _) = finelens_models::checkpoint::load_state(&cut.join("last.safetensors")).unwrap();
    assert_eq!(a.keys().collect::<Vec<_>>(), b.keys().collect::<Vec<_>>());
    assert!(
        a.keys().any(|k| k.ends_with(".first")),
        "no optimiser moments saved"
    );
    for (n, x) in &a {
        let v = |t: &Tensor| {
            t.to_dtype(DType::F64)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap()
        };
        assert_eq!(v(x), v(&b[n]), "{n} differs after resuming");
    }
    let m = |dir: &Path| -> serde_json::Value {
        serde_json::from_str(&std::fs::read_to_string(dir.join("metrics.json")).unwrap()).unwrap()
    };
    assert_eq!(m(&whole)["history"].as_array().unwrap().len(), 3);
    assert_eq!(m(&whole)["val"], m(&cut)["val"]);

    // Resuming with other settings is refused.
    let mut other = args(&cut);
    other.extend([
        "--resume".to_string(),
        "--seed".to_string(),
        "7".to_string(),
    ]);
    let o = Command::new(env!("CARGO_BIN_EXE_finelens"))
        .args(&other)
        .output()
        .unwrap();
    assert_one_line_error(
        &o,
        "cannot resume: it was written by a run with other settings",
    );
}

fn read_json(path: &Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The float32 values of a `.npy` file.
fn npy_values(path: &Path) -> Vec<f32> {
    let b = std::fs::read(path).unwrap();
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    b[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

/// The shape in a `.npy` header, and the payload length in floats.
fn npy_shape(path: &Path) -> (String, usize) {
    let b = std::fs::read(path).unwrap();
    assert_eq!(&b[..8], b"\x93NUMPY\x01\x00", "{}", path.display());
    let hlen = u16::from_le_bytes([b[8], b[9]]) as usize;
    let header = String::from_utf8_lossy(&b[10..10 + hlen]).into_owned();
    assert!(header.contains("'descr': '<f4'"), "{header}");
    let shape = header
        .split("'shape': ")
        .nth(1)
        .unwrap()
        .split(')')
        .next()
        .unwrap();
    (format!("{shape})"), (b.len() - 10 - hlen) / 4)
}

#[test]
fn explain_writes_arrays_heat_maps_overlays_and_json() {
    let d = tempfile::tempdir().unwrap();
    let folder = small_folder(d.path());
    let out = d.path().join("explain");
    let run = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "explain",
            fixture().to_str().unwrap().to_owned().leak(),
            folder.to_str().unwrap().to_owned().leak(),
            "--out",
            out.to_str().unwrap().to_owned().leak(),
        ];
        args.extend_from_slice(extra);
        finelens(&args)
    };
    let started = std::time::Instant::now();
    let o = run(
        &out,
        &[
            "--methods",
            "all",
            "--limit",
            "6",
            "--steps",
            "16",
            "--samples",
            "4",
        ],
    );
    let wall = started.elapsed().as_secs_f64();
    assert!(o.status.success(), "{}", stderr(&o));
    let mut timed = 0.0;
    let j = read_json(&out.join("explain.json"));
    let images = j["images"].as_array().unwrap();
    assert_eq!(images.len(), 6);
    let methods = [
        "gradient",
        "saliency",
        "gradient_x_input",
        "smoothgrad",
        "smoothgrad_sq",
        "vargrad",
        "integrated_gradients",
        "grad_cam",
        "occlusion",
    ];
    let mut labels = std::collections::BTreeSet::new();
    for img in images {
        labels.insert(img["label"].as_str().unwrap().to_owned());
        assert_eq!(img["top5"].as_array().unwrap().len(), 5);
        assert_eq!(
            img["target"], img["predicted"],
            "the default target is the prediction"
        );
        let p = img["target_probability"].as_f64().unwrap();
        assert!(p > 0.0 && p <= 1.0);
        for m in methods {
            let e = &img["methods"][m];
            let (shape, n) = npy_shape(&out.join(e["npy"].as_str().unwrap()));
            let want = if m == "grad_cam" {
                "(1, 64, 64)"
            } else {
                "(3, 64, 64)"
            };
            assert_eq!(shape, want, "{m}");
            assert_eq!(
                n,
                if m == "grad_cam" {
                    64 * 64
                } else {
                    3 * 64 * 64
                }
            );
            for key in ["heatmap", "overlay"] {
                let png = image::open(out.join(e[key].as_str().unwrap())).unwrap();
                assert_eq!((png.width(), png.height()), (256, 256), "{m} {key}");
            }
            let seconds = e["seconds"].as_f64().unwrap();
            assert!(seconds > 0.0, "{m} took no time");
            timed += seconds;
        }
        // The recorded sum is the sum of the array written.
        let c = &img["methods"]["integrated_gradients"]["completeness"];
        let ig = npy_values(
            &out.join(
                img["methods"]["integrated_gradients"]["npy"]
                    .as_str()
                    .unwrap(),
            ),
        );
        let npy_sum: f64 = ig.iter().map(|v| *v as f64).sum();
        let sum = c["attribution_sum"].as_f64().unwrap();
        assert!(
            (npy_sum - sum).abs() <= 1e-4 * sum.abs().max(1.0),
            "{npy_sum} vs {sum}"
        );
        assert!(img["methods"]["saliency"]["completeness"].is_null());
    }
    assert_eq!(labels.len(), 6, "--limit takes every class in turn");
    // The per-method times are parts of the run, not more than it.
    assert!(timed < wall, "methods timed {timed} s in a {wall} s run");

    // Completeness (Sundararajan et al. 2017): with enough steps, the array written sums to
    // F(x) − F(x′), the recorded output difference — an oracle independent of the recorded delta.
    let fine = d.path().join("fine");
    let o = run(
        &fine,
        &[
            "--methods",
            "integrated_gradients",
            "--limit",
            "1",
            "--steps",
            "512",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let img =
        &read_json(&fine.join("explain.json"))["images"][0]["methods"]["integrated_gradients"];
    let sum: f64 = npy_values(&fine.join(img["npy"].as_str().unwrap()))
        .iter()
        .map(|v| *v as f64)
        .sum();
    let diff = img["completeness"]["output_difference"].as_f64().unwrap();
    assert!(
        (sum - diff).abs() <= 0.01 * diff.abs(),
        "Σ IG {sum} vs F(x) − F(x′) {diff}"
    );

    // Seeded: a second run writes the same SmoothGrad and IG arrays, byte for byte.
    let again = d.path().join("again");
    let o = run(
        &again,
        &[
            "--methods",
            "smoothgrad,ig",
            "--limit",
            "2",
            "--steps",
            "16",
            "--samples",
            "4",
        ],
    );
    assert!(o.status.success(), "{}", stderr(&o));
    let first = images[0]["id"].as_str().unwrap();
    for f in ["smoothgrad.npy", "integrated_gradients.npy"] {
        assert_eq!(
            std::fs::read(out.join(first).join(f)).unwrap(),
            std::fs::read(again.join(first).join(f)).unwrap(),
            "{f}"
        );
    }

    // One image file, a named target class, another baseline and rule.
    let one = folder.join("star/00000.png");
    let single = d.path().join("single");
    let o = finelens(&[
        "explain",
        fixture().to_str().unwrap(),
        one.to_str().unwrap(),
        "--out",
        single.to_str().unwrap(),
        "--target",
        "ring",
        "--methods",
        "ig",
        "--baseline",
        "black,blur,noise:2",
        "--rule",
        "riemann_trapezoid",
        "--steps",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let j = read_json(&single.join("explain.json"));
    assert_eq!(j["images"][0]["target_class"], "ring");
    assert_eq!(j["images"][0]["id"], "00000");
}

#[test]
fn explain_rejects_bad_settings_and_bad_images_with_one_line() {
    let d = tempfile::tempdir().unwrap();
    let folder = small_folder(d.path());
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let input = folder.to_str().unwrap();
    let out = d.path().join("out");
    let out = out.to_str().unwrap();
    let explain = |extra: &[&str]| {
        let mut args = vec!["explain", fx, input, "--out", out, "--limit", "1"];
        args.extend_from_slice(extra);
        finelens(&args)
    };
    assert_one_line_error(
        &explain(&["--target", "9"]),
        "target class 9 is out of range; valid classes: 0=circle, 1=cross",
    );
    assert_one_line_error(
        &explain(&["--target", "hexagon"]),
        "unknown target class `hexagon`",
    );
    assert_one_line_error(
        &explain(&["--methods", "grad_cam", "--layer", "layer7"]),
        "unknown layer `layer7`; layers are: conv1, bn1",
    );
    assert_one_line_error(
        &explain(&["--methods", "ig", "--steps", "0"]),
        "steps must be at least 1",
    );
    assert_one_line_error(
        &explain(&["--methods", "smoothgrad", "--noise=-1"]),
        "noise must be",
    );
    assert_one_line_error(
        &explain(&["--methods", "anchors"]),
        "unknown method `anchors`",
    );
    assert_one_line_error(
        &explain(&["--methods", "ig", "--baseline", "grey"]),
        "unknown baseline `grey`",
    );
    assert_one_line_error(
        &explain(&["--methods", "ig", "--rule", "simpson"]),
        "unknown quadrature rule",
    );

    // A folder with a good image and one whose header is fine but whose pixels are cut off.
    let flat = d.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    std::fs::copy(folder.join("circle/00000.png"), flat.join("a.png")).unwrap();
    let bytes = std::fs::read(folder.join("cross/00000.png")).unwrap();
    std::fs::write(flat.join("b.png"), &bytes[..bytes.len() / 2]).unwrap();
    let flat_out = d.path().join("flat_out");
    let args = |strict: bool| {
        let mut v = vec![
            "explain".to_owned(),
            fx.to_owned(),
            flat.to_str().unwrap().to_owned(),
            "--out".to_owned(),
            flat_out.to_str().unwrap().to_owned(),
            "--methods".to_owned(),
            "saliency".to_owned(),
        ];
        if strict {
            v.push("--strict".to_owned());
        }
        v
    };
    let o = finelens(&args(false).iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("warning: skipping") && stderr(&o).contains("b.png"));
    let j = read_json(&flat_out.join("explain.json"));
    assert_eq!(j["images"].as_array().unwrap().len(), 1);
    assert!(j["skipped"][0]["path"].as_str().unwrap().ends_with("b.png"));
    std::fs::remove_dir_all(&flat_out).unwrap();
    let o = finelens(&args(true).iter().map(String::as_str).collect::<Vec<_>>());
    assert_one_line_error(&o, "b.png");
    // Nothing appears at --out; what was written before the failure is kept, complete and
    // valid, as <out>.partial, and the error says so.
    assert!(!flat_out.exists());
    let kept = PathBuf::from(format!("{}.partial", flat_out.display()));
    assert!(stderr(&o).contains(&format!("outputs so far are in {}", kept.display())));
    let j = read_json(&kept.join("explain.json"));
    assert_eq!(j["images"].as_array().unwrap().len(), 1);
    assert_eq!(j["schema_version"], "finelens-explain/1");
    npy_shape(&kept.join("a/saliency.npy"));

    // Weights so large that the forward overflows: the attribution is not finite.
    let huge = d.path().join("huge.safetensors");
    write_tensors(
        &huge,
        mini_tensors()
            .into_iter()
            .map(|(n, t)| {
                let t = if n == "conv1.weight" || n == "fc.weight" {
                    (t * 1e30).unwrap()
                } else {
                    t
                };
                (n, t)
            })
            .collect(),
    );
    let o = finelens(&[
        "explain",
        huge.to_str().unwrap(),
        "--arch",
        "resnet-mini",
        "--input-size",
        "64",
        folder.join("star/00000.png").to_str().unwrap(),
        "--out",
        d.path().join("huge_out").to_str().unwrap(),
        "--methods",
        "gradient",
    ]);
    assert_one_line_error(&o, "00000.png: gradient produced a non-finite attribution");
}

/// The fixture with `name` multiplied by `factor`, saved (with its metadata) at `path`.
fn fixture_scaled(path: &Path, name: &str, factor: f64) {
    let ck = finelens_models::checkpoint::load(&fixture(), None).unwrap();
    let v = ck.store.var(name).unwrap();
    v.set(&(v.as_tensor() * factor).unwrap()).unwrap();
    finelens_models::checkpoint::save(path, &ck.store, &ck.meta).unwrap();
}

#[test]
fn drift_is_zero_for_a_copy_and_finds_a_known_perturbation() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture();
    let run = |after: &Path, out: &Path| {
        finelens(&[
            "drift",
            fx.to_str().unwrap(),
            after.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--limit",
            "40",
            "--batch-size",
            "20",
            "--explain-images",
            "2",
            "--explain-method",
            "saliency",
            "--spectral",
            "esd",
        ])
    };
    // A copy: nothing moved, every layer's representation is its own (CKA 1), same explanations.
    let copy = d.path().join("copy.safetensors");
    std::fs::copy(&fx, &copy).unwrap();
    let o = run(&copy, &d.path().join("same"));
    assert!(o.status.success(), "{}", stderr(&o));
    let j = read_json(&d.path().join("same/drift.json"));
    assert_eq!(j["before"]["sha256"], j["after"]["sha256"]);
    for t in j["weights"]["tensors"].as_array().unwrap() {
        assert_eq!(t["relative_l2_change"], 0.0, "{}", t["name"]);
        assert_eq!(t["max_abs_change"], 0.0);
        // WeightWatcher's figures of every matrix, the same on both sides of a copy.
        if t["shape"].as_array().unwrap().len() == 4 {
            assert!(t["spectrum_before"]["alpha"].as_f64().unwrap() > 1.0, "{t}");
            assert_eq!(t["spectrum_before"], t["spectrum_after"]);
        }
    }
    assert!(
        stdout(&o).contains("WeightWatcher α per matrix"),
        "{}",
        stdout(&o)
    );
    for c in j["representation"]["diagonal"].as_array().unwrap() {
        assert!((c.as_f64().unwrap() - 1.0).abs() < 1e-9, "{c}");
    }
    assert!((j["explanation"]["mean_spearman"].as_f64().unwrap() - 1.0).abs() < 1e-9);
    assert_eq!(j["explanation"]["target"], "class_logit");

    // One kernel scaled by 1.5: that tensor moved by exactly 0.5, nothing else did, and the
    // representations before it are untouched.
    let moved = d.path().join("moved.safetensors");
    fixture_scaled(&moved, "layer4.0.conv2.weight", 1.5);
    let o = run(&moved, &d.path().join("moved"));
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("layer4.0.conv2"), "{}", stdout(&o));
    let j = read_json(&d.path().join("moved/drift.json"));
    for t in j["weights"]["tensors"].as_array().unwrap() {
        let r = t["relative_l2_change"].as_f64().unwrap();
        if t["name"] == "layer4.0.conv2.weight" {
            assert!((r - 0.5).abs() < 1e-6, "{r}");
            let (s0, s1) = (
                t["spectral_norm_before"].as_f64().unwrap(),
                t["spectral_norm_after"].as_f64().unwrap(),
            );
            assert!((s1 / s0 - 1.5).abs() < 1e-4);
        } else {
            assert_eq!(r, 0.0, "{}", t["name"]);
        }
    }
    let stages = j["weights"]["stages"].as_array().unwrap();
    let layer4 = stages.iter().find(|s| s["name"] == "layer4").unwrap();
    assert!(layer4["relative_l2_change"].as_f64().unwrap() > 0.0);
    let layers: Vec<&str> = j["representation"]["layers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap())
        .collect();
    let diag = j["representation"]["diagonal"].as_array().unwrap();
    for (l, c) in layers.iter().zip(diag) {
        let c = c.as_f64().unwrap();
        if ["layer1", "layer2", "layer3"].contains(l) {
            assert!((c - 1.0).abs() < 1e-9, "{l}: {c}");
        } else {
            assert!(c < 1.0 - 1e-6, "{l}: {c}");
        }
    }
    for f in ["layers.png", "cka.png"] {
        image::open(d.path().join("moved").join(f)).unwrap();
    }
}

#[test]
fn drift_rejects_other_architectures_nan_weights_and_an_empty_probe() {
    let d = tempfile::tempdir().unwrap();
    let fx = fixture();
    let fx = fx.to_str().unwrap();
    let out = d.path().join("out");
    let out = out.to_str().unwrap();
    let r18 = d.path().join("resnet18.safetensors");
    write_torchvision_state_dict(&r18, Arch::ResNet18, 10);
    assert_one_line_error(
        &finelens(&["drift", fx, r18.to_str().unwrap(), "--out", out]),
        "different architectures: tensor",
    );
    let nan = d.path().join("nan.safetensors");
    write_mini_with(&nan, "layer2.1.conv1.weight", |t| {
        let mut v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v[3] = f32::NAN;
        Tensor::from_vec(v, t.shape(), &Device::Cpu).unwrap()
    });
    assert_one_line_error(
        &finelens(&["drift", fx, nan.to_str().unwrap(), "--out", out]),
        "nan.safetensors: tensor layer2.1.conv1.weight contains NaN",
    );
    let empty = d.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    assert_one_line_error(
        &finelens(&[
            "drift",
            fx,
            fx,
            "--out",
            out,
            "--probe",
            empty.to_str().unwrap(),
        ]),
        "empty: no readable images",
    );
}

#[test]
fn audit_exit_status_gates_and_bad_input() {
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "pretrain", [1, 2, 1]);
    let data = d.path().join("pretrain/images/val");
    let fx = fixture();
    let audit = |out: &Path, extra: &[&str]| {
        let mut args = vec![
            "audit".to_owned(),
            fx.to_str().unwrap().to_owned(),
            "--data".to_owned(),
            data.to_str().unwrap().to_owned(),
            "--out".to_owned(),
            out.to_str().unwrap().to_owned(),
            "--methods".to_owned(),
            "saliency".to_owned(),
            "--limit".to_owned(),
            "6".to_owned(),
            "--sanity-images".to_owned(),
            "2".to_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        finelens(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let policy = |name: &str, text: &str| {
        let p = d.path().join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    // An impossible threshold fails the gate: exit 1, and the report says which check.
    let strict = policy(
        "strict.toml",
        "[localisation]\nmin_pointing_game = 1.5\n[complexity]\nmin_sparseness = 0.999\n",
    );
    let out = d.path().join("strict");
    let o = audit(&out, &["--policy", strict.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stdout(&o).contains("min_pointing_game") && stdout(&o).contains("FAIL"));
    let j = read_json(&out.join("report.json"));
    assert_eq!(j["pass"], false);
    assert_eq!(j["audit"]["methods"][0]["localisation"]["images"], 6);
    // Quantus's complexity figures, per method, gated like any other: a saliency map is not
    // one pixel's (sparseness < 0.999 fails the strict policy) nor spread evenly.
    let c = &j["audit"]["methods"][0]["complexity"];
    assert_eq!(c["maps"], 6);
    let sparseness = c["mean_sparseness"].as_f64().unwrap();
    assert!(sparseness > 0.0 && sparseness < 0.999, "{c}");
    assert!(stdout(&o).contains("min_sparseness"), "{}", stdout(&o));
    let failed: Vec<&str> = j["verdicts"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["pass"] == false)
        .map(|v| v["key"].as_str().unwrap())
        .collect();
    assert!(
        failed.contains(&"min_pointing_game") && failed.contains(&"min_sparseness"),
        "{failed:?}"
    );
    // `evaluate`: the same run, every metric for every method, one row each, and no gate.
    let out_e = d.path().join("evaluate");
    let args = format!(
        "evaluate {} --data {} --out {} --limit 6 --sanity-images 1 --methods saliency,grad_cam --policy {}",
        fx.display(),
        data.display(),
        out_e.display(),
        strict.display()
    );
    let e = finelens(&args.split(' ').collect::<Vec<_>>());
    assert_eq!(e.status.code(), Some(0), "{}", stderr(&e));
    let je = read_json(&out_e.join("report.json"));
    for m in 0..2 {
        let p = &je["audit"]["methods"][m]["perturbation"];
        let infidelity = p["infidelity"].as_f64().unwrap();
        assert!(p["images"] == 6 && (0.0..=1.0).contains(&infidelity), "{p}");
    }
    let table = stdout(&e);
    assert!(
        table.contains("infid") && table.lines().any(|l| l.starts_with("grad_cam ")),
        "{table}"
    );
    // Without a terminal the audit logs every step: which stage, which image, and the time left.
    let log = stderr(&o);
    let steps: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("saliency: attributions and faithfulness "))
        .collect();
    assert_eq!(steps.len(), 6, "{log}");
    assert!(
        steps[0].contains("1/6: circle__00000") && steps[0].contains("s left)"),
        "{log}"
    );
    // The sanity check logs every map: 2 images from the trained model, then from two
    // randomised models per stage of six.
    let sanity: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("saliency: randomisation sanity check "))
        .collect();
    assert_eq!(sanity.len(), 26, "{log}");
    assert!(
        sanity[0].contains("1/26: the trained model, image 1 of 2")
            && sanity[25].contains("26/26: stem alone, image 2 of 2"),
        "{log}"
    );

    // Lenient thresholds: exit 0.
    let lenient = policy(
        "lenient.toml",
        "[sanity]\nmax_spearman_after_randomisation = 1\n[faithfulness]\nmin_gain_over_random = -2\n\
         [localisation]\nmin_relevance_mass_accuracy = 0\nmin_pointing_game = 0\n\
         [shortcut]\nmax_mass_outside_mask = 1\nmax_hotspot_concentration = 1\n",
    );
    let o = audit(
        &d.path().join("lenient"),
        &["--policy", lenient.to_str().unwrap()],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));

    // An existing report directory is refused without --force, and replaced whole with it.
    let o = audit(&out, &["--policy", lenient.to_str().unwrap()]);
    assert_one_line_error(&o, "the output directory exists; pass --force");
    let o = audit(&out, &["--policy", lenient.to_str().unwrap(), "--force"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(read_json(&out.join("report.json"))["pass"], true);

    // In two shards: each writes a partial result and exits 0 (no verdict yet); the merge
    // gives the report, its verdict and its exit status, with the single run's per-image results.
    let shards: Vec<PathBuf> = (0..2)
        .map(|i| {
            let dir = d.path().join(format!("shard{i}"));
            let shard = format!("{i}/2");
            let o = audit(
                &dir,
                &["--policy", strict.to_str().unwrap(), "--shard", &shard],
            );
            assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
            assert!(dir.join("partial.json").is_file() && !dir.join("report.json").exists());
            dir
        })
        .collect();
    let merged = d.path().join("merged");
    let o = finelens(&[
        "merge",
        shards[1].to_str().unwrap(),
        shards[0].to_str().unwrap(),
        "--out",
        merged.to_str().unwrap(),
    ]);
    assert_eq!(
        o.status.code(),
        Some(1),
        "the strict policy fails: {}",
        stderr(&o)
    );
    let (m, whole) = (
        read_json(&merged.join("report.json")),
        read_json(&d.path().join("strict/report.json")),
    );
    assert_eq!(m["audit"]["images"], whole["audit"]["images"]);
    assert!(merged.join("index.html").is_file());

    // Bad policies name the line; a mask folder that doesn't mirror the images names the mask.
    let bad = policy(
        "bad.toml",
        "[sanity]\nmax_spearman_after_randomisation = 0.5\n\n[karma]\nx = 1\n",
    );
    assert_one_line_error(
        &audit(&d.path().join("x"), &["--policy", bad.to_str().unwrap()]),
        "bad.toml:4: unknown check `karma`",
    );
    let bad = policy(
        "bad2.toml",
        "[shortcut]\nmax_hotspot_concentration = \"low\"\n",
    );
    assert_one_line_error(
        &audit(&d.path().join("x"), &["--policy", bad.to_str().unwrap()]),
        "bad2.toml:2: `max_hotspot_concentration` must be a number",
    );
    assert_one_line_error(
        &finelens(&[
            "audit",
            fx.to_str().unwrap(),
            "--data",
            data.to_str().unwrap(),
            "--out",
            d.path().join("x").to_str().unwrap(),
            "--methods",
            "saliency,anchors",
        ]),
        "methods: unknown method `anchors`",
    );
    assert_one_line_error(
        &audit(&d.path().join("x"), &["--replacement", "grey"]),
        "--replacement grey: baseline: unknown baseline `grey`",
    );
    let masks = d.path().join("pretrain/masks/val");
    let first_mask = masks.join("circle/00000.png");
    std::fs::remove_file(&first_mask).unwrap();
    assert_one_line_error(
        &audit(&d.path().join("x"), &[]),
        &format!("{}: no mask for", first_mask.display()),
    );
    assert!(
        !d.path().join("x").exists(),
        "nothing written on an input error"
    );
}

/// Class and file names from data are text in the page: a class named like a script and a file
/// named like an image tag render as text, never as markup.
#[test]
fn audit_report_escapes_names_from_data() {
    let d = tempfile::tempdir().unwrap();
    let evil_class = "<script>alert(1)</script>";
    let ck = finelens_models::checkpoint::load(&fixture(), None).unwrap();
    let mut meta = ck.meta.clone();
    meta.class_names[0] = evil_class.into();
    let model = d.path().join("evil.safetensors");
    finelens_models::checkpoint::save(&model, &ck.store, &meta).unwrap();
    let folder = small_folder(&d.path().join("data"));
    let flat = d.path().join("flat");
    std::fs::create_dir_all(&flat).unwrap();
    let evil_file = "<img src=x onerror=alert(2)>.png";
    std::fs::copy(folder.join("circle/00000.png"), flat.join(evil_file)).unwrap();
    std::fs::copy(folder.join("ring/00000.png"), flat.join("b.png")).unwrap();
    let out = d.path().join("report");
    let o = finelens(&[
        "audit",
        model.to_str().unwrap(),
        "--data",
        flat.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--methods",
        "saliency",
        "--sanity-images",
        "1",
    ]);
    assert!(
        o.status.code() == Some(0) || o.status.code() == Some(1),
        "{}",
        stderr(&o)
    );
    let html = std::fs::read_to_string(out.join("index.html")).unwrap();
    assert!(
        !html.contains(evil_class) && !html.contains("<img src=x"),
        "unescaped data"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );
}

/// Chromium for the browser tests: `FINELENS_CHROMIUM`, else `chromium` on the PATH; without
/// it `None` (said: the caller skips its browser part), unless `FINELENS_REQUIRE_BROWSER` is set
/// (as `.ci/run` does).
fn chromium() -> Option<PathBuf> {
    let found = match std::env::var_os("FINELENS_CHROMIUM") {
        Some(p) => Some(PathBuf::from(p)),
        None => std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("chromium"))
                .find(|p| p.is_file())
        }),
    };
    if found.is_none() {
        assert!(
            std::env::var_os("FINELENS_REQUIRE_BROWSER").is_none(),
            "FINELENS_REQUIRE_BROWSER is set but no chromium was found"
        );
        eprintln!("skipping the browser check: no chromium (set FINELENS_CHROMIUM)");
    }
    found
}

/// The report opened by a real browser (headless Chromium, which `.ci/run` installs): it renders,
/// logs nothing to the console, and makes no network request of its own; the screenshot is kept
/// in `target/browser-test/`. Without Chromium the test is skipped, unless
/// `FINELENS_REQUIRE_BROWSER` is set (as `.ci/run` does).
#[test]
fn report_renders_in_headless_chromium_without_errors_or_requests() {
    let Some(browser) = chromium() else { return };
    let d = tempfile::tempdir().unwrap();
    synth(d.path(), "shortcut", [1, 2, 1]);
    let report = d.path().join("report");
    let o = finelens(&[
        "audit",
        fixture().to_str().unwrap(),
        "--data",
        d.path().join("shortcut/images/val").to_str().unwrap(),
        "--base",
        fixture().to_str().unwrap(),
        "--out",
        report.to_str().unwrap(),
        "--methods",
        "saliency",
        "--sanity-images",
        "1",
    ]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    assert_renders_in_chromium(&browser, &report.join("index.html"), "report.png");
}

/// Open `page` in headless Chromium: it renders (the screenshot, kept in `target/browser-test/`
/// as `shot`, has the page's colours), logs nothing to the console and makes no network request
/// of its own.
fn assert_renders_in_chromium(browser: &Path, page: &Path, shot: &str) {
    let d = tempfile::tempdir().unwrap();
    let keep = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/browser-test");
    std::fs::create_dir_all(&keep).unwrap();
    let shot = keep.join(shot);
    let _ = std::fs::remove_file(&shot);
    let netlog = d.path().join("net.json");
    let page = format!("file://{}", page.display());
    let b = Command::new(browser)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", d.path().join("profile").display()),
            "--enable-logging=stderr",
            "--v=0",
            &format!("--log-net-log={}", netlog.display()),
            "--window-size=1280,2400",
            &format!("--screenshot={}", shot.display()),
            &page,
        ])
        .output()
        .expect("chromium runs");
    let log = String::from_utf8_lossy(&b.stderr);
    assert!(b.status.success(), "chromium failed: {log}");
    let console: Vec<&str> = log.lines().filter(|l| l.contains(":CONSOLE")).collect();
    assert!(console.is_empty(), "console messages: {console:?}");

    // The page's own requests carry its file:// origin; the browser's background ones don't.
    let net: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&netlog).unwrap()).unwrap();
    let start_job = net["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"].clone();
    let page_requests: Vec<String> = net["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == start_job && e["params"]["url"].is_string())
        .filter(|e| e["params"]["initiator"] != "not an origin")
        .map(|e| e["params"]["url"].to_string())
        .collect();
    assert!(
        page_requests.is_empty(),
        "the page fetched {page_requests:?}"
    );

    // It rendered: a full-size screenshot with the page's colours, not a blank one.
    let img = image::open(&shot).unwrap().to_rgb8();
    assert_eq!(img.dimensions(), (1280, 2400));
    let colours: std::collections::HashSet<[u8; 3]> = img.pixels().map(|p| p.0).collect();
    assert!(
        colours.len() > 100,
        "only {} colours: a blank page?",
        colours.len()
    );
    // The fail badge's background (#fbd9d6) is on screen: the styles applied.
    assert!(colours.contains(&[0xfb, 0xd9, 0xd6]) || colours.contains(&[0xd7, 0xf0, 0xdd]));
}

/// The fetched all-MiniLM-L6-v2 folder, or `None` (said) when it is absent and not required.
fn text_model() -> Option<PathBuf> {
    let dir = std::env::var_os("FINELENS_TEXT_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/models/all-minilm-l6-v2")
        });
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

/// A real Hugging Face folder fine-tuned through the binary on the synthetic sentiment task: the
/// output is a model folder again (Hugging Face names, config with the labels, tokenizer), its
/// metrics are written, and it fine-tunes again with its own head kept; bad text inputs are
/// one-line errors.
#[test]
fn finetune_a_text_model_folder() {
    let Some(model) = text_model() else { return };
    let d = tempfile::tempdir().unwrap();
    let o = finelens(&[
        "data",
        "synth",
        "--task",
        "text-sentiment",
        "--out",
        d.path().to_str().unwrap(),
        "--train-per-class",
        "24",
        "--val-per-class",
        "8",
        "--test-per-class",
        "8",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let task = d.path().join("text-sentiment");
    let out = d.path().join("ft");
    let finetune = |out: &Path, model: &Path, extra: &[&str]| {
        let (train, val) = (task.join("train.jsonl"), task.join("val.jsonl"));
        let mut args = vec![
            "finetune",
            model.to_str().unwrap(),
            "--train",
            train.to_str().unwrap(),
            "--val",
            val.to_str().unwrap(),
            "--out",
            out.to_str().unwrap(),
            "--epochs",
            "3",
            "--batch-size",
            "16",
            "--lr",
            "5e-4",
            "--optimizer",
            "adamw",
            "--weight-decay",
            "0.01",
            "--decay",
            "linear",
            "--warmup-epochs",
            "0.5",
            "--max-grad-norm",
            "1",
            "--max-length",
            "24",
            "--freeze",
            "embeddings",
        ];
        args.extend_from_slice(extra);
        finelens(&args)
    };
    let o = finetune(&out, &model, &["--head", "cls"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let metrics = read_json(&out.join("metrics.json"));
    assert_eq!(metrics["schema_version"], "finelens-metrics/1");
    assert_eq!(metrics["history"].as_array().unwrap().len(), 3);
    let acc = metrics["val"]["accuracy"].as_f64().unwrap();
    assert!(acc >= 0.75, "validation accuracy {acc}: {}", stdout(&o));
    let config = read_json(&out.join("config.json"));
    assert_eq!(config["architectures"][0], "BertForSequenceClassification");
    assert_eq!(config["id2label"]["1"], "positive");
    assert!(out.join("tokenizer.json").is_file() && out.join("curves.png").is_file());
    // Evaluating the output folder on the validation set gives the best epoch's figures, and
    // inspect describes both folders.
    let eval_json = d.path().join("eval.json");
    let o = finelens(&[
        "eval",
        out.to_str().unwrap(),
        "--data",
        task.join("val.jsonl").to_str().unwrap(),
        "--json",
        eval_json.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let e = read_json(&eval_json);
    assert_eq!(e["schema_version"], "finelens-eval/1");
    assert_eq!(e["accuracy"], metrics["val"]["accuracy"]);
    let (a, b) = (
        e["loss"].as_f64().unwrap(),
        metrics["val"]["loss"].as_f64().unwrap(),
    );
    assert!((a - b).abs() <= 1e-6 * b.abs().max(1e-3), "{a} vs {b}");
    let o = finelens(&["inspect", out.to_str().unwrap()]);
    let text = stdout(&o);
    assert!(
        text.contains("bert (6 layers, hidden 384, 12 heads")
            && text.contains("head cls, 2 classes: negative, positive")
            && text.contains("max length 24"),
        "{text}"
    );
    let o = finelens(&["inspect", model.to_str().unwrap()]);
    assert!(stdout(&o).contains("classifier   none"), "{}", stdout(&o));
    assert!(stdout(&o).contains("22713216 in"), "{}", stdout(&o));
    // WeightWatcher's reading of the pretrained MiniLM: every attention and feed-forward matrix
    // of the six layers (6 × 6), the word, position and type embeddings and the pooler.
    let o = finelens(&["inspect", "--spectral", "--json", model.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let spectra = v["spectra"].as_array().unwrap();
    assert_eq!(spectra.len(), 6 * 6 + 4, "{spectra:?}");
    let query = spectra
        .iter()
        .find(|l| l["name"] == "bert.encoder.layer.0.attention.self.query.weight")
        .unwrap();
    let alpha = query["spectrum"]["alpha"].as_f64().unwrap();
    assert!(alpha > 1.0 && alpha < 20.0, "{query}");
    assert_eq!(query["spectrum"]["eigenvalues"], 384);

    // Token attributions on the fine-tuned folder: a sentence given on the command line (markup
    // in it stays text on the page) and the first validation texts; integrated gradients (GL-50,
    // `pad` baseline) is complete to float precision on a smooth BERT.
    let ex = d.path().join("explain");
    let o = finelens(&[
        "explain",
        out.to_str().unwrap(),
        "The plot was <b>superb</b> & moving.",
        "--methods",
        "saliency,gradient_x_input,integrated_gradients,grad_cam,attention,attention_rollout,grad_attention,occlusion",
        "--out",
        ex.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stderr(&o).contains("grad_cam is not available for text models"));
    let t = read_json(&ex.join("texts/000/tokens.json"));
    let tokens: Vec<&str> = t["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["token"].as_str().unwrap())
        .collect();
    assert_eq!(tokens.first(), Some(&"[CLS]"));
    assert!(tokens.contains(&"superb"), "{tokens:?}");
    let ig = &t["methods"]["integrated_gradients"];
    assert_eq!(ig["tokens"].as_array().unwrap().len(), tokens.len());
    let rel = ig["completeness"]["relative_delta"].as_f64().unwrap();
    assert!(rel < 1e-3, "IG completeness off by {rel}");
    let words: Vec<&str> = t["words"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["text"].as_str().unwrap())
        .collect();
    assert!(
        words.contains(&"superb") && words.contains(&"moving"),
        "{words:?}"
    );
    assert_eq!(
        npy_values(&ex.join("texts/000/integrated_gradients.npy")).len(),
        tokens.len() * 384
    );
    // The attention views: every layer's attention saved (6 layers × 12 heads × T × T, rows
    // summing to 1), rollout rows summing to 1; occlusion scores per token and per word.
    let att = npy_values(&ex.join("texts/000/attention.npy"));
    assert_eq!(att.len(), 6 * 12 * tokens.len() * tokens.len());
    for row in att.chunks(tokens.len()) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let scores = |m: &str, k: &str| -> Vec<f64> {
        t["methods"][m][k]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect()
    };
    assert!((scores("attention_rollout", "tokens").iter().sum::<f64>() - 1.0).abs() < 1e-4);
    assert!(scores("grad_attention", "tokens").iter().all(|v| *v >= 0.0));
    assert_eq!(scores("occlusion", "words").len(), words.len());
    assert_eq!(
        scores("occlusion", "tokens")[0],
        0.0,
        "[CLS] is not occluded"
    );
    let page = std::fs::read_to_string(ex.join("index.html")).unwrap();
    assert!(
        !page.contains("<b>superb") && page.contains("&lt;b&gt;"),
        "markup escaped"
    );
    let o = finelens(&[
        "explain",
        out.to_str().unwrap(),
        task.join("val.jsonl").to_str().unwrap(),
        "--limit",
        "2",
        "--methods",
        "integrated_gradients:baseline=mask,steps=16",
        "--out",
        d.path().join("explain-val").to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&d.path().join("explain-val/explain.json"));
    assert_eq!(r["schema_version"], "finelens-text-explain/1");
    assert_eq!(r["texts"].as_array().unwrap().len(), 2);
    assert!(r["texts"][0]["label"].is_string());
    let o = finelens(&[
        "explain",
        out.to_str().unwrap(),
        "fine",
        "--methods",
        "integrated_gradients:baseline=blur",
        "--out",
        d.path().join("x").to_str().unwrap(),
    ]);
    assert_one_line_error(&o, "baseline `blur` is an image baseline");

    // Drift from the bare MiniLM (no `bert.` prefix, no classifier) to the fine-tuned folder:
    // tensors matched by name across the two spellings; the frozen embeddings did not move (in
    // weights or [CLS] representation), the encoder did; attention drift per layer and head.
    let dr = d.path().join("drift");
    let o = finelens(&[
        "drift",
        model.to_str().unwrap(),
        out.to_str().unwrap(),
        "--probe",
        task.join("val.jsonl").to_str().unwrap(),
        "--limit",
        "12",
        "--batch-size",
        "6",
        "--explain-images",
        "2",
        "--out",
        dr.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let r = read_json(&dr.join("drift.json"));
    assert_eq!(r["schema_version"], "finelens-text-drift/1");
    assert_eq!(r["weights"]["tensors"].as_array().unwrap().len(), 103);
    let stage = |name: &str| -> f64 {
        r["weights"]["stages"]
            .as_array()
            .unwrap()
            .iter()
            .find(|g| g["name"] == name)
            .unwrap()["relative_l2_change"]
            .as_f64()
            .unwrap()
    };
    assert_eq!(stage("embeddings"), 0.0);
    assert!(stage("encoder.layer.0") > 0.0);
    let cka = r["representation"]["diagonal"].as_array().unwrap();
    assert!((cka[0].as_f64().unwrap() - 1.0).abs() < 1e-6, "{cka:?}");
    let js = r["attention"]["js_distance"].as_array().unwrap();
    assert_eq!((js.len(), js[0].as_array().unwrap().len()), (6, 12));
    assert_eq!(r["explanation"]["spearman"].as_array().unwrap().len(), 2);
    assert!(dr.join("cka.png").is_file() && dr.join("layers.png").is_file());

    // The run left its resumable state; resuming a finished run trains nothing and leaves the
    // model as it was, and a state from other settings is refused.
    let weights = std::fs::read(out.join("model.safetensors")).unwrap();
    let o = finetune(&out, &model, &["--head", "cls", "--resume"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(!stderr(&o).contains("epoch   1"), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(out.join("model.safetensors")).unwrap(),
        weights
    );
    assert_eq!(read_json(&out.join("metrics.json"))["val"], metrics["val"]);
    let o = finetune(&out, &model, &["--head", "cls", "--resume", "--seed", "7"]);
    assert_one_line_error(
        &o,
        "cannot resume: it was written by a run with other settings",
    );

    // The folder is a model folder again: fine-tune it with its own head.
    let o = finetune(&d.path().join("again"), &out, &["--head", "keep"]);
    assert!(o.status.success(), "{}", stderr(&o));

    // Bad input: a label column that is not there, a max length beyond the model's positions.
    let o = finetune(&d.path().join("x"), &model, &["--label-column", "stars"]);
    assert_one_line_error(&o, "train.jsonl:1: no field `stars`");
    let o = finelens(&[
        "finetune",
        model.to_str().unwrap(),
        "--train",
        task.join("train.jsonl").to_str().unwrap(),
        "--out",
        d.path().join("x").to_str().unwrap(),
        "--max-length",
        "4096",
    ]);
    assert_one_line_error(
        &o,
        "max length 4096 must be between 2 and the model's 512 positions",
    );
    assert!(
        !d.path().join("x").exists(),
        "nothing written on an input error"
    );

    // A folder without config.json, and one without its tokenizer: named, the cause said once.
    let (bare, no_tok) = (d.path().join("bare"), d.path().join("no-tokenizer"));
    for dir in [&bare, &no_tok] {
        std::fs::create_dir(dir).unwrap();
        std::os::unix::fs::symlink(
            model.join("model.safetensors"),
            dir.join("model.safetensors"),
        )
        .unwrap();
    }
    std::fs::copy(model.join("config.json"), no_tok.join("config.json")).unwrap();
    let o = finetune(&d.path().join("x"), &bare, &[]);
    assert_one_line_error(&o, "bare: a directory, not a checkpoint file");
    let o = finetune(&d.path().join("x"), &no_tok, &[]);
    assert_one_line_error(&o, "tokenizer.json: no tokenizer (tokenizer.json) here");
    assert_eq!(
        stderr(&o).matches("no tokenizer").count(),
        1,
        "{}",
        stderr(&o)
    );
}

/// A text model's audit: class names and texts with markup render as text on the page (in a
/// real browser too), the report has the model card, both randomisations, the drift from its
/// base and a sortable gallery; a rationale outside its text and `--shard` are one-line errors;
/// occlusion can delete tokens.
#[test]
fn text_audit_report_escapes_data_and_renders_in_a_browser() {
    let Some(model) = text_model() else { return };
    let d = tempfile::tempdir().unwrap();
    let o = finelens(&[
        "data",
        "synth",
        "--task",
        "text-sentiment",
        "--out",
        d.path().to_str().unwrap(),
        "--train-per-class",
        "12",
        "--val-per-class",
        "3",
        "--test-per-class",
        "1",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    // The classes renamed to markup; a script appended to every text (the rationales, character
    // spans of the cue word, stay where they were).
    let evil_class = "<script>alert(1)</script>";
    let rename = |name: &str| {
        let src = d.path().join("text-sentiment").join(name);
        let lines: Vec<String> = std::fs::read_to_string(&src)
            .unwrap()
            .lines()
            .map(|l| {
                let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
                if v["label"] == "negative" {
                    v["label"] = evil_class.into();
                }
                v["text"] =
                    format!("{} <script>alert(2)</script>", v["text"].as_str().unwrap()).into();
                v.to_string()
            })
            .collect();
        let dst = d.path().join(name);
        std::fs::write(&dst, lines.join("\n")).unwrap();
        dst
    };
    let (train, val) = (rename("train.jsonl"), rename("val.jsonl"));
    let out = d.path().join("ft");
    let o = finelens(&[
        "finetune",
        model.to_str().unwrap(),
        "--train",
        train.to_str().unwrap(),
        "--val",
        val.to_str().unwrap(),
        "--out",
        out.to_str().unwrap(),
        "--epochs",
        "1",
        "--batch-size",
        "8",
        "--lr",
        "1e-3",
        "--max-length",
        "24",
        "--freeze",
        "head-only",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));

    let report = d.path().join("audit");
    let audit = |out: &Path, data: &Path, extra: &[&str]| {
        let mut args = vec![
            "audit".to_owned(),
            d.path().join("ft").to_str().unwrap().to_owned(),
            "--data".into(),
            data.to_str().unwrap().into(),
            "--base".into(),
            model.to_str().unwrap().into(),
            "--methods".into(),
            "integrated_gradients:steps=16".into(),
            "--sanity-images".into(),
            "1".into(),
            "--out".into(),
            out.to_str().unwrap().into(),
        ];
        args.extend(extra.iter().map(|a| a.to_string()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        finelens(&args)
    };
    let o = audit(&report, &val, &[]);
    assert!(matches!(o.status.code(), Some(0 | 1)), "{}", stderr(&o));
    let r = read_json(&report.join("report.json"));
    assert_eq!(r["schema_version"], "finelens-text-audit/3");
    let gated = &r["methods"][0];
    let c = &gated["complexity"];
    assert_eq!(c["maps"], 6, "{c}");
    let rel = c["mean_relative_complexity"].as_f64().unwrap();
    assert!(rel > 0.0 && rel <= 1.0, "{c}");
    // Quantus's figures in tokens: every text's perturbation figures, robustness and the random
    // logit on the one randomisation text, and each gated through the policy.
    assert_eq!(gated["perturbation"]["images"], 6, "{gated}");
    assert_eq!(gated["robustness"]["images"], 1, "{gated}");
    assert_eq!(gated["random_logit"]["images"], 1, "{gated}");
    let figure = |k: &str| r["figures"][k].as_f64().unwrap_or_else(|| panic!("{k}"));
    for (k, lo, hi) in [
        ("faithfulness.min_correlation", -1.0, 1.0),
        ("faithfulness.min_monotonicity", -1.0, 1.0),
        ("faithfulness.max_infidelity", 0.0, 1.0),
        ("sanity.max_random_logit_ssim", -1.0, 1.0),
        ("robustness.max_sensitivity", 0.0, f64::INFINITY),
    ] {
        assert!((lo..=hi).contains(&figure(k)), "{k}: {}", figure(k));
    }
    assert_eq!(
        gated["perturbation"]["faithfulness_correlation"].as_f64(),
        Some(figure("faithfulness.min_correlation"))
    );
    let stages = [
        "head",
        "pooler",
        "encoder.layer.5",
        "encoder.layer.0",
        "embeddings",
    ];
    for key in ["cascading", "independent"] {
        let names: Vec<&str> = r["sanity"][key]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s[0].as_str().unwrap())
            .collect();
        assert_eq!(names.len(), 9, "{key}: {names:?}");
        assert!(stages.iter().all(|s| names.contains(s)), "{key}: {names:?}");
    }
    // Only the head trained: the encoder's representations are the base's at every layer.
    assert_eq!(
        r["model_card"]["training"]["history"]
            .as_array()
            .unwrap()
            .len(),
        1
    );
    let drift = &r["drift"];
    let cka = drift["representation"]["diagonal"].as_array().unwrap();
    assert_eq!(cka.len(), 8, "embeddings, 6 layers, pooler");
    assert!(
        cka.iter().all(|c| (c.as_f64().unwrap() - 1.0).abs() < 1e-6),
        "a frozen encoder's representations are the base's: {cka:?}"
    );
    assert_eq!(
        r["figures"]["drift.min_cka_penultimate"]
            .as_f64()
            .map(|v| v > 0.999999),
        Some(true)
    );
    let html = std::fs::read_to_string(report.join("index.html")).unwrap();
    assert!(
        !html.contains(evil_class) && !html.contains("<script>alert(2)"),
        "unescaped data"
    );
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"));
    assert_eq!(
        html.matches("<script>").count(),
        1,
        "only the page's own script"
    );
    for needle in [
        "Model card",
        "training curves",
        "Confusion matrix",
        "sortCards(",
        "independent (it alone)",
        "Drift from the base",
        "Provenance",
        "figures per method",
    ] {
        assert!(html.contains(needle), "{needle}");
    }
    if let Some(browser) = chromium() {
        assert_renders_in_chromium(&browser, &report.join("index.html"), "text-audit.png");
    }

    // `evaluate` on a text model: every gradient method measured, one row each, no gate; the
    // gated method's figures as the audit's (same seed, same texts).
    let ev = d.path().join("evaluate");
    let o = finelens(&[
        "evaluate",
        out.to_str().unwrap(),
        "--data",
        val.to_str().unwrap(),
        "--methods",
        "integrated_gradients:steps=16,saliency,gradient_x_input",
        "--sanity-images",
        "1",
        "--out",
        ev.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let table = String::from_utf8_lossy(&o.stdout).to_string() + &stderr(&o);
    for m in ["saliency", "gradient_x_input"] {
        assert!(table.lines().any(|l| l.starts_with(m)), "{m}: {table}");
    }
    let e = read_json(&ev.join("report.json"));
    let methods = e["methods"].as_array().unwrap();
    assert_eq!(methods.len(), 3);
    assert_eq!(methods[0]["perturbation"], gated["perturbation"]);
    for m in methods {
        let rho = m["randomised_spearman"].as_f64().unwrap();
        assert!(rho.abs() <= 1.0, "{m}");
        assert_eq!(m["robustness"]["images"], 1, "{m}");
    }

    // Bad input: a rationale beyond its text, a shard of a text audit.
    let bad = d.path().join("bad.jsonl");
    std::fs::write(
        &bad,
        "{\"text\": \"fine\", \"label\": \"positive\", \"rationale\": [[0, 9]]}\n",
    )
    .unwrap();
    let o = audit(&d.path().join("x"), &bad, &[]);
    assert_one_line_error(
        &o,
        "bad.jsonl:1: rationale span [0, 9) is outside the text's 4 characters",
    );
    let o = audit(&d.path().join("x"), &val, &["--shard", "0/2"]);
    assert_one_line_error(&o, "--shard splits image sets");
    assert!(
        !d.path().join("x").exists(),
        "nothing written on an input error"
    );

    // Occlusion by deletion: a word's score is the drop of the target's logit when the word is
    // taken out; [CLS] and [SEP] are never occluded.
    let ex = d.path().join("explain");
    let o = finelens(&[
        "explain",
        out.to_str().unwrap(),
        "a truly wonderful film",
        "--methods",
        "occlusion:fill=delete",
        "--out",
        ex.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let t = read_json(&ex.join("texts/000/tokens.json"));
    let tokens = t["methods"]["occlusion"]["tokens"].as_array().unwrap();
    assert_eq!(tokens.first().unwrap().as_f64(), Some(0.0));
    assert_eq!(tokens.last().unwrap().as_f64(), Some(0.0));
    assert!(tokens[1..tokens.len() - 1]
        .iter()
        .any(|v| v.as_f64().unwrap() != 0.0));
}

/// The fetched Rotten Tomatoes set (`scripts/fetch-data.sh`), or `None` (said) when it is absent
/// and not required.
fn rotten_tomatoes() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.cache/data/rotten-tomatoes");
    if dir.join("train.csv").is_file() && dir.join("test.csv").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var_os("FINELENS_REQUIRE_TEXT_MODEL").is_none(),
        "{} is missing: run scripts/fetch-data.sh",
        dir.display()
    );
    eprintln!("skipped: no Rotten Tomatoes set at {}", dir.display());
    None
}

/// The real Rotten Tomatoes snippets read as a text set: every one of the 4,866 fresh/rotten
/// sentences, two classes, no film in both splits, and all of them tokenized by the real
/// MiniLM tokenizer (a few cut at 64 tokens, none empty).
#[test]
fn rotten_tomatoes_reads_and_tokenizes() {
    let (Some(dir), Some(model)) = (rotten_tomatoes(), text_model()) else {
        return;
    };
    use finelens_data::text::{Columns, TextSet, TextTokenizer};
    let columns = Columns {
        text: "text".into(),
        label: "label".into(),
    };
    let train = TextSet::read(&dir.join("train.csv"), &columns, None).unwrap();
    let test = TextSet::read(&dir.join("test.csv"), &columns, Some(&train.classes)).unwrap();
    assert_eq!(train.classes, ["fresh", "rotten"]);
    assert_eq!(train.samples.len() + test.samples.len(), 4866);
    assert!(train.skipped.is_empty() && test.skipped.is_empty());
    let films = |split: &str| -> std::collections::BTreeSet<String> {
        let text = std::fs::read_to_string(dir.join(split)).unwrap();
        text.lines()
            .skip(1)
            .map(|l| l.rsplit(',').next().unwrap().to_owned())
            .collect()
    };
    assert!(films("train.csv").is_disjoint(&films("test.csv")));
    let tok = TextTokenizer::from_file(&model.join("tokenizer.json"), 64).unwrap();
    let mut cut = 0;
    for s in train.samples.iter().chain(&test.samples) {
        let e = tok.encode(&s.text).unwrap();
        assert!(e.ids.len() > 2 && e.ids.len() <= 64, "{:?}", s.text);
        cut += usize::from(e.truncated);
    }
    assert!(cut > 0 && cut < 100, "{cut} sentences cut at 64 tokens");
}
