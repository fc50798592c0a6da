//! The JSON-lines control API (`--api PATH`) and its client (`sandnic ctl`).
//!
//! A request is one JSON object per line, tagged by `"cmd"` (`Request`);
//! the reply is one object with `"ok": true|false` and either the result
//! fields or `"error"` with a machine-readable `"kind"` (`ApiError::kind`).
//! Commands: `status`, `stats`, `link` (`"up": bool`), `swap`
//! (`"component": "builtin[:VERSION]"` or a file), `save` (the device
//! state, hex), `announce`, `handover` (`"path": SOCKET`, optional
//! `"new_tap": true`), `limit` (`"tx"`/`"rx"`: `{"bytes": N, "frames": N,
//! "burst_bytes": N, "burst_frames": N}` sets a direction's limit, `null`
//! removes it, a direction left out is unchanged).
//!
//! - `server.rs` — a client connection as the serving process reads it
//! - `client.rs` — the client side (`sandnic ctl`, tests)

mod client;
mod server;

pub use client::{client, from_hex, to_hex, ClientError};
pub use server::ApiClient;

use crate::backend::NetBackend;
use crate::datapath::rate_limit::{LimitSpecs, RateSpec, SpecError};
use crate::sandbox::{ComponentSource, DeviceError, Runtime, SwapError};
use serde::Deserialize;
use serde_json::{json, Value};
use std::path::PathBuf;
use std::sync::Arc;

/// One request.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(tag = "cmd", rename_all = "snake_case")]
pub enum Request {
    Status,
    Stats,
    Link {
        up: bool,
    },
    Announce,
    Swap {
        component: String,
    },
    Save,
    Handover {
        path: PathBuf,
        #[serde(default)]
        new_tap: bool,
    },
    Limit {
        /// Left out: unchanged; `null`: removed.
        #[serde(default, deserialize_with = "present")]
        tx: Option<Option<RateSpec>>,
        #[serde(default, deserialize_with = "present")]
        rx: Option<Option<RateSpec>>,
    },
}

/// A field that is there, `null` or not: `Some(None)` for `null` (a field
/// left out is `None` through `#[serde(default)]`).
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// Why a request failed; `kind` names it for programs.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The line is not a request: not JSON, no or an unknown `"cmd"`, a
    /// field missing or of the wrong type.
    #[error("bad request: {0}")]
    BadRequest(String),
    /// A handover is under way: another one, or a swap, would change the
    /// device under it.
    #[error("cannot {0} now: a handover is under way")]
    Busy(&'static str),
    /// The device model refused, or failed in the sandbox.
    #[error(transparent)]
    Device(#[from] DeviceError),
    /// The component to swap in names no release of this binary.
    #[error(transparent)]
    NoSuchRelease(#[from] crate::sandbox::NoSuchRelease),
    /// The component to swap in could not be loaded.
    #[error("{0:#}")]
    Component(anyhow::Error),
    /// The swap did not happen; the component that served serves on.
    #[error(transparent)]
    Swap(#[from] SwapError),
    /// The handover did not happen; this process serves on.
    #[error("{0}")]
    Handover(#[from] crate::handover::source::HandoverError),
    /// The TAP device was deleted: the link stays down.
    #[error("the TAP {0:?} is gone: the link stays down (serve the device on a new TAP)")]
    TapGone(String),
    /// A rate limit the device cannot take; neither direction changed.
    #[error("{0} limit: {1}")]
    Limit(&'static str, SpecError),
}

impl ApiError {
    /// A stable name for the kind of failure.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::BadRequest(_) => "bad_request",
            Self::Busy(_) => "busy",
            Self::Device(DeviceError::Refused(_)) => "device_refused",
            Self::Device(DeviceError::Sandbox(_)) => "device_failed",
            Self::NoSuchRelease(_) | Self::Component(_) => "component",
            Self::Swap(e) => e.kind(),
            Self::Handover(e) => e.kind(),
            Self::TapGone(_) => "tap_gone",
            Self::Limit(..) => "bad_limit",
        }
    }

    /// The reply carrying this error.
    pub fn reply(&self) -> Value {
        json!({ "ok": false, "error": self.to_string(), "kind": self.kind() })
    }
}

/// A handover the API asked for; the server performs it after the current
/// event and answers the client then.
#[derive(Debug, Clone)]
pub struct HandoverRequest {
    /// Where the new process waits (`serve --incoming PATH`).
    pub destination: PathBuf,
    /// Let the destination open the TAP by name instead of passing its fds.
    pub new_tap: bool,
}

/// Everything an API command may touch.
pub struct ApiContext<'a> {
    pub backend: &'a mut NetBackend,
    pub runtime: &'a Arc<Runtime>,
    pub connected: bool,
    /// A handover was asked for and is not over: another handover or a
    /// swap would change the device under it.
    pub handover_under_way: bool,
    /// Set by `handover`.
    pub handover: Option<HandoverRequest>,
}

/// Executes one request line; the reply.
pub fn handle_line(line: &str, ctx: &mut ApiContext<'_>) -> Value {
    let request = match serde_json::from_str::<Request>(line) {
        Ok(request) => request,
        Err(e) => return ApiError::BadRequest(e.to_string()).reply(),
    };
    handle(request, ctx).unwrap_or_else(|e| e.reply())
}

fn handle(request: Request, ctx: &mut ApiContext<'_>) -> Result<Value, ApiError> {
    match request {
        Request::Status => Ok(status(ctx)),
        Request::Stats => Ok(stats(ctx)),
        Request::Link { up } => {
            if up && ctx.backend.tap_is_gone() {
                let name = ctx.backend.datapath().tap().name().to_string();
                return Err(ApiError::TapGone(name));
            }
            ctx.backend.set_link(up)?;
            Ok(json!({ "ok": true, "link_up": up }))
        }
        Request::Announce => {
            ctx.backend.announce()?;
            Ok(json!({ "ok": true }))
        }
        Request::Swap { component } => {
            if ctx.handover_under_way {
                return Err(ApiError::Busy("swap"));
            }
            swap(ctx, &component)
        }
        Request::Save => save(ctx),
        Request::Limit { tx, rx } => limit(ctx, tx, rx),
        Request::Handover { path, new_tap } => {
            if ctx.handover_under_way {
                return Err(ApiError::Busy("handover"));
            }
            ctx.handover = Some(HandoverRequest {
                destination: path,
                new_tap,
            });
            Ok(json!({ "ok": true, "pending": true }))
        }
    }
}

fn status(ctx: &mut ApiContext<'_>) -> Value {
    let b = &*ctx.backend;
    let info = b.device().info();
    let config = b.device().config();
    // The driving frontend first; during a local migration, a standby too.
    let sessions = b.session_reports();
    let transport_bits = crate::vhost_user::F_PROTOCOL_FEATURES | crate::vhost_user::F_LOG_ALL;
    let primary = sessions.first();
    json!({
        "ok": true,
        "component": { "name": info.name, "version": info.version, "state_version": info.state_version, "origin": b.device().component().origin },
        "frontend_connected": ctx.connected,
        "mac": sandnic_device::format_mac(&config.mac),
        "tap": b.datapath().tap().name(),
        "queue_pairs": { "max": config.max_queue_pairs, "active": b.active_pairs() },
        "link_up": b.link_up(),
        "tap_gone": b.tap_is_gone(),
        "features_acked": primary.and_then(|s| s.acked_features).map(|f| sandnic_device::features::names(f & !transport_bits)),
        "protocol_features": primary.map_or(0, |s| s.protocol_features),
        "sessions": sessions,
        "sandbox": b.device().stats(),
        "needs_reset": b.device().needs_reset(),
        "datapath_threads": b.datapath().thread_count(),
        "pairs": b.datapath().pair_states(),
        "limits": limits_shown(b.datapath().limits()),
    })
}

/// Sets the limits named (both checked first: a bad one changes nothing).
fn limit(
    ctx: &mut ApiContext<'_>,
    tx: Option<Option<RateSpec>>,
    rx: Option<Option<RateSpec>>,
) -> Result<Value, ApiError> {
    let check = |name, spec: Option<Option<RateSpec>>| {
        spec.map(|s| s.map(RateSpec::validated).transpose())
            .transpose()
            .map_err(|e| ApiError::Limit(name, e))
    };
    let (tx, rx) = (check("tx", tx)?, check("rx", rx)?);
    let datapath = ctx.backend.datapath();
    let mut limits = datapath.limits();
    if let Some(tx) = tx {
        limits.tx = tx;
    }
    if let Some(rx) = rx {
        limits.rx = rx;
    }
    datapath.set_limits(limits);
    tracing::info!(tx = ?limits.tx.map(|s| s.to_string()), rx = ?limits.rx.map(|s| s.to_string()), "rate limits set");
    Ok(json!({ "ok": true, "limits": limits_shown(limits) }))
}

/// The limits with the bursts in force (a default burst shown as its
/// value).
fn limits_shown(limits: LimitSpecs) -> Value {
    let one = |spec: Option<RateSpec>| {
        spec.map(|s| {
            json!({
                "bytes": s.bytes,
                "frames": s.frames,
                "burst_bytes": s.burst_bytes_or_default(),
                "burst_frames": s.burst_frames_or_default(),
            })
        })
    };
    json!({ "tx": one(limits.tx), "rx": one(limits.rx) })
}

fn stats(ctx: &mut ApiContext<'_>) -> Value {
    let queues: Vec<Value> = ctx
        .backend
        .datapath()
        .stats()
        .iter()
        .enumerate()
        .map(|(pair, s)| {
            let mut v = serde_json::to_value(s).expect("plain counters");
            v["pair"] = pair.into();
            v
        })
        .collect();
    let datapath = ctx.backend.datapath();
    let (tx_waits, rx_waits) = datapath.throttle_waits();
    let limits = json!({
        "tx": { "throttled": tx_waits },
        "rx": { "throttled": rx_waits, "tap_dropped": datapath.tap().kernel_drops() },
    });
    json!({ "ok": true, "queues": queues, "control": ctx.backend.counters, "sandbox": ctx.backend.device().stats(), "limits": limits })
}

fn swap(ctx: &mut ApiContext<'_>, named: &str) -> Result<Value, ApiError> {
    let source = ComponentSource::parse(named)?;
    let component = ctx.runtime.load(&source).map_err(ApiError::Component)?;
    let report = ctx.backend.swap(component)?;
    Ok(json!({
        "ok": true,
        "pause_us": report.pause.as_micros() as u64,
        "from": report.from,
        "to": report.to,
    }))
}

/// The running device's state (`ctl save`), hex-encoded: what
/// `sandnic inspect` reads and a handover carries.
fn save(ctx: &mut ApiContext<'_>) -> Result<Value, ApiError> {
    let info = ctx.backend.device().info().clone();
    let state = ctx.backend.device_mut().save()?;
    Ok(json!({ "ok": true, "component": info, "state": to_hex(&state) }))
}
