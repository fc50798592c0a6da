//! Device-state `load` from arbitrary bytes. The seed corpus holds valid
//! blobs of every state version, so libFuzzer's mutations also produce
//! mutated valid blobs. A refused load must change nothing; an accepted one
//! must round-trip.

#![no_main]
use libfuzzer_sys::fuzz_target;
use sandnic_fuzz::{config, with_device, Slot};

fuzz_target!(|data: &[u8]| {
    // The fixtures' device: two pairs, MTU 1500, every offload.
    with_device(&config(2, Some(1500), 0x1f), Slot::Main, |dut| {
        let before = dut.save();
        match dut.load(data) {
            Ok(_) => dut.check_round_trip(),
            Err(why) => {
                assert!(!why.is_empty());
                assert_eq!(dut.save(), before, "a refused load changed the state");
            }
        }
    });
    let _ = sandnic_device::state::describe(data);
});
