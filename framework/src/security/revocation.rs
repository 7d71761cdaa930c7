//! The revocation list: device ids the cloud refuses although their certificates are valid.
//!
//! A text file, one encoded device id ([`identity::encode`](super::identity::encode), the form
//! the cloud reads from a certificate's URI) per line, `#` comments, blank lines, and a UTF-8
//! byte-order mark at its very start (editors add one). `mmpg provision --revoke` appends to it.
//!
//! It is security state, so it fails closed: any other line — an id in another spelling (`a/b`
//! for `a%2Fb`, `%61` for `a`), a byte-order mark elsewhere, a control character — is an error
//! naming the line, never a silent skip. A running cloud re-reads the file when its metadata
//! changes and at least once a second whatever the metadata says (an edit within one timestamp
//! tick, of the same length, is still seen); a list that cannot be read or parsed keeps the
//! previous one in force and is reported ([`Revocations::problem`]: the cloud's log, `/readyz`
//! and metrics).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime};

use super::identity;
use crate::files::{FileError, Links};

/// Largest revocation list read, in bytes (a million revoked devices of 60-byte ids).
pub const MAX_LIST: u64 = 64 << 20;

/// How often a running cloud re-reads the list even if its metadata looks unchanged.
const REREAD: Duration = Duration::from_secs(1);

/// Why a revocation list was not taken.
#[derive(Debug, thiserror::Error)]
pub enum RevocationError {
    /// The file was refused before reading, or could not be read.
    #[error(transparent)]
    File(#[from] FileError),
    /// A line that is not a device id in the form certificates carry.
    #[error("{path}:{line}: {message}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong, with the line as written.
        message: String,
    },
}

/// The ids a revocation list's text names.
///
/// # Errors
/// The 1-based number of the first line that is not a comment, blank, or one canonical encoded
/// device id, and what is wrong with it.
pub fn parse(text: &str) -> Result<BTreeSet<String>, (usize, String)> {
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut ids = BTreeSet::new();
    for (n, raw) in text.split('\n').enumerate() {
        let raw = raw.strip_suffix('\r').unwrap_or(raw);
        // `device-03  # lost on 2026-11-30`: what follows `#` is a comment.
        let entry = raw.split('#').next().unwrap_or("").trim_matches([' ', '\t']);
        if entry.is_empty() {
            continue;
        }
        let shown: String = entry.chars().take(80).collect();
        let Some(id) = identity::decode(entry).filter(|id| !id.is_empty() && id.len() <= crate::wire::MAX_DEVICE_ID)
        else {
            let hint = if identity::decode(entry).is_some() {
                format!("; device ids are at most {} bytes", crate::wire::MAX_DEVICE_ID)
            } else if entry.contains('\u{feff}') {
                "; it holds a byte-order mark (U+FEFF), which only the file's very start may hold".to_string()
            } else if entry.chars().any(char::is_control) {
                "; it holds a control character".to_string()
            } else {
                format!("; if the device id is `{shown}`, write it as `{}`", identity::encode(entry))
            };
            return Err((
                n + 1,
                format!("{shown:?} is not a device id as certificates carry it (percent-encoded){hint}"),
            ));
        };
        ids.insert(id);
    }
    Ok(ids)
}

/// Reads a revocation list; a missing file is an empty list.
///
/// # Errors
/// [`RevocationError`]: the file is not a regular file, over [`MAX_LIST`], unreadable, not
/// UTF-8, or has a line [`parse`] refuses.
pub fn read(path: &Path) -> Result<BTreeSet<String>, RevocationError> {
    Ok(read_if_present(path)?.unwrap_or_default())
}

/// [`read`], telling an absent file (`None`) from an empty one.
fn read_if_present(path: &Path) -> Result<Option<BTreeSet<String>>, RevocationError> {
    let text = match crate::files::read_text(path, MAX_LIST, Links::Refuse) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => return Ok(None),
        Err(e) => return Err(e.into()),
    };
    parse(&text).map(Some).map_err(|(line, message)| RevocationError::Line { path: path.to_path_buf(), line, message })
}

/// The line a revoked device takes.
pub fn line(id: &str) -> String {
    identity::encode(id)
}

#[derive(Debug, Default)]
struct Seen {
    stamp: Option<(SystemTime, u64)>,
    read_at: Option<Instant>,
    /// Whether the file existed when last taken.
    existed: bool,
    ids: BTreeSet<String>,
    problem: Option<String>,
    failures: u64,
}

/// A revocation list kept current with its file.
#[derive(Debug)]
pub struct Revocations {
    path: PathBuf,
    seen: Mutex<Seen>,
}

impl Revocations {
    /// Watches `path` (which need not exist yet). A list that cannot be taken now is an empty
    /// list with a [`problem`](Self::problem); a cloud that must not start so uses
    /// [`Revocations::open`].
    pub fn watch(path: &Path) -> Self {
        let revocations = Self { path: path.to_path_buf(), seen: Mutex::new(Seen::default()) };
        drop(revocations.refresh(Instant::now()));
        revocations
    }

    /// Watches `path`, which must hold a valid list now (or not exist).
    ///
    /// # Errors
    /// As [`read`]: starting with a list that cannot be read would revoke no one.
    pub fn open(path: &Path) -> Result<Self, RevocationError> {
        let found = read_if_present(path)?;
        let seen = Seen {
            stamp: metadata_stamp(path),
            read_at: Some(Instant::now()),
            existed: found.is_some(),
            ids: found.unwrap_or_default(),
            ..Seen::default()
        };
        Ok(Self { path: path.to_path_buf(), seen: Mutex::new(seen) })
    }

    /// The file it follows.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn refresh(&self, now: Instant) -> std::sync::MutexGuard<'_, Seen> {
        let mut seen = self.seen.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let stamp = metadata_stamp(&self.path);
        let due = seen.read_at.is_none_or(|at| now.saturating_duration_since(at) >= REREAD);
        if stamp != seen.stamp || due {
            seen.read_at = Some(now);
            seen.stamp = stamp;
            // A list that existed and is gone does not mean "no one is revoked": that takes an
            // empty file, written on purpose.
            let taken = match read_if_present(&self.path) {
                Ok(None) if seen.existed => Err(format!("{}: no longer exists", self.path.display())),
                Ok(found) => Ok(found),
                Err(e) => Err(e.to_string()),
            };
            match taken {
                Ok(found) => {
                    seen.existed = found.is_some();
                    seen.ids = found.unwrap_or_default();
                    if seen.problem.take().is_some() {
                        eprintln!("mmpg cloud: revocation list: taken again ({} revoked)", seen.ids.len());
                    }
                }
                // A list that cannot be taken keeps the last one in force, and says so: neither
                // a slip of the editor nor of permissions un-revokes anyone.
                Err(e) => {
                    let problem = format!("{e}; the previous list ({} revoked) stays in force", seen.ids.len());
                    if seen.problem.as_deref() != Some(problem.as_str()) {
                        eprintln!("mmpg cloud: revocation list: {problem}");
                        seen.failures += 1;
                    }
                    seen.problem = Some(problem);
                }
            }
        }
        seen
    }

    /// Whether `device` is revoked, as the file says now.
    pub fn is_revoked(&self, device: &str) -> bool {
        self.refresh(Instant::now()).ids.contains(device)
    }

    /// Every revoked device, as the file says now.
    pub fn all(&self) -> BTreeSet<String> {
        self.refresh(Instant::now()).ids.clone()
    }

    /// Why the file's current content is not in force, if it is not (the previous list is).
    pub fn problem(&self) -> Option<String> {
        self.refresh(Instant::now()).problem.clone()
    }

    /// How many times a new content of the file was refused.
    pub fn failures(&self) -> u64 {
        self.refresh(Instant::now()).failures
    }
}

fn metadata_stamp(path: &Path) -> Option<(SystemTime, u64)> {
    std::fs::metadata(path).ok().and_then(|m| Some((m.modified().ok()?, m.len())))
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

    /// Issue 28's examples: a byte-order mark before an id, and an id written unescaped, were
    /// silently skipped and the revoked device kept full access.
    #[test]
    fn a_bad_line_is_an_error_that_keeps_the_previous_list() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.txt");
        // A mark at the start of the file is what editors write: taken.
        std::fs::write(&path, "\u{feff}a%2Fb\r\nc\n").expect("writes");
        let list = Revocations::open(&path).expect("a valid list");
        assert_eq!(list.all().into_iter().collect::<Vec<_>>(), ["a/b", "c"]);
        for bad in ["a%2Fb\n\u{feff}d\n", "a%2Fb\nc\na/b\n", "%61\n", "a%2Fb\nd\u{0}\n", "a b\n"] {
            std::fs::write(&path, bad).expect("writes");
            assert!(list.is_revoked("a/b") && list.is_revoked("c"), "{bad:?}: the previous list stays");
            let problem = list.problem().expect("reported");
            assert!(problem.contains("revoked.txt:") && problem.contains("stays in force"), "{problem}");
            assert!(matches!(read(&path), Err(RevocationError::Line { .. })), "{bad:?}");
            assert!(Revocations::open(&path).is_err(), "{bad:?}: a cloud does not start on it");
        }
        let unescaped = parse("a/b\n").expect_err("refused");
        assert_eq!(unescaped.0, 1);
        assert!(unescaped.1.contains("write it as `a%2Fb`"), "{}", unescaped.1);
        std::fs::write(&path, "d\n").expect("writes");
        assert!(list.is_revoked("d") && !list.is_revoked("c"));
        assert_eq!(list.problem(), None);
        assert!(list.failures() >= 1);
        // Deleted under a running cloud: the previous list stays; an empty file clears it.
        std::fs::remove_file(&path).expect("removed");
        assert!(list.is_revoked("d"));
        assert!(list.problem().is_some_and(|p| p.contains("no longer exists")), "{:?}", list.problem());
        std::fs::write(&path, "# none\n").expect("writes");
        assert!(!list.is_revoked("d"));
        assert_eq!(list.problem(), None);
        let bom = parse("a\n\u{feff}b\n").expect_err("refused");
        assert!(bom.1.contains("byte-order mark"), "{}", bom.1);
    }

    /// The content is followed, not the metadata: an edit keeping the size and the timestamp is
    /// seen within a second.
    #[test]
    fn an_edit_that_keeps_size_and_time_is_still_seen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("revoked.txt");
        std::fs::write(&path, "aa\n").expect("writes");
        let list = Revocations::open(&path).expect("valid");
        let modified = std::fs::metadata(&path).and_then(|m| m.modified()).expect("mtime");
        std::fs::write(&path, "bb\n").expect("writes");
        std::fs::File::options().write(true).open(&path).and_then(|f| f.set_modified(modified)).expect("touched");
        let later = Instant::now() + REREAD;
        assert!(list.refresh(later).ids.contains("bb"));
    }

    proptest::proptest! {
        /// A list of encoded ids, with comments and blank lines, parses back to exactly those ids.
        #[test]
        fn written_lists_parse_back(ids in proptest::collection::btree_set("\\PC{1,20}", 0..8), bom: bool) {
            let mut text = if bom { "\u{feff}".to_string() } else { String::new() };
            text.push_str("# revoked devices\n\n");
            for id in &ids {
                text.push_str(&format!("{}  # why\n", line(id)));
            }
            proptest::prop_assert_eq!(parse(&text).expect("parses"), ids);
        }

        /// Parsing never panics, and every id it returns is one a certificate can carry.
        #[test]
        fn parsing_anything_yields_only_certificate_ids(text in "\\PC{0,200}") {
            if let Ok(ids) = parse(&text) {
                for id in ids {
                    proptest::prop_assert_eq!(identity::device_from_uri(&identity::device_uri(&id)), Some(id));
                }
            }
        }
    }
}
