//! Local delivery with real traffic: routed pods (no bridge) on one simulated host, packets
//! between them passing both workloads' checks in one program run and handed straight to the
//! destination's namespace. Verdicts, replies, TTL handling, revocation and expiry must be what
//! the kernel path gives; flows the host translated (DNAT) must keep the host path; a bridged
//! host, or the switch turned off, never uses it.

use std::{
    net::{SocketAddr, UdpSocket},
    os::fd::AsRawFd as _,
    time::Duration,
};

use enforcer::{Rule, writer::Action};
use enforcer_common::{DIR_EGRESS, IDENTITY_F_LOCAL, IDENTITY_WORLD, LINK_F_PEER, Reason};
use ztseg_integration::{
    frame::{TCP, UDP},
    netns::{Lab, Netns},
    pair::Pair,
    traffic::{echo_once, tcp_connect, tcp_echo},
};

const A: u32 = 600;
const B: u32 = 601;
const OPEN: Duration = Duration::from_secs(2);
const DENIED: Duration = Duration::from_millis(400);

fn setup(name: &str, lab: Lab) -> Pair {
    Pair::new(name, lab, [(A, 1), (B, 1)])
}

fn delivered(s: &Pair) -> u64 {
    s.dp.writer().counters().unwrap()[&Reason::LocalDelivery]
}

/// One connection and echo from A to `addr`; panics if it does not work.
fn exchange(a: &Netns, addr: &str) {
    let mut c = tcp_connect(a, addr, OPEN).unwrap_or_else(|| panic!("{addr} connects"));
    assert!(echo_once(&mut c, OPEN), "{addr} echoes");
}

#[test]
fn routed_pods_are_delivered_locally_with_the_same_verdicts() {
    let s = setup("ldroute", Lab::routed(2));
    let a = &s.lab.pods[0];
    assert_eq!(s.dp.writer().link_flags(s.ifindex[1]).unwrap(), LINK_F_PEER, "veth with its peer in a pod");
    let b_addr = "10.77.0.2".parse().unwrap();
    assert_eq!(s.dp.writer().identity(b_addr).unwrap().flags, IDENTITY_F_LOCAL, "B is a local target");
    // Re-mapping the address (as a policy sync does) keeps it one.
    s.dp.writer().set_identity(b_addr, B, 1).unwrap();
    assert_eq!(s.dp.writer().identity(b_addr).unwrap().flags, IDENTITY_F_LOCAL);

    assert!(tcp_connect(a, "10.77.0.2:8080", DENIED).is_none(), "default deny");
    assert_eq!(delivered(&s), 0, "a denied packet is never delivered");

    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    // The first connection teaches the host B's link-layer address (the kernel path resolves
    // neighbours); the following ones find it and are delivered locally.
    exchange(a, "10.77.0.2:8080");
    exchange(a, "[fd77::2]:8080");
    for addr in ["10.77.0.2:8080", "[fd77::2]:8080"] {
        let before = delivered(&s);
        exchange(a, addr);
        // SYN, SYN-ACK, ACK, data and its echo at least, both directions.
        assert!(delivered(&s) >= before + 4, "{addr}: {} → {}", before, delivered(&s));
    }
    std::thread::sleep(Duration::from_millis(200)); // the closing handshakes above
    let before = delivered(&s);
    assert!(tcp_connect(a, "10.77.0.2:8081", DENIED).is_none(), "other port stays closed");
    assert!(tcp_connect(a, "[fd77::2]:8081", DENIED).is_none(), "other port stays closed (v6)");
    assert_eq!(delivered(&s), before);
    // B cannot open connections back to A: replies are not a reverse allow.
    tcp_echo(a, "10.77.0.1:9000");
    assert!(tcp_connect(&s.lab.pods[1], "10.77.0.1:9000", DENIED).is_none());
    let c = s.dp.writer().counters().unwrap();
    assert!(c[&Reason::AllowReply] > 0 && c[&Reason::DropDefault] > 0, "{c:?}");
    // B leaves this host: its address keeps its identity but is no local target any more.
    s.dp.writer().remove_interface_workload(s.ifindex[1]).unwrap();
    let info = s.dp.writer().identity(b_addr).unwrap();
    assert_eq!((info.identity, info.flags), (B, 0));
}

/// `setsockopt` with a plain-data option value; panics on failure.
fn set_option<T>(sock: &impl std::os::fd::AsRawFd, level: libc::c_int, name: libc::c_int, value: &T) {
    // SAFETY: setsockopt on an open socket with a value of exactly the size passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            std::ptr::from_ref(value).cast(),
            libc::socklen_t::try_from(std::mem::size_of::<T>()).unwrap(),
        )
    };
    assert_eq!(rc, 0, "setsockopt({level}, {name}): {}", std::io::Error::last_os_error());
}

/// A UDP socket in `ns` that reports the TTL each datagram arrived with.
fn ttl_receiver(ns: &Netns, addr: &str) -> UdpSocket {
    let addr: SocketAddr = addr.parse().unwrap();
    let sock = ns.enter(|| UdpSocket::bind(addr).unwrap());
    set_option(&sock, libc::IPPROTO_IP, libc::IP_RECVTTL, &1 as &libc::c_int);
    sock.set_read_timeout(Some(DENIED)).unwrap();
    sock
}

/// The TTL of the next datagram on `sock`, or `None` if none arrives in time.
fn recv_ttl(sock: &UdpSocket) -> Option<u8> {
    let mut data = [0u8; 64];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec { iov_base: data.as_mut_ptr().cast(), iov_len: data.len() };
    // SAFETY: zeroed msghdr is valid; the pointers set below outlive the call.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &raw mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: msg describes buffers valid for the duration of the call.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &raw mut msg, 0) };
    if n < 0 {
        return None;
    }
    // SAFETY: walking the control messages the kernel wrote into our buffer.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&raw const msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                let ttl = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
                return u8::try_from(ttl).ok();
            }
            c = libc::CMSG_NXTHDR(&raw const msg, c);
        }
    }
    panic!("datagram without a TTL control message");
}

#[test]
fn local_delivery_forwards_like_the_host_ttl_included() {
    let s = setup("ldttl", Lab::routed(2));
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    s.dp.writer().install(&s.a_to_b(UDP, 5355, None)).unwrap();
    exchange(a, "10.77.0.2:8080"); // resolves B's neighbour entry on the host
    let rx = ttl_receiver(&s.lab.pods[1], "10.77.0.2:5355");
    let tx = a.enter(|| UdpSocket::bind("0.0.0.0:0").unwrap());
    for ttl in [64u32, 2] {
        tx.set_ttl(ttl).unwrap();
        let before = delivered(&s);
        tx.send_to(b"x", "10.77.0.2:5355").unwrap();
        assert_eq!(recv_ttl(&rx), Some(u8::try_from(ttl - 1).unwrap()), "sent with TTL {ttl}");
        assert_eq!(delivered(&s), before + 1, "TTL {ttl}: delivered locally");
    }
    // TTL 1 expires at the host: the kernel path answers it, local delivery must not deliver.
    tx.set_ttl(1).unwrap();
    let before = delivered(&s);
    tx.send_to(b"x", "10.77.0.2:5355").unwrap();
    assert_eq!(recv_ttl(&rx), None, "an expiring packet is not delivered");
    assert_eq!(delivered(&s), before);
}

#[test]
fn revocation_and_expiry_cut_locally_delivered_connections() {
    let s = setup("ldcut", Lab::routed(2));
    let a = &s.lab.pods[0];
    let h = s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    exchange(a, "10.77.0.2:8080");
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("connects");
    let before = delivered(&s);
    assert!(echo_once(&mut conn, OPEN));
    assert!(delivered(&s) > before, "established packets are delivered locally");
    s.dp.writer().revoke(h.cookie).unwrap();
    assert!(!echo_once(&mut conn, DENIED), "revocation cuts the established connection");

    // A grant that expires while userspace is idle: the kernel ends the flow by itself.
    s.dp.writer().install(&s.a_to_b(TCP, 8081, Some(Duration::from_secs(2)))).unwrap();
    let mut conn = tcp_connect(a, "10.77.0.2:8081", OPEN).expect("granted port connects");
    assert!(echo_once(&mut conn, OPEN));
    std::thread::sleep(Duration::from_millis(2300));
    assert!(!echo_once(&mut conn, DENIED), "expiry cuts the established connection");
}

#[test]
fn flows_the_host_translated_keep_the_host_path() {
    let s = setup("ldnat", Lab::routed(2));
    let a = &s.lab.pods[0];
    // A service address on the host, translated to B's 8080 as kube-proxy would.
    s.lab.host.sh("nft add table ip svc && \
         nft add chain ip svc pre '{ type nat hook prerouting priority -100; }' && \
         nft add rule ip svc pre ip daddr 10.96.0.10 tcp dport 80 dnat to 10.77.0.2:8080");
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    // A's egress check sees the service address (before translation): a peer outside every
    // identity.
    s.dp.writer()
        .install(&Rule {
            ranges: Vec::new(),
            keys: vec![Rule::key(DIR_EGRESS, A, Some(IDENTITY_WORLD), TCP, 80)],
            action: Action::Allow,
            ttl: None,
        })
        .unwrap();
    exchange(a, "10.77.0.2:8080");
    exchange(a, "10.77.0.2:8080");
    std::thread::sleep(Duration::from_millis(200)); // their closing handshakes
    let before = delivered(&s);
    // B's replies would reach A from B's own address if they skipped the host: A's socket,
    // connected to the service address, would never see them.
    exchange(a, "10.96.0.10:80");
    exchange(a, "10.96.0.10:80");
    assert_eq!(delivered(&s), before, "no packet of a translated flow takes local delivery");
}

#[test]
fn switched_off_or_bridged_the_kernel_path_carries_everything() {
    let s = setup("ldoff", Lab::routed(2));
    s.dp.writer().set_local_delivery(false).unwrap();
    assert!(!s.dp.writer().local_delivery().unwrap());
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    for _ in 0..3 {
        exchange(&s.lab.pods[0], "10.77.0.2:8080");
    }
    assert_eq!(delivered(&s), 0, "switched off");
    s.dp.writer().set_local_delivery(true).unwrap();
    exchange(&s.lab.pods[0], "10.77.0.2:8080");
    assert!(delivered(&s) > 0, "switched back on");

    // Bridged pods reach each other at layer 2: frames are not addressed to the host.
    let s = setup("ldbridge", Lab::new(2));
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    for _ in 0..3 {
        exchange(&s.lab.pods[0], "10.77.0.2:8080");
    }
    assert_eq!(delivered(&s), 0, "bridged");
}

/// Close `s` with an RST (linger 0), as a client that aborts does.
fn reset_close(s: std::net::TcpStream) {
    set_option(&s, libc::SOL_SOCKET, libc::SO_LINGER, &libc::linger { l_onoff: 1, l_linger: 0 });
    drop(s);
}

#[test]
fn a_local_senders_reset_ends_the_flow_at_both_check_points() {
    let s = setup("ldrst", Lab::routed(2));
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    exchange(a, "10.77.0.2:8080");
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("connects");
    assert!(echo_once(&mut conn, OPEN));
    let port = conn.local_addr().unwrap().port();
    let entries =
        |s: &Pair| s.dp.writer().conntrack().unwrap().into_iter().filter(|(k, _)| k.sport == port).count();
    assert_eq!(entries(&s), 2, "the sender's egress entry and the receiver's ingress entry");
    reset_close(conn);
    std::thread::sleep(Duration::from_millis(200));
    // The RST's source address was checked at the sender's interface: it cannot be forged, so
    // the receiver's entry goes with it instead of waiting for garbage collection.
    assert_eq!(entries(&s), 0, "both entries removed by the sender's RST");
}

#[test]
fn a_flow_whose_first_packet_took_the_kernel_path_keeps_it() {
    let s = setup("ldfirst", Lab::routed(2));
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    exchange(a, "10.77.0.2:8080");
    // No neighbour entry for B: the next flow's first packet cannot be delivered locally, the
    // host resolves B on the kernel path. Its entries were created marked for local delivery
    // (before the way was known), and the mark must be gone once the packet took the other.
    s.lab.host.sh("ip neigh flush dev hv1");
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("connects");
    let port = conn.local_addr().unwrap().port();
    let flags = |s: &Pair| -> Vec<u32> {
        s.dp.writer()
            .conntrack()
            .unwrap()
            .into_iter()
            .filter(|(k, _)| k.sport == port)
            .map(|(_, v)| v.flags)
            .collect()
    };
    let f = flags(&s);
    assert_eq!(f.len(), 2, "the sender's and the receiver's entries: {f:?}");
    assert!(f.iter().all(|f| f & enforcer_common::CT_F_LOCAL == 0), "no local delivery mark: {f:?}");
    let before = delivered(&s);
    for _ in 0..5 {
        assert!(echo_once(&mut conn, OPEN), "the flow keeps working on the kernel path");
    }
    assert_eq!(delivered(&s), before, "none of its packets is delivered locally, B's neighbour known or not");
    // A new flow finds the neighbour and takes local delivery from its first packet.
    let before = delivered(&s);
    exchange(a, "10.77.0.2:8080");
    assert!(delivered(&s) >= before + 4, "{before} → {}", delivered(&s));
}

/// A second load of the data plane on the same pins (a daemon restart before it re-attaches)
/// puts its delivery program into the pinned program array while the first load's programs
/// are still attached: they hand packets over to it through the pinned per-CPU slot, so a
/// live connection keeps local delivery and no packet has to be parsed again.
#[test]
fn programs_of_two_loads_hand_over_to_each_other() {
    let s = setup("ld2load", Lab::routed(2));
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    exchange(a, "10.77.0.2:8080");
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("connects");
    assert!(echo_once(&mut conn, OPEN));
    let second = enforcer::Datapath::open(&s.dp.dir, &ztseg_integration::small_options()).unwrap();
    let count = |r: Reason| second.writer().counters().unwrap()[&r];
    let (delivered0, reparsed0) = (count(Reason::LocalDelivery), count(Reason::HandoffReparsed));
    for _ in 0..5 {
        assert!(echo_once(&mut conn, OPEN), "the live connection keeps working");
    }
    exchange(a, "10.77.0.2:8080");
    assert!(count(Reason::LocalDelivery) >= delivered0 + 10, "still delivered locally");
    assert_eq!(count(Reason::HandoffReparsed), reparsed0, "every hand-over found its packet");
    drop(second);
}
