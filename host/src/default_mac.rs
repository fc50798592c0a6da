//! The device's MAC address when `--mac` does not give one.
//!
//! Derived from the machine's identity and the TAP's name: stable for the
//! same TAP on the same machine (a restarted device keeps its DHCP lease and
//! its neighbours' ARP entries), different for two TAPs (46 hashed bits:
//! a collision between two devices on one bridge is negligible), and
//! different on two machines whose TAPs share a name. A random MAC kept only
//! in the device state would change on every restart that does not restore
//! a state. Handover and swap keep whichever MAC the device has, because the
//! MAC is part of the device state.

use sandnic_device::Mac;

/// Where systemd (and dbus) keep the machine's stable identity.
const MACHINE_ID: [&str; 2] = ["/etc/machine-id", "/var/lib/dbus/machine-id"];

/// A locally administered unicast MAC for `tap_name` on this machine.
pub fn for_tap(tap_name: &str) -> Mac {
    let machine = MACHINE_ID
        .iter()
        .find_map(|path| std::fs::read_to_string(path).ok())
        .unwrap_or_default();
    from_identity(machine.trim(), tap_name)
}

/// The MAC for a TAP name on a machine: FNV-1a over both (a fixed,
/// documented hash, so the MAC does not change with the Rust version),
/// with the multicast bit cleared and the locally administered bit set.
pub fn from_identity(machine_id: &str, tap_name: &str) -> Mac {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    let bytes = machine_id.bytes().chain([0]).chain(tap_name.bytes());
    let hash = bytes.fold(OFFSET, |h, b| (h ^ u64::from(b)).wrapping_mul(PRIME));
    let h = hash.to_be_bytes();
    [(h[2] & 0xfc) | 0x02, h[3], h[4], h[5], h[6], h[7]]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unicast_and_locally_administered() {
        for tap in ["tap0", "tap1", "vnet17", ""] {
            let mac = from_identity("0123456789abcdef", tap);
            assert_eq!(mac[0] & 0x01, 0, "{mac:02x?}: unicast");
            assert_eq!(mac[0] & 0x02, 0x02, "{mac:02x?}: locally administered");
            assert!(sandnic_device::is_valid_unicast(&mac));
        }
    }

    #[test]
    fn stable_per_tap_and_different_between_taps_and_machines() {
        let a = from_identity("machine-a", "tap0");
        assert_eq!(a, from_identity("machine-a", "tap0"));
        assert_ne!(a, from_identity("machine-a", "tap1"));
        assert_ne!(a, from_identity("machine-b", "tap0"));
        // The separator keeps ("ab", "c") apart from ("a", "bc").
        assert_ne!(from_identity("ab", "c"), from_identity("a", "bc"));
    }

    #[test]
    fn a_thousand_taps_get_a_thousand_macs() {
        let macs: std::collections::HashSet<Mac> = (0..1000)
            .map(|i| from_identity("machine", &format!("tap{i}")))
            .collect();
        assert_eq!(macs.len(), 1000);
    }
}
