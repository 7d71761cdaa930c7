//! A device bundle: what a device needs to start, and nothing of the cloud's training state.
//!
//! A folder (or the same files fetched over HTTP) holding
//! - `model.safetensors`: the trained device model (static weights, base slot values θ0),
//!   as its model plugin saves it;
//! - `reference.safetensors`: the source feature statistics summaries are standardised with;
//! - `schema.json`: the slot schema the cloud generates for;
//! - `manifest.json`: format and mmpg versions, the model and anchor plugins with their
//!   settings, the schema hash, the training fingerprint and the sha256 of every other file;
//! - `manifest.sig` (under `[security]`): the cloud's Ed25519 signature over the manifest's bytes
//!   ([`Purpose::Manifest`]), so the hashes, and through them every file, are the cloud's.
//!
//! Every byte is checked on the way in: a device holding the cloud's key checks the signature
//! before it parses the manifest; a file whose hash differs from the manifest's is refused with
//! its name, and so is a manifest naming any other file.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::anchor::FeatureStats;
use crate::security::signing::{Purpose, SIGNATURE_LEN};
use crate::security::{CloudKey, CloudSigner};
use crate::slots::{SchemaHash, SlotSchema};
use crate::tensor::HostTensor;

/// Bundle format this build writes and reads.
pub const BUNDLE_FORMAT: u32 = 1;
/// The manifest's file name.
pub const MANIFEST: &str = "manifest.json";
/// The device model's weights.
pub const MODEL: &str = "model.safetensors";
/// The reference statistics.
pub const REFERENCE: &str = "reference.safetensors";
/// The slot schema.
pub const SCHEMA: &str = "schema.json";
/// The cloud's signature over the manifest's bytes (64 raw bytes).
pub const SIGNATURE: &str = "manifest.sig";
/// Every file a manifest lists, in order. No other name is accepted.
pub const FILES: [&str; 3] = [MODEL, REFERENCE, SCHEMA];
/// Largest manifest accepted, in bytes.
pub const MAX_MANIFEST: usize = 1 << 20;
/// Largest file of a bundle other than its manifest, in bytes: what one reply of the wire may
/// carry, so a bundle that can be served can be read, and nothing larger is ever allocated.
pub const MAX_FILE: u64 = crate::wire::MAX_PAYLOAD as u64;

/// Why a bundle was refused.
#[derive(Debug, thiserror::Error)]
pub enum BundleError {
    /// A file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A file was refused before it was read (not a regular file, a link out of the bundle's
    /// folder, over its limit).
    #[error(transparent)]
    File(crate::files::FileError),
    /// The manifest is not a valid manifest.
    #[error("{MANIFEST}: {0}")]
    Manifest(String),
    /// Another bundle format.
    #[error("{MANIFEST}: bundle format {0} is not supported (this build reads {BUNDLE_FORMAT})")]
    Format(u32),
    /// A file's bytes are not those the manifest lists.
    #[error("{file}: sha256 {found} does not match the manifest's {expected}")]
    Hash {
        /// The file.
        file: String,
        /// The manifest's hash.
        expected: String,
        /// The file's.
        found: String,
    },
    /// A file the manifest requires is absent, or the manifest does not list one.
    #[error("{0}: missing from the bundle")]
    Missing(String),
    /// The manifest lists a file this format does not have.
    #[error("{MANIFEST}: unexpected file `{0}`")]
    Unexpected(String),
    /// The device holds the cloud's key and the bundle has no signature.
    #[error("{SIGNATURE}: missing; a device holding the cloud's key accepts only a bundle the cloud signed")]
    Unsigned,
    /// The manifest's signature does not verify with the cloud's key.
    #[error("{SIGNATURE}: {0}")]
    Signature(String),
    /// A file's content is not what its name says.
    #[error("{file}: {message}")]
    Content {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
}

/// A plugin and its settings, as the bundle records them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PluginEntry {
    /// Registered name.
    pub plugin: String,
    /// Its settings, as given in the deployment.
    pub settings: toml::Table,
}

/// What a bundle holds and how to check it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// [`BUNDLE_FORMAT`] of the writer.
    pub format: u32,
    /// mmpg version of the writer.
    pub mmpg_version: String,
    /// Wire version the cloud speaks.
    pub wire_version: u8,
    /// The model plugin that reads `model.safetensors`.
    pub model: PluginEntry,
    /// The anchor reasoner devices run.
    pub anchor: PluginEntry,
    /// Hash of the slot schema (hex).
    pub schema_hash: String,
    /// Fingerprint of the cloud training that produced the model.
    pub training: String,
    /// sha256 (hex) of every file.
    pub files: BTreeMap<String, String>,
}

/// A verified bundle, in memory.
#[derive(Debug, Clone)]
pub struct Bundle {
    /// Its manifest.
    pub manifest: Manifest,
    /// The manifest's bytes as signed and as written: saved again byte for byte, so that a saved
    /// bundle's signature still verifies.
    manifest_bytes: Vec<u8>,
    /// The cloud's signature over `manifest_bytes`, when it signed.
    signature: Option<[u8; SIGNATURE_LEN]>,
    /// `model.safetensors`.
    pub model: Vec<u8>,
    /// The reference statistics.
    pub reference: FeatureStats,
    /// The slot schema.
    pub schema: SlotSchema,
}

/// The sha256 of `bytes` as 64 lowercase hex digits, as manifests list them.
pub fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

fn content(file: &str, message: impl std::fmt::Display) -> BundleError {
    BundleError::Content { file: file.into(), message: message.to_string() }
}

impl Bundle {
    /// A bundle of a trained model: its checkpoint bytes, reference statistics and schema.
    pub fn new(
        model: Vec<u8>,
        reference: FeatureStats,
        schema: SlotSchema,
        plugins: (PluginEntry, PluginEntry),
        training: String,
    ) -> Self {
        let manifest = Manifest {
            format: BUNDLE_FORMAT,
            mmpg_version: crate::abi::MMPG_VERSION.into(),
            wire_version: crate::wire::WIRE_VERSION,
            model: plugins.0,
            anchor: plugins.1,
            schema_hash: schema.hash().to_string(),
            training,
            files: BTreeMap::new(),
        };
        let mut bundle = Self { manifest, manifest_bytes: Vec::new(), signature: None, model, reference, schema };
        bundle.manifest.files =
            bundle.files().iter().map(|(name, bytes)| (name.to_string(), sha256_hex(bytes))).collect();
        bundle.manifest_bytes = serde_json::to_vec_pretty(&bundle.manifest).unwrap_or_default();
        bundle
    }

    /// The bundle signed with the cloud's key ([`Purpose::Manifest`] over the manifest's bytes).
    #[must_use]
    pub fn signed(mut self, signer: &CloudSigner) -> Self {
        self.signature = Some(signer.sign(Purpose::Manifest, &self.manifest_bytes));
        self
    }

    /// The cloud's signature over the manifest, if it signed.
    pub fn signature(&self) -> Option<&[u8; SIGNATURE_LEN]> {
        self.signature.as_ref()
    }

    /// The files other than the manifest, by name.
    pub fn files(&self) -> Vec<(&'static str, Vec<u8>)> {
        let d = self.reference.mean.len();
        let stats: BTreeMap<String, HostTensor> = [("mean", &self.reference.mean), ("std", &self.reference.std)]
            .into_iter()
            .filter_map(|(name, v)| HostTensor::new(vec![d], v.clone()).ok().map(|t| (name.to_string(), t)))
            .collect();
        let schema = serde_json::to_vec_pretty(&self.schema).unwrap_or_default();
        vec![(MODEL, self.model.clone()), (REFERENCE, crate::wire::encode_f32_tensors(&stats, [])), (SCHEMA, schema)]
    }

    /// The manifest's bytes (pretty JSON), as signed.
    pub fn manifest_bytes(&self) -> &[u8] {
        &self.manifest_bytes
    }

    /// The schema hash the manifest states.
    pub fn schema_hash(&self) -> SchemaHash {
        self.schema.hash()
    }

    /// Writes the bundle into `dir` (created if absent): every file, then the manifest last, so
    /// that an interrupted write never looks complete.
    ///
    /// # Errors
    /// [`BundleError::Io`] naming the file.
    pub fn write(&self, dir: &Path) -> Result<(), BundleError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |error| BundleError::Io { path, error }
        };
        if std::fs::symlink_metadata(dir).is_ok_and(|m| m.file_type().is_symlink()) {
            let error = std::io::Error::other("a symbolic link; a bundle is written into a folder of its own");
            return Err(BundleError::Io { path: dir.to_path_buf(), error });
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let manifest = dir.join(MANIFEST);
        let _ = std::fs::remove_file(&manifest);
        // A folder where a file belongs (a damaged copy) is replaced, not an error.
        let clear = |path: &Path| if path.is_dir() { std::fs::remove_dir_all(path).map_err(io(path)) } else { Ok(()) };
        for (name, bytes) in self.files() {
            let path = dir.join(name);
            clear(&path)?;
            crate::files::write_atomically(&path, &bytes).map_err(io(&path))?;
        }
        let signature = dir.join(SIGNATURE);
        clear(&signature)?;
        clear(&manifest)?;
        match &self.signature {
            Some(sig) => crate::files::write_atomically(&signature, sig).map_err(io(&signature))?,
            None => match std::fs::remove_file(&signature) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&signature)(e)),
                _ => {}
            },
        }
        crate::files::write_atomically(&manifest, &self.manifest_bytes).map_err(io(&manifest))
    }

    /// Reads and verifies the bundle in `dir`; with the cloud's `key`, only a bundle it signed.
    ///
    /// # Errors
    /// As [`Bundle::from_parts`], and [`BundleError::File`] for a file refused before reading
    /// ([`crate::files::read`]: not a regular file, a link out of the folder, over [`MAX_FILE`]).
    pub fn open(dir: &Path, key: Option<&CloudKey>) -> Result<Self, BundleError> {
        // Links are allowed only inside the bundle's folder: a `model.safetensors` pointing at
        // `/dev/zero` or another folder's file is refused before a byte is read.
        let read = |name: &str, limit: u64| {
            crate::files::read(&dir.join(name), limit, crate::files::Links::Within(dir)).map_err(|e| match e {
                crate::files::FileError::NotFound { path } => BundleError::Missing(path.display().to_string()),
                e => BundleError::File(e),
            })
        };
        let manifest = read(MANIFEST, MAX_MANIFEST as u64)?;
        let signature = match read(SIGNATURE, SIGNATURE_LEN as u64) {
            Ok(sig) => Some(sig),
            Err(BundleError::Missing(_)) => None,
            Err(e) => return Err(e),
        };
        let files = FILES.iter().map(|name| Ok((name.to_string(), read(name, MAX_FILE)?))).collect::<Result<_, _>>()?;
        Self::from_parts(&manifest, signature.as_deref(), key, files)
    }

    /// A bundle from untrusted bytes: the manifest as [`Bundle::check_manifest`] reads it, then
    /// every file against it.
    ///
    /// # Errors
    /// As [`Bundle::check_manifest`] and [`Bundle::verify`].
    pub fn from_parts(
        manifest: &[u8],
        signature: Option<&[u8]>,
        key: Option<&CloudKey>,
        files: BTreeMap<String, Vec<u8>>,
    ) -> Result<Self, BundleError> {
        let mut bundle = Self::verify(Self::check_manifest(manifest, signature, key)?, files)?;
        bundle.manifest_bytes = manifest.to_vec();
        // Without the cloud's key a signature cannot be checked; it is kept (saved with the
        // bundle), never trusted.
        bundle.signature = signature.and_then(|s| s.try_into().ok());
        Ok(bundle)
    }

    /// A manifest from untrusted bytes: with the cloud's `key` its signature is checked first,
    /// before the bytes are parsed; then as [`Bundle::parse_manifest`].
    ///
    /// # Errors
    /// [`BundleError::Unsigned`] (a key and no signature), [`BundleError::Signature`], then as
    /// [`Bundle::parse_manifest`].
    pub fn check_manifest(
        manifest: &[u8],
        signature: Option<&[u8]>,
        key: Option<&CloudKey>,
    ) -> Result<Manifest, BundleError> {
        if let Some(key) = key {
            let signature = signature.ok_or(BundleError::Unsigned)?;
            key.verify(Purpose::Manifest, manifest, signature).map_err(|e| BundleError::Signature(e.to_string()))?;
        }
        Self::parse_manifest(manifest)
    }

    /// Parses a manifest from untrusted bytes and checks its format and file list.
    ///
    /// # Errors
    /// [`BundleError::Manifest`], [`BundleError::Format`], [`BundleError::Unexpected`],
    /// [`BundleError::Missing`].
    pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, BundleError> {
        if bytes.len() > MAX_MANIFEST {
            return Err(BundleError::Manifest(format!("{} bytes, over the {MAX_MANIFEST}-byte limit", bytes.len())));
        }
        // The format is read first, so that a newer manifest is refused for its version and not
        // for a field this build does not know.
        #[derive(Deserialize)]
        struct Version {
            format: u32,
        }
        let version: Version = serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if version.format != BUNDLE_FORMAT {
            return Err(BundleError::Format(version.format));
        }
        let manifest: Manifest = serde_json::from_slice(bytes).map_err(|e| BundleError::Manifest(e.to_string()))?;
        if let Some(name) = manifest.files.keys().find(|n| !FILES.contains(&n.as_str())) {
            return Err(BundleError::Unexpected(name.clone()));
        }
        if let Some(name) = FILES.iter().find(|n| !manifest.files.contains_key(**n)) {
            return Err(BundleError::Missing((*name).into()));
        }
        Ok(manifest)
    }

    /// Checks `files` (by name) against `manifest` and decodes them.
    ///
    /// # Errors
    /// [`BundleError::Hash`] naming the first file whose bytes differ, [`BundleError::Missing`],
    /// [`BundleError::Content`] for a file that does not decode or a schema whose hash is not
    /// the manifest's.
    pub fn verify(manifest: Manifest, mut files: BTreeMap<String, Vec<u8>>) -> Result<Self, BundleError> {
        for name in FILES {
            let bytes = files.get(name).ok_or_else(|| BundleError::Missing(name.into()))?;
            let expected = manifest.files.get(name).ok_or_else(|| BundleError::Missing(name.into()))?;
            let found = sha256_hex(bytes);
            if &found != expected {
                return Err(BundleError::Hash { file: name.into(), expected: expected.clone(), found });
            }
        }
        let mut take = |name: &str| files.remove(name).unwrap_or_default();
        let schema: SlotSchema = serde_json::from_slice(&take(SCHEMA)).map_err(|e| content(SCHEMA, e))?;
        if schema.hash().to_string() != manifest.schema_hash {
            return Err(content(
                SCHEMA,
                format!("hash {} is not the manifest's {}", schema.hash(), manifest.schema_hash),
            ));
        }
        let mut stats = crate::wire::decode_f32_tensors(&take(REFERENCE)).map_err(|e| content(REFERENCE, e))?;
        let mut stat = |name: &str| {
            let t = stats.remove(name).ok_or_else(|| content(REFERENCE, format!("`{name}` is missing")))?;
            if t.shape().len() != 1 || !t.is_finite() {
                return Err(content(REFERENCE, format!("`{name}` is not a finite vector")));
            }
            Ok(t.values().to_vec())
        };
        let reference = FeatureStats { mean: stat("mean")?, std: stat("std")? };
        if reference.mean.len() != reference.std.len() || reference.std.iter().any(|s| *s <= 0.0) {
            return Err(content(REFERENCE, "mean and std differ in length, or a std is not positive"));
        }
        let manifest_bytes = serde_json::to_vec_pretty(&manifest).unwrap_or_default();
        Ok(Self { model: take(MODEL), manifest, manifest_bytes, signature: None, reference, schema })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SlotSpec;

    fn bundle() -> Bundle {
        let schema = SlotSchema::new(vec![SlotSpec::f32("w", vec![2])]).expect("schema");
        let entry = |p: &str| PluginEntry { plugin: p.into(), settings: toml::Table::new() };
        Bundle::new(
            vec![1, 2, 3],
            FeatureStats { mean: vec![0.0, 1.0], std: vec![1.0, 2.0] },
            schema,
            (entry("lmm"), entry("adr")),
            "abc".into(),
        )
    }

    #[test]
    fn a_written_bundle_opens_as_it_was() {
        let dir = tempfile::tempdir().expect("tempdir");
        let original = bundle();
        original.write(dir.path()).expect("written");
        let opened = Bundle::open(dir.path(), None).expect("opens");
        assert_eq!(opened.manifest, original.manifest);
        assert_eq!(
            (opened.model, opened.reference, opened.schema),
            (original.model, original.reference, original.schema)
        );
    }

    #[test]
    fn a_changed_file_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("tempdir");
        bundle().write(dir.path()).expect("written");
        std::fs::write(dir.path().join(MODEL), [1, 2, 4]).expect("tampered");
        let err = Bundle::open(dir.path(), None).expect_err("refused");
        assert!(matches!(&err, BundleError::Hash { file, .. } if file == MODEL), "{err}");
        assert!(err.to_string().starts_with("model.safetensors: sha256"));
    }

    #[test]
    fn a_device_holding_the_key_opens_only_what_the_cloud_signed() {
        let signer = CloudSigner::generate().expect("random");
        let key = signer.public();
        let dir = tempfile::tempdir().expect("tempdir");
        bundle().write(dir.path()).expect("written");
        assert!(matches!(Bundle::open(dir.path(), Some(&key)), Err(BundleError::Unsigned)));
        let signed = bundle().signed(&signer);
        signed.write(dir.path()).expect("written");
        let opened = Bundle::open(dir.path(), Some(&key)).expect("signed bundle opens");
        assert_eq!(opened.signature(), signed.signature());
        // Saved again (as a device saves what it fetched), it still verifies.
        let again = tempfile::tempdir().expect("tempdir");
        opened.write(again.path()).expect("written");
        Bundle::open(again.path(), Some(&key)).expect("the saved copy verifies");
        // Another key, and one changed byte of the manifest, are refused before parsing.
        let other = CloudSigner::generate().expect("random").public();
        assert!(matches!(Bundle::open(dir.path(), Some(&other)), Err(BundleError::Signature(_))));
        let path = dir.path().join(MANIFEST);
        let mut manifest = std::fs::read(&path).expect("manifest");
        let at = manifest.iter().position(|b| *b == b'"').expect("a string");
        manifest.insert(at, b' ');
        std::fs::write(&path, manifest).expect("altered");
        let err = Bundle::open(dir.path(), Some(&key)).expect_err("refused");
        assert!(matches!(err, BundleError::Signature(_)), "{err}");
        assert!(err.to_string().starts_with("manifest.sig: "), "{err}");
    }

    /// Issue 28's example: a bundle whose model is a link to `/dev/zero` made a device read until
    /// it was out of memory.
    #[test]
    fn a_file_that_is_a_device_a_fifo_or_a_link_out_of_the_bundle_is_refused_before_reading() {
        let dir = tempfile::tempdir().expect("tempdir");
        bundle().write(dir.path()).expect("written");
        let model = dir.path().join(MODEL);
        std::fs::remove_file(&model).expect("removed");
        std::os::unix::fs::symlink("/dev/zero", &model).expect("linked");
        let err = Bundle::open(dir.path(), None).expect_err("refused");
        assert!(matches!(err, BundleError::File(crate::files::FileError::Link { .. })), "{err}");
        std::fs::remove_file(&model).expect("removed");
        let made = std::process::Command::new("mkfifo").arg(&model).status().expect("mkfifo runs");
        assert!(made.success());
        let err = Bundle::open(dir.path(), None).expect_err("refused");
        assert!(matches!(err, BundleError::File(crate::files::FileError::NotRegular { .. })), "{err}");
        // A link inside the folder is what the format allows.
        std::fs::remove_file(&model).expect("removed");
        std::fs::write(dir.path().join("blob"), [1, 2, 3]).expect("written");
        std::os::unix::fs::symlink(dir.path().join("blob"), &model).expect("linked");
        Bundle::open(dir.path(), None).expect("a link inside the bundle's folder opens");
        // A signature longer than a signature is not read in full either.
        std::fs::write(dir.path().join(SIGNATURE), vec![0u8; 1 << 16]).expect("written");
        let err = Bundle::open(dir.path(), None).expect_err("refused");
        assert!(matches!(err, BundleError::File(crate::files::FileError::TooLarge { .. })), "{err}");
    }

    #[test]
    fn manifests_naming_other_files_or_formats_are_refused() {
        let mut manifest = bundle().manifest;
        manifest.files.insert("../../etc/passwd".into(), "00".into());
        let bytes = serde_json::to_vec(&manifest).expect("json");
        assert!(matches!(Bundle::parse_manifest(&bytes), Err(BundleError::Unexpected(_))));
        let mut manifest = bundle().manifest;
        manifest.format = 99;
        let bytes = serde_json::to_vec(&manifest).expect("json");
        assert!(matches!(Bundle::parse_manifest(&bytes), Err(BundleError::Format(99))));
        assert!(matches!(Bundle::parse_manifest(b"{"), Err(BundleError::Manifest(_))));
    }
}
