//! Port ranges: the rules' ranges under one range key, split into the disjoint intervals the
//! programs scan (see `enforcer_common::RangeSet`).

use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, INTERVALS_PER_KEY, PortInterval, RANGES_PER_KEY, RangeRule, RangeSet,
};

/// One rule's range under a key, with what the split needs to know of the rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct Member {
    pub lo: u16,
    pub hi: u16,
    pub cookie: u32,
    pub slot: u32,
    pub action: u32,
    /// Monotonic ns; 0 = no expiry.
    pub expires_at: u64,
    /// Chosen for an interval only where no other member of its kind covers it (a rule whose
    /// slot is not switched on yet must not displace a live one).
    pub deferred: bool,
}

/// Why a set cannot hold its members.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Overflow {
    /// More than [`RANGES_PER_KEY`] ranges.
    Ranges(usize),
    /// The ranges split into more than [`INTERVALS_PER_KEY`] intervals.
    Intervals(usize),
}

/// Rank of a member as the rule of an interval: not deferred first, then the one that lives
/// longest, then the lowest cookie (so the choice is the same on every run).
fn rank(m: &Member) -> (bool, std::cmp::Reverse<u64>, u32) {
    let lives = if m.expires_at == 0 { u64::MAX } else { m.expires_at };
    (m.deferred, std::cmp::Reverse(lives), m.cookie)
}

/// The best member of `action` among those covering `lo..=hi`.
fn winner(members: &[Member], action: u32, lo: u32, hi: u32) -> Option<&Member> {
    members
        .iter()
        .filter(|m| m.action == action && u32::from(m.lo) <= lo && hi <= u32::from(m.hi))
        .min_by_key(|m| rank(m))
}

/// Split `members` into sorted, disjoint intervals, each with its deny and allow rule; adjacent
/// intervals decided by the same rules are merged.
pub(super) fn split(members: &[Member]) -> Vec<PortInterval> {
    let mut bounds: Vec<u32> = members.iter().flat_map(|m| [u32::from(m.lo), u32::from(m.hi) + 1]).collect();
    bounds.sort_unstable();
    bounds.dedup();
    let mut out: Vec<PortInterval> = Vec::new();
    for pair in bounds.windows(2) {
        let (lo, hi) = (pair[0], pair[1] - 1);
        let deny = winner(members, ACTION_DENY, lo, hi);
        let allow = winner(members, ACTION_ALLOW, lo, hi);
        if deny.is_none() && allow.is_none() {
            continue;
        }
        // Bounds come from u16 ports (hi + 1 ≤ 65536), so both fit.
        let (lo, hi) = (u16::try_from(lo).unwrap_or(u16::MAX), u16::try_from(hi).unwrap_or(u16::MAX));
        let iv = PortInterval {
            lo,
            hi,
            deny_cookie: deny.map_or(0, |m| m.cookie),
            deny_slot: deny.map_or(0, |m| m.slot),
            allow_cookie: allow.map_or(0, |m| m.cookie),
            allow_slot: allow.map_or(0, |m| m.slot),
        };
        match out.last_mut() {
            Some(prev)
                if u32::from(prev.hi) + 1 == u32::from(lo)
                    && (prev.deny_cookie, prev.allow_cookie) == (iv.deny_cookie, iv.allow_cookie) =>
            {
                prev.hi = hi;
            }
            _ => out.push(iv),
        }
    }
    out
}

/// The map value for `members` (`None` when there are none: the entry goes).
pub(super) fn set_value(members: &[Member]) -> Result<Option<RangeSet>, Overflow> {
    if members.is_empty() {
        return Ok(None);
    }
    if members.len() > RANGES_PER_KEY {
        return Err(Overflow::Ranges(members.len()));
    }
    let intervals = split(members);
    if intervals.len() > INTERVALS_PER_KEY {
        return Err(Overflow::Intervals(intervals.len()));
    }
    let mut set = RangeSet {
        len: u32::try_from(intervals.len()).unwrap_or(u32::MAX),
        rules_len: u32::try_from(members.len()).unwrap_or(u32::MAX),
        ..RangeSet::default()
    };
    set.intervals[..intervals.len()].copy_from_slice(&intervals);
    for (slot, m) in set.rules.iter_mut().zip(members) {
        *slot = RangeRule { lo: m.lo, hi: m.hi, cookie: m.cookie, slot: m.slot, action: m.action };
    }
    Ok(Some(set))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(lo: u16, hi: u16, cookie: u32, action: u32, expires_at: u64) -> Member {
        Member { lo, hi, cookie, slot: cookie + 100, action, expires_at, deferred: false }
    }

    fn cover(ivs: &[PortInterval], port: u16) -> Option<(u32, u32)> {
        ivs.iter().find(|i| i.lo <= port && port <= i.hi).map(|i| (i.deny_cookie, i.allow_cookie))
    }

    #[test]
    fn disjoint_ranges_stay_as_written() {
        let ivs = split(&[m(1000, 2000, 1, ACTION_ALLOW, 0), m(3000, 65535, 2, ACTION_ALLOW, 0)]);
        assert_eq!(ivs.len(), 2);
        assert_eq!((ivs[0].lo, ivs[0].hi, ivs[0].allow_cookie, ivs[0].allow_slot), (1000, 2000, 1, 101));
        assert_eq!((ivs[1].lo, ivs[1].hi, ivs[1].allow_cookie), (3000, 65535, 2));
        assert_eq!(cover(&ivs, 2500), None);
    }

    #[test]
    fn overlaps_split_and_the_longest_lived_rule_decides() {
        // A permanent allow 1000-2000 and a grant 1500-3000: the overlap is the permanent
        // rule's, so the grant's expiry leaves it allowed.
        let ivs = split(&[m(1000, 2000, 1, ACTION_ALLOW, 0), m(1500, 3000, 2, ACTION_ALLOW, 50)]);
        assert_eq!(cover(&ivs, 1200), Some((0, 1)));
        assert_eq!(cover(&ivs, 1500), Some((0, 1)));
        assert_eq!(cover(&ivs, 2000), Some((0, 1)));
        assert_eq!(cover(&ivs, 2001), Some((0, 2)));
        assert_eq!(cover(&ivs, 3001), None);
        // Of two grants the later expiry decides.
        let ivs = split(&[m(10, 20, 1, ACTION_ALLOW, 90), m(10, 20, 2, ACTION_ALLOW, 80)]);
        assert_eq!(ivs.len(), 1);
        assert_eq!(cover(&ivs, 15), Some((0, 1)));
    }

    #[test]
    fn deny_and_allow_are_both_kept() {
        let ivs = split(&[m(1, 65535, 1, ACTION_ALLOW, 0), m(5000, 5999, 2, ACTION_DENY, 0)]);
        assert_eq!(cover(&ivs, 4999), Some((0, 1)));
        assert_eq!(cover(&ivs, 5000), Some((2, 1)));
        assert_eq!(cover(&ivs, 5999), Some((2, 1)));
        assert_eq!(cover(&ivs, 6000), Some((0, 1)));
        assert_eq!(ivs.len(), 3);
    }

    #[test]
    fn a_deferred_rule_never_displaces_a_live_one() {
        let mut new = m(1, 100, 2, ACTION_ALLOW, 0);
        new.deferred = true;
        let ivs = split(&[m(50, 60, 1, ACTION_ALLOW, 10), new]);
        assert_eq!(cover(&ivs, 55), Some((0, 1)));
        assert_eq!(cover(&ivs, 10), Some((0, 2)));
    }

    #[test]
    fn limits_are_errors() {
        let many: Vec<Member> =
            (0..9).map(|i| m(i * 10 + 1, i * 10 + 5, u32::from(i) + 1, ACTION_ALLOW, 0)).collect();
        assert_eq!(set_value(&many), Err(Overflow::Ranges(9)));
        // Five nested ranges of alternating kinds, each inner one living longer, split into
        // nine intervals.
        let nested: Vec<Member> = (0..5u16)
            .map(|i| {
                let action = if i % 2 == 0 { ACTION_ALLOW } else { ACTION_DENY };
                m(100 + i * 10, 200 - i * 10, u32::from(i) + 1, action, u64::from(i + 1) * 10)
            })
            .collect();
        assert_eq!(set_value(&nested), Err(Overflow::Intervals(9)));
        assert_eq!(set_value(&[]), Ok(None));
        let set = set_value(&[m(80, 81, 7, ACTION_ALLOW, 0)]).unwrap().unwrap();
        assert_eq!((set.len, set.rules_len, set.rules[0].cookie, set.rules[0].slot), (1, 1, 7, 107));
        assert_eq!(set.intervals[1], PortInterval::UNUSED);
    }
}
