//! The revocation list: device ids the cloud refuses although their certificates are valid.
//!
//! A text file, one encoded device id ([`identity::encode`](super::identity::encode)) per line,
//! `#` comments. `mmpg provision --revoke` appends to it; a running cloud notices the change (by
//! modification time and length, checked on every lookup: one `stat`) and re-reads it, so a
//! revocation takes effect without a restart.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::SystemTime;

use super::identity;

/// Reads a revocation list; a missing file is an empty list.
///
/// # Errors
/// The file exists but cannot be read.
pub fn read(path: &Path) -> std::io::Result<BTreeSet<String>> {
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text
            .lines()
            // `device-03  # lost on 2026-11-30`: what follows `#` is a comment.
            .map(|l| l.split('#').next().unwrap_or("").trim())
            .filter(|l| !l.is_empty())
            .filter_map(identity::decode)
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
        Err(e) => Err(e),
    }
}

/// The line a revoked device takes.
pub fn line(id: &str) -> String {
    identity::encode(id)
}

#[derive(Debug, Default)]
struct Seen {
    stamp: Option<(SystemTime, u64)>,
    ids: BTreeSet<String>,
}

/// A revocation list kept current with its file.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    seen: Mutex<Seen>,
}

impl Revocations {
    /// Watches `path` (which need not exist yet).
    pub fn watch(path: &Path) -> Self {
        let revocations = Self { path: path.to_path_buf(), seen: Mutex::new(Seen::default()) };
        drop(revocations.refresh());
        revocations
    }

    fn refresh(&self) -> std::sync::MutexGuard<'_, Seen> {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = std::fs::metadata(&self.path).ok().and_then(|m| Some((m.modified().ok()?, m.len())));
        if stamp != seen.stamp {
            // A list that cannot be read now keeps the last one read: a permissions slip must
            // not un-revoke anyone, nor lock the fleet out.
            if let Ok(ids) = read(&self.path) {
                seen.ids = ids;
                seen.stamp = stamp;
            }
        }
        seen
    }

    /// Whether `device` is revoked, as the file says now.
    pub fn is_revoked(&self, device: &str) -> bool {
        self.refresh().ids.contains(device)
    }

    /// Every revoked device, as the file says now.
    pub fn all(&self) -> BTreeSet<String> {
        self.refresh().ids.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_revocation_appended_later_is_seen_without_restarting() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.txt");
        let list = Revocations::watch(&path);
        assert!(!list.is_revoked("a/b"));
        std::fs::write(&path, format!("# revoked devices\n{}\n", line("a/b"))).expect("writes");
        assert!(list.is_revoked("a/b"));
        assert!(!list.is_revoked("a"));
        std::fs::write(&path, format!("# revoked devices\n{}\n{}  # stolen\n", line("a/b"), line("c")))
            .expect("writes");
        assert_eq!(list.all().into_iter().collect::<Vec<_>>(), ["a/b", "c"]);
    }
}
