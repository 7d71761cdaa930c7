//! A plugin library that misbehaves on purpose, so `tests/plugins.rs` can check each refusal.
//! `MMPG_FIXTURE` (read when the host loads it; one behaviour per process) chooses:
//! - unset: two anchor reasoners, `fixture-panics` (its factory panics) and `fixture-select-panics`
//!   (builds, then panics in `select`);
//! - `abi`: a descriptor of another plugin ABI (only its first field, as any ABI guarantees);
//! - `duplicate`: two plugins of one kind and name;
//! - `entry-panics`: its plugin list panics while the entry point builds it;
//! - `cuda-only`: the default plugins, declared as compiled for the `cuda` backend only;
//! - `data-source`: a data source, a kind this plugin ABI does not carry.

use mmpg::abi::ffi::RawLibrary;
use mmpg::registry::BuildFn;
use mmpg::{
    AnchorError, AnchorReasoner, Build, BuildContext, Clip, DataError, DataSource, DomainSpec, Factory, HostTensor,
    NoSettings, Plugin, PluginError, Quantisation, SettingsSpec, Split, TaskSpec,
};

struct SelectPanics;

impl AnchorReasoner for SelectPanics {
    fn select(&self, _standardised: &HostTensor, _seed: u64) -> Result<Vec<usize>, AnchorError> {
        panic!("fixture: select always panics")
    }

    fn quantisation(&self) -> Quantisation {
        Quantisation::F32
    }
}

fn build_panics(_: &toml::Table, _: &BuildContext) -> Result<Box<dyn AnchorReasoner>, PluginError> {
    panic!("fixture: this factory always panics")
}

fn build_select_panics(_: &toml::Table, _: &BuildContext) -> Result<Box<dyn AnchorReasoner>, PluginError> {
    Ok(Box::new(SelectPanics))
}

const fn reasoner(
    name: &'static str,
    build: BuildFn<dyn AnchorReasoner, BuildContext>,
) -> Factory<dyn AnchorReasoner, BuildContext> {
    Factory {
        name,
        summary: "misbehaves on purpose (tests/plugin-fixture)",
        settings: SettingsSpec::of::<NoSettings>(),
        build: Build::Static(build),
    }
}

/// A data source with no clips: only its kind matters here.
struct Empty(TaskSpec);

impl DataSource for Empty {
    fn task(&self) -> &TaskSpec {
        &self.0
    }

    fn shift_kinds(&self) -> &[&'static str] {
        &[]
    }

    fn clips(&self, _: &DomainSpec, _: Split, _: usize, _: u64) -> Result<Vec<Clip>, DataError> {
        Ok(Vec::new())
    }
}

fn build_empty(_: &toml::Table, _: &BuildContext) -> Result<Box<dyn DataSource>, PluginError> {
    Ok(Box::new(Empty(TaskSpec { answers: Vec::new(), frames_per_clip: 1, frame_shape: [1, 1, 1] })))
}

fn plugins() -> Vec<Plugin> {
    // Its panics are expected: keep them out of the test log (this hook is the library's own std).
    std::panic::set_hook(Box::new(|_| {}));
    match std::env::var("MMPG_FIXTURE").as_deref() {
        Ok("duplicate") => vec![
            Plugin::AnchorReasoner(reasoner("twin", build_select_panics)),
            Plugin::AnchorReasoner(reasoner("twin", build_select_panics)),
        ],
        Ok("entry-panics") => panic!("fixture: the plugin list panics"),
        Ok("data-source") => vec![Plugin::DataSource(Factory {
            name: "empty",
            summary: "no clips (tests/plugin-fixture)",
            settings: SettingsSpec::of::<NoSettings>(),
            build: Build::Static(build_empty),
        })],
        _ => vec![
            Plugin::AnchorReasoner(reasoner("fixture-panics", build_panics)),
            Plugin::AnchorReasoner(reasoner("fixture-select-panics", build_select_panics)),
        ],
    }
}

/// What a library of another ABI looks like to this host: a first field it can read.
#[repr(C)]
struct ForeignDescriptor {
    abi: u32,
}

static FOREIGN: ForeignDescriptor = ForeignDescriptor { abi: mmpg::abi::ABI_VERSION + 1 };

/// The entry point, by hand rather than through `export_plugins!`, to misbehave.
#[allow(unsafe_code)]
#[unsafe(no_mangle)]
pub extern "C" fn mmpg_plugin_library() -> *const RawLibrary {
    match std::env::var("MMPG_FIXTURE").as_deref() {
        Ok("abi") => (&raw const FOREIGN).cast::<RawLibrary>(),
        Ok("cuda-only") => mmpg::abi::export(&["cuda"], plugins),
        _ => mmpg::abi::export(&[], plugins),
    }
}
