//! `ztseg policy test`: policy tests a CI pipeline can run before a policy change is applied.
//!
//! A test file (`kind: PolicyTest`, see `docs/policy-test.md`) describes a small cluster —
//! namespaces, workloads with labels, tenant and addresses — names the policy files to load and
//! lists connections with the verdict they must get. Everything runs offline: no enforcer, no
//! controller, no root.
//!
//! The verdict of a connection is the one the enforcer gives it, computed from the same parts:
//!
//! 1. A workload reaching itself is always allowed (loopback never reaches the data plane).
//! 2. The admin tier: the `TenantPolicy` keys ([`TenantPolicy::keys`]) matching the connection
//!    are looked up in the data plane's probe order — tenant pair `(s,d)`, `(s,*)`, `(*,d)`,
//!    `(*,*)`, each with port `proto+port`, `proto`, any — and the lowest `priority` wins (on
//!    equal priority the first in probe order). `Allow` and `Deny` are final; `Pass` hands over
//!    to `NetworkPolicy`. With no matching rule, traffic between workloads of two different
//!    tenants is denied (the default cross-tenant deny); addresses that are not workloads have
//!    no tenant and are matched only by `'*'`.
//! 3. The `NetworkPolicy` tier: [`ztseg_policy::evaluate`] and [`ztseg_policy::allowed`] (the
//!    source's egress and the destination's ingress must both allow).
//!
//! A test file is also rejected when the enforcer would refuse its policy set: the policy files
//! are read as one set ([`ztseg_policy::parse_set`]: a `NetworkPolicy` defined twice, tenant
//! policies of two files producing one admin key, port ranges the data plane cannot expand),
//! each error located in its policy file; [`compile::compile_admin`] and [`compile::compile`]
//! check the compiled form as well.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use serde::de::{self, Deserializer, Visitor};
use serde::{Deserialize, Serialize};
use ztseg_policy::{
    Cluster, ContainerPort, Direction, Document, Endpoint, IpNetwork, Isolation, Namespace, NetworkPolicy,
    PeerMatch, Pod, PodPolicy, Protocol, TenantAction, TenantPolicy,
};

use crate::compile;
use crate::daemon::config::{identity_of, tenant_of};
use crate::lab::spec::yaml_files;

/// `apiVersion` of a test file.
pub const API_VERSION: &str = "ztseg.io/v1alpha1";
/// `kind` of a test file.
pub const KIND: &str = "PolicyTest";

// ---- errors ------------------------------------------------------------------------------------

/// A problem with a test file or one of its policy files.
///
/// Displays as `file:line:column: field: message`, or `file: field: message` when the problem
/// has no place in the text (a file that cannot be read). `field` is the dotted path of the
/// offending field (`cases[2].to`), `.` for the file as a whole.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TestError {
    /// The file concerned.
    pub file: PathBuf,
    /// 1-based line, if known.
    pub line: Option<usize>,
    /// 1-based column, if known.
    pub column: Option<usize>,
    /// Dotted field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for TestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:", self.file.display())?;
        if let (Some(line), Some(column)) = (self.line, self.column) {
            write!(f, "{line}:{column}:")?;
        }
        write!(f, " {}: {}", self.field, self.message)
    }
}

impl From<ztseg_policy::PolicyError> for TestError {
    fn from(e: ztseg_policy::PolicyError) -> Self {
        TestError {
            file: e.file,
            line: Some(e.line),
            column: Some(e.column),
            field: e.field,
            message: e.message,
        }
    }
}

impl TestError {
    fn unplaced(file: &Path, message: String) -> Self {
        TestError { file: file.to_owned(), line: None, column: None, field: ".".to_owned(), message }
    }
}

// ---- file format -------------------------------------------------------------------------------

/// The test file as written.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RawTest {
    api_version: String,
    kind: String,
    metadata: RawMeta,
    #[serde(default)]
    policies: Vec<String>,
    #[serde(default)]
    namespaces: Vec<Namespace>,
    #[serde(default)]
    workloads: Vec<RawWorkload>,
    cases: Vec<RawCase>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMeta {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWorkload {
    name: String,
    #[serde(default = "default_namespace")]
    namespace: String,
    #[serde(default)]
    labels: BTreeMap<String, String>,
    #[serde(default)]
    tenant: Option<String>,
    #[serde(default)]
    ips: Vec<IpAddr>,
    #[serde(default)]
    ports: Vec<ContainerPort>,
}

fn default_namespace() -> String {
    ztseg_policy::DEFAULT_NAMESPACE.to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCase {
    #[serde(default)]
    name: Option<String>,
    from: String,
    to: String,
    #[serde(deserialize_with = "port_number")]
    port: i64,
    #[serde(default)]
    protocol: Protocol,
    expect: Expect,
}

/// Any integer, so that an out-of-range port gets the range message; `expecting` names a port in
/// type errors.
fn port_number<'de, D: Deserializer<'de>>(deserializer: D) -> Result<i64, D::Error> {
    struct PortVisitor;

    impl Visitor<'_> for PortVisitor {
        type Value = i64;

        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a port number between 1 and 65535")
        }

        fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
            Ok(v)
        }

        fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
            Ok(i64::try_from(v).unwrap_or(i64::MAX))
        }
    }

    deserializer.deserialize_any(PortVisitor)
}

/// The verdict a case expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Expect {
    /// The connection must be allowed.
    Allow,
    /// The connection must be denied.
    Deny,
}

/// One end of a test connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peer {
    /// A workload, by index into [`Suite::cluster`]'s pods.
    Workload(usize),
    /// One address (a workload's address stands for that workload, as in the data plane).
    Address(IpAddr),
    /// Every address of a block: the case passes only if all of them get the expected verdict.
    Block(IpNetwork),
}

/// A test case, checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Case {
    /// `name`, if given.
    pub name: Option<String>,
    /// Source.
    pub from: Peer,
    /// Destination.
    pub to: Peer,
    /// Source as written.
    pub from_text: String,
    /// Destination as written.
    pub to_text: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// Expected verdict.
    pub expect: Expect,
}

/// A valid test file with its policies, ready to run.
#[derive(Debug, Clone)]
pub struct Suite {
    /// The test file.
    pub file: PathBuf,
    /// `metadata.name`.
    pub name: String,
    /// Namespaces and workloads (as pods).
    pub cluster: Cluster,
    /// Tenant of each workload, same index as the cluster's pods.
    pub tenants: Vec<Option<String>>,
    /// `NetworkPolicy` objects of every policy file, in file order.
    pub network_policies: Vec<NetworkPolicy>,
    /// `TenantPolicy` objects of every policy file, in file order.
    pub tenant_policies: Vec<TenantPolicy>,
    /// The cases.
    pub cases: Vec<Case>,
}

// ---- loading -----------------------------------------------------------------------------------

/// A step of a field path.
#[derive(Debug, Clone, Copy)]
enum Seg {
    Key(&'static str),
    Index(usize),
}

fn owned(path: &[Seg]) -> Vec<ztseg_policy::Seg> {
    path.iter()
        .map(|s| match s {
            Seg::Key(k) => ztseg_policy::Seg::Key((*k).to_owned()),
            Seg::Index(i) => ztseg_policy::Seg::Index(*i),
        })
        .collect()
}

fn path_string(path: &[Seg]) -> String {
    ztseg_policy::path_string(&owned(path))
}

/// Collects located errors of one test file.
struct Checker<'a> {
    file: &'a Path,
    text: &'a str,
    errors: Vec<TestError>,
}

impl Checker<'_> {
    fn error(&mut self, path: &[Seg], message: impl Into<String>) {
        let (line, column) = locate(self.text, path);
        self.errors.push(TestError {
            file: self.file.to_owned(),
            line: Some(line),
            column: Some(column),
            field: path_string(path),
            message: message.into(),
        });
    }
}

/// Loads test file `path`: parses it strictly, checks it, and loads its policy files (its own
/// `policies`, then `extra_policies`). Returns every problem found, each with file, position and
/// field where it has one.
pub fn load(path: &Path, extra_policies: &[PathBuf]) -> Result<Suite, Vec<TestError>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| vec![TestError::unplaced(path, format!("cannot read the test file: {e}"))])?;
    let raw: RawTest = serde_path_to_error::deserialize(serde_yaml::Deserializer::from_str(&text))
        .map_err(|e| vec![de_error(path, e)])?;
    let mut checker = Checker { file: path, text: &text, errors: Vec::new() };
    check_header(&mut checker, &raw);
    check_namespaces(&mut checker, &raw.namespaces);
    let (cluster, tenants) = build_cluster(&mut checker, &raw);
    let cases = build_cases(&mut checker, &raw.cases, &cluster);
    let files = policy_files(&mut checker, path, &raw.policies, extra_policies);
    checker.errors.sort_by_key(|e| (e.line, e.column));
    let mut errors = checker.errors;

    let mut network_policies = Vec::new();
    let mut tenant_policies = Vec::new();
    let mut texts = Vec::new();
    for file in &files {
        match std::fs::read_to_string(file) {
            Ok(policy_text) => texts.push((file.as_path(), policy_text)),
            Err(e) => errors.push(TestError::unplaced(file, format!("cannot read the policy file: {e}"))),
        }
    }
    // The policy files as one set, as the enforcer loads them.
    match ztseg_policy::parse_set(texts.iter().map(|(f, t)| (*f, t.as_str()))) {
        Ok(documents) => {
            for document in documents {
                match document {
                    Document::Network(p) => network_policies.push(p),
                    Document::Tenant(p) => tenant_policies.push(p),
                }
            }
        }
        Err(es) => errors.extend(es.into_iter().map(TestError::from)),
    }
    if !errors.is_empty() {
        return Err(errors);
    }

    // What the enforcer refuses to apply is an invalid policy set, not a test result.
    let mut checker = Checker { file: path, text: &text, errors: Vec::new() };
    let at: &[Seg] = if raw.policies.is_empty() { &[] } else { &[Seg::Key("policies")] };
    if let Err(e) = compile::compile_admin(&tenant_policies, |t| tenant_of(Some(t))) {
        checker.error(at, format!("the enforcer would reject these tenant policies: {e:#}"));
    }
    let eval = ztseg_policy::evaluate(&cluster, &network_policies);
    let identities: Vec<u32> =
        cluster.pods.iter().map(|p| identity_of(&format!("{}/{}", p.namespace, p.name))).collect();
    if let Err(e) = compile::compile(&cluster, &eval, &identities, &compile::Context::default()) {
        checker.error(at, format!("the enforcer would reject these network policies: {e:#}"));
    }
    if !checker.errors.is_empty() {
        return Err(checker.errors);
    }

    Ok(Suite {
        file: path.to_owned(),
        name: raw.metadata.name,
        cluster,
        tenants,
        network_policies,
        tenant_policies,
        cases,
    })
}

fn check_header(c: &mut Checker<'_>, raw: &RawTest) {
    if raw.api_version != API_VERSION {
        c.error(&[Seg::Key("apiVersion")], format!("must be `{API_VERSION}`, found `{}`", raw.api_version));
    }
    if raw.kind != KIND {
        c.error(&[Seg::Key("kind")], format!("must be `{KIND}`, found `{}`", raw.kind));
    }
    if raw.metadata.name.trim().is_empty() {
        c.error(&[Seg::Key("metadata"), Seg::Key("name")], "must not be empty");
    }
}

fn check_namespaces(c: &mut Checker<'_>, namespaces: &[Namespace]) {
    let mut seen = BTreeSet::new();
    for (i, ns) in namespaces.iter().enumerate() {
        let at = [Seg::Key("namespaces"), Seg::Index(i), Seg::Key("name")];
        if ns.name.is_empty() || ns.name.contains('/') {
            c.error(&at, format!("`{}` is not a namespace name", ns.name));
        } else if !seen.insert(ns.name.as_str()) {
            c.error(&at, format!("duplicate namespace `{}`", ns.name));
        }
    }
}

fn build_cluster(c: &mut Checker<'_>, raw: &RawTest) -> (Cluster, Vec<Option<String>>) {
    let mut cluster = Cluster { namespaces: raw.namespaces.clone(), pods: Vec::new() };
    let mut tenants = Vec::new();
    let mut ids: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    let mut owners: BTreeMap<IpAddr, usize> = BTreeMap::new();
    for (i, w) in raw.workloads.iter().enumerate() {
        let field = |key| [Seg::Key("workloads"), Seg::Index(i), Seg::Key(key)];
        if w.name.is_empty() || w.name.contains('/') {
            c.error(
                &field("name"),
                format!("`{}` is not a workload name (give the namespace apart)", w.name),
            );
        }
        let declared = raw.namespaces.iter().any(|ns| ns.name == w.namespace);
        if !declared && w.namespace != ztseg_policy::DEFAULT_NAMESPACE {
            c.error(
                &field("namespace"),
                format!("namespace `{}` is not declared in `namespaces`", w.namespace),
            );
        }
        if let Some(first) = ids.insert((w.namespace.as_str(), w.name.as_str()), i) {
            let message =
                format!("duplicate workload `{}/{}` (also workloads[{first}])", w.namespace, w.name);
            c.error(&[Seg::Key("workloads"), Seg::Index(i)], message);
        }
        if let Some(t) = &w.tenant
            && (t.is_empty() || t == "*")
        {
            c.error(&field("tenant"), format!("`{t}` is not a tenant name"));
        }
        for (k, ip) in w.ips.iter().enumerate() {
            if let Some(first) = owners.insert(*ip, i) {
                let at = [Seg::Key("workloads"), Seg::Index(i), Seg::Key("ips"), Seg::Index(k)];
                c.error(&at, format!("address {ip} already belongs to workloads[{first}]"));
            }
        }
        cluster.pods.push(Pod {
            name: w.name.clone(),
            namespace: w.namespace.clone(),
            labels: w.labels.clone(),
            ips: w.ips.clone(),
            ports: w.ports.clone(),
        });
        tenants.push(w.tenant.clone());
    }
    (cluster, tenants)
}

fn build_cases(c: &mut Checker<'_>, raw: &[RawCase], cluster: &Cluster) -> Vec<Case> {
    if raw.is_empty() {
        c.error(&[Seg::Key("cases")], "a test needs at least one case");
    }
    let mut cases = Vec::new();
    for (i, case) in raw.iter().enumerate() {
        let field = |key| [Seg::Key("cases"), Seg::Index(i), Seg::Key(key)];
        let from = parse_peer(cluster, &case.from).map_err(|m| c.error(&field("from"), m));
        let to = parse_peer(cluster, &case.to).map_err(|m| c.error(&field("to"), m));
        let port = u16::try_from(case.port).ok().filter(|p| *p != 0);
        if port.is_none() {
            c.error(
                &field("port"),
                format!("port {} is out of range: must be between 1 and 65535", case.port),
            );
        }
        let (Ok(from), Ok(to), Some(port)) = (from, to, port) else { continue };
        if !matches!(from, Peer::Workload(_)) && !matches!(to, Peer::Workload(_)) {
            c.error(
                &[Seg::Key("cases"), Seg::Index(i)],
                "`from` or `to` must be a workload (`namespace/name`)",
            );
            continue;
        }
        cases.push(Case {
            name: case.name.clone(),
            from,
            to,
            from_text: case.from.clone(),
            to_text: case.to.clone(),
            protocol: case.protocol,
            port,
            expect: case.expect,
        });
    }
    cases
}

/// `namespace/name` of a workload, an IP address, or a CIDR block.
fn parse_peer(cluster: &Cluster, text: &str) -> Result<Peer, String> {
    if let Ok(ip) = text.parse::<IpAddr>() {
        return Ok(Peer::Address(ip));
    }
    if let Some((addr, _)) = text.split_once('/')
        && addr.parse::<IpAddr>().is_ok()
    {
        let net: IpNetwork = text.parse().map_err(|e| format!("invalid block `{text}`: {e}"))?;
        let host = if net.is_ipv4() { 32 } else { 128 };
        return Ok(if net.prefix() == host { Peer::Address(net.addr()) } else { Peer::Block(net) });
    }
    match text.split_once('/') {
        Some((namespace, name)) if !namespace.is_empty() && !name.is_empty() => cluster
            .pod_index(namespace, name)
            .map(Peer::Workload)
            .ok_or_else(|| format!("no workload `{text}` in `workloads`")),
        _ => Err(format!("`{text}` is not a workload (`namespace/name`), an IP address or a CIDR block")),
    }
}

/// The policy files of a test: its `policies` (relative to the test file), then `extra`; each
/// directory stands for its `.yaml`/`.yml` files. A file named twice is loaded once.
fn policy_files(c: &mut Checker<'_>, test: &Path, own: &[String], extra: &[PathBuf]) -> Vec<PathBuf> {
    let base = test.parent().unwrap_or(Path::new("."));
    let mut files = Vec::new();
    for (i, p) in own.iter().enumerate() {
        let path = base.join(p);
        match std::fs::metadata(&path).map_err(anyhow::Error::from).and_then(|_| yaml_files(&[path])) {
            Ok(found) => files.extend(found),
            Err(e) => c.error(&[Seg::Key("policies"), Seg::Index(i)], format!("cannot read `{p}`: {e:#}")),
        }
    }
    for p in extra {
        match std::fs::metadata(p)
            .map_err(anyhow::Error::from)
            .and_then(|_| yaml_files(std::slice::from_ref(p)))
        {
            Ok(found) => files.extend(found),
            Err(e) => c.errors.push(TestError::unplaced(p, format!("cannot read the policies: {e:#}"))),
        }
    }
    let mut seen = BTreeSet::new();
    files.retain(|f| seen.insert(std::fs::canonicalize(f).unwrap_or_else(|_| f.clone())));
    files
}

/// A deserialization error, with `serde_yaml`'s own rendering of path and position taken out of the
/// message (they are in `field`, `line` and `column`).
fn de_error(file: &Path, err: serde_path_to_error::Error<serde_yaml::Error>) -> TestError {
    let field = err.path().to_string();
    let inner = err.into_inner();
    let location = inner.location();
    let mut message = inner.to_string();
    if let Some(l) = &location {
        message = message.replacen(&format!(" at line {} column {}", l.line(), l.column()), "", 1);
    }
    if let Some((head, rest)) = message.split_once(": ")
        && (field == head
            || field.strip_prefix(head).is_some_and(|tail| tail.starts_with('.') || tail.starts_with('[')))
    {
        message = rest.to_owned();
    }
    TestError {
        file: file.to_owned(),
        line: location.as_ref().map(serde_yaml::Location::line),
        column: location.as_ref().map(serde_yaml::Location::column),
        field,
        message,
    }
}

/// Position of the node at `path` (or of the nearest enclosing node present in the text).
fn locate(text: &str, path: &[Seg]) -> (usize, usize) {
    ztseg_policy::yaml_position(text, &owned(path))
}

// ---- evaluation --------------------------------------------------------------------------------

/// The verdict a case got.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    /// Allowed.
    Allow,
    /// Denied.
    Deny,
    /// A block of addresses: some allowed, some denied.
    Mixed,
}

impl fmt::Display for Verdict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Verdict::Allow => "allow",
            Verdict::Deny => "deny",
            Verdict::Mixed => "mixed",
        })
    }
}

/// What decided a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Tier {
    /// A workload reaching itself.
    Loopback,
    /// An admin-tier `Allow` or `Deny` rule (`TenantPolicy`).
    Admin,
    /// The default cross-tenant deny.
    CrossTenant,
    /// `NetworkPolicy` (possibly after an admin `Pass`).
    NetworkPolicy,
    /// Several tiers, for the addresses of a block.
    Several,
}

impl fmt::Display for Tier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Tier::Loopback => "loopback",
            Tier::Admin => "admin",
            Tier::CrossTenant => "cross-tenant",
            Tier::NetworkPolicy => "network-policy",
            Tier::Several => "several",
        })
    }
}

/// The outcome of one case.
#[derive(Debug, Clone, Serialize)]
pub struct CaseResult {
    /// Test file.
    pub file: PathBuf,
    /// Test name (`metadata.name`).
    pub test: String,
    /// Case `name`, or `#N` (1-based position).
    pub case: String,
    /// Source as written.
    pub from: String,
    /// Destination as written.
    pub to: String,
    /// Protocol.
    pub protocol: Protocol,
    /// Destination port.
    pub port: u16,
    /// Expected verdict.
    pub expect: Expect,
    /// Verdict found.
    pub verdict: Verdict,
    /// Whether the verdict is the expected one.
    pub pass: bool,
    /// What decided.
    pub tier: Tier,
    /// Why: which rule, policy or tier decided.
    pub reason: String,
}

/// One decision between two concrete endpoints.
#[derive(Debug, Clone)]
struct Decision {
    allow: bool,
    tier: Tier,
    reason: String,
}

/// A key of [`TenantPolicy::keys`].
type AdminKey = (String, String, Option<Protocol>, Option<u16>);

/// Everything needed to decide connections of one suite.
struct Evaluator<'a> {
    suite: &'a Suite,
    eval: Vec<PodPolicy>,
    /// Each `NetworkPolicy` evaluated on its own, to name the policies that decide.
    per_policy: Vec<Vec<PodPolicy>>,
    /// (policy index, key) of every admin key.
    admin_keys: Vec<(usize, AdminKey)>,
    /// Every prefix whose addresses may be treated differently: `ipBlock` blocks and exceptions,
    /// and workload addresses.
    bounds: Vec<IpNetwork>,
}

impl Suite {
    /// Runs every case.
    #[must_use]
    pub fn run(&self) -> Vec<CaseResult> {
        let evaluator = Evaluator::new(self);
        self.cases
            .iter()
            .enumerate()
            .map(|(i, case)| {
                let (verdict, tier, reason) = evaluator.case(case);
                let pass = matches!(
                    (case.expect, verdict),
                    (Expect::Allow, Verdict::Allow) | (Expect::Deny, Verdict::Deny)
                );
                CaseResult {
                    file: self.file.clone(),
                    test: self.name.clone(),
                    case: case.name.clone().unwrap_or_else(|| format!("#{}", i + 1)),
                    from: case.from_text.clone(),
                    to: case.to_text.clone(),
                    protocol: case.protocol,
                    port: case.port,
                    expect: case.expect,
                    verdict,
                    pass,
                    tier,
                    reason,
                }
            })
            .collect()
    }
}

impl<'a> Evaluator<'a> {
    fn new(suite: &'a Suite) -> Self {
        let cluster = &suite.cluster;
        let eval = ztseg_policy::evaluate(cluster, &suite.network_policies);
        let per_policy = suite
            .network_policies
            .iter()
            .map(|p| ztseg_policy::evaluate(cluster, std::slice::from_ref(p)))
            .collect();
        let admin_keys = suite
            .tenant_policies
            .iter()
            .enumerate()
            .flat_map(|(i, p)| p.keys().into_iter().map(move |k| (i, k)))
            .collect();
        let mut bounds = BTreeSet::new();
        for pod_policy in &eval {
            for isolation in [&pod_policy.ingress, &pod_policy.egress] {
                if let Isolation::Isolated(rules) = isolation {
                    for peer in rules.iter().flat_map(|r| &r.peers) {
                        if let PeerMatch::Cidr { net, except } = peer {
                            bounds.insert(*net);
                            bounds.extend(except.iter().copied());
                        }
                    }
                }
            }
        }
        for ip in cluster.pods.iter().flat_map(|p| &p.ips) {
            let host = if ip.is_ipv4() { 32 } else { 128 };
            bounds.extend(IpNetwork::new(*ip, host).ok());
        }
        Evaluator { suite, eval, per_policy, admin_keys, bounds: bounds.into_iter().collect() }
    }

    fn pod_name(&self, i: usize) -> String {
        let pod = &self.suite.cluster.pods[i];
        format!("{}/{}", pod.namespace, pod.name)
    }

    /// The concrete endpoints a peer stands for, each with how to name it in reasons when that
    /// differs from the case's text.
    fn endpoints(&self, peer: Peer) -> Vec<(Option<String>, Endpoint)> {
        let cluster = &self.suite.cluster;
        match peer {
            Peer::Workload(i) => vec![(None, Endpoint::Pod(i))],
            Peer::Address(ip) => match cluster.pod_by_ip(ip) {
                Some(i) => vec![(Some(format!("{ip} is {}", self.pod_name(i))), Endpoint::Pod(i))],
                None => vec![(None, Endpoint::Ip(ip))],
            },
            Peer::Block(net) => {
                let mut cells = Vec::new();
                split(net, &self.bounds, &mut cells);
                cells
                    .into_iter()
                    .map(|cell| {
                        let owner = cell_owner(cluster, cell);
                        match owner {
                            Some(i) => {
                                (Some(format!("{} ({})", cell.addr(), self.pod_name(i))), Endpoint::Pod(i))
                            }
                            None => (Some(cell.to_string()), Endpoint::Ip(cell.addr())),
                        }
                    })
                    .collect()
            }
        }
    }

    fn case(&self, case: &Case) -> (Verdict, Tier, String) {
        let mut decisions = Vec::new();
        for (from_label, src) in self.endpoints(case.from) {
            for (to_label, dst) in self.endpoints(case.to) {
                let decision = self.decide(src, dst, case.protocol, case.port);
                let label =
                    [from_label.clone(), to_label].into_iter().flatten().collect::<Vec<_>>().join(", ");
                decisions.push((label, decision));
            }
        }
        let block = matches!(case.from, Peer::Block(_)) || matches!(case.to, Peer::Block(_));
        if !block && let [(label, d)] = decisions.as_slice() {
            let verdict = if d.allow { Verdict::Allow } else { Verdict::Deny };
            let reason = if label.is_empty() { d.reason.clone() } else { format!("{label}: {}", d.reason) };
            return (verdict, d.tier, reason);
        }
        let first_allowed = decisions.iter().find(|(_, d)| d.allow);
        let first_denied = decisions.iter().find(|(_, d)| !d.allow);
        let tier = match decisions.first() {
            Some((_, first)) if decisions.iter().all(|(_, d)| d.tier == first.tier) => first.tier,
            _ => Tier::Several,
        };
        // Every part of the block gets the same verdict: one example is enough.
        let uniform = |verdict, (label, d): &(String, Decision)| {
            let reason = match decisions.len() {
                1 => format!("every address of the block: {}", d.reason),
                n => format!("every address of the block ({n} parts), e.g. {label}: {}", d.reason),
            };
            (verdict, tier, reason)
        };
        match (first_allowed, first_denied) {
            (Some(example), None) => uniform(Verdict::Allow, example),
            (None, Some(example)) => uniform(Verdict::Deny, example),
            (Some((allowed, a)), Some((denied, d))) => (
                Verdict::Mixed,
                tier,
                format!("allowed for {allowed} ({}), denied for {denied} ({})", a.reason, d.reason),
            ),
            (None, None) => (Verdict::Deny, tier, "no address to check".to_owned()),
        }
    }

    fn tenant(&self, end: Endpoint) -> Option<&str> {
        match end {
            Endpoint::Pod(i) => self.suite.tenants[i].as_deref(),
            Endpoint::Ip(_) => None,
        }
    }

    /// The enforcer's verdict for `src` → `dst`.
    fn decide(&self, src: Endpoint, dst: Endpoint, proto: Protocol, port: u16) -> Decision {
        if let (Endpoint::Pod(a), Endpoint::Pod(b)) = (src, dst)
            && a == b
        {
            let reason = "a workload reaching itself never passes the data plane".to_owned();
            return Decision { allow: true, tier: Tier::Loopback, reason };
        }
        let (src_tenant, dst_tenant) = (self.tenant(src), self.tenant(dst));
        let cluster = &self.suite.cluster;
        let network = || ztseg_policy::allowed(cluster, &self.eval, src, dst, proto, port);
        match self.admin_rule(src_tenant, dst_tenant, proto, port) {
            Some(policy) => {
                let rule = format!(
                    "TenantPolicy `{}` ({}, priority {})",
                    policy.metadata.name, policy.spec.action, policy.spec.priority
                );
                match policy.spec.action {
                    TenantAction::Allow => Decision { allow: true, tier: Tier::Admin, reason: rule },
                    TenantAction::Deny => Decision { allow: false, tier: Tier::Admin, reason: rule },
                    TenantAction::Pass => Decision {
                        allow: network(),
                        tier: Tier::NetworkPolicy,
                        reason: format!(
                            "{rule} hands over to NetworkPolicy: {}",
                            self.explain(src, dst, proto, port)
                        ),
                    },
                }
            }
            None => match (src_tenant, dst_tenant) {
                (Some(s), Some(d)) if s != d => {
                    let mut reason =
                        format!("cross-tenant `{s}` -> `{d}` and no TenantPolicy allows or passes it");
                    if network() {
                        let _ = write!(
                            reason,
                            " (NetworkPolicy alone would allow it: {})",
                            self.explain(src, dst, proto, port)
                        );
                    }
                    Decision { allow: false, tier: Tier::CrossTenant, reason }
                }
                _ => Decision {
                    allow: network(),
                    tier: Tier::NetworkPolicy,
                    reason: self.explain(src, dst, proto, port),
                },
            },
        }
    }

    /// The admin rule the data plane applies: probes in the data plane's order (tenant pair
    /// `(s,d)`, `(s,*)`, `(*,d)`, `(*,*)`; for each, port `proto+port`, `proto+any`, any) and keeps
    /// the first match of the lowest priority.
    fn admin_rule(
        &self,
        src: Option<&str>,
        dst: Option<&str>,
        proto: Protocol,
        port: u16,
    ) -> Option<&TenantPolicy> {
        // A side matches a named tenant only if the workload has that tenant, the wildcard probe
        // only the wildcard.
        let side = |key: &str, wildcard: bool, tenant: Option<&str>| {
            if wildcard { key == "*" } else { key != "*" && tenant == Some(key) }
        };
        let mut best: Option<&TenantPolicy> = None;
        for shape in 0..12 {
            let (tenants, ports) = (shape / 3, shape % 3);
            for (i, (from, to, key_proto, key_port)) in &self.admin_keys {
                let ports_match = match ports {
                    0 => *key_proto == Some(proto) && *key_port == Some(port),
                    1 => *key_proto == Some(proto) && key_port.is_none(),
                    _ => key_proto.is_none(),
                };
                let policy = &self.suite.tenant_policies[*i];
                if ports_match
                    && side(from, tenants & 2 != 0, src)
                    && side(to, tenants & 1 != 0, dst)
                    && best.is_none_or(|b| policy.spec.priority < b.spec.priority)
                {
                    best = Some(policy);
                }
            }
        }
        best
    }

    /// Which `NetworkPolicy` objects decided each direction that applies.
    fn explain(&self, src: Endpoint, dst: Endpoint, proto: Protocol, port: u16) -> String {
        let mut parts = Vec::new();
        if let Endpoint::Pod(a) = src {
            parts.push(self.explain_side(a, Direction::Egress, dst, proto, port));
        }
        if let Endpoint::Pod(b) = dst {
            parts.push(self.explain_side(b, Direction::Ingress, src, proto, port));
        }
        parts.join("; ")
    }

    fn explain_side(
        &self,
        pod: usize,
        direction: Direction,
        peer: Endpoint,
        proto: Protocol,
        port: u16,
    ) -> String {
        let cluster = &self.suite.cluster;
        let what = match direction {
            Direction::Ingress => "ingress",
            Direction::Egress => "egress",
        };
        let who = format!("{what} of {}", self.pod_name(pod));
        let isolation = self.eval[pod].get(direction);
        if matches!(isolation, Isolation::NotIsolated) {
            return format!("{who} not isolated");
        }
        let names = |keep: &dyn Fn(&Isolation) -> bool| {
            self.per_policy
                .iter()
                .zip(&self.suite.network_policies)
                .filter(|(eval, _)| keep(eval[pod].get(direction)))
                .map(|(_, p)| format!("{}/{}", p.metadata.namespace, p.metadata.name))
                .collect::<Vec<_>>()
                .join(", ")
        };
        if isolation.allows(cluster, peer, proto, port) {
            format!(
                "{who} allowed by {}",
                names(&|i| matches!(i, Isolation::Isolated(_)) && i.allows(cluster, peer, proto, port))
            )
        } else {
            format!("{who} denied: no rule of {} matches", names(&|i| matches!(i, Isolation::Isolated(_))))
        }
    }
}

/// Splits `net` into blocks on which every prefix of `bounds` is either whole or absent, so that
/// every address of a block gets the same verdict.
fn split(net: IpNetwork, bounds: &[IpNetwork], out: &mut Vec<IpNetwork>) {
    let inside = bounds.iter().any(|b| b.prefix() > net.prefix() && net.contains_net(b));
    let Some((low, high)) = inside.then(|| halves(net)).flatten() else {
        out.push(net);
        return;
    };
    split(low, bounds, out);
    split(high, bounds, out);
}

/// The two halves of `net`, unless it is a single address.
fn halves(net: IpNetwork) -> Option<(IpNetwork, IpNetwork)> {
    let prefix = net.prefix() + 1;
    let high = match net.addr() {
        IpAddr::V4(a) => {
            IpAddr::V4((u32::from(a) | 1_u32.checked_shl(32_u32.checked_sub(prefix.into())?)?).into())
        }
        IpAddr::V6(a) => {
            IpAddr::V6((u128::from(a) | 1_u128.checked_shl(128_u32.checked_sub(prefix.into())?)?).into())
        }
    };
    Some((IpNetwork::new(net.addr(), prefix).ok()?, IpNetwork::new(high, prefix).ok()?))
}

/// The workload owning a single-address block.
fn cell_owner(cluster: &Cluster, cell: IpNetwork) -> Option<usize> {
    let host = if cell.is_ipv4() { 32 } else { 128 };
    if cell.prefix() == host { cluster.pod_by_ip(cell.addr()) } else { None }
}

// ---- running and reporting ---------------------------------------------------------------------

/// Counts of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Summary {
    /// Test files given (directories expanded).
    pub files: usize,
    /// Test files that could not be run (invalid test or policy files).
    pub invalid_files: usize,
    /// Cases run.
    pub cases: usize,
    /// Cases with the expected verdict.
    pub passed: usize,
    /// Cases with another verdict.
    pub failed: usize,
}

/// Everything a run found.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// One entry per case of every valid test file.
    pub results: Vec<CaseResult>,
    /// Counts.
    pub summary: Summary,
    /// Every problem of the invalid test and policy files.
    pub errors: Vec<TestError>,
}

impl Report {
    /// 0 when every case passed, 1 when a case failed, 2 when a test or policy file is invalid.
    #[must_use]
    pub fn exit_code(&self) -> u8 {
        if self.errors.is_empty() { u8::from(self.summary.failed > 0) } else { 2 }
    }
}

/// Runs test files (a directory stands for its `.yaml`/`.yml` files), each with its own policy
/// files plus `policies`.
#[must_use]
pub fn run_files(files: &[PathBuf], policies: &[PathBuf]) -> Report {
    let mut tests = Vec::new();
    let mut errors = Vec::new();
    for path in files {
        match yaml_files(std::slice::from_ref(path)) {
            Ok(found) if found.is_empty() => {
                errors.push(TestError::unplaced(path, "no .yaml or .yml test file in this directory".into()));
            }
            Ok(found) => tests.extend(found),
            Err(e) => errors.push(TestError::unplaced(path, format!("{e:#}"))),
        }
    }
    let mut summary = Summary { files: tests.len(), ..Summary::default() };
    let mut results = Vec::new();
    for test in &tests {
        match load(test, policies) {
            Ok(suite) => results.extend(suite.run()),
            Err(es) => {
                summary.invalid_files += 1;
                errors.extend(es);
            }
        }
    }
    // Test files sharing a broken policy file would report its errors once each.
    let mut seen = BTreeSet::new();
    errors.retain(|e| seen.insert(e.to_string()));
    summary.cases = results.len();
    summary.passed = results.iter().filter(|r| r.pass).count();
    summary.failed = summary.cases - summary.passed;
    Report { results, summary, errors }
}

/// Output format of [`command`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Aligned table and a summary line.
    Table,
    /// The [`Report`] as JSON.
    Json,
    /// The [`Report`] as YAML.
    Yaml,
}

/// Renders the report as a table of cases followed by a summary line.
#[must_use]
pub fn table(report: &Report) -> String {
    let rows: crate::client::Rows = report
        .results
        .iter()
        .map(|r| {
            vec![
                ("result", if r.pass { "PASS" } else { "FAIL" }.into()),
                ("test", r.test.clone().into()),
                ("case", r.case.clone().into()),
                ("from", r.from.clone().into()),
                ("to", r.to.clone().into()),
                ("port", format!("{}/{}", r.protocol, r.port).into()),
                ("expect", format!("{:?}", r.expect).to_lowercase().into()),
                ("verdict", r.verdict.to_string().into()),
                ("tier", r.tier.to_string().into()),
                ("reason", r.reason.clone().into()),
            ]
        })
        .collect();
    let s = &report.summary;
    let mut out = if rows.is_empty() { String::new() } else { crate::client::table(&rows) };
    let _ = write!(
        out,
        "{} cases in {} test files: {} passed, {} failed",
        s.cases,
        s.files - s.invalid_files,
        s.passed,
        s.failed
    );
    if !report.errors.is_empty() {
        let _ = write!(out, "; {} invalid test files, {} errors", s.invalid_files, report.errors.len());
    }
    out.push('\n');
    out
}

/// `ztseg policy test FILES... [--policies PATH]...`: runs the tests, prints every error of an
/// invalid file to stderr and the results to stdout; exit code as [`Report::exit_code`].
#[must_use]
pub fn command(files: &[PathBuf], policies: &[PathBuf], format: Format) -> ExitCode {
    let report = run_files(files, policies);
    for e in &report.errors {
        eprintln!("{e}");
    }
    let rendered = match format {
        Format::Table => Ok(table(&report)),
        Format::Json => serde_json::to_string_pretty(&report).map(|s| s + "\n").map_err(|e| e.to_string()),
        Format::Yaml => serde_yaml::to_string(&report).map_err(|e| e.to_string()),
    };
    match rendered {
        Ok(text) => print!("{text}"),
        Err(e) => {
            eprintln!("error: rendering the report: {e}");
            return ExitCode::from(2);
        }
    }
    ExitCode::from(report.exit_code())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory for one test.
    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztseg-policy-test-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, text).unwrap();
        path
    }

    const HEADER: &str = "apiVersion: ztseg.io/v1alpha1\nkind: PolicyTest\nmetadata: {name: t}\n";

    /// shop/db accepts TCP 5432 from shop/web only; globex's scanner is of another tenant.
    const SHOP_POLICIES: &str = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: db-from-web, namespace: shop}
spec:
  podSelector: {matchLabels: {app: db}}
  ingress:
    - from: [{podSelector: {matchLabels: {app: web}}}]
      ports: [{port: 5432}]
---
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: web-open, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  ingress:
    - {}
";

    const SHOP: &str = "\
policies: [policies]
namespaces:
  - {name: shop}
  - {name: globex}
workloads:
  - {namespace: shop, name: web, labels: {app: web}, tenant: acme}
  - {namespace: shop, name: db, labels: {app: db}, tenant: acme}
  - {namespace: globex, name: scanner, labels: {app: scanner}, tenant: globex}
";

    fn by_case<'a>(report: &'a Report, name: &str) -> &'a CaseResult {
        report
            .results
            .iter()
            .find(|r| r.case == name)
            .unwrap_or_else(|| panic!("no case {name}: {report:#?}"))
    }

    #[test]
    fn passing_file_passes() {
        let dir = scratch("pass");
        write(&dir, "policies/shop.yaml", SHOP_POLICIES);
        let cases = "\
cases:
  - {name: web-db, from: shop/web, to: shop/db, port: 5432, expect: allow}
  - {name: db-web, from: shop/db, to: shop/web, port: 80, protocol: UDP, expect: allow}
  - {name: wrong-port, from: shop/web, to: shop/db, port: 5433, expect: deny}
";
        let test = write(&dir, "test.yaml", &format!("{HEADER}{SHOP}{cases}"));
        let report = run_files(&[test], &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!(report.summary, Summary { files: 1, invalid_files: 0, cases: 3, passed: 3, failed: 0 });
        assert_eq!(report.exit_code(), 0);
        let web_db = by_case(&report, "web-db");
        assert_eq!((web_db.verdict, web_db.tier), (Verdict::Allow, Tier::NetworkPolicy));
        assert!(
            web_db.reason.contains("ingress of shop/db allowed by shop/db-from-web"),
            "{}",
            web_db.reason
        );
        assert!(table(&report).contains("3 cases in 1 test files: 3 passed, 0 failed"));
    }

    #[test]
    fn failing_case_is_reported_as_failure() {
        let dir = scratch("fail");
        write(&dir, "policies/shop.yaml", SHOP_POLICIES);
        let cases = "\
cases:
  - {name: ok, from: shop/web, to: shop/db, port: 5432, expect: allow}
  - {name: wrong, from: shop/web, to: shop/db, port: 22, expect: allow}
";
        let test = write(&dir, "test.yaml", &format!("{HEADER}{SHOP}{cases}"));
        let report = run_files(std::slice::from_ref(&test), &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert_eq!((report.summary.passed, report.summary.failed), (1, 1));
        assert_eq!(report.exit_code(), 1);
        let wrong = by_case(&report, "wrong");
        assert!(!wrong.pass);
        assert_eq!((wrong.expect, wrong.verdict), (Expect::Allow, Verdict::Deny));
        assert!(wrong.reason.contains("no rule of shop/db-from-web matches"), "{}", wrong.reason);
        let rendered = table(&report);
        assert!(rendered.lines().any(|l| l.starts_with("FAIL") && l.contains("wrong")), "{rendered}");

        // The same policies given on the command line instead of in the file: same results.
        let bare = write(
            &dir,
            "bare.yaml",
            &format!("{HEADER}{}{cases}", SHOP.replace("policies: [policies]\n", "")),
        );
        let report = run_files(&[bare], &[dir.join("policies")]);
        assert_eq!((report.summary.passed, report.summary.failed), (1, 1));
    }

    /// Runs one malformed test file and returns its errors as displayed.
    fn errors_of(tag: &str, text: &str) -> Vec<String> {
        let dir = scratch(tag);
        let file = write(&dir, "test.yaml", text);
        let report = run_files(&[file], &[]);
        assert_eq!(report.exit_code(), 2);
        assert_eq!(report.summary.invalid_files, 1);
        assert!(report.results.is_empty());
        let prefix = format!("{}:", dir.join("test.yaml").display());
        report
            .errors
            .iter()
            .map(|e| e.to_string().strip_prefix(&prefix).unwrap_or_else(|| panic!("{e}")).to_owned())
            .collect()
    }

    #[test]
    fn malformed_file_is_reported_with_line_column_and_field() {
        // Type errors, unknown fields and bad values stop deserialization at the first one.
        let port =
            errors_of("port", &format!("{HEADER}cases:\n  - from: a/b\n    to: a/c\n    port: http\n"));
        assert_eq!(
            port,
            [
                "7:11: cases[0].port: invalid type: string \"http\", expected a port number between 1 and 65535"
            ]
        );
        let unknown = errors_of(
            "unknown",
            &format!("{HEADER}cases:\n  - {{from: a/b, to: a/c, port: 80, expct: allow}}\n"),
        );
        assert_eq!(unknown.len(), 1);
        assert!(unknown[0].starts_with("5:36: cases[0].expct: unknown field `expct`"), "{unknown:?}");
        let protocol = errors_of(
            "proto",
            &format!("{HEADER}cases:\n  - {{from: a/b, to: a/c, port: 80, protocol: tcp, expect: deny}}\n"),
        );
        assert!(protocol[0].starts_with("5:46: cases[0].protocol: unknown variant `tcp`"), "{protocol:?}");

        // Semantic errors are all reported, each at its value.
        let text = format!(
            "{HEADER}namespaces:\n  - {{name: shop}}\nworkloads:\n  - {{namespace: shpo, name: web}}\n  - {{namespace: shop, name: db, ips: [10.0.0.1]}}\n  - {{namespace: shop, name: cache, ips: [10.0.0.1]}}\ncases:\n  - {{from: shop/db, to: shop/dbb, port: 80, expect: allow}}\n  - {{from: shop/db, to: 10.0.0.0/33, port: 0, expect: deny}}\n  - {{from: 192.0.2.1, to: 192.0.2.0/24, port: 80, expect: deny}}\n"
        );
        let semantic = errors_of("semantic", &text);
        assert_eq!(
            semantic,
            [
                "7:17: workloads[0].namespace: namespace `shpo` is not declared in `namespaces`",
                "9:42: workloads[2].ips[0]: address 10.0.0.1 already belongs to workloads[1]",
                "11:25: cases[0].to: no workload `shop/dbb` in `workloads`",
                "12:25: cases[1].to: invalid block `10.0.0.0/33`: prefix length 33 exceeds 32 for this address family",
                "12:44: cases[1].port: port 0 is out of range: must be between 1 and 65535",
                "13:5: cases[2]: `from` or `to` must be a workload (`namespace/name`)",
            ]
        );

        let header =
            errors_of("header", "apiVersion: v1\nkind: PolicyTest\nmetadata: {name: t}\ncases: []\n");
        assert_eq!(
            header,
            [
                "1:13: apiVersion: must be `ztseg.io/v1alpha1`, found `v1`",
                "4:8: cases: a test needs at least one case",
            ]
        );
    }

    #[test]
    fn invalid_policy_file_is_reported_with_its_position() {
        let dir = scratch("badpolicy");
        write(&dir, "policies/shop.yaml", &SHOP_POLICIES.replace("port: 5432", "port: 70000"));
        let cases = "cases:\n  - {from: shop/web, to: shop/db, port: 5432, expect: allow}\n";
        let test = write(&dir, "test.yaml", &format!("{HEADER}{SHOP}{cases}"));
        let report = run_files(&[test], &[]);
        assert_eq!(report.exit_code(), 2);
        let shown: Vec<String> = report.errors.iter().map(ToString::to_string).collect();
        let file = dir.join("policies/shop.yaml");
        assert_eq!(shown.len(), 1, "{shown:?}");
        assert!(
            shown[0].starts_with(&format!("{}:8:22: spec.ingress[0].ports[0].port: ", file.display())),
            "{shown:?}"
        );

        // Tenant policies of two files that the enforcer would refuse together.
        let dir = scratch("conflict");
        let allow = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata: {name: NAME}\nspec: {priority: 1, action: Allow, from: {tenant: acme}, to: {tenant: globex}}\n";
        write(&dir, "policies/a.yaml", &allow.replace("NAME", "a"));
        write(&dir, "policies/b.yaml", &allow.replace("NAME", "b"));
        let test = write(&dir, "test.yaml", &format!("{HEADER}{SHOP}{cases}"));
        let report = run_files(&[test], &[]);
        assert_eq!(report.exit_code(), 2);
        assert_eq!(report.errors.len(), 1);
        let shown = report.errors[0].to_string();
        assert!(
            shown.starts_with(&format!(
                "{}:4:7: spec.ports: TenantPolicy `b` and TenantPolicy `a` ({}:1)",
                dir.join("policies/b.yaml").display(),
                dir.join("policies/a.yaml").display()
            )),
            "located in the second file, naming the first: {shown}"
        );
    }

    #[test]
    fn cross_tenant_traffic_follows_the_admin_tier() {
        let dir = scratch("tenants");
        // NetworkPolicy allows everything into web; only the admin tier stands between tenants.
        write(&dir, "policies/shop.yaml", SHOP_POLICIES);
        let tenant = |name: &str, spec: &str| {
            format!(
                "---\napiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata: {{name: {name}}}\nspec: {spec}\n"
            )
        };
        let admin = [
            tenant("api", "{priority: 10, action: Allow, from: {tenant: globex}, to: {tenant: acme}, ports: [{port: 443}]}"),
            tenant("pass", "{priority: 10, action: Pass, from: {tenant: globex}, to: {tenant: acme}, ports: [{protocol: UDP}]}"),
            // Equal priority: the tenant pair (s,d) is probed before (*,*), so `pass` wins on UDP.
            tenant("no-udp", "{priority: 10, action: Deny, from: {tenant: '*'}, to: {tenant: '*'}, ports: [{protocol: UDP}]}"),
            // A lower number wins whatever the specificity.
            tenant("no-ssh", "{priority: 1, action: Deny, from: {tenant: '*'}, to: {tenant: '*'}, ports: [{port: 22}]}"),
            tenant("ssh", "{priority: 5, action: Allow, from: {tenant: globex}, to: {tenant: acme}, ports: [{port: 22}]}"),
        ]
        .concat();
        write(&dir, "policies/admin.yaml", &admin);
        let cases = "\
cases:
  - {name: cross-tenant, from: globex/scanner, to: shop/web, port: 80, expect: deny}
  - {name: admin-allow, from: globex/scanner, to: shop/db, port: 443, expect: allow}
  - {name: one-way, from: shop/web, to: globex/scanner, port: 443, expect: deny}
  - {name: pass, from: globex/scanner, to: shop/web, port: 53, protocol: UDP, expect: allow}
  - {name: pass-np-deny, from: globex/scanner, to: shop/db, port: 53, protocol: UDP, expect: deny}
  - {name: in-tenant-deny, from: shop/web, to: shop/db, port: 5432, protocol: UDP, expect: deny}
  - {name: priority, from: globex/scanner, to: shop/web, port: 22, expect: deny}
  - {name: external, from: 192.0.2.7, to: shop/web, port: 80, expect: allow}
  - {name: external-udp, from: 192.0.2.7, to: shop/web, port: 53, protocol: UDP, expect: deny}
";
        let test = write(&dir, "test.yaml", &format!("{HEADER}{SHOP}{cases}"));
        let report = run_files(&[test], &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let failed: Vec<&CaseResult> = report.results.iter().filter(|r| !r.pass).collect();
        assert!(failed.is_empty(), "{failed:#?}");

        // A tenant-level allow (web-open) cannot reopen cross-tenant traffic, and the reason says so.
        let cross = by_case(&report, "cross-tenant");
        assert_eq!(cross.tier, Tier::CrossTenant);
        assert!(cross.reason.contains("cross-tenant `globex` -> `acme`"), "{}", cross.reason);
        assert!(cross.reason.contains("NetworkPolicy alone would allow it"), "{}", cross.reason);
        // An admin Allow is final: db-from-web would deny.
        let allow = by_case(&report, "admin-allow");
        assert_eq!(allow.tier, Tier::Admin);
        assert!(allow.reason.contains("TenantPolicy `api` (Allow, priority 10)"), "{}", allow.reason);
        assert_eq!(by_case(&report, "one-way").tier, Tier::CrossTenant);
        // Pass hands over to NetworkPolicy, which decides either way.
        let pass = by_case(&report, "pass");
        assert_eq!(pass.tier, Tier::NetworkPolicy);
        assert!(
            pass.reason.starts_with("TenantPolicy `pass` (Pass, priority 10) hands over"),
            "{}",
            pass.reason
        );
        assert_eq!(by_case(&report, "pass-np-deny").tier, Tier::NetworkPolicy);
        assert!(by_case(&report, "in-tenant-deny").reason.contains("`no-udp`"));
        assert!(by_case(&report, "priority").reason.contains("`no-ssh`"));
        // Addresses that are not workloads have no tenant: only '*' rules apply to them.
        assert_eq!(by_case(&report, "external").tier, Tier::NetworkPolicy);
        assert!(by_case(&report, "external-udp").reason.contains("`no-udp`"));
    }

    #[test]
    fn address_blocks_are_checked_address_by_address() {
        let dir = scratch("blocks");
        let egress = "\
apiVersion: networking.k8s.io/v1
kind: NetworkPolicy
metadata: {name: out, namespace: shop}
spec:
  podSelector: {matchLabels: {app: web}}
  policyTypes: [Egress]
  egress:
    - to: [{ipBlock: {cidr: 10.0.0.0/8, except: [10.1.0.0/16]}}]
";
        write(&dir, "policies/out.yaml", egress);
        let workloads = "\
policies: [policies]
namespaces: [{name: shop}, {name: globex}]
workloads:
  - {namespace: shop, name: web, labels: {app: web}, tenant: acme, ips: [10.9.0.1]}
  - {namespace: shop, name: db, labels: {app: db}, tenant: acme, ips: [10.2.0.1]}
  - {namespace: globex, name: scanner, tenant: globex, ips: [10.3.0.1]}
";
        let cases = "\
cases:
  - {name: inside, from: shop/web, to: 10.200.0.1, port: 80, expect: allow}
  - {name: except, from: shop/web, to: 10.1.2.3, port: 80, expect: deny}
  - {name: outside, from: shop/web, to: 192.0.2.1, port: 80, expect: deny}
  - {name: except-block, from: shop/web, to: 10.1.0.0/16, port: 80, expect: deny}
  - {name: mixed, from: shop/web, to: 10.0.0.0/8, port: 80, expect: allow}
  - {name: with-workloads, from: shop/web, to: 10.2.0.0/16, port: 80, expect: allow}
  - {name: other-tenant-inside, from: shop/web, to: 10.3.0.0/16, port: 80, expect: allow}
  - {name: workload-address, from: shop/web, to: 10.3.0.1, port: 80, expect: deny}
";
        let test = write(&dir, "test.yaml", &format!("{HEADER}{workloads}{cases}"));
        let report = run_files(&[test], &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let failed: Vec<&str> = report.results.iter().filter(|r| !r.pass).map(|r| r.case.as_str()).collect();
        // The block 10.3.0.0/16 holds globex's scanner: cross-tenant, so not every address is allowed.
        assert_eq!(failed, ["mixed", "other-tenant-inside"]);
        let mixed = by_case(&report, "mixed");
        assert_eq!(mixed.verdict, Verdict::Mixed);
        assert!(mixed.reason.contains("denied for 10.1.0.0/16"), "{}", mixed.reason);
        let other = by_case(&report, "other-tenant-inside");
        assert_eq!((other.verdict, other.tier), (Verdict::Mixed, Tier::Several));
        assert!(other.reason.contains("denied for 10.3.0.1 (globex/scanner)"), "{}", other.reason);
        assert_eq!(by_case(&report, "with-workloads").verdict, Verdict::Allow);
        let address = by_case(&report, "workload-address");
        assert!(address.reason.starts_with("10.3.0.1 is globex/scanner: cross-tenant"), "{}", address.reason);
    }

    #[test]
    fn split_keeps_blocks_uniform() {
        let net = |s: &str| s.parse::<IpNetwork>().unwrap();
        let mut cells = Vec::new();
        split(net("10.0.0.0/8"), &[net("10.1.0.0/16"), net("10.1.2.3/32"), net("fd00::/8")], &mut cells);
        // Every cell lies inside or outside each bound, and together the cells cover the block.
        for cell in &cells {
            for bound in [net("10.1.0.0/16"), net("10.1.2.3/32")] {
                assert!(
                    bound.contains_net(cell) || !cell.contains_net(&bound) && !bound.contains(cell.addr())
                );
            }
        }
        let size = |n: &IpNetwork| 1_u64 << (32 - u32::from(n.prefix()));
        assert_eq!(cells.iter().map(size).sum::<u64>(), 1 << 24);
        assert!(cells.contains(&net("10.1.2.3/32")));
        assert_eq!(cells.len(), 8 + 16 + 1);
    }

    #[test]
    fn example_tests_pass() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../policies/tests");
        let report = run_files(&[dir], &[]);
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        let failed: Vec<&CaseResult> = report.results.iter().filter(|r| !r.pass).collect();
        assert!(failed.is_empty(), "{failed:#?}");
        assert!(report.summary.cases >= 8);
        let tiers: BTreeSet<String> = report.results.iter().map(|r| r.tier.to_string()).collect();
        for tier in ["loopback", "admin", "cross-tenant", "network-policy"] {
            assert!(tiers.contains(tier), "no case decided by {tier}");
        }
    }
}
