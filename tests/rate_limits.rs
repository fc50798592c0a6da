//! Rate limits (`--tx-limit`, `--rx-limit`, the API's `limit`): what
//! passes is measured with the kernel's own counters on the TAP, not with
//! sandnic's (`sandnic::flood`), under a load far above the limit.
//! Accuracy is judged over 5 s once the first burst is spent.

use sandnic::flood::{flood_rx, flooded, measure, set_limit, tap_counters, Way, FULL, SMALLEST};
use sandnic::frontend::NicConfig;
use sandnic::harness::{cpu_seconds, NetNs, Rig, Sandnic};
use sandnic::require_network;
use serde_json::{json, Value};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The measuring tests run one at a time: two floods at once would share
/// the machine's two CPUs, and a limit must be measured with the load
/// above it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const MEASURE: Duration = Duration::from_secs(5);
/// A burst is 0.1 s of the rate by default: spent well within this.
const SPEND_BURST: Duration = Duration::from_millis(400);

fn within(got: f64, want: f64, tolerance: f64) -> bool {
    (got / want - 1.0).abs() <= tolerance
}

/// Every rate the issue names, one after the other on one device, each
/// set live and measured over 5 s once its burst is spent.
fn limits_hold(way: Way, pairs: u16) {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let queues = pairs.to_string();
    let mut rig = Rig::new(
        &["--queues", &queues],
        NicConfig {
            pairs,
            ..NicConfig::default()
        },
    )
    .unwrap();
    let cases: [(Value, usize, f64, f64); 5] = [
        (json!({"bytes": 1_250_000}), FULL, 1_250_000.0, 0.0),
        (json!({"bytes": 12_500_000}), FULL, 12_500_000.0, 0.0),
        (json!({"bytes": 125_000_000}), FULL, 125_000_000.0, 0.0),
        (json!({"frames": 10_000}), SMALLEST, 0.0, 10_000.0),
        (json!({"frames": 100_000}), SMALLEST, 0.0, 100_000.0),
    ];
    let mut failures = Vec::new();
    for (spec, len, bytes, frames) in cases {
        set_limit(&rig.sandnic, way, spec.clone());
        let before = pair_counts(&rig.sandnic, way);
        let (got_bytes, got_frames) = flooded(&mut rig, way, pairs, len, |ns, _| {
            std::thread::sleep(SPEND_BURST);
            measure(ns, way, MEASURE)
        });
        let after = pair_counts(&rig.sandnic, way);
        let (got, want) = if bytes > 0.0 {
            (got_bytes, bytes)
        } else {
            (got_frames, frames)
        };
        let shares: Vec<u64> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
        eprintln!(
            "{} {spec} on {pairs} pair(s): {got:.0}/s, want {want:.0}/s ({:+.2} %); frames per pair {shares:?}",
            way.name(),
            (got / want - 1.0) * 100.0
        );
        if !within(got, want, 0.05) {
            failures.push(format!("{spec}: {got:.0}/s, want {want:.0}/s"));
        }
        if pairs > 1 {
            let total: u64 = shares.iter().sum();
            for (pair, &n) in shares.iter().enumerate() {
                let share = n as f64 / total as f64;
                if !within(share, 1.0 / f64::from(pairs), 0.1) {
                    failures.push(format!(
                        "{spec}: pair {pair} passed {share:.3} of the frames"
                    ));
                }
            }
        }
    }
    assert!(failures.is_empty(), "{failures:#?}\n{}", rig.sandnic.log());
    let stats = rig.sandnic.stats().unwrap();
    assert!(
        stats["limits"][way.name()]["throttled"].as_u64().unwrap() > 0,
        "{stats}"
    );
    if way == Way::Rx {
        // The flood overflowed the TAP's queue while RX waited: the
        // kernel counted it, and `stats` shows the kernel's count.
        let kernel = tap_counters(&rig.ns, Way::Rx).dropped;
        let shown = stats["limits"]["rx"]["tap_dropped"].as_u64().unwrap();
        assert!(shown > 0 && shown <= kernel, "{shown} of {kernel}");
    }
}

/// Frames each pair passed in `way`, from sandnic's counters.
fn pair_counts(sandnic: &Sandnic, way: Way) -> Vec<u64> {
    let stats = sandnic.stats().unwrap();
    let field = match way {
        Way::Tx => "tx_packets",
        Way::Rx => "rx_packets",
    };
    stats["queues"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q[field].as_u64().unwrap())
        .collect()
}

#[test]
fn tx_limits_hold_with_one_pair() {
    require_network!("tx_limits_hold_with_one_pair");
    limits_hold(Way::Tx, 1);
}

#[test]
fn tx_limits_hold_with_two_pairs_sharing_equally() {
    require_network!("tx_limits_hold_with_two_pairs_sharing_equally");
    limits_hold(Way::Tx, 2);
}

#[test]
fn rx_limits_hold_with_one_pair() {
    require_network!("rx_limits_hold_with_one_pair");
    limits_hold(Way::Rx, 1);
}

#[test]
fn rx_limits_hold_with_two_pairs_sharing_equally() {
    require_network!("rx_limits_hold_with_two_pairs_sharing_equally");
    limits_hold(Way::Rx, 2);
}

/// The limits are the device's: a hot swap and a handover keep them, and
/// the new process goes on enforcing them.
#[test]
fn limits_survive_a_swap_and_a_handover() {
    require_network!("limits_survive_a_swap_and_a_handover");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new(
        &[
            "--tx-limit",
            "bytes=12500k",
            "--rx-limit",
            "frames=10k,burst-frames=500",
        ],
        NicConfig::default(),
    )
    .unwrap();
    let limits = |s: &Sandnic| s.api(json!({"cmd": "status"})).unwrap()["limits"].clone();
    let set = limits(&rig.sandnic);
    assert_eq!(set["tx"]["bytes"], 12_500_000, "{set}");
    assert_eq!(set["tx"]["burst_bytes"], 1_250_000, "{set}");
    assert_eq!(set["rx"]["frames"], 10_000, "{set}");
    assert_eq!(set["rx"]["burst_frames"], 500, "{set}");
    let swapped = rig
        .sandnic
        .api(json!({"cmd": "swap", "component": "builtin"}))
        .unwrap();
    assert_eq!(swapped["ok"], true, "{swapped}");
    assert_eq!(limits(&rig.sandnic), set);
    let (destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &[]).unwrap();
    let reply = rig.sandnic.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    assert_eq!(limits(&destination), set);
    let (bytes, _) = flooded(&mut rig, Way::Tx, 1, FULL, |ns, _| {
        std::thread::sleep(SPEND_BURST);
        measure(ns, Way::Tx, Duration::from_secs(2))
    });
    assert!(
        within(bytes, 12_500_000.0, 0.05),
        "{bytes} B/s after the handover\n{}",
        destination.log()
    );
}

/// A malformed limit: `serve` exits 2 with the reason on one line; the
/// API answers an error and changes neither direction; `null` removes a
/// limit and a direction left out stays as it was.
#[test]
fn bad_limits_are_refused_and_change_nothing() {
    require_network!("bad_limits_are_refused_and_change_nothing");
    let (ns, dir) = Rig::namespace(true).unwrap();
    for (spec, why) in [
        ("bytes=10m", "is not a whole number"),
        ("bits=5", "unknown key"),
        ("bytes=0", "must be more than 0"),
        ("", "is not key=value"),
    ] {
        let out = ns
            .command(sandnic::harness::sandnic_binary().to_str().unwrap())
            .args(["serve", "--socket"])
            .arg(dir.path("x.sock"))
            .args(["--tap", "tap0", "--tx-limit", spec])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{spec}: {stderr}");
        assert!(stderr.contains(why), "{spec}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "{spec}: {stderr}");
    }
    drop((ns, dir));
    let rig = Rig::new(&["--rx-limit", "bytes=1M"], NicConfig::default()).unwrap();
    let limit = |request: Value| rig.sandnic.api(request).unwrap();
    let before = limit(json!({"cmd": "status"}))["limits"].clone();
    for bad in [
        json!({"cmd": "limit", "tx": {"bytes": 0}, "rx": null}),
        json!({"cmd": "limit", "tx": {"bytes": 1000000}, "rx": {"bytes": -5}}),
        json!({"cmd": "limit", "rx": {"bytes": 1.5}}),
        json!({"cmd": "limit", "rx": {"bits": 1000}}),
        json!({"cmd": "limit", "tx": {}}),
        json!({"cmd": "limit", "tx": {"frames": 10, "burst_bytes": 100000}}),
    ] {
        let reply = limit(bad.clone());
        assert_eq!(reply["ok"], false, "{bad}: {reply}");
        assert_eq!(limit(json!({"cmd": "status"}))["limits"], before, "{bad}");
    }
    let reply = limit(json!({"cmd": "limit", "tx": {"frames": 5000}}));
    assert_eq!(reply["limits"]["tx"]["frames"], 5000, "{reply}");
    assert_eq!(reply["limits"]["rx"]["bytes"], 1_000_000, "{reply}");
    let reply = limit(json!({"cmd": "limit", "rx": null}));
    assert_eq!(reply["limits"]["rx"], Value::Null, "{reply}");
    assert_eq!(reply["limits"]["tx"]["frames"], 5000, "{reply}");
    // `ctl limit` says the same from the command line.
    let ctl = std::process::Command::new(sandnic::harness::sandnic_binary())
        .args(["ctl", "--api"])
        .arg(&rig.sandnic.api)
        .args(["limit", "--tx", "none", "--rx", "bytes=125M,burst-bytes=2M"])
        .output()
        .unwrap();
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let now = limit(json!({"cmd": "status"}))["limits"].clone();
    assert_eq!(now["tx"], Value::Null, "{now}");
    assert_eq!(now["rx"]["bytes"], 125_000_000, "{now}");
    assert_eq!(now["rx"]["burst_bytes"], 2_000_000, "{now}");
}

/// Bytes through the TAP in `way` between two instants: the counters
/// read at each (a read takes a few ms; the instants are those of the
/// reads).
fn bytes_between(ns: &NetNs, way: Way, from: Instant, to: Instant) -> f64 {
    let wait_until = |t: Instant| std::thread::sleep(t.saturating_duration_since(Instant::now()));
    wait_until(from);
    let a = tap_counters(ns, way).bytes;
    wait_until(to);
    (tap_counters(ns, way).bytes - a) as f64
}

/// After idle the bucket is full: the burst passes at once, then the rate
/// holds. A live change takes effect within 100 ms, up and down, and a
/// lower rate is no fresh burst.
#[test]
fn a_burst_then_the_rate_and_live_changes_within_100_ms() {
    require_network!("a_burst_then_the_rate_and_live_changes_within_100_ms");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new(
        &["--tx-limit", "bytes=12500k,burst-bytes=2500k"],
        NicConfig::default(),
    )
    .unwrap();
    let mut failures = Vec::new();
    // Read before the flood starts, and 100 ms after: the burst (2.5 MB)
    // and 100 ms of the rate (1.25 MB) pass.
    let idle = tap_counters(&rig.ns, Way::Tx).bytes;
    flooded(&mut rig, Way::Tx, 1, FULL, |ns, sandnic| {
        let start = Instant::now();
        std::thread::sleep(Duration::from_millis(100));
        let first = (tap_counters(ns, Way::Tx).bytes - idle) as f64;
        eprintln!("first 100 ms: {first} B");
        if !within(first, 3_750_000.0, 0.15) {
            failures.push(format!("first 100 ms: {first} B, want 3.75 MB"));
        }
        let steady = bytes_between(
            ns,
            Way::Tx,
            start + Duration::from_millis(500),
            start + Duration::from_millis(2500),
        ) / 2.0;
        eprintln!("steady: {steady} B/s");
        if !within(steady, 12_500_000.0, 0.05) {
            failures.push(format!("steady: {steady} B/s, want 12.5 MB/s"));
        }
        for (spec, rate) in [(125_000_000u64, 125e6), (1_250_000, 1.25e6)] {
            set_limit(sandnic, Way::Tx, json!({ "bytes": spec }));
            let changed = Instant::now();
            let after = bytes_between(
                ns,
                Way::Tx,
                changed + Duration::from_millis(100),
                changed + Duration::from_millis(1100),
            );
            eprintln!("100 ms to 1.1 s after the change to {spec} B/s: {after} B");
            // The new bucket is 0.1 s of the new rate: at most that much
            // above the rate, and nothing of the old burst.
            if !(after >= rate * 0.95 && after <= rate * 1.15) {
                failures.push(format!("100 ms after the change to {spec}: {after} B/s"));
            }
        }
    });
    assert!(failures.is_empty(), "{failures:#?}");
}

/// A throttled device does not spin: TX rings kept full and RX flooded,
/// both held to 1.25 MB/s, sandnic uses a small share of one CPU (a
/// busy-polling thread would use all of it). The share is bounded loosely:
/// the bench measures it.
#[test]
fn a_throttled_device_does_not_spin() {
    require_network!("a_throttled_device_does_not_spin");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    for way in [Way::Tx, Way::Rx] {
        let mut rig = Rig::new(
            &["--tx-limit", "bytes=1250k", "--rx-limit", "bytes=1250k"],
            NicConfig::default(),
        )
        .unwrap();
        let pid = rig.sandnic.child.id();
        let share = flooded(&mut rig, way, 1, FULL, |_, _| {
            std::thread::sleep(SPEND_BURST);
            let (cpu, t) = (cpu_seconds(pid), Instant::now());
            std::thread::sleep(Duration::from_secs(2));
            (cpu_seconds(pid) - cpu) / t.elapsed().as_secs_f64()
        });
        eprintln!(
            "{} throttled at 1.25 MB/s: sandnic used {:.1} % of a CPU",
            way.name(),
            share * 100.0
        );
        assert!(
            share < 0.3,
            "{}: {:.1} % of a CPU",
            way.name(),
            share * 100.0
        );
    }
}

/// A frontend written elsewhere: DPDK's `virtio_user` in `dpdk-testpmd`
/// sending as fast as the ring takes frames (`txonly`) and receiving
/// (`rxonly`) while the host floods the TAP. Both limits hold.
#[test]
fn limits_hold_under_dpdk_virtio_user() {
    use sandnic::dpdk::{FrontendMode, VirtioUser};
    require_network!("limits_hold_under_dpdk_virtio_user");
    if !sandnic::dpdk::installed() {
        sandnic::harness::skip(
            "limits_hold_under_dpdk_virtio_user",
            "dpdk-testpmd is missing",
        );
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let (ns, dir) = Rig::namespace(true).unwrap();
    let sandnic = Sandnic::serve(
        &ns,
        &dir,
        &[
            "--tap",
            "tap0",
            "--tx-limit",
            "bytes=12500k",
            "--rx-limit",
            "frames=10k",
        ],
    )
    .unwrap();
    let tx = VirtioUser::start(
        &sandnic.socket,
        "rl-tx",
        1,
        FrontendMode::TxOnly { len: 1514 },
        1,
    )
    .expect("testpmd virtio_user (txonly)");
    std::thread::sleep(SPEND_BURST);
    let (bytes, _) = measure(&ns, Way::Tx, MEASURE);
    let sent = tx.finish();
    eprintln!(
        "testpmd txonly under bytes=12500k: {bytes:.0} B/s at the TAP, testpmd sent {sent:?}"
    );
    assert!(
        within(bytes, 12_500_000.0, 0.05),
        "{bytes} B/s\n{}",
        sandnic.log()
    );
    let stats = sandnic.stats().unwrap();
    assert_eq!(stats["queues"][0]["tx_drops"], 0, "{stats}");

    let rx = VirtioUser::start(&sandnic.socket, "rl-rx", 1, FrontendMode::RxOnly, 1)
        .expect("testpmd virtio_user (rxonly)");
    let tap_mac = ns.mac_of("tap0").unwrap();
    let stop = AtomicBool::new(false);
    let (_, frames) = std::thread::scope(|s| {
        s.spawn(|| flood_rx(&ns, tap_mac, 1, SMALLEST, &stop));
        std::thread::sleep(SPEND_BURST);
        let got = measure(&ns, Way::Rx, MEASURE);
        stop.store(true, Ordering::Relaxed);
        got
    });
    let received = rx.finish();
    eprintln!("testpmd rxonly under frames=10k: {frames:.0} frames/s read from the TAP, testpmd received {received:?}");
    assert!(
        within(frames, 10_000.0, 0.05),
        "{frames} frames/s\n{}",
        sandnic.log()
    );
}

/// A real `virtio_net` driver: iperf3 (TCP) in a User-Mode Linux guest,
/// to the host and back (-R), through limits of 1.25 MB/s each way,
/// measured at the TAP while each runs. TCP finishes both runs: TX
/// backpressure and RX held in the TAP are what a guest's stack copes
/// with.
#[test]
fn limits_hold_under_a_uml_guests_tcp() {
    use sandnic::guest::{self, GuestRig, Kind};
    require_network!("limits_hold_under_a_uml_guests_tcp");
    if let Some(why) = guest::unavailable(Kind::Uml) {
        sandnic::harness::skip("limits_hold_under_a_uml_guests_tcp", &why);
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
step ready x
iperf3 -c 10.88.0.1 -t 8 > /mnt/tx.txt 2>&1
echo $? > /mnt/tx.rc
step reverse x
iperf3 -c 10.88.0.1 -t 8 -R > /mnt/rx.txt 2>&1
echo $? > /mnt/rx.rc
"#;
    let GuestRig {
        mut guest,
        hostdir,
        ns,
        sandnic,
        dir: _dir,
    } = GuestRig::boot(
        Kind::Uml,
        &["--tx-limit", "bytes=1250k", "--rx-limit", "bytes=1250k"],
        SCRIPT,
    )
    .unwrap();
    hostdir
        .wait_for("ready", Duration::from_secs(60), &guest)
        .unwrap();
    let mut server = ns.command("iperf3");
    server.args(["-s"]).stdout(std::process::Stdio::null());
    let mut server = sandnic::harness::spawn(server).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let mut rates = Vec::new();
    for (step, way) in [("ready", Way::Tx), ("reverse", Way::Rx)] {
        if way == Way::Rx {
            hostdir
                .wait_for(step, Duration::from_secs(60), &guest)
                .unwrap();
        }
        hostdir.release(step);
        // TCP's start and the first burst, then 5 s of the run's 8.
        std::thread::sleep(Duration::from_millis(1500));
        let (bytes, _) = measure(&ns, way, MEASURE);
        rates.push((way, bytes));
    }
    let status = guest.wait(Duration::from_secs(60)).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    eprintln!("UML iperf3 under 1.25 MB/s each way: {rates:?}");
    assert_eq!(status, 0, "{}", guest.console());
    for run in ["tx", "rx"] {
        assert_eq!(
            hostdir.read(&format!("{run}.rc")).trim(),
            "0",
            "{run}: {}\n{}",
            hostdir.read(&format!("{run}.txt")),
            sandnic.log()
        );
    }
    for (way, bytes) in rates {
        assert!(
            within(bytes, 1_250_000.0, 0.05),
            "{}: {bytes} B/s",
            way.name()
        );
    }
}

/// A local VM migration (same process): the destination VMM's session
/// takes the device over when the source stops its rings, and the limit
/// holds for it as it did for the source.
#[test]
fn a_limit_holds_across_a_local_vm_migration() {
    require_network!("a_limit_holds_across_a_local_vm_migration");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new(&["--tx-limit", "bytes=12500k"], NicConfig::default()).unwrap();
    let standby =
        sandnic::frontend::TestNic::connect_standby(&rig.sandnic.socket, &NicConfig::default())
            .unwrap();
    rig.nic.stop_rings().unwrap();
    let second = standby.start().unwrap();
    let first = std::mem::replace(&mut rig.nic, second);
    drop(first);
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.sandnic.api(json!({"cmd": "status"})).unwrap()["sessions"]
        .as_array()
        .map_or(0, Vec::len)
        != 1
    {
        assert!(Instant::now() < deadline, "the source's session never left");
        std::thread::sleep(Duration::from_millis(10));
    }
    let (bytes, _) = flooded(&mut rig, Way::Tx, 1, FULL, |ns, _| {
        std::thread::sleep(SPEND_BURST);
        measure(ns, Way::Tx, Duration::from_secs(2))
    });
    assert!(
        within(bytes, 12_500_000.0, 0.05),
        "{bytes} B/s after the migration"
    );
}

/// A throttled direction never holds up the other on the same thread.
/// TX held to 2 frames/s with its ring kept full (a turn every 500 ms):
/// datagrams from the host still reach the guest at once. Then RX held to
/// 2 frames/s with the TAP flooded: the guest's datagrams still reach the
/// host at once. Were the two coupled, a frame would wait for the other
/// direction's next turn (up to 500 ms); the bound is half that.
#[test]
fn a_throttled_direction_does_not_hold_up_the_other() {
    require_network!("a_throttled_direction_does_not_hold_up_the_other");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let bound = Duration::from_millis(250);
    for throttled in [Way::Tx, Way::Rx] {
        let flag = match throttled {
            Way::Tx => "--tx-limit",
            Way::Rx => "--rx-limit",
        };
        let mut rig = Rig::new(&[flag, "frames=2,burst-frames=1"], NicConfig::default()).unwrap();
        let host = rig
            .ns
            .inside(|| Ok(std::net::UdpSocket::bind(("10.77.0.1", 6100))?))
            .unwrap();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let worst = match throttled {
            Way::Tx => rx_delays_under_throttled_tx(&mut rig, &host),
            Way::Rx => tx_delays_under_throttled_rx(&mut rig, &host),
        };
        eprintln!(
            "{} throttled: the other way's worst delay {worst:?}",
            throttled.name()
        );
        assert!(worst < bound, "{} throttled: {worst:?}", throttled.name());
    }
}

/// TX ring kept full under its limit while the host sends 20 datagrams
/// to the guest, 20 ms apart: the longest any took to arrive.
fn rx_delays_under_throttled_tx(rig: &mut Rig, host: &std::net::UdpSocket) -> Duration {
    let frame = sandnic::flood::frame_of(
        FULL,
        sandnic::flood::NOWHERE,
        sandnic::harness::RIG_GUEST_MAC,
        (sandnic::harness::RIG_GUEST_IP, [10, 77, 0, 99]),
    );
    let chain = rig.nic.prepare_tx(0, &[0u8; 12], &frame);
    let mut worst = Duration::ZERO;
    for i in 0..20u8 {
        rig.nic.send_prepared(0, 256, chain);
        let sent = Instant::now();
        host.send_to(&[i; 16], "10.77.0.2:5000").unwrap();
        loop {
            rig.nic.send_prepared(0, 256, chain);
            if let Some(f) = rig.nic.try_recv(0) {
                if sandnic::frames::udp_payload(&f) == Some(&[i; 16][..]) {
                    worst = worst.max(sent.elapsed());
                    break;
                }
            }
            assert!(
                sent.elapsed() < Duration::from_secs(5),
                "datagram {i} never came"
            );
            std::thread::sleep(Duration::from_micros(100));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    worst
}

/// The TAP flooded under the RX limit while the guest sends 20 datagrams
/// to the host, 20 ms apart: the longest any took to arrive.
fn tx_delays_under_throttled_rx(rig: &mut Rig, host: &std::net::UdpSocket) -> Duration {
    let stop = AtomicBool::new(false);
    let frames: Vec<Vec<u8>> = (0..20u8).map(|i| rig.guest_udp(6100, &[i; 16])).collect();
    let Rig {
        nic, ns, tap_mac, ..
    } = rig;
    let (ns, tap_mac) = (&*ns, *tap_mac);
    let mut worst = Duration::ZERO;
    std::thread::scope(|s| {
        s.spawn(|| flood_rx(ns, tap_mac, 1, FULL, &stop));
        std::thread::sleep(SPEND_BURST);
        for (i, frame) in (0..20u8).zip(&frames) {
            let sent = Instant::now();
            nic.send(0, frame).unwrap();
            let mut buf = [0u8; 64];
            loop {
                let (n, _) = host.recv_from(&mut buf).expect("the guest's datagram");
                if buf[..n] == [i; 16] {
                    worst = worst.max(sent.elapsed());
                    break;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        stop.store(true, Ordering::Relaxed);
    });
    worst
}

/// Work-conserving: with two pairs and only one of them sending, that one
/// gets the whole limit (the idle pair takes no turn and holds no place).
#[test]
fn an_idle_pairs_share_goes_to_the_busy_one() {
    require_network!("an_idle_pairs_share_goes_to_the_busy_one");
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = Rig::new(
        &["--queues", "2", "--tx-limit", "bytes=12500k"],
        NicConfig {
            pairs: 2,
            ..NicConfig::default()
        },
    )
    .unwrap();
    // `flooded` with one pair fills pair 0's ring only.
    let (bytes, _) = flooded(&mut rig, Way::Tx, 1, FULL, |ns, _| {
        std::thread::sleep(SPEND_BURST);
        measure(ns, Way::Tx, Duration::from_secs(2))
    });
    assert!(
        within(bytes, 12_500_000.0, 0.05),
        "{bytes} B/s with one of two pairs busy"
    );
}
