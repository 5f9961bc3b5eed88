//! Randomized cross-check: on many small random clusters and policy sets, the evaluated form
//! ([`evaluate`] + [`allowed`]) must agree with the direct implementation ([`allowed_direct`]) on
//! every connection. Deterministic (fixed seeds).

use std::collections::BTreeMap;
use std::net::IpAddr;

use super::ip;
use crate::{
    Cluster, ContainerPort, Endpoint, IntOrString, IpBlock, LabelSelector, LabelSelectorOperator,
    LabelSelectorRequirement, Namespace, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, Pod, PolicyType, Protocol, allowed,
    allowed_direct, evaluate,
};

/// `SplitMix64`: small, deterministic, good enough for test generation.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (n > 0).
    fn below(&mut self, n: usize) -> usize {
        usize::try_from(self.next() % n as u64).unwrap_or(0)
    }

    fn chance(&mut self, percent: usize) -> bool {
        self.below(100) < percent
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len())]
    }
}

const NS_NAMES: [&str; 4] = ["n0", "n1", "n2", "n3"];
const POD_LABELS: [(&str, &[&str]); 2] = [("app", &["web", "db", "api"]), ("tier", &["front", "back"])];
const NS_LABELS: [(&str, &[&str]); 3] = [
    ("env", &["prod", "dev"]),
    ("team", &["a", "b"]),
    ("kubernetes.io/metadata.name", &["n0", "n1", "n2", "n3"]),
];
const PORTS: [u16; 7] = [53, 79, 80, 81, 82, 8080, 9090];

fn random_labels(rng: &mut Rng, keys: &[(&str, &[&str])]) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::new();
    for (key, values) in keys {
        if rng.chance(60) {
            labels.insert((*key).to_owned(), (*rng.pick(values)).to_owned());
        }
    }
    labels
}

fn random_cluster(rng: &mut Rng) -> Cluster {
    // n3 is deliberately not listed: it only has the implied name label.
    let namespaces = NS_NAMES[..3]
        .iter()
        .map(|name| Namespace { name: (*name).to_owned(), labels: random_labels(rng, &NS_LABELS[..2]) })
        .collect();
    let port_choices: [(Option<&str>, u16, Protocol); 6] = [
        (Some("http"), 80, Protocol::Tcp),
        (Some("http"), 8080, Protocol::Tcp),
        (Some("dns"), 53, Protocol::Udp),
        (Some("dns"), 53, Protocol::Tcp),
        (Some("metrics"), 9090, Protocol::Tcp),
        (None, 81, Protocol::Tcp),
    ];
    let count = 2 + rng.below(5);
    let pods = (0..count)
        .map(|i| {
            let mut ips = vec![ip(&format!("10.0.{}.{}", rng.below(4), i + 1))];
            if rng.chance(20) {
                ips.push(ip(&format!("fd00::{}", i + 1)));
            }
            let ports = port_choices
                .iter()
                .filter(|_| rng.chance(35))
                .map(|(name, port, protocol)| ContainerPort {
                    name: name.map(str::to_owned),
                    port: *port,
                    protocol: *protocol,
                })
                .collect();
            Pod {
                name: format!("p{i}"),
                namespace: (*rng.pick(&NS_NAMES)).to_owned(),
                labels: random_labels(rng, &POD_LABELS),
                ips,
                ports,
            }
        })
        .collect();
    Cluster { namespaces, pods }
}

fn random_selector(rng: &mut Rng, keys: &[(&str, &[&str])]) -> LabelSelector {
    let mut sel = LabelSelector::default();
    let shape = rng.below(4);
    if shape & 1 == 1 {
        let (key, values) = rng.pick(keys);
        sel.match_labels.insert((*key).to_owned(), (*rng.pick(values)).to_owned());
    }
    if shape & 2 == 2 {
        for _ in 0..=rng.below(2) {
            let (key, values) = rng.pick(keys);
            let operator = *rng.pick(&[
                LabelSelectorOperator::In,
                LabelSelectorOperator::NotIn,
                LabelSelectorOperator::Exists,
                LabelSelectorOperator::DoesNotExist,
            ]);
            let values = match operator {
                LabelSelectorOperator::In | LabelSelectorOperator::NotIn => {
                    let mut v: Vec<String> =
                        (0..=rng.below(2)).map(|_| (*rng.pick(values)).to_owned()).collect();
                    v.dedup();
                    v
                }
                _ => vec![],
            };
            sel.match_expressions.push(LabelSelectorRequirement { key: (*key).to_owned(), operator, values });
        }
    }
    sel
}

fn random_ip_block(rng: &mut Rng) -> IpBlock {
    let cidrs =
        ["10.0.0.0/8", "10.0.1.0/24", "10.0.0.0/23", "0.0.0.0/0", "10.0.2.9/16", "fd00::/64", "10.0.3.0/24"];
    let excepts = [
        "10.0.1.0/25",
        "10.0.1.2/32",
        "10.0.0.0/24",
        "10.0.2.0/24",
        "10.0.3.3/32",
        "fd00::/120",
        "192.168.0.0/16",
    ];
    let cidr = *rng.pick(&cidrs);
    let net: crate::IpNetwork = cidr.parse().expect("generator CIDR");
    let except = excepts
        .iter()
        .filter(|e| {
            let ex: crate::IpNetwork = e.parse().expect("generator CIDR");
            net.contains_net(&ex) && ex.prefix() > net.prefix()
        })
        .filter(|_| rng.chance(40))
        .map(|e| (*e).to_owned())
        .collect();
    IpBlock { cidr: cidr.to_owned(), except }
}

fn random_peers(rng: &mut Rng) -> Vec<NetworkPolicyPeer> {
    if rng.chance(15) {
        return vec![];
    }
    (0..=rng.below(2))
        .map(|_| match rng.below(4) {
            0 => NetworkPolicyPeer {
                pod_selector: Some(random_selector(rng, &POD_LABELS)),
                ..Default::default()
            },
            1 => NetworkPolicyPeer {
                namespace_selector: Some(random_selector(rng, &NS_LABELS)),
                ..Default::default()
            },
            2 => NetworkPolicyPeer {
                pod_selector: Some(random_selector(rng, &POD_LABELS)),
                namespace_selector: Some(random_selector(rng, &NS_LABELS)),
                ip_block: None,
            },
            _ => NetworkPolicyPeer { ip_block: Some(random_ip_block(rng)), ..Default::default() },
        })
        .collect()
}

fn random_ports(rng: &mut Rng) -> Vec<NetworkPolicyPort> {
    if rng.chance(20) {
        return vec![];
    }
    (0..=rng.below(2))
        .map(|_| {
            let protocol = if rng.chance(60) { Protocol::Tcp } else { *rng.pick(&Protocol::ALL) };
            match rng.below(4) {
                0 => NetworkPolicyPort { protocol, port: None, end_port: None },
                1 => NetworkPolicyPort {
                    protocol,
                    port: Some(IntOrString::Int(i32::from(*rng.pick(&PORTS)))),
                    end_port: None,
                },
                2 => {
                    let from = *rng.pick(&[79, 80, 81]);
                    let to = *rng.pick(&[81, 82, 8080]);
                    NetworkPolicyPort { protocol, port: Some(IntOrString::Int(from)), end_port: Some(to) }
                }
                _ => NetworkPolicyPort {
                    protocol,
                    port: Some(IntOrString::String(
                        (*rng.pick(&["http", "dns", "metrics", "nope"])).to_owned(),
                    )),
                    end_port: None,
                },
            }
        })
        .collect()
}

fn random_policy(rng: &mut Rng, i: usize) -> NetworkPolicy {
    let policy_types = match rng.below(4) {
        0 | 1 => vec![],
        2 => vec![*rng.pick(&[PolicyType::Ingress, PolicyType::Egress])],
        _ => vec![PolicyType::Ingress, PolicyType::Egress],
    };
    let ingress = (0..rng.below(3))
        .map(|_| NetworkPolicyIngressRule { from: random_peers(rng), ports: random_ports(rng) })
        .collect();
    let egress = (0..rng.below(3))
        .map(|_| NetworkPolicyEgressRule { to: random_peers(rng), ports: random_ports(rng) })
        .collect();
    let spec =
        NetworkPolicySpec { pod_selector: random_selector(rng, &POD_LABELS), policy_types, ingress, egress };
    let ns = *rng.pick(&NS_NAMES[..3]);
    NetworkPolicy::new(ns, &format!("np{i}"), spec)
}

#[test]
fn evaluated_form_agrees_with_direct_implementation() {
    let externals: [IpAddr; 4] = [ip("10.0.1.200"), ip("10.0.3.3"), ip("192.168.7.7"), ip("fd00::99")];
    let mut rng = Rng(0x5eed_2024);
    let mut checked = 0_u64;
    let mut denied = 0_u64;
    for case in 0..1500 {
        let cluster = random_cluster(&mut rng);
        let policies: Vec<NetworkPolicy> = (0..=rng.below(5)).map(|i| random_policy(&mut rng, i)).collect();
        for p in &policies {
            assert!(p.validate().is_empty(), "generator made an invalid policy: {:?}", p.validate());
        }
        let eval = evaluate(&cluster, &policies);
        assert_eq!(eval.len(), cluster.pods.len());
        let endpoints: Vec<Endpoint> = (0..cluster.pods.len())
            .map(Endpoint::Pod)
            .chain(externals.iter().map(|ip| Endpoint::Ip(*ip)))
            .collect();
        for &src in &endpoints {
            for &dst in &endpoints {
                if matches!((src, dst), (Endpoint::Ip(_), Endpoint::Ip(_))) {
                    continue; // no pod involved, nothing to decide
                }
                for proto in Protocol::ALL {
                    for port in PORTS {
                        let got = allowed(&cluster, &eval, src, dst, proto, port);
                        let want = allowed_direct(&cluster, &policies, src, dst, proto, port);
                        assert_eq!(
                            got, want,
                            "case {case}: {src:?} -> {dst:?} {proto}/{port}\ncluster: {cluster:#?}\n\
                             policies: {policies:#?}\nevaluated: {eval:#?}"
                        );
                        checked += 1;
                        denied += u64::from(!got);
                    }
                }
            }
        }
    }
    // The generator must exercise both verdicts substantially, or the agreement means little.
    assert!(denied > checked / 8 && denied < checked * 7 / 8, "denied {denied} of {checked}");
}
