//! Every map of the data plane. All are pinned by name under the enforcer's pin directory so a
//! restart of the daemon reuses them. Sizes here are defaults; the loader may override them.
//! No LRU map holds allow state: a full map is an error userspace sees, never a silent eviction.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, PerCpuHashMap, ProgramArray, RingBuf},
};
use enforcer_common::{
    Addr, AdminKey, AdminValue, CidrAddr, Config, CtKey, CtKey4, CtValue, ENDPOINT_ARRAY_SIZE, EVENT_SLOTS,
    Endpoint, IdentityInfo, PolicyKey, PolicyValue, REASON_COUNT, RangeSet, RuleState, SuppressedKey,
};

/// Exact /32 and /128 address (16 bytes, IPv4 mapped) → identity.
#[map]
pub static ZT_IDENTITY: HashMap<Addr, IdentityInfo> = HashMap::pinned(65536, 0);

/// CIDR peers only; consulted when the exact map misses and `Config::cidr_count` is non-zero.
#[map]
pub static ZT_CIDR: LpmTrie<CidrAddr, IdentityInfo> = LpmTrie::pinned(16384, 0);

/// Interface index (TC attachment) → managed workload, for indexes below
/// `ENDPOINT_ARRAY_SIZE` (array lookups are inlined by the verifier).
#[map]
pub static ZT_ENDPOINTS: Array<Endpoint> = Array::pinned(ENDPOINT_ARRAY_SIZE, 0);

/// Interface index → managed workload, for larger indexes.
#[map]
pub static ZT_ENDPOINTS_HASH: HashMap<u32, Endpoint> = HashMap::pinned(4096, 0);

/// cgroup v2 id → managed workload (cgroup_skb and sock_addr attachments).
#[map]
pub static ZT_CGROUPS: HashMap<u64, Endpoint> = HashMap::pinned(4096, 0);

/// Tenant tier: exact key plus wildcard probes.
#[map]
pub static ZT_POLICY: HashMap<PolicyKey, PolicyValue> = HashMap::pinned(65536, 0);

/// Tenant tier: destination port ranges, per range key (a policy key without a port).
#[map]
pub static ZT_RANGES: HashMap<PolicyKey, RangeSet> = HashMap::pinned(8192, 0);

/// Admin tier: tenant pairs and cluster-wide rules.
#[map]
pub static ZT_ADMIN: HashMap<AdminKey, AdminValue> = HashMap::pinned(4096, 0);

/// Rule and grant state (expiry, liveness), indexed by slot.
#[map]
pub static ZT_RULES: Array<RuleState> = Array::pinned(262_144, 0);

/// Global configuration, element 0.
#[map]
pub static ZT_CONFIG: Array<Config> = Array::pinned(1, 0);

/// IPv4 connection tracking. A plain hash: userspace garbage-collects idle entries; when it is
/// full new flows are still evaluated per packet (slower, never more permissive).
#[map]
pub static ZT_CT4: HashMap<CtKey4, CtValue> = HashMap::pinned(262_144, 0);

/// IPv6 connection tracking, as `ZT_CT4`.
#[map]
pub static ZT_CT6: HashMap<CtKey, CtValue> = HashMap::pinned(262_144, 0);

/// Drops, audits and new allowed flows.
#[map]
pub static ZT_EVENTS: RingBuf = RingBuf::pinned(1 << 22, 0);

/// Per-CPU packet counters indexed by `Reason`.
#[map]
pub static ZT_COUNTERS: PerCpuArray<u64> = PerCpuArray::pinned(REASON_COUNT, 0);

/// Event rate limiter, per CPU: slot 0 for all workloads together, the others per endpoint
/// (`Endpoint::event_slot`); each holds the time at which the budget is spent down to empty
/// (a GCRA "theoretical arrival time", coarse monotonic ns). See `Config::event_interval_ns`.
#[map]
pub static ZT_EVENT_BUDGET: PerCpuArray<u64> = PerCpuArray::pinned(EVENT_SLOTS, 0);

/// Events suppressed by the rate limit, per CPU, by the workload they were about (identity),
/// verdict and reason, so per-workload verdict counts stay exact without the events. Written
/// only for suppressed events; when full, only the global `event_suppressed` counter counts.
#[map]
pub static ZT_SUPPRESSED: PerCpuHashMap<SuppressedKey, u64> = PerCpuHashMap::pinned(16_384, 0);

/// Interface index → link flags (`LINK_F_PEER`), written by userspace when it attaches the
/// ingress-check program; interfaces at or above `ENDPOINT_ARRAY_SIZE` never qualify.
#[map]
pub static ZT_LINKS: Array<u32> = Array::pinned(ENDPOINT_ARRAY_SIZE, 0);

/// The parsed packet the sender's check hands to the local delivery program it tail-calls
/// (one slot per CPU: nothing runs on a CPU between the two). Pinned so that a program of
/// one load can hand over to the delivery program of the next (see `ABI_VERSION`).
#[map]
pub static ZT_HANDOFF: PerCpuArray<crate::local::Handoff> = PerCpuArray::pinned(1, 0);

/// Slot 0: the local delivery program (`zt_tc_deliver`), set by userspace when it loads the
/// programs. Empty, the tail call fails and packets take the kernel path.
#[map]
pub static ZT_DELIVER: ProgramArray = ProgramArray::pinned(1, 0);

/// Slot 0: `zt_tc_related_from`, slot 1: `zt_tc_related_to` (ICMP errors, see `related.rs`),
/// set by userspace when it loads the programs. Empty, ICMP errors are judged by policy.
#[map]
pub static ZT_RELATED: ProgramArray = ProgramArray::pinned(2, 0);

/// The same for `cgroup_skb` workloads, one array per direction (a program array only holds
/// and serves programs of one attach type): `zt_cg_related_egress` in slot 0 of this one...
#[map]
pub static ZT_RELATED_CG_EGRESS: ProgramArray = ProgramArray::pinned(1, 0);

/// ...and `zt_cg_related_ingress` in slot 0 of this one.
#[map]
pub static ZT_RELATED_CG_INGRESS: ProgramArray = ProgramArray::pinned(1, 0);
