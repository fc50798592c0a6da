//! Real Linux guests for the integration tests: User-Mode Linux (a real
//! `virtio_net` driver over `virtio_uml`) and QEMU with TCG. Images come from
//! `scripts/guest-initramfs`; the guest runs a shell script from the kernel
//! command line and reports through console markers. UML guests also share a
//! host directory (hostfs), used for step-by-step handshakes with the test.

use anyhow::{bail, Context};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Uml,
    Qemu,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Self::Uml => "uml",
            Self::Qemu => "qemu",
        }
    }
}

/// Why guests of `kind` cannot run here, naming the package to install.
pub fn unavailable(kind: Kind) -> Option<String> {
    let needs = |path: &str, package: &str| {
        (!Path::new(path).exists()).then(|| format!("needs {path} (apt-get install {package})"))
    };
    needs("/bin/busybox", "busybox-static")
        .or_else(|| needs("/usr/sbin/ethtool", "ethtool"))
        .or_else(|| needs("/usr/bin/iperf3", "iperf3"))
        .or_else(|| match kind {
            Kind::Uml => needs("/usr/bin/linux.uml", "user-mode-linux"),
            Kind::Qemu => needs("/usr/bin/qemu-system-x86_64", "qemu-system-x86").or_else(|| {
                qemu_kernel().is_none().then(|| {
                    "needs a cloud kernel (apt-get install linux-image-cloud-amd64)".into()
                })
            }),
        })
}

/// Which QEMU runs a guest. Debian 12's own is what a Debian stable host
/// has; QEMU 10.0 from bookworm-backports is newer in the ways that matter
/// here (it keeps TCG's dirty tracking coherent during migration, QEMU
/// commit 03bfc2188f06, first in 9.0; it has `reconnect-ms`). Both run in
/// the tests where they behave differently.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum QemuBuild {
    /// `/usr/bin/qemu-system-x86_64` from Debian 12 (7.2).
    #[default]
    Debian,
    /// QEMU 10.0 from bookworm-backports, extracted under `QEMU10_ROOT`
    /// beside 7.2 (same package name) by `scripts/install-packages`.
    Backports,
}

/// Where `scripts/install-packages` extracts bookworm-backports' QEMU 10.
pub const QEMU10_ROOT: &str = "/opt/sandnic/qemu-10";

impl QemuBuild {
    pub const ALL: [Self; 2] = [Self::Debian, Self::Backports];

    pub fn binary(self) -> PathBuf {
        match self {
            Self::Debian => PathBuf::from("/usr/bin/qemu-system-x86_64"),
            Self::Backports => Path::new(QEMU10_ROOT).join("usr/bin/qemu-system-x86_64"),
        }
    }

    /// `-L` directories: the extracted QEMU's own firmware first (its
    /// built-in search path is Debian 12's /usr/share/qemu).
    fn firmware_args(self) -> Vec<String> {
        match self {
            Self::Debian => Vec::new(),
            Self::Backports => ["usr/share/qemu", "usr/share/seabios"]
                .iter()
                .flat_map(|dir| ["-L".to_string(), format!("{QEMU10_ROOT}/{dir}")])
                .collect(),
        }
    }

    /// Why guests of this QEMU cannot run here.
    pub fn unavailable(self) -> Option<String> {
        unavailable(Kind::Qemu).or_else(|| match self {
            Self::Debian => None,
            Self::Backports => (!self.binary().exists()).then(|| {
                format!(
                    "needs QEMU 10 in {QEMU10_ROOT} (scripts/install-packages extracts it from bookworm-backports)"
                )
            }),
        })
    }

    /// What the binary says its version is ("10.0.2 (Debian …)").
    pub fn version(self) -> String {
        Command::new(self.binary())
            .arg("--version")
            .output()
            .ok()
            .and_then(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .and_then(|l| l.strip_prefix("QEMU emulator version "))
                    .map(str::to_string)
            })
            .unwrap_or_else(|| "unknown".into())
    }

    /// A short name for test and bench output.
    pub fn name(self) -> &'static str {
        match self {
            Self::Debian => "QEMU 7.2",
            Self::Backports => "QEMU 10.0",
        }
    }
}

fn qemu_kernel() -> Option<PathBuf> {
    let mut kernels: Vec<PathBuf> = std::fs::read_dir("/boot")
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-") && n.ends_with("-cloud-amd64"))
        })
        .collect();
    kernels.sort();
    kernels.pop()
}

/// Builds (or reuses) the initramfs; returns it and the kernel to boot.
pub fn image(kind: Kind) -> anyhow::Result<(PathBuf, PathBuf)> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out_dir = root.join("target/guest-images");
    let out = Command::new(root.join("scripts/guest-initramfs"))
        .arg(kind.name())
        .arg(&out_dir)
        .env("SANDNIC_GUEST_QUIET", "1")
        .output()
        .context("running scripts/guest-initramfs")?;
    if !out.status.success() {
        bail!(
            "guest-initramfs failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let initrd = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    let kernel =
        std::fs::read_to_string(out_dir.join(format!("initramfs-{}.kernel", kind.name())))?;
    Ok((initrd, PathBuf::from(kernel.trim())))
}

/// Debian 12's UML (6.1) panics at boot ("ptrace set fp regs failed,
/// errno = 14") on hosts whose XSAVE area is larger than the buffer it
/// writes back with `PTRACE_SETREGSET(NT_X86_XSTATE)`: the host kernel wants
/// the whole area, and AMX makes it about 11 KiB. UML only uses that regset
/// when reading it works at boot, and otherwise keeps the legacy
/// `PTRACE_{GET,SET}FPREGS` (x87 and SSE state). So the UML process runs
/// under a seccomp filter that fails exactly that read with EIO; everything
/// else is allowed.
fn uml_without_xstate(cmd: &mut Command) -> anyhow::Result<()> {
    use seccompiler::{
        SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
        SeccompRule, TargetArch,
    };
    use std::os::unix::process::CommandExt;
    const PTRACE_GETREGSET: u64 = 0x4204;
    const NT_X86_XSTATE: u64 = 0x202;
    let condition =
        |arg, value| SeccompCondition::new(arg, SeccompCmpArgLen::Qword, SeccompCmpOp::Eq, value);
    let read_xstate = SeccompRule::new(vec![
        condition(0, PTRACE_GETREGSET)?,
        condition(2, NT_X86_XSTATE)?,
    ])?;
    let filter = SeccompFilter::new(
        [(libc::SYS_ptrace, vec![read_xstate])].into(),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EIO as u32),
        TargetArch::try_from(std::env::consts::ARCH)?,
    )?;
    let program: seccompiler::BpfProgram = filter.try_into()?;
    // SAFETY: the closure runs in the forked child before exec; it only
    // calls prctl (through apply_filter) on a program built before the fork,
    // and allocates nothing.
    unsafe {
        cmd.pre_exec(move || seccompiler::apply_filter(&program).map_err(std::io::Error::other));
    }
    Ok(())
}

/// glibc tunables for every program in the UML guest: no AVX code paths.
/// Without the XSTATE regset (see `uml_without_xstate`) UML saves and
/// restores only the SSE part of a process's vector registers, so glibc's
/// AVX and AVX-512 string functions would see registers change under them
/// (busybox's init dies in its first memcpy).
const GUEST_WITHOUT_AVX: &str =
    "glibc.cpu.hwcaps=-AVX512F,-AVX512VL,-AVX512BW,-AVX512DQ,-AVX512CD,-AVX2,-AVX,-EVEX";

fn host_khz() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let mhz = cpuinfo
        .lines()
        .find(|l| l.starts_with("cpu MHz"))
        .and_then(|l| l.split(':').nth(1))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap_or(2000.0);
    format!("{}", (mhz * 1000.0) as u64)
}

/// A booted guest; killed on drop.
pub struct Guest {
    child: Child,
    console: PathBuf,
}

/// QEMU settings beyond the defaults (a guest on a vhost-user NIC with
/// its RAM in a memfd): what migration tests need.
#[derive(Debug, Clone, Default)]
pub struct QemuOptions {
    /// Which QEMU.
    pub build: QemuBuild,
    /// A QMP socket to create.
    pub qmp: Option<PathBuf>,
    /// Guest RAM in this file (two QEMUs of a local migration share it;
    /// a migration test reads it) instead of a private memfd.
    pub ram_file: Option<PathBuf>,
    /// Start paused (`-S`): an incoming migration then stays paused when
    /// it completes, until `cont`.
    pub paused: bool,
    /// Guest RAM that QEMU cannot share with the backend (an operator's
    /// mistake: QEMU then falls back to its own datapath).
    pub private_memory: bool,
    /// Wait for a migration (`-incoming URI`) instead of booting.
    pub incoming: Option<String>,
    /// Queue pairs of the NIC (more than one: multiqueue).
    pub queues: u16,
    /// The NIC's MAC (QEMU's default otherwise).
    pub mac: Option<String>,
    /// Extra `virtio-net-device` properties, like `guest_announce=off`.
    pub device_props: Vec<String>,
    /// A TAP netdev on this interface instead of vhost-user (to compare
    /// with QEMU's own datapath); QEMU then runs in network namespace
    /// `netns`, where the TAP is.
    pub tap: Option<String>,
    pub netns: Option<String>,
    /// QEMU listens on the vhost-user socket (`server=on,wait=off`) and
    /// sandnic dials it (client mode, `serve --connect`).
    pub server: bool,
    /// More options of the vhost-user chardev, like `reconnect=1` (QEMU
    /// 7.2) or `reconnect-ms=100` (QEMU 9.2 and later).
    pub chardev_options: Option<String>,
}

pub struct GuestOptions<'a> {
    pub kind: Kind,
    /// The vhost-user socket of the backend.
    pub socket: &'a Path,
    /// Shell script the guest runs (busybox sh).
    pub script: &'a str,
    /// UML only: host directory mounted at /mnt in the guest.
    pub hostdir: Option<&'a Path>,
    /// Where the console output goes.
    pub console: PathBuf,
    /// QEMU only.
    pub qemu: QemuOptions,
}

impl Guest {
    pub fn boot(opts: GuestOptions<'_>) -> anyhow::Result<Self> {
        let (initrd, kernel) = image(opts.kind)?;
        let script = compress_b64(opts.script)?;
        let mut cmd = match opts.kind {
            Kind::Uml => {
                let mut c = Command::new(&kernel);
                uml_without_xstate(&mut c)?;
                c.arg("mem=256M")
                    .arg(format!("initrd={}", initrd.display()))
                    .args(["con=null", "con0=fd:0,fd:1", "ssl=null", "loglevel=4"])
                    .arg(format!("GLIBC_TUNABLES={GUEST_WITHOUT_AVX}"))
                    .arg(format!("virtio_uml.device={}:1", opts.socket.display()))
                    .arg(format!("sandnic.cmdgz={script}"));
                if let Some(dir) = opts.hostdir {
                    c.arg(format!("sandnic.hostdir={}", dir.display()));
                }
                c
            }
            Kind::Qemu => {
                let q = &opts.qemu;
                let binary = q.build.binary();
                let mut c = match &q.netns {
                    Some(ns) => {
                        let mut c = Command::new("ip");
                        c.args(["netns", "exec", ns]).arg(&binary);
                        c
                    }
                    None => Command::new(&binary),
                };
                c.args(q.build.firmware_args())
                    .args([
                        "-M",
                        "microvm,acpi=on",
                        "-accel",
                        "tcg",
                        "-m",
                        "256",
                        "-nodefaults",
                        "-no-user-config",
                    ])
                    .args(["-serial", "stdio", "-display", "none", "-no-reboot"])
                    .arg("-object")
                    .arg(match (&q.ram_file, q.private_memory) {
                        (Some(file), _) => format!(
                            "memory-backend-file,id=mem,size=256M,share=on,mem-path={}",
                            file.display()
                        ),
                        (None, true) => "memory-backend-ram,id=mem,size=256M".into(),
                        (None, false) => "memory-backend-memfd,id=mem,size=256M,share=on".into(),
                    })
                    .args(["-numa", "node,memdev=mem"]);
                let queues = q.queues.max(1);
                let mut device = String::from("virtio-net-device,netdev=n0");
                match &q.tap {
                    Some(ifname) => {
                        c.arg("-netdev").arg(format!(
                            "tap,id=n0,ifname={ifname},script=no,downscript=no,vhost=off,queues={queues}"
                        ));
                    }
                    None => {
                        let listen = if q.server { ",server=on,wait=off" } else { "" };
                        let extra = q
                            .chardev_options
                            .as_ref()
                            .map(|o| format!(",{o}"))
                            .unwrap_or_default();
                        c.arg("-chardev")
                            .arg(format!(
                                "socket,id=c0,path={}{listen}{extra}",
                                opts.socket.display()
                            ))
                            .arg("-netdev")
                            .arg(format!("vhost-user,id=n0,chardev=c0,queues={queues}"));
                    }
                }
                if queues > 1 {
                    device.push_str(",mq=on");
                }
                if let Some(mac) = &q.mac {
                    device.push_str(&format!(",mac={mac}"));
                }
                for prop in &q.device_props {
                    device.push(',');
                    device.push_str(prop);
                }
                c.arg("-device").arg(device);
                if let Some(qmp) = &q.qmp {
                    c.arg("-qmp")
                        .arg(format!("unix:{},server=on,wait=off", qmp.display()));
                }
                if let Some(uri) = &q.incoming {
                    c.arg("-incoming").arg(uri);
                }
                if q.paused {
                    c.arg("-S");
                }
                c.arg("-kernel")
                    .arg(&kernel)
                    .arg("-initrd")
                    .arg(&initrd)
                    .arg("-append")
                    .arg(format!(
                        "console=ttyS0 loglevel=4 edd=off panic=-1 tsc_early_khz={} sandnic.cmdgz={script}",
                        host_khz()
                    ));
                c
            }
        };
        let console = std::fs::File::create(&opts.console)?;
        // A group of its own: UML runs the guest's processes as host
        // processes of its own, and all of them go when the guest does.
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        cmd.stdin(Stdio::null())
            .stdout(console.try_clone()?)
            .stderr(console);
        let child = crate::harness::spawn(cmd)
            .with_context(|| format!("starting the {} guest", opts.kind.name()))?;
        Ok(Self {
            child,
            console: opts.console,
        })
    }

    pub fn console(&self) -> String {
        std::fs::read_to_string(&self.console)
            .unwrap_or_default()
            .replace('\r', "")
    }

    /// Waits for the guest to power off; returns its script's exit status.
    pub fn wait(&mut self, timeout: Duration) -> anyhow::Result<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.child.try_wait()?.is_some() {
                let console = self.console();
                let status = console
                    .lines()
                    .find_map(|l| l.split("SANDNIC-GUEST: script exit ").nth(1))
                    .and_then(|s| s.trim().parse().ok());
                return status.with_context(|| {
                    format!("guest ended without running its script:\n{console}")
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "guest did not finish within {timeout:?}:\n{}",
            self.console()
        )
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        let group = nix::unistd::Pid::from_raw(-(self.child.id() as i32));
        let _ = nix::sys::signal::kill(group, nix::sys::signal::Signal::SIGKILL);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn compress_b64(script: &str) -> anyhow::Result<String> {
    let mut gzip = Command::new("gzip")
        .args(["-9n"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    gzip.stdin
        .take()
        .expect("stdin")
        .write_all(script.as_bytes())?;
    let out = gzip.wait_with_output()?;
    let mut b64 = Command::new("base64")
        .arg("-w0")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    b64.stdin.take().expect("stdin").write_all(&out.stdout)?;
    let encoded = String::from_utf8(b64.wait_with_output()?.stdout)?;
    if encoded.len() > 1500 {
        bail!(
            "guest script too long for the kernel command line ({} bytes encoded)",
            encoded.len()
        );
    }
    Ok(encoded)
}

/// A directory shared with a UML guest (hostfs) and the step handshake on
/// it: the guest writes `guest-STEP` and waits for `host-STEP`.
pub struct HostDir(pub PathBuf);

impl HostDir {
    /// Waits for the guest to reach `step`; returns what it wrote.
    pub fn wait_for(&self, step: &str, timeout: Duration, guest: &Guest) -> anyhow::Result<String> {
        let path = self.0.join(format!("guest-{step}"));
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(text) = std::fs::read_to_string(&path) {
                return Ok(text);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("guest never reached step {step:?}:\n{}", guest.console())
    }

    /// Lets the guest continue past `step`.
    pub fn release(&self, step: &str) {
        let _ = std::fs::write(self.0.join(format!("host-{step}")), b"go\n");
    }

    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.0.join(name)).unwrap_or_default()
    }
}

/// The shell function guest scripts use for the handshake.
/// The guest writes its step's file under another name and renames it:
/// the host, which waits for the name, must never read it half written
/// (it once read an empty file on a loaded machine).
pub const STEP_FN: &str =
    "step() { echo \"$2\" > /mnt/.guest-$1; mv /mnt/.guest-$1 /mnt/guest-$1; while [ ! -e /mnt/host-$1 ]; do sleep 0.05; done; }\n";

/// A guest on its own sandnic: a namespace with `tap0` (10.88.0.1/24; the
/// guest takes 10.88.0.2), `sandnic serve` on it with `serve_args`, running
/// as UNPRIVILEGED_USER (handover destinations need the same), and the
/// guest booted with `script` (which may use `step`; UML guests get the
/// shared directory on /mnt).
pub struct GuestRig {
    pub guest: Guest,
    pub hostdir: HostDir,
    pub sandnic: crate::harness::Sandnic,
    pub ns: crate::harness::NetNs,
    pub dir: crate::harness::ScratchDir,
}

impl GuestRig {
    pub fn boot(kind: Kind, serve_args: &[&str], script: &str) -> anyhow::Result<Self> {
        Self::boot_with(kind, QemuOptions::default(), serve_args, script)
    }

    /// `boot`, a QEMU guest with `qemu`'s settings (its QEMU, its memory).
    pub fn boot_with(
        kind: Kind,
        qemu: QemuOptions,
        serve_args: &[&str],
        script: &str,
    ) -> anyhow::Result<Self> {
        use crate::harness::{NetNs, Sandnic, ScratchDir};
        let ns = NetNs::new()?;
        ns.add_tap("tap0", "10.88.0.1/24")?;
        let dir = ScratchDir::new()?;
        let mut args = vec!["--tap", "tap0"];
        // In client mode sandnic dials QEMU's socket, which QEMU (root
        // here) creates writable by its owner only.
        if !qemu.server {
            args.extend(["--user", crate::harness::UNPRIVILEGED_USER]);
        }
        args.extend_from_slice(serve_args);
        let sandnic = if qemu.server {
            Sandnic::serve_client(&ns, &dir, &dir.path("frontend.sock"), &args)?
        } else {
            Sandnic::serve(&ns, &dir, &args)?
        };
        let hostdir = HostDir(dir.path("share"));
        std::fs::create_dir_all(&hostdir.0)?;
        let script = format!("{STEP_FN}{script}");
        let guest = Guest::boot(GuestOptions {
            kind,
            socket: &sandnic.socket,
            script: &script,
            hostdir: (kind == Kind::Uml).then_some(hostdir.0.as_path()),
            console: dir.path("console.log"),
            qemu,
        })?;
        Ok(Self {
            guest,
            hostdir,
            sandnic,
            ns,
            dir,
        })
    }
}
