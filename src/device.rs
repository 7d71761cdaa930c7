//! `mmpg device`: one device as its own process. It serves answers to its stream of clips,
//! adapts every `adapt_every` clips through the cloud without ever blocking on the network, and
//! keeps its last good parameters on disk.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use mmpg::bundle::Bundle;
use mmpg::deploy::{device_domain, device_from_bundle};
use mmpg::node::{DeviceNode, Refusal};
use mmpg::report::DeviceReport;
use mmpg::runtime::{Composer, RunError, draw_device, score_device, score_retrieval};
use mmpg::security::CloudKey;
use mmpg::transport::{DeviceLink, Metered, TransportError, Verified};
use mmpg::wire::Envelope;
use mmpg::{Clip, DeviceId, DomainSpec, Registry, Split, seed};
use mmpg_http::CloudClient;
use mmpg_mqtt::ReconnectingLink;
use rand::{Rng, SeedableRng};
use serde_json::json;

/// Options of `mmpg device`.
#[derive(Debug, Clone)]
pub struct DeviceOptions {
    /// The device's id (its `[[device]]` name or `device-NN` of `[fleet]`).
    pub id: String,
    /// The cloud's URL (default: `[serve] url`).
    pub cloud: Option<String>,
    /// Adaptations to make before exiting (0: until SIGTERM).
    pub rounds: u64,
    /// State folder (default: `[fleet] state`/<id>).
    pub state: Option<PathBuf>,
    /// Serve the clips of this folder (in name order, cycled) instead of the data source's.
    pub clips: Option<PathBuf>,
    /// Serve clips of this video file (cycled) instead of the data source's.
    pub video: Option<VideoInput>,
    /// Start from this exported bundle instead of the cloud's.
    pub bundle: Option<PathBuf>,
    /// The device's startup kit (default: `[security] dir`/devices/<id>).
    pub kit: Option<PathBuf>,
    /// Under the mqtt transport: the broker (default: `[transport.settings] broker`).
    pub broker: Option<String>,
}

/// A video file as a device's input.
#[derive(Debug, Clone)]
pub struct VideoInput {
    /// The file.
    pub path: PathBuf,
    /// Source frames between two frames of a clip.
    pub stride: usize,
    /// The question every clip asks (default: that of a clip the data source draws).
    pub question: Option<String>,
    /// A corruption of the CIFAR-10-C suite applied to every frame: kind and severity.
    pub corruption: Option<(String, u8)>,
}

/// Most clips read from one video file: a window's worth is what a device summarises, and the
/// file is cycled.
const MAX_VIDEO_CLIPS: usize = 1024;
/// Most bytes of decoded frames held from one video file (f32 values): large frames mean fewer
/// clips.
const MAX_VIDEO_BYTES: usize = 256 << 20;

/// Unlabelled clips of `video` for `data`'s task, at most `max_clips` and [`MAX_VIDEO_BYTES`] of
/// frames.
fn video_clips(video: &VideoInput, data: &dyn mmpg::DataSource, max_clips: usize) -> anyhow::Result<Vec<Clip>> {
    let question = match &video.question {
        Some(q) => q.clone(),
        None => {
            let domain = DomainSpec::clean("video", 0);
            let drawn = data.clips(&domain, Split::Test, 1, 0)?;
            drawn.first().map(|c| c.question.clone()).unwrap_or_default()
        }
    };
    let [_, h, w] = data.task().frame_shape;
    if video.corruption.is_some() && h != w {
        anyhow::bail!("--corruption: the corruption suite takes square frames; the task's are {h}×{w}");
    }
    // Frames are held as f32 until written or served: large frames mean fewer clips.
    let per_clip = 4 * data.task().raw_clip_bytes().max(1);
    let sampling =
        mmpg_video::Sampling { stride: video.stride, max_clips: max_clips.min(MAX_VIDEO_BYTES / per_clip).max(1) };
    let (mut clips, info) = mmpg_video::read_clips(&video.path, data.task(), sampling, &question)?;
    if let Some((kind, severity)) = &video.corruption {
        for (i, clip) in clips.iter_mut().enumerate() {
            let mut rng = seed::rng(0xC022_0975, i as u64);
            let mut values = clip.frames.values().to_vec();
            // Each channel of each frame as a grey image.
            for plane in values.chunks_mut(h * w) {
                mmpg_fashion::corruptions::corrupt(plane, h, kind, *severity, &mut rng)?;
            }
            clip.frames = mmpg::HostTensor::new(clip.frames.shape().to_vec(), values)?;
        }
    }
    let corrupted = video.corruption.as_ref().map(|(k, s)| format!(", under {k}@{s}")).unwrap_or_default();
    eprintln!(
        "video {:?}: {} {}×{} at {:.2} fps, {} frames decoded, {} clip(s) of {} frames {} apart{corrupted}, asking {question:?}",
        video.path,
        info.codec,
        info.size[0],
        info.size[1],
        info.fps,
        info.frames_decoded,
        clips.len(),
        data.task().frames_per_clip,
        video.stride,
    );
    Ok(clips)
}

/// The device's files.
struct StateDir(PathBuf);

impl StateDir {
    fn bundle(&self) -> PathBuf {
        self.0.join("bundle")
    }
    fn params(&self) -> PathBuf {
        self.0.join(mmpg::state::PARAMS)
    }
    fn sequence(&self) -> PathBuf {
        self.0.join(mmpg::state::SEQUENCE)
    }
    fn log(&self) -> PathBuf {
        self.0.join("log.jsonl")
    }
    fn report(&self) -> PathBuf {
        self.0.join("report.json")
    }
    fn privacy(&self) -> PathBuf {
        self.0.join(mmpg::state::PRIVACY)
    }
}

/// The JSON-lines log.
struct Log(std::fs::File);

impl Log {
    fn event(&mut self, mut value: serde_json::Value) {
        let unix = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs_f64());
        value["time"] = json!(unix.unwrap_or(0.0));
        // A full disk must not stop the device from serving.
        let _ = writeln!(self.0, "{value}");
    }
}

/// Retries of one request: bounded exponential backoff with jitter.
const FIRST_BACKOFF: Duration = Duration::from_millis(200);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What the network thread reports back.
enum Exchange {
    /// A reply arrived for the request with this sequence after `elapsed`.
    /// `signed` is the reply as it arrived, signature and all (under `[security]`).
    Reply { envelope: Envelope, signed: Option<Vec<u8>>, elapsed: Duration, up: u64, down: u64 },
    /// One attempt failed; another follows after the backoff (or none if `last`).
    Failed { error: TransportError, attempt: u32, last: bool },
    /// A request still being retried was replaced by a newer one.
    Superseded,
}

/// The network thread: takes requests, exchanges each with retries, reports back. A newer
/// request replaces one still being retried.
fn network(
    mut link: Verified<Metered<Box<dyn DeviceLink>>>,
    requests: Receiver<Envelope>,
    results: Sender<Exchange>,
    policy: (Duration, u32),
    seed: u64,
) {
    let (timeout, max_attempts) = policy;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    let mut pending: Option<Envelope> = None;
    loop {
        let request = match pending.take() {
            Some(r) => r,
            None => match requests.recv() {
                Ok(r) => r,
                Err(_) => return,
            },
        };
        let mut attempt = 0;
        loop {
            attempt += 1;
            let (up0, down0) = (link.inner().traffic().bytes_up, link.inner().traffic().bytes_down);
            let t0 = Instant::now();
            match link.request(&request, timeout) {
                Ok(envelope) => {
                    let signed = link.take_signed();
                    let t = link.inner().traffic();
                    let _ = results.send(Exchange::Reply {
                        envelope,
                        signed,
                        elapsed: t0.elapsed(),
                        up: t.bytes_up - up0,
                        down: t.bytes_down - down0,
                    });
                    break;
                }
                Err(error) => {
                    let last = !error.is_transient() || attempt >= max_attempts;
                    let _ = results.send(Exchange::Failed { error, attempt, last });
                    if last {
                        break;
                    }
                    let backoff = FIRST_BACKOFF.saturating_mul(1 << (attempt - 1).min(8)).min(MAX_BACKOFF);
                    let jittered = backoff.mul_f64(rng.random_range(0.5..1.5));
                    // A newer request arriving during the backoff replaces this one.
                    match requests.recv_timeout(jittered) {
                        Ok(newer) => {
                            let _ = results.send(Exchange::Superseded);
                            pending = Some(newer);
                            break;
                        }
                        Err(RecvTimeoutError::Timeout) => {}
                        Err(RecvTimeoutError::Disconnected) => return,
                    }
                }
            }
        }
    }
}

/// How long a device started before its cloud waits for it (a cloud trains before it serves).
const CLOUD_WAIT: Duration = Duration::from_secs(600);

/// The bundle to start from: `exported` (a folder `mmpg export` wrote) when given; else the one
/// in the state folder if it is intact and from the cloud's current training; else the cloud's
/// (fetched, verified, saved). While the cloud is not up yet it waits (up to [`CLOUD_WAIT`], saying
/// so on stderr, and not past SIGTERM).
fn bundle(
    client: &CloudClient,
    state: &StateDir,
    exported: Option<&Path>,
    key: Option<&CloudKey>,
    timeout: Duration,
    stop: &AtomicBool,
    log: &mut Log,
) -> anyhow::Result<Bundle> {
    if let Some(dir) = exported {
        let b = Bundle::open(dir, key).with_context(|| format!("the bundle in {}", dir.display()))?;
        save_bundle(&b, state)?;
        log.event(json!({"event": "bundle", "source": dir.display().to_string(), "training": b.manifest.training}));
        return Ok(b);
    }
    let saved = Bundle::open(&state.bundle(), key);
    if let Err(e) = &saved
        && !matches!(e, mmpg::bundle::BundleError::Missing(_))
    {
        log.event(json!({"event": "failure", "kind": "bundle", "message": format!("the saved bundle: {e}")}));
    }
    let started = Instant::now();
    let mut delay = FIRST_BACKOFF;
    loop {
        let fetched = client.hello(timeout).map_err(mmpg_http::HttpError::from).and_then(|info| {
            if info.wire_version != mmpg::wire::WIRE_VERSION {
                return Err(mmpg_http::HttpError::Version { cloud: info.wire_version, ours: mmpg::wire::WIRE_VERSION });
            }
            match &saved {
                Ok(b) if b.manifest.training == info.training => Ok(None),
                _ => client.bundle(timeout, key).map(Some),
            }
        });
        match fetched {
            Ok(None) => return saved.map_err(Into::into),
            Ok(Some(b)) => {
                save_bundle(&b, state)?;
                log.event(json!({"event": "bundle", "source": client.url(), "training": b.manifest.training}));
                return Ok(b);
            }
            Err(e @ mmpg_http::HttpError::Version { .. }) => return Err(e.into()),
            Err(e) => {
                let transient = matches!(&e, mmpg_http::HttpError::Transport(t) if t.is_transient());
                if let Ok(b) = saved {
                    // The cloud is away or refuses; the device serves with what it has.
                    log.event(json!({"event": "bundle", "source": "saved", "cloud": e.to_string()}));
                    return Ok(b);
                }
                if !transient || started.elapsed() >= CLOUD_WAIT || stop.load(Ordering::Relaxed) {
                    return Err(e).context(format!("fetching the device bundle from {}", client.url()));
                }
                if delay == FIRST_BACKOFF {
                    // A device that never saved a bundle has nothing to say about it.
                    let saved = saved
                        .as_ref()
                        .err()
                        .filter(|b| !matches!(b, mmpg::bundle::BundleError::Missing(_)))
                        .map(|b| format!("; the saved bundle is unusable: {b}"))
                        .unwrap_or_default();
                    eprintln!(
                        "mmpg device: waiting for the cloud at {} ({e}){saved}; up to {CLOUD_WAIT:?}",
                        client.url()
                    );
                }
                log.event(json!({"event": "failure", "kind": "bundle", "message": e.to_string()}));
                std::thread::sleep(delay);
                delay = (delay * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Saves `bundle` into the state folder's `bundle/`, which is the device's own: a link or file
/// standing there is replaced by a folder, never followed.
fn save_bundle(bundle: &Bundle, state: &StateDir) -> anyhow::Result<()> {
    mmpg::files::own_folder(&state.bundle()).with_context(|| format!("making {}", state.bundle().display()))?;
    bundle.write(&state.bundle()).context("saving the bundle")
}

/// Restores the privacy a device's earlier runs spent. A ledger that cannot be read is an
/// error, not a fresh start: forgetting it would understate what the device has disclosed.
fn restore_privacy(node: &mut DeviceNode, state: &StateDir) -> anyhow::Result<()> {
    let unknown = "the privacy this device spent is unknown";
    let Some(bytes) = mmpg::state::read_sealed(&state.privacy(), mmpg::state::MAX_SMALL)
        .map_err(|e| anyhow::anyhow!("{e}; {unknown}"))?
    else {
        return Ok(());
    };
    let text =
        String::from_utf8(bytes).map_err(|_| anyhow::anyhow!("{}: not UTF-8; {unknown}", state.privacy().display()))?;
    let ledger = mmpg::privacy::PrivacyAccountant::from_json(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}; {unknown}", state.privacy().display()))?;
    node.resume_privacy(ledger);
    Ok(())
}

/// Restores the last good parameters and the request counter, if the state folder has them.
/// A damaged counter is logged and dropped: the cloud's refusal of a stale or far-ahead request
/// names where to continue.
fn restore(node: &mut DeviceNode, state: &StateDir, key: Option<&CloudKey>, log: &mut Log) -> bool {
    match mmpg::state::read_sequence(&state.sequence()) {
        Ok(Some(sequence)) => node.resume_after(sequence),
        Ok(None) => {}
        Err(e) => log.event(json!({"event": "failure", "kind": "restore", "message": e.to_string()})),
    }
    let sealed = match mmpg::state::read_sealed(&state.params(), mmpg::state::MAX_PARAMS) {
        Ok(Some(bytes)) => Ok(bytes),
        Ok(None) => return false,
        Err(e) => Err(format!("saved parameters: {e}")),
    };
    let restored = sealed
        .and_then(|bytes| match key {
            // Saved as it arrived: the cloud's signature is checked again.
            Some(key) => {
                mmpg::wire::open_signed(&bytes, key).map(<[u8]>::to_vec).map_err(|e| format!("saved parameters: {e}"))
            }
            None => Ok(bytes),
        })
        .and_then(|bytes| Envelope::decode(&bytes).map_err(|e| e.to_string()))
        .and_then(|e| {
            if e.device != node.id || e.schema_hash != node.model.schema().hash() {
                return Err("saved parameters are for another device or schema".to_string());
            }
            node.resume_after(e.sequence);
            e.to_params().map_err(|e| e.to_string())
        })
        .and_then(|p| node.restore(p).map_err(|e| e.to_string()));
    match restored {
        Ok(()) => {
            log.event(json!({"event": "restored", "sequence": node.sequence()}));
            true
        }
        Err(e) => {
            log.event(json!({"event": "failure", "kind": "restore", "message": e}));
            false
        }
    }
}

/// Runs one device until it has made `rounds` adaptations (and heard back or given up), or
/// until SIGTERM.
pub fn run(path: &Path, options: &DeviceOptions, registry: &mut Registry) -> anyhow::Result<()> {
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let composer = Composer::new(&deployment, registry)?;
    let data = composer.data_source()?;
    // A folder's clips are the stream (cycled) and its labelled clips the scored ones; such a
    // device need not be one of the deployment's.
    let folder = match (&options.clips, &options.video) {
        (Some(dir), _) => Some(mmpg::clip_file::read_clip_dir(dir, data.task())?),
        (None, Some(video)) => Some(video_clips(video, data.as_ref(), MAX_VIDEO_CLIPS)?),
        (None, None) => None,
    };
    let domain = match device_domain(&composer, &options.id) {
        Ok(d) => d,
        Err(_) if folder.is_some() => {
            DomainSpec::clean(options.id.clone(), seed::derive_str(deployment.seed, &options.id))
        }
        Err(e) => return Err(e.into()),
    };
    let fleet = &deployment.fleet;
    if options.id.is_empty() || options.id.len() > mmpg::wire::MAX_DEVICE_ID {
        anyhow::bail!("--id: a device id is 1..={} bytes", mmpg::wire::MAX_DEVICE_ID);
    }
    // One path segment whatever the id (`..`, `/`, an absolute path): its folder stays in `state`.
    let state = StateDir(
        options.state.clone().unwrap_or_else(|| fleet.state.join(mmpg::security::identity::encode(&options.id))),
    );
    std::fs::create_dir_all(&state.0).with_context(|| format!("creating {}", state.0.display()))?;
    // The state folder is the device's own: nothing in it is written through a link or a FIFO.
    let log_file = mmpg::files::open_append(&state.log())?;
    let mut log = Log(log_file);
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing the signal handler")?;
    }

    let url = options.cloud.clone().unwrap_or_else(|| deployment.device_url());
    if deployment.secured().is_some() && !url.to_ascii_lowercase().starts_with("https://") {
        anyhow::bail!(
            "--cloud {url}: [security] allows only https:// (mutual TLS); set `insecure = true` to allow plain HTTP"
        );
    }
    let trust = deployment.client_trust(Some(&options.id), options.kit.as_deref());
    if let Some((cert, _)) = trust.identity.as_ref().filter(|(cert, _)| !cert.exists()) {
        anyhow::bail!(
            "{}: no certificate for device `{}`; on the cloud's machine run `mmpg provision {} --device {}` and \
             copy its devices/<id>/ folder here (or pass --kit <folder>)",
            cert.display(),
            options.id,
            deployment.file(),
            options.id
        );
    }
    if let Some(dir) = options.bundle.as_deref().filter(|d| !d.is_dir()) {
        anyhow::bail!("--bundle {}: not a folder (one `mmpg export` wrote)", dir.display());
    }
    let client = CloudClient::new(&url, &trust)?;
    let timeout = Duration::from_millis(fleet.request_timeout_ms);
    // Under [security] only a bundle and replies the cloud signed are read at all.
    let key = trust.read_cloud_key()?;
    let bundle = bundle(&client, &state, options.bundle.as_deref(), key.as_ref(), timeout, &stop, &mut log)?;
    let mut node = device_from_bundle(&composer, data.as_ref(), &bundle, DeviceId(options.id.clone()))?;
    let drawn = match &folder {
        None => draw_device(&composer, data.as_ref(), &domain, node.model.as_ref(), fleet.eval_clips)?,
        Some(clips) => {
            let eval: Vec<Clip> = clips.iter().filter(|c| c.answer.is_some()).cloned().collect();
            let window = clips.iter().cycle().take(fleet.window_clips).map(Clip::unlabelled).collect();
            let mut drawn = score_device(&domain, true, data.task(), node.model.as_ref(), window, eval)?;
            drawn.report.shift = match (&options.clips, &options.video) {
                (Some(dir), _) => format!("clips from {}", dir.display()),
                (None, Some(video)) => match &video.corruption {
                    Some((kind, severity)) => format!("video {} under {kind}@{severity}", video.path.display()),
                    None => format!("video {}", video.path.display()),
                },
                (None, None) => String::new(),
            };
            drawn
        }
    };
    let mut report = drawn.report;
    // How sure the answers are, measurable without labels: over the window, before and after.
    report.static_entropy = node.model.answer_entropy(&drawn.window).ok();
    report.adapted_entropy = report.static_entropy;
    restore_privacy(&mut node, &state)?;
    if node.reasoner.privacy().is_some_and(|p| p.noise == mmpg::privacy::NoiseSource::Seeded) {
        eprintln!(
            "warning: [anchor.settings.privacy] noise = \"seeded\": whoever knows the deployment's seed can subtract \
             the noise; a deployed device should use noise = \"os\" (the default)"
        );
    }
    let restored = restore(&mut node, &state, key.as_ref(), &mut log);
    if restored {
        report.adapted_accuracy = node.model.accuracy(&drawn.eval)?;
        report.adapted_retrieval = score_retrieval(node.model.as_ref(), &drawn.eval);
        report.adapted_entropy = node.model.answer_entropy(&drawn.window).ok();
    }
    log.event(json!({
        "event": "start", "device": options.id, "cloud": url, "static_accuracy": report.static_accuracy,
        "accuracy": report.adapted_accuracy, "restored": restored, "sequence": node.sequence(),
    }));

    let (to_network, requests) = mpsc::channel();
    let (results, from_network) = mpsc::channel();
    // Adaptation over the broker under the mqtt transport (the bundle came over HTTP(S) or from
    // a folder); over HTTP(S) otherwise.
    let link: Box<dyn DeviceLink> = match crate::mqtt::chosen(&deployment, options.broker.as_deref())? {
        Some((mqtt, url)) => {
            let settings = crate::mqtt::device_client(&deployment, &mqtt, &url, &options.id, options.kit.as_deref())?;
            log.event(json!({"event": "broker", "broker": url.to_string(), "max_packet": mqtt.max_packet}));
            // Connected on first use: the device serves whether or not the broker is up, and a
            // refusal is a failure of that request, in the log and the report.
            Box::new(ReconnectingLink::new(settings, mqtt.topics(), DeviceId(options.id.clone())))
        }
        None => Box::new(client),
    };
    let link = Verified::new(Metered::new(link), key);
    let jitter_seed = seed::derive(domain.seed, 0x7E7);
    let max_attempts = fleet.max_attempts;
    let pace = Duration::from_millis(fleet.clip_interval_ms);
    let network = std::thread::Builder::new()
        .name("network".into())
        .spawn(move || network(link, requests, results, (timeout, max_attempts), jitter_seed))
        .context("starting the network thread")?;

    let adapt_every = fleet.adapt_every.unwrap_or(fleet.window_clips).max(1);
    let window_clips = fleet.window_clips;
    // Serving keeps the features of the last window's clips; a summary reuses them.
    node.keep_served(window_clips);
    let mut serving_ms = 0.0;
    let mut served = 0u64;
    let mut sent = 0u64;
    let mut settled = 0u64;
    let mut failures: std::collections::BTreeMap<String, u64> = Default::default();
    let mut round = 0u64;
    let mut skipped = 0u64;
    let mut resync = Resync { to_network: to_network.clone(), summary: None };
    'serving: while !stop.load(Ordering::Relaxed) {
        // The stream: the first window is the one `mmpg run` summarises; then fresh clips.
        let stream_seed = if round == 0 { domain.seed } else { seed::derive(domain.seed, 0x57E + round) };
        let clips = if let Some(folder) = &folder {
            let start = (round as usize).wrapping_mul(adapt_every) % folder.len();
            folder.iter().cycle().skip(start).take(adapt_every).map(Clip::unlabelled).collect()
        } else if round == 0 {
            drawn.window.clone()
        } else {
            data.clips(&domain, Split::Stream, adapt_every, stream_seed)?.iter().map(Clip::unlabelled).collect()
        };
        round += 1;
        for clip in clips {
            if stop.load(Ordering::Relaxed) {
                break 'serving;
            }
            // Serving: one answer per clip, whatever the network is doing.
            std::thread::sleep(pace);
            let t0 = Instant::now();
            let _answer = node.serve(std::slice::from_ref(&clip))?;
            serving_ms += t0.elapsed().as_secs_f64() * 1e3;
            served += 1;
            settled += drain(
                &mut node,
                &from_network,
                Duration::ZERO,
                &state,
                (&drawn.eval, &drawn.window),
                &mut report,
                &mut failures,
                &mut log,
                &mut resync,
            );
            let due = served.is_multiple_of(adapt_every as u64) && (options.rounds == 0 || sent < options.rounds);
            // One request at a time: a reply to an older request would be refused as stale, so a
            // window that comes due while one is in flight is skipped, not queued.
            if due && settled < sent {
                skipped += 1;
            } else if due {
                let t0 = Instant::now();
                let seed = seed::derive(domain.seed, 0xADE + node.sequence() + 1);
                match node.summarise_served(seed) {
                    Ok(s) => {
                        report.anchors = s.summary.anchor_count();
                        // The serving passes since the last summary (a window's, once due).
                        report.serving_ms = std::mem::take(&mut serving_ms);
                        if s.summary.privacy.is_some() {
                            // Kept before the upload leaves: a crash must not forget what it spent.
                            let ledger = serde_json::to_string(&node.privacy_ledger())?;
                            mmpg::state::write_sealed(&state.privacy(), ledger.as_bytes())?;
                            report.privacy = node.privacy_spent();
                        }
                        // Out of sequence numbers, a device can never be answered again: an error
                        // for a person, not a failure to count on every window.
                        let request = node.request(&s.summary).context("making the adaptation request")?;
                        resync.summary = Some(s.summary);
                        let _ = mmpg::state::write_sealed(&state.sequence(), request.sequence.to_string().as_bytes());
                        log.event(json!({"event": "request", "sequence": request.sequence, "served": served}));
                        report.adaptation_ms = t0.elapsed().as_secs_f64() * 1e3;
                        sent += 1;
                        if to_network.send(request).is_err() {
                            anyhow::bail!("the network thread stopped");
                        }
                    }
                    Err(e) => {
                        *failures.entry("summarise".into()).or_default() += 1;
                        log.event(json!({"event": "failure", "kind": "summarise", "message": e.to_string()}));
                    }
                }
            }
        }
        if options.rounds > 0 && sent >= options.rounds {
            // Every request made: wait for the last one to be answered or given up.
            while settled < sent && !stop.load(Ordering::Relaxed) {
                settled += drain(
                    &mut node,
                    &from_network,
                    Duration::from_millis(100),
                    &state,
                    (&drawn.eval, &drawn.window),
                    &mut report,
                    &mut failures,
                    &mut log,
                    &mut resync,
                );
            }
            break;
        }
    }
    drop(to_network);
    drop(resync);
    let _ = network.join();
    if !failures.is_empty() && report.error.is_none() && report.adapted_accuracy == report.static_accuracy {
        report.error = Some(format!("failures: {failures:?}"));
    }
    log.event(json!({
        "event": "stop", "served": served, "requests": sent, "skipped_windows": skipped, "failures": failures,
    }));
    mmpg::files::write_atomically(&state.report(), serde_json::to_string_pretty(&report)?.as_bytes())
        .with_context(|| format!("writing {}", state.report().display()))?;
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}

/// What a device needs to send its last summary again under a new sequence: when the cloud
/// remembers a later sequence from it than it does (its state folder was lost or restored from an
/// old copy), the refusal names that sequence and the device asks again after it, once.
struct Resync {
    to_network: Sender<Envelope>,
    /// The summary of the request outstanding, until it is resent.
    summary: Option<mmpg::AnchorSummary>,
}

/// Handles what the network thread reported (waiting up to `wait` for the first): installs a
/// good reply (persisting it, scoring the model), counts every failure. Returns how many
/// requests were settled (answered, refused or given up).
#[allow(clippy::too_many_arguments)]
fn drain(
    node: &mut DeviceNode,
    results: &Receiver<Exchange>,
    wait: Duration,
    state: &StateDir,
    (eval, window): (&[Clip], &[Clip]),
    report: &mut DeviceReport,
    failures: &mut std::collections::BTreeMap<String, u64>,
    log: &mut Log,
    resync: &mut Resync,
) -> u64 {
    let mut settled = 0;
    let mut next = if wait.is_zero() { results.try_recv().ok() } else { results.recv_timeout(wait).ok() };
    while let Some(result) = next.take() {
        match result {
            Exchange::Reply { envelope, signed, elapsed, up, down } => {
                settled += 1;
                report.bytes_up += up;
                report.bytes_down += down;
                let t0 = Instant::now();
                match node.accept(&envelope) {
                    Ok(_) => {
                        report.adaptation_ms += t0.elapsed().as_secs_f64() * 1e3;
                        // As it arrived: under [security] the cloud's signature is checked
                        // again on restore.
                        if let Some(bytes) = signed.or_else(|| envelope.encode().ok()) {
                            // Sealed: a file damaged at rest is refused on restore, not installed.
                            let _ = mmpg::state::write_sealed(&state.params(), &bytes);
                        }
                        // The parameters are installed; an evaluation that fails says so instead
                        // of leaving the previous accuracy standing.
                        report.error = match node.model.accuracy(eval) {
                            Ok(a) => {
                                report.adapted_accuracy = a;
                                None
                            }
                            Err(e) => {
                                report.adapted_accuracy = f64::NAN;
                                Some(format!("evaluate: {e}"))
                            }
                        };
                        report.adapted_retrieval = score_retrieval(node.model.as_ref(), eval);
                        report.adapted_entropy = node.model.answer_entropy(window).ok();
                        log.event(json!({
                            "event": "adapted", "sequence": envelope.sequence, "accuracy": report.adapted_accuracy,
                            "static_accuracy": report.static_accuracy, "bytes_up": up, "bytes_down": down,
                            "latency_ms": elapsed.as_secs_f64() * 1e3,
                        }));
                    }
                    Err(_) if envelope.last_accepted().is_some() && resync.summary.is_some() => {
                        // `accept` has moved the count past the cloud's: the same summary again.
                        let resent = resync.summary.take().map(|s| node.request(&s));
                        match resent {
                            Some(Ok(request)) => {
                                let _ = mmpg::state::write_sealed(
                                    &state.sequence(),
                                    request.sequence.to_string().as_bytes(),
                                );
                                log.event(json!({
                                    "event": "resync", "sequence": request.sequence,
                                    "cloud_last": envelope.last_accepted(),
                                }));
                                if resync.to_network.send(request).is_ok() {
                                    settled -= 1;
                                }
                            }
                            failed => {
                                let message = match failed {
                                    Some(Err(e)) => e.to_string(),
                                    _ => "no summary to send again".to_string(),
                                };
                                eprintln!(
                                    "mmpg device {}: cannot ask again after the cloud's sequence: {message}",
                                    node.id
                                );
                                *failures.entry("resync".into()).or_default() += 1;
                                log.event(json!({"event": "failure", "kind": "resync", "message": message}));
                            }
                        }
                    }
                    Err(refusal) => {
                        let kind = refusal.kind();
                        *failures.entry(kind.into()).or_default() += 1;
                        if !matches!(refusal, Refusal::Stale { .. }) {
                            report.error = Some(refusal.to_string());
                        }
                        log.event(json!({"event": "failure", "kind": kind, "message": refusal.to_string()}));
                    }
                }
            }
            Exchange::Superseded => {
                settled += 1;
                log.event(json!({"event": "superseded"}));
            }
            Exchange::Failed { error, attempt, last } => {
                *failures.entry(error.kind()).or_default() += 1;
                if last {
                    settled += 1;
                    report.error = Some(format!("exchange: {error}"));
                    // Given up: said where a person looks, not only in the log (a revoked device
                    // still exits 0, serving with the parameters it has).
                    eprintln!("mmpg device {}: request given up after {attempt} attempt(s): {error}", node.id);
                }
                log.event(json!({
                    "event": "failure", "kind": error.kind(), "message": error.to_string(),
                    "attempt": attempt, "gave_up": last,
                }));
            }
        }
        next = results.try_recv().ok();
    }
    settled
}

/// `mmpg clips`: `count` clips of device `id`'s domain (its held-out split) as files in `out`.
pub fn write_clips(
    path: &Path,
    id: &str,
    count: usize,
    out: &Path,
    unlabelled: bool,
    video: Option<&VideoInput>,
    registry: &mut Registry,
) -> anyhow::Result<()> {
    let deployment = crate::open(path, registry).map_err(RunError::Config)?;
    let composer = Composer::new(&deployment, registry)?;
    let data = composer.data_source()?;
    let (clips, label) = match video {
        Some(video) => {
            let clips = video_clips(video, data.as_ref(), count)?;
            let held = if clips.len() < count {
                format!("; the file holds {} at this stride", clips.len())
            } else {
                String::new()
            };
            (clips, format!("video {}{held}", video.path.display()))
        }
        None => {
            let domain = device_domain(&composer, id)?;
            let clips = data.clips(&domain, Split::Test, count, domain.seed)?;
            let clips = if unlabelled { clips.iter().map(Clip::unlabelled).collect() } else { clips };
            (clips, format!("{id}, {}", domain.shift_label()))
        }
    };
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;
    for (i, clip) in clips.iter().enumerate() {
        let file = out.join(format!("clip-{i:05}.safetensors"));
        let bytes = mmpg::clip_file::encode_clip(clip, data.task())?;
        std::fs::write(&file, bytes).with_context(|| format!("writing {}", file.display()))?;
    }
    println!("clips: {} files in {} ({label})", clips.len(), out.display());
    Ok(())
}
