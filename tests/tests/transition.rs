//! Policy changes that touch both tiers, observed after every step of the enforcer's apply:
//! at no step may a flow pass that neither the old nor the new version lets through.
//! Root only (pinned maps, test-run of the real programs).

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
};

use aya::{
    TestRun as _,
    programs::{SchedClassifier, TestRunOptions},
};
use enforcer::{Datapath, Workload};
use enforcer_common::program_names::TC_TO_WORKLOAD;
use ztseg::daemon::{
    config::{Config, identity_of, tenant_of},
    engine::Engine,
};
use ztseg_integration::{TEST_PIN_ROOT, frame, require_root, unique};

const TC_ACT_OK: u32 = 0;

/// v1: an admin Deny (acme → acme, TCP 80) shields a `NetworkPolicy` that lets a reach b:80.
const ADMIN_DENY: &str = "apiVersion: ztseg.io/v1alpha1\nkind: TenantPolicy\nmetadata: {name: no-80}\nspec:\n  priority: 10\n  action: Deny\n  from: {tenant: acme}\n  to: {tenant: acme}\n  ports: [{protocol: TCP, port: 80}]\n";
const ALLOW_A: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-from-a, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  ingress:\n  - from: [{podSelector: {matchLabels: {app: a}}}]\n    ports: [{port: 80}]\n";
/// v2: both gone, b isolated with no ingress allowed.
const ISOLATE_B: &str = "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: b-isolated, namespace: default}\nspec:\n  podSelector: {matchLabels: {app: b}}\n  policyTypes: [Ingress]\n";

fn docs(d: &[(&str, &str)]) -> BTreeMap<String, String> {
    d.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
}

/// Verdict of a SYN a → b:80 at b's ingress check, through test-run.
fn a_to_b_passes(dp: &mut Datapath) -> bool {
    let p: &mut SchedClassifier = dp.program_mut(TC_TO_WORKLOAD).unwrap().try_into().unwrap();
    let frame = frame::tcp4("10.0.0.1", 40000, "10.0.0.2", 80);
    let mut o = TestRunOptions::new();
    o.data_in = Some(&frame);
    p.test_run(o).unwrap().return_value == TC_ACT_OK
}

/// Both versions deny a → b:80 (v1 by the admin Deny, v2 by isolation). Applying the admin
/// tier first would drop the Deny while v1's allow is still in place — a moment in which a
/// reaches b. The enforcer changes admin Denys first, then the tenant tier, then the rest.
#[test]
fn a_change_across_tiers_never_allows_what_neither_version_allows() {
    require_root();
    let dir = std::env::temp_dir().join(unique("ztseg-transition-"));
    std::fs::create_dir_all(dir.join("policies")).unwrap();
    let pin = std::path::Path::new(TEST_PIN_ROOT).join(unique("transition"));
    let _ = Datapath::uninstall(&pin);
    let path = dir.join("enforcer.toml");
    std::fs::write(
        &path,
        format!(
            "node = \"n1\"\npin_dir = \"{pin}\"\npolicy_dir = \"{d}/policies\"\nstate_dir = \"{d}/state\"\n\n\
             [[workloads]]\nname = \"a\"\nlabels = {{ app = \"a\" }}\ntenant = \"acme\"\nnode = \"n2\"\nipv4 = \"10.0.0.1\"\n\n\
             [[workloads]]\nname = \"b\"\nlabels = {{ app = \"b\" }}\ntenant = \"acme\"\ninterface = \"zt-unused\"\nipv4 = \"10.0.0.2\"\n",
            pin = pin.display(),
            d = dir.display()
        ),
    )
    .unwrap();
    let cfg = Config::load(&path, std::iter::empty()).unwrap();
    let mut engine = Engine::open(cfg).unwrap();
    // b's endpoint on interface 1 (where test-run runs the program) and a's identity.
    {
        let acme = tenant_of(Some("acme"));
        let mut w = engine.dp.writer();
        let b = Workload {
            identity: identity_of("default/b"),
            tenant: acme,
            ipv4: Some("10.0.0.2".parse().unwrap()),
            ipv6: None,
            audit: false,
        };
        w.set_interface_workload(1, &b).unwrap();
        w.set_identity("10.0.0.1".parse().unwrap(), identity_of("default/a"), acme).unwrap();
    }

    // Positive control: with only the NetworkPolicy, a reaches b.
    engine.apply_documents(&docs(&[("allow.yaml", ALLOW_A)])).unwrap();
    assert!(a_to_b_passes(&mut engine.dp), "control: the NetworkPolicy alone lets a reach b");
    // v1: the admin Deny shields it.
    engine.apply_documents(&docs(&[("deny.yaml", ADMIN_DENY), ("allow.yaml", ALLOW_A)])).unwrap();
    assert!(!a_to_b_passes(&mut engine.dp), "v1 denies a -> b:80");

    // v2, observed after every step.
    let seen = Arc::new(Mutex::new(Vec::new()));
    let log = seen.clone();
    engine.after_step = Some(Box::new(move |dp, step| {
        log.lock().unwrap().push((step, a_to_b_passes(dp)));
    }));
    engine.apply_documents(&docs(&[("isolate.yaml", ISOLATE_B)])).unwrap();
    let steps = seen.lock().unwrap().clone();
    assert_eq!(steps.iter().map(|s| s.0).collect::<Vec<_>>(), ["admin-deny", "tenant", "admin"]);
    assert!(steps.iter().all(|(_, pass)| !pass), "a reached b during the change: {steps:?}");

    // And back (v2 -> v1): the Deny arrives before the allow.
    seen.lock().unwrap().clear();
    engine.apply_documents(&docs(&[("deny.yaml", ADMIN_DENY), ("allow.yaml", ALLOW_A)])).unwrap();
    let steps = seen.lock().unwrap().clone();
    assert_eq!(steps.len(), 3);
    assert!(steps.iter().all(|(_, pass)| !pass), "a reached b during the change back: {steps:?}");

    drop(engine);
    let _ = Datapath::uninstall(&pin);
    let _ = std::fs::remove_dir_all(&dir);
}
