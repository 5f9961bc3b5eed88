//! The etcd store (HA): several controllers share one etcd cluster.

use tokio::sync::watch;

use super::{BoxFut, EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta};
use crate::audit;

pub struct EtcdStore {
    head: watch::Sender<u64>,
    leader: watch::Sender<bool>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore").finish_non_exhaustive()
    }
}

impl EtcdStore {
    pub async fn connect(_endpoints: &[String], _prefix: &str, _name: &str) -> anyhow::Result<Self> {
        anyhow::bail!("the etcd store is not implemented yet")
    }
}

fn todo<'a, T: Send + 'a>() -> BoxFut<'a, T> {
    Box::pin(async { Err(StoreError::Backend("etcd store not implemented".into())) })
}

impl Store for EtcdStore {
    fn head(&self) -> BoxFut<'_, u64> { todo() }
    fn watch_head(&self) -> watch::Receiver<u64> { self.head.subscribe() }
    fn commit(&self, _: u64, _: PolicyVersion, _: audit::Draft) -> BoxFut<'_, (u64, u64)> { todo() }
    fn version(&self, _: u64) -> BoxFut<'_, Option<PolicyVersion>> { todo() }
    fn history(&self, _: usize) -> BoxFut<'_, Vec<VersionMeta>> { todo() }
    fn append_audit(&self, _: Vec<audit::Draft>) -> BoxFut<'_, u64> { todo() }
    fn audit_records(&self, _: u64, _: usize) -> BoxFut<'_, Vec<(u64, Vec<u8>)>> { todo() }
    fn audit_head(&self) -> BoxFut<'_, audit::Head> { todo() }
    fn put_token(&self, _: String, _: JoinToken) -> BoxFut<'_, ()> { todo() }
    fn take_token(&self, _: String) -> BoxFut<'_, Option<JoinToken>> { todo() }
    fn put_enforcer(&self, _: EnforcerRecord) -> BoxFut<'_, ()> { todo() }
    fn enforcers(&self) -> BoxFut<'_, Vec<EnforcerRecord>> { todo() }
    fn get_meta(&self, _: String) -> BoxFut<'_, Option<String>> { todo() }
    fn put_meta(&self, _: String, _: String) -> BoxFut<'_, ()> { todo() }
    fn leadership(&self) -> watch::Receiver<bool> { self.leader.subscribe() }
}
