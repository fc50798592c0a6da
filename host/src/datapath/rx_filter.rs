//! The receive filter as the datapath applies it to every frame.
//!
//! Built from the (validated) `RxFilter` the device model compiles. The
//! decision must equal `sandnic_device::rx_filter::accepts`, the model's
//! reference; this version is laid out for speed instead: address lists
//! sorted for binary search, the VLAN table as 64-bit words, and a
//! precomputed "accept everything" fast path.

use sandnic_device::{Mac, RxFilter};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NativeFilter {
    accept_all: bool,
    all_uni: bool,
    all_multi: bool,
    no_uni: bool,
    no_multi: bool,
    no_bcast: bool,
    mac: Mac,
    unicast: Vec<Mac>,
    multicast: Vec<Mac>,
    vlan_filtering: bool,
    vlans: [u64; 64],
}

impl Default for NativeFilter {
    /// Promiscuous: what a device does before the driver configures it.
    fn default() -> Self {
        Self::from(&RxFilter {
            promisc: true,
            ..RxFilter::default()
        })
    }
}

impl From<&RxFilter> for NativeFilter {
    fn from(f: &RxFilter) -> Self {
        let mut unicast = f.unicast.clone();
        unicast.sort_unstable();
        let mut multicast = f.multicast.clone();
        multicast.sort_unstable();
        let mut vlans = [0u64; 64];
        for (i, word) in f.vlans.iter().enumerate().take(128) {
            vlans[i / 2] |= u64::from(*word) << (32 * (i % 2));
        }
        Self {
            accept_all: f.promisc,
            all_uni: f.all_uni || f.unicast_overflow,
            all_multi: f.all_multi || f.multicast_overflow,
            no_uni: f.no_uni,
            no_multi: f.no_multi,
            no_bcast: f.no_bcast,
            mac: f.mac,
            unicast,
            multicast,
            vlan_filtering: f.vlan_filtering,
            vlans,
        }
    }
}

impl NativeFilter {
    /// Whether to deliver a frame whose first bytes (at least 16 for the
    /// VLAN check, 6 for the destination) are `head`.
    #[inline]
    pub fn accepts(&self, head: &[u8]) -> bool {
        if self.accept_all {
            return true;
        }
        let Some(dest) = head.get(..6) else {
            return false;
        };
        if self.vlan_filtering && head.len() >= 16 && head[12] == 0x81 && head[13] == 0x00 {
            let vid = (u16::from(head[14] & 0x0f) << 8) | u16::from(head[15]);
            if self.vlans[usize::from(vid >> 6)] & (1 << (vid & 63)) == 0 {
                return false;
            }
        }
        let dest: &Mac = dest.try_into().expect("6 bytes");
        if dest[0] & 1 == 0 {
            !self.no_uni
                && (self.all_uni || *dest == self.mac || self.unicast.binary_search(dest).is_ok())
        } else if *dest == [0xff; 6] {
            !self.no_bcast
        } else {
            !self.no_multi && (self.all_multi || self.multicast.binary_search(dest).is_ok())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sandnic_device::rx_filter::accepts as reference;

    /// A small deterministic generator (no dependency needed for this).
    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self
                .0
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn pick<T: Copy>(&mut self, items: &[T]) -> T {
            items[(self.next() as usize) % items.len()]
        }
    }

    #[test]
    fn agrees_with_the_device_models_reference_filter() {
        let mut rng = Lcg(7);
        let macs: Vec<Mac> = vec![
            [0x52, 0x54, 0, 0, 0, 1],
            [0x52, 0x54, 0, 0, 0, 2],
            [0x02, 0, 0, 0, 0, 9],
            [0x01, 0, 0x5e, 0, 0, 1],
            [0x33, 0x33, 0, 0, 0, 1],
            [0xff; 6],
        ];
        for round in 0..4000 {
            let bit = |rng: &mut Lcg| rng.next().is_multiple_of(4);
            let mut vlans = vec![0u32; 128];
            for _ in 0..rng.next() % 4 {
                let vid = rng.pick(&[0u16, 1, 100, 4095]);
                vlans[usize::from(vid / 32)] |= 1 << (vid % 32);
            }
            let filter = RxFilter {
                promisc: rng.next().is_multiple_of(8),
                all_multi: bit(&mut rng),
                all_uni: bit(&mut rng),
                no_multi: bit(&mut rng),
                no_uni: bit(&mut rng),
                no_bcast: bit(&mut rng),
                mac: rng.pick(&macs[..3]),
                unicast: (0..rng.next() % 3).map(|_| rng.pick(&macs)).collect(),
                multicast: (0..rng.next() % 3).map(|_| rng.pick(&macs)).collect(),
                unicast_overflow: bit(&mut rng),
                multicast_overflow: bit(&mut rng),
                vlan_filtering: bit(&mut rng),
                vlans,
            };
            let native = NativeFilter::from(&filter);
            let mut frame = rng.pick(&macs).to_vec();
            frame.extend_from_slice(&[2, 0, 0, 0, 0, 0x77]);
            if bit(&mut rng) {
                frame.extend_from_slice(&[0x81, 0x00]);
                frame.extend_from_slice(
                    &(rng.pick(&[0u16, 1, 100, 101, 4095]) | 0x2000).to_be_bytes(),
                );
            }
            frame.extend_from_slice(&[0x08, 0x00]);
            frame.resize(60, 0);
            assert_eq!(
                native.accepts(&frame),
                reference(&filter, &frame),
                "round {round}: {filter:?} {frame:02x?}"
            );
        }
    }

    #[test]
    fn default_is_promiscuous() {
        assert!(NativeFilter::default().accepts(&[0x52, 0x54, 0, 9, 9, 9]));
    }
}
