//! The agent's control socket: `ivnet status` asks the running agent instead of reading the
//! region itself (which a VFIO guest cannot: vfio-pci holds BAR2), and gets everything `status
//! --json` shows plus the agent's own view ([`AgentInfo`]).
//!
//! Protocol: a client connects to the UNIX socket (default `/run/ivnet/<TAP>.sock`), sends one
//! line, `status`, and reads one JSON document (a [`Status`] with `agent` set) until the agent
//! closes the connection. Anything else gets `{"error": "..."}`.
//!
//! The agent serves it from its event loop without ever blocking: the listener and the
//! connections are non-blocking and edge-triggered, a request is at most [`MAX_REQUEST`] bytes,
//! at most [`MAX_CLIENTS`] connections are open at once (more are closed at once), and each
//! must be done within [`CLIENT_DEADLINE`], so a client that stops reading costs one buffer
//! until its deadline and never stalls the data path.
//!
//! The same module keeps the agent's addresses in the region's peer info table (so every
//! reader of the region sees them): it reads its TAP's addresses once a second, and publishes
//! them when they change (systemd-networkd adds them after the agent created the TAP).

use std::fs::File;
use std::io::{self, Read, Write};
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mio::net::{UnixListener, UnixStream};
use mio::{Interest, Registry, Token};
use serde::{Deserialize, Serialize};

use crate::agent::link::{Claim, Links};
use crate::region::Region;
use crate::status::Status;

/// Directory of the default control sockets.
pub const DEFAULT_DIR: &str = "/run/ivnet";
/// Largest request line.
pub const MAX_REQUEST: usize = 256;
/// Connections served at once; more are closed at once.
pub const MAX_CLIENTS: usize = 8;
/// Time a connection may take from accept to the last byte of the answer.
pub const CLIENT_DEADLINE: Duration = Duration::from_secs(2);
/// Largest answer a client accepts.
pub const MAX_RESPONSE: u64 = 16 << 20;
/// How often the agent re-reads its TAP's addresses.
const ADDRESS_INTERVAL: Duration = Duration::from_secs(1);
/// Tokens of the control socket in the agent's event loop: the listener, then one per client.
const TOKEN_BASE: usize = 1 << 20;

/// The default control socket of the agent with TAP `tap`.
pub fn default_socket(tap: &str) -> PathBuf {
    Path::new(DEFAULT_DIR).join(format!("{tap}.sock"))
}

/// What the agent says about itself, besides the region's status.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Its TAP interface.
    pub tap: String,
    /// Its peer id.
    pub peer_id: u32,
    /// Its incarnation in that slot.
    pub incarnation: u64,
    /// Its process id.
    pub pid: u32,
    /// The ivnet version it runs.
    pub version: String,
    /// How it reaches the region (`file PATH`, `server SOCKET`, `vfio ADDR`, `sysfs ADDR`).
    pub backend: String,
    /// Seconds since it joined.
    pub uptime_s: f64,
    /// Its TAP's MAC.
    pub mac: String,
    /// Its TAP's MTU.
    pub mtu: u32,
    /// Offloads of its TAP (`off` when it reads plain frames).
    pub offloads: String,
    /// Its TAP's addresses, as the kernel has them now.
    pub addresses: Vec<String>,
    /// Peers whose link it sees up.
    pub peers_up: Vec<u32>,
    /// Where it answers.
    pub control_socket: String,
    /// Status requests answered.
    pub requests: u64,
    /// Connections closed at once because [`MAX_CLIENTS`] were open.
    pub rejected: u64,
}

impl AgentInfo {
    /// Human-readable form (the head of `ivnet status` when an agent answered).
    pub fn to_text(&self) -> String {
        let up = self.uptime_s as u64;
        let uptime = if up >= 3600 {
            format!("{}h{:02}m", up / 3600, up % 3600 / 60)
        } else if up >= 60 {
            format!("{}m{:02}s", up / 60, up % 60)
        } else {
            format!("{:.1}s", self.uptime_s)
        };
        let peers: Vec<String> = self.peers_up.iter().map(u32::to_string).collect();
        format!(
            "agent: {} peer {} (incarnation {}), pid {}, up {uptime}, ivnet {}\n       \
             backend {}, MAC {}, MTU {}, offloads {}\n       addresses: {}\n       \
             links up to peers: {}\n",
            self.tap,
            self.peer_id,
            self.incarnation,
            self.pid,
            self.version,
            self.backend,
            self.mac,
            self.mtu,
            self.offloads,
            if self.addresses.is_empty() { "none".to_string() } else { self.addresses.join(" ") },
            if peers.is_empty() { "none".to_string() } else { peers.join(" ") },
        )
    }
}

/// Why the control socket could not be set up, or a status could not be fetched.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// Setting up the listener failed.
    #[error("control socket {path}: {what}: {source}; use --control-socket PATH (or none)")]
    Listen {
        /// Socket path.
        path: PathBuf,
        /// Which step.
        what: &'static str,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Nothing at the socket path.
    #[error(
        "no agent answers on {path} (no such socket): is the agent running (`systemctl status \
         ivnet-agent`)? Use --tap NAME or --agent-socket PATH for another agent, or read a \
         region directly with --shm PATH or --device auto"
    )]
    NoAgent {
        /// Socket path.
        path: PathBuf,
    },
    /// A socket file without a listener (an agent died without removing it).
    #[error(
        "no agent listens on {path} (connection refused: a stale socket of an agent that died?)"
    )]
    Refused {
        /// Socket path.
        path: PathBuf,
    },
    /// Not allowed to connect.
    #[error("permission denied on {path}: the control socket is for root (mode 0660)")]
    Permission {
        /// Socket path.
        path: PathBuf,
    },
    /// Talking to the agent failed.
    #[error("asking the agent on {path}: {source}")]
    Io {
        /// Socket path.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The agent's answer made no sense.
    #[error("the agent on {path} answered something unreadable: {message}")]
    Protocol {
        /// Socket path.
        path: PathBuf,
        /// What was wrong.
        message: String,
    },
    /// The agent refused the request.
    #[error("the agent on {path} refused: {message}")]
    Refusal {
        /// Socket path.
        path: PathBuf,
        /// Its message.
        message: String,
    },
}

/// Asks the agent on `path` for its status (a blocking client, for `ivnet status`).
pub fn query(path: &Path, timeout: Duration) -> Result<Status, ControlError> {
    let io_err = |source: io::Error| ControlError::Io { path: path.to_path_buf(), source };
    let mut s = std::os::unix::net::UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => ControlError::NoAgent { path: path.to_path_buf() },
        io::ErrorKind::ConnectionRefused => ControlError::Refused { path: path.to_path_buf() },
        io::ErrorKind::PermissionDenied => ControlError::Permission { path: path.to_path_buf() },
        _ => io_err(e),
    })?;
    s.set_read_timeout(Some(timeout)).map_err(io_err)?;
    s.set_write_timeout(Some(timeout)).map_err(io_err)?;
    s.write_all(b"status\n").map_err(io_err)?;
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut buf = Vec::new();
    s.take(MAX_RESPONSE + 1).read_to_end(&mut buf).map_err(io_err)?;
    if buf.len() as u64 > MAX_RESPONSE {
        return Err(ControlError::Protocol {
            path: path.to_path_buf(),
            message: format!("more than {MAX_RESPONSE} bytes"),
        });
    }
    let value: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| {
        ControlError::Protocol { path: path.to_path_buf(), message: format!("not JSON: {e}") }
    })?;
    if let Some(msg) = value.get("error") {
        return Err(ControlError::Refusal {
            path: path.to_path_buf(),
            message: msg.as_str().unwrap_or("(no message)").to_string(),
        });
    }
    serde_json::from_value(value)
        .map_err(|e| ControlError::Protocol { path: path.to_path_buf(), message: e.to_string() })
}

/// What the agent knows about itself at start.
pub struct AgentIdentity {
    /// TAP name.
    pub tap: String,
    /// Slot and incarnation.
    pub claim: Claim,
    /// How it reaches the region.
    pub backend: String,
    /// TAP MAC.
    pub mac: [u8; 6],
    /// TAP MTU.
    pub mtu: u32,
    /// TAP offloads (`None`: plain frames).
    pub offloads: Option<crate::offload::Features>,
}

struct Client {
    stream: UnixStream,
    deadline: Instant,
    req: Vec<u8>,
    out: Vec<u8>,
    written: usize,
    answering: bool,
}

struct Listening {
    listener: UnixListener,
    path: PathBuf,
    /// Held for the agent's life: whoever holds it owns the socket path.
    _lock: File,
}

/// The agent's control socket and address publisher, driven by its event loop.
pub struct Control {
    listening: Option<Listening>,
    clients: Vec<Option<Client>>,
    region: Region,
    id: AgentIdentity,
    started: Instant,
    next_address_check: Instant,
    addresses: Vec<(IpAddr, u8)>,
    requests: u64,
    rejected: u64,
}

impl Control {
    /// Publishes the TAP's addresses and opens the control socket: `setting` is the configured
    /// path (`None`: [`default_socket`], `none`: no socket). An explicitly configured socket
    /// that cannot be set up is an error; the default one only a warning (e.g. agents in
    /// several network namespaces of one host share /run/ivnet: the first one gets it).
    pub fn start(
        setting: Option<&Path>,
        region: Region,
        id: AgentIdentity,
    ) -> Result<Control, ControlError> {
        let now = Instant::now();
        let mut c = Control {
            listening: None,
            clients: (0..MAX_CLIENTS).map(|_| None).collect(),
            region,
            id,
            started: now,
            next_address_check: now,
            addresses: Vec::new(),
            requests: 0,
            rejected: 0,
        };
        c.refresh_addresses(now, true);
        let (path, explicit) = match setting {
            Some(p) if p == Path::new("none") => return Ok(c),
            Some(p) => (p.to_path_buf(), true),
            None => (default_socket(&c.id.tap), false),
        };
        match listen(&path) {
            Ok(l) => {
                log::info!("answering `ivnet status` on {}", path.display());
                c.listening = Some(l);
            }
            Err(e) if explicit => return Err(e),
            Err(e) => log::warn!("{e}; `ivnet status` cannot ask this agent"),
        }
        Ok(c)
    }

    /// The socket's path, if it listens.
    pub fn path(&self) -> Option<&Path> {
        self.listening.as_ref().map(|l| l.path.as_path())
    }

    /// Registers the listener with the event loop.
    pub fn register(&mut self, registry: &Registry) -> io::Result<()> {
        if let Some(l) = self.listening.as_mut() {
            registry.register(&mut l.listener, Token(TOKEN_BASE), Interest::READABLE)?;
        }
        Ok(())
    }

    /// Whether `token` is one of ours.
    pub fn owns(token: Token) -> bool {
        (TOKEN_BASE..=TOKEN_BASE + MAX_CLIENTS).contains(&token.0)
    }

    /// Periodic work, cheap when nothing is due: re-reads the TAP's addresses once a second
    /// and closes connections past their deadline.
    pub fn tick(&mut self, now: Instant, registry: &Registry, claim: Claim) {
        if claim != self.id.claim {
            // The data path moved to another slot (its own was taken): answer with the new id,
            // and publish the addresses there, never again into the old slot's entry, which is
            // now another member's.
            self.id.claim = claim;
            self.refresh_addresses(now, true);
        } else if now >= self.next_address_check {
            self.refresh_addresses(now, false);
        }
        for slot in self.clients.iter_mut() {
            if slot.as_ref().is_some_and(|c| now >= c.deadline) {
                if let Some(mut c) = slot.take() {
                    log::debug!("control socket: closing a client past its deadline");
                    let _ = registry.deregister(&mut c.stream);
                }
            }
        }
    }

    fn refresh_addresses(&mut self, now: Instant, first: bool) {
        self.next_address_check = now + ADDRESS_INTERVAL;
        let addrs = match crate::sys::ctl::if_addresses(&self.id.tap) {
            Ok(a) => a,
            Err(e) => {
                log::debug!("reading the addresses of {}: {e}", self.id.tap);
                return;
            }
        };
        if addrs != self.addresses || first {
            if !first {
                log::info!(
                    "{} addresses: {}",
                    self.id.tap,
                    addrs.iter().map(|(a, p)| format!("{a}/{p}")).collect::<Vec<_>>().join(" ")
                );
            }
            let claim = self.id.claim;
            self.region.peer_info(claim.id).publish(claim.incarnation, &addrs);
            self.addresses = addrs;
        }
    }

    /// Handles an event on one of our tokens; `links` is the data path's view of the peers.
    pub fn handle(&mut self, token: Token, registry: &Registry, links: &Links) {
        if token.0 == TOKEN_BASE {
            // Edge-triggered: a new connection's request may already be there.
            for t in self.accept(registry) {
                self.handle_client(t, registry, links);
            }
        } else {
            self.handle_client(token, registry, links);
        }
    }

    fn handle_client(&mut self, token: Token, registry: &Registry, links: &Links) {
        let i = token.0 - TOKEN_BASE - 1;
        let Control {
            clients, region, id, started, addresses, listening, requests, rejected, ..
        } = self;
        let Some(Some(c)) = clients.get_mut(i) else { return };
        let status = || {
            self_status(
                region,
                id,
                *started,
                addresses,
                links,
                listening.as_ref(),
                *requests,
                *rejected,
            )
        };
        let done = match Self::serve(c, status) {
            Ok((done, answered)) => {
                *requests += u64::from(answered);
                done
            }
            Err(e) => {
                log::debug!("control socket client: {e}");
                true
            }
        };
        if done {
            let _ = registry.deregister(&mut c.stream);
            clients[i] = None;
        } else if c.answering && c.written < c.out.len() {
            let _ =
                registry.reregister(&mut c.stream, token, Interest::READABLE | Interest::WRITABLE);
        }
    }

    /// Accepts every waiting connection; returns the tokens of those it keeps.
    fn accept(&mut self, registry: &Registry) -> Vec<Token> {
        let mut new = Vec::new();
        let Some(l) = self.listening.as_mut() else { return new };
        loop {
            match l.listener.accept() {
                Ok((mut stream, _)) => {
                    let Some(i) = self.clients.iter().position(Option::is_none) else {
                        self.rejected += 1;
                        log::debug!("control socket: {MAX_CLIENTS} clients open, closing one more");
                        continue;
                    };
                    let token = Token(TOKEN_BASE + 1 + i);
                    if let Err(e) = registry.register(&mut stream, token, Interest::READABLE) {
                        log::warn!("control socket: cannot register a client: {e}");
                        continue;
                    }
                    self.clients[i] = Some(Client {
                        stream,
                        deadline: Instant::now() + CLIENT_DEADLINE,
                        req: Vec::with_capacity(MAX_REQUEST),
                        out: Vec::new(),
                        written: 0,
                        answering: false,
                    });
                    new.push(token);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return new,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("control socket: accept failed: {e}");
                    return new;
                }
            }
        }
    }

    /// Reads the request and writes the answer as far as the socket takes them. Returns
    /// (the connection is finished, a status was computed in this call).
    fn serve(c: &mut Client, status: impl FnOnce() -> Vec<u8>) -> io::Result<(bool, bool)> {
        let mut answered = false;
        if !c.answering {
            let mut eof = false;
            let mut buf = [0u8; MAX_REQUEST];
            loop {
                match c.stream.read(&mut buf) {
                    Ok(0) => {
                        eof = true;
                        break;
                    }
                    Ok(n) => {
                        let room = MAX_REQUEST - c.req.len();
                        c.req.extend_from_slice(&buf[..n.min(room)]);
                        if n > room || c.req.contains(&b'\n') {
                            break;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) => return Err(e),
                }
            }
            let line_end = c.req.iter().position(|&b| b == b'\n');
            if line_end.is_none() && !eof && c.req.len() < MAX_REQUEST {
                return Ok((false, false));
            }
            let line = &c.req[..line_end.unwrap_or(c.req.len())];
            let cmd = String::from_utf8_lossy(line).trim().to_string();
            c.out = match cmd.as_str() {
                "status" | "" => {
                    answered = true;
                    status()
                }
                _ if line_end.is_none() && c.req.len() >= MAX_REQUEST => {
                    error_json(&format!("request longer than {MAX_REQUEST} bytes"))
                }
                other => error_json(&format!("unknown request {other:?}: send \"status\"")),
            };
            c.answering = true;
        }
        while c.written < c.out.len() {
            match c.stream.write(&c.out[c.written..]) {
                Ok(0) => return Ok((true, answered)),
                Ok(n) => c.written += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok((false, answered)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        Ok((true, answered))
    }
}

#[allow(clippy::too_many_arguments)]
fn self_status(
    region: &Region,
    id: &AgentIdentity,
    started: Instant,
    addresses: &[(IpAddr, u8)],
    links: &Links,
    listening: Option<&Listening>,
    requests: u64,
    rejected: u64,
) -> Vec<u8> {
    let mut status = Status::read(region);
    status.agent = Some(AgentInfo {
        tap: id.tap.clone(),
        peer_id: id.claim.id,
        incarnation: id.claim.incarnation,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_string(),
        backend: id.backend.clone(),
        uptime_s: started.elapsed().as_secs_f64(),
        mac: crate::mac::Mac(id.mac).to_string(),
        mtu: id.mtu,
        offloads: id.offloads.map_or_else(|| "off".to_string(), |f| f.to_string()),
        addresses: addresses.iter().map(|(a, p)| format!("{a}/{p}")).collect(),
        peers_up: (0..region.geometry().max_peers).filter(|&p| links.is_up(p)).collect(),
        control_socket: listening.map(|l| l.path.display().to_string()).unwrap_or_default(),
        requests: requests + 1,
        rejected,
    });
    match serde_json::to_vec(&status) {
        Ok(mut v) => {
            v.push(b'\n');
            v
        }
        Err(e) => error_json(&format!("cannot encode the status: {e}")),
    }
}

fn error_json(message: &str) -> Vec<u8> {
    let mut v = serde_json::to_vec(&serde_json::json!({ "error": message }))
        .unwrap_or_else(|_| b"{\"error\":\"?\"}".to_vec());
    v.push(b'\n');
    v
}

/// Takes the socket path (a lock file beside it, held for the agent's life), removes a stale
/// socket and listens.
fn listen(path: &Path) -> Result<Listening, ControlError> {
    let err = |what: &'static str| {
        move |source: io::Error| ControlError::Listen { path: path.to_path_buf(), what, source }
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o755)
                .create(dir)
                .map_err(err("cannot create its directory"))?;
        }
    }
    let mut lock_name = path.as_os_str().to_owned();
    lock_name.push(".lock");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_name)
        .map_err(err("cannot open its lock file"))?;
    crate::sys::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB).map_err(|e| {
        if e.kind() == io::ErrorKind::WouldBlock {
            ControlError::Listen {
                path: path.to_path_buf(),
                what: "in use by another agent (one in another network namespace?)",
                source: e,
            }
        } else {
            err("cannot lock it")(e)
        }
    })?;
    // We hold the lock: a socket file left there belongs to an agent that is gone.
    match std::fs::remove_file(path) {
        Ok(()) => log::debug!("removed a stale {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(err("cannot remove the stale socket")(e)),
    }
    let std_listener =
        crate::sys::ctl::bind_unix_listener(path, 0o660).map_err(err("cannot listen"))?;
    Ok(Listening {
        listener: UnixListener::from_std(std_listener),
        path: path.to_path_buf(),
        _lock: lock,
    })
}

impl Drop for Listening {
    fn drop(&mut self) {
        // Still holding the lock: the path is ours to remove.
        let _ = std::fs::remove_file(&self.path);
    }
}
