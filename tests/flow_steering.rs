//! Tests never depend on which TAP queue the kernel's flow hash picks.
//!
//! The hash is seeded at random on every boot, so a test that waits for a
//! host frame on a given pair used to pass on some machines and fail on
//! others. The rig's TAP now steers host frames by the sending socket's
//! priority (`sandnic::steering`); the tests that need a host frame on a
//! given pair run once per host port of a sweep that the hash spreads over
//! every queue. These tests show both halves of that argument hold here:
//! the sweep's ports really land on different queues when nothing steers
//! them, and the rig's steering overrides the hash for every one of them.

use sandnic::frames;
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{rig_sweep_ports, Rig, RIG_GUEST_IP, RIG_GUEST_PORT, RIG_HOST_IP};
use sandnic::require_network;
use sandnic::steering::{natural_queues, send_on_pair};
use std::net::UdpSocket;
use std::time::{Duration, Instant};

const PAIRS: u16 = 2;

fn two_pairs() -> NicConfig {
    NicConfig {
        pairs: PAIRS,
        ..NicConfig::default()
    }
}

fn host_udp(rig: &Rig, port: u16) -> UdpSocket {
    rig.ns
        .inside(move || Ok(UdpSocket::bind(("10.77.0.1", port))?))
        .unwrap()
}

/// The pair a UDP frame with `payload` arrives on.
fn arrival_pair(nic: &mut TestNic, payload: &[u8]) -> Option<usize> {
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        for pair in 0..usize::from(PAIRS) {
            while let Some(frame) = nic.try_recv(pair) {
                if frames::udp_payload(&frame) == Some(payload) {
                    return Some(pair);
                }
            }
        }
        std::thread::sleep(Duration::from_micros(200));
    }
    None
}

/// Without a steering program, host flows land where the probe said: the
/// hash, not the test, decides, and the sweep's ports cover every queue.
#[test]
fn without_steering_the_hash_picks_the_queue_the_probe_predicts() {
    require_network!("without_steering_the_hash_picks_the_queue_the_probe_predicts");
    let ports: Vec<u16> = (6300..6316).collect();
    let predicted = natural_queues(
        RIG_HOST_IP,
        RIG_GUEST_IP,
        RIG_GUEST_PORT,
        usize::from(PAIRS),
        &ports,
    )
    .unwrap();
    assert!(
        (0..usize::from(PAIRS)).all(|q| predicted.contains(&q)),
        "16 ports should hash to both queues: {predicted:?}"
    );
    let mut rig = Rig::unsteered(&["--queues", "2"], two_pairs()).unwrap();
    for (&port, &queue) in ports.iter().zip(&predicted) {
        let sock = host_udp(&rig, port);
        let payload = format!("unsteered from {port}");
        sock.send_to(payload.as_bytes(), "10.77.0.2:5000").unwrap();
        let on = arrival_pair(&mut rig.nic, payload.as_bytes())
            .unwrap_or_else(|| panic!("{payload}: lost\n{}", rig.sandnic.log()));
        assert_eq!(on, queue, "{payload}: the probe predicted queue {queue}");
    }
}

/// With the rig's steering, every port of the sweep lands on the pair its
/// socket names, and on pair 0 when it names none.
#[test]
fn the_rig_steers_every_host_flow_to_the_pair_its_socket_names() {
    require_network!("the_rig_steers_every_host_flow_to_the_pair_its_socket_names");
    let mut rig = Rig::new(&["--queues", "2"], two_pairs()).unwrap();
    for port in rig_sweep_ports(usize::from(PAIRS), 6400) {
        let sock = host_udp(&rig, port);
        let payload = format!("default priority from {port}");
        sock.send_to(payload.as_bytes(), "10.77.0.2:5000").unwrap();
        assert_eq!(arrival_pair(&mut rig.nic, payload.as_bytes()), Some(0));
        for pair in 0..usize::from(PAIRS) {
            send_on_pair(&sock, pair).unwrap();
            let payload = format!("to pair {pair} from {port}");
            sock.send_to(payload.as_bytes(), "10.77.0.2:5000").unwrap();
            assert_eq!(
                arrival_pair(&mut rig.nic, payload.as_bytes()),
                Some(pair),
                "{payload}"
            );
        }
    }
}
