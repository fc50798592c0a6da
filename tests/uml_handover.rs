//! A UML guest (a real Linux virtio_net driver) keeps its network through a
//! handover to a new process, a hot swap of the device component, and a
//! second handover, while the host flood-pings it (`ping -i 0 -D`, as QEMU's
//! TAP fd migration test does). Fails if the largest gap between successful
//! replies exceeds 0.5 s (QEMU's threshold) and prints the gap measured.

use sandnic::guest::{self, GuestRig, Kind};
use sandnic::harness::{Sandnic, UNPRIVILEGED_USER};
use sandnic::ping::FloodPing;
use sandnic::require_network;
use serde_json::json;
use std::time::Duration;

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
step ready x
"#;

#[test]
fn uml_guest_keeps_its_network_through_handover_swap_handover() {
    require_network!("uml_guest_keeps_its_network_through_handover_swap_handover");
    if let Some(why) = guest::unavailable(Kind::Uml) {
        sandnic::harness::skip(
            "uml_guest_keeps_its_network_through_handover_swap_handover",
            &why,
        );
        return;
    }
    let GuestRig {
        mut guest,
        hostdir,
        sandnic: first,
        ns,
        dir,
    } = GuestRig::boot(Kind::Uml, &[], SCRIPT).unwrap();
    hostdir
        .wait_for("ready", Duration::from_secs(30), &guest)
        .unwrap();

    let ping = FloodPing::start(&ns, "10.88.0.2", &dir.path("ping.log")).unwrap();
    let settle = || std::thread::sleep(Duration::from_millis(800));
    settle();

    // Handover 1: the builtin (v1) component moves to a new process.
    let user = ["--user", UNPRIVILEGED_USER];
    let (second, path) = Sandnic::incoming(&ns, &dir, "second", &first, &user).unwrap();
    let reply = first.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", second.log());
    settle();
    // Swap the component to device version 2 inside the new process.
    let v2 = sandnic_host::sandbox::components::built::v2();
    let swap = second.api(json!({"cmd": "swap", "component": v2})).unwrap();
    assert_eq!(swap["ok"], true, "{swap}");
    settle();
    // Handover 2: to a third process that runs v2 from the start.
    let v2_arg = v2.to_str().unwrap().to_string();
    let (third, path) = Sandnic::incoming(
        &ns,
        &dir,
        "third",
        &second,
        &["--component", &v2_arg, "--user", UNPRIVILEGED_USER],
    )
    .unwrap();
    let reply2 = second.handover(&path, false).unwrap();
    assert_eq!(reply2["ok"], true, "{reply2}\n{}", third.log());
    settle();

    let report = ping.stop().unwrap();
    hostdir.release("ready");
    let gap = report.largest_gap();
    eprintln!(
        "flood ping: {} sent, {} replies, largest gap {:.1} ms; handover downtimes {} µs and {} µs; swap pause {} µs",
        report.transmitted,
        report.received,
        gap * 1000.0,
        reply["downtime_us"],
        reply2["downtime_us"],
        swap["pause_us"]
    );
    eprintln!(
        "largest gaps (s, at s from start): {:?}",
        report.top_gaps(6)
    );
    assert!(report.times.len() > 100, "too few replies: {report:?}");
    assert!(gap <= 0.5, "largest gap {gap:.3} s exceeds 0.5 s");
    let status = third.api(json!({"cmd": "status"})).unwrap();
    assert_eq!(status["component"]["version"], "0.2.0");
    assert_eq!(status["frontend_connected"], true);
    assert_eq!(
        guest.wait(Duration::from_secs(30)).unwrap(),
        0,
        "{}",
        guest.console()
    );
}
