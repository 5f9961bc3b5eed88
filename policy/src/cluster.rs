//! The cluster model the policies are evaluated against: namespaces, pods, their labels, addresses
//! and named container ports.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;

use serde::Deserialize;

/// Label key the API server sets on every namespace, with the namespace name as value
/// (`NamespaceDefaultLabelName`, GA since Kubernetes 1.22).
pub const NAMESPACE_NAME_LABEL: &str = "kubernetes.io/metadata.name";

/// Transport protocols `NetworkPolicy` can name. Serialized exactly as upstream: `TCP`, `UDP`, `SCTP`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default, Deserialize, serde::Serialize,
)]
pub enum Protocol {
    /// `TCP` (the default whenever a protocol is omitted).
    #[default]
    #[serde(rename = "TCP")]
    Tcp,
    /// `UDP`.
    #[serde(rename = "UDP")]
    Udp,
    /// `SCTP`.
    #[serde(rename = "SCTP")]
    Sctp,
}

impl Protocol {
    /// All protocols, in a fixed order.
    pub const ALL: [Protocol; 3] = [Protocol::Tcp, Protocol::Udp, Protocol::Sctp];

    /// Upstream spelling (`TCP`, `UDP`, `SCTP`).
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

impl fmt::Display for Protocol {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A namespace and its labels.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Namespace {
    /// Namespace name.
    pub name: String,
    /// Labels as set by the user. [`NAMESPACE_NAME_LABEL`] is implied and need not be listed.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A container port of a pod; `name` is what named ports in policies resolve against.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ContainerPort {
    /// Port name (IANA service name syntax upstream), if any.
    #[serde(default)]
    pub name: Option<String>,
    /// Port number.
    pub port: u16,
    /// Protocol, `TCP` when omitted.
    #[serde(default)]
    pub protocol: Protocol,
}

/// A pod: identity, labels, addresses and container ports.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pod {
    /// Pod name.
    pub name: String,
    /// Namespace the pod lives in.
    pub namespace: String,
    /// Pod labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Pod IPs (one per address family at most, upstream).
    #[serde(default)]
    pub ips: Vec<IpAddr>,
    /// Container ports, used to resolve named ports.
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

/// The whole cluster state policies are evaluated against. Pods are referred to by index.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Cluster {
    /// Namespaces. A pod whose namespace is not listed behaves as if its namespace existed with no
    /// labels other than [`NAMESPACE_NAME_LABEL`].
    #[serde(default)]
    pub namespaces: Vec<Namespace>,
    /// Pods; their positions are the pod indices used throughout the crate.
    #[serde(default)]
    pub pods: Vec<Pod>,
}

impl Cluster {
    /// The effective labels of namespace `name`: its own labels plus
    /// `kubernetes.io/metadata.name: <name>`, which the API server always enforces.
    #[must_use]
    pub fn namespace_labels(&self, name: &str) -> BTreeMap<String, String> {
        let mut labels =
            self.namespaces.iter().find(|ns| ns.name == name).map(|ns| ns.labels.clone()).unwrap_or_default();
        labels.insert(NAMESPACE_NAME_LABEL.to_owned(), name.to_owned());
        labels
    }

    /// Index of the first pod that owns `ip`, if any.
    #[must_use]
    pub fn pod_by_ip(&self, ip: IpAddr) -> Option<usize> {
        self.pods.iter().position(|pod| pod.ips.contains(&ip))
    }

    /// Index of pod `namespace/name`, if any.
    #[must_use]
    pub fn pod_index(&self, namespace: &str, name: &str) -> Option<usize> {
        self.pods.iter().position(|pod| pod.namespace == namespace && pod.name == name)
    }
}
