//! Event budget slots: every registered endpoint gets its own slot in the per-CPU event rate
//! limiter (`ZT_EVENT_BUDGET`, `Endpoint::event_slot`), so a workload flooding denied packets
//! uses up its own events only (slot 0 bounds all workloads together). Slots from
//! `EVENT_SLOT_FIRST` to `EVENT_SLOTS - 1` are handed out lowest first and taken back when the
//! endpoint goes; `EVENT_SLOT_SHARED` serves endpoints registered while every other slot is
//! taken. The assignment lives in the endpoint maps themselves and is read back when the
//! writer opens.

use std::collections::{BTreeSet, HashMap};

use enforcer_common::{EVENT_SLOT_FIRST, EVENT_SLOT_SHARED, EVENT_SLOTS};

/// Where an endpoint is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(super) enum EndpointKey {
    Interface(u32),
    Cgroup(u64),
}

#[derive(Debug, Default)]
pub(super) struct EventSlots {
    by_endpoint: HashMap<EndpointKey, u32>,
    /// Slots in use, the shared one excepted.
    taken: BTreeSet<u32>,
}

impl EventSlots {
    /// Record the slot an existing endpoint holds (rebuilding after a restart). A slot out of
    /// range, or already held by another endpoint, is replaced by a free one: the caller writes
    /// the endpoint again if the returned slot differs.
    pub(super) fn restore(&mut self, key: EndpointKey, slot: u32) -> u32 {
        if slot == EVENT_SLOT_SHARED
            || ((EVENT_SLOT_FIRST..EVENT_SLOTS).contains(&slot) && self.taken.insert(slot))
        {
            self.by_endpoint.insert(key, slot);
            return slot;
        }
        self.assign(key).0
    }

    /// Every registered endpoint.
    pub(super) fn endpoints(&self) -> impl Iterator<Item = EndpointKey> + '_ {
        self.by_endpoint.keys().copied()
    }

    /// The slot of `key`, assigning the lowest free one if it has none; `true` if newly
    /// assigned (its budget must be reset: a previous holder may have spent it).
    pub(super) fn assign(&mut self, key: EndpointKey) -> (u32, bool) {
        if let Some(&slot) = self.by_endpoint.get(&key) {
            return (slot, false);
        }
        let mut slot = EVENT_SLOT_FIRST;
        for &t in &self.taken {
            if t != slot {
                break;
            }
            slot += 1;
        }
        if slot >= EVENT_SLOTS {
            slot = EVENT_SLOT_SHARED;
        } else {
            self.taken.insert(slot);
        }
        self.by_endpoint.insert(key, slot);
        (slot, true)
    }

    /// Take back the slot of `key`, if it has one.
    pub(super) fn release(&mut self, key: EndpointKey) {
        if let Some(slot) = self.by_endpoint.remove(&key) {
            self.taken.remove(&slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{EndpointKey::*, EventSlots};
    use enforcer_common::{EVENT_SLOT_FIRST as F, EVENT_SLOT_SHARED as SHARED, EVENT_SLOTS};

    #[test]
    fn lowest_free_slot_first_and_reused_after_release() {
        let mut s = EventSlots::default();
        assert_eq!(s.assign(Interface(7)), (F, true));
        assert_eq!(s.assign(Cgroup(7)), (F + 1, true));
        assert_eq!(s.assign(Interface(9)), (F + 2, true));
        assert_eq!(s.assign(Interface(7)), (F, false), "an endpoint keeps its slot");
        s.release(Cgroup(7));
        assert_eq!(s.assign(Cgroup(8)), (F + 1, true), "the freed slot goes first");
        assert_eq!(s.assign(Interface(10)), (F + 3, true));
    }

    #[test]
    fn when_every_slot_is_taken_the_shared_slot_serves() {
        let mut s = EventSlots::default();
        for i in F..EVENT_SLOTS {
            assert_eq!(s.assign(Interface(i)), (i, true));
        }
        assert_eq!(s.assign(Interface(EVENT_SLOTS)), (SHARED, true));
        assert_eq!(s.assign(Cgroup(1)), (SHARED, true));
        s.release(Cgroup(1));
        s.release(Interface(F + 5));
        assert_eq!(s.assign(Cgroup(2)), (F + 5, true));
    }

    #[test]
    fn restore_keeps_slots_and_resolves_duplicates_and_bad_values() {
        let mut s = EventSlots::default();
        assert_eq!(s.restore(Interface(1), F + 2), F + 2);
        assert_eq!(s.restore(Interface(2), F + 2), F, "a slot held twice: the second gets a free one");
        assert_eq!(s.restore(Cgroup(3), EVENT_SLOTS + 5), F + 1, "out of range: a free one");
        assert_eq!(s.restore(Cgroup(5), 0), F + 3, "the total's slot is no endpoint's");
        assert_eq!(s.restore(Cgroup(4), SHARED), SHARED, "the shared slot stays shared");
        assert_eq!(s.assign(Interface(9)), (F + 4, true));
    }
}
