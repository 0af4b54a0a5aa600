//! The example libvirt domain (config/libvirt-domain.xml) is valid for libvirt
//! (`virt-xml-validate ... domain`, against libvirt's own schema), and its `<shmem>` element
//! fits ivnet: model `ivshmem-doorbell`, the socket the server unit listens on, and as many MSI
//! vectors as the server hands out by default.
//!
//! Needs `virt-xml-validate` (Debian package libvirt-clients, with xmllint from libxml2-utils);
//! without it the test prints `SKIP ...`, or fails with IVNET_REQUIRE_PRIVILEGED_TESTS=1.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

const XML: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/config/libvirt-domain.xml");
const SERVER_UNIT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/systemd/ivnet-server.service");

fn tool(test: &str, name: &str, package: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|p| p.join(name)).find(|p| p.is_file())
    });
    if found.is_none() {
        if std::env::var(REQUIRE_ENV).is_ok_and(|v| v == "1") {
            panic!("{test}: {name} is missing (apt-get install {package}) but {REQUIRE_ENV}=1");
        }
        report(&format!("SKIP {test}: {name} is missing (Debian package {package})"));
    }
    found
}

/// Runs `virt-xml-validate FILE domain`; returns (success, output).
fn validate(bin: &Path, file: &Path) -> (bool, String) {
    let out = run_with_timeout(Command::new(bin).arg(file).arg("domain"), Duration::from_secs(60));
    let text =
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

#[test]
fn libvirt_example_domain_validates_and_fits_the_server() {
    let test = "libvirt_example_domain_validates_and_fits_the_server";
    let Some(bin) = tool(test, "virt-xml-validate", "libvirt-clients") else { return };
    if tool(test, "xmllint", "libxml2-utils").is_none() {
        return;
    }
    let (ok, out) = validate(&bin, Path::new(XML));
    assert!(ok, "virt-xml-validate rejects {XML}:\n{out}");

    // The validator does validate: the same file with an unknown shmem model is refused.
    let text = std::fs::read_to_string(XML).expect("reading the example");
    let dir = TempDir::new();
    let bad = dir.join("bad.xml");
    write_file(&bad, text.replace("ivshmem-doorbell", "ivshmem-bogus").as_bytes());
    let (ok, out) = validate(&bin, &bad);
    assert!(!ok, "virt-xml-validate accepted an unknown shmem model:\n{out}");

    // The <shmem> element matches what the server unit serves.
    let shmem = text
        .split("<shmem ")
        .nth(1)
        .and_then(|s| s.split("</shmem>").next())
        .expect("a <shmem> element");
    assert!(shmem.contains("<model type='ivshmem-doorbell'/>"), "{shmem}");
    let unit = std::fs::read_to_string(SERVER_UNIT).expect("reading the server unit");
    let exec = unit.lines().find(|l| l.starts_with("ExecStart=")).expect("ExecStart");
    let socket = exec
        .split_whitespace()
        .skip_while(|w| *w != "--socket")
        .nth(1)
        .expect("the unit's --socket");
    assert!(shmem.contains(&format!("<server path='{socket}'/>")), "{shmem} vs {socket}");
    let vectors = ivnet::server::DEFAULT_VECTORS;
    assert!(!exec.contains("--vectors"), "the unit changes the vectors: {exec}");
    assert!(shmem.contains(&format!("<msi vectors='{vectors}'")), "{shmem}");
}
