//! Live handover to a new process and hot swap, under continuous traffic in
//! both directions, plus the failure cases: every frame sent must arrive
//! exactly once and in order, the frontend must never see a disconnect, and
//! a handover that fails must leave the source running as before.

use sandnic::frames;
use sandnic::frontend::{NicConfig, QueueId};
use sandnic::harness::{Rig, Sandnic, RIG_GUEST_IP, RIG_GUEST_MAC, RIG_HOST_IP};
use sandnic::require_network;
use sandnic::traffic;
use sandnic_host::handover::state::{Commit, Offer, Reply};
use sandnic_host::handover::stream;
use serde_json::json;
use std::net::UdpSocket;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// Frames per second in each direction: the 50 000 the handover issue asks
/// for. At 60 000 the datapath thread on this 2-core machine sometimes fell
/// behind the TAP queue (frames dropped by the kernel, not lost by sandnic),
/// which made the test depend on timing.
const RATE: u64 = 50_000;
const DURATION: Duration = Duration::from_millis(1500);

fn rig() -> Rig {
    Rig::new(&[], NicConfig::default()).expect("rig")
}

/// The traffic tests need the machine's cores: one at a time.
static TRAFFIC: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Traffic both ways at RATE for DURATION with `action` halfway; every
/// frame must arrive exactly once and in order.
fn under_traffic<R: Send + 'static>(
    rig: &mut Rig,
    action: impl FnOnce() -> R + Send + 'static,
) -> R {
    let report = traffic::run(
        &mut rig.nic,
        &rig.ns,
        rig.tap_mac,
        RATE,
        DURATION,
        DURATION / 2,
        action,
    );
    let check = |what, got: &[u64]| {
        if let Err(e) = report.exact(got) {
            panic!(
                "{what}: {e}\n{}",
                rig.sandnic
                    .stats()
                    .map(|v| v.to_string())
                    .unwrap_or_default()
            );
        }
    };
    check("host → guest", &report.guest_got);
    check("guest → host", &report.host_got);
    report.result
}

#[test]
fn handover_under_traffic_loses_nothing() {
    require_network!("handover_under_traffic_loses_nothing");
    let _serial = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = rig();
    let (destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &[]).unwrap();
    let source_api = rig.sandnic.api.clone();
    let reply = under_traffic(&mut rig, move || {
        sandnic_host::api::client(&source_api, json!({"cmd": "handover", "path": path}))
            .map(|(v, _)| v)
    })
    .unwrap();
    assert_eq!(
        reply["ok"],
        true,
        "{reply}\n{}\n{}",
        rig.sandnic.log(),
        destination.log()
    );
    let downtime = reply["downtime_us"].as_u64().expect("downtime reported");
    eprintln!(
        "handover downtime: {downtime} µs, {} fds, by step {}",
        reply["fds"], reply["phases_us"]
    );
    // The pause step by step adds up to the downtime (each step rounded
    // down to a microsecond).
    let phases = reply["phases_us"].as_object().expect("steps reported");
    let mut names: Vec<&str> = phases.keys().map(String::as_str).collect();
    names.sort_unstable();
    assert_eq!(
        names,
        ["load", "ready", "rebuild", "receive", "resume", "save", "send", "stop"]
    );
    let sum: u64 = phases.values().filter_map(|v| v.as_u64()).sum();
    assert!(
        sum <= downtime && downtime - sum < 8,
        "steps {sum} µs, downtime {downtime} µs: {reply}"
    );
    // The source is gone; the destination serves the same connection.
    assert_eq!(
        rig.sandnic.wait_exited(Duration::from_secs(5)),
        Some(Some(0)),
        "source exits"
    );
    let status = destination.api(json!({"cmd": "status"})).unwrap();
    assert_eq!(status["frontend_connected"], true, "{status}");
    // The counters came along: every frame the guest sent, before and
    // after the switch, is counted in the new process.
    let stats = destination.stats().unwrap();
    assert_eq!(
        stats["queues"][0]["tx_packets"],
        RATE * DURATION.as_millis() as u64 / 1000,
        "{stats}"
    );
    assert_eq!(
        &rig.nic.config(12).unwrap()[..6],
        &RIG_GUEST_MAC,
        "config served by the new process, same connection"
    );
    rig.sandnic = destination;
    // And traffic continues after the switch.
    under_traffic(&mut rig, || ());
}

/// The destination serves a control command that comes before anything
/// else wakes it (a guest answering the announce that follows a handover).
#[test]
fn destination_answers_a_control_command_sent_right_after_handover() {
    require_network!("destination_answers_a_control_command_sent_right_after_handover");
    let mut rig = rig();
    let (destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &[]).unwrap();
    let reply = rig.sandnic.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    const RX_PROMISC_ON: [u8; 3] = [0, 0, 1];
    let ack = rig.nic.ctrl(&RX_PROMISC_ON);
    assert_eq!(ack.ok(), Some(0), "{}", destination.log());
}

/// Relays one handover from the source (connecting at `listener`) to the
/// destination waiting at `destination`, frame by frame, and holds the
/// destination's `Prepared` until `between` has run: what the frontend does
/// then happens while the destination prepares and the source still runs.
/// Returns how many fds the commit carried.
fn relay_handover(
    listener: UnixListener,
    destination: PathBuf,
    between: impl FnOnce(),
) -> std::thread::JoinHandle<usize> {
    let (prepared_tx, prepared_rx) = std::sync::mpsc::channel();
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    let relay = std::thread::spawn(move || {
        let t = Duration::from_secs(10);
        let (source, _) = listener.accept().unwrap();
        let dest = UnixStream::connect(&destination).unwrap();
        let pass_fds = |from: &UnixStream, to: &UnixStream, count: usize| {
            let fds = stream::recv_fds(from, count, t).unwrap();
            let raw: Vec<_> = fds.iter().map(|fd| fd.as_raw_fd()).collect();
            stream::send_fds(to, &raw).unwrap();
        };
        let offer: Offer = stream::recv(&source, t).unwrap();
        stream::send(&dest, &offer).unwrap();
        pass_fds(&source, &dest, offer.fds.len());
        let prepared: Reply = stream::recv(&dest, t).unwrap();
        assert!(matches!(prepared, Reply::Prepared), "{prepared:?}");
        prepared_tx.send(()).unwrap();
        go_rx.recv().unwrap();
        stream::send(&source, &prepared).unwrap();
        let commit: Commit = stream::recv(&source, t).unwrap();
        stream::send(&dest, &commit).unwrap();
        pass_fds(&source, &dest, commit.fds.len());
        for _ in 0..2 {
            // Ready, then Resumed.
            let reply: Reply = stream::recv(&dest, t).unwrap();
            stream::send(&source, &reply).unwrap();
        }
        commit.fds.len()
    });
    prepared_rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the destination prepared");
    between();
    go_tx.send(()).unwrap();
    relay
}

/// A handover through `relay_handover`, with `between` run while the
/// destination prepares; returns the API reply and the commit's fd count.
fn relayed_handover(rig: &mut Rig, between: impl FnOnce(&mut Rig)) -> (serde_json::Value, usize) {
    let args = ["--busy-poll-us", "0"];
    let (destination, dest_path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &args).unwrap();
    let relay_path = rig.dir.path("relay.handover");
    let listener = UnixListener::bind(&relay_path).unwrap();
    let api = rig.sandnic.api.clone();
    let asked = std::thread::spawn(move || {
        sandnic_host::api::client(&api, json!({"cmd": "handover", "path": relay_path}))
            .map(|(v, _)| v)
    });
    let relay = relay_handover(listener, dest_path, || between(rig));
    let reply = asked.join().unwrap().unwrap();
    let resent = relay.join().unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    assert_eq!(
        rig.sandnic.wait_exited(Duration::from_secs(5)),
        Some(Some(0))
    );
    rig.sandnic = destination;
    (reply, resent)
}

/// Nothing changed while the destination prepared: only the state and the
/// ring positions cross the pause, no fd.
#[test]
fn an_unchanged_device_crosses_the_pause_without_fds() {
    require_network!("an_unchanged_device_crosses_the_pause_without_fds");
    let mut rig = Rig::new(&["--busy-poll-us", "0"], NicConfig::default()).expect("rig");
    let (reply, resent) = relayed_handover(&mut rig, |_| ());
    assert_eq!(resent, 0, "{reply}");
    assert!(reply["prepare_us"].as_u64().is_some(), "{reply}");
    still_serving(&mut rig);
}

/// The frontend gives the TX ring a new kick fd after the offer went out
/// (the destination prepared with the old one): the pause carries the new
/// set, and the destination wakes on the new kick. With the datapath never
/// busy-polling, a destination left with the old kick fd would never see a
/// frame the guest sends.
#[test]
fn a_kick_fd_changed_while_the_destination_prepares_crosses_the_pause() {
    require_network!("a_kick_fd_changed_while_the_destination_prepares_crosses_the_pause");
    let mut rig = Rig::new(&["--busy-poll-us", "0"], NicConfig::default()).expect("rig");
    let (reply, resent) = relayed_handover(&mut rig, |rig| {
        rig.nic.replace_kick(QueueId::Tx(0)).unwrap();
    });
    assert!(resent > 0, "the commit carried no fds: {reply}");
    still_serving(&mut rig);
}

#[test]
fn swap_under_traffic_loses_nothing() {
    require_network!("swap_under_traffic_loses_nothing");
    let _serial = TRAFFIC.lock().unwrap_or_else(|p| p.into_inner());
    let mut rig = rig();
    let api = rig.sandnic.api.clone();
    let v2 = sandnic_host::sandbox::components::built::v2();
    let reply = under_traffic(&mut rig, move || {
        sandnic_host::api::client(&api, json!({"cmd": "swap", "component": v2})).map(|(v, _)| v)
    })
    .unwrap();
    assert_eq!(reply["ok"], true, "{reply}");
    eprintln!("swap pause: {} µs", reply["pause_us"]);
    assert_eq!(
        rig.sandnic.api(json!({"cmd": "status"})).unwrap()["component"]["version"],
        "0.2.0"
    );
}

/// Normal traffic both ways still flows through `sandnic`.
fn still_serving(rig: &mut Rig) {
    let host = rig
        .ns
        .inside(|| Ok(UdpSocket::bind(("10.77.0.1", 6002))?))
        .unwrap();
    host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frame = frames::udp_frame(
        rig.tap_mac,
        RIG_GUEST_MAC,
        (RIG_GUEST_IP, RIG_HOST_IP),
        (5000, 6002),
        b"still here",
    );
    rig.nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = host
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("guest → host stopped: {e}\n{}", rig.sandnic.log()));
    assert_eq!(&buf[..n], b"still here");
    host.send_to(b"and back", "10.77.0.2:5000").unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(f) = rig.nic.recv(0, Duration::from_millis(100)) {
            if frames::udp_payload(&f) == Some(b"and back") {
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "host → guest stopped\n{}",
            rig.sandnic.log()
        );
    }
}

#[test]
fn destination_dying_before_ready_leaves_the_source_running() {
    require_network!("destination_dying_before_ready_leaves_the_source_running");
    let mut rig = rig();
    // A "destination" that reads the start of the offer and dies.
    let path = rig.dir.path("fake.handover");
    let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let (mut sock, _) = listener.accept().unwrap();
        let mut buf = [0u8; 64];
        let _ = std::io::Read::read(&mut sock, &mut buf);
        drop(sock);
    });
    let reply = rig.sandnic.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "handover_stream_broken", "{reply}");
    // Only now: had the source never connected, the fake would still be
    // waiting in accept.
    fake.join().unwrap();
    assert!(rig.sandnic.exited().is_none(), "the source keeps running");
    still_serving(&mut rig);
}

/// A destination that prepares, takes the commit and then hangs: the source
/// resumes by itself once `Ready` is overdue, and the device serves again.
#[test]
fn destination_hanging_after_the_commit_is_given_up_and_the_source_resumes() {
    require_network!("destination_hanging_after_the_commit_is_given_up_and_the_source_resumes");
    let mut rig = rig();
    let path = rig.dir.path("hang.handover");
    let listener = UnixListener::bind(&path).unwrap();
    let fake = std::thread::spawn(move || {
        let t = Duration::from_secs(10);
        let (sock, _) = listener.accept().unwrap();
        let offer: Offer = stream::recv(&sock, t).unwrap();
        let _fds = stream::recv_fds(&sock, offer.fds.len(), t).unwrap();
        stream::send(&sock, &Reply::Prepared).unwrap();
        let _commit: Commit = stream::recv(&sock, t).unwrap();
        // Hangs: no Ready, the stream stays open until the source gives up.
        let mut byte = [0u8; 1];
        let _ = std::io::Read::read(&mut &sock, &mut byte);
    });
    let asked = Instant::now();
    let reply = rig.sandnic.handover(&path, false).unwrap();
    let took = asked.elapsed();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "handover_timed_out", "{reply}");
    fake.join().unwrap();
    assert!(
        took < Duration::from_secs(8),
        "the source waited {took:?} for Ready"
    );
    assert!(rig.sandnic.exited().is_none(), "the source keeps running");
    still_serving(&mut rig);
}

#[test]
fn destination_that_cannot_load_the_state_refuses_and_the_source_resumes() {
    require_network!("destination_that_cannot_load_the_state_refuses_and_the_source_resumes");
    let mut rig = rig();
    // The source runs device version 2; the destination is told to run
    // version 1, which cannot read its state.
    let v2 = sandnic_host::sandbox::components::built::v2();
    assert_eq!(
        rig.sandnic
            .api(json!({"cmd": "swap", "component": v2}))
            .unwrap()["ok"],
        true
    );
    let v1 = ["--component", "builtin:0.1.0"];
    let (mut destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "old", &rig.sandnic, &v1).unwrap();
    let reply = rig.sandnic.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], false, "{reply}");
    assert_eq!(reply["kind"], "handover_refused", "{reply}");
    assert!(
        destination.wait_exited(Duration::from_secs(5)).is_some(),
        "the refusing destination should exit"
    );
    assert_eq!(destination.exited(), Some(Some(1)));
    still_serving(&mut rig);
}

#[test]
fn corrupted_and_truncated_streams_are_refused_cleanly() {
    require_network!("corrupted_and_truncated_streams_are_refused_cleanly");
    let rig = rig();
    let cases: [(&str, Vec<u8>); 3] = [
        ("garbage", {
            let mut v = 40u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[0xc1; 40]);
            v
        }),
        ("truncated", {
            let mut v = 1000u32.to_le_bytes().to_vec();
            v.extend_from_slice(&[0x80; 10]);
            v
        }),
        ("oversized", (u32::MAX).to_le_bytes().to_vec()),
    ];
    for (what, bytes) in cases {
        let (mut destination, path) =
            Sandnic::incoming(&rig.ns, &rig.dir, what, &rig.sandnic, &[]).unwrap();
        let mut sock = UnixStream::connect(&path).unwrap_or_else(|e| {
            panic!(
                "{what}: connecting to the destination: {e} (exited: {:?})\n{}",
                destination.exited(),
                destination.log()
            )
        });
        std::io::Write::write_all(&mut sock, &bytes).unwrap();
        drop(sock);
        assert!(
            destination.wait_exited(Duration::from_secs(10)).is_some(),
            "{what}: destination still waiting"
        );
        assert_eq!(
            destination.exited(),
            Some(Some(1)),
            "{what}: {}",
            destination.log()
        );
        let log = destination.log();
        assert!(!log.contains("panicked"), "{what}: {log}");
        assert!(log.contains("handover"), "{what}: a clear message: {log}");
    }
    // An offer that decodes but whose manifest lies is refused with a reason.
    let (mut destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "liar", &rig.sandnic, &[]).unwrap();
    let sock = UnixStream::connect(&path).unwrap();
    let offer = sandnic_host::handover::state::Offer {
        magic: sandnic_host::handover::stream::MAGIC.into(),
        version: sandnic_host::handover::stream::VERSION,
        source_component: sandnic_host::sandbox::ComponentInfo {
            name: "x".into(),
            version: "0".into(),
            state_version: 1,
            oldest_state_version: 1,
        },
        host: sandnic_host::handover::state::HostState {
            config: sandnic_device::DeviceConfig {
                mac: RIG_GUEST_MAC,
                max_queue_pairs: 1,
                mtu: None,
                backend_offloads: sandnic_device::Offloads::empty(),
                compat: sandnic_device::Compat::default(),
            },
            protocol: Default::default(),
            vrings: vec![],
            regions: vec![],
            tap: sandnic_host::handover::state::TapState {
                name: "tap0".into(),
                queues: 1,
            },
            link_up: true,
            socket_paths: vec![],
            connect: None,
            counters: Default::default(),
            queue_stats: vec![],
            limits: Default::default(),
        },
        component_wasm: vec![],
        fds: vec![],
    };
    sandnic_host::handover::stream::send(&sock, &offer).unwrap();
    let reply: sandnic_host::handover::state::Reply =
        sandnic_host::handover::stream::recv(&sock, Duration::from_secs(5)).unwrap();
    match reply {
        sandnic_host::handover::state::Reply::Refused { reason, kind } => {
            assert_eq!(kind, "invalid_offer", "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert_eq!(
        destination.wait_exited(Duration::from_secs(5)),
        Some(Some(1))
    );
}

#[test]
fn new_tap_handover_reopens_the_tap_by_name() {
    require_network!("new_tap_handover_reopens_the_tap_by_name");
    let mut rig = rig();
    let (destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "newtap", &rig.sandnic, &["--new-tap"]).unwrap();
    let reply = rig.sandnic.handover(&path, true).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    rig.sandnic = destination;
    still_serving(&mut rig);
}

/// A destination still waiting for its source ends on SIGTERM or SIGINT,
/// with exit 0 and its socket file gone (a `systemctl reload` whose
/// handover never comes leaves nothing that only SIGKILL stops).
#[test]
fn a_waiting_destination_ends_on_a_signal() {
    require_network!("a_waiting_destination_ends_on_a_signal");
    let rig = rig();
    for signal in [
        nix::sys::signal::Signal::SIGTERM,
        nix::sys::signal::Signal::SIGINT,
    ] {
        let name = format!("waiting-{signal}");
        let (mut waiting, path) =
            Sandnic::incoming(&rig.ns, &rig.dir, &name, &rig.sandnic, &[]).unwrap();
        let pid = nix::unistd::Pid::from_raw(waiting.child.id() as i32);
        nix::sys::signal::kill(pid, signal).unwrap();
        assert_eq!(
            waiting.wait_exited(Duration::from_secs(5)),
            Some(Some(0)),
            "{signal}: {}",
            waiting.log()
        );
        assert!(!path.exists(), "{signal}: socket file removed");
        assert!(waiting.log().contains("signal received while waiting"));
    }
}

/// After a hot swap, a destination started with no `--component` takes the
/// device: a release built into the binary that reads the swapped-in
/// state (`swap builtin:0.2.0`), or the very component the source runs
/// when it came from a file (its bytes travel with the handover).
#[test]
fn a_handover_after_a_swap_needs_no_component_flag() {
    require_network!("a_handover_after_a_swap_needs_no_component_flag");
    let v2_file = sandnic_host::sandbox::components::built::v2();
    for (named, origin) in [
        ("builtin:0.2.0".to_string(), "builtin:0.2.0"),
        (v2_file.display().to_string(), "(from the handover)"),
    ] {
        let mut rig = rig();
        let swapped = rig
            .sandnic
            .api(json!({"cmd": "swap", "component": named}))
            .unwrap();
        assert_eq!(swapped["ok"], true, "{named}: {swapped}");
        let (destination, path) =
            Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &[]).unwrap();
        let reply = rig.sandnic.handover(&path, false).unwrap();
        assert_eq!(reply["ok"], true, "{named}: {reply}\n{}", destination.log());
        let status = destination.api(json!({"cmd": "status"})).unwrap();
        assert_eq!(status["component"]["version"], "0.2.0", "{named}: {status}");
        assert_eq!(status["component"]["state_version"], 2, "{status}");
        let serving = status["component"]["origin"].as_str().unwrap_or_default();
        assert!(serving.contains(origin), "{named}: runs {serving}");
        assert_eq!(
            rig.sandnic.wait_exited(Duration::from_secs(5)),
            Some(Some(0))
        );
        rig.sandnic = destination;
        still_serving(&mut rig);
    }
}

/// Client mode (`serve --connect`): the handover carries the dialled
/// connection and the path it was dialled on. The destination serves the
/// same connection, and when that frontend goes and a new one listens, the
/// destination dials it.
#[test]
fn a_client_mode_handover_serves_on_and_dials_again() {
    require_network!("a_client_mode_handover_serves_on_and_dials_again");
    let mut rig = Rig::client_mode(NicConfig::default()).expect("rig");
    let (destination, path) =
        Sandnic::incoming(&rig.ns, &rig.dir, "dest", &rig.sandnic, &[]).unwrap();
    let reply = rig.sandnic.handover(&path, false).unwrap();
    assert_eq!(reply["ok"], true, "{reply}\n{}", destination.log());
    rig.sandnic = destination;
    still_serving(&mut rig);
    let frontend = rig.dir.path("frontend.sock");
    drop(rig.frontend_listener.take());
    std::fs::remove_file(&frontend).unwrap();
    rig.nic.hang_up();
    std::thread::sleep(Duration::from_millis(100));
    let listener = UnixListener::bind(&frontend).unwrap();
    rig.nic = sandnic::frontend::TestNic::accept(
        &listener,
        &NicConfig::default(),
        Duration::from_secs(5),
    )
    .unwrap_or_else(|e| panic!("{e:#}\n{}", rig.sandnic.log()));
    still_serving(&mut rig);
}
