//! Every syscall each thread role may make, in one place, grouped with the
//! reason each group is there. Anything else is denied (the action depends
//! on the mode: trap, log). Argument conditions narrow what a syscall may
//! do where the arguments say it: no executable memory and no sockets for
//! the datapath, UNIX sockets only and TUN ioctls by number for the
//! control thread.

use crate::tap::{TUNSETCARRIER, TUNSETOFFLOAD, TUNSETQUEUE, TUNSETVNETHDRSZ};
use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};
use std::collections::BTreeMap;

/// What a thread does for its whole life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// vhost-user and API sockets, the control queue through the sandbox,
    /// hot swap (compiles a component: executable mappings), the handover
    /// source (a UNIX socket it connects), and what `serve --incoming`
    /// becomes once it took a device over.
    Control,
    /// One queue pair: readv/writev on its TAP queue and guest memory,
    /// eventfds, epoll.
    Datapath,
}

pub type Rules = BTreeMap<i64, Vec<SeccompRule>>;

/// The allowlist of `role`.
pub fn rules(role: Role) -> Rules {
    let mut rules = Rules::new();
    // Threads wait, sleep and take locks; signal frames return; a thread
    // ends with exit (its alternate signal stack unmapped first), the
    // process with exit_group (also after a violation report).
    allow(
        &mut rules,
        &[
            libc::SYS_futex,
            libc::SYS_sched_yield,
            libc::SYS_nanosleep,
            libc::SYS_clock_nanosleep,
            libc::SYS_clock_gettime,
            libc::SYS_gettid,
            libc::SYS_rt_sigprocmask,
            libc::SYS_rt_sigreturn,
            libc::SYS_sigaltstack,
            libc::SYS_restart_syscall,
            libc::SYS_exit,
            libc::SYS_exit_group,
        ],
    );
    // The allocator grows and returns memory; guest memory and logs that a
    // stopped ring released are unmapped by whichever thread drops them.
    allow(
        &mut rules,
        &[
            libc::SYS_brk,
            libc::SYS_munmap,
            libc::SYS_madvise,
            libc::SYS_mremap,
        ],
    );
    // Frames and notifications: TAP queues, eventfds and pipes (kick, call,
    // wake), the log on stderr; epoll sets are rebuilt as rings change.
    // Under an RX rate limit a TAP queue is asked whether a frame waits
    // (poll with no timeout) before the pair takes a turn.
    allow(
        &mut rules,
        &[
            libc::SYS_poll,
            libc::SYS_ppoll,
            libc::SYS_read,
            libc::SYS_write,
            libc::SYS_readv,
            libc::SYS_writev,
            libc::SYS_close,
            libc::SYS_epoll_create1,
            libc::SYS_epoll_ctl,
            libc::SYS_epoll_wait,
            libc::SYS_epoll_pwait,
        ],
    );
    // Dropping an fd checks it is still open first (F_GETFD) where Rust's
    // debug assertions are on.
    allow_if(
        &mut rules,
        libc::SYS_fcntl,
        vec![eq(1, libc::F_GETFD as u64, SeccompCmpArgLen::Dword)],
    );
    match role {
        Role::Datapath => {
            // The allocator's arenas: anonymous memory, never executable.
            allow_if(&mut rules, libc::SYS_mmap, vec![not_executable(2)]);
            allow_if(&mut rules, libc::SYS_mprotect, vec![not_executable(2)]);
        }
        Role::Control => control(&mut rules),
    }
    rules
}

fn control(rules: &mut Rules) {
    // Guest memory, dirty logs and wasm linear memories are mapped here;
    // swap compiles a component (wasmtime writes code, then makes it
    // executable) and instantiates it from a memory image.
    allow(
        rules,
        &[
            libc::SYS_mmap,
            libc::SYS_mprotect,
            libc::SYS_memfd_create,
            libc::SYS_ftruncate,
        ],
    );
    // The vhost-user connection (messages with fds), the API clients, the
    // backend channel, the handover stream; credentials of API clients and
    // handover peers (SO_PEERCRED).
    allow(
        rules,
        &[
            libc::SYS_recvmsg,
            libc::SYS_sendmsg,
            libc::SYS_recvfrom,
            libc::SYS_sendto,
            libc::SYS_accept4,
            libc::SYS_connect,
            libc::SYS_shutdown,
            libc::SYS_getsockopt,
            libc::SYS_setsockopt,
            libc::SYS_getuid,
            libc::SYS_geteuid,
            libc::SYS_getgid,
            libc::SYS_getpid,
        ],
    );
    // A handover's pause runs at real-time priority and back
    // (`handover/priority.rs`), on this thread only.
    allow(
        rules,
        &[
            libc::SYS_sched_getscheduler,
            libc::SYS_sched_getparam,
            libc::SYS_sched_setscheduler,
        ],
    );
    // The handover source connects a new UNIX socket; no other family.
    allow_if(
        rules,
        libc::SYS_socket,
        vec![eq(0, libc::AF_UNIX as u64, SeccompCmpArgLen::Dword)],
    );
    // TAP offloads, the vnet header length and queue attach/detach follow
    // the device model's effects, the carrier follows the link: those four
    // TUN ioctls, and FIONBIO (sockets made non-blocking), and no other.
    for request in [
        TUNSETOFFLOAD,
        TUNSETVNETHDRSZ,
        TUNSETQUEUE,
        TUNSETCARRIER,
        libc::FIONBIO,
    ] {
        allow_if(
            rules,
            libc::SYS_ioctl,
            vec![eq(1, request, SeccompCmpArgLen::Dword)],
        );
    }
    // Kick and call fds made non-blocking; fds duplicated for a handover.
    allow(rules, &[libc::SYS_fcntl, libc::SYS_dup, libc::SYS_pipe2]);
    // Swap reads a component file and keeps its compiled form in the cache
    // directory; a component is checked against the cache by its metadata.
    allow(
        rules,
        &[
            libc::SYS_openat,
            libc::SYS_newfstatat,
            libc::SYS_fstat,
            libc::SYS_statx,
            libc::SYS_lseek,
            libc::SYS_pread64,
            libc::SYS_mkdir,
            libc::SYS_mkdirat,
            libc::SYS_rename,
            libc::SYS_renameat,
            libc::SYS_renameat2,
            libc::SYS_unlink,
            libc::SYS_unlinkat,
            libc::SYS_getrandom,
            libc::SYS_sched_getaffinity,
        ],
    );
    // The fd store's state record is written in place; an fd about to be
    // stored is compared with those stored (kcmp KCMP_FILE, nothing else
    // kcmp can tell: the manager merges the same open file).
    allow(rules, &[libc::SYS_pwrite64]);
    allow_if(
        rules,
        libc::SYS_kcmp,
        vec![eq(2, 0, SeccompCmpArgLen::Dword)],
    );
    // Signals: SIGINT/SIGTERM arrive on a signalfd; the sandbox's trap
    // handlers (installed at start) run and return.
    allow(rules, &[libc::SYS_rt_sigaction, libc::SYS_tgkill]);
}

fn allow(rules: &mut Rules, syscalls: &[i64]) {
    for &nr in syscalls {
        rules.insert(nr, Vec::new());
    }
}

/// Allows `nr` when every condition holds (one more rule if `nr` already
/// has conditional rules: any one rule may match).
fn allow_if(rules: &mut Rules, nr: i64, conditions: Vec<SeccompCondition>) {
    let rule = SeccompRule::new(conditions).expect("at least one condition");
    rules.entry(nr).or_default().push(rule);
}

fn eq(arg: u8, value: u64, len: SeccompCmpArgLen) -> SeccompCondition {
    SeccompCondition::new(arg, len, SeccompCmpOp::Eq, value).expect("valid condition")
}

/// Argument `arg` (a PROT_* word) without PROT_EXEC.
fn not_executable(arg: u8) -> SeccompCondition {
    SeccompCondition::new(
        arg,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(libc::PROT_EXEC as u64),
        0,
    )
    .expect("valid condition")
}

/// How many syscalls `role` may make (for the comparison in docs/architecture.md).
pub fn count(role: Role) -> usize {
    rules(role).len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_datapath_cannot_open_connect_spawn_exec_or_trace() {
        let datapath = rules(Role::Datapath);
        for nr in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_socket,
            libc::SYS_connect,
            libc::SYS_ioctl,
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
        ] {
            assert!(!datapath.contains_key(&nr), "datapath allows syscall {nr}");
        }
        // mmap and mprotect only with a condition (never executable).
        assert!(datapath[&libc::SYS_mmap].len() == 1);
        assert!(datapath[&libc::SYS_mprotect].len() == 1);
    }

    #[test]
    fn the_control_thread_cannot_spawn_exec_trace_or_listen() {
        let control = rules(Role::Control);
        for nr in [
            libc::SYS_execve,
            libc::SYS_execveat,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_vfork,
            libc::SYS_bind,
            libc::SYS_listen,
        ] {
            assert!(!control.contains_key(&nr), "control allows syscall {nr}");
        }
        // socket: AF_UNIX only; ioctl: five request numbers.
        assert_eq!(control[&libc::SYS_socket].len(), 1);
        assert_eq!(control[&libc::SYS_ioctl].len(), 5);
    }
}
