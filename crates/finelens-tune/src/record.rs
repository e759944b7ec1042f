//! What a trained checkpoint records about its training, in its metadata (`training`): written
//! and read through [`TrainingRecord`], never by key.

use std::path::PathBuf;

use finelens_models::Metadata;
use serde::{Deserialize, Serialize};

use crate::train::{EpochRecord, TrainConfig};
use crate::{Result, TuneError};

/// How a model was made.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum TrainingKind {
    /// From a seeded random initialisation.
    FromScratch,
    /// From a parent checkpoint.
    FineTune,
}

/// One epoch, as the checkpoint records it (a flat row, for plots and model cards).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EpochSummary {
    pub epoch: usize,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub train_loss: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub train_accuracy: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub val_loss: f64,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub val_accuracy: f64,
    /// Absent in checkpoints written before finelens recorded it.
    #[serde(default)]
    pub lr_end: Option<f64>,
    #[serde(deserialize_with = "finelens_models::json::f64_or_nan")]
    pub seconds: f64,
    #[serde(default)]
    pub images_per_second: Option<f64>,
}

impl From<&EpochRecord> for EpochSummary {
    fn from(r: &EpochRecord) -> Self {
        Self {
            epoch: r.epoch,
            train_loss: r.train_loss,
            train_accuracy: r.train_accuracy,
            val_loss: r.val.loss,
            val_accuracy: r.val.accuracy,
            lr_end: Some(r.lr_end),
            seconds: r.seconds,
            images_per_second: Some(r.images_per_second),
        }
    }
}

/// The `training` entry of a checkpoint's metadata.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingRecord {
    pub kind: TrainingKind,
    pub config: TrainConfig,
    pub train_images: usize,
    pub val_images: usize,
    /// The parent checkpoint's path (fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<PathBuf>,
    /// The freeze policy as the user wrote it (fine-tuning).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub freeze: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lp_epochs: Option<usize>,
    /// The epoch this checkpoint holds (fine-tuning keeps the best).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub best_epoch: Option<usize>,
    pub history: Vec<EpochSummary>,
}

impl TrainingRecord {
    pub fn history_of(history: &[EpochRecord]) -> Vec<EpochSummary> {
        history.iter().map(EpochSummary::from).collect()
    }

    /// Store this record in `meta`.
    pub fn record_in(&self, meta: &mut Metadata) {
        meta.training = Some(serde_json::to_value(self).expect("plain data serialises"));
    }

    /// The record a checkpoint's metadata holds, if any.
    pub fn of(meta: &Metadata) -> Result<Option<Self>> {
        meta.training
            .as_ref()
            .map(|v| {
                serde_json::from_value(v.clone()).map_err(|e| {
                    TuneError::Config(format!("the checkpoint's training record: {e}"))
                })
            })
            .transpose()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped fixture was written before the record was typed: it still reads.
    #[test]
    fn the_fixtures_record_reads_and_round_trips() {
        let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../fixtures/resnet-mini-pretrain.safetensors");
        let mut meta = finelens_models::checkpoint::load(&path, None).unwrap().meta;
        let r = TrainingRecord::of(&meta)
            .unwrap()
            .expect("the fixture records its training");
        assert_eq!(r.kind, TrainingKind::FromScratch);
        assert_eq!((r.config.epochs, r.history.len()), (8, 8));
        assert_eq!(r.train_images, 6000);
        r.record_in(&mut meta);
        assert_eq!(TrainingRecord::of(&meta).unwrap(), Some(r));
    }
}
