//! The `mmpg` binary as a user meets it.

use std::process::Command;

fn mmpg(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_mmpg")).args(args).output().expect("mmpg runs");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn validate_reports_every_error_with_line_and_key_path_and_exits_2() {
    let (code, _, stderr) = mmpg(&["validate", "tests/fixtures/three-errors.toml"]);
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 3, "{stderr}");
    assert!(lines[0].starts_with("tests/fixtures/three-errors.toml:4:11: fleet.devices: invalid type"), "{stderr}");
    assert!(
        lines[1].starts_with("tests/fixtures/three-errors.toml:9:1: transport.max_bytes: unknown field `max_bytes`"),
        "{stderr}"
    );
    assert_eq!(
        lines[2],
        "tests/fixtures/three-errors.toml:12:13: cloud.generator: no generator plugin named `fdx`; registered: fda (a plugin from a library needs its [[plugins]] entry or --plugin)"
    );
    assert!(!stderr.contains("panicked"));
}

#[test]
fn validate_accepts_the_shipped_examples() {
    for (example, devices) in
        [("examples/quickstart.toml", 8), ("examples/bench-synthetic.toml", 14), ("examples/bench-fashion.toml", 11)]
    {
        let (code, stdout, stderr) = mmpg(&["validate", example]);
        assert_eq!(code, 0, "{example}: {stderr}");
        assert!(stdout.contains(&format!("ok ({devices} devices)")), "{stdout}");
    }
}

#[test]
fn bench_section_errors_name_line_and_key_path() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("bad-bench.toml");
    let text = "[bench]\nk_sweep = [4, 0]\n[[bench.baselines]]\nplugin = \"fta\"\nsettings = { labels = 4, epochs = 3 }\n\
                [[bench.baselines]]\nplugin = \"tenet\"\n[[bench.variants]]\nname = \"x\"\nanchor = { strategy = \"best\" }\n\
                [fleet]\ndevices = 1\n";
    std::fs::write(&path, text).expect("write");
    let (code, _, stderr) = mmpg(&["validate", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2, "{stderr}");
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 4, "{stderr}");
    assert!(lines[0].contains(":2:") && lines[0].contains("bench.k_sweep[1]"), "{stderr}");
    assert!(lines[1].contains(":5:") && lines[1].contains("bench.baselines[0].settings.epochs"), "{stderr}");
    assert!(lines[2].contains(":7:") && lines[2].contains("no adapter plugin named `tenet`"), "{stderr}");
    assert!(lines[3].contains(":10:") && lines[3].contains("bench.variants[0].anchor.strategy"), "{stderr}");
}

#[test]
fn plugins_lists_every_kind_with_settings() {
    let (code, stdout, _) = mmpg(&["plugins"]);
    assert_eq!(code, 0);
    for needle in [
        "backend:",
        "  cpu ",
        "data source:",
        "  synthetic ",
        "model:",
        "  lmm ",
        "anchor reasoner:",
        "  adr ",
        "generator:",
        "  fda ",
        "transport:",
        "  in-process ",
        "k = 8",
        "latent = 16",
    ] {
        assert!(stdout.contains(needle), "missing {needle:?} in\n{stdout}");
    }
}

#[test]
fn a_backend_that_is_not_compiled_in_is_one_line_and_exit_2() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("cuda.toml");
    std::fs::write(&path, "[backend]\nkind = \"cuda\"\n[fleet]\nshifts = [{ kind = \"blur\", severity = 2 }]\n")
        .expect("write");
    let (code, _, stderr) = mmpg(&["run", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2);
    let expected = format!(
        "{}:2:8: backend.kind: backend `cuda` is not compiled in: rebuild with `--features cuda`",
        path.display()
    );
    assert_eq!(stderr.trim(), format!("error: {expected}"));
    // validate says so too: it catches what run would reject.
    let (code, _, stderr) = mmpg(&["validate", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2);
    assert_eq!(stderr.trim(), expected);
}

#[test]
fn an_unknown_shift_kind_names_its_line_and_the_supported_kinds() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("fog.toml");
    std::fs::write(&path, "[fleet]\nshifts = [{ kind = \"fog\", severity = 2 }]\n").expect("write");
    let (code, _, stderr) = mmpg(&["run", path.to_str().expect("utf-8 path")]);
    assert_eq!(code, 2);
    assert!(stderr.contains("fog.toml:2:20: fleet.shifts[0].kind: unknown shift kind `fog`; this data source supports: noise, brightness, contrast, blur"), "{stderr}");
}

#[test]
fn validate_warns_of_seeded_upload_noise_only_in_a_secured_deployment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let quickstart = std::fs::read_to_string("examples/quickstart.toml").expect("quickstart");
    let private = |noise: &str, secured: bool| {
        let mut text = quickstart.replace("[security]\ndir = \"pki\"\n", "");
        if secured {
            text.push_str(&format!("[security]\ndir = \"{}\"\n", dir.path().join("pki").display()));
        }
        text.push_str(&format!("[anchor.settings.privacy]\nepsilon = 4.0\nnoise = \"{noise}\"\n"));
        let path = dir.path().join(format!("{noise}-{secured}.toml"));
        std::fs::write(&path, text).expect("write");
        let (code, stdout, stderr) = mmpg(&["validate", path.to_str().expect("utf-8")]);
        assert_eq!(code, 0, "{stderr}");
        stdout.contains("warning: anchor.settings.privacy.noise = \"seeded\"")
    };
    assert!(private("seeded", true));
    assert!(!private("os", true));
    assert!(!private("seeded", false));
}
