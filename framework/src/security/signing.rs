//! Ed25519 signatures over what the cloud sends (ed25519-dalek).
//!
//! Every signature covers a purpose label and the message's BLAKE3 hash (`purpose || 0x00 ||
//! blake3(message)`), so a signature made for one purpose (a params envelope) never verifies for
//! another (a bundle manifest). Verification is `verify_strict`: no small-order keys, no malleable
//! signatures.

use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::spki::der::pem::LineEnding;
use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey, EncodePublicKey};
use ed25519_dalek::{Signature, Signer as _, SigningKey, VerifyingKey};

/// Bytes in a signature.
pub const SIGNATURE_LEN: usize = ed25519_dalek::SIGNATURE_LENGTH;

/// What a signature is for: part of every signed message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    /// A params envelope (header and payload).
    Params,
    /// A bundle's manifest.
    Manifest,
}

impl Purpose {
    fn label(self) -> &'static [u8] {
        match self {
            Purpose::Params => b"mmpg params v2",
            Purpose::Manifest => b"mmpg bundle manifest v2",
        }
    }

    /// What is signed: the label, a zero byte and the BLAKE3 hash of the bytes. Hashing once with
    /// BLAKE3 (SIMD, several GB/s) instead of letting Ed25519 run SHA-512 twice over a 37 KB
    /// parameters envelope keeps signing off the cloud's critical path: SHA-256 took 32 µs of the
    /// 52 µs a reply cost to sign under load (perf, this 2-core machine).
    fn message(self, bytes: &[u8]) -> Vec<u8> {
        let label = self.label();
        let mut out = Vec::with_capacity(label.len() + 1 + blake3::OUT_LEN);
        out.extend_from_slice(label);
        out.push(0);
        out.extend_from_slice(blake3::hash(bytes).as_bytes());
        out
    }
}

/// Why a key could not be used or a signature was refused.
#[derive(Debug, thiserror::Error)]
pub enum SignatureError {
    /// A key file could not be read or written.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        error: std::io::Error,
    },
    /// A key is not a valid Ed25519 key in PEM (PKCS#8 private, SPKI public).
    #[error("{what}: not an Ed25519 key in PEM: {message}")]
    Key {
        /// The key's file, or what it is.
        what: String,
        /// The decoder's words.
        message: String,
    },
    /// The system's random source failed.
    #[error("no randomness for a key: {0}")]
    Random(String),
    /// A signature of the wrong length.
    #[error("a signature is {SIGNATURE_LEN} bytes, found {0}")]
    Length(usize),
    /// The signature does not verify: the bytes were altered, or another key signed them.
    #[error("the signature does not verify with the cloud's key")]
    Invalid,
}

fn read(path: &Path) -> Result<String, SignatureError> {
    crate::files::read_kit_text(path).map_err(|e| {
        let error = match e {
            crate::files::FileError::Io { error, .. } => error,
            crate::files::FileError::NotFound { .. } => std::io::ErrorKind::NotFound.into(),
            other => std::io::Error::other(other.to_string()),
        };
        SignatureError::Io { path: path.to_path_buf(), error }
    })
}

/// The cloud's signing key (secret).
pub struct CloudSigner {
    key: SigningKey,
}

impl std::fmt::Debug for CloudSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CloudSigner").field("public", &self.public().fingerprint()).finish_non_exhaustive()
    }
}

impl CloudSigner {
    /// A new key from the operating system's random source.
    ///
    /// # Errors
    /// [`SignatureError::Random`].
    pub fn generate() -> Result<Self, SignatureError> {
        let mut secret = [0u8; ed25519_dalek::SECRET_KEY_LENGTH];
        getrandom::getrandom(&mut secret).map_err(|e| SignatureError::Random(e.to_string()))?;
        Ok(Self { key: SigningKey::from_bytes(&secret) })
    }

    /// The key in a PKCS#8 PEM file.
    ///
    /// # Errors
    /// [`SignatureError::Io`], [`SignatureError::Key`] naming the file.
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        Self::from_pem(&read(path)?, &path.display().to_string())
    }

    /// The key in PKCS#8 PEM text; `what` names it in errors.
    ///
    /// # Errors
    /// [`SignatureError::Key`].
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, SignatureError> {
        SigningKey::from_pkcs8_pem(pem)
            .map(|key| Self { key })
            .map_err(|e| SignatureError::Key { what: what.to_string(), message: e.to_string() })
    }

    /// The key as PKCS#8 PEM (write it with mode 0600).
    ///
    /// # Errors
    /// [`SignatureError::Key`] if it cannot be encoded.
    pub fn to_pem(&self) -> Result<String, SignatureError> {
        self.key
            .to_pkcs8_pem(LineEnding::LF)
            .map(|pem| pem.to_string())
            .map_err(|e| SignatureError::Key { what: "signing key".into(), message: e.to_string() })
    }

    /// Its public half, what devices verify with.
    pub fn public(&self) -> CloudKey {
        CloudKey(self.key.verifying_key())
    }

    /// Signs `bytes` for `purpose`: 64 bytes.
    pub fn sign(&self, purpose: Purpose, bytes: &[u8]) -> [u8; SIGNATURE_LEN] {
        self.key.sign(&purpose.message(bytes)).to_bytes()
    }
}

/// The cloud's public key, as devices hold it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CloudKey(VerifyingKey);

impl CloudKey {
    /// The key in an SPKI PEM file.
    ///
    /// # Errors
    /// [`SignatureError::Io`], [`SignatureError::Key`] naming the file.
    pub fn read(path: &Path) -> Result<Self, SignatureError> {
        Self::from_pem(&read(path)?, &path.display().to_string())
    }

    /// The key in SPKI PEM text; `what` names it in errors.
    ///
    /// # Errors
    /// [`SignatureError::Key`].
    pub fn from_pem(pem: &str, what: &str) -> Result<Self, SignatureError> {
        VerifyingKey::from_public_key_pem(pem)
            .map(Self)
            .map_err(|e| SignatureError::Key { what: what.to_string(), message: e.to_string() })
    }

    /// The key as SPKI PEM.
    ///
    /// # Errors
    /// [`SignatureError::Key`] if it cannot be encoded.
    pub fn to_pem(&self) -> Result<String, SignatureError> {
        self.0
            .to_public_key_pem(LineEnding::LF)
            .map_err(|e| SignatureError::Key { what: "public key".into(), message: e.to_string() })
    }

    /// Hex sha256 of the raw 32-byte key: how people compare keys.
    pub fn fingerprint(&self) -> String {
        crate::bundle::sha256_hex(self.0.as_bytes())
    }

    /// Checks that `signature` is the cloud's over `bytes` for `purpose` (`verify_strict`).
    ///
    /// # Errors
    /// [`SignatureError::Length`], [`SignatureError::Invalid`].
    pub fn verify(&self, purpose: Purpose, bytes: &[u8], signature: &[u8]) -> Result<(), SignatureError> {
        let signature: [u8; SIGNATURE_LEN] =
            signature.try_into().map_err(|_| SignatureError::Length(signature.len()))?;
        self.0
            .verify_strict(&purpose.message(bytes), &Signature::from_bytes(&signature))
            .map_err(|_| SignatureError::Invalid)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn keys_round_trip_through_pem() {
        let signer = CloudSigner::generate().expect("random");
        let again = CloudSigner::from_pem(&signer.to_pem().expect("pem"), "k").expect("parses");
        assert_eq!(again.public(), signer.public());
        let public = signer.public().to_pem().expect("pem");
        assert_eq!(CloudKey::from_pem(&public, "k").expect("parses"), signer.public());
        assert!(matches!(CloudKey::from_pem("not a key", "k"), Err(SignatureError::Key { .. })));
    }

    #[test]
    fn a_signature_is_bound_to_its_purpose_and_key() {
        let signer = CloudSigner::generate().expect("random");
        let other = CloudSigner::generate().expect("random");
        let sig = signer.sign(Purpose::Params, b"bytes");
        assert!(signer.public().verify(Purpose::Params, b"bytes", &sig).is_ok());
        assert!(matches!(signer.public().verify(Purpose::Manifest, b"bytes", &sig), Err(SignatureError::Invalid)));
        assert!(matches!(other.public().verify(Purpose::Params, b"bytes", &sig), Err(SignatureError::Invalid)));
        assert!(matches!(
            signer.public().verify(Purpose::Params, b"bytes", &sig[..10]),
            Err(SignatureError::Length(10))
        ));
    }

    proptest! {
        #[test]
        fn any_flipped_bit_fails_verification(bytes in proptest::collection::vec(any::<u8>(), 1..256), bit in any::<usize>(), in_signature in any::<bool>()) {
            let signer = CloudSigner::generate().expect("random");
            let mut sig = signer.sign(Purpose::Params, &bytes).to_vec();
            let mut message = bytes.clone();
            if in_signature {
                let i = bit % (sig.len() * 8);
                sig[i / 8] ^= 1 << (i % 8);
            } else {
                let i = bit % (message.len() * 8);
                message[i / 8] ^= 1 << (i % 8);
            }
            prop_assert!(signer.public().verify(Purpose::Params, &message, &sig).is_err());
        }
    }
}
