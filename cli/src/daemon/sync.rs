//! Controller session of the enforcer (controller mode).
//!
//! Subscribes with the version it enforces and receives a snapshot or a delta, then one
//! delta per new version. Each update becomes a complete document set that the engine applies
//! make-before-break and persists; the enforced version is reported back. When the controller
//! is unreachable the last-known policy stays in force and status/metrics show it as stale;
//! the session reconnects with backoff and resumes from its version. Denied flows seen in the
//! kernel are folded per second and forwarded to the controller's audit log.

use std::{
    collections::BTreeMap,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use tokio::sync::broadcast;
use ztseg_api::{controller as pb, enforcer::FlowEvent};

use super::{config::ControllerConfig, engine::Engine, log};

fn lock(e: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Run the controller session forever.
pub async fn run(
    cfg: ControllerConfig,
    node: String,
    engine: Arc<Mutex<Engine>>,
    flows: broadcast::Sender<FlowEvent>,
) {
    let files = ztseg_controller::pki::ClientFiles::in_dir(
        &cfg.identity_dir,
        cfg.identity.as_deref().unwrap_or(&node),
    );
    let mut backoff = Duration::from_millis(200);
    loop {
        let started = Instant::now();
        let flows_rx = cfg.report_denied.then(|| flows.subscribe());
        match session(&cfg, &files, &engine, flows_rx).await {
            Ok(()) => {}
            Err(e) => log::error(
                "controller session ended; the last-known policy stays in force",
                &[("endpoint", &cfg.endpoint), ("error", &format!("{e:#}"))],
            ),
        }
        lock(&engine).controller_connected = false;
        if started.elapsed() > Duration::from_secs(10) {
            backoff = Duration::from_millis(200);
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(2));
    }
}

/// How often a running session checks whether its certificate is due for renewal.
const RENEWAL_CHECK: Duration = Duration::from_mins(1);

fn due(files: &ztseg_controller::pki::ClientFiles) -> Result<bool> {
    files.recover()?;
    let pem =
        std::fs::read_to_string(&files.cert).with_context(|| format!("reading {}", files.cert.display()))?;
    let now = i64::try_from(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs())?;
    ztseg_controller::pki::needs_renewal(&pem, now)
}

/// Renew the enforcer's certificate (new key, same identity) when a third of its lifetime is
/// left. A failure is logged and the current certificate used while it is valid.
async fn renew_if_due(cfg: &ControllerConfig, files: &ztseg_controller::pki::ClientFiles) -> Result<()> {
    if !due(files)? {
        return Ok(());
    }
    match ztseg_controller::server::renew(&cfg.endpoint, files).await {
        Ok(id) => log::info("certificate renewed", &[("identity", &id)]),
        Err(e) => log::error("certificate renewal failed", &[("error", &format!("{e:#}"))]),
    }
    Ok(())
}

/// Distinct denied flows held between reports; beyond this they are counted and logged.
const MAX_PENDING_DENIED: usize = 50_000;

/// Fold key of a denied flow.
type FlowKey = (String, String, String, String, String, String, u32, String, String);

async fn session(
    cfg: &ControllerConfig,
    files: &ztseg_controller::pki::ClientFiles,
    engine: &Arc<Mutex<Engine>>,
    mut flows: Option<broadcast::Receiver<FlowEvent>>,
) -> Result<()> {
    renew_if_due(cfg, files).await?;
    let ch = ztseg_controller::server::connect(&cfg.endpoint, files).await?;
    let mut client = pb::distribution_client::DistributionClient::new(ch)
        .max_decoding_message_size(256 << 20)
        .max_encoding_message_size(64 << 20);
    let (from, history) = {
        let e = lock(engine);
        (e.controller.version, e.controller.history.clone())
    };
    let mut stream = client
        .subscribe(pb::SubscribeRequest { from_version: from, history })
        .await
        .map_err(|s| anyhow::anyhow!("subscribe refused ({:?}): {}", s.code(), s.message()))?
        .into_inner();
    {
        let mut e = lock(engine);
        e.controller_connected = true;
        e.controller_last_contact = Some(Instant::now());
    }
    log::info("controller connected", &[("endpoint", &cfg.endpoint), ("from_version", &from.to_string())]);
    report(&mut client, engine, Vec::new()).await?;
    let mut denied: BTreeMap<FlowKey, (i64, u32)> = BTreeMap::new();
    // Distinct denied flows not yet reported that were dropped because too many were pending.
    let mut overflow: u64 = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_report = Instant::now();
    let mut renewal_check = Instant::now();
    loop {
        tokio::select! {
            msg = stream.message() => {
                let u = msg.map_err(|s| anyhow::anyhow!("policy stream: {}", s.message()))?
                    .context("the controller closed the policy stream")?;
                apply_update(engine, u).await?;
                report(&mut client, engine, Vec::new()).await?;
                last_report = Instant::now();
            }
            ev = async { match flows.as_mut() { Some(f) => f.recv().await, None => std::future::pending().await } } => {
                match ev {
                    Ok(ev) if ev.verdict == "DROP" => {
                        let k = (ev.workload, ev.peer, ev.tenant, ev.direction, ev.src, ev.dst, ev.dport, ev.protocol, ev.reason);
                        if let Some(e) = denied.get_mut(&k) {
                            e.1 = e.1.saturating_add(1);
                        } else if denied.len() < MAX_PENDING_DENIED {
                            denied.insert(k, (ztseg_controller::now_ms(), 1));
                        } else {
                            overflow += 1;
                        }
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::error("denied-flow forwarding lagged", &[("lost", &n.to_string())]);
                    }
                    Err(broadcast::error::RecvError::Closed) => flows = None,
                }
            }
            _ = tick.tick() => {
                // Reconnect with a fresh certificate once a third of its lifetime is left.
                if renewal_check.elapsed() >= RENEWAL_CHECK {
                    renewal_check = Instant::now();
                    if due(files)? {
                        log::info("certificate renewal due; reconnecting", &[]);
                        return Ok(());
                    }
                }
                if overflow > 0 {
                    log::error("denied flows not forwarded: too many distinct flows pending", &[("flows", &overflow.to_string())]);
                    overflow = 0;
                }
                if !denied.is_empty() || last_report.elapsed() >= Duration::from_secs(5) {
                    // In reports of at most MAX_DENIED_PER_REPORT; what is not sent stays pending.
                    loop {
                        let keys: Vec<FlowKey> = denied.keys().take(ztseg_controller::service::MAX_DENIED_PER_REPORT).cloned().collect();
                        let batch = keys
                            .into_iter()
                            .filter_map(|k| denied.remove(&k).map(|v| (k, v)))
                            .map(|((workload, peer, tenant, direction, src, dst, dport, protocol, reason), (t, count))| pb::DeniedFlow {
                                time_unix_ms: t, workload, peer, tenant, direction, src, dst, dport, protocol, reason, count,
                            })
                            .collect();
                        report(&mut client, engine, batch).await?;
                        if denied.is_empty() {
                            break;
                        }
                    }
                    last_report = Instant::now();
                }
            }
        }
    }
}

async fn report(
    client: &mut pb::distribution_client::DistributionClient<tonic::transport::Channel>,
    engine: &Arc<Mutex<Engine>>,
    denied: Vec<pb::DeniedFlow>,
) -> Result<()> {
    let (enforced_version, policy_error) = {
        let e = lock(engine);
        (e.enforced_controller_version(), e.policy_error.clone().unwrap_or_default())
    };
    client
        .report(pb::ReportRequest { enforced_version, policy_error, denied })
        .await
        .map_err(|s| anyhow::anyhow!("report refused ({:?}): {}", s.code(), s.message()))?;
    lock(engine).controller_last_contact = Some(Instant::now());
    Ok(())
}

/// Turn an update into a complete document set and enforce it.
async fn apply_update(engine: &Arc<Mutex<Engine>>, u: pb::PolicyUpdate) -> Result<()> {
    let engine = engine.clone();
    tokio::task::spawn_blocking(move || -> Result<()> {
        let mut e = lock(&engine);
        e.controller_last_contact = Some(Instant::now());
        let docs = if u.snapshot {
            u.upserts.into_iter().map(|d| (d.name, d.content)).collect()
        } else {
            if u.base_version != e.controller.version || u.history != e.controller.history {
                bail!(
                    "delta from version {} does not apply to version {}; resubscribing",
                    u.base_version,
                    e.controller.version
                );
            }
            let mut docs = e.controller.documents.clone();
            for r in &u.removes {
                docs.remove(r);
            }
            for d in u.upserts {
                docs.insert(d.name, d.content);
            }
            docs
        };
        match e.apply_controller(u.version, u.history, docs) {
            Ok(()) => Ok(()),
            // A version that cannot be enforced is reported (status and controller); the
            // previous one stays in force. Not a session error: the next version may fix it.
            Err(msg) => {
                log::error(
                    "controller policy not enforced",
                    &[("version", &u.version.to_string()), ("error", &msg)],
                );
                Ok(())
            }
        }
    })
    .await?
}
