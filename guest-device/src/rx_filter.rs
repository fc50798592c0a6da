//! Receive filtering: the state the control queue edits (RX mode, MAC tables,
//! VLAN table), its compiled form for the host, and the reference decision
//! `accepts` that the host's native filter must agree with.

use crate::types::{is_multicast, Mac, RxFilter, MAC_TABLE_ENTRIES, VLAN_WORDS};
use serde::{Deserialize, Serialize};

/// VIRTIO_NET_CTRL_RX switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxMode {
    pub promisc: bool,
    pub all_multi: bool,
    pub all_uni: bool,
    pub no_multi: bool,
    pub no_uni: bool,
    pub no_bcast: bool,
}

impl Default for RxMode {
    /// Promiscuous until the driver says otherwise, as QEMU does: a driver
    /// without CTRL_RX must still receive everything meant for it.
    fn default() -> Self {
        Self {
            promisc: true,
            all_multi: false,
            all_uni: false,
            no_multi: false,
            no_uni: false,
            no_bcast: false,
        }
    }
}

/// The MAC filter table as VIRTIO_NET_CTRL_MAC_TABLE_SET last set it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MacTable {
    pub unicast: Vec<Mac>,
    pub multicast: Vec<Mac>,
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
}

impl MacTable {
    /// Builds a table from the guest's two lists. Lists that do not fit in
    /// [`MAC_TABLE_ENTRIES`] turn into "accept all of that kind" instead of
    /// being stored: the table size is bounded whatever the guest sends.
    pub fn from_lists(unicast: Vec<Mac>, multicast: Vec<Mac>) -> Self {
        let mut table = Self::default();
        if unicast.len() <= MAC_TABLE_ENTRIES {
            table.unicast = unicast;
        } else {
            table.unicast_overflow = true;
        }
        if table.unicast.len() + multicast.len() <= MAC_TABLE_ENTRIES {
            table.multicast = multicast;
        } else {
            table.multicast_overflow = true;
        }
        table
    }

    pub fn fits(&self) -> bool {
        self.unicast.len() + self.multicast.len() <= MAC_TABLE_ENTRIES
    }
}

/// 4096-bit VLAN membership table.
///
/// Saved as one 512-byte msgpack binary (little-endian words) rather than
/// 128 separate integers: one copy instead of 128 encoder calls, which is
/// most of the cost of saving a typical device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VlanTable(pub Vec<u32>);

impl Serialize for VlanTable {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = self.0.iter().flat_map(|word| word.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for VlanTable {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = VlanTable;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("the VLAN table as bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, bytes: &[u8]) -> Result<VlanTable, E> {
                if !bytes.len().is_multiple_of(4) {
                    return Err(E::invalid_length(bytes.len(), &self));
                }
                let words = bytes
                    .chunks_exact(4)
                    .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]));
                Ok(VlanTable(words.collect()))
            }
        }
        deserializer.deserialize_bytes(Bytes)
    }
}

impl Default for VlanTable {
    fn default() -> Self {
        Self(vec![0; VLAN_WORDS])
    }
}

impl VlanTable {
    pub fn set(&mut self, vid: u16, member: bool) {
        let (word, bit) = (usize::from(vid >> 5), vid & 31);
        if member {
            self.0[word] |= 1 << bit;
        } else {
            self.0[word] &= !(1 << bit);
        }
    }

    pub fn contains(&self, vid: u16) -> bool {
        vlan_bit(&self.0, vid)
    }

    pub fn ids(&self) -> Vec<u16> {
        (0..4096u16).filter(|vid| self.contains(*vid)).collect()
    }
}

fn vlan_bit(words: &[u32], vid: u16) -> bool {
    words
        .get(usize::from(vid >> 5))
        .is_some_and(|word| word & (1 << (vid & 31)) != 0)
}

const ETHERTYPE_VLAN: u16 = 0x8100;
const BROADCAST: Mac = [0xff; 6];

/// The reference receive decision for an Ethernet frame (no virtio header),
/// following virtio 1.2 §5.1.6.5 and QEMU's receive_filter.
pub fn accepts(filter: &RxFilter, frame: &[u8]) -> bool {
    if filter.promisc {
        return true;
    }
    let Some(dest) = frame.get(..6).and_then(|d| <Mac>::try_from(d).ok()) else {
        return false;
    };
    if filter.vlan_filtering && !vlan_allowed(filter, frame) {
        return false;
    }
    if dest == BROADCAST {
        !filter.no_bcast
    } else if is_multicast(&dest) {
        !filter.no_multi
            && (filter.all_multi || filter.multicast_overflow || filter.multicast.contains(&dest))
    } else {
        !filter.no_uni
            && (filter.all_uni
                || filter.unicast_overflow
                || dest == filter.mac
                || filter.unicast.contains(&dest))
    }
}

/// Untagged frames always pass; tagged ones only for member VLAN ids.
fn vlan_allowed(filter: &RxFilter, frame: &[u8]) -> bool {
    match frame.get(12..16) {
        Some(tag) if u16::from_be_bytes([tag[0], tag[1]]) == ETHERTYPE_VLAN => {
            let vid = u16::from_be_bytes([tag[2], tag[3]]) & 0x0fff;
            vlan_bit(&filter.vlans, vid)
        }
        _ => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OWN: Mac = [0x52, 0x54, 0, 0, 0, 1];
    const OTHER: Mac = [0x52, 0x54, 0, 0, 0, 2];
    const MCAST: Mac = [0x01, 0x00, 0x5e, 0, 0, 0xfb];

    fn filter() -> RxFilter {
        RxFilter {
            mac: OWN,
            ..RxFilter::default()
        }
    }

    fn frame(dest: Mac, vlan: Option<u16>) -> Vec<u8> {
        let mut f = dest.to_vec();
        f.extend_from_slice(&OTHER);
        if let Some(vid) = vlan {
            f.extend_from_slice(&ETHERTYPE_VLAN.to_be_bytes());
            f.extend_from_slice(&vid.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.resize(60, 0);
        f
    }

    #[test]
    fn unicast_to_own_and_table_only() {
        let mut f = filter();
        assert!(accepts(&f, &frame(OWN, None)));
        assert!(!accepts(&f, &frame(OTHER, None)));
        f.unicast.push(OTHER);
        assert!(accepts(&f, &frame(OTHER, None)));
        f.no_uni = true;
        assert!(!accepts(&f, &frame(OWN, None)));
    }

    #[test]
    fn promisc_alluni_and_overflow_accept_foreign_unicast() {
        for tweak in [
            |f: &mut RxFilter| f.promisc = true,
            |f: &mut RxFilter| f.all_uni = true,
            |f: &mut RxFilter| f.unicast_overflow = true,
        ] {
            let mut f = filter();
            tweak(&mut f);
            assert!(accepts(&f, &frame(OTHER, None)));
        }
    }

    #[test]
    fn multicast_and_broadcast_rules() {
        let mut f = filter();
        assert!(accepts(&f, &frame(BROADCAST, None)));
        assert!(!accepts(&f, &frame(MCAST, None)));
        f.multicast.push(MCAST);
        assert!(accepts(&f, &frame(MCAST, None)));
        f.no_multi = true;
        assert!(!accepts(&f, &frame(MCAST, None)));
        assert!(
            accepts(&f, &frame(BROADCAST, None)),
            "NOMULTI leaves broadcast alone"
        );
        f.no_bcast = true;
        assert!(!accepts(&f, &frame(BROADCAST, None)));
        let mut f = filter();
        f.all_multi = true;
        assert!(accepts(&f, &frame(MCAST, None)));
    }

    #[test]
    fn vlan_table_filters_tagged_frames_only() {
        let mut f = filter();
        f.vlan_filtering = true;
        assert!(accepts(&f, &frame(OWN, None)));
        assert!(!accepts(&f, &frame(OWN, Some(100))));
        let mut table = VlanTable::default();
        table.set(100, true);
        f.vlans = table.0.clone();
        assert!(accepts(&f, &frame(OWN, Some(100))));
        assert!(
            accepts(&f, &frame(OWN, Some(0x2000 | 100))),
            "priority bits ignored"
        );
        assert!(!accepts(&f, &frame(OWN, Some(101))));
        table.set(100, false);
        assert_eq!(table.ids(), Vec::<u16>::new());
    }

    #[test]
    fn short_frames_are_dropped_unless_promisc() {
        let f = filter();
        assert!(!accepts(&f, &[0x52, 0x54]));
    }

    #[test]
    fn oversized_mac_lists_become_overflow() {
        let many: Vec<Mac> = (0..65u8).map(|i| [2, 0, 0, 0, 0, i]).collect();
        let t = MacTable::from_lists(many.clone(), vec![MCAST]);
        assert!(t.unicast_overflow && t.unicast.is_empty());
        assert_eq!(t.multicast, vec![MCAST]);
        let t = MacTable::from_lists(many[..60].to_vec(), vec![MCAST; 5]);
        assert!(!t.unicast_overflow && t.multicast_overflow && t.fits());
    }
}
