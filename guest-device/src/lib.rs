//! sandnic's virtio-net device model (virtio 1.2 §5.1): feature negotiation,
//! config space, control queue, receive filter and the saved device state.
//!
//! Plain Rust with no I/O. Built for `wasm32-wasip2` it is the sandboxed
//! component the host runs (`component.rs` adapts it to the WIT world in
//! `wit/`); built natively it serves unit tests, fuzzing and the wasm-vs-native
//! comparison.
//!
//! Where things are:
//! - `features.rs` — feature bits, what is offered, negotiation rules
//! - `config_space.rs` — config-space layout, reads and writes
//! - `ctrl.rs` — control-queue command parsing
//! - `rx_filter.rs` — RX mode, MAC/VLAN tables, the reference `accepts`
//! - `device.rs` — the device: status rules, command semantics, effects
//! - `state.rs` — save/load format, versions, validation, describe
//! - `allocator.rs` — the component's allocator (free lists per size class)
//! - `bindings.rs` / `component.rs` — the WIT bindings, and the adapter
//!   from them to the plain types above (wasm builds only)

pub mod allocator;
pub mod config_space;
pub mod ctrl;
pub mod device;
pub mod features;
pub mod hostile;
pub mod log;
pub mod rx_filter;
pub mod state;
pub mod types;

#[cfg(target_arch = "wasm32")]
mod bindings;
#[cfg(target_arch = "wasm32")]
mod component;

pub use device::{DeviceState, NetDevice};
pub use types::*;

/// Name and version of this build, as the component reports it.
pub const NAME: &str = env!("CARGO_PKG_NAME");
pub const VERSION: &str = if cfg!(feature = "v2") {
    "0.2.0"
} else {
    env!("CARGO_PKG_VERSION")
};
