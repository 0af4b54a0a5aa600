//! The agent: one event loop (mio) over the TAP, a poll timer, doorbells and signals, moving
//! frames between the local interface and the rings.
//!
//! Setup (may allocate, log and fail with context) is [`run`]; the per-frame work is in
//! [`datapath`].

pub mod datapath;
pub mod frame;
pub mod link;
mod service;
pub mod switch;
pub mod tap;

#[cfg(test)]
mod datapath_tests;

use std::io;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token};

use crate::config::AgentConfig;
use crate::doorbell::{NoDoorbells, Notifier, Wakeups, VECTOR_LINK};
use crate::region::{PeerKind, PeerState, Region};
use crate::sys::{SignalFd, TimerFd};
use datapath::{Datapath, DatapathError, DatapathOptions};
use link::{Claim, ClaimError};
use service::ServiceNotifier;
use tap::{Tap, TapError};

/// Why the agent could not start or stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// The TAP could not be created or configured.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// No peer slot.
    #[error(transparent)]
    Claim(#[from] ClaimError),
    /// The requested MTU does not fit the segment.
    #[error("--mtu {mtu} is larger than the segment's MTU {segment_mtu} (set when the region was created)")]
    MtuTooLarge {
        /// Requested MTU.
        mtu: u32,
        /// Region's MTU.
        segment_mtu: u32,
    },
    /// The event loop could not be set up.
    #[error("cannot set up the event loop: {what}")]
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
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(crate::control::ControlError),
}

fn evloop(what: &'static str) -> impl FnOnce(io::Error) -> AgentError {
    move |source| AgentError::EventLoop { what, source }
}

/// Without doorbells, how long after the last frame the poll interval starts to back off.
const POLL_BACKOFF_AFTER: Duration = Duration::from_millis(200);

const TOKEN_TAP: Token = Token(0);
const TOKEN_TIMER: Token = Token(1);
const TOKEN_SIGNAL: Token = Token(2);
const TOKEN_CONTROL: Token = Token(3);
const TOKEN_DOORBELL_BASE: usize = 16;

/// Releases a claimed slot if start-up fails before the data path takes it over.
struct ClaimGuard<'r> {
    region: &'r Region,
    claim: Claim,
    armed: bool,
}

impl Drop for ClaimGuard<'_> {
    fn drop(&mut self) {
        if self.armed {
            let slot = self.region.peer(self.claim.id);
            if slot.incarnation() == self.claim.incarnation {
                slot.set_state(PeerState::Left, self.claim.incarnation);
            }
        }
    }
}

/// Runs the agent on an attached region until SIGINT/SIGTERM. `assigned_id` is the peer id a
/// backend imposes (the doorbell server's, or IVPosition); it overrides the configured one.
pub fn run(
    region: Region,
    cfg: &AgentConfig,
    assigned_id: Option<u32>,
    mut wakeups: Option<Wakeups>,
) -> Result<(), AgentError> {
    // Block the termination signals before anything else so they are never lost.
    let signals = SignalFd::termination().map_err(evloop("signalfd"))?;
    let g = region.geometry();
    if cfg.mtu > g.mtu {
        return Err(AgentError::MtuTooLarge { mtu: cfg.mtu, segment_mtu: g.mtu });
    }
    let tap = Tap::create(&cfg.tap, cfg.offload)?;
    let claim = match assigned_id {
        // The doorbell server (or the device's IVPosition) decides: nobody else holds this id.
        Some(id) => link::claim_assigned(&region, id)?,
        None => link::claim(&region, cfg.peer_id, cfg.link_timeout)?,
    };
    let mut guard = ClaimGuard { region: &region, claim, armed: true };
    let mac = match cfg.mac {
        Some(m) => m,
        None => {
            let features = tap::FrameIo::offloads(&tap).unwrap_or_default().bits();
            let (m, why) =
                crate::mac::default_for_member(&region, claim.id, &cfg.tap, cfg.mtu, features);
            log::info!("MAC {m} {why}");
            m
        }
    };
    tap.set_mac(mac.0)?;
    tap.set_mtu(cfg.mtu)?;
    for a in &cfg.addresses {
        tap.add_address(a.addr, a.prefix)?;
    }
    tap.set_up(true)?;
    let opts = DatapathOptions {
        mtu: cfg.mtu,
        link_timeout: cfg.link_timeout,
        pin_macs: cfg.pin_macs,
        trust_peer_checksums: cfg.trust_peer_checksums,
        ..DatapathOptions::default()
    };
    let tap_fd = tap::FrameIo::raw_fd(&tap).expect("a real TAP has a descriptor");
    let offloads = tap::FrameIo::offloads(&tap);
    let tap_name = tap.name().to_string();
    let mut dp = Datapath::join(region.clone(), claim, tap, mac.0, PeerKind::Agent, opts);
    guard.armed = false;
    let trust = dp.trusts_peer_checksums();
    if cfg.trust_peer_checksums && !trust {
        log::warn!(
            "--trust-peer-checksums has no effect: {tap_name} takes no partial checksums \
             (offloads off); peers keep sending complete ones"
        );
    }
    log::info!(
        target: crate::NOTICE,
        "joined {} as peer {} (incarnation {}): {} up, MAC {} MTU {} offloads {}{}{}",
        region.name(),
        claim.id,
        claim.incarnation,
        tap_name,
        mac,
        cfg.mtu,
        offloads.map_or_else(|| "off".to_string(), |f| f.to_string()),
        if trust { ", trusting peers' checksums" } else { "" },
        cfg.addresses.iter().map(|a| format!(" {a}")).collect::<String>()
    );
    let who = format!("peer {} on {} ({tap_name})", claim.id, region.name());
    // The control socket (`ivnet status` asks it) and the address publisher (issue 8).
    let backend = match &cfg.backend {
        crate::config::BackendChoice::File { path, .. } => format!("file {}", path.display()),
        crate::config::BackendChoice::Server { socket } => format!("server {}", socket.display()),
        crate::config::BackendChoice::Pci { spec, .. } => {
            let dev = match spec {
                crate::backend::pci::DeviceSpec::Auto => "auto".to_string(),
                crate::backend::pci::DeviceSpec::Address(a) => a.clone(),
            };
            let how = if wakeups.as_ref().is_some_and(|w| !w.own.is_empty()) {
                "vfio (MSI-X)"
            } else {
                "sysfs (polling)"
            };
            format!("{how} device {dev}")
        }
    };
    let identity = crate::control::AgentIdentity {
        tap: tap_name.clone(),
        claim,
        backend,
        mac: mac.0,
        mtu: cfg.mtu,
        offloads,
    };
    let mut control = match crate::control::Control::start(
        cfg.control_socket.as_deref(),
        region.clone(),
        identity,
    ) {
        Ok(c) => c,
        Err(e) => {
            dp.leave();
            return Err(AgentError::Control(e));
        }
    };
    let result = event_loop(&mut dp, tap_fd, &signals, cfg, &mut wakeups, &who, &mut control);
    drop(control);
    crate::sys::sd::stopping(&format!("{who}: leaving"));
    dp.leave();
    if let Some(w) = wakeups.as_mut() {
        dp.announce_link_change(w.notifier.as_mut());
    }
    match &result {
        Ok(()) => log::info!("left {} (peer {}), removed {}", region.name(), claim.id, tap_name),
        Err(e) => log::error!("stopping: {e}"),
    }
    result
}

fn event_loop(
    dp: &mut Datapath<Tap>,
    tap_fd: RawFd,
    signals: &SignalFd,
    cfg: &AgentConfig,
    wakeups: &mut Option<Wakeups>,
    who: &str,
    control: &mut crate::control::Control,
) -> Result<(), AgentError> {
    use std::os::fd::AsRawFd;
    let mut poll = Poll::new().map_err(evloop("epoll"))?;
    let reg = poll.registry();
    reg.register(&mut SourceFd(&tap_fd), TOKEN_TAP, Interest::READABLE)
        .map_err(evloop("register the TAP"))?;
    reg.register(&mut SourceFd(&signals.as_raw_fd()), TOKEN_SIGNAL, Interest::READABLE)
        .map_err(evloop("register signals"))?;
    let timer = TimerFd::new().map_err(evloop("timerfd"))?;
    reg.register(&mut SourceFd(&timer.as_raw_fd()), TOKEN_TIMER, Interest::READABLE)
        .map_err(evloop("register the timer"))?;
    let mut no_doorbells = NoDoorbells;
    let spin = wakeups.as_ref().map_or(Duration::ZERO, |w| w.spin);
    if let Some(w) = wakeups.as_mut() {
        for (i, e) in w.own.iter().enumerate() {
            reg.register(
                &mut SourceFd(&e.as_raw_fd()),
                Token(TOKEN_DOORBELL_BASE + i),
                Interest::READABLE,
            )
            .map_err(evloop("register a doorbell"))?;
        }
        if let Some((fd, _)) = &w.control {
            reg.register(&mut SourceFd(fd), TOKEN_CONTROL, Interest::READABLE)
                .map_err(evloop("register the control socket"))?;
        }
    }
    control.register(reg).map_err(evloop("register the status socket"))?;
    // Without doorbells of our own nobody can wake us: poll the rings (we may still ring others).
    let polling = wakeups.as_ref().is_none_or(|w| w.own.is_empty());
    if polling {
        timer.set_periodic(Some(cfg.poll)).map_err(evloop("arm the poll timer"))?;
    }
    if let Some(w) = wakeups.as_mut() {
        // Tell everyone to look at the peer table now rather than at their next heartbeat.
        dp.announce_link_change(w.notifier.as_mut());
    }
    // systemd: READY=1, STATUS= with the peers up, WATCHDOG=1 (see service.rs).
    let mut service = ServiceNotifier::ready(who.to_string(), dp.links(), Instant::now());
    let mut events = Events::with_capacity(64);
    let mut left = Vec::with_capacity(8);
    let mut last_work = Instant::now();
    let mut sleeping = false;
    let mut poll_interval = cfg.poll;
    loop {
        let now = Instant::now();
        let notifier: &mut dyn Notifier = match wakeups.as_mut() {
            Some(w) => w.notifier.as_mut(),
            None => &mut no_doorbells,
        };
        let next_hk = dp.housekeeping(now)?;
        service.tick(dp.links(), now);
        control.tick(now, poll.registry(), dp.claim());
        let work = dp.tx_ringing(now, notifier) + dp.rx(now, notifier);
        dp.publish(notifier);
        if work > 0 {
            last_work = now;
        }
        if polling {
            // Polling: fast while there is traffic, backing off to --poll-idle-us when idle so
            // an idle agent costs little CPU. Re-armed only when the interval changes.
            let want = if now.duration_since(last_work) < POLL_BACKOFF_AFTER {
                cfg.poll
            } else {
                (poll_interval * 2).min(cfg.poll_idle.max(cfg.poll))
            };
            if want != poll_interval {
                poll_interval = want;
                timer.set_periodic(Some(poll_interval)).map_err(evloop("arm the poll timer"))?;
            }
        }
        let timeout = if work > 0 || dp.tap_backlog() {
            Some(Duration::ZERO)
        } else if !polling {
            if dp.is_blocked() {
                // Waiting for ring space: the consumer rings us when it frees some, but poll
                // too in case it is an older peer that does not.
                Some(Duration::from_millis(1))
            } else if now.duration_since(last_work) < spin {
                if dp.rx_pending() {
                    dp.count_doorbell(crate::region::layout::DoorbellCounter::SpinsWithWork);
                } else {
                    // Spinning must not starve the application we are waiting for: on a busy
                    // host two spinning agents can hold every CPU (measured: a one-way trip then
                    // took the whole spin window; with the yield, a quarter of it).
                    std::thread::yield_now();
                }
                Some(Duration::ZERO)
            } else if dp.prepare_to_sleep() {
                Some(Duration::ZERO)
            } else {
                sleeping = true;
                let until_hk = next_hk.saturating_duration_since(now);
                // Peers that cannot ring us are polled for (see the README: server restarts).
                Some(if dp.polls_for_unringable_peers() {
                    until_hk.min(cfg.poll_idle)
                } else {
                    until_hk
                })
            }
        } else if now.duration_since(last_work) < cfg.spin {
            // Polling without doorbells: right after activity keep looking instead of waiting
            // for the poll timer, as with doorbells (a bulk stream otherwise waits up to a poll
            // interval between bursts, and a request/response a whole interval per hop).
            if !dp.rx_pending() {
                std::thread::yield_now();
            }
            Some(Duration::ZERO)
        } else {
            Some(next_hk.saturating_duration_since(now))
        };
        // Sleep no longer than the next watchdog ping.
        let timeout = match service.wake_by() {
            Some(by) => timeout.map(|t| t.min(by.saturating_duration_since(now))),
            None => timeout,
        };
        match poll.poll(&mut events, timeout) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(evloop("epoll_wait")(e)),
        }
        if sleeping {
            sleeping = false;
            dp.wake();
            let rung = events.iter().any(|e| e.token().0 >= TOKEN_DOORBELL_BASE);
            if rung {
                dp.count_doorbell(crate::region::layout::DoorbellCounter::Wakeups);
            }
        }
        for ev in events.iter() {
            match ev.token() {
                TOKEN_TAP => dp.set_tap_readable(),
                TOKEN_TIMER => {
                    timer.drain();
                }
                TOKEN_SIGNAL => {
                    if let Some(sig) = signals.read() {
                        log::info!("signal {sig}: leaving the segment");
                        return Ok(());
                    }
                }
                TOKEN_CONTROL => {
                    if let Some(w) = wakeups.as_mut() {
                        if let Some((_, on_control)) = w.control.as_mut() {
                            left.clear();
                            if let Err(e) = on_control(&mut left) {
                                return Err(AgentError::EventLoop {
                                    what: "doorbell server connection",
                                    source: e,
                                });
                            }
                            for &id in &left {
                                dp.peer_left(id);
                            }
                        }
                    }
                }
                t if crate::control::Control::owns(t) => {
                    control.handle(t, poll.registry(), dp.links());
                }
                Token(t) if t >= TOKEN_DOORBELL_BASE => {
                    let vector = t - TOKEN_DOORBELL_BASE;
                    if let Some(e) = wakeups.as_ref().and_then(|w| w.own.get(vector)) {
                        e.drain();
                    }
                    if vector == VECTOR_LINK as usize {
                        dp.force_housekeeping();
                    }
                }
                _ => {}
            }
        }
    }
}
