//! QEMU guests that migrate: a VM with a QMP socket, and a live migration
//! from one VM to another (`-incoming`) with the times QEMU's own TAP-fd
//! migration test judges by: when `migrate` was sent, and when the
//! destination resumed (its RESUME event), both on the wall clock that
//! `ping -D` stamps replies with.

use crate::guest::{Guest, GuestOptions, Kind, QemuOptions};
use crate::qmp::{event_time, Qmp};
use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// A QEMU guest with its QMP connection.
pub struct Vm {
    pub guest: Guest,
    pub qmp: Qmp,
}

impl Vm {
    /// Starts QEMU on vhost-user socket `socket` (or `qemu.tap`) with a QMP
    /// socket at `dir/NAME.qmp` and the console in `dir/NAME.console`.
    pub fn start(
        name: &str,
        dir: &Path,
        socket: &Path,
        script: &str,
        mut qemu: QemuOptions,
    ) -> anyhow::Result<Self> {
        let qmp_path = dir.join(format!("{name}.qmp"));
        qemu.qmp = Some(qmp_path.clone());
        let script = format!("{}{script}", crate::guest::STEP_FN);
        let guest = Guest::boot(GuestOptions {
            kind: Kind::Qemu,
            socket,
            script: &script,
            hostdir: None,
            console: dir.join(format!("{name}.console")),
            qemu,
        })?;
        let qmp = Qmp::connect(&qmp_path, Duration::from_secs(20))
            .with_context(|| format!("{name}: {}", guest.console()))?;
        Ok(Self { guest, qmp })
    }

    /// Waits until the console shows `marker`.
    pub fn wait_console(&self, marker: &str, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.guest.console().contains(marker) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("no {marker:?} on the console:\n{}", self.guest.console())
    }

    /// Turns on migration capabilities (both sides need the same).
    pub fn set_capabilities(&mut self, names: &[&str]) -> anyhow::Result<()> {
        let caps: Vec<Value> = names
            .iter()
            .map(|n| json!({ "capability": n, "state": true }))
            .collect();
        self.qmp
            .execute("migrate-set-capabilities", json!({ "capabilities": caps }))?;
        Ok(())
    }
}

/// What a finished migration reported.
#[derive(Debug, Clone)]
pub struct MigrationReport {
    /// Wall-clock seconds when `migrate` was sent.
    pub started: f64,
    /// Wall-clock seconds of the destination's RESUME event.
    pub resumed: f64,
    /// QEMU's own figures (`query-migrate`).
    pub total_ms: u64,
    pub downtime_ms: u64,
    pub transferred: u64,
}

pub fn wall_clock() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// Migrates `source` to `destination` (started with `-incoming uri`) and
/// waits until the destination runs. Fails with QEMU's error if the
/// migration fails.
pub fn migrate(
    source: &mut Vm,
    destination: &mut Vm,
    uri: &str,
    timeout: Duration,
) -> anyhow::Result<MigrationReport> {
    migrate_then(source, destination, uri, timeout, |_, _| Ok(())).map(|(report, ())| report)
}

/// `migrate` to a destination started paused (`QemuOptions::paused`): when
/// the migration completes both QEMUs are paused, `inspect` looks at them
/// (their RAM, say), and then the destination continues. (With a running
/// destination, `inspect` runs while it runs.)
pub fn migrate_then<T>(
    source: &mut Vm,
    destination: &mut Vm,
    uri: &str,
    timeout: Duration,
    inspect: impl FnOnce(&mut Vm, &mut Vm) -> anyhow::Result<T>,
) -> anyhow::Result<(MigrationReport, T)> {
    let started = wall_clock();
    source.qmp.execute("migrate", json!({ "uri": uri }))?;
    let deadline = Instant::now() + timeout;
    let info = loop {
        let info = source.qmp.execute("query-migrate", json!({}))?;
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => bail!("migration {}: {info}", info["status"]),
            _ if Instant::now() > deadline => {
                let _ = source.qmp.execute("migrate_cancel", json!({}));
                bail!("migration did not complete in {timeout:?}: {info}");
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    };
    wait_incoming_done(destination)?;
    let inspected = inspect(source, destination)?;
    if destination.paused()? {
        destination.cont()?;
    }
    let resume = destination
        .qmp
        .wait_event("RESUME", Duration::from_secs(30))
        .with_context(|| format!("destination:\n{}", destination.guest.console()))?;
    let report = MigrationReport {
        started,
        resumed: event_time(&resume).unwrap_or_else(wall_clock),
        total_ms: info["total-time"].as_u64().unwrap_or(0),
        downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
    };
    Ok((report, inspected))
}

/// Waits until a destination has loaded the whole incoming stream (its
/// run state leaves `inmigrate`).
fn wait_incoming_done(vm: &mut Vm) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let status = vm.qmp.execute("query-status", json!({}))?;
        if status["status"] != "inmigrate" {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the destination never finished loading: {status}");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The guest's address on the test network (the host side is 10.88.0.1).
pub const GUEST_IP: &str = "10.88.0.2";
/// The guest's MAC, the same on both sides of a migration.
pub const GUEST_MAC: &str = "52:54:00:5a:4e:01";

/// The guest's script: eth0 up (with `pairs` queue pairs) at GUEST_IP,
/// `extra` commands, "GUEST-READY" on the console, then idle for 5 min.
pub fn guest_script(pairs: u16, extra: &str) -> String {
    let mq = if pairs > 1 {
        format!("ethtool -L eth0 combined {pairs}\n")
    } else {
        String::new()
    };
    format!(
        "ip link set eth0 up\n{mq}ip addr add {GUEST_IP}/24 dev eth0\n{extra}echo GUEST-READY\n\
         i=0; while [ $i -lt 3000 ]; do sleep 0.1; i=$((i+1)); done\n"
    )
}

/// The RAM file two QEMUs of a local migration share: on tmpfs, so it is
/// not written to disk, and removed when dropped.
pub struct SharedRam(pub PathBuf);

impl SharedRam {
    pub fn new(tag: &str) -> Self {
        Self(PathBuf::from(format!(
            "/dev/shm/sandnic-{tag}-{}.ram",
            std::process::id()
        )))
    }
}

impl Drop for SharedRam {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// The largest gap between consecutive replies that overlaps the switch
/// (`[started, resumed]`): what the migration cost the flood ping, apart
/// from the guest's own jitter elsewhere in the run.
pub fn switch_gap(times: &[f64], m: &MigrationReport) -> f64 {
    times
        .windows(2)
        .filter(|w| w[1] >= m.started && w[0] <= m.resumed)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max)
}

/// A ring of the guest's NIC where QEMU has it in guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RingPlace {
    /// Virtqueue index: `2p` is pair p's RX ring, `2p + 1` its TX ring.
    pub index: u16,
    pub size: u16,
    pub desc: u64,
    pub avail: u64,
    pub used: u64,
    /// QEMU's last available index: once the backend stopped the ring,
    /// the base GET_VRING_BASE returned.
    pub last_avail: u16,
}

const PAGE: u64 = 4096;

impl RingPlace {
    pub fn name(&self) -> String {
        let dir = if self.index.is_multiple_of(2) {
            "RX"
        } else {
            "TX"
        };
        format!("{dir} ring of pair {}", self.index / 2)
    }

    fn pages(start: u64, len: u64) -> std::ops::RangeInclusive<u64> {
        start / PAGE..=(start + len - 1) / PAGE
    }

    /// Pages only the guest writes: the descriptor table and the
    /// available ring.
    fn guest_pages(&self) -> impl Iterator<Item = u64> {
        let n = u64::from(self.size);
        Self::pages(self.desc, 16 * n).chain(Self::pages(self.avail, 6 + 2 * n))
    }

    /// Pages only the backend writes: the used ring (with `avail_event`).
    fn backend_pages(&self) -> std::ops::RangeInclusive<u64> {
        Self::pages(self.used, 6 + 8 * u64::from(self.size))
    }
}

impl Vm {
    /// The NIC's data rings for `pairs` queue pairs, as QEMU has them
    /// (QMP `x-query-virtio-queue-status`, in QEMU 7.2 and 10).
    pub fn rings(&mut self, pairs: u16) -> anyhow::Result<Vec<RingPlace>> {
        let devices = self.qmp.execute("x-query-virtio", json!({}))?;
        let path = devices
            .as_array()
            .and_then(|d| d.iter().find(|d| d["name"] == "virtio-net"))
            .and_then(|d| d["path"].as_str())
            .with_context(|| format!("no virtio-net device: {devices}"))?
            .to_string();
        (0..2 * pairs)
            .map(|index| {
                let s = self.qmp.execute(
                    "x-query-virtio-queue-status",
                    json!({ "path": path, "queue": index }),
                )?;
                let field = |name: &str| {
                    s[name]
                        .as_u64()
                        .with_context(|| format!("queue {index}: no {name} in {s}"))
                };
                Ok(RingPlace {
                    index,
                    size: u16::try_from(field("vring-num")?)?,
                    desc: field("vring-desc")?,
                    avail: field("vring-avail")?,
                    used: field("vring-used")?,
                    last_avail: u16::try_from(field("last-avail-idx")?)?,
                })
            })
            .collect()
    }

    /// Resumes a VM started paused (`QemuOptions::paused`).
    pub fn cont(&mut self) -> anyhow::Result<()> {
        self.qmp.execute("cont", json!({}))?;
        Ok(())
    }

    /// Whether the VM waits for `cont` (started with `-S`, or stopped).
    pub fn paused(&mut self) -> anyhow::Result<bool> {
        let status = self.qmp.execute("query-status", json!({}))?;
        Ok(status["running"] == false)
    }
}

/// A guest's RAM in the file QEMU keeps it in (`QemuOptions::ram_file`).
/// microvm puts RAM at guest physical address 0, so an address is an
/// offset in the file.
pub struct RamFile(pub std::fs::File);

impl RamFile {
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        Ok(Self(std::fs::File::open(path).with_context(|| {
            format!("opening guest RAM {}", path.display())
        })?))
    }

    pub fn u16_at(&self, gpa: u64) -> anyhow::Result<u16> {
        use std::os::unix::fs::FileExt;
        let mut b = [0u8; 2];
        self.0.read_exact_at(&mut b, gpa)?;
        Ok(u16::from_le_bytes(b))
    }

    /// The ring's available and used indices.
    pub fn indices(&self, ring: &RingPlace) -> anyhow::Result<(u16, u16)> {
        Ok((self.u16_at(ring.avail + 2)?, self.u16_at(ring.used + 2)?))
    }

    /// The pages whose contents differ from `other`'s.
    pub fn differing_pages(&self, other: &Self) -> anyhow::Result<Vec<u64>> {
        use std::os::unix::fs::FileExt;
        const CHUNK: usize = 1 << 20;
        let len = self.0.metadata()?.len();
        anyhow::ensure!(
            other.0.metadata()?.len() == len,
            "the two RAM files differ in size"
        );
        let (mut a, mut b) = (vec![0u8; CHUNK], vec![0u8; CHUNK]);
        let mut pages = Vec::new();
        let mut at = 0;
        while at < len {
            let n = CHUNK.min((len - at) as usize);
            self.0.read_exact_at(&mut a[..n], at)?;
            other.0.read_exact_at(&mut b[..n], at)?;
            for (i, (x, y)) in a[..n]
                .chunks(PAGE as usize)
                .zip(b[..n].chunks(PAGE as usize))
                .enumerate()
            {
                if x != y {
                    pages.push(at / PAGE + i as u64);
                }
            }
            at += n as u64;
        }
        Ok(pages)
    }
}

/// Whose write a migration lost, by who alone writes the page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lost {
    /// A ring page only the guest writes (descriptors, available ring):
    /// the frontend's migration stream dropped the guest's write.
    GuestWrite { page: u64, what: String },
    /// A used-ring page, which only the backend writes: a write the
    /// backend did not log.
    BackendWrite { page: u64, what: String },
    /// Other guest RAM (guest data, or a buffer the backend filled): the
    /// pages, unattributed.
    Pages(Vec<u64>),
}

/// What a migration did to the rings, found with both QEMUs paused after
/// it (the destination started with `-S`): their RAMs compared page by
/// page, and each ring's indices held against the base the source's
/// backend returned (GET_VRING_BASE).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SwitchReport {
    /// QEMU's version (`QemuBuild::version`).
    pub qemu: String,
    pub lost: Vec<Lost>,
    /// Ring indices that contradict the backend's base: (ring, what).
    pub inconsistent: Vec<(String, String)>,
}

impl SwitchReport {
    pub fn clean(&self) -> bool {
        self.lost.is_empty() && self.inconsistent.is_empty()
    }

    /// Whether something the backend writes was lost or contradicts it
    /// (sandnic's fault, whatever QEMU).
    pub fn backend_at_fault(&self) -> bool {
        !self.inconsistent.is_empty()
            || self
                .lost
                .iter()
                .any(|l| matches!(l, Lost::BackendWrite { .. }))
    }
}

impl std::fmt::Display for SwitchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.clean() {
            return write!(f, "rings consistent, both RAMs equal (QEMU {})", self.qemu);
        }
        let mut first = true;
        let mut sep = |f: &mut std::fmt::Formatter<'_>| {
            let s = if first { "" } else { "; " };
            first = false;
            f.write_str(s)
        };
        for lost in &self.lost {
            sep(f)?;
            match lost {
                Lost::GuestWrite { page, what } => write!(
                    f,
                    "the destination's RAM lost a guest write to page {page:#x} ({what}; QEMU {})",
                    self.qemu
                )?,
                Lost::BackendWrite { page, what } => write!(
                    f,
                    "the destination's RAM lost a backend write to page {page:#x} ({what}; QEMU {}): the backend did not log it",
                    self.qemu
                )?,
                Lost::Pages(pages) => write!(
                    f,
                    "the destination's RAM differs from the source's on {} other pages ({:#x?}{}; QEMU {})",
                    pages.len(),
                    &pages[..pages.len().min(8)],
                    if pages.len() > 8 { ", …" } else { "" },
                    self.qemu
                )?,
            }
        }
        for (ring, what) in &self.inconsistent {
            sep(f)?;
            write!(f, "{ring}: {what}")?;
        }
        Ok(())
    }
}

/// Compares the rings in `source` (the paused source's RAM) and
/// `destination` (the paused destination's; the same file for a local
/// migration) with the bases the source's backend returned (`rings` as
/// the source QEMU reports them after the migration).
pub fn check_switch(
    qemu: &str,
    rings: &[RingPlace],
    source: &RamFile,
    destination: &RamFile,
) -> anyhow::Result<SwitchReport> {
    let mut report = SwitchReport {
        qemu: qemu.to_string(),
        ..SwitchReport::default()
    };
    let mut other = Vec::new();
    for page in source.differing_pages(destination)? {
        let guest = rings.iter().find(|r| r.guest_pages().any(|p| p == page));
        let backend = rings.iter().find(|r| r.backend_pages().contains(&page));
        match (guest, backend) {
            (Some(r), _) => report.lost.push(Lost::GuestWrite {
                page: page * PAGE,
                what: describe(r, destination, source, page),
            }),
            (None, Some(r)) => report.lost.push(Lost::BackendWrite {
                page: page * PAGE,
                what: describe(r, destination, source, page),
            }),
            (None, None) => other.push(page * PAGE),
        }
    }
    if !other.is_empty() {
        report.lost.push(Lost::Pages(other));
    }
    for ring in rings {
        let base = ring.last_avail;
        let (avail, used) = source.indices(ring)?;
        // Every chain the backend took it completed: the used index is
        // where it stopped, and the guest published no more than a ring
        // ahead of it.
        if used != base {
            report.inconsistent.push((
                ring.name(),
                format!("used index {used:#x} in the source's RAM, but the backend returned base {base:#x}"),
            ));
        }
        if avail.wrapping_sub(base) > ring.size {
            report.inconsistent.push((
                ring.name(),
                format!("available index {avail:#x} is more than a ring ahead of base {base:#x}"),
            ));
        }
    }
    Ok(report)
}

/// The ring a lost page belongs to, with its indices in both RAMs.
fn describe(ring: &RingPlace, destination: &RamFile, source: &RamFile, page: u64) -> String {
    let part = if ring.backend_pages().contains(&page) {
        "used ring"
    } else if RingPlace::pages(ring.avail, 6 + 2 * u64::from(ring.size)).contains(&page) {
        "available ring"
    } else {
        "descriptor table"
    };
    let indices = |ram: &RamFile| {
        ram.indices(ring).map_or_else(
            |e| e.to_string(),
            |(a, u)| format!("avail {a:#x}, used {u:#x}"),
        )
    };
    format!(
        "the {part} of the {}: {} there, {} in the source's",
        ring.name(),
        indices(destination),
        indices(source)
    )
}

/// Deterministic bytes (xorshift) the host streams into the guest.
pub fn stream_bytes(len: usize) -> Vec<u8> {
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// A TCP connection from the host's side to the guest's port 5000
/// (retried while the guest starts listening).
pub fn connect_to_guest(ns: &crate::harness::NetNs) -> anyhow::Result<std::net::TcpStream> {
    ns.inside(|| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match std::net::TcpStream::connect((GUEST_IP, 5000)) {
                Ok(s) => return Ok(s),
                Err(_) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e.into()),
            }
        }
    })
}

/// Writes `data` at about 8 MB/s, then closes the sending side. A guest
/// that stops reading fails the write after 30 s instead of hanging.
pub fn send_paced(mut stream: std::net::TcpStream, data: &[u8]) -> anyhow::Result<()> {
    use std::io::Write;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    for chunk in data.chunks(64 << 10) {
        stream.write_all(chunk)?;
        std::thread::sleep(Duration::from_millis(8));
    }
    stream.shutdown(std::net::Shutdown::Write)?;
    Ok(())
}
