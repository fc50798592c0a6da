//! Two frontends on one sandnic, as in a local VM migration: the second
//! connects as a standby and may drive the device only once the first has
//! stopped its rings or left. Checked with the in-repo frontend, including
//! what QEMU never does (a standby that tries to drive a running device)
//! and disconnects at every point. Also: a handover is refused while a
//! migration is under way, and SEND_RARP.

use sandnic::frames;
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::Rig;
use sandnic::require_network;
use sandnic_host::vhost_user::wire::{self, Header, NEED_REPLY, VERSION};
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::time::{Duration, Instant};

fn config() -> NicConfig {
    NicConfig::default()
}

fn rig() -> Rig {
    Rig::new(&[], config()).expect("rig")
}

fn host_udp(rig: &Rig) -> UdpSocket {
    let sock = rig
        .ns
        .inside(|| Ok(UdpSocket::bind(("10.77.0.1", 6300))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock
}

/// Traffic both ways through `nic`: `frame` (from `Rig::guest_udp` with
/// `[tag; 40]`) to the host, then `[tag; 30]` back.
fn assert_works(nic: &mut TestNic, frame: &[u8], sock: &UdpSocket, tag: u8, log: &str) {
    nic.send(0, frame).unwrap();
    let mut buf = [0u8; 128];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("guest → host stopped ({e}): {log}"));
    assert_eq!(&buf[..n], &[tag; 40]);
    sock.send_to(&[tag; 30], "10.77.0.2:5000").unwrap();
    assert!(receive_udp(nic, &[tag; 30]), "host → guest stopped: {log}");
}

/// `assert_works` on the rig's own frontend.
fn assert_rig_works(rig: &mut Rig, sock: &UdpSocket, tag: u8) {
    let frame = rig.guest_udp(6300, &[tag; 40]);
    let log = rig.sandnic.log();
    assert_works(&mut rig.nic, &frame, sock, tag, &log);
}

fn receive_udp(nic: &mut TestNic, payload: &[u8]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while let Some(frame) = nic.recv(0, deadline.saturating_duration_since(Instant::now())) {
        if frames::udp_payload(&frame) == Some(payload) {
            return true;
        }
    }
    false
}

fn sessions(rig: &Rig) -> Vec<serde_json::Value> {
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    status["sessions"].as_array().cloned().unwrap_or_default()
}

fn wait_sessions(rig: &Rig, n: usize) -> Vec<serde_json::Value> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let s = sessions(rig);
        if s.len() == n {
            return s;
        }
        assert!(Instant::now() < deadline, "expected {n} sessions: {s:?}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_standby_cannot_drive_a_running_device() {
    require_network!("a_standby_cannot_drive_a_running_device");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    let s = wait_sessions(&rig, 2);
    assert_eq!(
        (s[0]["drives"].clone(), s[1]["drives"].clone()),
        (true.into(), false.into())
    );
    let refused = standby.start();
    assert!(
        refused.is_err(),
        "a standby started rings under a running device"
    );
    assert!(rig.control_stat("standby_refusals") >= 1);
    // The refused standby left; the first frontend never noticed.
    wait_sessions(&rig, 1);
    assert_rig_works(&mut rig, &sock, 1);
}

/// The first frontend stops its rings (as QEMU does when the VM stops at
/// the end of a migration); the standby then starts and drives the device
/// on the same TAP, and frames that reached the TAP in between are
/// delivered to it. The first frontend leaving afterwards changes nothing.
#[test]
fn the_standby_takes_over_once_the_first_stops_its_rings() {
    require_network!("the_standby_takes_over_once_the_first_stops_its_rings");
    let mut rig = rig();
    let sock = host_udp(&rig);
    assert_rig_works(&mut rig, &sock, 1);
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    rig.nic.stop_rings().unwrap();
    let s = wait_sessions(&rig, 2);
    assert!(s.iter().all(|s| s["drives"] == false), "{s:?}");
    // Frames for the guest while nobody drives: they wait in the TAP.
    for i in 0..5u8 {
        sock.send_to(&[100 + i; 30], "10.77.0.2:5000").unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut second = standby.start().unwrap();
    for i in 0..5u8 {
        assert!(
            receive_udp(&mut second, &[100 + i; 30]),
            "frame {i} sent between the two frontends was lost: {}",
            rig.sandnic.log()
        );
    }
    let frame = rig.guest_udp(6300, &[2; 40]);
    assert_works(&mut second, &frame, &sock, 2, &rig.sandnic.log());
    let Rig { nic: first, .. } = &mut rig;
    drop(std::mem::replace(first, second));
    // `rig.nic` is the second frontend now; the first one has left.
    wait_sessions(&rig, 1);
    assert_rig_works(&mut rig, &sock, 3);
    assert_eq!(rig.control_stat("standby_refusals"), 0);
}

/// Two queue pairs under a frontend that keeps the control queue (QEMU):
/// frames that wait in the TAP's second queue while nobody drives reach
/// the standby once it drives, although it sets its rings up one by one
/// and runs its first ring before it enables the second pair. Detaching
/// that TAP queue meanwhile, as sandnic once did, drops every frame in it.
#[test]
fn frames_waiting_on_every_pair_reach_the_next_driver() {
    require_network!("frames_waiting_on_every_pair_reach_the_next_driver");
    let two_pairs = NicConfig {
        pairs: 2,
        ctrl_in_frontend: true,
        ..config()
    };
    let mut rig = Rig::new(&["--queues", "2"], two_pairs.clone()).expect("rig");
    let sock = host_udp(&rig);
    sandnic::steering::send_on_pair(&sock, 1).unwrap();
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &two_pairs).unwrap();
    rig.nic.stop_rings().unwrap();
    wait_sessions(&rig, 2);
    for i in 0..5u8 {
        sock.send_to(&[110 + i; 30], "10.77.0.2:5000").unwrap();
    }
    std::thread::sleep(Duration::from_millis(50));
    let mut second = standby.start().unwrap();
    for i in 0..5u8 {
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = false;
        while !got && Instant::now() < deadline {
            got = second
                .recv(1, Duration::from_millis(50))
                .is_some_and(|f| frames::udp_payload(&f) == Some(&[110 + i; 30][..]));
        }
        assert!(
            got,
            "frame {i} that waited on pair 1 was lost: {}",
            rig.sandnic.log()
        );
    }
}

/// With a standby connected (a migration's destination waiting), the API's
/// `swap` and `link` act on the session that drives the device: its pairs
/// stay active, its frontend gets the config change, its traffic flows.
/// (Once, the backend worked on whichever session sent the last request,
/// and a swap then took the standby's pairs: none enabled, one kept.)
#[test]
fn api_commands_act_on_the_driving_session_with_a_standby_connected() {
    require_network!("api_commands_act_on_the_driving_session_with_a_standby_connected");
    let two_pairs = NicConfig {
        pairs: 2,
        ctrl_in_frontend: true,
        ..config()
    };
    let mut rig = Rig::new(&["--queues", "2"], two_pairs.clone()).expect("rig");
    let sock = host_udp(&rig);
    let _standby = TestNic::connect_standby(&rig.sandnic.socket, &two_pairs).unwrap();
    wait_sessions(&rig, 2);
    let active = |rig: &Rig| {
        let status = rig
            .sandnic
            .api(serde_json::json!({"cmd": "status"}))
            .unwrap();
        status["queue_pairs"]["active"].clone()
    };
    assert_eq!(active(&rig), 2);
    let swapped = rig
        .sandnic
        .api(serde_json::json!({"cmd": "swap", "component": "builtin:0.2.0"}))
        .unwrap();
    assert_eq!(swapped["ok"], true, "{swapped}");
    assert_eq!(active(&rig), 2, "the driving session's pairs after a swap");
    let down = rig
        .sandnic
        .api(serde_json::json!({"cmd": "link", "up": false}))
        .unwrap();
    assert_eq!(down["ok"], true, "{down}");
    assert!(
        rig.nic.wait_config_change(Duration::from_secs(5)),
        "the driving frontend hears of the link change"
    );
    rig.sandnic
        .api(serde_json::json!({"cmd": "link", "up": true}))
        .unwrap();
    assert!(rig.nic.wait_config_change(Duration::from_secs(5)));
    // Both pairs carry the driving frontend's traffic.
    for pair in 0..2 {
        sandnic::steering::send_on_pair(&sock, pair).unwrap();
        let tag = 20 + pair as u8;
        sock.send_to(&[tag; 30], "10.77.0.2:5000").unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        let mut got = false;
        while !got && Instant::now() < deadline {
            got = rig
                .nic
                .recv(pair, Duration::from_millis(50))
                .is_some_and(|f| frames::udp_payload(&f) == Some(&[tag; 30][..]));
        }
        assert!(got, "pair {pair}: {}", rig.sandnic.log());
    }
}

/// The driving frontend leaves without stopping its rings while a standby
/// is connected: the standby can then start and drive the device.
#[test]
fn the_standby_takes_over_when_the_first_leaves_running() {
    require_network!("the_standby_takes_over_when_the_first_leaves_running");
    let rig = rig();
    let sock = host_udp(&rig);
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    wait_sessions(&rig, 2);
    let Rig {
        nic,
        sandnic,
        ns,
        tap_mac,
        dir,
        frontend_listener,
    } = rig;
    drop(nic);
    // Start only once sandnic has seen the first frontend go: before that
    // it still drives the device, and the standby would rightly be refused.
    let deadline = Instant::now() + Duration::from_secs(5);
    while sandnic.api(serde_json::json!({"cmd": "status"})).unwrap()["sessions"]
        .as_array()
        .map_or(0, Vec::len)
        != 1
    {
        assert!(
            Instant::now() < deadline,
            "the first frontend's exit not seen"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rig = Rig {
        nic: standby.start().unwrap(),
        sandnic,
        ns,
        tap_mac,
        dir,
        frontend_listener,
    };
    let s = wait_sessions(&rig, 1);
    assert_eq!(s[0]["drives"], true, "{s:?}");
    assert_rig_works(&mut rig, &sock, 4);
}

/// A standby that leaves (QEMU's destination giving up) takes nothing
/// with it.
#[test]
fn a_standby_that_leaves_changes_nothing() {
    require_network!("a_standby_that_leaves_changes_nothing");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    wait_sessions(&rig, 2);
    drop(standby);
    wait_sessions(&rig, 1);
    assert_rig_works(&mut rig, &sock, 5);
    // A third frontend is turned away while two are connected.
    let _standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    wait_sessions(&rig, 2);
    assert!(TestNic::connect_standby(&rig.sandnic.socket, &config()).is_err());
    assert_eq!(sessions(&rig).len(), 2);
    assert_rig_works(&mut rig, &sock, 6);
}

/// A handover would leave a migration's state behind (the standby's
/// connection, the dirty log): it is refused, and the device runs on.
#[test]
fn handover_is_refused_while_a_migration_is_under_way() {
    require_network!("handover_is_refused_while_a_migration_is_under_way");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let target = rig.dir.path("nobody.sock");
    let standby = TestNic::connect_standby(&rig.sandnic.socket, &config()).unwrap();
    wait_sessions(&rig, 2);
    let reply = rig.sandnic.handover(&target, false).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "migration_under_way", "{reply}");
    drop(standby);
    wait_sessions(&rig, 1);
    let log = std::fs::File::from(
        nix::sys::memfd::memfd_create(c"log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap(),
    );
    log.set_len(1 << 20).unwrap();
    rig.nic.start_dirty_log(&log, 1 << 20, 0).unwrap();
    let reply = rig.sandnic.handover(&target, false).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "migration_under_way", "{reply}");
    assert_rig_works(&mut rig, &sock, 7);
    rig.nic.stop_dirty_log().unwrap();
}

fn raw_request(fd: BorrowedFd<'_>, request: u32, payload: &[u8]) -> Vec<u8> {
    let header = Header {
        request,
        flags: VERSION | NEED_REPLY,
        size: payload.len() as u32,
    };
    wire::send(fd, header, payload, &[]).unwrap();
    wire::recv(fd).unwrap().payload
}

/// SEND_RARP puts a RARP frame announcing the MAC on the TAP; a multicast
/// MAC is refused and counted.
#[test]
fn send_rarp_announces_the_mac_on_the_tap() {
    require_network!("send_rarp_announces_the_mac_on_the_tap");
    let rig = rig();
    let tap = rig.ns.packet_socket("tap0").unwrap();
    // SAFETY: the frontend's socket stays open for the whole test; these
    // requests are sent between the frontend's own, never concurrently.
    let fd = unsafe { BorrowedFd::borrow_raw(rig.nic.socket_fd()) };
    const SEND_RARP: u32 = 19;
    let mac = [0x52, 0x54, 0x00, 0xab, 0xcd, 0xef, 0, 0];
    assert_eq!(raw_request(fd, SEND_RARP, &mac), 0u64.to_ne_bytes());
    let multicast = [0x01, 0x00, 0x5e, 0, 0, 1, 0, 0];
    assert_eq!(raw_request(fd, SEND_RARP, &multicast), 1u64.to_ne_bytes());
    assert_eq!(rig.control_stat("rarps_sent"), 1);
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut buf = [0u8; 2048];
    loop {
        assert!(Instant::now() < deadline, "no RARP frame on the TAP");
        let n = nix::sys::socket::recv(
            tap.as_raw_fd(),
            &mut buf,
            nix::sys::socket::MsgFlags::MSG_DONTWAIT,
        )
        .unwrap_or(0);
        let f = &buf[..n];
        if n >= 42 && f[12..14] == [0x80, 0x35] {
            assert_eq!(&f[..6], &[0xff; 6], "broadcast");
            assert_eq!(&f[6..12], &mac[..6], "from the guest's MAC");
            assert_eq!(&f[22..28], &mac[..6], "announcing it");
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}
