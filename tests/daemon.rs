//! sandnic under a service manager: sockets inherited through systemd
//! socket activation (Debian's `systemd-socket-activate`) or named with
//! `--socket-fd` / `--api-fd`, the `sd_notify` messages (READY with the main
//! pid, the new main pid after a handover, STOPPING), and a clean exit on
//! SIGTERM (rings stopped; socket files removed only when sandnic made them).

use sandnic::frames;
use sandnic::frontend::{NicConfig, TestNic};
use sandnic::harness::{sandnic_binary, spawn, wait_for_exit, NetNs, Rig, Sandnic, ScratchDir};
use sandnic::require_network;
use serde_json::json;
use std::os::fd::AsRawFd;
use std::os::unix::net::{UnixDatagram, UnixListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

const SOCKET_ACTIVATE: &str = "/usr/bin/systemd-socket-activate";
const GUEST_MAC: &str = "52:54:00:12:34:56";

/// The test's stand-in for systemd's notification socket. A thread reads
/// it all the time, as systemd does: a sender whose datagrams are not read
/// blocks once the socket's queue (10 datagrams) is full, and sandnic sends
/// one per fd it stores.
struct NotifySocket {
    messages: std::sync::mpsc::Receiver<String>,
    path: PathBuf,
}

impl NotifySocket {
    fn new(dir: &ScratchDir) -> Self {
        let path = dir.path("notify.sock");
        let socket = UnixDatagram::bind(&path).unwrap();
        // Anyone may notify, as on systemd's own socket (sandnic notifies
        // after it dropped to its --user).
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let (tx, messages) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            // Fds that come with a message (FDSTORE=1) are closed by the
            // kernel: this stand-in keeps no store.
            while let Ok(n) = socket.recv(&mut buf) {
                let message = String::from_utf8_lossy(&buf[..n]).into_owned();
                if tx.send(message).is_err() {
                    return;
                }
            }
        });
        Self { messages, path }
    }

    /// The next message carrying the line `line`, skipping others.
    fn wait_for(&self, line: &str) -> String {
        loop {
            let message = self
                .messages
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| panic!("no {line} notification: {e}"));
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }

    /// Messages that arrive within `wait`.
    fn drain(&self, wait: Duration) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(message) = self.messages.recv_timeout(wait) {
            out.push(message);
        }
        out
    }
}

/// Processes a test started that outlive their parent's death signal
/// (sandnic dropping to `--user` clears it): killed when the test ends,
/// whatever its outcome.
struct KillOnDrop(Vec<u32>);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid as i32),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

fn main_pid(message: &str) -> u32 {
    message
        .lines()
        .find_map(|l| l.strip_prefix("MAINPID="))
        .and_then(|pid| pid.parse().ok())
        .unwrap_or_else(|| panic!("no MAINPID in {message:?}"))
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    wait_for_exit(child, Duration::from_secs(10)).expect("sandnic did not exit")
}

fn terminate(pid: u32) {
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
}

/// A frame from the frontend reaches the host through the TAP.
fn frame_reaches_the_host(ns: &NetNs, nic: &mut TestNic, port: u16) {
    let sock = ns
        .inside(|| Ok(std::net::UdpSocket::bind(("10.94.0.1", port))?))
        .unwrap();
    sock.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let frame = frames::udp_frame(
        ns.mac_of("tap0").unwrap(),
        [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
        ([10, 94, 0, 2], [10, 94, 0, 1]),
        (5000, port),
        b"through an inherited socket",
    );
    nic.send(0, &frame).unwrap();
    let mut buf = [0u8; 64];
    let (n, _) = sock.recv_from(&mut buf).expect("the frame arrived");
    assert_eq!(&buf[..n], b"through an inherited socket");
}

fn network() -> NetNs {
    let ns = NetNs::new().unwrap();
    ns.add_tap("tap0", "10.94.0.1/24").unwrap();
    ns
}

fn test_cache() -> PathBuf {
    std::env::temp_dir().join("sandnic-test-cache")
}

fn wait_for_file(path: &Path, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !path.exists() {
        if let Some(status) = child.try_wait().unwrap() {
            panic!(
                "exited with {status}: {}",
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
        assert!(
            Instant::now() < deadline,
            "{} did not appear",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn socket_activated_sandnic_serves_a_frontend() {
    require_network!("socket_activated_sandnic_serves_a_frontend");
    if !Path::new(SOCKET_ACTIVATE).exists() {
        sandnic::harness::skip(
            "socket_activated_sandnic_serves_a_frontend",
            "systemd-socket-activate is missing (Debian package systemd)",
        );
        return;
    }
    let ns = network();
    let dir = ScratchDir::new().unwrap();
    let notify = NotifySocket::new(&dir);
    let (vhost, api, log) = (
        dir.path("vhost.sock"),
        dir.path("api.sock"),
        dir.path("sandnic.log"),
    );
    // As systemd would: the sockets are the activator's, named as the
    // unit files in contrib/systemd name them; sandnic gets no --socket.
    let mut cmd = ns.command(SOCKET_ACTIVATE);
    cmd.arg("-l")
        .arg(&vhost)
        .arg("-l")
        .arg(&api)
        .arg("--fdname=vhost-user:api")
        .arg(format!("-ENOTIFY_SOCKET={}", notify.path.display()))
        .arg(format!("-ESANDNIC_CACHE_DIR={}", test_cache().display()))
        .arg(sandnic_binary())
        .args(["serve", "--tap", "tap0", "--mac", GUEST_MAC])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut child = spawn(cmd).unwrap();
    wait_for_file(&api, &mut child, &log);
    // The first connection starts sandnic.
    let mut nic = TestNic::connect(&vhost, &NicConfig::default()).unwrap();
    let ready = notify.wait_for("READY=1");
    let pid = main_pid(&ready);
    let status = sandnic_host::api::client(&api, json!({"cmd": "status"}))
        .unwrap()
        .0;
    assert_eq!(status["frontend_connected"], true, "{status}");
    assert_eq!(&nic.config(6).unwrap(), &[0x52, 0x54, 0, 0x12, 0x34, 0x56]);
    frame_reaches_the_host(&ns, &mut nic, 6501);

    terminate(pid);
    notify.wait_for("STOPPING=1");
    let exit = wait_exit(&mut child);
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(exit.success(), "{exit}: {log}");
    assert!(log.contains("rings stopped"), "{log}");
    assert!(
        vhost.exists() && api.exists(),
        "inherited sockets belong to their creator: left in place"
    );
}

#[test]
fn sockets_named_by_fd_are_served() {
    require_network!("sockets_named_by_fd_are_served");
    let ns = network();
    let dir = ScratchDir::new().unwrap();
    let (vhost, api, log) = (
        dir.path("vhost.sock"),
        dir.path("api.sock"),
        dir.path("sandnic.log"),
    );
    let vhost_listener = UnixListener::bind(&vhost).unwrap();
    let api_listener = UnixListener::bind(&api).unwrap();
    let (v, a) = (vhost_listener.as_raw_fd(), api_listener.as_raw_fd());
    let mut cmd = ns.command(sandnic_binary().to_str().unwrap());
    cmd.args(["serve", "--tap", "tap0", "--mac", GUEST_MAC])
        .args(["--socket-fd", &v.to_string(), "--api-fd", &a.to_string()])
        .env("SANDNIC_CACHE_DIR", test_cache())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    // The listeners keep their numbers and lose close-on-exec in the child
    // only, as a manager such as libvirt passes them. (No dup2 onto fixed
    // numbers: another test's file, or std's own exec-status pipe, may sit
    // at any number in the child.)
    // SAFETY: between fork and exec the child only calls fcntl, which is
    // async-signal-safe, on two descriptors it inherited.
    unsafe {
        std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
            for fd in [v, a] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = spawn(cmd).unwrap();
    // sandnic has its own copies now. Were it gone, connecting fails
    // instead of waiting in a backlog nobody accepts from.
    drop((vhost_listener, api_listener));
    let mut nic = TestNic::connect(&vhost, &NicConfig::default()).unwrap();
    let status = sandnic_host::api::client(&api, json!({"cmd": "status"}))
        .unwrap()
        .0;
    assert_eq!(status["frontend_connected"], true, "{status}");
    frame_reaches_the_host(&ns, &mut nic, 6502);
    terminate(child.id());
    assert!(wait_exit(&mut child).success());
    assert!(vhost.exists() && api.exists(), "not sandnic's to remove");

    // An fd that is not a listening socket is refused with a usage error.
    let mut cmd = ns.command(sandnic_binary().to_str().unwrap());
    cmd.args(["serve", "--tap", "tap0", "--socket-fd", "1"]);
    let out = cmd.output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("fd 1"), "{stderr}");
}

/// systemd follows the device to the new process (`NotifyAccess=all`):
/// the destination announces itself as the main pid, and the source, whose
/// exit would otherwise end the service, says nothing more.
#[test]
fn a_handover_names_the_new_main_process() {
    require_network!("a_handover_names_the_new_main_process");
    let ns = network();
    let dir = ScratchDir::new().unwrap();
    let notify = NotifySocket::new(&dir);
    let env = [("NOTIFY_SOCKET", notify.path.as_os_str())];
    let mut source =
        Sandnic::serve_exactly(&ns, &dir, &["--tap", "tap0", "--mac", GUEST_MAC], &env).unwrap();
    assert_eq!(main_pid(&notify.wait_for("READY=1")), source.child.id());
    let mut nic = TestNic::connect(&source.socket, &NicConfig::default()).unwrap();
    let (destination, path) =
        Sandnic::incoming_with_env(&ns, &dir, "dest", &source, &[], &env).unwrap();
    let reply = source
        .handover(&path, false)
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", source.log(), destination.log()));
    assert_eq!(reply["ok"], true, "{reply}");
    assert_eq!(
        main_pid(&notify.wait_for("READY=1")),
        destination.child.id()
    );
    assert_eq!(
        source.wait_exited(Duration::from_secs(5)),
        Some(Some(0)),
        "source exits"
    );
    let later = notify.drain(Duration::from_millis(300));
    assert!(
        later.iter().all(|m| !m.contains("STOPPING=1")),
        "the handed-over source must not stop the service: {later:?}"
    );
    frame_reaches_the_host(&ns, &mut nic, 6503);
}

/// SIGTERM: rings stopped (used entries published, buffers taken ahead
/// given back), exit 0, and the socket files sandnic made are removed.
#[test]
fn sigterm_stops_the_rings_and_removes_the_sockets() {
    require_network!("sigterm_stops_the_rings_and_removes_the_sockets");
    let mut rig = Rig::new(&[], NicConfig::default()).unwrap();
    let (socket, api) = (rig.sandnic.socket.clone(), rig.sandnic.api.clone());
    terminate(rig.sandnic.child.id());
    assert!(wait_exit(&mut rig.sandnic.child).success());
    let log = rig.sandnic.log();
    let rings = log
        .lines()
        .find(|l| l.contains("rings stopped"))
        .unwrap_or_else(|| panic!("{log}"));
    assert!(
        rings.contains("rings=2") || rings.contains("rings=3"),
        "RX and TX (and the control queue) were running: {rings}"
    );
    assert!(!socket.exists() && !api.exists(), "socket files removed");
}

/// The unit's own reload (`systemctl reload sandnic@tap0`: its ExecReload
/// line, run as systemd runs it) after a hot swap: a new process takes the
/// device over with no `--component`, runs the swapped-in device logic,
/// and becomes the main process; the frontend never notices.
#[test]
fn the_units_reload_after_a_swap_hands_the_device_over() {
    let test = "the_units_reload_after_a_swap_hands_the_device_over";
    require_network!(test);
    if !Path::new(SOCKET_ACTIVATE).exists() {
        sandnic::harness::skip(
            test,
            "systemd-socket-activate is missing (Debian package systemd)",
        );
        return;
    }
    let ns = network();
    let dir = ScratchDir::new().unwrap();
    let notify = NotifySocket::new(&dir);
    let spec = sandnic::units::Specifiers {
        instance: "tap0".into(),
        runtime: dir.path("run"),
        cache: dir.path("cache"),
    };
    std::fs::create_dir_all(spec.runtime.join("sandnic")).unwrap();
    let vhost = spec
        .setting("sandnic-vhost@.socket", "ListenStream")
        .unwrap();
    let api = PathBuf::from(spec.setting("sandnic-api@.socket", "ListenStream").unwrap());
    // The unit's command lines, with this build's binary and a user that
    // exists here.
    let command_line = |key: &str| {
        spec.setting("sandnic@.service", key)
            .unwrap()
            .replace("/usr/local/bin/sandnic", sandnic_binary().to_str().unwrap())
            .replace("--user sandnic", "--user nobody")
    };
    let exec_start = command_line("ExecStart");
    let log = dir.path("sandnic.log");
    let mut cmd = ns.command(SOCKET_ACTIVATE);
    cmd.arg("-l")
        .arg(&vhost)
        .arg("-l")
        .arg(&api)
        .arg("--fdname=vhost-user:api")
        .arg(format!("-ENOTIFY_SOCKET={}", notify.path.display()))
        .arg(format!("-ESANDNIC_CACHE_DIR={}", test_cache().display()))
        .args(exec_start.split_whitespace())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap());
    let mut activator = spawn(cmd).unwrap();
    wait_for_file(&api, &mut activator, &log);
    let mut nic = TestNic::connect(Path::new(&vhost), &NicConfig::default()).unwrap();
    let first = main_pid(&notify.wait_for("READY=1"));
    let _first = KillOnDrop(vec![first]);
    let call = |request| sandnic_host::api::client(&api, request).unwrap().0;
    let swapped = call(json!({"cmd": "swap", "component": "builtin:0.2.0"}));
    assert_eq!(swapped["ok"], true, "{swapped}");

    // As systemd runs it: output to a log (the destination it starts in
    // the background keeps it open), the unit's environment.
    let reload_log = dir.path("reload.log");
    let reload = ns
        .command("sh")
        .arg("-c")
        .arg(command_line("ExecReload"))
        .env("NOTIFY_SOCKET", &notify.path)
        .env("SANDNIC_CACHE_DIR", test_cache())
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&reload_log).unwrap())
        .stderr(std::fs::File::create(dir.path("reload.err")).unwrap())
        .status()
        .unwrap();
    let second = main_pid(&notify.wait_for("READY=1"));
    let _cleanup = KillOnDrop(vec![first, second]);
    assert!(
        reload.success(),
        "reload: {}\n{}",
        std::fs::read_to_string(&reload_log).unwrap_or_default(),
        std::fs::read_to_string(dir.path("reload.err")).unwrap_or_default()
    );
    assert_ne!(second, first, "a new main process");
    let status = call(json!({"cmd": "status"}));
    assert_eq!(status["component"]["version"], "0.2.0", "{status}");
    assert_eq!(status["frontend_connected"], true, "{status}");
    let stats = call(json!({"cmd": "stats"}));
    assert_eq!(stats["control"]["frontends_accepted"], 1, "{stats}");
    frame_reaches_the_host(&ns, &mut nic, 6504);
    terminate(second);
    let _ = wait_for_exit(&mut activator, Duration::from_secs(10));
}
