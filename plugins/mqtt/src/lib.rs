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
//! - [`settings`]: `[transport] plugin = "mqtt"` and its settings; [`MqttTransport`] makes both
//!   ends for `mmpg run` over a broker.
//! - [`credentials`]: the broker's password file and ACL from a deployment's kit.
//! - [`mosquitto`]: a Mosquitto process of one's own (what `mmpg fleet` and the tests start).

pub mod chunk;
pub mod credentials;
pub mod link;
pub mod load;
pub mod mosquitto;
pub mod settings;
pub mod tls;
pub mod topics;

pub use link::{MqttEndpoint, MqttLink, ReconnectingLink};
pub use settings::{BrokerUrl, MqttSettings, MqttTransport};
pub use topics::Topics;

/// Why the mqtt transport could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    /// `[transport.settings]` is not usable.
    #[error("{0}")]
    Settings(String),
    /// A TLS file (the CA) cannot be used.
    #[error("TLS: {0}")]
    Tls(String),
    /// A kit file (a password) cannot be read or written.
    #[error(transparent)]
    Kit(#[from] mmpg::security::ProvisionError),
    /// The broker could not be started or reached.
    #[error("broker: {0}")]
    Broker(String),
}

/// A user name and password on the broker.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// User name (a device's is its id as one topic level; the cloud's is
    /// [`credentials::CLOUD_USER`]).
    pub username: String,
    /// Password.
    pub password: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials").field("username", &self.username).finish_non_exhaustive()
    }
}

/// Where the broker is and who this client is.
#[derive(Debug, Clone)]
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
    /// TLS to the broker (`mqtts://`), verifying it with this configuration.
    pub tls: Option<std::sync::Arc<rustls::ClientConfig>>,
    /// The client's user name and password, if the broker asks for them.
    pub credentials: Option<Credentials>,
}

impl BrokerSettings {
    /// A plain-TCP, anonymous client of `host:port` with the default limits.
    pub fn plain(host: &str, port: u16) -> Self {
        Self {
            host: host.to_string(),
            port,
            connect_timeout: std::time::Duration::from_secs(10),
            max_packet: settings::DEFAULT_MAX_PACKET,
            tls: None,
            credentials: None,
        }
    }

    /// `mqtt://host:port` or `mqtts://host:port`.
    pub fn url(&self) -> String {
        format!("{}://{}:{}", if self.tls.is_some() { "mqtts" } else { "mqtt" }, self.host, self.port)
    }
}

/// Largest message put back together from chunks, in bytes: an envelope at the wire's limit and
/// its signed framing.
pub const MAX_MESSAGE: usize = mmpg::wire::MAX_PAYLOAD + 4096;
/// How long the chunks of one message may take to arrive.
pub const REASSEMBLY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// QoS 1 publishes a client keeps in flight (awaiting PUBACK) before it waits. rumqttc's default
/// (65,535) preallocates a slot for each — about 13 MB per client, which 10,000 load devices
/// cannot afford; a worker's replies and a chunked message's chunks need far fewer.
pub const MAX_INFLIGHT: u16 = 256;

/// Largest MQTT packet this client sends or accepts, in bytes: an envelope at the wire's limit
/// plus the signed framing and MQTT's own header.
pub const MAX_PACKET: u32 = (mmpg::wire::MAX_PAYLOAD + 64 * 1024) as u32;
