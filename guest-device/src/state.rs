//! The saved device state: format, versions, validation and description.
//!
//! A blob is the msgpack array `["sandnic-net", version, body]`. The header
//! is read first, so a blob of an unknown version is refused by name before
//! its body is touched. Bodies are plain data and untrusted: [`validate`]
//! checks every field against this device before anything is replaced — the
//! class of bugs behind CVE-2013-4148..4151 and CVE-2014-0182 (sizes and
//! indices from a migration stream used unchecked) stops here.
//!
//! Versions:
//! - 1 (sandnic-device 0.1): [`BodyV1`].
//! - 2 (sandnic-device 0.2, feature `v2`): `BodyV1` plus `announce_count`.

use crate::device::{status, DeviceState, NetDevice};
use crate::features;
use crate::types::{format_mac, is_valid_unicast, DeviceConfig, Effect, Offloads, VLAN_WORDS};
use serde::{Deserialize, Serialize};

pub const FORMAT: &str = "sandnic-net";
/// The state version this build writes.
pub const STATE_VERSION: u32 = if cfg!(feature = "v2") { 2 } else { 1 };
/// The oldest state version this build still loads.
pub const OLDEST_STATE_VERSION: u32 = 1;
/// Saved states are small (a full MAC table is under 1 KiB); anything much
/// larger is not ours. Bounded because the blob comes from outside.
pub const MAX_STATE_LEN: usize = 64 * 1024;

/// Section present when the `local-migration` compat property is on: the
/// backend setup the device asked for, which travels with the TAP fds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LocalMigration {
    pub vnet_hdr_len: u32,
    pub tap_offloads: Offloads,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyV1 {
    pub config: DeviceConfig,
    pub offered: u64,
    pub state: DeviceState,
    pub local_migration: Option<LocalMigration>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BodyV2 {
    pub v1: BodyV1,
    pub announce_count: u32,
}

#[derive(Serialize)]
struct Blob<'a, T>(&'a str, u32, T);

/// A decoded blob of any version this build understands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Saved {
    V1(BodyV1),
    V2(BodyV2),
}

impl Saved {
    pub fn v1_mut(&mut self) -> &mut BodyV1 {
        match self {
            Self::V1(body) => body,
            Self::V2(body) => &mut body.v1,
        }
    }

    pub fn version(&self) -> u32 {
        match self {
            Self::V1(_) => 1,
            Self::V2(_) => 2,
        }
    }

    pub fn v1(&self) -> &BodyV1 {
        match self {
            Self::V1(body) => body,
            Self::V2(body) => &body.v1,
        }
    }
}

/// Refuses states larger than [`MAX_STATE_LEN`]. The host applies the same
/// check before copying a blob into the sandbox.
pub fn check_len(len: usize) -> Result<(), String> {
    if len > MAX_STATE_LEN {
        return Err(format!(
            "state is {len} bytes, more than the {MAX_STATE_LEN}-byte limit"
        ));
    }
    Ok(())
}

/// Decodes a blob: format, version range, then the body of that version.
pub fn decode(blob: &[u8]) -> Result<Saved, String> {
    check_len(blob.len())?;
    let (format, version, body) = split_header(blob)?;
    if format != FORMAT {
        return Err(format!("not a sandnic device state (format {format:?})"));
    }
    if version > STATE_VERSION {
        return Err(format!(
            "state version {version} is newer than this device supports ({OLDEST_STATE_VERSION}..={STATE_VERSION})"
        ));
    }
    let body_error = |e: rmp_serde::decode::Error| format!("corrupt version-{version} state: {e}");
    let saved = match version {
        1 => Saved::V1(body_from(body).map_err(body_error)?),
        2 => Saved::V2(body_from(body).map_err(body_error)?),
        _ => {
            return Err(format!(
            "state version {version} is older than this device supports ({OLDEST_STATE_VERSION}..)"
        ))
        }
    };
    Ok(saved)
}

/// Reads `[format, version, ...` and returns them with the rest (the body).
fn split_header(blob: &[u8]) -> Result<(&str, u32, &[u8]), String> {
    let not_ours = |what: &str| {
        format!("not a sandnic device state: {what} (a state is a msgpack array of format name, version and body)")
    };
    let mut rest = blob;
    let len = rmp::decode::read_array_len(&mut rest)
        .map_err(|_| not_ours("it does not begin with a msgpack array"))?;
    if len != 3 {
        return Err(not_ours(&format!("it is an array of {len} items")));
    }
    let (format, after) = rmp::decode::read_str_from_slice(rest)
        .map_err(|_| not_ours("its first item is not a format name"))?;
    rest = after;
    let version: u32 = rmp::decode::read_int(&mut rest)
        .map_err(|_| not_ours("its second item is not a version number"))?;
    Ok((format, version, rest))
}

fn body_from<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, rmp_serde::decode::Error> {
    let mut rest = body;
    let value = T::deserialize(&mut rmp_serde::Deserializer::new(&mut rest))?;
    if !rest.is_empty() {
        return Err(rmp_serde::decode::Error::Syntax(
            "trailing bytes after the state".into(),
        ));
    }
    Ok(value)
}

fn encode<T: Serialize>(version: u32, body: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    // Serializing plain data into a Vec cannot fail.
    rmp_serde::encode::write(&mut out, &Blob(FORMAT, version, body))
        .expect("in-memory msgpack encoding");
    out
}

/// Encodes a decoded blob again, in its own version. With [`decode`] this
/// lets tests and fuzzers produce well-formed states with chosen values.
pub fn encode_saved(saved: &Saved) -> Vec<u8> {
    match saved {
        Saved::V1(body) => encode(1, body),
        Saved::V2(body) => encode(2, body),
    }
}

impl NetDevice {
    fn body_v1(&self) -> BodyV1 {
        let local_migration = self.config.compat.local_migration.then(|| LocalMigration {
            vnet_hdr_len: features::vnet_hdr_len(self.state.acked),
            tap_offloads: features::tap_offloads(self.state.guest_offloads),
        });
        BodyV1 {
            config: self.config.clone(),
            offered: self.offered,
            state: self.state.clone(),
            local_migration,
        }
    }

    /// The device state in the newest format this build writes.
    pub fn save(&self) -> Vec<u8> {
        #[cfg(feature = "v2")]
        return encode(
            2,
            &BodyV2 {
                v1: self.body_v1(),
                announce_count: self.announce_count,
            },
        );
        #[cfg(not(feature = "v2"))]
        encode(1, &self.body_v1())
    }

    /// Replaces the whole state with a validated saved one, or changes
    /// nothing. Returns the effects that bring the host's datapath in line.
    pub fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String> {
        #[cfg(feature = "hostile")]
        crate::hostile::load(&self.config);
        let saved = decode(blob)?;
        let state = validate(saved.v1(), &self.config, self.offered)?;
        self.state = state;
        #[cfg(feature = "v2")]
        {
            self.announce_count = match &saved {
                Saved::V2(body) => body.announce_count,
                Saved::V1(_) => 0,
            };
        }
        Ok(self.datapath_effects())
    }
}

/// Checks a saved body against the device that is loading it: same fixed
/// configuration, features it offers, every field in range and consistent.
pub fn validate(body: &BodyV1, config: &DeviceConfig, offered: u64) -> Result<DeviceState, String> {
    let saved = &body.config;
    saved.validate().map_err(|e| format!("saved config: {e}"))?;
    if saved.mac != config.mac
        || saved.max_queue_pairs != config.max_queue_pairs
        || saved.mtu != config.mtu
    {
        return Err(format!(
            "saved device (mac {}, {} queue pairs, mtu {:?}) differs from this one (mac {}, {} queue pairs, mtu {:?})",
            format_mac(&saved.mac), saved.max_queue_pairs, saved.mtu,
            format_mac(&config.mac), config.max_queue_pairs, config.mtu
        ));
    }
    if body.local_migration.is_some() && !config.compat.local_migration {
        return Err(
            "state has a local-migration section but this device has local-migration off".into(),
        );
    }
    let s = &body.state;
    for (what, set) in [("acked", Some(s.acked)), ("accepted", s.accepted)] {
        let Some(set) = set else { continue };
        if set & !body.offered != 0 {
            return Err(format!(
                "{what} features {set:#x} were never offered ({:#x})",
                body.offered
            ));
        }
        features::validate_acked(offered, set)
            .map_err(|e| format!("{what} features unsupported here: {e}"))?;
    }
    if s.status & !status::KNOWN != 0 {
        return Err(format!(
            "unknown status bits {:#x}",
            s.status & !status::KNOWN
        ));
    }
    if s.status & status::FEATURES_OK != 0 && s.features_refused {
        return Err("FEATURES_OK set although the features were refused".into());
    }
    if !is_valid_unicast(&s.mac) {
        return Err(format!(
            "mac {} is not a unicast address",
            format_mac(&s.mac)
        ));
    }
    let table = &s.mac_table;
    if !table.fits()
        || (table.unicast_overflow && !table.unicast.is_empty())
        || (table.multicast_overflow && !table.multicast.is_empty())
    {
        return Err(format!(
            "MAC table with {} unicast / {} multicast entries is inconsistent",
            table.unicast.len(),
            table.multicast.len()
        ));
    }
    if s.vlans.0.len() != VLAN_WORDS {
        return Err(format!(
            "VLAN table has {} words, expected {VLAN_WORDS}",
            s.vlans.0.len()
        ));
    }
    if s.queue_pairs == 0 || s.queue_pairs > config.max_queue_pairs {
        return Err(format!(
            "{} active queue pairs outside 1..={}",
            s.queue_pairs, config.max_queue_pairs
        ));
    }
    if s.queue_pairs > 1 && s.acked & features::MQ == 0 {
        return Err("several queue pairs active without MQ".into());
    }
    let negotiated_offloads = s.acked & features::GUEST_OFFLOADS;
    if s.guest_offloads & !negotiated_offloads != 0
        || !features::guest_offloads_consistent(s.guest_offloads)
    {
        return Err(format!(
            "guest offloads {:#x} not valid for acked features",
            s.guest_offloads
        ));
    }
    if s.announce_pending && s.acked & features::GUEST_ANNOUNCE == 0 {
        return Err("announce pending without GUEST_ANNOUNCE".into());
    }
    let queues = u32::from(config.max_queue_pairs) * 2 + 1;
    let ascending = s.enabled_queues.windows(2).all(|w| w[0] < w[1]);
    if !ascending
        || s.enabled_queues
            .last()
            .is_some_and(|&q| u32::from(q) >= queues)
    {
        return Err(format!(
            "enabled queue list {:?} invalid for {queues} queues",
            s.enabled_queues
        ));
    }
    if let Some(section) = &body.local_migration {
        let expected = LocalMigration {
            vnet_hdr_len: features::vnet_hdr_len(s.acked),
            tap_offloads: features::tap_offloads(s.guest_offloads),
        };
        if *section != expected {
            return Err(format!(
                "local-migration section {section:?} contradicts the features ({expected:?})"
            ));
        }
    }
    Ok(s.clone())
}

/// A saved state rendered as JSON for humans (`sandnic inspect`).
pub fn describe(blob: &[u8]) -> Result<String, String> {
    let saved = decode(blob)?;
    let body = saved.v1();
    let s = &body.state;
    let macs = |list: &[crate::types::Mac]| list.iter().map(format_mac).collect::<Vec<_>>();
    let status_names: Vec<&str> = [
        (status::ACKNOWLEDGE, "ACKNOWLEDGE"),
        (status::DRIVER, "DRIVER"),
        (status::DRIVER_OK, "DRIVER_OK"),
        (status::FEATURES_OK, "FEATURES_OK"),
        (status::NEEDS_RESET, "DEVICE_NEEDS_RESET"),
        (status::FAILED, "FAILED"),
    ]
    .into_iter()
    .filter(|(bit, _)| s.status & bit != 0)
    .map(|(_, name)| name)
    .collect();
    let mut json = serde_json::json!({
        "format": FORMAT,
        "version": saved.version(),
        "config": {
            "mac": format_mac(&body.config.mac),
            "max_queue_pairs": body.config.max_queue_pairs,
            "mtu": body.config.mtu,
            "backend_offloads": body.config.backend_offloads.names(),
            "compat": { "local_migration": body.config.compat.local_migration },
        },
        "features": {
            "offered": features::names(body.offered),
            "acked": features::names(s.acked),
            "accepted": s.accepted.map(features::names),
            "refused_last": s.features_refused,
        },
        "status": status_names,
        "config_generation": s.generation,
        "link_up": s.link_up,
        "announce_pending": s.announce_pending,
        "mac": format_mac(&s.mac),
        "rx_mode": s.rx_mode,
        "mac_table": {
            "unicast": macs(&s.mac_table.unicast),
            "multicast": macs(&s.mac_table.multicast),
            "unicast_overflow": s.mac_table.unicast_overflow,
            "multicast_overflow": s.mac_table.multicast_overflow,
        },
        "vlans": s.vlans.ids(),
        "queue_pairs": s.queue_pairs,
        "guest_offloads": features::names(s.guest_offloads),
        "enabled_queues": s.enabled_queues,
        "local_migration": body.local_migration.map(|m| serde_json::json!({
            "vnet_hdr_len": m.vnet_hdr_len,
            "tap_offloads": m.tap_offloads.names(),
        })),
    });
    if let Saved::V2(v2) = &saved {
        json["announce_count"] = v2.announce_count.into();
    }
    serde_json::to_string_pretty(&json).map_err(|e| e.to_string())
}
