//! DPDK's `dpdk-testpmd` for the benches' comparisons, in both roles: as a
//! peer vhost-user backend (`Testpmd`: its vhost PMD forwarding to its
//! `net_tap` PMD) and as a vhost-user frontend written elsewhere
//! (`VirtioUser`: its `virtio_user` PMD generating or counting frames).

use crate::harness::{NetNs, ScratchDir};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Testpmd {
    process: Process,
    /// The vhost-user socket testpmd listens on.
    pub socket: PathBuf,
    /// The TAP testpmd created in the namespace.
    pub tap: String,
}

/// What the vhost PMD forwards to.
#[derive(Debug, Clone, Copy)]
pub enum Peer<'a> {
    /// A TAP of this name, created in the namespace (`net_tap`).
    Tap(&'a str),
    /// Nothing (`net_null`): for measuring memory with 8 queue pairs,
    /// which `net_tap` of DPDK 22.11 cannot take (it aborts: "Cannot send
    /// more than 8 FDs", then a stack-smashing abort).
    Null,
}

impl Testpmd {
    /// `dpdk-testpmd` as a vhost-user server forwarding (io mode) between
    /// `dir/NAME.sock` and `peer`, polling on `lcore`. Its stdin stays open:
    /// testpmd exits when it closes. `None` (said loudly) when testpmd is
    /// missing or does not come up.
    pub fn start(
        ns: &NetNs,
        dir: &ScratchDir,
        name: &str,
        peer: Peer<'_>,
        lcore: usize,
        queues: usize,
    ) -> Option<Self> {
        if !installed() {
            return None;
        }
        let socket = dir.path(&format!("{name}.sock"));
        let mut cmd = ns.command("dpdk-testpmd");
        let vhost = format!("net_vhost0,iface={},queues={queues}", socket.display());
        let forward_to = match peer {
            Peer::Tap(tap) => format!("net_tap0,iface={tap}"),
            Peer::Null => "net_null0".into(),
        };
        testpmd_args(&mut cmd, name, lcore, &[vhost, forward_to], queues);
        cmd.arg("--forward-mode=io")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = crate::harness::spawn(cmd).ok()?;
        let tap = match peer {
            Peer::Tap(tap) => tap,
            Peer::Null => "",
        };
        let me = Self {
            process: Process(child),
            socket,
            tap: tap.to_string(),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let tap_missing = || !tap.is_empty() && ns.ip(&["link", "show", tap]).is_err();
        while !me.socket.exists() || tap_missing() {
            if Instant::now() > deadline {
                eprintln!("\n*** dpdk-testpmd did not come up: skipping the DPDK comparison ***\n");
                return None;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        if !tap.is_empty() {
            let _ = ns.ip(&["link", "set", tap, "up"]);
        }
        Some(me)
    }
}

impl Testpmd {
    pub fn pid(&self) -> u32 {
        self.process.0.id()
    }
}

/// testpmd's arguments for both roles: forwarding on `lcore` (its main
/// lcore, idle, on the other CPU), no hugepages (1 GiB of plain memory,
/// 16 384 mbufs), the `vdevs`, `queues` queue pairs, one forwarding core,
/// forwarding from the start. The caller adds `--forward-mode`.
fn testpmd_args(cmd: &mut Command, name: &str, lcore: usize, vdevs: &[String], queues: usize) {
    let main_lcore = if lcore == 0 { 1 } else { 0 };
    cmd.arg("-l")
        .arg(format!("{main_lcore},{lcore}"))
        .args(["--main-lcore", &main_lcore.to_string()])
        .args(["--no-huge", "-m", "1024", "--no-pci", "--file-prefix"])
        .arg(format!("sandnic-{name}-{}", std::process::id()));
    for vdev in vdevs {
        cmd.arg("--vdev").arg(vdev);
    }
    cmd.args([
        "--",
        "--total-num-mbufs=16384",
        "--nb-cores=1",
        &format!("--rxq={queues}"),
        &format!("--txq={queues}"),
        "-a",
    ]);
}

/// A testpmd process, ended with its owner: stdin closed, then killed.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        drop(self.0.stdin.take());
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Whether `dpdk-testpmd` runs here (said loudly when not).
pub fn installed() -> bool {
    let found = Command::new("dpdk-testpmd")
        .arg("--help")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    if !found {
        eprintln!("\n*** dpdk-testpmd missing (apt-get install dpdk-dev): skipping the DPDK comparison ***\n");
    }
    found
}

/// What the `virtio_user` frontend does with its queues.
#[derive(Debug, Clone, Copy)]
pub enum FrontendMode {
    /// Sends UDP frames of this length as fast as the rings take them.
    TxOnly { len: usize },
    /// Receives and counts.
    RxOnly,
}

/// `dpdk-testpmd` as the vhost-user frontend of the backend at a socket:
/// its `virtio_user` PMD, forwarding on one core. Runs until `finish`.
pub struct VirtioUser {
    process: Process,
    output: std::sync::Arc<std::sync::Mutex<String>>,
}

/// testpmd's totals when it stopped.
#[derive(Debug, Clone, Copy, Default)]
pub struct FrontendTotals {
    pub rx_packets: u64,
    pub tx_packets: u64,
}

impl VirtioUser {
    /// Connects to `socket` with `queues` queue pairs, forwarding on
    /// `lcore`; returns once it forwards. `None` (said loudly) when it does
    /// not come up.
    pub fn start(
        socket: &std::path::Path,
        name: &str,
        queues: usize,
        mode: FrontendMode,
        lcore: usize,
    ) -> Option<Self> {
        // Line-buffered: testpmd's "Press enter to exit" would otherwise
        // wait in its stdio buffer until it exits.
        let mut cmd = Command::new("stdbuf");
        cmd.args(["-oL", "dpdk-testpmd"]);
        let virtio_user = format!("net_virtio_user0,path={},queues={queues}", socket.display());
        testpmd_args(&mut cmd, name, lcore, &[virtio_user], queues);
        match mode {
            FrontendMode::TxOnly { len } => {
                cmd.args(["--forward-mode=txonly", &format!("--txpkts={len}")])
            }
            FrontendMode::RxOnly => cmd.arg("--forward-mode=rxonly"),
        };
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null());
        let mut child = crate::harness::spawn(cmd).ok()?;
        let output = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let stdout = child.stdout.take()?;
        let sink = output.clone();
        std::thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                let mut all = sink.lock().unwrap_or_else(|p| p.into_inner());
                all.push_str(&line);
                all.push('\n');
            }
        });
        let me = Self {
            process: Process(child),
            output,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !me.printed("Press enter to exit") {
            if Instant::now() > deadline || me.printed("EAL: Error") {
                eprintln!(
                    "\n*** dpdk-testpmd (virtio_user) did not start forwarding:\n{}***\n",
                    me.text()
                );
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(me)
    }

    fn text(&self) -> String {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn printed(&self, what: &str) -> bool {
        self.output
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains(what)
    }

    /// Stops forwarding and returns testpmd's accumulated totals.
    pub fn finish(mut self) -> Option<FrontendTotals> {
        use std::io::Write;
        let child = &mut self.process.0;
        let _ = child.stdin.as_mut()?.write_all(b"\n");
        crate::harness::wait_for_exit(child, Duration::from_secs(20))?;
        totals(&self.text())
    }
}

/// The "Accumulated forward statistics" block of testpmd's output.
fn totals(output: &str) -> Option<FrontendTotals> {
    let block = &output[output.find("Accumulated forward statistics")?..];
    let number_after = |label: &str| -> Option<u64> {
        let rest = &block[block.find(label)? + label.len()..];
        rest.split_whitespace().next()?.parse().ok()
    };
    Some(FrontendTotals {
        rx_packets: number_after("RX-packets:")?,
        tx_packets: number_after("TX-packets:")?,
    })
}
