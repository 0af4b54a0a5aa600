//! `ivnet server`: the host's doorbell server, compatible with QEMU's `ivshmem-doorbell` device
//! (`-chardev socket,path=PATH,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=2`).
//!
//! It creates and initialises the region, assigns peer ids (the lowest free one; an id is reused
//! only after its holder left), hands out one eventfd per vector per peer, announces joins and
//! leaves. Debian ships no ivshmem server, so this one is production code: a client that
//! vanishes, sends anything (the protocol is one-way), or stops reading is dropped without
//! disturbing the others.

pub mod protocol;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::backend::file::{self, FileBackendError};
use crate::region::GeometryRequest;
use crate::sys::{EventFd, SignalFd};
use protocol::{MessageQueue, MAX_PEER_ID, MAX_VECTORS, PROTOCOL_VERSION};

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The region file.
    #[error(transparent)]
    Region(#[from] FileBackendError),
    /// QEMU maps the region as a PCI BAR, whose size must be a power of two.
    #[error(
        "region file {path} exists with {size} bytes, not a power of two as QEMU's ivshmem needs; \
         --size cannot change an existing file: remove it once no member uses it (or serve \
         another --shm)"
    )]
    NotPowerOfTwo {
        /// Region file.
        path: PathBuf,
        /// Its size.
        size: u64,
    },
    /// Vector count out of range.
    #[error("--vectors {0} is out of range: use 1..={MAX_VECTORS}")]
    Vectors(u32),
    /// Another server is live on the socket.
    #[error(
        "another server is already listening on {0}: stop it first or choose another --socket"
    )]
    InUse(PathBuf),
    /// A non-socket file is in the way.
    #[error("{0} exists and is not a socket: refusing to remove it")]
    NotASocket(PathBuf),
    /// Socket setup failed.
    #[error("cannot {what} {path}")]
    Socket {
        /// Which step.
        what: &'static str,
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The event loop failed.
    #[error("event loop: {what}")]
    EventLoop {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// UNIX socket to listen on.
    pub socket: PathBuf,
    /// Region file.
    pub shm: PathBuf,
    /// Size to create the region with.
    pub size: Option<u64>,
    /// Eventfds (interrupt vectors) per peer.
    pub vectors: u32,
    /// Region geometry.
    pub geometry: GeometryRequest,
    /// Messages queued for a client that does not read before it is dropped.
    pub max_queue: usize,
}

/// Default vectors per peer: 0 for link state, 1 for data.
pub const DEFAULT_VECTORS: u32 = 2;

struct Client {
    /// Doorbell id (what QEMU calls the peer id).
    id: u32,
    /// Peer-table slot in the region.
    slot: u32,
    stream: UnixStream,
    vectors: Vec<Arc<OwnedFd>>,
    out: MessageQueue,
    pid: Option<u32>,
}

const TOKEN_LISTENER: Token = Token(0);
const TOKEN_SIGNAL: Token = Token(1);

fn socket_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> ServerError {
    let path = path.to_path_buf();
    move |source| ServerError::Socket { what, path, source }
}

/// Removes a stale socket file, refusing if a server answers on it or it is not a socket.
fn clear_stale_socket(path: &Path) -> Result<(), ServerError> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(socket_err("inspect", path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(ServerError::NotASocket(path.into()));
    }
    match std::os::unix::net::UnixStream::connect(path) {
        Ok(_) => Err(ServerError::InUse(path.into())),
        Err(e)
            if e.kind() == io::ErrorKind::ConnectionRefused
                || e.kind() == io::ErrorKind::NotFound =>
        {
            log::info!("removing stale socket {}", path.display());
            std::fs::remove_file(path).map_err(socket_err("remove stale socket", path))
        }
        Err(e) => Err(socket_err("probe", path)(e)),
    }
}

fn peer_pid(stream: &UnixStream) -> Option<u32> {
    crate::sys::peer_pid(stream.as_raw_fd())
}

/// The running server.
pub struct Server {
    cfg: ServerConfig,
    shm: Arc<OwnedFd>,
    region: crate::region::Region,
    max_peers: u32,
    next_id: u32,
    listener: UnixListener,
    clients: BTreeMap<usize, Client>,
    next_token: usize,
}

impl Server {
    /// Creates/initialises the region and binds the socket.
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        if !(1..=MAX_VECTORS).contains(&cfg.vectors) {
            return Err(ServerError::Vectors(cfg.vectors));
        }
        let (f, region): (File, _) = file::attach_with_file(&cfg.shm, cfg.size, &cfg.geometry)?;
        let size = f.metadata().map(|m| m.len()).unwrap_or(0);
        if !size.is_power_of_two() {
            return Err(ServerError::NotPowerOfTwo { path: cfg.shm.clone(), size });
        }
        clear_stale_socket(&cfg.socket)?;
        let listener =
            UnixListener::bind(&cfg.socket).map_err(socket_err("listen on", &cfg.socket))?;
        let g = region.geometry();
        log::info!(
            target: crate::NOTICE,
            "serving {} ({} bytes, {} peer slots) on {} with {} vectors per peer",
            cfg.shm.display(),
            size,
            g.max_peers,
            cfg.socket.display(),
            cfg.vectors
        );
        Ok(Server {
            shm: Arc::new(OwnedFd::from(f)),
            max_peers: g.max_peers,
            region,
            next_id: 0,
            cfg,
            listener,
            clients: BTreeMap::new(),
            next_token: 2,
        })
    }

    /// Serves until SIGINT/SIGTERM.
    pub fn run(mut self) -> Result<(), ServerError> {
        let evl = |what: &'static str| move |source| ServerError::EventLoop { what, source };
        let signals = SignalFd::termination().map_err(evl("signalfd"))?;
        let mut poll = Poll::new().map_err(evl("epoll"))?;
        poll.registry()
            .register(&mut self.listener, TOKEN_LISTENER, Interest::READABLE)
            .map_err(evl("register the listener"))?;
        poll.registry()
            .register(&mut SourceFd(&signals.as_raw_fd()), TOKEN_SIGNAL, Interest::READABLE)
            .map_err(evl("register signals"))?;
        crate::sys::sd_notify_ready(&format!("listening on {}", self.cfg.socket.display()));
        let mut events = Events::with_capacity(256);
        loop {
            match poll.poll(&mut events, None) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(evl("epoll_wait")(e)),
            }
            for ev in events.iter() {
                match ev.token() {
                    TOKEN_LISTENER => self.accept_all(&poll),
                    TOKEN_SIGNAL => {
                        if let Some(sig) = signals.read() {
                            log::info!(
                                "signal {sig}: shutting down ({} peers connected)",
                                self.clients.len()
                            );
                            let _ = std::fs::remove_file(&self.cfg.socket);
                            return Ok(());
                        }
                    }
                    Token(t) => {
                        if ev.is_readable() || ev.is_read_closed() || ev.is_error() {
                            self.on_readable(&poll, t);
                        }
                        if ev.is_writable() {
                            self.flush(&poll, t);
                        }
                    }
                }
            }
        }
    }

    /// The next doorbell id: ids count up and wrap at 65536, skipping ids in use. They are not
    /// reused promptly because QEMU (7.2 at least) corrupts its heap when an id it saw leave
    /// joins again; QEMU's own server counts up the same way.
    fn next_doorbell_id(&mut self) -> Option<u32> {
        let used: BTreeSet<u32> = self.clients.values().map(|c| c.id).collect();
        let n = MAX_PEER_ID + 1;
        let id = (0..n).map(|k| (self.next_id + k) % n).find(|id| !used.contains(id))?;
        self.next_id = (id + 1) % n;
        Some(id)
    }

    /// The lowest peer-table slot no connected client holds.
    fn free_slot(&self) -> Option<u32> {
        let used: BTreeSet<u32> = self.clients.values().map(|c| c.slot).collect();
        (0..self.max_peers).find(|s| !used.contains(s))
    }

    fn accept_all(&mut self, poll: &Poll) {
        loop {
            let (stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // e.g. EMFILE: keep serving the clients we have.
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            self.admit(poll, stream);
        }
    }

    fn admit(&mut self, poll: &Poll, mut stream: UnixStream) {
        let pid = peer_pid(&stream);
        let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
        let Some(slot) = self.free_slot() else {
            log::warn!("refusing a client ({who}): all {} peer slots are in use", self.max_peers);
            return;
        };
        let Some(id) = self.next_doorbell_id() else {
            log::warn!("refusing a client ({who}): all doorbell ids are in use");
            return;
        };
        let mut vectors = Vec::with_capacity(self.cfg.vectors as usize);
        for _ in 0..self.cfg.vectors {
            match EventFd::new() {
                Ok(e) => vectors.push(Arc::new(OwnedFd::from(e))),
                Err(e) => {
                    log::warn!("refusing a client ({who}): cannot create an eventfd: {e}");
                    return;
                }
            }
        }
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = poll.registry().register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            log::warn!("refusing a client ({who}): cannot register it: {e}");
            return;
        }
        // Record which slot goes with this id before anyone hears of the id (release store).
        self.region.peer(slot).set_doorbell_id(Some(id));
        let mut out = MessageQueue::default();
        out.push(PROTOCOL_VERSION, None);
        out.push(id as i64, None);
        out.push(-1, Some(self.shm.clone()));
        for other in self.clients.values() {
            for v in &other.vectors {
                out.push(other.id as i64, Some(v.clone()));
            }
        }
        for v in &vectors {
            out.push(id as i64, Some(v.clone()));
        }
        // Announce the newcomer to everyone else.
        let tokens: Vec<usize> = self.clients.keys().copied().collect();
        for &t in &tokens {
            if let Some(c) = self.clients.get_mut(&t) {
                for v in &vectors {
                    c.out.push(id as i64, Some(v.clone()));
                }
            }
        }
        log::info!("peer {id} joined ({who}) in peer slot {slot}");
        self.clients.insert(token, Client { id, slot, stream, vectors, out, pid });
        self.flush(poll, token);
        for t in tokens {
            self.flush(poll, t);
        }
    }

    fn flush(&mut self, poll: &Poll, token: usize) {
        let Some(c) = self.clients.get_mut(&token) else { return };
        match c.out.flush(c.stream.as_raw_fd()) {
            Ok(_) if c.out.len() > self.cfg.max_queue => {
                let id = c.id;
                log::warn!(
                    "peer {id} does not read its messages ({} queued); disconnecting it",
                    c.out.len()
                );
                self.remove(poll, token);
            }
            Ok(_) => {}
            Err(e) => {
                let id = c.id;
                log::info!("peer {id}: connection lost while sending: {e}");
                self.remove(poll, token);
            }
        }
    }

    fn on_readable(&mut self, poll: &Poll, token: usize) {
        let Some(c) = self.clients.get_mut(&token) else { return };
        let mut buf = [0u8; 64];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                log::info!("peer {} left (peer slot {})", c.id, c.slot);
                self.remove(poll, token);
            }
            Ok(n) => {
                log::warn!(
                    "peer {} sent {n} bytes, but the protocol is one-way (server to client); disconnecting it",
                    c.id
                );
                self.remove(poll, token);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::info!("peer {} left (peer slot {}): {e}", c.id, c.slot);
                self.remove(poll, token);
            }
        }
    }

    fn remove(&mut self, poll: &Poll, token: usize) {
        let Some(mut c) = self.clients.remove(&token) else { return };
        let _ = poll.registry().deregister(&mut c.stream);
        let tokens: Vec<usize> = self.clients.keys().copied().collect();
        for &t in &tokens {
            if let Some(o) = self.clients.get_mut(&t) {
                // A client that has not begun to receive the join is spared both join and leave
                // (so a client that does not read cannot make us hold departed peers' fds).
                if !o.out.withdraw(&c.vectors) {
                    o.out.push(c.id as i64, None);
                }
            }
        }
        log::debug!("peer {} (pid {:?}) removed; {} peers remain", c.id, c.pid, self.clients.len());
        drop(c);
        for t in tokens {
            self.flush(poll, t);
        }
    }
}
