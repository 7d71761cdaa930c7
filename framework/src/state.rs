//! A device's saved state: its last good parameters, its request counter and its privacy
//! ledger, each written atomically and sealed with a checksum, so that a file damaged at rest (a
//! flipped bit, a torn copy) is detected and never trusted.
//!
//! A sealed file is the content followed by the 64 lowercase hex digits of its sha256. A damaged
//! counter is not fatal: the device starts from its parameters' sequence (or 0) and the cloud's
//! refusal of a stale request names the sequence to continue after
//! ([`Envelope::last_accepted`](crate::wire::Envelope::last_accepted)).

use std::path::{Path, PathBuf};

use crate::files::{FileError, Links};
use crate::wire::MAX_SEQUENCE;

/// The last good parameters: the cloud's reply as it arrived (signed under `[security]`).
pub const PARAMS: &str = "params.envelope";
/// The sequence of the last request made.
pub const SEQUENCE: &str = "sequence";
/// The privacy the device's uploads have spent.
pub const PRIVACY: &str = "privacy.json";

/// Length of the seal: sha256 as hex digits.
const SEAL: usize = 64;
/// Largest sealed counter or ledger, in bytes (a counter is at most 15 digits; a ledger ~150
/// bytes of JSON).
pub const MAX_SMALL: u64 = 4096 + SEAL as u64;
/// Largest sealed parameter file: one reply of the wire and its seal.
pub const MAX_PARAMS: u64 = crate::wire::MAX_PAYLOAD as u64 + 1024 + SEAL as u64;

/// Why a state file was not restored.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The file was refused before reading, or could not be read.
    #[error(transparent)]
    File(#[from] FileError),
    /// The content does not match its seal.
    #[error("{path}: fails its checksum (damaged, or written by a build before state files were sealed)")]
    Checksum {
        /// The file.
        path: PathBuf,
    },
    /// Sealed, but not what the file holds.
    #[error("{path}: {message}")]
    Content {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The file could not be written.
    #[error("writing {path}: {error}")]
    Write {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
}

/// `bytes` followed by their seal.
pub fn seal(bytes: &[u8]) -> Vec<u8> {
    let mut sealed = Vec::with_capacity(bytes.len() + SEAL);
    sealed.extend_from_slice(bytes);
    sealed.extend_from_slice(crate::bundle::sha256_hex(bytes).as_bytes());
    sealed
}

/// The content of sealed bytes; `None` when the seal does not match.
pub fn unseal(sealed: &[u8]) -> Option<&[u8]> {
    let (content, sum) = sealed.split_at(sealed.len().checked_sub(SEAL)?);
    (crate::bundle::sha256_hex(content).as_bytes() == sum).then_some(content)
}

/// A request counter as its file holds it: ASCII digits only, no sign or space, and leaving a
/// next request (below [`MAX_SEQUENCE`] − 1): a counter at the end is damage, not history.
///
/// # Errors
/// What is wrong, for a person.
pub fn parse_sequence(text: &[u8]) -> Result<u64, String> {
    let shown = || String::from_utf8_lossy(&text[..text.len().min(40)]).into_owned();
    if text.is_empty() || text.len() > 20 || !text.iter().all(u8::is_ascii_digit) {
        return Err(format!("not a request sequence: {:?}", shown()));
    }
    let sequence: u64 = std::str::from_utf8(text)
        .ok()
        .and_then(|t| t.parse().ok())
        .ok_or_else(|| format!("not a request sequence: {:?}", shown()))?;
    if sequence >= MAX_SEQUENCE - 1 {
        return Err(format!("sequence {sequence} leaves no next request below {MAX_SEQUENCE} (2^48)"));
    }
    Ok(sequence)
}

/// Reads and unseals the file at `path`, at most `limit` bytes; `None` when it does not exist.
///
/// # Errors
/// [`StateError::File`] (refused before reading: not a regular file, a link, over the limit),
/// [`StateError::Checksum`].
pub fn read_sealed(path: &Path, limit: u64) -> Result<Option<Vec<u8>>, StateError> {
    let Some(mut bytes) = crate::files::read_if_present(path, limit, Links::Refuse)? else { return Ok(None) };
    let content_len = unseal(&bytes).ok_or_else(|| StateError::Checksum { path: path.to_path_buf() })?.len();
    bytes.truncate(content_len);
    Ok(Some(bytes))
}

/// The request counter saved at `path`; `None` when there is none.
///
/// # Errors
/// As [`read_sealed`], and [`StateError::Content`] for a sealed file that holds no sequence.
pub fn read_sequence(path: &Path) -> Result<Option<u64>, StateError> {
    read_sealed(path, MAX_SMALL)?
        .map(|bytes| {
            parse_sequence(&bytes).map_err(|message| StateError::Content { path: path.to_path_buf(), message })
        })
        .transpose()
}

/// Writes `content` sealed to `path` as [`crate::files::write_atomically`] does: the old file or
/// the new one after a crash, never through a link or into a FIFO standing there.
///
/// # Errors
/// [`StateError::Write`].
pub fn write_sealed(path: &Path, content: &[u8]) -> Result<(), StateError> {
    crate::files::write_atomically(path, &seal(content))
        .map_err(|error| StateError::Write { path: path.to_path_buf(), error })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_counter_round_trips_and_a_flipped_bit_is_caught() {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join(SEQUENCE);
        assert_eq!(read_sequence(&path).expect("absent"), None);
        write_sealed(&path, b"41").expect("written");
        assert_eq!(read_sequence(&path).expect("reads"), Some(41));
        // Issue 28's example: one flipped bit turned a counter into a huge number the cloud then
        // recorded. Sealed, the flip is caught instead.
        let mut bytes = std::fs::read(&path).expect("reads");
        bytes[0] ^= 0x08;
        std::fs::write(&path, &bytes).expect("writes");
        assert!(matches!(read_sequence(&path), Err(StateError::Checksum { .. })));
        // An unsealed counter (an older build's, or edited by hand) is not trusted either.
        std::fs::write(&path, "41").expect("writes");
        assert!(matches!(read_sequence(&path), Err(StateError::Checksum { .. })));
    }

    #[test]
    fn counters_are_plain_digits_below_the_bound() {
        assert_eq!(parse_sequence(b"0"), Ok(0));
        assert_eq!(parse_sequence((MAX_SEQUENCE - 2).to_string().as_bytes()), Ok(MAX_SEQUENCE - 2));
        // The new user's example: 2^48 − 1 was restored and the device could not ask at all.
        assert!(parse_sequence((MAX_SEQUENCE - 1).to_string().as_bytes()).is_err());
        for bad in [&b""[..], b" 1", b"1\n", b"+1", b"-1", b"1e3", b"99999999999999999999999"] {
            assert!(parse_sequence(bad).is_err(), "{bad:?}");
        }
        assert!(parse_sequence(MAX_SEQUENCE.to_string().as_bytes()).is_err());
    }

    proptest! {
        /// Sealing round-trips, and any single-bit change of a sealed file is detected.
        #[test]
        fn any_flipped_bit_breaks_the_seal(content in proptest::collection::vec(any::<u8>(), 0..256), bit in any::<usize>()) {
            let sealed = seal(&content);
            prop_assert_eq!(unseal(&sealed), Some(&content[..]));
            let mut damaged = sealed.clone();
            let at = bit % (damaged.len() * 8);
            damaged[at / 8] ^= 1 << (at % 8);
            prop_assert_eq!(unseal(&damaged), None);
        }

        /// Whatever the bytes, parsing a counter never panics and never yields one at the bound.
        #[test]
        fn parsed_counters_are_below_the_bound(text in proptest::collection::vec(any::<u8>(), 0..32)) {
            if let Ok(s) = parse_sequence(&text) { prop_assert!(s + 1 < MAX_SEQUENCE); }
        }
    }
}
