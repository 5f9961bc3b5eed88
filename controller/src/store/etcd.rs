//! The etcd store (HA): several controllers share one etcd cluster.
//!
//! Every controller of a deployment connects to the same etcd cluster with the same key
//! prefix. Writes that must be atomic are single etcd transactions guarded by compare
//! operations (optimistic concurrency), so controllers never overwrite each other's work.
//!
//! # Key layout (all under `<prefix>`, e.g. `/ztseg`)
//!
//! | key                                  | value                                              |
//! |--------------------------------------|----------------------------------------------------|
//! | `/head/policy`                       | current policy version, decimal                    |
//! | `/head/audit`                        | JSON [`audit::Head`] of the last audit record      |
//! | `/head/audit-base`                   | JSON [`audit::Head`] of the last pruned record     |
//! | `/head/blob-gc`                      | the blob collection fence (its mod revision)       |
//! | `/versions/<v, 20 digits>`           | JSON `{meta, documents: name → sha256}`             |
//! | `/blob/<sha256>/<chunk, 6 digits>`   | document content, in chunks of at most 512 KiB     |
//! | `/audit/<seq, 20 digits>`            | the sealed audit record, byte for byte             |
//! | `/tokens/<hash>`                     | JSON [`JoinToken`]                                 |
//! | `/enforcers/<name>`                  | JSON [`EnforcerRecord`]                            |
//! | `/meta/<key>`                        | named values ([`Store::get_meta`])                 |
//! | `/leader`                            | name of the leader, bound to its lease             |
//!
//! Zero-padded numbers make etcd's key order the numeric order, so range reads return versions
//! and audit records in sequence.
//!
//! # Policy versions are content-addressed
//!
//! A 10,000-rule policy is 1–2 MB of YAML; etcd refuses requests over 1.5 MiB by default
//! (`--max-request-bytes`) and keeps every revision of a key until compaction. So a version
//! record holds only the SHA-256 of each document, and the contents live under
//! `/blob/<sha256>/`, written *before* the commit transaction and never changed afterwards.
//! Unchanged documents are not written again (their hash is already referenced by the parent
//! version, or all their chunks exist), so a commit that edits one document of a large policy
//! moves a few kilobytes. A blob is split into chunks so that no single request exceeds the
//! limit. Reading a version reassembles the documents and checks each against its hash (a
//! mismatch is [`StoreError::Corrupt`]). A commit that fails after writing its blobs leaves
//! them behind, reused by the next commit of the same content or collected by a prune.
//!
//! # Pruning the history and collecting blobs
//!
//! [`Store::prune_versions`] reads the heads, every version record and every blob key in one
//! request, then in one transaction guarded by the policy head and audit head revisions: one
//! range delete of the versions before the first kept one, the deletion of up to 95 blobs
//! (`GC_BATCH`) that are collectable, a rewrite of the fence `/head/blob-gc` if any blob goes,
//! and the `policy.prune` audit record with the new audit head. A blob is collectable if no
//! kept version references it *and* every chunk of it was written before the current policy
//! head was committed (mod revision below that of `/head/policy`). The second rule is the
//! grace period: a commit that can still land read the current head before writing, so every
//! blob it writes is newer; orphans of a failed commit go with the first prune after the next
//! commit. More collectable blobs than one transaction takes are deleted in further
//! transactions, each with its own `policy.prune` record (`pruned` 0), each consistent.
//!
//! The race: a commit reuses a blob that exists (it does not rewrite it) while a prune deletes
//! it. A commit reads the fence with the heads *before* checking which blobs exist, and its
//! transaction compares the fence's mod revision (and the audit head's, which the prune
//! record moves too); if a collection ran in between, the commit fails its compare, checks its
//! blobs again — rewriting the deleted ones — and retries. So a version never lands pointing
//! at a deleted blob. Blobs the parent version references are not checked (the parent is the
//! head, which every collection keeps). One fence rather than a compare per blob keeps a
//! commit of a policy with hundreds of documents within etcd's 128 operations per
//! transaction.
//!
//! # Commits and the audit chain
//!
//! A commit is one transaction: *if* the policy head and the audit head still have the mod
//! revisions read a moment ago, *then* put the version record, the new policy head, the sealed
//! audit record and the new audit head. If the policy head moved the caller gets
//! [`StoreError::Conflict`]; if only the audit head moved (another controller appended audit
//! records), the record is resealed on the new head and the transaction retried. Appends use
//! the same compare-and-swap on the audit head, so concurrent controllers can never fork the
//! chain. Large batches of audit drafts are appended in several transactions of at most 100
//! records (etcd's default `--max-txn-ops` is 128); each keeps the chain intact.
//!
//! A prune (archive, then delete old audit records) reads and checks the records to delete,
//! then writes in one transaction guarded by the same compare on the audit head (and on the
//! last record to delete, which it names by hash): the `audit.prune` record, the new audit
//! head, the new base (`/head/audit-base`) and one range delete of `/audit/<first>` up to
//! `/audit/<before>` — five operations, however many records go. If the head moved, the
//! check is repeated on the new chain. Deleted records stay in etcd's history until it is
//! compacted (see below); space is reclaimed then (and by a defragmentation).
//!
//! If a write transaction fails in a way that leaves its outcome unknown (the member died
//! mid-request, a timeout), the retry first checks whether the audit record it tried to
//! write is stored byte for byte — a sealed record names its sequence, predecessor hash,
//! time and content, so that identifies the earlier attempt — and reports that attempt's
//! success instead of writing again. Taking a join token is a single atomic delete; if its
//! response is lost the token is consumed and the caller sees "no such token" (never twice).
//!
//! # Watches and leadership
//!
//! A background task watches `/head/policy` (starting right after the revision at which it
//! read the head, so no change is missed; re-established with a fresh read after any error or
//! when the stream goes quiet and does not answer a progress request) and feeds
//! [`Store::watch_head`]. Another task campaigns for leadership: it holds a lease (TTL 5 s,
//! kept alive every ~1.7 s) and creates `/leader` bound to that lease only if the key does
//! not exist. The holder is leader; the others watch the key and try again when it is
//! deleted — when the leader resigns (store dropped: its lease is revoked) or dies (its lease
//! expires within 5 s). Leadership is dropped the moment a keep-alive fails or goes
//! unanswered (at most ~3.2 s after the last successful one, so before the lease can expire on
//! the server).
//!
//! # Compaction of etcd's history
//!
//! etcd keeps every revision of every key (each commit, report, audit record and the deleted
//! versions, blobs and records of a prune) until it is compacted. With
//! [`EtcdStore::compact_history_every`] (`--etcd-compaction-interval`) the leader samples the
//! cluster's revision every interval and compacts to the sample it took one interval earlier,
//! so a watcher less than one interval behind the present is never cut off. Samples are the
//! leader's own: a controller that becomes leader compacts for the first time one interval
//! later; a failed sample or compaction is logged and the next round compacts to an older
//! (still safe) revision; a compaction to a revision that is already compacted (by another
//! leader or etcd's own `--auto-compaction-*`) is not an error. The store never reads at a past
//! revision, and both watches (policy head, leader key) start at the revision of a fresh read:
//! a watch canceled because its start was compacted is re-established with a new read.
//! Compaction frees space inside etcd's database; the file shrinks only when a member is
//! defragmented (`etcdctl defrag`), which ztseg leaves to the operator.
//!
//! # Failures
//!
//! All endpoints are given to the client, which balances requests over them; a request that
//! fails because a member is down or the cluster is electing a leader is retried (bounded,
//! with backoff) and usually lands on a live member. Connect timeout 2 s, request timeout
//! 5 s, so a dead or hung member cannot block a call for long.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    time::{Duration, Instant},
};

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, EventType, GetOptions, GetResponse, KeyValue,
    KvClient, PutOptions, SortOrder, SortTarget, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use tokio::sync::watch;

use super::{
    BoxFut, EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta, VersionsPruned,
};
use crate::audit;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a call keeps retrying transient failures (member down, leader election).
const RETRY_BUDGET: Duration = Duration::from_secs(15);
/// Attempts of a commit or append transaction when other controllers keep moving the audit
/// head.
const CAS_ATTEMPTS: u32 = 50;
/// Largest piece of a document in one key.
const CHUNK: usize = 512 << 10;
/// Payload and operation limits of one write transaction (etcd defaults: 1.5 MiB, 128 ops).
const TXN_BYTES: usize = 1 << 20;
const TXN_OPS: usize = 100;
/// Blobs read or checked in one transaction.
const READ_BATCH: usize = 16;
/// Blobs deleted in one prune transaction (besides the version range delete, the fence and
/// the audit record and head).
const GC_BATCH: usize = TXN_OPS - 5;
/// Largest response the client accepts (audit pages, versions).
const MAX_DECODE: usize = 128 << 20;
const LEASE_TTL_S: i64 = 5;
const KEEPALIVE_EVERY: Duration = Duration::from_millis(1666);
const KEEPALIVE_TIMEOUT: Duration = Duration::from_millis(1500);
/// A follower re-checks the leader key this often even without a watch event.
const LEADER_RECHECK: Duration = Duration::from_secs(3);
/// The head watch asks for progress this often and re-establishes itself if nothing arrives
/// for `WATCH_SILENCE`.
const WATCH_PROGRESS_EVERY: Duration = Duration::from_secs(5);
const WATCH_SILENCE: Duration = Duration::from_secs(12);
/// Default of `--etcd-compaction-interval`: how long etcd's history is kept behind the present.
pub const DEFAULT_COMPACTION_INTERVAL: Duration = Duration::from_mins(5);
/// A background task that ran this long before failing counts as healthy again (its next
/// failure is logged and retried quickly).
const TASK_HEALTHY: Duration = Duration::from_secs(10);

/// The key names under one prefix.
#[derive(Debug, Clone)]
struct Keys {
    prefix: String,
}

impl Keys {
    fn heads(&self) -> String {
        format!("{}/head/", self.prefix)
    }
    fn policy_head(&self) -> String {
        format!("{}/head/policy", self.prefix)
    }
    fn audit_head(&self) -> String {
        format!("{}/head/audit", self.prefix)
    }
    fn versions(&self) -> String {
        format!("{}/versions/", self.prefix)
    }
    fn version(&self, v: u64) -> String {
        format!("{}/versions/{v:020}", self.prefix)
    }
    fn blob(&self, sha: &str) -> String {
        format!("{}/blob/{sha}/", self.prefix)
    }
    fn blobs(&self) -> String {
        format!("{}/blob/", self.prefix)
    }
    /// The blob collection fence: every transaction that deletes blobs rewrites it.
    fn blob_gc(&self) -> String {
        format!("{}/head/blob-gc", self.prefix)
    }
    fn blob_chunk(&self, sha: &str, i: usize) -> String {
        format!("{}/blob/{sha}/{i:06}", self.prefix)
    }
    fn audits(&self) -> String {
        format!("{}/audit/", self.prefix)
    }
    fn audit_base(&self) -> String {
        format!("{}/head/audit-base", self.prefix)
    }
    fn audit(&self, seq: u64) -> String {
        format!("{}/audit/{seq:020}", self.prefix)
    }
    /// The end of the audit range: `/audit0` follows every `/audit/…` key.
    fn audit_end(&self) -> String {
        format!("{}/audit0", self.prefix)
    }
    fn token(&self, hash: &str) -> String {
        format!("{}/tokens/{hash}", self.prefix)
    }
    fn enforcers(&self) -> String {
        format!("{}/enforcers/", self.prefix)
    }
    fn enforcer(&self, name: &str) -> String {
        format!("{}/enforcers/{name}", self.prefix)
    }
    fn meta(&self, key: &str) -> String {
        format!("{}/meta/{key}", self.prefix)
    }
    fn leader(&self) -> String {
        format!("{}/leader", self.prefix)
    }
}

/// What a version key holds: the metadata and the hash of each document.
#[derive(Debug, Serialize, Deserialize)]
struct StoredVersion {
    meta: VersionMeta,
    documents: BTreeMap<String, String>,
}

/// Both heads, read in one request, with the mod revisions the next transaction compares.
#[derive(Debug)]
struct Heads {
    policy: u64,
    policy_rev: i64,
    audit: audit::Head,
    audit_rev: i64,
    /// Mod revision of the blob collection fence (0 before the first collection).
    gc_rev: i64,
}

/// What a prune of the policy history reads, in one consistent request.
#[derive(Debug)]
struct HistoryView {
    heads: Heads,
    /// Every stored version: number → the hashes of its documents.
    versions: BTreeMap<u64, BTreeSet<String>>,
    /// Every stored blob: sha256 → the newest mod revision among its chunks.
    blobs: BTreeMap<String, i64>,
}

/// A pause point inside a commit, for tests: (tell the test it was reached, wait for it).
type Pause = (tokio::sync::oneshot::Sender<()>, tokio::sync::oneshot::Receiver<()>);

pub struct EtcdStore {
    kv: KvClient,
    keys: Keys,
    head: watch::Sender<u64>,
    leader: watch::Sender<bool>,
    /// Dropped with the store: the background tasks see it and stop (the leader resigns).
    stop: watch::Sender<()>,
    /// See [`EtcdStore::pause_next_commit`].
    pause: std::sync::Mutex<Option<Pause>>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").field("prefix", &self.keys.prefix).finish_non_exhaustive()
    }
}

fn be(what: &str, e: &etcd_client::Error) -> StoreError {
    StoreError::Backend(format!("etcd {what}: {e}"))
}

fn corrupt(key: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), message: e.to_string() }
}

fn json<T: Serialize>(v: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(v).map_err(StoreError::backend)
}

fn parse<T: serde::de::DeserializeOwned>(kv: &KeyValue) -> Result<T, StoreError> {
    serde_json::from_slice(kv.value()).map_err(|e| corrupt(String::from_utf8_lossy(kv.key()), e))
}

fn parse_u64(kv: &KeyValue) -> Result<u64, StoreError> {
    std::str::from_utf8(kv.value())
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| corrupt(String::from_utf8_lossy(kv.key()), "not a number"))
}

/// The rest of `kv`'s key after `base` (a key prefix), if it is UTF-8.
fn key_below<'a>(kv: &'a KeyValue, base: &str) -> Option<&'a str> {
    kv.key().strip_prefix(base.as_bytes()).and_then(|s| std::str::from_utf8(s).ok())
}

fn sha256_hex(b: &[u8]) -> String {
    hex::encode(Sha256::digest(b))
}

fn chunks_of(len: usize) -> usize {
    len.div_ceil(CHUNK)
}

fn limit_i64(n: usize) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// Failures after which the same request may succeed: a member is down or restarting, the
/// cluster has no leader yet, a timeout. Everything else (invalid request, too large) is final.
fn transient(e: &etcd_client::Error) -> bool {
    use tonic::Code;
    match e {
        etcd_client::Error::TransportError(_) | etcd_client::Error::IoError(_) => true,
        etcd_client::Error::GRpcStatus(s) => matches!(
            s.code(),
            Code::Unavailable
                | Code::Unknown
                | Code::DeadlineExceeded
                | Code::Cancelled
                | Code::Aborted
                | Code::Internal
                | Code::ResourceExhausted
        ),
        _ => false,
    }
}

/// A random-ish number below `n` (spreads the retries of competing controllers).
fn jitter(n: u64) -> u64 {
    use std::hash::{BuildHasher as _, Hasher as _};
    if n == 0 {
        return 0;
    }
    std::collections::hash_map::RandomState::new().build_hasher().finish() % n
}

fn backoff(attempt: u32) -> Duration {
    let base = 10u64.saturating_mul(1 << attempt.min(5)).min(250);
    Duration::from_millis(base + jitter(base))
}

/// Pause of a background task before re-establishing its watch or campaign: 100 ms after the
/// first failure, doubling up to 2 s while etcd stays unreachable.
fn task_backoff(failures: u32) -> Duration {
    let ms = 50u64.saturating_mul(1 << failures.min(6)).min(2000);
    Duration::from_millis(ms + jitter(ms / 2))
}

/// Run `f` until it succeeds, fails for good or the retry budget is spent.
async fn retry<T, Fut>(what: &str, f: impl FnMut() -> Fut) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    retry_until(Instant::now() + RETRY_BUDGET, what, f).await
}

/// As [`retry`], giving up at `deadline`.
async fn retry_until<T, Fut>(
    deadline: Instant,
    what: &str,
    mut f: impl FnMut() -> Fut,
) -> Result<T, StoreError>
where
    Fut: Future<Output = Result<T, etcd_client::Error>>,
{
    let mut attempt = 0;
    loop {
        match f().await {
            Ok(v) => return Ok(v),
            Err(e) => {
                let delay = backoff(attempt);
                if !transient(&e) || Instant::now() + delay >= deadline {
                    return Err(be(what, &e));
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// Account one landed prune step (audit record `record`) in the running total.
fn add_step(total: &mut VersionsPruned, step: &VersionsPruned, record: u64) {
    total.pruned += step.pruned;
    total.blobs_removed += step.blobs_removed;
    total.oldest_kept = step.oldest_kept;
    total.record = record;
}

/// Raise the published head (never lower it: the watch task and commits both publish, and
/// versions only grow).
fn publish(tx: &watch::Sender<u64>, v: u64) {
    tx.send_if_modified(|cur| {
        if v > *cur {
            *cur = v;
            true
        } else {
            false
        }
    });
}

fn log(level: &str, msg: &str, fields: &[(&str, &str)]) {
    eprintln!("{}", crate::server::log_line(level, msg, fields));
}

/// TLS towards etcd: the CA that signed the members' certificates and, for etcd's
/// `--client-cert-auth`, the controller's client certificate and key (PEM files).
#[derive(Debug, Clone)]
pub struct EtcdTls {
    pub ca: std::path::PathBuf,
    pub identity: Option<(std::path::PathBuf, std::path::PathBuf)>,
}

impl EtcdTls {
    fn options(&self) -> anyhow::Result<etcd_client::TlsOptions> {
        use anyhow::Context as _;
        let read = |p: &std::path::Path| std::fs::read(p).with_context(|| format!("reading {}", p.display()));
        let mut o = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(read(&self.ca)?));
        if let Some((cert, key)) = &self.identity {
            o = o.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
        }
        Ok(o)
    }
}

impl EtcdStore {
    /// Connect to the etcd cluster at `endpoints` (all members, e.g. `http://10.0.0.1:2379`),
    /// keeping every key under `prefix`. `name` identifies this controller in the leader key.
    /// Fails if no endpoint answers within the retry budget.
    pub async fn connect(endpoints: &[String], prefix: &str, name: &str) -> anyhow::Result<Self> {
        Self::connect_with(endpoints, prefix, name, None).await
    }

    /// As [`EtcdStore::connect`], over TLS when `tls` is given (`https://` endpoints).
    pub async fn connect_with(
        endpoints: &[String],
        prefix: &str,
        name: &str,
        tls: Option<&EtcdTls>,
    ) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        anyhow::ensure!(!endpoints.is_empty(), "no etcd endpoints given");
        let mut opts = ConnectOptions::new()
            .with_connect_timeout(CONNECT_TIMEOUT)
            .with_timeout(REQUEST_TIMEOUT)
            // etcd refuses pings more often than every 5 s, and pings without streams.
            .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
            .with_require_leader(true);
        if let Some(t) = tls {
            for e in endpoints {
                anyhow::ensure!(e.starts_with("https://"), "etcd endpoint {e}: TLS needs https:// endpoints");
            }
            opts = opts.with_tls(t.options()?);
        } else if let Some(e) = endpoints.iter().find(|e| e.starts_with("https://")) {
            anyhow::bail!("etcd endpoint {e}: https:// needs the etcd CA (--etcd-ca)");
        }
        let client = Client::connect(endpoints, Some(opts)).await.context("connecting to etcd")?;
        let keys = Keys { prefix: prefix.trim_end_matches('/').to_owned() };
        let kv = client.kv_client().max_decoding_message_size(MAX_DECODE);
        let (stop, _) = watch::channel(());
        let store = Self {
            kv,
            keys,
            head: watch::Sender::new(0),
            leader: watch::Sender::new(false),
            stop,
            pause: std::sync::Mutex::new(None),
        };
        let head = store
            .read_head()
            .await
            .with_context(|| format!("reading the policy head from etcd ({})", endpoints.join(",")))?;
        publish(&store.head, head);
        tokio::spawn(watch_head_task(
            client.clone(),
            store.keys.policy_head(),
            store.head.clone(),
            store.stop.subscribe(),
        ));
        tokio::spawn(leadership_task(
            client,
            store.keys.leader(),
            name.to_owned(),
            store.leader.clone(),
            store.stop.subscribe(),
        ));
        Ok(store)
    }

    async fn get(
        &self,
        what: &str,
        key: String,
        opts: Option<GetOptions>,
    ) -> Result<GetResponse, StoreError> {
        retry(what, || {
            let mut kv = self.kv.clone();
            let (key, opts) = (key.clone(), opts.clone());
            async move { kv.get(key, opts).await }
        })
        .await
    }

    /// A transaction that is safe to repeat (reads, or writes of immutable values).
    async fn txn_idempotent(&self, what: &str, txn: Txn) -> Result<TxnResponse, StoreError> {
        retry(what, || {
            let mut kv = self.kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
    }

    async fn read_head(&self) -> Result<u64, StoreError> {
        let r = self.get("read policy head", self.keys.policy_head(), None).await?;
        r.kvs().first().map_or(Ok(0), parse_u64)
    }

    async fn read_audit_head(&self) -> Result<(audit::Head, i64), StoreError> {
        let r = self.get("read audit head", self.keys.audit_head(), None).await?;
        match r.kvs().first() {
            Some(kv) => Ok((parse(kv)?, kv.mod_revision())),
            None => Ok((audit::Head { seq: 0, hash: audit::GENESIS.to_owned() }, 0)),
        }
    }

    async fn read_heads(&self) -> Result<Heads, StoreError> {
        let r = self.get("read heads", self.keys.heads(), Some(GetOptions::new().with_prefix())).await?;
        self.parse_heads(r.kvs())
    }

    /// The heads among the keys under `/head/`.
    fn parse_heads(&self, kvs: &[KeyValue]) -> Result<Heads, StoreError> {
        let mut h = Heads {
            policy: 0,
            policy_rev: 0,
            audit: audit::Head { seq: 0, hash: audit::GENESIS.to_owned() },
            audit_rev: 0,
            gc_rev: 0,
        };
        let (pk, ak, gk) = (self.keys.policy_head(), self.keys.audit_head(), self.keys.blob_gc());
        for kv in kvs {
            if kv.key() == pk.as_bytes() {
                h.policy = parse_u64(kv)?;
                h.policy_rev = kv.mod_revision();
            } else if kv.key() == ak.as_bytes() {
                h.audit = parse(kv)?;
                h.audit_rev = kv.mod_revision();
            } else if kv.key() == gk.as_bytes() {
                h.gc_rev = kv.mod_revision();
            }
        }
        Ok(h)
    }

    /// While this controller is the leader, compact etcd's history every `interval` to the
    /// revision it observed one interval earlier (see the module docs); zero: never. Runs
    /// until the store is dropped.
    pub fn compact_history_every(&self, interval: Duration) {
        if interval.is_zero() {
            return;
        }
        tokio::spawn(compaction_task(
            self.kv.clone(),
            self.keys.policy_head(),
            interval,
            self.leader.subscribe(),
            self.stop.subscribe(),
        ));
    }

    /// Test hook: the next commit stops after checking and writing its blobs, before its
    /// first transaction; it sends on the first channel and waits for the second.
    #[doc(hidden)]
    pub fn pause_next_commit(
        &self,
    ) -> (tokio::sync::oneshot::Receiver<()>, tokio::sync::oneshot::Sender<()>) {
        let (reached_tx, reached_rx) = tokio::sync::oneshot::channel();
        let (go_tx, go_rx) = tokio::sync::oneshot::channel();
        *self.pause.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some((reached_tx, go_rx));
        (reached_rx, go_tx)
    }

    async fn stored_version(&self, v: u64) -> Result<Option<StoredVersion>, StoreError> {
        let r = self.get("read version", self.keys.version(v), None).await?;
        r.kvs().first().map(parse).transpose()
    }

    /// Write the blobs of `blobs` (sha → content) that are not stored yet. `parent` is the
    /// version the commit builds on: its documents are known to be complete.
    async fn put_blobs(&self, parent: u64, blobs: &BTreeMap<String, &str>) -> Result<(), StoreError> {
        let mut known = BTreeSet::new();
        if parent > 0 {
            // A missing or unreadable parent only costs the existence checks below.
            if let Ok(Some(p)) = self.stored_version(parent).await {
                known.extend(p.documents.into_values());
            }
        }
        let todo: Vec<(&String, &str)> =
            blobs.iter().filter(|(sha, _)| !known.contains(*sha)).map(|(s, c)| (s, *c)).collect();
        // A blob is complete when all its chunks exist (chunks are written before any version
        // refers to them; the same content always yields the same chunks).
        let mut missing = Vec::new();
        for batch in todo.chunks(READ_BATCH) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|(sha, _)| {
                    TxnOp::get(self.keys.blob(sha), Some(GetOptions::new().with_prefix().with_count_only()))
                })
                .collect();
            let r = self.txn_idempotent("check blobs", Txn::new().and_then(ops)).await?;
            for ((sha, content), op) in batch.iter().zip(r.op_responses()) {
                let TxnOpResponse::Get(g) = op else {
                    return Err(StoreError::Backend("etcd check blobs: unexpected response".into()));
                };
                if usize::try_from(g.count()).ok() != Some(chunks_of(content.len())) {
                    missing.push((*sha, *content));
                }
            }
        }
        let mut ops = Vec::new();
        let mut bytes = 0;
        for (sha, content) in missing {
            for (i, chunk) in content.as_bytes().chunks(CHUNK).enumerate() {
                if !ops.is_empty() && (ops.len() >= TXN_OPS || bytes + chunk.len() > TXN_BYTES) {
                    let txn = Txn::new().and_then(std::mem::take(&mut ops));
                    self.txn_idempotent("write blobs", txn).await?;
                    bytes = 0;
                }
                ops.push(TxnOp::put(self.keys.blob_chunk(sha, i), chunk.to_vec(), None));
                bytes += chunk.len();
            }
        }
        if !ops.is_empty() {
            self.txn_idempotent("write blobs", Txn::new().and_then(ops)).await?;
        }
        Ok(())
    }

    /// Reassemble a blob from its chunks and check it against its hash.
    fn assemble(&self, sha: &str, kvs: &[KeyValue]) -> Result<String, StoreError> {
        let mut buf = Vec::new();
        for (i, kv) in kvs.iter().enumerate() {
            if kv.key() != self.keys.blob_chunk(sha, i).as_bytes() {
                return Err(corrupt(self.keys.blob_chunk(sha, i), "chunk missing"));
            }
            buf.extend_from_slice(kv.value());
        }
        if sha256_hex(&buf) != sha {
            return Err(corrupt(self.keys.blob(sha), "content does not match its hash"));
        }
        String::from_utf8(buf).map_err(|e| corrupt(self.keys.blob(sha), e))
    }

    /// Whether one of the ambiguous attempts in `sent` (first sequence number, its sealed
    /// bytes) was applied after all; returns its index.
    async fn find_applied(&self, sent: &[(u64, Vec<u8>)], head: u64) -> Result<Option<usize>, StoreError> {
        for (i, (seq, bytes)) in sent.iter().enumerate() {
            if *seq > head {
                continue;
            }
            let r = self.get("read audit record", self.keys.audit(*seq), None).await?;
            if r.kvs().first().is_some_and(|kv| kv.value() == bytes.as_slice()) {
                return Ok(Some(i));
            }
        }
        Ok(None)
    }

    async fn commit_inner(
        &self,
        expected: u64,
        version: PolicyVersion,
        mut draft: audit::Draft,
    ) -> Result<(u64, u64), StoreError> {
        let mut heads = self.read_heads().await?;
        // Fail fast on a stale base before uploading anything.
        if heads.policy != expected {
            return Err(StoreError::Conflict { expected, current: heads.policy });
        }
        let new = expected + 1;
        let PolicyVersion { mut meta, documents } = version;
        let mut names = BTreeMap::new();
        let mut blobs = BTreeMap::new();
        for (name, content) in &documents {
            let sha = sha256_hex(content.as_bytes());
            blobs.insert(sha.clone(), content.as_str());
            names.insert(name.clone(), sha);
        }
        // The fence was read with the heads, before the blobs were checked.
        self.put_blobs(expected, &blobs).await?;
        let pause = self.pause.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some((reached, go)) = pause {
            let _ = reached.send(());
            let _ = go.await;
        }
        meta.version = new;
        let record = json(&StoredVersion { meta, documents: names })?;
        if let serde_json::Value::Object(m) = &mut draft.detail {
            m.insert("version".into(), new.into());
        }
        let (pk, ak, gk) = (self.keys.policy_head(), self.keys.audit_head(), self.keys.blob_gc());
        // Attempts whose outcome is unknown: (audit sequence, sealed record).
        let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
        for attempt in 0..CAS_ATTEMPTS {
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt - 1)).await;
                let checked = heads.gc_rev;
                heads = self.read_heads().await?;
                if !sent.is_empty()
                    && heads.policy >= new
                    && let Some(i) = self.find_applied(&sent, heads.audit.seq).await?
                {
                    publish(&self.head, new);
                    return Ok((new, sent[i].0));
                }
                if heads.policy != expected {
                    return Err(StoreError::Conflict { expected, current: heads.policy });
                }
                if heads.gc_rev != checked {
                    // Blobs were collected since ours were checked: one this commit reuses
                    // may be gone. Check again (after reading the new fence) and rewrite.
                    self.put_blobs(expected, &blobs).await?;
                }
            }
            let seq = heads.audit.seq + 1;
            let (bytes, hash) = audit::seal(&draft, seq, &heads.audit.hash);
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(pk.clone(), CompareOp::Equal, heads.policy_rev),
                    Compare::mod_revision(ak.clone(), CompareOp::Equal, heads.audit_rev),
                    // No blob collection since the blobs were checked.
                    Compare::mod_revision(gk.clone(), CompareOp::Equal, heads.gc_rev),
                ])
                .and_then(vec![
                    TxnOp::put(self.keys.version(new), record.clone(), None),
                    TxnOp::put(pk.clone(), new.to_string(), None),
                    TxnOp::put(self.keys.audit(seq), bytes.clone(), None),
                    TxnOp::put(ak.clone(), json(&audit::Head { seq, hash })?, None),
                ]);
            match self.kv.clone().txn(txn).await {
                Ok(r) if r.succeeded() => {
                    publish(&self.head, new);
                    return Ok((new, seq));
                }
                // A head moved: re-read (conflict, or reseal on the new audit head).
                Ok(_) => {}
                Err(e) if transient(&e) => sent.push((seq, bytes)),
                Err(e) => return Err(be("commit", &e)),
            }
        }
        Err(StoreError::Backend(format!(
            "etcd commit: the audit chain kept moving; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    /// Start attempt `attempt` of a write guarded by the audit head (after a pause from the
    /// second on): the current head and its mod revision, or `Err(i)` if the ambiguous
    /// attempt `sent[i]` turns out to have been applied.
    async fn audit_attempt(
        &self,
        attempt: u32,
        sent: &[(u64, Vec<u8>)],
    ) -> Result<Result<(audit::Head, i64), usize>, StoreError> {
        if attempt > 0 {
            tokio::time::sleep(backoff(attempt - 1)).await;
        }
        let (head, rev) = self.read_audit_head().await?;
        if !sent.is_empty()
            && let Some(i) = self.find_applied(sent, head.seq).await?
        {
            return Ok(Err(i));
        }
        Ok(Ok((head, rev)))
    }

    /// Append one batch (≤ `TXN_OPS` records, ≤ `TXN_BYTES`) in one transaction.
    async fn append_batch(&self, drafts: &[audit::Draft]) -> Result<u64, StoreError> {
        let ak = self.keys.audit_head();
        // Ambiguous attempts: (first sequence, its sealed record); the last sequence follows.
        let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
        let n = drafts.len() as u64;
        for attempt in 0..CAS_ATTEMPTS {
            let (head, rev) = match self.audit_attempt(attempt, &sent).await? {
                Ok(h) => h,
                Err(i) => return Ok(sent[i].0 + n - 1),
            };
            let mut h = head;
            let mut ops = Vec::with_capacity(drafts.len() + 1);
            let mut first = None;
            for d in drafts {
                let seq = h.seq + 1;
                let (bytes, hash) = audit::seal(d, seq, &h.hash);
                if first.is_none() {
                    first = Some((seq, bytes.clone()));
                }
                ops.push(TxnOp::put(self.keys.audit(seq), bytes, None));
                h = audit::Head { seq, hash };
            }
            ops.push(TxnOp::put(ak.clone(), json(&h)?, None));
            let txn =
                Txn::new().when(vec![Compare::mod_revision(ak.clone(), CompareOp::Equal, rev)]).and_then(ops);
            match self.kv.clone().txn(txn).await {
                Ok(r) if r.succeeded() => return Ok(h.seq),
                Ok(_) => {}
                Err(e) if transient(&e) => sent.extend(first),
                Err(e) => return Err(be("append audit", &e)),
            }
        }
        Err(StoreError::Backend(format!(
            "etcd append audit: the audit chain kept moving; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    async fn append_inner(&self, drafts: Vec<audit::Draft>) -> Result<u64, StoreError> {
        if drafts.is_empty() {
            return Ok(self.read_audit_head().await?.0.seq);
        }
        // Split so that each transaction stays under etcd's request and operation limits.
        let mut last = 0;
        let mut start = 0;
        let mut size = 0;
        for (i, d) in drafts.iter().enumerate() {
            let len = serde_json::to_vec(d).map_or(0, |b| b.len()) + 256;
            if i > start && (i - start >= TXN_OPS || size + len > TXN_BYTES) {
                last = self.append_batch(&drafts[start..i]).await?;
                start = i;
                size = 0;
            }
            size += len;
        }
        if start < drafts.len() {
            last = self.append_batch(&drafts[start..]).await?;
        }
        Ok(last)
    }

    async fn audit_base_inner(&self) -> Result<Option<audit::Head>, StoreError> {
        let r = self.get("read audit base", self.keys.audit_base(), None).await?;
        r.kvs().first().map(parse).transpose()
    }

    async fn prune_inner(
        &self,
        before: u64,
        last_hash: String,
        prune: audit::Draft,
    ) -> Result<(u64, u64), StoreError> {
        let ak = self.keys.audit_head();
        // Ambiguous attempts: (sequence of the prune record, its sealed bytes), and the number
        // of records each would have deleted.
        let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut counts = Vec::new();
        for attempt in 0..CAS_ATTEMPTS {
            let (head, rev) = match self.audit_attempt(attempt, &sent).await? {
                Ok(h) => h,
                Err(i) => return Ok((counts[i], sent[i].0)),
            };
            let base = self.audit_base_inner().await?;
            let first = audit::prune_start(base.as_ref(), &head, before).map_err(StoreError::Precondition)?;
            // Page by page (each a consistent read); the compares below make the check hold at
            // the moment of the write.
            let mut check = super::PruneCheck::new(base.as_ref(), first, before, &last_hash);
            while let Some(from) = check.wants() {
                check.feed(&self.audit_records_inner(from, 1000).await?)?;
            }
            let count = check.finish()?;
            let last_rev = self.get("read audit record", self.keys.audit(before - 1), None).await?;
            let last_rev = last_rev.kvs().first().map_or(0, KeyValue::mod_revision);
            let mut d = prune.clone();
            super::prune_detail(&mut d, first, count);
            let seq = head.seq + 1;
            let (bytes, hash) = audit::seal(&d, seq, &head.hash);
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(ak.clone(), CompareOp::Equal, rev),
                    Compare::mod_revision(self.keys.audit(before - 1), CompareOp::Equal, last_rev),
                ])
                .and_then(vec![
                    TxnOp::put(self.keys.audit(seq), bytes.clone(), None),
                    TxnOp::put(ak.clone(), json(&audit::Head { seq, hash })?, None),
                    TxnOp::put(
                        self.keys.audit_base(),
                        json(&audit::Head { seq: before - 1, hash: last_hash.clone() })?,
                        None,
                    ),
                    TxnOp::delete(
                        self.keys.audit(first),
                        Some(DeleteOptions::new().with_range(self.keys.audit(before))),
                    ),
                ]);
            match self.kv.clone().txn(txn).await {
                Ok(r) if r.succeeded() => return Ok((count, seq)),
                Ok(_) => {}
                Err(e) if transient(&e) => {
                    sent.push((seq, bytes));
                    counts.push(count);
                }
                Err(e) => return Err(be("prune audit", &e)),
            }
        }
        Err(StoreError::Backend(format!(
            "etcd prune audit: the audit chain kept moving; gave up after {CAS_ATTEMPTS} attempts"
        )))
    }

    /// The heads, every version's document hashes and every blob, in one consistent read.
    async fn history_view(&self) -> Result<HistoryView, StoreError> {
        let txn = Txn::new().and_then(vec![
            TxnOp::get(self.keys.heads(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.keys.versions(), Some(GetOptions::new().with_prefix())),
            TxnOp::get(self.keys.blobs(), Some(GetOptions::new().with_prefix().with_keys_only())),
        ]);
        let r = self.txn_idempotent("read the policy history", txn).await?;
        let mut gets = r
            .op_responses()
            .into_iter()
            .filter_map(|op| if let TxnOpResponse::Get(g) = op { Some(g) } else { None });
        let (Some(heads), Some(versions), Some(blobs)) = (gets.next(), gets.next(), gets.next()) else {
            return Err(StoreError::Backend("etcd read the policy history: unexpected response".into()));
        };
        let mut view = HistoryView {
            heads: self.parse_heads(heads.kvs())?,
            versions: BTreeMap::new(),
            blobs: BTreeMap::new(),
        };
        for kv in versions.kvs() {
            let v = self.version_number(kv)?;
            let sv: StoredVersion = parse(kv)?;
            view.versions.insert(v, sv.documents.into_values().collect());
        }
        let prefix = self.keys.blobs();
        for kv in blobs.kvs() {
            let sha = kv
                .key()
                .strip_prefix(prefix.as_bytes())
                .and_then(|k| std::str::from_utf8(k).ok())
                .and_then(|k| k.split_once('/'))
                .map(|(sha, _)| sha.to_owned())
                .ok_or_else(|| corrupt(String::from_utf8_lossy(kv.key()), "not a blob chunk key"))?;
            let rev = view.blobs.entry(sha).or_insert(0);
            *rev = (*rev).max(kv.mod_revision());
        }
        Ok(view)
    }

    /// The version number in a `/versions/<v>` key.
    fn version_number(&self, kv: &KeyValue) -> Result<u64, StoreError> {
        kv.key()
            .strip_prefix(self.keys.versions().as_bytes())
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.parse().ok())
            .ok_or_else(|| corrupt(String::from_utf8_lossy(kv.key()), "not a version number"))
    }

    async fn oldest_version_inner(&self) -> Result<u64, StoreError> {
        let opts = GetOptions::new().with_prefix().with_keys_only().with_limit(1);
        let r = self.get("read the oldest version", self.keys.versions(), Some(opts)).await?;
        r.kvs().first().map_or(Ok(0), |kv| self.version_number(kv))
    }

    /// One prune step planned on `view`: delete the versions before the first kept one and up
    /// to [`GC_BATCH`] collectable blobs. Returns what the step does and the blobs it deletes.
    fn plan_prune(view: &HistoryView, keep: u64) -> (VersionsPruned, Vec<String>) {
        let from = super::keep_from(view.heads.policy, keep);
        let kept = view.versions.range(from..);
        let referenced: BTreeSet<&String> = kept.clone().flat_map(|(_, shas)| shas).collect();
        // The collection rule: unreferenced by every kept version, and written before the
        // current head was committed (a commit that can still land read that head first, so
        // the blobs it writes are newer).
        let blobs: Vec<String> = view
            .blobs
            .iter()
            .filter(|(sha, rev)| !referenced.contains(sha) && **rev < view.heads.policy_rev)
            .map(|(sha, _)| sha.clone())
            .take(GC_BATCH)
            .collect();
        let step = VersionsPruned {
            pruned: view.versions.range(..from).count() as u64,
            oldest_kept: kept.map(|(v, _)| *v).next().unwrap_or(0),
            blobs_removed: blobs.len() as u64,
            record: 0,
        };
        (step, blobs)
    }

    async fn prune_versions_inner(
        &self,
        keep: u64,
        draft: audit::Draft,
    ) -> Result<VersionsPruned, StoreError> {
        super::check_keep(keep)?;
        let (pk, ak, gk) = (self.keys.policy_head(), self.keys.audit_head(), self.keys.blob_gc());
        let mut total = VersionsPruned::default();
        let mut steps = 0u32;
        // Ambiguous attempts of the current step: (audit sequence, sealed record), and what
        // each would have done.
        let mut sent: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut planned: Vec<VersionsPruned> = Vec::new();
        let mut attempt = 0;
        loop {
            if attempt >= CAS_ATTEMPTS {
                return Err(StoreError::Backend(format!(
                    "etcd prune policy history: the policy or audit head kept moving; gave up after \
                     {CAS_ATTEMPTS} attempts"
                )));
            }
            if attempt > 0 {
                tokio::time::sleep(backoff(attempt - 1)).await;
            }
            attempt += 1;
            let view = self.history_view().await?;
            if !sent.is_empty()
                && let Some(i) = self.find_applied(&sent, view.heads.audit.seq).await?
            {
                let done = planned[i];
                add_step(&mut total, &done, sent[i].0);
                (sent, planned, attempt, steps) = (Vec::new(), Vec::new(), 0, steps + 1);
                if done.blobs_removed < GC_BATCH as u64 {
                    return Ok(total);
                }
                continue;
            }
            let (step, blobs) = Self::plan_prune(&view, keep);
            if steps > 0 && step.pruned == 0 && step.blobs_removed == 0 {
                return Ok(total);
            }
            let mut d = draft.clone();
            super::versions_prune_detail(&mut d, keep, &step);
            let heads = &view.heads;
            let seq = heads.audit.seq + 1;
            let (bytes, hash) = audit::seal(&d, seq, &heads.audit.hash);
            let mut ops = Vec::with_capacity(blobs.len() + 4);
            if step.pruned > 0 {
                let first = view.versions.keys().next().copied().unwrap_or(0);
                let end = self.keys.version(super::keep_from(heads.policy, keep));
                ops.push(TxnOp::delete(self.keys.version(first), Some(DeleteOptions::new().with_range(end))));
            }
            for sha in &blobs {
                ops.push(TxnOp::delete(self.keys.blob(sha), Some(DeleteOptions::new().with_prefix())));
            }
            if !blobs.is_empty() {
                ops.push(TxnOp::put(gk.clone(), heads.policy.to_string(), None));
            }
            ops.push(TxnOp::put(self.keys.audit(seq), bytes.clone(), None));
            ops.push(TxnOp::put(ak.clone(), json(&audit::Head { seq, hash })?, None));
            let txn = Txn::new()
                .when(vec![
                    Compare::mod_revision(pk.clone(), CompareOp::Equal, heads.policy_rev),
                    Compare::mod_revision(ak.clone(), CompareOp::Equal, heads.audit_rev),
                ])
                .and_then(ops);
            match self.kv.clone().txn(txn).await {
                Ok(r) if r.succeeded() => {
                    add_step(&mut total, &step, seq);
                    (sent, planned, attempt, steps) = (Vec::new(), Vec::new(), 0, steps + 1);
                    // A full batch of blobs: more may be collectable, in another step.
                    if blobs.len() < GC_BATCH {
                        return Ok(total);
                    }
                }
                // A head moved (a commit, an audit append): read again and plan anew.
                Ok(_) => {}
                Err(e) if transient(&e) => {
                    sent.push((seq, bytes));
                    planned.push(step);
                }
                Err(e) => return Err(be("prune policy history", &e)),
            }
        }
    }

    async fn version_inner(&self, v: u64) -> Result<Option<PolicyVersion>, StoreError> {
        let Some(sv) = self.stored_version(v).await? else { return Ok(None) };
        let shas: Vec<String> = sv.documents.values().cloned().collect::<BTreeSet<_>>().into_iter().collect();
        let mut contents: BTreeMap<String, String> = BTreeMap::new();
        for batch in shas.chunks(READ_BATCH) {
            let ops: Vec<TxnOp> = batch
                .iter()
                .map(|sha| TxnOp::get(self.keys.blob(sha), Some(GetOptions::new().with_prefix())))
                .collect();
            let r = self.txn_idempotent("read blobs", Txn::new().and_then(ops)).await?;
            for (sha, op) in batch.iter().zip(r.op_responses()) {
                let TxnOpResponse::Get(g) = op else {
                    return Err(StoreError::Backend("etcd read blobs: unexpected response".into()));
                };
                contents.insert(sha.clone(), self.assemble(sha, g.kvs())?);
            }
        }
        let mut documents = BTreeMap::new();
        for (name, sha) in sv.documents {
            let c = contents.get(&sha).ok_or_else(|| corrupt(self.keys.blob(&sha), "not read"))?;
            documents.insert(name, c.clone());
        }
        Ok(Some(PolicyVersion { meta: sv.meta, documents }))
    }

    async fn history_inner(&self, limit: usize) -> Result<Vec<VersionMeta>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let opts = GetOptions::new()
            .with_prefix()
            .with_sort(SortTarget::Key, SortOrder::Descend)
            .with_limit(limit_i64(limit));
        let r = self.get("read history", self.keys.versions(), Some(opts)).await?;
        r.kvs().iter().map(|kv| parse::<StoredVersion>(kv).map(|s| s.meta)).collect()
    }

    async fn audit_records_inner(&self, from: u64, limit: usize) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        let opts = GetOptions::new().with_range(self.keys.audit_end()).with_limit(limit_i64(limit));
        let r = self.get("read audit records", self.keys.audit(from), Some(opts)).await?;
        let base = self.keys.audits();
        r.kvs()
            .iter()
            .map(|kv| {
                let seq = key_below(kv, &base).and_then(|s| s.parse().ok()).ok_or_else(|| {
                    corrupt(String::from_utf8_lossy(kv.key()), "not an audit sequence number")
                })?;
                Ok((seq, kv.value().to_vec()))
            })
            .collect()
    }

    async fn put_value(&self, what: &str, key: String, value: Vec<u8>) -> Result<(), StoreError> {
        retry(what, || {
            let mut kv = self.kv.clone();
            let (key, value) = (key.clone(), value.clone());
            async move { kv.put(key, value, None).await }
        })
        .await
        .map(|_| ())
    }

    async fn take_token_inner(&self, hash: String) -> Result<Option<JoinToken>, StoreError> {
        // One delete is atomic: of concurrent takers exactly one sees the previous value.
        let key = self.keys.token(&hash);
        let r = retry("take token", || {
            let mut kv = self.kv.clone();
            let key = key.clone();
            async move { kv.delete(key, Some(DeleteOptions::new().with_prev_key())).await }
        })
        .await?;
        r.prev_kvs()
            .first()
            .map(|kv| serde_json::from_slice(kv.value()).map_err(|e| corrupt("join token", e)))
            .transpose()
    }

    async fn tokens_inner(&self) -> Result<Vec<(String, JoinToken)>, StoreError> {
        let base = self.keys.token("");
        let r = self.get("read tokens", base.clone(), Some(GetOptions::new().with_prefix())).await?;
        r.kvs()
            .iter()
            .map(|kv| {
                let hash = key_below(kv, &base)
                    .ok_or_else(|| corrupt(String::from_utf8_lossy(kv.key()), "not a token key"))?;
                Ok((hash.to_owned(), parse(kv)?))
            })
            .collect()
    }

    async fn enforcers_inner(&self) -> Result<Vec<EnforcerRecord>, StoreError> {
        let r =
            self.get("read enforcers", self.keys.enforcers(), Some(GetOptions::new().with_prefix())).await?;
        r.kvs().iter().map(parse).collect()
    }

    async fn get_meta_inner(&self, key: String) -> Result<Option<String>, StoreError> {
        let r = self.get("read meta", self.keys.meta(&key), None).await?;
        r.kvs()
            .first()
            .map(|kv| String::from_utf8(kv.value().to_vec()).map_err(|e| corrupt(self.keys.meta(&key), e)))
            .transpose()
    }
}

impl Store for EtcdStore {
    fn head(&self) -> BoxFut<'_, u64> {
        Box::pin(self.read_head())
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head.subscribe()
    }

    fn commit(&self, expected: u64, version: PolicyVersion, audit: audit::Draft) -> BoxFut<'_, (u64, u64)> {
        Box::pin(self.commit_inner(expected, version, audit))
    }

    fn version(&self, v: u64) -> BoxFut<'_, Option<PolicyVersion>> {
        Box::pin(self.version_inner(v))
    }

    fn history(&self, limit: usize) -> BoxFut<'_, Vec<VersionMeta>> {
        Box::pin(self.history_inner(limit))
    }

    fn oldest_version(&self) -> BoxFut<'_, u64> {
        Box::pin(self.oldest_version_inner())
    }

    fn prune_versions(&self, keep: u64, audit: audit::Draft) -> BoxFut<'_, VersionsPruned> {
        Box::pin(self.prune_versions_inner(keep, audit))
    }

    fn append_audit(&self, drafts: Vec<audit::Draft>) -> BoxFut<'_, u64> {
        Box::pin(self.append_inner(drafts))
    }

    fn audit_records(&self, from: u64, limit: usize) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        Box::pin(self.audit_records_inner(from, limit))
    }

    fn audit_head(&self) -> BoxFut<'_, audit::Head> {
        Box::pin(async { Ok(self.read_audit_head().await?.0) })
    }

    fn audit_base(&self) -> BoxFut<'_, Option<audit::Head>> {
        Box::pin(self.audit_base_inner())
    }

    fn prune_audit(&self, before: u64, last_hash: String, prune: audit::Draft) -> BoxFut<'_, (u64, u64)> {
        Box::pin(self.prune_inner(before, last_hash, prune))
    }

    fn put_token(&self, hash: String, token: JoinToken) -> BoxFut<'_, ()> {
        Box::pin(async move { self.put_value("put token", self.keys.token(&hash), json(&token)?).await })
    }

    fn take_token(&self, hash: String) -> BoxFut<'_, Option<JoinToken>> {
        Box::pin(self.take_token_inner(hash))
    }

    fn tokens(&self) -> BoxFut<'_, Vec<(String, JoinToken)>> {
        Box::pin(self.tokens_inner())
    }

    fn put_enforcer(&self, rec: EnforcerRecord) -> BoxFut<'_, ()> {
        Box::pin(
            async move { self.put_value("put enforcer", self.keys.enforcer(&rec.name), json(&rec)?).await },
        )
    }

    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>> {
        Box::pin(self.enforcers_inner())
    }

    fn get_meta(&self, key: String) -> BoxFut<'_, Option<String>> {
        Box::pin(self.get_meta_inner(key))
    }

    fn put_meta(&self, key: String, value: String) -> BoxFut<'_, ()> {
        Box::pin(async move { self.put_value("put meta", self.keys.meta(&key), value.into_bytes()).await })
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }
}

/// Keep `head` equal to the policy head in etcd until the store is dropped.
async fn watch_head_task(
    client: Client,
    key: String,
    head: watch::Sender<u64>,
    mut stop: watch::Receiver<()>,
) {
    let mut failures = 0u32;
    loop {
        let began = Instant::now();
        tokio::select! {
            r = follow_head(&client, &key, &head) => {
                let e = r.err().unwrap_or_else(|| "stream ended".into());
                if began.elapsed() > TASK_HEALTHY {
                    failures = 0;
                }
                if failures == 0 {
                    log("warn", "etcd policy head watch interrupted; re-establishing", &[("error", &e)]);
                }
                failures += 1;
            }
            _ = stop.changed() => return,
        }
        tokio::time::sleep(task_backoff(failures)).await;
    }
}

/// Read the head, then watch it from the next revision. Returns on any failure.
async fn follow_head(client: &Client, key: &str, head: &watch::Sender<u64>) -> Result<(), String> {
    let r = client.kv_client().get(key, None).await.map_err(|e| e.to_string())?;
    if let Some(kv) = r.kvs().first() {
        publish(head, parse_u64(kv).map_err(|e| e.to_string())?);
    }
    let rev = r.header().map_or(0, etcd_client::ResponseHeader::revision);
    let mut ws = client
        .watch_client()
        .watch(key, Some(WatchOptions::new().with_start_revision(rev + 1)))
        .await
        .map_err(|e| e.to_string())?;
    let mut progress = tokio::time::interval(WATCH_PROGRESS_EVERY);
    progress.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut last = Instant::now();
    loop {
        tokio::select! {
            m = ws.message() => {
                let m = m.map_err(|e| e.to_string())?.ok_or("watch stream closed")?;
                last = Instant::now();
                if m.canceled() {
                    if m.compact_revision() > 0 {
                        return Err(format!("watch start compacted (history kept from revision {})", m.compact_revision()));
                    }
                    return Err(format!("watch canceled: {}", m.cancel_reason()));
                }
                for ev in m.events() {
                    if ev.event_type() == EventType::Put && let Some(kv) = ev.kv() {
                        match parse_u64(kv) {
                            Ok(v) => publish(head, v),
                            Err(e) => log("error", "unreadable policy head in etcd", &[("error", &e.to_string())]),
                        }
                    }
                }
            }
            _ = progress.tick() => {
                if last.elapsed() > WATCH_SILENCE {
                    return Err("watch silent".into());
                }
                ws.request_progress().await.map_err(|e| e.to_string())?;
            }
        }
    }
}

/// Compact etcd's history while this controller is the leader, until the store is dropped.
async fn compaction_task(
    kv: KvClient,
    key: String,
    interval: Duration,
    mut leader: watch::Receiver<bool>,
    mut stop: watch::Receiver<()>,
) {
    loop {
        tokio::select! {
            r = leader.wait_for(|l| *l) => if r.is_err() { return },
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = compact_while_leader(&kv, &key, interval, &mut leader) => {}
            _ = stop.changed() => return,
        }
    }
}

/// Every `interval`, sample the cluster's revision (read at `key`) and compact to the
/// previous sample, until leadership is lost. Samples start afresh with each leadership.
async fn compact_while_leader(
    kv: &KvClient,
    key: &str,
    interval: Duration,
    leader: &mut watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut previous: Option<i64> = None;
    let mut failing = false;
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = leader.wait_for(|l| !*l) => return,
        }
        let mut kv = kv.clone();
        let sample = kv.get(key, Some(GetOptions::new().with_count_only())).await;
        let done = match (sample, previous) {
            (Ok(r), Some(rev)) => {
                previous = r.header().map(etcd_client::ResponseHeader::revision);
                compact_to(&mut kv, rev).await
            }
            (Ok(r), None) => {
                previous = r.header().map(etcd_client::ResponseHeader::revision);
                Ok(())
            }
            // Keep the older sample: compacting to it later is still safe.
            (Err(e), _) => Err(format!("reading the revision: {e}")),
        };
        match done {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                log("warn", "etcd history compaction failed; retrying next interval", &[("error", &e)]);
            }
            Err(_) => {}
        }
    }
}

/// Compact etcd's history up to `rev`; already compacted that far is fine.
async fn compact_to(kv: &mut KvClient, rev: i64) -> Result<(), String> {
    match kv.compact(rev, None).await {
        Ok(_) => {
            log("info", "etcd history compacted", &[("revision", &rev.to_string())]);
            Ok(())
        }
        Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("compacted") => Ok(()),
        Err(e) => Err(format!("compacting to revision {rev}: {e}")),
    }
}

/// Campaign for leadership until the store is dropped; then resign (revoke the lease).
async fn leadership_task(
    client: Client,
    key: String,
    name: String,
    leader: watch::Sender<bool>,
    mut stop: watch::Receiver<()>,
) {
    let mut lease = None;
    let mut failures = 0u32;
    loop {
        let began = Instant::now();
        let r = tokio::select! {
            r = campaign(&client, &key, &name, &leader, &mut lease) => r,
            _ = stop.changed() => {
                step_down(&leader, &name);
                if let Some(id) = lease {
                    let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_client().revoke(id)).await;
                }
                return;
            }
        };
        step_down(&leader, &name);
        if began.elapsed() > TASK_HEALTHY {
            failures = 0;
        }
        if let Err(e) = r {
            if failures == 0 {
                log(
                    "warn",
                    "etcd leadership campaign interrupted; retrying",
                    &[("name", &name), ("error", &e)],
                );
            }
            failures += 1;
        }
        tokio::time::sleep(task_backoff(failures)).await;
    }
}

fn step_down(leader: &watch::Sender<bool>, name: &str) {
    if leader.send_replace(false) {
        log("info", "controller lost leadership", &[("name", name)]);
    }
}

/// Hold a lease, take the leader key when it is free, and keep the lease alive. Returns (and
/// the caller steps down) when the lease is lost or cannot be confirmed in time; `lease` is
/// cleared when the lease is known to be gone.
///
/// With one etcd member down, a share of requests fails at once (the client still spreads them
/// over every endpoint), so each request is retried while that is safe: keep-alives until
/// shortly before the lease could expire after the last confirmed renewal, the rest within
/// one lease period. Leadership is announced only once the watch on the leader key is in
/// place.
async fn campaign(
    client: &Client,
    key: &str,
    name: &str,
    leader: &watch::Sender<bool>,
    lease: &mut Option<i64>,
) -> Result<(), String> {
    let ttl = Duration::from_secs(LEASE_TTL_S.unsigned_abs());
    let mut lc = client.lease_client();
    let id = if let Some(id) = *lease {
        id
    } else {
        let g = retry_until(Instant::now() + ttl, "lease grant", || {
            let mut lc = lc.clone();
            async move { lc.grant(LEASE_TTL_S, None).await }
        })
        .await
        .map_err(|e| e.to_string())?;
        *lease = Some(g.id());
        g.id()
    };
    // The lease is known alive until `confirmed + ttl`; act as leader only before `safe()`.
    let mut confirmed = Instant::now();
    let window = ttl.saturating_sub(KEEPALIVE_TIMEOUT);
    let safe = |confirmed: Instant| confirmed + window;
    let mut keeper = keep_alive_stream(&mut lc, id, safe(confirmed), lease).await?;
    let kv = client.kv_client();
    let mut ws: Option<etcd_client::WatchStream> = None;
    let mut tick = tokio::time::interval(KEEPALIVE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // Take the key if it is free; otherwise learn whether it is ours (after a reconnect).
        let txn = Txn::new()
            .when(vec![Compare::create_revision(key, CompareOp::Equal, 0)])
            .and_then(vec![TxnOp::put(key, name, Some(PutOptions::new().with_lease(id)))])
            .or_else(vec![TxnOp::get(key, None)]);
        let r = retry_until(safe(confirmed), "leader key", || {
            let mut kv = kv.clone();
            let txn = txn.clone();
            async move { kv.txn(txn).await }
        })
        .await
        .map_err(|e| e.to_string())?;
        let ours = r.succeeded()
            || r.op_responses().iter().any(|op| {
                matches!(op, TxnOpResponse::Get(g) if g.kvs().first().is_some_and(|kv| kv.lease() == id))
            });
        if ws.is_none() {
            let rev = r.header().map_or(0, etcd_client::ResponseHeader::revision);
            let w = retry_until(safe(confirmed), "leader watch", || {
                let mut wc = client.watch_client();
                let opts = WatchOptions::new().with_start_revision(rev + 1);
                async move { wc.watch(key, Some(opts)).await }
            })
            .await
            .map_err(|e| e.to_string())?;
            ws = Some(w);
        }
        if ours {
            if !leader.send_replace(true) {
                log("info", "controller is the leader", &[("name", name)]);
            }
        } else {
            step_down(leader, name);
        }
        let Some(w) = ws.as_mut() else { return Err("no watch".into()) };
        let recheck = tokio::time::sleep(LEADER_RECHECK);
        tokio::pin!(recheck);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    keep_lease(&mut lc, id, &mut keeper, &mut confirmed, window, lease).await?;
                }
                m = w.message() => {
                    let m = match m {
                        Ok(Some(m)) if !m.canceled() => m,
                        // The watch broke: re-read the key and watch again (outer loop).
                        _ => {
                            ws = None;
                            break;
                        }
                    };
                    let lost = m.events().iter().any(|ev| {
                        ev.event_type() == EventType::Delete || ev.kv().is_some_and(|kv| kv.lease() != id)
                    });
                    if lost {
                        // The key is gone or someone else's: stop acting as leader at once.
                        step_down(leader, name);
                        break;
                    }
                }
                () = &mut recheck, if !ours => break,
            }
        }
    }
}

/// Renew the lease once; if the keep-alive stream broke (e.g. its member died), open another
/// one while the lease is still certainly alive (`confirmed + window`).
async fn keep_lease(
    lc: &mut etcd_client::LeaseClient,
    id: i64,
    keeper: &mut Keeper,
    confirmed: &mut Instant,
    window: Duration,
    lease: &mut Option<i64>,
) -> Result<(), String> {
    let mut reopened = false;
    loop {
        match renew(keeper, *confirmed + window).await {
            Ok(()) => {
                *confirmed = Instant::now();
                return Ok(());
            }
            Err(Renewal::Expired) => {
                *lease = None;
                return Err("lease expired".into());
            }
            Err(Renewal::Broken(why)) => {
                if reopened || Instant::now() >= *confirmed + window {
                    return Err(format!("keep-alive: {why}"));
                }
                *keeper = keep_alive_stream(lc, id, *confirmed + window, lease).await?;
                reopened = true;
            }
        }
    }
}

enum Renewal {
    Expired,
    Broken(String),
}

type Keeper = (etcd_client::LeaseKeeper, etcd_client::LeaseKeepAliveStream);

/// Open a keep-alive stream for `id`, retrying transient failures until `deadline`.
async fn keep_alive_stream(
    lc: &mut etcd_client::LeaseClient,
    id: i64,
    deadline: Instant,
    lease: &mut Option<i64>,
) -> Result<Keeper, String> {
    let mut attempt = 0;
    loop {
        match lc.keep_alive(id).await {
            Ok(k) => return Ok(k),
            Err(e) => {
                if matches!(e, etcd_client::Error::LeaseKeepAliveError(_)) {
                    *lease = None;
                    return Err(e.to_string());
                }
                let delay = backoff(attempt);
                if !transient(&e) || Instant::now() + delay >= deadline {
                    return Err(e.to_string());
                }
                tokio::time::sleep(delay).await;
                attempt += 1;
            }
        }
    }
}

/// Send one keep-alive and wait for its answer, no later than `deadline`.
async fn renew(keeper: &mut Keeper, deadline: Instant) -> Result<(), Renewal> {
    keeper.0.keep_alive().await.map_err(|e| Renewal::Broken(e.to_string()))?;
    let wait = deadline.saturating_duration_since(Instant::now()).min(KEEPALIVE_TIMEOUT);
    match tokio::time::timeout(wait, keeper.1.message()).await {
        Ok(Ok(Some(a))) if a.ttl() > 0 => Ok(()),
        Ok(Ok(Some(_))) => Err(Renewal::Expired),
        Ok(Ok(None)) => Err(Renewal::Broken("keep-alive stream closed".into())),
        Ok(Err(e)) => Err(Renewal::Broken(e.to_string())),
        Err(_) => Err(Renewal::Broken("keep-alive unanswered".into())),
    }
}
