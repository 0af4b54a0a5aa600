//! A real QEMU joins `ivnet server` unchanged (`-chardev socket,path=SOCK,id=ivs0 -device
//! ivshmem-doorbell,chardev=ivs0,vectors=2`, through tests/vm/run-guest.sh): the guest reads
//! its IVPosition from BAR0 and the region's magic from BAR2, and rings a host peer's doorbell
//! through the Doorbell register; the host sees QEMU join (server log `peer N joined (pid P)`
//! with P a QEMU process, and a raw client connected before receives N with two eventfds) and
//! leave (`peer N left`, and the raw client receives N without a descriptor).
//!
//! Needs `qemu-system-x86_64` (TCG is enough); without it the test prints `SKIP ...` (or fails
//! when `IVNET_REQUIRE_PRIVILEGED_TESTS=1`). The guest kit is built (and cached) by
//! tests/vm/build-guest.sh in `$IVNET_VM_CACHE/kit-server-qemu` (default cache
//! /var/tmp/ivnet-vm-cache); the first build downloads the Debian cloud kernel.

mod common;

use std::io::BufRead;
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use common::server::*;
use common::*;

/// Bound on building (or checking) the guest kit; the first build downloads about 27 MB.
const KIT_TIMEOUT: Duration = Duration::from_secs(600);
/// Bound on the guest's whole life (boot under TCG takes about 3 s here).
const GUEST_TIMEOUT: Duration = Duration::from_secs(180);
/// Word the host writes at the end of the region to let the guest finish.
const GO_WORD: u32 = 0x600d_f00d;

fn vm_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/vm")
}

/// The guest kit cache (`$IVNET_VM_CACHE`, default /var/tmp/ivnet-vm-cache).
fn vm_cache() -> PathBuf {
    std::env::var_os("IVNET_VM_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/ivnet-vm-cache"))
}

/// Whether this process may write `path`, or create it if it does not exist.
fn writable(path: &Path) -> bool {
    let target = if path.exists() { path } else { path.parent().unwrap_or(Path::new("/")) };
    let Ok(c) = std::ffi::CString::new(target.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    unsafe { libc::access(c.as_ptr(), libc::W_OK) == 0 }
}

/// True if QEMU is installed and the guest kit cache is writable; otherwise prints why the test
/// is skipped (or panics when `IVNET_REQUIRE_PRIVILEGED_TESTS=1`).
fn require_qemu(test: &str) -> bool {
    let qemu = std::env::var("QEMU").unwrap_or_else(|_| "qemu-system-x86_64".into());
    let found = Command::new("sh")
        .args(["-c", "command -v \"$1\"", "sh", &qemu])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let why = if !found {
        format!("{qemu} is not installed (apt-get install qemu-system-x86)")
    } else if !writable(&vm_cache()) {
        format!("the guest kit cache {} is not writable (set IVNET_VM_CACHE)", vm_cache().display())
    } else {
        return true;
    };
    if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
        panic!("{test}: {why}, but {REQUIRE_ENV}=1 forbids skipping");
    }
    report(&format!("SKIP {test}: {why}"));
    false
}

/// Builds (or finds up to date) the guest kit; returns its directory.
fn guest_kit() -> PathBuf {
    let kit = vm_cache().join("kit-server-qemu");
    let out =
        run_with_timeout(Command::new(vm_dir().join("build-guest.sh")).arg(&kit), KIT_TIMEOUT);
    assert!(
        out.status.success(),
        "build-guest.sh {} failed ({}):\n{}{}",
        kit.display(),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    kit
}

/// The guest's script: busybox sh, run by the kit's /init.
const GUEST_SCRIPT: &str = r#"set -u
sh /ivnet/probe-ivshmem.sh --peek 0 || exit 1
dev=""
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1af4 ] && [ "$(cat "$d/device")" = 0x1110 ]; then dev=$d; fi
done
[ -n "$dev" ] || { echo "IVT-FAIL no ivshmem device"; exit 1; }
bar0=$(sed -n 1p "$dev/resource" | cut -d' ' -f1)
end2=$(sed -n 3p "$dev/resource" | cut -d' ' -f2)
ivpos=$(($(devmem "$(printf '0x%x' $((bar0 + 8)))" 32)))
echo "IVT-IVPOSITION=$ivpos"
# Doorbell register: peer 0 (the host's raw client) in the high 16 bits, vector 1 in the low.
devmem "$(printf '0x%x' $((bar0 + 12)))" 32 $(((0 << 16) | 1))
echo "IVT-RANG peer=0 vector=1"
# Wait (up to about 120 s) for the host's go word in the last 4 bytes of the region.
go=$(printf '0x%x' $((end2 - 3)))
i=0
while [ $(($(devmem "$go" 32))) -ne $((0x600df00d)) ]; do
    i=$((i + 1))
    [ "$i" -lt 1200 ] || { echo "IVT-FAIL no go from the host"; exit 3; }
    sleep 0.1
done
echo "IVT-GO"
"#;

/// `run-guest.sh` with its console read line by line on a thread. Dropping it stops the guest
/// (SIGTERM: run-guest.sh kills QEMU and removes its files; SIGKILL after a deadline).
struct Guest {
    child: Child,
    lines: mpsc::Receiver<String>,
    console: Arc<Mutex<String>>,
}

impl Guest {
    fn start(kit: &Path, script: &Path, socket: &Path) -> Guest {
        let mut child = Command::new(vm_dir().join("run-guest.sh"))
            .arg("--kit")
            .arg(kit)
            .arg("--script")
            .arg(script)
            .arg("--file")
            .arg(format!(
                "{}:/ivnet/probe-ivshmem.sh",
                vm_dir().join("guest/probe-ivshmem.sh").display()
            ))
            .arg("--doorbell")
            .arg(socket)
            .args(["--vectors", "2", "--no-iommu", "--name", "ivs-qemu"])
            .args(["--timeout", &GUEST_TIMEOUT.as_secs().to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning tests/vm/run-guest.sh");
        let (tx, lines) = mpsc::channel();
        let console = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let tx = tx.clone();
            let console = console.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).split(b'\n').map_while(Result::ok) {
                    let line = String::from_utf8_lossy(&line).trim_end().to_string();
                    console.lock().unwrap_or_else(|e| e.into_inner()).push_str(&line);
                    console.lock().unwrap_or_else(|e| e.into_inner()).push('\n');
                    let _ = tx.send(line);
                }
            });
        }
        Guest { child, lines, console }
    }

    fn console(&self) -> String {
        self.console.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Waits for a console line containing `needle` and returns it.
    fn wait_line(&self, needle: &str, deadline: Instant) -> String {
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) if l.contains(needle) => return l,
                Ok(_) => {}
                Err(_) => panic!(
                    "no console line with {needle:?} from the guest in time; console:\n{}",
                    self.console()
                ),
            }
        }
    }

    /// Waits for run-guest.sh to exit; returns its code (the guest script's).
    fn wait_exit(&mut self, deadline: Instant) -> Option<i32> {
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            assert!(
                Instant::now() < deadline,
                "the guest did not power off in time; console:\n{}",
                self.console()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Guest {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            // SAFETY: kill has no memory-safety preconditions; the child is unreaped, so its pid
            // is still ours.
            unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(10);
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() {
            eprintln!("----- guest console -----\n{}-----", self.console());
        }
    }
}

/// Writes `value` (little-endian u32) at byte `offset` of the region behind `fd`.
fn poke_region(fd: &OwnedFd, offset: usize, value: u32) {
    let page = offset & !4095;
    // SAFETY: a fresh shared mapping of one page of a region file we hold open (the offset is
    // inside the 64 MiB region); one aligned u32 is written and the page unmapped at once.
    unsafe {
        let p = libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            fd.as_raw_fd(),
            page as libc::off_t,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap region: {}", std::io::Error::last_os_error());
        std::ptr::write_volatile(p.cast::<u8>().add(offset - page).cast::<u32>(), value.to_le());
        libc::munmap(p, 4096);
    }
}

#[test]
fn qemu_ivshmem_doorbell_joins_reads_ivposition_and_leaves() {
    let test = "qemu_ivshmem_doorbell_joins_reads_ivposition_and_leaves";
    if !require_qemu(test) {
        return;
    }
    let t0 = Instant::now();
    let kit = guest_kit();
    let kit_time = t0.elapsed();
    let dir = TempDir::new();
    let mut server = Server::start(&dir, &["--vectors", "2"]);
    // A host peer connected before QEMU: it must hear QEMU join and leave.
    let mut host = RawClient::connect(&server.socket);
    let sh = host.read_setup(2, &[]);
    assert_eq!(sh.id, 0);

    let script = dir.join("guest.sh");
    write_file(&script, GUEST_SCRIPT.as_bytes());
    let boot = Instant::now();
    let mut guest = Guest::start(&kit, &script, &server.socket);
    let deadline = Instant::now() + GUEST_TIMEOUT;

    // QEMU connects while it realizes the device, before the guest boots: the host peer
    // receives its id with one eventfd per vector.
    // (QEMU itself may take a while to start on a loaded machine: allow a minute.)
    let m = match host.recv(Duration::from_secs(60)) {
        Recv::Msg(m) => m,
        other => panic!("expected QEMU's join, got {other:?}; console:\n{}", guest.console()),
    };
    let qemu_id = m.value as u32;
    let mut qemu_fds = vec![m.fd.expect("QEMU's join carries an eventfd")];
    qemu_fds.extend(host.expect_vectors(qemu_id, 1, "QEMU's join, vector 1"));
    assert!(qemu_fds.iter().all(is_eventfd));
    assert_eq!(qemu_id, 1, "doorbell ids count up: QEMU is the second client");
    assert_eq!(server.slot_of(qemu_id), Some(1), "QEMU's peer slot");

    // The server logged the join with QEMU's pid.
    let needle = format!("peer {qemu_id} joined (pid ");
    server.wait_log(&needle, 1, MSG_TIMEOUT);
    let log = server.log();
    let line = log.lines().find(|l| l.contains(&needle)).expect("join line");
    let pid: u32 = line[line.find(&needle).expect("needle") + needle.len()..]
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no pid in {line:?}"));
    let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
    assert!(comm.starts_with("qemu-system"), "peer {qemu_id}'s pid {pid} is {comm:?}, not QEMU");

    // The guest reads what the server assigned, and the region the server initialised.
    let probe = guest.wait_line("IVNET-PROBE dev=", deadline);
    assert!(probe.contains("kind=doorbell"), "not an ivshmem-doorbell device: {probe}");
    assert!(probe.contains("shm_size=67108864"), "BAR2 is not the 64 MiB region: {probe}");
    let peek = guest.wait_line("IVNET-PROBE peek", deadline);
    let magic = u32::from_le_bytes(REGION_MAGIC[..4].try_into().expect("4 bytes"));
    assert!(
        peek.contains(&format!("value=0x{magic:08x}")),
        "BAR2 offset 0 is not the region magic ({magic:#010x}): {peek}"
    );
    let pos = guest.wait_line("IVT-IVPOSITION=", deadline);
    let ivposition: u32 = pos[pos.find('=').expect("=") + 1..].trim().parse().expect("number");
    assert_eq!(ivposition, qemu_id, "the guest's IVPosition is not the id the server assigned");
    let booted = boot.elapsed();

    // The guest rang peer 0, vector 1, through its Doorbell register: QEMU wrote the eventfd
    // the server gave it for us, which is our own vector 1.
    guest.wait_line("IVT-RANG", deadline);
    let rung = eventfd_take(&sh.own[1], Duration::from_secs(30));
    assert!(rung.is_some_and(|n| n >= 1), "the guest's doorbell did not reach vector 1");
    assert_eq!(eventfd_take(&sh.own[0], Duration::ZERO), None, "vector 0 fired instead");

    // Let the guest finish; QEMU exits and the server announces the leave.
    poke_region(&sh.shm, (64 << 20) - 4, GO_WORD);
    guest.wait_line("IVT-GO", deadline);
    let rc = guest.wait_exit(deadline);
    assert_eq!(rc, Some(0), "guest script failed; console:\n{}", guest.console());
    host.expect_plain(qemu_id as i64, "QEMU's disconnect notice");
    server.wait_left(qemu_id, 1, MSG_TIMEOUT);
    server.assert_running();
    report(&format!(
        "{test}: QEMU got id {qemu_id} (pid {pid}); guest IVPosition {ivposition}; kit {:.1} s, \
         boot to IVPosition {:.1} s, whole guest {:.1} s",
        kit_time.as_secs_f64(),
        booted.as_secs_f64(),
        boot.elapsed().as_secs_f64()
    ));
    drop(qemu_fds);
}
