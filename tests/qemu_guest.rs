//! QEMU (TCG, microvm) with `-netdev vhost-user` against `sandnic serve`,
//! booting Debian's stock cloud kernel. QEMU keeps the control queue and the
//! config space itself and forwards only the datapath features, so this
//! checks protocol and datapath compatibility with the most common VMM,
//! in Debian 12's QEMU 7.2 and in QEMU 10.0 from bookworm-backports.

use sandnic::guest::{GuestRig, Kind, QemuBuild};
use sandnic::require_network;
use std::time::{Duration, Instant};

const SCRIPT: &str = r#"
ip link set eth0 up
ip addr add 10.88.0.2/24 dev eth0
if ping -c 3 -W 3 10.88.0.1; then echo GUEST-PING-OK; else echo GUEST-PING-FAILED; fi
# Stay up while the host pings us.
i=0; while [ $i -lt 200 ] && [ ! -e /tmp/done ]; do sleep 0.1; i=$((i+1)); done
"#;

#[test]
fn qemu_7_2_vhost_user_netdev_pings_over_the_tap() {
    pings_over_the_tap(
        "qemu_7_2_vhost_user_netdev_pings_over_the_tap",
        QemuBuild::Debian,
    );
}

#[test]
fn qemu_10_vhost_user_netdev_pings_over_the_tap() {
    pings_over_the_tap(
        "qemu_10_vhost_user_netdev_pings_over_the_tap",
        QemuBuild::Backports,
    );
}

fn pings_over_the_tap(test: &str, qemu: QemuBuild) {
    require_network!(test);
    if let Some(why) = qemu.unavailable() {
        sandnic::harness::skip(test, &why);
        return;
    }
    let GuestRig {
        guest,
        sandnic,
        ns,
        dir: _dir,
        hostdir: _hostdir,
    } = GuestRig::boot_with(Kind::Qemu, qemu, &[], SCRIPT).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let console = guest.console();
        if console.contains("GUEST-PING-OK") {
            break;
        }
        if console.contains("GUEST-PING-FAILED") || Instant::now() > deadline {
            panic!(
                "guest → host ping failed:\n{console}\n--- sandnic ---\n{}",
                sandnic.log()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let ping = ns
        .command("ping")
        .args(["-c", "3", "-W", "3", "10.88.0.2"])
        .output()
        .unwrap();
    assert!(
        ping.status.success(),
        "host → guest ping failed: {}\n{}",
        String::from_utf8_lossy(&ping.stdout),
        sandnic.log()
    );
    let stats = sandnic.stats().unwrap();
    assert!(
        stats["queues"][0]["tx_packets"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert!(
        stats["queues"][0]["rx_packets"].as_u64().unwrap() >= 3,
        "{stats}"
    );
    assert_eq!(stats["control"]["sandbox_failures"], 0);
}
