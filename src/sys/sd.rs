//! Talking to systemd as a `Type=notify` service with a watchdog (sd_notify(3),
//! sd_watchdog_enabled(3)): state lines such as `READY=1`, `STATUS=...`, `WATCHDOG=1` and
//! `STOPPING=1` sent as one datagram to `$NOTIFY_SOCKET`, and the watchdog interval from
//! `$WATCHDOG_USEC` (obeyed only when `$WATCHDOG_PID` is unset or names this process).
//!
//! Without a service manager (`NOTIFY_SOCKET` unset) every call does nothing.

use std::io;
use std::time::Duration;

/// Longest `STATUS=` text sent (systemd takes one line; the whole datagram must stay small).
const STATUS_MAX: usize = 1024;

/// Sends `state` (newline-separated `KEY=VALUE` lines) to the service manager. `Ok(false)` when
/// there is none (`NOTIFY_SOCKET` unset or empty). (The datagram itself, also with descriptors
/// for the fd store, is [`super::notify::notify`].)
pub fn notify(state: &str) -> io::Result<bool> {
    super::notify::notify(state, &[])
}

/// Sends `state`, logging (not returning) a failure: the service keeps running either way, and
/// systemd reports a missing READY=1 or watchdog ping itself.
fn notify_or_log(state: &str) {
    if let Err(e) = notify(state) {
        log::warn!("sd_notify ({}): {e}", state.lines().next().unwrap_or(""));
    }
}

/// One line of status text, cut to a sane length at a character boundary.
fn status_line(text: &str) -> &str {
    let line = text.lines().next().unwrap_or("");
    if line.len() <= STATUS_MAX {
        return line;
    }
    let mut end = STATUS_MAX;
    while !line.is_char_boundary(end) {
        end -= 1;
    }
    &line[..end]
}

/// Start-up is complete (`READY=1`), with a first status line.
pub fn ready(status: &str) {
    notify_or_log(&format!("READY=1\nSTATUS={}\n", status_line(status)));
}

/// A new status line (`STATUS=`), shown by `systemctl status`.
pub fn status(status: &str) {
    notify_or_log(&format!("STATUS={}\n", status_line(status)));
}

/// The service is shutting down (`STOPPING=1`).
pub fn stopping(status: &str) {
    notify_or_log(&format!("STOPPING=1\nSTATUS={}\n", status_line(status)));
}

/// Keep-alive ping for `WatchdogSec=` (`WATCHDOG=1`).
pub fn watchdog_ping() {
    notify_or_log("WATCHDOG=1\n");
}

/// The watchdog timeout systemd expects pings within, if it set one for this process
/// (`WATCHDOG_USEC`, and `WATCHDOG_PID` unset or our pid). Ping every half of it.
pub fn watchdog_interval() -> Option<Duration> {
    watchdog_from(
        std::env::var("WATCHDOG_USEC").ok().as_deref(),
        std::env::var("WATCHDOG_PID").ok().as_deref(),
        std::process::id(),
    )
}

/// [`watchdog_interval`] on given values (for tests).
fn watchdog_from(usec: Option<&str>, pid: Option<&str>, me: u32) -> Option<Duration> {
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok()? != me {
            return None; // meant for another process (e.g. our parent)
        }
    }
    let usec: u64 = usec?.trim().parse().ok()?;
    (usec > 0).then(|| Duration::from_micros(usec))
}

/// Keeps systemd's watchdog fed from an event loop: [`Watchdog::due`] says when the next ping
/// is needed, [`Watchdog::feed`] sends it if it is due.
#[derive(Debug)]
pub struct Watchdog {
    period: Duration,
    next: std::time::Instant,
}

impl Watchdog {
    /// A watchdog feeder if systemd asked for pings (see [`watchdog_interval`]); pings every
    /// half of the timeout, the first one at once.
    pub fn from_env(now: std::time::Instant) -> Option<Watchdog> {
        let timeout = watchdog_interval()?;
        Some(Watchdog { period: timeout / 2, next: now })
    }

    /// When the next ping is due.
    pub fn due(&self) -> std::time::Instant {
        self.next
    }

    /// Sends `WATCHDOG=1` if a ping is due at `now`.
    pub fn feed(&mut self, now: std::time::Instant) {
        if now >= self.next {
            watchdog_ping();
            self.next = now + self.period;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_watchdog_honours_pid_and_usec() {
        let s = Some("4000000");
        assert_eq!(watchdog_from(s, None, 7), Some(Duration::from_secs(4)));
        assert_eq!(watchdog_from(s, Some("7"), 7), Some(Duration::from_secs(4)));
        assert_eq!(watchdog_from(s, Some("8"), 7), None);
        assert_eq!(watchdog_from(s, Some("x"), 7), None);
        assert_eq!(watchdog_from(None, Some("7"), 7), None);
        assert_eq!(watchdog_from(Some("0"), None, 7), None);
        assert_eq!(watchdog_from(Some("soon"), None, 7), None);
    }

    #[test]
    fn test_status_is_one_bounded_line() {
        assert_eq!(status_line("a\nb"), "a");
        let long = "é".repeat(STATUS_MAX);
        let cut = status_line(&long);
        assert!(cut.len() <= STATUS_MAX && cut.chars().all(|c| c == 'é'));
    }
}
