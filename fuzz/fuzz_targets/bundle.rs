//! A device bundle from the network or a folder: the manifest, then its files decoded. The input
//! is split at NUL bytes into the manifest and the three files. The harness writes the files'
//! true hashes into the manifest, as a hostile cloud could: the hashes guard against corruption,
//! not against whoever writes the manifest, so every decoder behind them must hold on its own.
#![no_main]

use std::collections::BTreeMap;

use libfuzzer_sys::fuzz_target;
use mmpg::bundle::{Bundle, FILES, sha256_hex};

fuzz_target!(|bytes: &[u8]| {
    let mut parts = bytes.split(|b| *b == 0).filter(|p| !p.is_empty());
    let Some(manifest) = parts.next() else { return };
    let Ok(mut manifest) = Bundle::parse_manifest(manifest) else { return };
    let files: BTreeMap<String, Vec<u8>> = FILES.iter().zip(parts).map(|(n, p)| (n.to_string(), p.to_vec())).collect();
    for (name, bytes) in &files {
        manifest.files.insert(name.clone(), sha256_hex(bytes));
    }
    if let Ok(bundle) = Bundle::verify(manifest, files) {
        // What verifies is internally consistent: its schema is the manifest's.
        assert_eq!(bundle.schema.hash().to_string(), bundle.manifest.schema_hash);
        assert_eq!(bundle.reference.mean.len(), bundle.reference.std.len());
    }
});
