//! Control-queue commands: arbitrary bytes under an arbitrary negotiated
//! feature set (the first 8 input bytes choose the features the driver
//! tries to ack; the rest is the command).

#![no_main]
use libfuzzer_sys::fuzz_target;
use sandnic_fuzz::{config, with_device, Slot};

fuzz_target!(|data: &[u8]| {
    let Some((features, command)) = data.split_first_chunk::<8>() else { return };
    with_device(&config(2, Some(1500), 0x1f), Slot::Main, |dut| {
        let wanted = u64::from_le_bytes(*features);
        // A refused set leaves the device unnegotiated; commands must still
        // be answered (with ERR).
        let offered = dut.features();
        let _ = dut.set_features(wanted & offered);
        dut.ctrl(command);
        dut.check_round_trip();
    });
});
