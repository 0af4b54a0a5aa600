//! Human-readable one-line descriptions of Ethernet frames (etherparse), for debug logs of
//! frames the data path drops. Never on the per-frame path unless debug logging is on.

use std::fmt::Write as _;

use etherparse::{NetSlice, SlicedPacket, TransportSlice};

use crate::mac::Mac;

/// Describes `frame` as e.g. `02:..:01 > 02:..:02 IPv4 10.0.0.1 > 10.0.0.2 TCP 40000 > 22, 74 B`.
pub fn describe(frame: &[u8]) -> String {
    let mut s = String::new();
    if frame.len() >= 12 {
        let mut dst = [0u8; 6];
        let mut src = [0u8; 6];
        dst.copy_from_slice(&frame[0..6]);
        src.copy_from_slice(&frame[6..12]);
        let _ = write!(s, "{} > {}", Mac(src), Mac(dst));
    }
    match SlicedPacket::from_ethernet(frame) {
        Ok(p) => {
            match &p.net {
                Some(NetSlice::Ipv4(ip)) => {
                    let h = ip.header();
                    let _ = write!(s, " IPv4 {} > {}", h.source_addr(), h.destination_addr());
                }
                Some(NetSlice::Ipv6(ip)) => {
                    let h = ip.header();
                    let _ = write!(s, " IPv6 {} > {}", h.source_addr(), h.destination_addr());
                }
                Some(NetSlice::Arp(_)) => s.push_str(" ARP"),
                None => s.push_str(" (not IP)"),
            }
            match &p.transport {
                Some(TransportSlice::Tcp(t)) => {
                    let _ = write!(s, " TCP {} > {}", t.source_port(), t.destination_port());
                }
                Some(TransportSlice::Udp(u)) => {
                    let _ = write!(s, " UDP {} > {}", u.source_port(), u.destination_port());
                }
                Some(TransportSlice::Icmpv4(_)) => s.push_str(" ICMP"),
                Some(TransportSlice::Icmpv6(_)) => s.push_str(" ICMPv6"),
                Some(_) | None => {}
            }
        }
        Err(e) => {
            let _ = write!(s, " (unparsed: {e})");
        }
    }
    let _ = write!(s, ", {} B", frame.len());
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_describes_tcp_over_ipv4_and_garbage() {
        let mut f = Vec::new();
        etherparse::PacketBuilder::ethernet2([2, 0, 0, 0, 0, 1], [2, 0, 0, 0, 0, 2])
            .ipv4([10, 0, 0, 1], [10, 0, 0, 2], 64)
            .tcp(40000, 22, 1, 1000)
            .write(&mut f, b"hi")
            .unwrap();
        let d = describe(&f);
        assert!(
            d.starts_with(
                "02:00:00:00:00:01 > 02:00:00:00:00:02 IPv4 10.0.0.1 > 10.0.0.2 TCP 40000 > 22"
            ),
            "{d}"
        );
        let d = describe(&[1, 2, 3]);
        assert!(d.contains("unparsed") && d.ends_with("3 B"), "{d}");
    }
}
