//! The vhost-user backend and its TAP datapath, driven by the in-repo test
//! frontend: real `sandnic serve` processes, real TAP devices in private
//! network namespaces, real kernel sockets and `ping` on the host side.

use sandnic::frames::{self, Mac};
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, Sandnic, ScratchDir};
use sandnic::require_network;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const GUEST_IP: [u8; 4] = [10, 77, 0, 2];
const HOST_IP: [u8; 4] = [10, 77, 0, 1];

/// A namespace with `tap0` (10.77.0.1/24), `sandnic serve` on it, and the
/// test frontend connected.
struct Rig {
    nic: TestNic,
    sandnic: Sandnic,
    ns: NetNs,
    tap_mac: Mac,
    _dir: ScratchDir,
}

fn rig(serve_args: &[&str], config: NicConfig) -> Rig {
    let ns = NetNs::new().expect("netns");
    ns.add_tap("tap0", "10.77.0.1/24").expect("tap");
    ns.ip(&["neigh", "add", "10.77.0.2", "lladdr", "52:54:00:12:34:56", "dev", "tap0"]).expect("neighbour");
    let dir = ScratchDir::new().unwrap();
    let mut args = vec!["--tap", "tap0"];
    args.extend_from_slice(serve_args);
    let sandnic = Sandnic::serve(&ns, &dir, &args).expect("sandnic serve");
    let nic = TestNic::connect(&sandnic.socket, &config).unwrap_or_else(|e| panic!("{e:#}\n{}", sandnic.log()));
    let tap_mac = tap_mac(&ns);
    Rig { nic, sandnic, ns, tap_mac, _dir: dir }
}

fn tap_mac(ns: &NetNs) -> Mac {
    let out = ns.ip(&["-o", "link", "show", "tap0"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let mac = text.split("link/ether ").nth(1).and_then(|s| s.split_whitespace().next()).expect("tap mac");
    let bytes: Vec<u8> = mac.split(':').map(|b| u8::from_str_radix(b, 16).unwrap()).collect();
    bytes.try_into().unwrap()
}

fn host_udp(ns: &NetNs, port: u16) -> UdpSocket {
    let sock = ns.inside(move || Ok(UdpSocket::bind(("10.77.0.1", port))?)).unwrap();
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

fn stat(sandnic: &Sandnic, pair: usize, field: &str) -> u64 {
    sandnic.stats().unwrap()["queues"][pair][field].as_u64().unwrap()
}

#[test]
fn udp_flows_both_ways_through_the_tap() {
    require_network!("udp_flows_both_ways_through_the_tap");
    let mut rig = rig(&[], NicConfig::default());
    let sock = host_udp(&rig.ns, 6000);

    // Guest → host.
    for i in 0..20u8 {
        let frame = frames::udp_frame(rig.tap_mac, GUEST_MAC, (GUEST_IP, HOST_IP), (5000, 6000), &[i; 100]);
        rig.nic.send(0, &frame).unwrap();
    }
    let mut buf = [0u8; 2048];
    for i in 0..20u8 {
        let (n, from) = sock.recv_from(&mut buf).unwrap_or_else(|e| panic!("datagram {i}: {e}\n{}", rig.sandnic.log()));
        assert_eq!(&buf[..n], &[i; 100][..]);
        assert_eq!(from.to_string(), "10.77.0.2:5000");
    }

    // Host → guest.
    for i in 0..20u8 {
        sock.send_to(&[i; 300], "10.77.0.2:5000").unwrap();
    }
    for i in 0..20u8 {
        let payload = recv_udp(&mut rig.nic, Duration::from_secs(5)).unwrap_or_else(|| panic!("frame {i} not received"));
        assert_eq!(payload, [i; 300]);
    }
    assert_eq!(stat(&rig.sandnic, 0, "tx_packets"), 20);
    assert!(stat(&rig.sandnic, 0, "rx_packets") >= 20);
}

#[test]
fn kernel_ping_reaches_the_test_guest() {
    require_network!("kernel_ping_reaches_the_test_guest");
    let rig = rig(&[], NicConfig::default());
    let Rig { mut nic, ns, sandnic, .. } = rig;
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
    let out = ns.command("ping").args(["-c", "5", "-i", "0.1", "-W", "2", "10.77.0.2"]).output().expect("ping");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    responder.join().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "ping failed:\n{text}\n{}", sandnic.log());
    assert!(text.contains("5 received"), "{text}");
}

#[test]
fn frames_wait_in_the_tap_until_the_guest_gives_buffers() {
    require_network!("frames_wait_in_the_tap_until_the_guest_gives_buffers");
    // A small RX ring: more frames than buffers must not be lost, only
    // delayed until the guest gives the buffers back.
    let config = NicConfig { queue_size: 16, ..NicConfig::default() };
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
    assert_eq!(stat(&rig.sandnic, 0, "rx_drops"), 0);
}
