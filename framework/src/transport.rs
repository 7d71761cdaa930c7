//! Device ↔ cloud transports with byte accounting. The in-process transport simulates a
//! network inside one process; real protocols implement the same trait in plugins.

use std::collections::{BTreeMap, VecDeque};

use serde::{Deserialize, Serialize};

use crate::data::DeviceId;
use crate::wire::{Envelope, WireError};

/// Which way a message travels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Direction {
    /// Device → cloud.
    Up,
    /// Cloud → device.
    Down,
}

/// Why a transport call failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum TransportError {
    /// The bytes received are not a valid message.
    #[error("malformed message: {0}")]
    Wire(#[from] WireError),
    /// The message is larger than the transport carries.
    #[error("message of {size} bytes exceeds the transport's limit of {limit}")]
    TooLarge {
        /// Message size.
        size: usize,
        /// Limit.
        limit: usize,
    },
    /// The peer or link is gone.
    #[error("link closed: {0}")]
    Closed(String),
}

/// Bytes and messages moved per device and direction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Traffic {
    /// Bytes device → cloud.
    pub bytes_up: u64,
    /// Bytes cloud → device.
    pub bytes_down: u64,
    /// Messages device → cloud.
    pub messages_up: u64,
    /// Messages cloud → device.
    pub messages_down: u64,
}

/// Moves encoded envelopes between devices and the cloud. Required: raw byte send/receive and
/// the traffic ledger; envelope encoding and decoding are provided.
pub trait Transport: Send {
    /// Sends bytes. `device` is the sender (up) or the recipient (down).
    fn send_bytes(&mut self, direction: Direction, device: &DeviceId, bytes: Vec<u8>) -> Result<(), TransportError>;

    /// Next message for the cloud from any device (up) or for `device` (down); `None` if none
    /// is waiting.
    fn recv_bytes(
        &mut self,
        direction: Direction,
        device: Option<&DeviceId>,
    ) -> Result<Option<Vec<u8>>, TransportError>;

    /// Traffic per device so far.
    fn traffic(&self) -> BTreeMap<DeviceId, Traffic>;

    /// Encodes and sends an envelope; returns its size on the wire.
    fn send(&mut self, direction: Direction, envelope: &Envelope) -> Result<usize, TransportError> {
        let bytes = envelope.encode()?;
        let size = bytes.len();
        self.send_bytes(direction, &envelope.device, bytes)?;
        Ok(size)
    }

    /// Receives and decodes an envelope.
    fn recv(&mut self, direction: Direction, device: Option<&DeviceId>) -> Result<Option<Envelope>, TransportError> {
        match self.recv_bytes(direction, device)? {
            Some(bytes) => Ok(Some(Envelope::decode(&bytes)?)),
            None => Ok(None),
        }
    }
}

/// Queues in memory. For simulation and tests: nothing leaves the process, but every byte is
/// encoded, counted and decoded exactly as a network transport would.
#[derive(Debug, Default)]
pub struct InProcess {
    up: VecDeque<Vec<u8>>,
    down: BTreeMap<DeviceId, VecDeque<Vec<u8>>>,
    traffic: BTreeMap<DeviceId, Traffic>,
    max_message: Option<usize>,
}

impl InProcess {
    /// A transport with no message size limit.
    pub fn new() -> Self {
        Self::default()
    }

    /// A transport that refuses messages above `limit` bytes, like a broker would.
    pub fn with_limit(limit: usize) -> Self {
        Self { max_message: Some(limit), ..Self::default() }
    }
}

impl Transport for InProcess {
    fn send_bytes(&mut self, direction: Direction, device: &DeviceId, bytes: Vec<u8>) -> Result<(), TransportError> {
        if let Some(limit) = self.max_message.filter(|l| bytes.len() > *l) {
            return Err(TransportError::TooLarge { size: bytes.len(), limit });
        }
        let ledger = self.traffic.entry(device.clone()).or_default();
        let size = bytes.len() as u64;
        match direction {
            Direction::Up => {
                ledger.bytes_up += size;
                ledger.messages_up += 1;
                self.up.push_back(bytes);
            }
            Direction::Down => {
                ledger.bytes_down += size;
                ledger.messages_down += 1;
                self.down.entry(device.clone()).or_default().push_back(bytes);
            }
        }
        Ok(())
    }

    fn recv_bytes(
        &mut self,
        direction: Direction,
        device: Option<&DeviceId>,
    ) -> Result<Option<Vec<u8>>, TransportError> {
        Ok(match (direction, device) {
            (Direction::Up, _) => self.up.pop_front(),
            (Direction::Down, Some(id)) => self.down.get_mut(id).and_then(VecDeque::pop_front),
            (Direction::Down, None) => None,
        })
    }

    fn traffic(&self) -> BTreeMap<DeviceId, Traffic> {
        self.traffic.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::slots::SchemaHash;
    use crate::wire::MessageKind;

    fn envelope(device: &str) -> Envelope {
        Envelope {
            kind: MessageKind::Params,
            schema_hash: SchemaHash(1),
            device: DeviceId(device.into()),
            sequence: 0,
            payload: vec![],
        }
    }

    #[test]
    fn in_process_counts_every_byte_per_device_and_direction() {
        let mut t = InProcess::new();
        let a = envelope("a");
        let size = t.send(Direction::Up, &a).expect("sent");
        t.send(Direction::Down, &a).expect("sent");
        assert_eq!(t.recv(Direction::Up, None).expect("ok"), Some(a.clone()));
        assert_eq!(t.recv(Direction::Down, Some(&DeviceId("b".into()))).expect("ok"), None);
        assert_eq!(t.recv(Direction::Down, Some(&a.device)).expect("ok"), Some(a.clone()));
        let traffic = &t.traffic()[&a.device];
        assert_eq!((traffic.bytes_up, traffic.bytes_down), (size as u64, size as u64));
    }

    #[test]
    fn messages_over_the_limit_are_refused_and_not_counted() {
        let mut t = InProcess::with_limit(8);
        assert!(matches!(t.send(Direction::Up, &envelope("a")), Err(TransportError::TooLarge { .. })));
        assert!(t.traffic().is_empty());
    }

    #[test]
    fn garbage_bytes_are_a_wire_error() {
        let mut t = InProcess::new();
        t.send_bytes(Direction::Up, &DeviceId("x".into()), vec![1, 2, 3]).expect("raw send");
        assert!(matches!(t.recv(Direction::Up, None), Err(TransportError::Wire(_))));
    }
}
