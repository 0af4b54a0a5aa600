//! The service manager's fd store (systemd's `FDSTORE=1`, see `research/systemd.md`): what the
//! server keeps there, under which names, and how a restarted server takes it back from
//! `LISTEN_FDS`/`LISTEN_FDNAMES`.
//!
//! Names: `listen` (the listening socket), `shm` (the region), `peer-<id>-<slot>` (a client's
//! connection: its doorbell id and peer slot), `peer-<id>-v<k>` (its eventfd for vector `k`).
//! A client's descriptors are stored once its whole setup is in its socket, and removed
//! (`FDSTOREREMOVE=1`) when it leaves; the service manager itself drops a stored connection
//! whose peer hangs up, but not the eventfds (they never hang up), so a restarted server drops
//! the eventfds of every connection that did not come back.

use std::collections::BTreeMap;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::sys::notify;

/// Name of the listening socket in the store.
pub const LISTENER: &str = "listen";
/// Name of the region's descriptor in the store.
pub const SHM: &str = "shm";

/// The fd store, when the process runs under a service manager (`NOTIFY_SOCKET` set).
pub struct FdStore {
    active: bool,
}

/// The store names of a client's connection and eventfds.
pub fn client_names(id: u32, slot: u32, vectors: usize) -> Vec<String> {
    std::iter::once(format!("peer-{id}-{slot}"))
        .chain((0..vectors).map(|k| format!("peer-{id}-v{k}")))
        .collect()
}

impl FdStore {
    /// The store if the environment offers one.
    pub fn from_env() -> FdStore {
        FdStore { active: notify::notify_socket().is_some() }
    }

    /// Whether descriptors are kept in a service manager's store.
    pub fn active(&self) -> bool {
        self.active
    }

    /// Keeps `fd` under `name` (one message per descriptor: one name each).
    pub fn keep(&self, fd: RawFd, name: &str) {
        if !self.active {
            return;
        }
        debug_assert!(notify::valid_fd_name(name));
        if let Err(e) = notify::notify(&format!("FDSTORE=1\nFDNAME={name}\n"), &[fd]) {
            log::warn!("cannot keep {name} in the service manager's fd store: {e}");
        }
    }

    /// Keeps a client's connection (first) and eventfds.
    pub fn keep_client(&self, id: u32, slot: u32, fds: &[RawFd]) {
        let names = client_names(id, slot, fds.len().saturating_sub(1));
        for (fd, name) in fds.iter().zip(&names) {
            self.keep(*fd, name);
        }
    }

    /// Removes every descriptor stored under these names.
    pub fn forget(&self, names: &[String]) {
        if !self.active {
            return;
        }
        for name in names {
            if let Err(e) = notify::notify(&format!("FDSTOREREMOVE=1\nFDNAME={name}\n"), &[]) {
                log::warn!("cannot remove {name} from the service manager's fd store: {e}");
            }
        }
    }
}

/// A client as the store handed it back.
pub struct RestoredClient {
    /// Doorbell id.
    pub id: u32,
    /// Peer slot (unknown when only eventfds came back).
    pub slot: u32,
    /// Its connection, if it came back.
    pub stream: Option<UnixStream>,
    /// Its eventfds, in vector order.
    pub vectors: Vec<OwnedFd>,
}

impl RestoredClient {
    /// The names it was stored under.
    pub fn names(&self) -> Vec<String> {
        let all = client_names(self.id, self.slot, self.vectors.len());
        if self.stream.is_some() {
            all
        } else {
            all.into_iter().skip(1).collect()
        }
    }
}

/// Everything the store handed back.
#[derive(Default)]
pub struct Restored {
    /// The listening socket (ours, or a socket unit's).
    pub listener: Option<OwnedFd>,
    /// The region.
    pub shm: Option<OwnedFd>,
    /// Clients whose connection came back.
    pub clients: Vec<RestoredClient>,
    /// Clients of which only eventfds came back (they left while the server was down).
    pub orphans: Vec<RestoredClient>,
}

#[derive(Default)]
struct Parts {
    slot: Option<u32>,
    stream: Option<OwnedFd>,
    vectors: BTreeMap<u32, OwnedFd>,
}

/// Takes back what the service manager passed at start (nothing without one).
pub fn take_back(store: &FdStore) -> Restored {
    let fds = notify::take_listen_fds();
    let mut r = Restored::default();
    if fds.is_empty() {
        return r;
    }
    let mut peers: BTreeMap<u32, Parts> = BTreeMap::new();
    let mut unknown = Vec::new();
    for f in fds {
        let name = f.name.as_str();
        if name == LISTENER || name == SHM {
            let slot = if name == LISTENER { &mut r.listener } else { &mut r.shm };
            if slot.is_none() {
                *slot = Some(f.fd);
            } // else a duplicate: closed here, and the first one stays stored
        } else if let Some((id, rest)) = name.strip_prefix("peer-").and_then(|n| n.split_once('-'))
        {
            let Ok(id) = id.parse::<u32>() else {
                unknown.push(f);
                continue;
            };
            let p = peers.entry(id).or_default();
            if let Some(k) = rest.strip_prefix('v').and_then(|k| k.parse::<u32>().ok()) {
                p.vectors.insert(k, f.fd);
            } else if let Ok(slot) = rest.parse::<u32>() {
                p.slot = Some(slot);
                p.stream = Some(f.fd);
            } else {
                unknown.push(f);
            }
        } else {
            unknown.push(f);
        }
    }
    for f in unknown {
        // A socket unit's listener comes under the unit's name.
        if r.listener.is_none()
            && crate::sys::is_listening_socket(std::os::fd::AsRawFd::as_raw_fd(&f.fd))
        {
            log::info!("using the listening socket {:?} passed by the service manager", f.name);
            r.listener = Some(f.fd);
        } else {
            log::warn!("ignoring descriptor {:?} passed by the service manager", f.name);
            store.forget(&[f.name]);
        }
    }
    for (id, p) in peers {
        let vectors = p.vectors.into_values().collect();
        let stream = p.stream.map(UnixStream::from);
        if let Some(s) = &stream {
            if let Err(e) = s.set_nonblocking(true) {
                log::warn!("peer {id}: cannot use its stored connection: {e}");
            }
        }
        let c = RestoredClient { id, slot: p.slot.unwrap_or(0), stream, vectors };
        if c.stream.is_some() {
            r.clients.push(c);
        } else {
            r.orphans.push(c);
        }
    }
    r
}
