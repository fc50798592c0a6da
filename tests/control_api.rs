//! `sandnic serve`'s command line and control API, and what the API's
//! commands do to a connected device: link changes reach the driver as a
//! config-change notification and the host as the TAP's carrier, a swap
//! keeps traffic and state, a saved state reads back.

use sandnic::frontend::NicConfig;
use sandnic::harness::{sandnic_binary, NetNs, Rig, ScratchDir};
use sandnic::require_network;
use serde_json::json;
use std::process::Command;
use std::time::Duration;

#[test]
fn link_down_and_up_notify_the_driver() {
    require_network!("link_down_and_up_notify_the_driver");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    assert_eq!(&rig.nic.config(12).unwrap()[6..8], &[1, 0], "link up");
    let reply = rig
        .sandnic
        .api(json!({"cmd": "link", "up": false}))
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    assert!(
        rig.nic.wait_config_change(Duration::from_secs(5)),
        "CONFIG_CHANGE_MSG sent"
    );
    assert_eq!(
        &rig.nic.config(12).unwrap()[6..8],
        &[0, 0],
        "status shows link down"
    );
    assert!(!rig.ns.carrier("tap0").unwrap(), "the host sees no carrier");
    // With the link down, frames from the guest are dropped.
    let frame = rig.guest_udp(6200, &[1; 20]);
    rig.nic.send(0, &frame).unwrap();
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(rig.stat(0, "tx_drops"), 1);
    rig.sandnic.api(json!({"cmd": "link", "up": true})).unwrap();
    assert!(rig.nic.wait_config_change(Duration::from_secs(5)));
    assert_eq!(&rig.nic.config(12).unwrap()[6..8], &[1, 0]);
    assert!(rig.ns.carrier("tap0").unwrap(), "the carrier is back");
    assert_eq!(rig.control_stat("config_notifications"), 2);
}

/// A TAP deleted under a running device (`ip link del`): said once in the
/// log, the guest's link goes down with a config change, `status` reports
/// it, nothing retries the dead queue (it used to, a thousand times a
/// second, silently), and `link up` is refused with its kind.
#[test]
fn a_deleted_tap_takes_the_link_down_and_says_so_once() {
    require_network!("a_deleted_tap_takes_the_link_down_and_says_so_once");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    rig.nic.fill_rx(0);
    rig.ns.ip(&["link", "del", "tap0"]).unwrap();
    assert!(
        rig.nic.wait_config_change(Duration::from_secs(5)),
        "the guest is told"
    );
    assert_eq!(&rig.nic.config(12).unwrap()[6..8], &[0, 0], "link down");
    let status = rig.sandnic.api(json!({"cmd": "status"})).unwrap();
    assert_eq!(status["tap_gone"], true, "{status}");
    assert_eq!(status["link_up"], false, "{status}");
    let errors = rig.stat(0, "rx_errors");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        rig.stat(0, "rx_errors"),
        errors,
        "the dead queue is left alone"
    );
    let reply = rig.sandnic.api(json!({"cmd": "link", "up": true})).unwrap();
    assert_eq!(reply["kind"], "tap_gone", "{reply}");
    let status = rig.sandnic.api(json!({"cmd": "status"})).unwrap();
    assert_eq!(
        status["link_up"], false,
        "a refused link up changed nothing"
    );
    // What the guest sends now is dropped, and counted.
    let frame = rig.guest_udp(6200, &[1; 20]);
    rig.nic.send(0, &frame).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while rig.stat(0, "tx_drops") == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(rig.stat(0, "tx_drops"), 1);
    assert_eq!(
        rig.sandnic.log().matches("the TAP device is gone").count(),
        1,
        "{}",
        rig.sandnic.log()
    );
}

#[test]
fn announce_sets_the_status_bit() {
    require_network!("announce_sets_the_status_bit");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    assert_eq!(
        rig.sandnic.api(json!({"cmd": "announce"})).unwrap()["ok"],
        true
    );
    assert!(rig.nic.wait_config_change(Duration::from_secs(5)));
    assert_eq!(
        &rig.nic.config(12).unwrap()[6..8],
        &[3, 0],
        "LINK_UP | ANNOUNCE"
    );
    assert_eq!(rig.nic.ctrl(&[3, 0]).unwrap(), 0, "ANNOUNCE_ACK");
    assert_eq!(&rig.nic.config(12).unwrap()[6..8], &[1, 0]);
}

#[test]
fn ctl_commands_and_swap_through_the_api() {
    require_network!("ctl_commands_and_swap_through_the_api");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    let ctl = |args: &[&str]| {
        let out = Command::new(sandnic_binary())
            .arg("ctl")
            .arg("--api")
            .arg(&rig.sandnic.api)
            .args(args)
            .output()
            .unwrap();
        let reply: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or(json!(null));
        (out.status.code(), reply)
    };
    let (code, status) = ctl(&["status"]);
    assert_eq!(code, Some(0));
    assert_eq!(status["component"]["version"], "0.1.0");
    assert_eq!(status["frontend_connected"], true);
    let (code, stats) = ctl(&["stats"]);
    assert_eq!(code, Some(0));
    assert!(stats["queues"][0]["rx_packets"].is_u64());
    assert_eq!(ctl(&["link", "down"]).1["link_up"], false);
    assert_eq!(ctl(&["link", "up"]).1["link_up"], true);

    // Swap to device version 2 while the device is configured.
    rig.nic.ctrl(&[2, 0, 100, 0]).unwrap();
    let v2 = sandnic_host::sandbox::components::built::v2();
    let (code, swap) = ctl(&["swap", v2.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{swap}");
    assert_eq!(swap["to"]["version"], "0.2.0");
    assert!(swap["pause_us"].as_u64().unwrap() < 100_000);
    assert_eq!(ctl(&["status"]).1["component"]["version"], "0.2.0");
    assert_eq!(
        rig.nic.ctrl(&[2, 1, 100, 0]).unwrap(),
        0,
        "the new component serves the control queue"
    );
    // Back to v1 is refused (state version 2 is newer) and v2 keeps running.
    let v1 = sandnic_host::sandbox::components::built::v1();
    let (code, refused) = ctl(&["swap", v1.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert_eq!(refused["kind"], "swap_refused", "{refused}");
    assert_eq!(ctl(&["status"]).1["component"]["version"], "0.2.0");
    // A bad request over the raw API.
    for bad in [
        json!({"cmd": "frobnicate"}),
        json!({"cmd": "link"}),
        json!({}),
    ] {
        let reply = rig.sandnic.api(bad.clone()).unwrap();
        assert_eq!(reply["ok"], false, "{bad}: {reply}");
        assert_eq!(reply["kind"], "bad_request", "{bad}: {reply}");
    }
    // Output into a pipe nobody reads any more (`ctl status | head -1`,
    // once head has gone): `ctl` ends quietly, with no panic or backtrace.
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let out = Command::new(sandnic_binary())
        .arg("ctl")
        .arg("--api")
        .arg(&rig.sandnic.api)
        .arg("status")
        .stdout(std::process::Stdio::from(writer))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.is_empty(), "ctl wrote to stderr: {stderr}");
    assert_eq!(out.status.code(), Some(0));
}

fn serve(args: &[&str]) -> std::process::Output {
    Command::new(sandnic_binary())
        .arg("serve")
        .args(args)
        .env(
            "SANDNIC_CACHE_DIR",
            std::env::temp_dir().join("sandnic-test-cache"),
        )
        .output()
        .unwrap()
}

#[test]
fn serve_usage_errors_exit_2_and_leave_nothing_behind() {
    require_network!("serve_usage_errors_exit_2_and_leave_nothing_behind");
    let dir = ScratchDir::new().unwrap();
    let sock = dir.path("v.sock");
    let s = sock.to_str().unwrap();
    let one_line = |out: &std::process::Output| {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        assert_eq!(err.trim().lines().count(), 1, "one-line error: {err}");
        err
    };
    // Bad flags: exit 2, one line.
    for bad in [
        vec!["--socket", s],
        vec!["--socket", s, "--tap", "x", "--mac", "zz"],
        vec!["--socket", s, "--tap", "x", "--queues", "0"],
        vec!["--socket", s, "--tap", "x", "--no-such-flag"],
    ] {
        let out = serve(&bad);
        assert_eq!(out.status.code(), Some(2), "{bad:?}");
        one_line(&out);
    }
    // Everything missing is named at once.
    let out = serve(&[]);
    assert_eq!(out.status.code(), Some(2));
    let err = one_line(&out);
    assert!(err.contains("--tap") && err.contains("--socket"), "{err}");
    // A handover destination takes the device from its source: flags that
    // would set it up are refused, with the reason, and nothing is bound.
    let incoming = dir.path("next.handover");
    let i = incoming.to_str().unwrap();
    for flag in [
        vec!["--mac", "52:54:00:12:34:56"],
        vec!["--queues", "2"],
        vec!["--mtu", "9000"],
        vec!["--api", s],
        vec!["--tap", "x"],
        vec!["--socket", s],
        vec!["--connect", s],
    ] {
        let mut args = vec!["--incoming", i];
        args.extend(&flag);
        let out = serve(&args);
        assert_eq!(out.status.code(), Some(2), "{flag:?}");
        let err = one_line(&out);
        assert!(
            err.contains(flag[0]) && err.contains("takes the device whole from the source"),
            "{err}"
        );
        assert!(!incoming.exists(), "{flag:?}: nothing bound");
    }
    // A TAP that does not exist.
    let out = serve(&["--socket", s, "--tap", "sandnic-none0"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("does not exist"));
    assert!(!sock.exists(), "no socket left behind");
    // A socket path in use.
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.66.0.1/24").unwrap();
    // Two queue pairs on a TAP made without multi_queue: the fix is named.
    ns.ip(&["tuntap", "add", "dev", "single0", "mode", "tap", "vnet_hdr"])
        .unwrap();
    let out = ns
        .command(sandnic_binary().to_str().unwrap())
        .args(["serve", "--socket", s, "--tap", "single0", "--queues", "2"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("multi_queue"));
    assert!(!sock.exists(), "no socket left behind");
    let running = sandnic::harness::Sandnic::serve(&ns, &dir, &["--tap", "tap0"]).unwrap();
    let taken = running.socket.to_str().unwrap();
    let out = ns
        .command(sandnic_binary().to_str().unwrap())
        .args(["serve", "--socket", taken, "--tap", "tap0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("in use"));
    assert!(
        running.socket.exists(),
        "the running server's socket is untouched"
    );
    // A TAP whose queues the running server holds: a second server would
    // take half the guest's inbound flows, so it is refused before it
    // attaches a queue.
    let other = dir.path("other.sock");
    let out = ns
        .command(sandnic_binary().to_str().unwrap())
        .args([
            "serve",
            "--socket",
            other.to_str().unwrap(),
            "--tap",
            "tap0",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(one_line(&out).contains("TAP \"tap0\" is in use"), "{out:?}");
    assert!(!other.exists(), "no socket left behind");
    assert_eq!(
        running.api(serde_json::json!({"cmd": "status"})).unwrap()["ok"],
        true
    );
}

/// `sandnic inspect FILE` reads every shipped fixture (states of every
/// released version) with no `--component`: the binary carries a component
/// per state version.
#[test]
fn inspect_reads_every_fixture_without_flags() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut read = 0;
    for entry in std::fs::read_dir(&fixtures).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "msgpack") {
            continue;
        }
        let out = Command::new(sandnic_binary())
            .arg("inspect")
            .arg(&path)
            .env(
                "SANDNIC_CACHE_DIR",
                std::env::temp_dir().join("sandnic-test-cache"),
            )
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(0), "{}: {stderr}", path.display());
        let json: serde_json::Value = serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("{}: {e}: {stderr}", path.display()));
        assert!(json.get("mac").is_some(), "{}: {json}", path.display());
        // device-state-vN.msgpack holds state version N.
        let stem = path.file_stem().unwrap().to_string_lossy().into_owned();
        if let Some(version) = stem
            .rsplit_once("-v")
            .and_then(|(_, v)| v.parse::<u64>().ok())
        {
            assert_eq!(json["version"], version, "{}: {json}", path.display());
        }
        read += 1;
    }
    assert!(read >= 2, "the v1 and v2 fixtures at least");
}

/// `ctl save FILE` writes the running device's state and `inspect FILE`
/// reads it back, as the device has it: its MAC, the RX mode the driver
/// set, the link the operator took down.
#[test]
fn a_saved_state_reads_back_with_inspect() {
    require_network!("a_saved_state_reads_back_with_inspect");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    assert_eq!(rig.nic.ctrl(&[0, 0, 0]).unwrap(), 0, "promiscuous off");
    rig.sandnic
        .api(json!({"cmd": "link", "up": false}))
        .unwrap();
    let file = rig.dir.path("device.state");
    let out = Command::new(sandnic_binary())
        .arg("ctl")
        .arg("--api")
        .arg(&rig.sandnic.api)
        .arg("save")
        .arg(&file)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let summary: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(summary["component"]["version"], "0.1.0", "{summary}");
    let out = Command::new(sandnic_binary())
        .arg("inspect")
        .arg(&file)
        .env(
            "SANDNIC_CACHE_DIR",
            std::env::temp_dir().join("sandnic-test-cache"),
        )
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let state: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(state["mac"], "52:54:00:12:34:56", "{state}");
    assert_eq!(state["rx_mode"]["promisc"], false, "{state}");
    assert_eq!(state["link_up"], false, "{state}");
    // A file that is not a state: a clear refusal, exit 1.
    std::fs::write(&file, b"not a state").unwrap();
    let out = Command::new(sandnic_binary())
        .arg("inspect")
        .arg(&file)
        .env(
            "SANDNIC_CACHE_DIR",
            std::env::temp_dir().join("sandnic-test-cache"),
        )
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a sandnic device state"), "{err}");
}
