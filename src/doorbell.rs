//! The doorbell seam between the backends and the data path: how a member rings a peer
//! ([`Notifier`]), what a backend hands over so its member can sleep and be woken ([`Wakeups`]),
//! and the doorbell vectors ivnet uses.
//!
//! These types live below both `backend` (which implements them) and `agent`/`stack` (which use
//! them), so that layers import downward only.

use std::io;
use std::os::fd::RawFd;
use std::time::Duration;

use crate::sys::EventFd;

/// Doorbell vector for link-state changes.
pub const VECTOR_LINK: u16 = 0;
/// Doorbell vector for data.
pub const VECTOR_DATA: u16 = 1;

/// Rings another member's doorbell.
pub trait Notifier {
    /// Signals `vector` of peer `peer`. Returns false if the peer has no such doorbell.
    fn notify(&mut self, peer: u32, vector: u16) -> bool;
}

/// For backends without doorbells (the `file` backend): peers poll, nothing to ring.
pub struct NoDoorbells;

impl Notifier for NoDoorbells {
    fn notify(&mut self, _peer: u32, _vector: u16) -> bool {
        false
    }
}

/// Reads the backend's control channel; pushes the ids of peers that left, or fails when the
/// channel is gone.
pub type ControlHandler = Box<dyn FnMut(&mut Vec<u32>) -> io::Result<()>>;

/// Doorbell sources a backend may provide: our own doorbells to wait on, a notifier to ring
/// peers, and a control channel that reports peers leaving.
pub struct Wakeups {
    /// Our own doorbells, one per vector (readable when rung). Empty: we cannot be woken, so
    /// we poll, but still ring the others (the sysfs backend).
    pub own: Vec<EventFd>,
    /// Rings other peers.
    pub notifier: Box<dyn Notifier>,
    /// Busy-poll this long after activity before sleeping on the doorbells.
    pub spin: Duration,
    /// The backend's control descriptor and its handler.
    pub control: Option<(RawFd, ControlHandler)>,
}
