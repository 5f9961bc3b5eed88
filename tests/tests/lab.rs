//! `NetworkPolicy` scenarios with real traffic through `ztseg lab`: the upstream e2e model
//! (namespaces x, y, z; pods a, b, c; TCP and UDP on ports 80 and 81) on two simulated hosts,
//! each with its own enforcer. Every scenario's expectation is written from the upstream
//! `NetworkPolicy` specification as a predicate over (from, to, port, protocol), and every
//! cell of the probed matrices is checked against it, both as traffic and as the enforcers'
//! own explanation of the cell.

use std::{fmt::Write as _, io::Read as _, net::SocketAddr, path::PathBuf, process::Command, time::Duration};

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

/// Pods of the model that carry `team: blue` besides `pod: <name>`.
fn team(p: &str) -> bool {
    matches!(p, "x/b" | "y/c")
}

/// The TCP port a pod of the model names `web`: y/b declares it on 81, z/c declares none.
fn web(p: &str) -> Option<u16> {
    match p {
        "y/b" => Some(81),
        "z/c" => None,
        _ => Some(80),
    }
}

/// The simulated host a pod of the model runs on.
fn host(p: &str) -> &'static str {
    PODS.iter().find(|(n, q, _)| format!("{n}/{q}") == p).map(|x| x.2).unwrap()
}

#[derive(Deserialize, Debug)]
struct Matrix {
    port: u16,
    protocol: String,
    pods: Vec<String>,
    allowed: Vec<Vec<bool>>,
    /// Set when the lab could not probe this matrix (the kernel lacks the protocol).
    #[serde(default)]
    unavailable: Option<String>,
}

/// The matrices a check looks at: these ports and protocols, or all of the lab's when empty.
struct Only<'a> {
    ports: &'a [u16],
    protocols: &'a [&'a str],
}

const ALL: Only = Only { ports: &[], protocols: &[] };
const TCP_80: Only = Only { ports: &[80], protocols: &["TCP"] };

/// A lab in a temporary directory; `down` on drop.
struct TestLab {
    name: String,
    dir: PathBuf,
    file: PathBuf,
    protocols: usize,
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
    /// The nine pods of the model, with their `team` labels and `web` container ports.
    fn new(name: &str) -> Self {
        let mut pods = String::new();
        for (ns, pod, host) in PODS {
            let id = format!("{ns}/{pod}");
            let team = if team(&id) { ", team: blue" } else { "" };
            let web =
                web(&id).map(|p| format!(", containerPorts: [{{name: web, port: {p}}}]")).unwrap_or_default();
            let _ = writeln!(
                pods,
                "  - {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}{team}}}, host: {host}{web}}}"
            );
        }
        Self::with_pods(name, &pods, &["TCP", "UDP"])
    }

    fn with_pods(name: &str, pods: &str, protocols: &[&str]) -> Self {
        Self::with_pods_env(name, pods, protocols, &[])
    }

    /// `lab up` with `env` added to its environment.
    fn with_pods_env(name: &str, pods: &str, protocols: &[&str], env: &[(&str, &str)]) -> Self {
        ztseg_integration::require_root();
        let dir = std::env::temp_dir().join(ztseg_integration::unique("ztseg-lab-"));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let file = dir.join("lab.yaml");
        std::fs::write(
            &file,
            format!(
                "name: {name}\nhosts: [node1, node2]\nnamespaces:\n  - {{name: x, labels: {{ns: x}}}}\n  - {{name: y, labels: {{ns: y}}}}\n  - {{name: z, labels: {{ns: z}}}}\npods:\n{pods}ports: [80, 81]\nprotocols: [{}]\ntimeoutMs: 400\npolicies: [policies]\n",
                protocols.join(", ")
            ),
        )
        .unwrap();
        let lab = Self { name: name.to_owned(), dir, file, protocols: protocols.len() };
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

    /// `ztseg lab label`: change labels of a pod (`ns/pod`) or namespace (`ns:NAME`).
    fn label(&self, target: &str, change: &str) {
        let (ok, out, err) = ztseg(&["lab", "label", "-f", self.path(), target, change]);
        assert!(ok, "lab label {target} {change}: {out}{err}");
    }

    /// The selected matrices from `lab probe` (traffic) or `lab explain` (the enforcers' maps).
    fn matrices(&self, command: &str, only: &Only) -> Vec<Matrix> {
        let ports: Vec<String> = only.ports.iter().map(ToString::to_string).collect();
        let mut args = vec!["-o", "json", "lab", command, "-f", self.path()];
        for p in &ports {
            args.extend(["--port", p]);
        }
        for p in only.protocols {
            args.extend(["--protocol", p]);
        }
        let (_, out, err) = ztseg(&args);
        let m: Vec<Matrix> =
            serde_json::from_str(&out).unwrap_or_else(|e| panic!("{command} output: {e}: {out}{err}"));
        let ports = if only.ports.is_empty() { 2 } else { only.ports.len() };
        let protocols = if only.protocols.is_empty() { self.protocols } else { only.protocols.len() };
        assert_eq!(m.len(), ports * protocols, "lab {command} {args:?}: {out}");
        m
    }

    /// Probe every cell of every matrix and compare with `want(from, to, port, protocol)`;
    /// then the same for the enforcers' own explanation of every cell, which must tell what
    /// the traffic showed.
    fn check(&self, scenario: &str, want: impl Fn(&str, &str, u16, &str) -> bool) {
        self.check_only(scenario, &ALL, want);
    }

    /// [`Self::check`] on the selected matrices only.
    fn check_only(&self, scenario: &str, only: &Only, want: impl Fn(&str, &str, u16, &str) -> bool) {
        let wrong = self.problems(only, &want);
        assert!(
            wrong.is_empty(),
            "scenario {scenario}: {} cells differ:\n{}{}",
            wrong.len(),
            self.unprobed(),
            wrong.join("\n")
        );
    }

    /// What `lab up` built (its state file).
    fn state(&self) -> serde_json::Value {
        let path = format!("/run/ztseg/lab/{}.json", self.name);
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
    }

    /// The lab's account of a protocol it could not serve or probe, as the first line of a
    /// failure message (empty when it probes everything).
    fn unprobed(&self) -> String {
        self.state()["sctp_unavailable"]
            .as_str()
            .map(|why| format!("SCTP cannot be probed: {why}\n"))
            .unwrap_or_default()
    }

    /// Cells of the selected matrices that differ from `want`, from traffic and from
    /// `lab explain`; a matrix the lab could not probe is one problem.
    fn problems(&self, only: &Only, want: &impl Fn(&str, &str, u16, &str) -> bool) -> Vec<String> {
        let mut wrong = Self::wrong(self.matrices("probe", only), want);
        let explained = Self::wrong(self.matrices("explain", only), want);
        wrong.extend(explained.into_iter().map(|w| format!("`lab explain`: {w}")));
        wrong
    }

    fn wrong(matrices: Vec<Matrix>, want: &impl Fn(&str, &str, u16, &str) -> bool) -> Vec<String> {
        let mut wrong = Vec::new();
        for m in matrices {
            if m.unavailable.is_some() {
                wrong.push(format!("{}/{}: not probed (no cells)", m.protocol, m.port));
                continue;
            }
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

    /// A TCP connection from pod `from` to pod `to` on `port`, once the server's first byte
    /// has arrived.
    fn connect(&self, from: &str, to: &str, port: u16) -> std::net::TcpStream {
        let state = self.state();
        let pod = |id: &str| {
            let (ns, name) = id.split_once('/').unwrap();
            state["pods"]
                .as_array()
                .unwrap()
                .iter()
                .find(|p| p["spec"]["namespace"] == ns && p["spec"]["name"] == name)
                .unwrap_or_else(|| panic!("no pod {id}"))
                .clone()
        };
        let dst: SocketAddr = format!("{}:{port}", pod(to)["ipv4"].as_str().unwrap()).parse().unwrap();
        let ns = ztseg_integration::netns::Netns { name: pod(from)["netns"].as_str().unwrap().to_owned() };
        let conn = ns.enter(|| std::net::TcpStream::connect_timeout(&dst, Duration::from_secs(2)));
        std::mem::forget(ns); // the lab owns that namespace
        let mut conn = conn.unwrap_or_else(|e| panic!("{from} -> {to}:{port}: {e}"));
        let mut b = [0u8; 1];
        conn.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        assert_eq!(conn.read(&mut b).unwrap(), 1, "{from} -> {to}:{port}: the server's byte");
        conn
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

    // Ranges wider than the compiler expands into exact keys: data-plane port ranges.
    lab.apply(&format!(
        "{NP}metadata: {{name: range, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{port: 81, endPort: 40000}}\n    - {{protocol: UDP, port: 2, endPort: 80}}\n"
    ));
    lab.check("wide endPort ranges", |_, t, port, proto| {
        t != "x/a" || (port == 81 && proto == "TCP") || (port == 80 && proto == "UDP")
    });

    lab.apply(&format!(
        "{NP}metadata: {{name: named, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{protocol: UDP, port: serve-81-udp}}\n"
    ));
    lab.check("named port", |_, t, port, proto| t != "x/a" || (port == 81 && proto == "UDP"));

    spec_scenarios(&lab);

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

/// Scenarios for parts of the upstream specification the table above leaves out, each with
/// the upstream e2e test or API reference text it follows. Ports and protocols a scenario's
/// policy does not distinguish are not probed (as upstream, which probes one port).
fn spec_scenarios(lab: &TestLab) {
    // e2e "should properly isolate pods that are selected by a policy allowing SCTP, even if
    // the plugin doesn't support SCTP": selecting x/a isolates it for every protocol.
    lab.apply(&format!(
        "{NP}metadata: {{name: sctp-only, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{protocol: SCTP, port: 80}}\n"
    ));
    lab.check("a policy allowing only SCTP isolates its pod for TCP and UDP", |_, t, _, _| t != "x/a");

    // e2e "should not mistakenly treat 'protocol: SCTP' as 'protocol: TCP', even if the
    // plugin doesn't support SCTP".
    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\n{NP}metadata: {{name: sctp-81, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - ports:\n    - {{protocol: SCTP, port: 81}}\n"
    ));
    lab.check_only("protocol SCTP is not TCP", &Only { ports: &[81], protocols: &["TCP"] }, |_, t, _, _| {
        ns(t) != "x"
    });

    // e2e "should allow egress access on one named port"; NetworkPolicyPort.port: a named
    // port of the destination pod on egress. `web` is 80 on most pods, 81 on y/b and absent
    // on z/c; `serve-81-udp` is 81/UDP on every pod.
    lab.apply(&format!(
        "{NP}metadata: {{name: egress-named, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - port: web\n    - {{protocol: UDP, port: serve-81-udp}}\n"
    ));
    lab.check("named ports on egress resolve per destination pod", |f, t, port, proto| {
        ns(f) != "x" || (proto == "TCP" && web(t) == Some(port)) || (proto == "UDP" && port == 81)
    });

    // NetworkPolicySpec.policyTypes: "If this field is not specified, it will default based on
    // the existence of ingress or egress rules; policies that contain an egress section are
    // assumed to affect egress, and all policies (whether or not they contain an ingress
    // section) are assumed to affect ingress."
    lab.apply(&format!(
        "{NP}metadata: {{name: egress-rules, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  egress:\n  - to:\n    - namespaceSelector: {{matchLabels: {{ns: y}}}}\n"
    ));
    lab.check_only("egress rules without policyTypes: Ingress and Egress", &TCP_80, |f, t, _, _| {
        t != "x/a" && (f != "x/a" || ns(t) == "y")
    });
    // "... such a policy would not include an egress section and would otherwise default to
    // just [ "Ingress" ]": an empty egress list is no egress section (upstream defaulting adds
    // Egress only for a non-empty list).
    lab.apply(&format!(
        "{NP}metadata: {{name: ingress-rules, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - podSelector: {{matchLabels: {{pod: b}}}}\n  egress: []\n"
    ));
    lab.check_only(
        "ingress rules and `egress: []` without policyTypes: Ingress only",
        &TCP_80,
        |f, t, _, _| t != "x/a" || f == "x/b",
    );

    // e2e "should support allow-all policy" and "should enforce multiple ingress policies with
    // ingress allow-all policy taking precedence": an empty rule matches every peer and port.
    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n---\n{NP}metadata: {{name: allow-all, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress: [{{}}]\n"
    ));
    lab.check("`ingress: [{}]` allows everything into its pod", |_, t, _, _| ns(t) != "x" || t == "x/a");

    // NetworkPolicyIngressRule.from / NetworkPolicyEgressRule.to: "If this field is empty or
    // missing, this rule matches all sources / destinations".
    lab.apply(&format!(
        "{NP}metadata: {{name: empty-peers, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from: []\n    ports: [{{port: 81}}]\n  egress:\n  - to: []\n    ports: [{{protocol: UDP, port: 80}}]\n"
    ));
    lab.check("`from: []` and `to: []` match every peer", |f, t, port, proto| {
        (t != "x/a" || (proto == "TCP" && port == 81)) && (f != "x/a" || (proto == "UDP" && port == 80))
    });

    // e2e "should deny ingress from pods on other namespaces"; NetworkPolicyPeer.podSelector
    // without namespaceSelector: pods in the policy's own namespace.
    lab.apply(&format!(
        "{NP}metadata: {{name: same-ns, namespace: x}}\nspec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelector: {{}}\n"
    ));
    lab.check_only("`podSelector: {}` peer: every pod of the policy's namespace", &TCP_80, |f, t, _, _| {
        ns(t) != "x" || ns(f) == "x"
    });

    // e2e "should enforce policy to allow ingress traffic from pods in all namespaces";
    // NetworkPolicyPeer.namespaceSelector without podSelector: all pods of the selected
    // namespaces, and `{}` selects every namespace. x/a may send TCP 80 to them only.
    lab.apply(&format!(
        "{NP}metadata: {{name: all-ns, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n  egress:\n  - to:\n    - namespaceSelector: {{}}\n    ports: [{{port: 80}}]\n"
    ));
    lab.check("`namespaceSelector: {}` peer: every pod of every namespace", |f, _, port, proto| {
        f != "x/a" || (proto == "TCP" && port == 80)
    });

    // LabelSelectorRequirement operators Exists and DoesNotExist (x/b and y/c carry `team`).
    lab.apply(&format!(
        "{NP}metadata: {{name: exists, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {{}}\n      podSelector: {{matchExpressions: [{{key: team, operator: Exists}}]}}\n  egress:\n  - to:\n    - namespaceSelector: {{}}\n      podSelector: {{matchExpressions: [{{key: team, operator: DoesNotExist}}]}}\n"
    ));
    lab.check_only("matchExpressions Exists and DoesNotExist", &TCP_80, |f, t, _, _| {
        (t != "x/a" || team(f)) && (f != "x/a" || !team(t))
    });

    // e2e "should enforce policy to allow traffic based on NamespaceSelector with MatchLabels
    // using default ns label" and "... with MatchExpressions using default ns label": every
    // namespace carries kubernetes.io/metadata.name, though the lab file does not list it.
    lab.apply(&format!(
        "{NP}metadata: {{name: ns-name, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  policyTypes: [Ingress, Egress]\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n  egress:\n  - to:\n    - namespaceSelector:\n        matchExpressions: [{{key: kubernetes.io/metadata.name, operator: NotIn, values: [y]}}]\n"
    ));
    lab.check_only("kubernetes.io/metadata.name namespace selectors", &TCP_80, |f, t, _, _| {
        (t != "x/a" || ns(f) == "y") && (f != "x/a" || ns(t) != "y")
    });

    // NetworkPolicyPeer.ipBlock on ingress: sources in the block, less its except ranges.
    // node2's pods are 10.77.1.0/24; y/b is 10.77.1.2.
    lab.apply(&format!(
        "{NP}metadata: {{name: cidr-in, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.77.1.0/24, except: [10.77.1.2/32]}}\n"
    ));
    lab.check_only("ipBlock with except on ingress", &TCP_80, |f, t, _, _| {
        t != "x/a" || (host(f) == "node2" && f != "y/b")
    });

    // e2e "should stop enforcing policies after they are deleted".
    lab.apply(&format!(
        "{NP}metadata: {{name: deny-all, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress, Egress]\n"
    ));
    lab.check_only("deny all in x", &TCP_80, |f, t, _, _| ns(f) != "x" && ns(t) != "x");
    lab.apply("");
    lab.check("every policy deleted: default allow again", |_, _, _, _| true);
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
    let mut conn = lab.connect("x/b", "x/a", 80);
    assert!(alive(&mut conn), "flow alive before updates");
    // A change that still allows x/b -> x/a (adds x/c): the open flow carries on.
    lab.apply(&format!(
        "{NP}metadata: {{name: a-from-b, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - podSelector:\n        matchExpressions: [{{key: pod, operator: In, values: [b, c]}}]\n"
    ));
    assert!(alive(&mut conn), "make-before-break kept the allowed flow");
    lab.check("after widening", |f, t, _, _| t != "x/a" || f == "x/b" || f == "x/c");
    // Relabel x/b so the policy no longer selects it: the flow is cut.
    lab.label("x/b", "pod=q");
    assert!(!alive(&mut conn), "relabelled source is cut");
    lab.check("after relabel", |f, t, _, _| t != "x/a" || f == "x/c");

    // e2e "should allow ingress access from updated namespace": x/a admits the namespaces
    // labelled ns2=updated, which no namespace is yet.
    lab.apply(&format!(
        "{NP}metadata: {{name: from-updated-ns, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{ns2: updated}}}}\n"
    ));
    lab.check_only("no namespace labelled yet", &TCP_80, |_, t, _, _| t != "x/a");
    lab.label("ns:y", "ns2=updated");
    lab.check_only("namespace y labelled", &TCP_80, |f, t, _, _| t != "x/a" || ns(f) == "y");
    let mut conn = lab.connect("y/b", "x/a", 80);
    // Labelling another namespace keeps y's flow allowed: it carries on.
    lab.label("ns:z", "ns2=updated");
    assert!(alive(&mut conn), "a namespace relabel that still allows the flow keeps it");
    // Removing y's label no longer allows the open flow: it is cut.
    lab.label("ns:y", "ns2-");
    assert!(!alive(&mut conn), "flow from a namespace that lost its label is cut");
    lab.check_only("namespace y unlabelled, z labelled", &TCP_80, |f, t, _, _| t != "x/a" || ns(f) == "z");
}

/// Whether an open connection still carries data: a cut flow shows up as a write that is
/// never acknowledged.
fn alive(c: &mut std::net::TcpStream) -> bool {
    use std::io::Write as _;
    c.write_all(b"ping").is_ok() && {
        std::thread::sleep(Duration::from_millis(600));
        unacked(c) == 0
    }
}

/// The upstream e2e SCTP tests ("`NetworkPolicy` between server and client using SCTP") with SCTP
/// traffic between the pods, plus TCP to show the same policies isolate it. Every scenario is
/// checked from `lab explain`, and from traffic where the kernel has SCTP. Where it has none
/// (a kernel built without `CONFIG_IP_SCTP`), the lab must say so and leave the SCTP cells
/// unprobed — never report them allowed or blocked — and this test checks that claim against
/// the kernel itself; TCP traffic and every explained cell are checked either way.
#[test]
fn sctp_scenarios() {
    let mut pods = String::new();
    for (ns, pod, host) in [
        ("x", "a", "node1"),
        ("x", "b", "node2"),
        ("y", "a", "node2"),
        ("y", "b", "node1"),
        ("z", "a", "node1"),
    ] {
        let _ = writeln!(pods, "  - {{name: {pod}, namespace: {ns}, labels: {{pod: {pod}}}, host: {host}}}");
    }
    let lab = TestLab::with_pods(&format!("sc{}", std::process::id() % 10_000), &pods, &["TCP", "SCTP"]);
    let mut problems = Vec::new();
    let mut check = |scenario: &str, want: &dyn Fn(&str, &str, u16, &str) -> bool| {
        problems.extend(lab.problems(&ALL, &want).into_iter().map(|p| format!("{scenario}: {p}")));
    };
    check("no policy: everything allowed", &|_, _, _, _| true);

    // e2e SCTP "should support a 'default-deny-ingress' policy".
    lab.apply(&format!(
        "{NP}metadata: {{name: deny, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Ingress]\n"
    ));
    check("default-deny ingress in x", &|_, t, _, _| ns(t) != "x");

    // e2e SCTP "should enforce policy based on Ports": namespace y only, SCTP 81 only.
    lab.apply(&format!(
        "{NP}metadata: {{name: sctp-81, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n    ports:\n    - {{protocol: SCTP, port: 81}}\n"
    ));
    check("an SCTP port from one namespace", &|f, t, port, proto| {
        t != "x/a" || (ns(f) == "y" && proto == "SCTP" && port == 81)
    });

    // e2e SCTP "should enforce policy to allow traffic only from a pod in a different
    // namespace based on PodSelector and NamespaceSelector": no ports, so every protocol.
    lab.apply(&format!(
        "{NP}metadata: {{name: y-a, namespace: x}}\nspec:\n  podSelector: {{matchLabels: {{pod: a}}}}\n  ingress:\n  - from:\n    - namespaceSelector: {{matchLabels: {{kubernetes.io/metadata.name: y}}}}\n      podSelector: {{matchLabels: {{pod: a}}}}\n"
    ));
    check("namespace and pod selector in one peer", &|f, t, _, _| t != "x/a" || f == "y/a");

    // A named SCTP port on egress (every pod names 80/SCTP serve-80-sctp).
    lab.apply(&format!(
        "{NP}metadata: {{name: named-sctp, namespace: x}}\nspec:\n  podSelector: {{}}\n  policyTypes: [Egress]\n  egress:\n  - ports:\n    - {{protocol: SCTP, port: serve-80-sctp}}\n"
    ));
    check("named SCTP port on egress", &|f, _, port, proto| ns(f) != "x" || (proto == "SCTP" && port == 80));

    // SAFETY: socket(2) with constant arguments; the descriptor is closed at once.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM, libc::IPPROTO_SCTP) };
    let kernel_has_sctp = fd >= 0;
    if kernel_has_sctp {
        // SAFETY: closing the descriptor just opened.
        unsafe { libc::close(fd) };
    }
    let unprobed = lab.unprobed();
    if kernel_has_sctp {
        assert!(unprobed.is_empty(), "the kernel has SCTP but the lab says {unprobed}");
    } else {
        assert!(!unprobed.is_empty(), "the kernel has no SCTP: the lab must say SCTP cannot be probed");
        // The traffic matrices of SCTP are reported unprobed (with no cells); nothing else may
        // differ.
        problems.retain(|p| {
            !(p.contains(": SCTP/") && !p.contains("`lab explain`") && p.ends_with("not probed (no cells)"))
        });
    }
    assert!(problems.is_empty(), "{} problems:\n{}{}", problems.len(), unprobed, problems.join("\n"));
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
        &["TCP", "UDP"],
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
