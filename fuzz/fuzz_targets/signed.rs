//! A signed reply as a device receives it: the framing is read and the signature checked before
//! anything else. Random bytes must never open; a message this harness signs must open to exactly
//! its envelope, and one with any byte changed must not.
#![no_main]

#[path = "shared_signer.rs"]
mod shared_signer;

use libfuzzer_sys::fuzz_target;
use mmpg::wire::{open_signed, sign};
use shared_signer::signer;

fuzz_target!(|bytes: &[u8]| {
    let key = signer().public();
    assert!(open_signed(bytes, &key).is_err(), "unsigned input opened");
    let signed = sign(bytes, signer());
    assert_eq!(open_signed(&signed, &key).expect("its own signature"), bytes);
    if let Some(i) = bytes.first().map(|b| usize::from(*b) % signed.len()) {
        let mut altered = signed.clone();
        altered[i] ^= 0x01;
        assert!(open_signed(&altered, &key).is_err(), "byte {i} altered and still opened");
    }
});
