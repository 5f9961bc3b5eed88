//! The etcd store against real etcd processes on loopback (fails, never skips, without etcd).

mod common;

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    time::{Duration, Instant},
};

use common::etcd_cluster::EtcdCluster;
use tokio::sync::watch;
use ztseg_controller::{
    audit,
    service::verify_chain,
    store::{
        PolicyVersion, Store, StoreError,
        contract::{self, draft, version as pv},
        etcd::EtcdStore,
    },
};

async fn connect(etcd: &EtcdCluster, prefix: &str, name: &str) -> EtcdStore {
    EtcdStore::connect(&etcd.endpoints(), prefix, name).await.expect("connecting the etcd store")
}

/// Wait until `rx` holds a value satisfying `ok`; false on timeout.
async fn wait_until<T>(rx: &mut watch::Receiver<T>, timeout: Duration, ok: impl Fn(&T) -> bool) -> bool {
    tokio::time::timeout(timeout, rx.wait_for(|v| ok(v))).await.is_ok_and(|r| r.is_ok())
}

async fn chain_ok(s: &EtcdStore) -> u64 {
    match verify_chain(s).await.expect("reading the audit chain") {
        Ok(v) => v.records,
        Err(bad) => panic!("audit chain broken: {bad}"),
    }
}

/// The store contract (as the embedded store keeps it), against etcd, plus a second instance
/// on the same prefix.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn behaves_like_the_embedded_store() {
    let etcd = EtcdCluster::start(1);
    let s = connect(&etcd, "/ztseg-basic", "a").await;
    contract::run(&s).await;

    // A second controller on the same prefix sees the first one's commits.
    let s2 = connect(&etcd, "/ztseg-basic", "b").await;
    let mut w = s2.watch_head();
    assert_eq!(*w.borrow(), 2);
    assert_eq!(s.commit(2, pv(&[("a", "w")]), draft()).await.unwrap(), (3, 3));
    assert!(wait_until(&mut w, Duration::from_secs(10), |v| *v == 3).await, "second store did not see v3");
    assert_eq!(s2.version(3).await.unwrap().unwrap().documents["a"], "w");
    assert_eq!(s2.commit(3, pv(&[("b", "1")]), draft()).await.unwrap(), (4, 4));
    let mut w1 = s.watch_head();
    assert!(wait_until(&mut w1, Duration::from_secs(10), |v| *v == 4).await, "first store did not see v4");
    assert_eq!(chain_ok(&s2).await, 4);

    // Another prefix is another store.
    let other = connect(&etcd, "/ztseg-other", "c").await;
    assert_eq!(other.head().await.unwrap(), 0);
    // Retention of the policy history keeps the same contract (on a prefix of its own).
    let retention = connect(&etcd, "/ztseg-retention", "r").await;
    contract::prune_history(&retention).await;
    drop(retention);
    // Archive-and-prune keeps the same contract (on a prefix of its own).
    let pruned = connect(&etcd, "/ztseg-prune", "p").await;
    contract::prune(&pruned).await;
    drop((s, s2, other, pruned));
    // The base and the retained chain are there for a new connection too.
    let pruned = connect(&etcd, "/ztseg-prune", "p").await;
    assert_eq!(pruned.audit_base().await.unwrap().map(|b| b.seq), Some(6));
    assert_eq!(chain_ok(&pruned).await, 3);
    drop(pruned);
    // Reconnected (the prefix's trailing slash does not matter): everything is there.
    let s = connect(&etcd, "/ztseg-basic/", "a").await;
    assert_eq!(s.head().await.unwrap(), 4);
    assert_eq!(*s.watch_head().borrow(), 4);
    assert_eq!(s.audit_head().await.unwrap().seq, 4);
    assert_eq!(s.get_meta("cursor".into()).await.unwrap().as_deref(), Some("17"));
    assert_eq!(s.enforcers().await.unwrap().len(), 1);
}

/// Large documents are stored content-addressed in chunks and come back byte for byte;
/// unchanged documents are shared between versions; a damaged blob is reported as corrupt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_policies_round_trip() {
    let etcd = EtcdCluster::start(1);
    let s = connect(&etcd, "/ztseg-large", "a").await;
    // Over 2 MiB in one document plus 300 small ones.
    let big: String = (0..60_000).fold(String::new(), |mut s, i| {
        let _ = writeln!(s, "- {{from: web-{i}, to: db, port: {}}}", i % 65_536);
        s
    });
    assert!(big.len() > 2 << 20, "{}", big.len()); // etcd refuses requests over 1.5 MiB
    let mut docs: BTreeMap<String, String> =
        (0..300).map(|i| (format!("d{i:03}.yaml"), format!("rule: {i}\n"))).collect();
    docs.insert("big.yaml".into(), big.clone());
    docs.insert("empty.yaml".into(), String::new());
    docs.insert("same.yaml".into(), "rule: 7\n".into());
    let v1 = PolicyVersion { documents: docs, ..pv(&[]) };
    let t = Instant::now();
    assert_eq!(s.commit(0, v1.clone(), draft()).await.unwrap(), (1, 1));
    eprintln!("commit of {} documents took {:?}", v1.documents.len(), t.elapsed());
    let back = s.version(1).await.unwrap().unwrap();
    assert_eq!(back.documents, v1.documents);
    // Change one small document: the big one is not rewritten, both versions read back.
    let mut v2 = v1.clone();
    v2.documents.insert("d000.yaml".into(), "rule: changed\n".into());
    let t = Instant::now();
    assert_eq!(s.commit(1, v2.clone(), draft()).await.unwrap(), (2, 2));
    eprintln!("incremental commit took {:?}", t.elapsed());
    assert_eq!(s.version(2).await.unwrap().unwrap().documents, v2.documents);
    assert_eq!(s.version(1).await.unwrap().unwrap().documents, v1.documents);

    // Damage one chunk of the big document behind the store's back.
    let sha = hex_sha256(big.as_bytes());
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    raw.put(format!("/ztseg-large/blob/{sha}/000001"), "garbage", None).await.unwrap();
    match s.version(2).await {
        Err(StoreError::Corrupt { key, .. }) => assert!(key.contains(&sha), "{key}"),
        other => panic!("expected a corrupt blob, got {other:?}"),
    }
    // A corrupt head value is reported as such.
    raw.put("/ztseg-large/head/policy", "two", None).await.unwrap();
    assert!(matches!(s.head().await, Err(StoreError::Corrupt { .. })));
}

/// How many chunks of the blob of `content` are stored under `prefix`.
async fn blob_chunks(raw: &mut etcd_client::Client, prefix: &str, content: &str) -> i64 {
    let key = format!("{prefix}/blob/{}/", hex_sha256(content.as_bytes()));
    let opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
    raw.get(key, Some(opts)).await.unwrap().count()
}

/// The `policy.prune` records at the end of the audit chain, newest last.
async fn prune_records(s: &EtcdStore) -> Vec<serde_json::Value> {
    let recs = s.audit_records(1, 10_000).await.unwrap();
    recs.iter()
        .map(|(_, b)| serde_json::from_slice::<audit::Record>(b).unwrap())
        .filter(|r| r.action == "policy.prune")
        .map(|r| r.detail)
        .collect()
}

/// A prune deletes the blobs no kept version references — those of pruned versions and
/// those a failed commit left behind — but only once they are older than the head version
/// (a commit that can still land writes newer ones); blobs of kept versions stay. More blobs
/// than fit one transaction are deleted in several steps, each with its own record.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prune_collects_unreferenced_blobs() {
    let etcd = EtcdCluster::start(1);
    let prefix = "/ztseg-gc";
    let s = connect(&etcd, prefix, "a").await;
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    assert_eq!(s.commit(0, pv(&[("a", "one"), ("keep", "k")]), draft()).await.unwrap().0, 1);
    assert_eq!(s.commit(1, pv(&[("a", "two"), ("keep", "k")]), draft()).await.unwrap().0, 2);
    // A failed commit: its blob was written, its transaction never landed.
    raw.put(format!("{prefix}/blob/{}/000000", hex_sha256(b"orphan")), "orphan", None).await.unwrap();

    // Keeping both versions deletes nothing; the orphan is newer than the head: kept for now.
    let done = s.prune_versions(2, contract::history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.blobs_removed), (0, 1, 0));
    assert_eq!(blob_chunks(&mut raw, prefix, "orphan").await, 1, "a blob newer than the head was deleted");

    // After the next commit the orphan is older than the head: collected, with version 1's blob.
    assert_eq!(s.commit(2, pv(&[("a", "three"), ("keep", "k")]), draft()).await.unwrap().0, 3);
    let done = s.prune_versions(2, contract::history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.blobs_removed), (1, 2, 2));
    for (gone, content) in [(true, "orphan"), (true, "one"), (false, "two"), (false, "three"), (false, "k")] {
        let n = blob_chunks(&mut raw, prefix, content).await;
        assert_eq!(n == 0, gone, "blob {content:?}: {n} chunks");
    }
    assert_eq!(s.version(2).await.unwrap().unwrap().documents["a"], "two");
    assert_eq!(s.version(3).await.unwrap().unwrap().documents["keep"], "k");

    // 150 orphans (more than one transaction deletes) go in two steps, two records.
    for i in 0..150 {
        let c = format!("orphan {i}");
        raw.put(format!("{prefix}/blob/{}/000000", hex_sha256(c.as_bytes())), c, None).await.unwrap();
    }
    assert_eq!(s.commit(3, pv(&[("a", "four"), ("keep", "k")]), draft()).await.unwrap().0, 4);
    let done = s.prune_versions(2, contract::history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.blobs_removed), (1, 3, 151));
    let records = prune_records(&s).await;
    let last: Vec<_> =
        records[records.len() - 2..].iter().map(|d| (&d["pruned"], &d["blobs_removed"])).collect();
    assert_eq!(last, vec![(&1.into(), &95.into()), (&0.into(), &56.into())], "{records:?}");
    let opts = etcd_client::GetOptions::new().with_prefix().with_count_only();
    let left = raw.get(format!("{prefix}/blob/"), Some(opts)).await.unwrap().count();
    assert_eq!(left, 3, "exactly the blobs of versions 3 and 4 are left");
    assert_eq!(s.version(3).await.unwrap().unwrap().documents["a"], "three");
    assert_eq!(s.version(4).await.unwrap().unwrap().documents["a"], "four");
    chain_ok(&s).await;
}

/// A commit that reuses an existing blob (without writing it) while another controller's
/// prune deletes that blob does not land pointing at nothing: the collection moved the fence
/// its transaction compares, so it checks its blobs again, rewrites the missing one and lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_racing_a_blob_collection_rewrites_its_blob() {
    let etcd = EtcdCluster::start(1);
    let prefix = "/ztseg-gc-race";
    let a = std::sync::Arc::new(connect(&etcd, prefix, "a").await);
    let b = connect(&etcd, prefix, "b").await;
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    assert_eq!(a.commit(0, pv(&[("p", "old")]), draft()).await.unwrap().0, 1);
    assert_eq!(a.commit(1, pv(&[("p", "new")]), draft()).await.unwrap().0, 2);

    // Controller a commits version 1's documents again: the blob "old" exists, so it is not
    // written. The commit stops between that check and its transaction.
    let (reached, go) = a.pause_next_commit();
    let commit = {
        let a = a.clone();
        tokio::spawn(async move { a.commit(2, pv(&[("p", "old")]), draft()).await })
    };
    reached.await.expect("the commit reaches the pause");
    assert_eq!(blob_chunks(&mut raw, prefix, "old").await, 1);
    // Meanwhile controller b prunes version 1 and collects its blob.
    let done = b.prune_versions(1, contract::history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.blobs_removed), (1, 2, 1));
    assert_eq!(blob_chunks(&mut raw, prefix, "old").await, 0, "the collection deleted the blob");

    go.send(()).unwrap();
    let (v, _) = commit.await.unwrap().expect("the commit lands after checking its blobs again");
    assert_eq!(v, 3);
    assert_eq!(blob_chunks(&mut raw, prefix, "old").await, 1, "the commit rewrote the blob it uses");
    assert_eq!(b.version(3).await.unwrap().unwrap().documents["p"], "old");
    assert_eq!(chain_ok(&b).await, 4);
}

fn hex_sha256(b: &[u8]) -> String {
    use sha2::{Digest as _, Sha256};
    hex::encode(Sha256::digest(b))
}

/// Two controllers appending and committing at the same time never fork the audit chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_writers_keep_one_chain() {
    let etcd = EtcdCluster::start(1);
    let a = std::sync::Arc::new(connect(&etcd, "/ztseg-race", "a").await);
    let b = std::sync::Arc::new(connect(&etcd, "/ztseg-race", "b").await);
    let mut tasks = Vec::new();
    for (i, s) in [a.clone(), b.clone(), a.clone(), b.clone()].into_iter().enumerate() {
        tasks.push(tokio::spawn(async move {
            let mut commits = 0u64;
            for j in 0..15 {
                let d = audit::Draft::new(
                    format!("w{i}"),
                    "test.event",
                    "success",
                    serde_json::json!({ "j": j }),
                );
                s.append_audit(vec![d.clone(), d]).await.unwrap();
                // Commits race too: each either lands or reports a conflict.
                let head = s.head().await.unwrap();
                match s.commit(head, pv(&[("a", &format!("{i}-{j}"))]), draft()).await {
                    Ok(_) => commits += 1,
                    Err(StoreError::Conflict { .. }) => {}
                    Err(e) => panic!("{e}"),
                }
            }
            commits
        }));
    }
    let mut commits = 0;
    for t in tasks {
        commits += t.await.unwrap();
    }
    // One big batch is split into several transactions, still one chain.
    let big: Vec<audit::Draft> =
        (0..250).map(|k| audit::Draft::new("bulk", "x", "success", serde_json::json!({ "k": k }))).collect();
    let last = a.append_audit(big).await.unwrap();
    let expected = 4 * 15 * 2 + commits + 250;
    assert_eq!(last, expected);
    assert_eq!(chain_ok(&a).await, expected);
    assert_eq!(b.head().await.unwrap(), commits);
    assert_eq!(b.history(1000).await.unwrap().len() as u64, commits);
}

/// A store whose runtime can be torn down to simulate a crashed controller process.
struct Instance {
    rt: Option<tokio::runtime::Runtime>,
    store: Option<EtcdStore>,
    leader: watch::Receiver<bool>,
}

impl Instance {
    fn start(etcd: &EtcdCluster, prefix: &str, name: &str) -> Self {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
        let store = rt.block_on(EtcdStore::connect(&etcd.endpoints(), prefix, name)).unwrap();
        let leader = store.leadership();
        Self { rt: Some(rt), store: Some(store), leader }
    }
    fn is_leader(&self) -> bool {
        *self.leader.borrow()
    }
    /// Like kill -9: the runtime stops without the store resigning.
    fn crash(&mut self) {
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
        self.store.take();
    }
    /// Drop the store while its runtime runs (it resigns).
    fn close(&mut self) {
        self.store.take();
    }
}

/// Wait until exactly one of `insts` is leader, for `stable` in a row; returns its index.
fn one_leader(insts: &[&Instance], timeout: Duration, stable: Duration) -> usize {
    let deadline = Instant::now() + timeout;
    let mut since: Option<(usize, Instant)> = None;
    loop {
        let leaders: Vec<usize> =
            insts.iter().enumerate().filter(|(_, i)| i.is_leader()).map(|(n, _)| n).collect();
        since = match (leaders.as_slice(), since) {
            ([n], Some((m, t))) if *n == m => Some((m, t)),
            ([n], _) => Some((*n, Instant::now())),
            _ => None,
        };
        if let Some((n, t)) = since
            && t.elapsed() >= stable
        {
            return n;
        }
        assert!(Instant::now() < deadline, "no single leader within {timeout:?} (leaders now: {leaders:?})");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn leadership_moves_when_the_leader_dies() {
    let etcd = EtcdCluster::start(1);
    let mut ctl_a = Instance::start(&etcd, "/ztseg-lead", "a");
    let mut ctl_b = Instance::start(&etcd, "/ztseg-lead", "b");
    let first = one_leader(&[&ctl_a, &ctl_b], Duration::from_secs(10), Duration::from_secs(2));
    let (dead, survivor) = if first == 0 { (&mut ctl_a, &mut ctl_b) } else { (&mut ctl_b, &mut ctl_a) };
    // Crash the leader: its lease expires (TTL 5 s) and the other takes over.
    let started = Instant::now();
    dead.crash();
    let only = one_leader(&[&*survivor], Duration::from_secs(10), Duration::ZERO);
    assert_eq!(only, 0);
    eprintln!("failover after a crash took {:?}", started.elapsed());
    // A graceful shutdown resigns at once: a third controller takes over quickly.
    let ctl_c = Instance::start(&etcd, "/ztseg-lead", "c");
    std::thread::sleep(Duration::from_secs(1));
    assert!(survivor.is_leader() && !ctl_c.is_leader(), "leadership changed without a reason");
    let started = Instant::now();
    survivor.close();
    one_leader(&[&ctl_c], Duration::from_secs(4), Duration::ZERO);
    eprintln!("failover after a resignation took {:?}", started.elapsed());
    drop(ctl_c);
}

/// Find the member that is the raft leader.
async fn raft_leader(etcd: &EtcdCluster) -> usize {
    for (i, m) in etcd.members.iter().enumerate() {
        let mut c = etcd_client::Client::connect([m.client_url.as_str()], None).await.unwrap();
        let st = c.status().await.unwrap();
        if st.leader() == st.header().unwrap().member_id() {
            return i;
        }
    }
    panic!("no raft leader");
}

/// With three members, killing one (the raft leader) does not stop commits, watches or
/// leadership on either controller.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn survives_losing_an_etcd_member() {
    let mut etcd = EtcdCluster::start(3);
    let a = std::sync::Arc::new(connect(&etcd, "/ztseg-ha", "a").await);
    let b = connect(&etcd, "/ztseg-ha", "b").await;
    assert_eq!(a.commit(0, pv(&[("p", "0")]), draft()).await.unwrap(), (1, 1));
    let (mut wa, mut wb) = (a.watch_head(), b.watch_head());
    assert!(wait_until(&mut wb, Duration::from_secs(10), |v| *v == 1).await);
    // Audit appends are in flight while the member dies: none may fail or be recorded twice.
    let (stop_tx, stop_rx) = watch::channel(false);
    let appender = {
        let a = a.clone();
        tokio::spawn(async move {
            let mut n = 0u64;
            while !*stop_rx.borrow() {
                let d = audit::Draft::new("bg", "test.event", "success", serde_json::json!({ "n": n }));
                a.append_audit(vec![d]).await.unwrap_or_else(|e| panic!("append {n} during the kill: {e}"));
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let victim = raft_leader(&etcd).await;
    etcd.kill(victim);
    let started = Instant::now();
    for v in 1..=8u64 {
        let (store, seen) = if v % 2 == 0 { (&*a, &mut wb) } else { (&b, &mut wa) };
        let got = store.commit(v, pv(&[("p", &v.to_string())]), draft()).await;
        assert_eq!(got.unwrap_or_else(|e| panic!("commit {v} after the kill: {e}")).0, v + 1);
        assert!(
            wait_until(seen, Duration::from_secs(15), |h| *h == v + 1).await,
            "the other store did not see version {}",
            v + 1
        );
    }
    eprintln!("8 commits after losing the raft leader took {:?}", started.elapsed());
    stop_tx.send_replace(true);
    let background = appender.await.unwrap();
    assert!(background > 0);
    assert_eq!(chain_ok(&b).await, 9 + background);
    let (la, lb) = (a.leadership(), b.leadership());
    let deadline = Instant::now() + Duration::from_secs(15);
    while *la.borrow() == *lb.borrow() {
        assert!(Instant::now() < deadline, "not exactly one leader after the member loss");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(b.version(9).await.unwrap().unwrap().documents["p"], "8");
}

/// etcd with `--client-cert-auth` over TLS: the store connects with the CA and a client
/// certificate; without the client certificate, or over plain HTTP, it cannot.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connects_over_mutual_tls_only_with_a_client_certificate() {
    use ztseg_controller::{
        auth::Role,
        pki::{Ca, write_private},
        store::etcd::EtcdTls,
    };
    struct Kill(std::process::Child, std::path::PathBuf);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
            let _ = std::fs::remove_dir_all(&self.1);
        }
    }
    let dir = std::env::temp_dir().join(format!("ztseg-etcd-tls-{}", common::etcd_cluster::unique_name()));
    std::fs::create_dir_all(&dir).unwrap();
    let ca = Ca::generate("etcd.test").unwrap();
    let server = ca.issue_server(&["127.0.0.1".into()], Duration::from_hours(1)).unwrap();
    let client = ca.issue_client(Role::Admin, "controller", Duration::from_hours(1)).unwrap();
    std::fs::write(dir.join("ca.pem"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("server.pem"), &server.cert_pem).unwrap();
    write_private(&dir.join("server-key.pem"), server.key_pem.as_bytes()).unwrap();
    std::fs::write(dir.join("client.pem"), &client.cert_pem).unwrap();
    write_private(&dir.join("client-key.pem"), client.key_pem.as_bytes()).unwrap();
    let ports = common::etcd_cluster::free_ports(2);
    let (client_url, peer_url) =
        (format!("https://127.0.0.1:{}", ports[0]), format!("http://127.0.0.1:{}", ports[1]));
    let p = |f: &str| dir.join(f).display().to_string();
    let child = std::process::Command::new(common::etcd_cluster::etcd_binary())
        .args(["--name", "m0", "--data-dir", &p("m0.etcd")])
        .args(["--listen-client-urls", &client_url, "--advertise-client-urls", &client_url])
        .args(["--listen-peer-urls", &peer_url, "--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("m0={peer_url}")])
        .args(["--cert-file", &p("server.pem"), "--key-file", &p("server-key.pem")])
        .args(["--trusted-ca-file", &p("ca.pem"), "--client-cert-auth"])
        .stdout(std::fs::File::create(dir.join("etcd.log")).unwrap())
        .stderr(std::fs::File::create(dir.join("etcd.err")).unwrap())
        .spawn()
        .expect("starting etcd");
    let _guard = Kill(child, dir.clone());
    let tls = EtcdTls {
        ca: dir.join("ca.pem"),
        identity: Some((dir.join("client.pem"), dir.join("client-key.pem"))),
    };
    let endpoints = vec![client_url.clone()];
    let t = std::time::Instant::now();
    let store = loop {
        match EtcdStore::connect_with(&endpoints, "/tls", "c1", Some(&tls)).await {
            Ok(s) => break s,
            Err(e) => {
                assert!(
                    t.elapsed() < Duration::from_mins(1),
                    "TLS etcd not reachable: {e:#}\n{}",
                    std::fs::read_to_string(dir.join("etcd.err")).unwrap_or_default()
                );
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
        }
    };
    assert_eq!(store.commit(0, pv(&[("a.yaml", "x")]), draft()).await.unwrap().0, 1);
    assert_eq!(store.version(1).await.unwrap().unwrap().documents["a.yaml"], "x");
    drop(store);

    // Without a client certificate etcd refuses the connection.
    let anonymous = EtcdTls { ca: dir.join("ca.pem"), identity: None };
    let r = tokio::time::timeout(
        Duration::from_secs(30),
        EtcdStore::connect_with(&endpoints, "/tls", "c2", Some(&anonymous)),
    )
    .await
    .expect("a refused connection must fail, not hang");
    assert!(r.is_err(), "etcd accepted a client without a certificate");
    // https:// without a CA, and TLS with http:// endpoints, are configuration errors.
    let e = EtcdStore::connect_with(&endpoints, "/tls", "c3", None).await.err().unwrap();
    assert!(format!("{e:#}").contains("needs the etcd CA"), "{e:#}");
    let e = EtcdStore::connect_with(&["http://127.0.0.1:1".to_owned()], "/tls", "c4", Some(&tls))
        .await
        .err()
        .unwrap();
    assert!(format!("{e:#}").contains("needs https://"), "{e:#}");
}

/// Wait (at most 15 s) until reading `key` at revision `old` is refused as compacted.
async fn wait_compacted(raw: &mut etcd_client::Client, key: &str, old: i64) {
    let t = Instant::now();
    let at_old = etcd_client::GetOptions::new().with_revision(old);
    loop {
        match raw.get(key, Some(at_old.clone())).await {
            Ok(_) => {}
            Err(e) if e.to_string().contains("required revision has been compacted") => return,
            Err(e) => panic!("reading at revision {old}: {e}"),
        }
        assert!(t.elapsed() < Duration::from_secs(15), "revision {old} not compacted within 15 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Leader-only compaction of etcd's history (`--etcd-compaction-interval`, here 2 s): once
/// the leader has compacted past a revision, reading at it is refused as compacted; the
/// current state is whole (head, every version, the audit chain); a watcher that starts less
/// than one interval behind is not cut off; the running store's head watch and a fresh
/// store's follow commits made after the compaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_leader_compacts_etcd_history_one_interval_behind() {
    let etcd = EtcdCluster::start(1);
    let s = connect(&etcd, "/ztseg-compact", "a").await;
    let mut leader = s.leadership();
    assert!(wait_until(&mut leader, Duration::from_secs(15), |l| *l).await, "a is not the leader");
    let interval = Duration::from_secs(2);
    s.compact_history_every(interval);
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let key = "/ztseg-compact/head/policy";
    let revision = |r: &etcd_client::GetResponse| r.header().unwrap().revision();

    assert_eq!(s.commit(0, pv(&[("a", "1")]), draft()).await.unwrap(), (1, 1));
    let old = revision(&raw.get(key, None).await.unwrap());
    for v in 1..5 {
        s.commit(v, pv(&[("a", &(v + 1).to_string())]), draft()).await.unwrap();
    }
    let t = Instant::now();
    wait_compacted(&mut raw, key, old).await;
    eprintln!("revision {old} compacted {:?} after the last commit", t.elapsed());

    // A watcher half an interval behind is served from where it asks.
    let recent = revision(&raw.get(key, None).await.unwrap());
    tokio::time::sleep(interval / 2).await;
    let mut ws = raw
        .watch(key, Some(etcd_client::WatchOptions::new().with_start_revision(recent)))
        .await
        .expect("watching from half an interval ago");
    assert_eq!(s.commit(5, pv(&[("a", "6")]), draft()).await.unwrap(), (6, 6));
    let saw_6 = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            let m = ws.message().await.unwrap().expect("watch stream open");
            assert!(!m.canceled(), "cut off: compacted to {}", m.compact_revision());
            if m.events().iter().any(|e| e.kv().is_some_and(|kv| kv.value() == b"6")) {
                return;
            }
        }
    })
    .await;
    assert!(saw_6.is_ok(), "the watcher did not see version 6");

    // The present is whole.
    assert_eq!(s.head().await.unwrap(), 6);
    for v in 1..=6 {
        assert_eq!(s.version(v).await.unwrap().unwrap().documents["a"], v.to_string(), "version {v}");
    }
    assert_eq!(chain_ok(&s).await, 6);
    // A fresh store (fresh reads and watches) and the running one follow each other's commits.
    let b = connect(&etcd, "/ztseg-compact", "b").await;
    assert_eq!(*b.watch_head().borrow(), 6);
    let (mut wa, mut wb) = (s.watch_head(), b.watch_head());
    assert_eq!(b.commit(6, pv(&[("a", "7")]), draft()).await.unwrap(), (7, 7));
    assert!(wait_until(&mut wa, Duration::from_secs(10), |v| *v == 7).await, "a did not see v7");
    assert_eq!(s.commit(7, pv(&[("a", "8")]), draft()).await.unwrap(), (8, 8));
    assert!(wait_until(&mut wb, Duration::from_secs(10), |v| *v == 8).await, "b did not see v8");
    assert_eq!(chain_ok(&b).await, 8);
}

/// Only the leader compacts: a follower with compaction on leaves etcd's history alone while
/// another controller leads (here one with compaction off), and starts compacting once it has
/// taken over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_follower_does_not_compact_until_it_leads() {
    let etcd = EtcdCluster::start(1);
    let a = connect(&etcd, "/ztseg-compact-f", "a").await;
    let mut a_leads = a.leadership();
    assert!(wait_until(&mut a_leads, Duration::from_secs(15), |l| *l).await, "a is not the leader");
    let b = connect(&etcd, "/ztseg-compact-f", "b").await;
    let interval = Duration::from_secs(1);
    b.compact_history_every(interval);
    let mut raw = etcd_client::Client::connect(etcd.endpoints(), None).await.unwrap();
    let key = "/ztseg-compact-f/head/policy";
    assert_eq!(a.commit(0, pv(&[("a", "1")]), draft()).await.unwrap(), (1, 1));
    let old = raw.get(key, None).await.unwrap().header().unwrap().revision();
    for v in 1..4 {
        a.commit(v, pv(&[("a", &(v + 1).to_string())]), draft()).await.unwrap();
    }
    let at_old = etcd_client::GetOptions::new().with_revision(old);
    // Four intervals with b following: nothing compacted.
    tokio::time::sleep(interval * 4).await;
    assert!(!*b.leadership().borrow(), "b took over while a was alive");
    raw.get(key, Some(at_old.clone())).await.expect("history kept while a follower has compaction on");

    // a resigns; b leads and compacts past the old revision within a few intervals.
    drop(a);
    let mut b_leads = b.leadership();
    assert!(wait_until(&mut b_leads, Duration::from_secs(15), |l| *l).await, "b did not take over");
    b.commit(4, pv(&[("a", "5")]), draft()).await.unwrap();
    wait_compacted(&mut raw, key, old).await;
    assert_eq!(b.head().await.unwrap(), 5);
    assert_eq!(chain_ok(&b).await, 5);
}
