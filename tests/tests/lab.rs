//! `NetworkPolicy` scenarios with real traffic through `ztseg lab`: the upstream e2e model
//! (namespaces x, y, z; pods a, b, c; TCP and UDP on ports 80 and 81) on two simulated hosts,
//! each with its own enforcer. Every scenario's expectation is written from the upstream
//! `NetworkPolicy` specification as a predicate over (from, to, port, protocol), and every
//! cell of the probed matrix is checked against it.

use std::{fmt::Write as _, io::Read as _, path::PathBuf, process::Command, time::Duration};

use serde::Deserialize;

const PODS: [(&str, &str, &str); 9] = [
    ("x", "a", "node1"),
    ("x", "b", "node1"),
    ("x", "c", "node2"),
    ("y", "a", "node1"),
    ("y", "b", "node2"),
    ("y", "c", "node2"),
    ("z", "a", "node1"),
    ("z", "b", "node2"),
    ("z", "c", "node1"),
];

#[derive(Deserialize, Debug)]
struct Matrix {
    port: u16,
    protocol: String,
    pods: Vec<String>,
    allowed: Vec<Vec<bool>>,
}

/// A lab in a temporary directory; `down` on drop.
struct TestLab {
    name: String,
    dir: PathBuf,
    file: PathBuf,
}

fn ztseg(args: &[&str]) -> (bool, String, String) {
    ztseg_env(args, &[])
}

/// `ztseg` with extra environment variables.
fn ztseg_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztseg-t"))
        .args(args)
        .envs(env.iter().copied())
        .output()
        .expect("run ztseg");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

impl TestLab {
    fn new(name: &str) -> Self {
        let mut pods = String::new();
        for (ns, pod, host) in PODS {
            let _ =
                writeln!(pods, "  - {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}, host: {host}}}");
        }
        Self::with_pods(name, &pods)
    }

    fn with_pods(name: &str, pods: &str) -> Self {
        Self::with_pods_env(name, pods, &[])
    }

    /// `lab up` with `env` added to its environment.
    fn with_pods_env(name: &str, pods: &str, env: &[(&str, &str)]) -> Self {
        ztseg_integration::require_root();
        let dir = std::env::temp_dir().join(ztseg_integration::unique("ztseg-lab-"));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let file = dir.join("lab.yaml");
        std::fs::write(
            &file,
            format!(
                "name: {name}\nhosts: [node1, node2]\nnamespaces:\n  - {{name: x, labels: {{ns: x}}}}\n  - {{name: y, labels: {{ns: y}}}}\n  - {{name: z, labels: {{ns: z}}}}\npods:\n{pods}ports: [80, 81]\nprotocols: [TCP, UDP]\ntimeoutMs: 400\npolicies: [policies]\n"
            ),
        )
        .unwrap();
        let lab = Self { name: name.to_owned(), dir, file };
        let _ = ztseg(&["lab", "down", "-f", lab.path()]);
        let (ok, out, err) = ztseg_env(&["lab", "up", "-f", lab.path()], env);
        assert!(ok, "lab up failed: {out}{err}");
        lab
    }

    /// Whether a TCP connection from simulated host `h`'s own namespace to `addr` completes.
    fn host_connects(&self, h: usize, addr: &str) -> bool {
        let host = ztseg_integration::netns::Netns { name: format!("zl-{}-h{h}", self.name) };
        let ok = ztseg_integration::traffic::tcp_connect(&host, addr, Duration::from_millis(500)).is_some();
        std::mem::forget(host); // the lab owns that namespace
        ok
    }

    fn path(&self) -> &str {
        self.file.to_str().unwrap()
    }

    /// Replace the policy directory's contents and apply.
    fn apply(&self, policies: &str) {
        let pdir = self.dir.join("policies");
        for e in std::fs::read_dir(&pdir).unwrap().flatten() {
            std::fs::remove_file(e.path()).unwrap();
        }
        if !policies.trim().is_empty() {
            std::fs::write(pdir.join("p.yaml"), policies).unwrap();
        }
        let (ok, out, err) = ztseg(&["lab", "apply", "-f", self.path()]);
        assert!(ok, "lab apply failed: {out}{err}");
    }

    fn probe(&self) -> Vec<Matrix> {
        let (_, out, err) = ztseg(&["-o", "json", "lab", "probe", "-f", self.path()]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe output: {e}: {out}{err}"))
    }

    /// The enforcers' verdicts for every cell (`ztseg lab explain`), without traffic.
    fn explain(&self) -> Vec<Matrix> {
        let (_, out, err) = ztseg(&["-o", "json", "lab", "explain", "-f", self.path()]);
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("explain output: {e}: {out}{err}"))
    }

    /// Probe and compare every cell with `want(from, to, port, protocol)`; then the same for
    /// the enforcers' own explanation of every cell, which must tell what the traffic showed.
    fn check(&self, scenario: &str, want: impl Fn(&str, &str, u16, &str) -> bool) {
        let wrong = Self::wrong(self.probe(), &want);
        assert!(wrong.is_empty(), "scenario {scenario}: {} cells differ:\n{}", wrong.len(), wrong.join("\n"));
        let wrong = Self::wrong(self.explain(), &want);
        assert!(
            wrong.is_empty(),
            "scenario {scenario}: `lab explain` differs from the traffic in {} cells:\n{}",
            wrong.len(),
            wrong.join("\n")
        );
    }

    fn wrong(matrices: Vec<Matrix>, want: &impl Fn(&str, &str, u16, &str) -> bool) -> Vec<String> {
        let mut wrong = Vec::new();
        for m in matrices {
            for (f, from) in m.pods.iter().enumerate() {
                for (t, to) in m.pods.iter().enumerate() {
                    let expected = from == to || want(from, to, m.port, &m.protocol);
                    if m.allowed[f][t] != expected {
                        wrong.push(format!(
                            "{from} -> {to} {}/{}: got {}, want {}",
                            m.protocol,
                            m.port,
                            if m.allowed[f][t] { "allowed" } else { "blocked" },
                            if expected { "allowed" } else { "blocked" }
                        ));
                    }
                }
            }
        }
        wrong
    }
}

impl Drop for TestLab {
    fn drop(&mut self) {
        let _ = ztseg(&["lab", "down", "-f", self.path()]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn ns(p: &str) -> &str {
    p.split('/').next().unwrap()
}
fn pod(p: &str) -> &str {
    p.split('/').nth(1).unwrap()
}

const NP: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\n";

#[test]
fn network_policy_scenarios() {
    let lab = TestLab::new(&format!("np{}", std::process::id() % 10_000));
    lab.check("no policy: everything allowed", |_, _, _, _| true);

    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
    ));
    lab.check("default-deny ingress in x", |f, t, _, _| ns(t) != "x" || f == t);
    // The pod's own node may still connect (x/a, 10.77.0.1, runs on node1); another node may
    // not.
    assert!(lab.host_connects(0, "10.77.0.1:80"), "node1 -> x/a");
    assert!(!lab.host_connects(1, "10.77.0.1:80"), "node2 -> x/a");

    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n"
    ));
    lab.check("default-deny egress in x", |f, _, _, _| ns(f) != "x");

    lab.apply(&format!(
        "{NP}metadata: {{name: a-from-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n"
    ));
    lab.check("pod selector in the policy's namespace", |f, t, _, _| t != "x/a" || f == "x/b");
    explain_one_pair(&lab);

    lab.apply(&format!(
        "{NP}metadata: {{name: a-from-y, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n"
    ));
    lab.check("namespace selector", |f, t, _, _| t != "x/a" || ns(f) == "y");

    lab.apply(&format!(
        "{NP}metadata: {{name: and, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n      podSelector: {{matchLabels: {{pod: b}}}}\n"
    ));
    lab.check("namespace AND pod selector in one peer", |f, t, _, _| t != "x/a" || f == "y/b");

    lab.apply(&format!(
        "{NP}metadata: {{name: or, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n    - podSelector: {{matchLabels: {{pod: b}}}}\n"
    ));
    lab.check("namespace OR pod selector as two peers", |f, t, _, _| {
        t != "x/a" || ns(f) == "y" || f == "x/b"
    });

    lab.apply(&format!(
        "{NP}metadata: {{name: expr, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n      podSelector:\n        matchExpressions:\n        - {{key: pod, operator: NotIn, values: [b]}}\n"
    ));
    lab.check("matchExpressions NotIn across all namespaces", |f, t, _, _| t != "x/a" || pod(f) != "b");

    // y/b runs on node2 as its second pod: 10.77.1.2.
    lab.apply(&format!(
        "{NP}metadata: {{name: cidr, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  egress:\n  - to:\n    - ipBlock: {{cidr: 10.77.5.9/8, except: [10.77.1.2/32]}}\n"
    ));
    lab.check("ipBlock with except (host bits masked)", |f, t, _, _| f != "x/a" || t != "y/b");

    lab.apply(&format!(
        "{NP}metadata: {{name: ports, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - port: 81\n"
    ));
    lab.check("port without protocol means TCP", |_, t, port, proto| {
        t != "x/a" || (port == 81 && proto == "TCP")
    });

    lab.apply(&format!(
        "{NP}metadata: {{name: range, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{protocol: UDP, port: 80, endPort: 81}}\n"
    ));
    lab.check("endPort range", |_, t, _, proto| t != "x/a" || proto == "UDP");

    lab.apply(&format!(
        "{NP}metadata: {{name: named, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{protocol: UDP, port: serve-81-udp}}\n"
    ));
    lab.check("named port", |_, t, port, proto| t != "x/a" || (port == 81 && proto == "UDP"));

    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\n{NP}metadata: {{name: a-from-y, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n      podSelector: {{}}\n    ports:\n    - {{port: 80}}\n"
    ));
    lab.check("several policies are additive", |f, t, port, proto| {
        ns(t) != "x" || (t == "x/a" && ns(f) == "y" && port == 80 && proto == "TCP")
    });

    lab.apply(&format!(
        "{NP}metadata: {{name: both, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n  egress:\n  - to:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n"
    ));
    lab.check("ingress and egress together", |f, t, _, _| {
        (t != "x/a" || f == "x/b") && (f != "x/a" || ns(t) == "y")
    });

    lab.apply(&format!(
        "{NP}metadata: {{name: egress-only, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Egress]\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n  egress: []\n"
    ));
    lab.check("policyTypes Egress ignores ingress rules", |f, _, _, _| f != "x/a");

    // A malformed policy is rejected with file, position and field; the policy in force stays.
    std::fs::write(
        lab.dir.join("policies/p.yaml"),
        format!("{NP}metadata: {{name: bad, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0/33}}\n"),
    )
    .unwrap();
    let (ok, out, err) = ztseg(&["lab", "apply", "-f", lab.path()]);
    assert!(!ok, "malformed policy accepted: {out}");
    assert!(
        err.contains("p.yaml:") && err.contains("spec.ingress[0].from[0].ipBlock.cidr"),
        "error names file and field: {err}"
    );
    lab.check("previous policy still in force", |f, _, _, _| f != "x/a");
}

/// `lab explain --from --to` under the "pod selector" scenario (x/a admits x/b only): x/c
/// (node2) -> x/a (node1) is checked on both hosts and only x/a's ingress check drops it;
/// x/b -> x/a is allowed by x/a's ingress rule; an ambiguous pod name is refused.
fn explain_one_pair(lab: &TestLab) {
    let (ok, out, err) =
        ztseg(&["lab", "explain", "-f", lab.path(), "--from", "x/c", "--to", "x/a", "--port", "80"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("x/c egress check, peer 10.77.0.1: ALLOW"), "{out}");
    assert!(out.contains("x/a ingress check, peer 10.77.1.1: DROP"), "{out}");
    assert!(out.contains("verdict DROP (drop_default)"), "{out}");
    let (ok, _, err) =
        ztseg(&["lab", "explain", "-f", lab.path(), "--from", "b", "--to", "x/a", "--port", "80"]);
    assert!(!ok && err.contains("ambiguous") && err.contains("y/b"), "{err}");
    let args =
        ["-o", "json", "lab", "explain", "-f", lab.path(), "--from", "x/b", "--to", "x/a", "--port", "80"];
    let (ok, out, err) = ztseg(&args);
    assert!(ok, "{out}{err}");
    let checks: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    let ingress = checks.iter().find(|c| c["direction"] == "ingress").expect("x/a's check");
    assert_eq!(
        (ingress["verdict"].as_str(), ingress["owner"].as_str()),
        (Some("ALLOW"), Some("policy:x/a:ingress")),
        "{out}"
    );
}

/// Policy and label updates while a connection is open: a change that keeps the flow allowed
/// keeps it alive; one that no longer allows it cuts it.
#[test]
fn updates_while_traffic_flows() {
    let lab = TestLab::new(&format!("upd{}", std::process::id() % 10_000));
    let allow_from_b = format!(
        "{NP}metadata: {{name: a-from-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n"
    );
    lab.apply(&allow_from_b);
    // x/b (10.77.0.2) connects to x/a (10.77.0.1:80) from its namespace.
    let pod_ns = {
        let state: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(format!("/run/ztseg/lab/upd{}.json", std::process::id() % 10_000))
                .unwrap(),
        )
        .unwrap();
        state["pods"][1]["netns"].as_str().unwrap().to_owned()
    };
    let ns = ztseg_integration::netns::Netns { name: pod_ns };
    let mut conn = ns
        .enter(|| {
            std::net::TcpStream::connect_timeout(&"10.77.0.1:80".parse().unwrap(), Duration::from_secs(2))
        })
        .expect("x/b -> x/a allowed");
    std::mem::forget(ns); // the lab owns that namespace
    let mut b = [0u8; 1];
    conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    assert_eq!(conn.read(&mut b).unwrap(), 1);
    let alive = |c: &mut std::net::TcpStream| {
        use std::io::Write as _;
        c.write_all(b"ping").is_ok() && {
            // The server reads once and then idles; a cut flow shows up as a write that is
            // never acknowledged, so check the socket's unacknowledged bytes drain.
            std::thread::sleep(Duration::from_millis(600));
            unacked(c) == 0
        }
    };
    assert!(alive(&mut conn), "flow alive before updates");
    // A change that still allows x/b -> x/a (adds x/c): the open flow carries on.
    lab.apply(&format!(
        "{NP}metadata: {{name: a-from-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]\n"
    ));
    assert!(alive(&mut conn), "make-before-break kept the allowed flow");
    lab.check("after widening", |f, t, _, _| t != "x/a" || f == "x/b" || f == "x/c");
    // Relabel x/b so the policy no longer selects it: the flow is cut.
    let (ok, out, err) = ztseg(&["lab", "label", "-f", lab.path(), "x/b", "pod=q"]);
    assert!(ok, "{out}{err}");
    assert!(!alive(&mut conn), "relabelled source is cut");
    lab.check("after relabel", |f, t, _, _| t != "x/a" || f == "x/c");
}

/// Bytes sent on `c` that the peer has not acknowledged (TIOCOUTQ).
fn unacked(c: &std::net::TcpStream) -> i32 {
    let mut n: libc::c_int = 0;
    // SAFETY: ioctl(TIOCOUTQ) writes one int into `n`, on a socket we own.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(c), libc::TIOCOUTQ, &raw mut n) };
    assert_eq!(rc, 0);
    n
}

const TP: &str = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\n";

/// The admin tier from `TenantPolicy`: cross-tenant deny by default, an admin Allow that no
/// `NetworkPolicy` can override, a cluster-wide Deny above tenant policy, and a TTL the kernel
/// enforces.
#[test]
fn tenant_policies() {
    // x/a, x/b of tenant acme; y/a, y/b of tenant globex.
    let mut pods = String::new();
    for (ns, pod, host, tenant) in [
        ("x", "a", "node1", "acme"),
        ("x", "b", "node2", "acme"),
        ("y", "a", "node1", "globex"),
        ("y", "b", "node2", "globex"),
    ] {
        let _ = writeln!(
            pods,
            "  - {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}, host: {host}, tenant: {tenant}}}"
        );
    }
    // `lab up` from a shell set up for one enforcer: every simulated host still gets its own
    // socket and pin directory.
    let (sock, pins) = (format!("/tmp/ztseg-tp-{}.sock", std::process::id()), "/sys/fs/bpf/ztseg-tp-shell");
    let lab = TestLab::with_pods_env(
        &format!("tp{}", std::process::id() % 10_000),
        &pods,
        &[("ZTSEG_SOCKET", &sock), ("ZTSEG_PIN_DIR", pins), ("ZTSEG_CONTROLLER", "ctl.example:7443")],
    );
    assert!(!std::path::Path::new(&sock).exists() && !std::path::Path::new(pins).exists());
    lab.check("no policy: tenants isolated", |f, t, _, _| ns(f) == ns(t));

    // x denies all ingress (NetworkPolicy), yet the admin Allow acme -> globex on TCP 80 and
    // globex -> acme on TCP 80 are final.
    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\n\
         {TP}metadata: {{name: acme-globex}}\nspec:\n  priority: 10\n  action: Allow\n  from: {{tenant: acme}}\n  to: {{tenant: globex}}\n  ports: [{{protocol: TCP, port: 80}}]\n---\n\
         {TP}metadata: {{name: globex-acme}}\nspec:\n  priority: 10\n  action: Allow\n  from: {{tenant: globex}}\n  to: {{tenant: acme}}\n  ports: [{{protocol: TCP, port: 80}}]\n"
    ));
    lab.check("admin allow is final", |f, t, port, proto| {
        let cross = ns(f) != ns(t);
        if cross { port == 80 && proto == "TCP" } else { ns(t) != "x" }
    });

    // A cluster-wide Deny on UDP (any port) applies inside tenants too; a Pass from globex to
    // acme hands cross-tenant traffic to NetworkPolicy (x denies ingress, so still blocked).
    lab.apply(&format!(
        "{TP}metadata: {{name: no-udp}}\nspec:\n  priority: 1\n  action: Deny\n  from: {{tenant: '*'}}\n  to: {{tenant: '*'}}\n  ports: [{{protocol: UDP}}]\n---\n\
         {TP}metadata: {{name: pass}}\nspec:\n  priority: 20\n  action: Pass\n  from: {{tenant: acme}}\n  to: {{tenant: globex}}\n"
    ));
    lab.check("cluster deny and pass", |f, t, _, proto| {
        proto == "TCP" && (ns(f) == ns(t) || (ns(f) == "x" && ns(t) == "y"))
    });

    // A TenantPolicy with a TTL: the kernel closes it when it expires.
    lab.apply(&format!(
        "{TP}metadata: {{name: temp}}\nspec:\n  priority: 5\n  action: Allow\n  from: {{tenant: acme}}\n  to: {{tenant: globex}}\n  ports: [{{protocol: TCP, port: 81}}]\n  ttl: 3s\n"
    ));
    lab.check("temporary admin allow", |f, t, port, proto| {
        ns(f) == ns(t) || (ns(f) == "x" && port == 81 && proto == "TCP")
    });
    std::thread::sleep(Duration::from_secs(3));
    lab.check("after the ttl", |f, t, _, _| ns(f) == ns(t));
}
