//! The virtio-net configuration space (virtio 1.2 §5.1.4):
//!
//! ```text
//! 0  mac[6]               read-only (writable only by legacy drivers without CTRL_MAC_ADDR)
//! 6  le16 status          read-only: LINK_UP, ANNOUNCE
//! 8  le16 max_virtqueue_pairs
//! 10 le16 mtu
//! ```
//! Reads are allowed anywhere in the vhost-user config window; bytes past the
//! fields above read as zero, as for any absent field.

use crate::types::Mac;

pub const STATUS_LINK_UP: u16 = 1;
pub const STATUS_ANNOUNCE: u16 = 2;

const MAC_END: u32 = 6;
/// Length of the fields this device defines.
pub const CONFIG_LEN: usize = 12;
/// vhost-user's largest config access (VHOST_USER_MAX_CONFIG_SIZE). A bound
/// because the driver chooses offset and length.
pub const MAX_CONFIG_WINDOW: u32 = 256;

/// The values the config space shows.
pub struct ConfigView {
    pub mac: Mac,
    pub status: u16,
    pub max_queue_pairs: u16,
    pub mtu: u16,
}

impl ConfigView {
    fn bytes(&self) -> [u8; CONFIG_LEN] {
        let mut b = [0; CONFIG_LEN];
        b[0..6].copy_from_slice(&self.mac);
        b[6..8].copy_from_slice(&self.status.to_le_bytes());
        b[8..10].copy_from_slice(&self.max_queue_pairs.to_le_bytes());
        b[10..12].copy_from_slice(&self.mtu.to_le_bytes());
        b
    }

    /// `len` bytes at `offset`, or why the access is refused.
    pub fn read(&self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        let end = window_end(offset, len)?;
        let bytes = self.bytes();
        Ok((offset..end)
            .map(|i| bytes.get(i as usize).copied().unwrap_or(0))
            .collect())
    }
}

fn window_end(offset: u32, len: u32) -> Result<u32, String> {
    match offset.checked_add(len) {
        Some(end) if end <= MAX_CONFIG_WINDOW => Ok(end),
        _ => Err(format!(
            "config access {offset}+{len} outside the {MAX_CONFIG_WINDOW}-byte window"
        )),
    }
}

/// Applies a driver write to `mac` when the write is allowed: only inside the
/// mac field, and only when `mac_writable` (legacy driver without
/// CTRL_MAC_ADDR). Every other field is read-only.
pub fn write(mac: &mut Mac, mac_writable: bool, offset: u32, data: &[u8]) -> Result<(), String> {
    let len = u32::try_from(data.len()).map_err(|_| "config write too long".to_string())?;
    let end = window_end(offset, len)?;
    if end > MAC_END || len == 0 {
        return Err(format!("config bytes {offset}..{end} are read-only"));
    }
    if !mac_writable {
        return Err("mac is read-only once VERSION_1 or CTRL_MAC_ADDR is negotiated".into());
    }
    let mut new = *mac;
    new[offset as usize..end as usize].copy_from_slice(data);
    // Same rule as MAC_ADDR_SET: the device's address stays a unicast one
    // (and a saved state with anything else would not load).
    if !crate::types::is_valid_unicast(&new) {
        return Err(format!(
            "mac {} is not a unicast address",
            crate::types::format_mac(&new)
        ));
    }
    *mac = new;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view() -> ConfigView {
        ConfigView {
            mac: [0x52, 0x54, 0, 1, 2, 3],
            status: STATUS_LINK_UP,
            max_queue_pairs: 4,
            mtu: 1500,
        }
    }

    #[test]
    fn layout_matches_the_spec() {
        let all = view().read(0, 12).unwrap();
        assert_eq!(all, [0x52, 0x54, 0, 1, 2, 3, 1, 0, 4, 0, 0xdc, 0x05]);
        assert_eq!(view().read(8, 2).unwrap(), [4, 0]);
        assert_eq!(view().read(10, 6).unwrap(), [0xdc, 0x05, 0, 0, 0, 0]);
        assert_eq!(view().read(0, 0).unwrap(), Vec::<u8>::new());
    }

    #[test]
    fn out_of_window_reads_fail() {
        assert!(view().read(250, 7).is_err());
        assert!(view().read(u32::MAX, 2).is_err());
        assert!(view().read(0, 257).is_err());
    }

    #[test]
    fn writes_only_to_a_legacy_writable_mac() {
        let mut mac = [0x52, 0x54, 0, 1, 2, 3];
        assert!(write(&mut mac, false, 0, &[1]).is_err());
        assert!(
            write(&mut mac, true, 6, &[0, 0]).is_err(),
            "status is read-only"
        );
        assert!(
            write(&mut mac, true, 5, &[9, 9]).is_err(),
            "straddles into status"
        );
        assert!(write(&mut mac, true, 8, &[1, 0]).is_err());
        assert!(write(&mut mac, true, 0, &[]).is_err());
        assert_eq!(mac, [0x52, 0x54, 0, 1, 2, 3]);
        write(&mut mac, true, 3, &[7, 8, 9]).unwrap();
        assert_eq!(mac, [0x52, 0x54, 0, 7, 8, 9]);
        assert!(write(&mut mac, true, 0, &[0x3b]).is_err(), "multicast");
        assert_eq!(mac, [0x52, 0x54, 0, 7, 8, 9]);
    }
}
