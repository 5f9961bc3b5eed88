//! The controller as a process with real mTLS: refusals in the TLS handshake and at the API
//! (each recorded in the audit log), crash safety of the embedded store under `kill -9`
//! during applies, detection of a tampered audit log (also after archiving and pruning its
//! oldest records), one-time enrollment tokens, and the SIEM file export.
//!
//! Every test runs its own controller (`ztseg-t controller run`) on a free port with its own
//! data directory, and talks to it through the CLI or the generated gRPC clients.

#![allow(clippy::too_many_lines, reason = "each test is one scenario, told start to finish")]

use std::{
    collections::BTreeMap,
    fmt,
    fs::{self, OpenOptions},
    future::Future,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use rand::{Rng as _, SeedableRng as _, rngs::StdRng};
use redb::{ReadableDatabase as _, ReadableTable as _};
use serde_json::Value;
use tonic::{Code, transport::Channel};
use ztseg_api::controller::{
    self as pb, audit_client::AuditClient, distribution_client::DistributionClient,
    enrollment_client::EnrollmentClient, policy_client::PolicyClient,
};
use ztseg_controller::{
    auth::Role,
    pki::{Ca, ClientFiles},
    store::embedded::{AUDIT, META, TOKENS},
};
use ztseg_integration::unique;

const ZTSEG: &str = env!("CARGO_BIN_EXE_ztseg-t");
const DEMO_POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/demo/policies");
const LAB_POLICIES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../policies/lab/e2e-policies");
const RPC_PREFIX: &str = "/ztseg.controller.v1.";

/// Relative path → bytes: a document set as files (compared byte for byte).
type Tree = BTreeMap<String, Vec<u8>>;

fn path_str(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

fn ztseg_command() -> Command {
    ztseg_integration::clean_command(ZTSEG)
}

/// How a CLI run ended.
struct Out {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Out {
    fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

impl fmt::Display for Out {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "exit {:?}\n--- stdout\n{}\n--- stderr\n{}", self.code, self.stdout, self.stderr)
    }
}

/// A CLI process with its output going to files (no pipe can fill up and stall it).
struct Running {
    child: Child,
    stdout: PathBuf,
    stderr: PathBuf,
    started: Instant,
}

impl Running {
    fn wait(mut self, limit: Duration) -> (Out, Duration) {
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("try_wait") {
                break s;
            }
            assert!(
                self.started.elapsed() < limit,
                "CLI still running after {limit:?}; stderr so far:\n{}",
                fs::read_to_string(&self.stderr).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(5));
        };
        let took = self.started.elapsed();
        let out = Out {
            code: status.code(),
            stdout: fs::read_to_string(&self.stdout).unwrap_or_default(),
            stderr: fs::read_to_string(&self.stderr).unwrap_or_default(),
        };
        let _ = fs::remove_file(&self.stdout);
        let _ = fs::remove_file(&self.stderr);
        (out, took)
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A no-op once waited for; otherwise (a failing test) the process must not outlive it.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One controller: a data directory (made by `ztseg controller init`) and, while started,
/// its process. Killed (and the directory removed, unless the test failed) on drop.
struct Controller {
    root: PathBuf,
    data: PathBuf,
    addr: String,
    siem: Option<PathBuf>,
    /// Extra `controller run` arguments.
    extra: Vec<String>,
    child: Option<Child>,
}

impl Controller {
    fn init(name: &str) -> Self {
        let root = std::env::temp_dir().join(unique(&format!("ztseg-ctl-{name}-")));
        let _ = fs::remove_dir_all(&root);
        fs::create_dir_all(root.join("cli")).unwrap();
        let data = root.join("data");
        let c = Self { root, data, addr: String::new(), siem: None, extra: Vec::new(), child: None };
        let out = c.cli(&["controller", "init", "--data-dir", path_str(&c.data)]);
        assert!(out.ok(), "controller init: {out}");
        c
    }

    fn started(name: &str) -> Self {
        Self::started_with(name, &[])
    }

    /// Started with extra `controller run` arguments.
    fn started_with(name: &str, extra: &[&str]) -> Self {
        let mut c = Self::init(name);
        c.extra = extra.iter().map(|a| (*a).to_owned()).collect();
        c.start();
        c
    }

    fn log(&self) -> String {
        fs::read_to_string(self.root.join("controller.log")).unwrap_or_default()
    }

    /// Start on a fresh free port and wait until it accepts connections.
    fn start(&mut self) {
        assert!(self.child.is_none(), "controller already running");
        for attempt in 0..3 {
            self.addr = format!("127.0.0.1:{}", ztseg_integration::free_port());
            let log =
                OpenOptions::new().create(true).append(true).open(self.root.join("controller.log")).unwrap();
            let mut cmd = ztseg_command();
            cmd.args(["controller", "run", "--name", "test", "--data-dir", path_str(&self.data), "--listen"])
                .arg(&self.addr);
            if let Some(s) = &self.siem {
                cmd.arg("--siem").arg(format!("file:{}", s.display()));
            }
            cmd.args(&self.extra);
            let mut child = cmd.stdout(Stdio::null()).stderr(log).spawn().expect("spawn the controller");
            let sock: SocketAddr = self.addr.parse().unwrap();
            let t0 = Instant::now();
            loop {
                if let Some(st) = child.try_wait().unwrap() {
                    // Another process took the port between our probe and the bind: retry.
                    if attempt < 2 && self.log().contains("binding") {
                        break;
                    }
                    panic!("controller exited at start ({st}):\n{}", self.log());
                }
                if TcpStream::connect_timeout(&sock, Duration::from_millis(200)).is_ok() {
                    self.child = Some(child);
                    return;
                }
                if t0.elapsed() > Duration::from_secs(20) {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("controller not listening on {} after 20 s:\n{}", self.addr, self.log());
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        panic!("controller could not bind a free port:\n{}", self.log());
    }

    /// SIGKILL: no clean-up of any kind in the controller.
    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().expect("SIGKILL the controller");
            c.wait().unwrap();
        }
    }

    /// SIGTERM; the controller must exit successfully within 10 s.
    fn stop(&mut self) {
        let Some(mut c) = self.child.take() else { return };
        let pid = libc::pid_t::try_from(c.id()).unwrap();
        // SAFETY: kill(2) has no memory preconditions; `pid` is our own, not yet reaped child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0, "SIGTERM");
        let t0 = Instant::now();
        loop {
            if let Some(st) = c.try_wait().unwrap() {
                assert!(st.success(), "controller exited with {st} on SIGTERM:\n{}", self.log());
                return;
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = c.kill();
                let _ = c.wait();
                panic!("controller still running 10 s after SIGTERM:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn admin_files(&self) -> ClientFiles {
        ClientFiles::in_dir(&self.data.join("admin"), "admin")
    }

    /// A client identity signed by this controller's CA (as enrollment would make it).
    fn identity(&self, role: Role, name: &str) -> ClientFiles {
        let ca = Ca::load(&self.data, None).expect("load the CA");
        let issued = ca.issue_client(role, name, Duration::from_hours(1)).unwrap();
        self.save_identity(name, &issued)
    }

    /// Save `issued` with the controller's CA as the trust anchor for the server.
    fn save_identity(&self, stem: &str, issued: &ztseg_controller::pki::Issued) -> ClientFiles {
        let ca_pem = fs::read_to_string(self.data.join("ca.pem")).unwrap();
        let files = ClientFiles::in_dir(&self.root.join("ids").join(stem), stem);
        files.save(issued, &ca_pem).unwrap();
        files
    }

    /// A connection without a client certificate (trusting the controller's CA).
    fn anonymous(&self) -> ClientFiles {
        ClientFiles {
            ca: self.data.join("ca.pem"),
            cert: self.root.join("none.pem"),
            key: self.root.join("none-key.pem"),
        }
    }

    fn spawn_cli_as(&self, identity_dir: &Path, identity: &str, args: &[&str]) -> Running {
        let stdout = self.root.join("cli").join(unique("out-"));
        let stderr = self.root.join("cli").join(unique("err-"));
        let child = ztseg_command()
            .args(args)
            .env("ZTSEG_CONTROLLER", &self.addr)
            .env("ZTSEG_IDENTITY_DIR", identity_dir)
            .env("ZTSEG_IDENTITY", identity)
            .stdout(fs::File::create(&stdout).unwrap())
            .stderr(fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn the CLI");
        Running { child, stdout, stderr, started: Instant::now() }
    }

    fn spawn_cli(&self, args: &[&str]) -> Running {
        self.spawn_cli_as(&self.data.join("admin"), "admin", args)
    }

    fn cli_as(&self, identity_dir: &Path, identity: &str, args: &[&str]) -> Out {
        self.spawn_cli_as(identity_dir, identity, args).wait(Duration::from_mins(1)).0
    }

    /// The CLI as the admin identity made by `controller init`.
    fn cli(&self, args: &[&str]) -> Out {
        self.spawn_cli(args).wait(Duration::from_mins(1)).0
    }

    /// `ztseg enroll` with `token` (trusting this controller's CA), writing the identity `stem`
    /// to `dir`.
    fn enroll(&self, token: &str, dir: &Path, stem: &str) -> Out {
        let ca = self.data.join("ca.pem");
        self.cli(&[
            "enroll",
            "--ca",
            path_str(&ca),
            "--token",
            token,
            "--out",
            path_str(dir),
            "--identity",
            stem,
        ])
    }

    /// Every audit record, parsed (`ztseg audit list` as admin).
    fn audit(&self) -> Vec<Value> {
        let out = self.cli(&["-o", "json", "audit", "list", "--limit", "10000"]);
        assert!(out.ok(), "audit list: {out}");
        serde_json::from_str(&out.stdout).expect("audit records as a JSON array")
    }

    /// Poll the audit log (10 s at most) for a record matching `pred`.
    fn wait_audit(&self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        let t0 = Instant::now();
        loop {
            let recs = self.audit();
            if let Some(r) = recs.iter().find(|r| pred(r)) {
                return r.clone();
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "no audit record {what} after 10 s; the log:\n{}",
                recs.iter().map(Value::to_string).collect::<Vec<_>>().join("\n")
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Wait (10 s at most) for a `tls.rejected` record after the first `before` ones whose
    /// reason names one of `want`. (A client may try the handshake more than once.)
    fn wait_tls_rejected(&self, before: usize, label: &str, want: &[&str]) {
        let t0 = Instant::now();
        loop {
            let recs = self.audit();
            let tls: Vec<&Value> =
                recs.iter().filter(|r| r["action"] == "tls.rejected").skip(before).collect();
            if let Some(r) = tls.iter().find(|r| {
                let reason = r["detail"]["reason"].as_str().unwrap_or_default();
                reason.starts_with("invalid peer certificate") && want.iter().any(|w| reason.contains(w))
            }) {
                assert_eq!(r["actor"], "anonymous", "{r}");
                assert_eq!(r["outcome"], "denied", "{r}");
                return;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "{label}: no tls.rejected record saying {want:?} after 10 s; new ones: {tls:#?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn history(&self) -> Vec<HistoryRow> {
        let out = self.cli(&["-o", "json", "policy", "history", "--limit", "1000"]);
        assert!(out.ok(), "policy history: {out}");
        let v: Value =
            serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("history JSON ({e}): {out}"));
        v.as_array()
            .expect("history is a JSON array")
            .iter()
            .map(|r| HistoryRow {
                version: r["version"].as_u64().unwrap(),
                actor: r["actor"].as_str().unwrap().to_owned(),
                documents: r["documents"].as_u64().unwrap().try_into().unwrap(),
            })
            .collect()
    }

    /// `ztseg policy get [--version V] --out DIR`: the version it names and its documents.
    fn get(&self, version: u64) -> (u64, Tree) {
        let dir = self.root.join(unique("get-"));
        let v = version.to_string();
        let out = self.cli(&["policy", "get", "--version", &v, "--out", path_str(&dir)]);
        assert!(out.ok(), "policy get --version {version}: {out}");
        let got: u64 = out
            .stdout
            .strip_prefix("version ")
            .and_then(|s| s.split(':').next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("policy get: unexpected output {out}"));
        let tree = read_tree(&dir);
        let _ = fs::remove_dir_all(&dir);
        (got, tree)
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        self.kill9();
        if std::thread::panicking() {
            eprintln!("controller test directory kept: {}", self.root.display());
        } else {
            let _ = fs::remove_dir_all(&self.root);
        }
    }
}

#[derive(Debug)]
struct HistoryRow {
    version: u64,
    actor: String,
    documents: usize,
}

/// Every file below `dir` (none if it does not exist).
fn read_tree(dir: &Path) -> Tree {
    fn walk(base: &Path, dir: &Path, out: &mut Tree) {
        let Ok(entries) = fs::read_dir(dir) else { return };
        for e in entries {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(base, &p, out);
            } else {
                out.insert(
                    p.strip_prefix(base).unwrap().to_string_lossy().into_owned(),
                    fs::read(&p).unwrap(),
                );
            }
        }
    }
    let mut out = Tree::new();
    walk(dir, dir, &mut out);
    out
}

fn copy_dir(from: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for e in fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        let target = to.join(p.file_name().unwrap());
        if p.is_dir() {
            copy_dir(&p, &target);
        } else {
            fs::copy(&p, &target).unwrap();
        }
    }
}

/// How a gRPC call was refused: `code` is `None` when no connection could be made.
#[derive(Debug)]
struct Refused {
    code: Option<Code>,
    message: String,
}

/// Connect with `files` and make one call, on a runtime of its own (30 s at most).
fn call<T, F, Fut>(addr: &str, files: &ClientFiles, f: F) -> Result<T, Refused>
where
    F: FnOnce(Channel) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), async {
            let ch = ztseg_controller::server::connect(addr, files)
                .await
                .map_err(|e| Refused { code: None, message: format!("{e:#}") })?;
            f(ch)
                .await
                .map(tonic::Response::into_inner)
                .map_err(|s| Refused { code: Some(s.code()), message: s.message().to_owned() })
        })
        .await
        .expect("the RPC did not finish within 30 s")
    })
}

async fn policy_get(ch: Channel) -> Result<tonic::Response<pb::GetResponse>, tonic::Status> {
    PolicyClient::new(ch).get(pb::GetRequest { version: 0 }).await
}

async fn audit_list(ch: Channel) -> Result<tonic::Response<pb::AuditListResponse>, tonic::Status> {
    AuditClient::new(ch).list(pb::AuditListRequest { from_seq: 1, limit: 100 }).await
}

async fn policy_apply(ch: Channel) -> Result<tonic::Response<pb::ApplyResponse>, tonic::Status> {
    let documents = read_tree(Path::new(DEMO_POLICIES))
        .into_iter()
        .map(|(name, bytes)| pb::Document { name, content: String::from_utf8(bytes).unwrap() })
        .collect();
    let req = pb::ApplyRequest { documents, expected_version: 0, message: "demo".into(), dry_run: false };
    PolicyClient::new(ch).apply(req).await
}

fn is(r: &Value, action: &str, actor: &str, rpc: &str) -> bool {
    r["action"] == action && r["actor"] == actor && r["detail"]["rpc"] == format!("{RPC_PREFIX}{rpc}")
}

fn count(recs: &[Value], action: &str) -> usize {
    recs.iter().filter(|r| r["action"] == action).count()
}

// ---------------------------------------------------------------------------------------
// 1. mTLS refusals
// ---------------------------------------------------------------------------------------

/// (a) No client certificate: the handshake is allowed (enrollment needs it), every other
/// RPC answers UNAUTHENTICATED and is recorded as `api.denied` by `anonymous`.
#[test]
fn mtls_without_client_certificate_is_unauthenticated_and_audited() {
    let c = Controller::started("nocert");
    // Positive control: the admin identity reads the policy.
    let r = call(&c.addr, &c.admin_files(), policy_get).expect("admin Policy/Get");
    assert_eq!(r.version, 0);

    for (rpc, res) in [
        ("Policy/Get", call(&c.addr, &c.anonymous(), policy_get).map(drop)),
        ("Policy/Apply", call(&c.addr, &c.anonymous(), policy_apply).map(drop)),
        ("Audit/List", call(&c.addr, &c.anonymous(), audit_list).map(drop)),
    ] {
        let e = res.expect_err(rpc);
        assert_eq!(e.code, Some(Code::Unauthenticated), "{rpc}: {e:?}");
        let rec =
            c.wait_audit(&format!("api.denied anonymous {rpc}"), |r| is(r, "api.denied", "anonymous", rpc));
        assert_eq!(rec["outcome"], "denied", "{rec}");
        assert_eq!(rec["detail"]["reason"], "no client certificate", "{rec}");
        assert!(rec["detail"]["peer"].as_str().is_some_and(|p| p.starts_with("127.0.0.1:")), "{rec}");
    }
    let recs = c.audit();
    assert_eq!(count(&recs, "api.denied"), 3, "only the three anonymous calls were denied: {recs:#?}");
    assert_eq!(count(&recs, "tls.rejected"), 0, "no certificate is not a failed certificate: {recs:#?}");
    assert!(c.history().is_empty(), "the anonymous apply changed nothing");
}

/// (b) A certificate from a CA the controller does not trust — a second CA with the very
/// same trust domain, and one of another trust domain, both claiming `admin/admin` — is
/// refused in the TLS handshake (no RPC runs) and recorded as `tls.rejected`.
#[test]
fn mtls_certificate_from_unknown_ca_is_rejected_in_handshake() {
    let c = Controller::started("foreignca");
    call(&c.addr, &c.admin_files(), policy_get).expect("positive control: admin Policy/Get");
    for (label, trust_domain) in [("same-domain", "ztseg.local"), ("other-domain", "evil.example")] {
        let foreign = Ca::generate(trust_domain).unwrap();
        let issued = foreign.issue_client(Role::Admin, "admin", Duration::from_hours(1)).unwrap();
        let files = c.save_identity(label, &issued);
        let before = count(&c.audit(), "tls.rejected");
        let e = call(&c.addr, &files, policy_get).expect_err(label);
        assert!(
            !matches!(e.code, Some(Code::Ok | Code::PermissionDenied | Code::Unauthenticated)),
            "{label}: the call must fail at the TLS layer, not be answered by the API: {e:?}"
        );
        eprintln!("{label}: refused with {e:?}");
        // webpki: no trusted issuer of that name (UnknownIssuer), or — the foreign CA has the
        // same subject as ours — an issuer whose signature does not verify (BadSignature).
        c.wait_tls_rejected(before, label, &["UnknownIssuer", "BadSignature"]);
    }
    let recs = c.audit();
    assert_eq!(count(&recs, "api.denied"), 0, "no refused certificate reached the API: {recs:#?}");
    // The listener is unharmed by the refusals.
    call(&c.addr, &c.admin_files(), policy_get).expect("admin Policy/Get after the refusals");
}

/// A small allowance and a short window for the audit-bound tests.
const LIMIT_ARGS: [&str; 4] = ["--audit-rejected-per-peer", "3", "--audit-rejected-window", "2"];

/// Failed handshakes are audited in full up to a per-address allowance per window; the rest
/// are counted into one `tls.rejected.suppressed` record when the window ends, so whoever can
/// reach the port cannot grow the append-only audit log without bound.
#[test]
fn rejected_handshakes_are_audited_up_to_a_bound_per_peer() {
    let c = Controller::started_with("rejlimit", &LIMIT_ARGS);
    assert_eq!(count(&c.audit(), "tls.rejected"), 0);
    for _ in 0..10 {
        // Not TLS at all: one failed handshake per connection.
        let mut s = TcpStream::connect(&c.addr).unwrap();
        s.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        let _ = s.read(&mut [0u8; 64]);
    }
    let summary = c.wait_audit("tls.rejected.suppressed", |r| r["action"] == "tls.rejected.suppressed");
    let recs = c.audit();
    assert_eq!(count(&recs, "tls.rejected"), 3, "{recs:#?}");
    assert_eq!(summary["detail"]["peer"], "127.0.0.1", "{summary}");
    assert_eq!(summary["detail"]["count"], 7, "{summary}");
    assert_eq!(summary["detail"]["window_s"], 2, "{summary}");
    assert_eq!(summary["actor"], "anonymous", "{summary}");
    assert_eq!(summary["outcome"], "denied", "{summary}");
    // Summarised once; the listener still serves.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(count(&c.audit(), "tls.rejected.suppressed"), 1);
    call(&c.addr, &c.admin_files(), policy_get).expect("admin Policy/Get after the refusals");
}

/// Refused anonymous calls — no client certificate, an unknown join token — are audited in
/// full up to the per-address allowance of a window; the rest are counted into one
/// `anonymous.suppressed` record when the window ends.
#[test]
fn refused_anonymous_calls_are_audited_up_to_a_bound_per_peer() {
    let c = Controller::started_with("anonlimit", &LIMIT_ARGS);
    for _ in 0..4 {
        let e = call(&c.addr, &c.anonymous(), policy_get).expect_err("anonymous Policy/Get");
        assert_eq!(e.code, Some(Code::Unauthenticated), "{e:?}");
    }
    let dir = c.root.join("nobody");
    for _ in 0..2 {
        let out = c.enroll("ztseg-join-guess", &dir, "x");
        assert!(!out.ok(), "a guessed token enrolled: {out}");
    }
    let summary = c.wait_audit("anonymous.suppressed", |r| r["action"] == "anonymous.suppressed");
    let recs = c.audit();
    let full = count(&recs, "api.denied") + count(&recs, "enroll");
    assert_eq!(full, 3, "three refusals recorded in full: {recs:#?}");
    assert_eq!(summary["detail"]["peer"], "127.0.0.1", "{summary}");
    assert_eq!(summary["detail"]["count"], 3, "{summary}");
    assert_eq!(summary["outcome"], "denied", "{summary}");
    // A new window records again.
    call(&c.addr, &c.anonymous(), policy_get).expect_err("anonymous Policy/Get");
    c.wait_audit("api.denied in a new window", |r| {
        r["action"] == "api.denied" && r["seq"].as_u64().unwrap_or(0) > summary["seq"].as_u64().unwrap_or(0)
    });
}

/// Refused calls of callers with a valid certificate — a role that may not call the RPC, a
/// revoked identity that keeps trying — are audited in full up to the allowance of a window
/// per identity (the first one at once); the rest are counted into one `api.denied.suppressed`
/// record from that identity when the window ends. Each identity has its own allowance.
#[test]
fn refused_calls_of_identities_are_audited_up_to_a_bound_per_identity() {
    // A window long enough for every call below to fall into the first one.
    let c = Controller::started_with(
        "idlimit",
        &["--audit-rejected-per-peer", "3", "--audit-rejected-window", "8"],
    );
    let operator = c.identity(Role::Operator, "op-flood");
    let gone = c.identity(Role::Enforcer, "gone");
    let out = c.cli(&["controller", "revoke", "--role", "enforcer", "--name", "gone"]);
    assert!(out.ok(), "revoke: {out}");
    let report = || {
        call(&c.addr, &gone, |ch| async move {
            DistributionClient::new(ch).report(pb::ReportRequest::default()).await
        })
    };
    // The first refusal of an identity is recorded at once.
    let e = call(&c.addr, &operator, audit_list).expect_err("operator Audit/List");
    assert_eq!(e.code, Some(Code::PermissionDenied), "{e:?}");
    c.wait_audit("the first refusal of operator/op-flood", |r| {
        is(r, "api.denied", "operator/op-flood", "Audit/List")
    });
    for _ in 0..5 {
        let e = call(&c.addr, &operator, audit_list).expect_err("operator Audit/List");
        assert_eq!(e.code, Some(Code::PermissionDenied), "{e:?}");
    }
    for _ in 0..7 {
        let e = report().expect_err("a revoked enforcer's Distribution/Report");
        assert_eq!(e.code, Some(Code::Unauthenticated), "{e:?}");
    }
    let summary = |who: &str| {
        c.wait_audit(&format!("api.denied.suppressed of {who}"), |r| {
            r["action"] == "api.denied.suppressed" && r["actor"] == who
        })
    };
    let op = summary("operator/op-flood");
    let en = summary("enforcer/gone");
    let recs = c.audit();
    let full = |who: &str| recs.iter().filter(|r| r["action"] == "api.denied" && r["actor"] == who).count();
    assert_eq!(full("operator/op-flood"), 3, "{recs:#?}");
    assert_eq!(full("enforcer/gone"), 3, "{recs:#?}");
    assert_eq!(op["detail"]["count"], 3, "{op}");
    assert_eq!(en["detail"]["count"], 4, "{en}");
    assert_eq!(en["detail"]["identity"], "enforcer/gone", "{en}");
    assert_eq!(en["detail"]["window_s"], 8, "{en}");
    assert_eq!(en["outcome"], "denied", "{en}");
    // Summarised once; a new window records in full again.
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count(&c.audit(), "api.denied.suppressed"), 2);
    report().expect_err("a revoked enforcer's Distribution/Report");
    c.wait_audit("api.denied in a new window", |r| {
        r["action"] == "api.denied"
            && r["actor"] == "enforcer/gone"
            && r["seq"].as_u64().unwrap_or(0) > en["seq"].as_u64().unwrap_or(0)
    });
}

/// An enforcer's denied flows are audited in full up to its allowance per window; the rest
/// are counted — records and the packets they stand for — into one `flow.denied.suppressed`
/// record from that enforcer when the window ends. Another enforcer has its own allowance.
#[test]
fn denied_flows_are_audited_up_to_a_bound_per_enforcer() {
    let c = Controller::started_with(
        "flowlimit",
        &["--audit-denied-flows-per-enforcer", "4", "--audit-denied-flows-window", "2"],
    );
    let flow = |i: u32| pb::DeniedFlow {
        workload: "prod/b".into(),
        peer: "world".into(),
        direction: "ingress".into(),
        src: format!("192.0.2.{i}"),
        dst: "10.0.0.2".into(),
        dport: 9000 + i,
        protocol: "TCP".into(),
        reason: "drop_default".into(),
        count: i,
        ..Default::default()
    };
    let report = |files: &ClientFiles, flows: Vec<pb::DeniedFlow>| {
        call(&c.addr, files, move |ch| async move {
            DistributionClient::new(ch)
                .report(pb::ReportRequest { denied: flows, ..Default::default() })
                .await
        })
        .expect("enforcer Distribution/Report")
    };
    let n1 = c.identity(Role::Enforcer, "n1");
    let n2 = c.identity(Role::Enforcer, "n2");
    // Ten flows in two reports (1 + 2 + ... + 10 packets), then one from another enforcer.
    report(&n1, (1..=6).map(flow).collect());
    report(&n1, (7..=10).map(flow).collect());
    report(&n2, vec![flow(1)]);
    let summary = c.wait_audit("flow.denied.suppressed", |r| r["action"] == "flow.denied.suppressed");
    let recs = c.audit();
    let full =
        |actor: &str| recs.iter().filter(|r| r["action"] == "flow.denied" && r["actor"] == actor).count();
    assert_eq!(full("enforcer/n1"), 4, "{recs:#?}");
    assert_eq!(full("enforcer/n2"), 1, "{recs:#?}");
    assert_eq!(summary["actor"], "enforcer/n1", "{summary}");
    assert_eq!(summary["outcome"], "denied", "{summary}");
    // Flows 5..=10 were counted: 6 records, 45 packets.
    assert_eq!(summary["detail"]["records"], 6, "{summary}");
    assert_eq!(summary["detail"]["packets"], 45, "{summary}");
    assert_eq!(summary["detail"]["window_s"], 2, "{summary}");
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(count(&c.audit(), "flow.denied.suppressed"), 1, "summarised once");
}

/// A `flow.denied` record carries the controller's time, so an enforcer's clock (or its lie)
/// cannot place it elsewhere in the log's timeline; when the enforcer says it first saw the
/// flow is kept apart as `detail.first_seen_ms`, and the record names the reporting enforcer.
#[test]
fn denied_flow_records_carry_the_controllers_time() {
    let c = Controller::started("flowtime");
    let n1 = c.identity(Role::Enforcer, "n1");
    let flow = |dport: u32, time_unix_ms: i64| pb::DeniedFlow {
        time_unix_ms,
        workload: "prod/b".into(),
        peer: "world".into(),
        direction: "ingress".into(),
        src: "192.0.2.7".into(),
        dst: "10.0.0.2".into(),
        dport,
        protocol: "TCP".into(),
        reason: "drop_default".into(),
        count: 1,
        ..Default::default()
    };
    let before = ztseg_controller::now_ms();
    call(&c.addr, &n1, |ch| async move {
        let denied = vec![flow(1, 1_000), flow(2, 0)];
        DistributionClient::new(ch).report(pb::ReportRequest { denied, ..Default::default() }).await
    })
    .expect("enforcer Distribution/Report");
    let after = ztseg_controller::now_ms();
    let recs = c.audit();
    let denied: Vec<&Value> = recs.iter().filter(|r| r["action"] == "flow.denied").collect();
    assert_eq!(denied.len(), 2, "{recs:#?}");
    for r in &denied {
        let t = r["time_ms"].as_i64().unwrap();
        assert!(
            (before..=after).contains(&t),
            "record time {t} not the controller's ({before}..{after}): {r}"
        );
        assert_eq!(r["actor"], "enforcer/n1", "{r}");
    }
    assert_eq!(denied[0]["detail"]["dport"], 1);
    assert_eq!(denied[0]["detail"]["first_seen_ms"], 1_000, "{}", denied[0]);
    assert!(denied[1]["detail"].get("first_seen_ms").is_none(), "{}", denied[1]);
}

/// (c) A certificate from the right CA outside its validity period (expired, and not yet
/// valid) is refused in the handshake and recorded as `tls.rejected`.
#[test]
fn mtls_expired_certificate_is_rejected_in_handshake() {
    let c = Controller::started("expired");
    call(&c.addr, &c.admin_files(), policy_get).expect("positive control: admin Policy/Get");
    let ca = Ca::load(&c.data, None).unwrap();
    let now = time::OffsetDateTime::now_utc();
    let day = Duration::from_hours(24);
    let cases = [
        ("expired", now - time::Duration::days(2), "certificate expired"),
        ("not-yet-valid", now + time::Duration::days(1), "certificate not valid yet"),
    ];
    for (label, not_before, want) in cases {
        let issued = ca.issue_client_at(Role::Admin, "admin", not_before, day).unwrap();
        let files = c.save_identity(label, &issued);
        let before = count(&c.audit(), "tls.rejected");
        let e = call(&c.addr, &files, policy_get).expect_err(label);
        assert!(
            !matches!(e.code, Some(Code::Ok | Code::PermissionDenied | Code::Unauthenticated)),
            "{label}: the call must fail at the TLS layer: {e:?}"
        );
        eprintln!("{label}: refused with {e:?}");
        c.wait_tls_rejected(before, label, &[want]);
    }
    assert_eq!(count(&c.audit(), "api.denied"), 0);
    call(&c.addr, &c.admin_files(), policy_get).expect("admin Policy/Get after the refusals");
}

/// (d) Valid certificates with the wrong role are answered `PERMISSION_DENIED` and recorded as
/// `api.denied` with the caller's role and name; the same identities may call what their
/// role allows, and the documents the enforcer and auditor could not apply are then applied
/// by the operator (the refusal was about the role, not the request).
#[test]
fn mtls_wrong_role_is_permission_denied_and_audited() {
    let c = Controller::started("role");
    let enforcer = c.identity(Role::Enforcer, "host-x");
    let auditor = c.identity(Role::Auditor, "aud-1");
    let operator = c.identity(Role::Operator, "op-1");
    let server = c.identity(Role::Controller, "controller");

    let denied = [
        ("enforcer/host-x", "Policy/Apply", call(&c.addr, &enforcer, policy_apply).map(drop)),
        ("auditor/aud-1", "Policy/Apply", call(&c.addr, &auditor, policy_apply).map(drop)),
        ("operator/op-1", "Audit/List", call(&c.addr, &operator, audit_list).map(drop)),
        ("enforcer/host-x", "Audit/List", call(&c.addr, &enforcer, audit_list).map(drop)),
        ("controller/controller", "Policy/Get", call(&c.addr, &server, policy_get).map(drop)),
    ];
    for (actor, rpc, res) in denied {
        let e = res.expect_err(&format!("{actor} {rpc}"));
        assert_eq!(e.code, Some(Code::PermissionDenied), "{actor} {rpc}: {e:?}");
        let role = actor.split('/').next().unwrap();
        assert!(e.message.contains(&format!("role {role} may not call {rpc}")), "{e:?}");
        let rec = c.wait_audit(&format!("api.denied {actor} {rpc}"), |r| is(r, "api.denied", actor, rpc));
        assert_eq!(rec["outcome"], "denied", "{rec}");
    }
    assert!(c.history().is_empty(), "no denied apply changed the policy");

    // Positive controls: each identity works for what its role may do.
    call(&c.addr, &operator, policy_get).expect("operator Policy/Get");
    call(&c.addr, &auditor, policy_get).expect("auditor Policy/Get");
    let recs = call(&c.addr, &auditor, audit_list).expect("auditor Audit/List").records;
    assert_eq!(recs.len(), 5, "the five denials: {recs:#?}");
    call(&c.addr, &enforcer, |ch| async move {
        DistributionClient::new(ch)
            .report(pb::ReportRequest { enforced_version: 0, ..Default::default() })
            .await
    })
    .expect("enforcer Distribution/Report");
    let applied =
        call(&c.addr, &operator, policy_apply).expect("operator Policy/Apply of the same documents");
    assert_eq!(applied.version, 1);
    let h = c.history();
    assert_eq!(h.len(), 1, "{h:?}");
    assert_eq!(h[0].actor, "operator/op-1");
    assert_eq!(count(&c.audit(), "api.denied"), 5, "allowed calls are not recorded as denied");
}

/// Who may call each controller RPC, as documented (docs/api.md, docs/controller.md): the
/// roles, or `None` for `Enrollment/Enroll`, which anyone may call (the token is the
/// credential). Kept here, apart from `auth.rs`, so that the test checks the table rather
/// than repeating it.
const WHO_MAY_CALL: &[(&str, Option<&[&str]>)] = &[
    ("Enrollment/Enroll", None),
    ("Enrollment/CreateJoinToken", Some(&["admin"])),
    ("Enrollment/Renew", Some(&["admin", "operator", "auditor", "enforcer"])),
    ("Enrollment/Revoke", Some(&["admin"])),
    ("Enrollment/ListJoinTokens", Some(&["admin"])),
    ("Enrollment/RevokeJoinToken", Some(&["admin"])),
    ("Policy/Apply", Some(&["admin", "operator"])),
    ("Policy/Diff", Some(&["admin", "operator", "auditor"])),
    ("Policy/Get", Some(&["admin", "operator", "auditor"])),
    ("Policy/History", Some(&["admin", "operator", "auditor"])),
    ("Policy/Rollback", Some(&["admin", "operator"])),
    ("Policy/Prune", Some(&["admin"])),
    ("Distribution/Subscribe", Some(&["enforcer"])),
    ("Distribution/Report", Some(&["enforcer"])),
    ("Distribution/ListEnforcers", Some(&["admin", "operator", "auditor"])),
    ("Audit/List", Some(&["admin", "auditor"])),
    ("Audit/Verify", Some(&["admin", "auditor"])),
    ("Audit/Prune", Some(&["admin"])),
];

/// `Service/Method` of every RPC in the controller's .proto files.
fn proto_rpcs() -> Vec<String> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../api/proto");
    let mut out = Vec::new();
    for e in fs::read_dir(dir).unwrap() {
        let path = e.unwrap().path();
        let text = fs::read_to_string(&path).unwrap();
        if !text.contains("package ztseg.controller.v1;") {
            continue;
        }
        let mut service = None;
        for line in text.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.split_whitespace().next().map(str::to_owned);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap().trim();
                out.push(format!("{}/{method}", service.as_deref().expect("rpc outside a service")));
            }
        }
    }
    out.sort();
    out
}

/// Call `rpc` with an empty request (valid protobuf for any message) as whoever `ch` is, and
/// return how the controller answered: the status of a refused call, `Ok` otherwise (a
/// stream is dropped once it started).
async fn call_raw(ch: Channel, rpc: &str) -> Result<(), tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch);
    grpc.ready().await.map_err(|e| tonic::Status::unavailable(e.to_string()))?;
    let path = tonic::codegen::http::uri::PathAndQuery::try_from(format!("{RPC_PREFIX}{rpc}")).unwrap();
    let codec = tonic_prost::ProstCodec::<(), ()>::default();
    grpc.server_streaming(tonic::Request::new(()), path, codec).await.map(drop)
}

/// Every RPC of the controller's .proto files, called by each role (admin, operator, auditor,
/// enforcer, the controller's own role) and without a certificate, against a live controller:
/// each caller is let through exactly where the documented table says so and refused
/// everywhere else — a handler that forgets its role check, or a new RPC missing from the
/// table, fails here.
#[test]
fn every_rpc_admits_exactly_the_documented_roles() {
    let c = Controller::started("matrix");
    let mut table: Vec<String> = WHO_MAY_CALL.iter().map(|(r, _)| (*r).to_owned()).collect();
    table.sort();
    assert_eq!(proto_rpcs(), table, "the .proto files and this test's table name different RPCs");
    let callers: Vec<(&str, ClientFiles)> = vec![
        ("admin", c.admin_files()),
        ("operator", c.identity(Role::Operator, "m-op")),
        ("auditor", c.identity(Role::Auditor, "m-aud")),
        ("enforcer", c.identity(Role::Enforcer, "m-enf")),
        ("controller", c.identity(Role::Controller, "m-ctl")),
        ("anonymous", c.anonymous()),
    ];
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let mut wrong = Vec::new();
    for (who, files) in &callers {
        let ch = rt.block_on(ztseg_controller::server::connect(&c.addr, files)).expect("connect");
        for (rpc, roles) in WHO_MAY_CALL {
            let r = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(20), call_raw(ch.clone(), rpc)).await
            });
            let r = r.unwrap_or_else(|_| panic!("{who} {rpc}: no answer in 20 s"));
            let may = roles.is_none_or(|roles| roles.contains(who));
            let refused = match &r {
                Err(s) if s.code() == Code::PermissionDenied => {
                    assert!(
                        s.message().contains(&format!("role {who} may not call {rpc}")),
                        "{who} {rpc}: {s:?}"
                    );
                    true
                }
                Err(s) if s.code() == Code::Unauthenticated => {
                    assert_eq!(*who, "anonymous", "{who} {rpc}: {s:?}");
                    assert!(s.message().contains("a client certificate is required"), "{who} {rpc}: {s:?}");
                    true
                }
                _ => false,
            };
            let answer =
                r.as_ref().map_or_else(|s| format!("{:?}: {}", s.code(), s.message()), |()| "Ok".into());
            eprintln!("{who:>10} {rpc:<28} {answer}");
            if refused == may {
                wrong
                    .push(format!("{who} {rpc}: {} ({answer})", if may { "refused" } else { "let through" }));
            }
        }
    }
    assert!(wrong.is_empty(), "callers answered against the documented table:\n{}", wrong.join("\n"));
    // Each refusal of a caller with a certificate is an api.denied record naming it and the RPC.
    let recs = c.audit();
    for (who, name) in [("operator", "m-op"), ("enforcer", "m-enf")] {
        let actor = format!("{who}/{name}");
        let first =
            WHO_MAY_CALL.iter().find(|(_, roles)| roles.is_some_and(|r| !r.contains(&who))).unwrap().0;
        assert!(recs.iter().any(|r| is(r, "api.denied", &actor, first)), "no api.denied of {actor} {first}");
    }
}

// ---------------------------------------------------------------------------------------
// 2. Embedded store crash safety
// ---------------------------------------------------------------------------------------

/// A large, valid document set, different in every generation (names and contents).
fn big_set(dir: &Path, generation: usize) -> Tree {
    let count = 2000 + generation;
    let mut tree = Tree::new();
    for j in 0..count {
        let text = format!(
            "# generation {generation}, document {j}\n\
             apiVersion: networking.k8s.io/v1\n\
             kind: NetworkPolicy\n\
             metadata: {{name: np-{j}, namespace: ns-{ns}}}\n\
             spec:\n  \
               podSelector: {{matchLabels: {{app: svc-{j}}}}}\n  \
               policyTypes: [Ingress]\n  \
               ingress:\n    \
                 - from: [{{podSelector: {{matchLabels: {{app: client-g{generation}}}}}}}]\n      \
                   ports: [{{port: {port}, protocol: TCP}}]\n",
            ns = j % 40,
            port = 1024 + (j * 7 + generation) % 60_000,
        );
        tree.insert(format!("np-{j:05}.yaml"), text.into_bytes());
    }
    fs::create_dir_all(dir).unwrap();
    for (name, bytes) in &tree {
        fs::write(dir.join(name), bytes).unwrap();
    }
    tree
}

/// "applied: policy version N (audit record S)" → (N, S).
fn acknowledged(out: &Out) -> Option<(u64, u64)> {
    if !out.ok() {
        return None;
    }
    let line = out.stdout.lines().find_map(|l| l.strip_prefix("applied: policy version "))?;
    let (v, rest) = line.split_once(" (audit record ")?;
    Some((v.parse().ok()?, rest.trim_end_matches(')').parse().ok()?))
}

/// Everything a restarted controller must show: versions 1..=head in the history, each
/// with its document count; the current documents exactly those of `head`; one audit
/// record per committed version; an intact audit chain.
fn check_state(c: &Controller, expected: &BTreeMap<u64, Tree>, head: u64, context: &str) {
    let h = c.history();
    let versions: Vec<u64> = h.iter().map(|r| r.version).collect();
    let want: Vec<u64> = (1..=head).rev().collect();
    assert_eq!(versions, want, "{context}: history");
    for r in &h {
        assert_eq!(
            r.documents,
            expected[&r.version].len(),
            "{context}: document count of version {}",
            r.version
        );
    }
    let (v, tree) = c.get(0);
    assert_eq!(v, head, "{context}: policy get names the head");
    assert!(
        tree == expected[&head],
        "{context}: the current documents are not exactly those of version {head}"
    );
    let out = c.cli(&["audit", "verify"]);
    assert!(out.ok(), "{context}: audit verify through the controller: {out}");
    let recs = c.audit();
    let mut applied: Vec<u64> = recs
        .iter()
        .filter(|r| r["action"] == "policy.apply")
        .map(|r| r["detail"]["version"].as_u64().unwrap())
        .collect();
    applied.sort_unstable();
    assert_eq!(applied, (1..=head).collect::<Vec<_>>(), "{context}: one policy.apply record per version");
}

/// Applies of ~2,000 documents are cut off by `kill -9` of the controller at spread-out
/// moments. After each restart the current version is exactly the old or the new document
/// set (byte for byte), every acknowledged apply is there, and the audit chain verifies
/// (offline while the controller is down, and through the restarted controller).
#[test]
fn embedded_store_survives_kill9_during_apply() {
    const ROUNDS: usize = 10;
    let mut c = Controller::started("crash");
    let mut expected: BTreeMap<u64, Tree> = BTreeMap::new();

    let out = c.cli(&["policy", "apply", DEMO_POLICIES, "-m", "v1"]);
    assert_eq!(acknowledged(&out).map(|a| a.0), Some(1), "{out}");
    expected.insert(1, read_tree(Path::new(DEMO_POLICIES)));

    // Calibration: one uninterrupted large apply, to know how long one takes.
    let set = big_set(&c.root.join("gen-0"), 0);
    let (out, full) = c
        .spawn_cli(&["policy", "apply", path_str(&c.root.join("gen-0")), "-m", "g0"])
        .wait(Duration::from_mins(1));
    assert_eq!(acknowledged(&out).map(|a| a.0), Some(2), "{out}");
    expected.insert(2, set);
    let mut head = 2;
    check_state(&c, &expected, head, "after the calibration apply");

    let seed = u64::from(std::process::id()) ^ u64::from(time::OffsetDateTime::now_utc().nanosecond());
    let mut rng = StdRng::seed_from_u64(seed);
    // Kill moments are drawn at random from a window that starts as 0 .. 1.2 × one full
    // apply (client start to acknowledgement) and closes in on the commit: a kill after which
    // the apply was not committed raises its start, one after which it was lowers its end.
    // A window narrower than 20 ms is widened again (timings drift with the machine's load).
    let span_ms = u64::try_from(full.as_millis()).unwrap().max(300) * 6 / 5;
    let (mut lo, mut hi) = (0, span_ms);
    eprintln!("crash test: seed {seed}, one apply of ~2000 documents takes {full:?}");
    let (mut acked, mut committed_unacked, mut lost_unacked) = (0, 0, 0);
    for round in 1..=ROUNDS {
        let dir = c.root.join(format!("gen-{round}"));
        let set = big_set(&dir, round);
        let delay_ms = rng.random_range(lo..=hi);
        let delay = Duration::from_millis(delay_ms);
        let client = c.spawn_cli(&["policy", "apply", path_str(&dir), "-m", &format!("g{round}")]);
        std::thread::sleep(delay.saturating_sub(client.started.elapsed()));
        c.kill9();
        let (out, _) = client.wait(Duration::from_secs(30));
        let ack = acknowledged(&out);

        // Offline verification of the store file while no controller holds it.
        let v = c.cli(&["audit", "verify", "--data-dir", path_str(&c.data)]);
        assert!(v.ok(), "round {round}: offline audit verify after kill -9: {v}");
        c.start();

        let now = c.history().first().map_or(0, |r| r.version);
        let context = format!(
            "round {round} (window {lo}..{hi} ms, kill after {delay_ms} ms, client {})",
            if ack.is_some() {
                "acknowledged".to_owned()
            } else {
                format!("failed: {}", out.stderr.lines().next().unwrap_or_default())
            }
        );
        if let Some((v, seq)) = ack {
            assert_eq!(v, head + 1, "{context}: {out}");
            assert_eq!(now, head + 1, "{context}: an acknowledged apply is lost");
            let rec = c.audit().into_iter().find(|r| r["seq"] == seq).expect("the acknowledged audit record");
            assert_eq!(rec["action"], "policy.apply", "{context}: {rec}");
            assert_eq!(rec["detail"]["version"], v, "{context}: {rec}");
            acked += 1;
        } else if now == head + 1 {
            committed_unacked += 1;
        } else {
            assert_eq!(now, head, "{context}: unexpected head");
            lost_unacked += 1;
        }
        if now == head + 1 {
            expected.insert(now, set);
            head = now;
            hi = delay_ms;
            if hi < lo + 20 {
                lo = hi.saturating_sub(40);
            }
        } else {
            lo = delay_ms;
            if hi < lo + 20 {
                hi = lo + 40;
            }
        }
        eprintln!("{context}: head {head}");
        check_state(&c, &expected, head, &context);
        let _ = fs::remove_dir_all(&dir);
    }
    eprintln!(
        "crash test: {acked} acknowledged, {committed_unacked} committed but unacknowledged, \
         {lost_unacked} not committed (of {ROUNDS} kills)"
    );
    assert!(
        committed_unacked + lost_unacked > 0,
        "no kill interrupted an apply in flight; the test proved nothing"
    );

    // Every version, old and new, is still exactly what was applied.
    for (v, tree) in &expected {
        let (got, t) = c.get(*v);
        assert_eq!(got, *v);
        assert!(t == *tree, "version {v} differs from what was applied");
    }
}

// ---------------------------------------------------------------------------------------
// 3. Audit tamper detection
// ---------------------------------------------------------------------------------------

fn redb_path(data: &Path) -> PathBuf {
    data.join("ztseg.redb")
}

/// The stored bytes of audit record `k`.
fn record_bytes(data: &Path, k: u64) -> Vec<u8> {
    let db = redb::Database::open(redb_path(data)).unwrap();
    let rtx = db.begin_read().unwrap();
    rtx.open_table(AUDIT).unwrap().get(k).unwrap().expect("record k").value().to_vec()
}

/// Rewrite audit record `k` in the store file with byte `at` of its value flipped.
fn flip_byte(data: &Path, k: u64, at: usize) {
    let db = redb::Database::open(redb_path(data)).unwrap();
    let tx = db.begin_write().unwrap();
    {
        let mut t = tx.open_table(AUDIT).unwrap();
        let mut v = t.get(k).unwrap().expect("record k").value().to_vec();
        v[at] ^= 0x01;
        t.insert(k, v.as_slice()).unwrap();
    }
    tx.commit().unwrap();
}

fn delete_record(data: &Path, j: u64) {
    let db = redb::Database::open(redb_path(data)).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(AUDIT).unwrap().remove(j).unwrap().expect("record j");
    tx.commit().unwrap();
}

fn verify_offline(c: &Controller, data: &Path) -> Out {
    c.cli(&["audit", "verify", "--data-dir", path_str(data)])
}

/// With the controller stopped: the log verifies; one flipped byte in record k (wherever in
/// the record) makes `ztseg audit verify --data-dir` fail naming k — offline and through a
/// controller started on the tampered store; a deleted middle record j is named as missing.
#[test]
fn audit_tampering_is_detected_and_named() {
    let mut c = Controller::started("tamper");
    let out = c.cli(&["policy", "apply", DEMO_POLICIES, "-m", "one"]);
    assert!(out.ok(), "{out}");
    call(&c.addr, &c.anonymous(), policy_get).expect_err("anonymous Policy/Get");
    let out = c.cli(&["controller", "token", "--role", "enforcer", "--name", "host-t"]);
    assert!(out.ok(), "{out}");
    let out = c.cli(&["policy", "apply", LAB_POLICIES, "-m", "two"]);
    assert!(out.ok(), "{out}");
    let operator = c.identity(Role::Operator, "op-t");
    call(&c.addr, &operator, audit_list).expect_err("operator Audit/List");
    let out = c.cli(&["policy", "rollback", "1"]);
    assert!(out.ok(), "{out}");
    let n = c.wait_audit("policy.rollback", |r| r["action"] == "policy.rollback")["seq"].as_u64().unwrap();
    assert!(n >= 6, "{n} records");
    c.stop();

    // The head in META agrees with the records; the untouched log verifies.
    {
        let db = redb::Database::open(redb_path(&c.data)).unwrap();
        let rtx = db.begin_read().unwrap();
        let head: Value =
            serde_json::from_str(rtx.open_table(META).unwrap().get("audit_head").unwrap().unwrap().value())
                .unwrap();
        assert_eq!(head["seq"], n);
    }
    let out = verify_offline(&c, &c.data);
    assert!(out.ok(), "verify before tampering: {out}");
    assert!(out.stdout.contains(&format!("audit log intact: {n} records")), "{out}");

    let k = n / 2 + 1;
    let j = n / 2;
    assert!(1 < j && j < k && k < n);
    let original = record_bytes(&c.data, k);
    // The second byte of a field's value.
    let find = |needle: &str| {
        original.windows(needle.len()).position(|w| w == needle.as_bytes()).expect(needle) + needle.len() + 1
    };
    let places = [
        ("actor", find("\"actor\":\"")),
        ("stored hash", find("\"hash\":\"")),
        ("time", find("\"time_ms\":")),
        ("last byte", original.len() - 1),
    ];
    for (label, at) in places {
        let data = c.root.join(format!("flip-{}", label.replace(' ', "-")));
        copy_dir(&c.data, &data);
        flip_byte(&data, k, at);
        let out = verify_offline(&c, &data);
        assert_eq!(out.code, Some(1), "flipped byte {at} ({label}) of record {k}: {out}");
        assert!(out.stderr.contains(&format!("audit record {k}:")), "must name record {k}: {out}");
    }
    // The original is untouched by the tampering of its copies.
    assert!(verify_offline(&c, &c.data).ok());

    // A controller on a tampered store reports it through Audit/Verify too.
    let pristine = c.data.clone();
    let tampered = c.root.join("flip-online");
    copy_dir(&pristine, &tampered);
    flip_byte(&tampered, k, find("\"action\":\""));
    c.data = tampered;
    c.start();
    let out = c.cli(&["audit", "verify"]);
    assert_eq!(out.code, Some(1), "online verify of a tampered log: {out}");
    assert!(out.stderr.contains(&format!("audit record {k}:")), "{out}");
    c.stop();
    c.data = pristine;

    // A deleted record in the middle is a gap, named by its number.
    let data = c.root.join("delete");
    copy_dir(&c.data, &data);
    delete_record(&data, j);
    let out = verify_offline(&c, &data);
    assert_eq!(out.code, Some(1), "deleted record {j}: {out}");
    assert!(out.stderr.contains(&format!("audit record {j}: missing")), "must name record {j}: {out}");

    // And so is a truncated tail (the last record deleted): the head still names it.
    let data = c.root.join("truncate");
    copy_dir(&c.data, &data);
    delete_record(&data, n);
    let out = verify_offline(&c, &data);
    assert_eq!(out.code, Some(1), "deleted last record {n}: {out}");
    assert!(out.stderr.contains(&format!("audit record {n}: missing")), "must name record {n}: {out}");
}

/// Cut the newest records off the audit log in the store file and rewrite its head to the
/// last one kept: what someone who can write the store can do without breaking the chain.
fn cut_log(data: &Path, keep: u64) {
    let last: Value = serde_json::from_slice(&record_bytes(data, keep)).unwrap();
    let db = redb::Database::open(redb_path(data)).unwrap();
    let tx = db.begin_write().unwrap();
    tx.open_table(AUDIT).unwrap().retain(|k, _| k <= keep).unwrap();
    let head = serde_json::json!({ "seq": keep, "hash": last["hash"] }).to_string();
    tx.open_table(META).unwrap().insert("audit_head", head.as_str()).unwrap();
    tx.commit().unwrap();
}

/// A log whose newest records were cut off and whose head was rewritten to match verifies on
/// its own; an anchor taken from the SIEM export (a record's sequence and hash) catches it, and
/// `verify` names the missing record — offline, and through a controller on that store.
#[test]
fn an_anchor_from_the_siem_export_catches_a_cut_off_log() {
    let mut c = Controller::init("anchor");
    let sink = c.root.join("siem.jsonl");
    c.siem = Some(sink.clone());
    c.start();
    for name in ["a1", "a2", "a3", "a4"] {
        let out = c.cli(&["controller", "token", "--role", "enforcer", "--name", name]);
        assert!(out.ok(), "{out}");
    }
    // The newest record as the SIEM export carries it: metadata.sequence and unmapped.hash.
    let t0 = Instant::now();
    let line = loop {
        let text = fs::read_to_string(&sink).unwrap_or_default();
        if let Some(v) = text.lines().filter_map(|l| serde_json::from_str::<Value>(l).ok()).next_back()
            && v["metadata"]["sequence"] == 4
        {
            break v;
        }
        assert!(t0.elapsed() < Duration::from_secs(10), "record 4 not exported:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    };
    let anchor = format!("{}:{}", line["metadata"]["sequence"], line["unmapped"]["hash"].as_str().unwrap());
    let out = c.cli(&["audit", "verify", "--anchor", &anchor]);
    assert!(out.ok() && out.stdout.contains("1 anchors found in the chain"), "{out}");

    c.stop();
    cut_log(&c.data, 2);
    let out = verify_offline(&c, &c.data);
    assert!(out.ok(), "without an anchor the shortened log verifies (the limit anchors address): {out}");
    let out = c.cli(&["audit", "verify", "--data-dir", path_str(&c.data), "--anchor", &anchor]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("audit record 4: missing") && out.stderr.contains("cut off"), "{out}");
    c.start();
    let out = c.cli(&["audit", "verify", "--anchor", &anchor]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("audit record 4: missing"), "{out}");
    // A wrong hash for a record that is there is named too; a malformed anchor is refused.
    let wrong = format!("2:{}", "0".repeat(64));
    let out = c.cli(&["audit", "verify", "--anchor", &wrong]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("audit record 2: its hash"), "{out}");
    let out = c.cli(&["audit", "verify", "--anchor", "4"]);
    assert!(!out.ok() && out.stderr.contains("SEQ:HASH"), "{out}");
}

/// GET `path` from `addr`: (status code, body).
fn http_get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("metrics at {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes()).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let status = out.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, out.split_once("\r\n\r\n").map(|(_, b)| b.to_owned()).unwrap_or_default())
}

/// `controller run --metrics-addr`: the policy version, each enforcer's enforced version and
/// state, and refused calls by RPC show in `/metrics`; `/healthz` and `/readyz` answer.
#[test]
fn controller_metrics_follow_policy_enforcers_and_refusals() {
    let addr = format!("127.0.0.1:{}", ztseg_integration::free_port());
    let c = Controller::started_with("metrics", &["--metrics-addr", &addr]);
    assert_eq!(http_get(&addr, "/readyz").0, 200);
    assert_eq!(http_get(&addr, "/healthz").0, 200);
    assert_eq!(http_get(&addr, "/nothing").0, 404);
    let out = c.cli(&["policy", "apply", DEMO_POLICIES, "-m", "v1"]);
    assert!(out.ok(), "{out}");
    let report = |files: &ClientFiles, version: u64| {
        call(&c.addr, files, move |ch| async move {
            DistributionClient::new(ch)
                .report(pb::ReportRequest { enforced_version: version, ..Default::default() })
                .await
        })
        .expect("enforcer Distribution/Report")
    };
    report(&c.identity(Role::Enforcer, "n1"), 1);
    report(&c.identity(Role::Enforcer, "n2"), 0);
    let operator = c.identity(Role::Operator, "op-m");
    call(&c.addr, &operator, audit_list).expect_err("operator Audit/List");
    // Enrollment is counted too: one refused (a guessed token), one let through.
    let enroll = |tok: &str| c.enroll(tok, &c.root.join(unique("enroll-")), "m");
    assert!(!enroll("ztseg-join-guess").ok());
    let tok = c.cli(&["controller", "token", "--role", "enforcer", "--name", "n3"]);
    assert!(tok.ok(), "{tok}");
    let out = enroll(tok.stdout.trim());
    assert!(out.ok(), "{out}");
    let (status, body) = http_get(&addr, "/metrics");
    assert_eq!(status, 200, "{body}");
    for line in [
        "ztseg_controller_store_up 1",
        "ztseg_controller_leader 1",
        "ztseg_controller_policy_version 1",
        "ztseg_controller_policy_oldest_version 1",
        "ztseg_controller_enforcers{state=\"in_sync\"} 1",
        "ztseg_controller_enforcers{state=\"behind\"} 1",
        "ztseg_controller_enforcer_policy_version{enforcer=\"n1\"} 1",
        "ztseg_controller_enforcer_policy_version{enforcer=\"n2\"} 0",
        "ztseg_controller_rpc_requests_total{rpc=\"Audit/List\",outcome=\"denied\"} 1",
        "ztseg_controller_rpc_requests_total{rpc=\"Distribution/Report\",outcome=\"allowed\"} 2",
        "ztseg_controller_rpc_requests_total{rpc=\"Enrollment/Enroll\",outcome=\"allowed\"} 1",
        "ztseg_controller_rpc_requests_total{rpc=\"Enrollment/Enroll\",outcome=\"denied\"} 1",
        "ztseg_controller_subscriptions 0",
    ] {
        assert!(body.lines().any(|l| l == line), "missing {line:?} in:\n{body}");
    }
    let seq = body
        .lines()
        .find_map(|l| l.strip_prefix("ztseg_controller_audit_last_seq "))
        .and_then(|v| v.parse::<u64>().ok())
        .expect("audit sequence");
    assert_eq!(seq, c.audit().len() as u64, "{body}");
}

/// `controller run --keep-versions 2`: after each apply or rollback the controller itself
/// prunes the history to the two newest versions, recorded as `policy.prune` by `controller`;
/// the audit chain verifies and a rollback to a kept version still works.
#[test]
fn automatic_retention_keeps_the_newest_versions() {
    let c = Controller::started_with("autoretain", &["--keep-versions", "2"]);
    for (i, p) in [DEMO_POLICIES, LAB_POLICIES, DEMO_POLICIES, LAB_POLICIES].into_iter().enumerate() {
        let out = c.cli(&["policy", "apply", p, "-m", &format!("v{}", i + 1)]);
        assert!(out.ok(), "{out}");
        let want: Vec<u64> = (1..=u64::try_from(i).unwrap() + 1).rev().take(2).collect();
        assert_eq!(c.history().iter().map(|h| h.version).collect::<Vec<_>>(), want, "after v{}", i + 1);
    }
    let recs = c.audit();
    let prunes: Vec<&serde_json::Value> = recs.iter().filter(|r| r["action"] == "policy.prune").collect();
    assert_eq!(prunes.len(), 2, "one prune after v3 and one after v4: {prunes:#?}");
    assert!(prunes.iter().all(|r| r["actor"] == "controller" && r["detail"]["pruned"] == 1), "{prunes:#?}");
    let out = c.cli(&["policy", "rollback", "3"]);
    assert!(out.ok(), "{out}");
    assert_eq!(c.history().iter().map(|h| h.version).collect::<Vec<_>>(), vec![5, 4]);
    let out = c.cli(&["audit", "verify"]);
    assert!(out.ok(), "{out}");
}

/// `ztseg policy prune --keep 2` keeps the two newest versions: history lists them, a pruned
/// version can be neither read nor rolled back to (the error names the oldest kept one), a
/// kept one can, numbering goes on, only an admin may prune, and the audit chain verifies
/// with the `policy.prune` record in it.
#[test]
fn policy_prune_keeps_the_newest_versions() {
    let c = Controller::started("retention");
    for (i, p) in [DEMO_POLICIES, LAB_POLICIES, DEMO_POLICIES, LAB_POLICIES].into_iter().enumerate() {
        let out = c.cli(&["policy", "apply", p, "-m", &format!("v{}", i + 1)]);
        assert!(out.ok(), "{out}");
    }
    assert_eq!(c.history().iter().map(|h| h.version).collect::<Vec<_>>(), vec![4, 3, 2, 1]);

    // Refused: a non-admin, and keep 0; nothing is pruned.
    c.identity(Role::Operator, "op-r");
    let out = c.cli_as(&c.root.join("ids").join("op-r"), "op-r", &["policy", "prune", "--keep", "1"]);
    assert!(!out.ok() && out.stderr.contains("PermissionDenied"), "operator prune: {out}");
    assert!(out.stderr.contains("role operator may not call Policy/Prune"), "{out}");
    let out = c.cli(&["policy", "prune", "--keep", "0"]);
    assert!(
        !out.ok() && out.stderr.contains("InvalidArgument") && out.stderr.contains("at least 1"),
        "{out}"
    );
    assert_eq!(c.history().len(), 4, "a refused prune deleted versions");

    let out = c.cli(&["policy", "prune", "--keep", "2"]);
    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains("pruned 2 policy versions; the oldest kept version is 3"), "{out}");
    assert_eq!(c.history().iter().map(|h| h.version).collect::<Vec<_>>(), vec![4, 3]);

    // A pruned version: NOT_FOUND naming the oldest kept one, for rollback and get alike.
    let out = c.cli(&["policy", "rollback", "1"]);
    assert!(!out.ok() && out.stderr.contains("NotFound"), "rollback to a pruned version: {out}");
    assert!(out.stderr.contains("policy version 1 was pruned: the oldest kept version is 3"), "{out}");
    let out = c.cli(&["policy", "get", "--version", "2"]);
    assert!(
        !out.ok() && out.stderr.contains("policy version 2 was pruned"),
        "get of a pruned version: {out}"
    );
    // A kept version: the rollback is version 5 with version 3's documents.
    let out = c.cli(&["policy", "rollback", "3"]);
    assert!(out.ok() && out.stdout.contains("policy version 5 has the documents of version 3"), "{out}");
    assert_eq!(c.get(5).1, c.get(3).1);
    assert_eq!(c.history().iter().map(|h| h.version).collect::<Vec<_>>(), vec![5, 4, 3]);

    let recs = c.audit();
    let pr: Vec<&Value> = recs.iter().filter(|r| r["action"] == "policy.prune").collect();
    assert_eq!(pr.len(), 1, "one policy.prune record: {pr:#?}");
    assert_eq!(pr[0]["actor"], "admin/admin", "{}", pr[0]);
    assert_eq!(pr[0]["outcome"], "success", "{}", pr[0]);
    let d = &pr[0]["detail"];
    assert_eq!(
        (&d["keep"], &d["pruned"], &d["oldest_kept"], &d["blobs_removed"]),
        (&2.into(), &2.into(), &3.into(), &0.into())
    );
    assert!(recs.iter().any(|r| is(r, "api.denied", "operator/op-r", "Policy/Prune")), "refusal audited");
    let out = c.cli(&["audit", "verify"]);
    assert!(out.ok() && out.stdout.contains("hash chain verified"), "{out}");
}

/// Audit records 1..N-1 archived and pruned with `ztseg audit archive`: the archive holds
/// them byte for byte and verifies on its own; the controller lists only the rest, records the
/// prune (with the archive's SHA-256 and last hash) and still verifies; only an admin may
/// prune, and a prune whose last hash is not the controller's changes nothing; after the
/// prune a flipped byte in a retained record, or an altered base, is still named.
#[test]
fn audit_archive_and_prune_keep_the_log_verifiable() {
    let mut c = Controller::started("archive");
    for (i, p) in [DEMO_POLICIES, LAB_POLICIES, DEMO_POLICIES, LAB_POLICIES].into_iter().enumerate() {
        let out = c.cli(&["policy", "apply", p, "-m", &format!("v{i}")]);
        assert!(out.ok(), "{out}");
    }
    let listed = c.cli(&["-o", "json", "audit", "list"]);
    assert!(listed.ok(), "{listed}");
    let array: Vec<Value> = serde_json::from_str(&listed.stdout).expect("a JSON array");
    // `-o json` holds each record on its own line, byte for byte as stored.
    let lines: Vec<&str> = listed
        .stdout
        .lines()
        .filter(|l| !matches!(*l, "[" | "]"))
        .map(|l| l.strip_suffix(',').unwrap_or(l))
        .collect();
    assert_eq!((lines.len(), array.len()), (4, 4), "one record per apply: {listed}");
    let table = c.cli(&["audit", "list"]);
    assert!(table.ok() && table.stdout.starts_with("SEQ  TIME"), "a table by default: {table}");
    assert_eq!(table.stdout.lines().count(), 5, "{table}");
    let rec = |i: usize| -> Value { serde_json::from_str(lines[i]).unwrap() };
    let h3 = rec(2)["hash"].as_str().unwrap().to_owned();

    // Only an admin may prune: auditors and operators are refused (and audited), and an admin
    // naming a last hash the controller does not have changes nothing.
    let prune = |before: u64, last_hash: String| {
        move |ch: Channel| async move {
            AuditClient::new(ch)
                .prune(pb::AuditPruneRequest { before, archive_sha256: "0".repeat(64), last_hash })
                .await
        }
    };
    for (actor, files) in [
        ("auditor/aud-p", c.identity(Role::Auditor, "aud-p")),
        ("operator/op-p", c.identity(Role::Operator, "op-p")),
    ] {
        let e = call(&c.addr, &files, prune(4, h3.clone())).expect_err(actor);
        assert_eq!(e.code, Some(Code::PermissionDenied), "{actor}: {e:?}");
        let role = actor.split('/').next().unwrap();
        assert!(e.message.contains(&format!("role {role} may not call Audit/Prune")), "{e:?}");
        c.wait_audit(&format!("api.denied {actor} Audit/Prune"), |r| {
            is(r, "api.denied", actor, "Audit/Prune")
        });
    }
    let e = call(&c.addr, &c.admin_files(), prune(4, rec(1)["hash"].as_str().unwrap().to_owned()))
        .expect_err("prune with the hash of another record");
    assert_eq!(e.code, Some(Code::FailedPrecondition), "{e:?}");
    assert!(e.message.contains("audit record 3: its hash"), "names record 3: {e:?}");
    let e = call(&c.addr, &c.admin_files(), prune(99, h3.clone())).expect_err("prune past the head");
    assert_eq!(e.code, Some(Code::InvalidArgument), "{e:?}");
    assert!(e.message.contains("before 99"), "{e:?}");
    let recs = c.audit();
    assert_eq!(recs.len(), 6, "the refusals pruned nothing: {recs:#?}");
    assert_eq!(recs[0]["seq"], 1);

    // An auditor's `audit archive` writes nothing it can prune.
    let aud_dir = c.root.join("ids").join("aud-p");
    let refused = c.root.join("refused.jsonl");
    let out =
        c.cli_as(&aud_dir, "aud-p", &["audit", "archive", "--before", "4", "--out", path_str(&refused)]);
    assert_eq!(out.code, Some(1), "auditor archive: {out}");
    assert!(out.stderr.contains("nothing was pruned") && out.stderr.contains("PermissionDenied"), "{out}");
    assert_eq!(c.audit()[0]["seq"], 1);

    // The admin archives records 1..3.
    let archive = c.root.join("audit-0001.jsonl");
    let out = c.cli(&["audit", "archive", "--before", "4", "--out", path_str(&archive)]);
    assert!(out.ok(), "{out}");
    assert!(out.stdout.contains(&format!("archived records 1..3 to {}", archive.display())), "{out}");
    assert!(out.stdout.contains(&format!("last hash {h3}")), "{out}");
    assert!(out.stdout.contains("pruned 3 records"), "{out}");
    let bytes = fs::read(&archive).unwrap();
    assert_eq!(bytes, format!("{}\n", lines[..3].join("\n")).into_bytes(), "records 1-3 byte for byte");
    let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));

    // Pruned records are gone; the prune is recorded with what it archived.
    let recs = c.audit();
    assert_eq!(recs[0]["seq"], 4, "records 1-3 are no longer listed: {recs:#?}");
    let pr = recs.iter().find(|r| r["action"] == "audit.prune").expect("an audit.prune record");
    assert_eq!(pr["actor"], "admin/admin", "{pr}");
    assert_eq!(pr["outcome"], "success", "{pr}");
    let detail = &pr["detail"];
    assert_eq!(
        (detail["before"].as_u64(), detail["first"].as_u64(), detail["count"].as_u64()),
        (Some(4), Some(1), Some(3)),
        "{pr}"
    );
    assert_eq!(detail["last_hash"], h3, "{pr}");
    assert_eq!(detail["archive_sha256"], sha, "{pr}");
    let head = recs.last().unwrap()["seq"].as_u64().unwrap();
    assert_eq!(pr["seq"].as_u64(), Some(head), "{pr}");

    // Both verify: the log from its base, the archive on its own.
    let out = c.cli(&["audit", "verify"]);
    assert!(out.ok(), "verify after the prune: {out}");
    assert!(out.stdout.contains(&format!("audit log intact: {} records", head - 3)), "{out}");
    assert!(out.stdout.contains(&format!("records 4..{head}")), "{out}");
    let out = c.cli(&["audit", "verify", "--archive", path_str(&archive)]);
    assert!(out.ok(), "verify the archive: {out}");
    assert!(out.stdout.contains("records 1..3 (3 records)"), "{out}");
    assert!(out.stdout.contains(&format!("last hash {h3}; sha256 {sha}")), "{out}");
    // A damaged archive names its record.
    let damaged = c.root.join("damaged.jsonl");
    let mut damaged_bytes = bytes.clone();
    let at = lines[0].len() + 1 + lines[1].find("\"actor\":\"").unwrap() + 10;
    damaged_bytes[at] ^= 0x01;
    fs::write(&damaged, &damaged_bytes).unwrap();
    let out = c.cli(&["audit", "verify", "--archive", path_str(&damaged)]);
    assert_eq!(out.code, Some(1), "damaged archive: {out}");
    assert!(out.stderr.contains("audit record 2:"), "names record 2: {out}");
    // An archive file is never overwritten (and nothing is pruned then).
    let out = c.cli(&["audit", "archive", "--before", "5", "--out", path_str(&archive)]);
    assert_eq!(out.code, Some(1), "{out}");
    assert!(out.stderr.contains("must not exist"), "{out}");
    assert_eq!(fs::read(&archive).unwrap(), bytes);
    assert_eq!(c.audit()[0]["seq"], 4);
    c.stop();

    // Offline too; and tampering after the prune is still named.
    let out = verify_offline(&c, &c.data);
    assert!(out.ok(), "offline verify after the prune: {out}");
    let k = 5;
    let original = record_bytes(&c.data, k);
    let data = c.root.join("flip-retained");
    copy_dir(&c.data, &data);
    flip_byte(&data, k, original.windows(9).position(|w| w == b"\"actor\":\"").unwrap() + 10);
    let out = verify_offline(&c, &data);
    assert_eq!(out.code, Some(1), "flipped byte in retained record {k}: {out}");
    assert!(out.stderr.contains(&format!("audit record {k}:")), "must name record {k}: {out}");
    // The base moved past a deleted record: the audit.prune record disagrees and is named.
    let data = c.root.join("base-moved");
    copy_dir(&c.data, &data);
    delete_record(&data, 4);
    let r4: Value = serde_json::from_str(lines[3]).unwrap();
    set_base(&data, 4, r4["hash"].as_str().unwrap());
    let out = verify_offline(&c, &data);
    assert_eq!(out.code, Some(1), "record 4 deleted and the base moved: {out}");
    assert!(out.stderr.contains(&format!("audit record {head}: this audit.prune record")), "{out}");
    // The base's hash altered: the first retained record no longer follows it.
    let data = c.root.join("base-altered");
    copy_dir(&c.data, &data);
    set_base(&data, 3, &"0".repeat(64));
    let out = verify_offline(&c, &data);
    assert_eq!(out.code, Some(1), "altered base: {out}");
    assert!(out.stderr.contains("audit record 4: does not follow the base"), "{out}");
}

/// A prune waits for the SIEM export: while a sink has not taken the records to prune (its
/// receiver is down), `ztseg audit archive` is refused naming the sink and nothing is pruned;
/// once every sink has them, the same archive goes through.
#[test]
fn audit_prune_waits_for_the_siem_export() {
    let down = format!("http://127.0.0.1:{}/ingest", ztseg_integration::free_port());
    let mut c = Controller::started_with("prune-siem", &["--siem", &down]);
    for (i, p) in [DEMO_POLICIES, LAB_POLICIES, DEMO_POLICIES].into_iter().enumerate() {
        let out = c.cli(&["policy", "apply", p, "-m", &format!("v{i}")]);
        assert!(out.ok(), "{out}");
    }
    let archive = c.root.join("audit-siem.jsonl");
    let out = c.cli(&["audit", "archive", "--before", "3", "--out", path_str(&archive)]);
    assert_eq!(out.code, Some(1), "prune before the export: {out}");
    assert!(
        out.stderr.contains(&format!("SIEM sink {down} has taken the audit log up to record 0")),
        "{out}"
    );
    assert!(out.stderr.contains("FailedPrecondition") && out.stderr.contains("nothing was pruned"), "{out}");
    assert_eq!(c.audit()[0]["seq"], 1, "nothing pruned");
    c.stop();

    // Only a file sink, which takes every record at once.
    let sink = c.root.join("siem.jsonl");
    c.extra.clear();
    c.siem = Some(sink.clone());
    c.start();
    let t0 = Instant::now();
    while fs::read_to_string(&sink).unwrap_or_default().lines().count() < 3 {
        assert!(t0.elapsed() < Duration::from_secs(10), "the file sink did not get records 1-3 in 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let archive = c.root.join("audit-siem-2.jsonl");
    let out = c.cli(&["audit", "archive", "--before", "3", "--out", path_str(&archive)]);
    assert!(out.ok(), "prune after the export: {out}");
    assert!(out.stdout.contains("pruned 2 records"), "{out}");
    assert_eq!(c.audit()[0]["seq"], 3);
}

/// Overwrite the stored base of the pruned audit log.
fn set_base(data: &Path, seq: u64, hash: &str) {
    let db = redb::Database::open(redb_path(data)).unwrap();
    let tx = db.begin_write().unwrap();
    let base = serde_json::json!({ "seq": seq, "hash": hash }).to_string();
    tx.open_table(META).unwrap().insert("audit_base", base.as_str()).unwrap();
    tx.commit().unwrap();
}

// ---------------------------------------------------------------------------------------
// 4. Enrollment
// ---------------------------------------------------------------------------------------

/// A join token is redeemable once; a reused, unknown or expired one is refused; the
/// certificate carries the token's role and name (an enrolled enforcer cannot apply policy,
/// an enrolled operator can).
#[test]
fn enrollment_tokens_are_single_use_and_carry_the_role() {
    let c = Controller::started("enroll");
    let token = |role: &str, name: &str, ttl: &str| new_token(&c, role, name, ttl).0;
    let enroll = |tok: &str, dir: &Path, stem: &str| c.enroll(tok, dir, stem);

    let t = token("enforcer", "host-a", "1h");
    let host_dir = c.root.join("host-a");
    let out = enroll(&t, &host_dir, "host-a");
    assert!(out.ok(), "first use of the token: {out}");
    assert!(out.stdout.contains("enrolled as spiffe://ztseg.local/enforcer/host-a"), "{out}");
    assert!(host_dir.join("host-a.pem").exists() && host_dir.join("host-a-key.pem").exists());

    // Second use, an unknown token, an expired token: refused, and nothing written.
    let again = c.root.join("again");
    let out = enroll(&t, &again, "host-a");
    assert!(!out.ok() && out.stderr.contains("enrollment refused"), "second use: {out}");
    let out = enroll("ztseg-join-AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", &again, "x");
    assert!(!out.ok() && out.stderr.contains("enrollment refused"), "unknown token: {out}");
    let late = token("operator", "late", "1s");
    std::thread::sleep(Duration::from_millis(1500));
    let out = enroll(&late, &again, "late");
    assert!(!out.ok() && out.stderr.contains("enrollment refused"), "expired token: {out}");
    assert!(!again.join("host-a.pem").exists() && !again.join("late.pem").exists());

    let recs = c.audit();
    let enrolls: Vec<&Value> = recs.iter().filter(|r| r["action"] == "enroll").collect();
    assert_eq!(enrolls.len(), 4, "{enrolls:#?}");
    assert_eq!(enrolls[0]["outcome"], "success");
    assert_eq!(enrolls[0]["actor"], "enforcer/host-a");
    assert!(
        enrolls[1..].iter().all(|r| r["outcome"] == "failure" && r["actor"] == "anonymous"),
        "{enrolls:#?}"
    );

    // The enrolled enforcer may report status but not change policy.
    let out = c.cli_as(&host_dir, "host-a", &["policy", "apply", DEMO_POLICIES, "-m", "sneaky"]);
    assert!(!out.ok() && out.stderr.contains("PermissionDenied"), "enforcer apply: {out}");
    c.wait_audit("api.denied by enforcer/host-a", |r| is(r, "api.denied", "enforcer/host-a", "Policy/Apply"));
    assert!(c.history().is_empty());
    call(&c.addr, &ClientFiles::in_dir(&host_dir, "host-a"), |ch| async move {
        DistributionClient::new(ch)
            .report(pb::ReportRequest { enforced_version: 0, ..Default::default() })
            .await
    })
    .expect("enrolled enforcer Distribution/Report");
    let out = c.cli(&["-o", "json", "controller", "enforcers"]);
    assert!(out.ok() && out.stdout.contains("\"host-a\""), "{out}");

    // An operator token yields an identity that may apply policy, recorded under its name.
    let t = token("operator", "op-a", "1h");
    let op_dir = c.root.join("op-a");
    let out = enroll(&t, &op_dir, "op-a");
    assert!(out.ok() && out.stdout.contains("/operator/op-a"), "{out}");
    let out = c.cli_as(&op_dir, "op-a", &["policy", "apply", DEMO_POLICIES, "-m", "by the operator"]);
    assert_eq!(acknowledged(&out).map(|a| a.0), Some(1), "{out}");
    let h = c.history();
    assert_eq!(h.len(), 1);
    assert_eq!(h[0].actor, "operator/op-a");
}

/// The CSR is checked before the join token is redeemed: a malformed request is refused as
/// `INVALID_ARGUMENT` and leaves the token usable; the token then enrolls.
#[test]
fn a_malformed_csr_does_not_use_up_the_join_token() {
    let c = Controller::started("badcsr");
    let (token, _) = new_token(&c, "enforcer", "host-c", "1h");
    for csr_der in [Vec::new(), b"not a certificate request".to_vec()] {
        let token = token.clone();
        let e = call(&c.addr, &c.anonymous(), |ch| async move {
            EnrollmentClient::new(ch).enroll(pb::EnrollRequest { token, csr_der }).await
        })
        .expect_err("a malformed CSR was signed");
        assert_eq!(e.code, Some(Code::InvalidArgument), "{e:?}");
        assert!(e.message.contains("certificate signing request rejected"), "{e:?}");
    }
    let out = c.enroll(&token, &c.root.join("host-c"), "host-c");
    assert!(out.ok(), "the token was used up by the malformed requests: {out}");
    let recs = c.audit();
    let enrolls: Vec<&Value> = recs.iter().filter(|r| r["action"] == "enroll").collect();
    assert_eq!(enrolls.len(), 3, "{enrolls:#?}");
    assert!(enrolls[..2].iter().all(|r| r["outcome"] == "failure"), "{enrolls:#?}");
    assert_eq!(enrolls[2]["actor"], "enforcer/host-c", "{enrolls:#?}");
}

/// `controller token` prints the token (stdout) and its id (stderr).
fn new_token(c: &Controller, role: &str, name: &str, ttl: &str) -> (String, String) {
    let out = c.cli(&["controller", "token", "--role", role, "--name", name, "--ttl", ttl]);
    assert!(out.ok(), "token: {out}");
    let token = out.stdout.trim().to_owned();
    assert!(token.starts_with("ztseg-join-"), "{out}");
    let id = out
        .stderr
        .strip_prefix("join token ")
        .and_then(|r| r.split_whitespace().next())
        .unwrap_or_else(|| panic!("no token id: {out}"))
        .to_owned();
    (token, id)
}

/// `controller tokens -o json`: the outstanding tokens.
fn list_tokens(c: &Controller) -> Vec<Value> {
    let out = c.cli(&["-o", "json", "controller", "tokens"]);
    assert!(out.ok(), "tokens: {out}");
    assert!(!out.stdout.contains("ztseg-join-"), "a token secret was listed: {out}");
    serde_json::from_str::<Value>(&out.stdout).unwrap().as_array().unwrap().clone()
}

/// Join tokens are listed (id, role, name, times, creator; never the secret) and revocable one
/// by one; revoking an identity deletes its outstanding tokens, and a token created before a
/// revocation that the revocation could not delete (one stored by an older controller) is
/// refused at enrollment; a token created afterwards enrolls the identity again. Expired
/// tokens are deleted by the controller, and that is audited.
#[test]
fn join_tokens_are_listed_revocable_and_die_with_their_identity() {
    let mut c = Controller::started("tokens");
    let enroll = |c: &Controller, tok: &str, stem: &str| c.enroll(tok, &c.root.join(unique("enroll-")), stem);
    let (t1, id1) = new_token(&c, "enforcer", "node1", "1h");
    let (t2, id2) = new_token(&c, "enforcer", "node2", "1h");
    let (_, id3) = new_token(&c, "operator", "brief", "2s");
    let listed = list_tokens(&c);
    let ids: Vec<&str> = listed.iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, [id1.as_str(), id2.as_str(), id3.as_str()], "{listed:#?}");
    assert!(id1.len() == 16 && id1.bytes().all(|b| b.is_ascii_hexdigit()), "{id1}");
    let hash1 = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(t1.as_bytes()));
    assert!(hash1.starts_with(&id1), "the id is the start of the token's SHA-256");
    assert_eq!(
        (&listed[0]["role"], &listed[0]["name"], &listed[0]["created_by"]),
        (&Value::from("enforcer"), &Value::from("node1"), &Value::from("admin/admin")),
        "{listed:#?}"
    );
    assert!(!listed[0]["created"].as_str().unwrap().is_empty(), "{listed:#?}");

    // Revoking node1 deletes its token: it no longer enrolls.
    let out = c.cli(&["controller", "revoke", "--role", "enforcer", "--name", "node1"]);
    assert!(out.ok() && out.stdout.contains("1 outstanding join tokens deleted"), "{out}");
    let out = enroll(&c, &t1, "node1");
    assert!(
        !out.ok() && out.stderr.contains("enrollment refused"),
        "a revoked identity's token enrolled: {out}"
    );
    assert!(!list_tokens(&c).iter().any(|t| t["id"] == id1.as_str()));
    let rec = c.wait_audit("identity.revoke of node1", |r| r["action"] == "identity.revoke");
    assert_eq!(rec["detail"]["tokens_revoked"], 1, "{rec}");

    // One token revoked by (a prefix of) its id.
    let out = c.cli(&["controller", "revoke-token", &id2[..8]]);
    assert!(
        out.ok() && out.stdout.contains(&format!("revoked join token {id2} for enforcer/node2")),
        "{out}"
    );
    let out = enroll(&c, &t2, "node2");
    assert!(!out.ok() && out.stderr.contains("enrollment refused"), "a revoked token enrolled: {out}");
    let out = c.cli(&["controller", "revoke-token", &id2]);
    assert!(!out.ok() && out.stderr.contains("NotFound"), "{out}");
    let out = c.cli(&["controller", "revoke-token", "abc"]);
    assert!(!out.ok() && out.stderr.contains("InvalidArgument"), "{out}");
    let rec = c.wait_audit("token.revoke", |r| r["action"] == "token.revoke");
    assert_eq!(
        (&rec["actor"], &rec["detail"]["id"]),
        (&Value::from("admin/admin"), &Value::from(id2.as_str()))
    );

    // Expired tokens are deleted by the controller (audited), not left lying around.
    let t0 = Instant::now();
    while list_tokens(&c).iter().any(|t| t["id"] == id3.as_str()) {
        assert!(t0.elapsed() < Duration::from_secs(15), "the expired token is still listed");
        std::thread::sleep(Duration::from_millis(200));
    }
    let rec = c.wait_audit("token.expire", |r| r["action"] == "token.expire");
    assert_eq!(rec["actor"], "controller", "{rec}");
    assert_eq!(rec["detail"]["tokens"][0]["id"], id3.as_str(), "{rec}");

    // A token stored before its identity was revoked that Revoke could not delete (stored by
    // a controller that recorded no creation time, or created elsewhere at that moment):
    // refused at enrollment, and used up.
    c.stop();
    let secret = "ztseg-join-stored-by-an-older-controller";
    {
        let db = redb::Database::open(redb_path(&c.data)).unwrap();
        let tx = db.begin_write().unwrap();
        let hash = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(secret.as_bytes()));
        let old = serde_json::json!({
            "role": "enforcer", "name": "node1", "expires_ms": ztseg_controller::now_ms() + 3_600_000,
            "cert_ttl_s": 3600, "created_by": "admin/admin",
        });
        tx.open_table(TOKENS).unwrap().insert(hash.as_str(), old.to_string().as_bytes()).unwrap();
        tx.commit().unwrap();
    }
    c.start();
    let out = enroll(&c, secret, "node1");
    assert!(
        !out.ok() && out.stderr.contains("created before enforcer/node1 was revoked"),
        "a token older than the revocation enrolled: {out}"
    );
    assert!(list_tokens(&c).is_empty(), "{:#?}", list_tokens(&c));

    // A token created after the revocation lifts it for new certificates.
    let (t4, _) = new_token(&c, "enforcer", "node1", "1h");
    let out = enroll(&c, &t4, "node1");
    assert!(out.ok(), "a token created after the revocation: {out}");
}

/// Renewal gives the caller a new certificate for the same identity and lifetime (new key);
/// revocation refuses every certificate of the identity issued so far — including the renewed
/// one and open policy streams — while a later re-enrollment works again.
#[test]
fn renewal_keeps_the_identity_and_revocation_cuts_it_off() {
    let c = Controller::started("revoke");
    let files = c.identity(Role::Enforcer, "host-r");
    let old = fs::read_to_string(&files.cert).unwrap();
    let out = c.cli_as(files.cert.parent().unwrap(), "host-r", &["renew"]);
    assert!(out.ok() && out.stdout.contains("renewed spiffe://ztseg.local/enforcer/host-r"), "{out}");
    let new = fs::read_to_string(&files.cert).unwrap();
    assert_ne!(old, new, "the certificate was not replaced");
    let der = |pem: &str| ztseg_controller::pki::cert_der(pem).unwrap();
    let (ob, oa) = ztseg_controller::pki::validity_of(&der(&old)).unwrap();
    let (nb, na) = ztseg_controller::pki::validity_of(&der(&new)).unwrap();
    assert_eq!(oa - ob, na - nb, "same lifetime");
    assert!(nb >= ob, "renewed later");
    assert_eq!(
        ztseg_controller::pki::identity_of(&der(&new), "ztseg.local").unwrap().to_string(),
        "enforcer/host-r"
    );
    c.wait_audit("renew by enforcer/host-r", |r| r["action"] == "renew" && r["actor"] == "enforcer/host-r");

    // An open policy stream of the identity.
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    let addr = c.addr.clone();
    let stream_files = files.clone();
    let stream = rt.spawn(async move {
        let ch = ztseg_controller::server::connect(&addr, &stream_files).await.unwrap();
        let mut s = DistributionClient::new(ch)
            .subscribe(pb::SubscribeRequest { from_version: 0, history: String::new() })
            .await
            .unwrap()
            .into_inner();
        s.message().await
    });
    std::thread::sleep(Duration::from_millis(300));
    assert!(!stream.is_finished(), "the stream ended before the revocation");

    let out = c.cli(&["controller", "revoke", "--role", "enforcer", "--name", "host-r"]);
    assert!(out.ok(), "revoke: {out}");
    // The open stream ends with UNAUTHENTICATED.
    let end = rt.block_on(async { tokio::time::timeout(Duration::from_secs(5), stream).await });
    let status = end.expect("stream cut within 5 s").unwrap().expect_err("the stream must end with an error");
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    // New calls with the (renewed) certificate are refused and audited.
    let r = call(&c.addr, &files, |ch| async move {
        DistributionClient::new(ch).report(pb::ReportRequest::default()).await
    });
    let e = r.expect_err("a revoked certificate was accepted");
    assert_eq!(e.code, Some(Code::Unauthenticated), "{}", e.message);
    assert!(e.message.contains("revoked"), "{}", e.message);
    c.wait_audit("identity.revoke by admin", |r| {
        r["action"] == "identity.revoke" && r["actor"] == "admin/admin"
    });
    c.wait_audit("api.denied of the revoked identity", |r| {
        r["action"] == "api.denied"
            && r["actor"] == "enforcer/host-r"
            && r["detail"]["reason"].as_str().is_some_and(|m| m.contains("revoked"))
    });
    // Another identity is unaffected; re-enrolling the revoked name yields a working one.
    assert!(
        call(&c.addr, &c.identity(Role::Enforcer, "host-s"), |ch| async move {
            DistributionClient::new(ch).report(pb::ReportRequest::default()).await
        })
        .is_ok()
    );
    std::thread::sleep(Duration::from_millis(1100));
    let tok = c.cli(&["controller", "token", "--role", "enforcer", "--name", "host-r"]);
    assert!(tok.ok(), "{tok}");
    let dir = c.root.join("host-r-again");
    let out = c.enroll(tok.stdout.trim(), &dir, "host-r");
    assert!(out.ok(), "{out}");
    assert!(
        call(&c.addr, &ClientFiles::in_dir(&dir, "host-r"), |ch| async move {
            DistributionClient::new(ch).report(pb::ReportRequest::default()).await
        })
        .is_ok(),
        "re-enrolled identity refused"
    );
}

// ---------------------------------------------------------------------------------------
// 5. SIEM export
// ---------------------------------------------------------------------------------------

/// An unauthorized call (an operator reading the audit log) reaches the `file:` SIEM sink
/// as an OCSF API Activity line with status Failure within 5 seconds.
#[test]
fn siem_file_sink_gets_denied_call_within_5s() {
    let mut c = Controller::init("siem");
    let sink = c.root.join("siem.jsonl");
    c.siem = Some(sink.clone());
    c.start();
    let operator = c.identity(Role::Operator, "op-siem");
    call(&c.addr, &operator, policy_get).expect("positive control: operator Policy/Get");

    let t0 = Instant::now();
    let e = call(&c.addr, &operator, audit_list).expect_err("operator Audit/List");
    assert_eq!(e.code, Some(Code::PermissionDenied), "{e:?}");
    let line = loop {
        let text = fs::read_to_string(&sink).unwrap_or_default();
        let found =
            text.lines().map(|l| serde_json::from_str::<Value>(l).expect("SIEM line is JSON")).find(|v| {
                v["unmapped"]["action"] == "api.denied"
                    && v["api"]["operation"] == format!("{RPC_PREFIX}Audit/List")
            });
        if let Some(v) = found {
            break v;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "no api.denied line in {} after 10 s:\n{text}",
            sink.display()
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let took = t0.elapsed();
    eprintln!("SIEM: denied call exported after {took:?}");
    assert!(took < Duration::from_secs(5), "the SIEM line took {took:?}");
    assert_eq!(line["class_uid"], 6003, "{line}");
    assert_eq!(line["status"], "Failure", "{line}");
    assert_eq!(line["status_id"], 2, "{line}");
    assert_eq!(line["unmapped"]["outcome"], "denied", "{line}");
    assert_eq!(line["actor"]["user"]["uid"], "operator/op-siem", "{line}");
    assert_eq!(line["actor"]["user"]["name"], "op-siem", "{line}");
    assert_eq!(line["actor"]["user"]["type"], "operator", "{line}");
    // The line is the audit record: same sequence number and hash.
    let seq = line["metadata"]["sequence"].as_u64().unwrap();
    let rec = c.audit().into_iter().find(|r| r["seq"] == seq).expect("the exported record in the audit log");
    assert!(is(&rec, "api.denied", "operator/op-siem", "Audit/List"), "{rec}");
    assert_eq!(rec["hash"], line["unmapped"]["hash"]);
}

/// Configuration errors of `controller run` exit with 64 and name what is wrong.
#[test]
fn controller_configuration_errors_exit_64() {
    let dir = std::env::temp_dir().join(unique("ztseg-ctl-empty-"));
    fs::create_dir_all(&dir).unwrap();
    let run = |extra: &[&str]| {
        let mut cmd = ztseg_command();
        cmd.args(["controller", "run", "--listen", "127.0.0.1:0", "--data-dir", path_str(&dir)]).args(extra);
        cmd.output().expect("run the controller")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("has no ca.pem") && err.contains("controller init"), "{err}");
    // With a CA: a bad SIEM sink and etcd without endpoints are named.
    let init = ztseg_command().args(["controller", "init", "--data-dir", path_str(&dir)]).output().unwrap();
    assert!(init.status.success(), "{}", String::from_utf8_lossy(&init.stderr));
    let out = run(&["--siem", "ftp://x"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--siem"), "{err}");
    let out = run(&["--store", "etcd"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("--etcd-endpoints"), "{err}");
    let _ = fs::remove_dir_all(&dir);
}

/// Subscriptions name the policy history their version came from: a current subscriber of
/// this history gets nothing new, one of another history (a rebuilt store with the same version
/// numbers) gets a full snapshot, and an older version of this history gets a delta.
#[test]
fn subscriptions_resume_only_within_the_same_history() {
    let c = Controller::started("history");
    let out = c.cli(&["policy", "apply", DEMO_POLICIES, "-m", "v1"]);
    assert!(out.ok(), "{out}");
    let extra = c.root.join("v2");
    copy_dir(Path::new(DEMO_POLICIES), &extra);
    fs::write(
        extra.join("extra.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: extra, namespace: shop}\nspec:\n  podSelector: {}\n  policyTypes: [Ingress]\n",
    )
    .unwrap();
    let out = c.cli(&["policy", "apply", path_str(&extra), "-m", "v2"]);
    assert!(out.ok(), "{out}");
    let files = c.identity(Role::Enforcer, "host-h");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let first = |from_version: u64, history: String| {
        let files = files.clone();
        let addr = c.addr.clone();
        rt.block_on(async move {
            let ch = ztseg_controller::server::connect(&addr, &files).await.unwrap();
            let mut s = DistributionClient::new(ch)
                .subscribe(pb::SubscribeRequest { from_version, history })
                .await
                .unwrap()
                .into_inner();
            tokio::time::timeout(Duration::from_secs(1), s.message()).await.ok().map(|m| m.unwrap().unwrap())
        })
    };
    let snap = first(0, String::new()).expect("a new subscriber gets a snapshot");
    assert!(snap.snapshot && snap.version == 2 && !snap.history.is_empty(), "{snap:?}");
    assert!(first(2, snap.history.clone()).is_none(), "a current subscriber got an update");
    let other = first(2, "0123456789abcdef0123456789abcdef".into()).expect("another history gets a snapshot");
    assert!(other.snapshot && other.version == 2 && other.upserts.len() == snap.upserts.len(), "{other:?}");
    let delta = first(1, snap.history.clone()).expect("an older version gets a delta");
    assert!(!delta.snapshot && delta.base_version == 1 && delta.upserts.len() == 1, "{delta:?}");
    assert_eq!(delta.upserts[0].name, "extra.yaml");
}

/// The CA key at rest: `init --ca-passphrase-file` stores it as a standard encrypted PKCS#8
/// file (openssl opens it with the passphrase); `run` refuses to start without the right
/// passphrase, with exit code 64 and a message saying what is missing; an existing plain key
/// can be protected, after which the controller starts with the passphrase and its CA signs.
#[test]
fn an_encrypted_ca_key_needs_its_passphrase() {
    let dir = std::env::temp_dir().join(unique("ztseg-ctl-enc-"));
    fs::create_dir_all(&dir).unwrap();
    let pass = dir.join("pass");
    fs::write(&pass, "correct horse battery staple\n").unwrap();
    let wrong = dir.join("wrong");
    fs::write(&wrong, "battery horse\n").unwrap();
    let data = dir.join("data");
    let out = ztseg_command()
        .args(["controller", "init", "--data-dir", path_str(&data), "--ca-passphrase-file", path_str(&pass)])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let key = fs::read_to_string(data.join("ca-key.pem")).unwrap();
    assert!(key.starts_with("-----BEGIN ENCRYPTED PRIVATE KEY-----") && !key.contains("BEGIN PRIVATE KEY"));
    // Interoperable: openssl decrypts it with the passphrase, to the CA certificate's key.
    let openssl = |args: &[&str]| {
        let o = Command::new("openssl").args(args).output().expect("openssl");
        assert!(o.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&o.stderr));
        String::from_utf8(o.stdout).unwrap()
    };
    let from_key = openssl(&[
        "pkey",
        "-in",
        path_str(&data.join("ca-key.pem")),
        "-passin",
        &format!("file:{}", path_str(&pass)),
        "-pubout",
    ]);
    let from_cert = openssl(&["x509", "-in", path_str(&data.join("ca.pem")), "-pubkey", "-noout"]);
    assert_eq!(from_key, from_cert);

    let run = |extra: &[&str]| {
        ztseg_command()
            .args(["controller", "run", "--listen", "127.0.0.1:0", "--data-dir", path_str(&data)])
            .args(extra)
            .output()
            .expect("run the controller")
    };
    let out = run(&[]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("ca-key.pem is encrypted") && err.contains("--ca-passphrase-file"), "{err}");
    let out = run(&["--ca-passphrase-file", path_str(&wrong)]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(err.contains("wrong passphrase"), "{err}");
    assert!(!err.contains("battery"), "no passphrase in messages: {err}");
    let _ = fs::remove_dir_all(&dir);

    // A plain key protected afterwards: the controller starts with the passphrase and signs.
    let mut c = Controller::init("protect");
    assert!(
        c.cli(&["controller", "protect-ca-key", "--data-dir", path_str(&c.data)])
            .stderr
            .contains("--new-passphrase-file")
    );
    let pass = c.root.join("pass");
    fs::write(&pass, "s3cret\n").unwrap();
    let out = c.cli(&[
        "controller",
        "protect-ca-key",
        "--data-dir",
        path_str(&c.data),
        "--new-passphrase-file",
        path_str(&pass),
    ]);
    assert!(out.ok(), "{out}");
    assert!(fs::read_to_string(c.data.join("ca-key.pem")).unwrap().contains("ENCRYPTED PRIVATE KEY"));
    c.extra = vec!["--ca-passphrase-file".into(), path_str(&pass).into()];
    c.start();
    let out = c.cli(&["controller", "token", "--role", "enforcer", "--name", "host-e", "--ttl", "1h"]);
    assert!(out.ok(), "token: {out}");
    let out = c.enroll(out.stdout.trim(), &c.root.join("host-e"), "host-e");
    assert!(out.ok() && out.stdout.contains("enrolled as spiffe://ztseg.local/enforcer/host-e"), "{out}");
    assert!(!c.log().contains("unencrypted"), "{}", c.log());
}
