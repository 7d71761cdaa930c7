//! Deployment files: any text gives a deployment or located errors, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mmpg::{Deployment, Registry};

fuzz_target!(|bytes: &[u8]| {
    let Ok(text) = std::str::from_utf8(bytes) else { return };
    // The framework's own plugins (the in-process transport) are linked; unknown names are
    // errors like any other.
    let registry = Registry::with_static_plugins().expect("no duplicates");
    if let Ok(deployment) = Deployment::parse(text, "fuzz.toml", &registry) {
        let _ = deployment.device_domains();
    }
});
