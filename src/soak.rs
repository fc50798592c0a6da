//! Migration soak: chains of live migrations of a QEMU TCG guest whose NIC
//! is sandnic (or, for comparison, DPDK's vhost), each one checked for what
//! broke. `tests/migration_soak.rs` runs a short chain of every variant in
//! CI; `benches/migration_soak.rs` runs long ones and prints the counts.
//!
//! A variant is a kind of migration (RAM copied between two backends on
//! two TAPs on a bridge, or local: both QEMUs on one backend with their RAM
//! shared), a QEMU (Debian 12's 7.2 or 10.0), guest_announce on or off, and
//! one or two queue pairs. A chain boots one guest and migrates it back and
//! forth under a CPU hog while the host pings it every 2 ms. After each
//! migration, with both QEMUs paused (the destination starts with `-S`):
//!
//! - both RAMs are compared page by page and each ring's indices are held
//!   against the base the backend returned (`migration::check_switch`):
//!   a lost page is named, with whose write it was;
//! - then the destination runs, and the guest must answer, the
//!   destination QEMU must log no ring error, and no probe may be lost
//!   outside QEMU's own test window;
//! - the largest gap between replies is put down to its cause from the
//!   backend's counters, sampled every 2 ms (`GapCause`).
//!
//! QEMU 7.2 loses guest writes under TCG (its dirty tracking misses
//! stores through a TLB entry made while the page was dirty; fixed by
//! QEMU commit 03bfc2188f06, "physmem: Fix migration dirty bitmap
//! coherency with TCG memory access", first in 9.0). A lost guest write
//! there is counted as that known frontend bug, and the chain boots a new
//! guest; anything at the backend's door fails on any QEMU.

use crate::dpdk::{Peer, Testpmd};
use crate::guest::{QemuBuild, QemuOptions};
use crate::harness::{CpuHog, NetNs, Sandnic, ScratchDir};
use crate::migration::{
    check_switch, connect_to_guest, guest_script, migrate_then, send_paced, stream_bytes,
    MigrationReport, RamFile, SwitchReport, Vm, GUEST_IP, GUEST_MAC,
};
use crate::ping::FloodPing;
use anyhow::Context;
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// QEMU's test window around the switch, in seconds.
pub const SLACK: f64 = 0.05;
/// QEMU's `announce-initial` (its default): after a migration that moves
/// the guest to another TAP, the bridge keeps sending to the old one until
/// the first announcement, this long after the destination resumes.
///
/// A copy migration's window therefore ends 50 ms after the destination's
/// backend first sent anything out of its TAP (the announcement, or the
/// guest's own first frame), which is when the bridge can learn the new
/// port: on a loaded machine that comes well after `resumed` plus this —
/// or, if later, when the first probe answered after `resumed` went out
/// (the kernel may process that first frame, and the bridge learn from
/// it, tens of ms after the backend wrote it).
/// With no counters to see it by (DPDK), the window ends this long after
/// `resumed` plus the slack.
pub const ANNOUNCE_INITIAL: f64 = 0.05;
/// Lines a QEMU prints when a ring broke across a migration.
pub const RING_ERRORS: [&str; 4] = [
    "inconsistent with Host index",
    "ring restore failed",
    "is not a head",
    "vhost VQ",
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MigrationKind {
    /// RAM copied under dirty logging between two backends on two TAPs.
    Copy,
    /// Both QEMUs on one backend, RAM shared (`x-ignore-shared`).
    Local,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sandnic,
    /// DPDK's vhost PMD forwarding to its TAP PMD (copy migrations only).
    Dpdk,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Variant {
    pub kind: MigrationKind,
    pub backend: Backend,
    pub qemu: QemuBuild,
    pub announce: bool,
    pub pairs: u16,
    /// A TCP stream into the guest across each migration (8 MB/s), on top
    /// of the ping: the guest writes much of its memory meanwhile, which
    /// is what brings out QEMU 7.2's lost writes.
    pub stream: bool,
}

impl Variant {
    /// Every sandnic variant on `qemu`.
    pub fn all_sandnic(qemu: QemuBuild) -> Vec<Self> {
        let mut all = Vec::new();
        for kind in [MigrationKind::Copy, MigrationKind::Local] {
            for announce in [true, false] {
                for pairs in [1, 2] {
                    all.push(Self {
                        kind,
                        backend: Backend::Sandnic,
                        qemu,
                        announce,
                        pairs,
                        stream: false,
                    });
                }
            }
        }
        all
    }

    /// A copied-RAM migration with a TCP stream into the guest (QEMU's
    /// defaults otherwise: one pair, guest_announce on).
    pub fn copy_with_stream(backend: Backend, qemu: QemuBuild) -> Self {
        Self {
            kind: MigrationKind::Copy,
            backend,
            qemu,
            announce: true,
            pairs: 1,
            stream: true,
        }
    }

    pub fn name(&self) -> String {
        format!(
            "{:?} {:?}, {}, guest_announce={}, {} pair{}{}",
            self.kind,
            self.backend,
            self.qemu.name(),
            if self.announce { "on" } else { "off" },
            self.pairs,
            if self.pairs == 1 { "" } else { "s" },
            if self.stream { ", TCP stream" } else { "" }
        )
    }
}

/// What stopped the replies during the largest gap, from the backend's
/// counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The backend put echo requests into the guest's ring and the guest
    /// sent nothing back: the guest did not run (TCG, the host's load).
    Guest,
    /// The backend's rings were stopped: QEMU's switch.
    Switch,
    /// The rings ran and nothing was delivered: the frames did not reach
    /// this backend (a bridge still sending to the old TAP) or it stalled.
    NothingDelivered,
    /// No counters (DPDK) or no gap.
    Unknown,
}

/// One migration and what it broke.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub variant: Variant,
    pub migration: MigrationReport,
    pub switch: SwitchReport,
    /// The guest answered a ping afterwards.
    pub answers: bool,
    /// Ring errors the destination QEMU printed.
    pub ring_errors: Vec<String>,
    /// Probes lost, and those outside QEMU's window.
    pub lost: usize,
    pub lost_outside: Vec<(u64, f64)>,
    pub largest_gap_ms: f64,
    pub gap_cause: GapCause,
    /// The cause of the gap around the first probe lost outside the
    /// window, if one was.
    pub outside_cause: Option<GapCause>,
    /// Why the TCP stream into the guest broke, if it did.
    pub stream_broke: Option<String>,
    /// QEMU's test window (wall-clock seconds): from 50 ms before
    /// `migrate` to 50 ms after the destination resumed, or for a copy
    /// migration after its backend first sent a frame (see
    /// `ANNOUNCE_INITIAL`).
    pub window: (f64, f64),
}

impl Outcome {
    /// What went wrong, if anything.
    pub fn fault(&self) -> Option<String> {
        let mut faults = Vec::new();
        if !self.switch.clean() {
            faults.push(self.switch.to_string());
        }
        if !self.answers {
            faults.push("the guest does not answer".into());
        }
        if !self.ring_errors.is_empty() {
            faults.push(format!("destination QEMU: {:?}", self.ring_errors));
        }
        if let Some(why) = &self.stream_broke {
            faults.push(format!("the TCP stream into the guest broke: {why}"));
        }
        if !self.lost_outside.is_empty() {
            faults.push(format!(
                "probes lost outside QEMU's window [{:.3}, {:.3}]: {:?}",
                self.window.0, self.window.1, self.lost_outside
            ));
        }
        (!faults.is_empty()).then(|| faults.join("; "))
    }

    /// The fault is QEMU 7.2's lost guest write (see the module doc): the
    /// destination's RAM lost a write, none of them the backend's, on the
    /// QEMU without the fix. What follows from it (a dead ring, a guest
    /// that no longer answers) is part of it.
    pub fn known_frontend_bug(&self) -> bool {
        self.variant.qemu == QemuBuild::Debian
            && !self.switch.lost.is_empty()
            && !self.switch.backend_at_fault()
    }
}

/// The backends of one side of a migration.
struct Side {
    dir: ScratchDir,
    socket: PathBuf,
    /// The API socket (sandnic), for the counters.
    api: Option<PathBuf>,
    _sandnic: Option<Sandnic>,
    _testpmd: Option<Testpmd>,
}

/// Runs `rounds` migrations of `variant`, calling `each` after every one.
/// A migration that leaves the guest broken ends its guest; the next one
/// boots a new one.
pub fn run_chain(
    variant: Variant,
    rounds: usize,
    mut each: impl FnMut(&Outcome),
) -> anyhow::Result<Vec<Outcome>> {
    let ns = NetNs::new()?;
    let sides = set_up(&ns, variant)?;
    let rams: Vec<PathBuf> = (0..sides.len())
        .map(|i| {
            PathBuf::from(format!(
                "/dev/shm/sandnic-soak-{}-{}-{i}.ram",
                std::process::id(),
                ns.name
            ))
        })
        .collect();
    let _cleanup = RemoveOnDrop(rams.clone());
    let listen = if variant.stream {
        "(while :; do nc -l -p 5000 > /dev/null; done) &\n"
    } else {
        ""
    };
    let script = guest_script(variant.pairs, listen);
    let mut outcomes = Vec::new();
    let mut vm_count = 0;
    while outcomes.len() < rounds {
        let mut at = 0;
        let _ = std::fs::remove_file(&rams[at]);
        let options = |side: usize| QemuOptions {
            build: variant.qemu,
            ram_file: Some(rams[side].clone()),
            queues: variant.pairs,
            mac: Some(GUEST_MAC.into()),
            device_props: if variant.announce {
                Vec::new()
            } else {
                vec!["guest_announce=off".into()]
            },
            ..QemuOptions::default()
        };
        vm_count += 1;
        let name = format!("vm{vm_count}");
        let mut source = Vm::start(
            &name,
            &sides[at].dir.0,
            &sides[at].socket,
            &script,
            options(at),
        )?;
        source.wait_console("GUEST-READY", Duration::from_secs(120))?;
        while outcomes.len() < rounds {
            let to = (at + 1) % sides.len();
            if sides.len() > 1 {
                let _ = std::fs::remove_file(&rams[to]);
            }
            let uri = format!("unix:{}", sides[to].dir.path("migration.sock").display());
            vm_count += 1;
            let name = format!("vm{vm_count}");
            let incoming = QemuOptions {
                incoming: Some(uri.clone()),
                paused: true,
                ..options(to)
            };
            let mut destination = Vm::start(
                &name,
                &sides[to].dir.0,
                &sides[to].socket,
                &script,
                incoming,
            )?;
            prepare(variant, &mut source, &mut destination)?;
            let apis: Vec<PathBuf> = sides.iter().filter_map(|s| s.api.clone()).collect();
            let destination_ram = (sides.len() > 1).then(|| rams[to].as_path());
            let outcome = one_migration(
                &ns,
                variant,
                &mut source,
                &mut destination,
                &uri,
                (&rams[at], destination_ram),
                &apis,
                sides[to].api.is_some().then_some(to),
                &sides[to].dir.path("ping.log"),
            )?;
            let _ = source.qmp.execute("quit", json!({}));
            drop(source);
            let broken = outcome.fault().is_some();
            each(&outcome);
            outcomes.push(outcome);
            source = destination;
            at = to;
            if broken {
                break;
            }
        }
    }
    Ok(outcomes)
}

/// Removes the RAM files when the chain ends.
struct RemoveOnDrop(Vec<PathBuf>);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// The backends: two on two TAPs on a bridge for a copy migration, one on
/// a TAP for a local one. The host is 10.88.0.1.
fn set_up(ns: &NetNs, variant: Variant) -> anyhow::Result<Vec<Side>> {
    let queues = variant.pairs.to_string();
    let count = match variant.kind {
        MigrationKind::Copy => {
            ns.add_bridge("br0", "10.88.0.1/24")?;
            2
        }
        MigrationKind::Local => {
            ns.add_tap("tap0", "10.88.0.1/24")?;
            1
        }
    };
    let mut sides = Vec::new();
    for i in 0..count {
        let dir = ScratchDir::new()?;
        let tap = format!("tap{i}");
        let side = match variant.backend {
            Backend::Sandnic => {
                if variant.kind == MigrationKind::Copy {
                    ns.add_bridged_tap(&tap, "br0", true)?;
                }
                let sandnic = Sandnic::serve(ns, &dir, &["--tap", &tap, "--queues", &queues])?;
                Side {
                    socket: sandnic.socket.clone(),
                    api: Some(sandnic.api.clone()),
                    _sandnic: Some(sandnic),
                    _testpmd: None,
                    dir,
                }
            }
            Backend::Dpdk => {
                anyhow::ensure!(
                    variant.kind == MigrationKind::Copy,
                    "DPDK runs copy migrations only"
                );
                let name = format!("soak{}{i}", ns.name);
                let testpmd = Testpmd::start(
                    ns,
                    &dir,
                    &name,
                    Peer::Tap(&tap),
                    1,
                    usize::from(variant.pairs),
                )
                .context("dpdk-testpmd did not start")?;
                ns.ip(&["link", "set", &tap, "master", "br0"])?;
                Side {
                    socket: testpmd.socket.clone(),
                    api: None,
                    _sandnic: None,
                    _testpmd: Some(testpmd),
                    dir,
                }
            }
        };
        sides.push(side);
    }
    Ok(sides)
}

/// Migration capabilities and parameters, as the other migration tests
/// use them.
fn prepare(variant: Variant, source: &mut Vm, destination: &mut Vm) -> anyhow::Result<()> {
    match variant.kind {
        MigrationKind::Local => {
            for vm in [source, destination] {
                vm.set_capabilities(&["x-ignore-shared"])?;
            }
        }
        MigrationKind::Copy => {
            source.qmp.execute(
                "migrate-set-parameters",
                json!({ "max-bandwidth": 4u64 << 30 }),
            )?;
        }
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn one_migration(
    ns: &NetNs,
    variant: Variant,
    source: &mut Vm,
    destination: &mut Vm,
    uri: &str,
    rams: (&Path, Option<&Path>),
    apis: &[PathBuf],
    destination_side: Option<usize>,
    ping_log: &Path,
) -> anyhow::Result<Outcome> {
    let qemu = variant.qemu.version();
    let hog = CpuHog::start()?;
    let sampler = Sampler::start(apis.to_vec());
    let stream = match variant.stream {
        true => {
            let connection = connect_to_guest(ns)?;
            Some(std::thread::spawn(move || {
                send_paced(connection, &stream_bytes(16 << 20))
            }))
        }
        false => None,
    };
    let ping = FloodPing::every(ns, GUEST_IP, "0.002", ping_log)?;
    std::thread::sleep(Duration::from_millis(500));
    let (migration, switch) = migrate_then(
        source,
        destination,
        uri,
        Duration::from_secs(120),
        |source, _| {
            let rings = source.rings(variant.pairs)?;
            let source_ram = RamFile::open(rams.0)?;
            let destination_ram = match rams.1 {
                Some(path) => RamFile::open(path)?,
                None => RamFile::open(rams.0)?,
            };
            check_switch(&qemu, &rings, &source_ram, &destination_ram)
        },
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let ping = ping.stop()?;
    let samples = sampler.stop();
    let stream_broke = stream.and_then(|s| match s.join() {
        Ok(Ok(())) => None,
        Ok(Err(e)) => Some(format!("{e:#}")),
        Err(_) => Some("the sender panicked".into()),
    });
    drop(hog);
    let answers = ns
        .command("ping")
        .args(["-c", "3", "-W", "3", GUEST_IP])
        .output()
        .is_ok_and(|o| o.status.success());
    let console = destination.guest.console();
    let ring_errors = console
        .lines()
        .filter(|l| RING_ERRORS.iter().any(|e| l.contains(e)))
        .map(str::to_string)
        .collect();
    let window_end = SLACK
        + match variant.kind {
            MigrationKind::Local => migration.resumed,
            MigrationKind::Copy => match destination_side {
                Some(side) => first_sent_after(&samples, side, migration.started)
                    .unwrap_or(migration.resumed)
                    .max(migration.resumed),
                None => migration.resumed + ANNOUNCE_INITIAL,
            },
        };
    // The bridge learns the new port from the first frame the destination
    // sends, when the kernel gets to process it: on a loaded machine that
    // can be tens of ms after the backend wrote it. Until then the bridge
    // sends to the old port. The first probe answered after the
    // destination resumed went out once the path was there, so no probe
    // sent before it counts against a copy migration.
    let window_end = match variant.kind {
        MigrationKind::Local => window_end,
        MigrationKind::Copy => {
            window_end.max(first_answered_after(&ping, migration.resumed).unwrap_or(0.0))
        }
    };
    let window = (migration.started - SLACK, window_end);
    let lost_outside = ping.lost_outside(window.0, window.1);
    let gap = largest_gap(&ping.times);
    let outside_cause = lost_outside.first().and_then(|&(_, at)| {
        let gap = gap_around(&ping.times, at)?;
        Some(cause_of(&samples, gap.0, gap.1))
    });
    Ok(Outcome {
        window,
        stream_broke,
        outside_cause,
        variant,
        gap_cause: gap.map_or(GapCause::Unknown, |(from, to)| cause_of(&samples, from, to)),
        largest_gap_ms: gap.map_or(0.0, |(from, to)| (to - from) * 1e3),
        migration,
        switch,
        answers,
        ring_errors,
        lost: ping.lost().len(),
        lost_outside,
    })
}

/// The largest gap between consecutive replies: (last reply before it,
/// first reply after it).
fn largest_gap(times: &[f64]) -> Option<(f64, f64)> {
    times
        .windows(2)
        .max_by(|a, b| (a[1] - a[0]).total_cmp(&(b[1] - b[0])))
        .map(|w| (w[0], w[1]))
}

/// When side `side` was first seen sending a frame after `after`.
/// When the first probe sent after `after` that was answered went out.
fn first_answered_after(ping: &crate::ping::PingReport, after: f64) -> Option<f64> {
    ping.sent_times
        .iter()
        .copied()
        .filter(|&t| t > after)
        .min_by(f64::total_cmp)
}

fn first_sent_after(samples: &[Sample], side: usize, after: f64) -> Option<f64> {
    let mut before = samples
        .iter()
        .rfind(|s| s.at <= after)?
        .sent_by_side
        .get(side)
        .copied()?;
    for s in samples.iter().filter(|s| s.at > after) {
        let now = *s.sent_by_side.get(side)?;
        if now > before {
            return Some(s.at);
        }
        before = now;
    }
    None
}

/// The replies either side of `at`.
fn gap_around(times: &[f64], at: f64) -> Option<(f64, f64)> {
    times
        .windows(2)
        .find(|w| w[0] <= at && at <= w[1])
        .map(|w| (w[0], w[1]))
}

/// The backends' counters at one moment (summed over both sides).
#[derive(Debug, Clone)]
struct Sample {
    at: f64,
    /// Frames put into the guest's rings.
    delivered: u64,
    /// Frames the guest sent.
    sent: u64,
    /// Frames sent out of each side's TAP (the guest's and announcements),
    /// in `apis` order.
    sent_by_side: Vec<u64>,
    /// Some session of some side drives its device (its rings run).
    running: bool,
}

/// Samples the backends' counters every 2 ms on a thread of its own.
struct Sampler {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<Vec<Sample>>,
}

impl Sampler {
    fn start(apis: Vec<PathBuf>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut samples = Vec::new();
            while !flag.load(Ordering::Relaxed) && !apis.is_empty() {
                if let Some(sample) = sample(&apis) {
                    samples.push(sample);
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            samples
        });
        Self { stop, thread }
    }

    fn stop(self) -> Vec<Sample> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.join().unwrap_or_default()
    }
}

fn sample(apis: &[PathBuf]) -> Option<Sample> {
    let mut s = Sample {
        at: crate::migration::wall_clock(),
        delivered: 0,
        sent: 0,
        sent_by_side: Vec::new(),
        running: false,
    };
    for api in apis {
        let call = |cmd| sandnic_host::api::client(api, json!({ "cmd": cmd })).ok();
        let (stats, _) = call("stats")?;
        let (status, _) = call("status")?;
        let mut side = stats["control"]["rarps_sent"].as_u64()?;
        for q in stats["queues"].as_array()? {
            s.delivered += q["rx_packets"].as_u64()?;
            s.sent += q["tx_packets"].as_u64()?;
            side += q["tx_packets"].as_u64()?;
        }
        s.sent_by_side.push(side);
        s.running |= status["sessions"]
            .as_array()?
            .iter()
            .any(|session| session["drives"] == true);
    }
    Some(s)
}

/// What the counters did between two replies at `from` and `to`.
fn cause_of(samples: &[Sample], from: f64, to: f64) -> GapCause {
    let inside: Vec<&Sample> = samples
        .iter()
        .filter(|s| s.at > from && s.at < to)
        .collect();
    let (Some(first), Some(last)) = (inside.first(), inside.last()) else {
        return GapCause::Unknown;
    };
    if inside.iter().any(|s| !s.running) {
        GapCause::Switch
    } else if last.delivered > first.delivered && last.sent == first.sent {
        GapCause::Guest
    } else if last.delivered == first.delivered {
        GapCause::NothingDelivered
    } else {
        GapCause::Unknown
    }
}

/// Counts per variant, for the bench's table.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub migrations: usize,
    pub clean: usize,
    /// QEMU 7.2's lost guest writes (`Outcome::known_frontend_bug`).
    pub frontend_bug: usize,
    /// Anything else that went wrong.
    pub other: usize,
    pub gap_causes: Vec<GapCause>,
}

impl Tally {
    pub fn add(&mut self, outcome: &Outcome) {
        self.migrations += 1;
        match outcome.fault() {
            None => self.clean += 1,
            Some(_) if outcome.known_frontend_bug() => self.frontend_bug += 1,
            Some(_) => self.other += 1,
        }
        self.gap_causes.push(outcome.gap_cause);
    }
}
