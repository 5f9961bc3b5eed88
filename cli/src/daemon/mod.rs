//! `ztseg enforcer run`: the per-host enforcer daemon.
//!
//! It owns one data-plane instance (pin directory), attaches to the configured workloads,
//! loads `NetworkPolicy` from a directory (rejecting bad files, keeping the policy in force),
//! serves the local gRPC API on a root-only unix socket and Prometheus metrics over HTTP, and
//! turns kernel events into metrics and flow streams. Stopping it (SIGTERM, or even SIGKILL)
//! leaves enforcement in place; `ztseg enforcer uninstall` removes it.

pub mod api;
pub mod config;
pub mod engine;
pub mod explain;
pub mod log;
pub mod metrics;
pub mod sync;

use std::{
    os::unix::fs::PermissionsExt as _,
    path::Path,
    process::ExitCode,
    sync::{Arc, Mutex},
    time::Duration,
};

use anyhow::{Context as _, Result};
use tokio::sync::broadcast;
use tokio_stream::StreamExt as _;
use ztseg_api::enforcer::FlowEvent;

/// Exit code for configuration errors (`EX_USAGE` of sysexits: the invocation, here its
/// configuration, is wrong).
pub const EXIT_CONFIG: u8 = 64;

/// Run the daemon with the configuration at `path`.
#[must_use]
pub fn run(path: &Path) -> ExitCode {
    let cfg = match config::Config::load(path, std::env::vars()) {
        Ok(c) => c,
        Err(e) => {
            log::error(
                "invalid configuration",
                &[("source", &e.source_name), ("field", &e.field), ("error", &e.message)],
            );
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    for var in &cfg.unknown_env {
        log::warn("unknown environment variable ignored", &[("variable", var)]);
    }
    match serve(cfg) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            log::error("enforcer failed", &[("error", &format!("{e:#}"))]);
            ExitCode::FAILURE
        }
    }
}

fn serve(cfg: config::Config) -> Result<()> {
    let socket = cfg.socket.clone();
    let metrics_addr = cfg.metrics_addr;
    let poll = Duration::from_millis(cfg.policy_poll_ms);
    let controller = cfg.controller.clone();
    let node = cfg.node.clone();
    let pending = sync::Pending::load(&cfg.state_dir);
    // Enter the host's network namespace (lab) before any thread exists: setns applies to
    // this thread and to every thread it starts.
    if let Some(ns) = &cfg.netns {
        enforcer::netns::enter(ns).with_context(|| format!("entering {}", ns.display()))?;
    }
    let mut engine = engine::Engine::open(cfg)?;
    let events = engine.dp.events()?;
    let engine = Arc::new(Mutex::new(engine));
    let metrics = Arc::new(metrics::Metrics::default());
    let (flows, _) = broadcast::channel::<FlowEvent>(4096);
    spawn_event_reader(events, engine.clone(), metrics.clone(), flows.clone());

    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let metrics_listener = tokio::net::TcpListener::bind(metrics_addr)
            .await
            .with_context(|| format!("binding metrics address {metrics_addr}"))?;
        tokio::spawn(metrics::serve(metrics_listener, engine.clone(), metrics.clone()));

        if let Some(dir) = socket.parent() {
            create_socket_dir(dir)?;
        }
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).with_context(|| format!("binding {}", socket.display()))?;
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600))?;
        // Only root may call the API: the socket is 0600 and every connection's peer
        // credentials are checked as well.
        let incoming = tokio_stream::wrappers::UnixListenerStream::new(listener).filter(|conn| match conn {
            Ok(s) => match s.peer_cred() {
                Ok(c) if c.uid() == 0 => true,
                Ok(c) => {
                    log::error("refused non-root API caller", &[("uid", &c.uid().to_string())]);
                    false
                }
                Err(_) => false,
            },
            Err(_) => true,
        });

        {
            let engine = engine.clone();
            tokio::spawn(async move {
                let mut gc_tick = tokio::time::Instant::now();
                loop {
                    {
                        let mut e = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                        if let Err(err) = e.try_attach() {
                            log::error("attach failed", &[("error", &format!("{err:#}"))]);
                        }
                    }
                    tokio::time::sleep(poll.min(Duration::from_secs(1))).await;
                    let mut e = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                    if let Err(err) = e.refresh_host_addresses() {
                        log::error("host addresses", &[("error", &format!("{err:#}"))]);
                    }
                    e.reload_policy(false);
                    if gc_tick.elapsed() >= Duration::from_secs(1) {
                        gc_tick = tokio::time::Instant::now();
                        if let Err(err) = e.gc() {
                            log::error("gc", &[("error", &format!("{err:#}"))]);
                        }
                    }
                }
            });
        }

        if let Some(c) = controller {
            tokio::spawn(sync::run(c, node, engine.clone(), flows.clone(), pending.clone()));
        }

        let api = api::Api { engine: engine.clone(), metrics: metrics.clone(), flows };
        log::info("serving", &[("socket", &socket.display().to_string()), ("metrics", &metrics_addr.to_string())]);
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
            log::info("stopping; enforcement stays in place (pinned)", &[]);
        };
        tonic::transport::Server::builder()
            .add_service(ztseg_api::enforcer::enforcer_server::EnforcerServer::new(api))
            .serve_with_incoming_shutdown(incoming, shutdown)
            .await?;
        let _ = std::fs::remove_file(&socket);
        pending.keep_for_next_start();
        Ok(())
    })
}

/// Create the socket's directory and any missing parent, each mode 0755 (root writes, others
/// may look: the socket itself is 0600). Directories that exist keep their mode (`/tmp` its
/// sticky bit, say).
fn create_socket_dir(dir: &Path) -> Result<()> {
    let missing: Vec<&Path> =
        dir.ancestors().take_while(|d| !d.as_os_str().is_empty() && !d.exists()).collect();
    for d in missing.into_iter().rev() {
        match std::fs::create_dir(d) {
            Ok(()) => std::fs::set_permissions(d, std::fs::Permissions::from_mode(0o755))
                .with_context(|| format!("setting the mode of {}", d.display()))?,
            // Created meanwhile by someone else: theirs, mode included.
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e).with_context(|| format!("creating {}", d.display())),
        }
    }
    Ok(())
}

/// Read kernel events on a dedicated thread: count them per workload and publish them to
/// `WatchFlows` subscribers.
fn spawn_event_reader(
    mut events: enforcer::EventReader,
    engine: Arc<Mutex<engine::Engine>>,
    metrics: Arc<metrics::Metrics>,
    flows: broadcast::Sender<FlowEvent>,
) {
    std::thread::spawn(move || {
        loop {
            // The kernel wakes the reader only for batches; poll on a short timer too.
            let batch = events.batch(Duration::from_millis(100)).unwrap_or_default();
            if batch.is_empty() {
                continue;
            }
            // Names of every identity in the batch, under one short hold of the engine lock
            // (not one per event: a flood of drops must not contend with the API and policy).
            let names: std::collections::HashMap<u32, (Option<String>, Option<String>)> = {
                let e = engine.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                let mut m = std::collections::HashMap::new();
                for ev in &batch {
                    for id in [ev.local_identity, ev.peer_identity] {
                        m.entry(id).or_insert_with(|| (e.workload_name(id), e.tenant_name(id)));
                    }
                }
                m
            };
            let name = |id: u32| {
                names.get(&id).and_then(|n| n.0.clone()).unwrap_or_else(|| format!("identity:{id}"))
            };
            for ev in batch {
                let (workload, peer, tenant) = (
                    name(ev.local_identity),
                    name(ev.peer_identity),
                    names.get(&ev.local_identity).and_then(|n| n.1.clone()).unwrap_or_default(),
                );
                let verdict = ev.verdict.name();
                let reason = ev.reason.map_or("unknown", enforcer_common::Reason::name);
                metrics.flow(&workload, &tenant, verdict, reason);
                let _ = flows.send(FlowEvent {
                    ts_ns: ev.ts_ns,
                    verdict: verdict.into(),
                    reason: reason.into(),
                    cookie: ev.cookie,
                    workload,
                    peer,
                    tenant,
                    direction: if ev.egress { "egress".into() } else { "ingress".into() },
                    src: ev.src.to_string(),
                    dst: ev.dst.to_string(),
                    sport: u32::from(ev.sport),
                    dport: u32::from(ev.dport),
                    protocol: match ev.proto {
                        6 => "TCP".into(),
                        17 => "UDP".into(),
                        132 => "SCTP".into(),
                        1 => "ICMP".into(),
                        58 => "ICMPv6".into(),
                        p => p.to_string(),
                    },
                });
            }
        }
    });
}
