//! Live migration of a QEMU guest whose NIC is sandnic (QEMU 7.2, TCG,
//! `-netdev vhost-user`), judged as QEMU's own TAP-fd migration test judges
//! itself: the migration completes, every unanswered probe of a flood ping
//! lies within [migrate − 50 ms, destination resumed + 50 ms], and the
//! guest answers afterwards.
//!
//! - Local migration: source and destination QEMU on one `sandnic serve`,
//!   RAM in a shared file with `x-ignore-shared`; the second QEMU connects
//!   as a standby session and takes the device over when the first stops
//!   its rings. The TAP never changes.
//! - Migration that copies RAM: two sandnic processes on two TAPs on one
//!   bridge; QEMU copies RAM under dirty logging while a TCP stream runs
//!   into the guest, and the guest checks what it received (sha256).
//!
//! Every migration says what broke: the destination starts paused, and
//! when the migration completes both QEMUs' RAM is compared and the rings
//! held against the base sandnic returned (`migration::check_switch`),
//! before the destination runs; its QEMU must log no ring error. Each runs
//! on Debian 12's QEMU 7.2 and on QEMU 10.0 where they differ. QEMU 7.2
//! loses guest writes in copied-RAM migrations under TCG (its known bug,
//! see `sandnic::soak`): there the copy test reports such a loss loudly,
//! checks that none of it is sandnic's, and ends.

use sandnic::guest::{QemuBuild, QemuOptions};
use sandnic::harness::{skip, NetNs, Sandnic, ScratchDir};
use sandnic::migration::{
    check_switch, connect_to_guest, guest_script, migrate_then, send_paced, stream_bytes,
    switch_gap, MigrationReport, RamFile, SharedRam, SwitchReport, Vm, GUEST_IP, GUEST_MAC,
};
use sandnic::ping::{FloodPing, PingReport};
use sandnic::require_network;
use sandnic::soak::RING_ERRORS;
use std::path::Path;
use std::time::Duration;

/// QEMU's test window around the switch, in seconds.
const SLACK: f64 = 0.05;

fn qemu_available(test: &str, qemu: QemuBuild) -> bool {
    match qemu.unavailable() {
        Some(why) => {
            skip(test, &why);
            false
        }
        None => true,
    }
}

/// Migrates `source` to `destination` (started paused) and checks the
/// switch with both paused: `rams` are the source's and the
/// destination's RAM files (the same file for a local migration).
fn checked_migration(
    source: &mut Vm,
    destination: &mut Vm,
    uri: &str,
    qemu: QemuBuild,
    pairs: u16,
    rams: (&Path, &Path),
) -> anyhow::Result<(MigrationReport, SwitchReport)> {
    let version = qemu.version();
    migrate_then(
        source,
        destination,
        uri,
        Duration::from_secs(120),
        |source, _| {
            let rings = source.rings(pairs)?;
            check_switch(
                &version,
                &rings,
                &RamFile::open(rams.0)?,
                &RamFile::open(rams.1)?,
            )
        },
    )
}

/// The ring errors a QEMU printed.
fn ring_errors(vm: &Vm) -> Vec<String> {
    vm.guest
        .console()
        .lines()
        .filter(|l| RING_ERRORS.iter().any(|e| l.contains(e)))
        .map(str::to_string)
        .collect()
}

/// Prints what the flood ping saw around the migration; the probes lost
/// outside QEMU's window.
fn print_ping(name: &str, ping: &PingReport, m: &MigrationReport) -> Vec<(u64, f64)> {
    let outside = ping.lost_outside(m.started - SLACK, m.resumed + SLACK);
    eprintln!(
        "{name}: migration {} ms (QEMU downtime {} ms, {} bytes), window {:.1} ms; \
         ping {} sent, {} answered, {} lost, largest gap {:.1} ms",
        m.total_ms,
        m.downtime_ms,
        m.transferred,
        (m.resumed - m.started) * 1e3,
        ping.transmitted,
        ping.received,
        ping.lost().len(),
        ping.largest_gap() * 1e3
    );
    eprintln!(
        "{name}: largest gap across the switch {:.1} ms",
        switch_gap(&ping.times, m) * 1e3
    );
    outside
}

/// QEMU's criteria on the flood ping.
fn judge(name: &str, ping: &PingReport, m: &MigrationReport) {
    let outside = print_ping(name, ping, m);
    assert!(
        outside.is_empty(),
        "{name}: probes lost outside [migrate - 50 ms, resumed + 50 ms] = [{:.3}, {:.3}]: {outside:?}",
        m.started - SLACK,
        m.resumed + SLACK
    );
    assert!(ping.received > 0, "{name}: no reply at all");
}

fn guest_answers(ns: &NetNs) -> bool {
    ns.command("ping")
        .args(["-c", "3", "-W", "3", GUEST_IP])
        .output()
        .is_ok_and(|o| o.status.success())
}

fn wait_sessions(sandnic: &Sandnic, n: usize) -> serde_json::Value {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let status = sandnic
            .api(serde_json::json!({"cmd": "status"}))
            .expect("status");
        if status["sessions"].as_array().map_or(0, Vec::len) == n {
            return status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {n} sessions: {status}\n{}",
            sandnic.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn local_migration(test: &str, pairs: u16, build: QemuBuild) {
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.88.0.1/24").unwrap();
    let dir = ScratchDir::new().unwrap();
    let queues = pairs.to_string();
    let sandnic = Sandnic::serve(&ns, &dir, &["--tap", "tap0", "--queues", &queues]).unwrap();
    let ram = SharedRam::new(test);
    let qemu = QemuOptions {
        build,
        ram_file: Some(ram.0.clone()),
        queues: pairs,
        mac: Some(GUEST_MAC.into()),
        ..QemuOptions::default()
    };
    let script = guest_script(pairs, "");
    let mut source = Vm::start("source", &dir.0, &sandnic.socket, &script, qemu.clone()).unwrap();
    source
        .wait_console("GUEST-READY", Duration::from_secs(90))
        .unwrap();
    assert!(guest_answers(&ns), "guest does not answer before migrating");
    let uri = format!("unix:{}", dir.path("migration.sock").display());
    let incoming = QemuOptions {
        incoming: Some(uri.clone()),
        paused: true,
        ..qemu
    };
    let mut destination =
        Vm::start("destination", &dir.0, &sandnic.socket, &script, incoming).unwrap();
    let status = wait_sessions(&sandnic, 2);
    assert_eq!(status["sessions"][0]["drives"], true, "{status}");
    assert_eq!(status["sessions"][1]["drives"], false, "{status}");
    for vm in [&mut source, &mut destination] {
        vm.set_capabilities(&["x-ignore-shared"]).unwrap();
    }
    let ping = FloodPing::every(&ns, GUEST_IP, "0.002", &dir.path("ping.log")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    let (report, switch) = checked_migration(
        &mut source,
        &mut destination,
        &uri,
        build,
        pairs,
        (&ram.0, &ram.0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n--- sandnic ---\n{}", sandnic.log()));
    assert!(switch.clean(), "{test}: {switch}\n{}", sandnic.log());
    std::thread::sleep(Duration::from_millis(500));
    let _ = source.qmp.execute("quit", serde_json::json!({}));
    drop(source);
    std::thread::sleep(Duration::from_millis(500));
    let ping = ping.stop().unwrap();
    judge(test, &ping, &report);
    assert!(
        guest_answers(&ns),
        "guest does not answer after migrating:\n{}\n--- sandnic ---\n{}",
        destination.guest.console(),
        sandnic.log()
    );
    let status = wait_sessions(&sandnic, 1);
    assert_eq!(status["sessions"][0]["drives"], true, "{status}");
    let stats = sandnic.stats().unwrap();
    assert_eq!(stats["control"]["standby_refusals"], 0, "{stats}");
    assert_eq!(stats["control"]["log_failures"], 0, "{stats}");
    let errors = ring_errors(&destination);
    assert!(errors.is_empty(), "{test}: destination QEMU: {errors:?}");
}

#[test]
fn qemu_7_2_local_migration_on_one_sandnic() {
    let test = "qemu_7_2_local_migration_on_one_sandnic";
    require_network!(test);
    if qemu_available(test, QemuBuild::Debian) {
        local_migration(test, 1, QemuBuild::Debian);
    }
}

#[test]
fn qemu_10_local_migration_on_one_sandnic() {
    let test = "qemu_10_local_migration_on_one_sandnic";
    require_network!(test);
    if qemu_available(test, QemuBuild::Backports) {
        local_migration(test, 1, QemuBuild::Backports);
    }
}

#[test]
fn qemu_local_migration_with_two_queue_pairs() {
    let test = "qemu_local_migration_with_two_queue_pairs";
    require_network!(test);
    if qemu_available(test, QemuBuild::Debian) {
        local_migration(test, 2, QemuBuild::Debian);
    }
}

/// A migration cancelled after the source stopped its rings (paused
/// before switchover): the source restarts them and keeps the device, the
/// destination QEMU gives up and leaves, and the guest keeps answering.
#[test]
fn qemu_migrate_cancel_returns_the_device_to_the_source() {
    let test = "qemu_migrate_cancel_returns_the_device_to_the_source";
    require_network!(test);
    if !qemu_available(test, QemuBuild::Debian) {
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.88.0.1/24").unwrap();
    let dir = ScratchDir::new().unwrap();
    let sandnic = Sandnic::serve(&ns, &dir, &["--tap", "tap0"]).unwrap();
    let ram = SharedRam::new(test);
    let qemu = QemuOptions {
        ram_file: Some(ram.0.clone()),
        mac: Some(GUEST_MAC.into()),
        ..QemuOptions::default()
    };
    let script = guest_script(1, "");
    let mut source = Vm::start("source", &dir.0, &sandnic.socket, &script, qemu.clone()).unwrap();
    source
        .wait_console("GUEST-READY", Duration::from_secs(90))
        .unwrap();
    let uri = format!("unix:{}", dir.path("migration.sock").display());
    let incoming = QemuOptions {
        incoming: Some(uri.clone()),
        ..qemu
    };
    let mut destination =
        Vm::start("destination", &dir.0, &sandnic.socket, &script, incoming).unwrap();
    let before = wait_sessions(&sandnic, 2);
    let source_session = before["sessions"][0]["id"].clone();
    source
        .set_capabilities(&["x-ignore-shared", "pause-before-switchover"])
        .unwrap();
    destination.set_capabilities(&["x-ignore-shared"]).unwrap();
    let ping = FloodPing::every(&ns, GUEST_IP, "0.002", &dir.path("ping.log")).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let started = sandnic::migration::wall_clock();
    source
        .qmp
        .execute("migrate", serde_json::json!({ "uri": uri }))
        .unwrap();
    wait_migration_status(&mut source, "pre-switchover");
    let paused = sandnic.api(serde_json::json!({"cmd": "status"})).unwrap();
    assert!(
        paused["sessions"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["drives"] == false),
        "the source stopped its rings: nobody drives: {paused}"
    );
    source
        .qmp
        .execute("migrate_cancel", serde_json::json!({}))
        .unwrap();
    let resumed = source
        .qmp
        .wait_event("RESUME", Duration::from_secs(30))
        .unwrap();
    let resumed = sandnic::qmp::event_time(&resumed).unwrap();
    wait_migration_status(&mut source, "cancelled");
    std::thread::sleep(Duration::from_millis(500));
    let ping = ping.stop().unwrap();
    let report = MigrationReport {
        started,
        resumed,
        total_ms: 0,
        downtime_ms: 0,
        transferred: 0,
    };
    judge(test, &ping, &report);
    assert!(guest_answers(&ns), "guest does not answer after the cancel");
    // QEMU's destination exits when its incoming stream is cut.
    drop(destination);
    let after = wait_sessions(&sandnic, 1);
    assert_eq!(after["sessions"][0]["id"], source_session, "{after}");
    assert_eq!(after["sessions"][0]["drives"], true, "{after}");
    let stats = sandnic.stats().unwrap();
    assert_eq!(stats["control"]["standby_refusals"], 0, "{stats}");
}

fn wait_migration_status(vm: &mut Vm, status: &str) {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let info = vm
            .qmp
            .execute("query-migrate", serde_json::json!({}))
            .unwrap();
        if info["status"] == status {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "migration never reached {status}: {info}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn sha256(path: &Path) -> String {
    let out = std::process::Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

#[test]
fn qemu_7_2_migration_between_two_sandnics_copies_ram_under_dirty_logging() {
    let test = "qemu_7_2_migration_between_two_sandnics_copies_ram_under_dirty_logging";
    require_network!(test);
    if qemu_available(test, QemuBuild::Debian) {
        copy_migration(test, QemuBuild::Debian);
    }
}

#[test]
fn qemu_10_migration_between_two_sandnics_copies_ram_under_dirty_logging() {
    let test = "qemu_10_migration_between_two_sandnics_copies_ram_under_dirty_logging";
    require_network!(test);
    if qemu_available(test, QemuBuild::Backports) {
        copy_migration(test, QemuBuild::Backports);
    }
}

fn copy_migration(test: &str, build: QemuBuild) {
    let ns = NetNs::new().unwrap();
    ns.add_bridge("br0", "10.88.0.1/24").unwrap();
    ns.add_bridged_tap("tap0", "br0", true).unwrap();
    ns.add_bridged_tap("tap1", "br0", true).unwrap();
    let (dir_a, dir_b) = (ScratchDir::new().unwrap(), ScratchDir::new().unwrap());
    let sandnic_a = Sandnic::serve(&ns, &dir_a, &["--tap", "tap0"]).unwrap();
    let sandnic_b = Sandnic::serve(&ns, &dir_b, &["--tap", "tap1"]).unwrap();
    let rams = [
        SharedRam::new(&format!("{test}-source")),
        SharedRam::new(&format!("{test}-destination")),
    ];
    let qemu = QemuOptions {
        build,
        ram_file: Some(rams[0].0.clone()),
        mac: Some(GUEST_MAC.into()),
        device_props: vec!["guest_announce=off".into()],
        ..QemuOptions::default()
    };
    let receive = "(nc -l -p 5000 | sha256sum | sed 's/^/GUEST-SUM /') &\n";
    let script = guest_script(1, receive);
    let mut source =
        Vm::start("source", &dir_a.0, &sandnic_a.socket, &script, qemu.clone()).unwrap();
    source
        .wait_console("GUEST-READY", Duration::from_secs(90))
        .unwrap();
    let uri = format!("unix:{}", dir_b.path("migration.sock").display());
    let incoming = QemuOptions {
        incoming: Some(uri.clone()),
        paused: true,
        ram_file: Some(rams[1].0.clone()),
        ..qemu
    };
    let mut destination = Vm::start(
        "destination",
        &dir_b.0,
        &sandnic_b.socket,
        &script,
        incoming,
    )
    .unwrap();
    source
        .qmp
        .execute(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": 4u64 << 30 }),
        )
        .unwrap();
    // The stream: paced so it runs before, during and after the migration.
    let data = stream_bytes(24 << 20);
    let expected_file = dir_a.path("stream.bin");
    std::fs::write(&expected_file, &data).unwrap();
    let expected = sha256(&expected_file);
    let stream = connect_to_guest(&ns).unwrap();
    let sender = std::thread::spawn(move || send_paced(stream, &data));
    let ping = FloodPing::every(&ns, GUEST_IP, "0.002", &dir_a.path("ping.log")).unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let (report, switch) = checked_migration(
        &mut source,
        &mut destination,
        &uri,
        build,
        1,
        (&rams[0].0, &rams[1].0),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n--- sandnic A ---\n{}", sandnic_a.log()));
    assert!(
        !switch.backend_at_fault(),
        "{test}: {switch}\n--- sandnic A ---\n{}",
        sandnic_a.log()
    );
    if build == QemuBuild::Debian && !switch.clean() {
        // What follows (a dead TX ring, a guest that stops answering) is
        // the lost write's doing, not sandnic's: said, and the test ends.
        eprintln!(
            "\n*** {test}: QEMU 7.2 lost a guest write in this migration, its known TCG \
             dirty-tracking bug (fixed by QEMU 03bfc2188f06, first in 9.0): {switch} ***\n"
        );
        return;
    }
    assert!(switch.clean(), "{test}: {switch}");
    let sent = sender.join().expect("sender thread");
    sent.unwrap_or_else(|e| panic!("TCP stream into the guest broke: {e:#}"));
    destination
        .wait_console("GUEST-SUM", Duration::from_secs(60))
        .unwrap();
    let console = destination.guest.console();
    let got = console
        .lines()
        .find_map(|l| l.split("GUEST-SUM ").nth(1))
        .and_then(|s| s.split_whitespace().next())
        .unwrap_or_default()
        .to_string();
    assert_eq!(got, expected, "the guest received different bytes");
    let _ = source.qmp.execute("quit", serde_json::json!({}));
    drop(source);
    std::thread::sleep(Duration::from_millis(300));
    let ping = ping.stop().unwrap();
    // Not judged by QEMU's window here: the bridge keeps sending to the
    // old port until the guest or QEMU's announcement (SEND_RARP, at
    // announce-initial = 50 ms after the switch) shows the new one, which
    // can be a few ms past the window on a loaded machine. The bench
    // measures it (benches/migration.rs).
    let _ = print_ping(test, &ping, &report);
    assert!(ping.received > 0, "no reply at all");
    assert!(guest_answers(&ns), "guest does not answer after migrating");
    let stats_b = sandnic_b.stats().unwrap();
    assert!(
        stats_b["control"]["rarps_sent"].as_u64().unwrap_or(0) >= 1,
        "the destination never announced the guest (guest_announce=off): {stats_b}\n{}",
        sandnic_b.log()
    );
    let fdb = ns
        .command("bridge")
        .args(["fdb", "show", "br", "br0"])
        .output()
        .unwrap();
    let fdb = String::from_utf8_lossy(&fdb.stdout).to_string();
    assert!(
        fdb.lines()
            .any(|l| l.starts_with(GUEST_MAC) && l.contains("dev tap1")),
        "the bridge did not learn the guest on tap1:\n{fdb}"
    );
    let stats_a = sandnic_a.stats().unwrap();
    assert_eq!(stats_a["control"]["log_failures"], 0, "{stats_a}");
    let errors = ring_errors(&destination);
    assert!(errors.is_empty(), "{test}: destination QEMU: {errors:?}");
}
