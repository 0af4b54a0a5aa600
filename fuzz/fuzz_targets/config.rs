//! The configuration file: arbitrary text as /etc/ivnet/ivnet.toml (through a scratch file),
//! merged with default flags by `AgentConfig::from_args`. Checks: no panic; a configuration
//! that is accepted has its values within the documented ranges.

#![no_main]

use std::fs::File;
use std::io::{Seek, Write};
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::OnceLock;

use ivnet::config::{AgentArgs, AgentConfig};
use libfuzzer_sys::fuzz_target;

/// The scratch file, already unlinked so that nothing is left behind when the fuzzer's process
/// ends (libFuzzer exits without running destructors), and the path that reaches it: the
/// `/proc/self/fd` link of our open descriptor.
fn scratch() -> &'static (File, PathBuf) {
    static S: OnceLock<(File, PathBuf)> = OnceLock::new();
    S.get_or_init(|| {
        let path =
            std::env::temp_dir().join(format!("ivnet-fuzz-config-{}.toml", std::process::id()));
        let file = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .expect("scratch file");
        std::fs::remove_file(&path).expect("unlink the scratch file");
        let link = PathBuf::from(format!("/proc/self/fd/{}", file.as_raw_fd()));
        (file, link)
    })
}

fuzz_target!(|data: &[u8]| {
    let (file, path) = scratch();
    // `&File` reads, writes and seeks: no lock needed for the one shared descriptor.
    let mut f = file;
    f.set_len(0).expect("truncate the scratch file");
    f.rewind().expect("rewind the scratch file");
    f.write_all(data).expect("write the scratch file");
    let args = AgentArgs { config: Some(path.clone()), ..Default::default() };
    if let Ok(c) = AgentConfig::from_args(&args) {
        assert!((68..=65521).contains(&c.mtu));
        assert!(!c.tap.is_empty() && c.tap.len() <= 15);
        assert!(c.poll.as_micros() >= 1 && c.poll_idle.as_micros() >= 1);
        assert!(c.link_timeout.as_millis() >= 50);
    }
});
