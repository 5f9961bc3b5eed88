//! Entering a network namespace (for enforcers of simulated hosts in the lab), and the
//! addresses of the namespace a thread is in.
//!
//! `setns(CLONE_NEWNET)` changes the calling thread only, so call this before starting any
//! other thread (or a tokio runtime); the mount namespace is untouched, so bpffs stays visible.

use std::{
    fs::File,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::AsRawFd as _,
    path::Path,
};

/// Move the calling thread into the network namespace at `path` (e.g. `/run/netns/NAME`).
pub fn enter(path: &Path) -> std::io::Result<()> {
    let f = File::open(path)?;
    // SAFETY: setns with a namespace fd we hold open; affects only this thread.
    let rc = unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) };
    if rc == 0 { Ok(()) } else { Err(std::io::Error::last_os_error()) }
}

/// Every IPv4 and IPv6 address configured on an interface of the calling thread's network
/// namespace (loopback included), in the order the kernel lists them; an address on several
/// interfaces appears once per interface.
pub fn addresses() -> std::io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs stores a list it allocated in `head`; it is freed below.
    if unsafe { libc::getifaddrs(&raw mut head) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned, valid until freeifaddrs.
        let ifa = unsafe { &*cur };
        let sa = ifa.ifa_addr;
        if !sa.is_null() {
            // SAFETY: a non-null ifa_addr points to a sockaddr whose family says its type; the
            // reads copy it out whatever its alignment.
            match i32::from(unsafe { (*sa).sa_family }) {
                libc::AF_INET => {
                    let sin = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in>()) };
                    out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))));
                }
                libc::AF_INET6 => {
                    let sin6 = unsafe { std::ptr::read_unaligned(sa.cast::<libc::sockaddr_in6>()) };
                    out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
                }
                _ => {}
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn loopback_is_listed() {
        let addrs = super::addresses().unwrap();
        assert!(addrs.contains(&std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)), "{addrs:?}");
    }
}
