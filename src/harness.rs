//! Running the real thing in tests: private network namespaces with a TAP
//! device, `sandnic serve` as a child process, and sockets opened inside a
//! namespace. Everything created here is removed on drop.

use anyhow::{bail, Context};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}{}x{}",
        std::process::id() % 100_000,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Why this machine cannot run the network tests, if it cannot.
pub fn network_unavailable() -> Option<String> {
    if !nix::unistd::geteuid().is_root() {
        return Some("needs root (TAP devices and network namespaces)".into());
    }
    if !Path::new("/dev/net/tun").exists() {
        return Some("needs /dev/net/tun".into());
    }
    if Command::new("ip").arg("-V").output().is_err() {
        return Some("needs iproute2 (apt-get install iproute2)".into());
    }
    None
}

/// Makes a child process die with the test process (even when the test is
/// killed and no destructor runs): PR_SET_PDEATHSIG survives `ip netns
/// exec`'s exec. Spawn such commands with `spawn`: the signal follows the
/// *thread* that forked, so they are forked by one thread that lives as
/// long as the process.
pub fn die_with_parent(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure runs in the forked child before exec and only
    // calls prctl, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        })
    }
}

type SpawnRequest = (Command, std::sync::mpsc::Sender<std::io::Result<Child>>);

/// Spawns `cmd` from the process-lifetime spawner thread (see
/// `die_with_parent`).
pub fn spawn(mut cmd: Command) -> std::io::Result<Child> {
    static SPAWNER: std::sync::OnceLock<std::sync::Mutex<std::sync::mpsc::Sender<SpawnRequest>>> =
        std::sync::OnceLock::new();
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<SpawnRequest>();
        std::thread::Builder::new()
            .name("child-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
            })
            .expect("spawner thread");
        std::sync::Mutex::new(tx)
    });
    die_with_parent(&mut cmd);
    let (reply_tx, reply_rx) = std::sync::mpsc::channel();
    spawner
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .send((cmd, reply_tx))
        .map_err(std::io::Error::other)?;
    reply_rx.recv().map_err(std::io::Error::other)?
}

/// A process spinning on a CPU (a busy host), stopped on drop.
pub struct CpuHog(Child);

impl CpuHog {
    pub fn start() -> anyhow::Result<Self> {
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "while :; do :; done"]);
        Ok(Self(spawn(cmd).context("starting a CPU hog")?))
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// For a bench binary's `main`: whether to measure. Not when cargo only
/// lists or tests the benches, nor (said loudly) when `missing` names a
/// prerequisite this machine lacks.
pub fn bench_should_run(what: &str, missing: impl FnOnce() -> Option<String>) -> bool {
    if std::env::args().any(|a| a == "--list" || a == "--test") {
        return false;
    }
    if let Some(why) = missing() {
        eprintln!("\n*** SKIPPED {what}: {why} ***\n");
        return false;
    }
    true
}

/// Records one case's paired rounds in `target/criterion/paired/NAME.json`,
/// where `scripts/bench-report` reads them; a failure is said, not fatal.
pub fn record_paired(name: &str, record: &serde_json::Value) {
    let dir = Path::new("target/criterion/paired");
    if let Err(e) = std::fs::create_dir_all(dir)
        .and_then(|()| std::fs::write(dir.join(format!("{name}.json")), record.to_string()))
    {
        eprintln!("cannot record the paired rounds of {name}: {e}");
    }
}

/// The user the guest tests run sandnic as (`--user`): nothing in them
/// needs root once the TAP and the sockets are open.
pub const UNPRIVILEGED_USER: &str = "nobody";

/// Prints a loud skip notice; tests return right after. In CI (`CI` set,
/// as `.ci/run` runs) a missing prerequisite is a failure instead: CI
/// installs everything the tests need, so a skip there would hide a test
/// that never ran.
pub fn skip(test: &str, why: &str) {
    if std::env::var_os("CI").is_some_and(|v| !v.is_empty() && v != "false") {
        panic!("{test}: a prerequisite is missing in CI: {why}");
    }
    eprintln!("\n*** SKIPPED {test}: {why} ***\n");
}

/// Skips the calling test when the network tests cannot run here.
#[macro_export]
macro_rules! require_network {
    ($test:expr) => {
        if let Some(why) = $crate::harness::network_unavailable() {
            $crate::harness::skip($test, &why);
            return;
        }
    };
}

fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with its devices) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new() -> anyhow::Result<Self> {
        let name = unique("snic");
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// A command run inside the namespace.
    pub fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.name, program]);
        cmd
    }

    pub fn ip(&self, args: &[&str]) -> anyhow::Result<Output> {
        run(self.command("ip").args(args))
    }

    /// Creates a multi-queue TAP with a virtio-net header, addresses it and
    /// brings it up. IPv6 is off on it so the link carries only what the
    /// tests send (no router solicitations or MLD reports).
    /// A multiqueue TAP owned by UNPRIVILEGED_USER (so a sandnic running
    /// as that user can still attach and detach its queues), with address
    /// `cidr`.
    pub fn add_tap(&self, name: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&[
            "tuntap",
            "add",
            "dev",
            name,
            "mode",
            "tap",
            "vnet_hdr",
            "multi_queue",
            "user",
            UNPRIVILEGED_USER,
        ])?;
        run(self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")]))?;
        self.ip(&["addr", "add", cidr, "dev", name])?;
        // A long TAP queue (set before any queue attaches, which sizes its
        // ring): frames wait there while a device is switched.
        self.ip(&["link", "set", name, "txqueuelen", "10000"])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A bridge with address `cidr` (the host's side of several TAPs).
    pub fn add_bridge(&self, name: &str, cidr: &str) -> anyhow::Result<()> {
        self.ip(&["link", "add", name, "type", "bridge"])?;
        run(self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")]))?;
        self.ip(&["addr", "add", cidr, "dev", name])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A TAP with no address, a port of `bridge`: multiqueue for sandnic,
    /// single-queue for QEMU's own `-netdev tap`.
    pub fn add_bridged_tap(
        &self,
        name: &str,
        bridge: &str,
        multi_queue: bool,
    ) -> anyhow::Result<()> {
        let mut args = vec!["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"];
        if multi_queue {
            args.push("multi_queue");
        }
        self.ip(&args)?;
        run(self
            .command("sysctl")
            .args(["-qw", &format!("net.ipv6.conf.{name}.disable_ipv6=1")]))?;
        self.ip(&["link", "set", name, "txqueuelen", "10000"])?;
        self.ip(&["link", "set", name, "master", bridge])?;
        self.ip(&["link", "set", name, "up"])?;
        Ok(())
    }

    /// A permanent neighbour entry on `dev`: frames to `ip` go out without
    /// ARP, so no ARP traffic blurs what a test counts.
    pub fn add_static_neighbour(&self, ip: &str, mac: &str, dev: &str) -> anyhow::Result<()> {
        self.ip(&[
            "neigh",
            "add",
            ip,
            "lladdr",
            mac,
            "dev",
            dev,
            "nud",
            "permanent",
        ])?;
        Ok(())
    }

    /// Whether interface `name` has its carrier (`ip link` shows no
    /// NO-CARRIER).
    pub fn carrier(&self, name: &str) -> anyhow::Result<bool> {
        let out = self.ip(&["-o", "link", "show", name])?;
        Ok(!String::from_utf8_lossy(&out.stdout).contains("NO-CARRIER"))
    }

    /// The MAC address of interface `name` in this namespace.
    pub fn mac_of(&self, name: &str) -> anyhow::Result<crate::frames::Mac> {
        let out = self.ip(&["-o", "link", "show", name])?;
        let text = String::from_utf8_lossy(&out.stdout);
        let mac = text
            .split("link/ether ")
            .nth(1)
            .and_then(|s| s.split_whitespace().next())
            .context("no MAC")?;
        let bytes: Result<Vec<u8>, _> = mac.split(':').map(|b| u8::from_str_radix(b, 16)).collect();
        bytes?
            .try_into()
            .map_err(|_| anyhow::anyhow!("bad MAC {mac}"))
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it
    /// creates live in the namespace and can be used from anywhere.
    pub fn inside<R: Send>(
        &self,
        f: impl FnOnce() -> anyhow::Result<R> + Send,
    ) -> anyhow::Result<R> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = std::fs::File::open(&path).with_context(|| format!("opening {path}"))?;
                nix::sched::setns(ns, nix::sched::CloneFlags::CLONE_NEWNET).context("setns")?;
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }

    /// A raw socket on `ifname` that sends and receives whole Ethernet
    /// frames (from the host's side of the TAP).
    pub fn packet_socket(&self, ifname: &str) -> anyhow::Result<OwnedFd> {
        let ifname = ifname.to_string();
        self.inside(move || {
            let index = nix::net::if_::if_nametoindex(ifname.as_str())?;
            // SAFETY: plain socket(2) call; the result is checked and owned.
            let fd = unsafe {
                libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                    (libc::ETH_P_ALL as u16).to_be() as i32,
                )
            };
            if fd < 0 {
                bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
            }
            // SAFETY: `fd` was just created and is owned by nobody else.
            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
            // SAFETY: sockaddr_ll is plain data; zeroed is a valid value.
            let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = (libc::ETH_P_ALL as u16).to_be();
            addr.sll_ifindex = index as i32;
            // SAFETY: `addr` is a valid sockaddr_ll of the size passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    (&addr as *const libc::sockaddr_ll).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                )
            };
            if r < 0 {
                bail!("bind AF_PACKET: {}", std::io::Error::last_os_error());
            }
            Ok(fd)
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .output();
    }
}

/// A scratch directory removed on drop.
pub struct ScratchDir(pub PathBuf);

impl ScratchDir {
    pub fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(unique("sandnic-test-"));
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The `sandnic` binary of this build (next to the test executables).
pub fn sandnic_binary() -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    dir.join("sandnic")
}

/// CPU time (utime + stime) of process `pid`, in seconds; 0 when it is
/// gone.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): state is 3rd.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // utime and stime are fields 14 and 15 of the whole line.
    // SAFETY: sysconf reads no memory.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    (ticks(11) + ticks(12)) as f64 / hz
}

/// Waits up to `timeout` for `child` to exit; None when it still runs.
pub fn wait_for_exit(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `sandnic serve` of `binary` in `ns`, logging to `log`, with the test
/// component cache.
fn serve_command(binary: &Path, ns: &NetNs, log: &Path) -> anyhow::Result<Command> {
    if !binary.exists() {
        // `cargo bench` builds only the root package's targets (`cargo test
        // --workspace` builds every binary).
        bail!(
            "{} is not built: for benches run scripts/bench, which builds it",
            binary.display()
        );
    }
    let mut cmd = ns.command(binary.to_str().expect("utf-8 path"));
    cmd.arg("serve")
        .env(
            "SANDNIC_LOG",
            std::env::var("SANDNIC_LOG").unwrap_or_else(|_| "info".into()),
        )
        .env(
            "SANDNIC_CACHE_DIR",
            std::env::temp_dir().join("sandnic-test-cache"),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(log)?);
    Ok(cmd)
}

/// How a `sandnic serve` reaches its frontend.
enum Vhost<'a> {
    /// It listens (`--socket`).
    Listen,
    /// It dials the frontend listening there (`--connect`, client mode).
    Dial(&'a Path),
}

/// A running `sandnic serve`; stopped (SIGTERM, then SIGKILL) on drop.
pub struct Sandnic {
    pub child: Child,
    pub socket: PathBuf,
    pub api: PathBuf,
    log: PathBuf,
}

impl Sandnic {
    /// Starts `sandnic serve` in `ns` with `args` added, and waits for its
    /// sockets to appear. The device's MAC is the tests' usual
    /// 52:54:00:12:34:56 (RIG_GUEST_MAC) unless `args` give one.
    pub fn serve(ns: &NetNs, dir: &ScratchDir, args: &[&str]) -> anyhow::Result<Self> {
        let mut args = args.to_vec();
        if !args.contains(&"--mac") {
            args.extend(["--mac", "52:54:00:12:34:56"]);
        }
        Self::serve_exactly(ns, dir, &args, &[])
    }

    /// `serve` with `args` and nothing else (the device derives its MAC
    /// when they give none), and environment variables `env` added.
    pub fn serve_exactly(
        ns: &NetNs,
        dir: &ScratchDir,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        Self::serve_binary(&sandnic_binary(), ns, dir, args, env)
    }

    /// `serve_exactly` with another build's `sandnic` (an A/B bench's
    /// baseline).
    pub fn serve_binary(
        binary: &Path,
        ns: &NetNs,
        dir: &ScratchDir,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        Self::start(binary, ns, dir, Vhost::Listen, args, env)
    }

    /// `serve` in client mode: dials the frontend listening at `frontend`
    /// (`--connect`); returns once its API socket is there.
    pub fn serve_client(
        ns: &NetNs,
        dir: &ScratchDir,
        frontend: &Path,
        args: &[&str],
    ) -> anyhow::Result<Self> {
        let mut args = args.to_vec();
        if !args.contains(&"--mac") {
            args.extend(["--mac", "52:54:00:12:34:56"]);
        }
        Self::start(
            &sandnic_binary(),
            ns,
            dir,
            Vhost::Dial(frontend),
            &args,
            &[],
        )
    }

    fn start(
        binary: &Path,
        ns: &NetNs,
        dir: &ScratchDir,
        vhost: Vhost<'_>,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<Self> {
        let api = dir.path("api.sock");
        let log = dir.path("sandnic.log");
        let mut cmd = serve_command(binary, ns, &log)?;
        let socket = match vhost {
            Vhost::Listen => {
                let socket = dir.path("vhost.sock");
                cmd.arg("--socket").arg(&socket);
                socket
            }
            Vhost::Dial(frontend) => {
                cmd.arg("--connect").arg(frontend);
                frontend.to_owned()
            }
        };
        cmd.arg("--api")
            .arg(&api)
            .args(args)
            .envs(env.iter().copied());
        let child = spawn(cmd).context("spawning sandnic serve")?;
        let mut me = Self {
            child,
            socket,
            api,
            log,
        };
        let listens = matches!(vhost, Vhost::Listen);
        let deadline = Instant::now() + Duration::from_secs(30);
        while !((me.socket.exists() || !listens) && me.api.exists()) {
            if let Some(status) = me.child.try_wait()? {
                bail!("sandnic serve exited with {status}: {}", me.log());
            }
            if Instant::now() > deadline {
                bail!("sandnic serve did not start: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(me)
    }

    /// Starts `sandnic serve --incoming PATH` in `ns` (a handover
    /// destination) with `args` added; returns once it waits on PATH. Its
    /// vhost-user and API sockets will be the source's.
    pub fn incoming(
        ns: &NetNs,
        dir: &ScratchDir,
        name: &str,
        source: &Sandnic,
        args: &[&str],
    ) -> anyhow::Result<(Self, PathBuf)> {
        Self::incoming_with_env(ns, dir, name, source, args, &[])
    }

    /// `incoming` with environment variables added (`NOTIFY_SOCKET`).
    pub fn incoming_with_env(
        ns: &NetNs,
        dir: &ScratchDir,
        name: &str,
        source: &Sandnic,
        args: &[&str],
        env: &[(&str, &std::ffi::OsStr)],
    ) -> anyhow::Result<(Self, PathBuf)> {
        let incoming = dir.path(&format!("{name}.handover"));
        let log = dir.path(&format!("{name}.log"));
        let mut cmd = serve_command(&sandnic_binary(), ns, &log)?;
        cmd.arg("--incoming")
            .arg(&incoming)
            .args(args)
            .envs(env.iter().copied());
        let child = spawn(cmd).context("spawning sandnic serve --incoming")?;
        let mut me = Self {
            child,
            socket: source.socket.clone(),
            api: source.api.clone(),
            log,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !incoming.exists() {
            if let Some(status) = me.child.try_wait()? {
                bail!(
                    "sandnic serve --incoming exited with {status}: {}",
                    me.log()
                );
            }
            if Instant::now() > deadline {
                bail!("sandnic serve --incoming did not start: {}", me.log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok((me, incoming))
    }

    /// Asks this sandnic to hand its device to the one waiting at `path`;
    /// the API reply.
    pub fn handover(&self, path: &Path, new_tap: bool) -> anyhow::Result<serde_json::Value> {
        self.api(serde_json::json!({ "cmd": "handover", "path": path, "new_tap": new_tap }))
    }

    /// Whether the process has exited (and with which code).
    pub fn exited(&mut self) -> Option<Option<i32>> {
        self.child.try_wait().ok().flatten().map(|s| s.code())
    }

    /// Waits up to `timeout` for the process to exit: as `exited`, None
    /// when it still runs.
    pub fn wait_exited(&mut self, timeout: Duration) -> Option<Option<i32>> {
        wait_for_exit(&mut self.child, timeout).map(|s| s.code())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// One API request; the reply object.
    pub fn api(&self, request: serde_json::Value) -> anyhow::Result<serde_json::Value> {
        let (reply, _) =
            sandnic_host::api::client(&self.api, request).map_err(anyhow::Error::msg)?;
        Ok(reply)
    }

    pub fn stats(&self) -> anyhow::Result<serde_json::Value> {
        self.api(serde_json::json!({ "cmd": "stats" }))
    }
}

impl Drop for Sandnic {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A namespace with `tap0` (10.77.0.1/24, guest 10.77.0.2 as a permanent
/// neighbour), `sandnic serve` on it, and the test frontend connected.
/// The TAP steers what the host sends by the socket's priority
/// (`steering`): to pair 0 unless a test asks for another, on every
/// machine, whatever the flow's hash.
pub struct Rig {
    pub nic: crate::frontend::TestNic,
    pub sandnic: Sandnic,
    pub ns: NetNs,
    pub tap_mac: crate::frames::Mac,
    pub dir: ScratchDir,
    /// Client mode (`Rig::client_mode`): where the test frontend listens.
    pub frontend_listener: Option<std::os::unix::net::UnixListener>,
}

pub const RIG_GUEST_MAC: crate::frames::Mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
pub const RIG_GUEST_IP: [u8; 4] = [10, 77, 0, 2];
pub const RIG_HOST_IP: [u8; 4] = [10, 77, 0, 1];
/// The guest's UDP port the rig's tests send to.
pub const RIG_GUEST_PORT: u16 = 5000;

/// Host UDP ports from `first` on whose flows to the rig's guest
/// (`RIG_GUEST_IP:RIG_GUEST_PORT`) the kernel's hash would put on each of
/// `pairs` TAP queues, one per queue: a test that needs host frames on a
/// given pair runs once with each, and so shows that the hash decides
/// nothing (the rig's TAP steers by priority; see `steering`).
pub fn rig_sweep_ports(pairs: usize, first: u16) -> Vec<u16> {
    crate::steering::ports_covering_every_queue(
        RIG_HOST_IP,
        RIG_GUEST_IP,
        RIG_GUEST_PORT,
        pairs,
        first,
    )
    .expect("host ports that hash to every queue")
}

impl Rig {
    pub fn new(serve_args: &[&str], config: crate::frontend::NicConfig) -> anyhow::Result<Self> {
        Self::build(serve_args, config, true)
    }

    /// A rig in client mode: sandnic is started first and dials
    /// `frontend.sock`, where the test frontend starts listening only
    /// after a while (so sandnic's first dials fail, as they do while a
    /// VMM starts).
    pub fn client_mode(config: crate::frontend::NicConfig) -> anyhow::Result<Self> {
        let (ns, dir) = Self::namespace(true)?;
        let frontend = dir.path("frontend.sock");
        let sandnic = Sandnic::serve_client(&ns, &dir, &frontend, &["--tap", "tap0"])?;
        std::thread::sleep(Duration::from_millis(100));
        let listener = std::os::unix::net::UnixListener::bind(&frontend)?;
        let nic = crate::frontend::TestNic::accept(&listener, &config, Duration::from_secs(10))
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", sandnic.log()))?;
        let tap_mac = ns.mac_of("tap0")?;
        Ok(Self {
            nic,
            sandnic,
            ns,
            tap_mac,
            dir,
            frontend_listener: Some(listener),
        })
    }

    /// The rig's namespace with `tap0` (10.77.0.1/24), the guest as its
    /// neighbour, and (`steered`) the TAP steering host frames by priority.
    pub fn namespace(steered: bool) -> anyhow::Result<(NetNs, ScratchDir)> {
        let ns = NetNs::new()?;
        ns.add_tap("tap0", "10.77.0.1/24")?;
        ns.add_static_neighbour("10.77.0.2", "52:54:00:12:34:56", "tap0")?;
        if steered {
            crate::steering::steer_by_priority(&ns, "tap0")?;
        }
        Ok((ns, ScratchDir::new()?))
    }

    /// A rig whose TAP has no steering program: the kernel picks the queue
    /// of a host frame from the flow's hash (or its flow table). Only for
    /// showing that the hash picks what `steering::natural_queues` says.
    pub fn unsteered(
        serve_args: &[&str],
        config: crate::frontend::NicConfig,
    ) -> anyhow::Result<Self> {
        Self::build(serve_args, config, false)
    }

    fn build(
        serve_args: &[&str],
        config: crate::frontend::NicConfig,
        steered: bool,
    ) -> anyhow::Result<Self> {
        let (ns, dir) = Self::namespace(steered)?;
        let mut args = vec!["--tap", "tap0"];
        args.extend_from_slice(serve_args);
        let sandnic = Sandnic::serve(&ns, &dir, &args)?;
        let nic = crate::frontend::TestNic::connect(&sandnic.socket, &config)
            .map_err(|e| anyhow::anyhow!("{e:#}\n{}", sandnic.log()))?;
        let tap_mac = ns.mac_of("tap0")?;
        Ok(Self {
            nic,
            sandnic,
            ns,
            tap_mac,
            dir,
            frontend_listener: None,
        })
    }

    /// A UDP frame from the test guest to the host.
    pub fn guest_udp(&self, dst_port: u16, payload: &[u8]) -> Vec<u8> {
        crate::frames::udp_frame(
            self.tap_mac,
            RIG_GUEST_MAC,
            (RIG_GUEST_IP, RIG_HOST_IP),
            (RIG_GUEST_PORT, dst_port),
            payload,
        )
    }

    /// A counter of queue pair `pair` from the `stats` API.
    pub fn stat(&self, pair: usize, field: &str) -> u64 {
        self.sandnic.stats().expect("stats")["queues"][pair][field]
            .as_u64()
            .expect("counter")
    }

    pub fn control_stat(&self, field: &str) -> u64 {
        self.sandnic.stats().expect("stats")["control"][field]
            .as_u64()
            .expect("counter")
    }
}
