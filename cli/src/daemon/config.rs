//! Enforcer daemon configuration: TOML file, `ZTSEG_*` environment overrides, validation.
//! A bad configuration is reported with the field that is wrong and exits with code 64.
//! The annotated example is `docs/enforcer.example.toml`.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
};

use serde::Deserialize;

pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/ztseg";
pub const DEFAULT_SOCKET: &str = "/run/ztseg/enforcer.sock";
pub const DEFAULT_METRICS_ADDR: &str = "127.0.0.1:9464";
pub const DEFAULT_POLICY_DIR: &str = "/etc/ztseg/policies";
pub const DEFAULT_STATE_DIR: &str = "/var/lib/ztseg";
/// Prefix of every environment override (`ZTSEG_PIN_DIR`, `ZTSEG_SOCKET`, ...).
pub const ENV_PREFIX: &str = "ZTSEG_";

/// A configuration error: which field, what is wrong.
#[derive(Debug, thiserror::Error)]
#[error("{source_name}: {field}: {message}")]
pub struct ConfigError {
    pub source_name: String,
    pub field: String,
    pub message: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name of this host; workloads with `node` equal to it (or no node) are local.
    #[serde(default = "default_node")]
    pub node: String,
    #[serde(default = "default_pin_dir")]
    pub pin_dir: PathBuf,
    #[serde(default = "default_socket")]
    pub socket: PathBuf,
    #[serde(default = "default_metrics_addr")]
    pub metrics_addr: SocketAddr,
    #[serde(default = "default_policy_dir")]
    pub policy_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    pub state_dir: PathBuf,
    /// How often the policy directory is checked for changes.
    #[serde(default = "default_poll")]
    pub policy_poll_ms: u64,
    /// Network namespace to enter before attaching (lab hosts), e.g. /run/netns/host1.
    #[serde(default)]
    pub netns: Option<PathBuf>,
    /// `tcp/22`-style ports that always pass (management access).
    #[serde(default)]
    pub failsafe: Vec<String>,
    #[serde(default)]
    pub namespaces: Vec<NamespaceConfig>,
    #[serde(default)]
    pub workloads: Vec<WorkloadConfig>,
    /// Take policy from a controller instead of `policy_dir`.
    #[serde(default)]
    pub controller: Option<ControllerConfig>,
    /// Map sizes, used when the pin directory's maps are created.
    #[serde(default)]
    pub maps: MapsConfig,
    /// Hand packets between two local workloads straight to the receiver's namespace when
    /// the host would route them there (both checks still apply; the host's netfilter
    /// forwarding hooks are skipped for such flows). Applied at every start.
    #[serde(default = "default_true")]
    pub local_delivery: bool,
    /// Events (drops, audits, new allowed flows) each workload may emit per second on each
    /// CPU; 0: no limit at all. Beyond it events are counted as suppressed instead of read, so
    /// a drop flood costs this daemon and the controller a bounded amount of work, and one
    /// workload's flood does not hide another's events. Packets are judged and counted as
    /// always. Applied at every start.
    #[serde(default = "default_event_rate_limit")]
    pub event_rate_limit: u32,
    /// Events a workload may emit on a CPU back to back after a quiet spell.
    #[serde(default = "default_event_burst")]
    pub event_burst: u32,
    /// Events all workloads together may emit per second on each CPU; 0: no total limit.
    #[serde(default = "default_event_rate_limit_total")]
    pub event_rate_limit_total: u32,
    /// Events all workloads together may emit on a CPU back to back.
    #[serde(default = "default_event_burst_total")]
    pub event_burst_total: u32,
    /// `ZTSEG_*` environment variables that are neither an override nor a variable of the
    /// `ztseg` CLI: ignored, and named in a warning at start.
    #[serde(skip)]
    pub unknown_env: Vec<String>,
}

fn default_event_rate_limit() -> u32 {
    10_000
}
fn default_event_burst() -> u32 {
    20_000
}
fn default_event_rate_limit_total() -> u32 {
    40_000
}
fn default_event_burst_total() -> u32 {
    80_000
}

impl Config {
    /// The data plane's event rate limit from `event_rate_limit`, `event_burst` and their
    /// `_total` counterparts.
    #[must_use]
    pub fn event_limit(&self) -> Option<enforcer::EventRateLimit> {
        (self.event_rate_limit != 0).then_some(enforcer::EventRateLimit {
            per_cpu_per_sec: self.event_rate_limit,
            burst: self.event_burst,
            total_per_cpu_per_sec: self.event_rate_limit_total,
            total_burst: self.event_burst_total,
        })
    }
}

/// `[maps]`: capacities of the data plane's maps. They take effect when the maps are created
/// (first start on a pin directory); pinned maps keep their size across restarts, so resizing
/// means `ztseg enforcer uninstall` first.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapsConfig {
    /// Tenant-tier policy entries (keys) over all rules and grants.
    #[serde(default = "default_policy_entries")]
    pub policy_entries: u32,
    /// Rules and grants installed at once.
    #[serde(default = "default_rule_slots")]
    pub rule_slots: u32,
    /// Tracked flows, for IPv4 and again for IPv6.
    #[serde(default = "default_conntrack_entries")]
    pub conntrack_entries: u32,
    /// Addresses with a known identity (workloads on every host).
    #[serde(default = "default_identity_entries")]
    pub identity_entries: u32,
    /// Port-range keys: one per (local workload, peer, protocol, direction) with ranges.
    #[serde(default = "default_range_entries")]
    pub range_entries: u32,
}

impl Default for MapsConfig {
    fn default() -> Self {
        Self {
            policy_entries: default_policy_entries(),
            rule_slots: default_rule_slots(),
            conntrack_entries: default_conntrack_entries(),
            identity_entries: default_identity_entries(),
            range_entries: default_range_entries(),
        }
    }
}

impl MapsConfig {
    /// Largest accepted size of any map: 16 Mi entries (gigabytes of kernel memory beyond).
    pub const MAX_ENTRIES: u32 = 1 << 24;

    #[must_use]
    pub fn options(&self) -> enforcer::DatapathOptions {
        enforcer::DatapathOptions {
            policy_entries: self.policy_entries,
            rule_slots: self.rule_slots,
            conntrack_entries: self.conntrack_entries,
            identity_entries: self.identity_entries,
            range_entries: self.range_entries,
            ..enforcer::DatapathOptions::default()
        }
    }

    fn fields(&self) -> [(&'static str, u32, u32); 5] {
        // (field, value, minimum)
        [
            ("policy_entries", self.policy_entries, 64),
            ("rule_slots", self.rule_slots, 64),
            ("conntrack_entries", self.conntrack_entries, 1024),
            ("identity_entries", self.identity_entries, 64),
            ("range_entries", self.range_entries, 64),
        ]
    }
}

fn default_policy_entries() -> u32 {
    enforcer::DatapathOptions::default().policy_entries
}
fn default_rule_slots() -> u32 {
    enforcer::DatapathOptions::default().rule_slots
}
fn default_conntrack_entries() -> u32 {
    enforcer::DatapathOptions::default().conntrack_entries
}
fn default_identity_entries() -> u32 {
    enforcer::DatapathOptions::default().identity_entries
}
fn default_range_entries() -> u32 {
    enforcer::DatapathOptions::default().range_entries
}

/// `[controller]`: where the controller is and which enrolled identity to use.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControllerConfig {
    /// `host:port` of the controller (any controller of an HA set).
    pub endpoint: String,
    /// Directory with `ca.pem`, `<identity>.pem`, `<identity>-key.pem` (from `ztseg enroll`).
    pub identity_dir: PathBuf,
    /// File stem of the identity; default: the node name.
    #[serde(default)]
    pub identity: Option<String>,
    /// Forward denied flows to the controller's audit log (folded per second).
    #[serde(default = "default_true")]
    pub report_denied: bool,
}

fn default_true() -> bool {
    true
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceConfig {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    #[default]
    Enforce,
    Audit,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadConfig {
    pub name: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub tenant: Option<String>,
    /// Host this workload runs on (default: this node).
    #[serde(default)]
    pub node: Option<String>,
    /// Host-side interface of a local workload (TC attachment).
    #[serde(default)]
    pub interface: Option<String>,
    /// cgroup v2 directory of a local workload (cgroup attachment).
    #[serde(default)]
    pub cgroup: Option<PathBuf>,
    #[serde(default)]
    pub ipv4: Option<Ipv4Addr>,
    #[serde(default)]
    pub ipv6: Option<Ipv6Addr>,
    #[serde(default)]
    pub mode: Mode,
    /// Named container ports, for `NetworkPolicy` named ports.
    #[serde(default)]
    pub ports: Vec<PortConfig>,
}

#[derive(Debug, Clone, Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct PortConfig {
    pub name: String,
    pub port: u16,
    #[serde(default = "default_protocol")]
    pub protocol: ztseg_policy::Protocol,
}

fn default_protocol() -> ztseg_policy::Protocol {
    ztseg_policy::Protocol::Tcp
}

fn default_node() -> String {
    "node1".into()
}
fn default_pin_dir() -> PathBuf {
    DEFAULT_PIN_DIR.into()
}
fn default_socket() -> PathBuf {
    DEFAULT_SOCKET.into()
}
fn default_metrics_addr() -> SocketAddr {
    DEFAULT_METRICS_ADDR.parse().unwrap_or_else(|_| SocketAddr::from(([127, 0, 0, 1], 9464)))
}
fn default_policy_dir() -> PathBuf {
    DEFAULT_POLICY_DIR.into()
}
fn default_state_dir() -> PathBuf {
    DEFAULT_STATE_DIR.into()
}
fn default_poll() -> u64 {
    1000
}
fn default_namespace() -> String {
    "default".into()
}

impl WorkloadConfig {
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

impl Config {
    /// Read `path`, apply `ZTSEG_*` overrides from `env`, validate. Other `ZTSEG_*` variables
    /// do not stop the daemon: those the `ztseg` CLI reads (`ZTSEG_CONTROLLER`,
    /// `ZTSEG_IDENTITY_DIR`, ...) are ignored, any other one is listed in
    /// [`Config::unknown_env`].
    pub fn load(path: &Path, env: impl Iterator<Item = (String, String)>) -> Result<Self, ConfigError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source_name: name.clone(),
            field: "-".into(),
            message: format!("cannot read: {e}"),
        })?;
        let mut value: toml::Table = toml::from_str(&text).map_err(|e| ConfigError {
            source_name: name.clone(),
            field: "-".into(),
            message: e.to_string(),
        })?;
        let mut unknown_env = Vec::new();
        let mut client_vars = None;
        for (k, v) in env {
            let Some(key) = k.strip_prefix(ENV_PREFIX) else { continue };
            let key = key.to_ascii_lowercase();
            let typed = match key.as_str() {
                "node" | "pin_dir" | "socket" | "metrics_addr" | "policy_dir" | "state_dir" | "netns" => {
                    toml::Value::String(v)
                }
                "controller_endpoint" | "controller_identity_dir" => {
                    let field = key.trim_start_matches("controller_").to_owned();
                    let t =
                        value.entry("controller").or_insert_with(|| toml::Value::Table(toml::Table::new()));
                    if let toml::Value::Table(t) = t {
                        t.insert(field, toml::Value::String(v));
                    }
                    continue;
                }
                "local_delivery" => toml::Value::Boolean(match v.as_str() {
                    "true" | "1" => true,
                    "false" | "0" => false,
                    _ => {
                        return Err(ConfigError {
                            source_name: format!("environment {k}"),
                            field: key.clone(),
                            message: format!("{v:?} is not true or false"),
                        });
                    }
                }),
                "policy_poll_ms"
                | "event_rate_limit"
                | "event_burst"
                | "event_rate_limit_total"
                | "event_burst_total" => toml::Value::Integer(v.parse().map_err(|_| ConfigError {
                    source_name: format!("environment {k}"),
                    field: key.clone(),
                    message: format!("{v:?} is not a number"),
                })?),
                _ => {
                    if !client_vars.get_or_insert_with(crate::cli::client_env_vars).contains(&k) {
                        unknown_env.push(k);
                    }
                    continue;
                }
            };
            value.insert(key, typed);
        }
        let mut cfg: Config =
            serde_path_to_error::deserialize(toml::Value::Table(value)).map_err(|e| ConfigError {
                source_name: name.clone(),
                field: e.path().to_string(),
                message: e.inner().to_string(),
            })?;
        cfg.validate(&name)?;
        unknown_env.sort();
        cfg.unknown_env = unknown_env;
        Ok(cfg)
    }

    /// Validate as [`Self::load`] does (used for workloads added at run time).
    pub fn check(&self) -> Result<(), ConfigError> {
        self.validate("workload")
    }

    fn validate(&self, name: &str) -> Result<(), ConfigError> {
        let err = |field: String, message: String| ConfigError { source_name: name.into(), field, message };
        for (field, rate, burst, burst_field) in [
            ("event_rate_limit", self.event_rate_limit, self.event_burst, "event_burst"),
            (
                "event_rate_limit_total",
                self.event_rate_limit_total,
                self.event_burst_total,
                "event_burst_total",
            ),
        ] {
            if rate > 1_000_000_000 {
                return Err(err(field.into(), "at most 1000000000 events per second per CPU".into()));
            }
            if rate != 0 && burst == 0 {
                return Err(err(burst_field.into(), format!("must be at least 1 while {field} is set")));
            }
        }
        if let Some(c) = &self.controller {
            if c.endpoint.is_empty() {
                return Err(err("controller.endpoint".into(), "must be host:port".into()));
            }
            let id = c.identity.clone().unwrap_or_else(|| self.node.clone());
            for f in ["ca.pem".to_owned(), format!("{id}.pem"), format!("{id}-key.pem")] {
                if !c.identity_dir.join(&f).exists() {
                    return Err(err(
                        "controller.identity_dir".into(),
                        format!("{} has no {f} (enroll with `ztseg enroll`)", c.identity_dir.display()),
                    ));
                }
            }
        }
        if self.policy_poll_ms == 0 {
            return Err(err("policy_poll_ms".into(), "must be at least 1".into()));
        }
        for (field, value, min) in self.maps.fields() {
            if !(min..=MapsConfig::MAX_ENTRIES).contains(&value) {
                return Err(err(
                    format!("maps.{field}"),
                    format!("{value} is outside {min}..={}", MapsConfig::MAX_ENTRIES),
                ));
            }
        }
        for (i, f) in self.failsafe.iter().enumerate() {
            parse_failsafe(f).map_err(|m| err(format!("failsafe[{i}]"), m))?;
        }
        if self.failsafe.len() > enforcer_common::MAX_FAILSAFE {
            return Err(err("failsafe".into(), format!("at most {} entries", enforcer_common::MAX_FAILSAFE)));
        }
        // Identities and tenant numbers are hashes of names: refuse a collision rather than
        // merge two workloads or two tenants.
        let mut ids = std::collections::BTreeMap::new();
        let mut tenants = std::collections::BTreeMap::new();
        for (i, w) in self.workloads.iter().enumerate() {
            if let Some(other) = ids.insert(identity_of(&w.id()), w.id())
                && other != w.id()
            {
                return Err(err(
                    format!("workloads[{i}].name"),
                    format!("identity of {} collides with {other}; rename one", w.id()),
                ));
            }
            if let Some(t) = &w.tenant
                && let Some(other) = tenants.insert(tenant_of(Some(t)), t.clone())
                && other != *t
            {
                return Err(err(
                    format!("workloads[{i}].tenant"),
                    format!("tenant {t:?} collides with {other:?}; rename one"),
                ));
            }
        }
        self.check_labels(name)?;
        let mut seen = std::collections::BTreeSet::new();
        for (i, w) in self.workloads.iter().enumerate() {
            let f = |s: &str| format!("workloads[{i}].{s}");
            if !seen.insert(w.id()) {
                return Err(err(f("name"), format!("duplicate workload {}", w.id())));
            }
            if w.ipv4.is_none() && w.ipv6.is_none() && w.cgroup.is_none() {
                return Err(err(f("ipv4"), "a workload needs an address (ipv4 or ipv6) or a cgroup".into()));
            }
            if self.is_local(w) {
                if w.interface.is_none() && w.cgroup.is_none() {
                    return Err(err(
                        f("interface"),
                        "a local workload needs an interface or a cgroup".into(),
                    ));
                }
                if w.interface.is_some() && w.cgroup.is_some() {
                    return Err(err(f("cgroup"), "set interface or cgroup, not both".into()));
                }
            }
            if w.namespace != "default" && !self.namespaces.iter().any(|n| n.name == w.namespace) {
                return Err(err(f("namespace"), format!("namespace {:?} is not declared", w.namespace)));
            }
        }
        Ok(())
    }

    /// Namespace and workload labels follow Kubernetes label syntax.
    fn check_labels(&self, name: &str) -> Result<(), ConfigError> {
        let namespaces =
            self.namespaces.iter().enumerate().map(|(i, n)| (format!("namespaces[{i}]"), &n.labels));
        let workloads =
            self.workloads.iter().enumerate().map(|(i, w)| (format!("workloads[{i}]"), &w.labels));
        for (at, labels) in namespaces.chain(workloads) {
            for (k, v) in labels {
                ztseg_policy::check_label(k, v).map_err(|message| ConfigError {
                    source_name: name.into(),
                    field: format!("{at}.labels.{k}"),
                    message,
                })?;
            }
        }
        Ok(())
    }

    #[must_use]
    pub fn is_local(&self, w: &WorkloadConfig) -> bool {
        w.node.as_deref().is_none_or(|n| n == self.node)
    }
}

/// `tcp/22` → (protocol number, port).
pub fn parse_failsafe(s: &str) -> Result<(u8, u16), String> {
    let (proto, port) =
        s.split_once('/').ok_or_else(|| format!("{s:?}: expected PROTOCOL/PORT, e.g. tcp/22"))?;
    let proto = match proto.to_ascii_lowercase().as_str() {
        "tcp" => enforcer_common::IPPROTO_TCP,
        "udp" => enforcer_common::IPPROTO_UDP,
        "sctp" => enforcer_common::IPPROTO_SCTP,
        other => return Err(format!("{other:?} is not tcp, udp or sctp")),
    };
    let port: u16 = port.parse().map_err(|_| format!("{port:?} is not a port"))?;
    if port == 0 {
        return Err("port 0".into());
    }
    Ok((proto, port))
}

/// Stable identity of a workload, the same on every host and across restarts.
#[must_use]
pub fn identity_of(id: &str) -> u32 {
    enforcer_common::IDENTITY_FIRST_USER + (fnv1a(id) % (1 << 30))
}

/// Stable tenant number of a tenant name (0 = no tenant).
#[must_use]
pub fn tenant_of(name: Option<&str>) -> u32 {
    name.map_or(0, |t| 1 + fnv1a(t) % (1 << 30))
}

pub(crate) fn fnv1a(s: &str) -> u32 {
    s.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = std::env::temp_dir().join(format!("ztseg-cfg-{}-{}", std::process::id(), fnv1a(text)));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("enforcer.toml");
        std::fs::write(&p, text).unwrap();
        Config::load(&p, env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
    }

    #[test]
    fn example_config_is_valid() {
        let text = include_str!("../../../docs/enforcer.example.toml");
        let cfg = load(text, &[]).unwrap();
        assert_eq!(cfg.workloads.len(), 3);
        assert!(cfg.is_local(&cfg.workloads[0]));
        assert!(!cfg.is_local(&cfg.workloads[2]));
    }

    #[test]
    fn map_sizes_are_configured_and_checked() {
        let cfg = load("[maps]\nconntrack_entries = 1048576\npolicy_entries = 200000\n", &[]).unwrap();
        let o = cfg.maps.options();
        assert_eq!((o.conntrack_entries, o.policy_entries), (1_048_576, 200_000));
        assert_eq!(o.rule_slots, enforcer::DatapathOptions::default().rule_slots);
        let e = load("[maps]\nconntrack_entries = 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "maps.conntrack_entries", "{e}");
        let e = load("[maps]\nrule_slots = 99999999\n", &[]).unwrap_err();
        assert_eq!(e.field, "maps.rule_slots", "{e}");
        assert!(e.message.contains("99999999"), "{e}");
        let e = load("[maps]\nconntrack = 5\n", &[]).unwrap_err();
        assert!(e.to_string().contains("conntrack"), "{e}");
        let e = load("[maps]\npolicy_entries = -1\n", &[]).unwrap_err();
        assert!(e.field.contains("policy_entries"), "{e}");
    }

    #[test]
    fn errors_name_the_field() {
        let e = load("pin_dirr = \"/x\"\n", &[]).unwrap_err();
        assert!(e.to_string().contains("pin_dirr"), "{e}");
        let e =
            load("[[workloads]]\nname = \"a\"\nipv4 = \"10.0.0.300\"\ninterface = \"v\"\n", &[]).unwrap_err();
        assert_eq!(e.field, "workloads[0].ipv4", "{e}");
        let e = load("[[workloads]]\nname = \"a\"\nipv4 = \"10.0.0.3\"\n", &[]).unwrap_err();
        assert_eq!(e.field, "workloads[0].interface", "{e}");
        let e = load("failsafe = [\"tcp/x\"]\n", &[]).unwrap_err();
        assert_eq!(e.field, "failsafe[0]", "{e}");
        let e = load("", &[("ZTSEG_POLICY_POLL_MS", "soon")]).unwrap_err();
        assert_eq!(e.field, "policy_poll_ms", "{e}");
        let e = load("", &[("ZTSEG_LOCAL_DELIVERY", "maybe")]).unwrap_err();
        assert_eq!(e.field, "local_delivery", "{e}");
        let e = load("local_delivery = \"yes\"\n", &[]).unwrap_err();
        assert_eq!(e.field, "local_delivery", "{e}");
    }

    #[test]
    fn event_rate_limit_defaults_and_overrides() {
        let c = load("", &[]).unwrap();
        assert_eq!(
            c.event_limit(),
            Some(enforcer::EventRateLimit {
                per_cpu_per_sec: 10_000,
                burst: 20_000,
                total_per_cpu_per_sec: 40_000,
                total_burst: 80_000
            })
        );
        let c = load("event_rate_limit = 0\n", &[]).unwrap();
        assert_eq!(c.event_limit(), None);
        let c = load("", &[("ZTSEG_EVENT_RATE_LIMIT", "500"), ("ZTSEG_EVENT_BURST", "7")]).unwrap();
        assert_eq!(
            c.event_limit(),
            Some(enforcer::EventRateLimit {
                per_cpu_per_sec: 500,
                burst: 7,
                total_per_cpu_per_sec: 40_000,
                total_burst: 80_000
            })
        );
        let c = load(
            "event_rate_limit_total = 0\n",
            &[("ZTSEG_EVENT_RATE_LIMIT", "500"), ("ZTSEG_EVENT_BURST_TOTAL", "9")],
        )
        .unwrap();
        let l = c.event_limit().unwrap();
        assert_eq!((l.per_cpu_per_sec, l.total_per_cpu_per_sec, l.total_burst), (500, 0, 9));
        let e = load("event_burst_total = 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "event_burst_total", "{e}");
        let e = load("", &[("ZTSEG_EVENT_RATE_LIMIT_TOTAL", "2000000000")]).unwrap_err();
        assert_eq!(e.field, "event_rate_limit_total", "{e}");
        let e = load("event_burst = 0\n", &[]).unwrap_err();
        assert_eq!(e.field, "event_burst", "{e}");
        let e = load("event_rate_limit = 2000000000\n", &[]).unwrap_err();
        assert_eq!(e.field, "event_rate_limit", "{e}");
        let e = load("", &[("ZTSEG_EVENT_BURST", "many")]).unwrap_err();
        assert_eq!(e.field, "event_burst", "{e}");
        let e = load("event_rate_limit = -1\n", &[]).unwrap_err();
        assert_eq!(e.field, "event_rate_limit", "{e}");
    }

    #[test]
    fn local_delivery_is_on_unless_switched_off() {
        assert!(load("", &[]).unwrap().local_delivery);
        assert!(!load("local_delivery = false\n", &[]).unwrap().local_delivery);
        assert!(!load("", &[("ZTSEG_LOCAL_DELIVERY", "false")]).unwrap().local_delivery);
    }

    #[test]
    fn labels_follow_kubernetes_label_syntax() {
        let w = |labels: &str| {
            format!(
                "[[workloads]]\nname = \"a\"\nipv4 = \"10.0.0.1\"\ninterface = \"v\"\nlabels = {{ {labels} }}\n"
            )
        };
        assert!(load(&w("app = \"web\", \"example.com/tier\" = \"\""), &[]).is_ok());
        let e = load(&w("\"bad key\" = \"x\""), &[]).unwrap_err();
        assert_eq!(e.field, "workloads[0].labels.bad key", "{e}");
        assert!(e.message.contains("invalid label key `bad key`"), "{e}");
        let e = load(&w("app = \"-web\""), &[]).unwrap_err();
        assert_eq!(e.field, "workloads[0].labels.app", "{e}");
        assert!(e.message.contains("invalid label value `-web`"), "{e}");
        let e = load("[[namespaces]]\nname = \"x\"\nlabels = { team = \"a b\" }\n", &[]).unwrap_err();
        assert_eq!(e.field, "namespaces[0].labels.team", "{e}");
    }

    #[test]
    fn other_ztseg_variables_do_not_stop_the_daemon() {
        // Variables of the `ztseg` CLI (a shell set up for it) are ignored silently; anything
        // else is reported, not fatal.
        let cfg = load(
            "",
            &[
                ("ZTSEG_CONTROLLER", "ctl:7443"),
                ("ZTSEG_IDENTITY_DIR", "/etc/ztseg/admin"),
                ("ZTSEG_JOIN_TOKEN", "t"),
                ("ZTSEG_CONTROLLER_DATA_DIR", "/var/lib/ztseg/controller"),
                ("ZTSEG_TEST_TIMEOUT_MIN", "5"),
                ("ZTSEG_BOGUS", "1"),
            ],
        )
        .unwrap();
        assert_eq!(cfg.unknown_env, ["ZTSEG_BOGUS", "ZTSEG_TEST_TIMEOUT_MIN"]);
        // Overrides still apply, and still fail on bad values.
        let cfg = load("", &[("ZTSEG_SOCKET", "/run/x.sock"), ("ZTSEG_CONTROLLER", "ctl:7443")]).unwrap();
        assert_eq!(cfg.socket, PathBuf::from("/run/x.sock"));
        assert!(cfg.unknown_env.is_empty() && cfg.controller.is_none());
    }

    #[test]
    fn environment_overrides_the_file() {
        let cfg =
            load("pin_dir = \"/sys/fs/bpf/a\"\n", &[("ZTSEG_PIN_DIR", "/sys/fs/bpf/b"), ("OTHER", "x")])
                .unwrap();
        assert_eq!(cfg.pin_dir, PathBuf::from("/sys/fs/bpf/b"));
    }

    #[test]
    fn identities_are_stable_and_in_range() {
        assert_eq!(identity_of("prod/web"), identity_of("prod/web"));
        assert_ne!(identity_of("prod/web"), identity_of("prod/db"));
        assert!(identity_of("x/y") >= enforcer_common::IDENTITY_FIRST_USER);
        assert_eq!(tenant_of(None), 0);
        assert!(tenant_of(Some("acme")) >= 1);
    }
}
