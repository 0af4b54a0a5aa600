//! `ivnet status`: where the status comes from (the local agent's control socket by default,
//! or a region read directly), how it is printed (text, JSON, Prometheus), and `--watch`, which
//! refreshes it in place with rates per second.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, ValueEnum};

use crate::backend;
use crate::region::Region;
use crate::status::Status;

/// How long `ivnet status` waits for an agent's answer.
const AGENT_TIMEOUT: Duration = Duration::from_secs(5);

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Format {
    /// Tables for people.
    Text,
    /// The whole status as JSON.
    Json,
    /// OpenMetrics text (Prometheus, node_exporter's textfile collector).
    Prometheus,
}

/// Flags of `ivnet status`.
#[derive(Debug, Clone, Args)]
pub struct StatusArgs {
    /// Read the region file directly (any user who can read it) instead of asking an agent.
    #[arg(long, value_name = "PATH", conflicts_with_all = ["device", "agent_socket", "tap"])]
    pub shm: Option<PathBuf>,
    /// In a VM: read the region from the ivshmem PCI device (`auto` or a PCI address) through
    /// sysfs. Not while an agent holds the device through vfio-pci: ask the agent then.
    #[arg(long, value_name = "auto|ADDR", conflicts_with_all = ["agent_socket", "tap"])]
    pub device: Option<backend::pci::DeviceSpec>,
    /// Ask the agent listening on this control socket.
    #[arg(long, value_name = "PATH", conflicts_with = "tap")]
    pub agent_socket: Option<PathBuf>,
    /// Ask the agent of this TAP interface (its control socket /run/ivnet/NAME.sock). Without
    /// --shm, --device or --agent-socket, `ivnet status` asks the agent of tap-shm.
    #[arg(long, value_name = "NAME")]
    pub tap: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Format::Text)]
    pub format: Format,
    /// Print JSON (the same as --format json).
    #[arg(long)]
    pub json: bool,
    /// Refresh in place (like top) with rates per second for every peer and ring, until
    /// Ctrl-C.
    #[arg(long, conflicts_with_all = ["json", "output"])]
    pub watch: bool,
    /// Seconds between refreshes with --watch (0.1 to 3600).
    #[arg(long, value_name = "SECS", default_value_t = 1.0, requires = "watch")]
    pub interval: f64,
    /// With --watch: stop after N refreshes.
    #[arg(long, value_name = "N", requires = "watch")]
    pub count: Option<u64>,
    /// Write to FILE instead of standard output, atomically (a temporary file renamed over
    /// it), e.g. node_exporter's textfile collector directory.
    #[arg(long, value_name = "FILE")]
    pub output: Option<PathBuf>,
}

/// Where a status comes from.
enum Source {
    Agent(PathBuf),
    Region(Region),
}

impl Source {
    fn open(args: &StatusArgs) -> anyhow::Result<Source> {
        Ok(match (&args.shm, &args.device) {
            (Some(shm), _) => Source::Region(backend::file::open_read_only(shm)?),
            (None, Some(spec)) => {
                let dev = backend::pci::IvshmemDevice::find(spec)?;
                Source::Region(backend::sysfs::SysfsDevice::open_read_only(&dev)?)
            }
            (None, None) => Source::Agent(match (&args.agent_socket, &args.tap) {
                (Some(p), _) => p.clone(),
                (None, Some(tap)) => {
                    crate::agent::tap::validate_name(tap).context("--tap")?;
                    crate::control::default_socket(tap)
                }
                (None, None) => crate::control::default_socket(crate::config::DEFAULT_TAP),
            }),
        })
    }

    fn fetch(&self) -> anyhow::Result<Status> {
        match self {
            Source::Agent(path) => Ok(crate::control::query(path, AGENT_TIMEOUT)?),
            Source::Region(r) => Ok(Status::read(r)),
        }
    }
}

/// Runs `ivnet status`.
pub fn run(args: &StatusArgs) -> anyhow::Result<()> {
    let format = if args.json { Format::Json } else { args.format };
    if args.watch {
        if format != Format::Text {
            bail!("--watch shows text; drop --format/--json, or run without --watch");
        }
        if !(0.1..=3600.0).contains(&args.interval) {
            bail!("--interval {} is out of range: use 0.1 to 3600 seconds", args.interval);
        }
        return watch(&Source::open(args)?, Duration::from_secs_f64(args.interval), args.count);
    }
    let status = Source::open(args)?.fetch()?;
    let out = match format {
        Format::Text => status.to_text(),
        Format::Json => {
            let mut s = serde_json::to_string_pretty(&status).context("encoding JSON")?;
            s.push('\n');
            s
        }
        Format::Prometheus => crate::metrics::encode_status(&status).context("encoding metrics")?,
    };
    match &args.output {
        Some(path) => write_atomically(path, out.as_bytes()),
        None => {
            let mut o = std::io::stdout().lock();
            o.write_all(out.as_bytes()).context("writing to standard output")?;
            Ok(())
        }
    }
}

/// Writes `data` to a temporary file beside `path` and renames it over `path`, so a reader
/// (node_exporter) never sees half a file.
fn write_atomically(path: &Path, data: &[u8]) -> anyhow::Result<()> {
    let name = path
        .file_name()
        .with_context(|| format!("--output {}: not a file name", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp.{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        anyhow::Error::new(e).context(format!("writing {}", path.display()))
    })
}

/// `--watch`: a screen every `interval`, until Ctrl-C (or `count` screens).
fn watch(source: &Source, interval: Duration, count: Option<u64>) -> anyhow::Result<()> {
    use mio::unix::SourceFd;
    use mio::{Events, Interest, Poll, Token};
    use std::os::fd::AsRawFd;
    // Ctrl-C (SIGINT) and SIGTERM arrive through a signalfd, so the screen is left tidy.
    let signals = crate::sys::SignalFd::termination().context("signalfd")?;
    let mut poll = Poll::new().context("epoll")?;
    poll.registry()
        .register(&mut SourceFd(&signals.as_raw_fd()), Token(0), Interest::READABLE)
        .context("registering the signalfd")?;
    let mut events = Events::with_capacity(4);
    let mut prev: Option<(Status, Instant)> = None;
    let mut shown = 0u64;
    let mut out = std::io::stdout().lock();
    loop {
        let now = Instant::now();
        let screen = match source.fetch() {
            Ok(status) => {
                let s = render_watch(
                    &status,
                    prev.as_ref().map(|(p, t)| (p, now.duration_since(*t))),
                    interval,
                );
                prev = Some((status, now));
                s
            }
            Err(e) => format!(
                "ivnet status --watch: {e:#}\n(retrying every {:.1} s)\n",
                interval.as_secs_f64()
            ),
        };
        // Home, each line cleared to its end, then the rest of the screen cleared: an in-place
        // refresh without flicker.
        let mut frame = String::from("\x1b[H");
        for line in screen.lines() {
            frame.push_str(line);
            frame.push_str("\x1b[K\n");
        }
        frame.push_str("\x1b[J");
        out.write_all(frame.as_bytes()).context("writing to standard output")?;
        out.flush().context("writing to standard output")?;
        shown += 1;
        if count.is_some_and(|c| shown >= c) {
            return Ok(());
        }
        let deadline = now + interval;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            match poll.poll(&mut events, Some(left)) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e).context("epoll_wait"),
            }
            if !events.is_empty() && signals.read().is_some() {
                return Ok(());
            }
        }
    }
}

/// Human units for a rate: 950, 12.3k, 4.56M, 1.20G.
fn si(v: f64) -> String {
    if v >= 1e9 {
        format!("{:.2}G", v / 1e9)
    } else if v >= 1e6 {
        format!("{:.2}M", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1}k", v / 1e3)
    } else {
        format!("{v:.0}")
    }
}

/// The rate of a counter between two samples; `None` without an earlier sample, or when the
/// counter went back (the member rejoined and its counters restarted).
fn rate(now: u64, before: Option<u64>, dt: Duration) -> Option<f64> {
    let b = before?;
    let secs = dt.as_secs_f64();
    (now >= b && secs > 0.0).then(|| (now - b) as f64 / secs)
}

/// One `--watch` screen: `prev` is the previous sample and the time since it.
pub fn render_watch(
    status: &Status,
    prev: Option<(&Status, Duration)>,
    interval: Duration,
) -> String {
    let mut s = String::new();
    let source = match &status.agent {
        Some(a) => format!("agent {} (peer {})", a.tap, a.peer_id),
        None => "region".to_string(),
    };
    let _ = writeln!(
        s,
        "ivnet status --watch: {source} on {}, every {:.1} s, rates per second (Ctrl-C ends)",
        status.region,
        interval.as_secs_f64()
    );
    if let Some(a) = &status.agent {
        let _ = writeln!(
            s,
            "agent up {:.0} s, backend {}, addresses {}",
            a.uptime_s,
            a.backend,
            if a.addresses.is_empty() { "none".to_string() } else { a.addresses.join(" ") }
        );
    }
    let dt = prev.map(|(_, d)| d).unwrap_or_default();
    let dash = |r: Option<f64>| r.map_or_else(|| "-".to_string(), si);
    let _ = writeln!(
        s,
        "\n{:>4}  {:<7} {:<5} {:<17} {:>9} {:>9} {:>9} {:>9} {:>8}  addresses",
        "peer", "state", "kind", "MAC", "rx fr/s", "rx B/s", "tx fr/s", "tx B/s", "drops/s"
    );
    for p in &status.peers {
        let old = prev.and_then(|(ps, _)| {
            ps.peers.iter().find(|q| q.id == p.id && q.entry.incarnation == p.entry.incarnation)
        });
        let c = &p.counters;
        let drops = |c: &crate::status::PeerCounters| {
            c.drop_no_peer
                + c.drop_to_self
                + c.drop_oversize
                + c.drop_runt
                + c.drop_offload
                + c.local_kernel_drops
        };
        let stack = p.entry.kind == crate::region::PeerKind::Stack;
        let r = |now: u64, f: fn(&crate::status::PeerCounters) -> u64| {
            if stack {
                "-".to_string()
            } else {
                dash(rate(now, old.map(|o| f(&o.counters)), dt))
            }
        };
        let _ = writeln!(
            s,
            "{:>4}  {:<7} {:<5} {:<17} {:>9} {:>9} {:>9} {:>9} {:>8}  {}",
            p.id,
            format!("{:?}", p.entry.state).to_lowercase(),
            format!("{:?}", p.entry.kind).to_lowercase(),
            crate::mac::Mac(p.entry.mac).to_string(),
            r(c.local_rx_frames, |c| c.local_rx_frames),
            r(c.local_rx_bytes, |c| c.local_rx_bytes),
            r(c.local_tx_frames, |c| c.local_tx_frames),
            r(c.local_tx_bytes, |c| c.local_tx_bytes),
            dash(rate(drops(c), old.map(|o| drops(&o.counters)), dt)),
            p.addresses.join(" ")
        );
    }
    let _ = writeln!(
        s,
        "\n{:>8}  {:>11} {:>9} {:>9} {:>9} {:>9} {:>8}",
        "ring", "fill", "tx fr/s", "tx B/s", "rx fr/s", "rx B/s", "drops/s"
    );
    for ring in &status.rings {
        let x = &ring.ring;
        let old = prev
            .and_then(|(ps, _)| ps.rings.iter().find(|o| o.src == ring.src && o.dst == ring.dst))
            .map(|o| &o.ring);
        let drops = |x: &crate::region::ring::RingSnapshot| {
            x.tx_drop_full
                + x.tx_drop_down
                + x.tx_drop_mtu
                + x.rx_drop_stale
                + x.rx_corrupt
                + x.rx_drop_deliver
                + x.rx_drop_size
                + x.rx_drop_offload
                + x.rx_drop_source
        };
        let _ = writeln!(
            s,
            "{:>8}  {:>11} {:>9} {:>9} {:>9} {:>9} {:>8}",
            format!("{}->{}", ring.src, ring.dst),
            x.fill.map_or_else(|| "corrupt".to_string(), |f| format!("{f}/{}", x.slots)),
            dash(rate(x.tx_frames, old.map(|o| o.tx_frames), dt)),
            dash(rate(x.tx_bytes, old.map(|o| o.tx_bytes), dt)),
            dash(rate(x.rx_frames, old.map(|o| o.rx_frames), dt)),
            dash(rate(x.rx_bytes, old.map(|o| o.rx_bytes), dt)),
            dash(rate(drops(x), old.map(drops), dt)),
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::{GeometryRequest, HeapMemory};
    use std::sync::Arc;

    #[test]
    fn test_rates_are_deltas_per_second_and_absent_without_history() {
        assert_eq!(rate(1500, Some(500), Duration::from_millis(500)), Some(2000.0));
        assert_eq!(rate(10, None, Duration::from_secs(1)), None);
        // A counter that went back: the member rejoined.
        assert_eq!(rate(10, Some(20), Duration::from_secs(1)), None);
        assert_eq!(si(950.0), "950");
        assert_eq!(si(12_345.0), "12.3k");
        assert_eq!(si(4_560_000.0), "4.56M");
        assert_eq!(si(1.2e9), "1.20G");
    }

    #[test]
    fn test_watch_screen_shows_rates_of_ring_traffic() {
        let r =
            Region::attach(Arc::new(HeapMemory::new(32 << 20)), "w", &GeometryRequest::default())
                .unwrap();
        for id in [0, 1] {
            let slot = r.peer(id);
            let inc = slot.try_claim(slot.incarnation()).unwrap();
            slot.set_state(crate::region::PeerState::Up, inc);
        }
        let before = Status::read(&r);
        let mut after = Status::read(&r);
        let ring = after.rings.iter_mut().find(|x| x.src == 0 && x.dst == 1).unwrap();
        ring.ring.tx_frames += 300;
        ring.ring.tx_bytes += 3_000_000;
        let screen =
            render_watch(&after, Some((&before, Duration::from_secs(3))), Duration::from_secs(3));
        let line = screen.lines().find(|l| l.trim_start().starts_with("0->1")).unwrap();
        let cols: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&cols[2..4], ["100", "1.00M"], "{line}");
        let first = render_watch(&after, None, Duration::from_secs(1));
        let line = first.lines().find(|l| l.trim_start().starts_with("0->1")).unwrap();
        assert_eq!(line.split_whitespace().nth(2), Some("-"), "no rate without a previous sample");
    }
}
