//! A plugin library's root object: on the library's side it lists the factories, checks their
//! settings and builds plugins; on the host's side each factory becomes an ordinary registry
//! [`Factory`] whose plugins are proxies.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::ffi::{self, Remote};
use super::generator::{OwnedGenerator, RemoteGenerator};
use super::host::{OwnedText, RemoteText};
use super::model::{OwnedCloud, RemoteCloud};
use super::proxy::Proxy;
use super::reasoner::{Owned as OwnedReasoner, RemoteReasoner};
use super::serve::{Outcome, Serve, with};
use crate::backend::DeviceDescriptor;
use crate::data::TaskSpec;
use crate::registry::{Build, BuildContext, Factory, GeneratorContext, ModelContext, Plugin, PluginError, PluginKind};
use crate::settings::{SettingsError, SettingsOracle, SettingsSpec};
use crate::slots::{GeneratedParams, SlotSchema};

/// Root methods.
mod method {
    /// `()` → `Vec<FactoryInfo>`.
    pub const LIST: u32 = 1;
    /// `SettingsRequest` → `Result<(), Vec<SettingsError>>`.
    pub const CHECK: u32 = 2;
    /// `SettingsRequest` → `Option<u64>`.
    pub const CLIP_BYTES: u32 = 3;
    /// `BuildRequest`, args `[text encoder]` for a model of a deployment with `[text]` → a new
    /// plugin object.
    pub const BUILD: u32 = 4;
}

/// One factory a library exports.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct FactoryInfo {
    kind: PluginKind,
    name: String,
    summary: String,
    /// Default settings as TOML text.
    defaults: String,
}

/// Settings of one of a library's plugins, as TOML text.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct SettingsRequest {
    kind: PluginKind,
    name: String,
    settings: String,
}

/// What a factory's context holds besides seed and device, by kind.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Extra {
    /// Anchor reasoners (and any plugin built with a plain `BuildContext`).
    None,
    /// Models: the task, and whether a text encoder comes as the call's argument.
    Model { task: TaskSpec, text: bool },
    /// Generators: the layout to produce and its base values.
    Generator { schema: SlotSchema, base_params: GeneratedParams, feature_dim: usize, text_dim: Option<usize> },
}

/// Build one of a library's plugins.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct BuildRequest {
    kind: PluginKind,
    name: String,
    settings: String,
    seed: u64,
    device: DeviceDescriptor,
    extra: Extra,
}

/// The library itself, as it serves the host.
pub(super) struct Library {
    plugins: Vec<Plugin>,
}

impl Library {
    pub(super) fn new(plugins: Vec<Plugin>) -> Self {
        Self { plugins }
    }

    fn find(&self, kind: PluginKind, name: &str) -> Result<&Plugin, String> {
        self.plugins
            .iter()
            .find(|p| p.kind() == kind && p.name() == name)
            .ok_or_else(|| format!("this library has no {kind} plugin named `{name}`"))
    }

    fn settings(&self, request: &SettingsRequest) -> Result<(SettingsSpec, toml::Table), String> {
        let plugin = self.find(request.kind, &request.name)?;
        let spec = plugin.settings().ok_or_else(|| format!("{} `{}` takes no settings", request.kind, request.name))?;
        let table: toml::Table = toml::from_str(&request.settings).map_err(|e| format!("settings TOML: {e}"))?;
        Ok((spec, table))
    }

    fn build(&self, request: BuildRequest, args: Vec<Remote>) -> Result<Box<dyn Serve>, String> {
        let plugin = self.find(request.kind, &request.name)?;
        let table: toml::Table = toml::from_str(&request.settings).map_err(|e| format!("settings TOML: {e}"))?;
        let base = BuildContext { seed: request.seed, device: request.device };
        let built: Result<Box<dyn Serve>, PluginError> = match (plugin, request.extra) {
            (Plugin::AnchorReasoner(f), _) => {
                f.build(&table, &base).map(|r| Box::new(OwnedReasoner(r)) as Box<dyn Serve>)
            }
            (Plugin::Model(f), Extra::Model { task, text }) => {
                let text = match (text, args.into_iter().next()) {
                    (true, Some(remote)) => Some(Arc::new(
                        RemoteText::source(Proxy::new(remote, "the host's text encoder")).map_err(|e| e.to_string())?,
                    )),
                    (true, None) => return Err("the text encoder was announced but not passed".into()),
                    (false, _) => None,
                };
                let ctx = ModelContext { base, task, text };
                f.build(&table, &ctx).map(|m| Box::new(OwnedCloud(Mutex::new(m))) as Box<dyn Serve>)
            }
            (Plugin::Generator(f), Extra::Generator { schema, base_params, feature_dim, text_dim }) => {
                let ctx = GeneratorContext { base, schema, base_params, feature_dim, text_dim };
                f.build(&table, &ctx).map(|g| Box::new(OwnedGenerator(Mutex::new(g))) as Box<dyn Serve>)
            }
            (other, _) => return Err(format!("{} plugins cannot cross this ABI", other.kind())),
        };
        built.map_err(|e| e.to_string())
    }
}

impl Serve for Library {
    fn serve(&self, method: u32, input: &[u8], args: Vec<Remote>) -> Outcome {
        match method {
            method::LIST => Outcome::value(
                self.plugins
                    .iter()
                    .map(|p| FactoryInfo {
                        kind: p.kind(),
                        name: p.name().into(),
                        summary: p.summary().into(),
                        defaults: p.settings().map(|s| s.defaults().to_string()).unwrap_or_default(),
                    })
                    .collect::<Vec<_>>(),
            ),
            method::CHECK => with(input, |r: SettingsRequest| {
                let (spec, table) = self.settings(&r)?;
                Ok::<Result<(), Vec<SettingsError>>, String>(spec.check(&table))
            }),
            method::CLIP_BYTES => with(input, |r: SettingsRequest| {
                let (spec, table) = self.settings(&r)?;
                Ok::<_, String>(spec.clip_bytes(&table))
            }),
            method::BUILD => match super::decode::<BuildRequest>(input) {
                Ok(request) => Outcome::object(self.build(request, args)),
                Err(message) => {
                    Outcome::of::<(), String>(Err(format!("could not decode the build request: {message}")))
                }
            },
            other => Outcome::unknown(other),
        }
    }
}

// ------------------------------------------------------------------------------------------
// Host side.

/// A loaded library's root object and where it came from.
pub(super) struct LibraryLink {
    pub(super) root: Proxy,
    pub(super) path: PathBuf,
}

impl LibraryLink {
    pub(super) fn new(root: Remote, path: PathBuf) -> Self {
        Self { root: Proxy::new(root, path.display().to_string()), path }
    }

    fn label(&self, kind: PluginKind, name: &str) -> String {
        format!("{kind} `{name}` from {}", self.path.display())
    }

    /// The library's factories.
    pub(super) fn list(&self) -> Result<Vec<FactoryInfo>, String> {
        self.root.call(method::LIST, &())
    }

    fn build(
        &self,
        kind: PluginKind,
        name: &str,
        table: &toml::Table,
        base: &BuildContext,
        extra: Extra,
        args: Vec<ffi::RawObject>,
    ) -> Result<Proxy, PluginError> {
        let request = BuildRequest {
            kind,
            name: name.into(),
            settings: table.to_string(),
            seed: base.seed,
            device: base.device.clone(),
            extra,
        };
        // The root's errors already name the library; the caller names the plugin.
        let remote = self.root.call_object::<_, String>(method::BUILD, &request, args).map_err(PluginError::Build)?;
        Ok(Proxy::new(remote, self.label(kind, name)))
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
        match self.link.root.call::<_, Result<(), Vec<SettingsError>>, String>(method::CHECK, &self.request(table)) {
            Ok(result) => result,
            Err(message) => Err(vec![SettingsError {
                path: String::new(),
                message: format!("{} could not check its settings: {message}", self.link.label(self.kind, &self.name)),
            }]),
        }
    }

    fn clip_bytes(&self, table: &toml::Table) -> Option<u64> {
        self.link.root.call::<_, Option<u64>, String>(method::CLIP_BYTES, &self.request(table)).ok().flatten()
    }
}

fn build_error(e: impl std::fmt::Display) -> PluginError {
    PluginError::Build(e.to_string())
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
        name: info.name,
        defaults,
    }));
    let link = link.clone();
    match info.kind {
        PluginKind::AnchorReasoner => {
            let build = Build::Dynamic(Arc::new(move |table: &toml::Table, ctx: &BuildContext| {
                let proxy = link.build(PluginKind::AnchorReasoner, name, table, ctx, Extra::None, Vec::new())?;
                let reasoner = RemoteReasoner::new(proxy).map_err(build_error)?;
                Ok(Box::new(reasoner) as Box<dyn crate::AnchorReasoner>)
            }));
            Ok(Plugin::AnchorReasoner(Factory { name, summary, settings, build }))
        }
        PluginKind::Model => {
            let build = Build::Dynamic(Arc::new(move |table: &toml::Table, ctx: &ModelContext| {
                let extra = Extra::Model { task: ctx.task.clone(), text: ctx.text.is_some() };
                let args: Vec<ffi::RawObject> =
                    ctx.text.iter().map(|t| ffi::object_from(Box::new(OwnedText(t.clone())))).collect();
                let proxy = link.build(PluginKind::Model, name, table, &ctx.base, extra, args)?;
                let model = RemoteCloud::new(proxy).map_err(build_error)?;
                Ok(Box::new(model) as Box<dyn crate::CloudModel>)
            }));
            Ok(Plugin::Model(Factory { name, summary, settings, build }))
        }
        PluginKind::Generator => {
            let build = Build::Dynamic(Arc::new(move |table: &toml::Table, ctx: &GeneratorContext| {
                let extra = Extra::Generator {
                    schema: ctx.schema.clone(),
                    base_params: ctx.base_params.clone(),
                    feature_dim: ctx.feature_dim,
                    text_dim: ctx.text_dim,
                };
                let proxy = link.build(PluginKind::Generator, name, table, &ctx.base, extra, Vec::new())?;
                let generator = RemoteGenerator::new(proxy).map_err(build_error)?;
                Ok(Box::new(generator) as Box<dyn crate::ParameterGenerator>)
            }));
            Ok(Plugin::Generator(Factory { name, summary, settings, build }))
        }
        other => Err(format!(
            "{other} `{name}` cannot be loaded: plugin ABI {} carries anchor reasoners, models and generators; link a {other} plugin statically",
            super::ABI_VERSION
        )),
    }
}
