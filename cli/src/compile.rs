//! Compiling evaluated policy into data-plane rules.
//!
//! Each managed workload gets at most one rule per direction, holding every policy key that
//! direction allows, so keys never collide between rules and a change to a workload's policy
//! is one make-before-break replacement. CIDR peers become CIDR identities: every distinct
//! prefix named by any policy gets one, and "cidr except E" allows each configured prefix
//! inside the cidr that is not inside an except (the LPM lookup gives an address its longest
//! configured prefix). Pods whose addresses fall in an allowed block are allowed by identity,
//! because the data plane resolves pod addresses exactly before it looks at CIDRs.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{Result, bail};
use enforcer::Rule;
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PORT_ANY, PROTO_ANY, PolicyKey,
};
use ztseg_policy::{Cluster, IpNetwork, Isolation, PeerMatch, PodPolicy, PortMatch, Protocol};

/// First identity number of CIDR peers.
pub const CIDR_IDENTITY_BASE: u32 = 1_000_000;
/// Largest port range expanded into exact keys for one rule.
pub const MAX_RANGE: u32 = 4096;

/// The compiled form: per pod and direction the keys to allow, plus the CIDR identities.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// (pod index, direction) → keys. A missing entry means "allow nothing".
    pub keys: BTreeMap<(usize, u8), BTreeSet<PolicyKey>>,
    /// Prefix → CIDR identity.
    pub cidrs: BTreeMap<IpNetwork, u32>,
}

impl Compiled {
    /// The rule for one pod and direction, if it allows anything.
    #[must_use]
    pub fn rule(&self, pod: usize, dir: u8) -> Option<Rule> {
        let keys = self.keys.get(&(pod, dir))?;
        (!keys.is_empty()).then(|| Rule {
            keys: keys.iter().copied().collect(),
            action: enforcer::writer::Action::Allow,
            ttl: None,
        })
    }
}

fn proto(p: Protocol) -> u8 {
    match p {
        Protocol::Tcp => IPPROTO_TCP,
        Protocol::Udp => IPPROTO_UDP,
        Protocol::Sctp => IPPROTO_SCTP,
    }
}

/// Compile `eval` (from `ztseg_policy::evaluate`) for pods with identities `identity[i]`.
pub fn compile(cluster: &Cluster, eval: &[PodPolicy], identity: &[u32]) -> Result<Compiled> {
    let mut out = Compiled::default();
    // Every prefix any rule names gets an identity, in a stable order.
    let mut prefixes = BTreeSet::new();
    for pp in eval {
        for iso in [&pp.ingress, &pp.egress] {
            if let Isolation::Isolated(rules) = iso {
                for r in rules {
                    for p in &r.peers {
                        if let PeerMatch::Cidr { net, except } = p {
                            prefixes.insert(*net);
                            prefixes.extend(except.iter().copied());
                        }
                    }
                }
            }
        }
    }
    for (i, net) in prefixes.iter().enumerate() {
        out.cidrs.insert(*net, CIDR_IDENTITY_BASE + u32::try_from(i)?);
    }
    for (pod, pp) in eval.iter().enumerate() {
        let local = identity[pod];
        for (iso, dir) in [(&pp.ingress, DIR_INGRESS), (&pp.egress, DIR_EGRESS)] {
            let mut keys = BTreeSet::new();
            match iso {
                Isolation::NotIsolated => {
                    keys.insert(Rule::key(dir, local, None, PROTO_ANY, PORT_ANY));
                }
                Isolation::Isolated(rules) => {
                    for r in rules {
                        let peers = peer_identities(cluster, identity, &out.cidrs, &r.peers);
                        for pm in &r.ports {
                            for (proto, lo, hi) in port_ranges(*pm)? {
                                for peer in &peers {
                                    for port in lo..=hi {
                                        keys.insert(Rule::key(dir, local, *peer, proto, port));
                                    }
                                }
                            }
                        }
                    }
                }
            }
            if !keys.is_empty() {
                out.keys.insert((pod, dir), keys);
            }
        }
    }
    Ok(out)
}

/// `None` = any peer.
fn peer_identities(
    cluster: &Cluster,
    identity: &[u32],
    cidrs: &BTreeMap<IpNetwork, u32>,
    peers: &[PeerMatch],
) -> BTreeSet<Option<u32>> {
    let mut out = BTreeSet::new();
    for p in peers {
        match p {
            PeerMatch::AnyPeer => {
                out.insert(None);
            }
            PeerMatch::Pod(j) => {
                out.insert(Some(identity[*j]));
            }
            PeerMatch::Cidr { net, except } => {
                for (prefix, id) in cidrs {
                    if net.contains_net(prefix) && !except.iter().any(|e| e.contains_net(prefix)) {
                        out.insert(Some(*id));
                    }
                }
                for (j, pod) in cluster.pods.iter().enumerate() {
                    if pod.ips.iter().any(|ip| net.contains(*ip) && !except.iter().any(|e| e.contains(*ip))) {
                        out.insert(Some(identity[j]));
                    }
                }
            }
        }
    }
    out
}

/// (protocol, first port, last port); (`PROTO_ANY`, 0, 0) for any port of any protocol.
fn port_ranges(pm: PortMatch) -> Result<Vec<(u8, u16, u16)>> {
    Ok(match pm {
        PortMatch::Any => vec![(PROTO_ANY, PORT_ANY, PORT_ANY)],
        PortMatch::Proto(p) => vec![(proto(p), PORT_ANY, PORT_ANY)],
        PortMatch::Range { proto: p, from, to } => {
            if u32::from(to) - u32::from(from) + 1 > MAX_RANGE {
                if from <= 1 && to == u16::MAX {
                    return Ok(vec![(proto(p), PORT_ANY, PORT_ANY)]);
                }
                bail!(
                    "port range {from}-{to} is wider than {MAX_RANGE} ports, which this data plane expands into exact keys"
                );
            }
            vec![(proto(p), from, to)]
        }
    })
}

/// Bring `w` to `compiled` for the pods `local` says this host enforces: install, replace
/// (make-before-break) or revoke one rule per pod and direction. `ids` names the pods (stable
/// across restarts); `rules` maps [`owner_id`] → cookie and is updated. Keys for which `reserved` is true (owned by a live
/// grant) are left out; re-run after the grant ends.
pub fn sync_rules(
    w: &mut enforcer::writer::Writer,
    compiled: &Compiled,
    ids: &[String],
    local: impl Fn(usize) -> bool,
    rules: &mut BTreeMap<String, u32>,
    reserved: impl Fn(&PolicyKey) -> bool,
) -> Result<()> {
    for (net, id) in &compiled.cidrs {
        w.set_cidr(net.addr(), net.prefix(), *id, 0)?;
    }
    for pod in (0..ids.len()).filter(|p| local(*p)) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let id = owner_id(&ids[pod], dir);
            let old = rules.get(&id).copied();
            let mut want = compiled.rule(pod, dir);
            if let Some(r) = &mut want {
                r.keys.retain(|k| !reserved(k));
                if r.keys.is_empty() {
                    want = None;
                }
            }
            match (old, want) {
                (None, None) => {}
                (None, Some(rule)) => {
                    let h = w.install(&rule)?;
                    rules.insert(id, h.cookie);
                }
                (Some(c), None) => {
                    w.revoke(c)?;
                    rules.remove(&id);
                }
                (Some(c), Some(rule)) => {
                    let same = w.rule_keys(c).is_some_and(|k| {
                        let mut a = k.to_vec();
                        a.sort();
                        a == rule.keys
                    });
                    if !same {
                        let h = w.replace(c, &rule)?;
                        rules.insert(id, h.cookie);
                    }
                }
            }
        }
    }
    Ok(())
}

/// Owner id of a pod's rule in one direction (`"<namespace>/<name>:<direction>"`).
#[must_use]
pub fn owner_id(pod: &str, dir: u8) -> String {
    format!("{pod}:{}", dir_name(dir))
}

/// Direction names for messages.
#[must_use]
pub fn dir_name(dir: u8) -> &'static str {
    if dir == DIR_EGRESS { "egress" } else { "ingress" }
}

/// Admin-tier rules of `TenantPolicy` objects, keyed by a stable owner id derived from the
/// data-plane key (so renaming a policy keeps its rule). The string is a fingerprint of what
/// the rule says; an unchanged fingerprint keeps the installed rule (and its expiry).
pub fn compile_admin(
    policies: &[ztseg_policy::TenantPolicy],
    tenant_of: impl Fn(&str) -> u32,
) -> Result<BTreeMap<String, (enforcer::AdminRule, String)>> {
    let conflicts = ztseg_policy::tenant_conflicts(policies);
    if !conflicts.is_empty() {
        bail!("tenant policies conflict: {}", conflicts.join("; "));
    }
    let mut out = BTreeMap::new();
    for p in policies {
        let tenant = |t: &str| if t == "*" { enforcer_common::TENANT_ANY } else { tenant_of(t) };
        for (from, to, proto_, port) in p.keys() {
            let key = enforcer_common::AdminKey {
                src_tenant: tenant(&from),
                dst_tenant: tenant(&to),
                dport: port.unwrap_or(PORT_ANY),
                proto: proto_.map_or(PROTO_ANY, proto),
                pad: 0,
            };
            let action = match p.spec.action {
                ztseg_policy::TenantAction::Allow => enforcer::writer::Action::Allow,
                ztseg_policy::TenantAction::Deny => enforcer::writer::Action::Deny,
                ztseg_policy::TenantAction::Pass => enforcer::writer::Action::Pass,
            };
            let owner = format!("tenant:{}:{}:{}:{}", key.src_tenant, key.dst_tenant, key.proto, key.dport);
            let fingerprint = format!("{action:?}/{}/{:?}", p.spec.priority, p.spec.ttl);
            let rule = enforcer::AdminRule { key, action, priority: p.spec.priority, ttl: p.spec.ttl };
            if out.insert(owner, (rule, fingerprint)).is_some() {
                bail!(
                    "tenant policy {}: tenants {from:?} and {to:?} map to the same data-plane key as another policy",
                    p.metadata.name
                );
            }
        }
    }
    Ok(out)
}

/// Bring the admin tier of `w` to `desired`: install new rules, replace changed ones in place
/// (make-before-break), then revoke rules no longer wanted. `current` maps owner → (cookie,
/// fingerprint) and is updated.
/// Which part of the desired admin tier [`sync_admin`] brings in.
///
/// A policy change touches both tiers, and each tier's update is make-before-break, but the two
/// cannot switch at one instant. So that no flow is ever allowed that neither version allows,
/// the admin tier changes in two steps around the tenant tier: first its new and changed DENY
/// rules only (`Restrictive`: a flow they deny is denied by the new version), then the tenant
/// tier, then everything else (`All`: allows, passes, removals — a removed DENY no longer
/// shields tenant allows that the new version has already taken away).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AdminSync {
    Restrictive,
    All,
}

pub fn sync_admin(
    w: &mut enforcer::writer::Writer,
    desired: &BTreeMap<String, (enforcer::AdminRule, String)>,
    current: &mut BTreeMap<String, (u32, String)>,
    what: AdminSync,
) -> Result<()> {
    for (owner, (rule, fp)) in desired {
        if what == AdminSync::Restrictive && rule.action != enforcer::writer::Action::Deny {
            continue;
        }
        match current.get(owner) {
            Some((_, old_fp)) if old_fp == fp => {}
            Some((cookie, _)) => {
                let h = w.replace_admin(*cookie, rule)?;
                current.insert(owner.clone(), (h.cookie, fp.clone()));
            }
            None => {
                let h = w.install_admin(rule)?;
                current.insert(owner.clone(), (h.cookie, fp.clone()));
            }
        }
    }
    if what == AdminSync::Restrictive {
        return Ok(());
    }
    let gone: Vec<String> = current.keys().filter(|o| !desired.contains_key(*o)).cloned().collect();
    for owner in gone {
        if let Some((cookie, _)) = current.remove(&owner) {
            match w.revoke(cookie) {
                Ok(()) | Err(enforcer::Error::UnknownCookie { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
    }
    Ok(())
}
