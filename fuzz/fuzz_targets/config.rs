//! The configuration file: arbitrary text as /etc/ivnet/ivnet.toml (through a scratch file),
//! merged with default flags by `AgentConfig::from_args`. Checks: no panic; a configuration
//! that is accepted has its values within the documented ranges.

#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use ivnet::config::{AgentArgs, AgentConfig};
use libfuzzer_sys::fuzz_target;

fn scratch() -> &'static PathBuf {
    static P: OnceLock<PathBuf> = OnceLock::new();
    P.get_or_init(|| {
        std::env::temp_dir().join(format!("ivnet-fuzz-config-{}.toml", std::process::id()))
    })
}

fuzz_target!(|data: &[u8]| {
    let path = scratch();
    std::fs::write(path, data).expect("scratch file");
    let args = AgentArgs { config: Some(path.clone()), ..Default::default() };
    if let Ok(c) = AgentConfig::from_args(&args) {
        assert!((68..=65521).contains(&c.mtu));
        assert!(!c.tap.is_empty() && c.tap.len() <= 15);
        assert!(c.poll.as_micros() >= 1 && c.poll_idle.as_micros() >= 1);
        assert!(c.link_timeout.as_millis() >= 50);
    }
});
