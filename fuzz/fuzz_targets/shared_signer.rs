//! The one signing key a fuzz process signs with (generated once: key generation is not what is
//! under test).

use std::sync::OnceLock;

use mmpg::security::CloudSigner;

pub fn signer() -> &'static CloudSigner {
    static SIGNER: OnceLock<CloudSigner> = OnceLock::new();
    SIGNER.get_or_init(|| CloudSigner::generate().expect("random"))
}
