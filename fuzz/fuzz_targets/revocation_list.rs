//! A revocation list as an operator may have edited it: parsing never panics, and every id it
//! takes is one a certificate can carry and one `mmpg provision --revoke` would write back as
//! the same line (issue 28: a list must fail closed, never skip a line silently).
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::security::{identity, revocation};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    match revocation::parse(text) {
        Ok(ids) => {
            for id in &ids {
                assert_eq!(identity::device_from_uri(&identity::device_uri(id)).as_deref(), Some(id.as_str()));
                let line = revocation::line(id);
                assert_eq!(
                    revocation::parse(&line).ok().and_then(|i| i.into_iter().next()).as_deref(),
                    Some(id.as_str())
                );
            }
        }
        Err((line, message)) => {
            assert!(line >= 1 && line <= text.split('\n').count(), "line {line}");
            assert!(!message.is_empty());
        }
    }
});
