//! The embedded store: one redb file (`<data-dir>/ztseg.redb`).
//!
//! `redb` was chosen over `SQLite` because it is pure Rust (no C toolchain, fast builds), its
//! write transactions are ACID with copy-on-write pages and an fsync at commit (a committed
//! transaction survives kill -9 and power loss; an uncommitted one leaves no trace), and the
//! controller needs only ordered key/value tables, not SQL. The file is locked by the
//! process that opens it, so a second controller on the same file fails at start instead of
//! corrupting it; HA is etcd's job.

use std::{path::Path, sync::Arc};

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
    db: Arc<Database>,
    head_tx: watch::Sender<u64>,
    leader: watch::Sender<bool>,
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

impl EmbeddedStore {
    /// Open (or create) the store file.
    pub fn open(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        let db = Database::create(path).with_context(|| format!("opening the store {}", path.display()))?;
        let tx = db.begin_write()?;
        {
            tx.open_table(VERSIONS)?;
            tx.open_table(AUDIT)?;
            tx.open_table(TOKENS)?;
            tx.open_table(ENFORCERS)?;
            tx.open_table(META)?;
        }
        tx.commit()?;
        let head = {
            let rtx = db.begin_read()?;
            let meta = rtx.open_table(META)?;
            match meta.get(POLICY_HEAD)? {
                Some(v) => v.value().parse().context("corrupt policy head")?,
                None => 0,
            }
        };
        Ok(Self { db: Arc::new(db), head_tx: watch::Sender::new(head), leader: watch::Sender::new(true) })
    }

    /// Open an existing store without creating or changing anything (offline verification).
    pub fn open_existing(path: &Path) -> anyhow::Result<Self> {
        use anyhow::Context as _;
        if !path.is_file() {
            anyhow::bail!("no store at {} (is this a controller data directory?)", path.display());
        }
        let db = Database::open(path).with_context(|| format!("opening the store {}", path.display()))?;
        Ok(Self { db: Arc::new(db), head_tx: watch::Sender::new(0), leader: watch::Sender::new(false) })
    }

    /// Run blocking database work off the async runtime.
    fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    ) -> BoxFut<'_, T> {
        let db = self.db.clone();
        Box::pin(async move { tokio::task::spawn_blocking(move || f(&db)).await.map_err(be)? })
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
        self.blocking(move |db| {
            super::check_keep(keep)?;
            // One write transaction: the deletion and its audit record land together, and no
            // commit can come between reading the head and deleting. Documents are stored
            // inside their version, so deleting the version frees them.
            let tx = db.begin_write().map_err(be)?;
            let head = read_head(&tx.open_table(META).map_err(be)?)?;
            let from = super::keep_from(head, keep);
            let mut done = VersionsPruned::default();
            {
                let mut t = tx.open_table(VERSIONS).map_err(be)?;
                done.pruned = t.range(..from).map_err(be)?.count() as u64;
                t.retain_in(..from, |_, _| false).map_err(be)?;
                done.oldest_kept = t.first().map_err(be)?.map_or(0, |(k, _)| k.value());
            }
            super::versions_prune_detail(&mut draft, keep, &done);
            done.record = append(&tx, std::slice::from_ref(&draft))?;
            tx.commit().map_err(be)?;
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
        self.blocking(move |db| {
            // One write transaction: the check, the prune record, the deletion and the new base
            // commit together or not at all (and no append can come between them).
            let tx = db.begin_write().map_err(be)?;
            let (base, head) = {
                let meta = tx.open_table(META).map_err(be)?;
                (read_audit_base(&meta)?, read_audit_head(&meta)?)
            };
            let first = audit::prune_start(base.as_ref(), &head, before).map_err(StoreError::Precondition)?;
            let count = {
                let t = tx.open_table(AUDIT).map_err(be)?;
                let mut check = super::PruneCheck::new(base.as_ref(), first, before, &last_hash);
                while let Some(from) = check.wants() {
                    let mut page = Vec::new();
                    for e in t.range(from..before).map_err(be)?.take(1000) {
                        let (k, v) = e.map_err(be)?;
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

    fn put_enforcer(&self, rec: EnforcerRecord) -> BoxFut<'_, ()> {
        self.blocking(move |db| {
            let tx = db.begin_write().map_err(be)?;
            let bytes = serde_json::to_vec(&rec).map_err(be)?;
            tx.open_table(ENFORCERS).map_err(be)?.insert(rec.name.as_str(), bytes.as_slice()).map_err(be)?;
            tx.commit().map_err(be)
        })
    }

    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>> {
        self.blocking(|db| {
            let rtx = db.begin_read().map_err(be)?;
            let t = rtx.open_table(ENFORCERS).map_err(be)?;
            let mut out = Vec::new();
            for e in t.iter().map_err(be)? {
                let (k, v) = e.map_err(be)?;
                out.push(serde_json::from_slice(v.value()).map_err(|e| corrupt(k.value(), e))?);
            }
            Ok(out)
        })
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
        let rtx = s.db.begin_read().unwrap();
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
}
