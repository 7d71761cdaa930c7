//! `[transport] plugin = "mqtt"`: its settings, the broker's URL, and [`MqttTransport`], which
//! makes both ends over a broker for `mmpg run` (the cloud a worker of the shared subscription,
//! every device its own client).
//!
//! `mmpg cloud serve`, `mmpg device` and `mmpg fleet` read the same settings and add what a
//! deployment's kit holds (TLS with its CA, each client's password).

use std::time::Duration;

use mmpg::registry::{Build, BuildContext, Factory, Plugin, PluginError, StaticPlugin};
use mmpg::transport::{CloudEndpoint, DeviceLink, Transport, TransportError};
use mmpg::{Check, DeviceId, Settings, parse_settings};
use serde::{Deserialize, Serialize};

use crate::{BrokerSettings, MAX_PACKET, MqttEndpoint, MqttError, MqttLink, Topics};

/// Default `max_packet`: 128 KiB, AWS IoT Core's limit, the smallest of the managed brokers.
pub const DEFAULT_MAX_PACKET: usize = 128 * 1024;

/// Longest `name` and `group`, in bytes.
pub const MAX_NAME: usize = 64;

/// The longest topic any deployment publishes to: `mmpg/<name>/summary/<device>` with a name of
/// [`MAX_NAME`] bytes and a device id of [`MAX_DEVICE_ID`](mmpg::wire::MAX_DEVICE_ID) bytes, both
/// percent-encoded (up to 3 bytes each).
const LONGEST_TOPIC: usize = "mmpg/".len() + 3 * MAX_NAME + "/summary/".len() + 3 * mmpg::wire::MAX_DEVICE_ID;

/// Smallest `max_packet` a deployment may set: a PUBLISH of the longest topic, a chunk header and
/// 1 KiB of the message. Below it a device's request cannot leave it at all.
pub const MIN_MAX_PACKET: usize = crate::link::publish_overhead_of(LONGEST_TOPIC) + crate::chunk::CHUNK_HEADER + 1024;

/// `[transport.settings]` of the mqtt transport.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    /// The deployment's name on the broker: its topics are `mmpg/<name>/summary/<device>` and
    /// `mmpg/<name>/params/<device>`. Required.
    pub name: String,
    /// The broker: `mqtt://host:port` (plain TCP) or `mqtts://host:port` (TLS). Absent:
    /// `mmpg fleet` starts a Mosquitto of its own; `cloud serve`, `device` and `run` need one.
    pub broker: Option<String>,
    /// The cloud workers' shared-subscription group.
    pub group: String,
    /// Largest MQTT packet published, in bytes; larger messages travel as chunks.
    pub max_packet: usize,
    /// How long to wait for the broker to accept a connection and its subscription, in ms.
    pub connect_timeout_ms: u64,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            name: String::new(),
            broker: None,
            group: "mmpg-cloud".into(),
            max_packet: DEFAULT_MAX_PACKET,
            connect_timeout_ms: 10_000,
        }
    }
}

impl Settings for MqttSettings {
    fn check(&self, check: &mut Check) {
        if self.name.is_empty() {
            check.fail("name", "required: the deployment's name on the broker (topics are mmpg/<name>/…)");
        }
        if self.group.is_empty() {
            check.fail("group", "must not be empty");
        }
        // A name becomes one topic level (percent-encoded) and a line of the broker's ACL: it
        // must be printable and short, whatever it holds (`+`, `#`, `/`, `%` are escaped).
        for (key, value) in [("name", &self.name), ("group", &self.group)] {
            if value.len() > MAX_NAME {
                check.fail(key, format!("{} bytes, over the {MAX_NAME}-byte limit", value.len()));
            } else if value.chars().any(char::is_control) {
                check.fail(key, "must not hold control characters (it becomes a topic level and an ACL line)");
            }
        }
        if let Some(url) = &self.broker
            && let Err(e) = BrokerUrl::parse(url)
        {
            check.fail("broker", e.to_string());
        }
        // From what works: the longest topic, MQTT's header and a chunk header must leave room.
        check.within("max_packet", self.max_packet, MIN_MAX_PACKET..=MAX_PACKET as usize);
        check.within("connect_timeout_ms", self.connect_timeout_ms, 1..=600_000);
    }
}

impl MqttSettings {
    /// The deployment's topics.
    pub fn topics(&self) -> Topics {
        Topics::new(&self.name)
    }

    /// How a client of `broker` connects with these settings: no TLS configuration and no
    /// credentials yet (the kit's are added by the caller).
    pub fn client(&self, broker: &BrokerUrl) -> BrokerSettings {
        BrokerSettings {
            host: broker.host.clone(),
            port: broker.port,
            connect_timeout: Duration::from_millis(self.connect_timeout_ms),
            max_packet: self.max_packet,
            tls: None,
            credentials: None,
        }
    }
}

/// A broker's address: `mqtt://host:port` or `mqtts://host:port` (port default 1883 / 8883).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// TLS (`mqtts://`).
    pub tls: bool,
    /// Host name or IP address (an IPv6 address without its brackets).
    pub host: String,
    /// Port.
    pub port: u16,
}

impl BrokerUrl {
    /// Parses a broker URL.
    ///
    /// # Errors
    /// [`MqttError::Settings`] saying what is wrong.
    pub fn parse(url: &str) -> Result<Self, MqttError> {
        let bad =
            |why: &str| MqttError::Settings(format!("`{url}`: {why} (expected mqtt://host:port or mqtts://host:port)"));
        let (tls, rest) = match url.split_once("://") {
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mqtt") => (false, rest),
            Some((scheme, rest)) if scheme.eq_ignore_ascii_case("mqtts") => (true, rest),
            _ => return Err(bad("not an mqtt:// or mqtts:// URL")),
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains(['/', '?', '#', '@']) {
            return Err(bad("a broker URL has no path, query or user"));
        }
        let (host, port) = match rest.strip_prefix('[') {
            Some(v6) => {
                let (host, after) = v6.split_once(']').ok_or_else(|| bad("unclosed `[`"))?;
                (host, after.strip_prefix(':'))
            }
            None => match rest.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (rest, None),
            },
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let bracketed = rest.starts_with('[');
        if !host.chars().all(|c| c.is_ascii_alphanumeric() || ".-_".contains(c) || (bracketed && c == ':')) {
            return Err(bad("the host is not a name or an IP address"));
        }
        let port = match port {
            Some(p) => p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(|| bad("the port is not 1..=65535"))?,
            None if tls => 8883,
            None => 1883,
        };
        Ok(Self { tls, host: host.to_string(), port })
    }
}

impl std::fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

/// Both ends over a broker, in one process (`mmpg run`): anonymous clients of `broker`, which
/// must allow them (a deployment's kit and ACL are for `cloud serve` and `device`).
#[derive(Debug)]
pub struct MqttTransport {
    broker: BrokerSettings,
    topics: Topics,
    group: String,
}

impl MqttTransport {
    /// A transport over `broker` for `settings`' deployment.
    pub fn new(broker: BrokerSettings, settings: &MqttSettings) -> Self {
        Self { broker, topics: settings.topics(), group: settings.group.clone() }
    }
}

impl Transport for MqttTransport {
    fn endpoint(&mut self) -> Result<Box<dyn CloudEndpoint>, TransportError> {
        Ok(Box::new(MqttEndpoint::connect(&self.broker, &self.topics, &self.group, "run")?))
    }

    fn link(&mut self, device: &DeviceId) -> Result<Box<dyn DeviceLink>, TransportError> {
        Ok(Box::new(MqttLink::connect(&self.broker, &self.topics, device)?))
    }
}

fn build(settings: &toml::Table, _ctx: &BuildContext) -> Result<Box<dyn Transport>, PluginError> {
    let settings: MqttSettings = parse_settings(settings)?;
    let Some(url) = &settings.broker else {
        return Err(PluginError::Build(
            "transport.settings.broker: `mmpg run` over MQTT needs a running broker (mqtt://host:port); \
             `mmpg fleet` starts its own when none is set"
                .into(),
        ));
    };
    let url = BrokerUrl::parse(url).map_err(|e| PluginError::Build(e.to_string()))?;
    if url.tls {
        return Err(PluginError::Build(format!(
            "transport.settings.broker = \"{url}\": `mmpg run` connects anonymously over plain TCP; TLS and the \
             kit's passwords are for `mmpg cloud serve`, `mmpg device` and `mmpg fleet`"
        )));
    }
    Ok(Box::new(MqttTransport::new(settings.client(&url), &settings)))
}

/// The `mqtt` transport plugin.
pub const MQTT: Factory<dyn Transport, BuildContext> = Factory {
    name: "mqtt",
    summary: "an MQTT v5 broker (rumqttc): devices publish summaries, cloud workers share a subscription",
    settings: mmpg::SettingsSpec::of::<MqttSettings>(),
    build: Build::Static(build),
};

mmpg::inventory::submit! { StaticPlugin(Plugin::Transport(MQTT)) }

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn urls_parse_with_default_ports_and_refuse_the_rest() {
        let u = |s: &str| BrokerUrl::parse(s).map(|u| (u.tls, u.host, u.port)).map_err(|e| e.to_string());
        assert_eq!(u("mqtt://127.0.0.1:1884"), Ok((false, "127.0.0.1".into(), 1884)));
        assert_eq!(u("MQTTS://broker.example"), Ok((true, "broker.example".into(), 8883)));
        assert_eq!(u("mqtt://[::1]:7"), Ok((false, "::1".into(), 7)));
        assert_eq!(u("mqtt://localhost"), Ok((false, "localhost".into(), 1883)));
        for bad in [
            "http://x:1",
            "mqtt://",
            "mqtt://a b:1",
            "mqtt://a:b:1",
            "mqtt://x:0",
            "mqtt://x:99999",
            "mqtt://u@x:1",
            "mqtt://x:1/t",
            "x:1",
        ] {
            assert!(u(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn names_are_bounded_and_printable_and_a_wildcard_is_only_a_name() {
        let check = |t: &str| MQTT.settings.check(&toml::from_str::<toml::Table>(t).expect("toml"));
        assert!(check("name = '+'").is_ok());
        assert!(check("name = '#'\ngroup = 'a/b'").is_ok());
        assert!(check(&format!("name = '{}'", "n".repeat(MAX_NAME + 1))).is_err());
        assert!(check("name = \"a\\u0000b\"").is_err());
        assert!(check(&format!("name = 'q'\nmax_packet = {}", MIN_MAX_PACKET - 1)).is_err());
        assert!(check(&format!("name = 'q'\nmax_packet = {MIN_MAX_PACKET}")).is_ok());
    }

    #[test]
    fn validate_names_each_bad_key() {
        let table: toml::Table = toml::from_str("broker = 'http://x'\nmax_packet = 64\ngroup = ''").expect("toml");
        let errors = MQTT.settings.check(&table).expect_err("refused");
        let keys: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
        for key in ["name", "broker", "max_packet", "group"] {
            assert!(keys.contains(&key), "{key} not named: {errors:?}");
        }
    }

    proptest! {
        /// Issue 28: `max_packet = 64` validated, then every request failed. At the smallest
        /// `max_packet` validate takes, any deployment name and any device id leave room for a
        /// chunk and a KiB of the message.
        #[test]
        fn the_smallest_packet_limit_carries_any_topic(name in "\\PC{1,16}", device in "\\PC{1,64}") {
            let name: String = name.chars().take(MAX_NAME).collect();
            let topics = Topics::new(&name);
            let topic = topics.summary(&DeviceId(device));
            let room = MIN_MAX_PACKET - crate::link::publish_overhead(&topic);
            prop_assert!(room >= crate::chunk::CHUNK_HEADER + 1024, "{topic}");
            let message = vec![7u8; 5000];
            prop_assert!(crate::chunk::split(&message, 1, room).is_ok());
        }

        /// Whatever string a config holds, parsing never panics, and what parses prints back as
        /// a URL that parses to the same broker.
        #[test]
        fn parsing_round_trips(s in "\\PC{0,40}") {
            if let Ok(url) = BrokerUrl::parse(&s) {
                prop_assert_eq!(BrokerUrl::parse(&url.to_string()).ok(), Some(url));
            }
        }
    }
}
