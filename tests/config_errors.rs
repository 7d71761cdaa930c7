//! Deployment files: every problem is reported with file, line, column and key path.

mod common;

use mmpg::Deployment;

/// Each file here shows one problem; one without devices gets a fleet appended (after its own
/// lines, so positions hold), or "no devices" would join every list.
fn errors(text: &str) -> Vec<String> {
    let text = if text.contains("[fleet") || text.contains("[[device") {
        text.to_string()
    } else {
        format!("{text}\n[fleet]\ndevices = 1\n")
    };
    match Deployment::parse(&text, "deploy.toml", &common::registry()) {
        Ok(_) => Vec::new(),
        Err(e) => e.0.iter().map(ToString::to_string).collect(),
    }
}

#[test]
fn severity_out_of_range_names_the_array_element() {
    let text = "[fleet]\nshifts = [\n  { kind = \"blur\", severity = 2 },\n  { kind = \"noise\", severity = 3 },\n  { kind = \"contrast\", severity = 7 },\n]\n";
    assert_eq!(errors(text), ["deploy.toml:5:35: fleet.shifts[2].severity: expected 1..=5, found 7"]);
}

#[test]
fn plugin_settings_errors_carry_the_full_path() {
    let text = "[anchor.settings]\nk = \"eight\"\n";
    let errs = errors(text);
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:2:5: anchor.settings.k: invalid type: string \"eight\""), "{errs:?}");
}

#[test]
fn unknown_top_level_keys_and_sections_are_errors() {
    let errs = errors("sed = 3\n[fleet]\ndevices = 2\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:1:1: sed: unknown field `sed`"), "{errs:?}");
}

#[test]
fn array_of_device_tables_is_located() {
    let text = "[[device]]\nname = \"a\"\nkind = \"blur\"\nseverity = 3\n\n[[device]]\nname = \"b\"\nkind = \"blur\"\nseverity = 0\n";
    assert_eq!(errors(text), ["deploy.toml:9:12: device[1].severity: expected 1..=5, found 0"]);
}

#[test]
fn syntax_errors_have_a_position_and_never_panic() {
    let errs = errors("[fleet\ndevices = 2\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:1:"), "{errs:?}");
}

#[test]
fn a_minimal_file_gets_every_default() {
    let d = Deployment::parse("[fleet]\ndevices = 3\n", "deploy.toml", &common::registry()).expect("valid");
    assert_eq!(
        (d.data.plugin.as_str(), d.model.plugin.as_str(), d.anchor.plugin.as_str()),
        ("synthetic", "lmm", "adr")
    );
    assert_eq!(
        (d.cloud.generator.as_str(), d.transport.plugin.as_str(), d.backend.kind.as_str()),
        ("fda", "in-process", "cpu")
    );
    let devices = d.device_domains();
    assert_eq!(devices.len(), 3);
    assert!(devices.iter().all(|(_, dom)| dom.shifts.is_empty()));
}

#[test]
fn device_seeds_derive_from_the_deployment_seed() {
    let a = Deployment::parse("seed = 1\n[fleet]\ndevices = 2\n", "a", &common::registry()).expect("valid");
    let b = Deployment::parse("seed = 2\n[fleet]\ndevices = 2\n", "b", &common::registry()).expect("valid");
    let seeds = |d: &Deployment| d.device_domains().iter().map(|(_, dom)| dom.seed).collect::<Vec<_>>();
    assert_ne!(seeds(&a), seeds(&b));
    assert_ne!(seeds(&a)[0], seeds(&a)[1]);
}

#[test]
fn unknown_plugin_settings_point_at_the_key() {
    let errs = errors("[cloud.settings]\nlatent = 8\nlatnet = 4\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:3:1: cloud.settings.latnet: unknown field `latnet`"), "{errs:?}");
}

#[test]
fn malformed_text_found_by_the_fuzzer_is_a_located_error() {
    // toml_edit 0.23 panicked on this input ("all items have spans"); 0.25 reports it.
    let errs = errors("==F=\n..=");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:1:"), "{errs:?}");
}

#[test]
fn an_unknown_backend_in_the_bench_table_is_located() {
    let errs = errors("[bench]\nbackends = [\"cpu\", \"opencl\"]\n");
    assert_eq!(errs.len(), 1);
    assert!(errs[0].starts_with("deploy.toml:2:20: bench.backends[1]:"), "{errs:?}");
    assert!(errs[0].contains("opencl"), "{errs:?}");
}
