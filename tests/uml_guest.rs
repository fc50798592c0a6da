//! A real Linux `virtio_net` driver (User-Mode Linux over `virtio_uml`)
//! against `sandnic serve`. UML forwards everything to the backend —
//! features, config space, every queue including the control queue — so
//! the guest's own driver exercises the sandboxed device model. Each step
//! changes something in the guest and the test checks from the host that it
//! took effect.

use sandnic::frames::{self, Mac};
use sandnic::guest::{self, GuestRig, Kind};
use sandnic::harness::{NetNs, Sandnic};
use sandnic::require_network;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Duration;

const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const STEP_TIMEOUT: Duration = Duration::from_secs(30);

fn inject(sock: &OwnedFd, frame: &[u8], times: usize) {
    for _ in 0..times {
        // SAFETY: `frame` is a valid buffer of the given length.
        let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
        assert_eq!(
            n,
            frame.len() as isize,
            "inject: {}",
            std::io::Error::last_os_error()
        );
    }
}

fn totals(sandnic: &Sandnic) -> (u64, u64) {
    let stats = sandnic.stats().unwrap();
    let queues = stats["queues"].as_array().unwrap();
    let sum = |f: &str| queues.iter().map(|q| q[f].as_u64().unwrap()).sum();
    (sum("rx_packets"), sum("rx_filtered"))
}

/// Injects `count` copies of `frame` and returns how many were delivered
/// and how many filtered (waiting until all are accounted for).
fn deliver(sandnic: &Sandnic, sock: &OwnedFd, frame: &[u8], count: u64) -> (u64, u64) {
    let (rx0, f0) = totals(sandnic);
    inject(sock, frame, count as usize);
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let (rx, f) = totals(sandnic);
        if (rx - rx0) + (f - f0) >= count || std::time::Instant::now() > deadline {
            return (rx - rx0, f - f0);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn host_ethtool_k(ns: &NetNs) -> String {
    String::from_utf8_lossy(
        &ns.command("ethtool")
            .args(["-k", "tap0"])
            .output()
            .unwrap()
            .stdout,
    )
    .into_owned()
}

fn feature_on(ethtool_k: &str, name: &str) -> bool {
    ethtool_k
        .lines()
        .any(|l| l.trim_start().starts_with(&format!("{name}: on")))
}

const SCRIPT: &str = r#"
set -x
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
ping -c 3 -W 2 10.88.0.1 > /mnt/guest-ping.txt 2>&1; echo $? > /mnt/ping.rc
step ping "$(cat /sys/class/net/eth0/address)"
step promisc-off x
ip link set eth0 promisc on
step promisc-on x
ip link set eth0 promisc off
ip maddr add 01:00:5e:01:02:03 dev eth0
step mcast x
ip link add link eth0 name eth0.100 type vlan id 100
ip link set eth0.100 up
step vlan x
ethtool -L eth0 combined 2 > /mnt/ethtool-L.txt 2>&1; echo $? > /mnt/ethtool-L.rc
step queues x
ethtool -K eth0 rx-gro-hw off > /mnt/ethtool-K.txt 2>&1 || ethtool -K eth0 lro off >> /mnt/ethtool-K.txt 2>&1; echo $? > /mnt/ethtool-K.rc
ethtool -k eth0 > /mnt/ethtool-k-after.txt
step offload x
"#;

#[test]
fn linux_virtio_net_driver_in_uml() {
    require_network!("linux_virtio_net_driver_in_uml");
    if let Some(why) = guest::unavailable(Kind::Uml) {
        sandnic::harness::skip("linux_virtio_net_driver_in_uml", &why);
        return;
    }
    let rig = GuestRig::boot(Kind::Uml, &["--queues", "2"], SCRIPT).unwrap();
    let GuestRig {
        mut guest,
        hostdir,
        sandnic,
        ns,
        dir: _dir,
    } = rig;
    // A fixed neighbour: no ARP traffic towards the guest to blur the
    // frame counts below.
    ns.add_static_neighbour("10.88.0.2", "52:54:00:12:34:56", "tap0")
        .unwrap();
    let fail = |what: &str| -> ! {
        panic!(
            "{what}\n--- guest ---\n{}\n--- sandnic ---\n{}",
            guest.console(),
            sandnic.log()
        )
    };
    let sock = ns.packet_socket("tap0").unwrap();
    let frame_to = |dst: Mac| {
        frames::udp_frame(
            dst,
            [0x02, 0, 0, 0, 0, 1],
            ([10, 88, 0, 1], [10, 88, 0, 2]),
            (7, 9),
            &[0x5a; 64],
        )
    };

    // Ping both ways.
    let mac = hostdir
        .wait_for("ping", STEP_TIMEOUT, &guest)
        .unwrap_or_else(|e| fail(&e.to_string()));
    assert_eq!(
        mac.trim(),
        "52:54:00:12:34:56",
        "the driver read the MAC from config space"
    );
    if hostdir.read("ping.rc").trim() != "0" {
        fail(&format!(
            "guest → host ping failed: {}",
            hostdir.read("guest-ping.txt")
        ));
    }
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-W", "2", "10.88.0.2"])
        .output()
        .unwrap();
    if !ping.status.success() {
        fail(&format!(
            "host → guest ping failed: {}",
            String::from_utf8_lossy(&ping.stdout)
        ));
    }
    hostdir.release("ping");

    // Promiscuous off: frames to a foreign MAC are filtered natively.
    hostdir
        .wait_for("promisc-off", STEP_TIMEOUT, &guest)
        .unwrap();
    let foreign = frame_to([0x02, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]);
    let (delivered, filtered) = deliver(&sandnic, &sock, &foreign, 10);
    assert_eq!(
        (delivered, filtered),
        (0, 10),
        "promisc off: foreign unicast must be filtered"
    );
    assert_eq!(
        deliver(&sandnic, &sock, &frame_to(GUEST_MAC), 10).0,
        10,
        "own MAC delivered"
    );
    hostdir.release("promisc-off");

    // Promiscuous on: the same frames arrive.
    hostdir
        .wait_for("promisc-on", STEP_TIMEOUT, &guest)
        .unwrap();
    assert_eq!(
        deliver(&sandnic, &sock, &foreign, 10),
        (10, 0),
        "promisc on: foreign unicast delivered"
    );
    hostdir.release("promisc-on");

    // Multicast group joined: that group arrives, others do not.
    hostdir.wait_for("mcast", STEP_TIMEOUT, &guest).unwrap();
    assert_eq!(
        deliver(
            &sandnic,
            &sock,
            &frame_to([0x01, 0x00, 0x5e, 0x01, 0x02, 0x03]),
            10
        ),
        (10, 0),
        "joined group"
    );
    assert_eq!(
        deliver(
            &sandnic,
            &sock,
            &frame_to([0x01, 0x00, 0x5e, 0x09, 0x09, 0x09]),
            10
        ),
        (0, 10),
        "other group"
    );
    assert_eq!(
        deliver(&sandnic, &sock, &foreign, 5),
        (0, 5),
        "promisc is off again"
    );
    hostdir.release("mcast");

    // VLAN subinterface: only the added id arrives.
    hostdir.wait_for("vlan", STEP_TIMEOUT, &guest).unwrap();
    let tagged = |vid| {
        let inner = frames::ipv4(
            [10, 88, 0, 1],
            [10, 88, 0, 2],
            17,
            &frames::udp(7, 9, &[1; 32]),
        );
        frames::ethernet_vlan(
            GUEST_MAC,
            [0x02, 0, 0, 0, 0, 1],
            vid,
            frames::ETH_IPV4,
            &inner,
        )
    };
    assert_eq!(
        deliver(&sandnic, &sock, &tagged(100), 10),
        (10, 0),
        "VLAN 100 added"
    );
    assert_eq!(
        deliver(&sandnic, &sock, &tagged(200), 10),
        (0, 10),
        "VLAN 200 not added"
    );
    hostdir.release("vlan");

    // Two queue pairs: traffic arrives on both.
    hostdir.wait_for("queues", STEP_TIMEOUT, &guest).unwrap();
    if hostdir.read("ethtool-L.rc").trim() != "0" {
        fail(&format!(
            "ethtool -L failed: {}",
            hostdir.read("ethtool-L.txt")
        ));
    }
    let status = sandnic.api(serde_json::json!({"cmd": "status"})).unwrap();
    assert_eq!(
        status["queue_pairs"]["active"], 2,
        "VQ_PAIRS_SET reached the device: {status}"
    );
    // Frames on flows that the kernel's hash puts on each queue (the
    // guest never sent on them, so no flow-table entry overrides it): every
    // pair must deliver its share.
    let per_pair = |stats: &serde_json::Value| -> Vec<u64> {
        stats["queues"]
            .as_array()
            .unwrap()
            .iter()
            .map(|q| q["rx_packets"].as_u64().unwrap())
            .collect()
    };
    let before = per_pair(&sandnic.stats().unwrap());
    let ports =
        sandnic::steering::ports_covering_every_queue([10, 88, 0, 1], [10, 88, 0, 2], 9, 2, 1000)
            .unwrap();
    for &port in &ports {
        let frame = frames::udp_frame(
            GUEST_MAC,
            [0x02, 0, 0, 0, 0, 1],
            ([10, 88, 0, 1], [10, 88, 0, 2]),
            (port, 9),
            &[2; 32],
        );
        inject(&sock, &frame, 10);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let gained = loop {
        let now = per_pair(&sandnic.stats().unwrap());
        let gained: Vec<u64> = now.iter().zip(&before).map(|(a, b)| a - b).collect();
        if gained.iter().all(|&n| n >= 10) || std::time::Instant::now() > deadline {
            break gained;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        gained.iter().all(|&n| n >= 10),
        "10 frames on each pair (host ports {ports:?}): {gained:?}"
    );
    // Guest offload change reaches the TAP: what the TAP had before the
    // guest may change it (it does right after this step).
    let before = host_ethtool_k(&ns);
    hostdir.release("queues");
    hostdir.wait_for("offload", STEP_TIMEOUT, &guest).unwrap();
    let after = host_ethtool_k(&ns);
    if hostdir.read("ethtool-K.rc").trim() != "0" {
        fail(&format!(
            "ethtool -K failed: {}",
            hostdir.read("ethtool-K.txt")
        ));
    }
    assert!(
        feature_on(&before, "tcp-segmentation-offload"),
        "TSO towards the guest was on:\n{before}"
    );
    assert!(
        !feature_on(&after, "tcp-segmentation-offload"),
        "TSO towards the guest now off:\n{after}"
    );
    assert!(
        feature_on(&after, "tx-checksumming"),
        "checksum offload kept:\n{after}"
    );
    hostdir.release("offload");

    assert_eq!(
        guest.wait(STEP_TIMEOUT).unwrap(),
        0,
        "guest script failed:\n{}",
        guest.console()
    );
    let stats = sandnic.stats().unwrap();
    assert_eq!(stats["control"]["ctrl_bad_chains"], 0);
    assert_eq!(stats["control"]["sandbox_failures"], 0);
    assert!(
        stats["control"]["ctrl_commands"].as_u64().unwrap() >= 5,
        "{stats}"
    );
}
