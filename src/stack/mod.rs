//! The smoltcp mode: the rings as a smoltcp device, so a process with no privileges and no TAP
//! is a full host on a segment (DESIGN "stack").
//!
//! [`Stack::open`] joins a segment through the `file` or `server` backend, claims a peer slot
//! (peer kind `stack`), and yields a smoltcp [`Interface`] with its addresses and routes, a
//! [`RingDevice`] and an empty [`SocketSet`]. The caller adds sockets and drives everything with
//! [`Stack::poll`] (move frames, run smoltcp) and [`Stack::wait`] (sleep on the doorbell, the
//! poll timer or smoltcp's next deadline, whichever comes first), or with [`Stack::run`], which
//! loops over both. Other descriptors (a host `TcpListener`, say) can join the same wait through
//! [`Stack::registry`]. Dropping the stack leaves the segment (the peer slot is marked left).
//!
//! ```no_run
//! use ivnet::config::Cidr;
//! use ivnet::stack::{Stack, StackConfig, StackError, Step};
//! use smoltcp::socket::tcp;
//!
//! let mut cfg = StackConfig::file("/dev/shm/ivnet".as_ref(), Some(64 << 20));
//! cfg.addresses = vec![Cidr { addr: [10, 0, 0, 2].into(), prefix: 24 }];
//! let mut stack = Stack::open(&cfg)?;
//! let sock = stack.sockets.add(stack.tcp_socket());
//! let port = stack.ephemeral_port();
//! let target = (smoltcp::wire::IpAddress::v4(10, 0, 0, 1), 22);
//! let cx = stack.iface.context();
//! stack.sockets.get_mut::<tcp::Socket>(sock).connect(cx, target, port).map_err(|e| {
//!     StackError::Socket { what: "10.0.0.1:22".into(), reason: e.to_string() }
//! })?;
//! // Poll, look at the socket, sleep until something happens; until connected.
//! stack.run(|stack| {
//!     let s = stack.sockets.get_mut::<tcp::Socket>(sock);
//!     Ok(if s.may_send() { Step::Done(()) } else { Step::Continue(None) })
//! })?;
//! # Ok::<(), StackError>(())
//! ```
//!
//! The `ivnet stack` tools ([`cli`]) are built on exactly this API; see also
//! `examples/stack_fetch.rs`.

pub mod cli;
pub mod device;
mod echo;
mod forward;
mod ping;
mod transfer;

use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token};
use smoltcp::iface::{Config, Interface, SocketSet};
use smoltcp::socket::tcp;
use smoltcp::wire::{EthernetAddress, IpAddress, IpCidr, Ipv6Address};

use crate::agent::datapath::{Datapath, DatapathError, DatapathOptions};
use crate::agent::link::{self, Claim, ClaimError};
use crate::backend::file::FileBackendError;
use crate::backend::server_client::{ServerClientError, ServerSession};
use crate::config::Cidr;
use crate::doorbell::{ControlHandler, Wakeups};
use crate::doorbell::{NoDoorbells, Notifier, VECTOR_LINK};
use crate::mac::Mac;
use crate::region::layout::DoorbellCounter;
use crate::region::{GeometryRequest, PeerKind, Region};
use crate::sys::{EventFd, SignalFd, TimerFd};

pub use device::{DeviceStats, NoInterface, RingDevice};
pub use transfer::PseudoRandom;

/// How a stack peer reaches its region.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StackBackend {
    /// A shared file, polled (`--shm`).
    File {
        /// The region file.
        path: PathBuf,
        /// Size to create it with when it does not exist.
        size: Option<u64>,
    },
    /// The doorbell server (`--socket`): peer id, region and doorbells come from it.
    Server {
        /// Its UNIX socket.
        socket: PathBuf,
    },
}

/// Everything [`Stack::open`] needs. Start from [`StackConfig::file`] or
/// [`StackConfig::server`] and set the fields that differ from the defaults.
#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where the region is.
    pub backend: StackBackend,
    /// Geometry wishes (for a region this peer creates; checked against an existing one).
    pub geometry: GeometryRequest,
    /// Peer id to claim (`file` backend); `None` takes a free slot.
    pub peer_id: Option<u32>,
    /// Interface addresses with their prefix (at least one). An IPv6 link-local address derived
    /// from the MAC is added in any case, for neighbour discovery.
    pub addresses: Vec<Cidr>,
    /// Default gateways, at most one IPv4 and one IPv6, each inside an address's subnet.
    pub gateways: Vec<IpAddr>,
    /// MAC address; `None`: the stable one derived from the peer id, as for the agent.
    pub mac: Option<Mac>,
    /// IP MTU (at most the segment's).
    pub mtu: u32,
    /// Interval at which the rings are polled when there are no doorbells.
    pub poll: Duration,
    /// Without doorbells, the poll interval backs off to this after [`POLL_BACKOFF_AFTER`]
    /// without traffic, as the agent's does.
    pub poll_idle: Duration,
    /// Keep polling this long after the last frame before sleeping.
    pub spin: Duration,
    /// A peer whose heartbeat stops for this long is down.
    pub link_timeout: Duration,
    /// Drop frames whose source MAC is not their sender's own.
    pub pin_macs: bool,
    /// Receive and send buffer of each TCP socket made by [`Stack::tcp_socket`].
    pub tcp_buffer: usize,
    /// Catch SIGINT, SIGTERM and SIGHUP (blocked for the calling thread) and report them through
    /// [`Stack::signal`], so a tool can leave the segment cleanly.
    pub handle_signals: bool,
    /// Mode and group of a region file this peer creates (`file` backend).
    pub create_mode: crate::backend::file::CreateMode,
}

/// Default receive and send buffer per TCP socket.
pub const DEFAULT_TCP_BUFFER: usize = 1 << 20;

impl StackConfig {
    fn with_backend(backend: StackBackend) -> Self {
        StackConfig {
            backend,
            geometry: GeometryRequest::default(),
            peer_id: None,
            addresses: Vec::new(),
            gateways: Vec::new(),
            mac: None,
            mtu: crate::config::DEFAULT_MTU,
            poll: Duration::from_micros(crate::config::DEFAULT_POLL_US),
            poll_idle: Duration::from_micros(crate::config::DEFAULT_POLL_IDLE_US),
            spin: Duration::from_micros(crate::config::DEFAULT_SPIN_US),
            link_timeout: Duration::from_millis(crate::config::DEFAULT_LINK_TIMEOUT_MS),
            pin_macs: false,
            tcp_buffer: DEFAULT_TCP_BUFFER,
            handle_signals: false,
            create_mode: crate::backend::file::CreateMode::default(),
        }
    }

    /// A configuration for the `file` backend with the agent's defaults and no address yet.
    pub fn file(path: &Path, size: Option<u64>) -> Self {
        Self::with_backend(StackBackend::File { path: path.into(), size })
    }

    /// A configuration for the `server` backend with the agent's defaults and no address yet.
    pub fn server(socket: &Path) -> Self {
        Self::with_backend(StackBackend::Server { socket: socket.into() })
    }
}

/// Why the stack could not start, or why a tool failed. Each message says what to check.
#[derive(Debug, thiserror::Error)]
pub enum StackError {
    /// A configuration value is unusable.
    #[error("{option}: {message}")]
    InvalidConfig {
        /// The flag.
        option: &'static str,
        /// What is wrong and what is allowed.
        message: String,
    },
    /// The region file could not be used.
    #[error(transparent)]
    File(#[from] FileBackendError),
    /// Joining through the doorbell server failed.
    #[error(transparent)]
    Server(#[from] ServerClientError),
    /// No peer slot.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The requested MTU does not fit the segment.
    #[error(
        "--mtu {mtu} is larger than the segment's MTU {segment_mtu} (set when the region was \
         created)"
    )]
    MtuTooLarge {
        /// Requested MTU.
        mtu: u32,
        /// The region's MTU.
        segment_mtu: u32,
    },
    /// The event loop could not be set up or failed.
    #[error("cannot {what}")]
    EventLoop {
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The data path stopped.
    #[error(transparent)]
    Datapath(#[from] DatapathError),
    /// The doorbell server connection failed.
    #[error("the connection to the doorbell server failed; restart this peer")]
    ServerConnection(#[source] io::Error),
    /// A termination signal arrived before the work was done.
    #[error("interrupted by signal {signal}")]
    Interrupted {
        /// The signal number.
        signal: i32,
    },
    /// No echo reply at all.
    #[error(
        "no reply from {target} to {sent} echo request(s): is a peer with that address up on the \
         segment (`ivnet status`), and is it inside an --ip subnet or behind --gateway?"
    )]
    NoReply {
        /// Who was pinged.
        target: IpAddr,
        /// Requests sent.
        sent: u32,
    },
    /// The target answered the connection attempt with a reset.
    #[error("connection to {target} refused: nothing listens on that port")]
    ConnectRefused {
        /// The target.
        target: SocketAddr,
    },
    /// The target did not answer the connection attempt.
    #[error(
        "no answer from {target} within {after:?}: is a peer with that address up on the segment \
         (`ivnet status`), and is it inside an --ip subnet or behind --gateway?"
    )]
    ConnectTimeout {
        /// The target.
        target: SocketAddr,
        /// How long we waited.
        after: Duration,
    },
    /// An established connection ended before the work was done.
    #[error("connection with {peer} was reset or timed out after {bytes} bytes")]
    ConnectionLost {
        /// The other end.
        peer: SocketAddr,
        /// Bytes moved before it ended.
        bytes: u64,
    },
    /// A transfer stalled.
    #[error("{what}: no progress for {after:?}")]
    Stalled {
        /// What stalled.
        what: String,
        /// How long nothing moved.
        after: Duration,
    },
    /// A smoltcp socket refused an address or port.
    #[error("cannot use {what}: {reason}")]
    Socket {
        /// The address or port.
        what: String,
        /// smoltcp's reason.
        reason: String,
    },
    /// The host socket of `forward` could not be opened.
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// An echo did not come back intact.
    #[error("echo test against {target}: {lost} of {sent} message(s) lost, {corrupt} corrupted")]
    EchoFailed {
        /// The echo server.
        target: SocketAddr,
        /// Messages sent.
        sent: u64,
        /// Messages with no echo.
        lost: u64,
        /// Echoes that differed from what was sent.
        corrupt: u64,
    },
    /// Writing the results failed (stdout closed?).
    #[error("cannot write to standard output")]
    Output(#[source] io::Error),
}

fn evloop(what: &'static str) -> impl FnOnce(io::Error) -> StackError {
    move |source| StackError::EventLoop { what, source }
}

/// What a step of [`Stack::run`] decided.
#[derive(Debug)]
pub enum Step<T> {
    /// Keep going; wake up again at the latest after this long (`None`: when the segment,
    /// smoltcp or a registered descriptor needs it).
    Continue(Option<Duration>),
    /// Finished with this value.
    Done(T),
}

/// Readiness of a descriptor registered through [`Stack::registry`], as seen by the last
/// [`Stack::wait`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AppEvent {
    /// The token it was registered with (at least [`APP_TOKEN_BASE`]).
    pub token: Token,
    /// Readable (or closed for reading, or failed).
    pub readable: bool,
    /// Writable (or failed).
    pub writable: bool,
}

/// Tokens at or above this are the application's ([`Stack::registry`]); below are the stack's.
pub const APP_TOKEN_BASE: usize = 1 << 16;

const TOKEN_TIMER: Token = Token(1);
const TOKEN_SIGNAL: Token = Token(2);
const TOKEN_CONTROL: Token = Token(3);
const TOKEN_DOORBELL_BASE: usize = 16;

/// How often a sender held back by a full ring looks for space when no doorbell tells it.
const BLOCKED_RETRY: Duration = Duration::from_millis(1);
/// Without doorbells, polling slows down towards [`StackConfig::poll_idle`] after this long
/// without a frame.
pub const POLL_BACKOFF_AFTER: Duration = Duration::from_millis(200);
/// Without doorbells, how often to look for frames from peers not known to be up yet.
const PEER_SCAN: Duration = Duration::from_millis(5);
/// Extra egress passes per round: smoltcp sends one segment per socket per pass, so a bulk
/// sender needs several passes to fill the ring before it sleeps.
const EGRESS_PASSES: usize = 64;

/// The sleeping half: one epoll set over the doorbells, the poll timer, signals, the server
/// connection and the application's descriptors.
struct Waiter {
    poll: Poll,
    events: Events,
    timer: TimerFd,
    signals: Option<SignalFd>,
    own: Vec<EventFd>,
    control: Option<(RawFd, ControlHandler)>,
    doorbells: bool,
    spin: Duration,
    /// Without doorbells: the fast poll interval, the idle one, and the one armed now.
    poll_fast: Duration,
    poll_idle: Duration,
    poll_interval: Duration,
    left: Vec<u32>,
    app_events: Vec<AppEvent>,
    signal: Option<i32>,
    next_housekeeping: Instant,
    /// Without doorbells: when to look next for frames from peers not known to be up.
    next_peer_scan: Instant,
    last_work: Instant,
}

/// A smoltcp interface on a segment: the library API of the stack mode (see the module docs).
pub struct Stack {
    /// The smoltcp interface, with the configured addresses and routes.
    pub iface: Interface,
    /// The rings as a smoltcp device.
    pub device: RingDevice,
    /// The application's sockets.
    pub sockets: SocketSet<'static>,
    waiter: Waiter,
    region: Region,
    /// The data path's slot as of the last round: its addresses are published there.
    claim: Claim,
    /// The addresses published in the region's peer info table.
    published: Vec<(std::net::IpAddr, u8)>,
    mac: Mac,
    mtu: u32,
    tcp_buffer: usize,
    epoch: Instant,
    next_port: u16,
    left: bool,
}

/// The IPv6 link-local address of a MAC (modified EUI-64, RFC 4291 appendix A).
pub fn link_local(mac: Mac) -> Ipv6Address {
    let m = mac.0;
    Ipv6Address::new(
        0xfe80,
        0,
        0,
        0,
        u16::from_be_bytes([m[0] ^ 2, m[1]]),
        u16::from_be_bytes([m[2], 0xff]),
        u16::from_be_bytes([0xfe, m[3]]),
        u16::from_be_bytes([m[4], m[5]]),
    )
}

fn random_u64() -> u64 {
    // std's hasher keys come from the OS's randomness: enough for a TCP ISN seed and ports.
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(crate::sys::wall_ms());
    h.write_u32(std::process::id());
    h.finish()
}

fn invalid(option: &'static str, message: impl Into<String>) -> StackError {
    StackError::InvalidConfig { option, message: message.into() }
}

impl Stack {
    /// Joins the segment described by `cfg` and returns a ready interface.
    pub fn open(cfg: &StackConfig) -> Result<Stack, StackError> {
        // Block the termination signals before anything else so none is lost.
        let signals = if cfg.handle_signals {
            Some(SignalFd::termination().map_err(evloop("set up a signalfd"))?)
        } else {
            None
        };
        check_addresses(cfg)?;
        match &cfg.backend {
            StackBackend::File { path, size } => {
                let attached = crate::backend::file::attach_with(
                    path,
                    *size,
                    &cfg.geometry,
                    &cfg.create_mode,
                )?;
                let stack = Stack::from_region(attached.region.clone(), cfg, None, None, signals);
                if stack.is_err() {
                    // A failed start leaves no file it created behind.
                    attached.discard_if_unused();
                }
                stack
            }
            StackBackend::Server { socket } => {
                let (slot, region, wakeups) = ServerSession::join(socket, &cfg.geometry, cfg.spin)?;
                Stack::from_region(region, cfg, Some(slot), Some(wakeups), signals)
            }
        }
    }

    /// Joins an already attached region (any backend). `assigned_id` is a peer id the backend
    /// imposes; `wakeups` are its doorbells (`None`: poll every `cfg.poll`); `signals`, if
    /// given, is watched for termination signals. `cfg.backend` is not used.
    pub fn from_region(
        region: Region,
        cfg: &StackConfig,
        assigned_id: Option<u32>,
        wakeups: Option<Wakeups>,
        signals: Option<SignalFd>,
    ) -> Result<Stack, StackError> {
        check_addresses(cfg)?;
        let g = region.geometry();
        if cfg.mtu > g.mtu {
            return Err(StackError::MtuTooLarge { mtu: cfg.mtu, segment_mtu: g.mtu });
        }
        let has_v6 = cfg.addresses.iter().any(|a| a.addr.is_ipv6());
        let min_mtu = if has_v6 { 1280 } else { 576 };
        if cfg.mtu < min_mtu {
            return Err(invalid(
                "--mtu",
                format!("{} is below the minimum of {min_mtu} for these addresses", cfg.mtu),
            ));
        }
        // Everything that can fail is set up before the slot is claimed, so a failure never
        // leaves a claimed slot behind.
        let poll = Poll::new().map_err(evloop("create an epoll instance"))?;
        let timer = TimerFd::new().map_err(evloop("create a timerfd"))?;
        let reg = poll.registry();
        reg.register(&mut SourceFd(&timer.as_raw_fd()), TOKEN_TIMER, Interest::READABLE)
            .map_err(evloop("watch the poll timer"))?;
        if let Some(s) = &signals {
            reg.register(&mut SourceFd(&s.as_raw_fd()), TOKEN_SIGNAL, Interest::READABLE)
                .map_err(evloop("watch signals"))?;
        }
        let (own, notifier, control): (Vec<EventFd>, Box<dyn Notifier>, _) = match wakeups {
            Some(w) => (w.own, w.notifier, w.control),
            None => (Vec::new(), Box::new(NoDoorbells), None),
        };
        for (i, e) in own.iter().enumerate() {
            reg.register(
                &mut SourceFd(&e.as_raw_fd()),
                Token(TOKEN_DOORBELL_BASE + i),
                Interest::READABLE,
            )
            .map_err(evloop("watch a doorbell"))?;
        }
        if let Some((fd, _)) = &control {
            reg.register(&mut SourceFd(fd), TOKEN_CONTROL, Interest::READABLE)
                .map_err(evloop("watch the doorbell server connection"))?;
        }
        let doorbells = !own.is_empty();
        if !doorbells {
            timer.set_periodic(Some(cfg.poll)).map_err(evloop("arm the poll timer"))?;
        }

        let claim = match assigned_id {
            Some(id) => link::claim_assigned(&region, id)?,
            None => link::claim(&region, cfg.peer_id, cfg.link_timeout)?,
        };
        let mac = cfg.mac.unwrap_or_else(|| Mac::for_peer(claim.id));
        let opts = DatapathOptions {
            mtu: cfg.mtu,
            link_timeout: cfg.link_timeout,
            pin_macs: cfg.pin_macs,
            ..DatapathOptions::default()
        };
        let dp = Datapath::join(region.clone(), claim, NoInterface, mac.0, PeerKind::Stack, opts);
        // Every reader of the region sees the stack's addresses (issue 8).
        let published: Vec<(std::net::IpAddr, u8)> = cfg
            .addresses
            .iter()
            .map(|c| (c.addr, c.prefix))
            .chain(std::iter::once((std::net::IpAddr::V6(link_local(mac)), 64)))
            .collect();
        region.peer_info(claim.id).publish(claim.incarnation, &published);
        let mut device = RingDevice::new(dp, notifier, cfg.mtu);
        let epoch = Instant::now();
        let seed = random_u64();
        let mut config = Config::new(EthernetAddress(mac.0).into());
        config.random_seed = seed;
        let mut iface = Interface::new(config, &mut device, smoltcp::time::Instant::ZERO);
        let mut too_many = false;
        iface.update_ip_addrs(|addrs| {
            let all = cfg
                .addresses
                .iter()
                .map(|c| IpCidr::new(IpAddress::from(c.addr), c.prefix))
                .chain(std::iter::once(IpCidr::new(IpAddress::Ipv6(link_local(mac)), 64)));
            for c in all {
                if !addrs.contains(&c) && addrs.push(c).is_err() {
                    too_many = true;
                }
            }
        });
        let mut stack = Stack {
            iface,
            device,
            sockets: SocketSet::new(Vec::new()),
            waiter: Waiter {
                poll,
                events: Events::with_capacity(256),
                timer,
                signals,
                own,
                control,
                doorbells,
                spin: cfg.spin,
                poll_fast: cfg.poll,
                poll_idle: cfg.poll_idle.max(cfg.poll),
                poll_interval: cfg.poll,
                left: Vec::with_capacity(8),
                app_events: Vec::with_capacity(256),
                signal: None,
                next_housekeeping: epoch,
                next_peer_scan: epoch,
                last_work: epoch,
            },
            region,
            claim,
            published,
            mac,
            mtu: cfg.mtu,
            tcp_buffer: cfg.tcp_buffer,
            epoch,
            next_port: 49152 + (seed % 16384) as u16,
            left: false,
        };
        // From here on, dropping `stack` leaves the segment.
        if too_many {
            return Err(invalid(
                "--ip",
                "too many addresses: at most 7 besides the link-local one",
            ));
        }
        for gw in &cfg.gateways {
            let r = match gw {
                IpAddr::V4(a) => stack.iface.routes_mut().add_default_ipv4_route(*a),
                IpAddr::V6(a) => stack.iface.routes_mut().add_default_ipv6_route(*a),
            };
            r.map_err(|_| invalid("--gateway", "the route table is full"))?;
        }
        {
            let (dp, notifier) = stack.device.parts();
            // Tell everyone to look at the peer table now rather than at their next heartbeat.
            dp.announce_link_change(notifier);
        }
        log::info!(
            "joined {} as peer {} (incarnation {}, kind stack, euid {}): MAC {} MTU {}{}",
            stack.region.name(),
            claim.id,
            claim.incarnation,
            crate::sys::euid(),
            mac,
            cfg.mtu,
            cfg.addresses.iter().map(|a| format!(" {a}")).collect::<String>()
        );
        Ok(stack)
    }

    /// Our peer id and incarnation.
    pub fn claim(&self) -> Claim {
        self.claim
    }

    /// Our MAC address.
    pub fn mac(&self) -> Mac {
        self.mac
    }

    /// The IP MTU.
    pub fn mtu(&self) -> u32 {
        self.mtu
    }

    /// The region this stack is a member of.
    pub fn region(&self) -> &Region {
        &self.region
    }

    /// smoltcp's clock for `now`.
    pub fn timestamp(&self, now: Instant) -> smoltcp::time::Instant {
        smoltcp::time::Instant::from_micros(now.duration_since(self.epoch).as_micros() as i64)
    }

    /// A TCP socket with [`StackConfig::tcp_buffer`]-sized buffers (allocated here, once).
    pub fn tcp_socket(&self) -> tcp::Socket<'static> {
        tcp::Socket::new(
            tcp::SocketBuffer::new(vec![0u8; self.tcp_buffer]),
            tcp::SocketBuffer::new(vec![0u8; self.tcp_buffer]),
        )
    }

    /// A local port for an outgoing connection, from 49152..=65535, not used by any TCP
    /// socket of this stack.
    pub fn ephemeral_port(&mut self) -> u16 {
        for _ in 0..16384 {
            let p = self.next_port;
            self.next_port = if p == u16::MAX { 49152 } else { p + 1 };
            let used = self.sockets.iter().any(|(_, s)| match s {
                smoltcp::socket::Socket::Tcp(t) => {
                    t.local_endpoint().is_some_and(|e| e.port == p) || t.listen_endpoint().port == p
                }
                _ => false,
            });
            if !used {
                return p;
            }
        }
        // Every ephemeral port is in use: reuse one; smoltcp tells the connections apart by
        // the remote endpoint as well.
        self.next_port
    }

    /// The registry of the stack's epoll set, to wait for the application's own descriptors in
    /// [`Stack::wait`]. Use tokens from [`APP_TOKEN_BASE`] up; their readiness is in
    /// [`Stack::app_events`] after each wait.
    pub fn registry(&self) -> &Registry {
        self.waiter.poll.registry()
    }

    /// Readiness of the application's descriptors reported by the last [`Stack::wait`].
    pub fn app_events(&self) -> &[AppEvent] {
        &self.waiter.app_events
    }

    /// The termination signal received, if any (only with [`StackConfig::handle_signals`]).
    pub fn signal(&self) -> Option<i32> {
        self.waiter.signal
    }

    /// One round: heartbeat and link checks when due, every frame waiting in the rings through
    /// smoltcp, smoltcp's output into the rings, then the doorbells of peers that wait.
    /// Returns whether any frame moved. Never blocks.
    pub fn poll(&mut self) -> Result<bool, StackError> {
        let now = Instant::now();
        let ts = self.timestamp(now);
        self.device.begin_round(now);
        if !self.waiter.doorbells && now >= self.waiter.next_peer_scan {
            // Without doorbells nobody tells us that a peer joined: notice it from its frames.
            self.waiter.next_peer_scan = now + PEER_SCAN;
            let dp = self.device.datapath();
            if dp.down_peer_has_frames() {
                dp.force_housekeeping();
                self.waiter.next_housekeeping = now;
            }
        }
        if now >= self.waiter.next_housekeeping {
            self.waiter.next_housekeeping = self.device.datapath().housekeeping(now)?;
            self.follow_claim();
        }
        let before = self.device.stats();
        self.iface.poll(ts, &mut self.device, &mut self.sockets);
        for _ in 0..EGRESS_PASSES {
            let sent = self.device.stats().tx_frames;
            self.iface.poll_egress(ts, &mut self.device, &mut self.sockets);
            if self.device.stats().tx_frames == sent {
                break;
            }
        }
        self.device.flush();
        let moved = self.device.stats() != before;
        if moved {
            self.waiter.last_work = now;
        }
        Ok(moved)
    }

    /// After the data path moved to another slot (its own was taken), publishes our addresses
    /// under the new one; the old slot's entry is another member's now.
    fn follow_claim(&mut self) {
        let claim = self.device.datapath().claim();
        if claim != self.claim {
            log::info!(
                "{}: now peer {} (incarnation {}), was {}",
                self.region.name(),
                claim.id,
                claim.incarnation,
                self.claim.id
            );
            self.claim = claim;
            self.region.peer_info(claim.id).publish(claim.incarnation, &self.published);
        }
    }

    /// Sleeps until a frame may have arrived (doorbell, or the poll timer without doorbells),
    /// smoltcp's next deadline, `limit`, a registered descriptor's readiness, or a signal;
    /// right after activity it only spins for the configured window. Then handles the wake-up
    /// sources; call [`Stack::poll`] next.
    pub fn wait(&mut self, limit: Option<Duration>) -> Result<(), StackError> {
        let now = Instant::now();
        let ts = self.timestamp(now);
        let blocked = self.device.datapath().is_blocked();
        let unringable = self.device.datapath().polls_for_unringable_peers();
        let w = &mut self.waiter;
        let mut timeout = w.next_housekeeping.saturating_duration_since(now);
        if unringable {
            // A peer we could not ring (joined through another server) cannot ring us: poll.
            timeout = timeout.min(w.poll_idle);
        }
        if let Some(l) = limit {
            timeout = timeout.min(l);
        }
        if let Some(d) = self.iface.poll_delay(ts, &self.sockets) {
            let d = Duration::from_micros(d.total_micros());
            // While a frame is held back, smoltcp wants to send "now": wait for ring space.
            timeout = timeout.min(if blocked { d.max(BLOCKED_RETRY) } else { d });
        }
        if blocked {
            // The consumer rings us when it frees space; poll too in case it does not.
            timeout = timeout.min(BLOCKED_RETRY);
        }
        if !w.doorbells {
            // Polling: fast while there is traffic, backing off when idle so an idle stack
            // costs little CPU (as the agent does). Re-armed only when the interval changes.
            let want = if now.duration_since(w.last_work) < POLL_BACKOFF_AFTER {
                w.poll_fast
            } else {
                (w.poll_interval * 2).min(w.poll_idle)
            };
            if want != w.poll_interval {
                w.poll_interval = want;
                w.timer.set_periodic(Some(want)).map_err(evloop("arm the poll timer"))?;
            }
        }
        let mut sleeping = false;
        if !timeout.is_zero() {
            let dp = self.device.datapath();
            if now.duration_since(w.last_work) < w.spin {
                if dp.rx_pending() {
                    dp.count_doorbell(DoorbellCounter::SpinsWithWork);
                }
                timeout = Duration::ZERO;
            } else if w.doorbells {
                if dp.prepare_to_sleep() {
                    timeout = Duration::ZERO;
                } else {
                    sleeping = true;
                }
            }
        }
        let w = &mut self.waiter;
        w.app_events.clear();
        match w.poll.poll(&mut w.events, Some(timeout)) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(evloop("wait for events (epoll_wait)")(e)),
        }
        if sleeping {
            let dp = self.device.datapath();
            dp.wake();
            if w.events.iter().any(|e| (TOKEN_DOORBELL_BASE..APP_TOKEN_BASE).contains(&e.token().0))
            {
                dp.count_doorbell(DoorbellCounter::Wakeups);
            }
        }
        for ev in w.events.iter() {
            match ev.token() {
                TOKEN_TIMER => {
                    w.timer.drain();
                }
                TOKEN_SIGNAL => {
                    if let Some(sig) = w.signals.as_ref().and_then(|s| s.read()) {
                        log::info!("signal {sig}: stopping");
                        w.signal = Some(sig);
                    }
                }
                TOKEN_CONTROL => {
                    if let Some((_, on_control)) = w.control.as_mut() {
                        w.left.clear();
                        on_control(&mut w.left).map_err(StackError::ServerConnection)?;
                        for &id in &w.left {
                            self.device.datapath().peer_left(id);
                        }
                    }
                }
                Token(t) if t >= APP_TOKEN_BASE => w.app_events.push(AppEvent {
                    token: ev.token(),
                    readable: ev.is_readable() || ev.is_read_closed() || ev.is_error(),
                    writable: ev.is_writable() || ev.is_error(),
                }),
                Token(t) if t >= TOKEN_DOORBELL_BASE => {
                    let vector = t - TOKEN_DOORBELL_BASE;
                    if let Some(e) = w.own.get(vector) {
                        e.drain();
                    }
                    if vector == VECTOR_LINK as usize {
                        self.device.datapath().force_housekeeping();
                        w.next_housekeeping = now;
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Drives the stack until `step` is done: poll, `step`, wait, over and over. `step` sees
    /// the sockets after every round. A termination signal (with
    /// [`StackConfig::handle_signals`]) ends the loop with [`StackError::Interrupted`] unless
    /// `step` finishes on it first (it can look at [`Stack::signal`]).
    pub fn run<T>(
        &mut self,
        mut step: impl FnMut(&mut Stack) -> Result<Step<T>, StackError>,
    ) -> Result<T, StackError> {
        loop {
            self.poll()?;
            let limit = match step(self)? {
                Step::Done(v) => return Ok(v),
                Step::Continue(limit) => limit,
            };
            if let Some(signal) = self.signal() {
                return Err(StackError::Interrupted { signal });
            }
            self.wait(limit)?;
        }
    }

    /// Leaves the segment now: marks the peer slot left and tells the other peers. Dropping the
    /// stack does the same.
    pub fn leave(mut self) {
        self.leave_now();
    }

    fn leave_now(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        let (dp, notifier) = self.device.parts();
        dp.leave();
        dp.announce_link_change(notifier);
        log::info!("left {} (peer {})", self.region.name(), self.claim.id);
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.leave_now();
    }
}

fn check_addresses(cfg: &StackConfig) -> Result<(), StackError> {
    if cfg.addresses.is_empty() {
        return Err(invalid("--ip", "give the stack an address, e.g. --ip 10.0.0.2/24"));
    }
    let mut v4 = 0;
    let mut v6 = 0;
    for gw in &cfg.gateways {
        let on_link = cfg.addresses.iter().any(|c| {
            IpCidr::new(IpAddress::from(c.addr), c.prefix).contains_addr(&IpAddress::from(*gw))
        }) || matches!(gw, IpAddr::V6(a) if a.segments()[0] & 0xffc0 == 0xfe80);
        if !on_link {
            return Err(invalid(
                "--gateway",
                format!("{gw} is not inside any --ip subnet, so it cannot be reached directly"),
            ));
        }
        match gw {
            IpAddr::V4(_) => v4 += 1,
            IpAddr::V6(_) => v6 += 1,
        }
    }
    if v4 > 1 || v6 > 1 {
        return Err(invalid("--gateway", "give at most one IPv4 and one IPv6 gateway"));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
