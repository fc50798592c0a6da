//! The API's side of a client connection: reading request lines without
//! blocking the control thread, answering them.

use serde_json::Value;
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
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
