//! `networking.k8s.io/v1` `NetworkPolicy`, mirrored field for field from the upstream API, with
//! strict deserialization: unknown fields, duplicate keys and wrongly typed values are errors.
//!
//! `null` is accepted wherever upstream accepts it (it means the same as an absent field). Lists whose
//! absence and emptiness mean the same thing upstream (`ingress`, `from`, `ports`, `except`, ...) are
//! plain `Vec`s; fields where absent and empty differ (peer selectors, `port`, `endPort`) are `Option`s.

use std::collections::BTreeMap;
use std::fmt;

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};

use crate::cluster::{Pod, Protocol};
use crate::eval::Direction;

/// The only `apiVersion` accepted.
pub const API_VERSION: &str = "networking.k8s.io/v1";
/// The only `kind` accepted.
pub const KIND: &str = "NetworkPolicy";
/// Namespace a policy lives in when `metadata.namespace` is absent or empty.
pub const DEFAULT_NAMESPACE: &str = "default";

/// A `NetworkPolicy` object.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicy {
    /// Always [`API_VERSION`] for parsed policies.
    pub api_version: String,
    /// Always [`KIND`] for parsed policies.
    pub kind: String,
    /// Name, namespace, labels, annotations.
    pub metadata: ObjectMeta,
    /// The policy proper. Absent means the zero spec: select every pod of the namespace, isolate it
    /// for ingress, allow nothing.
    #[serde(default, deserialize_with = "null_as_default")]
    pub spec: NetworkPolicySpec,
}

impl NetworkPolicy {
    /// A policy `namespace/name` with the given spec.
    #[must_use]
    pub fn new(namespace: &str, name: &str, spec: NetworkPolicySpec) -> Self {
        NetworkPolicy {
            api_version: API_VERSION.to_owned(),
            kind: KIND.to_owned(),
            metadata: ObjectMeta::new(namespace, name),
            spec,
        }
    }

    /// Whether `spec.podSelector` selects `pod` (same namespace, labels match).
    #[must_use]
    pub fn selects(&self, pod: &Pod) -> bool {
        pod.namespace == self.metadata.namespace && self.spec.pod_selector.matches(&pod.labels)
    }
}

/// The parts of `metadata` that matter here. The other upstream `ObjectMeta` fields (`uid`,
/// `resourceVersion`, `creationTimestamp`, `managedFields`, ...) are accepted and ignored, so that
/// objects exported from a cluster parse; anything else is rejected as an unknown field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectMeta {
    /// `metadata.name` (required).
    pub name: String,
    /// `metadata.namespace`; [`DEFAULT_NAMESPACE`] when absent or empty.
    pub namespace: String,
    /// `metadata.labels`.
    pub labels: BTreeMap<String, String>,
    /// `metadata.annotations`.
    pub annotations: BTreeMap<String, String>,
}

impl ObjectMeta {
    /// Metadata with just a namespace and a name.
    #[must_use]
    pub fn new(namespace: &str, name: &str) -> Self {
        ObjectMeta {
            name: name.to_owned(),
            namespace: if namespace.is_empty() { DEFAULT_NAMESPACE } else { namespace }.to_owned(),
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// `spec` of a `NetworkPolicy`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicySpec {
    /// Pods of the policy's namespace the policy applies to; absent or `{}` selects all of them.
    #[serde(default, deserialize_with = "null_as_default")]
    pub pod_selector: LabelSelector,
    /// Explicit policy types; empty means "default them" (see [`NetworkPolicySpec::affects`]).
    #[serde(default, deserialize_with = "null_as_default")]
    pub policy_types: Vec<PolicyType>,
    /// Ingress allow rules.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ingress: Vec<NetworkPolicyIngressRule>,
    /// Egress allow rules.
    #[serde(default, deserialize_with = "null_as_default")]
    pub egress: Vec<NetworkPolicyEgressRule>,
}

impl NetworkPolicySpec {
    /// Whether the policy affects (isolates) the selected pods in `direction`.
    ///
    /// With explicit `policyTypes` that list decides. Without (absent or empty) upstream defaulting
    /// applies: always `Ingress`, plus `Egress` iff the `egress` list is non-empty — so `egress: []`
    /// alone does not make a policy an egress policy.
    #[must_use]
    pub fn affects(&self, direction: Direction) -> bool {
        if self.policy_types.is_empty() {
            match direction {
                Direction::Ingress => true,
                Direction::Egress => !self.egress.is_empty(),
            }
        } else {
            let wanted = match direction {
                Direction::Ingress => PolicyType::Ingress,
                Direction::Egress => PolicyType::Egress,
            };
            self.policy_types.contains(&wanted)
        }
    }
}

/// A `spec.policyTypes` entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
pub enum PolicyType {
    /// `Ingress`.
    Ingress,
    /// `Egress`.
    Egress,
}

/// A `spec.ingress` entry: traffic allowed if it matches a peer in `from` (all sources when empty)
/// and a port in `ports` (all ports when empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyIngressRule {
    /// Allowed sources.
    #[serde(default, deserialize_with = "null_as_default")]
    pub from: Vec<NetworkPolicyPeer>,
    /// Allowed destination ports on the selected pod.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// A `spec.egress` entry: traffic allowed if it matches a peer in `to` (all destinations when empty)
/// and a port in `ports` (all ports when empty).
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyEgressRule {
    /// Allowed destinations.
    #[serde(default, deserialize_with = "null_as_default")]
    pub to: Vec<NetworkPolicyPeer>,
    /// Allowed destination ports.
    #[serde(default, deserialize_with = "null_as_default")]
    pub ports: Vec<NetworkPolicyPort>,
}

/// A `from`/`to` entry. Valid peers have `ipBlock` alone, or one or both selectors.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPeer {
    /// Pods (in the policy's namespace unless `namespace_selector` is set).
    pub pod_selector: Option<LabelSelector>,
    /// Namespaces whose pods match.
    pub namespace_selector: Option<LabelSelector>,
    /// An address range.
    pub ip_block: Option<IpBlock>,
}

/// `ipBlock`: addresses in `cidr` but in none of `except`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct IpBlock {
    /// The block, e.g. `10.0.0.0/8`; host bits are ignored.
    pub cidr: String,
    /// Sub-blocks excluded from `cidr` (each must be a strict subset of it).
    #[serde(default, deserialize_with = "null_as_default")]
    pub except: Vec<String>,
}

/// A `ports` entry.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct NetworkPolicyPort {
    /// Protocol; `TCP` when absent.
    #[serde(default, deserialize_with = "null_as_default")]
    pub protocol: Protocol,
    /// Port number or container port name; all ports of `protocol` when absent.
    pub port: Option<IntOrString>,
    /// Last port of the range `port..=endPort` (numeric `port` only).
    pub end_port: Option<i32>,
}

/// A port given as a number or as a container port name.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum IntOrString {
    /// A port number.
    Int(i32),
    /// A named port, resolved against the destination pod's container ports.
    String(String),
}

impl fmt::Display for IntOrString {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            IntOrString::Int(n) => write!(f, "{n}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct IntOrStringVisitor;

        impl Visitor<'_> for IntOrStringVisitor {
            type Value = IntOrString;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a port number or a port name")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &"a port number"))
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i32::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &"a port number"))
            }

            fn visit_str<E: de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }

        deserializer.deserialize_any(IntOrStringVisitor)
    }
}

/// A label selector: `matchLabels` AND every `matchExpressions` entry. Empty selects everything.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelector {
    /// Exact label matches.
    #[serde(default, deserialize_with = "label_map")]
    pub match_labels: BTreeMap<String, String>,
    /// Set-based requirements.
    #[serde(default, deserialize_with = "null_as_default")]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

impl LabelSelector {
    /// Whether `labels` satisfy the selector (an empty selector matches everything).
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels.iter().all(|(key, value)| labels.get(key) == Some(value))
            && self.match_expressions.iter().all(|req| req.matches(labels))
    }

    /// Whether the selector is empty (matches everything).
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.match_labels.is_empty() && self.match_expressions.is_empty()
    }
}

/// A `matchExpressions` entry.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabelSelectorRequirement {
    /// Label key.
    pub key: String,
    /// How `values` apply.
    pub operator: LabelSelectorOperator,
    /// Values for `In`/`NotIn` (non-empty); must be empty for `Exists`/`DoesNotExist`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub values: Vec<String>,
}

impl LabelSelectorRequirement {
    /// Whether `labels` satisfy this requirement. `NotIn` and `DoesNotExist` match when the key is
    /// absent.
    #[must_use]
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            LabelSelectorOperator::In => value.is_some_and(|v| self.values.contains(v)),
            LabelSelectorOperator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            LabelSelectorOperator::Exists => value.is_some(),
            LabelSelectorOperator::DoesNotExist => value.is_none(),
        }
    }
}

/// `matchExpressions[].operator`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
pub enum LabelSelectorOperator {
    /// The label is present with one of the values.
    In,
    /// The label is absent or has none of the values.
    NotIn,
    /// The label is present.
    Exists,
    /// The label is absent.
    DoesNotExist,
}

impl fmt::Display for LabelSelectorOperator {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            LabelSelectorOperator::In => "In",
            LabelSelectorOperator::NotIn => "NotIn",
            LabelSelectorOperator::Exists => "Exists",
            LabelSelectorOperator::DoesNotExist => "DoesNotExist",
        })
    }
}

/// Deserializes `null` as `T::default()`.
pub(crate) fn null_as_default<'de, D, T>(deserializer: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(deserializer)?.unwrap_or_default())
}

/// A string-to-string map that rejects duplicate keys (a plain `BTreeMap` keeps the last one
/// silently, which would make `{app: web, app: db}` mean something nobody wrote).
struct UniqueMap(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for UniqueMap {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct MapVisitor;

        impl<'de> Visitor<'de> for MapVisitor {
            type Value = UniqueMap;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueMap, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    let value: String = map.next_value()?;
                    if out.contains_key(&key) {
                        return Err(de::Error::custom(format_args!("duplicate key `{key}`")));
                    }
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }

        deserializer.deserialize_map(MapVisitor)
    }
}

fn label_map<'de, D: Deserializer<'de>>(deserializer: D) -> Result<BTreeMap<String, String>, D::Error> {
    Ok(Option::<UniqueMap>::deserialize(deserializer)?.map(|m| m.0).unwrap_or_default())
}

/// `ObjectMeta` fields accepted and ignored.
const IGNORED_META_FIELDS: [&str; 11] = [
    "generateName",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

const META_FIELDS: [&str; 15] = [
    "name",
    "namespace",
    "labels",
    "annotations",
    "generateName",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// `metadata` fields of a cluster-scoped object (`TenantPolicy`): [`META_FIELDS`] without `namespace`.
const CLUSTER_META_FIELDS: [&str; 14] = [
    "name",
    "labels",
    "annotations",
    "generateName",
    "selfLink",
    "uid",
    "resourceVersion",
    "generation",
    "creationTimestamp",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "ownerReferences",
    "finalizers",
    "managedFields",
];

/// A key of `metadata`. Unknown keys fail while the key itself is deserialized (as with derived
/// structs), so errors point at the key and its path includes it.
enum MetaField {
    Name,
    Namespace,
    Labels,
    Annotations,
    Ignored,
}

/// Reads a `metadata` key; `namespace` is a known key only for namespaced objects.
#[derive(Clone, Copy)]
struct MetaFieldSeed {
    namespaced: bool,
}

impl MetaFieldSeed {
    fn fields(self) -> &'static [&'static str] {
        if self.namespaced { &META_FIELDS } else { &CLUSTER_META_FIELDS }
    }
}

impl<'de> DeserializeSeed<'de> for MetaFieldSeed {
    type Value = MetaField;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<MetaField, D::Error> {
        deserializer.deserialize_identifier(self)
    }
}

impl Visitor<'_> for MetaFieldSeed {
    type Value = MetaField;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a metadata field name")
    }

    fn visit_str<E: de::Error>(self, v: &str) -> Result<MetaField, E> {
        Ok(match v {
            "name" => MetaField::Name,
            "namespace" if self.namespaced => MetaField::Namespace,
            "labels" => MetaField::Labels,
            "annotations" => MetaField::Annotations,
            other if IGNORED_META_FIELDS.contains(&other) => MetaField::Ignored,
            other => return Err(E::unknown_field(other, self.fields())),
        })
    }
}

/// `metadata` as written: the fields that matter, before defaulting.
pub(crate) struct RawMeta {
    pub name: String,
    /// Always `None` for cluster-scoped objects (the key is rejected).
    pub namespace: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

/// Deserializes `metadata` strictly: `name` is required, keys may not repeat, the ignored upstream
/// fields are accepted, anything else is an unknown field. `namespace` is accepted only when
/// `namespaced`.
pub(crate) fn deserialize_meta<'de, D: Deserializer<'de>>(
    deserializer: D,
    namespaced: bool,
) -> Result<RawMeta, D::Error> {
    struct MetaVisitor(MetaFieldSeed);

    fn once<T, E: de::Error>(slot: &mut Option<T>, field: &'static str, value: T) -> Result<(), E> {
        if slot.is_some() {
            return Err(E::duplicate_field(field));
        }
        *slot = Some(value);
        Ok(())
    }

    impl<'de> Visitor<'de> for MetaVisitor {
        type Value = RawMeta;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("object metadata")
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<RawMeta, A::Error> {
            let mut name = None;
            let mut namespace = None;
            let mut labels = None;
            let mut annotations = None;
            while let Some(key) = map.next_key_seed(self.0)? {
                match key {
                    MetaField::Name => once(&mut name, "name", map.next_value::<String>()?)?,
                    MetaField::Namespace => {
                        once(&mut namespace, "namespace", map.next_value::<Option<String>>()?)?;
                    }
                    MetaField::Labels => {
                        once(&mut labels, "labels", map.next_value::<Option<UniqueMap>>()?)?;
                    }
                    MetaField::Annotations => {
                        once(&mut annotations, "annotations", map.next_value::<Option<UniqueMap>>()?)?;
                    }
                    MetaField::Ignored => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(RawMeta {
                name: name.ok_or_else(|| de::Error::missing_field("name"))?,
                namespace: namespace.flatten(),
                labels: labels.flatten().map(|m| m.0).unwrap_or_default(),
                annotations: annotations.flatten().map(|m| m.0).unwrap_or_default(),
            })
        }
    }

    let seed = MetaFieldSeed { namespaced };
    deserializer.deserialize_struct("ObjectMeta", seed.fields(), MetaVisitor(seed))
}

impl<'de> Deserialize<'de> for ObjectMeta {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let raw = deserialize_meta(deserializer, true)?;
        let namespace = raw.namespace.filter(|ns| !ns.is_empty());
        Ok(ObjectMeta {
            name: raw.name,
            namespace: namespace.unwrap_or_else(|| DEFAULT_NAMESPACE.to_owned()),
            labels: raw.labels,
            annotations: raw.annotations,
        })
    }
}
