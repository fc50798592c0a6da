//! The unit files of `contrib/systemd`, read as systemd reads them
//! (continued lines joined, specifiers expanded), so that the tests run
//! their very command lines instead of copies that could drift.

use anyhow::Context;
use std::path::{Path, PathBuf};

/// Where a unit's specifiers point, for one instance.
#[derive(Debug, Clone)]
pub struct Specifiers {
    /// `%i`: the instance (the TAP's name).
    pub instance: String,
    /// `%t`: the runtime directory (`/run` for system units).
    pub runtime: PathBuf,
    /// `%C`: the cache directory (`/var/cache`).
    pub cache: PathBuf,
}

/// The text of `contrib/systemd/NAME`.
fn unit_text(name: &str) -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("contrib/systemd")
        .join(name);
    std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))
}

/// The value of `key=` in `text` (the first one), its continued lines
/// joined and comments left out.
fn setting(text: &str, key: &str) -> Option<String> {
    let mut joined = Vec::new();
    let mut current = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if current.is_empty() && (trimmed.starts_with('#') || trimmed.starts_with(';')) {
            continue;
        }
        match trimmed.strip_suffix('\\') {
            Some(head) => {
                current.push_str(head);
                current.push(' ');
            }
            None => {
                current.push_str(trimmed);
                joined.push(std::mem::take(&mut current));
            }
        }
    }
    joined
        .iter()
        .find_map(|l| l.strip_prefix(&format!("{key}=")).map(str::to_string))
}

impl Specifiers {
    fn expand(&self, value: &str) -> String {
        value
            .replace("%i", &self.instance)
            .replace("%t", &self.runtime.display().to_string())
            .replace("%C", &self.cache.display().to_string())
    }

    /// `key=` of unit `name`, expanded.
    pub fn setting(&self, name: &str, key: &str) -> anyhow::Result<String> {
        let text = unit_text(name)?;
        let value = setting(&text, key).with_context(|| format!("{name} has no {key}="))?;
        Ok(self.expand(&value))
    }
}
