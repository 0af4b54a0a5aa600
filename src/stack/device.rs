//! The rings as a smoltcp [`phy::Device`]: a stack peer is a member of the segment exactly like
//! an agent, with smoltcp in place of the TAP.
//!
//! Frames go through the agent's [`Datapath`] (switch, links, back-pressure, counters), so a
//! stack peer behaves on the segment like any other member. Copies are the least the token API
//! allows: a received frame is read out of the ring segments once, into a preallocated buffer
//! that smoltcp parses in place; a transmitted frame is written by smoltcp straight into the
//! data path's preallocated transmit buffer and pushed from there into the ring(s). Nothing is
//! allocated per frame.

use std::io;
use std::os::fd::RawFd;
use std::time::Instant;

use smoltcp::phy::{self, DeviceCapabilities, Medium};

use crate::agent::datapath::Datapath;
use crate::agent::tap::FrameIo;
use crate::doorbell::Notifier;
use crate::region::ring::{Consumer, Producer};

/// The local side of a stack peer's data path: there is no interface to read from or write to,
/// because smoltcp pulls and pushes frames through [`RingDevice`] instead.
pub struct NoInterface;

impl FrameIo for NoInterface {
    fn recv(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn recv_into_ring(
        &mut self,
        _prod: &Producer,
        _ranges: &[(usize, usize); 2],
        _iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }

    fn send_from_ring(
        &mut self,
        _cons: &Consumer,
        _vnet_hdr: &[u8],
        _iov: &mut Vec<libc::iovec>,
    ) -> io::Result<usize> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "a stack peer has no local interface"))
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// Frames moved by a [`RingDevice`] since it was created (local counters, not published).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct DeviceStats {
    /// Frames smoltcp received.
    pub rx_frames: u64,
    /// Frames smoltcp sent into the segment.
    pub tx_frames: u64,
    /// Frames smoltcp built while a frame was held back by back-pressure (discarded).
    pub tx_held_back: u64,
}

/// The rings of one member as a smoltcp Ethernet device.
pub struct RingDevice {
    dp: Datapath<NoInterface>,
    notifier: Box<dyn Notifier>,
    /// A received frame, read out of the ring once.
    rx_buf: Box<[u8]>,
    /// Where smoltcp writes a frame that cannot be sent (a reply built while the data path holds
    /// back a frame for a full ring).
    spare: Box<[u8]>,
    mtu: u32,
    now: Instant,
    stats: DeviceStats,
}

impl RingDevice {
    /// Wraps a data path that has joined the segment. `mtu` is the IP MTU (the data path's).
    pub fn new(dp: Datapath<NoInterface>, notifier: Box<dyn Notifier>, mtu: u32) -> Self {
        let max = dp.max_frame_len();
        RingDevice {
            dp,
            notifier,
            rx_buf: vec![0u8; max].into_boxed_slice(),
            spare: vec![0u8; max].into_boxed_slice(),
            mtu,
            now: Instant::now(),
            stats: DeviceStats::default(),
        }
    }

    /// The data path (links, counters, housekeeping).
    pub fn datapath(&mut self) -> &mut Datapath<NoInterface> {
        &mut self.dp
    }

    /// The data path and the notifier together (for the calls that take both).
    pub fn parts(&mut self) -> (&mut Datapath<NoInterface>, &mut dyn Notifier) {
        (&mut self.dp, self.notifier.as_mut())
    }

    /// Frames moved so far.
    pub fn stats(&self) -> DeviceStats {
        self.stats
    }

    /// Starts a round at `now` (the time the data path uses for this round's frames: switch
    /// ageing, back-pressure timeouts; read once per round rather than per frame), and sends the
    /// frame held back by back-pressure if its ring has room now: smoltcp counts that frame as
    /// sent, so it may have nothing more to transmit that would retry it.
    pub fn begin_round(&mut self, now: Instant) {
        self.now = now;
        self.dp.tx_ready(now);
    }

    /// Ends a round: hands consumed ring segments back to their producers, publishes queued
    /// frames and counters, and rings the doorbells of peers that wait.
    pub fn flush(&mut self) {
        self.dp.rx_flush(self.notifier.as_mut());
        self.dp.publish(self.notifier.as_mut());
    }
}

/// A received frame, already out of the ring.
pub struct RxToken<'a> {
    frame: &'a [u8],
}

impl phy::RxToken for RxToken<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        f(self.frame)
    }
}

/// The right to send one frame: smoltcp writes it into the data path's transmit buffer.
pub struct TxToken<'a> {
    dp: &'a mut Datapath<NoInterface>,
    spare: &'a mut [u8],
    stats: &'a mut DeviceStats,
    now: Instant,
}

impl phy::TxToken for TxToken<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        // A frame held back earlier goes first, if its ring has room now (a token handed out
        // with a received frame did not check).
        self.dp.tx_ready(self.now);
        if let Some(buf) = self.dp.tx_buffer(len) {
            let r = f(buf);
            self.dp.tx_commit(len, self.now);
            self.stats.tx_frames += 1;
            return r;
        }
        // Only a token handed out with a received frame gets here while a frame is still held
        // back (`transmit` refuses tokens then): the reply is built and dropped, as a full NIC
        // queue would drop it.
        self.dp.count_held_back_drop();
        self.stats.tx_held_back += 1;
        match self.spare.get_mut(..len) {
            Some(buf) => f(buf),
            // smoltcp never builds a frame larger than the MTU we report; should it, the frame
            // is built aside and dropped (cold path).
            None => f(&mut vec![0u8; len]),
        }
    }
}

impl phy::Device for RingDevice {
    type RxToken<'a> = RxToken<'a>;
    type TxToken<'a> = TxToken<'a>;

    fn receive(
        &mut self,
        _timestamp: smoltcp::time::Instant,
    ) -> Option<(Self::RxToken<'_>, Self::TxToken<'_>)> {
        let RingDevice { dp, notifier, rx_buf, spare, now, stats, .. } = self;
        let len = dp.rx_next(*now, notifier.as_mut(), |cons| cons.copy_frame(rx_buf))?;
        stats.rx_frames += 1;
        Some((RxToken { frame: &rx_buf[..len] }, TxToken { dp, spare, stats, now: *now }))
    }

    fn transmit(&mut self, _timestamp: smoltcp::time::Instant) -> Option<Self::TxToken<'_>> {
        if !self.dp.tx_ready(self.now) {
            return None; // back-pressure: smoltcp keeps the data and retries on a later poll
        }
        let RingDevice { dp, spare, now, stats, .. } = self;
        Some(TxToken { dp, spare, stats, now: *now })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        // smoltcp counts the Ethernet header (not the FCS) in the MTU of an Ethernet device.
        caps.max_transmission_unit = self.mtu as usize + 14;
        caps.max_burst_size = None;
        caps
    }
}
