//! Unit tests: upstream e2e scenarios, parse/validation errors, `TenantPolicy`, networks and
//! selectors, and the randomized cross-check of the evaluated form against the direct implementation.

mod crosscheck;
mod e2e;
mod net;
mod parse;
mod tenant;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::IpAddr;
use std::path::Path;

use crate::{
    Cluster, ContainerPort, Endpoint, Namespace, NetworkPolicy, Pod, Protocol, allowed, allowed_direct,
    evaluate, parse_file,
};

pub(crate) fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
    pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

pub(crate) fn ip(s: &str) -> IpAddr {
    s.parse().expect("test IP")
}

/// Parses test YAML, panicking with every error.
pub(crate) fn policies(yaml: &str) -> Vec<NetworkPolicy> {
    match parse_file(Path::new("test.yaml"), yaml) {
        Ok(p) => p,
        Err(errors) => {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            panic!("test policy does not parse:\n{}", text.join("\n"))
        }
    }
}

pub(crate) const NAMESPACES: [&str; 3] = ["x", "y", "z"];
pub(crate) const PODS: [&str; 3] = ["a", "b", "c"];

/// The upstream e2e "netpol" model: namespaces x, y, z labelled `ns=<name>`, each with pods a, b, c
/// labelled `pod=<name>`, each serving ports 80 and 81 on TCP, UDP and SCTP, with container ports
/// named `serve-<port>-<proto>`. Pod `<ns>/<pod>` has IP 10.0.<1|2|3>.<1|2|3>.
pub(crate) fn netpol_model() -> Cluster {
    let namespaces = NAMESPACES
        .iter()
        .map(|ns| Namespace { name: (*ns).to_owned(), labels: labels(&[("ns", ns)]) })
        .collect();
    let mut pods = Vec::new();
    for (n, ns) in NAMESPACES.iter().enumerate() {
        for (p, name) in PODS.iter().enumerate() {
            let mut ports = Vec::new();
            for port in [80, 81] {
                for proto in Protocol::ALL {
                    ports.push(ContainerPort {
                        name: Some(format!("serve-{port}-{}", proto.as_str().to_lowercase())),
                        port,
                        protocol: proto,
                    });
                }
            }
            pods.push(Pod {
                name: (*name).to_owned(),
                namespace: (*ns).to_owned(),
                labels: labels(&[("pod", name)]),
                ips: vec![ip(&format!("10.0.{}.{}", n + 1, p + 1))],
                ports,
            });
        }
    }
    Cluster { namespaces, pods }
}

/// Index of `"ns/pod"` in the netpol model.
pub(crate) fn pod(name: &str) -> usize {
    let (ns, pod) = name.split_once('/').expect("ns/pod");
    let n = NAMESPACES.iter().position(|x| *x == ns).expect("namespace");
    let p = PODS.iter().position(|x| *x == pod).expect("pod");
    n * PODS.len() + p
}

fn pod_name(i: usize) -> String {
    format!("{}/{}", NAMESPACES[i / PODS.len()], PODS[i % PODS.len()])
}

/// An expected pod-to-pod truth table over the netpol model, in the style of the e2e
/// `Reachability` helper (`[from][to]`).
pub(crate) struct Reach {
    expected: Vec<Vec<bool>>,
}

/// A pod filter: `""` = any, `"x"` = namespace x, `"x/a"` = one pod.
fn pod_filter(filter: &str, i: usize) -> bool {
    let name = pod_name(i);
    filter.is_empty() || name == filter || name.split('/').next() == Some(filter)
}

impl Reach {
    pub(crate) fn new(default: bool) -> Self {
        let n = NAMESPACES.len() * PODS.len();
        Reach { expected: vec![vec![default; n]; n] }
    }

    /// Sets the expectation for every pair matching the filters (see [`pod_filter`]).
    pub(crate) fn expect(&mut self, from: &str, to: &str, value: bool) -> &mut Self {
        for (f, row) in self.expected.iter_mut().enumerate() {
            for (t, cell) in row.iter_mut().enumerate() {
                if pod_filter(from, f) && pod_filter(to, t) {
                    *cell = value;
                }
            }
        }
        self
    }

    /// Loopback is always allowed (upstream e2e `AllowLoopback`).
    pub(crate) fn loopback(&mut self) -> &mut Self {
        for (i, row) in self.expected.iter_mut().enumerate() {
            row[i] = true;
        }
        self
    }
}

/// Checks every pod pair of the netpol model on `proto`/`port` against `reach`, with both the
/// evaluated form and the direct implementation.
pub(crate) fn check(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    proto: Protocol,
    port: u16,
    reach: &Reach,
) {
    let eval = evaluate(cluster, policies);
    let n = cluster.pods.len();
    let mut wrong = Vec::new();
    let mut table = String::from("      ");
    for t in 0..n {
        let _ = write!(table, "{:>5}", pod_name(t));
    }
    table.push('\n');
    for f in 0..n {
        let _ = write!(table, "{:>5} ", pod_name(f));
        for t in 0..n {
            let (src, dst) = (Endpoint::Pod(f), Endpoint::Pod(t));
            let got = allowed(cluster, &eval, src, dst, proto, port);
            let direct = allowed_direct(cluster, policies, src, dst, proto, port);
            let want = reach.expected[f][t];
            let mark = if got == want && direct == want {
                if want { "    ." } else { "    X" }
            } else {
                wrong.push(format!(
                    "{} -> {}: expected {want}, evaluate {got}, direct {direct}",
                    pod_name(f),
                    pod_name(t)
                ));
                "    !"
            };
            table.push_str(mark);
        }
        table.push('\n');
    }
    assert!(
        wrong.is_empty(),
        "{proto}/{port}: {} wrong verdicts (. allowed, X denied, ! wrong)\n{table}{}",
        wrong.len(),
        wrong.join("\n")
    );
}

/// Verdict for one connection, asserting that both implementations agree.
pub(crate) fn verdict(
    cluster: &Cluster,
    policies: &[NetworkPolicy],
    src: Endpoint,
    dst: Endpoint,
    proto: Protocol,
    port: u16,
) -> bool {
    let eval = evaluate(cluster, policies);
    let got = allowed(cluster, &eval, src, dst, proto, port);
    let direct = allowed_direct(cluster, policies, src, dst, proto, port);
    assert_eq!(got, direct, "{src:?} -> {dst:?} {proto}/{port}: evaluate and direct disagree");
    got
}
