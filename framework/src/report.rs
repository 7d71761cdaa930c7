//! Results of a run: per device, per fleet, per cloud phase. Serialised as the JSON report.

use serde::{Deserialize, Serialize};

use crate::TrainingLog;
use crate::metrics::RetrievalMetrics;

/// One device's outcome.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceReport {
    /// Device name.
    pub device: String,
    /// Its shifts, e.g. `contrast@5`.
    pub shift: String,
    /// Largest severity among its shifts (0: clean).
    #[serde(default)]
    pub severity: u8,
    /// Label-shift α, if any.
    pub class_mix_alpha: Option<f64>,
    /// Whether the device's distribution differs from clean, uniform data.
    pub shifted: bool,
    /// QA accuracy of the static cloud model on the device's held-out clips.
    pub static_accuracy: f64,
    /// QA accuracy after applying the generated parameters (equal to static if refused).
    pub adapted_accuracy: f64,
    /// Text → video retrieval of the static model on the held-out clips (if the model embeds).
    pub static_retrieval: Option<RetrievalMetrics>,
    /// The same after adaptation.
    pub adapted_retrieval: Option<RetrievalMetrics>,
    /// Bytes uploaded for this adaptation (envelope included).
    pub bytes_up: u64,
    /// Bytes downloaded.
    pub bytes_down: u64,
    /// What uploading the raw window would have cost (one byte per pixel channel).
    pub raw_window_bytes: u64,
    /// Anchors uploaded.
    pub anchors: usize,
    /// Device-side adaptation time in ms: features, anchor reasoning and apply.
    pub adaptation_ms: f64,
    /// Of `adaptation_ms`, the forward pass that computes the window's frame features (a device
    /// serving that window computes them anyway).
    #[serde(default)]
    pub feature_ms: f64,
    /// Peak heap bytes the device allocated while adapting (when the binary counts them).
    #[serde(default)]
    pub adaptation_peak_bytes: Option<u64>,
    /// Why adaptation failed, if it did (the device kept its previous parameters).
    pub error: Option<String>,
}

/// Summary over devices.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetSummary {
    /// Devices evaluated.
    pub devices: usize,
    /// Devices whose data is shifted.
    pub shifted_devices: usize,
    /// Mean static accuracy over shifted devices.
    pub shifted_static_accuracy: f64,
    /// Mean adapted accuracy over shifted devices.
    pub shifted_adapted_accuracy: f64,
    /// Mean static accuracy over all devices.
    pub static_accuracy: f64,
    /// Mean adapted accuracy over all devices.
    pub adapted_accuracy: f64,
    /// Mean retrieval scores of the static model over devices that report them.
    pub static_retrieval: Option<RetrievalMetrics>,
    /// The same after adaptation.
    pub adapted_retrieval: Option<RetrievalMetrics>,
    /// Mean bytes up per adaptation.
    pub mean_bytes_up: f64,
    /// Mean bytes down per adaptation.
    pub mean_bytes_down: f64,
}

impl FleetSummary {
    /// Aggregates device reports.
    pub fn of(devices: &[DeviceReport]) -> Self {
        let mean = |xs: Vec<f64>| if xs.is_empty() { f64::NAN } else { xs.iter().sum::<f64>() / xs.len() as f64 };
        let shifted: Vec<&DeviceReport> = devices.iter().filter(|d| d.shifted).collect();
        Self {
            devices: devices.len(),
            shifted_devices: shifted.len(),
            shifted_static_accuracy: mean(shifted.iter().map(|d| d.static_accuracy).collect()),
            shifted_adapted_accuracy: mean(shifted.iter().map(|d| d.adapted_accuracy).collect()),
            static_accuracy: mean(devices.iter().map(|d| d.static_accuracy).collect()),
            adapted_accuracy: mean(devices.iter().map(|d| d.adapted_accuracy).collect()),
            static_retrieval: mean_retrieval(devices.iter().filter_map(|d| d.static_retrieval)),
            adapted_retrieval: mean_retrieval(devices.iter().filter_map(|d| d.adapted_retrieval)),
            mean_bytes_up: mean(devices.iter().map(|d| d.bytes_up as f64).collect()),
            mean_bytes_down: mean(devices.iter().map(|d| d.bytes_down as f64).collect()),
        }
    }
}

fn mean_retrieval(scores: impl Iterator<Item = RetrievalMetrics>) -> Option<RetrievalMetrics> {
    let scores: Vec<RetrievalMetrics> = scores.collect();
    let n = scores.len() as f64;
    let mean = |f: fn(&RetrievalMetrics) -> f64| scores.iter().map(f).sum::<f64>() / n;
    (!scores.is_empty()).then(|| RetrievalMetrics {
        r1: mean(|m| m.r1),
        r5: mean(|m| m.r5),
        r10: mean(|m| m.r10),
        median_rank: mean(|m| m.median_rank),
    })
}

/// The cloud's side of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CloudReport {
    /// Trainable parameters of the cloud model.
    pub model_parameters: usize,
    /// Trainable parameters of the generator.
    pub generator_parameters: usize,
    /// Dynamic parameters per device.
    pub slot_parameters: usize,
    /// Source domains trained on.
    pub source_domains: usize,
    /// Whether the models came from a checkpoint instead of training.
    pub from_checkpoint: bool,
    /// Model pretraining.
    pub pretrain: Option<TrainingLog>,
    /// Generator training.
    pub generator: Option<TrainingLog>,
    /// Wall time of one batched generation for the whole fleet, ms.
    pub generation_ms: f64,
}

/// Everything `mmpg run` measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    /// Deployment file.
    pub deployment: String,
    /// Seed.
    pub seed: u64,
    /// Backend description.
    pub backend: String,
    /// Plugins used, `kind = name`.
    pub plugins: Vec<(String, String)>,
    /// Cloud side.
    pub cloud: CloudReport,
    /// Per device.
    pub devices: Vec<DeviceReport>,
    /// Over the fleet.
    pub fleet: FleetSummary,
    /// Wall time of the whole run, s.
    pub seconds: f64,
}
