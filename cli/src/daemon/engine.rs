//! The enforcer's state and every change to it: workloads, policy, grants. One `Engine` per
//! daemon behind a mutex; the API, the policy poller and the GC loop call into it.
//!
//! Start-up order is fail-closed: programs are attached first (an attached interface with no
//! registered workload drops everything), then workloads are registered, then policy loads.

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
    path::{Path, PathBuf},
    time::{Duration, SystemTime},
};

use anyhow::{Context as _, Result, bail};
use enforcer::{Datapath, Rule, TcHook, Workload, writer::Action};
use enforcer_common::{
    DIR_EGRESS, DIR_INGRESS, IDENTITY_HOST, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, TENANT_NONE,
};
use serde::{Deserialize, Serialize};

use super::{
    config::{Config, Mode, WorkloadConfig, identity_of, parse_failsafe, tenant_of},
    log,
};
use crate::compile::{self, AdminSync};

/// A grant request overlapping a live grant.
#[derive(Debug, thiserror::Error)]
#[error("{key:?} is already granted (grant {cookie})")]
pub struct GrantConflict {
    pub key: enforcer_common::PolicyKey,
    pub cookie: u32,
}

/// A grant opened through the API.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantInfo {
    pub from: String,
    pub to: String,
    pub protocol: String,
    pub port: u16,
    /// Last port of the range `port..=end_port`; 0: the one port.
    #[serde(default)]
    pub end_port: u16,
    /// Monotonic nanoseconds.
    pub expires_at: u64,
    pub reason: String,
}

/// Rule ownership, kept in `state_dir` so a restarted daemon knows which pinned rule is whose.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Ownership {
    policy: BTreeMap<String, u32>,
    /// Admin-tier rules from `TenantPolicy`: owner → (cookie, fingerprint).
    #[serde(default)]
    admin: BTreeMap<String, (u32, String)>,
    grants: BTreeMap<u32, GrantInfo>,
}

/// Errors of run-time workload registration.
#[derive(Debug, thiserror::Error)]
pub enum WorkloadError {
    #[error("workload {0} already exists")]
    Exists(String),
    #[error("no workload {0}")]
    NotFound(String),
    #[error("workload {0} is defined in the configuration file; edit it there")]
    Configured(String),
    #[error("{0}")]
    Invalid(String),
}

pub struct Engine {
    pub cfg: Config,
    pub dp: Datapath,
    /// Configured workloads first, then those added through the API.
    pub workloads: Vec<WorkloadConfig>,
    config_workloads: usize,
    pub identities: Vec<u32>,
    pub tenants: Vec<u32>,
    pub attached: bool,
    pub policy_loaded: bool,
    pub policy_error: Option<String>,
    pub policy_version: u64,
    pub policy_load_errors: u64,
    policies: Vec<ztseg_policy::NetworkPolicy>,
    tenant_policies: Vec<ztseg_policy::TenantPolicy>,
    fingerprint: Vec<(PathBuf, SystemTime, u64)>,
    own: Ownership,
    /// Last-known controller policy (controller mode).
    pub controller: ControllerPolicy,
    /// Controller session state (controller mode).
    pub controller_connected: bool,
    pub controller_last_contact: Option<std::time::Instant>,
    /// Why the last controller session ended or was refused (`None` while connected), and
    /// the wait before the next attempt.
    pub controller_error: Option<String>,
    pub controller_retry: std::time::Duration,
    /// The last update received from the controller since start: (snapshot, base version).
    pub controller_last_update: Option<(bool, u64)>,
    /// The host's own addresses, registered with identity `IDENTITY_HOST`; `None` until they
    /// are (and after a failed attempt, so that the next one starts over).
    pub host_addrs: Option<BTreeSet<IpAddr>>,
    /// Called after each step of a policy change (`admin-deny`, `tenant`, `admin`) with the
    /// data plane as it is at that moment: a way to observe the transition (tests, tracing).
    pub after_step: Option<StepObserver>,
}

/// See [`Engine::after_step`].
pub type StepObserver = Box<dyn FnMut(&mut Datapath, &'static str) + Send>;

/// The controller policy this enforcer holds, persisted in the state directory.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct ControllerPolicy {
    pub version: u64,
    /// The controller's policy history the version belongs to.
    #[serde(default)]
    pub history: String,
    pub documents: BTreeMap<String, String>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine").field("node", &self.cfg.node).finish_non_exhaustive()
    }
}

fn proto_number(p: &str) -> Result<u8> {
    Ok(match p.to_ascii_uppercase().as_str() {
        "TCP" => IPPROTO_TCP,
        "UDP" => IPPROTO_UDP,
        "SCTP" => IPPROTO_SCTP,
        other => bail!("protocol {other:?}: expected TCP, UDP or SCTP"),
    })
}

/// File in the state directory holding the controller policy last enforced.
const CONTROLLER_POLICY_FILE: &str = "controller-policy.json";

/// Write the controller policy durably: a temporary file, fsynced, renamed over the old one,
/// and the directory fsynced — after a crash or power loss the file holds the old version or
/// the new one, whole.
fn save_controller_policy(state_dir: &Path, policy: &ControllerPolicy) -> Result<()> {
    use std::io::Write as _;
    let p = state_dir.join(CONTROLLER_POLICY_FILE);
    let tmp = p.with_extension("tmp");
    std::fs::create_dir_all(state_dir).with_context(|| format!("creating {}", state_dir.display()))?;
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(policy)?)?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, &p).with_context(|| format!("writing {}", p.display()))?;
    crate::archive::sync_dir(&p)
}

/// The controller policy a previous run persisted; none (version 0: the controller sends a
/// snapshot) if there is no file. A file that cannot be read is logged, never passed over
/// silently.
fn load_controller_policy(state_dir: &Path) -> ControllerPolicy {
    let p = state_dir.join(CONTROLLER_POLICY_FILE);
    let bytes = match std::fs::read(&p) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return ControllerPolicy::default(),
        Err(e) => {
            log::error(
                "cannot read the persisted controller policy; starting from version 0 (the controller sends a snapshot)",
                &[("file", &p.display().to_string()), ("error", &e.to_string())],
            );
            return ControllerPolicy::default();
        }
    };
    serde_json::from_slice(&bytes).unwrap_or_else(|e| {
        log::error(
            "the persisted controller policy is unreadable; starting from version 0 (the controller sends a snapshot)",
            &[("file", &p.display().to_string()), ("error", &e.to_string())],
        );
        ControllerPolicy::default()
    })
}

impl Engine {
    /// Open the data plane (reusing pinned state). Attaching happens in [`Self::try_attach`],
    /// which the daemon retries until every local workload's interface exists.
    pub fn open(cfg: Config) -> Result<Self> {
        enforcer::datapath::ensure_bpffs(Path::new("/sys/fs/bpf"))?;
        let dp = Datapath::open(&cfg.pin_dir, &cfg.maps.options())?;
        dp.writer().set_local_delivery(cfg.local_delivery)?;
        dp.writer().set_event_rate_limit(cfg.event_limit())?;
        for (map, want, have) in dp.capacity_mismatches(&cfg.maps.options())? {
            super::log::info(
                "pinned map keeps its size; `ztseg enforcer uninstall` then start again to resize",
                &[("map", map), ("configured", &want.to_string()), ("pinned", &have.to_string())],
            );
        }
        let mut workloads = cfg.workloads.clone();
        let config_workloads = workloads.len();
        // Workloads added through the API in an earlier run.
        let saved: Vec<WorkloadConfig> = std::fs::read(cfg.state_dir.join("workloads.json"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        for w in saved {
            if !workloads.iter().any(|x| x.id() == w.id()) {
                workloads.push(w);
            }
        }
        let identities = workloads.iter().map(|w| identity_of(&w.id())).collect();
        let tenants = workloads.iter().map(|w| tenant_of(w.tenant.as_deref())).collect();
        let own = Self::load_ownership(&cfg.state_dir, &dp);
        let controller = load_controller_policy(&cfg.state_dir);
        Ok(Self {
            cfg,
            dp,
            workloads,
            config_workloads,
            identities,
            tenants,
            attached: false,
            policy_loaded: false,
            policy_error: None,
            policy_version: 0,
            policy_load_errors: 0,
            policies: Vec::new(),
            tenant_policies: Vec::new(),
            fingerprint: Vec::new(),
            own,
            controller,
            controller_connected: false,
            controller_last_contact: None,
            controller_error: None,
            controller_retry: std::time::Duration::ZERO,
            controller_last_update: None,
            host_addrs: None,
            after_step: None,
        })
    }

    /// Attach to every local workload and register all workloads; then load policy. Returns
    /// whether the engine is attached (false while an interface or cgroup is missing: nothing
    /// is registered yet, and attached interfaces drop everything — fail closed).
    pub fn try_attach(&mut self) -> Result<bool> {
        if self.attached {
            return Ok(true);
        }
        match self.attach_and_register() {
            Ok(()) => {}
            Err(e)
                if matches!(
                    e.downcast_ref::<enforcer::Error>(),
                    Some(enforcer::Error::Interface { .. } | enforcer::Error::Cgroup { .. })
                ) =>
            {
                log::info("waiting for workload attachment points", &[("detail", &format!("{e:#}"))]);
                return Ok(false);
            }
            Err(e) => return Err(e),
        }
        self.attached = true;
        log::info("attached", &[("pin_dir", &self.cfg.pin_dir.display().to_string())]);
        self.refresh_host_addresses()?;
        self.reload_policy(true);
        Ok(true)
    }

    fn ownership_path(state_dir: &Path) -> PathBuf {
        state_dir.join("ownership.json")
    }

    fn load_ownership(state_dir: &Path, dp: &Datapath) -> Ownership {
        let mut own: Ownership = std::fs::read(Self::ownership_path(state_dir))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default();
        // Keep only what is still installed.
        let live: std::collections::BTreeSet<u32> = dp.writer().rules().iter().map(|r| r.cookie).collect();
        own.policy.retain(|_, c| live.contains(c));
        own.admin.retain(|_, (c, _)| live.contains(c));
        own.grants.retain(|c, _| live.contains(c));
        own
    }

    fn save_ownership(&self) -> Result<()> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let p = Self::ownership_path(&self.cfg.state_dir);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.own)?)?;
        std::fs::rename(tmp, p)?;
        Ok(())
    }

    fn attach_and_register(&mut self) -> Result<()> {
        let all: Vec<usize> = (0..self.workloads.len()).collect();
        self.attach_workloads(&all)?;
        let failsafe: Vec<(u8, u16)> =
            self.cfg.failsafe.iter().filter_map(|f| parse_failsafe(f).ok()).collect();
        self.dp.writer().set_failsafe(&failsafe)?;
        Ok(())
    }

    /// Attach to the local workloads among `which` and register all of them.
    fn attach_workloads(&mut self, which: &[usize]) -> Result<()> {
        let local: Vec<usize> =
            which.iter().copied().filter(|i| self.cfg.is_local(&self.workloads[*i])).collect();
        let mut endpoints = Vec::new();
        for &i in &local {
            let w = &self.workloads[i];
            if let Some(ifname) = &w.interface {
                self.dp.attach_tc(ifname, TcHook::FromWorkload)?;
                self.dp.attach_tc(ifname, TcHook::ToWorkload)?;
                endpoints.push((i, Some(enforcer::datapath::ifindex(ifname)?), None));
            } else if let Some(cg) = &w.cgroup {
                let id = self.dp.attach_cgroup(cg)?;
                endpoints.push((i, None, Some(id)));
            }
        }
        let mut wr = self.dp.writer();
        for &i in which {
            let w = &self.workloads[i];
            for ip in w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)) {
                wr.set_identity(ip, self.identities[i], self.tenants[i])?;
            }
        }
        for (i, ifindex, cgroup) in endpoints {
            let w = &self.workloads[i];
            let wl = Workload {
                identity: self.identities[i],
                tenant: self.tenants[i],
                ipv4: w.ipv4,
                ipv6: w.ipv6,
                audit: w.mode == Mode::Audit,
            };
            if let Some(ifx) = ifindex {
                wr.set_interface_workload(ifx, &wl)?;
            }
            if let Some(cg) = cgroup {
                wr.set_cgroup_workload(cg, &wl)?;
            }
        }
        Ok(())
    }

    /// Bring the host's own addresses (of the network namespace the daemon runs in) to the
    /// data plane with identity `IDENTITY_HOST`, so that traffic from this node is known as
    /// such (upstream `NetworkPolicy` always lets a pod's node in): register new ones, forget
    /// those the host no longer has (also those an earlier run left in the pins), and
    /// recompile the policy when the set changed (an `ipBlock` holding a host address allows
    /// the host). Loopback addresses and addresses of workloads are left out. Cheap when
    /// nothing changed; the daemon calls it every second.
    pub fn refresh_host_addresses(&mut self) -> Result<()> {
        if !self.attached {
            return Ok(());
        }
        let workload_addrs: BTreeSet<IpAddr> = self
            .workloads
            .iter()
            .flat_map(|w| w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)))
            .collect();
        let now: BTreeSet<IpAddr> = enforcer::netns::addresses()
            .context("listing the host's addresses")?
            .into_iter()
            .filter(|ip| !ip.is_loopback() && !workload_addrs.contains(ip))
            .collect();
        if self.host_addrs.as_ref() == Some(&now) {
            return Ok(());
        }
        self.register_host_addresses(&now).inspect_err(|_| self.host_addrs = None)?;
        let list: Vec<String> = now.iter().map(ToString::to_string).collect();
        log::info("host addresses", &[("addresses", &list.join(","))]);
        Ok(())
    }

    /// Addresses the host lost resolve as any other address from now on; then the policy
    /// follows the new set; then the new addresses become the host's.
    fn register_host_addresses(&mut self, now: &BTreeSet<IpAddr>) -> Result<()> {
        {
            let mut w = self.dp.writer();
            for (ip, info) in w.identities()? {
                if info.identity == IDENTITY_HOST && !now.contains(&ip) {
                    w.remove_identity(ip)?;
                }
            }
        }
        self.host_addrs = Some(now.clone());
        if self.policy_loaded {
            let policies = self.policies.clone();
            self.apply(&policies)?;
        }
        {
            let mut w = self.dp.writer();
            for ip in now {
                if w.identity(*ip).map(|i| i.identity) != Some(IDENTITY_HOST) {
                    w.set_identity(*ip, IDENTITY_HOST, TENANT_NONE)?;
                }
            }
        }
        Ok(())
    }

    /// What the compiler needs besides the policy: the installed CIDR prefixes, the host's
    /// addresses.
    fn compile_context(&self) -> Result<compile::Context> {
        Ok(compile::Context {
            installed: compile::installed_cidrs(&self.dp.writer())?,
            host: self.host_addrs.clone().unwrap_or_default(),
        })
    }

    fn api_workloads_path(&self) -> PathBuf {
        self.cfg.state_dir.join("workloads.json")
    }

    /// Workloads added through the API (kept in `state_dir`).
    fn api_workloads(&self) -> Vec<WorkloadConfig> {
        self.workloads[self.config_workloads..].to_vec()
    }

    fn save_api_workloads(&self) -> Result<()> {
        std::fs::create_dir_all(&self.cfg.state_dir)?;
        let p = self.api_workloads_path();
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(&self.api_workloads())?)?;
        std::fs::rename(tmp, p)?;
        Ok(())
    }

    /// Add a workload at run time: validated like configured ones, attached (if local) and
    /// registered, then the policy is recompiled with it.
    pub fn register_workload(&mut self, w: WorkloadConfig) -> Result<()> {
        if self.workloads.iter().any(|x| x.id() == w.id()) {
            return Err(WorkloadError::Exists(w.id()).into());
        }
        let mut probe = self.cfg.clone();
        probe.workloads.clone_from(&self.workloads);
        probe.workloads.push(w.clone());
        probe.check().map_err(|e| WorkloadError::Invalid(e.to_string()))?;
        self.workloads.push(w);
        self.identities.push(identity_of(&self.workloads[self.workloads.len() - 1].id()));
        self.tenants.push(tenant_of(self.workloads[self.workloads.len() - 1].tenant.as_deref()));
        let i = self.workloads.len() - 1;
        if let Err(e) = self.attach_workloads(&[i]) {
            self.workloads.pop();
            self.identities.pop();
            self.tenants.pop();
            return Err(e);
        }
        self.save_api_workloads()?;
        let policies = self.policies.clone();
        self.apply(&policies)?;
        log::info("workload registered", &[("workload", &self.workloads[i].id())]);
        Ok(())
    }

    /// Remove a workload added through the API: its rules are revoked, its addresses
    /// forgotten, and its interface (still attached) drops everything.
    pub fn remove_workload(&mut self, id: &str) -> Result<()> {
        let i = self
            .workloads
            .iter()
            .position(|w| w.id() == id)
            .ok_or_else(|| WorkloadError::NotFound(id.into()))?;
        if i < self.config_workloads {
            return Err(WorkloadError::Configured(id.into()).into());
        }
        let w = self.workloads[i].clone();
        {
            let mut wr = self.dp.writer();
            if self.cfg.is_local(&w)
                && let Some(ifname) = &w.interface
                && let Ok(ifx) = enforcer::datapath::ifindex(ifname)
            {
                wr.remove_interface_workload(ifx)?;
            }
            for ip in w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)) {
                wr.remove_identity(ip)?;
            }
            for dir in [DIR_INGRESS, DIR_EGRESS] {
                if let Some(c) = self.own.policy.remove(&compile::owner_id(id, dir)) {
                    wr.revoke(c)?;
                }
            }
        }
        self.workloads.remove(i);
        self.identities.remove(i);
        self.tenants.remove(i);
        self.save_api_workloads()?;
        let policies = self.policies.clone();
        self.apply(&policies)?;
        log::info("workload removed", &[("workload", id)]);
        Ok(())
    }

    fn cluster(&self) -> ztseg_policy::Cluster {
        ztseg_policy::Cluster {
            namespaces: self
                .cfg
                .namespaces
                .iter()
                .map(|n| ztseg_policy::Namespace { name: n.name.clone(), labels: n.labels.clone() })
                .chain(std::iter::once(ztseg_policy::Namespace {
                    name: "default".into(),
                    labels: BTreeMap::new(),
                }))
                .collect(),
            pods: self
                .workloads
                .iter()
                .map(|w| ztseg_policy::Pod {
                    name: w.name.clone(),
                    namespace: w.namespace.clone(),
                    labels: w.labels.clone(),
                    ips: w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)).collect(),
                    ports: w
                        .ports
                        .iter()
                        .map(|p| ztseg_policy::ContainerPort {
                            name: Some(p.name.clone()),
                            port: p.port,
                            protocol: p.protocol,
                        })
                        .collect(),
                })
                .collect(),
        }
    }

    fn policy_files(&self) -> Vec<(PathBuf, SystemTime, u64)> {
        let mut v: Vec<_> = std::fs::read_dir(&self.cfg.policy_dir)
            .map(|d| {
                d.flatten()
                    .map(|e| e.path())
                    .filter(|p| p.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                    .filter_map(|p| {
                        let m = std::fs::metadata(&p).ok()?;
                        Some((p, m.modified().ok()?, m.len()))
                    })
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Re-read the policy source if it changed (or `force`): the policy directory, or — with
    /// a controller configured — the last-known controller policy (kept in the state
    /// directory, so a restart without the controller enforces what was last received). An
    /// invalid file keeps the policy in force and is reported with file, position and field.
    pub fn reload_policy(&mut self, force: bool) {
        if !self.attached {
            return;
        }
        if self.cfg.controller.is_some() {
            // Nothing is applied before the controller's first version: until then the data
            // plane's default deny holds (an empty policy set would mean default allow).
            if (force || !self.policy_loaded) && self.controller.version > 0 {
                let docs = self.controller.documents.clone();
                let _ = self.apply_documents(&docs);
            }
            return;
        }
        let files = self.policy_files();
        if !force && files == self.fingerprint {
            return;
        }
        self.fingerprint.clone_from(&files);
        let mut docs = BTreeMap::new();
        let mut errors = Vec::new();
        for (f, _, _) in &files {
            match std::fs::read_to_string(f) {
                Ok(text) => {
                    docs.insert(f.display().to_string(), text);
                }
                Err(e) => errors.push(format!("{}: {e}", f.display())),
            }
        }
        if !errors.is_empty() {
            self.reject(&errors);
            return;
        }
        let _ = self.apply_documents(&docs);
    }

    fn reject(&mut self, errors: &[String]) -> String {
        self.policy_load_errors += 1;
        let msg = errors.join("; ");
        log::error("policy rejected; the policy in force stays", &[("errors", &msg)]);
        self.policy_error = Some(msg.clone());
        msg
    }

    /// Parse and enforce a complete document set (name → YAML). On any error nothing changes
    /// and the error is returned (and shown in status).
    pub fn apply_documents(&mut self, docs: &BTreeMap<String, String>) -> Result<(), String> {
        let mut policies = Vec::new();
        let mut tenant_policies = Vec::new();
        match ztseg_policy::parse_set(docs.iter().map(|(name, text)| (Path::new(name), text.as_str()))) {
            Ok(parsed) => {
                for d in parsed {
                    match d {
                        ztseg_policy::Document::Network(p) => policies.push(p),
                        ztseg_policy::Document::Tenant(t) => tenant_policies.push(t),
                    }
                }
            }
            Err(es) => return Err(self.reject(&es.iter().map(ToString::to_string).collect::<Vec<_>>())),
        }
        // Admin DENYs first, then the tenant tier, then the rest of the admin tier (see
        // `compile::AdminSync`): never a moment that allows what neither version allows.
        // Both tiers or neither: if a step fails (a full map), both go back to the version in
        // force.
        let result = self.apply_steps(&policies, &tenant_policies).inspect_err(|_| {
            let (previous, previous_admin) = (self.policies.clone(), self.tenant_policies.clone());
            if let Err(e) = self.apply(&previous) {
                log::error("could not restore the tenant tier", &[("error", &format!("{e:#}"))]);
            }
            if let Err(e) = self.apply_admin(&previous_admin, AdminSync::All) {
                log::error("could not restore the admin tier", &[("error", &format!("{e:#}"))]);
            }
        });
        match result {
            Ok(()) => {
                self.policies = policies;
                self.tenant_policies = tenant_policies;
                self.policy_loaded = true;
                self.policy_error = None;
                self.policy_version += 1;
                log::info(
                    "policy applied",
                    &[
                        ("version", &self.policy_version.to_string()),
                        ("controller_version", &self.controller.version.to_string()),
                        ("policies", &self.policies.len().to_string()),
                    ],
                );
                Ok(())
            }
            Err(e) => {
                self.policy_load_errors += 1;
                let msg = format!("{e:#}");
                log::error("policy could not be applied; the policy in force stays", &[("error", &msg)]);
                self.policy_error = Some(msg.clone());
                Err(msg)
            }
        }
    }

    /// Enforce controller policy `version` (complete document set). Once it is in force it is
    /// persisted, so a restart resumes from it; on error the previous version stays in force
    /// (and persisted). Before attaching it is only persisted, and applied right after.
    pub fn apply_controller(
        &mut self,
        version: u64,
        history: String,
        docs: BTreeMap<String, String>,
    ) -> Result<(), String> {
        if !self.attached {
            // Kept and applied right after attaching (reload_policy).
            self.controller = ControllerPolicy { version, history, documents: docs };
            self.policy_loaded = false;
            return self.save_controller_policy().map_err(|e| format!("{e:#}"));
        }
        let previous = std::mem::replace(&mut self.controller.documents, docs.clone());
        let previous_version = self.controller.version;
        let previous_history = std::mem::replace(&mut self.controller.history, history);
        self.controller.version = version;
        match self.apply_documents(&docs) {
            Ok(()) => {
                if let Err(e) = self.save_controller_policy() {
                    log::error("could not persist the controller policy", &[("error", &format!("{e:#}"))]);
                }
                Ok(())
            }
            Err(e) => {
                self.controller.documents = previous;
                self.controller.version = previous_version;
                self.controller.history = previous_history;
                Err(e)
            }
        }
    }

    fn save_controller_policy(&self) -> Result<()> {
        save_controller_policy(&self.cfg.state_dir, &self.controller)
    }

    fn apply_steps(
        &mut self,
        policies: &[ztseg_policy::NetworkPolicy],
        tenant_policies: &[ztseg_policy::TenantPolicy],
    ) -> Result<()> {
        self.apply_admin(tenant_policies, AdminSync::Restrictive)?;
        self.observe("admin-deny");
        self.apply(policies)?;
        self.observe("tenant");
        self.apply_admin(tenant_policies, AdminSync::All)?;
        self.observe("admin");
        Ok(())
    }

    fn observe(&mut self, step: &'static str) {
        if let Some(f) = self.after_step.as_mut() {
            f(&mut self.dp, step);
        }
    }

    /// Admin tier from `TenantPolicy` objects (tenant numbers as the data plane knows them).
    fn apply_admin(&mut self, tenant_policies: &[ztseg_policy::TenantPolicy], what: AdminSync) -> Result<()> {
        let desired = compile::compile_admin(tenant_policies, |t| tenant_of(Some(t)))?;
        let mut current = std::mem::take(&mut self.own.admin);
        let result = compile::sync_admin(&mut self.dp.writer(), &desired, &mut current, what);
        self.own.admin = current;
        self.save_ownership()?;
        result
    }

    fn apply(&mut self, policies: &[ztseg_policy::NetworkPolicy]) -> Result<()> {
        let cluster = self.cluster();
        let eval = ztseg_policy::evaluate(&cluster, policies);
        let compiled = compile::compile(&cluster, &eval, &self.identities, &self.compile_context()?)?;
        let local: Vec<bool> = self.workloads.iter().map(|w| self.cfg.is_local(w)).collect();
        let grant_cookies: std::collections::BTreeSet<u32> = self.own.grants.keys().copied().collect();
        let ids: Vec<String> = self.workloads.iter().map(WorkloadConfig::id).collect();
        let mut rules = std::mem::take(&mut self.own.policy);
        let result = {
            let mut w = self.dp.writer();
            let owners: BTreeMap<enforcer_common::PolicyKey, u32> =
                compiled.keys.values().flatten().filter_map(|k| w.owner(k).map(|c| (*k, c))).collect();
            compile::sync_rules(
                &mut w,
                &compiled,
                &ids,
                |p| local[p],
                &mut rules,
                |k| owners.get(k).is_some_and(|c| grant_cookies.contains(c)),
            )
        };
        // Owner ids use workload ids, not indexes, so they survive config edits.
        self.own.policy = rules;
        self.save_ownership()?;
        result
    }

    fn find(&self, id: &str) -> Result<usize> {
        self.workloads.iter().position(|w| w.id() == id).with_context(|| format!("no workload {id:?}"))
    }

    /// Open a grant `from` → `to` on `protocol` and the destination ports `ports` for `ttl`.
    /// Installs the egress check of `from` and the ingress check of `to` (those that are
    /// local) before returning: exact keys for one port, port ranges for several.
    pub fn open_grant(
        &mut self,
        from: &str,
        to: &str,
        protocol: &str,
        ports: std::ops::RangeInclusive<u16>,
        ttl: Duration,
        reason: &str,
    ) -> Result<(u32, GrantInfo)> {
        if ttl.is_zero() || ttl > Duration::from_hours(24) {
            bail!("ttl must be between 1 second and 24 hours");
        }
        // Grants the kernel already expired are released first.
        self.release_expired()?;
        let (port, end) = (*ports.start(), *ports.end());
        if port == 0 || end < port {
            bail!("ports must be 1-65535, the first not after the last");
        }
        let (f, t) = (self.find(from)?, self.find(to)?);
        let proto = proto_number(protocol)?;
        let mut checks = Vec::new();
        if self.cfg.is_local(&self.workloads[f]) {
            checks.push((DIR_EGRESS, self.identities[f], self.identities[t]));
        }
        if self.cfg.is_local(&self.workloads[t]) {
            checks.push((DIR_INGRESS, self.identities[t], self.identities[f]));
        }
        if checks.is_empty() {
            bail!("neither {from} nor {to} runs on this node ({})", self.cfg.node);
        }
        if end > port {
            return self.open_range_grant(&checks, proto, (port, end), ttl, from, to, protocol, reason);
        }
        let keys: Vec<_> =
            checks.iter().map(|&(dir, local, peer)| Rule::key(dir, local, Some(peer), proto, port)).collect();
        let handle = {
            let w = self.dp.writer();
            // Keys the policy already owns are handed to the grant for its lifetime: the
            // policy rule is recompiled without them and gets them back when the grant ends.
            let owned: Vec<_> = keys.iter().filter_map(|k| w.owner(k).map(|c| (*k, c))).collect();
            if let Some((k, c)) = owned.iter().find(|(_, c)| self.own.grants.contains_key(c)) {
                return Err(GrantConflict { key: *k, cookie: *c }.into());
            }
            drop(w);
            if !owned.is_empty() {
                // Policy rules give up those keys first (make-before-break keeps the rest).
                let mut reserved: std::collections::BTreeSet<_> = owned.iter().map(|(k, _)| *k).collect();
                reserved.extend(keys.iter().copied());
                self.reapply_without(&reserved)?;
            }
            let mut w = self.dp.writer();
            w.install(&Rule { ranges: Vec::new(), keys, action: Action::Allow, ttl: Some(ttl) })?
        };
        let info = GrantInfo {
            from: from.into(),
            to: to.into(),
            protocol: protocol.to_ascii_uppercase(),
            port,
            end_port: 0,
            expires_at: handle.expires_at,
            reason: reason.into(),
        };
        self.record_grant(handle.cookie, info)
    }

    /// A grant over a port range: port ranges of its own (they share the data plane's range
    /// sets with the policy's, so no key changes hands).
    #[expect(clippy::too_many_arguments, reason = "the grant's fields, passed through from open_grant")]
    fn open_range_grant(
        &mut self,
        checks: &[(u8, u32, u32)],
        proto: u8,
        (port, end): (u16, u16),
        ttl: Duration,
        from: &str,
        to: &str,
        protocol: &str,
        reason: &str,
    ) -> Result<(u32, GrantInfo)> {
        let ranges = checks
            .iter()
            .map(|&(dir, local, peer)| Rule::range(dir, local, Some(peer), proto, port, end))
            .collect();
        let handle = self.dp.writer().install(&Rule {
            keys: Vec::new(),
            ranges,
            action: Action::Allow,
            ttl: Some(ttl),
        })?;
        let info = GrantInfo {
            from: from.into(),
            to: to.into(),
            protocol: protocol.to_ascii_uppercase(),
            port,
            end_port: end,
            expires_at: handle.expires_at,
            reason: reason.into(),
        };
        self.record_grant(handle.cookie, info)
    }

    fn record_grant(&mut self, cookie: u32, info: GrantInfo) -> Result<(u32, GrantInfo)> {
        self.own.grants.insert(cookie, info.clone());
        self.save_ownership()?;
        let ports = if info.end_port == 0 {
            info.port.to_string()
        } else {
            format!("{}-{}", info.port, info.end_port)
        };
        log::info(
            "grant opened",
            &[("cookie", &cookie.to_string()), ("from", &info.from), ("to", &info.to), ("port", &ports)],
        );
        Ok((cookie, info))
    }

    fn reapply_without(
        &mut self,
        reserved: &std::collections::BTreeSet<enforcer_common::PolicyKey>,
    ) -> Result<()> {
        let cluster = self.cluster();
        let eval = ztseg_policy::evaluate(&cluster, &self.policies);
        let compiled = compile::compile(&cluster, &eval, &self.identities, &self.compile_context()?)?;
        let local: Vec<bool> = self.workloads.iter().map(|w| self.cfg.is_local(w)).collect();
        let mut w = self.dp.writer();
        let ids: Vec<String> = self.workloads.iter().map(WorkloadConfig::id).collect();
        compile::sync_rules(
            &mut w,
            &compiled,
            &ids,
            |p| local[p],
            &mut self.own.policy,
            |k| reserved.contains(k),
        )
    }

    /// Revoke a grant: the kernel stops its flows from the next packet.
    pub fn revoke_grant(&mut self, cookie: u32) -> Result<()> {
        if !self.own.grants.contains_key(&cookie) {
            bail!("no grant with cookie {cookie}");
        }
        self.dp.writer().revoke(cookie)?;
        self.own.grants.remove(&cookie);
        self.save_ownership()?;
        // Policy keys the grant borrowed go back to the policy.
        let policies = self.policies.clone();
        self.apply(&policies)?;
        log::info("grant revoked", &[("cookie", &cookie.to_string())]);
        Ok(())
    }

    pub fn grants(&self) -> &BTreeMap<u32, GrantInfo> {
        &self.own.grants
    }

    pub fn admin_rules(&self) -> &BTreeMap<String, (u32, String)> {
        &self.own.admin
    }

    pub fn policy_rules(&self) -> &BTreeMap<String, u32> {
        &self.own.policy
    }

    /// Free expired grants (the kernel already stopped them) and idle conntrack entries.
    pub fn gc(&mut self) -> Result<()> {
        self.release_expired()?;
        self.dp.writer().gc(Duration::from_mins(10))?;
        Ok(())
    }

    fn release_expired(&mut self) -> Result<()> {
        let now = enforcer::time::monotonic_ns()?;
        let expired: Vec<u32> =
            self.own.grants.iter().filter(|(_, g)| g.expires_at <= now).map(|(c, _)| *c).collect();
        for c in expired {
            self.revoke_grant(c)?;
        }
        Ok(())
    }

    /// The address `who` stands for: an address as written, or a workload (`namespace/name`)
    /// by its IPv4 address, else its IPv6 one.
    pub fn address_of(&self, who: &str) -> Result<IpAddr> {
        if let Ok(ip) = who.parse::<IpAddr>() {
            return Ok(ip);
        }
        let w = self
            .workloads
            .iter()
            .find(|w| w.id() == who)
            .with_context(|| format!("{who:?} is neither an address nor a workload (namespace/name)"))?;
        w.ipv4
            .map(IpAddr::V4)
            .or(w.ipv6.map(IpAddr::V6))
            .with_context(|| format!("workload {who} has no address"))
    }

    /// Where the programs check the traffic of the local workloads that own `ip`: their name
    /// and check point (interface index or cgroup id).
    pub fn check_points(&self, ip: IpAddr) -> Result<Vec<(String, enforcer::writer::explain::CheckPoint)>> {
        use enforcer::writer::explain::CheckPoint;
        let mut out = Vec::new();
        for w in &self.workloads {
            let owns = w.ipv4.map(IpAddr::V4) == Some(ip) || w.ipv6.map(IpAddr::V6) == Some(ip);
            if !owns || !self.cfg.is_local(w) {
                continue;
            }
            if let Some(ifname) = &w.interface {
                out.push((w.id(), CheckPoint::Interface(enforcer::datapath::ifindex(ifname)?)));
            } else if let Some(cg) = &w.cgroup {
                let ino = std::os::unix::fs::MetadataExt::ino(
                    &std::fs::metadata(cg).with_context(|| format!("cgroup {}", cg.display()))?,
                );
                out.push((w.id(), CheckPoint::Cgroup(ino)));
            }
        }
        Ok(out)
    }

    /// Name of the workload with `identity`, if known (`host` for this host).
    #[must_use]
    pub fn workload_name(&self, identity: u32) -> Option<String> {
        if identity == IDENTITY_HOST {
            return Some("host".into());
        }
        self.identities.iter().position(|i| *i == identity).map(|i| self.workloads[i].id())
    }

    /// Tenant name of the workload with `identity`.
    #[must_use]
    pub fn tenant_name(&self, identity: u32) -> Option<String> {
        self.identities.iter().position(|i| *i == identity).and_then(|i| self.workloads[i].tenant.clone())
    }

    /// The controller version actually enforced (0 while none is).
    #[must_use]
    pub fn enforced_controller_version(&self) -> u64 {
        if self.policy_loaded { self.controller.version } else { 0 }
    }

    /// Controller mode and no contact with the controller: the policy in force may be stale.
    #[must_use]
    pub fn policy_stale(&self) -> bool {
        self.cfg.controller.is_some() && !self.controller_connected
    }

    #[must_use]
    pub fn ready(&self) -> bool {
        self.attached && self.policy_loaded
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The persisted controller policy round-trips; a replaced one leaves no temporary file; a
    /// missing or damaged one (e.g. cut short by a power loss before this was fsynced) means
    /// version 0, so the controller sends a snapshot.
    #[test]
    fn the_controller_policy_is_persisted_whole_or_not_at_all() {
        let dir = std::env::temp_dir().join(format!("ztseg-ctl-policy-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(load_controller_policy(&dir).version, 0, "nothing persisted yet");
        let mut p = ControllerPolicy {
            version: 3,
            history: "h".into(),
            documents: BTreeMap::from([("a.yaml".to_owned(), "x".to_owned())]),
        };
        save_controller_policy(&dir, &p).unwrap();
        p.version = 4;
        save_controller_policy(&dir, &p).unwrap();
        let back = load_controller_policy(&dir);
        assert_eq!((back.version, back.history.as_str(), back.documents.len()), (4, "h", 1));
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(files, [CONTROLLER_POLICY_FILE], "no temporary file left behind");
        let file = dir.join(CONTROLLER_POLICY_FILE);
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(load_controller_policy(&dir).version, 0, "a damaged file is not trusted");
        std::fs::write(&file, b"").unwrap();
        assert_eq!(load_controller_policy(&dir).version, 0);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
