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
    let resume = destination
        .qmp
        .wait_event("RESUME", Duration::from_secs(30))
        .with_context(|| format!("destination:\n{}", destination.guest.console()))?;
    Ok(MigrationReport {
        started,
        resumed: event_time(&resume).unwrap_or_else(wall_clock),
        total_ms: info["total-time"].as_u64().unwrap_or(0),
        downtime_ms: info["downtime"].as_u64().unwrap_or(0),
        transferred: info["ram"]["transferred"].as_u64().unwrap_or(0),
    })
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
