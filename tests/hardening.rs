//! The native host confined: every thread of a running `sandnic serve`
//! under a seccomp filter with NO_NEW_PRIVS, a forbidden syscall stopped,
//! the device running as an unprivileged user (with a component cache of
//! its own), the control API closed to other users, and a TAP ioctl that
//! fails never leaving the TAP and the datapath out of step.

use sandnic::frontend::NicConfig;
use sandnic::harness::{NetNs, Rig, Sandnic, ScratchDir};
use sandnic::require_network;
use sandnic_device::features as f;
use sandnic_host::hardening::allowlists::Role;
use sandnic_host::hardening::seccomp::{self, Mode, VIOLATION_EXIT};
use std::time::{Duration, Instant};

/// `Field:` of every thread's /proc status.
fn thread_status(pid: u32, field: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).unwrap() {
        let task = task.unwrap().path();
        let status = std::fs::read_to_string(task.join("status")).unwrap_or_default();
        let name = status
            .lines()
            .find_map(|l| l.strip_prefix("Name:"))
            .unwrap_or("")
            .trim()
            .to_string();
        let value = status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .unwrap_or("")
            .trim()
            .to_string();
        out.push((name, value));
    }
    out
}

#[test]
fn every_thread_of_a_running_sandnic_is_confined() {
    require_network!("every_thread_of_a_running_sandnic_is_confined");
    // Three pairs on two datapath threads: one thread confines itself for
    // the two pairs it serves.
    let rig = Rig::new(
        &["--queues", "3", "--datapath-threads", "2"],
        NicConfig {
            pairs: 3,
            ..NicConfig::default()
        },
    )
    .unwrap();
    let pid = rig.sandnic.child.id();
    let seccomp = thread_status(pid, "Seccomp:");
    assert!(
        seccomp.len() >= 3,
        "control thread and two workers: {seccomp:?}"
    );
    let workers = seccomp
        .iter()
        .filter(|(name, _)| name.starts_with("sandnic-dp"))
        .count();
    assert_eq!(workers, 2, "datapath threads: {seccomp:?}");
    assert!(
        seccomp.iter().all(|(_, v)| v == "2"),
        "Seccomp per thread: {seccomp:?}"
    );
    let nnp = thread_status(pid, "NoNewPrivs:");
    assert!(
        nnp.iter().all(|(_, v)| v == "1"),
        "NoNewPrivs per thread: {nnp:?}"
    );
}

/// Forks; the child puts `role`'s filter (trap mode) on itself and runs
/// `call`; returns the child's exit code.
fn in_confined_child(role: Role, call: impl FnOnce() -> i32) -> i32 {
    in_child_with_filter(role, Mode::Trap, call)
}

/// Forks; the child puts `role`'s filter in `mode` on itself and runs
/// `call`; returns the child's exit code.
fn in_child_with_filter(role: Role, mode: Mode, call: impl FnOnce() -> i32) -> i32 {
    let program = seccomp::filter(role, mode).unwrap().unwrap();
    // SAFETY: the child only applies the prebuilt filter (prctl, seccomp),
    // makes one syscall and leaves with _exit; it touches no lock another
    // thread of this test process could hold.
    match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            seccomp::install_violation_reporter();
            let code = match seccomp::apply(role, &program) {
                Ok(()) => call(),
                Err(_) => 99,
            };
            // SAFETY: ends the child without running the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("child ended with {other:?}"),
            }
        }
    }
}

fn open_a_file() -> i32 {
    // SAFETY: plain syscall with a valid C string.
    unsafe { libc::open(c"/etc/hostname".as_ptr(), libc::O_RDONLY) };
    0
}

fn executable_mapping() -> i32 {
    // SAFETY: an anonymous mapping nobody uses.
    unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_EXEC,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    0
}

/// An eventfd made before the filter goes on (as the datapath's are),
/// written and read under it.
fn eventfd_round_trip() -> impl FnOnce() -> i32 {
    let fd = nix::sys::eventfd::EventFd::new().unwrap();
    move || {
        let ok = fd.write(1).is_ok() && fd.read().is_ok_and(|v| v == 1);
        std::mem::forget(fd);
        i32::from(!ok)
    }
}

/// 0 when an AF_INET socket could be made.
fn inet_socket_made() -> i32 {
    // SAFETY: plain syscall; the fd is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    if fd < 0 {
        return 1;
    }
    // SAFETY: `fd` was just returned by socket(2) and is not used again.
    unsafe { libc::close(fd) };
    0
}

fn unix_socket() -> i32 {
    // SAFETY: plain syscall.
    let fd = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_STREAM, 0) };
    i32::from(fd < 0)
}

#[test]
fn a_syscall_outside_a_roles_allowlist_is_stopped() {
    assert_eq!(
        in_confined_child(Role::Datapath, inet_socket_made),
        VIOLATION_EXIT,
        "datapath: socket"
    );
    assert_eq!(
        in_confined_child(Role::Datapath, open_a_file),
        VIOLATION_EXIT,
        "datapath: open"
    );
    assert_eq!(
        in_confined_child(Role::Datapath, executable_mapping),
        VIOLATION_EXIT,
        "datapath: executable memory"
    );
    assert_eq!(
        in_confined_child(Role::Control, inet_socket_made),
        VIOLATION_EXIT,
        "control: AF_INET"
    );
    // What a role needs still works.
    assert_eq!(
        in_confined_child(Role::Datapath, eventfd_round_trip()),
        0,
        "datapath: eventfd"
    );
    assert_eq!(
        in_confined_child(Role::Control, unix_socket),
        0,
        "control: AF_UNIX"
    );
}

/// `--seccomp log`: the forbidden call goes through (the kernel logs it),
/// and the filter is on all the same (the same child in trap mode dies).
#[test]
fn log_mode_lets_a_forbidden_syscall_through() {
    assert_eq!(
        in_child_with_filter(Role::Datapath, Mode::Log, inet_socket_made),
        0,
        "datapath, log mode: socket(AF_INET) made"
    );
    assert_eq!(
        in_child_with_filter(Role::Datapath, Mode::Trap, inet_socket_made),
        VIOLATION_EXIT,
        "datapath, trap mode: socket(AF_INET) stopped"
    );
    assert!(seccomp::filter(Role::Datapath, Mode::Off)
        .unwrap()
        .is_none());
}

#[test]
fn sandnic_serves_unprivileged_with_user() {
    require_network!("sandnic_serves_unprivileged_with_user");
    let mut rig = Rig::new(&["--user", "nobody"], NicConfig::default()).unwrap();
    let pid = rig.sandnic.child.id();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .unwrap_or("")
            .split_whitespace()
            .collect::<Vec<_>>()
    };
    assert_eq!(field("Uid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Gid:"), ["65534"; 4], "{status}");
    assert_eq!(field("Groups:"), Vec::<&str>::new(), "{status}");
    for caps in ["CapInh:", "CapPrm:", "CapEff:", "CapAmb:"] {
        assert_eq!(field(caps), ["0000000000000000"], "{caps} {status}");
    }
    assert_eq!(field("NoNewPrivs:"), ["1"]);
    // The device works.
    let sock = rig
        .ns
        .inside(|| Ok(std::net::UdpSocket::bind(("10.77.0.1", 6400))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frame = rig.guest_udp(6400, &[9; 32]);
    rig.nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).expect("traffic as nobody");
    assert_eq!(&buf[..n], &[9; 32]);
    assert_eq!(rig.sandnic.stats().unwrap()["ok"], true);
}

/// A root sandnic that drops to `--user` keeps a component cache it can
/// still use after the drop: a swap's compiled component is written to
/// `uid-N` under the cache directory, owned by that user.
#[test]
fn an_unprivileged_sandnic_caches_compiled_components_in_its_own_directory() {
    require_network!("an_unprivileged_sandnic_caches_compiled_components_in_its_own_directory");
    use std::os::unix::fs::MetadataExt;
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.77.0.1/24").unwrap();
    let dir = ScratchDir::new().unwrap();
    // Not under the scratch directory: `nobody` must be able to reach it.
    let cache = std::env::temp_dir().join(format!("sandnic-user-cache-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&cache);
    let sandnic = Sandnic::serve_exactly(
        &ns,
        &dir,
        &["--tap", "tap0", "--user", "nobody"],
        &[("SANDNIC_CACHE_DIR", cache.as_os_str())],
    )
    .unwrap();
    let v2 = sandnic_host::sandbox::components::built::v2();
    let swap = sandnic
        .api(serde_json::json!({"cmd": "swap", "component": v2}))
        .unwrap();
    assert_eq!(swap["ok"], true, "{swap}");
    let own = cache.join("uid-65534");
    let cached: Vec<_> = std::fs::read_dir(&own)
        .unwrap_or_else(|e| panic!("{}: {e}\n{}", own.display(), sandnic.log()))
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "cwasm"))
        .map(|e| (e.path(), e.metadata().map(|m| m.uid())))
        .collect();
    let _ = std::fs::remove_dir_all(&cache);
    // The builtin component was compiled at start, as root; the swap's
    // after the drop, as nobody.
    let written_as_nobody = cached
        .iter()
        .filter(|(_, owner)| owner.as_ref().ok() == Some(&65534));
    assert_eq!(
        written_as_nobody.count(),
        1,
        "{cached:?}\n{}",
        sandnic.log()
    );
    assert!(
        !sandnic
            .log()
            .contains("could not write the component cache"),
        "{}",
        sandnic.log()
    );
}

#[test]
fn the_api_refuses_clients_of_another_user() {
    require_network!("the_api_refuses_clients_of_another_user");
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.77.0.1/24").unwrap();
    let dir = ScratchDir::new().unwrap();
    let sandnic = Sandnic::serve(&ns, &dir, &["--tap", "tap0"]).unwrap();
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(&sandnic.api).unwrap().permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "API socket mode");
    // A client running as another user (a forked child that dropped to
    // nobody; the socket file's mode is lifted for it so the kernel lets
    // it connect and sandnic's own check is what refuses it).
    std::fs::set_permissions(
        &sandnic.api,
        std::os::unix::fs::PermissionsExt::from_mode(0o666),
    )
    .unwrap();
    let api = sandnic.api.clone();
    // SAFETY: the child drops privileges, makes one request with
    // plain syscalls (std's UnixStream) and leaves with _exit.
    let code = match unsafe { nix::unistd::fork() }.unwrap() {
        nix::unistd::ForkResult::Child => {
            let nobody = nix::unistd::Uid::from_raw(65534);
            let code = if nix::unistd::setresuid(nobody, nobody, nobody).is_err() {
                2
            } else {
                match sandnic_host::api::client(&api, serde_json::json!({"cmd": "status"})) {
                    Ok(_) => 1,
                    Err(_) => 0,
                }
            };
            // SAFETY: ends the child without the parent's destructors.
            unsafe { libc::_exit(code) }
        }
        nix::unistd::ForkResult::Parent { child } => {
            match nix::sys::wait::waitpid(child, None).unwrap() {
                nix::sys::wait::WaitStatus::Exited(_, code) => code,
                other => panic!("{other:?}"),
            }
        }
    };
    assert_eq!(code, 0, "a client of another uid got an answer");
    assert!(
        sandnic.log().contains("API client refused"),
        "{}",
        sandnic.log()
    );
    // Its own user (root here) is still served.
    assert_eq!(sandnic.stats().unwrap()["ok"], true);
}

/// A TAP ioctl that fails (the TAP was deleted under sandnic) must not
/// change what the datapath does: the TAP and the datapath keep the old
/// setting, and the device asks the driver for a reset.
#[test]
fn a_failed_tap_ioctl_keeps_tap_and_datapath_in_step() {
    require_network!("a_failed_tap_ioctl_keeps_tap_and_datapath_in_step");
    let features = NicConfig::default().features
        | f::CTRL_GUEST_OFFLOADS
        | f::GUEST_CSUM
        | f::GUEST_TSO4
        | f::GUEST_TSO6;
    let mut rig = Rig::new(
        &[],
        NicConfig {
            features,
            ..NicConfig::default()
        },
    )
    .unwrap();
    let room = |rig: &Rig| {
        rig.sandnic
            .api(serde_json::json!({"cmd": "status"}))
            .unwrap()["pairs"][0]["frame_room"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(room(&rig), 65_550, "GSO towards the guest negotiated");
    rig.ns.ip(&["link", "del", "tap0"]).unwrap();
    // The driver switches TSO off: the TAP cannot follow any more.
    let command = sandnic_device::ctrl::CtrlCommand::GuestOffloadsSet(f::GUEST_CSUM).encode();
    let _ = rig.nic.ctrl(&command).unwrap();
    assert!(
        rig.nic.wait_config_change(Duration::from_secs(3)),
        "no config change notified"
    );
    let status = rig
        .sandnic
        .api(serde_json::json!({"cmd": "status"}))
        .unwrap();
    assert_eq!(status["needs_reset"], true, "{status}");
    assert_eq!(
        room(&rig),
        65_550,
        "the datapath followed a change the TAP refused"
    );
    assert_eq!(rig.control_stat("tap_errors"), 1);
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert!(rig.sandnic.stats().is_ok(), "sandnic died");
        std::thread::sleep(Duration::from_millis(100));
    }
}
