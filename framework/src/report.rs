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
    /// QA accuracy of the static cloud model on the device's held-out clips; NaN (JSON `null`)
    /// when none of them is scored.
    #[serde(deserialize_with = "null_as_nan")]
    pub static_accuracy: f64,
    /// QA accuracy after applying the generated parameters (equal to static if refused).
    #[serde(deserialize_with = "null_as_nan")]
    pub adapted_accuracy: f64,
    /// Held-out clips the accuracies are over: those with an answer in the model's vocabulary.
    #[serde(default)]
    pub scored_clips: usize,
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
    /// Device-side time adaptation adds to serving, in ms: anchor reasoning (selection,
    /// standardisation, quantisation, privacy), the request, validate and install.
    pub adaptation_ms: f64,
    /// The serving forward pass over the window, in ms: answers, and the frame and question
    /// features the summary reuses. Not part of `adaptation_ms`: a serving device runs it anyway.
    #[serde(default, alias = "feature_ms")]
    pub serving_ms: f64,
    /// Peak heap bytes the device allocated while adapting (when the binary counts them).
    #[serde(default)]
    pub adaptation_peak_bytes: Option<u64>,
    /// Why adaptation failed, if it did (the device kept its previous parameters).
    pub error: Option<String>,
    /// What the device had to change to adapt at all, e.g. anchor values saturated by their
    /// encoding.
    #[serde(default)]
    pub warning: Option<String>,
    /// Mean entropy (nats) of the static model's answers over the device's unlabelled window
    /// ([`crate::DeviceModel::answer_entropy`]): what `mmpg device` reports where no clip is
    /// labelled (a video file).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub static_entropy: Option<f64>,
    /// The same with the installed parameters, after the last adaptation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapted_entropy: Option<f64>,
    /// Differential privacy the device's private summaries spent (none sent: `None`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<crate::privacy::PrivacySpent>,
}

/// JSON has no NaN: serde_json writes it as `null`; read it back as NaN.
pub fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

/// Mean of the finite values (NaN when there are none): a device without scored clips has no
/// accuracy and does not count as 0.
pub fn finite_mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.filter(|v| v.is_finite()).fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
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
        let mean = |xs: Vec<f64>| finite_mean(xs.into_iter());
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
    /// Wall time of one batched generation for the whole fleet, ms; NaN (JSON `null`) for a
    /// fleet of processes, whose cloud generates per request (see its `/metrics`).
    #[serde(deserialize_with = "null_as_nan")]
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

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, shifted: bool, static_accuracy: f64, adapted_accuracy: f64, scored: usize) -> DeviceReport {
        DeviceReport {
            device: name.into(),
            shift: "blur@2".into(),
            severity: 2,
            class_mix_alpha: None,
            shifted,
            static_accuracy,
            adapted_accuracy,
            scored_clips: scored,
            static_retrieval: None,
            adapted_retrieval: None,
            bytes_up: 10,
            bytes_down: 20,
            raw_window_bytes: 0,
            anchors: 1,
            adaptation_ms: 0.0,
            serving_ms: 0.0,
            adaptation_peak_bytes: None,
            error: None,
            warning: None,
            static_entropy: None,
            adapted_entropy: None,
            privacy: None,
        }
    }

    #[test]
    fn a_device_without_scored_clips_has_no_accuracy_and_does_not_count_as_zero() {
        // Issue 10: such a device showed 0.0% and pulled the fleet's mean down.
        let devices = [device("a", true, 0.5, 0.75, 8), device("b", true, f64::NAN, f64::NAN, 0)];
        let fleet = FleetSummary::of(&devices);
        assert_eq!((fleet.devices, fleet.shifted_devices), (2, 2));
        assert_eq!((fleet.shifted_static_accuracy, fleet.shifted_adapted_accuracy), (0.5, 0.75));
        assert_eq!((fleet.static_accuracy, fleet.adapted_accuracy), (0.5, 0.75));
        // Written as JSON null and read back as NaN, with the clip count beside it.
        let json = serde_json::to_string(&devices[1]).expect("serialises");
        assert!(json.contains("\"static_accuracy\":null") && json.contains("\"scored_clips\":0"), "{json}");
        let back: DeviceReport = serde_json::from_str(&json).expect("reads back");
        assert!(back.static_accuracy.is_nan() && back.adapted_accuracy.is_nan());
    }

    #[test]
    fn a_fleet_of_no_scored_device_has_no_mean() {
        let fleet = FleetSummary::of(&[device("b", false, f64::NAN, f64::NAN, 0)]);
        assert!(fleet.static_accuracy.is_nan() && fleet.adapted_accuracy.is_nan());
        assert!(fleet.shifted_static_accuracy.is_nan());
    }
}
