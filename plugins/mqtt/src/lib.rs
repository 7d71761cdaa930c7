//! # mmpg-mqtt — the fleet over an MQTT v5 broker
//!
//! Devices publish summaries to `mmpg/<deployment>/summary/<device>` and receive parameters on
//! `mmpg/<deployment>/params/<device>`; every cloud worker subscribes to
//! `$share/<group>/mmpg/<deployment>/summary/+`, so the broker hands each summary to one worker of
//! the group (MQTT v5 shared subscriptions): adding workers adds capacity, nothing home-made.
//! QoS 1 both ways. The client is rumqttc; the broker is whatever speaks MQTT v5 (the tests start
//! a real Mosquitto).
//!
//! - [`MqttLink`]: a device's [`DeviceLink`](mmpg::DeviceLink).
//! - [`MqttEndpoint`]: a cloud worker's [`CloudEndpoint`](mmpg::CloudEndpoint).
//! - [`Topics`]: the topic layout.
//! - [`chunk`]: messages above a broker's packet limit as numbered chunks, reassembled with
//!   bounds (size, timeout, one message at a time).

pub mod chunk;
pub mod link;
pub mod topics;

pub use link::{MqttEndpoint, MqttLink};
pub use topics::Topics;

/// Where the broker is and who this client is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerSettings {
    /// Broker host (an IP address or name).
    pub host: String,
    /// Broker port.
    pub port: u16,
    /// How long to wait for the broker to accept the connection and the subscription.
    pub connect_timeout: std::time::Duration,
    /// Largest packet to publish, in bytes: larger messages travel as [`chunk`]s (at most
    /// [`MAX_PACKET`]).
    pub max_packet: usize,
}

/// Largest message put back together from chunks, in bytes: an envelope at the wire's limit and
/// its signed framing.
pub const MAX_MESSAGE: usize = mmpg::wire::MAX_PAYLOAD + 4096;
/// How long the chunks of one message may take to arrive.
pub const REASSEMBLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Largest MQTT packet this client sends or accepts, in bytes: an envelope at the wire's limit
/// plus the signed framing and MQTT's own header.
pub const MAX_PACKET: u32 = (mmpg::wire::MAX_PAYLOAD + 64 * 1024) as u32;
