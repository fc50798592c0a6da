//! What a `kill -9` of sandnic costs a QEMU TCG guest pinged every 2 ms
//! from the host, in each way a device comes back (`scripts/bench crash`):
//!
//! - **fd store**: sandnic under the stand-in service manager
//!   (`sandnic::service_manager`, RestartSec=0) with its fds stored; QEMU
//!   7.2 with its defaults (no `reconnect=`);
//! - **client mode**: QEMU 7.2 listens (`server=on,wait=off`), the manager
//!   starts a new `sandnic serve --connect` at once, with no store;
//! - **server mode with QEMU's reconnect**: a new `sandnic serve --socket`
//!   at once, no store; QEMU 7.2 with `reconnect=1` (seconds) and QEMU
//!   10.0 with `reconnect-ms=100`.
//!
//! Per kill: the gap in the replies around it, and how long the new
//! process took to say READY. Per mode: the gaps' distribution, probes
//! lost, duplicate replies, and kills after which traffic never came back.
//! `SANDNIC_CRASH_KILLS` kills per mode (default 20).

use sandnic::guest::{self, Guest, GuestOptions, Kind, QemuBuild, QemuOptions};
use sandnic::harness::{bench_should_run, network_unavailable, NetNs, ScratchDir};
use sandnic::ping::{FloodPing, PingReport};
use sandnic::service_manager::ServiceManager;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Between two kills: room for the slowest way back (QEMU 7.2's reconnect
/// timer counts whole seconds, then ARP's one-second retransmit).
const SPACING: Duration = Duration::from_millis(3500);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    FdStore,
    Client,
    ServerReconnect(QemuBuild),
}

impl Mode {
    fn name(self) -> String {
        match self {
            Self::FdStore => "fd store (RestartSec=0), QEMU 7.2 without reconnect".into(),
            Self::Client => "client mode (--connect), QEMU 7.2 server=on".into(),
            Self::ServerReconnect(QemuBuild::Debian) => "server mode, QEMU 7.2 reconnect=1".into(),
            Self::ServerReconnect(b) => format!("server mode, {} reconnect-ms=100", b.name()),
        }
    }
}

struct ModeReport {
    kills: usize,
    /// The gap in the replies around each kill (ms); None: no reply came
    /// after it.
    gaps: Vec<Option<f64>>,
    ready_ms: Vec<f64>,
    lost: usize,
    duplicates: usize,
}

fn main() {
    if !bench_should_run("crash bench", || {
        network_unavailable()
            .or_else(|| guest::unavailable(Kind::Qemu))
            .or_else(|| QemuBuild::Backports.unavailable())
    }) {
        return;
    }
    let kills = std::env::var("SANDNIC_CRASH_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    let modes = [
        Mode::FdStore,
        Mode::Client,
        Mode::ServerReconnect(QemuBuild::Debian),
        Mode::ServerReconnect(QemuBuild::Backports),
    ];
    println!("| how it comes back | kills | traffic back | gap median | gap p90 | gap max | probes lost | duplicates | new process ready (median) |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for mode in modes {
        match run(mode, kills) {
            Ok(r) => print_row(mode, &r),
            Err(e) => println!("| {} | failed: {e:#} |", mode.name()),
        }
    }
}

fn print_row(mode: Mode, r: &ModeReport) {
    let mut gaps: Vec<f64> = r.gaps.iter().flatten().copied().collect();
    gaps.sort_by(f64::total_cmp);
    let pick = |q: f64| {
        gaps.get(((gaps.len() as f64 - 1.0) * q).round() as usize)
            .map_or("-".to_string(), |g| format!("{g:.0} ms"))
    };
    let mut ready = r.ready_ms.clone();
    ready.sort_by(f64::total_cmp);
    println!(
        "| {} | {} | {}/{} | {} | {} | {} | {} | {} | {} |",
        mode.name(),
        r.kills,
        gaps.len(),
        r.kills,
        pick(0.5),
        pick(0.9),
        pick(1.0),
        r.lost,
        r.duplicates,
        ready
            .get(ready.len() / 2)
            .map_or("-".into(), |m| format!("{m:.0} ms"))
    );
}

fn run(mode: Mode, kills: usize) -> anyhow::Result<ModeReport> {
    let ns = NetNs::new()?;
    ns.add_tap("tap0", "10.88.0.1/24")?;
    let dir = ScratchDir::new()?;
    let vhost = dir.path("vhost.sock");
    let vhost_arg = vhost.to_str().expect("utf-8 path");
    let (flag, limit, build, server, chardev) = match mode {
        Mode::FdStore => ("--socket", 64, QemuBuild::Debian, false, None),
        Mode::Client => ("--connect", 0, QemuBuild::Debian, true, None),
        Mode::ServerReconnect(QemuBuild::Debian) => {
            ("--socket", 0, QemuBuild::Debian, false, Some("reconnect=1"))
        }
        Mode::ServerReconnect(b) => ("--socket", 0, b, false, Some("reconnect-ms=100")),
    };
    let args = [flag, vhost_arg, "--tap", "tap0"];
    // Client mode: QEMU listens first (it waits for the backend at start).
    let (manager, qemu) = if server {
        let qemu = boot(&dir, &vhost, build, server, chardev)?;
        (ServiceManager::start(&ns, &dir, &args, limit)?, qemu)
    } else {
        let manager = ServiceManager::start(&ns, &dir, &args, limit)?;
        (manager, boot(&dir, &vhost, build, server, chardev)?)
    };
    let answers = || {
        ns.command("ping")
            .args(["-c", "1", "-W", "1", "10.88.0.2"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let deadline = Instant::now() + Duration::from_secs(90);
    while !answers() {
        anyhow::ensure!(
            Instant::now() < deadline,
            "the guest never answered: {}",
            qemu.console()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let ping = FloodPing::every(&ns, "10.88.0.2", "0.002", &dir.path("ping.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut killed_at = Vec::new();
    let mut ready_ms = Vec::new();
    for i in 0..kills {
        let at = Instant::now();
        killed_at.push(unix_now());
        manager.signal_main(nix::sys::signal::Signal::SIGKILL);
        if manager.wait_ready(i + 2, Duration::from_secs(20)).is_ok() {
            if let Some(ready) = manager.ready_times().last() {
                ready_ms.push(ready.duration_since(at).as_secs_f64() * 1000.0);
            }
        }
        std::thread::sleep(SPACING);
    }
    let report = ping.stop()?;
    drop(qemu);
    drop(manager);
    Ok(ModeReport {
        kills,
        gaps: killed_at.iter().map(|&t| gap_around(&report, t)).collect(),
        ready_ms,
        lost: report.lost().len(),
        duplicates: duplicates(&report),
    })
}

fn boot(
    dir: &ScratchDir,
    vhost: &std::path::Path,
    build: QemuBuild,
    server: bool,
    chardev: Option<&str>,
) -> anyhow::Result<Guest> {
    let script = "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\n\
                  i=0; while [ $i -lt 6000 ]; do sleep 0.1; i=$((i+1)); done\n";
    Guest::boot(GuestOptions {
        kind: Kind::Qemu,
        socket: vhost,
        script: &format!("{}{script}", guest::STEP_FN),
        hostdir: None,
        console: dir.path("console.log"),
        qemu: QemuOptions {
            build,
            server,
            chardev_options: chardev.map(str::to_string),
            ..QemuOptions::default()
        },
    })
}

fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// The gap between the last reply before `t` and the first after it (ms);
/// None if no reply came after it.
fn gap_around(report: &PingReport, t: f64) -> Option<f64> {
    let before = report
        .times
        .iter()
        .copied()
        .filter(|&x| x <= t)
        .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))?;
    let after = report.times.iter().copied().find(|&x| x > t)?;
    Some((after - before) * 1000.0)
}

/// Replies whose sequence number came before (ping's "DUP!").
fn duplicates(report: &PingReport) -> usize {
    let mut seen = std::collections::HashSet::new();
    report
        .reply_seqs
        .iter()
        .filter(|&&s| !seen.insert(s))
        .count()
}
