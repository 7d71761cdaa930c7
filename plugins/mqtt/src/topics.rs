//! The topic layout of a deployment on the broker.
//!
//! A device id becomes one topic level, percent-encoded (everything but ASCII letters, digits,
//! `-`, `_` and `.`), so no id can contain a level separator (`/`) or a wildcard (`+`, `#`) and
//! reach another device's topics, and `$` never starts one.

use mmpg::DeviceId;
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// What stays as it is in a topic level.
const LEVEL: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'.');

/// A device id as one topic level.
pub fn level(device: &DeviceId) -> String {
    utf8_percent_encode(&device.0, LEVEL).to_string()
}

/// The topics of one deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Topics {
    root: String,
}

impl Topics {
    /// The topics of deployment `name` (encoded as one level like a device id).
    pub fn new(name: &str) -> Self {
        Self { root: format!("mmpg/{}", utf8_percent_encode(name, LEVEL)) }
    }

    /// Where `device` publishes its summaries.
    pub fn summary(&self, device: &DeviceId) -> String {
        self.summary_level(&level(device))
    }

    /// Where `device` receives its parameters.
    pub fn params(&self, device: &DeviceId) -> String {
        self.params_level(&level(device))
    }

    /// The summary topic with `last` as its last level as written (a wildcard `+`, or an ACL's
    /// `%u`); the deployment's own level stays encoded whatever it holds.
    pub fn summary_level(&self, last: &str) -> String {
        format!("{}/summary/{last}", self.root)
    }

    /// The params topic with `last` as its last level as written.
    pub fn params_level(&self, last: &str) -> String {
        format!("{}/params/{last}", self.root)
    }

    /// What every cloud worker of `group` subscribes to: each summary goes to one of them.
    pub fn shared_summaries(&self, group: &str) -> String {
        format!("$share/{}/{}/summary/+", utf8_percent_encode(group, LEVEL), self.root)
    }

    /// The device a summary topic names, if `topic` is one of this deployment's.
    pub fn device_of_summary(&self, topic: &str) -> Option<DeviceId> {
        let rest = topic.strip_prefix(&self.root)?.strip_prefix("/summary/")?;
        if rest.contains('/') {
            return None;
        }
        percent_decode_str(rest).decode_utf8().ok().map(|id| DeviceId(id.into_owned()))
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn the_layout_is_the_documented_one() {
        let t = Topics::new("quickstart");
        let d = DeviceId("cam-7".into());
        assert_eq!(t.summary(&d), "mmpg/quickstart/summary/cam-7");
        assert_eq!(t.params(&d), "mmpg/quickstart/params/cam-7");
        assert_eq!(t.shared_summaries("workers"), "$share/workers/mmpg/quickstart/summary/+");
    }

    proptest! {
        /// Any id is one level without wildcards, and reads back as itself.
        #[test]
        fn any_device_id_is_one_safe_level(id in "\\PC{0,24}") {
            let t = Topics::new("d");
            let device = DeviceId(id);
            let topic = t.summary(&device);
            let level = topic.rsplit('/').next().unwrap_or_default();
            prop_assert!(!level.contains(['/', '+', '#', '$']));
            prop_assert_eq!(t.device_of_summary(&topic), Some(device));
        }
    }
}
