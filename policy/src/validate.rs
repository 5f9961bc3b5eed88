//! Semantic validation of parsed policies, mirroring the API server's `NetworkPolicy` validation.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use crate::api::{
    IntOrString, IpBlock, LabelSelector, LabelSelectorOperator, NetworkPolicy, NetworkPolicyPeer,
    NetworkPolicyPort,
};
use crate::net::IpNetwork;
use crate::tenant::{ANY_TENANT, MAX_PRIORITY, MAX_TTL, MIN_TTL, TenantPolicy};

/// A validation finding: the dotted field path (`spec.ingress[0].ports[1].port`) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// Dotted path of the offending field.
    pub field: String,
    /// What is wrong with it.
    pub message: String,
}

/// One step of a field path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Seg {
    /// A mapping key.
    Key(String),
    /// A sequence index.
    Index(usize),
}

/// Renders a path the way `serde_path_to_error` does: `a.b[0].c`, `.` for the root.
#[must_use]
pub fn path_string(path: &[Seg]) -> String {
    if path.is_empty() {
        return ".".to_owned();
    }
    let mut out = String::new();
    for seg in path {
        match seg {
            Seg::Key(key) => {
                if !out.is_empty() {
                    out.push('.');
                }
                out.push_str(key);
            }
            Seg::Index(i) => {
                use fmt::Write as _;
                let _ = write!(out, "[{i}]");
            }
        }
    }
    out
}

/// A finding with its structured path (so the parser can locate it in the YAML text).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Issue {
    pub path: Vec<Seg>,
    pub message: String,
}

impl NetworkPolicy {
    /// Checks everything the API server would reject beyond plain typing: names, label syntax,
    /// selector operators and values, peers, CIDRs and `except`s, port numbers and names, `endPort`.
    /// An empty result means the policy is valid.
    #[must_use]
    pub fn validate(&self) -> Vec<FieldError> {
        issues(self)
            .into_iter()
            .map(|issue| FieldError { field: path_string(&issue.path), message: issue.message })
            .collect()
    }
}

impl TenantPolicy {
    /// Checks what parsing checks beyond typing: the name (a DNS-1123 label), labels and
    /// annotations, `priority` (`0..=1000`), tenant names (DNS-1123 labels or `*`), port numbers
    /// (`1..=65535`) and `ttl` (whole seconds, `1s..=30d`). An empty result means the policy is
    /// valid.
    #[must_use]
    pub fn validate(&self) -> Vec<FieldError> {
        tenant_issues(self)
            .into_iter()
            .map(|issue| FieldError { field: path_string(&issue.path), message: issue.message })
            .collect()
    }
}

pub(crate) fn tenant_issues(policy: &TenantPolicy) -> Vec<Issue> {
    let mut v = Validator { path: Vec::new(), out: Vec::new() };
    v.tenant_policy(policy);
    v.out
}

pub(crate) fn issues(policy: &NetworkPolicy) -> Vec<Issue> {
    let mut v = Validator { path: Vec::new(), out: Vec::new() };
    v.policy(policy);
    v.out
}

struct Validator {
    path: Vec<Seg>,
    out: Vec<Issue>,
}

impl Validator {
    fn at(&mut self, key: &str, f: impl FnOnce(&mut Self)) {
        self.path.push(Seg::Key(key.to_owned()));
        f(self);
        self.path.pop();
    }

    fn at_index(&mut self, index: usize, f: impl FnOnce(&mut Self)) {
        self.path.push(Seg::Index(index));
        f(self);
        self.path.pop();
    }

    fn err(&mut self, message: impl Into<String>) {
        self.out.push(Issue { path: self.path.clone(), message: message.into() });
    }

    fn err_at(&mut self, key: &str, message: impl Into<String>) {
        let message = message.into();
        self.at(key, |v| v.err(message));
    }

    fn policy(&mut self, policy: &NetworkPolicy) {
        self.at("metadata", |v| {
            let meta = &policy.metadata;
            if let Err(msg) = check_dns_subdomain(&meta.name) {
                v.err_at("name", msg);
            }
            if let Err(msg) = check_dns_label(&meta.namespace) {
                v.err_at("namespace", msg);
            }
            v.labels_and_annotations(&meta.labels, &meta.annotations);
        });
        self.at("spec", |v| {
            let spec = &policy.spec;
            v.at("podSelector", |v| v.selector(&spec.pod_selector));
            if spec.policy_types.len() > 2 {
                v.err_at("policyTypes", "may not specify more than two policyTypes");
            }
            v.at("ingress", |v| {
                for (i, rule) in spec.ingress.iter().enumerate() {
                    v.at_index(i, |v| v.rule("from", &rule.from, &rule.ports));
                }
            });
            v.at("egress", |v| {
                for (i, rule) in spec.egress.iter().enumerate() {
                    v.at_index(i, |v| v.rule("to", &rule.to, &rule.ports));
                }
            });
        });
    }

    fn labels_and_annotations(
        &mut self,
        labels: &BTreeMap<String, String>,
        annotations: &BTreeMap<String, String>,
    ) {
        self.at("labels", |v| v.label_map(labels));
        self.at("annotations", |v| {
            for key in annotations.keys() {
                if let Err(msg) = check_qualified_name(key) {
                    v.err_at(key, format!("invalid annotation key `{key}`: {msg}"));
                }
            }
        });
    }

    fn tenant_policy(&mut self, policy: &TenantPolicy) {
        self.at("metadata", |v| {
            let meta = &policy.metadata;
            let name = if meta.name.is_empty() {
                Err("must not be empty".to_owned())
            } else {
                check_dns_label(&meta.name)
            };
            if let Err(msg) = name {
                v.err_at("name", msg);
            }
            v.labels_and_annotations(&meta.labels, &meta.annotations);
        });
        self.at("spec", |v| {
            let spec = &policy.spec;
            if let Err(msg) = check_priority(i64::from(spec.priority)) {
                v.err_at("priority", msg);
            }
            for (side, selector) in [("from", &spec.from), ("to", &spec.to)] {
                if let Err(msg) = check_tenant(&selector.tenant) {
                    v.at(side, |v| v.err_at("tenant", msg));
                }
            }
            v.at("ports", |v| {
                for (i, port) in spec.ports.iter().enumerate() {
                    if let Some(n) = port.port
                        && let Err(msg) = check_port_number(i64::from(n))
                    {
                        v.at_index(i, |v| v.err_at("port", msg));
                    }
                }
            });
            if let Some(ttl) = spec.ttl
                && let Err(msg) = check_ttl(ttl)
            {
                v.err_at("ttl", msg);
            }
        });
    }

    fn rule(&mut self, peers_key: &str, peers: &[NetworkPolicyPeer], ports: &[NetworkPolicyPort]) {
        self.at("ports", |v| {
            for (i, port) in ports.iter().enumerate() {
                v.at_index(i, |v| v.port(port));
            }
        });
        self.at(peers_key, |v| {
            for (i, peer) in peers.iter().enumerate() {
                v.at_index(i, |v| v.peer(peer));
            }
        });
    }

    fn port(&mut self, port: &NetworkPolicyPort) {
        match (&port.port, port.end_port) {
            (None, None) => {}
            (None, Some(_)) => self.err_at("endPort", "may not be specified when `port` is not specified"),
            (Some(IntOrString::Int(n)), end) => {
                if let Err(msg) = check_port_number(i64::from(*n)) {
                    self.err_at("port", msg);
                }
                if let Some(end) = end {
                    if let Err(msg) = check_port_number(i64::from(end)) {
                        self.err_at("endPort", msg);
                    } else if end < *n {
                        self.err_at("endPort", format!("must be greater than or equal to `port` ({n})"));
                    }
                }
            }
            (Some(IntOrString::String(name)), end) => {
                if let Err(msg) = check_port_name(name) {
                    self.err_at("port", msg);
                }
                if end.is_some() {
                    self.err_at(
                        "endPort",
                        format!("may not be specified when `port` is a named port (`{name}`)"),
                    );
                }
            }
        }
    }

    fn peer(&mut self, peer: &NetworkPolicyPeer) {
        let selectors = peer.pod_selector.is_some() || peer.namespace_selector.is_some();
        match (&peer.ip_block, selectors) {
            (None, false) => {
                self.err("must specify a peer: podSelector, namespaceSelector and/or ipBlock");
                return;
            }
            (Some(_), true) => self.err("may not specify both ipBlock and another peer"),
            _ => {}
        }
        if let Some(sel) = &peer.pod_selector {
            self.at("podSelector", |v| v.selector(sel));
        }
        if let Some(sel) = &peer.namespace_selector {
            self.at("namespaceSelector", |v| v.selector(sel));
        }
        if let Some(block) = &peer.ip_block {
            self.at("ipBlock", |v| v.ip_block(block));
        }
    }

    fn ip_block(&mut self, block: &IpBlock) {
        let cidr = match block.cidr.parse::<IpNetwork>() {
            Ok(net) => Some(net),
            Err(e) => {
                let msg = if block.cidr.is_empty() {
                    "must not be empty".to_owned()
                } else {
                    format!("invalid CIDR `{}`: {e}", block.cidr)
                };
                self.err_at("cidr", msg);
                None
            }
        };
        self.at("except", |v| {
            for (i, except) in block.except.iter().enumerate() {
                v.at_index(i, |v| match except.parse::<IpNetwork>() {
                    Err(e) => v.err(format!("invalid CIDR `{except}`: {e}")),
                    Ok(ex) => {
                        if let Some(net) = cidr
                            && !(net.contains_net(&ex) && ex.prefix() > net.prefix())
                        {
                            v.err(format!("`{except}` must be a strict subset of cidr `{net}`"));
                        }
                    }
                });
            }
        });
    }

    fn selector(&mut self, sel: &LabelSelector) {
        self.at("matchLabels", |v| v.label_map(&sel.match_labels));
        self.at("matchExpressions", |v| {
            for (i, req) in sel.match_expressions.iter().enumerate() {
                v.at_index(i, |v| {
                    if let Err(msg) = check_qualified_name(&req.key) {
                        v.err_at("key", format!("invalid label key `{}`: {msg}", req.key));
                    }
                    match req.operator {
                        LabelSelectorOperator::In | LabelSelectorOperator::NotIn => {
                            if req.values.is_empty() {
                                v.err_at(
                                    "values",
                                    format!("must be non-empty when `operator` is {}", req.operator),
                                );
                            }
                            v.at("values", |v| {
                                for (j, value) in req.values.iter().enumerate() {
                                    if let Err(msg) = check_label_value(value) {
                                        v.at_index(j, |v| {
                                            v.err(format!("invalid label value `{value}`: {msg}"));
                                        });
                                    }
                                }
                            });
                        }
                        LabelSelectorOperator::Exists | LabelSelectorOperator::DoesNotExist => {
                            if !req.values.is_empty() {
                                v.err_at(
                                    "values",
                                    format!("must be empty when `operator` is {}", req.operator),
                                );
                            }
                        }
                    }
                });
            }
        });
    }

    fn label_map(&mut self, labels: &BTreeMap<String, String>) {
        for (key, value) in labels {
            if let Err(msg) = check_qualified_name(key) {
                self.err_at(key, format!("invalid label key `{key}`: {msg}"));
            }
            if let Err(msg) = check_label_value(value) {
                self.err_at(key, format!("invalid label value `{value}`: {msg}"));
            }
        }
    }
}

pub(crate) fn check_port_number(n: i64) -> Result<(), String> {
    if (1..=65535).contains(&n) { Ok(()) } else { Err(format!("{n} must be between 1 and 65535, inclusive")) }
}

/// `TenantPolicy` `spec.priority`.
pub(crate) fn check_priority(n: i64) -> Result<(), String> {
    if (0..=i64::from(MAX_PRIORITY)).contains(&n) {
        Ok(())
    } else {
        Err(format!("{n} must be between 0 and {MAX_PRIORITY}, inclusive"))
    }
}

/// `TenantPolicy` `spec.ttl`: whole seconds, `1s..=30d`.
pub(crate) fn check_ttl(ttl: Duration) -> Result<(), String> {
    if ttl.subsec_nanos() == 0 && (MIN_TTL..=MAX_TTL).contains(&ttl) {
        Ok(())
    } else {
        Err(format!(
            "{ttl:?} is out of range: must be a whole number of seconds between 1s and 30d, inclusive"
        ))
    }
}

/// A tenant name in a `TenantPolicy` selector: a DNS-1123 label, or `*` for any tenant.
fn check_tenant(tenant: &str) -> Result<(), String> {
    if tenant == ANY_TENANT {
        return Ok(());
    }
    check_dns_label(tenant).map_err(|e| format!("invalid tenant: {e}; use `*` for any tenant"))
}

/// IANA service name syntax (`IsValidPortName` upstream).
pub fn check_port_name(name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("invalid port name `{name}`: {why}"));
    if name.is_empty() || name.len() > 15 {
        return bad("must be 1 to 15 characters long");
    }
    if !name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-') {
        return bad("may contain only lowercase letters, digits and '-'");
    }
    if !name.bytes().any(|b| b.is_ascii_lowercase()) {
        return bad("must contain at least one letter (a numeric port must not be quoted)");
    }
    if name.starts_with('-') || name.ends_with('-') || name.contains("--") {
        return bad("may not begin or end with '-' or contain '--'");
    }
    Ok(())
}

fn is_dns_label_chars(label: &str) -> bool {
    let bytes = label.as_bytes();
    let alnum = |b: &u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    !bytes.is_empty()
        && bytes.iter().all(|b| alnum(b) || *b == b'-')
        && bytes.first().is_some_and(alnum)
        && bytes.last().is_some_and(alnum)
}

fn check_dns_label(s: &str) -> Result<(), String> {
    if s.len() > 63 || !is_dns_label_chars(s) {
        return Err(format!(
            "`{s}` is not a valid DNS label (at most 63 lowercase letters, digits or '-', \
             starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

fn check_dns_subdomain(s: &str) -> Result<(), String> {
    if s.is_empty() {
        return Err("must not be empty".to_owned());
    }
    if s.len() > 253 || !s.split('.').all(is_dns_label_chars) {
        return Err(format!(
            "`{s}` is not a valid DNS subdomain (at most 253 characters: dot-separated lowercase \
             letters, digits or '-', each part starting and ending with a letter or digit)"
        ));
    }
    Ok(())
}

/// The name part of a label key, and a non-empty label value.
fn is_label_name(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && bytes.first().is_some_and(u8::is_ascii_alphanumeric)
        && bytes.last().is_some_and(u8::is_ascii_alphanumeric)
}

const NAME_RULE: &str = "at most 63 characters: letters, digits, '-', '_' or '.', starting and ending with \
                         a letter or digit";

/// Label keys: `[prefix/]name` with a DNS subdomain prefix.
fn check_qualified_name(key: &str) -> Result<(), String> {
    let (prefix, name) = match key.split_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if let Some(prefix) = prefix {
        check_dns_subdomain(prefix).map_err(|e| format!("prefix: {e}"))?;
    }
    if !is_label_name(name) {
        return Err(format!("name part must be {NAME_RULE}"));
    }
    Ok(())
}

/// Checks one label as the API server does: the key is `[prefix/]name` (the prefix a DNS
/// subdomain, the name at most 63 letters, digits, `-`, `_` or `.`, starting and ending with a
/// letter or digit), the value empty or such a name. The error says which and why.
pub fn check_label(key: &str, value: &str) -> Result<(), String> {
    check_qualified_name(key).map_err(|m| format!("invalid label key `{key}`: {m}"))?;
    check_label_value(value).map_err(|m| format!("invalid label value `{value}` (key `{key}`): {m}"))
}

fn check_label_value(value: &str) -> Result<(), String> {
    if value.is_empty() || is_label_name(value) {
        Ok(())
    } else {
        Err(format!("must be empty or {NAME_RULE}"))
    }
}
