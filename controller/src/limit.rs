//! Bounds on what unauthenticated peers, callers refused at the API, and enforcers reporting
//! denied flows can make the controller do.
//!
//! Every failed TLS handshake and every refused call is audited, and the audit log is
//! append-only: without a bound, anyone who can reach the port could grow it without limit.
//! [`RejectLimiter`] records the first `per_peer` rejections of each key (a source address for
//! anonymous peers, an identity for callers with a valid certificate) in a window in full and
//! counts the rest; when the window ends, one summary record carries the count. Handshakes in
//! progress are capped too ([`MAX_PENDING_HANDSHAKES`]), so slow or idle connections cannot
//! pin tasks.

use std::{
    collections::HashMap,
    hash::Hash,
    net::{IpAddr, Ipv6Addr},
    time::{Duration, Instant},
};

/// TLS handshakes in progress at once; a connection beyond this is closed at once (and that
/// rejection is audited like the others).
pub const MAX_PENDING_HANDSHAKES: usize = 512;

/// Keys (source addresses, identities) tracked at once; rejections of further keys share one
/// bucket (reported with the unspecified address `::`, or the identity `*`), so the table
/// itself stays bounded.
pub const MAX_TRACKED_PEERS: usize = 4096;

/// How many rejections per key and window are audited in full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RejectPolicy {
    pub per_peer: u32,
    pub window: Duration,
}

impl Default for RejectPolicy {
    fn default() -> Self {
        Self { per_peer: 10, window: Duration::from_mins(1) }
    }
}

#[derive(Debug)]
struct Window {
    start: Instant,
    recorded: u32,
    suppressed: u64,
}

/// Per-key window counters for rejections: keyed by source address (`IpAddr`, the default)
/// or by identity (`String`).
#[derive(Debug)]
pub struct RejectLimiter<K = IpAddr> {
    policy: RejectPolicy,
    peers: HashMap<K, Window>,
    /// The bucket shared by the keys past [`MAX_TRACKED_PEERS`].
    overflow: K,
}

/// Rejections of one key that were counted but not recorded in full.
#[derive(Debug, PartialEq, Eq)]
pub struct Suppressed<K = IpAddr> {
    pub peer: K,
    pub count: u64,
}

/// The overflow bucket of a limiter keyed by identity.
pub const OTHER_IDENTITIES: &str = "*";

impl RejectLimiter<IpAddr> {
    /// A limiter keyed by source address.
    #[must_use]
    pub fn new(policy: RejectPolicy) -> Self {
        Self::keyed(policy, IpAddr::V6(Ipv6Addr::UNSPECIFIED))
    }

    /// [`Self::flush`] as audit records: one `action` record per address with `peer`, `count`
    /// and `window_s`, from the anonymous actor.
    pub fn summaries(&mut self, action: &str, now: Instant) -> Vec<crate::audit::Draft> {
        let window_s = self.policy.window.as_secs();
        self.flush(now)
            .into_iter()
            .map(|s| {
                crate::audit::Draft::new(
                    "anonymous",
                    action,
                    "denied",
                    serde_json::json!({ "peer": s.peer.to_string(), "count": s.count, "window_s": window_s }),
                )
            })
            .collect()
    }
}

impl RejectLimiter<String> {
    /// A limiter keyed by caller identity (`role/name`).
    #[must_use]
    pub fn for_identities(policy: RejectPolicy) -> Self {
        Self::keyed(policy, OTHER_IDENTITIES.to_owned())
    }

    /// [`Self::flush`] as audit records: one `api.denied.suppressed` record per identity with
    /// `count` and `window_s`, from that identity (the shared bucket of identities past
    /// [`MAX_TRACKED_PEERS`]: from `controller`, with `identity` `*`).
    pub fn identity_summaries(&mut self, now: Instant) -> Vec<crate::audit::Draft> {
        let window_s = self.policy.window.as_secs();
        self.flush(now)
            .into_iter()
            .map(|s| {
                let actor = if s.peer == OTHER_IDENTITIES { "controller" } else { s.peer.as_str() };
                crate::audit::Draft::new(
                    actor,
                    "api.denied.suppressed",
                    "denied",
                    serde_json::json!({ "identity": s.peer, "count": s.count, "window_s": window_s }),
                )
            })
            .collect()
    }
}

impl<K: Clone + Eq + Hash + Ord> RejectLimiter<K> {
    /// A limiter whose keys past [`MAX_TRACKED_PEERS`] share the bucket `overflow`.
    #[must_use]
    pub fn keyed(policy: RejectPolicy, overflow: K) -> Self {
        Self { policy, peers: HashMap::new(), overflow }
    }

    /// Whether a rejection of `peer` at `now` is recorded in full (else it is counted).
    pub fn admit(&mut self, peer: K, now: Instant) -> bool {
        let key = if self.peers.contains_key(&peer) || self.peers.len() < MAX_TRACKED_PEERS {
            peer
        } else {
            self.overflow.clone()
        };
        let w = self.peers.entry(key).or_insert(Window { start: now, recorded: 0, suppressed: 0 });
        if w.recorded < self.policy.per_peer {
            w.recorded += 1;
            true
        } else {
            w.suppressed += 1;
            false
        }
    }

    /// End the windows that are over at `now`: their keys are forgotten, and those with
    /// counted rejections are returned for one summary record each.
    pub fn flush(&mut self, now: Instant) -> Vec<Suppressed<K>> {
        let window = self.policy.window;
        let mut out = Vec::new();
        self.peers.retain(|peer, w| {
            if now.duration_since(w.start) < window {
                return true;
            }
            if w.suppressed > 0 {
                out.push(Suppressed { peer: peer.clone(), count: w.suppressed });
            }
            false
        });
        out.sort_by(|a, b| a.peer.cmp(&b.peer));
        out
    }
}

/// Bounds the `flow.denied` records each enforcer adds to the audit log: the first
/// `per_peer` records of an enforcer in a window are recorded in full, the rest are counted
/// (records and the packets they carry) into one `flow.denied.suppressed` record when the
/// window ends. Enforcers already fold and pace what they send; this holds even for one that
/// does not (a compromised host). Keyed by the authenticated enforcer identity, so the table
/// is as large as the set of enforcers.
#[derive(Debug)]
pub struct FlowLimiter {
    policy: RejectPolicy,
    enforcers: HashMap<String, FlowWindow>,
}

#[derive(Debug)]
struct FlowWindow {
    start: Instant,
    recorded: u32,
    records: u64,
    packets: u64,
}

impl FlowLimiter {
    /// Default bound: 6,000 records per enforcer and minute.
    pub const DEFAULT: RejectPolicy = RejectPolicy { per_peer: 6_000, window: Duration::from_mins(1) };

    #[must_use]
    pub fn new(policy: RejectPolicy) -> Self {
        Self { policy, enforcers: HashMap::new() }
    }

    /// Whether one denied-flow record of `enforcer`, standing for `packets` packets, is
    /// recorded in full at `now` (else it is counted).
    pub fn admit(&mut self, enforcer: &str, packets: u64, now: Instant) -> bool {
        if !self.enforcers.contains_key(enforcer) {
            self.enforcers
                .insert(enforcer.to_owned(), FlowWindow { start: now, recorded: 0, records: 0, packets: 0 });
        }
        let Some(w) = self.enforcers.get_mut(enforcer) else { return false };
        if w.recorded < self.policy.per_peer {
            w.recorded += 1;
            true
        } else {
            w.records += 1;
            w.packets = w.packets.saturating_add(packets);
            false
        }
    }

    /// End the windows that are over at `now`: one `flow.denied.suppressed` record, from the
    /// enforcer, for each that counted records it did not record in full.
    pub fn summaries(&mut self, now: Instant) -> Vec<crate::audit::Draft> {
        let window = self.policy.window;
        let mut out = Vec::new();
        self.enforcers.retain(|who, w| {
            if now.duration_since(w.start) < window {
                return true;
            }
            if w.records > 0 {
                out.push(crate::audit::Draft::new(
                    who.clone(),
                    "flow.denied.suppressed",
                    "denied",
                    serde_json::json!({
                        "records": w.records, "packets": w.packets, "window_s": window.as_secs(),
                    }),
                ));
            }
            false
        });
        out.sort_by(|a, b| a.actor.cmp(&b.actor));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn records_per_peer_then_counts_then_summarises_once() {
        let mut l = RejectLimiter::new(RejectPolicy { per_peer: 3, window: Duration::from_secs(10) });
        let t0 = Instant::now();
        let a: Vec<bool> = (0..8).map(|_| l.admit(ip("192.0.2.1"), t0)).collect();
        assert_eq!(a, [true, true, true, false, false, false, false, false]);
        // Another address has its own allowance.
        assert!(l.admit(ip("192.0.2.2"), t0));
        assert!(l.flush(t0 + Duration::from_secs(9)).is_empty(), "window not over yet");
        let s = l.flush(t0 + Duration::from_secs(10));
        assert_eq!(s, [Suppressed { peer: ip("192.0.2.1"), count: 5 }]);
        assert!(l.flush(t0 + Duration::from_secs(11)).is_empty(), "summarised once");
        // A new window starts afresh.
        assert!(l.admit(ip("192.0.2.1"), t0 + Duration::from_secs(12)));
    }

    #[test]
    fn denied_flow_records_per_enforcer_then_one_summary() {
        let mut l = FlowLimiter::new(RejectPolicy { per_peer: 2, window: Duration::from_secs(10) });
        let t0 = Instant::now();
        let a: Vec<bool> = (1..=5).map(|n| l.admit("enforcer:n1", n, t0)).collect();
        assert_eq!(a, [true, true, false, false, false]);
        assert!(l.admit("enforcer:n2", 1, t0), "each enforcer has its own allowance");
        assert!(l.summaries(t0 + Duration::from_secs(9)).is_empty(), "window not over yet");
        let s = l.summaries(t0 + Duration::from_secs(10));
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].actor.as_str(), s[0].action.as_str()), ("enforcer:n1", "flow.denied.suppressed"));
        assert_eq!(s[0].detail, serde_json::json!({"records": 3, "packets": 12, "window_s": 10}));
        assert!(l.summaries(t0 + Duration::from_secs(11)).is_empty(), "summarised once");
        assert!(l.admit("enforcer:n1", 1, t0 + Duration::from_secs(12)), "a new window records again");
    }

    #[test]
    fn refusals_of_identities_are_bounded_per_identity_and_summarised_from_it() {
        let mut l =
            RejectLimiter::for_identities(RejectPolicy { per_peer: 2, window: Duration::from_secs(10) });
        let t0 = Instant::now();
        let a: Vec<bool> = (0..5).map(|_| l.admit("enforcer/n1".to_owned(), t0)).collect();
        assert_eq!(a, [true, true, false, false, false]);
        assert!(l.admit("operator/o1".to_owned(), t0), "each identity has its own allowance");
        assert!(l.identity_summaries(t0 + Duration::from_secs(9)).is_empty(), "window not over yet");
        let s = l.identity_summaries(t0 + Duration::from_secs(10));
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!((s[0].actor.as_str(), s[0].action.as_str()), ("enforcer/n1", "api.denied.suppressed"));
        assert_eq!(s[0].detail, serde_json::json!({"identity": "enforcer/n1", "count": 3, "window_s": 10}));
        assert!(l.identity_summaries(t0 + Duration::from_secs(11)).is_empty(), "summarised once");
        // Past the table's bound identities share one bucket, summarised by the controller.
        for i in 0..MAX_TRACKED_PEERS {
            l.admit(format!("enforcer/x{i}"), t0);
        }
        assert!(l.admit("enforcer/late".to_owned(), t0));
        assert!(l.admit("enforcer/later".to_owned(), t0));
        assert!(!l.admit("enforcer/latest".to_owned(), t0));
        let s = l.identity_summaries(t0 + Duration::from_secs(10));
        assert_eq!(s.len(), 1, "{s:?}");
        assert_eq!(s[0].actor, "controller");
        assert_eq!(s[0].detail["identity"], OTHER_IDENTITIES);
    }

    #[test]
    fn table_is_bounded() {
        let mut l = RejectLimiter::new(RejectPolicy { per_peer: 1, window: Duration::from_secs(10) });
        let t0 = Instant::now();
        for i in 0..MAX_TRACKED_PEERS {
            let i = u32::try_from(i).unwrap();
            assert!(l.admit(IpAddr::V4(std::net::Ipv4Addr::from(0x0a00_0000 + i)), t0));
        }
        // Further addresses share the overflow bucket: one recorded, the rest counted.
        assert!(l.admit(ip("203.0.113.1"), t0));
        assert!(!l.admit(ip("203.0.113.2"), t0));
        assert!(!l.admit(ip("203.0.113.3"), t0));
        let s = l.flush(t0 + Duration::from_secs(10));
        assert_eq!(s, [Suppressed { peer: IpAddr::V6(Ipv6Addr::UNSPECIFIED), count: 2 }]);
        assert_eq!(l.peers.len(), 0);
    }
}
