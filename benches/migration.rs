//! VM live migration with sandnic, against the comparisons docs/migration.md
//! holds it to, in one run (QEMU 7.2 TCG guests, the host flood-pinging the
//! guest every 2 ms):
//!
//! - **Local migration** (RAM shared in a file, `x-ignore-shared`): both
//!   QEMUs on one sandnic — the TAP never changes — against QEMU's own
//!   `-netdev tap` moving to a new TAP on a bridge. Rounds alternate.
//! - **Migration that copies RAM** (dirty logging): two sandnic processes
//!   on two TAPs on a bridge, against two `dpdk-testpmd` (vhost PMD +
//!   `net_tap`) the same way.
//!
//! Per migration: QEMU's total time and downtime, the largest gap between
//! replies over the whole ping and across the switch, and the probes lost
//! (all of them, and those outside QEMU's test window [migrate − 50 ms,
//! destination resumed + 50 ms]).
//!
//! `scripts/bench migration` (needs root and QEMU; DPDK for its part).

use sandnic::dpdk::{Peer, Testpmd};
use sandnic::guest::{self, Kind, QemuOptions};
use sandnic::harness::{bench_should_run, network_unavailable, NetNs, Sandnic, ScratchDir};
use sandnic::migration::{
    guest_script, migrate, switch_gap, MigrationReport, SharedRam, Vm, GUEST_IP, GUEST_MAC,
};
use sandnic::ping::FloodPing;
use std::path::Path;
use std::time::Duration;

const LOCAL_ROUNDS: usize = 5;
const COPY_ROUNDS: usize = 5;
const SLACK: f64 = 0.05;
/// QEMU's `downtime-limit` for the migrations that copy RAM (see
/// `copy_migration`).
const DOWNTIME_LIMIT_MS: u64 = 20;

/// One migration as the flood ping saw it.
#[derive(Debug, Clone, Copy)]
struct Outcome {
    total_ms: u64,
    downtime_ms: u64,
    largest_gap_ms: f64,
    switch_gap_ms: f64,
    lost: usize,
    lost_outside: usize,
}

fn main() {
    if !bench_should_run("migration benches", || {
        network_unavailable().or_else(|| guest::unavailable(Kind::Qemu))
    }) {
        return;
    }
    let mut sandnic_local = Vec::new();
    let mut qemu_local = Vec::new();
    for round in 0..LOCAL_ROUNDS {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on_sandnic in order {
            let outcome = local_migration(on_sandnic, round);
            eprintln!(
                "local, {}: {outcome:?}",
                if on_sandnic { "sandnic" } else { "qemu tap" }
            );
            if on_sandnic {
                sandnic_local.push(outcome);
            } else {
                qemu_local.push(outcome);
            }
        }
    }
    let mut sandnic_copy = Vec::new();
    let mut dpdk_copy = Vec::new();
    for round in 0..COPY_ROUNDS {
        let order = if round % 2 == 0 {
            [true, false]
        } else {
            [false, true]
        };
        for on_sandnic in order {
            match copy_migration(on_sandnic, round) {
                Some(outcome) => {
                    eprintln!(
                        "copy, {}: {outcome:?}",
                        if on_sandnic { "sandnic" } else { "dpdk" }
                    );
                    if on_sandnic {
                        sandnic_copy.push(outcome);
                    } else {
                        dpdk_copy.push(outcome);
                    }
                }
                None => eprintln!("copy, dpdk: skipped"),
            }
        }
    }
    println!("| migration | backend | rounds | total ms (median) | QEMU downtime ms (median) | largest gap ms (median, range) | gap across the switch ms (median, range) | probes lost (all) | lost outside QEMU's window |");
    println!("|---|---|---|---|---|---|---|---|---|");
    row("local, one TAP", "sandnic", &sandnic_local);
    row(
        "local, new TAP on a bridge",
        "QEMU -netdev tap",
        &qemu_local,
    );
    row(
        "copies RAM, two TAPs on a bridge",
        "sandnic ×2",
        &sandnic_copy,
    );
    row(
        "copies RAM, two TAPs on a bridge",
        "dpdk-testpmd ×2",
        &dpdk_copy,
    );
    ratio(
        "local: sandnic / QEMU tap, largest gap",
        &sandnic_local,
        &qemu_local,
        |o| o.largest_gap_ms,
    );
    ratio(
        "local: sandnic / QEMU tap, gap across the switch",
        &sandnic_local,
        &qemu_local,
        |o| o.switch_gap_ms,
    );
    ratio(
        "copy: sandnic / DPDK, largest gap",
        &sandnic_copy,
        &dpdk_copy,
        |o| o.largest_gap_ms,
    );
    ratio(
        "copy: sandnic / DPDK, gap across the switch",
        &sandnic_copy,
        &dpdk_copy,
        |o| o.switch_gap_ms,
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    (v[(n - 1) / 2] + v[n / 2]) / 2.0
}

fn row(what: &str, backend: &str, outcomes: &[Outcome]) {
    if outcomes.is_empty() {
        println!("| {what} | {backend} | 0 | — | — | — | — | — | — |");
        return;
    }
    let col = |f: fn(&Outcome) -> f64| outcomes.iter().map(f).collect::<Vec<_>>();
    let range = |v: Vec<f64>| {
        let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = v.iter().copied().fold(0.0, f64::max);
        format!("{:.1} ({lo:.1}–{hi:.1})", median(v))
    };
    println!(
        "| {what} | {backend} | {} | {:.0} | {:.0} | {} | {} | {} | {} |",
        outcomes.len(),
        median(col(|o| o.total_ms as f64)),
        median(col(|o| o.downtime_ms as f64)),
        range(col(|o| o.largest_gap_ms)),
        range(col(|o| o.switch_gap_ms)),
        outcomes.iter().map(|o| o.lost).sum::<usize>(),
        outcomes.iter().map(|o| o.lost_outside).sum::<usize>(),
    );
}

/// Median of the per-round ratios (rounds paired in order).
fn ratio(what: &str, a: &[Outcome], b: &[Outcome], f: fn(&Outcome) -> f64) {
    let ratios: Vec<f64> = a.iter().zip(b).map(|(x, y)| f(x) / f(y)).collect();
    if !ratios.is_empty() {
        println!(
            "\n{what}: median {:.2}× over {} paired rounds",
            median(ratios),
            a.len()
        );
    }
}

/// Flood-pings the guest while migrating `source` to `destination`.
fn measured_migration(
    ns: &NetNs,
    dir: &Path,
    source: &mut Vm,
    destination: &mut Vm,
    uri: &str,
) -> Outcome {
    let ping = FloodPing::every(ns, GUEST_IP, "0.002", &dir.join("ping.log")).unwrap();
    std::thread::sleep(Duration::from_millis(1000));
    let m: MigrationReport =
        migrate(source, destination, uri, Duration::from_secs(120)).expect("migration");
    std::thread::sleep(Duration::from_millis(1000));
    let _ = source.qmp.execute("quit", serde_json::json!({}));
    let ping = ping.stop().unwrap();
    Outcome {
        total_ms: m.total_ms,
        downtime_ms: m.downtime_ms,
        largest_gap_ms: ping.largest_gap() * 1e3,
        switch_gap_ms: switch_gap(&ping.times, &m) * 1e3,
        lost: ping.lost().len(),
        lost_outside: ping
            .lost_outside(m.started - SLACK, m.resumed + SLACK)
            .len(),
    }
}

fn local_migration(on_sandnic: bool, round: usize) -> Outcome {
    let ns = NetNs::new().unwrap();
    let dir = ScratchDir::new().unwrap();
    let ram = SharedRam::new(&format!("bench-local-{round}"));
    let base = QemuOptions {
        ram_file: Some(ram.0.clone()),
        mac: Some(GUEST_MAC.into()),
        ..QemuOptions::default()
    };
    let sandnic;
    let (socket, src_opts, dst_opts) = if on_sandnic {
        ns.add_tap("tap0", "10.88.0.1/24").unwrap();
        sandnic = Some(Sandnic::serve(&ns, &dir, &["--tap", "tap0"]).unwrap());
        let socket = sandnic.as_ref().unwrap().socket.clone();
        (socket, base.clone(), base)
    } else {
        sandnic = None;
        ns.add_bridge("br0", "10.88.0.1/24").unwrap();
        ns.add_bridged_tap("tapa", "br0", false).unwrap();
        ns.add_bridged_tap("tapb", "br0", false).unwrap();
        let on_tap = |tap: &str| QemuOptions {
            tap: Some(tap.into()),
            netns: Some(ns.name.clone()),
            ..base.clone()
        };
        (dir.path("unused.sock"), on_tap("tapa"), on_tap("tapb"))
    };
    let script = guest_script(1, "");
    let mut source = Vm::start("source", &dir.0, &socket, &script, src_opts).unwrap();
    source
        .wait_console("GUEST-READY", Duration::from_secs(90))
        .unwrap();
    let uri = format!("unix:{}", dir.path("migration.sock").display());
    let dst_opts = QemuOptions {
        incoming: Some(uri.clone()),
        ..dst_opts
    };
    let mut destination = Vm::start("destination", &dir.0, &socket, &script, dst_opts).unwrap();
    for vm in [&mut source, &mut destination] {
        vm.set_capabilities(&["x-ignore-shared"]).unwrap();
    }
    let outcome = measured_migration(&ns, &dir.0, &mut source, &mut destination, &uri);
    drop(sandnic);
    outcome
}

fn copy_migration(on_sandnic: bool, round: usize) -> Option<Outcome> {
    let ns = NetNs::new().unwrap();
    let dir = ScratchDir::new().unwrap();
    ns.add_bridge("br0", "10.88.0.1/24").unwrap();
    let (mut sandnics, mut testpmds) = (Vec::new(), Vec::new());
    let dirs = [ScratchDir::new().unwrap(), ScratchDir::new().unwrap()];
    let sockets = if on_sandnic {
        let mut sockets = Vec::new();
        for (i, d) in dirs.iter().enumerate() {
            let tap = format!("tap{i}");
            ns.add_bridged_tap(&tap, "br0", true).unwrap();
            let s = Sandnic::serve(&ns, d, &["--tap", &tap]).unwrap();
            sockets.push(s.socket.clone());
            sandnics.push(s);
        }
        sockets
    } else {
        let mut sockets = Vec::new();
        for i in 0..2 {
            let name = format!("testpmd{round}{i}");
            let tap = format!("dtap{i}");
            let t = Testpmd::start(&ns, &dir, &name, Peer::Tap(&tap), 1, 1)?;
            ns.ip(&["link", "set", &tap, "master", "br0"]).unwrap();
            sockets.push(t.socket.clone());
            testpmds.push(t);
        }
        sockets
    };
    let qemu = QemuOptions {
        mac: Some(GUEST_MAC.into()),
        ..QemuOptions::default()
    };
    let script = guest_script(1, "");
    let mut source = Vm::start("source", &dir.0, &sockets[0], &script, qemu.clone()).unwrap();
    source
        .wait_console("GUEST-READY", Duration::from_secs(90))
        .unwrap();
    let uri = format!("unix:{}", dir.path("migration.sock").display());
    let incoming = QemuOptions {
        incoming: Some(uri.clone()),
        ..qemu
    };
    let mut destination = Vm::start("destination", &dir.0, &sockets[1], &script, incoming).unwrap();
    // QEMU stops the guest once the RAM still to send fits in
    // `downtime-limit` at the bandwidth it measured (300 ms by default).
    // Traced here, the backend's own share of the pause is about 1 ms
    // (GET_VRING_BASE on the source, the ring set-up on the destination);
    // the rest is that last RAM copy, whose size depends on where QEMU's
    // 100 ms checks fall. A limit well under the default (the same for
    // both backends) makes QEMU iterate until little is left, so the gap
    // measures the backends rather than that phase.
    source
        .qmp
        .execute(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": 4u64 << 30, "downtime-limit": DOWNTIME_LIMIT_MS }),
        )
        .unwrap();
    let outcome = measured_migration(&ns, &dir.0, &mut source, &mut destination, &uri);
    drop((sandnics, testpmds, dirs));
    Some(outcome)
}
