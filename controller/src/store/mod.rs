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

/// A one-time join token (stored by the SHA-256 of its secret).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct JoinToken {
    pub role: String,
    pub name: String,
    pub expires_ms: i64,
    pub cert_ttl_s: u64,
    pub created_by: String,
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
    /// Version metadata, newest first.
    fn history(&self, limit: usize) -> BoxFut<'_, Vec<VersionMeta>>;

    /// Append records to the audit chain (one transaction); returns the last sequence number.
    fn append_audit(&self, drafts: Vec<audit::Draft>) -> BoxFut<'_, u64>;
    /// Stored audit records with sequence ≥ `from`, byte for byte, in order.
    fn audit_records(&self, from: u64, limit: usize) -> BoxFut<'_, Vec<(u64, Vec<u8>)>>;
    fn audit_head(&self) -> BoxFut<'_, audit::Head>;

    /// Store a join token under the hash of its secret.
    fn put_token(&self, hash: String, token: JoinToken) -> BoxFut<'_, ()>;
    /// Remove and return a join token (atomically: a token is redeemed at most once).
    fn take_token(&self, hash: String) -> BoxFut<'_, Option<JoinToken>>;

    fn put_enforcer(&self, rec: EnforcerRecord) -> BoxFut<'_, ()>;
    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>>;

    /// Small named values (e.g. the SIEM export cursor).
    fn get_meta(&self, key: String) -> BoxFut<'_, Option<String>>;
    fn put_meta(&self, key: String, value: String) -> BoxFut<'_, ()>;

    /// `true` while this controller holds leadership (leader-only work: SIEM export, token
    /// expiry). The embedded store is always its controller's leader.
    fn leadership(&self) -> watch::Receiver<bool>;
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
