//! The JSON-lines control API (`--api PATH`) and its client (`sandnic ctl`).
//!
//! A request is one JSON object per line with `"cmd"`; the reply is one
//! object with `"ok": true|false` and either the result fields or
//! `"error"`. Commands: `status`, `stats`, `link` (`"up": bool`), `swap`
//! (`"component": "builtin[:VERSION]"` or a file), `save` (the device
//! state, hex), `announce`, `handover` (`"path": SOCKET`, optional
//! `"new_tap": true`).

use crate::backend::NetBackend;
use crate::sandbox::{ComponentSource, Runtime};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Longest request line accepted: the client chooses the length.
const MAX_LINE: usize = 64 * 1024;

/// One connected API client and its partial input.
pub struct ApiClient {
    pub stream: UnixStream,
    buf: Vec<u8>,
}

impl ApiClient {
    pub fn new(stream: UnixStream) -> std::io::Result<Self> {
        stream.set_nonblocking(true)?;
        Ok(Self {
            stream,
            buf: Vec::new(),
        })
    }

    /// Reads what is available; returns complete lines, or None when the
    /// client is gone (closed, error, or an over-long line).
    pub fn read_lines(&mut self) -> Option<Vec<String>> {
        let mut chunk = [0u8; 4096];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
            if self.buf.len() > MAX_LINE {
                return None;
            }
        }
        let mut lines = Vec::new();
        while let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = self.buf.drain(..=pos).collect();
            lines.push(String::from_utf8_lossy(&line).trim().to_string());
        }
        Some(lines)
    }

    pub fn reply(&mut self, value: &Value) -> std::io::Result<()> {
        self.stream.set_nonblocking(false)?;
        self.stream
            .set_write_timeout(Some(Duration::from_secs(2)))?;
        let mut line = value.to_string();
        line.push('\n');
        let result = self.stream.write_all(line.as_bytes());
        self.stream.set_nonblocking(true)?;
        result
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

/// `{"ok": false, "error": …}`.
pub fn error(message: impl std::fmt::Display) -> Value {
    json!({ "ok": false, "error": message.to_string() })
}

/// Executes one request line.
pub fn handle_line(line: &str, ctx: &mut ApiContext<'_>) -> Value {
    let request: Value = match serde_json::from_str(line) {
        Ok(v) => v,
        Err(e) => return error(format!("request is not JSON: {e}")),
    };
    let Some(cmd) = request.get("cmd").and_then(Value::as_str) else {
        return error("request has no \"cmd\"");
    };
    if ctx.handover_under_way && matches!(cmd, "handover" | "swap") {
        return error(format!("cannot {cmd} now: a handover is under way"));
    }
    match cmd {
        "status" => status(ctx),
        "stats" => stats(ctx),
        "link" => match request.get("up").and_then(Value::as_bool) {
            Some(up) => match ctx.backend.set_link(up) {
                Ok(()) => json!({ "ok": true, "link_up": up }),
                Err(e) => error(e),
            },
            None => error("link needs \"up\": true|false"),
        },
        "announce" => match ctx.backend.announce() {
            Ok(()) => json!({ "ok": true }),
            Err(e) => error(e),
        },
        "handover" => match request.get("path").and_then(Value::as_str) {
            Some(path) => {
                let new_tap = request
                    .get("new_tap")
                    .and_then(Value::as_bool)
                    .unwrap_or(false);
                ctx.handover = Some(HandoverRequest {
                    destination: PathBuf::from(path),
                    new_tap,
                });
                json!({ "ok": true, "pending": true })
            }
            None => error("handover needs \"path\": SOCKET"),
        },
        "swap" => match request.get("component").and_then(Value::as_str) {
            Some(named) => swap(ctx, named),
            None => error("swap needs \"component\": \"builtin[:VERSION]\" or FILE"),
        },
        "save" => save(ctx),
        other => error(format!("unknown command {other:?}")),
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
        "features_acked": primary.and_then(|s| s.acked_features).map(|f| sandnic_device::features::names(f & !transport_bits)),
        "protocol_features": primary.map_or(0, |s| s.protocol_features),
        "sessions": sessions,
        "sandbox": b.device().stats(),
        "needs_reset": b.device().needs_reset(),
        "datapath_threads": b.datapath().thread_count(),
        "pairs": b.datapath().pair_states(),
    })
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
    json!({ "ok": true, "queues": queues, "control": ctx.backend.counters, "sandbox": ctx.backend.device().stats() })
}

fn swap(ctx: &mut ApiContext<'_>, named: &str) -> Value {
    let component = match ComponentSource::parse(named)
        .and_then(|source| ctx.runtime.load(&source).map_err(|e| format!("{e:#}")))
    {
        Ok(c) => c,
        Err(e) => return error(e),
    };
    match ctx.backend.swap(component) {
        Ok(report) => json!({
            "ok": true,
            "pause_us": report.pause.as_micros() as u64,
            "from": report.from,
            "to": report.to,
        }),
        Err(e) => error(e),
    }
}

/// The running device's state (`ctl save`), hex-encoded: what
/// `sandnic inspect` reads and a handover carries.
fn save(ctx: &mut ApiContext<'_>) -> Value {
    let info = ctx.backend.device().info().clone();
    match ctx.backend.device_mut().save() {
        Ok(state) => json!({ "ok": true, "component": info, "state": to_hex(&state) }),
        Err(e) => error(format!("saving the device state: {e}")),
    }
}

fn to_hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from `to_hex`'s text; None if it is not hex.
pub fn from_hex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok())
        .collect()
}

/// Binds a listening socket at `path`. A live socket there is "in use"; a
/// stale one (nobody answers) is replaced; anything else is left alone.
pub fn bind_unix(path: &Path) -> Result<UnixListener, String> {
    bind_then(path, |_| Ok(()))
}

/// Binds a socket only sandnic's own user may connect to (the API, a
/// handover's incoming socket): mode 0600, owned by the user sandnic will
/// run as (`--user`; it is still root while it binds).
pub fn bind_private(
    path: &Path,
    owner: Option<crate::hardening::privileges::Target>,
) -> Result<UnixListener, String> {
    bind_then(path, |staged| {
        crate::hardening::peer::owner_only(staged, owner)
    })
}

/// Binds under a private name next to `path`, runs `prepare` on it (its
/// owner and mode), and only then renames it to `path`: whoever sees the
/// socket file finds it listening and locked down already. (Bound at
/// `path` itself, the file would appear before `listen` and the
/// permissions: a client that waits for it, as `systemctl reload` does,
/// could be refused.)
fn bind_then(
    path: &Path,
    prepare: impl FnOnce(&Path) -> Result<(), String>,
) -> Result<UnixListener, String> {
    use std::os::unix::fs::FileTypeExt;
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if !meta.file_type().is_socket() {
            return Err(format!("{} exists and is not a socket", path.display()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!(
                "socket {} is in use by another process",
                path.display()
            ));
        }
    }
    let name = path
        .file_name()
        .ok_or_else(|| format!("{} names no file", path.display()))?;
    let staged = path.with_file_name(format!(
        ".{}.{}.binding",
        name.to_string_lossy(),
        std::process::id()
    ));
    let _ = std::fs::remove_file(&staged);
    let listener =
        UnixListener::bind(&staged).map_err(|e| format!("binding {}: {e}", path.display()))?;
    let placed = prepare(&staged).and_then(|()| {
        std::fs::rename(&staged, path).map_err(|e| format!("placing {}: {e}", path.display()))
    });
    if let Err(e) = placed {
        let _ = std::fs::remove_file(&staged);
        return Err(e);
    }
    Ok(listener)
}

/// `sandnic ctl`: sends one request, prints the reply, and says whether it
/// was ok.
pub fn client(api: &PathBuf, request: Value) -> Result<(Value, bool), String> {
    let mut stream =
        UnixStream::connect(api).map_err(|e| format!("connecting to {}: {e}", api.display()))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(|e| e.to_string())?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(|e| format!("sending: {e}"))?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(|e| format!("reading the reply: {e}"))?;
    let value: Value =
        serde_json::from_str(&reply).map_err(|e| format!("bad reply {reply:?}: {e}"))?;
    let ok = value.get("ok").and_then(Value::as_bool).unwrap_or(false);
    Ok((value, ok))
}
