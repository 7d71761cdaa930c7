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

/// Whether two paths name one file.
fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

/// On ELF systems, refuses a file that is not ELF from its first bytes, before reading it all.
fn check_magic(file: &mut std::fs::File) -> Result<(), String> {
    use std::io::{Read as _, Seek as _};
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let mut magic = [0u8; 4];
    let read = file.read(&mut magic).map_err(|e| e.to_string())?;
    file.rewind().map_err(|e| e.to_string())?;
    if read < 4 || magic != *b"\x7fELF" {
        return Err("not an ELF shared library (it does not start with the ELF magic bytes)".into());
    }
    Ok(())
}

/// sha256 of the whole file, read in blocks (a library is never held in memory whole).
fn hash_file(file: &mut std::fs::File) -> std::io::Result<String> {
    use sha2::{Digest, Sha256};
    use std::io::Read as _;
    let mut hasher = Sha256::new();
    let mut block = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut block)? {
            0 => break,
            n => hasher.update(&block[..n]),
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// What is wrong with a library's layout.
enum Layout {
    /// Built for another architecture (its name).
    Architecture(String),
    /// Not an object file, or truncated.
    Broken(String),
}

/// The host's architecture as `object` names it, where we know it.
fn host_architecture() -> Option<object::Architecture> {
    match std::env::consts::ARCH {
        "x86_64" => Some(object::Architecture::X86_64),
        "aarch64" => Some(object::Architecture::Aarch64),
        "x86" => Some(object::Architecture::I386),
        "riscv64" => Some(object::Architecture::Riscv64),
        _ => None,
    }
}

/// Parses the object file's headers (with `object`, reading only what it needs): its
/// architecture must be the host's, and every segment the loader maps must lie inside the
/// file — mapping past the end of a truncated file kills the process with SIGBUS.
fn check_layout(file: &std::fs::File, len: u64) -> Result<(), Layout> {
    use object::{Object as _, ObjectSegment as _};
    if !cfg!(target_os = "linux") {
        return Ok(());
    }
    let cache = object::read::ReadCache::new(file);
    let parsed = object::File::parse(&cache).map_err(|e| {
        Layout::Broken(format!("not a valid ELF file ({e}): truncated or corrupted? Build or copy it again"))
    })?;
    if let Some(host) = host_architecture()
        && parsed.architecture() != host
    {
        return Err(Layout::Architecture(format!("{:?}", parsed.architecture()).to_lowercase()));
    }
    for segment in parsed.segments() {
        let (offset, size) = segment.file_range();
        let end = offset.checked_add(size);
        if end.is_none_or(|end| end > len) {
            return Err(Layout::Broken(format!(
                "truncated: a segment needs bytes {offset}..{} of a {len}-byte file (an interrupted build or copy?); build or copy it again",
                end.map_or_else(|| "∞".to_string(), |e| e.to_string())
            )));
        }
    }
    Ok(())
}

/// A path naming the already-open `file` itself (Linux: `/proc/self/fd/N`), when there is one.
fn opened_path(file: &std::fs::File) -> Option<PathBuf> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd as _;
        let path = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        path.exists().then_some(path)
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = file;
        None
    }
}

impl Registry {
    /// The library loaded from this file, by whatever path it was named then.
    pub fn library_at(&self, path: &Path) -> Option<&LoadedLibrary> {
        self.libraries().find(|l| same_file(&l.path, path))
    }

    /// Loads a plugin library and registers its plugins.
    ///
    /// With `pin`, the file's sha256 must equal it, checked *before* the library is opened
    /// (opening runs its initialisers); on Linux the library is then opened through the same
    /// file descriptor, so the bytes checked are the bytes loaded. Then its descriptor must speak this ABI and target.
    /// Either all of its plugins register, or none.
    ///
    /// # Errors
    /// [`LoadError`], each variant saying what differs and how to fix it.
    pub fn load_library(&mut self, path: &Path, pin: Option<&str>) -> Result<LoadedLibrary, LoadError> {
        let path_buf = path.to_path_buf();
        let pinned = pin.map(|p| parse_pin(p).ok_or_else(|| LoadError::BadPin { pin: p.into() })).transpose()?;
        // The same file again (by this path or another): loading is idempotent, and a pin
        // still has to match what was loaded.
        let already = self.library_at(path).cloned();
        if let Some(loaded) = already {
            if let Some(pinned) = &pinned
                && *pinned != loaded.sha256
            {
                return Err(LoadError::HashMismatch {
                    path: path_buf,
                    pinned: pinned.clone(),
                    actual: loaded.sha256.clone(),
                });
            }
            if pinned.is_some() {
                self.mark_pinned(&loaded.path);
            }
            return Ok(LoadedLibrary { pinned: loaded.pinned || pinned.is_some(), ..loaded });
        }
        // A FIFO or device would block or never end: only regular files (through symlinks) load.
        if let Ok(meta) = std::fs::metadata(path)
            && !meta.is_file()
        {
            let message = "not a regular file (a library is a file built by cargo)".to_string();
            return Err(LoadError::Read { path: path_buf, message });
        }
        let read_error = |e: std::io::Error| match e.kind() {
            std::io::ErrorKind::NotFound => LoadError::Missing { path: path_buf.clone() },
            _ => LoadError::Read { path: path_buf.clone(), message: e.to_string() },
        };
        // Hash, check and open the same file: through the descriptor we read, where the system
        // can name it, so a file swapped in after the check is not what gets loaded.
        let mut file = std::fs::File::open(path).map_err(read_error)?;
        let len = file.metadata().map_err(read_error)?.len();
        let open_error = |message: String| LoadError::Open { path: path_buf.clone(), message };
        check_magic(&mut file).map_err(open_error)?;
        let sha256 = hash_file(&mut file).map_err(read_error)?;
        if let Some(pinned) = &pinned
            && *pinned != sha256
        {
            return Err(LoadError::HashMismatch { path: path_buf, pinned: pinned.clone(), actual: sha256 });
        }
        check_layout(&file, len).map_err(|failure| match failure {
            Layout::Architecture(found) => LoadError::Target { path: path_buf.clone(), found, expected: target() },
            Layout::Broken(message) => open_error(message),
        })?;
        let absolute = opened_path(&file)
            // dlopen resolves a bare file name through the library search path, not the
            // current folder: name the file we hashed.
            .unwrap_or_else(|| std::path::absolute(path).unwrap_or_else(|_| path_buf.clone()));
        let opened = ffi::open(&absolute, ABI_VERSION).map_err(|failure| match failure {
            OpenFailure::Dlopen(message) => LoadError::Open {
                path: path_buf.clone(),
                // The loader names what it opened (maybe `/proc/self/fd/N`): name the user's file.
                message: message.replace(&absolute.display().to_string(), &path_buf.display().to_string()),
            },
            OpenFailure::NoEntry => LoadError::NotAPlugin { path: path_buf.clone(), symbol: ffi::ENTRY_SYMBOL },
            OpenFailure::EntryFailed => LoadError::EntryFailed { path: path_buf.clone() },
        });
        // Loaded for good (unless dlopen refused it), and known to the system loader by the
        // descriptor's name: keep the descriptor open, so no later library gets that name and,
        // with it, this library's handle.
        if !matches!(opened, Err(LoadError::Open { .. })) {
            std::mem::forget(file);
        }
        let opened = opened?;
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
