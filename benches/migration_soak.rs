//! The long migration soak (`scripts/bench migration_soak`): chains of
//! live migrations of a QEMU TCG guest on sandnic under a CPU hog, every
//! variant of `sandnic::soak` on QEMU 10.0 and on Debian 12's QEMU 7.2,
//! and copied-RAM migrations between two DPDK vhost backends on QEMU 7.2
//! for comparison. Every migration is checked as the short soak in the
//! tests checks it; this prints how many of each kind came out clean, how
//! many QEMU 7.2's lost guest writes spoiled, what those lost, and what
//! caused the largest gaps.
//!
//! `SANDNIC_SOAK_ROUNDS` migrations per sandnic variant (default 13: 52
//! per kind of migration on each QEMU), `SANDNIC_SOAK_QEMU72_ROUNDS` in
//! place of it for QEMU 7.2 (whose rate of lost writes needs fewer runs
//! to show), `SANDNIC_SOAK_STREAM_ROUNDS`
//! copied-RAM migrations with a TCP stream into the guest per QEMU
//! (default 20), `SANDNIC_SOAK_DPDK_ROUNDS` of those between DPDK
//! backends on QEMU 7.2 (default 20).

use sandnic::guest::{self, Kind, QemuBuild};
use sandnic::harness::{bench_should_run, network_unavailable};
use sandnic::soak::{run_chain, Backend, Outcome, Tally, Variant};
use std::collections::BTreeMap;

fn env_rounds(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    if !bench_should_run("migration soak", || {
        network_unavailable()
            .or_else(|| guest::unavailable(Kind::Qemu))
            .or_else(|| QemuBuild::Backports.unavailable())
    }) {
        return;
    }
    let rounds = env_rounds("SANDNIC_SOAK_ROUNDS", 13);
    let dpdk_rounds = env_rounds("SANDNIC_SOAK_DPDK_ROUNDS", 20);
    let stream_rounds = env_rounds("SANDNIC_SOAK_STREAM_ROUNDS", 20);
    let qemu72_rounds = env_rounds("SANDNIC_SOAK_QEMU72_ROUNDS", rounds);
    let mut variants = Vec::new();
    for (qemu, rounds) in [
        (QemuBuild::Backports, rounds),
        (QemuBuild::Debian, qemu72_rounds),
    ] {
        variants.extend(Variant::all_sandnic(qemu).into_iter().map(|v| (v, rounds)));
        variants.push((
            Variant::copy_with_stream(Backend::Sandnic, qemu),
            stream_rounds,
        ));
    }
    variants.push((
        Variant::copy_with_stream(Backend::Dpdk, QemuBuild::Debian),
        dpdk_rounds,
    ));
    // Per (QEMU, backend, kind): the tally, and what went wrong.
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut faults = Vec::new();
    for (variant, rounds) in variants {
        let key = format!(
            "{} | {:?} | {:?}{}",
            variant.qemu.name(),
            variant.backend,
            variant.kind,
            if variant.stream { " + TCP stream" } else { "" }
        );
        let result = run_chain(variant, rounds, |o| {
            eprintln!("{}", line(o));
            tallies.entry(key.clone()).or_default().add(o);
            if let Some(fault) = o.fault() {
                faults.push(format!(
                    "{} ({}): {fault}",
                    variant.name(),
                    if o.known_frontend_bug() {
                        "QEMU 7.2's lost write"
                    } else {
                        "unexplained"
                    }
                ));
            }
        });
        if let Err(e) = result {
            faults.push(format!("{}: the chain failed: {e:#}", variant.name()));
        }
    }
    println!("| QEMU | backend | migration | migrations | clean | lost guest writes (QEMU 7.2's bug) | other faults | largest gap's cause |");
    println!("|---|---|---|---|---|---|---|---|");
    for (key, t) in &tallies {
        let mut causes: BTreeMap<String, usize> = BTreeMap::new();
        for c in &t.gap_causes {
            *causes.entry(format!("{c:?}")).or_default() += 1;
        }
        println!(
            "| {key} | {} | {} | {} | {} | {causes:?} |",
            t.migrations, t.clean, t.frontend_bug, t.other
        );
    }
    println!("\nWhat went wrong:");
    for fault in &faults {
        println!("- {fault}");
    }
}

fn line(o: &Outcome) -> String {
    format!(
        "{}: QEMU downtime {} ms, largest gap {:.1} ms ({:?}), {} lost, {} outside the window{}: {}",
        o.variant.name(),
        o.migration.downtime_ms,
        o.largest_gap_ms,
        o.gap_cause,
        o.lost,
        o.lost_outside.len(),
        o.outside_cause
            .map(|c| format!(" ({c:?})"))
            .unwrap_or_default(),
        o.fault().unwrap_or_else(|| "clean".into())
    )
}
