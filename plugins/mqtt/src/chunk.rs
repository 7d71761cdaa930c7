//! Messages larger than a broker's packet limit, as numbered chunks, and their reassembly with
//! bounds.
//!
//! Brokers cap packet size (rumqttc's default is 10 KiB, AWS IoT 128 KB, EMQX 1 MB). A message
//! above the limit travels as chunks: `MMPC`, version 1, the message id (u64), the chunk's index,
//! the chunk count and the message's total size (u32 each, little-endian), then the chunk's bytes.
//! A message within the limit travels as it is (an envelope starts `MMPG` or `MMPS`, never
//! `MMPC`). The receiver holds one message in reassembly: a chunk of another message replaces it
//! (the older is discarded and counted: a device waits only for its newest reply), so do chunks
//! after the timeout; a message over the size limit is refused at its first chunk.

use std::time::{Duration, Instant};

/// What begins every chunk.
pub const CHUNK_MAGIC: &[u8; 4] = b"MMPC";
/// Chunk format version.
pub const CHUNK_VERSION: u8 = 1;
/// Bytes of a chunk's header.
pub const CHUNK_HEADER: usize = 4 + 1 + 8 + 4 + 4 + 4;

/// Why chunks could not be made or put back together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    /// The packet limit leaves no room for a chunk's bytes.
    #[error("a packet limit of {0} bytes leaves no room after the {CHUNK_HEADER}-byte chunk header")]
    Limit(usize),
    /// The message needs more chunks than a chunk header can count.
    #[error("a message of {0} bytes is too large to send in chunks")]
    TooLarge(usize),
    /// A chunk's header is not this version's, or contradicts itself.
    #[error("malformed chunk: {0}")]
    Malformed(String),
    /// The message is larger than the receiver accepts.
    #[error("a chunked message of {total} bytes exceeds the {limit}-byte limit")]
    OverLimit {
        /// Its announced size.
        total: usize,
        /// The receiver's limit.
        limit: usize,
    },
}

/// `message` as it travels under `max_packet`: itself if it fits, else chunks of message `id`.
///
/// # Errors
/// [`ChunkError::Limit`] for a `max_packet` not above [`CHUNK_HEADER`], [`ChunkError::TooLarge`]
/// for a message whose size or chunk count do not fit in u32.
pub fn split(message: &[u8], id: u64, max_packet: usize) -> Result<Vec<Vec<u8>>, ChunkError> {
    if message.len() <= max_packet && !message.starts_with(CHUNK_MAGIC) {
        return Ok(vec![message.to_vec()]);
    }
    let room = max_packet.checked_sub(CHUNK_HEADER).filter(|r| *r > 0).ok_or(ChunkError::Limit(max_packet))?;
    let total = u32::try_from(message.len()).map_err(|_| ChunkError::TooLarge(message.len()))?;
    let count = u32::try_from(message.len().div_ceil(room)).map_err(|_| ChunkError::TooLarge(message.len()))?;
    let mut chunks = Vec::with_capacity(count as usize);
    for (index, part) in (0u32..).zip(message.chunks(room)) {
        let mut chunk = Vec::with_capacity(CHUNK_HEADER + part.len());
        chunk.extend_from_slice(CHUNK_MAGIC);
        chunk.push(CHUNK_VERSION);
        chunk.extend_from_slice(&id.to_le_bytes());
        chunk.extend_from_slice(&index.to_le_bytes());
        chunk.extend_from_slice(&count.to_le_bytes());
        chunk.extend_from_slice(&total.to_le_bytes());
        chunk.extend_from_slice(part);
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// A chunk's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    id: u64,
    index: u32,
    count: u32,
    total: u32,
}

fn header(chunk: &[u8]) -> Result<Header, ChunkError> {
    let malformed = |what: &str| ChunkError::Malformed(what.to_string());
    if chunk.len() < CHUNK_HEADER {
        return Err(malformed("shorter than its header"));
    }
    if chunk[4] != CHUNK_VERSION {
        return Err(ChunkError::Malformed(format!("version {} (this build reads {CHUNK_VERSION})", chunk[4])));
    }
    let u32_at = |at: usize| u32::from_le_bytes([chunk[at], chunk[at + 1], chunk[at + 2], chunk[at + 3]]);
    let mut id = [0u8; 8];
    id.copy_from_slice(&chunk[5..13]);
    let h = Header { id: u64::from_le_bytes(id), index: u32_at(13), count: u32_at(17), total: u32_at(21) };
    if h.count == 0 || h.index >= h.count {
        return Err(ChunkError::Malformed(format!("chunk {} of {}", h.index, h.count)));
    }
    if (chunk.len() - CHUNK_HEADER) as u64 > u64::from(h.total) {
        return Err(malformed("a chunk larger than its message"));
    }
    Ok(h)
}

/// The message being put back together. Its parts are kept by index as they arrive, so what it
/// holds is what was received (at most the announced total), whatever count a header claims.
#[derive(Debug)]
struct Partial {
    header: Header,
    started: Instant,
    parts: std::collections::BTreeMap<u32, Vec<u8>>,
    received: usize,
}

/// Puts chunked messages back together, one at a time, within a size limit and a timeout.
#[derive(Debug)]
pub struct Reassembler {
    limit: usize,
    timeout: Duration,
    partial: Option<Partial>,
    discarded: u64,
}

impl Reassembler {
    /// Accepts messages of at most `limit` bytes whose chunks all arrive within `timeout` of the
    /// first.
    pub fn new(limit: usize, timeout: Duration) -> Self {
        Self { limit, timeout, partial: None, discarded: 0 }
    }

    /// Messages given up: replaced by another message's chunks, or timed out.
    pub fn discarded(&self) -> u64 {
        self.discarded
    }

    /// Bytes held for the message in reassembly (0 when none is).
    pub fn held(&self) -> usize {
        self.partial.as_ref().map_or(0, |p| p.received)
    }

    /// Whether it holds nothing that could still complete at `now` (no message, or one past
    /// its timeout).
    pub fn is_idle(&self, now: Instant) -> bool {
        self.partial.as_ref().is_none_or(|p| now.saturating_duration_since(p.started) > self.timeout)
    }

    /// Takes one packet received at `now`: a whole message (not a chunk) is returned as it is; a
    /// chunk completes its message or waits for the rest (`None`). A repeated chunk (QoS 1
    /// delivers at least once) changes nothing.
    ///
    /// # Errors
    /// [`ChunkError::Malformed`] for a header that contradicts itself or its message,
    /// [`ChunkError::OverLimit`] for a message above the limit; the message in progress is kept.
    pub fn push(&mut self, packet: &[u8], now: Instant) -> Result<Option<Vec<u8>>, ChunkError> {
        if !packet.starts_with(CHUNK_MAGIC) {
            return Ok(Some(packet.to_vec()));
        }
        let h = header(packet)?;
        let total = h.total as usize;
        if total > self.limit {
            return Err(ChunkError::OverLimit { total, limit: self.limit });
        }
        if (h.count as usize) > total.max(1) {
            return Err(ChunkError::Malformed(format!("{} chunks for {total} bytes", h.count)));
        }
        let stale = self
            .partial
            .as_ref()
            .is_some_and(|p| p.header.id != h.id || now.saturating_duration_since(p.started) > self.timeout);
        if stale {
            self.partial = None;
            self.discarded += 1;
        }
        let partial = self.partial.get_or_insert_with(|| Partial {
            header: h,
            started: now,
            parts: std::collections::BTreeMap::new(),
            received: 0,
        });
        if partial.header.count != h.count || partial.header.total != h.total {
            return Err(ChunkError::Malformed(format!("chunk {} of message {} disagrees on its size", h.index, h.id)));
        }
        if let std::collections::btree_map::Entry::Vacant(slot) = partial.parts.entry(h.index) {
            let part = &packet[CHUNK_HEADER..];
            if partial.received + part.len() > total {
                return Err(ChunkError::Malformed(format!("message {} overflows its {total} bytes", h.id)));
            }
            partial.received += part.len();
            slot.insert(part.to_vec());
        }
        if partial.parts.len() == h.count as usize {
            let done = self.partial.take().map(|p| p.parts.into_values().flatten().collect::<Vec<u8>>());
            return match done {
                Some(message) if message.len() == total => Ok(Some(message)),
                Some(message) => Err(ChunkError::Malformed(format!("{} bytes of an announced {total}", message.len()))),
                None => Ok(None),
            };
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn a_message_within_the_limit_travels_as_it_is() {
        assert_eq!(split(b"MMPG small", 1, 64).expect("fits"), vec![b"MMPG small".to_vec()]);
        assert!(matches!(split(&[0; 100], 1, CHUNK_HEADER), Err(ChunkError::Limit(_))));
    }

    #[test]
    fn chunks_of_another_message_replace_the_one_in_progress_and_are_counted() {
        let t = Instant::now();
        let a = split(&[1; 100], 1, CHUNK_HEADER + 40).expect("chunks");
        let b = split(&[2; 100], 2, CHUNK_HEADER + 40).expect("chunks");
        let mut r = Reassembler::new(1000, Duration::from_secs(5));
        assert_eq!(r.push(&a[0], t), Ok(None));
        for chunk in &b[..2] {
            assert_eq!(r.push(chunk, t), Ok(None));
        }
        assert_eq!(r.push(&b[2], t), Ok(Some(vec![2; 100])));
        assert_eq!(r.discarded(), 1);
        // Past the timeout, what was collected is dropped.
        assert_eq!(r.push(&a[0], t), Ok(None));
        assert_eq!(r.push(&a[1], t + Duration::from_secs(6)), Ok(None));
        assert_eq!(r.discarded(), 2);
    }

    #[test]
    fn a_message_over_the_limit_is_refused_at_its_first_chunk() {
        let chunks = split(&[0; 5000], 9, 1024).expect("chunks");
        let mut r = Reassembler::new(4096, Duration::from_secs(5));
        assert!(matches!(r.push(&chunks[0], Instant::now()), Err(ChunkError::OverLimit { total: 5000, .. })));
    }

    #[test]
    fn a_header_claiming_millions_of_chunks_costs_only_what_arrived() {
        // 29 bytes announcing a 64 MiB message in 64 Mi one-byte chunks: nothing is allocated
        // for the chunks that never come.
        let mut r = Reassembler::new(64 << 20, Duration::from_secs(5));
        let mut bomb = Vec::from(&CHUNK_MAGIC[..]);
        bomb.push(CHUNK_VERSION);
        bomb.extend_from_slice(&1u64.to_le_bytes());
        bomb.extend_from_slice(&0u32.to_le_bytes());
        bomb.extend_from_slice(&(64u32 << 20).to_le_bytes());
        bomb.extend_from_slice(&(64u32 << 20).to_le_bytes());
        bomb.extend_from_slice(b"abcd");
        assert_eq!(r.push(&bomb, Instant::now()), Ok(None));
        assert_eq!(r.partial.as_ref().map(|p| p.parts.len()), Some(1));
    }

    proptest! {
        /// Split under any packet limit, delivered in any order with repeats, a message comes back
        /// byte for byte, and no chunk is over the limit.
        #[test]
        fn any_message_survives_chunking_reordering_and_repeats(
            message in prop::collection::vec(any::<u8>(), 0..2000),
            room in 1usize..300,
            order in prop::collection::vec(any::<prop::sample::Index>(), 0..40),
        ) {
            let chunks = split(&message, 7, CHUNK_HEADER + room).expect("splits");
            prop_assert!(chunks.iter().all(|c| c.len() <= CHUNK_HEADER + room));
            let mut r = Reassembler::new(4096, Duration::from_secs(60));
            let now = Instant::now();
            // Some chunks again, in another order, then every chunk in reverse.
            let mut delivered: Vec<&Vec<u8>> = order.iter().map(|i| i.get(&chunks)).collect();
            delivered.extend(chunks.iter().rev());
            let mut out = Vec::new();
            for chunk in delivered {
                if let Some(m) = r.push(chunk, now).expect("valid chunks") {
                    out.push(m);
                }
            }
            prop_assert!(!out.is_empty());
            prop_assert_eq!(&out[0], &message);
            prop_assert_eq!(r.discarded(), 0);
        }

        /// Arbitrary bytes never panic the reassembler, and never yield more than was announced.
        #[test]
        fn arbitrary_packets_are_errors_or_bounded_messages(packets in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..64), 0..20)) {
            let mut r = Reassembler::new(256, Duration::from_secs(1));
            for mut p in packets {
                if p.len() > 4 { p[..4].copy_from_slice(CHUNK_MAGIC); }
                if let Ok(Some(m)) = r.push(&p, Instant::now()) {
                    prop_assert!(!m.starts_with(CHUNK_MAGIC) || m.len() <= 256);
                }
            }
        }
    }
}
