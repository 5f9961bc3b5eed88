//! Policy document sets: validation and diffs.

use std::{collections::BTreeMap, fmt::Write as _, path::Path};

/// Largest document the controller accepts (the whole set is bounded by the store).
pub const MAX_DOCUMENT_BYTES: usize = 8 << 20;

/// Check every document's name and content; every error names the document, line, column
/// and field (the policy parser's messages).
/// The documents are checked as one set, the way every enforcer will load them
/// ([`ztseg_policy::parse_set`]: a `NetworkPolicy` defined in two documents, tenant policies of
/// two documents producing one admin key and port ranges the enforcer cannot expand are errors).
pub fn validate(docs: &BTreeMap<String, String>) -> Result<(), Vec<String>> {
    let mut errors = Vec::new();
    let mut set = Vec::new();
    for (name, text) in docs {
        if let Err(e) = check_doc_name(name) {
            errors.push(e);
            continue;
        }
        if text.len() > MAX_DOCUMENT_BYTES {
            errors.push(format!("{name}: {} bytes, more than the limit of {MAX_DOCUMENT_BYTES}", text.len()));
            continue;
        }
        set.push((Path::new(name.as_str()), text.as_str()));
    }
    if let Err(es) = ztseg_policy::parse_set(set) {
        errors.extend(es.iter().map(ToString::to_string));
    }
    if errors.is_empty() { Ok(()) } else { Err(errors) }
}

/// Document names: relative, `/`-separated path segments of `[A-Za-z0-9._-]`, no `..`.
pub fn check_doc_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 253
        && name.split('/').all(|seg| {
            !seg.is_empty()
                && seg != "."
                && seg != ".."
                && seg.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-')
        });
    if ok {
        Ok(())
    } else {
        Err(format!("{name:?}: document names are relative paths of [A-Za-z0-9._-] segments"))
    }
}

/// Unified diff from `old` to `new`, document by document (empty if equal).
#[must_use]
pub fn diff(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let names: std::collections::BTreeSet<&String> = old.keys().chain(new.keys()).collect();
    for n in names {
        let a = old.get(n).map_or("", String::as_str);
        let b = new.get(n).map_or("", String::as_str);
        if a == b {
            continue;
        }
        let from = if old.contains_key(n) { format!("a/{n}") } else { "/dev/null".into() };
        let to = if new.contains_key(n) { format!("b/{n}") } else { "/dev/null".into() };
        // Bounded: two large, wholly different documents fall back to a coarser (still correct)
        // diff instead of holding up the apply.
        let d = similar::TextDiff::configure().timeout(std::time::Duration::from_millis(50)).diff_lines(a, b);
        let _ = write!(out, "{}", d.unified_diff().context_radius(3).header(&from, &to));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[(&str, &str)]) -> BTreeMap<String, String> {
        v.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect()
    }

    #[test]
    fn diff_shows_added_changed_and_removed_documents() {
        let old = set(&[("a.yaml", "x: 1\ny: 2\n"), ("gone.yaml", "z: 1\n")]);
        let new = set(&[("a.yaml", "x: 1\ny: 3\n"), ("new.yaml", "w: 1\n")]);
        let d = diff(&old, &new);
        assert!(d.contains("--- a/a.yaml\n+++ b/a.yaml\n"), "{d}");
        assert!(d.contains("-y: 2\n+y: 3\n"), "{d}");
        assert!(d.contains("--- /dev/null\n+++ b/new.yaml\n"), "{d}");
        assert!(d.contains("--- a/gone.yaml\n+++ /dev/null\n"), "{d}");
        assert_eq!(diff(&old, &old), "");
    }

    #[test]
    fn invalid_documents_are_named_with_position_and_field() {
        let docs = set(&[(
            "prod/web.yaml",
            "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\nspec:\n  podSelector: {}\n  policyTypes: [Sideways]\n",
        )]);
        let e = validate(&docs).unwrap_err();
        assert_eq!(e.len(), 1, "{e:?}");
        assert!(e[0].starts_with("prod/web.yaml:7:"), "{e:?}");
        assert!(e[0].contains("policyTypes"), "{e:?}");
        assert!(validate(&set(&[("../x.yaml", "")])).unwrap_err()[0].contains("relative paths"));
    }
}
