//! The agent as a systemd service (`Type=notify`, `WatchdogSec=`): `READY=1` once the TAP is up
//! and the segment joined, a `STATUS=` line naming the peers that are up (sent again whenever
//! that set changes), and `WATCHDOG=1` from the event loop every half of the watchdog timeout,
//! so a hung agent (stopped, deadlocked, spinning outside the loop) is restarted.
//!
//! Without systemd (`NOTIFY_SOCKET` unset) nothing is sent; the checks cost one comparison of
//! instants per pass of the event loop.

use std::fmt::Write as _;
use std::time::{Duration, Instant};

use super::link::Links;
use crate::sys::sd::{self, Watchdog};

/// How often the set of peers up is compared with the one last reported.
const STATUS_CHECK: Duration = Duration::from_millis(100);

/// Peer ids watched (a region has at most 64 peer slots; `Links::is_up` is false beyond its own).
const MAX_PEERS: u32 = 64;

/// What the agent last told the service manager, and when it next looks again.
pub(crate) struct ServiceNotifier {
    /// `peer N on REGION (TAP)`, the start of every status line.
    me: String,
    /// Bit i set: peer i was up at the last report.
    reported: u64,
    next_check: Instant,
    watchdog: Option<Watchdog>,
}

impl ServiceNotifier {
    /// Sends `READY=1` with the first status line and arms the watchdog feeder (if systemd set
    /// `WATCHDOG_USEC` for us).
    pub(crate) fn ready(me: String, links: &Links, now: Instant) -> Self {
        let mut s = ServiceNotifier {
            me,
            reported: 0,
            next_check: now + STATUS_CHECK,
            watchdog: Watchdog::from_env(now),
        };
        s.reported = s.up_mask(links);
        sd::ready(&s.status_text());
        if let Some(w) = s.watchdog.as_mut() {
            w.feed(now);
        }
        s
    }

    fn up_mask(&self, links: &Links) -> u64 {
        (0..MAX_PEERS).filter(|&id| links.is_up(id)).fold(0, |m, id| m | 1 << id)
    }

    /// `peer 1 on /dev/shm/ivnet (tap-shm): 2 peers up (0, 3)`.
    fn status_text(&self) -> String {
        let n = self.reported.count_ones();
        let mut t = format!("{}: {n} peer{} up", self.me, if n == 1 { "" } else { "s" });
        if n > 0 {
            let ids: Vec<String> = (0..MAX_PEERS)
                .filter(|id| self.reported & (1 << id) != 0)
                .map(|id| id.to_string())
                .collect();
            let _ = write!(t, " ({})", ids.join(", "));
        }
        t
    }

    /// Feeds the watchdog and reports a changed set of peers; call once per pass of the loop.
    pub(crate) fn tick(&mut self, links: &Links, now: Instant) {
        if let Some(w) = self.watchdog.as_mut() {
            w.feed(now);
        }
        if now >= self.next_check {
            self.next_check = now + STATUS_CHECK;
            let mask = self.up_mask(links);
            if mask != self.reported {
                self.reported = mask;
                sd::status(&self.status_text());
            }
        }
    }

    /// The latest time the loop may sleep until (the next watchdog ping).
    pub(crate) fn wake_by(&self) -> Option<Instant> {
        self.watchdog.as_ref().map(Watchdog::due)
    }
}
