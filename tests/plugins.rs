//! Plugin libraries loaded at run time: the shipped `adr` loaded from its cdylib runs exactly
//! as when linked statically; the out-of-tree `herding` example loads from a deployment; and
//! every refusal of the loader says what is wrong. Libraries are the workspace's cdylibs, which
//! `cargo build --workspace` (run by scripts/test) builds next to this test's binary.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use mmpg::runtime;
use mmpg::{
    BuildContext, Deployment, DeviceDescriptor, HostTensor, LoadError, NoProgress, PluginError, PluginKind, Registry,
};

/// `target/<profile>`, the folder holding this test's `deps/`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("test binary path");
    exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<test>").to_path_buf()
}

/// A workspace cdylib by library name.
fn library(name: &str) -> PathBuf {
    let path = target_dir().join(format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    assert!(path.exists(), "{} is missing: `cargo build --workspace` builds it (scripts/test does)", path.display());
    path
}

fn adr_library() -> PathBuf {
    library("mmpg_adr_plugin")
}

fn fixture() -> PathBuf {
    library("mmpg_plugin_fixture")
}

/// The registry without the built-in `adr`, so the library's may take its name.
fn registry_without_adr() -> Registry {
    let mut registry = common::registry();
    registry.remove(PluginKind::AnchorReasoner, "adr").expect("adr is built in");
    registry
}

const SHIFTS: &str = r#"{ kind = "noise", severity = 4 }, { kind = "brightness", severity = 5 }, { kind = "clean" }"#;

type Observed = (Vec<(f64, f64, u64, u64, usize)>, Option<Vec<f64>>, Option<Vec<f64>>);

fn observed(report: &mmpg::report::RunReport) -> Observed {
    let devices = report
        .devices
        .iter()
        .map(|d| {
            assert!(d.error.is_none(), "{}: {:?}", d.device, d.error);
            (d.static_accuracy, d.adapted_accuracy, d.bytes_up, d.bytes_down, d.anchors)
        })
        .collect();
    (
        devices,
        report.cloud.pretrain.as_ref().map(|l| l.losses.clone()),
        report.cloud.generator.as_ref().map(|l| l.losses.clone()),
    )
}

#[test]
fn adr_fda_and_lmm_loaded_from_their_libraries_run_exactly_as_linked_statically() {
    let text = common::tiny_deployment(11, 40, 16, SHIFTS);
    let linked = common::registry();
    let deployment = Deployment::parse(&text, "static.toml", &linked).expect("valid");
    let baseline = runtime::run(&deployment, &linked, &NoProgress).expect("static run");

    let mut loaded = registry_without_adr();
    loaded.remove(PluginKind::Generator, "fda").expect("fda is built in");
    loaded.remove(PluginKind::Model, "lmm").expect("lmm is built in");
    let adr = loaded.load_library(&adr_library(), None).expect("adr library loads");
    assert_eq!(adr.plugins, [(PluginKind::AnchorReasoner, "adr".to_string())]);
    assert!(adr.backends.is_empty(), "adr computes on the host: {:?}", adr.backends);
    let fda = loaded.load_library(&library("mmpg_fda_plugin"), None).expect("fda library loads");
    assert!(fda.backends.contains(&"cpu".to_string()), "{:?}", fda.backends);
    loaded.load_library(&library("mmpg_lmm_plugin"), None).expect("lmm library loads");
    for (kind, name) in
        [(PluginKind::AnchorReasoner, "adr"), (PluginKind::Generator, "fda"), (PluginKind::Model, "lmm")]
    {
        assert!(loaded.origin(kind, name).is_some(), "{kind} {name} comes from its library");
    }
    let deployment_loaded = Deployment::parse(&text, "loaded.toml", &loaded).expect("valid");
    let from_libraries = runtime::run(&deployment_loaded, &loaded, &NoProgress).expect("loaded run");

    assert_eq!(observed(&baseline), observed(&from_libraries));
    assert_eq!(baseline.fleet.adapted_accuracy, from_libraries.fleet.adapted_accuracy);
    let retrieval = |r: &mmpg::report::RunReport| -> Vec<_> {
        r.devices.iter().map(|d| (d.static_retrieval, d.adapted_retrieval)).collect()
    };
    assert_eq!(retrieval(&baseline), retrieval(&from_libraries));
    // A rebuilt library may train differently: checkpoints of the two are not interchangeable.
    assert_ne!(deployment.training_fingerprint(), deployment_loaded.training_fingerprint());
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).expect("write deployment");
    path
}

fn with_plugins(library: &Path, pin: Option<&str>, anchor: &str) -> String {
    let pin = pin.map(|p| format!("sha256 = \"{p}\"\n")).unwrap_or_default();
    format!(
        "{}\n[[plugins]]\npath = {:?}\n{pin}\n[anchor]\nplugin = \"{anchor}\"\n",
        common::tiny_deployment(5, 8, 4, r#"{ kind = "clean" }"#),
        library.display().to_string(),
    )
}

#[test]
fn a_deployment_loads_and_pins_its_libraries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = adr_library();
    let hash = mmpg::abi::sha256_hex(&std::fs::read(&lib).expect("read"));
    let path = write(dir.path(), "pinned.toml", &with_plugins(&lib, Some(&hash.to_uppercase()), "adr"));
    let mut registry = registry_without_adr();
    let deployment = Deployment::open(&path, &mut registry).expect("a pinned library loads");
    assert_eq!(deployment.plugins.len(), 1);
    let origin = registry.origin(PluginKind::AnchorReasoner, "adr").expect("from the library");
    assert!(origin.pinned);
    assert_eq!(origin.sha256, hash);
    // Opening it again does not load the library twice.
    Deployment::open(&path, &mut registry).expect("already loaded");
}

#[test]
fn a_pinned_hash_that_differs_is_refused_before_the_library_opens() {
    let dir = tempfile::tempdir().expect("tempdir");
    let wrong = "0".repeat(64);
    let text = with_plugins(&adr_library(), Some(&wrong), "adr");
    let line = 1 + text.lines().position(|l| l.starts_with("sha256")).expect("pinned");
    let path = write(dir.path(), "mismatch.toml", &text);
    let mut registry = registry_without_adr();
    let errors = Deployment::open(&path, &mut registry).expect_err("hash differs").to_string();
    assert!(errors.contains(&format!("mismatch.toml:{line}:")), "{errors}");
    assert!(errors.contains("plugins[0].sha256"), "{errors}");
    assert!(errors.contains(&format!("but the deployment pins {wrong}")), "{errors}");
    assert!(registry.libraries().next().is_none(), "nothing was loaded");
    // Not a sha256 at all: refused by parsing, with its key.
    let path = write(dir.path(), "badpin.toml", &with_plugins(&adr_library(), Some("abc"), "adr"));
    let errors = Deployment::open(&path, &mut registry).expect_err("bad pin").to_string();
    assert!(
        errors.contains("plugins[0].sha256: expected the library's sha256 as 64 hexadecimal characters"),
        "{errors}"
    );
}

#[test]
fn a_missing_library_is_named() {
    let err = common::registry().load_library(Path::new("/nonexistent/libmissing.so"), None).expect_err("missing");
    assert!(matches!(err, LoadError::Missing { .. }), "{err:?}");
    assert_eq!(
        err.to_string(),
        "plugin library /nonexistent/libmissing.so does not exist: build the plugin crate (cargo build --release) or fix the path"
    );
}

#[test]
fn a_library_that_is_not_a_plugin_is_refused() {
    let candidates = [
        "/lib/x86_64-linux-gnu/libm.so.6",
        "/usr/lib/x86_64-linux-gnu/libm.so.6",
        "/lib/aarch64-linux-gnu/libm.so.6",
        "/usr/lib/aarch64-linux-gnu/libm.so.6",
        "/lib64/libm.so.6",
        "/usr/lib/libm.so.6",
    ];
    let libm = candidates.iter().map(Path::new).find(|p| p.exists()).expect("the system's libm");
    let err = common::registry().load_library(libm, None).expect_err("libm is no plugin");
    assert!(matches!(err, LoadError::NotAPlugin { .. }), "{err:?}");
    assert!(err.to_string().contains("is not an mmpg plugin library: it exports no `mmpg_plugin_library` entry point"));

    let dir = tempfile::tempdir().expect("tempdir");
    let text = write(dir.path(), "libtext.so", "not an ELF file");
    let err = common::registry().load_library(&text, None).expect_err("not a library");
    assert!(matches!(err, LoadError::Open { .. }), "{err:?}");
    assert!(err.to_string().contains("cannot be loaded as a library"), "{err}");
}

#[test]
fn a_plugin_name_that_is_already_registered_is_a_typed_error() {
    let mut registry = common::registry();
    let err = registry.load_library(&adr_library(), None).expect_err("adr is built in");
    let LoadError::Duplicate { source, .. } = &err else { panic!("{err:?}") };
    assert!(matches!(source, mmpg::registry::RegistryError::Duplicate { kind: PluginKind::AnchorReasoner, .. }));
    assert!(err.to_string().starts_with("anchor reasoner `adr` is registered twice: built in, and from "), "{err}");
    assert!(registry.origin(PluginKind::AnchorReasoner, "adr").is_none(), "the built-in one stays");
}

#[test]
fn panics_inside_a_library_become_errors_and_the_host_goes_on() {
    let mut registry = common::registry();
    registry.load_library(&fixture(), None).expect("the fixture loads");
    let ctx = BuildContext { seed: 1, device: DeviceDescriptor::cpu() };
    let factory = registry.anchor_reasoner("fixture-panics").expect("registered");
    let err = factory.build(&toml::Table::new(), &ctx).err().expect("its factory panics");
    assert!(matches!(err, PluginError::Build(_)), "{err:?}");
    assert!(err.to_string().contains("panicked: fixture: this factory always panics"), "{err}");
    assert!(err.to_string().contains("libmmpg_plugin_fixture"), "names the library: {err}");

    let reasoner = registry
        .anchor_reasoner("fixture-select-panics")
        .expect("registered")
        .build(&toml::Table::new(), &ctx)
        .expect("builds");
    let window = HostTensor::new(vec![2, 2], vec![0.0, 1.0, 2.0, 3.0]).expect("2x2");
    let err = reasoner.select(&window, 3).expect_err("select panics");
    assert!(matches!(err, mmpg::AnchorError::Plugin(_)), "{err:?}");
    assert!(err.to_string().contains("panicked: fixture: select always panics"), "{err}");
    // The object is still usable after a caught panic.
    assert!(reasoner.select(&window, 3).is_err());
}

/// Runs `mmpg` with the fixture in a given mode (one behaviour per process).
fn mmpg_with_fixture(mode: &str, args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmpg"))
        .env("MMPG_FIXTURE", mode)
        .env("RUST_BACKTRACE", "0")
        .args(args)
        .output()
        .expect("mmpg runs");
    (out.status.code(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[test]
fn a_library_of_another_abi_says_how_to_fix_it() {
    let lib = fixture();
    let (code, stderr) = mmpg_with_fixture("abi", &["--plugin", lib.to_str().expect("utf-8"), "plugins"]);
    assert_eq!(code, Some(2), "{stderr}");
    let expected = format!(
        "error: --plugin: {} was built for plugin ABI {}, this mmpg speaks ABI {}: rebuild it against mmpg {}",
        lib.display(),
        mmpg::abi::ABI_VERSION + 1,
        mmpg::abi::ABI_VERSION,
        mmpg::abi::MMPG_VERSION
    );
    assert!(stderr.contains(&expected), "{stderr}");
}

#[test]
fn duplicate_names_in_one_library_and_a_panicking_entry_point_are_refused() {
    let lib = fixture();
    let lib = lib.to_str().expect("utf-8");
    let (code, stderr) = mmpg_with_fixture("duplicate", &["--plugin", lib, "plugins"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("anchor reasoner `twin` is registered twice: from "), "{stderr}");
    assert!(stderr.contains("and again from the same library"), "{stderr}");
    let (code, stderr) = mmpg_with_fixture("entry-panics", &["--plugin", lib, "plugins"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("its entry point failed while building its plugin list (it panicked)"), "{stderr}");
    let (code, stderr) = mmpg_with_fixture("data-source", &["--plugin", lib, "plugins"]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains(": data source `empty` cannot be loaded"), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "cannot be loaded: plugin ABI {} carries anchor reasoners, models and generators",
            mmpg::abi::ABI_VERSION
        )),
        "{stderr}"
    );
}

#[test]
fn validate_checks_libraries_warns_when_unpinned_and_checks_their_backends() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = write(dir.path(), "unpinned.toml", &with_plugins(&fixture(), None, "fixture-select-panics"));
    let path = path.to_str().expect("utf-8");
    let (code, stderr) = mmpg_with_fixture("", &["validate", path]);
    assert_eq!(code, Some(0), "{stderr}");
    let hash = mmpg::abi::sha256_hex(&std::fs::read(fixture()).expect("read"));
    assert!(stderr.contains(&format!("is not pinned (sha256 {hash}): pin it in a [[plugins]] entry")), "{stderr}");

    let (code, stderr) = mmpg_with_fixture("cuda-only", &["validate", path]);
    assert_eq!(code, Some(2), "{stderr}");
    assert!(stderr.contains("anchor.plugin: anchor reasoner `fixture-select-panics` comes from "), "{stderr}");
    assert!(stderr.contains("built with backends cuda; this deployment computes on `cpu`"), "{stderr}");

    // `mmpg plugins <deployment>` lists the library's plugins with their origin.
    let out = Command::new(env!("CARGO_BIN_EXE_mmpg")).args(["plugins", path]).output().expect("mmpg runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success());
    assert!(stdout.contains(&format!("(sha256 {hash}, not pinned)")), "{stdout}");
    assert!(stdout.contains("origin: built in"), "{stdout}");
}

/// The out-of-tree example, built as its author would (its own workspace and target folder).
fn herding_library() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/herding-plugin");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--quiet", "--manifest-path"])
        .arg(root.join("Cargo.toml"))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "building examples/herding-plugin failed");
    let name = format!("{}mmpg_herding{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    root.join("target/debug").join(name)
}

#[test]
fn the_out_of_tree_herding_plugin_adapts_a_fleet() {
    let dir = tempfile::tempdir().expect("tempdir");
    let lib = herding_library();
    let hash = mmpg::abi::sha256_hex(&std::fs::read(&lib).expect("read"));
    let path = write(dir.path(), "herding.toml", &with_plugins(&lib, Some(&hash), "herding"));
    let text = std::fs::read_to_string(&path).expect("read");
    let text = text.replace("plugin = \"herding\"\n", "plugin = \"herding\"\nsettings = { k = 5 }\n");
    std::fs::write(&path, text).expect("write");
    let mut registry = common::registry();
    let deployment = Deployment::open(&path, &mut registry).expect("valid");
    let report = runtime::run(&deployment, &registry, &NoProgress).expect("runs");
    assert_eq!(report.plugins.iter().find(|(k, _)| k == "anchor reasoner").map(|(_, n)| n.as_str()), Some("herding"));
    for device in &report.devices {
        assert!(device.error.is_none(), "{}: {:?}", device.device, device.error);
        assert_eq!(device.anchors, 5);
    }
}

/// The baselines reach the model's capabilities (fine-tuning, statistics recalibration, its
/// linear head, entropy minimisation for TENT, feature alignment for FOA) through the boundary too: `mmpg bench` with `lmm` from its library matches the
/// linked one row by row.
#[test]
fn bench_baselines_use_a_loaded_models_capabilities_as_a_linked_ones() {
    let text = r#"
seed = 3
[cloud.training]
pretrain_steps = 30
generator_steps = 8
source_domains = 6
[fleet]
window_clips = 8
eval_clips = 32
shifts = [{ kind = "contrast", severity = 5 }, { kind = "clean" }]
[bench]
k_sweep = []
generation_repeats = 2
backends = []
[[bench.baselines]]
plugin = "static"
[[bench.baselines]]
plugin = "fta"
settings = { labels = 4, max_epochs = 2 }
[[bench.baselines]]
plugin = "fta"
name = "FTA all"
settings = { labels = 4, max_epochs = 2, scope = "all" }
[[bench.baselines]]
plugin = "feature-stats"
[[bench.baselines]]
plugin = "t3a"
[[bench.baselines]]
plugin = "tent"
settings = { batch = 4 }
[[bench.baselines]]
plugin = "foa"
settings = { batch = 4, epochs = 1 }
[[bench.baselines]]
plugin = "lame"
"#;
    let rows = |registry: &Registry| {
        let deployment = Deployment::parse(text, "bench.toml", registry).expect("valid");
        let report = mmpg_bench::bench(&deployment, registry, &NoProgress).expect("bench runs");
        report
            .methods
            .iter()
            .map(|m| {
                assert_eq!(m.failures, 0, "{} failed on a device", m.method);
                (m.method.clone(), m.accuracy_all_devices, m.bytes_up, m.bytes_down, m.device_trainable_parameters)
            })
            .collect::<Vec<_>>()
    };
    let linked = rows(&common::registry());
    let mut loaded = common::registry();
    loaded.remove(PluginKind::Model, "lmm").expect("lmm is built in");
    loaded.load_library(&library("mmpg_lmm_plugin"), None).expect("lmm library loads");
    assert_eq!(linked, rows(&loaded));
    assert!(linked.len() >= 8, "{linked:?}");
}

#[test]
fn only_regular_files_are_read_as_libraries() {
    let dir = tempfile::tempdir().expect("tempdir");
    let err = common::registry().load_library(dir.path(), None).expect_err("a folder");
    assert!(err.to_string().contains("not a regular file"), "{err}");
    // A FIFO would block a plain read forever.
    let fifo = dir.path().join("libfifo.so");
    if Command::new("mkfifo").arg(&fifo).status().is_ok_and(|s| s.success()) {
        let err = common::registry().load_library(&fifo, None).expect_err("a fifo");
        assert!(err.to_string().contains("not a regular file"), "{err}");
    }
}

/// A copy of `source` with `edit` applied to its bytes.
fn edited_copy(dir: &Path, name: &str, source: &Path, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut bytes = std::fs::read(source).expect("read library");
    edit(&mut bytes);
    let path = dir.join(name);
    std::fs::write(&path, bytes).expect("write copy");
    path
}

#[test]
fn a_truncated_or_foreign_library_is_refused_before_it_is_mapped() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Mapping a segment past the end of the file would kill the process (SIGBUS).
    let truncated = edited_copy(dir.path(), "libtruncated.so", &fixture(), |b| b.truncate(b.len() / 2));
    let err = registry_without_adr().load_library(&truncated, None).expect_err("truncated");
    assert!(matches!(err, LoadError::Open { .. }), "{err:?}");
    let message = err.to_string();
    assert!(message.contains("truncated or corrupted?") || message.contains("truncated: a segment needs"), "{message}");
    // e_machine (bytes 18..20) of another architecture: refused by name, not "no such file".
    let foreign = edited_copy(dir.path(), "libforeign.so", &fixture(), |b| {
        let machine: u16 = if std::env::consts::ARCH == "aarch64" { 0x3e } else { 0xb7 };
        b[18..20].copy_from_slice(&machine.to_le_bytes());
    });
    let err = registry_without_adr().load_library(&foreign, None).expect_err("foreign");
    assert!(matches!(err, LoadError::Target { .. }), "{err:?}");
    assert!(err.to_string().contains("was built for "), "{err}");
    // Not ELF at all: refused from its first bytes.
    let text = write(dir.path(), "libnotelf.so", "#!/bin/sh\necho hello\n");
    let err = registry_without_adr().load_library(&text, None).expect_err("not ELF");
    assert!(err.to_string().contains("not an ELF shared library"), "{err}");
}

#[test]
fn loading_a_library_again_is_idempotent_but_its_pin_still_has_to_match() {
    let mut registry = common::registry();
    let first = registry.load_library(&fixture(), None).expect("loads");
    let again = registry.load_library(&fixture(), Some(&first.sha256)).expect("the same file again");
    assert_eq!(again.sha256, first.sha256);
    assert!(registry.libraries().all(|l| l.pinned), "a later pin marks it pinned");
    let wrong = "f".repeat(64);
    let err = registry.load_library(&fixture(), Some(&wrong)).expect_err("a pin that does not match");
    assert!(matches!(err, LoadError::HashMismatch { .. }), "{err:?}");
    // Another library loads beside it with its own plugins.
    let mut both = registry_without_adr();
    both.load_library(&fixture(), None).expect("fixture");
    both.load_library(&adr_library(), None).expect("adr");
    assert!(both.origin(PluginKind::AnchorReasoner, "adr").is_some_and(|l| l.path == adr_library()));
    assert!(both.origin(PluginKind::AnchorReasoner, "fixture-panics").is_some_and(|l| l.path == fixture()));
}

#[test]
fn one_bad_plugins_entry_is_reported_alone_and_the_others_still_load() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut text = with_plugins(&fixture(), None, "fixture-select-panics");
    text.push_str("\n[[plugins]]\npath = 3\n");
    let path = write(dir.path(), "second-bad.toml", &text);
    let mut registry = common::registry();
    let errors = Deployment::open(&path, &mut registry).expect_err("entry 1 is malformed").to_string();
    assert!(errors.contains("plugins[1].path"), "{errors}");
    assert!(!errors.contains("anchor.plugin"), "the first entry loaded its plugin: {errors}");
    assert!(!errors.contains("is not loaded"), "{errors}");
    assert!(registry.origin(PluginKind::AnchorReasoner, "fixture-select-panics").is_some());
}
