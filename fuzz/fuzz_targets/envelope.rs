//! Bytes from a peer: envelope header, safetensors payload, summary and params content.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::wire::Envelope;

fuzz_target!(|bytes: &[u8]| {
    if let Ok(envelope) = Envelope::decode(bytes) {
        if let Ok(summary) = envelope.to_summary() {
            // A summary that decodes must be internally consistent.
            assert!(summary.decoded_anchors().is_ok());
            assert!(summary.decoded_text_anchors().is_ok());
        }
        let _ = envelope.to_params();
        let _ = envelope.to_error();
        // The kind a transport peeks at is the kind the full decoder reads.
        assert_eq!(mmpg::wire::peek_kind(bytes), Some(envelope.kind));
        // Re-encoding a decoded envelope reproduces the input exactly.
        assert_eq!(envelope.encode().as_deref(), Ok(bytes));
    }
    let _ = mmpg::wire::decode_summary(bytes);
    let _ = mmpg::wire::decode_f32_tensors(bytes);
    let _ = mmpg::wire::decode_params(bytes);
});
