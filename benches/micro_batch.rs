//! The cloud's micro-batcher: what answering N requests costs when they are generated in one
//! call (decode, check, generate, encode every reply) against one call each, and the serving
//! loop end to end with N devices exchanging at once over the in-process transport; and what
//! `[security]` adds to one reply: the cloud's signature and the device's check.
//! `cargo bench --bench micro_batch`.

mod common;
use common::features;

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mmpg::node::{BatchPolicy, CloudNode, NoObserver};
use mmpg::transport::{DeviceLink, Peer, Transport};
use mmpg::wire::Envelope;
use mmpg::{AnchorReasoner, CloudModel, DataSource, DeviceId, FeatureStats, InProcess};
use mmpg_adr::{Adr, AdrSettings};
use mmpg_backends::BurnDevice;
use mmpg_lmm::{LmmCloud, LmmSettings};
use mmpg_synthetic::{Synthetic, SyntheticSettings};

fn micro_batch(c: &mut Criterion) {
    let data = Synthetic::new(SyntheticSettings::default()).expect("valid settings");
    let cpu = BurnDevice::Flex(Default::default());
    let cloud = LmmCloud::new(LmmSettings::default(), data.task(), &BurnDevice::autodiff(cpu)).expect("model builds");
    let generator = common::generator(&cloud);
    let node = CloudNode::new(&generator, mmpg::Quantisation::F32);
    let adr = Adr::new(AdrSettings::default()).expect("valid settings");
    let reference = FeatureStats { mean: vec![0.0; 64], std: vec![1.0; 64] };
    let request = |i: usize| {
        let summary = adr.summarise(&features(64 + i, 64), &reference, 16, i as u64).expect("summary");
        Envelope::summary(DeviceId(format!("d{i}")), 1, cloud.schema().hash(), &summary)
            .and_then(|e| e.encode())
            .expect("encodes")
    };
    let peer = Peer::default();

    let mut group = c.benchmark_group("respond");
    for devices in [1usize, 8, 64] {
        let requests: Vec<Vec<u8>> = (0..devices).map(request).collect();
        group.throughput(Throughput::Elements(devices as u64));
        group.bench_with_input(BenchmarkId::new("one_call", devices), &requests, |b, r| {
            let views: Vec<(&Peer, &[u8])> = r.iter().map(|r| (&peer, r.as_slice())).collect();
            b.iter(|| node.respond(&views))
        });
        group.bench_with_input(BenchmarkId::new("call_each", devices), &requests, |b, r| {
            b.iter(|| r.iter().map(|r| node.respond(&[(&peer, r.as_slice())])).collect::<Vec<_>>())
        });
    }
    group.finish();

    // The loop: N devices send at once; the cloud batches what arrives within max_wait.
    let mut group = c.benchmark_group("serve_in_process");
    for devices in [8usize, 64] {
        let requests: Vec<Vec<u8>> = (0..devices).map(request).collect();
        group.throughput(Throughput::Elements(devices as u64));
        group.bench_with_input(BenchmarkId::from_parameter(devices), &requests, |b, requests| {
            let mut transport = InProcess::new();
            let mut endpoint = transport.endpoint().expect("endpoint");
            let mut links: Vec<_> =
                (0..devices).map(|i| transport.link(&DeviceId(format!("d{i}"))).expect("link")).collect();
            let stop = AtomicBool::new(false);
            let policy = BatchPolicy { max_batch: 64, max_wait: Duration::from_millis(2) };
            std::thread::scope(|s| {
                s.spawn(|| node.serve(endpoint.as_mut(), &policy, &stop, &NoObserver));
                b.iter(|| {
                    std::thread::scope(|s| {
                        for (link, r) in links.iter_mut().zip(requests) {
                            s.spawn(move || link.exchange(r.clone(), Duration::from_secs(30)).expect("reply"));
                        }
                    })
                });
                stop.store(true, Ordering::Relaxed);
            });
        });
    }
    group.finish();

    // One params reply as the cloud sends it: signed (BLAKE3, then Ed25519), then verified
    // (`verify_strict`) as a device does before decoding it.
    let (replies, _) = node.respond(&[(&peer, request(0).as_slice())]);
    let reply = replies.into_iter().next().expect("a reply").bytes;
    let signer = mmpg::security::CloudSigner::generate().expect("random");
    let key = signer.public();
    let signed = mmpg::wire::sign(&reply, &signer);
    let mut group = c.benchmark_group("signature");
    group.throughput(Throughput::Bytes(reply.len() as u64));
    group.bench_function("sign", |b| b.iter(|| mmpg::wire::sign(&reply, &signer)));
    group.bench_function("verify", |b| b.iter(|| mmpg::wire::open_signed(&signed, &key).expect("verifies").len()));
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20);
    targets = micro_batch
}
criterion_main!(benches);
