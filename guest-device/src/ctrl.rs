//! Control-queue command parsing (virtio 1.2 §5.1.6.5).
//!
//! The host hands over the readable bytes of one control chain: class,
//! command, then command-specific data. Everything here treats those bytes as
//! hostile: lengths come from the payload itself, never from counts the guest
//! wrote, so a MAC table whose counts exceed its payload (CVE-2014-0150) is a
//! parse error, not an overflow.

use crate::features;
use crate::types::Mac;
use std::fmt;

pub const CLASS_RX: u8 = 0;
pub const CLASS_MAC: u8 = 1;
pub const CLASS_VLAN: u8 = 2;
pub const CLASS_ANNOUNCE: u8 = 3;
pub const CLASS_MQ: u8 = 4;
pub const CLASS_GUEST_OFFLOADS: u8 = 5;

pub const RX_PROMISC: u8 = 0;
pub const RX_ALLMULTI: u8 = 1;
pub const RX_ALLUNI: u8 = 2;
pub const RX_NOMULTI: u8 = 3;
pub const RX_NOUNI: u8 = 4;
pub const RX_NOBCAST: u8 = 5;
pub const MAC_TABLE_SET: u8 = 0;
pub const MAC_ADDR_SET: u8 = 1;
pub const VLAN_ADD: u8 = 0;
pub const VLAN_DEL: u8 = 1;
pub const ANNOUNCE_ACK: u8 = 0;
pub const MQ_VQ_PAIRS_SET: u8 = 0;
pub const GUEST_OFFLOADS_SET: u8 = 0;

/// One of the six RX-mode switches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum RxSwitch {
    Promisc = RX_PROMISC,
    AllMulti = RX_ALLMULTI,
    AllUni = RX_ALLUNI,
    NoMulti = RX_NOMULTI,
    NoUni = RX_NOUNI,
    NoBcast = RX_NOBCAST,
}

/// A well-formed control command. Values are not yet checked against the
/// device state (that is [`crate::device`]'s job); shapes and lengths are.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlCommand {
    Rx {
        switch: RxSwitch,
        on: bool,
    },
    MacTableSet {
        unicast: Vec<Mac>,
        multicast: Vec<Mac>,
    },
    MacAddrSet(Mac),
    VlanAdd(u16),
    VlanDel(u16),
    AnnounceAck,
    MqPairsSet(u16),
    GuestOffloadsSet(u64),
}

/// Why a command is answered with VIRTIO_NET_ERR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CtrlError {
    MissingHeader,
    Unknown {
        class: u8,
        command: u8,
    },
    BadLength {
        class: u8,
        command: u8,
        expected: &'static str,
        got: usize,
    },
    MacTableCount {
        table: &'static str,
        count: u32,
        room: usize,
    },
    NotNegotiated {
        feature: u64,
    },
    Invalid(String),
}

impl fmt::Display for CtrlError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::MissingHeader => write!(f, "command shorter than its 2-byte header"),
            Self::Unknown { class, command } => {
                write!(f, "unknown command class {class} command {command}")
            }
            Self::BadLength {
                class,
                command,
                expected,
                got,
            } => {
                write!(
                    f,
                    "class {class} command {command}: data is {got} bytes, expected {expected}"
                )
            }
            Self::MacTableCount { table, count, room } => {
                write!(
                    f,
                    "{table} MAC table claims {count} entries but the payload holds {room}"
                )
            }
            Self::NotNegotiated { feature } => {
                write!(
                    f,
                    "command needs feature {} which is not negotiated",
                    features::names(*feature).join(",")
                )
            }
            Self::Invalid(why) => f.write_str(why),
        }
    }
}

impl CtrlCommand {
    /// The feature the driver must have negotiated to use this command.
    /// The wire form of this command (class, command, data): what a driver
    /// puts in the readable part of a control chain. `parse` inverts it.
    pub fn encode(&self) -> Vec<u8> {
        let (class, command, data) = match self {
            Self::Rx { switch, on } => (CLASS_RX, *switch as u8, vec![u8::from(*on)]),
            Self::MacTableSet { unicast, multicast } => {
                let mut data = Vec::with_capacity(8 + 6 * (unicast.len() + multicast.len()));
                for list in [unicast, multicast] {
                    data.extend_from_slice(&(list.len() as u32).to_le_bytes());
                    list.iter().for_each(|mac| data.extend_from_slice(mac));
                }
                (CLASS_MAC, MAC_TABLE_SET, data)
            }
            Self::MacAddrSet(mac) => (CLASS_MAC, MAC_ADDR_SET, mac.to_vec()),
            Self::VlanAdd(vid) => (CLASS_VLAN, VLAN_ADD, vid.to_le_bytes().to_vec()),
            Self::VlanDel(vid) => (CLASS_VLAN, VLAN_DEL, vid.to_le_bytes().to_vec()),
            Self::AnnounceAck => (CLASS_ANNOUNCE, ANNOUNCE_ACK, vec![]),
            Self::MqPairsSet(pairs) => (CLASS_MQ, MQ_VQ_PAIRS_SET, pairs.to_le_bytes().to_vec()),
            Self::GuestOffloadsSet(bits) => (
                CLASS_GUEST_OFFLOADS,
                GUEST_OFFLOADS_SET,
                bits.to_le_bytes().to_vec(),
            ),
        };
        let mut bytes = vec![class, command];
        bytes.extend_from_slice(&data);
        bytes
    }

    pub fn required_feature(&self) -> u64 {
        match self {
            Self::Rx {
                switch: RxSwitch::Promisc | RxSwitch::AllMulti,
                ..
            } => features::CTRL_RX,
            Self::Rx { .. } => features::CTRL_RX_EXTRA,
            Self::MacTableSet { .. } => features::CTRL_RX,
            Self::MacAddrSet(_) => features::CTRL_MAC_ADDR,
            Self::VlanAdd(_) | Self::VlanDel(_) => features::CTRL_VLAN,
            Self::AnnounceAck => features::GUEST_ANNOUNCE,
            Self::MqPairsSet(_) => features::MQ,
            Self::GuestOffloadsSet(_) => features::CTRL_GUEST_OFFLOADS,
        }
    }
}

/// Parses one command from the readable bytes of a control chain.
pub fn parse(bytes: &[u8]) -> Result<CtrlCommand, CtrlError> {
    let [class, command, data @ ..] = bytes else {
        return Err(CtrlError::MissingHeader);
    };
    let (class, command) = (*class, *command);
    let fixed = |len: usize, expected: &'static str| -> Result<&[u8], CtrlError> {
        if data.len() == len {
            Ok(data)
        } else {
            Err(CtrlError::BadLength {
                class,
                command,
                expected,
                got: data.len(),
            })
        }
    };
    let parsed = match (class, command) {
        (CLASS_RX, RX_PROMISC..=RX_NOBCAST) => {
            let switch = [
                RxSwitch::Promisc,
                RxSwitch::AllMulti,
                RxSwitch::AllUni,
                RxSwitch::NoMulti,
                RxSwitch::NoUni,
                RxSwitch::NoBcast,
            ][usize::from(command)];
            CtrlCommand::Rx {
                switch,
                on: fixed(1, "1")?[0] != 0,
            }
        }
        (CLASS_MAC, MAC_TABLE_SET) => parse_mac_tables(data)?,
        (CLASS_MAC, MAC_ADDR_SET) => CtrlCommand::MacAddrSet(to_mac(fixed(6, "6")?)),
        (CLASS_VLAN, VLAN_ADD) => CtrlCommand::VlanAdd(le16(fixed(2, "2")?)),
        (CLASS_VLAN, VLAN_DEL) => CtrlCommand::VlanDel(le16(fixed(2, "2")?)),
        (CLASS_ANNOUNCE, ANNOUNCE_ACK) => {
            fixed(0, "0")?;
            CtrlCommand::AnnounceAck
        }
        (CLASS_MQ, MQ_VQ_PAIRS_SET) => CtrlCommand::MqPairsSet(le16(fixed(2, "2")?)),
        (CLASS_GUEST_OFFLOADS, GUEST_OFFLOADS_SET) => {
            let d = fixed(8, "8")?;
            CtrlCommand::GuestOffloadsSet(u64::from_le_bytes([
                d[0], d[1], d[2], d[3], d[4], d[5], d[6], d[7],
            ]))
        }
        _ => return Err(CtrlError::Unknown { class, command }),
    };
    Ok(parsed)
}

/// `le32 n, n × mac, le32 m, m × mac` and nothing after. Each count is
/// checked against the bytes actually present before any address is read.
fn parse_mac_tables(data: &[u8]) -> Result<CtrlCommand, CtrlError> {
    let (unicast, rest) = mac_list(data, "unicast")?;
    let (multicast, rest) = mac_list(rest, "multicast")?;
    if !rest.is_empty() {
        return Err(CtrlError::BadLength {
            class: CLASS_MAC,
            command: MAC_TABLE_SET,
            expected: "exactly the two tables",
            got: data.len(),
        });
    }
    Ok(CtrlCommand::MacTableSet { unicast, multicast })
}

fn mac_list<'a>(data: &'a [u8], table: &'static str) -> Result<(Vec<Mac>, &'a [u8]), CtrlError> {
    let Some((count, rest)) = data.split_first_chunk::<4>() else {
        return Err(CtrlError::BadLength {
            class: CLASS_MAC,
            command: MAC_TABLE_SET,
            expected: "a 4-byte count",
            got: data.len(),
        });
    };
    let count = u32::from_le_bytes(*count);
    let room = rest.len() / 6;
    if u64::from(count) > room as u64 {
        return Err(CtrlError::MacTableCount { table, count, room });
    }
    let (macs, rest) = rest.split_at(count as usize * 6);
    Ok((macs.chunks_exact(6).map(to_mac).collect(), rest))
}

fn to_mac(bytes: &[u8]) -> Mac {
    let mut mac = [0; 6];
    mac.copy_from_slice(bytes);
    mac
}

fn le16(bytes: &[u8]) -> u16 {
    u16::from_le_bytes([bytes[0], bytes[1]])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac_table_bytes(uni: &[Mac], multi: &[Mac]) -> Vec<u8> {
        CtrlCommand::MacTableSet {
            unicast: uni.to_vec(),
            multicast: multi.to_vec(),
        }
        .encode()
    }

    #[test]
    fn parses_every_known_command() {
        assert_eq!(
            parse(&[0, 0, 1]),
            Ok(CtrlCommand::Rx {
                switch: RxSwitch::Promisc,
                on: true
            })
        );
        assert_eq!(
            parse(&[0, 5, 0]),
            Ok(CtrlCommand::Rx {
                switch: RxSwitch::NoBcast,
                on: false
            })
        );
        assert_eq!(
            parse(&[1, 1, 2, 0, 0, 0, 0, 9]),
            Ok(CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 9]))
        );
        assert_eq!(parse(&[2, 0, 0x64, 0]), Ok(CtrlCommand::VlanAdd(100)));
        assert_eq!(parse(&[2, 1, 0xff, 0x0f]), Ok(CtrlCommand::VlanDel(4095)));
        assert_eq!(parse(&[3, 0]), Ok(CtrlCommand::AnnounceAck));
        assert_eq!(parse(&[4, 0, 2, 0]), Ok(CtrlCommand::MqPairsSet(2)));
        assert_eq!(
            parse(&[5, 0, 3, 0, 0, 0, 0, 0, 0, 0]),
            Ok(CtrlCommand::GuestOffloadsSet(3))
        );
        let uni = [[2, 0, 0, 0, 0, 1]];
        let multi = [[1, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]];
        assert_eq!(
            parse(&mac_table_bytes(&uni, &multi)),
            Ok(CtrlCommand::MacTableSet {
                unicast: uni.to_vec(),
                multicast: multi.to_vec()
            })
        );
    }

    #[test]
    fn encode_inverts_parse() {
        let commands = [
            CtrlCommand::Rx {
                switch: RxSwitch::AllUni,
                on: true,
            },
            CtrlCommand::MacTableSet {
                unicast: vec![[2, 0, 0, 0, 0, 1]],
                multicast: vec![],
            },
            CtrlCommand::MacAddrSet([2, 0, 0, 0, 0, 7]),
            CtrlCommand::VlanAdd(7),
            CtrlCommand::VlanDel(4095),
            CtrlCommand::AnnounceAck,
            CtrlCommand::MqPairsSet(3),
            CtrlCommand::GuestOffloadsSet(features::GUEST_CSUM),
        ];
        for command in commands {
            assert_eq!(parse(&command.encode()), Ok(command));
        }
    }

    #[test]
    fn refuses_unknown_and_short_commands() {
        assert_eq!(parse(&[]), Err(CtrlError::MissingHeader));
        assert_eq!(parse(&[0]), Err(CtrlError::MissingHeader));
        assert!(matches!(parse(&[0, 6, 1]), Err(CtrlError::Unknown { .. })));
        assert!(
            matches!(parse(&[4, 1]), Err(CtrlError::Unknown { .. })),
            "RSS is not offered"
        );
        assert!(matches!(parse(&[6, 0]), Err(CtrlError::Unknown { .. })));
        assert!(matches!(parse(&[0, 0]), Err(CtrlError::BadLength { .. })));
        assert!(matches!(
            parse(&[0, 0, 1, 1]),
            Err(CtrlError::BadLength { .. })
        ));
        assert!(matches!(
            parse(&[1, 1, 2, 0, 0]),
            Err(CtrlError::BadLength { .. })
        ));
        assert!(matches!(
            parse(&[2, 0, 1]),
            Err(CtrlError::BadLength { .. })
        ));
        assert!(matches!(
            parse(&[3, 0, 0]),
            Err(CtrlError::BadLength { .. })
        ));
        assert!(matches!(
            parse(&[5, 0, 1, 0, 0, 0]),
            Err(CtrlError::BadLength { .. })
        ));
    }

    #[test]
    fn mac_table_counts_must_match_the_payload() {
        // CVE-2014-0150: a count far beyond the payload.
        let mut b = vec![CLASS_MAC, MAC_TABLE_SET];
        b.extend_from_slice(&u32::MAX.to_le_bytes());
        b.extend_from_slice(&[0; 12]);
        assert!(matches!(
            parse(&b),
            Err(CtrlError::MacTableCount {
                table: "unicast",
                ..
            })
        ));
        // Second count too large by one.
        let mut b = mac_table_bytes(&[[2, 0, 0, 0, 0, 1]], &[[1, 0, 0, 0, 0, 1]]);
        let n = b.len();
        b[n - 10] = 2;
        assert!(matches!(
            parse(&b),
            Err(CtrlError::MacTableCount {
                table: "multicast",
                ..
            })
        ));
        // Trailing garbage, missing second table.
        let mut b = mac_table_bytes(&[], &[]);
        b.push(0);
        assert!(matches!(parse(&b), Err(CtrlError::BadLength { .. })));
        assert!(matches!(
            parse(&[1, 0, 0, 0, 0, 0]),
            Err(CtrlError::BadLength { .. })
        ));
    }
}
