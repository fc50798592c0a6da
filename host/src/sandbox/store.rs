//! A component's store: what a call runs in. Its data (an empty WASI
//! context, the limiter, captured stderr), the host side of the
//! component's one import (`host-log`), and `run`, the single function
//! through which every call into a component is made under the limits,
//! its failures classified as a [`SandboxError`].

use super::bindings::{sandnic, wit};
use super::limits::{InstanceLimiter, SandboxLimits};
use super::validate::{truncate_text, Invalid};
use tracing::{debug, error, info, warn};
use wasmtime::component::ResourceTable;
use wasmtime::{Engine, Store, Trap};
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
    InvalidOutput { call: &'static str, why: Invalid },
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

pub(crate) fn new_store(engine: &Engine, limits: &SandboxLimits) -> Store<InstanceData> {
    let mut store = Store::new(engine, InstanceData::new(limits));
    store.limiter(|data| &mut data.limiter);
    store
}

/// Runs `f` with a fresh fuel budget and turns any failure into a
/// [`SandboxError`] naming the call.
pub(crate) fn run<R>(
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

impl sandnic::device::types::Host for InstanceData {}

impl sandnic::device::host_log::Host for InstanceData {
    /// Component log lines go to `tracing`, cut to the text limit: the
    /// component chooses their length.
    fn log(&mut self, level: wit::LogLevel, message: String) {
        let message = truncate_text(&message, self.max_text_bytes);
        match level {
            wit::LogLevel::Error => error!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Warn => warn!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Info => info!(target: "sandnic::component", "{message}"),
            wit::LogLevel::Debug => debug!(target: "sandnic::component", "{message}"),
        }
    }
}
