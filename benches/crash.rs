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
//!
//! A second table says where each gap goes. A packet socket on the TAP's
//! host side timestamps the ARP requests the host sends and the guest's
//! ARP replies, and the API is polled for the moment the new process has
//! both rings of the pair running again (the frontend reconnected and set
//! them up; QEMU brings the guest's link back up then):
//! - *device back*: kill → rings running (the new process's start, QEMU's
//!   reconnect timer, the setup);
//! - *neighbour wait*: rings running → the host's ARP request that was
//!   answered (the host flushed its neighbour entry when the TAP lost its
//!   carrier, and asks again at ARP's retransmit);
//! - the kills after which the host needed ARP at all.

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
    /// Per kill, where its gap went (None: not measured).
    breakdown: Vec<Option<Breakdown>>,
}

/// Where one kill's gap went, in ms after the kill.
#[derive(Debug, Clone, Copy)]
struct Breakdown {
    /// Both rings of the pair running again in the new process.
    device_back: f64,
    /// The host's ARP request the guest answered, if the host asked.
    arp_answered: Option<f64>,
    /// ARP requests the host sent after the kill, answered or not.
    arp_requests: usize,
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
    let mut reports = Vec::new();
    for mode in modes {
        match run(mode, kills) {
            Ok(r) => {
                print_row(mode, &r);
                reports.push((mode, r));
            }
            Err(e) => println!("| {} | failed: {e:#} |", mode.name()),
        }
    }
    println!();
    println!("| where the gap goes | device back (median / max) | kills whose reply waited for ARP | of those, waited for ARP's 1 s retransmit | neighbour wait after device back (median / max) |");
    println!("|---|---|---|---|---|");
    for (mode, r) in &reports {
        print_breakdown(*mode, r);
    }
}

fn print_breakdown(mode: Mode, r: &ModeReport) {
    let measured: Vec<Breakdown> = r.breakdown.iter().flatten().copied().collect();
    let median_max = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        match (v.get(v.len() / 2), v.last()) {
            (Some(m), Some(x)) => format!("{m:.0} / {x:.0} ms"),
            _ => "-".into(),
        }
    };
    let back = median_max(measured.iter().map(|b| b.device_back).collect());
    let arped: Vec<&Breakdown> = measured.iter().filter(|b| b.arp_requests > 0).collect();
    let waits: Vec<f64> = arped
        .iter()
        .filter_map(|b| b.arp_answered.map(|a| (a - b.device_back).max(0.0)))
        .collect();
    let retransmits = waits.iter().filter(|&&w| w > 500.0).count();
    println!(
        "| {} | {back} | {}/{} | {retransmits} | {} |",
        mode.name(),
        arped.len(),
        measured.len(),
        median_max(waits)
    );
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
    let api = dir.path("api.sock");
    let args = [
        flag,
        vhost_arg,
        "--tap",
        "tap0",
        "--api",
        api.to_str().expect("utf-8 path"),
    ];
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
    let capture = ArpCapture::start(&ns)?;
    let ping = FloodPing::every(&ns, "10.88.0.2", "0.002", &dir.path("ping.log"))?;
    std::thread::sleep(Duration::from_millis(500));
    let mut killed_at = Vec::new();
    let mut ready_ms = Vec::new();
    let mut back_at = Vec::new();
    for i in 0..kills {
        let at = Instant::now();
        killed_at.push(unix_now());
        manager.signal_main(nix::sys::signal::Signal::SIGKILL);
        if manager.wait_ready(i + 2, Duration::from_secs(20)).is_ok() {
            if let Some(ready) = manager.ready_times().last() {
                ready_ms.push(ready.duration_since(at).as_secs_f64() * 1000.0);
            }
        }
        back_at.push(rings_running_again(&api, at + SPACING));
        let spent = at.elapsed();
        std::thread::sleep(SPACING.saturating_sub(spent));
    }
    let report = ping.stop()?;
    let arp = capture.stop();
    drop(qemu);
    drop(manager);
    Ok(ModeReport {
        kills,
        gaps: killed_at.iter().map(|&t| gap_around(&report, t)).collect(),
        ready_ms,
        lost: report.lost().len(),
        duplicates: duplicates(&report),
        breakdown: killed_at
            .iter()
            .zip(&back_at)
            .enumerate()
            .map(|(i, (&kill, back))| {
                // ARP that closed this gap: sent before the first reply
                // after the kill (and before the next kill).
                let next_kill = killed_at.get(i + 1).copied().unwrap_or(f64::MAX);
                let first_reply = report.times.iter().copied().find(|&x| x > kill);
                let until = first_reply.unwrap_or(f64::MAX).min(next_kill);
                back.map(|back| breakdown(&arp, kill, back, until))
            })
            .collect(),
    })
}

/// When (seconds since the epoch) the API first shows pair 0's rings both
/// running, polled every 2 ms until `deadline`. The API answers only once
/// the new process serves.
fn rings_running_again(api: &std::path::Path, deadline: Instant) -> Option<f64> {
    while Instant::now() < deadline {
        let status = sandnic_host::api::client(api, serde_json::json!({"cmd": "status"}));
        if let Ok((status, _)) = status {
            let pair = &status["pairs"][0];
            if pair["rx_running"] == true && pair["tx_running"] == true {
                return Some(unix_now());
            }
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    None
}

/// Where the gap after the kill at `kill` went, from the ARP frames seen
/// before `until` (the first reply after the kill).
fn breakdown(arp: &[(f64, ArpSeen)], kill: f64, back: f64, until: f64) -> Breakdown {
    let window: Vec<&(f64, ArpSeen)> = arp
        .iter()
        .filter(|(t, _)| *t > kill && *t < until)
        .collect();
    let first_reply = window
        .iter()
        .find(|(_, seen)| *seen == ArpSeen::GuestReply)
        .map(|(t, _)| *t);
    let requests: Vec<f64> = window
        .iter()
        .filter(|(_, seen)| *seen == ArpSeen::HostRequest)
        .map(|(t, _)| *t)
        .collect();
    let answered = first_reply.and_then(|r| requests.iter().copied().rfind(|&q| q <= r));
    let ms = |t: f64| (t - kill) * 1000.0;
    Breakdown {
        device_back: ms(back),
        arp_answered: answered.map(ms),
        arp_requests: requests.len(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ArpSeen {
    HostRequest,
    GuestReply,
}

/// A packet socket on the TAP's host side that timestamps the ARP
/// requests the host sends and the ARP replies that come from the guest.
struct ArpCapture {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Vec<(f64, ArpSeen)>>,
}

impl ArpCapture {
    fn start(ns: &NetNs) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let fd = ns.packet_socket("tap0")?;
        let timeout = libc::timeval {
            tv_sec: 0,
            tv_usec: 100_000,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, which lives for the call.
        unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&timeout as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as u32,
            )
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stopped = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut seen = Vec::new();
            let mut frame = [0u8; 2048];
            while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
                // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
                let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
                let mut len = std::mem::size_of::<libc::sockaddr_ll>() as u32;
                // SAFETY: `frame` and `from` are live buffers of the sizes
                // passed; the fd is open for the thread's life.
                let n = unsafe {
                    libc::recvfrom(
                        fd.as_raw_fd(),
                        frame.as_mut_ptr().cast(),
                        frame.len(),
                        0,
                        (&mut from as *mut libc::sockaddr_ll).cast(),
                        &mut len,
                    )
                };
                let at = unix_now();
                if n < 22 || frame[12..14] != [0x08, 0x06] {
                    continue;
                }
                let outgoing = from.sll_pkttype == libc::PACKET_OUTGOING;
                match (outgoing, u16::from_be_bytes([frame[20], frame[21]])) {
                    (true, 1) => seen.push((at, ArpSeen::HostRequest)),
                    (false, 2) => seen.push((at, ArpSeen::GuestReply)),
                    _ => {}
                }
            }
            seen
        });
        Ok(Self { stop, thread })
    }

    fn stop(self) -> Vec<(f64, ArpSeen)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
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
