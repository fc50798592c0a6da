//! A sandnic that dies (`kill -9`) is restarted by its service manager and
//! picks the device up from the fd store: the frontend's connection never
//! closes, and traffic goes on. The manager is the harness's stand-in for
//! systemd (`sandnic::service_manager`), which does what systemd documents
//! for the fd store.

use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, ScratchDir, RIG_GUEST_MAC};
use sandnic::require_network;
use sandnic::service_manager::ServiceManager;
use sandnic::traffic;
use serde_json::json;
use std::time::Duration;

/// Chains a datapath thread takes in one batch: what a death can leave
/// taken but not completed on a queue (sent again, or read from the TAP
/// and never published).
const BATCH: u64 = 256;

struct Managed {
    ns: NetNs,
    dir: ScratchDir,
    manager: ServiceManager,
    nic: TestNic,
    tap_mac: sandnic::frames::Mac,
}

impl Managed {
    fn start() -> Self {
        let ns = NetNs::new().unwrap();
        ns.add_tap("tap0", "10.77.0.1/24").unwrap();
        ns.add_static_neighbour("10.77.0.2", "52:54:00:12:34:56", "tap0")
            .unwrap();
        sandnic::steering::steer_by_priority(&ns, "tap0").unwrap();
        let dir = ScratchDir::new().unwrap();
        let (vhost, api) = (dir.path("vhost.sock"), dir.path("api.sock"));
        let args = [
            "--socket",
            vhost.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
            "--tap",
            "tap0",
            "--mac",
            "52:54:00:12:34:56",
        ];
        let manager = ServiceManager::start(&ns, &dir, &args, 64).unwrap();
        let nic = TestNic::connect(&vhost, &NicConfig::default()).unwrap();
        let tap_mac = ns.mac_of("tap0").unwrap();
        Self {
            ns,
            dir,
            manager,
            nic,
            tap_mac,
        }
    }

    fn api(&self, request: serde_json::Value) -> serde_json::Value {
        sandnic_host::api::client(&self.dir.path("api.sock"), request)
            .map(|(v, _)| v)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.manager.log()))
    }
}

/// What one direction received of `sent` numbered frames: how many never
/// came, and how many came twice.
fn missing_and_twice(sent: u64, got: &[u64]) -> (u64, u64) {
    let mut seen = vec![0u32; sent as usize];
    for &seq in got {
        assert!(seq < sent, "a frame that was never sent: {seq}");
        seen[seq as usize] += 1;
    }
    let missing = seen.iter().filter(|&&n| n == 0).count() as u64;
    let twice = seen.iter().map(|&n| u64::from(n.saturating_sub(1))).sum();
    (missing, twice)
}

/// `kill -9` three times under traffic both ways: each time the manager
/// restarts sandnic, which picks the device up from the store. The test
/// frontend never reconnects (it could not: it has no reconnect), every
/// frame sent after the restart arrives, and what the death cost is at
/// most one batch each way: frames sent twice (a TX chain taken, not
/// completed) or lost (read from the TAP into a buffer never published).
#[test]
fn a_killed_sandnic_is_picked_up_with_no_disconnect() {
    require_network!("a_killed_sandnic_is_picked_up_with_no_disconnect");
    let mut m = Managed::start();
    for round in 0..3u64 {
        let manager = &m.manager;
        let report = traffic::run(
            &mut m.nic,
            &m.ns,
            m.tap_mac,
            5_000,
            Duration::from_millis(2000),
            Duration::from_millis(700),
            || {
                manager.signal_main(nix::sys::signal::Signal::SIGKILL);
                manager.wait_ready(round as usize + 2, Duration::from_secs(20))
            },
        );
        report
            .result
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", m.manager.log()));
        for (what, got) in [
            ("host → guest", &report.guest_got),
            ("guest → host", &report.host_got),
        ] {
            let (missing, twice) = missing_and_twice(report.sent, got);
            eprintln!("round {round}, {what}: {missing} lost, {twice} twice");
            assert!(
                missing <= BATCH && twice <= BATCH,
                "round {round}, {what}: {missing} lost, {twice} twice\n{}",
                m.manager.log()
            );
            assert_eq!(
                got.last(),
                Some(&(report.sent - 1)),
                "round {round}, {what}: the last frame arrives"
            );
        }
    }
    assert_eq!(m.manager.starts(), 4);
    let status = m.api(json!({"cmd": "status"}));
    assert_eq!(status["frontend_connected"], true, "{status}");
    let stats = m.api(json!({"cmd": "stats"}));
    assert_eq!(stats["control"]["disconnects"], 0, "{stats}");
    assert_eq!(stats["control"]["frontends_accepted"], 1, "{stats}");
    // The config space is answered by the new process on the old
    // connection.
    assert_eq!(&m.nic.config(12).unwrap()[..6], &RIG_GUEST_MAC);
    assert_eq!(
        m.manager
            .log()
            .matches("picked the device up from the service manager's fd store")
            .count(),
        3
    );
    assert!(
        m.manager.dropped_on_poll().is_empty(),
        "{:?}",
        m.manager.dropped_on_poll()
    );
}
