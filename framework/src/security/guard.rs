//! The cloud's gate in front of the generator: who may ask, as whom, and how often.
//!
//! A transport that authenticated its peer (mutual TLS: the certificate's device id) asks the
//! guard before handing a request to the cloud node. The guard refuses, and writes an audit line
//! for, a request with no authenticated identity, from a revoked device, whose envelope names
//! another device than the certificate (impersonation), or beyond the device's rate (a token
//! bucket per device, so one device cannot starve the fleet).

use std::collections::HashMap;
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

/// The gate. Shared by every connection of a cloud.
#[derive(Debug)]
pub struct Guard {
    revocations: Revocations,
    audit: AuditLog,
    rate_per_s: f64,
    burst: f64,
    buckets: Mutex<HashMap<String, Bucket>>,
    /// When each device's last rate-limit refusal was audited: one line per device per second,
    /// so a flooding device cannot flood the log too.
    rate_audited: Mutex<HashMap<String, Instant>>,
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
            rate_audited: Mutex::new(HashMap::new()),
        }
    }

    /// The audit log it writes.
    pub fn audit(&self) -> &AuditLog {
        &self.audit
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
            let reason = format!("replayed: {}", envelope.to_error().unwrap_or_default());
            self.audit_refusal(&envelope.device.0, &reason, address);
        }
    }

    /// Audits a refusal the cloud node made itself (a replayed summary): `device`, `reason`,
    /// the peer's `address`.
    pub fn audit_refusal(&self, device: &str, reason: &str, address: &str) {
        if let Err(e) = self.audit.record(&AuditEvent::now("refused", Some(device), reason, Some(address))) {
            eprintln!("audit log {}: {e}", self.audit.path().display());
        }
    }

    fn record(&self, denial: &Denial, device: Option<&str>, identity: Option<&str>, address: &str, now: Instant) {
        if matches!(denial, Denial::RateLimited { .. }) {
            let mut audited = self.rate_audited.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let key = device.unwrap_or_default().to_string();
            if audited.get(&key).is_some_and(|t| now.saturating_duration_since(*t) < Duration::from_secs(1)) {
                return;
            }
            audited.insert(key, now);
        }
        let reason = format!("{}: {}", denial.label(), denial.message(identity));
        // The refusal stands even if the log cannot be written; the failure is said here.
        if let Err(e) = self.audit.record(&AuditEvent::now("refused", device, reason, Some(address))) {
            eprintln!("audit log {}: {e}", self.audit.path().display());
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
