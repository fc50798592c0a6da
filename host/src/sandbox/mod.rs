//! The wasm sandbox that runs the device model.
//!
//! - `limits.rs` — every CPU, memory, stack and size limit, and why
//! - `components.rs` — the builtin component and the test builds
//! - `bindings.rs` — typed bindings of `wit/device.wit`
//! - `validate.rs` — the boundary: checks on every value the component returns
//! - `store.rs` — what a call runs in, the `log` import, the single place
//!   calls are made (`run`) and how their failures are told apart
//! - `engine.rs` — engine settings, the imports a component gets, the
//!   precompiled-component cache
//! - `instance.rs` — one instance of a component, its device resource
//! - `device.rs` — `SandboxedDevice`: guarded calls, restore after failure
//! - `swap.rs` — hot swap with rollback
//!
//! Each file uses only those above it in this list.

mod bindings;
pub mod components;
mod device;
mod engine;
mod instance;
mod limits;
mod store;
mod swap;
pub mod validate;

pub use device::{CtrlOutcome, DeviceError, SandboxStats, SandboxedDevice};
pub use engine::{
    default_cache_dir, ComponentInfo, ComponentSource, DeviceComponent, NoSuchRelease, Runtime,
    MAX_COMPONENT_BYTES,
};
pub use limits::SandboxLimits;
pub use store::SandboxError;
pub use swap::{SwapError, SwapReport};
