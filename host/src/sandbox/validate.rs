//! The security boundary: every value that leaves the component is checked
//! here before the host uses it. The wit types are untrusted; the
//! `sandnic_device` types these functions return are what the host acts on.
//!
//! The bounds are the host's own, not the component's: a component that
//! asks for 65 535 queue pairs, a 10 000-entry filter, a 4 KiB virtio header
//! or offloads the TAP cannot do is refused, and the call counts as failed.

use super::bindings::wit;
use sandnic_device::features as f;
use sandnic_device::{
    DeviceConfig, Effect, Mac, Offloads, RxFilter, MAC_TABLE_ENTRIES, VLAN_WORDS,
};

/// Why a value that left the component was refused. Each names the bound
/// it broke, so a log line (and a test) says what the component did.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    /// More effects from one call than the host applies.
    #[error("{count} effects, at most {max} allowed")]
    TooManyEffects { count: usize, max: usize },
    /// A virtio-net header length the TAP does not take.
    #[error("virtio-net header length {0} is not 10 or 12")]
    VnetHdrLen(u32),
    /// More (or fewer) queue pairs than the device has.
    #[error("{asked} queue pairs outside 1..={max}")]
    QueuePairs { asked: u16, max: u16 },
    /// Offloads the TAP did not report.
    #[error("{asked:?} not within what the TAP supports ({tap:?})")]
    OffloadsBeyondTap { asked: Offloads, tap: Offloads },
    /// Offloads TUNSETOFFLOAD refuses together.
    #[error("{0:?} is a combination the TAP refuses")]
    OffloadCombination(Offloads),
    /// More addresses than the MAC table holds.
    #[error("rx filter has {0} addresses, at most {MAC_TABLE_ENTRIES}")]
    FilterTooLarge(usize),
    /// A VLAN bitmap of the wrong size.
    #[error("VLAN table of {0} words, expected {VLAN_WORDS}")]
    VlanTable(usize),
    /// An address list that is not whole addresses or too long.
    #[error("{which} address list of {bytes} bytes")]
    AddressList { which: &'static str, bytes: usize },
    /// A control-queue ack other than OK and ERR.
    #[error("control ack {0} is neither OK nor ERR")]
    Ack(u8),
    /// Status bits the driver did not write.
    #[error("status {returned:#x} sets bits the driver did not write ({requested:#x})")]
    StatusBits { requested: u8, returned: u8 },
    /// A config read answered with the wrong number of bytes.
    #[error("{got} config bytes for a {requested}-byte read")]
    ConfigLength { got: usize, requested: u32 },
    /// Feature bits the host's datapath does not implement.
    #[error("offers features the host cannot serve: {}", f::names(*.0).join(","))]
    FeaturesBeyondHost(u64),
    /// A device without VERSION_1 (legacy virtio is not served).
    #[error("does not offer VERSION_1")]
    NoVersion1,
    /// Bytes or text longer than the host holds.
    #[error("{what} of {len} bytes, at most {max}")]
    TooLong {
        what: &'static str,
        len: usize,
        max: usize,
    },
    /// A self-description with an impossible state-version range.
    #[error("component claims state versions {oldest}..={newest}")]
    StateVersions { oldest: u32, newest: u32 },
}

/// What effects may ask for on this device.
#[derive(Debug, Clone, Copy)]
pub struct Bounds {
    pub max_queue_pairs: u16,
    pub backend_offloads: Offloads,
    pub max_effects: usize,
}

impl Bounds {
    pub fn new(config: &DeviceConfig, max_effects: usize) -> Self {
        Self {
            max_queue_pairs: config.max_queue_pairs,
            backend_offloads: config.backend_offloads,
            max_effects,
        }
    }
}

/// The effects of one call, lifted from the wit types and checked.
pub fn effects(list: Vec<wit::Effect>, bounds: &Bounds) -> Result<Vec<Effect>, Invalid> {
    check_count(list.len(), bounds)?;
    // Collected into a fresh vector: an in-place collect would reuse the
    // lifted list's allocation and then shrink it with a `realloc`.
    let mut effects = Vec::with_capacity(list.len());
    for e in list {
        let effect = lift(e)?;
        check(&effect, bounds)?;
        effects.push(effect);
    }
    Ok(effects)
}

/// Checks effects already in the host's types: what `effects` checks after
/// lifting. The fuzz harness holds the native device to the same bounds.
pub fn check_effects(effects: &[Effect], bounds: &Bounds) -> Result<(), Invalid> {
    check_count(effects.len(), bounds)?;
    effects.iter().try_for_each(|e| check(e, bounds))
}

fn check_count(count: usize, bounds: &Bounds) -> Result<(), Invalid> {
    if count > bounds.max_effects {
        return Err(Invalid::TooManyEffects {
            count,
            max: bounds.max_effects,
        });
    }
    Ok(())
}

/// The wit value as the host's type; only what the types cannot hold
/// (address lists of whole addresses) is refused here.
fn lift(effect: wit::Effect) -> Result<Effect, Invalid> {
    Ok(match effect {
        wit::Effect::SetRxFilter(filter) => Effect::SetRxFilter(rx_filter(filter)?),
        wit::Effect::SetTapOffloads(o) => Effect::SetTapOffloads(Offloads::from(o)),
        wit::Effect::SetVnetHdrLen(len) => Effect::SetVnetHdrLen(len),
        wit::Effect::EnableQueuePairs(n) => Effect::EnableQueuePairs(n),
        wit::Effect::ConfigChanged => Effect::ConfigChanged,
        wit::Effect::NeedsReset => Effect::NeedsReset,
    })
}

/// The host's bounds on one effect.
fn check(effect: &Effect, bounds: &Bounds) -> Result<(), Invalid> {
    match *effect {
        Effect::SetRxFilter(ref filter) => check_rx_filter(filter),
        Effect::SetTapOffloads(offloads) => check_tap_offloads(offloads, bounds.backend_offloads),
        Effect::SetVnetHdrLen(10 | 12) => Ok(()),
        Effect::SetVnetHdrLen(len) => Err(Invalid::VnetHdrLen(len)),
        Effect::EnableQueuePairs(asked) if (1..=bounds.max_queue_pairs).contains(&asked) => Ok(()),
        Effect::EnableQueuePairs(asked) => Err(Invalid::QueuePairs {
            asked,
            max: bounds.max_queue_pairs,
        }),
        Effect::ConfigChanged | Effect::NeedsReset => Ok(()),
    }
}

/// Offloads must be a subset of what the TAP reported and a combination
/// TUNSETOFFLOAD accepts (segmentation needs checksum; ECN needs TSO).
fn check_tap_offloads(offloads: Offloads, backend: Offloads) -> Result<(), Invalid> {
    if !backend.contains(offloads) {
        return Err(Invalid::OffloadsBeyondTap {
            asked: offloads,
            tap: backend,
        });
    }
    let needs_csum = Offloads::TSO4 | Offloads::TSO6 | Offloads::ECN | Offloads::UFO;
    let tso = Offloads::TSO4 | Offloads::TSO6;
    if (!(offloads & needs_csum).is_empty() && !offloads.contains(Offloads::CSUM))
        || (offloads.contains(Offloads::ECN) && (offloads & tso).is_empty())
    {
        return Err(Invalid::OffloadCombination(offloads));
    }
    Ok(())
}

/// At most a MAC table's worth of addresses and a whole VLAN bitmap.
fn check_rx_filter(filter: &RxFilter) -> Result<(), Invalid> {
    let addresses = filter.unicast.len() + filter.multicast.len();
    if addresses > MAC_TABLE_ENTRIES {
        return Err(Invalid::FilterTooLarge(addresses));
    }
    if filter.vlans.len() != VLAN_WORDS {
        return Err(Invalid::VlanTable(filter.vlans.len()));
    }
    Ok(())
}

fn rx_filter(filter: wit::RxFilter) -> Result<RxFilter, Invalid> {
    let mac = super::bindings::mac_from_wit(filter.mac);
    let unicast = mac_list(filter.unicast, "unicast")?;
    let multicast = mac_list(filter.multicast, "multicast")?;
    let on = |switch| filter.switches.contains(switch);
    use wit::RxSwitches as S;
    Ok(RxFilter {
        promisc: on(S::PROMISC),
        all_multi: on(S::ALL_MULTI),
        all_uni: on(S::ALL_UNI),
        no_multi: on(S::NO_MULTI),
        no_uni: on(S::NO_UNI),
        no_bcast: on(S::NO_BCAST),
        mac,
        unicast,
        multicast,
        unicast_overflow: on(S::UNICAST_OVERFLOW),
        multicast_overflow: on(S::MULTICAST_OVERFLOW),
        vlan_filtering: on(S::VLAN_FILTERING),
        vlans: filter.vlans,
    })
}

/// Concatenated 6-byte addresses as a list of addresses (at most 64, so
/// the copy is at most 384 bytes).
fn mac_list(bytes: Vec<u8>, which: &'static str) -> Result<Vec<Mac>, Invalid> {
    if !bytes.len().is_multiple_of(6) || bytes.len() / 6 > MAC_TABLE_ENTRIES {
        return Err(Invalid::AddressList {
            which,
            bytes: bytes.len(),
        });
    }
    Ok(bytes.as_chunks::<6>().0.to_vec())
}

pub fn ack(ack: u8) -> Result<u8, Invalid> {
    match ack {
        sandnic_device::ACK_OK | sandnic_device::ACK_ERR => Ok(ack),
        other => Err(Invalid::Ack(other)),
    }
}

/// The device may clear bits the driver wrote (FEATURES_OK) and keep
/// DEVICE_NEEDS_RESET; it may not invent others.
pub fn status(requested: u8, returned: u8) -> Result<u8, Invalid> {
    use sandnic_device::device::status::NEEDS_RESET;
    if returned & !(requested | NEEDS_RESET) != 0 {
        return Err(Invalid::StatusBits {
            requested,
            returned,
        });
    }
    Ok(returned)
}

pub fn config_bytes(bytes: Vec<u8>, requested: u32) -> Result<Vec<u8>, Invalid> {
    if bytes.len() != requested as usize {
        return Err(Invalid::ConfigLength {
            got: bytes.len(),
            requested,
        });
    }
    Ok(bytes)
}

/// Features the host's datapath implements for `config`: the ceiling for
/// what a component may offer to the driver.
pub fn feature_ceiling(config: &DeviceConfig) -> u64 {
    let mut ceiling = f::VERSION_1
        | f::MAC
        | f::STATUS
        | f::CTRL_VQ
        | f::CTRL_RX
        | f::CTRL_RX_EXTRA
        | f::CTRL_VLAN
        | f::GUEST_ANNOUNCE
        | f::CTRL_MAC_ADDR
        | f::CTRL_GUEST_OFFLOADS
        | f::MRG_RXBUF
        | f::EVENT_IDX
        | f::INDIRECT_DESC;
    if config.mtu.is_some() {
        ceiling |= f::MTU;
    }
    if config.max_queue_pairs > 1 {
        ceiling |= f::MQ;
    }
    let caps = config.backend_offloads;
    for (offload, bits) in [
        (Offloads::CSUM, f::CSUM | f::GUEST_CSUM),
        (Offloads::TSO4, f::HOST_TSO4 | f::GUEST_TSO4),
        (Offloads::TSO6, f::HOST_TSO6 | f::GUEST_TSO6),
        (Offloads::ECN, f::HOST_ECN | f::GUEST_ECN),
        (Offloads::UFO, f::HOST_UFO | f::GUEST_UFO),
    ] {
        if caps.contains(offload) {
            ceiling |= bits;
        }
    }
    ceiling
}

pub fn device_features(bits: u64, config: &DeviceConfig) -> Result<u64, Invalid> {
    let extra = bits & !feature_ceiling(config);
    if extra != 0 {
        return Err(Invalid::FeaturesBeyondHost(extra));
    }
    if bits & f::VERSION_1 == 0 {
        return Err(Invalid::NoVersion1);
    }
    Ok(bits)
}

pub fn bounded_bytes(bytes: Vec<u8>, max: usize, what: &'static str) -> Result<Vec<u8>, Invalid> {
    within(bytes.len(), max, what)?;
    Ok(bytes)
}

pub fn bounded_text(text: String, max: usize, what: &'static str) -> Result<String, Invalid> {
    within(text.len(), max, what)?;
    Ok(text)
}

fn within(len: usize, max: usize, what: &'static str) -> Result<(), Invalid> {
    if len > max {
        return Err(Invalid::TooLong { what, len, max });
    }
    Ok(())
}

/// `text` cut to at most `max` bytes on a character boundary, for logging
/// strings whose length the component chose.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let cut = (0..=max)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandnic_device::Compat;

    fn config() -> DeviceConfig {
        DeviceConfig {
            mac: [0x52, 0x54, 0, 0, 0, 1],
            max_queue_pairs: 2,
            mtu: None,
            backend_offloads: Offloads::CSUM | Offloads::TSO4,
            compat: Compat::default(),
        }
    }

    fn wit_filter() -> wit::RxFilter {
        wit::RxFilter {
            switches: wit::RxSwitches::VLAN_FILTERING,
            mac: (0x52, 0x54, 0, 0, 0, 1),
            unicast: vec![],
            multicast: vec![],
            vlans: vec![0; VLAN_WORDS],
        }
    }

    #[test]
    fn effects_within_bounds_pass() {
        let b = Bounds::new(&config(), 16);
        let ok = effects(
            vec![
                wit::Effect::SetVnetHdrLen(12),
                wit::Effect::EnableQueuePairs(2),
                wit::Effect::SetTapOffloads(wit::Offloads::CSUM | wit::Offloads::TSO4),
                wit::Effect::SetRxFilter(wit_filter()),
                wit::Effect::ConfigChanged,
            ],
            &b,
        )
        .unwrap();
        assert_eq!(ok.len(), 5);
    }

    #[test]
    fn out_of_range_effects_are_refused() {
        let b = Bounds::new(&config(), 4);
        let bad = [
            wit::Effect::SetVnetHdrLen(4096),
            wit::Effect::EnableQueuePairs(0),
            wit::Effect::EnableQueuePairs(3),
            wit::Effect::SetTapOffloads(wit::Offloads::TSO6 | wit::Offloads::CSUM),
            wit::Effect::SetTapOffloads(wit::Offloads::TSO4),
            wit::Effect::SetRxFilter(wit::RxFilter {
                unicast: vec![2; 7],
                ..wit_filter()
            }),
            wit::Effect::SetRxFilter(wit::RxFilter {
                multicast: vec![1; 6 * 65],
                ..wit_filter()
            }),
            wit::Effect::SetRxFilter(wit::RxFilter {
                vlans: vec![0; 4096],
                ..wit_filter()
            }),
        ];
        for e in bad {
            assert!(effects(vec![e.clone()], &b).is_err(), "{e:?} accepted");
        }
        assert!(effects(vec![wit::Effect::ConfigChanged; 5], &b).is_err());
    }

    #[test]
    fn address_lists_keep_their_addresses() {
        let bytes: Vec<u8> = (0..18).collect();
        let expected = vec![
            [0, 1, 2, 3, 4, 5],
            [6, 7, 8, 9, 10, 11],
            [12, 13, 14, 15, 16, 17],
        ];
        assert_eq!(mac_list(bytes.clone(), "t"), Ok(expected.clone()));
        let mut odd_capacity = Vec::with_capacity(19);
        odd_capacity.extend_from_slice(&bytes);
        assert_eq!(mac_list(odd_capacity, "t"), Ok(expected));
        assert_eq!(mac_list(Vec::new(), "t"), Ok(Vec::new()));
        assert!(mac_list(vec![0; 7], "t").is_err());
    }

    #[test]
    fn scalar_outputs() {
        assert!(ack(0).is_ok() && ack(1).is_ok() && ack(2).is_err());
        assert_eq!(status(0x0f, 0x07), Ok(0x07));
        assert!(status(0x03, 0x07).is_err());
        assert_eq!(status(0x07, 0x47), Ok(0x47));
        assert!(config_bytes(vec![0; 5], 4).is_err());
        let cfg = config();
        assert!(device_features(f::VERSION_1 | f::CSUM | f::HOST_TSO4 | f::MQ, &cfg).is_ok());
        assert!(device_features(f::VERSION_1 | f::HOST_TSO6, &cfg).is_err());
        assert!(device_features(f::VERSION_1 | f::MTU, &cfg).is_err());
        assert!(device_features(f::VERSION_1 | (1 << 30), &cfg).is_err());
        assert!(device_features(f::MAC, &cfg).is_err());
        assert_eq!(truncate_text("héllo", 2), "h… (6 bytes)");
    }
}
