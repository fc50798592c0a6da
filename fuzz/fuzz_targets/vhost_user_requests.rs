//! The vhost-user request path: arbitrary message sequences, with
//! placeholder fds (eventfds and memfds, so memory tables can map and kick
//! fds can be polled), through request parsing and the backend's dispatch
//! — features and protocol negotiation in any order, memory tables, ring
//! setup and start, config, logging, RARP — on a device whose datapath
//! threads really run (over a stand-in TAP). Nothing a frontend sends may
//! panic the host or hang it.

#![no_main]
use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use sandnic_host::backend::{NetBackend, Outcome};
use sandnic_host::datapath::DatapathOptions;
use sandnic_host::sandbox::SandboxedDevice;
use sandnic_host::tap::Tap;
use sandnic_host::vhost_user::request;
use sandnic_host::vhost_user::wire::{Header, Message, VERSION};
use std::os::fd::OwnedFd;
use std::sync::{Arc, Mutex, OnceLock};

/// One message: the request code is folded onto the codes that exist (and
/// a few that do not), the payload is taken as it is.
#[derive(Arbitrary, Debug)]
struct Msg {
    code: u8,
    payload: Vec<u8>,
    /// Low 2 bits: how many fds; the others pick eventfd or memfd each.
    fds: u8,
}

/// Size of the memfds handed over as placeholder fds: a memory table over
/// them maps (small regions) or is refused (regions past the end).
const MEMFD_SIZE: u64 = 1 << 20;

fn backend() -> &'static Mutex<NetBackend> {
    static BACKEND: OnceLock<Mutex<NetBackend>> = OnceLock::new();
    BACKEND.get_or_init(|| {
        let (runtime, component) = sandnic_fuzz::component();
        let device = SandboxedDevice::new(runtime, component, sandnic_fuzz::config(2, Some(1500), 0x1f))
            .expect("device");
        let queues = (0..2)
            .map(|_| {
                let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
                a.set_nonblocking(true).expect("nonblocking");
                std::mem::forget(b);
                OwnedFd::from(a)
            })
            .collect();
        let options = DatapathOptions {
            busy_poll: std::time::Duration::ZERO,
            ..DatapathOptions::default()
        };
        Mutex::new(NetBackend::new(device, Arc::new(Tap::stand_in(queues)), options).expect("backend"))
    })
}

fn placeholder(memfd: bool) -> OwnedFd {
    if memfd {
        let fd = nix::sys::memfd::memfd_create(c"fuzz", nix::sys::memfd::MemFdCreateFlag::MFD_CLOEXEC)
            .expect("memfd");
        nix::unistd::ftruncate(&fd, MEMFD_SIZE as i64).expect("ftruncate");
        fd
    } else {
        nix::sys::eventfd::EventFd::new().expect("eventfd").into()
    }
}

fuzz_target!(|msgs: Vec<Msg>| {
    let mut backend = backend().lock().unwrap_or_else(|p| p.into_inner());
    let Some(session) = backend.connect() else {
        return;
    };
    for m in msgs.iter().take(48) {
        let code = u32::from(m.code % 48);
        let fds = (0..m.fds & 3).map(|i| placeholder(m.fds & (4 << i) != 0)).collect();
        let message = Message {
            header: Header {
                request: code,
                flags: VERSION,
                size: m.payload.len() as u32,
            },
            payload: m.payload.clone(),
            fds,
        };
        let outcome = match request::parse(message) {
            Ok(req) => backend.handle(session, req),
            Err(e) => backend.malformed(code, e),
        };
        if let Outcome::Disconnect(_) = outcome {
            break;
        }
        // What the server would answer must exist for every request that
        // needs a body.
        if let Outcome::Failed(_) = outcome {
            let _ = request::failure_body(code, None);
        }
    }
    backend.disconnected(session);
});
