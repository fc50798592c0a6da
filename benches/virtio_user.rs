//! The datapath driven by a frontend written elsewhere: DPDK's
//! `virtio_user` PMD in `dpdk-testpmd`, connected to two backends in turn,
//! each on a TAP in a namespace of its own:
//!
//! - sandnic (`sandnic serve --tap`);
//! - DPDK's vhost PMD forwarding to its `net_tap` PMD (`dpdk-testpmd`).
//!
//! The frontend forwards on CPU 0, the backend runs on CPU 1. Rounds are
//! paired — both backends back to back, the order alternating — because
//! this machine's speed drifts over seconds (see `benches/datapath.rs`).
//!
//! - **TX** (`txonly`): frames per second counted at the TAP (its kernel
//!   `rx_packets`), and the backend's CPU seconds per million frames.
//! - **RX** (`rxonly`): frames injected on the TAP's host side (a packet
//!   socket), as fast as the injector goes, counted by testpmd; and at a
//!   fixed offered rate below both backends' peak, for CPU per million
//!   frames (at saturation both backends burn their core).
//! - **Idle**: the backend's CPU over 10 s with the frontend connected and
//!   no traffic.
//! - **Memory**: the backend's private memory (`RssAnon`, leaving out the
//!   guest memory it maps) idle, under traffic, and with 8 queue pairs.
//!
//! Results go to `target/criterion/paired/virtio-user-*.json` (the ratios
//! `scripts/bench-report` prints) and `target/criterion/virtio_user.json`
//! (everything, for the report's table and chart).
//!
//! `scripts/bench virtio_user` (root; skips loudly without dpdk-testpmd).

use sandnic::dpdk::{self, FrontendMode, Peer, Testpmd, VirtioUser};
use sandnic::frames::{self, Mac};
use sandnic::harness::{
    bench_should_run, cpu_seconds, network_unavailable, record_paired, NetNs, Sandnic, ScratchDir,
};
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

/// Paired rounds per case.
const ROUNDS: usize = 10;
/// How long each round measures.
const WINDOW: Duration = Duration::from_secs(1);
/// Traffic before the window starts (rings filled, threads awake).
const WARM_UP: Duration = Duration::from_millis(300);
const FRONTEND_CPU: usize = 0;
const BACKEND_CPU: usize = 1;
/// The fixed offered RX rate for CPU per frame: below both backends' peak
/// here, so neither spends its time on a full ring.
const FIXED_RX_RATE: u64 = 100_000;
const DEVICE_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const SIZES: [usize; 2] = [64, 1500];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sandnic,
    Dpdk,
}

impl Backend {
    fn name(self) -> &'static str {
        match self {
            Backend::Sandnic => "sandnic",
            Backend::Dpdk => "dpdk",
        }
    }
}

/// One backend running on a TAP in its own namespace.
struct Bed {
    ns: NetNs,
    _dir: ScratchDir,
    tap: String,
    socket: PathBuf,
    pid: u32,
    _sandnic: Option<Sandnic>,
    _testpmd: Option<Testpmd>,
}

impl Bed {
    fn start(backend: Backend, queues: usize) -> Option<Self> {
        let ns = NetNs::new().ok()?;
        let dir = ScratchDir::new().ok()?;
        match backend {
            Backend::Sandnic => {
                ns.add_tap("tap0", "10.78.0.1/24").ok()?;
                let queues_arg = queues.to_string();
                // One datapath thread for the one backend CPU, as DPDK
                // gets one lcore for all its queues (a thread per pair
                // would only take turns on that CPU).
                let args = [
                    "--tap",
                    "tap0",
                    "--queues",
                    &queues_arg,
                    "--datapath-threads",
                    "1",
                ];
                let sandnic = Sandnic::serve(&ns, &dir, &args).ok()?;
                let pid = sandnic.child.id();
                pin_all_threads(pid, BACKEND_CPU);
                Some(Self {
                    socket: sandnic.socket.clone(),
                    ns,
                    _dir: dir,
                    tap: "tap0".into(),
                    pid,
                    _sandnic: Some(sandnic),
                    _testpmd: None,
                })
            }
            Backend::Dpdk => {
                // net_tap of DPDK 22.11 aborts with 8 queues (see `Peer`):
                // the 8-pair memory figure forwards to net_null instead.
                let peer = if queues > 4 {
                    Peer::Null
                } else {
                    Peer::Tap("dtap0")
                };
                let testpmd = Testpmd::start(&ns, &dir, "vhost", peer, BACKEND_CPU, queues)?;
                Some(Self {
                    socket: testpmd.socket.clone(),
                    pid: testpmd.pid(),
                    ns,
                    _dir: dir,
                    tap: testpmd.tap.clone(),
                    _sandnic: None,
                    _testpmd: Some(testpmd),
                })
            }
        }
    }

    /// Frames the backend has written into the TAP (the kernel's receive
    /// counter of the TAP interface).
    fn tap_frames_in(&self) -> u64 {
        let out = self
            .ns
            .ip(&["-s", "-j", "link", "show", "dev", &self.tap])
            .expect("ip link");
        let parsed: Value = serde_json::from_slice(&out.stdout).expect("ip -j output");
        parsed[0]["stats64"]["rx"]["packets"]
            .as_u64()
            .expect("rx packets")
    }
}

/// `taskset -a`: every thread of `pid` on `cpu` (the datapath threads
/// exist already).
fn pin_all_threads(pid: u32, cpu: usize) {
    let _ = Command::new("taskset")
        .args(["-a", "-cp", &cpu.to_string(), &pid.to_string()])
        .output();
}

/// `RssAnon` of a process in KiB.
fn rss_anon_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// One backend's figures over one window.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    frames_per_s: f64,
    /// Backend CPU seconds per million frames moved.
    cpu_per_mframe: f64,
    /// Frames offered (RX) that the frontend did not receive.
    dropped: u64,
    rss_kib: u64,
}

/// `backend` with `queues` pairs, DPDK's frontend connected to it in
/// `mode`, after WARM_UP.
fn connected(backend: Backend, queues: usize, mode: FrontendMode) -> Option<(Bed, VirtioUser)> {
    let bed = Bed::start(backend, queues)?;
    let frontend = VirtioUser::start(&bed.socket, "frontend", queues, mode, FRONTEND_CPU)?;
    std::thread::sleep(WARM_UP);
    Some((bed, frontend))
}

fn tx_round(backend: Backend, len: usize, queues: usize) -> Option<Sample> {
    let (bed, frontend) = connected(backend, queues, FrontendMode::TxOnly { len })?;
    let (frames0, cpu0, t0) = (bed.tap_frames_in(), cpu_seconds(bed.pid), Instant::now());
    std::thread::sleep(WINDOW);
    let (frames1, cpu1, took) = (bed.tap_frames_in(), cpu_seconds(bed.pid), t0.elapsed());
    let rss_kib = rss_anon_kib(bed.pid);
    frontend.finish();
    let frames = frames1.saturating_sub(frames0);
    Some(Sample {
        frames_per_s: frames as f64 / took.as_secs_f64(),
        cpu_per_mframe: (cpu1 - cpu0) / (frames.max(1) as f64 / 1e6),
        dropped: 0,
        rss_kib,
    })
}

/// Injects `len`-byte frames for the device on the TAP's host side for
/// WINDOW, at `rate` frames/s (None: as fast as it goes). Returns how many
/// went out.
fn inject(sock: &OwnedFd, len: usize, rate: Option<u64>) -> u64 {
    let payload = vec![0x5a; len.saturating_sub(42)];
    let frame = frames::udp_frame(
        DEVICE_MAC,
        [0x02, 0, 0, 0, 0, 1],
        ([10, 78, 0, 1], [10, 78, 0, 2]),
        (7000, 7001),
        &payload,
    );
    let start = Instant::now();
    let mut sent = 0u64;
    loop {
        let elapsed = start.elapsed();
        if elapsed >= WINDOW {
            return sent;
        }
        if let Some(rate) = rate {
            let due = (rate as f64 * elapsed.as_secs_f64()) as u64;
            if sent >= due {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
        }
        // SAFETY: `frame` is a live buffer of the length passed; the socket
        // is a bound packet socket.
        let r = unsafe {
            libc::send(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if r > 0 {
            sent += 1;
        }
    }
}

fn rx_round(backend: Backend, len: usize, queues: usize, rate: Option<u64>) -> Option<Sample> {
    let (bed, frontend) = connected(backend, queues, FrontendMode::RxOnly)?;
    let sock = bed.ns.packet_socket(&bed.tap).ok()?;
    let (cpu0, t0) = (cpu_seconds(bed.pid), Instant::now());
    let sent = inject(&sock, len, rate);
    let (cpu1, took) = (cpu_seconds(bed.pid), t0.elapsed());
    let rss_kib = rss_anon_kib(bed.pid);
    // Frames still in flight arrive before testpmd stops.
    std::thread::sleep(Duration::from_millis(100));
    let received = frontend.finish()?.rx_packets;
    Some(Sample {
        frames_per_s: received as f64 / took.as_secs_f64(),
        cpu_per_mframe: (cpu1 - cpu0) / (received.max(1) as f64 / 1e6),
        dropped: sent.saturating_sub(received),
        rss_kib,
    })
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    if n == 0 {
        return 0.0;
    }
    (values[(n - 1) / 2] + values[n / 2]) / 2.0
}

/// Paired rounds of one case: both backends back to back, the order
/// alternating. Records the sandnic / DPDK ratios for `scripts/bench-report`
/// and returns the case's medians.
fn paired(case: &str, mut round: impl FnMut(Backend) -> Option<Sample>) -> Option<Value> {
    let mut ratios = Vec::new();
    let mut samples: [Vec<Sample>; 2] = [Vec::new(), Vec::new()];
    for r in 0..ROUNDS {
        let order = if r % 2 == 0 {
            [Backend::Sandnic, Backend::Dpdk]
        } else {
            [Backend::Dpdk, Backend::Sandnic]
        };
        let mut this = [Sample::default(); 2];
        for backend in order {
            let i = usize::from(backend == Backend::Dpdk);
            this[i] = round(backend)?;
            samples[i].push(this[i]);
        }
        ratios.push(this[0].frames_per_s / this[1].frames_per_s.max(1.0));
    }
    record_paired(&format!("virtio-user-{case}"), &json!({ "ratios": ratios }));
    let summary = |s: &[Sample]| {
        let pick = |f: fn(&Sample) -> f64| median(&mut s.iter().map(f).collect::<Vec<_>>());
        json!({
            "mpps": pick(|s| s.frames_per_s) / 1e6,
            "cpu_s_per_mframe": pick(|s| s.cpu_per_mframe),
            "dropped": pick(|s| s.dropped as f64),
            "rss_kib": pick(|s| s.rss_kib as f64),
        })
    };
    let row = json!({
        "case": case,
        "ratio": median(&mut ratios.clone()),
        "ratio_min": ratios.iter().copied().fold(f64::INFINITY, f64::min),
        "ratio_max": ratios.iter().copied().fold(0.0, f64::max),
        "sandnic": summary(&samples[0]),
        "dpdk": summary(&samples[1]),
    });
    println!(
        "{case:<16} sandnic {:.3} Mpps  dpdk {:.3} Mpps  ratio {:.2}x ({:.2}-{:.2})  cpu s/Mframe sandnic {:.2} dpdk {:.2}",
        row["sandnic"]["mpps"].as_f64().unwrap_or(0.0),
        row["dpdk"]["mpps"].as_f64().unwrap_or(0.0),
        row["ratio"].as_f64().unwrap_or(0.0),
        row["ratio_min"].as_f64().unwrap_or(0.0),
        row["ratio_max"].as_f64().unwrap_or(0.0),
        row["sandnic"]["cpu_s_per_mframe"].as_f64().unwrap_or(0.0),
        row["dpdk"]["cpu_s_per_mframe"].as_f64().unwrap_or(0.0),
    );
    Some(row)
}

/// CPU over 10 s and private memory with the frontend connected and no
/// traffic; `queues` pairs configured.
fn idle(backend: Backend, queues: usize, measure_cpu: bool) -> Option<Value> {
    let (bed, frontend) = connected(backend, queues, FrontendMode::RxOnly)?;
    let window = Duration::from_secs(10);
    let cpu = if measure_cpu {
        let cpu0 = cpu_seconds(bed.pid);
        std::thread::sleep(window);
        Some((cpu_seconds(bed.pid) - cpu0) / window.as_secs_f64() * 100.0)
    } else {
        None
    };
    let rss_kib = rss_anon_kib(bed.pid);
    frontend.finish();
    Some(json!({ "cpu_percent": cpu, "rss_kib": rss_kib }))
}

fn main() {
    if !bench_should_run("virtio_user benches", network_unavailable) || !dpdk::installed() {
        return;
    }
    let mut cases = Vec::new();
    for queues in [1, 2] {
        for len in SIZES {
            let tx = paired(&format!("tx-{len}B-{queues}q"), |b| {
                tx_round(b, len, queues)
            });
            let rx = paired(&format!("rx-{len}B-{queues}q"), |b| {
                rx_round(b, len, queues, None)
            });
            cases.extend(tx.into_iter().chain(rx));
        }
    }
    let fixed: Vec<Value> = SIZES
        .iter()
        .filter_map(|&len| {
            paired(&format!("rx-fixed-{len}B-1q"), |b| {
                rx_round(b, len, 1, Some(FIXED_RX_RATE))
            })
        })
        .collect();
    let mut resources = serde_json::Map::new();
    for backend in [Backend::Sandnic, Backend::Dpdk] {
        let one = idle(backend, 1, true);
        let eight = idle(backend, 8, false);
        resources.insert(
            backend.name().into(),
            json!({ "idle_1q": one, "idle_8q": eight }),
        );
    }
    println!("idle and memory: {}", Value::Object(resources.clone()));
    let all = json!({
        "frontend": "dpdk-testpmd virtio_user",
        "rounds": ROUNDS,
        "fixed_rx_rate": FIXED_RX_RATE,
        "cases": cases,
        "fixed_rate": fixed,
        "resources": resources,
    });
    let _ = std::fs::create_dir_all("target/criterion");
    if let Err(e) = std::fs::write("target/criterion/virtio_user.json", all.to_string()) {
        eprintln!("cannot record the results: {e}");
    }
}
