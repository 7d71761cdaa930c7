//! A load generator: N devices, each on its own keep-alive connection, sending summary
//! envelopes to `POST /v1/adapt` as fast as replies come, for a fixed time.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mmpg::data::DeviceId;
use mmpg::load::{LoadReport, load_device};
use mmpg::security::{DeviceKit, Kit};
use mmpg::slots::SchemaHash;
use mmpg::wire::{Envelope, MessageKind};

use crate::HttpError;
use crate::server::OCTET_STREAM;

/// What to load and for how long.
#[derive(Debug, Clone)]
pub struct LoadSettings {
    /// The cloud's URL.
    pub url: String,
    /// PEM CA to trust over HTTPS.
    pub ca: Option<PathBuf>,
    /// A provisioned kit (`mmpg provision --load N`): device `load-NNNNN` presents its
    /// certificate from it (mutual TLS).
    pub kit: Option<PathBuf>,
    /// Concurrent devices.
    pub devices: usize,
    /// How long to send.
    pub duration: Duration,
    /// Per-request timeout.
    pub timeout: Duration,
}

/// One device's loop: its own client (so its own connection), envelopes with its id and
/// increasing sequence numbers (after the last the cloud remembers), until `until`.
async fn device(
    client: reqwest::Client,
    url: String,
    id: DeviceId,
    template: (SchemaHash, Vec<u8>),
    until: Instant,
    timeout: Duration,
) -> (Vec<f64>, BTreeMap<String, u64>) {
    let mut latencies = Vec::new();
    let mut errors = BTreeMap::new();
    let mut sequence = 0u64;
    while Instant::now() < until {
        let Some(next) = sequence.checked_add(1).filter(|s| *s < mmpg::wire::MAX_SEQUENCE) else {
            *errors.entry("sequence-exhausted".to_string()).or_default() += 1;
            break;
        };
        sequence = next;
        let body = match Envelope::new(MessageKind::Summary, template.0, id.clone(), sequence, template.1.clone())
            .and_then(|e| e.encode())
        {
            Ok(b) => b,
            Err(_) => {
                *errors.entry("encode".to_string()).or_default() += 1;
                break;
            }
        };
        let t0 = Instant::now();
        let sent = client
            .post(&url)
            .header(reqwest::header::CONTENT_TYPE, OCTET_STREAM)
            .timeout(timeout)
            .body(body)
            .send()
            .await;
        let kind = match sent {
            Ok(response) => {
                let status = response.status();
                match response.bytes().await {
                    Ok(bytes) if status.is_success() && mmpg::wire::peek_kind(&bytes) == Some(MessageKind::Params) => {
                        latencies.push(t0.elapsed().as_secs_f64() * 1e3);
                        continue;
                    }
                    Ok(bytes) if status.as_u16() == 422 => {
                        // A cloud remembering this device's later sequences (an earlier load):
                        // number after them, as a device does.
                        let last = mmpg::wire::unchecked_envelope(&bytes)
                            .and_then(|b| Envelope::decode(b).ok())
                            .and_then(|e| e.last_accepted());
                        if let Some(last) = last.filter(|l| *l >= sequence && *l + 1 < mmpg::wire::MAX_SEQUENCE) {
                            sequence = last;
                            continue;
                        }
                        "refused".to_string()
                    }
                    Ok(_) => format!("status-{}", status.as_u16()),
                    Err(e) if e.is_timeout() => "timeout".to_string(),
                    Err(_) => "body".to_string(),
                }
            }
            Err(e) if e.is_timeout() => "timeout".to_string(),
            Err(e) if e.is_connect() => "connect".to_string(),
            Err(_) => "request".to_string(),
        };
        *errors.entry(kind).or_default() += 1;
        // A failing server is not hammered in a tight loop.
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (latencies, errors)
}

/// Runs the load: device `i` sends `templates[i % len]` (schema hash, summary payload).
///
/// # Errors
/// [`HttpError::Tls`], [`HttpError::Client`], [`HttpError::Runtime`].
pub fn run(settings: &LoadSettings, templates: &[(SchemaHash, Vec<u8>)]) -> Result<LoadReport, HttpError> {
    if templates.is_empty() {
        return Err(HttpError::Client("no summaries to send".into()));
    }
    let shared_tls = match (&settings.ca, &settings.kit) {
        (Some(ca), None) => Some(crate::tls::client_config(ca, None)?),
        _ => None,
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| HttpError::Runtime(e.to_string()))?;
    let url = format!("{}/v1/adapt", settings.url.trim_end_matches('/'));
    let mut clients = Vec::with_capacity(settings.devices);
    for i in 0..settings.devices {
        let mut builder = reqwest::Client::builder().pool_max_idle_per_host(1).connect_timeout(Duration::from_secs(10));
        if let Some(tls) = &shared_tls {
            builder = builder.use_preconfigured_tls(tls.clone());
        }
        if let (Some(ca), Some(kit)) = (&settings.ca, &settings.kit) {
            let own = DeviceKit::new(&Kit::new(kit).device_dir(&load_device(i)));
            builder = builder.use_preconfigured_tls(crate::tls::client_config(ca, Some((&own.cert(), &own.key())))?);
        }
        clients.push(builder.build().map_err(|e| HttpError::Client(e.to_string()))?);
    }
    let started = Instant::now();
    let until = started + settings.duration;
    let results = runtime.block_on(async {
        let tasks: Vec<_> = clients
            .into_iter()
            .enumerate()
            .map(|(i, client)| {
                let template = templates[i % templates.len()].clone();
                let id = DeviceId(load_device(i));
                tokio::spawn(device(client, url.clone(), id, template, until, settings.timeout))
            })
            .collect();
        let mut out = Vec::with_capacity(tasks.len());
        for t in tasks {
            out.push(t.await);
        }
        out
    });
    let seconds = started.elapsed().as_secs_f64();
    let mut latencies = Vec::new();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    for result in results {
        match result {
            Ok((l, e)) => {
                latencies.extend(l);
                for (k, n) in e {
                    *errors.entry(k).or_default() += n;
                }
            }
            Err(_) => *errors.entry("task-panicked".into()).or_default() += 1,
        }
    }
    // Throughput over the load's set duration; `seconds` is the wall time it took.
    let mut report = LoadReport::of(settings.devices, settings.duration.as_secs_f64(), latencies, errors);
    report.seconds = seconds;
    Ok(report)
}
