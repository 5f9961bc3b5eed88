//! What every [`Store`] must do, as one sequence of calls on an empty store. The tests of
//! each implementation run it (the embedded store in its unit tests, etcd against a real
//! cluster), so both are held to the same behaviour.

use super::{EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta};
use crate::audit;

/// A policy version of `docs` (name, content) by `admin/t`.
#[must_use]
pub fn version(docs: &[(&str, &str)]) -> PolicyVersion {
    PolicyVersion {
        meta: VersionMeta { actor: "admin/t".into(), ..VersionMeta::default() },
        documents: docs.iter().map(|(a, b)| ((*a).to_owned(), (*b).to_owned())).collect(),
    }
}

/// The audit draft of a policy apply.
#[must_use]
pub fn draft() -> audit::Draft {
    audit::Draft::new("admin/t", "policy.apply", "success", serde_json::json!({}))
}

/// Run the contract on an empty store. Leaves it at policy version 2, audit sequence 2, meta
/// `cursor` = 17 and one enforcer record, for callers that go on to check persistence.
///
/// # Panics
/// On the first behaviour that breaks the contract, naming it.
pub async fn run(s: &dyn Store) {
    assert_eq!(s.head().await.unwrap(), 0, "an empty store is at version 0");
    assert_eq!(s.audit_head().await.unwrap(), audit::Head { seq: 0, hash: audit::GENESIS.into() });

    // Commits are versioned, checked against the head the caller saw, and audited.
    assert_eq!(s.commit(0, version(&[("a", "x")]), draft()).await.unwrap(), (1, 1));
    assert_eq!(s.commit(1, version(&[("a", "y")]), draft()).await.unwrap(), (2, 2));
    let e = s.commit(1, version(&[("a", "z")]), draft()).await.unwrap_err();
    assert!(matches!(e, StoreError::Conflict { expected: 1, current: 2 }), "{e}");
    let v1 = s.version(1).await.unwrap().unwrap();
    assert_eq!(v1.documents["a"], "x");
    assert_eq!(v1.meta.version, 1);
    assert_eq!(v1.meta.actor, "admin/t");
    assert!(s.version(3).await.unwrap().is_none(), "no version past the head");
    assert_eq!(s.history(10).await.unwrap().iter().map(|m| m.version).collect::<Vec<_>>(), vec![2, 1]);
    assert_eq!(s.history(1).await.unwrap().len(), 1);

    // The audit record of a commit names the version it made; ranges are honoured.
    let recs = s.audit_records(1, 10).await.unwrap();
    assert_eq!(recs.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 2]);
    let r: audit::Record = serde_json::from_slice(&recs[1].1).unwrap();
    assert_eq!(r.detail["version"], 2);
    assert_eq!(s.audit_records(2, 10).await.unwrap().len(), 1);
    assert!(s.audit_records(1, 0).await.unwrap().is_empty());
    assert_eq!(s.append_audit(vec![]).await.unwrap(), 2, "an empty append changes nothing");
    match crate::service::verify_chain(s).await.unwrap() {
        Ok(n) => assert_eq!(n, 2),
        Err(bad) => panic!("audit chain broken: {bad}"),
    }

    // Tokens are redeemable once.
    let tok = JoinToken {
        role: "enforcer".into(),
        name: "h".into(),
        expires_ms: 0,
        cert_ttl_s: 1,
        created_by: "x".into(),
    };
    s.put_token("h1".into(), tok.clone()).await.unwrap();
    assert_eq!(s.take_token("h1".into()).await.unwrap(), Some(tok));
    assert_eq!(s.take_token("h1".into()).await.unwrap(), None);

    // Named values and enforcers.
    assert_eq!(s.get_meta("cursor".into()).await.unwrap(), None);
    s.put_meta("cursor".into(), "17".into()).await.unwrap();
    assert_eq!(s.get_meta("cursor".into()).await.unwrap().as_deref(), Some("17"));
    let rec = EnforcerRecord {
        name: "h".into(),
        enforced_version: 2,
        last_seen_ms: 5,
        policy_error: String::new(),
    };
    s.put_enforcer(rec.clone()).await.unwrap();
    assert_eq!(s.enforcers().await.unwrap(), vec![rec]);
}

/// What a reopened store must still hold after [`run`].
///
/// # Panics
/// If anything [`run`] left is missing.
pub async fn persisted(s: &dyn Store) {
    assert_eq!(s.head().await.unwrap(), 2);
    assert_eq!(*s.watch_head().borrow(), 2);
    assert_eq!(s.audit_head().await.unwrap().seq, 2);
    assert_eq!(s.version(2).await.unwrap().unwrap().documents["a"], "y");
    assert_eq!(s.get_meta("cursor".into()).await.unwrap().as_deref(), Some("17"));
    assert_eq!(s.enforcers().await.unwrap().len(), 1);
}
