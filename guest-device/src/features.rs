//! Feature bits (virtio 1.2 §5.1.3, §6) and the rules of negotiation.
//!
//! Two sets matter: what the device *offers* (derived once from its
//! configuration and the backend's capabilities) and what the driver *acks*.
//! The rules here are the only place that decides whether an acked set is
//! acceptable.

use crate::types::{DeviceConfig, Offloads};

pub const CSUM: u64 = 1 << 0;
pub const GUEST_CSUM: u64 = 1 << 1;
pub const CTRL_GUEST_OFFLOADS: u64 = 1 << 2;
pub const MTU: u64 = 1 << 3;
pub const MAC: u64 = 1 << 5;
pub const GUEST_TSO4: u64 = 1 << 7;
pub const GUEST_TSO6: u64 = 1 << 8;
pub const GUEST_ECN: u64 = 1 << 9;
pub const GUEST_UFO: u64 = 1 << 10;
pub const HOST_TSO4: u64 = 1 << 11;
pub const HOST_TSO6: u64 = 1 << 12;
pub const HOST_ECN: u64 = 1 << 13;
pub const HOST_UFO: u64 = 1 << 14;
pub const MRG_RXBUF: u64 = 1 << 15;
pub const STATUS: u64 = 1 << 16;
pub const CTRL_VQ: u64 = 1 << 17;
pub const CTRL_RX: u64 = 1 << 18;
pub const CTRL_VLAN: u64 = 1 << 19;
pub const CTRL_RX_EXTRA: u64 = 1 << 20;
pub const GUEST_ANNOUNCE: u64 = 1 << 21;
pub const MQ: u64 = 1 << 22;
pub const CTRL_MAC_ADDR: u64 = 1 << 23;
pub const INDIRECT_DESC: u64 = 1 << 28;
pub const EVENT_IDX: u64 = 1 << 29;
pub const VERSION_1: u64 = 1 << 32;

/// Guest receive offloads: the bits VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET may
/// name, and their TAP (TUNSETOFFLOAD) counterparts.
pub const GUEST_OFFLOAD_MAP: [(u64, Offloads); 5] = [
    (GUEST_CSUM, Offloads::CSUM),
    (GUEST_TSO4, Offloads::TSO4),
    (GUEST_TSO6, Offloads::TSO6),
    (GUEST_ECN, Offloads::ECN),
    (GUEST_UFO, Offloads::UFO),
];
pub const GUEST_OFFLOADS: u64 = GUEST_CSUM | GUEST_TSO4 | GUEST_TSO6 | GUEST_ECN | GUEST_UFO;

const HOST_OFFLOAD_MAP: [(u64, Offloads); 5] = [
    (CSUM, Offloads::CSUM),
    (HOST_TSO4, Offloads::TSO4),
    (HOST_TSO6, Offloads::TSO6),
    (HOST_ECN, Offloads::ECN),
    (HOST_UFO, Offloads::UFO),
];

/// `(feature, requires any of)` — virtio 1.2 §5.1.3.1.
const DEPENDENCIES: [(u64, u64); 11] = [
    (GUEST_TSO4, GUEST_CSUM),
    (GUEST_TSO6, GUEST_CSUM),
    (GUEST_ECN, GUEST_TSO4 | GUEST_TSO6),
    (GUEST_UFO, GUEST_CSUM),
    (HOST_TSO4, CSUM),
    (HOST_TSO6, CSUM),
    (HOST_ECN, HOST_TSO4 | HOST_TSO6),
    (HOST_UFO, CSUM),
    (CTRL_RX_EXTRA, CTRL_RX),
    (CTRL_RX, CTRL_VQ),
    (CTRL_VLAN, CTRL_VQ),
];

/// Names for humans (describe, errors), in bit order.
pub const NAMES: [(u64, &str); 25] = [
    (CSUM, "CSUM"),
    (GUEST_CSUM, "GUEST_CSUM"),
    (CTRL_GUEST_OFFLOADS, "CTRL_GUEST_OFFLOADS"),
    (MTU, "MTU"),
    (MAC, "MAC"),
    (GUEST_TSO4, "GUEST_TSO4"),
    (GUEST_TSO6, "GUEST_TSO6"),
    (GUEST_ECN, "GUEST_ECN"),
    (GUEST_UFO, "GUEST_UFO"),
    (HOST_TSO4, "HOST_TSO4"),
    (HOST_TSO6, "HOST_TSO6"),
    (HOST_ECN, "HOST_ECN"),
    (HOST_UFO, "HOST_UFO"),
    (MRG_RXBUF, "MRG_RXBUF"),
    (STATUS, "STATUS"),
    (CTRL_VQ, "CTRL_VQ"),
    (CTRL_RX, "CTRL_RX"),
    (CTRL_VLAN, "CTRL_VLAN"),
    (CTRL_RX_EXTRA, "CTRL_RX_EXTRA"),
    (GUEST_ANNOUNCE, "GUEST_ANNOUNCE"),
    (MQ, "MQ"),
    (CTRL_MAC_ADDR, "CTRL_MAC_ADDR"),
    (INDIRECT_DESC, "INDIRECT_DESC"),
    (EVENT_IDX, "EVENT_IDX"),
    (VERSION_1, "VERSION_1"),
];

/// The feature names set in `bits`; unknown bits as `bit<N>`.
pub fn names(bits: u64) -> Vec<String> {
    (0..64)
        .map(|n| 1u64 << n)
        .filter(|bit| bits & bit != 0)
        .map(|bit| match NAMES.iter().find(|(b, _)| *b == bit) {
            Some((_, name)) => (*name).to_string(),
            None => format!("bit{}", bit.trailing_zeros()),
        })
        .collect()
}

/// Everything the device offers for `config`. Offloads are offered only where
/// the backend reported it can do them; MTU only when configured; MQ only with
/// more than one pair. Never offers a feature whose requirement is missing.
pub fn offered(config: &DeviceConfig) -> u64 {
    let mut bits = VERSION_1
        | MAC
        | STATUS
        | CTRL_VQ
        | CTRL_RX
        | CTRL_RX_EXTRA
        | CTRL_VLAN
        | GUEST_ANNOUNCE
        | CTRL_MAC_ADDR
        | CTRL_GUEST_OFFLOADS
        | MRG_RXBUF
        | EVENT_IDX
        | INDIRECT_DESC;
    if config.mtu.is_some() {
        bits |= MTU;
    }
    if config.max_queue_pairs > 1 {
        bits |= MQ;
    }
    for (feature, offload) in GUEST_OFFLOAD_MAP.iter().chain(HOST_OFFLOAD_MAP.iter()) {
        if config.backend_offloads.contains(*offload) {
            bits |= feature;
        }
    }
    bits & !unmet_dependencies(bits)
}

/// Bits in `bits` whose requirement is not in `bits` (iterated until stable,
/// since removing one bit can break another's requirement).
fn unmet_dependencies(bits: u64) -> u64 {
    let mut kept = bits;
    loop {
        let unmet = DEPENDENCIES
            .iter()
            .filter(|(feature, needs)| kept & feature != 0 && kept & needs == 0)
            .fold(0, |acc, (feature, _)| acc | feature);
        if unmet == 0 {
            return bits & !kept;
        }
        kept &= !unmet;
    }
}

/// Why an acked feature set is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NegotiationError {
    NotOffered(u64),
    MissingDependency { feature: u64, needs: u64 },
}

impl std::fmt::Display for NegotiationError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::NotOffered(bits) => write!(f, "features not offered: {}", names(*bits).join(",")),
            Self::MissingDependency { feature, needs } => write!(
                f,
                "feature {} requires {}",
                names(*feature).join(","),
                names(*needs).join(" or ")
            ),
        }
    }
}

/// Checks an acked set against the offer and the dependency rules.
///
/// Without CTRL_VQ the control queue is not this device's: a vhost-user
/// frontend that runs it itself (QEMU, Cloud Hypervisor) or has none
/// (DPDK's virtio_user) still acks the features that name control commands
/// — QEMU forwards MQ and GUEST_ANNOUNCE, virtio_user also CTRL_RX,
/// CTRL_VLAN and CTRL_MAC_ADDR. No command can reach the device then, so
/// those features mean nothing here and are accepted rather than refused
/// (a refusal would leave such a frontend with no features at all).
pub fn validate_acked(offered: u64, acked: u64) -> Result<(), NegotiationError> {
    let not_offered = acked & !offered;
    if not_offered != 0 {
        return Err(NegotiationError::NotOffered(not_offered));
    }
    let no_ctrl_vq = acked & CTRL_VQ == 0;
    if let Some((feature, needs)) = DEPENDENCIES.iter().find(|(feature, needs)| {
        acked & feature != 0 && acked & needs == 0 && !(no_ctrl_vq && *needs == CTRL_VQ)
    }) {
        return Err(NegotiationError::MissingDependency {
            feature: *feature,
            needs: *needs,
        });
    }
    Ok(())
}

/// True when the acked set says the frontend runs the control queue and only
/// forwards the datapath features (MQ without CTRL_VQ).
pub fn control_queue_in_frontend(acked: u64) -> bool {
    acked & CTRL_VQ == 0 && acked & MQ != 0
}

/// The virtio-net header length the datapath must use for `acked`.
pub fn vnet_hdr_len(acked: u64) -> u32 {
    if acked & (VERSION_1 | MRG_RXBUF) != 0 {
        12
    } else {
        10
    }
}

/// TAP offloads for a set of guest-offload feature bits.
pub fn tap_offloads(guest_offload_bits: u64) -> Offloads {
    GUEST_OFFLOAD_MAP
        .iter()
        .filter(|(bit, _)| guest_offload_bits & bit != 0)
        .fold(Offloads::empty(), |acc, (_, offload)| acc | *offload)
}

/// Whether a set of guest offloads is one the TAP accepts (TUNSETOFFLOAD
/// refuses segmentation without checksum, and ECN without segmentation).
pub fn guest_offloads_consistent(bits: u64) -> bool {
    validate_acked(GUEST_OFFLOADS, bits).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::{Compat, DeviceConfig};

    fn config(offloads: Offloads, pairs: u16, mtu: Option<u16>) -> DeviceConfig {
        DeviceConfig {
            mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
            max_queue_pairs: pairs,
            mtu,
            backend_offloads: offloads,
            compat: Compat::default(),
        }
    }

    #[test]
    fn offers_only_what_the_backend_supports() {
        let none = offered(&config(Offloads::empty(), 1, None));
        assert_eq!(
            none & (GUEST_OFFLOADS | CSUM | HOST_TSO4 | HOST_TSO6 | HOST_ECN | HOST_UFO),
            0
        );
        assert_eq!(none & (MTU | MQ), 0);
        for bit in [
            VERSION_1,
            MAC,
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
            assert_ne!(none & bit, 0, "{:?}", names(bit));
        }
        let all = offered(&config(Offloads::all(), 4, Some(1500)));
        assert_eq!(
            all & (GUEST_OFFLOADS | CSUM | HOST_TSO4 | HOST_ECN | MTU | MQ),
            GUEST_OFFLOADS | CSUM | HOST_TSO4 | HOST_ECN | MTU | MQ
        );
    }

    #[test]
    fn never_offers_a_feature_without_its_requirement() {
        // TSO without checksum support: segmentation cannot be offered.
        let bits = offered(&config(
            Offloads::TSO4 | Offloads::ECN | Offloads::UFO,
            1,
            None,
        ));
        assert_eq!(
            bits & (GUEST_TSO4 | GUEST_ECN | GUEST_UFO | HOST_TSO4 | HOST_ECN | HOST_UFO),
            0
        );
        // ECN with checksum but without any TSO: ECN is dropped.
        let bits = offered(&config(Offloads::CSUM | Offloads::ECN, 1, None));
        assert_eq!(bits & (GUEST_ECN | HOST_ECN), 0);
        assert_ne!(bits & GUEST_CSUM, 0);
        for offloads in 0..32u8 {
            let bits = offered(&config(
                Offloads::from_bits_truncate(offloads),
                2,
                Some(9000),
            ));
            assert_eq!(validate_acked(bits, bits), Ok(()), "offer {offloads:#x}");
        }
    }

    #[test]
    fn refuses_invalid_acked_sets() {
        let offer = offered(&config(Offloads::all(), 2, None));
        assert_eq!(validate_acked(offer, offer), Ok(()));
        assert_eq!(validate_acked(offer, VERSION_1), Ok(()));
        assert!(matches!(
            validate_acked(offer, VERSION_1 | MTU),
            Err(NegotiationError::NotOffered(MTU))
        ));
        assert!(validate_acked(offer, GUEST_TSO4).is_err());
        assert!(validate_acked(offer, GUEST_CSUM | GUEST_ECN).is_err());
        assert!(validate_acked(offer, CSUM | HOST_UFO).is_ok());
        assert!(validate_acked(offer, CTRL_RX_EXTRA | CTRL_RX | CTRL_VQ).is_ok());
        assert!(validate_acked(offer, CTRL_RX_EXTRA | CTRL_VQ).is_err());
        assert!(validate_acked(offer, CTRL_RX_EXTRA).is_err());
    }

    #[test]
    fn accepts_the_shape_of_a_frontend_managed_control_queue() {
        let offer = offered(&config(Offloads::all(), 2, None));
        let qemu_like = VERSION_1 | MQ | GUEST_ANNOUNCE | MRG_RXBUF | EVENT_IDX;
        assert_eq!(validate_acked(offer, qemu_like), Ok(()));
        assert!(control_queue_in_frontend(qemu_like));
        assert!(!control_queue_in_frontend(qemu_like | CTRL_VQ));
        // DPDK's virtio_user (no control queue at all) acks these too.
        let virtio_user_like =
            VERSION_1 | INDIRECT_DESC | MQ | CTRL_RX | CTRL_VLAN | CTRL_MAC_ADDR | MRG_RXBUF;
        assert_eq!(validate_acked(offer, virtio_user_like), Ok(()));
        assert!(control_queue_in_frontend(virtio_user_like));
    }

    #[test]
    fn header_length_and_tap_offloads() {
        assert_eq!(vnet_hdr_len(VERSION_1), 12);
        assert_eq!(vnet_hdr_len(MRG_RXBUF), 12);
        assert_eq!(vnet_hdr_len(CSUM), 10);
        assert_eq!(
            tap_offloads(GUEST_CSUM | GUEST_TSO6),
            Offloads::CSUM | Offloads::TSO6
        );
        assert!(guest_offloads_consistent(0));
        assert!(guest_offloads_consistent(
            GUEST_CSUM | GUEST_TSO4 | GUEST_ECN
        ));
        assert!(!guest_offloads_consistent(GUEST_TSO4));
        assert!(!guest_offloads_consistent(GUEST_CSUM | GUEST_ECN));
    }
}
