//! A small QMP client (QEMU's JSON control protocol over a UNIX socket) for
//! the migration tests and benches: commands, their replies, and the
//! asynchronous events that arrive in between.

use anyhow::{bail, Context};
use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events read while waiting for replies, oldest first.
    events: Vec<Value>,
}

impl Qmp {
    /// Connects to QEMU's `-qmp unix:PATH,server=on,wait=off` socket
    /// (waiting for it to appear) and leaves capabilities negotiation mode.
    pub fn connect(path: &Path, timeout: Duration) -> anyhow::Result<Self> {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => return Err(e).with_context(|| format!("QMP at {}", path.display())),
            }
        };
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut qmp = Self {
            reader: BufReader::new(stream.try_clone()?),
            writer: stream,
            events: Vec::new(),
        };
        let greeting = qmp.read_message(deadline)?;
        if greeting.get("QMP").is_none() {
            bail!("not a QMP greeting: {greeting}");
        }
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    /// Runs `command` and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Value) -> anyhow::Result<Value> {
        let mut line = json!({ "execute": command, "arguments": arguments }).to_string();
        line.push('\n');
        self.writer.write_all(line.as_bytes())?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let msg = self.read_message(deadline)?;
            if let Some(ret) = msg.get("return") {
                return Ok(ret.clone());
            }
            if let Some(err) = msg.get("error") {
                bail!("QMP {command}: {err}");
            }
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    /// Waits for event `name` (also one that arrived earlier); returns it.
    pub fn wait_event(&mut self, name: &str, timeout: Duration) -> anyhow::Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(at) = self.events.iter().position(|e| e["event"] == name) {
                return Ok(self.events.remove(at));
            }
            let msg = self.read_message(deadline)?;
            if msg.get("event").is_some() {
                self.events.push(msg);
            }
        }
    }

    fn read_message(&mut self, deadline: Instant) -> anyhow::Result<Value> {
        let mut line = String::new();
        loop {
            match self.reader.read_line(&mut line) {
                Ok(0) => bail!("QMP connection closed"),
                Ok(_) if line.ends_with('\n') => return Ok(serde_json::from_str(&line)?),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e.into()),
            }
            if Instant::now() > deadline {
                bail!("QMP: no answer in time");
            }
        }
    }
}

/// An event's timestamp (wall clock, seconds), as QEMU stamps it.
pub fn event_time(event: &Value) -> Option<f64> {
    let ts = event.get("timestamp")?;
    Some(ts["seconds"].as_f64()? + ts["microseconds"].as_f64()? / 1e6)
}
