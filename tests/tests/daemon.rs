//! The enforcer daemon (`ztseg enforcer run`) as a process: configuration errors, readiness,
//! the root-only API socket, policy reload, metrics that match the traffic, grants through
//! the CLI, and restarts (SIGTERM and SIGKILL) with no enforcement gap.

use std::{
    io::{Read as _, Write as _},
    net::{TcpStream, UdpSocket},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ztseg_integration::{
    netns::{Lab, Netns},
    traffic::{tcp_connect, tcp_echo, udp_echo},
    unique,
};

const ZTSEG: &str = env!("CARGO_BIN_EXE_ztseg-t");

struct Daemon {
    dir: PathBuf,
    config: PathBuf,
    pin_dir: PathBuf,
    socket: PathBuf,
    child: Option<Child>,
    /// Extra environment of the daemon (`ZTSEG_*` overrides).
    env: Vec<(&'static str, &'static str)>,
}

/// Config for pods a (hv0, 10.77.0.1) and b (hv1, 10.77.0.2) of a [`Lab`].
fn write_config(lab: &Lab, name: &str) -> Daemon {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let pin_dir = PathBuf::from(ztseg_integration::TEST_PIN_ROOT).join(unique(name));
    let socket = PathBuf::from("/run/ztseg-test").join(format!("{}.sock", unique(name)));
    let config = dir.join("enforcer.toml");
    std::fs::write(
        &config,
        format!(
            r#"node = "n1"
pin_dir = "{pin}"
socket = "{sock}"
metrics_addr = "127.0.0.1:9464"
policy_dir = "{dir}/policies"
state_dir = "{dir}/state"
policy_poll_ms = 200
netns = "{ns}"

[[workloads]]
name = "a"
labels = {{ app = "a" }}
interface = "hv0"
ipv4 = "10.77.0.1"

[[workloads]]
name = "b"
labels = {{ app = "b" }}
interface = "hv1"
ipv4 = "10.77.0.2"

[maps]
conntrack_entries = 4096
"#,
            pin = pin_dir.display(),
            sock = socket.display(),
            dir = dir.display(),
            ns = lab.host.path().display()
        ),
    )
    .unwrap();
    Daemon { dir, config, pin_dir, socket, child: None, env: Vec::new() }
}

impl Daemon {
    fn start(&mut self) {
        let log = std::fs::File::create(self.dir.join("daemon.log")).unwrap();
        self.child = Some(
            ztseg_integration::clean_command(ZTSEG)
                .args(["enforcer", "run", "--config"])
                .arg(&self.config)
                .envs(self.env.iter().copied())
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .unwrap(),
        );
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("daemon.log")).unwrap_or_default()
    }

    fn cli(&self, args: &[&str]) -> (bool, String) {
        let out = ztseg_integration::clean_command(ZTSEG)
            .args(args)
            .env("ZTSEG_SOCKET", &self.socket)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)),
        )
    }

    fn stop(&mut self, signal: &str) {
        if let Some(mut c) = self.child.take() {
            Command::new("kill").args([signal, &c.id().to_string()]).status().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.stop("-KILL");
        let _ = enforcer::Datapath::uninstall(&self.pin_dir);
        let _ = std::fs::remove_dir_all(&self.dir);
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// A daemon for `lab` enforcing `policy` (as `policies/b.yaml`), started and ready.
fn started(lab: &Lab, name: &str, policy: &str) -> Daemon {
    let mut d = write_config(lab, name);
    std::fs::write(d.dir.join("policies/b.yaml"), policy).unwrap();
    d.start();
    wait_ready(&lab.host, &d);
    d
}

/// GET `path` from the daemon's HTTP endpoint inside the host namespace: (status, body).
fn http(host: &Netns, path: &str) -> Option<(u16, String)> {
    host.enter(|| {
        let mut s =
            TcpStream::connect_timeout(&"127.0.0.1:9464".parse().unwrap(), Duration::from_secs(1)).ok()?;
        s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
        s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).ok()?;
        let mut out = String::new();
        s.read_to_string(&mut out).ok()?;
        let status = out.split_whitespace().nth(1)?.parse().ok()?;
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default();
        Some((status, body))
    })
}

fn wait_ready(host: &Netns, d: &Daemon) {
    let start = Instant::now();
    while http(host, "/readyz").map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(20), "daemon not ready:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn metric(body: &str, name_and_labels: &str) -> u64 {
    body.lines()
        .find_map(|l| l.strip_prefix(name_and_labels).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0)
}

/// Wait until the daemon has applied one more policy version than `before` times (its log).
fn wait_applied(d: &Daemon, before: usize) {
    let start = Instant::now();
    while d.log().matches("\"policy applied\"").count() <= before {
        assert!(start.elapsed() < Duration::from_secs(10), "policy not applied:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Write `text` as the daemon's only policy file and wait until it is applied.
fn set_policy(d: &Daemon, text: &str) {
    let before = d.log().matches("\"policy applied\"").count();
    let tmp = d.dir.join("policies/.p.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(tmp, d.dir.join("policies/b.yaml")).unwrap();
    wait_applied(d, before);
}

/// b's ingress: UDP 9999 from `block` (an ipBlock with optional excepts).
fn b_from_block(block: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: b-from-block}}\nspec:\n  podSelector: {{matchLabels: {{app: b}}}}\n  ingress:\n  - from:\n    - ipBlock: {block}\n    ports:\n    - {{protocol: UDP, port: 9999}}\n"
    )
}

const POLICY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-from-a}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from:\n    - podSelector: {matchLabels: {app: a}}\n    ports:\n    - {port: 8080}\n";

#[test]
fn config_error_exits_64_naming_the_field() {
    let dir = std::env::temp_dir().join(unique("zcfg"));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("bad.toml");
    std::fs::write(
        &cfg,
        "[[workloads]]\nname = \"a\"\nipv4 = \"10.0.0.1\"\ninterface = \"v0\"\nmode = \"watch\"\n",
    )
    .unwrap();
    let out = ztseg_integration::clean_command(ZTSEG)
        .args(["enforcer", "run", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("workloads[0].mode"), "{err}");
    std::fs::write(&cfg, "pin_dir = \"/sys/fs/bpf/x\"\n").unwrap();
    let out = ztseg_integration::clean_command(ZTSEG)
        .args(["enforcer", "run", "--config"])
        .arg(&cfg)
        .env("ZTSEG_POLICY_POLL_MS", "often")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("policy_poll_ms"));
    let _ = std::fs::remove_dir_all(dir);
}

#[test]
fn readyz_waits_for_attachment_and_socket_is_root_only() {
    ztseg_integration::require_root();
    let lab = Lab::new(1); // hv1 (workload b) does not exist yet
    let mut d = write_config(&lab, "zrdy");
    // A shell set up for the CLI, and a variable nobody knows: neither stops the daemon; the
    // unknown one is named in a warning.
    d.env = vec![
        ("ZTSEG_CONTROLLER", "ctl.example:7443"),
        ("ZTSEG_IDENTITY_DIR", "/nonexistent/admin"),
        ("ZTSEG_BOGUS", "1"),
    ];
    d.start();
    let start = Instant::now();
    while http(&lab.host, "/healthz").map(|r| r.0) != Some(200) {
        assert!(start.elapsed() < Duration::from_secs(20), "no /healthz:\n{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(http(&lab.host, "/readyz").map(|r| r.0), Some(503), "not ready while hv1 is missing");
    let warning = d
        .log()
        .lines()
        .find(|l| l.contains("unknown environment variable ignored"))
        .map(str::to_owned)
        .unwrap_or_default();
    assert!(warning.contains("\"level\":\"warn\"") && warning.contains("ZTSEG_BOGUS"), "{}", d.log());
    assert!(!d.log().contains("ZTSEG_CONTROLLER") && !d.log().contains("ZTSEG_IDENTITY_DIR"), "{}", d.log());
    let (ok, out) = d.cli(&["enforcer", "status", "-o", "json"]);
    assert!(ok, "{out}");
    assert!(out.contains("\"attached\": false"), "{out}");
    assert!(out.contains("\"local_delivery\": true"), "on by default: {out}");
    // The interface appears: the daemon attaches and becomes ready.
    let pod = Netns::new("ztp");
    lab.host.sh(&format!("ip link add hv1 type veth peer name eth0 netns {} && ip link set hv1 master br0 && ip link set hv1 up", pod.name));
    wait_ready(&lab.host, &d);
    // Only root may use the API socket: its mode keeps others from connecting at all ...
    let as_nobody = || {
        Command::new("setpriv")
            .args([
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                ZTSEG,
                "enforcer",
                "status",
                "--socket",
            ])
            .arg(&d.socket)
            .output()
            .unwrap()
    };
    let out = as_nobody();
    assert!(!out.status.success(), "non-root caller was served");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("connecting to the enforcer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // ... and should the mode be opened, the peer-credential check refuses the connection.
    {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&d.socket, std::fs::Permissions::from_mode(0o666)).unwrap();
        std::fs::set_permissions(d.socket.parent().unwrap(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let out = as_nobody();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && !err.contains("Permission denied"), "uid 65534: {err}");
    let start = Instant::now();
    while !d.log().contains("refused non-root API caller") {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(d.log().contains("\"uid\":\"65534\""), "{}", d.log());
    let (ok, out) = d.cli(&["enforcer", "status"]);
    assert!(ok && out.contains("true"), "{out}");
}

/// A flood of denied datagrams under an event rate limit (set through the environment):
/// every datagram is dropped and counted in `ztseg_packets_total` and in the receiver's
/// per-workload drop count; the daemon reads no more events than the limit lets through, and
/// each one it did not get is counted as suppressed.
#[test]
fn a_drop_flood_is_counted_exactly_and_its_events_bounded() {
    const FLOOD: u64 = 20_000;
    ztseg_integration::require_root();
    let lab = Lab::routed(2);
    let mut d = write_config(&lab, "zflood");
    d.env = vec![("ZTSEG_EVENT_RATE_LIMIT", "100"), ("ZTSEG_EVENT_BURST", "100")];
    std::fs::write(d.dir.join("policies/b.yaml"), POLICY).unwrap();
    d.start();
    wait_ready(&lab.host, &d);
    let (ok, status) = d.cli(&["enforcer", "status", "-o", "json"]);
    assert!(ok, "{status}");
    assert!(
        status.contains("\"event_rate_limit\": 100")
            && status.contains("\"event_burst\": 100")
            && status.contains("\"event_rate_limit_total\": 40000"),
        "{status}"
    );
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    udp_echo(b, "10.77.0.2:9999");
    let drops = "ztseg_packets_total{reason=\"drop_default\"}";
    let events = "ztseg_flow_events_total{workload=\"default/b\",tenant=\"\",verdict=\"DROP\",reason=\"drop_default\"}";
    let suppressed = "ztseg_events_suppressed_total";
    let m0 = http(&lab.host, "/metrics").unwrap().1;
    let start = Instant::now();
    a.enter(|| {
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..FLOOD {
            s.send_to(b"x", "10.77.0.2:9999").unwrap();
        }
    });
    let secs = start.elapsed().as_secs_f64();
    let delta = |body: &str, m: &str| metric(body, m) - metric(&m0, m);
    // The daemon reads events in batches: wait until every drop is accounted for.
    let t0 = Instant::now();
    let body = loop {
        let body = http(&lab.host, "/metrics").unwrap().1;
        if delta(&body, events) >= FLOOD || t0.elapsed() > Duration::from_secs(10) {
            break body;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(delta(&body, drops), FLOOD, "every datagram dropped and counted:\n{body}");
    assert_eq!(metric(&body, "ztseg_events_lost_total"), 0, "{body}");
    // b's per-workload drop count is exact: the events read plus those the kernel counted
    // for b instead of emitting them.
    assert_eq!(delta(&body, events), FLOOD, "b's drops by workload and reason:\n{body}");
    let held = delta(&body, suppressed);
    assert!(held <= FLOOD, "{body}");
    let read = FLOOD - held;
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "small positive bound")]
    let bound = (f64::from(u32::try_from(cpus).unwrap()) * (100.0 + 1.0 + 100.0 * (secs + 0.05))) as u64;
    assert!(read >= 100 && read <= bound, "{read} drop events read in {secs:.2} s, at most {bound}:\n{body}");
}

/// `ztseg explain` through the daemon: both local ends of a flow are explained, the allowing
/// rule is named by its owner, a port no rule allows ends in default deny, and what the
/// explanation says is what the traffic does.
#[test]
fn explain_names_the_deciding_rule_at_both_ends() {
    ztseg_integration::require_root();
    let lab = Lab::routed(2);
    let d = started(&lab, "zexpl", POLICY);
    let explain = |port: &str| {
        let (ok, out) =
            d.cli(&["-o", "json", "explain", "--from", "default/a", "--to", "10.77.0.2", "--port", port]);
        assert!(ok, "{out}\n{}", d.log());
        let v: serde_json::Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
        let checks = v.as_array().unwrap().clone();
        assert_eq!(checks.len(), 2, "sender's and receiver's checks: {out}");
        let at = |dir: &str| checks.iter().find(|c| c["direction"] == dir).cloned().unwrap();
        (at("egress"), at("ingress"))
    };
    let (out, inn) = explain("8080");
    assert_eq!(
        (out["workload"].as_str(), out["verdict"].as_str()),
        (Some("default/a"), Some("ALLOW")),
        "{out}"
    );
    assert_eq!(
        (inn["workload"].as_str(), inn["verdict"].as_str()),
        (Some("default/b"), Some("ALLOW")),
        "{inn}"
    );
    assert_eq!(inn["reason"], "allow_policy", "{inn}");
    assert_eq!(inn["owner"], "policy:default/b:ingress", "the allowing rule's owner: {inn}");
    assert!(
        inn["steps"]
            .as_str()
            .unwrap()
            .contains("policy ingress default/a -> default/b proto 6 port 8080: ALLOW"),
        "{inn}"
    );
    assert_eq!(inn["peer_source"], "exact", "{inn}");
    let (_, inn) = explain("8081");
    assert_eq!(
        (inn["verdict"].as_str(), inn["reason"].as_str()),
        (Some("DROP"), Some("drop_default")),
        "{inn}"
    );
    assert!(inn["steps"].as_str().unwrap().contains("no live rule allows it"), "{inn}");
    // The table form shows the steps.
    let (ok, table) = d.cli(&["explain", "--from", "10.77.0.1", "--to", "default/b", "--port", "8081"]);
    assert!(ok && table.contains("default/b ingress check, peer 10.77.0.1: DROP"), "{table}");
    // And the traffic agrees.
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8080");
    tcp_echo(b, "10.77.0.2:8081");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some());
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none());
    // Bad requests say what is wrong.
    let (ok, out) = d.cli(&["explain", "--from", "nobody/x", "--to", "10.77.0.2", "--port", "80"]);
    assert!(!ok && out.contains("neither an address nor a workload"), "{out}");
    let (ok, out) = d.cli(&["explain", "--from", "10.9.9.9", "--to", "10.9.9.8", "--port", "80"]);
    assert!(!ok && out.contains("belongs to a workload"), "{out}");
}

#[test]
fn policy_reload_metrics_and_malformed_policy() {
    ztseg_integration::require_root();
    // Routed pods: traffic between them takes local delivery (counted in its own metric).
    let lab = Lab::routed(2);
    let d = started(&lab, "zpol", POLICY);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8080");
    tcp_echo(b, "10.77.0.2:8081");
    udp_echo(b, "10.77.0.2:9999");
    assert!(
        tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some(),
        "allowed by policy:\n{}",
        d.log()
    );
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none());
    // The first connection resolved b's neighbour entry on the host; this one is delivered
    // locally (SYN, SYN-ACK, ACK at least).
    let deliveries = metric(&http(&lab.host, "/metrics").unwrap().1, "ztseg_local_deliveries_total");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some());
    let body = http(&lab.host, "/metrics").unwrap().1;
    assert!(metric(&body, "ztseg_local_deliveries_total") >= deliveries + 3, "{body}");

    // Exactly five datagrams to a port b's policy does not allow: five drop events for b.
    let key = "ztseg_flow_events_total{workload=\"default/b\",tenant=\"\",verdict=\"DROP\",reason=\"drop_default\"}";
    let before = metric(&http(&lab.host, "/metrics").unwrap().1, key);
    a.enter(|| {
        let s = UdpSocket::bind("10.77.0.1:0").unwrap();
        for _ in 0..5 {
            s.send_to(b"x", "10.77.0.2:9999").unwrap();
        }
    });
    let start = Instant::now();
    let mut now = before;
    while now < before + 5 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(100));
        now = metric(&http(&lab.host, "/metrics").unwrap().1, key);
    }
    std::thread::sleep(Duration::from_millis(300));
    let body = http(&lab.host, "/metrics").unwrap().1;
    assert_eq!(metric(&body, key), before + 5, "{body}");

    // Exactly four new connections to the port b's policy allows: four new-flow events at
    // each end (a's egress check, b's ingress check), each counted for its workload.
    let allowed = |w: &str| {
        format!(
            "ztseg_flow_events_total{{workload=\"default/{w}\",tenant=\"\",verdict=\"ALLOW\",reason=\"allow_policy\"}}"
        )
    };
    let (allow_a, allow_b) = (allowed("a"), allowed("b"));
    let m0 = http(&lab.host, "/metrics").unwrap().1;
    for _ in 0..4 {
        let mut c = tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).expect("allowed");
        assert!(ztseg_integration::traffic::echo_once(&mut c, Duration::from_secs(1)));
    }
    let delta = |body: &str, m: &str| metric(body, m) - metric(&m0, m);
    let start = Instant::now();
    let mut body = http(&lab.host, "/metrics").unwrap().1;
    while (delta(&body, &allow_a) < 4 || delta(&body, &allow_b) < 4)
        && start.elapsed() < Duration::from_secs(5)
    {
        std::thread::sleep(Duration::from_millis(100));
        body = http(&lab.host, "/metrics").unwrap().1;
    }
    std::thread::sleep(Duration::from_millis(300));
    let body = http(&lab.host, "/metrics").unwrap().1;
    assert_eq!((delta(&body, &allow_a), delta(&body, &allow_b)), (4, 4), "new flows by workload:\n{body}");
    assert_eq!(metric(&body, key), before + 5, "no drop among them:\n{body}");
    assert!(metric(&body, "ztseg_packets_total{reason=\"drop_default\"}") >= 5);
    assert_eq!(metric(&body, "ztseg_ready"), 1);
    assert!(body.contains("ztseg_map_capacity{map=\"policy\"}"));
    // [maps] sizes the maps it creates: conntrack 4096 for each address family.
    assert_eq!(metric(&body, "ztseg_map_capacity{map=\"conntrack\"}"), 8192, "{body}");
    // Map pressure covers the admin tier, identities and CIDR peers too: no tenant policy and
    // no ipBlock here; a and b (and the host's addresses) have identities.
    assert_eq!(metric(&body, "ztseg_map_capacity{map=\"identity\"}"), 65_536, "{body}");
    assert!(metric(&body, "ztseg_map_entries{map=\"identity\"}") >= 2, "{body}");
    for map in ["admin", "ranges", "cidr"] {
        assert!(body.contains(&format!("ztseg_map_entries{{map=\"{map}\"}} 0\n")), "{map}: {body}");
        assert!(metric(&body, &format!("ztseg_map_capacity{{map=\"{map}\"}}")) > 0, "{map}: {body}");
    }

    // A malformed file is rejected with file, position and field; the policy in force stays.
    std::fs::write(d.dir.join("policies/bad.yaml"), "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: x}\nspec:\n  podSelector: {}\n  ingress:\n  - ports:\n    - {port: 70000}\n").unwrap();
    let start = Instant::now();
    while !d.log().contains("policy rejected") {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(
        d.log().contains("bad.yaml:8:") && d.log().contains("spec.ingress[0].ports[0].port"),
        "{}",
        d.log()
    );
    let (_, status) = d.cli(&["enforcer", "status", "-o", "json"]);
    assert!(status.contains("bad.yaml"), "{status}");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some());
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none());

    // The same policy defined in a second file is refused as a set, with the second file's
    // position (not silently merged into one policy allowing both files' ports).
    std::fs::remove_file(d.dir.join("policies/bad.yaml")).unwrap();
    let rejected = d.log().matches("policy rejected").count();
    std::fs::write(d.dir.join("policies/dup.yaml"), POLICY.replace("port: 8080", "port: 8081")).unwrap();
    let start = Instant::now();
    while d.log().matches("policy rejected").count() == rejected {
        assert!(start.elapsed() < Duration::from_secs(5), "{}", d.log());
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, status) = d.cli(&["enforcer", "status", "-o", "json"]);
    assert!(
        status.contains("dup.yaml:3:18: metadata.name: duplicate NetworkPolicy `default/b-from-a`"),
        "{status}"
    );
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none());
}

#[test]
fn grants_through_the_cli() {
    ztseg_integration::require_root();
    let lab = Lab::new(2);
    let d = started(&lab, "zgnt", POLICY);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:9000");
    assert!(tcp_connect(a, "10.77.0.2:9000", Duration::from_millis(400)).is_none());
    let (ok, out) = d.cli(&[
        "grants",
        "open",
        "default/a",
        "default/b",
        "--port",
        "9000",
        "--ttl",
        "3s",
        "--reason",
        "test",
        "-o",
        "json",
    ]);
    assert!(ok, "{out}");
    let mut conn = tcp_connect(a, "10.77.0.2:9000", Duration::from_secs(2)).expect("granted");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(8)
        && ztseg_integration::traffic::echo_once(&mut conn, Duration::from_millis(300))
    {
        std::thread::sleep(Duration::from_millis(100));
    }
    let lived = start.elapsed();
    assert!(lived > Duration::from_secs(2) && lived < Duration::from_secs(5), "grant lived {lived:?}");
    // Errors carry explicit codes.
    let (ok, out) = d.cli(&["grants", "open", "default/a", "default/zz", "--port", "9000", "--ttl", "3s"]);
    assert!(!ok && out.contains("not found") && out.contains("default/zz"), "{out}");
    // Revocation cuts a live granted connection.
    let (ok, out) =
        d.cli(&["grants", "open", "default/a", "default/b", "--port", "9000", "--ttl", "1h", "-o", "json"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let cookie = v[0]["cookie"].as_u64().expect("cookie is a number").to_string();
    let mut conn = tcp_connect(a, "10.77.0.2:9000", Duration::from_secs(2)).expect("granted");
    assert!(ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)));
    let (ok, out) = d.cli(&["grants", "revoke", &cookie]);
    assert!(ok, "{out}");
    assert!(!ztseg_integration::traffic::echo_once(&mut conn, Duration::from_millis(500)));
    // A grant over a port range.
    tcp_echo(b, "10.77.0.2:9050");
    assert!(tcp_connect(a, "10.77.0.2:9050", Duration::from_millis(400)).is_none());
    let (ok, out) = d.cli(&[
        "grants",
        "open",
        "default/a",
        "default/b",
        "--port",
        "9000-9100",
        "--ttl",
        "1h",
        "-o",
        "json",
    ]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((v[0]["port"].as_u64(), v[0]["end_port"].as_u64()), (Some(9000), Some(9100)), "{out}");
    assert!(tcp_connect(a, "10.77.0.2:9050", Duration::from_secs(2)).is_some(), "port inside the range");
    let (ok, out) =
        d.cli(&["grants", "open", "default/a", "default/b", "--port", "9100-9000", "--ttl", "1h"]);
    assert!(!ok && out.contains("first port comes first"), "{out}");
    // The policy's own allow is untouched by the grants.
    tcp_echo(b, "10.77.0.2:8080");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some());
}

#[test]
fn restarts_keep_enforcement_without_a_gap() {
    ztseg_integration::require_root();
    let lab = Lab::new(2);
    let mut d = started(&lab, "zrst", POLICY);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8080");
    tcp_echo(b, "10.77.0.2:8081");
    let mut conn = tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).expect("allowed");
    let stop = Arc::new(AtomicBool::new(false));
    let leaked = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let pod_a = a.path();
    let probe_thread = {
        let (stop, leaked, probes) = (stop.clone(), leaked.clone(), probes.clone());
        std::thread::spawn(move || {
            enforcer::netns::enter(&pod_a).unwrap();
            let addr = "10.77.0.2:8081".parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                if TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
                probes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let rules_before = d.cli(&["rules", "-o", "json"]).1;
    for signal in ["-TERM", "-KILL"] {
        assert!(ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)));
        d.stop(signal);
        for _ in 0..10 {
            assert!(
                ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)),
                "flow broke with the daemon down ({signal})"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        d.start();
        wait_ready(&lab.host, &d);
        assert!(
            ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)),
            "flow broke after restart ({signal})"
        );
    }
    stop.store(true, Ordering::Relaxed);
    probe_thread.join().unwrap();
    assert!(probes.load(Ordering::Relaxed) > 5);
    assert_eq!(leaked.load(Ordering::Relaxed), 0, "a denied probe got through");
    assert_eq!(
        d.cli(&["rules", "-o", "json"]).1,
        rules_before,
        "rules and their cookies survived both restarts"
    );
}

#[test]
fn workloads_registered_at_run_time() {
    ztseg_integration::require_root();
    let lab = Lab::new(2);
    let mut d = write_config(&lab, "zreg");
    // Only workload a in the file; b is added through the API.
    let cfg = std::fs::read_to_string(&d.config).unwrap();
    let cut = cfg.rfind("[[workloads]]").unwrap();
    std::fs::write(&d.config, &cfg[..cut]).unwrap();
    std::fs::write(d.dir.join("policies/b.yaml"), POLICY).unwrap();
    d.start();
    wait_ready(&lab.host, &d);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8080");
    tcp_echo(b, "10.77.0.2:8081");
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_secs(2)).is_some(), "b is not managed yet");
    let (ok, out) = d.cli(&[
        "workload",
        "add",
        "default/b",
        "--label",
        "app=b",
        "--interface",
        "hv1",
        "--ipv4",
        "10.77.0.2",
    ]);
    assert!(ok, "{out}");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_secs(2)).is_some(), "policy allows 8080 from a");
    assert!(
        tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none(),
        "b is now default-deny but 8080"
    );
    // Bad input is refused with the field named; duplicates are refused.
    let (ok, out) = d.cli(&["workload", "add", "default/c", "--interface", "hv1", "--ipv4", "10.77.0.300"]);
    assert!(!ok && out.contains("workload.ipv4"), "{out}");
    let (ok, out) = d.cli(&[
        "workload",
        "add",
        "default/c",
        "--label",
        "app=-c",
        "--interface",
        "hv1",
        "--ipv4",
        "10.77.0.3",
    ]);
    assert!(!ok && out.contains(".labels.app: invalid label value `-c`"), "{out}");
    let (ok, out) = d.cli(&["workload", "add", "default/b", "--interface", "hv1", "--ipv4", "10.77.0.2"]);
    assert!(!ok && out.contains("already exists"), "{out}");
    // Kept across a restart.
    d.stop("-TERM");
    d.start();
    wait_ready(&lab.host, &d);
    let (_, list) = d.cli(&["workloads", "-o", "json"]);
    assert!(list.contains("\"workload\": \"default/b\""), "{list}");
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none());
    // Removed: its interface stays attached and drops everything (fail closed).
    let (ok, out) = d.cli(&["workload", "remove", "default/b"]);
    assert!(ok, "{out}");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_millis(400)).is_none());
    let (ok, out) = d.cli(&["workload", "remove", "default/a"]);
    assert!(!ok && out.contains("configuration"), "{out}");
}

/// Traffic from addresses outside every pod across policy versions and a restart: an address
/// a version no longer allows is dropped (the old prefix is gone, and its CIDR identity was
/// never handed to another prefix), an `except` that goes away stops blocking, and a daemon
/// restarted on a changed policy removes the prefixes the pins still hold.
#[test]
fn cidr_peers_follow_policy_versions() {
    ztseg_integration::require_root();
    let lab = Lab::routed(2);
    let ext = lab.external(0, &["10.99.0.2", "192.168.77.2"]);
    let mut d = started(&lab, "zcidr", &b_from_block("{cidr: 10.99.0.0/16}"));
    udp_echo(&lab.pods[1], "10.77.0.2:9999");
    let passes = |src: &str| {
        ztseg_integration::traffic::udp_roundtrip_from(&ext, src, "10.77.0.2:9999", Duration::from_secs(2))
    };
    let dropped = |src: &str| {
        !ztseg_integration::traffic::udp_roundtrip_from(
            &ext,
            src,
            "10.77.0.2:9999",
            Duration::from_millis(400),
        )
    };
    assert!(passes("10.99.0.2"), "v1 allows 10.99.0.0/16:\n{}", d.log());
    assert!(dropped("192.168.77.2"), "v1 does not allow 192.168.0.0/16");

    set_policy(&d, &b_from_block("{cidr: 192.168.0.0/16}"));
    assert!(passes("192.168.77.2"), "v2 allows 192.168.0.0/16");
    assert!(dropped("10.99.0.2"), "v2 no longer allows 10.99.0.0/16");

    let cidrs = || metric(&http(&lab.host, "/metrics").unwrap().1, "ztseg_map_entries{map=\"cidr\"}");
    assert_eq!(cidrs(), 1, "only v2's prefix is installed");
    set_policy(&d, &b_from_block("{cidr: 10.0.0.0/8, except: [10.99.0.0/16]}"));
    assert_eq!(cidrs(), 2, "v3: the block and its except");
    assert!(dropped("10.99.0.2"), "v3 excepts 10.99.0.0/16");
    assert!(dropped("192.168.77.2"), "v3 no longer allows 192.168.0.0/16");
    set_policy(&d, &b_from_block("{cidr: 10.0.0.0/8}"));
    assert!(passes("10.99.0.2"), "v4 drops the except: 10.99.0.2 is in 10.0.0.0/8");
    assert_eq!(cidrs(), 1, "the except is gone from the map");

    // Changed while the daemon is down: the restarted daemon finds 10.0.0.0/8 in the pins.
    d.stop("-TERM");
    std::fs::write(d.dir.join("policies/b.yaml"), b_from_block("{cidr: 192.168.0.0/16}")).unwrap();
    d.start();
    wait_ready(&lab.host, &d);
    assert!(passes("192.168.77.2"), "after the restart 192.168.0.0/16 is allowed");
    assert!(dropped("10.99.0.2"), "after the restart 10.0.0.0/8 is gone");
    assert_eq!(cidrs(), 1, "after the restart");
}

/// `ztseg flows` in each output format: a table line, one JSON object per line, one YAML
/// document per event; numbers and the like keep their types. Listings' JSON is typed too.
#[test]
fn flows_and_listings_in_every_output_format() {
    ztseg_integration::require_root();
    let lab = Lab::routed(2);
    let d = started(&lab, "zout", POLICY);
    let a = &lab.pods[0];
    for format in ["table", "json", "yaml"] {
        let mut child = ztseg_integration::clean_command(ZTSEG)
            .args(["-o", format, "flows", "--verdict", "DROP", "--count", "1", "--socket"])
            .arg(&d.socket)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // Until the follower is subscribed and an event arrives: denied datagrams from a to b.
        let start = Instant::now();
        let done = loop {
            a.enter(|| UdpSocket::bind("10.77.0.1:0").unwrap().send_to(b"x", "10.77.0.2:9999").unwrap());
            std::thread::sleep(Duration::from_millis(200));
            if child.try_wait().unwrap().is_some() || start.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                break child.wait_with_output().unwrap();
            }
        };
        let out = String::from_utf8_lossy(&done.stdout).into_owned();
        assert!(done.status.success(), "{format}: {out}{}", String::from_utf8_lossy(&done.stderr));
        let event: serde_json::Value = match format {
            "json" => {
                serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("one JSON object: {e}: {out}"))
            }
            "yaml" => {
                assert!(out.starts_with("---\n"), "a YAML document: {out}");
                serde_yaml::from_str(&out).unwrap_or_else(|e| panic!("YAML: {e}: {out}"))
            }
            _ => {
                assert!(
                    out.contains("DROP") && out.contains("10.77.0.1:") && out.contains("-> 10.77.0.2:9999"),
                    "{out}"
                );
                continue;
            }
        };
        assert_eq!(
            (&event["verdict"], &event["dport"], &event["workload"], &event["protocol"]),
            (&"DROP".into(), &9999.into(), &"default/b".into(), &"UDP".into()),
            "{format}: {out}"
        );
        assert!(event["cookie"].is_u64() && event["ts_ns"].is_u64(), "{format}: {out}");
    }
    // Listings: booleans and numbers keep their type in JSON and YAML.
    let (ok, out) = d.cli(&["-o", "json", "enforcer", "status"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!((&v[0]["ready"], &v[0]["event_burst"]), (&true.into(), &20_000.into()), "{out}");
    let (ok, out) = d.cli(&["-o", "yaml", "workloads"]);
    assert!(ok && out.contains("workload: default/b") && out.contains("identity: "), "{out}");
    assert!(!out.contains("identity: '"), "a number, not a string: {out}");
    let (ok, out) = d.cli(&["-o", "json", "rules"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(v[0]["cookie"].is_u64() && v[0]["keys"].is_u64(), "{out}");
}

/// The API socket's directory: one that exists keeps its mode (a sticky, world-writable
/// directory stays so); one the daemon creates, with its missing parents, is 0755.
#[test]
fn the_socket_directory_keeps_its_mode_unless_the_daemon_created_it() {
    use std::os::unix::fs::PermissionsExt as _;
    ztseg_integration::require_root();
    let lab = Lab::new(2);
    let mut d = write_config(&lab, "zsock");
    let shared = std::env::temp_dir().join(unique("zsock-shared"));
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let created = std::env::temp_dir().join(unique("zsock-new"));
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o7777;
    let (config, original) = (std::fs::read_to_string(&d.config).unwrap(), d.socket.display().to_string());
    for socket in [shared.join("enforcer.sock"), created.join("run/ztseg/enforcer.sock")] {
        d.stop("-TERM");
        std::fs::write(
            &d.config,
            config
                .replace(&format!("socket = \"{original}\""), &format!("socket = \"{}\"", socket.display())),
        )
        .unwrap();
        d.socket.clone_from(&socket);
        d.start();
        wait_ready(&lab.host, &d);
        let (ok, out) = d.cli(&["enforcer", "status"]);
        assert!(ok, "{out}");
        assert_eq!(mode(&socket), 0o600);
    }
    assert_eq!(mode(&shared), 0o1777, "an existing directory keeps its mode");
    for dir in [created.join("run/ztseg"), created.join("run"), created.clone()] {
        assert_eq!(mode(&dir), 0o755, "{}", dir.display());
    }
    let _ = std::fs::remove_dir_all(shared);
    let _ = std::fs::remove_dir_all(created);
}

/// b isolated in both directions, nothing allowed.
const ISOLATE_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: isolate-b}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress, Egress]\n";

/// Upstream `NetworkPolicy`: traffic into a pod is allowed "if the traffic source is the pod's
/// local node". A pod isolated in both directions with nothing allowed still takes
/// connections from its host (replies included); other pods and outside addresses are
/// dropped. Addresses the host gains are the host's within a second; one it loses is not.
#[test]
fn the_pods_own_node_may_always_connect() {
    ztseg_integration::require_root();
    let lab = Lab::routed(2);
    let ext = lab.external(0, &["10.99.0.2"]);
    let d = started(&lab, "zhost", ISOLATE_B);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8080");
    udp_echo(b, "10.77.0.2:9999");
    // From the host: its address on hv1, 169.254.1.1.
    let mut conn = tcp_connect(&lab.host, "10.77.0.2:8080", Duration::from_secs(2)).expect("host -> b");
    assert!(ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)), "replies pass");
    assert!(tcp_connect(a, "10.77.0.2:8080", Duration::from_millis(400)).is_none(), "a -> b dropped");
    assert!(
        tcp_connect(&ext, "10.77.0.2:8080", Duration::from_millis(400)).is_none(),
        "outside -> b dropped"
    );
    let (ok, out) =
        d.cli(&["-o", "json", "explain", "--from", "169.254.1.1", "--to", "default/b", "--port", "8080"]);
    assert!(ok, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (&v[0]["peer_identity"], &v[0]["peer_source"], &v[0]["verdict"]),
        (&1.into(), &"exact".into(), &"ALLOW".into()),
        "{out}"
    );
    assert!(v[0]["steps"].as_str().unwrap().contains("peer 169.254.1.1: host"), "{out}");

    // An address the host gains is the host's.
    lab.host.sh("ip addr add 10.98.0.1/32 dev hv1");
    let from_new = || {
        ztseg_integration::traffic::udp_roundtrip_from(
            &lab.host,
            "10.98.0.1",
            "10.77.0.2:9999",
            Duration::from_millis(400),
        )
    };
    let start = Instant::now();
    while !from_new() {
        assert!(start.elapsed() < Duration::from_secs(5), "10.98.0.1 never became the host's:\n{}", d.log());
    }
    // And one it loses is no longer.
    lab.host.sh("ip addr del 10.98.0.1/32 dev hv1");
    let start = Instant::now();
    loop {
        let (ok, out) = d.cli(&[
            "-o",
            "json",
            "explain",
            "--from",
            "10.98.0.1",
            "--to",
            "default/b",
            "--port",
            "9999",
            "--protocol",
            "UDP",
        ]);
        assert!(ok, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        if v[0]["peer_source"] == "world" {
            assert_eq!(v[0]["verdict"], "DROP", "{out}");
            break;
        }
        assert!(start.elapsed() < Duration::from_secs(5), "10.98.0.1 still the host's: {out}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `ztseg enforcer uninstall` ends enforcement: the pin directory (maps and links) is removed
/// and traffic the policy denied flows again.
#[test]
fn uninstall_removes_enforcement() {
    ztseg_integration::require_root();
    let lab = Lab::new(2);
    let mut d = started(&lab, "zuni", POLICY);
    let (a, b) = (&lab.pods[0], &lab.pods[1]);
    tcp_echo(b, "10.77.0.2:8081");
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none(), "denied by policy");
    // Stopped, the daemon leaves enforcement in place ...
    d.stop("-TERM");
    assert!(tcp_connect(a, "10.77.0.2:8081", Duration::from_millis(400)).is_none(), "still denied");
    assert!(d.pin_dir.exists());
    // ... until it is uninstalled.
    let out = ztseg_integration::clean_command(ZTSEG)
        .args(["enforcer", "uninstall", "--pin-dir"])
        .arg(&d.pin_dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!d.pin_dir.exists(), "pins removed");
    let mut conn = tcp_connect(a, "10.77.0.2:8081", Duration::from_secs(2)).expect("no enforcement left");
    assert!(ztseg_integration::traffic::echo_once(&mut conn, Duration::from_secs(1)));
}
