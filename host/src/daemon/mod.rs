//! Running under a service manager: listening sockets inherited from the
//! process that starts sandnic (systemd socket activation, or fds named on
//! the command line by a manager such as libvirt) and readiness
//! notifications (`sd_notify`), which also tell systemd which process is
//! the service after a handover; and the fd store, where the device's fds
//! and its state record outlive a crash of the process.

pub mod fd_store;
pub mod inherited_sockets;
pub mod notify;
pub mod record;
