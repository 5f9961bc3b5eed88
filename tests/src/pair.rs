//! Two pods, A (`10.77.0.1`, `fd77::1`) and B (`10.77.0.2`, `fd77::2`), on one simulated host,
//! with both TC programs attached to each host-side interface and TCP echo servers on B's ports
//! 8080 and 8081 (IPv4 and IPv6): the common ground of the real-traffic tests.

use std::time::Duration;

use enforcer::{Rule, TcHook, Workload, writer::Action};
use enforcer_common::{DIR_EGRESS, DIR_INGRESS};

use crate::{TestDatapath, netns::Lab, traffic::tcp_echo};

#[derive(Debug)]
pub struct Pair {
    pub lab: Lab,
    pub dp: TestDatapath,
    /// Host-side interface index of A and of B.
    pub ifindex: [u32; 2],
    /// Identity of A and of B.
    pub identity: [u32; 2],
}

impl Pair {
    /// `pods`: (identity, tenant) of A and of B, on a two-pod `lab`.
    pub fn new(name: &str, lab: Lab, pods: [(u32, u32); 2]) -> Self {
        let mut dp = TestDatapath::new(name);
        let ifindex = lab.host.enter(|| {
            let mut ifx = [0; 2];
            for (i, x) in ifx.iter_mut().enumerate() {
                dp.attach_tc(&Lab::iface(i), TcHook::FromWorkload).unwrap();
                dp.attach_tc(&Lab::iface(i), TcHook::ToWorkload).unwrap();
                *x = enforcer::datapath::ifindex(&Lab::iface(i)).unwrap();
            }
            ifx
        });
        for (i, (identity, tenant)) in pods.iter().enumerate() {
            let w = Workload {
                identity: *identity,
                tenant: *tenant,
                ipv4: Some(Lab::v4(i).parse().unwrap()),
                ipv6: Some(Lab::v6(i).parse().unwrap()),
                audit: false,
            };
            dp.writer().set_interface_workload(ifindex[i], &w).unwrap();
        }
        let b = &lab.pods[1];
        for port in [8080, 8081] {
            tcp_echo(b, &format!("10.77.0.2:{port}"));
            tcp_echo(b, &format!("[fd77::2]:{port}"));
        }
        Self { lab, dp, ifindex, identity: pods.map(|p| p.0) }
    }

    /// One rule opening A → B on `proto`/`port`: A's egress key and B's ingress key together.
    #[must_use]
    pub fn a_to_b(&self, proto: u8, port: u16, ttl: Option<Duration>) -> Rule {
        let [a, b] = self.identity;
        Rule {
            ranges: Vec::new(),
            keys: vec![
                Rule::key(DIR_EGRESS, a, Some(b), proto, port),
                Rule::key(DIR_INGRESS, b, Some(a), proto, port),
            ],
            action: Action::Allow,
            ttl,
        }
    }
}
