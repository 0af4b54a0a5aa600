//! How a member reaches a region and its doorbells. Each backend yields a [`Region`] (and, where
//! it has them, doorbells); the agent and the stack never see a file, a socket or a PCI device.
//!
//! - `file`: a shared file, polled.
//! - `server_client`: a host process joins through `ivnet server`, like QEMU.
//! - `vfio`: in a guest, the ivshmem PCI device through vfio-pci, with MSI-X doorbells.
//! - `sysfs`: in a guest, the same device through sysfs resource files, polled.

pub mod file;
pub mod pci;
pub mod server_client;
pub mod sysfs;
pub mod vfio;

use std::io;
use std::time::Duration;

use crate::doorbell::{Notifier, Wakeups};
use crate::region::{GeometryRequest, PeerState, Region};
use pci::{DeviceSpec, IvshmemDevice, PciError, REG_DOORBELL};

/// 32-bit device registers (the ivshmem BAR0).
pub trait Registers {
    /// Reads the register at byte offset `off`.
    fn read_u32(&self, off: u64) -> io::Result<u32>;
    /// Writes the register at byte offset `off`.
    fn write_u32(&self, off: u64, v: u32) -> io::Result<()>;
}

/// Rings peers through the ivshmem Doorbell register: `id << 16 | vector` (QEMU delivers it
/// to that peer's MSI-X vector), where `id` is the doorbell id the server paired with the
/// peer's slot.
///
/// The pairing is read from the region, which every member can write, so it is read once per
/// incarnation of the peer and kept (issue 11, finding 4): overwriting a peer's doorbell id
/// afterwards does not redirect its doorbells. A new incarnation (the slot changed hands, and the
/// server paired it anew) reads it again. An id out of the register's range, or our own, is
/// never rung.
pub struct DoorbellRegister<R: Registers> {
    registers: R,
    region: Region,
    vectors: u16,
    own_id: Option<u32>,
    /// Per slot: the incarnation the target was read under, and the target.
    targets: Vec<Option<(u64, Option<u32>)>>,
}

impl<R: Registers> DoorbellRegister<R> {
    /// Rings through `registers` (BAR0) the peers of `region`. `vectors` is the number of
    /// vectors per member (the server gives every member the same number): with fewer than two,
    /// data doorbells go to the last one, since QEMU ignores a ring on a missing vector.
    /// `own_id` is our own doorbell id (IVPosition), never a target.
    pub fn new(registers: R, region: Region, vectors: u16, own_id: Option<u32>) -> Self {
        let slots = region.geometry().max_peers as usize;
        DoorbellRegister { registers, region, vectors, own_id, targets: vec![None; slots] }
    }

    /// The doorbell id of slot `peer` for its current incarnation, read from the region only
    /// when the incarnation changed since the last call.
    fn target(&mut self, peer: u32) -> Option<u32> {
        let cached = self.targets.get_mut(peer as usize)?;
        let slot = self.region.peer(peer);
        let incarnation = slot.incarnation();
        match cached {
            Some((inc, id)) if *inc == incarnation => *id,
            _ => {
                let id = slot
                    .doorbell_id()
                    .filter(|&id| id <= MAX_DOORBELL_ID && Some(id) != self.own_id);
                *cached = Some((incarnation, id));
                id
            }
        }
    }
}

/// Largest peer id the Doorbell register can address (16 bits).
const MAX_DOORBELL_ID: u32 = 0xffff;

impl<R: Registers> Notifier for DoorbellRegister<R> {
    fn notify(&mut self, peer: u32, vector: u16) -> bool {
        let vector = vector.min(self.vectors.saturating_sub(1));
        match self.target(peer) {
            Some(id) => self.registers.write_u32(REG_DOORBELL, (id << 16) | vector as u32).is_ok(),
            None => false,
        }
    }
}

/// A member reached through the ivshmem PCI device.
pub struct PciMember {
    /// The region (BAR2).
    pub region: Region,
    /// The peer slot the device imposes (the slot the server paired with the device's
    /// IVPosition, for an ivshmem-doorbell), if any.
    pub assigned_id: Option<u32>,
    /// Doorbells, when MSI-X works (VFIO); `None` means poll.
    pub wakeups: Option<Wakeups>,
    /// Which backend was used, for logs: "vfio (MSI-X)", "vfio (polling)", "sysfs (polling)".
    pub backend: &'static str,
}

/// Why no PCI backend could be used.
#[derive(Debug, thiserror::Error)]
pub enum PciBackendError {
    /// Finding the device failed.
    #[error(transparent)]
    Pci(#[from] PciError),
    /// Both VFIO and sysfs failed.
    #[error("cannot use the ivshmem device through VFIO ({vfio}) nor through sysfs")]
    Sysfs {
        /// Why VFIO was not used.
        vfio: String,
        /// Why sysfs failed.
        #[source]
        source: sysfs::SysfsError,
    },
}

/// Opens the ivshmem device `spec`: through VFIO with MSI-X doorbells when possible (binding it
/// to vfio-pci if `bind`), else through sysfs, polling. The fallback is logged with its reason.
pub fn open_pci(
    spec: &DeviceSpec,
    bind: bool,
    req: &GeometryRequest,
    spin: Duration,
) -> Result<PciMember, PciBackendError> {
    let mut dev = IvshmemDevice::find(spec)?;
    let kind = if dev.is_doorbell() { "ivshmem-doorbell" } else { "ivshmem-plain" };
    log::info!(
        "found {kind} at {} (BAR2 {} bytes, driver {:?})",
        dev.addr,
        dev.bars[2].len,
        dev.driver
    );
    let vfio_reason = match dev.ensure_vfio(bind) {
        Ok(group) => match vfio::VfioDevice::open(&dev, group, req, 2) {
            Ok(v) => {
                let region = v.region.clone();
                let own_id = dev.is_doorbell().then(|| v.ivposition());
                let assigned_id = slot_for(&region, own_id);
                let backend =
                    if v.vectors.is_empty() { "vfio (polling, no MSI-X)" } else { "vfio (MSI-X)" };
                // Without MSI-X we poll but can still ring peers that sleep on theirs.
                // Without MSI-X we cannot tell how many vectors the device has: assume ivnet's 2.
                let vectors = if v.vectors.is_empty() { 2 } else { v.vectors.len() as u16 };
                let wakeups = dev.is_doorbell().then(|| Wakeups {
                    own: v.vectors,
                    notifier: Box::new(DoorbellRegister::new(
                        v.registers,
                        region.clone(),
                        vectors,
                        own_id,
                    )),
                    spin,
                    control: None,
                });
                return Ok(PciMember { region, assigned_id, wakeups, backend });
            }
            Err(vfio::VfioError::Region(e)) => {
                return Err(PciBackendError::Sysfs {
                    vfio: "the region is unusable".into(),
                    source: sysfs::SysfsError::Region(e),
                })
            }
            Err(e) => error_chain(&e),
        },
        Err(e) => error_chain(&e),
    };
    log::warn!(
        "VFIO unavailable: {vfio_reason}; falling back to sysfs (polling, no doorbell wake-ups)"
    );
    let s = sysfs::SysfsDevice::open(&dev, req)
        .map_err(|source| PciBackendError::Sysfs { vfio: vfio_reason.clone(), source })?;
    let own_id = dev.is_doorbell().then(|| s.ivposition());
    let assigned_id = slot_for(&s.region, own_id);
    // We get no interrupts, but can still ring peers that sleep on theirs.
    let wakeups = dev.is_doorbell().then(|| Wakeups {
        own: Vec::new(),
        notifier: Box::new(DoorbellRegister::new(s.registers, s.region.clone(), 2, own_id)),
        spin,
        control: None,
    });
    Ok(PciMember { region: s.region, assigned_id, wakeups, backend: "sysfs (polling)" })
}

/// The slot the doorbell server paired with our own doorbell id `id`. The server writes the
/// pairing before it tells anyone the id, but any member may have copied the id into other
/// slots (ids count up, so they can be guessed): a unique match is taken; among several, the
/// first one no live member holds (its state is not Up), with a warning.
pub fn own_slot(region: &Region, id: u32) -> Option<u32> {
    let max = region.geometry().max_peers;
    let found: Vec<u32> = (0..max).filter(|&s| region.peer(s).doorbell_id() == Some(id)).collect();
    match found.as_slice() {
        [] => None,
        [s] => Some(*s),
        many => {
            let pick = many
                .iter()
                .copied()
                .find(|&s| region.peer(s).state() != PeerState::Up)
                .or(many.first().copied());
            log::warn!(
                "doorbell id {id} is paired with several peer slots {many:?} (a member wrote \
                 the peer table?): taking slot {pick:?}, which no live member holds"
            );
            pick
        }
    }
}

/// The slot the doorbell server paired with this device's IVPosition. Without a pairing (a
/// region not served by `ivnet server`) the agent claims a free slot itself.
fn slot_for(region: &Region, ivposition: Option<u32>) -> Option<u32> {
    let id = ivposition?;
    let slot = own_slot(region, id);
    match slot {
        Some(s) => log::info!("IVPosition {id} is peer slot {s}"),
        None => log::warn!(
            "IVPosition {id} is not paired with a peer slot in the region (not an ivnet server?); \
             claiming a free slot instead"
        ),
    }
    slot
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(c) = src {
        s.push_str(": ");
        s.push_str(&c.to_string());
        src = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::HeapMemory;
    use std::cell::RefCell;
    use std::rc::Rc;
    use std::sync::Arc;

    /// BAR0 that records every write.
    #[derive(Clone, Default)]
    struct Recorder(Rc<RefCell<Vec<(u64, u32)>>>);

    impl Registers for Recorder {
        fn read_u32(&self, _off: u64) -> io::Result<u32> {
            Ok(0)
        }
        fn write_u32(&self, off: u64, v: u32) -> io::Result<()> {
            self.0.borrow_mut().push((off, v));
            Ok(())
        }
    }

    impl Recorder {
        fn take(&self) -> Vec<(u64, u32)> {
            std::mem::take(&mut self.0.borrow_mut())
        }
    }

    fn region() -> Region {
        let req = GeometryRequest { max_peers: Some(4), ..Default::default() };
        Region::attach(Arc::new(HeapMemory::new(4 << 20)), "t", &req).unwrap()
    }

    /// Finding 4 of issue 11: a member that overwrites a peer's doorbell id in the region does
    /// not redirect that peer's doorbells; a new incarnation of the peer is paired anew.
    #[test]
    fn test_doorbell_target_is_read_once_per_incarnation() {
        let r = region();
        let regs = Recorder::default();
        let mut n = DoorbellRegister::new(regs.clone(), r.clone(), 2, Some(9));
        r.peer(1).set_doorbell_id(Some(5));
        let inc = r.peer(1).incarnation();
        r.peer(1).try_claim(inc).unwrap();
        assert!(n.notify(1, 1));
        assert_eq!(regs.take(), vec![(REG_DOORBELL, 5 << 16 | 1)]);
        // A hostile member points peer 1's doorbell at peer 7.
        r.peer(1).set_doorbell_id(Some(7));
        assert!(n.notify(1, 1));
        assert!(n.notify(1, 0));
        assert_eq!(regs.take(), vec![(REG_DOORBELL, 5 << 16 | 1), (REG_DOORBELL, 5 << 16)]);
        // The slot changes hands (new incarnation): its new pairing is used.
        let inc = r.peer(1).incarnation();
        r.peer(1).try_claim(inc).unwrap();
        assert!(n.notify(1, 1));
        assert_eq!(regs.take(), vec![(REG_DOORBELL, 7 << 16 | 1)]);
    }

    /// A member that copies a newcomer's (guessable) doorbell id into its own, live slot does not
    /// make the newcomer take that slot.
    #[test]
    fn test_own_slot_prefers_the_slot_no_live_member_holds() {
        let r = region();
        assert_eq!(own_slot(&r, 5), None);
        r.peer(2).set_doorbell_id(Some(5));
        assert_eq!(own_slot(&r, 5), Some(2));
        let inc = r.peer(0).incarnation();
        let inc = r.peer(0).try_claim(inc).unwrap();
        r.peer(0).set_state(PeerState::Up, inc);
        r.peer(0).set_doorbell_id(Some(5));
        assert_eq!(own_slot(&r, 5), Some(2));
    }

    #[test]
    fn test_own_and_out_of_range_doorbell_ids_are_never_rung() {
        let r = region();
        let regs = Recorder::default();
        let mut n = DoorbellRegister::new(regs.clone(), r.clone(), 2, Some(9));
        for (slot, id) in [(1, Some(9)), (2, Some(0x1_0000)), (3, None)] {
            r.peer(slot).set_doorbell_id(id);
            assert!(!n.notify(slot, 1), "slot {slot} with doorbell id {id:?} was rung");
        }
        // A slot id beyond the table (not a peer) is not rung either.
        assert!(!n.notify(4, 1));
        assert!(regs.take().is_empty());
        // One vector only: data doorbells go to vector 0.
        let mut one = DoorbellRegister::new(regs.clone(), r.clone(), 1, None);
        r.peer(1).set_doorbell_id(Some(3));
        assert!(one.notify(1, 1));
        assert_eq!(regs.take(), vec![(REG_DOORBELL, 3 << 16)]);
    }
}
