//! Every limit the sandbox puts on the device component, in one place.
//!
//! The component interprets guest- and stream-controlled data, so it must be
//! assumed hostile: it may loop, allocate without end, recurse, or return
//! values crafted to hurt the host. Each limit below exists because of one of
//! those, and each is enforced by wasmtime (CPU, memory, stack) or by the
//! host's validation of outputs (sizes of what comes back).

use wasmtime::ResourceLimiter;

/// The limits applied to every instance and every call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SandboxLimits {
    /// Fuel granted to each call. A call that runs out traps with
    /// `OutOfFuel`. Control-plane calls use well under 1 % of this (a
    /// 64-byte control command is about 10k units, a save about 100k); the
    /// cap turns an infinite loop into a ~1 ms stop instead of a hung vCPU
    /// thread. Fuel is deterministic, unlike a wall-clock deadline, so a
    /// replayed call cannot fail where the original succeeded.
    pub fuel_per_call: u64,
    /// Largest linear memory per instance. The device needs well under 1 MiB
    /// (a full MAC table is 384 bytes); 16 MiB bounds what a hostile or
    /// buggy component can take from the host.
    pub memory_bytes: usize,
    /// Largest wasm stack. Deep recursion traps instead of reaching the
    /// host's own stack.
    pub wasm_stack_bytes: usize,
    /// Most table elements (function tables) per instance.
    pub table_elements: usize,
    /// Most effects one call may return. A real call returns at most five;
    /// more is a flood the host refuses.
    pub max_effects: usize,
    /// Largest saved state accepted from the component. States handed *to*
    /// a component are held to the device format's own limit
    /// (`sandnic_device::state::MAX_STATE_LEN`).
    pub max_state_bytes: usize,
    /// Largest `describe` output, and the cut-off for log lines and error
    /// strings the component returns.
    pub max_text_bytes: usize,
    /// Bytes of the component's stderr kept (panic messages).
    pub stderr_capture_bytes: usize,
    /// Mutating calls remembered since the last checkpoint before a fresh
    /// checkpoint (a `save`) is taken. Restoring after a trap replays at most
    /// this many calls.
    pub replay_log_len: usize,
}

impl Default for SandboxLimits {
    fn default() -> Self {
        Self {
            fuel_per_call: 20_000_000,
            memory_bytes: 16 << 20,
            wasm_stack_bytes: 256 << 10,
            table_elements: 10_000,
            max_effects: 16,
            max_state_bytes: sandnic_device::state::MAX_STATE_LEN,
            max_text_bytes: 1 << 20,
            stderr_capture_bytes: 16 << 10,
            replay_log_len: 64,
        }
    }
}

/// The per-store resource limiter. Unlike wasmtime's `StoreLimits` it
/// remembers that a limit was hit, so a trap that follows (the guest's
/// allocator aborts when `memory.grow` fails) can be reported as what it
/// really is: the memory cap.
pub struct InstanceLimiter {
    memory_bytes: usize,
    table_elements: usize,
    pub(crate) memory_limit_hit: bool,
}

impl InstanceLimiter {
    pub fn new(limits: &SandboxLimits) -> Self {
        Self {
            memory_bytes: limits.memory_bytes,
            table_elements: limits.table_elements,
            memory_limit_hit: false,
        }
    }
}

impl ResourceLimiter for InstanceLimiter {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        let allowed = desired <= self.memory_bytes;
        self.memory_limit_hit |= !allowed;
        Ok(allowed)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= self.table_elements)
    }

    fn instances(&self) -> usize {
        // A component instantiates a handful of core modules (its own code,
        // the WASI adapter shims).
        32
    }

    fn tables(&self) -> usize {
        32
    }

    fn memories(&self) -> usize {
        4
    }
}
