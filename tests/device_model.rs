//! The device model's behaviour (virtio 1.2 §5.1), each test written once
//! and run twice: on the native build, and in lockstep on the native build
//! and the sandboxed wasm component, which must answer identically.

mod common;

use common::{config, full_config, Dut, MAC as OWN_MAC};
use sandnic_device::ctrl::{CtrlCommand, RxSwitch};
use sandnic_device::device::status::*;
use sandnic_device::features::*;
const MAC: [u8; 6] = OWN_MAC;
const F_MAC: u64 = sandnic_device::features::MAC;
use sandnic_device::rx_filter::accepts;
use sandnic_device::state::{self, Saved};
use sandnic_device::{DeviceConfig, Effect, Offloads, RxFilter, ACK_ERR, ACK_OK};

/// What a Linux virtio_net driver acks from the full offer.
const LINUX_ACKS: u64 = VERSION_1
    | F_MAC
    | STATUS
    | MTU
    | CTRL_VQ
    | CTRL_RX
    | CTRL_RX_EXTRA
    | CTRL_VLAN
    | GUEST_ANNOUNCE
    | MQ
    | CTRL_MAC_ADDR
    | CTRL_GUEST_OFFLOADS
    | CSUM
    | GUEST_CSUM
    | GUEST_TSO4
    | GUEST_TSO6
    | GUEST_ECN
    | GUEST_UFO
    | HOST_TSO4
    | HOST_TSO6
    | HOST_ECN
    | HOST_UFO
    | MRG_RXBUF
    | EVENT_IDX
    | INDIRECT_DESC;

fn negotiated<D: Dut>(make: &impl Fn(DeviceConfig) -> D) -> D {
    let mut d = make(full_config());
    d.set_features(LINUX_ACKS).expect("Linux's feature set");
    let (status, _) = d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_ne!(status & FEATURES_OK, 0);
    d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    d
}

fn filter_of(effects: &[Effect]) -> RxFilter {
    effects
        .iter()
        .find_map(|e| match e {
            Effect::SetRxFilter(f) => Some(f.clone()),
            _ => None,
        })
        .expect("an rx filter effect")
}

fn current_filter<D: Dut>(d: &mut D) -> RxFilter {
    // A harmless command that reports the whole filter: NOBCAST off again.
    let (ack, effects) = d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::NoBcast,
            on: false,
        }
        .encode(),
    );
    assert_eq!(ack, ACK_OK);
    filter_of(&effects)
}

fn frame(dest: [u8; 6], vlan: Option<u16>) -> Vec<u8> {
    let mut f = dest.to_vec();
    f.extend_from_slice(&[0x02, 0, 0, 0, 0, 0x99]);
    if let Some(vid) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&vid.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(64, 0);
    f
}

/// An ERR must leave the saved state byte-identical.
fn assert_err_unchanged<D: Dut>(d: &mut D, command: &[u8]) {
    let before = d.save();
    let (ack, effects) = d.ctrl(command);
    assert_eq!(ack, ACK_ERR, "command {command:02x?} should fail");
    assert!(effects.is_empty());
    assert_eq!(
        d.save(),
        before,
        "state changed by refused command {command:02x?}"
    );
}

// ---- features --------------------------------------------------------------

fn offers_only_supported_features<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let bare = make(config(1, None, Offloads::empty())).features();
    assert_eq!(
        bare & (MTU | MQ | CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4),
        0
    );
    for bit in [
        VERSION_1,
        F_MAC,
        STATUS,
        CTRL_VQ,
        CTRL_RX,
        CTRL_RX_EXTRA,
        CTRL_VLAN,
        GUEST_ANNOUNCE,
        CTRL_MAC_ADDR,
        CTRL_GUEST_OFFLOADS,
        MRG_RXBUF,
        EVENT_IDX,
        INDIRECT_DESC,
    ] {
        assert_ne!(bare & bit, 0, "{:?} missing", names(bit));
    }
    assert_eq!(make(full_config()).features(), LINUX_ACKS);
    let csum_only = make(config(1, None, Offloads::CSUM)).features();
    assert_eq!(
        csum_only & (CSUM | GUEST_CSUM | HOST_TSO4 | GUEST_TSO4),
        CSUM | GUEST_CSUM
    );
    let no_csum = make(config(1, None, Offloads::TSO4 | Offloads::TSO6)).features();
    assert_eq!(
        no_csum & (HOST_TSO4 | GUEST_TSO4 | HOST_TSO6 | GUEST_TSO6),
        0,
        "TSO offered without its CSUM"
    );
}

fn invalid_acked_set_is_refused_and_features_ok_cleared<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = make(full_config());
    for bad in [
        VERSION_1 | GUEST_TSO4,
        VERSION_1 | CTRL_RX_EXTRA,
        VERSION_1 | CTRL_RX_EXTRA | CTRL_VQ,
        VERSION_1 | 1 << 40,
    ] {
        assert!(d.set_features(bad).is_err(), "{bad:#x} accepted");
        let (status, _) = d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
        assert_eq!(
            status & FEATURES_OK,
            0,
            "FEATURES_OK kept after refusing {bad:#x}"
        );
    }
    assert!(d.set_features(VERSION_1 | F_MAC).is_ok());
    let (status, _) = d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK);
    assert_eq!(status, ACKNOWLEDGE | DRIVER | FEATURES_OK);
}

fn renegotiating_an_accepted_set_never_fails<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    assert!(
        d.set_features(LINUX_ACKS).is_ok(),
        "same set again while DRIVER_OK"
    );
    assert!(
        d.set_features(VERSION_1).is_err(),
        "a different set after FEATURES_OK"
    );
    d.reset();
    assert!(d.set_features(LINUX_ACKS).is_ok(), "after reset");
    let blob = d.save();
    let mut fresh = make(full_config());
    fresh.load(&blob).unwrap();
    assert!(fresh.set_features(LINUX_ACKS).is_ok(), "after a state load");
}

fn negotiation_configures_the_datapath<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = make(full_config());
    let effects = d.set_features(LINUX_ACKS).unwrap();
    assert!(effects.contains(&Effect::SetVnetHdrLen(12)));
    assert!(effects.contains(&Effect::SetTapOffloads(Offloads::all())));
    assert!(effects.contains(&Effect::EnableQueuePairs(1)));
    assert!(filter_of(&effects).vlan_filtering);
    let mut legacy = make(config(1, None, Offloads::CSUM));
    let effects = legacy.set_features(CSUM | GUEST_CSUM).unwrap();
    assert!(effects.contains(&Effect::SetVnetHdrLen(10)));
    assert!(effects.contains(&Effect::SetTapOffloads(Offloads::CSUM)));
}

fn frontend_managed_control_queue_serves_all_pairs<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    // QEMU strips CTRL_VQ (it runs the control queue) but forwards MQ.
    let mut d = make(full_config());
    let effects = d
        .set_features(VERSION_1 | MQ | GUEST_ANNOUNCE | MRG_RXBUF | EVENT_IDX)
        .unwrap();
    assert!(effects.contains(&Effect::EnableQueuePairs(2)));
    assert!(
        filter_of(&effects).promisc,
        "no rx-mode commands will come: stay promiscuous"
    );
    assert!(d.announce().is_empty(), "the frontend announces by itself");
}

// ---- config space ----------------------------------------------------------

fn config_space_is_readable_before_features_ok<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = make(full_config());
    let bytes = d.read_config(0, 12).unwrap();
    assert_eq!(&bytes[..6], &MAC);
    assert_eq!(u16::from_le_bytes([bytes[6], bytes[7]]), 1, "link up");
    assert_eq!(
        u16::from_le_bytes([bytes[8], bytes[9]]),
        2,
        "max_virtqueue_pairs"
    );
    assert_eq!(u16::from_le_bytes([bytes[10], bytes[11]]), 1500, "mtu");
    assert_eq!(d.read_config(8, 2).unwrap(), vec![2, 0]);
    assert_eq!(d.read_config(12, 8).unwrap(), vec![0; 8]);
    assert!(d.read_config(200, 100).is_err());
}

fn generation_bumps_on_every_change<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    let g0 = d.generation();
    assert_eq!(d.link(false), vec![Effect::ConfigChanged]);
    let g1 = d.generation();
    assert!(g1 > g0);
    assert!(d.link(false).is_empty(), "no change, no notification");
    assert_eq!(d.generation(), g1);
    assert_eq!(d.read_config(6, 2).unwrap(), vec![0, 0]);
    d.link(true);
    assert_eq!(
        d.ctrl(&CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 7]).encode())
            .0,
        ACK_OK
    );
    let g2 = d.generation();
    assert!(g2 > g1 + 1);
    assert_eq!(d.read_config(0, 6).unwrap(), vec![2, 0, 0, 0, 0, 7]);
}

fn read_only_fields_refuse_writes<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    let g = d.generation();
    for (offset, data) in [
        (0u32, vec![2u8, 0, 0, 0, 0, 1]),
        (6, vec![0, 0]),
        (8, vec![1, 0]),
        (10, vec![0, 1]),
    ] {
        assert!(
            d.write_config(offset, &data).is_err(),
            "write at {offset} accepted"
        );
    }
    assert_eq!(d.generation(), g);
    // A legacy driver without CTRL_MAC_ADDR may write the mac.
    let mut legacy = make(full_config());
    legacy.set_features(F_MAC | STATUS).unwrap();
    let effects = legacy.write_config(3, &[0xaa, 0xbb, 0xcc]).unwrap();
    assert_eq!(
        filter_of(&effects).mac,
        [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc]
    );
    assert!(legacy.write_config(6, &[0, 0]).is_err());
}

/// Found by the `device_sequence` fuzz target: a legacy config write could
/// make the MAC multicast, and the saved state then did not load.
fn legacy_mac_write_cannot_make_a_multicast_mac<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = make(full_config());
    d.set_features(F_MAC | STATUS).unwrap();
    assert!(d.write_config(0, &[0x3b]).is_err());
    assert!(d.write_config(0, &[0; 6]).is_err(), "all-zero MAC");
    assert_eq!(d.read_config(0, 6).unwrap(), MAC.to_vec());
    let blob = d.save();
    assert!(make(full_config()).load(&blob).is_ok());
}

/// Found by the `device_sequence` fuzz target (sandbox mode): a refused
/// renegotiation after FEATURES_OK marked the features refused while
/// FEATURES_OK stayed set, a state `load` rejects.
fn refused_renegotiation_after_features_ok_keeps_a_loadable_state<D: Dut>(
    make: impl Fn(DeviceConfig) -> D,
) {
    let mut d = negotiated(&make);
    assert!(d.set_features(VERSION_1).is_err());
    let (status, _) = d.set_status(ACKNOWLEDGE | DRIVER | FEATURES_OK | DRIVER_OK);
    assert_ne!(status & FEATURES_OK, 0, "the accepted negotiation stands");
    let blob = d.save();
    let mut fresh = make(full_config());
    fresh.load(&blob).expect("the state loads");
    assert_eq!(fresh.save(), blob);
}

/// Found by the `device_sequence` fuzz target: renegotiating without
/// GUEST_ANNOUNCE (or MQ) left an announce pending (or several queue pairs
/// active), a state `load` rejects.
fn renegotiation_resets_feature_dependent_state<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = make(full_config());
    d.set_features(LINUX_ACKS).unwrap();
    assert_eq!(d.ctrl(&CtrlCommand::MqPairsSet(2).encode()).0, ACK_OK);
    assert_eq!(d.announce(), vec![Effect::ConfigChanged]);
    let effects = d.set_features(VERSION_1).unwrap();
    assert!(effects.contains(&Effect::EnableQueuePairs(1)));
    assert_eq!(
        d.read_config(6, 2).unwrap(),
        vec![1, 0],
        "no announce pending"
    );
    let blob = d.save();
    make(full_config()).load(&blob).expect("the state loads");
}

// ---- control queue ---------------------------------------------------------

fn rx_mode_commands<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    let foreign = frame([0x52, 0x54, 0, 0, 0, 0x77], None);
    assert!(
        accepts(&current_filter(&mut d), &foreign),
        "promiscuous until told otherwise"
    );
    let (ack, effects) = d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    assert_eq!(ack, ACK_OK);
    let filter = filter_of(&effects);
    assert!(!accepts(&filter, &foreign));
    assert!(accepts(&filter, &frame(MAC, None)));
    for (switch, field) in [
        (
            RxSwitch::AllMulti,
            (|f: &RxFilter| f.all_multi) as fn(&RxFilter) -> bool,
        ),
        (RxSwitch::AllUni, |f| f.all_uni),
        (RxSwitch::NoMulti, |f| f.no_multi),
        (RxSwitch::NoUni, |f| f.no_uni),
        (RxSwitch::NoBcast, |f| f.no_bcast),
        (RxSwitch::Promisc, |f| f.promisc),
    ] {
        let (ack, effects) = d.ctrl(&CtrlCommand::Rx { switch, on: true }.encode());
        assert_eq!(ack, ACK_OK);
        assert!(field(&filter_of(&effects)), "{switch:?}");
        let (_, effects) = d.ctrl(&CtrlCommand::Rx { switch, on: false }.encode());
        assert!(!field(&filter_of(&effects)), "{switch:?} off");
    }
    // The extra switches need CTRL_RX_EXTRA.
    let mut basic = make(full_config());
    basic.set_features(VERSION_1 | CTRL_VQ | CTRL_RX).unwrap();
    assert_eq!(
        basic
            .ctrl(
                &CtrlCommand::Rx {
                    switch: RxSwitch::AllMulti,
                    on: true
                }
                .encode()
            )
            .0,
        ACK_OK
    );
    assert_err_unchanged(
        &mut basic,
        &CtrlCommand::Rx {
            switch: RxSwitch::NoUni,
            on: true,
        }
        .encode(),
    );
    assert_err_unchanged(&mut basic, &[0, 0, 1, 0]);
}

fn mac_table_set<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    let extra = [0x52, 0x54, 0, 0, 0, 0x42];
    let group = [0x01, 0x00, 0x5e, 0x00, 0x00, 0xfb];
    let (ack, effects) = d.ctrl(
        &CtrlCommand::MacTableSet {
            unicast: vec![extra],
            multicast: vec![group],
        }
        .encode(),
    );
    assert_eq!(ack, ACK_OK);
    let filter = filter_of(&effects);
    assert!(accepts(&filter, &frame(extra, None)));
    assert!(accepts(&filter, &frame(group, None)));
    assert!(!accepts(&filter, &frame([0x01, 0x00, 0x5e, 0, 0, 1], None)));
    // CVE-2014-0150: counts larger than the payload.
    let mut overflow = vec![1, 0];
    overflow.extend_from_slice(&u32::MAX.to_le_bytes());
    overflow.extend_from_slice(&[0xff; 64]);
    assert_err_unchanged(&mut d, &overflow);
    let mut short = CtrlCommand::MacTableSet {
        unicast: vec![extra; 2],
        multicast: vec![],
    }
    .encode();
    short.truncate(short.len() - 4 - 1);
    short.extend_from_slice(&0u32.to_le_bytes());
    assert_err_unchanged(&mut d, &short);
    let mut long = CtrlCommand::MacTableSet {
        unicast: vec![],
        multicast: vec![group],
    }
    .encode();
    long.push(0);
    assert_err_unchanged(&mut d, &long);
    // More addresses than the table holds: accept all of that kind.
    let many: Vec<[u8; 6]> = (0..100u8).map(|i| [0x01, 0, 0x5e, 0, 1, i]).collect();
    let (ack, effects) = d.ctrl(
        &CtrlCommand::MacTableSet {
            unicast: vec![],
            multicast: many,
        }
        .encode(),
    );
    assert_eq!(ack, ACK_OK);
    let filter = filter_of(&effects);
    assert!(filter.multicast_overflow && filter.multicast.is_empty());
    assert!(accepts(&filter, &frame([0x01, 0, 0x5e, 9, 9, 9], None)));
}

fn mac_addr_set<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    let new = [0x02, 0x11, 0x22, 0x33, 0x44, 0x55];
    let (ack, effects) = d.ctrl(&CtrlCommand::MacAddrSet(new).encode());
    assert_eq!(ack, ACK_OK);
    let filter = filter_of(&effects);
    assert!(accepts(&filter, &frame(new, None)) && !accepts(&filter, &frame(MAC, None)));
    assert_err_unchanged(
        &mut d,
        &CtrlCommand::MacAddrSet([0x01, 0, 0, 0, 0, 1]).encode(),
    );
    assert_err_unchanged(&mut d, &CtrlCommand::MacAddrSet([0; 6]).encode());
    assert_err_unchanged(&mut d, &[1, 1, 2, 0, 0, 0, 0]);
    let mut no_feature = make(full_config());
    no_feature
        .set_features(VERSION_1 | CTRL_VQ | CTRL_RX)
        .unwrap();
    assert_err_unchanged(&mut no_feature, &CtrlCommand::MacAddrSet(new).encode());
}

fn vlan_table<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    assert!(
        !accepts(&current_filter(&mut d), &frame(MAC, Some(100))),
        "table starts empty"
    );
    let (ack, effects) = d.ctrl(&CtrlCommand::VlanAdd(100).encode());
    assert_eq!(ack, ACK_OK);
    let filter = filter_of(&effects);
    assert!(accepts(&filter, &frame(MAC, Some(100))));
    assert!(!accepts(&filter, &frame(MAC, Some(200))));
    assert!(accepts(&filter, &frame(MAC, None)), "untagged frames pass");
    let (_, effects) = d.ctrl(&CtrlCommand::VlanDel(100).encode());
    assert!(!accepts(&filter_of(&effects), &frame(MAC, Some(100))));
    d.ctrl(&CtrlCommand::VlanAdd(4095).encode());
    assert_err_unchanged(&mut d, &CtrlCommand::VlanAdd(4096).encode());
    assert_err_unchanged(&mut d, &CtrlCommand::VlanDel(0xffff).encode());
    assert_err_unchanged(&mut d, &[2, 0, 1]);
}

fn announce_and_ack<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    assert_eq!(d.announce(), vec![Effect::ConfigChanged]);
    assert_eq!(
        d.read_config(6, 2).unwrap(),
        vec![3, 0],
        "LINK_UP | ANNOUNCE"
    );
    assert_eq!(d.ctrl(&CtrlCommand::AnnounceAck.encode()).0, ACK_OK);
    assert_eq!(d.read_config(6, 2).unwrap(), vec![1, 0]);
    assert_err_unchanged(&mut d, &[3, 0, 0]);
    assert_err_unchanged(&mut d, &[3, 1]);
    let mut no_feature = make(full_config());
    no_feature.set_features(VERSION_1 | CTRL_VQ).unwrap();
    assert!(no_feature.announce().is_empty());
    assert_err_unchanged(&mut no_feature, &CtrlCommand::AnnounceAck.encode());
}

fn multiqueue_pairs<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    let (ack, effects) = d.ctrl(&CtrlCommand::MqPairsSet(2).encode());
    assert_eq!((ack, effects), (ACK_OK, vec![Effect::EnableQueuePairs(2)]));
    assert_err_unchanged(&mut d, &CtrlCommand::MqPairsSet(0).encode());
    assert_err_unchanged(&mut d, &CtrlCommand::MqPairsSet(3).encode());
    assert_err_unchanged(&mut d, &[4, 0, 1]);
    assert_err_unchanged(&mut d, &[4, 1, 0, 0]);
    let mut single = make(config(1, None, Offloads::empty()));
    single.set_features(VERSION_1 | CTRL_VQ).unwrap();
    assert_err_unchanged(&mut single, &CtrlCommand::MqPairsSet(1).encode());
}

fn guest_offloads<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    let (ack, effects) = d.ctrl(&CtrlCommand::GuestOffloadsSet(GUEST_CSUM).encode());
    assert_eq!(
        (ack, effects),
        (ACK_OK, vec![Effect::SetTapOffloads(Offloads::CSUM)])
    );
    let (ack, effects) =
        d.ctrl(&CtrlCommand::GuestOffloadsSet(GUEST_CSUM | GUEST_TSO4 | GUEST_ECN).encode());
    assert_eq!(ack, ACK_OK);
    assert_eq!(
        effects,
        vec![Effect::SetTapOffloads(
            Offloads::CSUM | Offloads::TSO4 | Offloads::ECN
        )]
    );
    assert_err_unchanged(&mut d, &CtrlCommand::GuestOffloadsSet(GUEST_TSO4).encode());
    assert_err_unchanged(
        &mut d,
        &CtrlCommand::GuestOffloadsSet(HOST_TSO4 | GUEST_CSUM).encode(),
    );
    let mut partial = make(full_config());
    partial
        .set_features(VERSION_1 | CTRL_VQ | CTRL_GUEST_OFFLOADS | GUEST_CSUM)
        .unwrap();
    assert_err_unchanged(
        &mut partial,
        &CtrlCommand::GuestOffloadsSet(GUEST_CSUM | GUEST_TSO4).encode(),
    );
    assert_eq!(
        partial.ctrl(&CtrlCommand::GuestOffloadsSet(0).encode()).0,
        ACK_OK
    );
}

fn malformed_commands_are_refused_without_change<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    for command in [
        &[][..],
        &[0],
        &[9, 0],
        &[0, 6, 1],
        &[6, 0, 0, 0],
        &[0xff, 0xff],
        &[5, 0, 1],
        &[5, 1, 0, 0, 0, 0, 0, 0, 0, 0],
    ] {
        assert_err_unchanged(&mut d, command);
    }
    // Nothing negotiated: every command is refused.
    let mut fresh = make(full_config());
    assert_err_unchanged(
        &mut fresh,
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
}

fn reset_returns_to_initial_state<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    d.ctrl(&CtrlCommand::MqPairsSet(2).encode());
    d.ctrl(&CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 9]).encode());
    let effects = d.reset();
    assert!(effects.contains(&Effect::EnableQueuePairs(1)));
    assert!(filter_of(&effects).promisc);
    assert_eq!(d.read_config(0, 6).unwrap(), MAC.to_vec());
    assert_eq!(d.set_status(0).0, 0);
}

fn queue_enable_is_tracked_in_the_state<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    for q in [0, 1, 4] {
        assert!(d.queue_enabled(q, true).is_empty());
    }
    d.queue_enabled(1, false);
    d.queue_enabled(999, true);
    let value = common::described(&mut d);
    assert_eq!(value["enabled_queues"], serde_json::json!([0, 4]));
}

// ---- saved state -----------------------------------------------------------

fn save_load_round_trips<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(
        &CtrlCommand::Rx {
            switch: RxSwitch::Promisc,
            on: false,
        }
        .encode(),
    );
    d.ctrl(
        &CtrlCommand::MacTableSet {
            unicast: vec![[2, 0, 0, 0, 0, 1]],
            multicast: vec![[1, 0, 0x5e, 0, 0, 1]],
        }
        .encode(),
    );
    d.ctrl(&CtrlCommand::VlanAdd(7).encode());
    d.ctrl(&CtrlCommand::MqPairsSet(2).encode());
    d.ctrl(&CtrlCommand::GuestOffloadsSet(GUEST_CSUM).encode());
    d.announce();
    let blob = d.save();
    let mut other = make(full_config());
    let effects = other.load(&blob).unwrap();
    assert!(effects.contains(&Effect::EnableQueuePairs(2)));
    assert!(effects.contains(&Effect::SetTapOffloads(Offloads::CSUM)));
    assert_eq!(other.save(), blob);
    assert_eq!(
        other.read_config(0, 12).unwrap(),
        d.read_config(0, 12).unwrap()
    );
}

fn corrupt_states_are_refused_and_change_nothing<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut source = negotiated(&make);
    source.ctrl(&CtrlCommand::MqPairsSet(2).encode());
    let good = source.save();
    let mut target = make(full_config());
    let before = target.save();
    let mutate = |f: &dyn Fn(&mut Saved)| {
        let mut saved = state::decode(&good).unwrap();
        f(&mut saved);
        state::encode_saved(&saved)
    };
    let corrupt: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("garbage", vec![0xc1; 40]),
        (
            "wrong format",
            rmp_serde::to_vec(&("other-device", 1u32, ())).unwrap(),
        ),
        (
            "future version",
            rmp_serde::to_vec(&(state::FORMAT, 99u32, ())).unwrap(),
        ),
        (
            "version zero",
            rmp_serde::to_vec(&(state::FORMAT, 0u32, ())).unwrap(),
        ),
        ("oversized", vec![0x90; state::MAX_STATE_LEN + 1]),
        (
            "queue pairs 0",
            mutate(&|s| s.v1_mut().state.queue_pairs = 0),
        ),
        (
            "queue pairs > max",
            mutate(&|s| s.v1_mut().state.queue_pairs = 3),
        ),
        (
            "short vlan table",
            mutate(&|s| s.v1_mut().state.vlans.0.truncate(5)),
        ),
        (
            "huge mac table",
            mutate(&|s| s.v1_mut().state.mac_table.unicast = vec![[2, 0, 0, 0, 0, 1]; 65]),
        ),
        (
            "acked not offered",
            mutate(&|s| s.v1_mut().state.acked |= 1 << 41),
        ),
        (
            "acked breaks dependency",
            mutate(&|s| s.v1_mut().state.acked &= !GUEST_CSUM),
        ),
        (
            "multicast mac",
            mutate(&|s| s.v1_mut().state.mac = [1, 0, 0, 0, 0, 1]),
        ),
        (
            "unknown status bits",
            mutate(&|s| s.v1_mut().state.status |= 0x30),
        ),
        (
            "offloads not negotiated",
            mutate(&|s| s.v1_mut().state.guest_offloads = HOST_TSO4),
        ),
        (
            "other mac",
            mutate(&|s| s.v1_mut().config.mac = [2, 9, 9, 9, 9, 9]),
        ),
        (
            "other queue count",
            mutate(&|s| s.v1_mut().config.max_queue_pairs = 4),
        ),
        (
            "enabled queue out of range",
            mutate(&|s| s.v1_mut().state.enabled_queues = vec![5]),
        ),
        (
            "local-migration contradicts",
            mutate(&|s| s.v1_mut().local_migration.as_mut().unwrap().vnet_hdr_len = 10),
        ),
    ];
    for (what, blob) in corrupt {
        let error = target.load(&blob).expect_err(what);
        assert!(!error.is_empty(), "{what}: empty error");
        assert_eq!(
            target.save(),
            before,
            "{what}: state changed by a refused load"
        );
    }
}

fn describe_renders_json<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut d = negotiated(&make);
    d.ctrl(&CtrlCommand::VlanAdd(42).encode());
    let json = common::described(&mut d);
    assert_eq!(json["version"], 1);
    assert_eq!(json["mac"], "52:54:00:12:34:56");
    assert_eq!(json["vlans"], serde_json::json!([42]));
    assert!(json["features"]["acked"]
        .as_array()
        .unwrap()
        .contains(&"CTRL_VQ".into()));
    assert_eq!(
        json["status"],
        serde_json::json!(["ACKNOWLEDGE", "DRIVER", "DRIVER_OK", "FEATURES_OK"])
    );
    assert!(d
        .describe(b"not a state")
        .unwrap_err()
        .contains("not a sandnic device state"));
}

fn local_migration_compat_property<D: Dut>(make: impl Fn(DeviceConfig) -> D) {
    let mut with = negotiated(&make);
    let blob_with = with.save();
    let off = DeviceConfig {
        compat: sandnic_device::Compat {
            local_migration: false,
        },
        ..full_config()
    };
    let mut without = make(off.clone());
    without.set_features(LINUX_ACKS).unwrap();
    let blob_without = without.save();
    let describe = |d: &mut D, b: &[u8]| {
        serde_json::from_str::<serde_json::Value>(&d.describe(b).unwrap()).unwrap()
    };
    assert_eq!(
        describe(&mut with, &blob_with)["local_migration"]["vnet_hdr_len"],
        12
    );
    assert!(describe(&mut with, &blob_without)["local_migration"].is_null());
    let error = make(off).load(&blob_with).unwrap_err();
    assert!(error.contains("local-migration"), "{error}");
    assert!(
        make(full_config()).load(&blob_without).is_ok(),
        "older stream without the section still loads"
    );
}

macro_rules! on_native_and_differential {
    ($($test:ident),* $(,)?) => {
        mod native {
            $(#[test] fn $test() { super::$test(|c| sandnic_device::NetDevice::new(c).unwrap()); })*
        }
        mod differential {
            $(#[test] fn $test() { super::$test(crate::common::Lockstep::new); })*
        }
    };
}

on_native_and_differential!(
    offers_only_supported_features,
    invalid_acked_set_is_refused_and_features_ok_cleared,
    renegotiating_an_accepted_set_never_fails,
    negotiation_configures_the_datapath,
    frontend_managed_control_queue_serves_all_pairs,
    config_space_is_readable_before_features_ok,
    generation_bumps_on_every_change,
    read_only_fields_refuse_writes,
    legacy_mac_write_cannot_make_a_multicast_mac,
    refused_renegotiation_after_features_ok_keeps_a_loadable_state,
    renegotiation_resets_feature_dependent_state,
    rx_mode_commands,
    mac_table_set,
    mac_addr_set,
    vlan_table,
    announce_and_ack,
    multiqueue_pairs,
    guest_offloads,
    malformed_commands_are_refused_without_change,
    reset_returns_to_initial_state,
    queue_enable_is_tracked_in_the_state,
    save_load_round_trips,
    corrupt_states_are_refused_and_change_nothing,
    describe_renders_json,
    local_migration_compat_property,
);
