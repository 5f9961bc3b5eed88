//! Prometheus metrics of the controller (`controller run --metrics-addr`), read from the store
//! and the running services at scrape time.

use std::fmt::Write as _;

use crate::service::Ctl;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// The text exposition. Store reads that fail leave their metrics out and set
/// `ztseg_controller_store_up 0`.
pub async fn render(ctl: &Ctl) -> String {
    let mut out = String::new();
    let store = &ctl.store;
    let head = store.head().await;
    let oldest = store.oldest_version().await;
    let audit = store.audit_head().await;
    let enforcers = store.enforcers().await;
    let up = head.is_ok() && audit.is_ok() && enforcers.is_ok();
    header(&mut out, "ztseg_controller_store_up", "gauge", "1 while the store answers.");
    let _ = writeln!(out, "ztseg_controller_store_up {}", u8::from(up));
    header(&mut out, "ztseg_controller_leader", "gauge", "1 while this controller holds leadership.");
    let _ = writeln!(out, "ztseg_controller_leader {}", u8::from(*store.leadership().borrow()));
    if let Ok(h) = head {
        header(&mut out, "ztseg_controller_policy_version", "gauge", "Current policy version.");
        let _ = writeln!(out, "ztseg_controller_policy_version {h}");
        if let Ok(o) = oldest {
            header(
                &mut out,
                "ztseg_controller_policy_oldest_version",
                "gauge",
                "Oldest kept policy version.",
            );
            let _ = writeln!(out, "ztseg_controller_policy_oldest_version {o}");
        }
        if let Ok(es) = &enforcers {
            render_enforcers(&mut out, es, h);
        }
    }
    if let Ok(a) = audit {
        header(
            &mut out,
            "ztseg_controller_audit_last_seq",
            "gauge",
            "Sequence number of the last audit record.",
        );
        let _ = writeln!(out, "ztseg_controller_audit_last_seq {}", a.seq);
        header(
            &mut out,
            "ztseg_controller_siem_lag_records",
            "gauge",
            "Audit records not yet exported, per SIEM sink.",
        );
        for (sink, done) in ctl.siem_progress().await.unwrap_or_default() {
            let _ = writeln!(
                out,
                "ztseg_controller_siem_lag_records{{sink=\"{sink}\"}} {}",
                a.seq.saturating_sub(done)
            );
        }
    }
    header(
        &mut out,
        "ztseg_controller_subscriptions",
        "gauge",
        "Open policy streams (Distribution/Subscribe).",
    );
    let _ = writeln!(out, "ztseg_controller_subscriptions {}", ctl.subscriptions());
    header(
        &mut out,
        "ztseg_controller_rpc_requests_total",
        "counter",
        "Calls by RPC; outcome denied: no valid certificate or a role that may not call it.",
    );
    for ((rpc, ok), n) in ctl.rpc_calls() {
        let outcome = if ok { "allowed" } else { "denied" };
        let _ =
            writeln!(out, "ztseg_controller_rpc_requests_total{{rpc=\"{rpc}\",outcome=\"{outcome}\"}} {n}");
    }
    out
}

/// Enforcers by state and each one's version and report age.
fn render_enforcers(out: &mut String, es: &[crate::store::EnforcerRecord], h: u64) {
    header(
        out,
        "ztseg_controller_enforcers",
        "gauge",
        "Registered enforcers: in_sync (enforcing the current version), behind, error (policy rejected).",
    );
    let error = es.iter().filter(|e| !e.policy_error.is_empty()).count();
    let in_sync = es.iter().filter(|e| e.policy_error.is_empty() && e.enforced_version == h).count();
    let behind = es.len() - error - in_sync;
    for (state, n) in [("in_sync", in_sync), ("behind", behind), ("error", error)] {
        let _ = writeln!(out, "ztseg_controller_enforcers{{state=\"{state}\"}} {n}");
    }
    header(out, "ztseg_controller_enforcer_policy_version", "gauge", "Version each enforcer enforces.");
    for e in es {
        let _ = writeln!(
            out,
            "ztseg_controller_enforcer_policy_version{{enforcer=\"{}\"}} {}",
            e.name, e.enforced_version
        );
    }
    header(
        out,
        "ztseg_controller_enforcer_last_seen_seconds",
        "gauge",
        "Seconds since each enforcer last reported.",
    );
    let now = crate::now_ms();
    for e in es {
        #[expect(clippy::cast_precision_loss, reason = "milliseconds of age, far below 2^52")]
        let age = (now - e.last_seen_ms).max(0) as f64 / 1000.0;
        let _ = writeln!(out, "ztseg_controller_enforcer_last_seen_seconds{{enforcer=\"{}\"}} {age}", e.name);
    }
}
