//! DPDK's `dpdk-testpmd` as a peer vhost-user backend (its vhost PMD
//! forwarding to its `net_tap` PMD), for the benches' comparisons.

use crate::harness::{NetNs, ScratchDir};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Testpmd {
    child: Child,
    /// The vhost-user socket testpmd listens on.
    pub socket: PathBuf,
    /// The TAP testpmd created in the namespace.
    pub tap: String,
}

impl Testpmd {
    /// `dpdk-testpmd` as a vhost-user server forwarding (io mode) between
    /// `dir/NAME.sock` and a TAP `tap` it creates in `ns`, polling on
    /// `lcore`. Its stdin stays open: testpmd exits when it closes. `None`
    /// (said loudly) when testpmd is missing or does not come up.
    pub fn start(
        ns: &NetNs,
        dir: &ScratchDir,
        name: &str,
        tap: &str,
        lcore: usize,
    ) -> Option<Self> {
        if Command::new("dpdk-testpmd")
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_err()
        {
            eprintln!("\n*** dpdk-testpmd missing (apt-get install dpdk-dev): skipping the DPDK comparison ***\n");
            return None;
        }
        let socket = dir.path(&format!("{name}.sock"));
        let main_lcore = if lcore == 0 { 1 } else { 0 };
        let mut cmd = ns.command("dpdk-testpmd");
        cmd.arg("-l")
            .arg(format!("{main_lcore},{lcore}"))
            .args(["--main-lcore", &main_lcore.to_string()])
            .args(["--no-huge", "-m", "1024", "--no-pci", "--file-prefix"])
            .arg(format!("sandnic-{name}-{}", std::process::id()))
            .arg("--vdev")
            .arg(format!("net_vhost0,iface={},queues=1", socket.display()))
            .arg("--vdev")
            .arg(format!("net_tap0,iface={tap}"))
            .args([
                "--",
                "--forward-mode=io",
                "--total-num-mbufs=16384",
                "--nb-cores=1",
                "-a",
            ])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = crate::harness::spawn(cmd).ok()?;
        let me = Self {
            child,
            socket,
            tap: tap.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !me.socket.exists() || ns.ip(&["link", "show", tap]).is_err() {
            if Instant::now() > deadline {
                eprintln!("\n*** dpdk-testpmd did not come up: skipping the DPDK comparison ***\n");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = ns.ip(&["link", "set", tap, "up"]);
        Some(me)
    }
}

impl Drop for Testpmd {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
