//! Dataset files: gzipped IDX images and labels are parsed, never trusted.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(images) = mmpg_fashion::parse_images(bytes) {
        assert!(images.iter().all(|i| i.len() == 784));
    }
    if let Ok(labels) = mmpg_fashion::parse_labels(bytes) {
        assert!(labels.iter().all(|l| *l < 10));
    }
});
