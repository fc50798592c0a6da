//! Saved-state compatibility across device versions: every released state
//! version is kept as a fixture and must keep loading; newer states must be
//! refused by older devices with a clear error; hot swap between versions.
//!
//! Regenerate the fixtures (only when a new state version is released):
//! `SANDNIC_WRITE_FIXTURES=1 cargo test --test state_versions -- --ignored`

mod common;

use common::{full_config, sandboxed, Build, Dut};
use sandnic_device::ctrl::{CtrlCommand, RxSwitch};
use sandnic_device::features::*;
use sandnic_host::sandbox::{SandboxedDevice, SwapError};

const FIXTURES: [(&str, Build, u32); 2] = [
    ("device-state-v1.msgpack", Build::V1, 1),
    ("device-state-v2.msgpack", Build::V2, 2),
];

/// A device with something in every part of its state.
fn busy_device(build: Build) -> SandboxedDevice {
    let mut d = sandboxed(build, full_config());
    let acked = d.features();
    d.set_features(acked).unwrap();
    Dut::set_status(&mut d, 0x0f);
    for command in [
        CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        },
        CtrlCommand::Rx {
            switch: RxSwitch::AllMulti,
            on: true,
        },
        CtrlCommand::MacTableSet {
            unicast: vec![[0x52, 0x54, 0, 0, 0, 0x42]],
            multicast: vec![[0x01, 0, 0x5e, 0, 0, 0xfb], [0x33, 0x33, 0, 0, 0, 1]],
        },
        CtrlCommand::VlanAdd(100),
        CtrlCommand::VlanAdd(4000),
        CtrlCommand::MqPairsSet(2),
        CtrlCommand::GuestOffloadsSet(GUEST_CSUM | GUEST_TSO4),
    ] {
        assert_eq!(
            d.ctrl(&command.encode()).0,
            sandnic_device::ACK_OK,
            "{command:?}"
        );
    }
    for q in 0..5 {
        Dut::queue_enabled(&mut d, q, true);
    }
    Dut::announce(&mut d);
    d
}

#[test]
#[ignore = "writes tests/fixtures; run with SANDNIC_WRITE_FIXTURES=1"]
fn write_fixtures() {
    assert_eq!(
        std::env::var("SANDNIC_WRITE_FIXTURES").as_deref(),
        Ok("1"),
        "set SANDNIC_WRITE_FIXTURES=1"
    );
    for (name, build, _) in FIXTURES {
        let blob = Dut::save(&mut busy_device(build));
        std::fs::create_dir_all(common::fixture("")).unwrap();
        std::fs::write(common::fixture(name), blob).unwrap();
    }
}

fn fixture(name: &str) -> Vec<u8> {
    std::fs::read(common::fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
}

#[test]
fn every_fixture_loads_in_every_device_that_supports_its_version() {
    for (name, _, version) in FIXTURES {
        let blob = fixture(name);
        for (build, newest) in [(Build::V1, 1), (Build::V2, 2)] {
            let mut d = sandboxed(build, full_config());
            let result = Dut::load(&mut d, &blob);
            if version <= newest {
                let effects = result.unwrap_or_else(|e| panic!("{build:?} refused {name}: {e}"));
                assert!(
                    effects.contains(&sandnic_device::Effect::EnableQueuePairs(2)),
                    "{name} in {build:?}"
                );
                let json: serde_json::Value =
                    serde_json::from_str(&Dut::describe(&mut d, &blob).unwrap()).unwrap();
                assert_eq!(json["version"], version);
                assert_eq!(json["vlans"], serde_json::json!([100, 4000]));
                assert_eq!(json["queue_pairs"], 2);
                assert_eq!(
                    Dut::read_config(&mut d, 6, 2).unwrap(),
                    vec![3, 0],
                    "link + announce restored"
                );
            } else {
                let error = result.expect_err("newer state accepted");
                assert!(
                    error.contains(&format!("state version {version} is newer")),
                    "{error}"
                );
            }
        }
    }
}

#[test]
fn a_v1_fixture_upgrades_to_v2_on_save() {
    let mut d = sandboxed(Build::V2, full_config());
    Dut::load(&mut d, &fixture("device-state-v1.msgpack")).unwrap();
    let json = common::described(&mut d);
    assert_eq!(json["version"], 2);
    assert_eq!(
        json["announce_count"], 0,
        "field added in v2 starts at zero"
    );
}

#[test]
fn native_v1_and_the_v1_component_agree_on_the_fixture() {
    let blob = fixture("device-state-v1.msgpack");
    let mut both = common::Lockstep::new(full_config());
    both.load(&blob).unwrap();
    assert_eq!(
        both.save(),
        blob,
        "load then save reproduces the released v1 bytes"
    );
}

#[test]
fn swap_v1_to_v2_keeps_the_device_state() {
    let mut d = busy_device(Build::V1);
    let config_before = Dut::read_config(&mut d, 0, 12).unwrap();
    let report = d.swap(common::component(Build::V2)).expect("swap to v2");
    assert_eq!(
        (report.from.version.as_str(), report.to.version.as_str()),
        ("0.1.0", "0.2.0")
    );
    assert_eq!(report.to.state_version, 2);
    assert!(report
        .effects
        .contains(&sandnic_device::Effect::EnableQueuePairs(2)));
    assert_eq!(Dut::read_config(&mut d, 0, 12).unwrap(), config_before);
    let json = common::described(&mut d);
    assert_eq!(json["version"], 2);
    assert_eq!(json["queue_pairs"], 2);
    assert_eq!(json["mac_table"]["multicast"].as_array().unwrap().len(), 2);
    // The new version works: announce counts in its new field.
    Dut::ctrl(&mut d, &CtrlCommand::AnnounceAck.encode());
    Dut::announce(&mut d);
    let json = common::described(&mut d);
    assert_eq!(json["announce_count"], 1);
}

#[test]
fn swap_to_an_older_incompatible_version_is_refused_and_changes_nothing() {
    let mut d = busy_device(Build::V2);
    let before = Dut::save(&mut d);
    match d.swap(common::component(Build::V1)) {
        Err(SwapError::Refused(why)) => assert!(why.contains("state version 2 is newer"), "{why}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(d.info().version, "0.2.0", "still the v2 component");
    assert_eq!(Dut::save(&mut d), before, "state untouched");
    assert_eq!(
        Dut::ctrl(&mut d, &CtrlCommand::VlanAdd(5).encode()).0,
        sandnic_device::ACK_OK,
        "still serving"
    );
}
