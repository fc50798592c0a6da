//! Running under a service manager: listening sockets inherited from the
//! process that starts sandnic (systemd socket activation, or fds named on
//! the command line by a manager such as libvirt) and readiness
//! notifications (`sd_notify`), which also tell systemd which process is
//! the service after a handover.

pub mod inherited_sockets;
pub mod notify;
