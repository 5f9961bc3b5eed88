//! Policy distribution through the controller, with real traffic: a lab of three simulated
//! hosts (one enforcer each) and a controller in its own namespace. Policies are applied at
//! the controller only; every host must enforce them. A host cut off from the controller
//! during two changes keeps its last-known policy (shown as stale) and converges when it
//! reconnects.

use std::{
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use serde::Deserialize;

const NAME: &str = "dist";

#[derive(Deserialize, Debug)]
struct Matrix {
    pods: Vec<String>,
    allowed: Vec<Vec<bool>>,
}

fn ztseg(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_ztseg-t")).args(args).output().expect("run ztseg");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

struct Lab {
    dir: PathBuf,
    file: String,
}

impl Lab {
    fn up() -> Self {
        ztseg_integration::require_root();
        let dir = std::env::temp_dir().join(ztseg_integration::unique("ztseg-dist-"));
        std::fs::create_dir_all(dir.join("policies")).unwrap();
        let file = dir.join("lab.yaml").display().to_string();
        std::fs::write(
            &file,
            format!(
                "name: {NAME}\nhosts: [h1, h2, h3]\ncontroller: true\nnamespaces:\n  - {{name: x, labels: {{ns: x}}}}\n\
                 pods:\n  - {{name: a, namespace: x, labels: {{pod: a}}, host: h1}}\n  - {{name: b, namespace: x, labels: {{pod: b}}, host: h2}}\n  - {{name: c, namespace: x, labels: {{pod: c}}, host: h3}}\n\
                 ports: [80]\nprotocols: [TCP]\ntimeoutMs: 400\npolicies: [policies]\n"
            ),
        )
        .unwrap();
        std::fs::write(dir.join("policies/deny.yaml"), DENY).unwrap();
        let lab = Self { dir, file };
        let _ = ztseg(&["lab", "down", "-f", &lab.file]);
        let (ok, out, err) = ztseg(&["lab", "up", "-f", &lab.file]);
        assert!(ok, "lab up failed: {out}{err}");
        lab
    }

    fn set_allow(&self, from: &[&str]) {
        let p = self.dir.join("policies/allow.yaml");
        if from.is_empty() {
            let _ = std::fs::remove_file(p);
        } else {
            let peers: Vec<String> =
                from.iter().map(|f| format!("{{podSelector: {{matchLabels: {{pod: {f}}}}}}}")).collect();
            std::fs::write(
                p,
                format!(
                    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow, namespace: x}}\n\
                     spec:\n  podSelector: {{}}\n  ingress:\n    - from: [{}]\n",
                    peers.join(", ")
                ),
            )
            .unwrap();
        }
        let (ok, out, err) = ztseg(&["lab", "apply", "-f", &self.file]);
        assert!(ok, "lab apply failed: {out}{err}");
    }

    /// Allowed (from, to) pairs between distinct pods, e.g. "x/a->x/b".
    fn reachable(&self) -> Vec<String> {
        let (_, out, err) = ztseg(&["-o", "json", "lab", "probe", "-f", &self.file]);
        let m: Vec<Matrix> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("probe: {e}: {out}{err}"));
        let mut v = Vec::new();
        for (f, from) in m[0].pods.iter().enumerate() {
            for (t, to) in m[0].pods.iter().enumerate() {
                if f != t && m[0].allowed[f][t] {
                    v.push(format!("{from}->{to}"));
                }
            }
        }
        v
    }

    fn status(host: &str) -> serde_json::Value {
        let sock = format!("/run/ztseg/lab/{NAME}/{host}.sock");
        let (ok, out, err) = ztseg(&["-o", "json", "enforcer", "status", "--socket", &sock]);
        assert!(ok, "status {host}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        v[0].clone()
    }

    fn wait(host: &str, what: &str, f: impl Fn(&serde_json::Value) -> bool) -> Duration {
        let t = Instant::now();
        loop {
            let s = Self::status(host);
            if f(&s) {
                return t.elapsed();
            }
            assert!(t.elapsed() < Duration::from_secs(30), "{host}: {what} not reached in 30 s: {s}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = ztseg(&["lab", "down", "-f", &self.file]);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lab's state file (`ztseg lab up` writes it).
fn lab_state() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(format!("/run/ztseg/lab/{NAME}.json")).unwrap()).unwrap()
}

/// Network namespace of pod `i` (file order) of the lab.
fn pod_netns(i: usize) -> String {
    lab_state()["pods"][i]["netns"].as_str().unwrap().to_owned()
}

/// IPv4 address of pod `i` (file order) of the lab.
fn pod_ip(i: usize) -> String {
    lab_state()["pods"][i]["ipv4"].as_str().unwrap().to_owned()
}

/// The enforcer metrics of host `i` (file order): its daemon serves them on 127.0.0.1:9464
/// inside the host's namespace. Metric name (with labels) → value.
fn host_metrics(i: usize) -> std::collections::BTreeMap<String, f64> {
    use std::io::{Read as _, Write as _};
    let ns = lab_state()["hosts"][i]["netns"].as_str().unwrap().to_owned();
    let text = ztseg::lab::in_netns(&ns, || {
        let mut c = std::net::TcpStream::connect("127.0.0.1:9464")?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
        let mut s = String::new();
        c.read_to_string(&mut s)?;
        Ok(s)
    })
    .unwrap_or_else(|e| panic!("scraping host {i}'s metrics: {e:#}"));
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(k, v)| Some((k.to_owned(), v.parse().ok()?)))
        .collect()
}

/// Whether `metrics` has `name` with `value` (a missing metric is a mismatch).
fn metric_is(metrics: &std::collections::BTreeMap<String, f64>, name: &str, value: f64) -> bool {
    #[expect(clippy::float_cmp, reason = "gauges of small integers, exactly representable")]
    metrics.get(name).is_some_and(|v| *v == value)
}

/// A TCP connection from namespace `ns` that got the server's greeting byte.
fn connect_from(ns: &str, addr: &str) -> Option<std::net::TcpStream> {
    use std::io::Read as _;
    ztseg::lab::in_netns(ns, || {
        let mut c = std::net::TcpStream::connect_timeout(&addr.parse()?, Duration::from_millis(300))?;
        c.set_read_timeout(Some(Duration::from_millis(500)))?;
        let mut b = [0u8; 1];
        c.read_exact(&mut b)?;
        Ok(c)
    })
    .ok()
}

/// The peer still acknowledges what we send (a cut flow leaves bytes unacknowledged).
fn alive(c: &mut std::net::TcpStream) -> bool {
    use std::io::Write as _;
    if c.write_all(b"ping").is_err() {
        return false;
    }
    std::thread::sleep(Duration::from_millis(600));
    let mut n: libc::c_int = 0;
    // SAFETY: ioctl(TIOCOUTQ) writes one int into `n`, on a socket we own.
    let rc = unsafe { libc::ioctl(std::os::fd::AsRawFd::as_raw_fd(c), libc::TIOCOUTQ, &raw mut n) };
    rc == 0 && n == 0
}

const DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

fn version(s: &serde_json::Value) -> u64 {
    s["controller_version"].as_u64().unwrap()
}

#[test]
fn controller_policy_reaches_every_host_and_an_isolated_host_converges() {
    let lab = Lab::up();
    // Version 1 (deny all ingress) arrived through the controller on every host.
    for h in ["h1", "h2", "h3"] {
        let s = Lab::status(h);
        assert_eq!(s["policy_source"], "controller", "{s}");
        assert_eq!(version(&s), 1, "{s}");
        assert_eq!(s["policy_stale"], false, "{s}");
    }
    denied_attempt_reaches_the_siem_sink_within_5s();
    assert_eq!(lab.reachable(), Vec::<String>::new());

    // Version 2: ingress from a. Every host enforces it (ingress is decided at b's and c's hosts).
    lab.set_allow(&["a"]);
    for h in ["h1", "h2", "h3"] {
        assert_eq!(version(&Lab::status(h)), 2);
    }
    assert_eq!(lab.reachable(), vec!["x/a->x/b", "x/a->x/c"]);

    // Cut h3 off; it notices and reports the policy as stale.
    let (ok, _, err) = ztseg(&["lab", "isolate", "-f", &lab.file, "h3"]);
    assert!(ok, "{err}");
    let took = Lab::wait("h3", "stale", |s| s["policy_stale"] == true);
    eprintln!("h3 noticed the lost controller after {took:?}");
    let m = host_metrics(2);
    assert!(
        metric_is(&m, "ztseg_policy_stale", 1.0) && metric_is(&m, "ztseg_controller_connected", 0.0),
        "h3's metrics while it is cut off: {m:?}"
    );
    assert!(metric_is(&m, "ztseg_controller_policy_version", 2.0), "{m:?}");
    // A flow only this moment has: x/b -> x/c on port 81, which h3 denies while cut off; then
    // h3's enforcer restarts (SIGTERM) while still cut off, and denies x/b -> x/c:82; then it
    // is killed (SIGKILL) 1.5 s later — its checkpoint keeps :82 — and denies :83.
    assert!(connect_from(&pod_netns(1), "10.77.2.1:81").is_none(), "x/b -> x/c:81 denied");
    std::thread::sleep(Duration::from_millis(300));
    let (ok, out, err) = ztseg(&["lab", "restart", "-f", &lab.file, "h3"]);
    assert!(ok, "{out}{err}");
    assert!(connect_from(&pod_netns(1), "10.77.2.1:82").is_none(), "x/b -> x/c:82 denied");
    std::thread::sleep(Duration::from_millis(1500));
    let (ok, out, err) = ztseg(&["lab", "restart", "--kill", "-f", &lab.file, "h3"]);
    assert!(ok, "{out}{err}");
    assert!(connect_from(&pod_netns(1), "10.77.2.1:83").is_none(), "x/b -> x/c:83 denied");

    // Two changes while h3 is away: versions 3 (from a and b) and 4 (from b only).
    // Make-before-break through the controller: a live x/a -> x/b connection (allowed by
    // versions 2 and 3) survives the change to 3, while x/c -> x/b (allowed by neither) is
    // never admitted during it; version 4 no longer allows x/a -> x/b and cuts it.
    let mut conn = connect_from(&pod_netns(0), "10.77.1.1:80").expect("x/a -> x/b allowed by version 2");
    assert!(alive(&mut conn), "flow alive before the change");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let intruder = {
        let stop = stop.clone();
        let ns = pod_netns(2);
        std::thread::spawn(move || {
            let mut admitted = 0;
            let mut tries = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                tries += 1;
                if connect_from(&ns, "10.77.1.1:80").is_some() {
                    admitted += 1;
                }
            }
            (tries, admitted)
        })
    };
    lab.set_allow(&["a", "b"]);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (tries, admitted) = intruder.join().unwrap();
    assert!(tries > 0);
    assert_eq!(admitted, 0, "x/c -> x/b admitted during the change ({tries} tries)");
    assert!(alive(&mut conn), "make-before-break kept the flow allowed by both versions");
    lab.set_allow(&["b"]);
    assert!(!alive(&mut conn), "version 4 cut x/a -> x/b");
    assert_eq!(version(&Lab::status("h1")), 4);
    assert_eq!(version(&Lab::status("h2")), 4);
    let s3 = Lab::status("h3");
    assert_eq!(version(&s3), 2, "the isolated host keeps its last-known version: {s3}");
    // h1 and h2 enforce version 4 (to a and b: only from b); h3 still version 2 (to c: from a).
    assert_eq!(lab.reachable(), vec!["x/a->x/c", "x/b->x/a"]);

    // Reconnect: h3 resumes from version 2 and converges to 4.
    let (ok, _, err) = ztseg(&["lab", "rejoin", "-f", &lab.file, "h3"]);
    assert!(ok, "{err}");
    let took = Lab::wait("h3", "version 4", |s| version(s) == 4 && s["policy_stale"] == false);
    eprintln!("h3 converged {took:?} after reconnecting");
    assert_eq!(lab.reachable(), vec!["x/b->x/a", "x/b->x/c"]);
    // It resumed from its own version with a delta (2 -> 4), not a snapshot: the restarted
    // daemon's first update since it started.
    let log = std::fs::read_to_string(format!("/run/ztseg/lab/{NAME}/h3.log")).unwrap();
    assert!(log.contains("\"from_version\":\"2\""), "h3 did not resume from version 2:\n{log}");
    let m = host_metrics(2);
    assert!(
        metric_is(&m, "ztseg_policy_stale", 0.0) && metric_is(&m, "ztseg_controller_connected", 1.0),
        "h3's metrics after it rejoined: {m:?}"
    );
    assert!(metric_is(&m, "ztseg_controller_policy_version", 4.0), "{m:?}");
    assert!(
        metric_is(&m, "ztseg_controller_last_update_snapshot", 0.0)
            && metric_is(&m, "ztseg_controller_last_update_base_version", 2.0),
        "h3's update after rejoining was not a delta from version 2: {m:?}"
    );
    // What h3 denied while it was cut off reached the controller's audit log after all.
    wait_for_isolated_denials();

    revoked_host_backs_off("h2", 1);
}

/// One denied connection attempt, x/a -> x/b:80 (h2 denies it at b's ingress): the record of
/// that very flow reaches the controller's SIEM sink (as OCSF network activity) within 5 s of
/// the attempt.
fn denied_attempt_reaches_the_siem_sink_within_5s() {
    let (a_ip, b_ip) = (pod_ip(0), pod_ip(1));
    let attempt_ms = ztseg_controller::now_ms();
    let attempted = Instant::now();
    assert!(
        connect_from(&pod_netns(0), &format!("{b_ip}:80")).is_none(),
        "x/a -> x/b:80 denied by version 1"
    );
    let siem = format!("/run/ztseg/lab/{NAME}/siem.jsonl");
    let found = loop {
        let text = std::fs::read_to_string(&siem).unwrap_or_default();
        let hit = text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).find(|v| {
            v["class_uid"] == 4001
                && v["disposition"] == "Blocked"
                && v["actor"]["user"]["uid"] == "enforcer/h2"
                && v["src_endpoint"]["ip"] == a_ip.as_str()
                && v["dst_endpoint"]["ip"] == b_ip.as_str()
                && v["dst_endpoint"]["port"] == 80
                && v["time"].as_i64().is_some_and(|t| t >= attempt_ms)
        });
        if let Some(v) = hit {
            break v;
        }
        assert!(
            attempted.elapsed() < Duration::from_secs(5),
            "no record of the denied x/a -> x/b:80 in {siem} within 5 s of the attempt:\n{text}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("denied flow in the SIEM sink {:?} after the attempt: {found}", attempted.elapsed());
}

/// Revoking host `host`'s (index `i`) identity ends its session: it shows why in its status
/// and asks again ever more slowly (5 s, then 10 s, ... up to a minute), not every 2 s.
fn revoked_host_backs_off(host: &str, i: usize) {
    let ctl = lab_state()["controller"].clone();
    let admin = format!("{}/admin", ctl["data_dir"].as_str().unwrap());
    let out = Command::new("ip")
        .args(["netns", "exec", ctl["netns"].as_str().unwrap(), env!("CARGO_BIN_EXE_ztseg-t")])
        .args(["controller", "revoke", "--role", "enforcer", "--name", host, "--controller"])
        .arg(ctl["endpoint"].as_str().unwrap())
        .args(["--identity-dir", &admin, "--identity", "admin"])
        .output()
        .unwrap();
    assert!(out.status.success(), "revoke {host}: {}", String::from_utf8_lossy(&out.stderr));
    let took = Lab::wait(host, "refused as revoked", |s| {
        s["policy_stale"] == true
            && s["controller_error"].as_str().is_some_and(|e| e.contains("revoked"))
            && s["controller_retry_ms"].as_u64().is_some_and(|m| m >= 5000)
    });
    eprintln!("{host} noticed its revocation after {took:?}: {}", Lab::status(host));
    Lab::wait(host, "a longer wait after the next refusal", |s| {
        s["controller_retry_ms"].as_u64().is_some_and(|m| m >= 10_000)
    });
    let m = host_metrics(i);
    assert!(metric_is(&m, "ztseg_controller_connected", 0.0), "{m:?}");
}

/// Wait (10 s at most) for the flows h3 denied while isolated — x/b -> x/c:81 before its
/// restart (kept across it in h3's state directory), :82 between the restart and a kill -9
/// (kept by the checkpoint) and :83 after — in the SIEM sink.
fn wait_for_isolated_denials() {
    let siem = format!("/run/ztseg/lab/{NAME}/siem.jsonl");
    let waited = Instant::now();
    loop {
        let text = std::fs::read_to_string(&siem).unwrap_or_default();
        let kept = |port: u16| {
            text.lines().filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok()).any(|v| {
                v["class_uid"] == 4001
                    && v["actor"]["user"]["name"] == "h3"
                    && v["dst_endpoint"]["port"] == port
                    && v["dst_endpoint"]["name"] == "x/b"
            })
        };
        // Port 81: denied before the restart, kept across it in h3's state directory; 82:
        // denied 1.5 s before h3 was killed, kept by the checkpoint.
        if kept(81) && kept(82) && kept(83) {
            break;
        }
        assert!(
            waited.elapsed() < Duration::from_secs(10),
            "flows h3 denied while isolated (x/b -> x/c:81 before its restart, :82 before the kill, :83 after) missing in {siem}:\n{text}\nh3's log:\n{}",
            std::fs::read_to_string(format!("/run/ztseg/lab/{NAME}/h3.log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}
