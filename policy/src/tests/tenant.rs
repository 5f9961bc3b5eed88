//! `TenantPolicy`: parsing mixed files, located errors, `ttl`, admin keys and key conflicts.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::tenant::parse_ttl;
use crate::{
    Document, PolicyError, Protocol, TenantAction, TenantPolicy, TenantPolicyMeta, TenantPolicySpec,
    TenantPort, TenantSelector, parse_documents, parse_file, tenant_conflicts,
};

const FILE: &str = "policies/tenants.yaml";

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_documents(Path::new(FILE), text) {
        Ok(d) => panic!("expected errors, parsed {d:#?}"),
        Err(e) => e,
    }
}

/// Every error of `text` as (line, column, field), checking the file name on the way.
fn positions(errs: &[PolicyError]) -> Vec<(usize, usize, &str)> {
    errs.iter()
        .map(|e| {
            assert_eq!(e.file, PathBuf::from(FILE));
            (e.line, e.column, e.field.as_str())
        })
        .collect()
}

/// The single error of `text`, checked for position and field; returns its message.
#[track_caller]
fn single(text: &str, line: usize, column: usize, field: &str) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(positions(&errs), vec![(line, column, field)], "{}", errs[0]);
    errs[0].message.clone()
}

/// The single `TenantPolicy` of `text`.
#[track_caller]
fn tenant(text: &str) -> TenantPolicy {
    match parse_documents(Path::new(FILE), text) {
        Ok(mut docs) if docs.len() == 1 => match docs.remove(0) {
            Document::Tenant(p) => p,
            Document::Network(p) => panic!("expected a TenantPolicy, got {p:#?}"),
        },
        Ok(docs) => panic!("expected one document, got {docs:#?}"),
        Err(errs) => {
            let text: Vec<String> = errs.iter().map(ToString::to_string).collect();
            panic!("does not parse:\n{}", text.join("\n"))
        }
    }
}

/// Lines 1-2 of the `TenantPolicy` documents below.
const TP: &str = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\n";

/// A hand-built policy with `ports` (protocol, port).
fn policy(name: &str, from: &str, to: &str, ports: &[(Protocol, Option<u16>)]) -> TenantPolicy {
    TenantPolicy {
        api_version: crate::TENANT_POLICY_API_VERSION.to_owned(),
        kind: crate::TENANT_POLICY_KIND.to_owned(),
        metadata: TenantPolicyMeta { name: name.to_owned(), ..TenantPolicyMeta::default() },
        spec: TenantPolicySpec {
            priority: 10,
            action: TenantAction::Allow,
            from: TenantSelector { tenant: from.to_owned() },
            to: TenantSelector { tenant: to.to_owned() },
            ports: ports.iter().map(|&(protocol, port)| TenantPort { protocol, port }).collect(),
            ttl: None,
        },
    }
}

#[test]
fn mixed_file_parses_both_kinds_in_order() {
    let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: web, namespace: shop}\n\
                spec: {podSelector: {}}\n---\n\
                apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata:\n  name: shop-to-payments\n  \
                labels: {team: netsec}\nspec:\n  priority: 10\n  action: Allow\n  from: {tenant: acme}\n  \
                to: {tenant: payments}\n  ports:\n    - {protocol: TCP, port: 443}\n    - {protocol: UDP}\n  \
                ttl: 2h\n---\n\
                apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db, namespace: shop}\n---\n\
                apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata: {name: cluster-pass, uid: '42'}\n\
                spec: {priority: 1000, action: Pass, from: {tenant: '*'}, to: {tenant: '*'}, ports: null}\n";
    let docs = parse_documents(Path::new(FILE), text).expect("valid");
    assert_eq!(docs.len(), 4, "{docs:#?}");
    let [Document::Network(web), Document::Tenant(t1), Document::Network(db), Document::Tenant(t2)] =
        docs.as_slice()
    else {
        panic!("wrong kinds or order: {docs:#?}")
    };
    assert_eq!((web.metadata.name.as_str(), db.metadata.name.as_str()), ("web", "db"));

    assert_eq!(t1.api_version, "ztseg.io/v1alpha1");
    assert_eq!(t1.kind, "TenantPolicy");
    assert_eq!(t1.metadata.name, "shop-to-payments");
    assert_eq!(t1.metadata.labels.get("team").map(String::as_str), Some("netsec"));
    let spec = &t1.spec;
    assert_eq!((spec.priority, spec.action), (10, TenantAction::Allow));
    assert_eq!((spec.from.tenant.as_str(), spec.to.tenant.as_str()), ("acme", "payments"));
    assert!(!spec.from.is_any() && !spec.to.is_any());
    assert_eq!(
        spec.ports,
        vec![
            TenantPort { protocol: Protocol::Tcp, port: Some(443) },
            TenantPort { protocol: Protocol::Udp, port: None }
        ]
    );
    assert_eq!(spec.ttl, Some(Duration::from_hours(2)));
    assert!(t1.validate().is_empty());

    assert_eq!(t2.metadata.name, "cluster-pass");
    assert_eq!((t2.spec.priority, t2.spec.action), (1000, TenantAction::Pass));
    assert!(t2.spec.from.is_any() && t2.spec.to.is_any());
    assert_eq!((t2.spec.ports.len(), t2.spec.ttl), (0, None));

    // `parse_file` stays NetworkPolicy-only: the TenantPolicy documents are wrong-kind errors.
    let errs = match parse_file(Path::new(FILE), text) {
        Ok(p) => panic!("expected errors, parsed {p:#?}"),
        Err(e) => e,
    };
    assert_eq!(
        positions(&errs),
        vec![(6, 13, "apiVersion"), (7, 7, "kind"), (25, 13, "apiVersion"), (26, 7, "kind")],
        "{errs:#?}"
    );
    assert_eq!(
        errs[1].message,
        "document #2 (`shop-to-payments`): kind must be `NetworkPolicy`, found `TenantPolicy`"
    );
}

#[test]
fn kind_and_api_version_errors() {
    // A TenantPolicy needs its own apiVersion.
    let text = "apiVersion: networking.k8s.io/v1\nkind: TenantPolicy\nmetadata: {name: a}\n\
                spec: {priority: 1, action: Allow, from: {tenant: a}, to: {tenant: b}}\n";
    let msg = single(text, 1, 13, "apiVersion");
    assert_eq!(
        msg,
        "document #1 (`a`): apiVersion must be `ztseg.io/v1alpha1`, found `networking.k8s.io/v1`"
    );

    // Neither kind: both accepted kinds are named.
    let errs = errors("apiVersion: v1\nkind: Service\nmetadata: {name: web}\n");
    assert_eq!(positions(&errs), vec![(1, 13, "apiVersion"), (2, 7, "kind")], "{errs:#?}");
    assert_eq!(
        errs[0].message,
        "document #1 (`web`): apiVersion must be `networking.k8s.io/v1` or `ztseg.io/v1alpha1`, found `v1`"
    );
    assert_eq!(
        errs[1].message,
        "document #1 (`web`): kind must be `NetworkPolicy` or `TenantPolicy`, found `Service`"
    );

    // Only plain strings count.
    let msg = single(
        "apiVersion: !v ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata: {name: a}\n",
        1,
        13,
        "apiVersion",
    );
    assert_eq!(msg, "document #1 (`a`): apiVersion must be `ztseg.io/v1alpha1`, found a value tagged `!v`");

    // The apiVersion tells which kind was meant.
    let msg = single("apiVersion: ztseg.io/v1alpha1\nmetadata: {name: a}\nspec: {}\n", 1, 1, "kind");
    assert_eq!(msg, "document #1 (`a`): missing kind, expected `TenantPolicy`");
}

#[test]
fn strict_deserialization_errors_are_located() {
    let head = format!("{TP}metadata: {{name: a}}\nspec:\n  priority: 10\n  action: Deny\n");
    let sides = "  from: {tenant: acme}\n  to: {tenant: payments}\n";

    // Line 10 is "  - {protocol: TCP, prot: 443}".
    let msg = single(
        &format!("{head}{sides}  ports:\n  - {{protocol: TCP, prot: 443}}\n"),
        10,
        21,
        "spec.ports[0].prot",
    );
    assert_eq!(msg, "unknown field `prot`, expected `protocol` or `port`");

    let msg = single(&format!("{head}{sides}  ports:\n  - {{port: https}}\n"), 10, 12, "spec.ports[0].port");
    assert!(
        msg.contains("expected a port number between 1 and 65535 (port names are not supported)"),
        "{msg}"
    );

    let msg =
        single(&format!("{head}{sides}  ports:\n  - {{protocol: tcp}}\n"), 10, 16, "spec.ports[0].protocol");
    assert!(msg.contains("unknown variant `tcp`"), "{msg}");

    let msg = single(&format!("{head}{sides}  prio: 3\n"), 9, 3, "spec.prio");
    assert!(msg.starts_with("unknown field `prio`, expected one of"), "{msg}");

    // Required fields: the error points at the `spec` mapping (line 4 is "spec:", 5 its first key).
    let msg = single(&format!("{head}  to: {{tenant: payments}}\n"), 5, 3, "spec");
    assert_eq!(msg, "missing field `from`");
    let msg = single(&format!("{head}  from: {{tenant: acme}}\n"), 5, 3, "spec");
    assert_eq!(msg, "missing field `to`");
    let msg = single(
        &format!(
            "{TP}metadata: {{name: a}}\nspec: {{action: Allow, from: {{tenant: a}}, to: {{tenant: b}}}}\n"
        ),
        4,
        7,
        "spec",
    );
    assert_eq!(msg, "missing field `priority`");
    let msg = single(&format!("{head}  from: {{}}\n  to: {{tenant: payments}}\n"), 7, 9, "spec.from");
    assert_eq!(msg, "missing field `tenant`");

    let msg = single(
        &format!("{head}  from: {{tenant: acme, namespace: x}}\n  to: {{tenant: b}}\n"),
        7,
        24,
        "spec.from.namespace",
    );
    assert!(msg.contains("unknown field `namespace`, expected `tenant`"), "{msg}");

    let msg = single(
        &format!("{TP}metadata: {{name: a}}\nspec:\n  priority: 10\n  action: allow\n{sides}"),
        6,
        11,
        "spec.action",
    );
    assert_eq!(msg, "unknown variant `allow`, expected one of `Allow`, `Deny`, `Pass`");

    let msg = single(
        &format!("{TP}metadata: {{name: a}}\nspec:\n  priority: high\n  action: Allow\n{sides}"),
        5,
        13,
        "spec.priority",
    );
    assert!(msg.contains("expected a priority between 0 and 1000"), "{msg}");

    // TenantPolicies are cluster-scoped.
    let msg = single(
        &format!("{TP}metadata: {{name: a, namespace: x}}\nspec: {{}}\n"),
        3,
        21,
        "metadata.namespace",
    );
    assert!(msg.starts_with("unknown field `namespace`, expected one of `name`, `labels`"), "{msg}");
}

#[test]
fn every_semantic_error_is_reported_across_documents() {
    let text = format!(
        "{TP}metadata:\n  name: Shop_1\nspec:\n  priority: 1001\n  action: Allow\n  from: {{tenant: Acme}}\n  \
         to: {{tenant: ''}}\n  ports:\n  - port: 0\n  - {{protocol: UDP, port: 65536}}\n  - port: 80\n  - port: -1\n  \
         ttl: 31d\n---\n{TP}metadata: {{name: b}}\nspec: {{priority: -5, action: Pass, from: {{tenant: '*'}}, to: {{tenant: x}}}}\n"
    );
    let errs = errors(&text);
    assert_eq!(
        positions(&errs),
        vec![
            (4, 9, "metadata.name"),
            (6, 13, "spec.priority"),
            (8, 18, "spec.from.tenant"),
            (9, 16, "spec.to.tenant"),
            (11, 11, "spec.ports[0].port"),
            (12, 27, "spec.ports[1].port"),
            (14, 11, "spec.ports[3].port"),
            (15, 8, "spec.ttl"),
            (20, 18, "spec.priority"),
        ],
        "{errs:#?}"
    );
    let messages: Vec<&str> = errs.iter().map(|e| e.message.as_str()).collect();
    assert!(messages[0].contains("`Shop_1` is not a valid DNS label"), "{}", messages[0]);
    assert_eq!(messages[1], "1001 must be between 0 and 1000, inclusive");
    assert!(messages[2].starts_with("invalid tenant: `Acme` is not a valid DNS label"), "{}", messages[2]);
    assert!(messages[2].ends_with("; use `*` for any tenant"), "{}", messages[2]);
    assert!(messages[3].starts_with("invalid tenant: `` is not a valid DNS label"), "{}", messages[3]);
    assert_eq!(messages[4], "0 must be between 1 and 65535, inclusive");
    assert_eq!(messages[5], "65536 must be between 1 and 65535, inclusive");
    assert_eq!(messages[6], "-1 must be between 1 and 65535, inclusive");
    assert_eq!(messages[7], "ttl `31d` is out of range: must be between 1s and 30d, inclusive");
    assert_eq!(messages[8], "-5 must be between 0 and 1000, inclusive");
    assert_eq!(
        errs[1].to_string(),
        "policies/tenants.yaml:6:13: spec.priority: 1001 must be between 0 and 1000, inclusive"
    );
}

#[test]
fn ttl_parsing() {
    let secs = |s: u64| Ok(Duration::from_secs(s));
    assert_eq!(parse_ttl("1s"), secs(1));
    assert_eq!(parse_ttl("90s"), secs(90));
    assert_eq!(parse_ttl("30m"), secs(1800));
    assert_eq!(parse_ttl("2h"), secs(7200));
    assert_eq!(parse_ttl("7d"), secs(7 * 86_400));
    assert_eq!(parse_ttl("30d"), secs(30 * 86_400));
    assert_eq!(parse_ttl("720h"), secs(30 * 86_400));
    assert_eq!(parse_ttl("2592000s"), secs(30 * 86_400));
    assert_eq!(parse_ttl("007m"), secs(420));

    for out_of_range in
        ["0s", "0d", "31d", "721h", "2592001s", "99999999999999999999d", "300000000000000000d"]
    {
        let msg = parse_ttl(out_of_range).expect_err(out_of_range);
        assert_eq!(
            msg,
            format!("ttl `{out_of_range}` is out of range: must be between 1s and 30d, inclusive")
        );
    }
    for bad in
        ["", "2", "h", "2x", "2H", "1.5h", " 2h", "2h ", "-1h", "+1h", "2h30m", "1e3s", "٣h", "1 h", "2hs"]
    {
        let msg = parse_ttl(bad).expect_err(bad);
        assert_eq!(
            msg,
            format!(
                "invalid ttl `{bad}`: expected a whole number followed by a unit `s`, `m`, `h` or `d` \
                 (e.g. `90s`, `30m`, `2h`, `7d`)"
            )
        );
    }

    // In a document: located at the value; `null` means no ttl; a bare number has no unit.
    let head = format!(
        "{TP}metadata: {{name: a}}\nspec:\n  priority: 1\n  action: Allow\n  from: {{tenant: a}}\n  to: {{tenant: b}}\n"
    );
    assert_eq!(tenant(&format!("{head}  ttl: 45m\n")).spec.ttl, Some(Duration::from_mins(45)));
    assert_eq!(tenant(&format!("{head}  ttl: null\n")).spec.ttl, None);
    assert_eq!(tenant(&head).spec.ttl, None);
    let msg = single(&format!("{head}  ttl: 3600\n"), 9, 8, "spec.ttl");
    assert!(msg.starts_with("invalid ttl `3600`: expected a whole number followed by a unit"), "{msg}");
    let msg = single(&format!("{head}  ttl: [1h]\n"), 9, 8, "spec.ttl");
    assert!(msg.starts_with("invalid ttl (a sequence): expected"), "{msg}");
    let msg = single(&format!("{head}  ttl: 1.5h\n"), 9, 8, "spec.ttl");
    assert!(msg.starts_with("invalid ttl `1.5h`"), "{msg}");
    let msg = single(&format!("{head}  ttl: 0s\n"), 9, 8, "spec.ttl");
    assert!(msg.contains("out of range"), "{msg}");
}

#[test]
fn keys_expand_ports() {
    let head = format!(
        "{TP}metadata: {{name: a}}\nspec:\n  priority: 1\n  action: Deny\n  from: {{tenant: acme}}\n"
    );
    let all = tenant(&format!("{head}  to: {{tenant: '*'}}\n"));
    assert_eq!(all.keys(), vec![("acme".to_owned(), "*".to_owned(), None, None)]);
    assert!(all.spec.to.is_any());
    assert_eq!(tenant(&format!("{head}  to: {{tenant: '*'}}\n  ports: []\n")).keys(), all.keys());

    let p = tenant(&format!(
        "{head}  to: {{tenant: payments}}\n  ports:\n  - {{protocol: TCP, port: 443}}\n  - {{protocol: UDP}}\n  \
         - {{port: 443}}\n  - {{protocol: SCTP, port: 9}}\n  - {{}}\n"
    ));
    let k = |proto, port| ("acme".to_owned(), "payments".to_owned(), Some(proto), port);
    // `{port: 443}` is TCP/443 again (listed once); `{}` is every TCP port.
    assert_eq!(
        p.keys(),
        vec![
            k(Protocol::Tcp, Some(443)),
            k(Protocol::Udp, None),
            k(Protocol::Sctp, Some(9)),
            k(Protocol::Tcp, None)
        ]
    );
}

#[test]
fn names_are_unique_per_file_among_tenant_policies() {
    let text = format!(
        "{TP}metadata: {{name: same}}\nspec: {{priority: 1, action: Allow, from: {{tenant: a}}, to: {{tenant: b}}}}\n---\n\
         apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {{name: same}}\n---\n\
         {TP}metadata: {{name: same}}\nspec: {{priority: 2, action: Deny, from: {{tenant: a}}, to: {{tenant: c}}}}\n"
    );
    // The NetworkPolicy of the same name is no conflict; the second TenantPolicy is.
    let msg = single(&text, 12, 18, "metadata.name");
    assert_eq!(msg, "duplicate TenantPolicy `same` (already defined by document #1 at line 1)");
}

#[test]
fn admin_key_conflicts_within_a_file() {
    let text = format!(
        "{TP}metadata: {{name: first}}\nspec: {{priority: 10, action: Allow, from: {{tenant: acme}}, to: {{tenant: payments}}, \
         ports: [{{port: 443}}, {{protocol: UDP, port: 53}}]}}\n---\n\
         {TP}metadata: {{name: second}}\nspec:\n  priority: 20\n  action: Deny\n  from: {{tenant: acme}}\n  \
         to: {{tenant: payments}}\n  ports:\n  - {{protocol: SCTP}}\n  - {{protocol: TCP, port: 443}}\n---\n\
         {TP}metadata: {{name: wildcard}}\nspec: {{priority: 5, action: Deny, from: {{tenant: '*'}}, to: {{tenant: payments}}, \
         ports: [{{port: 443}}]}}\n---\n\
         {TP}metadata: {{name: all-ports}}\nspec: {{priority: 30, action: Pass, from: {{tenant: acme}}, to: {{tenant: payments}}}}\n\
         ---\n{TP}metadata: {{name: all-ports-again}}\nspec:\n  priority: 40\n  action: Allow\n  from: {{tenant: acme}}\n  \
         to: {{tenant: payments}}\n"
    );
    let errs = errors(&text);
    // Overlapping but different keys (`*` vs `acme`, TCP/443 vs everything) are fine. A conflict is
    // reported at the later policy's `ports` entry, or at its `spec` when it has no ports.
    assert_eq!(positions(&errs), vec![(16, 5, "spec.ports[1]"), (32, 3, "spec.ports")], "{errs:#?}");
    assert_eq!(
        errs[0].message,
        "TenantPolicy `second` and TenantPolicy `first` (document #1 at line 1) both produce the admin rule \
         for `acme` -> `payments` (TCP port 443); the data plane holds one admin rule per key"
    );
    assert_eq!(
        errs[1].message,
        "TenantPolicy `all-ports-again` and TenantPolicy `all-ports` (document #4 at line 23) both produce \
         the admin rule for `acme` -> `payments` (all protocols and ports); the data plane holds one admin \
         rule per key"
    );
}

#[test]
fn admin_key_conflicts_across_files() {
    use Protocol::{Sctp, Tcp, Udp};
    let tcp443 = policy("a", "acme", "payments", &[(Tcp, Some(443)), (Udp, None)]);
    let udp_tcp_sctp = policy("b", "acme", "payments", &[(Udp, None), (Tcp, Some(443)), (Sctp, Some(9))]);
    let sctp = policy("c", "acme", "payments", &[(Sctp, Some(9))]);
    let any_source = policy("d", "*", "payments", &[(Tcp, Some(443))]);
    let all_ports = policy("e", "acme", "payments", &[]);
    let reverse = policy("f", "payments", "acme", &[(Tcp, Some(443))]);
    let disjoint = [tcp443.clone(), any_source.clone(), all_ports.clone(), reverse.clone()];
    assert_eq!(tenant_conflicts(&disjoint), Vec::<String>::new());
    assert_eq!(
        tenant_conflicts(&[tcp443, udp_tcp_sctp, sctp, any_source, all_ports.clone(), reverse, all_ports]),
        vec![
            "TenantPolicy `b` and TenantPolicy `a` both produce the admin rules for `acme` -> `payments` \
             (all UDP ports), `acme` -> `payments` (TCP port 443); the data plane holds one admin rule per key",
            "TenantPolicy `c` and TenantPolicy `b` both produce the admin rule for `acme` -> `payments` \
             (SCTP port 9); the data plane holds one admin rule per key",
            "TenantPolicy `e` and TenantPolicy `e` both produce the admin rule for `acme` -> `payments` \
             (all protocols and ports); the data plane holds one admin rule per key",
        ]
    );
}

#[test]
fn validate_hand_built_policies() {
    let mut p = policy("ok", "acme", "*", &[(Protocol::Tcp, Some(0)), (Protocol::Udp, Some(53))]);
    p.metadata.name = String::new();
    p.spec.priority = 5000;
    p.spec.to.tenant = "Payments".to_owned();
    p.spec.ttl = Some(Duration::from_millis(1500));
    let fields: Vec<String> =
        p.validate().into_iter().map(|e| format!("{}: {}", e.field, e.message)).collect();
    assert_eq!(fields.len(), 5, "{fields:#?}");
    assert_eq!(fields[0], "metadata.name: must not be empty");
    assert_eq!(fields[1], "spec.priority: 5000 must be between 0 and 1000, inclusive");
    assert!(fields[2].starts_with("spec.to.tenant: invalid tenant: `Payments`"), "{}", fields[2]);
    assert_eq!(fields[3], "spec.ports[0].port: 0 must be between 1 and 65535, inclusive");
    assert!(
        fields[4].starts_with("spec.ttl: 1.5s is out of range: must be a whole number of seconds"),
        "{}",
        fields[4]
    );

    p.spec.ttl = Some(Duration::from_hours(31 * 24));
    assert!(p.validate()[4].message.contains("between 1s and 30d"));
    assert!(policy("fine", "*", "*", &[]).validate().is_empty());
}

#[test]
fn unreadable_document_is_reported_as_the_kind_it_names() {
    // The duplicate label makes the kind probe fail; the strict pass still reads it as a
    // TenantPolicy (as a NetworkPolicy, `spec.priority` would be the error).
    let text = format!(
        "{TP}spec: {{priority: 1, action: Allow, from: {{tenant: a}}, to: {{tenant: b}}}}\n\
         metadata: {{name: a, labels: {{x: '1', x: '2'}}}}\n"
    );
    let msg = single(&text, 4, 29, "metadata.labels");
    assert!(msg.contains("duplicate key `x`"), "{msg}");
}

#[test]
fn unquoted_wildcard_gets_a_hint() {
    let text = format!(
        "{TP}metadata: {{name: a}}\nspec:\n  priority: 1\n  action: Allow\n  from: {{tenant: *}}\n  to: {{tenant: b}}\n"
    );
    // libyaml reports the character after the `*` (line 7 is "  from: {tenant: *}").
    let msg = single(&text, 7, 19, ".");
    assert!(msg.starts_with("invalid YAML: did not find expected alphabetic or numeric character"), "{msg}");
    assert!(msg.ends_with("(the any-tenant wildcard must be quoted: `tenant: '*'`)"), "{msg}");
    // `parse_file` keeps its message as it was.
    let errs = parse_file(Path::new(FILE), &text).expect_err("invalid YAML");
    assert!(!errs[0].message.contains("wildcard"), "{}", errs[0].message);
}
