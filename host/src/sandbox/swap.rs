//! Hot swap: replace the running component with another (typically a newer
//! version) without the driver noticing.
//!
//! The old instance is saved, a new instance of the new component loads that
//! state, and only then is it installed. Until that last step nothing about
//! the running device has changed, so any failure — the new component traps,
//! runs out of fuel, refuses the state (an incompatible version), or answers
//! with values the host refuses — leaves the old instance running untouched.

use super::bindings::device_api::GuestNetDevice;
use super::device::{load_into, DeviceError, SandboxedDevice};
use super::engine::{ComponentInfo, DeviceComponent};
use super::store::SandboxError;
use super::validate;
use sandnic_device::Effect;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tracing::info;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SwapReport {
    /// From the start of the save to the new instance being installed: the
    /// time the device could not take calls.
    pub pause: Duration,
    pub from: ComponentInfo,
    pub to: ComponentInfo,
    /// Effects the new instance asked for after loading; the caller applies
    /// them (normally they restate what is already in place).
    pub effects: Vec<Effect>,
}

/// Why a swap did not happen. In every case the old component still runs.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SwapError {
    /// The running device could not save its state.
    #[error("saving the running device failed: {0}")]
    Save(DeviceError),
    /// The new component did not instantiate.
    #[error("new component: {0}")]
    Instantiate(SandboxError),
    /// The new component refused the saved state (for example a version it
    /// does not know).
    #[error("new component refused the device state: {0}")]
    Refused(String),
    /// The new component failed or misbehaved while taking over.
    #[error("new component failed while taking over: {0}")]
    Failed(SandboxError),
}

impl SwapError {
    /// A stable name for the API's `kind`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Save(_) => "swap_save_failed",
            Self::Instantiate(_) => "swap_instantiate_failed",
            Self::Refused(_) => "swap_refused",
            Self::Failed(_) => "swap_failed",
        }
    }
}

impl SandboxedDevice {
    /// Swaps to `component`, or changes nothing and says why.
    pub fn swap(&mut self, component: Arc<DeviceComponent>) -> Result<SwapReport, SwapError> {
        let started = Instant::now();
        let blob = self.save().map_err(SwapError::Save)?;
        let mut fresh = self
            .instantiate(&component)
            .map_err(SwapError::Instantiate)?;
        let effects = load_into(&mut fresh, &blob, self.bounds())
            .map_err(SwapError::Failed)?
            .map_err(SwapError::Refused)?;
        let offered = fresh
            .call("device-features", |d: GuestNetDevice<'_>, s, r| {
                d.call_device_features(s, r)
            })
            .map_err(SwapError::Failed)?;
        validate::device_features(offered, self.config()).map_err(|why| {
            SwapError::Failed(SandboxError::InvalidOutput {
                call: "device-features",
                why,
            })
        })?;
        let from = self.info().clone();
        self.install(component, fresh, blob);
        let pause = started.elapsed();
        info!(from = %from.version, to = %self.info().version, pause_us = pause.as_micros() as u64, "component swapped");
        Ok(SwapReport {
            pause,
            from,
            to: self.info().clone(),
            effects,
        })
    }
}
