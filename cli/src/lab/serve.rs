//! `ztseg lab serve`: the server process of one lab pod. It enters the pod's namespace, listens
//! on every lab port over TCP and UDP, answers each TCP connection with one byte and then
//! echoes it, echoes each UDP datagram, and runs until killed.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, TcpListener, UdpSocket},
    path::Path,
};

use anyhow::{Context as _, Result};

pub fn serve(netns: &str, ports: &[u16], protocols: &[String]) -> Result<()> {
    enforcer::netns::enter(&Path::new("/run/netns").join(netns))
        .with_context(|| format!("entering {netns}"))?;
    for port in ports {
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, *port));
        if protocols.iter().any(|p| p.eq_ignore_ascii_case("tcp")) {
            let l = TcpListener::bind(addr).with_context(|| format!("tcp/{port}"))?;
            std::thread::spawn(move || {
                for conn in l.incoming() {
                    let Ok(mut c) = conn else { continue };
                    std::thread::spawn(move || {
                        let _ = c.write_all(b"z");
                        // Then echo until the client closes, so long-lived flows can be
                        // observed end to end.
                        let mut buf = [0u8; 1024];
                        while let Ok(n) = c.read(&mut buf) {
                            if n == 0 || c.write_all(&buf[..n]).is_err() {
                                break;
                            }
                        }
                    });
                }
            });
        }
        if protocols.iter().any(|p| p.eq_ignore_ascii_case("udp")) {
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
