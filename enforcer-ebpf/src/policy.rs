//! Verdict for a new flow: admin tier, then the tenant tier's exact key and wildcard probes,
//! then its port ranges, then default deny. Every rule is honoured only while its rule-state
//! slot admits it, so an expired grant denies from the next packet without userspace.

use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_PASS, ADMIN_SHAPES, AdminKey, Config, DIR_EGRESS, IDENTITY_ANY,
    INTERVALS_PER_KEY, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IdentityInfo, POLICY_SHAPE_PEER,
    POLICY_SHAPE_PORT, POLICY_SHAPE_PROTO, POLICY_SHAPES, PORT_ANY, PROTO_ANY, PolicyKey, RANGE_SHAPES,
    RULE_F_ACTIVE, RangeSet, Reason, TENANT_ANY, TENANT_NONE,
};

use aya_ebpf::helpers::bpf_ktime_get_ns;

use crate::maps::{ZT_ADMIN, ZT_POLICY, ZT_RANGES, ZT_RULES};

pub struct Decision {
    pub allow: bool,
    pub reason: Reason,
    pub cookie: u32,
    pub slot: u32,
}

impl Decision {
    #[inline(always)]
    const fn new(allow: bool, reason: Reason, cookie: u32, slot: u32) -> Self {
        Self { allow, reason, cookie, slot }
    }
}

/// Whether the rule in `slot` is live and still `cookie`'s. The precise clock is read only for
/// rules that expire, so permanent rules cost one array lookup.
#[inline(always)]
fn rule_admits(slot: u32, cookie: u32) -> bool {
    match ZT_RULES.get(slot) {
        Some(st) => {
            st.cookie == cookie
                && st.flags & RULE_F_ACTIVE != 0
                // SAFETY: helper without arguments.
                && (st.expires_at == 0 || unsafe { bpf_ktime_get_ns() } < st.expires_at)
        }
        None => false,
    }
}

/// Whether conntrack state bound to (`slot`, `cookie`) is still backed by a live rule.
#[inline(always)]
pub fn still_admitted(slot: u32, cookie: u32) -> bool {
    rule_admits(slot, cookie)
}

// Lookup keys are written as whole 32-bit words (see the conntrack keys in main.rs: a word
// assembled from narrower stores stalls the hash's loads). Little-endian packing.

#[inline(always)]
fn policy_key(src: u32, dst: u32, dport: u16, proto: u8, dir: u8) -> PolicyKey {
    let w = [src, dst, u32::from(dport) | (u32::from(proto) << 16) | (u32::from(dir) << 24)];
    // SAFETY: PolicyKey is repr(C): src, dst, then dport/proto/dir in the third word.
    unsafe { core::mem::transmute::<[u32; 3], PolicyKey>(w) }
}

#[inline(always)]
fn admin_key(src_tenant: u32, dst_tenant: u32, dport: u16, proto: u8) -> AdminKey {
    let w = [src_tenant, dst_tenant, u32::from(dport) | (u32::from(proto) << 16)];
    // SAFETY: AdminKey is repr(C): two tenants, then dport/proto/zero pad in the third word.
    unsafe { core::mem::transmute::<[u32; 3], AdminKey>(w) }
}

/// The deny (or, with `ALLOW`, the allow) rule of the interval of `set` that holds `port`, as
/// `cookie << 32 | slot`; 0 if no interval holds it. Branch-free over every interval: the
/// intervals are disjoint, so masking each one's fields by whether it holds the port and
/// OR-ing them picks the one that does, and the verifier walks the scan once per path. Not
/// inlined: the unrolled scan would need more of the caller's stack than the programs have.
#[inline(never)]
fn interval_rule<const ALLOW: bool>(set: &RangeSet, port: u16) -> u64 {
    let p = i64::from(port);
    let len = i64::from(set.len);
    let mut found = 0u64;
    let mut i = 0usize;
    while i < INTERVALS_PER_KEY {
        let r = &set.intervals[i];
        let d = p - i64::from(r.lo);
        let width = i64::from(r.hi) - i64::from(r.lo) + 1;
        // All ones iff 0 <= d < width and i < len: the sign bits of !d, d - width, i - len.
        let m = ((!d & (d - width) & (i as i64 - len)) >> 63) as u64;
        let rule = if ALLOW {
            (u64::from(r.allow_cookie) << 32) | u64::from(r.allow_slot)
        } else {
            (u64::from(r.deny_cookie) << 32) | u64::from(r.deny_slot)
        };
        found |= rule & m;
        i += 1;
    }
    found
}

pub struct Local {
    pub identity: u32,
    pub tenant: u32,
}

/// Decide a new flow between the local workload and `peer`, checked in direction `dir`.
#[inline(always)]
pub fn decide(cfg: &Config, local: &Local, peer: &IdentityInfo, dir: u8, proto: u8, port: u16) -> Decision {
    let egress = dir == DIR_EGRESS;
    let (src_t, dst_t) = if egress { (local.tenant, peer.tenant) } else { (peer.tenant, local.tenant) };

    // ---- admin tier: lowest priority number among live matches wins.
    let mut best_prio = u32::MAX;
    let mut best_action = 0u32;
    let mut best_cookie = 0u32;
    let mut best_slot = 0u32;
    let mut shape = 0usize;
    while shape < ADMIN_SHAPES {
        if cfg.admin_shape_count[shape] != 0 {
            let tenants = shape / 3;
            let ports = shape % 3;
            let key = admin_key(
                if tenants & 2 != 0 { TENANT_ANY } else { src_t },
                if tenants & 1 != 0 { TENANT_ANY } else { dst_t },
                if ports == 0 { port } else { PORT_ANY },
                if ports == 2 { PROTO_ANY } else { proto },
            );
            // SAFETY: read-only access to a map value the kernel keeps alive for this run.
            if let Some(v) = unsafe { ZT_ADMIN.get(&key) } {
                if v.priority < best_prio && rule_admits(v.slot, v.cookie) {
                    best_prio = v.priority;
                    best_action = v.action;
                    best_cookie = v.cookie;
                    best_slot = v.slot;
                }
            }
        }
        shape += 1;
    }
    if best_action == ACTION_ALLOW {
        return Decision::new(true, Reason::AllowAdmin, best_cookie, best_slot);
    }
    if best_action == ACTION_DENY {
        return Decision::new(false, Reason::DropAdmin, best_cookie, best_slot);
    }
    let cross_tenant = src_t != TENANT_NONE && dst_t != TENANT_NONE && src_t != dst_t;
    if cross_tenant && best_action != ACTION_PASS {
        return Decision::new(false, Reason::DropCrossTenant, 0, 0);
    }

    // ---- tenant tier: deny beats allow; while no deny exists the first live allow wins.
    let mut allow_cookie = 0u32;
    let mut allow_slot = 0u32;
    let mut allowed = false;
    let mut shape = 0usize;
    while shape < POLICY_SHAPES {
        if cfg.policy_shape_count[shape] != 0 {
            let peer_id = if POLICY_SHAPE_PEER[shape] { peer.identity } else { IDENTITY_ANY };
            let (src, dst) = if egress { (local.identity, peer_id) } else { (peer_id, local.identity) };
            let key = policy_key(
                src,
                dst,
                if POLICY_SHAPE_PORT[shape] { port } else { PORT_ANY },
                if POLICY_SHAPE_PROTO[shape] { proto } else { PROTO_ANY },
                dir,
            );
            // SAFETY: read-only access to a map value the kernel keeps alive for this run.
            if let Some(v) = unsafe { ZT_POLICY.get(&key) } {
                if rule_admits(v.slot, v.cookie) {
                    if v.action == ACTION_DENY {
                        return Decision::new(false, Reason::DropPolicy, v.cookie, v.slot);
                    }
                    if !allowed && v.action == ACTION_ALLOW {
                        allowed = true;
                        allow_cookie = v.cookie;
                        allow_slot = v.slot;
                        if cfg.policy_deny_count == 0 {
                            break;
                        }
                    }
                }
            }
        }
        shape += 1;
    }

    // ---- port ranges (only probed while some exist; once allowed, only for their denies).
    if (!allowed || cfg.range_deny_count != 0)
        && (cfg.range_shape_count[0] | cfg.range_shape_count[1]) != 0
        && matches!(proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    {
        let mut shape = 0usize;
        while shape < RANGE_SHAPES {
            if cfg.range_shape_count[shape] != 0 {
                let peer_id = if shape == 0 { peer.identity } else { IDENTITY_ANY };
                let (src, dst) = if egress { (local.identity, peer_id) } else { (peer_id, local.identity) };
                // SAFETY: read-only access to a map value the kernel keeps alive for this run.
                if let Some(set) = unsafe { ZT_RANGES.get(&policy_key(src, dst, PORT_ANY, proto, dir)) } {
                    let deny = interval_rule::<false>(set, port);
                    let (cookie, slot) = ((deny >> 32) as u32, deny as u32);
                    if cookie != 0 && rule_admits(slot, cookie) {
                        return Decision::new(false, Reason::DropPolicy, cookie, slot);
                    }
                    if !allowed {
                        let rule = interval_rule::<true>(set, port);
                        let (cookie, slot) = ((rule >> 32) as u32, rule as u32);
                        if cookie != 0 && rule_admits(slot, cookie) {
                            allowed = true;
                            allow_cookie = cookie;
                            allow_slot = slot;
                        }
                    }
                }
            }
            shape += 1;
        }
    }
    if allowed {
        Decision::new(true, Reason::AllowPolicy, allow_cookie, allow_slot)
    } else {
        Decision::new(false, Reason::DropDefault, 0, 0)
    }
}
