//! Shared helpers of the ztseg benchmarks.

use std::path::Path;

use anyhow::Result;

/// Replace (or append) the section `name` of `docs/benchmarks.md`, delimited by HTML comment
/// markers, so each benchmark rewrites only its own results.
pub fn write_section(root: &Path, name: &str, body: &str) -> Result<()> {
    let path = root.join("docs/benchmarks.md");
    let start = format!("<!-- bench:{name}:start -->");
    let end = format!("<!-- bench:{name}:end -->");
    let mut doc = std::fs::read_to_string(&path).unwrap_or_else(|_| "# Benchmarks\n".to_owned());
    let section = format!("{start}\n{}\n{end}", body.trim_end());
    match (doc.find(&start), doc.find(&end)) {
        (Some(a), Some(b)) if b > a => doc.replace_range(a..b + end.len(), &section),
        _ => {
            if !doc.ends_with('\n') {
                doc.push('\n');
            }
            doc.push('\n');
            doc.push_str(&section);
            doc.push('\n');
        }
    }
    std::fs::write(path, doc)?;
    Ok(())
}

/// Install `count` filler policy keys (rules of up to 1,000 keys each), key `i` made by `key`.
pub fn install_filler(
    w: &mut enforcer::writer::Writer,
    count: u32,
    key: impl Fn(u32) -> enforcer_common::PolicyKey,
) -> Result<()> {
    let mut n = 0u32;
    while n < count {
        let chunk = (count - n).min(1000);
        let keys = (n..n + chunk).map(&key).collect();
        w.install(&enforcer::Rule {
            ranges: Vec::new(),
            keys,
            action: enforcer::writer::Action::Allow,
            ttl: None,
        })?;
        n += chunk;
    }
    Ok(())
}
