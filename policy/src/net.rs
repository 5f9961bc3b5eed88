//! IPv4/IPv6 networks in CIDR notation, as used by `ipBlock`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

/// Why a CIDR string or network could not be built.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IpNetworkError {
    /// No `/prefix` part.
    #[error("`{0}` is not in CIDR notation (expected address/prefix, e.g. 10.0.0.0/8)")]
    MissingPrefix(String),
    /// The address part is not an IPv4 or IPv6 address.
    #[error("`{0}` is not a valid IP address")]
    InvalidAddress(String),
    /// The prefix part is not a decimal number.
    #[error("`{0}` is not a valid prefix length")]
    InvalidPrefix(String),
    /// The prefix is longer than the address (32 for IPv4, 128 for IPv6).
    #[error("prefix length {prefix} exceeds {max} for this address family")]
    PrefixTooLong {
        /// Prefix given.
        prefix: u8,
        /// Longest prefix of the address family.
        max: u8,
    },
}

/// An IP network: an address with its host bits cleared and a prefix length.
///
/// Host bits are masked on construction (`10.1.2.3/16` is `10.1.0.0/16`), which is how upstream
/// treats `ipBlock.cidr`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpNetwork {
    addr: IpAddr,
    prefix: u8,
}

impl IpNetwork {
    /// Builds the network `addr/prefix`, clearing host bits of `addr`.
    pub fn new(addr: IpAddr, prefix: u8) -> Result<Self, IpNetworkError> {
        let max = max_prefix(addr);
        if prefix > max {
            return Err(IpNetworkError::PrefixTooLong { prefix, max });
        }
        Ok(IpNetwork { addr: mask(addr, prefix), prefix })
    }

    /// The network address (host bits cleared).
    #[must_use]
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// Prefix length.
    #[must_use]
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    /// Whether this is an IPv4 network.
    #[must_use]
    pub fn is_ipv4(&self) -> bool {
        self.addr.is_ipv4()
    }

    /// Whether `ip` is inside the network. Addresses of the other family are never inside.
    #[must_use]
    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.addr.is_ipv4() && mask(ip, self.prefix) == self.addr
    }

    /// Whether `other` is entirely inside this network (equal networks included).
    #[must_use]
    pub fn contains_net(&self, other: &IpNetwork) -> bool {
        other.prefix >= self.prefix && self.contains(other.addr)
    }
}

fn max_prefix(addr: IpAddr) -> u8 {
    if addr.is_ipv4() { 32 } else { 128 }
}

fn mask(addr: IpAddr, prefix: u8) -> IpAddr {
    match addr {
        IpAddr::V4(v4) => {
            let bits = u32::from(v4);
            let kept = if prefix == 0 { 0 } else { bits & (u32::MAX << (32 - u32::from(prefix.min(32)))) };
            IpAddr::V4(Ipv4Addr::from(kept))
        }
        IpAddr::V6(v6) => {
            let bits = u128::from(v6);
            let kept = if prefix == 0 { 0 } else { bits & (u128::MAX << (128 - u32::from(prefix.min(128)))) };
            IpAddr::V6(Ipv6Addr::from(kept))
        }
    }
}

impl fmt::Display for IpNetwork {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix)
    }
}

impl FromStr for IpNetwork {
    type Err = IpNetworkError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, prefix) = s.split_once('/').ok_or_else(|| IpNetworkError::MissingPrefix(s.to_owned()))?;
        let addr: IpAddr = addr.parse().map_err(|_| IpNetworkError::InvalidAddress(addr.to_owned()))?;
        if prefix.is_empty() || prefix.len() > 3 || !prefix.bytes().all(|b| b.is_ascii_digit()) {
            return Err(IpNetworkError::InvalidPrefix(prefix.to_owned()));
        }
        let prefix: u8 = prefix.parse().map_err(|_| IpNetworkError::InvalidPrefix(prefix.to_owned()))?;
        IpNetwork::new(addr, prefix)
    }
}
