//! How a member reaches a region and its doorbells. Each backend yields a [`Region`]; the agent
//! and the stack never see a file, a socket or a PCI device.
//!
//! [`Region`]: crate::region::Region

pub mod file;
pub mod server_client;
