//! Deliberate misbehaviour for the host's containment tests (feature
//! `hostile`, never shipped). Control class [`HOSTILE_CLASS`] selects one;
//! the rest of the device works normally so a restored instance can be
//! checked to be healthy.

#[cfg(feature = "hostile")]
use crate::types::{CtrlReply, DeviceConfig, Effect, Offloads, RxFilter, ACK_OK};

/// A control class no virtio-net driver sends.
pub const HOSTILE_CLASS: u8 = 0xf0;
pub const INFINITE_LOOP: u8 = 0;
pub const UNBOUNDED_ALLOC: u8 = 1;
pub const PANIC: u8 = 2;
pub const QUEUE_PAIRS_OUT_OF_RANGE: u8 = 3;
pub const HUGE_RX_FILTER: u8 = 4;
pub const BAD_VNET_HDR_LEN: u8 = 5;
pub const BAD_ACK: u8 = 6;
pub const DEEP_RECURSION: u8 = 7;
pub const UNSUPPORTED_OFFLOADS: u8 = 8;
pub const EFFECT_FLOOD: u8 = 9;
/// Devices whose MAC starts with this prefix loop forever in `load`.
pub const LOOP_IN_LOAD_MAC_PREFIX: [u8; 3] = [0x02, 0xde, 0xad];

#[cfg(feature = "hostile")]
pub fn ctrl(bytes: &[u8]) -> Option<CtrlReply> {
    let [HOSTILE_CLASS, command, ..] = bytes else {
        return None;
    };
    let ok = |effects| {
        Some(CtrlReply {
            ack: ACK_OK,
            effects,
        })
    };
    match *command {
        INFINITE_LOOP => spin(),
        UNBOUNDED_ALLOC => {
            let mut hoard: Vec<Vec<u8>> = Vec::new();
            loop {
                hoard.push(vec![0xa5; 1 << 20]);
                std::hint::black_box(&hoard);
            }
        }
        PANIC => panic!("hostile component: deliberate panic"),
        QUEUE_PAIRS_OUT_OF_RANGE => ok(vec![Effect::EnableQueuePairs(u16::MAX)]),
        HUGE_RX_FILTER => ok(vec![Effect::SetRxFilter(huge_filter())]),
        BAD_VNET_HDR_LEN => ok(vec![Effect::SetVnetHdrLen(4096)]),
        BAD_ACK => Some(CtrlReply {
            ack: 7,
            effects: Vec::new(),
        }),
        DEEP_RECURSION => {
            std::hint::black_box(recurse(u64::MAX));
            None
        }
        UNSUPPORTED_OFFLOADS => ok(vec![Effect::SetTapOffloads(Offloads::all())]),
        EFFECT_FLOOD => ok(vec![Effect::ConfigChanged; 1_000]),
        _ => None,
    }
}

#[cfg(feature = "hostile")]
pub fn load(config: &DeviceConfig) {
    if config.mac[..3] == LOOP_IN_LOAD_MAC_PREFIX {
        spin();
    }
}

#[cfg(feature = "hostile")]
fn spin() -> ! {
    let mut n: u64 = 0;
    loop {
        n = std::hint::black_box(n.wrapping_add(1));
    }
}

#[cfg(feature = "hostile")]
fn recurse(depth: u64) -> u64 {
    // Scalars only, so the frames live on the wasm stack (not in linear
    // memory), and a non-associative combination so LLVM cannot turn the
    // recursion into a loop.
    if depth == 0 {
        return 1;
    }
    (recurse(std::hint::black_box(depth - 1)) ^ depth).rotate_left(7)
}

#[cfg(feature = "hostile")]
fn huge_filter() -> RxFilter {
    let many: Vec<[u8; 6]> = (0..10_000u32)
        .map(|i| {
            let b = i.to_be_bytes();
            [2, 0, b[0], b[1], b[2], b[3]]
        })
        .collect();
    RxFilter {
        mac: [2, 0, 0, 0, 0, 1],
        unicast: many.clone(),
        multicast: many,
        vlans: vec![0; 4096],
        ..RxFilter::default()
    }
}
