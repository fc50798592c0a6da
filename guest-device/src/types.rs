//! Plain-data types shared by the device model and its callers. They mirror
//! the WIT types one to one; `component.rs` converts at the boundary.

use serde::{Deserialize, Serialize};
use std::fmt;

pub type Mac = [u8; 6];

/// Most MAC addresses (unicast + multicast) the filter table keeps before it
/// falls back to "accept all of that kind", as QEMU does (MAC_TABLE_ENTRIES).
/// Bounded because the guest chooses how many it sends.
pub const MAC_TABLE_ENTRIES: usize = 64;
/// 4096 VLAN ids as 32-bit words.
pub const VLAN_WORDS: usize = 128;
/// Largest queue-pair count virtio-net allows (virtio 1.2 §5.1.4).
pub const MAX_QUEUE_PAIRS: u16 = 0x8000;
/// Smallest MTU a device may advertise (IPv4's minimum, as Linux enforces).
pub const MIN_MTU: u16 = 68;

pub fn is_multicast(mac: &Mac) -> bool {
    mac[0] & 1 == 1
}

pub fn is_valid_unicast(mac: &Mac) -> bool {
    !is_multicast(mac) && mac != &[0; 6]
}

pub fn format_mac(mac: &Mac) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// TAP offload flags (TUNSETOFFLOAD): what the backend can do, or what is
/// applied. A hand-written bit set to stay dependency-free.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Offloads(u8);

impl Offloads {
    pub const CSUM: Self = Self(1 << 0);
    pub const TSO4: Self = Self(1 << 1);
    pub const TSO6: Self = Self(1 << 2);
    pub const ECN: Self = Self(1 << 3);
    pub const UFO: Self = Self(1 << 4);
    const ALL_BITS: u8 = 0x1f;
    const NAMES: [(Self, &'static str); 5] = [
        (Self::CSUM, "csum"),
        (Self::TSO4, "tso4"),
        (Self::TSO6, "tso6"),
        (Self::ECN, "ecn"),
        (Self::UFO, "ufo"),
    ];

    pub const fn empty() -> Self {
        Self(0)
    }
    pub const fn all() -> Self {
        Self(Self::ALL_BITS)
    }
    pub const fn bits(self) -> u8 {
        self.0
    }
    pub fn from_bits(bits: u8) -> Option<Self> {
        (bits & !Self::ALL_BITS == 0).then_some(Self(bits))
    }
    pub const fn from_bits_truncate(bits: u8) -> Self {
        Self(bits & Self::ALL_BITS)
    }
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
    pub const fn is_empty(self) -> bool {
        self.0 == 0
    }
    pub fn names(self) -> Vec<&'static str> {
        Self::NAMES
            .iter()
            .filter(|(flag, _)| self.contains(*flag))
            .map(|(_, name)| *name)
            .collect()
    }
}

impl std::ops::BitOr for Offloads {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

impl std::ops::BitAnd for Offloads {
    type Output = Self;
    fn bitand(self, rhs: Self) -> Self {
        Self(self.0 & rhs.0)
    }
}

impl fmt::Debug for Offloads {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Offloads({})", self.names().join("|"))
    }
}

/// Compatibility properties (see the WIT `compat` record).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compat {
    pub local_migration: bool,
}

impl Default for Compat {
    fn default() -> Self {
        Self {
            local_migration: true,
        }
    }
}

/// The fixed configuration a device is created with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceConfig {
    pub mac: Mac,
    pub max_queue_pairs: u16,
    pub mtu: Option<u16>,
    pub backend_offloads: Offloads,
    pub compat: Compat,
}

impl DeviceConfig {
    /// Checks the ranges virtio-net allows. The host validates its own input
    /// before creating a device; this guards the device's invariants.
    pub fn validate(&self) -> Result<(), String> {
        if !is_valid_unicast(&self.mac) {
            return Err(format!(
                "mac {} is not a unicast address",
                format_mac(&self.mac)
            ));
        }
        if self.max_queue_pairs == 0 || self.max_queue_pairs > MAX_QUEUE_PAIRS {
            return Err(format!(
                "max queue pairs {} outside 1..={MAX_QUEUE_PAIRS}",
                self.max_queue_pairs
            ));
        }
        if let Some(mtu) = self.mtu {
            if mtu < MIN_MTU {
                return Err(format!("mtu {mtu} below {MIN_MTU}"));
            }
        }
        Ok(())
    }
}

/// The compiled receive filter the host applies per packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RxFilter {
    pub promisc: bool,
    pub all_multi: bool,
    pub all_uni: bool,
    pub no_multi: bool,
    pub no_uni: bool,
    pub no_bcast: bool,
    pub mac: Mac,
    pub unicast: Vec<Mac>,
    pub multicast: Vec<Mac>,
    pub unicast_overflow: bool,
    pub multicast_overflow: bool,
    pub vlan_filtering: bool,
    pub vlans: Vec<u32>,
}

impl Default for RxFilter {
    /// Every switch off, no addresses (the zero MAC), an empty VLAN table of
    /// the full [`VLAN_WORDS`] size: the base a filter is built on field by
    /// field. Not what a device starts with (that is promiscuous).
    fn default() -> Self {
        Self {
            promisc: false,
            all_multi: false,
            all_uni: false,
            no_multi: false,
            no_uni: false,
            no_bcast: false,
            mac: [0; 6],
            unicast: Vec::new(),
            multicast: Vec::new(),
            unicast_overflow: false,
            multicast_overflow: false,
            vlan_filtering: false,
            vlans: vec![0; VLAN_WORDS],
        }
    }
}

/// Something the host must do for the device (see the WIT `effect`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    SetRxFilter(RxFilter),
    SetTapOffloads(Offloads),
    SetVnetHdrLen(u32),
    EnableQueuePairs(u16),
    ConfigChanged,
    NeedsReset,
}

/// virtio-net control-queue acknowledgement values.
pub const ACK_OK: u8 = 0;
pub const ACK_ERR: u8 = 1;

/// A control command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlReply {
    pub ack: u8,
    pub effects: Vec<Effect>,
}

/// The result of a status write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusReply {
    pub status: u8,
    pub effects: Vec<Effect>,
}
