//! What travels in a handover besides the device model's own state: the
//! host's protocol and ring state, the memory table, the TAP, and a
//! manifest naming the role of every fd that follows.
//!
//! The destination receives it as untrusted plain data; `validate` checks
//! every field and the manifest against each other before anything is
//! built from them.

use super::phases::DestinationMarks;
use super::stream::MAX_FDS;
use crate::sandbox::ComponentInfo;
use crate::tap::MAX_TAP_QUEUES;
use crate::vhost_user::request::MAX_REGIONS;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

pub use crate::backend::handover::{FdRole, HostState, TapState, VringState};

/// The first frame of a handover, sent while the source's device still
/// runs: everything that does not change when the device stops, so the
/// destination can build its device before the pause. Its fds follow.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    pub magic: String,
    pub version: u32,
    pub source_component: ComponentInfo,
    /// The source's component when it is not built into sandnic (swapped
    /// in from a file): its bytes, so a destination given no `--component`
    /// runs the same device logic. Empty otherwise (and from releases that
    /// did not send it).
    #[serde(default, with = "serde_bytes_compat")]
    pub component_wasm: Vec<u8>,
    /// As of the offer; ring positions are final only in the `Commit`.
    pub host: HostState,
    pub fds: Vec<FdRole>,
}

/// The frame that crosses the pause, after `Prepared`: the device stopped,
/// its model's state, where every ring continues.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Commit {
    /// CLOCK_MONOTONIC when the source's datapath stopped (same machine:
    /// comparable with the destination's clock).
    pub stopped_at_ns: u64,
    pub host: HostState,
    #[serde(with = "serde_bytes_compat")]
    pub device_state: Vec<u8>,
    /// Empty when nothing that travels as an fd changed since the offer.
    /// Otherwise the whole set again (it follows this frame): the
    /// destination drops what it prepared with and takes these.
    pub fds: Vec<FdRole>,
}

/// The destination's answers.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Reply {
    /// The offer is accepted and the device built; waiting for the commit.
    Prepared,
    /// The commit is applied; the destination runs from now on.
    Ready,
    /// Refused; the source keeps running. `kind` is a stable name for the
    /// reason (empty from releases that did not send one).
    Refused {
        reason: String,
        #[serde(default)]
        kind: String,
    },
    /// The datapath runs again (after `Ready`).
    Resumed {
        at_ns: u64,
        component: ComponentInfo,
        /// When the destination's steps ended (absent from older releases).
        #[serde(default)]
        marks: DestinationMarks,
    },
}

/// Why an offer or commit is refused: each names what does not add up.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StateError {
    /// The first frame is not a sandnic offer.
    #[error("not a sandnic handover stream (magic {0:?})")]
    Magic(String),
    /// An offer in a format this build does not speak.
    #[error("handover format version {0} (this build speaks {VERSION})")]
    Version(u32),
    /// The device configuration itself is invalid.
    #[error("device config: {0}")]
    Config(String),
    /// More queue pairs than a TAP can have queues.
    #[error("{0} queue pairs (at most {MAX_TAP_QUEUES})")]
    QueuePairs(usize),
    /// Not one ring per queue plus the control queue.
    #[error("{rings} rings for {pairs} queue pairs")]
    RingCount { rings: usize, pairs: usize },
    /// A ring size virtio does not allow.
    #[error("ring {index}: size {num}")]
    RingSize { index: usize, num: u16 },
    /// More memory regions than vhost-user carries.
    #[error("{0} memory regions (at most {MAX_REGIONS})")]
    Regions(usize),
    /// A TAP name no interface can have.
    #[error(transparent)]
    TapName(#[from] crate::tap::TapError),
    /// Fewer TAP queues than the device's queue pairs.
    #[error("TAP with {queues} queues for {pairs} pairs")]
    TapQueues { queues: u16, pairs: usize },
    /// More fds than a handover frame carries.
    #[error("{0} fds (at most {MAX_FDS})")]
    TooManyFds(usize),
    /// A manifest role that names nothing, or names it twice.
    #[error("fd manifest: {0:?} out of range or repeated")]
    Manifest(FdRole),
    /// Not one fd per memory region.
    #[error("{fds} region fds for {regions} regions")]
    RegionFds { fds: usize, regions: usize },
    /// Some but not all of the TAP's queues.
    #[error("{fds} TAP fds for {queues} queues")]
    TapFds { fds: usize, queues: u16 },
    /// The commit's device is not the one offered.
    #[error("the commit describes another device than the offer")]
    AnotherDevice,
    /// The memory table changed but the commit brought no fds to map it.
    #[error("the memory table changed but no fds came with it")]
    MemoryWithoutFds,
    /// A rate limit the device could not take (a zero rate would never
    /// refill its bucket).
    #[error("{0} rate limit: {1}")]
    Limit(&'static str, crate::datapath::rate_limit::SpecError),
}

use super::stream::{MAGIC, VERSION};

/// Checks an offer's host state and manifest.
pub fn validate(offer: &Offer, new_tap: bool) -> Result<(), StateError> {
    if offer.magic != MAGIC {
        return Err(StateError::Magic(offer.magic.clone()));
    }
    if offer.version != VERSION {
        return Err(StateError::Version(offer.version));
    }
    validate_host(&offer.host)?;
    validate_manifest(&offer.host, &offer.fds, new_tap)
}

/// Checks a commit against the offer the destination prepared with: the
/// device's identity (config, TAP) cannot change in between, and without
/// new fds neither can the memory table they map.
pub fn validate_commit(
    commit: &Commit,
    offered: &HostState,
    new_tap: bool,
) -> Result<(), StateError> {
    let h = &commit.host;
    validate_host(h)?;
    if h.config != offered.config || h.tap != offered.tap || h.vrings.len() != offered.vrings.len()
    {
        return Err(StateError::AnotherDevice);
    }
    if commit.fds.is_empty() {
        if h.regions != offered.regions {
            return Err(StateError::MemoryWithoutFds);
        }
        return Ok(());
    }
    validate_manifest(h, &commit.fds, new_tap)
}

fn validate_host(h: &HostState) -> Result<(), StateError> {
    h.config.validate().map_err(StateError::Config)?;
    let pairs = usize::from(h.config.max_queue_pairs);
    if pairs > MAX_TAP_QUEUES {
        return Err(StateError::QueuePairs(pairs));
    }
    if h.vrings.len() != 2 * pairs + 1 {
        return Err(StateError::RingCount {
            rings: h.vrings.len(),
            pairs,
        });
    }
    for (index, v) in h.vrings.iter().enumerate() {
        if v.num != 0 && !crate::datapath::vring::valid_size(v.num) {
            return Err(StateError::RingSize { index, num: v.num });
        }
    }
    if h.regions.len() > MAX_REGIONS {
        return Err(StateError::Regions(h.regions.len()));
    }
    for (way, spec) in [("tx", h.limits.tx), ("rx", h.limits.rx)] {
        if let Some(spec) = spec {
            spec.validated().map_err(|e| StateError::Limit(way, e))?;
        }
    }
    crate::tap::check_name(&h.tap.name)?;
    if usize::from(h.tap.queues) < pairs {
        return Err(StateError::TapQueues {
            queues: h.tap.queues,
            pairs,
        });
    }
    Ok(())
}

fn validate_manifest(h: &HostState, fds: &[FdRole], new_tap: bool) -> Result<(), StateError> {
    if fds.len() > MAX_FDS {
        return Err(StateError::TooManyFds(fds.len()));
    }
    let mut seen = HashSet::new();
    for role in fds {
        let in_range = match *role {
            FdRole::MemoryRegion(i) => (i as usize) < h.regions.len(),
            FdRole::Kick(q) | FdRole::Call(q) | FdRole::Err(q) => usize::from(q) < h.vrings.len(),
            FdRole::TapQueue(q) => q < h.tap.queues,
            _ => true,
        };
        if !in_range || !seen.insert(*role) {
            return Err(StateError::Manifest(*role));
        }
    }
    let count = |wanted: fn(&FdRole) -> bool| fds.iter().filter(|r| wanted(r)).count();
    let regions = count(|r| matches!(r, FdRole::MemoryRegion(_)));
    if regions != h.regions.len() {
        return Err(StateError::RegionFds {
            fds: regions,
            regions: h.regions.len(),
        });
    }
    let taps = count(|r| matches!(r, FdRole::TapQueue(_)));
    if !new_tap && taps != 0 && taps != usize::from(h.tap.queues) {
        return Err(StateError::TapFds {
            fds: taps,
            queues: h.tap.queues,
        });
    }
    Ok(())
}

/// `Vec<u8>` as a msgpack binary rather than an array of integers.
pub(crate) mod serde_bytes_compat {
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(bytes: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        struct Bytes;
        impl serde::de::Visitor<'_> for Bytes {
            type Value = Vec<u8>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("bytes")
            }
            fn visit_bytes<E: serde::de::Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
                Ok(v.to_vec())
            }
        }
        d.deserialize_bytes(Bytes)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::memory::guest_memory::RegionInfo;
    use sandnic_device::{Compat, DeviceConfig, Offloads};

    /// A one-pair device with one memory region, offered with every fd.
    pub(crate) fn offer() -> Offer {
        let ring = VringState {
            num: 256,
            addrs: None,
            base: 0,
            enabled: true,
            started: true,
        };
        let host = HostState {
            config: DeviceConfig {
                mac: [0x52, 0x54, 0, 0, 0, 1],
                max_queue_pairs: 1,
                mtu: None,
                backend_offloads: Offloads::empty(),
                compat: Compat::default(),
            },
            protocol: Default::default(),
            vrings: vec![ring; 3],
            regions: vec![RegionInfo {
                guest_phys_addr: 0,
                memory_size: 1 << 20,
                userspace_addr: 1 << 30,
                mmap_offset: 0,
            }],
            tap: TapState {
                name: "tap0".into(),
                queues: 1,
            },
            link_up: true,
            socket_paths: vec![],
            connect: None,
            counters: Default::default(),
            queue_stats: vec![],
            limits: Default::default(),
        };
        Offer {
            magic: MAGIC.into(),
            version: VERSION,
            source_component: ComponentInfo {
                name: "t".into(),
                version: "0".into(),
                state_version: 1,
                oldest_state_version: 1,
            },
            component_wasm: vec![],
            host,
            fds: vec![
                FdRole::Connection,
                FdRole::MemoryRegion(0),
                FdRole::Kick(0),
                FdRole::Call(0),
                FdRole::TapQueue(0),
            ],
        }
    }

    fn refused(change: impl FnOnce(&mut Offer)) -> StateError {
        let mut offer = offer();
        change(&mut offer);
        validate(&offer, false).expect_err("a broken offer was accepted")
    }

    #[test]
    fn a_whole_offer_is_accepted() {
        validate(&offer(), false).unwrap();
        validate(&offer(), true).unwrap();
    }

    #[test]
    fn each_broken_field_is_named() {
        assert_eq!(
            refused(|o| o.magic = "x".into()),
            StateError::Magic("x".into())
        );
        assert_eq!(
            refused(|o| o.version += 1),
            StateError::Version(VERSION + 1)
        );
        assert!(matches!(
            refused(|o| o.host.config.max_queue_pairs = 0),
            StateError::Config(_)
        ));
        assert_eq!(
            refused(|o| {
                o.host.vrings.pop();
            }),
            StateError::RingCount { rings: 2, pairs: 1 }
        );
        assert_eq!(
            refused(|o| o.host.vrings[1].num = 100),
            StateError::RingSize { index: 1, num: 100 }
        );
        assert!(matches!(
            refused(|o| o.host.tap.name = "a/b".into()),
            StateError::TapName(crate::tap::TapError::BadName(_))
        ));
        assert!(matches!(
            refused(|o| o.host.tap.name = "sixteen-letters!".into()),
            StateError::TapName(_)
        ));
        assert_eq!(
            refused(|o| o.host.tap.queues = 0),
            StateError::TapQueues {
                queues: 0,
                pairs: 1
            }
        );
        let zero = crate::datapath::rate_limit::RateSpec {
            bytes: Some(0),
            frames: None,
            burst_bytes: None,
            burst_frames: None,
        };
        assert_eq!(
            refused(|o| o.host.limits.rx = Some(zero)),
            StateError::Limit(
                "rx",
                crate::datapath::rate_limit::SpecError::Zero("bytes".into())
            )
        );
    }

    #[test]
    fn a_manifest_must_match_what_it_describes() {
        assert_eq!(
            refused(|o| o.fds.push(FdRole::Kick(3))),
            StateError::Manifest(FdRole::Kick(3))
        );
        assert_eq!(
            refused(|o| o.fds.push(FdRole::Connection)),
            StateError::Manifest(FdRole::Connection)
        );
        assert_eq!(
            refused(|o| o.fds.retain(|r| *r != FdRole::MemoryRegion(0))),
            StateError::RegionFds { fds: 0, regions: 1 }
        );
        assert_eq!(
            refused(|o| o.fds = vec![FdRole::Connection; MAX_FDS + 1]),
            StateError::TooManyFds(MAX_FDS + 1)
        );
        let mut two_queues = offer();
        two_queues.host.tap.queues = 2;
        assert_eq!(
            validate(&two_queues, false),
            Err(StateError::TapFds { fds: 1, queues: 2 })
        );
        assert_eq!(validate(&two_queues, true), Ok(()), "--new-tap opens them");
    }

    #[test]
    fn a_commit_describes_the_device_offered() {
        let offer = offer();
        let commit = |change: fn(&mut Commit)| {
            let mut commit = Commit {
                stopped_at_ns: 1,
                host: offer.host.clone(),
                device_state: vec![],
                fds: vec![],
            };
            change(&mut commit);
            validate_commit(&commit, &offer.host, false)
        };
        assert_eq!(commit(|_| {}), Ok(()));
        assert_eq!(
            commit(|c| c.host.config.mac[5] = 2),
            Err(StateError::AnotherDevice)
        );
        assert_eq!(
            commit(|c| c.host.regions[0].memory_size *= 2),
            Err(StateError::MemoryWithoutFds)
        );
        assert_eq!(
            commit(|c| {
                c.host.regions[0].memory_size *= 2;
                c.fds = vec![FdRole::MemoryRegion(0)];
            }),
            Ok(())
        );
    }
}
