//! Feature files: `.safetensors` with a `features` tensor are parsed, never trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(t) = mmpg_videoqa::parse_safetensors_features(bytes) {
        assert_eq!(t.len(), t.shape().iter().product::<usize>());
    }
});
