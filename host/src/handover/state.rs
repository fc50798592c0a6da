//! What travels in a handover besides the device model's own state: the
//! host's protocol and ring state, the memory table, the TAP, and a
//! manifest naming the role of every fd that follows.
//!
//! The destination receives it as untrusted plain data; `validate` checks
//! every field and the manifest against each other before anything is
//! built from them.

use super::phases::DestinationMarks;
use super::stream::MAX_FDS;
use crate::datapath::vring::MAX_QUEUE_SIZE;
use crate::sandbox::ComponentInfo;
use crate::tap::MAX_TAP_QUEUES;
use crate::vhost_user::request::MAX_REGIONS;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;

pub use crate::backend::handover::{FdRole, HostState, TapState, VringState};

/// The first frame of a handover, sent while the source's device still
/// runs: everything that does not change when the device stops, so the
/// destination can build its device before the pause. Its fds follow.
#[derive(Debug, Clone, Serialize, Deserialize)]
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
    /// Refused; the source keeps running.
    Refused { reason: String },
    /// The datapath runs again (after `Ready`).
    Resumed {
        at_ns: u64,
        component: ComponentInfo,
        /// When the destination's steps ended (absent from older releases).
        #[serde(default)]
        marks: DestinationMarks,
    },
}

/// Checks an offer's host state and manifest.
pub fn validate(offer: &Offer, new_tap: bool) -> Result<(), String> {
    if offer.magic != super::stream::MAGIC {
        return Err(format!(
            "not a sandnic handover stream (magic {:?})",
            offer.magic
        ));
    }
    if offer.version != super::stream::VERSION {
        return Err(format!(
            "handover format version {} (this build speaks {})",
            offer.version,
            super::stream::VERSION
        ));
    }
    validate_host(&offer.host)?;
    validate_manifest(&offer.host, &offer.fds, new_tap)
}

/// Checks a commit against the offer the destination prepared with: the
/// device's identity (config, TAP) cannot change in between, and without
/// new fds neither can the memory table they map.
pub fn validate_commit(commit: &Commit, offered: &HostState, new_tap: bool) -> Result<(), String> {
    let h = &commit.host;
    validate_host(h)?;
    if h.config != offered.config || h.tap != offered.tap || h.vrings.len() != offered.vrings.len()
    {
        return Err("the commit describes another device than the offer".into());
    }
    if commit.fds.is_empty() {
        if h.regions != offered.regions {
            return Err("the memory table changed but no fds came with it".into());
        }
        return Ok(());
    }
    validate_manifest(h, &commit.fds, new_tap)
}

fn validate_host(h: &HostState) -> Result<(), String> {
    h.config
        .validate()
        .map_err(|e| format!("device config: {e}"))?;
    let pairs = usize::from(h.config.max_queue_pairs);
    if pairs > MAX_TAP_QUEUES {
        return Err(format!("{pairs} queue pairs (at most {MAX_TAP_QUEUES})"));
    }
    if h.vrings.len() != 2 * pairs + 1 {
        return Err(format!("{} rings for {pairs} queue pairs", h.vrings.len()));
    }
    for (i, v) in h.vrings.iter().enumerate() {
        if v.num > MAX_QUEUE_SIZE || (v.num != 0 && !v.num.is_power_of_two()) {
            return Err(format!("ring {i}: size {}", v.num));
        }
    }
    if h.regions.len() > MAX_REGIONS {
        return Err(format!(
            "{} memory regions (at most {MAX_REGIONS})",
            h.regions.len()
        ));
    }
    if h.tap.name.is_empty() || h.tap.name.len() > 15 || usize::from(h.tap.queues) < pairs {
        return Err(format!(
            "TAP {:?} with {} queues for {pairs} pairs",
            h.tap.name, h.tap.queues
        ));
    }
    Ok(())
}

fn validate_manifest(h: &HostState, fds: &[FdRole], new_tap: bool) -> Result<(), String> {
    if fds.len() > MAX_FDS {
        return Err(format!("{} fds (at most {MAX_FDS})", fds.len()));
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
            return Err(format!("fd manifest: {role:?} out of range or repeated"));
        }
    }
    let regions = fds
        .iter()
        .filter(|r| matches!(r, FdRole::MemoryRegion(_)))
        .count();
    if regions != h.regions.len() {
        return Err(format!(
            "{regions} region fds for {} regions",
            h.regions.len()
        ));
    }
    let taps = fds
        .iter()
        .filter(|r| matches!(r, FdRole::TapQueue(_)))
        .count();
    if !new_tap && taps != 0 && taps != usize::from(h.tap.queues) {
        return Err(format!("{taps} TAP fds for {} queues", h.tap.queues));
    }
    Ok(())
}

/// `Vec<u8>` as a msgpack binary rather than an array of integers.
mod serde_bytes_compat {
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
