//! Device-side adaptation methods that do not involve the cloud: the baselines the method is
//! measured against in one harness (static, on-device fine-tuning, statistics recalibration,
//! classifier adjustment). Each is a plugin like everything else.

use serde::{Deserialize, Serialize};

use crate::data::Clip;
use crate::model::{DeviceModel, ModelError};
use crate::slots::{ParamsError, SlotSchema};

/// What a device hands an adaptation method.
#[derive(Debug, Clone, Copy)]
pub struct AdaptInput<'a> {
    /// The device's recent unlabelled window (answers stripped).
    pub window: &'a [Clip],
    /// Labelled clips of the device's own domain: exactly as many as the method asked for
    /// through [`DeviceAdapter::labels_needed`].
    pub labelled: &'a [Clip],
    /// Seed of this adaptation.
    pub seed: u64,
}

/// What an adaptation did to the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AdaptOutcome {
    /// Parameters updated by gradient descent on the device.
    pub trainable_parameters: usize,
    /// Parameters (or statistics) whose values the method replaced, trained or not.
    pub changed_parameters: usize,
    /// Labelled clips consumed.
    pub labels_used: usize,
    /// Forward passes over a batch of clips (window clips, or FTA's labelled ones) the adaptation
    /// ran: a training step counts one; passes that scoring would run anyway do not count.
    #[serde(default)]
    pub forward_passes: usize,
    /// Method-specific figures (epochs run, best held-out accuracy, …).
    pub detail: Vec<(String, f64)>,
    /// Method-specific curves by name, e.g. FTA's held-out loss per epoch (epoch 0 first).
    #[serde(default)]
    pub curves: Vec<(String, Vec<f64>)>,
}

/// Why an adaptation failed. The harness keeps (and scores) the device's previous model.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AdaptError {
    /// The model failed or lacks a capability the method needs.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Parameters the method built were refused.
    #[error(transparent)]
    Params(#[from] ParamsError),
    /// The input does not suit the method.
    #[error("{0}")]
    Input(String),
}

/// A device-side adaptation method.
pub trait DeviceAdapter: Send + Sync {
    /// Row name in reports, e.g. `FTA@16 (slots)`.
    fn label(&self) -> String;

    /// Adapts `model` in place (or replaces it); on error the harness keeps the previous model.
    fn adapt(&self, model: &mut Box<dyn DeviceModel>, input: &AdaptInput<'_>) -> Result<AdaptOutcome, AdaptError>;

    /// Labelled clips of its own domain the method needs (0: label-free).
    fn labels_needed(&self) -> usize {
        0
    }

    /// Whether the method can run on a model with these dynamic slots (e.g. the slots it
    /// names exist); the bench asks before any device adapts, so that a setting that cannot work
    /// is one clear error, not a failure on every device.
    fn check_schema(&self, _schema: &SlotSchema) -> Result<(), AdaptError> {
        Ok(())
    }
}
