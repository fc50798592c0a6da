//! The wasmtime engine, the linker with the only imports a component gets,
//! and the cache of precompiled components.
//!
//! Compiling a component takes 75-150 ms here; deserializing the
//! precompiled artifact takes about 0.1 ms. A new backend process (hot swap,
//! handover destination) therefore loads from a file cache keyed by the
//! component's bytes and the engine's compatibility hash.

use super::bindings::{wit, VirtioNetDevice, VirtioNetDevicePre};
use super::limits::SandboxLimits;
use super::store::{new_store, run, InstanceData, SandboxError};
use super::validate::{self, Invalid};
use anyhow::{bail, Context};
use nix::unistd::{Gid, Uid};
use std::hash::{DefaultHasher, Hash, Hasher};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{debug, warn};
use wasmtime::component::{Component, HasData, Linker, ResourceTable};
use wasmtime::{Config, Engine};

/// Where a component comes from.
#[derive(Debug, Clone)]
pub enum ComponentSource {
    /// The device component built into this binary.
    Builtin,
    /// One of the released components embedded in this binary.
    Released(&'static super::components::Released),
    File(PathBuf),
    /// A component that came with a handover (the source had it from a
    /// file): its bytes, and where the source had it from.
    Received {
        bytes: Arc<[u8]>,
        origin: String,
    },
}

/// Largest component accepted from a file or a handover peer (the
/// released ones are about 500 KiB): the peer chooses what it sends, and
/// all of it is held in memory and compiled.
pub const MAX_COMPONENT_BYTES: usize = 8 << 20;

impl ComponentSource {
    /// What an operator names: `builtin` (this binary's device component),
    /// `builtin:VERSION` (a release embedded in this binary, see
    /// `sandnic inspect`), or the path of a component file (`./builtin` for
    /// a file of that name).
    pub fn parse(text: &str) -> Result<Self, NoSuchRelease> {
        use super::components::RELEASED;
        match text.split_once(':') {
            _ if text == "builtin" => Ok(Self::Builtin),
            Some(("builtin", version)) => RELEASED
                .iter()
                .find(|r| r.version == version)
                .map(Self::Released)
                .ok_or_else(|| NoSuchRelease(version.into())),
            _ => Ok(Self::File(PathBuf::from(text))),
        }
    }
}

/// `builtin:VERSION` names a release this binary does not embed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("no release {0} is built into this sandnic (it has {known:?})", known = super::components::RELEASED.iter().map(|r| r.version).collect::<Vec<_>>())]
pub struct NoSuchRelease(pub String);

/// A compiled component, ready to instantiate cheaply many times.
pub struct DeviceComponent {
    pub(crate) pre: VirtioNetDevicePre<InstanceData>,
    /// What the component says about itself (validated).
    pub info: ComponentInfo,
    /// Where it came from, for logs and reports.
    pub origin: String,
    /// Its bytes, when they are not built into sandnic (a file, or a
    /// handover): a handover passes them on, so the destination can run the
    /// same device logic.
    pub wasm: Option<Arc<[u8]>>,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ComponentInfo {
    pub name: String,
    pub version: String,
    pub state_version: u32,
    pub oldest_state_version: u32,
}

/// A component file, refused when larger than MAX_COMPONENT_BYTES.
fn read_bounded(path: &Path) -> anyhow::Result<Vec<u8>> {
    use std::io::Read;
    let file = std::fs::File::open(path)
        .with_context(|| format!("reading component {}", path.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_COMPONENT_BYTES as u64 + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("reading component {}", path.display()))?;
    if bytes.len() > MAX_COMPONENT_BYTES {
        bail!(
            "component {} is larger than {MAX_COMPONENT_BYTES} bytes",
            path.display()
        );
    }
    Ok(bytes)
}

/// Engine + linker + limits: one per process.
pub struct Runtime {
    pub(crate) engine: Engine,
    linker: Linker<InstanceData>,
    pub(crate) limits: SandboxLimits,
    cache_dir: Option<PathBuf>,
}

impl Runtime {
    /// A runtime with `limits` and the precompiled-component cache in
    /// `cache_dir` (none: compile every time).
    pub fn new(limits: SandboxLimits, cache_dir: Option<PathBuf>) -> anyhow::Result<Arc<Self>> {
        let cache_dir = cache_dir.and_then(|dir| usable_cache_dir(&dir, Uid::effective()));
        Self::with_cache(limits, cache_dir)
    }

    fn with_cache(limits: SandboxLimits, cache_dir: Option<PathBuf>) -> anyhow::Result<Arc<Self>> {
        let engine = Engine::new(&engine_config(&limits))
            .map_err(anyhow::Error::from)
            .context("creating the wasmtime engine")?;
        let mut linker = Linker::new(&engine);
        link_stdio_only(&mut linker)?;
        VirtioNetDevice::add_to_linker::<_, wasmtime::component::HasSelf<_>>(
            &mut linker,
            |data| data,
        )?;
        Ok(Arc::new(Self {
            engine,
            linker,
            limits,
            cache_dir,
        }))
    }

    /// The runtime with default limits and the default cache directory.
    pub fn with_defaults() -> anyhow::Result<Arc<Self>> {
        Self::new(SandboxLimits::default(), default_cache_dir())
    }

    /// The default runtime of a root process that will become `owner`
    /// (`--user`): root's own cache (mode 0700, under root's home) is out
    /// of reach after the drop, and without a cache every `swap` compiles
    /// its component again (75–150 ms of CPU here, seconds unoptimised).
    /// The cache is then `uid-N` under `$SANDNIC_CACHE_DIR`, else under
    /// `/var/cache/sandnic` (never under root's home, which `owner` cannot
    /// enter), owned by that user, in a parent that others may traverse but
    /// not list or write.
    pub fn with_defaults_for(owner: Option<(Uid, Gid)>) -> anyhow::Result<Arc<Self>> {
        let Some((uid, gid)) = owner else {
            return Self::with_defaults();
        };
        let base = std::env::var_os("SANDNIC_CACHE_DIR")
            .map_or_else(|| PathBuf::from("/var/cache/sandnic"), PathBuf::from);
        let cache_dir =
            per_user_cache_dir(&base, uid, gid).and_then(|dir| usable_cache_dir(&dir, uid));
        Self::with_cache(SandboxLimits::default(), cache_dir)
    }

    pub fn limits(&self) -> &SandboxLimits {
        &self.limits
    }

    /// Compiles (or fetches from the cache) and pre-links a component, then
    /// asks it what it is.
    pub fn load(
        self: &Arc<Self>,
        source: &ComponentSource,
    ) -> anyhow::Result<Arc<DeviceComponent>> {
        let (bytes, origin, wasm): (&[u8], String, Option<Arc<[u8]>>) = match source {
            ComponentSource::Builtin => (super::components::BUILTIN, "builtin".into(), None),
            ComponentSource::Released(r) => (r.bytes, format!("builtin:{}", r.version), None),
            ComponentSource::File(path) => {
                let bytes: Arc<[u8]> = read_bounded(path)?.into();
                (&[], path.display().to_string(), Some(bytes))
            }
            ComponentSource::Received { bytes, origin } => {
                if bytes.len() > MAX_COMPONENT_BYTES {
                    bail!(
                        "a component of {} bytes (at most {MAX_COMPONENT_BYTES})",
                        bytes.len()
                    );
                }
                (
                    &[],
                    format!("{origin} (from the handover)"),
                    Some(bytes.clone()),
                )
            }
        };
        let bytes = wasm.as_deref().unwrap_or(bytes);
        let component = self
            .compile_cached(bytes)
            .with_context(|| format!("compiling component {origin}"))?;
        let instance_pre = self.linker.instantiate_pre(&component).map_err(anyhow::Error::from).with_context(|| {
            format!("component {origin} needs imports sandnic does not grant (only host-log and stdio)")
        })?;
        let pre = VirtioNetDevicePre::new(instance_pre)?;
        let info =
            query_info(self, &pre).with_context(|| format!("querying component {origin}"))?;
        Ok(Arc::new(DeviceComponent {
            pre,
            info,
            origin,
            wasm,
        }))
    }

    fn compile_cached(&self, bytes: &[u8]) -> anyhow::Result<Component> {
        let Some(dir) = &self.cache_dir else {
            return Ok(Component::new(&self.engine, bytes)?);
        };
        let path = dir.join(format!("{:016x}.cwasm", self.cache_key(bytes)));
        if path.exists() {
            // SAFETY: the file was written by `precompile_component` of an
            // engine with the same compatibility hash (it is part of the
            // file name), into a directory only this user can write
            // (checked by `usable_cache_dir`), and renamed into place only
            // once complete.
            match unsafe { Component::deserialize_file(&self.engine, &path) } {
                Ok(component) => return Ok(component),
                Err(e) => warn!(
                    "ignoring unusable cached component {}: {e:#}",
                    path.display()
                ),
            }
        }
        let artifact = self.engine.precompile_component(bytes)?;
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        if std::fs::write(&tmp, &artifact)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = std::fs::remove_file(&tmp);
            warn!("could not write the component cache in {}", dir.display());
        }
        // SAFETY: `artifact` was produced just now by this engine's
        // `precompile_component`.
        Ok(unsafe { Component::deserialize(&self.engine, &artifact) }?)
    }

    fn cache_key(&self, bytes: &[u8]) -> u64 {
        let mut hasher = DefaultHasher::new();
        self.engine
            .precompile_compatibility_hash()
            .hash(&mut hasher);
        bytes.hash(&mut hasher);
        hasher.finish()
    }
}

/// Engine settings. Fuel gives every call a deterministic CPU budget; the
/// async/concurrency machinery is off because calls are synchronous and it
/// costs about 3x per call; memory may not be reserved beyond the cap.
/// Compilation runs on the calling thread (the crate's
/// `parallel-compilation` feature is off): a compiler thread pool would be
/// spawned lazily by whichever thread compiles first and inherit its
/// seccomp filter, so every thread's role would no longer be fixed.
fn engine_config(limits: &SandboxLimits) -> Config {
    let mut config = Config::new();
    config
        .consume_fuel(true)
        .max_wasm_stack(limits.wasm_stack_bytes)
        .concurrency_support(false);
    config
}

struct Stdio;
impl HasData for Stdio {
    type Data<'a> = &'a mut ResourceTable;
}

/// Links only what Rust's std for `wasm32-wasip2` imports to report panics:
/// `wasi:io` streams and `wasi:cli` stdio/terminal/environment/exit. The contexts
/// behind them are empty (no args, no env, stdin empty, stdout discarded,
/// stderr captured): no file system, network, clock or randomness exists for
/// the component. A component importing anything else fails to link.
fn link_stdio_only(linker: &mut Linker<InstanceData>) -> anyhow::Result<()> {
    use wasmtime_wasi::cli::WasiCli;
    use wasmtime_wasi::p2::bindings::{cli, sync};
    use wasmtime_wasi::WasiView as _;
    wasmtime_wasi::p2::bindings::io::error::add_to_linker::<_, Stdio>(linker, |d| d.ctx().table)?;
    sync::io::poll::add_to_linker::<_, Stdio>(linker, |d| d.ctx().table)?;
    sync::io::streams::add_to_linker::<_, Stdio>(linker, |d| d.ctx().table)?;
    use wasmtime_wasi::cli::WasiCliView as _;
    cli::exit::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::environment::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::stdin::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::stdout::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::stderr::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::terminal_input::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::terminal_output::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::terminal_stdin::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::terminal_stdout::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    cli::terminal_stderr::add_to_linker::<_, WasiCli>(linker, InstanceData::cli)?;
    Ok(())
}

/// `$SANDNIC_CACHE_DIR`, else `$XDG_CACHE_HOME/sandnic`, else
/// `~/.cache/sandnic`.
pub fn default_cache_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("SANDNIC_CACHE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|home| Path::new(&home).join(".cache")))?;
    Some(base.join("sandnic"))
}

/// `base/uid-N` for `uid`, created (as root, before the drop) with mode
/// 0700 and handed to `uid`; `base` gets search permission for others so
/// that `uid` can reach it.
fn per_user_cache_dir(base: &Path, uid: Uid, gid: Gid) -> Option<PathBuf> {
    let dir = base.join(format!("uid-{uid}"));
    let prepare = || -> anyhow::Result<()> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)?;
        let base_mode = std::fs::metadata(base)?.permissions().mode();
        if base_mode & 0o011 != 0o011 {
            std::fs::set_permissions(
                base,
                std::fs::Permissions::from_mode((base_mode | 0o011) & 0o7777),
            )?;
        }
        nix::unistd::chown(&dir, Some(uid), Some(gid))?;
        Ok(())
    };
    match prepare() {
        Ok(()) => Some(dir),
        Err(e) => {
            warn!(
                "not caching compiled components in {}: {e:#}",
                dir.display()
            );
            None
        }
    }
}

/// The cache directory if it is safe to load native code from: owned by
/// `owner` (who this process runs as, or will once it drops root) and
/// writable by nobody else. Created with mode 0700 if missing.
fn usable_cache_dir(dir: &Path, owner: Uid) -> Option<PathBuf> {
    let check = || -> anyhow::Result<()> {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)?;
        }
        let meta = std::fs::metadata(dir)?;
        if meta.uid() != owner.as_raw() || meta.permissions().mode() & 0o022 != 0 {
            bail!("not owned by this user or writable by others");
        }
        Ok(())
    };
    match check() {
        Ok(()) => {
            debug!("component cache in {}", dir.display());
            Some(dir.to_path_buf())
        }
        Err(e) => {
            warn!(
                "not caching compiled components in {}: {e:#}",
                dir.display()
            );
            None
        }
    }
}

impl TryFrom<wit::DeviceInfo> for ComponentInfo {
    type Error = Invalid;

    /// The component's self-description is untrusted like everything else:
    /// short strings, a sane version range.
    fn try_from(info: wit::DeviceInfo) -> Result<Self, Invalid> {
        let name = validate::bounded_text(info.name, 64, "component name")?;
        let version = validate::bounded_text(info.version, 64, "component version")?;
        if info.oldest_state_version > info.state_version {
            return Err(Invalid::StateVersions {
                oldest: info.oldest_state_version,
                newest: info.state_version,
            });
        }
        Ok(Self {
            name,
            version,
            state_version: info.state_version,
            oldest_state_version: info.oldest_state_version,
        })
    }
}

/// Instantiates a throw-away instance to call the free function `info`.
fn query_info(
    runtime: &Runtime,
    pre: &VirtioNetDevicePre<InstanceData>,
) -> anyhow::Result<ComponentInfo> {
    let mut store = new_store(&runtime.engine, &runtime.limits);
    let fuel = runtime.limits.fuel_per_call;
    let bindings = run(&mut store, fuel, "instantiate", |s| pre.instantiate(s))?;
    let info = run(&mut store, fuel, "info", |s| {
        bindings.sandnic_device_device().call_info(s)
    })?;
    ComponentInfo::try_from(info)
        .map_err(|why| SandboxError::InvalidOutput { call: "info", why }.into())
}
