//! Reading files a peer or an operator's copy may have supplied — bundle files, manifests,
//! signatures, a device's saved state, kits, revocation lists, ledgers, checkpoints, clip files —
//! with limits known before the first byte is read.
//!
//! One mechanism for every such file, so that no reader forgets a check: the path is opened as a
//! regular file (a FIFO, a device such as `/dev/zero`, a socket or a folder is refused before it
//! is read, and opening never blocks on a FIFO); a symbolic link is refused unless the caller's
//! [`Links`] allows links that stay inside a folder; the size the open file reports is checked
//! against the caller's limit; and the read itself stops one byte past the limit, so a file that
//! grows while it is read is refused too, never allocated in full.

use std::io::Read as _;
use std::path::{Path, PathBuf};

/// Why an untrusted file was not read.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// No file at the path.
    #[error("{path}: no such file")]
    NotFound {
        /// The path.
        path: PathBuf,
    },
    /// The path is a FIFO, a device, a socket or a folder.
    #[error("{path}: not a regular file ({kind}); refused before reading")]
    NotRegular {
        /// The path.
        path: PathBuf,
        /// What it is instead.
        kind: &'static str,
    },
    /// A symbolic link where none is allowed, or one that leads out of its folder.
    #[error("{path}: a symbolic link {why}; refused")]
    Link {
        /// The path.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// Larger than the limit (bytes).
    #[error("{path}: {size} bytes or more, over this file's limit of {limit} bytes; refused before reading")]
    TooLarge {
        /// The path.
        path: PathBuf,
        /// Its size as far as known (at least `limit + 1`).
        size: u64,
        /// The limit.
        limit: u64,
    },
    /// Not UTF-8 where text is expected.
    #[error("{path}: not UTF-8 text")]
    NotText {
        /// The path.
        path: PathBuf,
    },
    /// Any other failure to open or read.
    #[error("{path}: {error}")]
    Io {
        /// The path.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
}

impl FileError {
    /// Whether the file is simply absent (callers for which absence means "none yet").
    pub fn is_not_found(&self) -> bool {
        matches!(self, FileError::NotFound { .. })
    }

    /// The path the error is about.
    pub fn path(&self) -> &Path {
        match self {
            FileError::NotFound { path }
            | FileError::NotRegular { path, .. }
            | FileError::Link { path, .. }
            | FileError::TooLarge { path, .. }
            | FileError::NotText { path }
            | FileError::Io { path, .. } => path,
        }
    }
}

/// Whether a symbolic link may stand for the file.
#[derive(Debug, Clone, Copy)]
pub enum Links<'a> {
    /// No link: the path itself must be a regular file (every format mmpg writes itself).
    Refuse,
    /// A link is followed when the file it resolves to lies inside this folder (after resolving
    /// every link on the way), e.g. a bundle whose files are links into a content store beside it.
    Within(&'a Path),
}

/// Writes `bytes` to `path` so that a crash leaves the old file or the new one, and nothing is
/// written through whatever stood at `path` or beside it: a fresh temporary file in the same
/// folder (created exclusively, never through a link), fsynced, renamed over `path` (which
/// replaces a link, FIFO or file there instead of following it), the folder fsynced.
///
/// # Errors
/// The I/O error.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write as _;
    let folder = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let mut nonce = [0u8; 8];
    getrandom::getrandom(&mut nonce).map_err(|e| std::io::Error::other(e.to_string()))?;
    let tmp = folder.join(format!(".{name}.{:016x}.tmp", u64::from_le_bytes(nonce)));
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW);
    let written = options.open(&tmp).and_then(|mut file| {
        file.write_all(bytes)?;
        file.sync_all()
    });
    if let Err(e) = written.and_then(|()| std::fs::rename(&tmp, path)) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    // The rename itself is durable once the folder is.
    std::fs::File::open(folder)?.sync_all()
}

/// Opens `path` for appending (created if absent): a regular file only, never through a link
/// and never blocking on a FIFO.
///
/// # Errors
/// [`FileError`] naming the path.
pub fn open_append(path: &Path) -> Result<std::fs::File, FileError> {
    // Said before opening: a FIFO without a reader would fail the open with a less telling error.
    if let Ok(meta) = std::fs::symlink_metadata(path)
        && !meta.is_file()
        && !meta.file_type().is_symlink()
    {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: kind(&meta) });
    }
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::custom_flags(&mut options, libc::O_NOFOLLOW | libc::O_NONBLOCK);
    let file = options.open(path).map_err(|error| match error.raw_os_error() {
        Some(40) => FileError::Link { path: path.to_path_buf(), why: "where a file belongs".into() },
        _ => FileError::Io { path: path.to_path_buf(), error },
    })?;
    let meta = file.metadata().map_err(|error| FileError::Io { path: path.to_path_buf(), error })?;
    if !meta.is_file() {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: kind(&meta) });
    }
    Ok(file)
}

/// Makes `dir` a real folder of its owner's: a link, file or FIFO standing there is removed
/// first (a state folder's content is the program's own), then the folder is created.
///
/// # Errors
/// The I/O error.
pub fn own_folder(dir: &Path) -> std::io::Result<()> {
    if let Ok(meta) = std::fs::symlink_metadata(dir)
        && !meta.is_dir()
    {
        std::fs::remove_file(dir)?;
    }
    std::fs::create_dir_all(dir)
}

/// Largest key, certificate, password or name list of a kit read, in bytes.
pub const MAX_KIT_FILE: u64 = 1 << 20;

/// A kit's text file (keys, certificates, passwords, names): a regular file, or a link within
/// its own folder (secret stores mount keys as links into a hidden folder beside them), at most
/// [`MAX_KIT_FILE`] bytes.
///
/// # Errors
/// As [`read_text`].
pub fn read_kit_text(path: &Path) -> Result<String, FileError> {
    let folder = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    read_text(path, MAX_KIT_FILE, Links::Within(folder))
}

/// Reads at most `limit` bytes of the regular file at `path`.
///
/// # Errors
/// [`FileError`] naming the path: absent, not a regular file, a link the policy refuses, larger
/// than `limit` (before reading, or when it grew while read), or an I/O error.
pub fn read(path: &Path, limit: u64, links: Links<'_>) -> Result<Vec<u8>, FileError> {
    let io = |error: std::io::Error| match error.kind() {
        std::io::ErrorKind::NotFound => FileError::NotFound { path: path.to_path_buf() },
        _ => FileError::Io { path: path.to_path_buf(), error },
    };
    let meta = std::fs::symlink_metadata(path).map_err(io)?;
    let target = if meta.file_type().is_symlink() {
        let Links::Within(folder) = links else {
            return Err(FileError::Link { path: path.to_path_buf(), why: "where a file belongs".into() });
        };
        let resolved = std::fs::canonicalize(path).map_err(io)?;
        let folder = std::fs::canonicalize(folder).map_err(io)?;
        if !resolved.starts_with(&folder) {
            return Err(FileError::Link {
                path: path.to_path_buf(),
                why: format!("to {}, outside {}", resolved.display(), folder.display()),
            });
        }
        resolved
    } else {
        path.to_path_buf()
    };
    let file = open_no_follow(&target).map_err(|error| match error.raw_os_error() {
        // ELOOP: the path was swapped for a link between the check and the open.
        Some(40) => FileError::Link { path: path.to_path_buf(), why: "(appeared while opening)".into() },
        _ => io(error),
    })?;
    // The open file's own metadata: what was checked is what is read.
    let meta = file.metadata().map_err(io)?;
    if !meta.is_file() {
        return Err(FileError::NotRegular { path: path.to_path_buf(), kind: kind(&meta) });
    }
    if meta.len() > limit {
        return Err(FileError::TooLarge { path: path.to_path_buf(), size: meta.len(), limit });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(limit.saturating_add(1)).read_to_end(&mut bytes).map_err(io)?;
    if bytes.len() as u64 > limit {
        return Err(FileError::TooLarge { path: path.to_path_buf(), size: bytes.len() as u64, limit });
    }
    Ok(bytes)
}

/// [`read`], as UTF-8 text.
///
/// # Errors
/// As [`read`], and [`FileError::NotText`].
pub fn read_text(path: &Path, limit: u64, links: Links<'_>) -> Result<String, FileError> {
    String::from_utf8(read(path, limit, links)?).map_err(|_| FileError::NotText { path: path.to_path_buf() })
}

/// [`read`] where an absent file is `None` (state not written yet).
///
/// # Errors
/// As [`read`], but for an absent file.
pub fn read_if_present(path: &Path, limit: u64, links: Links<'_>) -> Result<Option<Vec<u8>>, FileError> {
    match read(path, limit, links) {
        Ok(bytes) => Ok(Some(bytes)),
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => Err(e),
    }
}

#[cfg(unix)]
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    use std::os::unix::fs::OpenOptionsExt as _;
    // O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer, forever. It does
    // not change reads of a regular file. O_NOFOLLOW: a link swapped in after the check fails.
    std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(path)
}

#[cfg(not(unix))]
fn open_no_follow(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::File::open(path)
}

fn kind(meta: &std::fs::Metadata) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt as _;
        let t = meta.file_type();
        if t.is_fifo() {
            return "a FIFO";
        }
        if t.is_char_device() || t.is_block_device() {
            return "a device";
        }
        if t.is_socket() {
            return "a socket";
        }
    }
    if meta.is_dir() { "a folder" } else { "not a regular file" }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_link_to_dev_zero_is_refused_before_reading() {
        let dir = tempfile::tempdir().expect("temp dir");
        let link = dir.path().join("model.safetensors");
        std::os::unix::fs::symlink("/dev/zero", &link).expect("links");
        assert!(matches!(read(&link, 1 << 20, Links::Refuse), Err(FileError::Link { .. })));
        // Even where links are allowed, /dev/zero is outside the folder; and as a path, a device.
        assert!(matches!(read(&link, 1 << 20, Links::Within(dir.path())), Err(FileError::Link { .. })));
        assert!(matches!(
            read(Path::new("/dev/zero"), 1 << 20, Links::Refuse),
            Err(FileError::NotRegular { kind: "a device", .. })
        ));
    }

    #[test]
    fn fifos_and_folders_are_refused_without_blocking() {
        let dir = tempfile::tempdir().expect("temp dir");
        let fifo = dir.path().join("sequence");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        assert!(matches!(read(&fifo, 64, Links::Refuse), Err(FileError::NotRegular { kind: "a FIFO", .. })));
        assert!(matches!(read(dir.path(), 64, Links::Refuse), Err(FileError::NotRegular { kind: "a folder", .. })));
    }

    #[test]
    fn links_inside_their_folder_are_followed_only_when_allowed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let real = dir.path().join("store").join("blob");
        std::fs::create_dir_all(real.parent().expect("parent")).expect("mkdir");
        std::fs::write(&real, b"weights").expect("writes");
        let link = dir.path().join("model.safetensors");
        std::os::unix::fs::symlink(&real, &link).expect("links");
        assert_eq!(read(&link, 64, Links::Within(dir.path())).expect("reads"), b"weights");
        assert!(matches!(read(&link, 64, Links::Refuse), Err(FileError::Link { .. })));
        let outside = tempfile::tempdir().expect("temp dir");
        assert!(matches!(read(&link, 64, Links::Within(outside.path())), Err(FileError::Link { .. })));
    }

    /// Issue 28: writes into a device's state followed links out of the folder (a bundle file
    /// linked to another file was overwritten) and blocked on FIFOs.
    #[test]
    fn writes_replace_links_and_fifos_instead_of_following_them() {
        let dir = tempfile::tempdir().expect("temp dir");
        let victim = dir.path().join("victim");
        std::fs::write(&victim, b"keep").expect("writes");
        let state = dir.path().join("state");
        std::fs::create_dir(&state).expect("mkdir");
        let link = state.join("report.json");
        std::os::unix::fs::symlink(&victim, &link).expect("links");
        write_atomically(&link, b"new").expect("written");
        assert_eq!(std::fs::read(&victim).expect("reads"), b"keep");
        assert_eq!(read(&link, 16, Links::Refuse).expect("a regular file now"), b"new");
        let fifo = state.join("sequence");
        let made = std::process::Command::new("mkfifo").arg(&fifo).status().expect("mkfifo runs");
        assert!(made.success());
        write_atomically(&fifo, b"1").expect("written without blocking");
        assert_eq!(read(&fifo, 16, Links::Refuse).expect("reads"), b"1");
        let log = state.join("log.jsonl");
        std::os::unix::fs::symlink(&victim, &log).expect("links");
        assert!(matches!(open_append(&log), Err(FileError::Link { .. })));
        let made = std::process::Command::new("mkfifo").arg(state.join("fifo.log")).status().expect("mkfifo runs");
        assert!(made.success());
        assert!(matches!(open_append(&state.join("fifo.log")), Err(FileError::NotRegular { .. })));
        let bundle = state.join("bundle");
        std::os::unix::fs::symlink(dir.path(), &bundle).expect("links");
        own_folder(&bundle).expect("made its own");
        assert!(std::fs::symlink_metadata(&bundle).expect("exists").is_dir());
        assert_eq!(std::fs::read(&victim).expect("reads"), b"keep");
    }

    #[test]
    fn absence_is_its_own_error() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("absent");
        assert!(read(&path, 1, Links::Refuse).is_err_and(|e| e.is_not_found()));
        assert!(read_if_present(&path, 1, Links::Refuse).expect("absent is fine").is_none());
        std::fs::write(&path, [0xff, 0xfe]).expect("writes");
        assert!(matches!(read_text(&path, 8, Links::Refuse), Err(FileError::NotText { .. })));
    }

    proptest! {
        /// A regular file is returned whole exactly when it fits the limit, and refused otherwise.
        #[test]
        fn a_file_is_read_whole_or_refused_by_its_size(len in 0usize..4096, limit in 0u64..4096) {
            let dir = tempfile::tempdir().expect("temp dir");
            let path = dir.path().join("f");
            let bytes: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            std::fs::write(&path, &bytes).expect("writes");
            match read(&path, limit, Links::Refuse) {
                Ok(read) => { prop_assert!(len as u64 <= limit); prop_assert_eq!(read, bytes); }
                Err(FileError::TooLarge { size, .. }) => { prop_assert!(len as u64 > limit); prop_assert!(size > limit); }
                Err(e) => prop_assert!(false, "unexpected {e}"),
            }
        }
    }
}
