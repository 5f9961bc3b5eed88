//! `cargo xtask bench control`: policy propagation through the controller.
//!
//! A `ztseg lab` with a controller and three simulated hosts (three real enforcers, each with
//! its own data plane), plus simulated subscribers — in-process Distribution clients with
//! enforcer certificates that decode every update, assemble its document set and report
//! the version — up to 100 in all. Each round applies a change of 10,000 rules (one policy whose
//! ingress lists 10,000 ports, alternating between two port ranges, so every round replaces
//! all 10,000 data-plane entries on every host) and times, from the Apply call: the commit,
//! and the moment the last real enforcer and the last simulated subscriber reports it
//! enforced.
//!
//! Writes `target/bench/control.json` and its section of `docs/benchmarks.md`.
#![forbid(unsafe_code)]

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;
use ztseg_api::controller as pb;
use ztseg_controller::{auth::Role, pki};

const LAB: &str = "bctl";
const HOSTS: [&str; 3] = ["h1", "h2", "h3"];
const SUBSCRIBERS: usize = 100;
const RULES: u32 = 10_000;
const ROUNDS: u32 = 5;

#[derive(Serialize)]
struct Round {
    version: u64,
    rules: u32,
    document_bytes: usize,
    commit_ms: f64,
    first_enforcer_ms: f64,
    last_enforcer_ms: f64,
    last_simulated_ms: f64,
    all_ms: f64,
}

#[derive(Serialize)]
struct Report {
    real_enforcers: usize,
    simulated_subscribers: usize,
    rounds: Vec<Round>,
    all_ms_p50: f64,
    all_ms_max: f64,
}

fn policy(round: u32) -> String {
    let base = if round.is_multiple_of(2) { 1_000 } else { 20_000 };
    let mut s = String::from(
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: bench, namespace: x}\n\
         spec:\n  podSelector: {}\n  ingress:\n    - from: [{podSelector: {matchLabels: {pod: a}}}]\n      ports:\n",
    );
    for p in base..base + RULES {
        let _ = writeln!(s, "        - {{port: {p}}}");
    }
    s
}

fn sh(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Simulated subscriber `i`: subscribe, decode, validate, report; signal each version.
async fn simulated(
    endpoint: String,
    files: pki::ClientFiles,
    seen: tokio::sync::mpsc::UnboundedSender<(usize, u64, Instant)>,
    i: usize,
) -> Result<()> {
    let ch = ztseg_controller::server::connect(&endpoint, &files).await?;
    let mut c = pb::distribution_client::DistributionClient::new(ch).max_decoding_message_size(256 << 20);
    let mut stream =
        c.subscribe(pb::SubscribeRequest { from_version: 0, history: String::new() }).await?.into_inner();
    let mut docs: BTreeMap<String, String> = BTreeMap::new();
    while let Some(u) = stream.message().await? {
        if u.snapshot {
            docs.clear();
        }
        for r in &u.removes {
            docs.remove(r);
        }
        for d in u.upserts {
            docs.insert(d.name, d.content);
        }
        if docs.values().any(String::is_empty) {
            bail!("subscriber {i}: empty document in version {}", u.version);
        }
        c.report(pb::ReportRequest {
            enforced_version: u.version,
            policy_error: String::new(),
            denied: vec![],
        })
        .await?;
        let _ = seen.send((i, u.version, Instant::now()));
    }
    Ok(())
}

async fn host_version(host: &str) -> Result<u64> {
    let sock = PathBuf::from(format!("/run/ztseg/lab/{LAB}/{host}.sock"));
    let mut c = ztseg::client::connect(&sock).await?;
    Ok(c.status(ztseg_api::enforcer::StatusRequest {}).await?.into_inner().controller_version)
}

/// Reports of simulated subscribers: (subscriber, version, when).
type Seen = tokio::sync::mpsc::UnboundedReceiver<(usize, u64, Instant)>;

/// Start the simulated subscribers; returns their number and the channel of (subscriber,
/// version, when) they report on.
fn spawn_simulated(data_dir: &Path, work: &Path, endpoint: &str) -> Result<(usize, Seen)> {
    let ca = pki::Ca::load(data_dir, None)?;
    let sim = SUBSCRIBERS - HOSTS.len();
    let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
    // Every identity is written before any subscriber starts (they share ca.pem).
    let mut identities = Vec::new();
    for i in 0..sim {
        let files = pki::ClientFiles::in_dir(&work.join("sim"), &format!("sim-{i}"));
        files.save(
            &ca.issue_client(Role::Enforcer, &format!("sim-{i}"), Duration::from_hours(1))?,
            &ca.cert_pem,
        )?;
        identities.push(files);
    }
    for (i, files) in identities.into_iter().enumerate() {
        let tx = tx.clone();
        let ep = endpoint.to_owned();
        tokio::spawn(async move {
            if let Err(e) = simulated(ep, files, tx, i).await {
                eprintln!("simulated subscriber {i}: {e:#}");
            }
        });
    }
    Ok((sim, rx))
}

async fn measure(data_dir: &Path, work: &Path) -> Result<Report> {
    let endpoint = "10.75.0.1:7443".to_owned();
    let admin = pki::ClientFiles::in_dir(&data_dir.join("admin"), "admin");
    let (sim, mut rx) = spawn_simulated(data_dir, work, &endpoint)?;
    let mut policy_client =
        pb::policy_client::PolicyClient::new(ztseg_controller::server::connect(&endpoint, &admin).await?)
            .max_encoding_message_size(64 << 20);
    // Everyone at the current version before the first round.
    let mut latest: Vec<u64> = vec![0; sim];
    let current = policy_client.get(pb::GetRequest { version: 0 }).await?.into_inner().version;
    let deadline = Instant::now() + Duration::from_secs(30);
    while latest.iter().any(|v| *v < current) {
        if let Ok(Some((i, v, _))) = tokio::time::timeout(Duration::from_secs(1), rx.recv()).await {
            latest[i] = v;
        }
        if Instant::now() > deadline {
            bail!("simulated subscribers did not reach version {current}");
        }
    }
    let mut rounds = Vec::new();
    for round in 0..ROUNDS {
        let doc = policy(round);
        let bytes = doc.len();
        let docs = vec![pb::Document { name: "bench.yaml".into(), content: doc }];
        let t0 = Instant::now();
        let r = policy_client
            .apply(pb::ApplyRequest {
                documents: docs,
                expected_version: 0,
                message: format!("bench round {round}"),
                dry_run: false,
            })
            .await?
            .into_inner();
        let commit = t0.elapsed();
        let v = r.version;
        // Real enforcers: poll their status (controller version enforced) every millisecond.
        let mut host_done: Vec<Option<Duration>> = vec![None; HOSTS.len()];
        let mut sim_done: Vec<Option<Duration>> = vec![None; sim];
        let deadline = t0 + Duration::from_mins(1);
        while host_done.iter().any(Option::is_none) || sim_done.iter().any(Option::is_none) {
            while let Ok((i, ver, at)) = rx.try_recv() {
                if ver >= v && sim_done[i].is_none() {
                    sim_done[i] = Some(at - t0);
                }
            }
            for (h, host) in HOSTS.iter().enumerate() {
                if host_done[h].is_none() && host_version(host).await? >= v {
                    host_done[h] = Some(t0.elapsed());
                }
            }
            if Instant::now() > deadline {
                bail!("round {round}: not every subscriber reached version {v} in 60 s");
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        let hosts: Vec<Duration> = host_done.into_iter().flatten().collect();
        let sims: Vec<Duration> = sim_done.into_iter().flatten().collect();
        let last_host = hosts.iter().max().copied().unwrap_or_default();
        let last_sim = sims.iter().max().copied().unwrap_or_default();
        let row = Round {
            version: v,
            rules: RULES,
            document_bytes: bytes,
            commit_ms: ms(commit),
            first_enforcer_ms: ms(hosts.iter().min().copied().unwrap_or_default()),
            last_enforcer_ms: ms(last_host),
            last_simulated_ms: ms(last_sim),
            all_ms: ms(last_host.max(last_sim)),
        };
        eprintln!(
            "round {round}: version {v}: commit {:.0} ms, enforcers {:.0}..{:.0} ms, simulated {:.0} ms",
            row.commit_ms, row.first_enforcer_ms, row.last_enforcer_ms, row.last_simulated_ms
        );
        rounds.push(row);
    }
    let mut all: Vec<f64> = rounds.iter().map(|r| r.all_ms).collect();
    all.sort_by(f64::total_cmp);
    Ok(Report {
        real_enforcers: HOSTS.len(),
        simulated_subscribers: sim,
        all_ms_p50: all[all.len() / 2],
        all_ms_max: all[all.len() - 1],
        rounds,
    })
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let root = PathBuf::from(args.next().context("usage: bench-control ROOT ZTSEG")?);
    let ztseg = PathBuf::from(args.next().context("usage: bench-control ROOT ZTSEG")?);
    ztseg_integration::require_root();
    let work = std::env::temp_dir().join(format!("ztseg-bench-control-{}", std::process::id()));
    std::fs::create_dir_all(work.join("policies"))?;
    std::fs::write(work.join("policies/bench.yaml"), policy(1))?;
    let lab = work.join("lab.yaml");
    std::fs::write(
        &lab,
        format!(
            "name: {LAB}\nhosts: [{}]\ncontroller: true\nnamespaces:\n  - {{name: x}}\npods:\n{}ports: [80]\n\
             protocols: [TCP]\npolicies: [policies]\n",
            HOSTS.join(", "),
            ["a", "b", "c"].iter().zip(HOSTS).fold(String::new(), |mut o, (p, h)| {
                let _ = writeln!(o, "  - {{name: {p}, namespace: x, labels: {{pod: {p}}}, host: {h}}}");
                o
            })
        ),
    )?;
    let lab_s = lab.display().to_string();
    let _ = Command::new(&ztseg).args(["lab", "down", "-f", &lab_s]).output();
    sh(Command::new(&ztseg).args(["lab", "up", "-f", &lab_s]))?;
    let data_dir = PathBuf::from(format!("/run/ztseg/lab/{LAB}/controller"));
    let result = ztseg::lab::in_netns(&format!("zl-{LAB}-ctl"), || {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()?
            .block_on(measure(&data_dir, &work))
    });
    if result.is_err() {
        for h in HOSTS.iter().map(|h| format!("{h}.log")).chain(["controller.log".to_owned()]) {
            let log = std::fs::read_to_string(format!("/run/ztseg/lab/{LAB}/{h}")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            eprintln!("--- {h} (last lines)\n{}", tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
        }
    }
    let _ = Command::new(&ztseg).args(["lab", "down", "-f", &lab_s]).output();
    let _ = std::fs::remove_dir_all(&work);
    let report = result?;

    let out = root.join("target/bench");
    std::fs::create_dir_all(&out)?;
    std::fs::write(out.join("control.json"), serde_json::to_vec_pretty(&report)?)?;
    let mut md = String::from(
        "## Control plane: policy propagation (`cargo xtask bench control`)\n\n\
         A lab with a controller (embedded store) and 3 hosts, each a real enforcer with its own data plane, plus \
         simulated subscribers (Distribution clients with enforcer certificates that decode every version, \
         assemble its documents and report it) for 100 subscribers in all. Each round applies one policy of 10,000 ingress port rules \
         (alternating between two port ranges, so every round replaces all 10,000 entries on every host) and times \
         from the Apply call until every subscriber reports the new version enforced. Target ≤ 1 s.\n\n\
         | round | version | commit ms | first enforcer ms | last enforcer ms | last simulated ms | all ms |\n\
         |---|---|---|---|---|---|---|\n",
    );
    for (i, r) in report.rounds.iter().enumerate() {
        let _ = writeln!(
            md,
            "| {i} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
            r.version, r.commit_ms, r.first_enforcer_ms, r.last_enforcer_ms, r.last_simulated_ms, r.all_ms
        );
    }
    let _ = writeln!(
        md,
        "\np50 {:.0} ms, max {:.0} ms ({} real enforcers + {} simulated subscribers).",
        report.all_ms_p50, report.all_ms_max, report.real_enforcers, report.simulated_subscribers
    );
    ztseg_benches::write_section(&root, "control", &md)?;
    println!("wrote {} and docs/benchmarks.md", out.join("control.json").display());
    Ok(())
}
