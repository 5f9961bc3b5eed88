//! Evaluation of policies against a cluster into per-pod allow lists, and the verdict function over
//! that evaluated form.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;

use crate::api::{IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort};
use crate::cluster::{Cluster, Pod, Protocol};
use crate::net::IpNetwork;

/// Traffic direction relative to a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Direction {
    /// Traffic into the pod.
    Ingress,
    /// Traffic out of the pod.
    Egress,
}

/// One end of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Endpoint {
    /// A pod, by index into [`Cluster::pods`].
    Pod(usize),
    /// An address that is not treated as a pod (matched by `ipBlock` and match-all peers only, even
    /// if a pod owns it; use [`Cluster::pod_by_ip`] to map pod addresses to pods first).
    Ip(IpAddr),
}

/// Port condition of an [`AllowRule`]. Named ports are already resolved to numbers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PortMatch {
    /// Every protocol and port.
    Any,
    /// Every port of one protocol.
    Proto(Protocol),
    /// Ports `from..=to` of one protocol (`from == to` for a single port).
    Range {
        /// Protocol.
        proto: Protocol,
        /// First port.
        from: u16,
        /// Last port (inclusive).
        to: u16,
    },
}

impl PortMatch {
    /// Whether traffic on `proto`/`port` matches.
    #[must_use]
    pub fn matches(&self, proto: Protocol, port: u16) -> bool {
        match *self {
            PortMatch::Any => true,
            PortMatch::Proto(p) => p == proto,
            PortMatch::Range { proto: p, from, to } => p == proto && (from..=to).contains(&port),
        }
    }
}

/// Peer condition of an [`AllowRule`]: the remote end (source for ingress, destination for egress).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerMatch {
    /// Any peer, pod or not (`from`/`to` absent or empty).
    AnyPeer,
    /// One pod, by index into [`Cluster::pods`] (selected by `podSelector`/`namespaceSelector`, or
    /// the destination of an egress rule with named ports).
    Pod(usize),
    /// Addresses in `net` but not in any of `except` (`ipBlock`). A pod matches if any of its IPs does.
    Cidr {
        /// The block.
        net: IpNetwork,
        /// Excluded sub-blocks.
        except: Vec<IpNetwork>,
    },
}

impl PeerMatch {
    /// Whether `peer` matches.
    #[must_use]
    pub fn matches(&self, cluster: &Cluster, peer: Endpoint) -> bool {
        match (self, peer) {
            (PeerMatch::AnyPeer, _) => true,
            (PeerMatch::Pod(i), Endpoint::Pod(j)) => *i == j,
            (PeerMatch::Pod(_), Endpoint::Ip(_)) => false,
            (PeerMatch::Cidr { net, except }, Endpoint::Ip(ip)) => cidr_matches(net, except, ip),
            (PeerMatch::Cidr { net, except }, Endpoint::Pod(j)) => {
                cluster.pods.get(j).is_some_and(|pod| pod.ips.iter().any(|ip| cidr_matches(net, except, *ip)))
            }
        }
    }
}

fn cidr_matches(net: &IpNetwork, except: &[IpNetwork], ip: IpAddr) -> bool {
    net.contains(ip) && !except.iter().any(|ex| ex.contains(ip))
}

/// One allow rule: traffic matches if the peer matches one of `peers` and the protocol/port one of
/// `ports`. Evaluated rules always have at least one peer and one port entry; rules that could
/// never match (no pod selected, unresolvable named ports) are left out.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct AllowRule {
    /// Remote ends allowed.
    pub peers: Vec<PeerMatch>,
    /// Protocols/ports allowed (destination ports in both directions).
    pub ports: Vec<PortMatch>,
}

impl AllowRule {
    /// Whether traffic with `peer` on `proto`/`port` matches the rule.
    #[must_use]
    pub fn matches(&self, cluster: &Cluster, peer: Endpoint, proto: Protocol, port: u16) -> bool {
        self.peers.iter().any(|p| p.matches(cluster, peer))
            && self.ports.iter().any(|p| p.matches(proto, port))
    }
}

/// A pod's state in one direction.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Isolation {
    /// No policy applies in this direction: everything is allowed.
    NotIsolated,
    /// Some policy applies: only traffic matching one of the rules is allowed (none if empty).
    Isolated(Vec<AllowRule>),
}

impl Isolation {
    /// Whether traffic with `peer` on `proto`/`port` is allowed in this direction.
    #[must_use]
    pub fn allows(&self, cluster: &Cluster, peer: Endpoint, proto: Protocol, port: u16) -> bool {
        match self {
            Isolation::NotIsolated => true,
            Isolation::Isolated(rules) => rules.iter().any(|r| r.matches(cluster, peer, proto, port)),
        }
    }
}

/// Everything that applies to one pod.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct PodPolicy {
    /// Inbound: peers are sources, ports are the pod's own ports.
    pub ingress: Isolation,
    /// Outbound: peers are destinations, ports are destination ports.
    pub egress: Isolation,
}

impl PodPolicy {
    /// The isolation in `direction`.
    #[must_use]
    pub fn get(&self, direction: Direction) -> &Isolation {
        match direction {
            Direction::Ingress => &self.ingress,
            Direction::Egress => &self.egress,
        }
    }
}

/// Evaluates `policies` against `cluster`: one [`PodPolicy`] per pod, same index as
/// [`Cluster::pods`].
///
/// Pod peers (`podSelector`/`namespaceSelector`) become [`PeerMatch::Pod`]; `ipBlock` peers become
/// [`PeerMatch::Cidr`] (pods inside the block are matched through their IPs, not listed); an absent
/// or empty `from`/`to` becomes [`PeerMatch::AnyPeer`].
///
/// Named ports are resolved against the destination pod. For ingress that is the evaluated pod
/// itself. For egress, numeric ports stay in a rule with the original peers, and each named port is
/// expanded into one rule per destination pod matched by any of the rule's peers (including pods
/// matched by `ipBlock` or a match-all peer): `peers: [Pod(d)]` with the port numbers of `d`'s
/// container ports of that name and protocol. Named ports never match non-pod addresses.
///
/// Policies are expected to be valid ([`NetworkPolicy::validate`]; [`crate::parse_file`] only
/// returns valid ones). Parts of an invalid policy that upstream would reject (a bad CIDR, an empty
/// peer, `ipBlock` mixed with selectors, an out-of-range port, `endPort` without a numeric port or
/// below it) match nothing.
#[must_use]
pub fn evaluate(cluster: &Cluster, policies: &[NetworkPolicy]) -> Vec<PodPolicy> {
    let ns_labels: BTreeMap<&str, BTreeMap<String, String>> = cluster
        .pods
        .iter()
        .map(|pod| pod.namespace.as_str())
        .chain(cluster.namespaces.iter().map(|ns| ns.name.as_str()))
        .map(|name| (name, cluster.namespace_labels(name)))
        .collect();
    let compiled: Vec<Compiled> = policies.iter().map(|p| Compiled::new(cluster, &ns_labels, p)).collect();

    cluster
        .pods
        .iter()
        .map(|pod| {
            let mut ingress: Option<Vec<AllowRule>> = None;
            let mut egress: Option<Vec<AllowRule>> = None;
            for (policy, comp) in policies.iter().zip(&compiled) {
                if !policy.selects(pod) {
                    continue;
                }
                if policy.spec.affects(Direction::Ingress) {
                    let rules = ingress.get_or_insert_with(Vec::new);
                    for (peers, ports) in &comp.ingress {
                        let ports = resolve_ports(ports.as_deref(), Some(pod));
                        if !peers.is_empty() && !ports.is_empty() {
                            rules.push(AllowRule { peers: peers.clone(), ports });
                        }
                    }
                }
                if policy.spec.affects(Direction::Egress) {
                    egress.get_or_insert_with(Vec::new).extend(comp.egress.iter().cloned());
                }
            }
            PodPolicy {
                ingress: ingress.map_or(Isolation::NotIsolated, Isolation::Isolated),
                egress: egress.map_or(Isolation::NotIsolated, Isolation::Isolated),
            }
        })
        .collect()
}

/// The verdict for `src` → `dst` on `proto`/`port`, over evaluated policies.
///
/// Allowed iff the source's egress allows it (always, when the source is not a pod) and the
/// destination's ingress allows it (always, when the destination is not a pod). A pod talking to
/// itself is always allowed: loopback is not subject to `NetworkPolicy` (upstream cannot block it, and
/// the upstream e2e truth tables expect it to work whatever the policies). Pod indices outside the
/// cluster are denied.
#[must_use]
pub fn allowed(
    cluster: &Cluster,
    eval: &[PodPolicy],
    src: Endpoint,
    dst: Endpoint,
    proto: Protocol,
    port: u16,
) -> bool {
    for end in [src, dst] {
        if let Endpoint::Pod(i) = end
            && (i >= cluster.pods.len() || i >= eval.len())
        {
            return false;
        }
    }
    if let (Endpoint::Pod(a), Endpoint::Pod(b)) = (src, dst)
        && a == b
    {
        return true;
    }
    let egress_ok = match src {
        Endpoint::Pod(a) => eval[a].egress.allows(cluster, dst, proto, port),
        Endpoint::Ip(_) => true,
    };
    let ingress_ok = match dst {
        Endpoint::Pod(b) => eval[b].ingress.allows(cluster, src, proto, port),
        Endpoint::Ip(_) => true,
    };
    egress_ok && ingress_ok
}

/// A port entry before named-port resolution.
#[derive(Debug, Clone)]
enum PortSpec {
    Resolved(PortMatch),
    Named {
        proto: Protocol,
        name: String,
    },
    /// Invalid entry: matches nothing.
    Never,
}

fn port_spec(port: &NetworkPolicyPort) -> PortSpec {
    let proto = port.protocol;
    let number = |n: i32| u16::try_from(n).ok().filter(|n| *n != 0);
    match (&port.port, port.end_port) {
        (None, None) => PortSpec::Resolved(PortMatch::Proto(proto)),
        (None | Some(IntOrString::String(_)), Some(_)) => PortSpec::Never,
        (Some(IntOrString::Int(n)), end) => {
            let Some(from) = number(*n) else { return PortSpec::Never };
            let to = match end {
                None => from,
                Some(end) => match number(end) {
                    Some(to) if to >= from => to,
                    _ => return PortSpec::Never,
                },
            };
            PortSpec::Resolved(PortMatch::Range { proto, from, to })
        }
        (Some(IntOrString::String(name)), None) => PortSpec::Named { proto, name: name.clone() },
    }
}

/// Port specs of a rule; `None` means "no ports listed: everything".
fn port_specs(ports: &[NetworkPolicyPort]) -> Option<Vec<PortSpec>> {
    if ports.is_empty() { None } else { Some(ports.iter().map(port_spec).collect()) }
}

/// Resolves a rule's ports for destination `dst` (`None`: not a pod, named ports match nothing).
fn resolve_ports(specs: Option<&[PortSpec]>, dst: Option<&Pod>) -> Vec<PortMatch> {
    let Some(specs) = specs else { return vec![PortMatch::Any] };
    let mut out = Vec::new();
    for spec in specs {
        match spec {
            PortSpec::Resolved(m) => out.push(*m),
            PortSpec::Never => {}
            PortSpec::Named { proto, name } => {
                for cp in dst.iter().flat_map(|pod| &pod.ports) {
                    if cp.protocol == *proto && cp.name.as_deref() == Some(name.as_str()) {
                        out.push(PortMatch::Range { proto: *proto, from: cp.port, to: cp.port });
                    }
                }
            }
        }
    }
    out.dedup();
    out
}

/// The pod-independent part of one policy.
struct Compiled {
    /// Per ingress rule: peers, and ports still to be resolved against the selected pod.
    ingress: Vec<(Vec<PeerMatch>, Option<Vec<PortSpec>>)>,
    /// Egress rules, fully resolved (they do not depend on the selected pod).
    egress: Vec<AllowRule>,
}

impl Compiled {
    fn new(
        cluster: &Cluster,
        ns_labels: &BTreeMap<&str, BTreeMap<String, String>>,
        policy: &NetworkPolicy,
    ) -> Self {
        let ns = policy.metadata.namespace.as_str();
        let ingress = policy
            .spec
            .ingress
            .iter()
            .map(|rule| (compile_peers(cluster, ns_labels, ns, &rule.from), port_specs(&rule.ports)))
            .collect();
        let mut egress = Vec::new();
        for rule in &policy.spec.egress {
            let peers = compile_peers(cluster, ns_labels, ns, &rule.to);
            if peers.is_empty() {
                continue;
            }
            let specs = port_specs(&rule.ports);
            // Numeric and protocol-only ports: independent of the destination.
            let numeric = resolve_ports(specs.as_deref(), None);
            if !numeric.is_empty() {
                egress.push(AllowRule { peers: peers.clone(), ports: numeric });
            }
            // Named ports: one rule per destination pod that resolves them.
            let has_named = specs.iter().flatten().any(|s| matches!(s, PortSpec::Named { .. }));
            if has_named {
                let named: Option<Vec<PortSpec>> = specs
                    .as_ref()
                    .map(|v| v.iter().filter(|s| matches!(s, PortSpec::Named { .. })).cloned().collect());
                for (d, pod) in cluster.pods.iter().enumerate() {
                    if !peers.iter().any(|p| p.matches(cluster, Endpoint::Pod(d))) {
                        continue;
                    }
                    let ports = resolve_ports(named.as_deref(), Some(pod));
                    if !ports.is_empty() {
                        egress.push(AllowRule { peers: vec![PeerMatch::Pod(d)], ports });
                    }
                }
            }
        }
        Compiled { ingress, egress }
    }
}

/// Peers of one rule: selected pods (sorted, deduplicated) then CIDR blocks; `[AnyPeer]` when the
/// list is empty. An empty result means the rule can never match.
fn compile_peers(
    cluster: &Cluster,
    ns_labels: &BTreeMap<&str, BTreeMap<String, String>>,
    policy_ns: &str,
    peers: &[NetworkPolicyPeer],
) -> Vec<PeerMatch> {
    if peers.is_empty() {
        return vec![PeerMatch::AnyPeer];
    }
    let mut pods = BTreeSet::new();
    let mut cidrs = Vec::new();
    for peer in peers {
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match (&peer.ip_block, selectors) {
            (Some(block), false) => {
                let net = block.cidr.parse::<IpNetwork>();
                let except: Result<Vec<IpNetwork>, _> = block.except.iter().map(|e| e.parse()).collect();
                if let (Ok(net), Ok(except)) = (net, except) {
                    let cidr = PeerMatch::Cidr { net, except };
                    if !cidrs.contains(&cidr) {
                        cidrs.push(cidr);
                    }
                }
            }
            (None, true) => {
                for (i, pod) in cluster.pods.iter().enumerate() {
                    let ns_ok = match &peer.namespace_selector {
                        None => pod.namespace == policy_ns,
                        Some(sel) => ns_labels.get(pod.namespace.as_str()).is_some_and(|l| sel.matches(l)),
                    };
                    let pod_ok = peer.pod_selector.as_ref().is_none_or(|sel| sel.matches(&pod.labels));
                    if ns_ok && pod_ok {
                        pods.insert(i);
                    }
                }
            }
            // Invalid peers (empty, or ipBlock with selectors) match nothing.
            (None, false) | (Some(_), true) => {}
        }
    }
    pods.into_iter().map(PeerMatch::Pod).chain(cidrs).collect()
}
