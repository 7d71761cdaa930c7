//! What the plugin boundary costs: the `adr` anchor reasoner linked statically against the same
//! code loaded from its library (`libmmpg_adr_plugin.so`), per call, and what loading a library
//! into a registry costs.
//!
//! `cargo build --release -p mmpg-adr-plugin && cargo bench --bench plugin_boundary`

use std::path::{Path, PathBuf};
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use mmpg::{AnchorReasoner, BuildContext, DeviceDescriptor, FeatureStats, HostTensor, PluginKind, Registry};

// The built-in `adr` (linked statically) and the other plugins, as in the `mmpg` binary.
use mmpg_adr as _;

fn features(n: usize, d: usize) -> HostTensor {
    let values = (0..n * d).map(|i| ((i * 2_654_435_761) % 1000) as f32 / 500.0 - 1.0).collect();
    HostTensor::new(vec![n, d], values).expect("fits")
}

/// `target/release/lib<name>.so`, next to this bench's `deps/`.
fn library_named(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("bench binary path");
    let dir = exe.parent().and_then(Path::parent).expect("target/<profile>/deps/<bench>");
    let path = dir.join(format!("{}{name}{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX));
    let package = name.trim_start_matches("mmpg_").replace('_', "-");
    assert!(path.exists(), "{} is missing: run `cargo build --release -p mmpg-{package}` first", path.display());
    path
}

fn library() -> PathBuf {
    library_named("mmpg_adr_plugin")
}

/// The first load of each shipped library in this process (sha256, dlopen with its
/// relocations, listing): printed once, as criterion cannot repeat a first load.
fn first_loads() {
    for name in ["mmpg_fda_plugin", "mmpg_lmm_plugin"] {
        let path = library_named(name);
        let started = Instant::now();
        let loaded = Registry::new().load_library(&path, None).expect("loads");
        let bytes = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        println!(
            "first load of {} ({:.1} MB, {} plugin): {:.2} ms",
            path.display(),
            bytes as f64 / 1e6,
            loaded.plugins.len(),
            started.elapsed().as_secs_f64() * 1e3
        );
    }
}

fn reasoners() -> (Box<dyn AnchorReasoner>, Box<dyn AnchorReasoner>) {
    let ctx = BuildContext { seed: 0, device: DeviceDescriptor::cpu() };
    let settings: toml::Table = toml::from_str("k = 8\nquantisation = \"f16\"\ntext_k = 0").expect("toml");
    let linked = Registry::with_static_plugins().expect("registry");
    let static_adr = linked.anchor_reasoner("adr").expect("built in").build(&settings, &ctx).expect("builds");
    let mut loaded = Registry::with_static_plugins().expect("registry");
    loaded.remove(PluginKind::AnchorReasoner, "adr");
    let started = Instant::now();
    loaded.load_library(&library(), None).expect("loads");
    // The first load in a process includes dlopen's relocations; later ones reuse the mapping.
    println!("first load of {}: {:.2} ms", library().display(), started.elapsed().as_secs_f64() * 1e3);
    let loaded_adr = loaded.anchor_reasoner("adr").expect("loaded").build(&settings, &ctx).expect("builds");
    (static_adr, loaded_adr)
}

fn per_call(c: &mut Criterion) {
    let (static_adr, loaded_adr) = reasoners();
    for (group, summarise) in [("adr_select", false), ("adr_summarise", true)] {
        let mut group = c.benchmark_group(group);
        for n in [16, 64, 256, 1024] {
            let f = features(n, 64);
            let reference = FeatureStats { mean: vec![0.0; 64], std: vec![1.0; 64] };
            for (name, adr) in [("static", &static_adr), ("loaded", &loaded_adr)] {
                group.bench_with_input(BenchmarkId::new(name, n), &f, |b, f| {
                    if summarise {
                        b.iter(|| adr.summarise(f, &reference, n / 4, 0).expect("summary"));
                    } else {
                        b.iter(|| adr.select(f, 0).expect("selection"));
                    }
                });
            }
        }
        group.finish();
    }
}

fn loading(c: &mut Criterion) {
    first_loads();
    let path = library();
    c.bench_function("load_library_again", |b| {
        b.iter(|| {
            let mut registry = Registry::new();
            registry.load_library(&path, None).expect("loads")
        })
    });
}

criterion_group!(benches, per_call, loading);
criterion_main!(benches);
