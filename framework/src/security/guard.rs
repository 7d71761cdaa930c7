//! The cloud's gate in front of the generator: who may ask, as whom, and how often.
//!
//! A transport that authenticated its peer (mutual TLS: the certificate's device id) asks the
//! guard before handing a request to the cloud node. The guard refuses, and writes an audit line
//! for, a request with no authenticated identity, from a revoked device, whose envelope names
//! another device than the certificate (impersonation), or beyond the device's rate (a token
//! bucket per device, so one device cannot starve the fleet).
//!
//! Audit lines are throttled per peer and reason: the first refusal of a kind is written at
//! once, repeats within [`AUDIT_INTERVAL`] are counted and the next line written states how many
//! were left out, so that a flood of refusals cannot fill the disk and nothing goes uncounted
//! ([`Guard::suppressed`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::audit::{AuditEvent, AuditLog};
use super::revocation::Revocations;

/// Why a request was refused at the gate.
#[derive(Debug, Clone, PartialEq)]
pub enum Denial {
    /// The transport authenticated no identity.
    Anonymous,
    /// The device's certificate is revoked.
    Revoked,
    /// The envelope names another device than the certificate.
    Impersonation {
        /// The device the envelope names.
        claimed: String,
    },
    /// The device is over its rate; it may retry after this long.
    RateLimited {
        /// Until a token is available.
        retry_after: Duration,
    },
}

impl Denial {
    /// A short label (metrics, audit `reason` prefix).
    pub fn label(&self) -> &'static str {
        match self {
            Denial::Anonymous => "anonymous",
            Denial::Revoked => "revoked",
            Denial::Impersonation { .. } => "impersonation",
            Denial::RateLimited { .. } => "rate_limited",
        }
    }

    /// What the refused peer is told.
    pub fn message(&self, identity: Option<&str>) -> String {
        let who = identity.unwrap_or("(none)");
        match self {
            Denial::Anonymous => "no client certificate identifies this peer".into(),
            Denial::Revoked => format!("device `{who}` is revoked"),
            Denial::Impersonation { claimed } => {
                format!(
                    "the peer is authenticated as device `{who}` (its certificate, or its broker user), the envelope \
                     names `{claimed}`"
                )
            }
            Denial::RateLimited { retry_after } => {
                format!("device `{who}` is over its request rate; retry after {} ms", retry_after.as_millis())
            }
        }
    }
}

/// A token bucket: `burst` tokens, refilled at `rate` per second.
#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Shortest time between two audit lines for the same peer and reason.
pub const AUDIT_INTERVAL: Duration = Duration::from_secs(1);

/// Most (peer, reason) pairs whose throttling is remembered; past it, pairs quiet for a whole
/// interval are forgotten (they would be audited at once anyway).
const MAX_THROTTLED: usize = 1 << 16;

/// When a (peer, reason) pair was last audited, and how many refusals were left out since.
#[derive(Debug, Clone, Copy)]
struct Throttle {
    at: Instant,
    suppressed: u64,
}

/// The gate. Shared by every connection of a cloud.
#[derive(Debug)]
pub struct Guard {
    revocations: Revocations,
    audit: AuditLog,
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    throttled: Mutex<HashMap<(String, &'static str), Throttle>>,
    suppressed: Mutex<BTreeMap<&'static str, u64>>,
}

impl Guard {
    /// A gate reading `revocations`, writing `audit`, allowing each device `rate_per_s`
    /// requests per second on average and `burst` at once.
    pub fn new(revocations: Revocations, audit: AuditLog, rate_per_s: f64, burst: u32) -> Self {
        Self {
            revocations,
            audit,
            rate_per_s: rate_per_s.max(f64::MIN_POSITIVE),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
            throttled: Mutex::new(HashMap::new()),
            suppressed: Mutex::new(BTreeMap::new()),
        }
    }

    /// The audit log it writes.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
    }

    /// The revocation list it reads.
    pub fn revocations(&self) -> &Revocations {
        &self.revocations
    }

    /// Re-reads the revocation list once a second on a thread of its own, whether or not
    /// requests come: an edit made while no device asks is taken then, not only at the next
    /// request (when a later, broken edit could already have replaced it). The thread ends with
    /// the last other holder of the guard.
    pub fn keep_revocations_current(self: &std::sync::Arc<Self>) {
        let guard = std::sync::Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("mmpg-revocations".into()).spawn(move || {
            while let Some(guard) = guard.upgrade() {
                drop(guard.revocations.problem());
                drop(guard);
                std::thread::sleep(Duration::from_secs(1));
            }
        });
        if let Err(e) = spawned {
            eprintln!("mmpg cloud: the revocation list is re-read at each request only: {e}");
        }
    }

    /// Refusals left out of the audit log by its throttling, by reason, since the cloud started.
    pub fn suppressed(&self) -> BTreeMap<&'static str, u64> {
        self.suppressed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Whether a refusal of `peer` for `reason` is written now; `Some(n)`: yes, `n` left out
    /// since the last line. Counted when not.
    fn throttle(&self, peer: &str, reason: &'static str, now: Instant) -> Option<u64> {
        let mut throttled = self.throttled.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if throttled.len() >= MAX_THROTTLED {
            throttled.retain(|_, t| now.saturating_duration_since(t.at) < AUDIT_INTERVAL);
        }
        let key = (peer.to_string(), reason);
        match throttled.get_mut(&key) {
            Some(t) if now.saturating_duration_since(t.at) < AUDIT_INTERVAL => {
                t.suppressed += 1;
                drop(throttled);
                *self
                    .suppressed
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .entry(reason)
                    .or_default() += 1;
                None
            }
            Some(t) => {
                let left_out = t.suppressed;
                *t = Throttle { at: now, suppressed: 0 };
                Some(left_out)
            }
            None => {
                // Past the cap even after forgetting the quiet pairs: audited, not remembered.
                if throttled.len() < MAX_THROTTLED {
                    throttled.insert(key, Throttle { at: now, suppressed: 0 });
                }
                Some(0)
            }
        }
    }

    fn write(&self, device: Option<&str>, reason: String, address: &str, left_out: u64) {
        let reason = if left_out > 0 {
            format!("{reason} (and {left_out} like it left out of this log since the last line)")
        } else {
            reason
        };
        // The refusal stands even if the log cannot be written; the failure is said here.
        if let Err(e) = self.audit.record(&AuditEvent::now("refused", device, reason, Some(address))) {
            eprintln!("audit log {}: {e}", self.audit.path().display());
        }
    }

    /// Admits a request from the peer at `address`, authenticated as `identity`, whose envelope
    /// names `claimed` (`None` when the bytes are not an envelope: the cloud node refuses those
    /// itself). A refusal is audited.
    ///
    /// # Errors
    /// The [`Denial`].
    pub fn admit(&self, identity: Option<&str>, claimed: Option<&str>, address: &str) -> Result<(), Denial> {
        let now = Instant::now();
        let verdict = self.judge(identity, claimed, now);
        if let Err(denial) = &verdict {
            self.record(denial, identity.or(claimed), identity, address, now);
        }
        verdict
    }

    /// Checks, once a request's body is read, that its envelope names the device the transport
    /// authenticated (`claimed`); a transport admits the peer itself first with
    /// [`Guard::admit`] and no claim, before reading the body. A refusal is audited.
    ///
    /// # Errors
    /// [`Denial::Anonymous`], [`Denial::Impersonation`].
    pub fn admit_claim(&self, identity: Option<&str>, claimed: &str, address: &str) -> Result<(), Denial> {
        let verdict = match identity {
            None => Err(Denial::Anonymous),
            Some(id) if id != claimed => Err(Denial::Impersonation { claimed: claimed.to_string() }),
            Some(_) => Ok(()),
        };
        if let Err(denial) = &verdict {
            self.record(denial, identity, identity, address, Instant::now());
        }
        verdict
    }

    /// Admits a request for anything but adaptation (the cloud's info, its bundle, metrics):
    /// an authenticated, unrevoked peer; no rate limit. A refusal is audited.
    ///
    /// # Errors
    /// [`Denial::Anonymous`] or [`Denial::Revoked`].
    pub fn admit_reader(&self, identity: Option<&str>, address: &str) -> Result<(), Denial> {
        let verdict = match identity {
            None => Err(Denial::Anonymous),
            Some(id) if self.revocations.is_revoked(id) => Err(Denial::Revoked),
            Some(_) => Ok(()),
        };
        if let Err(denial) = &verdict {
            self.record(denial, identity, identity, address, Instant::now());
        }
        verdict
    }

    /// Audits `reply` (what the cloud node answered the peer at `address`) if it refuses a
    /// replayed summary — an attack on the device's identity, or a device that lost its count.
    pub fn audit_if_replayed(&self, reply: &[u8], address: &str) {
        let envelope = crate::wire::unchecked_envelope(reply).and_then(|b| crate::wire::Envelope::decode(b).ok());
        if let Some(envelope) = envelope.filter(|e| e.last_accepted().is_some()) {
            // A stale sequence is a replay (or a device that lost its count); one far ahead is a
            // damaged count (or an attack on the ledger): audited under their own reasons.
            let label = if envelope.is_ahead() { "sequence_ahead" } else { "replayed" };
            let reason = format!("{label}: {}", envelope.to_error().unwrap_or_default());
            if let Some(left_out) = self.throttle(&envelope.device.0, label, Instant::now()) {
                self.write(Some(&envelope.device.0), reason, address, left_out);
            }
        }
    }

    /// Audits a refusal the cloud node made itself (a replayed summary): `device`, `reason`,
    /// the peer's `address`; throttled like the gate's own.
    pub fn audit_refusal(&self, device: &str, reason: &str, address: &str) {
        if let Some(left_out) = self.throttle(device, "replayed", Instant::now()) {
            self.write(Some(device), reason.to_string(), address, left_out);
        }
    }

    fn record(&self, denial: &Denial, device: Option<&str>, identity: Option<&str>, address: &str, now: Instant) {
        // Throttled by the authenticated identity (or, without one, the address): a name an
        // envelope claims costs the attacker nothing, so it must not cost the cloud memory.
        let peer = identity.unwrap_or(address);
        if let Some(left_out) = self.throttle(peer, denial.label(), now) {
            self.write(device, format!("{}: {}", denial.label(), denial.message(identity)), address, left_out);
        }
    }

    fn judge(&self, identity: Option<&str>, claimed: Option<&str>, now: Instant) -> Result<(), Denial> {
        let Some(identity) = identity else { return Err(Denial::Anonymous) };
        if self.revocations.is_revoked(identity) {
            return Err(Denial::Revoked);
        }
        if let Some(claimed) = claimed.filter(|c| *c != identity) {
            return Err(Denial::Impersonation { claimed: claimed.to_string() });
        }
        let mut buckets = self.buckets.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        // A device seen before costs no allocation: the common case on every request.
        if !buckets.contains_key(identity) {
            buckets.insert(identity.to_string(), Bucket { tokens: self.burst, at: now });
        }
        // Inserted just above; were it absent, refusing is the safe side.
        let Some(bucket) = buckets.get_mut(identity) else {
            return Err(Denial::RateLimited { retry_after: Duration::ZERO });
        };
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate_per_s).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            let retry_after = Duration::from_secs_f64((1.0 - bucket.tokens) / self.rate_per_s);
            Err(Denial::RateLimited { retry_after })
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn guard(dir: &std::path::Path, rate: f64, burst: u32) -> Guard {
        let audit = AuditLog::open(&dir.join("audit.jsonl")).expect("opens");
        Guard::new(Revocations::watch(&dir.join("revoked.txt")), audit, rate, burst)
    }

    #[test]
    fn each_refusal_is_typed_and_audited() {
        let dir = tempfile::tempdir().expect("temp dir");
        let g = guard(dir.path(), 1.0, 5);
        assert_eq!(g.admit(None, Some("a"), "p"), Err(Denial::Anonymous));
        assert_eq!(g.admit(Some("a"), Some("b"), "p"), Err(Denial::Impersonation { claimed: "b".into() }));
        assert_eq!(g.admit(Some("a"), Some("a"), "p"), Ok(()));
        std::fs::write(dir.path().join("revoked.txt"), "a\n").expect("writes");
        assert_eq!(g.admit(Some("a"), Some("a"), "p"), Err(Denial::Revoked));
        let events = AuditLog::read(&dir.path().join("audit.jsonl")).expect("reads");
        let reasons: Vec<_> = events.iter().map(|e| e.reason.split(':').next().unwrap_or("").to_string()).collect();
        assert_eq!(reasons, ["anonymous", "impersonation", "revoked"]);
        assert_eq!(events[1].device.as_deref(), Some("a"));
        assert_eq!(events[1].peer.as_deref(), Some("p"));
    }

    #[test]
    fn a_flooding_device_leaves_one_audit_line_a_second_and_revoked_readers_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let g = guard(dir.path(), 0.001, 1);
        for _ in 0..50 {
            let _ = g.admit(Some("f"), Some("f"), "p");
        }
        let events = AuditLog::read(&dir.path().join("audit.jsonl")).expect("reads");
        assert_eq!(events.len(), 1, "{events:?}");
        assert_eq!(g.admit_reader(None, "p"), Err(Denial::Anonymous));
        std::fs::write(dir.path().join("revoked.txt"), "f # lost\n").expect("writes");
        assert_eq!(g.admit_reader(Some("f"), "p"), Err(Denial::Revoked));
        assert_eq!(g.admit_reader(Some("g"), "p"), Ok(()));
        // The first was admitted (a burst of 1), the next 49 refused: one line, 48 counted.
        assert_eq!(g.suppressed().get("rate_limited"), Some(&48));
    }

    /// Issue 28: repeated refusals (impersonation, revoked, replayed) are throttled per peer and
    /// reason and counted; another peer's, or another reason's, are written at once; the line
    /// after a quiet interval says how many were left out.
    #[test]
    fn refusal_storms_are_throttled_per_peer_and_reason_and_counted() {
        let dir = tempfile::tempdir().expect("temp dir");
        let g = guard(dir.path(), 1000.0, 1000);
        let start = Instant::now();
        for i in 0..500 {
            // A different claimed name each time: still one peer.
            let claimed = format!("victim-{i}");
            assert!(g.judge(Some("mallory"), Some(&claimed), start).is_err());
            g.record(&Denial::Impersonation { claimed }, Some("mallory"), Some("mallory"), "p", start);
        }
        g.record(&Denial::Impersonation { claimed: "x".into() }, Some("eve"), Some("eve"), "p", start);
        g.record(&Denial::Revoked, Some("mallory"), Some("mallory"), "p", start);
        for _ in 0..20 {
            g.audit_refusal("mallory", "replayed: stale", "p");
        }
        let later = start + AUDIT_INTERVAL;
        g.record(&Denial::Impersonation { claimed: "y".into() }, Some("mallory"), Some("mallory"), "p", later);
        let events = AuditLog::read(&dir.path().join("audit.jsonl")).expect("reads");
        let lines: Vec<_> = events.iter().map(|e| (e.device.clone().unwrap_or_default(), e.reason.clone())).collect();
        assert_eq!(lines.len(), 5, "{lines:#?}");
        assert!(lines[4].1.contains("and 499 like it left out"), "{lines:#?}");
        let suppressed = g.suppressed();
        assert_eq!((suppressed.get("impersonation"), suppressed.get("replayed")), (Some(&499), Some(&19)));
        assert!(g.throttled.lock().expect("lock").len() <= 4, "claimed names are not remembered");
    }

    #[test]
    fn one_device_over_its_rate_does_not_touch_another() {
        let dir = tempfile::tempdir().expect("temp dir");
        let g = guard(dir.path(), 0.001, 3);
        let now = Instant::now();
        for _ in 0..3 {
            assert_eq!(g.judge(Some("greedy"), None, now), Ok(()));
        }
        assert!(matches!(g.judge(Some("greedy"), None, now), Err(Denial::RateLimited { .. })));
        assert_eq!(g.judge(Some("honest"), None, now), Ok(()));
    }

    proptest! {
        /// Over any span, a device gets at most `burst + rate × span` requests through.
        #[test]
        fn admissions_never_exceed_the_bucket(rate in 0.5f64..50.0, burst in 1u32..20, gaps_ms in proptest::collection::vec(0u64..200, 1..200)) {
            let dir = tempfile::tempdir().expect("temp dir");
            let g = guard(dir.path(), rate, burst);
            let start = Instant::now();
            let mut now = start;
            let mut admitted = 0u32;
            for gap in gaps_ms {
                now += Duration::from_millis(gap);
                if g.judge(Some("d"), None, now).is_ok() {
                    admitted += 1;
                }
            }
            let span = now.duration_since(start).as_secs_f64();
            prop_assert!(f64::from(admitted) <= f64::from(burst) + rate * span + 1e-9);
        }
    }
}
