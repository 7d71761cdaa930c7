//! Bytes a plugin library answers the host with: every value type that crosses the plugin
//! boundary decodes (with postcard, as `mmpg::abi` does) into a consistent value or an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::{AnchorSummary, Clip, GeneratedParams, HostTensor, SlotGradient, TrainingLog};

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Option<T> {
    postcard::from_bytes(bytes).ok()
}

fn consistent(t: &HostTensor) {
    assert_eq!(t.shape().iter().product::<usize>(), t.len());
}

fuzz_target!(|bytes: &[u8]| {
    if let Some(t) = decode::<HostTensor>(bytes) {
        consistent(&t);
    }
    if let Some(summary) = decode::<AnchorSummary>(bytes) {
        // The quantised payload's length matches its shape whenever it decodes.
        let _ = summary.decoded_anchors();
        let _ = summary.decoded_text_anchors();
    }
    if let Some(clips) = decode::<Vec<Clip>>(bytes) {
        clips.iter().for_each(|c| consistent(&c.frames));
    }
    if let Some(params) = decode::<GeneratedParams>(bytes) {
        params.tensors.values().for_each(consistent);
    }
    if let Some(gradient) = decode::<SlotGradient>(bytes) {
        gradient.gradients.values().for_each(consistent);
    }
    let _ = decode::<TrainingLog>(bytes);
    let _ = decode::<Vec<usize>>(bytes);
});
