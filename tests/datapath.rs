//! The vhost-user backend and its TAP datapath, driven by the in-repo test
//! frontend: real `sandnic serve` processes, real TAP devices in private
//! network namespaces, real kernel sockets and `ping` on the host side.

use sandnic::frames::{self, Mac};
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, Rig};
use sandnic::require_network;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const GUEST_MAC: Mac = sandnic::harness::RIG_GUEST_MAC;
const GUEST_IP: [u8; 4] = sandnic::harness::RIG_GUEST_IP;
const HOST_IP: [u8; 4] = sandnic::harness::RIG_HOST_IP;

fn rig(serve_args: &[&str], config: NicConfig) -> Rig {
    Rig::new(serve_args, config).expect("test rig")
}

/// `pairs` queue pairs under a frontend that keeps the control queue (as
/// QEMU's and DPDK's do) and switches pairs with SET_VRING_ENABLE.
fn ctrl_in_frontend(pairs: u16) -> NicConfig {
    NicConfig {
        pairs,
        ctrl_in_frontend: true,
        ..NicConfig::default()
    }
}

fn host_udp(ns: &NetNs, port: u16) -> UdpSocket {
    let sock = ns
        .inside(move || Ok(UdpSocket::bind(("10.77.0.1", port))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock
}

/// The next UDP payload the guest receives, skipping the IPv6 and ARP
/// chatter a fresh interface produces.
fn recv_udp(nic: &mut TestNic, timeout: Duration) -> Option<Vec<u8>> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(frame) = nic.recv(0, Duration::from_millis(50)) {
            if let Some(payload) = frames::udp_payload(&frame) {
                assert_eq!(frame[..6], GUEST_MAC);
                return Some(payload.to_vec());
            }
        }
    }
    None
}

#[test]
fn udp_flows_both_ways_through_the_tap() {
    require_network!("udp_flows_both_ways_through_the_tap");
    let mut rig = rig(&[], NicConfig::default());
    let sock = host_udp(&rig.ns, 6000);

    // Guest → host.
    for i in 0..20u8 {
        let frame = frames::udp_frame(
            rig.tap_mac,
            GUEST_MAC,
            (GUEST_IP, HOST_IP),
            (5000, 6000),
            &[i; 100],
        );
        rig.nic.send(0, &frame).unwrap();
    }
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let (n, from) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {i}: {e}\n{}", rig.sandnic.log()));
        assert_eq!(&buf[..n], &[i; 100][..]);
        assert_eq!(from.to_string(), "10.77.0.2:5000");
    }

    // Host → guest.
    for i in 0..20u8 {
        sock.send_to(&[i; 300], "10.77.0.2:5000").unwrap();
    }
    for i in 0..20u8 {
        let payload = recv_udp(&mut rig.nic, Duration::from_secs(5))
            .unwrap_or_else(|| panic!("frame {i} not received"));
        assert_eq!(payload, [i; 300]);
    }
    assert_eq!(rig.stat(0, "tx_packets"), 20);
    assert!(rig.stat(0, "rx_packets") >= 20);
}

#[test]
fn kernel_ping_reaches_the_test_guest() {
    require_network!("kernel_ping_reaches_the_test_guest");
    let rig = rig(&[], NicConfig::default());
    let Rig {
        mut nic,
        ns,
        sandnic,
        ..
    } = rig;
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let responder = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                match nic.try_recv(0) {
                    Some(frame) => {
                        if let Some(reply) = frames::respond(&frame, GUEST_MAC, GUEST_IP) {
                            nic.send(0, &reply).unwrap();
                        }
                    }
                    None => std::thread::sleep(Duration::from_micros(200)),
                }
            }
        })
    };
    let out = ns
        .command("ping")
        .args(["-c", "5", "-i", "0.1", "-W", "2", "10.77.0.2"])
        .output()
        .expect("ping");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "ping failed:\n{text}\n{}",
        sandnic.log()
    );
    assert!(text.contains("5 received"), "{text}");
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_gives_buffers() {
    require_network!("frames_wait_in_the_tap_until_the_guest_gives_buffers");
    // A small RX ring: more frames than buffers must not be lost, only
    // delayed until the guest gives the buffers back.
    let config = NicConfig {
        queue_size: 16,
        ..NicConfig::default()
    };
    let mut rig = rig(&[], config);
    let sock = host_udp(&rig.ns, 6001);
    for i in 0..48u8 {
        sock.send_to(&[i; 64], "10.77.0.2:5000").unwrap();
    }
    let started = Instant::now();
    let mut got = Vec::new();
    while got.len() < 48 && started.elapsed() < Duration::from_secs(10) {
        if let Some(payload) = recv_udp(&mut rig.nic, Duration::from_millis(200)) {
            got.push(payload[0]);
        }
    }
    assert_eq!(got, (0..48u8).collect::<Vec<_>>(), "every frame, in order");
    assert_eq!(rig.stat(0, "rx_drops"), 0);
}

/// A frontend that keeps the control queue itself (QEMU, Cloud Hypervisor,
/// DPDK's virtio_user) acks no CTRL_VQ — virtio_user still acks CTRL_RX,
/// CTRL_VLAN and CTRL_MAC_ADDR, which the device once refused, leaving it no
/// features at all — and switches queue pairs with SET_VRING_ENABLE alone.
/// Every pair it enabled must carry traffic, and a pair it disables must
/// stop taking frames from the TAP.
#[test]
fn pairs_follow_a_frontend_that_keeps_the_control_queue() {
    require_network!("pairs_follow_a_frontend_that_keeps_the_control_queue");
    let config = ctrl_in_frontend(2);
    let mut rig = rig(&["--queues", "2"], config);
    let active = |rig: &Rig| {
        let status = rig
            .sandnic
            .api(serde_json::json!({"cmd": "status"}))
            .unwrap();
        assert!(status["features_acked"].is_array(), "{status}");
        status["queue_pairs"]["active"].as_u64().unwrap()
    };
    assert_eq!(active(&rig), 2);
    let sock = host_udp(&rig.ns, 6004);
    let frame = frames::udp_frame(
        rig.tap_mac,
        GUEST_MAC,
        (GUEST_IP, HOST_IP),
        (5000, 6004),
        b"on pair 1",
    );
    rig.nic.send(1, &frame).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("pair 1 → host: {e}\n{}", rig.sandnic.log()));
    assert_eq!(&buf[..n], b"on pair 1");
    // The guest goes back to one pair: the frontend disables pair 1.
    rig.nic.enable_pair(1, false).unwrap();
    assert_eq!(active(&rig), 1);
}

/// Three pairs on two datapath threads (`--datapath-threads 2`): one thread
/// serves pairs 0 and 2, the other pair 1. Every pair carries frames to the
/// host, and every reply the host steers to a pair reaches the guest on that
/// pair (a thread that did not watch the TAP of its second pair would leave
/// the reply there). With busy polling off the threads sleep between
/// frames, so each reply must wake its thread through the TAP it sits on.
/// The host ports are ones the kernel's hash spreads over all three queues:
/// the rig's steering, not the hash, puts each reply on its pair.
#[test]
fn pairs_share_datapath_threads() {
    require_network!("pairs_share_datapath_threads");
    let config = ctrl_in_frontend(3);
    let args = [
        "--queues",
        "3",
        "--datapath-threads",
        "2",
        "--busy-poll-us",
        "0",
    ];
    let mut rig = rig(&args, config);
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    assert_eq!(status["datapath_threads"], 2, "{status}");
    assert_eq!(status["queue_pairs"]["active"], 3, "{status}");
    let ports = sandnic::harness::rig_sweep_ports(3, 6100);
    for pair in 0..3u16 {
        for &host_port in &ports {
            let sock = host_udp(&rig.ns, host_port);
            sandnic::steering::send_on_pair(&sock, usize::from(pair)).unwrap();
            let payload = format!("from pair {pair} to port {host_port}");
            let frame = rig.guest_udp(host_port, payload.as_bytes());
            rig.nic.send(usize::from(pair), &frame).unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("pair {pair} → host: {e}\n{}", rig.sandnic.log()));
            assert_eq!(&buf[..n], payload.as_bytes());
            let reply = format!("reply to pair {pair} from port {host_port}");
            sock.send_to(reply.as_bytes(), "10.77.0.2:5000").unwrap();
            let (on, got) = recv_udp_on_any_pair(&mut rig.nic, 3, Duration::from_secs(5))
                .unwrap_or_else(|| panic!("{reply} lost\n{}", rig.sandnic.log()));
            assert_eq!(got, reply.as_bytes());
            assert_eq!(on, usize::from(pair), "{reply} arrived on pair {on}");
        }
        assert_eq!(
            rig.stat(usize::from(pair), "tx_packets"),
            ports.len() as u64
        );
    }
}

/// The next UDP payload the guest receives on any of `pairs`, and the pair.
fn recv_udp_on_any_pair(
    nic: &mut TestNic,
    pairs: usize,
    timeout: Duration,
) -> Option<(usize, Vec<u8>)> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        for pair in 0..pairs {
            if let Some(payload) = nic
                .try_recv(pair)
                .and_then(|f| frames::udp_payload(&f).map(<[u8]>::to_vec))
            {
                return Some((pair, payload));
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// One thread for two pairs with a long busy-poll window: pair 0 carries a
/// steady stream, so the thread never sleeps, while pair 1 exchanges single
/// frames with the host, each after pair 1 went idle (past its own window).
/// The idle pair must get its pass when its kick fires (TX) and when its
/// TAP does (RX: the host steers the reply to pair 1). The host ports are
/// ones the kernel's hash puts on either queue.
#[test]
fn an_idle_pair_is_served_beside_a_busy_one() {
    require_network!("an_idle_pair_is_served_beside_a_busy_one");
    let config = ctrl_in_frontend(2);
    let busy_poll = Duration::from_millis(10);
    let args = [
        "--queues",
        "2",
        "--datapath-threads",
        "1",
        "--busy-poll-us",
        "10000",
    ];
    let mut rig = rig(&args, config);
    let _sink = host_udp(&rig.ns, 6200);
    let ports = sandnic::harness::rig_sweep_ports(2, 6201);
    let flood = frames::udp_frame(
        rig.tap_mac,
        GUEST_MAC,
        (GUEST_IP, HOST_IP),
        (5200, 6200),
        &[0x5a; 200],
    );
    let deadline = Duration::from_secs(5);
    let rounds = 5;
    for &port in &ports {
        let sock = host_udp(&rig.ns, port);
        sock.set_nonblocking(true).unwrap();
        sandnic::steering::send_on_pair(&sock, 1).unwrap();
        for i in 0..rounds {
            let payload = format!("pair 1, frame {i} to port {port}");
            let frame = rig.guest_udp(port, payload.as_bytes());
            keep_busy_until(&mut rig.nic, &flood, 3 * busy_poll, |_| None::<()>);
            rig.nic.send(1, &frame).unwrap();
            let mut buf = [0u8; 64];
            let n = keep_busy_until(&mut rig.nic, &flood, deadline, |_| {
                sock.recv_from(&mut buf).ok().map(|(n, _)| n)
            })
            .unwrap_or_else(|| panic!("{payload}: lost\n{}", rig.sandnic.log()));
            assert_eq!(&buf[..n], payload.as_bytes());
            keep_busy_until(&mut rig.nic, &flood, 3 * busy_poll, |_| None::<()>);
            let reply = format!("reply {i} from port {port}");
            sock.send_to(reply.as_bytes(), "10.77.0.2:5000").unwrap();
            let got = keep_busy_until(&mut rig.nic, &flood, deadline, |nic| {
                let frame = nic.try_recv(1)?;
                frames::udp_payload(&frame).map(<[u8]>::to_vec)
            })
            .unwrap_or_else(|| panic!("{reply} to pair 1 lost\n{}", rig.sandnic.log()));
            assert_eq!(got, reply.as_bytes());
        }
    }
    assert_eq!(rig.stat(1, "tx_packets"), (rounds * ports.len()) as u64);
    assert!(rig.stat(0, "tx_packets") > 1000, "pair 0 was not kept busy");
}

/// Keeps pair 0's TX ring full of `flood` (no pause, so its thread keeps
/// polling) until `done` gives a value or `timeout` passes.
fn keep_busy_until<T>(
    nic: &mut TestNic,
    flood: &[u8],
    timeout: Duration,
    mut done: impl FnMut(&mut TestNic) -> Option<T>,
) -> Option<T> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        nic.send_batch(0, std::iter::repeat_n(flood, 32));
        if let Some(value) = done(nic) {
            return Some(value);
        }
    }
    None
}

/// The call eventfd, as the driver sees it (EVENT_IDX negotiated): an
/// interrupt comes when the used index passes `used_event`, none while
/// `used_event` is ahead; and a ring that starts again (the VM runs again
/// after `stop`, or on a migration's destination) signals the driver once
/// whatever `used_event` says. Without that, an interrupt lost in the
/// switch (taken by the old call fd) left the driver waiting for ever with
/// a `used_event` behind every later index: the RX ring filled and the
/// guest never answered again, as in QEMU local migrations.
#[test]
fn notifications_follow_event_idx_and_a_restarted_ring_signals_once() {
    require_network!("notifications_follow_event_idx_and_a_restarted_ring_signals_once");
    let mut rig = rig(&["--busy-poll-us", "0"], NicConfig::default());
    let rx = sandnic::frontend::QueueId::Rx(0);
    let sock = host_udp(&rig.ns, 6400);
    let delivered = |rig: &Rig, n: u64| {
        let deadline = Instant::now() + Duration::from_secs(5);
        while rig.stat(0, "rx_packets") < n {
            assert!(Instant::now() < deadline, "frame {n} not delivered");
            std::thread::sleep(Duration::from_millis(2));
        }
        // The notification follows the publish.
        std::thread::sleep(Duration::from_millis(50));
    };
    let _ = rig.nic.notified(rx);
    // used_event at the driver's last used index: the next entry signals.
    sock.send_to(b"one", "10.77.0.2:5000").unwrap();
    delivered(&rig, 1);
    assert!(rig.nic.notified(rx), "the first entry passed used_event");
    // The driver takes nothing off the ring, so used_event stays behind:
    // further entries do not signal.
    sock.send_to(b"two", "10.77.0.2:5000").unwrap();
    delivered(&rig, 2);
    assert!(!rig.nic.notified(rx), "used_event was passed already");
    // The rings stop and start again on new call fds, used_event still
    // behind: the driver is signalled all the same.
    let bases = rig.nic.stop_rings().unwrap();
    rig.nic.restart_rings(&bases).unwrap();
    sock.send_to(b"three", "10.77.0.2:5000").unwrap();
    delivered(&rig, 3);
    assert!(
        rig.nic.notified(rx),
        "a restarted ring did not signal the driver"
    );
    // The driver catches up (used_event follows), then polls: used_event
    // far ahead, no signal.
    for _ in 0..3 {
        assert!(recv_udp(&mut rig.nic, Duration::from_secs(2)).is_some());
    }
    let _ = rig.nic.notified(rx);
    rig.nic.queue(rx).vq.quiet();
    sock.send_to(b"four", "10.77.0.2:5000").unwrap();
    delivered(&rig, 4);
    assert!(!rig.nic.notified(rx), "used_event far ahead: no interrupt");
}

/// One UDP datagram each way between the rig's guest and `sock`, with
/// `tag` in it.
fn one_each_way(rig: &mut Rig, sock: &UdpSocket, tag: u8) {
    let frame = frames::udp_frame(
        rig.tap_mac,
        GUEST_MAC,
        (GUEST_IP, HOST_IP),
        (5000, 6000),
        &[tag; 64],
    );
    rig.nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 2048];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("guest → host {tag}: {e}\n{}", rig.sandnic.log()));
    assert_eq!(&buf[..n], &[tag; 64][..]);
    sock.send_to(&[tag; 80], "10.77.0.2:5000").unwrap();
    let payload = recv_udp(&mut rig.nic, Duration::from_secs(5))
        .unwrap_or_else(|| panic!("host → guest {tag}\n{}", rig.sandnic.log()));
    assert_eq!(payload, [tag; 80]);
}

/// Client mode (`serve --connect`): sandnic dials a frontend that listens,
/// and keeps dialling while there is none (the rig starts listening only
/// after sandnic started). When the frontend goes away and a new one
/// listens on the same path, as a restarted QEMU with `server=on` does,
/// sandnic dials it and serves it like the first.
#[test]
fn client_mode_dials_the_frontend_and_again_when_it_comes_back() {
    require_network!("client_mode_dials_the_frontend_and_again_when_it_comes_back");
    let mut rig = Rig::client_mode(NicConfig::default()).expect("rig");
    let sock = host_udp(&rig.ns, 6000);
    one_each_way(&mut rig, &sock, 1);
    assert!(
        rig.sandnic.log().contains("no frontend listening"),
        "the first dials failed: {}",
        rig.sandnic.log()
    );
    // The frontend exits; a new one binds the path anew a little later.
    // (Its listening socket first, as a VMM's exit leaves no listener
    // behind to take a dial.)
    let path = rig.dir.path("frontend.sock");
    drop(rig.frontend_listener.take());
    std::fs::remove_file(&path).unwrap();
    rig.nic.hang_up();
    std::thread::sleep(Duration::from_millis(200));
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    rig.nic = TestNic::accept(&listener, &NicConfig::default(), Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.sandnic.log()));
    one_each_way(&mut rig, &sock, 2);
    assert_eq!(rig.control_stat("frontends_accepted"), 2);
    assert_eq!(rig.control_stat("disconnects"), 1);
}
