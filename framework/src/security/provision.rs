//! Provisioning: the keys and certificates of a deployment, in one folder (a "kit").
//!
//! ```text
//! <kit>/ca.pem, ca.key                 the deployment's certificate authority (ECDSA P-256)
//! <kit>/cloud/cert.pem, key.pem        the cloud's server certificate (leaf, then the CA)
//! <kit>/cloud/names.txt                the names and addresses it was issued for
//! <kit>/cloud/signing.pem              the cloud's Ed25519 signing key (PKCS#8)
//! <kit>/signing.pub.pem                its public half
//! <kit>/devices/<id>/cert.pem, key.pem a device's client certificate: CN and URI name carry its id
//! <kit>/devices/<id>/ca.pem, signing.pub.pem   what the device trusts: its startup kit
//! <kit>/revoked.txt                    revoked devices
//! <kit>/audit.jsonl                    the audit log
//! ```
//!
//! Every private key is written with mode 0600. Provisioning again keeps every key and
//! certificate that exists (a device added to the deployment gets its own; nobody else is
//! re-keyed); the server certificate is re-issued only when its names change. Keys come from the
//! operating system's random source, never from the deployment's seed.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose, SanType, SerialNumber,
};

use super::audit::{AuditEvent, AuditLog};
use super::identity;
use super::revocation;
use super::signing::{CloudSigner, SignatureError};

/// The common name of a deployment's CA (the CA is re-created from its key and these fields
/// when devices are added, so it must never change).
const CA_NAME: &str = "mmpg deployment CA";

/// Why provisioning failed.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A key on disk cannot be used.
    #[error("{path}: {message}")]
    Key {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// One half of a pair exists without the other: the kit was damaged, and re-creating it
    /// would silently re-key everyone.
    #[error("{present} exists but {missing} does not: restore it, or remove the kit and provision anew")]
    Incomplete {
        /// The half that exists.
        present: PathBuf,
        /// The half that does not.
        missing: PathBuf,
    },
    /// A certificate could not be made (e.g. a server name that is neither a DNS name nor an
    /// IP address).
    #[error("certificate: {0}")]
    Certificate(String),
    /// The signing key.
    #[error(transparent)]
    Signing(#[from] SignatureError),
    /// The kit's revocation list cannot be taken: revoking into it would hide the new line
    /// behind the bad one.
    #[error(transparent)]
    Revocations(#[from] super::revocation::RevocationError),
    /// A file of the kit was refused before reading (not a regular file, a link, too large).
    #[error(transparent)]
    File(#[from] crate::files::FileError),
    /// `--revoke` named a device the kit has no certificate for.
    #[error("device `{device}` was never provisioned in {kit}")]
    UnknownDevice {
        /// The device.
        device: String,
        /// The kit.
        kit: PathBuf,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |error| ProvisionError::Io { path: path.to_path_buf(), error }
}

fn cert_error(e: rcgen::Error) -> ProvisionError {
    ProvisionError::Certificate(e.to_string())
}

/// A provisioned folder's layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Kit {
    root: PathBuf,
}

impl Kit {
    /// The kit in `root`.
    pub fn new(root: &Path) -> Self {
        Self { root: root.to_path_buf() }
    }

    /// Its folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The CA certificate everyone trusts.
    pub fn ca_cert(&self) -> PathBuf {
        self.root.join("ca.pem")
    }

    /// The CA's private key.
    pub fn ca_key(&self) -> PathBuf {
        self.root.join("ca.key")
    }

    /// The cloud's server certificate chain.
    pub fn server_cert(&self) -> PathBuf {
        self.root.join("cloud").join("cert.pem")
    }

    /// The cloud's server key.
    pub fn server_key(&self) -> PathBuf {
        self.root.join("cloud").join("key.pem")
    }

    fn server_names(&self) -> PathBuf {
        self.root.join("cloud").join("names.txt")
    }

    /// The cloud's Ed25519 signing key.
    pub fn signing_key(&self) -> PathBuf {
        self.root.join("cloud").join("signing.pem")
    }

    /// The cloud's public signing key.
    pub fn signing_public(&self) -> PathBuf {
        self.root.join("signing.pub.pem")
    }

    /// A device's startup kit: its certificate and key, the CA and the cloud's public key.
    pub fn device_dir(&self, device: &str) -> PathBuf {
        self.root.join("devices").join(identity::encode(device))
    }

    /// The revocation list.
    pub fn revoked(&self) -> PathBuf {
        self.root.join("revoked.txt")
    }

    /// The audit log.
    pub fn audit(&self) -> PathBuf {
        self.root.join("audit.jsonl")
    }

    /// The MQTT broker's files (`passwd`, `acl`), written by the mqtt transport's provisioning.
    pub fn broker(&self) -> PathBuf {
        self.root.join("broker")
    }

    /// The cloud workers' password on the MQTT broker.
    pub fn cloud_broker_password(&self) -> PathBuf {
        self.root.join("cloud").join("broker-password")
    }

    /// The cloud's ledger of the last request sequence accepted from each device.
    pub fn sequences(&self) -> PathBuf {
        self.root.join("cloud").join("sequences.log")
    }
}

/// A device's startup kit, as [`Kit::device_dir`] lays it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeviceKit {
    /// Its folder.
    pub dir: PathBuf,
}

impl DeviceKit {
    /// The kit in `dir`.
    pub fn new(dir: &Path) -> Self {
        Self { dir: dir.to_path_buf() }
    }

    /// The device's client certificate.
    pub fn cert(&self) -> PathBuf {
        self.dir.join("cert.pem")
    }

    /// The device's private key.
    pub fn key(&self) -> PathBuf {
        self.dir.join("key.pem")
    }

    /// The CA the device verifies the cloud with.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.pem")
    }

    /// The cloud's public signing key.
    pub fn signing_public(&self) -> PathBuf {
        self.dir.join("signing.pub.pem")
    }

    /// The device's password on the MQTT broker (under the mqtt transport).
    pub fn broker_password(&self) -> PathBuf {
        self.dir.join("broker-password")
    }
}

/// What a provisioning run did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Provisioned {
    /// Whether the CA was created now (else it existed).
    pub new_ca: bool,
    /// Whether the server certificate was (re-)issued now.
    pub new_server_cert: bool,
    /// Whether the cloud's signing key was created now.
    pub new_signing_key: bool,
    /// Devices given a certificate now.
    pub created: Vec<String>,
    /// Devices whose certificate existed and was kept.
    pub kept: Vec<String>,
}

/// Writes a file anyone may read (certificates, public keys, ACLs), creating its folder.
///
/// # Errors
/// [`ProvisionError::Io`] naming the file or folder.
pub fn write_public(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(io(parent))?;
    }
    std::fs::write(path, bytes).map_err(io(path))
}

/// Writes a secret (a private key, a password): mode 0600 from the moment the file exists,
/// synced, and renamed into place, so no reader ever sees it half-written or world-readable.
///
/// # Errors
/// [`ProvisionError::Io`] naming the file or folder.
pub fn write_secret(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    use std::io::Write as _;
    let parent = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(parent).map_err(io(parent))?;
    let temp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&temp);
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&temp).map_err(io(&temp))?;
    file.write_all(bytes).and_then(|()| file.sync_all()).map_err(io(&temp))?;
    std::fs::rename(&temp, path).map_err(io(path))
}

fn read_key(path: &Path) -> Result<KeyPair, ProvisionError> {
    let pem = crate::files::read_kit_text(path)?;
    KeyPair::from_pem(&pem).map_err(|e| ProvisionError::Key { path: path.to_path_buf(), message: e.to_string() })
}

/// Both files of a pair, or neither; one alone is [`ProvisionError::Incomplete`].
fn pair_exists(first: &Path, second: &Path) -> Result<bool, ProvisionError> {
    match (first.exists(), second.exists()) {
        (true, true) => Ok(true),
        (false, false) => Ok(false),
        (true, false) => Err(ProvisionError::Incomplete { present: first.into(), missing: second.into() }),
        (false, true) => Err(ProvisionError::Incomplete { present: second.into(), missing: first.into() }),
    }
}

fn random_serial() -> Result<SerialNumber, ProvisionError> {
    let mut bytes = [0u8; 16];
    getrandom::getrandom(&mut bytes).map_err(|e| ProvisionError::Certificate(format!("no randomness: {e}")))?;
    bytes[0] &= 0x7f; // a positive INTEGER
    Ok(SerialNumber::from_slice(&bytes))
}

fn named(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::CommonName, common_name);
    name
}

fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = named(CA_NAME);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    params
}

/// The CA's signing half: its key and a certificate object with its name and key (the same
/// issuer, to every verifier, as the `ca.pem` written when it was created).
struct Authority {
    cert: Certificate,
    key: KeyPair,
    /// `ca.pem` as written when the CA was created.
    pem: String,
}

fn authority(kit: &Kit, done: &mut Provisioned) -> Result<Authority, ProvisionError> {
    let (cert_path, key_path) = (kit.ca_cert(), kit.ca_key());
    if pair_exists(&cert_path, &key_path)? {
        let key = read_key(&key_path)?;
        let cert = ca_params().self_signed(&key).map_err(cert_error)?;
        let pem = crate::files::read_kit_text(&cert_path)?;
        return Ok(Authority { cert, key, pem });
    }
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = ca_params();
    params.serial_number = Some(random_serial()?);
    let cert = params.self_signed(&key).map_err(cert_error)?;
    write_secret(&key_path, key.serialize_pem().as_bytes())?;
    write_public(&cert_path, cert.pem().as_bytes())?;
    done.new_ca = true;
    let pem = cert.pem();
    Ok(Authority { cert, key, pem })
}

fn issue(
    ca: &Authority,
    params: CertificateParams,
    cert_path: &Path,
    key_path: &Path,
    chain: bool,
) -> Result<(), ProvisionError> {
    let key = KeyPair::generate().map_err(cert_error)?;
    let mut params = params;
    params.serial_number = Some(random_serial()?);
    params.use_authority_key_identifier_extension = true;
    let cert = params.signed_by(&key, &ca.cert, &ca.key).map_err(cert_error)?;
    let mut pem = cert.pem();
    if chain {
        pem.push_str(&ca.pem);
    }
    write_secret(key_path, key.serialize_pem().as_bytes())?;
    write_public(cert_path, pem.as_bytes())
}

fn server_cert(kit: &Kit, ca: &Authority, names: &[String], done: &mut Provisioned) -> Result<(), ProvisionError> {
    let listed = names.join("\n") + "\n";
    let (cert_path, key_path) = (kit.server_cert(), kit.server_key());
    let same_names = crate::files::read_kit_text(&kit.server_names()).is_ok_and(|n| n == listed);
    if pair_exists(&cert_path, &key_path)? && same_names && !done.new_ca {
        return Ok(());
    }
    if let Some(bad) = names.iter().find(|n| !identity::is_certificate_name(n)) {
        return Err(ProvisionError::Certificate(format!(
            "server name `{bad}` is neither a DNS name nor an IP address"
        )));
    }
    let mut params = CertificateParams::new(names.to_vec()).map_err(|e| {
        ProvisionError::Certificate(format!("server names {names:?}: each must be a DNS name or an IP address ({e})"))
    })?;
    params.distinguished_name = named("mmpg cloud");
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    issue(ca, params, &cert_path, &key_path, true)?;
    write_public(&kit.server_names(), listed.as_bytes())?;
    done.new_server_cert = true;
    Ok(())
}

fn signing_key(kit: &Kit, done: &mut Provisioned) -> Result<CloudSigner, ProvisionError> {
    let path = kit.signing_key();
    // Devices hold the public half: a new key would make them refuse every reply.
    if !path.exists() && kit.signing_public().exists() {
        return Err(ProvisionError::Incomplete { present: kit.signing_public(), missing: path });
    }
    let signer = if path.exists() {
        CloudSigner::read(&path)?
    } else {
        let signer = CloudSigner::generate()?;
        write_secret(&path, signer.to_pem()?.as_bytes())?;
        done.new_signing_key = true;
        signer
    };
    write_public(&kit.signing_public(), signer.public().to_pem()?.as_bytes())?;
    Ok(signer)
}

fn device_cert(kit: &Kit, ca: &Authority, device: &str, fresh_ca: bool) -> Result<bool, ProvisionError> {
    let dir = DeviceKit::new(&kit.device_dir(device));
    let created = if pair_exists(&dir.cert(), &dir.key())? && !fresh_ca {
        false
    } else {
        let uri = identity::device_uri(device);
        let mut params = CertificateParams::default();
        params.distinguished_name = named(device);
        params.subject_alt_names = vec![SanType::URI(uri.try_into().map_err(cert_error)?)];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        issue(ca, params, &dir.cert(), &dir.key(), false)?;
        true
    };
    // What the device trusts is copied into its kit every time, so it follows the cloud's.
    let ca_pem = crate::files::read_kit_text(&kit.ca_cert())?.into_bytes();
    write_public(&dir.ca(), &ca_pem)?;
    let public = crate::files::read_kit_text(&kit.signing_public())?.into_bytes();
    write_public(&dir.signing_public(), &public)?;
    Ok(created)
}

/// Provisions `devices` and the cloud (certificates for `server_names`: DNS names or IP
/// addresses) into `kit`, keeping everything that exists.
///
/// # Errors
/// [`ProvisionError`] naming the file or the name that stopped it; what was written before
/// stays (a re-run completes it).
pub fn provision(kit: &Kit, server_names: &[String], devices: &[String]) -> Result<Provisioned, ProvisionError> {
    let mut done = Provisioned::default();
    let audit = AuditLog::open(&kit.audit()).map_err(io(&kit.audit()))?;
    let ca = authority(kit, &mut done)?;
    server_cert(kit, &ca, server_names, &mut done)?;
    let signer = signing_key(kit, &mut done)?;
    let made = [
        (done.new_ca, "CA created".to_string()),
        (done.new_server_cert, format!("server certificate issued for {}", server_names.join(", "))),
        (done.new_signing_key, format!("signing key created (public {})", signer.public().fingerprint())),
    ];
    for (_, what) in made.iter().filter(|(new, _)| *new) {
        audit.record(&AuditEvent::now("provisioned", None, what.as_str(), None)).map_err(io(&kit.audit()))?;
    }
    for device in devices {
        // A new CA invalidates every device certificate signed by an old one.
        if device_cert(kit, &ca, device, done.new_ca)? {
            let event = AuditEvent::now("provisioned", Some(device), "client certificate issued", None);
            audit.record(&event).map_err(io(&kit.audit()))?;
            done.created.push(device.clone());
        } else {
            done.kept.push(device.clone());
        }
    }
    Ok(done)
}

/// Adds `device` to the kit's revocation list (a running cloud reads it on its next request).
/// Returns `false` when it was already revoked.
///
/// # Errors
/// [`ProvisionError::UnknownDevice`] for a device without a certificate in the kit;
/// [`ProvisionError::Io`].
pub fn revoke(kit: &Kit, device: &str) -> Result<bool, ProvisionError> {
    if !DeviceKit::new(&kit.device_dir(device)).cert().exists() {
        return Err(ProvisionError::UnknownDevice { device: device.into(), kit: kit.root.clone() });
    }
    let path = kit.revoked();
    if revocation::read(&path)?.contains(device) {
        return Ok(false);
    }
    // `read` above took the whole file, so what is appended to is a valid list.
    let mut text = match crate::files::read_text(&path, revocation::MAX_LIST, crate::files::Links::Refuse) {
        Ok(text) => text,
        Err(e) if e.is_not_found() => "# revoked devices, one per line\n".into(),
        Err(e) => return Err(e.into()),
    };
    if !text.ends_with('\n') {
        text.push('\n');
    }
    text.push_str(&revocation::line(device));
    text.push('\n');
    // Written whole and renamed into place, so the cloud never reads half a list.
    let temp = path.with_extension("tmp");
    std::fs::write(&temp, text).map_err(io(&temp))?;
    std::fs::rename(&temp, &path).map_err(io(&path))?;
    let audit = AuditLog::open(&kit.audit()).map_err(io(&kit.audit()))?;
    audit
        .record(&AuditEvent::now("revoked", Some(device), "revoked by the operator", None))
        .map_err(io(&kit.audit()))?;
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names() -> Vec<String> {
        vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
    }

    #[test]
    fn a_second_run_adds_devices_without_re_keying_the_others() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kit = Kit::new(dir.path());
        let first = provision(&kit, &names(), &["a".into(), "b/c".into()]).expect("provisions");
        assert!(first.new_ca && first.new_server_cert && first.new_signing_key);
        assert_eq!(first.created, ["a", "b/c"]);
        let a_key = std::fs::read(DeviceKit::new(&kit.device_dir("a")).key()).expect("key");
        let ca = std::fs::read(kit.ca_cert()).expect("ca");
        let signing = std::fs::read(kit.signing_key()).expect("signing key");
        let second = provision(&kit, &names(), &["a".into(), "b/c".into(), "d".into()]).expect("provisions");
        assert!(!second.new_ca && !second.new_server_cert && !second.new_signing_key);
        assert_eq!(second.created, ["d"]);
        assert_eq!(second.kept, ["a", "b/c"]);
        assert_eq!(std::fs::read(DeviceKit::new(&kit.device_dir("a")).key()).expect("key"), a_key);
        assert_eq!(std::fs::read(kit.ca_cert()).expect("ca"), ca);
        assert_eq!(std::fs::read(kit.signing_key()).expect("signing key"), signing);
        assert!(kit.root().join("devices").join("b%2Fc").join("cert.pem").exists());
        let events = AuditLog::read(&kit.audit()).expect("audit");
        let provisioned =
            |device: bool| events.iter().filter(move |e| e.event == "provisioned" && e.device.is_some() == device);
        assert_eq!((provisioned(true).count(), provisioned(false).count()), (3, 3), "{events:?}");
    }

    #[cfg(unix)]
    #[test]
    fn private_keys_are_readable_by_their_owner_only() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().expect("temp dir");
        let kit = Kit::new(dir.path());
        provision(&kit, &names(), &["a".into()]).expect("provisions");
        let device = DeviceKit::new(&kit.device_dir("a"));
        for key in [kit.ca_key(), kit.server_key(), kit.signing_key(), device.key()] {
            let mode = std::fs::metadata(&key).expect("exists").permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{}", key.display());
        }
        for public in [kit.ca_cert(), device.cert(), device.ca(), device.signing_public()] {
            assert!(public.exists(), "{}", public.display());
        }
    }

    #[test]
    fn changed_server_names_reissue_only_the_server_certificate() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kit = Kit::new(dir.path());
        provision(&kit, &names(), &["a".into()]).expect("provisions");
        let again = provision(&kit, &["cloud.example".into()], &["a".into()]).expect("provisions");
        assert!(again.new_server_cert && !again.new_ca && again.created.is_empty());
        let bad = provision(&kit, &["not a name!".into()], &[]);
        assert!(matches!(bad, Err(ProvisionError::Certificate(_))), "{bad:?}");
    }

    #[test]
    fn a_damaged_kit_is_refused_not_re_keyed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kit = Kit::new(dir.path());
        provision(&kit, &names(), &["a".into()]).expect("provisions");
        std::fs::remove_file(kit.ca_key()).expect("removed");
        let err = provision(&kit, &names(), &["a".into()]).expect_err("refused");
        assert!(matches!(err, ProvisionError::Incomplete { .. }), "{err}");
    }

    #[test]
    fn revoking_is_recorded_once_and_unknown_devices_are_refused() {
        let dir = tempfile::tempdir().expect("temp dir");
        let kit = Kit::new(dir.path());
        provision(&kit, &names(), &["a".into()]).expect("provisions");
        assert!(revoke(&kit, "a").expect("revokes"));
        assert!(!revoke(&kit, "a").expect("already"));
        assert!(matches!(revoke(&kit, "zz"), Err(ProvisionError::UnknownDevice { .. })));
        assert!(super::super::Revocations::watch(&kit.revoked()).is_revoked("a"));
        let events = AuditLog::read(&kit.audit()).expect("audit");
        assert_eq!(events.iter().filter(|e| e.event == "revoked").count(), 1);
    }
}
