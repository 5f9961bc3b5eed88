//! Scenarios from the `NetworkPolicy` specification and the upstream e2e `netpol` suite, on the
//! x/y/z × a/b/c model. Every verdict is checked with both implementations.

use super::{Reach, check, ip, netpol_model, pod, policies, verdict};
use crate::{
    AllowRule, Cluster, ContainerPort, Endpoint, Isolation, PeerMatch, PortMatch, Protocol, evaluate,
};

use Protocol::{Sctp, Tcp, Udp};

/// Removes the common indentation of a raw string literal.
fn dedent(text: &str) -> String {
    let lines: Vec<&str> = text.lines().skip_while(|l| l.trim().is_empty()).collect();
    let indent = lines.iter().filter(|l| !l.trim().is_empty()).map(|l| l.len() - l.trim_start().len()).min();
    let indent = indent.unwrap_or(0);
    lines.iter().map(|l| l.get(indent..).unwrap_or("")).collect::<Vec<_>>().join("\n")
}

/// One `NetworkPolicy` document in namespace `ns` with the given `spec` body (any indentation).
fn np(ns: &str, name: &str, spec: &str) -> String {
    let mut body = String::new();
    for line in dedent(spec).lines() {
        body.push_str("  ");
        body.push_str(line);
        body.push('\n');
    }
    format!(
        "---\napiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: {name}\n  \
         namespace: {ns}\nspec:\n{body}"
    )
}

fn ext(s: &str) -> Endpoint {
    Endpoint::Ip(ip(s))
}

fn p(name: &str) -> Endpoint {
    Endpoint::Pod(pod(name))
}

#[test]
fn no_policy_allows_everything() {
    let model = netpol_model();
    for proto in Protocol::ALL {
        check(&model, &[], proto, 80, &Reach::new(true));
    }
    assert!(verdict(&model, &[], ext("192.0.2.1"), p("x/a"), Tcp, 80));
    assert!(verdict(&model, &[], p("x/a"), ext("192.0.2.1"), Udp, 53));
}

#[test]
fn default_deny_ingress() {
    let model = netpol_model();
    let pols = policies(&np("x", "deny-ingress", "podSelector: {}"));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).loopback();
    for proto in Protocol::ALL {
        check(&model, &pols, proto, 80, &reach);
    }
    assert!(!verdict(&model, &pols, ext("192.0.2.1"), p("x/a"), Tcp, 80));
    assert!(verdict(&model, &pols, p("x/a"), ext("192.0.2.1"), Tcp, 80), "egress not isolated");
}

#[test]
fn default_deny_egress() {
    let model = netpol_model();
    let pols = policies(&np("x", "deny-egress", "podSelector: {}\npolicyTypes: [Egress]"));
    let mut reach = Reach::new(true);
    reach.expect("x", "", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    check(&model, &pols, Udp, 53, &reach);
    assert!(!verdict(&model, &pols, p("x/b"), ext("8.8.8.8"), Udp, 53));
    assert!(verdict(&model, &pols, ext("8.8.8.8"), p("x/b"), Udp, 53), "ingress not isolated");
}

#[test]
fn default_deny_all() {
    let model = netpol_model();
    let pols = policies(&np("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress, Egress]"));
    let mut reach = Reach::new(true);
    reach.expect("x", "", false).expect("", "x", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    check(&model, &pols, Sctp, 81, &reach);
}

#[test]
fn allow_all_ingress_rule_overrides_default_deny() {
    let model = netpol_model();
    let yaml = np("x", "deny", "podSelector: {}") + &np("x", "allow-all", "podSelector: {}\ningress:\n- {}");
    let pols = policies(&yaml);
    check(&model, &pols, Tcp, 80, &Reach::new(true));
    check(&model, &pols, Udp, 81, &Reach::new(true));
    assert!(
        verdict(&model, &pols, ext("203.0.113.9"), p("x/c"), Tcp, 8080),
        "empty rule allows external too"
    );
}

#[test]
fn allow_all_egress_rule() {
    let model = netpol_model();
    let pols =
        policies(&np("x", "allow-all-egress", "podSelector: {}\npolicyTypes: [Egress]\negress:\n- {}"));
    check(&model, &pols, Tcp, 80, &Reach::new(true));
    assert!(verdict(&model, &pols, p("x/a"), ext("8.8.8.8"), Udp, 53));
}

#[test]
fn pod_selector_within_policy_namespace() {
    // e2e: "should enforce policy to allow traffic from pods within server namespace based on
    // PodSelector" — a podSelector-only peer means pods of the policy's own namespace.
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "allow-x-b-to-x-a",
        r"
        podSelector:
          matchLabels: {pod: a}
        ingress:
        - from:
          - podSelector:
              matchLabels: {pod: b}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x/a", false).expect("x/b", "x/a", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(!verdict(&model, &pols, p("y/b"), p("x/a"), Tcp, 80), "same labels, other namespace");
    assert!(!verdict(&model, &pols, ext("10.0.1.2"), p("x/a"), Tcp, 80), "pod IP as external address");
}

#[test]
fn namespace_selector() {
    // e2e: "should enforce policy to allow traffic only from a different namespace, based on
    // NamespaceSelector"
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "allow-from-y",
        r"
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector:
              matchLabels: {ns: y}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).expect("y", "x", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn empty_namespace_selector_means_every_pod_of_every_namespace() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "allow-from-all-pods",
        r"
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector: {}
        ",
    ));
    check(&model, &pols, Tcp, 80, &Reach::new(true));
    assert!(!verdict(&model, &pols, ext("192.0.2.1"), p("x/a"), Tcp, 80), "pods only, not external");
}

#[test]
fn namespace_name_label_is_implied() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "allow-from-z-by-name",
        r"
        podSelector: {}
        ingress:
        - from:
          - namespaceSelector:
              matchLabels:
                kubernetes.io/metadata.name: z
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).expect("z", "x", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn selectors_in_one_peer_are_and() {
    // e2e: "should enforce policy based on PodSelector and NamespaceSelector": one peer with both
    // selectors = pods matching podSelector within namespaces matching namespaceSelector.
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "and",
        r"
        podSelector:
          matchLabels: {pod: a}
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: ns, operator: NotIn, values: [x]}
            podSelector:
              matchLabels: {pod: b}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x/a", false).expect("y/b", "x/a", true).expect("z/b", "x/a", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn selectors_in_two_peers_are_or() {
    // e2e: "should enforce policy based on PodSelector or NamespaceSelector": the same selectors as
    // two list items (one more "-") = union.
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "or",
        r"
        podSelector:
          matchLabels: {pod: a}
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions:
              - {key: ns, operator: NotIn, values: [x]}
          - podSelector:
              matchLabels: {pod: b}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("x", "x/a", false).expect("x/b", "x/a", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn multiple_pod_selectors_and_namespace_selectors() {
    // e2e: "should enforce policy based on Multiple PodSelectors and NamespaceSelectors"
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "multi",
        r"
        podSelector:
          matchLabels: {pod: a}
        ingress:
        - from:
          - namespaceSelector:
              matchExpressions: [{key: ns, operator: NotIn, values: [x]}]
            podSelector:
              matchExpressions: [{key: pod, operator: In, values: [b, c]}]
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x/a", false);
    for from in ["y/b", "y/c", "z/b", "z/c"] {
        reach.expect(from, "x/a", true);
    }
    reach.loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn match_expression_operators() {
    let model = netpol_model();
    // (expression, pods of x allowed to reach x/a)
    let cases: [(&str, &[&str]); 6] = [
        ("{key: pod, operator: In, values: [b, c]}", &["x/b", "x/c"]),
        ("{key: pod, operator: NotIn, values: [b]}", &["x/a", "x/c"]),
        ("{key: pod, operator: Exists}", &["x/a", "x/b", "x/c"]),
        ("{key: pod, operator: DoesNotExist}", &[]),
        // Absent keys: NotIn and DoesNotExist match, In and Exists do not.
        ("{key: role, operator: NotIn, values: [db]}", &["x/a", "x/b", "x/c"]),
        ("{key: role, operator: DoesNotExist}", &["x/a", "x/b", "x/c"]),
    ];
    for (expr, allowed_from) in cases {
        let pols = policies(&np(
            "x",
            "expr",
            &format!(
                "podSelector:\n  matchLabels: {{pod: a}}\ningress:\n- from:\n  - podSelector:\n      matchExpressions: [{expr}]"
            ),
        ));
        let mut reach = Reach::new(true);
        reach.expect("", "x/a", false);
        for from in allowed_from {
            reach.expect(from, "x/a", true);
        }
        reach.loopback();
        check(&model, &pols, Tcp, 80, &reach);
    }
    for expr in ["{key: role, operator: In, values: [db]}", "{key: role, operator: Exists}"] {
        let pols = policies(&np(
            "x",
            "expr",
            &format!("podSelector:\n  matchExpressions: [{expr}]\npolicyTypes: [Ingress]"),
        ));
        check(&model, &pols, Tcp, 80, &Reach::new(true));
    }
}

#[test]
fn ip_block_with_except_on_egress() {
    // e2e: "should enforce except clause while egress access to server in CIDR block"
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "egress-cidr",
        r"
        podSelector:
          matchLabels: {pod: a}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock:
              cidr: 10.0.0.0/16
              except: [10.0.2.0/24]
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("x/a", "y", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(verdict(&model, &pols, p("x/a"), ext("10.0.200.1"), Udp, 53));
    assert!(!verdict(&model, &pols, p("x/a"), ext("10.0.2.200"), Udp, 53), "except applies to any address");
    assert!(!verdict(&model, &pols, p("x/a"), ext("192.168.0.1"), Tcp, 443));
}

#[test]
fn ip_block_matches_pod_ips_on_ingress_and_masks_host_bits() {
    let model = netpol_model();
    // 10.0.3.77/24 is 10.0.3.0/24: namespace z.
    let pols = policies(&np(
        "x",
        "from-cidr",
        r"
        podSelector: {}
        ingress:
        - from:
          - ipBlock:
              cidr: 10.0.3.77/24
              except: [10.0.3.2/32]
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).expect("z", "x", true).expect("z/b", "x", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(verdict(&model, &pols, ext("10.0.3.250"), p("x/b"), Tcp, 80));
    assert!(!verdict(&model, &pols, ext("10.0.3.2"), p("x/b"), Tcp, 80));
}

#[test]
fn ip_overlapping_cidr_and_except_is_allowed_by_another_policy() {
    // e2e: "should ensure an IP overlapping both IPBlock.CIDR and IPBlock.Except is allowed"
    let model = netpol_model();
    let yaml = np(
        "x",
        "except-y-b",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {cidr: 10.0.2.0/24, except: [10.0.2.2/32]}
        ",
    ) + &np(
        "x",
        "allow-y-b",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {cidr: 10.0.2.2/32}
        ",
    );
    let pols = policies(&yaml);
    let mut reach = Reach::new(true);
    reach.expect("x/a", "", false).expect("x/a", "y", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn ports_and_protocols() {
    // e2e: "should enforce policy based on Ports" and "should not allow access by TCP when a policy
    // specifies only UDP".
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "ports",
        r"
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from:
          - namespaceSelector: {matchLabels: {ns: y}}
          ports:
          - port: 81
          - protocol: UDP
            port: 80
        ",
    ));
    let mut only_y = Reach::new(true);
    only_y.expect("", "x/a", false).expect("y", "x/a", true).loopback();
    let mut none = Reach::new(true);
    none.expect("", "x/a", false).loopback();
    check(&model, &pols, Tcp, 81, &only_y);
    check(&model, &pols, Tcp, 80, &none);
    check(&model, &pols, Udp, 80, &only_y);
    check(&model, &pols, Udp, 81, &none);
    check(&model, &pols, Sctp, 81, &none);
}

#[test]
fn protocol_without_port_allows_every_port_of_that_protocol() {
    // e2e: "should enforce ingress policy allowing any port traffic to a server on a specific protocol"
    let model = netpol_model();
    let pols = policies(&np("x", "tcp-only", "podSelector: {}\ningress:\n- ports:\n  - protocol: TCP"));
    let mut none = Reach::new(true);
    none.expect("", "x", false).loopback();
    check(&model, &pols, Tcp, 80, &Reach::new(true));
    check(&model, &pols, Tcp, 65535, &Reach::new(true));
    check(&model, &pols, Udp, 80, &none);
    check(&model, &pols, Sctp, 80, &none);
}

#[test]
fn sctp_policy_isolates_tcp() {
    // e2e: "should properly isolate pods that are selected by a policy allowing SCTP"
    let model = netpol_model();
    let pols =
        policies(&np("x", "sctp", "podSelector: {}\ningress:\n- ports:\n  - {protocol: SCTP, port: 80}"));
    let mut none = Reach::new(true);
    none.expect("", "x", false).loopback();
    check(&model, &pols, Sctp, 80, &Reach::new(true));
    check(&model, &pols, Tcp, 80, &none);
}

#[test]
fn end_port_range() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "range",
        "podSelector: {}\npolicyTypes: [Ingress]\ningress:\n- ports:\n  - {port: 80, endPort: 82}\n  - {protocol: UDP, port: 5000, endPort: 5000}",
    ));
    let mut none = Reach::new(true);
    none.expect("", "x", false).loopback();
    for port in [80, 81, 82] {
        check(&model, &pols, Tcp, port, &Reach::new(true));
    }
    check(&model, &pols, Tcp, 79, &none);
    check(&model, &pols, Tcp, 83, &none);
    check(&model, &pols, Udp, 81, &none);
    check(&model, &pols, Udp, 5000, &Reach::new(true));
    check(&model, &pols, Udp, 5001, &none);
}

#[test]
fn named_port_on_ingress() {
    // e2e: "should allow ingress access on one named port"
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "named",
        "podSelector: {}\ningress:\n- ports:\n  - port: serve-81-tcp\n  - {protocol: UDP, port: serve-80-udp}",
    ));
    let mut none = Reach::new(true);
    none.expect("", "x", false).loopback();
    check(&model, &pols, Tcp, 81, &Reach::new(true));
    check(&model, &pols, Tcp, 80, &none);
    check(&model, &pols, Udp, 80, &Reach::new(true));
    check(&model, &pols, Udp, 81, &none);
    assert!(verdict(&model, &pols, ext("192.0.2.1"), p("x/a"), Tcp, 81), "external source, pod destination");

    // The protocol must match the container port's: serve-81-udp as TCP resolves to nothing.
    let pols = policies(&np("x", "named", "podSelector: {}\ningress:\n- ports:\n  - port: serve-81-udp"));
    check(&model, &pols, Tcp, 81, &none);
    check(&model, &pols, Udp, 81, &none);
}

/// x/b serves `http` on 8080 and x/c on 9090; the same name resolves per destination pod.
fn heterogeneous_http() -> Cluster {
    let mut model = netpol_model();
    model.pods[pod("x/b")].ports.push(ContainerPort { name: Some("http".into()), port: 8080, protocol: Tcp });
    model.pods[pod("x/c")].ports.push(ContainerPort { name: Some("http".into()), port: 9090, protocol: Tcp });
    model
}

#[test]
fn named_port_resolves_per_destination_pod_on_ingress() {
    let model = heterogeneous_http();
    let pols = policies(&np("x", "http", "podSelector: {}\ningress:\n- ports:\n  - port: http"));
    assert!(verdict(&model, &pols, p("y/a"), p("x/b"), Tcp, 8080));
    assert!(!verdict(&model, &pols, p("y/a"), p("x/b"), Tcp, 9090));
    assert!(verdict(&model, &pols, p("y/a"), p("x/c"), Tcp, 9090));
    assert!(!verdict(&model, &pols, p("y/a"), p("x/c"), Tcp, 8080));
    assert!(!verdict(&model, &pols, p("y/a"), p("x/a"), Tcp, 8080), "x/a has no port named http");

    let eval = evaluate(&model, &pols);
    let want = AllowRule {
        peers: vec![PeerMatch::AnyPeer],
        ports: vec![PortMatch::Range { proto: Tcp, from: 9090, to: 9090 }],
    };
    assert_eq!(eval[pod("x/c")].ingress, Isolation::Isolated(vec![want]));
    assert_eq!(eval[pod("x/a")].ingress, Isolation::Isolated(vec![]), "isolated, nothing resolvable");
}

#[test]
fn named_port_on_egress() {
    // e2e: "should allow egress access on one named port"
    let model = heterogeneous_http();
    let pols = policies(&np(
        "x",
        "egress-named",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
        - ports:
          - port: serve-80-tcp
          - port: http
          - {protocol: UDP, port: 53}
        ",
    ));
    let mut none = Reach::new(true);
    none.expect("x/a", "", false).loopback();
    check(&model, &pols, Tcp, 80, &Reach::new(true));
    check(&model, &pols, Tcp, 81, &none);
    assert!(verdict(&model, &pols, p("x/a"), p("x/b"), Tcp, 8080));
    assert!(!verdict(&model, &pols, p("x/a"), p("x/b"), Tcp, 9090));
    assert!(verdict(&model, &pols, p("x/a"), p("x/c"), Tcp, 9090));
    assert!(!verdict(&model, &pols, p("x/a"), ext("93.184.216.34"), Tcp, 80), "named ports never match IPs");
    assert!(verdict(&model, &pols, p("x/a"), ext("8.8.8.8"), Udp, 53), "numeric ports do");

    // Evaluated form: the numeric port keeps the original peer, named ports become per-pod rules.
    let eval = evaluate(&model, &pols);
    let Isolation::Isolated(rules) = &eval[pod("x/a")].egress else { panic!("x/a must be egress-isolated") };
    assert_eq!(
        rules[0],
        AllowRule {
            peers: vec![PeerMatch::AnyPeer],
            ports: vec![PortMatch::Range { proto: Udp, from: 53, to: 53 }]
        }
    );
    let to_x_b = AllowRule {
        peers: vec![PeerMatch::Pod(pod("x/b"))],
        ports: vec![
            PortMatch::Range { proto: Tcp, from: 80, to: 80 },
            PortMatch::Range { proto: Tcp, from: 8080, to: 8080 },
        ],
    };
    assert!(rules.contains(&to_x_b), "{rules:#?}");
    assert_eq!(rules.len(), 1 + 9);
}

#[test]
fn named_port_on_egress_to_ip_block_matches_pods_in_the_block() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "egress-named-cidr",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        egress:
        - to:
          - ipBlock: {cidr: 10.0.2.0/24}
          ports:
          - port: serve-80-tcp
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("x/a", "", false).expect("x/a", "y", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(!verdict(&model, &pols, p("x/a"), ext("10.0.2.99"), Tcp, 80));
}

#[test]
fn policy_types_egress_only_ignores_ingress_rules() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "egress-only",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Egress]
        ingress:
        - from:
          - podSelector: {matchLabels: {pod: b}}
        egress:
        - to:
          - namespaceSelector: {matchLabels: {ns: y}}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("x/a", "", false).expect("x/a", "y", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(verdict(&model, &pols, ext("192.0.2.1"), p("x/a"), Tcp, 80), "ingress not isolated");
}

#[test]
fn policy_types_ingress_only_ignores_egress_rules() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "ingress-only",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Ingress]
        egress:
        - to:
          - namespaceSelector: {matchLabels: {ns: y}}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x/a", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn ingress_and_egress_controlled_independently() {
    // e2e: "should enforce policies to check ingress and egress policies can be controlled
    // independently based on PodSelector" and "should work with Ingress, Egress specified together".
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "both",
        r"
        podSelector: {matchLabels: {pod: a}}
        policyTypes: [Ingress, Egress]
        ingress:
        - from:
          - podSelector: {matchLabels: {pod: b}}
        egress:
        - to:
          - podSelector: {matchLabels: {pod: c}}
        ",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x/a", false).expect("x/a", "", false);
    reach.expect("x/b", "x/a", true).expect("x/a", "x/c", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn egress_denial_on_client_side_wins_over_server_allow() {
    // e2e: "should support denying of egress traffic on the client side (even if the server
    // explicitly allows this traffic)"
    let model = netpol_model();
    let yaml = np("x", "deny-egress", "podSelector: {matchLabels: {pod: a}}\npolicyTypes: [Egress]")
        + &np(
            "y",
            "allow-x-a",
            r"
            podSelector: {}
            ingress:
            - from:
              - namespaceSelector: {matchLabels: {ns: x}}
                podSelector: {matchLabels: {pod: a}}
            ",
        );
    let pols = policies(&yaml);
    let mut reach = Reach::new(true);
    reach.expect("", "y", false).expect("x/a", "", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn several_policies_are_additive() {
    // e2e: "should enforce multiple, stacked policies with overlapping podSelectors" and "should
    // allow ingress access from updated namespace"-style unions.
    let model = netpol_model();
    let yaml = np("x", "deny", "podSelector: {}")
        + &np(
            "x",
            "from-x-b",
            "podSelector: {matchLabels: {pod: a}}\ningress:\n- from:\n  - podSelector: {matchLabels: {pod: b}}",
        )
        + &np(
            "x",
            "from-y-c-on-81",
            "podSelector: {matchExpressions: [{key: pod, operator: In, values: [a, b]}]}\ningress:\n- from:\n  - namespaceSelector: {matchLabels: {ns: y}}\n    podSelector: {matchLabels: {pod: c}}\n  ports:\n  - port: 81",
        );
    let pols = policies(&yaml);
    let mut on_80 = Reach::new(true);
    on_80.expect("", "x", false).expect("x/b", "x/a", true).loopback();
    let mut on_81 = Reach::new(true);
    on_81
        .expect("", "x", false)
        .expect("x/b", "x/a", true)
        .expect("y/c", "x/a", true)
        .expect("y/c", "x/b", true);
    on_81.loopback();
    check(&model, &pols, Tcp, 80, &on_80);
    check(&model, &pols, Tcp, 81, &on_81);
}

#[test]
fn empty_egress_list_does_not_add_egress() {
    let model = netpol_model();
    // No policyTypes, `egress: []`: defaults to [Ingress] only.
    let pols = policies(&np("x", "empty-egress", "podSelector: {}\negress: []"));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(verdict(&model, &pols, p("x/a"), ext("8.8.8.8"), Udp, 53));
    assert_eq!(evaluate(&model, &pols)[pod("x/a")].egress, Isolation::NotIsolated);

    // A non-empty egress list does add Egress.
    let pols = policies(&np("x", "some-egress", "podSelector: {}\negress:\n- to:\n  - podSelector: {}"));
    let mut reach = Reach::new(true);
    // x -> x passes x's egress but not x's ingress (isolated, no ingress rules).
    reach.expect("", "x", false).expect("x", "", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(!verdict(&model, &pols, p("x/a"), p("y/a"), Tcp, 80), "podSelector-only peer: namespace x only");
    assert!(!verdict(&model, &pols, p("x/a"), ext("8.8.8.8"), Tcp, 80), "egress only to pods");

    // Explicit policyTypes with an empty list denies all egress.
    let pols = policies(&np("x", "deny-egress", "podSelector: {}\npolicyTypes: [Egress]\negress: []"));
    let mut reach = Reach::new(true);
    reach.expect("x", "", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
}

#[test]
fn policy_only_affects_its_own_namespace() {
    let model = netpol_model();
    let pols = policies(&np("x", "deny-all", "podSelector: {}\npolicyTypes: [Ingress, Egress]"));
    let mut reach = Reach::new(true);
    reach.expect("x", "", false).expect("", "x", false).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    for from in ["y/a", "y/b", "z/c"] {
        for to in ["y/c", "z/a"] {
            assert!(verdict(&model, &pols, p(from), p(to), Tcp, 80));
        }
    }
    let eval = evaluate(&model, &pols);
    assert_eq!(eval[pod("y/a")].ingress, Isolation::NotIsolated);
    assert_eq!(eval[pod("y/a")].egress, Isolation::NotIsolated);
}

#[test]
fn namespace_defaults_to_default() {
    let mut model = netpol_model();
    model.pods.push(crate::Pod {
        name: "d".into(),
        namespace: "default".into(),
        labels: super::labels(&[("pod", "d")]),
        ips: vec![ip("10.0.9.1")],
        ports: vec![],
    });
    let yaml = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: deny}\nspec: {podSelector: {}}\n";
    let pols = policies(yaml);
    assert_eq!(pols[0].metadata.namespace, "default");
    let d = model.pods.len() - 1;
    assert!(!verdict(&model, &pols, p("x/a"), Endpoint::Pod(d), Tcp, 80));
    assert!(verdict(&model, &pols, Endpoint::Pod(d), p("x/a"), Tcp, 80));
}

#[test]
fn external_sources_and_ip_blocks_on_ingress() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "world",
        r"
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from:
          - ipBlock: {cidr: 0.0.0.0/0, except: [10.0.0.0/8]}
        - from:
          - podSelector: {matchLabels: {pod: c}}
          ports: [{port: 80}]
        ",
    ));
    assert!(verdict(&model, &pols, ext("198.51.100.7"), p("x/a"), Tcp, 80));
    assert!(verdict(&model, &pols, ext("198.51.100.7"), p("x/a"), Udp, 1234));
    assert!(!verdict(&model, &pols, ext("10.9.9.9"), p("x/a"), Tcp, 80));
    assert!(!verdict(&model, &pols, ext("2001:db8::1"), p("x/a"), Tcp, 80), "IPv4 block, IPv6 address");
    assert!(verdict(&model, &pols, p("x/c"), p("x/a"), Tcp, 80));
    assert!(!verdict(&model, &pols, p("x/c"), p("x/a"), Tcp, 81));
    assert!(!verdict(&model, &pols, p("x/b"), p("x/a"), Tcp, 80));
}

#[test]
fn ipv6_ip_block() {
    let mut model = netpol_model();
    model.pods[pod("y/a")].ips.push(ip("fd00:2::1"));
    let pols = policies(&np(
        "x",
        "v6",
        "podSelector: {}\ningress:\n- from:\n  - ipBlock: {cidr: 'fd00:2::1234/64', except: ['fd00:2::ff/128']}",
    ));
    let mut reach = Reach::new(true);
    reach.expect("", "x", false).expect("y/a", "x", true).loopback();
    check(&model, &pols, Tcp, 80, &reach);
    assert!(verdict(&model, &pols, ext("fd00:2::5"), p("x/b"), Tcp, 80));
    assert!(!verdict(&model, &pols, ext("fd00:2::ff"), p("x/b"), Tcp, 80));
    assert!(!verdict(&model, &pols, ext("fd00:3::5"), p("x/b"), Tcp, 80));
}

#[test]
fn evaluated_form_lists_selected_pods_then_blocks() {
    let model = netpol_model();
    let pols = policies(&np(
        "x",
        "shape",
        r"
        podSelector: {matchLabels: {pod: a}}
        ingress:
        - from:
          - ipBlock: {cidr: 192.0.2.0/24}
          - namespaceSelector: {matchLabels: {ns: z}}
            podSelector: {matchLabels: {pod: c}}
          - podSelector: {matchLabels: {pod: b}}
          ports:
          - {protocol: UDP}
        ",
    ));
    let eval = evaluate(&model, &pols);
    let rule = AllowRule {
        peers: vec![
            PeerMatch::Pod(pod("x/b")),
            PeerMatch::Pod(pod("z/c")),
            PeerMatch::Cidr { net: "192.0.2.0/24".parse().expect("cidr"), except: vec![] },
        ],
        ports: vec![PortMatch::Proto(Udp)],
    };
    assert_eq!(eval[pod("x/a")].ingress, Isolation::Isolated(vec![rule]));
    assert_eq!(eval[pod("x/b")].ingress, Isolation::NotIsolated);
}

#[test]
fn out_of_range_pod_indices_are_denied() {
    let model = netpol_model();
    let eval = evaluate(&model, &[]);
    let bad = Endpoint::Pod(model.pods.len());
    assert!(!crate::allowed(&model, &eval, bad, p("x/a"), Tcp, 80));
    assert!(!crate::allowed(&model, &eval, p("x/a"), bad, Tcp, 80));
    assert!(!crate::allowed_direct(&model, &[], bad, bad, Tcp, 80));
}
