//! `ivnet stack`: the unprivileged tools. Common options (which segment, which address) come
//! before the subcommand, e.g. `ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.2/24 ping 10.0.0.1
//! -c 3`. Every tool prints its results on stdout, logs on stderr, and exits non-zero with one
//! error line when it fails; servers stop cleanly (leaving the segment) on SIGINT or SIGTERM.

use std::io::{self, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use clap::{ArgGroup, Args, Subcommand};

use super::echo::{EchoClientOptions, EchoOptions};
use super::forward::ForwardOptions;
use super::ping::PingOptions;
use super::transfer::{Amount, ReportOptions};
use super::{Stack, StackBackend, StackConfig, StackError};
use crate::config::{ByteSize, Cidr, RegionArgs};
use crate::mac::Mac;

/// Flags of `ivnet stack`, before the subcommand.
#[derive(Debug, Clone, Args)]
pub struct StackArgs {
    #[command(flatten)]
    #[allow(missing_docs)]
    pub region: RegionArgs,
    /// Join through the doorbell server on this UNIX socket (`server` backend): peer id, region
    /// and doorbells come from the server, as for QEMU.
    #[arg(long, value_name = "PATH", conflicts_with = "shm")]
    pub socket: Option<PathBuf>,
    /// Our peer id (slot in the peer table; `--shm` only). Default: claim a free slot.
    #[arg(long, value_name = "ID", conflicts_with = "socket")]
    pub peer_id: Option<u32>,
    /// Our address with its prefix, e.g. 10.0.0.2/24 or fd00::2/64 (repeat for several). An
    /// IPv6 link-local address derived from the MAC is always added.
    #[arg(long = "ip", value_name = "CIDR", required = true)]
    pub ip: Vec<Cidr>,
    /// Default gateway (one IPv4 and/or one IPv6), inside an --ip subnet.
    #[arg(long, value_name = "ADDR")]
    pub gateway: Vec<IpAddr>,
    /// MAC address. Default: 02:69:76:6e:HH:LL from the peer id.
    #[arg(long, value_name = "MAC")]
    pub mac: Option<Mac>,
    /// IP MTU (576..=65521, at least 1280 with IPv6, at most the segment MTU). Default 1500.
    #[arg(long, value_name = "BYTES")]
    pub mtu: Option<u32>,
    /// Interval at which the rings are polled when there is no doorbell (`--shm`), in µs.
    #[arg(long, value_name = "US")]
    pub poll_us: Option<u64>,
    /// Without doorbells, the poll interval backs off to this after 200 ms without traffic, in
    /// µs.
    #[arg(long, value_name = "US")]
    pub poll_idle_us: Option<u64>,
    /// Keep polling this long after the last frame before sleeping, in µs (0: never spin).
    #[arg(long, value_name = "US")]
    pub spin_us: Option<u64>,
    /// A peer whose heartbeat stops for this long is marked down, in ms.
    #[arg(long, value_name = "MS")]
    pub link_timeout_ms: Option<u64>,
    /// Accept from each peer only frames whose source MAC is the one in its slot when it came
    /// up (a guard against mistakes and casual spoofing).
    #[arg(long)]
    pub pin_macs: bool,
    /// Receive and send buffer of each TCP connection (e.g. 256K, 4M). Default 1M.
    #[arg(long, value_name = "SIZE")]
    pub tcp_buffer: Option<ByteSize>,
    /// How long a TCP connection may take to be established, in ms.
    #[arg(long, value_name = "MS", default_value_t = 10_000)]
    pub connect_timeout_ms: u64,
    #[command(subcommand)]
    #[allow(missing_docs)]
    pub command: StackCommand,
}

/// The `ivnet stack` tools.
#[derive(Debug, Clone, Subcommand)]
pub enum StackCommand {
    /// Send ICMP (or ICMPv6) echo requests and print each reply's round-trip time, like ping.
    /// Exits non-zero if no reply came back.
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.2/24 ping 10.0.0.1 -c 3
    Ping {
        /// Address to ping.
        addr: IpAddr,
        /// Stop after this many requests (default: until SIGINT).
        #[arg(short = 'c', long, value_name = "N")]
        count: Option<u32>,
        /// Seconds between requests; 0 sends the next one as soon as a reply is in.
        #[arg(short = 'i', long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Seconds to wait for each reply.
        #[arg(short = 'W', long = "timeout", value_name = "SECS", default_value_t = 2.0)]
        wait: f64,
        /// Payload bytes per request.
        #[arg(short = 's', long, value_name = "BYTES", default_value_t = 56)]
        size: usize,
    },
    /// Echo server on a TCP and/or a UDP port (many TCP connections at once) until SIGINT or
    /// SIGTERM.
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.2/24 echo --tcp 7 --udp 7
    #[command(group(ArgGroup::new("proto").required(true).multiple(true).args(["tcp", "udp"])))]
    Echo {
        /// TCP port to echo on.
        #[arg(long, value_name = "PORT")]
        tcp: Option<u16>,
        /// UDP port to echo on.
        #[arg(long, value_name = "PORT")]
        udp: Option<u16>,
        /// Most TCP connections at once.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        max_connections: usize,
    },
    /// Send messages to an echo server, check every echo and print round-trip statistics.
    /// Exits non-zero if any message was lost or corrupted.
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.3/24 echo-client --udp 10.0.0.2:7
    EchoClient {
        /// The echo server, ADDR:PORT (`[ADDR]:PORT` for IPv6).
        target: SocketAddr,
        /// Use UDP (default TCP).
        #[arg(long)]
        udp: bool,
        /// Round trips (per connection with TCP).
        #[arg(short = 'c', long, value_name = "N", default_value_t = 10)]
        count: u64,
        /// Bytes per message.
        #[arg(short = 's', long, value_name = "BYTES", default_value_t = 64)]
        size: usize,
        /// TCP connections at once.
        #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "udp")]
        connections: usize,
        /// Seconds to wait for each echo (UDP).
        #[arg(short = 'W', long = "timeout", value_name = "SECS", default_value_t = 1.0)]
        wait: f64,
    },
    /// Throughput test, sending side: connect to ADDR:PORT and send N pseudo-random bytes, or
    /// send for -t SECONDS; like iperf3, prints a line per second (bytes and Gbit/s in it),
    /// then bytes, seconds, Gbit/s and the stream's SHA-256 (or one JSON object with --json).
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.3/24 send 10.0.0.2:5001 -t 10
    #[command(group(ArgGroup::new("amount").required(true).args(["bytes", "time"])))]
    Send {
        /// Where to send, ADDR:PORT.
        target: SocketAddr,
        /// How many bytes (e.g. 64M, 1G).
        #[arg(long, value_name = "N")]
        bytes: Option<ByteSize>,
        /// Send for this many seconds instead of a number of bytes.
        #[arg(short = 't', long, value_name = "SECS")]
        time: Option<f64>,
        /// Seed of the pseudo-random stream.
        #[arg(long, value_name = "N", default_value_t = 1)]
        seed: u64,
        /// Seconds between interval lines (0: none, only the result).
        #[arg(short = 'i', long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Print one JSON object (bytes, seconds, Gbit/s, SHA-256, intervals) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Throughput test, receiving side: accept a TCP stream on PORT and read it to the end;
    /// like iperf3, prints a line per second, then bytes, seconds, Gbit/s and the stream's
    /// SHA-256 (or one JSON object per stream with --json).
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.2/24 recv --tcp 5001
    Recv {
        /// TCP port to accept on.
        #[arg(long, value_name = "PORT")]
        tcp: u16,
        /// Streams to receive, one after the other, before exiting.
        #[arg(long, value_name = "N", default_value_t = 1)]
        connections: u32,
        /// Seconds between interval lines (0: none, only the result).
        #[arg(short = 'i', long, value_name = "SECS", default_value_t = 1.0)]
        interval: f64,
        /// Print one JSON object per stream (bytes, seconds, Gbit/s, SHA-256, intervals)
        /// instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Accept connections on a host socket (e.g. 127.0.0.1:2222) and relay each to TARGET on
    /// the segment over TCP, many at once, until SIGINT or SIGTERM. Port 0 picks a free port;
    /// the first line printed says which.
    ///
    /// Example: ivnet stack --shm /dev/shm/ivnet --ip 10.0.0.9/24 forward 127.0.0.1:2222
    /// 10.0.0.1:22
    Forward {
        /// Host address to accept on, ADDR:PORT.
        listen: SocketAddr,
        /// Address on the segment to relay to, ADDR:PORT.
        target: SocketAddr,
        /// Most relayed connections at once.
        #[arg(long, value_name = "N", default_value_t = 1024)]
        max_connections: usize,
    },
}

fn invalid(option: &'static str, message: impl Into<String>) -> StackError {
    StackError::InvalidConfig { option, message: message.into() }
}

fn seconds(option: &'static str, v: f64) -> Result<Duration, StackError> {
    Duration::try_from_secs_f64(v)
        .map_err(|_| invalid(option, format!("{v} is not a number of seconds >= 0")))
}

impl StackArgs {
    /// Checks the common flags and builds the stack configuration.
    pub fn config(&self) -> Result<StackConfig, StackError> {
        let backend = match (&self.socket, &self.region.shm) {
            (Some(socket), _) => StackBackend::Server { socket: socket.clone() },
            (None, Some(path)) => {
                StackBackend::File { path: path.clone(), size: self.region.size.map(|s| s.0) }
            }
            (None, None) => {
                return Err(invalid(
                    "--shm",
                    "no region given: use --shm PATH (a shared file) or --socket PATH (a \
                     doorbell server)",
                ))
            }
        };
        let mut cfg = match &backend {
            StackBackend::File { path, size } => StackConfig::file(path, *size),
            StackBackend::Server { socket } => StackConfig::server(socket),
        };
        cfg.geometry = self.region.geometry();
        cfg.create_mode = self
            .region
            .create_mode(None, None)
            .map_err(|e| invalid("--mode/--group", e.to_string()))?;
        cfg.peer_id = self.peer_id;
        cfg.addresses = self.ip.clone();
        cfg.gateways = self.gateway.clone();
        cfg.mac = self.mac;
        if let Some(m) = self.mac.filter(|m| m.is_multicast()) {
            return Err(invalid("--mac", format!("{m} is a multicast address")));
        }
        if let Some(mtu) = self.mtu {
            if !(576..=crate::region::layout::MTU_LIMIT - 14).contains(&mtu) {
                return Err(invalid("--mtu", format!("{mtu} is outside 576..=65521")));
            }
            cfg.mtu = mtu;
        }
        if let Some(us) = self.poll_us {
            if us == 0 {
                return Err(invalid("--poll-us", "must be at least 1"));
            }
            cfg.poll = Duration::from_micros(us);
        }
        if let Some(us) = self.poll_idle_us {
            if !(1..=1_000_000).contains(&us) {
                return Err(invalid(
                    "--poll-idle-us",
                    format!("{us} is out of range: use 1..=1000000"),
                ));
            }
            cfg.poll_idle = Duration::from_micros(us);
        }
        if let Some(us) = self.spin_us {
            cfg.spin = Duration::from_micros(us);
        }
        cfg.pin_macs = self.pin_macs;
        if let Some(ms) = self.link_timeout_ms {
            if ms < 10 {
                return Err(invalid("--link-timeout-ms", "must be at least 10"));
            }
            cfg.link_timeout = Duration::from_millis(ms);
        }
        if let Some(b) = self.tcp_buffer {
            if !(4096..=(1 << 30)).contains(&b.0) {
                return Err(invalid("--tcp-buffer", "must be between 4K and 1G"));
            }
            cfg.tcp_buffer = b.0 as usize;
        }
        cfg.handle_signals = true;
        Ok(cfg)
    }
}

fn report_options(interval: f64, json: bool) -> Result<ReportOptions, StackError> {
    let every = seconds("-i", interval)?;
    Ok(ReportOptions { interval: (!every.is_zero()).then_some(every), json })
}

/// Checks a subcommand's own options before the segment is joined.
fn check_command(cmd: &StackCommand, mtu: u32) -> Result<(), StackError> {
    match cmd {
        StackCommand::Ping { addr, interval, wait, size, .. } => {
            seconds("ping -i", *interval)?;
            seconds("ping -W", *wait)?;
            let headers = if addr.is_ipv4() { 28 } else { 48 };
            if size + headers > mtu as usize {
                return Err(invalid(
                    "ping -s",
                    format!(
                        "{size} bytes do not fit the MTU {mtu} (at most {})",
                        mtu as usize - headers
                    ),
                ));
            }
        }
        StackCommand::Echo { tcp, udp, max_connections } => {
            if *tcp == Some(0) || *udp == Some(0) {
                return Err(invalid("echo", "port 0 is not a usable port"));
            }
            if *max_connections == 0 {
                return Err(invalid("echo --max-connections", "must be at least 1"));
            }
        }
        StackCommand::EchoClient { target, udp, size, connections, wait, count } => {
            seconds("echo-client -W", *wait)?;
            if target.port() == 0 {
                return Err(invalid("echo-client", "port 0 is not a usable port"));
            }
            if *size == 0 || *count == 0 || *connections == 0 {
                return Err(invalid("echo-client", "-s, -c and --connections must be at least 1"));
            }
            let headers = if target.is_ipv4() { 28 } else { 48 };
            if *udp && size + headers > mtu as usize {
                return Err(invalid(
                    "echo-client -s",
                    format!("{size} bytes do not fit one datagram at MTU {mtu}"),
                ));
            }
        }
        StackCommand::Send { target, time, interval, .. } => {
            if target.port() == 0 {
                return Err(invalid("send", "port 0 is not a usable port"));
            }
            if let Some(t) = time {
                if !(t.is_finite() && *t > 0.0) {
                    return Err(invalid("send -t", format!("{t} is not a number of seconds > 0")));
                }
            }
            seconds("send -i", *interval)?;
        }
        StackCommand::Recv { tcp, connections, interval, .. } => {
            if *tcp == 0 || *connections == 0 {
                return Err(invalid("recv", "the port and --connections must be at least 1"));
            }
            seconds("recv -i", *interval)?;
        }
        StackCommand::Forward { target, max_connections, .. } => {
            if target.port() == 0 {
                return Err(invalid("forward", "the target's port 0 is not a usable port"));
            }
            if *max_connections == 0 {
                return Err(invalid("forward --max-connections", "must be at least 1"));
            }
        }
    }
    Ok(())
}

/// Runs `ivnet stack ...`: joins the segment, runs the tool, leaves the segment.
pub fn run(args: &StackArgs) -> Result<(), StackError> {
    let cfg = args.config()?;
    check_command(&args.command, cfg.mtu)?;
    let mut stack = Stack::open(&cfg)?;
    let stdout = io::stdout();
    let mut out = stdout.lock();
    let connect_timeout = Duration::from_millis(args.connect_timeout_ms);
    let result = match &args.command {
        StackCommand::Ping { addr, count, interval, wait, size } => {
            let opts = PingOptions {
                count: *count,
                interval: seconds("ping -i", *interval)?,
                wait: seconds("ping -W", *wait)?,
                size: *size,
            };
            super::ping::ping(&mut stack, *addr, opts, &mut out)
        }
        StackCommand::Echo { tcp, udp, max_connections } => {
            let opts = EchoOptions { tcp: *tcp, udp: *udp, max_connections: *max_connections };
            super::echo::serve(&mut stack, opts, &mut out)
        }
        StackCommand::EchoClient { target, udp, count, size, connections, wait } => {
            let opts = EchoClientOptions {
                udp: *udp,
                count: *count,
                size: *size,
                connections: *connections,
                wait: seconds("echo-client -W", *wait)?,
            };
            super::echo::client(&mut stack, *target, opts, connect_timeout, &mut out)
        }
        StackCommand::Send { target, bytes, time, seed, interval, json } => {
            let amount = match (bytes, time) {
                (Some(b), _) => Amount::Bytes(b.0),
                (None, Some(t)) => Amount::Time(seconds("send -t", *t)?),
                (None, None) => return Err(invalid("send", "give --bytes N or -t SECONDS")),
            };
            let report = report_options(*interval, *json)?;
            super::transfer::send(
                &mut stack,
                *target,
                amount,
                *seed,
                connect_timeout,
                report,
                &mut out,
            )
        }
        StackCommand::Recv { tcp, connections, interval, json } => {
            let report = report_options(*interval, *json)?;
            super::transfer::recv(&mut stack, *tcp, *connections, report, &mut out)
        }
        StackCommand::Forward { listen, target, max_connections } => {
            let opts = ForwardOptions {
                listen: *listen,
                target: *target,
                max_connections: *max_connections,
                connect_timeout,
            };
            super::forward::forward(&mut stack, opts, &mut out)
        }
    };
    if let Err(e) = out.flush() {
        log::debug!("flushing stdout: {e}");
    }
    stack.leave();
    result
}
