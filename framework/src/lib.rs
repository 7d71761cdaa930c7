//! # mmpg — cloud-device multi-modal parameter generation
//!
//! The core of the framework: domain types, the plugin traits, the plugin registry, TOML
//! deployments and the runtime that composes them. No plugin logic lives here.
//!
//! - A device runs a [`DeviceModel`] and an [`AnchorReasoner`]; it never computes a gradient.
//! - The cloud trains a [`CloudModel`] and a [`ParameterGenerator`] on labelled source domains
//!   from a [`DataSource`], then turns each device's [`AnchorSummary`] into [`GeneratedParams`].
//! - A [`CloudNode`] and each [`DeviceNode`] own their state and share only envelopes, which a
//!   [`Transport`]'s two ends carry: a [`DeviceLink`] per device, a [`CloudEndpoint`] for the cloud.
//! - A [`BackendProvider`] says whether the backend `[backend]` names is usable here; plugins
//!   receive a [`DeviceDescriptor`] (plain data) and build their own device from it.
//!
//! This crate does not depend on Burn: what crosses the plugin boundary is plain data
//! ([`HostTensor`], bytes, TOML text). Burn plugins share `mmpg-backends`.

pub mod abi;
pub mod adapt;
pub mod anchor;
pub mod backend;
pub mod bundle;
pub mod checkpoint;
pub mod clip_file;
pub mod config;
pub mod data;
pub mod deploy;
pub mod files;
pub mod generator;
pub mod load;
pub mod memory;
pub mod metrics;
pub mod model;
pub mod node;
pub mod privacy;
pub mod registry;
pub mod replies;
pub mod report;
pub mod runtime;
pub mod security;
pub mod seed;
pub mod settings;
pub mod slots;
pub mod source;
pub mod state;
pub mod tensor;
pub mod text;
pub mod transport;
pub mod wire;

pub use abi::{LoadError, LoadedLibrary};
pub use adapt::{AdaptError, AdaptInput, AdaptOutcome, DeviceAdapter};
pub use anchor::{AnchorError, AnchorReasoner, AnchorSummary, FeatureStats, Quantisation, QuantisedTensor};
pub use backend::{BackendError, BackendProvider, DeviceDescriptor};
pub use config::{ConfigError, ConfigErrors, Deployment};
pub use data::{Clip, DeviceId, DomainSpec, Shift, Split, TaskSpec, provenance_id};
pub use generator::{GeneratorError, GeneratorTraining, ParameterGenerator};
pub use model::{
    Activations, CloudModel, DeviceModel, EntropyMinimisation, FeatureAlignment, FineTunable, FineTuner, LinearHead,
    LinearQaHead, ModelError, ObjectiveGradient, RetrievalEmbeddings, Served, SlotGradient, SlotValues,
    StatisticsRecalibration, TrainingPlan, TuneScope,
};
pub use node::{BatchPolicy, CloudNode, DeviceNode, Outcome, Refusal};
pub use registry::{
    Build, BuildContext, Factory, GeneratorContext, ModelContext, Plugin, PluginError, PluginKind, Registry,
    StaticPlugin,
};
pub use settings::{Check, NoSettings, Settings, SettingsError, SettingsOracle, SettingsSpec, parse_settings};
pub use slots::{DType, GeneratedParams, ParamsError, SchemaHash, SlotSchema, SlotSpec, ValidatedParams};
pub use source::{DataError, DataSource};
pub use tensor::{HostTensor, RankMismatch};
pub use text::{TextEncoder, TextError, TextSource};
pub use transport::{
    CloudEndpoint, DeviceLink, InProcess, Merged, Metered, Peer, Request, Traffic, Transport, TransportError,
};

/// Re-exported for `inventory::submit!` in plugin crates.
pub use inventory;

/// Re-exported: factories take settings as a `toml::Table` of this exact version (a plugin crate
/// with another `toml` would not compile against them).
pub use toml;

/// Receives progress of long phases (training, the fleet). The binary draws progress bars;
/// libraries and tests pass [`NoProgress`].
pub trait Progress: Sync {
    /// A phase of `total` steps begins.
    fn start(&self, phase: &str, total: u64);
    /// One step done, with an optional short status (a loss, a device name).
    fn step(&self, status: Option<String>);
    /// The phase ended.
    fn finish(&self);
}

/// Discards progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn start(&self, _phase: &str, _total: u64) {}
    fn step(&self, _status: Option<String>) {}
    fn finish(&self) {}
}

/// What a training phase did: its loss per step and how long it took.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TrainingLog {
    /// Phase name.
    pub phase: String,
    /// Loss after each step.
    pub losses: Vec<f64>,
    /// Named loss components averaged over the last 10% of steps (e.g. `task`, `kl`).
    pub final_terms: Vec<(String, f64)>,
    /// Each named loss component at every step.
    #[serde(default)]
    pub term_curves: Vec<(String, Vec<f64>)>,
    /// Wall time in seconds.
    pub seconds: f64,
}

impl TrainingLog {
    /// Mean loss over the first `n` steps.
    pub fn head_mean(&self, n: usize) -> f64 {
        mean(self.losses.iter().take(n.max(1)).copied())
    }

    /// Mean loss over the last `n` steps.
    pub fn tail_mean(&self, n: usize) -> f64 {
        mean(self.losses.iter().rev().take(n.max(1)).copied())
    }
}

/// Whether a training loss has diverged: it is NaN or infinite, or it has grown to a thousand
/// times its first value (`first`) — cross-entropy and KL terms do not recover from that, and a
/// model trained on through it serves garbage with finite numbers.
pub fn loss_diverged(first: f64, loss: f64) -> bool {
    !loss.is_finite() || (first.is_finite() && loss > 1e3 * first.abs().max(1.0))
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 { f64::NAN } else { sum / n as f64 }
}

fn build_in_process(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn Transport>, PluginError> {
    let settings: InProcessSettings = parse_settings(settings)?;
    Ok(Box::new(match settings.max_message_bytes {
        Some(limit) => InProcess::with_limit(limit),
        None => InProcess::new(),
    }))
}

/// Settings of the `in-process` transport.
#[derive(Debug, Default, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InProcessSettings {
    /// Refuse messages larger than this, like a broker's payload limit.
    pub max_message_bytes: Option<usize>,
}

impl Settings for InProcessSettings {
    fn check(&self, check: &mut Check) {
        if let Some(limit) = self.max_message_bytes {
            check.within("max_message_bytes", limit, 64..=crate::wire::MAX_PAYLOAD);
        }
    }
}

pub(crate) const fn in_process_factory() -> Factory<dyn Transport, BuildContext> {
    Factory {
        name: "in-process",
        summary: "in-memory queues for simulation; encodes, counts and decodes every byte",
        settings: SettingsSpec::of::<InProcessSettings>(),
        build: Build::Static(build_in_process),
    }
}

inventory::submit! { StaticPlugin(Plugin::Transport(in_process_factory())) }
