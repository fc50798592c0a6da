//! A device started without `--mac` gets its own MAC: locally administered,
//! derived from the machine and the TAP name (the same TAP gets the same
//! MAC after a restart, two TAPs get two), printed at start and in
//! `status`, served in the config space, and kept through swap and handover
//! because it is part of the device state.

use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, Sandnic, ScratchDir};
use sandnic::require_network;
use sandnic_host::sandbox::components::built;
use serde_json::json;

fn status_mac(sandnic: &Sandnic) -> String {
    let status = sandnic.api(json!({"cmd": "status"})).unwrap();
    status["mac"]
        .as_str()
        .expect("status has the mac")
        .to_string()
}

fn config_mac(nic: &mut TestNic) -> String {
    let config = nic.config(6).unwrap();
    let mac: [u8; 6] = config[..6].try_into().unwrap();
    sandnic_device::format_mac(&mac)
}

#[test]
fn each_device_gets_its_own_mac_and_keeps_it() {
    require_network!("each_device_gets_its_own_mac_and_keeps_it");
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.93.0.1/24").unwrap();
    ns.add_tap("tap1", "10.93.1.1/24").unwrap();
    let (dir0, dir1) = (ScratchDir::new().unwrap(), ScratchDir::new().unwrap());
    let first = Sandnic::serve_exactly(&ns, &dir0, &["--tap", "tap0"], &[]).unwrap();
    let second = Sandnic::serve_exactly(&ns, &dir1, &["--tap", "tap1"], &[]).unwrap();
    let (mac0, mac1) = (status_mac(&first), status_mac(&second));
    assert_ne!(mac0, mac1, "two TAPs, two MACs");
    for mac in [&mac0, &mac1] {
        assert_ne!(mac, "52:54:00:12:34:56", "not QEMU's well-known default");
        let first_byte = u8::from_str_radix(&mac[..2], 16).unwrap();
        assert_eq!(
            first_byte & 0x03,
            0x02,
            "{mac}: unicast, locally administered"
        );
    }
    assert_eq!(
        mac0,
        sandnic_device::format_mac(&sandnic_host::default_mac::for_tap("tap0"))
    );
    assert!(
        first.log().contains(&mac0),
        "printed at start: {}",
        first.log()
    );
    drop(second);

    // The same TAP after a restart: the same MAC.
    drop(first);
    let first = Sandnic::serve_exactly(&ns, &dir0, &["--tap", "tap0"], &[]).unwrap();
    assert_eq!(status_mac(&first), mac0, "stable across restarts");

    // Swap and handover keep it: the driver sees the same config space.
    let mut nic = TestNic::connect(&first.socket, &NicConfig::default()).unwrap();
    assert_eq!(config_mac(&mut nic), mac0);
    let v2 = built::v2();
    let swap = first.api(json!({"cmd": "swap", "component": v2})).unwrap();
    assert_eq!(swap["ok"], true, "{swap}");
    assert_eq!(status_mac(&first), mac0, "after swap");
    // The destination runs the component the source swapped to.
    let v2_arg = v2.to_str().unwrap();
    let (destination, path) =
        Sandnic::incoming(&ns, &dir0, "dest", &first, &["--component", v2_arg]).unwrap();
    let reply = first.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    assert_eq!(status_mac(&destination), mac0, "after handover");
    assert_eq!(config_mac(&mut nic), mac0, "config space after handover");
}
