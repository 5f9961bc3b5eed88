//! Fuzz the real TC programs with at least 1,000,000 random and mutated frames through
//! `BPF_PROG_TEST_RUN`, and the `cgroup_skb` programs with as many more. Oracle: with one
//! allow rule installed (A → B tcp/80), every frame that passes is, by a parser of this test's
//! own (not the data plane's), ARP, neighbour discovery or MLD that stays on the link, an ICMP
//! error quoting a packet of the rule's flow, or a well-formed TCP packet of the flow the rule
//! admits (A to B port 80 leaving A, or B's answer from port 80 entering A); allow events
//! carry the rule's cookie and name B, tcp, 80; the kernel never returns an error other than
//! refusing to build an skb from a frame shorter than its headers.

use enforcer::{Rule, events::Verdict, writer::Action};
use enforcer_common::{
    DIR_EGRESS, Reason,
    program_names::{CGROUP_SKB_EGRESS, CGROUP_SKB_INGRESS, TC_FROM_WORKLOAD, TC_TO_WORKLOAD},
};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use ztseg_integration::{TC_ACT_OK, TC_ACT_SHOT, TestDatapath, frame, ip, workload};

const FRAMES: u64 = 1_000_000;
const CGROUP_FRAMES: u64 = 1_000_000;

fn seeds() -> Vec<Vec<u8>> {
    vec![
        frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 80),
        frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 81),
        frame::tcp6("fd00::1", 1000, "fd00::2", 80),
        // B's answers (replies to the flows above once those are tracked).
        frame::frame4("10.0.0.2", "10.0.0.1", frame::TCP, &frame::tcp(80, 1000, frame::SYN | frame::ACK)),
        frame::frame6("fd00::2", "fd00::1", frame::TCP, &frame::tcp(80, 1000, frame::ACK)),
        frame::frame4("10.0.0.1", "10.0.0.2", frame::UDP, &frame::udp(1, 80, b"abc")),
        frame::frame4("10.0.0.1", "10.0.0.2", frame::SCTP, &frame::sctp(1, 80)),
        frame::frame4("10.0.0.1", "10.0.0.2", frame::ICMP, &frame::icmp(8, 0, 1)),
        frame::frame6("fd00::1", "fd00::2", frame::ICMPV6, &frame::icmp(128, 0, 1)),
        frame::eth(
            frame::ETH_P_IPV6,
            &frame::ipv6(
                "fd00::1".parse().unwrap(),
                "fd00::2".parse().unwrap(),
                0,
                &frame::ext8(frame::TCP),
                &frame::tcp(1, 80, 2),
            ),
        ),
        frame::arp(),
        // Errors about the rule's flow (they pass as related while it is tracked).
        frame::icmp_error("192.0.2.1", "10.0.0.1", 3, 4, &frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 80)),
        frame::icmp_error("2001:db8::1", "fd00::1", 2, 0, &frame::tcp6("fd00::1", 1000, "fd00::2", 80)),
        // Neighbour discovery on the link, and to a global address (which policy must judge).
        frame::hop_limit(
            frame::frame6("fe80::1", "ff02::1:ff00:2", frame::ICMPV6, &frame::icmp(135, 0, 0)),
            255,
        ),
        frame::hop_limit(frame::frame6("fd00::1", "fd00::2", frame::ICMPV6, &frame::icmp(135, 0, 0)), 255),
        frame::hop_limit(frame::frame6("fe80::1", "ff02::16", frame::ICMPV6, &frame::icmp(143, 0, 0)), 1),
    ]
}

fn mutate(rng: &mut SmallRng, seeds: &[Vec<u8>]) -> Vec<u8> {
    // One frame in ten is pure noise behind a random or IP ethertype.
    if rng.random_range(0..10) == 0 {
        {
            let n = rng.random_range(14..200);
            let mut f: Vec<u8> = (0..n).map(|_| rng.random()).collect();
            if rng.random_bool(0.7) {
                let et: u16 = if rng.random_bool(0.5) { 0x0800 } else { 0x86DD };
                f[12..14].copy_from_slice(&et.to_be_bytes());
            }
            f
        }
    } else {
        {
            let mut f = seeds[rng.random_range(0..seeds.len())].clone();
            for _ in 0..rng.random_range(1..6) {
                match rng.random_range(0..4) {
                    0 => {
                        let i = rng.random_range(12..f.len());
                        f[i] ^= 1 << rng.random_range(0..8);
                    }
                    1 => {
                        let i = rng.random_range(12..f.len());
                        f[i] = rng.random();
                    }
                    2 => {
                        let keep = rng.random_range(14..=f.len());
                        f.truncate(keep);
                    }
                    _ => {
                        let extra = rng.random_range(1..40);
                        f.extend((0..extra).map(|_| rng.random::<u8>()));
                    }
                }
            }
            f
        }
    }
}

const A4: [u8; 4] = [10, 0, 0, 1];
const B4: [u8; 4] = [10, 0, 0, 2];
const A6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1];
const B6: [u8; 16] = [0xfd, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 2];

/// Where a frame is checked.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Hook {
    /// TC on A's interface: Ethernet first, and A's own address checked on every packet.
    Tc,
    /// `cgroup_skb` of A's cgroup: the network header first (the kernel hands these programs
    /// IP packets only, so the ethertype says nothing), and no address check (a process of a
    /// cgroup may use any of the host's addresses).
    Cgroup,
}

/// Whether frame `f`, checked leaving A (`egress`) or entering it at `hook`, may pass with
/// only the rule A → B tcp/80 installed; `Err` says why not. Written from the protocols'
/// definitions, independently of the data plane's parser.
fn may_pass(f: &[u8], egress: bool, hook: Hook) -> Result<(), String> {
    let at = |i: usize, n: usize| f.get(i..i + n).ok_or_else(|| format!("truncated at byte {i}"));
    let family = match hook {
        Hook::Tc => u16::from_be_bytes([f[12], f[13]]),
        Hook::Cgroup => match f.get(14).map(|b| b >> 4) {
            Some(4) => 0x0800,
            Some(6) => 0x86dd,
            _ => return Err("not an IP packet".into()),
        },
    };
    // Whether the local end is A: checked at TC, anything at the cgroup hooks.
    let is_a = |a: &[u8], own: &[u8]| hook == Hook::Cgroup || a == own;
    match family {
        0x0806 => Ok(()),
        0x0800 => {
            let ip = at(14, 20)?;
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let total = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            if ip[0] >> 4 != 4 || ihl < 20 || (total != 0 && (total < ihl || 14 + total > f.len())) {
                return Err("malformed IPv4 header".into());
            }
            if u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
                return Err("IPv4 fragment".into());
            }
            let (src, dst) = (&ip[12..16], &ip[16..20]);
            if ip[9] == 1 && quotes_the_rule(f, 14 + ihl, 4, hook) {
                return Ok(());
            }
            tcp_of_the_rule(
                f,
                14 + ihl,
                ip[9],
                is_a(src, &A4) && dst == B4,
                src == B4 && is_a(dst, &A4),
                egress,
            )
        }
        0x86dd => {
            let ip = at(14, 40)?;
            let payload = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            if ip[0] >> 4 != 6 || (payload != 0 && 54 + payload > f.len()) {
                return Err("malformed IPv6 header".into());
            }
            let (mut next, mut off, mut walked) = (ip[6], 54, 0);
            while matches!(next, 0 | 43 | 60 | 51 | 44) {
                if next == 44 {
                    return Err("IPv6 fragment".into());
                }
                let h = at(off, 2)?;
                off += if next == 51 { (usize::from(h[1]) + 2) * 4 } else { (usize::from(h[1]) + 1) * 8 };
                next = h[0];
                walked += 1;
                if walked > 6 {
                    return Err("more than 6 extension headers".into());
                }
            }
            let (src, dst) = (&ip[8..24], &ip[24..40]);
            if next == 58 && quotes_the_rule(f, off, 6, hook) {
                return Ok(());
            }
            if next == 58 && neighbour_housekeeping(at(off, 8)?[0], ip[7], src, dst, egress) {
                return Ok(());
            }
            tcp_of_the_rule(f, off, next, is_a(src, &A6) && dst == B6, src == B6 && is_a(dst, &A6), egress)
        }
        other => Err(format!("ethertype {other:#06x}")),
    }
}

/// Whether the ICMP (`family` 4) or `ICMPv6` message at `off` is an error quoting a packet of
/// the rule's flow, either way (errors about a tracked flow pass as related to it); at the
/// cgroup hooks the local end may be any address, as for the flow itself.
fn quotes_the_rule(f: &[u8], off: usize, family: u8, hook: Hook) -> bool {
    let Some(&ty) = f.get(off) else { return false };
    let error = if family == 4 { matches!(ty, 3 | 11 | 12) } else { matches!(ty, 1..=4) };
    let inner = off + 8;
    let quoted = if family == 4 {
        f.get(inner..inner + 20).and_then(|ip| {
            let l4 = inner + usize::from(ip[0] & 0x0f) * 4;
            Some((&ip[12..16], &ip[16..20], ip[9], f.get(l4..l4 + 4)?))
        })
    } else {
        f.get(inner..inner + 40)
            .and_then(|ip| Some((&ip[8..24], &ip[24..40], ip[6], f.get(inner + 40..inner + 44)?)))
    };
    let Some((src, dst, proto, ports)) = quoted else { return false };
    let (a, b): (&[u8], &[u8]) = if family == 4 { (&A4, &B4) } else { (&A6, &B6) };
    let (sport, dport) = (u16::from_be_bytes([ports[0], ports[1]]), u16::from_be_bytes([ports[2], ports[3]]));
    let is_a = |x: &[u8]| hook == Hook::Cgroup || x == a;
    error && proto == 6 && ((is_a(src) && dst == b && dport == 80) || (src == b && is_a(dst) && sport == 80))
}

/// Neighbour discovery or MLD with the hop limit of an unrouted packet, on A's link: leaving
/// A from its own, a link-local or the unspecified address to a link-scoped one; entering A
/// to a link-scoped address or A's own.
fn neighbour_housekeeping(ty: u8, hops: u8, src: &[u8], dst: &[u8], egress: bool) -> bool {
    let hop_ok = match ty {
        130..=132 | 143 => hops == 1,
        133..=137 => hops == 255,
        _ => false,
    };
    let link_local = |a: &[u8]| a[0] == 0xfe && a[1] & 0xc0 == 0x80;
    let link_scoped = |a: &[u8]| link_local(a) || (a[0] == 0xff && matches!(a[1] & 0x0f, 1 | 2));
    hop_ok
        && if egress {
            link_scoped(dst) && (src == A6 || link_local(src) || src.iter().all(|b| *b == 0))
        } else {
            link_scoped(dst) || dst == A6
        }
}

/// A well-formed TCP header at `off` of the rule's flow: to port 80 leaving A for B
/// (`a_to_b`), or from port 80 entering A from B (`b_to_a`).
fn tcp_of_the_rule(
    f: &[u8],
    off: usize,
    proto: u8,
    a_to_b: bool,
    b_to_a: bool,
    egress: bool,
) -> Result<(), String> {
    if proto != 6 {
        return Err(format!("protocol {proto}"));
    }
    let h = f.get(off..off + 14).ok_or("truncated TCP header")?;
    let doff = usize::from(h[12] >> 4) * 4;
    if doff < 20 || off + doff > f.len() {
        return Err("malformed TCP header".into());
    }
    let (sport, dport) = (u16::from_be_bytes([h[0], h[1]]), u16::from_be_bytes([h[2], h[3]]));
    let of_rule = if egress { a_to_b && dport == 80 } else { b_to_a && sport == 80 };
    if of_rule { Ok(()) } else { Err(format!("TCP {sport} -> {dport} not of the rule's flow")) }
}

/// The data plane with A (identity 800) behind interface 1 and in this process's cgroup, B
/// (801) mapped, and the one rule A → B tcp/80; the rule's cookie.
fn setup(dp: &TestDatapath) -> u32 {
    let mut w = dp.writer();
    let a = workload(800, 1, Some("10.0.0.1"), Some("fd00::1"));
    w.set_interface_workload(1, &a).unwrap();
    w.set_cgroup_workload(own_cgroup_id(), &a).unwrap();
    w.set_identity(ip("10.0.0.2"), 801, 1).unwrap();
    w.set_identity(ip("fd00::2"), 801, 1).unwrap();
    w.install(&Rule {
        ranges: Vec::new(),
        keys: vec![Rule::key(DIR_EGRESS, 800, Some(801), frame::TCP, 80)],
        action: Action::Allow,
        ttl: None,
    })
    .unwrap()
    .cookie
}

/// The cgroup v2 id of this process's cgroup (test runs of `cgroup_skb` programs give the
/// packet a socket in it): the inode of its directory in the cgroup2 mount.
fn own_cgroup_id() -> u64 {
    use std::os::unix::fs::MetadataExt as _;
    let own = std::fs::read_to_string("/proc/self/cgroup").unwrap();
    let rel = own.lines().find_map(|l| l.strip_prefix("0::")).expect("a cgroup v2 line");
    std::fs::metadata(format!("{}{rel}", ztseg_integration::cgroup2_root().display())).unwrap().ino()
}

/// Run one frame through program `name`: its verdict as pass or drop, `None` when the kernel
/// refuses to build an skb from it (shorter than its headers).
fn run(dp: &mut TestDatapath, name: &'static str, hook: Hook, f: &[u8]) -> Option<bool> {
    use aya::programs::{CgroupSkb, TestRun as _, TestRunOptions};
    let r = match hook {
        Hook::Tc => dp.run(name, f),
        Hook::Cgroup => {
            let prog: &mut CgroupSkb = dp.dp.program_mut(name).unwrap().try_into().unwrap();
            let mut opts = TestRunOptions::new();
            opts.data_in = Some(f);
            prog.test_run(opts).map(|r| r.return_value)
        }
    };
    match r {
        Ok(v) => {
            let (pass, drop) = if hook == Hook::Tc { (TC_ACT_OK, TC_ACT_SHOT) } else { (1, 0) };
            assert!(v == pass || v == drop, "unexpected verdict {v} of {name}");
            Some(v == pass)
        }
        Err(aya::programs::ProgramError::SyscallError(e))
            if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
        {
            None
        }
        Err(e) => panic!("test run error of {name} on {f:02x?}: {e}"),
    }
}

/// Run `frames` mutated frames through the egress program (80%) and the ingress program of
/// `hook`, checking every pass against the oracle and every allow event; returns (frames
/// run, passed).
fn fuzz(dp: &mut TestDatapath, hook: Hook, frames: u64, seed: u64) -> (u64, u64) {
    let mut events = dp.events().unwrap();
    let cookie = setup(dp);
    let (egress, ingress) = match hook {
        Hook::Tc => (TC_FROM_WORKLOAD, TC_TO_WORKLOAD),
        Hook::Cgroup => (CGROUP_SKB_EGRESS, CGROUP_SKB_INGRESS),
    };
    let seeds = seeds();
    let mut rng = SmallRng::seed_from_u64(seed);
    let (mut ran, mut refused, mut passed) = (0u64, 0u64, 0u64);
    let mut bad = Vec::new();
    while ran < frames {
        let f = mutate(&mut rng, &seeds);
        let out = rng.random_bool(0.8);
        match run(dp, if out { egress } else { ingress }, hook, &f) {
            Some(pass) => {
                ran += 1;
                if pass {
                    passed += 1;
                    if let Err(why) = may_pass(&f, out, hook) {
                        bad.push(format!("{why}, yet it passed: {f:02x?}"));
                    }
                }
            }
            None => refused += 1,
        }
        if ran % 4096 == 0 {
            check_events(&mut events, cookie, &mut bad);
        }
        assert!(bad.len() < 10, "violations:\n{}", bad.join("\n"));
    }
    check_events(&mut events, cookie, &mut bad);
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    eprintln!("fuzz: {ran} frames run, {refused} refused by the kernel, {passed} passed");
    (ran, passed)
}

/// Every pass is explained by a counter of an allowed reason; nothing was let through by any
/// other path (audit is off, no admin rules, no failsafe); the mutations reached the
/// malformed paths.
fn check_counters(dp: &TestDatapath, passed: u64, malformed_at_least: u64) {
    let c = dp.writer().counters().unwrap();
    let explained = c[&Reason::AllowPolicy]
        + c[&Reason::AllowEstablished]
        + c[&Reason::AllowReply]
        + c[&Reason::PassLinkLocal]
        + c[&Reason::AllowRelated];
    assert_eq!(explained, passed, "{c:?}");
    assert_eq!(c[&Reason::AllowAdmin] + c[&Reason::Audit] + c[&Reason::AllowFailsafe], 0);
    assert!(c[&Reason::AllowReply] > 0, "replies of the rule's flow were exercised: {c:?}");
    assert!(c[&Reason::DropMalformed] > malformed_at_least, "mutations reach the malformed paths: {c:?}");
    eprintln!("counters {c:?}");
}

#[test]
fn million_frames_none_passes_without_a_rule() {
    let mut dp = TestDatapath::new("fuzz");
    let (_, passed) = fuzz(&mut dp, Hook::Tc, FRAMES, 0x2757_0001);
    check_counters(&dp, passed, 10_000);
}

#[test]
fn cgroup_frames_none_passes_without_a_rule() {
    let mut dp = TestDatapath::new("fuzzcg");
    let (_, passed) = fuzz(&mut dp, Hook::Cgroup, CGROUP_FRAMES, 0x2757_0002);
    assert!(passed > 0, "some frames of the rule's flow passed");
    check_counters(&dp, passed, 10_000);
}

/// Every allow event must be the rule's flow: cookie, peer B, tcp, port 80.
fn check_events(events: &mut enforcer::EventReader, cookie: u32, bad: &mut Vec<String>) {
    for e in events.drain() {
        if e.verdict == Verdict::Allow
            && (e.cookie != cookie
                || e.peer_identity != 801
                || e.proto != frame::TCP
                || e.dport != 80
                || !e.egress)
        {
            bad.push(format!("allowed without a matching rule: {e:?}"));
        }
    }
}
