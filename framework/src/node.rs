//! The two roles of a deployment, each the sole owner of its state. They share nothing but
//! envelopes, so the same code runs in one process (`mmpg run`) and as separate programs over a
//! network (`mmpg cloud serve`, `mmpg device`).
//!
//! - A [`CloudNode`] holds the trained generator and turns summary envelopes into params (or
//!   error) envelopes, one reply per request, micro-batching what arrives together.
//! - A [`DeviceNode`] holds its model, its anchor reasoner and its last good parameters; it
//!   turns a window into a request and a reply into validated, installed parameters.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::anchor::{AnchorReasoner, AnchorSummary, FeatureStats, Quantisation};
use crate::data::{Clip, DeviceId};
use crate::generator::{GeneratorError, ParameterGenerator};
use crate::model::{DeviceModel, ModelError};
use crate::privacy::{PrivacyAccountant, PrivacySpent};
use crate::replies::ReplyCache;
use crate::runtime::{SummaryError, summarise_features, summarise_window};
use crate::security::{CloudSigner, SequenceLedger};
use crate::slots::{GeneratedParams, SchemaHash};
use crate::tensor::HostTensor;
use crate::transport::{CloudEndpoint, Peer, TransportError};
use crate::wire::{Envelope, MAX_AHEAD, MAX_SEQUENCE, MessageKind, WireError};

/// How the cloud groups concurrent requests into one generation call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    /// Most summaries in one call.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch.
    pub max_wait: Duration,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        Self { max_batch: 64, max_wait: Duration::from_millis(2) }
    }
}

/// What became of one request at the cloud.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// Parameters were generated and sent.
    Adapted,
    /// The bytes are not a summary envelope.
    Malformed,
    /// The summary is for another model's slot schema.
    WrongSchema,
    /// The envelope names a device other than the one the transport authenticated.
    Impersonation,
    /// The generator refused the summary (or its parameters could not be encoded).
    Refused,
    /// The summary's sequence is not newer than the last accepted from its device (a replay).
    Replayed,
    /// A byte-for-byte copy of a request already answered (a retry): the same reply again, from
    /// the [`ReplyCache`], with no second adaptation.
    Repeated,
}

impl Outcome {
    /// Every outcome, in a fixed order (for counters).
    pub const ALL: [Outcome; 7] = [
        Outcome::Adapted,
        Outcome::Malformed,
        Outcome::WrongSchema,
        Outcome::Impersonation,
        Outcome::Refused,
        Outcome::Replayed,
        Outcome::Repeated,
    ];

    /// Its name in metrics and logs.
    pub fn name(self) -> &'static str {
        match self {
            Outcome::Adapted => "adapted",
            Outcome::Malformed => "malformed",
            Outcome::WrongSchema => "wrong_schema",
            Outcome::Impersonation => "impersonation",
            Outcome::Refused => "refused",
            Outcome::Replayed => "replayed",
            Outcome::Repeated => "repeated",
        }
    }
}

/// One reply of the cloud.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// The encoded envelope (params, or an error reply).
    pub bytes: Vec<u8>,
    /// What became of the request.
    pub outcome: Outcome,
}

/// Receives what the cloud's serving loop does, for metrics. Every method has a no-op default.
pub trait ServeObserver: Sync {
    /// One generation call over `size` summaries took `elapsed`.
    fn batch(&self, _size: usize, _elapsed: Duration) {}
    /// A request ended with `outcome`, `waited` after it arrived.
    fn request(&self, _outcome: Outcome, _waited: Duration) {}
}

/// Observes nothing.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoObserver;

impl ServeObserver for NoObserver {}

/// What a serving loop did.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ServeTotals {
    /// Requests answered.
    pub requests: u64,
    /// Generation calls made.
    pub batches: u64,
    /// Wall time inside generation calls, in ms.
    pub generation_ms: f64,
}

/// The cloud's role: a trained generator turning summaries into parameters.
pub struct CloudNode<'a> {
    generator: &'a dyn ParameterGenerator,
    download: Quantisation,
    signer: Option<&'a CloudSigner>,
    ledger: Option<&'a SequenceLedger>,
    replies: Option<&'a ReplyCache>,
}

impl std::fmt::Debug for CloudNode<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudNode")
            .field("generator", &self.generator.name())
            .field("download", &self.download)
            .field("signed", &self.signer.is_some())
            .field("ledger", &self.ledger.is_some())
            .field("reply_cache", &self.replies.is_some())
            .finish()
    }
}

/// The decoded part of a request that passed the cloud's checks.
struct Accepted {
    device: DeviceId,
    sequence: u64,
    nonce: u64,
    summary: AnchorSummary,
}

impl<'a> CloudNode<'a> {
    /// A cloud serving `generator`'s parameters, encoded as `download` says.
    pub fn new(generator: &'a dyn ParameterGenerator, download: Quantisation) -> Self {
        Self { generator, download, signer: None, ledger: None, replies: None }
    }

    /// The same cloud answering a byte-for-byte copy of a request it answered with parameters
    /// (a device's retry) with the same reply from `replies`, instead of adapting again — which
    /// with a ledger would be refused as a replay.
    pub fn with_reply_cache(self, replies: &'a ReplyCache) -> Self {
        Self { replies: Some(replies), ..self }
    }

    /// The same cloud refusing a summary whose sequence is not newer than the last `ledger` holds
    /// for its device, and recording every sequence it answers with parameters.
    pub fn with_ledger(self, ledger: &'a SequenceLedger) -> Self {
        Self { ledger: Some(ledger), ..self }
    }

    /// The same cloud signing every reply (params and errors) with `signer`
    /// ([`wire::sign`](crate::wire::sign)), so devices holding its public key can tell its
    /// replies from anyone else's.
    pub fn signed_by(self, signer: &'a CloudSigner) -> Self {
        Self { signer: Some(signer), ..self }
    }

    /// The schema hash devices must send.
    pub fn schema_hash(&self) -> SchemaHash {
        self.generator.schema().hash()
    }

    /// The remembered reply to a byte-for-byte copy of a request already answered, if it may be
    /// sent again: to the device the reply names (as far as the transport authenticated it), and,
    /// with a ledger, only for the device's latest answered request — a retry. An older copy is
    /// a replay and goes on to be refused (and audited) as one.
    fn repeat(&self, peer: &Peer, request: &[u8]) -> Option<Reply> {
        let bytes = self.replies?.get(request)?;
        if !self.check_identity(peer, &bytes) {
            return None;
        }
        if let Some(ledger) = self.ledger {
            let header = crate::wire::Header::peek(request).ok()?;
            if ledger.last(&DeviceId(header.device.to_string())) != Some(header.sequence) {
                return None;
            }
        }
        Some(Reply { bytes, outcome: Outcome::Repeated })
    }

    /// Whether a remembered `reply` may go to `peer`: the device it names is the one the
    /// transport authenticated (if it authenticated one).
    fn check_identity(&self, peer: &Peer, reply: &[u8]) -> bool {
        let named = crate::wire::unchecked_envelope(reply).and_then(|b| crate::wire::Header::peek(b).ok());
        match (&peer.identity, named) {
            (None, Some(_)) => true,
            (Some(identity), Some(header)) => identity.0 == header.device,
            (_, None) => false,
        }
    }

    /// Checks one request: a summary envelope, for this schema, from the device it claims to be,
    /// newer than the last the ledger holds for it and than any `batch` (earlier in this batch,
    /// by device) already took.
    fn check(&self, peer: &Peer, bytes: &[u8], batch: &mut HashMap<DeviceId, u64>) -> Result<Accepted, Reply> {
        let schema = self.schema_hash();
        let refuse = |envelope: Option<&Envelope>, outcome, reason: String| {
            let (device, sequence, nonce) =
                envelope.map_or((DeviceId(String::new()), 0, 0), |e| (e.device.clone(), e.sequence, e.nonce));
            let bytes =
                Envelope::error(device, sequence, schema, &reason).with_nonce(nonce).encode().unwrap_or_default();
            Reply { bytes, outcome }
        };
        let envelope = Envelope::decode(bytes).map_err(|e| refuse(None, Outcome::Malformed, e.to_string()))?;
        let e = Some(&envelope);
        if let Some(identity) = &peer.identity
            && identity != &envelope.device
        {
            let reason = format!("device `{identity}` sent a summary as `{}`", envelope.device);
            return Err(refuse(e, Outcome::Impersonation, reason));
        }
        if envelope.kind != MessageKind::Summary {
            return Err(refuse(e, Outcome::Malformed, format!("expected a summary, found {:?}", envelope.kind)));
        }
        if envelope.schema_hash != schema {
            let reason = format!("summary for slot schema {}, this cloud serves {schema}", envelope.schema_hash);
            return Err(refuse(e, Outcome::WrongSchema, reason));
        }
        if envelope.sequence >= MAX_SEQUENCE {
            let reason =
                format!("sequence {} is not below {MAX_SEQUENCE} (2^48), the bound of sequences", envelope.sequence);
            return Err(refuse(e, Outcome::Malformed, reason));
        }
        if let Some(ledger) = self.ledger {
            // Copies of one summary arriving together are one batch: the ledger has not seen any
            // of them yet, so the batch's own record counts too.
            let last = ledger.last(&envelope.device).max(batch.get(&envelope.device).copied());
            if let Some(last) = last.filter(|last| envelope.sequence <= *last) {
                let stale = Envelope::stale(envelope.device.clone(), envelope.sequence, schema, last);
                let bytes = stale.with_nonce(envelope.nonce).encode().unwrap_or_default();
                return Err(Reply { bytes, outcome: Outcome::Replayed });
            }
            let from = last.unwrap_or(0);
            if envelope.sequence - from > MAX_AHEAD {
                let ahead = Envelope::ahead(envelope.device.clone(), envelope.sequence, schema, from);
                let bytes = ahead.with_nonce(envelope.nonce).encode().unwrap_or_default();
                return Err(Reply { bytes, outcome: Outcome::Malformed });
            }
        }
        let summary =
            envelope.to_summary().map_err(|err| refuse(e, Outcome::Malformed, format!("summary rejected: {err}")))?;
        if self.ledger.is_some() {
            batch.insert(envelope.device.clone(), envelope.sequence);
        }
        Ok(Accepted { device: envelope.device, sequence: envelope.sequence, nonce: envelope.nonce, summary })
    }

    /// One reply per request, in order. Checks every request, generates for all that pass in
    /// one call (each alone if that call fails, so that one device's bad summary fails only that
    /// device), and returns how long generation took.
    pub fn respond(&self, requests: &[(&Peer, &[u8])]) -> (Vec<Reply>, Duration) {
        let mut batch = HashMap::new();
        let checked: Vec<Result<Accepted, Reply>> = requests
            .iter()
            .map(|(peer, bytes)| match self.repeat(peer, bytes) {
                Some(reply) => Err(reply),
                None => self.check(peer, bytes, &mut batch),
            })
            .collect();
        let summaries: Vec<AnchorSummary> =
            checked.iter().filter_map(|c| c.as_ref().ok()).map(|a| a.summary.clone()).collect();
        let t0 = Instant::now();
        let mut generated =
            if summaries.is_empty() { Vec::new() } else { generate_each(self.generator, &summaries) }.into_iter();
        // No generation call, no generation time: a batch of refusals is not a batch.
        let elapsed = if summaries.is_empty() { Duration::ZERO } else { t0.elapsed() };
        let schema = self.schema_hash();
        let mut answered: Vec<(DeviceId, u64)> = Vec::new();
        let mut replies: Vec<Reply> = checked
            .into_iter()
            .map(|c| match c {
                Err(reply) => reply,
                Ok(accepted) => {
                    let params = generated
                        .next()
                        .unwrap_or_else(|| Err(GeneratorError::Output("no parameters for a summary".into())));
                    let encoded = params.map_err(|e| format!("generation: {e}")).and_then(|p| {
                        Envelope::params_encoded(accepted.device.clone(), accepted.sequence, &p, self.download)
                            .and_then(|e| e.with_nonce(accepted.nonce).encode())
                            .map_err(|e| format!("encoding the parameters: {e}"))
                    });
                    match encoded {
                        Ok(bytes) => {
                            answered.push((accepted.device, accepted.sequence));
                            Reply { bytes, outcome: Outcome::Adapted }
                        }
                        Err(reason) => Reply {
                            bytes: Envelope::error(accepted.device, accepted.sequence, schema, &reason)
                                .with_nonce(accepted.nonce)
                                .encode()
                                .unwrap_or_default(),
                            outcome: Outcome::Refused,
                        },
                    }
                }
            })
            .collect();
        // The sequences answered are on record before any reply leaves: a restarted cloud still
        // refuses them. If they cannot be recorded, no parameters leave either.
        if let Some(Err(e)) = self.ledger.map(|l| l.record(answered.iter().map(|(d, s)| (d, *s)))) {
            let reason = format!("the cloud could not record the request's sequence: {e}");
            for reply in replies.iter_mut().filter(|r| r.outcome == Outcome::Adapted) {
                if let Ok(env) = Envelope::decode(&reply.bytes) {
                    let error = Envelope::error(env.device, env.sequence, schema, &reason).with_nonce(env.nonce);
                    *reply = Reply { bytes: error.encode().unwrap_or_default(), outcome: Outcome::Refused };
                }
            }
        }
        let replies: Vec<Reply> = replies
            .into_iter()
            .map(|reply| match self.signer {
                Some(signer) if reply.outcome != Outcome::Repeated => {
                    Reply { bytes: crate::wire::sign(&reply.bytes, signer), ..reply }
                }
                _ => reply,
            })
            .collect();
        if let Some(cache) = self.replies {
            for ((_, request), reply) in requests.iter().zip(&replies).filter(|(_, r)| r.outcome == Outcome::Adapted) {
                cache.insert(request, &reply.bytes);
            }
        }
        (replies, elapsed)
    }

    /// Serves `endpoint` until `stop` is set (answering what has arrived by then) or the endpoint
    /// closes: waits for a request, lets more join it for up to `policy.max_wait` (or until
    /// `policy.max_batch`), answers the batch.
    ///
    /// # Errors
    /// Only a failing endpoint; a request's problem is its own error reply.
    pub fn serve(
        &self,
        endpoint: &mut dyn CloudEndpoint,
        policy: &BatchPolicy,
        stop: &AtomicBool,
        observer: &dyn ServeObserver,
    ) -> Result<ServeTotals, TransportError> {
        // How often an idle loop looks at `stop`.
        const POLL: Duration = Duration::from_millis(50);
        let mut totals = ServeTotals::default();
        loop {
            // Once stopping, what has already arrived is still answered; then the loop ends.
            let stopping = stop.load(Ordering::Relaxed);
            let first = match endpoint.next_request(if stopping { Duration::ZERO } else { POLL }) {
                Ok(Some(r)) => r,
                Ok(None) if stopping => break,
                Ok(None) => continue,
                Err(TransportError::Closed(_)) => break,
                Err(e) => return Err(e),
            };
            let started = Instant::now();
            let deadline = started + policy.max_wait;
            let mut batch = vec![(first, started)];
            while batch.len() < policy.max_batch.max(1) {
                let left = deadline.saturating_duration_since(Instant::now());
                match endpoint.next_request(left) {
                    Ok(Some(r)) => batch.push((r, Instant::now())),
                    Ok(None) | Err(TransportError::Closed(_)) => break,
                    Err(e) => return Err(e),
                }
                if left.is_zero() {
                    break;
                }
            }
            let views: Vec<(&Peer, &[u8])> = batch.iter().map(|(r, _)| (&r.peer, r.bytes.as_slice())).collect();
            let (replies, elapsed) = self.respond(&views);
            if !elapsed.is_zero() {
                observer.batch(replies.iter().filter(|r| r.outcome == Outcome::Adapted).count(), elapsed);
                totals.batches += 1;
            }
            totals.generation_ms += elapsed.as_secs_f64() * 1e3;
            for ((request, arrived), reply) in batch.into_iter().zip(replies) {
                totals.requests += 1;
                observer.request(reply.outcome, arrived.elapsed());
                // A reply the transport cannot carry is that device's loss, not the cloud's.
                let _ = endpoint.reply(request.ticket, reply.bytes);
            }
        }
        Ok(totals)
    }
}

/// A request's nonce from the operating system's random source: unpredictable, so that no reply
/// prepared in advance can answer the request.
fn random_nonce() -> Result<u64, WireError> {
    let mut bytes = [0u8; 8];
    getrandom::getrandom(&mut bytes).map_err(|e| WireError::Content(format!("no randomness for a nonce: {e}")))?;
    Ok(u64::from_le_bytes(bytes))
}

/// Parameters for every summary, one result each: the batch when it succeeds, and otherwise
/// each summary alone, so that one device's bad summary fails only that device.
pub fn generate_each(
    generator: &dyn ParameterGenerator,
    summaries: &[AnchorSummary],
) -> Vec<Result<GeneratedParams, GeneratorError>> {
    match generator.generate_batch(summaries) {
        Ok(all) if all.len() == summaries.len() => all.into_iter().map(Ok).collect(),
        _ => summaries
            .iter()
            .map(|s| {
                let mut one = generator.generate_batch(std::slice::from_ref(s))?;
                one.pop().ok_or_else(|| GeneratorError::Output("no parameters for a summary".into()))
            })
            .collect(),
    }
}

/// Why a device did not install a reply. It keeps its last good parameters in every case.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal {
    /// The cloud answered with an error reply.
    #[error("the cloud refused the request: {0}")]
    Cloud(String),
    /// The reply is not a params envelope.
    #[error("expected parameters, received a {0:?} message")]
    Unexpected(MessageKind),
    /// The reply is addressed to another device.
    #[error("parameters addressed to `{0}`")]
    OtherDevice(DeviceId),
    /// The reply does not answer the request outstanding (its sequence, or its nonce, differs).
    #[error("reply to request {found} (or with another nonce), but the request outstanding is {expected:?}")]
    Stale {
        /// The request waiting for a reply, if any.
        expected: Option<u64>,
        /// The sequence the reply echoes.
        found: u64,
    },
    /// The parameters are for another slot schema.
    #[error("parameters for slot schema {found}, this model has {expected}")]
    Schema {
        /// This model's schema.
        expected: SchemaHash,
        /// The reply's.
        found: SchemaHash,
    },
    /// The payload does not decode.
    #[error("parameters do not decode: {0}")]
    Payload(#[from] WireError),
    /// The model refused the values (shape, dtype, non-finite, missing slot).
    #[error("parameters refused: {0}")]
    Install(#[from] ModelError),
}

impl Refusal {
    /// A short name of the refusal's kind, for counters and logs.
    pub fn kind(&self) -> &'static str {
        match self {
            Refusal::Cloud(_) => "cloud-refused",
            Refusal::Unexpected(_) => "unexpected-kind",
            Refusal::OtherDevice(_) => "other-device",
            Refusal::Stale { .. } => "stale",
            Refusal::Schema { .. } => "wrong-schema",
            Refusal::Payload(_) => "malformed-params",
            Refusal::Install(_) => "invalid-params",
        }
    }
}

/// A window summarised on the device.
#[derive(Debug, Clone)]
pub struct Summarised {
    /// The summary to upload.
    pub summary: AnchorSummary,
    /// Time computing frame features, in ms (0 for a summary of served clips).
    pub feature_ms: f64,
}

/// The device's role: serves its model, summarises windows, installs what the cloud sends.
pub struct DeviceNode {
    /// Its id.
    pub id: DeviceId,
    /// The model it serves; its installed slot values are the last good parameters.
    pub model: Box<dyn DeviceModel>,
    /// Its anchor reasoner.
    pub reasoner: Box<dyn AnchorReasoner>,
    reference: FeatureStats,
    sequence: u64,
    /// The request waiting for its reply: sequence and nonce.
    outstanding: Option<(u64, u64)>,
    /// Differential privacy spent by the private summaries made so far.
    privacy: PrivacyAccountant,
    /// What serving computed for the most recent clips, oldest first, for the next summary.
    kept: KeptWindow,
}

/// The features serving computed for the last clips served, up to a capacity in clips.
#[derive(Debug, Default)]
struct KeptWindow {
    capacity: usize,
    clips: usize,
    /// Per serving call: its clips, `[n·T, d]` frame features, `[n, e]` question embeddings.
    batches: std::collections::VecDeque<(usize, HostTensor, Option<HostTensor>)>,
}

impl KeptWindow {
    fn push(&mut self, clips: usize, frames: HostTensor, text: Option<HostTensor>) {
        if self.capacity == 0 {
            return;
        }
        self.clips += clips;
        self.batches.push_back((clips, frames, text));
        // Oldest batches go while the rest still fill the capacity.
        while let Some((n, _, _)) = self.batches.front() {
            if self.clips - n < self.capacity {
                break;
            }
            self.clips -= n;
            self.batches.pop_front();
        }
    }

    /// The kept rows as one `[N, d]` matrix (and `[clips, e]` questions, when every batch has
    /// them); `None` when nothing is kept.
    fn window(&self) -> Option<(usize, HostTensor, Option<HostTensor>)> {
        let (batches, clips) = (&self.batches, self.clips);
        let stack = |parts: Vec<&HostTensor>| -> Option<HostTensor> {
            let width = *parts.first()?.shape().get(1)?;
            let values: Vec<f32> = parts.iter().flat_map(|t| t.values().iter().copied()).collect();
            HostTensor::new(vec![values.len() / width.max(1), width], values).ok()
        };
        let frames = stack(batches.iter().map(|(_, f, _)| f).collect())?;
        let text = batches.iter().map(|(_, _, t)| t.as_ref()).collect::<Option<Vec<_>>>().and_then(stack);
        Some((clips, frames, text))
    }
}

impl std::fmt::Debug for DeviceNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceNode")
            .field("id", &self.id)
            .field("model", &self.model.name())
            .field("sequence", &self.sequence)
            .field("outstanding", &self.outstanding)
            .finish_non_exhaustive()
    }
}

impl DeviceNode {
    /// A device serving `model`, standardising its summaries with the cloud's `reference`.
    pub fn new(
        id: DeviceId,
        model: Box<dyn DeviceModel>,
        reasoner: Box<dyn AnchorReasoner>,
        reference: FeatureStats,
    ) -> Self {
        Self {
            id,
            model,
            reasoner,
            reference,
            sequence: 0,
            outstanding: None,
            privacy: PrivacyAccountant::default(),
            kept: KeptWindow::default(),
        }
    }

    /// The sequence number of the last request made.
    pub fn sequence(&self) -> u64 {
        self.sequence
    }

    /// Continues numbering requests after `sequence` (a device restarting from its saved state,
    /// so that the cloud never sees a sequence number twice).
    pub fn resume_after(&mut self, sequence: u64) {
        self.sequence = self.sequence.max(sequence.min(MAX_SEQUENCE - 1));
    }

    /// The reference statistics summaries are standardised with.
    pub fn reference(&self) -> &FeatureStats {
        &self.reference
    }

    /// Summarises an unlabelled `window` (frame features with the base slot values, then the
    /// anchor reasoner).
    ///
    /// # Errors
    /// The model's or the reasoner's.
    pub fn summarise(&mut self, window: &[Clip], seed: u64) -> Result<Summarised, SummaryError> {
        let t0 = Instant::now();
        let features = self.model.frame_features(window)?;
        let feature_ms = t0.elapsed().as_secs_f64() * 1e3;
        let summary =
            summarise_window(self.model.as_ref(), self.reasoner.as_ref(), window, &features, &self.reference, seed)?;
        Ok(self.summarised(summary, feature_ms))
    }

    fn summarised(&mut self, summary: AnchorSummary, feature_ms: f64) -> Summarised {
        // Every private summary drew fresh noise: counted once made, whether or not it is sent.
        if let Some(cost) = summary.privacy {
            self.privacy.record(cost);
        }
        Summarised { summary, feature_ms }
    }

    /// Keeps what serving computes for the last `clips` clips served (0: nothing), for
    /// [`DeviceNode::summarise_served`].
    pub fn keep_served(&mut self, clips: usize) {
        self.kept = KeptWindow { capacity: clips, ..KeptWindow::default() };
    }

    /// Answers `clips` — the device's serving path — and keeps their frame features and
    /// question embeddings for the next summary (see [`DeviceNode::keep_served`]).
    ///
    /// # Errors
    /// The model's.
    pub fn serve(&mut self, clips: &[Clip]) -> Result<Vec<usize>, ModelError> {
        let served = self.model.serve(clips)?;
        let rows = served.logits.rows().ok_or_else(|| ModelError::Input("logits are not 2-D".into()))?;
        let answers = rows.map(crate::model::argmax).collect();
        self.kept.push(clips.len(), served.frame_features, served.text_features);
        Ok(answers)
    }

    /// Summarises the clips served last (the newest serving calls holding
    /// [`DeviceNode::keep_served`]'s count) from what serving kept: no forward pass, so its cost
    /// is what adaptation adds to serving. The window rolls on as clips are served.
    ///
    /// # Errors
    /// [`crate::AnchorError::Empty`] when nothing was kept; the reasoner's.
    pub fn summarise_served(&mut self, seed: u64) -> Result<Summarised, SummaryError> {
        let (clips, features, text) = self.kept.window().ok_or(crate::AnchorError::Empty)?;
        let summary =
            summarise_features(self.reasoner.as_ref(), &features, text.as_ref(), clips, &self.reference, seed)?;
        Ok(self.summarised(summary, 0.0))
    }

    /// The differential privacy this device's private summaries have spent together; `None`
    /// before its first private summary.
    pub fn privacy_spent(&self) -> Option<PrivacySpent> {
        self.privacy.spent()
    }

    /// The ledger of privacy spent, to keep across restarts.
    pub fn privacy_ledger(&self) -> PrivacyAccountant {
        self.privacy
    }

    /// Continues from a kept ledger: what a restarted device spent before counts.
    pub fn resume_privacy(&mut self, ledger: PrivacyAccountant) {
        self.privacy = ledger;
    }

    /// The request carrying `summary`, under the next sequence number; it becomes the request
    /// outstanding (a reply to any earlier one is refused as stale).
    ///
    /// # Errors
    /// As [`Envelope::summary`].
    pub fn request(&mut self, summary: &AnchorSummary) -> Result<Envelope, WireError> {
        // A device that has used every sequence number cannot make a request the cloud would
        // take as newer.
        let sequence = self.sequence.checked_add(1).filter(|s| *s < MAX_SEQUENCE).ok_or_else(|| {
            WireError::Content(format!(
                "request sequence numbers exhausted: this device's counter is {}, the last below {MAX_SEQUENCE}; if \
                 the cloud's ledger (cloud/sequences.log) holds it too, the ledger must forget this device before it \
                 can ask again",
                self.sequence
            ))
        })?;
        let nonce = random_nonce()?;
        let envelope =
            Envelope::summary(self.id.clone(), sequence, self.model.schema().hash(), summary)?.with_nonce(nonce);
        self.sequence = sequence;
        self.outstanding = Some((sequence, nonce));
        Ok(envelope)
    }

    /// Validates `reply` as the answer to the outstanding request and installs its parameters;
    /// returns them. On any refusal the model keeps its parameters and the request stays
    /// outstanding only if the reply was not an answer to it.
    ///
    /// # Errors
    /// A [`Refusal`] naming what was wrong.
    pub fn accept(&mut self, reply: &Envelope) -> Result<GeneratedParams, Refusal> {
        if reply.device != self.id {
            return Err(Refusal::OtherDevice(reply.device.clone()));
        }
        // Sequence 0 numbers no request: the transport refused the device's message before the
        // cloud could read it (a chunk it could not take). The request outstanding is over.
        if reply.sequence == 0 && reply.kind == MessageKind::Error && self.outstanding.is_some() {
            self.outstanding = None;
            return Err(Refusal::Cloud(reply.to_error().unwrap_or_else(|e| format!("unreadable reason ({e})"))));
        }
        if self.outstanding != Some((reply.sequence, reply.nonce)) {
            return Err(Refusal::Stale { expected: self.outstanding.map(|(s, _)| s), found: reply.sequence });
        }
        // From here the reply answers the outstanding request: whatever it holds, it is final.
        self.outstanding = None;
        match reply.kind {
            MessageKind::Params => {}
            MessageKind::Error => {
                // The cloud names the last sequence it accepted from this device: a later one than
                // the device's (it lost its count), or one far behind a request that jumped ahead
                // (a damaged count). Either way the next request numbers right after it; this
                // reply answers the outstanding request, so it is the cloud's word.
                if let Some(last) = reply.last_accepted() {
                    self.sequence = last.min(MAX_SEQUENCE - 1);
                }
                return Err(Refusal::Cloud(reply.to_error().unwrap_or_else(|e| format!("unreadable reason ({e})"))));
            }
            other => return Err(Refusal::Unexpected(other)),
        }
        let expected = self.model.schema().hash();
        if reply.schema_hash != expected {
            return Err(Refusal::Schema { expected, found: reply.schema_hash });
        }
        let params = reply.to_params()?;
        self.model.apply(params.clone())?;
        Ok(params)
    }

    /// Installs parameters from the device's own saved state (validated like a reply).
    ///
    /// # Errors
    /// As [`DeviceModel::apply`].
    pub fn restore(&mut self, params: GeneratedParams) -> Result<(), ModelError> {
        self.model.apply(params)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{HostTensor, QuantisedTensor, SlotSchema, SlotSpec};

    /// Fails any batch holding a summary of 13 clips, like a generator meeting one device's
    /// malformed summary.
    struct Picky(SlotSchema);

    impl ParameterGenerator for Picky {
        fn schema(&self) -> &SlotSchema {
            &self.0
        }

        fn generate_batch(&self, summaries: &[AnchorSummary]) -> Result<Vec<GeneratedParams>, GeneratorError> {
            if summaries.iter().any(|s| s.clips == 13) {
                return Err(GeneratorError::Dimension { expected: 1, found: 13 });
            }
            let one = |s: &AnchorSummary| GeneratedParams {
                schema_hash: self.0.hash(),
                tensors: [("w".to_string(), HostTensor::new(vec![1], vec![s.clips as f32]).expect("1 value"))].into(),
            };
            Ok(summaries.iter().map(one).collect())
        }
    }

    fn picky() -> Picky {
        Picky(SlotSchema::new(vec![SlotSpec::f32("w", vec![1])]).expect("schema"))
    }

    /// Device `a`'s summary request under `sequence`, with a nonce derived from it.
    fn numbered(generator: &Picky, sequence: u64) -> Vec<u8> {
        Envelope::summary(DeviceId("a".into()), sequence, generator.0.hash(), &summary(2))
            .map(|e| e.with_nonce(sequence.wrapping_mul(11)))
            .and_then(|e| e.encode())
            .expect("encodes")
    }

    fn summary(clips: u32) -> AnchorSummary {
        let anchors = HostTensor::new(vec![1, 1], vec![0.5]).expect("fits");
        AnchorSummary {
            anchors: QuantisedTensor::quantise(&anchors, Quantisation::F32).expect("finite"),
            mean: vec![0.0],
            var: vec![1.0],
            frames: clips,
            clips,
            text_anchors: None,
            privacy: None,
        }
    }

    fn request(generator: &Picky, device: &str, clips: u32) -> Vec<u8> {
        Envelope::summary(DeviceId(device.into()), 1, generator.0.hash(), &summary(clips))
            .and_then(|e| e.encode())
            .expect("encodes")
    }

    #[test]
    fn one_bad_summary_fails_only_its_own_device() {
        let generator = picky();
        let results = generate_each(&generator, &[summary(2), summary(13), summary(4)]);
        assert_eq!(results.len(), 3);
        let value = |r: &Result<GeneratedParams, GeneratorError>| r.as_ref().ok().map(|p| p.tensors["w"].values()[0]);
        assert_eq!((value(&results[0]), value(&results[2])), (Some(2.0), Some(4.0)));
        assert!(matches!(results[1], Err(GeneratorError::Dimension { found: 13, .. })));
    }

    #[test]
    fn every_request_gets_its_own_reply() {
        let generator = picky();
        let cloud = CloudNode::new(&generator, Quantisation::F32);
        let anyone = Peer::default();
        let a_peer = Peer { identity: Some(DeviceId("a".into())), address: "test".into() };
        let good = request(&generator, "a", 2);
        let bad = request(&generator, "b", 13);
        let other_schema = Envelope::summary(DeviceId("c".into()), 1, SchemaHash(7), &summary(2))
            .and_then(|e| e.encode())
            .expect("encodes");
        let impostor = request(&generator, "d", 2);
        let requests: Vec<(&Peer, &[u8])> = vec![
            (&a_peer, &good),
            (&anyone, &bad),
            (&anyone, b"garbage"),
            (&anyone, &other_schema),
            (&a_peer, &impostor),
        ];
        let (replies, _) = cloud.respond(&requests);
        let outcomes: Vec<Outcome> = replies.iter().map(|r| r.outcome).collect();
        assert_eq!(
            outcomes,
            [Outcome::Adapted, Outcome::Refused, Outcome::Malformed, Outcome::WrongSchema, Outcome::Impersonation]
        );
        let decoded: Vec<Envelope> = replies.iter().map(|r| Envelope::decode(&r.bytes).expect("decodes")).collect();
        assert_eq!(decoded[0].to_params().expect("params").tensors["w"].values(), &[2.0]);
        assert_eq!(decoded[1].device, DeviceId("b".into()));
        assert!(decoded[1].to_error().expect("error reply").contains("generation"));
    }

    #[test]
    fn a_retry_gets_the_same_reply_and_is_not_adapted_again() {
        let generator = picky();
        let ledger = SequenceLedger::in_memory();
        let cache = ReplyCache::default();
        let cloud = CloudNode::new(&generator, Quantisation::F32).with_ledger(&ledger).with_reply_cache(&cache);
        let anyone = Peer::default();
        let first = request(&generator, "a", 2);
        let (replies, _) = cloud.respond(&[(&anyone, &first)]);
        assert_eq!(replies[0].outcome, Outcome::Adapted);
        // The same bytes again (a re-published request): the same reply, nothing generated.
        let (again, elapsed) = cloud.respond(&[(&anyone, &first)]);
        assert_eq!(again[0].outcome, Outcome::Repeated);
        assert_eq!(again[0].bytes, replies[0].bytes);
        assert!(elapsed.is_zero(), "a repeated request is not generated for");
        // Another device's transport identity does not get device a's reply.
        let other = Peer { identity: Some(DeviceId("b".into())), address: "test".into() };
        let (stolen, _) = cloud.respond(&[(&other, &first)]);
        assert_eq!(stolen[0].outcome, Outcome::Impersonation);
        // A new nonce is a new request: refused as a replay of sequence 1.
        let renonced = Envelope::decode(&first).expect("decodes").with_nonce(99).encode().expect("encodes");
        let (replayed, _) = cloud.respond(&[(&anyone, &renonced)]);
        assert_eq!(replayed[0].outcome, Outcome::Replayed);
        // Once the device has moved on, a copy of its older request is a replay, remembered or not.
        let newer = Envelope::decode(&request(&generator, "a", 2)).expect("decodes");
        let newer = Envelope { sequence: 2, ..newer }.encode().expect("encodes");
        assert_eq!(cloud.respond(&[(&anyone, &newer)]).0[0].outcome, Outcome::Adapted);
        assert_eq!(cloud.respond(&[(&anyone, &first)]).0[0].outcome, Outcome::Replayed);
        assert_eq!(cloud.respond(&[(&anyone, &newer)]).0[0].outcome, Outcome::Repeated);
    }

    /// Issue 28: the cloud recorded sequence 2^48, after which its device had no valid sequence
    /// left. Bounds are exact (below 2^48 on both sides), and a jump past the last accepted by
    /// more than 2^24 is refused naming where to continue — so from any sequence the cloud holds
    /// the device resynchronises.
    #[test]
    fn sequence_bounds_are_exact_and_a_jump_is_refused_naming_where_to_continue() {
        let generator = picky();
        let ledger = SequenceLedger::in_memory();
        let cloud = CloudNode::new(&generator, Quantisation::F32).with_ledger(&ledger);
        let anyone = Peer::default();
        let numbered = |sequence: u64| numbered(&generator, sequence);
        for at_or_beyond in [MAX_SEQUENCE, MAX_SEQUENCE + 1, u64::MAX] {
            assert_eq!(cloud.respond(&[(&anyone, &numbered(at_or_beyond))]).0[0].outcome, Outcome::Malformed);
        }
        assert_eq!(ledger.last(&DeviceId("a".into())), None, "nothing recorded");
        // A flipped high bit of a device's counter: refused, naming 0 (nothing accepted yet).
        let (replies, _) = cloud.respond(&[(&anyone, &numbered(1 << 40))]);
        let ahead = Envelope::decode(&replies[0].bytes).expect("decodes");
        assert_eq!((replies[0].outcome, ahead.last_accepted()), (Outcome::Malformed, Some(0)));
        assert_eq!(cloud.respond(&[(&anyone, &numbered(MAX_AHEAD))]).0[0].outcome, Outcome::Adapted);
        let (replies, _) = cloud.respond(&[(&anyone, &numbered(2 * MAX_AHEAD + 1))]);
        let ahead = Envelope::decode(&replies[0].bytes).expect("decodes");
        assert_eq!(ahead.last_accepted(), Some(MAX_AHEAD));
        assert_eq!(cloud.respond(&[(&anyone, &numbered(2 * MAX_AHEAD))]).0[0].outcome, Outcome::Adapted);
    }

    #[test]
    fn a_summary_not_newer_than_the_last_answered_is_refused_and_names_it() {
        let generator = picky();
        let ledger = SequenceLedger::in_memory();
        let cloud = CloudNode::new(&generator, Quantisation::F32).with_ledger(&ledger);
        let anyone = Peer::default();
        let numbered = |sequence: u64| numbered(&generator, sequence);
        let (first, second, old) = (numbered(5), numbered(6), numbered(5));
        // Copies arriving in one batch: only the first is answered.
        let (replies, _) = cloud.respond(&[(&anyone, &first), (&anyone, &first), (&anyone, &numbered(4))]);
        let outcomes: Vec<Outcome> = replies.iter().map(|r| r.outcome).collect();
        assert_eq!(outcomes, [Outcome::Adapted, Outcome::Replayed, Outcome::Replayed]);
        assert_eq!(replies[0].outcome, Outcome::Adapted);
        assert_eq!(Envelope::decode(&replies[0].bytes).expect("decodes").nonce, 55, "the nonce is echoed");
        let (replies, _) = cloud.respond(&[(&anyone, &old), (&anyone, &second)]);
        assert_eq!(replies.iter().map(|r| r.outcome).collect::<Vec<_>>(), [Outcome::Replayed, Outcome::Adapted]);
        let stale = Envelope::decode(&replies[0].bytes).expect("decodes");
        assert_eq!((stale.last_accepted(), stale.nonce), (Some(5), 55));
        assert_eq!(ledger.last(&DeviceId("a".into())), Some(6));
    }

    proptest::proptest! {
        /// However requests are replayed, duplicated or reordered across and within batches, the
        /// sequences answered with parameters strictly increase, and every refusal names a last
        /// sequence no older than the one refused.
        #[test]
        fn answered_sequences_strictly_increase(batches in proptest::collection::vec(proptest::collection::vec(0u64..12, 1..6), 1..6)) {
            let generator = picky();
            let ledger = SequenceLedger::in_memory();
            let cloud = CloudNode::new(&generator, Quantisation::F32).with_ledger(&ledger);
            let anyone = Peer::default();
            let mut answered = Vec::new();
            for batch in batches {
                let bytes: Vec<Vec<u8>> = batch
                    .iter()
                    .map(|s| Envelope::summary(DeviceId("a".into()), *s, generator.0.hash(), &summary(2)).and_then(|e| e.encode()).expect("encodes"))
                    .collect();
                let views: Vec<(&Peer, &[u8])> = bytes.iter().map(|b| (&anyone, b.as_slice())).collect();
                let (replies, _) = cloud.respond(&views);
                for (sequence, reply) in batch.iter().zip(&replies) {
                    let envelope = Envelope::decode(&reply.bytes).expect("decodes");
                    match reply.outcome {
                        Outcome::Adapted => answered.push(*sequence),
                        Outcome::Replayed => proptest::prop_assert!(envelope.last_accepted().is_some_and(|l| l >= *sequence)),
                        other => proptest::prop_assert!(false, "unexpected {:?}", other),
                    }
                }
            }
            proptest::prop_assert!(answered.windows(2).all(|w| w[0] < w[1]), "{:?}", answered);
        }
    }

    #[test]
    fn a_device_told_of_a_later_sequence_numbers_after_it() {
        let mut device = node();
        let frames = HostTensor::new(vec![1], vec![0.0]).expect("fits");
        let window =
            [Clip { frames, question: String::new(), caption: String::new(), answer: None, provenance: Vec::new() }];
        let summary = device.summarise(&window, 1).expect("summary").summary;
        let request = device.request(&summary).expect("request");
        let stale = Envelope::stale(request.device.clone(), request.sequence, request.schema_hash, 40)
            .with_nonce(request.nonce);
        assert!(matches!(device.accept(&stale), Err(Refusal::Cloud(_))));
        let summary = device.summarise(&window, 1).expect("summary").summary;
        let next = device.request(&summary).expect("request");
        assert_eq!(next.sequence, 41);
    }

    /// Issue 28: a device whose counter jumped far ahead is told the last sequence accepted and
    /// continues right after it (back down); a transport's refusal (sequence 0) ends its request
    /// with the reason instead of leaving it to time out.
    #[test]
    fn a_device_told_its_counter_is_far_ahead_continues_after_the_clouds_and_a_transport_refusal_ends_its_request() {
        let mut device = node();
        let frames = HostTensor::new(vec![1], vec![0.0]).expect("fits");
        let window =
            [Clip { frames, question: String::new(), caption: String::new(), answer: None, provenance: Vec::new() }];
        device.resume_after(1 << 40);
        let summary = device.summarise(&window, 1).expect("summary").summary;
        let request = device.request(&summary).expect("request");
        let ahead = Envelope::ahead(request.device.clone(), request.sequence, request.schema_hash, 12)
            .with_nonce(request.nonce);
        assert!(matches!(device.accept(&ahead), Err(Refusal::Cloud(_))));
        let request = device.request(&summary).expect("request");
        assert_eq!(request.sequence, 13);
        let refused = Envelope::error(request.device.clone(), 0, request.schema_hash, "chunk refused: malformed chunk");
        match device.accept(&refused) {
            Err(Refusal::Cloud(reason)) => assert!(reason.contains("malformed chunk"), "{reason}"),
            other => panic!("{other:?}"),
        }
        // Nothing is outstanding any more: a late reply to sequence 13 is stale.
        let late = Envelope::error(request.device.clone(), 13, request.schema_hash, "late").with_nonce(request.nonce);
        assert!(matches!(device.accept(&late), Err(Refusal::Stale { .. })));
    }

    /// A one-slot model: its "answer" is the slot's value.
    struct OneSlot {
        schema: SlotSchema,
        w: f32,
    }

    impl DeviceModel for OneSlot {
        fn schema(&self) -> &SlotSchema {
            &self.schema
        }
        fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
            HostTensor::new(vec![clips.len(), 1], vec![self.w; clips.len()])
                .map_err(|e| ModelError::Input(e.to_string()))
        }
        fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
            HostTensor::new(vec![clips.len(), 1], vec![0.5; clips.len()]).map_err(|e| ModelError::Input(e.to_string()))
        }
        fn current_params(&self) -> GeneratedParams {
            GeneratedParams {
                schema_hash: self.schema.hash(),
                tensors: [("w".to_string(), HostTensor::new(vec![1], vec![self.w]).expect("1 value"))].into(),
            }
        }
        fn install(&mut self, params: &crate::ValidatedParams) -> Result<(), ModelError> {
            self.w = params.params().tensors.get("w").map_or(self.w, |t| t.values()[0]);
            Ok(())
        }
    }

    struct First;

    impl AnchorReasoner for First {
        fn select(&self, _standardised: &HostTensor, _seed: u64) -> Result<Vec<usize>, crate::AnchorError> {
            Ok(vec![0])
        }
        fn quantisation(&self) -> Quantisation {
            Quantisation::F32
        }
    }

    fn node() -> DeviceNode {
        let schema = picky().0;
        let reference = FeatureStats { mean: vec![0.0], std: vec![1.0] };
        DeviceNode::new(DeviceId("a".into()), Box::new(OneSlot { schema, w: 0.0 }), Box::new(First), reference)
    }

    /// A model whose frame feature is each clip's one frame value.
    struct Echo(SlotSchema);

    impl DeviceModel for Echo {
        fn schema(&self) -> &SlotSchema {
            &self.0
        }
        fn answer_logits(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
            HostTensor::new(vec![clips.len(), 2], vec![0.0; 2 * clips.len()])
                .map_err(|e| ModelError::Input(e.to_string()))
        }
        fn frame_features(&self, clips: &[Clip]) -> Result<HostTensor, ModelError> {
            let values = clips.iter().map(|c| c.frames.values()[0]).collect();
            HostTensor::new(vec![clips.len(), 1], values).map_err(|e| ModelError::Input(e.to_string()))
        }
        fn current_params(&self) -> GeneratedParams {
            GeneratedParams { schema_hash: self.0.hash(), tensors: Default::default() }
        }
        fn install(&mut self, _params: &crate::ValidatedParams) -> Result<(), ModelError> {
            Ok(())
        }
    }

    fn clip(value: f32) -> Clip {
        let frames = HostTensor::new(vec![1], vec![value]).expect("fits");
        Clip { frames, question: String::new(), caption: String::new(), answer: None, provenance: Vec::new() }
    }

    proptest::proptest! {
        /// Summarising what serving kept is summarising the last window served, without a
        /// forward pass.
        #[test]
        fn a_summary_of_served_clips_is_the_summary_of_the_last_window(
            batches in proptest::collection::vec(proptest::collection::vec(-5f32..5.0, 1..4), 1..8),
            capacity in 1usize..8, seed in 0u64..1000,
        ) {
            let reference = FeatureStats { mean: vec![0.0], std: vec![1.0] };
            let mut device = DeviceNode::new(DeviceId("a".into()), Box::new(Echo(picky().0)), Box::new(First), reference);
            device.keep_served(capacity);
            for batch in &batches {
                let clips: Vec<Clip> = batch.iter().copied().map(clip).collect();
                proptest::prop_assert_eq!(device.serve(&clips).expect("served").len(), clips.len());
            }
            // The newest batches that hold at least `capacity` clips (all of them if fewer).
            let mut window: Vec<Clip> = Vec::new();
            for batch in batches.iter().rev() {
                if window.len() >= capacity {
                    break;
                }
                window.splice(0..0, batch.iter().copied().map(clip));
            }
            let served = device.summarise_served(seed).expect("summary");
            let direct = device.summarise(&window, seed).expect("summary");
            proptest::prop_assert_eq!(served.summary, direct.summary);
            // Nothing kept, nothing to summarise.
            device.keep_served(capacity);
            proptest::prop_assert!(matches!(
                device.summarise_served(seed),
                Err(SummaryError::Anchor(crate::AnchorError::Empty))
            ));
        }
    }

    /// How a reply differs from the right answer to the outstanding request.
    #[derive(Debug, Clone)]
    enum Twist {
        None,
        Device(String),
        Sequence(u64),
        Nonce(u64),
        Schema(u64),
        Kind(bool),
    }

    fn twist() -> impl proptest::strategy::Strategy<Value = Twist> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Twist::None),
            "[a-z]{0,3}".prop_map(Twist::Device),
            any::<u64>().prop_map(Twist::Sequence),
            any::<u64>().prop_map(Twist::Nonce),
            any::<u64>().prop_map(Twist::Schema),
            any::<bool>().prop_map(Twist::Kind),
        ]
    }

    proptest::proptest! {
        /// A device installs exactly the parameters answering its outstanding request, for its
        /// schema; any other reply leaves its parameters as they were.
        #[test]
        fn only_the_answer_to_the_outstanding_request_is_installed(twist in twist(), value in -10.0f32..10.0) {
            let mut device = node();
            let frames = HostTensor::new(vec![1], vec![0.0]).expect("fits");
            let window = [Clip { frames, question: String::new(), caption: String::new(), answer: None, provenance: Vec::new() }];
            let summarised = device.summarise(&window, 1).expect("summary");
            let request = device.request(&summarised.summary).expect("request");
            let params = GeneratedParams {
                schema_hash: device.model.schema().hash(),
                tensors: [("w".to_string(), HostTensor::new(vec![1], vec![value]).expect("1 value"))].into(),
            };
            let mut reply =
                Envelope::params(request.device.clone(), request.sequence, &params).expect("encodes").with_nonce(request.nonce);
            let honest = match &twist {
                Twist::None => true,
                Twist::Device(d) => { reply.device = DeviceId(d.clone()); d == "a" }
                Twist::Sequence(s) => { reply.sequence = *s; *s == request.sequence }
                Twist::Nonce(n) => { reply.nonce = *n; *n == request.nonce }
                Twist::Schema(h) => { reply.schema_hash = SchemaHash(*h); *h == params.schema_hash.0 }
                Twist::Kind(summary) => {
                    reply = if *summary {
                        Envelope { kind: MessageKind::Summary, ..reply }
                    } else {
                        Envelope::error(reply.device, reply.sequence, reply.schema_hash, "no").with_nonce(reply.nonce)
                    };
                    false
                }
            };
            let accepted = device.accept(&reply);
            proptest::prop_assert_eq!(accepted.is_ok(), honest, "{:?}", accepted);
            let w = device.model.current_params().tensors["w"].values()[0];
            proptest::prop_assert_eq!(w, if honest { value } else { 0.0 });
            // A second delivery of the same reply is stale: nothing is installed twice.
            proptest::prop_assert!(device.accept(&reply).is_err());
        }
    }
}
