//! The cloud's memory of the replies it sent lately, so that a request sent again — a device
//! re-publishing after a timeout, a broker delivering a QoS 1 message twice, an HTTP retry whose
//! first reply was lost — gets the same reply instead of a second adaptation (or, with a
//! [`SequenceLedger`](crate::security::SequenceLedger), a refusal as a replay).
//!
//! A request is the same when its bytes are: the device, sequence and nonce a device sends are in
//! them, so only a byte-for-byte copy of a request the cloud answered is answered from here. The
//! memory is bounded in bytes and forgets the oldest first.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// A request's fingerprint: BLAKE3 of its bytes.
type Key = [u8; 32];

/// Replies by the request they answered, bounded in bytes (oldest forgotten first).
#[derive(Debug)]
pub struct ReplyCache {
    inner: Mutex<Inner>,
    capacity: usize,
}

#[derive(Debug, Default)]
struct Inner {
    replies: HashMap<Key, Vec<u8>>,
    order: VecDeque<Key>,
    bytes: usize,
}

impl ReplyCache {
    /// Replies on hand by default: 64 MiB (about 1,800 quickstart replies of 37 KB).
    pub const DEFAULT_CAPACITY: usize = 64 << 20;

    /// A cache holding at most `capacity` bytes of replies (0 keeps none).
    pub fn new(capacity: usize) -> Self {
        Self { inner: Mutex::new(Inner::default()), capacity }
    }

    fn key(request: &[u8]) -> Key {
        *blake3::hash(request).as_bytes()
    }

    /// The reply sent to a request with exactly these bytes, if it is still remembered.
    pub fn get(&self, request: &[u8]) -> Option<Vec<u8>> {
        let inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        inner.replies.get(&Self::key(request)).cloned()
    }

    /// Remembers `reply` as the answer to `request`, forgetting the oldest replies beyond the
    /// capacity. A reply larger than the whole capacity is not kept.
    pub fn insert(&self, request: &[u8], reply: &[u8]) {
        if reply.len() > self.capacity {
            return;
        }
        let key = Self::key(request);
        let mut inner = self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(old) = inner.replies.insert(key, reply.to_vec()) {
            // Sent again: now the newest (rare, so the linear search is cheap enough).
            inner.bytes -= old.len();
            inner.order.retain(|k| k != &key);
        }
        inner.order.push_back(key);
        inner.bytes += reply.len();
        while inner.bytes > self.capacity {
            let Some(oldest) = inner.order.pop_front() else { break };
            if let Some(gone) = inner.replies.remove(&oldest) {
                inner.bytes -= gone.len();
            }
        }
    }

    /// Replies held.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).replies.len()
    }

    /// Whether none is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of replies held.
    pub fn bytes(&self) -> usize {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner).bytes
    }
}

impl Default for ReplyCache {
    fn default() -> Self {
        Self::new(Self::DEFAULT_CAPACITY)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_same_bytes_get_the_same_reply_and_other_bytes_none() {
        let cache = ReplyCache::new(1024);
        cache.insert(b"request 1", b"reply 1");
        assert_eq!(cache.get(b"request 1").as_deref(), Some(&b"reply 1"[..]));
        assert_eq!(cache.get(b"request 2"), None);
    }

    proptest! {
        /// Whatever is inserted, the bytes held never exceed the capacity, the count matches,
        /// and the most recent insert that fits is always held.
        #[test]
        fn bounded_and_keeps_the_newest(
            capacity in 0usize..200,
            inserts in proptest::collection::vec((0u8..16, proptest::collection::vec(any::<u8>(), 0..80)), 1..60),
        ) {
            let cache = ReplyCache::new(capacity);
            for (request, reply) in &inserts {
                cache.insert(&[*request], reply);
                prop_assert!(cache.bytes() <= capacity);
                if reply.len() <= capacity {
                    let held = cache.get(&[*request]);
                    prop_assert_eq!(held.as_ref(), Some(reply));
                }
            }
            let inner = cache.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            prop_assert_eq!(inner.replies.len(), inner.order.len());
            prop_assert_eq!(inner.replies.values().map(Vec::len).sum::<usize>(), inner.bytes);
        }
    }
}
