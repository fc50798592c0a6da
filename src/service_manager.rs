//! A stand-in for systemd's service manager, as far as sandnic uses it:
//! it starts `sandnic serve`, listens on a `NOTIFY_SOCKET`, keeps an fd
//! store, and restarts the service when it dies, passing the stored fds
//! back. It does what systemd documents for the fd store
//! (`sd_pid_notify_with_fds(3)`, `systemd.service(5)`), the parts sandnic's
//! restart depends on:
//!
//! - `FDSTORE=1` with `FDNAME=` keeps the fds sent; an fd that is the same
//!   open file as one stored is not stored again (the first name stays);
//! - a stored fd that reports POLLHUP or POLLERR is dropped, unless it was
//!   stored with `FDPOLL=0`;
//! - `FDSTOREREMOVE=1` with `FDNAME=` drops every fd of that name;
//! - more fds than `FileDescriptorStoreMax=` are dropped, silently;
//! - a restart passes the stored fds as `LISTEN_FDS`, named in
//!   `LISTEN_FDNAMES`, starting at fd 3, with `LISTEN_PID` the new
//!   process, and `FDSTORE` the limit (systemd 254 and later);
//! - `RestartSec=0`, and a start limit (5 starts within 10 s, systemd's
//!   default): past it the service fails and the store is emptied.

use crate::harness::{NetNs, ScratchDir};
use anyhow::Context;
use std::io::IoSliceMut;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const START_LIMIT_BURST: usize = 5;
const START_LIMIT_INTERVAL: Duration = Duration::from_secs(10);

/// One fd in the store.
struct Stored {
    name: String,
    fd: OwnedFd,
    poll: bool,
}

/// What the manager knows, shared with the test.
#[derive(Default)]
struct State {
    stored: Vec<Stored>,
    /// Start times of the service, oldest first.
    starts: Vec<Instant>,
    /// The service's current process.
    main_pid: Option<u32>,
    /// READY=1 messages so far, and when each came.
    ready: usize,
    ready_at: Vec<Instant>,
    /// The start limit was hit: no more restarts.
    failed: bool,
    /// Fds dropped because they polled as hung up or in error.
    dropped_on_poll: Vec<String>,
}

/// The stand-in, running `sandnic serve ARGS` in a network namespace.
pub struct ServiceManager {
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    log: PathBuf,
}

struct Service {
    ns: String,
    args: Vec<String>,
    notify_path: PathBuf,
    limit: usize,
    log: PathBuf,
}

impl ServiceManager {
    /// Starts the service (`sandnic serve ARGS`) with an fd store of
    /// `limit` fds, and waits for its first READY=1.
    pub fn start(
        ns: &NetNs,
        dir: &ScratchDir,
        args: &[&str],
        limit: usize,
    ) -> anyhow::Result<Self> {
        let notify_path = dir.path("notify.sock");
        let notify = UnixDatagram::bind(&notify_path).context("binding the notify socket")?;
        notify.set_nonblocking(true)?;
        let service = Service {
            ns: ns.name.clone(),
            args: args.iter().map(|s| s.to_string()).collect(),
            notify_path,
            limit,
            log: dir.path("sandnic.log"),
        };
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let log = service.log.clone();
        let thread = {
            let (state, stop) = (state.clone(), stop.clone());
            std::thread::spawn(move || manage(service, notify, state, stop))
        };
        let me = Self {
            state,
            stop,
            thread: Some(thread),
            log,
        };
        me.wait_ready(1, Duration::from_secs(30))
            .with_context(|| format!("the service never said READY=1: {}", me.log()))?;
        Ok(me)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Waits until the service said READY=1 `count` times in all.
    pub fn wait_ready(&self, count: usize, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        while self.lock().ready < count {
            anyhow::ensure!(Instant::now() < deadline, "timed out");
            anyhow::ensure!(!self.lock().failed, "the service failed (start limit)");
            std::thread::sleep(Duration::from_millis(5));
        }
        Ok(())
    }

    /// When each READY=1 came.
    pub fn ready_times(&self) -> Vec<Instant> {
        self.lock().ready_at.clone()
    }

    pub fn main_pid(&self) -> Option<u32> {
        self.lock().main_pid
    }

    /// Sends `signal` to the service's process (SIGKILL: a crash).
    pub fn signal_main(&self, signal: nix::sys::signal::Signal) {
        if let Some(pid) = self.main_pid() {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal);
        }
    }

    /// How many times the service was started.
    pub fn starts(&self) -> usize {
        self.lock().starts.len()
    }

    pub fn failed(&self) -> bool {
        self.lock().failed
    }

    /// The names in the store, sorted.
    pub fn stored_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.lock().stored.iter().map(|s| s.name.clone()).collect();
        names.sort();
        names
    }

    /// Names of fds dropped for polling as hung up or in error.
    pub fn dropped_on_poll(&self) -> Vec<String> {
        self.lock().dropped_on_poll.clone()
    }

    /// Every process's stderr, one after the other.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ServiceManager {
    /// Stops the service (SIGTERM, as `systemctl stop`) and empties the
    /// store.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        self.signal_main(nix::sys::signal::Signal::SIGTERM);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The manager's loop: notifications, the store's polling, the service's
/// exits and restarts.
fn manage(service: Service, notify: UnixDatagram, state: Arc<Mutex<State>>, stop: Arc<AtomicBool>) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let mut child = start(&service, &mut lock());
    let mut stopping_since: Option<Instant> = None;
    loop {
        receive_notifications(&notify, &service, &mut lock());
        drop_hung_up(&mut lock());
        if stop.load(Ordering::Acquire) && stopping_since.is_none() {
            stopping_since = Some(Instant::now());
        }
        let (exited, failed) = main_gone(&mut child, lock().main_pid);
        if let Some(since) = stopping_since {
            if exited || since.elapsed() > Duration::from_secs(5) {
                if let Some(c) = &mut child {
                    let _ = c.kill();
                    let _ = c.wait();
                }
                lock().stored.clear();
                return;
            }
        } else if exited && failed {
            // Restart=on-failure: a clean exit (a handover's source, whose
            // successor said MAINPID=) is no reason to start another.
            child = restart(&service, &mut lock());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Whether the service's main process is gone. That is the process the
/// manager started until another one says `MAINPID=` (a handover's
/// destination, which NotifyAccess=all lets systemd follow); the one it
/// started may then exit without ending the service.
/// Returns (gone, failed): whether it exited other than cleanly (a
/// process the manager did not start is taken to have failed: its status
/// is not the manager's to read).
fn main_gone(child: &mut Option<Child>, main_pid: Option<u32>) -> (bool, bool) {
    let status = child.as_mut().and_then(|c| c.try_wait().ok().flatten());
    match main_pid {
        Some(pid) if child.as_ref().is_none_or(|c| c.id() != pid) => {
            let gone = !alive(pid);
            (gone, gone)
        }
        _ => match (child.is_some(), status) {
            (false, _) => (true, false),
            (true, Some(status)) => (true, !status.success()),
            (true, None) => (false, false),
        },
    }
}

/// A process that runs (not a zombie): one the manager did not start is
/// not its to reap.
fn alive(pid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    // "pid (comm) S ...": the state follows the last ')'.
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.trim_start().chars().next());
    !matches!(state, None | Some('Z') | Some('X'))
}

/// Restart=always, RestartSec=0, within the start limit.
fn restart(service: &Service, st: &mut State) -> Option<Child> {
    if st.failed {
        return None;
    }
    let now = Instant::now();
    let recent = st
        .starts
        .iter()
        .filter(|&&t| now.duration_since(t) < START_LIMIT_INTERVAL)
        .count();
    if recent >= START_LIMIT_BURST {
        st.failed = true;
        st.stored.clear();
        st.main_pid = None;
        return None;
    }
    start(service, st)
}

/// Starts the service with the stored fds.
fn start(service: &Service, st: &mut State) -> Option<Child> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&service.log)
        .ok()?;
    let fds: Vec<RawFd> = st.stored.iter().map(|s| s.fd.as_raw_fd()).collect();
    let names: Vec<&str> = st.stored.iter().map(|s| s.name.as_str()).collect();
    let mut cmd = std::process::Command::new("ip");
    // LISTEN_PID must be the service's pid: the shell sets it, then
    // becomes sandnic (exec keeps the pid).
    cmd.args(["netns", "exec", &service.ns, "sh", "-c"])
        .arg(r#"export LISTEN_PID=$$; exec "$@""#)
        .arg("sh")
        .arg(crate::harness::sandnic_binary())
        .arg("serve")
        .args(&service.args)
        .env("NOTIFY_SOCKET", &service.notify_path)
        .env("FDSTORE", service.limit.to_string())
        .env("SANDNIC_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(log.try_clone().ok()?)
        .stderr(log);
    if !fds.is_empty() {
        cmd.env("LISTEN_FDS", fds.len().to_string())
            .env("LISTEN_FDNAMES", names.join(":"));
    }
    // SAFETY: between fork and exec this only calls fcntl and dup2 (both
    // async-signal-safe) on fds this process holds open, read from a Vec
    // allocated before the fork.
    unsafe {
        cmd.pre_exec(move || pass_fds(&fds));
    }
    let child = crate::harness::spawn(cmd).ok()?;
    st.main_pid = Some(child.id());
    st.starts.push(Instant::now());
    Some(child)
}

/// Puts `fds` at 3, 4, … in the child: all first moved out of the way
/// (above 1000, close-on-exec: the service must not inherit these copies,
/// or a file it lets go of would stay open), so that no target number is
/// one still to be moved. dup2 leaves the targets open across exec.
fn pass_fds(fds: &[RawFd]) -> std::io::Result<()> {
    const OUT_OF_THE_WAY: RawFd = 1000;
    let mut high = [0 as RawFd; 1024];
    let high = &mut high[..fds.len().min(1024)];
    for (slot, &fd) in high.iter_mut().zip(fds) {
        // SAFETY: plain fcntl on an open fd (see the caller).
        *slot = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, OUT_OF_THE_WAY) };
        if *slot < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    for (i, &fd) in high.iter().enumerate() {
        // SAFETY: plain dup2 of an fd just made (see the caller).
        if unsafe { libc::dup2(fd, 3 + i as RawFd) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Reads every pending notification.
fn receive_notifications(notify: &UnixDatagram, service: &Service, st: &mut State) {
    use nix::sys::socket::{recvmsg, ControlMessageOwned, MsgFlags, UnixAddr};
    loop {
        let mut buf = [0u8; 4096];
        let mut space = nix::cmsg_space!([RawFd; 64]);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let Ok(msg) = recvmsg::<UnixAddr>(
            notify.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        ) else {
            return;
        };
        let mut fds = Vec::new();
        for cmsg in msg.cmsgs().into_iter().flatten() {
            if let ControlMessageOwned::ScmRights(raw) = cmsg {
                // SAFETY: the kernel just gave us these fds.
                fds.extend(
                    raw.into_iter()
                        .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                );
            }
        }
        let n = msg.bytes;
        let text = String::from_utf8_lossy(&buf[..n]).to_string();
        apply(&text, fds, service.limit, st);
    }
}

/// One notification: its fields, and the fds that came with it.
fn apply(text: &str, fds: Vec<OwnedFd>, limit: usize, st: &mut State) {
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
    };
    if field("READY") == Some("1") {
        st.ready += 1;
        st.ready_at.push(Instant::now());
    }
    if let Some(pid) = field("MAINPID").and_then(|p| p.parse().ok()) {
        st.main_pid = Some(pid);
    }
    let name = field("FDNAME").unwrap_or("stored").to_string();
    if field("FDSTOREREMOVE") == Some("1") {
        st.stored.retain(|s| s.name != name);
    }
    if field("FDSTORE") == Some("1") {
        let poll = field("FDPOLL") != Some("0");
        for fd in fds {
            let duplicate = st
                .stored
                .iter()
                .any(|s| sandnic_host::daemon::fd_store::same_file(s.fd.as_fd(), fd.as_fd()));
            if !duplicate && st.stored.len() < limit {
                st.stored.push(Stored {
                    name: name.clone(),
                    fd,
                    poll,
                });
            }
        }
    }
}

/// Drops stored fds that poll as hung up or in error (unless FDPOLL=0).
fn drop_hung_up(st: &mut State) {
    let mut dropped = Vec::new();
    st.stored.retain(|s| {
        if !s.poll || !hung_up(s.fd.as_fd()) {
            return true;
        }
        dropped.push(s.name.clone());
        false
    });
    st.dropped_on_poll.extend(dropped);
}

fn hung_up(fd: BorrowedFd<'_>) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: 0,
        revents: 0,
    };
    // SAFETY: one pollfd, valid for the call.
    let n = unsafe { libc::poll(&mut pfd, 1, 0) };
    n > 0 && pfd.revents & (libc::POLLHUP | libc::POLLERR) != 0
}
