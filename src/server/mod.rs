//! `ivnet server`: the host's doorbell server, compatible with QEMU's `ivshmem-doorbell` device
//! (`-chardev socket,path=PATH,id=ivs -device ivshmem-doorbell,chardev=ivs,vectors=2`).
//!
//! It creates and initialises the region, assigns peer slots (the lowest one nobody holds) and
//! doorbell ids (counting up), hands out one eventfd per vector per peer, announces joins and
//! leaves. Debian ships no ivshmem server, so this one is production code:
//!
//! - a client that vanishes, sends anything (the protocol is one-way), or stops reading is
//!   dropped without disturbing the others; one that has not read its setup within the
//!   handshake deadline too (QEMU reads it at once; afterwards a client may stay silent
//!   forever, as QEMU does); clients are limited in number, in all and per uid
//!   ([`Limits`]), and running out of descriptors only delays new clients ([`accept`]);
//! - it never hands out a slot whose member lives (a live process on this host, or a moving
//!   heartbeat), so a restarted server loses nobody, and it continues doorbell ids above any
//!   recorded in the region;
//! - under systemd it keeps its listening socket, the region and every member's connection and
//!   eventfds in the service manager's fd store and takes them back when restarted
//!   ([`store`]), so members keep ringing each other across a restart.
//!
//! [`accept`]: Server::accept_all

pub mod protocol;
mod store;

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::backend::file::{self, CreateMode, FileBackendError};
use crate::region::{GeometryRequest, PeerState, Region, RegionError};
use crate::sys::{EventFd, SignalFd, TimerFd};
use protocol::{MessageQueue, MAX_PEER_ID, MAX_VECTORS, PROTOCOL_VERSION};
use store::{FdStore, Restored};

/// Why the server could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The region file.
    #[error(transparent)]
    Region(#[from] FileBackendError),
    /// The region handed back by the service manager.
    #[error("the region kept in the service manager's fd store")]
    StoredRegion(#[source] RegionError),
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

/// What an unauthenticated client may hold (anyone who may open the socket is a client).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// A client must have read its whole setup within this time, or it is dropped. QEMU and
    /// ivnet members read it at once; afterwards a client may stay silent as long as it likes.
    pub handshake_timeout: Duration,
    /// Most clients at once. `None`: as many as there are peer slots and as the descriptor
    /// limit allows.
    pub max_clients: Option<u32>,
    /// Most clients of one uid at once (SO_PEERCRED); uid 0 is not limited. `None`: one less
    /// than the peer slots, so no single user can fill the segment.
    pub max_clients_per_uid: Option<u32>,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            handshake_timeout: Duration::from_secs(5),
            max_clients: None,
            max_clients_per_uid: None,
        }
    }
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
    /// Mode and group of the socket and of a region file the server creates.
    pub mode: CreateMode,
    /// What clients may hold.
    pub limits: Limits,
}

/// Default vectors per peer: 0 for link state, 1 for data.
pub const DEFAULT_VECTORS: u32 = 2;

/// A slot whose heartbeat and incarnation stood still this long has no live member (three
/// heartbeats of a member with a 10 s link timeout would take as long; the default is 100 ms).
const LIVE_WINDOW: Duration = Duration::from_secs(3);
/// How often the server looks at the peer table, handshakes and a blocked accept.
const TICK: Duration = Duration::from_millis(200);
/// Descriptors kept for the server itself when sizing the client limit from RLIMIT_NOFILE.
const RESERVED_FDS: u64 = 32;

impl Client {
    /// Whether it has read its whole setup (checked now if not known yet); once it has, held
    /// notices move to the send queue.
    fn check_handshake(&mut self) -> bool {
        if !self.handshake_done
            && self.out.is_empty()
            && crate::sys::unread_output(self.stream.as_raw_fd()).is_ok_and(|n| n == 0)
        {
            self.handshake_done = true;
            self.out.append(&mut self.held);
        }
        self.handshake_done
    }

    /// Queues a notice (a join or leave of another peer).
    fn notify(&mut self, value: i64, fd: Option<Arc<OwnedFd>>) {
        let q = if self.check_handshake() { &mut self.out } else { &mut self.held };
        q.push(value, fd);
    }

    /// Takes back a departed peer's join if this client has not begun to receive it.
    fn withdraw(&mut self, fds: &[Arc<OwnedFd>]) -> bool {
        self.held.withdraw(fds) || self.out.withdraw(fds)
    }
}

struct Client {
    /// Doorbell id (what QEMU calls the peer id).
    id: u32,
    /// Peer-table slot in the region.
    slot: u32,
    stream: UnixStream,
    vectors: Vec<Arc<OwnedFd>>,
    out: MessageQueue,
    /// Notices for a client still in its handshake: sent once it has read its setup, so that
    /// "everything sent was read" tells that the setup was.
    held: MessageQueue,
    pid: Option<u32>,
    uid: Option<u32>,
    /// When it connected (for the handshake deadline).
    since: Instant,
    /// It has read its whole setup.
    handshake_done: bool,
    /// Its descriptors are in the service manager's fd store.
    stored: bool,
}

/// What the server knows of one peer-table entry.
#[derive(Debug, Clone, Copy)]
struct SlotWatch {
    incarnation: u64,
    heartbeat: u64,
    /// When incarnation or heartbeat last changed (or the server started).
    changed: Instant,
    /// The incarnation the slot had when its client (QEMU, an agent) closed its connection: the
    /// member behind it is gone while the incarnation stays the same.
    released: Option<u64>,
    /// The doorbell id the server paired with this slot, as it should read in the region.
    doorbell_id: Option<u32>,
}

const TOKEN_LISTENER: Token = Token(0);
const TOKEN_SIGNAL: Token = Token(1);
const TOKEN_TIMER: Token = Token(2);
const FIRST_CLIENT_TOKEN: usize = 16;
/// Connections accepted in one round before the other events get their turn.
const ACCEPT_BATCH: usize = 4;

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

/// Binds the listening socket with `mode`: created under a umask that lets nobody else in, then
/// given its mode and group exactly.
fn bind_socket(path: &Path, mode: &CreateMode) -> Result<UnixListener, ServerError> {
    clear_stale_socket(path)?;
    let old = crate::sys::umask(0o177);
    let bound = UnixListener::bind(path);
    crate::sys::umask(old);
    let listener = bound.map_err(socket_err("listen on", path))?;
    if let Err(e) = mode.apply_to_path(path) {
        let _ = std::fs::remove_file(path);
        return Err(socket_err("set the mode and group of", path)(e));
    }
    Ok(listener)
}

/// At most [`RateLimit::BURST`] log lines per interval about refused clients, whatever
/// clients do.
struct RateLimit {
    window: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(5);
    const BURST: u32 = 20;

    fn allow(&mut self, now: Instant) -> Option<u64> {
        match self.window {
            Some(t) if now < t + Self::INTERVAL => {
                if self.logged >= Self::BURST {
                    self.suppressed += 1;
                    return None;
                }
            }
            _ => {
                self.window = Some(now);
                self.logged = 0;
            }
        }
        self.logged += 1;
        Some(std::mem::take(&mut self.suppressed))
    }
}

/// The running server.
pub struct Server {
    cfg: ServerConfig,
    shm: Arc<OwnedFd>,
    region: Region,
    max_peers: u32,
    next_id: u32,
    listener: UnixListener,
    clients: BTreeMap<usize, Client>,
    next_token: usize,
    slots: Vec<SlotWatch>,
    store: FdStore,
    /// Eventfds for the next client, made before it is accepted: a client is accepted only when
    /// the server can serve it.
    spare: Vec<EventFd>,
    /// Accepting stopped for lack of descriptors; retried on the timer and when a client leaves.
    accept_blocked: bool,
    /// The last accept round stopped at its batch size: more connections may be queued.
    accept_more: bool,
    max_clients: usize,
    per_uid: usize,
    refusals: RateLimit,
    /// The socket path was bound by this process (not handed back by the service manager).
    socket_bound_here: bool,
}

impl Server {
    /// Creates/initialises the region (or takes it, the socket and the clients back from the
    /// service manager's fd store) and binds the socket.
    pub fn bind(cfg: ServerConfig) -> Result<Server, ServerError> {
        if !(1..=MAX_VECTORS).contains(&cfg.vectors) {
            return Err(ServerError::Vectors(cfg.vectors));
        }
        let store = FdStore::from_env();
        let mut restored = store::take_back(&store);
        let shm_restored = restored.shm.is_some();
        let (shm_file, region, attached) = match restored.shm.take() {
            Some(fd) => {
                let f = File::from(fd);
                let map = memmap2::MmapOptions::new().map_raw(&f).map_err(|source| {
                    ServerError::Region(FileBackendError::Map { path: cfg.shm.clone(), source })
                })?;
                let mem = crate::sys::sigbus::guard(Arc::new(map));
                let name = cfg.shm.display().to_string();
                let region =
                    Region::attach(mem, &name, &cfg.geometry).map_err(ServerError::StoredRegion)?;
                log::info!("took the region {} back from the fd store", cfg.shm.display());
                (f, region, None)
            }
            None => {
                let a = file::attach_with(&cfg.shm, cfg.size, &cfg.geometry, &cfg.mode)?;
                (
                    a.file.try_clone().map_err(|source| FileBackendError::Open {
                        path: cfg.shm.clone(),
                        source,
                    })?,
                    a.region.clone(),
                    Some(a),
                )
            }
        };
        let fail = |e: ServerError| {
            if let Some(a) = &attached {
                a.discard_if_unused();
            }
            e
        };
        let size = shm_file.metadata().map(|m| m.len()).unwrap_or(0);
        if !size.is_power_of_two() {
            return Err(fail(ServerError::NotPowerOfTwo { path: cfg.shm.clone(), size }));
        }
        let (listener, socket_bound_here) = match restored.listener.take() {
            Some(fd) => {
                let std_listener = std::os::unix::net::UnixListener::from(fd);
                std_listener.set_nonblocking(true).map_err(socket_err("use", &cfg.socket))?;
                log::info!("took the listening socket back from the fd store");
                (UnixListener::from_std(std_listener), false)
            }
            None => (bind_socket(&cfg.socket, &cfg.mode).map_err(fail)?, true),
        };
        let g = region.geometry();
        let shm = Arc::new(OwnedFd::from(shm_file));
        // What came from the store is still in it.
        if socket_bound_here {
            store.keep(listener.as_raw_fd(), store::LISTENER);
        }
        if !shm_restored {
            store.keep(shm.as_raw_fd(), store::SHM);
        }
        let now = Instant::now();
        let slots = (0..g.max_peers)
            .map(|s| {
                let p = region.peer(s);
                SlotWatch {
                    incarnation: p.incarnation(),
                    heartbeat: p.heartbeat(),
                    changed: now,
                    released: None,
                    doorbell_id: p.doorbell_id(),
                }
            })
            .collect();
        // Doorbell ids continue above any recorded in the region (QEMU cannot take an id it saw
        // leave) and above any of the clients handed back.
        let recorded = (0..g.max_peers).filter_map(|s| region.peer(s).doorbell_id());
        let highest = recorded.chain(restored.clients.iter().map(|c| c.id)).max();
        let next_id = highest.map_or(0, |h| (h + 1) % (MAX_PEER_ID + 1));
        let (max_clients, per_uid) = client_limits(&cfg, g.max_peers);
        let mut server = Server {
            shm,
            max_peers: g.max_peers,
            region,
            next_id,
            cfg,
            listener,
            clients: BTreeMap::new(),
            next_token: FIRST_CLIENT_TOKEN,
            slots,
            store,
            spare: Vec::new(),
            accept_blocked: false,
            accept_more: false,
            max_clients,
            per_uid,
            refusals: RateLimit { window: None, logged: 0, suppressed: 0 },
            socket_bound_here,
        };
        server.restore_clients(restored, now);
        // Serving only once the members handed back are adopted: whoever waits for this line
        // (a test, an operator) then sees them in the log.
        log::info!(
            target: crate::NOTICE,
            "serving {} ({} bytes, {} peer slots) on {} with {} vectors per peer; doorbell ids \
             from {}; at most {} clients, {} per uid (uid 0 unlimited), {:?} to read the setup",
            server.cfg.shm.display(),
            size,
            server.max_peers,
            server.cfg.socket.display(),
            server.cfg.vectors,
            server.next_id,
            server.max_clients,
            server.per_uid,
            server.cfg.limits.handshake_timeout
        );
        Ok(server)
    }

    /// Adopts the clients handed back by the service manager: they have their setup already.
    /// Eventfds whose connection did not come back belong to a member that left meanwhile: they
    /// are dropped from the store, and the others hear that it left.
    fn restore_clients(&mut self, restored: Restored, now: Instant) {
        let mut gone = Vec::new();
        for c in restored.orphans {
            log::info!("peer {} left while the server was down", c.id);
            self.store.forget(&c.names());
            gone.push(c.id);
        }
        for c in restored.clients {
            let names = c.names();
            let Some(stream) = c.stream else { continue };
            if c.slot >= self.max_peers {
                log::warn!("dropping stored peer {} with slot {} out of range", c.id, c.slot);
                self.store.forget(&names);
                continue;
            }
            let stream = UnixStream::from_std(stream);
            let cred = crate::sys::peer_cred(stream.as_raw_fd());
            let token = self.next_token;
            self.next_token += 1;
            self.slots[c.slot as usize].doorbell_id = Some(c.id);
            self.region.peer(c.slot).set_doorbell_id(Some(c.id));
            log::info!(
                "peer {} (peer slot {}, {} vectors) taken back from the fd store",
                c.id,
                c.slot,
                c.vectors.len()
            );
            let mut out = MessageQueue::default();
            for &id in &gone {
                out.push(id as i64, None);
            }
            self.clients.insert(
                token,
                Client {
                    id: c.id,
                    slot: c.slot,
                    stream,
                    vectors: c.vectors.into_iter().map(Arc::new).collect(),
                    out,
                    held: MessageQueue::default(),
                    pid: cred.map(|c| c.pid).filter(|&p| p != 0),
                    uid: cred.map(|c| c.uid),
                    since: now,
                    handshake_done: true,
                    stored: true,
                },
            );
        }
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
        let timer = TimerFd::new().map_err(evl("timerfd"))?;
        timer.set_periodic(Some(TICK)).map_err(evl("arm the timer"))?;
        poll.registry()
            .register(&mut SourceFd(&timer.as_raw_fd()), TOKEN_TIMER, Interest::READABLE)
            .map_err(evl("register the timer"))?;
        let tokens: Vec<usize> = self.clients.keys().copied().collect();
        for t in tokens {
            if let Some(c) = self.clients.get_mut(&t) {
                let r = poll.registry().register(
                    &mut c.stream,
                    Token(t),
                    Interest::READABLE | Interest::WRITABLE,
                );
                if let Err(e) = r {
                    log::warn!("peer {}: cannot watch its connection: {e}", c.id);
                }
            }
            self.flush(&poll, t);
        }
        crate::sys::sd::ready(&format!(
            "listening on {} ({} peers)",
            self.cfg.socket.display(),
            self.clients.len()
        ));
        // Connections that queued while the server was down are served now.
        self.accept_all(&poll);
        let mut events = Events::with_capacity(256);
        loop {
            // Between rounds of accepts, departures and other events are handled first.
            let timeout = self.accept_more.then_some(Duration::ZERO);
            match poll.poll(&mut events, timeout) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(evl("epoll_wait")(e)),
            }
            let mut accepted = false;
            for ev in events.iter() {
                match ev.token() {
                    TOKEN_LISTENER => {
                        self.accept_all(&poll);
                        accepted = true;
                    }
                    TOKEN_TIMER => {
                        timer.drain();
                        self.tick(&poll, Instant::now());
                    }
                    TOKEN_SIGNAL => {
                        if let Some(sig) = signals.read() {
                            log::info!(
                                "signal {sig}: shutting down ({} peers connected)",
                                self.clients.len()
                            );
                            // With an fd store the listener lives on in the service manager for
                            // the next start: its path must stay.
                            if self.socket_bound_here && !self.store.active() {
                                let _ = std::fs::remove_file(&self.cfg.socket);
                            }
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
            if self.accept_more && !accepted {
                self.accept_all(&poll);
            }
        }
    }

    /// Periodic work: the peer table (liveness, doorbell ids), handshake deadlines, an accept
    /// that ran out of descriptors.
    fn tick(&mut self, poll: &Poll, now: Instant) {
        for s in 0..self.max_peers {
            let p = self.region.peer(s);
            let (inc, hb) = (p.incarnation(), p.heartbeat());
            let w = &mut self.slots[s as usize];
            if inc != w.incarnation || hb != w.heartbeat {
                w.incarnation = inc;
                w.heartbeat = hb;
                w.changed = now;
            }
            // The server is the only writer of the doorbell id: put back what was overwritten.
            if w.doorbell_id.is_some() && p.doorbell_id() != w.doorbell_id {
                log::warn!(
                    "peer slot {s}: its doorbell id was overwritten ({:?}, should be {:?}); \
                     written back",
                    p.doorbell_id(),
                    w.doorbell_id
                );
                p.set_doorbell_id(w.doorbell_id);
            }
        }
        self.follow_moved_clients();
        let timeout = self.cfg.limits.handshake_timeout;
        let mut late = Vec::new();
        let mut done = Vec::new();
        for (&t, c) in self.clients.iter_mut().filter(|(_, c)| !c.handshake_done) {
            if c.check_handshake() {
                done.push(t);
            } else if now.duration_since(c.since) > timeout {
                late.push(t);
            }
        }
        for t in done {
            self.flush(poll, t);
        }
        for t in late {
            if let Some(c) = self.clients.get(&t) {
                log::warn!(
                    "peer {} does not read its messages: it has not read its setup within \
                     {timeout:?} ({}); disconnecting it",
                    c.id,
                    who(c.pid, c.uid)
                );
            }
            self.remove(poll, t, false);
        }
        if self.accept_blocked {
            self.accept_all(poll);
        }
    }

    /// A member on this host that found its slot held by another and rejoined under a free one
    /// (see `agent::link`) is found by its pid: its doorbell id is paired with its new slot, so
    /// the others ring it again.
    fn follow_moved_clients(&mut self) {
        let me = crate::sys::host_token();
        let max = self.max_peers;
        let mut moves = Vec::new();
        for (&t, c) in &self.clients {
            let Some(pid) = c.pid else { continue };
            let owned_by = |s: u32| {
                let p = self.region.peer(s);
                p.owner() == (me, pid) && matches!(p.state(), PeerState::Up | PeerState::Joining)
            };
            if owned_by(c.slot) {
                continue;
            }
            if let Some(s) = (0..max).find(|&s| s != c.slot && owned_by(s)) {
                moves.push((t, s));
            }
        }
        for (t, s) in moves {
            let Some(c) = self.clients.get_mut(&t) else { continue };
            log::info!(
                "peer {} (pid {:?}) moved from peer slot {} to {s}: its doorbell id now goes with \
                 slot {s}",
                c.id,
                c.pid,
                c.slot
            );
            if c.stored {
                self.store.forget(&[format!("peer-{}-{}", c.id, c.slot)]);
                self.store.keep(c.stream.as_raw_fd(), &format!("peer-{}-{s}", c.id));
            }
            self.slots[c.slot as usize].doorbell_id = None;
            self.slots[s as usize].doorbell_id = Some(c.id);
            self.region.peer(s).set_doorbell_id(Some(c.id));
            // Off the old slot too: members believe the id's new slot once the slot it was
            // announced with no longer carries it (see server_client's PeerDoorbells::target).
            self.region.peer(c.slot).set_doorbell_id(None);
            c.slot = s;
        }
    }

    /// The next doorbell id: ids count up and wrap at 65536, skipping ids in use. They are not
    /// reused promptly because QEMU (7.2 at least) corrupts its heap when an id it saw leave
    /// joins again; QEMU's own server counts up the same way.
    fn next_doorbell_id(&mut self) -> Option<u32> {
        let mut used: BTreeSet<u32> = self.clients.values().map(|c| c.id).collect();
        used.extend(self.slots.iter().filter_map(|w| w.doorbell_id));
        let n = MAX_PEER_ID + 1;
        let id = (0..n).map(|k| (self.next_id + k) % n).find(|id| !used.contains(id))?;
        self.next_id = (id + 1) % n;
        Some(id)
    }

    /// Whether slot `s` may have a live member although no client of ours holds it (one that
    /// joined through an earlier server, or without a server): it says joining or up, it was
    /// not released by a departed client, and its owner's process lives on this host or its
    /// heartbeat moved within [`LIVE_WINDOW`].
    fn slot_is_live(&self, s: u32, now: Instant) -> bool {
        let p = self.region.peer(s);
        if !matches!(p.state(), PeerState::Up | PeerState::Joining) {
            return false;
        }
        let w = &self.slots[s as usize];
        if w.released == Some(p.incarnation()) {
            return false;
        }
        let (host, pid) = p.owner();
        if host != 0 && host == crate::sys::host_token() && pid != 0 {
            return crate::sys::process_exists(pid);
        }
        now.duration_since(w.changed) < LIVE_WINDOW
    }

    /// The lowest peer-table slot no client holds and no live member uses.
    fn free_slot(&self, now: Instant) -> Option<u32> {
        let used: BTreeSet<u32> = self.clients.values().map(|c| c.slot).collect();
        (0..self.max_peers).find(|&s| !used.contains(&s) && !self.slot_is_live(s, now))
    }

    /// Accepts every queued connection the server can serve. When descriptors run out the
    /// backlog stays queued (edge-triggered polling would not report it again): the timer and
    /// every departure retry.
    fn accept_all(&mut self, poll: &Poll) {
        self.accept_more = false;
        for _ in 0..ACCEPT_BATCH {
            // The eventfds come first: a client is accepted only when it can be served.
            while self.spare.len() < self.cfg.vectors as usize {
                match EventFd::new() {
                    Ok(e) => self.spare.push(e),
                    Err(e) => return self.block_accept(&e),
                }
            }
            let (stream, _) = match self.listener.accept() {
                Ok(s) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    self.accept_blocked = false;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if is_fd_shortage(&e) => return self.block_accept(&e),
                Err(e) => {
                    log::warn!("accept failed: {e}");
                    return;
                }
            };
            self.admit(poll, stream);
        }
        // A full batch: a fast client could keep this loop busy for ever, so let the event loop
        // handle departures before the next round.
        self.accept_more = true;
    }

    fn block_accept(&mut self, e: &io::Error) {
        if !self.accept_blocked {
            log::warn!(
                "cannot accept clients for now: {e} ({} clients connected); new clients wait \
                 until descriptors are free (raise the limit: LimitNOFILE=, ulimit -n)",
                self.clients.len()
            );
        }
        self.accept_blocked = true;
    }

    fn refuse(&mut self, stream: &UnixStream, why: String) {
        if let Some(s) = self.refusals.allow(Instant::now()) {
            let more =
                if s > 0 { format!(" ({s} more refused, not logged)") } else { String::new() };
            log::warn!("refusing a client ({why}){more}");
        }
        let _ = crate::sys::shutdown(stream.as_raw_fd());
    }

    /// Looks at every connection for a departure whose event is still queued (a client that
    /// connects, reads and closes faster than the event loop turns), before refusing anyone.
    fn reap_departed(&mut self, poll: &Poll) {
        let tokens: Vec<usize> = self.clients.keys().copied().collect();
        for t in tokens {
            self.on_readable(poll, t);
        }
    }

    fn admit(&mut self, poll: &Poll, mut stream: UnixStream) {
        let now = Instant::now();
        if self.clients.len() >= self.max_clients || self.free_slot(now).is_none() {
            self.reap_departed(poll);
        }
        let cred = crate::sys::peer_cred(stream.as_raw_fd());
        let (pid, uid) = (cred.map(|c| c.pid).filter(|&p| p != 0), cred.map(|c| c.uid));
        let whom = who(pid, uid);
        if self.clients.len() >= self.max_clients {
            return self.refuse(&stream, format!("{whom}: {} clients already", self.clients.len()));
        }
        if let Some(u) = uid.filter(|&u| u != 0) {
            let mine = self.clients.values().filter(|c| c.uid == Some(u)).count();
            if mine >= self.per_uid {
                return self.refuse(
                    &stream,
                    format!(
                        "{whom}: uid {u} has {mine} clients already, the most one uid may have"
                    ),
                );
            }
        }
        let Some(slot) = self.free_slot(now) else {
            return self.refuse(
                &stream,
                format!("{whom}: all {} peer slots are in use by live members", self.max_peers),
            );
        };
        let Some(id) = self.next_doorbell_id() else {
            return self.refuse(&stream, format!("{whom}: all doorbell ids are in use"));
        };
        let vectors: Vec<Arc<OwnedFd>> =
            self.spare.drain(..).map(|e| Arc::new(OwnedFd::from(e))).collect();
        let token = self.next_token;
        self.next_token += 1;
        if let Err(e) = poll.registry().register(
            &mut stream,
            Token(token),
            Interest::READABLE | Interest::WRITABLE,
        ) {
            return self.refuse(&stream, format!("{whom}: cannot register it: {e}"));
        }
        // Record which slot goes with this id before anyone hears of the id (release store).
        self.region.peer(slot).set_doorbell_id(Some(id));
        let w = &mut self.slots[slot as usize];
        w.doorbell_id = Some(id);
        w.released = None;
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
                    c.notify(id as i64, Some(v.clone()));
                }
            }
        }
        let pid_text = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
        let uid_text = uid.map_or_else(String::new, |u| format!(", uid {u}"));
        log::info!("peer {id} joined ({pid_text}) in peer slot {slot}{uid_text}");
        self.clients.insert(
            token,
            Client {
                id,
                slot,
                stream,
                vectors,
                out,
                held: MessageQueue::default(),
                pid,
                uid,
                since: now,
                handshake_done: false,
                stored: false,
            },
        );
        self.flush(poll, token);
        for t in tokens {
            self.flush(poll, t);
        }
    }

    fn flush(&mut self, poll: &Poll, token: usize) {
        let Some(c) = self.clients.get_mut(&token) else { return };
        match c.out.flush(c.stream.as_raw_fd()) {
            Ok(_) if c.out.len() + c.held.len() > self.cfg.max_queue => {
                let id = c.id;
                log::warn!(
                    "peer {id} does not read its messages ({} queued); disconnecting it",
                    c.out.len() + c.held.len()
                );
                self.remove(poll, token, false);
            }
            Ok(all_sent) => {
                // Once its whole setup is in the socket, a restarted server can take the client
                // over mid-stream: keep its descriptors in the store from now on.
                if all_sent && !c.stored {
                    c.stored = true;
                    let fds: Vec<_> = std::iter::once(c.stream.as_raw_fd())
                        .chain(c.vectors.iter().map(|v| v.as_raw_fd()))
                        .collect();
                    self.store.keep_client(c.id, c.slot, &fds);
                }
            }
            Err(e) => {
                let id = c.id;
                log::info!("peer {id}: connection lost while sending: {e}");
                self.remove(poll, token, true);
            }
        }
    }

    fn on_readable(&mut self, poll: &Poll, token: usize) {
        let Some(c) = self.clients.get_mut(&token) else { return };
        let mut buf = [0u8; 64];
        match c.stream.read(&mut buf) {
            Ok(0) => {
                log::info!("peer {} left (peer slot {})", c.id, c.slot);
                self.remove(poll, token, true);
            }
            Ok(n) => {
                log::warn!(
                    "peer {} sent {n} bytes, but the protocol is one-way (server to client); disconnecting it",
                    c.id
                );
                self.remove(poll, token, false);
            }
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                log::info!("peer {} left (peer slot {}): {e}", c.id, c.slot);
                self.remove(poll, token, true);
            }
        }
    }

    /// Drops a client. `gone`: it closed the connection itself, so the member behind it (QEMU,
    /// an agent) is gone and its slot may be handed out again at once; a client the server
    /// disconnects may still be a running member, judged by its heartbeat instead.
    fn remove(&mut self, poll: &Poll, token: usize, gone: bool) {
        let Some(mut c) = self.clients.remove(&token) else { return };
        let _ = poll.registry().deregister(&mut c.stream);
        // The service manager holds duplicates: make sure the client sees the end.
        let _ = crate::sys::shutdown(c.stream.as_raw_fd());
        if c.stored {
            self.store.forget(&store::client_names(c.id, c.slot, c.vectors.len()));
        }
        if gone {
            let w = &mut self.slots[c.slot as usize];
            w.released = Some(self.region.peer(c.slot).incarnation());
        }
        let tokens: Vec<usize> = self.clients.keys().copied().collect();
        for &t in &tokens {
            if let Some(o) = self.clients.get_mut(&t) {
                // A client that has not begun to receive the join is spared both join and leave
                // (so a client that does not read cannot make us hold departed peers' fds).
                if !o.withdraw(&c.vectors) {
                    o.notify(c.id as i64, None);
                }
            }
        }
        log::debug!(
            "peer {} ({}) removed; {} peers remain",
            c.id,
            who(c.pid, c.uid),
            self.clients.len()
        );
        drop(c);
        for t in tokens {
            self.flush(poll, t);
        }
        if self.accept_blocked {
            self.accept_all(poll);
        }
    }
}

fn who(pid: Option<u32>, uid: Option<u32>) -> String {
    let p = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
    match uid {
        Some(u) => format!("{p}, uid {u}"),
        None => p,
    }
}

fn is_fd_shortage(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}

/// (total, per uid) client limits: as configured, else as many as there are slots (and the
/// descriptor limit allows: a client costs 1 + vectors descriptors), and one less per uid.
fn client_limits(cfg: &ServerConfig, max_peers: u32) -> (usize, usize) {
    let per_client = 1 + cfg.vectors as u64;
    let by_fds = crate::sys::nofile_limit()
        .map_or(u64::MAX, |n| n.saturating_sub(RESERVED_FDS) / per_client)
        .max(1);
    let total = match cfg.limits.max_clients {
        Some(n) => n as u64,
        None => {
            if by_fds < max_peers as u64 {
                log::warn!(
                    "the descriptor limit lets this server hold {by_fds} clients of {max_peers} \
                     peer slots ({per_client} descriptors each): raise it (LimitNOFILE=, ulimit -n)"
                );
            }
            (max_peers as u64).min(by_fds)
        }
    };
    let per_uid = match cfg.limits.max_clients_per_uid {
        Some(n) => n as u64,
        None => (max_peers as u64).saturating_sub(1).max(1),
    };
    (total.max(1) as usize, per_uid.max(1) as usize)
}
