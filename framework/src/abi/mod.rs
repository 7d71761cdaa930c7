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
//! What this ABI carries: anchor reasoners, models (with the device models and fine-tuners they
//! make) and parameter generators; during a call, the host lends what the call borrows (the data
//! source, progress, the model a generator trains through) and gives what a plugin keeps (the
//! text encoder). Other kinds are refused at load time with a message saying so.

pub mod ffi;
mod generator;
mod host;
mod library;
mod loader;
mod model;
mod proxy;
mod reasoner;
pub mod serve;

pub(crate) use loader::parse_pin as loader_pin;
pub use loader::{LoadError, LoadedLibrary, sha256_hex};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::registry::Plugin;

/// The plugin ABI this mmpg speaks. Bumped whenever anything that crosses the boundary
/// changes: the descriptor, a method number, or the encoding of any argument or result.
pub const ABI_VERSION: u32 = 4;

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
    /// A lent object was used after the call that lent it returned.
    pub const REVOKED: u32 = 6;

    /// A failed call's status and text, in words.
    pub fn describe(status: u32, bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        match status {
            PANIC => format!("panicked: {text}"),
            UNKNOWN_METHOD => format!("does not implement the method called ({text}): was it built for another ABI?"),
            BAD_INPUT => format!("could not decode its input: {text}"),
            BAD_OUTPUT => format!("could not encode its result: {text}"),
            REVOKED => format!("used an object after its loan ended: {text}"),
            other => format!("answered unknown status {other}"),
        }
    }
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
        Box::new(library::Library::new(plugins()))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::HostTensor;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn tensors_cross_unchanged(shape in prop::collection::vec(0usize..5, 0..4), seed in any::<u32>()) {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n).map(|i| (i as f32 * 0.37 + seed as f32).sin()).collect();
            let tensor = HostTensor::new(shape, values).expect("fits");
            let bytes = encode(&tensor).expect("encodes");
            prop_assert_eq!(decode::<HostTensor>(&bytes).expect("decodes"), tensor);
        }

        #[test]
        fn no_bytes_decode_into_a_tensor_whose_shape_and_values_disagree(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            if let Ok(tensor) = decode::<HostTensor>(&bytes) {
                prop_assert_eq!(tensor.shape().iter().product::<usize>(), tensor.len());
            }
        }
    }

    #[test]
    fn the_target_names_arch_os_and_env() {
        let target = target();
        assert_eq!(target.split('-').count(), 3, "{target}");
        assert!(target.starts_with(std::env::consts::ARCH));
    }
}
