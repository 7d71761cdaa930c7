//! `mmpg load`: many concurrent devices against a serving cloud.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use mmpg::deploy::device_from_bundle;
use mmpg::load::load_device;
use mmpg::runtime::{Composer, RunError};
use mmpg::wire::{Envelope, encode_summary};
use mmpg::{DeviceId, Registry, seed};
use mmpg_http::CloudClient;
use mmpg_http::load::{LoadSettings, run as load};
use mmpg_http::metrics::histogram_buckets;

/// Options of `mmpg load`.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// The cloud's URL.
    pub cloud: Option<String>,
    /// Concurrent devices.
    pub devices: usize,
    /// Seconds of load.
    pub seconds: u64,
    /// Where to save one envelope for external tools.
    pub save_envelope: Option<PathBuf>,
    /// JSON report path.
    pub report: Option<PathBuf>,
    /// `http` or `mqtt` (default: the deployment's transport).
    pub transport: Option<String>,
    /// Under mqtt: the broker (default: `[transport.settings] broker`).
    pub broker: Option<String>,
}

/// Summaries of every device of the deployment, computed as devices compute them, from the
/// cloud's own bundle.
fn summaries(
    composer: &Composer<'_>,
    client: &CloudClient,
    key: Option<&mmpg::security::CloudKey>,
) -> anyhow::Result<Vec<(mmpg::SchemaHash, Vec<u8>)>> {
    let bundle = client.bundle(Duration::from_secs(30), key).context("fetching the cloud's bundle")?;
    let data = composer.data_source()?;
    let mut node = device_from_bundle(composer, data.as_ref(), &bundle, DeviceId("load".into()))?;
    let mut out = Vec::new();
    for (_, domain) in composer.deployment.device_domains() {
        let window: Vec<mmpg::Clip> = data
            .clips(&domain, mmpg::Split::Stream, composer.deployment.fleet.window_clips, domain.seed)?
            .iter()
            .map(mmpg::Clip::unlabelled)
            .collect();
        let summarised = node.summarise(&window, seed::derive(domain.seed, 0xADE + 1))?;
        out.push((bundle.schema_hash(), encode_summary(&summarised.summary)?));
    }
    Ok(out)
}

/// Every load device's broker user name and password from the kit (`mmpg provision --load N`).
fn load_credentials(kit: &mmpg::security::Kit, devices: usize) -> anyhow::Result<Vec<mmpg_mqtt::Credentials>> {
    (0..devices)
        .map(|i| {
            let id = load_device(i);
            let path = mmpg::security::DeviceKit::new(&kit.device_dir(&id)).broker_password();
            let password = mmpg_mqtt::credentials::read_password(&path).with_context(|| {
                format!("load device {id}'s broker password: run `mmpg provision --load {devices}`")
            })?;
            Ok(mmpg_mqtt::Credentials { username: mmpg_mqtt::topics::level(&DeviceId(id)), password })
        })
        .collect()
}

/// Each MQTT device holds a connection (a file descriptor): raise this process's soft limit to
/// its hard limit when `devices` needs more than it allows, and say so if even that is short.
fn raise_open_files(devices: usize) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else { return };
    let needed = devices as u64 + 256;
    if soft < needed {
        let _ = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
    }
    if hard < needed {
        eprintln!(
            "warning: {devices} connections need ~{needed} open files; this process may open {hard} (ulimit -Hn)"
        );
    }
}

/// Runs the load and prints what it measured.
pub fn run(path: &Path, options: &LoadOptions, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let mqtt = match (options.transport.as_deref(), crate::mqtt::settings(&deployment)?) {
        (None | Some("mqtt"), Some(_)) => crate::mqtt::chosen(&deployment, options.broker.as_deref())?,
        (Some("mqtt"), None) => {
            anyhow::bail!("--transport mqtt: {} has no [transport] plugin = \"mqtt\"", deployment.file())
        }
        (None | Some("http"), _) if options.broker.is_some() => {
            anyhow::bail!("--broker: the load runs over HTTP(S) here (--transport mqtt and the mqtt transport)")
        }
        (None | Some("http"), _) => None,
        (Some(other), _) => anyhow::bail!("--transport {other}: http or mqtt"),
    };
    let composer = Composer::new(&deployment, registry)?;
    let url = options.cloud.clone().unwrap_or_else(|| deployment.device_url());
    // Under mutual TLS the load's first device fetches the bundle and metrics as itself.
    let first = load_device(0);
    let trust = deployment.client_trust(deployment.secured().map(|_| first.as_str()), None);
    if let Some(security) = deployment.secured() {
        let kit = security.kit();
        let last = load_device(options.devices.saturating_sub(1));
        if !mmpg::security::DeviceKit::new(&kit.device_dir(&last)).cert().exists() {
            anyhow::bail!(
                "{} has no certificate for load device {last}: run `mmpg provision {} --load {}` first",
                kit.root().display(),
                deployment.file(),
                options.devices
            );
        }
    }
    let client = CloudClient::new(&url, &trust)?;
    let templates = summaries(&composer, &client, trust.read_cloud_key()?.as_ref())?;
    if let Some(out) = &options.save_envelope
        && let Some((schema, payload)) = templates.first()
    {
        let envelope =
            Envelope::new(mmpg::wire::MessageKind::Summary, *schema, DeviceId("wrk".into()), 1, payload.clone())?;
        std::fs::write(out, envelope.encode()?).with_context(|| format!("writing {}", out.display()))?;
        eprintln!("envelope: {} ({} bytes)", out.display(), envelope.encode()?.len());
    }
    let before = client.metrics(Duration::from_secs(10))?;
    let duration = Duration::from_secs(options.seconds);
    let timeout = Duration::from_millis(deployment.fleet.request_timeout_ms);
    let report = match mqtt {
        Some((settings, url)) => {
            raise_open_files(options.devices);
            let broker = crate::mqtt::load_client(&deployment, &settings, &url)?;
            let credentials = match deployment.secured() {
                None => None,
                Some(security) => Some(std::sync::Arc::new(load_credentials(&security.kit(), options.devices)?)),
            };
            eprintln!(
                "mmpg load: {} devices for {} s through the broker {url} (bundle and metrics from {})",
                options.devices,
                options.seconds,
                client.url()
            );
            let settings = mmpg_mqtt::load::LoadSettings {
                broker,
                topics: settings.topics(),
                devices: options.devices,
                duration,
                timeout,
                credentials,
                connect_concurrency: 256,
            };
            mmpg_mqtt::load::run(settings, &templates)?
        }
        None => {
            eprintln!("mmpg load: {} devices for {} s against {url}", options.devices, options.seconds);
            load(
                &LoadSettings {
                    url: url.clone(),
                    ca: trust.ca.clone(),
                    kit: deployment.secured().map(|s| s.dir.clone()),
                    devices: options.devices,
                    duration,
                    timeout,
                },
                &templates,
            )?
        }
    };
    // The load's own figures stand even if the cloud is gone by now; only its histogram is lost.
    let after = client.metrics(Duration::from_secs(10)).unwrap_or_else(|e| {
        eprintln!("warning: the cloud's /metrics after the load: {e}");
        String::new()
    });
    let before: std::collections::BTreeMap<String, u64> =
        histogram_buckets(&before, "mmpg_batch_size").into_iter().collect();
    let batches: Vec<(String, u64)> = histogram_buckets(&after, "mmpg_batch_size")
        .into_iter()
        .map(|(le, n)| (le.clone(), n - before.get(&le).copied().unwrap_or(0).min(n)))
        .collect();
    println!(
        "load: {} devices, {:.1} s: {} adaptations, {:.0}/s; latency p50 {:.2} ms, p90 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        report.devices,
        report.seconds,
        report.adapted,
        report.throughput,
        report.p50_ms,
        report.p90_ms,
        report.p99_ms,
        report.max_ms
    );
    let errors: u64 = report.errors.values().sum();
    println!("errors: {errors} {:?}", report.errors);
    if let Some(connect) = report.connect_seconds {
        let failed: u64 = report.errors.iter().filter(|(k, _)| k.starts_with("connect")).map(|(_, n)| n).sum();
        let connected = report.devices as u64 - failed.min(report.devices as u64);
        println!("{connected} of {} devices connected in {connect:.1} s (before the timed load)", report.devices);
    }
    if let Some(wire) = report.wire {
        println!(
            "MQTT bytes on the wire (PUBLISH and PUBACK, framing included): {} up, {} down, {} of it payload; \
             {:.1} KB per adaptation",
            wire.up,
            wire.down,
            wire.payload,
            (wire.up + wire.down) as f64 / 1e3 / report.adapted.max(1) as f64
        );
    }
    // Cumulative counts → generation calls per batch-size range.
    let mut previous = 0;
    let mut shown = Vec::new();
    for (le, cumulative) in &batches {
        if *cumulative > previous {
            shown.push(format!("≤{le}: {}", cumulative - previous));
        }
        previous = *cumulative;
    }
    println!("server batch sizes (generation calls of the cloud at {}): {}", client.url(), shown.join(", "));
    if let Some(out) = &options.report {
        let json = serde_json::json!({ "load": report, "batch_size_buckets": batches });
        crate::create_parent(out)?;
        std::fs::write(out, serde_json::to_string_pretty(&json)?)
            .with_context(|| format!("writing {}", out.display()))?;
    }
    if report.adapted == 0 {
        anyhow::bail!("no request was answered with parameters (errors above); a load that adapted nothing failed");
    }
    Ok(())
}
