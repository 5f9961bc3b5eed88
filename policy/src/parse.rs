//! Parsing of multi-document YAML files into validated [`NetworkPolicy`] and [`TenantPolicy`]
//! objects, with every error reported as `file:line:column: field: message`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use crate::api::{API_VERSION, KIND, NetworkPolicy};
use crate::tenant::{
    RawTenantPolicy, TENANT_POLICY_API_VERSION, TENANT_POLICY_KIND, TenantPolicy, conflicts,
};
use crate::validate::{Issue, Seg, issues, path_string};

/// A problem found in a policy file, located as precisely as possible.
///
/// Displays as `file:line:column: field: message`. `field` is the dotted path of the offending
/// field (`spec.ingress[0].ports[1].port`), `.` for the document as a whole. Lines and columns are
/// 1-based. Deserialization errors carry the exact position; semantic errors point at the value of
/// the offending field, or at the nearest enclosing node present in the text when the field itself
/// is not.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}:{line}:{column}: {field}: {message}", file.display())]
pub struct PolicyError {
    /// The file, as given to [`parse_file`] or [`parse_documents`].
    pub file: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// Dotted field path.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

/// Parses every `NetworkPolicy` in `text` (the contents of `path`, which is only used in errors).
///
/// `text` is multi-document YAML; empty documents are skipped. Every document must be a
/// `networking.k8s.io/v1` `NetworkPolicy`. Each is deserialized strictly (unknown fields, duplicate
/// keys and wrong types are errors) and then validated as the API server would
/// ([`NetworkPolicy::validate`]); two policies with the same namespace and name are an error too.
///
/// All errors are collected: every document is checked, and all semantic errors of a document are
/// reported. Deserialization stops at the first error within one document, and a YAML syntax error
/// ends the scan of the file (the documents after it cannot be delimited reliably).
pub fn parse_file(path: &Path, text: &str) -> Result<Vec<NetworkPolicy>, Vec<PolicyError>> {
    let documents = FileParser { file: path, text, accept: &[Kind::Network], errors: Vec::new() }.run()?;
    Ok(documents
        .into_iter()
        .filter_map(|document| match document {
            Document::Network(policy) => Some(policy),
            Document::Tenant(_) => None,
        })
        .collect())
}

/// A policy object of a file read by [`parse_documents`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Document {
    /// A `networking.k8s.io/v1` `NetworkPolicy`.
    Network(NetworkPolicy),
    /// A `ztseg.io/v1alpha1` `TenantPolicy`.
    Tenant(TenantPolicy),
}

/// Parses every `NetworkPolicy` and `TenantPolicy` in `text` (the contents of `path`, which is only
/// used in errors), in document order.
///
/// Same rules as [`parse_file`], with both kinds accepted: each document is dispatched on its
/// `kind` and must carry that kind's `apiVersion`; each is deserialized strictly and validated
/// ([`NetworkPolicy::validate`], [`TenantPolicy::validate`]). Across the file, `NetworkPolicy`
/// names must be unique per namespace, `TenantPolicy` names must be unique, and no two
/// tenant policies may produce the same admin key ([`TenantPolicy::keys`]; see also
/// [`tenant_conflicts`](crate::tenant_conflicts) for checks across files). All errors are collected
/// as for [`parse_file`].
pub fn parse_documents(path: &Path, text: &str) -> Result<Vec<Document>, Vec<PolicyError>> {
    FileParser { file: path, text, accept: &[Kind::Network, Kind::Tenant], errors: Vec::new() }.run()
}

/// Parses a policy set as the ztseg enforcer loads it (a policy directory, a controller version):
/// every file as [`parse_documents`] does, in the order given, then the checks that need the
/// whole set, each error located in its file:
///
/// - `NetworkPolicy` names are unique per namespace across the set (two files defining the same
///   policy are an error, not a union), and `TenantPolicy` names are unique;
/// - no two `TenantPolicy` objects of different files produce the same admin key
///   ([`TenantPolicy::keys`]).
///
/// Errors in one file do not hide those of others; the set checks compare the files that parsed.
pub fn parse_set<'a>(
    files: impl IntoIterator<Item = (&'a Path, &'a str)>,
) -> Result<Vec<Document>, Vec<PolicyError>> {
    let files: Vec<(&Path, &str)> = files.into_iter().collect();
    let mut errors = Vec::new();
    // (file, document index in the file, document)
    let mut all: Vec<(usize, usize, Document)> = Vec::new();
    for (f, (path, text)) in files.iter().enumerate() {
        let parser =
            FileParser { file: path, text, accept: &[Kind::Network, Kind::Tenant], errors: Vec::new() };
        match parser.run_indexed() {
            Ok(docs) => all.extend(docs.into_iter().map(|(i, d)| (f, i, d))),
            Err(es) => errors.extend(es),
        }
    }
    let at = |f: usize, index: usize, path: &[Seg], message: String| {
        let (line, column) = locate_in(files[f].1, index, path);
        PolicyError { file: files[f].0.to_path_buf(), line, column, field: path_string(path), message }
    };
    let name_path = [Seg::Key("metadata".to_owned()), Seg::Key("name".to_owned())];
    let mut seen: BTreeMap<(bool, String), (usize, usize)> = BTreeMap::new();
    for (f, index, document) in &all {
        let (kind, name) = match document {
            Document::Network(p) => (KIND, format!("{}/{}", p.metadata.namespace, p.metadata.name)),
            Document::Tenant(p) => (TENANT_POLICY_KIND, p.metadata.name.clone()),
        };
        match seen.get(&(kind == KIND, name.clone())) {
            Some(&(first_file, first_index)) => {
                let (first_line, _) = locate_in(files[first_file].1, first_index, &[]);
                errors.push(at(
                    *f,
                    *index,
                    &name_path,
                    format!(
                        "duplicate {kind} `{name}` (already defined by {}:{first_line})",
                        files[first_file].0.display()
                    ),
                ));
            }
            None => {
                seen.insert((kind == KIND, name), (*f, *index));
            }
        }
    }
    let tenants: Vec<(usize, usize, &TenantPolicy)> = all
        .iter()
        .filter_map(|(f, i, d)| match d {
            Document::Tenant(p) => Some((*f, *i, p)),
            Document::Network(_) => None,
        })
        .collect();
    for conflict in conflicts(tenants.iter().map(|(_, _, p)| *p)) {
        let (f, index, policy) = tenants[conflict.policy];
        let (first_file, first_index, first) = tenants[conflict.first];
        let path = conflict_path(policy, &conflict);
        let (first_line, _) = locate_in(files[first_file].1, first_index, &[]);
        errors.push(at(
            f,
            index,
            &path,
            format!(
                "TenantPolicy `{}` and TenantPolicy `{}` ({}:{first_line}) {}",
                policy.metadata.name,
                first.metadata.name,
                files[first_file].0.display(),
                conflict.describe()
            ),
        ));
    }
    if errors.is_empty() {
        return Ok(all.into_iter().map(|(_, _, d)| d).collect());
    }
    let order: BTreeMap<&Path, usize> = files.iter().enumerate().map(|(i, (p, _))| (*p, i)).collect();
    errors.sort_by_key(|e| (order.get(e.file.as_path()).copied(), e.line, e.column));
    errors.dedup();
    Err(errors)
}

/// Path of the `ports` entry of `policy` giving the (first) key of `conflict`.
fn conflict_path(policy: &TenantPolicy, conflict: &crate::tenant::Conflict) -> Vec<Seg> {
    let mut path = vec![Seg::Key("spec".to_owned()), Seg::Key("ports".to_owned())];
    let (_, _, protocol, port) = &conflict.keys[0];
    if let Some(i) = policy.spec.ports.iter().position(|p| Some(p.protocol) == *protocol && p.port == *port) {
        path.push(Seg::Index(i));
    }
    path
}

/// The kinds of object a file may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Network,
    Tenant,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Network => KIND,
            Kind::Tenant => TENANT_POLICY_KIND,
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Kind::Network => API_VERSION,
            Kind::Tenant => TENANT_POLICY_API_VERSION,
        }
    }
}

struct FileParser<'a> {
    file: &'a Path,
    text: &'a str,
    /// Kinds accepted, in the order they are named in errors; the first is the one assumed for a
    /// document whose kind cannot be read.
    accept: &'a [Kind],
    errors: Vec<PolicyError>,
}

/// What pass 2 needs to know about a document before deserializing it strictly.
#[derive(Deserialize)]
struct Probe {
    #[serde(rename = "apiVersion", default)]
    api_version: Option<Value>,
    #[serde(default)]
    kind: Option<Value>,
    #[serde(default)]
    metadata: Option<Value>,
}

fn documents(text: &str) -> impl Iterator<Item = (usize, serde_yaml::Deserializer<'_>)> {
    serde_yaml::Deserializer::from_str(text).enumerate()
}

impl FileParser<'_> {
    fn run(self) -> Result<Vec<Document>, Vec<PolicyError>> {
        self.run_indexed().map(|docs| docs.into_iter().map(|(_, d)| d).collect())
    }

    /// The documents with their index in the file.
    fn run_indexed(mut self) -> Result<Vec<(usize, Document)>, Vec<PolicyError>> {
        // Pass 1: find the non-empty documents and the first syntax error. The document iterator
        // never ends once libyaml has failed, so stop there.
        let mut non_empty = Vec::new();
        let mut scanned = 0;
        for (index, doc) in documents(self.text) {
            match Option::<IgnoredAny>::deserialize(doc) {
                Ok(None) => {}
                Ok(Some(IgnoredAny)) => non_empty.push(index),
                Err(err) => {
                    let (line, column) = err.location().map_or((1, 1), |l| (l.line(), l.column()));
                    let mut message =
                        format!("invalid YAML: {}", strip_location(&err.to_string(), line, column));
                    if self.accept.contains(&Kind::Tenant) && message.contains("while scanning an alias") {
                        // A bare `*` starts a YAML alias.
                        message.push_str(" (the any-tenant wildcard must be quoted: `tenant: '*'`)");
                    }
                    self.push(line, column, ".".to_owned(), message);
                    break;
                }
            }
            scanned = index + 1;
        }

        // Pass 2: apiVersion and kind, so that other objects get one clear error rather than a
        // cascade of unknown fields.
        let mut candidates = BTreeMap::new();
        for (index, doc) in documents(self.text).take(scanned) {
            if !non_empty.contains(&index) {
                continue;
            }
            match Probe::deserialize(doc) {
                Ok(probe) => {
                    if let Some(kind) = self.check_type(index, &probe) {
                        candidates.insert(index, kind);
                    }
                }
                // Not a mapping, or a duplicated key: the strict pass reports it properly, as the
                // kind the document seems to be.
                Err(_) => {
                    candidates.insert(index, self.guess_kind(index));
                }
            }
        }

        // Pass 3: strict deserialization and validation.
        let mut parsed = Vec::new();
        for (index, doc) in documents(self.text).take(scanned) {
            let Some(&kind) = candidates.get(&index) else { continue };
            let result = match kind {
                Kind::Network => serde_path_to_error::deserialize::<_, NetworkPolicy>(doc).map(|policy| {
                    let found = issues(&policy);
                    if found.is_empty() { Ok(Document::Network(policy)) } else { Err(found) }
                }),
                Kind::Tenant => serde_path_to_error::deserialize::<_, RawTenantPolicy>(doc)
                    .map(|raw| raw.into_policy().map(Document::Tenant)),
            };
            match result {
                Ok(Ok(document)) => parsed.push((index, document)),
                Ok(Err(found)) => {
                    for Issue { path, message } in found {
                        let (line, column) = self.locate(index, &path);
                        self.push(line, column, path_string(&path), message);
                    }
                }
                Err(err) => self.push_de_error(index, err),
            }
        }

        // Names must be unique (NetworkPolicies per namespace, as in a cluster), and admin keys too.
        self.check_unique(
            KIND,
            parsed.iter().filter_map(|(index, document)| match document {
                Document::Network(p) => {
                    Some((*index, format!("{}/{}", p.metadata.namespace, p.metadata.name)))
                }
                Document::Tenant(_) => None,
            }),
        );
        let tenants: Vec<(usize, &TenantPolicy)> = parsed
            .iter()
            .filter_map(|(index, document)| match document {
                Document::Tenant(p) => Some((*index, p)),
                Document::Network(_) => None,
            })
            .collect();
        self.check_unique(
            TENANT_POLICY_KIND,
            tenants.iter().map(|(index, p)| (*index, p.metadata.name.clone())),
        );
        self.check_tenant_keys(&tenants);

        if self.errors.is_empty() {
            Ok(parsed)
        } else {
            self.errors.sort_by_key(|e| (e.line, e.column));
            Err(self.errors)
        }
    }

    /// Reports every document whose `name` (of kind `kind`) an earlier document already has.
    fn check_unique(&mut self, kind: &str, names: impl Iterator<Item = (usize, String)>) {
        let mut seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (index, name) in names {
            if let Some(first) = seen.get(&name) {
                duplicates.push((index, *first, name));
            } else {
                seen.insert(name, index);
            }
        }
        for (index, first, name) in duplicates {
            let path = [Seg::Key("metadata".to_owned()), Seg::Key("name".to_owned())];
            let (line, column) = self.locate(index, &path);
            let (first_line, _) = self.locate(first, &[]);
            self.push(
                line,
                column,
                path_string(&path),
                format!(
                    "duplicate {kind} `{name}` (already defined by document #{} at line {first_line})",
                    first + 1
                ),
            );
        }
    }

    /// Reports tenant policies producing an admin key that an earlier one of the file produces, at
    /// the `ports` entry giving the (first) shared key.
    fn check_tenant_keys(&mut self, tenants: &[(usize, &TenantPolicy)]) {
        for conflict in conflicts(tenants.iter().map(|(_, p)| *p)) {
            let (index, policy) = tenants[conflict.policy];
            let (first_index, first) = tenants[conflict.first];
            let path = conflict_path(policy, &conflict);
            let (line, column) = self.locate(index, &path);
            let (first_line, _) = self.locate(first_index, &[]);
            let message = format!(
                "TenantPolicy `{}` and TenantPolicy `{}` (document #{} at line {first_line}) {}",
                policy.metadata.name,
                first.metadata.name,
                first_index + 1,
                conflict.describe()
            );
            self.push(line, column, path_string(&path), message);
        }
    }

    fn push(&mut self, line: usize, column: usize, field: String, message: String) {
        self.errors.push(PolicyError { file: self.file.to_path_buf(), line, column, field, message });
    }

    /// Checks `apiVersion` and kind; returns the kind when the document is one of the accepted
    /// kinds with its `apiVersion`.
    fn check_type(&mut self, index: usize, probe: &Probe) -> Option<Kind> {
        let name = probe
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map_or_else(String::new, |name| format!(" (`{name}`)"));
        let doc = format!("document #{}{name}", index + 1);
        let (api_version, kind) = (plain_str(probe.api_version.as_ref()), plain_str(probe.kind.as_ref()));
        let known = self.accept.iter().copied().find(|k| Some(k.name()) == kind);

        // A known kind needs its own apiVersion; otherwise any accepted apiVersion is fine here (the
        // kind is wrong anyway), and the kind expected is the one of that apiVersion if any.
        let versions: Vec<&str> = match known {
            Some(k) => vec![k.api_version()],
            None => self.accept.iter().map(|k| k.api_version()).collect(),
        };
        let mut kinds: Vec<&str> =
            self.accept.iter().filter(|k| Some(k.api_version()) == api_version).map(|k| k.name()).collect();
        if kinds.is_empty() {
            kinds = self.accept.iter().map(|k| k.name()).collect();
        }

        let version_ok = api_version.is_some_and(|v| versions.contains(&v));
        let mut ok = true;
        for (field, value, expected, good) in [
            ("apiVersion", &probe.api_version, versions, version_ok),
            ("kind", &probe.kind, kinds, known.is_some()),
        ] {
            if good {
                continue;
            }
            let expected = one_of(&expected);
            let message = match value {
                None | Some(Value::Null) => format!("{doc}: missing {field}, expected {expected}"),
                Some(other) => format!("{doc}: {field} must be {expected}, found {}", describe(other)),
            };
            ok = false;
            let path = [Seg::Key(field.to_owned())];
            let (line, column) = self.locate(index, &path);
            self.push(line, column, field.to_owned(), message);
        }
        if ok { known } else { None }
    }

    /// The kind of a document [`Probe`] could not read: the first `kind` that is an accepted kind,
    /// else the first accepted kind.
    fn guess_kind(&self, index: usize) -> Kind {
        let mut kind = None;
        if let Some((_, doc)) = documents(self.text).nth(index) {
            // The scan fails on the first problem; whatever it saw before is what counts.
            let _ = KindScan(&mut kind).deserialize(doc);
        }
        self.accept.iter().copied().find(|k| kind.as_deref() == Some(k.name())).unwrap_or(self.accept[0])
    }

    fn push_de_error(&mut self, index: usize, err: serde_path_to_error::Error<serde_yaml::Error>) {
        let field = err.path().to_string();
        let inner = err.into_inner();
        let (line, column) = match inner.location() {
            Some(loc) => (loc.line(), loc.column()),
            None => self.locate(index, &[]),
        };
        let message = strip_location(&inner.to_string(), line, column);
        // serde_yaml prefixes messages with its own rendering of the path (of the field or of its
        // parent); it is already in `field`.
        let message = match message.split_once(": ") {
            Some((head, rest))
                if field == head
                    || field.strip_prefix(head).is_some_and(|t| t.starts_with('.') || t.starts_with('[')) =>
            {
                rest.to_owned()
            }
            _ => message,
        };
        self.push(line, column, field, message);
    }

    /// Position of the node at `path` in document `index` (or of its nearest ancestor present in the
    /// text). Re-parses the text, which is fine for error reporting.
    fn locate(&self, index: usize, path: &[Seg]) -> (usize, usize) {
        locate_in(self.text, index, path)
    }
}

/// Position of the node at `path` in document `index` of `text` (or of its nearest ancestor
/// present in the text).
fn locate_in(text: &str, index: usize, path: &[Seg]) -> (usize, usize) {
    let Some((_, doc)) = documents(text).nth(index) else { return (1, 1) };
    match Walk(path).deserialize(doc) {
        Ok(()) => (1, 1),
        Err(err) => err.location().map_or((1, 1), |l| (l.line(), l.column())),
    }
}

fn strip_location(message: &str, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match message.find(&suffix) {
        Some(at) => format!("{}{}", &message[..at], &message[at + suffix.len()..]),
        None => message.to_owned(),
    }
}

/// The string a value is, if it is a plain (untagged) string; `Value::as_str` would also look
/// through tags.
fn plain_str(value: Option<&Value>) -> Option<&str> {
    match value {
        Some(Value::String(s)) => Some(s),
        _ => None,
    }
}

/// `` `a` ``, `` `a` or `b` ``, `` `a`, `b` or `c` ``.
fn one_of(items: &[&str]) -> String {
    let quoted: Vec<String> = items.iter().map(|item| format!("`{item}`")).collect();
    match quoted.split_last() {
        Some((last, rest)) if !rest.is_empty() => format!("{} or {last}", rest.join(", ")),
        _ => quoted.concat(),
    }
}

/// A YAML value as shown in messages.
pub(crate) fn describe(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        Value::Number(n) => format!("`{n}`"),
        Value::Bool(b) => format!("`{b}`"),
        Value::Null => "nothing".to_owned(),
        Value::Sequence(_) => "a sequence".to_owned(),
        Value::Mapping(_) => "a mapping".to_owned(),
        Value::Tagged(t) => format!("a value tagged `{}`", t.tag),
    }
}

/// Records the first string `kind` of a mapping, tolerating what [`Probe`] does not (duplicate
/// keys) up to the first real error.
struct KindScan<'k>(&'k mut Option<String>);

impl<'de> DeserializeSeed<'de> for KindScan<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for KindScan<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a mapping")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        while let Some(key) = map.next_key::<Value>()? {
            if self.0.is_none() && key.as_str() == Some("kind") {
                if let Value::String(kind) = map.next_value::<Value>()? {
                    *self.0 = Some(kind);
                }
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(())
    }
}

/// Line and column (1-based) of the node at `path` in the first YAML document of `text`, or of
/// its nearest ancestor present in the text; (1, 1) if there is none.
#[must_use]
pub fn yaml_position(text: &str, path: &[Seg]) -> (usize, usize) {
    match Walk(path).deserialize(serde_yaml::Deserializer::from_str(text)) {
        Ok(()) => (1, 1),
        Err(e) => e.location().map_or((1, 1), |l| (l.line(), l.column())),
    }
}

/// Walks a document along a path and fails at the node it ends on (or at the deepest node that
/// exists), so that `serde_yaml` attaches that node's position to the error.
struct Walk<'p>(&'p [Seg]);

const FOUND: &str = "located";

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(FOUND)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        if let Some((Seg::Key(want), rest)) = self.0.split_first() {
            while let Some(key) = map.next_key::<Value>()? {
                if key.as_str() == Some(want.as_str()) {
                    return map.next_value_seed(Walk(rest));
                }
                map.next_value::<IgnoredAny>()?;
            }
        }
        Err(de::Error::custom(FOUND))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        if let Some((Seg::Index(want), rest)) = self.0.split_first() {
            for _ in 0..*want {
                if seq.next_element::<IgnoredAny>()?.is_none() {
                    return Err(de::Error::custom(FOUND));
                }
            }
            if seq.next_element_seed(Walk(rest))?.is_some() {
                return Ok(());
            }
        }
        Err(de::Error::custom(FOUND))
    }
}
