//! `mmpg cloud serve`: the cloud as a service over HTTP(S).

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::AtomicBool;
use std::time::Duration;

use anyhow::Context as _;
use mmpg::deploy::{CloudInfo, export_bundle};
use mmpg::node::{BatchPolicy, CloudNode};
use mmpg::replies::ReplyCache;
use mmpg::runtime::{Composer, RunError, train_cloud};
use mmpg::security::{AuditLog, CloudSigner, Guard, Revocations, SequenceLedger};
use mmpg::transport::Merged;
use mmpg::{Deployment, Progress, Registry};
use mmpg_http::tls::ServerConfig;
use mmpg_http::{CloudServer, Limits, Published, ServerSettings};
use mmpg_mqtt::{BrokerSettings, MqttEndpoint, MqttSettings};

/// Printed on stdout once the cloud answers adaptation requests, followed by its URL: what
/// `mmpg fleet` and scripts wait for.
pub const SERVING: &str = "mmpg cloud: serving";

/// Requests that may wait for the generator before new ones get 503, per slot of a batch.
const QUEUE_PER_BATCH_SLOT: usize = 16;

/// What `[security]` adds to the service (each if any).
#[derive(Default)]
struct Secured {
    /// The server's TLS.
    tls: Option<Arc<ServerConfig>>,
    /// Its gate before the cloud node.
    guard: Option<Arc<Guard>>,
    /// The key it signs replies and the bundle with.
    signer: Option<Arc<CloudSigner>>,
    /// The last sequence accepted from each device, kept across restarts.
    ledger: Option<SequenceLedger>,
}

/// The server's TLS and gate: mutual TLS from the kit and a [`Guard`] under `[security]`;
/// `[serve.tls]`'s one-way TLS otherwise; plain HTTP (said loudly under `insecure`).
/// Under the mqtt transport the cloud is one of several workers sharing the kit: each keeps its
/// own ledger file (`workers`).
fn security(deployment: &Deployment, workers: bool) -> anyhow::Result<Secured> {
    if let Some(security) = deployment.secured() {
        let kit = security.kit();
        for file in [kit.ca_cert(), kit.server_cert(), kit.server_key(), kit.signing_key()] {
            if !file.exists() {
                anyhow::bail!(
                    "{}: missing; run `mmpg provision {}` first (security.dir = {})",
                    file.display(),
                    deployment.file(),
                    security.dir.display()
                );
            }
        }
        let tls = mmpg_http::tls::server_config(&kit.server_cert(), &kit.server_key(), Some(&kit.ca_cert()))?;
        let audit = AuditLog::open(&kit.audit()).with_context(|| format!("opening {}", kit.audit().display()))?;
        // A list that cannot be taken now stops the cloud: serving with none would revoke no one.
        let revocations = Revocations::open(&kit.revoked())?;
        let guard = Guard::new(revocations, audit, security.rate_per_s, security.burst);
        eprintln!(
            "mmpg cloud: mutual TLS with the kit in {}; audit log {}",
            kit.root().display(),
            kit.audit().display()
        );
        // Read now, not after training: a bad key must stop the cloud before it says it serves.
        let path = kit.signing_key();
        let signer = CloudSigner::read(&path).with_context(|| format!("reading the signing key {}", path.display()))?;
        let (ledger, file) = if workers {
            let (ledger, n) = SequenceLedger::open_worker(&kit.sequences())?;
            let file = ledger.path().unwrap_or(&kit.sequences()).display().to_string();
            (ledger, format!("the kit's worker ledgers; this worker, number {n}, writes {file}"))
        } else {
            (SequenceLedger::open(&kit.sequences())?, kit.sequences().display().to_string())
        };
        eprintln!(
            "mmpg cloud: refusing replayed summaries ({} device{} on record in {file})",
            ledger.len(),
            if ledger.len() == 1 { "" } else { "s" },
        );
        let guard = Arc::new(guard);
        guard.keep_revocations_current();
        return Ok(Secured {
            tls: Some(Arc::new(tls)),
            guard: Some(guard),
            signer: Some(Arc::new(signer)),
            ledger: Some(ledger),
        });
    }
    if deployment.security.is_some() {
        eprintln!(
            "mmpg cloud: WARNING: [security] insecure = true: plain HTTP, no client certificates, no \
             signatures; anyone who reaches this port can pose as any device"
        );
    }
    let tls = match &deployment.serve.tls {
        Some(t) => Some(Arc::new(mmpg_http::tls::server_config(&t.cert, &t.key, None)?)),
        None => None,
    };
    Ok(Secured { tls, ..Secured::default() })
}

/// What a worker answers a request its `Guard` refuses (revoked, over its rate): the cloud's
/// error envelope for that request, signed, so the device learns why at once.
struct Refusals {
    guard: Arc<Guard>,
    signer: Option<Arc<CloudSigner>>,
    schema: mmpg::SchemaHash,
}

impl Refusals {
    /// The cloud's signed refusal of a message the transport could not take (sequence 0: it
    /// answers no request, and ends the device's outstanding one saying why).
    fn transport(&self, device: &mmpg::DeviceId, reason: &str) -> Vec<u8> {
        let error = mmpg::wire::Envelope::error(device.clone(), 0, self.schema, reason).encode().unwrap_or_default();
        match &self.signer {
            Some(signer) => mmpg::wire::sign(&error, signer),
            None => error,
        }
    }

    fn check(&self, peer: &mmpg::Peer, bytes: &[u8]) -> Result<(), Vec<u8>> {
        let guard = &self.guard;
        let header = mmpg::wire::Header::peek(bytes).ok();
        let identity = peer.identity.as_ref().map(|d| d.0.as_str());
        let Err(denial) = guard.admit(identity, header.as_ref().map(|h| h.device), &peer.address) else {
            return Ok(());
        };
        let (device, sequence, nonce) =
            header.map_or((String::new(), 0, 0), |h| (h.device.to_string(), h.sequence, h.nonce));
        let error =
            mmpg::wire::Envelope::error(mmpg::DeviceId(device), sequence, self.schema, &denial.message(identity))
                .with_nonce(nonce)
                .encode()
                .unwrap_or_default();
        Err(match &self.signer {
            Some(signer) => mmpg::wire::sign(&error, signer),
            None => error,
        })
    }
}

/// The broker's requests as an endpoint whose replies refusing a replay are audited, as the HTTP
/// server audits its own.
struct AuditReplays<E> {
    inner: E,
    guard: Arc<Guard>,
    /// Ticket → the peer's address, for the audit line.
    peers: std::collections::HashMap<u64, String>,
}

impl<E: mmpg::CloudEndpoint> mmpg::CloudEndpoint for AuditReplays<E> {
    fn next_request(&mut self, timeout: Duration) -> Result<Option<mmpg::Request>, mmpg::TransportError> {
        let request = self.inner.next_request(timeout)?;
        if let Some(r) = &request {
            self.peers.insert(r.ticket, r.peer.address.clone());
        }
        Ok(request)
    }

    fn reply(&mut self, ticket: u64, bytes: Vec<u8>) -> Result<(), mmpg::TransportError> {
        if let Some(address) = self.peers.remove(&ticket) {
            self.guard.audit_if_replayed(&bytes, &address);
        }
        self.inner.reply(ticket, bytes)
    }
}

/// Joins the deployment's shared subscription as a new worker (a unique client id per process),
/// answering what the `Guard` refuses itself under `[security]`.
fn join_broker(
    settings: &MqttSettings,
    group: &str,
    client: &BrokerSettings,
    refusals: Option<Refusals>,
) -> anyhow::Result<MqttEndpoint> {
    let worker = std::process::id().to_string();
    let mut endpoint = MqttEndpoint::connect(client, &settings.topics(), group, &worker)
        .with_context(|| format!("joining the broker {}", client.url()))?;
    if let Some(refusals) = refusals {
        let refusals = Arc::new(refusals);
        let transport = refusals.clone();
        endpoint = endpoint
            .admitting(move |peer, bytes| refusals.check(peer, bytes))
            .refusing(move |device, reason| transport.transport(device, reason));
    }
    eprintln!(
        "mmpg cloud: worker (pid {worker}) in the shared subscription {} on {}",
        settings.topics().shared_summaries(&settings.group),
        client.url()
    );
    Ok(endpoint)
}

/// Serves `path`'s cloud until SIGTERM or SIGINT.
pub fn serve(
    path: &Path,
    listen: Option<SocketAddr>,
    broker: Option<&str>,
    registry: &mut Registry,
    progress: &dyn Progress,
) -> anyhow::Result<()> {
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let config = &deployment.serve;
    let mqtt = match crate::mqtt::chosen(&deployment, broker)? {
        Some((settings, url)) => {
            let client = crate::mqtt::cloud_client(&deployment, &settings, &url)?;
            Some((settings, client))
        }
        None => None,
    };
    let Secured { tls, guard, signer, ledger } = security(&deployment, mqtt.is_some())?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    let published = Arc::new(Published::default());
    // Listening first: /healthz answers and /readyz says 503 while the cloud trains or loads.
    let (server, mut endpoint) = CloudServer::start(
        ServerSettings {
            listen: listen.unwrap_or(config.listen),
            tls,
            body_limit: config.body_limit,
            request_timeout: Duration::from_millis(config.request_timeout_ms),
            queue: config.max_batch * QUEUE_PER_BATCH_SLOT,
            guard: guard.clone(),
            limits: Limits {
                connections: config.max_connections,
                handshakes: (config.max_connections / 4).max(1),
                connections_per_peer: config.max_connections_per_peer,
                requests_per_peer: config.max_requests_per_peer,
                buffered_bytes: config.buffered_bytes(),
                // At least 2 s: devices drop their kept connections after 0.9 s idle, so the
                // server never closes one a device is about to send on.
                idle: Duration::from_millis(config.request_timeout_ms).max(Duration::from_secs(2)),
            },
        },
        published.clone(),
    )?;
    let url = format!("{scheme}://{}", server.address());
    eprintln!("mmpg cloud: listening on {url} (not ready until the cloud is trained or loaded)");
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }

    let composer = Composer::new(&deployment, registry)?;
    let data = composer.data_source()?;
    let cloud = train_cloud(&composer, data.as_ref(), progress)?;
    let mut bundle = export_bundle(&composer, &cloud)?;
    if let Some(signer) = &signer {
        bundle = bundle.signed(signer);
    }
    let info = CloudInfo::of(&composer, &cloud);
    published.ready(serde_json::to_vec_pretty(&info)?, &bundle);
    let how = if cloud.from_checkpoint { "loaded from its checkpoint" } else { "trained" };
    eprintln!("mmpg cloud: {how}; slot schema {}", info.schema_hash);
    // A worker joins the shared subscription only once it can answer: the broker would hand it
    // summaries while it trained.
    let broker = match &mqtt {
        Some((settings, client)) => {
            let schema = cloud.generator.schema().hash();
            let refusals = guard.clone().map(|guard| Refusals { guard, signer: signer.clone(), schema });
            // Under [security] the group's name carries the kit's secret (see `secret_group`).
            let group = match deployment.secured() {
                Some(security) => mmpg_mqtt::credentials::secret_group(&security.kit(), &settings.group)?,
                None => settings.group.clone(),
            };
            Some(join_broker(settings, &group, client, refusals)?)
        }
        None => None,
    };
    println!("{SERVING} {url}");

    let replies = ReplyCache::default();
    let mut node = CloudNode::new(cloud.generator.as_ref(), deployment.cloud.download).with_reply_cache(&replies);
    if let Some(signer) = &signer {
        eprintln!("mmpg cloud: signing every reply (Ed25519 key {})", signer.public().fingerprint());
        node = node.signed_by(signer.as_ref());
    }
    if let Some(ledger) = &ledger {
        node = node.with_ledger(ledger);
    }
    let policy = BatchPolicy { max_batch: config.max_batch, max_wait: Duration::from_millis(config.max_wait_ms) };
    let metrics = server.metrics();
    let totals = match broker {
        // Adaptation over the broker and over HTTP at once.
        Some(broker) => {
            let broker: Box<dyn mmpg::CloudEndpoint> = match &guard {
                Some(guard) => {
                    Box::new(AuditReplays { inner: broker, guard: guard.clone(), peers: Default::default() })
                }
                None => Box::new(broker),
            };
            let mut both = Merged::new(broker, endpoint);
            node.serve(&mut both, &policy, &stop, metrics.as_ref())?
        }
        None => {
            let totals = node.serve(&mut endpoint, &policy, &stop, metrics.as_ref())?;
            // Requests that arrive after the last batch learn at once that the cloud is going
            // (503), instead of waiting out their timeout.
            drop(endpoint);
            totals
        }
    };
    server.shutdown();
    eprintln!(
        "mmpg cloud: stopped after {} requests in {} generation calls ({:.1} ms generating)",
        totals.requests, totals.batches, totals.generation_ms
    );
    Ok(())
}
