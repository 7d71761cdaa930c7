//! The plugin side of the boundary: a library's plugins served to the host. Each plugin object
//! becomes a [`Serve`] that decodes a method's input, calls the ordinary Rust trait, and
//! encodes its result — so a plugin author writes normal Rust and calls
//! [`crate::export_plugins`].

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::{BuildRequest, FactoryInfo, SettingsRequest, decode, encode, method, status};
use crate::anchor::AnchorReasoner;
use crate::registry::{BuildContext, Plugin, PluginKind};
use crate::tensor::HostTensor;
use crate::{FeatureStats, SettingsError};

/// An object served across the boundary: one method call at a time per caller, any number of
/// callers at once (hence `Sync`).
pub trait Serve: Send + Sync {
    /// Answers one call.
    fn serve(&self, method: u32, input: &[u8]) -> Outcome;
}

/// What a call answers.
pub struct Outcome {
    status: u32,
    bytes: Vec<u8>,
    object: Option<Box<dyn Serve>>,
}

impl std::fmt::Debug for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outcome").field("status", &self.status).field("bytes", &self.bytes.len()).finish()
    }
}

impl Outcome {
    /// A result: `Ok` encodes the value, `Err` the method's typed error.
    fn of<T: Serialize, E: Serialize>(result: Result<T, E>) -> Self {
        let (status, bytes) = match result {
            Ok(value) => (status::OK, encode(&value)),
            Err(error) => (status::ERROR, encode(&error)),
        };
        match bytes {
            Ok(bytes) => Self { status, bytes, object: None },
            Err(message) => Self::failure(status::BAD_OUTPUT, message),
        }
    }

    /// A new object.
    fn object(object: Box<dyn Serve>) -> Self {
        Self { status: status::OK, bytes: Vec::new(), object: Some(object) }
    }

    fn failure(status: u32, message: String) -> Self {
        Self { status, bytes: message.into_bytes(), object: None }
    }

    /// A panic caught at the boundary.
    pub(super) fn panicked(payload: &(dyn std::any::Any + Send)) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "a panic with a non-text payload".into());
        Self::failure(status::PANIC, message)
    }

    pub(super) fn into_parts(self) -> (u32, Vec<u8>, Option<Box<dyn Serve>>) {
        (self.status, self.bytes, self.object)
    }
}

/// Decodes a method's input and answers with `f`'s result.
fn with<I: DeserializeOwned, T: Serialize, E: Serialize>(input: &[u8], f: impl FnOnce(I) -> Result<T, E>) -> Outcome {
    match decode::<I>(input) {
        Ok(input) => Outcome::of(f(input)),
        Err(message) => Outcome::failure(status::BAD_INPUT, message),
    }
}

fn unknown(method: u32) -> Outcome {
    Outcome::failure(status::UNKNOWN_METHOD, format!("no method {method}"))
}

/// The library itself: lists its factories, checks settings, builds plugins.
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

    fn settings(&self, request: &SettingsRequest) -> Result<(crate::SettingsSpec, toml::Table), String> {
        let plugin = self.find(request.kind, &request.name)?;
        let spec = plugin.settings().ok_or_else(|| format!("{} `{}` takes no settings", request.kind, request.name))?;
        let table: toml::Table = toml::from_str(&request.settings).map_err(|e| format!("settings TOML: {e}"))?;
        Ok((spec, table))
    }

    fn build(&self, request: BuildRequest) -> Outcome {
        let plugin = match self.find(request.kind, &request.name) {
            Ok(p) => p,
            Err(message) => return Outcome::of::<(), String>(Err(message)),
        };
        let table: toml::Table = match toml::from_str(&request.settings) {
            Ok(t) => t,
            Err(e) => return Outcome::of::<(), String>(Err(format!("settings TOML: {e}"))),
        };
        let ctx = BuildContext { seed: request.seed, device: request.device };
        match plugin {
            Plugin::AnchorReasoner(factory) => match factory.build(&table, &ctx) {
                Ok(reasoner) => Outcome::object(Box::new(ServedReasoner(reasoner))),
                Err(e) => Outcome::of::<(), String>(Err(e.to_string())),
            },
            other => Outcome::of::<(), String>(Err(format!("{} plugins cannot be served by this ABI", other.kind()))),
        }
    }
}

impl Serve for Library {
    fn serve(&self, method: u32, input: &[u8]) -> Outcome {
        match method {
            method::LIST => Outcome::of::<_, String>(Ok(self
                .plugins
                .iter()
                .map(|p| FactoryInfo {
                    kind: p.kind(),
                    name: p.name().into(),
                    summary: p.summary().into(),
                    defaults: p.settings().map(|s| s.defaults().to_string()).unwrap_or_default(),
                })
                .collect::<Vec<_>>())),
            method::CHECK => with(input, |r: SettingsRequest| {
                let (spec, table) = self.settings(&r)?;
                Ok::<Result<(), Vec<SettingsError>>, String>(spec.check(&table))
            }),
            method::CLIP_BYTES => with(input, |r: SettingsRequest| {
                let (spec, table) = self.settings(&r)?;
                Ok::<_, String>(spec.clip_bytes(&table))
            }),
            method::BUILD => match decode::<BuildRequest>(input) {
                Ok(request) => self.build(request),
                Err(message) => Outcome::failure(status::BAD_INPUT, message),
            },
            other => unknown(other),
        }
    }
}

/// An anchor reasoner, served.
struct ServedReasoner(Box<dyn AnchorReasoner>);

impl Serve for ServedReasoner {
    fn serve(&self, method: u32, input: &[u8]) -> Outcome {
        let r = &self.0;
        match method {
            method::SELECT => with(input, |(features, seed): (HostTensor, u64)| r.select(&features, seed)),
            method::QUANTISATION => Outcome::of::<_, String>(Ok(r.quantisation())),
            method::SUMMARISE => {
                with(input, |(features, reference, clips, seed): (HostTensor, FeatureStats, usize, u64)| {
                    r.summarise(&features, &reference, clips, seed)
                })
            }
            method::TEXT_ANCHOR_COUNT => Outcome::of::<_, String>(Ok(r.text_anchor_count())),
            method::SUMMARISE_TEXT => {
                with(input, |(features, seed): (HostTensor, u64)| r.summarise_text(&features, seed))
            }
            other => unknown(other),
        }
    }
}
