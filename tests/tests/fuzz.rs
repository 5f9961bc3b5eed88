//! Fuzz the real TC programs with at least 1,000,000 random and mutated frames through
//! `BPF_PROG_TEST_RUN`. Oracle: with one allow rule installed (A → B tcp/80), every frame that
//! passes is ARP, IPv6 link-local housekeeping, or a flow the rule admits (its event carries
//! the rule's cookie and names B, tcp, 80); the kernel never returns an error other than
//! refusing to build an skb from a frame shorter than its headers.

use enforcer::{Rule, events::Verdict, writer::Action};
use enforcer_common::{
    DIR_EGRESS, Reason,
    program_names::{TC_FROM_WORKLOAD, TC_TO_WORKLOAD},
};
use rand::{Rng as _, SeedableRng as _, rngs::SmallRng};
use ztseg_integration::{TC_ACT_OK, TC_ACT_SHOT, TestDatapath, frame, ip, workload};

const FRAMES: u64 = 1_000_000;

fn seeds() -> Vec<Vec<u8>> {
    vec![
        frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 80),
        frame::tcp4("10.0.0.1", 1000, "10.0.0.2", 81),
        frame::tcp6("fd00::1", 1000, "fd00::2", 80),
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

fn is_arp(f: &[u8]) -> bool {
    f.len() >= 14 && f[12..14] == [0x08, 0x06]
}

#[test]
fn million_frames_none_passes_without_a_rule() {
    let mut dp = TestDatapath::new("fuzz");
    let mut events = dp.events().unwrap();
    let cookie = {
        let mut w = dp.writer();
        w.set_interface_workload(1, &workload(800, 1, Some("10.0.0.1"), Some("fd00::1"))).unwrap();
        w.set_identity(ip("10.0.0.2"), 801, 1).unwrap();
        w.set_identity(ip("fd00::2"), 801, 1).unwrap();
        w.install(&Rule {
            keys: vec![Rule::key(DIR_EGRESS, 800, Some(801), frame::TCP, 80)],
            action: Action::Allow,
            ttl: None,
        })
        .unwrap()
        .cookie
    };
    let seeds = seeds();
    let mut rng = SmallRng::seed_from_u64(0x2757_0001);
    let (mut ran, mut refused, mut passed) = (0u64, 0u64, 0u64);
    let mut bad = Vec::new();
    while ran < FRAMES {
        let f = mutate(&mut rng, &seeds);
        let prog = if rng.random_bool(0.8) { TC_FROM_WORKLOAD } else { TC_TO_WORKLOAD };
        match dp.run(prog, &f) {
            Ok(v) => {
                ran += 1;
                assert!(v == TC_ACT_OK || v == TC_ACT_SHOT, "unexpected verdict {v}");
                if v == TC_ACT_OK {
                    passed += 1;
                    if !is_arp(&f)
                        && f.get(12..14) != Some(&[0x86, 0xdd][..])
                        && f.get(12..14) != Some(&[0x08, 0x00][..])
                    {
                        bad.push(format!("non-IP non-ARP frame passed: {f:02x?}"));
                    }
                }
            }
            // The kernel refuses to build an skb from frames shorter than their L3 header.
            Err(aya::programs::ProgramError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::EINVAL) =>
            {
                refused += 1;
            }
            Err(e) => panic!("test run error on {f:02x?}: {e}"),
        }
        if ran % 4096 == 0 {
            check_events(&mut events, cookie, &mut bad);
        }
        assert!(bad.len() < 10, "violations:\n{}", bad.join("\n"));
    }
    check_events(&mut events, cookie, &mut bad);
    assert!(bad.is_empty(), "violations:\n{}", bad.join("\n"));
    // Every pass is explained by a counter of an allowed reason; nothing was let through by
    // any other path (audit is off, no admin rules, no failsafe).
    let c = dp.writer().counters().unwrap();
    let explained = c[&Reason::AllowPolicy]
        + c[&Reason::AllowEstablished]
        + c[&Reason::AllowReply]
        + c[&Reason::PassLinkLocal];
    assert_eq!(explained, passed, "{c:?}");
    assert_eq!(c[&Reason::AllowAdmin] + c[&Reason::Audit] + c[&Reason::AllowFailsafe], 0);
    assert!(c[&Reason::DropMalformed] > 10_000, "mutations reach the malformed paths: {c:?}");
    eprintln!("fuzz: {ran} frames run, {refused} refused by the kernel, {passed} passed; counters {c:?}");
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
