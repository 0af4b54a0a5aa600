//! Two QEMU guests (TCG, q35, intel-iommu, ivshmem-doorbell on `ivnet server`) that boot
//! systemd from a minimal Debian (bookworm, built with mmdebstrap and cached; see
//! `tests/vm/README.md`), with the ivnet Debian package installed by dpkg: the agent unit
//! enabled by the package, `tap-shm.network` in /etc/systemd/network (issue 8).
//!
//! Nothing is typed into the guests: the agent starts from its unit, systemd-networkd gives
//! `tap-shm` its address, and a oneshot test unit in the image (`tests/vm/systemd-guest/`) runs
//! the checks and prints markers on the console, which this test reads:
//!
//! 1. in each guest: `ivnet-agent` active, the address from networkd, the other guest answers
//!    pings, the journal shows the peer coming up, `ivnet status` (through the agent's control
//!    socket) lists both peers and the other's address, the package's files and unit states;
//! 2. A sends a TCP stream to B, SHA-256 equal on both ends;
//! 3. in A: the metrics service, then its timer, write the node_exporter file; `systemctl restart
//!    ivnet-agent` (networkd restores the address, traffic resumes); SIGKILL of the agent
//!    (systemd restarts it); SIGSTOP of the agent (the watchdog restarts it: checked when the
//!    unit has `WatchdogSec=`, reported as skipped otherwise).
//!
//! Boot-to-ping times are reported. Needs root, QEMU and mmdebstrap (scripts/test.sh installs
//! them); prints `SKIP ...` otherwise (fails with `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).
//! `IVNET_GUEST_DEB=path` uses a prebuilt package instead of `scripts/package.sh`;
//! `IVNET_VM_LOGS=DIR` keeps the consoles.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::server::Server;
use common::vm::*;
use common::*;

const ADDR_A: &str = "10.8.0.1";
const ADDR_B: &str = "10.8.0.2";
const PORT: u16 = 5001;
/// Size of the TCP transfer from A to B.
const TRANSFER_MIB: u32 = 8;
/// Bounds (TCG on a shared 2-core machine; these only catch hangs).
const FIRST_PING: Duration = Duration::from_secs(300);
const ALL_DONE: Duration = Duration::from_secs(600);

/// The package to install: `$IVNET_GUEST_DEB`, or built by `scripts/package.sh`.
fn package() -> (PathBuf, String) {
    if let Ok(p) = std::env::var("IVNET_GUEST_DEB") {
        let path = PathBuf::from(&p);
        assert!(path.is_file(), "IVNET_GUEST_DEB={p}: no such file");
        return (path, format!("IVNET_GUEST_DEB={p}"));
    }
    let start = Instant::now();
    let script = Path::new(REPO).join("scripts/package.sh");
    let out = run_with_timeout(Command::new(&script).current_dir(REPO), Duration::from_secs(1800));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} failed ({}):\n{stdout}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let deb = PathBuf::from(stdout.lines().last().unwrap_or("").trim());
    assert!(deb.is_file(), "scripts/package.sh printed no package path: {stdout}");
    let how = format!("scripts/package.sh took {:.1} s", start.elapsed().as_secs_f64());
    (deb, how)
}

/// The guest image (kernel + root filesystem initramfs) with `deb` installed.
fn image(deb: &Path, dir: &TempDir) -> PathBuf {
    let out_dir = dir.join("image");
    let script = Path::new(REPO).join("tests/vm/build-systemd-image.sh");
    let files = Path::new(REPO).join("tests/vm/systemd-guest");
    let out = run_with_timeout(
        Command::new(&script).arg(&out_dir).arg(deb).arg(&files),
        Duration::from_secs(1200),
    );
    assert!(
        out.status.success(),
        "{} failed ({}):\n{}{}",
        script.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    report(&format!(
        "systemd_guests:    {}",
        String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or("")
    ));
    out_dir
}

/// The per-guest files (an initramfs overlay): which role it plays, the networkd file for
/// its address, the agent's configuration, a machine-id of its own.
fn guest_files(name: &str, role: &str, me: &str, peer: &str, dir: &TempDir) -> Vec<String> {
    let write = |file: &str, text: &str| {
        let p = dir.join(&format!("{name}.{file}"));
        std::fs::write(&p, text).unwrap_or_else(|e| panic!("writing {}: {e}", p.display()));
        p
    };
    let env = write(
        "env",
        &format!("ROLE={role}\nSELF={me}\nPEER={peer}\nPORT={PORT}\nMIB={TRANSFER_MIB}\n"),
    );
    // The package's example, with this guest's address.
    let example = std::fs::read_to_string(Path::new(REPO).join("systemd/tap-shm.network"))
        .expect("reading systemd/tap-shm.network");
    assert!(example.contains("\nAddress="), "systemd/tap-shm.network has no Address= line");
    let network: String = example
        .lines()
        .map(|l| if l.starts_with("Address=") { format!("Address={me}/24") } else { l.to_string() })
        .collect::<Vec<_>>()
        .join("\n");
    let network = write("network", &(network + "\n"));
    let toml = write(
        "toml",
        "# In a VM: the ivshmem-doorbell device, through vfio-pci.\ndevice = \"auto\"\nbind = true\n",
    );
    let mut id = [0u8; 16];
    PseudoRandom::new(
        std::process::id() as u64 ^ name.len() as u64 ^ (name.as_bytes()[1] as u64) << 8,
    )
    .fill(&mut id);
    let machine_id = write("machine-id", &format!("{}\n", hex(&id)));
    let hostname = write("hostname", &format!("{name}\n"));
    let mut args = vec!["--mem".to_string(), "1G".to_string()];
    for (src, dest) in [
        (env, "/etc/ivnet-test.env"),
        (network, "/etc/systemd/network/tap-shm.network"),
        (toml, "/etc/ivnet/ivnet.toml"),
        (machine_id, "/etc/machine-id"),
        (hostname, "/etc/hostname"),
    ] {
        args.push("--file".into());
        args.push(format!("{}:{dest}", src.display()));
    }
    args
}

/// Waits until the guest's test script ends; panics (with the console) if it failed.
fn wait_done(g: &mut Guest, from: usize, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let text = g.text();
        let tail = text.get(from..).unwrap_or("");
        if let Some(at) = tail.find("IVNET-T fail step") {
            // Let it print its diagnostics (bounded) before the console tail is shown.
            let end = Instant::now() + Duration::from_secs(30);
            while !g.text().contains("IVNET-T fail-end") && Instant::now() < end {
                std::thread::sleep(Duration::from_millis(200));
            }
            let line = tail[at..].lines().next().unwrap_or("");
            let text = g.text();
            let diag = text.get(from + at..).unwrap_or("");
            g.fail(&format!("the guest's test script failed: {line}\n{diag}"));
        }
        if tail.contains("IVNET-T done") {
            return;
        }
        if Instant::now() > deadline {
            g.fail(&format!("the guest's test script did not finish within {timeout:?}"));
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn field<'a>(g: &Guest, m: &'a HashMap<String, String>, k: &str) -> &'a str {
    m.get(k).map(String::as_str).unwrap_or_else(|| g.fail(&format!("marker without {k}: {m:?}")))
}

fn ms(g: &Guest, m: &HashMap<String, String>, k: &str) -> f64 {
    field(g, m, k).parse::<f64>().unwrap_or_else(|_| g.fail(&format!("{k} is not a number: {m:?}")))
        / 1000.0
}

#[test]
fn systemd_guests() {
    if !require_vm("systemd_guests") {
        return;
    }
    if Command::new("mmdebstrap").arg("--version").output().is_err() {
        let why = "needs mmdebstrap (apt-get install mmdebstrap; scripts/test.sh installs it)";
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("systemd_guests: {why}, but {REQUIRE_ENV}=1 forbids skipping");
        }
        report(&format!("SKIP systemd_guests: {why}"));
        return;
    }
    let mut steps = Steps::new("systemd_guests");
    let dir = TempDir::new();
    let _keep = KeepLogs(&dir);
    let deb = steps.run("Debian package (scripts/package.sh)", || {
        let (deb, how) = package();
        report(&format!("systemd_guests:    {} ({how})", deb.display()));
        deb
    });
    let img = steps
        .run("guest image (mmdebstrap base cached; dpkg -i the package)", || image(&deb, &dir));

    let server = Server::start(&dir, &[]);
    let spec = |name: &str| GuestSpec {
        name: name.to_string(),
        nic: Nic::Doorbell { socket: server.socket.clone() },
        kit: img.clone(),
        agent: PathBuf::new(),
        script: PathBuf::new(),
        dir: dir.path.clone(),
    };
    let (spec_a, spec_b) = (spec("sda"), spec("sdb"));
    let files_a = guest_files("sda", "a", ADDR_A, ADDR_B, &dir);
    let files_b = guest_files("sdb", "b", ADDR_B, ADDR_A, &dir);
    let launched = Instant::now();
    let (mut ga, mut gb) =
        steps.run("boot both guests (systemd as PID 1) until they ping each other", || {
            let mut ga = Guest::launch_with(&spec_a, 1, &files_a, "rdinit=/sbin/init");
            ga.wait_connected();
            let mut gb = Guest::launch_with(&spec_b, 1, &files_b, "rdinit=/sbin/init");
            gb.wait_connected();
            for g in [&mut ga, &mut gb] {
                g.wait_console("IVNET-T first-ping", 0, FIRST_PING);
            }
            (ga, gb)
        });
    let wall_to_ping = launched.elapsed();

    steps.run("1. unit active, networkd address, pings, journal, ivnet status, package", || {
        for (g, me) in [(&mut ga, ADDR_A), (&mut gb, ADDR_B)] {
            let at = g.wait_console("IVNET-T package", 0, Duration::from_secs(120));
            // The whole marker line (the needle ends where its fields begin).
            g.wait_console("\n", at, Duration::from_secs(10));
            let text = g.text();
            let head = text.as_str();
            let addr = g.marker(head, "address");
            assert_eq!(
                field(g, &addr, "cidr"),
                format!("{me}/24"),
                "tap-shm's address from networkd"
            );
            let pings = g.marker(head, "pings");
            assert_eq!(field(g, &pings, "recv"), "5", "pings answered");
            let journal = g.marker(head, "journal-peer-up");
            assert!(field(g, &journal, "line").contains("is_up"), "{journal:?}");
            let st = g.marker(head, "status");
            let up: u32 = field(g, &st, "peers_up").parse().unwrap_or(0);
            assert!(up >= 2, "ivnet status in the guest lists {up} peers up: {st:?}");
            assert_eq!(field(g, &st, "tap"), "tap-shm", "the control socket's agent");
            // The production path: the device through vfio-pci, MSI-X doorbells.
            let backend = field(g, &st, "backend");
            assert!(backend.starts_with("vfio_(MSI-X)"), "the agent's backend: {backend}");
            // The TAP kept the MAC the agent gave it (udev's MACAddressPolicy must not replace
            // it: the package's 70-ivnet-tap.link).
            assert_eq!(field(g, &st, "tap_mac"), field(g, &st, "slot_mac"), "tap-shm's MAC");
            let pkg = g.marker(head, "package");
            for (k, v) in [
                ("files", "ok"),
                ("agent", "enabled"),
                ("server", "disabled"),
                ("timer", "disabled"),
                ("vfio_pci", "loaded"),
                ("tun", "loaded"),
            ] {
                assert_eq!(field(g, &pkg, k), v, "package check {k}: {pkg:?}");
            }
        }
    });

    steps.run(&format!("2. TCP {TRANSFER_MIB} MiB A -> B, SHA-256 compared"), || {
        wait_done(&mut gb, 0, ALL_DONE);
        ga.wait_console("IVNET-T tx-done", 0, ALL_DONE);
        let (ta, tb) = (ga.text(), gb.text());
        let sent = ga.marker(&ta, "tx-data");
        let got = gb.marker(&tb, "rx");
        let bytes = ((TRANSFER_MIB as u64) << 20).to_string();
        assert_eq!(field(&ga, &sent, "bytes"), bytes);
        assert_eq!(field(&gb, &got, "bytes"), bytes, "B received a different byte count");
        assert_eq!(field(&gb, &got, "sha256"), field(&ga, &sent, "sha256"), "SHA-256 differs");
        let done = ga.marker(&ta, "tx-done");
        note(&format!("{TRANSFER_MIB} MiB in {:.1} s", ms(&ga, &done, "ms")));
    });

    steps.run("3. metrics; agent restarted, SIGKILLed, SIGSTOPped in A", || {
        wait_done(&mut ga, 0, ALL_DONE);
        let t = ga.text();
        let m = ga.marker(&t, "metrics");
        let lines: u32 = field(&ga, &m, "peer_up_lines").parse().unwrap_or(0);
        assert!(lines >= 2, "the node_exporter file lists {lines} peers: {m:?}");
        assert_eq!(field(&ga, &m, "agent_info"), "1", "{m:?}");
        assert_eq!(field(&ga, &m, "timer"), "fired", "ivnet-metrics.timer: {m:?}");
        let r = ga.marker(&t, "restart");
        let resumed = ms(&ga, &r, "resumed_ms");
        note(&format!(
            "systemctl restart: active again after {:.1} s, address after {:.1} s, ping after \
             {resumed:.1} s (target 3 s: {})",
            ms(&ga, &r, "active_ms"),
            ms(&ga, &r, "address_ms"),
            if resumed <= 3.0 { "met" } else { "missed" }
        ));
        let k = ga.marker(&t, "sigkill");
        assert_ne!(field(&ga, &k, "old_pid"), field(&ga, &k, "new_pid"));
        note(&format!(
            "SIGKILL: restarted by systemd after {:.1} s, ping after {:.1} s",
            ms(&ga, &k, "active_ms"),
            ms(&ga, &k, "resumed_ms")
        ));
        let s = ga.marker(&t, "sigstop");
        if s.contains_key("skipped") {
            note(&format!(
                "SIGSTOP: skipped, the unit has no WatchdogSec= (WatchdogUSec={})",
                s.get("watchdog").map_or("?", String::as_str)
            ));
        } else {
            assert_ne!(field(&ga, &s, "old_pid"), field(&ga, &s, "new_pid"));
            assert_eq!(
                field(&ga, &s, "logged"),
                "yes",
                "no watchdog timeout in the journal: {s:?}"
            );
            note(&format!(
                "SIGSTOP: the watchdog ({}) restarted it after {:.1} s, ping after {:.1} s",
                field(&ga, &s, "watchdog"),
                ms(&ga, &s, "active_ms"),
                ms(&ga, &s, "resumed_ms")
            ));
        }
    });

    let (ta, tb) = (ga.text(), gb.text());
    let up = |g: &Guest, t: &str, what: &str| -> f64 {
        g.marker(t, what).get("uptime").and_then(|v| v.parse().ok()).unwrap_or(f64::NAN)
    };
    note(&format!(
        "boot to ping: {:.1} s of wall clock from launching A until both pinged; guest uptime at \
         the first ping A {:.1} s, B {:.1} s (agent active at {:.1} s / {:.1} s, address at \
         {:.1} s / {:.1} s)",
        wall_to_ping.as_secs_f64(),
        up(&ga, &ta, "first-ping"),
        up(&gb, &tb, "first-ping"),
        up(&ga, &ta, "agent-active"),
        up(&gb, &tb, "agent-active"),
        up(&ga, &ta, "address"),
        up(&gb, &tb, "address"),
    ));
    steps.run("stop the guests (no QEMU crashed)", || {
        ga.stop_checked("");
        gb.stop_checked("");
    });
    drop(ga);
    drop(gb);
    drop(server);
    steps.summary();
}

fn note(line: &str) {
    report(&format!("systemd_guests:    {line}"));
}
