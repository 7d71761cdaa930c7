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
}

/// Largest MQTT packet this client sends or accepts, in bytes: an envelope at the wire's limit
/// plus the signed framing and MQTT's own header.
pub const MAX_PACKET: u32 = (mmpg::wire::MAX_PAYLOAD + 64 * 1024) as u32;
