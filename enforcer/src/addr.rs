//! Address encoding shared with the kernel: 16 bytes, network order, IPv4 mapped, held as
//! four native-endian words ([`enforcer_common::Addr`]).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use enforcer_common::Addr;

/// Map key for an address (IPv4 as `::ffff:a.b.c.d`).
#[must_use]
pub fn key(ip: IpAddr) -> Addr {
    let b = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped().octets(),
        IpAddr::V6(v6) => v6.octets(),
    };
    let w = |i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    [w(0), w(4), w(8), w(12)]
}

/// Inverse of [`key`].
#[must_use]
pub fn from_key(k: Addr) -> IpAddr {
    let mut b = [0u8; 16];
    for (i, w) in k.iter().enumerate() {
        b[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
    }
    let v6 = Ipv6Addr::from(b);
    match v6.to_ipv4_mapped() {
        Some(v4) => IpAddr::V4(v4),
        None => IpAddr::V6(v6),
    }
}

/// LPM prefix length in the 128-bit key space for a prefix of `len` bits of `ip`'s family.
#[must_use]
pub fn lpm_len(ip: IpAddr, len: u8) -> u32 {
    match ip {
        IpAddr::V4(_) => 96 + u32::from(len.min(32)),
        IpAddr::V6(_) => u32::from(len.min(128)),
    }
}

/// `ip` with every bit after `len` cleared.
#[must_use]
pub fn mask(ip: IpAddr, len: u8) -> IpAddr {
    match ip {
        IpAddr::V4(v4) => {
            let m = if len == 0 { 0 } else { u32::MAX << (32 - u32::from(len.min(32))) };
            IpAddr::V4(Ipv4Addr::from(u32::from(v4) & m))
        }
        IpAddr::V6(v6) => {
            let m = if len == 0 { 0 } else { u128::MAX << (128 - u32::from(len.min(128))) };
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & m))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn v4_round_trips_through_mapped_form() {
        let ip: IpAddr = "10.1.2.3".parse().unwrap();
        let k = key(ip);
        assert_eq!(&k[..3], &[0, 0, enforcer_common::V4_MAPPED_WORD]);
        assert_eq!(k[3].to_ne_bytes(), [10, 1, 2, 3]);
        assert_eq!(from_key(k), ip);
        let v6: IpAddr = "fd00::7".parse().unwrap();
        assert_eq!(from_key(key(v6)), v6);
    }

    #[test]
    fn mask_clears_host_bits() {
        assert_eq!(mask("10.1.2.3".parse().unwrap(), 16), "10.1.0.0".parse::<IpAddr>().unwrap());
        assert_eq!(mask("fd00::ff".parse().unwrap(), 120), "fd00::".parse::<IpAddr>().unwrap());
        assert_eq!(lpm_len("10.0.0.0".parse().unwrap(), 8), 104);
    }
}
