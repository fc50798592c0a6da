//! The TAP backend: open (or adopt) the queues of a TAP device with a
//! virtio-net header, probe and set offloads, set the header length, attach
//! and detach queues.
//!
//! Offloads and the header length are device-wide in the kernel (they live in
//! `struct tun_struct`), so they are set through queue 0; attach/detach is per
//! queue.

mod link_query;

pub use link_query::{LinkQuery, QueuesOpen};
use nix::errno::Errno;
use nix::fcntl::{fcntl, open, FcntlArg, OFlag};
use nix::sys::stat::Mode;
use sandnic_device::Offloads;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

const IFF_TAP: i16 = 0x0002;
const IFF_MULTI_QUEUE: i16 = 0x0100;
const IFF_ATTACH_QUEUE: i16 = 0x0200;
const IFF_DETACH_QUEUE: i16 = 0x0400;
const IFF_NO_PI: i16 = 0x1000;
const IFF_VNET_HDR: i16 = 0x4000;

const TUN_F_CSUM: u32 = 0x01;
const TUN_F_TSO4: u32 = 0x02;
const TUN_F_TSO6: u32 = 0x04;
const TUN_F_TSO_ECN: u32 = 0x08;
const TUN_F_UFO: u32 = 0x10;

/// Linux's limit on queues per TAP (MAX_TAP_QUEUES).
pub const MAX_TAP_QUEUES: usize = 256;

/// `struct ifreq` as the TUN ioctls use it: a name and a flags word.
#[repr(C)]
#[derive(Default)]
struct IfReq {
    name: [u8; 16],
    flags: i16,
    _pad: [u8; 22],
}

nix::ioctl_write_ptr_bad!(
    tun_set_iff,
    nix::request_code_write!(b'T', 202, std::mem::size_of::<libc::c_int>()),
    IfReq
);
nix::ioctl_write_ptr_bad!(
    tun_set_queue,
    nix::request_code_write!(b'T', 217, std::mem::size_of::<libc::c_int>()),
    IfReq
);
nix::ioctl_read_bad!(
    tun_get_iff,
    nix::request_code_read!(b'T', 210, std::mem::size_of::<libc::c_uint>()),
    IfReq
);
nix::ioctl_write_int!(tun_set_offload, b'T', 208);
nix::ioctl_write_ptr!(tun_set_carrier, b'T', 226, libc::c_int);
nix::ioctl_write_ptr!(tun_set_vnet_hdr_sz, b'T', 216, libc::c_int);

/// The TUN ioctls sandnic makes after start-up (the seccomp allowlist
/// names them by request number).
pub const TUNSETOFFLOAD: u64 =
    nix::request_code_write!(b'T', 208, std::mem::size_of::<libc::c_int>()) as u64;
pub const TUNSETVNETHDRSZ: u64 =
    nix::request_code_write!(b'T', 216, std::mem::size_of::<libc::c_int>()) as u64;
pub const TUNSETQUEUE: u64 =
    nix::request_code_write!(b'T', 217, std::mem::size_of::<libc::c_int>()) as u64;
pub const TUNSETCARRIER: u64 =
    nix::request_code_write!(b'T', 226, std::mem::size_of::<libc::c_int>()) as u64;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TapError {
    /// The TUN/TAP driver is not available.
    #[error("cannot open /dev/net/tun: {0} (is the tun module loaded?)")]
    NoTunDevice(Errno),
    /// The named TAP device does not exist.
    #[error("TAP device {0:?} does not exist (create it: ip tuntap add dev {0} mode tap vnet_hdr multi_queue)")]
    Missing(String),
    /// The name is not usable as an interface name.
    #[error("invalid TAP name {0:?}")]
    BadName(String),
    /// Several queues were asked of a TAP created without multi_queue.
    #[error("TAP {name:?} was created without multi_queue, and {queues} queue pairs need a queue each (recreate it: ip tuntap add dev {name} mode tap vnet_hdr multi_queue)")]
    SingleQueue { name: String, queues: usize },
    /// Another process holds queues of the TAP (a running sandnic, or a
    /// service manager's fd store).
    #[error("TAP {name:?} is in use: {} queues attached, {} detached but open (another sandnic, or a service manager's fd store, holds them)", open.attached, open.detached)]
    InUse { name: String, open: QueuesOpen },
    /// The kernel could not say whether the TAP is in use.
    #[error("asking the kernel whether TAP {name:?} is in use: {errno}")]
    Query { name: String, errno: Errno },
    /// TUNSETIFF refused the device.
    #[error("cannot attach to TAP {name:?}: {errno}")]
    Attach { name: String, errno: Errno },
    /// An fd handed in is not a TAP with a virtio-net header.
    #[error("fd {fd} is not a usable TAP queue: {why}")]
    NotATap { fd: RawFd, why: String },
    /// The fds handed in belong to different devices.
    #[error("TAP fds belong to different devices ({0} and {1})")]
    Mixed(String, String),
    #[error("{op} on TAP {name:?}: {errno}")]
    Ioctl {
        op: &'static str,
        name: String,
        errno: Errno,
    },
}

/// The rule for an interface name (the kernel's IFNAMSIZ less its NUL, no
/// path separator): checked before it reaches an ioctl, whether an
/// operator or a handover source named it.
pub fn check_name(name: &str) -> Result<(), TapError> {
    if name.is_empty() || name.len() > 15 || name.contains('/') || name.contains('\0') {
        return Err(TapError::BadName(name.into()));
    }
    Ok(())
}

/// What the datapath needs of a TAP: an fd per queue that reads and
/// writes whole frames (virtio-net header first), and a way to stop the
/// kernel steering frames to a queue no one reads. `Tap` is the real one;
/// the datapath's unit tests run it on a stand-in made of socketpairs
/// (`datapath::testing::FakeTap`), which needs no root.
pub trait TapQueues: Send + Sync + 'static {
    fn queue_count(&self) -> usize;
    fn queue(&self, index: usize) -> Option<BorrowedFd<'_>>;
    /// Attaches or detaches queue `index` (a detached queue receives
    /// nothing, and what it held is dropped).
    fn set_queue_attached(&self, index: usize, attached: bool) -> Result<(), TapError>;
}

impl TapQueues for Tap {
    fn queue_count(&self) -> usize {
        Tap::queue_count(self)
    }

    fn queue(&self, index: usize) -> Option<BorrowedFd<'_>> {
        Tap::queue(self, index)
    }

    fn set_queue_attached(&self, index: usize, attached: bool) -> Result<(), TapError> {
        Tap::set_queue_attached(self, index, attached)
    }
}

/// An open TAP device: one fd per queue.
#[derive(Debug)]
pub struct Tap {
    name: String,
    queues: Vec<OwnedFd>,
    multi_queue: bool,
    offload_caps: Offloads,
    /// Asks the kernel for the TAP's drop counter (None: no netlink
    /// socket could be opened; the count is then not reported).
    link_query: Option<LinkQuery>,
}

impl Tap {
    /// A stand-in over fds that are not TAP queues (one end of a
    /// socketpair), to fuzz the request path without a TAP device: its
    /// ioctls fail, as a deleted TAP's do.
    #[cfg(feature = "fuzzing")]
    pub fn stand_in(queues: Vec<OwnedFd>) -> Self {
        Self {
            name: "fuzz".into(),
            queues,
            multi_queue: false,
            offload_caps: Offloads::empty(),
            link_query: None,
        }
    }

    /// The queues processes hold of TAP `name` (None: no such device, or
    /// the kernel did not say).
    pub fn queues_open(name: &str) -> Option<QueuesOpen> {
        let index = nix::net::if_::if_nametoindex(name).ok()?;
        link_query::queues_open(index).ok()
    }

    /// Attaches `queues` queues to the TAP device `name`, which no one else
    /// may hold queues of: the device a new `sandnic serve --tap NAME`
    /// starts on. (A handover's destination opening the TAP by name shares
    /// it with its source on purpose, and uses `open`.)
    pub fn open_unused(name: &str, queues: usize) -> Result<Self, TapError> {
        check_name(name)?;
        let Ok(index) = nix::net::if_::if_nametoindex(name) else {
            return Err(TapError::Missing(name.into()));
        };
        let open = link_query::queues_open(index).map_err(|e| TapError::Query {
            name: name.into(),
            errno: Errno::from_raw(e.raw_os_error().unwrap_or(libc::EIO)),
        })?;
        if open.any() {
            return Err(TapError::InUse {
                name: name.into(),
                open,
            });
        }
        Self::open(name, queues)
    }

    /// Attaches `queues` queues to the existing TAP device `name`.
    pub fn open(name: &str, queues: usize) -> Result<Self, TapError> {
        check_name(name)?;
        // Asked through the calling thread's network namespace (sysfs would
        // show the namespace it was mounted in).
        if nix::net::if_::if_nametoindex(name).is_err() {
            return Err(TapError::Missing(name.into()));
        }
        // A device created with multi_queue only accepts multi-queue
        // attaches, and the other way round: try the likely one first.
        let mut multi_queue = queues > 1;
        let first = match attach_queue(name, multi_queue) {
            Err(TapError::Attach {
                errno: Errno::EINVAL,
                ..
            }) if !multi_queue => {
                multi_queue = true;
                attach_queue(name, true)?
            }
            Err(TapError::Attach {
                errno: Errno::EINVAL,
                ..
            }) => {
                return Err(TapError::SingleQueue {
                    name: name.into(),
                    queues,
                })
            }
            other => other?,
        };
        let mut fds = vec![first];
        for _ in 1..queues.clamp(1, MAX_TAP_QUEUES) {
            fds.push(attach_queue(name, multi_queue)?);
        }
        Self::from_queues(name.to_string(), fds, multi_queue)
    }

    /// Adopts TAP queue fds opened by someone else (a management layer, or
    /// the previous process in a handover).
    pub fn adopt(fds: Vec<OwnedFd>) -> Result<Self, TapError> {
        let mut name = None;
        let mut multi_queue = false;
        for fd in &fds {
            let mut req = IfReq::default();
            // SAFETY: TUNGETIFF writes at most a `struct ifreq` into `req`,
            // which is a properly sized and aligned `IfReq`.
            unsafe { tun_get_iff(fd.as_raw_fd(), &mut req) }.map_err(|errno| {
                TapError::NotATap {
                    fd: fd.as_raw_fd(),
                    why: errno.to_string(),
                }
            })?;
            let flags = req.flags;
            if flags & IFF_TAP == 0 || flags & IFF_VNET_HDR == 0 || flags & IFF_NO_PI == 0 {
                return Err(TapError::NotATap {
                    fd: fd.as_raw_fd(),
                    why: format!("flags {flags:#x} lack IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"),
                });
            }
            multi_queue |= flags & IFF_MULTI_QUEUE != 0;
            let this = ifname(&req.name);
            match &name {
                None => name = Some(this),
                Some(first) if *first != this => return Err(TapError::Mixed(first.clone(), this)),
                Some(_) => {}
            }
            set_nonblocking(fd.as_fd()).map_err(|errno| TapError::NotATap {
                fd: fd.as_raw_fd(),
                why: errno.to_string(),
            })?;
        }
        let Some(name) = name else {
            return Err(TapError::NotATap {
                fd: -1,
                why: "no fds given".into(),
            });
        };
        Self::from_queues(name, fds, multi_queue)
    }

    fn from_queues(
        name: String,
        queues: Vec<OwnedFd>,
        multi_queue: bool,
    ) -> Result<Self, TapError> {
        let link_query = LinkQuery::open(&name).ok();
        let mut tap = Self {
            name,
            queues,
            multi_queue,
            offload_caps: Offloads::empty(),
            link_query,
        };
        tap.offload_caps = tap.probe_offloads();
        tap.set_offloads(Offloads::empty())?;
        Ok(tap)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Frames the kernel dropped at the TAP's queues on their way to the
    /// guest (its queue was full: the guest, or an RX rate limit, read
    /// too slowly). None when the kernel cannot be asked.
    pub fn kernel_drops(&self) -> Option<u64> {
        self.link_query.as_ref()?.tx_dropped().ok()
    }

    pub fn queue_count(&self) -> usize {
        self.queues.len()
    }

    pub fn queue(&self, index: usize) -> Option<BorrowedFd<'_>> {
        self.queues.get(index).map(|fd| fd.as_fd())
    }

    pub fn queue_fds(&self) -> &[OwnedFd] {
        &self.queues
    }

    /// The offloads TUNSETOFFLOAD accepted when probed.
    pub fn offload_caps(&self) -> Offloads {
        self.offload_caps
    }

    /// Tries the combinations the kernel may accept, largest first, and keeps
    /// every flag that was part of an accepted one.
    fn probe_offloads(&self) -> Offloads {
        let candidates = [
            Offloads::all(),
            Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6 | Offloads::ECN,
            Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6 | Offloads::UFO,
            Offloads::CSUM | Offloads::TSO4 | Offloads::TSO6,
            Offloads::CSUM | Offloads::TSO4,
            Offloads::CSUM | Offloads::TSO6,
            Offloads::CSUM | Offloads::UFO,
            Offloads::CSUM,
        ];
        candidates
            .into_iter()
            .filter(|&offloads| self.set_offloads(offloads).is_ok())
            .fold(Offloads::empty(), |acc, o| acc | o)
    }

    /// TUNSETOFFLOAD: what the kernel may hand us (and so the guest).
    pub fn set_offloads(&self, offloads: Offloads) -> Result<(), TapError> {
        let flags = [
            (Offloads::CSUM, TUN_F_CSUM),
            (Offloads::TSO4, TUN_F_TSO4),
            (Offloads::TSO6, TUN_F_TSO6),
            (Offloads::ECN, TUN_F_TSO_ECN),
            (Offloads::UFO, TUN_F_UFO),
        ]
        .iter()
        .filter(|(o, _)| offloads.contains(*o))
        .fold(0u32, |acc, (_, f)| acc | f);
        // SAFETY: TUNSETOFFLOAD takes its argument by value; the fd is an
        // open TAP queue we own.
        unsafe { tun_set_offload(self.queues[0].as_raw_fd(), flags as libc::c_ulong) }
            .map(drop)
            .map_err(|errno| self.ioctl_error("TUNSETOFFLOAD", errno))
    }

    /// TUNSETVNETHDRSZ: the virtio-net header length on reads and writes.
    pub fn set_vnet_hdr_len(&self, len: u32) -> Result<(), TapError> {
        let len = len as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int through the pointer, which
        // points at `len` for the duration of the call.
        unsafe { tun_set_vnet_hdr_sz(self.queues[0].as_raw_fd(), &len) }
            .map(drop)
            .map_err(|errno| self.ioctl_error("TUNSETVNETHDRSZ", errno))
    }

    /// TUNSETCARRIER: the TAP's carrier, as the host sees it (`ip link`
    /// shows NO-CARRIER; the host's stack stops sending to it, as to a NIC
    /// whose cable is out). Device-wide, so it outlives this process.
    pub fn set_carrier(&self, up: bool) -> Result<(), TapError> {
        let on = libc::c_int::from(up);
        // SAFETY: TUNSETCARRIER reads one int through the pointer, which
        // points at `on` for the duration of the call.
        unsafe { tun_set_carrier(self.queues[0].as_raw_fd(), &on) }
            .map(drop)
            .map_err(|errno| self.ioctl_error("TUNSETCARRIER", errno))
    }

    /// Attaches or detaches one queue. A detached queue gets no packets from
    /// the kernel, so a queue pair the guest does not use loses nothing.
    pub fn set_queue_attached(&self, index: usize, attached: bool) -> Result<(), TapError> {
        if !self.multi_queue {
            return Ok(());
        }
        let Some(fd) = self.queues.get(index) else {
            return Ok(());
        };
        let req = IfReq {
            flags: if attached {
                IFF_ATTACH_QUEUE
            } else {
                IFF_DETACH_QUEUE
            },
            ..Default::default()
        };
        // SAFETY: TUNSETQUEUE reads a `struct ifreq`; `req` is one.
        match unsafe { tun_set_queue(fd.as_raw_fd(), &req) } {
            // Attaching an attached queue (or detaching a detached one)
            // answers EINVAL; the queue is in the wanted state either way.
            Ok(_) | Err(Errno::EINVAL) => Ok(()),
            Err(errno) => Err(self.ioctl_error("TUNSETQUEUE", errno)),
        }
    }

    fn ioctl_error(&self, op: &'static str, errno: Errno) -> TapError {
        TapError::Ioctl {
            op,
            name: self.name.clone(),
            errno,
        }
    }
}

fn attach_queue(name: &str, multi_queue: bool) -> Result<OwnedFd, TapError> {
    let raw = open(
        "/dev/net/tun",
        OFlag::O_RDWR | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(TapError::NoTunDevice)?;
    // SAFETY: `open` just returned this fd and nothing else owns it.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let mut req = IfReq {
        flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
        ..Default::default()
    };
    if multi_queue {
        req.flags |= IFF_MULTI_QUEUE;
    }
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq`; `req` is one, with a
    // NUL-terminated name (checked to be at most 15 bytes).
    unsafe { tun_set_iff(fd.as_raw_fd(), &req) }.map_err(|errno| TapError::Attach {
        name: name.into(),
        errno,
    })?;
    Ok(fd)
}

fn set_nonblocking(fd: BorrowedFd<'_>) -> Result<(), Errno> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).map(drop)
}

fn ifname(raw: &[u8; 16]) -> String {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    String::from_utf8_lossy(&raw[..end]).into_owned()
}
