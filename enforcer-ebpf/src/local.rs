//! Local delivery: a packet from one local workload to another passes the sender's egress
//! check and the receiver's ingress check in one program run and is handed straight to the
//! receiver's namespace (`bpf_redirect_peer`), instead of crossing the host's IP layer, the
//! neighbour and queueing layers, a veth transmit and a second program run.
//!
//! The host still chooses the way. The packet qualifies only if the kernel's own FIB lookup,
//! asked with the packet's input interface, addresses, TOS/flow label, protocol and ports,
//! forwards it (forwarding enabled, MTU fits) to an interface userspace has marked
//! [`LINK_F_PEER`], with a resolved neighbour; the frame is then rewritten exactly as the IP
//! forwarding path would (MAC addresses from that lookup, TTL or hop limit decremented).
//! Anything else — frames not addressed to the host, TTL 1, IPv4 options, unresolved
//! neighbours, other interfaces — takes the kernel path unchanged. What this path skips on the
//! host: netfilter's forwarding hooks and their connection tracking, which is why only flows
//! whose first packet took it may use it (see `CT_F_LOCAL`): a flow the host NATed keeps
//! returning through the host.

use aya_ebpf::{
    bindings::{
        TC_ACT_OK, TC_ACT_SHOT, bpf_fib_lookup, bpf_fib_lookup__bindgen_ty_1, bpf_fib_lookup__bindgen_ty_2,
        bpf_fib_lookup__bindgen_ty_3, bpf_fib_lookup__bindgen_ty_4, bpf_fib_lookup__bindgen_ty_5,
    },
    helpers::{bpf_fib_lookup as fib_lookup, bpf_redirect_peer},
    programs::TcContext,
};
use core::mem::MaybeUninit;
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, ENDPOINT_ARRAY_SIZE, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, LINK_F_PEER, Reason,
};

use crate::{
    DROP, PASS_NEW, count, endpoint,
    maps::{ZT_DELIVER, ZT_HANDOFF, ZT_LINKS},
    own_address, parse,
    parse::Flow,
    unmark_local, verdict,
};

// Local delivery runs in its own program, reached by a tail call once the sender's check has
// passed: the verifier walks a called function once per caller state, and the verdict twice
// plus the lookup in one program would exceed its instruction budget and the 512-byte stack.
// The sender's program leaves its verdict in the packet's control buffer (`cb[0]`, which
// lives with the packet across the tail call) and the parsed packet in a per-CPU slot
// ([`Handoff`]), so the packet is parsed once.

/// What the sender's check hands to the delivery program: the parsed packet and, as a sanity
/// check (the slot is this packet's because nothing runs on the CPU in between), its input
/// interface and length.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Handoff {
    flow: Flow,
    ifindex: u32,
    len: u32,
}

/// Where a packet goes and the Ethernet addresses it gets on the way.
pub struct Target {
    ifindex: u32,
    /// Destination then source MAC: the first twelve bytes of the rewritten frame.
    macs: [u8; 12],
    /// IPv4: the TTL/protocol word as found (network order); IPv6: the hop limit's word.
    ttl_word: u16,
}

const ETH_HLEN: usize = 14;
const PACKET_HOST: u32 = 0;
const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Whether the packet `flow`, arriving from the workload on `ifindex`, can be delivered
/// locally; if so `out` is initialised.
#[inline(never)]
fn target(ctx: &TcContext, flow: &Flow, ifindex: u32, out: &mut MaybeUninit<Target>) -> bool {
    let skb = ctx.skb.skb;
    // SAFETY: reading a field of the program's own context.
    if unsafe { (*skb).pkt_type } != PACKET_HOST {
        return false;
    }
    // First word of the IP header (version/IHL and TOS, or version, traffic class and flow
    // label), and the TTL/protocol or payload-length/next/hop words.
    let Ok(head) = ctx.load::<u32>(ETH_HLEN) else { return false };
    let v4 = flow.family == 4;
    let ttl_off = if v4 { ETH_HLEN + 8 } else { ETH_HLEN + 6 };
    let Ok(ttl_word) = ctx.load::<u16>(ttl_off) else { return false };
    // Network byte order in memory: for IPv4 the TTL is the first byte of the word, for IPv6
    // the hop limit the second.
    let [b0, b1] = ttl_word.to_ne_bytes();
    let ttl = if v4 { b0 } else { b1 };
    if ttl <= 1 {
        return false;
    }
    let [ver_ihl, tos, _, _] = head.to_ne_bytes();
    if v4 && ver_ihl != 0x45 {
        return false;
    }
    let ported = matches!(flow.proto(), IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
    let (sport, dport) = if ported { (flow.sport().to_be(), flow.dport().to_be()) } else { (0, 0) };
    let (src, dst, family, anon2) = if v4 {
        (
            [flow.saddr[3], 0, 0, 0],
            [flow.daddr[3], 0, 0, 0],
            AF_INET,
            bpf_fib_lookup__bindgen_ty_2 { flowinfo: u32::from(tos) },
        )
    } else {
        // Traffic class and flow label: the first word without the version nibble.
        let flowinfo = head & u32::from_be(0x0fff_ffff);
        (flow.saddr, flow.daddr, AF_INET6, bpf_fib_lookup__bindgen_ty_2 { flowinfo })
    };
    let mut p = bpf_fib_lookup {
        family,
        l4_protocol: flow.proto(),
        sport,
        dport,
        // 0: the helper checks the packet itself against the egress MTU (GSO aware).
        __bindgen_anon_1: bpf_fib_lookup__bindgen_ty_1 { tot_len: 0 },
        ifindex,
        __bindgen_anon_2: anon2,
        __bindgen_anon_3: bpf_fib_lookup__bindgen_ty_3 { ipv6_src: src },
        __bindgen_anon_4: bpf_fib_lookup__bindgen_ty_4 { ipv6_dst: dst },
        __bindgen_anon_5: bpf_fib_lookup__bindgen_ty_5 { tbid: 0 },
        smac: [0; 6],
        dmac: [0; 6],
    };
    // SAFETY: helper on the program's own context with a parameter block of the declared size.
    let rc = unsafe { fib_lookup(skb.cast(), &raw mut p, core::mem::size_of::<bpf_fib_lookup>() as i32, 0) };
    // 0 = BPF_FIB_LKUP_RET_SUCCESS: forwarded, neighbour resolved.
    if rc != 0 || p.ifindex == ifindex || p.ifindex >= ENDPOINT_ARRAY_SIZE {
        return false;
    }
    match ZT_LINKS.get(p.ifindex) {
        Some(flags) if flags & LINK_F_PEER != 0 => {}
        _ => return false,
    }
    let (d, s) = (p.dmac, p.smac);
    out.write(Target {
        ifindex: p.ifindex,
        macs: [d[0], d[1], d[2], d[3], d[4], d[5], s[0], s[1], s[2], s[3], s[4], s[5]],
        ttl_word,
    });
    true
}

/// Continue in the delivery program with the sender's verdict `v` on `flow` (does not return
/// when the tail call succeeds). If it fails the packet takes the kernel path, where the
/// receiver's own program judges it.
#[inline(always)]
pub fn hand_over(ctx: &mut TcContext, flow: &Flow, v: u32) -> i32 {
    // Without the slot (impossible for a one-element array) the packet takes the kernel path,
    // and so do the flow's later packets: none of them reaches the delivery program.
    let Some(h) = ZT_HANDOFF.get_ptr_mut(0) else { return TC_ACT_OK };
    // SAFETY: this CPU's slot; nothing else runs on the CPU until the delivery program has
    // read it.
    unsafe {
        (*h).flow = *flow;
        (*h).ifindex = (*ctx.skb.skb).ifindex;
        (*h).len = (*ctx.skb.skb).len;
    }
    ctx.cb_mut()[0] = v;
    // SAFETY: tail call with the program's own context; on success control never returns.
    unsafe { ZT_DELIVER.tail_call(ctx, 0) };
    TC_ACT_OK
}

/// The delivery program's body, for a packet whose sender's egress check passed with
/// `cb[0]` = `PASS_NEW` or `PASS_LOCAL`: the way, the receiver's ingress check, the forwarding
/// rewrite and the hand-over. Returns the TC verdict; `TC_ACT_OK` leaves the packet to the
/// kernel path.
#[inline(always)]
pub fn deliver(ctx: &TcContext) -> i32 {
    let sender = ctx.cb()[0];
    let mut f = MaybeUninit::<Flow>::uninit();
    if !handed_over(ctx, &mut f) {
        return TC_ACT_OK;
    }
    // SAFETY: `handed_over` initialised it, as it does whenever it returns true.
    let mut f = unsafe { f.assume_init() };
    // Routed by the host, so never link-local housekeeping at the receiver.
    f.link_local = false;
    // SAFETY: reading a field of the program's own context.
    let from = unsafe { (*ctx.skb.skb).ifindex };
    let mut t = MaybeUninit::<Target>::uninit();
    // An unmanaged receiver, or one whose address this is not, is left to the kernel path,
    // where its own program judges (and drops) the packet.
    let ep = if target(ctx, &f, from, &mut t) {
        // SAFETY: `target` initialised it, as it does whenever it returns true.
        endpoint(unsafe { t.assume_init_ref() }.ifindex).filter(|ep| own_address(&f, ep, DIR_INGRESS))
    } else {
        None
    };
    let Some(ep) = ep else {
        if sender == PASS_NEW {
            // The sender's entry was created marked for this path, which the flow's first
            // packet does not take after all: its later packets must not either.
            unmark_local(&f);
        }
        return TC_ACT_OK;
    };
    // SAFETY: initialised whenever an endpoint was found.
    let t = unsafe { t.assume_init_ref() };
    f.set_dir(DIR_INGRESS);
    // Entries the receiver's check creates take this path; the sender is a local workload
    // whose own address its egress check verified, so its RST ends the flow at the
    // receiver's check point too (a remote peer's RST could be forged and only marks the flow
    // closing).
    f.deliver = true;
    f.source_verified = true;
    let v = verdict(&f, ep, DIR_INGRESS, t.ifindex);
    if v == DROP {
        return TC_ACT_SHOT;
    }
    if !rewrite(ctx, t, f.family) {
        // The receiver's program checks it again on the kernel path; conntrack now says pass.
        return TC_ACT_OK;
    }
    count(Reason::LocalDelivery);
    // SAFETY: helper without pointer arguments.
    unsafe { bpf_redirect_peer(t.ifindex, 0) as i32 }
}

/// The parsed packet the sender's check handed over, into `out`; parsed again if the slot is
/// not this packet's (it always is: a mismatch would be a bug, and costs only the parse).
#[inline(always)]
fn handed_over(ctx: &TcContext, out: &mut MaybeUninit<Flow>) -> bool {
    // SAFETY: reading fields of the program's own context.
    let (ifindex, len) = unsafe { ((*ctx.skb.skb).ifindex, (*ctx.skb.skb).len) };
    if let Some(h) = ZT_HANDOFF.get(0) {
        if h.ifindex == ifindex && h.len == len {
            out.write(h.flow);
            return true;
        }
    }
    count(Reason::HandoffReparsed);
    if parse::parse_l2(&parse::Direct::new(&ctx.skb), out).is_err() {
        return false;
    }
    // SAFETY: the parser initialised the flow, as it does whenever it returns Ok.
    let f = unsafe { out.assume_init_mut() };
    f.set_dir(DIR_EGRESS);
    f.deliver = true;
    true
}

/// What the IP forwarding path does to a frame: new Ethernet addresses, TTL (with the header
/// checksum) or hop limit one lower.
#[inline(always)]
fn rewrite(ctx: &TcContext, t: &Target, family: u8) -> bool {
    if ctx.store(0, &t.macs, 0).is_err() {
        return false;
    }
    let [b0, b1] = t.ttl_word.to_ne_bytes();
    if family == 4 {
        let new = u16::from_ne_bytes([b0 - 1, b1]);
        ctx.l3_csum_replace(ETH_HLEN + 10, u64::from(t.ttl_word), u64::from(new), 2).is_ok()
            && ctx.store(ETH_HLEN + 8, &new, 0).is_ok()
    } else {
        ctx.store(ETH_HLEN + 7, &(b1 - 1), 0).is_ok()
    }
}
