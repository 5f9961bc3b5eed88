//! The lab file (`ztseg lab ... -f LAB.yaml`): simulated hosts, namespaces, pods, the ports
//! every pod serves, the policy files to apply, and optionally the expected reachability.
//! See `docs/lab.md` for the format.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

/// Each path that is a file, and every `.yaml`/`.yml` file of each directory (sorted).
pub fn yaml_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(p)
                .with_context(|| format!("reading {}", p.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            files.sort();
            out.extend(files);
        } else {
            out.push(p.clone());
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct LabFile {
    /// Lab name (default: the file name without extension). Names its namespaces and pins.
    #[serde(default)]
    pub name: Option<String>,
    /// Simulated hosts; each runs its own enforcer instance. Default: one host `node1`.
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceSpec>,
    pub pods: Vec<PodSpec>,
    /// Ports every pod serves, over every protocol in `protocols`.
    pub ports: Vec<u16>,
    /// Protocols served and probed (TCP, UDP, SCTP). Default: TCP and UDP.
    #[serde(default = "default_protocols")]
    pub protocols: Vec<String>,
    /// Policy files or directories (relative to the lab file).
    #[serde(default)]
    pub policies: Vec<PathBuf>,
    /// Per-probe timeout in milliseconds (default 1000).
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// Expected reachability, one truth table per port and protocol.
    #[serde(default)]
    pub expect: Vec<Expectation>,
    /// Run a controller: policies are applied at the controller and distributed to every
    /// host's enforcer over mTLS (each host enrolls with a one-time join token).
    #[serde(default)]
    pub controller: bool,
}

fn default_protocols() -> Vec<String> {
    vec!["TCP".into(), "UDP".into()]
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NamespaceSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct PodSpec {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Host the pod runs on (default: the first host).
    #[serde(default)]
    pub host: Option<String>,
    /// Tenant name; pods of different tenants are isolated unless an admin rule allows it.
    #[serde(default)]
    pub tenant: Option<String>,
    /// Named container ports this pod declares besides the `serve-<port>-<proto>` ones every
    /// pod has, for policies' named ports; each must be a port and protocol the lab serves.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_ports: Vec<ContainerPortSpec>,
}

/// A named container port of one pod.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ContainerPortSpec {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_tcp")]
    pub protocol: String,
}

/// The name of the container port every pod declares for a served port and protocol, as in
/// the upstream network-policy e2e model.
#[must_use]
pub fn serve_port_name(port: u16, protocol: &str) -> String {
    format!("serve-{port}-{}", protocol.to_lowercase())
}

fn default_namespace() -> String {
    "default".into()
}

/// A truth table: rows are sources, columns destinations (`namespace/pod`), `.` allowed,
/// `X` blocked. The first row lists the columns after a placeholder.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expectation {
    pub port: u16,
    #[serde(default = "default_tcp")]
    pub protocol: String,
    pub table: String,
}

fn default_tcp() -> String {
    "TCP".into()
}

impl LabFile {
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
        let de = serde_yaml::Deserializer::from_str(&text);
        let mut lab: LabFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let loc =
                e.inner().location().map(|l| format!("{}:{}", l.line(), l.column())).unwrap_or_default();
            anyhow::anyhow!("{}:{loc}: {}: {}", path.display(), e.path(), e.inner())
        })?;
        if lab.name.is_none() {
            lab.name = path.file_stem().map(|s| s.to_string_lossy().into_owned());
        }
        if lab.hosts.is_empty() {
            lab.hosts.push("node1".into());
        }
        lab.validate(path)?;
        Ok(lab)
    }

    #[must_use]
    pub fn name(&self) -> &str {
        self.name.as_deref().unwrap_or("lab")
    }

    fn validate(&self, path: &Path) -> Result<()> {
        let name = self.name();
        if name.is_empty() || name.len() > 12 || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            bail!("{}: name: {name:?} must be 1-12 characters of [A-Za-z0-9-]", path.display());
        }
        if self.hosts.len() > 200 {
            bail!("{}: hosts: at most 200 hosts", path.display());
        }
        for (i, n) in self.namespaces.iter().enumerate() {
            for (k, v) in &n.labels {
                ztseg_policy::check_label(k, v)
                    .map_err(|m| anyhow::anyhow!("{}: namespaces[{i}].labels.{k}: {m}", path.display()))?;
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, p) in self.pods.iter().enumerate() {
            for (k, v) in &p.labels {
                ztseg_policy::check_label(k, v)
                    .map_err(|m| anyhow::anyhow!("{}: pods[{i}].labels.{k}: {m}", path.display()))?;
            }
            if !seen.insert((p.namespace.clone(), p.name.clone())) {
                bail!("{}: pods[{i}]: duplicate pod {}/{}", path.display(), p.namespace, p.name);
            }
            if let Some(h) = &p.host
                && !self.hosts.contains(h)
            {
                bail!("{}: pods[{i}].host: unknown host {h:?} (hosts: {:?})", path.display(), self.hosts);
            }
            if !self.namespaces.iter().any(|n| n.name == p.namespace) && p.namespace != "default" {
                bail!("{}: pods[{i}].namespace: namespace {:?} is not declared", path.display(), p.namespace);
            }
        }
        let per_host = self.hosts.iter().map(|h| self.pods.iter().filter(|p| self.host_of(p) == h).count());
        if per_host.clone().any(|n| n > 250) {
            bail!("{}: pods: at most 250 pods per host", path.display());
        }
        for (i, proto) in self.protocols.iter().enumerate() {
            if !matches!(proto.as_str(), "TCP" | "UDP" | "SCTP") {
                bail!("{}: protocols[{i}]: {proto:?} is not probed (TCP, UDP, SCTP)", path.display());
            }
        }
        if self.ports.contains(&0) {
            bail!("{}: ports: port 0 cannot be served", path.display());
        }
        for (i, p) in self.pods.iter().enumerate() {
            self.validate_container_ports(p)
                .map_err(|e| anyhow::anyhow!("{}: pods[{i}].{e}", path.display()))?;
        }
        Ok(())
    }

    fn validate_container_ports(&self, pod: &PodSpec) -> Result<()> {
        let mut names = std::collections::BTreeSet::new();
        for (j, cp) in pod.container_ports.iter().enumerate() {
            ztseg_policy::check_port_name(&cp.name)
                .map_err(|e| anyhow::anyhow!("containerPorts[{j}].name: {e}"))?;
            if !self.protocols.contains(&cp.protocol) {
                bail!(
                    "containerPorts[{j}].protocol: {:?} is not served in this lab (protocols: {:?})",
                    cp.protocol,
                    self.protocols
                );
            }
            if !self.ports.contains(&cp.port) {
                bail!(
                    "containerPorts[{j}].port: {} is not served in this lab (ports: {:?})",
                    cp.port,
                    self.ports
                );
            }
            let generated =
                self.ports.iter().any(|p| self.protocols.iter().any(|pr| serve_port_name(*p, pr) == cp.name));
            if generated || !names.insert(&cp.name) {
                bail!(
                    "containerPorts[{j}].name: {:?} is already a port name of this pod (every pod has \
                     serve-<port>-<protocol>)",
                    cp.name
                );
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn host_of<'a>(&'a self, p: &'a PodSpec) -> &'a str {
        p.host.as_deref().unwrap_or(&self.hosts[0])
    }

    /// Policy files named by the lab file: each path, or every `.yaml`/`.yml` file of a
    /// directory, sorted.
    pub fn policy_files(&self, lab_path: &Path) -> Result<Vec<PathBuf>> {
        let base = lab_path.parent().unwrap_or(Path::new("."));
        yaml_files(&self.policies.iter().map(|p| base.join(p)).collect::<Vec<_>>())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(pods: &str, protocols: &str) -> Result<LabFile> {
        let text = format!(
            "name: t\nnamespaces: [{{name: x}}]\npods:\n{pods}ports: [80, 81]\nprotocols: {protocols}\n"
        );
        let dir = std::env::temp_dir().join(format!("ztseg-labspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir
            .join(format!("{:016x}.yaml", text.bytes().fold(0u64, |h, b| h.rotate_left(5) ^ u64::from(b))));
        std::fs::write(&path, text).unwrap();
        let lab = LabFile::load(&path);
        let _ = std::fs::remove_file(&path);
        lab
    }

    #[test]
    fn pods_declare_named_ports_of_served_ports() {
        let lab = load(
            "  - {name: a, namespace: x, containerPorts: [{name: web, port: 81}, {name: dns, port: 80, protocol: UDP}]}\n  - {name: b, namespace: x}\n",
            "[TCP, UDP, SCTP]",
        )
        .unwrap();
        let want = vec![
            ContainerPortSpec { name: "web".into(), port: 81, protocol: "TCP".into() },
            ContainerPortSpec { name: "dns".into(), port: 80, protocol: "UDP".into() },
        ];
        assert_eq!(lab.pods[0].container_ports, want);
        assert!(lab.pods[1].container_ports.is_empty());
        assert_eq!(serve_port_name(80, "SCTP"), "serve-80-sctp");
    }

    #[test]
    fn named_ports_are_checked() {
        for (ports, protocols, error) in [
            ("[{name: Web, port: 80}]", "[TCP]", "pods[0].containerPorts[0].name: invalid port name `Web`"),
            ("[{name: web, port: 82}]", "[TCP]", "pods[0].containerPorts[0].port: 82 is not served"),
            (
                "[{name: web, port: 80, protocol: UDP}]",
                "[TCP]",
                "pods[0].containerPorts[0].protocol: \"UDP\"",
            ),
            (
                "[{name: web, port: 80}, {name: web, port: 81}]",
                "[TCP]",
                "pods[0].containerPorts[1].name: \"web\"",
            ),
            ("[{name: serve-80-tcp, port: 81}]", "[TCP]", "pods[0].containerPorts[0].name: \"serve-80-tcp\""),
        ] {
            let e = load(&format!("  - {{name: a, namespace: x, containerPorts: {ports}}}\n"), protocols)
                .unwrap_err()
                .to_string();
            assert!(e.contains(error), "{ports}: {e}");
        }
        let e = load("  - {name: a, namespace: x}\n", "[TCP, ICMP]").unwrap_err().to_string();
        assert!(e.contains("protocols[1]: \"ICMP\" is not probed (TCP, UDP, SCTP)"), "{e}");
    }

    #[test]
    fn labels_follow_kubernetes_label_syntax() {
        let dir = std::env::temp_dir().join(format!("ztseg-labspec-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lab.yaml");
        let load = |pods: &str| {
            std::fs::write(
                &file,
                format!("namespaces: [{{name: x, labels: {{ns: x}}}}]\npods:\n{pods}ports: [80]\n"),
            )
            .unwrap();
            LabFile::load(&file).map(drop).map_err(|e| e.to_string())
        };
        assert_eq!(load("  - {name: a, namespace: x, labels: {app: web, example.com/tier: ''}}\n"), Ok(()));
        let e = load("  - {name: a, namespace: x, labels: {app: web}}\n  - {name: b, labels: {'a b': x}}\n")
            .unwrap_err();
        assert!(e.contains("pods[1].labels.a b: invalid label key `a b`"), "{e}");
        let e = load("  - {name: a, labels: {app: web_}}\n").unwrap_err();
        assert!(e.contains("pods[0].labels.app: invalid label value `web_`"), "{e}");
        let _ = std::fs::remove_dir_all(dir);
    }
}
