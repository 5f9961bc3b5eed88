//! ztseg policy model: Kubernetes `networking.k8s.io/v1` `NetworkPolicy` with upstream semantics.
//!
//! This crate owns the meaning of policy. It parses and validates `NetworkPolicy` YAML
//! ([`parse_file`], with `file:line:column: field: message` errors), holds the cluster model the
//! policies are evaluated against ([`Cluster`]: namespaces, pods, labels, IPs, named ports), and
//! evaluates policies into per-pod allow lists ([`evaluate`] → [`PodPolicy`]) that the enforcer's
//! compiler turns into BPF map entries. [`allowed`] gives the verdict for one connection over that
//! evaluated form; [`allowed_direct`] computes the same verdict straight from the policies and
//! serves as the reference oracle. It is pure logic: no BPF, no I/O.
//!
//! Semantics follow upstream exactly: a pod is isolated in a direction once a policy of its
//! namespace selects it with that policy type; an isolated pod accepts only what some rule of
//! some such policy allows (rules are additive); a connection needs the source's egress and the
//! destination's ingress to allow it; absent or empty `from`/`to`/`ports` match everything; named
//! ports resolve against the destination pod. Two points not spelled out in the API reference but
//! relied on by the upstream e2e tests: a pod talking to itself is always allowed (loopback), and
//! every namespace carries the label `kubernetes.io/metadata.name: <name>`.
//!
//! Above `NetworkPolicy` sits ztseg's admin tier, [`TenantPolicy`] (`ztseg.io/v1alpha1`): rules
//! between tenants that `NetworkPolicy` cannot override, on top of a default cross-tenant deny.
//! [`parse_documents`] reads files mixing both kinds; [`TenantPolicy::keys`] gives the admin-tier
//! keys a policy compiles to and [`tenant_conflicts`] checks them across files. [`parse_set`]
//! reads the files of a policy set (an enforcer's policy directory) with the checks across
//! files, each error located in its file.

#![forbid(unsafe_code)]

mod api;
mod cluster;
mod direct;
mod eval;
mod net;
mod parse;
mod tenant;
mod validate;

#[cfg(test)]
mod tests;

pub use api::{
    API_VERSION, DEFAULT_NAMESPACE, IntOrString, IpBlock, KIND, LabelSelector, LabelSelectorOperator,
    LabelSelectorRequirement, NetworkPolicy, NetworkPolicyEgressRule, NetworkPolicyIngressRule,
    NetworkPolicyPeer, NetworkPolicyPort, NetworkPolicySpec, ObjectMeta, PolicyType,
};
pub use cluster::{Cluster, ContainerPort, NAMESPACE_NAME_LABEL, Namespace, Pod, Protocol};
pub use direct::allowed_direct;
pub use eval::{
    AllowRule, Direction, Endpoint, Isolation, PeerMatch, PodPolicy, PortMatch, allowed, evaluate,
};
pub use net::{IpNetwork, IpNetworkError};
pub use parse::{Document, PolicyError, parse_documents, parse_file, parse_set, yaml_position};
pub use tenant::{
    TENANT_POLICY_API_VERSION, TENANT_POLICY_KIND, TenantAction, TenantPolicy, TenantPolicyMeta,
    TenantPolicySpec, TenantPort, TenantSelector, tenant_conflicts,
};
pub use validate::{FieldError, Seg, check_label, check_port_name, path_string};
