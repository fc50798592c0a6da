//! What the kernel says about a TAP device, read over rtnetlink
//! (RTM_GETLINK):
//!
//! - whether it already serves someone: the count of the queues attached
//!   to it and of those detached but still open (`ip -d link` shows them
//!   as `numqueues` and `numdisabled`). Why sandnic asks before opening a
//!   TAP by name: a multi-queue TAP takes every queue attached to it, from
//!   any process, and the kernel then spreads the guest's inbound flows
//!   over all of them. A second sandnic started on a TAP that a running
//!   one (or a service manager's fd store) still holds would quietly take
//!   half the guest's traffic.
//! - the frames it dropped on the way to the guest (`tx_dropped`): the
//!   TAP's own queue overflowed, as it does while an RX rate limit holds
//!   frames back.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NLMSG_HEADER: usize = 16;
const IFINFOMSG: usize = 16;
const IFLA_LINKINFO: u16 = 18;
const IFLA_STATS64: u16 = 23;
const IFLA_INFO_DATA: u16 = 2;
const IFLA_TUN_NUM_QUEUES: u16 = 8;
const IFLA_TUN_NUM_DISABLED_QUEUES: u16 = 9;
/// Attribute types carry two flag bits (nested, byte order) above these.
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Queues a TAP has open: attached, and detached but still held.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueuesOpen {
    pub attached: u32,
    pub detached: u32,
}

impl QueuesOpen {
    pub fn any(&self) -> bool {
        self.attached + self.detached > 0
    }
}

/// The queue counts of the interface with index `ifindex` (in the calling
/// thread's network namespace); zero for a TUN/TAP device the kernel
/// reports no counts for.
pub fn queues_open(ifindex: u32) -> io::Result<QueuesOpen> {
    let socket = netlink_socket()?;
    parse_link_reply(&query(&socket, ifindex)?)
}

/// The frames the kernel dropped on the way out of the TAP (to the
/// guest): `tx_dropped` of its 64-bit link counters. `socket` is a
/// netlink socket opened before the process was confined (`LinkQuery`).
pub fn tx_dropped(socket: &OwnedFd, ifindex: u32) -> io::Result<u64> {
    parse_tx_dropped(&query(socket, ifindex)?)
}

/// A netlink socket kept for `tx_dropped`: a confined control thread may
/// not open one.
#[derive(Debug)]
pub struct LinkQuery {
    socket: OwnedFd,
    ifindex: u32,
}

impl LinkQuery {
    /// For the interface `name` in the calling thread's namespace.
    pub fn open(name: &str) -> io::Result<Self> {
        let ifindex = nix::net::if_::if_nametoindex(name)?;
        Ok(Self {
            socket: netlink_socket()?,
            ifindex,
        })
    }

    pub fn tx_dropped(&self) -> io::Result<u64> {
        tx_dropped(&self.socket, self.ifindex)
    }
}

/// Sends RTM_GETLINK for `ifindex` and returns the reply.
fn query(socket: &OwnedFd, ifindex: u32) -> io::Result<Vec<u8>> {
    let request = link_request(ifindex);
    // SAFETY: `request` is a live buffer of its length; send only reads it.
    let sent = unsafe {
        libc::send(
            socket.as_raw_fd(),
            request.as_ptr().cast(),
            request.len(),
            0,
        )
    };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut reply = vec![0u8; 64 * 1024];
    // SAFETY: `reply` is a live, writable buffer of its length.
    let n = unsafe {
        libc::recv(
            socket.as_raw_fd(),
            reply.as_mut_ptr().cast(),
            reply.len(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    reply.truncate(n as usize);
    Ok(reply)
}

fn netlink_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain integer arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` was just opened and is owned by nothing else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// RTM_GETLINK for one interface: a netlink header and an `ifinfomsg`.
fn link_request(ifindex: u32) -> Vec<u8> {
    let len = (NLMSG_HEADER + IFINFOMSG) as u32;
    let mut m = Vec::with_capacity(len as usize);
    m.extend_from_slice(&len.to_ne_bytes());
    m.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    m.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    m.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    m.extend_from_slice(&0u32.to_ne_bytes()); // port: the kernel
    m.extend_from_slice(&[libc::AF_UNSPEC as u8, 0]); // family, padding
    m.extend_from_slice(&0u16.to_ne_bytes()); // device type
    m.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    m.extend_from_slice(&0u32.to_ne_bytes()); // flags
    m.extend_from_slice(&0u32.to_ne_bytes()); // change mask
    m
}

/// The counts in an RTM_NEWLINK reply (IFLA_LINKINFO → IFLA_INFO_DATA →
/// IFLA_TUN_NUM_*). Every length is checked against the buffer: the
/// reply is the kernel's, but a parser that trusts lengths is one bug away
/// from reading past it.
fn parse_link_reply(reply: &[u8]) -> io::Result<QueuesOpen> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK reply");
    let attributes = link_attributes(reply)?;
    let mut counts = QueuesOpen::default();
    let Some(info) = attribute(attributes, IFLA_LINKINFO) else {
        return Ok(counts);
    };
    let Some(data) = attribute(info, IFLA_INFO_DATA) else {
        return Ok(counts);
    };
    if let Some(v) = attribute(data, IFLA_TUN_NUM_QUEUES) {
        counts.attached = u32_at(v, 0).ok_or_else(bad)?;
    }
    if let Some(v) = attribute(data, IFLA_TUN_NUM_DISABLED_QUEUES) {
        counts.detached = u32_at(v, 0).ok_or_else(bad)?;
    }
    Ok(counts)
}

/// `tx_dropped` in an RTM_NEWLINK reply's IFLA_STATS64 (a
/// `struct rtnl_link_stats64`, eight u64 counters in, after rx/tx packets,
/// bytes, errors and rx_dropped).
fn parse_tx_dropped(reply: &[u8]) -> io::Result<u64> {
    let missing = || io::Error::new(io::ErrorKind::InvalidData, "no IFLA_STATS64 in the reply");
    let stats = attribute(link_attributes(reply)?, IFLA_STATS64).ok_or_else(missing)?;
    let at = 7 * 8;
    stats
        .get(at..at + 8)
        .map(|b| u64::from_ne_bytes(b.try_into().expect("8 bytes")))
        .ok_or_else(missing)
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_ne_bytes([s[0], s[1]]))
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]]))
}

/// The attributes of an RTM_NEWLINK reply, or the errno of an error reply.
fn link_attributes(reply: &[u8]) -> io::Result<&[u8]> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "malformed RTM_NEWLINK reply");
    let len = u32_at(reply, 0).ok_or_else(bad)? as usize;
    let kind = u16_at(reply, 4).ok_or_else(bad)?;
    let message = reply.get(..len).ok_or_else(bad)?;
    if kind == NLMSG_ERROR {
        let errno = u32_at(message, NLMSG_HEADER).ok_or_else(bad)? as i32;
        return Err(io::Error::from_raw_os_error(-errno));
    }
    if kind != RTM_NEWLINK {
        return Err(bad());
    }
    message.get(NLMSG_HEADER + IFINFOMSG..).ok_or_else(bad)
}

/// The payload of the first attribute of type `wanted` in `attributes`
/// (a run of `rtattr`s, each padded to 4 bytes).
fn attribute(mut attributes: &[u8], wanted: u16) -> Option<&[u8]> {
    while attributes.len() >= 4 {
        let len = usize::from(u16::from_ne_bytes([attributes[0], attributes[1]]));
        let kind = u16::from_ne_bytes([attributes[2], attributes[3]]) & NLA_TYPE_MASK;
        if len < 4 || len > attributes.len() {
            return None;
        }
        if kind == wanted {
            return Some(&attributes[4..len]);
        }
        attributes = attributes.get(len.next_multiple_of(4)..).unwrap_or(&[]);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rtattr(kind: u16, payload: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
        a.extend_from_slice(&kind.to_ne_bytes());
        a.extend_from_slice(payload);
        a.resize(a.len().next_multiple_of(4), 0);
        a
    }

    fn reply(attributes: &[u8]) -> Vec<u8> {
        let len = (NLMSG_HEADER + IFINFOMSG + attributes.len()) as u32;
        let mut m = len.to_ne_bytes().to_vec();
        m.extend_from_slice(&RTM_NEWLINK.to_ne_bytes());
        m.resize(NLMSG_HEADER + IFINFOMSG, 0);
        m.extend_from_slice(attributes);
        m
    }

    #[test]
    fn counts_come_from_the_nested_tun_attributes() {
        let data = [
            rtattr(IFLA_TUN_NUM_QUEUES, &2u32.to_ne_bytes()),
            rtattr(IFLA_TUN_NUM_DISABLED_QUEUES, &1u32.to_ne_bytes()),
        ]
        .concat();
        let info = [rtattr(1, b"tun\0"), rtattr(IFLA_INFO_DATA | 0x8000, &data)].concat();
        let attributes = [rtattr(3, b"tap0\0"), rtattr(IFLA_LINKINFO | 0x8000, &info)].concat();
        assert_eq!(
            parse_link_reply(&reply(&attributes)).unwrap(),
            QueuesOpen {
                attached: 2,
                detached: 1
            }
        );
    }

    #[test]
    fn tx_dropped_is_the_eighth_stats64_counter() {
        let counters: Vec<u8> = (1..=24u64).flat_map(|c| (c * 100).to_ne_bytes()).collect();
        let attributes = [rtattr(3, b"tap0\0"), rtattr(IFLA_STATS64, &counters)].concat();
        assert_eq!(parse_tx_dropped(&reply(&attributes)).unwrap(), 800);
        let short = rtattr(IFLA_STATS64, &counters[..40]);
        assert!(parse_tx_dropped(&reply(&short)).is_err());
    }

    #[test]
    fn a_device_without_tun_data_has_none_open() {
        let attributes = rtattr(3, b"eth0\0");
        assert!(!parse_link_reply(&reply(&attributes)).unwrap().any());
    }

    #[test]
    fn lengths_past_the_buffer_are_refused() {
        let mut broken = reply(&rtattr(IFLA_LINKINFO, &[0; 8]));
        broken[0] = 200;
        assert!(parse_link_reply(&broken).is_err());
        let mut attributes = rtattr(IFLA_LINKINFO, &[0; 8]);
        attributes[0] = 100;
        assert_eq!(
            parse_link_reply(&reply(&attributes)).unwrap(),
            QueuesOpen::default()
        );
    }

    #[test]
    fn a_kernel_error_is_its_errno() {
        let mut m = 36u32.to_ne_bytes().to_vec();
        m.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
        m.resize(NLMSG_HEADER, 0);
        m.extend_from_slice(&(-19i32).to_ne_bytes());
        m.resize(36, 0);
        assert_eq!(parse_link_reply(&m).unwrap_err().raw_os_error(), Some(19));
    }
}
