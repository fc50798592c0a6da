//! The device components built by `host/build.rs`.

/// The shipped device component, embedded in the binary.
pub const BUILTIN: &[u8] = include_bytes!(concat!(
    env!("SANDNIC_COMPONENT_DIR"),
    "/sandnic_device.wasm"
));

/// A released device component embedded in the binary.
#[derive(Debug)]
pub struct Released {
    pub version: &'static str,
    pub bytes: &'static [u8],
}

/// Every released device component, oldest first, at least one per state
/// version: `sandnic inspect` decodes a saved state with the first one that
/// reads it, so the binary reads every state its releases can write.
pub const RELEASED: [Released; 2] = [
    Released {
        version: "0.1.0",
        bytes: BUILTIN,
    },
    Released {
        version: "0.2.0",
        bytes: include_bytes!(concat!(
            env!("SANDNIC_COMPONENT_DIR"),
            "/sandnic_device_v2.wasm"
        )),
    },
];

/// Components built alongside for tests, benches and the demo: device
/// version 2 and the deliberately hostile one. They live in the build tree.
pub mod built {
    use std::path::PathBuf;

    fn path(file: &str) -> PathBuf {
        PathBuf::from(env!("SANDNIC_COMPONENT_DIR")).join(file)
    }

    /// Device version 1 (the builtin one) as a file, for `--component`.
    pub fn v1() -> PathBuf {
        path("sandnic_device.wasm")
    }

    /// Device version 2: one more state field, state version 2.
    pub fn v2() -> PathBuf {
        path("sandnic_device_v2.wasm")
    }

    /// Misbehaves on command (loops, allocates, panics, returns bogus
    /// effects); see `sandnic_device::hostile`.
    pub fn hostile() -> PathBuf {
        path("sandnic_device_hostile.wasm")
    }
}
