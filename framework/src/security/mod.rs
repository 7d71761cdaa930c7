//! Identity and integrity of a deployment: who may talk to the cloud, and whether what a
//! device installs came from it.
//!
//! - [`provision`]: the deployment's keys and certificates (a CA, the cloud's server
//!   certificate, one client certificate per device whose identity is the device id, the cloud's
//!   Ed25519 signing key), written once and extended without re-keying; revocation.
//! - [`identity`]: how a device id is written into a certificate (a SPIFFE-style URI) and a file
//!   name, and read back.
//! - [`signing`]: Ed25519 signatures (ed25519-dalek, verified with `verify_strict`).
//! - [`revocation`]: the revocation list the cloud re-reads when it changes.
//! - [`freshness`]: the last request sequence accepted from each device, kept across restarts.
//! - [`guard`]: the cloud's gate: identity, revocation, impersonation, per-device rate.
//! - [`audit`]: the append-only JSON-lines audit log.

pub mod audit;
pub mod freshness;
pub mod guard;
pub mod identity;
pub mod provision;
pub mod revocation;
pub mod signing;

pub use audit::{AuditEvent, AuditLog};
pub use freshness::{LedgerError, SequenceLedger};
pub use guard::{Denial, Guard};
pub use provision::{DeviceKit, Kit, ProvisionError, Provisioned, provision, revoke};
pub use revocation::Revocations;
pub use signing::{CloudKey, CloudSigner, SignatureError};
