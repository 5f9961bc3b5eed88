//! Real sockets across the lab: echo servers in pods, clients that report what got through.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use crate::netns::Netns;

/// Start a TCP echo server inside `ns` on `addr`; it runs until the process exits.
pub fn tcp_echo(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().expect("addr");
    let listener = ns.enter(|| TcpListener::bind(addr).expect("bind"));
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = c.read(&mut buf) {
                    if n == 0 || c.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
}

/// Start a UDP echo server inside `ns` on `addr`.
pub fn udp_echo(ns: &Netns, addr: &str) {
    let addr: SocketAddr = addr.parse().expect("addr");
    let sock = ns.enter(|| UdpSocket::bind(addr).expect("bind udp"));
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, peer)) = sock.recv_from(&mut buf) {
            let _ = sock.send_to(&buf[..n], peer);
        }
    });
}

/// Connect from inside `ns`; `None` when the connection did not complete within `timeout`.
pub fn tcp_connect(ns: &Netns, addr: &str, timeout: Duration) -> Option<TcpStream> {
    let addr: SocketAddr = addr.parse().expect("addr");
    ns.enter(|| TcpStream::connect_timeout(&addr, timeout).ok())
}

/// One echo round trip on an established stream.
pub fn echo_once(s: &mut TcpStream, timeout: Duration) -> bool {
    s.set_read_timeout(Some(timeout)).expect("timeout");
    if s.write_all(b"ping").is_err() {
        return false;
    }
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"ping"
}

/// Send one datagram from inside `ns`, from address `src`, and wait for its echo.
pub fn udp_roundtrip_from(ns: &Netns, src: &str, addr: &str, timeout: Duration) -> bool {
    let addr: SocketAddr = addr.parse().expect("addr");
    let src: std::net::IpAddr = src.parse().expect("source address");
    ns.enter(|| {
        let s = UdpSocket::bind(SocketAddr::new(src, 0)).expect("bind");
        s.set_read_timeout(Some(timeout)).expect("timeout");
        if s.send_to(b"hello", addr).is_err() {
            return false;
        }
        let mut buf = [0u8; 16];
        matches!(s.recv_from(&mut buf), Ok((5, _)))
    })
}

/// Send one datagram from inside `ns` and wait for its echo.
pub fn udp_roundtrip(ns: &Netns, addr: &str, timeout: Duration) -> bool {
    let any = if addr.parse::<SocketAddr>().expect("addr").is_ipv4() { "0.0.0.0" } else { "::" };
    udp_roundtrip_from(ns, any, addr, timeout)
}
