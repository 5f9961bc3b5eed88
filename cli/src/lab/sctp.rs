//! SCTP for the lab: one-to-one style sockets (`socket(AF_INET[6], SOCK_STREAM, IPPROTO_SCTP)`),
//! which accept, connect, read and write like TCP sockets, and a check that the kernel has SCTP
//! at all.

use std::{io, net::SocketAddr, process::Command, time::Duration};

use socket2::{Domain, Protocol, Socket, Type};

fn sctp() -> Protocol {
    Protocol::from(i32::from(enforcer_common::IPPROTO_SCTP))
}

fn socket(addr: &SocketAddr) -> io::Result<Socket> {
    Socket::new(Domain::for_address(*addr), Type::STREAM, Some(sctp()))
}

/// Whether this kernel can create SCTP sockets; `Err` says why not. Loads the `sctp` module
/// with `modprobe` when the first attempt finds no SCTP (the kernel's own module autoload
/// needs `modprobe` too). Network namespaces share the kernel's protocols, so one check from
/// any namespace answers for all of them.
pub fn available() -> Result<(), String> {
    let probe = || socket(&SocketAddr::from(([0, 0, 0, 0], 0))).map(drop);
    let Err(first) = probe() else { return Ok(()) };
    let loaded = match Command::new("modprobe").arg("sctp").output() {
        Ok(o) if o.status.success() => "`modprobe sctp` succeeded".to_owned(),
        Ok(o) => format!("`modprobe sctp` failed: {}", String::from_utf8_lossy(&o.stderr).trim()),
        Err(e) => format!("`modprobe sctp` could not run: {e}"),
    };
    match probe() {
        Ok(()) => Ok(()),
        Err(e) => Err(format!(
            "this kernel has no SCTP: socket(SOCK_STREAM, IPPROTO_SCTP): {first}; {loaded}{}",
            if e.kind() == first.kind() { String::new() } else { format!("; then: {e}") }
        )),
    }
}

/// A listening one-to-one SCTP socket on `addr`.
pub fn listen(addr: SocketAddr) -> io::Result<Socket> {
    let s = socket(&addr)?;
    s.set_reuse_address(true)?;
    s.bind(&addr.into())?;
    s.listen(128)?;
    Ok(s)
}

/// An SCTP association to `addr` (the handshake completes within `timeout`), with `timeout`
/// as its read timeout.
pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Socket> {
    let s = socket(&addr)?;
    s.connect_timeout(&addr.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    Ok(s)
}
