//! Logging from inside the sandbox: the component's only import.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    Error,
    Warn,
    Info,
    Debug,
}

/// Sends a message to the host's log (through the `host-log` import). Native
/// builds (tests, fuzzing, the wasm-vs-native benches) drop it.
pub fn log(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    crate::component::host_log(level, message);
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}
