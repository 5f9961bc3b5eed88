//! Socket probe run inside a test cgroup: `zt-sockprobe tcp|udp ADDR:PORT`.
//! Prints `ok` or `err <errno> <message>` and exits 0 / 1.
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
