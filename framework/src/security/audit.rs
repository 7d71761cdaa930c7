//! The audit log: one JSON object per line, appended, never rewritten.
//!
//! Every refusal the cloud makes for a security reason (no or unknown identity, impersonation,
//! revoked device, replay, rate limit) and every provisioning and revocation is one line:
//! `{"time_ms":…,"event":"refused","device":"…","reason":"…","peer":"…"}`.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// One line of the audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEvent {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// `refused`, `provisioned`, `revoked`.
    pub event: String,
    /// The device concerned (as its certificate or envelope names it), if any.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub device: Option<String>,
    /// Why.
    pub reason: String,
    /// The peer's network address, if it came over a network.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub peer: Option<String>,
}

impl AuditEvent {
    /// An event now.
    pub fn now(event: &str, device: Option<&str>, reason: impl Into<String>, peer: Option<&str>) -> Self {
        let time_ms = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        Self {
            time_ms,
            event: event.to_string(),
            device: device.map(str::to_string),
            reason: reason.into(),
            peer: peer.map(str::to_string),
        }
    }
}

/// An append-only audit log file, shared by every thread that refuses something.
#[derive(Debug)]
pub struct AuditLog {
    path: PathBuf,
    file: Mutex<File>,
}

impl AuditLog {
    /// Opens (creating) the log for appending.
    ///
    /// # Errors
    /// The file cannot be created or opened.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        Ok(Self { path: path.to_path_buf(), file: Mutex::new(file) })
    }

    /// Where it writes.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one event as one line (one `write` call, so lines from several threads or
    /// processes never interleave).
    ///
    /// # Errors
    /// The line could not be written.
    pub fn record(&self, event: &AuditEvent) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(event).map_err(std::io::Error::other)?;
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        file.write_all(&line)
    }

    /// Every event in a log file, oldest first (lines that are not events are skipped).
    ///
    /// # Errors
    /// The file cannot be read.
    pub fn read(path: &Path) -> std::io::Result<Vec<AuditEvent>> {
        let text = std::fs::read_to_string(path)?;
        Ok(text.lines().filter_map(|l| serde_json::from_str(l).ok()).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_appended_as_json_lines() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("audit.jsonl");
        let log = AuditLog::open(&path).expect("opens");
        log.record(&AuditEvent::now("refused", Some("a\"b"), "impersonation", Some("127.0.0.1:9"))).expect("writes");
        drop(log);
        let log = AuditLog::open(&path).expect("reopens");
        log.record(&AuditEvent::now("revoked", Some("c"), "by the operator", None)).expect("writes");
        let events = AuditLog::read(&path).expect("reads");
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].device.as_deref(), Some("a\"b"));
        assert_eq!(events[1].event, "revoked");
        assert_eq!(std::fs::read_to_string(&path).expect("reads").lines().count(), 2);
    }
}
