//! Header parsing for TC (from L2) and cgroup_skb (from L3) programs.
//!
//! TC programs read headers with direct packet access (bounds-checked against `data_end`, with
//! `bpf_skb_load_bytes` as the fallback for headers outside the linear area); cgroup_skb
//! programs use `bpf_skb_load_bytes` throughout. Either way a truncated header is an error
//! here, never an out-of-bounds read. Every failure is a reason the caller counts and drops on.

use core::mem::MaybeUninit;

use aya_ebpf::programs::sk_buff::SkBuff;
use enforcer_common::{
    Addr, IPPROTO_ICMP, IPPROTO_ICMPV6, IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, V4_MAPPED_WORD,
};

pub const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_ARP: u16 = 0x0806;

const TCP_FIN: u8 = 0x01;
const TCP_SYN: u8 = 0x02;
const TCP_RST: u8 = 0x04;
const TCP_ACK: u8 = 0x10;

/// IPv6 extension headers walked before giving up (the packet is then malformed).
const MAX_EXT_HEADERS: usize = 6;

/// A parsed flow. Addresses are IPv4 mapped. `policy_port` is what policy matches: the
/// destination port, or `ICMP_PORT_BASE | type` for ICMP/ICMPv6. The conntrack ports (the echo
/// identifier for ICMP echo) and the protocol are held as the 32-bit words of a conntrack key,
/// so the first 40 bytes of a flow are its IPv6 conntrack key ([`Flow::key6`]) once the program
/// has set the check direction ([`Flow::set_dir`]).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Flow {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Source port | destination port << 16.
    pub ports: u32,
    /// Protocol | check direction << 8; the upper half is zero.
    pub proto_dir: u32,
    pub policy_port: u16,
    pub family: u8,
    /// Neighbour discovery or MLD with the hop limit that proves it was not routed (255 for
    /// neighbour discovery, 1 for MLD; RFC 4861, RFC 3810). Passes without policy only if the
    /// program also finds its addresses link-scoped (see `housekeeping` in main.rs).
    pub link_local: bool,
    /// TCP with SYN set and ACK clear: the first packet of a connection.
    pub syn_only: bool,
    /// TCP with SYN and ACK: the answer to a connection's first packet (a reply).
    pub syn_ack: bool,
    /// TCP with FIN or RST: the connection is closing.
    pub closing: bool,
    /// TCP with RST: the connection is over once this packet is through.
    pub reset: bool,
    /// ICMP other than echo: no connection state is looked up or created (an allowed error
    /// or informational message opens nothing); policy judges every such packet.
    pub untracked: bool,
    /// ICMP echo reply: it can only answer a tracked echo request, never open state itself.
    pub answer: bool,
    /// Set by the caller, not the parser: this check is where local delivery is decided, so
    /// a conntrack entry it creates for a flow to or from a workload of this host is created
    /// marked for it (`CT_F_LOCAL`) while local delivery is on.
    pub deliver: bool,
    /// Set by the caller, not the parser: the packet's source is a workload of this host
    /// whose address its own egress check verified, so its RST ends the flow here too.
    pub source_verified: bool,
}

const _: () =
    assert!(core::mem::offset_of!(Flow, ports) == 32 && core::mem::offset_of!(Flow, proto_dir) == 36);
const _: () = assert!(core::mem::size_of::<enforcer_common::CtKey>() == 40);

impl Flow {
    #[inline(always)]
    pub fn sport(&self) -> u16 {
        self.ports as u16
    }
    #[inline(always)]
    pub fn dport(&self) -> u16 {
        (self.ports >> 16) as u16
    }
    #[inline(always)]
    pub fn proto(&self) -> u8 {
        self.proto_dir as u8
    }
    /// Record the direction the flow is checked in (part of its conntrack key), with one
    /// 32-bit store: the key is read by the map hash in 32-bit words.
    #[inline(always)]
    pub fn set_dir(&mut self, dir: u8) {
        self.proto_dir = (self.proto_dir & 0xff) | (u32::from(dir) << 8);
    }
    /// The IPv6 conntrack key of this flow, in place (after [`Flow::set_dir`]).
    #[inline(always)]
    pub fn key6(&self) -> &enforcer_common::CtKey {
        // SAFETY: Flow is repr(C) and starts with saddr, daddr and the two key words, exactly
        // CtKey's layout on a little-endian target (sport, dport; proto, dir, zero padding);
        // its alignment (4) satisfies CtKey's; every bit pattern is a valid CtKey.
        unsafe { &*core::ptr::from_ref(self).cast::<enforcer_common::CtKey>() }
    }
}

pub enum ParseError {
    Arp,
    NonIp,
    Malformed,
    Fragment,
}

/// Header access for the parser.
pub trait Packet {
    fn load<T: Copy>(&self, off: usize) -> Result<T, ParseError>;
    fn len(&self) -> usize;
}

/// Direct packet access over the linear area, falling back to `bpf_skb_load_bytes`.
pub struct Direct<'a> {
    skb: &'a SkBuff,
    data: usize,
    end: usize,
    len: usize,
}

impl<'a> Direct<'a> {
    #[inline(always)]
    pub fn new(skb: &'a SkBuff) -> Self {
        // SAFETY: reading fields of the program's own context; the verifier turns them into
        // packet pointers.
        let (data, end) = unsafe { ((*skb.skb).data as usize, (*skb.skb).data_end as usize) };
        Self { skb, data, end, len: skb.len() as usize }
    }
}

impl Packet for Direct<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ParseError> {
        let start = self.data + off;
        if start + core::mem::size_of::<T>() > self.end {
            return self.skb.load::<T>(off).map_err(|_| ParseError::Malformed);
        }
        // SAFETY: bounds checked against data_end just above. Header types are word-aligned
        // so the load is a few word loads; packet data need not be aligned for BPF on the
        // architectures the verifier allows it on (x86-64, arm64: efficient unaligned access).
        Ok(unsafe { core::ptr::read(start as *const T) })
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.len
    }
}

/// Every read through `bpf_skb_load_bytes` (cgroup_skb).
pub struct Loaded<'a>(pub &'a SkBuff);

impl Packet for Loaded<'_> {
    #[inline(always)]
    fn load<T: Copy>(&self, off: usize) -> Result<T, ParseError> {
        self.0.load::<T>(off).map_err(|_| ParseError::Malformed)
    }
    #[inline(always)]
    fn len(&self) -> usize {
        self.0.len() as usize
    }
}

/// Parse a frame seen by a TC program (Ethernet first) into `out`, which is initialised
/// exactly when `Ok` is returned. Not inlined: its header buffers live in their own stack
/// frame, released before the verdict runs. The flow is written field by field once parsed
/// (zero-filling the whole struct first lowers to a byte loop in BPF, and a BPF function
/// cannot return a struct through a pointer into its own frame).
#[inline(never)]
pub fn parse_l2<P: Packet>(skb: &P, out: &mut MaybeUninit<Flow>) -> Result<(), ParseError> {
    let proto = u16::from_be(skb.load::<u16>(12)?);
    let flow = match proto {
        ETH_P_IP => parse_ipv4(skb, ETH_HLEN),
        ETH_P_IPV6 => parse_ipv6(skb, ETH_HLEN),
        ETH_P_ARP => Err(ParseError::Arp),
        _ => Err(ParseError::NonIp),
    }?;
    out.write(flow);
    Ok(())
}

/// Parse a packet seen by a cgroup_skb program (network header first); `out` as for
/// [`parse_l2`].
#[inline(never)]
pub fn parse_l3<P: Packet>(skb: &P, out: &mut MaybeUninit<Flow>) -> Result<(), ParseError> {
    let first = skb.load::<u8>(0)?;
    let flow = match first >> 4 {
        4 => parse_ipv4(skb, 0),
        6 => parse_ipv6(skb, 0),
        _ => Err(ParseError::Malformed),
    }?;
    out.write(flow);
    Ok(())
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv4Hdr {
    ver_ihl: u8,
    tos: u8,
    tot_len: u16,
    id: u16,
    frag_off: u16,
    ttl: u8,
    proto: u8,
    csum: u16,
    saddr: u32,
    daddr: u32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct Ipv6Hdr {
    ver_tc_flow: u32,
    payload_len: u16,
    next_hdr: u8,
    hop_limit: u8,
    saddr: Addr,
    daddr: Addr,
}

#[inline(always)]
pub fn mapped(a: u32) -> Addr {
    [0, 0, V4_MAPPED_WORD, a]
}

/// First eight bytes of TCP, UDP and SCTP headers.
#[repr(C)]
#[derive(Clone, Copy)]
struct Ports {
    sport: u16,
    dport: u16,
    /// UDP length (network order); other protocols: part of a sequence number or tag.
    len: u16,
    rest: u16,
}

/// First eight bytes of an ICMP/ICMPv6 header.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpHead {
    ty: u8,
    code: u8,
    csum: u16,
    id: u16,
    seq: u16,
}

#[inline(always)]
fn parse_ipv4<P: Packet>(skb: &P, off: usize) -> Result<Flow, ParseError> {
    let ip = skb.load::<Ipv4Hdr>(off)?;
    let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
    let tot_len = usize::from(u16::from_be(ip.tot_len));
    // tot_len 0 is legal for BIG TCP super-packets; otherwise the header must fit inside it
    // and the datagram inside the buffer.
    if ip.ver_ihl >> 4 != 4 || ihl < 20 || (tot_len != 0 && (tot_len < ihl || off + tot_len > skb.len())) {
        return Err(ParseError::Malformed);
    }
    // More-fragments flag or a non-zero offset.
    if u16::from_be(ip.frag_off) & 0x3fff != 0 {
        return Err(ParseError::Fragment);
    }
    parse_l4(skb, off + ihl, mapped(ip.saddr), mapped(ip.daddr), ip.proto, 4, 0)
}

#[inline(always)]
fn parse_ipv6<P: Packet>(skb: &P, off: usize) -> Result<Flow, ParseError> {
    let ip = skb.load::<Ipv6Hdr>(off)?;
    let payload = usize::from(u16::from_be(ip.payload_len));
    if (u32::from_be(ip.ver_tc_flow) >> 28) != 6 || (payload != 0 && off + 40 + payload > skb.len()) {
        return Err(ParseError::Malformed);
    }
    let (l4, next) = walk_extensions(skb, off + 40, ip.next_hdr)?;
    parse_l4(skb, l4, ip.saddr, ip.daddr, next, 6, ip.hop_limit)
}

/// Walk the IPv6 extension headers starting at `off` with next header `next`: the offset and
/// protocol of the upper-layer header.
#[inline(always)]
fn walk_extensions<P: Packet>(skb: &P, off: usize, next: u8) -> Result<(usize, u8), ParseError> {
    let mut next = next;
    let mut l4 = off;
    let mut done = false;
    // One more round than headers allowed: the last can only find the upper-layer header.
    for _ in 0..=MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: (len + 1) * 8 bytes.
            0 | 43 | 60 => {
                let h = skb.load::<[u8; 2]>(l4)?;
                next = h[0];
                l4 += (usize::from(h[1]) + 1) * 8;
            }
            // Authentication header: (len + 2) * 4 bytes.
            51 => {
                let h = skb.load::<[u8; 2]>(l4)?;
                next = h[0];
                l4 += (usize::from(h[1]) + 2) * 4;
            }
            44 => return Err(ParseError::Fragment),
            _ => {
                done = true;
                break;
            }
        }
    }
    if !done {
        return Err(ParseError::Malformed);
    }
    Ok((l4, next))
}

/// The packet an ICMP or ICMPv6 error quotes (RFC 792, RFC 4443: the invoking packet's IP
/// header and the start of its payload), in the word layout of an IPv6 conntrack key: the
/// flow in the quoted packet's own orientation, the direction left zero.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Quoted {
    pub saddr: Addr,
    pub daddr: Addr,
    /// Source port | destination port << 16 (an echo request's identifier as the source
    /// port, an echo reply's as the destination port, as the parser keys them).
    pub ports: u32,
    pub proto: u32,
}

/// Parse the packet quoted by the ICMP error in `skb`, whose network header starts at `l3`
/// ([`ETH_HLEN`] for a TC program, 0 for `cgroup_skb`; address family `family`, already parsed
/// as an error) into `out`, initialised exactly when `Ok` is returned. Only what conntrack can know is accepted: TCP, UDP or SCTP ports, or an
/// echo request or reply, of a quoted IPv4 packet that is not a later fragment, or of a quoted
/// IPv6 packet without extension headers.
#[inline(never)]
pub fn quoted<P: Packet>(
    skb: &P,
    l3: usize,
    family: u8,
    out: &mut MaybeUninit<Quoted>,
) -> Result<(), ParseError> {
    let (saddr, daddr, proto, l4) = if family == 4 {
        let outer = skb.load::<Ipv4Hdr>(l3)?;
        let inner = l3 + usize::from(outer.ver_ihl & 0x0f) * 4 + 8;
        let ip = skb.load::<Ipv4Hdr>(inner)?;
        let ihl = usize::from(ip.ver_ihl & 0x0f) * 4;
        if ip.ver_ihl >> 4 != 4 || ihl < 20 || u16::from_be(ip.frag_off) & 0x1fff != 0 {
            return Err(ParseError::Malformed);
        }
        (mapped(ip.saddr), mapped(ip.daddr), ip.proto, inner + ihl)
    } else {
        let outer = skb.load::<Ipv6Hdr>(l3)?;
        let (icmp, _) = walk_extensions(skb, l3 + 40, outer.next_hdr)?;
        let ip = skb.load::<Ipv6Hdr>(icmp + 8)?;
        if (u32::from_be(ip.ver_tc_flow) >> 28) != 6 {
            return Err(ParseError::Malformed);
        }
        (ip.saddr, ip.daddr, ip.next_hdr, icmp + 8 + 40)
    };
    let ports = match proto {
        IPPROTO_TCP | IPPROTO_UDP | IPPROTO_SCTP => {
            let p = skb.load::<[u16; 2]>(l4)?;
            u32::from(u16::from_be(p[0])) | (u32::from(u16::from_be(p[1])) << 16)
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h = skb.load::<IcmpHead>(l4)?;
            let id = u32::from(u16::from_be(h.id));
            let (request, reply) = if proto == IPPROTO_ICMPV6 { (128, 129) } else { (8, 0) };
            if h.ty == request {
                id
            } else if h.ty == reply {
                id << 16
            } else {
                return Err(ParseError::Malformed);
            }
        }
        _ => return Err(ParseError::Malformed),
    };
    out.write(Quoted { saddr, daddr, ports, proto: u32::from(proto) });
    Ok(())
}

/// Whether a parsed flow is an ICMP error over IPv4 or an ICMPv6 error over IPv6 (destination
/// unreachable, time exceeded, parameter problem; for ICMPv6 also packet too big), which quotes
/// the packet it is about. (Either protocol over the other IP version is just a protocol
/// number: policy judges it.)
#[inline(always)]
pub fn icmp_error(flow: &Flow) -> bool {
    let ty = flow.policy_port & 0xff;
    match flow.proto() {
        IPPROTO_ICMP => flow.family == 4 && matches!(ty, 3 | 11 | 12),
        IPPROTO_ICMPV6 => flow.family == 6 && matches!(ty, 1..=4),
        _ => false,
    }
}

/// Policy port of an ICMP/ICMPv6 type (see `enforcer_common::icmp_port`).
#[inline(always)]
fn icmp_policy_port(ty: u8) -> u16 {
    enforcer_common::ICMP_PORT_BASE | u16::from(ty)
}

#[inline(always)]
fn parse_l4<P: Packet>(
    skb: &P,
    off: usize,
    saddr: Addr,
    daddr: Addr,
    proto: u8,
    family: u8,
    hop_limit: u8,
) -> Result<Flow, ParseError> {
    let len = skb.len();
    let (mut sport, mut dport, mut policy_port) = (0u16, 0u16, 0u16);
    let (mut link_local, mut syn_only, mut syn_ack, mut closing, mut reset) =
        (false, false, false, false, false);
    let (mut untracked, mut answer) = (false, false);
    match proto {
        IPPROTO_TCP => {
            let h = skb.load::<Ports>(off)?;
            // Data offset and flags bytes.
            let [doff, flags] = skb.load::<[u8; 2]>(off + 12)?;
            let doff = usize::from(doff >> 4) * 4;
            if doff < 20 || off + doff > len {
                return Err(ParseError::Malformed);
            }
            (sport, dport, policy_port) = ports(&h);
            syn_only = flags & (TCP_SYN | TCP_ACK) == TCP_SYN;
            syn_ack = flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
            closing = flags & (TCP_FIN | TCP_RST) != 0;
            reset = flags & TCP_RST != 0;
        }
        IPPROTO_UDP => {
            let h = skb.load::<Ports>(off)?;
            let ulen = usize::from(u16::from_be(h.len));
            // UDP length 0 is the jumbogram case; otherwise header fits and data is present.
            if ulen != 0 && (ulen < 8 || off + ulen > len) {
                return Err(ParseError::Malformed);
            }
            (sport, dport, policy_port) = ports(&h);
        }
        IPPROTO_SCTP => {
            // Common header: ports, verification tag, checksum.
            let h = skb.load::<Ports>(off)?;
            if off + 12 > len {
                return Err(ParseError::Malformed);
            }
            (sport, dport, policy_port) = ports(&h);
        }
        IPPROTO_ICMP | IPPROTO_ICMPV6 => {
            let h = skb.load::<IcmpHead>(off)?;
            let id = u16::from_be(h.id);
            policy_port = icmp_policy_port(h.ty);
            let v6 = proto == IPPROTO_ICMPV6;
            let (request, reply) = if v6 { (128, 129) } else { (8, 0) };
            if h.ty == request {
                sport = id;
            } else if h.ty == reply {
                dport = id;
                answer = true;
            } else {
                untracked = true;
                // MLD (130-132, 143) is sent with hop limit 1 and neighbour discovery
                // (133-137) with 255: a packet that was routed has a lower one.
                link_local = v6
                    && match h.ty {
                        130..=132 | 143 => hop_limit == 1,
                        133..=137 => hop_limit == 255,
                        _ => false,
                    };
            }
        }
        _ => {}
    }
    Ok(Flow {
        saddr,
        daddr,
        ports: u32::from(sport) | (u32::from(dport) << 16),
        proto_dir: u32::from(proto),
        policy_port,
        family,
        link_local,
        syn_only,
        syn_ack,
        closing,
        reset,
        untracked,
        answer,
        deliver: false,
        source_verified: false,
    })
}

/// Source port, destination port and policy port (the destination port) of a ports header.
#[inline(always)]
fn ports(h: &Ports) -> (u16, u16, u16) {
    let dport = u16::from_be(h.dport);
    (u16::from_be(h.sport), dport, dport)
}
