//! The `sandnic` command line.

use crate::datapath::rate_limit::{LimitSpecs, RateSpec, SpecError};
use crate::datapath::DatapathOptions;
use crate::hardening::privileges::Target;
use crate::hardening::seccomp::Mode;
use crate::sandbox::components::RELEASED;
use crate::sandbox::{ComponentSource, Runtime, SandboxedDevice};
use crate::serve::{serve, ServeError, ServeOptions, TapSource};
use clap::{Parser, Subcommand};
use sandnic_device::Mac;
use sandnic_device::{Compat, DeviceConfig, Offloads};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

#[derive(Debug, Parser)]
#[command(
    name = "sandnic",
    version,
    about = "vhost-user virtio-net backend with a sandboxed (wasm) device model"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

// Parsed once per process: a large variant costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve a virtio-net device over vhost-user, backed by a TAP device.
    Serve {
        /// Listen here as the vhost-user server. Not needed when the socket
        /// is inherited: systemd socket activation (picked up by itself) or
        /// --socket-fd.
        #[arg(long)]
        socket: Option<PathBuf>,
        /// Serve vhost-user on this inherited, listening UNIX socket fd
        /// (opened by a manager such as libvirt).
        #[arg(long, conflicts_with = "socket")]
        socket_fd: Option<i32>,
        /// Client mode: dial the frontend listening here (QEMU
        /// `-chardev socket,path=PATH,server=on,wait=off`) instead of
        /// listening, and dial again whenever the connection drops.
        #[arg(long, conflicts_with_all = ["socket", "socket_fd"])]
        connect: Option<PathBuf>,
        /// An existing TAP device to attach to (one queue per queue pair).
        #[arg(long, conflicts_with = "tap_fd")]
        tap: Option<String>,
        /// TAP queue fds opened by the caller, one per queue pair.
        #[arg(long, value_delimiter = ',')]
        tap_fd: Vec<i32>,
        /// The device's MAC address. Without it: a locally administered
        /// one derived from this machine's id and the TAP's name.
        #[arg(long, value_parser = parse_mac)]
        mac: Option<Mac>,
        /// Queue pairs (multiqueue when more than one) [default: 1].
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=256))]
        queues: Option<u16>,
        /// MTU advertised to the driver (VIRTIO_NET_F_MTU).
        #[arg(long, value_parser = clap::value_parser!(u16).range(68..))]
        mtu: Option<u16>,
        /// Device component: `builtin` (the default), `builtin:VERSION` (a
        /// release built into this binary) or a component file. A handover
        /// destination without it runs what the source's state needs (see
        /// the README).
        #[arg(long, value_parser = ComponentSource::parse)]
        component: Option<ComponentSource>,
        /// JSON-lines control socket (`sandnic ctl --api PATH`).
        #[arg(long)]
        api: Option<PathBuf>,
        /// The control socket as an inherited, listening UNIX socket fd.
        #[arg(long, conflicts_with = "api")]
        api_fd: Option<i32>,
        /// Take over a running device: wait on this socket for `handover`
        /// from another sandnic, and open nothing until then. The device
        /// comes whole from the source (TAP, MAC, queue pairs, MTU,
        /// vhost-user and API sockets): the flags that set those are
        /// refused with it.
        #[arg(long)]
        incoming: Option<PathBuf>,
        /// With --incoming: open the TAP by name instead of receiving the
        /// source's TAP fds (for comparison with fd passing).
        #[arg(long, requires = "incoming")]
        new_tap: bool,
        /// Microseconds a datapath thread keeps polling after traffic
        /// before it sleeps (0: sleep at once, least CPU).
        #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u64).range(0..=10_000))]
        busy_poll_us: u64,
        /// Datapath threads serving the queue pairs (default: one per pair,
        /// up to the CPUs sandnic may run on, e.g. as `taskset` sets them).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        datapath_threads: Option<u16>,
        /// Run as USER[:GROUP] once the TAP and the sockets are open.
        #[arg(long)]
        user: Option<Target>,
        /// Seccomp filters on every thread: trap (a forbidden syscall ends
        /// the process with a report), log (the kernel logs it), off.
        #[arg(long, default_value = "trap")]
        seccomp: Mode,
        /// Keep the device's fds in the service manager's fd store, which
        /// holds N (`FileDescriptorStoreMax=`), so that a sandnic restarted
        /// after a crash picks the device up with no disconnect. systemd
        /// 254 and later pass N in $FDSTORE, which needs no flag.
        #[arg(long, value_parser = clap::value_parser!(u64).range(1..=4096))]
        fd_store: Option<u64>,
        /// Rate limit guest → TAP, shared by all queue pairs:
        /// `bytes=N[,frames=N][,burst-bytes=N][,burst-frames=N]` per
        /// second, Ethernet frame bytes as the TAP counts them; suffixes
        /// k, M, G (decimal). Chains wait in the guest's ring: nothing is
        /// dropped for the limit. A burst defaults to 0.1 s of the rate.
        #[arg(long, value_name = "SPEC")]
        tx_limit: Option<RateSpec>,
        /// Rate limit TAP → guest, as --tx-limit. Frames wait in the TAP,
        /// whose queue drops what overflows (`stats` counts it).
        #[arg(long, value_name = "SPEC")]
        rx_limit: Option<RateSpec>,
    },
    /// Talk to a running `sandnic serve` through its control socket.
    Ctl {
        /// The control socket of the running sandnic (its `serve --api`).
        #[arg(long)]
        api: PathBuf,
        #[command(subcommand)]
        command: CtlCommand,
    },
    /// Print a saved device state as JSON.
    Inspect {
        /// The saved state (as `sandnic ctl save FILE` writes it).
        file: PathBuf,
        /// Decode with this component (`builtin:VERSION` or a file) instead
        /// of the released ones built into the binary (which cover every
        /// released state version).
        #[arg(long, value_parser = ComponentSource::parse)]
        component: Option<ComponentSource>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CtlCommand {
    /// Component, features, queue pairs, link.
    Status,
    /// Per-queue packet counters and control-path counters.
    Stats,
    /// Set the link up or down: the TAP's carrier follows on the host,
    /// and a guest whose frontend passes config changes on (UML, crosvm)
    /// sees its link go down; QEMU's guests see only traffic stop.
    Link {
        #[arg(value_parser = ["up", "down"])]
        state: String,
    },
    /// Hot-swap the device component: `builtin`, `builtin:VERSION` or a
    /// component file.
    Swap { component: String },
    /// Write the running device's state to FILE (`sandnic inspect` reads
    /// it).
    Save { file: PathBuf },
    /// Ask the guest to announce itself (GUEST_ANNOUNCE).
    Announce,
    /// Set rate limits at once: `--tx SPEC`, `--rx SPEC` (as `serve
    /// --tx-limit`), or `none` to remove one; a direction not named is
    /// left as it is.
    Limit {
        #[arg(long, value_name = "SPEC|none", value_parser = parse_limit_arg)]
        tx: Option<LimitArg>,
        #[arg(long, value_name = "SPEC|none", value_parser = parse_limit_arg)]
        rx: Option<LimitArg>,
    },
    /// Hand the whole device to a `sandnic serve --incoming PATH`.
    Handover {
        path: PathBuf,
        /// Do not pass the TAP fds (the destination opens the TAP by name).
        #[arg(long)]
        new_tap: bool,
    },
}

/// `ctl limit`'s value for a direction: a limit, or `none` to remove it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitArg {
    Set(RateSpec),
    Remove,
}

fn parse_limit_arg(text: &str) -> Result<LimitArg, SpecError> {
    if text == "none" {
        Ok(LimitArg::Remove)
    } else {
        text.parse().map(LimitArg::Set)
    }
}

impl LimitArg {
    /// The API's form: a spec object, or null.
    fn to_json(self) -> serde_json::Value {
        match self {
            Self::Set(spec) => serde_json::to_value(spec).expect("plain fields"),
            Self::Remove => serde_json::Value::Null,
        }
    }
}

/// A `--mac` the device cannot use.
#[derive(Debug, thiserror::Error)]
enum MacError {
    #[error("expected six hex bytes like 52:54:00:12:34:56")]
    Format,
    #[error("not a unicast address")]
    NotUnicast,
}

fn parse_mac(text: &str) -> Result<Mac, MacError> {
    let parts: Vec<&str> = text.split(':').collect();
    let bytes: Result<Vec<u8>, _> = parts.iter().map(|p| u8::from_str_radix(p, 16)).collect();
    match bytes {
        Ok(b) if b.len() == 6 && parts.iter().all(|p| p.len() == 2) => {
            let mac: Mac = b.try_into().map_err(|_| MacError::Format)?;
            if sandnic_device::is_valid_unicast(&mac) {
                Ok(mac)
            } else {
                Err(MacError::NotUnicast)
            }
        }
        _ => Err(MacError::Format),
    }
}

/// Runs the command line; the exit code follows the usual convention
/// (0 ok, 1 the operation failed, 2 bad usage).
pub fn main() -> ExitCode {
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            eprintln!("sandnic: {}", one_line(&e));
            return ExitCode::from(2);
        }
        Err(e) => {
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    let result = match cli.command {
        Command::Inspect { file, component } => inspect(&file, component),
        Command::Serve {
            socket,
            socket_fd,
            connect,
            api_fd,
            tap,
            tap_fd,
            mac,
            queues,
            mtu,
            component,
            api,
            incoming,
            new_tap,
            busy_poll_us,
            datapath_threads,
            user,
            seccomp,
            fd_store,
            tx_limit,
            rx_limit,
        } => {
            if incoming.is_some() {
                let device_flags = [
                    ("--socket", socket.is_some()),
                    ("--socket-fd", socket_fd.is_some()),
                    ("--connect", connect.is_some()),
                    ("--tap", tap.is_some()),
                    ("--tap-fd", !tap_fd.is_empty()),
                    ("--mac", mac.is_some()),
                    ("--queues", queues.is_some()),
                    ("--mtu", mtu.is_some()),
                    ("--api", api.is_some()),
                    ("--api-fd", api_fd.is_some()),
                    ("--tx-limit", tx_limit.is_some()),
                    ("--rx-limit", rx_limit.is_some()),
                ];
                if let Some((flag, _)) = device_flags.iter().find(|(_, given)| *given) {
                    eprintln!(
                        "sandnic: {flag} cannot be used with --incoming: a handover destination \
                         takes the device whole from the source (TAP, MAC, queue pairs, MTU, \
                         vhost-user and API sockets, rate limits)"
                    );
                    return ExitCode::from(2);
                }
            }
            let tap = match (tap, tap_fd.is_empty()) {
                (Some(name), _) => Some(TapSource::Name(name)),
                (None, false) => Some(TapSource::Fds(tap_fd)),
                (None, true) => None,
            };
            let opts = ServeOptions {
                socket,
                connect,
                socket_fd,
                api_fd,
                tap,
                mac,
                queues: queues.unwrap_or(1),
                mtu,
                component,
                api,
                incoming,
                new_tap,
                datapath: DatapathOptions {
                    busy_poll: std::time::Duration::from_micros(busy_poll_us),
                    threads: datapath_threads
                        .and_then(|n| std::num::NonZeroUsize::new(usize::from(n))),
                },
                user,
                seccomp,
                fd_store: fd_store.map(|n| n as usize),
                limits: LimitSpecs {
                    tx: tx_limit,
                    rx: rx_limit,
                },
            };
            return match serve(opts) {
                Ok(()) => ExitCode::SUCCESS,
                Err(ServeError::Usage(e)) => {
                    eprintln!("sandnic: {e}");
                    ExitCode::from(2)
                }
                Err(e) => {
                    eprintln!("sandnic: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Command::Ctl { api, command } => return ctl(&api, command),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandnic: {e:#}");
            ExitCode::from(1)
        }
    }
}

/// A usage error in one line (clap's own adds usage and tips).
fn one_line(e: &clap::Error) -> String {
    let text = e.render().to_string();
    let first = text.lines().next().unwrap_or_default();
    format!(
        "{} (--help lists the options)",
        first.strip_prefix("error: ").unwrap_or(first)
    )
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDNIC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    // Colours only on a terminal: journald and log files get plain text.
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr)
        .try_init();
}

fn ctl(api: &std::path::Path, command: CtlCommand) -> ExitCode {
    let request = match command {
        CtlCommand::Status => serde_json::json!({ "cmd": "status" }),
        CtlCommand::Stats => serde_json::json!({ "cmd": "stats" }),
        CtlCommand::Link { state } => serde_json::json!({ "cmd": "link", "up": state == "up" }),
        CtlCommand::Swap { component } => {
            // A file is named to the server by its absolute path (the
            // server's working directory is not ours).
            let named = match ComponentSource::parse(&component) {
                Ok(ComponentSource::File(path)) => std::fs::canonicalize(&path)
                    .unwrap_or(path)
                    .display()
                    .to_string(),
                _ => component,
            };
            serde_json::json!({ "cmd": "swap", "component": named })
        }
        CtlCommand::Save { file } => return save(api, &file),
        CtlCommand::Announce => serde_json::json!({ "cmd": "announce" }),
        CtlCommand::Limit { tx, rx } => {
            let mut request = serde_json::json!({ "cmd": "limit" });
            if let Some(tx) = tx {
                request["tx"] = tx.to_json();
            }
            if let Some(rx) = rx {
                request["rx"] = rx.to_json();
            }
            request
        }
        CtlCommand::Handover { path, new_tap } => {
            let path = std::fs::canonicalize(&path).unwrap_or(path);
            serde_json::json!({ "cmd": "handover", "path": path, "new_tap": new_tap })
        }
    };
    match crate::api::client(api, request) {
        Ok((reply, ok)) => print_reply(&reply, ok),
        Err(e) => {
            eprintln!("sandnic: {e}");
            ExitCode::from(1)
        }
    }
}

/// Prints a reply as pretty JSON; exit 0 if it was ok. A closed stdout
/// (`sandnic ctl … | head -3`) ends the command quietly, as Unix tools
/// do.
fn print_reply(reply: &serde_json::Value, ok: bool) -> ExitCode {
    use std::io::Write;
    let text = serde_json::to_string_pretty(reply).unwrap_or_default();
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => ExitCode::SUCCESS,
        _ if ok => ExitCode::SUCCESS,
        _ => ExitCode::from(1),
    }
}

/// `ctl save FILE`: the running device's state, written to FILE.
fn save(api: &std::path::Path, file: &std::path::Path) -> ExitCode {
    match save_to(api, file) {
        Ok(summary) => print_reply(&summary, true),
        Err(e) => {
            eprintln!("sandnic: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn save_to(api: &std::path::Path, file: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    use anyhow::Context;
    let (reply, ok) = crate::api::client(api, serde_json::json!({ "cmd": "save" }))?;
    anyhow::ensure!(ok, "{}", reply["error"].as_str().unwrap_or("save failed"));
    let state = reply["state"]
        .as_str()
        .and_then(crate::api::from_hex)
        .context("the reply carries no state")?;
    std::fs::write(file, &state).with_context(|| format!("writing {}", file.display()))?;
    Ok(serde_json::json!({
        "ok": true,
        "file": file,
        "bytes": state.len(),
        "component": reply["component"],
    }))
}

fn inspect(file: &PathBuf, component: Option<ComponentSource>) -> anyhow::Result<()> {
    use anyhow::Context;
    let blob = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let runtime = Runtime::with_defaults()?;
    let json = match component {
        Some(source) => describe(&runtime, &source, &blob),
        None => describe_with_a_release(&runtime, &blob),
    }
    .with_context(|| format!("{} is not a valid device state", file.display()))?;
    println!("{json}");
    Ok(())
}

/// Decodes `blob` with the first released component that reads it; when
/// none does, the newest one's error (it reads the most versions).
fn describe_with_a_release(runtime: &Arc<Runtime>, blob: &[u8]) -> anyhow::Result<String> {
    let mut last = None;
    for release in &RELEASED {
        match describe(runtime, &ComponentSource::Released(release), blob) {
            Ok(json) => return Ok(json),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| anyhow::anyhow!("no released component")))
}

fn describe(
    runtime: &Arc<Runtime>,
    source: &ComponentSource,
    blob: &[u8],
) -> anyhow::Result<String> {
    let component = runtime.load(source)?;
    let mut device = SandboxedDevice::new(runtime.clone(), component, placeholder_config())?;
    Ok(device.describe(blob)?)
}

/// `describe` does not depend on the device's configuration; any valid one
/// serves to instantiate the component.
fn placeholder_config() -> DeviceConfig {
    DeviceConfig {
        mac: [0x02, 0, 0, 0, 0, 1],
        max_queue_pairs: 1,
        mtu: None,
        backend_offloads: Offloads::empty(),
        compat: Compat::default(),
    }
}
