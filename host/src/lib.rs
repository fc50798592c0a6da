//! sandnic's native host: everything that touches the outside world (the
//! vhost-user connection, guest memory, vrings, TAP fds) and the wasm sandbox
//! that runs the device model.
//!
//! - `sandbox/` — wasmtime runtime, limits, validation, hot swap
//! - `vhost_user/` — the vhost-user protocol: framing and fd passing, requests
//! - `backend/` — one virtio-net device: requests, rings, control queue, effects
//! - `memory/` — guest memory and the migration's dirty log
//! - `datapath/` — the per-queue-pair packet threads (TX, RX, rx filter)
//! - `handover/` — live handover to a new process (stream, state, both sides)
//! - `hardening/` — privilege drop and per-thread seccomp allowlists
//! - `fd_passing.rs` — fds over UNIX sockets (SCM_RIGHTS), both ways
//! - `tap.rs` — the TAP device
//! - `default_mac.rs` — the device's MAC when `--mac` gives none
//! - `daemon/` — inherited sockets (systemd socket activation, `--socket-fd`)
//!   and readiness notifications (`sd_notify`)
//! - `unix_socket.rs` — listening sockets sandnic binds (appear only once
//!   listening)
//! - `serve/` — `sandnic serve`: set-up, the reactor, a handover's driver
//! - `api/` — the JSON-lines control API and its client (`sandnic ctl`)
//! - `cli.rs` — command-line interface of the `sandnic` binary

pub mod api;
pub mod backend;
pub mod cli;
pub mod daemon;
pub mod datapath;
pub mod default_mac;
pub mod fd_passing;
pub mod handover;
pub mod hardening;
pub mod memory;
pub mod sandbox;
pub mod serve;
pub mod tap;
pub mod unix_socket;
pub mod vhost_user;

pub use sandnic_device as device_model;
