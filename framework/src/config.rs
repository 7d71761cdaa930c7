//! TOML deployments. Parsing collects every error it can find (one per section at least), and
//! every error names the file, line, column and key path, e.g.
//! `deploy.toml:14:12: fleet.shifts[2].severity: expected 1..=5, found 7`.

use std::collections::BTreeMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use toml_edit::{Item, Table, TableLike, Value};

use crate::anchor::Quantisation;
use crate::data::{DomainSpec, Shift};
use crate::registry::{PluginKind, Registry, RegistryError};
use crate::seed;
use crate::settings::{Check, Settings, unknown_field};

/// One segment of a key path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Segment {
    /// A table key.
    Key(String),
    /// An array index.
    Index(usize),
}

/// A path of keys and indices into a TOML document, displayed as `fleet.shifts[2].severity`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyPath(pub Vec<Segment>);

impl KeyPath {
    /// Parses `a.b[2].c`. Keys containing dots or brackets are not representable, which TOML
    /// configs of mmpg never need.
    pub fn parse(text: &str) -> Self {
        let mut out = Vec::new();
        for part in text.split('.').filter(|p| !p.is_empty()) {
            let mut rest = part;
            if let Some(open) = rest.find('[') {
                if open > 0 {
                    out.push(Segment::Key(rest[..open].to_string()));
                }
                rest = &rest[open..];
                while let Some(stripped) = rest.strip_prefix('[') {
                    let close = stripped.find(']').unwrap_or(stripped.len());
                    match stripped[..close].parse() {
                        Ok(i) => out.push(Segment::Index(i)),
                        Err(_) => out.push(Segment::Key(stripped[..close].to_string())),
                    }
                    rest = stripped.get(close + 1..).unwrap_or("");
                }
            } else {
                out.push(Segment::Key(rest.to_string()));
            }
        }
        Self(out)
    }

    /// This path followed by `child` (a path in the same notation).
    pub fn join(&self, child: &str) -> Self {
        let mut out = self.clone();
        out.0.extend(KeyPath::parse(child).0);
        out
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Segment::Key(k) if i == 0 => write!(f, "{k}")?,
                Segment::Key(k) => write!(f, ".{k}")?,
                Segment::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// One problem in a deployment file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file, as given.
    pub file: String,
    /// 1-based line, when the path could be located.
    pub line: Option<usize>,
    /// 1-based column.
    pub column: Option<usize>,
    /// Key path of the offending value (empty for syntax errors).
    pub path: KeyPath,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file)?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, ":{line}:{column}")?;
        }
        if self.path.0.is_empty() {
            write!(f, ": {}", self.message)
        } else {
            write!(f, ": {}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a deployment file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let lines: Vec<String> = self.0.iter().map(ToString::to_string).collect();
        f.write_str(&lines.join("\n"))
    }
}

/// `[backend]`: which compute backend runs the models.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BackendConfig {
    /// `cpu`, `wgpu`, `cuda` or `tch`.
    pub kind: String,
    /// Device index within the backend.
    pub device: usize,
    /// The cloud's backend when it differs from the devices' (mixed deployments: the wire
    /// carries backend-agnostic tensors).
    pub cloud: Option<String>,
    /// The cloud's device index (default: `device`).
    pub cloud_device: Option<usize>,
}

impl Default for BackendConfig {
    fn default() -> Self {
        Self { kind: "cpu".into(), device: 0, cloud: None, cloud_device: None }
    }
}

/// A plugin chosen by name, with its own settings table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginChoice {
    /// Registered plugin name.
    pub plugin: String,
    /// The plugin's settings; it deserialises them itself.
    pub settings: toml::Table,
}

/// A plugin section as written: `plugin` may be left out to keep the default.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PluginSection {
    #[serde(default)]
    plugin: Option<String>,
    #[serde(default)]
    settings: toml::Table,
}

/// Which labelled data trains the static model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PretrainOn {
    /// Clean source data only: the usual source model of test-time adaptation. The generator
    /// still learns from every shifted source domain.
    Clean,
    /// The whole source-domain mixture: a domain-general static model.
    Sources,
}

/// `[cloud.training]`: schedules of the two cloud phases.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudTraining {
    /// Supervised steps of the device model.
    pub pretrain_steps: usize,
    /// Data of those steps.
    pub pretrain_on: PretrainOn,
    /// Labelled clips per pretraining step.
    pub pretrain_batch: usize,
    /// Pretraining learning rate.
    pub pretrain_learning_rate: f64,
    /// Episodic generator steps.
    pub generator_steps: usize,
    /// Labelled clips per domain per generator step.
    pub generator_batch: usize,
    /// Generator learning rate.
    pub generator_learning_rate: f64,
    /// Number of labelled source domains.
    pub source_domains: usize,
    /// Shifts no source domain may have (the held-out target domains). Absent: the fleet's
    /// shifts, so a cloud set up this way needs no device list, and adding a device changes
    /// nothing about its training.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hold_out: Option<Vec<DeviceDomain>>,
}

impl Default for CloudTraining {
    fn default() -> Self {
        Self {
            pretrain_steps: 800,
            pretrain_on: PretrainOn::Clean,
            pretrain_batch: 32,
            pretrain_learning_rate: 3e-3,
            generator_steps: 300,
            generator_batch: 32,
            generator_learning_rate: 1e-3,
            source_domains: 32,
            hold_out: None,
        }
    }
}

/// `[cloud]`: the generator plugin and how the cloud trains.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Generator plugin name.
    pub generator: String,
    /// Its settings.
    pub settings: toml::Table,
    /// Training schedules.
    pub training: CloudTraining,
    /// Encoding of downloaded parameters: `int8` (one scale per slot, the default since #16:
    /// within 0.3 points of `f32` on the quickstart and both benches, a quarter of the bytes),
    /// `f16`, or `f32` (bit-exact).
    #[serde(skip_serializing_if = "is_f32")]
    pub download: Quantisation,
    /// Checkpoint folder: the trained model and generator are loaded from it when it holds a
    /// checkpoint of this very training (same data, model, anchor and cloud settings and seed),
    /// and written to it after training otherwise.
    pub checkpoint: Option<PathBuf>,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            generator: "fda".into(),
            settings: toml::Table::new(),
            training: CloudTraining::default(),
            download: Quantisation::Int8,
            checkpoint: None,
        }
    }
}

fn is_f32(q: &Quantisation) -> bool {
    *q == Quantisation::F32
}

/// The data distribution of one device: a `[fleet] shifts` entry or a `[[device]]` table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceDomain {
    /// Device name (`[[device]]` only; fleet devices are named `device-NN`).
    #[serde(default)]
    pub name: Option<String>,
    /// Shift kind, several joined by `+` (`noise+blur`), or `clean`.
    pub kind: String,
    /// 1..=5; ignored for `clean`.
    #[serde(default = "one")]
    pub severity: u8,
    /// Label shift: Dirichlet α of the class mix; absent for a uniform mix.
    #[serde(default)]
    pub class_mix_alpha: Option<f64>,
    /// Language shift: the phrasing family of questions.
    #[serde(default)]
    pub phrasing: u32,
    /// Seed of the device's data; derived from the deployment seed when absent.
    #[serde(default)]
    pub seed: Option<u64>,
}

fn one() -> u8 {
    1
}

/// `[fleet]`: how many devices, their shifts, and their windows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// Number of fleet devices; their domains cycle through `shifts`. Defaults to one device
    /// per shift.
    pub devices: Option<usize>,
    /// Device domains.
    pub shifts: Vec<DeviceDomain>,
    /// Clips in the unlabelled window ADR summarises.
    pub window_clips: usize,
    /// Labelled held-out clips per device for evaluation.
    pub eval_clips: usize,
    /// A device process (`mmpg device`) adapts after every this many clips it serves; defaults
    /// to `window_clips`.
    pub adapt_every: Option<usize>,
    /// How long a device process waits for the cloud's reply, in ms.
    pub request_timeout_ms: u64,
    /// Attempts at one request (timeouts, refused connections, 5xx) before a device process
    /// gives it up and keeps its parameters; the next window asks again.
    pub max_attempts: u32,
    /// A device process serves one clip every this many ms (a camera's pace; 0: as fast as it
    /// can).
    pub clip_interval_ms: u64,
    /// Where device processes keep their state (bundle, last good parameters, log), one
    /// folder per device (relative to the working directory).
    pub state: PathBuf,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            devices: None,
            shifts: Vec::new(),
            window_clips: 16,
            eval_clips: 256,
            adapt_every: None,
            request_timeout_ms: 10_000,
            max_attempts: 8,
            clip_interval_ms: 0,
            state: PathBuf::from("state"),
        }
    }
}

/// `[serve]`: the cloud as a service (`mmpg cloud serve`) and where devices reach it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServeConfig {
    /// Address the cloud listens on.
    pub listen: std::net::SocketAddr,
    /// URL devices reach the cloud at; defaults to `http://<listen>` (`https://` with `tls`).
    pub url: Option<String>,
    /// Most summaries generated in one call.
    pub max_batch: usize,
    /// Longest a request waits for others to join its batch, in ms.
    pub max_wait_ms: u64,
    /// Largest request body accepted, in bytes.
    pub body_limit: usize,
    /// Longest the server spends on one request (reading, queueing, generating), in ms.
    pub request_timeout_ms: u64,
    /// Serve HTTPS with this certificate chain and key (PEM files, relative to the working
    /// directory); devices trust `ca` (the certificate itself when absent).
    pub tls: Option<TlsConfig>,
    /// Most connections held at once, all devices together (a quarter of them may be in their
    /// TLS handshake).
    pub max_connections: usize,
    /// Most connections one authenticated device holds at once (mutual TLS).
    pub max_connections_per_peer: usize,
    /// Most adaptation requests one authenticated device has in flight at once (429 beyond).
    pub max_requests_per_peer: usize,
    /// Most request bytes buffered at once, all devices together, in bytes (503 beyond);
    /// default 64 × `body_limit`.
    pub max_buffered_bytes: Option<usize>,
}

impl Default for ServeConfig {
    fn default() -> Self {
        Self {
            listen: std::net::SocketAddr::from(([127, 0, 0, 1], 7878)),
            url: None,
            max_batch: 64,
            max_wait_ms: 2,
            body_limit: 1 << 20,
            request_timeout_ms: 10_000,
            tls: None,
            max_connections: 8192,
            max_connections_per_peer: 16,
            max_requests_per_peer: 4,
            max_buffered_bytes: None,
        }
    }
}

impl ServeConfig {
    /// Request bytes buffered at once: `max_buffered_bytes`, or 64 × `body_limit`.
    pub fn buffered_bytes(&self) -> usize {
        self.max_buffered_bytes.unwrap_or(self.body_limit.saturating_mul(64))
    }

    /// The URL devices use.
    pub fn device_url(&self) -> String {
        self.url.clone().unwrap_or_else(|| {
            let scheme = if self.tls.is_some() { "https" } else { "http" };
            format!("{scheme}://{}", self.listen)
        })
    }
}

/// `[serve.tls]`: the server's certificate and key, and the CA devices trust.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM CA certificate devices verify the server with; the leaf itself when absent.
    pub ca: Option<PathBuf>,
}

/// `[security]`: mutual TLS, signed parameters, replay protection, rate limits and the audit
/// log, from the kit `mmpg provision` writes. Without the table the cloud serves what
/// `[serve]` says (plain HTTP, or one-way TLS with `[serve.tls]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecurityConfig {
    /// The kit's folder: `mmpg provision` writes it, the cloud and devices read it (relative
    /// to the working directory).
    pub dir: PathBuf,
    /// DNS names and IP addresses the cloud's server certificate is issued for.
    pub server_names: Vec<String>,
    /// Serve plain HTTP, with no client certificates and no signatures: for a closed lab only;
    /// the cloud says so at start.
    pub insecure: bool,
    /// Requests per second each device may make on average (token bucket refill); above it
    /// the cloud answers 429.
    pub rate_per_s: f64,
    /// Requests a device may make in a burst (token bucket size).
    pub burst: u32,
}

impl Default for SecurityConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("pki"),
            server_names: vec!["localhost".into(), "127.0.0.1".into(), "::1".into()],
            insecure: false,
            rate_per_s: 20.0,
            burst: 40,
        }
    }
}

impl SecurityConfig {
    /// The kit's layout.
    pub fn kit(&self) -> crate::security::Kit {
        crate::security::Kit::new(&self.dir)
    }
}

/// What a client of the cloud trusts and presents ([`Deployment::client_trust`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClientTrust {
    /// PEM file of the CA the cloud's certificate must chain to (HTTPS); none for HTTP.
    pub ca: Option<PathBuf>,
    /// The client's certificate chain and private key (PEM files), for mutual TLS.
    pub identity: Option<(PathBuf, PathBuf)>,
    /// The cloud's public signing key (PEM): what signed params and bundles must verify with.
    pub cloud_key: Option<PathBuf>,
}

impl ClientTrust {
    /// The cloud's public key read from [`ClientTrust::cloud_key`], when there is one.
    ///
    /// # Errors
    /// [`crate::security::SignatureError`] naming the file.
    pub fn read_cloud_key(&self) -> Result<Option<crate::security::CloudKey>, crate::security::SignatureError> {
        self.cloud_key.as_deref().map(crate::security::CloudKey::read).transpose()
    }
}

/// `[report]`: where results go.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
#[derive(Default)]
pub struct ReportConfig {
    /// JSON report path (relative to the working directory).
    pub json: Option<PathBuf>,
}

/// `[text]`: a frozen text encoder for the model's questions and captions.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TextChoice {
    /// Registered text-encoder plugin.
    pub plugin: String,
    /// Its settings.
    #[serde(default)]
    pub settings: toml::Table,
    /// Folder caching embeddings by content hash across runs.
    #[serde(default)]
    pub cache: Option<PathBuf>,
}

/// `[[plugins]]`: a plugin library the deployment loads before resolving plugin names.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginLibraryConfig {
    /// The library file (`.so`, `.dylib`, `.dll`), relative to the deployment file's folder.
    pub path: PathBuf,
    /// Its sha256 (64 hex digits), checked before the library is opened. Unpinned libraries
    /// load with a warning naming the hash to pin.
    #[serde(default)]
    pub sha256: Option<String>,
}

/// A baseline row of `mmpg bench`: an adapter plugin and its settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaselineChoice {
    /// Registered adapter plugin name.
    pub plugin: String,
    /// Its settings.
    #[serde(default)]
    pub settings: toml::Table,
    /// Row name; the adapter's own label when absent.
    #[serde(default)]
    pub name: Option<String>,
    /// Settings to choose on the cloud's source domains before the row runs: each key's
    /// candidate values (every combination is tried; the best mean accuracy over
    /// `[bench] tune_domains` source domains wins, ties to the earlier). Never chosen on a
    /// test device.
    #[serde(default)]
    pub tune: BTreeMap<String, Vec<toml::Value>>,
    /// Also report an oracle row: per device the candidate best on that device's own scored
    /// clips — an upper bound no deployment could reach. Needs `tune`.
    #[serde(default)]
    pub oracle: bool,
    /// The model the adapter starts from on each device: `static` (the exported model) or
    /// `cdc` (the method's generated parameters installed first: a combined row, whose bytes
    /// and device time include the method's).
    #[serde(default)]
    pub start: Start,
}

/// What a baseline row's adapter starts from (see [`BaselineChoice::start`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Start {
    /// The static model the cloud exported.
    #[default]
    Static,
    /// The static model with the method's generated parameters installed.
    Cdc,
}

/// Most combinations one baseline's `tune` may ask for.
pub const MAX_TUNE_CANDIDATES: usize = 64;

impl BaselineChoice {
    fn new(plugin: &str, settings: &str) -> Self {
        let settings = toml::from_str(settings).expect("built-in baseline settings are valid TOML");
        Self { plugin: plugin.into(), settings, name: None, tune: BTreeMap::new(), oracle: false, start: Start::Static }
    }

    /// With `key` chosen on source domains among `values`.
    fn tuning(mut self, key: &str, values: &[f64]) -> Self {
        self.tune.insert(key.into(), values.iter().copied().map(toml::Value::Float).collect());
        self
    }

    /// With the learning rate chosen on source domains among 1e-3, 3e-3, 1e-2 and 3e-2.
    fn tuned(self) -> Self {
        self.tuning("learning_rate", &[1e-3, 3e-3, 1e-2, 3e-2])
    }

    /// With the batch chosen too, among 1, 2 and 4 clips: at 4 labels (3 to train on) the
    /// default batch is the whole set, and smaller ones were worth 3.8 points on
    /// `bench-synthetic`.
    fn with_batches(mut self) -> Self {
        self.tune.insert("batch".into(), [1, 2, 4].map(toml::Value::Integer).to_vec());
        self
    }

    /// Every combination of the `tune` candidates as a settings table to merge over
    /// `settings`, in order (the last key varies fastest); one empty table without `tune`.
    pub fn candidates(&self) -> Vec<toml::Table> {
        let mut out = vec![toml::Table::new()];
        for (key, values) in &self.tune {
            out = out
                .iter()
                .flat_map(|base| {
                    values.iter().map(move |v| {
                        let mut t = base.clone();
                        t.insert(key.clone(), v.clone());
                        t
                    })
                })
                .collect();
        }
        out
    }
}

/// An ablation of `mmpg bench`: the deployment with some anchor and generator settings changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Variant {
    /// Row name.
    pub name: String,
    /// Merged over `[anchor] settings`.
    #[serde(default)]
    pub anchor: toml::Table,
    /// Merged over `[cloud] settings` (the generator's).
    #[serde(default)]
    pub generator: toml::Table,
    /// Replaces `[cloud] download`.
    #[serde(default)]
    pub download: Option<Quantisation>,
    /// Train the generator again for this variant (true), or serve the main generator with the
    /// changed device-side settings (false: a serve-time-only ablation such as quantisation).
    #[serde(default = "yes")]
    pub retrain: bool,
}

fn yes() -> bool {
    true
}

/// `[bench]`: what `mmpg bench` compares beside the method itself.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BenchConfig {
    /// Baseline rows (adapter plugins), run on the same devices as the method.
    pub baselines: Vec<BaselineChoice>,
    /// Ablations of the method.
    pub variants: Vec<Variant>,
    /// Anchor counts K to sweep (each a retrained variant), for accuracy against upload bytes.
    pub k_sweep: Vec<usize>,
    /// Privacy budgets ε per upload to sweep, for accuracy against ε: each a variant whose
    /// summaries go through the Gaussian mechanism (seeded noise), its generator retrained on
    /// summaries through the same mechanism.
    pub epsilon_sweep: Vec<f64>,
    /// Stages of the long-stream check: one device drifts through these domains in order,
    /// re-adapting at each stage; empty skips the check.
    pub stream: Vec<DeviceDomain>,
    /// Labelled clips scored per stream stage.
    pub stream_eval_clips: usize,
    /// Shifted source domains a baseline's `tune` is chosen on.
    pub tune_domains: usize,
    /// Labelled clips of each of them that score a candidate (beside the ones it trains on).
    pub tune_eval_clips: usize,
    /// Single-device generations timed for the latency percentiles.
    pub generation_repeats: usize,
    /// Backends the backend table times, by kind (default: every registered one; those not
    /// compiled in or not usable here get a row saying why).
    pub backends: Option<Vec<String>>,
    /// Folder of `report.md`, `report.json` and the plots (default `reports/<file stem>-bench`).
    pub out: Option<PathBuf>,
}

impl Default for BenchConfig {
    fn default() -> Self {
        Self {
            baselines: vec![
                BaselineChoice::new("static", ""),
                BaselineChoice::new("fta", "labels = 4").tuned().with_batches(),
                BaselineChoice { oracle: true, ..BaselineChoice::new("fta", "labels = 16").tuned() },
                BaselineChoice::new("fta", "labels = 64").tuned(),
                BaselineChoice::new("fta", "labels = 16\nscope = \"all\"").tuned(),
                BaselineChoice::new("feature-stats", ""),
                BaselineChoice::new("t3a", ""),
                // The label-free test-time adaptation methods of the field (#30).
                BaselineChoice::new("tent", "").tuning("learning_rate", &[1e-4, 1e-3, 1e-2]),
                BaselineChoice::new("foa", "").tuning("step_size", &[0.03, 0.1, 0.3]),
                BaselineChoice::new("lame", ""),
                BaselineChoice {
                    name: Some("CDC + LAME".into()),
                    start: Start::Cdc,
                    ..BaselineChoice::new("lame", "")
                },
            ],
            variants: Vec::new(),
            k_sweep: Vec::new(),
            epsilon_sweep: Vec::new(),
            stream: Vec::new(),
            stream_eval_clips: 128,
            tune_domains: 4,
            tune_eval_clips: 128,
            generation_repeats: 200,
            backends: None,
            out: None,
        }
    }
}

/// Largest fleet one deployment may declare; the memory estimate usually bounds it first.
pub const MAX_DEVICES: usize = 1_000_000;
/// Largest labelled batch of a training step.
const MAX_BATCH: usize = 1024;
/// Largest learning rate accepted: beyond it every optimiser here diverges.
const MAX_LEARNING_RATE: f64 = 10.0;

impl Settings for BackendConfig {
    fn check(&self, check: &mut Check) {
        check.within("device", self.device, 0..=1024);
        if let Some(device) = self.cloud_device {
            check.within("cloud_device", device, 0..=1024);
        }
    }
}

impl Settings for CloudTraining {
    fn check(&self, check: &mut Check) {
        check.within("pretrain_steps", self.pretrain_steps, 0..=10_000_000);
        check.within("pretrain_batch", self.pretrain_batch, 1..=MAX_BATCH);
        check.positive("pretrain_learning_rate", self.pretrain_learning_rate, MAX_LEARNING_RATE);
        check.within("generator_steps", self.generator_steps, 0..=10_000_000);
        check.within("generator_batch", self.generator_batch, 1..=MAX_BATCH);
        check.positive("generator_learning_rate", self.generator_learning_rate, MAX_LEARNING_RATE);
        check.within("source_domains", self.source_domains, 1..=4096);
    }
}

impl Settings for FleetConfig {
    fn check(&self, check: &mut Check) {
        if let Some(devices) = self.devices {
            check.within("devices", devices, 1..=MAX_DEVICES);
        }
        check.within("window_clips", self.window_clips, 1..=4096);
        check.within("eval_clips", self.eval_clips, 1..=1_000_000);
    }
}

impl Settings for BenchConfig {
    fn check(&self, check: &mut Check) {
        for (i, k) in self.k_sweep.iter().enumerate() {
            check.within(&format!("k_sweep[{i}]"), *k, 1..=4096);
        }
        for (i, epsilon) in self.epsilon_sweep.iter().enumerate() {
            check.real(&format!("epsilon_sweep[{i}]"), *epsilon, 0.01..=1e4);
        }
        check.within("stream_eval_clips", self.stream_eval_clips, 1..=1_000_000);
        check.within("tune_domains", self.tune_domains, 1..=256);
        check.within("tune_eval_clips", self.tune_eval_clips, 1..=100_000);
        check.within("generation_repeats", self.generation_repeats, 1..=1_000_000);
    }
}

/// Bytes of memory this machine can give a run: `MemAvailable` of `/proc/meminfo` (Linux);
/// `None` elsewhere, where the memory estimate is not enforced.
fn available_memory() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kib.checked_mul(1024)
}

/// Bytes a run holds for its devices' clips: every device keeps its window and its held-out
/// clips (and `mmpg bench` a labelled pool of the same size as the largest FTA budget), each
/// clip `clip_bytes`. A lower bound: models and activations come on top.
pub fn fleet_clip_bytes(devices: usize, clips_per_device: usize, clip_bytes: u64) -> u128 {
    devices as u128 * clips_per_device as u128 * u128::from(clip_bytes)
}

fn gib(bytes: u128) -> String {
    format!("{:.1} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// `base` with every key of `over` replacing its own (tables merge recursively).
pub fn merge_tables(base: &toml::Table, over: &toml::Table) -> toml::Table {
    let mut out = base.clone();
    for (key, value) in over {
        let merged = match (out.get(key), value) {
            (Some(toml::Value::Table(a)), toml::Value::Table(b)) => toml::Value::Table(merge_tables(a, b)),
            _ => value.clone(),
        };
        out.insert(key.clone(), merged);
    }
    out
}

/// A parsed, checked deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// Seed of everything random in the run.
    pub seed: u64,
    /// Compute backend.
    pub backend: BackendConfig,
    /// Data source plugin.
    pub data: PluginChoice,
    /// Device model plugin.
    pub model: PluginChoice,
    /// Anchor reasoner plugin.
    pub anchor: PluginChoice,
    /// Cloud generator and training.
    pub cloud: CloudConfig,
    /// Fleet devices.
    pub fleet: FleetConfig,
    /// Explicit `[[device]]` tables.
    pub devices: Vec<DeviceDomain>,
    /// Transport plugin.
    pub transport: PluginChoice,
    /// Reporting.
    pub report: ReportConfig,
    /// The cloud service and its address.
    pub serve: ServeConfig,
    /// What `mmpg bench` compares.
    pub bench: BenchConfig,
    /// The text encoder, if any.
    pub text: Option<TextChoice>,
    /// Mutual TLS, signatures and the audit log, when the deployment has `[security]`.
    pub security: Option<SecurityConfig>,
    /// Plugin libraries it loads, as written.
    pub plugins: Vec<PluginLibraryConfig>,
    /// `kind name sha256` of each plugin it uses that came from a library (for the fingerprint).
    library_plugins: Vec<String>,
    source: Source,
}

/// The text a deployment came from, kept so later errors can be located too.
#[derive(Debug, Clone)]
struct Source {
    file: String,
    document: Option<toml_edit::Document<String>>,
}

impl Source {
    fn error(&self, path: KeyPath, message: impl Into<String>) -> ConfigError {
        self.located(path, message, Anchor::Value)
    }

    fn located(&self, path: KeyPath, message: impl Into<String>, anchor: Anchor) -> ConfigError {
        let (line, column) = match self.document.as_ref().and_then(|d| locate(d, &path, anchor)) {
            Some(span) => {
                let (l, c) = line_col(d_text(self.document.as_ref()), span.start);
                (Some(l), Some(c))
            }
            None => (None, None),
        };
        ConfigError { file: self.file.clone(), line, column, path, message: message.into() }
    }
}

/// What loading a deployment's `[[plugins]]` did.
struct LoadedLibraries {
    errors: Vec<ConfigError>,
    all_loaded: bool,
}

/// Loads each well-formed `[[plugins]]` entry (paths relative to the deployment's folder); an
/// entry that is malformed is skipped here and reported by parsing.
fn load_libraries(text: &str, file: &str, registry: &mut Registry) -> LoadedLibraries {
    let mut out = LoadedLibraries { errors: Vec::new(), all_loaded: true };
    let Some(entries) = toml::from_str::<toml::Table>(text).ok().and_then(|t| t.get("plugins").cloned()) else {
        return out;
    };
    let Some(entries) = entries.as_array() else {
        out.all_loaded = false;
        return out;
    };
    let source = Source { file: file.into(), document: toml_edit::Document::parse(text.to_string()).ok() };
    let base = Path::new(file).parent().unwrap_or(Path::new("")).to_path_buf();
    for (i, entry) in entries.iter().enumerate() {
        let Ok(library) = entry.clone().try_into::<PluginLibraryConfig>() else {
            out.all_loaded = false;
            continue;
        };
        let bad_pin = library.sha256.as_deref().is_some_and(|p| crate::abi::loader_pin(p).is_none());
        if library.path.as_os_str().is_empty() || bad_pin {
            out.all_loaded = false;
            continue;
        }
        if let Err(e) = registry.load_library(&base.join(&library.path), library.sha256.as_deref()) {
            out.all_loaded = false;
            let key = if matches!(e, crate::LoadError::HashMismatch { .. }) { "sha256" } else { "path" };
            out.errors.push(source.error(KeyPath::parse(&format!("plugins[{i}].{key}")), e.to_string()));
        }
    }
    out
}

fn read_deployment(path: &Path) -> Result<String, ConfigErrors> {
    std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError {
            file: path.display().to_string(),
            line: None,
            column: None,
            path: KeyPath::default(),
            message: format!("cannot read: {e}"),
        }])
    })
}

fn d_text(doc: Option<&toml_edit::Document<String>>) -> &str {
    doc.map(|d| d.raw()).unwrap_or("")
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

enum Node<'a> {
    Item(&'a Item),
    Table(&'a Table),
    Value(&'a Value),
}

impl<'a> Node<'a> {
    fn span(&self) -> Option<Range<usize>> {
        match self {
            Node::Item(i) => i.span(),
            Node::Table(t) => t.span(),
            Node::Value(v) => v.span(),
        }
    }

    fn table_like(&self) -> Option<&'a dyn TableLike> {
        match self {
            Node::Item(i) => i.as_table_like(),
            Node::Table(t) => Some(*t),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
        }
    }

    fn index(&self, n: usize) -> Option<Node<'a>> {
        match self {
            Node::Item(Item::ArrayOfTables(a)) => a.get(n).map(Node::Table),
            Node::Item(Item::Value(Value::Array(a))) | Node::Value(Value::Array(a)) => a.get(n).map(Node::Value),
            _ => None,
        }
    }
}

/// Which part of a key-value pair an error points at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Anchor {
    /// The value (wrong types, out-of-range values).
    Value,
    /// The key (keys that should not be there).
    Key,
}

/// Span of the deepest part of `path` present in the document: the value (or the key, for
/// [`Anchor::Key`]) where it exists, else the nearest ancestor.
fn locate(doc: &toml_edit::Document<String>, path: &KeyPath, anchor: Anchor) -> Option<Range<usize>> {
    let mut node = Node::Table(doc.as_table());
    let mut best: Option<Range<usize>> = None;
    for (depth, seg) in path.0.iter().enumerate() {
        let last = depth + 1 == path.0.len();
        let next = match seg {
            Segment::Key(k) => node.table_like().and_then(|t| t.get_key_value(k)).map(|(key, item)| {
                if let Some(span) = key.span() {
                    best = Some(span);
                }
                Node::Item(item)
            }),
            Segment::Index(n) => node.index(*n),
        };
        if last && anchor == Anchor::Key && matches!(seg, Segment::Key(_)) && next.is_some() {
            return best;
        }
        match next {
            Some(n) => {
                if let Some(span) = n.span() {
                    best = Some(span);
                }
                node = n;
            }
            None => break,
        }
    }
    best
}

const SECTIONS: &[&str] = &[
    "seed",
    "plugins",
    "backend",
    "data",
    "model",
    "anchor",
    "cloud",
    "fleet",
    "device",
    "transport",
    "report",
    "serve",
    "bench",
    "text",
    "security",
];

/// Collects errors while parsing.
struct Parser<'r> {
    source: Source,
    errors: Vec<ConfigError>,
    registry: &'r Registry,
    /// `backend.kind`, which plugins from libraries must have been compiled for.
    backend: String,
    /// See [`Deployment::parse_checked`].
    libraries: Option<bool>,
}

impl Parser<'_> {
    fn fail(&mut self, path: KeyPath, message: impl Into<String>) {
        let err = self.source.error(path, message);
        self.errors.push(err);
    }

    /// A serde error: unknown fields point at their key (serde's path stops at the parent).
    fn fail_deserialize(&mut self, mut path: KeyPath, message: String) {
        match unknown_field(&message) {
            Some(field) => {
                if path.0.last() != Some(&Segment::Key(field.clone())) {
                    path.0.push(Segment::Key(field));
                }
                let err = self.source.located(path, message, Anchor::Key);
                self.errors.push(err);
            }
            None => self.fail(path, message),
        }
    }

    /// A section as its struct, every wrong key reported (see [`crate::settings::deserialise_all`]);
    /// the struct built from the remaining keys comes back so later checks still run.
    fn section<T: DeserializeOwned>(&mut self, table: &toml::Table, key: &str) -> Option<T> {
        let value = table.get(key)?.clone();
        let (section, errors) = crate::settings::deserialise_all::<T>(value);
        for e in errors {
            self.fail_deserialize(KeyPath::parse(key).join(&e.path), e.message);
        }
        section
    }

    fn plugin(&mut self, kind: PluginKind, name: &str, name_path: &str, settings: &toml::Table, settings_path: &str) {
        match self.registry.get(kind, name) {
            // Its library did not load, which is reported at its [[plugins]] entry.
            Err(RegistryError::NotFound { .. }) if self.libraries == Some(false) => {}
            Err(e) => self.fail(KeyPath::parse(name_path), e.to_string()),
            Ok(plugin) => {
                if let Some(library) = self.registry.origin(kind, name)
                    && !library.supports_backend(&self.backend)
                {
                    let message = format!(
                        "{kind} `{name}` comes from {}, built with backends {}; this deployment computes on `{}`: rebuild the library with its `{}` feature",
                        library.path.display(),
                        library.backends.join(", "),
                        self.backend,
                        self.backend,
                    );
                    self.fail(KeyPath::parse(name_path), message);
                }
                if let Some(spec) = plugin.settings()
                    && let Err(errors) = spec.check(settings)
                {
                    for e in errors {
                        self.fail_deserialize(KeyPath::parse(settings_path).join(&e.path), e.message);
                    }
                }
            }
        }
    }

    /// A bench row's explicit name: unique among the named rows, printable in a Markdown table,
    /// and not one the bench gives its own rows (the method, the static model for another
    /// plugin, an oracle row), since targets find rows by name.
    fn row_name(
        &mut self,
        name: &str,
        baseline: &BaselineChoice,
        at: &str,
        seen: &mut std::collections::BTreeSet<String>,
    ) {
        let problem = if name.trim().is_empty() {
            Some("a row name must not be empty".to_string())
        } else if name.chars().count() > 80 || name.chars().any(|c| c == '|' || c.is_control()) {
            Some("a row name must be at most 80 characters, without `|` or control characters".to_string())
        } else if name == "CDC-MMPG (ours)" || name.ends_with(", oracle (upper bound)") {
            Some(format!("`{name}` is a name the bench gives its own rows"))
        } else if name == "static" && baseline.plugin != "static" {
            Some("`static` names the static model's row (the targets compare with it)".to_string())
        } else if !seen.insert(name.to_string()) {
            Some(format!("another baseline is already named `{name}`"))
        } else {
            None
        };
        if let Some(problem) = problem {
            self.fail(KeyPath::parse(at), problem);
        }
    }

    /// `[[plugins]]`: each pin well-formed, each library loaded (by [`Deployment::open`]).
    fn libraries(&mut self, plugins: &[PluginLibraryConfig], base: &Path) {
        for (i, library) in plugins.iter().enumerate() {
            if library.path.as_os_str().is_empty() {
                self.fail(KeyPath::parse(&format!("plugins[{i}].path")), "expected a path, found an empty string");
                continue;
            }
            if let Some(pin) = &library.sha256
                && crate::abi::loader_pin(pin).is_none()
            {
                let message = format!("expected the library's sha256 as 64 hexadecimal characters, found `{pin}`");
                self.fail(KeyPath::parse(&format!("plugins[{i}].sha256")), message);
                continue;
            }
            let resolved = base.join(&library.path);
            if self.libraries.is_none() && self.registry.library_at(&resolved).is_none() {
                let message = format!(
                    "{} is not loaded: `mmpg` loads [[plugins]] itself; a program parsing deployments calls Deployment::open",
                    resolved.display()
                );
                self.fail(KeyPath::parse(&format!("plugins[{i}].path")), message);
            }
        }
    }

    /// Device names identify devices in reports, traffic accounting and (later) on the wire:
    /// two devices may not share one, whether written or derived (`device-NN`).
    fn unique_device_names(&mut self, fleet: &FleetConfig, devices: &[DeviceDomain]) {
        let count = fleet.devices.unwrap_or(fleet.shifts.len()).min(MAX_DEVICES);
        let mut seen = std::collections::HashMap::new();
        let fleet_names = (0..count).map(|i| {
            let shift = fleet.shifts.get(i % fleet.shifts.len().max(1));
            let path = if shift.is_some() {
                format!("fleet.shifts[{}].name", i % fleet.shifts.len())
            } else {
                "fleet.devices".into()
            };
            (shift.and_then(|d| d.name.clone()).unwrap_or_else(|| format!("device-{i:02}")), path)
        });
        let named = devices.iter().enumerate().map(|(i, d)| {
            let name = d.name.clone().unwrap_or_else(|| format!("device-{:02}", count + i));
            (name, format!("device[{i}].name"))
        });
        for (name, path) in fleet_names.chain(named) {
            if let Some(first) = seen.insert(name.clone(), path.clone()) {
                let message = format!("device name `{name}` is already used by {first}; device names must be unique");
                let path = if first == path { "fleet.devices".to_string() } else { path };
                self.fail(KeyPath::parse(&path), message);
                seen.insert(name, first);
            }
        }
    }

    /// Refuses a deployment whose devices' clips alone would not fit in this machine's memory.
    fn memory(&mut self, data: &PluginChoice, fleet: &FleetConfig, devices: &[DeviceDomain], bench: &BenchConfig) {
        let Ok(plugin) = self.registry.get(PluginKind::DataSource, &data.plugin) else { return };
        let Some(clip_bytes) = plugin.settings().and_then(|s| s.clip_bytes(&data.settings)) else { return };
        let Some(available) = available_memory() else { return };
        let count = fleet.devices.unwrap_or(fleet.shifts.len()) + devices.len();
        // Labels a baseline may ask for: its settings' or any tuned candidate's.
        let labels = |b: &BaselineChoice| -> Vec<i64> {
            let tuned = b.tune.get("labels").into_iter().flatten().filter_map(toml::Value::as_integer);
            b.settings.get("labels").and_then(toml::Value::as_integer).into_iter().chain(tuned).collect()
        };
        let pool = bench.baselines.iter().flat_map(labels).max().unwrap_or(0);
        let pool = usize::try_from(pool).unwrap_or(0);
        let per_device = fleet.window_clips + fleet.eval_clips + pool;
        // Tuning holds, besides, its source domains' labelled, scored and window clips.
        let tuning = if bench.baselines.iter().any(|b| !b.tune.is_empty()) {
            fleet_clip_bytes(bench.tune_domains, pool + bench.tune_eval_clips + fleet.window_clips, clip_bytes)
        } else {
            0
        };
        let needed = fleet_clip_bytes(count, per_device, clip_bytes) + tuning;
        if needed > u128::from(available) {
            let path = if fleet.devices.is_some() { "fleet.devices" } else { "fleet" };
            self.fail(
                KeyPath::parse(path),
                format!(
                    "the devices' clips alone need about {} ({count} devices × {per_device} clips × {clip_bytes} bytes), \
                     more than the {} this machine has available; use fewer devices or clips",
                    gib(needed),
                    gib(u128::from(available))
                ),
            );
        }
    }

    /// Every declared range of a section's settings, located under `prefix`.
    fn ranges<S: Settings>(&mut self, prefix: &str, settings: &S) {
        for e in crate::settings::check_ranges(settings) {
            self.fail(KeyPath::parse(prefix).join(&e.path), e.message);
        }
    }

    /// `[serve]` and the device-process keys of `[fleet]`: limits that keep a service usable,
    /// a URL devices can reach, TLS files that exist.
    fn service(&mut self, serve: &ServeConfig, fleet: &FleetConfig) {
        let mut check = Check::new();
        check.within("serve.max_batch", serve.max_batch, 1..=4096);
        check.within("serve.max_wait_ms", serve.max_wait_ms, 0..=10_000);
        check.within("serve.body_limit", serve.body_limit, 1024..=crate::wire::MAX_PAYLOAD);
        check.within("serve.request_timeout_ms", serve.request_timeout_ms, 1..=600_000);
        check.within("serve.max_connections", serve.max_connections, 16..=1 << 20);
        // Against the total as validate will take it: one bad value is one error, not two.
        let total = serve.max_connections.clamp(16, 1 << 20);
        check.within("serve.max_connections_per_peer", serve.max_connections_per_peer, 1..=total);
        check.within("serve.max_requests_per_peer", serve.max_requests_per_peer, 1..=4096);
        if let Some(bytes) = serve.max_buffered_bytes {
            // Room for at least one request of the largest size.
            check.within("serve.max_buffered_bytes", bytes, serve.body_limit.max(1)..=1 << 36);
        }
        check.within("fleet.request_timeout_ms", fleet.request_timeout_ms, 1..=600_000);
        check.within("fleet.max_attempts", fleet.max_attempts, 1..=100);
        check.within("fleet.clip_interval_ms", fleet.clip_interval_ms, 0..=60_000);
        if let Some(every) = fleet.adapt_every {
            check.within("fleet.adapt_every", every, 1..=1_000_000);
        }
        for e in check.into_errors() {
            self.fail(KeyPath::parse(&e.path), e.message);
        }
        if let Some(url) = &serve.url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            self.fail(KeyPath::parse("serve.url"), format!("expected an http:// or https:// URL, found `{url}`"));
        }
        if let Some(tls) = &serve.tls {
            for (key, path) in [("cert", Some(&tls.cert)), ("key", Some(&tls.key)), ("ca", tls.ca.as_ref())] {
                let Some(path) = path else { continue };
                if let Err(e) = std::fs::metadata(path) {
                    self.fail(KeyPath::parse(&format!("serve.tls.{key}")), format!("{}: {e}", path.display()));
                }
            }
        }
    }

    /// `[security]`: names a certificate can carry, sane limits, and one source of TLS.
    fn security(&mut self, security: &SecurityConfig, serve: &ServeConfig) {
        let mut check = Check::new();
        check.real("security.rate_per_s", security.rate_per_s, 0.001..=1e6);
        check.within("security.burst", security.burst, 1..=1_000_000);
        for e in check.into_errors() {
            self.fail(KeyPath::parse(&e.path), e.message);
        }
        if security.server_names.is_empty() {
            self.fail(KeyPath::parse("security.server_names"), "expected at least one DNS name or IP address");
        }
        for (i, name) in security.server_names.iter().enumerate() {
            if !crate::security::identity::is_certificate_name(name) {
                self.fail(
                    KeyPath::parse(&format!("security.server_names[{i}]")),
                    format!("`{name}` is neither an IP address nor a DNS name"),
                );
            }
        }
        if serve.tls.is_some() {
            let message = if security.insecure {
                "`[security] insecure = true` serves plain HTTP: remove [serve.tls], or `insecure`"
            } else {
                "[security] serves TLS with its kit's certificates: remove [serve.tls]"
            };
            self.fail(KeyPath::parse("serve.tls"), message);
        }
        if let Some(url) = serve.url.as_ref().filter(|u| !security.insecure && u.starts_with("http://")) {
            self.fail(KeyPath::parse("serve.url"), format!("[security] serves HTTPS, but the URL is `{url}`"));
        }
        // The cloud refuses to start on a revocation list it cannot take (it would revoke no
        // one): so does validate, once the kit exists.
        if let Err(e) = crate::security::revocation::read(&security.kit().revoked()) {
            self.fail(KeyPath::parse("security.dir"), format!("the kit's revocation list: {e}"));
        }
    }

    fn domain(&mut self, domain: &DeviceDomain, path: &KeyPath) {
        if let Some(name) = domain.name.as_ref().filter(|n| n.is_empty() || n.len() > crate::wire::MAX_DEVICE_ID) {
            let limit = crate::wire::MAX_DEVICE_ID;
            self.fail(path.join("name"), format!("expected 1..={limit} bytes, found {}", name.len()));
        }
        if domain.kind != "clean" && !(1..=5).contains(&domain.severity) {
            self.fail(path.join("severity"), format!("expected 1..=5, found {}", domain.severity));
        }
        if domain.kind.split('+').any(|k| k.trim().is_empty()) {
            self.fail(path.join("kind"), format!("`{}` names an empty shift kind", domain.kind));
        }
        let mut check = Check::new();
        if let Some(alpha) = domain.class_mix_alpha {
            // Dirichlet draws underflow to NaN mixes below this and are uniform far above it.
            check.real("class_mix_alpha", alpha, 0.001..=1000.0);
        }
        check.within("phrasing", domain.phrasing, 0..=1000);
        for e in check.into_errors() {
            self.fail(path.join(&e.path), e.message);
        }
    }
}

impl Deployment {
    /// Reads and checks a deployment file.
    ///
    /// Plugin libraries named in `[[plugins]]` must already be in `registry`; [`Deployment::open`]
    /// loads them.
    pub fn load(path: &Path, registry: &Registry) -> Result<Self, ConfigErrors> {
        let text = read_deployment(path)?;
        Self::parse(&text, &path.display().to_string(), registry)
    }

    /// Reads a deployment, loads the plugin libraries its `[[plugins]]` name into `registry`
    /// (paths relative to the deployment's folder; pins checked before opening), then checks
    /// it against the registry. What `mmpg validate`, `run` and `bench` call.
    ///
    /// # Errors
    /// Every problem found, library load errors located at their `[[plugins]]` entry.
    pub fn open(path: &Path, registry: &mut Registry) -> Result<Self, ConfigErrors> {
        let file = path.display().to_string();
        let text = read_deployment(path)?;
        let libraries = load_libraries(&text, &file, registry);
        let outcome = Self::parse_checked(&text, &file, registry, Some(libraries.all_loaded));
        match (outcome, libraries.errors) {
            (Ok(deployment), errors) if errors.is_empty() => Ok(deployment),
            (Ok(_), errors) => Err(ConfigErrors(errors)),
            (Err(ConfigErrors(more)), mut errors) => {
                errors.extend(more);
                errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column));
                Err(ConfigErrors(errors))
            }
        }
    }

    /// Loads only the plugin libraries a deployment's `[[plugins]]` name (what `mmpg plugins
    /// <deployment>` lists), without checking the rest of it.
    ///
    /// # Errors
    /// The entries that did not load, located.
    pub fn load_plugins(path: &Path, registry: &mut Registry) -> Result<(), ConfigErrors> {
        let text = read_deployment(path)?;
        let libraries = load_libraries(&text, &path.display().to_string(), registry);
        if libraries.errors.is_empty() { Ok(()) } else { Err(ConfigErrors(libraries.errors)) }
    }

    /// Parses and checks deployment text; `file` names it in errors. Libraries its
    /// `[[plugins]]` name must already be in `registry` ([`Deployment::open`] loads them).
    pub fn parse(text: &str, file: &str, registry: &Registry) -> Result<Self, ConfigErrors> {
        Self::parse_checked(text, file, registry, None)
    }

    /// `libraries`: `None` when the caller loaded them (each must be in `registry`), else
    /// whether [`load_libraries`] loaded every entry (its errors are reported there; a plugin
    /// name that a failed library would have provided is then not reported again).
    fn parse_checked(
        text: &str,
        file: &str,
        registry: &Registry,
        libraries: Option<bool>,
    ) -> Result<Self, ConfigErrors> {
        let document = match toml_edit::Document::parse(text.to_string()) {
            Ok(d) => d,
            Err(e) => {
                let (line, column) = e.span().map_or((None, None), |s| {
                    let (l, c) = line_col(text, s.start);
                    (Some(l), Some(c))
                });
                return Err(ConfigErrors(vec![ConfigError {
                    file: file.into(),
                    line,
                    column,
                    path: KeyPath::default(),
                    message: format!("TOML syntax: {}", e.message().trim()),
                }]));
            }
        };
        let table: toml::Table = toml::from_str(text).map_err(|e| {
            ConfigErrors(vec![ConfigError {
                file: file.into(),
                line: None,
                column: None,
                path: KeyPath::default(),
                message: e.message().to_string(),
            }])
        })?;
        let mut p = Parser {
            source: Source { file: file.into(), document: Some(document) },
            errors: Vec::new(),
            registry,
            backend: String::new(),
            libraries,
        };

        for key in table.keys().filter(|k| !SECTIONS.contains(&k.as_str())) {
            let message = format!("unknown field `{key}`; expected one of: {}", SECTIONS.join(", "));
            p.fail_deserialize(KeyPath::default(), message);
        }
        let seed = p.section::<u64>(&table, "seed").unwrap_or(0);
        let plugins = p.section::<Vec<PluginLibraryConfig>>(&table, "plugins").unwrap_or_default();
        p.libraries(&plugins, Path::new(file).parent().unwrap_or(Path::new("")));
        let backend = p.section::<BackendConfig>(&table, "backend").unwrap_or_default();
        p.backend = backend.kind.clone();
        let mut choice = |key: &str, default: &str| {
            let section = p.section::<PluginSection>(&table, key);
            let (plugin, settings) = section.map_or((None, toml::Table::new()), |s| (s.plugin, s.settings));
            PluginChoice { plugin: plugin.unwrap_or_else(|| default.to_string()), settings }
        };
        let data = choice("data", "synthetic");
        let model = choice("model", "lmm");
        let anchor = choice("anchor", "adr");
        let transport = choice("transport", "in-process");
        let cloud = p.section::<CloudConfig>(&table, "cloud").unwrap_or_default();
        let fleet_parsed = p.section::<FleetConfig>(&table, "fleet");
        let fleet_ok = fleet_parsed.is_some() || !table.contains_key("fleet");
        let fleet = fleet_parsed.unwrap_or_default();
        let devices = p.section::<Vec<DeviceDomain>>(&table, "device").unwrap_or_default();
        let report = p.section::<ReportConfig>(&table, "report").unwrap_or_default();
        let serve = p.section::<ServeConfig>(&table, "serve").unwrap_or_default();
        let bench = p.section::<BenchConfig>(&table, "bench").unwrap_or_default();
        let text = p.section::<TextChoice>(&table, "text");
        let security = p.section::<SecurityConfig>(&table, "security");
        if let Some(t) = &text {
            p.plugin(PluginKind::TextEncoder, &t.plugin, "text.plugin", &t.settings, "text.settings");
        }

        // Whether the machine has the device is known only when building it; whether this
        // binary contains the backend at all is known now.
        for (key, kind) in [("backend.kind", Some(&backend.kind)), ("backend.cloud", backend.cloud.as_ref())] {
            let Some(kind) = kind else { continue };
            match registry.backend(kind) {
                Err(e) => p.fail(KeyPath::parse(key), e.to_string()),
                Ok(provider) if !provider.compiled_in() => {
                    let feature = provider.cargo_feature();
                    p.fail(
                        KeyPath::parse(key),
                        format!("backend `{kind}` is not compiled in: rebuild with `--features {feature}`"),
                    );
                }
                Ok(_) => {}
            }
        }
        p.plugin(PluginKind::DataSource, &data.plugin, "data.plugin", &data.settings, "data.settings");
        p.plugin(PluginKind::Model, &model.plugin, "model.plugin", &model.settings, "model.settings");
        p.plugin(PluginKind::AnchorReasoner, &anchor.plugin, "anchor.plugin", &anchor.settings, "anchor.settings");
        p.plugin(PluginKind::Generator, &cloud.generator, "cloud.generator", &cloud.settings, "cloud.settings");
        p.plugin(
            PluginKind::Transport,
            &transport.plugin,
            "transport.plugin",
            &transport.settings,
            "transport.settings",
        );

        let mut names = std::collections::BTreeSet::new();
        for (i, b) in bench.baselines.iter().enumerate() {
            let at = format!("bench.baselines[{i}]");
            p.plugin(PluginKind::Adapter, &b.plugin, &format!("{at}.plugin"), &b.settings, &format!("{at}.settings"));
            if let Some(name) = &b.name {
                p.row_name(name, b, &format!("{at}.name"), &mut names);
            }
            // Each candidate alone, so that an error names the tuned key; an unknown plugin is
            // reported once, above.
            let known = p.registry.get(PluginKind::Adapter, &b.plugin).is_ok();
            for (key, values) in b.tune.iter().filter(|_| known) {
                if !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-') || key.is_empty() {
                    p.fail(KeyPath::parse(&format!("{at}.tune")), format!("`{key}` is not a setting name"));
                    continue;
                }
                if values.is_empty() {
                    p.fail(KeyPath::parse(&format!("{at}.tune.{key}")), "needs at least one candidate value");
                }
                for value in values {
                    let one = toml::Table::from_iter([(key.clone(), value.clone())]);
                    p.plugin(PluginKind::Adapter, &b.plugin, &format!("{at}.plugin"), &one, &format!("{at}.tune"));
                }
            }
            let combinations = b.tune.values().map(Vec::len).try_fold(1usize, |n, k| n.checked_mul(k));
            if combinations.is_none_or(|n| n > MAX_TUNE_CANDIDATES) {
                p.fail(
                    KeyPath::parse(&format!("{at}.tune")),
                    format!("asks for more than {MAX_TUNE_CANDIDATES} combinations; tune fewer values"),
                );
            }
            if b.start == Start::Cdc && b.plugin == "static" {
                p.fail(
                    KeyPath::parse(&format!("{at}.start")),
                    "`static` from CDC's parameters is CDC's own row; `start = \"cdc\"` is for an adapter to run after it",
                );
            }
            if b.start == Start::Cdc && !b.tune.is_empty() {
                p.fail(
                    KeyPath::parse(&format!("{at}.tune")),
                    "`tune` adapts the static model on source domains; a row with `start = \"cdc\"` takes fixed settings",
                );
            }
            if b.oracle && b.tune.is_empty() {
                p.fail(
                    KeyPath::parse(&format!("{at}.oracle")),
                    "an oracle row chooses among `tune` candidates: add `tune`",
                );
            }
        }
        for (i, v) in bench.variants.iter().enumerate() {
            let at = format!("bench.variants[{i}]");
            let merged = merge_tables(&anchor.settings, &v.anchor);
            p.plugin(PluginKind::AnchorReasoner, &anchor.plugin, "anchor.plugin", &merged, &format!("{at}.anchor"));
            let merged = merge_tables(&cloud.settings, &v.generator);
            p.plugin(PluginKind::Generator, &cloud.generator, "cloud.generator", &merged, &format!("{at}.generator"));
        }
        for (i, kind) in bench.backends.iter().flatten().enumerate() {
            if let Err(e) = registry.get(PluginKind::Backend, kind) {
                p.fail(KeyPath::parse(&format!("bench.backends[{i}]")), e.to_string());
            }
        }
        for (i, d) in bench.stream.iter().enumerate() {
            p.domain(d, &KeyPath::parse(&format!("bench.stream[{i}]")));
        }
        for (i, d) in fleet.shifts.iter().enumerate() {
            p.domain(d, &KeyPath::parse(&format!("fleet.shifts[{i}]")));
        }
        for (i, d) in cloud.training.hold_out.iter().flatten().enumerate() {
            p.domain(d, &KeyPath::parse(&format!("cloud.training.hold_out[{i}]")));
        }
        for (i, d) in devices.iter().enumerate() {
            p.domain(d, &KeyPath::parse(&format!("device[{i}]")));
        }
        p.ranges("backend", &backend);
        p.ranges("cloud.training", &cloud.training);
        p.ranges("fleet", &fleet);
        p.ranges("bench", &bench);
        if fleet_ok && fleet.devices.is_none() && fleet.shifts.is_empty() && devices.is_empty() {
            p.fail(KeyPath::parse("fleet"), "no devices: set `devices`, list `shifts`, or add [[device]] tables");
        }
        p.unique_device_names(&fleet, &devices);
        p.service(&serve, &fleet);
        if let Some(security) = &security {
            p.security(security, &serve);
        }
        // An empty path would write into (or read from) whatever folder the run starts in.
        let paths = [
            ("cloud.checkpoint", cloud.checkpoint.as_ref()),
            ("report.json", report.json.as_ref()),
            ("bench.out", bench.out.as_ref()),
            ("text.cache", text.as_ref().and_then(|t| t.cache.as_ref())),
            ("fleet.state", Some(&fleet.state)),
            ("security.dir", security.as_ref().map(|s| &s.dir)),
        ];
        for (key, path) in paths {
            if path.is_some_and(|p| p.as_os_str().is_empty()) {
                p.fail(KeyPath::parse(key), "expected a path, found an empty string");
            }
        }
        if p.errors.is_empty() {
            p.memory(&data, &fleet, &devices, &bench);
        }
        if !p.errors.is_empty() {
            p.errors.sort_by_key(|e| (e.line.unwrap_or(usize::MAX), e.column));
            return Err(ConfigErrors(p.errors));
        }
        let mut used = vec![
            (PluginKind::DataSource, data.plugin.as_str()),
            (PluginKind::Model, &model.plugin),
            (PluginKind::AnchorReasoner, &anchor.plugin),
            (PluginKind::Generator, &cloud.generator),
        ];
        used.extend(text.as_ref().map(|t| (PluginKind::TextEncoder, t.plugin.as_str())));
        let library_plugins = used
            .into_iter()
            .filter_map(|(kind, name)| registry.origin(kind, name).map(|l| format!("{kind} {name} {}", l.sha256)))
            .collect();
        Ok(Self {
            seed,
            backend,
            data,
            model,
            anchor,
            cloud,
            fleet,
            devices,
            transport,
            report,
            serve,
            bench,
            text,
            security,
            plugins,
            library_plugins,
            source: p.source,
        })
    }

    /// A fingerprint of everything that determines what cloud training produces: the seed,
    /// the data, model, anchor and cloud sections, the window size and the held-out shifts.
    pub fn training_fingerprint(&self) -> String {
        use sha2::{Digest, Sha256};
        // What training excludes, as a set: devices sharing a shift, their names and their order
        // change nothing the cloud learns.
        let mut held_out: Vec<String> = self.held_out_domains().iter().map(DomainSpec::shift_label).collect();
        held_out.sort();
        held_out.dedup();
        let mut cloud = self.cloud.clone();
        cloud.checkpoint = None;
        // Covered by `held_out` above, as a set.
        cloud.training.hold_out = None;
        // How parameters travel does not change what training produces.
        cloud.download = Quantisation::F32;
        // Nor where devices draw their noise: the generator always trains with seeded noise.
        let mut anchor = self.anchor.clone();
        if let Some(toml::Value::Table(privacy)) = anchor.settings.get_mut("privacy") {
            privacy.remove("noise");
        }

        let canonical = serde_json::json!({
            // 2: summaries carry text-side anchors and the FDA encodes them. 3: source domains
            // include clean frames under label shift; the FDA's defaults stay at the reference.
            "version": 3,
            "seed": self.seed,
            "data": self.data,
            "model": self.model,
            "anchor": anchor,
            "cloud": cloud,
            "window_clips": self.fleet.window_clips,
            "held_out": held_out,
        });
        // Stream stages are held out of the sources too; older fingerprints stay valid without them.
        let mut canonical = canonical;
        if let Some(text) = &self.text {
            canonical["text"] = serde_json::json!({ "plugin": text.plugin, "settings": text.settings });
        }
        if !self.bench.stream.is_empty() {
            let stream: Vec<String> = self.stream_domains().iter().map(DomainSpec::shift_label).collect();
            canonical["held_out_stream"] = serde_json::json!(stream);
        }
        // A rebuilt plugin library may train differently under the same settings.
        if !self.library_plugins.is_empty() {
            canonical["plugin_libraries"] = serde_json::json!(self.library_plugins);
        }
        let digest = Sha256::digest(canonical.to_string().as_bytes());
        digest.iter().take(12).map(|b| format!("{b:02x}")).collect()
    }

    /// `[security]` when it asks for mutual TLS and signatures (`insecure` unset).
    pub fn secured(&self) -> Option<&SecurityConfig> {
        self.security.as_ref().filter(|s| !s.insecure)
    }

    /// The URL devices reach the cloud at: `[serve] url`, else `http(s)://<[serve] listen>`
    /// (HTTPS with `[serve.tls]` or a secured `[security]`).
    pub fn device_url(&self) -> String {
        match (&self.serve.url, self.secured()) {
            (None, Some(_)) => format!("https://{}", self.serve.listen),
            _ => self.serve.device_url(),
        }
    }

    /// What a client of the cloud trusts and presents: the CA (`[serve.tls]`'s, or the kit's),
    /// and with `[security]` the device's own certificate and the cloud's signing key from
    /// `device`'s startup kit (`kit` overrides where that kit lies).
    pub fn client_trust(&self, device: Option<&str>, kit: Option<&Path>) -> ClientTrust {
        match self.secured() {
            Some(security) => {
                let dir = match (kit, device) {
                    (Some(dir), _) => Some(dir.to_path_buf()),
                    (None, Some(id)) => Some(security.kit().device_dir(id)),
                    (None, None) => None,
                };
                match dir {
                    Some(dir) => {
                        let kit = crate::security::DeviceKit::new(&dir);
                        ClientTrust {
                            ca: Some(kit.ca()),
                            identity: Some((kit.cert(), kit.key())),
                            cloud_key: Some(kit.signing_public()),
                        }
                    }
                    // An operator's tool (health, metrics): the cloud's CA, no identity.
                    None => ClientTrust {
                        ca: Some(security.kit().ca_cert()),
                        identity: None,
                        cloud_key: Some(security.kit().signing_public()),
                    },
                }
            }
            None => ClientTrust {
                ca: self.serve.tls.as_ref().map(|t| t.ca.clone().unwrap_or_else(|| t.cert.clone())),
                identity: None,
                cloud_key: None,
            },
        }
    }

    /// The file this deployment came from.
    pub fn file(&self) -> &str {
        &self.source.file
    }

    /// A located error about a key of this deployment, for problems found after parsing (for
    /// example a shift kind the chosen data source does not implement).
    pub fn error_at(&self, path: &str, message: impl Into<String>) -> ConfigError {
        self.source.error(KeyPath::parse(path), message)
    }

    /// Every device of the deployment: fleet devices (shifts cycled) then `[[device]]` tables,
    /// with the key path that defines each.
    pub fn device_domains(&self) -> Vec<(String, DomainSpec)> {
        let mut out = Vec::new();
        let count = self.fleet.devices.unwrap_or(self.fleet.shifts.len());
        for i in 0..count {
            let (path, domain) = match self.fleet.shifts.get(i % self.fleet.shifts.len().max(1)) {
                Some(d) => (format!("fleet.shifts[{}]", i % self.fleet.shifts.len()), d.clone()),
                None => (
                    "fleet.devices".to_string(),
                    DeviceDomain {
                        name: None,
                        kind: "clean".into(),
                        severity: 1,
                        class_mix_alpha: None,
                        phrasing: 0,
                        seed: None,
                    },
                ),
            };
            let name = domain.name.clone().unwrap_or_else(|| format!("device-{i:02}"));
            out.push((path, self.domain_spec(&name, &domain)));
        }
        for (i, d) in self.devices.iter().enumerate() {
            let name = d.name.clone().unwrap_or_else(|| format!("device-{:02}", count + i));
            out.push((format!("device[{i}]"), self.domain_spec(&name, d)));
        }
        out
    }

    /// The shifts training holds out: `[cloud.training] hold_out` when given, else every
    /// device's.
    pub fn held_out_domains(&self) -> Vec<DomainSpec> {
        match &self.cloud.training.hold_out {
            Some(list) => {
                list.iter().enumerate().map(|(i, d)| self.domain_spec(&format!("held-out-{i:02}"), d)).collect()
            }
            None => self.device_domains().into_iter().map(|(_, d)| d).collect(),
        }
    }

    /// The stages of the long-stream check (`[bench] stream`), named `stream-NN`.
    pub fn stream_domains(&self) -> Vec<DomainSpec> {
        self.bench.stream.iter().enumerate().map(|(i, d)| self.domain_spec(&format!("stream-{i:02}"), d)).collect()
    }

    /// This deployment with a bench variant's settings merged in.
    pub fn with_variant(&self, variant: &Variant) -> Self {
        let mut out = self.clone();
        out.anchor.settings = merge_tables(&self.anchor.settings, &variant.anchor);
        out.cloud.settings = merge_tables(&self.cloud.settings, &variant.generator);
        out.cloud.download = variant.download.unwrap_or(self.cloud.download);
        out
    }

    fn domain_spec(&self, name: &str, d: &DeviceDomain) -> DomainSpec {
        let shifts = if d.kind == "clean" {
            Vec::new()
        } else {
            d.kind.split('+').map(|k| Shift { kind: k.trim().to_string(), severity: d.severity }).collect()
        };
        DomainSpec {
            name: name.to_string(),
            shifts,
            class_mix_alpha: d.class_mix_alpha,
            phrasing: d.phrasing,
            seed: d.seed.unwrap_or_else(|| seed::derive_str(self.seed, name)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_paths_round_trip_through_text() {
        for text in ["fleet.shifts[2].severity", "cloud.settings.latent", "device[0]", "a[1][2].b"] {
            assert_eq!(KeyPath::parse(text).to_string(), text);
        }
    }

    #[test]
    fn line_and_column_are_one_based() {
        assert_eq!(line_col("a = 1\nbb = 2\n", 6), (2, 1));
        assert_eq!(line_col("a = 1\nbb = 2\n", 11), (2, 6));
    }
}
