//! Map key and value types shared by the ztseg eBPF programs and the userspace enforcer.
//!
//! Every type here is `#[repr(C)]`, has explicit padding fields and no `bool`, so the byte
//! layout the kernel sees is the layout userspace writes. A compile-time assertion pins the size
//! of each type; changing one is an ABI change and must bump [`ABI_VERSION`], which the enforcer
//! checks against the pin directory before it reuses pinned maps.
//!
//! Addresses are 16 bytes in network byte order ([`Addr`]); IPv4 uses the IPv4-mapped form
//! `::ffff:a.b.c.d` so one key type serves both families. They are held as four native-endian
//! words of those bytes, so the kernel moves and compares them with word loads instead of 16
//! byte loads (BPF has no unaligned access for byte arrays).
#![no_std]

/// 16 address bytes in network order, as four words (`u32::from_ne_bytes` of each 4 bytes).
pub type Addr = [u32; 4];

/// Third word of an IPv4-mapped address (`0, 0, 0xff, 0xff`).
pub const V4_MAPPED_WORD: u32 = u32::from_ne_bytes([0, 0, 0xff, 0xff]);

/// Layout version of every pinned map. Bump on any change to a type in this crate, and on any
/// change to what the programs pass each other (the local delivery hand-over: the eBPF crate's
/// parsed flow and the packet control buffer).
pub const ABI_VERSION: u32 = 11;

// ---- reserved identities and tenants -------------------------------------------------------

/// No identity (never stored).
pub const IDENTITY_UNKNOWN: u32 = 0;
/// The host itself (loopback, host addresses).
pub const IDENTITY_HOST: u32 = 1;
/// Anything outside every known identity and CIDR.
pub const IDENTITY_WORLD: u32 = 2;
/// First identity number available to workloads and CIDR peers.
pub const IDENTITY_FIRST_USER: u32 = 256;
/// Wildcard identity in a [`PolicyKey`] probe.
pub const IDENTITY_ANY: u32 = u32::MAX;

/// Not a tenant: host, world and CIDR peers. Traffic to or from it is never cross-tenant.
pub const TENANT_NONE: u32 = 0;
/// Wildcard tenant in an [`AdminKey`].
pub const TENANT_ANY: u32 = u32::MAX;

/// Direction of a check, seen from the local workload.
pub const DIR_INGRESS: u8 = 0;
pub const DIR_EGRESS: u8 = 1;

/// Wildcard protocol / port in policy and admin keys.
pub const PROTO_ANY: u8 = 0;
pub const PORT_ANY: u16 = 0;

pub const IPPROTO_ICMP: u8 = 1;
pub const IPPROTO_TCP: u8 = 6;
pub const IPPROTO_UDP: u8 = 17;
pub const IPPROTO_ICMPV6: u8 = 58;
pub const IPPROTO_SCTP: u8 = 132;

/// `ICMP` and `ICMPv6` rules match the message type, encoded as `ICMP_PORT_BASE | type` in the
/// port field so that type 0 (echo reply) is not the port wildcard.
pub const ICMP_PORT_BASE: u16 = 0x100;

/// Policy port for an ICMP/ICMPv6 message type.
#[must_use]
pub const fn icmp_port(icmp_type: u8) -> u16 {
    ICMP_PORT_BASE | icmp_type as u16
}

/// Slot value meaning "no rule slot" (failsafe and audit conntrack entries).
pub const SLOT_NONE: u32 = u32::MAX;

// ---- identities ------------------------------------------------------------------------------

/// Value of the exact-match and LPM identity maps.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct IdentityInfo {
    pub identity: u32,
    pub tenant: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<IdentityInfo>() == 12);

/// [`IdentityInfo::flags`]: the address belongs to a workload behind an interface of this
/// enforcer, so a new flow to it may qualify for local delivery (others never try).
pub const IDENTITY_F_LOCAL: u32 = 1;

/// LPM key data for CIDR peers: 16 bytes, IPv4 in mapped form (prefix length + 96).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CidrAddr {
    pub addr: Addr,
}
const _: () = assert!(core::mem::size_of::<CidrAddr>() == 16);

/// Endpoint mode flags.
pub const ENDPOINT_F_AUDIT: u32 = 1;
pub const ENDPOINT_F_HAS_V4: u32 = 2;
pub const ENDPOINT_F_HAS_V6: u32 = 4;
/// Set on every registered endpoint (an all-zero array slot is "none").
pub const ENDPOINT_F_VALID: u32 = 8;

/// Interface indexes below this live in the endpoint array (an inlined lookup on the packet
/// path); larger ones in the endpoint hash.
pub const ENDPOINT_ARRAY_SIZE: u32 = 65_536;

/// A managed workload as seen from one attachment point (an interface index for TC, a cgroup
/// id for cgroup programs). The addresses are the only ones the workload may use as source:
/// anything else leaving its interface is spoofed and dropped.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Endpoint {
    pub identity: u32,
    pub tenant: u32,
    pub flags: u32,
    /// This endpoint's slot in the per-CPU event budget (`ZT_EVENT_BUDGET`, from
    /// [`EVENT_SLOT_FIRST`] to below [`EVENT_SLOTS`]), assigned by userspace;
    /// [`EVENT_SLOT_SHARED`] serves endpoints registered while every other slot is taken.
    pub event_slot: u32,
    /// The conntrack generation ([`Config::ct_epoch`]) this endpoint's entries must carry to
    /// be live, mirrored here by userspace so the packet path reads it with the endpoint.
    pub ct_epoch: u32,
    pub addr_v4: Addr,
    pub addr_v6: Addr,
}
const _: () = assert!(core::mem::size_of::<Endpoint>() == 52);

/// Slots of the event rate limiter (`ZT_EVENT_BUDGET`): each registered endpoint has its own
/// budget on each CPU, so one workload's flood cannot use up another's events; slot
/// [`EVENT_SLOT_TOTAL`] bounds all of them together.
pub const EVENT_SLOTS: u32 = 8192;
/// Event budget of all workloads together on a CPU.
pub const EVENT_SLOT_TOTAL: u32 = 0;
/// Event budget shared by endpoints registered while every slot of their own is taken.
pub const EVENT_SLOT_SHARED: u32 = 1;
/// First slot given to an endpoint of its own.
pub const EVENT_SLOT_FIRST: u32 = 2;

// ---- policy ------------------------------------------------------------------------------------

/// Exact policy key. For an egress check `src` is the local workload, for ingress `dst` is.
/// Wildcards: the peer side may be [`IDENTITY_ANY`], `proto` may be [`PROTO_ANY`] (then
/// `dport` is [`PORT_ANY`]), `dport` may be [`PORT_ANY`]. For ICMP `dport` holds the type.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PolicyKey {
    pub src_identity: u32,
    pub dst_identity: u32,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
}
const _: () = assert!(core::mem::size_of::<PolicyKey>() == 12);

pub const ACTION_ALLOW: u32 = 1;
pub const ACTION_DENY: u32 = 2;
/// Admin tier only: hand the decision to the tenant tier.
pub const ACTION_PASS: u32 = 3;

/// Value of a policy entry. Its expiry and liveness live in the rule-state slot it names, so
/// one write moves the expiry of every entry and every established flow a rule admitted.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PolicyValue {
    pub cookie: u32,
    pub slot: u32,
    pub action: u32,
    pub pad: u32,
}
const _: () = assert!(core::mem::size_of::<PolicyValue>() == 16);

/// Ranges of rules one range key can hold ([`RangeSet::rules`]).
pub const RANGES_PER_KEY: usize = 8;
/// Disjoint intervals those ranges may split into ([`RangeSet::intervals`]); the programs scan
/// all of them, a power of two.
pub const INTERVALS_PER_KEY: usize = 8;
const _: () = assert!(INTERVALS_PER_KEY.is_power_of_two());

/// Range probe shapes, in probe order: (peer, proto, range), (*, proto, range). A range key is
/// a [`PolicyKey`] with `dport` [`PORT_ANY`] and a specific TCP, UDP or SCTP `proto`.
pub const RANGE_SHAPES: usize = 2;

/// One destination port interval `lo..=hi` of a range set and the rules that decide it: of the
/// live deny rules whose ranges cover it, the one that lives longest, and the same of the
/// allow rules (cookie 0: none). Userspace splits overlapping ranges into disjoint intervals,
/// so a port falls into at most one, and the kernel checks two rule slots per probe: the deny
/// first, then the allow. Picking the longest-lived rule of each kind keeps expiry exact: when
/// the chosen one has expired, so has every other rule of its kind covering the interval.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortInterval {
    pub lo: u16,
    pub hi: u16,
    pub deny_cookie: u32,
    pub deny_slot: u32,
    pub allow_cookie: u32,
    pub allow_slot: u32,
}
const _: () = assert!(core::mem::size_of::<PortInterval>() == 20);

impl PortInterval {
    /// An unused interval: it contains no port.
    pub const UNUSED: Self =
        Self { lo: 1, hi: 0, deny_cookie: 0, deny_slot: 0, allow_cookie: 0, allow_slot: 0 };
}

/// A rule's range as userspace wrote it (the programs never read it): what a restarted
/// enforcer rebuilds its index from and splits again.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RangeRule {
    pub lo: u16,
    pub hi: u16,
    pub cookie: u32,
    pub slot: u32,
    pub action: u32,
}
const _: () = assert!(core::mem::size_of::<RangeRule>() == 16);

/// Value of a range entry: the disjoint port intervals of every rule under one range key,
/// sorted, the first `len` in use (the rest [`PortInterval::UNUSED`]), followed by the rules'
/// ranges themselves. Userspace rewrites a set as a whole (one map update), so a packet sees
/// it before or after a change, never half-way.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RangeSet {
    pub len: u32,
    pub intervals: [PortInterval; INTERVALS_PER_KEY],
    pub rules_len: u32,
    pub rules: [RangeRule; RANGES_PER_KEY],
}
const _: () = assert!(core::mem::size_of::<RangeSet>() == 8 + 20 * INTERVALS_PER_KEY + 16 * RANGES_PER_KEY);

impl Default for RangeSet {
    fn default() -> Self {
        Self {
            len: 0,
            intervals: [PortInterval::UNUSED; INTERVALS_PER_KEY],
            rules_len: 0,
            rules: [RangeRule { lo: 0, hi: 0, cookie: 0, slot: 0, action: 0 }; RANGES_PER_KEY],
        }
    }
}

/// Rule-state flag: the slot holds a live rule or grant.
pub const RULE_F_ACTIVE: u32 = 1;

/// One element of the rule-state array, indexed by slot. `expires_at` is `CLOCK_MONOTONIC`
/// nanoseconds (the clock of `bpf_ktime_get_ns`); 0 means no expiry. The kernel checks it on
/// every packet that relies on the rule, new or established.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct RuleState {
    pub expires_at: u64,
    pub cookie: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<RuleState>() == 16);

impl RuleState {
    /// Whether a rule with `cookie` may still admit traffic at monotonic time `now`.
    #[expect(clippy::inline_always, reason = "called on the packet path of the eBPF programs")]
    #[inline(always)]
    #[must_use]
    pub fn admits(&self, cookie: u32, now: u64) -> bool {
        self.cookie == cookie
            && self.flags & RULE_F_ACTIVE != 0
            && (self.expires_at == 0 || now < self.expires_at)
    }
}

/// Admin-tier key: tenant pair plus an optional protocol/port. Either tenant may be
/// [`TENANT_ANY`] (cluster-wide rules), `proto`/`dport` may be wildcards.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AdminKey {
    pub src_tenant: u32,
    pub dst_tenant: u32,
    pub dport: u16,
    pub proto: u8,
    pub pad: u8,
}
const _: () = assert!(core::mem::size_of::<AdminKey>() == 12);

/// Admin-tier value: ALLOW and DENY are final, PASS hands over to the tenant tier. Among
/// several matching admin rules the lowest `priority` wins.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AdminValue {
    pub cookie: u32,
    pub slot: u32,
    pub action: u32,
    pub priority: u32,
}
const _: () = assert!(core::mem::size_of::<AdminValue>() == 16);

// ---- probe shapes --------------------------------------------------------------------------

/// Policy probe shapes, in probe order. The config map counts entries per shape so the kernel
/// only probes shapes that exist.
pub const POLICY_SHAPES: usize = 6;
/// (peer, proto, port), (peer, proto, *), (peer, *, *), (*, proto, port), (*, proto, *), (*, *, *)
pub const POLICY_SHAPE_PEER: [bool; POLICY_SHAPES] = [true, true, true, false, false, false];
pub const POLICY_SHAPE_PROTO: [bool; POLICY_SHAPES] = [true, true, false, true, true, false];
pub const POLICY_SHAPE_PORT: [bool; POLICY_SHAPES] = [true, false, false, true, false, false];

/// Admin probe shapes: tenant pair (s,d), (s,*), (*,d), (*,*) × ports (proto+port, proto+any
/// port, any). Index = tenant combination × 3 + port kind; probed in index order, so among
/// matches of equal priority the more specific tenant pair, then the more specific port, wins.
pub const ADMIN_SHAPES: usize = 12;

/// Shape index of a policy key (`None` for an invalid combination such as a port without a
/// protocol).
#[must_use]
pub fn policy_shape(peer_any: bool, proto: u8, dport: u16) -> Option<usize> {
    let proto_any = proto == PROTO_ANY;
    let port_any = dport == PORT_ANY;
    match (peer_any, proto_any, port_any) {
        (false, false, false) => Some(0),
        (false, false, true) => Some(1),
        (false, true, true) => Some(2),
        (true, false, false) => Some(3),
        (true, false, true) => Some(4),
        (true, true, true) => Some(5),
        (_, true, false) => None,
    }
}

/// Shape index of an admin key.
#[must_use]
pub fn admin_shape(key: &AdminKey) -> Option<usize> {
    let ports = match (key.proto == PROTO_ANY, key.dport == PORT_ANY) {
        (false, false) => 0,
        (false, true) => 1,
        (true, true) => 2,
        (true, false) => return None,
    };
    let tenants = usize::from(key.src_tenant == TENANT_ANY) * 2 + usize::from(key.dst_tenant == TENANT_ANY);
    Some(tenants * 3 + ports)
}

// ---- config ------------------------------------------------------------------------------------

/// Maximum failsafe {proto, port} pairs.
pub const MAX_FAILSAFE: usize = 8;

/// Failsafe entry: traffic to this port passes in both directions whatever the policy, so an
/// operator cannot lock out their own management plane. Port 0 = unused.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Failsafe {
    pub port: u16,
    pub proto: u8,
    pub pad: u8,
}

/// Global datapath configuration, element 0 of the config array. The shape counters are kept
/// by the map writer: it raises a counter before inserting an entry and lowers it after
/// removing one, so a crash can only leave a counter too high (an extra probe), never too low
/// (a skipped deny).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Config {
    pub policy_shape_count: [u32; POLICY_SHAPES],
    pub admin_shape_count: [u32; ADMIN_SHAPES],
    /// Number of DENY entries in the policy map; while 0 the first ALLOW probe wins.
    pub policy_deny_count: u32,
    pub cidr_count: u32,
    /// Non-zero: emit an event for every new allowed flow.
    pub flow_events: u32,
    pub failsafe_count: u32,
    /// Non-zero: hand packets between two local workloads straight to the destination's
    /// namespace (see [`LINK_F_PEER`]).
    pub local_delivery: u32,
    /// Event rate limit: nanoseconds of budget one event of a workload costs on a CPU (the
    /// inverse of the per-workload, per-CPU rate); 0: no limit at all. See
    /// [`Reason::EventSuppressed`] and [`Endpoint::event_slot`].
    pub event_interval_ns: u32,
    /// Events a workload may emit on a CPU back to back after being idle (at least 1 when
    /// limited).
    pub event_burst: u32,
    /// The same for all workloads together on a CPU (budget slot 0); 0: no total limit.
    pub event_total_interval_ns: u32,
    pub event_total_burst: u32,
    /// Written by userspace on creation: [`ABI_VERSION`] of the maps in this pin directory.
    pub abi_version: u32,
    /// Conntrack generation: every entry records the generation it was created under
    /// ([`CtValue::epoch`]), and an entry of another one is re-judged against current policy
    /// on its next packet (kept, under the rule that now admits it, or removed). Userspace
    /// moves it on every change that can deny what a live rule still admits (a deny added at
    /// either tier, an identity changed or removed, the failsafe list changed) and then
    /// mirrors it into every endpoint ([`Endpoint::ct_epoch`]), which the programs compare.
    pub ct_epoch: u32,
    /// Port ranges (as rules wrote them) per range probe shape ([`RANGE_SHAPES`]); the kernel
    /// probes only shapes that have one.
    pub range_shape_count: [u32; RANGE_SHAPES],
    /// Number of DENY port ranges (as rules wrote them, before the split into intervals);
    /// while 0 a flow an exact or wildcard key allows skips the range probes.
    pub range_deny_count: u32,
    pub failsafe: [Failsafe; MAX_FAILSAFE],
}
const _: () = assert!(
    core::mem::size_of::<Config>()
        == 4 * (POLICY_SHAPES + ADMIN_SHAPES + RANGE_SHAPES + 12) + 4 * MAX_FAILSAFE
);

// ---- conntrack ---------------------------------------------------------------------------------

/// Conntrack key, in the orientation of the packet that opened the flow at this check point.
/// `dir` is the check direction that admitted it, so one map serves both ends of a flow
/// between two local workloads. IPv6 flows are tracked under this key (`ZT_CT6`); IPv4 flows
/// under the 16-byte [`CtKey4`] (`ZT_CT4`), since hashing the key is most of a lookup's cost.
/// Userspace lists both as `CtKey` (IPv4 mapped).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey {
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey>() == 40);

/// IPv4 conntrack key: [`CtKey`] with 4-byte addresses (network-order bytes as a native word,
/// the last word of the mapped form).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtKey4 {
    pub saddr: u32,
    pub daddr: u32,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub dir: u8,
    pub pad: [u8; 2],
}
const _: () = assert!(core::mem::size_of::<CtKey4>() == 16);

impl CtKey4 {
    /// The same flow as a [`CtKey`] with IPv4-mapped addresses.
    #[must_use]
    pub const fn widen(&self) -> CtKey {
        CtKey {
            saddr: [0, 0, V4_MAPPED_WORD, self.saddr],
            daddr: [0, 0, V4_MAPPED_WORD, self.daddr],
            sport: self.sport,
            dport: self.dport,
            proto: self.proto,
            dir: self.dir,
            pad: [0; 2],
        }
    }
}

impl CtKey {
    /// The IPv4 key of this flow, if both addresses are IPv4 mapped.
    #[must_use]
    pub const fn narrow(&self) -> Option<CtKey4> {
        const fn mapped(a: &Addr) -> bool {
            a[0] == 0 && a[1] == 0 && a[2] == V4_MAPPED_WORD
        }
        if mapped(&self.saddr) && mapped(&self.daddr) {
            Some(CtKey4 {
                saddr: self.saddr[3],
                daddr: self.daddr[3],
                sport: self.sport,
                dport: self.dport,
                proto: self.proto,
                dir: self.dir,
                pad: [0; 2],
            })
        } else {
            None
        }
    }
}

/// The flow was admitted while its workload was in audit mode (would have been dropped).
pub const CT_F_AUDIT: u32 = 1;
/// Admitted by a failsafe port: not bound to a rule.
pub const CT_F_FAILSAFE: u32 = 2;
/// A FIN or RST of the flow was seen: userspace GC frees the entry after a short idle time.
pub const CT_F_CLOSING: u32 = 4;
/// The flow's first packet went from one local workload straight to another (local
/// delivery): its later packets may take the same path. A flow that crossed the host's own
/// stack (and with it any NAT there) never carries this flag, so its replies return the same
/// way.
pub const CT_F_LOCAL: u32 = 8;

/// Link flag (`ZT_LINKS`, by interface index): the interface is a veth or netkit device whose
/// peer lives in another network namespace and the ingress-check program is attached to it, so
/// a packet for its workload can be handed to the peer directly (`bpf_redirect_peer`).
pub const LINK_F_PEER: u32 = 1;

/// Idle time after which GC frees the entry of a closing TCP flow.
pub const CT_CLOSING_IDLE_NS: u64 = 10_000_000_000;

/// Conntrack value. `slot`/`cookie` name the rule or grant that admitted the flow; each packet
/// re-checks that rule's state, so expiry and revocation cut established flows.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct CtValue {
    pub created_ns: u64,
    pub last_seen_ns: u64,
    /// Packets seen (wraps at 2^32).
    pub packets: u32,
    /// [`Config::ct_epoch`] when the entry was created or last re-judged.
    pub epoch: u32,
    pub cookie: u32,
    pub slot: u32,
    /// The local workload's identity when the entry was created: an entry only serves the
    /// workload it was created for.
    pub local_identity: u32,
    pub flags: u32,
}
const _: () = assert!(core::mem::size_of::<CtValue>() == 40);

// ---- events and counters -----------------------------------------------------------------------

pub const VERDICT_ALLOW: u8 = 1;
pub const VERDICT_DROP: u8 = 2;
pub const VERDICT_AUDIT: u8 = 3;

/// Ring-buffer event: a drop, an audit (would-be drop that passed) or a new allowed flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Event {
    pub ts_ns: u64,
    pub cookie: u32,
    pub local_identity: u32,
    pub peer_identity: u32,
    pub local_tenant: u32,
    pub peer_tenant: u32,
    pub ifindex: u32,
    pub saddr: Addr,
    pub daddr: Addr,
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub dir: u8,
    pub verdict: u8,
    pub reason: u8,
    /// Padding, zero; three naturally aligned fields so the program clears it with three stores.
    pub pad1: u8,
    pub pad2: u16,
    pub pad4: u32,
}
const _: () = assert!(core::mem::size_of::<Event>() == 80);

/// Key of the per-workload count of suppressed events (`ZT_SUPPRESSED`): whose event, with
/// which verdict and reason, was not emitted over the event rate limit.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SuppressedKey {
    pub identity: u32,
    pub verdict: u8,
    pub reason: u8,
    pub pad: u16,
}
const _: () = assert!(core::mem::size_of::<SuppressedKey>() == 8);

/// Why a packet got its verdict; index into the per-CPU counter array.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// New flow allowed by a tenant-tier rule or grant.
    AllowPolicy = 0,
    /// New flow allowed by an admin-tier rule.
    AllowAdmin = 1,
    /// Packet of an established flow (conntrack hit, rule still valid).
    AllowEstablished = 2,
    /// Reply of an established flow.
    AllowReply = 3,
    /// Failsafe port.
    AllowFailsafe = 4,
    /// ARP, neighbour discovery, MLD: link-layer housekeeping.
    PassLinkLocal = 5,
    /// No rule matched: default deny.
    DropDefault = 6,
    /// Explicit tenant-tier deny.
    DropPolicy = 7,
    /// Admin-tier deny.
    DropAdmin = 8,
    /// Cross-tenant without an admin allow.
    DropCrossTenant = 9,
    /// Malformed or truncated header.
    DropMalformed = 10,
    /// IP fragment (dropped by design, see docs/datapath.md).
    DropFragment = 11,
    /// Source (egress) or destination (ingress) address is not the workload's.
    DropSpoofed = 12,
    /// Program attached where no endpoint is registered (fail closed).
    DropNoEndpoint = 13,
    /// Neither IPv4, IPv6 nor ARP.
    DropNonIp = 14,
    /// Would have been dropped; workload is in audit mode.
    Audit = 15,
    /// Established flow whose rule expired or was revoked (then re-evaluated).
    CtInvalidated = 16,
    /// Conntrack insert failed (map full); the packet itself was still allowed.
    CtFull = 17,
    /// Ring-buffer reservation failed: an event was lost.
    EventLost = 18,
    /// Not a verdict: a packet between two local workloads passed both checks in one program
    /// run and went straight to the destination's namespace.
    LocalDelivery = 19,
    /// Not a verdict: an event was not emitted because its CPU was over the event rate limit
    /// (the packet itself was judged and counted as usual).
    EventSuppressed = 20,
    /// Not a verdict: the local delivery program found the sender's hand-over slot holding
    /// another packet and parsed this one again (never expected; a non-zero count is a bug).
    HandoffReparsed = 21,
    /// An ICMP or `ICMPv6` error about a tracked flow of the workload (destination unreachable,
    /// packet too big, time exceeded, parameter problem), passed as related to that flow.
    AllowRelated = 22,
}

pub const REASON_COUNT: u32 = 23;

impl Reason {
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::AllowPolicy,
        Reason::AllowAdmin,
        Reason::AllowEstablished,
        Reason::AllowReply,
        Reason::AllowFailsafe,
        Reason::PassLinkLocal,
        Reason::DropDefault,
        Reason::DropPolicy,
        Reason::DropAdmin,
        Reason::DropCrossTenant,
        Reason::DropMalformed,
        Reason::DropFragment,
        Reason::DropSpoofed,
        Reason::DropNoEndpoint,
        Reason::DropNonIp,
        Reason::Audit,
        Reason::CtInvalidated,
        Reason::CtFull,
        Reason::EventLost,
        Reason::LocalDelivery,
        Reason::EventSuppressed,
        Reason::HandoffReparsed,
        Reason::AllowRelated,
    ];

    #[must_use]
    pub fn from_u8(v: u8) -> Option<Reason> {
        Self::ALL.get(usize::from(v)).copied()
    }

    /// Stable `snake_case` name used in metrics and logs.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Reason::AllowPolicy => "allow_policy",
            Reason::AllowAdmin => "allow_admin",
            Reason::AllowEstablished => "allow_established",
            Reason::AllowReply => "allow_reply",
            Reason::AllowFailsafe => "allow_failsafe",
            Reason::PassLinkLocal => "pass_link_local",
            Reason::DropDefault => "drop_default",
            Reason::DropPolicy => "drop_policy",
            Reason::DropAdmin => "drop_admin",
            Reason::DropCrossTenant => "drop_cross_tenant",
            Reason::DropMalformed => "drop_malformed",
            Reason::DropFragment => "drop_fragment",
            Reason::DropSpoofed => "drop_spoofed",
            Reason::DropNoEndpoint => "drop_no_endpoint",
            Reason::DropNonIp => "drop_non_ip",
            Reason::Audit => "audit",
            Reason::CtInvalidated => "ct_invalidated",
            Reason::CtFull => "ct_full",
            Reason::EventLost => "event_lost",
            Reason::LocalDelivery => "local_delivery",
            Reason::EventSuppressed => "event_suppressed",
            Reason::HandoffReparsed => "handoff_reparsed",
            Reason::AllowRelated => "allow_related",
        }
    }
}

// ---- map names (pinned files under the pin directory) -------------------------------------

pub mod map_names {
    pub const IDENTITY: &str = "ZT_IDENTITY";
    pub const CIDR: &str = "ZT_CIDR";
    pub const ENDPOINTS: &str = "ZT_ENDPOINTS";
    pub const ENDPOINTS_HASH: &str = "ZT_ENDPOINTS_HASH";
    pub const CGROUPS: &str = "ZT_CGROUPS";
    pub const POLICY: &str = "ZT_POLICY";
    /// Port ranges ([`super::RangeSet`] per range key).
    pub const RANGES: &str = "ZT_RANGES";
    pub const ADMIN: &str = "ZT_ADMIN";
    pub const RULES: &str = "ZT_RULES";
    pub const CONFIG: &str = "ZT_CONFIG";
    /// IPv4 conntrack ([`super::CtKey4`] keys).
    pub const CONNTRACK4: &str = "ZT_CT4";
    /// IPv6 conntrack ([`super::CtKey`] keys).
    pub const CONNTRACK6: &str = "ZT_CT6";
    pub const EVENTS: &str = "ZT_EVENTS";
    pub const COUNTERS: &str = "ZT_COUNTERS";
    /// Per-CPU event rate limiter state (kernel only).
    pub const EVENT_BUDGET: &str = "ZT_EVENT_BUDGET";
    /// Per-CPU hash: suppressed events by workload, verdict and reason.
    pub const SUPPRESSED: &str = "ZT_SUPPRESSED";
    /// Interface index → link flags ([`super::LINK_F_PEER`]).
    pub const LINKS: &str = "ZT_LINKS";
    /// Program array: slot 0 holds the local delivery program.
    pub const DELIVER: &str = "ZT_DELIVER";
    /// Program array: slot 0 the egress, slot 1 the ingress check of ICMP errors.
    pub const RELATED: &str = "ZT_RELATED";
    /// Program arrays (one slot) of the `cgroup_skb` checks of ICMP errors, per direction.
    pub const RELATED_CG_EGRESS: &str = "ZT_RELATED_CG_EGRESS";
    pub const RELATED_CG_INGRESS: &str = "ZT_RELATED_CG_INGRESS";
    /// Per-CPU hand-over of a parsed packet from the sender's check to the local delivery
    /// program (kernel only; pinned so programs of two loads of one build can hand over).
    pub const HANDOFF: &str = "ZT_HANDOFF";
}

pub mod program_names {
    /// TC program for packets leaving a workload (host-side veth ingress): egress check.
    pub const TC_FROM_WORKLOAD: &str = "zt_tc_from_wl";
    /// TC program for packets entering a workload (host-side veth egress): ingress check.
    pub const TC_TO_WORKLOAD: &str = "zt_tc_to_wl";
    /// Local delivery: tail-called from `zt_tc_from_wl`, never attached.
    pub const TC_DELIVER: &str = "zt_tc_deliver";
    /// ICMP errors leaving a workload: tail-called from `zt_tc_from_wl`, never attached.
    pub const TC_RELATED_FROM: &str = "zt_tc_related_from";
    /// ICMP errors entering a workload: tail-called from `zt_tc_to_wl`, never attached.
    pub const TC_RELATED_TO: &str = "zt_tc_related_to";
    /// The same for cgroup-scoped workloads, tail-called from `zt_cg_egress` / `zt_cg_ingress`.
    pub const CGROUP_RELATED_EGRESS: &str = "zt_cg_related_egress";
    pub const CGROUP_RELATED_INGRESS: &str = "zt_cg_related_ingress";
    pub const CGROUP_SKB_INGRESS: &str = "zt_cg_ingress";
    pub const CGROUP_SKB_EGRESS: &str = "zt_cg_egress";
    pub const CONNECT4: &str = "zt_connect4";
    pub const CONNECT6: &str = "zt_connect6";
    pub const SENDMSG4: &str = "zt_sendmsg4";
    pub const SENDMSG6: &str = "zt_sendmsg6";
    /// Empty classifier used as the benchmark floor; never attached.
    pub const FLOOR: &str = "zt_floor";
}

#[cfg(feature = "user")]
mod pod {
    use super::{
        AdminKey, AdminValue, CidrAddr, Config, CtKey, CtKey4, CtValue, Endpoint, Event, IdentityInfo,
        PolicyKey, PolicyValue, RangeSet, RuleState, SuppressedKey,
    };
    // SAFETY: every type is repr(C), Copy, has explicit padding and no invalid bit patterns.
    unsafe impl aya::Pod for IdentityInfo {}
    unsafe impl aya::Pod for CidrAddr {}
    unsafe impl aya::Pod for Endpoint {}
    unsafe impl aya::Pod for PolicyKey {}
    unsafe impl aya::Pod for PolicyValue {}
    unsafe impl aya::Pod for RangeSet {}
    unsafe impl aya::Pod for RuleState {}
    unsafe impl aya::Pod for AdminKey {}
    unsafe impl aya::Pod for AdminValue {}
    unsafe impl aya::Pod for Config {}
    unsafe impl aya::Pod for CtKey {}
    unsafe impl aya::Pod for CtKey4 {}
    unsafe impl aya::Pod for CtValue {}
    unsafe impl aya::Pod for Event {}
    unsafe impl aya::Pod for SuppressedKey {}
}
