//! `ztseg policy validate` checks the files it is given as one set, the way an enforcer loading
//! them does: errors across files and the enforcer's own limits are reported with file,
//! position and field, like parse errors.

use std::{path::PathBuf, process::Command};

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";
const TP: &str = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\n";

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Self {
        let d = std::env::temp_dir().join(format!("ztseg-validate-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Self(d)
    }

    fn write(&self, name: &str, text: &str) {
        std::fs::write(self.0.join(name), text).unwrap();
    }

    /// (success, stdout, stderr)
    fn validate(&self) -> (bool, String, String) {
        let out = Command::new(env!("CARGO_BIN_EXE_ztseg"))
            .args(["policy", "validate"])
            .arg(&self.0)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn errors_across_files_are_reported_with_file_and_position() {
    let d = Dir::new("cross");
    d.write("a.yaml", &format!("{NP}metadata: {{name: web, namespace: prod}}\nspec:\n  podSelector: {{}}\n"));
    d.write(
        "b.yaml",
        &format!("{NP}metadata: {{name: web, namespace: prod}}\nspec:\n  podSelector: {{matchLabels: {{app: x}}}}\n"),
    );
    let tenant = |name: &str| {
        format!(
            "{TP}metadata: {{name: {name}}}\nspec:\n  priority: 1\n  action: Allow\n  from: {{tenant: acme}}\n  to: {{tenant: globex}}\n"
        )
    };
    d.write("c.yaml", &tenant("first"));
    d.write("d.yaml", &tenant("second"));
    let (ok, _, err) = d.validate();
    assert!(!ok, "{err}");
    let b = d.0.join("b.yaml").display().to_string();
    let dd = d.0.join("d.yaml").display().to_string();
    assert!(
        err.contains(&format!("{b}:3:")) && err.contains("metadata.name: duplicate NetworkPolicy `prod/web`"),
        "{err}"
    );
    assert!(
        err.contains(&format!("{dd}:")) && err.contains("TenantPolicy `second` and TenantPolicy `first`"),
        "{err}"
    );
    assert!(err.contains("2 errors"), "{err}");
    // Each file alone is valid.
    let single = Dir::new("single");
    single.write(
        "a.yaml",
        &format!("{NP}metadata: {{name: web, namespace: prod}}\nspec:\n  podSelector: {{}}\n"),
    );
    let (ok, out, err) = single.validate();
    assert!(ok && out.contains("1 policies in 1 files: valid"), "{out}{err}");
}

#[test]
fn port_ranges_are_valid_at_any_width_and_inverted_ones_are_reported() {
    let d = Dir::new("range");
    let range = |from: u32, to: u32| {
        format!(
            "{NP}metadata: {{name: wide, namespace: prod}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - port: {from}\n      endPort: {to}\n"
        )
    };
    d.write("wide.yaml", &range(1024, 65_535));
    let (ok, out, err) = d.validate();
    assert!(ok && out.contains("valid"), "{out}{err}");
    d.write("wide.yaml", &range(2000, 1999));
    let (ok, _, err) = d.validate();
    assert!(!ok, "{err}");
    let f = d.0.join("wide.yaml").display().to_string();
    assert!(err.contains(&format!("{f}:9:16: spec.ingress[0].ports[0].endPort: must be greater")), "{err}");
}
