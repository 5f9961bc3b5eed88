//! ztseg `TenantPolicy` (`ztseg.io/v1alpha1`): the admin tier that sits above the tenants' own
//! `NetworkPolicy` objects.
//!
//! Parsing goes through a raw form ([`RawTenantPolicy`]) whose numbers and `ttl` are wider than the
//! public types, so that out-of-range values are reported together with every other problem of the
//! document (as semantic errors at the offending value) instead of ending deserialization.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::Deserialize;
use serde::de::{self, Deserializer, Visitor};
use serde_yaml::Value;

use crate::api::{deserialize_meta, null_as_default};
use crate::cluster::Protocol;
use crate::parse::describe;
use crate::validate::{Issue, Seg, check_port_number, check_priority, check_ttl, tenant_issues};

/// The only `apiVersion` accepted for a [`TenantPolicy`].
pub const TENANT_POLICY_API_VERSION: &str = "ztseg.io/v1alpha1";
/// The `kind` of a [`TenantPolicy`].
pub const TENANT_POLICY_KIND: &str = "TenantPolicy";

/// The wildcard tenant.
pub(crate) const ANY_TENANT: &str = "*";
/// Highest (weakest) priority.
pub(crate) const MAX_PRIORITY: u32 = 1000;
/// Shortest `ttl`.
pub(crate) const MIN_TTL: Duration = Duration::from_secs(1);
/// Longest `ttl` (30 days).
pub(crate) const MAX_TTL: Duration = Duration::from_hours(30 * 24);

/// A ztseg `TenantPolicy`: one rule of the admin tier, which sits above the tenants' own
/// `NetworkPolicy` objects (the `NetworkPolicy` tier).
///
/// ```yaml
/// apiVersion: ztseg.io/v1alpha1
/// kind: TenantPolicy
/// metadata:
///   name: shop-to-payments
/// spec:
///   priority: 10
///   action: Allow
///   from: {tenant: acme}
///   to: {tenant: payments}
///   ports:
///   - {protocol: TCP, port: 443}
///   ttl: 2h
/// ```
///
/// Every workload belongs to a tenant. A policy *matches* a connection when `from` matches the
/// source's tenant, `to` the destination's tenant, and the connection's protocol and destination
/// port match `ports`. The verdict is then:
///
/// - Among the matching tenant policies (those whose `ttl` has not run out) the one with the lowest
///   `priority` number wins. [`TenantAction::Allow`] and [`TenantAction::Deny`] are final: no
///   `NetworkPolicy` can override them. [`TenantAction::Pass`] hands the decision to the
///   `NetworkPolicy` tier; for traffic between two tenants that means `NetworkPolicy` decides
///   instead of the default cross-tenant deny.
/// - With no matching `TenantPolicy`, traffic between workloads of two different tenants is denied
///   (the default cross-tenant deny) and traffic within a tenant is decided by `NetworkPolicy`.
///
/// `*` matches every tenant, the other side's own tenant included: `*` on both sides makes a
/// cluster-wide rule, which also applies to traffic inside a tenant, and so does a one-sided `*`
/// for its tenant (`from: *, to: payments` also covers payments → payments).
///
/// The data plane holds one admin rule per key ([`TenantPolicy::keys`]), so two tenant policies
/// producing the same key are rejected (per file by [`parse_documents`](crate::parse_documents),
/// across files by [`tenant_conflicts`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    /// Always [`TENANT_POLICY_API_VERSION`] for parsed policies.
    pub api_version: String,
    /// Always [`TENANT_POLICY_KIND`] for parsed policies.
    pub kind: String,
    /// Name, labels, annotations. tenant policies are cluster-scoped: there is no namespace.
    pub metadata: TenantPolicyMeta,
    /// The rule.
    pub spec: TenantPolicySpec,
}

/// `metadata` of a [`TenantPolicy`]. As for `NetworkPolicy`, the bookkeeping fields of an object
/// exported from a cluster (`uid`, `resourceVersion`, ...) are accepted and ignored; `namespace`
/// and anything else are rejected.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TenantPolicyMeta {
    /// `metadata.name` (required): a DNS-1123 label, unique among the tenant policies of a file.
    pub name: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl<'de> Deserialize<'de> for TenantPolicyMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = deserialize_meta(deserializer, false)?;
        Ok(TenantPolicyMeta { name: raw.name, labels: raw.labels, annotations: raw.annotations })
    }
}

/// `spec` of a [`TenantPolicy`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicySpec {
    /// `0..=1000`; among matching tenant policies the lowest number wins.
    pub priority: u32,
    /// What happens to matching traffic.
    pub action: TenantAction,
    /// Source tenant.
    pub from: TenantSelector,
    /// Destination tenant.
    pub to: TenantSelector,
    /// Destination protocols and ports; empty means every protocol and port.
    pub ports: Vec<TenantPort>,
    /// Lifetime: the policy stops applying this long after it is applied. The kernel enforces the
    /// deadline, counted from when the enforcer installs the rule. Whole seconds, `1s..=30d`.
    /// `None`: until removed.
    pub ttl: Option<Duration>,
}

/// `spec.action` of a [`TenantPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum TenantAction {
    /// Allow, final: no `NetworkPolicy` can deny it.
    Allow,
    /// Deny, final: no `NetworkPolicy` can allow it.
    Deny,
    /// Hand the decision to the `NetworkPolicy` tier (for traffic between two tenants, instead of
    /// the default cross-tenant deny).
    Pass,
}

impl fmt::Display for TenantAction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TenantAction::Allow => "Allow",
            TenantAction::Deny => "Deny",
            TenantAction::Pass => "Pass",
        })
    }
}

/// `spec.from` / `spec.to` of a [`TenantPolicy`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantSelector {
    /// A tenant name (DNS-1123 label), or `*` for any tenant. In YAML the wildcard must be quoted
    /// (`tenant: '*'`): a bare `*` starts an alias.
    pub tenant: String,
}

impl TenantSelector {
    /// Whether this is the wildcard `*`, matching every tenant.
    #[must_use]
    pub fn is_any(&self) -> bool {
        self.tenant == ANY_TENANT
    }
}

/// A `spec.ports` entry of a [`TenantPolicy`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct TenantPort {
    /// Protocol; `TCP` when omitted.
    pub protocol: Protocol,
    /// Destination port, `1..=65535`; `None` means every port of `protocol`.
    pub port: Option<u16>,
}

/// An admin-tier key: (from tenant, to tenant, protocol or `None` for any, port or `None` for any).
pub(crate) type Key = (String, String, Option<Protocol>, Option<u16>);

impl TenantPolicy {
    /// The admin-tier keys this policy produces: `(from, to, protocol or None for any, port or None
    /// for any)`, tenants as written (`*` included).
    ///
    /// An empty `ports` gives the single key `(from, to, None, None)`; each `ports` entry gives
    /// `(from, to, Some(protocol), port)`, with `port` `None` for every port of the protocol. Keys
    /// are listed in `ports` order, each once.
    #[must_use]
    pub fn keys(&self) -> Vec<(String, String, Option<Protocol>, Option<u16>)> {
        let (from, to) = (&self.spec.from.tenant, &self.spec.to.tenant);
        if self.spec.ports.is_empty() {
            return vec![(from.clone(), to.clone(), None, None)];
        }
        let mut keys: Vec<Key> = Vec::with_capacity(self.spec.ports.len());
        for port in &self.spec.ports {
            let key = (from.clone(), to.clone(), Some(port.protocol), port.port);
            if !keys.contains(&key) {
                keys.push(key);
            }
        }
        keys
    }
}

/// Checks tenant policies loaded from several files (the enforcer loads a directory) for admin-key
/// conflicts: two policies producing the same key ([`TenantPolicy::keys`]), which the data plane
/// cannot hold. Returns one message per conflicting pair, naming both policies and the shared keys;
/// empty when there is none. Each policy is compared with the first policy (in slice order) that
/// produced each of its keys.
#[must_use]
pub fn tenant_conflicts(policies: &[TenantPolicy]) -> Vec<String> {
    conflicts(policies)
        .into_iter()
        .map(|c| {
            format!(
                "TenantPolicy `{}` and TenantPolicy `{}` {}",
                policies[c.policy].metadata.name,
                policies[c.first].metadata.name,
                c.describe()
            )
        })
        .collect()
}

/// Policy `policy` produces `keys`, which policy `first` (an earlier one) already produces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Conflict {
    pub policy: usize,
    pub first: usize,
    pub keys: Vec<Key>,
}

impl Conflict {
    /// "both produce the admin rule for ...; ..."
    pub(crate) fn describe(&self) -> String {
        let keys: Vec<String> = self.keys.iter().map(describe_key).collect();
        let rules = if keys.len() == 1 { "rule" } else { "rules" };
        format!(
            "both produce the admin {rules} for {}; the data plane holds one admin rule per key",
            keys.join(", ")
        )
    }
}

fn describe_key((from, to, protocol, port): &Key) -> String {
    let ports = match (protocol, port) {
        (None, _) => "all protocols and ports".to_owned(),
        (Some(protocol), None) => format!("all {protocol} ports"),
        (Some(protocol), Some(port)) => format!("{protocol} port {port}"),
    };
    format!("`{from}` -> `{to}` ({ports})")
}

/// Admin-key conflicts among `policies`, in order: each policy against the first policy that
/// produced each of its keys (one [`Conflict`] per pair).
pub(crate) fn conflicts<'a>(policies: impl IntoIterator<Item = &'a TenantPolicy>) -> Vec<Conflict> {
    let mut owners: BTreeMap<Key, usize> = BTreeMap::new();
    let mut out = Vec::new();
    for (index, policy) in policies.into_iter().enumerate() {
        let mut mine: Vec<Conflict> = Vec::new();
        for key in policy.keys() {
            if let Some(&first) = owners.get(&key) {
                match mine.iter_mut().find(|c| c.first == first) {
                    Some(conflict) => conflict.keys.push(key),
                    None => mine.push(Conflict { policy: index, first, keys: vec![key] }),
                }
            } else {
                owners.insert(key, index);
            }
        }
        out.extend(mine);
    }
    out
}

/// Parses a `ttl`: a whole number followed by `s`, `m`, `h` or `d`, between `1s` and `30d`.
pub(crate) fn parse_ttl(text: &str) -> Result<Duration, String> {
    let mut chars = text.chars();
    let scale: u64 = match chars.next_back() {
        Some('s') => 1,
        Some('m') => 60,
        Some('h') => 3600,
        Some('d') => 86_400,
        _ => 0,
    };
    let digits = chars.as_str();
    if scale == 0 || digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "invalid ttl `{text}`: expected a whole number followed by a unit `s`, `m`, `h` or `d` \
             (e.g. `90s`, `30m`, `2h`, `7d`)"
        ));
    }
    match digits.parse::<u64>().ok().and_then(|n| n.checked_mul(scale)).map(Duration::from_secs) {
        Some(ttl) if check_ttl(ttl).is_ok() => Ok(ttl),
        _ => Err(format!("ttl `{text}` is out of range: must be between 1s and 30d, inclusive")),
    }
}

/// `TenantPolicy` as written, before range checks and `ttl` parsing.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub(crate) struct RawTenantPolicy {
    api_version: String,
    kind: String,
    metadata: TenantPolicyMeta,
    spec: RawSpec,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSpec {
    #[serde(deserialize_with = "priority_number")]
    priority: i64,
    action: TenantAction,
    from: TenantSelector,
    to: TenantSelector,
    #[serde(default, deserialize_with = "null_as_default")]
    ports: Vec<RawPort>,
    /// Any scalar, so that `ttl: 3600` gets the format message rather than a type error.
    #[serde(default)]
    ttl: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPort {
    #[serde(default, deserialize_with = "null_as_default")]
    protocol: Protocol,
    #[serde(default, deserialize_with = "port_number")]
    port: Option<i64>,
}

/// An integer of any size `i64` holds; `expecting` names it in type errors.
struct IntVisitor(&'static str);

impl Visitor<'_> for IntVisitor {
    type Value = i64;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }

    fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
        Ok(v)
    }

    fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
        i64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
    }
}

fn priority_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    deserializer.deserialize_any(IntVisitor("a priority between 0 and 1000"))
}

fn port_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Option<i64>, D::Error> {
    struct PortNumber(i64);

    impl<'de> Deserialize<'de> for PortNumber {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer
                .deserialize_any(IntVisitor(
                    "a port number between 1 and 65535 (port names are not supported)",
                ))
                .map(PortNumber)
        }
    }

    Ok(Option::<PortNumber>::deserialize(deserializer)?.map(|p| p.0))
}

fn key(name: &str) -> Seg {
    Seg::Key(name.to_owned())
}

impl RawTenantPolicy {
    /// Range-checks the numbers, parses `ttl` and validates the result ([`tenant_issues`]); every
    /// problem found is returned.
    pub(crate) fn into_policy(self) -> Result<TenantPolicy, Vec<Issue>> {
        let mut found = Vec::new();
        let spec = self.spec;

        let priority = match check_priority(spec.priority) {
            Ok(()) => u32::try_from(spec.priority).unwrap_or_default(),
            Err(message) => {
                found.push(Issue { path: vec![key("spec"), key("priority")], message });
                0
            }
        };

        let mut ports = Vec::with_capacity(spec.ports.len());
        for (i, raw) in spec.ports.into_iter().enumerate() {
            let port = raw.port.and_then(|n| match check_port_number(n) {
                Ok(()) => u16::try_from(n).ok(),
                Err(message) => {
                    let path = vec![key("spec"), key("ports"), Seg::Index(i), key("port")];
                    found.push(Issue { path, message });
                    None
                }
            });
            ports.push(TenantPort { protocol: raw.protocol, port });
        }

        let ttl = match spec.ttl {
            None | Some(Value::Null) => None,
            Some(Value::String(text)) => match parse_ttl(&text) {
                Ok(ttl) => Some(ttl),
                Err(message) => {
                    found.push(Issue { path: vec![key("spec"), key("ttl")], message });
                    None
                }
            },
            Some(other) => {
                let shown = match other {
                    Value::Number(_) | Value::Bool(_) => describe(&other),
                    _ => format!("({})", describe(&other)),
                };
                let message = format!(
                    "invalid ttl {shown}: expected a whole number followed by a unit `s`, `m`, `h` or \
                     `d` (e.g. `90s`, `30m`, `2h`, `7d`)"
                );
                found.push(Issue { path: vec![key("spec"), key("ttl")], message });
                None
            }
        };

        let policy = TenantPolicy {
            api_version: self.api_version,
            kind: self.kind,
            metadata: self.metadata,
            spec: TenantPolicySpec {
                priority,
                action: spec.action,
                from: spec.from,
                to: spec.to,
                ports,
                ttl,
            },
        };
        // Values rejected above were replaced by valid ones, so nothing is reported twice.
        found.extend(tenant_issues(&policy));
        if found.is_empty() { Ok(policy) } else { Err(found) }
    }
}
