//! The `sandnic` command line, run as a real process.

use std::path::PathBuf;
use std::process::{Command, Output};

fn sandnic(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sandnic"))
        .args(args)
        .env(
            "SANDNIC_CACHE_DIR",
            PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("component-cache"),
        )
        .output()
        .expect("running sandnic")
}

fn fixture(name: &str) -> String {
    format!("{}/../tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"))
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn inspect_prints_a_saved_state_as_json() {
    let out = sandnic(&["inspect", &fixture("device-state-v1.msgpack")]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(json["version"], 1);
    assert_eq!(json["config"]["mac"], "52:54:00:12:34:56");
}

#[test]
fn inspect_picks_the_release_that_reads_the_state() {
    let v2 = fixture("device-state-v2.msgpack");
    // No flag: the embedded v0.2.0 component reads state version 2.
    let out = sandnic(&["inspect", &v2]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["announce_count"], 1);
    // --component overrides: version 1 refuses the newer state by name.
    let v1 = sandnic_host::sandbox::components::built::v1();
    let out = sandnic(&["inspect", &v2, "--component", v1.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(
        stderr(&out).contains("state version 2 is newer"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn inspect_of_a_bad_blob_fails_with_a_clear_message() {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let bad = dir.join("bad-state.bin");
    std::fs::write(&bad, b"definitely not msgpack state").unwrap();
    let out = sandnic(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let message = stderr(&out);
    assert!(message.contains("is not a valid device state"), "{message}");
    assert!(message.contains("not a sandnic device state"), "{message}");
    assert!(out.stdout.is_empty());

    let out = sandnic(&["inspect", dir.join("missing.bin").to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("reading"), "{}", stderr(&out));
}

#[test]
fn bad_usage_exits_2() {
    assert_eq!(sandnic(&["inspect"]).status.code(), Some(2));
    assert_eq!(sandnic(&["frobnicate"]).status.code(), Some(2));
}
