//! Parsing and validation errors: file, line, column, field path and message.

use std::path::{Path, PathBuf};

use crate::{IntOrString, PolicyError, PolicyType, Protocol, parse_file};

const FILE: &str = "policies/web.yaml";

fn errors(text: &str) -> Vec<PolicyError> {
    match parse_file(Path::new(FILE), text) {
        Ok(p) => panic!("expected errors, parsed {p:#?}"),
        Err(e) => e,
    }
}

/// The single error of `text`, checked for position and field; returns its message.
#[track_caller]
fn single(text: &str, line: usize, column: usize, field: &str) -> String {
    let errs = errors(text);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!(e.file, PathBuf::from(FILE));
    assert_eq!((e.line, e.column, e.field.as_str()), (line, column, field), "{e}");
    e.message.clone()
}

const HEAD: &str =
    "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata:\n  name: web\n  namespace: prod\n";

#[test]
fn parses_a_full_policy() {
    let text = format!(
        "# comment\n---\n{HEAD}spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n  policyTypes: [Ingress, Egress]\n  \
         ingress:\n  - from:\n    - ipBlock: {{cidr: 10.1.2.3/16, except: [10.1.9.0/24]}}\n    ports:\n    - port: 8080\n      \
         endPort: 8090\n    - {{protocol: UDP, port: dns}}\n  egress: []\n---\n---\n"
    );
    let pols = parse_file(Path::new(FILE), &text).expect("valid");
    assert_eq!(pols.len(), 1);
    let p = &pols[0];
    assert_eq!((p.metadata.namespace.as_str(), p.metadata.name.as_str()), ("prod", "web"));
    assert_eq!(p.spec.policy_types, vec![PolicyType::Ingress, PolicyType::Egress]);
    let ports = &p.spec.ingress[0].ports;
    assert_eq!(
        (ports[0].protocol, &ports[0].port, ports[0].end_port),
        (Protocol::Tcp, &Some(IntOrString::Int(8080)), Some(8090))
    );
    assert_eq!(
        (ports[1].protocol, &ports[1].port),
        (Protocol::Udp, &Some(IntOrString::String("dns".into())))
    );
    assert!(p.validate().is_empty());
}

#[test]
fn empty_files_and_documents() {
    assert_eq!(parse_file(Path::new(FILE), ""), Ok(vec![]));
    assert_eq!(parse_file(Path::new(FILE), "---\n# nothing\n---\n...\n"), Ok(vec![]));
}

#[test]
fn display_format() {
    let e = PolicyError {
        file: PathBuf::from("a/b.yaml"),
        line: 3,
        column: 7,
        field: "spec.ingress[0].ports[1].port".into(),
        message: "bad".into(),
    };
    assert_eq!(e.to_string(), "a/b.yaml:3:7: spec.ingress[0].ports[1].port: bad");
}

#[test]
fn unknown_field_typo() {
    let text = format!("{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - from:\n    - podSelecter: {{}}\n");
    // Line 10 is "    - podSelecter: {}"; the key starts at column 7.
    let msg = single(&text, 10, 7, "spec.ingress[0].from[0].podSelecter");
    assert!(msg.starts_with("unknown field `podSelecter`, expected one of"), "{msg}");

    let text = format!("{HEAD}spec:\n  podSelector: {{}}\n  polcyTypes: [Egress]\n");
    let msg = single(&text, 8, 3, "spec.polcyTypes");
    assert!(msg.contains("unknown field `polcyTypes`"), "{msg}");

    let text = format!("{HEAD}  nmae: x\nspec: {{}}\n");
    let msg = single(&text, 6, 3, "metadata.nmae");
    assert!(msg.contains("unknown field `nmae`"), "{msg}");
}

#[test]
fn exported_metadata_fields_are_accepted() {
    let text = format!(
        "{HEAD}  uid: 1234\n  resourceVersion: '5'\n  creationTimestamp: null\n  labels: {{team: a}}\nspec: {{}}\n"
    );
    let pols = parse_file(Path::new(FILE), &text).expect("valid");
    assert_eq!(pols[0].metadata.labels.get("team").map(String::as_str), Some("a"));
}

#[test]
fn bad_cidr() {
    let text = format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  egress:\n  - to:\n    - ipBlock:\n        cidr: 10.0.0.0/33\n"
    );
    // Line 11 is "        cidr: 10.0.0.0/33"; the value starts at column 15.
    let msg = single(&text, 11, 15, "spec.egress[0].to[0].ipBlock.cidr");
    assert!(msg.contains("10.0.0.0/33") && msg.contains("prefix length 33"), "{msg}");

    let text = format!("{HEAD}spec:\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0.1/8}}\n");
    let msg = single(&text, 9, 23, "spec.ingress[0].from[0].ipBlock.cidr");
    assert!(msg.contains("not a valid IP address"), "{msg}");
}

#[test]
fn except_must_be_strict_subset_of_cidr() {
    let text = format!(
        "{HEAD}spec:\n  ingress:\n  - from:\n    - ipBlock:\n        cidr: 10.1.2.3/16\n        except:\n        \
         - 10.1.7.0/24\n        - 10.2.0.0/24\n        - 10.1.0.0/16\n        - fd00::/64\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (13, 11, "spec.ingress[0].from[0].ipBlock.except[1]"),
            (14, 11, "spec.ingress[0].from[0].ipBlock.except[2]"),
            (15, 11, "spec.ingress[0].from[0].ipBlock.except[3]"),
        ]
    );
    assert!(errs[0].message.contains("strict subset of cidr `10.1.0.0/16`"), "{}", errs[0].message);
}

#[test]
fn end_port_checks() {
    let text = format!("{HEAD}spec:\n  ingress:\n  - ports:\n    - port: 8080\n      endPort: 80\n");
    let msg = single(&text, 10, 16, "spec.ingress[0].ports[0].endPort");
    assert!(msg.contains("greater than or equal to `port` (8080)"), "{msg}");

    let text = format!("{HEAD}spec:\n  ingress:\n  - ports:\n    - endPort: 80\n");
    let msg = single(&text, 9, 16, "spec.ingress[0].ports[0].endPort");
    assert!(msg.contains("`port` is not specified"), "{msg}");

    let text = format!("{HEAD}spec:\n  egress:\n  - ports:\n    - port: http\n      endPort: 90\n");
    let msg = single(&text, 10, 16, "spec.egress[0].ports[0].endPort");
    assert!(msg.contains("named port"), "{msg}");
}

#[test]
fn port_numbers_and_names() {
    let text = format!(
        "{HEAD}spec:\n  ingress:\n  - ports:\n    - port: 0\n    - port: 65536\n    - port: 80\n      endPort: 70000\n    \
         - port: '80'\n    - port: Http\n    - port: 2147483648\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    // Deserialization stops at the out-of-i32 port; it is the only error of the document.
    assert_eq!(got, vec![(15, 13, "spec.ingress[0].ports[5].port")], "{errs:#?}");

    let text = format!(
        "{HEAD}spec:\n  ingress:\n  - ports:\n    - port: 0\n    - port: 65536\n    - port: 80\n      endPort: 70000\n    \
         - port: '80'\n    - port: Http\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (9, 13, "spec.ingress[0].ports[0].port"),
            (10, 13, "spec.ingress[0].ports[1].port"),
            (12, 16, "spec.ingress[0].ports[2].endPort"),
            (13, 13, "spec.ingress[0].ports[3].port"),
            (14, 13, "spec.ingress[0].ports[4].port"),
        ],
        "{errs:#?}"
    );
    assert!(errs[3].message.contains("at least one letter"), "{}", errs[3].message);
}

#[test]
fn wrong_kind_names_the_document() {
    let text = format!(
        "{HEAD}spec: {{}}\n---\napiVersion: v1\nkind: Service\nmetadata:\n  name: web\nspec:\n  ports: [{{port: 80}}]\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(got, vec![(8, 13, "apiVersion"), (9, 7, "kind")], "{errs:#?}");
    assert_eq!(errs[1].message, "document #2 (`web`): kind must be `NetworkPolicy`, found `Service`");
    assert_eq!(
        errs[0].to_string(),
        "policies/web.yaml:8:13: apiVersion: document #2 (`web`): apiVersion must be \
         `networking.k8s.io/v1`, found `v1`"
    );

    let msg = single("kind: NetworkPolicy\nmetadata: {name: a}\n", 1, 1, "apiVersion");
    assert_eq!(msg, "document #1 (`a`): missing apiVersion, expected `networking.k8s.io/v1`");
}

#[test]
fn in_with_empty_values() {
    let text = format!(
        "{HEAD}spec:\n  podSelector:\n    matchExpressions:\n    - key: tier\n      operator: In\n      values: []\n"
    );
    let msg = single(&text, 11, 15, "spec.podSelector.matchExpressions[0].values");
    assert_eq!(msg, "must be non-empty when `operator` is In");

    // Absent `values`: the error points at the requirement itself.
    let text = format!(
        "{HEAD}spec:\n  ingress:\n  - from:\n    - namespaceSelector:\n        matchExpressions:\n        \
         - {{key: env, operator: NotIn}}\n"
    );
    let msg = single(&text, 11, 11, "spec.ingress[0].from[0].namespaceSelector.matchExpressions[0].values");
    assert_eq!(msg, "must be non-empty when `operator` is NotIn");
}

#[test]
fn selector_operator_and_values() {
    let text = format!(
        "{HEAD}spec:\n  podSelector:\n    matchExpressions:\n    - {{key: tier, operator: Exists, values: [a]}}\n    \
         - {{key: 'bad key', operator: DoesNotExist}}\n    - {{key: tier, operator: In, values: ['not valid']}}\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (9, 45, "spec.podSelector.matchExpressions[0].values"),
            (10, 13, "spec.podSelector.matchExpressions[1].key"),
            (11, 42, "spec.podSelector.matchExpressions[2].values[0]"),
        ],
        "{errs:#?}"
    );

    let text = format!(
        "{HEAD}spec:\n  podSelector:\n    matchExpressions:\n    - {{key: tier, operator: Equals}}\n"
    );
    let msg = single(&text, 9, 29, "spec.podSelector.matchExpressions[0].operator");
    assert!(msg.contains("unknown variant `Equals`"), "{msg}");
}

#[test]
fn unknown_policy_type() {
    let text = format!("{HEAD}spec:\n  policyTypes:\n  - Ingress\n  - egress\n");
    let msg = single(&text, 9, 5, "spec.policyTypes[1]");
    assert!(msg.contains("unknown variant `egress`, expected `Ingress` or `Egress`"), "{msg}");
}

#[test]
fn invalid_peers() {
    let text = format!(
        "{HEAD}spec:\n  ingress:\n  - from:\n    - ipBlock: {{cidr: 10.0.0.0/8}}\n      podSelector: {{}}\n    - {{}}\n    \
         - podSelector: null\n"
    );
    let errs = errors(&text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (9, 7, "spec.ingress[0].from[0]"),
            (11, 7, "spec.ingress[0].from[1]"),
            (12, 7, "spec.ingress[0].from[2]")
        ],
        "{errs:#?}"
    );
    assert_eq!(errs[0].message, "may not specify both ipBlock and another peer");
    assert!(errs[1].message.starts_with("must specify a peer"));
}

#[test]
fn duplicates_and_names() {
    // Duplicate label key, duplicate policy, invalid names: all reported, across documents.
    let text = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: a}\n\
                spec: {podSelector: {matchLabels: {app: x, app: y}}}\n---\n\
                apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b}\n---\n\
                apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b, namespace: default}\n---\n\
                apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: Bad_Name, namespace: 'x y'}\n";
    let errs = errors(text);
    let got: Vec<(usize, usize, &str)> = errs.iter().map(|e| (e.line, e.column, e.field.as_str())).collect();
    assert_eq!(
        got,
        vec![
            (4, 35, "spec.podSelector.matchLabels"),
            (12, 18, "metadata.name"),
            (16, 18, "metadata.name"),
            (16, 39, "metadata.namespace"),
        ],
        "{errs:#?}"
    );
    assert!(errs[0].message.contains("duplicate key `app`"), "{}", errs[0].message);
    assert!(errs[1].message.contains("duplicate NetworkPolicy `default/b`"), "{}", errs[1].message);
}

#[test]
fn yaml_syntax_error_stops_the_scan_but_keeps_earlier_errors() {
    let text = format!("{HEAD}spec: {{podSelector: {{}}, bogus: 1}}\n---\nkind: [unclosed\n---\n{HEAD}\n");
    let errs = errors(&text);
    assert_eq!(errs.len(), 2, "{errs:#?}");
    assert_eq!((errs[0].line, errs[0].field.as_str()), (6, "spec.bogus"));
    assert_eq!((errs[1].line, errs[1].field.as_str()), (9, "."));
    assert!(errs[1].message.starts_with("invalid YAML"), "{}", errs[1].message);
}

#[test]
fn type_errors_are_located() {
    let text = format!("{HEAD}spec:\n  ingress:\n  - ports:\n    - protocol: tcp\n");
    let msg = single(&text, 9, 17, "spec.ingress[0].ports[0].protocol");
    assert!(msg.contains("unknown variant `tcp`"), "{msg}");

    let text = format!("{HEAD}spec:\n  podSelector:\n    matchLabels:\n      app: [web]\n");
    let msg = single(&text, 9, 12, "spec.podSelector.matchLabels.app");
    assert!(msg.contains("invalid type: sequence, expected a string"), "{msg}");

    let text = format!("{HEAD}spec:\n  ingress:\n  - ports:\n    - port: 8.5\n");
    let msg = single(&text, 9, 13, "spec.ingress[0].ports[0].port");
    assert!(msg.contains("expected a port number or a port name"), "{msg}");

    let msg = single("- a\n- b\n", 1, 1, ".");
    assert!(msg.contains("invalid type: sequence"), "{msg}");
}

#[test]
fn every_error_of_a_document_is_reported() {
    let text = format!(
        "{HEAD}spec:\n  podSelector:\n    matchExpressions: [{{key: a, operator: In}}]\n  policyTypes: [Ingress, Egress, Ingress]\n  \
         ingress:\n  - from:\n    - ipBlock: {{cidr: nope}}\n    ports:\n    - port: 0\n  egress:\n  - to:\n    - {{}}\n"
    );
    let errs = errors(&text);
    let fields: Vec<&str> = errs.iter().map(|e| e.field.as_str()).collect();
    assert_eq!(
        fields,
        vec![
            "spec.podSelector.matchExpressions[0].values",
            "spec.policyTypes",
            "spec.ingress[0].from[0].ipBlock.cidr",
            "spec.ingress[0].ports[0].port",
            "spec.egress[0].to[0]",
        ],
        "{errs:#?}"
    );
}

// ---- policy sets ---------------------------------------------------------------------------------

const TENANT: &str = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\n";

fn set_errors(files: &[(&str, &str)]) -> Vec<PolicyError> {
    match crate::parse_set(files.iter().map(|(f, t)| (Path::new(*f), *t))) {
        Ok(p) => panic!("expected errors, parsed {p:#?}"),
        Err(e) => e,
    }
}

#[test]
fn a_set_refuses_a_network_policy_defined_in_two_files() {
    let policy = format!("{HEAD}spec:\n  podSelector: {{}}\n");
    let other = format!("{HEAD}spec:\n  podSelector: {{matchLabels: {{app: web}}}}\n");
    let errs = set_errors(&[("a.yaml", &policy), ("b.yaml", &format!("# b\n---\n{other}"))]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!((e.file.as_path(), e.line, e.column), (Path::new("b.yaml"), 6, 9), "{e}");
    assert_eq!(e.field, "metadata.name");
    assert!(
        e.message.contains("duplicate NetworkPolicy `prod/web`") && e.message.contains("a.yaml:1"),
        "{e}"
    );
    // The same name in another namespace is another policy.
    let elsewhere = policy.replace("namespace: prod", "namespace: dev");
    assert_eq!(
        crate::parse_set([(Path::new("a.yaml"), policy.as_str()), (Path::new("b.yaml"), elsewhere.as_str())])
            .map(|d| d.len()),
        Ok(2)
    );
}

#[test]
fn a_set_refuses_tenant_policies_of_two_files_with_one_admin_key() {
    let tp = |name: &str, action: &str| {
        format!(
            "{TENANT}metadata: {{name: {name}}}\nspec:\n  priority: 10\n  action: {action}\n  from: {{tenant: acme}}\n  \
             to: {{tenant: globex}}\n  ports:\n  - {{protocol: UDP}}\n  - {{protocol: TCP, port: 443}}\n"
        )
    };
    let errs = set_errors(&[("a.yaml", &tp("allow-web", "Allow")), ("b.yaml", &tp("deny-web", "Deny"))]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    let e = &errs[0];
    assert_eq!((e.file.as_path(), e.field.as_str()), (Path::new("b.yaml"), "spec.ports[0]"), "{e}");
    assert_eq!((e.line, e.column), (10, 5), "{e}");
    assert!(
        e.message.contains("`deny-web`") && e.message.contains("`allow-web` (a.yaml:1)"),
        "names both policies and where the first is: {e}"
    );
}

#[test]
fn a_set_accepts_every_valid_port_range() {
    let range = |from: u32, to: u32| {
        format!(
            "{HEAD}spec:\n  podSelector: {{}}\n  egress:\n  - ports:\n    - {{port: 53}}\n    - port: {from}\n      \
             endPort: {to}\n"
        )
    };
    for (from, to) in [(1024, 65_535), (1, 65_535), (1000, 5096), (8080, 8080)] {
        let text = range(from, to);
        assert!(crate::parse_set([(Path::new("p.yaml"), text.as_str())]).is_ok(), "{from}-{to}");
    }
    let errs = set_errors(&[("p.yaml", &range(2000, 1999))]);
    assert_eq!(errs.len(), 1, "{errs:#?}");
    assert_eq!(errs[0].field, "spec.egress[0].ports[1].endPort", "{}", errs[0]);
}

#[test]
fn a_set_reports_every_file() {
    let bad = format!("{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{port: 70000}}\n");
    let wide = format!(
        "{HEAD}spec:\n  podSelector: {{}}\n  ingress:\n  - ports:\n    - {{port: 9000, endPort: 2}}\n"
    )
    .replace("name: web", "name: api");
    let errs = set_errors(&[("a.yaml", &bad), ("b.yaml", &wide)]);
    let files: Vec<&Path> = errs.iter().map(|e| e.file.as_path()).collect();
    assert_eq!(files, [Path::new("a.yaml"), Path::new("b.yaml")], "{errs:#?}");
}
