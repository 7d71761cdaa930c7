//! The cloud's Prometheus metrics (`GET /metrics`, text format 0.0.4), through the
//! `prometheus-client` crate.

use std::time::Duration;

use mmpg::node::{Outcome, ServeObserver};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// A request's outcome, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    /// `adapted`, `malformed`, `wrong_schema`, `impersonation`, `refused` (the cloud node's), or
    /// `busy`, `timeout`, `not_ready` (the server's, before a request reaches the node).
    pub outcome: &'static str,
}

/// Requests by outcome, batch sizes, generation and request latency, bytes in and out.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    requests: Family<OutcomeLabel, Counter>,
    batch_size: Histogram,
    generation_seconds: Histogram,
    request_seconds: Histogram,
    bytes_in: Counter,
    bytes_out: Counter,
    revocation_list_valid: Gauge,
    audit_suppressed: Family<ReasonLabel, Counter>,
}

/// An audit reason, as a label.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// `impersonation`, `revoked`, `rate_limited`, `anonymous`, `replayed`.
    pub reason: &'static str,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("mmpg");
        let requests = Family::<OutcomeLabel, Counter>::default();
        registry.register("adapt_requests", "Adaptation requests by outcome", requests.clone());
        // 1, 2, 4 … 4096 summaries.
        let batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 13));
        registry.register("batch_size", "Summaries per generation call", batch_size.clone());
        // 50 µs … ~3.3 s.
        let generation_seconds = Histogram::new(exponential_buckets(5e-5, 2.0, 17));
        registry.register("generation_seconds", "Wall time of one generation call", generation_seconds.clone());
        let request_seconds = Histogram::new(exponential_buckets(5e-5, 2.0, 17));
        registry.register(
            "request_seconds",
            "Time from a request's body received to its reply ready",
            request_seconds.clone(),
        );
        let bytes_in = Counter::default();
        registry.register("request_bytes", "Bytes of adaptation requests received", bytes_in.clone());
        let bytes_out = Counter::default();
        registry.register("reply_bytes", "Bytes of adaptation replies sent", bytes_out.clone());
        let revocation_list_valid = Gauge::default();
        registry.register(
            "revocation_list_valid",
            "1 when the revocation list's current content is in force, 0 when it was refused (the previous list is)",
            revocation_list_valid.clone(),
        );
        let audit_suppressed = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "audit_suppressed",
            "Refusals left out of the audit log by its per-peer throttling, by reason, since start",
            audit_suppressed.clone(),
        );
        Self {
            registry,
            requests,
            batch_size,
            generation_seconds,
            request_seconds,
            bytes_in,
            bytes_out,
            revocation_list_valid,
            audit_suppressed,
        }
    }
}

impl Metrics {
    /// Counts a request that ended with `outcome` (a server-side outcome: `busy`, `timeout`, …).
    pub fn outcome(&self, outcome: &'static str) {
        self.requests.get_or_create(&OutcomeLabel { outcome }).inc();
    }

    /// A request of `size` bytes arrived.
    pub fn received(&self, size: usize) {
        self.bytes_in.inc_by(size as u64);
    }

    /// A reply of `size` bytes is ready, `elapsed` after its request arrived.
    pub fn replied(&self, size: usize, elapsed: Duration) {
        self.bytes_out.inc_by(size as u64);
        self.request_seconds.observe(elapsed.as_secs_f64());
    }

    /// The security state as the gate sees it now: whether the revocation list is in force, and
    /// how many refusals its throttling left out of the audit log.
    pub fn security(&self, revocations_valid: bool, suppressed: &std::collections::BTreeMap<&'static str, u64>) {
        self.revocation_list_valid.set(i64::from(revocations_valid));
        for (reason, count) in suppressed {
            // The gate's counts only grow: the counter catches up with them.
            let counter = self.audit_suppressed.get_or_create(&ReasonLabel { reason });
            counter.inc_by(count.saturating_sub(counter.get()));
        }
    }

    /// The text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

impl ServeObserver for Metrics {
    fn batch(&self, size: usize, elapsed: Duration) {
        self.batch_size.observe(size as f64);
        self.generation_seconds.observe(elapsed.as_secs_f64());
    }

    fn request(&self, outcome: Outcome, _waited: Duration) {
        self.outcome(outcome.name());
    }
}

/// The cumulative bucket counts of a histogram in a text exposition: `(upper bound, count)`.
/// For `mmpg load`, which reads the server's batch sizes.
pub fn histogram_buckets(exposition: &str, name: &str) -> Vec<(String, u64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    exposition
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(&prefix)?;
            let (bound, rest) = rest.split_once("\"}")?;
            Some((bound.to_string(), rest.trim().parse().ok()?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observed_batches_and_outcomes_appear_in_the_exposition() {
        let m = Metrics::default();
        m.batch(3, Duration::from_millis(2));
        m.request(Outcome::Adapted, Duration::ZERO);
        m.outcome("busy");
        let text = m.render();
        assert!(text.contains("mmpg_adapt_requests_total{outcome=\"adapted\"} 1"), "{text}");
        assert!(text.contains("mmpg_adapt_requests_total{outcome=\"busy\"} 1"), "{text}");
        let buckets = histogram_buckets(&text, "mmpg_batch_size");
        assert_eq!(buckets.iter().find(|(le, _)| le == "2.0").map(|b| b.1), Some(0));
        assert_eq!(buckets.iter().find(|(le, _)| le == "4.0").map(|b| b.1), Some(1));
    }
}
