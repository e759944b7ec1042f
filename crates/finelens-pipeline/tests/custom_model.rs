//! A model family defined only here — a two-stage CNN that is not a ResNet — runs through the
//! explain, drift and audit jobs unchanged: everything they need to know about the model comes
//! from its `Classifier` (including `describe()`) and its parameter specs.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use candle_core::{Device, Tensor};
use finelens_attrib::{BaselineSpec, Method, MethodOptions, MethodSpec};
use finelens_data::synth::{self, Split, SynthConfig, Task};
use finelens_models::params::Init;
use finelens_models::resnet::Hook;
use finelens_models::{
    Classifier, InputKind, Mode, ModelDescription, ParamSpec, ParamStore, Stage,
};
use finelens_pipeline::audit::{audit, AuditDocument, AuditJob};
use finelens_pipeline::drift::{drift, DriftSettings, DriftTarget, Probe};
use finelens_pipeline::explain::{explain, ExplainSettings};
use finelens_pipeline::inputs::{ModelFamily, ModelInfo};
use finelens_pipeline::progress::quiet;
use finelens_pipeline::{read_json, ModelSource, PreprocessSettings};

const SIZE: usize = 32;

/// conv(3→8, stride 2) → ReLU → conv(8→8, stride 2) → ReLU → global mean → linear.
struct TwoStageCnn {
    conv1: Tensor,
    conv2: Tensor,
    fc_weight: Tensor,
    fc_bias: Tensor,
    classes: usize,
}

fn tap(hook: &mut Option<Hook>, name: &str, t: Tensor) -> finelens_models::Result<Tensor> {
    match hook {
        Some(h) => Ok(h(name, &t)?.unwrap_or(t)),
        None => Ok(t),
    }
}

impl Classifier for TwoStageCnn {
    fn forward_hooked(
        &self,
        x: &Tensor,
        _mode: Mode,
        mut hook: Option<Hook>,
    ) -> finelens_models::Result<Tensor> {
        use finelens_models::conv::conv2d;
        let h = tap(&mut hook, "stage1", conv2d(x, &self.conv1, 2, 1)?.relu()?)?;
        let h = tap(&mut hook, "stage2", conv2d(&h, &self.conv2, 2, 1)?.relu()?)?;
        let p = tap(&mut hook, "pool", h.mean((2, 3))?)?;
        let logits = p
            .matmul(&self.fc_weight.t()?)?
            .broadcast_add(&self.fc_bias)?;
        tap(&mut hook, "fc", logits)
    }

    fn layer_names(&self) -> Vec<String> {
        ["stage1", "stage2", "pool", "fc"]
            .map(String::from)
            .to_vec()
    }

    fn num_classes(&self) -> usize {
        self.classes
    }

    fn describe(&self) -> ModelDescription {
        let stage = |name: &str, prefix: &str| Stage {
            name: name.into(),
            prefixes: vec![prefix.into()],
            blocks: Vec::new(),
        };
        ModelDescription {
            input: InputKind::Image { channels: 3 },
            stages: vec![
                stage("stage1", "stage1."),
                stage("stage2", "stage2."),
                stage("head", "fc."),
            ],
            representation_layers: ["stage1", "stage2", "pool"].map(String::from).to_vec(),
            embedding_layer: "pool".into(),
            head_prefixes: vec!["fc.".into()],
            last_spatial_layer: Some("stage2".into()),
        }
    }
}

#[derive(Debug)]
struct TwoStageFamily {
    classes: Vec<String>,
}

impl ModelFamily for TwoStageFamily {
    fn info(&self) -> ModelInfo {
        ModelInfo {
            arch: "two-stage-cnn".into(),
            classes: self.classes.clone(),
            input_size: SIZE,
            crop_pct: 1.0,
            mean: [0.5; 3],
            std: [0.25; 3],
        }
    }

    fn param_specs(&self) -> Vec<ParamSpec> {
        let k = self.classes.len();
        vec![
            ParamSpec::weight(
                "stage1.conv.weight",
                &[8, 3, 3, 3],
                Init::KaimingNormalFanOut,
            ),
            ParamSpec::weight(
                "stage2.conv.weight",
                &[8, 8, 3, 3],
                Init::KaimingNormalFanOut,
            ),
            ParamSpec::weight("fc.weight", &[k, 8], Init::LinearUniform { fan_in: 8 }),
            ParamSpec::weight("fc.bias", &[k], Init::LinearUniform { fan_in: 8 }),
        ]
    }

    fn build(&self, store: &ParamStore) -> finelens_models::Result<Box<dyn Classifier>> {
        Ok(Box::new(TwoStageCnn {
            conv1: store.tensor("stage1.conv.weight")?,
            conv2: store.tensor("stage2.conv.weight")?,
            fc_weight: store.tensor("fc.weight")?,
            fc_bias: store.tensor("fc.bias")?,
            classes: self.classes.len(),
        }))
    }
}

/// Seeded weights of the family, written as a bare safetensors file.
fn write_weights(path: &Path, family: &TwoStageFamily, seed: u64) {
    let store = ParamStore::init(&family.param_specs(), seed, &Device::Cpu).unwrap();
    let tensors = store.iter().map(|(n, t, _)| (n.to_owned(), t)).collect();
    finelens_models::checkpoint::save_state(path, tensors, HashMap::new()).unwrap();
}

#[test]
fn a_model_family_defined_here_runs_through_explain_drift_and_audit() {
    let d = tempfile::tempdir().unwrap();
    let cfg = SynthConfig {
        size: SIZE,
        train_per_class: 1,
        val_per_class: 2,
        test_per_class: 1,
        seed: 0,
    };
    let task = synth::generate(d.path(), Task::Pretrain, &cfg, false).unwrap();
    let family = Arc::new(TwoStageFamily {
        classes: Task::Pretrain.class_names(),
    });
    let (before, after) = (
        d.path().join("before.safetensors"),
        d.path().join("after.safetensors"),
    );
    write_weights(&before, &family, 1);
    write_weights(&after, &family, 2);
    let source = |p: &Path| ModelSource::of_family(p, family.clone());
    let val = task.images(Split::Val);

    // Explain: every method, Grad-CAM at the family's own last spatial layer.
    let ex = explain(
        &ExplainSettings {
            model: source(&after),
            preprocess: PreprocessSettings::default(),
            input: val.clone(),
            methods: MethodSpec::parse_list("all").unwrap(),
            shared: MethodOptions {
                steps: Some(8),
                samples: Some(4),
                ..Default::default()
            },
            target: "predicted".into(),
            limit: Some(3),
            strict: true,
            outlier_perc: 2.0,
            out: d.path().join("explain"),
            force: false,
            shard: None,
        },
        &mut quiet,
    )
    .unwrap();
    assert_eq!(ex.arch, "two-stage-cnn");
    assert_eq!(ex.images.len(), 3);
    let methods = &ex.images[0].methods;
    assert_eq!(methods.len(), Method::ALL.len());
    assert_eq!(methods["grad_cam"].shape, [1, SIZE, SIZE]);
    assert_eq!(methods["integrated_gradients"].shape, [3, SIZE, SIZE]);

    // Drift: grouped by the family's stages, CKA at its representation layers.
    let dr = drift(
        &DriftSettings {
            before: source(&before),
            after: source(&after),
            preprocess: PreprocessSettings::default(),
            probe: Probe::Folder(val.clone()),
            limit: 12,
            batch_size: 4,
            layers: Vec::new(),
            pooled: false,
            explain_method: MethodSpec::new(Method::Saliency),
            shared: MethodOptions::default(),
            explain_images: 2,
            top_fraction: 0.1,
            spectral: finelens_pipeline::drift::Spectral::Norms,
            strict: true,
            out: d.path().join("drift"),
            force: false,
        },
        &mut quiet,
    )
    .unwrap();
    let stages: Vec<&str> = dr.weights.stages.iter().map(|g| g.name.as_str()).collect();
    assert_eq!(stages, ["stage1", "stage2", "head"]);
    let rep = dr.representation.as_ref().unwrap();
    assert_eq!(rep.layers, ["stage1", "stage2", "pool"]);
    assert_eq!(
        dr.explanation.as_ref().unwrap().target,
        DriftTarget::ClassLogit
    );

    // Audit against the other weights as base: randomisation runs over the family's stages from
    // the head down, and the drift figure uses its embedding layer.
    let outcome = audit(
        &AuditJob {
            shard: None,
            model: source(&after),
            preprocess: PreprocessSettings::default(),
            data: val.clone(),
            masks: None,
            no_masks: false,
            base: Some(source(&before)),
            policy: None,
            require_all: true,
            evaluate: false,
            methods: MethodSpec::parse_list("integrated_gradients:steps=16,grad_cam").unwrap(),
            shared: MethodOptions::default(),
            limit: 6,
            replacement: BaselineSpec::Blur(None),
            sanity_images: 2,
            seed: 0,
            strict: true,
            out: d.path().join("audit"),
            force: false,
            command_line: Vec::new(),
        },
        &mut quiet,
    )
    .unwrap();
    let doc = &outcome.document;
    let cascade: Vec<&str> = doc.audit.methods[0]
        .sanity
        .cascading
        .iter()
        .map(|s| s.stage.as_str())
        .collect();
    assert_eq!(cascade, ["head", "stage2", "stage1"]);
    // With masks and a base, every figure the policy gates on was measured.
    assert!(
        doc.verdicts.iter().all(|v| v.figure.is_some()),
        "{:?}",
        doc.verdicts
    );
    let back: AuditDocument = read_json(&d.path().join("audit/report.json")).unwrap();
    assert_eq!(back.verdicts.len(), doc.verdicts.len());
    assert!(d.path().join("audit/index.html").is_file());
}
