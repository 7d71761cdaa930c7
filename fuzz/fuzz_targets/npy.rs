//! Feature files: `.npy` arrays of any float width, byte order and axis order are parsed, never trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(t) = mmpg_videoqa::parse_npy(bytes) {
        assert_eq!(t.len(), t.shape().iter().product::<usize>());
    }
});
