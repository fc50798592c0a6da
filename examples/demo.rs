//! The end-to-end demo (`scripts/demo`): a User-Mode Linux guest on a
//! sandnic device backed by a TAP in a private network namespace. While the
//! host flood-pings the guest, the device component is hot-swapped to a new
//! version and the whole device is handed over to a new process — twice.
//! Prints what happened.

use sandnic::guest::{self, GuestRig, Kind};
use sandnic::harness::{network_unavailable, Sandnic, UNPRIVILEGED_USER};
use sandnic::ping::FloodPing;
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::Duration;

const GUEST_SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
step ready "$(ethtool -i eth0 | grep driver)"
"#;

fn main() -> ExitCode {
    if let Some(why) = network_unavailable().or_else(|| guest::unavailable(Kind::Uml)) {
        eprintln!("demo: cannot run here: {why}");
        return ExitCode::from(2);
    }
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("demo failed: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn step(text: &str) {
    println!("==> {text}");
}

fn ok(reply: &Value, what: &str) -> anyhow::Result<()> {
    anyhow::ensure!(reply["ok"] == true, "{what}: {reply}");
    Ok(())
}

fn run() -> anyhow::Result<()> {
    let GuestRig {
        mut guest,
        hostdir,
        sandnic: first,
        ns,
        dir,
    } = GuestRig::boot(Kind::Uml, &["--queues", "2"], GUEST_SCRIPT)?;
    step(&format!("network namespace {} with tap0 (10.88.0.1/24); sandnic serve (builtin device component v0.1.0)", ns.name));
    let driver = hostdir.wait_for("ready", Duration::from_secs(60), &guest)?;
    step(&format!(
        "UML guest up, eth0 = 10.88.0.2 ({})",
        driver.trim()
    ));
    let check = ns
        .command("ping")
        .args(["-c", "3", "-W", "2", "10.88.0.2"])
        .output()?;
    anyhow::ensure!(
        check.status.success(),
        "host cannot ping the guest: {}",
        String::from_utf8_lossy(&check.stdout)
    );
    step("ping host → guest works; starting a flood ping");
    let ping = FloodPing::start(&ns, "10.88.0.2", &dir.path("ping.log"))?;
    let pause = || std::thread::sleep(Duration::from_millis(1000));
    pause();

    let v2 = sandnic_host::sandbox::components::built::v2();
    let swap = first.api(json!({"cmd": "swap", "component": v2}))?;
    ok(&swap, "swap")?;
    let version = |v: &Value| v["version"].as_str().unwrap_or("?").to_string();
    step(&format!(
        "hot swap v{} → v{} (pause {} µs)",
        version(&swap["from"]),
        version(&swap["to"]),
        swap["pause_us"]
    ));
    pause();

    let v2_arg = v2.to_str().unwrap_or_default().to_string();
    let next = ["--component", v2_arg.as_str(), "--user", UNPRIVILEGED_USER];
    let (second, path) = Sandnic::incoming(&ns, &dir, "second", &first, &next)?;
    let h1 = first.handover(&path, false)?;
    ok(&h1, "first handover")?;
    step(&format!(
        "handover to a new process (pid {}): downtime {} µs, {} fds passed",
        second.child.id(),
        h1["downtime_us"],
        h1["fds"]
    ));
    pause();

    let (third, path) = Sandnic::incoming(&ns, &dir, "third", &second, &next)?;
    let h2 = second.handover(&path, false)?;
    ok(&h2, "second handover")?;
    step(&format!(
        "handover to a new process (pid {}): downtime {} µs, {} fds passed",
        third.child.id(),
        h2["downtime_us"],
        h2["fds"]
    ));
    pause();

    let report = ping.stop()?;
    hostdir.release("ready");
    let status = third.api(json!({"cmd": "status"}))?;
    let stats = third.api(json!({"cmd": "stats"}))?;
    // The counters travel with the device: these cover all three
    // processes (a connection that came with a handover was not accepted).
    let frontends_accepted = stats["control"]["frontends_accepted"]
        .as_u64()
        .ok_or_else(|| anyhow::anyhow!("no frontends_accepted in {stats}"))?;
    let status_code = guest.wait(Duration::from_secs(30))?;

    let gap_ms = report.largest_gap() * 1000.0;
    let lost = report.transmitted.saturating_sub(report.received);
    println!();
    println!("| what | value |");
    println!("|---|---|");
    println!(
        "| flood ping: echo requests / replies | {} / {} ({} unanswered) |",
        report.transmitted, report.received, lost
    );
    println!("| largest gap between replies | {gap_ms:.1} ms |");
    println!("| swap pause (v0.1.0 → v0.2.0) | {} µs |", swap["pause_us"]);
    println!("| handover 1 downtime | {} µs |", h1["downtime_us"]);
    println!("| handover 2 downtime | {} µs |", h2["downtime_us"]);
    let component = &status["component"];
    println!(
        "| component now serving | {} {} (state v{}) |",
        component["name"].as_str().unwrap_or("?"),
        component["version"].as_str().unwrap_or("?"),
        component["state_version"]
    );
    println!(
        "| frontend connections accepted, all three processes | {frontends_accepted} ({}) |",
        if frontends_accepted == 1 {
            "the guest never reconnected"
        } else {
            "the guest reconnected"
        }
    );
    println!(
        "| frontend connected at the end | {} |",
        status["frontend_connected"]
    );
    println!(
        "| guest frames rx/tx (all three processes) | {} / {} |",
        stats["queues"][0]["rx_packets"], stats["queues"][0]["tx_packets"]
    );
    println!("| guest script exit | {status_code} |");
    anyhow::ensure!(status_code == 0, "guest script failed");
    anyhow::ensure!(
        status["frontend_connected"] == true,
        "the frontend connection was lost"
    );
    anyhow::ensure!(
        frontends_accepted == 1,
        "the frontend connected {frontends_accepted} times"
    );
    Ok(())
}
