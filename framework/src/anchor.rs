//! The device-side summary of an unlabelled window, and the trait of the reasoners that make it.

use serde::{Deserialize, Serialize};

use crate::tensor::{HostTensor, ShapeMismatch};

/// How anchor values are encoded for upload.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quantisation {
    /// 4 bytes per value, exact.
    F32,
    /// 2 bytes per value, IEEE half precision.
    F16,
    /// 1 byte per value, symmetric per-tensor scale.
    Int8,
}

impl Quantisation {
    /// Bytes per encoded value.
    pub fn bytes_per_value(self) -> usize {
        match self {
            Quantisation::F32 => 4,
            Quantisation::F16 => 2,
            Quantisation::Int8 => 1,
        }
    }

    /// The largest absolute error dequantisation may introduce on a value `x` of a tensor whose
    /// largest magnitude is `max_abs`. Used by tests and by receivers that check payloads.
    pub fn error_bound(self, x: f32, max_abs: f32) -> f32 {
        match self {
            Quantisation::F32 => 0.0,
            // Half precision has an 11-bit significand: relative error 2^-11, plus subnormals.
            Quantisation::F16 => x.abs() * 2f32.powi(-11) + 2f32.powi(-24),
            Quantisation::Int8 => max_abs / 127.0 * 0.5 + max_abs * f32::EPSILON * 4.0,
        }
    }
}

/// A tensor in its upload encoding.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuantisedTensor {
    /// Encoding of `bytes`.
    pub quantisation: Quantisation,
    /// Logical shape.
    pub shape: Vec<usize>,
    /// Little-endian encoded values.
    pub bytes: Vec<u8>,
    /// Int8 scale (value = q · scale); 1 for float encodings.
    pub scale: f32,
}

/// A quantised payload that does not decode.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QuantError {
    /// Byte count disagrees with shape and encoding.
    #[error("{quantisation:?} payload of shape {shape:?} needs {expected} bytes, found {found}")]
    Length {
        /// Encoding.
        quantisation: Quantisation,
        /// Declared shape.
        shape: Vec<usize>,
        /// Bytes the shape needs.
        expected: usize,
        /// Bytes present.
        found: usize,
    },
    /// The int8 scale is not a finite positive number.
    #[error("int8 scale must be finite and positive, found {0}")]
    BadScale(f32),
    /// Decoded values contain NaN or infinity.
    #[error("payload decodes to non-finite values")]
    NonFinite,
    /// Shape arithmetic failed.
    #[error(transparent)]
    Shape(#[from] ShapeMismatch),
}

impl QuantisedTensor {
    /// Encodes a tensor.
    pub fn quantise(tensor: &HostTensor, quantisation: Quantisation) -> Self {
        let values = tensor.values();
        let (bytes, scale) = match quantisation {
            Quantisation::F32 => (values.iter().flat_map(|v| v.to_le_bytes()).collect(), 1.0),
            Quantisation::F16 => (values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(), 1.0),
            Quantisation::Int8 => {
                let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let scale = if max_abs > 0.0 { max_abs / 127.0 } else { 1.0 };
                let bytes = values.iter().map(|v| ((v / scale).round().clamp(-127.0, 127.0) as i8) as u8).collect();
                (bytes, scale)
            }
        };
        Self { quantisation, shape: tensor.shape().to_vec(), bytes, scale }
    }

    /// Decodes, checking length, scale and finiteness: payloads come from peers.
    pub fn dequantise(&self) -> Result<HostTensor, QuantError> {
        let n: usize = self.shape.iter().product();
        let expected = n.saturating_mul(self.quantisation.bytes_per_value());
        if self.bytes.len() != expected {
            return Err(QuantError::Length {
                quantisation: self.quantisation,
                shape: self.shape.clone(),
                expected,
                found: self.bytes.len(),
            });
        }
        let values: Vec<f32> = match self.quantisation {
            Quantisation::F32 => crate::tensor::f32s_from_le_bytes(&self.bytes),
            Quantisation::F16 => {
                self.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Quantisation::Int8 => {
                if !(self.scale.is_finite() && self.scale > 0.0) {
                    return Err(QuantError::BadScale(self.scale));
                }
                self.bytes.iter().map(|b| f32::from(*b as i8) * self.scale).collect()
            }
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite);
        }
        Ok(HostTensor::new(self.shape.clone(), values)?)
    }
}

/// Per-dimension statistics of the cloud's source features, shipped with the model so that
/// devices standardise their anchors into the space the generator was trained on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureStats {
    /// Mean per feature dimension.
    pub mean: Vec<f32>,
    /// Standard deviation per feature dimension (floored above zero).
    pub std: Vec<f32>,
}

impl FeatureStats {
    /// Statistics of the rows of a `[n, d]` tensor; the std is floored at `1e-4`.
    pub fn of_rows(features: &HostTensor) -> Option<Self> {
        let rows = features.rows()?;
        let d = features.shape()[1];
        let n = features.shape()[0].max(1) as f64;
        let mut mean = vec![0f64; d];
        let mut sq = vec![0f64; d];
        for row in rows {
            for (j, v) in row.iter().enumerate() {
                mean[j] += f64::from(*v);
                sq[j] += f64::from(*v) * f64::from(*v);
            }
        }
        let mean: Vec<f64> = mean.iter().map(|m| m / n).collect();
        let std = sq.iter().zip(&mean).map(|(s, m)| ((s / n - m * m).max(0.0)).sqrt().max(1e-4));
        Some(Self { mean: mean.iter().map(|m| *m as f32).collect(), std: std.map(|s| s as f32).collect() })
    }

    /// Feature dimension.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// `(x − mean) / std`, row by row, for a `[n, d]` tensor with `d` = [`Self::dim`].
    pub fn standardise(&self, features: &HostTensor) -> Result<HostTensor, AnchorError> {
        let rows = features
            .rows()
            .filter(|_| features.shape()[1] == self.dim())
            .ok_or_else(|| AnchorError::FeatureShape { expected_dim: self.dim(), found: features.shape().to_vec() })?;
        let values =
            rows.flat_map(|row| row.iter().zip(&self.mean).zip(&self.std).map(|((x, m), s)| (x - m) / s)).collect();
        Ok(HostTensor::new(features.shape().to_vec(), values)?)
    }
}

/// What a device uploads instead of its raw window: a few standardised anchor frames, the
/// first two moments of the whole window, and counts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AnchorSummary {
    /// `[K, d]` standardised anchor features, quantised.
    pub anchors: QuantisedTensor,
    /// Mean of all standardised window features, `[d]`.
    pub mean: Vec<f32>,
    /// Variance of all standardised window features, `[d]`.
    pub var: Vec<f32>,
    /// Frames in the window.
    pub frames: u32,
    /// Clips in the window.
    pub clips: u32,
    /// `[Kt, e]` question embeddings of the window (text-side anchors), quantised like the
    /// frame anchors; absent when the reasoner or the model does not provide them.
    #[serde(default)]
    pub text_anchors: Option<QuantisedTensor>,
}

impl AnchorSummary {
    /// Feature dimension d.
    pub fn dim(&self) -> usize {
        self.mean.len()
    }

    /// Number of anchors K.
    pub fn anchor_count(&self) -> usize {
        self.anchors.shape.first().copied().unwrap_or(0)
    }

    /// Checks internal consistency of a summary received from a peer and decodes its anchors.
    pub fn decoded_anchors(&self) -> Result<HostTensor, AnchorError> {
        let d = self.dim();
        if self.var.len() != d || self.anchors.shape.len() != 2 || self.anchors.shape[1] != d {
            return Err(AnchorError::FeatureShape { expected_dim: d, found: self.anchors.shape.clone() });
        }
        if self.anchor_count() == 0 {
            return Err(AnchorError::Empty);
        }
        if self.mean.iter().chain(&self.var).any(|v| !v.is_finite()) || self.var.iter().any(|v| *v < 0.0) {
            return Err(AnchorError::BadMoments);
        }
        Ok(self.anchors.dequantise()?)
    }

    /// Decodes the text-side anchors, if any, checking they are a non-empty `[Kt, e]` matrix.
    pub fn decoded_text_anchors(&self) -> Result<Option<HostTensor>, AnchorError> {
        let Some(text) = &self.text_anchors else { return Ok(None) };
        if text.shape.len() != 2 || text.shape[0] == 0 || text.shape[1] == 0 {
            return Err(AnchorError::TextShape(text.shape.clone()));
        }
        Ok(Some(text.dequantise()?))
    }
}

/// Why a window could not be summarised or a summary could not be read.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AnchorError {
    /// Features are not `[n, d]` with the expected d.
    #[error("expected features of shape [n, {expected_dim}], found {found:?}")]
    FeatureShape {
        /// Dimension of the reference statistics.
        expected_dim: usize,
        /// Shape received.
        found: Vec<usize>,
    },
    /// The window has no frames, or the summary no anchors.
    #[error("nothing to summarise: the window is empty")]
    Empty,
    /// The reasoner picked a row that is not in the window.
    #[error("selection picked row {index} of a window of {rows} frames")]
    Selection {
        /// The picked row.
        index: usize,
        /// Rows in the window.
        rows: usize,
    },
    /// Text anchors are not a non-empty matrix.
    #[error("text anchors must be a non-empty [Kt, e] matrix, found {0:?}")]
    TextShape(Vec<usize>),
    /// Moments are non-finite or negative variances.
    #[error("summary moments are non-finite or negative")]
    BadMoments,
    /// The anchor payload does not decode.
    #[error("anchor payload: {0}")]
    Payload(#[from] QuantError),
    /// Shape arithmetic failed.
    #[error(transparent)]
    Shape(#[from] ShapeMismatch),
}

/// The device-side reasoner that picks anchor frames. Implementors choose which rows of a
/// standardised `[n, d]` feature matrix to keep and how to encode them; standardising,
/// computing moments, gathering and quantising are provided.
pub trait AnchorReasoner: Send + Sync {
    /// Indices (into the rows of `standardised`) of the anchors to upload. `seed` makes
    /// randomised strategies reproducible.
    fn select(&self, standardised: &HostTensor, seed: u64) -> Result<Vec<usize>, AnchorError>;

    /// Encoding of the uploaded anchors.
    fn quantisation(&self) -> Quantisation;

    /// Summarises one window of frame features `[n, d]` from `clips` clips.
    fn summarise(
        &self,
        features: &HostTensor,
        reference: &FeatureStats,
        clips: usize,
        seed: u64,
    ) -> Result<AnchorSummary, AnchorError> {
        let standardised = reference.standardise(features)?;
        let n = standardised.shape()[0];
        if n == 0 {
            return Err(AnchorError::Empty);
        }
        let d = reference.dim();
        let picked = self.select(&standardised, seed)?;
        if picked.is_empty() {
            return Err(AnchorError::Empty);
        }
        if let Some(index) = picked.iter().copied().find(|i| *i >= n) {
            return Err(AnchorError::Selection { index, rows: n });
        }
        let values = standardised.values();
        let gathered: Vec<f32> = picked.iter().flat_map(|i| values[i * d..(i + 1) * d].iter().copied()).collect();
        let anchors = HostTensor::new(vec![picked.len(), d], gathered)?;
        let stats = FeatureStats::of_rows(&standardised).ok_or(AnchorError::Empty)?;
        Ok(AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, self.quantisation()),
            mean: stats.mean,
            var: stats.std.iter().map(|s| s * s).collect(),
            frames: u32::try_from(n).unwrap_or(u32::MAX),
            clips: u32::try_from(clips).unwrap_or(u32::MAX),
            text_anchors: None,
        })
    }

    /// Text-side anchors uploaded beside the frame anchors (0: none).
    fn text_anchor_count(&self) -> usize {
        0
    }

    /// Picks [`AnchorReasoner::text_anchor_count`] rows of the window's `[n, e]` question
    /// embeddings with the reasoner's own strategy (its first picks) and encodes them; `None`
    /// when the reasoner sends no text anchors.
    fn summarise_text(&self, text_features: &HostTensor, seed: u64) -> Result<Option<QuantisedTensor>, AnchorError> {
        let k = self.text_anchor_count();
        if k == 0 {
            return Ok(None);
        }
        let [n, e] = text_features.shape() else {
            return Err(AnchorError::TextShape(text_features.shape().to_vec()));
        };
        let (n, e) = (*n, *e);
        if n == 0 || e == 0 {
            return Err(AnchorError::Empty);
        }
        let mut picked = self.select(text_features, seed)?;
        picked.truncate(k);
        if let Some(index) = picked.iter().copied().find(|i| *i >= n) {
            return Err(AnchorError::Selection { index, rows: n });
        }
        let values = text_features.values();
        let gathered: Vec<f32> = picked.iter().flat_map(|i| values[i * e..(i + 1) * e].iter().copied()).collect();
        let anchors = HostTensor::new(vec![picked.len(), e], gathered)?;
        Ok(Some(QuantisedTensor::quantise(&anchors, self.quantisation())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn dequantised_values_stay_within_the_error_bound(
            values in prop::collection::vec(-50f32..50f32, 1..200),
            q in prop_oneof![Just(Quantisation::F32), Just(Quantisation::F16), Just(Quantisation::Int8)],
        ) {
            let t = HostTensor::new(vec![values.len()], values.clone()).expect("1-D");
            let back = QuantisedTensor::quantise(&t, q).dequantise().expect("own encoding decodes");
            let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in values.iter().zip(back.values()) {
                prop_assert!((x - y).abs() <= q.error_bound(*x, max_abs), "{q:?}: {x} -> {y}");
            }
        }

        #[test]
        fn truncated_payloads_are_rejected(values in prop::collection::vec(-1f32..1f32, 2..50), cut in 1usize..8) {
            let t = HostTensor::new(vec![values.len()], values).expect("1-D");
            let mut q = QuantisedTensor::quantise(&t, Quantisation::F16);
            let keep = q.bytes.len().saturating_sub(cut);
            q.bytes.truncate(keep);
            let rejected = matches!(q.dequantise(), Err(QuantError::Length { .. }));
            prop_assert!(rejected);
        }
    }

    #[test]
    fn standardise_uses_reference_statistics() {
        let stats = FeatureStats { mean: vec![1.0, -1.0], std: vec![2.0, 0.5] };
        let x = HostTensor::new(vec![1, 2], vec![3.0, 0.0]).expect("fits");
        assert_eq!(stats.standardise(&x).expect("d matches").values(), &[1.0, 2.0]);
        let wrong = HostTensor::new(vec![1, 3], vec![0.0; 3]).expect("fits");
        assert!(stats.standardise(&wrong).is_err());
    }
}

#[cfg(test)]
mod selection_tests {
    use super::*;

    /// A reasoner that returns whatever rows it was built with.
    struct Fixed(Vec<usize>);

    impl AnchorReasoner for Fixed {
        fn select(&self, _standardised: &HostTensor, _seed: u64) -> Result<Vec<usize>, AnchorError> {
            Ok(self.0.clone())
        }

        fn quantisation(&self) -> Quantisation {
            Quantisation::F32
        }
    }

    #[test]
    fn a_selection_outside_the_window_is_named() {
        let reference = FeatureStats { mean: vec![0.0], std: vec![1.0] };
        let window = HostTensor::new(vec![2, 1], vec![0.5, -0.5]).expect("fits");
        assert_eq!(
            Fixed(vec![0, 7]).summarise(&window, &reference, 1, 0),
            Err(AnchorError::Selection { index: 7, rows: 2 })
        );
        assert_eq!(Fixed(vec![]).summarise(&window, &reference, 1, 0), Err(AnchorError::Empty));
    }
}
