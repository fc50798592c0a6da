//! Client mode (`serve --connect PATH`): sandnic dials a frontend that
//! listens — QEMU's `-chardev socket,…,server=on,wait=off`, libvirt's
//! `<source mode='server'>`, the shape of OVS-DPDK's `dpdkvhostuserclient`
//! ports — and dials again whenever the connection drops. Either side can
//! then restart and find the other: a new sandnic dials the QEMU that kept
//! running, and a sandnic whose QEMU went away waits for the next one.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use tracing::{debug, info};

/// The first retry after a failed dial: a frontend that is restarting
/// usually listens again within milliseconds.
const FIRST_RETRY: Duration = Duration::from_millis(20);
/// The retries double up to this. It bounds how long a frontend that
/// comes back waits for sandnic (half a second), at the cost of one failed
/// `connect` twice a second while there is none — nothing next to a VM.
const LONGEST_RETRY: Duration = Duration::from_millis(500);

pub struct Dialer {
    path: PathBuf,
    /// When to dial next; None while connected.
    next: Option<Instant>,
    backoff: Duration,
    failures: u32,
}

impl Dialer {
    /// A dialer that dials at once (or, `connected`, once that connection
    /// drops).
    pub fn new(path: PathBuf, connected: bool) -> Self {
        Self {
            path,
            next: (!connected).then(Instant::now),
            backoff: FIRST_RETRY,
            failures: 0,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// When the next dial is due (None while connected).
    pub fn due(&self) -> Option<Instant> {
        self.next
    }

    /// The connection dropped: dial again at once.
    pub fn connection_lost(&mut self) {
        self.next = Some(Instant::now());
        self.backoff = FIRST_RETRY;
    }

    /// Dials if a dial is due at `now`; the new connection, if it took.
    pub fn dial(&mut self, now: Instant) -> Option<UnixStream> {
        if self.next.is_none_or(|due| now < due) {
            return None;
        }
        match UnixStream::connect(&self.path) {
            Ok(stream) => {
                info!(path = %self.path.display(), failed_dials = self.failures, "connected to the frontend");
                self.next = None;
                self.failures = 0;
                self.backoff = FIRST_RETRY;
                Some(stream)
            }
            Err(e) => {
                if self.failures == 0 {
                    info!(
                        path = %self.path.display(),
                        "no frontend listening ({e}); dialling again, every {} ms at most",
                        LONGEST_RETRY.as_millis()
                    );
                } else {
                    debug!(path = %self.path.display(), "dial failed: {e}");
                }
                self.failures += 1;
                self.next = Some(now + self.backoff);
                self.backoff = (self.backoff * 2).min(LONGEST_RETRY);
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    #[test]
    fn retries_back_off_to_a_bound_and_a_listener_is_found() {
        let dir = std::env::temp_dir().join(format!("sandnic-dialer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("fe.sock");
        let _ = std::fs::remove_file(&path);
        let mut dialer = Dialer::new(path.clone(), false);
        let mut now = Instant::now();
        let mut waits = Vec::new();
        for _ in 0..8 {
            assert!(dialer.dial(now).is_none());
            let due = dialer.due().unwrap();
            waits.push(due - now);
            assert!(dialer.dial(due - Duration::from_millis(1)).is_none());
            now = due;
        }
        assert_eq!(waits[0], FIRST_RETRY);
        assert_eq!(waits[1], FIRST_RETRY * 2);
        assert_eq!(*waits.last().unwrap(), LONGEST_RETRY);
        let listener = UnixListener::bind(&path).unwrap();
        assert!(dialer.dial(now).is_some(), "dials once due");
        assert_eq!(dialer.due(), None, "connected: nothing due");
        assert!(listener.accept().is_ok());
        dialer.connection_lost();
        assert!(
            dialer.due().unwrap() <= Instant::now(),
            "dials again at once"
        );
        assert!(dialer.dial(Instant::now()).is_some());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
