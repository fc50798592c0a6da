//! The TAP device going away under a running datapath (`ip link del`, or
//! its namespace deleted).
//!
//! The queues' fds stay open, but the kernel has detached them: reads and
//! writes fail with `EBADFD` and the fds poll as errors, for good. Left
//! alone, a datapath thread would retry the dead queue a thousand times a
//! second and nobody would hear of it. The first thread to see it raises
//! this alarm once; the control thread, which watches `fd()`, takes the
//! guest's link down and says so, and every thread stops reading its queue.

use super::notify;
use nix::sys::eventfd::{EfdFlags, EventFd};
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicBool, Ordering};

pub struct TapGone {
    gone: AtomicBool,
    alert: EventFd,
}

impl TapGone {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            gone: AtomicBool::new(false),
            alert: EventFd::from_value_and_flags(0, EfdFlags::EFD_NONBLOCK | EfdFlags::EFD_CLOEXEC)
                .map_err(std::io::Error::from)?,
        })
    }

    /// A datapath thread found its queue detached by the kernel. Only the
    /// first call signals.
    pub fn raise(&self) {
        if !self.gone.swap(true, Ordering::AcqRel) {
            notify::signal(self.alert.as_fd());
        }
    }

    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire)
    }

    /// Readable once the alarm is raised (the control thread's epoll).
    pub fn fd(&self) -> BorrowedFd<'_> {
        self.alert.as_fd()
    }

    /// Consumes the wake-up; true when the TAP is gone.
    pub fn acknowledge(&self) -> bool {
        notify::drain(self.alert.as_fd());
        self.is_gone()
    }
}
