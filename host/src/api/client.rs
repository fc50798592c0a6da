//! The API's client (`sandnic ctl`, and the tests): one request, one reply.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// How long a reply may take: a handover's answer comes once it is over.
const REPLY_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("connecting to {path}: {error}")]
    Connect {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("sending: {0}")]
    Send(std::io::Error),
    #[error("reading the reply: {0}")]
    Receive(std::io::Error),
    #[error("bad reply {reply:?}: {error}")]
    BadReply {
        reply: String,
        error: serde_json::Error,
    },
}

/// Sends one request to the API at `api`; the reply, and whether it was ok.
pub fn client(api: &Path, request: Value) -> Result<(Value, bool), ClientError> {
    let mut stream = UnixStream::connect(api).map_err(|error| ClientError::Connect {
        path: api.into(),
        error,
    })?;
    stream
        .set_read_timeout(Some(REPLY_TIMEOUT))
        .map_err(ClientError::Receive)?;
    let mut line = request.to_string();
    line.push('\n');
    stream
        .write_all(line.as_bytes())
        .map_err(ClientError::Send)?;
    let mut reply = String::new();
    BufReader::new(&stream)
        .read_line(&mut reply)
        .map_err(ClientError::Receive)?;
    let value: Value =
        serde_json::from_str(&reply).map_err(|error| ClientError::BadReply { reply, error })?;
    let ok = value.get("ok").and_then(Value::as_bool).unwrap_or(false);
    Ok((value, ok))
}

/// The device state `save` returns, hex-encoded.
pub fn to_hex(bytes: &[u8]) -> String {
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
