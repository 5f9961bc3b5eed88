//! Parsing of multi-document YAML files into validated [`NetworkPolicy`] objects, with every error
//! reported as `file:line:column: field: message`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::{self, DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_yaml::Value;

use crate::api::{API_VERSION, KIND, NetworkPolicy};
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
    /// The file, as given to [`parse_file`].
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
    FileParser { file: path, text, errors: Vec::new() }.run()
}

struct FileParser<'a> {
    file: &'a Path,
    text: &'a str,
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
    fn run(mut self) -> Result<Vec<NetworkPolicy>, Vec<PolicyError>> {
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
                    let message = strip_location(&err.to_string(), line, column);
                    self.push(line, column, ".".to_owned(), format!("invalid YAML: {message}"));
                    break;
                }
            }
            scanned = index + 1;
        }

        // Pass 2: apiVersion and kind, so that other objects get one clear error rather than a
        // cascade of unknown fields.
        let mut candidates = Vec::new();
        for (index, doc) in documents(self.text).take(scanned) {
            if !non_empty.contains(&index) {
                continue;
            }
            match Probe::deserialize(doc) {
                Ok(probe) => {
                    if self.check_type(index, &probe) {
                        candidates.push(index);
                    }
                }
                // Not a mapping, or a duplicated key: the strict pass reports it properly.
                Err(_) => candidates.push(index),
            }
        }

        // Pass 3: strict deserialization and validation.
        let mut policies = Vec::new();
        for (index, doc) in documents(self.text).take(scanned) {
            if !candidates.contains(&index) {
                continue;
            }
            match serde_path_to_error::deserialize::<_, NetworkPolicy>(doc) {
                Ok(policy) => {
                    let found = issues(&policy);
                    if found.is_empty() {
                        policies.push((index, policy));
                    }
                    for Issue { path, message } in found {
                        let (line, column) = self.locate(index, &path);
                        self.push(line, column, path_string(&path), message);
                    }
                }
                Err(err) => self.push_de_error(index, err),
            }
        }

        // Names must be unique per namespace, as in a cluster.
        let mut seen: BTreeMap<(&str, &str), usize> = BTreeMap::new();
        let mut duplicates = Vec::new();
        for (index, policy) in &policies {
            let key = (policy.metadata.namespace.as_str(), policy.metadata.name.as_str());
            if let Some(first) = seen.get(&key) {
                duplicates.push((*index, *first, format!("{}/{}", key.0, key.1)));
            } else {
                seen.insert(key, *index);
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
                    "duplicate NetworkPolicy `{name}` (already defined by document #{} at line {first_line})",
                    first + 1
                ),
            );
        }

        if self.errors.is_empty() {
            Ok(policies.into_iter().map(|(_, policy)| policy).collect())
        } else {
            self.errors.sort_by_key(|e| (e.line, e.column));
            Err(self.errors)
        }
    }

    fn push(&mut self, line: usize, column: usize, field: String, message: String) {
        self.errors.push(PolicyError { file: self.file.to_path_buf(), line, column, field, message });
    }

    /// Checks `apiVersion` and kind; returns whether the document is a `NetworkPolicy`.
    fn check_type(&mut self, index: usize, probe: &Probe) -> bool {
        let name = probe
            .metadata
            .as_ref()
            .and_then(|m| m.get("name"))
            .and_then(Value::as_str)
            .map_or_else(String::new, |name| format!(" (`{name}`)"));
        let doc = format!("document #{}{name}", index + 1);
        let mut ok = true;
        for (field, value, expected) in
            [("apiVersion", &probe.api_version, API_VERSION), ("kind", &probe.kind, KIND)]
        {
            let message = match value {
                None | Some(Value::Null) => format!("{doc}: missing {field}, expected `{expected}`"),
                Some(Value::String(s)) if s == expected => continue,
                Some(other) => {
                    format!("{doc}: {field} must be `{expected}`, found {}", describe(other))
                }
            };
            ok = false;
            let path = [Seg::Key(field.to_owned())];
            let (line, column) = self.locate(index, &path);
            self.push(line, column, field.to_owned(), message);
        }
        ok
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
        let Some((_, doc)) = documents(self.text).nth(index) else { return (1, 1) };
        match Walk(path).deserialize(doc) {
            Ok(()) => (1, 1),
            Err(err) => err.location().map_or((1, 1), |l| (l.line(), l.column())),
        }
    }
}

fn strip_location(message: &str, line: usize, column: usize) -> String {
    let suffix = format!(" at line {line} column {column}");
    match message.find(&suffix) {
        Some(at) => format!("{}{}", &message[..at], &message[at + suffix.len()..]),
        None => message.to_owned(),
    }
}

fn describe(value: &Value) -> String {
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
