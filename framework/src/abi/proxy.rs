//! The host side of the boundary: a loaded library's plugins as ordinary factories and trait
//! objects. Each proxy encodes a call's arguments, calls through [`Remote`] and decodes the
//! answer; failures of the boundary itself (a panic, undecodable bytes) become the trait's
//! error type, naming the plugin and its library.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::ffi::Remote;
use super::{BuildRequest, FactoryInfo, SettingsRequest, decode, encode, method, status};
use crate::anchor::{AnchorError, AnchorReasoner, AnchorSummary, FeatureStats, Quantisation, QuantisedTensor};
use crate::registry::{Build, BuildContext, Factory, Plugin, PluginError, PluginKind};
use crate::settings::{SettingsError, SettingsOracle, SettingsSpec};
use crate::tensor::HostTensor;

/// Why a call failed: the method's own error, or the boundary's.
pub(super) enum Failure<E> {
    /// The plugin returned its typed error.
    Typed(E),
    /// The call did not complete as a call: a panic, bytes that do not decode, an unknown method.
    Boundary(String),
}

/// Calls `method` with `input`, decoding an answer of type `T` or an error of type `E`.
pub(super) fn call<I: Serialize + ?Sized, T: DeserializeOwned, E: DeserializeOwned>(
    remote: &Remote,
    method: u32,
    input: &I,
) -> Result<T, Failure<E>> {
    let answer = remote.call(method, &encode(input).map_err(Failure::Boundary)?);
    match answer.status {
        status::OK => decode(&answer.bytes).map_err(Failure::Boundary),
        status::ERROR => Err(decode(&answer.bytes).map_or_else(Failure::Boundary, Failure::Typed)),
        other => Err(Failure::Boundary(status::describe(other, &answer.bytes))),
    }
}

/// A loaded library's root object and where it came from.
pub(super) struct LibraryLink {
    pub(super) root: Remote,
    pub(super) path: PathBuf,
}

impl LibraryLink {
    fn label(&self, kind: PluginKind, name: &str) -> String {
        format!("{kind} `{name}` from {}", self.path.display())
    }

    /// The library's factories.
    pub(super) fn list(&self) -> Result<Vec<FactoryInfo>, String> {
        call::<_, _, String>(&self.root, method::LIST, &()).map_err(|f| match f {
            Failure::Typed(m) | Failure::Boundary(m) => m,
        })
    }
}

/// Settings of a loaded plugin, answered by its library.
struct LibrarySettings {
    link: Arc<LibraryLink>,
    kind: PluginKind,
    name: String,
    defaults: toml::Table,
}

impl LibrarySettings {
    fn request(&self, table: &toml::Table) -> SettingsRequest {
        SettingsRequest { kind: self.kind, name: self.name.clone(), settings: table.to_string() }
    }
}

impl SettingsOracle for LibrarySettings {
    fn defaults(&self) -> toml::Table {
        self.defaults.clone()
    }

    fn check(&self, table: &toml::Table) -> Result<(), Vec<SettingsError>> {
        match call::<_, Result<(), Vec<SettingsError>>, String>(&self.link.root, method::CHECK, &self.request(table)) {
            Ok(result) => result,
            Err(Failure::Typed(message) | Failure::Boundary(message)) => Err(vec![SettingsError {
                path: String::new(),
                message: format!("{} could not check its settings: {message}", self.link.label(self.kind, &self.name)),
            }]),
        }
    }

    fn clip_bytes(&self, table: &toml::Table) -> Option<u64> {
        call::<_, Option<u64>, String>(&self.link.root, method::CLIP_BYTES, &self.request(table)).ok().flatten()
    }
}

/// The registry entry of one factory a library exports.
pub(super) fn plugin(link: &Arc<LibraryLink>, info: FactoryInfo) -> Result<Plugin, String> {
    let defaults: toml::Table = toml::from_str(&info.defaults)
        .map_err(|e| format!("{} sent default settings that are not TOML: {e}", link.label(info.kind, &info.name)))?;
    let name: &'static str = Box::leak(info.name.clone().into_boxed_str());
    let summary: &'static str = Box::leak(info.summary.into_boxed_str());
    let settings = SettingsSpec::dynamic(Arc::new(LibrarySettings {
        link: link.clone(),
        kind: info.kind,
        name: info.name.clone(),
        defaults,
    }));
    match info.kind {
        PluginKind::AnchorReasoner => {
            let link = link.clone();
            let build =
                move |table: &toml::Table, ctx: &BuildContext| -> Result<Box<dyn AnchorReasoner>, PluginError> {
                    let label = link.label(PluginKind::AnchorReasoner, name);
                    let remote = build_remote(&link, PluginKind::AnchorReasoner, name, table, ctx)
                        .map_err(|m| PluginError::Build(format!("{label}: {m}")))?;
                    Ok(Box::new(LoadedReasoner::new(remote, label).map_err(PluginError::Build)?))
                };
            Ok(Plugin::AnchorReasoner(Factory { name, summary, settings, build: Build::Dynamic(Arc::new(build)) }))
        }
        other => Err(format!(
            "{} cannot be loaded: this mmpg (plugin ABI {}) loads anchor reasoners from libraries; link a {other} plugin statically",
            link.label(other, name),
            super::ABI_VERSION
        )),
    }
}

fn build_remote(
    link: &LibraryLink,
    kind: PluginKind,
    name: &str,
    table: &toml::Table,
    ctx: &BuildContext,
) -> Result<Remote, String> {
    let request = BuildRequest {
        kind,
        name: name.into(),
        settings: table.to_string(),
        seed: ctx.seed,
        device: ctx.device.clone(),
    };
    let input = encode(&request)?;
    let answer = link.root.call(method::BUILD, &input);
    match (answer.status, answer.object) {
        (status::OK, Some(object)) => Ok(object),
        (status::OK, None) => Err("its factory answered without an object".into()),
        (status::ERROR, _) => Err(decode::<String>(&answer.bytes).unwrap_or_else(|m| m)),
        (other, _) => Err(status::describe(other, &answer.bytes)),
    }
}

/// An anchor reasoner living in a library.
struct LoadedReasoner {
    remote: Remote,
    label: String,
    quantisation: Quantisation,
    text_anchors: usize,
}

impl LoadedReasoner {
    fn new(remote: Remote, label: String) -> Result<Self, String> {
        let quantisation = call::<_, Quantisation, String>(&remote, method::QUANTISATION, &())
            .map_err(|f| Self::describe(&label, f))?;
        let text_anchors =
            call::<_, usize, String>(&remote, method::TEXT_ANCHOR_COUNT, &()).map_err(|f| Self::describe(&label, f))?;
        Ok(Self { remote, label, quantisation, text_anchors })
    }

    fn describe(label: &str, failure: Failure<String>) -> String {
        match failure {
            Failure::Typed(m) | Failure::Boundary(m) => format!("{label}: {m}"),
        }
    }

    fn call<I: Serialize + ?Sized, T: DeserializeOwned>(&self, method: u32, input: &I) -> Result<T, AnchorError> {
        call::<_, T, AnchorError>(&self.remote, method, input).map_err(|f| match f {
            Failure::Typed(e) => e,
            Failure::Boundary(m) => AnchorError::Plugin(format!("{}: {m}", self.label)),
        })
    }
}

impl AnchorReasoner for LoadedReasoner {
    fn select(&self, standardised: &HostTensor, seed: u64) -> Result<Vec<usize>, AnchorError> {
        self.call(method::SELECT, &(standardised, seed))
    }

    fn quantisation(&self) -> Quantisation {
        self.quantisation
    }

    fn summarise(
        &self,
        features: &HostTensor,
        reference: &FeatureStats,
        clips: usize,
        seed: u64,
    ) -> Result<AnchorSummary, AnchorError> {
        self.call(method::SUMMARISE, &(features, reference, clips, seed))
    }

    fn text_anchor_count(&self) -> usize {
        self.text_anchors
    }

    fn summarise_text(&self, text_features: &HostTensor, seed: u64) -> Result<Option<QuantisedTensor>, AnchorError> {
        self.call(method::SUMMARISE_TEXT, &(text_features, seed))
    }
}
