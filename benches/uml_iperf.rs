//! iperf3 from a User-Mode Linux guest (its real virtio_net driver) through
//! sandnic to an iperf3 server on the TAP's host side: a sanity figure for
//! the whole stack, not a comparison (UML's own overhead dominates).
//! `cargo bench --bench uml_iperf`; needs root, user-mode-linux, iperf3.

use sandnic::guest::{self, GuestRig, Kind};
use sandnic::harness::{bench_should_run, network_unavailable, spawn};
use std::process::Stdio;
use std::time::Duration;

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
step ready x
iperf3 -c 10.88.0.1 -t 5 -J > /mnt/iperf.json 2>&1
echo $? > /mnt/iperf.rc
"#;

fn main() {
    if !bench_should_run("uml_iperf", || {
        network_unavailable().or_else(|| guest::unavailable(Kind::Uml))
    }) {
        return;
    }
    let GuestRig {
        mut guest,
        hostdir,
        ns,
        sandnic: _sandnic,
        dir: _dir,
    } = GuestRig::boot(Kind::Uml, &[], SCRIPT).unwrap();
    hostdir
        .wait_for("ready", Duration::from_secs(60), &guest)
        .unwrap();
    let mut server = ns.command("iperf3");
    server.args(["-s", "-1"]).stdout(Stdio::null());
    let mut server = spawn(server).unwrap();
    std::thread::sleep(Duration::from_millis(300));
    hostdir.release("ready");
    let status = guest.wait(Duration::from_secs(60)).unwrap();
    let _ = server.kill();
    let _ = server.wait();
    let json: serde_json::Value =
        serde_json::from_str(&hostdir.read("iperf.json")).unwrap_or_default();
    let bps = json["end"]["sum_sent"]["bits_per_second"].as_f64();
    match (status, hostdir.read("iperf.rc").trim(), bps) {
        (0, "0", Some(bps)) => println!("uml-iperf3 guest->host: {:.2} Gbit/s", bps / 1e9),
        _ => panic!(
            "iperf3 failed:\n{}\n{}",
            hostdir.read("iperf.json"),
            guest.console()
        ),
    }
}
