//! The shipped systemd units: `systemd-analyze security` rates the server at most 1.0 and the
//! agent at most 2.5 (the limits; the units document their actual scores), and
//! `systemd-analyze verify` accepts both. Both checks are offline: they need the
//! `systemd-analyze` binary (Debian package `systemd`), not systemd as PID 1.
//!
//! Without `systemd-analyze` the tests print `SKIP ...`; with IVNET_REQUIRE_PRIVILEGED_TESTS=1
//! (scripts/test.sh as root, CI) they fail instead.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const UNITS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd");

/// (unit, highest acceptable exposure).
const LIMITS: [(&str, f64); 2] = [("ivnet-server.service", 1.0), ("ivnet-agent.service", 2.5)];

/// Keys newer than the oldest systemd we support (Debian 12's 252), which it warns about and
/// ignores; any other warning of `verify` fails the test.
const NEWER_KEYS: [&str; 1] = ["FileDescriptorStorePreserve"];

/// The `systemd-analyze` binary, or None after printing SKIP (panics if skipping is forbidden).
fn systemd_analyze(test: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|p| p.join("systemd-analyze")).find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!(
                "{test}: systemd-analyze is missing (apt-get install systemd) but {REQUIRE_ENV}=1"
            );
        }
        report(&format!("SKIP {test}: systemd-analyze is missing (Debian package systemd)"));
    }
    found
}

fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = run_with_timeout(cmd, Duration::from_secs(60));
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The overall exposure `systemd-analyze security` prints last:
/// `→ Overall exposure level for ivnet-agent.service: 1.8 OK 🙂`.
fn exposure(output: &str, unit: &str) -> Option<f64> {
    let line = output.lines().find(|l| l.contains("Overall exposure level for"))?;
    let (_, rest) = line.split_once(&format!("{unit}:"))?;
    rest.split_whitespace().next()?.parse().ok()
}

#[test]
fn systemd_units_are_hardened_within_the_limits() {
    let Some(sa) = systemd_analyze("systemd_units_are_hardened_within_the_limits") else {
        return;
    };
    let mut scores = Vec::new();
    for (unit, limit) in LIMITS {
        let path = Path::new(UNITS).join(unit);
        let (_, stdout, stderr) =
            run(Command::new(&sa).args(["security", "--no-pager", "--offline=true"]).arg(&path));
        let score = exposure(&stdout, unit)
            .unwrap_or_else(|| panic!("no exposure level for {unit}:\n{stdout}{stderr}"));
        assert!(
            score <= limit,
            "{unit}: exposure {score} is above {limit}; the findings:\n{}",
            stdout.lines().filter(|l| l.starts_with('✗')).collect::<Vec<_>>().join("\n")
        );
        scores.push(format!("{unit} {score} (limit {limit})"));
    }
    report(&format!("systemd-analyze security: {}", scores.join(", ")));
}

#[test]
fn systemd_units_pass_verify() {
    let Some(sa) = systemd_analyze("systemd_units_pass_verify") else { return };
    // verify checks that ExecStart's binary exists: point the units at the one just built.
    let dir = TempDir::new();
    let mut paths = Vec::new();
    for (unit, _) in LIMITS {
        let text = std::fs::read_to_string(Path::new(UNITS).join(unit)).expect("reading the unit");
        assert!(
            text.contains("ExecStart=/usr/bin/ivnet "),
            "{unit}: ExecStart is not /usr/bin/ivnet"
        );
        let p = dir.join(unit);
        write_file(&p, text.replace("/usr/bin/ivnet ", &format!("{IVNET} ")).as_bytes());
        paths.push(p);
    }
    // --man=no: the man page comes with the package, not with a source tree.
    let (ok, stdout, stderr) =
        run(Command::new(&sa).args(["verify", "--man=no"]).args(&paths).current_dir(&dir.path));
    assert!(ok, "systemd-analyze verify failed:\n{stdout}{stderr}");
    let complaints: Vec<&str> = stderr
        .lines()
        .chain(stdout.lines())
        .filter(|l| !l.trim().is_empty())
        .filter(|l| !NEWER_KEYS.iter().any(|k| l.contains(&format!("Unknown key '{k}'"))))
        .collect();
    assert!(complaints.is_empty(), "systemd-analyze verify complained:\n{}", complaints.join("\n"));
}

#[test]
fn exposure_is_read_from_the_last_line() {
    let out = "✗ PrivateNetwork=  Service has access to the host's network  0.5\n\n\
               → Overall exposure level for ivnet-agent.service: 1.8 OK 🙂\n";
    assert_eq!(exposure(out, "ivnet-agent.service"), Some(1.8));
    assert_eq!(exposure(out, "ivnet-server.service"), None);
}
