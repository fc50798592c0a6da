//! `sandnic serve`: set everything up, then run the control thread's event
//! loop (the vhost-user socket, the control queue, the API, signals) while
//! the datapath threads move packets.

use crate::api::{self, ApiClient, ApiContext, HandoverRequest};
use crate::backend::{NetBackend, Outcome, SessionId};
use crate::daemon::inherited_sockets;
use crate::daemon::notify::Notifier;
use crate::datapath::DatapathOptions;
use crate::handover::stream::StreamError;
use crate::handover::{destination, source, HandoverReport};
use crate::hardening::allowlists::Role;
use crate::hardening::privileges::{self, Target};
use crate::hardening::seccomp::{self, Mode};
use crate::sandbox::{ComponentSource, Runtime, SandboxedDevice};
use crate::tap::Tap;
use crate::vhost_user::{request, wire};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use sandnic_device::{Compat, DeviceConfig, Mac};
use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

#[derive(Debug, Clone)]
pub enum TapSource {
    Name(String),
    Fds(Vec<RawFd>),
}

#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The vhost-user socket (not with `incoming`: it comes with the device).
    pub socket: Option<PathBuf>,
    /// Inherited listening sockets (`--socket-fd`, `--api-fd`); systemd's
    /// socket activation needs no option.
    pub socket_fd: Option<RawFd>,
    pub api_fd: Option<RawFd>,
    pub tap: Option<TapSource>,
    /// None: derived from the machine and the TAP name (`default_mac`).
    pub mac: Option<Mac>,
    pub queues: u16,
    pub mtu: Option<u16>,
    /// None: the builtin one (a fresh device), or what the source's state
    /// needs (a handover destination: `destination::component_for`).
    pub component: Option<ComponentSource>,
    pub api: Option<PathBuf>,
    /// Wait here for a running sandnic to hand its device over.
    pub incoming: Option<PathBuf>,
    /// Incoming: open the TAP by name instead of taking the source's fds.
    pub new_tap: bool,
    pub datapath: DatapathOptions,
    /// Become this user once everything that needs root is open.
    pub user: Option<Target>,
    pub seccomp: Mode,
}

/// Why `serve` stopped: a usage problem (exit 2) or a runtime failure.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("{0}")]
    Usage(String),
    #[error("{0:#}")]
    Runtime(anyhow::Error),
}

/// How long a frontend may take to send the rest of a message it started.
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(2);

const LISTENER: u64 = 1;
const CTRL_KICK: u64 = 3;
const API_LISTENER: u64 = 4;
const SIGNALS: u64 = 5;
/// The handover socket, while a destination prepares.
const HANDOVER: u64 = 6;
const API_CLIENT: u64 = 100;
/// Frontend connections: this plus their session id.
const FRONTEND: u64 = 1 << 32;

/// A connected frontend (at most two: a running VMM and, during a local
/// migration, its successor).
struct Frontend {
    session: SessionId,
    stream: UnixStream,
}

/// Removes the listening sockets when serving ends, whatever the reason.
struct SocketFiles(Vec<PathBuf>);

impl Drop for SocketFiles {
    fn drop(&mut self) {
        for path in &self.0 {
            let _ = std::fs::remove_file(path);
        }
    }
}

pub fn serve(opts: ServeOptions) -> Result<(), ServeError> {
    let usage = |e: String| ServeError::Usage(e);
    seccomp::install_violation_reporter();
    let notifier = Notifier::from_env().map_err(usage)?;
    let signals = block_signals().map_err(ServeError::Runtime)?;
    let runtime = Runtime::with_defaults_for(opts.user.map(|t| (t.uid, t.gid)))
        .map_err(ServeError::Runtime)?;
    let component = match &opts.component {
        Some(source) => Some(runtime.load(source).map_err(|e| usage(format!("{e:#}")))?),
        None => None,
    };
    let mut server = match &opts.incoming {
        Some(path) => {
            let listener =
                destination::listen(path, opts.user).map_err(|e| ServeError::Runtime(e.into()))?;
            // The source's fds arrive after the drop: nothing here needs
            // root, and the source checks that we run as its user.
            drop_privileges(&opts)?;
            let runtime_error = |e: destination::IncomingError| ServeError::Runtime(e.into());
            let Some(source) =
                destination::wait_for_source(listener, path, &signals).map_err(runtime_error)?
            else {
                info!("signal received while waiting for a handover; exiting");
                return Ok(());
            };
            let mut incoming = destination::receive(
                source,
                runtime.clone(),
                component,
                opts.new_tap,
                opts.datapath,
            )
            .map_err(runtime_error)?;
            incoming.resume();
            let api_listener = match (incoming.api_listener.take(), &opts.api) {
                (Some(l), _) => Some(l),
                (None, Some(path)) => Some(api::bind_private(path, opts.user).map_err(usage)?),
                (None, None) => None,
            };
            if let Some(conn) = &incoming.connection {
                conn.set_read_timeout(Some(MESSAGE_TIMEOUT))
                    .map_err(|e| ServeError::Runtime(e.into()))?;
            }
            Server::new(
                incoming.backend,
                runtime,
                incoming.listener,
                api_listener,
                signals,
                incoming.connection,
                SocketFiles(incoming.socket_paths),
            )
        }
        None => {
            let component = match component {
                Some(component) => component,
                None => runtime
                    .load(&ComponentSource::Builtin)
                    .map_err(ServeError::Runtime)?,
            };
            let server = fresh(&opts, runtime, component, signals)?;
            drop_privileges(&opts)?;
            server
        }
    };
    confine(&opts, &server.backend).map_err(ServeError::Runtime)?;
    if let Some(notifier) = &notifier {
        notifier.ready();
    }
    match server.run().map_err(ServeError::Runtime)? {
        Exit::Signal => {
            if let Some(notifier) = &notifier {
                notifier.stopping();
            }
            let rings = server.backend.stop_for_exit();
            info!(rings, "rings stopped, used entries published; exiting");
            Ok(())
        }
        Exit::HandedOver => {
            // The destination owns the sockets (and their files) now.
            server.socket_files.0.clear();
            Ok(())
        }
    }
}

/// Gives up root if `--user` asks for it (before any filter goes on), and
/// forbids new privileges either way.
fn drop_privileges(opts: &ServeOptions) -> Result<(), ServeError> {
    // Still root: keep the handover's pause at real-time priority possible.
    crate::handover::priority::allow_after_drop();
    let result = match opts.user {
        Some(target) => privileges::drop_to(target).map(|()| {
            info!(
                uid = target.uid.as_raw(),
                gid = target.gid.as_raw(),
                "dropped privileges"
            );
        }),
        None => privileges::forbid_new_privileges(),
    };
    result.map_err(|e| ServeError::Runtime(anyhow::anyhow!(e)))
}

/// Puts each thread's seccomp filter on: the datapath threads', then this
/// (the control) thread's.
fn confine(opts: &ServeOptions, backend: &NetBackend) -> anyhow::Result<()> {
    let datapath = seccomp::filter(Role::Datapath, opts.seccomp)?;
    let control = seccomp::filter(Role::Control, opts.seccomp)?;
    if let (Some(datapath), Some(control)) = (datapath, control) {
        backend
            .datapath()
            .confine(Arc::new(datapath))
            .map_err(anyhow::Error::msg)?;
        seccomp::apply(Role::Control, &control)?;
        info!(mode = ?opts.seccomp, "seccomp filters on every thread");
    }
    Ok(())
}

/// A new device on a TAP, listening on the vhost-user socket.
fn fresh(
    opts: &ServeOptions,
    runtime: Arc<Runtime>,
    component: Arc<crate::sandbox::DeviceComponent>,
    signals: SignalFd,
) -> Result<Server, ServeError> {
    let usage = |e: String| ServeError::Usage(e);
    let claimed = match &opts.tap {
        Some(TapSource::Fds(fds)) => fds.as_slice(),
        _ => &[],
    };
    let inherited = inherited_sockets::take(opts.socket_fd, opts.api_fd, claimed).map_err(usage)?;
    let mut missing = Vec::new();
    if opts.tap.is_none() {
        missing.push("--tap NAME (or --tap-fd FD)");
    }
    if inherited.vhost_user.is_none() && opts.socket.is_none() {
        missing.push("--socket PATH (or --socket-fd FD, or a socket-activated vhost-user socket)");
    }
    if !missing.is_empty() {
        return Err(usage(format!(
            "serve needs {} (or --incoming PATH to take over a running device)",
            missing.join(" and ")
        )));
    }
    let tap = Arc::new(open_tap(opts)?);
    let config = DeviceConfig {
        mac: opts
            .mac
            .unwrap_or_else(|| crate::default_mac::for_tap(tap.name())),
        max_queue_pairs: opts.queues,
        mtu: opts.mtu,
        backend_offloads: tap.offload_caps(),
        compat: Compat::default(),
    };
    config.validate().map_err(usage)?;
    let mac = config.mac;
    let device =
        SandboxedDevice::new(runtime.clone(), component, config).map_err(ServeError::Runtime)?;
    let mut files = SocketFiles(Vec::new());
    let listener = inherited_or_bound(
        inherited.vhost_user,
        opts.socket.as_ref(),
        "--socket",
        api::bind_unix,
        &mut files,
    )
    .map_err(usage)?
    .ok_or_else(|| usage("no vhost-user socket".into()))?;
    let api_listener = inherited_or_bound(
        inherited.api,
        opts.api.as_ref(),
        "--api",
        |path| api::bind_private(path, opts.user),
        &mut files,
    )
    .map_err(usage)?;
    let backend =
        NetBackend::new(device, tap.clone(), opts.datapath).map_err(ServeError::Runtime)?;
    info!(
        socket = %listener_name(&listener),
        tap = tap.name(),
        mac = %sandnic_device::format_mac(&mac),
        queues = opts.queues,
        offloads = ?tap.offload_caps(),
        component = %backend.device().info().version,
        "serving"
    );
    Ok(Server::new(
        backend,
        runtime,
        Some(listener),
        api_listener,
        signals,
        None,
        files,
    ))
}

/// A listening socket: the inherited one, or one bound at `path` (its file
/// then sandnic's to remove); both is a usage error.
fn inherited_or_bound(
    inherited: Option<UnixListener>,
    path: Option<&PathBuf>,
    flag: &str,
    bind: impl FnOnce(&std::path::Path) -> Result<UnixListener, String>,
    files: &mut SocketFiles,
) -> Result<Option<UnixListener>, String> {
    match (inherited, path) {
        (Some(_), Some(_)) => Err(format!("{flag} given, but that socket is socket-activated")),
        (Some(listener), None) => Ok(Some(listener)),
        (None, Some(path)) => {
            let listener = bind(path)?;
            files.0.push(path.clone());
            Ok(Some(listener))
        }
        (None, None) => Ok(None),
    }
}

/// Where a listener listens, for the log.
fn listener_name(listener: &UnixListener) -> String {
    match listener.local_addr() {
        Ok(addr) => match addr.as_pathname() {
            Some(path) => path.display().to_string(),
            None => format!("{addr:?}"),
        },
        Err(e) => format!("? ({e})"),
    }
}

fn open_tap(opts: &ServeOptions) -> Result<Tap, ServeError> {
    let tap = match opts
        .tap
        .as_ref()
        .ok_or_else(|| ServeError::Usage("no TAP".into()))?
    {
        TapSource::Name(name) => Tap::open(name, usize::from(opts.queues)),
        TapSource::Fds(fds) => {
            // SAFETY: the fds were named on the command line as ours to
            // take over (inherited from the parent); each is adopted once.
            let owned = fds
                .iter()
                .map(|&fd| unsafe { OwnedFd::from_raw_fd(fd) })
                .collect();
            Tap::adopt(owned)
        }
    }
    .map_err(|e| ServeError::Usage(e.to_string()))?;
    if tap.queue_count() < usize::from(opts.queues) {
        return Err(ServeError::Usage(format!(
            "{} TAP queues for {} queue pairs",
            tap.queue_count(),
            opts.queues
        )));
    }
    Ok(tap)
}

/// SIGINT/SIGTERM become readable events (blocked before any thread
/// starts, so every thread inherits the mask).
fn block_signals() -> anyhow::Result<SignalFd> {
    let mut mask = SigSet::empty();
    mask.add(Signal::SIGINT);
    mask.add(Signal::SIGTERM);
    mask.thread_block()?;
    Ok(SignalFd::with_flags(
        &mask,
        SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC,
    )?)
}

/// Why the event loop ended.
enum Exit {
    Signal,
    HandedOver,
}

struct Server {
    backend: NetBackend,
    runtime: Arc<Runtime>,
    listener: Option<UnixListener>,
    api_listener: Option<UnixListener>,
    signals: SignalFd,
    frontends: Vec<Frontend>,
    api_clients: Vec<Option<ApiClient>>,
    /// The control queue's kick fd as registered in epoll.
    ctrl_kick: Option<Arc<OwnedFd>>,
    socket_files: SocketFiles,
    /// A handover the API asked for, and the API client slot to answer.
    handover_request: Option<(HandoverRequest, usize)>,
    /// A handover offered and being prepared by its destination, and the
    /// API client slot to answer when it is over.
    handover: Option<(source::Pending, usize)>,
}

impl Server {
    fn new(
        backend: NetBackend,
        runtime: Arc<Runtime>,
        listener: Option<UnixListener>,
        api_listener: Option<UnixListener>,
        signals: SignalFd,
        conn: Option<UnixStream>,
        socket_files: SocketFiles,
    ) -> Self {
        let mut backend = backend;
        let frontends = conn
            .and_then(|stream| {
                Some(Frontend {
                    session: backend.connect()?,
                    stream,
                })
            })
            .into_iter()
            .collect();
        Self {
            backend,
            runtime,
            listener,
            api_listener,
            signals,
            frontends,
            api_clients: Vec::new(),
            ctrl_kick: None,
            socket_files,
            handover_request: None,
            handover: None,
        }
    }

    fn run(&mut self) -> anyhow::Result<Exit> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        if let Some(listener) = &self.listener {
            epoll.add(
                listener.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, LISTENER),
            )?;
        }
        for f in &self.frontends {
            epoll.add(
                f.stream.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, FRONTEND + f.session),
            )?;
        }
        epoll.add(
            self.signals.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, SIGNALS),
        )?;
        if let Some(api) = &self.api_listener {
            epoll.add(
                api.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, API_LISTENER),
            )?;
        }
        let mut events = [EpollEvent::empty(); 16];
        loop {
            // Before every wait, not only after events: a destination of a
            // handover starts with the control queue already running, and a
            // command the driver sends before anything else wakes this loop
            // would otherwise wait unseen (Linux spins on it holding RTNL).
            self.sync_ctrl_kick(&epoll);
            let setup_due = self.backend.check_setup(std::time::Instant::now());
            let n = match epoll.wait(&mut events, self.wait_timeout(setup_due)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut destination_answered = false;
            for event in &events[..n] {
                match event.data() {
                    SIGNALS => {
                        info!("signal received, shutting down");
                        return Ok(Exit::Signal);
                    }
                    LISTENER => self.accept_frontend(&epoll)?,
                    HANDOVER => destination_answered = true,
                    token if token >= FRONTEND => self.serve_message(token - FRONTEND, &epoll),
                    CTRL_KICK => self.backend.process_ctrl_queue(),
                    API_LISTENER => self.accept_api(&epoll),
                    token if token >= API_CLIENT => {
                        self.serve_api((token - API_CLIENT) as usize, &epoll)
                    }
                    _ => {}
                }
            }
            if let Some((request, client)) = self.handover_request.take() {
                self.offer_handover(&request, client, &epoll);
            }
            let out_of_time = self
                .handover
                .as_ref()
                .is_some_and(|(pending, _)| pending.time_left().is_zero());
            if (destination_answered || out_of_time) && self.finish_handover(&epoll) {
                return Ok(Exit::HandedOver);
            }
        }
    }

    /// Sleep until an event, a pending handover's destination is out of
    /// time, or a session's setup is due to be judged (`setup_due`).
    fn wait_timeout(&self, setup_due: Option<std::time::Instant>) -> EpollTimeout {
        let handover = self
            .handover
            .as_ref()
            .map(|(pending, _)| pending.time_left());
        let setup = setup_due.map(|due| due.saturating_duration_since(std::time::Instant::now()));
        match [handover, setup].into_iter().flatten().min() {
            Some(left) => {
                // Rounded up: a timeout rounded down to 0 ms would spin.
                let left = left + Duration::from_millis(1);
                EpollTimeout::try_from(left).unwrap_or(EpollTimeout::MAX)
            }
            None => EpollTimeout::NONE,
        }
    }

    /// The connection and listeners that travel with the device.
    fn sockets(&self) -> Option<source::Sockets> {
        use std::os::fd::AsRawFd;
        Some(source::Sockets {
            connection: self.frontends.first().map(|f| f.stream.as_raw_fd()),
            listener: self.listener.as_ref()?.as_raw_fd(),
            api_listener: self.api_listener.as_ref().map(|l| l.as_raw_fd()),
            paths: self.socket_files.0.clone(),
        })
    }

    /// Offers the device to the process waiting at the request's path; the
    /// loop goes on serving while the destination prepares.
    fn offer_handover(&mut self, request: &HandoverRequest, client: usize, epoll: &Epoll) {
        let Some(sockets) = self.sockets() else {
            self.answer_api(client, &api::error("no listening socket to hand over"));
            return;
        };
        let pending = source::offer(
            &self.backend,
            sockets,
            &request.destination,
            request.new_tap,
        );
        let registered = pending.and_then(|pending| {
            epoll
                .add(
                    pending.socket(),
                    EpollEvent::new(EpollFlags::EPOLLIN, HANDOVER),
                )
                .map_err(|e| source::HandoverError::Stream(StreamError::Io(e)))?;
            Ok(pending)
        });
        match registered {
            Ok(pending) => self.handover = Some((pending, client)),
            Err(e) => self.answer_api(client, &api::error(e)),
        }
    }

    /// The destination answered the offer (or ran out of time): pause,
    /// commit, and answer the API client. True when the destination took
    /// over.
    fn finish_handover(&mut self, epoll: &Epoll) -> bool {
        let Some((pending, client)) = self.handover.take() else {
            return false;
        };
        let _ = epoll.delete(pending.socket());
        let Some(sockets) = self.sockets() else {
            self.answer_api(client, &api::error("no listening socket to hand over"));
            return false;
        };
        let (reply, done) = match pending.finish(&mut self.backend, sockets) {
            Ok(report) => (handover_reply(&report), true),
            Err(e) => (api::error(e), false),
        };
        self.answer_api(client, &reply);
        done
    }

    fn answer_api(&mut self, client: usize, reply: &serde_json::Value) {
        if let Some(Some(c)) = self.api_clients.get_mut(client) {
            let _ = c.reply(reply);
        }
    }

    fn accept_frontend(&mut self, epoll: &Epoll) -> anyhow::Result<()> {
        let Some(listener) = &self.listener else {
            return Ok(());
        };
        let (stream, _) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                warn!("accept: {e}");
                return Ok(());
            }
        };
        let Some(session) = self.backend.connect() else {
            warn!("two frontends are connected already; refusing a third");
            return Ok(());
        };
        self.backend.counters.frontends_accepted += 1;
        stream.set_read_timeout(Some(MESSAGE_TIMEOUT))?;
        if let Err(e) = epoll.add(
            stream.as_fd(),
            EpollEvent::new(EpollFlags::EPOLLIN, FRONTEND + session),
        ) {
            self.backend.disconnected(session);
            return Err(e.into());
        }
        let role = if self.frontends.is_empty() {
            "frontend"
        } else {
            "second frontend (standby until the first stops its rings or leaves)"
        };
        info!(session, "{role} connected");
        self.frontends.push(Frontend { session, stream });
        Ok(())
    }

    /// Closes frontend `session`'s connection and forgets its session.
    fn close_frontend(&mut self, session: SessionId, epoll: &Epoll) {
        if let Some(at) = self.frontends.iter().position(|f| f.session == session) {
            let f = self.frontends.remove(at);
            let _ = epoll.delete(f.stream.as_fd());
            self.backend.disconnected(session);
        }
    }

    fn serve_message(&mut self, session: SessionId, epoll: &Epoll) {
        let Some(f) = self.frontends.iter().find(|f| f.session == session) else {
            return;
        };
        let sock = f.stream.as_fd();
        let msg = match wire::recv(sock) {
            Ok(msg) => msg,
            Err(e) => {
                match e {
                    wire::WireError::Closed => info!(session, "frontend disconnected"),
                    other => warn!(session, "dropping the frontend connection: {other}"),
                }
                self.close_frontend(session, epoll);
                return;
            }
        };
        let header = msg.header;
        let ring = msg
            .payload
            .get(..4)
            .map(|b| u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
        let outcome = match request::parse(msg) {
            Ok(req) => self.backend.handle(session, req),
            Err(e) => {
                warn!(session, "malformed request: {e}");
                self.backend.malformed(header.request, e.to_string())
            }
        };
        if let Outcome::Disconnect(_) = outcome {
            self.close_frontend(session, epoll);
            return;
        }
        let reply_ack = self
            .backend
            .protocol(session)
            .is_some_and(|p| p.reply_ack());
        if let Err(e) = answer(sock, header, ring, outcome, reply_ack) {
            warn!(session, "replying to request {}: {e}", header.request);
        }
    }

    /// Keeps the control queue's kick fd in the poll set as the ring comes
    /// and goes. Holding our own reference keeps the fd open until it is
    /// unregistered.
    fn sync_ctrl_kick(&mut self, epoll: &Epoll) {
        let wanted = self.backend.ctrl_kick();
        let unchanged = match (&self.ctrl_kick, &wanted) {
            (Some(mine), Some(kick)) => Arc::ptr_eq(mine, kick),
            (None, None) => true,
            _ => false,
        };
        if unchanged {
            return;
        }
        if let Some(old) = self.ctrl_kick.take() {
            let _ = epoll.delete(old.as_fd());
        }
        if let Some(kick) = wanted {
            if epoll
                .add(
                    kick.as_fd(),
                    EpollEvent::new(EpollFlags::EPOLLIN, CTRL_KICK),
                )
                .is_ok()
            {
                self.ctrl_kick = Some(kick);
            }
            // Commands may already be waiting.
            self.backend.process_ctrl_queue();
        }
    }

    fn accept_api(&mut self, epoll: &Epoll) {
        let Some(listener) = &self.api_listener else {
            return;
        };
        let Ok((stream, _)) = listener.accept() else {
            return;
        };
        if let Err(why) = crate::hardening::peer::same_user(&stream) {
            warn!("API client refused: {why}");
            return;
        }
        let Ok(client) = ApiClient::new(stream) else {
            return;
        };
        let slot = self
            .api_clients
            .iter()
            .position(Option::is_none)
            .unwrap_or(self.api_clients.len());
        if epoll
            .add(
                client.stream.as_fd(),
                EpollEvent::new(EpollFlags::EPOLLIN, API_CLIENT + slot as u64),
            )
            .is_err()
        {
            return;
        }
        if slot == self.api_clients.len() {
            self.api_clients.push(Some(client));
        } else {
            self.api_clients[slot] = Some(client);
        }
    }

    fn serve_api(&mut self, slot: usize, epoll: &Epoll) {
        let Some(Some(client)) = self.api_clients.get_mut(slot) else {
            return;
        };
        let Some(lines) = client.read_lines() else {
            let _ = epoll.delete(client.stream.as_fd());
            self.api_clients[slot] = None;
            return;
        };
        for line in lines.into_iter().filter(|l| !l.is_empty()) {
            let mut ctx = ApiContext {
                backend: &mut self.backend,
                runtime: &self.runtime,
                connected: !self.frontends.is_empty(),
                handover_under_way: self.handover.is_some() || self.handover_request.is_some(),
                handover: None,
            };
            let reply = api::handle_line(&line, &mut ctx);
            if let Some(request) = ctx.handover.take() {
                // Answered once the handover is over (after this event).
                self.handover_request = Some((request, slot));
                return;
            }
            let Some(Some(client)) = self.api_clients.get_mut(slot) else {
                return;
            };
            if client.reply(&reply).is_err() {
                let _ = epoll.delete(client.stream.as_fd());
                self.api_clients[slot] = None;
                return;
            }
        }
    }
}

/// The API's answer to a handover that went through.
fn handover_reply(report: &HandoverReport) -> serde_json::Value {
    let micros = |d: Duration| d.as_micros() as u64;
    serde_json::json!({
        "ok": true,
        "downtime_us": report.downtime.map(micros),
        "prepare_us": report.prepared_in.map(micros),
        "to": report.to,
        "fds": report.fds,
        "phases_us": report
            .phases
            .iter()
            .map(|(name, took)| (name.to_string(), micros(*took).into()))
            .collect::<serde_json::Map<_, _>>(),
    })
}

/// Replies as the protocol asks: a body for GET requests, also when they
/// failed (`request::failure_body`); otherwise an ack (0 ok, 1 failed) only
/// when REPLY_ACK was negotiated and requested.
fn answer(
    sock: BorrowedFd<'_>,
    header: wire::Header,
    ring: Option<u32>,
    outcome: Outcome,
    reply_ack: bool,
) -> Result<(), wire::WireError> {
    let failure_body = || request::failure_body(header.request, ring);
    match outcome {
        Outcome::Reply(body) => wire::reply(sock, header.request, &body),
        Outcome::Failed(_) if failure_body().is_some() => {
            wire::reply(sock, header.request, &failure_body().unwrap_or_default())
        }
        Outcome::Ok if header.needs_reply() && reply_ack => {
            wire::reply(sock, header.request, &0u64.to_ne_bytes())
        }
        Outcome::Failed(_) if header.needs_reply() && reply_ack => {
            wire::reply(sock, header.request, &1u64.to_ne_bytes())
        }
        _ => Ok(()),
    }
}
