//! End-to-end benchmark of the stack mode: smoltcp <-> smoltcp TCP throughput and ping round
//! trip between two `ivnet stack` processes, beside kernel <-> kernel through two TAP agents in
//! network namespaces, measured in the same run on the same kind of segment, as ratios.
//!
//! ```text
//! cargo bench --bench stack            # needs root (namespaces, TAPs) for the baseline
//! IVNET_BENCH_BYTES=256M cargo bench --bench stack
//! ```
//!
//! Both sides do the same work per byte: the sender generates the same pseudo-random stream
//! and hashes it (SHA-256), the receiver hashes it; so the ratio compares the network paths,
//! not the tools. The kernel ends run as this same binary (`--role ...`) inside the namespaces.
//! Each throughput figure is the median of three runs; each ping figure the average of 200
//! requests 10 ms apart, after 10 warm-up requests (peers go idle between requests, as in
//! interactive use).
//!
//! Modes: `file` (a region file in /dev/shm, peers poll every 100 µs and spin 50 µs after
//! activity) and `server` (joined through `ivnet server`, doorbells, same spin).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use ivnet::stack::PseudoRandom;
use sha2::{Digest, Sha256};

const IVNET: &str = env!("CARGO_BIN_EXE_ivnet");
const PINGS: &str = "210";
const PING_WARMUP: usize = 10;
const PING_INTERVAL: &str = "0.01";

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--role") {
        role(&args[i + 1..]);
        return;
    }
    if !args.iter().any(|a| a == "--bench") {
        // `cargo test --all-targets` runs bench targets without `--bench`: stay quick there.
        println!("stack bench: run it with `cargo bench --bench stack`");
        return;
    }
    if !is_root() {
        println!("SKIP stack bench: needs root for the kernel baseline (namespaces and TAPs)");
        return;
    }
    let bytes = std::env::var("IVNET_BENCH_BYTES")
        .ok()
        .map(|s| s.parse::<ivnet::config::ByteSize>().expect("IVNET_BENCH_BYTES like 1G").0)
        .unwrap_or(1 << 30);
    let me = std::env::current_exe().expect("the bench binary's path");
    println!("stack bench: {} MiB per transfer, ivnet at {IVNET}", bytes >> 20);
    let mut rows = Vec::new();
    for (mode, mtu) in [(Mode::File, 1500), (Mode::Server, 1500), (Mode::File, 9000)] {
        let smol = measure_stack(mode, mtu, bytes);
        let kern = measure_kernel(mode, mtu, bytes, &me);
        rows.push((mode, mtu, smol, kern));
    }
    println!();
    println!("| segment | MTU | smoltcp<->smoltcp TCP | kernel<->kernel TCP | ratio | smoltcp ping avg | kernel ping avg | ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for (mode, mtu, s, k) in rows {
        println!(
            "| {} | {mtu} | {:.2} Gbit/s | {:.2} Gbit/s | {:.2} | {:.3} ms | {:.3} ms | {:.2} |",
            mode.name(),
            s.gbit,
            k.gbit,
            s.gbit / k.gbit,
            s.ping_ms,
            k.ping_ms,
            s.ping_ms / k.ping_ms
        );
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    File,
    Server,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::File => "file (polling)",
            Mode::Server => "server (doorbells)",
        }
    }
}

struct Figures {
    gbit: f64,
    ping_ms: f64,
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("Uid:")).map(|l| l.to_string()))
        .is_some_and(|l| l.split_whitespace().nth(2) == Some("0"))
}

/// Processes, namespaces and files of one measurement, removed on drop.
#[derive(Default)]
struct Scene {
    children: Vec<Child>,
    namespaces: Vec<String>,
    files: Vec<PathBuf>,
}

impl Drop for Scene {
    fn drop(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = Command::new("kill")
                    .arg("-TERM")
                    .arg(c.id().to_string())
                    .stderr(Stdio::null())
                    .status();
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for c in &mut self.children {
            while Instant::now() < deadline && matches!(c.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        for f in &self.files {
            let _ = std::fs::remove_file(f);
        }
    }
}

impl Scene {
    fn new(mode: Mode, tag: &str) -> (Scene, Vec<String>) {
        let mut scene = Scene::default();
        let shm = PathBuf::from(format!("/dev/shm/ivnet-bench-{}-{tag}", std::process::id()));
        scene.files.push(shm.clone());
        let backend = match mode {
            Mode::File => vec!["--shm".into(), path_str(&shm), "--size".into(), "64M".into()],
            Mode::Server => {
                let sock =
                    PathBuf::from(format!("/tmp/ivnet-bench-{}-{tag}.sock", std::process::id()));
                scene.files.push(sock.clone());
                let server = Command::new(IVNET)
                    .args(["server", "--socket"])
                    .arg(&sock)
                    .arg("--shm")
                    .arg(&shm)
                    .args(["--size", "64M"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .expect("starting ivnet server");
                scene.children.push(server);
                wait_for(&format!("{} to appear", sock.display()), || sock.exists());
                vec!["--socket".into(), path_str(&sock)]
            }
        };
        (scene, backend)
    }

    fn spawn(&mut self, ns: Option<&str>, argv: &[String]) -> usize {
        let mut cmd = match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).args(argv);
                c
            }
            None => {
                let mut c = Command::new(&argv[0]);
                c.args(&argv[1..]);
                c
            }
        };
        let child = cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::null()).spawn();
        self.children.push(child.unwrap_or_else(|e| panic!("starting {argv:?}: {e}")));
        self.children.len() - 1
    }

    /// Waits for child `i` to exit and returns its stdout.
    fn output(&mut self, i: usize, timeout: Duration) -> String {
        let c = &mut self.children[i];
        let start = Instant::now();
        loop {
            match c.try_wait() {
                Ok(Some(st)) => {
                    let mut out = String::new();
                    if let Some(mut o) = c.stdout.take() {
                        let _ = o.read_to_string(&mut out);
                    }
                    assert!(st.success(), "a measurement process failed ({st}): {out}");
                    return out;
                }
                _ if start.elapsed() > timeout => panic!("a measurement process hung"),
                _ => std::thread::sleep(Duration::from_millis(5)),
            }
        }
    }
}

fn path_str(p: &Path) -> String {
    p.to_str().expect("UTF-8 path").to_string()
}

fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < Duration::from_secs(20), "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn s(v: &[&str]) -> Vec<String> {
    v.iter().map(|x| x.to_string()).collect()
}

fn gbit_of(out: &str) -> f64 {
    out.lines()
        .find(|l| l.starts_with("sent "))
        .and_then(|l| l.split('(').nth(1))
        .and_then(|x| x.split_whitespace().next())
        .and_then(|x| x.parse().ok())
        .unwrap_or_else(|| panic!("no throughput in {out:?}"))
}

/// Average of the per-reply `time=X ms` values after the first [`PING_WARMUP`] (a peer that
/// just joined is seen by the others only at their next link check, and the first request
/// also waits for ARP).
fn ping_avg_ms(out: &str) -> f64 {
    let times: Vec<f64> = out
        .lines()
        .filter_map(|l| l.split("time=").nth(1))
        .filter_map(|t| t.split_whitespace().next())
        .filter_map(|t| t.parse().ok())
        .skip(PING_WARMUP)
        .collect();
    assert!(times.len() >= 100, "too few replies in {out:?}");
    times.iter().sum::<f64>() / times.len() as f64
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn measure_stack(mode: Mode, mtu: u32, bytes: u64) -> Figures {
    let (mut scene, backend) = Scene::new(mode, "stack");
    let mtu_s = mtu.to_string();
    let peer = |id: &str, ip: &str, tool: &[&str]| -> Vec<String> {
        let mut v = vec![IVNET.to_string(), "stack".into()];
        v.extend(backend.iter().cloned());
        if mode == Mode::File {
            v.extend(s(&["--peer-id", id]));
        }
        v.extend(s(&["--ip", ip, "--mtu", &mtu_s]));
        v.extend(s(tool));
        v
    };
    let bytes_s = bytes.to_string();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let r = scene.spawn(None, &peer("0", "10.90.0.1/24", &["recv", "--tcp", "5001"]));
        std::thread::sleep(Duration::from_millis(300));
        let snd = scene.spawn(
            None,
            &peer("1", "10.90.0.2/24", &["send", "10.90.0.1:5001", "--bytes", &bytes_s]),
        );
        let out = scene.output(snd, Duration::from_secs(300));
        scene.output(r, Duration::from_secs(30));
        print!("  smoltcp {} MTU {mtu}: {out}", mode.name());
        runs.push(gbit_of(&out));
    }
    let responder = scene.spawn(None, &peer("0", "10.90.0.1/24", &["echo", "--udp", "7"]));
    let _ = responder;
    std::thread::sleep(Duration::from_millis(300));
    let p = scene.spawn(
        None,
        &peer("1", "10.90.0.2/24", &["ping", "10.90.0.1", "-c", PINGS, "-i", PING_INTERVAL]),
    );
    let out = scene.output(p, Duration::from_secs(60));
    let ping_ms = ping_avg_ms(&out);
    println!("  smoltcp {} MTU {mtu}: ping avg {ping_ms:.3} ms", mode.name());
    Figures { gbit: median(runs), ping_ms }
}

fn measure_kernel(mode: Mode, mtu: u32, bytes: u64, me: &Path) -> Figures {
    let (mut scene, backend) = Scene::new(mode, "kernel");
    let mtu_s = mtu.to_string();
    let mut names = Vec::new();
    for i in 0..2 {
        let ns = format!("ivb{}{i}", std::process::id() % 10000);
        let st = Command::new("ip").args(["netns", "add", &ns]).status().expect("ip netns add");
        assert!(st.success(), "ip netns add {ns}");
        scene.namespaces.push(ns.clone());
        let st = Command::new("ip")
            .args(["netns", "exec", &ns, "ip", "link", "set", "lo", "up"])
            .status()
            .expect("ip link set lo up");
        assert!(st.success());
        let mut argv = vec![IVNET.to_string(), "agent".into()];
        argv.extend(backend.iter().cloned());
        if mode == Mode::File {
            argv.extend(s(&["--peer-id", &i.to_string()]));
        }
        argv.extend(s(&["--mtu", &mtu_s, "--address", &format!("10.91.0.{}/24", i + 1)]));
        scene.spawn(Some(&ns), &argv);
        names.push(ns);
    }
    wait_for("the agents to reach each other", || {
        Command::new("ip")
            .args(["netns", "exec", &names[0], "ping", "-c", "1", "-W", "0.5", "10.91.0.2"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    let me = path_str(me);
    let bytes_s = bytes.to_string();
    let mut runs = Vec::new();
    for _ in 0..3 {
        let r = scene.spawn(Some(&names[1]), &s(&[&me, "--role", "tcp-recv", "10.91.0.2:5001"]));
        std::thread::sleep(Duration::from_millis(300));
        let snd = scene
            .spawn(Some(&names[0]), &s(&[&me, "--role", "tcp-send", "10.91.0.2:5001", &bytes_s]));
        let out = scene.output(snd, Duration::from_secs(300));
        scene.output(r, Duration::from_secs(30));
        print!("  kernel {} MTU {mtu}: {out}", mode.name());
        runs.push(gbit_of(&out));
    }
    let p = scene
        .spawn(Some(&names[0]), &s(&["ping", "-n", "-c", PINGS, "-i", PING_INTERVAL, "10.91.0.2"]));
    let out = scene.output(p, Duration::from_secs(60));
    let ping_ms = ping_avg_ms(&out);
    println!("  kernel {} MTU {mtu}: ping avg {ping_ms:.3} ms", mode.name());
    Figures { gbit: median(runs), ping_ms }
}

/// The kernel ends of a transfer, run inside a namespace by the measurement above. They print
/// the same line as `ivnet stack send`/`recv`.
fn role(args: &[String]) {
    let addr: SocketAddr = args.get(1).and_then(|a| a.parse().ok()).expect("--role ROLE ADDR");
    match args.first().map(String::as_str) {
        Some("tcp-recv") => {
            let l = TcpListener::bind(addr).expect("bind");
            let (mut c, peer) = l.accept().expect("accept");
            let start = Instant::now();
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut total = 0u64;
            loop {
                let n = c.read(&mut buf).expect("read");
                if n == 0 {
                    break;
                }
                h.update(&buf[..n]);
                total += n as u64;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "received {total} bytes from {peer} in {secs:.3} s ({:.3} Gbit/s) sha256={}",
                total as f64 * 8.0 / secs / 1e9,
                hex(&h.finalize())
            );
        }
        Some("tcp-send") => {
            let bytes: u64 = args.get(2).and_then(|b| b.parse().ok()).expect("byte count");
            let mut c = TcpStream::connect(addr).expect("connect");
            let start = Instant::now();
            let mut rng = PseudoRandom::new(1);
            let mut h = Sha256::new();
            let mut buf = vec![0u8; 256 << 10];
            let mut left = bytes;
            while left > 0 {
                let n = left.min(buf.len() as u64) as usize;
                rng.fill(&mut buf[..n]);
                h.update(&buf[..n]);
                c.write_all(&buf[..n]).expect("write");
                left -= n as u64;
            }
            c.shutdown(std::net::Shutdown::Write).expect("shutdown");
            let mut rest = Vec::new();
            c.read_to_end(&mut rest).expect("waiting for the receiver to close");
            let secs = start.elapsed().as_secs_f64();
            println!(
                "sent {bytes} bytes to {addr} in {secs:.3} s ({:.3} Gbit/s) sha256={}",
                bytes as f64 * 8.0 / secs / 1e9,
                hex(&h.finalize())
            );
        }
        other => panic!("unknown role {other:?}"),
    }
}

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}
