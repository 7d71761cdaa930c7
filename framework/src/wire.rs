//! Versioned envelopes between devices and the cloud. Tensor payloads are safetensors bytes,
//! so any framework can read them. Every decoder here treats its input as hostile.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::anchor::{AnchorSummary, Quantisation, QuantisedTensor};
use crate::data::DeviceId;
use crate::slots::{GeneratedParams, SchemaHash};
use crate::tensor::HostTensor;

const MAGIC: &[u8; 4] = b"MMPG";
/// Wire format version; a receiver refuses any other.
pub const WIRE_VERSION: u8 = 1;
/// Largest payload a receiver accepts.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Longest device id, in bytes, a message can carry.
pub const MAX_DEVICE_ID: usize = 256;

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Device → cloud: an anchor summary.
    Summary = 1,
    /// Cloud → device: generated slot values.
    Params = 2,
}

/// A message: header plus safetensors payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Payload kind.
    pub kind: MessageKind,
    /// Schema of the model the message is about.
    pub schema_hash: SchemaHash,
    /// Sender (uplink) or recipient (downlink).
    pub device: DeviceId,
    /// Per-device sequence number; replies echo the request's.
    pub sequence: u64,
    /// safetensors bytes.
    pub payload: Vec<u8>,
}

/// Why bytes are not a valid message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    /// Too short for the field being read.
    #[error("message truncated while reading {0}")]
    Truncated(&'static str),
    /// Not an mmpg message.
    #[error("not an mmpg message (bad magic)")]
    BadMagic,
    /// Another wire version.
    #[error("wire version {0} is not supported (this build speaks {WIRE_VERSION})")]
    Version(u8),
    /// Unknown kind byte.
    #[error("unknown message kind {0}")]
    Kind(u8),
    /// Device id is not UTF-8 or too long.
    #[error("device id is not valid UTF-8 of at most {MAX_DEVICE_ID} bytes")]
    DeviceId,
    /// Payload too large.
    #[error("payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// Bytes after the payload.
    #[error("{0} trailing bytes after the payload")]
    Trailing(usize),
    /// Payload is not valid safetensors.
    #[error("payload: {0}")]
    Payload(String),
    /// Payload is valid safetensors but not the expected content.
    #[error("payload content: {0}")]
    Content(String),
    /// The envelope carries another kind than expected.
    #[error("expected a {expected:?} message, found {found:?}")]
    UnexpectedKind {
        /// Expected kind.
        expected: MessageKind,
        /// Found kind.
        found: MessageKind,
    },
}

impl Envelope {
    /// Encodes to bytes.
    pub fn encode(&self) -> Vec<u8> {
        let id = self.device.0.as_bytes();
        let mut out = Vec::with_capacity(32 + id.len() + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.push(WIRE_VERSION);
        out.push(self.kind as u8);
        out.extend_from_slice(&self.schema_hash.0.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&(id.len() as u16).to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&(self.payload.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.payload);
        out
    }

    /// Decodes bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        if r.take(4, "magic")? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.take(1, "version")?[0];
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        let kind = match r.take(1, "kind")?[0] {
            1 => MessageKind::Summary,
            2 => MessageKind::Params,
            other => return Err(WireError::Kind(other)),
        };
        let schema_hash = SchemaHash(r.u64("schema hash")?);
        let sequence = r.u64("sequence")?;
        let id_len = usize::from(u16::from_le_bytes(r.array("device id length")?));
        if id_len > MAX_DEVICE_ID {
            return Err(WireError::DeviceId);
        }
        let id = std::str::from_utf8(r.take(id_len, "device id")?).map_err(|_| WireError::DeviceId)?;
        let len = u32::from_le_bytes(r.array("payload length")?) as usize;
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        let payload = r.take(len, "payload")?.to_vec();
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(Self { kind, schema_hash, device: DeviceId(id.to_string()), sequence, payload })
    }

    /// Wraps a summary for upload.
    pub fn summary(device: DeviceId, sequence: u64, schema_hash: SchemaHash, summary: &AnchorSummary) -> Self {
        Self { kind: MessageKind::Summary, schema_hash, device, sequence, payload: encode_summary(summary) }
    }

    /// Wraps generated parameters for download, as F32 (bit-exact).
    pub fn params(device: DeviceId, sequence: u64, params: &GeneratedParams) -> Self {
        Self::params_encoded(device, sequence, params, Quantisation::F32)
    }

    /// Wraps generated parameters for download in `encoding` (f16, or int8 with one scale per
    /// slot): the device receives exactly the dequantised values.
    pub fn params_encoded(device: DeviceId, sequence: u64, params: &GeneratedParams, encoding: Quantisation) -> Self {
        Self {
            kind: MessageKind::Params,
            schema_hash: params.schema_hash,
            device,
            sequence,
            payload: encode_params_as(params, encoding),
        }
    }

    /// The summary this envelope carries.
    pub fn to_summary(&self) -> Result<AnchorSummary, WireError> {
        self.expect(MessageKind::Summary)?;
        decode_summary(&self.payload)
    }

    /// The parameters this envelope carries (dequantised), stamped with the envelope's schema hash.
    pub fn to_params(&self) -> Result<GeneratedParams, WireError> {
        self.expect(MessageKind::Params)?;
        Ok(GeneratedParams { schema_hash: self.schema_hash, tensors: decode_params(&self.payload)? })
    }

    fn expect(&self, expected: MessageKind) -> Result<(), WireError> {
        if self.kind != expected {
            return Err(WireError::UnexpectedKind { expected, found: self.kind });
        }
        Ok(())
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize, what: &'static str) -> Result<&'a [u8], WireError> {
        if self.0.len() < n {
            return Err(WireError::Truncated(what));
        }
        let (head, tail) = self.0.split_at(n);
        self.0 = tail;
        Ok(head)
    }

    fn array<const N: usize>(&mut self, what: &'static str) -> Result<[u8; N], WireError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u64(&mut self, what: &'static str) -> Result<u64, WireError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The one safetensors metadata key mmpg writes: its value is a JSON object with sorted keys.
/// (safetensors keeps metadata in a hash map, whose order would make equal payloads differ.)
const METADATA_KEY: &str = "mmpg";

fn serialize(tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)>, metadata: BTreeMap<String, String>) -> Vec<u8> {
    // Callers build shapes and byte counts from the same tensors, so views always agree.
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.clone(), data).expect("shape and bytes agree by construction");
            (name.clone(), view)
        })
        .collect();
    let metadata = (!metadata.is_empty()).then(|| {
        let json = serde_json::to_string(&metadata).expect("a map of strings serialises");
        HashMap::from([(METADATA_KEY.to_string(), json)])
    });
    safetensors::serialize(views, metadata).expect("views of owned, consistent tensors serialise")
}

/// Encodes generated parameters as safetensors (one F32 tensor per slot).
pub fn encode_params(params: &GeneratedParams) -> Vec<u8> {
    encode_params_as(params, Quantisation::F32)
}

fn dtype_of(quantisation: Quantisation) -> Dtype {
    match quantisation {
        Quantisation::F32 => Dtype::F32,
        Quantisation::F16 => Dtype::F16,
        Quantisation::Int8 => Dtype::I8,
    }
}

fn quantisation_of(dtype: Dtype, name: &str) -> Result<Quantisation, WireError> {
    match dtype {
        Dtype::F32 => Ok(Quantisation::F32),
        Dtype::F16 => Ok(Quantisation::F16),
        Dtype::I8 => Ok(Quantisation::Int8),
        other => Err(WireError::Content(format!("`{name}` dtype {other:?} is not f32, f16 or i8"))),
    }
}

/// Metadata key of an int8 tensor's scale.
fn scale_key(name: &str) -> String {
    format!("scale.{name}")
}

/// Encodes generated parameters as safetensors, one tensor per slot in `encoding`; int8
/// scales travel in the metadata.
pub fn encode_params_as(params: &GeneratedParams, encoding: Quantisation) -> Vec<u8> {
    let mut metadata = BTreeMap::new();
    let tensors = params
        .tensors
        .iter()
        .map(|(name, t)| {
            let q = QuantisedTensor::quantise(t, encoding);
            if encoding == Quantisation::Int8 {
                metadata.insert(scale_key(name), format!("{:e}", q.scale));
            }
            (name.clone(), dtype_of(encoding), q.shape, q.bytes)
        })
        .collect();
    serialize(tensors, metadata)
}

/// Decodes a parameters payload of F32, F16 or int8 tensors, checking lengths, scales and
/// finiteness (the schema check happens on the device).
pub fn decode_params(payload: &[u8]) -> Result<BTreeMap<String, HostTensor>, WireError> {
    let meta = read_metadata(payload)?;
    let st = parse(payload)?;
    st.tensors()
        .iter()
        .map(|(name, view)| {
            let quantisation = quantisation_of(view.dtype(), name)?;
            let scale = match quantisation {
                Quantisation::Int8 => meta
                    .get(&scale_key(name))
                    .and_then(|s| s.parse::<f32>().ok())
                    .ok_or_else(|| WireError::Content(format!("int8 `{name}` has no numeric scale")))?,
                _ => 1.0,
            };
            let q = QuantisedTensor { quantisation, shape: view.shape().to_vec(), bytes: view.data().to_vec(), scale };
            let t = q.dequantise().map_err(|e| WireError::Content(format!("`{name}`: {e}")))?;
            Ok((name.clone(), t))
        })
        .collect()
}

fn parse(payload: &[u8]) -> Result<SafeTensors<'_>, WireError> {
    SafeTensors::deserialize(payload).map_err(|e| WireError::Payload(e.to_string()))
}

fn read_f32(view: &TensorView<'_>, name: &str) -> Result<HostTensor, WireError> {
    if view.dtype() != Dtype::F32 {
        return Err(WireError::Content(format!("`{name}` must be F32, found {:?}", view.dtype())));
    }
    let values = crate::tensor::f32s_from_le_bytes(view.data());
    HostTensor::new(view.shape().to_vec(), values).map_err(|e| WireError::Content(format!("`{name}`: {e}")))
}

/// Encodes named F32 tensors with string metadata as safetensors (checkpoints).
pub fn encode_f32_tensors(
    tensors: &BTreeMap<String, HostTensor>,
    metadata: impl IntoIterator<Item = (String, String)>,
) -> Vec<u8> {
    let tensors =
        tensors.iter().map(|(name, t)| (name.clone(), Dtype::F32, t.shape().to_vec(), f32_bytes(t.values()))).collect();
    serialize(tensors, metadata.into_iter().collect())
}

/// The string metadata mmpg wrote into a safetensors payload (empty if there is none).
pub fn read_metadata(payload: &[u8]) -> Result<BTreeMap<String, String>, WireError> {
    let (_, meta) = SafeTensors::read_metadata(payload).map_err(|e| WireError::Payload(e.to_string()))?;
    match meta.metadata().as_ref().and_then(|m| m.get(METADATA_KEY)) {
        None => Ok(BTreeMap::new()),
        Some(json) => serde_json::from_str(json).map_err(|e| WireError::Content(format!("metadata: {e}"))),
    }
}

/// Decodes a safetensors payload of F32 tensors.
pub fn decode_f32_tensors(payload: &[u8]) -> Result<BTreeMap<String, HostTensor>, WireError> {
    let st = parse(payload)?;
    st.tensors().iter().map(|(name, view)| Ok((name.clone(), read_f32(view, name)?))).collect()
}

/// Encodes a summary as safetensors: `anchors` in its quantised dtype, `mean` and `var` as F32,
/// scale and counts in the metadata.
pub fn encode_summary(summary: &AnchorSummary) -> Vec<u8> {
    let dtype = dtype_of(summary.anchors.quantisation);
    let d = summary.mean.len();
    let tensors = vec![
        ("anchors".to_string(), dtype, summary.anchors.shape.clone(), summary.anchors.bytes.clone()),
        ("mean".to_string(), Dtype::F32, vec![d], f32_bytes(&summary.mean)),
        ("var".to_string(), Dtype::F32, vec![summary.var.len()], f32_bytes(&summary.var)),
    ];
    let mut metadata = BTreeMap::from([
        ("scale".to_string(), format!("{:e}", summary.anchors.scale)),
        ("frames".to_string(), summary.frames.to_string()),
        ("clips".to_string(), summary.clips.to_string()),
    ]);
    let mut tensors = tensors;
    if let Some(text) = &summary.text_anchors {
        tensors.push(("text_anchors".to_string(), dtype_of(text.quantisation), text.shape.clone(), text.bytes.clone()));
        metadata.insert("text_scale".to_string(), format!("{:e}", text.scale));
    }
    serialize(tensors, metadata)
}

/// Decodes and checks a summary payload.
pub fn decode_summary(payload: &[u8]) -> Result<AnchorSummary, WireError> {
    let meta = read_metadata(payload)?;
    let field = |key: &str| -> Result<&String, WireError> {
        meta.get(key).ok_or_else(|| WireError::Content(format!("metadata `{key}` missing")))
    };
    let bad = |key: &str| WireError::Content(format!("metadata `{key}` is not a number"));
    let scale: f32 = field("scale")?.parse().map_err(|_| bad("scale"))?;
    let frames: u32 = field("frames")?.parse().map_err(|_| bad("frames"))?;
    let clips: u32 = field("clips")?.parse().map_err(|_| bad("clips"))?;
    let st = parse(payload)?;
    let get = |name: &str| st.tensor(name).map_err(|_| WireError::Content(format!("tensor `{name}` missing")));
    let anchors = get("anchors")?;
    let quantisation = quantisation_of(anchors.dtype(), "anchors")?;
    let summary = AnchorSummary {
        anchors: QuantisedTensor {
            quantisation,
            shape: anchors.shape().to_vec(),
            bytes: anchors.data().to_vec(),
            scale,
        },
        mean: read_f32(&get("mean")?, "mean")?.into_values(),
        var: read_f32(&get("var")?, "var")?.into_values(),
        frames,
        clips,
        text_anchors: match st.tensor("text_anchors") {
            Err(_) => None,
            Ok(view) => Some(QuantisedTensor {
                quantisation: quantisation_of(view.dtype(), "text_anchors")?,
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
                scale: field("text_scale")?.parse().map_err(|_| bad("text_scale"))?,
            }),
        },
    };
    summary.decoded_anchors().map_err(|e| WireError::Content(e.to_string()))?;
    summary.decoded_text_anchors().map_err(|e| WireError::Content(e.to_string()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn summary(q: Quantisation) -> AnchorSummary {
        let anchors = HostTensor::new(vec![3, 2], vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25]).expect("fits");
        AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, q),
            mean: vec![0.1, 0.2],
            var: vec![1.0, 0.5],
            frames: 12,
            clips: 3,
            text_anchors: None,
        }
    }

    #[test]
    fn summaries_round_trip_in_every_encoding() {
        for q in [Quantisation::F32, Quantisation::F16, Quantisation::Int8] {
            let s = summary(q);
            let env = Envelope::summary(DeviceId("cam-1".into()), 7, SchemaHash(42), &s);
            let back = Envelope::decode(&env.encode()).expect("decodes");
            assert_eq!(back, env);
            assert_eq!(back.to_summary().expect("summary"), s);
            let text = HostTensor::new(vec![2, 3], vec![0.25, -0.5, 1.0, 2.0, 0.0, -1.5]).expect("fits");
            let with_text = AnchorSummary { text_anchors: Some(QuantisedTensor::quantise(&text, q)), ..s };
            let env = Envelope::summary(DeviceId("cam-1".into()), 8, SchemaHash(42), &with_text);
            let back = Envelope::decode(&env.encode()).expect("decodes").to_summary().expect("summary");
            assert_eq!(back, with_text);
        }
    }

    #[test]
    fn params_round_trip_bit_exact() {
        let params = GeneratedParams {
            schema_hash: SchemaHash(9),
            tensors: BTreeMap::from([(
                "w".to_string(),
                HostTensor::new(vec![2, 2], vec![1.0, -0.0, f32::MIN_POSITIVE, 3.5]).expect("fits"),
            )]),
        };
        let env = Envelope::params(DeviceId("d".into()), 1, &params);
        let back = Envelope::decode(&env.encode()).expect("decodes").to_params().expect("params");
        let bits = |p: &GeneratedParams| -> Vec<u32> { p.tensors["w"].values().iter().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&back), bits(&params));
    }

    proptest! {
        #[test]
        fn quantised_params_arrive_as_exactly_their_dequantised_values(
            values in prop::collection::vec(-4f32..4.0, 1..64),
            encoding in prop_oneof![Just(Quantisation::F32), Just(Quantisation::F16), Just(Quantisation::Int8)],
        ) {
            let t = HostTensor::new(vec![values.len()], values).expect("fits");
            let params = GeneratedParams { schema_hash: SchemaHash(3), tensors: BTreeMap::from([("s".to_string(), t.clone())]) };
            let env = Envelope::params_encoded(DeviceId("d".into()), 2, &params, encoding);
            let back = Envelope::decode(&env.encode()).expect("decodes").to_params().expect("params");
            let expected = QuantisedTensor::quantise(&t, encoding).dequantise().expect("dequantises");
            prop_assert_eq!(&back.tensors["s"], &expected);
            // Each value within half a quantisation step of what the cloud generated.
            let step = match encoding {
                Quantisation::F32 => 0.0,
                Quantisation::F16 => 4.0 / 1024.0,
                Quantisation::Int8 => t.values().iter().fold(0f32, |m, v| m.max(v.abs())) / 127.0,
            };
            for (a, b) in back.tensors["s"].values().iter().zip(t.values()) {
                prop_assert!((a - b).abs() <= step / 2.0 + 1e-7, "{a} vs {b}");
            }
        }
    }

    #[test]
    fn int8_params_need_their_scale() {
        let t = HostTensor::new(vec![2], vec![1.0, -1.0]).expect("fits");
        let params = GeneratedParams { schema_hash: SchemaHash(3), tensors: BTreeMap::from([("s".to_string(), t)]) };
        let q = QuantisedTensor::quantise(&params.tensors["s"], Quantisation::Int8);
        let payload = serialize(vec![("s".into(), Dtype::I8, q.shape, q.bytes)], BTreeMap::new());
        let err = decode_params(&payload).expect_err("no scale");
        assert!(err.to_string().contains("no numeric scale"), "{err}");
    }

    #[test]
    fn a_summary_is_not_params() {
        let env = Envelope::summary(DeviceId("d".into()), 1, SchemaHash(1), &summary(Quantisation::F16));
        assert!(matches!(env.to_params(), Err(WireError::UnexpectedKind { .. })));
    }

    proptest! {
        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(env) = Envelope::decode(&bytes) {
                let _ = env.to_summary();
                let _ = env.to_params();
            }
        }

        #[test]
        fn every_truncation_is_an_error(cut in 1usize..40) {
            let bytes = Envelope::summary(DeviceId("d".into()), 1, SchemaHash(1), &summary(Quantisation::Int8)).encode();
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(Envelope::decode(&bytes[..keep]).is_err());
        }
    }
}
