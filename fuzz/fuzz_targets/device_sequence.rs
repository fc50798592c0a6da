//! Stateful sequences of device calls from structured input: negotiation,
//! config reads and writes, status, queue enables, control commands, link
//! changes, announces, resets and save/load cycles.

#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sandnic_fuzz::{config, with_device, Slot};

#[derive(Debug, Arbitrary)]
enum Op {
    SetFeatures(u64),
    SetOfferedFeatures,
    ReadConfig(u16, u16),
    WriteConfig(u16, Vec<u8>),
    SetStatus(u8),
    Reset,
    QueueEnabled(u16, bool),
    Ctrl(Vec<u8>),
    /// A well-formed command (class, command, data from the fuzzer), which
    /// reaches deeper than random bytes.
    CtrlShaped(u8, u8, Vec<u8>),
    Link(bool),
    Announce,
    SaveLoad,
}

#[derive(Debug, Arbitrary)]
struct Input {
    pairs: u8,
    mtu: Option<u16>,
    offloads: u8,
    ops: Vec<Op>,
}

fuzz_target!(|input: Input| {
    let config = config(u16::from(input.pairs), input.mtu, input.offloads);
    with_device(&config, Slot::Main, |dut| run(dut, input.ops));
});

fn run(dut: &mut sandnic_fuzz::Dut, ops: Vec<Op>) {
    for op in ops.into_iter().take(64) {
        match op {
            Op::SetFeatures(f) => drop(dut.set_features(f)),
            Op::SetOfferedFeatures => {
                // Valid, but refused after FEATURES_OK until a reset.
                let f = dut.features();
                drop(dut.set_features(f));
            }
            Op::ReadConfig(offset, len) => drop(dut.read_config(u32::from(offset), u32::from(len))),
            Op::WriteConfig(offset, data) => drop(dut.write_config(u32::from(offset), &data)),
            Op::SetStatus(s) => dut.set_status(s),
            Op::Reset => dut.reset(),
            Op::QueueEnabled(q, on) => dut.queue_enabled(q, on),
            Op::Ctrl(bytes) => drop(dut.ctrl(&bytes)),
            Op::CtrlShaped(class, command, data) => {
                let mut bytes = vec![class % 8, command % 8];
                bytes.extend_from_slice(&data);
                dut.ctrl(&bytes);
            }
            Op::Link(up) => dut.link(up),
            Op::Announce => dut.announce(),
            Op::SaveLoad => {
                let blob = dut.save();
                dut.load(&blob).expect("own state loads");
                assert_eq!(dut.save(), blob);
            }
        }
    }
    dut.check_round_trip();
}
