//! The broker's side of a kit: a password for each device and for the cloud workers, Mosquitto's
//! password file and an ACL in which a device may publish only to its own summary topic and read
//! only its own params topic.
//!
//! The password file holds PBKDF2-HMAC-SHA512 hashes in Mosquitto 2's `$7$` format (what
//! `mosquitto_passwd` writes: 101 iterations, a 12-byte salt, base64), so the broker verifies
//! passwords itself; the plain passwords live only in each device's kit
//! (`devices/<id>/broker-password`) and the cloud's (`cloud/broker-password`), mode 0600.
//! A device's user name is its id as one topic level ([`crate::topics::level`]), so the ACL's
//! `%u` is exactly its topic level and no id can reach a wildcard.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use mmpg::security::provision::{write_public, write_secret};
use mmpg::security::{DeviceKit, Kit, ProvisionError};

use crate::Topics;
use crate::topics::level;

/// The cloud workers' user name on the broker. `@` is percent-encoded in every device's user
/// name, so no device can be named into it.
pub const CLOUD_USER: &str = "@cloud";

/// PBKDF2 iterations, as `mosquitto_passwd` uses.
const ITERATIONS: u32 = 101;

/// A user's password in Mosquitto's `$7$` format: `$7$<iterations>$<salt>$<hash>`, base64.
pub fn hash_password(password: &str, salt: &[u8; 12]) -> String {
    let mut hash = [0u8; 64];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), salt, ITERATIONS, &mut hash);
    format!("$7${ITERATIONS}${}${}", STANDARD.encode(salt), STANDARD.encode(hash))
}

/// Whether `password` matches `hashed` (a `$7$` entry): for tests and diagnostics.
pub fn verify_password(password: &str, hashed: &str) -> bool {
    let mut parts = hashed.split('$').skip(1);
    let (Some("7"), Some(iterations), Some(salt), Some(hash)) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    let (Ok(iterations), Ok(salt), Ok(hash)) =
        (iterations.parse::<u32>(), STANDARD.decode(salt), STANDARD.decode(hash))
    else {
        return false;
    };
    let mut computed = vec![0u8; hash.len()];
    pbkdf2::pbkdf2_hmac::<sha2::Sha512>(password.as_bytes(), &salt, iterations, &mut computed);
    computed == hash
}

/// A fresh password: 32 hex digits from the operating system's random source.
fn new_password() -> Result<String, ProvisionError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| ProvisionError::Certificate(format!("no randomness: {e}")))?;
    Ok(bytes.iter().fold(String::with_capacity(32), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    }))
}

/// The password in `path`, made and written (mode 0600) if absent.
fn password_in(path: &Path) -> Result<String, ProvisionError> {
    match mmpg::files::read_kit_text(path) {
        Ok(p) if !p.trim().is_empty() => Ok(p.trim().to_string()),
        Ok(_) => Err(ProvisionError::Key { path: path.to_path_buf(), message: "empty password file".into() }),
        Err(e) if e.is_not_found() => {
            let password = new_password()?;
            write_secret(path, password.as_bytes())?;
            Ok(password)
        }
        Err(e) => Err(e.into()),
    }
}

/// Reads a password file a kit holds (trimmed).
///
/// # Errors
/// [`ProvisionError::Io`] naming the file when it cannot be read, [`ProvisionError::Key`] when
/// it is empty.
pub fn read_password(path: &Path) -> Result<String, ProvisionError> {
    let text = mmpg::files::read_kit_text(path)?;
    match text.trim() {
        "" => Err(ProvisionError::Key { path: path.to_path_buf(), message: "empty password file".into() }),
        p => Ok(p.to_string()),
    }
}

/// Where a kit keeps the workers' secret shared-subscription group name.
pub fn group_secret(kit: &Kit) -> PathBuf {
    kit.root().join("cloud").join("broker-group")
}

/// The shared-subscription group the cloud workers of `kit` join: `group` and the kit's secret.
///
/// Why a secret: Mosquitto grants any client a subscription it may not read and checks read
/// access only when delivering, so a device that joined the workers' group would receive its
/// share of every device's summaries — and the broker would drop each one. A device cannot join
/// a group it cannot name; the name never leaves the cloud's side of the kit.
///
/// # Errors
/// [`ProvisionError`] naming the file when it cannot be read or written.
pub fn secret_group(kit: &Kit, group: &str) -> Result<String, ProvisionError> {
    Ok(format!("{group}-{}", password_in(&group_secret(kit))?))
}

/// The broker's files in a kit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerFiles {
    /// Mosquitto's `password_file`.
    pub passwords: PathBuf,
    /// Mosquitto's `acl_file`.
    pub acl: PathBuf,
}

impl BrokerFiles {
    /// Where `kit` keeps them.
    pub fn of(kit: &Kit) -> Self {
        Self { passwords: kit.broker().join("passwd"), acl: kit.broker().join("acl") }
    }
}

/// The ACL of one deployment: the cloud reads every summary and writes every params topic; a
/// device writes only its own summary topic and reads only its own params topic.
pub fn acl(topics: &Topics) -> String {
    let mut out = String::from(
        "# Written by `mmpg provision`: each device publishes only its own summary and reads only its own\n\
         # parameters (%u is its user name, its id as one topic level); the cloud workers read every\n\
         # summary (shared subscription) and write every device's parameters.\n",
    );
    let _ = writeln!(out, "user {CLOUD_USER}");
    // Wildcards and `%u` are written as the last level itself, never found by replacing text in
    // an encoded topic: a deployment named `+` is `%2B` on the broker and stays so here.
    let _ = writeln!(out, "topic read {}", topics.summary_level("+"));
    let _ = writeln!(out, "topic write {}", topics.params_level("+"));
    let _ = writeln!(out);
    let _ = writeln!(out, "pattern write {}", topics.summary_level("%u"));
    let _ = writeln!(out, "pattern read {}", topics.params_level("%u"));
    out
}

/// Writes the broker's password file and ACL for `devices` (those in `revoked` left out, so the
/// broker refuses them at their next connection once it reloads), making each device's and the
/// cloud's password where the kit has none yet (existing ones are kept).
///
/// # Errors
/// [`ProvisionError`] naming the file that could not be read or written.
pub fn write_broker_files(
    kit: &Kit,
    topics: &Topics,
    devices: &[String],
    revoked: &std::collections::BTreeSet<String>,
) -> Result<BrokerFiles, ProvisionError> {
    let files = BrokerFiles::of(kit);
    let mut passwd = String::new();
    let mut entry = |user: &str, password: &str| -> Result<(), ProvisionError> {
        let mut salt = [0u8; 12];
        getrandom::getrandom(&mut salt).map_err(|e| ProvisionError::Certificate(format!("no randomness: {e}")))?;
        let _ = writeln!(passwd, "{user}:{}", hash_password(password, &salt));
        Ok(())
    };
    entry(CLOUD_USER, &password_in(&kit.cloud_broker_password())?)?;
    password_in(&group_secret(kit))?;
    let mut seen = std::collections::BTreeSet::new();
    for device in devices.iter().filter(|d| !revoked.contains(*d)) {
        if seen.insert(device) {
            let dir = DeviceKit::new(&kit.device_dir(device));
            entry(&level(&mmpg::DeviceId(device.clone())), &password_in(&dir.broker_password())?)?;
        }
    }
    write_secret(&files.passwords, passwd.as_bytes())?;
    write_public(&files.acl, acl(topics).as_bytes())?;
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_the_ones_mosquitto_passwd_writes() {
        // `mosquitto_passwd -c -b pw alice secret` (Mosquitto 2.0.11) wrote this line.
        let line = "$7$101$ZwqqtfQ8273VsprF$SArsHz+witFUj/ulZye/n2dopmqTr4lKGNXDcqS6W3bV1qyXLhtgJAFdlZBA2RvAvB1iYLgBrT7ULtU6yVWDzg==";
        assert!(verify_password("secret", line));
        assert!(!verify_password("Secret", line));
        let salt: [u8; 12] = STANDARD.decode("ZwqqtfQ8273VsprF").expect("base64").try_into().expect("12 bytes");
        assert_eq!(hash_password("secret", &salt), line);
        assert!(!verify_password("secret", "$6$whatever"));
    }

    #[test]
    fn the_acl_gives_each_device_its_own_topics_only() {
        let acl = acl(&Topics::new("quick start"));
        assert!(acl.contains("pattern write mmpg/quick%20start/summary/%u\n"), "{acl}");
        assert!(acl.contains("pattern read mmpg/quick%20start/params/%u\n"), "{acl}");
        assert!(acl.contains("user @cloud\ntopic read mmpg/quick%20start/summary/+\n"), "{acl}");
        assert!(acl.contains("topic write mmpg/quick%20start/params/+\n"), "{acl}");
    }

    /// Issue 28: `name = "+"` validated, then the ACL matched no device topic (the name's `%2B`
    /// was replaced like a wildcard) and every device was locked out.
    #[test]
    fn a_name_that_looks_like_a_wildcard_stays_the_name() {
        let topics = Topics::new("+");
        let acl = acl(&topics);
        let device = mmpg::DeviceId("cam-7".into());
        assert_eq!(topics.summary(&device), "mmpg/%2B/summary/cam-7");
        assert!(acl.contains("pattern write mmpg/%2B/summary/%u\n"), "{acl}");
        assert!(acl.contains("pattern read mmpg/%2B/params/%u\n"), "{acl}");
        assert!(acl.contains("topic read mmpg/%2B/summary/+\n"), "{acl}");
        // What the device publishes to is what its pattern allows (with %u its user name).
        let own = topics.summary_level("%u").replace("%u", &level(&device));
        assert_eq!(own, topics.summary(&device));
    }

    #[test]
    fn passwords_are_kept_and_revoked_devices_left_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let kit = Kit::new(dir.path());
        let topics = Topics::new("d");
        let devices = vec!["a/b".to_string(), "c".to_string()];
        let files = write_broker_files(&kit, &topics, &devices, &Default::default()).expect("writes");
        let first = read_password(&DeviceKit::new(&kit.device_dir("a/b")).broker_password()).expect("password");
        let passwd = std::fs::read_to_string(&files.passwords).expect("passwd");
        let line = passwd.lines().find(|l| l.starts_with("a%2Fb:")).expect("a/b is a user");
        assert!(verify_password(&first, &line["a%2Fb:".len()..]));
        let revoked = ["c".to_string()].into_iter().collect();
        write_broker_files(&kit, &topics, &devices, &revoked).expect("rewrites");
        let again = read_password(&DeviceKit::new(&kit.device_dir("a/b")).broker_password()).expect("password");
        assert_eq!(first, again, "a device's password is kept");
        let passwd = std::fs::read_to_string(&files.passwords).expect("passwd");
        assert!(!passwd.lines().any(|l| l.starts_with("c:")), "revoked devices are not users: {passwd}");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(&files.passwords).expect("meta").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
    }
}
