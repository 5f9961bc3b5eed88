//! High availability at process level: a 3-member etcd cluster on loopback and two controllers
//! (`ztseg-t controller run --store etcd`) sharing it, each with its own copy of the CA.
//!
//! Policies applied at either controller reach the subscribers of both; a stale
//! `--expected-version` is refused at both. Then one etcd member (the raft leader) and one
//! controller (the leader) are killed with SIGKILL, and the survivor still commits, distributes
//! (to its subscriber and, as a delta, to a new one resuming from version 1), serves the history
//! and a verifiable audit log, and takes over leadership.
//!
//! The test starts and stops etcd itself; without an `etcd` binary it fails (never skips).

#[path = "../../controller/tests/common/etcd_cluster.rs"]
mod etcd_cluster;

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command},
    time::{Duration, Instant},
};

use etcd_cluster::EtcdCluster;
use serde_json::Value;
use tokio::{runtime::Runtime, sync::mpsc};
use ztseg_api::controller::{self as pb, distribution_client::DistributionClient};
use ztseg_controller::{
    auth::Role,
    pki::{self, Ca, ClientFiles},
};
use ztseg_integration::unique;

const ZTSEG: &str = env!("CARGO_BIN_EXE_ztseg-t");
const IS_LEADER: &str = "controller is the leader";
const LOST_LEADERSHIP: &str = "controller lost leadership";

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn now_ms() -> i64 {
    ztseg_controller::now_ms()
}

fn ztseg_command() -> Command {
    ztseg_integration::clean_command(ZTSEG)
}

/// Run `cmd` to completion: (success, stdout, stderr).
fn run(cmd: &mut Command) -> (bool, String, String) {
    let out = cmd.output().expect("running ztseg-t");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A temporary directory, removed on drop.
struct TempDir(PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// Prints the etcd member logs if the test fails.
struct Etcd(EtcdCluster);

impl Drop for Etcd {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("etcd logs:\n{}", self.0.logs());
        }
    }
}

/// One `ztseg-t controller run --store etcd` process; killed (SIGKILL) on drop (its log is printed if
/// the test fails).
struct Controller {
    name: String,
    endpoint: String,
    log: PathBuf,
    child: Option<Child>,
}

impl Controller {
    fn start(name: &str, data_dir: &Path, endpoints: &[String], prefix: &str, log: PathBuf) -> Self {
        let endpoint = format!("127.0.0.1:{}", ztseg_integration::free_port());
        let out = fs::File::create(&log).expect("creating the controller log");
        let child = ztseg_command()
            .args(["controller", "run", "--data-dir", path_str(data_dir), "--listen", &endpoint])
            .args(["--store", "etcd", "--etcd-endpoints", &endpoints.join(",")])
            .args(["--etcd-prefix", prefix, "--name", name])
            .stdout(out.try_clone().expect("log handle"))
            .stderr(out)
            .spawn()
            .expect("starting the controller");
        Self { name: name.to_owned(), endpoint, log, child: Some(child) }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The JSON log lines whose `msg` is `msg`.
    fn lines(&self, msg: &str) -> Vec<Value> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter(|v| v["msg"] == msg)
            .collect()
    }

    /// Leadership changes in the log at or after `since_ms`: (leader now, `ts_ms`).
    fn leadership_changes(&self, since_ms: i64) -> Vec<(bool, i64)> {
        self.log()
            .lines()
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .filter_map(|l| {
                let ts = l["ts_ms"].as_i64().unwrap_or(0);
                (ts >= since_ms && (l["msg"] == IS_LEADER || l["msg"] == LOST_LEADERSHIP))
                    .then(|| (l["msg"] == IS_LEADER, ts))
            })
            .collect()
    }

    /// Whether the controller holds leadership by its log (its last leadership line).
    fn is_leader(&self) -> bool {
        self.leadership_changes(0).last().is_some_and(|c| c.0)
    }

    fn wait_serving(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while self.lines("controller serving").is_empty() {
            if let Some(status) = self.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("controller {} exited ({status}):\n{}", self.name, self.log());
            }
            assert!(Instant::now() < deadline, "controller {} not serving:\n{}", self.name, self.log());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// kill -9.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Run the CLI against this controller as the identity `dir/stem`.
    fn cli(&self, ident: &(PathBuf, &str), args: &[&str]) -> (bool, String, String) {
        run(ztseg_command()
            .env("ZTSEG_CONTROLLER", &self.endpoint)
            .env("ZTSEG_IDENTITY_DIR", &ident.0)
            .env("ZTSEG_IDENTITY", ident.1)
            .args(args))
    }

    /// `policy apply DIR -m MSG`; panics unless it commits version `want`.
    fn apply(&self, ident: &(PathBuf, &str), dir: &Path, msg: &str, want: u64) -> Duration {
        let t = Instant::now();
        let (ok, out, err) = self.cli(ident, &["policy", "apply", path_str(dir), "-m", msg]);
        let took = t.elapsed();
        assert!(ok, "apply of version {want} at {} failed: {out}{err}", self.name);
        assert!(
            out.contains(&format!("applied: policy version {want} ")),
            "apply at {} did not commit version {want}: {out}{err}",
            self.name
        );
        took
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("--- controller {} ({}) log ---\n{}", self.name, self.endpoint, self.log());
        }
    }
}

#[derive(Debug)]
enum Event {
    /// The Subscribe call was accepted (the server-side stream exists).
    Ready,
    Update(pb::PolicyUpdate),
    Failed(String),
}

/// A distribution subscriber (an enforcer identity) on one controller, run on `rt`.
struct Subscriber {
    what: String,
    rx: mpsc::UnboundedReceiver<Event>,
    /// The version of the last update received.
    version: u64,
}

impl Subscriber {
    fn start(rt: &Runtime, ctl: &Controller, files: ClientFiles, from_version: u64) -> Self {
        let what = format!("subscriber {} on {}", files.cert.display(), ctl.name);
        let endpoint = ctl.endpoint.clone();
        let (tx, rx) = mpsc::unbounded_channel();
        rt.spawn(async move {
            let ch = match ztseg_controller::server::connect(&endpoint, &files).await {
                Ok(ch) => ch,
                Err(e) => return drop(tx.send(Event::Failed(format!("{e:#}")))),
            };
            let mut stream = match DistributionClient::new(ch)
                .max_decoding_message_size(64 << 20)
                .subscribe(pb::SubscribeRequest { from_version, history: String::new() })
                .await
            {
                Ok(r) => r.into_inner(),
                Err(s) => return drop(tx.send(Event::Failed(format!("subscribe refused: {s}")))),
            };
            let _ = tx.send(Event::Ready);
            loop {
                let ev = match stream.message().await {
                    Ok(Some(u)) => Event::Update(u),
                    Ok(None) => Event::Failed("stream ended".into()),
                    Err(s) => Event::Failed(format!("stream failed: {s}")),
                };
                let last = matches!(ev, Event::Failed(_));
                if tx.send(ev).is_err() || last {
                    return;
                }
            }
        });
        let mut sub = Self { what, rx, version: from_version };
        match sub.event(rt, Duration::from_secs(10)) {
            Event::Ready => sub,
            other => panic!("{}: {other:?}", sub.what),
        }
    }

    fn event(&mut self, rt: &Runtime, timeout: Duration) -> Event {
        rt.block_on(async { tokio::time::timeout(timeout, self.rx.recv()).await })
            .unwrap_or_else(|_| panic!("{}: nothing within {timeout:?}", self.what))
            .unwrap_or_else(|| Event::Failed("task gone".into()))
    }

    /// The next update; it must continue from the last one received.
    fn update(&mut self, rt: &Runtime, timeout: Duration) -> pb::PolicyUpdate {
        match self.event(rt, timeout) {
            Event::Update(u) => {
                assert!(u.version > self.version, "{}: went back from {}: {u:?}", self.what, self.version);
                if u.snapshot {
                    assert_eq!(u.base_version, 0, "{}: {u:?}", self.what);
                } else {
                    assert_eq!(u.base_version, self.version, "{}: delta from the wrong base", self.what);
                }
                self.version = u.version;
                u
            }
            other => {
                panic!("{}: expected an update after version {}, got {other:?}", self.what, self.version)
            }
        }
    }
}

/// `(version, base, snapshot, upserts name→content, removes)` of an update, for comparisons.
type Shape = (u64, u64, bool, Vec<(String, String)>, Vec<String>);

fn shape(u: &pb::PolicyUpdate) -> Shape {
    let mut ups: Vec<(String, String)> =
        u.upserts.iter().map(|d| (d.name.clone(), d.content.clone())).collect();
    ups.sort();
    let mut rm = u.removes.clone();
    rm.sort();
    (u.version, u.base_version, u.snapshot, ups, rm)
}

fn ups(docs: &[(&str, &str)]) -> Vec<(String, String)> {
    docs.iter().map(|(n, c)| ((*n).to_owned(), (*c).to_owned())).collect()
}

const DENY: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny, namespace: x}\n\
                    spec:\n  podSelector: {}\n  policyTypes: [Ingress]\n";

fn allow_from(pod: &str) -> String {
    format!(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: allow, namespace: x}}\n\
         spec:\n  podSelector: {{}}\n  ingress:\n    - from: [{{podSelector: {{matchLabels: {{pod: {pod}}}}}}}]\n"
    )
}

/// A policy directory with `docs`.
fn policy_dir(dir: &Path, docs: &[(&str, &str)]) -> PathBuf {
    fs::create_dir_all(dir).unwrap();
    for (name, content) in docs {
        fs::write(dir.join(name), content).unwrap();
    }
    dir.to_path_buf()
}

/// Index of the etcd member that is the raft leader (`etcdctl endpoint status`), if etcdctl
/// can tell.
fn raft_leader(etcd: &EtcdCluster) -> Result<usize, String> {
    let etcdctl = etcd_cluster::etcd_binary().with_file_name("etcdctl");
    let etcdctl = if etcdctl.exists() { etcdctl } else { PathBuf::from("etcdctl") };
    let out = Command::new(&etcdctl)
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &etcd.endpoints().join(","), "endpoint", "status", "-w", "json"])
        .output()
        .map_err(|e| format!("running {}: {e}", etcdctl.display()))?;
    let said = || {
        format!(
            "etcdctl said: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    };
    let v: Value = serde_json::from_slice(&out.stdout).map_err(|e| format!("{e}; {}", said()))?;
    let leader = v
        .as_array()
        .and_then(|a| {
            a.iter().find(|s| {
                s["Status"]["leader"]
                    .as_u64()
                    .is_some_and(|l| Some(l) == s["Status"]["header"]["member_id"].as_u64())
            })
        })
        .ok_or_else(|| format!("no member reports itself as the leader; {}", said()))?;
    etcd.members
        .iter()
        .position(|m| leader["Endpoint"].as_str() == Some(m.client_url.as_str()))
        .ok_or_else(|| format!("the leader's endpoint is no member's; {}", said()))
}

/// The member that is the raft leader: etcdctl is asked again (an election may be under way)
/// for up to `limit`, and the test fails if it never names one.
fn wait_raft_leader(etcd: &EtcdCluster, limit: Duration) -> usize {
    let t0 = Instant::now();
    loop {
        match raft_leader(etcd) {
            Ok(i) => return i,
            Err(e) => assert!(t0.elapsed() < limit, "no raft leader found in {limit:?}: {e}"),
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

#[test]
#[expect(clippy::too_many_lines, reason = "one scenario, told start to finish")]
fn two_controllers_survive_losing_an_etcd_member_and_a_controller() {
    let started = Instant::now();
    let tmp = TempDir(std::env::temp_dir().join(unique("ztseg-ha-")));
    let _ = fs::remove_dir_all(&tmp.0);
    fs::create_dir_all(&tmp.0).unwrap();
    let mut etcd = Etcd(EtcdCluster::start(3));
    let endpoints = etcd.0.endpoints();
    let prefix = format!("/ztseg-test-{}", unique(""));
    eprintln!("etcd cluster up after {:?}", started.elapsed());

    // One CA; each controller gets its own copy of it (state lives in etcd only).
    let data = tmp.0.join("data");
    let (ok, out, err) = run(ztseg_command().args(["controller", "init", "--data-dir", path_str(&data)]));
    assert!(ok, "controller init: {out}{err}");
    for c in ["c1", "c2"] {
        let d = tmp.0.join(c);
        fs::create_dir_all(&d).unwrap();
        for f in [pki::CA_CERT, pki::CA_KEY, pki::SERVER_CERT, pki::SERVER_KEY] {
            fs::copy(data.join(f), d.join(f)).unwrap();
        }
    }
    // Every client identity is written before anything connects (they share ca.pem).
    let ca = Ca::load(&data, None).unwrap();
    let admin = (data.join("admin"), "admin");
    let ops = (tmp.0.join("ops"), "ops");
    let op = ca.issue_client(Role::Operator, "ops", Duration::from_hours(1)).unwrap();
    ClientFiles::in_dir(&ops.0, ops.1).save(&op, &ca.cert_pem).unwrap();
    let subs_dir = tmp.0.join("subs");
    let sub_files: Vec<ClientFiles> = (1..=4)
        .map(|i| {
            let name = format!("sub-{i}");
            let issued = ca.issue_client(Role::Enforcer, &name, Duration::from_hours(1)).unwrap();
            let files = ClientFiles::in_dir(&subs_dir, &name);
            files.save(&issued, &ca.cert_pem).unwrap();
            files
        })
        .collect();

    let mut ctls = [
        Controller::start("c1", &tmp.0.join("c1"), &endpoints, &prefix, tmp.0.join("c1.log")),
        Controller::start("c2", &tmp.0.join("c2"), &endpoints, &prefix, tmp.0.join("c2.log")),
    ];
    for c in &mut ctls {
        c.wait_serving(Duration::from_secs(20));
    }
    // Exactly one of them leads.
    let deadline = Instant::now() + Duration::from_secs(15);
    let leader = loop {
        let l: Vec<usize> = (0..2).filter(|&i| ctls[i].is_leader()).collect();
        assert!(l.len() <= 1, "both controllers claim leadership");
        if let [i] = l[..] {
            break i;
        }
        assert!(Instant::now() < deadline, "no controller became leader");
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("controllers serving after {:?}; {} leads", started.elapsed(), ctls[leader].name);

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let wait = Duration::from_secs(15);
    let mut subs = [
        Subscriber::start(&rt, &ctls[0], sub_files[0].clone(), 0),
        Subscriber::start(&rt, &ctls[1], sub_files[1].clone(), 0),
    ];

    let allow_a = allow_from("a");
    let allow_b = allow_from("b");
    let p1 = policy_dir(&tmp.0.join("p1"), &[("deny.yaml", DENY)]);
    let p2 = policy_dir(&tmp.0.join("p2"), &[("deny.yaml", DENY), ("allow.yaml", &allow_a)]);
    let p3 = policy_dir(&tmp.0.join("p3"), &[("allow.yaml", &allow_b)]);

    // Version 1 at c1 (admin): both subscribers get it as a snapshot.
    ctls[0].apply(&admin, &p1, "first", 1);
    for s in &mut subs {
        let u = s.update(&rt, wait);
        assert_eq!(shape(&u), (1, 0, true, ups(&[("deny.yaml", DENY)]), vec![]), "{}", s.what);
    }
    // Version 2 at c2 (operator): both get the delta from 1.
    ctls[1].apply(&ops, &p2, "second", 2);
    for s in &mut subs {
        let u = s.update(&rt, wait);
        assert_eq!(shape(&u), (2, 1, false, ups(&[("allow.yaml", &allow_a)]), vec![]), "{}", s.what);
    }

    // A revocation made at c1 ends a policy stream held at c2, with no policy change to carry
    // it: c2 looks again at least every REVOCATION_RECHECK.
    let mut doomed = Subscriber::start(&rt, &ctls[1], sub_files[3].clone(), 2);
    let t = Instant::now();
    let (ok, out, err) =
        ctls[0].cli(&admin, &["controller", "revoke", "--role", "enforcer", "--name", "sub-4"]);
    assert!(ok, "revoke at c1: {out}{err}");
    match doomed.event(&rt, Duration::from_secs(15)) {
        Event::Failed(m) => assert!(m.contains("revoked"), "{}: {m}", doomed.what),
        other => panic!("{}: expected the stream to end, got {other:?}", doomed.what),
    }
    let took = t.elapsed();
    assert!(
        took <= ztseg_controller::service::REVOCATION_RECHECK + Duration::from_secs(3),
        "revocation at c1 reached the stream at c2 after {took:?}"
    );
    eprintln!("revocation at c1 ended the stream at c2 after {took:?}");

    // A stale --expected-version is refused at either controller, and commits nothing.
    for c in &ctls {
        let (ok, out, err) =
            c.cli(&admin, &["policy", "apply", path_str(&p3), "-m", "stale", "--expected-version", "1"]);
        assert!(!ok, "a stale apply at {} succeeded: {out}{err}", c.name);
        assert!(
            err.contains("policy version conflict: expected 1, current is 2"),
            "no conflict message from {}: {out}{err}",
            c.name
        );
    }

    // Kill -9 the etcd raft leader and the leading controller.
    let member = wait_raft_leader(&etcd.0, Duration::from_secs(15));
    let survivor = 1 - leader;
    let killed_ms = now_ms();
    let kill_time = Instant::now();
    etcd.0.kill(member);
    ctls[leader].kill();
    eprintln!(
        "killed etcd member {member} (raft leader) and controller {} (leader) after {:?}",
        ctls[leader].name,
        started.elapsed()
    );
    // The killed controller's subscriber loses its stream.
    match subs[leader].event(&rt, Duration::from_secs(15)) {
        Event::Failed(e) => eprintln!("{}: {e}", subs[leader].what),
        other => panic!("{}: expected the stream to fail, got {other:?}", subs[leader].what),
    }

    // Version 3 at the survivor (admin), despite both losses.
    let ctl = &ctls[survivor];
    let took = ctl.apply(&admin, &p3, "third", 3);
    eprintln!("apply of version 3 at {} took {took:?} ({:?} after the kills)", ctl.name, kill_time.elapsed());
    let u = subs[survivor].update(&rt, wait);
    assert_eq!(
        shape(&u),
        (3, 2, false, ups(&[("allow.yaml", &allow_b)]), vec!["deny.yaml".to_owned()]),
        "{}",
        subs[survivor].what
    );
    // A new subscriber resuming from version 1 gets one delta to version 3.
    let mut late = Subscriber::start(&rt, ctl, sub_files[2].clone(), 1);
    let u = late.update(&rt, wait);
    assert_eq!(
        shape(&u),
        (3, 1, false, ups(&[("allow.yaml", &allow_b)]), vec!["deny.yaml".to_owned()]),
        "{}",
        late.what
    );

    // History: versions 1..3, each with its actor and message; the stale applies left no trace.
    let (ok, out, err) = ctl.cli(&admin, &["-o", "json", "policy", "history"]);
    assert!(ok, "history: {out}{err}");
    let hist: Vec<Value> = serde_json::from_str(&out).unwrap_or_else(|e| panic!("history: {e}: {out}"));
    let rows: Vec<(String, String, String)> = hist
        .iter()
        .map(|r| {
            let s = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            (r["version"].to_string(), s("actor"), s("message"))
        })
        .collect();
    let row = |v: &str, a: &str, m: &str| (v.to_owned(), a.to_owned(), m.to_owned());
    assert_eq!(
        rows,
        vec![
            row("3", "admin/admin", "third"),
            row("2", "operator/ops", "second"),
            row("1", "admin/admin", "first")
        ],
        "{out}"
    );

    // The audit chain, written by both controllers, verifies through the survivor.
    let (ok, out, err) = ctl.cli(&admin, &["audit", "verify"]);
    assert!(ok && out.contains("audit log intact"), "audit verify: {out}{err}");

    // Leadership moves to the survivor when the dead leader's lease expires: its TTL is 5 s,
    // and etcd's new raft leader renews every lease on election (by the TTL plus the election
    // timeout, 1 s), so about 7.5 s after the kills. It moves once and stays: the survivor never
    // claims leadership and drops it again (the etcd cluster keeps its quorum throughout).
    let deadline = kill_time + Duration::from_secs(10);
    while !ctl.leadership_changes(killed_ms).iter().any(|c| c.0) {
        assert!(
            Instant::now() < deadline,
            "{} did not take over leadership within 10 s of the kills",
            ctl.name
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    std::thread::sleep(Duration::from_secs(2));
    let changes = ctl.leadership_changes(killed_ms);
    let [(true, since)] = changes[..] else {
        panic!(
            "{} did not take over leadership cleanly (claims and losses since the kills): {changes:?}",
            ctl.name
        );
    };
    eprintln!("{} became leader {} ms after the kills", ctl.name, since - killed_ms);

    // Nothing more reached the survivor's subscribers.
    for s in [&mut subs[survivor], &mut late] {
        assert!(s.rx.try_recv().is_err(), "{}: unexpected event", s.what);
    }
    drop(rt);
    eprintln!("total {:?}", started.elapsed());
}
