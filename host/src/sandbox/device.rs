//! `SandboxedDevice`: the device model as the rest of the host sees it.
//!
//! Every call goes through the sandbox and its outputs through `validate`.
//! When a call fails (trap, limit, invalid output) the instance is dropped
//! and a fresh one is restored to the last good state, so the failed call
//! leaves no trace: the guest sees ERR (control queue) or an error the caller
//! turns into DEVICE_NEEDS_RESET, and the host never panics.
//!
//! Restoring uses a checkpoint plus a replay log: the last saved state and
//! the mutating calls that succeeded since. The device is deterministic (no
//! clock, no randomness, fuel-bounded), so replaying them rebuilds exactly
//! the state the host already acted on, without paying for a `save` after
//! every call. Every `replay_log_len` calls the log is folded into a new
//! checkpoint.

use super::bindings::wit;
use super::engine::{ComponentInfo, DeviceComponent, Runtime};
use super::instance::Instance;
use super::store::SandboxError;
use super::validate::{self, Bounds};
use sandnic_device::{DeviceConfig, Effect};
use std::ops::Range;
use std::sync::Arc;
use tracing::{error, warn};

/// Why a device call did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DeviceError {
    /// The device model refused the request (its own, well-formed answer).
    #[error("device refused: {0}")]
    Refused(String),
    /// The sandbox contained a failure; the device was restored.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
}

/// A call that changes device state. `B` is how its byte argument is held:
/// borrowed (`&[u8]`) when the call is made, a range of the replay log's
/// byte buffer once logged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation<B> {
    SetFeatures(u64),
    WriteConfig(u32, B),
    SetStatus(u8),
    Reset,
    QueueEnabled(u16, bool),
    Ctrl(B),
    LinkChanged(bool),
    Announce,
}

impl<B> Mutation<B> {
    fn name(&self) -> &'static str {
        match self {
            Self::SetFeatures(_) => "set-features",
            Self::WriteConfig(..) => "write-config",
            Self::SetStatus(_) => "set-status",
            Self::Reset => "reset",
            Self::QueueEnabled(..) => "queue-enabled",
            Self::Ctrl(_) => "handle-ctrl",
            Self::LinkChanged(_) => "link-changed",
            Self::Announce => "announce",
        }
    }

    /// The same call with its byte argument converted by `f`.
    fn map_bytes<C>(self, f: impl FnOnce(B) -> C) -> Mutation<C> {
        match self {
            Self::SetFeatures(acked) => Mutation::SetFeatures(acked),
            Self::WriteConfig(offset, data) => Mutation::WriteConfig(offset, f(data)),
            Self::SetStatus(status) => Mutation::SetStatus(status),
            Self::Reset => Mutation::Reset,
            Self::QueueEnabled(index, on) => Mutation::QueueEnabled(index, on),
            Self::Ctrl(command) => Mutation::Ctrl(f(command)),
            Self::LinkChanged(up) => Mutation::LinkChanged(up),
            Self::Announce => Mutation::Announce,
        }
    }
}

/// Mutating calls that succeeded since the checkpoint. Their byte
/// arguments live in one buffer that keeps its capacity across folds, so
/// logging a control command allocates nothing once the log is warm.
#[derive(Debug, Clone, Default)]
struct ReplayLog {
    calls: Vec<Mutation<Range<usize>>>,
    bytes: Vec<u8>,
}

impl ReplayLog {
    fn record(&mut self, mutation: Mutation<&[u8]>) {
        let bytes = &mut self.bytes;
        let logged = mutation.map_bytes(|data| {
            let start = bytes.len();
            bytes.extend_from_slice(data);
            start..bytes.len()
        });
        self.calls.push(logged);
    }

    fn len(&self) -> usize {
        self.calls.len()
    }

    fn clear(&mut self) {
        self.calls.clear();
        self.bytes.clear();
    }

    fn iter(&self) -> impl Iterator<Item = Mutation<&[u8]>> {
        self.calls
            .iter()
            .map(|call| call.clone().map_bytes(|range| &self.bytes[range]))
    }
}

/// A mutating call's validated answer.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Reply {
    /// Control ack or resulting status, where the call has one.
    value: Option<u8>,
    effects: Result<Vec<Effect>, String>,
}

/// The result of a control command. Never an error: a failure is ERR.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CtrlOutcome {
    pub ack: u8,
    pub effects: Vec<Effect>,
    /// Set when the sandbox contained a failure (the ack is then ERR).
    pub failure: Option<SandboxError>,
}

/// Counters for `status`/`stats`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct SandboxStats {
    pub calls: u64,
    pub failures: u64,
    pub restores: u64,
    pub checkpoints: u64,
    pub last_failure: Option<String>,
}

/// Where a fresh instance gets its state from.
#[derive(Debug, Clone, Default)]
struct Checkpoint {
    /// A saved state, or none for the freshly constructed device.
    blob: Option<Vec<u8>>,
    /// Mutating calls that succeeded after `blob`.
    replay: ReplayLog,
}

impl Checkpoint {
    /// `blob` becomes the checkpoint, with an empty log.
    fn restart_at(&mut self, blob: Vec<u8>) {
        self.blob = Some(blob);
        self.replay.clear();
    }
}

pub struct SandboxedDevice {
    runtime: Arc<Runtime>,
    component: Arc<DeviceComponent>,
    config: DeviceConfig,
    wit_config: wit::DeviceConfig,
    bounds: Bounds,
    instance: Instance,
    checkpoint: Checkpoint,
    /// The device lost its state (restore impossible): report
    /// DEVICE_NEEDS_RESET until the driver resets.
    needs_reset: bool,
    stats: SandboxStats,
}

pub(crate) fn wit_config(config: &DeviceConfig) -> wit::DeviceConfig {
    wit::DeviceConfig {
        mac: super::bindings::mac_to_wit(config.mac),
        max_queue_pairs: config.max_queue_pairs,
        mtu: config.mtu,
        backend_offloads: config.backend_offloads.into(),
        compat: wit::Compat {
            local_migration: config.compat.local_migration,
        },
    }
}

impl SandboxedDevice {
    /// A new device running `component`. `config` is validated first: the
    /// component may assume a sane configuration.
    pub fn new(
        runtime: Arc<Runtime>,
        component: Arc<DeviceComponent>,
        config: DeviceConfig,
    ) -> anyhow::Result<Self> {
        config
            .validate()
            .map_err(|e| anyhow::anyhow!("invalid device configuration: {e}"))?;
        let wit_config = wit_config(&config);
        let instance = Instance::new(&runtime, &component, &wit_config)?;
        let bounds = Bounds::new(&config, runtime.limits.max_effects);
        Ok(Self {
            runtime,
            component,
            config,
            wit_config,
            bounds,
            instance,
            checkpoint: Checkpoint::default(),
            needs_reset: false,
            stats: SandboxStats::default(),
        })
    }

    pub fn config(&self) -> &DeviceConfig {
        &self.config
    }

    pub fn component(&self) -> &Arc<DeviceComponent> {
        &self.component
    }

    pub fn info(&self) -> &ComponentInfo {
        &self.component.info
    }

    pub fn stats(&self) -> &SandboxStats {
        &self.stats
    }

    pub fn runtime(&self) -> &Arc<Runtime> {
        &self.runtime
    }

    /// True after a failure the device could not be restored from (or the
    /// host could not apply what it asked for); cleared by `reset`.
    pub fn needs_reset(&self) -> bool {
        self.needs_reset
    }

    /// The host could not carry out an effect of this device (a TAP ioctl
    /// failed): the driver must reset the device to get back in step.
    pub fn mark_needs_reset(&mut self) {
        self.needs_reset = true;
    }

    // ---- read-only calls -------------------------------------------------

    pub fn device_features(&mut self) -> Result<u64, DeviceError> {
        let bits = self.read_only("device-features", |d, s, r| d.call_device_features(s, r))?;
        let config = &self.config;
        self.checked("device-features", validate::device_features(bits, config))
    }

    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, DeviceError> {
        let result = self.read_only("read-config", |d, s, r| {
            d.call_read_config(s, r, offset, len)
        })?;
        let bytes = result.map_err(|e| self.refusal(e))?;
        self.checked("read-config", validate::config_bytes(bytes, len))
    }

    pub fn config_generation(&mut self) -> Result<u32, DeviceError> {
        self.read_only("config-generation", |d, s, r| {
            d.call_config_generation(s, r)
        })
    }

    /// The device state in the component's newest format.
    pub fn save(&mut self) -> Result<Vec<u8>, DeviceError> {
        let blob = self.read_only("save", |d, s, r| d.call_save(s, r))?;
        let max = self.runtime.limits.max_state_bytes;
        self.checked("save", validate::bounded_bytes(blob, max, "saved state"))
    }

    /// A saved state as JSON, by this device's component.
    pub fn describe(&mut self, blob: &[u8]) -> Result<String, DeviceError> {
        let max = self.runtime.limits.max_text_bytes;
        let result = self.guard("describe", |i| {
            i.call_free("describe", |g, s| g.call_describe(s, blob))
        })?;
        let text = result.map_err(|e| self.refusal(e))?;
        self.checked("describe", validate::bounded_text(text, max, "description"))
    }

    fn read_only<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(
            super::bindings::device_api::GuestNetDevice<'_>,
            &mut wasmtime::Store<super::store::InstanceData>,
            wasmtime::component::ResourceAny,
        ) -> wasmtime::Result<R>,
    ) -> Result<R, DeviceError> {
        Ok(self.guard(call, |i| i.call(call, f))?)
    }

    // ---- mutating calls --------------------------------------------------

    pub fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, DeviceError> {
        self.mutate(Mutation::SetFeatures(acked))?
            .effects
            .map_err(DeviceError::Refused)
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, DeviceError> {
        self.mutate(Mutation::WriteConfig(offset, data))?
            .effects
            .map_err(DeviceError::Refused)
    }

    /// The status after the device's rules, and effects.
    pub fn set_status(&mut self, status: u8) -> Result<(u8, Vec<Effect>), DeviceError> {
        let reply = self.mutate(Mutation::SetStatus(status))?;
        let mut status = reply.value.unwrap_or(status);
        if self.needs_reset {
            status |= sandnic_device::device::status::NEEDS_RESET;
        }
        Ok((status, reply.effects.map_err(DeviceError::Refused)?))
    }

    pub fn reset(&mut self) -> Result<Vec<Effect>, DeviceError> {
        let effects = self
            .mutate(Mutation::Reset)?
            .effects
            .map_err(DeviceError::Refused)?;
        self.needs_reset = false;
        Ok(effects)
    }

    pub fn queue_enabled(&mut self, index: u16, enabled: bool) -> Result<Vec<Effect>, DeviceError> {
        self.mutate(Mutation::QueueEnabled(index, enabled))?
            .effects
            .map_err(DeviceError::Refused)
    }

    /// One control command. A failure inside the sandbox answers ERR and
    /// leaves the device as it was before the command.
    pub fn handle_ctrl(&mut self, command: &[u8]) -> CtrlOutcome {
        match self.mutate(Mutation::Ctrl(command)) {
            Ok(Reply {
                value: Some(ack),
                effects: Ok(effects),
            }) => CtrlOutcome {
                ack,
                effects,
                failure: None,
            },
            Ok(_) => CtrlOutcome {
                ack: sandnic_device::ACK_ERR,
                effects: Vec::new(),
                failure: None,
            },
            Err(DeviceError::Sandbox(failure)) => CtrlOutcome {
                ack: sandnic_device::ACK_ERR,
                effects: Vec::new(),
                failure: Some(failure),
            },
            Err(DeviceError::Refused(_)) => CtrlOutcome {
                ack: sandnic_device::ACK_ERR,
                effects: Vec::new(),
                failure: None,
            },
        }
    }

    pub fn link_changed(&mut self, up: bool) -> Result<Vec<Effect>, DeviceError> {
        self.mutate(Mutation::LinkChanged(up))?
            .effects
            .map_err(DeviceError::Refused)
    }

    pub fn announce(&mut self) -> Result<Vec<Effect>, DeviceError> {
        self.mutate(Mutation::Announce)?
            .effects
            .map_err(DeviceError::Refused)
    }

    /// Replaces the device state with a saved one (validated by the
    /// component). On refusal or failure the device is unchanged.
    pub fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, DeviceError> {
        sandnic_device::state::check_len(blob.len()).map_err(DeviceError::Refused)?;
        let bounds = self.bounds;
        let result = self.guard("load", |i| load_into(i, blob, &bounds))?;
        let effects = result.map_err(|e| self.refusal(e))?;
        self.checkpoint.restart_at(blob.to_vec());
        Ok(effects)
    }

    fn mutate(&mut self, mutation: Mutation<&[u8]>) -> Result<Reply, DeviceError> {
        let bounds = self.bounds;
        let reply = self.guard(mutation.name(), |i| perform(i, mutation, &bounds))?;
        self.checkpoint.replay.record(mutation);
        if self.checkpoint.replay.len() >= self.runtime.limits.replay_log_len {
            self.fold_checkpoint();
        }
        Ok(reply)
    }

    /// Saves the current state as the new checkpoint. If that save fails
    /// the instance is restored from the old checkpoint and log, which
    /// describe the same state.
    fn fold_checkpoint(&mut self) {
        let max = self.runtime.limits.max_state_bytes;
        let saved = self.guard("save", |i| {
            let blob = i.call("save", |d, s, r| d.call_save(s, r))?;
            validate::bounded_bytes(blob, max, "saved state")
                .map_err(|why| SandboxError::InvalidOutput { call: "save", why })
        });
        if let Ok(blob) = saved {
            self.checkpoint.restart_at(blob);
            self.stats.checkpoints += 1;
        }
    }

    /// Runs `f` on the instance; on failure restores a fresh instance and
    /// returns the failure.
    fn guard<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&mut Instance) -> Result<R, SandboxError>,
    ) -> Result<R, SandboxError> {
        self.stats.calls += 1;
        match f(&mut self.instance) {
            Ok(value) => Ok(value),
            Err(failure) => {
                warn!(component = %self.component.origin, "{call}: {failure}; restoring the device");
                self.stats.failures += 1;
                self.stats.last_failure = Some(failure.to_string());
                self.restore();
                Err(failure)
            }
        }
    }

    fn checked<R>(
        &mut self,
        call: &'static str,
        result: Result<R, validate::Invalid>,
    ) -> Result<R, DeviceError> {
        result.map_err(|why| {
            let failure = SandboxError::InvalidOutput { call, why };
            warn!(component = %self.component.origin, "{failure}; restoring the device");
            self.stats.failures += 1;
            self.stats.last_failure = Some(failure.to_string());
            self.restore();
            DeviceError::Sandbox(failure)
        })
    }

    fn refusal(&self, message: String) -> DeviceError {
        DeviceError::Refused(validate::truncate_text(&message, 1024))
    }

    /// A fresh instance brought to the last good state. If even that fails
    /// (the component cannot rebuild its own state) the device starts over
    /// from its reset state and reports DEVICE_NEEDS_RESET.
    fn restore(&mut self) {
        self.stats.restores += 1;
        match rebuild(
            &self.runtime,
            &self.component,
            &self.wit_config,
            &self.checkpoint,
            &self.bounds,
        ) {
            Ok(instance) => self.instance = instance,
            Err(failure) => {
                error!(component = %self.component.origin, "cannot restore device state ({failure}); device needs reset");
                self.needs_reset = true;
                self.checkpoint = Checkpoint::default();
                match Instance::new(&self.runtime, &self.component, &self.wit_config) {
                    Ok(instance) => self.instance = instance,
                    Err(e) => error!("cannot even instantiate the component afresh: {e}"),
                }
            }
        }
    }

    // ---- hot swap support (see swap.rs) ----------------------------------

    pub(crate) fn install(
        &mut self,
        component: Arc<DeviceComponent>,
        instance: Instance,
        blob: Vec<u8>,
    ) {
        self.component = component;
        self.instance = instance;
        self.checkpoint.restart_at(blob);
    }

    pub(crate) fn instantiate(
        &self,
        component: &DeviceComponent,
    ) -> Result<Instance, SandboxError> {
        Instance::new(&self.runtime, component, &self.wit_config)
    }

    pub(crate) fn bounds(&self) -> &Bounds {
        &self.bounds
    }
}

/// Performs one mutating call and validates what comes back.
fn perform(
    instance: &mut Instance,
    mutation: Mutation<&[u8]>,
    bounds: &Bounds,
) -> Result<Reply, SandboxError> {
    let call = mutation.name();
    let invalid = |why| SandboxError::InvalidOutput { call, why };
    let (value, effects) = match mutation {
        Mutation::SetFeatures(acked) => (
            None,
            instance.call(call, |d, s, r| d.call_set_features(s, r, acked))?,
        ),
        Mutation::WriteConfig(offset, data) => (
            None,
            instance.call(call, |d, s, r| d.call_write_config(s, r, offset, data))?,
        ),
        Mutation::SetStatus(requested) => {
            let reply = instance.call(call, |d, s, r| d.call_set_status(s, r, requested))?;
            (
                Some(validate::status(requested, reply.status).map_err(invalid)?),
                Ok(reply.effects),
            )
        }
        Mutation::Reset => (None, Ok(instance.call(call, |d, s, r| d.call_reset(s, r))?)),
        Mutation::QueueEnabled(index, on) => (
            None,
            Ok(instance.call(call, |d, s, r| d.call_queue_enabled(s, r, index, on))?),
        ),
        Mutation::Ctrl(bytes) => {
            let reply = instance.call(call, |d, s, r| d.call_handle_ctrl(s, r, bytes))?;
            (
                Some(validate::ack(reply.ack).map_err(invalid)?),
                Ok(reply.effects),
            )
        }
        Mutation::LinkChanged(up) => (
            None,
            Ok(instance.call(call, |d, s, r| d.call_link_changed(s, r, up))?),
        ),
        Mutation::Announce => (
            None,
            Ok(instance.call(call, |d, s, r| d.call_announce(s, r))?),
        ),
    };
    let effects = match effects {
        Ok(list) => Ok(validate::effects(list, bounds).map_err(invalid)?),
        Err(refusal) => Err(validate::truncate_text(&refusal, 1024)),
    };
    Ok(Reply { value, effects })
}

/// `load` on an instance, with the effects validated.
pub(crate) fn load_into(
    instance: &mut Instance,
    blob: &[u8],
    bounds: &Bounds,
) -> Result<Result<Vec<Effect>, String>, SandboxError> {
    match instance.call("load", |d, s, r| d.call_load(s, r, blob))? {
        Ok(list) => validate::effects(list, bounds)
            .map(Ok)
            .map_err(|why| SandboxError::InvalidOutput { call: "load", why }),
        Err(refusal) => Ok(Err(refusal)),
    }
}

/// Why a fresh instance could not be brought to the last good state.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    /// Instantiating or loading the checkpoint failed in the sandbox.
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    /// The component refused the checkpoint it saved itself.
    #[error("the component refused its own saved state: {0}")]
    Refused(String),
    /// A call that succeeded before failed when replayed.
    #[error("replaying {call}: {failure}")]
    Replay {
        call: &'static str,
        failure: SandboxError,
    },
}

fn rebuild(
    runtime: &Runtime,
    component: &DeviceComponent,
    config: &wit::DeviceConfig,
    checkpoint: &Checkpoint,
    bounds: &Bounds,
) -> Result<Instance, RestoreError> {
    let mut instance = Instance::new(runtime, component, config)?;
    if let Some(blob) = &checkpoint.blob {
        load_into(&mut instance, blob, bounds)?.map_err(RestoreError::Refused)?;
    }
    for mutation in checkpoint.replay.iter() {
        perform(&mut instance, mutation, bounds).map_err(|failure| RestoreError::Replay {
            call: mutation.name(),
            failure,
        })?;
    }
    Ok(instance)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_log_gives_back_what_it_recorded() {
        let calls: [Mutation<&[u8]>; 5] = [
            Mutation::Ctrl(&[0, 0, 1]),
            Mutation::SetFeatures(7),
            Mutation::WriteConfig(4, &[1, 2, 3, 4, 5, 6]),
            Mutation::Ctrl(&[]),
            Mutation::Announce,
        ];
        let mut log = ReplayLog::default();
        for call in calls {
            log.record(call);
        }
        assert_eq!(log.len(), calls.len());
        assert!(log.iter().eq(calls));
        log.clear();
        assert_eq!(log.iter().count(), 0);
        log.record(Mutation::Ctrl(&[9]));
        assert!(log.iter().eq([Mutation::Ctrl(&[9][..])]));
    }
}
