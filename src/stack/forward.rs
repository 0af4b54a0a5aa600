//! `forward LISTEN_ADDR:PORT TARGET_ADDR:PORT`: accepts connections on a host socket (a normal
//! kernel TCP listener, typically on loopback) and relays each to TARGET on the segment over
//! smoltcp TCP, many at once, so an unprivileged user can reach a VM's SSH or web server.
//!
//! Bytes move between the kernel socket and smoltcp's socket buffers with one `read`/`write`
//! each, straight into and out of smoltcp's buffers. Back-pressure holds both ways: a full
//! smoltcp send buffer stops reading the host socket (the client's kernel then stops it), and a
//! host socket that does not drain stops reading smoltcp's receive buffer (its window closes).
//! A FIN on either side becomes a half-close on the other.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::time::{Duration, Instant};

use mio::net::{TcpListener, TcpStream};
use mio::{Interest, Token};
use smoltcp::iface::SocketHandle;
use smoltcp::socket::tcp::{self, State};
use smoltcp::wire::IpEndpoint;

use super::{Stack, StackError, Step, APP_TOKEN_BASE};

/// What `forward` does.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ForwardOptions {
    /// Host address to accept on.
    pub listen: SocketAddr,
    /// Address on the segment to relay to.
    pub target: SocketAddr,
    /// Most relayed connections at once; beyond it new ones are closed at once.
    pub max_connections: usize,
    /// How long a connection to the target may take to be established.
    pub connect_timeout: Duration,
}

const TOKEN_LISTENER: Token = Token(APP_TOKEN_BASE);

struct Relay {
    stream: TcpStream,
    handle: SocketHandle,
    client: SocketAddr,
    readable: bool,
    writable: bool,
    /// The client finished sending; our FIN is queued on the segment side.
    host_eof: bool,
    /// The target finished sending; the client's socket is shut down for writing.
    remote_eof: bool,
    established: bool,
    started: Instant,
    up: u64,
    down: u64,
}

enum Io {
    Moved(usize),
    Eof,
    Block,
    Again,
    Failed(io::Error),
}

fn classify(r: io::Result<usize>) -> Io {
    match r {
        Ok(0) => Io::Eof,
        Ok(n) => Io::Moved(n),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => Io::Block,
        Err(e) if e.kind() == io::ErrorKind::Interrupted => Io::Again,
        Err(e) => Io::Failed(e),
    }
}

/// Moves what can be moved for one connection. Returns false when it is finished.
fn pump(r: &mut Relay, s: &mut tcp::Socket, now: Instant, opts: &ForwardOptions) -> bool {
    let target = opts.target;
    if !r.established {
        match s.state() {
            State::SynSent | State::SynReceived => {
                if now.duration_since(r.started) > opts.connect_timeout {
                    log::warn!(
                        "{}: no answer from {target} within {:?}; closing",
                        r.client,
                        opts.connect_timeout
                    );
                    s.abort();
                    return false;
                }
                return true;
            }
            State::Closed => {
                log::warn!("{}: connection to {target} refused; closing", r.client);
                return false;
            }
            _ => {
                r.established = true;
                log::info!("{}: connected to {target}", r.client);
            }
        }
    }
    // Client -> target, straight into smoltcp's send buffer.
    while r.readable && !r.host_eof && s.may_send() && s.send_capacity() > s.send_queue() {
        let stream = &mut r.stream;
        match s.send(|buf| match classify(stream.read(buf)) {
            Io::Moved(n) => (n, Io::Moved(n)),
            other => (0, other),
        }) {
            Ok(Io::Moved(n)) => r.up += n as u64,
            Ok(Io::Eof) => {
                r.host_eof = true;
                s.close(); // FIN once everything queued is sent
            }
            Ok(Io::Block) => r.readable = false,
            Ok(Io::Again) => {}
            Ok(Io::Failed(e)) => {
                log::info!("{}: reading from the client failed: {e}; resetting", r.client);
                s.abort();
                return false;
            }
            Err(_) => break,
        }
    }
    // Target -> client, straight out of smoltcp's receive buffer.
    while r.writable && s.can_recv() {
        let stream = &mut r.stream;
        match s.recv(|buf| match classify(stream.write(buf)) {
            Io::Moved(n) => (n, Io::Moved(n)),
            other => (0, other),
        }) {
            Ok(Io::Moved(n)) => r.down += n as u64,
            Ok(Io::Eof | Io::Block) => r.writable = false,
            Ok(Io::Again) => {}
            Ok(Io::Failed(e)) => {
                log::info!("{}: writing to the client failed: {e}; resetting", r.client);
                s.abort();
                return false;
            }
            Err(_) => break,
        }
    }
    let st = s.state();
    if !r.remote_eof
        && !s.may_recv()
        && matches!(st, State::CloseWait | State::LastAck | State::Closing | State::TimeWait)
    {
        // The target sent FIN and the client has every byte before it: half-close.
        if let Err(e) = r.stream.shutdown(Shutdown::Write) {
            log::debug!("{}: shutdown for writing: {e}", r.client);
        }
        r.remote_eof = true;
    }
    match st {
        State::Closed if !s.can_recv() => {
            if !(r.host_eof && r.remote_eof) {
                log::info!("{}: {target} reset the connection", r.client);
            }
            false
        }
        State::TimeWait => !(r.remote_eof && r.host_eof),
        _ => true,
    }
}

/// Runs the forwarder until a termination signal. Prints `forwarding LOCAL -> TARGET` first,
/// with the port the kernel chose if `listen` had port 0.
pub(crate) fn forward(
    stack: &mut Stack,
    opts: ForwardOptions,
    out: &mut dyn Write,
) -> Result<(), StackError> {
    let listen_err = |source| StackError::Listen { addr: opts.listen, source };
    let mut listener = TcpListener::bind(opts.listen).map_err(listen_err)?;
    let local = listener.local_addr().map_err(listen_err)?;
    stack
        .registry()
        .register(&mut listener, TOKEN_LISTENER, Interest::READABLE)
        .map_err(listen_err)?;
    writeln!(out, "forwarding {local} -> {}", opts.target)
        .and_then(|()| out.flush())
        .map_err(StackError::Output)?;
    let mut relays: Vec<Option<Relay>> = Vec::new();
    let mut free: Vec<usize> = Vec::new();
    let mut active = 0usize;
    let mut accept_ready = true;
    let mut accept_retry: Option<Instant> = None;
    let result = stack.run(|stack| {
        if stack.signal().is_some() {
            return Ok(Step::Done(()));
        }
        let now = Instant::now();
        for i in 0..stack.app_events().len() {
            let ev = stack.app_events()[i];
            if ev.token == TOKEN_LISTENER {
                accept_ready = true;
            } else if let Some(Some(r)) = relays.get_mut(ev.token.0 - APP_TOKEN_BASE - 1) {
                r.readable |= ev.readable;
                r.writable |= ev.writable;
            }
        }
        if accept_retry.is_some_and(|t| now >= t) {
            accept_ready = true;
            accept_retry = None;
        }
        while accept_ready {
            let (mut stream, client) = match listener.accept() {
                Ok(x) => x,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    accept_ready = false;
                    break;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    // Out of descriptors, say: try again shortly rather than spin.
                    log::warn!("accepting on {local} failed: {e}; retrying in 100 ms");
                    accept_ready = false;
                    accept_retry = Some(now + Duration::from_millis(100));
                    break;
                }
            };
            if active >= opts.max_connections {
                log::warn!("{client}: {active} connections already relayed; closing this one");
                continue;
            }
            let slot = free.pop().unwrap_or_else(|| {
                relays.push(None);
                relays.len() - 1
            });
            let token = Token(APP_TOKEN_BASE + 1 + slot);
            if let Err(e) = stack.registry().register(
                &mut stream,
                token,
                Interest::READABLE | Interest::WRITABLE,
            ) {
                log::warn!("{client}: cannot watch the connection: {e}; closing it");
                free.push(slot);
                continue;
            }
            if let Err(e) = stream.set_nodelay(true) {
                log::debug!("{client}: TCP_NODELAY: {e}");
            }
            let mut sock = stack.tcp_socket();
            sock.set_nagle_enabled(false);
            let handle = stack.sockets.add(sock);
            let port = stack.ephemeral_port();
            let cx = stack.iface.context();
            if let Err(e) = stack.sockets.get_mut::<tcp::Socket>(handle).connect(
                cx,
                IpEndpoint::from(opts.target),
                port,
            ) {
                log::warn!("{client}: cannot connect to {}: {e}; closing", opts.target);
                stack.sockets.remove(handle);
                if let Err(e) = stack.registry().deregister(&mut stream) {
                    log::debug!("{client}: deregister: {e}");
                }
                free.push(slot);
                continue;
            }
            log::info!("{client}: accepted, connecting to {}", opts.target);
            relays[slot] = Some(Relay {
                stream,
                handle,
                client,
                readable: true,
                writable: true,
                host_eof: false,
                remote_eof: false,
                established: false,
                started: now,
                up: 0,
                down: 0,
            });
            active += 1;
        }
        for (slot, entry) in relays.iter_mut().enumerate() {
            let Some(r) = entry.as_mut() else { continue };
            let s = stack.sockets.get_mut::<tcp::Socket>(r.handle);
            if pump(r, s, now, &opts) {
                continue;
            }
            if let Some(mut r) = entry.take() {
                log::info!(
                    "{}: closed ({} bytes to {}, {} bytes back)",
                    r.client,
                    r.up,
                    opts.target,
                    r.down
                );
                stack.sockets.remove(r.handle);
                if let Err(e) = stack.registry().deregister(&mut r.stream) {
                    log::debug!("{}: deregister: {e}", r.client);
                }
                free.push(slot);
                active -= 1;
            }
        }
        Ok(Step::Continue(accept_retry.map(|t| t.saturating_duration_since(now))))
    });
    // Leaving: reset what is still open on the segment side; the client sockets close with
    // `relays`.
    let mut open = 0;
    for r in relays.iter().flatten() {
        stack.sockets.get_mut::<tcp::Socket>(r.handle).abort();
        open += 1;
    }
    if open > 0 {
        log::info!("closing {open} relayed connection(s)");
        stack.poll()?;
    }
    result
}
