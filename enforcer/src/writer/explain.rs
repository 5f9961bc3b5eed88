//! Why the data plane would pass or drop a new flow: the decision of the kernel's programs for
//! the first packet of a flow at one check point, recomputed from the live maps step by step
//! (peer identity, failsafe ports, admin tier, tenant isolation, tenant tier, audit mode), with
//! every probe the programs make and what it found.
//!
//! This follows the programs' decision order exactly (`enforcer-ebpf/src/policy.rs` and the
//! verdict in `main.rs`); a differential test runs both on random policies and flows. It
//! explains new flows: packets of an established flow pass while the rule that admitted them
//! is live.

use std::net::IpAddr;

use aya::maps::lpm_trie::Key as LpmKey;
use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_PASS, ADMIN_SHAPES, AdminKey, CidrAddr, DIR_EGRESS,
    ENDPOINT_ARRAY_SIZE, ENDPOINT_F_AUDIT, ENDPOINT_F_VALID, Endpoint, IDENTITY_ANY, IDENTITY_WORLD,
    IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, IdentityInfo, POLICY_SHAPE_PEER,
    POLICY_SHAPE_PORT, POLICY_SHAPE_PROTO, POLICY_SHAPES, PORT_ANY, PROTO_ANY, PolicyKey, RANGE_SHAPES,
    RULE_F_ACTIVE, Reason, TENANT_ANY, TENANT_NONE, map_names,
};

use super::Writer;
use crate::{Error, addr, time};

/// The check point a flow is explained at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CheckPoint {
    /// A workload behind this interface index (TC programs).
    Interface(u32),
    /// A workload in this cgroup (cgroup programs).
    Cgroup(u64),
}

/// A new flow seen from a local workload: the peer's address, direction, protocol and the
/// policy port (destination port, or `icmp_port(type)` for ICMP/ICMPv6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Query {
    pub at: CheckPoint,
    pub dir: u8,
    pub peer: IpAddr,
    pub proto: u8,
    pub port: u16,
}

/// Where the peer's identity came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerSource {
    /// The exact address map (a workload or a known host).
    Exact,
    /// The CIDR map (longest prefix).
    Cidr,
    /// Neither: the world identity.
    World,
}

/// The state of the rule a probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RuleStatus {
    Live,
    /// Its expiry has passed: it admits nothing (the kernel compares on every packet).
    Expired,
    /// Revoked or replaced (its slot no longer holds this cookie, or is inactive).
    Inactive,
}

/// What one map probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub action: u32,
    pub cookie: u32,
    /// Admin tier only (lower wins).
    pub priority: u32,
    pub status: RuleStatus,
}

/// The key of one probe, as the programs build it (`u32::MAX`: the wildcard; `PROTO_ANY`,
/// `PORT_ANY`: any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ProbeKey {
    /// Admin tier: source and destination tenants.
    Admin { src_tenant: u32, dst_tenant: u32, proto: u8, port: u16 },
    /// Tenant tier: source and destination identities, checked in `dir`.
    Policy { dir: u8, src: u32, dst: u32, proto: u8, port: u16 },
    /// Tenant tier's port ranges under a range key: the interval that holds the port, if one
    /// does.
    Range { dir: u8, src: u32, dst: u32, proto: u8, port: u16, interval: Option<(u16, u16)> },
}

impl ProbeKey {
    /// The key as text, identities named by `name` (wildcards as `*`).
    #[must_use]
    pub fn text(&self, name: impl Fn(u32) -> String) -> String {
        let any = |v: u32, f: &dyn Fn(u32) -> String| if v == u32::MAX { "*".to_owned() } else { f(v) };
        match *self {
            Self::Admin { src_tenant, dst_tenant, proto, port } => format!(
                "tenants {} -> {} {}",
                any(src_tenant, &|v| v.to_string()),
                any(dst_tenant, &|v| v.to_string()),
                proto_port(proto, port)
            ),
            Self::Policy { dir, src, dst, proto, port } => format!(
                "{} {} -> {} {}",
                if dir == DIR_EGRESS { "egress" } else { "ingress" },
                any(src, &name),
                any(dst, &name),
                proto_port(proto, port)
            ),
            Self::Range { dir, src, dst, proto, port, interval } => format!(
                "{} {} -> {} proto {proto} port ranges: {}",
                if dir == DIR_EGRESS { "egress" } else { "ingress" },
                any(src, &name),
                any(dst, &name),
                interval.map_or_else(|| format!("none holds port {port}"), |(lo, hi)| format!("{lo}-{hi}"))
            ),
        }
    }
}

impl std::fmt::Display for ProbeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text(|id| id.to_string()))
    }
}

/// One probe of the admin or tenant tier.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    pub key: ProbeKey,
    pub hit: Option<Hit>,
}

/// Flows that pass before any policy is consulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Bypass {
    /// `ICMPv6` neighbour discovery or MLD.
    LinkLocal,
    /// A failsafe port.
    Failsafe,
}

/// The decision and how it was reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Explanation {
    /// The local workload's identity and tenant (`None`: no workload is registered at the
    /// check point, and the programs drop everything there).
    pub local: Option<(u32, u32)>,
    pub peer: IdentityInfo,
    pub peer_source: PeerSource,
    /// The flow passes without policy: why.
    pub bypass: Option<Bypass>,
    /// Admin-tier probes made (only shapes some rule uses), in probe order.
    pub admin: Vec<Probe>,
    /// The flow crosses tenants (both have a tenant, and they differ).
    pub cross_tenant: bool,
    /// Tenant-tier probes made, in probe order (empty when the admin tier decided).
    pub tenant: Vec<Probe>,
    /// Whether the flow passes (an audited drop passes).
    pub pass: bool,
    /// The verdict reason the programs count.
    pub reason: Reason,
    /// Cookie of the deciding rule or grant (0: none).
    pub cookie: u32,
}

impl Writer {
    /// Explain the verdict the data plane gives the first packet of the flow `q`.
    pub fn explain(&self, q: &Query) -> Result<Explanation, Error> {
        let cfg = self.config()?;
        let now = time::monotonic_ns()?;
        let mut x = Explanation {
            local: None,
            peer: IdentityInfo { identity: IDENTITY_WORLD, tenant: TENANT_NONE, flags: 0 },
            peer_source: PeerSource::World,
            bypass: None,
            admin: Vec::new(),
            cross_tenant: false,
            tenant: Vec::new(),
            pass: false,
            reason: Reason::DropNoEndpoint,
            cookie: 0,
        };
        let Some(ep) = self.endpoint_at(q.at)? else { return Ok(x) };
        x.local = Some((ep.identity, ep.tenant));
        if q.proto == IPPROTO_ICMPV6
            && matches!(q.port.checked_sub(enforcer_common::ICMP_PORT_BASE), Some(130..=137 | 143))
        {
            x.bypass = Some(Bypass::LinkLocal);
            x.pass = true;
            x.reason = Reason::PassLinkLocal;
            return Ok(x);
        }
        (x.peer, x.peer_source) = self.peer_identity(q.peer, cfg.cidr_count != 0);
        let is_icmp = q.proto == IPPROTO_ICMP || q.proto == IPPROTO_ICMPV6;
        let failsafe_count = usize::try_from(cfg.failsafe_count).unwrap_or(usize::MAX);
        if !is_icmp
            && cfg.failsafe.iter().take(failsafe_count).any(|f| f.port == q.port && f.proto == q.proto)
        {
            x.bypass = Some(Bypass::Failsafe);
            x.pass = true;
            x.reason = Reason::AllowFailsafe;
            return Ok(x);
        }
        let (allow, reason, cookie) = self.decide(&cfg, &ep, q, now, &mut x);
        x.reason = reason;
        x.cookie = cookie;
        x.pass = allow;
        if !allow && ep.flags & ENDPOINT_F_AUDIT != 0 {
            x.pass = true;
            x.reason = Reason::Audit;
        }
        Ok(x)
    }

    fn endpoint_at(&self, at: CheckPoint) -> Result<Option<Endpoint>, Error> {
        let ep = match at {
            CheckPoint::Interface(ifx) if ifx < ENDPOINT_ARRAY_SIZE => {
                let ep = self.endpoints.get(&ifx, 0).map_err(Error::map(map_names::ENDPOINTS))?;
                (ep.flags & ENDPOINT_F_VALID != 0).then_some(ep)
            }
            CheckPoint::Interface(ifx) => self.endpoints_hash.get(&ifx, 0).ok(),
            CheckPoint::Cgroup(id) => self.cgroups.get(&id, 0).ok(),
        };
        Ok(ep)
    }

    fn peer_identity(&self, ip: IpAddr, cidrs: bool) -> (IdentityInfo, PeerSource) {
        if let Some(id) = self.identity(ip) {
            return (id, PeerSource::Exact);
        }
        if cidrs && let Ok(id) = self.cidr.get(&LpmKey::new(128, CidrAddr { addr: addr::key(ip) }), 0) {
            return (id, PeerSource::Cidr);
        }
        (IdentityInfo { identity: IDENTITY_WORLD, tenant: TENANT_NONE, flags: 0 }, PeerSource::World)
    }

    fn status(&self, slot: u32, cookie: u32, now: u64) -> RuleStatus {
        match self.rules.get(&slot, 0) {
            Ok(st) if st.cookie == cookie && st.flags & RULE_F_ACTIVE != 0 => {
                if st.expires_at == 0 || now < st.expires_at { RuleStatus::Live } else { RuleStatus::Expired }
            }
            _ => RuleStatus::Inactive,
        }
    }

    /// The programs' `decide`: admin tier, tenant isolation, tenant tier.
    fn decide(
        &self,
        cfg: &enforcer_common::Config,
        ep: &Endpoint,
        q: &Query,
        now: u64,
        x: &mut Explanation,
    ) -> (bool, Reason, u32) {
        let egress = q.dir == DIR_EGRESS;
        let peer = x.peer;
        let (src_t, dst_t) = if egress { (ep.tenant, peer.tenant) } else { (peer.tenant, ep.tenant) };
        let mut best: Option<Hit> = None;
        for shape in 0..ADMIN_SHAPES {
            if cfg.admin_shape_count[shape] == 0 {
                continue;
            }
            let (tenants, ports) = (shape / 3, shape % 3);
            let key = AdminKey {
                src_tenant: if tenants & 2 != 0 { TENANT_ANY } else { src_t },
                dst_tenant: if tenants & 1 != 0 { TENANT_ANY } else { dst_t },
                dport: if ports == 0 { q.port } else { PORT_ANY },
                proto: if ports == 2 { PROTO_ANY } else { q.proto },
                pad: 0,
            };
            let hit = self.admin.get(&key, 0).ok().map(|v| Hit {
                action: v.action,
                cookie: v.cookie,
                priority: v.priority,
                status: self.status(v.slot, v.cookie, now),
            });
            if let Some(h) = hit
                && h.status == RuleStatus::Live
                && best.is_none_or(|b| h.priority < b.priority)
            {
                best = Some(h);
            }
            x.admin.push(Probe {
                key: ProbeKey::Admin {
                    src_tenant: key.src_tenant,
                    dst_tenant: key.dst_tenant,
                    proto: key.proto,
                    port: key.dport,
                },
                hit,
            });
        }
        match best {
            Some(b) if b.action == ACTION_ALLOW => return (true, Reason::AllowAdmin, b.cookie),
            Some(b) if b.action == ACTION_DENY => return (false, Reason::DropAdmin, b.cookie),
            _ => {}
        }
        x.cross_tenant = src_t != TENANT_NONE && dst_t != TENANT_NONE && src_t != dst_t;
        if x.cross_tenant && best.is_none_or(|b| b.action != ACTION_PASS) {
            return (false, Reason::DropCrossTenant, 0);
        }
        let mut allowed: Option<u32> = None;
        for shape in 0..POLICY_SHAPES {
            if cfg.policy_shape_count[shape] == 0 {
                continue;
            }
            let peer_id = if POLICY_SHAPE_PEER[shape] { peer.identity } else { IDENTITY_ANY };
            let (src, dst) = if egress { (ep.identity, peer_id) } else { (peer_id, ep.identity) };
            let key = PolicyKey {
                src_identity: src,
                dst_identity: dst,
                dport: if POLICY_SHAPE_PORT[shape] { q.port } else { PORT_ANY },
                proto: if POLICY_SHAPE_PROTO[shape] { q.proto } else { PROTO_ANY },
                dir: q.dir,
            };
            let hit = self.policy.get(&key, 0).ok().map(|v| Hit {
                action: v.action,
                cookie: v.cookie,
                priority: 0,
                status: self.status(v.slot, v.cookie, now),
            });
            x.tenant.push(Probe {
                key: ProbeKey::Policy { dir: q.dir, src, dst, proto: key.proto, port: key.dport },
                hit,
            });
            if let Some(h) = hit.filter(|h| h.status == RuleStatus::Live) {
                if h.action == ACTION_DENY {
                    return (false, Reason::DropPolicy, h.cookie);
                }
                if allowed.is_none() && h.action == ACTION_ALLOW {
                    allowed = Some(h.cookie);
                    if cfg.policy_deny_count == 0 {
                        break;
                    }
                }
            }
        }
        if let Some(denied) = self.decide_ranges(cfg, ep, q, now, &mut allowed, x) {
            return (false, Reason::DropPolicy, denied);
        }
        match allowed {
            Some(cookie) => (true, Reason::AllowPolicy, cookie),
            None => (false, Reason::DropDefault, 0),
        }
    }

    /// The programs' port-range probes (after the tenant tier's keys): the cookie of a live
    /// deny that decides the flow, or `None`, with the first live allow recorded in `allowed`.
    fn decide_ranges(
        &self,
        cfg: &enforcer_common::Config,
        ep: &Endpoint,
        q: &Query,
        now: u64,
        allowed: &mut Option<u32>,
        x: &mut Explanation,
    ) -> Option<u32> {
        let egress = q.dir == DIR_EGRESS;
        let probe_ranges = (allowed.is_none() || cfg.range_deny_count != 0)
            && cfg.range_shape_count.iter().any(|n| *n != 0)
            && matches!(q.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP);
        for shape in (0..RANGE_SHAPES).filter(|s| probe_ranges && cfg.range_shape_count[*s] != 0) {
            let peer_id = if shape == 0 { x.peer.identity } else { IDENTITY_ANY };
            let (src, dst) = if egress { (ep.identity, peer_id) } else { (peer_id, ep.identity) };
            let key = PolicyKey {
                src_identity: src,
                dst_identity: dst,
                dport: PORT_ANY,
                proto: q.proto,
                dir: q.dir,
            };
            let interval = self.ranges.get(&key, 0).ok().and_then(|set| {
                let n = usize::try_from(set.len).unwrap_or(0).min(set.intervals.len());
                set.intervals[..n].iter().find(|i| i.lo <= q.port && q.port <= i.hi).copied()
            });
            let probe_key = |kind: Option<(u16, u16)>| ProbeKey::Range {
                dir: q.dir,
                src,
                dst,
                proto: q.proto,
                port: q.port,
                interval: kind,
            };
            let Some(iv) = interval else {
                x.tenant.push(Probe { key: probe_key(None), hit: None });
                continue;
            };
            for (action, cookie, slot) in
                [(ACTION_DENY, iv.deny_cookie, iv.deny_slot), (ACTION_ALLOW, iv.allow_cookie, iv.allow_slot)]
            {
                if cookie == 0 {
                    continue;
                }
                let hit = Hit { action, cookie, priority: 0, status: self.status(slot, cookie, now) };
                x.tenant.push(Probe { key: probe_key(Some((iv.lo, iv.hi))), hit: Some(hit) });
                if hit.status == RuleStatus::Live {
                    if action == ACTION_DENY {
                        return Some(cookie);
                    }
                    *allowed = allowed.or(Some(cookie));
                }
            }
        }
        None
    }
}

/// `proto 6 port 80`, `proto 1 type 8`, `any protocol`.
#[must_use]
pub fn proto_port(proto: u8, port: u16) -> String {
    match (proto, port) {
        (PROTO_ANY, _) => "any protocol".to_owned(),
        (p, PORT_ANY) => format!("proto {p} any port"),
        (p @ (IPPROTO_ICMP | IPPROTO_ICMPV6), t) if t >= enforcer_common::ICMP_PORT_BASE => {
            format!("proto {p} type {}", t - enforcer_common::ICMP_PORT_BASE)
        }
        (p, t) => format!("proto {p} port {t}"),
    }
}
