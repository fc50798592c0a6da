//! Which queue of a multi-queue TAP gets a frame the host sends: the test's
//! choice, not the kernel's.
//!
//! Why this exists: without a steering program the kernel picks the queue
//! of a host-to-guest frame from a hash of its flow, seeded at random on
//! every boot, unless the guest sent on the same flow within the last few
//! seconds (the TAP's flow table, whose entries the guest's frames renew
//! and the host's do not). A test that waits for a host frame on pair 0
//! then passes on some machines and fails on others, and a test that
//! relies on the flow table passes or fails by how long it took.
//!
//! - [`steer_by_priority`] puts a steering program on a TAP: a frame goes
//!   to queue `priority % queues`, the priority being the sending socket's
//!   `SO_PRIORITY` ([`send_on_pair`]). The kernel's own frames (priority 0)
//!   go to pair 0. With a program set, the TAP keeps no flow table, so
//!   nothing depends on timing either.
//! - [`natural_queues`] tells where the kernel would put each of a list of
//!   flows without a program, on a TAP of its own: the tests use it to pick
//!   host ports that the hash spreads over every queue, and pass with each
//!   (the proof that the hash no longer decides anything).

use crate::harness::NetNs;
use anyhow::{bail, Context};
use sandnic_host::tap::Tap;
use std::net::UdpSocket;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

/// `TUNSETSTEERINGEBPF`: `_IOR('T', 224, int)`.
const TUNSETSTEERINGEBPF: libc::c_ulong = 0x8004_54e0;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SOCKET_FILTER: u32 = 1;
/// Offset of `priority` in `struct __sk_buff` (after len, pkt_type, mark,
/// queue_mapping, protocol, vlan_present, vlan_tci and vlan_proto).
const SKB_PRIORITY: i16 = 32;

/// One eBPF instruction (`struct bpf_insn`).
#[repr(C)]
struct BpfInsn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// The `BPF_PROG_LOAD` member of `union bpf_attr`, padded to the size of
/// the fields the kernel may read (the rest must be zero).
#[repr(C, align(8))]
struct ProgLoadAttr {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    rest: [u8; 96],
}

/// Loads `r0 = skb->priority; exit`, a program that names the queue.
fn load_priority_program() -> anyhow::Result<OwnedFd> {
    let program = [
        // BPF_LDX | BPF_MEM | BPF_W: r0 = *(u32 *)(r1 + SKB_PRIORITY)
        BpfInsn {
            code: 0x61,
            regs: 0x10,
            off: SKB_PRIORITY,
            imm: 0,
        },
        // BPF_JMP | BPF_EXIT
        BpfInsn {
            code: 0x95,
            regs: 0,
            off: 0,
            imm: 0,
        },
    ];
    let license = c"GPL";
    let mut log = vec![0u8; 4096];
    let attr = ProgLoadAttr {
        prog_type: BPF_PROG_TYPE_SOCKET_FILTER,
        insn_cnt: program.len() as u32,
        insns: program.as_ptr() as u64,
        license: license.as_ptr() as u64,
        log_level: 1,
        log_size: log.len() as u32,
        log_buf: log.as_mut_ptr() as u64,
        rest: [0; 96],
    };
    // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute whose pointers
    // (program, license, log) outlive the call; the size passed is its own.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        let err = std::io::Error::last_os_error();
        let end = log.iter().position(|&b| b == 0).unwrap_or(log.len());
        bail!(
            "loading the TAP steering program: {err} ({})",
            String::from_utf8_lossy(&log[..end]).trim()
        );
    }
    // SAFETY: the kernel just returned this fd, and nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Puts the priority-steering program on TAP `tap` in `ns`, which no
/// process may have open yet. The program stays on the (persistent) device
/// after the queue used to set it closes; it goes with the device.
pub fn steer_by_priority(ns: &NetNs, tap: &str) -> anyhow::Result<()> {
    let tap = tap.to_string();
    ns.inside(move || {
        let program = load_priority_program()?;
        let queue = Tap::open(&tap, 1).with_context(|| format!("opening {tap}"))?;
        let fd = queue.queue(0).context("no queue")?;
        let prog_fd: libc::c_int = program.as_raw_fd();
        // SAFETY: TUNSETSTEERINGEBPF reads one int (the program's fd)
        // through the pointer, which points at `prog_fd` for the call.
        let r = unsafe { libc::ioctl(fd.as_raw_fd(), TUNSETSTEERINGEBPF, &prog_fd) };
        if r < 0 {
            bail!(
                "TUNSETSTEERINGEBPF on {tap}: {}",
                std::io::Error::last_os_error()
            );
        }
        Ok(())
    })
}

/// Makes `socket` send on queue pair `pair` of a TAP that
/// `steer_by_priority` set up.
pub fn send_on_pair(socket: &UdpSocket, pair: usize) -> anyhow::Result<()> {
    let priority = libc::c_int::try_from(pair)?;
    nix::sys::socket::setsockopt(socket, nix::sys::socket::sockopt::Priority, &priority)
        .context("SO_PRIORITY")?;
    Ok(())
}

/// Where the kernel puts UDP flows `host:port → guest:guest_port` on a
/// TAP with `queues` queues and no steering program, for each port in
/// `ports`. The flow hash depends on the flow and a per-boot seed, not on
/// the device, so a probe TAP of its own (in its own namespace, with the
/// same addresses) tells what any such TAP does on this boot.
pub fn natural_queues(
    host: [u8; 4],
    guest: [u8; 4],
    guest_port: u16,
    queues: usize,
    ports: &[u16],
) -> anyhow::Result<Vec<usize>> {
    let ns = NetNs::new()?;
    ns.ip(&[
        "tuntap",
        "add",
        "dev",
        "probe0",
        "mode",
        "tap",
        "vnet_hdr",
        "multi_queue",
    ])?;
    let host_ip = std::net::Ipv4Addr::from(host);
    let guest_ip = std::net::Ipv4Addr::from(guest);
    ns.ip(&["addr", "add", &format!("{host_ip}/24"), "dev", "probe0"])?;
    ns.ip(&["link", "set", "probe0", "up"])?;
    ns.add_static_neighbour(&guest_ip.to_string(), "52:54:00:12:34:56", "probe0")?;
    let tap = ns.inside(|| Tap::open("probe0", queues).context("opening probe0"))?;
    tap.set_vnet_hdr_len(12)?;
    let mut found = Vec::with_capacity(ports.len());
    for &port in ports {
        let socket = ns.inside(move || Ok(UdpSocket::bind((host_ip, port))?))?;
        found.push(queue_of(&tap, &socket, (guest_ip, guest_port))?);
    }
    Ok(found)
}

/// The queue of `tap` that a probe sent on `socket` to `to` comes out of.
/// The probe is sent again every 50 ms until one comes out: a TAP whose
/// first queue was just attached gets its carrier at once but its queueing
/// discipline only when the kernel's link watcher runs (up to a second
/// later), and until then what is sent on it is dropped.
fn queue_of(tap: &Tap, socket: &UdpSocket, to: (std::net::Ipv4Addr, u16)) -> anyhow::Result<usize> {
    let port = socket.local_addr()?.port();
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut buf = [0u8; 2048];
    let mut next_send = Instant::now();
    while Instant::now() < deadline {
        if Instant::now() >= next_send {
            socket.send_to(b"probe", to)?;
            next_send = Instant::now() + Duration::from_millis(50);
        }
        for queue in 0..tap.queue_count() {
            let fd = tap.queue(queue).context("queue")?;
            let n = match nix::unistd::read(fd.as_fd().as_raw_fd(), &mut buf) {
                Ok(n) => n,
                Err(nix::errno::Errno::EAGAIN) => continue,
                Err(e) => bail!("reading the probe TAP: {e}"),
            };
            // 12-byte virtio-net header, Ethernet, IPv4 without options,
            // then the UDP source port.
            let frame = &buf[..n];
            let is_ipv4_udp = frame.len() >= 12 + 14 + 20 + 8
                && frame[12 + 12..12 + 14] == [0x08, 0x00]
                && frame[12 + 14 + 9] == 17;
            if is_ipv4_udp && frame[12 + 34..12 + 36] == port.to_be_bytes() {
                return Ok(queue);
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    bail!("the probe from port {port} came out of no queue")
}

/// Host ports from `first` on, one or more for each of `queues` queues by
/// where the hash puts them: the sweep that shows a test does not depend
/// on it. Fails if a queue gets none of 64 ports (odds of 2^-63 per queue).
pub fn ports_covering_every_queue(
    host: [u8; 4],
    guest: [u8; 4],
    guest_port: u16,
    queues: usize,
    first: u16,
) -> anyhow::Result<Vec<u16>> {
    let candidates: Vec<u16> = (first..first + 64).collect();
    let natural = natural_queues(host, guest, guest_port, queues, &candidates)?;
    let mut chosen = Vec::with_capacity(queues);
    for queue in 0..queues {
        let at = natural
            .iter()
            .position(|&q| q == queue)
            .with_context(|| format!("no port of {candidates:?} hashes to queue {queue}"))?;
        chosen.push(candidates[at]);
    }
    Ok(chosen)
}
