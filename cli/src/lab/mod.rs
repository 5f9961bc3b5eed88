//! `ztseg lab`: pods as network namespaces on simulated hosts, each host running its own
//! enforcer daemon (`ztseg enforcer run`, its own pin directory, socket and metrics), real
//! servers in every pod, and a reachability matrix.
//!
//! Topology: every host is a namespace that routes to its pods, the way Calico- or
//! Cilium-style CNIs wire them: one veth per pod (`p<N>`, the interface the enforcer attaches
//! to, with the link-local gateway 169.254.1.1), a /32 route per pod; pod N on host H gets
//! 10.77.H.(n+1)/32 and a default route via that gateway.
//! With several hosts, a fabric namespace bridges their uplinks (10.76.0.(H+1)/24) and each
//! host routes the other hosts' pod subnets over it. The daemons share one policy directory
//! the lab writes; label changes rewrite their configuration and restart them (a restart has
//! no enforcement gap).

pub mod probe;
pub mod sctp;
pub mod serve;
pub mod spec;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};
use enforcer::Datapath;
use enforcer_common::IDENTITY_FIRST_USER;
use serde::{Deserialize, Serialize};
use spec::{LabFile, NamespaceSpec, PodSpec};

/// Every pod's default gateway: an address on its host-side interface (link-local, the same
/// on every interface, as routed CNIs do).
const GATEWAY: &str = "169.254.1.1";

/// Lab state files live here (one JSON file per lab).
pub const STATE_DIR: &str = "/run/ztseg/lab";
/// Pin directories of lab enforcers: `<PIN_ROOT>/<lab>/<host>`.
pub const PIN_ROOT: &str = "/sys/fs/bpf/ztseg-lab";

/// What `lab up` built, so later commands can find it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub name: String,
    pub lab_file: PathBuf,
    pub hosts: Vec<HostState>,
    pub fabric: Option<String>,
    pub namespaces: Vec<NamespaceSpec>,
    pub pods: Vec<PodState>,
    pub ports: Vec<u16>,
    pub protocols: Vec<String>,
    pub tenants: BTreeMap<String, u32>,
    #[serde(default)]
    pub controller: Option<ControllerState>,
    /// Why SCTP is served and probed nowhere in this lab although `protocols` lists it: the
    /// kernel has no SCTP.
    #[serde(default)]
    pub sctp_unavailable: Option<String>,
}

/// The lab's controller: its own network namespace with a management bridge
/// (`10.75.0.1/24`) that every host reaches through a `mg0` link (`10.75.0.(H+2)`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ControllerState {
    pub netns: String,
    pub data_dir: PathBuf,
    pub endpoint: String,
    pub pid: Option<u32>,
}

/// Controller address inside a lab.
pub const LAB_CONTROLLER: &str = "10.75.0.1:7443";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct HostState {
    pub name: String,
    pub netns: String,
    pub pin_dir: PathBuf,
    /// The host's enforcer API socket.
    pub socket: PathBuf,
    pub daemon_pid: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PodState {
    pub spec: PodSpec,
    pub host: usize,
    pub netns: String,
    pub iface: String,
    pub ipv4: Ipv4Addr,
    pub identity: u32,
    pub tenant: u32,
    pub server_pid: Option<u32>,
}

impl PodState {
    #[must_use]
    pub fn id(&self) -> String {
        format!("{}/{}", self.spec.namespace, self.spec.name)
    }
}

fn state_path(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(format!("{name}.json"))
}

impl LabState {
    pub fn load(name: &str) -> Result<Self> {
        let p = state_path(name);
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("lab {name:?} is not up (no {})", p.display()))?;
        serde_json::from_str(&text).with_context(|| format!("reading {}", p.display()))
    }

    fn save(&self) -> Result<()> {
        std::fs::create_dir_all(STATE_DIR)?;
        let p = state_path(&self.name);
        let tmp = p.with_extension("json.tmp");
        std::fs::write(&tmp, serde_json::to_vec_pretty(self)?)?;
        std::fs::rename(&tmp, &p)?;
        Ok(())
    }

    /// The policy model's view of the cluster (pods in state order).
    #[must_use]
    pub fn cluster(&self) -> ztseg_policy::Cluster {
        ztseg_policy::Cluster {
            namespaces: self
                .namespaces
                .iter()
                .map(|n| ztseg_policy::Namespace { name: n.name.clone(), labels: n.labels.clone() })
                .collect(),
            pods: self
                .pods
                .iter()
                .map(|p| ztseg_policy::Pod {
                    name: p.spec.name.clone(),
                    namespace: p.spec.namespace.clone(),
                    labels: p.spec.labels.clone(),
                    ips: vec![IpAddr::V4(p.ipv4)],
                    ports: self.container_ports(p),
                })
                .collect(),
        }
    }

    /// Every pod serves every lab port over every lab protocol; the container ports are named
    /// `serve-<port>-<proto>` (as in the upstream network-policy e2e model), followed by the
    /// pod's own named ports from the lab file.
    fn container_ports(&self, pod: &PodState) -> Vec<ztseg_policy::ContainerPort> {
        let generated = self.ports.iter().flat_map(|port| {
            self.protocols.iter().map(move |proto| (spec::serve_port_name(*port, proto), *port, proto))
        });
        let declared = pod.spec.container_ports.iter().map(|cp| (cp.name.clone(), cp.port, &cp.protocol));
        generated
            .chain(declared)
            .map(|(name, port, proto)| ztseg_policy::ContainerPort {
                name: Some(name),
                port,
                protocol: protocol(proto),
            })
            .collect()
    }

    /// Why `protocol` is not served or probed in this lab, if it is not.
    #[must_use]
    pub fn unavailable(&self, protocol: &str) -> Option<&str> {
        if protocol == "SCTP" { self.sctp_unavailable.as_deref() } else { None }
    }

    /// The lab's protocols that its pods really serve.
    fn served_protocols(&self) -> Vec<String> {
        self.protocols.iter().filter(|p| self.unavailable(p).is_none()).cloned().collect()
    }
}

/// A lab protocol name (validated by the lab file) as the policy model's protocol.
fn protocol(name: &str) -> ztseg_policy::Protocol {
    match name {
        "UDP" => ztseg_policy::Protocol::Udp,
        "SCTP" => ztseg_policy::Protocol::Sctp,
        _ => ztseg_policy::Protocol::Tcp,
    }
}

/// A lab process (host daemon, controller, pod server) started detached with `setsid`,
/// without the caller's `ZTSEG_*` variables: a shell set up for the CLI (`ZTSEG_SOCKET`,
/// `ZTSEG_PIN_DIR`, ...) must not reach the simulated hosts, which would otherwise share that
/// socket or pin directory.
fn lab_process() -> Command {
    let mut cmd = Command::new("setsid");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with(crate::daemon::config::ENV_PREFIX) {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(Stdio::null());
    cmd
}

/// Run a command, failing with its output.
pub fn sh(args: &[&str]) -> Result<()> {
    let out =
        Command::new(args[0]).args(&args[1..]).output().with_context(|| format!("starting {}", args[0]))?;
    if !out.status.success() {
        bail!("{} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Run a shell command inside a named network namespace.
pub fn ns_sh(ns: &str, cmd: &str) -> Result<()> {
    sh(&["ip", "netns", "exec", ns, "sh", "-c", cmd])
}

/// Run `f` on a thread inside namespace `ns`.
pub fn in_netns<R: Send>(ns: &str, f: impl FnOnce() -> Result<R> + Send) -> Result<R> {
    let path = Path::new("/run/netns").join(ns);
    std::thread::scope(|s| {
        s.spawn(|| {
            enforcer::netns::enter(&path).with_context(|| format!("entering {}", path.display()))?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in {ns} panicked"))?
    })
}

fn read_policies(lab: &LabFile, lab_path: &Path) -> Result<Vec<ztseg_policy::Document>> {
    let files = lab.policy_files(lab_path)?;
    let mut texts = Vec::new();
    for f in &files {
        texts.push(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?);
    }
    ztseg_policy::parse_set(files.iter().map(PathBuf::as_path).zip(texts.iter().map(String::as_str))).map_err(
        |errors| {
            let msg: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::anyhow!("policy errors:\n{}", msg.join("\n"))
        },
    )
}

/// `ztseg lab up -f LAB.yaml`
pub fn up(lab_path: &Path, exe: &Path) -> Result<LabState> {
    let lab = LabFile::load(lab_path)?;
    let name = lab.name().to_owned();
    if state_path(&name).exists() {
        bail!("lab {name:?} is already up; `ztseg lab down -f {}` first", lab_path.display());
    }
    // Parse policies before building anything.
    let policies = read_policies(&lab, lab_path)?;
    let mut state = LabState {
        name: name.clone(),
        lab_file: std::fs::canonicalize(lab_path)?,
        hosts: Vec::new(),
        fabric: None,
        namespaces: lab.namespaces.clone(),
        pods: Vec::new(),
        ports: lab.ports.clone(),
        protocols: lab.protocols.clone(),
        tenants: BTreeMap::new(),
        controller: None,
        sctp_unavailable: None,
    };
    if state.protocols.iter().any(|p| p == "SCTP") {
        state.sctp_unavailable = sctp::available().err();
    }
    if !state.namespaces.iter().any(|n| n.name == "default")
        && lab.pods.iter().any(|p| p.namespace == "default")
    {
        state.namespaces.push(NamespaceSpec { name: "default".into(), labels: BTreeMap::new() });
    }
    // Save early so `lab down` can clean up a half-built lab, which it does if anything
    // below fails (a lab that was already up is left alone above).
    drop(policies);
    state.save()?;
    if let Err(e) = build_and_start(&lab, lab_path, &mut state, exe) {
        let _ = down(&name);
        return Err(e);
    }
    Ok(state)
}

fn build_and_start(lab: &LabFile, lab_path: &Path, state: &mut LabState, exe: &Path) -> Result<()> {
    let name = state.name.clone();
    build(lab, state)?;
    state.save()?;
    std::fs::create_dir_all(policy_dir(&name))?;
    if lab.controller {
        start_controller(state, exe)?;
        state.save()?;
        for h in 0..state.hosts.len() {
            enroll_host(state, h)?;
        }
        controller_apply(state, lab, lab_path)?;
    } else {
        publish_files_only(state, lab, lab_path)?;
    }
    for h in 0..state.hosts.len() {
        start_daemon(state, h, exe)?;
        state.save()?;
    }
    start_servers(state, exe)?;
    state.save()
}

/// Initial copy of the policies, before any daemon runs (nothing to wait for).
fn publish_files_only(state: &LabState, lab: &LabFile, lab_path: &Path) -> Result<()> {
    let dir = policy_dir(&state.name);
    for (i, f) in lab.policy_files(lab_path)?.iter().enumerate() {
        let name =
            format!("{i:03}-{}", f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        std::fs::copy(f, dir.join(name)).with_context(|| format!("copying {}", f.display()))?;
    }
    Ok(())
}

fn build(lab: &LabFile, state: &mut LabState) -> Result<()> {
    let name = &state.name.clone();
    if lab.hosts.len() > 1 {
        let fabric = format!("zl-{name}-fabric");
        sh(&["ip", "netns", "add", &fabric])?;
        state.fabric = Some(fabric.clone());
        ns_sh(&fabric, "ip link add fab type bridge && ip link set fab up && ip link set lo up")?;
    }
    for (h, host) in lab.hosts.iter().enumerate() {
        let netns = format!("zl-{name}-h{h}");
        sh(&["ip", "netns", "add", &netns])?;
        state.hosts.push(HostState {
            name: host.clone(),
            netns: netns.clone(),
            pin_dir: Path::new(PIN_ROOT).join(name).join(host),
            socket: lab_dir(name).join(format!("{host}.sock")),
            daemon_pid: None,
        });
        ns_sh(&netns, "ip link set lo up && sysctl -qw net.ipv4.ip_forward=1")?;
        if let Some(fabric) = &state.fabric {
            ns_sh(
                &netns,
                &format!(
                    "ip link add up0 type veth peer name h{h} netns {fabric} && ip addr add 10.76.0.{}/24 dev up0 && \
                     ip link set up0 up",
                    h + 1
                ),
            )?;
            ns_sh(fabric, &format!("ip link set h{h} master fab && ip link set h{h} up"))?;
        }
    }
    if state.fabric.is_some() {
        for h in 0..lab.hosts.len() {
            for k in 0..lab.hosts.len() {
                if h != k {
                    ns_sh(
                        &state.hosts[h].netns,
                        &format!("ip route add 10.77.{k}.0/24 via 10.76.0.{}", k + 1),
                    )?;
                }
            }
        }
    }
    if lab.controller {
        build_controller_net(state)?;
    }
    let mut per_host = vec![0u8; lab.hosts.len()];
    for (i, pod) in lab.pods.iter().enumerate() {
        let h = lab.hosts.iter().position(|x| x == lab.host_of(pod)).unwrap_or(0);
        per_host[h] += 1;
        let n = per_host[h];
        let netns = format!("zl-{name}-p{i}");
        sh(&["ip", "netns", "add", &netns])?;
        let iface = format!("p{i}");
        let hu8 = u8::try_from(h)?;
        let ipv4 = Ipv4Addr::new(10, 77, hu8, n);
        let tenant = match &pod.tenant {
            None => 0,
            Some(t) => {
                let next = u32::try_from(state.tenants.len())? + 1;
                *state.tenants.entry(t.clone()).or_insert(next)
            }
        };
        state.pods.push(PodState {
            spec: pod.clone(),
            host: h,
            netns: netns.clone(),
            iface: iface.clone(),
            ipv4,
            identity: IDENTITY_FIRST_USER + 1000 + u32::try_from(i)?,
            tenant,
            server_pid: None,
        });
        ns_sh(
            &state.hosts[h].netns,
            &format!(
                "ip link add {iface} type veth peer name eth0 netns {netns} && ip addr add {GATEWAY}/32 dev {iface} && \
                 ip link set {iface} up && ip route add {ipv4}/32 dev {iface}"
            ),
        )?;
        ns_sh(
            &netns,
            &format!(
                "ip link set lo up && ip addr add {ipv4}/32 dev eth0 && ip link set eth0 up && \
                 ip route add {GATEWAY} dev eth0 scope link && ip route add default via {GATEWAY} dev eth0"
            ),
        )?;
    }
    Ok(())
}

/// The controller's namespace with its management bridge, and each host's `mg0` link to it.
fn build_controller_net(state: &mut LabState) -> Result<()> {
    let name = state.name.clone();
    let name = &name;
    let ctl = format!("zl-{name}-ctl");
    sh(&["ip", "netns", "add", &ctl])?;
    state.controller = Some(ControllerState {
        netns: ctl.clone(),
        data_dir: lab_dir(name).join("controller"),
        endpoint: LAB_CONTROLLER.into(),
        pid: None,
    });
    ns_sh(
        &ctl,
        "ip link set lo up && ip link add mg type bridge && ip addr add 10.75.0.1/24 dev mg && ip link set mg up",
    )?;
    for h in 0..state.hosts.len() {
        ns_sh(
            &state.hosts[h].netns,
            &format!(
                "ip link add mg0 type veth peer name m{h} netns {ctl} && ip addr add 10.75.0.{}/24 dev mg0 && \
                 ip link set mg0 up",
                h + 2
            ),
        )?;
        ns_sh(&ctl, &format!("ip link set m{h} master mg && ip link set m{h} up"))?;
    }
    Ok(())
}

fn lab_dir(name: &str) -> PathBuf {
    Path::new(STATE_DIR).join(name)
}

/// The shared policy directory every host's daemon reads.
fn policy_dir(name: &str) -> PathBuf {
    lab_dir(name).join("policies")
}

/// The daemon configuration of host `h`: every pod is a workload (local ones with their
/// interface), with the lab's namespaces, labels, tenants and named ports.
fn host_config(state: &LabState, h: usize) -> String {
    use std::fmt::Write as _;
    let host = &state.hosts[h];
    let dir = lab_dir(&state.name);
    let mut c = format!(
        "node = {node:?}\npin_dir = {pin:?}\nsocket = {sock:?}\nmetrics_addr = \"127.0.0.1:9464\"\npolicy_dir = {pol:?}\n\
         state_dir = {st:?}\npolicy_poll_ms = 200\nnetns = {ns:?}\n",
        node = host.name,
        pin = host.pin_dir.display().to_string(),
        sock = host.socket.display().to_string(),
        pol = policy_dir(&state.name).display().to_string(),
        st = dir.join(format!("{}-state", host.name)).display().to_string(),
        ns = format!("/run/netns/{}", host.netns),
    );
    let labels = |l: &BTreeMap<String, String>| {
        l.iter().map(|(k, v)| format!("{k:?} = {v:?}")).collect::<Vec<_>>().join(", ")
    };
    for n in &state.namespaces {
        let _ = write!(c, "\n[[namespaces]]\nname = {:?}\nlabels = {{ {} }}\n", n.name, labels(&n.labels));
    }
    for p in &state.pods {
        let _ = write!(
            c,
            "\n[[workloads]]\nname = {:?}\nnamespace = {:?}\nlabels = {{ {} }}\nnode = {:?}\nipv4 = \"{}\"\n",
            p.spec.name,
            p.spec.namespace,
            labels(&p.spec.labels),
            state.hosts[p.host].name,
            p.ipv4
        );
        if p.host == h {
            let _ = writeln!(c, "interface = {:?}", p.iface);
        }
        if let Some(t) = &p.spec.tenant {
            let _ = writeln!(c, "tenant = {t:?}");
        }
        let ports: Vec<String> = state
            .container_ports(p)
            .into_iter()
            .map(|cp| {
                format!(
                    "{{ name = {:?}, port = {}, protocol = \"{}\" }}",
                    cp.name.unwrap_or_default(),
                    cp.port,
                    cp.protocol
                )
            })
            .collect();
        let _ = writeln!(c, "ports = [{}]", ports.join(", "));
    }
    if let Some(ctl) = &state.controller {
        let _ = write!(
            c,
            "\n[controller]\nendpoint = {:?}\nidentity_dir = {:?}\nidentity = {:?}\n",
            ctl.endpoint,
            host_identity_dir(state, h).display().to_string(),
            host.name
        );
    }
    c
}

fn host_identity_dir(state: &LabState, h: usize) -> PathBuf {
    lab_dir(&state.name).join(format!("{}-identity", state.hosts[h].name))
}

fn admin_args(ctl: &ControllerState) -> crate::ctl::CtlArgs {
    crate::ctl::CtlArgs {
        controller: ctl.endpoint.clone(),
        identity_dir: Some(ctl.data_dir.join("admin")),
        identity: "admin".into(),
    }
}

/// Run async controller-client work inside the controller's namespace.
fn in_ctl_netns<R: Send>(netns: &str, f: impl std::future::Future<Output = Result<R>> + Send) -> Result<R> {
    in_netns(netns, || tokio::runtime::Builder::new_current_thread().enable_all().build()?.block_on(f))
}

/// Create the lab controller's CA and start it in its namespace.
fn start_controller(state: &mut LabState, exe: &Path) -> Result<()> {
    let dir = lab_dir(&state.name);
    let Some(ctl) = state.controller.as_mut() else { return Ok(()) };
    if !ctl.data_dir.join(ztseg_controller::pki::CA_KEY).exists() {
        ztseg_controller::server::init(&ctl.data_dir, "ztseg.local", &["10.75.0.1".into()], None)?;
    }
    let log_path = dir.join("controller.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let child = lab_process()
        .args(["ip", "netns", "exec", &ctl.netns])
        .arg(exe)
        .args(["controller", "run", "--name", "lab", "--listen", &ctl.endpoint, "--data-dir"])
        .arg(&ctl.data_dir)
        .arg("--siem")
        .arg(format!("file:{}", dir.join("siem.jsonl").display()))
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting the lab controller")?;
    ctl.pid = Some(child.id());
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(15);
    let offset = 0;
    while !std::fs::read_to_string(&log_path).unwrap_or_default()[offset..].contains("controller serving") {
        if std::time::Instant::now() > deadline {
            bail!("the lab controller did not start; log: {}", log_path.display());
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    Ok(())
}

/// Enroll host `h`'s enforcer: a one-time token from the controller, redeemed from the
/// host's namespace with a key generated there.
fn enroll_host(state: &LabState, h: usize) -> Result<()> {
    let Some(ctl) = &state.controller else { return Ok(()) };
    let host = &state.hosts[h];
    let args = admin_args(ctl);
    let name = host.name.clone();
    let token = in_ctl_netns(&ctl.netns, async move {
        crate::ctl::token(&args, "enforcer", &name, 600, 30 * 86_400).await
    })?;
    let files = ztseg_controller::pki::ClientFiles::in_dir(&host_identity_dir(state, h), &host.name);
    let ca = ctl.data_dir.join(ztseg_controller::pki::CA_CERT);
    let endpoint = ctl.endpoint.clone();
    in_ctl_netns(&host.netns, async move {
        ztseg_controller::server::enroll(&endpoint, &ca, &token, &files).await.map(drop)
    })
}

/// Apply the lab file's policies at the controller; returns the controller's version.
fn controller_apply(state: &LabState, lab: &LabFile, lab_path: &Path) -> Result<u64> {
    let Some(ctl) = &state.controller else { bail!("lab {} has no controller", state.name) };
    let staged = lab_dir(&state.name).join("controller-policies");
    let _ = std::fs::remove_dir_all(&staged);
    std::fs::create_dir_all(&staged)?;
    for (i, f) in lab.policy_files(lab_path)?.iter().enumerate() {
        let name =
            format!("{i:03}-{}", f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        std::fs::copy(f, staged.join(name)).with_context(|| format!("copying {}", f.display()))?;
    }
    let args = admin_args(ctl);
    let r = in_ctl_netns(&ctl.netns, async move {
        crate::ctl::apply(&args, &[staged], "ztseg lab apply".into(), 0, false).await
    })?;
    Ok(r.version)
}

/// Wait until every host enforces controller version `version` (or newer).
fn wait_controller_version(state: &LabState, version: u64) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    for host in &state.hosts {
        loop {
            let st = daemon_status(&host.socket)?;
            if st.controller_version >= version && st.policy_loaded {
                break;
            }
            // A host cut off from the controller keeps its last-known policy; it converges
            // when it reconnects.
            if st.policy_stale {
                eprintln!(
                    "host {}: controller unreachable, enforcing stale version {}",
                    host.name, st.controller_version
                );
                break;
            }
            if std::time::Instant::now() > deadline {
                bail!(
                    "host {}: controller policy version {version} not enforced in time (at {}; {})",
                    host.name,
                    st.controller_version,
                    st.policy_error
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

/// `ztseg lab isolate|rejoin -f LAB HOST`: cut or restore a host's link to the controller.
pub fn set_controller_link(lab_path: &Path, host: &str, up: bool) -> Result<()> {
    let lab = LabFile::load(lab_path)?;
    let state = LabState::load(lab.name())?;
    if state.controller.is_none() {
        bail!("lab {} has no controller (set `controller: true` in the lab file)", state.name);
    }
    let h = state.hosts.iter().find(|x| x.name == host).with_context(|| format!("no host {host:?}"))?;
    ns_sh(&h.netns, &format!("ip link set mg0 {}", if up { "up" } else { "down" }))
}

/// `ztseg lab restart -f LAB.yaml HOST [--kill]`: stop a host's enforcer daemon (SIGTERM, or
/// SIGKILL with `kill`) and start it again with the same configuration; its pinned
/// enforcement stays in force meanwhile.
pub fn restart_host(lab_path: &Path, host: &str, kill: bool, exe: &Path) -> Result<()> {
    let lab = LabFile::load(lab_path)?;
    let mut state = LabState::load(lab.name())?;
    let h = state.hosts.iter().position(|x| x.name == host).with_context(|| format!("no host {host:?}"))?;
    if kill && let Some(pid) = state.hosts[h].daemon_pid {
        let _ = Command::new("kill").args(["-KILL", &pid.to_string()]).status();
    }
    stop_daemon(&mut state, h);
    let started = start_daemon(&mut state, h, exe);
    state.save()?;
    started
}

/// Query a host daemon's status.
fn daemon_status(socket: &Path) -> Result<ztseg_api::enforcer::StatusResponse> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut c = crate::client::connect(socket).await?;
        Ok(c.status(ztseg_api::enforcer::StatusRequest {}).await?.into_inner())
    })
}

/// Start host `h`'s daemon and wait until it is ready.
fn start_daemon(state: &mut LabState, h: usize, exe: &Path) -> Result<()> {
    spawn_daemon(state, h, exe)?;
    wait_daemon_ready(state, h)
}

/// Start host `h`'s daemon with a freshly written configuration.
fn spawn_daemon(state: &mut LabState, h: usize, exe: &Path) -> Result<()> {
    let dir = lab_dir(&state.name);
    std::fs::create_dir_all(&dir)?;
    let cfg = dir.join(format!("{}.toml", state.hosts[h].name));
    std::fs::write(&cfg, host_config(state, h))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join(format!("{}.log", state.hosts[h].name)))?;
    let child = lab_process()
        .arg(exe)
        .args(["enforcer", "run", "--config"])
        .arg(&cfg)
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
        .context("starting a host enforcer")?;
    state.hosts[h].daemon_pid = Some(child.id());
    Ok(())
}

fn wait_daemon_ready(state: &LabState, h: usize) -> Result<()> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        if let Ok(st) = daemon_status(&state.hosts[h].socket)
            && st.ready
        {
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "enforcer of host {} did not become ready; log: {}",
                state.hosts[h].name,
                lab_dir(&state.name).join(format!("{}.log", state.hosts[h].name)).display()
            );
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

fn stop_daemon(state: &mut LabState, h: usize) {
    if let Some(pid) = state.hosts[h].daemon_pid.take() {
        let _ = Command::new("kill").arg(pid.to_string()).status();
        // Wait for the socket to go away (the daemon removes it on SIGTERM).
        for _ in 0..100 {
            if !Path::new(&format!("/proc/{pid}")).exists() {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
}

/// Copy the lab file's policies into the shared directory and wait until every daemon has
/// applied them (or reports an error, which is returned).
fn publish_policies(state: &LabState, lab: &LabFile, lab_path: &Path) -> Result<()> {
    if state.controller.is_some() {
        let v = controller_apply(state, lab, lab_path)?;
        return wait_controller_version(state, v);
    }
    let dir = policy_dir(&state.name);
    std::fs::create_dir_all(&dir)?;
    let mut wanted = BTreeMap::new();
    for (i, f) in lab.policy_files(lab_path)?.iter().enumerate() {
        let name =
            format!("{i:03}-{}", f.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default());
        wanted.insert(name, std::fs::read(f).with_context(|| format!("reading {}", f.display()))?);
    }
    let mut changed = false;
    for e in std::fs::read_dir(&dir)?.flatten() {
        let n = e.file_name().to_string_lossy().into_owned();
        if !wanted.contains_key(&n) {
            std::fs::remove_file(e.path())?;
            changed = true;
        }
    }
    let before: Vec<u64> =
        state.hosts.iter().map(|h| daemon_status(&h.socket).map_or(0, |s| s.policy_version)).collect();
    for (n, bytes) in &wanted {
        let p = dir.join(n);
        if std::fs::read(&p).ok().as_ref() != Some(bytes) {
            let tmp = dir.join(format!(".{n}.tmp"));
            std::fs::write(&tmp, bytes)?;
            std::fs::rename(&tmp, &p)?;
            changed = true;
        }
    }
    if !changed {
        return Ok(());
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    for (h, host) in state.hosts.iter().enumerate() {
        loop {
            let st = daemon_status(&host.socket)?;
            if st.policy_version > before[h] && st.policy_error.is_empty() {
                break;
            }
            if !st.policy_error.is_empty() && st.policy_version == before[h] {
                bail!("host {}: {}", host.name, st.policy_error);
            }
            if std::time::Instant::now() > deadline {
                bail!("host {}: policy not applied in time", host.name);
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    }
    Ok(())
}

fn start_servers(state: &mut LabState, exe: &Path) -> Result<()> {
    let ports: Vec<String> = state.ports.iter().map(ToString::to_string).collect();
    let log_dir = Path::new(STATE_DIR).join(&state.name);
    std::fs::create_dir_all(&log_dir)?;
    let served = state.served_protocols();
    for pod in &mut state.pods {
        let log = std::fs::File::create(log_dir.join(format!("{}.log", pod.netns)))?;
        let child = lab_process()
            .arg(exe)
            .args(["lab", "serve", "--netns", &pod.netns, "--ports", &ports.join(","), "--protocols"])
            .arg(served.join(","))
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("starting a pod server")?;
        pod.server_pid = Some(child.id());
    }
    // Wait until every server is listening (it writes its ready line).
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    for pod in &state.pods {
        let log = log_dir.join(format!("{}.log", pod.netns));
        while !std::fs::read_to_string(&log).unwrap_or_default().contains("serving") {
            if std::time::Instant::now() > deadline {
                bail!(
                    "server in {} did not start: {}",
                    pod.id(),
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }
    Ok(())
}

/// `ztseg lab apply -f LAB.yaml`: re-read the lab file's policies and namespace/pod labels.
pub fn apply(lab_path: &Path, exe: &Path) -> Result<LabState> {
    let lab = LabFile::load(lab_path)?;
    let mut state = LabState::load(lab.name())?;
    // Check locally first: a bad file is reported here and nothing changes.
    read_policies(&lab, lab_path)?;
    let old_pods: Vec<_> = state.pods.iter().map(|p| p.spec.clone()).collect();
    let old_ns = state.namespaces.clone();
    if lab.pods.len() != state.pods.len() {
        bail!("{}: pods: adding or removing pods needs `lab down` and `lab up`", lab_path.display());
    }
    for (spec, pod) in lab.pods.iter().zip(&mut state.pods) {
        if spec.name != pod.spec.name || spec.namespace != pod.spec.namespace {
            bail!(
                "{}: pods: pod {}/{} changed identity; recreate the lab",
                lab_path.display(),
                spec.namespace,
                spec.name
            );
        }
        pod.spec.labels.clone_from(&spec.labels);
        pod.spec.container_ports.clone_from(&spec.container_ports);
    }
    for ns in &lab.namespaces {
        if let Some(s) = state.namespaces.iter_mut().find(|n| n.name == ns.name) {
            s.labels.clone_from(&ns.labels);
        }
    }
    let relabelled =
        old_ns != state.namespaces || state.pods.iter().zip(&old_pods).any(|(p, old)| p.spec != *old);
    publish_policies(&state, &lab, lab_path)?;
    if relabelled {
        restart_daemons(&mut state, exe)?;
    }
    state.save()?;
    Ok(state)
}

/// Restart every host's daemon with a regenerated configuration (labels changed), all hosts
/// at once. Pinned enforcement stays in force throughout.
fn restart_daemons(state: &mut LabState, exe: &Path) -> Result<()> {
    for h in 0..state.hosts.len() {
        stop_daemon(state, h);
    }
    for h in 0..state.hosts.len() {
        spawn_daemon(state, h, exe)?;
    }
    (0..state.hosts.len()).try_for_each(|h| wait_daemon_ready(state, h))
}

/// `ztseg lab label -f LAB.yaml [ns/]pod|ns:NAME key=value|key- ...`: change labels of a pod
/// or namespace and re-apply the lab file's policies. The change lasts until the next `lab
/// apply`, which sets every label from the lab file again.
pub fn label(lab_path: &Path, target: &str, changes: &[String], exe: &Path) -> Result<LabState> {
    for c in changes {
        let (k, v) = match c.strip_suffix('-') {
            Some(k) if !c.contains('=') => (k, ""),
            _ => c
                .split_once('=')
                .with_context(|| format!("label change {c:?}: expected key=value or key-"))?,
        };
        ztseg_policy::check_label(k, v).map_err(|m| anyhow::anyhow!("label change {c:?}: {m}"))?;
    }
    let lab = LabFile::load(lab_path)?;
    let mut state = LabState::load(lab.name())?;
    let labels = if let Some(ns) = target.strip_prefix("ns:") {
        &mut state
            .namespaces
            .iter_mut()
            .find(|n| n.name == ns)
            .with_context(|| format!("no namespace {ns:?}"))?
            .labels
    } else {
        let (ns, name) = target.split_once('/').unwrap_or(("default", target));
        &mut state
            .pods
            .iter_mut()
            .find(|p| p.spec.namespace == ns && p.spec.name == name)
            .with_context(|| format!("no pod {ns}/{name}"))?
            .spec
            .labels
    };
    for c in changes {
        match (c.strip_suffix('-'), c.split_once('=')) {
            (_, Some((k, v))) => {
                labels.insert(k.to_owned(), v.to_owned());
            }
            (Some(k), None) => {
                labels.remove(k);
            }
            (None, None) => bail!("label change {c:?}: expected key=value or key-"),
        }
    }
    restart_daemons(&mut state, exe)?;
    state.save()?;
    Ok(state)
}

/// `ztseg lab down`: stop servers, remove enforcement and namespaces, forget the lab.
pub fn down(name: &str) -> Result<()> {
    let mut state = LabState::load(name)?;
    for h in 0..state.hosts.len() {
        stop_daemon(&mut state, h);
    }
    for pod in &state.pods {
        if let Some(pid) = pod.server_pid {
            let _ = Command::new("kill").arg(pid.to_string()).output();
        }
    }
    if let Some(pid) = state.controller.as_ref().and_then(|c| c.pid) {
        // `ip netns exec` execs the controller: this pid is the controller itself.
        let _ = Command::new("kill").arg(pid.to_string()).output();
    }
    let mut errors = Vec::new();
    for host in &state.hosts {
        if let Err(e) = Datapath::uninstall(&host.pin_dir) {
            errors.push(format!("{}: {e}", host.pin_dir.display()));
        }
    }
    let _ = std::fs::remove_dir(Path::new(PIN_ROOT).join(name));
    for ns in state
        .pods
        .iter()
        .map(|p| &p.netns)
        .chain(state.hosts.iter().map(|h| &h.netns))
        .chain(state.fabric.iter())
        .chain(state.controller.iter().map(|c| &c.netns))
    {
        let _ = Command::new("ip").args(["netns", "del", ns]).output();
    }
    let _ = std::fs::remove_dir_all(Path::new(STATE_DIR).join(name));
    std::fs::remove_file(state_path(name))?;
    if errors.is_empty() { Ok(()) } else { bail!("lab {name} removed with errors:\n{}", errors.join("\n")) }
}

#[cfg(test)]
mod tests {
    #[test]
    fn label_changes_are_checked_before_anything_happens() {
        // No lab file and no lab: the change itself is refused first.
        let nowhere = std::path::Path::new("/nonexistent/lab.yaml");
        for (change, want) in [
            ("bad key=x", "invalid label key `bad key`"),
            ("app=-x", "invalid label value `-x`"),
            ("tier=front-", "invalid label value `front-`"),
            ("app", "expected key=value or key-"),
        ] {
            let e = super::label(nowhere, "x/a", &[change.to_owned()], nowhere).unwrap_err().to_string();
            assert!(e.contains(want) && e.contains(change), "{change}: {e}");
        }
        // A valid change gets as far as the lab file.
        let e =
            super::label(nowhere, "x/a", &["app=web".to_owned(), "old-".to_owned()], nowhere).unwrap_err();
        assert!(e.to_string().contains("reading /nonexistent/lab.yaml"), "{e}");
    }
}
