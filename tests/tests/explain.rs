//! `Writer::explain` against the real programs: on random policies (tenant rules and grants
//! that are live, expired or revoked; admin rules that allow, deny or pass with priorities;
//! CIDR peers; failsafe ports; audit mode) and random new flows in both directions, the
//! explanation's verdict, reason and deciding cookie must be what `BPF_PROG_TEST_RUN` of the
//! programs does with the flow's first packet (verdict, the reason counter that moved, the
//! event's cookie).

use std::{net::IpAddr, time::Duration};

use enforcer::{
    AdminRule, Rule,
    writer::{
        Action,
        explain::{CheckPoint, PeerSource, ProbeKey, Query, RuleStatus},
    },
};
use enforcer_common::{
    AdminKey, DIR_EGRESS, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_TCP, IPPROTO_UDP, PORT_ANY,
    PROTO_ANY, Reason, TENANT_ANY, icmp_port, program_names::TC_FROM_WORKLOAD, program_names::TC_TO_WORKLOAD,
};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use ztseg_integration::{TC_ACT_OK, TC_ACT_SHOT, TestDatapath, frame, ip, workload};

const A: u32 = 300;
/// Peers: (identity, tenant, IPv4, IPv6). Tenant 0: no tenant.
const PEERS: [(u32, u32, &str, &str); 4] = [
    (301, 1, "10.0.1.1", "fd00:1::1"),
    (302, 1, "10.0.1.2", "fd00:1::2"),
    (303, 2, "10.0.2.3", "fd00:2::3"),
    (304, 0, "10.0.3.4", "fd00:3::4"),
];
/// A CIDR peer (identity 400) and an address no map knows (world).
const CIDR_ADDR: (&str, &str) = ("192.168.7.7", "fd00:99::7");
const WORLD_ADDR: (&str, &str) = ("8.8.4.4", "2001:db8::4");
const PORTS: [u16; 3] = [80, 443, 53];

fn pick<T: Copy>(rng: &mut SmallRng, v: &[T]) -> T {
    v[rng.random_range(0..v.len())]
}

/// A random protocol/port pair as policy keys carry them (a port only with a protocol).
fn proto_port(rng: &mut SmallRng) -> (u8, u16) {
    match rng.random_range(0..6) {
        0 => (PROTO_ANY, PORT_ANY),
        1 => (pick(rng, &[IPPROTO_TCP, IPPROTO_UDP]), PORT_ANY),
        2 => (IPPROTO_ICMP, icmp_port(8)),
        3 => (IPPROTO_ICMPV6, icmp_port(128)),
        _ => (pick(rng, &[IPPROTO_TCP, IPPROTO_UDP]), pick(rng, &PORTS)),
    }
}

/// Install a random policy: tenant rules and grants, admin rules, CIDR peer, failsafe, audit.
/// Every fourth round puts the workload in audit mode, every third has a failsafe port.
fn random_policy(rng: &mut SmallRng, dp: &TestDatapath, round: u32) {
    let mut w = dp.writer();
    let audit = round % 4 == 3;
    let mut wl = workload(A, 1, Some("10.0.0.1"), Some("fd00::1"));
    wl.audit = audit;
    w.set_interface_workload(1, &wl).unwrap();
    for (id, tenant, v4, v6) in PEERS {
        w.set_identity(ip(v4), id, tenant).unwrap();
        w.set_identity(ip(v6), id, tenant).unwrap();
    }
    if rng.random_bool(0.7) {
        w.set_cidr(ip("192.168.0.0"), 16, 400, 0).unwrap();
        w.set_cidr(ip("fd00:99::"), 32, 400, 0).unwrap();
    }
    if round % 3 == 1 {
        w.set_failsafe(&[(IPPROTO_TCP, pick(rng, &PORTS))]).unwrap();
    }
    let mut expiring = Vec::new();
    for _ in 0..rng.random_range(0..10) {
        let (proto, port) = proto_port(rng);
        let dir = pick(rng, &[DIR_EGRESS, DIR_INGRESS]);
        let peer = if rng.random_bool(0.3) { None } else { Some(pick(rng, &[301, 302, 303, 304, 400, 2])) };
        let rule = Rule {
            ranges: Vec::new(),
            keys: vec![Rule::key(dir, A, peer, proto, port)],
            action: if rng.random_bool(0.3) { Action::Deny } else { Action::Allow },
            ttl: rng.random_bool(0.2).then_some(Duration::from_millis(1)),
        };
        // A key may already belong to another rule: then this one is simply not installed.
        let Ok(h) = w.install(&rule) else { continue };
        if rule.ttl.is_some() {
            expiring.push(h.cookie);
        } else if rng.random_bool(0.1) {
            w.revoke(h.cookie).unwrap();
        }
    }
    // Port ranges around the ports flows use, overlapping each other and the exact keys.
    for _ in 0..rng.random_range(0..5) {
        let dir = pick(rng, &[DIR_EGRESS, DIR_INGRESS]);
        let peer = if rng.random_bool(0.3) { None } else { Some(pick(rng, &[301, 302, 303, 304, 400, 2])) };
        let (a, b) = (pick(rng, &PORTS), pick(rng, &PORTS));
        let (lo, hi) = (a.min(b).saturating_sub(rng.random_range(0..3)).max(1), a.max(b));
        let rule = Rule {
            keys: Vec::new(),
            ranges: vec![Rule::range(dir, A, peer, pick(rng, &[IPPROTO_TCP, IPPROTO_UDP]), lo, hi)],
            action: if rng.random_bool(0.3) { Action::Deny } else { Action::Allow },
            ttl: rng.random_bool(0.2).then_some(Duration::from_millis(1)),
        };
        let Ok(h) = w.install(&rule) else { continue };
        if rule.ttl.is_none() && rng.random_bool(0.1) {
            w.revoke(h.cookie).unwrap();
        }
    }
    for _ in 0..rng.random_range(0..4) {
        let (proto, port) = proto_port(rng);
        let key = AdminKey {
            src_tenant: pick(rng, &[1, 2, TENANT_ANY]),
            dst_tenant: pick(rng, &[1, 2, TENANT_ANY]),
            dport: port,
            proto,
            pad: 0,
        };
        let action = pick(rng, &[Action::Allow, Action::Deny, Action::Pass]);
        let _ = w.install_admin(&AdminRule { key, action, priority: rng.random_range(1..4), ttl: None });
    }
    drop(w);
    // Let the 1 ms grants expire.
    std::thread::sleep(Duration::from_millis(5));
}

/// The reason counters that moved, minus bookkeeping ones.
fn moved(
    before: &std::collections::BTreeMap<Reason, u64>,
    after: &std::collections::BTreeMap<Reason, u64>,
) -> Vec<Reason> {
    after
        .iter()
        .filter(|(r, n)| **n != before[*r])
        .map(|(r, _)| *r)
        .filter(|r| {
            !matches!(
                r,
                Reason::EventLost
                    | Reason::EventSuppressed
                    | Reason::CtFull
                    | Reason::LocalDelivery
                    | Reason::HandoffReparsed
            )
        })
        .collect()
}

/// Whether a port range's rule decided the flow.
fn decided_by_range(x: &enforcer::writer::explain::Explanation) -> bool {
    x.tenant
        .iter()
        .any(|p| matches!(p.key, ProbeKey::Range { .. }) && p.hit.is_some_and(|h| h.cookie == x.cookie))
}

#[test]
#[expect(clippy::too_many_lines, reason = "one differential loop: build a flow, explain it, run it, compare")]
fn explain_agrees_with_the_programs_on_random_policies_and_flows() {
    ztseg_integration::require_root();
    let seed: u64 = std::env::var("ZT_EXPLAIN_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_2026);
    eprintln!("explain differential test, seed {seed} (ZT_EXPLAIN_SEED)");
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut ephemeral: u16 = 20_000;
    let (mut compared, mut passed, mut by_reason) = (0u32, 0u32, std::collections::BTreeMap::new());
    let mut by_range = 0u32;
    for round in 0..16 {
        let mut dp = TestDatapath::new("explain");
        random_policy(&mut rng, &dp, round);
        let mut events = dp.events().unwrap();
        for q in 0..60 {
            let v6 = rng.random_bool(0.3);
            let (peer_v4, peer_v6) = match rng.random_range(0..6) {
                0 => CIDR_ADDR,
                1 => WORLD_ADDR,
                _ => {
                    let p = pick(&mut rng, &PEERS);
                    (p.2, p.3)
                }
            };
            let (local, peer) = if v6 { ("fd00::1", peer_v6) } else { ("10.0.0.1", peer_v4) };
            let dir = pick(&mut rng, &[DIR_EGRESS, DIR_INGRESS]);
            let kind = rng.random_range(0..3);
            ephemeral = ephemeral.wrapping_add(1).max(20_000);
            let (src, dst) = if dir == DIR_EGRESS { (local, peer) } else { (peer, local) };
            let (proto, port, frame) = match kind {
                0 => {
                    let port = pick(&mut rng, &PORTS);
                    let f = if v6 {
                        frame::tcp6(src, ephemeral, dst, port)
                    } else {
                        frame::tcp4(src, ephemeral, dst, port)
                    };
                    (IPPROTO_TCP, port, f)
                }
                1 => {
                    let port = pick(&mut rng, &PORTS);
                    let l4 = frame::udp(ephemeral, port, b"x");
                    let f = if v6 {
                        frame::frame6(src, dst, frame::UDP, &l4)
                    } else {
                        frame::frame4(src, dst, frame::UDP, &l4)
                    };
                    (IPPROTO_UDP, port, f)
                }
                _ => {
                    let (proto, ty) = if v6 { (IPPROTO_ICMPV6, 128) } else { (IPPROTO_ICMP, 8) };
                    let l4 = frame::icmp(ty, 0, ephemeral);
                    let f = if v6 {
                        frame::frame6(src, dst, proto, &l4)
                    } else {
                        frame::frame4(src, dst, proto, &l4)
                    };
                    (proto, icmp_port(ty), f)
                }
            };
            let query = Query { at: CheckPoint::Interface(1), dir, peer: ip(peer), proto, port };
            let x = dp.writer().explain(&query).unwrap();
            let before = dp.writer().counters().unwrap();
            let prog = if dir == DIR_EGRESS { TC_FROM_WORKLOAD } else { TC_TO_WORKLOAD };
            let verdict = dp.run(prog, &frame).unwrap();
            let after = dp.writer().counters().unwrap();
            let ctx = format!("round {round} query {q}: {query:?}\n{x:#?}");
            assert_eq!(verdict == TC_ACT_OK, x.pass, "verdict: {ctx}");
            assert!(verdict == TC_ACT_OK || verdict == TC_ACT_SHOT, "{verdict}: {ctx}");
            assert_eq!(moved(&before, &after), vec![x.reason], "reason: {ctx}");
            if let Some(e) = events.drain().last() {
                assert_eq!(e.cookie, x.cookie, "cookie: {ctx}\n{e:?}");
            }
            // The probes it shows are consistent with the decision.
            if x.reason == Reason::AllowPolicy || x.reason == Reason::DropPolicy {
                let hit = x.tenant.iter().filter_map(|p| p.hit).find(|h| h.cookie == x.cookie);
                assert_eq!(hit.map(|h| h.status), Some(RuleStatus::Live), "{ctx}");
                by_range += u32::from(decided_by_range(&x));
            }
            let expected_source = match peer {
                p if p == CIDR_ADDR.0 || p == CIDR_ADDR.1 => [PeerSource::Cidr, PeerSource::World],
                p if p == WORLD_ADDR.0 || p == WORLD_ADDR.1 => [PeerSource::World, PeerSource::World],
                _ => [PeerSource::Exact, PeerSource::Exact],
            };
            assert!(x.bypass.is_some() || expected_source.contains(&x.peer_source), "peer source: {ctx}");
            compared += 1;
            passed += u32::from(x.pass);
            *by_reason.entry(x.reason).or_insert(0u32) += 1;
        }
    }
    eprintln!(
        "{compared} flows compared, {passed} passed, {by_range} decided by a port range; by reason: {by_reason:?}"
    );
    assert!(by_range > 0, "no flow was decided by a port range");
    // The random policies (of the default seed) reached every decision explained here.
    for r in [
        Reason::AllowPolicy,
        Reason::AllowAdmin,
        Reason::AllowFailsafe,
        Reason::DropDefault,
        Reason::DropPolicy,
        Reason::DropAdmin,
        Reason::DropCrossTenant,
        Reason::Audit,
    ] {
        assert!(by_reason.contains_key(&r), "no case ended in {r:?}: {by_reason:?}");
    }
}

/// No workload at the check point: the programs drop (fail closed) and the explanation says so.
#[test]
fn explain_without_a_workload_is_a_drop() {
    ztseg_integration::require_root();
    let dp = TestDatapath::new("explain-none");
    let q = Query {
        at: CheckPoint::Interface(1),
        dir: DIR_EGRESS,
        peer: IpAddr::from([10, 0, 0, 2]),
        proto: IPPROTO_TCP,
        port: 80,
    };
    let x = dp.writer().explain(&q).unwrap();
    assert_eq!((x.pass, x.reason, x.local), (false, Reason::DropNoEndpoint, None));
    let mut dp = dp;
    assert_eq!(
        dp.run(TC_FROM_WORKLOAD, &frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 80)).unwrap(),
        TC_ACT_SHOT
    );
}

/// A cgroup-scoped workload is explained from the cgroup map, like an interface-scoped one:
/// the same local identity and the same decision for the same flows.
#[test]
fn explain_at_a_cgroup_check_point() {
    ztseg_integration::require_root();
    let dp = TestDatapath::new("explain-cg");
    {
        let mut w = dp.writer();
        let wl = workload(A, 1, Some("10.0.0.1"), None);
        w.set_interface_workload(1, &wl).unwrap();
        w.set_cgroup_workload(4242, &wl).unwrap();
        w.set_identity(ip("10.0.1.1"), 301, 1).unwrap();
        w.install(&Rule {
            ranges: Vec::new(),
            keys: vec![Rule::key(DIR_EGRESS, A, Some(301), IPPROTO_TCP, 443)],
            action: Action::Allow,
            ttl: None,
        })
        .unwrap();
    }
    for port in [443, 444] {
        let q = |at| Query { at, dir: DIR_EGRESS, peer: ip("10.0.1.1"), proto: IPPROTO_TCP, port };
        let by_cgroup = dp.writer().explain(&q(CheckPoint::Cgroup(4242))).unwrap();
        let by_interface = dp.writer().explain(&q(CheckPoint::Interface(1))).unwrap();
        assert_eq!(by_cgroup.local, Some((A, 1)));
        assert_eq!(by_cgroup, by_interface, "port {port}");
        assert_eq!(by_cgroup.pass, port == 443);
    }
    let none = dp.writer().explain(&Query {
        at: CheckPoint::Cgroup(4243),
        dir: DIR_EGRESS,
        peer: ip("10.0.1.1"),
        proto: IPPROTO_TCP,
        port: 443,
    });
    assert_eq!(none.unwrap().reason, Reason::DropNoEndpoint, "an unknown cgroup fails closed");
}
