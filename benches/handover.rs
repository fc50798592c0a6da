//! Handover downtime and swap pause over many runs, under traffic, with the
//! frames lost counted: live handover with fd passing, the new-TAP path for
//! comparison, and hot swap. Then a UML guest under flood ping with and
//! without handovers in the same run (the largest gap between replies).
//! Last, handovers on a busy host (a spinning thread per core): downtime
//! percentiles and, for the slowest, the pause step by step.
//!
//! `cargo bench --bench handover` (needs root). Prints a table; the numbers
//! go to docs/performance.md.

use sandnic::frontend::NicConfig;
use sandnic::guest::{self, GuestRig, Kind};
use sandnic::harness::{bench_should_run, network_unavailable, Rig, Sandnic};
use sandnic::ping::FloodPing;
use sandnic::traffic;
use serde_json::{json, Value};
use std::time::Duration;

const RUNS: usize = 20;
const RATE: u64 = 50_000;

fn main() {
    if !bench_should_run("handover benches", network_unavailable) {
        return;
    }
    println!("| measurement ({RUNS} runs, {RATE} frames/s each way) | median | p99 | max | frames lost |");
    println!("|---|---|---|---|---|");
    handovers(false);
    handovers(true);
    swaps();
    busy_handovers();
    for kind in [Kind::Uml, Kind::Qemu] {
        match guest::unavailable(kind) {
            None => flood_ping(kind),
            Some(why) => eprintln!("\n*** SKIPPED {kind:?} flood ping: {why} ***\n"),
        }
    }
}

fn percentile(values: &mut [u64], p: f64) -> u64 {
    values.sort_unstable();
    let rank = ((p / 100.0) * (values.len() - 1) as f64).round() as usize;
    values[rank]
}

fn row(name: &str, mut values: Vec<u64>, lost: u64) {
    let (median, p99, max) = (
        percentile(&mut values, 50.0),
        percentile(&mut values, 99.0),
        percentile(&mut values, 100.0),
    );
    println!("| {name} | {median} µs | {p99} µs | {max} µs | {lost} |");
}

/// RUNS handovers in a row (each to a fresh process) while traffic flows.
fn handovers(new_tap: bool) {
    let rig = Rig::new(&[], NicConfig::default()).expect("rig");
    let Rig {
        mut nic,
        sandnic,
        ns,
        tap_mac,
        dir,
        ..
    } = rig;
    let spacing = Duration::from_millis(250);
    let duration = spacing * (RUNS as u32 + 2);
    let mut current = Some(sandnic);
    let report = traffic::run(&mut nic, &ns, tap_mac, RATE, duration, spacing, || {
        let mut downtimes = Vec::new();
        let args: &[&str] = if new_tap { &["--new-tap"] } else { &[] };
        for i in 0..RUNS {
            let source = current.take().expect("running sandnic");
            let (next, path) =
                Sandnic::incoming(&ns, &dir, &format!("h{new_tap}{i}"), &source, args)
                    .expect("destination");
            let reply = source.handover(&path, new_tap).expect("handover");
            assert_eq!(reply["ok"], true, "{reply}\n{}", next.log());
            downtimes.push(reply["downtime_us"].as_u64().unwrap_or(0));
            current = Some(next);
            std::thread::sleep(Duration::from_millis(200));
        }
        downtimes
    });
    let name = if new_tap {
        "handover, new-TAP path (TAP reopened by name)"
    } else {
        "handover, fd passing"
    };
    row(
        &format!("{name}: downtime"),
        report.result.clone(),
        report.lost(),
    );
}

/// Handovers on a busy host: a thread spinning on every core the whole
/// time (as a guest's vCPUs would), light traffic both ways. Downtime
/// percentiles, and for the slowest handovers the pause step by step.
fn busy_handovers() {
    const BUSY_RUNS: usize = 30;
    const BUSY_RATE: u64 = 10_000;
    let rig = Rig::new(&[], NicConfig::default()).expect("rig");
    let Rig {
        mut nic,
        sandnic,
        ns,
        tap_mac,
        dir,
        ..
    } = rig;
    let neighbour = Neighbour::start();
    let spacing = Duration::from_millis(150);
    let duration = spacing * (BUSY_RUNS as u32 + 4);
    let mut current = Some(sandnic);
    let report = traffic::run(&mut nic, &ns, tap_mac, BUSY_RATE, duration, spacing, || {
        let mut replies = Vec::new();
        for i in 0..BUSY_RUNS {
            let source = current.take().expect("running sandnic");
            let (next, path) = Sandnic::incoming(&ns, &dir, &format!("busy{i}"), &source, &[])
                .expect("destination");
            let reply = source.handover(&path, false).expect("handover");
            assert_eq!(reply["ok"], true, "{reply}\n{}", next.log());
            replies.push(reply);
            current = Some(next);
            std::thread::sleep(Duration::from_millis(100));
        }
        replies
    });
    drop(neighbour);
    let downtime = |r: &Value| r["downtime_us"].as_u64().unwrap_or(0);
    let mut downtimes: Vec<u64> = report.result.iter().map(downtime).collect();
    let (p50, p90, p99, max) = (
        percentile(&mut downtimes, 50.0),
        percentile(&mut downtimes, 90.0),
        percentile(&mut downtimes, 99.0),
        percentile(&mut downtimes, 100.0),
    );
    println!();
    println!("| handover on a busy host ({BUSY_RUNS} runs, a spinning thread per core, {BUSY_RATE} frames/s each way) | p50 | p90 | p99 | max | frames lost |");
    println!("|---|---|---|---|---|---|");
    println!(
        "| downtime | {p50} µs | {p90} µs | {p99} µs | {max} µs | {} |",
        report.lost()
    );
    let prepare = |r: &Value| r["prepare_us"].as_u64().unwrap_or(0);
    let mut prepares: Vec<u64> = report.result.iter().map(prepare).collect();
    println!(
        "| preparation, device running (not in the pause) | {} µs | {} µs | {} µs | {} µs | |",
        percentile(&mut prepares, 50.0),
        percentile(&mut prepares, 90.0),
        percentile(&mut prepares, 99.0),
        percentile(&mut prepares, 100.0),
    );
    let mut slowest = report.result.clone();
    slowest.sort_by_key(|r| std::cmp::Reverse(downtime(r)));
    println!();
    println!("slowest handovers, the pause by step (µs):");
    for reply in slowest.iter().take(3) {
        println!("  {} µs: {}", downtime(reply), reply["phases_us"]);
    }
}

/// One thread per CPU spinning until dropped.
struct Neighbour {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Neighbour {
    fn start() -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let cpus = std::thread::available_parallelism().map_or(2, |n| n.get());
        let threads = (0..cpus)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    while !stop.load(Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Neighbour {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn swaps() {
    let mut rig = Rig::new(&[], NicConfig::default()).expect("rig");
    let api = rig.sandnic.api.clone();
    let spacing = Duration::from_millis(100);
    let duration = spacing * (RUNS as u32 + 5);
    let v2 = sandnic_host::sandbox::components::built::v2();
    let report = traffic::run(
        &mut rig.nic,
        &rig.ns,
        rig.tap_mac,
        RATE,
        duration,
        spacing,
        move || {
            let mut pauses = Vec::new();
            for _ in 0..RUNS {
                let (reply, _) =
                    sandnic_host::api::client(&api, json!({"cmd": "swap", "component": v2}))
                        .expect("swap");
                assert_eq!(reply["ok"], true, "{reply}");
                pauses.push(reply["pause_us"].as_u64().unwrap_or(0));
                std::thread::sleep(Duration::from_millis(80));
            }
            pauses
        },
    );
    row(
        "hot swap (v2 → v2): pause",
        report.result.clone(),
        report.lost(),
    );
}

/// A guest under flood ping: the largest gap between replies over the same
/// time with no handover, then with three handovers.
fn flood_ping(kind: Kind) {
    // UML waits on the shared directory; QEMU (no hostfs) stays up for a
    // fixed time.
    let script = match kind {
        Kind::Uml => "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\nstep ready x\n",
        Kind::Qemu => {
            "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\necho GUEST-READY\nsleep 40\n"
        }
    };
    let GuestRig {
        guest,
        hostdir,
        sandnic: first,
        ns,
        dir,
    } = GuestRig::boot(kind, &[], script).unwrap();
    match kind {
        Kind::Uml => drop(
            hostdir
                .wait_for("ready", Duration::from_secs(60), &guest)
                .unwrap(),
        ),
        Kind::Qemu => {
            let deadline = std::time::Instant::now() + Duration::from_secs(60);
            while !guest.console().contains("GUEST-READY") {
                assert!(std::time::Instant::now() < deadline, "{}", guest.console());
                std::thread::sleep(Duration::from_millis(50));
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    let window = Duration::from_secs(3);
    let ping = FloodPing::start(&ns, "10.88.0.2", &dir.path("quiet.log")).unwrap();
    std::thread::sleep(window);
    let quiet = ping.stop().unwrap();
    let ping = FloodPing::start(&ns, "10.88.0.2", &dir.path("handover.log")).unwrap();
    let mut current = first;
    let mut downtimes = Vec::new();
    for i in 0..3 {
        std::thread::sleep(window / 4);
        let user = ["--user", sandnic::harness::UNPRIVILEGED_USER];
        let (next, path) = Sandnic::incoming(&ns, &dir, &format!("g{i}"), &current, &user).unwrap();
        let reply: Value = current.handover(&path, false).unwrap();
        assert_eq!(reply["ok"], true, "{reply}");
        downtimes.push(reply["downtime_us"].as_u64().unwrap_or(0));
        current = next;
    }
    std::thread::sleep(window / 4);
    let busy = ping.stop().unwrap();
    hostdir.release("ready");
    drop(guest);
    let lost = |r: &sandnic::ping::PingReport| r.transmitted.saturating_sub(r.received);
    println!();
    println!("| {kind:?} guest, flood ping (`ping -i 0 -D`) for {window:?} | replies | unanswered | largest gap |");
    println!("|---|---|---|---|");
    println!(
        "| no handover | {} | {} | {:.1} ms |",
        quiet.received,
        lost(&quiet),
        quiet.largest_gap() * 1000.0
    );
    println!(
        "| 3 handovers (downtimes {downtimes:?} µs) | {} | {} | {:.1} ms |",
        busy.received,
        lost(&busy),
        busy.largest_gap() * 1000.0
    );
}
