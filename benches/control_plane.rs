//! Control-plane latency through the sandbox vs the same device model
//! compiled natively, measured in the same run. `scripts/bench-report`
//! prints the wasm/native ratios from criterion's results.
//!
//! Groups: `handle-ctrl`, `read-config`, `set-features`, `save`, `load`
//! (each with `native` and `wasm`), `instantiate` (from the precompiled
//! cache) and `swap` (the pause of a hot swap).

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use sandnic_device::ctrl::{CtrlCommand, RxSwitch};
use sandnic_device::{Compat, DeviceConfig, NetDevice, Offloads};
use sandnic_host::sandbox::{components, ComponentSource, Runtime, SandboxedDevice};
use std::hint::black_box;
use std::sync::Arc;

fn config() -> DeviceConfig {
    DeviceConfig {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        max_queue_pairs: 2,
        mtu: Some(1500),
        backend_offloads: Offloads::all(),
        compat: Compat::default(),
    }
}

fn runtime() -> Arc<Runtime> {
    let cache = std::env::temp_dir().join("sandnic-bench-cache");
    Runtime::new(Default::default(), Some(cache)).expect("runtime")
}

/// A 64-byte control command: a MAC table with one unicast and eight
/// multicast addresses (2 + 4 + 6 + 4 + 48 = 64 bytes).
fn ctrl_command() -> Vec<u8> {
    let multicast = (0..8u8).map(|i| [0x01, 0x00, 0x5e, 0, 0, i]).collect();
    let command = CtrlCommand::MacTableSet {
        unicast: vec![[0x52, 0x54, 0, 0, 0, 0x42]],
        multicast,
    }
    .encode();
    assert_eq!(command.len(), 64);
    command
}

/// Both devices negotiated and with a busy filter table, so save/load carry
/// a realistic state.
fn devices(rt: &Arc<Runtime>) -> (NetDevice, SandboxedDevice) {
    let component = rt.load(&ComponentSource::Builtin).unwrap();
    let mut native = NetDevice::new(config()).unwrap();
    let mut wasm = SandboxedDevice::new(rt.clone(), component, config()).unwrap();
    let acked = native.device_features();
    native.set_features(acked).unwrap();
    wasm.set_features(acked).unwrap();
    for command in [
        ctrl_command(),
        CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
        CtrlCommand::VlanAdd(100).encode(),
    ] {
        native.handle_ctrl(&command);
        wasm.handle_ctrl(&command);
    }
    (native, wasm)
}

fn per_call(c: &mut Criterion) {
    let rt = runtime();
    let (mut native, mut wasm) = devices(&rt);
    let command = ctrl_command();
    let acked = native.device_features();
    let blob = native.save();

    let mut g = c.benchmark_group("handle-ctrl");
    g.bench_function("native", |b| {
        b.iter(|| black_box(native.handle_ctrl(black_box(&command))))
    });
    g.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.handle_ctrl(black_box(&command))))
    });
    g.finish();

    let mut g = c.benchmark_group("config-generation");
    g.bench_function("native", |b| {
        b.iter(|| black_box(native.config_generation()))
    });
    g.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.config_generation().unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("read-config");
    g.bench_function("native", |b| {
        b.iter(|| black_box(native.read_config(0, 12).unwrap()))
    });
    g.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.read_config(0, 12).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("set-features");
    g.bench_function("native", |b| {
        b.iter(|| black_box(native.set_features(black_box(acked)).unwrap()))
    });
    g.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.set_features(black_box(acked)).unwrap()))
    });
    g.finish();

    let mut g = c.benchmark_group("save");
    g.bench_function("native", |b| b.iter(|| black_box(native.save())));
    g.bench_function("wasm", |b| b.iter(|| black_box(wasm.save().unwrap())));
    g.finish();

    let mut g = c.benchmark_group("load");
    g.bench_function("native", |b| {
        b.iter(|| black_box(native.load(black_box(&blob)).unwrap()))
    });
    g.bench_function("wasm", |b| {
        b.iter(|| black_box(wasm.load(black_box(&blob)).unwrap()))
    });
    g.finish();
}

fn lifecycle(c: &mut Criterion) {
    let rt = runtime();
    let builtin = rt.load(&ComponentSource::Builtin).unwrap();
    let mut g = c.benchmark_group("instantiate");
    g.bench_function("deserialize-cached", |b| {
        b.iter(|| {
            black_box(
                rt.load(&ComponentSource::File(components::built::v1()))
                    .unwrap(),
            )
        })
    });
    g.bench_function("new-device", |b| {
        b.iter(|| black_box(SandboxedDevice::new(rt.clone(), builtin.clone(), config()).unwrap()))
    });
    g.finish();

    // Swap back and forth between two loads of the same component; the
    // reported time is the whole swap, which is the pause.
    let other = rt
        .load(&ComponentSource::File(components::built::v1()))
        .unwrap();
    let (_, mut device) = devices(&rt);
    let mut g = c.benchmark_group("swap");
    let mut targets = [other, builtin].into_iter().cycle();
    g.bench_function("pause", |b| {
        b.iter_batched(
            || targets.next().unwrap(),
            |target| black_box(device.swap(target).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, per_call, lifecycle);
criterion_main!(benches);
