//! `ztseg lab serve`: the server process of one lab pod. It enters the pod's namespace, listens
//! on every lab port over each protocol it is given (TCP, UDP, SCTP), answers each TCP or SCTP
//! connection with one byte and then echoes it, echoes each UDP datagram, and runs until killed.

use std::{
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::Path,
};

use anyhow::{Context as _, Result};

use super::sctp;

pub fn serve(netns: &str, ports: &[u16], protocols: &[String]) -> Result<()> {
    enforcer::netns::enter(&Path::new("/run/netns").join(netns))
        .with_context(|| format!("entering {netns}"))?;
    let serves = |name: &str| protocols.iter().any(|p| p.eq_ignore_ascii_case(name));
    for port in ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
        if serves("tcp") {
            let l = TcpListener::bind(addr).with_context(|| format!("tcp/{port}"))?;
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(c) = conn else { continue };
                    std::thread::spawn(move || answer(c));
                }
            });
        }
        if serves("sctp") {
            let l = sctp::listen(addr).with_context(|| format!("sctp/{port}"))?;
            std::thread::spawn(move || {
                loop {
                    let Ok((c, _)) = l.accept() else { continue };
                    std::thread::spawn(move || answer(c));
                }
            });
        }
        if serves("udp") {
            let s = UdpSocket::bind(addr).with_context(|| format!("udp/{port}"))?;
            std::thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((n, peer)) = s.recv_from(&mut buf) {
                    let _ = s.send_to(&buf[..n], peer);
                }
            });
        }
    }
    println!("serving {ports:?} over {protocols:?} in {netns}");
    loop {
        std::thread::park();
    }
}

/// One byte first, then echo until the client closes, so long-lived flows can be observed end
/// to end.
fn answer(mut c: impl Read + Write) {
    if c.write_all(b"z").is_err() {
        return;
    }
    let mut buf = [0u8; 1024];
    while let Ok(n) = c.read(&mut buf) {
        if n == 0 || c.write_all(&buf[..n]).is_err() {
            break;
        }
    }
}
