//! One live component instance: its store (with limits and captured
//! stderr), its bindings and its `net-device` resource, and the single
//! function through which every call is made under the limits.

use super::bindings::{device_api, wit, VirtioNetDevice, VirtioNetDevicePre};
use super::engine::{ComponentInfo, DeviceComponent, Runtime};
use super::limits::{InstanceLimiter, SandboxLimits};
use super::validate::truncate_text;
use wasmtime::component::{ResourceAny, ResourceTable};
use wasmtime::{Store, Trap};
use wasmtime_wasi::p2::pipe::MemoryOutputPipe;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

/// A failure the sandbox contained. The instance it happened in is dead.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SandboxError {
    /// The call used up its fuel (an endless loop, or far too much work).
    #[error("component ran out of its CPU budget in `{call}`")]
    OutOfFuel { call: &'static str },
    /// The component tried to grow its memory past the cap.
    #[error("component hit its memory limit in `{call}`")]
    MemoryLimit { call: &'static str },
    /// Recursion past the wasm stack cap.
    #[error("component overflowed its stack in `{call}`")]
    StackOverflow { call: &'static str },
    /// Any other trap: a panic, an abort, an out-of-bounds access.
    #[error("component trapped in `{call}`: {detail}")]
    Trap { call: &'static str, detail: String },
    /// The call returned, but with a value the host refuses to use.
    #[error("component returned an invalid value from `{call}`: {why}")]
    InvalidOutput { call: &'static str, why: String },
    /// The component could not be instantiated or constructed.
    #[error("component could not be instantiated: {0}")]
    Instantiate(String),
}

/// The store's data: an empty WASI context (see `engine::link_stdio_only`),
/// the limiter, and the captured stderr.
pub struct InstanceData {
    wasi: WasiCtx,
    table: ResourceTable,
    pub(crate) limiter: InstanceLimiter,
    stderr: MemoryOutputPipe,
    pub(crate) max_text_bytes: usize,
}

impl WasiView for InstanceData {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.wasi,
            table: &mut self.table,
        }
    }
}

impl InstanceData {
    fn new(limits: &SandboxLimits) -> Self {
        let stderr = MemoryOutputPipe::new(limits.stderr_capture_bytes);
        let wasi = WasiCtx::builder()
            .stderr(stderr.clone())
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .build();
        Self {
            wasi,
            table: ResourceTable::new(),
            limiter: InstanceLimiter::new(limits),
            stderr,
            max_text_bytes: limits.max_text_bytes,
        }
    }

    /// What the component wrote to stderr before dying (a panic message),
    /// without Rust's "note: run with RUST_BACKTRACE" hints.
    fn panic_message(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.stderr.contents()).into_owned();
        let lines: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with("note:"))
            .collect();
        let tail = lines[lines.len().saturating_sub(2)..].join(" ");
        (!tail.is_empty()).then(|| truncate_text(&tail, 512))
    }
}

fn new_store(runtime: &Runtime) -> Store<InstanceData> {
    let mut store = Store::new(&runtime.engine, InstanceData::new(&runtime.limits));
    store.limiter(|data| &mut data.limiter);
    store
}

/// Runs `f` with a fresh fuel budget and turns any failure into a
/// [`SandboxError`] naming the call.
fn run<R>(
    store: &mut Store<InstanceData>,
    fuel: u64,
    call: &'static str,
    f: impl FnOnce(&mut Store<InstanceData>) -> wasmtime::Result<R>,
) -> Result<R, SandboxError> {
    store.data_mut().limiter.memory_limit_hit = false;
    store
        .set_fuel(fuel)
        .map_err(|e| SandboxError::Instantiate(e.to_string()))?;
    f(store).map_err(|error| classify(call, &error, store.data()))
}

fn classify(call: &'static str, error: &wasmtime::Error, data: &InstanceData) -> SandboxError {
    if data.limiter.memory_limit_hit {
        return SandboxError::MemoryLimit { call };
    }
    tracing::debug!("{call} failed: {error:?}");
    let trap = error.chain().find_map(|cause| cause.downcast_ref::<Trap>());
    match trap {
        Some(Trap::OutOfFuel) => SandboxError::OutOfFuel { call },
        Some(Trap::StackOverflow) => SandboxError::StackOverflow { call },
        _ => {
            let mut detail = error.root_cause().to_string();
            if let Some(panic) = data.panic_message() {
                detail = format!("{detail}: {panic}");
            }
            SandboxError::Trap { call, detail }
        }
    }
}

/// Instantiates a throw-away instance to call the free function `info`.
pub(crate) fn query_info(
    runtime: &Runtime,
    pre: &VirtioNetDevicePre<InstanceData>,
) -> anyhow::Result<ComponentInfo> {
    let mut store = new_store(runtime);
    let fuel = runtime.limits.fuel_per_call;
    let bindings = run(&mut store, fuel, "instantiate", |s| pre.instantiate(s))?;
    let info = run(&mut store, fuel, "info", |s| {
        bindings.sandnic_device_device().call_info(s)
    })?;
    ComponentInfo::try_from(info)
        .map_err(|why| SandboxError::InvalidOutput { call: "info", why }.into())
}

/// A live instance with its constructed device.
pub(crate) struct Instance {
    store: Store<InstanceData>,
    bindings: VirtioNetDevice,
    device: ResourceAny,
    fuel: u64,
}

impl Instance {
    pub fn new(
        runtime: &Runtime,
        component: &DeviceComponent,
        config: &wit::DeviceConfig,
    ) -> Result<Self, SandboxError> {
        let mut store = new_store(runtime);
        let fuel = runtime.limits.fuel_per_call;
        let instantiate = |e: SandboxError| SandboxError::Instantiate(e.to_string());
        let bindings = run(&mut store, fuel, "instantiate", |s| {
            component.pre.instantiate(s)
        })
        .map_err(instantiate)?;
        let device = run(&mut store, fuel, "constructor", |s| {
            bindings
                .sandnic_device_device()
                .net_device()
                .call_constructor(s, *config)
        })
        .map_err(instantiate)?;
        Ok(Self {
            store,
            bindings,
            device,
            fuel,
        })
    }

    /// One call into the component under the per-call limits.
    pub fn call<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(
            device_api::GuestNetDevice<'_>,
            &mut Store<InstanceData>,
            ResourceAny,
        ) -> wasmtime::Result<R>,
    ) -> Result<R, SandboxError> {
        let (bindings, device) = (&self.bindings, self.device);
        run(&mut self.store, self.fuel, call, |s| {
            f(bindings.sandnic_device_device().net_device(), s, device)
        })
    }

    /// A call to one of the interface's free functions (`describe`).
    pub fn call_free<R>(
        &mut self,
        call: &'static str,
        f: impl FnOnce(&device_api::Guest, &mut Store<InstanceData>) -> wasmtime::Result<R>,
    ) -> Result<R, SandboxError> {
        let bindings = &self.bindings;
        run(&mut self.store, self.fuel, call, |s| {
            f(bindings.sandnic_device_device(), s)
        })
    }
}
