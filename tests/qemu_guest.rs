//! QEMU (TCG, microvm) with `-netdev vhost-user` against `sandnic serve`,
//! booting Debian's stock cloud kernel. QEMU keeps the control queue and the
//! config space itself and forwards only the datapath features, so this
//! checks protocol and datapath compatibility with the most common VMM,
//! in Debian 12's QEMU 7.2 and in QEMU 10.0 from bookworm-backports.

use sandnic::guest::{GuestRig, Kind, QemuBuild, QemuOptions};
use sandnic::require_network;
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
if ping -c 3 -W 3 10.88.0.1; then echo GUEST-PING-OK; else echo GUEST-PING-FAILED; fi
# Stay up while the host pings us.
i=0; while [ $i -lt 200 ] && [ ! -e /tmp/done ]; do sleep 0.1; i=$((i+1)); done
"#;

#[test]
fn qemu_7_2_vhost_user_netdev_pings_over_the_tap() {
    pings_over_the_tap(
        "qemu_7_2_vhost_user_netdev_pings_over_the_tap",
        QemuBuild::Debian,
    );
}

#[test]
fn qemu_10_vhost_user_netdev_pings_over_the_tap() {
    pings_over_the_tap(
        "qemu_10_vhost_user_netdev_pings_over_the_tap",
        QemuBuild::Backports,
    );
}

fn pings_over_the_tap(test: &str, qemu: QemuBuild) {
    require_network!(test);
    if let Some(why) = qemu.unavailable() {
        sandnic::harness::skip(test, &why);
        return;
    }
    let GuestRig {
        guest,
        sandnic,
        ns,
        dir: _dir,
        hostdir: _hostdir,
    } = GuestRig::boot_with(Kind::Qemu, on(qemu), &[], SCRIPT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let console = guest.console();
        if console.contains("GUEST-PING-OK") {
            break;
        }
        if console.contains("GUEST-PING-FAILED") || Instant::now() > deadline {
            panic!(
                "guest → host ping failed:\n{console}\n--- sandnic ---\n{}",
                sandnic.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-W", "3", "10.88.0.2"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "host → guest ping failed: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        sandnic.log()
    );
    let stats = sandnic.stats().unwrap();
    assert!(
        stats["queues"][0]["tx_packets"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert!(
        stats["queues"][0]["rx_packets"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert_eq!(stats["control"]["sandbox_failures"], 0);
}

fn on(build: QemuBuild) -> QemuOptions {
    QemuOptions {
        build,
        ..QemuOptions::default()
    }
}

fn host_pings_guest(ns: &sandnic::harness::NetNs) -> bool {
    ns.command("ping")
        .args(["-c", "2", "-W", "2", "10.88.0.2"])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// `ctl link down` with a QEMU guest: QEMU takes no config change from a
/// vhost-user backend, so the guest keeps its carrier, but the host's side
/// loses it (the TAP's carrier) and traffic stops both ways; `link up`
/// brings both back.
#[test]
fn qemu_link_down_takes_the_taps_carrier() {
    let test = "qemu_link_down_takes_the_taps_carrier";
    require_network!(test);
    if let Some(why) = QemuBuild::Debian.unavailable() {
        sandnic::harness::skip(test, &why);
        return;
    }
    let script = "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\necho GUEST-UP\n\
                  i=0; while [ $i -lt 600 ]; do sleep 0.1; i=$((i+1)); done\n";
    let rig = GuestRig::boot_with(Kind::Qemu, on(QemuBuild::Debian), &[], script).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.guest.console().contains("GUEST-UP") {
        assert!(Instant::now() < deadline, "{}", rig.guest.console());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host_pings_guest(&rig.ns), "{}", rig.sandnic.log());
    assert!(rig.ns.carrier("tap0").unwrap());
    let down = rig
        .sandnic
        .api(serde_json::json!({"cmd": "link", "up": false}))
        .unwrap();
    assert_eq!(down["ok"], true, "{down}");
    assert!(!rig.ns.carrier("tap0").unwrap(), "the host sees NO-CARRIER");
    assert!(!host_pings_guest(&rig.ns), "traffic stopped");
    rig.sandnic
        .api(serde_json::json!({"cmd": "link", "up": true}))
        .unwrap();
    assert!(rig.ns.carrier("tap0").unwrap(), "the carrier is back");
    assert!(host_pings_guest(&rig.ns), "traffic is back");
}

/// QEMU whose guest RAM is not shared (no `share=on` memory backend) falls
/// back to its own datapath and never sends a memory table: sandnic says
/// so, in its log and in `status`, naming the fix.
#[test]
fn qemu_without_shared_memory_is_called_out() {
    let test = "qemu_without_shared_memory_is_called_out";
    require_network!(test);
    if let Some(why) = QemuBuild::Debian.unavailable() {
        sandnic::harness::skip(test, &why);
        return;
    }
    let qemu = QemuOptions {
        private_memory: true,
        ..on(QemuBuild::Debian)
    };
    let rig = GuestRig::boot_with(Kind::Qemu, qemu, &[], SCRIPT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let stalled = loop {
        let status = rig
            .sandnic
            .api(serde_json::json!({"cmd": "status"}))
            .unwrap();
        if let Some(why) = status["sessions"][0]["stalled"].as_str() {
            break why.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{status}\n{}\n{}",
            rig.guest.console(),
            rig.sandnic.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(stalled.contains("share=on"), "{stalled}");
    assert!(
        rig.sandnic.log().contains("sent no memory table"),
        "{}",
        rig.sandnic.log()
    );
}

/// Client mode with QEMU as the server (`server=on,wait=off`, what
/// libvirt's `<source mode='server'>` gives): sandnic dials QEMU, and
/// after a `kill -9` a new sandnic on the same TAP dials QEMU's socket
/// again; the guest answers again each time.
#[test]
fn qemu_client_mode_comes_back_after_sandnic_is_killed() {
    let test = "qemu_client_mode_comes_back_after_sandnic_is_killed";
    require_network!(test);
    if let Some(why) = QemuBuild::Debian.unavailable() {
        sandnic::harness::skip(test, &why);
        return;
    }
    let script = "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\necho GUEST-UP\n\
                  i=0; while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n";
    let qemu = QemuOptions {
        server: true,
        ..on(QemuBuild::Debian)
    };
    let mut rig = GuestRig::boot_with(Kind::Qemu, qemu, &[], script).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !rig.guest.console().contains("GUEST-UP") {
        assert!(Instant::now() < deadline, "{}", rig.guest.console());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(host_pings_guest(&rig.ns), "{}", rig.sandnic.log());
    let frontend = rig.dir.path("frontend.sock");
    let mut dirs = Vec::new();
    for round in 0..2 {
        rig.sandnic.child.kill().unwrap();
        rig.sandnic.child.wait().unwrap();
        let dir = sandnic::harness::ScratchDir::new().unwrap();
        rig.sandnic =
            sandnic::harness::Sandnic::serve_client(&rig.ns, &dir, &frontend, &["--tap", "tap0"])
                .unwrap();
        dirs.push(dir);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !host_pings_guest(&rig.ns) {
            assert!(
                Instant::now() < deadline,
                "round {round}: no answer\n{}\n{}",
                rig.sandnic.log(),
                rig.guest.console()
            );
        }
        let stats = rig.sandnic.stats().unwrap();
        assert_eq!(stats["control"]["frontends_accepted"], 1, "{stats}");
    }
}
