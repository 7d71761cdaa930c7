//! Domain types of the multi-modal task: clips, domains, device identities.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::tensor::HostTensor;

/// One multi-modal sample: a short video, a question about it, a caption, and (on labelled
/// data only) the index of the answer in the task's answer vocabulary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Clip {
    /// Frames as `[T, C, H, W]`, values in `[0, 1]`.
    pub frames: HostTensor,
    /// A natural-language question about the clip.
    pub question: String,
    /// A caption describing the clip, for retrieval.
    pub caption: String,
    /// Index into [`TaskSpec::answers`]; `None` on unlabelled device streams.
    pub answer: Option<usize>,
    /// Where the clip's content comes from: ids of the source samples it was made of (a
    /// Fashion-MNIST photo, an annotated video, a synthetic scene before its corruption), unique
    /// within its data source across every split, so two clips that share an id share source
    /// material whatever their shift. Empty when unknown (a clip file, a camera). Tests use it to
    /// show that nothing the cloud trains on comes from a device's stream or test pool.
    #[serde(default)]
    pub provenance: Vec<u64>,
}

impl Clip {
    /// The same clip with its label removed, as a device sees it.
    pub fn unlabelled(&self) -> Clip {
        Clip { answer: None, ..self.clone() }
    }
}

/// A provenance id for source material named by bytes (a video's id, a scene's pixels): 64-bit
/// FNV-1a, stable across builds and platforms, so ids can be compared between processes.
pub fn provenance_id(bytes: impl IntoIterator<Item = u8>) -> u64 {
    bytes.into_iter().fold(0xcbf2_9ce4_8422_2325, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// Shape of the task a data source produces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskSpec {
    /// Answer vocabulary of open-ended QA, scored as classification.
    pub answers: Vec<String>,
    /// Frames per clip (T).
    pub frames_per_clip: usize,
    /// Frame shape `[C, H, W]`.
    pub frame_shape: [usize; 3],
}

impl TaskSpec {
    /// Bytes of one raw clip's frames at one byte per pixel channel (what a camera would send).
    pub fn raw_clip_bytes(&self) -> usize {
        self.frames_per_clip * self.frame_shape.iter().product::<usize>()
    }
}

/// A device's name within a deployment.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct DeviceId(pub String);

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// One distribution shift: a corruption kind at a severity 1..=5.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Shift {
    /// Kind, as the data source names it (e.g. `brightness`).
    pub kind: String,
    /// 1 (mild) ..= 5 (strong).
    pub severity: u8,
}

/// Everything that makes one device's (or one source domain's) data distribution its own.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DomainSpec {
    /// Human-readable name.
    pub name: String,
    /// Visual shifts applied together; empty for clean data.
    pub shifts: Vec<Shift>,
    /// Label shift: class mix drawn from Dirichlet(α); `None` for a uniform mix.
    pub class_mix_alpha: Option<f64>,
    /// Language shift: which family of phrasings the domain asks its questions with.
    pub phrasing: u32,
    /// Seed of everything random about the domain (class mix, streams).
    pub seed: u64,
}

impl DomainSpec {
    /// A clean domain with a uniform class mix.
    pub fn clean(name: impl Into<String>, seed: u64) -> Self {
        Self { name: name.into(), shifts: Vec::new(), class_mix_alpha: None, phrasing: 0, seed }
    }

    /// `brightness@5+noise@2`, `clean` when unshifted.
    pub fn shift_label(&self) -> String {
        if self.shifts.is_empty() {
            return "clean".into();
        }
        let parts: Vec<String> = self.shifts.iter().map(|s| format!("{}@{}", s.kind, s.severity)).collect();
        parts.join("+")
    }

    /// The strongest severity among the shifts (0 when clean).
    pub fn max_severity(&self) -> u8 {
        self.shifts.iter().map(|s| s.severity).max().unwrap_or(0)
    }
}

/// Which part of a domain's data to draw from. Splits never share samples.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Split {
    /// Labelled training data: all the cloud learns from (pretraining, the generator's episode
    /// windows and batches, the reset gate), and a device's own labelled pool for fine-tuning.
    Train,
    /// The device's unlabelled stream that ADR summarises; never drawn by the cloud.
    Stream,
    /// Held-out evaluation data.
    Test,
}

impl Split {
    /// A distinct stream id per split, mixed into seeds.
    pub fn stream_id(self) -> u64 {
        match self {
            Split::Train => 0x7261_696e,
            Split::Stream => 0x7374_7265,
            Split::Test => 0x7465_7374,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provenance_ids_are_fnv1a_64() {
        // The published FNV-1a test vectors: ids stay comparable across builds.
        assert_eq!(provenance_id(*b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(provenance_id(*b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(provenance_id(*b"foobar"), 0x8594_4171_f739_67e8);
    }
}
