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

/// Every peer's doorbells (eventfds), by peer id and vector.
#[derive(Default)]
pub struct PeerDoorbells {
    peers: HashMap<u32, Vec<EventFd>>,
}

impl PeerDoorbells {
    /// Adds the next vector of peer `id`.
    pub fn add(&mut self, id: u32, fd: OwnedFd) -> io::Result<()> {
        self.peers.entry(id).or_default().push(EventFd::from_owned(fd)?);
        Ok(())
    }
    /// Forgets peer `id` (it left).
    pub fn remove(&mut self, id: u32) {
        self.peers.remove(&id);
    }
    /// Peers with doorbells.
    pub fn ids(&self) -> Vec<u32> {
        self.peers.keys().copied().collect()
    }
}

/// Rings peers through their eventfds.
pub struct EventFdNotifier {
    peers: Rc<RefCell<PeerDoorbells>>,
    region: Region,
}

impl Notifier for EventFdNotifier {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        // Peers are addressed by slot; the server's table in the region gives their doorbell id.
        let Some(id) = self.region.peer(peer).doorbell_id() else { return false };
        let peers = self.peers.borrow();
        // A peer with fewer vectors (a server run with --vectors 1) is rung on its last one: any
        // doorbell wakes an agent, which then looks at all its rings.
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
        let (-1, Some(shm_fd)) = (shm.value, shm.fd) else {
            return Err(proto(format!(
                "expected the region descriptor (-1 with a descriptor), got {}",
                shm.value
            )));
        };
        let mut peers = PeerDoorbells::default();
        let mut own = Vec::new();
        loop {
            let until = own_deadline.unwrap_or(deadline);
            let Some(m) = next(&mut reader, until)? else {
                if own.is_empty() {
                    return Err(timeout());
                }
                break; // the server has fewer vectors than we wanted
            };
            let Some(fd) = m.fd else {
                // A disconnect notice during setup: that peer is gone.
                if let Ok(pid) = u32::try_from(m.value) {
                    peers.remove(pid);
                }
                continue;
            };
            if m.value == id as i64 {
                own.push(EventFd::from_owned(fd).map_err(io_err)?);
                if own.len() >= want_vectors {
                    break;
                }
                own_deadline.get_or_insert_with(|| Instant::now() + VECTOR_GRACE);
            } else if (0..=MAX_PEER_ID as i64).contains(&m.value) {
                peers.add(m.value as u32, fd).map_err(io_err)?;
            } else {
                return Err(proto(format!("peer id {} is out of range", m.value)));
            }
        }
        let file = std::fs::File::from(shm_fd);
        let map = memmap2::MmapOptions::new()
            .map_raw(&file)
            .map_err(|source| ServerClientError::Map { path: path.into(), source })?;
        let name = format!("{} (via {})", "server region", path.display());
        let region = Region::attach(Arc::new(map), &name, req)?;
        let Some(slot) = region.slot_of_doorbell_id(doorbell_id) else {
            return Err(proto(format!(
                "doorbell id {doorbell_id} is not paired with a peer slot in the region \
                 (is this an ivnet server? QEMU's example server does not keep the table)"
            )));
        };
        if own.len() < want_vectors {
            log::warn!(
                "doorbell server {} gives {} vector(s) per peer, ivnet uses {want_vectors} \
                 (0: link changes, 1: data): data doorbells share vector 0; start the server \
                 with --vectors {want_vectors}",
                path.display(),
                own.len()
            );
        }
        log::info!(
            "doorbell server {} gave us doorbell id {doorbell_id} and peer slot {slot}, {} vectors, \
             {} peers present",
            path.display(),
            own.len(),
            peers.peers.len()
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
        EventFdNotifier { peers: self.peers.clone(), region: self.region.clone() }
    }

    /// Splits off the connection as a control handler: it follows joins and leaves, reporting the
    /// slots of peers that left. If the server goes away, peers keep talking (no new joins).
    pub fn into_control(self) -> (RawFd, ControlHandler, Vec<EventFd>, Rc<RefCell<PeerDoorbells>>) {
        let ServerSession { doorbell_id, stream, mut reader, peers, own, path, region, .. } = self;
        let fd = stream.as_raw_fd();
        let peers2 = peers.clone();
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
                    ReadOutcome::Message(Message { value, fd }) => {
                        let Ok(pid) = u32::try_from(value) else { continue };
                        if pid == doorbell_id || pid > MAX_PEER_ID {
                            continue; // extra own vectors, or nonsense: ignore (fd closes)
                        }
                        match fd {
                            Some(fd) => {
                                let mut p = peers2.borrow_mut();
                                let fresh = !p.peers.contains_key(&pid);
                                p.add(pid, fd)?;
                                if fresh {
                                    // The server paired the id with a slot before announcing it.
                                    match region.slot_of_doorbell_id(pid) {
                                        Some(slot) => log::info!(
                                            "doorbell server: peer {slot} joined (doorbell id {pid})"
                                        ),
                                        None => log::info!("doorbell server: doorbell id {pid} joined"),
                                    }
                                }
                            }
                            None => {
                                peers2.borrow_mut().remove(pid);
                                // Report the slot; if the server already gave it to a newcomer,
                                // that one shows up as a restart instead.
                                if let Some(slot) = region.slot_of_doorbell_id(pid) {
                                    left.push(slot);
                                }
                            }
                        }
                    }
                }
            }
        });
        (fd, handler, own, peers)
    }
}
