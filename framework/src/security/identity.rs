//! A device's identity in a certificate and on disk.
//!
//! A device certificate names its device twice: the subject's common name (for people reading
//! it) and a URI subject alternative name `spiffe://mmpg/device/<id>` (what the cloud checks;
//! the SPIFFE ID form, so standard tooling shows it). The id is percent-encoded there, and in
//! file names, so that any id — `noise@4+blur@4`, one with `/` or `..` — maps to one path segment
//! and back.

use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, percent_decode_str, utf8_percent_encode};

/// Prefix of a device's URI name.
pub const DEVICE_URI_PREFIX: &str = "spiffe://mmpg/device/";

/// Bytes kept as they are: letters, digits and `-_@+`. Everything else, `.` and `/` included,
/// is escaped, so an encoded id is never `.`, `..` or a path.
const ESCAPED: &AsciiSet = &NON_ALPHANUMERIC.remove(b'-').remove(b'_').remove(b'@').remove(b'+');

/// The id as one path segment (file name or URI segment).
pub fn encode(id: &str) -> String {
    utf8_percent_encode(id, ESCAPED).to_string()
}

/// The id an [`encode`]d segment names; `None` when it is not one (bad escape, not UTF-8, or
/// not in the canonical form `encode` writes).
pub fn decode(segment: &str) -> Option<String> {
    let id = percent_decode_str(segment).decode_utf8().ok()?.into_owned();
    (encode(&id) == segment).then_some(id)
}

/// The URI a device's certificate carries.
pub fn device_uri(id: &str) -> String {
    format!("{DEVICE_URI_PREFIX}{}", encode(id))
}

/// The device a certificate URI names; `None` for any other URI.
pub fn device_from_uri(uri: &str) -> Option<String> {
    uri.strip_prefix(DEVICE_URI_PREFIX).and_then(decode).filter(|id| !id.is_empty())
}

/// Whether `name` can go in a certificate: an IP address, or a DNS name of letters, digits,
/// `-` and `.` (labels of 1..=63 bytes, 253 in all).
pub fn is_certificate_name(name: &str) -> bool {
    name.parse::<std::net::IpAddr>().is_ok()
        || (name.len() <= 253
            && name.split('.').all(|label| {
                (1..=63).contains(&label.len())
                    && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                    && !label.starts_with('-')
                    && !label.ends_with('-')
            }))
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn readable_ids_stay_readable_and_paths_do_not_escape() {
        assert_eq!(encode("noise@4+blur@4"), "noise@4+blur@4");
        assert_eq!(encode("device-01"), "device-01");
        assert_eq!(encode(".."), "%2E%2E");
        assert_eq!(encode("a/b"), "a%2Fb");
        assert_eq!(device_from_uri("spiffe://mmpg/device/a%2Fb").as_deref(), Some("a/b"));
        assert_eq!(device_from_uri("spiffe://other/device/a"), None);
        assert_eq!(device_from_uri("spiffe://mmpg/device/"), None);
        // Another spelling of the same id is not accepted: one id, one name.
        assert_eq!(decode("%61"), None);
    }

    proptest! {
        #[test]
        fn every_id_round_trips_through_one_safe_segment(id in "\\PC{1,40}") {
            let segment = encode(&id);
            prop_assert!(!segment.contains('/') && !segment.contains('.') && !segment.is_empty());
            prop_assert_eq!(decode(&segment), Some(id.clone()));
            prop_assert_eq!(device_from_uri(&device_uri(&id)), Some(id));
        }
    }
}
