//! Interface facts from rtnetlink: one `RTM_GETLINK` request for an interface index, answered
//! in the calling thread's network namespace. The data plane's local delivery needs to know
//! that a workload's host-side interface is one half of a veth (or netkit) pair whose other
//! half lives in another namespace, because only then can a packet be handed to that other
//! half directly.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

/// What rtnetlink reports about one interface.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkFacts {
    /// `IFLA_INFO_KIND`: "veth", "netkit", "bridge", … (`None` for physical devices).
    pub kind: Option<String>,
    /// `IFLA_LINK_NETNSID` present: the device's link partner is in another namespace.
    pub peer_in_other_netns: bool,
}

impl LinkFacts {
    /// The device has a peer in another namespace that a packet can be handed to directly.
    #[must_use]
    pub fn has_foreign_peer(&self) -> bool {
        matches!(self.kind.as_deref(), Some("veth" | "netkit")) && self.peer_in_other_netns
    }
}

const RTM_NEWLINK: u16 = 16;
const RTM_GETLINK: u16 = 18;
const NLMSG_ERROR: u16 = 2;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_HDRLEN: usize = 16;
const IFINFOMSG_LEN: usize = 16;
const IFLA_LINKINFO: u16 = 18;
const IFLA_LINK_NETNSID: u16 = 37;
const IFLA_INFO_KIND: u16 = 1;
/// Attribute type bits (the top two are the nested and byte-order flags).
const NLA_TYPE_MASK: u16 = 0x3fff;

/// Ask the kernel about interface `ifindex` in the current namespace.
pub fn facts(ifindex: u32) -> io::Result<LinkFacts> {
    let index = i32::try_from(ifindex).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: plain socket(2) call; the result is checked before use.
    let raw =
        unsafe { libc::socket(libc::AF_NETLINK, libc::SOCK_RAW | libc::SOCK_CLOEXEC, libc::NETLINK_ROUTE) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a fresh descriptor nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };

    let mut req = Vec::with_capacity(NLMSG_HDRLEN + IFINFOMSG_LEN);
    let total = u32::try_from(NLMSG_HDRLEN + IFINFOMSG_LEN).unwrap_or(u32::MAX);
    req.extend_from_slice(&total.to_ne_bytes());
    req.extend_from_slice(&RTM_GETLINK.to_ne_bytes());
    req.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    req.extend_from_slice(&1u32.to_ne_bytes()); // sequence
    req.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel
    // ifinfomsg: family, pad, type, index, flags, change.
    req.extend_from_slice(&[0, 0, 0, 0]);
    req.extend_from_slice(&index.to_ne_bytes());
    req.extend_from_slice(&[0; 8]);
    // SAFETY: the buffer is valid for its length for the duration of the call.
    let sent = unsafe { libc::send(sock.as_raw_fd(), req.as_ptr().cast(), req.len(), 0) };
    if sent < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 32 * 1024];
    // SAFETY: the buffer is valid and writable for its length for the duration of the call.
    let n = unsafe { libc::recv(sock.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
    parse_reply(&buf[..n])
}

fn malformed(what: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("rtnetlink reply: {what}"))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_ne_bytes(b.get(off..off + 2)?.try_into().ok()?))
}

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_ne_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// Parse the answer to one `RTM_GETLINK`: an `RTM_NEWLINK` message or an error.
fn parse_reply(b: &[u8]) -> io::Result<LinkFacts> {
    let len = u32_at(b, 0).ok_or_else(|| malformed("short header"))? as usize;
    let ty = u16_at(b, 4).ok_or_else(|| malformed("short header"))?;
    if len < NLMSG_HDRLEN || len > b.len() {
        return Err(malformed("bad message length"));
    }
    let msg = &b[..len];
    match ty {
        NLMSG_ERROR => {
            let code = u32_at(msg, NLMSG_HDRLEN).ok_or_else(|| malformed("short error"))?.cast_signed();
            Err(io::Error::from_raw_os_error(-code))
        }
        RTM_NEWLINK => {
            let mut facts = LinkFacts::default();
            for (ty, value) in attrs(msg.get(NLMSG_HDRLEN + IFINFOMSG_LEN..).unwrap_or_default()) {
                match ty {
                    IFLA_LINK_NETNSID => facts.peer_in_other_netns = true,
                    IFLA_LINKINFO => {
                        if let Some((_, kind)) = attrs(value).find(|(t, _)| *t == IFLA_INFO_KIND) {
                            let kind = kind.split(|c| *c == 0).next().unwrap_or_default();
                            facts.kind = Some(String::from_utf8_lossy(kind).into_owned());
                        }
                    }
                    _ => {}
                }
            }
            Ok(facts)
        }
        other => Err(malformed(&format!("unexpected message type {other}"))),
    }
}

/// Netlink attributes (type, payload) in `b`; stops at the first malformed one.
fn attrs(b: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        let len = usize::from(u16_at(b, off)?);
        let ty = u16_at(b, off + 2)? & NLA_TYPE_MASK;
        if len < 4 || off + len > b.len() {
            return None;
        }
        let value = &b[off + 4..off + len];
        off += (len + 3) & !3;
        Some((ty, value))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(ty: u16, value: &[u8]) -> Vec<u8> {
        let mut a = Vec::new();
        a.extend_from_slice(&u16::try_from(4 + value.len()).unwrap().to_ne_bytes());
        a.extend_from_slice(&ty.to_ne_bytes());
        a.extend_from_slice(value);
        while a.len() % 4 != 0 {
            a.push(0);
        }
        a
    }

    fn message(ty: u16, body: &[u8]) -> Vec<u8> {
        let mut m = Vec::new();
        m.extend_from_slice(&u32::try_from(NLMSG_HDRLEN + body.len()).unwrap().to_ne_bytes());
        m.extend_from_slice(&ty.to_ne_bytes());
        m.extend_from_slice(&[0; 10]);
        m.extend_from_slice(body);
        m
    }

    #[test]
    fn veth_with_peer_elsewhere_qualifies() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(3, b"hv0\0")); // IFLA_IFNAME
        body.extend(attr(IFLA_LINKINFO | 0x8000, &attr(IFLA_INFO_KIND, b"veth\0")));
        body.extend(attr(IFLA_LINK_NETNSID, &5i32.to_ne_bytes()));
        let f = parse_reply(&message(RTM_NEWLINK, &body)).unwrap();
        assert_eq!(f.kind.as_deref(), Some("veth"));
        assert!(f.peer_in_other_netns);
        assert!(f.has_foreign_peer());
    }

    #[test]
    fn veth_with_local_peer_or_other_kinds_do_not() {
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"veth\0")));
        assert!(!parse_reply(&message(RTM_NEWLINK, &body)).unwrap().has_foreign_peer());
        let mut body = vec![0u8; IFINFOMSG_LEN];
        body.extend(attr(IFLA_LINKINFO, &attr(IFLA_INFO_KIND, b"vxlan\0")));
        body.extend(attr(IFLA_LINK_NETNSID, &5i32.to_ne_bytes()));
        assert!(!parse_reply(&message(RTM_NEWLINK, &body)).unwrap().has_foreign_peer());
    }

    #[test]
    fn kernel_errors_and_truncated_replies_are_errors() {
        let e = parse_reply(&message(NLMSG_ERROR, &(-libc::ENODEV).to_ne_bytes())).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(libc::ENODEV));
        let e = parse_reply(&[1, 2, 3]).unwrap_err();
        assert!(e.to_string().contains("short header"), "{e}");
    }

    #[test]
    fn loopback_is_not_a_peer_device() {
        let f = facts(1).unwrap();
        assert!(!f.has_foreign_peer(), "{f:?}");
    }
}
