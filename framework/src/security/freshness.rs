//! The cloud's memory of each device's request sequence, so that an old summary replayed to it
//! is refused, also after a restart.
//!
//! One line per accepted request, `<percent-encoded device id> <sequence>`, appended to a file;
//! opening it keeps each device's largest and rewrites the file compacted (temp file, rename).
//! Appends are written before the replies leave (a process killed after the write keeps them;
//! a machine losing power may lose the last page, which `fsync` per batch would cost). One cloud
//! process holds a ledger at a time (an exclusive lock on `<ledger>.lock`): two clouds on one kit
//! would each accept what the other answered.

use std::collections::HashMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use crate::data::DeviceId;
use crate::security::identity;

/// Why the ledger could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// Another process holds the ledger: a cloud already serves with this kit.
    #[error("{path}: held by another cloud process serving with this kit; stop it first, or point devices at it")]
    Locked {
        /// The lock file.
        path: PathBuf,
    },
    /// A complete line that is not `<device> <sequence>`.
    #[error("{path}:{line}: not `<device> <sequence>`: {text:?}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// The line (cut to 80 characters).
        text: String,
    },
}

/// The last sequence accepted from each device, persisted to a file (or in memory only).
#[derive(Debug)]
pub struct SequenceLedger {
    last: Mutex<HashMap<String, u64>>,
    file: Option<(PathBuf, Mutex<std::fs::File>)>,
    /// Held (locked) for the ledger's life.
    _lock: Option<std::fs::File>,
}

impl SequenceLedger {
    /// A ledger that forgets on exit (simulation, tests).
    pub fn in_memory() -> Self {
        Self { last: Mutex::new(HashMap::new()), file: None, _lock: None }
    }

    /// The ledger in `path` (created if absent, with its folder; a symbolic link is followed and
    /// the file's mode kept). A last line without its newline that does not parse (a write cut
    /// short by a crash) is dropped; any other bad line is an error naming it, so that a damaged
    /// ledger never silently forgets what it refused.
    ///
    /// # Errors
    /// [`LedgerError`] naming the file (and line).
    pub fn open(path: &Path) -> Result<Self, LedgerError> {
        let io = |error| LedgerError::Io { path: path.to_path_buf(), error };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let lock_path = path.with_extension("lock");
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&lock_path)
            .map_err(|error| LedgerError::Io { path: lock_path.clone(), error })?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => return Err(LedgerError::Locked { path: lock_path }),
            Err(std::fs::TryLockError::Error(error)) => return Err(LedgerError::Io { path: lock_path, error }),
        }
        let last = read_ledger(path)?;
        let mut compact: Vec<(&String, &u64)> = last.iter().collect();
        compact.sort();
        let body: String = compact.iter().map(|(d, s)| format!("{} {s}\n", identity::encode(d))).collect();
        // Rewritten beside the file a link points to, with its mode, and renamed over it.
        let target = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        let temp = target.with_extension("compacting");
        std::fs::write(&temp, body).map_err(io)?;
        if let Ok(meta) = std::fs::metadata(&target) {
            std::fs::set_permissions(&temp, meta.permissions()).map_err(io)?;
        }
        std::fs::rename(&temp, &target).map_err(io)?;
        let file = std::fs::OpenOptions::new().append(true).open(&target).map_err(io)?;
        Ok(Self { last: Mutex::new(last), file: Some((path.to_path_buf(), Mutex::new(file))), _lock: Some(lock) })
    }

    /// The ledger of one of several cloud workers sharing a kit (the MQTT transport's workers in
    /// one shared subscription): the first of `<stem>-0.<ext>`, `<stem>-1.<ext>`, … beside `path`
    /// that no other process holds, which it writes; every other worker's file is read (not
    /// written) at start, so a worker also refuses what the others had answered by then. Returns
    /// the ledger and its worker number.
    ///
    /// Between workers running at the same time a replay is refused only by a worker that saw
    /// the sequence: the broker's ACL (a device publishes only to its own topic) is what keeps
    /// others from sending as a device at all.
    ///
    /// # Errors
    /// [`LedgerError`] naming the file (and line); [`LedgerError::Locked`] when all
    /// [`MAX_WORKERS`](Self::MAX_WORKERS) are taken.
    pub fn open_worker(path: &Path) -> Result<(Self, usize), LedgerError> {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let ext = path.extension().map(|e| e.to_string_lossy().into_owned()).unwrap_or_default();
        let of = |i: usize| path.with_file_name(format!("{stem}-{i}.{ext}"));
        for i in 0..Self::MAX_WORKERS {
            let ledger = match Self::open(&of(i)) {
                Ok(ledger) => ledger,
                Err(LedgerError::Locked { .. }) => continue,
                Err(e) => return Err(e),
            };
            let others = (0..Self::MAX_WORKERS).filter(|j| *j != i).map(of).filter(|p| p.exists());
            for other in std::iter::once(path.to_path_buf()).chain(others) {
                let seen = read_ledger(&other)?;
                if let Ok(mut last) = ledger.last.lock() {
                    for (device, sequence) in seen {
                        let entry = last.entry(device).or_insert(sequence);
                        *entry = (*entry).max(sequence);
                    }
                }
            }
            return Ok((ledger, i));
        }
        Err(LedgerError::Locked { path: of(Self::MAX_WORKERS - 1).with_extension("lock") })
    }

    /// Most workers [`open_worker`](Self::open_worker) numbers.
    pub const MAX_WORKERS: usize = 64;

    /// The file it writes (`None` in memory).
    pub fn path(&self) -> Option<&Path> {
        self.file.as_ref().map(|(path, _)| path.as_path())
    }

    /// The last sequence accepted from `device`, if any.
    pub fn last(&self, device: &DeviceId) -> Option<u64> {
        self.last.lock().ok()?.get(&device.0).copied()
    }

    /// How many devices it remembers.
    pub fn len(&self) -> usize {
        self.last.lock().map(|l| l.len()).unwrap_or(0)
    }

    /// Whether it remembers no device.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Records that these requests were accepted: persisted (one write), then remembered.
    ///
    /// # Errors
    /// [`LedgerError::Io`] when the file cannot be written; then nothing is remembered either
    /// (the requests are refused, not accepted).
    pub fn record<'d>(&self, accepted: impl IntoIterator<Item = (&'d DeviceId, u64)>) -> Result<(), LedgerError> {
        let accepted: Vec<(&DeviceId, u64)> = accepted.into_iter().collect();
        if let Some((path, file)) = &self.file
            && !accepted.is_empty()
        {
            let lines: String = accepted
                .iter()
                .map(|(device, sequence)| format!("{} {sequence}\n", identity::encode(&device.0)))
                .collect();
            let mut file = file.lock().map_err(|_| LedgerError::Io {
                path: path.clone(),
                error: std::io::Error::other("the ledger's lock is poisoned"),
            })?;
            file.write_all(lines.as_bytes()).map_err(|error| LedgerError::Io { path: path.clone(), error })?;
        }
        if let Ok(mut last) = self.last.lock() {
            for (device, sequence) in accepted {
                let entry = last.entry(device.0.clone()).or_insert(sequence);
                *entry = (*entry).max(sequence);
            }
        }
        Ok(())
    }
}

/// The sequences a ledger file records, each device's largest (an absent file records none). A
/// last line without its newline that does not parse (a write cut short by a crash) is dropped.
fn read_ledger(path: &Path) -> Result<HashMap<String, u64>, LedgerError> {
    let text = match std::fs::read(path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(error) => return Err(LedgerError::Io { path: path.to_path_buf(), error }),
    };
    let parse = |line: &str| {
        line.split_once(' ').and_then(|(id, seq)| {
            let device = identity::decode(id)?;
            Some((device, seq.trim().parse::<u64>().ok()?))
        })
    };
    // A cut-short last line is dropped only if it does not parse: one that does is at worst
    // a smaller number than was written, which still refuses more than forgetting it.
    let complete = match text.rfind('\n') {
        Some(end) if parse(&text[end + 1..]).is_none() => &text[..end],
        None if parse(&text).is_none() => "",
        _ => text.as_str(),
    };
    let mut last = HashMap::new();
    for (i, line) in complete.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let Some((device, sequence)) = parse(line) else {
            let text = line.chars().take(80).collect();
            return Err(LedgerError::Line { path: path.to_path_buf(), line: i + 1, text });
        };
        let entry = last.entry(device).or_insert(sequence);
        *entry = (*entry).max(sequence);
    }
    Ok(last)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn id(s: &str) -> DeviceId {
        DeviceId(s.into())
    }

    #[test]
    fn workers_take_their_own_files_and_read_each_others() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cloud/sequences.log");
        let (first, a) = SequenceLedger::open_worker(&path).expect("opens");
        let (second, b) = SequenceLedger::open_worker(&path).expect("opens");
        assert_eq!((a, b), (0, 1), "a held file is skipped");
        first.record([(&id("d"), 4)]).expect("records");
        second.record([(&id("e"), 9)]).expect("records");
        assert_eq!(second.last(&id("d")), None, "running workers do not share memory");
        drop(first);
        // A restarted worker takes the free number and starts from every worker's record.
        let (again, c) = SequenceLedger::open_worker(&path).expect("reopens");
        assert_eq!(c, 0);
        assert_eq!((again.last(&id("d")), again.last(&id("e"))), (Some(4), Some(9)));
        assert!(dir.path().join("cloud/sequences-1.log").exists());
    }

    #[test]
    fn a_reopened_ledger_remembers_the_largest_sequence_of_each_device() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("cloud/sequences.log");
        let ledger = SequenceLedger::open(&path).expect("opens");
        ledger.record([(&id("a b"), 3), (&id("c\n"), 9)]).expect("records");
        ledger.record([(&id("a b"), 2)]).expect("records");
        drop(ledger);
        // A crash cut the last write short: a line that no longer parses is dropped, the rest
        // kept; one that still parses is kept.
        let mut file = std::fs::OpenOptions::new().append(true).open(&path).expect("file");
        file.write_all(b"a%20b 7\nc%0").expect("partial");
        let again = SequenceLedger::open(&path).expect("reopens");
        assert_eq!((again.last(&id("a b")), again.last(&id("c\n")), again.last(&id("d"))), (Some(7), Some(9), None));
        assert_eq!(std::fs::read_to_string(&path).expect("compacted").lines().count(), 2);
    }

    #[test]
    fn one_process_holds_a_ledger_at_a_time() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sequences.log");
        let first = SequenceLedger::open(&path).expect("opens");
        assert!(matches!(SequenceLedger::open(&path), Err(LedgerError::Locked { .. })));
        drop(first);
        SequenceLedger::open(&path).expect("free again");
    }

    #[test]
    fn a_damaged_line_is_an_error_naming_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("sequences.log");
        std::fs::write(&path, "a 1\nb x\n").expect("written");
        let err = SequenceLedger::open(&path).expect_err("refused");
        assert!(err.to_string().contains("sequences.log:2"), "{err}");
    }

    proptest! {
        /// Whatever is recorded, in any order, a reopened ledger holds each device's maximum.
        #[test]
        fn the_ledger_keeps_each_devices_maximum(records in prop::collection::vec(("[a-c %\n]{1,3}", any::<u64>()), 0..20)) {
            let dir = tempfile::tempdir().expect("tempdir");
            let path = dir.path().join("sequences.log");
            let ledger = SequenceLedger::open(&path).expect("opens");
            for (device, sequence) in &records {
                ledger.record([(&id(device), *sequence)]).expect("records");
            }
            let mut expected: HashMap<&str, u64> = HashMap::new();
            for (device, sequence) in &records {
                let e = expected.entry(device.as_str()).or_insert(*sequence);
                *e = (*e).max(*sequence);
            }
            for (device, max) in &expected {
                prop_assert_eq!(ledger.last(&id(device)), Some(*max));
            }
            drop(ledger);
            let again = SequenceLedger::open(&path).expect("reopens");
            prop_assert_eq!(again.len(), expected.len());
            for (device, max) in expected {
                prop_assert_eq!(again.last(&id(device)), Some(max));
            }
        }
    }
}
