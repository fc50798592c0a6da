//! sandnic's native host: everything that touches the outside world (the
//! vhost-user connection, guest memory, vrings, TAP fds) and the wasm sandbox
//! that runs the device model.
//!
//! - `sandbox/` — wasmtime runtime, limits, validation, hot swap
//! - `cli.rs` — command-line interface of the `sandnic` binary

pub mod cli;
pub mod sandbox;

pub use sandnic_device as device_model;
