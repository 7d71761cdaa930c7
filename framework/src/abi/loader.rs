//! Loading a plugin library into a [`Registry`]: pin check, descriptor checks, registration.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::ffi::{self, OpenFailure};
use super::library::{self, LibraryLink};
use super::{ABI_VERSION, MMPG_VERSION, target};
use crate::registry::{PluginKind, Registry, RegistryError};

/// A library loaded into a registry, and what its descriptor said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedLibrary {
    /// The file, as given.
    pub path: PathBuf,
    /// sha256 of the file, lowercase hex.
    pub sha256: String,
    /// Whether the deployment pinned that hash.
    pub pinned: bool,
    /// mmpg version the library was built against.
    pub mmpg_version: String,
    /// Target it was built for.
    pub target: String,
    /// Backends compiled into it; empty when its plugins compute on the host only.
    pub backends: Vec<String>,
    /// Its plugins.
    pub plugins: Vec<(PluginKind, String)>,
}

impl LoadedLibrary {
    /// Whether its plugins can compute on `backend` (the deployment's `backend.kind`).
    pub fn supports_backend(&self, backend: &str) -> bool {
        self.backends.is_empty() || self.backends.iter().any(|b| b == backend)
    }
}

/// Why a plugin library was refused. Each message says what differs and what to do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LoadError {
    /// No file at the path.
    #[error("plugin library {path} does not exist: build the plugin crate (cargo build --release) or fix the path")]
    Missing {
        /// The path.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("plugin library {path} cannot be read: {message}")]
    Read {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        message: String,
    },
    /// A pin that is not a sha256.
    #[error("`{pin}` is not a sha256: expected 64 hexadecimal characters")]
    BadPin {
        /// The pin as written.
        pin: String,
    },
    /// The file's hash is not the pinned one; it was not opened.
    #[error(
        "plugin library {path} has sha256 {actual}, but the deployment pins {pinned}: the file changed since it was pinned. \
         If you rebuilt it on purpose, pin the new hash; otherwise restore the pinned build"
    )]
    HashMismatch {
        /// The path.
        path: PathBuf,
        /// The pinned hash.
        pinned: String,
        /// The file's hash.
        actual: String,
    },
    /// The dynamic loader refused the file.
    #[error("{path} cannot be loaded as a library: {message}")]
    Open {
        /// The path.
        path: PathBuf,
        /// The loader's message.
        message: String,
    },
    /// A library without the entry point.
    #[error(
        "{path} is not an mmpg plugin library: it exports no `{symbol}` entry point (a plugin crate is built as a cdylib and calls mmpg::export_plugins!)"
    )]
    NotAPlugin {
        /// The path.
        path: PathBuf,
        /// The missing symbol.
        symbol: &'static str,
    },
    /// The entry point failed (it panicked while listing its plugins).
    #[error("{path}: its entry point failed while building its plugin list (it panicked)")]
    EntryFailed {
        /// The path.
        path: PathBuf,
    },
    /// Another plugin ABI.
    #[error(
        "{path} was built for plugin ABI {found}, this mmpg speaks ABI {expected}: rebuild it against mmpg {version}"
    )]
    Abi {
        /// The path.
        path: PathBuf,
        /// The library's ABI.
        found: u32,
        /// This host's.
        expected: u32,
        /// This host's mmpg version.
        version: &'static str,
    },
    /// Another target.
    #[error("{path} was built for {found}, this mmpg runs on {expected}: rebuild it for {expected}")]
    Target {
        /// The path.
        path: PathBuf,
        /// The library's target.
        found: String,
        /// This host's.
        expected: String,
    },
    /// The library answered its listing with an error, or exports a kind this ABI cannot load.
    #[error("{path}: {message}")]
    Plugins {
        /// The path.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// One of its plugins has the name of one already registered (the message names both).
    #[error("{source}")]
    Duplicate {
        /// The path.
        path: PathBuf,
        /// The clash.
        source: RegistryError,
    },
}

/// sha256 of bytes as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// A pin as written, normalised to lowercase, if it is 64 hex digits.
pub(crate) fn parse_pin(pin: &str) -> Option<String> {
    (pin.len() == 64 && pin.bytes().all(|b| b.is_ascii_hexdigit())).then(|| pin.to_ascii_lowercase())
}

impl Registry {
    /// Loads a plugin library and registers its plugins.
    ///
    /// With `pin`, the file's sha256 must equal it, checked *before* the library is opened
    /// (opening runs its initialisers). Then its descriptor must speak this ABI and target.
    /// Either all of its plugins register, or none.
    ///
    /// # Errors
    /// [`LoadError`], each variant saying what differs and how to fix it.
    pub fn load_library(&mut self, path: &Path, pin: Option<&str>) -> Result<LoadedLibrary, LoadError> {
        let path_buf = path.to_path_buf();
        let pinned = pin.map(|p| parse_pin(p).ok_or_else(|| LoadError::BadPin { pin: p.into() })).transpose()?;
        // A FIFO or device would block or never end: only regular files (through symlinks) load.
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_file()
        {
            let message = "not a regular file (a library is a file built by cargo)".to_string();
            return Err(LoadError::Read { path: path_buf, message });
        }
        let bytes = std::fs::read(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing { path: path_buf.clone() },
            _ => LoadError::Read { path: path_buf.clone(), message: e.to_string() },
        })?;
        let sha256 = sha256_hex(&bytes);
        drop(bytes);
        if let Some(pinned) = &pinned
            && *pinned != sha256
        {
            return Err(LoadError::HashMismatch { path: path_buf, pinned: pinned.clone(), actual: sha256 });
        }
        // dlopen resolves a bare file name through the library search path, not the current
        // folder: name the file we hashed.
        let absolute = std::path::absolute(path).unwrap_or_else(|_| path_buf.clone());
        let opened = ffi::open(&absolute, ABI_VERSION).map_err(|failure| match failure {
            OpenFailure::Dlopen(message) => LoadError::Open { path: path_buf.clone(), message },
            OpenFailure::NoEntry => LoadError::NotAPlugin { path: path_buf.clone(), symbol: ffi::ENTRY_SYMBOL },
            OpenFailure::EntryFailed => LoadError::EntryFailed { path: path_buf.clone() },
        })?;
        let Some(fields) = opened.fields else {
            return Err(LoadError::Abi {
                path: path_buf,
                found: opened.abi,
                expected: ABI_VERSION,
                version: MMPG_VERSION,
            });
        };
        if fields.target != target() {
            return Err(LoadError::Target { path: path_buf, found: fields.target, expected: target() });
        }
        let link = Arc::new(LibraryLink::new(fields.root, path_buf.clone()));
        let plugins_error = |message| LoadError::Plugins { path: path_buf.clone(), message };
        let infos = link.list().map_err(plugins_error)?;
        let plugins = infos
            .into_iter()
            .map(|info| library::plugin(&link, info))
            .collect::<Result<Vec<_>, _>>()
            .map_err(plugins_error)?;
        let library = LoadedLibrary {
            path: path_buf.clone(),
            sha256,
            pinned: pinned.is_some(),
            mmpg_version: fields.mmpg_version,
            target: fields.target,
            backends: fields.backends.split(',').filter(|b| !b.is_empty()).map(String::from).collect(),
            plugins: plugins.iter().map(|p| (p.kind(), p.name().to_string())).collect(),
        };
        self.register_library(plugins, Arc::new(library.clone()))
            .map_err(|source| LoadError::Duplicate { path: path_buf, source })?;
        Ok(library)
    }
}
