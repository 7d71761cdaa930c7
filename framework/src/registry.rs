//! The plugin registry. Every plugin is a named factory of one kind that takes its own TOML
//! settings. Factories arrive through `inventory` (statically linked plugin crates) or through
//! [`Registry::register`] (anything else, e.g. libraries loaded at run time).

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;

use serde::Serialize;

use crate::abi::LoadedLibrary;
use crate::adapt::DeviceAdapter;
use crate::anchor::AnchorReasoner;
use crate::backend::{BackendError, BackendProvider, DeviceDescriptor};
use crate::data::TaskSpec;
use crate::generator::ParameterGenerator;
use crate::model::CloudModel;
pub use crate::settings::{SettingsError, SettingsSpec, parse_settings};
use crate::slots::{GeneratedParams, SlotSchema};
use crate::source::{DataError, DataSource};
use crate::text::TextEncoder;
use crate::transport::Transport;

/// The kinds of plugin a deployment composes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum PluginKind {
    /// Compute backend.
    Backend,
    /// Data source.
    DataSource,
    /// Device model (LMM).
    Model,
    /// Device-side anchor reasoner.
    AnchorReasoner,
    /// Cloud-side parameter generator.
    Generator,
    /// Device ↔ cloud transport.
    Transport,
    /// Device-side adaptation method other than the cloud's (a baseline).
    Adapter,
    /// Frozen sentence encoder.
    TextEncoder,
}

impl fmt::Display for PluginKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PluginKind::Backend => "backend",
            PluginKind::DataSource => "data source",
            PluginKind::Model => "model",
            PluginKind::AnchorReasoner => "anchor reasoner",
            PluginKind::Generator => "generator",
            PluginKind::Transport => "transport",
            PluginKind::Adapter => "adapter",
            PluginKind::TextEncoder => "text encoder",
        })
    }
}

/// Why a plugin could not be built.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PluginError {
    /// Settings do not deserialise.
    #[error(transparent)]
    Settings(#[from] SettingsError),
    /// The backend device is unusable.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// The data source refused.
    #[error(transparent)]
    Data(#[from] DataError),
    /// Anything else the factory reports.
    #[error("{0}")]
    Build(String),
}

/// What every factory receives besides its settings.
#[derive(Debug, Clone)]
pub struct BuildContext {
    /// Deployment seed, already derived for this plugin.
    pub seed: u64,
    /// Device the plugin computes on (an autodiff device for cloud-side training), as plain
    /// data: the plugin builds its own backend's device from it.
    pub device: DeviceDescriptor,
}

/// What a model factory receives.
#[derive(Debug, Clone)]
pub struct ModelContext {
    /// Seed and device.
    pub base: BuildContext,
    /// The task the data source produces.
    pub task: TaskSpec,
    /// The deployment's text encoder (`[text]`), for models that embed text with it.
    pub text: Option<std::sync::Arc<crate::text::TextSource>>,
}

/// What a generator factory receives: the layout it must produce and the base values θ0.
#[derive(Debug, Clone)]
pub struct GeneratorContext {
    /// Seed and device.
    pub base: BuildContext,
    /// Slots to generate.
    pub schema: SlotSchema,
    /// Base values θ0 of the trained cloud model.
    pub base_params: GeneratedParams,
    /// Dimension of summary features.
    pub feature_dim: usize,
    /// Dimension of text-side anchors, when the model embeds questions.
    pub text_dim: Option<usize>,
}

/// A factory function: settings table and context in, a plugin out.
pub type BuildFn<T, C> = fn(&toml::Table, &C) -> Result<Box<T>, PluginError>;

/// A factory that carries state (a loaded library's handle).
pub type DynamicBuild<T, C> = Arc<dyn Fn(&toml::Table, &C) -> Result<Box<T>, PluginError> + Send + Sync>;

/// How a factory builds: a function linked into this binary, or a call into a loaded library.
pub enum Build<T: ?Sized, C> {
    /// A statically linked plugin's function.
    Static(BuildFn<T, C>),
    /// A loaded plugin library's factory, behind the C ABI (see [`crate::abi`]).
    Dynamic(DynamicBuild<T, C>),
}

impl<T: ?Sized, C> fmt::Debug for Build<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(if matches!(self, Build::Static(_)) { "Build::Static" } else { "Build::Dynamic" })
    }
}

impl<T: ?Sized, C> Clone for Build<T, C> {
    fn clone(&self) -> Self {
        match self {
            Build::Static(f) => Build::Static(*f),
            Build::Dynamic(f) => Build::Dynamic(f.clone()),
        }
    }
}

/// A named factory of plugins of type `T`, built with context `C`.
pub struct Factory<T: ?Sized, C> {
    /// Name used in TOML.
    pub name: &'static str,
    /// One line on what it is.
    pub summary: &'static str,
    /// Its settings.
    pub settings: SettingsSpec,
    /// How it builds one from validated-on-the-way settings.
    pub build: Build<T, C>,
}

impl<T: ?Sized, C> Factory<T, C> {
    /// Builds one plugin from its settings table.
    ///
    /// # Errors
    /// Whatever the factory refuses: settings, backend, data, or a loaded library's failure.
    pub fn build(&self, settings: &toml::Table, ctx: &C) -> Result<Box<T>, PluginError> {
        match &self.build {
            Build::Static(f) => f(settings, ctx),
            Build::Dynamic(f) => f(settings, ctx),
        }
    }
}

impl<T: ?Sized, C> Clone for Factory<T, C> {
    fn clone(&self) -> Self {
        Self { name: self.name, summary: self.summary, settings: self.settings.clone(), build: self.build.clone() }
    }
}

impl<T: ?Sized, C> fmt::Debug for Factory<T, C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Factory").field("name", &self.name).field("build", &self.build).finish_non_exhaustive()
    }
}

/// One registered plugin.
#[derive(Clone)]
pub enum Plugin {
    /// A backend provider.
    Backend(&'static dyn BackendProvider),
    /// A data source.
    DataSource(Factory<dyn DataSource, BuildContext>),
    /// A model.
    Model(Factory<dyn CloudModel, ModelContext>),
    /// An anchor reasoner.
    AnchorReasoner(Factory<dyn AnchorReasoner, BuildContext>),
    /// A parameter generator.
    Generator(Factory<dyn ParameterGenerator, GeneratorContext>),
    /// A transport.
    Transport(Factory<dyn Transport, BuildContext>),
    /// A device-side adaptation method.
    Adapter(Factory<dyn DeviceAdapter, BuildContext>),
    /// A frozen sentence encoder.
    TextEncoder(Factory<dyn TextEncoder, BuildContext>),
}

impl fmt::Debug for Plugin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} `{}`", self.kind(), self.name())
    }
}

impl Plugin {
    /// Its kind.
    pub fn kind(&self) -> PluginKind {
        match self {
            Plugin::Backend(_) => PluginKind::Backend,
            Plugin::DataSource(_) => PluginKind::DataSource,
            Plugin::Model(_) => PluginKind::Model,
            Plugin::AnchorReasoner(_) => PluginKind::AnchorReasoner,
            Plugin::Generator(_) => PluginKind::Generator,
            Plugin::Transport(_) => PluginKind::Transport,
            Plugin::Adapter(_) => PluginKind::Adapter,
            Plugin::TextEncoder(_) => PluginKind::TextEncoder,
        }
    }

    /// Its name.
    pub fn name(&self) -> &'static str {
        match self {
            Plugin::Backend(p) => p.kind(),
            Plugin::DataSource(f) => f.name,
            Plugin::Model(f) => f.name,
            Plugin::AnchorReasoner(f) => f.name,
            Plugin::Generator(f) => f.name,
            Plugin::Transport(f) => f.name,
            Plugin::Adapter(f) => f.name,
            Plugin::TextEncoder(f) => f.name,
        }
    }

    /// One line on what it is.
    pub fn summary(&self) -> &'static str {
        match self {
            Plugin::Backend(p) => p.summary(),
            Plugin::DataSource(f) => f.summary,
            Plugin::Model(f) => f.summary,
            Plugin::AnchorReasoner(f) => f.summary,
            Plugin::Generator(f) => f.summary,
            Plugin::Transport(f) => f.summary,
            Plugin::Adapter(f) => f.summary,
            Plugin::TextEncoder(f) => f.summary,
        }
    }

    /// Its settings, if it takes any.
    pub fn settings(&self) -> Option<SettingsSpec> {
        match self {
            Plugin::Backend(_) => None,
            Plugin::DataSource(f) => Some(f.settings.clone()),
            Plugin::Model(f) => Some(f.settings.clone()),
            Plugin::AnchorReasoner(f) => Some(f.settings.clone()),
            Plugin::Generator(f) => Some(f.settings.clone()),
            Plugin::Transport(f) => Some(f.settings.clone()),
            Plugin::Adapter(f) => Some(f.settings.clone()),
            Plugin::TextEncoder(f) => Some(f.settings.clone()),
        }
    }
}

/// A plugin submitted at link time with `inventory::submit!`. A plugin crate the binary never
/// names is not linked, so binaries write `use plugin_crate as _;` for each plugin crate.
#[derive(Debug)]
pub struct StaticPlugin(pub Plugin);

inventory::collect!(StaticPlugin);

/// Why a registry lookup or registration failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RegistryError {
    /// Two plugins of one kind share a name.
    #[error("{kind} `{name}` is registered twice: {existing}, and {incoming}")]
    Duplicate {
        /// Kind.
        kind: PluginKind,
        /// Name.
        name: String,
        /// Where the registered one came from (`built in`, `from <path>`).
        existing: String,
        /// Where the second came from.
        incoming: String,
    },
    /// No plugin of that kind has that name.
    #[error(
        "no {kind} plugin named `{name}`; registered: {available} (a plugin from a library needs its [[plugins]] entry or --plugin)"
    )]
    NotFound {
        /// Kind.
        kind: PluginKind,
        /// Requested name.
        name: String,
        /// Registered names of that kind.
        available: String,
    },
}

/// All plugins known to a process, by kind and name.
#[derive(Debug, Default, Clone)]
pub struct Registry {
    plugins: BTreeMap<(PluginKind, &'static str), Plugin>,
    /// Plugins that came from a loaded library; the others are built in.
    origins: BTreeMap<(PluginKind, &'static str), Arc<LoadedLibrary>>,
}

fn origin_text(library: Option<&LoadedLibrary>) -> String {
    library.map_or_else(|| "built in".to_string(), |l| format!("from {}", l.path.display()))
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Self {
        Self::default()
    }

    /// A registry holding every plugin linked into this binary.
    pub fn with_static_plugins() -> Result<Self, RegistryError> {
        let mut registry = Self::new();
        for entry in inventory::iter::<StaticPlugin> {
            registry.register(entry.0.clone())?;
        }
        Ok(registry)
    }

    /// Adds a built-in plugin; a second plugin of the same kind and name is an error.
    pub fn register(&mut self, plugin: Plugin) -> Result<(), RegistryError> {
        self.check_free(&plugin, None)?;
        self.plugins.insert((plugin.kind(), plugin.name()), plugin);
        Ok(())
    }

    fn check_free(&self, plugin: &Plugin, incoming: Option<&LoadedLibrary>) -> Result<(), RegistryError> {
        let key = (plugin.kind(), plugin.name());
        if self.plugins.contains_key(&key) {
            return Err(RegistryError::Duplicate {
                kind: key.0,
                name: key.1.into(),
                existing: origin_text(self.origin(key.0, key.1)),
                incoming: origin_text(incoming),
            });
        }
        Ok(())
    }

    /// Adds the plugins of a loaded library: all of them, or none if one clashes.
    pub(crate) fn register_library(
        &mut self,
        plugins: Vec<Plugin>,
        library: Arc<LoadedLibrary>,
    ) -> Result<(), RegistryError> {
        let mut names = std::collections::BTreeSet::new();
        for plugin in &plugins {
            self.check_free(plugin, Some(&library))?;
            if !names.insert((plugin.kind(), plugin.name())) {
                return Err(RegistryError::Duplicate {
                    kind: plugin.kind(),
                    name: plugin.name().into(),
                    existing: origin_text(Some(&library)),
                    incoming: "again from the same library".into(),
                });
            }
        }
        for plugin in plugins {
            let key = (plugin.kind(), plugin.name());
            self.origins.insert(key, library.clone());
            self.plugins.insert(key, plugin);
        }
        Ok(())
    }

    /// The libraries loaded into this registry, each once.
    pub fn libraries(&self) -> impl Iterator<Item = &LoadedLibrary> {
        let mut seen = std::collections::BTreeSet::new();
        self.origins.values().filter(move |l| seen.insert(l.path.clone())).map(|l| l.as_ref())
    }

    /// Records that a deployment pinned an already loaded library (by the path it was loaded from).
    pub(crate) fn mark_pinned(&mut self, path: &std::path::Path) {
        for library in self.origins.values_mut().filter(|l| l.path == path) {
            Arc::make_mut(library).pinned = true;
        }
    }

    /// The library a plugin came from; `None` for a built-in plugin (or an unknown one).
    pub fn origin(&self, kind: PluginKind, name: &str) -> Option<&LoadedLibrary> {
        self.origins.iter().find(|((k, n), _)| *k == kind && *n == name).map(|(_, l)| l.as_ref())
    }

    /// Removes a plugin, e.g. to load another build of it from a library.
    pub fn remove(&mut self, kind: PluginKind, name: &str) -> Option<Plugin> {
        let key = *self.plugins.keys().find(|(k, n)| *k == kind && *n == name)?;
        self.origins.remove(&key);
        self.plugins.remove(&key)
    }

    /// Every plugin, ordered by kind then name.
    pub fn plugins(&self) -> impl Iterator<Item = &Plugin> {
        self.plugins.values()
    }

    /// Looks a plugin up.
    pub fn get(&self, kind: PluginKind, name: &str) -> Result<&Plugin, RegistryError> {
        self.plugins.iter().find(|((k, n), _)| *k == kind && *n == name).map(|(_, p)| p).ok_or_else(|| {
            let available: Vec<&str> = self.plugins.keys().filter(|(k, _)| *k == kind).map(|(_, n)| *n).collect();
            RegistryError::NotFound {
                kind,
                name: name.into(),
                available: if available.is_empty() { "none".into() } else { available.join(", ") },
            }
        })
    }

    /// The backend provider of a kind.
    pub fn backend(&self, name: &str) -> Result<&'static dyn BackendProvider, RegistryError> {
        match self.get(PluginKind::Backend, name)? {
            Plugin::Backend(p) => Ok(*p),
            _ => unreachable!("registry keys plugins by their own kind"),
        }
    }
}

macro_rules! typed_lookup {
    ($fn:ident, $variant:ident, $ty:ty) => {
        impl Registry {
            #[doc = concat!("The factory of the `", stringify!($variant), "` plugin of this name.")]
            pub fn $fn(&self, name: &str) -> Result<&$ty, RegistryError> {
                match self.get(PluginKind::$variant, name)? {
                    Plugin::$variant(f) => Ok(f),
                    _ => unreachable!("registry keys plugins by their own kind"),
                }
            }
        }
    };
}

typed_lookup!(data_source, DataSource, Factory<dyn DataSource, BuildContext>);
typed_lookup!(model, Model, Factory<dyn CloudModel, ModelContext>);
typed_lookup!(anchor_reasoner, AnchorReasoner, Factory<dyn AnchorReasoner, BuildContext>);
typed_lookup!(generator, Generator, Factory<dyn ParameterGenerator, GeneratorContext>);
typed_lookup!(transport, Transport, Factory<dyn Transport, BuildContext>);
typed_lookup!(adapter, Adapter, Factory<dyn DeviceAdapter, BuildContext>);
typed_lookup!(text_encoder, TextEncoder, Factory<dyn TextEncoder, BuildContext>);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_plugins_list_what_is_available() {
        let mut registry = Registry::new();
        registry.register(Plugin::Transport(crate::in_process_factory())).expect("first");
        let err = registry.register(Plugin::Transport(crate::in_process_factory())).expect_err("dup");
        assert!(matches!(err, RegistryError::Duplicate { .. }));
        let err = registry.transport("mqtt").expect_err("absent");
        assert_eq!(
            err.to_string(),
            "no transport plugin named `mqtt`; registered: in-process (a plugin from a library needs its [[plugins]] entry or --plugin)"
        );
    }
}
