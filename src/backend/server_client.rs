//! The `server` backend: a host process joins as an ivshmem client of the doorbell server,
//! exactly as QEMU does: it takes its peer id, the region's descriptor and every peer's eventfds
//! from the protocol, and follows joins and leaves afterwards.

use std::cell::RefCell;
use std::collections::HashMap;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::doorbell::{ControlHandler, Notifier, Wakeups};
use crate::region::{GeometryRequest, Region, RegionError};
use crate::server::protocol::{Message, MessageReader, ReadOutcome, MAX_PEER_ID, PROTOCOL_VERSION};
use crate::sys::EventFd;

/// Why joining through the server failed.
#[derive(Debug, thiserror::Error)]
pub enum ServerClientError {
    /// Connecting to the socket failed.
    #[error("cannot connect to the doorbell server at {path} (is `ivnet server --socket {path}` running?)", path = .path.display())]
    Connect {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The server spoke something else.
    #[error("doorbell server at {path}: {what}", path = .path.display())]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        what: String,
    },
    /// Reading from the server failed.
    #[error("doorbell server at {path}: connection failed during setup", path = .path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Mapping the region descriptor failed.
    #[error("cannot map the region received from {path}", path = .path.display())]
    Map {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The region is not usable.
    #[error(transparent)]
    Region(#[from] RegionError),
}

/// Descriptors kept free for the rest of the member (its epoll, TAP, timers, sockets) when the
/// peers' eventfds would otherwise reach the descriptor limit.
pub const FD_HEADROOM: usize = 32;

/// Every peer's doorbells (eventfds), by doorbell id and vector, and which slot each id is
/// paired with.
///
/// Shared memory is untrusted (any member can write any slot's doorbell id), so the slot of a
/// doorbell id is read from the region once, when the server announces the id (the server
/// records the pairing before it announces anyone), and only a unique match is believed. The
/// notifier reads a slot's doorbell id once per incarnation of that slot and rings it only if
/// the id was announced as paired with that very slot: overwriting the field redirects nothing.
///
/// The eventfds are bounded by the descriptor limit: beyond a budget (the limit, minus what the
/// process holds, our own vectors and [`FD_HEADROOM`]) peers' eventfds are closed at once, and
/// those peers are not rung (they find our frames at their next heartbeat tick), with one
/// warning that names the limit to raise.
pub struct PeerDoorbells {
    peers: HashMap<u32, Vec<EventFd>>,
    /// Doorbell id -> the slot paired with it when the id was announced (`None`: ambiguous or
    /// missing), and how many vectors were announced.
    slots: HashMap<u32, (Option<u32>, usize)>,
    /// Slot -> (incarnation, doorbell id) as last read for the notifier.
    targets: HashMap<u32, (u64, Option<u32>)>,
    held: usize,
    budget: usize,
    dropped: usize,
    /// RLIMIT_NOFILE when the budget was set (for the warning).
    limit: Option<u64>,
    warned: bool,
}

impl Default for PeerDoorbells {
    fn default() -> Self {
        // Room for every slot a region can have: the notifier does not allocate.
        let slots = crate::region::layout::MAX_PEERS_LIMIT as usize;
        PeerDoorbells {
            peers: HashMap::with_capacity(slots),
            slots: HashMap::with_capacity(slots),
            targets: HashMap::with_capacity(slots),
            held: 0,
            budget: usize::MAX,
            dropped: 0,
            limit: None,
            warned: false,
        }
    }
}

/// Descriptors this process has open now (from /proc/self/fd).
fn open_fds() -> Option<usize> {
    std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count())
}

impl PeerDoorbells {
    /// Peers' doorbells held at most within the descriptor limit, keeping `own_vectors` plus
    /// [`FD_HEADROOM`] descriptors free.
    pub fn within_fd_limit(own_vectors: usize) -> Self {
        let limit = crate::sys::fd_limit();
        let budget = match (limit, open_fds()) {
            (Some(l), Some(open)) => (l as usize).saturating_sub(open + own_vectors + FD_HEADROOM),
            _ => usize::MAX,
        };
        PeerDoorbells { budget, limit, ..Default::default() }
    }

    /// Peers' doorbells held at most `budget` at a time.
    pub fn with_budget(budget: usize) -> Self {
        PeerDoorbells { budget, ..Default::default() }
    }

    /// Adds the next vector of peer `id`. Returns false if it was not kept: the descriptor
    /// budget is spent (it is closed).
    pub fn add(&mut self, id: u32, fd: OwnedFd) -> io::Result<bool> {
        if self.held >= self.budget {
            self.dropped += 1;
            return Ok(false);
        }
        self.peers.entry(id).or_default().push(EventFd::from_owned(fd)?);
        self.held += 1;
        Ok(true)
    }

    /// Counts a vector of peer `id` whose descriptor never arrived (the process was at its
    /// descriptor limit when it came).
    pub fn lost(&mut self, _id: u32) {
        self.dropped += 1;
    }

    /// Peer vectors not held because of the descriptor limit (so far).
    pub fn dropped(&self) -> usize {
        self.dropped
    }

    /// Whether `id` was announced (its pairing recorded), with or without doorbells.
    pub fn is_known(&self, id: u32) -> bool {
        self.slots.contains_key(&id)
    }

    /// Records the slot the server paired with the newly announced doorbell id `id`: the one
    /// slot of `region` whose doorbell id is `id` (none if several claim it). Returns it.
    pub fn record_pairing(&mut self, id: u32, region: &Region) -> Option<u32> {
        let mut found =
            (0..region.geometry().max_peers).filter(|&s| region.peer(s).doorbell_id() == Some(id));
        let slot = match (found.next(), found.next()) {
            (Some(s), None) => Some(s),
            _ => None,
        };
        self.slots.insert(id, (slot, 0));
        slot
    }

    /// Counts one announced vector of `id` (kept, dropped or lost).
    fn announced(&mut self, id: u32) {
        if let Some((_, n)) = self.slots.get_mut(&id) {
            *n += 1;
        }
    }

    /// The most vectors announced for one peer.
    fn vectors(&self) -> usize {
        self.slots.values().map(|&(_, n)| n).max().unwrap_or(0)
    }

    /// Forgets peer `id` (it left). Returns the slot it was paired with, if the region still
    /// pairs that slot with `id` (else the slot already went to someone else, who shows up as a
    /// restart, or the field was overwritten: the link timeout deals with it).
    pub fn remove(&mut self, id: u32, region: &Region) -> Option<u32> {
        if let Some(v) = self.peers.remove(&id) {
            self.held -= v.len();
        }
        let slot = self.slots.remove(&id)?.0?;
        self.targets.remove(&slot);
        (region.peer(slot).doorbell_id() == Some(id)).then_some(slot)
    }

    /// Peers with doorbells.
    pub fn ids(&self) -> Vec<u32> {
        self.peers.keys().copied().collect()
    }

    /// The doorbell id to ring for `slot`: read from the region once per incarnation of the
    /// slot, and believed only if that id was announced as paired with this slot, or was moved
    /// here by the server: a member on the server's host that rejoined under another slot keeps
    /// its doorbell id, and the server then pairs the id with the new slot and takes it off the
    /// old one (so an id is believed for a new slot only once its announced slot no longer
    /// carries it). Until an id is believed the slot is looked at again on every call (a few
    /// reads), so a move is followed as soon as the server has written it.
    fn target(&mut self, region: &Region, slot: u32) -> Option<u32> {
        if slot >= region.geometry().max_peers {
            return None;
        }
        let p = region.peer(slot);
        let incarnation = p.incarnation();
        if let Some(&(inc, Some(id))) = self.targets.get(&slot) {
            if inc == incarnation {
                return Some(id);
            }
        }
        let id = p.doorbell_id().filter(|id| match self.slots.get(id) {
            Some(&(Some(s), _)) if s == slot => true,
            Some(&(Some(s), _)) => region.peer(s).doorbell_id() != Some(*id),
            _ => false,
        });
        if let Some(id) = id {
            if let Some(entry) = self.slots.get_mut(&id) {
                entry.0 = Some(slot);
            }
            // The id's old slot is no longer rung through it.
            self.targets.retain(|&s, &mut (_, t)| s == slot || t != Some(id));
        }
        self.targets.insert(slot, (incarnation, id));
        id
    }

    /// Logs, once per process, that peers' doorbells are not all held.
    fn warn_if_dropped(&mut self, path: &Path, max_peers: u32, own_vectors: usize) {
        if self.dropped == 0 || self.warned {
            return;
        }
        self.warned = true;
        let vectors = self.vectors().max(own_vectors).max(1);
        let need = (open_fds().unwrap_or(0) + max_peers as usize * vectors + FD_HEADROOM)
            .max(self.limit.unwrap_or(0) as usize + 1);
        let limit = self.limit.map_or_else(|| "unknown".to_string(), |l| l.to_string());
        log::warn!(
            "doorbell server {}: {} peer doorbell(s) not held: the descriptor limit ({limit}) \
             is too low to hold every peer's doorbells, so we cannot ring those peers (they see \
             our frames at their next heartbeat tick instead). Raise it to at least {need} \
             (`ulimit -n {need}`, or LimitNOFILE={need} in the systemd unit)",
            path.display(),
            self.dropped,
        );
    }
}

/// Rings peers through their eventfds.
pub struct EventFdNotifier {
    peers: Rc<RefCell<PeerDoorbells>>,
    region: Region,
}

impl EventFdNotifier {
    /// Rings the peers in `peers`, addressed by their slot in `region`.
    pub fn new(peers: Rc<RefCell<PeerDoorbells>>, region: Region) -> Self {
        EventFdNotifier { peers, region }
    }
}

impl Notifier for EventFdNotifier {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        let mut peers = self.peers.borrow_mut();
        // Peers are addressed by slot; the server's pairing gives their doorbell id.
        let Some(id) = peers.target(&self.region, peer) else { return false };
        // A peer with fewer vectors (a server run with --vectors 1, or some not held) is rung on
        // its last one: any doorbell wakes an agent, which then looks at all its rings.
        match peers.peers.get(&id).and_then(|v| v.get(vector as usize).or(v.last())) {
            Some(e) => e.signal().is_ok(),
            None => false,
        }
    }
}

/// A session with the doorbell server.
pub struct ServerSession {
    /// Our peer id (slot in the peer table), paired by the server with our doorbell id.
    pub id: u32,
    /// Our doorbell id (what QEMU calls the peer id; in protocol messages).
    pub doorbell_id: u32,
    /// The region (initialised by the server).
    pub region: Region,
    /// Our own doorbells, one per vector: readable when a peer rings us.
    pub own: Vec<EventFd>,
    /// The other peers' doorbells.
    pub peers: Rc<RefCell<PeerDoorbells>>,
    stream: UnixStream,
    reader: MessageReader,
    path: PathBuf,
}

/// How long setup may take before the server is declared unresponsive.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);
/// After our first own vector arrives, how long to wait for the rest of the burst.
const VECTOR_GRACE: Duration = Duration::from_millis(300);

fn wait_readable(fd: RawFd, timeout: Duration) -> io::Result<bool> {
    let mut poll = mio::Poll::new()?;
    poll.registry().register(
        &mut mio::unix::SourceFd(&fd),
        mio::Token(0),
        mio::Interest::READABLE,
    )?;
    let mut events = mio::Events::with_capacity(1);
    poll.poll(&mut events, Some(timeout))?;
    Ok(!events.is_empty())
}

impl ServerSession {
    /// Connects and reads the setup sequence: version, id, region, peers' vectors, own vectors.
    /// `want_vectors` own vectors are awaited (fewer are accepted if the server has fewer).
    pub fn connect(
        path: &Path,
        req: &GeometryRequest,
        want_vectors: usize,
    ) -> Result<ServerSession, ServerClientError> {
        let stream = UnixStream::connect(path)
            .map_err(|source| ServerClientError::Connect { path: path.into(), source })?;
        Self::setup(stream, path, req, want_vectors)
    }

    /// Reads the setup sequence from `stream`, a connection to the doorbell server at `path`
    /// (made non-blocking here). See [`ServerSession::connect`].
    pub fn setup(
        stream: UnixStream,
        path: &Path,
        req: &GeometryRequest,
        want_vectors: usize,
    ) -> Result<ServerSession, ServerClientError> {
        stream
            .set_nonblocking(true)
            .map_err(|source| ServerClientError::Io { path: path.into(), source })?;
        let proto = |what: String| ServerClientError::Protocol { path: path.into(), what };
        let io_err = |source| ServerClientError::Io { path: path.into(), source };
        let mut reader = MessageReader::default();
        let deadline = Instant::now() + SETUP_TIMEOUT;
        let mut own_deadline: Option<Instant> = None;
        let next = |reader: &mut MessageReader,
                    until: Instant|
         -> Result<Option<Message>, ServerClientError> {
            loop {
                match reader.read(stream.as_raw_fd()).map_err(io_err)? {
                    ReadOutcome::Message(m) => return Ok(Some(m)),
                    ReadOutcome::Eof => {
                        return Err(proto(
                            "closed the connection during setup (all peer ids in use?)".into(),
                        ))
                    }
                    ReadOutcome::WouldBlock => {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero()
                            || !wait_readable(stream.as_raw_fd(), left).map_err(io_err)?
                        {
                            return Ok(None);
                        }
                    }
                }
            }
        };
        let timeout = || proto(format!("no complete setup within {SETUP_TIMEOUT:?}"));
        let version = next(&mut reader, deadline)?.ok_or_else(timeout)?;
        if version.value != PROTOCOL_VERSION {
            return Err(proto(format!(
                "protocol version {}, this ivnet speaks {PROTOCOL_VERSION}",
                version.value
            )));
        }
        let idm = next(&mut reader, deadline)?.ok_or_else(timeout)?;
        if !(0..=MAX_PEER_ID as i64).contains(&idm.value) {
            return Err(proto(format!("peer id {} is out of range", idm.value)));
        }
        let doorbell_id = idm.value as u32;
        let id = doorbell_id;
        let shm = next(&mut reader, deadline)?.ok_or_else(timeout)?;
        let shm_fd = match (shm.value, shm.fd) {
            (-1, Some(fd)) => fd,
            (-1, None) if shm.fd_lost => {
                return Err(proto(format!(
                    "the region descriptor could not be received: this process is at its \
                     descriptor limit (ulimit -n: {}); raise it",
                    crate::sys::fd_limit().map_or_else(|| "unknown".into(), |l| l.to_string())
                )))
            }
            (value, _) => {
                return Err(proto(format!(
                    "expected the region descriptor (-1 with a descriptor), got {value}"
                )))
            }
        };
        // Map the region first: the pairing of each announced peer is read from it.
        let file = std::fs::File::from(shm_fd);
        let map = memmap2::MmapOptions::new()
            .map_raw(&file)
            .map_err(|source| ServerClientError::Map { path: path.into(), source })?;
        drop(file);
        let name = format!("{} (via {})", "server region", path.display());
        let region = Region::attach(Arc::new(map), &name, req)?;
        let mut peers = PeerDoorbells::within_fd_limit(want_vectors);
        let mut own = Vec::new();
        let mut own_seen = 0usize;
        loop {
            let until = own_deadline.unwrap_or(deadline);
            let Some(m) = next(&mut reader, until)? else {
                if own_seen == 0 {
                    return Err(timeout());
                }
                break; // the server has fewer vectors than we wanted
            };
            let Message { value, fd, fd_lost } = m;
            let pid = match u32::try_from(value) {
                Ok(pid) if pid <= MAX_PEER_ID => pid,
                // A disconnect notice of nonsense: nothing to forget.
                _ if fd.is_none() && !fd_lost => continue,
                _ => return Err(proto(format!("peer id {value} is out of range"))),
            };
            if pid == id {
                own_seen += 1;
                if let Some(fd) = fd {
                    own.push(EventFd::from_owned(fd).map_err(io_err)?);
                }
                if own_seen >= want_vectors {
                    break;
                }
                own_deadline.get_or_insert_with(|| Instant::now() + VECTOR_GRACE);
            } else if fd.is_none() && !fd_lost {
                // A disconnect notice during setup: that peer is gone.
                peers.remove(pid, &region);
            } else {
                if !peers.is_known(pid) {
                    peers.record_pairing(pid, &region);
                }
                peers.announced(pid);
                match fd {
                    Some(fd) => {
                        peers.add(pid, fd).map_err(io_err)?;
                    }
                    None => peers.lost(pid),
                }
            }
        }
        let Some(slot) = super::own_slot(&region, doorbell_id) else {
            return Err(proto(format!(
                "doorbell id {doorbell_id} is not paired with a peer slot in the region \
                 (is this an ivnet server? QEMU's example server does not keep the table)"
            )));
        };
        if own.is_empty() {
            log::warn!(
                "doorbell server {}: none of our own doorbells could be received (descriptor \
                 limit, ulimit -n: {}): polling instead",
                path.display(),
                crate::sys::fd_limit().map_or_else(|| "unknown".into(), |l| l.to_string())
            );
        } else if own_seen < want_vectors {
            log::warn!(
                "doorbell server {} gives {} vector(s) per peer, ivnet uses {want_vectors} \
                 (0: link changes, 1: data): data doorbells share vector 0; start the server \
                 with --vectors {want_vectors}",
                path.display(),
                own.len()
            );
        }
        peers.warn_if_dropped(path, region.geometry().max_peers, own_seen);
        log::info!(
            "doorbell server {} gave us doorbell id {doorbell_id} and peer slot {slot}, {} vectors, \
             {} peers present",
            path.display(),
            own.len(),
            peers.slots.len()
        );
        Ok(ServerSession {
            id: slot,
            doorbell_id,
            region,
            own,
            peers: Rc::new(RefCell::new(peers)),
            stream,
            reader,
            path: path.into(),
        })
    }

    /// Connects and hands back what a member needs: its peer slot, the region, and its
    /// doorbells (own eventfds to sleep on, a notifier for the others, the control channel).
    pub fn join(
        path: &Path,
        req: &GeometryRequest,
        spin: Duration,
    ) -> Result<(u32, Region, Wakeups), ServerClientError> {
        let session = Self::connect(path, req, 2)?;
        let (slot, region, notifier) = (session.id, session.region.clone(), session.notifier());
        let (fd, handler, own, _) = session.into_control();
        let wakeups =
            Wakeups { own, notifier: Box::new(notifier), spin, control: Some((fd, handler)) };
        Ok((slot, region, wakeups))
    }

    /// The notifier that rings other peers.
    pub fn notifier(&self) -> EventFdNotifier {
        EventFdNotifier::new(self.peers.clone(), self.region.clone())
    }

    /// Splits off the connection as a control handler: it follows joins and leaves, reporting the
    /// slots of peers that left. If the server goes away, peers keep talking (no new joins).
    pub fn into_control(self) -> (RawFd, ControlHandler, Vec<EventFd>, Rc<RefCell<PeerDoorbells>>) {
        let ServerSession { doorbell_id, stream, mut reader, peers, own, path, region, .. } = self;
        let fd = stream.as_raw_fd();
        let peers2 = peers.clone();
        let (max_peers, own_vectors) = (region.geometry().max_peers, own.len());
        let mut closed = false;
        let handler: ControlHandler = Box::new(move |left: &mut Vec<u32>| {
            let _keep_open = &stream;
            if closed {
                return Ok(());
            }
            loop {
                match reader.read(stream.as_raw_fd())? {
                    ReadOutcome::WouldBlock => return Ok(()),
                    ReadOutcome::Eof => {
                        log::warn!(
                            "doorbell server {} closed the connection: peers keep talking, but new \
                             peers cannot join until the agent restarts",
                            path.display()
                        );
                        closed = true;
                        return Ok(());
                    }
                    ReadOutcome::Message(Message { value, fd, fd_lost }) => {
                        let Ok(pid) = u32::try_from(value) else { continue };
                        if pid == doorbell_id || pid > MAX_PEER_ID {
                            continue; // extra own vectors, or nonsense: ignore (fd closes)
                        }
                        let mut p = peers2.borrow_mut();
                        if fd.is_none() && !fd_lost {
                            // Report the slot; if the server already gave it to a newcomer,
                            // that one shows up as a restart instead.
                            if let Some(slot) = p.remove(pid, &region) {
                                left.push(slot);
                            }
                            continue;
                        }
                        if !p.is_known(pid) {
                            // The server paired the id with a slot before announcing it.
                            match p.record_pairing(pid, &region) {
                                Some(slot) => log::info!(
                                    "doorbell server: peer {slot} joined (doorbell id {pid})"
                                ),
                                None => log::info!("doorbell server: doorbell id {pid} joined"),
                            }
                        }
                        p.announced(pid);
                        let kept = match fd {
                            Some(fd) => p.add(pid, fd).unwrap_or_else(|e| {
                                log::warn!("doorbell id {pid}: unusable eventfd: {e}");
                                false
                            }),
                            None => {
                                p.lost(pid);
                                false
                            }
                        };
                        if !kept {
                            p.warn_if_dropped(&path, max_peers, own_vectors);
                        }
                    }
                }
            }
        });
        (fd, handler, own, peers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HeapMemory;

    fn region() -> Region {
        let req = GeometryRequest { max_peers: Some(4), ..Default::default() };
        Region::attach(Arc::new(HeapMemory::new(4 << 20)), "t", &req).unwrap()
    }

    /// An eventfd to hand over, and the same eventfd to watch.
    fn doorbell() -> (OwnedFd, EventFd) {
        let e = EventFd::new().unwrap();
        (e.fd().try_clone().unwrap(), e)
    }

    /// The server pairs `slot` with `id`, announces it with one vector, and a member takes the
    /// slot (a new incarnation). Returns the eventfd to watch.
    fn join(r: &Region, peers: &mut PeerDoorbells, slot: u32, id: u32) -> EventFd {
        r.peer(slot).set_doorbell_id(Some(id));
        peers.record_pairing(id, r);
        let (fd, watch) = doorbell();
        assert!(peers.add(id, fd).unwrap());
        let inc = r.peer(slot).incarnation();
        r.peer(slot).try_claim(inc).unwrap();
        watch
    }

    /// Finding 4 of issue 11, `server` backend: overwriting a peer's doorbell id in the region
    /// does not redirect its doorbells, not even after the slot's incarnation changes, unless
    /// the server announced the new id as paired with that slot.
    #[test]
    fn test_overwritten_doorbell_id_does_not_redirect_doorbells() {
        let r = region();
        let peers = Rc::new(RefCell::new(PeerDoorbells::default()));
        let mut n = EventFdNotifier::new(peers.clone(), r.clone());
        let five = join(&r, &mut peers.borrow_mut(), 1, 5);
        let seven = join(&r, &mut peers.borrow_mut(), 2, 7);
        assert!(n.notify(1, 1));
        assert_eq!((five.drain(), seven.drain()), (1, 0));
        // A hostile member points slot 1 at doorbell id 7 (the peer in slot 2).
        r.peer(1).set_doorbell_id(Some(7));
        assert!(n.notify(1, 1));
        assert_eq!((five.drain(), seven.drain()), (1, 0), "slot 1's doorbell was redirected");
        // Even under a new incarnation, id 7 is not slot 1's: it is not rung for slot 1.
        let inc = r.peer(1).incarnation();
        r.peer(1).try_claim(inc).unwrap();
        assert!(!n.notify(1, 1));
        assert_eq!((five.drain(), seven.drain()), (0, 0));
        // Doorbell id 5 leaves and the server gives slot 1 to a newcomer, id 8.
        r.peer(1).set_doorbell_id(Some(5));
        assert_eq!(peers.borrow_mut().remove(5, &r), Some(1));
        let eight = join(&r, &mut peers.borrow_mut(), 1, 8);
        assert!(n.notify(1, 1));
        assert_eq!((eight.drain(), seven.drain()), (1, 0));
        assert!(n.notify(2, 1));
        assert_eq!(seven.drain(), 1);
    }

    /// A member on the server's host that rejoined under another slot keeps its doorbell id:
    /// once the server has paired the id with the new slot and taken it off the old one, the
    /// member is rung there (and no longer through the old slot).
    #[test]
    fn test_a_doorbell_id_the_server_moved_follows_its_member() {
        let r = region();
        let peers = Rc::new(RefCell::new(PeerDoorbells::default()));
        let mut n = EventFdNotifier::new(peers.clone(), r.clone());
        let five = join(&r, &mut peers.borrow_mut(), 1, 5);
        assert!(n.notify(1, 1));
        assert_eq!(five.drain(), 1);
        // The member rejoins in slot 3 (a new incarnation there); the server writes id 5 into
        // slot 3 first: while slot 1 still carries it, slot 3 is not believed.
        let inc = r.peer(3).incarnation();
        r.peer(3).try_claim(inc).unwrap();
        r.peer(3).set_doorbell_id(Some(5));
        assert!(!n.notify(3, 1));
        // ... then takes it off slot 1: slot 3 is rung through id 5, slot 1 no longer.
        r.peer(1).set_doorbell_id(None);
        assert!(n.notify(3, 1));
        assert_eq!(five.drain(), 1);
        assert!(!n.notify(1, 1));
        assert_eq!(five.drain(), 0);
    }

    /// A leave is reported for the slot paired at the announcement, and only while the region
    /// still pairs it; an id that two slots claim at its announcement is never rung.
    #[test]
    fn test_pairing_is_taken_at_announcement_and_must_be_unique() {
        let r = region();
        let mut peers = PeerDoorbells::default();
        let _five = join(&r, &mut peers, 1, 5);
        // A hostile member copies id 5 into slot 3 after the announcement: no effect.
        r.peer(3).set_doorbell_id(Some(5));
        assert_eq!(peers.remove(5, &r), Some(1));
        // ... and before the announcement of id 6: the pairing is ambiguous.
        r.peer(3).set_doorbell_id(Some(6));
        let six = join(&r, &mut peers, 2, 6);
        let peers = Rc::new(RefCell::new(peers));
        let mut n = EventFdNotifier::new(peers.clone(), r.clone());
        assert!(!n.notify(2, 1));
        assert!(!n.notify(3, 1));
        assert_eq!(six.drain(), 0);
        // The slot of a leave that the region no longer pairs with it is not reported.
        r.peer(2).set_doorbell_id(Some(9));
        assert_eq!(peers.borrow_mut().remove(6, &r), None);
    }

    #[test]
    fn test_peer_doorbells_stay_within_their_descriptor_budget() {
        let r = region();
        let mut peers = PeerDoorbells::with_budget(2);
        r.peer(1).set_doorbell_id(Some(1));
        peers.record_pairing(1, &r);
        assert!(peers.add(1, doorbell().0).unwrap());
        assert!(peers.add(1, doorbell().0).unwrap());
        assert!(!peers.add(2, doorbell().0).unwrap());
        peers.lost(2);
        assert_eq!(peers.dropped(), 2);
        assert_eq!(peers.remove(1, &r), Some(1));
        assert!(peers.add(2, doorbell().0).unwrap());
    }
}
