//! Typed writer for the data-plane maps.
//!
//! Invariants this module keeps:
//! - A rule (or grant) is a set of policy keys sharing one rule-state slot and cookie. Its keys
//!   are inserted while the slot is inactive and the slot is switched on with one write, so a
//!   rule is live entirely or not at all; a full map or a failed insert rolls back and nothing
//!   of the rule was ever visible.
//! - Revocation clears the slot first (one write: every key and every established flow the rule
//!   admitted stops at once), then frees the keys.
//! - Probe-shape counters in the config map are raised before entries appear and lowered after
//!   they disappear, so the kernel never skips a shape that has entries.
//! - Port ranges live in one set per range key, which every rule's ranges under that key share;
//!   a set is rewritten whole with one map update. A new rule's ranges go in before its slot
//!   is switched on without displacing any live rule's (see `ranges::Member::deferred`); a
//!   replacing rule's take the old one's place after its slot is on; a revoked rule's leave
//!   before its slot is cleared.
//! - Nothing is ever flushed and refilled. Expiry is enforced by the kernel; [`Writer::gc`]
//!   only frees memory.

use std::{
    collections::{BTreeMap, HashMap as StdHashMap},
    net::IpAddr,
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuHashMap,
        lpm_trie::{Key as LpmKey, LpmTrie},
    },
};
use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_PASS, AdminKey, AdminValue, CidrAddr, Config, CtKey, CtKey4, CtValue,
    DIR_EGRESS, ENDPOINT_ARRAY_SIZE, ENDPOINT_F_AUDIT, ENDPOINT_F_HAS_V4, ENDPOINT_F_HAS_V6,
    ENDPOINT_F_VALID, Endpoint, Failsafe, IDENTITY_ANY, IDENTITY_F_LOCAL, IPPROTO_SCTP, IPPROTO_TCP,
    IPPROTO_UDP, IdentityInfo, MAX_FAILSAFE, PORT_ANY, PROTO_ANY, PolicyKey, PolicyValue, RANGE_SHAPES,
    RULE_F_ACTIVE, RangeSet, Reason, RuleState, SLOT_NONE, admin_shape, map_names, policy_shape,
};

use crate::{Error, addr, time};

mod event_slots;
pub mod explain;
mod ranges;

use event_slots::{EndpointKey, EventSlots};

/// Allow or deny (tenant tier); admin rules may also pass.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// Admin tier only: hand the decision to the tenant tier.
    Pass,
}

impl Action {
    fn code(self) -> u32 {
        match self {
            Action::Allow => ACTION_ALLOW,
            Action::Deny => ACTION_DENY,
            Action::Pass => ACTION_PASS,
        }
    }
    fn from_code(c: u32) -> Option<Self> {
        match c {
            ACTION_ALLOW => Some(Action::Allow),
            ACTION_DENY => Some(Action::Deny),
            ACTION_PASS => Some(Action::Pass),
            _ => None,
        }
    }
}

/// A destination port range of a tenant-tier rule: `key` names the check as a policy key
/// without a port (`dport` [`PORT_ANY`], `proto` TCP, UDP or SCTP), `lo..=hi` the ports.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RangeKey {
    pub key: PolicyKey,
    pub lo: u16,
    pub hi: u16,
}

/// A tenant-tier rule or grant: policy keys and port ranges sharing one action, lifetime and
/// cookie.
#[derive(Clone, Debug)]
pub struct Rule {
    pub keys: Vec<PolicyKey>,
    /// Destination port ranges (at most [`enforcer_common::RANGES_PER_KEY`] rules' ranges
    /// per range key, splitting into at most [`enforcer_common::INTERVALS_PER_KEY`] disjoint
    /// intervals).
    pub ranges: Vec<RangeKey>,
    pub action: Action,
    /// `None`: until revoked. `Some(ttl)`: the kernel stops honouring it `ttl` from now.
    pub ttl: Option<Duration>,
}

impl Rule {
    /// Policy key for `local`'s check in direction `dir` against `peer` (`None` = any peer).
    /// `proto` 0 = any protocol, `port` 0 = any port.
    #[must_use]
    pub fn key(dir: u8, local: u32, peer: Option<u32>, proto: u8, port: u16) -> PolicyKey {
        let peer = peer.unwrap_or(IDENTITY_ANY);
        let (src, dst) = if dir == DIR_EGRESS { (local, peer) } else { (peer, local) };
        PolicyKey { src_identity: src, dst_identity: dst, dport: port, proto, dir }
    }

    /// Port range `lo..=hi` of `proto` for `local`'s check in direction `dir` against `peer`
    /// (`None` = any peer).
    #[must_use]
    pub fn range(dir: u8, local: u32, peer: Option<u32>, proto: u8, lo: u16, hi: u16) -> RangeKey {
        RangeKey { key: Self::key(dir, local, peer, proto, PORT_ANY), lo, hi }
    }
}

/// An admin-tier rule.
#[derive(Clone, Debug)]
pub struct AdminRule {
    pub key: AdminKey,
    pub action: Action,
    /// Lower wins among matching admin rules.
    pub priority: u32,
    pub ttl: Option<Duration>,
}

/// What [`Writer::install`] returns: the cookie names the rule in events and for revocation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RuleHandle {
    pub cookie: u32,
    pub slot: u32,
    /// Monotonic nanoseconds; 0 = no expiry.
    pub expires_at: u64,
}

/// An installed rule as the maps hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleInfo {
    pub cookie: u32,
    pub slot: u32,
    pub action: Action,
    pub expires_at: u64,
    pub policy_keys: Vec<PolicyKey>,
    pub ranges: Vec<RangeKey>,
    pub admin_key: Option<AdminKey>,
    pub priority: u32,
}

/// A managed workload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    pub identity: u32,
    pub tenant: u32,
    pub ipv4: Option<std::net::Ipv4Addr>,
    pub ipv6: Option<std::net::Ipv6Addr>,
    /// Audit mode: would-be drops pass and are reported.
    pub audit: bool,
}

impl Workload {
    fn endpoint(&self, event_slot: u32) -> Endpoint {
        let mut ep = Endpoint {
            identity: self.identity,
            tenant: self.tenant,
            flags: ENDPOINT_F_VALID,
            event_slot,
            ..Endpoint::default()
        };
        if let Some(v4) = self.ipv4 {
            ep.flags |= ENDPOINT_F_HAS_V4;
            ep.addr_v4 = addr::key(IpAddr::V4(v4));
        }
        if let Some(v6) = self.ipv6 {
            ep.flags |= ENDPOINT_F_HAS_V6;
            ep.addr_v6 = addr::key(IpAddr::V6(v6));
        }
        if self.audit {
            ep.flags |= ENDPOINT_F_AUDIT;
        }
        ep
    }
}

/// Garbage-collection result.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct GcStats {
    pub rules_removed: usize,
    pub conntrack_removed: usize,
}

#[derive(Clone, Debug)]
struct Record {
    slot: u32,
    action: Action,
    expires_at: u64,
    keys: Vec<PolicyKey>,
    ranges: Vec<RangeKey>,
    admin: Option<(AdminKey, u32)>,
}

/// The map writer. Obtain it from [`crate::Datapath::writer`].
pub struct Writer {
    /// The pin directory (map capacities are read from its pins for errors).
    pin_dir: std::path::PathBuf,
    identity: HashMap<MapData, enforcer_common::Addr, IdentityInfo>,
    cidr: LpmTrie<MapData, CidrAddr, IdentityInfo>,
    endpoints: Array<MapData, Endpoint>,
    endpoints_hash: HashMap<MapData, u32, Endpoint>,
    cgroups: HashMap<MapData, u64, Endpoint>,
    policy: HashMap<MapData, PolicyKey, PolicyValue>,
    admin: HashMap<MapData, AdminKey, AdminValue>,
    ranges: HashMap<MapData, PolicyKey, RangeSet>,
    rules: Array<MapData, RuleState>,
    config: Array<MapData, Config>,
    conntrack4: HashMap<MapData, CtKey4, CtValue>,
    conntrack6: HashMap<MapData, CtKey, CtValue>,
    counters: PerCpuArray<MapData, u64>,
    suppressed: PerCpuHashMap<MapData, enforcer_common::SuppressedKey, u64>,
    links: Array<MapData, u32>,
    event_budget: PerCpuArray<MapData, u64>,
    event_slots: EventSlots,
    records: BTreeMap<u32, Record>,
    owners: StdHashMap<PolicyKey, u32>,
    /// Range key → the ranges its set holds, (lo, hi, cookie) in set order.
    range_index: BTreeMap<PolicyKey, Vec<(u16, u16, u32)>>,
    admin_owners: StdHashMap<AdminKey, u32>,
    free_slots: Vec<u32>,
    next_slot: u32,
    next_cookie: u32,
    policy_capacity: u32,
    admin_capacity: u32,
    ranges_capacity: u32,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer").field("rules", &self.records.len()).finish_non_exhaustive()
    }
}

/// `BPF_NOEXIST` update flag: fail instead of overwriting an existing entry.
const BPF_NOEXIST: u64 = 1;

fn capacity(pin_dir: &std::path::Path, name: &'static str) -> Result<u32, Error> {
    let info = aya::maps::MapInfo::from_pin(pin_dir.join(name)).map_err(Error::map(name))?;
    Ok(info.max_entries())
}

fn take<T>(ebpf: &mut Ebpf, name: &'static str) -> Result<T, Error>
where
    T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>,
{
    let m = ebpf.take_map(name).ok_or(Error::MissingMap { name })?;
    T::try_from(m).map_err(Error::map(name))
}

impl Writer {
    /// Take the maps out of `ebpf` and rebuild the in-memory index from what is pinned
    /// (`fresh`: the maps were created by this load, so no endpoint is registered yet).
    pub(crate) fn open(ebpf: &mut Ebpf, pin_dir: &std::path::Path, fresh: bool) -> Result<Self, Error> {
        let policy: HashMap<MapData, PolicyKey, PolicyValue> = take(ebpf, map_names::POLICY)?;
        let admin: HashMap<MapData, AdminKey, AdminValue> = take(ebpf, map_names::ADMIN)?;
        let rules: Array<MapData, RuleState> = take(ebpf, map_names::RULES)?;
        let policy_capacity = capacity(pin_dir, map_names::POLICY)?;
        let admin_capacity = capacity(pin_dir, map_names::ADMIN)?;
        let ranges_capacity = capacity(pin_dir, map_names::RANGES)?;
        let mut w = Self {
            identity: take(ebpf, map_names::IDENTITY)?,
            cidr: take(ebpf, map_names::CIDR)?,
            endpoints: take(ebpf, map_names::ENDPOINTS)?,
            endpoints_hash: take(ebpf, map_names::ENDPOINTS_HASH)?,
            cgroups: take(ebpf, map_names::CGROUPS)?,
            policy,
            admin,
            ranges: take(ebpf, map_names::RANGES)?,
            rules,
            config: take(ebpf, map_names::CONFIG)?,
            conntrack4: take(ebpf, map_names::CONNTRACK4)?,
            conntrack6: take(ebpf, map_names::CONNTRACK6)?,
            counters: take(ebpf, map_names::COUNTERS)?,
            suppressed: take(ebpf, map_names::SUPPRESSED)?,
            links: take(ebpf, map_names::LINKS)?,
            event_budget: take(ebpf, map_names::EVENT_BUDGET)?,
            event_slots: EventSlots::default(),
            records: BTreeMap::new(),
            owners: StdHashMap::new(),
            range_index: BTreeMap::new(),
            admin_owners: StdHashMap::new(),
            free_slots: Vec::new(),
            next_slot: 0,
            next_cookie: 1,
            policy_capacity,
            admin_capacity,
            ranges_capacity,
            pin_dir: pin_dir.to_path_buf(),
        };
        w.rebuild()?;
        if !fresh {
            // Reads every element of the interface array (~0.2 s for 65,536).
            w.rebuild_event_slots()?;
        }
        Ok(w)
    }

    /// Read back which event budget slot each registered endpoint holds.
    fn rebuild_event_slots(&mut self) -> Result<(), Error> {
        let mut found = Vec::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let ep = ep.map_err(Error::map(map_names::ENDPOINTS))?;
            if ep.flags & ENDPOINT_F_VALID != 0 {
                found.push((EndpointKey::Interface(u32::try_from(i).unwrap_or(u32::MAX)), ep));
            }
        }
        for item in &self.endpoints_hash {
            let (k, ep) = item.map_err(Error::map(map_names::ENDPOINTS_HASH))?;
            found.push((EndpointKey::Interface(k), ep));
        }
        for item in &self.cgroups {
            let (k, ep) = item.map_err(Error::map(map_names::CGROUPS))?;
            found.push((EndpointKey::Cgroup(k), ep));
        }
        let epoch = self.config()?.ct_epoch;
        for (key, mut ep) in found {
            let slot = self.event_slots.restore(key, ep.event_slot);
            if slot != ep.event_slot {
                ep.event_slot = slot;
                self.reset_event_budget(slot)?;
                self.put_endpoint_at(key, ep, epoch)?;
            } else if ep.ct_epoch != epoch {
                // A generation move that a crash interrupted before it reached every endpoint.
                self.put_endpoint_at(key, ep, epoch)?;
            }
        }
        Ok(())
    }

    /// Forget what the endpoint at `slot` spent (a previous holder's budget).
    fn reset_event_budget(&mut self, slot: u32) -> Result<(), Error> {
        // One value per possible CPU, as the kernel expects.
        let cpus = self.event_budget.get(&slot, 0).map_err(Error::map(map_names::EVENT_BUDGET))?.len();
        let zero = aya::maps::PerCpuValues::try_from(vec![0u64; cpus])
            .map_err(|e| Error::Map { name: map_names::EVENT_BUDGET, source: Box::new(e.into()) })?;
        self.event_budget.set(slot, zero, 0).map_err(Error::map(map_names::EVENT_BUDGET))
    }

    /// Write an endpoint, with the conntrack generation in force.
    fn put_endpoint(&mut self, key: EndpointKey, ep: Endpoint) -> Result<(), Error> {
        let epoch = self.config()?.ct_epoch;
        self.put_endpoint_at(key, ep, epoch)
    }

    /// Write an endpoint with conntrack generation `epoch` (the caller has just read it).
    fn put_endpoint_at(&mut self, key: EndpointKey, mut ep: Endpoint, epoch: u32) -> Result<(), Error> {
        ep.ct_epoch = epoch;
        match key {
            EndpointKey::Interface(i) if i < ENDPOINT_ARRAY_SIZE => {
                self.endpoints.set(i, ep, 0).map_err(|e| self.full_or(e, map_names::ENDPOINTS))
            }
            EndpointKey::Interface(i) => {
                self.endpoints_hash.insert(i, ep, 0).map_err(|e| self.full_or(e, map_names::ENDPOINTS_HASH))
            }
            EndpointKey::Cgroup(id) => {
                self.cgroups.insert(id, ep, 0).map_err(|e| self.full_or(e, map_names::CGROUPS))
            }
        }
    }

    /// Register `w` at `key`, keeping the endpoint's event budget slot or assigning one.
    fn set_endpoint(&mut self, key: EndpointKey, w: &Workload) -> Result<(), Error> {
        let (slot, fresh) = self.event_slots.assign(key);
        if fresh {
            self.reset_event_budget(slot)?;
        }
        let r = self.put_endpoint(key, w.endpoint(slot));
        if r.is_err() && fresh {
            self.event_slots.release(key);
        }
        r
    }

    /// Rebuild the index from the pinned maps after a restart. Entries whose slot was never
    /// activated (a crash in the middle of an install) are removed; shape counters are
    /// recomputed from what is really there.
    fn rebuild(&mut self) -> Result<(), Error> {
        let mut states = StdHashMap::new();
        let mut max_cookie = 0u32;
        let mut max_slot = None::<u32>;
        let mut stale_policy = Vec::new();
        for item in &self.policy {
            let (k, v) = item.map_err(Error::map(map_names::POLICY))?;
            let st = *states.entry(v.slot).or_insert_with(|| self.rules.get(&v.slot, 0).unwrap_or_default());
            max_cookie = max_cookie.max(v.cookie);
            if st.cookie != v.cookie || st.flags & RULE_F_ACTIVE == 0 {
                stale_policy.push(k);
                continue;
            }
            max_slot = max_slot.max(Some(v.slot));
            let rec = self.records.entry(v.cookie).or_insert_with(|| Record {
                slot: v.slot,
                action: Action::from_code(v.action).unwrap_or(Action::Deny),
                expires_at: st.expires_at,
                keys: Vec::new(),
                ranges: Vec::new(),
                admin: None,
            });
            rec.keys.push(k);
            self.owners.insert(k, v.cookie);
        }
        let mut stale_admin = Vec::new();
        for item in &self.admin {
            let (k, v) = item.map_err(Error::map(map_names::ADMIN))?;
            let st = self.rules.get(&v.slot, 0).unwrap_or_default();
            max_cookie = max_cookie.max(v.cookie);
            if st.cookie != v.cookie || st.flags & RULE_F_ACTIVE == 0 {
                stale_admin.push(k);
                continue;
            }
            max_slot = max_slot.max(Some(v.slot));
            self.records.insert(
                v.cookie,
                Record {
                    slot: v.slot,
                    action: Action::from_code(v.action).unwrap_or(Action::Deny),
                    expires_at: st.expires_at,
                    keys: Vec::new(),
                    ranges: Vec::new(),
                    admin: Some((k, v.priority)),
                },
            );
            self.admin_owners.insert(k, v.cookie);
        }
        self.rebuild_ranges(&mut states, &mut max_cookie, &mut max_slot)?;
        for k in stale_policy {
            let _ = self.policy.remove(&k);
        }
        for k in stale_admin {
            let _ = self.admin.remove(&k);
        }
        // Slots: every slot up to the highest used one that no record holds is free; clear
        // leftovers so a stale cookie can never be re-admitted.
        let used: std::collections::HashSet<u32> = self.records.values().map(|r| r.slot).collect();
        self.next_slot = max_slot.map_or(0, |s| s + 1);
        for slot in (0..self.next_slot).rev() {
            if !used.contains(&slot) {
                self.rules.set(slot, RuleState::default(), 0).map_err(Error::map(map_names::RULES))?;
                self.free_slots.push(slot);
            }
        }
        // Cookies stay unique across restarts: also look at rule state past the last used slot
        // (revoked rules leave cookie 0, active leftovers keep theirs).
        for slot in self.next_slot..self.rules.len().min(self.next_slot + 1024) {
            if let Ok(st) = self.rules.get(&slot, 0) {
                max_cookie = max_cookie.max(st.cookie);
                if st.flags & RULE_F_ACTIVE != 0 {
                    self.rules.set(slot, RuleState::default(), 0).map_err(Error::map(map_names::RULES))?;
                }
            }
        }
        self.next_cookie = max_cookie.wrapping_add(1).max(1);
        self.recount()
    }

    /// Rebuild the range index and the records' ranges from the sets (after `rebuild` read the
    /// policy map); ranges of rules no longer live leave their sets.
    fn rebuild_ranges(
        &mut self,
        states: &mut StdHashMap<u32, RuleState>,
        max_cookie: &mut u32,
        max_slot: &mut Option<u32>,
    ) -> Result<(), Error> {
        let mut stale_ranges = std::collections::BTreeSet::new();
        for item in &self.ranges {
            let (k, set) = item.map_err(Error::map(map_names::RANGES))?;
            let n = usize::try_from(set.rules_len).unwrap_or(usize::MAX).min(set.rules.len());
            let mut kept = Vec::new();
            for r in &set.rules[..n] {
                let st =
                    *states.entry(r.slot).or_insert_with(|| self.rules.get(&r.slot, 0).unwrap_or_default());
                *max_cookie = (*max_cookie).max(r.cookie);
                if st.cookie != r.cookie || st.flags & RULE_F_ACTIVE == 0 {
                    stale_ranges.insert(k);
                    continue;
                }
                *max_slot = (*max_slot).max(Some(r.slot));
                let rec = self.records.entry(r.cookie).or_insert_with(|| Record {
                    slot: r.slot,
                    action: Action::from_code(r.action).unwrap_or(Action::Deny),
                    expires_at: st.expires_at,
                    keys: Vec::new(),
                    ranges: Vec::new(),
                    admin: None,
                });
                rec.ranges.push(RangeKey { key: k, lo: r.lo, hi: r.hi });
                kept.push((r.lo, r.hi, r.cookie));
            }
            self.range_index.insert(k, kept);
        }
        if !stale_ranges.is_empty() {
            let plan = self.plan_ranges(&stale_ranges, None, &[])?;
            self.write_ranges(plan)?;
        }
        Ok(())
    }

    /// Recompute the probe-shape counters from the index and write them.
    fn recount(&mut self) -> Result<(), Error> {
        let mut cfg = self.config()?;
        cfg.policy_shape_count = [0; enforcer_common::POLICY_SHAPES];
        cfg.admin_shape_count = [0; enforcer_common::ADMIN_SHAPES];
        cfg.policy_deny_count = 0;
        cfg.range_shape_count = [0; RANGE_SHAPES];
        cfg.range_deny_count = 0;
        for rec in self.records.values() {
            for r in &rec.ranges {
                if let Some(s) = range_shape(&r.key) {
                    cfg.range_shape_count[s] += 1;
                }
                if rec.action == Action::Deny {
                    cfg.range_deny_count += 1;
                }
            }
            for k in &rec.keys {
                if let Some(s) = key_shape(k) {
                    cfg.policy_shape_count[s] += 1;
                }
                if rec.action == Action::Deny {
                    cfg.policy_deny_count += 1;
                }
            }
            if let Some((k, _)) = &rec.admin
                && let Some(s) = admin_shape(k)
            {
                cfg.admin_shape_count[s] += 1;
            }
        }
        let cidrs = self.cidr.keys().count();
        cfg.cidr_count = u32::try_from(cidrs).unwrap_or(u32::MAX);
        self.set_config(cfg)
    }

    fn config(&self) -> Result<Config, Error> {
        self.config.get(&0, 0).map_err(Error::map(map_names::CONFIG))
    }

    fn set_config(&mut self, cfg: Config) -> Result<(), Error> {
        self.config.set(0, cfg, 0).map_err(Error::map(map_names::CONFIG))
    }

    /// A map update's error: [`Error::MapFull`] when the map had no room (`E2BIG`).
    fn full_or(&self, e: aya::maps::MapError, name: &'static str) -> Error {
        match e {
            aya::maps::MapError::SyscallError(ref s) if s.io_error.raw_os_error() == Some(libc::E2BIG) => {
                Error::MapFull { map: name, capacity: capacity(&self.pin_dir, name).unwrap_or(0), needed: 1 }
            }
            other => Error::Map { name, source: Box::new(other) },
        }
    }

    /// Move the conntrack generation (`Config::ct_epoch`): every established flow is judged
    /// against current policy again on its next packet, and keeps going only if something
    /// still admits it. Called after every change that can deny what a live rule admits, once
    /// that change is in force.
    fn rejudge_flows(&mut self) -> Result<(), Error> {
        let mut cfg = self.config()?;
        cfg.ct_epoch = cfg.ct_epoch.wrapping_add(1);
        self.set_config(cfg)?;
        // The programs compare entries with their endpoint's copy (no extra lookup per packet).
        let keys: Vec<EndpointKey> = self.event_slots.endpoints().collect();
        for key in keys {
            if let Some(ep) = self.registered_endpoint(key) {
                self.put_endpoint_at(key, ep, cfg.ct_epoch)?;
            }
        }
        Ok(())
    }

    /// The endpoint registered at `key`, if any.
    fn registered_endpoint(&self, key: EndpointKey) -> Option<Endpoint> {
        match key {
            EndpointKey::Interface(i) if i < ENDPOINT_ARRAY_SIZE => {
                self.endpoints.get(&i, 0).ok().filter(|ep| ep.flags & ENDPOINT_F_VALID != 0)
            }
            EndpointKey::Interface(i) => self.endpoints_hash.get(&i, 0).ok(),
            EndpointKey::Cgroup(id) => self.cgroups.get(&id, 0).ok(),
        }
    }

    /// The conntrack generation in force (see [`Self::rejudge_flows`]).
    pub fn ct_epoch(&self) -> Result<u32, Error> {
        Ok(self.config()?.ct_epoch)
    }

    fn alloc_slot(&mut self) -> Result<u32, Error> {
        if let Some(s) = self.free_slots.pop() {
            return Ok(s);
        }
        if self.next_slot >= self.rules.len() {
            return Err(Error::SlotsExhausted { capacity: self.rules.len() });
        }
        self.next_slot += 1;
        Ok(self.next_slot - 1)
    }

    /// A free rule-state slot and a fresh cookie for a new rule.
    fn new_slot(&mut self) -> Result<(u32, u32), Error> {
        let slot = self.alloc_slot()?;
        Ok((slot, self.alloc_cookie()))
    }

    fn alloc_cookie(&mut self) -> u32 {
        loop {
            let c = self.next_cookie;
            self.next_cookie = self.next_cookie.wrapping_add(1).max(1);
            if !self.records.contains_key(&c) {
                return c;
            }
        }
    }

    fn activate(&mut self, slot: u32, cookie: u32, expires_at: u64) -> Result<(), Error> {
        let st = RuleState { expires_at, cookie, flags: RULE_F_ACTIVE };
        self.rules.set(slot, st, 0).map_err(Error::map(map_names::RULES))
    }

    fn clear_slot(&mut self, slot: u32) -> Result<(), Error> {
        self.rules.set(slot, RuleState::default(), 0).map_err(Error::map(map_names::RULES))
    }

    /// Install a tenant-tier rule or grant. All of its keys become live at the same instant,
    /// or none does.
    pub fn install(&mut self, rule: &Rule) -> Result<RuleHandle, Error> {
        let shapes = self.validate(rule)?;
        let needed = u32::try_from(rule.keys.len()).unwrap_or(u32::MAX);
        let expires_at = time::expiry(rule.ttl)?;
        let (slot, cookie) = self.new_slot()?;
        // The slot stays inactive (cleared) while keys go in.
        self.clear_slot(slot)?;
        let mut cfg = self.config()?;
        for s in &shapes {
            cfg.policy_shape_count[*s] += 1;
        }
        if rule.action == Action::Deny {
            cfg.policy_deny_count += needed;
        }
        self.set_config(cfg)?;
        self.count_ranges(&rule.ranges, rule.action, true)?;
        let value = PolicyValue { cookie, slot, action: rule.action.code(), pad: 0 };
        if let Err(e) = self.insert_all(&rule.keys, value) {
            self.lower_counts(&shapes, rule.action, needed)?;
            self.count_ranges(&rule.ranges, rule.action, false)?;
            self.free_slots.push(slot);
            return Err(match e {
                aya::maps::MapError::SyscallError(ref s)
                    if s.io_error.raw_os_error() == Some(libc::E2BIG) =>
                {
                    Error::MapFull { map: map_names::POLICY, capacity: self.policy_capacity, needed }
                }
                other => Error::Map { name: map_names::POLICY, source: Box::new(other) },
            });
        }
        // Once the slot is on, the sets are split again without the staging reserve.
        let range_keys: std::collections::BTreeSet<PolicyKey> = rule.ranges.iter().map(|r| r.key).collect();
        if let Err(e) = self.stage_ranges(rule, cookie, slot, expires_at, &range_keys) {
            for k in &rule.keys {
                let _ = self.policy.remove(k);
            }
            self.lower_counts(&shapes, rule.action, needed)?;
            self.count_ranges(&rule.ranges, rule.action, false)?;
            self.free_slots.push(slot);
            return Err(e);
        }
        self.activate(slot, cookie, expires_at)?;
        self.record_rule(rule, RuleHandle { cookie, slot, expires_at }, &range_keys, None, &[])?;
        if rule.action == Action::Deny {
            self.rejudge_flows()?;
        }
        Ok(RuleHandle { cookie, slot, expires_at })
    }

    /// Check a rule before anything is written; returns the probe shape of each key.
    fn validate(&self, rule: &Rule) -> Result<Vec<usize>, Error> {
        if rule.action == Action::Pass {
            return Err(Error::InvalidRule {
                field: "action",
                reason: "pass is an admin-tier action".into(),
            });
        }
        if rule.keys.is_empty() && rule.ranges.is_empty() {
            return Err(Error::InvalidRule {
                field: "keys",
                reason: "a rule needs at least one key or port range".into(),
            });
        }
        let mut seen_ranges = std::collections::HashSet::new();
        for r in &rule.ranges {
            if range_shape(&r.key).is_none() {
                return Err(Error::InvalidRule {
                    field: "ranges",
                    reason: format!(
                        "{r:?}: a port range needs TCP, UDP or SCTP, a key without a port, and a local side \
                         that is not a wildcard"
                    ),
                });
            }
            if r.lo == 0 || r.lo > r.hi {
                return Err(Error::InvalidRule {
                    field: "ranges",
                    reason: format!(
                        "ports {}-{}: a range runs from 1 to 65535, first port first",
                        r.lo, r.hi
                    ),
                });
            }
            if !seen_ranges.insert(*r) {
                return Err(Error::InvalidRule { field: "ranges", reason: format!("{r:?} appears twice") });
            }
        }
        let mut shapes = Vec::with_capacity(rule.keys.len());
        let mut seen = std::collections::HashSet::new();
        for k in &rule.keys {
            let s = key_shape(k).ok_or_else(|| Error::InvalidRule {
                field: "keys",
                reason: format!("{k:?}: a port needs a protocol, and the local side cannot be a wildcard"),
            })?;
            if !seen.insert(*k) {
                return Err(Error::InvalidRule { field: "keys", reason: format!("{k:?} appears twice") });
            }
            if let Some(owner) = self.owners.get(k) {
                return Err(Error::KeyOwned { key: *k, owner: *owner });
            }
            shapes.push(s);
        }
        let needed = u32::try_from(rule.keys.len()).unwrap_or(u32::MAX);
        let used = u32::try_from(self.owners.len()).unwrap_or(u32::MAX);
        if used.saturating_add(needed) > self.policy_capacity {
            return Err(Error::MapFull { map: map_names::POLICY, capacity: self.policy_capacity, needed });
        }
        Ok(shapes)
    }

    /// Insert every key (never overwriting); on the first failure remove what went in.
    fn insert_all(&mut self, keys: &[PolicyKey], value: PolicyValue) -> Result<(), aya::maps::MapError> {
        for (i, k) in keys.iter().enumerate() {
            if let Err(e) = self.policy.insert(k, value, BPF_NOEXIST) {
                for done in &keys[..i] {
                    let _ = self.policy.remove(done);
                }
                return Err(e);
            }
        }
        Ok(())
    }

    /// Replace rule `old` by `rule`, make-before-break: keys only in the new rule go in while
    /// its slot is inactive, the new slot is switched on, keys in both move to the new slot one
    /// atomic map update each, then the old rule is retired (its slot cleared, keys only it had
    /// removed). At no moment is a key in both rules unmatched, and keys only in the old rule
    /// never outlive it. Flows the old rule admitted are re-judged on their next packet and
    /// carry on under the new rule if it allows them.
    pub fn replace(&mut self, old: u32, rule: &Rule) -> Result<RuleHandle, Error> {
        let old_rec = self.records.get(&old).cloned().ok_or(Error::UnknownCookie { cookie: old })?;
        if old_rec.admin.is_some() {
            return Err(Error::InvalidRule {
                field: "replace",
                reason: format!("cookie {old} is an admin rule"),
            });
        }
        let old_keys: std::collections::HashSet<PolicyKey> = old_rec.keys.iter().copied().collect();
        // Validate as a fresh rule, with the old rule's keys counted as free.
        for k in &old_rec.keys {
            self.owners.remove(k);
        }
        let checked = self.validate(rule);
        for k in &old_rec.keys {
            self.owners.insert(*k, old);
        }
        checked?;
        let added: Vec<PolicyKey> = rule.keys.iter().filter(|k| !old_keys.contains(k)).copied().collect();
        let kept: Vec<PolicyKey> = rule.keys.iter().filter(|k| old_keys.contains(k)).copied().collect();
        let new_keys: std::collections::HashSet<PolicyKey> = rule.keys.iter().copied().collect();
        let removed: Vec<PolicyKey> =
            old_rec.keys.iter().filter(|k| !new_keys.contains(k)).copied().collect();
        let n = |v: &[PolicyKey]| u32::try_from(v.len()).unwrap_or(u32::MAX);
        let used = u32::try_from(self.owners.len()).unwrap_or(u32::MAX);
        if used.saturating_add(n(&added)) > self.policy_capacity {
            return Err(Error::MapFull {
                map: map_names::POLICY,
                capacity: self.policy_capacity,
                needed: n(&added),
            });
        }
        let expires_at = time::expiry(rule.ttl)?;
        let (slot, cookie) = self.new_slot()?;
        self.clear_slot(slot)?;
        // Counters up before anything appears.
        let added_shapes: Vec<usize> = added.iter().filter_map(key_shape).collect();
        let new_denies = if rule.action == Action::Deny {
            n(&added) + if old_rec.action == Action::Deny { 0 } else { n(&kept) }
        } else {
            0
        };
        let mut cfg = self.config()?;
        for s in &added_shapes {
            cfg.policy_shape_count[*s] += 1;
        }
        cfg.policy_deny_count += new_denies;
        self.set_config(cfg)?;
        self.count_ranges(&rule.ranges, rule.action, true)?;
        let undo_counts = |w: &mut Self| -> Result<(), Error> {
            let mut cfg = w.config()?;
            for s in &added_shapes {
                cfg.policy_shape_count[*s] = cfg.policy_shape_count[*s].saturating_sub(1);
            }
            cfg.policy_deny_count = cfg.policy_deny_count.saturating_sub(new_denies);
            w.set_config(cfg)?;
            w.count_ranges(&rule.ranges, rule.action, false)
        };
        let value = PolicyValue { cookie, slot, action: rule.action.code(), pad: 0 };
        if let Err(e) = self.insert_all(&added, value) {
            undo_counts(self)?;
            self.free_slots.push(slot);
            return Err(Error::Map { name: map_names::POLICY, source: Box::new(e) });
        }
        // The new ranges replace the old rule's in one write per range key once the new slot
        // is on (until then the old rule's decide, its slot still on); the sets they make are
        // checked against the limits now, before anything is switched.
        let range_keys: std::collections::BTreeSet<PolicyKey> =
            rule.ranges.iter().chain(&old_rec.ranges).map(|r| r.key).collect();
        let members = range_members(rule, cookie, slot, expires_at, false);
        if let Err(e) = self.plan_ranges(&range_keys, Some(old), &members) {
            for k in &added {
                let _ = self.policy.remove(k);
            }
            undo_counts(self)?;
            self.free_slots.push(slot);
            return Err(e);
        }
        self.activate(slot, cookie, expires_at)?;
        for k in &kept {
            self.policy.insert(k, value, 0).map_err(Error::map(map_names::POLICY))?;
        }
        // Established flows are judged again once every part of the new rule, its deny ranges
        // included, is in force.
        self.record_rule(rule, RuleHandle { cookie, slot, expires_at }, &range_keys, Some(old), &members)?;
        if rule.action == Action::Deny {
            self.rejudge_flows()?;
        }
        self.retire_replaced(old, &old_rec, &removed, n(&kept), rule.action)?;
        Ok(RuleHandle { cookie, slot, expires_at })
    }

    /// The last step of [`Self::replace`]: retire rule `old` (its slot cleared, keys only it
    /// had removed, its counts lowered). `kept`: keys both rules have.
    fn retire_replaced(
        &mut self,
        old: u32,
        old_rec: &Record,
        removed: &[PolicyKey],
        kept: u32,
        new_action: Action,
    ) -> Result<(), Error> {
        let n = |v: &[PolicyKey]| u32::try_from(v.len()).unwrap_or(u32::MAX);
        self.records.remove(&old);
        self.clear_slot(old_rec.slot)?;
        for k in removed {
            let _ = self.policy.remove(k);
            self.owners.remove(k);
        }
        let removed_shapes: Vec<usize> = removed.iter().filter_map(key_shape).collect();
        let old_denies = if old_rec.action == Action::Deny {
            n(removed) + if new_action == Action::Deny { 0 } else { kept }
        } else {
            0
        };
        let mut cfg = self.config()?;
        for s in &removed_shapes {
            cfg.policy_shape_count[*s] = cfg.policy_shape_count[*s].saturating_sub(1);
        }
        cfg.policy_deny_count = cfg.policy_deny_count.saturating_sub(old_denies);
        self.set_config(cfg)?;
        self.count_ranges(&old_rec.ranges, old_rec.action, false)?;
        self.free_slots.push(old_rec.slot);
        Ok(())
    }

    /// Keys of an installed rule.
    #[must_use]
    pub fn rule_keys(&self, cookie: u32) -> Option<&[PolicyKey]> {
        self.records.get(&cookie).map(|r| r.keys.as_slice())
    }

    /// Port ranges of an installed rule.
    #[must_use]
    pub fn rule_ranges(&self, cookie: u32) -> Option<&[RangeKey]> {
        self.records.get(&cookie).map(|r| r.ranges.as_slice())
    }

    fn lower_counts(&mut self, shapes: &[usize], action: Action, n: u32) -> Result<(), Error> {
        let mut cfg = self.config()?;
        for s in shapes {
            cfg.policy_shape_count[*s] = cfg.policy_shape_count[*s].saturating_sub(1);
        }
        if action == Action::Deny {
            cfg.policy_deny_count = cfg.policy_deny_count.saturating_sub(n);
        }
        self.set_config(cfg)
    }

    /// Record a rule whose slot `h` is on (its keys owned, its record kept) and split the range
    /// sets under `range_keys` into their final form: without the ranges of `replaced`, with
    /// `extra` (the rule's ranges when they are not in the sets yet).
    fn record_rule(
        &mut self,
        rule: &Rule,
        h: RuleHandle,
        range_keys: &std::collections::BTreeSet<PolicyKey>,
        replaced: Option<u32>,
        extra: &[(RangeKey, ranges::Member)],
    ) -> Result<(), Error> {
        for k in &rule.keys {
            self.owners.insert(*k, h.cookie);
        }
        let record = Record {
            slot: h.slot,
            action: rule.action,
            expires_at: h.expires_at,
            keys: rule.keys.clone(),
            ranges: rule.ranges.clone(),
            admin: None,
        };
        self.records.insert(h.cookie, record);
        if range_keys.is_empty() {
            return Ok(());
        }
        let plan = self.plan_ranges(range_keys, replaced, extra)?;
        self.write_ranges(plan)
    }

    /// Put the ranges of `rule` (to be `cookie` in `slot`, still off) into the sets of
    /// `keys`: they decide only intervals no live rule of their kind covers, so nothing a live
    /// rule admits or denies changes before the slot is switched on.
    fn stage_ranges(
        &mut self,
        rule: &Rule,
        cookie: u32,
        slot: u32,
        expires_at: u64,
        keys: &std::collections::BTreeSet<PolicyKey>,
    ) -> Result<(), Error> {
        if keys.is_empty() {
            return Ok(());
        }
        let plan = self.plan_ranges(keys, None, &range_members(rule, cookie, slot, expires_at, true))?;
        self.write_ranges(plan)
    }

    /// Raise (or lower) the range counters for `ranges` of a rule with `action`.
    fn count_ranges(&mut self, ranges: &[RangeKey], action: Action, up: bool) -> Result<(), Error> {
        if ranges.is_empty() {
            return Ok(());
        }
        let mut cfg = self.config()?;
        let n = u32::try_from(ranges.len()).unwrap_or(u32::MAX);
        for r in ranges {
            if let Some(s) = range_shape(&r.key) {
                let c = &mut cfg.range_shape_count[s];
                *c = if up { c.saturating_add(1) } else { c.saturating_sub(1) };
            }
        }
        if action == Action::Deny {
            let c = &mut cfg.range_deny_count;
            *c = if up { c.saturating_add(n) } else { c.saturating_sub(n) };
        }
        self.set_config(cfg)
    }

    /// The new value of each range set under `keys`: the ranges its set holds now, without
    /// those of rule `exclude`, plus `extra` (a rule not recorded yet). A set that would exceed its limits, or a map that would
    /// need more entries than it has, is an error and nothing is planned.
    fn plan_ranges(
        &self,
        keys: &std::collections::BTreeSet<PolicyKey>,
        exclude: Option<u32>,
        extra: &[(RangeKey, ranges::Member)],
    ) -> Result<Vec<(PolicyKey, Option<RangeSet>)>, Error> {
        let mut plan = Vec::with_capacity(keys.len());
        let mut entries = self.range_index.len();
        for key in keys {
            let mut members: Vec<ranges::Member> = self
                .range_index
                .get(key)
                .into_iter()
                .flatten()
                .filter(|(_, _, cookie)| Some(*cookie) != exclude)
                .filter_map(|&(lo, hi, cookie)| {
                    let rec = self.records.get(&cookie)?;
                    Some(ranges::Member {
                        lo,
                        hi,
                        cookie,
                        slot: rec.slot,
                        action: rec.action.code(),
                        expires_at: rec.expires_at,
                        deferred: false,
                    })
                })
                .collect();
            members.extend(extra.iter().filter(|(r, _)| r.key == *key).map(|(_, m)| *m));
            let value = ranges::set_value(&members).map_err(|over| Error::RangeLimit {
                key: *key,
                reason: match over {
                    ranges::Overflow::Ranges(n) => format!(
                        "{n} ranges, at most {} rules' ranges fit under one key",
                        enforcer_common::RANGES_PER_KEY
                    ),
                    ranges::Overflow::Intervals(n) => format!(
                        "the overlapping ranges split into {n} intervals, at most {} fit",
                        enforcer_common::INTERVALS_PER_KEY
                    ),
                },
            })?;
            match (self.range_index.contains_key(key), value.is_some()) {
                (false, true) => entries += 1,
                (true, false) => entries -= 1,
                _ => {}
            }
            plan.push((*key, value));
        }
        if u32::try_from(entries).unwrap_or(u32::MAX) > self.ranges_capacity {
            let needed = u32::try_from(entries - self.range_index.len()).unwrap_or(u32::MAX);
            return Err(Error::MapFull { map: map_names::RANGES, capacity: self.ranges_capacity, needed });
        }
        Ok(plan)
    }

    /// Write planned range sets, each with one map update; on a failure the sets already
    /// written are put back and nothing of the plan stays.
    fn write_ranges(&mut self, plan: Vec<(PolicyKey, Option<RangeSet>)>) -> Result<(), Error> {
        let mut done: Vec<(PolicyKey, Option<RangeSet>)> = Vec::with_capacity(plan.len());
        for (key, value) in &plan {
            let before = self.ranges.get(key, 0).ok();
            if before == *value {
                continue;
            }
            let r = match value {
                Some(v) => self.ranges.insert(key, v, 0).map_err(|e| self.full_or(e, map_names::RANGES)),
                None => self.ranges.remove(key).map_err(Error::map(map_names::RANGES)),
            };
            if let Err(e) = r {
                for (k, old) in done.into_iter().rev() {
                    let _ = match old {
                        Some(v) => self.ranges.insert(k, v, 0),
                        None => self.ranges.remove(&k),
                    };
                }
                return Err(e);
            }
            done.push((*key, before));
        }
        for (key, value) in plan {
            match value {
                Some(v) => {
                    let n = usize::try_from(v.rules_len).unwrap_or(0).min(v.rules.len());
                    self.range_index
                        .insert(key, v.rules[..n].iter().map(|r| (r.lo, r.hi, r.cookie)).collect());
                }
                None => {
                    self.range_index.remove(&key);
                }
            }
        }
        Ok(())
    }

    /// Replace admin rule `old` by `rule` with the same key, make-before-break: the new slot
    /// is switched on, then the key's value moves to it in one atomic update, then the old
    /// slot is cleared.
    pub fn replace_admin(&mut self, old: u32, rule: &AdminRule) -> Result<RuleHandle, Error> {
        let rec = self.records.get(&old).cloned().ok_or(Error::UnknownCookie { cookie: old })?;
        let Some((key, _)) = rec.admin else {
            return Err(Error::InvalidRule {
                field: "replace_admin",
                reason: format!("cookie {old} is not an admin rule"),
            });
        };
        if key != rule.key {
            return Err(Error::InvalidRule {
                field: "admin.key",
                reason: "replace_admin keeps the key; install the new key and revoke the old rule".into(),
            });
        }
        let expires_at = time::expiry(rule.ttl)?;
        let (slot, cookie) = self.new_slot()?;
        self.activate(slot, cookie, expires_at)?;
        let value = AdminValue { cookie, slot, action: rule.action.code(), priority: rule.priority };
        self.admin.insert(rule.key, value, 0).map_err(Error::map(map_names::ADMIN))?;
        if rule.action != Action::Allow {
            self.rejudge_flows()?;
        }
        self.clear_slot(rec.slot)?;
        self.records.remove(&old);
        self.free_slots.push(rec.slot);
        Ok(self.record_admin(rule, cookie, slot, expires_at))
    }

    fn record_admin(&mut self, rule: &AdminRule, cookie: u32, slot: u32, expires_at: u64) -> RuleHandle {
        self.admin_owners.insert(rule.key, cookie);
        let admin = Some((rule.key, rule.priority));
        self.records.insert(
            cookie,
            Record { slot, action: rule.action, expires_at, keys: Vec::new(), ranges: Vec::new(), admin },
        );
        RuleHandle { cookie, slot, expires_at }
    }

    /// Install an admin-tier rule.
    pub fn install_admin(&mut self, rule: &AdminRule) -> Result<RuleHandle, Error> {
        let shape = admin_shape(&rule.key).ok_or_else(|| Error::InvalidRule {
            field: "admin.key",
            reason: "a port needs a protocol".into(),
        })?;
        if let Some(owner) = self.admin_owners.get(&rule.key) {
            return Err(Error::InvalidRule {
                field: "admin.key",
                reason: format!("{:?} already belongs to admin rule cookie {owner}", rule.key),
            });
        }
        if u32::try_from(self.admin_owners.len()).unwrap_or(u32::MAX) >= self.admin_capacity {
            return Err(Error::MapFull { map: map_names::ADMIN, capacity: self.admin_capacity, needed: 1 });
        }
        let expires_at = time::expiry(rule.ttl)?;
        let (slot, cookie) = self.new_slot()?;
        self.clear_slot(slot)?;
        let mut cfg = self.config()?;
        cfg.admin_shape_count[shape] += 1;
        self.set_config(cfg)?;
        let value = AdminValue { cookie, slot, action: rule.action.code(), priority: rule.priority };
        if let Err(e) = self.admin.insert(rule.key, value, BPF_NOEXIST) {
            let mut cfg = self.config()?;
            cfg.admin_shape_count[shape] = cfg.admin_shape_count[shape].saturating_sub(1);
            self.set_config(cfg)?;
            self.free_slots.push(slot);
            return Err(Error::Map { name: map_names::ADMIN, source: Box::new(e) });
        }
        self.activate(slot, cookie, expires_at)?;
        // A deny, or a pass that hands a tenant pair back to the tenant tier, can end flows
        // an allow of lower priority admitted.
        if rule.action != Action::Allow {
            self.rejudge_flows()?;
        }
        Ok(self.record_admin(rule, cookie, slot, expires_at))
    }

    /// Revoke a rule or grant: from the next packet neither new nor established flows it
    /// admitted pass. Then its entries are freed.
    pub fn revoke(&mut self, cookie: u32) -> Result<(), Error> {
        let rec = self.records.remove(&cookie).ok_or(Error::UnknownCookie { cookie })?;
        // Its ranges leave the sets first (the other rules decide their intervals from then
        // on); the slot is cleared whatever happens, then the rest is freed.
        let range_keys: std::collections::BTreeSet<PolicyKey> = rec.ranges.iter().map(|r| r.key).collect();
        let ranges_out = if range_keys.is_empty() {
            Ok(())
        } else {
            self.plan_ranges(&range_keys, Some(cookie), &[]).and_then(|p| self.write_ranges(p))
        };
        self.clear_slot(rec.slot)?;
        self.count_ranges(&rec.ranges, rec.action, false)?;
        for k in &rec.keys {
            let _ = self.policy.remove(k);
            self.owners.remove(k);
        }
        let shapes: Vec<usize> = rec.keys.iter().filter_map(key_shape).collect();
        self.lower_counts(&shapes, rec.action, u32::try_from(rec.keys.len()).unwrap_or(u32::MAX))?;
        if let Some((k, _)) = rec.admin {
            let _ = self.admin.remove(&k);
            self.admin_owners.remove(&k);
            if let Some(s) = admin_shape(&k) {
                let mut cfg = self.config()?;
                cfg.admin_shape_count[s] = cfg.admin_shape_count[s].saturating_sub(1);
                self.set_config(cfg)?;
            }
        }
        self.free_slots.push(rec.slot);
        ranges_out
    }

    /// Change the lifetime of a rule or grant (`None` = no expiry). One write; applies to
    /// established flows too.
    pub fn set_ttl(&mut self, cookie: u32, ttl: Option<Duration>) -> Result<RuleHandle, Error> {
        let expires_at = time::expiry(ttl)?;
        let rec = self.records.get_mut(&cookie).ok_or(Error::UnknownCookie { cookie })?;
        rec.expires_at = expires_at;
        let slot = rec.slot;
        let range_keys: std::collections::BTreeSet<PolicyKey> = rec.ranges.iter().map(|r| r.key).collect();
        self.activate(slot, cookie, expires_at)?;
        // Which rule decides an interval depends on how long each lives.
        if !range_keys.is_empty() {
            let plan = self.plan_ranges(&range_keys, None, &[])?;
            self.write_ranges(plan)?;
        }
        Ok(RuleHandle { cookie, slot, expires_at })
    }

    /// Every installed rule, grant and admin rule (expired ones included until [`Self::gc`]).
    #[must_use]
    pub fn rules(&self) -> Vec<RuleInfo> {
        self.records
            .iter()
            .map(|(cookie, r)| RuleInfo {
                cookie: *cookie,
                slot: r.slot,
                action: r.action,
                expires_at: r.expires_at,
                policy_keys: r.keys.clone(),
                ranges: r.ranges.clone(),
                admin_key: r.admin.map(|(k, _)| k),
                priority: r.admin.map_or(0, |(_, p)| p),
            })
            .collect()
    }

    /// Number of entries in the policy map.
    #[must_use]
    pub fn policy_len(&self) -> usize {
        self.owners.len()
    }

    /// Capacity of the policy map.
    #[must_use]
    pub fn policy_capacity(&self) -> u32 {
        self.policy_capacity
    }

    /// Rule-state slots in use and available.
    #[must_use]
    pub fn slots(&self) -> (u32, u32) {
        (u32::try_from(self.records.len()).unwrap_or(u32::MAX), self.rules.len())
    }

    /// Owner (rule cookie) of a policy key.
    #[must_use]
    pub fn owner(&self, key: &PolicyKey) -> Option<u32> {
        self.owners.get(key).copied()
    }

    /// Map an exact address (/32 or /128) to an identity and tenant. An address registered
    /// for a workload behind an interface of this enforcer stays marked as such.
    pub fn set_identity(&mut self, ip: IpAddr, identity: u32, tenant: u32) -> Result<(), Error> {
        let key = addr::key(ip);
        let flags = self.identity.get(&key, 0).map_or(0, |i| i.flags & IDENTITY_F_LOCAL);
        self.put_identity(key, IdentityInfo { identity, tenant, flags })
    }

    /// Write an identity entry; if it gives an address another identity or tenant, flows
    /// admitted for the old one are judged again.
    fn put_identity(&mut self, key: enforcer_common::Addr, info: IdentityInfo) -> Result<(), Error> {
        let old = self.identity.get(&key, 0).ok();
        self.identity.insert(key, info, 0).map_err(|e| self.full_or(e, map_names::IDENTITY))?;
        match old {
            Some(o) if (o.identity, o.tenant) != (info.identity, info.tenant) => self.rejudge_flows(),
            _ => Ok(()),
        }
    }

    /// The identity entry of an exact address.
    #[must_use]
    pub fn identity(&self, ip: IpAddr) -> Option<IdentityInfo> {
        self.identity.get(&addr::key(ip), 0).ok()
    }

    /// Forget an exact address's identity (it falls back to CIDR peers, then world); flows
    /// admitted for it are judged again.
    pub fn remove_identity(&mut self, ip: IpAddr) -> Result<(), Error> {
        match self.identity.remove(&addr::key(ip)) {
            Ok(()) => self.rejudge_flows(),
            Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(Error::Map { name: map_names::IDENTITY, source: Box::new(e) }),
        }
    }

    /// Map a CIDR peer to an identity (host bits are masked). A prefix that is new or changes
    /// identity changes what addresses it covers resolve to (the longest prefix wins), so
    /// established flows are judged again.
    pub fn set_cidr(&mut self, ip: IpAddr, len: u8, identity: u32, tenant: u32) -> Result<(), Error> {
        let key = LpmKey::new(addr::lpm_len(ip, len), CidrAddr { addr: addr::key(addr::mask(ip, len)) });
        let info = IdentityInfo { identity, tenant, flags: 0 };
        let unchanged = self.cidr.get(&key, 0).is_ok_and(|o| o == info);
        let mut cfg = self.config()?;
        cfg.cidr_count += 1;
        self.set_config(cfg)?;
        let r = self.cidr.insert(&key, info, 0);
        if let Err(e) = r {
            self.recount()?;
            return Err(self.full_or(e, map_names::CIDR));
        }
        self.recount()?;
        if unchanged { Ok(()) } else { self.rejudge_flows() }
    }

    /// Forget a CIDR peer; established flows are judged again.
    pub fn remove_cidr(&mut self, ip: IpAddr, len: u8) -> Result<(), Error> {
        let key = LpmKey::new(addr::lpm_len(ip, len), CidrAddr { addr: addr::key(addr::mask(ip, len)) });
        let removed = self.cidr.remove(&key).is_ok();
        self.recount()?;
        if removed { self.rejudge_flows() } else { Ok(()) }
    }

    /// Every CIDR peer entry as the LPM map holds it: (network address, prefix length in the
    /// address's own family, identity info). Read from the pinned map, so it also lists what an
    /// earlier run of the enforcer installed.
    pub fn cidrs(&self) -> Result<Vec<(IpAddr, u8, IdentityInfo)>, Error> {
        let mut out = Vec::new();
        for item in &self.cidr {
            let (k, v) = item.map_err(Error::map(map_names::CIDR))?;
            let ip = addr::from_key(k.data().addr);
            let bits = k.prefix_len();
            let len = if ip.is_ipv4() { bits.saturating_sub(96) } else { bits };
            out.push((ip, u8::try_from(len).unwrap_or(u8::MAX), v));
        }
        Ok(out)
    }

    /// Number of CIDR peer entries.
    #[must_use]
    pub fn cidr_len(&self) -> usize {
        self.cidr.keys().count()
    }

    /// Number of exact-address identity entries.
    #[must_use]
    pub fn identity_len(&self) -> usize {
        self.identity.keys().count()
    }

    /// Every exact-address identity entry.
    pub fn identities(&self) -> Result<Vec<(IpAddr, IdentityInfo)>, Error> {
        let mut out = Vec::new();
        for item in &self.identity {
            let (k, v) = item.map_err(Error::map(map_names::IDENTITY))?;
            out.push((addr::from_key(k), v));
        }
        Ok(out)
    }

    /// Number of admin-tier entries.
    #[must_use]
    pub fn admin_len(&self) -> usize {
        self.admin_owners.len()
    }

    /// Number of entries (range keys) in the port-range map.
    #[must_use]
    pub fn ranges_len(&self) -> usize {
        self.range_index.len()
    }

    /// Register a workload behind the interface `ifindex` (TC attachment) and map its
    /// addresses to its identity.
    /// All or nothing: if a map is full, the addresses keep what they had.
    pub fn set_interface_workload(&mut self, ifindex: u32, w: &Workload) -> Result<(), Error> {
        self.set_workload(EndpointKey::Interface(ifindex), w, IDENTITY_F_LOCAL)
    }

    /// Register a workload by cgroup id (cgroup attachment); all or nothing, as
    /// [`Self::set_interface_workload`].
    pub fn set_cgroup_workload(&mut self, cgroup_id: u64, w: &Workload) -> Result<(), Error> {
        self.set_workload(EndpointKey::Cgroup(cgroup_id), w, 0)
    }

    fn set_workload(&mut self, key: EndpointKey, w: &Workload, flags: u32) -> Result<(), Error> {
        let addrs: Vec<enforcer_common::Addr> =
            w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)).map(addr::key).collect();
        let before: Vec<Option<IdentityInfo>> = addrs.iter().map(|a| self.identity.get(a, 0).ok()).collect();
        let r = self.set_workload_addrs(w, flags).and_then(|()| self.set_endpoint(key, w));
        if r.is_err() {
            // Put back what the addresses had (overwriting or removing needs no room).
            for (a, old) in addrs.iter().zip(before) {
                let _ = match old {
                    Some(info) => self.put_identity(*a, info),
                    None => self.identity.remove(a).map_err(Error::map(map_names::IDENTITY)),
                };
            }
        }
        r
    }

    /// Forget the workload registered by cgroup id: cgroup programs drop its traffic (no
    /// endpoint). Its addresses keep their identity.
    pub fn remove_cgroup_workload(&mut self, cgroup_id: u64) -> Result<(), Error> {
        match self.cgroups.remove(&cgroup_id) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
            Err(e) => return Err(Error::Map { name: map_names::CGROUPS, source: Box::new(e) }),
        }
        self.event_slots.release(EndpointKey::Cgroup(cgroup_id));
        Ok(())
    }

    fn set_workload_addrs(&mut self, w: &Workload, flags: u32) -> Result<(), Error> {
        for ip in w.ipv4.map(IpAddr::V4).into_iter().chain(w.ipv6.map(IpAddr::V6)) {
            self.put_identity(addr::key(ip), IdentityInfo { identity: w.identity, tenant: w.tenant, flags })?;
        }
        Ok(())
    }

    /// Forget the workload behind `ifindex`: programs still attached there drop everything.
    /// Its addresses keep their identity but are no longer local delivery targets.
    pub fn remove_interface_workload(&mut self, ifindex: u32) -> Result<(), Error> {
        let old = if ifindex < ENDPOINT_ARRAY_SIZE {
            self.endpoints.get(&ifindex, 0).ok()
        } else {
            self.endpoints_hash.get(&ifindex, 0).ok()
        };
        if let Some(ep) = old {
            for (flag, a) in [(ENDPOINT_F_HAS_V4, ep.addr_v4), (ENDPOINT_F_HAS_V6, ep.addr_v6)] {
                if ep.flags & flag != 0
                    && let Ok(mut info) = self.identity.get(&a, 0)
                    && info.flags & IDENTITY_F_LOCAL != 0
                {
                    info.flags &= !IDENTITY_F_LOCAL;
                    self.put_identity(a, info)?;
                }
            }
        }
        if ifindex < ENDPOINT_ARRAY_SIZE {
            self.endpoints.set(ifindex, Endpoint::default(), 0).map_err(Error::map(map_names::ENDPOINTS))?;
        } else {
            match self.endpoints_hash.remove(&ifindex) {
                Ok(()) | Err(aya::maps::MapError::KeyNotFound) => {}
                Err(e) => return Err(Error::Map { name: map_names::ENDPOINTS_HASH, source: Box::new(e) }),
            }
        }
        self.event_slots.release(EndpointKey::Interface(ifindex));
        Ok(())
    }

    /// Traffic to these (protocol, port) pairs passes whatever the policy.
    pub fn set_failsafe(&mut self, ports: &[(u8, u16)]) -> Result<(), Error> {
        if ports.len() > MAX_FAILSAFE {
            return Err(Error::InvalidRule {
                field: "failsafe",
                reason: format!("at most {MAX_FAILSAFE} failsafe ports, got {}", ports.len()),
            });
        }
        let mut cfg = self.config()?;
        cfg.failsafe = [Failsafe::default(); MAX_FAILSAFE];
        for (i, (proto, port)) in ports.iter().enumerate() {
            if *proto == PROTO_ANY || *port == PORT_ANY {
                return Err(Error::InvalidRule {
                    field: "failsafe",
                    reason: "protocol and port are required".into(),
                });
            }
            cfg.failsafe[i] = Failsafe { port: *port, proto: *proto, pad: 0 };
        }
        cfg.failsafe_count = u32::try_from(ports.len()).unwrap_or(0);
        // Flows a removed failsafe port admitted are judged again (by policy) from their next
        // packet; the new list is in force before that.
        let old = self.config()?;
        let changed = (old.failsafe, old.failsafe_count) != (cfg.failsafe, cfg.failsafe_count);
        self.set_config(cfg)?;
        if changed { self.rejudge_flows() } else { Ok(()) }
    }

    /// Report every new allowed flow as an event (drops and audits are always reported).
    pub fn set_flow_events(&mut self, on: bool) -> Result<(), Error> {
        let mut cfg = self.config()?;
        cfg.flow_events = u32::from(on);
        self.set_config(cfg)
    }

    /// Limit the events (drops, audits, new allowed flows) each workload emits on each CPU,
    /// and optionally all of them together, to `limit`, or lift the limit (`None`). Events
    /// over the limit are counted as `EventSuppressed`; the packets themselves are judged and
    /// counted as always.
    pub fn set_event_rate_limit(&mut self, limit: Option<EventRateLimit>) -> Result<(), Error> {
        let (interval, burst, total_interval, total_burst) = match limit {
            None => (0, 0, 0, 0),
            Some(l) if l.burst == 0 => {
                return Err(Error::InvalidRule { field: "event_burst", reason: "must be at least 1".into() });
            }
            Some(l) if l.total_per_cpu_per_sec != 0 && l.total_burst == 0 => {
                return Err(Error::InvalidRule {
                    field: "event_burst_total",
                    reason: "must be at least 1 while a total limit is set".into(),
                });
            }
            Some(l) => {
                let total = if l.total_per_cpu_per_sec == 0 {
                    0
                } else {
                    rate_interval("event_rate_limit_total", l.total_per_cpu_per_sec)?
                };
                (rate_interval("event_rate", l.per_cpu_per_sec)?, l.burst, total, l.total_burst)
            }
        };
        let mut cfg = self.config()?;
        (cfg.event_interval_ns, cfg.event_burst) = (interval, burst);
        (cfg.event_total_interval_ns, cfg.event_total_burst) =
            if total_interval == 0 { (0, 0) } else { (total_interval, total_burst) };
        self.set_config(cfg)
    }

    /// The event rate limit in force, if any (the rate as stored: whole nanoseconds per event).
    pub fn event_rate_limit(&self) -> Result<Option<EventRateLimit>, Error> {
        let cfg = self.config()?;
        let rate = |interval: u32| {
            if interval == 0 {
                0
            } else {
                u32::try_from(1_000_000_000 / u64::from(interval)).unwrap_or(u32::MAX)
            }
        };
        Ok((cfg.event_interval_ns != 0).then(|| EventRateLimit {
            per_cpu_per_sec: rate(cfg.event_interval_ns),
            burst: cfg.event_burst,
            total_per_cpu_per_sec: rate(cfg.event_total_interval_ns),
            total_burst: cfg.event_total_burst,
        }))
    }

    /// Hand packets between two local workloads straight to the destination's namespace when
    /// the host would forward them there (see `docs/datapath.md`, local delivery).
    pub fn set_local_delivery(&mut self, on: bool) -> Result<(), Error> {
        let mut cfg = self.config()?;
        cfg.local_delivery = u32::from(on);
        self.set_config(cfg)
    }

    /// Whether local delivery is switched on.
    pub fn local_delivery(&self) -> Result<bool, Error> {
        Ok(self.config()?.local_delivery != 0)
    }

    /// Record what the data plane may do with interface `ifindex` (`LINK_F_*`). Interfaces at
    /// or above `ENDPOINT_ARRAY_SIZE` cannot be recorded and never qualify.
    pub(crate) fn set_link_flags(&mut self, ifindex: u32, flags: u32) -> Result<(), Error> {
        if ifindex >= ENDPOINT_ARRAY_SIZE {
            return Ok(());
        }
        self.links.set(ifindex, flags, 0).map_err(Error::map(map_names::LINKS))
    }

    /// The `LINK_F_*` flags recorded for interface `ifindex`.
    pub fn link_flags(&self, ifindex: u32) -> Result<u32, Error> {
        if ifindex >= ENDPOINT_ARRAY_SIZE {
            return Ok(0);
        }
        self.links.get(&ifindex, 0).map_err(Error::map(map_names::LINKS))
    }

    /// Packet counters summed over CPUs, by reason.
    pub fn counters(&self) -> Result<BTreeMap<Reason, u64>, Error> {
        let mut out = BTreeMap::new();
        for r in Reason::ALL {
            let v = self.counters.get(&(r as u32), 0).map_err(Error::map(map_names::COUNTERS))?;
            out.insert(r, v.iter().sum());
        }
        Ok(out)
    }

    /// Events suppressed by the rate limit, by workload identity, verdict and reason (summed
    /// over CPUs). Together with the events read, per-workload verdict counts are exact — as
    /// long as the map had room (see `ZT_SUPPRESSED`; the global `EventSuppressed` counter is
    /// always exact).
    pub fn suppressed(&self) -> Result<BTreeMap<(u32, crate::events::Verdict, Reason), u64>, Error> {
        let mut out = BTreeMap::new();
        for item in &self.suppressed {
            let (k, v) = item.map_err(Error::map(map_names::SUPPRESSED))?;
            let (Some(verdict), Some(reason)) =
                (crate::events::Verdict::from_u8(k.verdict), Reason::from_u8(k.reason))
            else {
                continue;
            };
            *out.entry((k.identity, verdict, reason)).or_insert(0) += v.iter().sum::<u64>();
        }
        Ok(out)
    }

    /// Conntrack entries of both families (IPv4 keys widened to the mapped form).
    pub fn conntrack(&self) -> Result<Vec<(CtKey, CtValue)>, Error> {
        let mut out: Vec<(CtKey, CtValue)> = self
            .conntrack4
            .iter()
            .map(|r| r.map(|(k, v)| (k.widen(), v)).map_err(Error::map(map_names::CONNTRACK4)))
            .collect::<Result<_, _>>()?;
        for r in &self.conntrack6 {
            out.push(r.map_err(Error::map(map_names::CONNTRACK6))?);
        }
        Ok(out)
    }

    /// Number of conntrack entries of both families.
    #[must_use]
    pub fn conntrack_len(&self) -> usize {
        self.conntrack4.keys().count() + self.conntrack6.keys().count()
    }

    /// Free memory: remove rules whose expiry passed and conntrack entries idle longer than
    /// `ct_idle` or bound to a rule that no longer admits them. Enforcement never depends on it.
    pub fn gc(&mut self, ct_idle: Duration) -> Result<GcStats, Error> {
        let now = time::monotonic_ns()?;
        let expired: Vec<u32> = self
            .records
            .iter()
            .filter(|(_, r)| r.expires_at != 0 && r.expires_at <= now)
            .map(|(c, _)| *c)
            .collect();
        let mut stats = GcStats { rules_removed: expired.len(), ..GcStats::default() };
        for c in expired {
            self.revoke(c)?;
        }
        let idle = u64::try_from(ct_idle.as_nanos()).unwrap_or(u64::MAX);
        let dead = |v: &CtValue| {
            let limit = if v.flags & enforcer_common::CT_F_CLOSING != 0 {
                idle.min(enforcer_common::CT_CLOSING_IDLE_NS)
            } else {
                idle
            };
            let idle_out = now.saturating_sub(v.last_seen_ns) > limit;
            let unbacked =
                v.slot != SLOT_NONE && !self.rules.get(&v.slot, 0).unwrap_or_default().admits(v.cookie, now);
            idle_out || unbacked
        };
        let dead4 = dead_entries(&self.conntrack4, map_names::CONNTRACK4, dead)?;
        let dead6 = dead_entries(&self.conntrack6, map_names::CONNTRACK6, dead)?;
        for k in dead4 {
            stats.conntrack_removed += usize::from(self.conntrack4.remove(&k).is_ok());
        }
        for k in dead6 {
            stats.conntrack_removed += usize::from(self.conntrack6.remove(&k).is_ok());
        }
        Ok(stats)
    }
}

/// Keys of the conntrack entries `dead` selects.
fn dead_entries<K: aya::Pod>(
    map: &HashMap<MapData, K, CtValue>,
    name: &'static str,
    dead: impl Fn(&CtValue) -> bool,
) -> Result<Vec<K>, Error> {
    let mut out = Vec::new();
    for item in map {
        let (k, v) = item.map_err(Error::map(name))?;
        if dead(&v) {
            out.push(k);
        }
    }
    Ok(out)
}

/// The ranges of `rule`, to be `cookie` in `slot`, as set members.
fn range_members(
    rule: &Rule,
    cookie: u32,
    slot: u32,
    expires_at: u64,
    deferred: bool,
) -> Vec<(RangeKey, ranges::Member)> {
    let action = rule.action.code();
    rule.ranges
        .iter()
        .map(|r| (*r, ranges::Member { lo: r.lo, hi: r.hi, cookie, slot, action, expires_at, deferred }))
        .collect()
}

/// Range probe shape of a range key: 0 for a specific peer, 1 for any peer (`None` if it is
/// not a range key: a port, a protocol without ports, a wildcard local side).
fn range_shape(k: &PolicyKey) -> Option<usize> {
    let (local, peer) =
        if k.dir == DIR_EGRESS { (k.src_identity, k.dst_identity) } else { (k.dst_identity, k.src_identity) };
    if local == IDENTITY_ANY
        || k.dport != PORT_ANY
        || !matches!(k.proto, IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP)
    {
        return None;
    }
    Some(usize::from(peer == IDENTITY_ANY))
}

fn key_shape(k: &PolicyKey) -> Option<usize> {
    let (local, peer) =
        if k.dir == DIR_EGRESS { (k.src_identity, k.dst_identity) } else { (k.dst_identity, k.src_identity) };
    if local == IDENTITY_ANY {
        return None;
    }
    policy_shape(peer == IDENTITY_ANY, k.proto, k.dport)
}

/// An event rate limit (see [`Writer::set_event_rate_limit`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EventRateLimit {
    /// Sustained events per second each workload may emit on each CPU, 1 to 1,000,000,000.
    pub per_cpu_per_sec: u32,
    /// Events a workload may emit on a CPU back to back after being quiet, at least 1.
    pub burst: u32,
    /// Sustained events per second all workloads together may emit on each CPU, 0 (no total
    /// limit) to 1,000,000,000.
    pub total_per_cpu_per_sec: u32,
    /// Events all workloads together may emit on a CPU back to back (with a total limit, at
    /// least 1).
    pub total_burst: u32,
}

/// Nanoseconds per event at `per_sec` events per second (1 to 1,000,000,000).
fn rate_interval(field: &'static str, per_sec: u32) -> Result<u32, Error> {
    if per_sec == 0 || per_sec > 1_000_000_000 {
        return Err(Error::InvalidRule {
            field,
            reason: format!("{per_sec} events per second: must be 1 to 1000000000"),
        });
    }
    Ok(1_000_000_000 / per_sec)
}
