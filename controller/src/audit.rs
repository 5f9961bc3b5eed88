//! The audit log: append-only, hash-chained records.
//!
//! Record `n` is stored as JSON under sequence number `n` (from 1) and carries `prev`, the
//! hash of record `n - 1` (64 zeros for record 1), and `hash`, the SHA-256 of the record's
//! canonical JSON without the `hash` field. The store also keeps a head (`seq`, `hash`) that
//! is updated in the same transaction as each append, so a truncated tail is detected too.
//! [`Verifier`] walks the records in order and names the first one that is missing, altered,
//! out of place or unparsable.
//!
//! # Pruning
//!
//! Old records can be archived elsewhere and deleted (`Audit/Prune`). The store then keeps a
//! *base*: the sequence and hash of the last deleted record. The first retained record must
//! follow the base (`prev` = base hash), and the base itself must be confirmed by the latest
//! [`PRUNE`] record of the chain, whose detail names `before` (base sequence + 1) and
//! `last_hash` (the base hash). So an altered base, further deleted records or an altered
//! prune record are all named, just as without pruning.
//!
//! # Anchors
//!
//! The head and the chain live in the same store and the hash is unkeyed SHA-256, so whoever
//! can write the store can cut off the newest records and rewrite the head to match: the
//! shortened log verifies. An *anchor* — a record's sequence number and hash kept outside the
//! controller (every SIEM line carries both) — catches that: [`Verifier::anchored`] requires
//! the log to still hold that record with that hash. Anchors prove nothing about records after
//! the newest one held outside; the sooner they leave the controller (the SIEM export takes
//! each record within seconds), the less can go unnoticed.

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

/// Action of the record that confirms a prune (see the module documentation).
pub const PRUNE: &str = "audit.prune";

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
    /// Where the chain starts when older records were pruned.
    base: Option<Head>,
    /// The latest successful [`PRUNE`] record fed: (its sequence, its `before`, `last_hash`).
    last_prune: Option<(u64, Option<u64>, String)>,
    /// The first record expected, and the hash it must follow.
    start: (u64, String),
    /// Records that must be in the chain with these hashes (see [`Verifier::anchored`]).
    anchors: std::collections::BTreeMap<u64, String>,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::starting_at(1, GENESIS)
    }
}

/// A record held outside the controller: `SEQ:HASH` (see [`Verifier::anchored`]).
///
/// # Errors
/// A malformed anchor, saying why.
pub fn parse_anchor(s: &str) -> Result<(u64, String), String> {
    let (seq, hash) = s.split_once(':').ok_or_else(|| format!("anchor {s:?}: expected SEQ:HASH"))?;
    let seq: u64 = seq.parse().map_err(|_| format!("anchor {s:?}: {seq:?} is not a sequence number"))?;
    if seq == 0 {
        return Err(format!("anchor {s:?}: records are numbered from 1"));
    }
    if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return Err(format!("anchor {s:?}: the hash is 64 lowercase hex digits"));
    }
    Ok((seq, hash.to_owned()))
}

/// What a verified chain holds: records `first..=last`, `records` of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub first: u64,
    pub last: u64,
    /// The last pruned sequence number (0 if nothing was ever pruned).
    pub base: u64,
    /// Anchors the chain was found to hold.
    pub anchors: u64,
}

impl Verifier {
    /// A check of a chain whose records up to `base.seq` were pruned (`None`: from record 1).
    /// [`Verifier::finish`] then also requires the latest [`PRUNE`] record to confirm `base`.
    #[must_use]
    pub fn after(base: Option<&Head>) -> Self {
        match base {
            None => Self::default(),
            Some(b) => Self { base: Some(b.clone()), ..Self::starting_at(b.seq + 1, &b.hash) },
        }
    }

    /// A check of a piece of a chain (an archive) that starts at record `seq` whose `prev` is
    /// `prev`; nothing confirms that start.
    #[must_use]
    pub fn starting_at(seq: u64, prev: &str) -> Self {
        Self {
            next: seq,
            prev: prev.to_owned(),
            base: None,
            last_prune: None,
            start: (seq, prev.to_owned()),
            anchors: std::collections::BTreeMap::new(),
        }
    }

    /// Also require each anchor (sequence → hash, e.g. taken from the SIEM export) to be in
    /// the chain with that hash. One beyond the end of the chain means records were cut off
    /// (and the head rewritten to match); one before its start — pruned, or outside an
    /// archive — cannot be checked here and fails, naming where to check it, unless it is
    /// the record just before the start, whose hash the first record names.
    #[must_use]
    pub fn anchored(mut self, anchors: impl IntoIterator<Item = (u64, String)>) -> Self {
        self.anchors.extend(anchors);
        self
    }

    /// The sequence number the next record must have.
    #[must_use]
    pub fn next(&self) -> u64 {
        self.next
    }

    /// The hash of the last record fed (or of the start of the chain).
    #[must_use]
    pub fn last_hash(&self) -> &str {
        &self.prev
    }

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
            return bad(
                key,
                if self.base.as_ref().is_some_and(|b| b.seq + 1 == key) {
                    format!(
                        "does not follow the base of the pruned log (record {}; prev hash differs)",
                        key - 1
                    )
                } else {
                    "does not follow the record before it (prev hash differs)".into()
                },
            );
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
        if let Some(want) = self.anchors.get(&key)
            && *want != r.hash
        {
            return bad(
                key,
                format!(
                    "its hash {} is not the anchor's {want}: the log was rewritten from this record on",
                    r.hash
                ),
            );
        }
        if r.action == PRUNE && r.outcome == "success" {
            let before = r.detail["before"].as_u64();
            let last_hash = r.detail["last_hash"].as_str().unwrap_or_default().to_owned();
            self.last_prune = Some((key, before, last_hash));
        }
        self.prev.clone_from(&r.hash);
        self.next += 1;
        Ok(r)
    }

    /// The anchors the records fed did not check: one just before the start against the hash
    /// the first record follows; any other is outside the records fed, before them (`before`
    /// says where to look) or after them (`after` says what that means). Returns how many
    /// anchors were checked.
    pub fn check_anchors(&self, before: &str, after: &str) -> Result<u64, BadRecord> {
        let (start, start_prev) = (self.start.0, self.start.1.as_str());
        let last = self.next - 1;
        for (seq, hash) in &self.anchors {
            let bad = |message: String| Err(BadRecord { seq: *seq, message });
            if *seq + 1 == start {
                if hash != start_prev {
                    return bad(format!(
                        "the anchor's hash {hash} is not the one record {start} follows ({start_prev}): the log was rewritten"
                    ));
                }
            } else if *seq < start {
                return bad(format!("not in this log, which starts at record {start}: {before}"));
            } else if *seq > last {
                return bad(format!(
                    "missing: an anchor holds it (hash {hash}), but the records here end at {last}: {after}"
                ));
            }
        }
        Ok(self.anchors.len() as u64)
    }

    /// Check the end of the chain against the store's head, the base (if any) against the
    /// latest prune record, and the anchors ([`Verifier::anchored`]).
    pub fn finish(&self, head: &Head) -> Result<Verified, BadRecord> {
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
        let base_seq = self.base.as_ref().map_or(0, |b| b.seq);
        if let Some(base) = &self.base {
            match &self.last_prune {
                None => {
                    return Err(BadRecord {
                        seq: base.seq + 1,
                        message: format!(
                            "the log starts after a pruned base (record {}) that no {PRUNE} record confirms",
                            base.seq
                        ),
                    });
                }
                Some((seq, before, last_hash))
                    if *before != Some(base.seq + 1) || *last_hash != base.hash =>
                {
                    return Err(BadRecord {
                        seq: *seq,
                        message: format!(
                            "this {PRUNE} record (before {}, last_hash {last_hash:?}) does not match the \
                             stored base (record {}, hash {:?}): the base or the pruned range was altered",
                            before.map_or_else(|| "missing".into(), |b| b.to_string()),
                            base.seq,
                            base.hash
                        ),
                    });
                }
                Some(_) => {}
            }
        }
        let anchors = self.check_anchors(
            "it was pruned; check the anchor against the archive that holds it \
             (`ztseg audit verify --archive FILE --anchor SEQ:HASH`)",
            "records were cut off the log and its head rewritten",
        )?;
        Ok(Verified { records: last - base_seq, first: base_seq + 1, last, base: base_seq, anchors })
    }

    /// Check, before a prune, that the records fed are exactly those before `before` and that
    /// the last one has hash `last_hash` (the caller archived exactly what will be deleted).
    pub fn check_prune_end(&self, before: u64, last_hash: &str) -> Result<(), BadRecord> {
        if self.next != before {
            return Err(BadRecord {
                seq: self.next,
                message: format!("missing (pruning needs every record before {before})"),
            });
        }
        if self.prev != last_hash {
            return Err(BadRecord {
                seq: before - 1,
                message: format!(
                    "its hash {} is not the last_hash given ({last_hash}): the archive does not end \
                     with the last record to prune",
                    self.prev
                ),
            });
        }
        Ok(())
    }
}

/// Where a prune of the records before `before` starts: the first retained record, checked
/// against the log's `base` and `head`. At least the head record is always kept.
pub fn prune_start(base: Option<&Head>, head: &Head, before: u64) -> Result<u64, String> {
    let first = base.map_or(1, |b| b.seq + 1);
    if before > head.seq {
        return Err(format!(
            "before {before}: the log ends at record {}, which is always kept (before may be at most {})",
            head.seq, head.seq
        ));
    }
    if before <= first {
        return Err(format!(
            "before {before}: nothing to prune, the log starts at record {first} (records before it are \
             already pruned)"
        ));
    }
    Ok(first)
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
        v.finish(head).map(|v| v.records)
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

    fn feed_all(v: &mut Verifier, records: &[(u64, Vec<u8>)]) {
        for (k, b) in records {
            v.feed(*k, b).unwrap();
        }
    }

    fn hash_of(c: &[Vec<u8>], seq: u64) -> String {
        serde_json::from_slice::<Record>(&c[usize::try_from(seq - 1).unwrap()]).unwrap().hash
    }

    /// A log cut short with its head rewritten to match verifies on its own; an anchor taken
    /// before the cut names the missing record. A rewritten record with a fresh chain after it
    /// is caught by an anchor on it or after it.
    #[test]
    fn anchors_catch_a_cut_off_tail_with_a_rewritten_head() {
        let (c, _) = chain(6);
        let anchor = (5, hash_of(&c, 5));
        let cut = keyed(&c[..3]);
        let cut_head = Head { seq: 3, hash: hash_of(&c, 3) };
        let mut v = Verifier::default();
        feed_all(&mut v, &cut);
        assert!(v.finish(&cut_head).is_ok(), "without an anchor the cut is invisible");
        let mut v = Verifier::default().anchored([anchor.clone()]);
        feed_all(&mut v, &cut);
        let e = v.finish(&cut_head).unwrap_err();
        assert_eq!(e.seq, 5, "{e}");
        assert!(e.message.contains("cut off the log and its head rewritten"), "{e}");

        // The intact log holds the anchor; so does a check anchored at record 1.
        let mut v = Verifier::default().anchored([anchor, (1, hash_of(&c, 1))]);
        feed_all(&mut v, &keyed(&c));
        let head = Head { seq: 6, hash: hash_of(&c, 6) };
        assert_eq!(v.finish(&head).unwrap().anchors, 2);

        // Records 4.. rewritten (a new, self-consistent chain from record 3 on).
        let mut forged = keyed(&c[..3]);
        let mut prev = hash_of(&c, 3);
        for seq in 4..=6 {
            let d = Draft::new("admin/mallory", "policy.apply", "success", serde_json::json!({}));
            let (bytes, hash) = seal(&d, seq, &prev);
            forged.push((seq, bytes));
            prev = hash;
        }
        let forged_head = Head { seq: 6, hash: prev };
        let mut v = Verifier::default().anchored([(5, hash_of(&c, 5))]);
        let e = forged.iter().try_for_each(|(k, b)| v.feed(*k, b).map(drop)).unwrap_err();
        assert_eq!(e.seq, 5, "{e}");
        assert!(e.message.contains("not the anchor's"), "{e}");
        let mut v = Verifier::default().anchored([(3, hash_of(&c, 3))]);
        feed_all(&mut v, &forged);
        assert!(v.finish(&forged_head).is_ok(), "an anchor before the rewrite cannot see it");
    }

    #[test]
    fn anchors_before_the_start_are_checked_at_the_base_or_refused() {
        let (k, base, head) = pruned(6, 4, None);
        // Record 3 is the base: its hash is what record 4 follows.
        let v = |anchors: Vec<(u64, String)>| {
            let mut v = Verifier::after(Some(&base)).anchored(anchors);
            feed_all(&mut v, &k);
            v.finish(&head)
        };
        assert_eq!(v(vec![(3, base.hash.clone())]).unwrap().anchors, 1);
        let e = v(vec![(3, GENESIS.into())]).unwrap_err();
        assert_eq!(e.seq, 3, "{e}");
        let e = v(vec![(2, base.hash.clone())]).unwrap_err();
        assert_eq!(e.seq, 2, "{e}");
        assert!(e.message.contains("pruned") && e.message.contains("--archive"), "{e}");
    }

    #[test]
    fn anchors_parse_as_seq_and_hash() {
        let h = "ab".repeat(32);
        assert_eq!(parse_anchor(&format!("12:{h}")), Ok((12, h.clone())));
        for bad in ["12", &format!("0:{h}"), &format!("x:{h}"), "12:abc", &format!("12:{}", h.to_uppercase())]
        {
            assert!(parse_anchor(bad).is_err(), "{bad}");
        }
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

    /// Records 1..=n, then a prune of the records before `before` (confirmed by an
    /// [`PRUNE`] record `n + 1` naming `before` and `named_hash`, or the true hash if `None`):
    /// the retained records, the base and the head.
    fn pruned(n: u64, before: u64, named_hash: Option<&str>) -> (Vec<(u64, Vec<u8>)>, Head, Head) {
        let (c, head) = chain(n);
        let last: Record = serde_json::from_slice(&c[usize::try_from(before - 2).unwrap()]).unwrap();
        let base = Head { seq: before - 1, hash: last.hash.clone() };
        let d = Draft::new(
            "admin/alice",
            PRUNE,
            "success",
            serde_json::json!({"before": before, "first": 1, "count": before - 1,
                "last_hash": named_hash.unwrap_or(&last.hash), "archive_sha256": "ab"}),
        );
        let (bytes, hash) = seal(&d, n + 1, &head.hash);
        let mut k: Vec<(u64, Vec<u8>)> = keyed(&c).into_iter().filter(|(s, _)| *s >= before).collect();
        k.push((n + 1, bytes));
        (k, base, Head { seq: n + 1, hash })
    }

    fn verify_after(base: &Head, records: &[(u64, Vec<u8>)], head: &Head) -> Result<Verified, BadRecord> {
        let mut v = Verifier::after(Some(base));
        for (k, b) in records {
            v.feed(*k, b)?;
        }
        v.finish(head)
    }

    #[test]
    fn a_pruned_chain_verifies_from_its_base() {
        let (k, base, head) = pruned(6, 4, None);
        let v = verify_after(&base, &k, &head).unwrap();
        assert_eq!(v, Verified { records: 4, first: 4, last: 7, base: 3, anchors: 0 });
        // From record 1 the same records are a gap: the base is what makes them verifiable.
        let e = verify(&k, &head).unwrap_err();
        assert_eq!(e.seq, 1, "{e}");
        assert!(e.message.contains("missing"), "{e}");
    }

    #[test]
    fn a_tampered_base_names_the_first_retained_record() {
        let (k, mut base, head) = pruned(6, 4, None);
        base.hash = base.hash.replace(|c: char| c != '0', "0");
        let e = verify_after(&base, &k, &head).unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
        assert!(e.message.contains("does not follow the base of the pruned log (record 3"), "{e}");
    }

    #[test]
    fn a_record_removed_right_after_the_base_is_detected() {
        let (mut k, base, head) = pruned(6, 4, None);
        let removed = k.remove(0);
        assert_eq!(removed.0, 4);
        // The base left as it was: record 4 is a gap.
        let e = verify_after(&base, &k, &head).unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
        assert!(e.message.contains("missing"), "{e}");
        // The base moved on to the removed record: the prune record no longer agrees with it.
        let r4: Record = serde_json::from_slice(&removed.1).unwrap();
        let moved = Head { seq: 4, hash: r4.hash };
        let e = verify_after(&moved, &k, &head).unwrap_err();
        assert_eq!(e.seq, 7, "names the audit.prune record: {e}");
        assert!(e.message.contains("does not match the stored base (record 4"), "{e}");
    }

    #[test]
    fn a_prune_record_that_disagrees_is_named() {
        let (k, base, head) = pruned(6, 4, Some(GENESIS));
        let e = verify_after(&base, &k, &head).unwrap_err();
        assert_eq!(e.seq, 7, "{e}");
        assert!(e.message.contains("the base or the pruned range was altered"), "{e}");
        // A base with no prune record at all after it is unconfirmed.
        let (c, head) = chain(6);
        let r3: Record = serde_json::from_slice(&c[2]).unwrap();
        let k: Vec<_> = keyed(&c).into_iter().filter(|(s, _)| *s >= 4).collect();
        let e = verify_after(&Head { seq: 3, hash: r3.hash }, &k, &head).unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
        assert!(e.message.contains("no audit.prune record confirms"), "{e}");
    }

    #[test]
    fn the_latest_prune_record_is_the_one_that_counts() {
        // Pruned before 4 (record 7), then before 6 (record 8): the base is record 5.
        let (k, _, head) = pruned(6, 4, None);
        let r5: Record = serde_json::from_slice(&k[1].1).unwrap();
        assert_eq!(r5.seq, 5);
        let d = Draft::new(
            "admin/alice",
            PRUNE,
            "success",
            serde_json::json!({"before": 6, "last_hash": r5.hash, "archive_sha256": "cd"}),
        );
        let (bytes, hash) = seal(&d, 8, &head.hash);
        let mut k2: Vec<_> = k.into_iter().filter(|(s, _)| *s >= 6).collect();
        k2.push((8, bytes));
        let head = Head { seq: 8, hash };
        let base = Head { seq: 5, hash: r5.hash };
        assert_eq!(verify_after(&base, &k2, &head).unwrap().records, 3);
        // The earlier base no longer verifies: record 6 does not follow it.
        let r3 = Head { seq: 3, hash: GENESIS.into() };
        assert!(verify_after(&r3, &k2, &head).is_err());
    }

    #[test]
    fn prune_bounds_keep_the_head_and_need_something_to_prune() {
        let head = Head { seq: 10, hash: GENESIS.into() };
        assert_eq!(prune_start(None, &head, 10), Ok(1));
        assert_eq!(prune_start(None, &head, 2), Ok(1));
        let e = prune_start(None, &head, 11).unwrap_err();
        assert!(e.contains("before 11") && e.contains("always kept"), "{e}");
        let e = prune_start(None, &head, 1).unwrap_err();
        assert!(e.contains("nothing to prune"), "{e}");
        let base = Head { seq: 4, hash: GENESIS.into() };
        assert_eq!(prune_start(Some(&base), &head, 6), Ok(5));
        assert!(prune_start(Some(&base), &head, 5).unwrap_err().contains("starts at record 5"));
    }

    #[test]
    fn a_prune_needs_every_record_before_it_and_the_right_last_hash() {
        let (c, _) = chain(5);
        let mut v = Verifier::default();
        for (k, b) in keyed(&c).iter().take(3) {
            v.feed(*k, b).unwrap();
        }
        let r3: Record = serde_json::from_slice(&c[2]).unwrap();
        assert_eq!(v.check_prune_end(4, &r3.hash), Ok(()));
        let e = v.check_prune_end(4, GENESIS).unwrap_err();
        assert_eq!(e.seq, 3, "{e}");
        assert!(e.message.contains("not the last_hash given"), "{e}");
        let e = v.check_prune_end(5, &r3.hash).unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
    }

    #[test]
    fn a_piece_of_a_chain_verifies_from_its_own_start() {
        let (c, _) = chain(5);
        let r2: Record = serde_json::from_slice(&c[1]).unwrap();
        let mut v = Verifier::starting_at(3, &r2.hash);
        for (k, b) in keyed(&c).iter().skip(2) {
            v.feed(*k, b).unwrap();
        }
        assert_eq!(v.next(), 6);
        let mut k = keyed(&c);
        k[3].1[10] ^= 1;
        let mut v = Verifier::starting_at(3, &r2.hash);
        let e = k.iter().skip(2).try_for_each(|(s, b)| v.feed(*s, b).map(drop)).unwrap_err();
        assert_eq!(e.seq, 4, "{e}");
    }
}
