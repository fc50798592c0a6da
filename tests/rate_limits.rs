//! Rate limits (`--tx-limit`, `--rx-limit`, the API's `limit`): what
//! passes is measured with the kernel's own counters on the TAP, not with
//! sandnic's. TX is what the TAP received from sandnic (its `rx`
//! counters); RX is what sandnic read from the TAP (its `tx` counters,
//! which the kernel moves when a reader takes a frame).
//!
//! The offered load is always far above the limit: the test frontend keeps
//! every TX ring full, and the host side floods the TAP through a packet
//! socket. Accuracy is judged over 5 s once the first burst is spent.

use sandnic::frames::{self, Mac};
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, Rig, Sandnic, RIG_GUEST_IP, RIG_GUEST_MAC, RIG_HOST_IP};
use sandnic::require_network;
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// The measuring tests run one at a time: two floods at once would share
/// the machine's two CPUs, and a limit must be measured with the load
/// above it.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Where guest frames go: a MAC that is not the TAP's, so the host counts
/// them at the TAP and drops them quietly (no reply comes back).
const NOWHERE: Mac = [0x02, 0, 0, 0, 0, 0x99];
const MEASURE: Duration = Duration::from_secs(5);
/// A burst is 0.1 s of the rate by default: spent well within this.
const SPEND_BURST: Duration = Duration::from_millis(400);
/// Ethernet frame sizes: a full one, and the smallest.
const FULL: usize = 1514;
const SMALLEST: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Way {
    /// Guest → TAP.
    Tx,
    /// TAP → guest.
    Rx,
}

impl Way {
    fn name(self) -> &'static str {
        match self {
            Self::Tx => "tx",
            Self::Rx => "rx",
        }
    }

    /// The TAP's counters for this way: what the TAP received (TX) or
    /// what was read from it (RX).
    fn tap_side(self) -> &'static str {
        match self {
            Self::Tx => "rx",
            Self::Rx => "tx",
        }
    }
}

/// The TAP's counters as the kernel keeps them.
#[derive(Debug, Clone, Copy)]
struct TapCounters {
    bytes: u64,
    packets: u64,
    dropped: u64,
}

fn tap_counters(ns: &NetNs, way: Way) -> TapCounters {
    let out = ns.ip(&["-s", "-j", "link", "show", "dev", "tap0"]).unwrap();
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    let side = &all[0]["stats64"][way.tap_side()];
    let n = |k: &str| side[k].as_u64().unwrap_or_else(|| panic!("{k} in {side}"));
    TapCounters {
        bytes: n("bytes"),
        packets: n("packets"),
        dropped: n("dropped"),
    }
}

/// Bytes and frames per second through the TAP over `span`.
fn measure(ns: &NetNs, way: Way, span: Duration) -> (f64, f64) {
    let (a, t0) = (tap_counters(ns, way), Instant::now());
    std::thread::sleep(span);
    let (b, t1) = (tap_counters(ns, way), Instant::now());
    let secs = (t1 - t0).as_secs_f64();
    (
        (b.bytes - a.bytes) as f64 / secs,
        (b.packets - a.packets) as f64 / secs,
    )
}

/// A UDP frame of `len` bytes (Ethernet header included).
fn frame_of(len: usize, dst: Mac, src: Mac, ips: ([u8; 4], [u8; 4])) -> Vec<u8> {
    let payload = vec![0x5a; len - 42];
    let f = frames::udp_frame(dst, src, ips, (5000, 5001), &payload);
    assert_eq!(f.len(), len);
    f
}

/// Keeps every TX ring of `nic` full of `len`-byte frames until `stop`.
fn flood_tx(nic: &mut TestNic, pairs: u16, len: usize, stop: &AtomicBool) {
    let frame = frame_of(len, NOWHERE, RIG_GUEST_MAC, (RIG_GUEST_IP, [10, 77, 0, 99]));
    let header = [0u8; 12];
    let chain = (0..pairs)
        .map(|p| nic.prepare_tx(usize::from(p), &header, &frame))
        .last()
        .unwrap();
    while !stop.load(Ordering::Relaxed) {
        for pair in 0..usize::from(pairs) {
            nic.send_prepared(pair, 256, chain);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// A packet socket on the TAP's host side whose frames the rig's TAP
/// steers to pair `pair` (by the socket's priority).
fn injector(ns: &NetNs, pair: u16) -> OwnedFd {
    let fd = ns.packet_socket("tap0").unwrap();
    let priority = libc::c_int::from(pair);
    // SAFETY: SO_PRIORITY takes a c_int, which lives for the call.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_PRIORITY,
            (&priority as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    assert_eq!(r, 0);
    fd
}

/// Floods the TAP with `len`-byte frames for the guest, spread over
/// `pairs`, until `stop`; also keeps the guest's RX rings stocked.
fn flood_rx(ns: &NetNs, tap_mac: Mac, pairs: u16, len: usize, stop: &AtomicBool) {
    let frame = frame_of(len, RIG_GUEST_MAC, tap_mac, (RIG_HOST_IP, RIG_GUEST_IP));
    let sockets: Vec<OwnedFd> = (0..pairs).map(|p| injector(ns, p)).collect();
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..64 {
            for s in &sockets {
                // SAFETY: `frame` is a live buffer of its length; a full
                // queue refuses the frame, which is what a flood expects.
                unsafe { libc::send(s.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            }
        }
    }
}

/// Drains the guest's RX rings until `stop`.
fn drain_rx(nic: &mut TestNic, pairs: u16, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for pair in 0..usize::from(pairs) {
            nic.reap_rx(pair);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

fn set_limit(sandnic: &Sandnic, way: Way, spec: Value) -> Value {
    let reply = sandnic
        .api(json!({"cmd": "limit", way.name(): spec}))
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Runs `body` with `way` flooded (above any limit) on `pairs` pairs.
fn flooded<R>(
    rig: &mut Rig,
    way: Way,
    pairs: u16,
    len: usize,
    body: impl FnOnce(&NetNs, &Sandnic) -> R,
) -> R {
    let stop = AtomicBool::new(false);
    let Rig {
        nic,
        sandnic,
        ns,
        tap_mac,
        ..
    } = rig;
    let (ns, sandnic, tap_mac) = (&*ns, &*sandnic, *tap_mac);
    std::thread::scope(|s| {
        match way {
            Way::Tx => {
                s.spawn(|| flood_tx(nic, pairs, len, &stop));
            }
            Way::Rx => {
                s.spawn(|| drain_rx(nic, pairs, &stop));
                s.spawn(|| flood_rx(ns, tap_mac, pairs, len, &stop));
            }
        }
        let result = body(ns, sandnic);
        stop.store(true, Ordering::Relaxed);
        result
    })
}

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
