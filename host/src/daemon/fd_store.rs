//! The service manager's file-descriptor store (systemd's `FDSTORE=1`,
//! `FileDescriptorStoreMax=`): where every fd of the device, and a state
//! record describing them (`record.rs`), outlive the sandnic process.
//!
//! Why: a crash (a seccomp kill, a panic, the OOM killer) closes every fd
//! a process holds. The frontend then sees its connection close, QEMU
//! takes the guest's link down, and the TAP loses its carrier with its
//! last queue. With the fds in the store, the manager restarts sandnic with
//! them (`LISTEN_FDS`), the connection never closes, and the new process
//! picks the device up where the guest's rings say (`serve::restart`).
//!
//! What the manager does, and what this module does about it:
//!
//! - It keeps one copy of an open file, under the first name it was given
//!   (two memory regions often come on one memfd). So each fd is compared
//!   with those already stored (`kcmp`), a duplicate is not stored again,
//!   and the record maps roles to names, a name to several roles if need
//!   be.
//! - It hands fds back in an order of its own: they are matched by name.
//! - It drops a stored fd that reports POLLHUP or POLLERR unless it was
//!   stored with `FDPOLL=0`. A detached TAP queue reports POLLERR, so TAP
//!   queues are stored with `FDPOLL=0`.
//! - It keeps a stored fd open after sandnic closes its own copy, and says
//!   nothing when the store is full or a name is bad. So everything no
//!   longer used is removed (`FDSTOREREMOVE=1`), by its name, and a store
//!   too small is reported here, once.
//! - Names are new for every fd (`sandnic-PID-N`): a name is never reused
//!   for another file, so a record always names what it meant, and a
//!   handover's two processes never name alike.

use super::notify::Notifier;
use super::record::{Record, RecordFile};
use crate::backend::handover::FdRole;
use crate::handover::state::Offer;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd, RawFd};
use std::sync::Arc;
use tracing::warn;

/// The stored name of a state record starts with this.
pub const RECORD_PREFIX: &str = "sandnic-record-";
/// Every other name sandnic stores starts with this.
pub const NAME_PREFIX: &str = "sandnic-";

/// How many fds a device stores at most, for `FileDescriptorStoreMax=`:
/// per queue pair a TAP queue and two rings' kick, call and err (7), the
/// control queue's three, per memory region one (QEMU sends up to 8 on
/// x86), the connection, the backend channel, the listening and API
/// sockets and the record (5).
pub fn fds_needed(pairs: u16, regions: usize) -> usize {
    7 * usize::from(pairs) + 3 + regions + 5
}

/// One fd in the store: its name, and a copy of it to tell a new fd that
/// is the same open file.
struct Stored {
    name: String,
    fd: OwnedFd,
}

/// The fds this process keeps in the store, and the record.
pub struct FdStore {
    notifier: Arc<Notifier>,
    /// `FileDescriptorStoreMax=`, as `$FDSTORE` or `--fd-store` gives it.
    limit: usize,
    record: RecordFile,
    record_name: String,
    /// The record's fd is in the store (not after `empty`, until the next
    /// `sync`).
    record_stored: bool,
    stored: Vec<Stored>,
    next_name: u64,
    /// When processes started from this record (see `Record::restarts`).
    restarts: Vec<u64>,
    /// Said once: the store cannot hold the device.
    said_too_small: bool,
    /// What the record's busy byte says now, to skip writing it again.
    busy: std::cell::Cell<bool>,
}

impl FdStore {
    /// A store for a device this process set up: a new record, stored at
    /// once.
    pub fn create(notifier: Arc<Notifier>, limit: usize) -> std::io::Result<Self> {
        let record = RecordFile::create()?;
        let record_name = format!("{RECORD_PREFIX}{}", std::process::id());
        notifier.store_fd(&record_name, record.fd(), true)?;
        Ok(Self {
            notifier,
            limit,
            record,
            record_name,
            record_stored: true,
            stored: Vec::new(),
            next_name: 0,
            restarts: Vec::new(),
            said_too_small: false,
            busy: std::cell::Cell::new(false),
        })
    }

    /// The store a restarted process took over: the record it rebuilt
    /// from, stored under `record_name`, and every other fd it found in
    /// the store (what the device does not use is removed at the first
    /// `sync`).
    pub fn adopt(
        notifier: Arc<Notifier>,
        limit: usize,
        (record, record_name): (RecordFile, String),
        found: Vec<(String, OwnedFd)>,
        restarts: Vec<u64>,
    ) -> Self {
        Self {
            notifier,
            limit,
            record,
            record_name,
            record_stored: true,
            stored: found
                .into_iter()
                .map(|(name, fd)| Stored { name, fd })
                .collect(),
            next_name: 0,
            restarts,
            said_too_small: false,
            busy: std::cell::Cell::new(false),
        }
    }

    /// Brings the store in line with the device: stores each fd it does
    /// not hold yet, writes the record naming them all, then removes what
    /// the record no longer names. In that order, a death at any point
    /// leaves a record whose names are all in the store. True when the
    /// record now describes the device.
    pub fn sync(&mut self, offer: Offer, fds: &[(FdRole, RawFd)], device_state: Vec<u8>) -> bool {
        if fds.len() + 1 > self.limit && !self.said_too_small {
            warn!(
                needed = fds.len() + 1,
                limit = self.limit,
                "the service manager's fd store is too small for this device (FileDescriptorStoreMax=): a restart will close the frontend's connection"
            );
            self.said_too_small = true;
        }
        let mut names = Vec::with_capacity(fds.len());
        for &(role, fd) in fds {
            // SAFETY: `fd` is open for this call: the caller's device holds
            // it (`source::describe_device` lists live fds only).
            let fd = unsafe { BorrowedFd::borrow_raw(fd) };
            match self.name_of(fd, role) {
                Some(name) => names.push((role, name)),
                None => return false,
            }
        }
        let record = Record {
            offer,
            device_state,
            names,
            restarts: self.restarts.clone(),
        };
        if let Err(e) = self.record.write(&record) {
            warn!("writing the state record: {e}");
            return false;
        }
        if !self.record_stored {
            match self
                .notifier
                .store_fd(&self.record_name, self.record.fd(), true)
            {
                Ok(()) => self.record_stored = true,
                Err(e) => warn!("storing the state record: {e}"),
            }
        }
        let kept: Vec<&str> = record.names.iter().map(|(_, n)| n.as_str()).collect();
        let (keep, gone): (Vec<_>, Vec<_>) = std::mem::take(&mut self.stored)
            .into_iter()
            .partition(|s| kept.contains(&s.name.as_str()));
        self.stored = keep;
        for stored in gone {
            self.remove(&stored.name);
        }
        true
    }

    /// The name `fd` is stored under, storing it first if no stored fd is
    /// the same open file. None if it cannot be stored.
    fn name_of(&mut self, fd: BorrowedFd<'_>, role: FdRole) -> Option<String> {
        if let Some(s) = self.stored.iter().find(|s| same_file(s.fd.as_fd(), fd)) {
            return Some(s.name.clone());
        }
        let name = format!("{NAME_PREFIX}{}-{}", std::process::id(), self.next_name);
        self.next_name += 1;
        // A detached TAP queue polls as an error: stored so that the
        // manager keeps it anyway.
        let poll = !matches!(role, FdRole::TapQueue(_));
        let copy = match fd.try_clone_to_owned() {
            Ok(copy) => copy,
            Err(e) => {
                warn!(?role, "keeping a copy of an fd to store: {e}");
                return None;
            }
        };
        if let Err(e) = self.notifier.store_fd(&name, fd, poll) {
            warn!(?role, "storing an fd with the service manager: {e}");
            return None;
        }
        self.stored.push(Stored {
            name: name.clone(),
            fd: copy,
        });
        Some(name)
    }

    fn remove(&self, name: &str) {
        if let Err(e) = self.notifier.remove_fds(name) {
            warn!(name, "removing an fd from the service manager's store: {e}");
        }
    }

    /// Says whether the record may be behind the device (see
    /// `RecordFile::set_busy`): set as a frontend message is taken and
    /// while a VM migration is under way, cleared by the reactor once a
    /// `sync` wrote the record.
    pub fn set_busy(&self, busy: bool) {
        if self.busy.replace(busy) != busy {
            self.record.set_busy(busy);
        }
    }

    /// Takes everything out of the store, record included: the device is
    /// closed for good, or about to go to another process. A handover
    /// empties the store before its pause, so that the destination's fds,
    /// which are the same open files, are not merged into names this
    /// process then removes; if the handover fails, the next `sync` stores
    /// everything again, under new names.
    pub fn empty(&mut self) {
        for stored in std::mem::take(&mut self.stored) {
            self.remove(&stored.name);
        }
        if std::mem::take(&mut self.record_stored) {
            self.remove(&self.record_name);
        }
    }
}

/// Whether `a` and `b` are the same open file (`kcmp` KCMP_FILE): what the
/// manager merges, whatever the fd numbers.
pub fn same_file(a: BorrowedFd<'_>, b: BorrowedFd<'_>) -> bool {
    const KCMP_FILE: libc::c_long = 0;
    let pid = libc::c_long::from(std::process::id() as i32);
    // SAFETY: kcmp only compares kernel objects of this process; the fds
    // are borrowed, open for the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kcmp,
            pid,
            pid,
            KCMP_FILE,
            a.as_raw_fd() as libc::c_long,
            b.as_raw_fd() as libc::c_long,
        )
    };
    r == 0
}

/// The limit the service manager set: `$FDSTORE` (systemd 254 and later
/// pass `FileDescriptorStoreMax=` so), else `--fd-store N` (older systemd,
/// such as Debian 12's 252). Zero: no store.
pub fn limit_from_env(flag: Option<usize>) -> usize {
    let from_env = std::env::var("FDSTORE").ok().and_then(|v| v.parse().ok());
    std::env::remove_var("FDSTORE");
    from_env.or(flag).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_same_open_file_is_told_from_another() {
        let (a, b) = std::os::unix::net::UnixStream::pair().unwrap();
        let a_again = a.try_clone().unwrap();
        assert!(same_file(a.as_fd(), a_again.as_fd()));
        assert!(!same_file(a.as_fd(), b.as_fd()));
    }

    #[test]
    fn the_store_limit_counts_every_fd_of_a_device() {
        // One pair, two memory regions: 7 + 3 + 2 + 5.
        assert_eq!(fds_needed(1, 2), 17);
        assert_eq!(fds_needed(16, 8), 128);
    }
}
