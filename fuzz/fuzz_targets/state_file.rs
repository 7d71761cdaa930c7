//! A device's saved state files as they may be found after damage at rest: unsealing and
//! parsing a counter never panic, a counter taken is below the sequence bound, and a sealed
//! file with any byte changed is refused (issue 28).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::state;

fuzz_target!(|bytes: &[u8]| {
    if let Some(content) = state::unseal(bytes) {
        if let Ok(sequence) = state::parse_sequence(content) {
            assert!(sequence + 1 < mmpg::wire::MAX_SEQUENCE);
        }
        let _ = mmpg::privacy::PrivacyAccountant::from_json(&String::from_utf8_lossy(content));
    }
    if let Ok(sequence) = state::parse_sequence(bytes) {
        assert!(sequence + 1 < mmpg::wire::MAX_SEQUENCE);
    }
    let sealed = state::seal(bytes);
    assert_eq!(state::unseal(&sealed), Some(bytes));
    if !sealed.is_empty() {
        let mut damaged = sealed.clone();
        let at = bytes.len() % damaged.len();
        damaged[at] ^= 0x01;
        assert_eq!(state::unseal(&damaged), None);
    }
});
