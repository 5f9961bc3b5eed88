//! The local gRPC API (`ztseg.enforcer.v1.Enforcer`) served on the root-only unix socket.
//! Errors map to explicit status codes: unknown workload or cookie → `NOT_FOUND`, bad argument
//! → `INVALID_ARGUMENT`, a key already granted → `ALREADY_EXISTS`, full maps →
//! `RESOURCE_EXHAUSTED`, a workload not on this node → `FAILED_PRECONDITION`.

use std::{
    pin::Pin,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::broadcast;
use tokio_stream::{Stream, wrappers::ReceiverStream};
use tonic::{Request, Response, Status};
use ztseg_api::enforcer::{
    Counter, ExplainRequest, ExplainResponse, FlowEvent, Grant, ListGrantsRequest, ListGrantsResponse,
    ListRulesRequest, ListRulesResponse, ListWorkloadsRequest, ListWorkloadsResponse, OpenGrantRequest,
    RegisterWorkloadRequest, RemoveWorkloadRequest, RemoveWorkloadResponse, RevokeGrantRequest,
    RevokeGrantResponse, Rule, StatsRequest, StatsResponse, StatusRequest, StatusResponse, WatchFlowsRequest,
    Workload, enforcer_server,
};

use super::{engine::Engine, metrics::Metrics};

#[derive(Debug)]
pub struct Api {
    pub engine: Arc<Mutex<Engine>>,
    pub metrics: Arc<Metrics>,
    pub flows: broadcast::Sender<FlowEvent>,
}

fn lock(e: &Mutex<Engine>) -> std::sync::MutexGuard<'_, Engine> {
    e.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn expires_in_ms(expires_at: u64) -> i64 {
    if expires_at == 0 {
        return -1;
    }
    let now = enforcer::time::monotonic_ns().unwrap_or(0);
    i64::try_from(expires_at.saturating_sub(now) / 1_000_000).unwrap_or(i64::MAX)
}

fn status_of(e: &anyhow::Error) -> Status {
    let msg = format!("{e:#}");
    if e.downcast_ref::<super::engine::GrantConflict>().is_some() {
        return Status::already_exists(msg);
    }
    match e.downcast_ref::<enforcer::Error>() {
        Some(enforcer::Error::MapFull { .. } | enforcer::Error::SlotsExhausted { .. }) => {
            Status::resource_exhausted(msg)
        }
        Some(enforcer::Error::KeyOwned { .. }) => Status::already_exists(msg),
        Some(enforcer::Error::UnknownCookie { .. }) => Status::not_found(msg),
        _ => Status::internal(msg),
    }
}

fn grant_msg(cookie: u32, g: &super::engine::GrantInfo) -> Grant {
    Grant {
        cookie,
        from: g.from.clone(),
        to: g.to.clone(),
        protocol: g.protocol.clone(),
        port: u32::from(g.port),
        expires_in_ms: expires_in_ms(g.expires_at),
        reason: g.reason.clone(),
        end_port: u32::from(g.end_port),
    }
}

fn workload_msg(e: &Engine, i: usize) -> Workload {
    let w = &e.workloads[i];
    Workload {
        name: w.name.clone(),
        namespace: w.namespace.clone(),
        labels: w.labels.clone().into_iter().collect(),
        tenant: w.tenant.clone().unwrap_or_default(),
        identity: e.identities[i],
        interface: w.interface.clone().unwrap_or_default(),
        ipv4: w.ipv4.map(|a| a.to_string()).unwrap_or_default(),
        ipv6: w.ipv6.map(|a| a.to_string()).unwrap_or_default(),
        mode: if !e.cfg.is_local(w) {
            "remote".into()
        } else if w.mode == super::config::Mode::Audit {
            "audit".into()
        } else {
            "enforce".into()
        },
    }
}

fn non_empty(s: &str) -> Option<String> {
    (!s.is_empty()).then(|| s.to_owned())
}

/// The configuration form of a workload sent through the API.
fn workload_config(r: RegisterWorkloadRequest) -> Result<super::config::WorkloadConfig, Status> {
    let w = r.workload.ok_or_else(|| Status::invalid_argument("workload is required"))?;
    if w.name.is_empty() {
        return Err(Status::invalid_argument("workload.name is required"));
    }
    let ipv4 =
        match w.ipv4.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                Status::invalid_argument(format!("workload.ipv4: {a:?} is not an IPv4 address"))
            })?),
        };
    let ipv6 =
        match w.ipv6.as_str() {
            "" => None,
            a => Some(a.parse().map_err(|_| {
                Status::invalid_argument(format!("workload.ipv6: {a:?} is not an IPv6 address"))
            })?),
        };
    let mode = match w.mode.as_str() {
        "" | "enforce" => super::config::Mode::Enforce,
        "audit" => super::config::Mode::Audit,
        m => return Err(Status::invalid_argument(format!("workload.mode: {m:?} is not enforce or audit"))),
    };
    Ok(super::config::WorkloadConfig {
        name: w.name,
        namespace: non_empty(&w.namespace).unwrap_or_else(|| "default".into()),
        labels: w.labels.into_iter().collect(),
        tenant: non_empty(&w.tenant),
        node: non_empty(&r.node),
        interface: non_empty(&w.interface),
        cgroup: None,
        ipv4,
        ipv6,
        mode,
        ports: Vec::new(),
    })
}

fn workload_status(e: &anyhow::Error) -> Status {
    use super::engine::WorkloadError;
    let msg = format!("{e:#}");
    match e.downcast_ref::<WorkloadError>() {
        Some(WorkloadError::Exists(_)) => Status::already_exists(msg),
        Some(WorkloadError::NotFound(_)) => Status::not_found(msg),
        Some(WorkloadError::Configured(_)) => Status::failed_precondition(msg),
        Some(WorkloadError::Invalid(_)) => Status::invalid_argument(msg),
        None => match e.downcast_ref::<enforcer::Error>() {
            Some(enforcer::Error::Interface { .. } | enforcer::Error::Cgroup { .. }) => {
                Status::failed_precondition(msg)
            }
            _ => status_of(e),
        },
    }
}

impl Api {
    fn timed<T>(&self, method: &str, start: Instant, r: Result<T, Status>) -> Result<Response<T>, Status> {
        self.metrics.api(method, start.elapsed());
        r.map(Response::new)
    }
}

type FlowStream = Pin<Box<dyn Stream<Item = Result<FlowEvent, Status>> + Send>>;

#[tonic::async_trait]
impl enforcer_server::Enforcer for Api {
    async fn status(&self, _: Request<StatusRequest>) -> Result<Response<StatusResponse>, Status> {
        let t = Instant::now();
        let e = lock(&self.engine);
        // Its own statement: a writer guard taken inside the literal below lives until the
        // literal's end, and the writer lock is not re-entrant.
        let local_delivery = e.dp.writer().local_delivery().unwrap_or(false);
        let events = e.dp.writer().event_rate_limit().ok().flatten();
        let r = StatusResponse {
            ready: e.ready(),
            attached: e.attached,
            policy_loaded: e.policy_loaded,
            policy_error: e.policy_error.clone().unwrap_or_default(),
            policy_version: e.policy_version,
            pin_dir: e.cfg.pin_dir.display().to_string(),
            workloads: u32::try_from(e.workloads.len()).unwrap_or(u32::MAX),
            rules: u32::try_from(e.dp.writer().rules().len()).unwrap_or(u32::MAX),
            grants: u32::try_from(e.grants().len()).unwrap_or(u32::MAX),
            node: e.cfg.node.clone(),
            policy_source: if e.cfg.controller.is_some() { "controller" } else { "directory" }.into(),
            controller_version: e.enforced_controller_version(),
            controller_connected: e.controller_connected,
            policy_stale: e.policy_stale(),
            controller_last_contact_ms_ago: e
                .controller_last_contact
                .map_or(-1, |t| i64::try_from(t.elapsed().as_millis()).unwrap_or(i64::MAX)),
            local_delivery,
            event_rate_limit: events.map_or(0, |l| l.per_cpu_per_sec),
            event_burst: events.map_or(0, |l| l.burst),
            event_rate_limit_total: events.map_or(0, |l| l.total_per_cpu_per_sec),
            event_burst_total: events.map_or(0, |l| l.total_burst),
            controller_error: e.controller_error.clone().unwrap_or_default(),
            controller_retry_ms: u64::try_from(e.controller_retry.as_millis()).unwrap_or(u64::MAX),
        };
        drop(e);
        self.timed("Status", t, Ok(r))
    }

    async fn list_workloads(
        &self,
        _: Request<ListWorkloadsRequest>,
    ) -> Result<Response<ListWorkloadsResponse>, Status> {
        let t = Instant::now();
        let e = lock(&self.engine);
        let workloads = (0..e.workloads.len()).map(|i| workload_msg(&e, i)).collect();
        drop(e);
        self.timed("ListWorkloads", t, Ok(ListWorkloadsResponse { workloads }))
    }

    async fn register_workload(
        &self,
        req: Request<RegisterWorkloadRequest>,
    ) -> Result<Response<Workload>, Status> {
        let t = Instant::now();
        let r = (|| {
            let w = workload_config(req.into_inner())?;
            let id = w.id();
            let mut e = lock(&self.engine);
            e.register_workload(w).map_err(|err| workload_status(&err))?;
            let i = e
                .workloads
                .iter()
                .position(|x| x.id() == id)
                .ok_or_else(|| Status::internal("lost workload"))?;
            Ok(workload_msg(&e, i))
        })();
        self.timed("RegisterWorkload", t, r)
    }

    async fn remove_workload(
        &self,
        req: Request<RemoveWorkloadRequest>,
    ) -> Result<Response<RemoveWorkloadResponse>, Status> {
        let t = Instant::now();
        let id = req.into_inner().workload;
        let r = lock(&self.engine)
            .remove_workload(&id)
            .map(|()| RemoveWorkloadResponse {})
            .map_err(|err| workload_status(&err));
        self.timed("RemoveWorkload", t, r)
    }

    async fn list_rules(&self, _: Request<ListRulesRequest>) -> Result<Response<ListRulesResponse>, Status> {
        let t = Instant::now();
        let e = lock(&self.engine);
        let owners = rule_owners(&e);
        let rules =
            e.dp.writer()
                .rules()
                .into_iter()
                .map(|r| Rule {
                    port_ranges: u32::try_from(r.ranges.len()).unwrap_or(u32::MAX),
                    cookie: r.cookie,
                    owner: owners.get(&r.cookie).cloned().unwrap_or_else(|| "unowned".into()),
                    action: format!("{:?}", r.action).to_uppercase(),
                    keys: u32::try_from(r.policy_keys.len()).unwrap_or(u32::MAX),
                    expires_in_ms: expires_in_ms(r.expires_at),
                })
                .collect();
        drop(e);
        self.timed("ListRules", t, Ok(ListRulesResponse { rules }))
    }

    async fn explain(&self, req: Request<ExplainRequest>) -> Result<Response<ExplainResponse>, Status> {
        let t = Instant::now();
        let r = req.into_inner();
        let result = {
            let e = lock(&self.engine);
            super::explain::explain(&e, &r, &rule_owners(&e))
        };
        self.timed("Explain", t, result)
    }

    async fn open_grant(&self, req: Request<OpenGrantRequest>) -> Result<Response<Grant>, Status> {
        let t = Instant::now();
        let r = req.into_inner();
        let result = (|| {
            let port = u16::try_from(r.port)
                .ok()
                .filter(|p| *p != 0)
                .ok_or_else(|| Status::invalid_argument("port must be 1-65535"))?;
            let end = match r.end_port {
                0 => port,
                e => u16::try_from(e).ok().filter(|e| *e >= port).ok_or_else(|| {
                    Status::invalid_argument(format!("end_port {e}: must be {port}-65535 (or 0, one port)"))
                })?,
            };
            if r.ttl_seconds == 0 || r.ttl_seconds > 86_400 {
                return Err(Status::invalid_argument("ttl_seconds must be between 1 and 86400"));
            }
            if !matches!(r.protocol.to_ascii_uppercase().as_str(), "TCP" | "UDP" | "SCTP") {
                return Err(Status::invalid_argument(format!(
                    "protocol {:?}: expected TCP, UDP or SCTP",
                    r.protocol
                )));
            }
            let mut e = lock(&self.engine);
            for w in [&r.from, &r.to] {
                if !e.workloads.iter().any(|x| x.id() == *w) {
                    return Err(Status::not_found(format!("no workload {w:?} (use namespace/name)")));
                }
            }
            let local =
                |id: &str| e.workloads.iter().find(|x| x.id() == id).is_some_and(|x| e.cfg.is_local(x));
            if !local(&r.from) && !local(&r.to) {
                return Err(Status::failed_precondition(format!(
                    "neither {} nor {} runs on node {}",
                    r.from, r.to, e.cfg.node
                )));
            }
            let (cookie, g) = e
                .open_grant(
                    &r.from,
                    &r.to,
                    &r.protocol,
                    port..=end,
                    Duration::from_secs(r.ttl_seconds),
                    &r.reason,
                )
                .map_err(|err| status_of(&err))?;
            Ok(grant_msg(cookie, &g))
        })();
        self.timed("OpenGrant", t, result)
    }

    async fn list_grants(
        &self,
        _: Request<ListGrantsRequest>,
    ) -> Result<Response<ListGrantsResponse>, Status> {
        let t = Instant::now();
        let e = lock(&self.engine);
        let grants = e.grants().iter().map(|(c, g)| grant_msg(*c, g)).collect();
        drop(e);
        self.timed("ListGrants", t, Ok(ListGrantsResponse { grants }))
    }

    async fn revoke_grant(
        &self,
        req: Request<RevokeGrantRequest>,
    ) -> Result<Response<RevokeGrantResponse>, Status> {
        let t = Instant::now();
        let cookie = req.into_inner().cookie;
        let mut e = lock(&self.engine);
        let r = if e.grants().contains_key(&cookie) {
            e.revoke_grant(cookie).map(|()| RevokeGrantResponse {}).map_err(|err| status_of(&err))
        } else {
            Err(Status::not_found(format!("no grant with cookie {cookie}")))
        };
        drop(e);
        self.timed("RevokeGrant", t, r)
    }

    async fn stats(&self, _: Request<StatsRequest>) -> Result<Response<StatsResponse>, Status> {
        let t = Instant::now();
        let e = lock(&self.engine);
        let r =
            e.dp.writer()
                .counters()
                .map(|c| StatsResponse {
                    counters: c
                        .into_iter()
                        .map(|(r, n)| Counter { reason: r.name().into(), packets: n })
                        .collect(),
                })
                .map_err(|err| Status::internal(err.to_string()));
        drop(e);
        self.timed("Stats", t, r)
    }

    type WatchFlowsStream = FlowStream;

    async fn watch_flows(&self, req: Request<WatchFlowsRequest>) -> Result<Response<FlowStream>, Status> {
        let f = req.into_inner();
        if !f.verdict.is_empty() && !matches!(f.verdict.as_str(), "ALLOW" | "DROP" | "AUDIT") {
            return Err(Status::invalid_argument("verdict must be ALLOW, DROP or AUDIT"));
        }
        let mut rx = self.flows.subscribe();
        let (tx, out) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move {
            loop {
                let ev = match rx.recv().await {
                    Ok(ev) => ev,
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        let _ = tx
                            .send(Err(Status::data_loss(format!("{n} events dropped: reader too slow"))))
                            .await;
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => break,
                };
                let keep = (f.workload.is_empty() || ev.workload == f.workload || ev.peer == f.workload)
                    && (f.tenant.is_empty() || ev.tenant == f.tenant)
                    && (f.verdict.is_empty() || ev.verdict == f.verdict);
                if keep && tx.send(Ok(ev)).await.is_err() {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(out))))
    }
}

/// What installed each rule, by cookie: `policy:<owner>`, an admin rule's name, `grant:<cookie>`.
fn rule_owners(e: &Engine) -> std::collections::BTreeMap<u32, String> {
    e.policy_rules()
        .iter()
        .map(|(o, c)| (*c, format!("policy:{o}")))
        .chain(e.admin_rules().iter().map(|(o, (c, _))| (*c, o.clone())))
        .chain(e.grants().keys().map(|c| (*c, format!("grant:{c}"))))
        .collect()
}
