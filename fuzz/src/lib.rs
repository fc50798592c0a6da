//! Shared fuzzing harness: a device under test that runs natively, or — in
//! sandbox mode (`SANDNIC_FUZZ_SANDBOX=1`) — natively *and* as the wasm
//! component under the production limits, comparing every answer. A trap or
//! limit hit in the sandbox is a finding (a panic here), not a crash of the
//! host.
//!
//! Invariants checked on every call: no panic or trap; a control ack is OK
//! or ERR; an ERR leaves the saved state byte-identical; every effect lies
//! within the bounds the host validates; save → load → save round-trips.

use sandnic_device::{Compat, DeviceConfig, Effect, NetDevice, Offloads, ACK_ERR, ACK_OK};
use sandnic_host::sandbox::validate::{self, Bounds};
use sandnic_host::sandbox::{ComponentSource, DeviceComponent, DeviceError, Runtime, SandboxLimits, SandboxedDevice};
use std::sync::{Arc, OnceLock};

pub fn sandbox_mode() -> bool {
    static MODE: OnceLock<bool> = OnceLock::new();
    *MODE.get_or_init(|| std::env::var("SANDNIC_FUZZ_SANDBOX").as_deref() == Ok("1"))
}

pub fn component() -> (Arc<Runtime>, Arc<DeviceComponent>) {
    static LOADED: OnceLock<(Arc<Runtime>, Arc<DeviceComponent>)> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let cache = std::env::temp_dir().join("sandnic-fuzz-cache");
            let runtime = Runtime::new(Default::default(), Some(cache)).expect("runtime");
            let component = runtime.load(&ComponentSource::Builtin).expect("builtin component");
            (runtime, component)
        })
        .clone()
}

pub fn config(pairs: u16, mtu: Option<u16>, offloads: u8) -> DeviceConfig {
    DeviceConfig {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        max_queue_pairs: pairs.clamp(1, 8),
        mtu: mtu.map(|m| m.max(68)),
        backend_offloads: Offloads::from_bits_truncate(offloads),
        compat: Compat::default(),
    }
}

/// The effects a device may return, held to the host's own validation
/// (`sandnic_host::sandbox::validate`) under the production limits.
pub fn check_effects(config: &DeviceConfig, effects: &[Effect]) {
    let bounds = Bounds::new(config, SandboxLimits::default().max_effects);
    if let Err(invalid) = validate::check_effects(effects, &bounds) {
        panic!("the device returned an effect the host refuses: {invalid}");
    }
}

/// A device under test: native, plus the sandboxed component in sandbox
/// mode.
pub struct Dut {
    pub config: DeviceConfig,
    pub native: NetDevice,
    pub wasm: Option<SandboxedDevice>,
}

fn sandbox<T>(result: Result<T, DeviceError>) -> Result<T, String> {
    match result {
        Ok(v) => Ok(v),
        Err(DeviceError::Refused(why)) => Err(why),
        Err(DeviceError::Sandbox(failure)) => panic!("sandbox failure (finding): {failure}"),
    }
}

/// An infallible call: the sandbox must give the same value.
fn same<T: PartialEq + std::fmt::Debug>(name: &str, native: T, wasm: Option<Result<T, DeviceError>>) -> T {
    if let Some(wasm) = wasm {
        let wasm = sandbox(wasm).unwrap_or_else(|e| panic!("{name}: the sandbox refused what native did: {e}"));
        assert_eq!(native, wasm, "native and sandboxed device differ on {name}");
    }
    native
}

/// A call that may be refused: the same value or the same refusal.
fn same_result<T: PartialEq + std::fmt::Debug>(
    name: &str,
    native: Result<T, String>,
    wasm: Option<Result<T, DeviceError>>,
) -> Result<T, String> {
    if let Some(wasm) = wasm {
        assert_eq!(native, sandbox(wasm), "native and sandboxed device differ on {name}");
    }
    native
}

impl Dut {
    pub fn new(config: DeviceConfig) -> Option<Self> {
        let native = NetDevice::new(config.clone()).ok()?;
        let wasm = sandbox_mode().then(|| {
            let (runtime, component) = component();
            SandboxedDevice::new(runtime, component, config.clone()).expect("sandboxed device")
        });
        Some(Self { config, native, wasm })
    }

    pub fn set_features(&mut self, acked: u64) -> Result<Vec<Effect>, String> {
        let r = same_result("set-features", self.native.set_features(acked), self.wasm.as_mut().map(|w| w.set_features(acked)));
        if let Ok(effects) = &r {
            check_effects(&self.config, effects);
        }
        r
    }

    pub fn features(&mut self) -> u64 {
        same("device-features", self.native.device_features(), self.wasm.as_mut().map(|w| w.device_features()))
    }

    pub fn read_config(&mut self, offset: u32, len: u32) -> Result<Vec<u8>, String> {
        same_result("read-config", self.native.read_config(offset, len), self.wasm.as_mut().map(|w| w.read_config(offset, len)))
    }

    pub fn write_config(&mut self, offset: u32, data: &[u8]) -> Result<Vec<Effect>, String> {
        let r = same_result("write-config", self.native.write_config(offset, data), self.wasm.as_mut().map(|w| w.write_config(offset, data)));
        if let Ok(effects) = &r {
            check_effects(&self.config, effects);
        }
        r
    }

    pub fn set_status(&mut self, status: u8) {
        let r = self.native.set_status(status);
        check_effects(&self.config, &r.effects);
        if let Some(w) = self.wasm.as_mut() {
            let (s, e) = sandbox(w.set_status(status)).expect("set-status");
            assert_eq!((r.status, r.effects), (s, e), "set-status differs");
        }
    }

    pub fn reset(&mut self) {
        let effects = same("reset", self.native.reset(), self.wasm.as_mut().map(|w| w.reset()));
        check_effects(&self.config, &effects);
    }

    pub fn queue_enabled(&mut self, index: u16, on: bool) {
        let effects = same("queue-enabled", self.native.queue_enabled(index, on), self.wasm.as_mut().map(|w| w.queue_enabled(index, on)));
        check_effects(&self.config, &effects);
    }

    pub fn link(&mut self, up: bool) {
        let effects = same("link-changed", self.native.link_changed(up), self.wasm.as_mut().map(|w| w.link_changed(up)));
        check_effects(&self.config, &effects);
    }

    pub fn announce(&mut self) {
        let effects = same("announce", self.native.announce(), self.wasm.as_mut().map(|w| w.announce()));
        check_effects(&self.config, &effects);
    }

    pub fn save(&mut self) -> Vec<u8> {
        same("save", self.native.save(), self.wasm.as_mut().map(|w| w.save()))
    }

    pub fn load(&mut self, blob: &[u8]) -> Result<Vec<Effect>, String> {
        let r = same_result("load", self.native.load(blob), self.wasm.as_mut().map(|w| w.load(blob)));
        if let Ok(effects) = &r {
            check_effects(&self.config, effects);
        }
        r
    }

    /// One control command, with the ack and the ERR-changes-nothing
    /// invariant checked.
    pub fn ctrl(&mut self, command: &[u8]) -> u8 {
        let before = self.native.save();
        let reply = self.native.handle_ctrl(command);
        assert!(reply.ack == ACK_OK || reply.ack == ACK_ERR, "ack {}", reply.ack);
        check_effects(&self.config, &reply.effects);
        if reply.ack == ACK_ERR {
            assert!(reply.effects.is_empty(), "effects with ERR");
            assert_eq!(self.native.save(), before, "ERR changed the state");
        }
        if let Some(w) = self.wasm.as_mut() {
            let outcome = w.handle_ctrl(command);
            if let Some(failure) = outcome.failure {
                panic!("sandbox failure (finding): {failure}");
            }
            assert_eq!((reply.ack, &reply.effects), (outcome.ack, &outcome.effects), "handle-ctrl differs");
        }
        reply.ack
    }

    /// save → load into another device → save gives the same bytes.
    pub fn check_round_trip(&mut self) {
        let blob = self.save();
        with_device(&self.config, Slot::Scratch, |other| {
            other.load(&blob).expect("a saved state loads");
            assert_eq!(other.save(), blob, "save/load/save round trip");
        });
    }
}

/// Which cached device.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Slot {
    Main,
    Scratch,
}

struct Cached {
    config: DeviceConfig,
    slot: Slot,
    dut: Dut,
    fresh: Vec<u8>,
}

thread_local! {
    static DEVICES: std::cell::RefCell<Vec<Cached>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` on a device in its initial state for `config` (None if the
/// configuration is invalid). Devices are cached per configuration and put
/// back in their initial state by loading it, because instantiating a
/// sandboxed component for every input would cost more than the input.
pub fn with_device<R>(config: &DeviceConfig, slot: Slot, f: impl FnOnce(&mut Dut) -> R) -> Option<R> {
    let taken = DEVICES.with(|d| {
        let mut d = d.borrow_mut();
        let at = d.iter().position(|c| c.config == *config && c.slot == slot)?;
        Some(d.swap_remove(at))
    });
    let mut cached = match taken {
        Some(mut c) => {
            let fresh = c.fresh.clone();
            c.dut.load(&fresh).expect("the initial state loads");
            c
        }
        None => {
            let mut dut = Dut::new(config.clone())?;
            let fresh = dut.save();
            Cached { config: config.clone(), slot, dut, fresh }
        }
    };
    let result = f(&mut cached.dut);
    DEVICES.with(|d| {
        let mut d = d.borrow_mut();
        if d.len() < 64 {
            d.push(cached);
        }
    });
    Some(result)
}
