//! Dirty-page logging for VM migration (VHOST_F_LOG_ALL with
//! VHOST_USER_PROTOCOL_F_LOG_SHMFD), checked on the bitmap itself: the test
//! frontend shares a log the way QEMU does, and reads which pages the
//! backend marked.

use sandnic::frames;
use sandnic::frontend::guest_ram::RAM_BASE;
use sandnic::frontend::{NicConfig, QueueId, TestNic};
use sandnic::harness::Rig;
use sandnic::require_network;
use sandnic_host::vhost_user::wire::{self, Header, NEED_REPLY, VERSION};
use std::collections::BTreeSet;
use std::fs::File;
use std::net::UdpSocket;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};
use vm_memory::GuestAddress;

const PAGE: u64 = 4096;
const RAM: u64 = 64 << 20;
/// One bit per page of guest memory, from address 0 to the end of RAM.
const LOG_BYTES: u64 = (RAM_BASE + RAM) / PAGE / 8;

fn config() -> NicConfig {
    NicConfig {
        pairs: 1,
        ram_size: RAM,
        ..NicConfig::default()
    }
}

fn rig() -> Rig {
    Rig::new(&[], config()).expect("rig")
}

fn log_file(len: u64) -> File {
    let fd =
        nix::sys::memfd::memfd_create(c"dirty-log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap();
    let file = File::from(fd);
    file.set_len(len).unwrap();
    file
}

fn marked_pages(log: &File) -> BTreeSet<u64> {
    let mut bytes = vec![0u8; LOG_BYTES as usize];
    log.read_exact_at(&mut bytes, 0).unwrap();
    let mut pages = BTreeSet::new();
    for (i, b) in bytes.iter().enumerate() {
        for bit in 0..8 {
            if b & (1 << bit) != 0 {
                pages.insert(i as u64 * 8 + bit);
            }
        }
    }
    pages
}

fn pages_of(addr: GuestAddress, len: u64) -> impl Iterator<Item = u64> {
    let first = addr.0 / PAGE;
    let last = (addr.0 + len.max(1) - 1) / PAGE;
    first..=last
}

fn host_udp(rig: &Rig) -> UdpSocket {
    let sock = rig
        .ns
        .inside(|| Ok(UdpSocket::bind(("10.77.0.1", 6200))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    sock
}

/// Sends `n` UDP frames to the guest and takes them off pair 0's RX ring;
/// returns the guest pages the backend wrote them into.
fn receive_frames(rig: &mut Rig, sock: &UdpSocket, n: u8) -> BTreeSet<u64> {
    let mut written = BTreeSet::new();
    for i in 0..n {
        sock.send_to(&[i; 100], "10.77.0.2:5000").unwrap();
        let deadline = Instant::now() + Duration::from_secs(3);
        'frame: loop {
            assert!(Instant::now() < deadline, "frame {i} never arrived");
            while let Some((head, len)) = rig.nic.queue(QueueId::Rx(0)).vq.pop_used() {
                let buf = rig.nic.queue(QueueId::Rx(0)).buffer(head);
                written.extend(pages_of(buf, u64::from(len)));
                let mut frame = vec![0u8; len as usize];
                vm_memory::Bytes::read_slice(rig.nic.ram.mem(), &mut frame, buf).unwrap();
                rig.nic.fill_rx(0);
                if frames::udp_payload(&frame[12..]).is_some_and(|p| p[0] == i) {
                    break 'frame;
                }
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    written
}

#[test]
fn every_page_the_backend_writes_while_logging_is_marked() {
    require_network!("every_page_the_backend_writes_while_logging_is_marked");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let log = log_file(LOG_BYTES);
    rig.nic.start_dirty_log(&log, LOG_BYTES, 0).unwrap();
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    assert_eq!(status["sessions"][0]["logging"], true, "{status}");

    // RX: frame data, the num_buffers header and the used ring.
    let mut expected = receive_frames(&mut rig, &sock, 30);
    expected.insert(rig.nic.queue(QueueId::Rx(0)).vq.used.0 / PAGE);
    // TX: only the used ring is written.
    let frame = rig.guest_udp(6200, &[7; 64]);
    assert_eq!(rig.nic.send_batch(0, (0..10).map(|_| frame.as_slice())), 10);
    for _ in 0..10 {
        sock.recv_from(&mut [0u8; 256])
            .expect("TX frame at the host");
    }
    let deadline = Instant::now() + Duration::from_secs(3);
    while rig.nic.tx_in_flight(0) > 0 {
        assert!(Instant::now() < deadline, "TX chains not returned");
        std::thread::sleep(Duration::from_millis(2));
    }
    expected.insert(rig.nic.queue(QueueId::Tx(0)).vq.used.0 / PAGE);
    // The control queue: the ack byte and the used ring.
    assert_eq!(rig.nic.ctrl(&[0, 0, 1]).unwrap(), 0, "promiscuous on");
    expected.insert(rig.nic.queue(QueueId::Ctrl).vq.used.0 / PAGE);

    let marked = marked_pages(&log);
    let missing: Vec<u64> = expected.difference(&marked).copied().collect();
    assert!(
        missing.is_empty(),
        "pages written but not marked: {missing:x?} (marked {})",
        marked.len()
    );
    // A TX buffer is only read by the backend: its page stays clean.
    let tx_buf = rig.nic.queue(QueueId::Tx(0)).buffer(100);
    assert!(
        !marked.contains(&(tx_buf.0 / PAGE)),
        "a page only read was marked"
    );
    assert!(
        marked.iter().all(|&p| p >= RAM_BASE / PAGE),
        "a page outside RAM"
    );
    assert_eq!(rig.control_stat("log_failures"), 0);
}

#[test]
fn logging_stops_when_log_all_is_cleared() {
    require_network!("logging_stops_when_log_all_is_cleared");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let log = log_file(LOG_BYTES);
    rig.nic.start_dirty_log(&log, LOG_BYTES, 0).unwrap();
    assert!(!receive_frames(&mut rig, &sock, 5).is_empty());
    assert!(!marked_pages(&log).is_empty(), "logging was on");
    rig.nic.stop_dirty_log().unwrap();
    log.write_all_at(&vec![0u8; LOG_BYTES as usize], 0).unwrap();
    receive_frames(&mut rig, &sock, 20);
    assert!(
        marked_pages(&log).is_empty(),
        "pages marked after LOG_ALL was cleared"
    );
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    assert_eq!(status["sessions"][0]["logging"], false, "{status}");
}

/// Waits for the backend to close the frontend's connection.
fn wait_closed(fd: BorrowedFd<'_>) {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        match wire::recv(fd) {
            Err(wire::WireError::Closed) => return,
            Err(wire::WireError::Io(nix::errno::Errno::EAGAIN)) => {}
            other => panic!("expected the connection closed, got {other:?}"),
        }
        assert!(Instant::now() < deadline, "connection still open");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A log the backend cannot keep must make a migration fail (QEMU cannot
/// see a refusal of SET_LOG_BASE): the connection is closed, counted, and
/// the next frontend gets a working device.
#[test]
fn a_bad_log_base_closes_the_connection_without_harm() {
    require_network!("a_bad_log_base_closes_the_connection_without_harm");
    let mut rig = rig();
    let sock = host_udp(&rig);
    let log = log_file(LOG_BYTES);
    let cases: [(&str, u64, u64); 2] = [
        ("too small for the memory table", 8, 0),
        ("offset past the end of the fd", LOG_BYTES, 1 << 20),
    ];
    for (n, (what, size, offset)) in cases.into_iter().enumerate() {
        assert!(
            rig.nic.start_dirty_log(&log, size, offset).is_err(),
            "{what}: accepted"
        );
        rig.nic = TestNic::connect(&rig.sandnic.socket, &config()).unwrap();
        assert_eq!(rig.control_stat("log_failures"), n as u64 + 1, "{what}");
    }
    // No fd at all.
    // SAFETY: the connection stays open for this block; nothing else uses it.
    let fd = unsafe { BorrowedFd::borrow_raw(rig.nic.socket_fd()) };
    nix::fcntl::fcntl(
        fd.as_raw_fd(),
        nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK),
    )
    .unwrap();
    let payload = [LOG_BYTES.to_ne_bytes(), 0u64.to_ne_bytes()].concat();
    let header = Header {
        request: 6, // SET_LOG_BASE
        flags: VERSION | NEED_REPLY,
        size: payload.len() as u32,
    };
    wire::send(fd, header, &payload, &[]).unwrap();
    wait_closed(fd);
    rig.nic = TestNic::connect(&rig.sandnic.socket, &config()).unwrap();
    assert_eq!(rig.control_stat("log_failures"), 3);
    // The device works for the next frontend, without logging.
    let log = log_file(LOG_BYTES);
    receive_frames(&mut rig, &sock, 3);
    assert!(marked_pages(&log).is_empty());
}

/// The whole of the test guest's RAM.
fn ram_snapshot(nic: &TestNic) -> Vec<u8> {
    let mut bytes = vec![0u8; RAM as usize];
    vm_memory::Bytes::read_slice(nic.ram.mem(), &mut bytes, GuestAddress(RAM_BASE)).unwrap();
    bytes
}

/// The pages whose bytes differ between two snapshots.
fn changed_pages(before: &[u8], after: &[u8]) -> BTreeSet<u64> {
    before
        .chunks(PAGE as usize)
        .zip(after.chunks(PAGE as usize))
        .enumerate()
        .filter(|(_, (a, b))| a != b)
        .map(|(i, _)| RAM_BASE / PAGE + i as u64)
        .collect()
}

/// The pages with a changed byte outside the `(address, length)` ranges
/// the frontend wrote.
fn changed_by_backend(before: &[u8], after: &[u8], frontend: &[(u64, u64)]) -> BTreeSet<u64> {
    let by_frontend = |gpa: u64| {
        frontend
            .iter()
            .any(|&(at, len)| gpa >= at && gpa < at + len)
    };
    changed_pages(before, after)
        .into_iter()
        .filter(|&page| {
            let start = (page * PAGE - RAM_BASE) as usize;
            (start..start + PAGE as usize)
                .any(|i| before[i] != after[i] && !by_frontend(RAM_BASE + i as u64))
        })
        .collect()
}

/// GET_VRING_BASE is a barrier, and the log is complete at it: every page
/// the backend changed while logging (RX buffers, used rings, the
/// `avail_event` word the driver reads to decide on kicks) is marked by the
/// time the rings are stopped, and nothing in guest memory changes after,
/// whatever the TAP and the kick fds bring. Rings of 1024 entries, as QEMU
/// gives TX: their used ring spans three pages, the last holding only the
/// tail of the ring and `avail_event`, so a write to `avail_event` that is
/// not logged is a page the destination would get stale. The backend never
/// writes an available ring.
#[test]
fn get_vring_base_is_a_barrier_with_every_write_before_it_logged() {
    require_network!("get_vring_base_is_a_barrier_with_every_write_before_it_logged");
    let mut rig = Rig::new(
        &["--busy-poll-us", "0"],
        NicConfig {
            queue_size: 1024,
            ..config()
        },
    )
    .expect("rig");
    let sock = host_udp(&rig);
    let log = log_file(LOG_BYTES);
    rig.nic.start_dirty_log(&log, LOG_BYTES, 0).unwrap();
    let before = ram_snapshot(&rig.nic);
    // TX: the frontend writes descriptors, the available ring and the
    // buffers; the backend only the used ring.
    let frame = rig.guest_udp(6200, &[7; 64]);
    let tx_frames = 40;
    assert_eq!(
        rig.nic
            .send_batch(0, (0..tx_frames).map(|_| frame.as_slice())),
        tx_frames
    );
    for _ in 0..tx_frames {
        sock.recv_from(&mut [0u8; 256])
            .expect("TX frame at the host");
    }
    // The bytes the frontend wrote (a page may hold its bytes and the
    // backend's: the used ring's tail shares one with the first buffer).
    let tx = rig.nic.queue(QueueId::Tx(0));
    let mut frontend_wrote = vec![(tx.vq.desc.0, 16 * 1024), (tx.vq.avail.0, 6 + 2 * 1024)];
    for head in 0..tx_frames as u16 {
        frontend_wrote.push((tx.buffer(head).0, 2048));
    }
    // RX: the backend writes buffers and the used ring; the frontend
    // takes nothing off the ring meanwhile.
    let rx_frames = 50;
    for i in 0..rx_frames {
        sock.send_to(&[i; 100], "10.77.0.2:5000").unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while rig.stat(0, "rx_packets") < u64::from(rx_frames) {
        assert!(Instant::now() < deadline, "RX frames not delivered");
        std::thread::sleep(Duration::from_millis(5));
    }
    rig.nic.stop_rings().unwrap();
    let stopped = ram_snapshot(&rig.nic);
    let marked = marked_pages(&log);
    let unlogged: Vec<u64> = changed_by_backend(&before, &stopped, &frontend_wrote)
        .difference(&marked)
        .copied()
        .collect();
    let rx_used: Vec<u64> = pages_of(rig.nic.queue(QueueId::Rx(0)).vq.used, 6 + 8 * 1024).collect();
    let tx_used: Vec<u64> = pages_of(rig.nic.queue(QueueId::Tx(0)).vq.used, 6 + 8 * 1024).collect();
    assert!(
        unlogged.is_empty(),
        "pages the backend changed without marking them: {unlogged:x?} \
         (RX used ring pages {rx_used:x?}, TX used ring pages {tx_used:x?})"
    );
    let rx_avail: BTreeSet<u64> =
        pages_of(rig.nic.queue(QueueId::Rx(0)).vq.avail, 6 + 2 * 1024).collect();
    assert!(
        changed_pages(&before, &stopped).is_disjoint(&rx_avail),
        "the backend wrote the RX available ring"
    );
    // After the barrier: frames wait in the TAP, kicks go unheard, and
    // guest memory stays as it was.
    for i in 0..20u8 {
        sock.send_to(&[i; 100], "10.77.0.2:5000").unwrap();
    }
    for id in [QueueId::Rx(0), QueueId::Tx(0)] {
        let _ = rig.nic.queue(id).kick.write(1);
    }
    std::thread::sleep(Duration::from_millis(300));
    let after = ram_snapshot(&rig.nic);
    let touched = changed_pages(&stopped, &after);
    assert!(
        touched.is_empty(),
        "guest pages changed after GET_VRING_BASE: {touched:x?}"
    );
    assert_eq!(rig.stat(0, "rx_packets"), u64::from(rx_frames));
}
