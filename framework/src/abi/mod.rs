//! Plugins in libraries built on their own, loaded at run time.
//!
//! A plugin library is a `cdylib` that calls [`export_plugins!`](crate::export_plugins) once.
//! That exports one `extern "C"` entry point, `mmpg_plugin_library`, returning a `#[repr(C)]`
//! descriptor: the plugin ABI number ([`ABI_VERSION`]), the mmpg version, the target, the
//! backends compiled in, and a root object through which the host lists the library's
//! factories, checks their settings and builds plugins. Across the boundary travel only
//! `#[repr(C)]` data and `extern "C"` function tables ([`ffi`]); a call's arguments and results
//! are plain data (tensors as shape + values, TOML text, typed errors) encoded with `postcard`.
//! Panics never cross: the library catches them and the host reports them as errors.
//! Libraries are never unloaded.
//!
//! The host side is [`Registry::load_library`](crate::Registry::load_library) (sha256 pin
//! checked before the library is opened, every descriptor field checked against the host) and
//! `[[plugins]]` in a deployment (see [`crate::config`]).
//!
//! What this ABI carries: anchor reasoners. Other kinds are refused at load time with a
//! message saying so.

pub mod ffi;
mod loader;
mod proxy;
pub mod serve;

pub(crate) use loader::parse_pin as loader_pin;
pub use loader::{LoadError, LoadedLibrary, sha256_hex};

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::backend::DeviceDescriptor;
use crate::registry::{Plugin, PluginKind};

/// The plugin ABI this mmpg speaks. Bumped whenever anything that crosses the boundary
/// changes: the descriptor, a method number, or the encoding of any argument or result.
pub const ABI_VERSION: u32 = 1;

/// The mmpg version a library or host was built against.
pub const MMPG_VERSION: &str = env!("CARGO_PKG_VERSION");

/// The target this code was compiled for, as `arch-os-env` (e.g. `x86_64-linux-gnu`): a
/// library built for another cannot be loaded.
pub fn target() -> String {
    let env = if cfg!(target_env = "gnu") {
        "gnu"
    } else if cfg!(target_env = "musl") {
        "musl"
    } else if cfg!(target_env = "msvc") {
        "msvc"
    } else {
        "none"
    };
    format!("{}-{}-{env}", std::env::consts::ARCH, std::env::consts::OS)
}

/// Status codes of a call.
pub(crate) mod status {
    /// The answer is the encoded result.
    pub const OK: u32 = 0;
    /// The answer is the method's encoded typed error.
    pub const ERROR: u32 = 1;
    /// The plugin panicked; the answer is the panic message.
    pub const PANIC: u32 = 2;
    /// No such method; the answer says which.
    pub const UNKNOWN_METHOD: u32 = 3;
    /// The input did not decode; the answer says why.
    pub const BAD_INPUT: u32 = 4;
    /// The result did not encode; the answer says why.
    pub const BAD_OUTPUT: u32 = 5;

    /// A failed call's status and text, in words.
    pub fn describe(status: u32, bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        match status {
            PANIC => format!("panicked: {text}"),
            UNKNOWN_METHOD => format!("does not implement the method called ({text}): was it built for another ABI?"),
            BAD_INPUT => format!("could not decode its input: {text}"),
            BAD_OUTPUT => format!("could not encode its result: {text}"),
            other => format!("answered unknown status {other}"),
        }
    }
}

/// Method numbers. The root object's and each plugin kind's are separate spaces.
pub(crate) mod method {
    /// Root: the factories, `Vec<FactoryInfo>`.
    pub const LIST: u32 = 1;
    /// Root: `SettingsRequest` → `Result<(), Vec<SettingsError>>`.
    pub const CHECK: u32 = 2;
    /// Root: `SettingsRequest` → `Option<u64>`.
    pub const CLIP_BYTES: u32 = 3;
    /// Root: `BuildRequest` → a new object.
    pub const BUILD: u32 = 4;

    /// Anchor reasoner: `(HostTensor, u64)` → `Vec<usize>`.
    pub const SELECT: u32 = 1;
    /// Anchor reasoner: `()` → `Quantisation`.
    pub const QUANTISATION: u32 = 2;
    /// Anchor reasoner: `(HostTensor, FeatureStats, usize, u64)` → `AnchorSummary`.
    pub const SUMMARISE: u32 = 3;
    /// Anchor reasoner: `()` → `usize`.
    pub const TEXT_ANCHOR_COUNT: u32 = 4;
    /// Anchor reasoner: `(HostTensor, u64)` → `Option<QuantisedTensor>`.
    pub const SUMMARISE_TEXT: u32 = 5;
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
pub(crate) struct SettingsRequest {
    kind: PluginKind,
    name: String,
    settings: String,
}

/// Build one of a library's plugins.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct BuildRequest {
    kind: PluginKind,
    name: String,
    settings: String,
    seed: u64,
    device: DeviceDescriptor,
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Result<Vec<u8>, String> {
    postcard::to_stdvec(value).map_err(|e| e.to_string())
}

fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| e.to_string())
}

/// The body of a library's entry point; [`export_plugins!`](crate::export_plugins) calls it.
/// `backends` lists the backends the library's plugins were compiled with (empty when they
/// compute on the host only).
pub fn export(backends: &[&str], plugins: fn() -> Vec<Plugin>) -> *const ffi::RawLibrary {
    ffi::export(ABI_VERSION, MMPG_VERSION.into(), target(), backends.join(","), || {
        Box::new(serve::Library::new(plugins()))
    })
}

/// Exports a library's plugins through the C ABI: defines the `mmpg_plugin_library` entry
/// point. Call it once, in a crate built as a `cdylib`:
///
/// ```ignore
/// mmpg::export_plugins!(Plugin::AnchorReasoner(HERDING));
/// // computing with Burn: name the backends compiled in, so a deployment on another is refused.
/// mmpg::export_plugins!(backends = ["cpu", "wgpu"]; Plugin::AnchorReasoner(GPU_REASONER));
/// ```
///
/// A crate that is also linked statically into a binary next to other plugin crates must not
/// call it (two entry points would collide at link time): give it a small `cdylib` crate of
/// its own that calls the macro, as `plugins/adr/cdylib` does.
#[macro_export]
macro_rules! export_plugins {
    (backends = $backends:expr; $($plugin:expr),+ $(,)?) => {
        /// The plugin library's entry point (see `mmpg::abi`).
        #[allow(unsafe_code)]
        #[unsafe(no_mangle)]
        pub extern "C" fn mmpg_plugin_library() -> *const $crate::abi::ffi::RawLibrary {
            fn plugins() -> ::std::vec::Vec<$crate::Plugin> {
                ::std::vec![$($plugin),+]
            }
            $crate::abi::export(&$backends, plugins)
        }
    };
    ($($plugin:expr),+ $(,)?) => {
        $crate::export_plugins!(backends = [] as [&str; 0]; $($plugin),+);
    };
}
