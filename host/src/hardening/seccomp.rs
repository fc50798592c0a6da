//! Seccomp filters per thread role (allowlists in `allowlists.rs`), built
//! with rust-vmm's `seccompiler`. Default mode is trap: a syscall outside a
//! role's list raises SIGSYS, whose handler reports the syscall's number
//! and name and ends the process (as Firecracker and Cloud Hypervisor do).
//! `--seccomp log` lets the syscall through and has the kernel log it;
//! `--seccomp off` installs nothing.

use super::allowlists::{rules, Role};
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};
use std::str::FromStr;

/// What happens on a syscall outside the allowlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// SIGSYS: report and exit.
    #[default]
    Trap,
    /// Allowed, and logged by the kernel (audit).
    Log,
    /// No filter.
    Off,
}

/// A `--seccomp` value that names no mode.
#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not one of trap, log, off")]
pub struct UnknownMode(String);

impl FromStr for Mode {
    type Err = UnknownMode;

    fn from_str(s: &str) -> Result<Self, UnknownMode> {
        match s {
            "trap" => Ok(Self::Trap),
            "log" => Ok(Self::Log),
            "off" => Ok(Self::Off),
            other => Err(UnknownMode(other.into())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    /// The allowlist did not compile to BPF.
    #[error("building the {role:?} filter: {error}")]
    Build {
        role: Role,
        error: seccompiler::BackendError,
    },
    /// NO_NEW_PRIVS, which an unprivileged filter needs, was refused.
    #[error("installing the seccomp filter: {0}")]
    NoNewPrivs(#[from] super::privileges::PrivilegeError),
    /// More instructions than a BPF program may have.
    #[error("installing the seccomp filter: {0} instructions")]
    TooLong(usize),
    /// The kernel refused the filter.
    #[error("installing the seccomp filter: {0}")]
    Install(std::io::Error),
}

/// The compiled filter of one role.
pub fn filter(role: Role, mode: Mode) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        Mode::Trap => SeccompAction::Trap,
        Mode::Log => SeccompAction::Log,
        Mode::Off => return Ok(None),
    };
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .map_err(|error| SeccompError::Build { role, error })?;
    let filter = SeccompFilter::new(rules(role), mismatch, SeccompAction::Allow, arch)
        .map_err(|error| SeccompError::Build { role, error })?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|error| SeccompError::Build { role, error })?;
    Ok(Some(program))
}

thread_local! {
    /// The calling thread's role, for the violation report (a const
    /// initialiser: reading it in a signal handler allocates nothing).
    static ROLE: std::cell::Cell<&'static str> = const { std::cell::Cell::new("unconfined") };
}

/// Puts `program`, the filter of `role`, on the calling thread (and sets
/// NO_NEW_PRIVS, which a filter needs without CAP_SYS_ADMIN). Only ever
/// tightens.
///
/// With SECCOMP_FILTER_FLAG_SPEC_ALLOW: otherwise the kernel also turns
/// on the speculative-store-bypass mitigation for the thread, which slowed
/// the datapath enough to drop frames at 60 000 frames/s each way (the
/// handover tests lost frames in half the runs; none with this flag). The
/// mitigation protects secrets in the same process from its own code;
/// sandnic's process holds one guest's memory, which it maps anyway.
pub fn apply(role: Role, program: &BpfProgram) -> Result<(), SeccompError> {
    ROLE.with(|r| {
        r.set(match role {
            Role::Control => "control",
            Role::Datapath => "datapath",
        })
    });
    super::privileges::forbid_new_privileges()?;
    let prog = libc::sock_fprog {
        len: u16::try_from(program.len()).map_err(|_| SeccompError::TooLong(program.len()))?,
        filter: program.as_ptr().cast_mut().cast(),
    };
    // SAFETY: `prog` points at `program`'s instructions, which outlive the
    // call (the kernel copies the filter); seccompiler's `sock_filter` has
    // the kernel's layout (u16, u8, u8, u32).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_SPEC_ALLOW,
            &prog as *const libc::sock_fprog,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(SeccompError::Install(std::io::Error::last_os_error()))
    }
}

/// Reports a trapped syscall (SIGSYS) and ends the process. Installed once
/// at start, before any filter.
pub fn install_violation_reporter() {
    // SAFETY: `report_violation` only does async-signal-safe work (formats
    // into a stack buffer, write(2), _exit(2)); the sigaction struct is
    // fully initialised before the call.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_violation as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut());
    }
}

/// Exit code after a seccomp violation.
pub const VIOLATION_EXIT: i32 = 159;

/// Offset of `si_syscall` in a SIGSYS `siginfo_t` on 64-bit Linux: after
/// signo, errno, code (+ padding) and the faulting call's address.
const SI_SYSCALL_OFFSET: usize = 24;

extern "C" fn report_violation(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo_t for SA_SIGINFO handlers;
    // for SIGSYS from seccomp `si_syscall` is an int at this offset.
    let nr = unsafe {
        info.cast::<u8>()
            .add(SI_SYSCALL_OFFSET)
            .cast::<i32>()
            .read_unaligned()
    };
    let name = syscalls::Sysno::new(nr as usize).map_or("unknown", |s| s.name());
    let role = ROLE.with(|r| r.get());
    let mut buf = [0u8; 192];
    let mut len = 0;
    for part in [
        "sandnic: seccomp: syscall ".as_bytes(),
        name.as_bytes(),
        b" (",
        itoa(nr as u32, &mut [0u8; 10]),
        b") is not allowed for the ",
        role.as_bytes(),
        b" thread; exiting\n",
    ] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write(2) and _exit(2) are async-signal-safe; `buf[..len]` is
    // initialised.
    unsafe {
        libc::write(2, buf.as_ptr().cast(), len);
        libc::_exit(VIOLATION_EXIT);
    }
}

/// Decimal digits of `n` in `out` (no allocation: signal handler).
fn itoa(mut n: u32, out: &mut [u8; 10]) -> &[u8] {
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return &out[i..];
        }
    }
}
