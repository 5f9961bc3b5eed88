//! Frame builder for test runs: Ethernet + IPv4/IPv6 (+ extension headers) + L4.
//! Checksums are left zero: the data plane does not verify them.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_P_IP: u16 = 0x0800;
pub const ETH_P_IPV6: u16 = 0x86DD;
pub const ETH_P_ARP: u16 = 0x0806;

pub const TCP: u8 = 6;
pub const UDP: u8 = 17;
pub const SCTP: u8 = 132;
pub const ICMP: u8 = 1;
pub const ICMPV6: u8 = 58;

#[must_use]
pub fn eth(proto: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x02, 0, 0, 0, 0, 2, 0x02, 0, 0, 0, 0, 1];
    f.extend_from_slice(&proto.to_be_bytes());
    f.extend_from_slice(payload);
    f
}

/// IPv4 header + payload; `frag` is the raw flags/fragment-offset field.
#[must_use]
pub fn ipv4(src: Ipv4Addr, dst: Ipv4Addr, proto: u8, payload: &[u8], frag: u16) -> Vec<u8> {
    let total = u16::try_from(20 + payload.len()).expect("small packet");
    let mut h = vec![0x45, 0];
    h.extend_from_slice(&total.to_be_bytes());
    h.extend_from_slice(&[0x12, 0x34]);
    h.extend_from_slice(&frag.to_be_bytes());
    h.extend_from_slice(&[64, proto, 0, 0]);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(payload);
    h
}

/// IPv6 header + `ext` (already chained extension headers) + payload. `next` is the first
/// next-header value (of the first extension header if any).
#[must_use]
pub fn ipv6(src: Ipv6Addr, dst: Ipv6Addr, next: u8, ext: &[u8], payload: &[u8]) -> Vec<u8> {
    let plen = u16::try_from(ext.len() + payload.len()).expect("small packet");
    let mut h = vec![0x60, 0, 0, 0];
    h.extend_from_slice(&plen.to_be_bytes());
    h.push(next);
    h.push(64);
    h.extend_from_slice(&src.octets());
    h.extend_from_slice(&dst.octets());
    h.extend_from_slice(ext);
    h.extend_from_slice(payload);
    h
}

/// `frame` (Ethernet + IPv6) with its hop limit set to `hops`.
#[must_use]
pub fn hop_limit(mut frame: Vec<u8>, hops: u8) -> Vec<u8> {
    frame[14 + 7] = hops;
    frame
}

/// An 8-byte IPv6 options-style extension header (hop-by-hop 0, dest-opts 60, routing 43).
#[must_use]
pub fn ext8(next: u8) -> Vec<u8> {
    vec![next, 0, 1, 4, 0, 0, 0, 0]
}

/// IPv6 fragment header.
#[must_use]
pub fn frag6(next: u8, offset: u16, more: bool) -> Vec<u8> {
    let v = (offset << 3) | u16::from(more);
    let mut h = vec![next, 0];
    h.extend_from_slice(&v.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1]);
    h
}

pub const SYN: u8 = 0x02;
pub const ACK: u8 = 0x10;
pub const RST: u8 = 0x04;
pub const FIN: u8 = 0x01;

#[must_use]
pub fn tcp(sport: u16, dport: u16, flags: u8) -> Vec<u8> {
    let mut h = Vec::with_capacity(20);
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 1, 0, 0, 0, 0, 0x50, flags, 0xff, 0xff, 0, 0, 0, 0]);
    h
}

#[must_use]
pub fn udp(sport: u16, dport: u16, data: &[u8]) -> Vec<u8> {
    let len = u16::try_from(8 + data.len()).expect("small");
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&len.to_be_bytes());
    h.extend_from_slice(&[0, 0]);
    h.extend_from_slice(data);
    h
}

#[must_use]
pub fn sctp(sport: u16, dport: u16) -> Vec<u8> {
    let mut h = Vec::new();
    h.extend_from_slice(&sport.to_be_bytes());
    h.extend_from_slice(&dport.to_be_bytes());
    h.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 0]);
    // INIT chunk header (type 1, flags, length 4)
    h.extend_from_slice(&[1, 0, 0, 4]);
    h
}

#[must_use]
pub fn icmp(ty: u8, code: u8, id: u16) -> Vec<u8> {
    let mut h = vec![ty, code, 0, 0];
    h.extend_from_slice(&id.to_be_bytes());
    h.extend_from_slice(&[0, 1]);
    h
}

fn v4(s: &str) -> Ipv4Addr {
    s.parse().expect("ipv4")
}
fn v6(s: &str) -> Ipv6Addr {
    s.parse().expect("ipv6")
}

/// Complete IPv4 frame with an L4 payload.
#[must_use]
pub fn frame4(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(ETH_P_IP, &ipv4(v4(src), v4(dst), proto, l4, 0))
}

/// Complete IPv6 frame with an L4 payload and no extension headers.
#[must_use]
pub fn frame6(src: &str, dst: &str, proto: u8, l4: &[u8]) -> Vec<u8> {
    eth(ETH_P_IPV6, &ipv6(v6(src), v6(dst), proto, &[], l4))
}

#[must_use]
pub fn tcp4(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    frame4(src, dst, TCP, &tcp(sport, dport, SYN))
}

#[must_use]
pub fn tcp6(src: &str, sport: u16, dst: &str, dport: u16) -> Vec<u8> {
    frame6(src, dst, TCP, &tcp(sport, dport, SYN))
}

/// A minimal ARP request.
#[must_use]
pub fn arp() -> Vec<u8> {
    let body = [0u8, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 0, 0, 1, 0, 0, 0, 0, 0, 0, 10, 0, 0, 2];
    eth(ETH_P_ARP, &body)
}

/// An ICMP (or `ICMPv6`) error frame from `src` to `dst` of type `ty` and code `code`, quoting
/// the IP packet of `quoted_frame` (a complete frame of the same family; its Ethernet header
/// is dropped) as routers do: the IP header and the start of its payload.
#[must_use]
pub fn icmp_error(src: &str, dst: &str, ty: u8, code: u8, quoted_frame: &[u8]) -> Vec<u8> {
    let quoted = &quoted_frame[14..];
    let v6 = src.contains(':');
    let keep = quoted.len().min(if v6 { 40 + 8 } else { 20 + 8 });
    let mut l4 = vec![ty, code, 0, 0, 0, 0, 0, 0];
    l4.extend_from_slice(&quoted[..keep]);
    if v6 { frame6(src, dst, ICMPV6, &l4) } else { frame4(src, dst, ICMP, &l4) }
}
