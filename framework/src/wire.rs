//! Versioned envelopes between devices and the cloud. Tensor payloads are safetensors bytes,
//! so any framework can read them. Every decoder here treats its input as hostile.

use std::collections::{BTreeMap, HashMap};

use safetensors::tensor::{Dtype, SafeTensors, TensorView};

use crate::anchor::{AnchorSummary, Quantisation, QuantisedTensor};
use crate::data::DeviceId;
use crate::privacy::PrivacyCost;
use crate::slots::{GeneratedParams, SchemaHash};
use crate::tensor::HostTensor;

const MAGIC: &[u8; 4] = b"MMPG";
/// Wire format version; a receiver refuses any other. Version 2 added the nonce (#14).
pub const WIRE_VERSION: u8 = 2;
/// Largest payload a receiver accepts, in bytes.
pub const MAX_PAYLOAD: usize = 64 << 20;
/// Request sequences are below this bound (2^48: a request a millisecond for 8,900 years); the
/// device and the cloud apply the same exclusive bound.
pub const MAX_SEQUENCE: u64 = 1 << 48;
/// Furthest a request's sequence may lie past the last one the cloud accepted from its device
/// (or past 0 for a device it has not heard from): a device steps by one and skips only the
/// requests it lost, so a larger jump is damage or an attack. Bounding the jump keeps the end of
/// the sequence space out of reach — from any sequence the cloud can record, a device has at
/// least 2^48 − 2^24·k numbers left after k accepted requests — so no request can lock its device
/// out of the cloud.
pub const MAX_AHEAD: u64 = 1 << 24;
/// Longest device id, in bytes, a message can carry.
pub const MAX_DEVICE_ID: usize = 256;

// The header's length fields are u16 (device id) and u32 (payload): both limits must fit.
const _: () = assert!(MAX_DEVICE_ID <= u16::MAX as usize && MAX_PAYLOAD <= u32::MAX as usize);

/// What an envelope carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MessageKind {
    /// Device → cloud: an anchor summary.
    Summary = 1,
    /// Cloud → device: generated slot values.
    Params = 2,
    /// Cloud → device: the request was refused; the payload is the reason (UTF-8, at most
    /// [`MAX_ERROR`] bytes). The device keeps its parameters.
    Error = 3,
}

/// Longest reason an error reply carries, in bytes.
pub const MAX_ERROR: usize = 4096;

/// How a stale-sequence error reply's reason begins; the last accepted sequence follows.
const STALE: &str = "stale sequence: not newer than the last this cloud accepted from the device, ";
const AHEAD: &str = "sequence too far ahead of the last this cloud accepted from the device, ";

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
    /// A random number the device draws for each request; replies echo it, so that only the
    /// answer to this very request matches (a sequence alone repeats if a device loses its state).
    pub nonce: u64,
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
    /// A device id too long for a message (sender side).
    #[error("device id of {0} bytes exceeds the {MAX_DEVICE_ID}-byte limit")]
    DeviceIdTooLong(usize),
    /// A tensor cannot be put on the wire (sender side), e.g. it holds NaN.
    #[error("cannot encode `{tensor}`: {reason}")]
    Encode {
        /// Tensor name.
        tensor: String,
        /// Why.
        reason: String,
    },
    /// A signed message was expected (the device holds the cloud's key) and this is not one.
    #[error("the message is not signed (expected `MMPS` framing)")]
    Unsigned,
    /// The signature does not verify: the bytes were altered, or another key signed them.
    #[error("signature refused: {0}")]
    Signature(String),
    /// The envelope carries another kind than expected.
    #[error("expected a {expected:?} message, found {found:?}")]
    UnexpectedKind {
        /// Expected kind.
        expected: MessageKind,
        /// Found kind.
        found: MessageKind,
    },
}

impl MessageKind {
    fn byte(self) -> u8 {
        match self {
            MessageKind::Summary => 1,
            MessageKind::Params => 2,
            MessageKind::Error => 3,
        }
    }

    /// The kind a header byte names; `None` for a byte no kind has.
    fn from_byte(byte: u8) -> Option<Self> {
        [MessageKind::Summary, MessageKind::Params, MessageKind::Error].into_iter().find(|k| k.byte() == byte)
    }
}

/// The header's length fields: the receiver's limits, checked before anything is written.
fn lengths(device: &DeviceId, payload: &[u8]) -> Result<(u16, u32), WireError> {
    let id = device.0.len();
    let id_len = u16::try_from(id).ok().filter(|_| id <= MAX_DEVICE_ID).ok_or(WireError::DeviceIdTooLong(id))?;
    let payload_len = u32::try_from(payload.len())
        .ok()
        .filter(|_| payload.len() <= MAX_PAYLOAD)
        .ok_or(WireError::TooLarge(payload.len()))?;
    Ok((id_len, payload_len))
}

impl Envelope {
    /// A message, checked against the receiver's limits.
    ///
    /// # Errors
    /// [`WireError::DeviceIdTooLong`] for a device id over [`MAX_DEVICE_ID`] bytes,
    /// [`WireError::TooLarge`] for a payload over [`MAX_PAYLOAD`] bytes.
    pub fn new(
        kind: MessageKind,
        schema_hash: SchemaHash,
        device: DeviceId,
        sequence: u64,
        payload: Vec<u8>,
    ) -> Result<Self, WireError> {
        lengths(&device, &payload)?;
        Ok(Self { kind, schema_hash, device, sequence, nonce: 0, payload })
    }

    /// The same message carrying `nonce` (a request's, or the request's it answers).
    #[must_use]
    pub fn with_nonce(self, nonce: u64) -> Self {
        Self { nonce, ..self }
    }

    /// Encodes to bytes: header (magic, version, kind, schema hash, sequence, nonce, u16 device
    /// id length, id, u32 payload length), then the payload.
    ///
    /// # Errors
    /// As [`Envelope::new`]: the fields are public, so the limits are checked again here
    /// rather than truncating a length.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let (id_len, payload_len) = lengths(&self.device, &self.payload)?;
        let id = self.device.0.as_bytes();
        let mut out = Vec::with_capacity(32 + id.len() + self.payload.len());
        out.extend_from_slice(MAGIC);
        out.push(WIRE_VERSION);
        out.push(self.kind.byte());
        out.extend_from_slice(&self.schema_hash.0.to_le_bytes());
        out.extend_from_slice(&self.sequence.to_le_bytes());
        out.extend_from_slice(&self.nonce.to_le_bytes());
        out.extend_from_slice(&id_len.to_le_bytes());
        out.extend_from_slice(id);
        out.extend_from_slice(&payload_len.to_le_bytes());
        out.extend_from_slice(&self.payload);
        Ok(out)
    }

    /// Decodes bytes from a peer.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader(bytes);
        let Header { kind, schema_hash, sequence, nonce, device } = Header::read(&mut r)?;
        let len = usize::try_from(u32::from_le_bytes(r.array("payload length")?)).unwrap_or(usize::MAX);
        if len > MAX_PAYLOAD {
            return Err(WireError::TooLarge(len));
        }
        let payload = r.take(len, "payload")?.to_vec();
        if !r.0.is_empty() {
            return Err(WireError::Trailing(r.0.len()));
        }
        Ok(Self { kind, schema_hash, device: DeviceId(device.to_string()), sequence, nonce, payload })
    }

    /// Wraps a summary for upload.
    ///
    /// # Errors
    /// As [`encode_summary`] and [`Envelope::new`].
    pub fn summary(
        device: DeviceId,
        sequence: u64,
        schema_hash: SchemaHash,
        summary: &AnchorSummary,
    ) -> Result<Self, WireError> {
        Self::new(MessageKind::Summary, schema_hash, device, sequence, encode_summary(summary)?)
    }

    /// Wraps generated parameters for download, as F32 (bit-exact).
    ///
    /// # Errors
    /// As [`Envelope::params_encoded`].
    pub fn params(device: DeviceId, sequence: u64, params: &GeneratedParams) -> Result<Self, WireError> {
        Self::params_encoded(device, sequence, params, Quantisation::F32)
    }

    /// Wraps generated parameters for download in `encoding` (f16, or int8 with one scale per
    /// slot): the device receives exactly the dequantised values.
    ///
    /// # Errors
    /// As [`encode_params_as`] (non-finite values) and [`Envelope::new`].
    pub fn params_encoded(
        device: DeviceId,
        sequence: u64,
        params: &GeneratedParams,
        encoding: Quantisation,
    ) -> Result<Self, WireError> {
        Self::new(MessageKind::Params, params.schema_hash, device, sequence, encode_params_as(params, encoding)?)
    }

    /// An error reply to `request`: the reason, cut to [`MAX_ERROR`] bytes at a character boundary.
    pub fn error(device: DeviceId, sequence: u64, schema_hash: SchemaHash, reason: &str) -> Self {
        let mut end = reason.len().min(MAX_ERROR);
        while !reason.is_char_boundary(end) {
            end -= 1;
        }
        // Both lengths are within the limits: the id came from a decoded envelope or is cut here.
        let device = if device.0.len() > MAX_DEVICE_ID { DeviceId(String::new()) } else { device };
        let payload = reason.as_bytes()[..end].to_vec();
        Self { kind: MessageKind::Error, schema_hash, device, sequence, nonce: 0, payload }
    }

    /// The error reply to a summary whose sequence is not newer than `last`, the last the cloud
    /// accepted from its device: it says which, so that a device that lost its count can resume
    /// after it ([`Envelope::last_accepted`]).
    pub fn stale(device: DeviceId, sequence: u64, schema_hash: SchemaHash, last: u64) -> Self {
        let reason = format!("{STALE}{last} (this request is {sequence})");
        Self::error(device, sequence, schema_hash, &reason)
    }

    /// The cloud's refusal of a request whose sequence jumps more than [`MAX_AHEAD`] past `last`,
    /// the last it accepted from the device: the device continues after `last`.
    pub fn ahead(device: DeviceId, sequence: u64, schema_hash: SchemaHash, last: u64) -> Self {
        let reason = format!("{AHEAD}{last} (this request is {sequence}, more than {MAX_AHEAD} past it)");
        Self::error(device, sequence, schema_hash, &reason)
    }

    /// Whether this is the cloud's refusal of a sequence too far ahead ([`Envelope::ahead`]).
    pub fn is_ahead(&self) -> bool {
        self.to_error().is_ok_and(|reason| reason.starts_with(AHEAD))
    }

    /// The last sequence the cloud accepted, if this is its refusal of a stale sequence or of
    /// one too far ahead ([`Envelope::stale`], [`Envelope::ahead`]): the device continues after it.
    pub fn last_accepted(&self) -> Option<u64> {
        let reason = self.to_error().ok()?;
        let rest = reason.strip_prefix(STALE).or_else(|| reason.strip_prefix(AHEAD))?;
        rest.split(' ').next()?.parse().ok()
    }

    /// The reason an error reply carries.
    pub fn to_error(&self) -> Result<String, WireError> {
        self.expect(MessageKind::Error)?;
        if self.payload.len() > MAX_ERROR {
            return Err(WireError::Content(format!("error reason of {} bytes", self.payload.len())));
        }
        String::from_utf8(self.payload.clone()).map_err(|_| WireError::Content("error reason is not UTF-8".into()))
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

/// An envelope's header, borrowed from its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header<'a> {
    /// What it carries.
    pub kind: MessageKind,
    /// The slot schema it is for.
    pub schema_hash: SchemaHash,
    /// The device's request sequence.
    pub sequence: u64,
    /// The request's nonce.
    pub nonce: u64,
    /// The device it names.
    pub device: &'a str,
}

impl<'a> Header<'a> {
    /// Reads magic, version, kind, schema hash, sequence, nonce and device id.
    fn read(r: &mut Reader<'a>) -> Result<Self, WireError> {
        if r.take(4, "magic")? != MAGIC {
            return Err(WireError::BadMagic);
        }
        let version = r.take(1, "version")?[0];
        if version != WIRE_VERSION {
            return Err(WireError::Version(version));
        }
        let byte = r.take(1, "kind")?[0];
        let kind = MessageKind::from_byte(byte).ok_or(WireError::Kind(byte))?;
        let schema_hash = SchemaHash(r.u64("schema hash")?);
        let sequence = r.u64("sequence")?;
        let nonce = r.u64("nonce")?;
        let id_len = usize::from(u16::from_le_bytes(r.array("device id length")?));
        if id_len > MAX_DEVICE_ID {
            return Err(WireError::DeviceId);
        }
        let device = std::str::from_utf8(r.take(id_len, "device id")?).map_err(|_| WireError::DeviceId)?;
        Ok(Self { kind, schema_hash, sequence, nonce, device })
    }

    /// The header of encoded envelope bytes, without reading (or checking) the payload: what a
    /// transport needs to route or authorise a message before the cloud decodes it.
    ///
    /// # Errors
    /// [`WireError`] for bytes whose header is not this version's.
    pub fn peek(bytes: &'a [u8]) -> Result<Self, WireError> {
        Self::read(&mut Reader(bytes))
    }
}

/// First bytes of a signed message.
pub const SIGNED_MAGIC: &[u8; 4] = b"MMPS";
/// Bytes a signature adds: magic, wire version, the 64-byte Ed25519 signature.
pub const SIGNED_OVERHEAD: usize = SIGNED_MAGIC.len() + 1 + crate::security::signing::SIGNATURE_LEN;

/// An encoded envelope signed by the cloud: `MMPS`, the wire version, the Ed25519 signature of
/// the envelope's bytes (header and payload, [`Purpose::Params`]), then those bytes.
///
/// [`Purpose::Params`]: crate::security::signing::Purpose::Params
pub fn sign(envelope: &[u8], signer: &crate::security::CloudSigner) -> Vec<u8> {
    let signature = signer.sign(crate::security::signing::Purpose::Params, envelope);
    let mut out = Vec::with_capacity(SIGNED_OVERHEAD + envelope.len());
    out.extend_from_slice(SIGNED_MAGIC);
    out.push(WIRE_VERSION);
    out.extend_from_slice(&signature);
    out.extend_from_slice(envelope);
    out
}

/// The envelope bytes inside a signed message, once the signature verified with `key`
/// (`verify_strict`); nothing of the envelope is read before.
///
/// # Errors
/// [`WireError::Unsigned`] without the framing, [`WireError::Version`],
/// [`WireError::Signature`] when the signature does not verify.
pub fn open_signed<'a>(bytes: &'a [u8], key: &crate::security::CloudKey) -> Result<&'a [u8], WireError> {
    let mut r = Reader(bytes);
    if r.take(SIGNED_MAGIC.len(), "signed magic").ok() != Some(SIGNED_MAGIC.as_slice()) {
        return Err(WireError::Unsigned);
    }
    let version = r.take(1, "version")?[0];
    if version != WIRE_VERSION {
        return Err(WireError::Version(version));
    }
    let signature = r.take(crate::security::signing::SIGNATURE_LEN, "signature")?;
    key.verify(crate::security::signing::Purpose::Params, r.0, signature)
        .map_err(|e| WireError::Signature(e.to_string()))?;
    Ok(r.0)
}

/// The envelope in `bytes`, signed or not, *without* checking the signature: only for bytes this
/// process made (a transport looking at its own replies). `None` for a signed frame too short.
pub fn unchecked_envelope(bytes: &[u8]) -> Option<&[u8]> {
    match bytes.strip_prefix(SIGNED_MAGIC.as_slice()) {
        Some(_) => bytes.get(SIGNED_OVERHEAD..),
        None => Some(bytes),
    }
}

/// The kind of an encoded envelope from its header alone, without decoding the rest (for a
/// transport choosing a status code); `None` for bytes that are not an envelope of this version.
pub fn peek_kind(bytes: &[u8]) -> Option<MessageKind> {
    match unchecked_envelope(bytes)? {
        [m0, m1, m2, m3, WIRE_VERSION, kind, ..] if [*m0, *m1, *m2, *m3] == *MAGIC => MessageKind::from_byte(*kind),
        _ => None,
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

/// One tensor to serialise: name, dtype, shape, little-endian bytes.
type Entry<'a> = (String, Dtype, &'a [usize], &'a [u8]);

fn serialize(tensors: &[Entry<'_>], metadata: BTreeMap<String, String>) -> Result<Vec<u8>, WireError> {
    let failed =
        |tensor: &str, e: &dyn std::fmt::Display| WireError::Encode { tensor: tensor.into(), reason: e.to_string() };
    let views = tensors
        .iter()
        .map(|(name, dtype, shape, data)| {
            let view = TensorView::new(*dtype, shape.to_vec(), data).map_err(|e| failed(name, &e))?;
            Ok((name.clone(), view))
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let metadata = if metadata.is_empty() {
        None
    } else {
        let json = serde_json::to_string(&metadata).map_err(|e| failed(METADATA_KEY, &e))?;
        Some(HashMap::from([(METADATA_KEY.to_string(), json)]))
    };
    safetensors::serialize(views, metadata).map_err(|e| failed("payload", &e))
}

/// Encodes generated parameters as safetensors (one F32 tensor per slot).
///
/// # Errors
/// As [`encode_params_as`].
pub fn encode_params(params: &GeneratedParams) -> Result<Vec<u8>, WireError> {
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
/// scales travel in the metadata. Values beyond f16's range saturate at ±65504.
///
/// # Errors
/// [`WireError::Encode`] naming the slot if a value is NaN or infinite: the cloud never sends
/// a payload the device would have to refuse, nor one that hides the fault (int8 would turn
/// NaN into 0).
pub fn encode_params_as(params: &GeneratedParams, encoding: Quantisation) -> Result<Vec<u8>, WireError> {
    let mut metadata = BTreeMap::new();
    let quantised = params
        .tensors
        .iter()
        .map(|(name, t)| {
            let q = QuantisedTensor::quantise(t, encoding)
                .map_err(|e| WireError::Encode { tensor: name.clone(), reason: e.to_string() })?;
            if encoding == Quantisation::Int8 {
                metadata.insert(scale_key(name), format!("{:e}", q.scale()));
            }
            Ok((name, q))
        })
        .collect::<Result<Vec<_>, WireError>>()?;
    let entries: Vec<Entry<'_>> =
        quantised.iter().map(|(name, q)| ((*name).clone(), dtype_of(encoding), q.shape(), q.bytes())).collect();
    serialize(&entries, metadata)
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
            let bad = |e: crate::anchor::QuantError| WireError::Content(format!("`{name}`: {e}"));
            let q = QuantisedTensor::from_parts(quantisation, view.shape().to_vec(), view.data().to_vec(), scale)
                .map_err(bad)?;
            let t = q.dequantise().map_err(bad)?;
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
    let bytes: Vec<(&String, &HostTensor, Vec<u8>)> =
        tensors.iter().map(|(name, t)| (name, t, f32_bytes(t.values()))).collect();
    let entries: Vec<Entry<'_>> =
        bytes.iter().map(|(name, t, data)| ((*name).clone(), Dtype::F32, t.shape(), data.as_slice())).collect();
    // A HostTensor's shape always matches its value count, and string metadata always
    // serialises: the cloud's own checkpoints cannot fail to encode.
    serialize(&entries, metadata.into_iter().collect()).expect("HostTensors are consistent by construction")
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
///
/// # Errors
/// [`WireError::Encode`] if safetensors refuses the tensors (a quantised tensor's parts always
/// agree, so in practice only for payloads beyond what it can address).
pub fn encode_summary(summary: &AnchorSummary) -> Result<Vec<u8>, WireError> {
    let (mean, var) = (f32_bytes(&summary.mean), f32_bytes(&summary.var));
    let (mean_shape, var_shape) = ([summary.mean.len()], [summary.var.len()]);
    let anchors = &summary.anchors;
    let mut entries: Vec<Entry<'_>> = vec![
        ("anchors".to_string(), dtype_of(anchors.quantisation()), anchors.shape(), anchors.bytes()),
        ("mean".to_string(), Dtype::F32, &mean_shape, &mean),
        ("var".to_string(), Dtype::F32, &var_shape, &var),
    ];
    let mut metadata = BTreeMap::from([
        ("scale".to_string(), format!("{:e}", anchors.scale())),
        ("frames".to_string(), summary.frames.to_string()),
        ("clips".to_string(), summary.clips.to_string()),
    ]);
    if let Some(text) = &summary.text_anchors {
        entries.push(("text_anchors".to_string(), dtype_of(text.quantisation()), text.shape(), text.bytes()));
        metadata.insert("text_scale".to_string(), format!("{:e}", text.scale()));
    }
    if let Some(cost) = &summary.privacy {
        for (key, value) in [(PRIVACY_KEYS[0], cost.epsilon), (PRIVACY_KEYS[1], cost.delta), (PRIVACY_KEYS[2], cost.mu)]
        {
            metadata.insert(key.to_string(), value.to_string());
        }
    }
    serialize(&entries, metadata)
}

/// Metadata keys of a private summary's stated cost: ε, δ and μ.
const PRIVACY_KEYS: [&str; 3] = ["privacy_epsilon", "privacy_delta", "privacy_mu"];

/// The privacy cost a summary's metadata states: none of its keys, or all three, valid.
fn privacy_of(meta: &BTreeMap<String, String>) -> Result<Option<PrivacyCost>, WireError> {
    let values: Vec<Option<&String>> = PRIVACY_KEYS.iter().map(|k| meta.get(*k)).collect();
    if values.iter().all(Option::is_none) {
        return Ok(None);
    }
    let mut parsed = [0f64; 3];
    for ((key, value), out) in PRIVACY_KEYS.iter().zip(values).zip(&mut parsed) {
        let value = value.ok_or_else(|| WireError::Content(format!("metadata `{key}` missing")))?;
        *out = value.parse().map_err(|_| WireError::Content(format!("metadata `{key}` is not a number")))?;
    }
    let cost = PrivacyCost { epsilon: parsed[0], delta: parsed[1], mu: parsed[2] };
    // A stated cost must be one its noise gives: μ no larger than (ε, δ) allows.
    let consistent = crate::privacy::gaussian_delta(cost.mu, cost.epsilon) <= cost.delta * (1.0 + 1e-6);
    if !cost.is_valid() || !consistent {
        return Err(WireError::Content(format!(
            "privacy cost ε {}, δ {}, μ {} is not one a mechanism states",
            cost.epsilon, cost.delta, cost.mu
        )));
    }
    Ok(Some(cost))
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
    let quantised = |view: TensorView<'_>, name: &str, scale: f32| -> Result<QuantisedTensor, WireError> {
        let quantisation = quantisation_of(view.dtype(), name)?;
        QuantisedTensor::from_parts(quantisation, view.shape().to_vec(), view.data().to_vec(), scale)
            .map_err(|e| WireError::Content(format!("`{name}`: {e}")))
    };
    let summary = AnchorSummary {
        anchors: quantised(get("anchors")?, "anchors", scale)?,
        mean: read_f32(&get("mean")?, "mean")?.into_values(),
        var: read_f32(&get("var")?, "var")?.into_values(),
        frames,
        clips,
        text_anchors: match st.tensor("text_anchors") {
            Err(_) => None,
            Ok(view) => {
                let scale = field("text_scale")?.parse().map_err(|_| bad("text_scale"))?;
                Some(quantised(view, "text_anchors", scale)?)
            }
        },
        privacy: privacy_of(&meta)?,
    };
    summary.decoded_anchors().map_err(|e| WireError::Content(e.to_string()))?;
    summary.decoded_text_anchors().map_err(|e| WireError::Content(e.to_string()))?;
    Ok(summary)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const ALL: [Quantisation; 3] = [Quantisation::F32, Quantisation::F16, Quantisation::Int8];

    fn tensor(shape: Vec<usize>, values: Vec<f32>) -> HostTensor {
        HostTensor::new(shape, values).expect("fits")
    }

    fn summary(q: Quantisation) -> AnchorSummary {
        let anchors = tensor(vec![3, 2], vec![0.5, -1.0, 2.0, 0.0, 1.5, -0.25]);
        AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, q).expect("finite"),
            mean: vec![0.1, 0.2],
            var: vec![1.0, 0.5],
            frames: 12,
            clips: 3,
            text_anchors: None,
            privacy: None,
        }
    }

    fn one_slot(values: Vec<f32>) -> GeneratedParams {
        let t = tensor(vec![values.len()], values);
        GeneratedParams { schema_hash: SchemaHash(3), tensors: BTreeMap::from([("s".to_string(), t)]) }
    }

    fn id(name: &str) -> DeviceId {
        DeviceId(name.into())
    }

    #[test]
    fn a_summary_stating_less_privacy_loss_than_its_noise_gives_is_refused() {
        let honest = PrivacyCost { epsilon: 2.0, delta: 1e-5, mu: crate::privacy::gaussian_mu(2.0, 1e-5) };
        let sent = AnchorSummary { privacy: Some(honest), ..summary(Quantisation::F32) };
        assert_eq!(decode_summary(&encode_summary(&sent).expect("encodes")).expect("decodes"), sent);
        // μ = 100 is nowhere near ε = 0.01 at δ = 1e-5.
        let boast = PrivacyCost { epsilon: 0.01, mu: 100.0, ..honest };
        let sent = AnchorSummary { privacy: Some(boast), ..summary(Quantisation::F32) };
        let err = decode_summary(&encode_summary(&sent).expect("encodes")).expect_err("refused");
        assert!(err.to_string().contains("not one a mechanism states"), "{err}");
    }

    #[test]
    fn summaries_round_trip_in_every_encoding() {
        for q in ALL {
            let s = summary(q);
            let env = Envelope::summary(id("cam-1"), 7, SchemaHash(42), &s).expect("encodes");
            let back = Envelope::decode(&env.encode().expect("encodes")).expect("decodes");
            assert_eq!(back, env);
            assert_eq!(back.to_summary().expect("summary"), s);
            let text = tensor(vec![2, 3], vec![0.25, -0.5, 1.0, 2.0, 0.0, -1.5]);
            let with_text =
                AnchorSummary { text_anchors: Some(QuantisedTensor::quantise(&text, q).expect("finite")), ..s };
            let env = Envelope::summary(id("cam-1"), 8, SchemaHash(42), &with_text).expect("encodes");
            let back = Envelope::decode(&env.encode().expect("encodes")).expect("decodes");
            assert_eq!(back.to_summary().expect("summary"), with_text);
        }
    }

    #[test]
    fn params_round_trip_bit_exact() {
        let params = GeneratedParams {
            schema_hash: SchemaHash(9),
            tensors: BTreeMap::from([("w".to_string(), tensor(vec![2, 2], vec![1.0, -0.0, f32::MIN_POSITIVE, 3.5]))]),
        };
        let env = Envelope::params(id("d"), 1, &params).expect("encodes");
        let back = Envelope::decode(&env.encode().expect("encodes")).expect("decodes").to_params().expect("params");
        let bits = |p: &GeneratedParams| -> Vec<u32> { p.tensors["w"].values().iter().map(|v| v.to_bits()).collect() };
        assert_eq!(bits(&back), bits(&params));
    }

    #[test]
    fn a_signed_envelope_opens_only_with_the_clouds_key_and_intact_bytes() {
        let signer = crate::security::CloudSigner::generate().expect("random");
        let other = crate::security::CloudSigner::generate().expect("random");
        let envelope = Envelope::error(DeviceId("d".into()), 3, SchemaHash(9), "no").encode().expect("encodes");
        let signed = sign(&envelope, &signer);
        assert_eq!(signed.len(), envelope.len() + SIGNED_OVERHEAD);
        assert_eq!(open_signed(&signed, &signer.public()).expect("opens"), envelope.as_slice());
        assert_eq!(peek_kind(&signed), Some(MessageKind::Error));
        assert!(matches!(open_signed(&signed, &other.public()), Err(WireError::Signature(_))));
        assert!(matches!(open_signed(&envelope, &signer.public()), Err(WireError::Unsigned)));
        assert!(matches!(open_signed(&signed[..40], &signer.public()), Err(WireError::Truncated(_))));
    }

    proptest! {
        /// Any one flipped bit, in the framing, the signature, the header or the payload, and the
        /// message does not open.
        #[test]
        fn a_flipped_bit_anywhere_in_a_signed_envelope_is_refused(bit in any::<usize>()) {
            let signer = crate::security::CloudSigner::generate().expect("random");
            let envelope = Envelope::new(MessageKind::Params, SchemaHash(5), DeviceId("dev".into()), 7, vec![1, 2, 3, 4])
                .and_then(|e| e.encode())
                .expect("encodes");
            let mut signed = sign(&envelope, &signer);
            let i = bit % (signed.len() * 8);
            signed[i / 8] ^= 1 << (i % 8);
            prop_assert!(open_signed(&signed, &signer.public()).is_err());
        }
    }

    proptest! {
        #[test]
        fn quantised_params_arrive_as_exactly_their_dequantised_values(
            values in prop::collection::vec(-4f32..4.0, 1..64),
            encoding in prop::sample::select(ALL.to_vec()),
        ) {
            let params = one_slot(values);
            let t = &params.tensors["s"];
            let env = Envelope::params_encoded(id("d"), 2, &params, encoding).expect("encodes");
            let back = Envelope::decode(&env.encode().expect("encodes")).expect("decodes").to_params().expect("params");
            let expected = QuantisedTensor::quantise(t, encoding).expect("finite").dequantise().expect("dequantises");
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
        let q = QuantisedTensor::quantise(&tensor(vec![2], vec![1.0, -1.0]), Quantisation::Int8).expect("finite");
        let payload = serialize(&[("s".into(), Dtype::I8, q.shape(), q.bytes())], BTreeMap::new()).expect("encodes");
        let err = decode_params(&payload).expect_err("no scale");
        assert!(err.to_string().contains("no numeric scale"), "{err}");
    }

    #[test]
    fn a_stale_reply_names_the_last_accepted_sequence() {
        let stale = Envelope::stale(id("d"), 3, SchemaHash(1), 41);
        let decoded = Envelope::decode(&stale.encode().expect("encodes")).expect("decodes");
        assert_eq!(decoded.last_accepted(), Some(41));
        assert_eq!(Envelope::error(id("d"), 3, SchemaHash(1), "no").last_accepted(), None);
    }

    #[test]
    fn a_summary_is_not_params() {
        let env = Envelope::summary(id("d"), 1, SchemaHash(1), &summary(Quantisation::F16)).expect("encodes");
        assert!(matches!(env.to_params(), Err(WireError::UnexpectedKind { .. })));
    }

    #[test]
    fn the_sender_refuses_non_finite_params_in_every_encoding() {
        for q in ALL {
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                let err = Envelope::params_encoded(id("d"), 1, &one_slot(vec![0.5, bad]), q).expect_err("refused");
                assert!(matches!(&err, WireError::Encode { tensor, .. } if tensor == "s"), "{q:?} {bad}: {err}");
            }
        }
    }

    #[test]
    fn f16_params_beyond_its_range_arrive_saturated() {
        let env = Envelope::params_encoded(id("d"), 1, &one_slot(vec![1e5, -1e6, 2.0]), Quantisation::F16)
            .expect("finite values encode");
        let back = Envelope::decode(&env.encode().expect("encodes")).expect("decodes").to_params().expect("params");
        assert_eq!(back.tensors["s"].values(), &[65504.0, -65504.0, 2.0]);
    }

    #[test]
    fn lengths_the_header_cannot_carry_are_errors_not_truncations() {
        let payload = || encode_params(&one_slot(vec![1.0])).expect("encodes");
        let longest = "d".repeat(MAX_DEVICE_ID);
        let env = Envelope::new(MessageKind::Params, SchemaHash(1), id(&longest), 1, payload()).expect("at the limit");
        assert_eq!(Envelope::decode(&env.encode().expect("encodes")), Ok(env));
        for len in [MAX_DEVICE_ID + 1, usize::from(u16::MAX) + 1 + 3] {
            let long = id(&"d".repeat(len));
            let err = Envelope::new(MessageKind::Params, SchemaHash(1), long.clone(), 1, payload());
            assert_eq!(err, Err(WireError::DeviceIdTooLong(len)));
            assert_eq!(Envelope::params(long.clone(), 1, &one_slot(vec![1.0])), Err(WireError::DeviceIdTooLong(len)));
            // The fields are public: encoding checks again instead of writing len mod 2^16.
            let forged = Envelope {
                kind: MessageKind::Params,
                schema_hash: SchemaHash(1),
                device: long,
                sequence: 1,
                nonce: 0,
                payload: payload(),
            };
            assert_eq!(forged.encode(), Err(WireError::DeviceIdTooLong(len)));
        }
        let big = vec![0u8; MAX_PAYLOAD + 1];
        let forged = Envelope {
            kind: MessageKind::Params,
            schema_hash: SchemaHash(1),
            device: id("d"),
            sequence: 1,
            nonce: 0,
            payload: big,
        };
        assert_eq!(forged.encode(), Err(WireError::TooLarge(MAX_PAYLOAD + 1)));
    }

    /// What an envelope under test carries.
    #[derive(Debug, Clone)]
    enum Content {
        Summary(AnchorSummary),
        Params(GeneratedParams, Quantisation),
    }

    fn arb_summary() -> impl Strategy<Value = AnchorSummary> {
        (
            (1usize..5, 1usize..6, prop::sample::select(ALL.to_vec())),
            prop::collection::vec(-100f32..100.0, 20),
            (prop::collection::vec(-5f32..5.0, 5), prop::collection::vec(0f32..5.0, 5)),
            (any::<u32>(), any::<u32>()),
            (prop::option::of((1usize..4, 1usize..5)), prop::collection::vec(-3f32..3.0, 12)),
            prop::option::of((0.01f64..100.0, 1e-12f64..0.1, 0.01f64..1.0)),
        )
            .prop_map(|((k, d, q), values, (mean, var), (frames, clips), (text, text_values), privacy)| {
                let anchors = tensor(vec![k, d], values[..k * d].to_vec());
                AnchorSummary {
                    anchors: QuantisedTensor::quantise(&anchors, q).expect("finite"),
                    mean: mean[..d].to_vec(),
                    var: var[..d].to_vec(),
                    frames,
                    clips,
                    text_anchors: text.map(|(kt, e)| {
                        QuantisedTensor::quantise(&tensor(vec![kt, e], text_values[..kt * e].to_vec()), q)
                            .expect("finite")
                    }),
                    privacy: privacy.map(|(epsilon, delta, share)| PrivacyCost {
                        epsilon,
                        delta,
                        mu: share * crate::privacy::gaussian_mu(epsilon, delta),
                    }),
                }
            })
    }

    fn arb_params() -> impl Strategy<Value = (GeneratedParams, Quantisation)> {
        (
            prop::collection::btree_map("[a-z_.]{1,8}", prop::collection::vec(1usize..4, 1..3), 1..4),
            prop::collection::vec(-4f32..4.0, 27),
            any::<u64>(),
            prop::sample::select(ALL.to_vec()),
        )
            .prop_map(|(shapes, values, hash, q)| {
                let tensors = shapes
                    .into_iter()
                    .enumerate()
                    .map(|(i, (name, shape))| {
                        let n: usize = shape.iter().product();
                        (name, tensor(shape, values.iter().cycle().skip(i).take(n).copied().collect()))
                    })
                    .collect();
                (GeneratedParams { schema_hash: SchemaHash(hash), tensors }, q)
            })
    }

    fn arb_envelope() -> impl Strategy<Value = (Envelope, Content)> {
        let device = prop_oneof![4 => "[a-zA-Z0-9._é-]{0,24}", 1 => Just("x".repeat(MAX_DEVICE_ID))];
        let content = prop_oneof![
            arb_summary().prop_map(Content::Summary),
            arb_params().prop_map(|(p, q)| Content::Params(p, q)),
        ];
        (device, any::<u64>(), any::<u64>(), any::<u64>(), content).prop_map(
            |(device, sequence, nonce, hash, content)| {
                let device = DeviceId(device);
                let env = match &content {
                    Content::Summary(s) => Envelope::summary(device, sequence, SchemaHash(hash), s),
                    Content::Params(p, q) => Envelope::params_encoded(device, sequence, p, *q),
                };
                (env.expect("valid content encodes").with_nonce(nonce), content)
            },
        )
    }

    /// How a peer (or the network) damages a message.
    #[derive(Debug, Clone)]
    enum Mutation {
        Flip(prop::sample::Index, u8),
        /// A flip among the last 64 bytes: tensor data, so the payload usually still parses.
        FlipData(prop::sample::Index, u8),
        Truncate(prop::sample::Index),
        Extend(Vec<u8>),
        DeviceIdLength(u16),
        PayloadLength(u32),
        /// The safetensors header length, the payload's first 8 bytes.
        HeaderLength(u64),
        Splice(prop::sample::Index, usize, Vec<u8>),
    }

    fn arb_mutation() -> impl Strategy<Value = Mutation> {
        prop_oneof![
            3 => (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::Flip(i, m)),
            3 => (any::<prop::sample::Index>(), 1u8..=255).prop_map(|(i, m)| Mutation::FlipData(i, m)),
            1 => any::<prop::sample::Index>().prop_map(Mutation::Truncate),
            1 => prop::collection::vec(any::<u8>(), 1..8).prop_map(Mutation::Extend),
            1 => any::<u16>().prop_map(Mutation::DeviceIdLength),
            1 => any::<u32>().prop_map(Mutation::PayloadLength),
            1 => any::<u64>().prop_map(Mutation::HeaderLength),
            2 => (any::<prop::sample::Index>(), 0usize..16, prop::collection::vec(any::<u8>(), 0..16))
                .prop_map(|(i, n, with)| Mutation::Splice(i, n, with)),
        ]
    }

    /// Offset of the u16 device id length in an encoded envelope.
    const ID_LENGTH_AT: usize = 4 + 1 + 1 + 8 + 8;

    fn mutate(env: &Envelope, mut bytes: Vec<u8>, mutation: &Mutation) -> Vec<u8> {
        let payload_length_at = ID_LENGTH_AT + 2 + env.device.0.len();
        let payload_at = payload_length_at + 4;
        match mutation {
            Mutation::Flip(i, mask) => {
                let i = i.index(bytes.len());
                bytes[i] ^= mask;
            }
            Mutation::FlipData(i, mask) => {
                let tail = bytes.len().min(64);
                let at = bytes.len() - tail + i.index(tail);
                bytes[at] ^= mask;
            }
            Mutation::Truncate(i) => bytes.truncate(i.index(bytes.len())),
            Mutation::Extend(tail) => bytes.extend_from_slice(tail),
            Mutation::DeviceIdLength(n) => bytes[ID_LENGTH_AT..ID_LENGTH_AT + 2].copy_from_slice(&n.to_le_bytes()),
            Mutation::PayloadLength(n) => {
                bytes[payload_length_at..payload_at].copy_from_slice(&n.to_le_bytes());
            }
            Mutation::HeaderLength(n) => bytes[payload_at..payload_at + 8].copy_from_slice(&n.to_le_bytes()),
            Mutation::Splice(i, n, with) => {
                let at = i.index(bytes.len());
                let end = (at + n).min(bytes.len());
                bytes.splice(at..end, with.iter().copied());
            }
        }
        bytes
    }

    /// Whatever a decoded envelope yields must be valid, and survive another trip unchanged.
    fn check_content(env: &Envelope) -> Result<(), TestCaseError> {
        if let Ok(s) = env.to_summary() {
            let anchors = s.decoded_anchors().map_err(|e| TestCaseError::fail(format!("accepted summary: {e}")))?;
            prop_assert!(anchors.is_finite());
            prop_assert!(s.mean.iter().chain(&s.var).all(|v| v.is_finite()) && s.var.iter().all(|v| *v >= 0.0));
            prop_assert!(s.decoded_text_anchors().is_ok());
            let again = Envelope::summary(env.device.clone(), env.sequence, env.schema_hash, &s)
                .map_err(|e| TestCaseError::fail(format!("accepted summary does not re-encode: {e}")))?;
            prop_assert_eq!(again.to_summary().map_err(|e| TestCaseError::fail(e.to_string()))?, s);
        }
        if let Ok(p) = env.to_params() {
            prop_assert!(p.tensors.values().all(HostTensor::is_finite));
            let again = Envelope::params(env.device.clone(), env.sequence, &p)
                .map_err(|e| TestCaseError::fail(format!("accepted params do not re-encode: {e}")))?;
            prop_assert_eq!(again.to_params().map_err(|e| TestCaseError::fail(e.to_string()))?, p);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        #[test]
        fn valid_envelopes_round_trip_with_their_content((env, content) in arb_envelope()) {
            let bytes = env.encode().expect("a constructed envelope encodes");
            let back = Envelope::decode(&bytes).expect("own encoding decodes");
            prop_assert_eq!(&back, &env);
            match content {
                Content::Summary(s) => prop_assert_eq!(back.to_summary().expect("summary"), s),
                Content::Params(p, q) => {
                    let mut expected = p.clone();
                    for t in expected.tensors.values_mut() {
                        *t = QuantisedTensor::quantise(t, q).expect("finite").dequantise().expect("decodes");
                    }
                    prop_assert_eq!(back.to_params().expect("params"), expected);
                }
            }
        }

        #[test]
        fn damaged_envelopes_are_refused_or_decode_to_valid_content(
            (env, _) in arb_envelope(),
            mutations in prop::collection::vec(arb_mutation(), 1..3),
        ) {
            let mut bytes = env.encode().expect("encodes");
            for m in &mutations {
                if bytes.len() > ID_LENGTH_AT + 2 + env.device.0.len() + 4 + 8 {
                    bytes = mutate(&env, bytes, m);
                }
            }
            if let Ok(decoded) = Envelope::decode(&bytes) {
                // The header is a pure function of its fields: re-encoding gives the same bytes.
                prop_assert_eq!(decoded.encode().expect("a decoded envelope re-encodes"), bytes);
                check_content(&decoded)?;
            }
        }

        #[test]
        fn decoding_arbitrary_bytes_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            if let Ok(env) = Envelope::decode(&bytes) {
                check_content(&env)?;
            }
        }

        #[test]
        fn every_truncation_is_an_error(cut in 1usize..40) {
            let env = Envelope::summary(id("d"), 1, SchemaHash(1), &summary(Quantisation::Int8)).expect("encodes");
            let bytes = env.encode().expect("encodes");
            let keep = bytes.len().saturating_sub(cut);
            prop_assert!(Envelope::decode(&bytes[..keep]).is_err());
        }
    }
}
