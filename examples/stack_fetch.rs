//! Fetch a web page from a server on an ivnet segment, with no privileges and no TAP: the
//! smallest complete user of the library API of the stack mode (`ivnet::stack`).
//!
//! ```text
//! cargo run --release --example stack_fetch -- /dev/shm/ivnet 10.0.0.9/24 10.0.0.1:80 /index.html
//! ```
//!
//! It joins the segment in the region file (the `file` backend; `StackConfig::server` would join
//! through `ivnet server` instead), gets a smoltcp interface with the given address, connects
//! over smoltcp TCP, sends an HTTP/1.0 request and copies the answer to stdout until the server
//! closes. Leaving (the peer slot marked left) happens when the `Stack` is dropped, also on
//! error, and on Ctrl-C.

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use ivnet::config::Cidr;
use ivnet::stack::{Stack, StackConfig, StackError, Step};
use smoltcp::socket::tcp;
use smoltcp::wire::IpEndpoint;

const USAGE: &str = "usage: stack_fetch REGION_FILE CIDR SERVER_ADDR:PORT [PATH]";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let (Some(region), Some(cidr), Some(server)) = (args.first(), args.get(1), args.get(2)) else {
        return Err(USAGE.into());
    };
    let path = args.get(3).map_or("/", String::as_str);
    let cidr: Cidr = cidr.parse()?;
    let server: SocketAddr = server.parse()?;

    // 1. Configure and join: defaults as for the agent (MTU 1500, MAC from the peer id).
    let mut cfg = StackConfig::file(Path::new(region), None);
    cfg.addresses = vec![cidr];
    cfg.handle_signals = true; // Ctrl-C ends `run` with StackError::Interrupted
    let mut stack = Stack::open(&cfg)?;
    eprintln!("joined as peer {} with MAC {}", stack.claim().id, stack.mac());

    // 2. A smoltcp TCP socket, connected from an ephemeral port.
    let handle = stack.sockets.add(stack.tcp_socket());
    let port = stack.ephemeral_port();
    let cx = stack.iface.context();
    stack.sockets.get_mut::<tcp::Socket>(handle).connect(cx, IpEndpoint::from(server), port)?;

    // 3. Drive it: `run` polls the rings and smoltcp, calls the closure, and sleeps until the
    //    next frame, smoltcp deadline or the limit the closure returns.
    let request = format!("GET {path} HTTP/1.0\r\nHost: {}\r\n\r\n", server.ip());
    let mut sent = 0;
    let mut stdout = std::io::stdout().lock();
    let start = Instant::now();
    let connect_timeout = Duration::from_secs(10);
    stack.run(|stack| {
        let s = stack.sockets.get_mut::<tcp::Socket>(handle);
        match s.state() {
            tcp::State::SynSent if start.elapsed() > connect_timeout => {
                return Err(StackError::ConnectTimeout { target: server, after: connect_timeout })
            }
            tcp::State::SynSent => return Ok(Step::Continue(Some(connect_timeout))),
            tcp::State::Closed if sent == 0 => {
                return Err(StackError::ConnectRefused { target: server })
            }
            _ => {}
        }
        if sent < request.len() && s.can_send() {
            sent += s.send_slice(&request.as_bytes()[sent..]).unwrap_or(0);
            if sent == request.len() {
                s.close(); // half-close: the request is complete
            }
        }
        while s.can_recv() {
            // Straight out of smoltcp's receive buffer into stdout.
            let r = s.recv(|buf| match stdout.write(buf) {
                Ok(n) => (n, Ok(())),
                Err(e) => (0, Err(e)),
            });
            if let Ok(Err(e)) = r {
                return Err(StackError::Output(e));
            }
        }
        if !s.is_active() || (!s.may_recv() && s.recv_queue() == 0) {
            return Ok(Step::Done(()));
        }
        Ok(Step::Continue(None))
    })?;
    stdout.flush()?;
    Ok(())
}
