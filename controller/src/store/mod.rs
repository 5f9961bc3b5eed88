//! Controller state behind one trait.
//!
//! Two implementations: [`embedded::EmbeddedStore`] (one redb file, the default) and
//! [`etcd::EtcdStore`] (HA: several controllers share an etcd cluster). Every write that must
//! be atomic is one method here — a policy commit writes the version, moves the head and
//! appends its audit record in one transaction, so a crash leaves either all or none of it.

#[doc(hidden)]
pub mod contract;
pub mod embedded;
pub mod etcd;

use std::{collections::BTreeMap, future::Future, pin::Pin};

use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use crate::audit;

pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Optimistic concurrency failed: the head is no longer what the caller saw.
    #[error("policy version conflict: expected {expected}, current is {current}")]
    Conflict { expected: u64, current: u64 },
    #[error("store: {0}")]
    Backend(String),
    #[error("store: corrupt value at {key}: {message}")]
    Corrupt { key: String, message: String },
    /// The store's state does not allow the request (e.g. a prune whose records do not chain
    /// or do not end with the hash the caller archived); nothing was changed.
    #[error("{0}")]
    Precondition(String),
}

impl StoreError {
    pub fn backend(e: impl std::fmt::Display) -> Self {
        Self::Backend(e.to_string())
    }
}

/// Metadata of one policy version.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct VersionMeta {
    pub version: u64,
    pub actor: String,
    pub time_ms: i64,
    pub message: String,
    #[serde(default)]
    pub rolled_back_to: u64,
    pub documents: u32,
    pub summary: String,
}

/// A complete policy version: its documents (name → YAML text).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct PolicyVersion {
    pub meta: VersionMeta,
    pub documents: BTreeMap<String, String>,
}

/// What a prune of the policy history did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct VersionsPruned {
    /// Versions deleted.
    pub pruned: u64,
    /// The oldest version still stored (0 while there is none).
    pub oldest_kept: u64,
    /// Document blobs deleted (etcd store; the embedded store keeps documents in their version).
    pub blobs_removed: u64,
    /// Sequence number of the (last) `policy.prune` audit record.
    pub record: u64,
}

/// The first version a prune keeping `keep` versions up to `head` keeps (0 for an empty history).
pub(crate) fn keep_from(head: u64, keep: u64) -> u64 {
    if head == 0 { 0 } else { head.saturating_sub(keep.saturating_sub(1)).max(1) }
}

/// The refusal of `keep` 0.
pub(crate) fn check_keep(keep: u64) -> Result<(), StoreError> {
    if keep == 0 {
        return Err(StoreError::Precondition(
            "keep must be at least 1: the current version is always kept".into(),
        ));
    }
    Ok(())
}

/// Put what a prune (step) did into the detail of its `policy.prune` record.
pub(crate) fn versions_prune_detail(draft: &mut audit::Draft, keep: u64, done: &VersionsPruned) {
    if let serde_json::Value::Object(m) = &mut draft.detail {
        m.insert("keep".into(), keep.into());
        m.insert("pruned".into(), done.pruned.into());
        m.insert("oldest_kept".into(), done.oldest_kept.into());
        m.insert("blobs_removed".into(), done.blobs_removed.into());
    }
}

/// A one-time join token (stored by the SHA-256 of its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinToken {
    pub role: String,
    pub name: String,
    pub expires_ms: i64,
    pub cert_ttl_s: u64,
    pub created_by: String,
    /// When it was created (ms; 0 for tokens stored before this was recorded, which count as
    /// older than any revocation).
    #[serde(default)]
    pub created_ms: i64,
}

/// What an enforcer last reported.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct EnforcerRecord {
    pub name: String,
    pub enforced_version: u64,
    pub last_seen_ms: i64,
    pub policy_error: String,
}

/// The controller's state store.
pub trait Store: Send + Sync + 'static {
    /// Current policy version (0 before the first apply).
    fn head(&self) -> BoxFut<'_, u64>;
    /// Notified with the head version whenever it changes (also changes made by other
    /// controllers sharing the store).
    fn watch_head(&self) -> watch::Receiver<u64>;
    /// Atomically: if the head is `expected`, store `version.documents` as version
    /// `expected + 1`, move the head there and append `audit` (whose detail gets the version).
    /// Returns the new version and the audit sequence number.
    fn commit(&self, expected: u64, version: PolicyVersion, audit: audit::Draft) -> BoxFut<'_, (u64, u64)>;
    /// A stored version (`None` if it does not exist).
    fn version(&self, v: u64) -> BoxFut<'_, Option<PolicyVersion>>;
    /// Metadata of the kept versions, newest first.
    fn history(&self, limit: usize) -> BoxFut<'_, Vec<VersionMeta>>;
    /// The oldest stored version (0 while there is none); the versions before it were pruned.
    fn oldest_version(&self) -> BoxFut<'_, u64>;
    /// Retention of the policy history: keep the head and the `keep - 1` versions before it,
    /// delete the older ones and append `audit` (its detail gets `keep`, `pruned`,
    /// `oldest_kept` and `blobs_removed`) in the same transaction, guarded against a
    /// concurrent commit. Stores that keep documents apart from their versions (etcd) also
    /// delete the documents no kept version references. `keep` 0 is refused with
    /// [`StoreError::Precondition`].
    fn prune_versions(&self, keep: u64, audit: audit::Draft) -> BoxFut<'_, VersionsPruned>;

    /// Append records to the audit chain (one transaction); returns the last sequence number.
    fn append_audit(&self, drafts: Vec<audit::Draft>) -> BoxFut<'_, u64>;
    /// Stored audit records with sequence ≥ `from`, byte for byte, in order.
    fn audit_records(&self, from: u64, limit: usize) -> BoxFut<'_, Vec<(u64, Vec<u8>)>>;
    fn audit_head(&self) -> BoxFut<'_, audit::Head>;
    /// The last pruned record (sequence and hash), where the retained chain starts; `None` if
    /// nothing was ever pruned.
    fn audit_base(&self) -> BoxFut<'_, Option<audit::Head>>;
    /// Atomically, if the retained records before `before` chain from the base and the last
    /// of them has hash `last_hash`: append `prune` (its detail gets `first` and `count`),
    /// delete the records before `before` and make record `before - 1` the base. The head
    /// record is always kept. Returns the number of records deleted and the sequence of the
    /// prune record; a refusal is [`StoreError::Precondition`] naming the record and changes
    /// nothing.
    fn prune_audit(&self, before: u64, last_hash: String, prune: audit::Draft) -> BoxFut<'_, (u64, u64)>;

    /// Store a join token under the hash of its secret.
    fn put_token(&self, hash: String, token: JoinToken) -> BoxFut<'_, ()>;
    /// Remove and return a join token (atomically: a token is redeemed at most once).
    fn take_token(&self, hash: String) -> BoxFut<'_, Option<JoinToken>>;
    /// Every stored join token with the hash it is stored under.
    fn tokens(&self) -> BoxFut<'_, Vec<(String, JoinToken)>>;

    fn put_enforcer(&self, rec: EnforcerRecord) -> BoxFut<'_, ()>;
    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>>;

    /// Small named values (e.g. the SIEM export cursor).
    fn get_meta(&self, key: String) -> BoxFut<'_, Option<String>>;
    fn put_meta(&self, key: String, value: String) -> BoxFut<'_, ()>;

    /// `true` while this controller holds leadership (leader-only work: SIEM export, deleting
    /// expired join tokens, etcd compaction). The embedded store is always its controller's
    /// leader.
    fn leadership(&self) -> watch::Receiver<bool>;
}

/// The check before a prune: the retained records `first..before`, fed page by page as
/// [`PruneCheck::wants`] asks, must chain from the base and end with `last_hash`.
pub(crate) struct PruneCheck {
    v: audit::Verifier,
    first: u64,
    before: u64,
    last_hash: String,
    /// Where the next page starts; `None` once everything before `before` was read.
    from: Option<u64>,
}

fn refused(b: &audit::BadRecord) -> StoreError {
    StoreError::Precondition(format!("cannot prune: {b}"))
}

impl PruneCheck {
    pub(crate) fn new(base: Option<&audit::Head>, first: u64, before: u64, last_hash: &str) -> Self {
        Self {
            v: audit::Verifier::after(base),
            first,
            before,
            last_hash: last_hash.to_owned(),
            from: Some(first),
        }
    }

    /// The sequence number the next page of records should start at, if more are needed.
    pub(crate) fn wants(&self) -> Option<u64> {
        self.from.filter(|f| *f < self.before)
    }

    /// Check a page of stored records (sequence ≥ [`PruneCheck::wants`], in order).
    pub(crate) fn feed(&mut self, page: &[(u64, Vec<u8>)]) -> Result<(), StoreError> {
        self.from = page.last().map(|(k, _)| *k + 1);
        for (k, bytes) in page.iter().take_while(|(k, _)| *k < self.before) {
            self.v.feed(*k, bytes).map_err(|b| refused(&b))?;
        }
        Ok(())
    }

    /// After the last page: the number of records to prune, or why not.
    pub(crate) fn finish(&self) -> Result<u64, StoreError> {
        self.v.check_prune_end(self.before, &self.last_hash).map_err(|b| refused(&b))?;
        Ok(self.before - self.first)
    }
}

/// Put `first` and `count` into the detail of a prune record.
pub(crate) fn prune_detail(draft: &mut audit::Draft, first: u64, count: u64) {
    if let serde_json::Value::Object(m) = &mut draft.detail {
        m.insert("first".into(), first.into());
        m.insert("count".into(), count.into());
    }
}

/// The summary line of a change between two document sets: `+added ~changed -removed`.
#[must_use]
pub fn summary(old: &BTreeMap<String, String>, new: &BTreeMap<String, String>) -> String {
    let mut parts = Vec::new();
    for (n, c) in new {
        match old.get(n) {
            None => parts.push(format!("+{n}")),
            Some(o) if o != c => parts.push(format!("~{n}")),
            Some(_) => {}
        }
    }
    for n in old.keys() {
        if !new.contains_key(n) {
            parts.push(format!("-{n}"));
        }
    }
    parts.join(" ")
}
