//! The wasm sandbox that runs the device model.
//!
//! - `limits.rs` — every CPU, memory, stack and size limit, and why
//! - `engine.rs` — engine settings, the imports a component gets, the
//!   precompiled-component cache
//! - `bindings.rs` — typed bindings of `wit/device.wit`, the `log` import
//! - `instance.rs` — one instance and the single place calls are made
//! - `validate.rs` — the boundary: checks on every value the component returns
//! - `device.rs` — `SandboxedDevice`: guarded calls, restore after failure
//! - `swap.rs` — hot swap with rollback
//! - `components.rs` — the builtin component and the test builds

mod bindings;
pub mod components;
mod device;
mod engine;
mod instance;
mod limits;
mod swap;
pub mod validate;

pub use device::{CtrlOutcome, DeviceError, SandboxStats, SandboxedDevice};
pub use engine::{
    default_cache_dir, ComponentInfo, ComponentSource, DeviceComponent, Runtime,
    MAX_COMPONENT_BYTES,
};
pub use instance::SandboxError;
pub use limits::SandboxLimits;
pub use swap::{SwapError, SwapReport};
