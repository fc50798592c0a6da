//! Floods through a device at line rate, and the TAP's kernel counters to
//! measure what passes: for the rate-limit tests and bench. TX is what the
//! TAP received from the backend (its `rx` counters); RX is what the
//! backend read from the TAP (its `tx` counters, which the kernel moves
//! when a reader takes a frame).
//!
//! The offered load is meant to be far above any limit: the test frontend
//! keeps every TX ring full, and a packet socket per pair floods the TAP.

use crate::frames::{self, Mac};
use crate::frontend::TestNic;
use crate::harness::{NetNs, Rig, Sandnic, RIG_GUEST_IP, RIG_GUEST_MAC, RIG_HOST_IP};
use serde_json::{json, Value};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Where guest frames go: a MAC that is not the TAP's, so the host counts
/// them at the TAP and drops them quietly (no reply comes back).
pub const NOWHERE: Mac = [0x02, 0, 0, 0, 0, 0x99];
/// Ethernet frame sizes: a full one, and the smallest.
pub const FULL: usize = 1514;
pub const SMALLEST: usize = 60;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Way {
    /// Guest → TAP.
    Tx,
    /// TAP → guest.
    Rx,
}

impl Way {
    pub fn name(self) -> &'static str {
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
pub struct TapCounters {
    pub bytes: u64,
    pub packets: u64,
    pub dropped: u64,
}

pub fn tap_counters(ns: &NetNs, way: Way) -> TapCounters {
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
pub fn measure(ns: &NetNs, way: Way, span: Duration) -> (f64, f64) {
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
pub fn frame_of(len: usize, dst: Mac, src: Mac, ips: ([u8; 4], [u8; 4])) -> Vec<u8> {
    let payload = vec![0x5a; len - 42];
    let f = frames::udp_frame(dst, src, ips, (5000, 5001), &payload);
    assert_eq!(f.len(), len);
    f
}

/// Keeps every TX ring of `nic` full of `len`-byte frames until `stop`.
pub fn flood_tx(nic: &mut TestNic, pairs: u16, len: usize, stop: &AtomicBool) {
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
pub fn injector(ns: &NetNs, pair: u16) -> OwnedFd {
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
pub fn flood_rx(ns: &NetNs, tap_mac: Mac, pairs: u16, len: usize, stop: &AtomicBool) {
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
pub fn drain_rx(nic: &mut TestNic, pairs: u16, stop: &AtomicBool) {
    while !stop.load(Ordering::Relaxed) {
        for pair in 0..usize::from(pairs) {
            nic.reap_rx(pair);
        }
        std::thread::sleep(Duration::from_micros(200));
    }
}

pub fn set_limit(sandnic: &Sandnic, way: Way, spec: Value) -> Value {
    let reply = sandnic
        .api(json!({"cmd": "limit", way.name(): spec}))
        .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    reply
}

/// Runs `body` with `way` flooded (above any limit) on `pairs` pairs.
pub fn flooded<R>(
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
