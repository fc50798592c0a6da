//! A hostile component (built with the `hostile` feature) loops, allocates
//! without end, panics, recurses and returns out-of-range effects on
//! command. Each failure must be contained and reported, and the device must
//! come back exactly as it was before the failing call.

mod common;

use common::{full_config, sandboxed, Build, Dut};
use sandnic_device::ctrl::{CtrlCommand, RxSwitch};
use sandnic_device::hostile::*;
use sandnic_device::{DeviceConfig, ACK_ERR, ACK_OK};
use sandnic_host::sandbox::validate::Invalid;
use sandnic_host::sandbox::{DeviceError, SandboxError, SandboxedDevice, SwapError};

fn hostile_device() -> SandboxedDevice {
    let mut d = sandboxed(Build::Hostile, full_config());
    let acked = d.features();
    d.set_features(acked).unwrap();
    assert_eq!(
        d.ctrl(
            &CtrlCommand::Rx {
                switch: RxSwitch::Promisc,
                on: false
            }
            .encode()
        )
        .0,
        ACK_OK
    );
    assert_eq!(d.ctrl(&CtrlCommand::VlanAdd(33).encode()).0, ACK_OK);
    d
}

fn trigger(d: &mut SandboxedDevice, command: u8) -> SandboxError {
    let outcome = d.handle_ctrl(&[HOSTILE_CLASS, command]);
    assert_eq!(
        outcome.ack, ACK_ERR,
        "a failed command must be answered ERR"
    );
    assert!(
        outcome.effects.is_empty(),
        "no effects from a failed command"
    );
    outcome.failure.expect("the failure is reported")
}

/// Triggers a misbehaviour and checks it is classified as expected, that the
/// device state is exactly what it was, and that the device still works.
fn contained(command: u8, expected: impl Fn(&SandboxError) -> bool) {
    let mut d = hostile_device();
    let before = Dut::save(&mut d);
    let failure = trigger(&mut d, command);
    assert!(expected(&failure), "unexpected classification: {failure:?}");
    assert_eq!(d.stats().restores, 1);
    assert_eq!(
        Dut::save(&mut d),
        before,
        "restored instance has the pre-failure state"
    );
    assert!(!d.needs_reset());
    let (ack, effects) = d.ctrl(&CtrlCommand::VlanAdd(34).encode());
    assert_eq!(ack, ACK_OK, "restored instance serves commands");
    assert_eq!(effects.len(), 1);
}

#[test]
fn infinite_loop_runs_out_of_fuel() {
    contained(INFINITE_LOOP, |f| {
        matches!(
            f,
            SandboxError::OutOfFuel {
                call: "handle-ctrl"
            }
        )
    });
}

#[test]
fn unbounded_allocation_hits_the_memory_cap() {
    contained(UNBOUNDED_ALLOC, |f| {
        matches!(
            f,
            SandboxError::MemoryLimit {
                call: "handle-ctrl"
            }
        )
    });
}

#[test]
fn panic_is_a_trap_with_its_message() {
    contained(
        PANIC,
        |f| matches!(f, SandboxError::Trap { detail, .. } if detail.contains("deliberate panic")),
    );
}

#[test]
fn deep_recursion_overflows_the_wasm_stack() {
    contained(DEEP_RECURSION, |f| {
        matches!(f, SandboxError::StackOverflow { .. })
    });
}

#[test]
fn out_of_range_outputs_are_refused() {
    type Kind = fn(&Invalid) -> bool;
    let expected: [(u8, Kind); 5] = [
        (QUEUE_PAIRS_OUT_OF_RANGE, |w| {
            matches!(w, Invalid::QueuePairs { .. })
        }),
        (HUGE_RX_FILTER, |w| matches!(w, Invalid::AddressList { .. })),
        (BAD_VNET_HDR_LEN, |w| matches!(w, Invalid::VnetHdrLen(_))),
        (BAD_ACK, |w| *w == Invalid::Ack(7)),
        (EFFECT_FLOOD, |w| {
            matches!(w, Invalid::TooManyEffects { .. })
        }),
    ];
    for (command, kind) in expected {
        contained(
            command,
            |f| matches!(f, SandboxError::InvalidOutput { why, .. } if kind(why)),
        );
    }
}

#[test]
fn offloads_beyond_the_backend_are_refused() {
    let limited = DeviceConfig {
        backend_offloads: sandnic_device::Offloads::CSUM,
        ..full_config()
    };
    let mut d = sandboxed(Build::Hostile, limited);
    let failure = trigger(&mut d, UNSUPPORTED_OFFLOADS);
    assert!(
        matches!(
            failure,
            SandboxError::InvalidOutput {
                why: Invalid::OffloadsBeyondTap { .. },
                ..
            }
        ),
        "{failure}"
    );
}

#[test]
fn a_wrong_length_config_read_is_refused() {
    let mut d = hostile_device();
    match d.read_config(0xf0f0, 4) {
        Err(DeviceError::Sandbox(SandboxError::InvalidOutput {
            call: "read-config",
            why,
        })) => {
            assert_eq!(
                why,
                Invalid::ConfigLength {
                    got: 104,
                    requested: 4
                }
            )
        }
        other => panic!("expected an invalid-output error, got {other:?}"),
    }
    assert_eq!(d.read_config(0, 6).unwrap(), common::MAC.to_vec());
}

#[test]
fn restore_replays_past_a_checkpoint() {
    // More mutations than the replay log holds: the restore must combine a
    // folded checkpoint with the calls after it.
    let mut d = hostile_device();
    let limit = sandnic_host::sandbox::SandboxLimits::default().replay_log_len;
    for vid in 0..(limit as u16 * 2 + 7) {
        assert_eq!(d.ctrl(&CtrlCommand::VlanAdd(vid).encode()).0, ACK_OK);
    }
    assert!(d.stats().checkpoints >= 2);
    let before = Dut::save(&mut d);
    trigger(&mut d, PANIC);
    assert_eq!(Dut::save(&mut d), before);
}

#[test]
fn a_component_that_cannot_restore_its_state_leaves_a_reset_device() {
    // This hostile device loops whenever it loads a state (its MAC says so),
    // so after a checkpoint exists no restore can succeed.
    let config = DeviceConfig {
        mac: [0x02, 0xde, 0xad, 0, 0, 1],
        ..full_config()
    };
    let mut d = sandboxed(Build::Hostile, config);
    let acked = d.features();
    d.set_features(acked).unwrap();
    let limit = sandnic_host::sandbox::SandboxLimits::default().replay_log_len;
    for vid in 0..limit as u16 {
        d.ctrl(&CtrlCommand::VlanAdd(vid).encode());
    }
    trigger(&mut d, PANIC);
    assert!(d.needs_reset(), "state lost: the driver must be told");
    let (status, _) = Dut::set_status(&mut d, 0x0f);
    assert_ne!(status & sandnic_device::device::status::NEEDS_RESET, 0);
    Dut::reset(&mut d);
    assert!(!d.needs_reset());
    assert!(d.set_features(acked).is_ok(), "usable again after reset");
}

#[test]
fn swap_into_a_component_that_fails_while_loading_rolls_back() {
    let config = DeviceConfig {
        mac: [0x02, 0xde, 0xad, 0, 0, 2],
        ..full_config()
    };
    let mut d = sandboxed(Build::V1, config);
    let acked = d.features();
    d.set_features(acked).unwrap();
    d.ctrl(&CtrlCommand::VlanAdd(9).encode());
    let before = Dut::save(&mut d);
    match d.swap(common::component(Build::Hostile)) {
        Err(SwapError::Failed(SandboxError::OutOfFuel { call: "load" })) => {}
        other => panic!("expected an out-of-fuel failure in load, got {other:?}"),
    }
    assert_eq!(d.info().version, "0.1.0");
    assert_eq!(Dut::save(&mut d), before);
    assert_eq!(
        d.stats().restores,
        0,
        "the running instance was never touched"
    );
}

#[test]
fn the_component_gets_no_capabilities() {
    // Everything the component can reach is linked explicitly: loading a
    // module that is not a component, or garbage, fails cleanly.
    let runtime = common::runtime();
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bogus = dir.join("not-a-component.wasm");
    std::fs::write(&bogus, b"\0asm\x01\0\0\0").unwrap();
    let error = runtime
        .load(&sandnic_host::sandbox::ComponentSource::File(bogus))
        .err()
        .expect("refused");
    assert!(
        format!("{error:#}").contains("compiling component"),
        "{error:#}"
    );
}
