//! The control thread's reactor: one epoll set over the vhost-user
//! listener and the frontends' connections, the control queue's kick, the
//! API's listener and clients, the signals, and a handover's destination.
//! Each event goes to its owner; the reactor only routes.

use super::dialer::Dialer;
use super::handover_driver::{Ended, HandoverDriver};
use super::setup::{Serving, SocketFiles};
use crate::api::{self, ApiClient, ApiContext};
use crate::backend::NetBackend;
use crate::daemon::fd_store::FdStore;
use crate::datapath::Datapath;
use crate::handover::source;
use crate::sandbox::Runtime;
use crate::vhost_user::connection::{FrontendConnection, SessionId};
use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use nix::sys::signalfd::SignalFd;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::{info, warn};

/// Why the reactor stopped.
pub enum Exit {
    Signal,
    HandedOver,
}

/// What an epoll event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Token {
    Listener,
    CtrlKick,
    ApiListener,
    Signals,
    /// The destination of a handover answered.
    Destination,
    /// The datapath found the TAP device deleted (`datapath::tap_gone`).
    TapGone,
    ApiClient(usize),
    Frontend(SessionId),
}

/// Frontend tokens start here (their session id added); API clients are
/// numbered below it.
const FRONTEND_BASE: u64 = 1 << 32;
const API_CLIENT_BASE: u64 = 100;

impl Token {
    fn encode(self) -> u64 {
        match self {
            Self::Listener => 1,
            Self::CtrlKick => 3,
            Self::ApiListener => 4,
            Self::Signals => 5,
            Self::Destination => 6,
            Self::TapGone => 7,
            Self::ApiClient(slot) => API_CLIENT_BASE + slot as u64,
            Self::Frontend(session) => FRONTEND_BASE + session,
        }
    }

    fn decode(raw: u64) -> Option<Self> {
        Some(match raw {
            1 => Self::Listener,
            3 => Self::CtrlKick,
            4 => Self::ApiListener,
            5 => Self::Signals,
            6 => Self::Destination,
            7 => Self::TapGone,
            r if r >= FRONTEND_BASE => Self::Frontend(r - FRONTEND_BASE),
            r if r >= API_CLIENT_BASE => Self::ApiClient((r - API_CLIENT_BASE) as usize),
            _ => return None,
        })
    }

    fn event(self) -> EpollEvent {
        EpollEvent::new(EpollFlags::EPOLLIN, self.encode())
    }
}

pub struct Server {
    backend: NetBackend,
    runtime: Arc<Runtime>,
    listener: Option<UnixListener>,
    /// Client mode: sandnic dials the frontend instead of listening.
    dialer: Option<Dialer>,
    api_listener: Option<UnixListener>,
    signals: SignalFd,
    /// At most two: a running VMM and, during a local migration, its
    /// successor.
    frontends: Vec<FrontendConnection>,
    api_clients: Vec<Option<ApiClient>>,
    /// The control queue's kick fd as registered in epoll.
    ctrl_kick: Option<Arc<OwnedFd>>,
    socket_files: SocketFiles,
    handover: HandoverDriver,
    /// The service manager's fd store, kept current (`daemon::fd_store`).
    store: Option<FdStore>,
}

impl Server {
    pub fn new(
        serving: Serving,
        runtime: Arc<Runtime>,
        signals: SignalFd,
        store: Option<FdStore>,
    ) -> Self {
        let Serving {
            mut backend,
            listener,
            api_listener,
            connection,
            connect,
            socket_files,
        } = serving;
        let frontends: Vec<_> = connection
            .and_then(|stream| FrontendConnection::new(backend.connect()?, stream).ok())
            .into_iter()
            .collect();
        let dialer = connect.map(|path| Dialer::new(path, !frontends.is_empty()));
        Self {
            backend,
            runtime,
            listener,
            dialer,
            api_listener,
            signals,
            frontends,
            api_clients: Vec::new(),
            ctrl_kick: None,
            socket_files,
            handover: HandoverDriver::default(),
            store,
        }
    }

    /// Takes everything this process stored out of the service manager's
    /// store: the device is closed or went to another process.
    pub fn empty_store(&mut self) {
        if let Some(store) = &mut self.store {
            store.empty();
        }
    }

    /// Brings the fd store and its record in line with the device: after
    /// every event (a new fd, a negotiated feature, a control command, a
    /// swap), and then says the record is current (`FdStore::set_busy`).
    /// Left as it was while a handover is under way (the store is emptied
    /// at its pause). While a VM migration is under way the record is
    /// marked behind: what a restart would need then (a second frontend,
    /// the dirty log) is not in it, and a restart in that window closes
    /// the connection instead of serving the source VMM unlogged.
    pub fn sync_store(&mut self) {
        let Some(store) = &self.store else {
            return;
        };
        if self.backend.handover_blocker().is_some() {
            store.set_busy(true);
            return;
        }
        if self.handover.under_way() {
            return;
        }
        let Some(sockets) = self.sockets() else {
            return;
        };
        let (offer, fds) = source::describe_device(&self.backend, sockets, false);
        let state = match self.backend.device_mut().save() {
            Ok(state) => state,
            Err(e) => {
                warn!("saving the device state for the fd store's record: {e}");
                return;
            }
        };
        if let Some(store) = &mut self.store {
            if store.sync(offer, &fds, state) {
                store.set_busy(false);
            }
        }
    }

    pub fn datapath(&self) -> &Datapath {
        self.backend.datapath()
    }

    /// Stops the driving session's rings for a clean exit.
    pub fn stop_for_exit(&mut self) -> usize {
        self.backend.stop_for_exit()
    }

    /// The socket files went with a handover: the destination removes them.
    pub fn forget_socket_files(&mut self) {
        self.socket_files.0.clear();
    }

    pub fn run(&mut self) -> anyhow::Result<Exit> {
        let epoll = Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC)?;
        if let Some(listener) = &self.listener {
            epoll.add(listener.as_fd(), Token::Listener.event())?;
        }
        for f in &self.frontends {
            epoll.add(f.stream().as_fd(), Token::Frontend(f.session).event())?;
        }
        epoll.add(self.signals.as_fd(), Token::Signals.event())?;
        epoll.add(
            self.backend.datapath().tap_gone().fd(),
            Token::TapGone.event(),
        )?;
        if let Some(api) = &self.api_listener {
            epoll.add(api.as_fd(), Token::ApiListener.event())?;
        }
        let mut events = [EpollEvent::empty(); 16];
        self.sync_store();
        loop {
            // Before every wait, not only after events: a destination of a
            // handover starts with the control queue already running, and a
            // command the driver sends before anything else wakes this loop
            // would otherwise wait unseen (Linux spins on it holding RTNL).
            self.sync_ctrl_kick(&epoll);
            self.dial_frontend(&epoll);
            let setup_due = self.backend.check_setup(Instant::now());
            let n = match epoll.wait(&mut events, self.wait_timeout(setup_due)) {
                Ok(n) => n,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(e) => return Err(e.into()),
            };
            let mut destination_answered = false;
            for event in &events[..n] {
                match Token::decode(event.data()) {
                    Some(Token::Signals) => {
                        info!("signal received, shutting down");
                        return Ok(Exit::Signal);
                    }
                    Some(Token::Listener) => self.accept_frontend(&epoll),
                    Some(Token::Destination) => destination_answered = true,
                    Some(Token::Frontend(session)) => self.serve_frontend(session, &epoll),
                    Some(Token::CtrlKick) => self.backend.process_ctrl_queue(),
                    Some(Token::TapGone) => self.backend.tap_alarm(),
                    Some(Token::ApiListener) => self.accept_api(&epoll),
                    Some(Token::ApiClient(slot)) => self.serve_api(slot, &epoll),
                    None => {}
                }
            }
            if let Some(ended) = self.handover.offer(&self.backend, self.sockets()) {
                self.answer_api(ended.client, &ended.reply);
            }
            if let Some(fd) = self.handover.destination() {
                let _ = epoll.add(fd, Token::Destination.event());
            }
            let out_of_time = self.handover.time_left().is_some_and(|t| t.is_zero());
            if (destination_answered || out_of_time) && self.finish_handover(&epoll) {
                return Ok(Exit::HandedOver);
            }
            self.sync_store();
        }
    }

    /// Sleep until an event, a handover's destination is out of time, a
    /// session's setup is due to be judged (`setup_due`), or (client mode)
    /// the next dial is due.
    fn wait_timeout(&self, setup_due: Option<Instant>) -> EpollTimeout {
        let now = Instant::now();
        let until = |due: Instant| due.saturating_duration_since(now);
        let dial = self.dialer.as_ref().and_then(Dialer::due).map(until);
        match [self.handover.time_left(), setup_due.map(until), dial]
            .into_iter()
            .flatten()
            .min()
        {
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
        if self.listener.is_none() && self.dialer.is_none() {
            return None;
        }
        Some(source::Sockets {
            connection: self.frontends.first().map(|f| f.stream().as_raw_fd()),
            listener: self.listener.as_ref().map(|l| l.as_raw_fd()),
            connect: self.dialer.as_ref().map(|d| d.path().to_owned()),
            api_listener: self.api_listener.as_ref().map(|l| l.as_raw_fd()),
            paths: self.socket_files.0.clone(),
        })
    }

    /// The destination answered the offer (or ran out of time): pause,
    /// commit, and answer the API client. True when the destination took
    /// over.
    fn finish_handover(&mut self, epoll: &Epoll) -> bool {
        if let Some(fd) = self.handover.destination() {
            let _ = epoll.delete(fd);
        }
        let sockets = self.sockets();
        // Before the pause: see `FdStore::empty` (stored again by the next
        // sync if the device stays here).
        self.empty_store();
        let Some(Ended {
            client,
            reply,
            handed_over,
        }) = self.handover.finish(&mut self.backend, sockets)
        else {
            self.sync_store();
            return false;
        };
        if !handed_over {
            // Stored again before the client hears the handover failed.
            self.sync_store();
        }
        self.answer_api(client, &reply);
        handed_over
    }

    fn answer_api(&mut self, client: usize, reply: &serde_json::Value) {
        if let Some(Some(c)) = self.api_clients.get_mut(client) {
            let _ = c.reply(reply);
        }
    }

    fn accept_frontend(&mut self, epoll: &Epoll) {
        let Some(listener) = &self.listener else {
            return;
        };
        match listener.accept() {
            Ok((stream, _)) => {
                self.adopt_frontend(stream, epoll);
            }
            Err(e) => warn!("accept: {e}"),
        }
    }

    /// Client mode: dials the frontend if no connection is up and a dial
    /// is due.
    fn dial_frontend(&mut self, epoll: &Epoll) {
        if !self.frontends.is_empty() {
            return;
        }
        let Some(dialer) = &mut self.dialer else {
            return;
        };
        let Some(stream) = dialer.dial(Instant::now()) else {
            return;
        };
        if !self.adopt_frontend(stream, epoll) {
            if let Some(dialer) = &mut self.dialer {
                dialer.connection_lost();
            }
        }
    }

    /// Serves a new frontend connection (accepted or dialled); false if it
    /// could not be.
    fn adopt_frontend(&mut self, stream: UnixStream, epoll: &Epoll) -> bool {
        let Some(session) = self.backend.connect() else {
            warn!("two frontends are connected already; refusing a third");
            return false;
        };
        self.backend.counters.frontends_accepted += 1;
        let connection = match FrontendConnection::new(session, stream) {
            Ok(connection) => connection,
            Err(e) => {
                warn!(session, "setting up the frontend connection: {e}");
                self.backend.disconnected(session);
                return false;
            }
        };
        if let Err(e) = epoll.add(
            connection.stream().as_fd(),
            Token::Frontend(session).event(),
        ) {
            warn!(session, "watching the frontend connection: {e}");
            self.backend.disconnected(session);
            return false;
        }
        let role = if self.frontends.is_empty() {
            "frontend"
        } else {
            "second frontend (standby until the first stops its rings or leaves)"
        };
        info!(session, "{role} connected");
        self.frontends.push(connection);
        true
    }

    /// Serves the message waiting on frontend `session`'s connection, and
    /// closes the connection if it is over.
    fn serve_frontend(&mut self, session: SessionId, epoll: &Epoll) {
        let Some(at) = self.frontends.iter().position(|f| f.session == session) else {
            return;
        };
        // Cleared by the next `sync_store`, once the record holds what
        // this message changed.
        if let Some(store) = &self.store {
            store.set_busy(true);
        }
        let served = self.frontends[at].serve_one(&mut self.backend);
        if let Err(why) = served {
            let connection = self.frontends.remove(at);
            connection.log_close(&why);
            let _ = epoll.delete(connection.stream().as_fd());
            self.backend.disconnected(session);
            if let (true, Some(dialer)) = (self.frontends.is_empty(), &mut self.dialer) {
                dialer.connection_lost();
            }
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
            if epoll.add(kick.as_fd(), Token::CtrlKick.event()).is_ok() {
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
            .add(client.stream.as_fd(), Token::ApiClient(slot).event())
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

    fn drop_api_client(&mut self, slot: usize, epoll: &Epoll) {
        if let Some(client) = self.api_clients.get_mut(slot).and_then(Option::take) {
            let _ = epoll.delete(client.stream.as_fd());
        }
    }

    fn serve_api(&mut self, slot: usize, epoll: &Epoll) {
        let Some(Some(client)) = self.api_clients.get_mut(slot) else {
            return;
        };
        let Some(lines) = client.read_lines() else {
            self.drop_api_client(slot, epoll);
            return;
        };
        for line in lines.into_iter().filter(|l| !l.is_empty()) {
            let mut ctx = ApiContext {
                backend: &mut self.backend,
                runtime: &self.runtime,
                connected: !self.frontends.is_empty(),
                handover_under_way: self.handover.under_way(),
                handover: None,
            };
            let reply = api::handle_line(&line, &mut ctx);
            if let Some(request) = ctx.handover.take() {
                // Answered once the handover is over (after this event).
                self.handover.ask(request, slot);
                return;
            }
            let replied = match self.api_clients.get_mut(slot) {
                Some(Some(client)) => client.reply(&reply).is_ok(),
                _ => return,
            };
            if !replied {
                self.drop_api_client(slot, epoll);
                return;
            }
        }
    }
}
