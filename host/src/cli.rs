//! The `sandnic` command line.

use crate::sandbox::{ComponentSource, Runtime, SandboxedDevice};
use clap::{Parser, Subcommand};
use sandnic_device::{Compat, DeviceConfig, Offloads};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Debug, Parser)]
#[command(name = "sandnic", version, about = "vhost-user virtio-net backend with a sandboxed (wasm) device model")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Print a saved device state as JSON.
    Inspect {
        /// The saved state (as written by `save`, a handover or a fixture).
        file: PathBuf,
        /// Decode with this component instead of the builtin one (a newer
        /// component understands newer state versions).
        #[arg(long)]
        component: Option<PathBuf>,
    },
}

/// Runs the command line; the exit code follows the usual convention
/// (0 ok, 1 the operation failed, 2 bad usage).
pub fn main() -> ExitCode {
    init_tracing();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    let result = match cli.command {
        Command::Inspect { file, component } => inspect(&file, component),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("sandnic: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SANDNIC_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).try_init();
}

fn inspect(file: &PathBuf, component: Option<PathBuf>) -> anyhow::Result<()> {
    use anyhow::Context;
    let blob = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    let runtime = Runtime::with_defaults()?;
    let source = component.map_or(ComponentSource::Builtin, ComponentSource::File);
    let component = runtime.load(&source)?;
    let mut device = SandboxedDevice::new(runtime, component, placeholder_config())?;
    let json = device.describe(&blob).with_context(|| format!("{} is not a valid device state", file.display()))?;
    println!("{json}");
    Ok(())
}

/// `describe` does not depend on the device's configuration; any valid one
/// serves to instantiate the component.
fn placeholder_config() -> DeviceConfig {
    DeviceConfig {
        mac: [0x02, 0, 0, 0, 0, 1],
        max_queue_pairs: 1,
        mtu: None,
        backend_offloads: Offloads::empty(),
        compat: Compat::default(),
    }
}
