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
    {
        use crate::bindings::sandnic::device::host_log;
        use crate::bindings::sandnic::device::types::LogLevel;
        let level = match level {
            Level::Error => LogLevel::Error,
            Level::Warn => LogLevel::Warn,
            Level::Info => LogLevel::Info,
            Level::Debug => LogLevel::Debug,
        };
        host_log::log(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    let _ = (level, message);
}
