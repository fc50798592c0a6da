//! A sandnic that dies (`kill -9`) is restarted by its service manager and
//! picks the device up from the fd store: the frontend's connection never
//! closes, and traffic goes on. The manager is the harness's stand-in for
//! systemd (`sandnic::service_manager`), which does what systemd documents
//! for the fd store.

use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{NetNs, ScratchDir, RIG_GUEST_MAC};
use sandnic::require_network;
use sandnic::service_manager::ServiceManager;
use sandnic::traffic;
use serde_json::json;
use std::time::Duration;

/// Chains a datapath thread takes in one batch: what a death can leave
/// taken but not completed on a queue (sent again, or read from the TAP
/// and never published).
const BATCH: u64 = 256;

struct Managed {
    ns: NetNs,
    dir: ScratchDir,
    manager: ServiceManager,
    nic: TestNic,
    tap_mac: sandnic::frames::Mac,
}

impl Managed {
    fn start() -> Self {
        let (ns, dir) = sandnic::harness::Rig::namespace(true).unwrap();
        let (vhost, api) = (dir.path("vhost.sock"), dir.path("api.sock"));
        let args = [
            "--socket",
            vhost.to_str().unwrap(),
            "--api",
            api.to_str().unwrap(),
            "--tap",
            "tap0",
            "--mac",
            "52:54:00:12:34:56",
        ];
        let manager = ServiceManager::start(&ns, &dir, &args, 64).unwrap();
        let nic = TestNic::connect(&vhost, &NicConfig::default()).unwrap();
        let tap_mac = ns.mac_of("tap0").unwrap();
        Self {
            ns,
            dir,
            manager,
            nic,
            tap_mac,
        }
    }

    fn api(&self, request: serde_json::Value) -> serde_json::Value {
        sandnic_host::api::client(&self.dir.path("api.sock"), request)
            .map(|(v, _)| v)
            .unwrap_or_else(|e| panic!("{e:#}\n{}", self.manager.log()))
    }
}

/// What one direction received of `sent` numbered frames: how many never
/// came, and how many came twice.
fn missing_and_twice(sent: u64, got: &[u64]) -> (u64, u64) {
    let mut seen = vec![0u32; sent as usize];
    for &seq in got {
        assert!(seq < sent, "a frame that was never sent: {seq}");
        seen[seq as usize] += 1;
    }
    let missing = seen.iter().filter(|&&n| n == 0).count() as u64;
    let twice = seen.iter().map(|&n| u64::from(n.saturating_sub(1))).sum();
    (missing, twice)
}

/// `kill -9` three times under traffic both ways: each time the manager
/// restarts sandnic, which picks the device up from the store. The test
/// frontend never reconnects (it could not: it has no reconnect), every
/// frame sent after the restart arrives, and what the death cost is at
/// most one batch each way: frames sent twice (a TX chain taken, not
/// completed) or lost (read from the TAP into a buffer never published).
#[test]
fn a_killed_sandnic_is_picked_up_with_no_disconnect() {
    require_network!("a_killed_sandnic_is_picked_up_with_no_disconnect");
    let mut m = Managed::start();
    for round in 0..3u64 {
        let manager = &m.manager;
        let report = traffic::run(
            &mut m.nic,
            &m.ns,
            m.tap_mac,
            5_000,
            Duration::from_millis(2000),
            Duration::from_millis(700),
            || {
                manager.signal_main(nix::sys::signal::Signal::SIGKILL);
                manager.wait_ready(round as usize + 2, Duration::from_secs(20))
            },
        );
        report
            .result
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", m.manager.log()));
        for (what, got) in [
            ("host → guest", &report.guest_got),
            ("guest → host", &report.host_got),
        ] {
            let (missing, twice) = missing_and_twice(report.sent, got);
            eprintln!("round {round}, {what}: {missing} lost, {twice} twice");
            assert!(
                missing <= BATCH && twice <= BATCH,
                "round {round}, {what}: {missing} lost, {twice} twice\n{}",
                m.manager.log()
            );
            assert_eq!(
                got.last(),
                Some(&(report.sent - 1)),
                "round {round}, {what}: the last frame arrives"
            );
        }
    }
    assert_eq!(m.manager.starts(), 4);
    let status = m.api(json!({"cmd": "status"}));
    assert_eq!(status["frontend_connected"], true, "{status}");
    let stats = m.api(json!({"cmd": "stats"}));
    assert_eq!(stats["control"]["disconnects"], 0, "{stats}");
    assert_eq!(stats["control"]["frontends_accepted"], 1, "{stats}");
    // The config space is answered by the new process on the old
    // connection.
    assert_eq!(&m.nic.config(12).unwrap()[..6], &RIG_GUEST_MAC);
    assert_eq!(
        m.manager
            .log()
            .matches("picked the device up from the service manager's fd store")
            .count(),
        3
    );
    assert!(
        m.manager.dropped_on_poll().is_empty(),
        "{:?}",
        m.manager.dropped_on_poll()
    );
}

/// A QEMU 7.2 guest with QEMU's defaults (no `reconnect=`: a closed
/// connection would leave its NIC dead until the VM restarts), pinged
/// every 2 ms from the host: sandnic is killed with SIGKILL three times,
/// and each time the process the manager starts picks the device up.
/// Traffic comes back every time, QEMU prints nothing about it (its
/// connection never closed), and the largest gap is reported.
#[test]
fn a_qemu_guest_without_reconnect_keeps_its_nic_through_three_kills() {
    use sandnic::guest::{self, Guest, GuestOptions, Kind, QemuBuild, QemuOptions};
    let test = "a_qemu_guest_without_reconnect_keeps_its_nic_through_three_kills";
    require_network!(test);
    if let Some(why) = guest::unavailable(Kind::Qemu) {
        sandnic::harness::skip(test, &why);
        return;
    }
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.88.0.1/24").unwrap();
    let dir = ScratchDir::new().unwrap();
    let vhost = dir.path("vhost.sock");
    let args = ["--socket", vhost.to_str().unwrap(), "--tap", "tap0"];
    let manager = ServiceManager::start(&ns, &dir, &args, 64).unwrap();
    let script = "ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\necho GUEST-UP\n\
                  i=0; while [ $i -lt 1200 ]; do sleep 0.1; i=$((i+1)); done\n";
    let script = format!("{}{script}", guest::STEP_FN);
    let qemu = Guest::boot(GuestOptions {
        kind: Kind::Qemu,
        socket: &vhost,
        script: &script,
        hostdir: None,
        console: dir.path("console.log"),
        qemu: QemuOptions {
            build: QemuBuild::Debian,
            ..QemuOptions::default()
        },
    })
    .unwrap();
    let answers = || {
        ns.command("ping")
            .args(["-c", "1", "-W", "1", "10.88.0.2"])
            .output()
            .is_ok_and(|o| o.status.success())
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !(qemu.console().contains("GUEST-UP") && answers()) {
        assert!(
            std::time::Instant::now() < deadline,
            "{}\n{}",
            qemu.console(),
            manager.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let qemu_said = |console: &str| -> Vec<String> {
        console
            .lines()
            .filter(|l| l.starts_with("qemu-system"))
            .map(str::to_string)
            .collect()
    };
    let before = qemu_said(&qemu.console());
    let ping =
        sandnic::ping::FloodPing::every(&ns, "10.88.0.2", "0.002", &dir.path("ping.log")).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for round in 0..3 {
        manager.signal_main(nix::sys::signal::Signal::SIGKILL);
        manager
            .wait_ready(round + 2, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", manager.log()));
        // Traffic comes back (how fast is the crash bench's to measure).
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while !answers() {
            assert!(
                std::time::Instant::now() < deadline,
                "round {round}: the guest does not answer\n{}\n{}",
                qemu.console(),
                manager.log()
            );
        }
    }
    let report = ping.stop().unwrap();
    eprintln!(
        "3 kills: {} of {} probes answered, largest gap {:.1} ms, top gaps {:?}",
        report.received,
        report.transmitted,
        report.largest_gap() * 1000.0,
        report.top_gaps(4)
    );
    assert_eq!(
        qemu_said(&qemu.console()),
        before,
        "QEMU saw nothing: its connection never closed"
    );
    assert_eq!(manager.starts(), 4);
}

/// Receive counters summed over the pairs: (delivered, filtered).
fn rx_totals(m_api: &std::path::Path) -> (u64, u64) {
    let (stats, _) = sandnic_host::api::client(m_api, json!({"cmd": "stats"})).expect("stats");
    let queues = stats["queues"].as_array().expect("queues");
    let sum = |f: &str| queues.iter().map(|q| q[f].as_u64().unwrap_or(0)).sum();
    (sum("rx_packets"), sum("rx_filtered"))
}

/// A UML guest (its control queue is served by sandnic's device model)
/// sets its receive filters — promiscuous mode off, a multicast group
/// joined, VLAN 100 added — and sandnic is killed with SIGKILL. The
/// process the manager starts filters exactly as before: the device
/// model's state came back from the record, not from the guest.
#[test]
fn a_uml_guests_receive_filters_survive_a_kill() {
    use sandnic::frames::{self, Mac};
    use sandnic::guest::{self, Guest, GuestOptions, HostDir, Kind};
    let test = "a_uml_guests_receive_filters_survive_a_kill";
    require_network!(test);
    if let Some(why) = guest::unavailable(Kind::Uml) {
        sandnic::harness::skip(test, &why);
        return;
    }
    const GUEST_MAC: Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.88.0.1/24").unwrap();
    ns.add_static_neighbour("10.88.0.2", "52:54:00:12:34:56", "tap0")
        .unwrap();
    // No IPv6 chatter (neighbour discovery, MLD) from the host's side to
    // blur the counts: only the frames injected below reach the guest.
    ns.command("sysctl")
        .args(["-qw", "net.ipv6.conf.tap0.disable_ipv6=1"])
        .status()
        .unwrap();
    let dir = ScratchDir::new().unwrap();
    let (vhost, api) = (dir.path("vhost.sock"), dir.path("api.sock"));
    let args = [
        "--socket",
        vhost.to_str().unwrap(),
        "--api",
        api.to_str().unwrap(),
        "--tap",
        "tap0",
        "--mac",
        "52:54:00:12:34:56",
    ];
    let manager = ServiceManager::start(&ns, &dir, &args, 64).unwrap();
    let hostdir = HostDir(dir.path("share"));
    std::fs::create_dir_all(&hostdir.0).unwrap();
    let script = format!(
        "{}ip link set eth0 up\nip addr add 10.88.0.2/24 dev eth0\n\
         ip maddr add 01:00:5e:01:02:03 dev eth0\n\
         ip link add link eth0 name eth0.100 type vlan id 100\nip link set eth0.100 up\n\
         step set x\nstep done x\n",
        guest::STEP_FN
    );
    let guest = Guest::boot(GuestOptions {
        kind: Kind::Uml,
        socket: &vhost,
        script: &script,
        hostdir: Some(&hostdir.0),
        console: dir.path("console.log"),
        qemu: Default::default(),
    })
    .unwrap();
    hostdir
        .wait_for("set", Duration::from_secs(60), &guest)
        .unwrap_or_else(|e| panic!("{e:#}\n{}", manager.log()));
    let sock = ns.packet_socket("tap0").unwrap();
    // Injects `count` copies of `frame`; true if they were delivered (or,
    // `pass` false, filtered), all of them and nothing the other way. The
    // guest's own traffic may add deliveries, never filtered frames.
    let deliver = |frame: &[u8], count: u64, pass: bool| -> (u64, u64) {
        use std::os::fd::AsRawFd;
        let (rx0, f0) = rx_totals(&api);
        for _ in 0..count {
            // SAFETY: `frame` is a live buffer of its length.
            let n = unsafe { libc::send(sock.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
            assert_eq!(n, frame.len() as isize);
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        loop {
            let (rx, f) = rx_totals(&api);
            let counted = if pass { rx - rx0 } else { f - f0 };
            if counted >= count || std::time::Instant::now() > deadline {
                // Late frames of the wrong kind would show by now.
                std::thread::sleep(Duration::from_millis(100));
                let (rx, f) = rx_totals(&api);
                return if pass {
                    ((rx - rx0).min(count), f - f0)
                } else {
                    (0, f - f0)
                };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let to = |dst: Mac| {
        frames::udp_frame(
            dst,
            [0x02, 0, 0, 0, 0, 1],
            ([10, 88, 0, 1], [10, 88, 0, 2]),
            (7, 9),
            &[0x5a; 64],
        )
    };
    let tagged = |vid| {
        let inner = frames::ipv4(
            [10, 88, 0, 1],
            [10, 88, 0, 2],
            17,
            &frames::udp(7, 9, &[1; 32]),
        );
        frames::ethernet_vlan(
            GUEST_MAC,
            [0x02, 0, 0, 0, 0, 1],
            vid,
            frames::ETH_IPV4,
            &inner,
        )
    };
    let filters_hold = |when: &str| {
        let checks: [(&str, Vec<u8>, (u64, u64)); 6] = [
            ("own MAC", to(GUEST_MAC), (5, 0)),
            (
                "foreign unicast (promiscuous off)",
                to([2, 0xaa, 0xbb, 0xcc, 0xdd, 0xee]),
                (0, 5),
            ),
            ("the joined group", to([1, 0, 0x5e, 1, 2, 3]), (5, 0)),
            ("another group", to([1, 0, 0x5e, 9, 9, 9]), (0, 5)),
            ("VLAN 100 (added)", tagged(100), (5, 0)),
            ("VLAN 200 (not added)", tagged(200), (0, 5)),
        ];
        for (what, frame, expected) in checks {
            assert_eq!(
                deliver(&frame, 5, expected.0 > 0),
                expected,
                "{when}: {what} (delivered, filtered)\n{}\n{}",
                guest.console(),
                manager.log()
            );
        }
    };
    filters_hold("before the kill");
    manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", manager.log()));
    filters_hold("after the kill");
    hostdir.release("set");
    hostdir
        .wait_for("done", Duration::from_secs(30), &guest)
        .unwrap_or_else(|e| panic!("the guest runs on: {e:#}"));
    hostdir.release("done");
}

/// Waits until the process's main (control) thread blocks in a receive
/// system call (recvfrom, recvmsg or read: inside a frontend message)
/// rather than in epoll.
fn wait_until_receiving(pid: u32) -> bool {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while std::time::Instant::now() < deadline {
        let syscall = std::fs::read_to_string(format!("/proc/{pid}/syscall")).unwrap_or_default();
        let nr = syscall.split_whitespace().next().unwrap_or("");
        let receiving = [libc::SYS_recvfrom, libc::SYS_recvmsg, libc::SYS_read]
            .iter()
            .any(|n| nr == n.to_string());
        if receiving {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// `kill -9` while sandnic is inside a frontend message: a request is half
/// sent, sandnic has read its header and waits for the rest. The next
/// process cannot know whether a reply is owed or where the next message
/// starts, so it does not pick the device up: it takes everything out of
/// the store, the frontend sees its connection close, and sandnic serves
/// afresh, where a new frontend connects and passes traffic.
#[test]
fn a_kill_inside_a_frontend_message_closes_the_connection_and_starts_afresh() {
    require_network!("a_kill_inside_a_frontend_message_closes_the_connection_and_starts_afresh");
    let m = Managed::start();
    let old_pid = m.manager.main_pid().unwrap();
    // SET_FEATURES (2), version 1, 8 bytes of payload that never come.
    let header: Vec<u8> = [2u32, 1, 8].iter().flat_map(|w| w.to_le_bytes()).collect();
    // SAFETY: `header` is a live buffer of its length; the fd is the test
    // frontend's open connection.
    let sent = unsafe { libc::send(m.nic.socket_fd(), header.as_ptr().cast(), header.len(), 0) };
    assert_eq!(sent, header.len() as isize);
    assert!(
        wait_until_receiving(old_pid),
        "sandnic never read the header"
    );
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    assert!(
        m.manager
            .log()
            .contains("the process died while handling a frontend message"),
        "{}",
        m.manager.log()
    );
    closed_then_served_afresh(&m, old_pid);
}

/// After a device was not picked up: the old connection is closed (the
/// frontend reads end of file), nothing of process `old_pid` is left in
/// the store, and a new frontend is served afresh.
fn closed_then_served_afresh(m: &Managed, old_pid: u32) {
    let mut byte = [0u8; 1];
    let timeout = libc::timeval {
        tv_sec: 5,
        tv_usec: 0,
    };
    // SAFETY: SO_RCVTIMEO takes a timeval, which lives for the call; recv
    // writes at most one byte into `byte`.
    let got = unsafe {
        libc::setsockopt(
            m.nic.socket_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&timeout as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as u32,
        );
        libc::recv(m.nic.socket_fd(), byte.as_mut_ptr().cast(), 1, 0)
    };
    assert_eq!(got, 0, "the frontend sees its connection closed");
    // Nothing of the dead process's is left in the store.
    let stale = format!("sandnic-{old_pid}-");
    let names = m.manager.stored_names();
    assert!(
        !names
            .iter()
            .any(|n| n.starts_with(&stale) || n.ends_with(&format!("-{old_pid}"))),
        "{names:?}"
    );
    // A new frontend is served afresh.
    let mut nic = TestNic::connect(&m.dir.path("vhost.sock"), &NicConfig::default())
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    exchange(&m.ns, m.tap_mac, &m.manager, &mut nic, 6003, b"afresh");
}

/// A device that keeps dying (here: killed four times in a row) is picked
/// up three times, then given up: whatever kills it would kill the next
/// process too. The fifth process says why, closes the frontend's
/// connection (its reconnect, if any, applies) and serves afresh — before
/// the manager's start limit (5 starts in 10 s) would end the service
/// with the connection stuck open in the store.
#[test]
fn a_device_that_keeps_dying_is_given_up_and_its_connection_closed() {
    require_network!("a_device_that_keeps_dying_is_given_up_and_its_connection_closed");
    let m = Managed::start();
    let mut last_pid = 0;
    for start in 2..=5 {
        last_pid = m.manager.main_pid().unwrap();
        m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
        m.manager
            .wait_ready(start, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("start {start}: {e:#}\n{}", m.manager.log()));
    }
    let log = m.manager.log();
    assert_eq!(
        log.matches("picked the device up from the service manager's fd store")
            .count(),
        3,
        "{log}"
    );
    assert!(
        log.contains("the device was restarted 3 times within"),
        "{log}"
    );
    assert!(!m.manager.failed(), "within the manager's start limit");
    closed_then_served_afresh(&m, last_pid);
}

/// One UDP datagram each way between the test frontend and the host
/// (port `port` on the host side), through whichever process serves now.
fn one_each_way(m: &mut Managed, port: u16, tag: &[u8]) {
    exchange(&m.ns, m.tap_mac, &m.manager, &mut m.nic, port, tag);
}

/// One UDP datagram each way between `nic` and the host (port `port`
/// on the host side).
fn exchange(
    ns: &NetNs,
    tap_mac: sandnic::frames::Mac,
    manager: &ServiceManager,
    nic: &mut TestNic,
    port: u16,
    tag: &[u8],
) {
    let host = ns
        .inside(|| Ok(std::net::UdpSocket::bind(("10.77.0.1", port))?))
        .unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frame = sandnic::frames::udp_frame(
        tap_mac,
        RIG_GUEST_MAC,
        (
            sandnic::harness::RIG_GUEST_IP,
            sandnic::harness::RIG_HOST_IP,
        ),
        (5000, port),
        tag,
    );
    nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = host
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("guest → host: {e}\n{}", manager.log()));
    assert_eq!(&buf[..n], tag);
    host.send_to(tag, "10.77.0.2:5000").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(f) = nic.recv(0, Duration::from_millis(100)) {
            if sandnic::frames::udp_payload(&f) == Some(tag) {
                return;
            }
        }
        assert!(
            std::time::Instant::now() < deadline,
            "host → guest\n{}",
            manager.log()
        );
    }
}

/// A handover that fails (its destination dies after reading the offer)
/// takes the device out of the store before its pause; the source, which
/// serves on, stores it again. So a `kill -9` of the source afterwards is
/// picked up like any other.
#[test]
fn after_a_failed_handover_the_store_holds_the_device_again() {
    require_network!("after_a_failed_handover_the_store_holds_the_device_again");
    let mut m = Managed::start();
    let path = m.dir.path("fake.handover");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut sock, &mut buf);
        drop(sock);
    });
    let reply = m.api(json!({"cmd": "handover", "path": path}));
    assert_eq!(reply["kind"], "handover_stream_broken", "{reply}");
    fake.join().unwrap();
    one_each_way(&mut m, 6004, b"before");
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    assert!(
        m.manager
            .log()
            .contains("picked the device up from the service manager's fd store"),
        "{}",
        m.manager.log()
    );
    one_each_way(&mut m, 6005, b"after");
}

/// `kill -9` while a hot swap runs (the swap asked for, the process killed
/// 0, 2 and 10 ms later): one process serves the device afterwards, on the
/// frontend's unbroken connection, running one component or the other.
#[test]
fn a_kill_during_a_swap_leaves_one_device_serving() {
    require_network!("a_kill_during_a_swap_leaves_one_device_serving");
    let mut m = Managed::start();
    for (round, delay_ms) in [0u64, 2, 10].into_iter().enumerate() {
        let api = m.dir.path("api.sock");
        let swap = std::thread::spawn(move || {
            sandnic_host::api::client(&api, json!({"cmd": "swap", "component": "builtin:0.2.0"}))
        });
        std::thread::sleep(Duration::from_millis(delay_ms));
        m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
        let _ = swap.join();
        m.manager
            .wait_ready(round + 2, Duration::from_secs(20))
            .unwrap_or_else(|e| panic!("round {round}: {e:#}\n{}", m.manager.log()));
        one_each_way(&mut m, 6010 + round as u16, b"swapped?");
        let status = m.api(json!({"cmd": "status"}));
        let version = status["component"]["version"]
            .as_str()
            .unwrap_or("")
            .to_string();
        assert!(
            version == "0.1.0" || version == "0.2.0",
            "round {round}: {status}"
        );
        assert_eq!(status["frontend_connected"], true, "{status}");
        // Swap back for the next round.
        let _ = m.api(json!({"cmd": "swap", "component": "builtin:0.1.0"}));
    }
    let stats = m.api(json!({"cmd": "stats"}));
    assert_eq!(stats["control"]["disconnects"], 0, "{stats}");
}

/// After a handover the new process is the service (`MAINPID=`) and keeps
/// the store itself: the old one took its fds out before the pause, the
/// new one stores them under names of its own. A `kill -9` of the new
/// process is picked up by the process the manager starts.
#[test]
fn after_a_handover_the_new_process_keeps_the_store() {
    require_network!("after_a_handover_the_new_process_keeps_the_store");
    let mut m = Managed::start();
    let source_pid = m.manager.main_pid().unwrap();
    let incoming = m.dir.path("next.handover");
    let log = m.dir.path("destination.log");
    let mut cmd =
        m.ns.command(sandnic::harness::sandnic_binary().to_str().unwrap());
    cmd.args([
        "serve",
        "--incoming",
        incoming.to_str().unwrap(),
        "--fd-store",
        "64",
    ])
    .env("NOTIFY_SOCKET", m.dir.path("notify.sock"))
    .stdout(std::fs::File::create(&log).unwrap())
    .stderr(std::fs::File::create(&log).unwrap());
    let mut destination = sandnic::harness::spawn(cmd).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !incoming.exists() {
        assert!(std::time::Instant::now() < deadline, "no destination");
        std::thread::sleep(Duration::from_millis(10));
    }
    let reply = m.api(json!({"cmd": "handover", "path": incoming}));
    assert_eq!(reply["ok"], true, "{reply}");
    m.manager
        .wait_ready(2, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert_eq!(m.manager.main_pid(), Some(destination.id()));
    one_each_way(&mut m, 6020, b"handed over");
    let names = m.manager.stored_names();
    let own = format!("sandnic-{}-", destination.id());
    assert!(names.iter().any(|n| n.starts_with(&own)), "{names:?}");
    let old = format!("sandnic-{source_pid}-");
    assert!(!names.iter().any(|n| n.starts_with(&old)), "{names:?}");
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    let _ = destination.wait();
    m.manager
        .wait_ready(3, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    assert!(
        m.manager
            .log()
            .contains("picked the device up from the service manager's fd store"),
        "{}",
        m.manager.log()
    );
    one_each_way(&mut m, 6021, b"picked up");
}

/// Kills between API round trips wait for this: the reactor answers the
/// API only after the loop turn that served the frontend's last message,
/// and that turn ends by bringing the record up to date.
fn record_settled(m: &Managed) {
    m.api(json!({"cmd": "status"}));
}

/// A VM migration's dirty log is not in the record, and a source VMM that
/// a restarted process served unlogged would hand the destination stale
/// pages: a kill while the log is on closes the connection (QEMU's
/// reconnect, if any, applies; the migration fails) and the device is
/// served afresh. A migration that ended leaves the record current, and a
/// kill after it is picked up.
#[test]
fn a_kill_during_a_vm_migration_closes_the_connection_and_starts_afresh() {
    require_network!("a_kill_during_a_vm_migration_closes_the_connection_and_starts_afresh");
    let mut m = Managed::start();
    let log = std::fs::File::from(
        nix::sys::memfd::memfd_create(c"log", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .unwrap(),
    );
    log.set_len(1 << 20).unwrap();
    m.nic.start_dirty_log(&log, 1 << 20, 0).unwrap();
    m.nic.stop_dirty_log().unwrap();
    record_settled(&m);
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    one_each_way(&mut m, 6005, b"after-migration");

    m.nic.start_dirty_log(&log, 1 << 20, 0).unwrap();
    record_settled(&m);
    let pid = m.manager.main_pid().unwrap();
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(3, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    let log = m.manager.log();
    assert_eq!(
        log.matches("picked the device up from the service manager's fd store")
            .count(),
        1,
        "{log}"
    );
    assert!(log.contains("during a VM migration"), "{log}");
    closed_then_served_afresh(&m, pid);
}

/// A migration's destination VMM connected (a standby session): a kill
/// closes both connections, and the device is served afresh.
#[test]
fn a_kill_with_a_migrations_destination_connected_closes_both_connections() {
    require_network!("a_kill_with_a_migrations_destination_connected_closes_both_connections");
    let m = Managed::start();
    let standby =
        TestNic::connect_standby(&m.dir.path("vhost.sock"), &NicConfig::default()).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while m.api(json!({"cmd": "status"}))["sessions"]
        .as_array()
        .map_or(0, Vec::len)
        < 2
    {
        assert!(std::time::Instant::now() < deadline, "no second session");
        std::thread::sleep(Duration::from_millis(10));
    }
    record_settled(&m);
    let pid = m.manager.main_pid().unwrap();
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    assert!(
        m.manager.log().contains("during a VM migration"),
        "{}",
        m.manager.log()
    );
    closed_then_served_afresh(&m, pid);
    assert!(
        standby.start().is_err(),
        "the destination's connection is closed"
    );
}

/// Rate limits are part of the device: one set live before a kill is in
/// force in the process that picks the device up.
#[test]
fn rate_limits_survive_a_kill() {
    require_network!("rate_limits_survive_a_kill");
    let m = Managed::start();
    let set = m.api(json!({"cmd": "limit", "tx": {"bytes": 1_000_000}, "rx": {"frames": 5000}}));
    assert_eq!(set["ok"], true, "{set}");
    record_settled(&m);
    m.manager.signal_main(nix::sys::signal::Signal::SIGKILL);
    m.manager
        .wait_ready(2, Duration::from_secs(20))
        .unwrap_or_else(|e| panic!("{e:#}\n{}", m.manager.log()));
    let status = m.api(json!({"cmd": "status"}));
    assert_eq!(status["limits"], set["limits"], "{status}");
}
