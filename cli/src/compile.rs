//! Compiling evaluated policy into data-plane rules.
//!
//! Each managed workload gets at most one rule per direction, holding every policy key that
//! direction allows, so keys never collide between rules and a change to a workload's policy
//! is one make-before-break replacement. CIDR peers become CIDR identities: every distinct
//! prefix named by any policy gets one, and "cidr except E" allows each configured prefix
//! inside the cidr that is not inside an except (the LPM lookup gives an address its longest
//! configured prefix). Pods whose addresses fall in an allowed block are allowed by identity,
//! because the data plane resolves pod addresses exactly before it looks at CIDRs.
//!
//! The host the enforcer runs on has identity `IDENTITY_HOST` (its addresses, registered by
//! the daemon). As upstream `NetworkPolicy` requires, traffic from a pod's own node is
//! allowed into the pod whatever its policies: every ingress-isolated pod's rule holds a key
//! for `IDENTITY_HOST` on every protocol and port. An `ipBlock` that contains one of the
//! host's addresses (and does not except it) allows `IDENTITY_HOST` as well, since those
//! addresses resolve to it rather than to a CIDR identity.
//!
//! A prefix keeps its CIDR identity for as long as it is installed, and a new prefix never
//! gets a number an installed one holds, so a number never changes meaning while a rule may
//! refer to it. [`sync_rules`] installs new prefixes first, then the rules, and removes the
//! prefixes the new version no longer names only once no rule refers to them.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use anyhow::{Context as _, Result, bail};
use enforcer::{RangeKey, Rule};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_HOST, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, PORT_ANY, PROTO_ANY,
    PolicyKey,
};
use ztseg_policy::{Cluster, IpNetwork, Isolation, PeerMatch, PodPolicy, PortMatch, Protocol};

/// First identity number of CIDR peers: above every workload identity
/// ([`crate::daemon::config::identity_of`] stays below 2^30 + 256).
pub const CIDR_IDENTITY_BASE: u32 = 1 << 31;
/// CIDR identities are `CIDR_IDENTITY_BASE .. CIDR_IDENTITY_BASE + CIDR_IDENTITY_SPAN`.
pub const CIDR_IDENTITY_SPAN: u32 = 1 << 30;
/// Widest port range expanded into exact keys (the fastest lookup, and no per-key limit);
/// wider ones become data-plane port ranges.
pub const EXPAND_MAX: u32 = 16;

/// The compiled form: per pod and direction the keys to allow, plus the CIDR identities.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Compiled {
    /// (pod index, direction) → keys. A missing entry means "allow nothing".
    pub keys: BTreeMap<(usize, u8), BTreeSet<PolicyKey>>,
    /// (pod index, direction) → port ranges to allow (overlapping and adjacent ranges of one
    /// key merged).
    pub ranges: BTreeMap<(usize, u8), BTreeSet<RangeKey>>,
    /// Prefix → CIDR identity: every prefix this version names.
    pub cidrs: BTreeMap<IpNetwork, u32>,
    /// Prefixes of `cidrs` not installed yet.
    pub new_cidrs: BTreeSet<IpNetwork>,
    /// Installed prefixes this version no longer names: removed once the rules are replaced.
    pub stale_cidrs: BTreeSet<IpNetwork>,
}

impl Compiled {
    /// The rule for one pod and direction, if it allows anything.
    #[must_use]
    pub fn rule(&self, pod: usize, dir: u8) -> Option<Rule> {
        let keys: Vec<PolicyKey> = self.keys.get(&(pod, dir)).into_iter().flatten().copied().collect();
        let ranges: Vec<RangeKey> = self.ranges.get(&(pod, dir)).into_iter().flatten().copied().collect();
        (!keys.is_empty() || !ranges.is_empty()).then_some(Rule {
            keys,
            ranges,
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

/// What the compiler needs to know about the host and the data plane besides the policy.
#[derive(Debug, Default)]
pub struct Context {
    /// CIDR prefixes the data plane holds now, with their identities ([`installed_cidrs`]):
    /// prefixes that stay keep theirs, new ones get numbers none of them holds.
    pub installed: BTreeMap<IpNetwork, u32>,
    /// The host's own addresses (identity `IDENTITY_HOST`); none offline.
    pub host: BTreeSet<IpAddr>,
}

/// Compile `eval` (from `ztseg_policy::evaluate`) for pods with identities `identity[i]`.
pub fn compile(cluster: &Cluster, eval: &[PodPolicy], identity: &[u32], ctx: &Context) -> Result<Compiled> {
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
    assign_cidr_identities(&mut out, &prefixes, &ctx.installed)?;
    for (pod, pp) in eval.iter().enumerate() {
        let local = identity[pod];
        for (iso, dir) in [(&pp.ingress, DIR_INGRESS), (&pp.egress, DIR_EGRESS)] {
            let mut keys = BTreeSet::new();
            let mut ranges = Vec::new();
            match iso {
                Isolation::NotIsolated => {
                    keys.insert(Rule::key(dir, local, None, PROTO_ANY, PORT_ANY));
                }
                Isolation::Isolated(rules) => {
                    if dir == DIR_INGRESS {
                        // Traffic from the pod's own node is always allowed in.
                        keys.insert(Rule::key(dir, local, Some(IDENTITY_HOST), PROTO_ANY, PORT_ANY));
                    }
                    for r in rules {
                        let peers = peer_identities(cluster, identity, &out.cidrs, &ctx.host, &r.peers);
                        for pm in &r.ports {
                            let (proto, lo, hi) = port_range(*pm);
                            for peer in &peers {
                                if u32::from(hi) - u32::from(lo) < EXPAND_MAX {
                                    for port in lo..=hi {
                                        keys.insert(Rule::key(dir, local, *peer, proto, port));
                                    }
                                } else {
                                    ranges.push(Rule::range(dir, local, *peer, proto, lo, hi));
                                }
                            }
                        }
                    }
                }
            }
            if !keys.is_empty() {
                out.keys.insert((pod, dir), keys);
            }
            if !ranges.is_empty() {
                out.ranges.insert((pod, dir), merge_ranges(ranges));
            }
        }
    }
    Ok(out)
}

/// Give every prefix of `prefixes` its identity in `out`: the installed one, or for a new
/// prefix a number derived from the prefix that no installed prefix holds (the next free one
/// after it when taken). Records which prefixes are new and which installed ones are stale.
fn assign_cidr_identities(
    out: &mut Compiled,
    prefixes: &BTreeSet<IpNetwork>,
    installed: &BTreeMap<IpNetwork, u32>,
) -> Result<()> {
    let mut used: BTreeSet<u32> = installed.values().copied().collect();
    if prefixes.len() + used.len() >= CIDR_IDENTITY_SPAN as usize {
        bail!("too many CIDR prefixes");
    }
    for net in prefixes {
        let id = if let Some(id) = installed.get(net) {
            *id
        } else {
            let mut slot = crate::daemon::config::fnv1a(&net.to_string()) % CIDR_IDENTITY_SPAN;
            while used.contains(&(CIDR_IDENTITY_BASE + slot)) {
                slot = (slot + 1) % CIDR_IDENTITY_SPAN;
            }
            out.new_cidrs.insert(*net);
            CIDR_IDENTITY_BASE + slot
        };
        used.insert(id);
        out.cidrs.insert(*net, id);
    }
    out.stale_cidrs = installed.keys().filter(|n| !prefixes.contains(n)).copied().collect();
    Ok(())
}

/// The CIDR prefixes installed in `w`, with their identities.
pub fn installed_cidrs(w: &enforcer::writer::Writer) -> Result<BTreeMap<IpNetwork, u32>> {
    let mut out = BTreeMap::new();
    for (ip, len, info) in w.cidrs()? {
        out.insert(IpNetwork::new(ip, len)?, info.identity);
    }
    Ok(out)
}

/// `None` = any peer.
fn peer_identities(
    cluster: &Cluster,
    identity: &[u32],
    cidrs: &BTreeMap<IpNetwork, u32>,
    host: &BTreeSet<IpAddr>,
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
                let inside = |ip: &IpAddr| net.contains(*ip) && !except.iter().any(|e| e.contains(*ip));
                for (j, pod) in cluster.pods.iter().enumerate() {
                    if pod.ips.iter().any(inside) {
                        out.insert(Some(identity[j]));
                    }
                }
                if host.iter().any(inside) {
                    out.insert(Some(IDENTITY_HOST));
                }
            }
        }
    }
    out
}

/// (protocol, first port, last port); (`PROTO_ANY`, 0, 0) for any port of any protocol, and
/// (protocol, 0, 0) for any port of one (a range over every port included).
fn port_range(pm: PortMatch) -> (u8, u16, u16) {
    match pm {
        PortMatch::Any => (PROTO_ANY, PORT_ANY, PORT_ANY),
        PortMatch::Proto(p) => (proto(p), PORT_ANY, PORT_ANY),
        PortMatch::Range { proto: p, from, to } if from <= 1 && to == u16::MAX => {
            (proto(p), PORT_ANY, PORT_ANY)
        }
        PortMatch::Range { proto: p, from, to } => (proto(p), from, to),
    }
}

/// Merge overlapping and adjacent ranges of the same key (one data-plane range each).
fn merge_ranges(mut ranges: Vec<RangeKey>) -> BTreeSet<RangeKey> {
    ranges.sort();
    let mut out: Vec<RangeKey> = Vec::with_capacity(ranges.len());
    for r in ranges {
        match out.last_mut() {
            Some(prev) if prev.key == r.key && u32::from(r.lo) <= u32::from(prev.hi) + 1 => {
                prev.hi = prev.hi.max(r.hi);
            }
            _ => out.push(r),
        }
    }
    out.into_iter().collect()
}

/// Bring `w` to `compiled` for the pods `local` says this host enforces: install, replace
/// (make-before-break) or revoke one rule per pod and direction. `ids` names the pods (stable
/// across restarts); `rules` maps [`owner_id`] → cookie and is updated; rules of pods that are
/// no longer local workloads are revoked. Keys for which `reserved` is true (owned by a live
/// grant) are left out; re-run after the grant ends.
///
/// CIDR prefixes change around the rules: new prefixes first (an address they cover has an
/// identity no old rule allows, so it is denied until the new rules are in), stale prefixes
/// last, once every rule is replaced (an address only they cover keeps an identity no new
/// rule allows until then). At no moment is a flow allowed that neither version allows, and
/// nothing is removed when a step fails.
pub fn sync_rules(
    w: &mut enforcer::writer::Writer,
    compiled: &Compiled,
    ids: &[String],
    local: impl Fn(usize) -> bool,
    rules: &mut BTreeMap<String, u32>,
    reserved: impl Fn(&PolicyKey) -> bool,
) -> Result<()> {
    for net in &compiled.new_cidrs {
        w.set_cidr(net.addr(), net.prefix(), compiled.cidrs[net], 0)?;
    }
    let mut wanted = BTreeSet::new();
    for pod in (0..ids.len()).filter(|p| local(*p)) {
        for dir in [DIR_INGRESS, DIR_EGRESS] {
            let id = owner_id(&ids[pod], dir);
            wanted.insert(id.clone());
            let old = rules.get(&id).copied();
            let mut want = compiled.rule(pod, dir);
            if let Some(r) = &mut want {
                r.keys.retain(|k| !reserved(k));
                if r.keys.is_empty() && r.ranges.is_empty() {
                    want = None;
                }
            }
            match (old, want) {
                (None, None) => {}
                (None, Some(rule)) => {
                    let h = w.install(&rule).with_context(|| format!("installing the rule of {id}"))?;
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
                    }) && w.rule_ranges(c).is_some_and(|r| {
                        let mut a = r.to_vec();
                        a.sort();
                        a == rule.ranges
                    });
                    if !same {
                        let h = w.replace(c, &rule).with_context(|| format!("replacing the rule of {id}"))?;
                        rules.insert(id, h.cookie);
                    }
                }
            }
        }
    }
    // Rules of workloads gone from the configuration (or no longer on this node).
    let orphans: Vec<String> = rules.keys().filter(|o| !wanted.contains(*o)).cloned().collect();
    for owner in orphans {
        if let Some(cookie) = rules.remove(&owner) {
            revoke_if_present(w, cookie)?;
        }
    }
    for net in &compiled.stale_cidrs {
        w.remove_cidr(net.addr(), net.prefix())?;
    }
    Ok(())
}

/// Revoke `cookie`; a rule that is already gone is fine.
fn revoke_if_present(w: &mut enforcer::writer::Writer, cookie: u32) -> Result<()> {
    match w.revoke(cookie) {
        Ok(()) | Err(enforcer::Error::UnknownCookie { .. }) => Ok(()),
        Err(e) => Err(e.into()),
    }
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
            revoke_if_present(w, cookie)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(v: &[&str]) -> BTreeSet<IpNetwork> {
        v.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn assign(prefixes: &[&str], installed: &BTreeMap<IpNetwork, u32>) -> Compiled {
        let mut out = Compiled::default();
        assign_cidr_identities(&mut out, &nets(prefixes), installed).unwrap();
        out
    }

    #[test]
    fn the_host_may_connect_to_every_ingress_isolated_pod() {
        let pod = |name: &str, ip: &str| ztseg_policy::Pod {
            name: name.into(),
            namespace: "default".into(),
            labels: [("app".to_owned(), name.to_owned())].into(),
            ips: vec![ip.parse().unwrap()],
            ports: Vec::new(),
        };
        let cluster = Cluster {
            namespaces: vec![ztseg_policy::Namespace { name: "default".into(), labels: BTreeMap::new() }],
            pods: vec![pod("a", "10.0.0.1"), pod("b", "10.0.0.2")],
        };
        let policies = ztseg_policy::parse_file(
            std::path::Path::new("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  \
             podSelector: {matchLabels: {app: a}}\n---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n\
             metadata: {name: b}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Egress]\n  \
             egress:\n  - to:\n    - ipBlock: {cidr: 192.168.0.0/16}\n",
        )
        .unwrap();
        let eval = ztseg_policy::evaluate(&cluster, &policies);
        let ids = [300, 301];
        let host_key = |dir, local| Rule::key(dir, local, Some(IDENTITY_HOST), PROTO_ANY, PORT_ANY);
        let ctx = Context { host: ["192.168.1.1".parse().unwrap()].into(), ..Context::default() };
        let c = compile(&cluster, &eval, &ids, &ctx).unwrap();
        // a: ingress-isolated with no rule, yet its node may connect; nothing else.
        assert_eq!(c.keys[&(0, DIR_INGRESS)], [host_key(DIR_INGRESS, 300)].into());
        // b: not ingress-isolated (any peer); its egress ipBlock holds a host address.
        assert_eq!(
            c.keys[&(1, DIR_INGRESS)],
            [Rule::key(DIR_INGRESS, 301, None, PROTO_ANY, PORT_ANY)].into()
        );
        assert!(c.keys[&(1, DIR_EGRESS)].contains(&host_key(DIR_EGRESS, 301)));
        // Not an egress allowance of its own: without a host address in the block, none.
        let offline = compile(&cluster, &eval, &ids, &Context::default()).unwrap();
        assert!(!offline.keys[&(1, DIR_EGRESS)].contains(&host_key(DIR_EGRESS, 301)));
        assert!(offline.keys[&(0, DIR_INGRESS)].contains(&host_key(DIR_INGRESS, 300)));
    }

    #[test]
    fn wide_port_ranges_become_data_plane_ranges() {
        let cluster = Cluster {
            namespaces: vec![ztseg_policy::Namespace { name: "default".into(), labels: BTreeMap::new() }],
            pods: vec![ztseg_policy::Pod {
                name: "a".into(),
                namespace: "default".into(),
                labels: [("app".to_owned(), "a".to_owned())].into(),
                ips: vec!["10.0.0.1".parse().unwrap()],
                ports: Vec::new(),
            }],
        };
        let policies = ztseg_policy::parse_file(
            std::path::Path::new("p.yaml"),
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\nspec:\n  \
             podSelector: {}\n  ingress:\n  - ports:\n    - {port: 8000, endPort: 8003}\n    \
             - {port: 9000, endPort: 9999}\n    - {port: 9500, endPort: 10500}\n    - {port: 10501, endPort: 11000}\n    \
             - {protocol: UDP, port: 1, endPort: 65535}\n",
        )
        .unwrap();
        let eval = ztseg_policy::evaluate(&cluster, &policies);
        let c = compile(&cluster, &eval, &[300], &Context::default()).unwrap();
        let keys = &c.keys[&(0, DIR_INGRESS)];
        // Narrow: one exact key per port. Every port of a protocol: its wildcard key.
        for port in 8000..=8003 {
            assert!(keys.contains(&Rule::key(DIR_INGRESS, 300, None, IPPROTO_TCP, port)));
        }
        assert!(keys.contains(&Rule::key(DIR_INGRESS, 300, None, IPPROTO_UDP, PORT_ANY)));
        // Wide: ranges, overlapping and adjacent ones merged.
        assert_eq!(
            c.ranges[&(0, DIR_INGRESS)],
            [Rule::range(DIR_INGRESS, 300, None, IPPROTO_TCP, 9000, 11000)].into()
        );
        let rule = c.rule(0, DIR_INGRESS).unwrap();
        assert_eq!(rule.ranges.len(), 1);
        assert_eq!(rule.keys.len(), keys.len());
    }

    #[test]
    fn a_cidr_identity_never_changes_meaning() {
        let v1 = assign(&["10.0.0.0/8"], &BTreeMap::new());
        let ten = v1.cidrs[&"10.0.0.0/8".parse().unwrap()];
        assert!((CIDR_IDENTITY_BASE..CIDR_IDENTITY_BASE + CIDR_IDENTITY_SPAN).contains(&ten));
        assert_eq!(v1.new_cidrs, nets(&["10.0.0.0/8"]));
        // The next version names another prefix only: it gets a number of its own, and the
        // old prefix is stale (removed after the rules).
        let v2 = assign(&["192.168.0.0/16"], &v1.cidrs);
        let other = v2.cidrs[&"192.168.0.0/16".parse().unwrap()];
        assert_ne!(other, ten);
        assert_eq!(v2.new_cidrs, nets(&["192.168.0.0/16"]));
        assert_eq!(v2.stale_cidrs, nets(&["10.0.0.0/8"]));
        // While both are installed (between the rules and the removal), a prefix that stays
        // keeps its number and nothing is new.
        let both: BTreeMap<IpNetwork, u32> =
            v1.cidrs.iter().chain(&v2.cidrs).map(|(k, v)| (*k, *v)).collect();
        let v3 = assign(&["10.0.0.0/8", "192.168.0.0/16"], &both);
        assert_eq!(v3.cidrs, both);
        assert!(v3.new_cidrs.is_empty() && v3.stale_cidrs.is_empty());
    }

    #[test]
    fn a_new_prefix_skips_numbers_installed_prefixes_hold() {
        let fresh = assign(&["172.16.0.0/12"], &BTreeMap::new());
        let preferred = fresh.cidrs[&"172.16.0.0/12".parse().unwrap()];
        // Another prefix already holds that number.
        let installed: BTreeMap<IpNetwork, u32> = [("10.9.0.0/16".parse().unwrap(), preferred)].into();
        let c = assign(&["172.16.0.0/12"], &installed);
        let got = c.cidrs[&"172.16.0.0/12".parse().unwrap()];
        assert_ne!(got, preferred);
        assert!((CIDR_IDENTITY_BASE..CIDR_IDENTITY_BASE + CIDR_IDENTITY_SPAN).contains(&got));
        assert_eq!(c.stale_cidrs, nets(&["10.9.0.0/16"]));
    }
}
