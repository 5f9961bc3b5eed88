//! Socket probe run inside a test cgroup: `zt-sockprobe tcp|udp ADDR:PORT` prints `ok` or
//! `err <errno> <message>` and exits 0 / 1. `zt-sockprobe udp-serve ADDR:PORT` binds there,
//! answers the first datagram it receives (within 5 s) with `answer`, then sends one datagram
//! unasked to the next port of the same peer, and prints `reply <result>; unsolicited
//! <result>`.
#![forbid(unsafe_code)]

use std::{
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (Some(kind), Some(addr)) = (args.get(1), args.get(2)) else {
        eprintln!("usage: zt-sockprobe tcp|udp ADDR:PORT");
        std::process::exit(64);
    };
    let addr: SocketAddr = addr.parse().unwrap_or_else(|e| {
        eprintln!("bad address {addr}: {e}");
        std::process::exit(64);
    });
    let result = match kind.as_str() {
        "tcp" => TcpStream::connect_timeout(&addr, Duration::from_secs(3)).map(|_| ()),
        "udp-serve" => {
            serve(addr);
            return;
        }
        "udp" => {
            let bind: SocketAddr = if addr.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" }.parse().expect("bind");
            UdpSocket::bind(bind).and_then(|s| s.send_to(b"probe", addr)).map(|_| ())
        }
        other => {
            eprintln!("unknown probe kind {other}");
            std::process::exit(64);
        }
    };
    match result {
        Ok(()) => println!("ok"),
        Err(e) => {
            println!("err {} {e}", e.raw_os_error().unwrap_or(0));
            std::process::exit(1);
        }
    }
}

fn outcome(r: std::io::Result<usize>) -> String {
    match r {
        Ok(_) => "ok".into(),
        Err(e) => format!("err {} {e}", e.raw_os_error().unwrap_or(0)),
    }
}

fn serve(addr: SocketAddr) {
    let sock = UdpSocket::bind(addr).unwrap_or_else(|e| {
        println!("bind err {e}");
        std::process::exit(1);
    });
    sock.set_read_timeout(Some(Duration::from_secs(5))).expect("timeout");
    let mut buf = [0u8; 64];
    let Ok((_, peer)) = sock.recv_from(&mut buf) else {
        println!("no request");
        std::process::exit(1);
    };
    let reply = outcome(sock.send_to(b"answer", peer));
    let mut other = peer;
    other.set_port(peer.port().wrapping_add(1));
    let unsolicited = outcome(sock.send_to(b"unasked", other));
    println!("reply {reply}; unsolicited {unsolicited}");
}
