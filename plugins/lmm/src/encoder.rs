//! A pretrained, frozen frame encoder in front of the LMM: each frame through
//! EfficientNet-Lite0, up to where the model's FiLM slot modulates it — its pooled 1280-d
//! feature ([`FilmAt::Pooled`]), or the 192-channel map entering its last stage
//! ([`FilmAt::LastStage`], whose blocks and head then run in the model).
//!
//! Nothing the slots change flows back into what is encoded here, so it is computed once per
//! distinct frame and kept: the key is the SHA-256 of the frame's values (the image with its
//! corruption), and one encoder has one set of weights and one resolution, so those are fixed
//! per memo. Cloud training revisits frames; a device serves each once.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;

use burn::tensor::module::interpolate;
use burn::tensor::ops::{InterpolateMode, InterpolateOptions};
use burn::tensor::{Tensor, TensorData};
use mmpg_backends::{Backend, BurnDevice};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::efficientnet::{
    DEFAULT_WEIGHTS, EfficientNetError, EfficientNetLite0, EfficientNetTail, FEATURE_DIM, LAST_STAGE,
    LAST_STAGE_CHANNELS,
};

/// Where the FiLM slot modulates the pretrained network.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FilmAt {
    /// On the pooled 1280-d feature, through one linear layer: everything pretrained is cached.
    Pooled,
    /// Per channel on the 192-channel map entering the last stage: its block (k3, 192 → 320)
    /// and the head run on every pass, the rest is cached.
    LastStage,
}

/// `[model.settings.encoder]`: the pretrained frame encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct EncoderSettings {
    /// The network's weights (`scripts/fetch-data.sh` fetches them).
    pub weights: PathBuf,
    /// Frames are resized (bilinear) to this square size before the network, in pixels.
    pub resolution: usize,
    /// Memory the kept encodings may take, in MiB (a pooled feature is 5 KiB; a last-stage map
    /// at 64 pixels 3 KiB, at 512 pixels 192 KiB).
    pub memo_mib: usize,
    /// Where the FiLM slot modulates the network.
    pub film_at: FilmAt,
}

impl Default for EncoderSettings {
    fn default() -> Self {
        Self { weights: PathBuf::from(DEFAULT_WEIGHTS), resolution: 64, memo_mib: 1024, film_at: FilmAt::Pooled }
    }
}

/// Pixels encoded per forward pass (64 frames of 96×96, fewer at higher resolutions): bounds the
/// activations' memory.
const CHUNK_PIXELS: usize = 64 * 96 * 96;

/// EfficientNet-Lite0 with its memo.
pub struct FrameEncoder {
    net: EfficientNetLite0<Backend>,
    device: BurnDevice,
    settings: EncoderSettings,
    memo: Mutex<HashMap<[u8; 32], Vec<f32>>>,
}

impl std::fmt::Debug for FrameEncoder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FrameEncoder").field("settings", &self.settings).finish_non_exhaustive()
    }
}

impl FrameEncoder {
    /// The encoder on `device` (inference only).
    ///
    /// # Errors
    /// What [`EfficientNetLite0::load`] refuses.
    pub fn load(settings: EncoderSettings, device: &BurnDevice) -> Result<Self, EfficientNetError> {
        Ok(Self {
            net: EfficientNetLite0::load(&settings.weights, device)?,
            device: device.clone(),
            settings,
            memo: Mutex::new(HashMap::new()),
        })
    }

    /// Width of the pooled feature the model's linear layer reads (1280).
    pub fn dim(&self) -> usize {
        FEATURE_DIM
    }

    /// What [`Self::encode`] gives per frame: `[1280, 1, 1]` pooled, or the last stage's input
    /// map `[192, ⌈r/32⌉, ⌈r/32⌉]`.
    pub fn output_shape(&self) -> [usize; 3] {
        match self.settings.film_at {
            FilmAt::Pooled => [FEATURE_DIM, 1, 1],
            FilmAt::LastStage => {
                let side = self.settings.resolution.div_ceil(32);
                [LAST_STAGE_CHANNELS, side, side]
            }
        }
    }

    /// Channels the FiLM slot scales and shifts.
    pub fn film_channels(&self) -> Option<usize> {
        (self.settings.film_at == FilmAt::LastStage).then_some(LAST_STAGE_CHANNELS)
    }

    /// The network's part after the cached map, when the slot sits inside it.
    pub fn tail(&self) -> Option<EfficientNetTail<Backend>> {
        (self.settings.film_at == FilmAt::LastStage).then(|| self.net.tail(LAST_STAGE))
    }

    /// `frames` (`n` frames of `[c, h, w]` values in [0, 1], c = 1 grey or 3 RGB, flat) →
    /// `[n, …output_shape]`, flat.
    ///
    /// # Errors
    /// When the backend returns the features in another element type.
    pub fn encode(&self, frames: &[f32], n: usize, [c, h, w]: [usize; 3]) -> Result<Vec<f32>, String> {
        let size = c * h * w;
        let keys: Vec<[u8; 32]> = frames
            .chunks_exact(size)
            .map(|frame| {
                let mut hash = Sha256::new();
                frame.iter().for_each(|v| hash.update(v.to_le_bytes()));
                hash.finalize().into()
            })
            .collect();
        let mut memo = self.memo.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut missing: Vec<usize> = (0..n).filter(|i| !memo.contains_key(&keys[*i])).collect();
        // A frame repeated within the batch is encoded once.
        missing.sort_by_key(|i| keys[*i]);
        missing.dedup_by_key(|i| keys[*i]);
        let mut fresh: HashMap<[u8; 32], Vec<f32>> = HashMap::new();
        let r = self.settings.resolution.max(1);
        for chunk in missing.chunks((CHUNK_PIXELS / (r * r)).max(1)) {
            let values: Vec<f32> = chunk.iter().flat_map(|i| &frames[i * size..(i + 1) * size]).copied().collect();
            let features = self.features(values, chunk.len(), [c, h, w])?;
            let per_frame: usize = self.output_shape().iter().product();
            for (i, row) in chunk.iter().zip(features.chunks_exact(per_frame)) {
                fresh.insert(keys[*i], row.to_vec());
            }
        }
        let out: Vec<f32> =
            keys.iter().flat_map(|k| fresh.get(k).or_else(|| memo.get(k)).cloned().unwrap_or_default()).collect();
        let per_frame = 4 * self.output_shape().iter().product::<usize>() + 64;
        let capacity = (self.settings.memo_mib << 20) / per_frame;
        for (k, v) in fresh {
            if memo.len() >= capacity {
                break;
            }
            memo.insert(k, v);
        }
        Ok(out)
    }

    /// One pass: grey replicated to RGB, scaled to 0–255, resized, through the network.
    fn features(&self, values: Vec<f32>, n: usize, [c, h, w]: [usize; 3]) -> Result<Vec<f32>, String> {
        let x = Tensor::<Backend, 4>::from_data(TensorData::new(values, [n, c, h, w]), &self.device) * 255.0;
        let rgb = if c == 3 { x } else { x.repeat_dim(1, 3) };
        let r = self.settings.resolution;
        let resized = match (h, w) == (r, r) {
            true => rgb,
            false => interpolate(rgb, [r, r], InterpolateOptions::new(InterpolateMode::Bilinear)),
        };
        let out = match self.settings.film_at {
            FilmAt::Pooled => self.net.features(resized).into_data(),
            FilmAt::LastStage => self.net.map_before(resized, LAST_STAGE).into_data(),
        };
        out.to_vec::<f32>().map_err(|e| format!("frame features: {e:?}"))
    }
}
