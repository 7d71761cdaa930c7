//! Packets from the broker: chunk headers and their reassembly (`mmpg_mqtt::chunk`).
#![no_main]

use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use mmpg_mqtt::chunk::{CHUNK_HEADER, CHUNK_MAGIC, Reassembler, split};

/// The most a reassembler here accepts.
const LIMIT: usize = 4096;

fuzz_target!(|bytes: &[u8]| {
    // The input as a stream of packets: a little-endian u16 length (mod 512), then that many bytes.
    let t0 = Instant::now();
    let mut reassembler = Reassembler::new(LIMIT, Duration::from_secs(30));
    let (mut rest, mut step) = (bytes, 0u64);
    while rest.len() >= 2 {
        let n = usize::from(u16::from_le_bytes([rest[0], rest[1]])) % 512;
        let (packet, tail) = rest[2..].split_at(n.min(rest.len() - 2));
        rest = tail;
        step += 1;
        if let Ok(Some(message)) = reassembler.push(packet, t0 + Duration::from_millis(step * 997)) {
            // A reassembled message never exceeds the limit; a whole packet passes as it is.
            assert!(!packet.starts_with(CHUNK_MAGIC) || message.len() <= LIMIT);
        }
    }
    // And the input itself, split under a packet limit it chooses, comes back byte for byte.
    let room = 1 + usize::from(bytes.first().copied().unwrap_or(0));
    if let Ok(chunks) = split(bytes, 1, CHUNK_HEADER + room) {
        assert!(chunks.iter().all(|c| c.len() <= CHUNK_HEADER + room || c.as_slice() == bytes));
        let mut whole = Reassembler::new(1 << 20, Duration::from_secs(30));
        let mut out = None;
        for chunk in chunks.iter().rev() {
            if let Ok(Some(message)) = whole.push(chunk, t0) {
                out = Some(message);
            }
        }
        assert_eq!(out.as_deref(), Some(bytes));
    }
});
