//! What a load run measures (`mmpg load`, over HTTP(S) or an MQTT broker): N devices sending
//! real summaries as fast as replies come, each request's latency, and the failures by kind.
//! The load generators live with their transports (`mmpg-http`, `mmpg-mqtt`); the report and the
//! load's device names are shared here.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The id of the load's device `i`: `load-00000`, `load-00001`, … (`mmpg provision --load N`
/// provisions these).
pub fn load_device(i: usize) -> String {
    format!("load-{i:05}")
}

/// The nearest-rank `q`-quantile of ascending `sorted` values (NaN when empty).
pub fn percentile(sorted: &[f64], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted[rank - 1]
}

/// Bytes that crossed the wire, protocol framing included, as the load generator counted them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireBytes {
    /// Bytes the devices sent.
    pub up: u64,
    /// Bytes the devices received.
    pub down: u64,
    /// Of `up` and `down`, the payloads (envelopes, chunk headers included).
    pub payload: u64,
}

/// What a load run measured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LoadReport {
    /// Concurrent devices.
    pub devices: usize,
    /// Seconds of load.
    pub seconds: f64,
    /// Requests answered with parameters.
    pub adapted: u64,
    /// Adaptations per second.
    pub throughput: f64,
    /// Latency percentiles of answered requests, in ms.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// Slowest.
    pub max_ms: f64,
    /// Failed requests by kind (`status-503`, `timeout`, `refused`, …).
    pub errors: BTreeMap<String, u64>,
    /// Seconds until every device was connected (before the timed load; MQTT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connect_seconds: Option<f64>,
    /// Bytes on the wire with the protocol's framing (MQTT).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wire: Option<WireBytes>,
}

impl LoadReport {
    /// The report of `devices` devices loading for `seconds`, from every answered request's
    /// latency (ms, any order) and the failures by kind.
    pub fn of(devices: usize, seconds: f64, mut latencies: Vec<f64>, errors: BTreeMap<String, u64>) -> Self {
        latencies.sort_by(f64::total_cmp);
        Self {
            devices,
            seconds,
            adapted: latencies.len() as u64,
            throughput: latencies.len() as f64 / seconds.max(1e-9),
            p50_ms: percentile(&latencies, 0.5),
            p90_ms: percentile(&latencies, 0.9),
            p99_ms: percentile(&latencies, 0.99),
            max_ms: latencies.last().copied().unwrap_or(f64::NAN),
            errors,
            connect_seconds: None,
            wire: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!((percentile(&v, 0.5), percentile(&v, 0.99), percentile(&v, 1.0)), (50.0, 99.0, 100.0));
        assert!(percentile(&[], 0.5).is_nan());
        let report = LoadReport::of(2, 2.0, vec![3.0, 1.0, 2.0], BTreeMap::new());
        assert_eq!((report.adapted, report.throughput, report.max_ms), (3, 1.5, 3.0));
    }
}
