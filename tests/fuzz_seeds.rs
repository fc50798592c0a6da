//! Writes the fuzzers' seed corpus (`fuzz/corpus/<target>/seed-*`) from
//! real values: every control command, saved states of both versions, a
//! real handover offer, well-formed rings. Run when the formats change:
//! `SANDNIC_WRITE_FUZZ_SEEDS=1 cargo test --test fuzz_seeds -- --ignored`

mod common;

use common::{full_config, sandboxed, Build, Dut};
use sandnic_device::ctrl::{CtrlCommand, RxSwitch};
use sandnic_device::NetDevice;
use std::path::PathBuf;

fn corpus(target: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write(target: &str, name: &str, bytes: &[u8]) {
    std::fs::write(corpus(target).join(format!("seed-{name}")), bytes).unwrap();
}

fn commands() -> Vec<(&'static str, CtrlCommand)> {
    vec![
        (
            "promisc",
            CtrlCommand::Rx {
                switch: RxSwitch::Promisc,
                on: false,
            },
        ),
        (
            "allmulti",
            CtrlCommand::Rx {
                switch: RxSwitch::AllMulti,
                on: true,
            },
        ),
        (
            "nobcast",
            CtrlCommand::Rx {
                switch: RxSwitch::NoBcast,
                on: true,
            },
        ),
        (
            "mac-table",
            CtrlCommand::MacTableSet {
                unicast: vec![[2, 0, 0, 0, 0, 1]],
                multicast: vec![[1, 0, 0x5e, 0, 0, 1]; 3],
            },
        ),
        ("mac-addr", CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 9])),
        ("vlan-add", CtrlCommand::VlanAdd(100)),
        ("vlan-del", CtrlCommand::VlanDel(100)),
        ("announce-ack", CtrlCommand::AnnounceAck),
        ("mq", CtrlCommand::MqPairsSet(2)),
        (
            "offloads",
            CtrlCommand::GuestOffloadsSet(sandnic_device::features::GUEST_CSUM),
        ),
    ]
}

#[test]
#[ignore = "writes fuzz/corpus; run with SANDNIC_WRITE_FUZZ_SEEDS=1"]
fn write_fuzz_seeds() {
    assert_eq!(
        std::env::var("SANDNIC_WRITE_FUZZ_SEEDS").as_deref(),
        Ok("1")
    );
    let offered = NetDevice::new(full_config()).unwrap().device_features();
    for (name, command) in commands() {
        let mut input = offered.to_le_bytes().to_vec();
        input.extend_from_slice(&command.encode());
        write("ctrl_command", name, &input);
    }
    // Saved states: fresh, negotiated and busy, in both versions.
    for (version, build) in [("v1", Build::V1), ("v2", Build::V2)] {
        let mut d = sandboxed(build, full_config());
        write(
            "state_load",
            &format!("{version}-fresh"),
            &Dut::save(&mut d),
        );
        d.set_features(offered).unwrap();
        write(
            "state_load",
            &format!("{version}-negotiated"),
            &Dut::save(&mut d),
        );
        for (_, command) in commands() {
            d.ctrl(&command.encode());
        }
        Dut::announce(&mut d);
        write("state_load", &format!("{version}-busy"), &Dut::save(&mut d));
    }
    write("handover_stream", "offer", &offer_frame());
    write("vring", "empty", &[3, 1]);
    write("vring", "one-chain", &ring_image());
}

/// A well-formed handover stream as a destination reads it: the offer
/// frame, then the commit frame (the fds travel out of band).
fn offer_frame() -> Vec<u8> {
    use sandnic_host::handover::state::{Commit, FdRole, HostState, Offer, TapState, VringState};
    let host = HostState {
        config: full_config(),
        protocol: Default::default(),
        vrings: vec![
            VringState {
                num: 256,
                addrs: None,
                base: 0,
                enabled: true,
                started: false
            };
            5
        ],
        regions: vec![],
        tap: TapState {
            name: "tap0".into(),
            queues: 2,
        },
        link_up: true,
        socket_paths: vec![],
        connect: None,
        counters: Default::default(),
        queue_stats: vec![],
        limits: Default::default(),
    };
    let offer = Offer {
        magic: sandnic_host::handover::stream::MAGIC.into(),
        version: sandnic_host::handover::stream::VERSION,
        source_component: sandnic_host::sandbox::ComponentInfo {
            name: "sandnic-device".into(),
            version: "0.1.0".into(),
            state_version: 1,
            oldest_state_version: 1,
        },
        host: host.clone(),
        component_wasm: vec![],
        fds: vec![
            FdRole::Connection,
            FdRole::Kick(0),
            FdRole::TapQueue(0),
            FdRole::TapQueue(1),
        ],
    };
    let commit = Commit {
        stopped_at_ns: 1,
        host,
        device_state: NetDevice::new(full_config()).unwrap().save(),
        fds: vec![],
    };
    let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
    sandnic_host::handover::stream::send(&a, &offer).unwrap();
    sandnic_host::handover::stream::send(&a, &commit).unwrap();
    drop(a);
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut &b, &mut bytes).unwrap();
    bytes
}

/// Size selector 3 (8 entries), event idx off; a TX ring at guest address
/// 0x10000 holding one 64-byte chain.
fn ring_image() -> Vec<u8> {
    let mut image = vec![3u8, 0];
    let mut mem = vec![0u8; 4096];
    let buf = 0x10000u64 + 2048;
    mem[0..8].copy_from_slice(&buf.to_le_bytes());
    mem[8..12].copy_from_slice(&64u32.to_le_bytes());
    let avail = 16 * 8;
    mem[avail + 2..avail + 4].copy_from_slice(&1u16.to_le_bytes());
    image.extend_from_slice(&mem);
    image
}
