//! Shared test helpers: one runtime per test process, the built components,
//! and `Dut` — the device-model interface the tests drive, implemented by the
//! native device, the sandboxed component, and `Lockstep`, which runs both
//! and fails on any difference (the differential check).
#![allow(dead_code)]

use sandnic_device::{Compat, DeviceConfig, Effect, NetDevice, Offloads};
use sandnic_host::sandbox::{
    components, ComponentSource, DeviceComponent, DeviceError, Runtime, SandboxedDevice,
};
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};

pub const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

pub fn config(pairs: u16, mtu: Option<u16>, offloads: Offloads) -> DeviceConfig {
    DeviceConfig {
        mac: MAC,
        max_queue_pairs: pairs,
        mtu,
        backend_offloads: offloads,
        compat: Compat::default(),
    }
}

/// Two pairs, MTU 1500, every offload: every feature on offer.
pub fn full_config() -> DeviceConfig {
    config(2, Some(1500), Offloads::all())
}

pub fn runtime() -> Arc<Runtime> {
    static RUNTIME: OnceLock<Arc<Runtime>> = OnceLock::new();
    RUNTIME
        .get_or_init(|| {
            let cache = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("component-cache");
            Runtime::new(Default::default(), Some(cache)).expect("runtime")
        })
        .clone()
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Build {
    V1,
    V2,
    Hostile,
}

pub fn component(build: Build) -> Arc<DeviceComponent> {
    static LOADED: OnceLock<[Arc<DeviceComponent>; 3]> = OnceLock::new();
    let all = LOADED.get_or_init(|| {
        let rt = runtime();
        [
            rt.load(&ComponentSource::Builtin).expect("v1 component"),
            rt.load(&ComponentSource::File(components::built::v2()))
                .expect("v2 component"),
            rt.load(&ComponentSource::File(components::built::hostile()))
                .expect("hostile component"),
        ]
    });
    all[build as usize].clone()
}

pub fn sandboxed(build: Build, config: DeviceConfig) -> SandboxedDevice {
    SandboxedDevice::new(runtime(), component(build), config).expect("sandboxed device")
}

pub fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// The device's current state, saved and described as JSON.
pub fn described(d: &mut impl Dut) -> serde_json::Value {
    let blob = d.save();
    serde_json::from_str(&d.describe(&blob).expect("describe")).expect("describe gives JSON")
}

/// The device-model calls, with native result types.
pub trait Dut {
    fn features(&mut self) -> u64;
    fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String>;
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String>;
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String>;
    fn generation(&mut self) -> u32;
    fn set_status(&mut self, status: u8) -> (u8, Vec<Effect>);
    fn reset(&mut self) -> Vec<Effect>;
    fn queue_enabled(&mut self, index: u16, on: bool) -> Vec<Effect>;
    fn ctrl(&mut self, command: &[u8]) -> (u8, Vec<Effect>);
    fn link(&mut self, up: bool) -> Vec<Effect>;
    fn announce(&mut self) -> Vec<Effect>;
    fn save(&mut self) -> Vec<u8>;
    fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String>;
    fn describe(&mut self, blob: &[u8]) -> Result<String, String>;
}

impl Dut for NetDevice {
    fn features(&mut self) -> u64 {
        self.device_features()
    }
    fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String> {
        NetDevice::set_features(self, acked)
    }
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        NetDevice::read_config(self, offset, len)
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String> {
        NetDevice::write_config(self, offset, data)
    }
    fn generation(&mut self) -> u32 {
        self.config_generation()
    }
    fn set_status(&mut self, status: u8) -> (u8, Vec<Effect>) {
        let r = NetDevice::set_status(self, status);
        (r.status, r.effects)
    }
    fn reset(&mut self) -> Vec<Effect> {
        NetDevice::reset(self)
    }
    fn queue_enabled(&mut self, index: u16, on: bool) -> Vec<Effect> {
        NetDevice::queue_enabled(self, index, on)
    }
    fn ctrl(&mut self, command: &[u8]) -> (u8, Vec<Effect>) {
        let r = self.handle_ctrl(command);
        (r.ack, r.effects)
    }
    fn link(&mut self, up: bool) -> Vec<Effect> {
        self.link_changed(up)
    }
    fn announce(&mut self) -> Vec<Effect> {
        NetDevice::announce(self)
    }
    fn save(&mut self) -> Vec<u8> {
        NetDevice::save(self)
    }
    fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String> {
        NetDevice::load(self, blob)
    }
    fn describe(&mut self, blob: &[u8]) -> Result<String, String> {
        sandnic_device::state::describe(blob)
    }
}

/// A refusal is a result; a sandbox failure in these tests is a bug.
fn refusal<T>(result: Result<T, DeviceError>) -> Result<T, String> {
    match result {
        Ok(v) => Ok(v),
        Err(DeviceError::Refused(why)) => Err(why),
        Err(failure) => panic!("unexpected sandbox failure: {failure}"),
    }
}

fn must<T>(result: Result<T, DeviceError>) -> T {
    result.unwrap_or_else(|e| panic!("unexpected device error: {e}"))
}

impl Dut for SandboxedDevice {
    fn features(&mut self) -> u64 {
        must(self.device_features())
    }
    fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String> {
        refusal(SandboxedDevice::set_features(self, acked))
    }
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        refusal(SandboxedDevice::read_config(self, offset, len))
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String> {
        refusal(SandboxedDevice::write_config(self, offset, data))
    }
    fn generation(&mut self) -> u32 {
        must(self.config_generation())
    }
    fn set_status(&mut self, status: u8) -> (u8, Vec<Effect>) {
        must(SandboxedDevice::set_status(self, status))
    }
    fn reset(&mut self) -> Vec<Effect> {
        must(SandboxedDevice::reset(self))
    }
    fn queue_enabled(&mut self, index: u16, on: bool) -> Vec<Effect> {
        must(SandboxedDevice::queue_enabled(self, index, on))
    }
    fn ctrl(&mut self, command: &[u8]) -> (u8, Vec<Effect>) {
        let outcome = self.handle_ctrl(command);
        assert_eq!(
            outcome.failure, None,
            "sandbox failure on a control command"
        );
        (outcome.ack, outcome.effects)
    }
    fn link(&mut self, up: bool) -> Vec<Effect> {
        must(self.link_changed(up))
    }
    fn announce(&mut self) -> Vec<Effect> {
        must(SandboxedDevice::announce(self))
    }
    fn save(&mut self) -> Vec<u8> {
        must(SandboxedDevice::save(self))
    }
    fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String> {
        refusal(SandboxedDevice::load(self, blob))
    }
    fn describe(&mut self, blob: &[u8]) -> Result<String, String> {
        refusal(SandboxedDevice::describe(self, blob))
    }
}

/// Runs every call on the native device and on the sandboxed component and
/// asserts both answer identically (the differential test).
pub struct Lockstep {
    pub native: NetDevice,
    pub wasm: SandboxedDevice,
}

impl Lockstep {
    pub fn new(config: DeviceConfig) -> Self {
        Self {
            native: NetDevice::new(config.clone()).expect("native device"),
            wasm: sandboxed(Build::V1, config),
        }
    }
}

macro_rules! both {
    ($self:ident, $name:literal, |$d:ident| $call:expr) => {{
        let native = {
            let $d: &mut dyn Dut = &mut $self.native;
            $call
        };
        let wasm = {
            let $d: &mut dyn Dut = &mut $self.wasm;
            $call
        };
        assert_eq!(
            native, wasm,
            "native and sandboxed device differ on {}",
            $name
        );
        native
    }};
}

impl Dut for Lockstep {
    fn features(&mut self) -> u64 {
        both!(self, "device-features", |d| d.features())
    }
    fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String> {
        both!(self, "set-features", |d| d.set_features(acked))
    }
    fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        both!(self, "read-config", |d| d.read_config(offset, len))
    }
    fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String> {
        both!(self, "write-config", |d| d.write_config(offset, data))
    }
    fn generation(&mut self) -> u32 {
        both!(self, "config-generation", |d| d.generation())
    }
    fn set_status(&mut self, status: u8) -> (u8, Vec<Effect>) {
        both!(self, "set-status", |d| d.set_status(status))
    }
    fn reset(&mut self) -> Vec<Effect> {
        both!(self, "reset", |d| d.reset())
    }
    fn queue_enabled(&mut self, index: u16, on: bool) -> Vec<Effect> {
        both!(self, "queue-enabled", |d| d.queue_enabled(index, on))
    }
    fn ctrl(&mut self, command: &[u8]) -> (u8, Vec<Effect>) {
        both!(self, "handle-ctrl", |d| d.ctrl(command))
    }
    fn link(&mut self, up: bool) -> Vec<Effect> {
        both!(self, "link-changed", |d| d.link(up))
    }
    fn announce(&mut self) -> Vec<Effect> {
        both!(self, "announce", |d| d.announce())
    }
    fn save(&mut self) -> Vec<u8> {
        both!(self, "save", |d| d.save())
    }
    fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String> {
        both!(self, "load", |d| d.load(blob))
    }
    fn describe(&mut self, blob: &[u8]) -> Result<String, String> {
        both!(self, "describe", |d| d.describe(blob))
    }
}
