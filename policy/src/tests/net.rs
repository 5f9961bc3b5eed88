//! `IpNetwork` and label selector unit tests.

use super::labels;
use crate::{IpNetwork, IpNetworkError, LabelSelector, LabelSelectorOperator, LabelSelectorRequirement};

fn net(s: &str) -> IpNetwork {
    s.parse().expect("valid CIDR")
}

#[test]
fn ip_network_masks_host_bits() {
    assert_eq!(net("10.1.2.3/16"), net("10.1.0.0/16"));
    assert_eq!(net("10.1.2.3/16").to_string(), "10.1.0.0/16");
    assert_eq!(net("10.1.2.3/32").to_string(), "10.1.2.3/32");
    assert_eq!(net("10.1.2.3/0").to_string(), "0.0.0.0/0");
    assert_eq!(net("fd00:1:2:3::9/48").to_string(), "fd00:1:2::/48");
    assert_eq!(net("::/0").to_string(), "::/0");
    assert_eq!(net("2001:db8::1/128").prefix(), 128);
}

#[test]
fn ip_network_contains() {
    let n = net("10.1.0.0/16");
    assert!(n.contains("10.1.255.255".parse().expect("ip")));
    assert!(!n.contains("10.2.0.0".parse().expect("ip")));
    assert!(!n.contains("::ffff:10.1.0.1".parse().expect("ip")), "families never mix");
    assert!(net("0.0.0.0/0").contains("255.255.255.255".parse().expect("ip")));
    assert!(!net("0.0.0.0/0").contains("::1".parse().expect("ip")));
    assert!(net("fd00::/8").contains("fdff::1".parse().expect("ip")));
    assert!(n.contains_net(&net("10.1.2.0/24")));
    assert!(n.contains_net(&n));
    assert!(!n.contains_net(&net("10.0.0.0/8")));
    assert!(!n.contains_net(&net("10.2.0.0/24")));
    assert!(!net("::/0").contains_net(&net("10.0.0.0/8")));
}

#[test]
fn ip_network_rejects_malformed() {
    assert_eq!("10.0.0.0".parse::<IpNetwork>(), Err(IpNetworkError::MissingPrefix("10.0.0.0".into())));
    assert_eq!("10.0.0/8".parse::<IpNetwork>(), Err(IpNetworkError::InvalidAddress("10.0.0".into())));
    assert_eq!(
        "10.0.0.0/33".parse::<IpNetwork>(),
        Err(IpNetworkError::PrefixTooLong { prefix: 33, max: 32 })
    );
    assert_eq!("::/129".parse::<IpNetwork>(), Err(IpNetworkError::PrefixTooLong { prefix: 129, max: 128 }));
    for bad in
        ["10.0.0.0/", "10.0.0.0/+8", "10.0.0.0/ 8", "10.0.0.0/256", "10.0.0.0/8/8", "/8", "010.0.0.0/8"]
    {
        assert!(bad.parse::<IpNetwork>().is_err(), "{bad} must be rejected");
    }
}

fn req(key: &str, operator: LabelSelectorOperator, values: &[&str]) -> LabelSelectorRequirement {
    LabelSelectorRequirement {
        key: key.to_owned(),
        operator,
        values: values.iter().map(|v| (*v).to_owned()).collect(),
    }
}

#[test]
fn label_selector_semantics() {
    use LabelSelectorOperator::{DoesNotExist, Exists, In, NotIn};
    let web = labels(&[("app", "web"), ("tier", "front")]);
    let bare = labels(&[]);
    assert!(LabelSelector::default().matches(&web));
    assert!(LabelSelector::default().matches(&bare));

    let sel = LabelSelector { match_labels: labels(&[("app", "web")]), match_expressions: vec![] };
    assert!(sel.matches(&web));
    assert!(!sel.matches(&bare));

    assert!(req("app", In, &["web", "db"]).matches(&web));
    assert!(!req("app", In, &["db"]).matches(&web));
    assert!(!req("app", In, &["web"]).matches(&bare));
    assert!(!req("app", NotIn, &["web"]).matches(&web));
    assert!(req("app", NotIn, &["db"]).matches(&web));
    assert!(req("app", NotIn, &["web"]).matches(&bare), "NotIn matches an absent key");
    assert!(req("tier", Exists, &[]).matches(&web));
    assert!(!req("tier", Exists, &[]).matches(&bare));
    assert!(req("tier", DoesNotExist, &[]).matches(&bare));
    assert!(!req("tier", DoesNotExist, &[]).matches(&web));

    // matchLabels AND every expression.
    let sel = LabelSelector {
        match_labels: labels(&[("app", "web")]),
        match_expressions: vec![req("tier", In, &["back"])],
    };
    assert!(!sel.matches(&web));
}
