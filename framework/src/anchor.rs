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

    /// The largest magnitude the encoding represents, when it has a fixed range: ±65504 for
    /// f16. `None` for f32 (every finite value) and int8 (its scale follows the tensor).
    pub fn max_value(self) -> Option<f32> {
        match self {
            Quantisation::F16 => Some(half::f16::MAX.to_f32()),
            Quantisation::F32 | Quantisation::Int8 => None,
        }
    }

    /// The largest absolute error dequantisation may introduce on a finite value `x` within
    /// [`Self::max_value`] of a tensor whose largest magnitude is `max_abs`. Values beyond the
    /// range saturate at it instead. Used by tests and by receivers that check payloads.
    pub fn error_bound(self, x: f32, max_abs: f32) -> f32 {
        match self {
            Quantisation::F32 => 0.0,
            // Half precision has an 11-bit significand: relative error 2^-11, plus subnormals.
            Quantisation::F16 => x.abs() * 2f32.powi(-11) + 2f32.powi(-24),
            // Half a step of the scale, rounding of the scale itself, and half of the smallest
            // scale used (for tensors so small that max_abs / 127 is not a normal number).
            Quantisation::Int8 => max_abs / 127.0 * 0.5 + max_abs * f32::EPSILON * 4.0 + INT8_MIN_SCALE * 0.5,
        }
    }
}

impl std::fmt::Display for Quantisation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Quantisation::F32 => "f32",
            Quantisation::F16 => "f16",
            Quantisation::Int8 => "int8",
        })
    }
}

/// The smallest int8 scale: a normal number, so that a tensor of tiny values keeps a scale
/// the decoder accepts (finite, positive) and that divides without losing precision.
const INT8_MIN_SCALE: f32 = f32::MIN_POSITIVE;

/// A tensor in its upload encoding. Its parts always agree: `bytes` holds exactly
/// `product(shape) · bytes_per_value` bytes and the scale is valid for the encoding, so it
/// always serialises; values are checked for finiteness when dequantised.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(try_from = "QuantisedParts", into = "QuantisedParts")]
pub struct QuantisedTensor {
    quantisation: Quantisation,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    scale: f32,
    /// Values the encoder clamped into range; local to the encoding side (not serialised).
    saturated: usize,
}

/// Equality of the encoded content; the encoder-side saturation count is not compared, so a
/// tensor equals its decoded copy from a peer.
impl PartialEq for QuantisedTensor {
    fn eq(&self, other: &Self) -> bool {
        self.quantisation == other.quantisation
            && self.shape == other.shape
            && self.bytes == other.bytes
            && self.scale.to_bits() == other.scale.to_bits()
    }
}

/// The serialised form of a [`QuantisedTensor`], validated on the way in.
#[derive(Serialize, Deserialize)]
#[serde(rename = "QuantisedTensor")]
struct QuantisedParts {
    quantisation: Quantisation,
    shape: Vec<usize>,
    bytes: Vec<u8>,
    scale: f32,
}

impl TryFrom<QuantisedParts> for QuantisedTensor {
    type Error = QuantError;

    fn try_from(p: QuantisedParts) -> Result<Self, QuantError> {
        Self::from_parts(p.quantisation, p.shape, p.bytes, p.scale)
    }
}

impl From<QuantisedTensor> for QuantisedParts {
    fn from(t: QuantisedTensor) -> Self {
        Self { quantisation: t.quantisation, shape: t.shape, bytes: t.bytes, scale: t.scale }
    }
}

/// Why a tensor cannot be quantised, or quantised parts do not form a tensor.
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
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
    /// The shape's byte count does not fit in memory (`usize` overflow).
    #[error("{quantisation:?} payload of shape {shape:?} has more bytes than fit in memory")]
    TooLarge {
        /// Encoding.
        quantisation: Quantisation,
        /// Declared shape.
        shape: Vec<usize>,
    },
    /// The scale is not valid for the encoding: int8 needs a finite positive scale, float
    /// encodings exactly 1.
    #[error("{quantisation:?} scale {scale} is invalid: int8 needs a finite positive scale, f32 and f16 exactly 1")]
    BadScale {
        /// Encoding.
        quantisation: Quantisation,
        /// The scale found.
        scale: f32,
    },
    /// Decoded values contain NaN or infinity.
    #[error("payload decodes to non-finite values")]
    NonFinite,
    /// The tensor to encode holds NaN or infinity, which no encoding carries as a valid value.
    #[error("cannot quantise a non-finite value ({value}) at flat index {index}")]
    NonFiniteInput {
        /// Flat index of the first non-finite value.
        index: usize,
        /// The value.
        value: f32,
    },
    /// Shape arithmetic failed.
    #[error(transparent)]
    Shape(#[from] ShapeMismatch),
}

impl QuantisedTensor {
    /// Encodes a finite tensor. Values beyond the encoding's range ([`Quantisation::max_value`],
    /// ±65504 for f16) saturate at it rather than becoming infinities;
    /// [`QuantisedTensor::saturated`] counts them.
    ///
    /// # Errors
    /// [`QuantError::NonFiniteInput`] if any value is NaN or infinite.
    pub fn quantise(tensor: &HostTensor, quantisation: Quantisation) -> Result<Self, QuantError> {
        let values = tensor.values();
        if let Some((index, value)) = values.iter().copied().enumerate().find(|(_, v)| !v.is_finite()) {
            return Err(QuantError::NonFiniteInput { index, value });
        }
        let (bytes, scale, saturated) = match quantisation {
            Quantisation::F32 => (values.iter().flat_map(|v| v.to_le_bytes()).collect(), 1.0, 0),
            Quantisation::F16 => {
                let max = half::f16::MAX.to_f32();
                let saturated = values.iter().filter(|v| v.abs() > max).count();
                let bytes = values.iter().flat_map(|v| half::f16::from_f32(v.clamp(-max, max)).to_le_bytes()).collect();
                (bytes, 1.0, saturated)
            }
            Quantisation::Int8 => {
                let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
                let mut scale = (max_abs / 127.0).max(INT8_MIN_SCALE);
                // Near f32::MAX, 127 · scale can round past the largest finite value.
                if (scale * 127.0).is_infinite() {
                    scale = scale.next_down();
                }
                let mut saturated = 0;
                let bytes = values
                    .iter()
                    .map(|v| {
                        let q = (v / scale).round();
                        if q.abs() > 127.0 {
                            saturated += 1;
                        }
                        // Clamped to ±127 first, so the cast is exact.
                        (q.clamp(-127.0, 127.0) as i8).to_le_bytes()[0]
                    })
                    .collect();
                (bytes, scale, saturated)
            }
        };
        Ok(Self { quantisation, shape: tensor.shape().to_vec(), bytes, scale, saturated })
    }

    /// Assembles a tensor from its encoded parts (e.g. read from a peer): `bytes` holds
    /// `product(shape) · bytes_per_value` little-endian values; `scale` is the int8 scale
    /// (value = q · scale), exactly 1 for float encodings.
    ///
    /// # Errors
    /// [`QuantError::TooLarge`] if the byte count overflows `usize`, [`QuantError::Length`] if
    /// `bytes` has another length, [`QuantError::BadScale`] for an invalid scale. Values are
    /// not decoded here: [`QuantisedTensor::dequantise`] checks their finiteness.
    pub fn from_parts(
        quantisation: Quantisation,
        shape: Vec<usize>,
        bytes: Vec<u8>,
        scale: f32,
    ) -> Result<Self, QuantError> {
        let expected = shape
            .iter()
            .try_fold(1usize, |n, d| n.checked_mul(*d))
            .and_then(|n| n.checked_mul(quantisation.bytes_per_value()));
        let Some(expected) = expected else { return Err(QuantError::TooLarge { quantisation, shape }) };
        if bytes.len() != expected {
            return Err(QuantError::Length { quantisation, shape, expected, found: bytes.len() });
        }
        let scale_ok = match quantisation {
            Quantisation::Int8 => scale.is_finite() && scale > 0.0,
            Quantisation::F32 | Quantisation::F16 => scale == 1.0,
        };
        if !scale_ok {
            return Err(QuantError::BadScale { quantisation, scale });
        }
        Ok(Self { quantisation, shape, bytes, scale, saturated: 0 })
    }

    /// Encoding of [`Self::bytes`].
    pub fn quantisation(&self) -> Quantisation {
        self.quantisation
    }

    /// Logical shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// Little-endian encoded values, `product(shape) · bytes_per_value` bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.bytes
    }

    /// Int8 scale (value = q · scale); 1 for float encodings.
    pub fn scale(&self) -> f32 {
        self.scale
    }

    /// How many values [`QuantisedTensor::quantise`] clamped into the encoding's range. Known
    /// only where the tensor was encoded: 0 for one assembled from parts (the wire does not
    /// carry it).
    pub fn saturated(&self) -> usize {
        self.saturated
    }

    /// Decodes to `shape` f32 values.
    ///
    /// # Errors
    /// [`QuantError::NonFinite`] if a value decodes to NaN or infinity (payloads come from
    /// peers: an f16 or f32 payload can hold them, an int8 scale can overflow).
    pub fn dequantise(&self) -> Result<HostTensor, QuantError> {
        let values: Vec<f32> = match self.quantisation {
            Quantisation::F32 => crate::tensor::f32s_from_le_bytes(&self.bytes),
            Quantisation::F16 => {
                self.bytes.chunks_exact(2).map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32()).collect()
            }
            Quantisation::Int8 => self.bytes.iter().map(|b| f32::from(i8::from_le_bytes([*b])) * self.scale).collect(),
        };
        if values.iter().any(|v| !v.is_finite()) {
            return Err(QuantError::NonFinite);
        }
        Ok(HostTensor::new(self.shape.clone(), values)?)
    }
}

/// Anchor values an encoder clamped into its range on one device: the report shows it
/// (e.g. "12 anchor values saturated at ±65504 (f16)").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Saturation {
    /// Values clamped, frame and text anchors together.
    pub values: usize,
    /// The magnitude they were clamped to.
    pub bound: f32,
    /// The encoding.
    pub quantisation: Quantisation,
}

impl std::fmt::Display for Saturation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let plural = if self.values == 1 { "" } else { "s" };
        write!(f, "{} anchor value{plural} saturated at ±{} ({})", self.values, self.bound, self.quantisation)
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
    /// What the upload costs in differential privacy when the device made it private
    /// ([`crate::privacy`]); `None` for a summary sent as computed.
    #[serde(default)]
    pub privacy: Option<crate::privacy::PrivacyCost>,
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

    /// Anchor values (frame and text) the device's encoder clamped into the encoding's range,
    /// or `None` if none were. Known only on the device that encoded the summary.
    pub fn saturation(&self) -> Option<Saturation> {
        let values = self.anchors.saturated() + self.text_anchors.as_ref().map_or(0, QuantisedTensor::saturated);
        let quantisation = self.anchors.quantisation;
        let bound = quantisation.max_value()?;
        (values > 0).then_some(Saturation { values, bound, quantisation })
    }

    /// Checks internal consistency of a summary received from a peer and decodes its anchors.
    pub fn decoded_anchors(&self) -> Result<HostTensor, AnchorError> {
        // The anchors are `[K, d]`; each moment must then have d values. Each disagreement names
        // the tensor at fault, not the anchors for a moment's length.
        if self.anchors.shape.len() != 2 {
            return Err(AnchorError::FeatureShape { expected_dim: self.dim(), found: self.anchors.shape.clone() });
        }
        let d = self.anchors.shape[1];
        for (tensor, values) in [("mean", &self.mean), ("var", &self.var)] {
            if values.len() != d {
                return Err(AnchorError::MomentLength { tensor: tensor.into(), expected: d, found: values.len() });
            }
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
#[derive(Debug, Clone, PartialEq, thiserror::Error, Serialize, Deserialize)]
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
    /// A standardised feature is NaN or infinite (the device's features, or a value so far
    /// from the reference that standardising overflows f32).
    #[error("standardised feature at row {row}, column {column} is not finite")]
    NonFiniteFeature {
        /// Frame (row of the window).
        row: usize,
        /// Feature dimension.
        column: usize,
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
    /// A plugin library's anchor reasoner failed at the boundary (it panicked, or its answer
    /// did not decode); the message names the plugin and its library.
    #[error("{0}")]
    Plugin(String),
    /// A moment tensor (`mean` or `var`) whose length is not the anchors' feature dimension.
    #[error("summary `{tensor}` has {found} values; the anchors have {expected} features")]
    MomentLength {
        /// `mean` or `var`.
        tensor: String,
        /// The anchors' feature dimension d.
        expected: usize,
        /// Its length.
        found: usize,
    },
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

    /// Summarises one window of frame features `[n, d]` from `clips` clips. Standardised anchor
    /// values beyond the encoding's range saturate ([`AnchorSummary::saturation`] counts them).
    ///
    /// # Errors
    /// [`AnchorError::FeatureShape`] if the features are not `[n, reference.dim()]`,
    /// [`AnchorError::Empty`] for an empty window or selection, [`AnchorError::NonFiniteFeature`]
    /// for a NaN or infinite standardised value, [`AnchorError::Selection`] for a pick outside
    /// the window.
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
        // Checked before selection: distances over NaN would make any selection meaningless.
        if let Some(i) = standardised.values().iter().position(|v| !v.is_finite()) {
            return Err(AnchorError::NonFiniteFeature { row: i / d, column: i % d });
        }
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
            anchors: QuantisedTensor::quantise(&anchors, self.quantisation())?,
            mean: stats.mean,
            var: stats.std.iter().map(|s| s * s).collect(),
            frames: u32::try_from(n).unwrap_or(u32::MAX),
            clips: u32::try_from(clips).unwrap_or(u32::MAX),
            text_anchors: None,
            privacy: None,
        })
    }

    /// The Gaussian mechanism applied to every summary before it leaves the device, if any
    /// (see [`crate::privacy`]); `None` by default.
    fn privacy(&self) -> Option<crate::privacy::SummaryPrivacy> {
        None
    }

    /// How many anchors this reasoner picks from a window of `frames` rows whatever their
    /// values, when that is fixed by its settings; `None` (the default) when it depends on the
    /// content. Private summaries pad to it, so the count discloses nothing.
    fn anchor_count(&self, _frames: usize) -> Option<usize> {
        None
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
        Ok(Some(QuantisedTensor::quantise(&anchors, self.quantisation())?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 28: a summary whose `mean` has the wrong length was reported as an anchors shape
    /// error. The tensor at fault is named.
    #[test]
    fn a_moment_of_the_wrong_length_is_named() {
        let anchors = QuantisedTensor::from_parts(Quantisation::F32, vec![1, 2], vec![0; 8], 1.0).expect("anchors");
        let summary = |mean: usize, var: usize| AnchorSummary {
            anchors: anchors.clone(),
            mean: vec![0.0; mean],
            var: vec![1.0; var],
            frames: 1,
            clips: 1,
            text_anchors: None,
            privacy: None,
        };
        let err = summary(3, 2).decoded_anchors().expect_err("refused");
        assert_eq!(err, AnchorError::MomentLength { tensor: "mean".into(), expected: 2, found: 3 });
        assert!(err.to_string().starts_with("summary `mean` has 3 values"), "{err}");
        let err = summary(2, 1).decoded_anchors().expect_err("refused");
        assert!(matches!(err, AnchorError::MomentLength { ref tensor, .. } if tensor == "var"), "{err}");
        assert!(summary(2, 2).decoded_anchors().is_ok());
    }
    use proptest::prelude::*;

    const ALL: [Quantisation; 3] = [Quantisation::F32, Quantisation::F16, Quantisation::Int8];

    /// Any finite f32, weighted towards the interesting places: f16's range edge, tiny and
    /// subnormal values, the ends of f32.
    fn finite() -> impl Strategy<Value = f32> {
        prop_oneof![
            3 => -50f32..50f32,
            2 => -70_000f32..70_000f32,
            1 => 65_000f32..66_000f32,
            1 => prop::num::f32::NORMAL | prop::num::f32::SUBNORMAL | prop::num::f32::ZERO,
            1 => prop_oneof![Just(f32::MAX), Just(f32::MIN), Just(f32::MIN_POSITIVE), Just(-f32::from_bits(1))],
        ]
    }

    proptest! {
        #[test]
        fn dequantised_values_stay_within_the_error_bound(
            values in prop::collection::vec(-50f32..50f32, 1..200),
            q in prop_oneof![Just(Quantisation::F32), Just(Quantisation::F16), Just(Quantisation::Int8)],
        ) {
            let t = HostTensor::new(vec![values.len()], values.clone()).expect("1-D");
            let back = QuantisedTensor::quantise(&t, q).expect("finite").dequantise().expect("own encoding decodes");
            let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            for (x, y) in values.iter().zip(back.values()) {
                prop_assert!((x - y).abs() <= q.error_bound(*x, max_abs), "{q:?}: {x} -> {y}");
            }
        }

        #[test]
        fn any_finite_input_round_trips_finite_within_the_bound_or_saturated(
            values in prop::collection::vec(finite(), 1..64),
            q in prop::sample::select(ALL.to_vec()),
        ) {
            let t = HostTensor::new(vec![values.len()], values.clone()).expect("1-D");
            let encoded = QuantisedTensor::quantise(&t, q).expect("finite input quantises");
            let back = encoded.dequantise().expect("own encoding decodes to finite values");
            prop_assert_eq!(back.shape(), t.shape());
            let max_abs = values.iter().fold(0f32, |m, v| m.max(v.abs()));
            let mut beyond = 0;
            for (x, y) in values.iter().zip(back.values()) {
                prop_assert!(y.is_finite(), "{q:?}: {x} -> {y}");
                match q.max_value() {
                    Some(bound) if x.abs() > bound => {
                        beyond += 1;
                        prop_assert_eq!(*y, bound.copysign(*x), "{:?}: {} must saturate", q, x);
                    }
                    _ => prop_assert!((x - y).abs() <= q.error_bound(*x, max_abs), "{q:?}: {x} -> {y}"),
                }
            }
            prop_assert_eq!(encoded.saturated(), beyond);
        }

        #[test]
        fn truncated_payloads_are_rejected(values in prop::collection::vec(-1f32..1f32, 2..50), cut in 1usize..8) {
            let t = HostTensor::new(vec![values.len()], values).expect("1-D");
            let q = QuantisedTensor::quantise(&t, Quantisation::F16).expect("finite");
            let mut bytes = q.bytes().to_vec();
            bytes.truncate(bytes.len().saturating_sub(cut));
            let rejected =
                QuantisedTensor::from_parts(q.quantisation(), q.shape().to_vec(), bytes, q.scale());
            prop_assert!(matches!(rejected, Err(QuantError::Length { .. })), "{rejected:?}");
        }

        #[test]
        fn parts_of_a_quantised_tensor_reassemble_to_it(
            values in prop::collection::vec(-3f32..3f32, 1..40),
            q in prop::sample::select(ALL.to_vec()),
        ) {
            let t = HostTensor::new(vec![values.len()], values).expect("1-D");
            let encoded = QuantisedTensor::quantise(&t, q).expect("finite");
            let again = QuantisedTensor::from_parts(q, encoded.shape().to_vec(), encoded.bytes().to_vec(), encoded.scale())
                .expect("consistent parts");
            prop_assert_eq!(&again, &encoded);
            prop_assert_eq!(again.dequantise(), encoded.dequantise());
        }
    }

    #[test]
    fn non_finite_input_is_refused_in_every_encoding() {
        for q in ALL {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let t = HostTensor::new(vec![3], vec![1.0, bad, 2.0]).expect("fits");
                match QuantisedTensor::quantise(&t, q) {
                    Err(QuantError::NonFiniteInput { index: 1, value }) => {
                        assert_eq!(value.to_bits(), bad.to_bits(), "{q:?}");
                    }
                    other => panic!("{q:?} quantised {bad} to {other:?}"),
                }
            }
        }
    }

    #[test]
    fn f16_saturates_at_its_largest_value_and_counts_it() {
        let t = HostTensor::new(vec![4], vec![1e5, -7e4, 65504.0, 3.0]).expect("fits");
        let q = QuantisedTensor::quantise(&t, Quantisation::F16).expect("finite");
        assert_eq!(q.dequantise().expect("finite").values(), &[65504.0, -65504.0, 65504.0, 3.0]);
        assert_eq!(q.saturated(), 2);
        let s = Saturation { values: 12, bound: 65504.0, quantisation: Quantisation::F16 };
        assert_eq!(s.to_string(), "12 anchor values saturated at ±65504 (f16)");
    }

    #[test]
    fn inconsistent_parts_are_refused() {
        use Quantisation::{F16, F32, Int8};
        let overflow = QuantisedTensor::from_parts(F32, vec![usize::MAX, 2], vec![], 1.0);
        assert!(matches!(overflow, Err(QuantError::TooLarge { .. })), "{overflow:?}");
        let overflow = QuantisedTensor::from_parts(F16, vec![usize::MAX / 2 + 1], vec![], 1.0);
        assert!(matches!(overflow, Err(QuantError::TooLarge { .. })), "{overflow:?}");
        let short = QuantisedTensor::from_parts(F32, vec![2, 2], vec![0; 15], 1.0);
        assert!(matches!(short, Err(QuantError::Length { expected: 16, found: 15, .. })), "{short:?}");
        for scale in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let bad = QuantisedTensor::from_parts(Int8, vec![2], vec![1, 2], scale);
            assert!(matches!(bad, Err(QuantError::BadScale { .. })), "{scale}: {bad:?}");
        }
        let bad = QuantisedTensor::from_parts(F16, vec![1], vec![0, 0], 2.0);
        assert!(matches!(bad, Err(QuantError::BadScale { .. })), "{bad:?}");
        // A peer's scale can still overflow values: refused when decoded.
        let huge = QuantisedTensor::from_parts(Int8, vec![1], vec![127], f32::MAX).expect("valid parts");
        assert_eq!(huge.dequantise(), Err(QuantError::NonFinite));
        let nan = QuantisedTensor::from_parts(F16, vec![1], half::f16::NAN.to_le_bytes().to_vec(), 1.0).expect("parts");
        assert_eq!(nan.dequantise(), Err(QuantError::NonFinite));
    }

    #[test]
    fn deserialising_validates_the_parts() {
        let t = HostTensor::new(vec![2], vec![0.5, -0.5]).expect("fits");
        let q = QuantisedTensor::quantise(&t, Quantisation::Int8).expect("finite");
        let json = serde_json::to_value(&q).expect("serialises");
        let back: QuantisedTensor = serde_json::from_value(json.clone()).expect("valid parts");
        assert_eq!(back, q);
        let mut short = json;
        short["shape"] = serde_json::json!([3]);
        assert!(serde_json::from_value::<QuantisedTensor>(short).is_err());
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

    #[test]
    fn a_non_finite_feature_is_named() {
        let reference = FeatureStats { mean: vec![0.0, 0.0], std: vec![1.0, 1.0] };
        let window = HostTensor::new(vec![2, 2], vec![0.5, -0.5, 1.0, f32::NAN]).expect("fits");
        assert_eq!(
            Fixed(vec![0]).summarise(&window, &reference, 1, 0),
            Err(AnchorError::NonFiniteFeature { row: 1, column: 1 })
        );
    }
}
