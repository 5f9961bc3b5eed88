//! ztseg kernel data plane.
//!
//! Programs:
//! - `zt_tc_from_wl` / `zt_tc_to_wl`: TC (TCX on Linux ≥ 6.6) on the host side of a workload's
//!   interface; egress and ingress checks of that workload.
//! - `zt_cg_egress` / `zt_cg_ingress`: cgroup_skb for cgroup-scoped workloads (from L3).
//! - `zt_connect4/6`, `zt_sendmsg4/6`: cgroup sock_addr hooks, so a denied local connect fails
//!   at once with `EPERM` instead of timing out.
//!
//! Decision order: malformed → drop; admin tier; explicit deny; allow (exact key, then
//! wildcard probes); default deny. Conntrack only caches allows and re-checks the admitting
//! rule's slot on every packet. Requires Linux ≥ 5.8 (ring buffer); TCX needs ≥ 6.6.
#![no_std]
#![no_main]

use core::mem::MaybeUninit;

mod local;
mod maps;
mod parse;
mod policy;
mod related;

use aya_ebpf::{
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP, TC_ACT_OK, TC_ACT_SHOT},
    helpers::{bpf_get_current_cgroup_id, bpf_ktime_get_coarse_ns, bpf_skb_cgroup_id},
    macros::{cgroup_skb, cgroup_sock_addr, classifier},
    maps::HashMap,
    programs::{SkBuffContext, SockAddrContext, TcContext, sk_buff::SkBuff},
};
use enforcer_common::{
    CT_F_AUDIT, CT_F_CLOSING, CT_F_FAILSAFE, CT_F_LOCAL, Config, CtKey, CtKey4, CtValue, DIR_EGRESS,
    DIR_INGRESS, ENDPOINT_F_AUDIT, ENDPOINT_F_HAS_V4, ENDPOINT_F_HAS_V6, EVENT_SLOT_FIRST, EVENT_SLOT_SHARED,
    EVENT_SLOT_TOTAL, EVENT_SLOTS, Endpoint, Event, IDENTITY_F_LOCAL, IDENTITY_WORLD, IPPROTO_ICMP,
    IPPROTO_ICMPV6, IPPROTO_TCP, IdentityInfo, MAX_FAILSAFE, Reason, SLOT_NONE, SuppressedKey, TENANT_NONE,
    VERDICT_ALLOW, VERDICT_AUDIT, VERDICT_DROP,
};
use maps::{
    ZT_CGROUPS, ZT_CIDR, ZT_CONFIG, ZT_COUNTERS, ZT_CT4, ZT_CT6, ZT_ENDPOINTS, ZT_ENDPOINTS_HASH,
    ZT_EVENT_BUDGET, ZT_EVENTS, ZT_IDENTITY, ZT_RELATED, ZT_RELATED_CG_EGRESS, ZT_RELATED_CG_INGRESS,
    ZT_SUPPRESSED,
};
use parse::{Flow, ParseError};
use policy::{Local, decide, still_admitted};

#[inline(always)]
fn count(reason: Reason) {
    if let Some(p) = ZT_COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
        unsafe { *p += 1 };
    }
}

/// Tick-resolution monotonic time for conntrack bookkeeping (idle GC), much cheaper than
/// `bpf_ktime_get_ns`. Expiry checks use the precise clock.
#[inline(always)]
fn coarse_now() -> u64 {
    // SAFETY: helper without arguments.
    unsafe { bpf_ktime_get_coarse_ns() }
}

/// Default used when the config element is missing (never after a load): no shapes, so every
/// new flow is denied — fail closed.
static EMPTY_CONFIG: Config = Config {
    policy_shape_count: [0; 6],
    admin_shape_count: [0; enforcer_common::ADMIN_SHAPES],
    policy_deny_count: 0,
    cidr_count: 0,
    flow_events: 0,
    failsafe_count: 0,
    local_delivery: 0,
    event_interval_ns: 0,
    event_burst: 0,
    event_total_interval_ns: 0,
    event_total_burst: 0,
    abi_version: 0,
    ct_epoch: 0,
    range_shape_count: [0; enforcer_common::RANGE_SHAPES],
    range_deny_count: 0,
    failsafe: [enforcer_common::Failsafe { port: 0, proto: 0, pad: 0 }; MAX_FAILSAFE],
};

#[inline(always)]
fn config() -> &'static Config {
    ZT_CONFIG.get(0).unwrap_or(&EMPTY_CONFIG)
}

/// Pending event bytes that trigger an explicit reader wakeup (a quarter of the ring).
const WAKEUP_BYTES: u64 = 256 * 1024;
/// Ring-buffer space of one event: the record plus its 8-byte header, rounded to 8.
const RECORD_BYTES: u64 = ((core::mem::size_of::<Event>() as u64 + 8) + 7) & !7;

/// Pack verdict, reason and direction with the interface index for [`emit`] (BPF calls take at
/// most five arguments).
#[inline(always)]
fn meta(verdict: u8, reason: Reason, dir: u8, ifindex: u32) -> u64 {
    u64::from(verdict) | (u64::from(reason as u8) << 8) | (u64::from(dir) << 16) | (u64::from(ifindex) << 32)
}

/// Write one event into the ring buffer, field by field in place (no stack copy); a full ring
/// counts as `EventLost`.
#[inline(never)]
fn emit(flow: &Flow, ep: &Endpoint, peer: &IdentityInfo, meta: u64, cookie: u32) {
    let now = coarse_now();
    if !event_budget(now, ep.event_slot) {
        count(Reason::EventSuppressed);
        let key =
            SuppressedKey { identity: ep.identity, verdict: meta as u8, reason: (meta >> 8) as u8, pad: 0 };
        match ZT_SUPPRESSED.get_ptr_mut(&key) {
            // SAFETY: per-CPU value, no concurrent writer on this CPU while the program runs.
            Some(n) => unsafe { *n += 1 },
            None => {
                let _ = ZT_SUPPRESSED.insert(&key, &1, 0);
            }
        }
        return;
    }
    let Some(mut entry) = ZT_EVENTS.reserve::<Event>(0) else {
        count(Reason::EventLost);
        return;
    };
    let e = entry.as_mut_ptr();
    // SAFETY: `e` points at a reserved, exclusively owned ring-buffer record of Event size.
    unsafe {
        (*e).ts_ns = now;
        (*e).cookie = cookie;
        (*e).local_identity = ep.identity;
        (*e).peer_identity = peer.identity;
        (*e).local_tenant = ep.tenant;
        (*e).peer_tenant = peer.tenant;
        (*e).ifindex = (meta >> 32) as u32;
        (*e).saddr = flow.saddr;
        (*e).daddr = flow.daddr;
        (*e).sport = flow.sport();
        (*e).dport = flow.policy_port;
        (*e).proto = flow.proto();
        (*e).family = flow.family;
        (*e).dir = (meta >> 16) as u8;
        (*e).verdict = meta as u8;
        (*e).reason = (meta >> 8) as u8;
        (*e).pad1 = 0;
        (*e).pad2 = 0;
        (*e).pad4 = 0;
    }
    // Wake the reader only when the pending data crosses the threshold: a wakeup per event
    // costs microseconds (irq_work + IPI) on the packet path, and once the threshold is passed
    // the reader has been told. The reader also polls on a short timer.
    let pending = ZT_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let flags = if pending >= WAKEUP_BYTES && pending < WAKEUP_BYTES + RECORD_BYTES {
        BPF_RB_FORCE_WAKEUP
    } else {
        BPF_RB_NO_WAKEUP
    };
    entry.submit(u64::from(flags));
}

/// Whether the endpoint with event budget `slot` may emit one more event on this CPU now,
/// under the configured rate limit (generic cell rate algorithm: each event moves the budget
/// time `event_interval_ns` ahead; an event that would move it more than `event_burst`
/// intervals past now is suppressed). Drop floods thus cost the event reader, the daemon and
/// the controller a bounded amount of work, and one workload's flood leaves the others' events
/// alone; the per-reason counters still count every packet.
#[inline(always)]
fn event_budget(now: u64, slot: u32) -> bool {
    let cfg = config();
    if cfg.event_interval_ns == 0 {
        return true;
    }
    // A slot out of range (never written so) uses the shared one.
    let slot = if (EVENT_SLOT_FIRST..EVENT_SLOTS).contains(&slot) { slot } else { EVENT_SLOT_SHARED };
    let Some(own) = ZT_EVENT_BUDGET.get_ptr_mut(slot) else { return true };
    // SAFETY: per-CPU slot, no concurrent writer on this CPU while the program runs.
    let Some(own_next) = gcra(unsafe { *own }, now, cfg.event_interval_ns, cfg.event_burst) else {
        return false;
    };
    if cfg.event_total_interval_ns != 0 {
        let Some(total) = ZT_EVENT_BUDGET.get_ptr_mut(EVENT_SLOT_TOTAL) else { return true };
        // SAFETY: as above.
        let Some(total_next) =
            gcra(unsafe { *total }, now, cfg.event_total_interval_ns, cfg.event_total_burst)
        else {
            return false;
        };
        // SAFETY: as above.
        unsafe { *total = total_next };
    }
    // SAFETY: as above.
    unsafe { *own = own_next };
    true
}

/// One more event against a budget spent down to empty at `spent`: the new value, or `None`
/// if that would move it more than `burst` intervals past `now`.
#[inline(always)]
fn gcra(spent: u64, now: u64, interval: u32, burst: u32) -> Option<u64> {
    let interval = u64::from(interval);
    let next = if spent > now { spent } else { now } + interval;
    if next - now > interval * u64::from(burst) { None } else { Some(next) }
}

/// Identity of a peer address: exact map, then CIDR trie (only if any CIDR exists), else world.
#[inline(always)]
fn peer_identity(cfg: &Config, addr: &enforcer_common::Addr) -> IdentityInfo {
    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
    if let Some(id) = unsafe { ZT_IDENTITY.get(addr) } {
        return *id;
    }
    if cfg.cidr_count != 0 {
        let key = aya_ebpf::maps::lpm_trie::Key::new(128, enforcer_common::CidrAddr { addr: *addr });
        if let Some(id) = ZT_CIDR.get(&key) {
            return *id;
        }
    }
    IdentityInfo { identity: IDENTITY_WORLD, tenant: TENANT_NONE, flags: 0 }
}

#[inline(always)]
fn failsafe(cfg: &Config, proto: u8, port: u16) -> bool {
    let n = cfg.failsafe_count as usize;
    let mut i = 0;
    while i < MAX_FAILSAFE && i < n {
        let f = &cfg.failsafe[i];
        if f.port == port && f.proto == proto {
            return true;
        }
        i += 1;
    }
    false
}

/// Whether a conntrack entry still admits its flow: created for this workload under the
/// current generation (see `Config::ct_epoch`), and backed by what admitted it.
#[inline(always)]
fn ct_live(ct: &CtValue, ep: &Endpoint) -> bool {
    if ct.epoch != ep.ct_epoch || ct.local_identity != ep.identity {
        return false;
    }
    if ct.flags & CT_F_AUDIT != 0 {
        return ep.flags & ENDPOINT_F_AUDIT != 0;
    }
    if ct.flags & CT_F_FAILSAFE != 0 {
        return true;
    }
    still_admitted(ct.slot, ct.cookie)
}

// Conntrack keys are built and turned around as whole 32-bit words: a key assembled from 8-
// and 16-bit stores and then hashed with 32-bit loads stalls the CPU on every mixed word (no
// store-to-load forwarding), which costs more than the hash itself. The parser keeps ports
// and protocol as such words (`Flow::ports`, `Flow::proto_dir`), so an IPv6 key is the flow
// itself and an IPv4 key four word copies. The word layout assumes a little-endian target.
#[cfg(not(target_endian = "little"))]
compile_error!("conntrack key packing assumes a little-endian BPF target");

/// A conntrack key type and the map that holds it.
trait Tuple: Sized + 'static {
    fn map() -> &'static HashMap<Self, CtValue>;
    /// The key of the opposite orientation (a reply), with the other check direction.
    fn swapped(&self) -> Self;
}

impl Tuple for CtKey4 {
    #[inline(always)]
    fn map() -> &'static HashMap<Self, CtValue> {
        &ZT_CT4
    }
    #[inline(always)]
    fn swapped(&self) -> Self {
        // SAFETY: CtKey4 is repr(C), 16 bytes, four u32-aligned words, every bit pattern valid.
        let w: [u32; 4] = unsafe { core::mem::transmute(*self) };
        // SAFETY: as above.
        unsafe { core::mem::transmute([w[1], w[0], w[2].rotate_left(16), w[3] ^ (1 << 8)]) }
    }
}

impl Tuple for CtKey {
    #[inline(always)]
    fn map() -> &'static HashMap<Self, CtValue> {
        &ZT_CT6
    }
    #[inline(always)]
    fn swapped(&self) -> Self {
        // SAFETY: CtKey is repr(C), 40 bytes, ten u32-aligned words, every bit pattern valid.
        let w: [u32; 10] = unsafe { core::mem::transmute(*self) };
        // SAFETY: as above.
        unsafe {
            core::mem::transmute([
                w[4],
                w[5],
                w[6],
                w[7],
                w[0],
                w[1],
                w[2],
                w[3],
                w[8].rotate_left(16),
                w[9] ^ (1 << 8),
            ])
        }
    }
}

/// The IPv4 conntrack key of a flow whose direction is set.
#[inline(always)]
fn key4(flow: &Flow) -> CtKey4 {
    let w = [flow.saddr[3], flow.daddr[3], flow.ports, flow.proto_dir];
    // SAFETY: CtKey4 is repr(C), four u32 words in this order (saddr, daddr, ports, proto/dir).
    unsafe { core::mem::transmute::<[u32; 4], CtKey4>(w) }
}

/// How a packet ends its flow, for the conntrack entry it passes on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Ending {
    /// Not a closing packet.
    No,
    /// FIN, or an RST from the peer: garbage collection may free the entry soon after it goes
    /// idle (a peer's address can be forged, so its RST alone does not end the flow here).
    Closing,
    /// RST sent by the local workload itself (its source address is checked): the flow is
    /// over, the entry is removed as the RST passes. Any later packet is judged by policy.
    /// The same at the receiver's check on the local delivery path, where the sender is a
    /// workload of this host whose address its egress check verified.
    Reset,
}

#[inline(always)]
fn ending(flow: &Flow, dir: u8) -> Ending {
    if flow.reset && (dir == DIR_EGRESS || flow.source_verified) {
        Ending::Reset
    } else if flow.closing {
        Ending::Closing
    } else {
        Ending::No
    }
}

// Conntrack results travel as plain integers: an enum with a payload on only some variants
// lets the compiler fill the unused payload bits from whatever register is at hand — a map
// value pointer, which the verifier then refuses to see shifted.

/// [`ct_check`]: no entry.
const CT_MISS: u32 = 0;
/// [`ct_check`]: the entry's rule no longer admits it; the entry was removed.
const CT_DEAD: u32 = 1;
/// [`ct_check`]: still backed by its rule, pass; the entry's flags are in bits 8 and up.
const CT_LIVE: u32 = 2;

/// Conntrack lookup of `key`, updating the entry it finds if it is live. A dead one (its
/// rule no longer admits it) is removed if `own` (the packet travels in the entry's
/// orientation: its flow is judged again as new and re-created if admitted); as a reply's
/// entry it stays for the flow's own next packet, and garbage collection.
#[inline(always)]
fn ct_check<K: Tuple>(key: &K, ep: &Endpoint, now: u64, end: Ending, own: bool) -> u32 {
    let Some(p) = K::map().get_ptr_mut(key) else { return CT_MISS };
    // SAFETY: the value stays valid for this program run; races on the statistics fields with
    // other CPUs are benign.
    let ct = unsafe { &mut *p };
    if ct_live(ct, ep) {
        let flags = ct.flags;
        match end {
            Ending::No => {
                ct.last_seen_ns = now;
                ct.packets += 1;
            }
            Ending::Closing => {
                ct.last_seen_ns = now;
                ct.packets += 1;
                ct.flags |= CT_F_CLOSING;
            }
            Ending::Reset => {
                let _ = K::map().remove(key);
            }
        }
        CT_LIVE | (flags << 8)
    } else {
        if own {
            let _ = K::map().remove(key);
            count(Reason::CtInvalidated);
        }
        CT_DEAD
    }
}

/// [`track`]: not tracked.
const TRACK_MISS: u32 = 0;
/// [`track`]: this check point admitted the flow in this orientation before, but its rule no
/// longer does (the entry was removed).
const TRACK_REINSTATE: u32 = 1;
/// [`track`]: a reply to a tracked flow, pass; entry flags in bits 8 and up.
const TRACK_REPLY: u32 = 2;
/// [`track`]: a packet of a tracked flow in its own orientation, pass; flags as above.
const TRACK_ESTABLISHED: u32 = 3;
/// [`track`]: this check point admitted the flow this packet answers (the other orientation),
/// but its rule no longer does: that flow is judged again.
const TRACK_REJUDGE: u32 = 4;

/// Conntrack lookups of a packet in its own orientation and as a reply. `reply_first`: the
/// packet is known to answer (a TCP SYN-ACK, an echo reply), so the reply orientation is
/// looked up first and usually alone; the outcome is the same either way, only the number of
/// lookups differs.
#[inline(always)]
fn track<K: Tuple>(key: &K, ep: &Endpoint, now: u64, end: Ending, reply_first: bool) -> u32 {
    let mut reply = CT_MISS;
    if reply_first {
        reply = ct_check(&key.swapped(), ep, now, end, false);
        if reply & 0xff == CT_LIVE {
            return (reply & !0xff) | TRACK_REPLY;
        }
    }
    let own = ct_check(key, ep, now, end, true);
    if own & 0xff == CT_LIVE {
        return (own & !0xff) | TRACK_ESTABLISHED;
    }
    if !reply_first {
        reply = ct_check(&key.swapped(), ep, now, end, false);
        if reply & 0xff == CT_LIVE {
            return (reply & !0xff) | TRACK_REPLY;
        }
    }
    if own == CT_DEAD {
        TRACK_REINSTATE
    } else if reply == CT_DEAD {
        TRACK_REJUDGE
    } else {
        TRACK_MISS
    }
}

/// Failsafe ports, then policy: the decision for a new flow of `ep` with `peer`.
#[inline(always)]
fn judge(
    cfg: &Config,
    ep: &Endpoint,
    peer: &IdentityInfo,
    dir: u8,
    proto: u8,
    port: u16,
) -> policy::Decision {
    if cfg.failsafe_count != 0
        && proto != IPPROTO_ICMP
        && proto != IPPROTO_ICMPV6
        && failsafe(cfg, proto, port)
    {
        return policy::Decision { allow: true, reason: Reason::AllowFailsafe, cookie: 0, slot: SLOT_NONE };
    }
    let local = Local { identity: ep.identity, tenant: ep.tenant };
    decide(cfg, &local, peer, dir, proto, port)
}

/// The policy port of the flow a packet answers: the packet's source port, or for an echo
/// reply the echo request's type.
#[inline(always)]
fn answered_port(flow: &Flow) -> u16 {
    match flow.proto() {
        IPPROTO_ICMP => enforcer_common::ICMP_PORT_BASE | 8,
        IPPROTO_ICMPV6 => enforcer_common::ICMP_PORT_BASE | 128,
        _ => flow.sport(),
    }
}

/// [`verdict`] outcomes.
const DROP: u32 = 0;
const PASS: u32 = 1;
/// Pass, and the flow may take local delivery (its conntrack entry carries [`CT_F_LOCAL`]).
const PASS_LOCAL: u32 = 2;
/// Pass; a conntrack entry for the flow was created just now and the peer is a workload of
/// this host (the entry is marked for local delivery if the flow asked for it,
/// `Flow::deliver`).
const PASS_NEW: u32 = 3;

/// The verdict for one parsed packet of the workload `ep`, checked in direction `dir`:
/// [`DROP`], [`PASS`], [`PASS_LOCAL`] or [`PASS_NEW`]. (Whether the packet goes on by local
/// delivery is not an argument: the verifier would walk this function once per value.)
#[inline(never)]
fn verdict(flow: &Flow, ep: &Endpoint, dir: u8, ifindex: u32) -> u32 {
    if flow.link_local {
        count(Reason::PassLinkLocal);
        return PASS;
    }
    let ts = coarse_now();
    // A pure TCP SYN opens a new connection: it is never a packet or a reply of a tracked
    // flow, so it goes straight to policy (which then replaces any stale entry). ICMP other
    // than echo is never tracked: policy judges each such packet.
    // `reinstate`: this check point admitted the flow in this orientation before, but its
    // rule no longer does; if policy still allows it, the entry is re-created under the rule
    // that does (make-before-break policy changes keep live flows).
    // `rejudge`: this check point admitted the flow this packet answers, but its rule no
    // longer does: that flow is judged again in its own direction, and this packet passes as
    // its reply if policy still admits it, or is dropped as the reply of a flow no longer
    // admitted (the flow's own next packet re-creates or removes the entry).
    let mut reinstate = false;
    let mut rejudge = false;
    if !flow.syn_only && !flow.untracked {
        let reply_first = flow.syn_ack || flow.answer;
        let t = if flow.family == 4 {
            track(&key4(flow), ep, ts, ending(flow, dir), reply_first)
        } else {
            track(flow.key6(), ep, ts, ending(flow, dir), reply_first)
        };
        match t & 0xff {
            TRACK_MISS => {}
            TRACK_REINSTATE => reinstate = true,
            TRACK_REJUDGE => rejudge = true,
            kind => {
                count(if kind == TRACK_REPLY { Reason::AllowReply } else { Reason::AllowEstablished });
                return if (t >> 8) & CT_F_LOCAL != 0 { PASS_LOCAL } else { PASS };
            }
        }
    }

    let cfg = config();
    let peer_addr = if dir == DIR_EGRESS { &flow.daddr } else { &flow.saddr };
    let peer = peer_identity(cfg, peer_addr);
    let (jdir, jport) = if rejudge {
        (if dir == DIR_EGRESS { DIR_INGRESS } else { DIR_EGRESS }, answered_port(flow))
    } else {
        (dir, flow.policy_port)
    };
    let d = judge(cfg, ep, &peer, jdir, flow.proto(), jport);
    let (allow, reason, cookie, slot) = (d.allow, d.reason, d.cookie, d.slot);
    if rejudge && allow {
        count(Reason::AllowReply);
        return PASS;
    }
    let flags = if reason == Reason::AllowFailsafe { CT_F_FAILSAFE } else { 0 };

    let audit = !allow && ep.flags & ENDPOINT_F_AUDIT != 0;
    // Only a SYN starts TCP state (or a re-admitted flow of this orientation): a mid-stream
    // packet that policy allows passes without state, so the side that answered a connection
    // can never become its initiator — which would let the real initiator's packets pass as
    // "replies" after its grant was revoked. Untracked ICMP and echo replies never start
    // state either.
    let stateful = if flow.proto() == IPPROTO_TCP {
        flow.syn_only || reinstate || audit
    } else {
        !flow.untracked && !flow.answer
    };
    if allow && !stateful {
        count(reason);
        return PASS;
    }
    if allow || audit {
        // A flow between two workloads of this host, checked where local delivery is decided,
        // is created marked for it; the delivery program clears the mark if this packet does
        // not take that path after all (see `local::deliver`).
        let local = flow.deliver && cfg.local_delivery != 0 && peer.flags & IDENTITY_F_LOCAL != 0;
        let value = CtValue {
            created_ns: ts,
            last_seen_ns: ts,
            packets: 1,
            epoch: ep.ct_epoch,
            cookie,
            slot: if audit { SLOT_NONE } else { slot },
            local_identity: ep.identity,
            flags: if audit { CT_F_AUDIT } else { flags } | if local { CT_F_LOCAL } else { 0 },
        };
        // (Audited untracked ICMP and echo replies get no entry: each such packet is audited.)
        let mut tracked = false;
        if stateful {
            let inserted = if flow.family == 4 {
                ZT_CT4.insert(&key4(flow), &value, 0)
            } else {
                ZT_CT6.insert(flow.key6(), &value, 0)
            };
            tracked = inserted.is_ok();
            if !tracked {
                count(Reason::CtFull);
            }
        }
        if audit {
            count(Reason::Audit);
            emit(flow, ep, &peer, meta(VERDICT_AUDIT, reason, dir, ifindex), cookie);
        } else {
            count(reason);
            if cfg.flow_events != 0 {
                emit(flow, ep, &peer, meta(VERDICT_ALLOW, reason, dir, ifindex), cookie);
            }
        }
        // Only a flow between two workloads of this host can take local delivery: others do
        // not pay for trying.
        return if tracked && peer.flags & IDENTITY_F_LOCAL != 0 { PASS_NEW } else { PASS };
    }
    count(reason);
    emit(flow, ep, &peer, meta(VERDICT_DROP, reason, dir, ifindex), cookie);
    DROP
}

/// Drop reasons that come before any policy (parse errors): counted and reported.
#[inline(always)]
fn parse_drop(err: ParseError) -> Option<Reason> {
    match err {
        ParseError::Arp => {
            count(Reason::PassLinkLocal);
            None
        }
        ParseError::NonIp => Some(Reason::DropNonIp),
        ParseError::Malformed => Some(Reason::DropMalformed),
        ParseError::Fragment => Some(Reason::DropFragment),
    }
}

/// Anti-spoofing: the workload's own address must be the source (egress) or destination
/// (ingress) of everything crossing its interface.
#[inline(always)]
fn own_address(flow: &Flow, ep: &Endpoint, dir: u8) -> bool {
    let local = if dir == DIR_EGRESS { &flow.saddr } else { &flow.daddr };
    if flow.family == 4 {
        ep.flags & ENDPOINT_F_HAS_V4 != 0 && *local == ep.addr_v4
    } else {
        ep.flags & ENDPOINT_F_HAS_V6 != 0 && *local == ep.addr_v6
    }
}

/// fe80::/10.
#[inline(always)]
fn link_local_unicast(a: &enforcer_common::Addr) -> bool {
    let [b0, b1, _, _] = a[0].to_ne_bytes();
    b0 == 0xfe && b1 & 0xc0 == 0x80
}

/// Multicast of interface-local or link-local scope (ff01::/16, ff02::/16 and the other flag
/// combinations of those scopes).
#[inline(always)]
fn link_scope_multicast(a: &enforcer_common::Addr) -> bool {
    let [b0, b1, _, _] = a[0].to_ne_bytes();
    b0 == 0xff && matches!(b1 & 0x0f, 1 | 2)
}

/// Whether neighbour discovery or MLD (`Flow::link_local`: type and hop limit checked) stays
/// on the link the workload is attached to, and so passes without policy. Leaving the
/// workload, it must come from the workload's own address, a link-local one or the
/// unspecified one (duplicate address detection), addressed link-scoped or to another
/// workload of this host (its neighbour on a shared bridge): so the host never routes it on
/// towards anything else. Entering, its hop limit shows it was not routed (the host or a
/// neighbour on the link sent it), to a link-scoped address or the workload's own. Anything
/// else of these types is judged by policy like any packet.
#[inline(always)]
fn housekeeping(flow: &Flow, ep: &Endpoint, dir: u8) -> bool {
    let own = |a: &enforcer_common::Addr| ep.flags & ENDPOINT_F_HAS_V6 != 0 && *a == ep.addr_v6;
    let link_dst = link_local_unicast(&flow.daddr) || link_scope_multicast(&flow.daddr);
    if dir == DIR_EGRESS {
        (link_local_unicast(&flow.saddr) || flow.saddr == [0; 4] || own(&flow.saddr))
            && (link_dst
                || (!own(&flow.daddr)
                    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
                    && unsafe { ZT_IDENTITY.get(&flow.daddr) }.is_some_and(|p| p.flags & IDENTITY_F_LOCAL != 0)))
    } else {
        link_dst || own(&flow.daddr)
    }
}

/// The workload behind interface `ifindex`, if one is registered.
#[inline(always)]
fn endpoint(ifindex: u32) -> Option<&'static Endpoint> {
    if ifindex < enforcer_common::ENDPOINT_ARRAY_SIZE {
        ZT_ENDPOINTS.get(ifindex).filter(|ep| ep.flags & enforcer_common::ENDPOINT_F_VALID != 0)
    } else {
        // SAFETY: read-only access to a map value the kernel keeps alive for this run.
        unsafe { ZT_ENDPOINTS_HASH.get(&ifindex) }
    }
}

#[inline(always)]
fn tc_main(ctx: &mut TcContext, dir: u8) -> i32 {
    let skb: &SkBuff = &ctx.skb;
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*skb.skb).ifindex };
    let mut flow = MaybeUninit::<Flow>::uninit();
    let mut flow = match parse::parse_l2(&parse::Direct::new(skb), &mut flow) {
        // SAFETY: the parser initialised the flow, as it does whenever it returns Ok.
        Ok(()) => unsafe { flow.assume_init() },
        Err(e) => {
            return match parse_drop(e) {
                None => TC_ACT_OK,
                Some(r) => {
                    count(r);
                    TC_ACT_SHOT
                }
            };
        }
    };
    let Some(ep) = endpoint(ifindex) else {
        count(Reason::DropNoEndpoint);
        return TC_ACT_SHOT;
    };
    if flow.link_local && !housekeeping(&flow, ep, dir) {
        flow.link_local = false;
    }
    if !flow.link_local && !own_address(&flow, ep, dir) {
        count(Reason::DropSpoofed);
        let peer = IdentityInfo::default();
        emit(&flow, ep, &peer, meta(VERDICT_DROP, Reason::DropSpoofed, dir, ifindex), 0);
        return TC_ACT_SHOT;
    }
    flow.set_dir(dir);
    if flow.untracked && parse::icmp_error(&flow) {
        // An error about one of the workload's flows passes as related to it (`related.rs`);
        // with no program in the slot, policy judges it below.
        // SAFETY: tail call with the program's own context; on success control never returns.
        let _ = unsafe { ZT_RELATED.tail_call(ctx, u32::from(dir != DIR_EGRESS)) };
    }
    // Local delivery is decided where a workload's packet enters the host, for the first
    // packet of a flow or a later one of a flow whose first packet took it. Entries the first
    // packet creates are marked for it (and unmarked if the way turns out to be another).
    flow.deliver = dir == DIR_EGRESS;
    let v = verdict(&flow, ep, dir, ifindex);
    if v == DROP {
        return TC_ACT_SHOT;
    }
    if dir == DIR_EGRESS && (v == PASS_NEW || v == PASS_LOCAL) && config().local_delivery != 0 {
        return local::hand_over(ctx, &flow, v);
    }
    TC_ACT_OK
}

/// Clear the local delivery mark of the conntrack entry `flow` just created (its own
/// orientation): its first packet did not take that path.
#[inline(always)]
fn unmark_local(flow: &Flow) {
    let p = if flow.family == 4 { ZT_CT4.get_ptr_mut(&key4(flow)) } else { ZT_CT6.get_ptr_mut(flow.key6()) };
    if let Some(ct) = p {
        // SAFETY: map value valid for this program run; a flag bit, no other writer sets it.
        unsafe { (*ct).flags &= !CT_F_LOCAL };
    }
}

/// Packets leaving a workload: attached at the host-side interface's ingress.
#[classifier]
pub fn zt_tc_from_wl(mut ctx: TcContext) -> i32 {
    tc_main(&mut ctx, DIR_EGRESS)
}

/// Packets entering a workload: attached at the host-side interface's egress.
#[classifier]
pub fn zt_tc_to_wl(mut ctx: TcContext) -> i32 {
    tc_main(&mut ctx, DIR_INGRESS)
}

/// ICMP errors leaving a workload (tail call from `zt_tc_from_wl`, never attached): passed if
/// related to a tracked flow, else judged by policy. See `related.rs`.
#[classifier]
pub fn zt_tc_related_from(ctx: TcContext) -> i32 {
    related::check(&ctx, DIR_EGRESS)
}

/// ICMP errors entering a workload (tail call from `zt_tc_to_wl`, never attached).
#[classifier]
pub fn zt_tc_related_to(ctx: TcContext) -> i32 {
    related::check(&ctx, DIR_INGRESS)
}

/// ICMP errors leaving a cgroup-scoped workload (tail call from `zt_cg_egress`, never
/// attached). See `related.rs`.
#[cgroup_skb(egress)]
pub fn zt_cg_related_egress(ctx: SkBuffContext) -> i32 {
    related::check_cgroup(&ctx, DIR_EGRESS)
}

/// ICMP errors entering a cgroup-scoped workload (tail call from `zt_cg_ingress`).
#[cgroup_skb(ingress)]
pub fn zt_cg_related_ingress(ctx: SkBuffContext) -> i32 {
    related::check_cgroup(&ctx, DIR_INGRESS)
}

/// Local delivery (tail call from `zt_tc_from_wl`, never attached): the receiving workload's
/// ingress check, then the packet goes straight to its namespace. See `local.rs`.
#[classifier]
pub fn zt_tc_deliver(ctx: TcContext) -> i32 {
    local::deliver(&ctx)
}

#[inline(always)]
fn cg_main(ctx: &SkBuffContext, dir: u8) -> i32 {
    let skb: &SkBuff = &ctx.skb;
    let mut flow = MaybeUninit::<Flow>::uninit();
    let mut flow = match parse::parse_l3(&parse::Loaded(skb), &mut flow) {
        // SAFETY: the parser initialised the flow, as it does whenever it returns Ok.
        Ok(()) => unsafe { flow.assume_init() },
        Err(e) => {
            return match parse_drop(e) {
                None => 1,
                Some(r) => {
                    count(r);
                    0
                }
            };
        }
    };
    // SAFETY: helper on the program's own context.
    let cgid = unsafe { bpf_skb_cgroup_id(skb.skb) };
    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
    let Some(ep) = (unsafe { ZT_CGROUPS.get(&cgid) }) else {
        count(Reason::DropNoEndpoint);
        return 0;
    };
    // SAFETY: reading a field of the program's own context.
    let ifindex = unsafe { (*skb.skb).ifindex };
    if flow.link_local && !housekeeping(&flow, ep, dir) {
        flow.link_local = false;
    }
    flow.set_dir(dir);
    if flow.untracked && parse::icmp_error(&flow) {
        // As for TC workloads (`related.rs`); with no program in the slot, policy judges it.
        // SAFETY: tail call with the program's own context; on success control never returns.
        let _ = unsafe {
            if dir == DIR_EGRESS {
                ZT_RELATED_CG_EGRESS.tail_call(ctx, 0)
            } else {
                ZT_RELATED_CG_INGRESS.tail_call(ctx, 0)
            }
        };
    }
    i32::from(verdict(&flow, ep, dir, ifindex) != DROP)
}

#[cgroup_skb(ingress)]
pub fn zt_cg_ingress(ctx: SkBuffContext) -> i32 {
    cg_main(&ctx, DIR_INGRESS)
}

#[cgroup_skb(egress)]
pub fn zt_cg_egress(ctx: SkBuffContext) -> i32 {
    cg_main(&ctx, DIR_EGRESS)
}

/// Whether a datagram from `ctx`'s socket to `peer`:`peer_port` answers a flow the
/// workload's ingress check admitted (a UDP server's reply): the socket's bound port and a
/// local address — the bound one, the one chosen for this message, or the workload's
/// registered one — name that flow's conntrack entry.
#[inline(always)]
fn answers_tracked(
    ctx: &SockAddrContext,
    ep: &Endpoint,
    peer: &enforcer_common::Addr,
    peer_port: u16,
    proto: u8,
    v4: bool,
    v6_hook: bool,
) -> bool {
    let p = ctx.sock_addr;
    // SAFETY: field reads of the program's own context; `sk` is the socket the call is on.
    let sk = unsafe { (*p).__bindgen_anon_1.sk };
    if sk.is_null() {
        return false;
    }
    // SAFETY: as above; the verifier allows these reads of a sock_addr program's socket.
    let local_port = unsafe { core::ptr::read_volatile(&raw const (*sk).src_port) } as u16;
    if local_port == 0 {
        return false;
    }
    // Each word its own load (see `sock_main`).
    // SAFETY: as above.
    let candidates: [enforcer_common::Addr; 3] = unsafe {
        [
            {
                // Both read, then one chosen: a pointer chosen between the two fields would be
                // arithmetic on the socket pointer, which the verifier refuses.
                let ip4 = core::ptr::read_volatile(&raw const (*sk).src_ip4);
                let ip6 = [
                    core::ptr::read_volatile(&raw const (*sk).src_ip6[0]),
                    core::ptr::read_volatile(&raw const (*sk).src_ip6[1]),
                    core::ptr::read_volatile(&raw const (*sk).src_ip6[2]),
                    core::ptr::read_volatile(&raw const (*sk).src_ip6[3]),
                ];
                if v4 { [ip6[0], ip6[1], ip6[2], ip4] } else { ip6 }
            },
            // Only the hook's own family of message source is readable.
            if v6_hook {
                [
                    core::ptr::read_volatile(&raw const (*p).msg_src_ip6[0]),
                    core::ptr::read_volatile(&raw const (*p).msg_src_ip6[1]),
                    core::ptr::read_volatile(&raw const (*p).msg_src_ip6[2]),
                    core::ptr::read_volatile(&raw const (*p).msg_src_ip6[3]),
                ]
            } else {
                [0, 0, 0, core::ptr::read_volatile(&raw const (*p).msg_src_ip4)]
            },
            if v4 { ep.addr_v4 } else { ep.addr_v6 },
        ]
    };
    let [bound, chosen, registered] = candidates;
    // The entry's key: the answered flow as it arrived (peer → local), checked at ingress.
    let ports = u32::from(peer_port) | (u32::from(local_port) << 16);
    let proto_dir = u32::from(proto) | (u32::from(DIR_INGRESS) << 8);
    let key = [ports, proto_dir];
    live_reply_entry(ep, peer, &bound, key, v4)
        || live_reply_entry(ep, peer, &chosen, key, v4)
        || live_reply_entry(ep, peer, &registered, key, v4)
}

/// Whether conntrack holds a live entry (for `ep`) of the flow from
/// `peer` to `local` with the key words `ports_proto` (an unknown, all-zero `local` has none).
#[inline(always)]
fn live_reply_entry(
    ep: &Endpoint,
    peer: &enforcer_common::Addr,
    local: &enforcer_common::Addr,
    ports_proto: [u32; 2],
    v4: bool,
) -> bool {
    let [ports, proto_dir] = ports_proto;
    // IPv4: the last word (for an IPv4 socket the other words of a bound address are not an
    // address; for a dual-stack one they are the mapped prefix).
    let found = if v4 {
        if local[3] == 0 {
            return false;
        }
        let w = [peer[3], local[3], ports, proto_dir];
        // SAFETY: CtKey4 is repr(C), four u32 words in this order.
        let key = unsafe { core::mem::transmute::<[u32; 4], CtKey4>(w) };
        // SAFETY: read-only access to a map value the kernel keeps alive for this run.
        unsafe { ZT_CT4.get(&key) }.copied()
    } else {
        if *local == [0; 4] {
            return false;
        }
        let w =
            [peer[0], peer[1], peer[2], peer[3], local[0], local[1], local[2], local[3], ports, proto_dir];
        // SAFETY: CtKey is repr(C), ten u32 words in this order.
        let key = unsafe { core::mem::transmute::<[u32; 10], CtKey>(w) };
        // SAFETY: read-only access to a map value the kernel keeps alive for this run.
        unsafe { ZT_CT6.get(&key) }.copied()
    };
    found.is_some_and(|ct| ct_live(&ct, ep))
}

/// connect()/sendmsg() check: 1 lets the call proceed, 0 fails it with EPERM. No conntrack
/// entry is created here; the packets that follow are checked by the cgroup_skb programs.
/// A datagram sent (`sendmsg`) in answer to a flow the workload's ingress check admitted
/// proceeds as the reply it is.
#[inline(always)]
fn sock_main(ctx: &SockAddrContext, v6: bool, sendmsg: bool) -> i32 {
    // SAFETY: reading fields of the program's own context.
    let sa = unsafe { &*ctx.sock_addr };
    let proto = sa.protocol as u8;
    if proto != enforcer_common::IPPROTO_TCP
        && proto != enforcer_common::IPPROTO_UDP
        && proto != enforcer_common::IPPROTO_SCTP
    {
        // ICMP sockets and others are judged per packet by cgroup_skb.
        return 1;
    }
    // SAFETY: helper without arguments.
    let cgid = unsafe { bpf_get_current_cgroup_id() };
    // SAFETY: read-only access to a map value the kernel keeps alive for this run.
    let Some(ep) = (unsafe { ZT_CGROUPS.get(&cgid) }) else {
        count(Reason::DropNoEndpoint);
        return 0;
    };
    // user_ip4/user_ip6 hold network-order bytes, as Addr words do. Each word is its own
    // volatile load: the verifier refuses loads through a ctx pointer moved by a copy loop.
    let p = ctx.sock_addr;
    // SAFETY: field reads of the program's own context.
    let daddr = unsafe {
        if v6 {
            [
                core::ptr::read_volatile(&raw const (*p).user_ip6[0]),
                core::ptr::read_volatile(&raw const (*p).user_ip6[1]),
                core::ptr::read_volatile(&raw const (*p).user_ip6[2]),
                core::ptr::read_volatile(&raw const (*p).user_ip6[3]),
            ]
        } else {
            parse::mapped(core::ptr::read_volatile(&raw const (*p).user_ip4))
        }
    };
    let dport = u16::from_be(sa.user_port as u16);
    let flow = Flow {
        saddr: [0; 4],
        daddr,
        ports: u32::from(dport) << 16,
        proto_dir: u32::from(proto) | (u32::from(DIR_EGRESS) << 8),
        policy_port: dport,
        family: if v6 && (daddr[0] != 0 || daddr[1] != 0 || daddr[2] != enforcer_common::V4_MAPPED_WORD) {
            6
        } else {
            4
        },
        link_local: false,
        syn_only: false,
        syn_ack: false,
        closing: false,
        reset: false,
        untracked: false,
        answer: false,
        deliver: false,
        source_verified: false,
    };
    if sendmsg && proto != IPPROTO_TCP && answers_tracked(ctx, ep, &daddr, dport, proto, flow.family == 4, v6)
    {
        return 1;
    }
    let cfg = config();
    let peer = peer_identity(cfg, &daddr);
    if cfg.failsafe_count != 0 && failsafe(cfg, proto, dport) {
        return 1;
    }
    let local = Local { identity: ep.identity, tenant: ep.tenant };
    let d = decide(cfg, &local, &peer, DIR_EGRESS, proto, dport);
    if d.allow {
        return 1;
    }
    if ep.flags & ENDPOINT_F_AUDIT != 0 {
        count(Reason::Audit);
        emit(&flow, ep, &peer, meta(VERDICT_AUDIT, d.reason, DIR_EGRESS, 0), d.cookie);
        return 1;
    }
    count(d.reason);
    emit(&flow, ep, &peer, meta(VERDICT_DROP, d.reason, DIR_EGRESS, 0), d.cookie);
    0
}

#[cgroup_sock_addr(connect4)]
pub fn zt_connect4(ctx: SockAddrContext) -> i32 {
    sock_main(&ctx, false, false)
}

#[cgroup_sock_addr(connect6)]
pub fn zt_connect6(ctx: SockAddrContext) -> i32 {
    sock_main(&ctx, true, false)
}

#[cgroup_sock_addr(sendmsg4)]
pub fn zt_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_main(&ctx, false, true)
}

#[cgroup_sock_addr(sendmsg6)]
pub fn zt_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_main(&ctx, true, true)
}

/// An empty classifier: the floor `cargo xtask bench datapath` measures every case against.
/// Never attached.
#[classifier]
pub fn zt_floor(_ctx: TcContext) -> i32 {
    TC_ACT_OK
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
