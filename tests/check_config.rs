//! `ivnet agent --check-config` and `ivnet server --check-config`: the effective configuration
//! on stdout (a TOML file whose comments say where each value came from), every problem found
//! as a `# problem:` line, exit 0 without problems and 1 with; nothing is created or joined.
//! Wrong keys and values name the key and its line.
//!
//! These run anywhere: where a result depends on privileges (CAP_NET_ADMIN for the agent's
//! TAP), the test expects what the current user would get.

mod common;

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use common::server::Server;
use common::*;

fn ivnet(args: &[&str]) -> Output {
    run_with_timeout(Command::new(IVNET).args(args), Duration::from_secs(30))
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() == 0 }
}

fn p(path: &Path) -> &str {
    path.to_str().expect("UTF-8 path")
}

/// The value line of `key` in the effective configuration.
fn setting<'a>(stdout: &'a str, key: &str) -> Option<&'a str> {
    stdout.lines().find(|l| l.starts_with(&format!("{key} = ")))
}

#[test]
fn check_config_agent_new_region_file() {
    let dir = TempDir::new();
    let shm = dir.join("region");
    let out =
        ivnet(&["agent", "--shm", p(&shm), "--size", "16M", "--mtu", "9000", "--check-config"]);
    let (stdout, stderr) = text(&out);
    assert!(!shm.exists(), "--check-config created the region file");
    assert!(setting(&stdout, "mtu").is_some_and(|l| l.ends_with("# flag")), "{stdout}");
    assert!(setting(&stdout, "tap")
        .is_some_and(|l| l.contains("\"tap-shm\"") && l.ends_with("# default")));
    assert!(stdout.contains("will be created with 16M"), "{stdout}");
    if is_root() && Path::new("/dev/net/tun").exists() {
        assert!(out.status.success(), "{stdout}{stderr}");
        assert!(stdout.ends_with("# no problems found\n"), "{stdout}");
    } else {
        assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
        assert!(stdout.contains("# problem: "), "{stdout}");
        assert!(stderr.starts_with("ivnet: error: "), "{stderr}");
    }
}

#[test]
fn check_config_agent_finds_path_and_region_problems() {
    let dir = TempDir::new();
    // A directory where the region file should be.
    let out = ivnet(&["agent", "--shm", p(&dir.path), "--check-config"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains(&format!("# problem: region file {} is a directory", p(&dir.path))));
    // No file and no size to create it with.
    let missing = dir.join("missing");
    let (stdout, _) = text(&ivnet(&["agent", "--shm", p(&missing), "--check-config"]));
    assert!(stdout.contains("does not exist and no size is given"), "{stdout}");
    // A directory that does not exist.
    let nodir = dir.join("no/such/dir/region");
    let (stdout, _) =
        text(&ivnet(&["agent", "--shm", p(&nodir), "--size", "1M", "--check-config"]));
    assert!(stdout.contains("cannot be created in"), "{stdout}");
    // Not a region at all.
    let foreign = dir.join("foreign");
    let mut bytes = b"NOTIVNET".to_vec();
    bytes.resize(1 << 20, 0);
    write_file(&foreign, &bytes);
    let (stdout, _) = text(&ivnet(&["agent", "--shm", p(&foreign), "--check-config"]));
    assert!(stdout.contains("foreign magic"), "{stdout}");
    // No server socket.
    let sock = dir.join("ivnet.sock");
    let (stdout, _) = text(&ivnet(&["agent", "--socket", p(&sock), "--check-config"]));
    assert!(stdout.contains(&format!("# problem: no socket at {}", p(&sock))), "{stdout}");
}

#[test]
fn check_config_agent_compares_with_an_existing_region() {
    let dir = TempDir::new();
    let server = Server::start(&dir, &["--max-peers", "4", "--segment-mtu", "1500"]);
    let out = ivnet(&[
        "agent",
        "--shm",
        server.shm.arg(),
        "--max-peers",
        "8",
        "--mtu",
        "9000",
        "--check-config",
    ]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("an ivnet region of 67108864 bytes, 4 peer slots"), "{stdout}");
    assert!(stdout.contains("# problem: max-peers 8 does not match the region's 4"), "{stdout}");
    assert!(
        stdout.contains("# problem: mtu 9000 is larger than the segment's MTU 1500"),
        "{stdout}"
    );
    // The socket of a running server is fine for an agent.
    let (stdout, _) = text(&ivnet(&["agent", "--socket", server.socket_arg(), "--check-config"]));
    assert!(
        !stdout.contains("# problem: no socket") && !stdout.contains("not a socket"),
        "{stdout}"
    );
}

#[test]
fn check_config_agent_names_wrong_keys_and_lines() {
    let dir = TempDir::new();
    let cfg = dir.join("ivnet.toml");
    write_file(&cfg, b"shm = \"/dev/shm/x\"\n# a comment\nmtu = 1500\ntapp = \"x\"\n");
    let out = ivnet(&["agent", "--config", p(&cfg), "--check-config"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.is_empty(), "{stdout}");
    assert!(
        stderr.starts_with(&format!(
            "ivnet: error: configuration file {} line 4: tapp: unknown key",
            p(&cfg)
        )),
        "{stderr}"
    );
    assert!(stderr.contains("the keys are shm, size, socket, device, bind"), "{stderr}");

    write_file(&cfg, b"socket = \"/run/ivnet/ivnet.sock\"\n\ndevice = \"auto\"\n");
    let (_, stderr) = text(&ivnet(&["agent", "--config", p(&cfg), "--check-config"]));
    assert!(stderr.contains("line 3: device: conflicts with socket (line 1)"), "{stderr}");
}

#[test]
fn check_config_agent_flag_replaces_the_example_files_device() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ivnet.toml");
    let dir = TempDir::new();
    let shm = dir.join("region");
    let out =
        ivnet(&["agent", "--config", example, "--shm", p(&shm), "--size", "16M", "--check-config"]);
    let (stdout, _) = text(&out);
    assert!(setting(&stdout, "shm").is_some_and(|l| l.ends_with("# flag")), "{stdout}");
    assert!(setting(&stdout, "device").is_none() && setting(&stdout, "bind").is_none(), "{stdout}");
    assert!(
        setting(&stdout, "spin-us").is_some_and(|l| l.contains("config/ivnet.toml line ")),
        "{stdout}"
    );
}

#[test]
fn check_config_server() {
    let dir = TempDir::new();
    let sock = dir.join("ivnet.sock");
    let region = dir.join("region");
    // Fine: a new region in a writable directory.
    let out = ivnet(&["server", "--socket", p(&sock), "--shm", p(&region), "--check-config"]);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        setting(&stdout, "size").is_some_and(|l| l.contains("\"64M\"") && l.ends_with("# default"))
    );
    assert!(!region.exists() && !sock.exists(), "--check-config created files");

    // An existing region whose size is not a power of two: --size cannot help.
    write_file(&region, &vec![0u8; 3 << 20]);
    let out = ivnet(&["server", "--socket", p(&sock), "--shm", p(&region), "--check-config"]);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.contains("not a power of two"), "{stdout}");
    assert!(stdout.contains("--size cannot change an existing file"), "{stdout}");
    std::fs::remove_file(&region).expect("remove");

    // Something else where the socket goes; a socket directory that does not exist.
    write_file(&sock, b"not a socket");
    let (stdout, _) =
        text(&ivnet(&["server", "--socket", p(&sock), "--shm", p(&region), "--check-config"]));
    assert!(stdout.contains("exists and is not a socket"), "{stdout}");
    let nodir = dir.join("no/ivnet.sock");
    let (stdout, _) =
        text(&ivnet(&["server", "--socket", p(&nodir), "--shm", p(&region), "--check-config"]));
    assert!(stdout.contains("does not exist (under systemd"), "{stdout}");

    // A size that is not a power of two is refused before anything else.
    let out = ivnet(&[
        "server",
        "--socket",
        p(&sock),
        "--shm",
        p(&region),
        "--size",
        "48M",
        "--check-config",
    ]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout.is_empty());
    assert!(stderr.contains("size: 48M is not a power of two") && stderr.contains("32M or 64M"));
}

#[test]
fn check_config_accepts_the_units_command_lines() {
    for unit in ["ivnet-agent.service", "ivnet-server.service"] {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd").join(unit);
        let text_ = std::fs::read_to_string(&path).expect("reading the unit");
        let line = text_
            .lines()
            .find_map(|l| l.strip_prefix("ExecStart=/usr/bin/ivnet "))
            .unwrap_or_else(|| panic!("{unit}: no ExecStart=/usr/bin/ivnet"));
        let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config/ivnet.toml");
        let mut args: Vec<&str> = line
            .split_whitespace()
            .map(|a| if a == "/etc/ivnet/ivnet.toml" { example } else { a })
            .collect();
        args.push("--check-config");
        let out = ivnet(&args);
        let (stdout, stderr) = text(&out);
        // Problems depend on this machine (no ivshmem device, no /run/ivnet); the command line
        // itself must be accepted and the configuration printed.
        assert!(
            stdout.starts_with("# ivnet ") && out.status.code().is_some_and(|c| c <= 1),
            "{unit}: {args:?}\n{stdout}{stderr}"
        );
    }
}
