//! Prometheus metrics and health endpoints over plain HTTP/1.1: `/metrics`, `/healthz`
//! (the daemon is running), `/readyz` (programs attached and policy loaded).

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    sync::{Arc, Mutex},
    time::Duration,
};

use enforcer_common::{
    Reason,
    map_names::{ADMIN, CIDR, CONNTRACK4, CONNTRACK6, IDENTITY, RANGES},
};
use tokio::net::TcpListener;

use super::engine::Engine;

/// Upper bounds (seconds) of the API latency histogram buckets.
const BUCKETS: [f64; 10] = [0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1.0];

#[derive(Default, Debug)]
struct Histogram {
    buckets: [u64; BUCKETS.len()],
    sum: f64,
    count: u64,
}

/// Counters the daemon keeps itself (kernel counters are read at scrape time).
#[derive(Default, Debug)]
pub struct Metrics {
    /// (workload, tenant, verdict, reason) → flow events.
    flows: Mutex<BTreeMap<(String, String, String, String), u64>>,
    api: Mutex<BTreeMap<String, Histogram>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Metrics {
    pub fn flow(&self, workload: &str, tenant: &str, verdict: &str, reason: &str) {
        *lock(&self.flows)
            .entry((workload.into(), tenant.into(), verdict.into(), reason.into()))
            .or_default() += 1;
    }

    pub fn api(&self, method: &str, took: Duration) {
        let s = took.as_secs_f64();
        let mut h = lock(&self.api);
        let e = h.entry(method.into()).or_default();
        for (i, b) in BUCKETS.iter().enumerate() {
            if s <= *b {
                e.buckets[i] += 1;
            }
        }
        e.sum += s;
        e.count += 1;
    }

    /// Kernel counters, flow events and map pressure.
    fn render_data_plane(&self, out: &mut String, engine: &Engine) {
        let w = engine.dp.writer();
        let _ =
            writeln!(out, "# HELP ztseg_packets_total Packets by data-plane verdict reason (all workloads).");
        let _ = writeln!(out, "# TYPE ztseg_packets_total counter");
        if let Ok(c) = w.counters() {
            for r in Reason::ALL {
                if matches!(
                    r,
                    Reason::EventLost
                        | Reason::LocalDelivery
                        | Reason::EventSuppressed
                        | Reason::HandoffReparsed
                ) {
                    continue;
                }
                let _ = writeln!(out, "ztseg_packets_total{{reason=\"{}\"}} {}", r.name(), c[&r]);
            }
            let _ = writeln!(out, "# HELP ztseg_events_lost_total Events the ring buffer could not take.");
            let _ = writeln!(out, "# TYPE ztseg_events_lost_total counter");
            let _ = writeln!(out, "ztseg_events_lost_total {}", c[&Reason::EventLost]);
            let _ = writeln!(
                out,
                "# HELP ztseg_events_suppressed_total Events not emitted: their CPU was over event_rate_limit."
            );
            let _ = writeln!(out, "# TYPE ztseg_events_suppressed_total counter");
            let _ = writeln!(out, "ztseg_events_suppressed_total {}", c[&Reason::EventSuppressed]);
            let _ = writeln!(
                out,
                "# HELP ztseg_local_deliveries_total Packets between local workloads handed straight to the receiver's namespace."
            );
            let _ = writeln!(out, "# TYPE ztseg_local_deliveries_total counter");
            let _ = writeln!(out, "ztseg_local_deliveries_total {}", c[&Reason::LocalDelivery]);
            let _ = writeln!(
                out,
                "# HELP ztseg_handoff_reparsed_total Local deliveries that parsed a packet again (never expected)."
            );
            let _ = writeln!(out, "# TYPE ztseg_handoff_reparsed_total counter");
            let _ = writeln!(out, "ztseg_handoff_reparsed_total {}", c[&Reason::HandoffReparsed]);
        }
        let _ = writeln!(
            out,
            "# HELP ztseg_flow_events_total Drops, audits and new allowed flows by workload, tenant, verdict and reason \
             (events read plus events the kernel counted instead of emitting, over event_rate_limit)."
        );
        let _ = writeln!(out, "# TYPE ztseg_flow_events_total counter");
        let mut flows = lock(&self.flows).clone();
        for ((id, verdict, reason), n) in w.suppressed().unwrap_or_default() {
            let key = (
                engine.workload_name(id).unwrap_or_else(|| format!("identity:{id}")),
                engine.tenant_name(id).unwrap_or_default(),
                verdict.name().to_owned(),
                reason.name().to_owned(),
            );
            *flows.entry(key).or_default() += n;
        }
        for ((wl, t, v, r), n) in &flows {
            let _ = writeln!(
                out,
                "ztseg_flow_events_total{{workload=\"{wl}\",tenant=\"{t}\",verdict=\"{v}\",reason=\"{r}\"}} {n}"
            );
        }
        let _ = writeln!(out, "# HELP ztseg_map_entries Entries in use per map.");
        let _ = writeln!(out, "# TYPE ztseg_map_entries gauge");
        let _ = writeln!(out, "# HELP ztseg_map_capacity Capacity per map.");
        let _ = writeln!(out, "# TYPE ztseg_map_capacity gauge");
        let (slots, slot_cap) = w.slots();
        let ct = w.conntrack_len();
        let cap =
            |maps: &[&'static str]| maps.iter().map(|m| engine.dp.map_capacity(m).map_or(0, u64::from)).sum();
        for (map, used, cap) in [
            ("policy", w.policy_len() as u64, u64::from(w.policy_capacity())),
            ("rules", u64::from(slots), u64::from(slot_cap)),
            ("conntrack", ct as u64, cap(&[CONNTRACK4, CONNTRACK6])),
            ("admin", w.admin_len() as u64, cap(&[ADMIN])),
            ("ranges", w.ranges_len() as u64, cap(&[RANGES])),
            ("identity", w.identity_len() as u64, cap(&[IDENTITY])),
            ("cidr", w.cidr_len() as u64, cap(&[CIDR])),
        ] {
            let _ = writeln!(out, "ztseg_map_entries{{map=\"{map}\"}} {used}");
            if cap > 0 {
                let _ = writeln!(out, "ztseg_map_capacity{{map=\"{map}\"}} {cap}");
            }
        }
    }

    /// Prometheus text exposition.
    pub fn render(&self, engine: &Engine) -> String {
        let mut out = String::new();
        self.render_data_plane(&mut out, engine);
        let _ = writeln!(out, "# HELP ztseg_active_grants Grants currently installed.");
        let _ = writeln!(out, "# TYPE ztseg_active_grants gauge");
        let _ = writeln!(out, "ztseg_active_grants {}", engine.grants().len());
        let _ = writeln!(out, "# HELP ztseg_policy_version Policy versions applied since start.");
        let _ = writeln!(out, "# TYPE ztseg_policy_version gauge");
        let _ = writeln!(out, "ztseg_policy_version {}", engine.policy_version);
        if engine.cfg.controller.is_some() {
            let _ =
                writeln!(out, "# HELP ztseg_controller_policy_version Controller policy version enforced.");
            let _ = writeln!(out, "# TYPE ztseg_controller_policy_version gauge");
            let _ = writeln!(out, "ztseg_controller_policy_version {}", engine.enforced_controller_version());
            let _ = writeln!(out, "# HELP ztseg_controller_connected 1 while the controller session is up.");
            let _ = writeln!(out, "# TYPE ztseg_controller_connected gauge");
            let _ = writeln!(out, "ztseg_controller_connected {}", u8::from(engine.controller_connected));
            let _ = writeln!(
                out,
                "# HELP ztseg_policy_stale 1 while the controller is unreachable and the last-known policy is enforced."
            );
            let _ = writeln!(out, "# TYPE ztseg_policy_stale gauge");
            let _ = writeln!(out, "ztseg_policy_stale {}", u8::from(engine.policy_stale()));
            if let Some((snapshot, base)) = engine.controller_last_update {
                let _ = writeln!(
                    out,
                    "# HELP ztseg_controller_last_update_snapshot 1 if the last policy update from the controller was a full snapshot, 0 if a delta."
                );
                let _ = writeln!(out, "# TYPE ztseg_controller_last_update_snapshot gauge");
                let _ = writeln!(out, "ztseg_controller_last_update_snapshot {}", u8::from(snapshot));
                let _ = writeln!(
                    out,
                    "# HELP ztseg_controller_last_update_base_version Version the last delta from the controller applied to (0 for a snapshot)."
                );
                let _ = writeln!(out, "# TYPE ztseg_controller_last_update_base_version gauge");
                let _ = writeln!(out, "ztseg_controller_last_update_base_version {base}");
            }
        }
        let _ = writeln!(out, "# HELP ztseg_policy_load_errors_total Policy loads rejected.");
        let _ = writeln!(out, "# TYPE ztseg_policy_load_errors_total counter");
        let _ = writeln!(out, "ztseg_policy_load_errors_total {}", engine.policy_load_errors);
        let _ = writeln!(out, "# HELP ztseg_ready 1 once programs are attached and policy is loaded.");
        let _ = writeln!(out, "# TYPE ztseg_ready gauge");
        let _ = writeln!(out, "ztseg_ready {}", u8::from(engine.ready()));
        let _ = writeln!(out, "# HELP ztseg_api_request_duration_seconds Local API latency by method.");
        let _ = writeln!(out, "# TYPE ztseg_api_request_duration_seconds histogram");
        for (m, h) in lock(&self.api).iter() {
            for (i, b) in BUCKETS.iter().enumerate() {
                let _ = writeln!(
                    out,
                    "ztseg_api_request_duration_seconds_bucket{{method=\"{m}\",le=\"{b}\"}} {}",
                    h.buckets[i]
                );
            }
            let _ = writeln!(
                out,
                "ztseg_api_request_duration_seconds_bucket{{method=\"{m}\",le=\"+Inf\"}} {}",
                h.count
            );
            let _ = writeln!(out, "ztseg_api_request_duration_seconds_sum{{method=\"{m}\"}} {}", h.sum);
            let _ = writeln!(out, "ztseg_api_request_duration_seconds_count{{method=\"{m}\"}} {}", h.count);
        }
        out
    }
}

/// Serve `/metrics`, `/healthz` and `/readyz` until the process ends.
pub async fn serve(listener: TcpListener, engine: Arc<Mutex<Engine>>, metrics: Arc<Metrics>) {
    use ztseg_controller::http::Reply;
    ztseg_controller::http::serve(listener, move |path: String| {
        let (engine, metrics) = (engine.clone(), metrics.clone());
        async move {
            match path.as_str() {
                "/metrics" => Reply::metrics(metrics.render(&lock(&engine))),
                "/healthz" => Reply::text("200 OK", "ok"),
                "/readyz" => Reply::ready(lock(&engine).ready()),
                _ => Reply::not_found(),
            }
        }
    })
    .await;
}
