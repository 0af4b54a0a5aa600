//! Stack peers joined through `ivnet server` (the `server` backend) with `--spin-us 0`: they
//! sleep on their doorbells only, never poll, and still ping, echo and move 16 MiB over TCP
//! with matching digests; the peer ids come from the server; an idle stack uses almost no CPU.
//! Needs no privileges (the socket and the region live in a scratch directory).

mod common;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

const STEP: Duration = Duration::from_secs(30);

/// `ivnet server` in the background, killed on drop.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Total CPU time (user + system) of a process so far, from /proc/PID/stat, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).expect("process is running");
    let after = stat.rsplit(')').next().expect("stat has a command name");
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of stat (utime, stime) are at 11 and 12 after the name.
    f[11].parse::<u64>().expect("utime") + f[12].parse::<u64>().expect("stime")
}

#[test]
fn stack_through_doorbell_server_without_polling() {
    let t0 = Instant::now();
    let dir = TempDir::new();
    let sock = dir.join("ivs.sock");
    let shm = dir.join("segment");
    let server = Command::new(IVNET)
        .args(["server", "--socket"])
        .arg(&sock)
        .arg("--shm")
        .arg(&shm)
        .args(["--size", "32M"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting ivnet server");
    let _server = Server(server);
    wait_until("the server socket appears", STEP, || sock.exists());
    let sock = sock.to_str().expect("UTF-8 path");
    let bin = Path::new(IVNET);
    let peer = |ip: &str, tool: &[&str]| {
        let mut args = vec!["--socket", sock, "--spin-us", "0", "--ip", ip];
        args.extend_from_slice(tool);
        StackProc::spawn(bin, None, &dir, &args)
    };

    let mut echo = peer("10.81.0.1/24", &["echo", "--tcp", "7", "--udp", "7"]);
    echo.wait_line("announcing the server", STEP, |l| l.starts_with("echo server on"));
    assert!(echo.log().contains("doorbell server"), "{}", echo.log());

    let (st, out, log) =
        peer("10.81.0.2/24", &["ping", "10.81.0.1", "-c", "5", "-i", "0.05"]).wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    assert!(out.contains("5 packets transmitted, 5 received"), "{out}");

    let (st, out, log) =
        peer("10.81.0.2/24", &["echo-client", "--udp", "10.81.0.1:7", "-c", "100"]).wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    let (st, out, log) = peer(
        "10.81.0.2/24",
        &["echo-client", "10.81.0.1:7", "--connections", "8", "-c", "50", "-s", "3000"],
    )
    .wait_exit(STEP);
    assert!(st.success(), "{out}{log}");
    assert!(out.contains("400 sent, 400 echoed, 0 lost, 0 corrupted"), "{out}");

    let receiver = peer("10.81.0.3/24", &["recv", "--tcp", "5001"]);
    let (st, sent, log) =
        peer("10.81.0.2/24", &["send", "10.81.0.3:5001", "--bytes", "16M"]).wait_exit(STEP);
    assert!(st.success(), "{sent}{log}");
    let (st, received, log) = receiver.wait_exit(STEP);
    assert!(st.success(), "{received}{log}");
    let sent = sent.lines().find(|l| l.starts_with("sent ")).expect("result line").to_string();
    let received =
        received.lines().find(|l| l.starts_with("received ")).expect("result").to_string();
    assert_eq!(bytes_field(&received), 16 << 20, "{received}");
    assert_eq!(sha_field(&sent), sha_field(&received), "\n{sent}\n{received}");

    // Idle: the echo server sleeps on its doorbells (heartbeats only).
    let pid = echo.pid();
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(pid) - before;
    // 2 s is 200 ticks at USER_HZ 100; an idle peer should need a few at most.
    assert!(used <= 10, "idle stack used {used} ticks of CPU in 2 s");

    let (st, _, log) = echo.terminate();
    assert!(st.success(), "{log}");
    report(&format!("stack_through_doorbell_server_without_polling: {:?}", t0.elapsed()));
}
