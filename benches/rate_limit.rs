//! What a rate limit costs (`scripts/bench rate_limit`):
//!
//! - **CPU while throttled**: one pair flooded each way (the test frontend
//!   keeps the TX ring full; a packet socket floods the TAP), first with no
//!   limit (line rate, and the CPU sandnic spends on it), then held to 10 %
//!   of that line rate. A throttled device must not spin: its CPU should
//!   fall with the traffic it passes. Printed: both rates, both CPU shares,
//!   and CPU per byte throttled / unthrottled (1.0 = exactly proportional).
//! - **A limit far above the achievable rate** against none: the paired
//!   rounds `tx-limit-*` and `rx-limit-*` of the datapath bench
//!   (`scripts/bench datapath`), which compare two processes on one
//!   machine.
//!
//! Needs root; skips loudly otherwise.

use sandnic::flood::{flooded, measure, set_limit, Way, FULL};
use sandnic::frontend::NicConfig;
use sandnic::harness::{bench_should_run, cpu_seconds, network_unavailable, Rig};
use serde_json::json;
use std::time::{Duration, Instant};

const SPAN: Duration = Duration::from_secs(3);

/// Bytes per second through the TAP and sandnic's CPU share over `SPAN`,
/// the flood already running.
fn rate_and_cpu(rig: &mut Rig, way: Way) -> (f64, f64) {
    let pid = rig.sandnic.child.id();
    flooded(rig, way, 1, FULL, |ns, _| {
        std::thread::sleep(Duration::from_millis(500));
        let (cpu, t) = (cpu_seconds(pid), Instant::now());
        let (bytes, _) = measure(ns, way, SPAN);
        (bytes, (cpu_seconds(pid) - cpu) / t.elapsed().as_secs_f64())
    })
}

fn main() {
    if !bench_should_run("rate_limit", network_unavailable) {
        return;
    }
    println!(
        "| way | line rate | CPU | held to 10 % | CPU | CPU per byte, throttled / line rate |"
    );
    println!("|---|---|---|---|---|---|");
    for way in [Way::Tx, Way::Rx] {
        let mut rig = Rig::new(&[], NicConfig::default()).expect("rig");
        let (line, cpu_line) = rate_and_cpu(&mut rig, way);
        let tenth = (line / 10.0) as u64;
        set_limit(&rig.sandnic, way, json!({ "bytes": tenth }));
        let (held, cpu_held) = rate_and_cpu(&mut rig, way);
        println!(
            "| {} | {:.0} MB/s | {:.0} % | {:.0} MB/s | {:.1} % | {:.2} |",
            way.name(),
            line / 1e6,
            cpu_line * 100.0,
            held / 1e6,
            cpu_held * 100.0,
            (cpu_held / held) / (cpu_line / line)
        );
    }
}
