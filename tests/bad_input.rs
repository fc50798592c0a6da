//! Hostile input from the frontend and the guest: malformed descriptor
//! chains, malformed control commands, unknown or malformed vhost-user
//! requests, a frontend that disconnects. Each is counted and logged; the
//! backend never panics and the other queues keep working.

use sandnic::frames;
use sandnic::frontend::{NicConfig, QueueId, RawDesc, TestNic};
use sandnic::harness::Rig;
use sandnic::require_network;
use sandnic_host::vhost_user::wire::{self, Header, NEED_REPLY, VERSION};
use std::net::UdpSocket;
use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const F_INDIRECT: u16 = 4;

fn rig() -> Rig {
    Rig::new(
        &["--queues", "2"],
        NicConfig {
            pairs: 2,
            ..NicConfig::default()
        },
    )
    .expect("rig")
}

fn host_udp(rig: &Rig, port: u16) -> UdpSocket {
    let sock = rig
        .ns
        .inside(move || Ok(UdpSocket::bind(("10.77.0.1", port))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock
}

/// Waits until `bad_chains` of `pair` reaches `n`.
fn wait_bad_chains(rig: &Rig, pair: usize, n: u64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.stat(pair, "bad_chains") < n {
        assert!(
            Instant::now() < deadline,
            "bad chain not counted: {}",
            rig.sandnic.stats().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Host ports whose flows the kernel's hash spreads over both pairs: the
/// tests that need host frames on pair 0 pass with each, so they do not
/// depend on the hash (the rig's TAP steers them to pair 0).
fn sweep_ports() -> Vec<u16> {
    sandnic::harness::rig_sweep_ports(2, 6100)
}

/// The host sends to the guest from `sock`.
fn send_to_guest(sock: &UdpSocket, payload: &[u8]) {
    sock.send_to(payload, "10.77.0.2:5000").unwrap();
}

/// Normal traffic on pair 0 still flows (guest to the host's `sock`).
fn assert_pair0_works(rig: &mut Rig, sock: &UdpSocket, tag: u8) {
    let port = sock.local_addr().unwrap().port();
    let frame = rig.guest_udp(port, &[tag; 50]);
    rig.nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = sock
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("traffic stopped ({e}): {}", rig.sandnic.log()));
    assert_eq!(&buf[..n], &[tag; 50]);
}

/// Builds a chain from the reserved descriptor slots: (descriptors, index
/// of the head among them).
type ChainBuilder<'a> = dyn Fn(&[u16]) -> (Vec<RawDesc>, usize) + 'a;

/// A chain of one descriptor, built without looking at the reserved slots.
fn single(desc: RawDesc) -> impl Fn(&[u16]) -> (Vec<RawDesc>, usize) {
    move |_| (vec![desc], 0)
}

#[test]
fn malformed_tx_chains_are_counted_and_skipped() {
    require_network!("malformed_tx_chains_are_counted_and_skipped");
    let mut rig = rig();
    let sock = host_udp(&rig, 6100);
    let buf = rig.nic.scratch(4096).0;
    let tx = QueueId::Tx(1);
    let mut expected = 0;
    let mut send = |rig: &mut Rig, build: &ChainBuilder<'_>, n: usize| {
        let slots = rig.nic.reserve(tx, n);
        let (descs, head) = build(&slots);
        rig.nic.raw_chain(tx, &descs, &slots, slots[head]);
        expected += 1;
        wait_bad_chains(rig, 1, expected);
    };
    // A loop: 0 → 1 → 0.
    send(
        &mut rig,
        &|s| {
            (
                vec![
                    RawDesc {
                        addr: buf,
                        len: 64,
                        flags: F_NEXT,
                        next: s[1],
                    },
                    RawDesc {
                        addr: buf,
                        len: 64,
                        flags: F_NEXT,
                        next: s[0],
                    },
                ],
                0,
            )
        },
        2,
    );
    // An address outside guest memory.
    send(
        &mut rig,
        &single(RawDesc {
            addr: 0xdead_0000_0000,
            len: 100,
            flags: 0,
            next: 0,
        }),
        1,
    );
    // Zero and huge lengths.
    send(
        &mut rig,
        &single(RawDesc {
            addr: buf,
            len: 0,
            flags: 0,
            next: 0,
        }),
        1,
    );
    send(
        &mut rig,
        &single(RawDesc {
            addr: buf,
            len: u32::MAX,
            flags: 0,
            next: 0,
        }),
        1,
    );
    // Wrong direction: a device-writable buffer on TX.
    send(
        &mut rig,
        &single(RawDesc {
            addr: buf,
            len: 100,
            flags: F_WRITE,
            next: 0,
        }),
        1,
    );
    // A next index past the table.
    send(
        &mut rig,
        &single(RawDesc {
            addr: buf,
            len: 100,
            flags: F_NEXT,
            next: 9999,
        }),
        1,
    );
    // An indirect table outside memory, and one that loops.
    send(
        &mut rig,
        &single(RawDesc {
            addr: 0xdead_0000_0000,
            len: 32,
            flags: F_INDIRECT,
            next: 0,
        }),
        1,
    );
    assert_eq!(
        rig.stat(1, "tx_packets"),
        0,
        "nothing malformed reached the TAP"
    );
    assert_pair0_works(&mut rig, &sock, 1);
    // Pair 1 itself still works after all that.
    let frame = rig.guest_udp(6100, &[2; 50]);
    assert_eq!(rig.nic.send_batch(1, [frame.as_slice()]), 1);
    let mut b = [0u8; 256];
    let (n, _) = sock.recv_from(&mut b).expect("pair 1 still sends");
    assert_eq!(&b[..n], &[2; 50]);
}

#[test]
fn malformed_rx_chains_are_returned_unused() {
    require_network!("malformed_rx_chains_are_returned_unused");
    for port in sweep_ports() {
        malformed_rx_chains_from(port);
    }
}

fn malformed_rx_chains_from(port: u16) {
    let mut rig = Rig::new(
        &["--queues", "2"],
        NicConfig {
            pairs: 2,
            rx_posted: Some(32),
            ..NicConfig::default()
        },
    )
    .unwrap();
    let sock = host_udp(&rig, port);
    // Replace pair 0's RX ring content: a readable (wrong direction) chain
    // published ahead of the guest's good buffers must be skipped.
    let buf = rig.nic.scratch(4096).0;
    let slots = rig.nic.reserve(QueueId::Rx(0), 1);
    rig.nic.raw_chain(
        QueueId::Rx(0),
        &[RawDesc {
            addr: buf,
            len: 2048,
            flags: 0,
            next: 0,
        }],
        &slots,
        slots[0],
    );
    // Enough frames to use up the good buffers before the bad chain and
    // continue with the ones the guest posts after it.
    for i in 0..48u8 {
        send_to_guest(&sock, &[i; 40]);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while got.len() < 48 && Instant::now() < deadline {
        if let Some(frame) = rig.nic.recv(0, Duration::from_millis(50)) {
            if let Some(payload) = frames::udp_payload(&frame) {
                got.push(payload[0]);
            }
        }
    }
    assert_eq!(
        got,
        (0..48u8).collect::<Vec<_>>(),
        "every frame from port {port} landed in a good buffer: {}",
        rig.sandnic.stats().unwrap()
    );
    assert_eq!(rig.stat(0, "bad_chains"), 1);
    assert_pair0_works(&mut rig, &sock, 3);
}

/// A bad chain popped while no good chain was pending used to hide every
/// good chain popped behind it: the worker then waited for buffers while
/// holding all of them, and frames stayed in the TAP for good. Here the
/// guest publishes the bad chain and good buffers behind it with one kick,
/// while the worker sleeps starved, and frames arrive one at a time so the
/// worker sleeps between them.
#[test]
fn a_bad_rx_chain_ahead_of_good_ones_does_not_stall_rx() {
    require_network!("a_bad_rx_chain_ahead_of_good_ones_does_not_stall_rx");
    for port in sweep_ports() {
        a_bad_rx_chain_ahead_of_good_ones_from(port);
    }
}

fn a_bad_rx_chain_ahead_of_good_ones_from(port: u16) {
    // No busy polling: the worker sleeps right after each pass, as a
    // preempted worker on a loaded machine does after its poll window.
    let mut rig = Rig::new(
        &["--queues", "2", "--busy-poll-us", "0"],
        NicConfig {
            pairs: 2,
            rx_posted: Some(0),
            ..NicConfig::default()
        },
    )
    .unwrap();
    let sock = host_udp(&rig, port);
    // Let the worker find the ring empty and go to sleep waiting for a kick.
    std::thread::sleep(Duration::from_millis(100));
    let buf = rig.nic.scratch(4096).0;
    let slots = rig.nic.reserve(QueueId::Rx(0), 1);
    let bad = RawDesc {
        addr: buf,
        len: 2048,
        flags: 0, // device-readable: wrong direction for RX
        next: 0,
    };
    rig.nic
        .queue(QueueId::Rx(0))
        .vq
        .add_raw(&[bad], &slots, slots[0]);
    rig.nic.set_rx_posted(Some(16));
    assert!(rig.nic.post_rx(0));
    let _ = rig.nic.queue(QueueId::Rx(0)).kick.write(1);
    wait_bad_chains(&rig, 0, 1);
    let mut got = Vec::new();
    for i in 0..8u8 {
        std::thread::sleep(Duration::from_millis(20));
        send_to_guest(&sock, &[i; 40]);
        // Skip whatever else the host's stack sends (neighbour discovery).
        let deadline = Instant::now() + Duration::from_secs(2);
        while let Some(frame) = rig
            .nic
            .recv(0, deadline.saturating_duration_since(Instant::now()))
        {
            if let Some(payload) = frames::udp_payload(&frame) {
                got.push(payload[0]);
                break;
            }
        }
    }
    assert_eq!(
        got,
        (0..8u8).collect::<Vec<_>>(),
        "frames from port {port} behind the bad chain: {}",
        rig.sandnic.stats().unwrap()
    );
    assert_eq!(rig.stat(0, "bad_chains"), 1);
}

/// TX chains split into many buffers arrive whole. The datapath copies
/// the first bytes of every frame out of guest memory and sends the rest
/// from the buffers, so the split must come out right wherever it falls:
/// inside the virtio-net header, at its end, or inside a large first
/// buffer. The last chain is at the segment limit with a first buffer
/// larger than that copy: one iovec more would pass writev's limit, so it
/// has to go as it is.
#[test]
fn tx_chains_of_many_buffers_arrive_whole() {
    require_network!("tx_chains_of_many_buffers_arrive_whole");
    let mut rig = rig();
    let sock = host_udp(&rig, 6101);
    let hdr = rig.nic.hdr_len;
    // (payload length, first buffer's length); every later buffer is 1 byte.
    // The last chain has 1024 buffers.
    for (tag, payload_len, first) in [(1u8, 300, 1), (2, 100, hdr), (3, 300, 200), (4, 1169, 200)] {
        let payload: Vec<u8> = (0..payload_len).map(|i| tag ^ i as u8).collect();
        let mut chain = vec![0u8; hdr];
        chain.extend(rig.guest_udp(6101, &payload));
        let pieces: Vec<(u64, u64)> = std::iter::once((0, first as u64))
            .chain((first as u64..chain.len() as u64).map(|at| (at, 1)))
            .collect();
        assert!(pieces.len() <= 1024, "within the segment limit");
        let buf = rig.nic.scratch(chain.len() as u64);
        vm_memory::Bytes::write_slice(rig.nic.ram.mem(), &chain, buf).unwrap();
        post_indirect(&mut rig, QueueId::Tx(0), buf, &pieces, 0);
        let mut buf = [0u8; 2048];
        let (n, _) = sock
            .recv_from(&mut buf)
            .unwrap_or_else(|e| panic!("chain {tag} not sent ({e}): {}", rig.sandnic.log()));
        assert_eq!(&buf[..n], &payload[..], "chain {tag}");
    }
    assert_eq!(rig.stat(0, "bad_chains"), 0);
}

/// Publishes one chain on `queue`: a descriptor at the returned slot
/// pointing to an indirect table with one descriptor per `(offset,
/// length)` piece of the buffer at `buf`, each with `flags` (and NEXT but
/// the last).
fn post_indirect(
    rig: &mut Rig,
    queue: QueueId,
    buf: vm_memory::GuestAddress,
    pieces: &[(u64, u64)],
    flags: u16,
) -> u16 {
    use vm_memory::Bytes;
    let table = rig.nic.scratch(pieces.len() as u64 * 16);
    for (j, &(at, len)) in pieces.iter().enumerate() {
        let last = j + 1 == pieces.len();
        let mut desc = [0u8; 16];
        desc[..8].copy_from_slice(&(buf.0 + at).to_le_bytes());
        desc[8..12].copy_from_slice(&(len as u32).to_le_bytes());
        let flags = if last { flags } else { flags | F_NEXT };
        desc[12..14].copy_from_slice(&flags.to_le_bytes());
        desc[14..16].copy_from_slice(&((j + 1) as u16).to_le_bytes());
        rig.nic
            .ram
            .mem()
            .write_slice(&desc, vm_memory::GuestAddress(table.0 + j as u64 * 16))
            .unwrap();
    }
    let slots = rig.nic.reserve(queue, 1);
    let head = RawDesc {
        addr: table.0,
        len: (pieces.len() * 16) as u32,
        flags: F_INDIRECT,
        next: 0,
    };
    rig.nic.raw_chain(queue, &[head], &slots, slots[0]);
    slots[0]
}

/// RX chains made of many tiny buffers (indirect tables of 2-byte
/// descriptors): enough of them to hold one frame add up to more segments
/// than one `readv` takes (IOV_MAX). Uncapped, `readv` failed with EINVAL,
/// which read as "TAP empty": the worker spun on the readable TAP and no
/// frame was ever delivered.
#[test]
fn rx_chains_of_many_tiny_buffers_do_not_stall_rx() {
    require_network!("rx_chains_of_many_tiny_buffers_do_not_stall_rx");
    for port in sweep_ports() {
        rx_chains_of_many_tiny_buffers_from(port);
    }
}

fn rx_chains_of_many_tiny_buffers_from(port: u16) {
    use vm_memory::Bytes;
    const PIECES: u64 = 512;
    const PIECE: u64 = 2;
    let mut rig = Rig::new(
        &["--queues", "2"],
        NicConfig {
            pairs: 2,
            rx_posted: Some(0),
            ..NicConfig::default()
        },
    )
    .unwrap();
    let sock = host_udp(&rig, port);
    let mut buffers = std::collections::HashMap::new();
    for _ in 0..16 {
        let buf = rig.nic.scratch(PIECES * PIECE);
        let pieces: Vec<(u64, u64)> = (0..PIECES).map(|j| (j * PIECE, PIECE)).collect();
        let slot = post_indirect(&mut rig, QueueId::Rx(0), buf, &pieces, F_WRITE);
        buffers.insert(slot, buf);
    }
    let mut got = Vec::new();
    for i in 0..4u8 {
        send_to_guest(&sock, &[i; 40]);
        let deadline = Instant::now() + Duration::from_secs(3);
        'frame: while Instant::now() < deadline {
            while let Some((head, len)) = rig.nic.queue(QueueId::Rx(0)).vq.pop_used() {
                let mut frame = vec![0u8; len as usize];
                rig.nic
                    .ram
                    .mem()
                    .read_slice(&mut frame, buffers[&head])
                    .unwrap();
                if let Some(payload) = frames::udp_payload(&frame[12..]) {
                    got.push(payload[0]);
                    break 'frame;
                }
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    assert_eq!(
        got,
        vec![0, 1, 2, 3],
        "frames from port {port} into many-segment chains: {}",
        rig.sandnic.stats().unwrap()
    );
    assert_eq!(rig.stat(0, "rx_errors"), 0);
}

/// Found by the `vring` fuzz target: an available index far beyond the
/// ring made the worker spin forever (holding its pair's lock, so the
/// control thread hung too).
#[test]
fn a_corrupt_available_index_does_not_hang_the_backend() {
    require_network!("a_corrupt_available_index_does_not_hang_the_backend");
    let mut rig = rig();
    let sock = host_udp(&rig, 6100);
    for id in [QueueId::Tx(1), QueueId::Rx(1), QueueId::Ctrl] {
        let q = rig.nic.queue(id);
        q.vq.corrupt_avail_idx(40_000);
        let _ = q.kick.write(1);
    }
    std::thread::sleep(Duration::from_millis(200));
    let started = Instant::now();
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    assert_eq!(status["ok"], true);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "control thread stalled"
    );
    assert_pair0_works(&mut rig, &sock, 5);
}

#[test]
fn malformed_control_commands_and_chains() {
    require_network!("malformed_control_commands_and_chains");
    let mut rig = rig();
    // Well-formed chains with bad commands: ERR.
    assert_eq!(rig.nic.ctrl(&[0x77, 0]).unwrap(), 1, "unknown class");
    let mut overflow = vec![1, 0];
    overflow.extend_from_slice(&u32::MAX.to_le_bytes());
    overflow.extend_from_slice(&[0; 30]);
    assert_eq!(
        rig.nic.ctrl(&overflow).unwrap(),
        1,
        "MAC table counts beyond the payload"
    );
    assert_eq!(rig.nic.ctrl(&[0, 0, 1, 1]).unwrap(), 1, "wrong length");
    assert_eq!(
        rig.nic.ctrl(&[0, 0, 0]).unwrap(),
        0,
        "a good command still works"
    );
    assert_eq!(rig.control_stat("ctrl_errors"), 3);
    // Malformed chains: no room for the ack, command outside memory.
    let buf = rig.nic.scratch(64).0;
    let ctrl = QueueId::Ctrl;
    let slots = rig.nic.reserve(ctrl, 1);
    rig.nic.raw_chain(
        ctrl,
        &[RawDesc {
            addr: buf,
            len: 2,
            flags: 0,
            next: 0,
        }],
        &slots,
        slots[0],
    );
    let slots = rig.nic.reserve(ctrl, 2);
    rig.nic.raw_chain(
        ctrl,
        &[
            RawDesc {
                addr: 0xdead_0000_0000,
                len: 2,
                flags: F_NEXT,
                next: slots[1],
            },
            RawDesc {
                addr: buf,
                len: 1,
                flags: F_WRITE,
                next: 0,
            },
        ],
        &slots,
        slots[0],
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.control_stat("ctrl_bad_chains") < 2 {
        assert!(
            Instant::now() < deadline,
            "{}",
            rig.sandnic.stats().unwrap()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(
        rig.nic.ctrl(&[0, 0, 1]).unwrap(),
        0,
        "the control queue still works"
    );
}

fn raw_request(fd: BorrowedFd<'_>, request: u32, payload: &[u8]) -> Vec<u8> {
    request_with_fds(fd, request, payload, &[])
}

#[test]
fn unknown_and_malformed_requests_are_refused() {
    require_network!("unknown_and_malformed_requests_are_refused");
    let mut rig = rig();
    let sock = host_udp(&rig, 6100);
    // SAFETY: the frontend's socket stays open for the whole test; these
    // requests are sent between the frontend's own, never concurrently.
    let fd = unsafe { BorrowedFd::borrow_raw(rig.nic.socket_fd()) };
    let nack = 1u64.to_ne_bytes().to_vec();
    assert_eq!(raw_request(fd, 99, &[]), nack, "unknown request");
    assert_eq!(
        raw_request(fd, 8, &[1, 2, 3]),
        nack,
        "SET_VRING_NUM with a short payload"
    );
    assert_eq!(
        raw_request(fd, 8, &[200, 0, 0, 0, 0, 1, 0, 0]),
        nack,
        "SET_VRING_NUM of a ring that does not exist"
    );
    assert_eq!(
        raw_request(fd, 5, &[0; 8]),
        nack,
        "SET_MEM_TABLE without regions"
    );
    assert_eq!(
        raw_request(fd, 18, &[7, 0, 0, 0, 1, 0, 0, 0]),
        nack,
        "SET_VRING_ENABLE of a ring that does not exist"
    );
    assert!(rig.control_stat("bad_requests") >= 5);
    assert_eq!(rig.control_stat("unsupported_requests"), 1);
    assert_pair0_works(&mut rig, &sock, 9);
}

/// Requests whose answer is a body must get one even when they fail: the
/// frontend blocks until it arrives (QEMU and UML wait forever).
#[test]
fn failed_requests_that_return_a_body_are_answered() {
    require_network!("failed_requests_that_return_a_body_are_answered");
    let mut rig = rig();
    let sock = host_udp(&rig, 6100);
    // SAFETY: as in `unknown_and_malformed_requests_are_refused`.
    let fd = unsafe { BorrowedFd::borrow_raw(rig.nic.socket_fd()) };
    nix::sys::socket::setsockopt(
        &fd,
        nix::sys::socket::sockopt::ReceiveTimeout,
        &nix::sys::time::TimeVal::new(3, 0),
    )
    .unwrap();
    const GET_FEATURES: u32 = 1;
    const GET_VRING_BASE: u32 = 11;
    const GET_CONFIG: u32 = 24;
    let mut ring_99 = [0u8; 8];
    ring_99[..4].copy_from_slice(&99u32.to_ne_bytes());
    assert_eq!(
        raw_request(fd, GET_VRING_BASE, &ring_99),
        ring_99,
        "GET_VRING_BASE of a ring that does not exist: ring 99, base 0"
    );
    assert_eq!(
        raw_request(fd, GET_VRING_BASE, &[1, 2]),
        [0u8; 8],
        "GET_VRING_BASE with a short payload"
    );
    assert!(
        raw_request(fd, GET_CONFIG, &[0, 0, 0]).is_empty(),
        "GET_CONFIG with a short payload: the spec's empty error reply"
    );
    let mut past_the_end = vec![0u8; 12 + 8];
    past_the_end[..4].copy_from_slice(&4000u32.to_ne_bytes());
    past_the_end[4..8].copy_from_slice(&8u32.to_ne_bytes());
    assert!(
        raw_request(fd, GET_CONFIG, &past_the_end).is_empty(),
        "GET_CONFIG past the end of the config space"
    );
    assert_eq!(raw_request(fd, GET_FEATURES, &[]).len(), 8);
    assert!(rig.control_stat("bad_requests") >= 4);
    assert_pair0_works(&mut rig, &sock, 5);
}

/// Sends `request` with `fds` attached and returns the reply's payload.
fn request_with_fds(
    fd: BorrowedFd<'_>,
    request: u32,
    payload: &[u8],
    fds: &[std::os::fd::RawFd],
) -> Vec<u8> {
    let header = Header {
        request,
        flags: VERSION | NEED_REPLY,
        size: payload.len() as u32,
    };
    wire::send(fd, header, payload, fds).unwrap();
    let reply = wire::recv(fd).unwrap();
    assert_eq!(reply.header.request, request);
    reply.payload
}

fn memfd(len: i64) -> std::os::fd::OwnedFd {
    let fd = nix::sys::memfd::memfd_create(c"bad", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
        .unwrap();
    nix::unistd::ftruncate(&fd, len).unwrap();
    fd
}

/// Fds the frontend chooses are checked for what they will be used for: a
/// kick fd epoll cannot wait on (a memfd) would leave the ring's thread
/// unable to sleep, and a memory region reaching past the end of its file
/// would kill the datapath (SIGBUS) on the first frame there. Both are
/// refused; the device keeps working.
#[test]
fn fds_that_cannot_serve_their_purpose_are_refused() {
    require_network!("fds_that_cannot_serve_their_purpose_are_refused");
    use std::os::fd::AsRawFd;
    let mut rig = rig();
    let sock = host_udp(&rig, 6100);
    // SAFETY: as in `unknown_and_malformed_requests_are_refused`.
    let fd = unsafe { BorrowedFd::borrow_raw(rig.nic.socket_fd()) };
    let nack = 1u64.to_ne_bytes().to_vec();
    const SET_VRING_KICK: u32 = 12;
    let file = memfd(4096);
    assert_eq!(
        request_with_fds(fd, SET_VRING_KICK, &1u64.to_ne_bytes(), &[file.as_raw_fd()]),
        nack,
        "a memfd as kick fd"
    );
    const SET_MEM_TABLE: u32 = 5;
    let small = memfd(1 << 20);
    let mut table = Vec::new();
    table.extend_from_slice(&1u32.to_ne_bytes());
    table.extend_from_slice(&0u32.to_ne_bytes());
    for word in [0x1_0000_0000u64, 16 << 20, 0x7f00_0000_0000, 0] {
        table.extend_from_slice(&word.to_ne_bytes());
    }
    assert_eq!(
        request_with_fds(fd, SET_MEM_TABLE, &table, &[small.as_raw_fd()]),
        nack,
        "a 16 MiB region over a 1 MiB file"
    );
    assert!(rig.control_stat("bad_requests") >= 2);
    assert_pair0_works(&mut rig, &sock, 8);
    let frame = rig.guest_udp(6100, &[8; 50]);
    assert_eq!(rig.nic.send_batch(1, [frame.as_slice()]), 1);
    let mut b = [0u8; 256];
    let (n, _) = sock.recv_from(&mut b).expect("pair 1 still sends");
    assert_eq!(&b[..n], &[8; 50]);
}

#[test]
fn a_frontend_that_disconnects_can_be_replaced() {
    require_network!("a_frontend_that_disconnects_can_be_replaced");
    let Rig {
        nic,
        sandnic,
        ns,
        tap_mac,
        dir,
        frontend_listener,
    } = rig();
    drop(nic);
    let deadline = Instant::now() + Duration::from_secs(5);
    while sandnic.stats().unwrap()["control"]["disconnects"] != 1 {
        assert!(Instant::now() < deadline, "disconnect not noticed");
        std::thread::sleep(Duration::from_millis(10));
    }
    let mut rig = Rig {
        nic: TestNic::connect(&sandnic.socket, &NicConfig::default()).unwrap(),
        sandnic,
        ns,
        tap_mac,
        dir,
        frontend_listener,
    };
    let sock = host_udp(&rig, 6100);
    assert_pair0_works(&mut rig, &sock, 4);
}
