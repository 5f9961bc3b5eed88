//! The audit log: append-only, hash-chained records.
//!
//! Record `n` is stored as JSON under sequence number `n` (from 1) and carries `prev`, the
//! hash of record `n - 1` (64 zeros for record 1), and `hash`, the SHA-256 of the record's
//! canonical JSON without the `hash` field. The store also keeps a head (`seq`, `hash`) that
//! is updated in the same transaction as each append, so a truncated tail is detected too.
//! [`Verifier`] walks the records in order and names the first one that is missing, altered,
//! out of place or unparsable.

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

/// `prev` of the first record.
pub const GENESIS: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// What a caller asks to record; the store assigns `seq` and `prev` when appending.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Draft {
    pub time_ms: i64,
    /// `role/name` of the mTLS identity, or `anonymous`, or `controller`.
    pub actor: String,
    /// Dotted action name, e.g. `policy.apply`, `api.denied`, `flow.denied`.
    pub action: String,
    /// `success`, `failure` or `denied`.
    pub outcome: String,
    pub detail: serde_json::Value,
}

impl Draft {
    #[must_use]
    pub fn new(actor: impl Into<String>, action: &str, outcome: &str, detail: serde_json::Value) -> Self {
        Self {
            time_ms: crate::now_ms(),
            actor: actor.into(),
            action: action.into(),
            outcome: outcome.into(),
            detail,
        }
    }
}

/// A stored record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Record {
    pub seq: u64,
    pub time_ms: i64,
    pub actor: String,
    pub action: String,
    pub outcome: String,
    pub detail: serde_json::Value,
    pub prev: String,
    pub hash: String,
}

/// The hashed part of a record, in a fixed field order.
#[derive(Serialize)]
struct Hashed<'a> {
    seq: u64,
    time_ms: i64,
    actor: &'a str,
    action: &'a str,
    outcome: &'a str,
    detail: &'a serde_json::Value,
    prev: &'a str,
}

fn digest(h: &Hashed<'_>) -> String {
    // serde_json writes maps with sorted keys (no preserve_order), so this is canonical.
    let bytes = serde_json::to_vec(h).unwrap_or_default();
    hex::encode(Sha256::digest(&bytes))
}

/// Build record `seq` after a record whose hash is `prev`: the stored bytes and the hash.
#[must_use]
pub fn seal(d: &Draft, seq: u64, prev: &str) -> (Vec<u8>, String) {
    let hash = digest(&Hashed {
        seq,
        time_ms: d.time_ms,
        actor: &d.actor,
        action: &d.action,
        outcome: &d.outcome,
        detail: &d.detail,
        prev,
    });
    let r = Record {
        seq,
        time_ms: d.time_ms,
        actor: d.actor.clone(),
        action: d.action.clone(),
        outcome: d.outcome.clone(),
        detail: d.detail.clone(),
        prev: prev.to_owned(),
        hash: hash.clone(),
    };
    (serde_json::to_vec(&r).unwrap_or_default(), hash)
}

/// The store's record of the last appended record.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, Default)]
pub struct Head {
    pub seq: u64,
    pub hash: String,
}

/// The first bad record and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("audit record {seq}: {message}")]
pub struct BadRecord {
    pub seq: u64,
    pub message: String,
}

/// Incremental chain check: feed records in key order, then [`Verifier::finish`].
#[derive(Debug)]
pub struct Verifier {
    next: u64,
    prev: String,
}

impl Default for Verifier {
    fn default() -> Self {
        Self { next: 1, prev: GENESIS.to_owned() }
    }
}

impl Verifier {
    /// Check the record stored under `key`.
    pub fn feed(&mut self, key: u64, bytes: &[u8]) -> Result<Record, BadRecord> {
        let bad = |seq, message: String| Err(BadRecord { seq, message });
        if key != self.next {
            return bad(self.next, format!("missing (the next stored record is {key})"));
        }
        let r: Record = match serde_json::from_slice(bytes) {
            Ok(r) => r,
            Err(e) => return bad(key, format!("not a valid record ({e}): modified")),
        };
        if r.seq != key {
            return bad(key, format!("stored as {key} but names itself {}", r.seq));
        }
        if r.prev != self.prev {
            return bad(key, "does not follow the record before it (prev hash differs)".into());
        }
        let h = digest(&Hashed {
            seq: r.seq,
            time_ms: r.time_ms,
            actor: &r.actor,
            action: &r.action,
            outcome: &r.outcome,
            detail: &r.detail,
            prev: &r.prev,
        });
        if h != r.hash {
            return bad(key, "contents do not match its hash: modified".into());
        }
        self.prev.clone_from(&r.hash);
        self.next += 1;
        Ok(r)
    }

    /// Check the end of the chain against the store's head. Returns the number of records.
    pub fn finish(&self, head: &Head) -> Result<u64, BadRecord> {
        let last = self.next - 1;
        if head.seq > last {
            return Err(BadRecord {
                seq: last + 1,
                message: format!("missing (the log ends at {last}, its head at {})", head.seq),
            });
        }
        if head.seq < last {
            return Err(BadRecord {
                seq: head.seq + 1,
                message: format!("beyond the head ({}) of the log", head.seq),
            });
        }
        if last > 0 && head.hash != self.prev {
            return Err(BadRecord { seq: last, message: "does not match the head's hash: modified".into() });
        }
        Ok(last)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chain(n: u64) -> (Vec<Vec<u8>>, Head) {
        let mut prev = GENESIS.to_owned();
        let mut out = Vec::new();
        for seq in 1..=n {
            let d = Draft::new("admin/alice", "policy.apply", "success", serde_json::json!({"version": seq}));
            let (bytes, hash) = seal(&d, seq, &prev);
            out.push(bytes);
            prev = hash;
        }
        (out, Head { seq: n, hash: prev })
    }

    fn verify(records: &[(u64, Vec<u8>)], head: &Head) -> Result<u64, BadRecord> {
        let mut v = Verifier::default();
        for (k, b) in records {
            v.feed(*k, b)?;
        }
        v.finish(head)
    }

    fn keyed(c: &[Vec<u8>]) -> Vec<(u64, Vec<u8>)> {
        c.iter().enumerate().map(|(i, b)| (i as u64 + 1, b.clone())).collect()
    }

    #[test]
    fn intact_chain_verifies() {
        let (c, head) = chain(5);
        assert_eq!(verify(&keyed(&c), &head), Ok(5));
        assert_eq!(verify(&[], &Head::default()), Ok(0));
    }

    #[test]
    fn a_changed_value_names_its_record() {
        let (c, head) = chain(5);
        let mut k = keyed(&c);
        let s = String::from_utf8(k[2].1.clone()).unwrap().replace("\"version\":3", "\"version\":4");
        k[2].1 = s.into_bytes();
        let e = verify(&k, &head).unwrap_err();
        assert_eq!(e.seq, 3, "{e}");
        assert!(e.message.contains("modified"), "{e}");
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let (c, head) = chain(3);
        for i in 0..c[1].len() {
            let mut k = keyed(&c);
            k[1].1[i] ^= 0x01;
            let e = verify(&k, &head).unwrap_err();
            assert_eq!(e.seq, 2, "byte {i}: {e}");
        }
    }

    #[test]
    fn a_deleted_record_is_a_gap() {
        let (c, head) = chain(5);
        let mut k = keyed(&c);
        k.remove(1);
        let e = verify(&k, &head).unwrap_err();
        assert_eq!(e.seq, 2);
        assert!(e.message.contains("missing"), "{e}");
    }

    #[test]
    fn a_truncated_tail_is_detected_by_the_head() {
        let (c, head) = chain(5);
        let k = keyed(&c[..4]);
        let e = verify(&k, &head).unwrap_err();
        assert_eq!(e.seq, 5);
    }

    #[test]
    fn a_rehashed_record_breaks_the_next_link() {
        // Rewriting record 2 and recomputing its own hash still breaks record 3's prev.
        let (c, head) = chain(4);
        let mut k = keyed(&c);
        let r1: Record = serde_json::from_slice(&c[0]).unwrap();
        let forged = Draft::new("admin/mallory", "policy.apply", "success", serde_json::json!({}));
        k[1].1 = seal(&forged, 2, &r1.hash).0;
        let e = verify(&k, &head).unwrap_err();
        assert_eq!(e.seq, 3, "{e}");
    }
}
