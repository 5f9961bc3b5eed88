//! ICMP and ICMPv6 errors about a flow the workload has: destination unreachable (among them
//! IPv4 path MTU discovery's "fragmentation needed"), ICMPv6 packet too big, time exceeded and
//! parameter problem. Such an error quotes the packet it is about; when that packet belongs to
//! a flow this check point tracks and the flow is still admitted, the error passes as related
//! to it (`allow_related`), whoever sent it — a router on the path has no identity policy could
//! name. Otherwise policy judges it like any ICMP message.
//!
//! The check runs in its own programs, reached by a tail call from the workload's checks for
//! ICMP errors only: a second parse and two conntrack lookups more in those programs would cost
//! every other packet verifier budget they do not have.

use core::mem::MaybeUninit;

use aya_ebpf::{
    bindings::{TC_ACT_OK, TC_ACT_SHOT},
    helpers::bpf_skb_cgroup_id,
    programs::{SkBuffContext, TcContext, sk_buff::SkBuff},
};
use enforcer_common::{CtKey, CtKey4, DIR_EGRESS, DIR_INGRESS, Endpoint, Reason};

use crate::{DROP, Tuple, count, ct_live, endpoint, maps::ZT_CGROUPS, parse, verdict};

/// Whether conntrack holds a live entry of `ep` under `key` (read only: an error never moves
/// a flow's state).
#[inline(always)]
fn tracked<K: Tuple>(key: &K, ep: &Endpoint) -> bool {
    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
    unsafe { K::map().get(key) }.is_some_and(|ct| ct_live(ct, ep))
}

/// Whether the packet the error in `pkt` (network header at `l3`) quotes is of a flow this
/// check point of `ep` tracks: the packet went the other way than the error (it was checked in
/// the other direction), and it was either the flow's own packet or a reply to it. Not
/// inlined: the quoted packet and the keys live in its own stack frame, released before the
/// verdict runs.
#[inline(never)]
fn related<P: parse::Packet>(pkt: &P, l3: usize, ep: &Endpoint, family: u8, dir: u8) -> bool {
    let mut q = MaybeUninit::<parse::Quoted>::uninit();
    if parse::quoted(pkt, l3, family, &mut q).is_err() {
        return false;
    }
    // SAFETY: initialised, as `quoted` does whenever it returns Ok.
    let q = unsafe { q.assume_init() };
    let quoted_dir = if dir == DIR_EGRESS { DIR_INGRESS } else { DIR_EGRESS };
    let proto_dir = q.proto | (u32::from(quoted_dir) << 8);
    if family == 4 {
        // SAFETY: CtKey4 is repr(C), four u32 words in this order (saddr, daddr, ports, proto/dir).
        let key: CtKey4 = unsafe { core::mem::transmute([q.saddr[3], q.daddr[3], q.ports, proto_dir]) };
        tracked(&key, ep) || tracked(&key.swapped(), ep)
    } else {
        let (s, d) = (q.saddr, q.daddr);
        // SAFETY: CtKey is repr(C), ten u32 words: saddr, daddr, ports, proto/dir.
        let key: CtKey = unsafe {
            core::mem::transmute([s[0], s[1], s[2], s[3], d[0], d[1], d[2], d[3], q.ports, proto_dir])
        };
        tracked(&key, ep) || tracked(&key.swapped(), ep)
    }
}

/// The body of `zt_tc_related_from` / `zt_tc_related_to`: an ICMP error the workload's check
/// in direction `dir` parsed (its address checked) and handed over.
#[inline(always)]
pub fn check(ctx: &TcContext, dir: u8) -> i32 {
    let skb: &SkBuff = &ctx.skb;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*skb.skb).ifindex };
    let mut flow = MaybeUninit::<parse::Flow>::uninit();
    if parse::parse_l2(&parse::Direct::new(skb), &mut flow).is_err() {
        // The caller parsed the same bytes; never expected.
        count(Reason::DropMalformed);
        return TC_ACT_SHOT;
    }
    // SAFETY: the parser initialised the flow, as it does whenever it returns Ok.
    let mut flow = unsafe { flow.assume_init() };
    // Only errors are handed over (and this spares the verifier every other kind of packet).
    if !flow.untracked || !parse::icmp_error(&flow) {
        count(Reason::DropMalformed);
        return TC_ACT_SHOT;
    }
    let Some(ep) = endpoint(ifindex) else {
        count(Reason::DropNoEndpoint);
        return TC_ACT_SHOT;
    };
    flow.set_dir(dir);
    if related(&parse::Direct::new(skb), parse::ETH_HLEN, ep, flow.family, dir) {
        count(Reason::AllowRelated);
        return TC_ACT_OK;
    }
    if verdict(&flow, ep, dir, ifindex) == DROP { TC_ACT_SHOT } else { TC_ACT_OK }
}

/// The same for a cgroup-scoped workload: the body of `zt_cg_related_egress` /
/// `zt_cg_related_ingress` (1 pass, 0 drop).
#[inline(always)]
pub fn check_cgroup(ctx: &SkBuffContext, dir: u8) -> i32 {
    let skb: &SkBuff = &ctx.skb;
    let pkt = parse::Loaded(skb);
    let mut flow = MaybeUninit::<parse::Flow>::uninit();
    if parse::parse_l3(&pkt, &mut flow).is_err() {
        count(Reason::DropMalformed);
        return 0;
    }
    // SAFETY: the parser initialised the flow, as it does whenever it returns Ok.
    let mut flow = unsafe { flow.assume_init() };
    if !flow.untracked || !parse::icmp_error(&flow) {
        count(Reason::DropMalformed);
        return 0;
    }
    // SAFETY: helper on the program's own context.
    let cgid = unsafe { bpf_skb_cgroup_id(skb.skb) };
    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
    let Some(ep) = (unsafe { ZT_CGROUPS.get(&cgid) }) else {
        count(Reason::DropNoEndpoint);
        return 0;
    };
    flow.set_dir(dir);
    if related(&pkt, 0, ep, flow.family, dir) {
        count(Reason::AllowRelated);
        return 1;
    }
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*skb.skb).ifindex };
    i32::from(verdict(&flow, ep, dir, ifindex) != DROP)
}
