//! Helpers for the QEMU tests (`tests/two_vms.rs`): the guest kit of `tests/vm/` (kernel +
//! busybox initramfs), the statically linked agent the guests run, and [`Guest`], one QEMU guest
//! (started through `tests/vm/run-guest.sh`) that the test drives through a second serial port.
//!
//! A guest's console (ttyS0) streams to a file; the test asserts on marker lines the guest script
//! (`tests/vm/guest/two-vms.sh`) prints there. Commands go to the guest over ttyS1, which QEMU
//! connects to a UNIX socket the test listens on. Like the rest of `tests/common`, every process
//! and file is cleaned up by a guard's `Drop` (also when a test panics), and every wait has a
//! deadline; a failing wait panics with the tail of the console it was reading.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::{report, require_root, run_with_timeout, TempDir, REQUIRE_ENV};

/// The repository (for `tests/vm/*.sh`).
pub const REPO: &str = env!("CARGO_MANIFEST_DIR");

/// Uses this agent binary in the guests instead of building one (it must be statically linked).
pub const GUEST_AGENT_ENV: &str = "IVNET_GUEST_AGENT";

/// Where the static guest agent is built when [`GUEST_AGENT_ENV`] is not set: a target
/// directory of its own, so the nested `cargo build` never waits on the lock of the `cargo test`
/// that runs us.
pub fn guest_agent_target_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("guest-agent")
}

/// The QEMU binary (`$QEMU`, as run-guest.sh reads it, or `qemu-system-x86_64`).
pub fn qemu_binary() -> String {
    std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".to_string())
}

fn in_path(prog: &str) -> bool {
    if prog.contains('/') {
        return Path::new(prog).is_file();
    }
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(prog).is_file()))
        .unwrap_or(false)
}

/// True when guests can run here: root (namespaces, TAPs), an x86-64 host and QEMU. Otherwise
/// prints `SKIP <test>: ...` and returns false, or panics when `IVNET_REQUIRE_PRIVILEGED_TESTS=1`.
pub fn require_vm(test: &str) -> bool {
    if !require_root(test) {
        return false;
    }
    let mut missing = Vec::new();
    if !cfg!(target_arch = "x86_64") {
        missing.push("an x86-64 host (the guests run an x86-64 agent)".to_string());
    }
    let qemu = qemu_binary();
    if !in_path(&qemu) {
        missing.push(format!("{qemu} (Debian: apt-get install qemu-system-x86)"));
    }
    if missing.is_empty() {
        return true;
    }
    let why = missing.join(", ");
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: needs {why}, but {REQUIRE_ENV}=1 forbids skipping");
    }
    report(&format!("SKIP {test}: needs {why}"));
    false
}

// ---------------------------------------------------------------------------------------------
// Steps with timings
// ---------------------------------------------------------------------------------------------

/// Prints each step of a long test with its duration (past libtest's capture), and a summary.
pub struct Steps {
    test: String,
    start: Instant,
    done: Vec<(String, Duration)>,
}

/// Reports a step that did not finish (its closure panicked).
struct StepGuard<'a> {
    test: &'a str,
    name: &'a str,
    start: Instant,
}

impl Drop for StepGuard<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            report(&format!(
                "{}: FAILED in step \"{}\" after {:.1} s",
                self.test,
                self.name,
                self.start.elapsed().as_secs_f64()
            ));
        }
    }
}

impl Steps {
    /// Starts the clock of `test`.
    pub fn new(test: &str) -> Steps {
        Steps { test: test.to_string(), start: Instant::now(), done: Vec::new() }
    }

    /// Runs one step, printing its name before and its duration after.
    pub fn run<T>(&mut self, name: &str, f: impl FnOnce() -> T) -> T {
        report(&format!("{}: -> {name}", self.test));
        let start = Instant::now();
        let guard = StepGuard { test: &self.test, name, start };
        let r = f();
        drop(guard);
        let took = start.elapsed();
        report(&format!("{}:    ok: {name} ({:.1} s)", self.test, took.as_secs_f64()));
        self.done.push((name.to_string(), took));
        r
    }

    /// Prints every step with its duration, and the total.
    pub fn summary(&self) {
        let mut s = format!("{}: all steps passed:\n", self.test);
        for (name, took) in &self.done {
            s.push_str(&format!("    {:>6.1} s  {name}\n", took.as_secs_f64()));
        }
        s.push_str(&format!("    {:>6.1} s  total", self.start.elapsed().as_secs_f64()));
        report(&s);
    }
}

// ---------------------------------------------------------------------------------------------
// The kit and the guest agent
// ---------------------------------------------------------------------------------------------

/// Builds (or finds up to date) the guest kit in `$IVNET_VM_CACHE/kit` (default
/// `/var/tmp/ivnet-vm-cache/kit`) with `tests/vm/build-guest.sh`; returns its directory.
pub fn build_kit() -> PathBuf {
    let cache =
        std::env::var("IVNET_VM_CACHE").unwrap_or_else(|_| "/var/tmp/ivnet-vm-cache".into());
    let kit = PathBuf::from(cache).join("kit");
    let script = Path::new(REPO).join("tests/vm/build-guest.sh");
    // The first run downloads the kernel package (about 27 MB); later runs take a few seconds.
    let out = run_with_timeout(Command::new(&script).arg(&kit), Duration::from_secs(900));
    assert!(
        out.status.success(),
        "{} {} failed ({}):\n{}{}",
        script.display(),
        kit.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    kit
}

/// Whether `path` is an ELF file with a program interpreter (dynamically linked: it cannot run
/// in the guest, which has no libc). Errors count as "no".
pub fn is_dynamic_elf(path: &Path) -> bool {
    let Ok(data) = fs::read(path) else { return false };
    let u = |off: usize, n: usize| -> Option<u64> {
        let b = data.get(off..off + n)?;
        Some(b.iter().rev().fold(0u64, |v, &x| (v << 8) | x as u64))
    };
    if data.get(0..5) != Some(b"\x7fELF\x02") {
        return false;
    }
    let (Some(phoff), Some(phentsize), Some(phnum)) = (u(32, 8), u(54, 2), u(56, 2)) else {
        return false;
    };
    (0..phnum).any(|i| u((phoff + i * phentsize) as usize, 4) == Some(3)) // PT_INTERP
}

/// The statically linked agent for the guests: `$IVNET_GUEST_AGENT` if set, else built with
/// `RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target
/// x86_64-unknown-linux-gnu` in [`guest_agent_target_dir`]. Returns the binary and how it was
/// obtained (for the test's output).
pub fn guest_agent() -> (PathBuf, String) {
    if let Ok(p) = std::env::var(GUEST_AGENT_ENV) {
        let path = PathBuf::from(&p);
        assert!(path.is_file(), "{GUEST_AGENT_ENV}={p}: no such file");
        assert!(
            !is_dynamic_elf(&path),
            "{GUEST_AGENT_ENV}={p} is dynamically linked; the guest has no libc. Build it with \
             RUSTFLAGS='-C target-feature=+crt-static' cargo build --release --target \
             x86_64-unknown-linux-gnu"
        );
        return (path, format!("{GUEST_AGENT_ENV}={p}"));
    }
    let target_dir = guest_agent_target_dir();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let start = Instant::now();
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(REPO)
        .args(["build", "--release", "--bin", "ivnet", "--target", "x86_64-unknown-linux-gnu"])
        .arg("--target-dir")
        .arg(&target_dir)
        .env("RUSTFLAGS", "-C target-feature=+crt-static")
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("CARGO_TARGET_DIR");
    let out = run_with_timeout(&mut cmd, Duration::from_secs(1200));
    assert!(
        out.status.success(),
        "building the static guest agent failed ({}): {cmd:?}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let bin = target_dir.join("x86_64-unknown-linux-gnu/release/ivnet");
    assert!(!is_dynamic_elf(&bin), "{} came out dynamically linked", bin.display());
    let how = format!(
        "cargo build (static, release) in {} took {:.1} s \
         (set {GUEST_AGENT_ENV} to use a prebuilt one)",
        target_dir.display(),
        start.elapsed().as_secs_f64()
    );
    (bin, how)
}

/// A copy of `bin` without debug information in `dir` (`strip --strip-debug`: 22 MB become
/// under 4 MB, which the guest unpacks from its initramfs much faster under TCG). Falls back to
/// `bin` itself when `strip` is missing or fails.
pub fn strip_for_guest(bin: &Path, dir: &TempDir) -> PathBuf {
    let out = dir.join("ivnet-guest");
    let ok = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(bin)
        .stdin(Stdio::null())
        .output()
        .is_ok_and(|o| o.status.success());
    if ok {
        out
    } else {
        report(&format!(
            "note: cannot strip {} (is binutils installed?); using it as is",
            bin.display()
        ));
        bin.to_path_buf()
    }
}

// ---------------------------------------------------------------------------------------------
// Guests
// ---------------------------------------------------------------------------------------------

/// The guest's ivshmem device.
#[derive(Debug, Clone)]
pub enum Nic {
    /// `ivshmem-doorbell` (2 MSI-X vectors) on the doorbell server's socket, with `intel-iommu`
    /// (interrupt remapping) so the agent can use VFIO.
    Doorbell {
        /// The server's UNIX socket.
        socket: PathBuf,
    },
    /// `ivshmem-plain` on a shared file, no IOMMU: VFIO is unavailable, the agent uses sysfs.
    Plain {
        /// The shared file (`memory-backend-file,share=on`).
        file: PathBuf,
        /// Its size, e.g. `16M` (a power of two).
        size: String,
    },
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct GuestSpec {
    /// Hostname, and the prefix of its files.
    pub name: String,
    /// The ivshmem device.
    pub nic: Nic,
    /// Kit directory (`build_kit`).
    pub kit: PathBuf,
    /// Static agent, installed as `/bin/ivnet`.
    pub agent: PathBuf,
    /// Guest script, installed as `/ivnet/run.sh`.
    pub script: PathBuf,
    /// Where consoles and sockets go.
    pub dir: PathBuf,
}

/// What a command printed and how it ended.
#[derive(Debug, Clone)]
pub struct CmdOutput {
    /// Its exit code.
    pub rc: i32,
    /// The console between its start and end markers (agent log lines may be mixed in).
    pub text: String,
}

/// A backstop for every guest: run-guest.sh kills QEMU after this long whatever happens.
const GUEST_LIFETIME_S: u32 = 900;
/// How long a guest may take from launch to its command loop.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// One QEMU guest started through `tests/vm/run-guest.sh`, its console streamed to a file, driven
/// through a control serial port. Dropping it stops QEMU (and run-guest.sh); if the test is
/// panicking, the tail of its console is printed.
pub struct Guest {
    /// What was booted.
    pub spec: GuestSpec,
    /// The console file.
    pub console: PathBuf,
    child: Option<Child>,
    listener: Option<UnixListener>,
    ctl: Option<UnixStream>,
    ctl_path: PathBuf,
    next_cmd: u32,
    label: String,
}

impl Guest {
    /// Launches the guest (does not wait; see [`Guest::wait_ready`]). `boot` numbers the
    /// launches of one guest (files `NAME.BOOT.console`).
    pub fn launch(spec: &GuestSpec, boot: u32) -> Guest {
        let files = [
            "--script".to_string(),
            spec.script.display().to_string(),
            "--file".to_string(),
            format!("{}:/bin/ivnet", spec.agent.display()),
        ];
        Guest::launch_with(spec, boot, &files, "")
    }

    /// Like [`Guest::launch`], with `run_guest_args` (e.g. `--file SRC:DEST`, `--mem 1G`)
    /// instead of the script and agent of `spec` (which are then unused), and `kernel_args`
    /// added to the kernel command line.
    pub fn launch_with(
        spec: &GuestSpec,
        boot: u32,
        run_guest_args: &[String],
        kernel_args: &str,
    ) -> Guest {
        let tag = format!("{}.{boot}", spec.name);
        let console = spec.dir.join(format!("{tag}.console"));
        let ctl_path = spec.dir.join(format!("{tag}.ctl"));
        let _ = fs::remove_file(&ctl_path);
        let listener = UnixListener::bind(&ctl_path)
            .unwrap_or_else(|e| panic!("listening on {}: {e}", ctl_path.display()));
        listener.set_nonblocking(true).expect("non-blocking listener");
        let log = File::create(&console).expect("creating the console file");
        let mut cmd = Command::new(Path::new(REPO).join("tests/vm/run-guest.sh"));
        cmd.arg("--kit")
            .arg(&spec.kit)
            .args(run_guest_args)
            .args(["--name", &spec.name, "--timeout", &GUEST_LIFETIME_S.to_string()])
            // Under TCG on a busy host the kernel's boot-time check of the timer interrupt can
            // fail, and with interrupt remapping on it then panics ("timer doesn't work through
            // Interrupt-remapped IO-APIC"). Skip the check.
            .args(["--append", format!("no_timer_check {kernel_args}").trim_end()]);
        match &spec.nic {
            Nic::Doorbell { socket } => {
                cmd.arg("--doorbell").arg(socket).args(["--vectors", "2"]);
            }
            Nic::Plain { file, size } => {
                cmd.arg("--plain").arg(file).args(["--shm-size", size, "--no-iommu"]);
            }
        }
        // The control port: ttyS1 in the guest, our UNIX socket on the host.
        cmd.arg("--")
            .arg("-chardev")
            .arg(format!("socket,id=ctl,path={}", ctl_path.display()))
            .args(["-serial", "chardev:ctl"]);
        let label = format!("guest {tag} ({:?})", spec.nic);
        // run-guest.sh makes its work directory under $TMPDIR: keep it inside ours, so nothing
        // is left behind even if its cleanup races with the end of its console pipeline.
        let child = cmd
            .env("TMPDIR", &spec.dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup console file"))
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"));
        Guest {
            spec: spec.clone(),
            console,
            child: Some(child),
            listener: Some(listener),
            ctl: None,
            ctl_path,
            next_cmd: 1,
            label,
        }
    }

    /// Waits until QEMU connected the control port (it does so at start-up, right after it
    /// connected the ivshmem chardev, so guests launched one after the other get the doorbell
    /// server's ids in that order).
    pub fn wait_connected(&mut self) {
        if self.ctl.is_some() {
            return;
        }
        let listener = self.listener.take().expect("listener kept until connected");
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let stream = loop {
            match listener.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => panic!("{}: accept on {}: {e}", self.label, self.ctl_path.display()),
            }
            self.assert_running("connecting its control port");
            if Instant::now() > deadline {
                self.fail(&format!(
                    "QEMU did not connect the control port within {BOOT_TIMEOUT:?}"
                ));
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        stream.set_nonblocking(false).expect("blocking control stream");
        stream.set_write_timeout(Some(Duration::from_secs(10))).expect("write timeout");
        self.ctl = Some(stream);
    }

    /// Waits until the guest script's command loop runs (`IVNET-CTL-READY`).
    pub fn wait_ready(&mut self) -> Duration {
        let start = Instant::now();
        self.wait_connected();
        self.wait_console("IVNET-CTL-READY", 0, BOOT_TIMEOUT);
        start.elapsed()
    }

    /// The console so far (lossy UTF-8; lines end in `\r\n`).
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&fs::read(&self.console).unwrap_or_default()).into_owned()
    }

    /// Length of the console so far (an offset for [`Guest::wait_console`]).
    pub fn console_len(&self) -> usize {
        fs::metadata(&self.console).map(|m| m.len() as usize).unwrap_or(0)
    }

    /// The last `n` lines of the console.
    pub fn tail(&self, n: usize) -> String {
        tail_lines(&self.text(), n)
    }

    /// Panics with the console tail.
    pub fn fail(&self, why: &str) -> ! {
        panic!(
            "{}: {why}\n----- console tail of {} -----\n{}\n-----",
            self.label,
            self.spec.name,
            self.tail(60)
        )
    }

    fn assert_running(&mut self, during: &str) {
        let child = self.child.as_mut().expect("guest still owned");
        if let Ok(Some(st)) = child.try_wait() {
            self.fail(&format!("run-guest.sh exited with {st} while {during}"));
        }
    }

    /// Waits until `needle` appears in the console at or after byte `from`; returns the offset
    /// just past it. Panics (with the console tail) at the deadline or if QEMU exits.
    pub fn wait_console(&mut self, needle: &str, from: usize, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let data = fs::read(&self.console).unwrap_or_default();
            if let Some(i) = find(&data[from.min(data.len())..], needle.as_bytes()) {
                return from + i + needle.len();
            }
            self.assert_running(&format!("waiting for {needle:?}"));
            if Instant::now() > deadline {
                self.fail(&format!("no {needle:?} on the console within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `cmd` (a line of busybox sh, evaluated by the guest script) and waits up to
    /// `timeout` for it to end.
    pub fn run(&mut self, cmd: &str, timeout: Duration) -> CmdOutput {
        assert!(!cmd.contains('\n') && !cmd.contains('\t'), "one line without tabs: {cmd:?}");
        self.wait_connected();
        let id = self.next_cmd;
        self.next_cmd += 1;
        let from = self.console_len();
        let line = format!("{id}\t{cmd}\n");
        if let Err(e) = self.ctl.as_mut().expect("connected").write_all(line.as_bytes()) {
            self.fail(&format!("cannot send {cmd:?} to the control port: {e}"));
        }
        let start_marker = format!("IVNET-CMD-START {id}\r\n");
        let end_marker = format!("IVNET-CMD-END {id} rc=");
        let deadline = Instant::now() + timeout;
        loop {
            let data = fs::read(&self.console).unwrap_or_default();
            let tail = &data[from.min(data.len())..];
            if let Some(end) = find(tail, end_marker.as_bytes()) {
                let after = &tail[end + end_marker.len()..];
                let digits: Vec<u8> =
                    after.iter().take_while(|c| c.is_ascii_digit()).copied().collect();
                // The number is complete once the line ended.
                if after.len() > digits.len() && !digits.is_empty() {
                    let rc = String::from_utf8_lossy(&digits).parse().unwrap_or(-1);
                    let begin = find(tail, start_marker.as_bytes())
                        .map_or(0, |s| s + start_marker.len())
                        .min(end);
                    let text = String::from_utf8_lossy(&tail[begin..end]).into_owned();
                    return CmdOutput { rc, text };
                }
            }
            self.assert_running(&format!("running {cmd:?}"));
            if Instant::now() > deadline {
                self.fail(&format!("{cmd:?} did not finish within {timeout:?}"));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `cmd` and panics (with the console tail) unless it exits with 0.
    pub fn expect(&mut self, cmd: &str, timeout: Duration) -> CmdOutput {
        let out = self.run(cmd, timeout);
        if out.rc != 0 {
            self.fail(&format!("{cmd:?} failed with rc={}; its output:\n{}", out.rc, out.text));
        }
        out
    }

    /// The fields of the last `IVNET-T <what> k=v ...` marker in `text`; panics if there is none.
    pub fn marker(&self, text: &str, what: &str) -> HashMap<String, String> {
        marker(text, what)
            .unwrap_or_else(|| self.fail(&format!("no \"IVNET-T {what}\" marker in:\n{text}")))
    }

    /// Pid of this guest's QEMU: the process whose command line names our control socket.
    pub fn qemu_pid(&self) -> Option<i32> {
        let needle = self.ctl_path.to_string_lossy().into_owned();
        fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = fs::read(e.path().join("cmdline")).ok()?;
            let mut args =
                cmdline.split(|&b| b == 0).map(|a| String::from_utf8_lossy(a).into_owned());
            let argv0 = args.next()?;
            let is_qemu = Path::new(&argv0)
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("qemu-system"));
            (is_qemu && args.any(|a| a.contains(&needle))).then_some(pid)
        })
    }

    /// Kills QEMU with SIGKILL, as a crash would (the guest's agent gets no chance to leave),
    /// and reaps run-guest.sh.
    pub fn kill_qemu(&mut self) {
        let pid = self.qemu_pid().unwrap_or_else(|| self.fail("cannot find its QEMU process"));
        // SAFETY: kill has no memory-safety preconditions; pid is the QEMU we found above.
        let r = unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(r, 0, "kill -9 {pid}: {}", std::io::Error::last_os_error());
        let mut child = self.child.take().expect("guest still owned");
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Ok(Some(_)) = child.try_wait() {
                break;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.ctl = None;
    }

    /// Stops the guest (SIGTERM to run-guest.sh, which kills QEMU; SIGKILL after 5 s) and
    /// makes sure no QEMU of it is left.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill has no memory-safety preconditions; the child is unreaped, so the pid
            // is still ours.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                match child.try_wait() {
                    Ok(Some(_)) | Err(_) => break,
                    Ok(None) if Instant::now() > deadline => {
                        let _ = child.kill();
                        let _ = child.wait();
                        break;
                    }
                    Ok(None) => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // run-guest.sh kills QEMU on SIGTERM, and its watchdog does on SIGKILL; check anyway.
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some(pid) = self.qemu_pid() {
            if Instant::now() > deadline {
                // SAFETY: as above; pid is a QEMU started for this guest.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            if Instant::now() > deadline + Duration::from_secs(5) {
                eprintln!("warning: {}: QEMU pid {pid} survived SIGKILL", self.label);
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.ctl = None;
        let _ = fs::remove_file(&self.ctl_path);
    }
}

/// What glibc, the shell or the kernel print when QEMU dies of a crash rather than a signal we
/// sent (`qemu-system-x86_64: terminating on signal 15` is the normal end).
pub const QEMU_CRASH_SIGNS: &[&str] = &[
    "Aborted",
    "Segmentation fault",
    "core dumped",
    "double free",
    "corruption",
    "malloc(",
    "malloc_consolidate",
    "free(): ",
    "Assertion",
];

impl Guest {
    /// Lines of the console that show QEMU crashed (see [`QEMU_CRASH_SIGNS`]).
    pub fn crash_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| QEMU_CRASH_SIGNS.iter().any(|s| l.contains(s)))
            .map(str::to_string)
            .collect()
    }

    /// Stops the guest like [`Guest::stop`] and panics if its QEMU crashed at any time (the
    /// console shows an abort or a heap corruption message); `hint` is added to the message.
    pub fn stop_checked(&mut self, hint: &str) {
        self.stop();
        let crash = self.crash_lines();
        if !crash.is_empty() {
            self.fail(&format!("QEMU crashed:\n{}\n{hint}", crash.join("\n")));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.stop();
        if std::thread::panicking() {
            eprintln!(
                "----- console of {} (last 80 lines) -----\n{}\n-----",
                self.label,
                self.tail(80)
            );
        }
    }
}

/// The fields of the last `IVNET-T <what> k=v ...` line in `text`.
pub fn marker(text: &str, what: &str) -> Option<HashMap<String, String>> {
    let prefix = format!("IVNET-T {what}");
    text.lines().rev().find_map(|l| {
        let at = l.find(&prefix)?;
        let rest = &l[at + prefix.len()..];
        if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('\r')) {
            return None;
        }
        Some(
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    })
}

/// The last `n` lines of `text`.
pub fn tail_lines(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    if needle.is_empty() {
        return Some(0);
    }
    hay.windows(needle.len()).position(|w| w == needle)
}

/// A fresh scratch file name in /dev/shm for an ivshmem-plain region, removed on drop.
pub fn plain_region(size: u64) -> super::ShmFile {
    let f = super::ShmFile::new();
    let file =
        File::create(&f.path).unwrap_or_else(|e| panic!("creating {}: {e}", f.path.display()));
    file.set_len(size).expect("sizing the region file");
    f
}

/// Reads a whole file as lossy UTF-8 (empty if missing).
pub fn read_lossy(path: &Path) -> String {
    let mut v = Vec::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_end(&mut v);
    }
    String::from_utf8_lossy(&v).into_owned()
}

/// On drop, copies the files of a scratch directory (consoles, logs) to `$IVNET_VM_LOGS` if it
/// is set (for CI artifacts), whether the test passed or not. Declare it right after the
/// directory, so it runs after every guest and process has stopped and before the directory goes.
pub struct KeepLogs<'a>(pub &'a TempDir);

impl Drop for KeepLogs<'_> {
    fn drop(&mut self) {
        keep_logs(self.0);
    }
}

/// Copies the files of `dir` to `$IVNET_VM_LOGS` (if set).
pub fn keep_logs(dir: &TempDir) {
    let Ok(dest) = std::env::var("IVNET_VM_LOGS") else { return };
    let dest = PathBuf::from(dest);
    if fs::create_dir_all(&dest).is_err() {
        return;
    }
    if let Ok(entries) = fs::read_dir(&dir.path) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_file() {
                let _ = fs::copy(&p, dest.join(e.file_name()));
            }
        }
    }
}
