//! The embedded store: one redb file (`<data-dir>/ztseg.redb`).
//!
//! `redb` was chosen over `SQLite` because it is pure Rust (no C toolchain, fast builds), its
//! write transactions are ACID with copy-on-write pages and an fsync at commit (a committed
//! transaction survives kill -9 and power loss; an uncommitted one leaves no trace), and the
//! controller needs only ordered key/value tables, not SQL. The file is locked by the
//! process that opens it, so a second controller on the same file fails at start instead of
//! corrupting it; HA is etcd's job.
//!
//! Deleting (a prune of policy versions or audit records) frees pages for reuse but does not
//! shrink the file. A prune that deleted at least a quarter of the file's size (and 4 MiB)
//! compacts the file before it returns, and opening the store compacts a file whose free space
//! is that large ([`EmbeddedStore::compact`]); smaller prunes leave the space to be reused,
//! so retention after every commit does not compact every time. redb compacts only through
//! `&mut Database` with no transaction open, so the database sits behind a lock that every
//! operation takes shared (redb runs them concurrently as before) and compaction alone takes
//! exclusively: operations wait while it runs, no transaction is ever open during it, and no
//! `unsafe` is needed.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, RwLock},
    time::Instant,
};

use redb::{Database, ReadableDatabase as _, ReadableTable as _, TableDefinition};
use tokio::sync::watch;

use super::{
    BoxFut, EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta, VersionsPruned,
};
use crate::audit;

/// Policy versions: version → JSON [`PolicyVersion`].
pub const VERSIONS: TableDefinition<u64, &[u8]> = TableDefinition::new("policy_versions");
/// Audit chain: sequence → stored record bytes.
pub const AUDIT: TableDefinition<u64, &[u8]> = TableDefinition::new("audit");
/// Named values: `policy_head`, `audit_head`, `audit_base`, export cursors.
pub const META: TableDefinition<&str, &str> = TableDefinition::new("meta");
pub const TOKENS: TableDefinition<&str, &[u8]> = TableDefinition::new("join_tokens");
pub const ENFORCERS: TableDefinition<&str, &[u8]> = TableDefinition::new("enforcers");

const POLICY_HEAD: &str = "policy_head";
const AUDIT_HEAD: &str = "audit_head";
/// JSON [`audit::Head`] of the last pruned record (absent until the first prune).
const AUDIT_BASE: &str = "audit_base";

pub struct EmbeddedStore {
    /// Shared by every operation; taken exclusively by compaction only.
    db: Arc<RwLock<Database>>,
    path: PathBuf,
    head_tx: watch::Sender<u64>,
    leader: watch::Sender<bool>,
}

/// What a compaction did to the file: its size before and after, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Compacted {
    pub before: u64,
    pub after: u64,
}

/// A compaction is worth its pause when the space it can give back is at least this share
/// (1/N) of the file...
const COMPACT_SHARE: u64 = 4;
/// ...and at least this many bytes (a new file has 1 MiB, and redb grows it ahead of need).
const COMPACT_MIN: u64 = 4 << 20;

fn worth_compacting(freed: u64, file_len: u64) -> bool {
    freed >= COMPACT_MIN && freed >= file_len / COMPACT_SHARE
}

impl std::fmt::Debug for EmbeddedStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedStore").finish_non_exhaustive()
    }
}

fn be(e: impl std::fmt::Display) -> StoreError {
    StoreError::backend(e)
}

fn corrupt(key: impl std::fmt::Display, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt { key: key.to_string(), message: e.to_string() }
}

type Meta<'t> = redb::Table<'t, &'static str, &'static str>;

fn read_head(meta: &Meta<'_>) -> Result<u64, StoreError> {
    match meta.get(POLICY_HEAD).map_err(be)? {
        Some(v) => v.value().parse().map_err(|e| corrupt(POLICY_HEAD, e)),
        None => Ok(0),
    }
}

fn read_audit_head(meta: &Meta<'_>) -> Result<audit::Head, StoreError> {
    match meta.get(AUDIT_HEAD).map_err(be)? {
        Some(v) => serde_json::from_str(v.value()).map_err(|e| corrupt(AUDIT_HEAD, e)),
        None => Ok(audit::Head { seq: 0, hash: audit::GENESIS.to_owned() }),
    }
}

fn read_audit_base<T: redb::ReadableTable<&'static str, &'static str>>(
    meta: &T,
) -> Result<Option<audit::Head>, StoreError> {
    meta.get(AUDIT_BASE)
        .map_err(be)?
        .map(|v| serde_json::from_str(v.value()).map_err(|e| corrupt(AUDIT_BASE, e)))
        .transpose()
}

/// Every entry of a table of JSON values, in key order.
fn json_table<T: serde::de::DeserializeOwned>(
    db: &Database,
    table: TableDefinition<&str, &[u8]>,
) -> Result<Vec<(String, T)>, StoreError> {
    let rtx = db.begin_read().map_err(be)?;
    let t = rtx.open_table(table).map_err(be)?;
    let mut out = Vec::new();
    for e in t.iter().map_err(be)? {
        let (k, v) = e.map_err(be)?;
        out.push((
            k.value().to_owned(),
            serde_json::from_slice(v.value()).map_err(|e| corrupt(k.value(), e))?,
        ));
    }
    Ok(out)
}

/// Append drafts inside an open write transaction.
fn append(tx: &redb::WriteTransaction, drafts: &[audit::Draft]) -> Result<u64, StoreError> {
    let mut meta = tx.open_table(META).map_err(be)?;
    let mut head = read_audit_head(&meta)?;
    let mut t = tx.open_table(AUDIT).map_err(be)?;
    for d in drafts {
        let seq = head.seq + 1;
        let (bytes, hash) = audit::seal(d, seq, &head.hash);
        t.insert(seq, bytes.as_slice()).map_err(be)?;
        head = audit::Head { seq, hash };
    }
    let h = serde_json::to_string(&head).map_err(be)?;
    meta.insert(AUDIT_HEAD, h.as_str()).map_err(be)?;
    Ok(head.seq)
}

fn file_len(path: &Path) -> Result<u64, StoreError> {
    Ok(std::fs::metadata(path).map_err(be)?.len())
}

/// Compact the file at `path` (open as `db`, no transaction open).
fn compact_now(db: &mut Database, path: &Path) -> Result<Compacted, StoreError> {
    let before = file_len(path)?;
    db.compact().map_err(be)?;
    Ok(Compacted { before, after: file_len(path)? })
}

/// Compact if the file's free space is worth it (see [`worth_compacting`]).
fn compact_if_free(db: &mut Database, path: &Path) -> Result<Option<Compacted>, StoreError> {
    let free = {
        let tx = db.begin_write().map_err(be)?;
        let free = tx.stats().map_err(be)?.fragmented_bytes();
        tx.abort().map_err(be)?;
        free
    };
    if !worth_compacting(free, file_len(path)?) {
        return Ok(None);
    }
    compact_now(db, path).map(Some)
}

/// Log a compaction (or its failure); it never fails the operation that asked for it.
fn log_compaction(done: &Result<Option<Compacted>, StoreError>, why: &str, started: Instant) {
    let line = match done {
        Ok(None) => return,
        Ok(Some(c)) => crate::server::log_line(
            "info",
            "store file compacted",
            &[
                ("after", why),
                ("bytes_before", &c.before.to_string()),
                ("bytes_after", &c.after.to_string()),
                ("ms", &started.elapsed().as_millis().to_string()),
            ],
        ),
        Err(e) => crate::server::log_line(
            "error",
            "store file compaction failed",
            &[("after", why), ("error", &e.to_string())],
        ),
    };
    eprintln!("{line}");
}

impl EmbeddedStore {
    /// Open (or create) the store file, compacting it first if enough of it is free.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let mut db =
            Database::create(path).with_context(|| format!("opening the store {}", path.display()))?;
        let tx = db.begin_write()?;
        {
            tx.open_table(VERSIONS)?;
            tx.open_table(AUDIT)?;
            tx.open_table(TOKENS)?;
            tx.open_table(ENFORCERS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        let started = Instant::now();
        log_compaction(&compact_if_free(&mut db, path), "open", started);
        let head = {
            let rtx = db.begin_read()?;
            let meta = rtx.open_table(META)?;
            match meta.get(POLICY_HEAD)? {
                Some(v) => v.value().parse().context("corrupt policy head")?,
                None => 0,
            }
        };
        Ok(Self {
            db: Arc::new(RwLock::new(db)),
            path: path.to_owned(),
            head_tx: watch::Sender::new(head),
            leader: watch::Sender::new(true),
        })
    }

    /// Open an existing store without creating or changing anything (offline verification).
    pub fn open_existing(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if !path.is_file() {
            anyhow::bail!("no store at {} (is this a controller data directory?)", path.display());
        }
        let db = Database::open(path).with_context(|| format!("opening the store {}", path.display()))?;
        Ok(Self {
            db: Arc::new(RwLock::new(db)),
            path: path.to_owned(),
            head_tx: watch::Sender::new(0),
            leader: watch::Sender::new(false),
        })
    }

    /// Run blocking database work off the async runtime.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFut<'_, T> {
        let db = self.db.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                f(&db.read().unwrap_or_else(std::sync::PoisonError::into_inner))
            })
            .await
            .map_err(be)?
        })
    }

    /// Compact the store file now, returning its size before and after. Store operations wait
    /// until it is done (they share the database; compaction needs it alone).
    #[must_use]
    pub fn compact(&self) -> BoxFut<'_, Compacted> {
        let (db, path) = (self.db.clone(), self.path.clone());
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut db = db.write().unwrap_or_else(std::sync::PoisonError::into_inner);
                compact_now(&mut db, &path)
            })
            .await
            .map_err(be)?
        })
    }

    /// After a prune that deleted `freed` bytes: compact if that is worth it.
    async fn compact_after(&self, why: &'static str, freed: u64) {
        if !worth_compacting(freed, file_len(&self.path).unwrap_or(0)) {
            return;
        }
        let started = Instant::now();
        log_compaction(&self.compact().await.map(Some), why, started);
    }
}

impl Store for EmbeddedStore {
    fn head(&self) -> BoxFut<'_, u64> {
        self.blocking(|db| {
            let rtx = db.begin_read().map_err(be)?;
            let meta = rtx.open_table(META).map_err(be)?;
            match meta.get(POLICY_HEAD).map_err(be)? {
                Some(v) => v.value().parse().map_err(|e| corrupt(POLICY_HEAD, e)),
                None => Ok(0),
            }
        })
    }

    fn watch_head(&self) -> watch::Receiver<u64> {
        self.head_tx.subscribe()
    }

    fn commit(
        &self,
        expected: u64,
        mut version: PolicyVersion,
        mut draft: audit::Draft,
    ) -> BoxFut<'_, (u64, u64)> {
        let head_tx = self.head_tx.clone();
        let fut = self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let new = {
                let mut meta = tx.open_table(META).map_err(be)?;
                let current = read_head(&meta)?;
                if current != expected {
                    return Err(StoreError::Conflict { expected, current });
                }
                let new = current + 1;
                version.meta.version = new;
                let bytes = serde_json::to_vec(&version).map_err(be)?;
                tx.open_table(VERSIONS).map_err(be)?.insert(new, bytes.as_slice()).map_err(be)?;
                meta.insert(POLICY_HEAD, new.to_string().as_str()).map_err(be)?;
                new
            };
            if let serde_json::Value::Object(m) = &mut draft.detail {
                m.insert("version".into(), new.into());
            }
            let seq = append(&tx, std::slice::from_ref(&draft))?;
            tx.commit().map_err(be)?;
            Ok((new, seq))
        });
        Box::pin(async move {
            let r = fut.await?;
            head_tx.send_replace(r.0);
            Ok(r)
        })
    }

    fn version(&self, v: u64) -> BoxFut<'_, Option<PolicyVersion>> {
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(VERSIONS).map_err(be)?;
            t.get(v)
                .map_err(be)?
                .map(|b| serde_json::from_slice(b.value()).map_err(|e| corrupt(format!("version {v}"), e)))
                .transpose()
        })
    }

    fn history(&self, limit: usize) -> BoxFut<'_, Vec<VersionMeta>> {
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(VERSIONS).map_err(be)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(be)?.rev().take(limit) {
                let (k, v) = e.map_err(be)?;
                let pv: PolicyVersion = serde_json::from_slice(v.value())
                    .map_err(|e| corrupt(format!("version {}", k.value()), e))?;
                out.push(pv.meta);
            }
            Ok(out)
        })
    }

    fn oldest_version(&self) -> BoxFut<'_, u64> {
        self.blocking(|db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(VERSIONS).map_err(be)?;
            Ok(t.first().map_err(be)?.map_or(0, |(k, _)| k.value()))
        })
    }

    fn prune_versions(&self, keep: u64, mut draft: audit::Draft) -> BoxFut<'_, VersionsPruned> {
        let pruned = self.blocking(move |db| {
            super::check_keep(keep)?;
            // One write transaction: the deletion and its audit record land together, and no
            // commit can come between reading the head and deleting. Documents are stored
            // inside their version, so deleting the version frees them.
            let tx = db.begin_write().map_err(be)?;
            let head = read_head(&tx.open_table(META).map_err(be)?)?;
            let from = super::keep_from(head, keep);
            let mut done = VersionsPruned::default();
            let mut freed = 0;
            {
                let mut t = tx.open_table(VERSIONS).map_err(be)?;
                for e in t.range(..from).map_err(be)? {
                    done.pruned += 1;
                    freed += e.map_err(be)?.1.value().len() as u64;
                }
                t.retain_in(..from, |_, _| false).map_err(be)?;
                done.oldest_kept = t.first().map_err(be)?.map_or(0, |(k, _)| k.value());
            }
            super::versions_prune_detail(&mut draft, keep, &done);
            done.record = append(&tx, std::slice::from_ref(&draft))?;
            tx.commit().map_err(be)?;
            Ok((done, freed))
        });
        Box::pin(async move {
            let (done, freed) = pruned.await?;
            self.compact_after("policy.prune", freed).await;
            Ok(done)
        })
    }

    fn append_audit(&self, drafts: Vec<audit::Draft>) -> BoxFut<'_, u64> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let seq = append(&tx, &drafts)?;
            tx.commit().map_err(be)?;
            Ok(seq)
        })
    }

    fn audit_records(&self, from: u64, limit: usize) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> {
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(AUDIT).map_err(be)?;
            let mut out = Vec::new();
            for e in t.range(from..).map_err(be)?.take(limit) {
                let (k, v) = e.map_err(be)?;
                out.push((k.value(), v.value().to_vec()));
            }
            Ok(out)
        })
    }

    fn audit_head(&self) -> BoxFut<'_, audit::Head> {
        self.blocking(|db| {
            let rtx = db.begin_read().map_err(be)?;
            read_audit_head_ro(&rtx.open_table(META).map_err(be)?)
        })
    }

    fn audit_base(&self) -> BoxFut<'_, Option<audit::Head>> {
        self.blocking(|db| {
            let rtx = db.begin_read().map_err(be)?;
            read_audit_base(&rtx.open_table(META).map_err(be)?)
        })
    }

    fn prune_audit(&self, before: u64, last_hash: String, mut prune: audit::Draft) -> BoxFut<'_, (u64, u64)> {
        let pruned = self.blocking(move |db| {
            // One write transaction: the check, the prune record, the deletion and the new base
            // commit together or not at all (and no append can come between them).
            let tx = db.begin_write().map_err(be)?;
            let (base, head) = {
                let meta = tx.open_table(META).map_err(be)?;
                (read_audit_base(&meta)?, read_audit_head(&meta)?)
            };
            let first = audit::prune_start(base.as_ref(), &head, before).map_err(StoreError::Precondition)?;
            let mut freed = 0;
            let count = {
                let t = tx.open_table(AUDIT).map_err(be)?;
                let mut check = super::PruneCheck::new(base.as_ref(), first, before, &last_hash);
                while let Some(from) = check.wants() {
                    let mut page = Vec::new();
                    for e in t.range(from..before).map_err(be)?.take(1000) {
                        let (k, v) = e.map_err(be)?;
                        freed += v.value().len() as u64;
                        page.push((k.value(), v.value().to_vec()));
                    }
                    check.feed(&page)?;
                }
                check.finish()?
            };
            super::prune_detail(&mut prune, first, count);
            let seq = append(&tx, std::slice::from_ref(&prune))?;
            tx.open_table(AUDIT).map_err(be)?.retain_in(..before, |_, _| false).map_err(be)?;
            let base =
                serde_json::to_string(&audit::Head { seq: before - 1, hash: last_hash }).map_err(be)?;
            tx.open_table(META).map_err(be)?.insert(AUDIT_BASE, base.as_str()).map_err(be)?;
            tx.commit().map_err(be)?;
            Ok((count, seq, freed))
        });
        Box::pin(async move {
            let (count, seq, freed) = pruned.await?;
            self.compact_after("audit.prune", freed).await;
            Ok((count, seq))
        })
    }

    fn put_token(&self, hash: String, token: JoinToken) -> BoxFut<'_, ()> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let bytes = serde_json::to_vec(&token).map_err(be)?;
            tx.open_table(TOKENS).map_err(be)?.insert(hash.as_str(), bytes.as_slice()).map_err(be)?;
            tx.commit().map_err(be)
        })
    }

    fn take_token(&self, hash: String) -> BoxFut<'_, Option<JoinToken>> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let tok = {
                let mut t = tx.open_table(TOKENS).map_err(be)?;
                let v = t.remove(hash.as_str()).map_err(be)?;
                v.map(|b| serde_json::from_slice(b.value()).map_err(|e| corrupt("join token", e)))
                    .transpose()?
            };
            tx.commit().map_err(be)?;
            Ok(tok)
        })
    }

    fn tokens(&self) -> BoxFut<'_, Vec<(String, JoinToken)>> {
        self.blocking(|db| json_table(db, TOKENS))
    }

    fn put_enforcer(&self, rec: EnforcerRecord) -> BoxFut<'_, ()> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let bytes = serde_json::to_vec(&rec).map_err(be)?;
            tx.open_table(ENFORCERS).map_err(be)?.insert(rec.name.as_str(), bytes.as_slice()).map_err(be)?;
            tx.commit().map_err(be)
        })
    }

    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>> {
        self.blocking(|db| Ok(json_table(db, ENFORCERS)?.into_iter().map(|(_, e)| e).collect()))
    }

    fn get_meta(&self, key: String) -> BoxFut<'_, Option<String>> {
        self.blocking(move |db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(META).map_err(be)?;
            Ok(t.get(format!("x/{key}").as_str()).map_err(be)?.map(|v| v.value().to_owned()))
        })
    }

    fn put_meta(&self, key: String, value: String) -> BoxFut<'_, ()> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            tx.open_table(META)
                .map_err(be)?
                .insert(format!("x/{key}").as_str(), value.as_str())
                .map_err(be)?;
            tx.commit().map_err(be)
        })
    }

    fn leadership(&self) -> watch::Receiver<bool> {
        self.leader.subscribe()
    }
}

fn read_audit_head_ro(
    meta: &redb::ReadOnlyTable<&'static str, &'static str>,
) -> Result<audit::Head, StoreError> {
    match meta.get(AUDIT_HEAD).map_err(be)? {
        Some(v) => serde_json::from_str(v.value()).map_err(|e| corrupt(AUDIT_HEAD, e)),
        None => Ok(audit::Head { seq: 0, hash: audit::GENESIS.to_owned() }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh store file in a directory of its own (removed by the caller).
    fn fresh(name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let dir = std::env::temp_dir().join(format!("ztseg-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("s.redb");
        let _ = std::fs::remove_file(&path);
        (dir, path)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_the_store_contract_across_a_reopen() {
        let (dir, path) = fresh("store");
        let s = EmbeddedStore::open(&path).unwrap();
        crate::store::contract::run(&s).await;
        drop(s);
        let s = EmbeddedStore::open(&path).unwrap();
        crate::store::contract::persisted(&s).await;
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_the_history_retention_contract_across_a_reopen() {
        let (dir, path) = fresh("store-retention");
        let s = EmbeddedStore::open(&path).unwrap();
        crate::store::contract::prune_history(&s).await;
        drop(s);
        let s = EmbeddedStore::open_existing(&path).unwrap();
        let rtx = s.db.read().unwrap().begin_read().unwrap();
        let stored: Vec<u64> =
            rtx.open_table(VERSIONS).unwrap().iter().unwrap().map(|e| e.unwrap().0.value()).collect();
        assert_eq!(stored, vec![6, 7], "pruned versions (and their documents) are gone from the file");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn keeps_the_prune_contract_across_a_reopen() {
        let (dir, path) = fresh("store-prune");
        let s = EmbeddedStore::open(&path).unwrap();
        crate::store::contract::prune(&s).await;
        drop(s);
        let s = EmbeddedStore::open_existing(&path).unwrap();
        assert_eq!(s.audit_base().await.unwrap().map(|b| b.seq), Some(6), "the base persists");
        match crate::service::verify_chain(&s).await.unwrap() {
            Ok(v) => assert_eq!((v.first, v.last), (7, 9)),
            Err(bad) => panic!("{bad}"),
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
    fn doc(i: u64) -> String {
        format!("# version {i}\n{}\n", "allow: x\n".repeat(8 << 10))
    }

    /// A fresh store with `n` versions of 72 KiB (version `i` holds `doc(i)`).
    async fn filled(name: &str, n: u64) -> (std::path::PathBuf, std::path::PathBuf, EmbeddedStore) {
        use crate::store::contract::{draft, version};
        let (dir, path) = fresh(name);
        let s = EmbeddedStore::open(&path).unwrap();
        for i in 0..n {
            s.commit(i, version(&[("a", &doc(i + 1))]), draft()).await.unwrap();
        }
        (dir, path, s)
    }

    async fn chain(s: &EmbeddedStore) -> crate::audit::Verified {
        match crate::service::verify_chain(s).await.unwrap() {
            Ok(v) => v,
            Err(bad) => panic!("audit chain broken: {bad}"),
        }
    }

    /// 200 versions of 72 KiB, 190 of them pruned: the prune compacts the file (far more than
    /// a quarter of it is free) and it shrinks; every kept version reads back, the audit chain
    /// verifies, commits continue, and a reopen finds it all. A prune that frees little does
    /// not compact; a forced compaction waits for concurrent readers instead of failing.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_prune_that_frees_much_of_the_file_compacts_it() {
        use crate::store::contract::{draft, history_prune_draft, version};
        let (dir, path, s) = filled("store-compact", 200).await;
        let full = file_len(&path).unwrap();
        let t = Instant::now();
        let done = s.prune_versions(10, history_prune_draft()).await.unwrap();
        let took = t.elapsed();
        assert_eq!((done.pruned, done.oldest_kept), (190, 191));
        let compacted = file_len(&path).unwrap();
        eprintln!("200 versions: {full} bytes; prune of 190 and compaction: {compacted} bytes in {took:?}");
        assert!(compacted < full / 4, "the file shrank: {full} -> {compacted}");
        for v in 191..=200 {
            assert_eq!(s.version(v).await.unwrap().unwrap().documents["a"], doc(v), "version {v}");
        }
        assert_eq!(chain(&s).await.records, 201);

        // One more version pruned frees too little to be worth a compaction.
        s.commit(200, version(&[("a", &doc(201))]), draft()).await.unwrap();
        let before = file_len(&path).unwrap();
        assert_eq!(s.prune_versions(10, history_prune_draft()).await.unwrap().pruned, 1);
        assert_eq!(file_len(&path).unwrap(), before, "not compacted");

        // A forced compaction while readers are busy: they wait, nobody fails.
        let s = Arc::new(s);
        let readers: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                tokio::spawn(async move {
                    for _ in 0..50 {
                        assert_eq!(s.version(201).await.unwrap().unwrap().documents["a"], doc(201));
                    }
                })
            })
            .collect();
        let t = Instant::now();
        let c = s.compact().await.unwrap();
        eprintln!("forced compaction: {} -> {} bytes in {:?}", c.before, c.after, t.elapsed());
        for r in readers {
            r.await.unwrap();
        }
        assert_eq!(chain(&s).await.records, 203);
        drop(s);

        let s = EmbeddedStore::open(&path).unwrap();
        assert_eq!(s.head().await.unwrap(), 201);
        assert_eq!(s.history(100).await.unwrap().len(), 10);
        for v in 192..=201 {
            assert_eq!(s.version(v).await.unwrap().unwrap().documents["a"], doc(v), "version {v}");
        }
        assert_eq!(chain(&s).await.records, 203);

        // An audit prune that frees enough compacts too; the chain verifies from its base.
        let big = |i: u64| {
            crate::audit::Draft::new("admin/t", "x", "success", serde_json::json!({ "pad": doc(i) }))
        };
        let head = s.append_audit((0..100).map(big).collect()).await.unwrap();
        let full = file_len(&path).unwrap();
        let last = s.audit_records(head - 1, 1).await.unwrap();
        let hash = serde_json::from_slice::<crate::audit::Record>(&last[0].1).unwrap().hash;
        let prune = crate::store::contract::prune_draft(head, &hash);
        assert_eq!(s.prune_audit(head, hash, prune).await.unwrap(), (head - 1, head + 1));
        let compacted = file_len(&path).unwrap();
        assert!(compacted < full / 2, "the file shrank: {full} -> {compacted}");
        let v = chain(&s).await;
        assert_eq!((v.base, v.first, v.last), (head - 1, head, head + 1));
        assert_eq!(s.history(100).await.unwrap().len(), 10, "versions untouched");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A file with much free space (pruned by a controller that did not compact) is compacted
    /// when it is opened; an offline open never changes it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_file_with_much_free_space_is_compacted_at_open() {
        let (dir, path, s) = filled("store-compact-open", 100).await;
        {
            let tx = s.db.read().unwrap().begin_write().unwrap();
            tx.open_table(VERSIONS).unwrap().retain_in(..100, |_, _| false).unwrap();
            tx.commit().unwrap();
        }
        drop(s);
        let full = file_len(&path).unwrap();
        drop(EmbeddedStore::open_existing(&path).unwrap());
        assert_eq!(file_len(&path).unwrap(), full, "an offline open changes nothing");
        let s = EmbeddedStore::open(&path).unwrap();
        let compacted = file_len(&path).unwrap();
        assert!(compacted < full / 4, "compacted at open: {full} -> {compacted}");
        assert_eq!(s.version(100).await.unwrap().unwrap().documents["a"], doc(100));
        assert_eq!(chain(&s).await.records, 100);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
