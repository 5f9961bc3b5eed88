//! Enforcement proven with real packets: network namespaces joined by veth pairs and a bridge
//! in a simulated host namespace, programs attached with TCX on the host-side interfaces,
//! real sockets in the pods.

use std::time::{Duration, Instant};

use enforcer::{AdminRule, Rule, Workload, events::Verdict, writer::Action};
use enforcer_common::{AdminKey, DIR_EGRESS, DIR_INGRESS, PORT_ANY, PROTO_ANY, Reason};
use ztseg_integration::{
    TestDatapath,
    frame::{TCP, UDP},
    netns::Lab,
    pair::Pair,
    traffic::{echo_once, tcp_connect, tcp_echo, udp_echo, udp_roundtrip},
};

const A: u32 = 500;
const B: u32 = 501;
const OPEN: Duration = Duration::from_secs(2);
const DENIED: Duration = Duration::from_millis(400);

/// Two pods on a bridged host with the given tenants, and UDP echo on B's 5353/5354 besides
/// the pair's TCP servers.
fn setup(name: &str, tenant_a: u32, tenant_b: u32) -> Pair {
    let p = Pair::new(name, Lab::new(2), [(A, tenant_a), (B, tenant_b)]);
    udp_echo(&p.lab.pods[1], "10.77.0.2:5353");
    udp_echo(&p.lab.pods[1], "10.77.0.2:5354");
    p
}

#[test]
fn default_deny_then_one_port_allowed_with_replies() {
    let s = setup("nsdeny", 1, 1);
    let a = &s.lab.pods[0];
    assert!(tcp_connect(a, "10.77.0.2:8080", DENIED).is_none(), "default deny");
    assert!(!udp_roundtrip(a, "10.77.0.2:5353", DENIED), "default deny udp");

    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    s.dp.writer().install(&s.a_to_b(UDP, 5353, None)).unwrap();
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("allowed port connects");
    assert!(echo_once(&mut conn, OPEN), "replies pass");
    assert!(tcp_connect(a, "10.77.0.2:8081", DENIED).is_none(), "other port stays closed");
    assert!(udp_roundtrip(a, "10.77.0.2:5353", OPEN), "allowed udp and its reply");
    assert!(!udp_roundtrip(a, "10.77.0.2:5354", DENIED), "other udp port closed");
    // B cannot open connections back to A: replies are not a reverse allow.
    let b = &s.lab.pods[1];
    tcp_echo(a, "10.77.0.1:9000");
    assert!(tcp_connect(b, "10.77.0.1:9000", DENIED).is_none());
    let c = s.dp.writer().counters().unwrap();
    assert!(c[&Reason::AllowReply] > 0 && c[&Reason::DropDefault] > 0, "{c:?}");
}

#[test]
fn ipv6_traffic() {
    let s = setup("nsv6", 1, 1);
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    let mut conn = tcp_connect(a, "[fd77::2]:8080", OPEN).expect("v6 allowed (neighbour discovery works)");
    assert!(echo_once(&mut conn, OPEN));
    assert!(tcp_connect(a, "[fd77::2]:8081", DENIED).is_none());
    assert!(s.dp.writer().counters().unwrap()[&Reason::PassLinkLocal] > 0);
}

/// Keep an established connection busy until it stops answering; returns how long it lived.
fn lifetime(conn: &mut std::net::TcpStream, limit: Duration) -> Duration {
    let start = Instant::now();
    while start.elapsed() < limit {
        if !echo_once(conn, Duration::from_millis(300)) {
            return start.elapsed();
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    start.elapsed()
}

#[test]
fn grant_expiry_cuts_established_connection() {
    let s = setup("nsexp", 1, 1);
    let a = &s.lab.pods[0];
    let g = s.dp.writer().install(&s.a_to_b(TCP, 8080, Some(Duration::from_secs(2)))).unwrap();
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("granted");
    let lived = lifetime(&mut conn, Duration::from_secs(8));
    // Userspace did nothing: the grant is still in the maps; the kernel cut the flow.
    assert!(s.dp.writer().rules().iter().any(|r| r.cookie == g.cookie));
    assert!(lived >= Duration::from_millis(1500) && lived < Duration::from_secs(4), "lived {lived:?}");
    assert!(tcp_connect(a, "10.77.0.2:8080", DENIED).is_none(), "no new connection after expiry");
}

#[test]
fn revocation_cuts_established_connection() {
    let s = setup("nsrev", 1, 1);
    let a = &s.lab.pods[0];
    let g = s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("allowed");
    assert!(echo_once(&mut conn, OPEN));
    s.dp.writer().revoke(g.cookie).unwrap();
    assert!(!echo_once(&mut conn, Duration::from_millis(500)), "revoked flow is cut");
}

#[test]
fn cross_tenant_denied_even_with_tenant_allow() {
    let s = setup("nsxt", 1, 2);
    let a = &s.lab.pods[0];
    s.dp.writer().install(&s.a_to_b(TCP, 8080, None)).unwrap();
    assert!(tcp_connect(a, "10.77.0.2:8080", DENIED).is_none(), "tenant allow cannot reopen cross-tenant");
    assert!(s.dp.writer().counters().unwrap()[&Reason::DropCrossTenant] > 0);
    // An admin-tier allow for the tenant pair (both directions of the check) opens it.
    let key = AdminKey { src_tenant: 1, dst_tenant: 2, dport: PORT_ANY, proto: PROTO_ANY, pad: 0 };
    s.dp.writer().install_admin(&AdminRule { key, action: Action::Allow, priority: 100, ttl: None }).unwrap();
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("admin allow opens the pair");
    assert!(echo_once(&mut conn, OPEN));
}

#[test]
fn audit_mode_passes_and_reports() {
    let mut s = setup("nsaudit", 1, 1);
    let mut events = s.dp.events().unwrap();
    let ia = s.lab.host.enter(|| enforcer::datapath::ifindex("hv0").unwrap());
    let ib = s.lab.host.enter(|| enforcer::datapath::ifindex("hv1").unwrap());
    for (ifx, i, id) in [(ia, 0, A), (ib, 1, B)] {
        let w = Workload {
            identity: id,
            tenant: 1,
            ipv4: Some(Lab::v4(i).parse().unwrap()),
            ipv6: Some(Lab::v6(i).parse().unwrap()),
            audit: true,
        };
        s.dp.writer().set_interface_workload(ifx, &w).unwrap();
    }
    let a = &s.lab.pods[0];
    let mut conn = tcp_connect(a, "10.77.0.2:8080", OPEN).expect("audit mode passes");
    assert!(echo_once(&mut conn, OPEN));
    let ev = events.drain();
    assert!(
        ev.iter().any(|e| e.verdict == Verdict::Audit
            && e.local_identity == A
            && e.peer_identity == B
            && e.dport == 8080),
        "{ev:?}"
    );
    assert!(s.dp.writer().counters().unwrap()[&Reason::Audit] >= 2);
}

/// A test cgroup v2 directory with the data plane's cgroup programs attached; removed on drop.
struct TestCgroup {
    path: std::path::PathBuf,
    id: u64,
}

impl TestCgroup {
    fn new(dp: &mut TestDatapath) -> Self {
        ztseg_integration::require_root();
        let path = ztseg_integration::cgroup2_root().join(ztseg_integration::unique("ztseg-test-"));
        std::fs::create_dir(&path).expect("create a cgroup v2 directory");
        let mut cg = Self { path, id: 0 };
        cg.id = dp.attach_cgroup(&cg.path).unwrap();
        cg
    }
}

impl Drop for TestCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.path);
    }
}

#[test]
fn cgroup_process_gets_eperm_on_denied_connect() {
    use std::process::Command;
    let mut dp = TestDatapath::new("cgroup");
    let cgroup = TestCgroup::new(&mut dp);
    let (cg, cgid) = (&cgroup.path, cgroup.id);
    let local = Workload { identity: 600, tenant: 1, ipv4: None, ipv6: None, audit: false };
    dp.writer().set_cgroup_workload(cgid, &local).unwrap();
    dp.writer().set_identity("127.0.0.1".parse().unwrap(), 601, 1).unwrap();
    let allowed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let denied = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (pa, pd) = (allowed.local_addr().unwrap().port(), denied.local_addr().unwrap().port());
    dp.writer()
        .install(&Rule {
            ranges: Vec::new(),
            keys: vec![Rule::key(DIR_EGRESS, 600, Some(601), TCP, pa)],
            action: Action::Allow,
            ttl: None,
        })
        .unwrap();
    let probe = |port: u16| {
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} tcp 127.0.0.1:{port}",
            cg.display(),
            env!("CARGO_BIN_EXE_zt-sockprobe")
        );
        let start = Instant::now();
        let out = Command::new("sh").args(["-c", &script]).output().unwrap();
        (String::from_utf8_lossy(&out.stdout).trim().to_string(), start.elapsed())
    };
    let (ok, _) = probe(pa);
    assert_eq!(ok, "ok", "allowed connect from the cgroup");
    let (err, took) = probe(pd);
    assert!(err.starts_with(&format!("err {}", libc::EPERM)), "denied connect: {err}");
    assert!(took < Duration::from_secs(1), "EPERM at once, took {took:?}");
    // The same process outside the cgroup is not affected.
    assert!(std::net::TcpStream::connect(("127.0.0.1", pd)).is_ok());
}

/// A UDP server in a managed cgroup answers the requests its ingress policy admitted (the
/// sendmsg check finds the flow it answers), while a datagram it sends unasked to a peer its
/// egress policy does not allow fails with EPERM. Served twice: bound to its address, and
/// bound to the wildcard address with the workload's address registered.
#[test]
fn cgroup_udp_server_answers_admitted_requests() {
    use std::process::{Command, Stdio};
    let mut dp = TestDatapath::new("cgudp");
    let cgroup = TestCgroup::new(&mut dp);
    let (cg, cgid) = (&cgroup.path, cgroup.id);
    for (bind, registered) in [("127.0.0.1", None), ("0.0.0.0", Some("127.0.0.1"))] {
        let server = Workload {
            identity: 610,
            tenant: 1,
            ipv4: registered.map(|a| a.parse().unwrap()),
            ipv6: None,
            audit: false,
        };
        dp.writer().set_cgroup_workload(cgid, &server).unwrap();
        dp.writer().set_identity("127.0.0.1".parse().unwrap(), 611, 1).unwrap();
        let port = ztseg_integration::free_port();
        let rule = dp
            .writer()
            .install(&Rule {
                ranges: Vec::new(),
                keys: vec![Rule::key(DIR_INGRESS, 610, Some(611), UDP, port)],
                action: Action::Allow,
                ttl: None,
            })
            .unwrap();
        let script = format!(
            "echo $$ > {}/cgroup.procs && exec {} udp-serve {bind}:{port}",
            cg.display(),
            env!("CARGO_BIN_EXE_zt-sockprobe")
        );
        let child = Command::new("sh").args(["-c", &script]).stdout(Stdio::piped()).spawn().unwrap();
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
        let mut buf = [0u8; 64];
        let mut answer = None;
        let start = Instant::now();
        while answer.is_none() && start.elapsed() < Duration::from_secs(5) {
            client.send_to(b"request", ("127.0.0.1", port)).unwrap();
            if let Ok((n, _)) = client.recv_from(&mut buf) {
                answer = Some(buf[..n].to_vec());
            }
        }
        let out = child.wait_with_output().unwrap();
        let report = String::from_utf8_lossy(&out.stdout);
        assert_eq!(
            answer.as_deref(),
            Some(&b"answer"[..]),
            "bound to {bind}: no answer; server said {report}"
        );
        assert!(report.contains("reply ok"), "bound to {bind}: {report}");
        assert!(
            report.contains(&format!("unsolicited err {}", libc::EPERM)),
            "bound to {bind}: an unasked datagram must fail with EPERM: {report}"
        );
        dp.writer().revoke(rule.cookie).unwrap();
    }
}

/// Path MTU discovery through the checks: the host's way to an outside peer is narrower than
/// the pod's link, so the pod's full-size segments (DF set) make the host answer with ICMP
/// "fragmentation needed" from an address no policy names. The error passes A's ingress check
/// as related to the connection, the pod lowers its path MTU and the transfer completes;
/// dropped, the connection would stall.
#[test]
fn path_mtu_discovery_works_through_the_checks() {
    use std::io::{Read as _, Write as _};
    let lab = Lab::routed(1);
    let ext = lab.external(0, &["10.99.0.2"]);
    lab.host.sh("ip link set hx0 mtu 1280");
    let mut dp = TestDatapath::new("pmtu");
    let ifindex = lab.host.enter(|| {
        dp.attach_tc(&Lab::iface(0), enforcer::TcHook::FromWorkload).unwrap();
        dp.attach_tc(&Lab::iface(0), enforcer::TcHook::ToWorkload).unwrap();
        enforcer::datapath::ifindex(&Lab::iface(0)).unwrap()
    });
    let a = Workload {
        identity: A,
        tenant: 1,
        ipv4: Some(Lab::v4(0).parse().unwrap()),
        ipv6: None,
        audit: false,
    };
    dp.writer().set_interface_workload(ifindex, &a).unwrap();
    dp.writer()
        .install(&Rule {
            keys: vec![Rule::key(DIR_EGRESS, A, None, TCP, 9000)],
            ranges: Vec::new(),
            action: Action::Allow,
            ttl: None,
        })
        .unwrap();
    // The peer reads everything and answers with the number of bytes (small segments only:
    // its own link to the host is the narrow one).
    let listener = ext.enter(|| std::net::TcpListener::bind("10.99.0.2:9000").unwrap());
    std::thread::spawn(move || {
        if let Ok((mut c, _)) = listener.accept() {
            let mut all = Vec::new();
            if c.read_to_end(&mut all).is_ok() {
                let _ = c.write_all(&(all.len() as u64).to_be_bytes());
            }
        }
    });
    let mut s = tcp_connect(&lab.pods[0], "10.99.0.2:9000", OPEN).expect("connect");
    s.set_write_timeout(Some(Duration::from_secs(10))).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let sent = vec![0x5a_u8; 256 * 1024];
    s.write_all(&sent).expect("send");
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut got = [0u8; 8];
    s.read_exact(&mut got).expect("the peer's count: the transfer stalled");
    assert_eq!(u64::from_be_bytes(got), sent.len() as u64);
    let related = dp.writer().counters().unwrap()[&Reason::AllowRelated];
    assert!(related >= 1, "the host's fragmentation-needed errors passed as related: {related}");
}
