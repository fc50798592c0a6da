//! Building and reading the Ethernet/IPv4/UDP/ICMP/ARP frames the tests
//! exchange, and a tiny ARP + ping responder so a real `ping` can talk to the
//! test frontend.

pub type Mac = [u8; 6];

pub const ETH_IPV4: u16 = 0x0800;
pub const ETH_ARP: u16 = 0x0806;
pub const ETH_VLAN: u16 = 0x8100;

pub fn ethernet(dst: Mac, src: Mac, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(14 + payload.len());
    f.extend_from_slice(&dst);
    f.extend_from_slice(&src);
    f.extend_from_slice(&ethertype.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// A VLAN-tagged frame.
pub fn ethernet_vlan(dst: Mac, src: Mac, vid: u16, ethertype: u16, payload: &[u8]) -> Vec<u8> {
    let mut inner = vid.to_be_bytes().to_vec();
    inner.extend_from_slice(&ethertype.to_be_bytes());
    inner.extend_from_slice(payload);
    ethernet(dst, src, ETH_VLAN, &inner)
}

pub fn checksum(data: &[u8]) -> u16 {
    let mut sum = 0u32;
    for chunk in data.chunks(2) {
        let word = u16::from_be_bytes([chunk[0], *chunk.get(1).unwrap_or(&0)]);
        sum += u32::from(word);
    }
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

pub fn ipv4(src: [u8; 4], dst: [u8; 4], protocol: u8, payload: &[u8]) -> Vec<u8> {
    let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, protocol, 0, 0];
    let total = (20 + payload.len()) as u16;
    h[2..4].copy_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&src);
    h.extend_from_slice(&dst);
    let sum = checksum(&h);
    h[10..12].copy_from_slice(&sum.to_be_bytes());
    h.extend_from_slice(payload);
    h
}

/// UDP with checksum 0 (allowed on IPv4).
pub fn udp(src_port: u16, dst_port: u16, payload: &[u8]) -> Vec<u8> {
    let mut u = Vec::with_capacity(8 + payload.len());
    u.extend_from_slice(&src_port.to_be_bytes());
    u.extend_from_slice(&dst_port.to_be_bytes());
    u.extend_from_slice(&((8 + payload.len()) as u16).to_be_bytes());
    u.extend_from_slice(&[0, 0]);
    u.extend_from_slice(payload);
    u
}

pub fn udp_frame(
    dst: Mac,
    src: Mac,
    ips: ([u8; 4], [u8; 4]),
    ports: (u16, u16),
    payload: &[u8],
) -> Vec<u8> {
    ethernet(
        dst,
        src,
        ETH_IPV4,
        &ipv4(ips.0, ips.1, 17, &udp(ports.0, ports.1, payload)),
    )
}

/// The UDP payload of an untagged IPv4/UDP frame.
pub fn udp_payload(frame: &[u8]) -> Option<&[u8]> {
    if frame.len() < 42 || frame[12..14] != ETH_IPV4.to_be_bytes() || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0xf) * 4;
    frame.get(14 + ihl + 8..)
}

/// Answers ARP requests for `ip` and ICMP echo requests to it; None for
/// any other frame.
pub fn respond(frame: &[u8], mac: Mac, ip: [u8; 4]) -> Option<Vec<u8>> {
    let src: Mac = frame.get(6..12)?.try_into().ok()?;
    match u16::from_be_bytes([*frame.get(12)?, *frame.get(13)?]) {
        ETH_ARP => {
            let arp = frame.get(14..42)?;
            if arp[6..8] != [0, 1] || arp[24..28] != ip {
                return None;
            }
            let mut reply = vec![0, 1, 8, 0, 6, 4, 0, 2];
            reply.extend_from_slice(&mac);
            reply.extend_from_slice(&ip);
            reply.extend_from_slice(&arp[8..14]);
            reply.extend_from_slice(&arp[14..18]);
            Some(ethernet(src, mac, ETH_ARP, &reply))
        }
        ETH_IPV4 => {
            let ihl = usize::from(frame.get(14)? & 0xf) * 4;
            let ip_hdr = frame.get(14..14 + ihl)?;
            if ip_hdr[9] != 1 || ip_hdr[16..20] != ip {
                return None;
            }
            let total = usize::from(u16::from_be_bytes([ip_hdr[2], ip_hdr[3]]));
            let icmp = frame.get(14 + ihl..14 + total)?;
            if icmp.first() != Some(&8) {
                return None;
            }
            let mut reply = icmp.to_vec();
            reply[0] = 0;
            reply[2..4].copy_from_slice(&[0, 0]);
            let sum = checksum(&reply);
            reply[2..4].copy_from_slice(&sum.to_be_bytes());
            let src_ip: [u8; 4] = ip_hdr[12..16].try_into().ok()?;
            Some(ethernet(src, mac, ETH_IPV4, &ipv4(ip, src_ip, 1, &reply)))
        }
        _ => None,
    }
}
