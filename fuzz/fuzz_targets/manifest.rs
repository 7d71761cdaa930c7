//! A bundle manifest and its signature as a device receives them, holding the cloud's key: the
//! signature is checked before the manifest is parsed. The first 64 bytes are the signature, the
//! rest the manifest. Nothing this harness did not sign may pass; what it signs must parse exactly
//! as an unsigned manifest does, and no byte of it may change unnoticed.
#![no_main]

#[path = "shared_signer.rs"]
mod shared_signer;

use libfuzzer_sys::fuzz_target;
use mmpg::bundle::{Bundle, BundleError};
use mmpg::security::signing::Purpose;
use shared_signer::signer;

fuzz_target!(|bytes: &[u8]| {
    let key = signer().public();
    let (signature, manifest) = bytes.split_at(bytes.len().min(64));
    assert!(matches!(Bundle::check_manifest(manifest, Some(signature), Some(&key)), Err(BundleError::Signature(_))));
    assert!(matches!(Bundle::check_manifest(manifest, None, Some(&key)), Err(BundleError::Unsigned)));
    let signed = signer().sign(Purpose::Manifest, manifest);
    let checked = Bundle::check_manifest(manifest, Some(&signed), Some(&key)).map_err(|e| e.to_string());
    let plain = Bundle::parse_manifest(manifest).map_err(|e| e.to_string());
    assert_eq!(checked, plain);
    if let Some(i) = manifest.first().map(|b| usize::from(*b) % manifest.len()) {
        let mut altered = manifest.to_vec();
        altered[i] ^= 0x01;
        assert!(matches!(Bundle::check_manifest(&altered, Some(&signed), Some(&key)), Err(BundleError::Signature(_))));
    }
});
