//! MAC addresses: parsing, printing and the stable default derived from a peer id.

use std::fmt;
use std::str::FromStr;

/// An Ethernet MAC address.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Mac(pub [u8; 6]);

/// Why a MAC address string was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MacError {
    /// Not six hex pairs separated by colons.
    #[error("MAC address {0:?} is not six hex byte pairs like 02:00:00:00:00:01")]
    Syntax(String),
    /// A group (multicast) address cannot belong to an interface.
    #[error("MAC address {0} is a multicast address (lowest bit of the first byte set)")]
    Multicast(String),
    /// All zeros.
    #[error("MAC address 00:00:00:00:00:00 is not a usable address")]
    Zero,
}

impl Mac {
    /// The broadcast address.
    pub const BROADCAST: Mac = Mac([0xff; 6]);

    /// The stable, locally administered unicast MAC of peer `peer_id`: `02:69:76:6e:HH:LL`
    /// ("ivn" and the id), so the same peer id always gets the same MAC.
    pub fn for_peer(peer_id: u32) -> Mac {
        let [_, _, hi, lo] = peer_id.to_be_bytes();
        Mac([0x02, 0x69, 0x76, 0x6e, hi, lo])
    }

    /// Whether the group (multicast/broadcast) bit is set.
    pub fn is_multicast(&self) -> bool {
        self.0[0] & 1 == 1
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(f, "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}", m[0], m[1], m[2], m[3], m[4], m[5])
    }
}

impl FromStr for Mac {
    type Err = MacError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let parts: Vec<&str> = s.split([':', '-']).collect();
        if parts.len() != 6 {
            return Err(MacError::Syntax(s.into()));
        }
        let mut m = [0u8; 6];
        for (b, p) in m.iter_mut().zip(&parts) {
            if p.len() != 2 {
                return Err(MacError::Syntax(s.into()));
            }
            *b = u8::from_str_radix(p, 16).map_err(|_| MacError::Syntax(s.into()))?;
        }
        let mac = Mac(m);
        if mac.is_multicast() {
            return Err(MacError::Multicast(s.into()));
        }
        if m == [0; 6] {
            return Err(MacError::Zero);
        }
        Ok(mac)
    }
}

/// Serialises a MAC as "aa:bb:cc:dd:ee:ff" (for `status --json`).
pub fn serialize<S: serde::Serializer>(m: &[u8; 6], s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&Mac(*m))
}

/// Reads a MAC written by [`serialize`] (the status an agent sends over its control socket).
pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<[u8; 6], D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    // Any six hex pairs, including addresses a MAC flag would refuse: this is a report.
    let parts: Vec<&str> = s.split(':').collect();
    let mut m = [0u8; 6];
    if parts.len() != 6 {
        return Err(serde::de::Error::custom(format!("{s:?} is not a MAC address")));
    }
    for (b, p) in m.iter_mut().zip(&parts) {
        *b = u8::from_str_radix(p, 16)
            .map_err(|_| serde::de::Error::custom(format!("{s:?} is not a MAC address")))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn test_parse_and_print_round_trip() {
        let m: Mac = "02:AB:cd:00:01:ff".parse().unwrap();
        assert_eq!(m.to_string(), "02:ab:cd:00:01:ff");
    }

    #[test]
    fn test_bad_macs_are_refused() {
        assert!(matches!("02:00:00:00:00".parse::<Mac>(), Err(MacError::Syntax(_))));
        assert!(matches!("02:00:00:00:00:0g".parse::<Mac>(), Err(MacError::Syntax(_))));
        assert!(matches!("01:00:5e:00:00:01".parse::<Mac>(), Err(MacError::Multicast(_))));
        assert!(matches!("00:00:00:00:00:00".parse::<Mac>(), Err(MacError::Zero)));
    }

    #[test]
    fn test_default_macs_are_local_unicast_and_distinct() {
        let a = Mac::for_peer(0);
        let b = Mac::for_peer(1);
        assert_ne!(a, b);
        assert_eq!(a.0[0] & 0b11, 0b10);
        assert_eq!(Mac::for_peer(7), Mac::for_peer(7));
    }
}
