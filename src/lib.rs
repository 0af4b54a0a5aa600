//! ivnet: an Ethernet segment between virtual machines and processes on one host, carried in
//! shared memory (QEMU's ivshmem device, or a plain shared file).
//!
//! The pieces follow `DESIGN.md`: [`region`] is the only code that touches shared memory;
//! [`backend`] maps it; [`agent`] moves frames between a TAP and the rings; [`status`] reads a
//! region from outside.
#![deny(unsafe_code)]

pub mod agent;
pub mod backend;
pub mod check;
pub mod config;
pub mod control;
pub mod docs;
pub mod doorbell;
pub mod mac;
pub mod metrics;
pub mod offload;
pub mod region;
pub mod server;
pub mod stack;
pub mod status;
pub mod status_cmd;
pub mod sys;

/// Log target of the few lines shown at the default log level besides warnings: the one line
/// each long-running command prints when it is up (the agent joined, the server listens).
pub const NOTICE: &str = "ivnet::notice";
