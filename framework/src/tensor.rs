//! Backend-agnostic tensors: what crosses the plugin boundary and the wire.

use serde::{Deserialize, Serialize};

/// A dense f32 tensor as shape + row-major values. Plugins convert to Burn tensors on their
/// configured device inside; between plugins (and across a dynamic-library boundary) only this
/// plain data travels.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "TensorParts")]
pub struct HostTensor {
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// A tensor as decoded, before its shape is checked against its values.
#[derive(Deserialize)]
#[serde(rename = "HostTensor")]
struct TensorParts {
    shape: Vec<usize>,
    values: Vec<f32>,
}

impl TryFrom<TensorParts> for HostTensor {
    type Error = ShapeMismatch;

    fn try_from(parts: TensorParts) -> Result<Self, ShapeMismatch> {
        Self::new(parts.shape, parts.values)
    }
}

/// The shape and the number of values disagree.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("shape {shape:?} holds {expected} values, found {found}")]
pub struct ShapeMismatch {
    /// The requested shape.
    pub shape: Vec<usize>,
    /// The product of the shape.
    pub expected: usize,
    /// The number of values supplied.
    pub found: usize,
}

/// A tensor of another rank than the one asked for.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("expected a rank-{expected} tensor, found shape {shape:?}")]
pub struct RankMismatch {
    /// The rank asked for.
    pub expected: usize,
    /// The tensor's shape.
    pub shape: Vec<usize>,
}

/// Little-endian f32 values packed in `bytes` (the layout of safetensors, `.npy` `<f4` and our
/// caches); a trailing partial value is ignored, so callers check the length they expect first.
pub fn f32s_from_le_bytes(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

impl HostTensor {
    /// Builds a tensor, checking that `values` fills `shape` exactly.
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Result<Self, ShapeMismatch> {
        // Shapes come from peers and libraries: a product that overflows is no shape at all
        // (wrapping could even make it equal the number of values).
        let expected = shape.iter().try_fold(1usize, |n, d| n.checked_mul(*d)).unwrap_or(usize::MAX);
        if expected != values.len() {
            return Err(ShapeMismatch { shape, expected, found: values.len() });
        }
        Ok(Self { shape, values })
    }

    /// A tensor of zeros.
    pub fn zeros(shape: Vec<usize>) -> Self {
        let n = shape.iter().product();
        Self { shape, values: vec![0.0; n] }
    }

    /// The shape.
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The values, row-major.
    pub fn values(&self) -> &[f32] {
        &self.values
    }

    /// Consumes the tensor and returns its values.
    pub fn into_values(self) -> Vec<f32> {
        self.values
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.values.len()
    }

    /// Whether the tensor holds no values.
    pub fn is_empty(&self) -> bool {
        self.values.is_empty()
    }

    /// Whether every value is finite (no NaN, no infinity).
    pub fn is_finite(&self) -> bool {
        self.values.iter().all(|v| v.is_finite())
    }

    /// Rows of a 2-D tensor (`[rows, cols]`); `None` for any other rank.
    pub fn rows(&self) -> Option<std::slice::ChunksExact<'_, f32>> {
        match self.shape.as_slice() {
            [_, cols] if *cols > 0 => Some(self.values.chunks_exact(*cols)),
            _ => None,
        }
    }
}
