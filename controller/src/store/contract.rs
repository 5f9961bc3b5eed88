//! What every [`Store`] must do, as one sequence of calls on an empty store. The tests of
//! each implementation run it (the embedded store in its unit tests, etcd against a real
//! cluster), so both are held to the same behaviour.

use super::{EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta, VersionsPruned};
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
        Ok(v) => assert_eq!((v.records, v.first, v.last, v.base), (2, 1, 2, 0)),
        Err(bad) => panic!("audit chain broken: {bad}"),
    }

    // Tokens are listed and redeemable once.
    let tok = JoinToken {
        role: "enforcer".into(),
        name: "h".into(),
        expires_ms: 0,
        cert_ttl_s: 1,
        created_by: "x".into(),
        created_ms: 7,
    };
    let other = JoinToken { name: "g".into(), ..tok.clone() };
    assert!(s.tokens().await.unwrap().is_empty());
    s.put_token("h1".into(), tok.clone()).await.unwrap();
    s.put_token("h2".into(), other.clone()).await.unwrap();
    let mut listed = s.tokens().await.unwrap();
    listed.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(listed, vec![("h1".to_owned(), tok.clone()), ("h2".to_owned(), other.clone())]);
    assert_eq!(s.take_token("h1".into()).await.unwrap(), Some(tok));
    assert_eq!(s.take_token("h1".into()).await.unwrap(), None);
    assert_eq!(s.tokens().await.unwrap(), vec![("h2".to_owned(), other.clone())]);
    assert_eq!(s.take_token("h2".into()).await.unwrap(), Some(other));
    assert!(s.tokens().await.unwrap().is_empty());

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

/// The draft of an `audit.prune` record, as the controller makes it.
#[must_use]
pub fn prune_draft(before: u64, last_hash: &str) -> audit::Draft {
    audit::Draft::new(
        "admin/t",
        audit::PRUNE,
        "success",
        serde_json::json!({ "before": before, "last_hash": last_hash, "archive_sha256": "ab".repeat(32) }),
    )
}

async fn records(s: &dyn Store) -> Vec<(u64, audit::Record)> {
    let recs = s.audit_records(1, 100).await.unwrap();
    recs.iter().map(|(k, b)| (*k, serde_json::from_slice(b).unwrap())).collect()
}

async fn verified(s: &dyn Store) -> audit::Verified {
    match crate::service::verify_chain(s).await.unwrap() {
        Ok(v) => v,
        Err(bad) => panic!("audit chain broken: {bad}"),
    }
}

/// Archive-and-prune, on an empty store: refusals change nothing; a prune deletes exactly the
/// records before `before`, stores the base and appends its `audit.prune` record in one step;
/// the chain verifies from the base and appends continue on it. Leaves audit sequence 9.
///
/// # Panics
/// On the first behaviour that breaks the contract, naming it.
pub async fn prune(s: &dyn Store) {
    assert_eq!(s.append_audit(vec![draft(); 5]).await.unwrap(), 5);
    assert_eq!(s.audit_base().await.unwrap(), None, "nothing pruned yet");
    let before = records(s).await;
    let head = s.audit_head().await.unwrap();
    let h3 = before[2].1.hash.clone();

    // Refusals name the record and change nothing.
    let refusals = [
        (4, audit::GENESIS.to_owned(), "audit record 3: its hash"),
        (6, before[4].1.hash.clone(), "always kept"),
        (1, audit::GENESIS.to_owned(), "nothing to prune"),
    ];
    for (b, hash, says) in refusals {
        let e = s.prune_audit(b, hash.clone(), prune_draft(b, &hash)).await.unwrap_err();
        assert!(matches!(&e, StoreError::Precondition(m) if m.contains(says)), "prune before {b}: {e}");
        assert_eq!(records(s).await, before, "a refused prune before {b} changed the records");
        assert_eq!(s.audit_head().await.unwrap(), head, "a refused prune before {b} moved the head");
        assert_eq!(s.audit_base().await.unwrap(), None, "a refused prune before {b} stored a base");
    }

    // Records 1..=3 go; the base is record 3; the prune record follows the old head.
    assert_eq!(s.prune_audit(4, h3.clone(), prune_draft(4, &h3)).await.unwrap(), (3, 6));
    let after = records(s).await;
    assert_eq!(after.iter().map(|r| r.0).collect::<Vec<_>>(), vec![4, 5, 6], "records 1-3 pruned");
    assert_eq!(after[..2], before[3..], "retained records are untouched");
    let p = &after[2].1;
    assert_eq!(
        (p.action.as_str(), p.actor.as_str(), p.prev.as_str()),
        (audit::PRUNE, "admin/t", &*head.hash)
    );
    assert_eq!(p.detail["before"], 4);
    assert_eq!(p.detail["first"], 1);
    assert_eq!(p.detail["count"], 3);
    assert_eq!(p.detail["last_hash"], h3);
    assert_eq!(s.audit_head().await.unwrap(), audit::Head { seq: 6, hash: p.hash.clone() });
    assert_eq!(s.audit_base().await.unwrap(), Some(audit::Head { seq: 3, hash: h3.clone() }));
    assert_eq!(verified(s).await, audit::Verified { records: 3, first: 4, last: 6, base: 3, anchors: 0 });

    // Appends continue on the chain; an already pruned range cannot be pruned again.
    assert_eq!(s.append_audit(vec![draft()]).await.unwrap(), 7);
    assert_eq!(verified(s).await.records, 4);
    let e = s.prune_audit(3, before[1].1.hash.clone(), prune_draft(3, &h3)).await.unwrap_err();
    assert!(matches!(&e, StoreError::Precondition(m) if m.contains("starts at record 4")), "{e}");

    // A second prune, up to the head record (kept), starts at the base.
    let h6 = p.hash.clone();
    assert_eq!(s.prune_audit(7, h6.clone(), prune_draft(7, &h6)).await.unwrap(), (3, 8));
    assert_eq!(s.audit_records(1, 100).await.unwrap().iter().map(|r| r.0).collect::<Vec<_>>(), vec![7, 8]);
    assert_eq!(s.audit_base().await.unwrap(), Some(audit::Head { seq: 6, hash: h6 }));
    assert_eq!(s.append_audit(vec![draft()]).await.unwrap(), 9);
    assert_eq!(verified(s).await, audit::Verified { records: 3, first: 7, last: 9, base: 6, anchors: 0 });
}

/// The draft of a `policy.prune` record, as the controller makes it.
#[must_use]
pub fn history_prune_draft() -> audit::Draft {
    audit::Draft::new("admin/t", "policy.prune", "success", serde_json::json!({}))
}

async fn kept(s: &dyn Store) -> Vec<u64> {
    s.history(100).await.unwrap().iter().map(|m| m.version).collect()
}

/// The last audit record, which must be the `policy.prune` record of `done`.
async fn check_prune_record(s: &dyn Store, keep: u64, done: &VersionsPruned) {
    let head = s.audit_head().await.unwrap();
    assert_eq!(done.record, head.seq, "the prune record is the last one");
    let recs = s.audit_records(head.seq, 1).await.unwrap();
    let r: audit::Record = serde_json::from_slice(&recs[0].1).unwrap();
    assert_eq!((r.action.as_str(), r.actor.as_str()), ("policy.prune", "admin/t"));
    assert_eq!(r.detail["keep"], keep);
    assert_eq!(r.detail["pruned"], done.pruned);
    assert_eq!(r.detail["oldest_kept"], done.oldest_kept);
    assert_eq!(r.detail["blobs_removed"], done.blobs_removed);
}

/// Retention of the policy history, on an empty store: a prune keeps the head and the
/// versions just before it, deletes the rest with its audit record, never renumbers, and
/// commits (also of a pruned version's documents) continue. Leaves version 7, audit sequence
/// 11.
///
/// # Panics
/// On the first behaviour that breaks the contract, naming it.
pub async fn prune_history(s: &dyn Store) {
    // Nothing to prune in an empty history; the call is still audited.
    let done = s.prune_versions(1, history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.blobs_removed), (0, 0, 0));
    check_prune_record(s, 1, &done).await;
    let docs: [&[(&str, &str)]; 5] =
        [&[("a", "x")], &[("a", "y")], &[("a", "x"), ("b", "1")], &[("a", "z")], &[("a", "z"), ("c", "2")]];
    for (i, d) in docs.iter().enumerate() {
        let v = i as u64;
        assert_eq!(s.commit(v, version(d), draft()).await.unwrap(), (v + 1, v + 2));
    }
    assert_eq!(s.oldest_version().await.unwrap(), 1, "nothing pruned yet");

    // keep 0 is refused and changes nothing.
    let e = s.prune_versions(0, history_prune_draft()).await.unwrap_err();
    assert!(matches!(&e, StoreError::Precondition(m) if m.contains("at least 1")), "{e}");
    assert_eq!(kept(s).await, vec![5, 4, 3, 2, 1], "a refused prune deleted versions");
    assert_eq!(s.audit_head().await.unwrap().seq, 6, "a refused prune was audited");

    // Keep 3: versions 1 and 2 go, the head stays, nothing is renumbered.
    let done = s.prune_versions(3, history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.record), (2, 3, 7));
    check_prune_record(s, 3, &done).await;
    assert_eq!(kept(s).await, vec![5, 4, 3]);
    assert_eq!(s.oldest_version().await.unwrap(), 3);
    assert!(s.version(1).await.unwrap().is_none() && s.version(2).await.unwrap().is_none());
    assert_eq!(s.head().await.unwrap(), 5, "the head is unchanged");
    for (v, d) in [(3, docs[2]), (4, docs[3]), (5, docs[4])] {
        let got = s.version(v).await.unwrap().unwrap_or_else(|| panic!("kept version {v} is gone"));
        assert_eq!((got.meta.version, got.documents), (v, version(d).documents), "kept version {v}");
    }

    // Commits continue; the documents of a kept version can be committed again (a rollback).
    assert_eq!(s.commit(5, version(docs[2]), draft()).await.unwrap(), (6, 8));
    assert_eq!(s.version(6).await.unwrap().unwrap().documents, version(docs[2]).documents);
    // Keeping more than there is deletes nothing.
    let done = s.prune_versions(10, history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.record), (0, 3, 9));
    // Keep 1: only the head stays, with every document it shares with pruned versions.
    let done = s.prune_versions(1, history_prune_draft()).await.unwrap();
    assert_eq!((done.pruned, done.oldest_kept, done.record), (3, 6, 10));
    check_prune_record(s, 1, &done).await;
    assert_eq!(kept(s).await, vec![6]);
    assert_eq!(s.version(6).await.unwrap().unwrap().documents, version(docs[2]).documents);
    // The next version is 7, never a reused number.
    assert_eq!(s.commit(6, version(&[("a", "y")]), draft()).await.unwrap(), (7, 11));
    assert_eq!(kept(s).await, vec![7, 6]);
    assert_eq!(s.version(7).await.unwrap().unwrap().documents["a"], "y");
    assert_eq!(verified(s).await, audit::Verified { records: 11, first: 1, last: 11, base: 0, anchors: 0 });
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
