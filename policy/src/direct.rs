//! A second, deliberately naive implementation of the verdict, straight from the `NetworkPolicy`
//! specification, with no evaluated form in between. It is the reference the evaluated form
//! ([`crate::evaluate`] + [`crate::allowed`]) is cross-checked against.

use crate::api::{IntOrString, NetworkPolicy, NetworkPolicyPeer, NetworkPolicyPort, PolicyType};
use crate::cluster::{Cluster, Pod, Protocol};
use crate::eval::Endpoint;
use crate::net::IpNetwork;

/// The verdict for `src` → `dst` on `proto`/`port`, computed directly from `policies`.
///
/// Same contract as [`crate::allowed`] (loopback always allowed, out-of-range pod indices denied,
/// invalid policy parts match nothing), but re-derived rule by rule for every call.
#[must_use]
pub fn allowed_direct(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    src: Endpoint,
    dst: Endpoint,
    proto: Protocol,
    port: u16,
) -> bool {
    let pod = |end: Endpoint| match end {
        Endpoint::Pod(i) => cluster.pods.get(i).map(Some).ok_or(()),
        Endpoint::Ip(_) => Ok(None),
    };
    let (Ok(src_pod), Ok(dst_pod)) = (pod(src), pod(dst)) else { return false };
    if src == dst && src_pod.is_some() {
        return true;
    }
    let egress_ok = src_pod.is_none_or(|a| {
        side_allows(cluster, policies, a, false, &Traffic { peer: dst, dst_pod, proto, port })
    });
    let ingress_ok = dst_pod.is_none_or(|b| {
        side_allows(cluster, policies, b, true, &Traffic { peer: src, dst_pod, proto, port })
    });
    egress_ok && ingress_ok
}

/// The connection being judged, seen from one side.
struct Traffic<'c> {
    /// The remote end (source for ingress, destination for egress).
    peer: Endpoint,
    /// The destination pod of the connection, if it is a pod (named ports resolve against it).
    dst_pod: Option<&'c Pod>,
    proto: Protocol,
    port: u16,
}

/// Whether `subject`'s policies in one direction let `traffic` through.
fn side_allows(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    subject: &Pod,
    ingress: bool,
    traffic: &Traffic<'_>,
) -> bool {
    let mut isolated = false;
    for policy in policies {
        let ns = &policy.metadata.namespace;
        if *ns != subject.namespace || !policy.spec.pod_selector.matches(&subject.labels) {
            continue;
        }
        let spec = &policy.spec;
        let types = &spec.policy_types;
        let applies = if ingress {
            types.is_empty() || types.contains(&PolicyType::Ingress)
        } else if types.is_empty() {
            !spec.egress.is_empty()
        } else {
            types.contains(&PolicyType::Egress)
        };
        if !applies {
            continue;
        }
        isolated = true;
        let rules: Vec<(&[NetworkPolicyPeer], &[NetworkPolicyPort])> = if ingress {
            spec.ingress.iter().map(|r| (r.from.as_slice(), r.ports.as_slice())).collect()
        } else {
            spec.egress.iter().map(|r| (r.to.as_slice(), r.ports.as_slice())).collect()
        };
        for (peers, ports) in rules {
            let peer_ok =
                peers.is_empty() || peers.iter().any(|p| peer_matches(cluster, ns, p, traffic.peer));
            let port_ok = ports.is_empty()
                || ports.iter().any(|p| port_matches(p, traffic.dst_pod, traffic.proto, traffic.port));
            if peer_ok && port_ok {
                return true;
            }
        }
    }
    !isolated
}

fn peer_matches(cluster: &Cluster, policy_ns: &str, peer: &NetworkPolicyPeer, end: Endpoint) -> bool {
    let has_selector = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
    if let Some(block) = &peer.ip_block {
        if has_selector {
            return false;
        }
        let Ok(net) = block.cidr.parse::<IpNetwork>() else { return false };
        let mut except = Vec::new();
        for e in &block.except {
            let Ok(e) = e.parse::<IpNetwork>() else { return false };
            except.push(e);
        }
        let in_block = |ip: &std::net::IpAddr| net.contains(*ip) && except.iter().all(|e| !e.contains(*ip));
        return match end {
            Endpoint::Ip(ip) => in_block(&ip),
            Endpoint::Pod(i) => cluster.pods.get(i).is_some_and(|pod| pod.ips.iter().any(in_block)),
        };
    }
    if !has_selector {
        return false;
    }
    let Endpoint::Pod(i) = end else { return false };
    let Some(pod) = cluster.pods.get(i) else { return false };
    let namespace_ok = match &peer.namespace_selector {
        None => pod.namespace == policy_ns,
        Some(sel) => sel.matches(&cluster.namespace_labels(&pod.namespace)),
    };
    namespace_ok && peer.pod_selector.as_ref().is_none_or(|sel| sel.matches(&pod.labels))
}

fn port_matches(entry: &NetworkPolicyPort, dst_pod: Option<&Pod>, proto: Protocol, port: u16) -> bool {
    if entry.protocol != proto {
        return false;
    }
    let valid = |n: i32| (1..=65535).contains(&n);
    match (&entry.port, entry.end_port) {
        (None, None) => true,
        (None | Some(IntOrString::String(_)), Some(_)) => false,
        (Some(IntOrString::Int(n)), None) => valid(*n) && i32::from(port) == *n,
        (Some(IntOrString::Int(n)), Some(end)) => {
            valid(*n) && valid(end) && end >= *n && (*n..=end).contains(&i32::from(port))
        }
        (Some(IntOrString::String(name)), None) => dst_pod.is_some_and(|pod| {
            pod.ports
                .iter()
                .any(|cp| cp.name.as_deref() == Some(name) && cp.protocol == proto && cp.port == port)
        }),
    }
}
