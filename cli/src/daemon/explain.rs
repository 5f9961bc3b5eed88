//! `Explain`: the data plane's decision for a new flow at every local check point of it, as
//! the operator reads it (workload names, rule owners, each probe of the maps).

use std::collections::BTreeMap;

use enforcer::writer::explain::{Bypass, Explanation, PeerSource, Probe, Query, RuleStatus};
use enforcer_common::{
    ACTION_ALLOW, ACTION_DENY, ACTION_PASS, DIR_EGRESS, DIR_INGRESS, IPPROTO_ICMP, IPPROTO_ICMPV6,
    IPPROTO_SCTP, IPPROTO_TCP, IPPROTO_UDP, Reason, icmp_port,
};
use tonic::Status;
use ztseg_api::enforcer::{CheckExplanation, ExplainRequest, ExplainResponse};

use super::engine::Engine;

/// Protocol number and policy port of a request.
fn proto_port(protocol: &str, port: u32, v6: bool) -> Result<(u8, u16), Status> {
    let proto = match protocol.to_ascii_uppercase().as_str() {
        "TCP" => IPPROTO_TCP,
        "UDP" => IPPROTO_UDP,
        "SCTP" => IPPROTO_SCTP,
        "ICMP" if !v6 => IPPROTO_ICMP,
        "ICMPV6" if v6 => IPPROTO_ICMPV6,
        "ICMP" | "ICMPV6" => {
            return Err(Status::invalid_argument(format!(
                "protocol {protocol}: use ICMP with IPv4 addresses, ICMPv6 with IPv6 ones"
            )));
        }
        other => {
            return Err(Status::invalid_argument(format!(
                "protocol {other:?}: expected TCP, UDP, SCTP, ICMP or ICMPv6"
            )));
        }
    };
    if proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6 {
        let ty = u8::try_from(port)
            .map_err(|_| Status::invalid_argument(format!("ICMP type {port}: must be 0-255")))?;
        return Ok((proto, icmp_port(ty)));
    }
    let port = u16::try_from(port)
        .ok()
        .filter(|p| *p != 0)
        .ok_or_else(|| Status::invalid_argument(format!("port {port}: must be 1-65535")))?;
    Ok((proto, port))
}

/// Explain `r` at every check point of its local ends; `owners` names rules by cookie.
pub fn explain(
    e: &Engine,
    r: &ExplainRequest,
    owners: &BTreeMap<u32, String>,
) -> Result<ExplainResponse, Status> {
    let addr = |what: &str, who: &str| {
        e.address_of(who).map_err(|err| Status::invalid_argument(format!("{what}: {err:#}")))
    };
    let (src, dst) = (addr("src", &r.src)?, addr("dst", &r.dst)?);
    if src.is_ipv4() != dst.is_ipv4() {
        return Err(Status::invalid_argument(format!("{src} and {dst} are of different address families")));
    }
    let (proto, port) = proto_port(&r.protocol, r.port, src.is_ipv6())?;
    let mut checks = Vec::new();
    for (dir, local, peer) in [(DIR_EGRESS, src, dst), (DIR_INGRESS, dst, src)] {
        let points = e.check_points(local).map_err(|err| Status::internal(format!("{err:#}")))?;
        for (name, at) in points {
            let q = Query { at, dir, peer, proto, port };
            let x = e.dp.writer().explain(&q).map_err(|err| Status::internal(format!("{err:#}")))?;
            checks.push(render(e, &name, &q, &x, owners));
        }
    }
    if checks.is_empty() {
        return Err(Status::not_found(format!(
            "neither {src} nor {dst} belongs to a workload on node {}",
            e.cfg.node
        )));
    }
    Ok(ExplainResponse { checks })
}

fn action(a: u32) -> &'static str {
    match a {
        ACTION_ALLOW => "ALLOW",
        ACTION_DENY => "DENY",
        ACTION_PASS => "PASS",
        _ => "?",
    }
}

fn probe_line(e: &Engine, tier: &str, p: &Probe, owners: &BTreeMap<u32, String>) -> String {
    let key = p.key.text(|id| e.workload_name(id).unwrap_or_else(|| id.to_string()));
    match p.hit {
        None => format!("{tier} {key}: no entry"),
        Some(h) => {
            let status = match h.status {
                RuleStatus::Live => "live",
                RuleStatus::Expired => "expired, admits nothing",
                RuleStatus::Inactive => "revoked, admits nothing",
            };
            let owner = owners.get(&h.cookie).map_or("unowned", String::as_str);
            let prio = if tier == "admin" { format!(" priority {}", h.priority) } else { String::new() };
            format!("{tier} {key}: {}{prio} by {owner} (cookie {}), {status}", action(h.action), h.cookie)
        }
    }
}

fn render(
    e: &Engine,
    name: &str,
    q: &Query,
    x: &Explanation,
    owners: &BTreeMap<u32, String>,
) -> CheckExplanation {
    let who = |id: u32| e.workload_name(id).unwrap_or_else(|| format!("identity {id}"));
    let mut steps = Vec::new();
    if let Some((id, tenant)) = x.local {
        steps.push(format!("local workload {name}: identity {id}, tenant {tenant}"));
    } else {
        steps.push(format!("no workload registered at {name}'s check point: everything there is dropped"));
    }
    let source = match x.peer_source {
        PeerSource::Exact => "exact address map",
        PeerSource::Cidr => "CIDR map",
        PeerSource::World => "no entry: world",
    };
    steps.push(format!(
        "peer {}: {} (identity {}, tenant {}) from the {source}",
        q.peer,
        who(x.peer.identity),
        x.peer.identity,
        x.peer.tenant
    ));
    match x.bypass {
        Some(Bypass::LinkLocal) => {
            steps.push("ICMPv6 neighbour discovery or MLD: passes without policy".into());
        }
        Some(Bypass::Failsafe) => steps.push("a failsafe port: passes without policy".into()),
        None => {}
    }
    steps.extend(x.admin.iter().map(|p| probe_line(e, "admin", p, owners)));
    if x.cross_tenant {
        steps.push("cross-tenant: denied unless an admin rule allows or passes the tenant pair".into());
    }
    steps.extend(x.tenant.iter().map(|p| probe_line(e, "policy", p, owners)));
    let why = match x.reason {
        Reason::AllowPolicy => "a live policy rule allows it and none denies it",
        Reason::AllowAdmin => "the highest-priority live admin rule allows it",
        Reason::AllowFailsafe => "failsafe port",
        Reason::PassLinkLocal => "link-local housekeeping",
        Reason::DropDefault => "no live rule allows it (default deny)",
        Reason::DropPolicy => "a live policy rule denies it (deny beats allow)",
        Reason::DropAdmin => "the highest-priority live admin rule denies it",
        Reason::DropCrossTenant => "tenant isolation",
        Reason::Audit => "would be dropped; the workload is in audit mode, so it passes and is reported",
        Reason::DropNoEndpoint => "no workload registered (fail closed)",
        _ => "",
    };
    let verdict = match (x.pass, x.reason) {
        (true, Reason::Audit) => "AUDIT",
        (true, _) => "ALLOW",
        (false, _) => "DROP",
    };
    steps.push(format!("verdict {verdict} ({}): {why}", x.reason.name()));
    CheckExplanation {
        workload: name.to_owned(),
        direction: if q.dir == DIR_EGRESS { "egress" } else { "ingress" }.into(),
        peer: q.peer.to_string(),
        peer_identity: x.peer.identity,
        peer_tenant: x.peer.tenant,
        peer_source: match x.peer_source {
            PeerSource::Exact => "exact",
            PeerSource::Cidr => "cidr",
            PeerSource::World => "world",
        }
        .into(),
        verdict: verdict.into(),
        reason: x.reason.name().into(),
        cookie: x.cookie,
        owner: if x.cookie == 0 { String::new() } else { owners.get(&x.cookie).cloned().unwrap_or_default() },
        steps,
    }
}

/// Used by the unit tests of the protocol parsing.
#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn protocols_and_ports_are_checked() {
        assert_eq!(proto_port("tcp", 80, false).unwrap(), (IPPROTO_TCP, 80));
        assert_eq!(proto_port("ICMP", 8, false).unwrap(), (IPPROTO_ICMP, icmp_port(8)));
        assert_eq!(proto_port("icmpv6", 128, true).unwrap(), (IPPROTO_ICMPV6, icmp_port(128)));
        for (p, port, v6, msg) in [
            ("tcp", 0, false, "port 0"),
            ("udp", 70_000, false, "port 70000"),
            ("icmp", 300, false, "ICMP type 300"),
            ("icmp", 8, true, "ICMPv6 with IPv6"),
            ("gre", 1, false, "expected TCP"),
        ] {
            let e = proto_port(p, port, v6).unwrap_err();
            assert!(e.message().contains(msg), "{p} {port}: {}", e.message());
        }
    }
}
