//! The controller's gRPC services. Every RPC first authenticates the caller from its mTLS
//! certificate and checks its role against [`crate::auth::roles_for`]; refusals are answered
//! with `UNAUTHENTICATED` / `PERMISSION_DENIED` and recorded in the audit log.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::Duration,
};

use sha2::{Digest as _, Sha256};
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};
use ztseg_api::controller::{
    self as pb, audit_server::Audit, distribution_server::Distribution, enrollment_server::Enrollment,
    policy_server::Policy,
};

use crate::{
    audit,
    auth::{self, Identity, Role},
    docs,
    pki::Ca,
    store::{EnforcerRecord, JoinToken, PolicyVersion, Store, StoreError, VersionMeta, VersionsPruned},
};

/// Largest diff kept inside an audit record; the full diff is always reproducible from the
/// two immutable versions it names.
const AUDIT_DIFF_LIMIT: usize = 64 << 10;

/// Meta key of the policy history's identity, stored before version 1 can be pruned.
const HISTORY_ID_KEY: &str = "policy-history";

/// An unchanged enforcer status is rewritten this often (its `last_seen`).
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// Denied flows one `Report` may carry (an enforcer sends more in several reports).
pub const MAX_DENIED_PER_REPORT: usize = 1000;

/// Shared controller state behind every service.
pub struct Ctl {
    pub store: Arc<dyn Store>,
    pub ca: Ca,
    /// Wakes the SIEM exporter after an append.
    pub appended: Arc<Notify>,
    /// Bumped on every revocation made here: open policy streams re-check their caller.
    pub revocations: tokio::sync::watch::Sender<u64>,
    cache: Mutex<Vec<Arc<PolicyVersion>>>,
    /// The policy history's identity, once version 1 exists.
    history: std::sync::OnceLock<String>,
    /// Last status written per enforcer: (version, error, when).
    reported: Mutex<std::collections::HashMap<String, (u64, String, std::time::Instant)>>,
    /// Bounds audit records of refused anonymous calls (no or unusable certificate, failed
    /// enrollment) per source address; see [`crate::limit`].
    anonymous: Mutex<crate::limit::RejectLimiter>,
    /// Bounds audit records of refused calls by callers with a valid certificate (wrong role,
    /// revoked) per identity, with the same allowance and window.
    refused: Mutex<crate::limit::RejectLimiter<String>>,
    /// Bounds `flow.denied` records per enforcer; see [`crate::limit::FlowLimiter`].
    denied_flows: Mutex<crate::limit::FlowLimiter>,
    /// Automatic retention: versions kept after each commit (0: all).
    keep_versions: std::sync::atomic::AtomicU64,
    /// Calls by RPC and whether the caller was let through (metrics).
    rpc_calls: Mutex<std::collections::BTreeMap<(String, bool), u64>>,
    /// Open `Distribution/Subscribe` streams (metrics).
    subscriptions: Arc<std::sync::atomic::AtomicU64>,
    /// The SIEM sinks exported to (as configured) and the store keys of their cursors: a
    /// prune never deletes records a sink has not taken yet.
    siem_cursors: Mutex<Vec<(String, String)>>,
}

impl std::fmt::Debug for Ctl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ctl").field("ca", &self.ca).finish_non_exhaustive()
    }
}

fn store_status(e: &StoreError) -> Status {
    match e {
        StoreError::Conflict { .. } => Status::aborted(e.to_string()),
        StoreError::Precondition(m) => Status::failed_precondition(m.clone()),
        _ => Status::unavailable(e.to_string()),
    }
}

fn peer_addr<T>(req: &Request<T>) -> String {
    req.extensions()
        .get::<tonic::transport::server::TlsConnectInfo<tonic::transport::server::TcpConnectInfo>>()
        .and_then(|i| i.get_ref().remote_addr())
        .map_or_else(|| "unknown".into(), |a: SocketAddr| a.to_string())
}

impl Ctl {
    /// `anonymous`: how many refused anonymous calls per source address and window, and how
    /// many refused calls per authenticated identity and window, are audited in full.
    #[must_use]
    pub fn new(store: Arc<dyn Store>, ca: Ca, anonymous: crate::limit::RejectPolicy) -> Arc<Self> {
        Arc::new(Self {
            anonymous: Mutex::new(crate::limit::RejectLimiter::new(anonymous)),
            refused: Mutex::new(crate::limit::RejectLimiter::for_identities(anonymous)),
            denied_flows: Mutex::new(crate::limit::FlowLimiter::new(crate::limit::FlowLimiter::DEFAULT)),
            keep_versions: std::sync::atomic::AtomicU64::new(0),
            rpc_calls: Mutex::new(std::collections::BTreeMap::new()),
            subscriptions: Arc::new(std::sync::atomic::AtomicU64::new(0)),
            siem_cursors: Mutex::new(Vec::new()),
            store,
            ca,
            appended: Arc::new(Notify::new()),
            revocations: tokio::sync::watch::Sender::new(0),
            cache: Mutex::new(Vec::new()),
            reported: Mutex::new(std::collections::HashMap::new()),
            history: std::sync::OnceLock::new(),
        })
    }

    /// Audit a refused anonymous call from `peer`, unless that address has used up its
    /// allowance for the window (then it is only counted, see [`Ctl::suppressed_summaries`]).
    pub async fn audit_anonymous(&self, peer: &str, draft: audit::Draft) -> Result<(), Status> {
        let ip = peer
            .parse::<SocketAddr>()
            .map_or(std::net::IpAddr::V6(std::net::Ipv6Addr::UNSPECIFIED), |a| a.ip());
        let admit = self
            .anonymous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(ip, std::time::Instant::now());
        if admit {
            self.audit(vec![draft]).await?;
        }
        Ok(())
    }

    /// Audit a refused call of `identity` (a valid certificate: wrong role, revoked), unless
    /// that identity has used up its allowance for the window (then it is only counted, see
    /// [`Ctl::suppressed_summaries`]). A revoked enforcer that keeps reconnecting thus adds a
    /// bounded number of records per window, however often it tries.
    pub async fn audit_refused(&self, identity: &str, draft: audit::Draft) -> Result<(), Status> {
        let admit = self
            .refused
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .admit(identity.to_owned(), std::time::Instant::now());
        if admit {
            self.audit(vec![draft]).await?;
        }
        Ok(())
    }

    /// The summaries of windows that ended with refusals or denied flows counted but not
    /// recorded: one `anonymous.suppressed` record per source address, one
    /// `api.denied.suppressed` record per identity, and one `flow.denied.suppressed` record per
    /// enforcer.
    pub fn suppressed_summaries(&self) -> Vec<audit::Draft> {
        let now = std::time::Instant::now();
        let mut out = self
            .anonymous
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .summaries("anonymous.suppressed", now);
        out.extend(
            self.refused.lock().unwrap_or_else(std::sync::PoisonError::into_inner).identity_summaries(now),
        );
        out.extend(
            self.denied_flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner).summaries(now),
        );
        out
    }

    /// How many `flow.denied` records per enforcer and window are audited in full (the
    /// default is [`crate::limit::FlowLimiter::DEFAULT`]).
    pub fn set_denied_flow_audit(&self, policy: crate::limit::RejectPolicy) {
        *self.denied_flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner) =
            crate::limit::FlowLimiter::new(policy);
    }

    /// The SIEM sinks (`--siem` values) whose export a prune must wait for.
    pub fn set_siem_sinks(&self, sinks: &[String]) -> anyhow::Result<()> {
        let cursors = sinks
            .iter()
            .map(|s| Ok((s.clone(), crate::siem::Sink::parse(s)?.cursor_key())))
            .collect::<anyhow::Result<_>>()?;
        *self.siem_cursors.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = cursors;
        Ok(())
    }

    /// Refuse a prune of the records before `before` while a SIEM sink has not taken them.
    async fn check_exported(&self, before: u64) -> Result<(), Status> {
        for (sink, done) in self.siem_progress().await.map_err(|e| store_status(&e))? {
            if done + 1 < before {
                return Err(Status::failed_precondition(format!(
                    "SIEM sink {sink} has taken the audit log up to record {done} only: records after it \
                     are not pruned before they are exported (before may be at most {})",
                    done + 1
                )));
            }
        }
        Ok(())
    }

    /// Append audit records; an audit failure is logged, never silently dropped.
    pub async fn audit(&self, drafts: Vec<audit::Draft>) -> Result<u64, Status> {
        let r = self.store.append_audit(drafts).await.map_err(|e| store_status(&e));
        self.appended.notify_one();
        r
    }

    /// Authenticate the caller of `rpc` (`Service/Method`) and check its role.
    pub async fn authorize<T>(&self, req: &Request<T>, rpc: &str) -> Result<Identity, Status> {
        self.authorize_cert(req, rpc).await.map(|(id, _)| id)
    }

    /// When `id`'s certificates issued up to some time were revoked: that time (ms).
    pub async fn revoked_at(&self, id: &Identity) -> Result<Option<i64>, Status> {
        let v = self.store.get_meta(revocation_key(id)).await.map_err(|e| store_status(&e))?;
        Ok(v.and_then(|t| t.parse().ok()))
    }

    /// As [`Ctl::authorize`], also returning the certificate's validity (Unix seconds).
    pub async fn authorize_cert<T>(
        &self,
        req: &Request<T>,
        rpc: &str,
    ) -> Result<(Identity, (i64, i64)), Status> {
        let r = self.check_caller(req, rpc).await;
        self.count_call(rpc, r.is_ok());
        r
    }

    /// Count a call of `rpc` for the metrics: let through (`allowed`) or refused.
    fn count_call(&self, rpc: &str, allowed: bool) {
        *self
            .rpc_calls
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry((rpc.to_owned(), allowed))
            .or_default() += 1;
    }

    /// Calls by RPC and whether the caller was let through, since start.
    pub fn rpc_calls(&self) -> std::collections::BTreeMap<(String, bool), u64> {
        self.rpc_calls.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Open policy streams (`Distribution/Subscribe`).
    pub fn subscriptions(&self) -> u64 {
        self.subscriptions.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The SIEM sinks and how far each has exported the audit log (store cursor).
    pub async fn siem_progress(&self) -> Result<Vec<(String, u64)>, crate::store::StoreError> {
        let cursors = self.siem_cursors.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        let mut out = Vec::new();
        for (sink, key) in cursors {
            let done = self.store.get_meta(key).await?.and_then(|v| v.parse().ok()).unwrap_or(0);
            out.push((sink, done));
        }
        Ok(out)
    }

    /// The caller's identity and certificate validity, if it may call `rpc` (refusals audited).
    async fn check_caller<T>(&self, req: &Request<T>, rpc: &str) -> Result<(Identity, (i64, i64)), Status> {
        let path = format!("/ztseg.controller.v1.{rpc}");
        let addr = peer_addr(req);
        let deny = |actor: String, why: String, status: Status| async move {
            let anonymous = actor == "anonymous";
            let d = audit::Draft::new(
                actor,
                "api.denied",
                "denied",
                serde_json::json!({ "rpc": path, "peer": addr, "reason": why }),
            );
            let recorded = if anonymous {
                self.audit_anonymous(&addr, d).await
            } else {
                self.audit_refused(&d.actor.clone(), d).await
            };
            if let Err(e) = recorded {
                eprintln!(
                    "{}",
                    crate::server::log_line(
                        "error",
                        "could not record a refused call",
                        &[("error", e.message())]
                    )
                );
            }
            Err(status)
        };
        let certs = req.peer_certs();
        let Some(leaf) = certs.as_deref().and_then(|c| c.first()) else {
            return deny(
                "anonymous".into(),
                "no client certificate".into(),
                Status::unauthenticated("a client certificate is required"),
            )
            .await;
        };
        let (id, validity) = match crate::pki::identity_of(leaf, &self.ca.trust_domain)
            .and_then(|id| Ok((id, crate::pki::validity_of(leaf)?)))
        {
            Ok(x) => x,
            Err(e) => {
                let msg = format!("{e:#}");
                return deny("anonymous".into(), msg.clone(), Status::unauthenticated(msg)).await;
            }
        };
        if let Some(t) = self.revoked_at(&id).await?
            && issued_ms(validity.0) <= t
        {
            let msg = format!("the certificate of {id} was revoked");
            return deny(id.to_string(), msg.clone(), Status::unauthenticated(msg)).await;
        }
        if !auth::roles_for(&format!("/ztseg.controller.v1.{rpc}")).contains(&id.role) {
            let msg = format!("role {} may not call {rpc}", id.role);
            return deny(id.to_string(), msg.clone(), Status::permission_denied(msg)).await;
        }
        Ok((id, validity))
    }

    async fn version_cached(&self, v: u64) -> Result<Option<Arc<PolicyVersion>>, Status> {
        if v == 0 {
            return Ok(Some(Arc::new(PolicyVersion::default())));
        }
        if let Some(p) = self
            .cache
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .find(|p| p.meta.version == v)
        {
            return Ok(Some(p.clone()));
        }
        let Some(p) = self.store.version(v).await.map_err(|e| store_status(&e))? else {
            return Ok(None);
        };
        let p = Arc::new(p);
        let mut c = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        c.push(p.clone());
        if c.len() > 4 {
            c.remove(0);
        }
        Ok(Some(p))
    }

    /// The update that takes a subscriber from `have` to `head`: a delta if `have` is a
    /// version this store knows, a full snapshot otherwise.
    pub async fn update(&self, have: u64, head: u64) -> Result<pb::PolicyUpdate, Status> {
        let new = self
            .version_cached(head)
            .await?
            .ok_or_else(|| Status::internal(format!("version {head} missing")))?;
        let history = self.history_id().await?;
        let old = if have > 0 && have < head { self.version_cached(have).await? } else { None };
        let doc = |(n, c): (&String, &String)| pb::Document { name: n.clone(), content: c.clone() };
        Ok(match old {
            Some(old) => pb::PolicyUpdate {
                version: head,
                base_version: have,
                snapshot: false,
                upserts: new
                    .documents
                    .iter()
                    .filter(|(n, c)| old.documents.get(*n) != Some(*c))
                    .map(doc)
                    .collect(),
                removes: old.documents.keys().filter(|n| !new.documents.contains_key(*n)).cloned().collect(),
                history,
            },
            None => pb::PolicyUpdate {
                version: head,
                base_version: 0,
                snapshot: true,
                upserts: new.documents.iter().map(doc).collect(),
                removes: Vec::new(),
                history,
            },
        })
    }

    /// The identity of this policy history (see `PolicyUpdate.history`); empty before version 1.
    pub async fn history_id(&self) -> Result<String, Status> {
        if let Some(h) = self.history.get() {
            return Ok(h.clone());
        }
        let Some(v1) = self.store.version(1).await.map_err(|e| store_status(&e))? else {
            // Version 1 was pruned (its identity was stored first), or there is none yet.
            let stored = self.store.get_meta(HISTORY_ID_KEY.into()).await.map_err(|e| store_status(&e))?;
            return Ok(match stored {
                Some(h) => self.history.get_or_init(|| h).clone(),
                None => String::new(),
            });
        };
        let bytes = serde_json::to_vec(&v1).map_err(|e| Status::internal(e.to_string()))?;
        // Version 1 never changes: computed once.
        Ok(self.history.get_or_init(|| hex::encode(&Sha256::digest(&bytes)[..16])).clone())
    }

    /// A stored version for `Get`, `Diff` and `Rollback`: `NOT_FOUND` if there is none, saying
    /// so if it was pruned.
    async fn kept_version(&self, v: u64) -> Result<Arc<PolicyVersion>, Status> {
        let oldest = self.store.oldest_version().await.map_err(|e| store_status(&e))?;
        if v < oldest {
            return Err(Status::not_found(format!(
                "policy version {v} was pruned: the oldest kept version is {oldest}"
            )));
        }
        self.version_cached(v).await?.ok_or_else(|| Status::not_found(format!("no policy version {v}")))
    }

    /// Retention: keep the current version and the `keep - 1` before it (see
    /// [`Store::prune_versions`]); audited as `policy.prune` by `actor`.
    pub async fn prune_history(&self, actor: &str, keep: u64) -> Result<VersionsPruned, Status> {
        if keep == 0 {
            return Err(Status::invalid_argument(
                "keep: at least 1 (the current version is always kept); 0 would delete the whole history",
            ));
        }
        // Subscribers tell histories apart by version 1: keep its identity before it can go.
        let id = self.history_id().await?;
        if !id.is_empty() {
            self.store.put_meta(HISTORY_ID_KEY.into(), id).await.map_err(|e| store_status(&e))?;
        }
        let draft = audit::Draft::new(actor, "policy.prune", "success", serde_json::json!({}));
        let done = self.store.prune_versions(keep, draft).await.map_err(|e| store_status(&e))?;
        self.appended.notify_one();
        Ok(done)
    }

    async fn current_docs(&self) -> Result<(u64, Arc<PolicyVersion>), Status> {
        let head = self.store.head().await.map_err(|e| store_status(&e))?;
        let v = self
            .version_cached(head)
            .await?
            .ok_or_else(|| Status::internal(format!("version {head} missing")))?;
        Ok((head, v))
    }

    /// Validate and commit `docs` as the next version (shared by apply and rollback).
    async fn commit(
        &self,
        actor: &Identity,
        docs: BTreeMap<String, String>,
        expected: u64,
        message: String,
        rolled_back_to: u64,
        dry_run: bool,
    ) -> Result<pb::ApplyResponse, Status> {
        if let Err(errors) = docs::validate(&docs) {
            return Err(Status::invalid_argument(format!("policy rejected:\n{}", errors.join("\n"))));
        }
        let (head, current) = self.current_docs().await?;
        if expected != 0 && expected != head {
            return Err(Status::aborted(format!(
                "policy version conflict: expected {expected}, current is {head}"
            )));
        }
        let diff = docs::diff(&current.documents, &docs);
        // The first version is always created (even empty): enforcers wait for one.
        if (diff.is_empty() && head != 0) || dry_run {
            return Ok(pb::ApplyResponse { version: head, changed: !diff.is_empty(), diff, audit_seq: 0 });
        }
        let summary = crate::store::summary(&current.documents, &docs);
        let meta = VersionMeta {
            version: 0,
            actor: actor.to_string(),
            time_ms: crate::now_ms(),
            message: message.clone(),
            rolled_back_to,
            documents: u32::try_from(docs.len()).unwrap_or(u32::MAX),
            summary: summary.clone(),
        };
        let mut kept = diff.clone();
        if kept.len() > AUDIT_DIFF_LIMIT {
            let mut cut = AUDIT_DIFF_LIMIT;
            while !kept.is_char_boundary(cut) {
                cut -= 1;
            }
            kept.truncate(cut);
            kept.push_str(
                "\n[diff truncated; reproduce it with `ztseg policy diff` between the two versions]\n",
            );
        }
        let draft = audit::Draft::new(
            actor.to_string(),
            if rolled_back_to == 0 { "policy.apply" } else { "policy.rollback" },
            "success",
            serde_json::json!({
                "previous_version": head,
                "message": message,
                "summary": summary,
                "rolled_back_to": rolled_back_to,
                "diff_sha256": hex::encode(Sha256::digest(diff.as_bytes())),
                "diff": kept,
            }),
        );
        let (version, audit_seq) = self
            .store
            .commit(head, PolicyVersion { meta, documents: docs }, draft)
            .await
            .map_err(|e| store_status(&e))?;
        self.appended.notify_one();
        self.retain(version).await;
        Ok(pb::ApplyResponse { version, changed: true, diff, audit_seq })
    }

    /// Automatic retention after a commit of `version` (`--keep-versions`): prune the history
    /// to the newest `keep` versions, as the `controller` actor. The commit stands whatever
    /// happens here; a failure is logged and the next commit tries again.
    async fn retain(&self, version: u64) {
        let keep = self.keep_versions.load(std::sync::atomic::Ordering::Relaxed);
        if keep == 0 || version <= keep {
            return;
        }
        match self.prune_history("controller", keep).await {
            Ok(done) if done.pruned > 0 => eprintln!(
                "{}",
                crate::server::log_line(
                    "info",
                    "policy history pruned",
                    &[("keep", &keep.to_string()), ("pruned", &done.pruned.to_string())]
                )
            ),
            Ok(_) => {}
            Err(e) => eprintln!(
                "{}",
                crate::server::log_line(
                    "error",
                    "policy history retention failed",
                    &[("error", e.message())]
                )
            ),
        }
    }

    /// Keep at most `keep` policy versions, pruning after each commit (0: keep all).
    pub fn set_keep_versions(&self, keep: u64) {
        self.keep_versions.store(keep, std::sync::atomic::Ordering::Relaxed);
    }
}

fn doc_map(docs: Vec<pb::Document>) -> Result<BTreeMap<String, String>, Status> {
    let mut m = BTreeMap::new();
    for d in docs {
        if m.insert(d.name.clone(), d.content).is_some() {
            return Err(Status::invalid_argument(format!("document {:?} given twice", d.name)));
        }
    }
    Ok(m)
}

/// An enrollable identity from request fields.
fn parse_identity(role: &str, name: &str) -> Result<Identity, Status> {
    let role: Role = role.parse().map_err(|e| Status::invalid_argument(format!("role: {e}")))?;
    if role == Role::Controller {
        return Err(Status::invalid_argument("role: controller identities are not enrolled"));
    }
    crate::pki::check_name("name", name).map_err(|e| Status::invalid_argument(format!("{e}")))?;
    Ok(Identity { role, name: name.to_owned() })
}

fn revocation_key(id: &Identity) -> String {
    format!("revoked/{}/{}", id.role, id.name)
}

/// Issuance time (ms) of a certificate whose `notBefore` is `not_before` (Unix seconds).
fn issued_ms(not_before: i64) -> i64 {
    (not_before + crate::pki::BACKDATE.whole_seconds()) * 1000
}

fn token_hash(token: &str) -> String {
    hex::encode(Sha256::digest(token.as_bytes()))
}

/// Hex digits of a token's hash that name it (`JoinTokenInfo.id`).
const TOKEN_ID_LEN: usize = 16;
/// The shortest prefix of a token id `RevokeJoinToken` accepts.
const TOKEN_ID_MIN: usize = 8;

/// How a stored token is shown: its id, never its secret.
fn token_info(hash: &str, t: &JoinToken) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: hash.chars().take(TOKEN_ID_LEN).collect(),
        role: t.role.clone(),
        name: t.name.clone(),
        created_unix_ms: t.created_ms,
        expires_unix_ms: t.expires_ms,
        created_by: t.created_by.clone(),
        cert_ttl_seconds: t.cert_ttl_s,
    }
}

/// How often the leader deletes expired join tokens.
pub const TOKEN_SWEEP: Duration = Duration::from_secs(5);

impl Ctl {
    /// Delete the join tokens that expired by `now_ms` (leader-only work, every
    /// [`TOKEN_SWEEP`]), recorded in one `token.expire` audit record by `controller` naming
    /// them. Returns how many were deleted.
    pub async fn expire_tokens(&self, now_ms: i64) -> Result<usize, Status> {
        let tokens = self.store.tokens().await.map_err(|e| store_status(&e))?;
        let mut gone = Vec::new();
        for (hash, t) in tokens.into_iter().filter(|(_, t)| t.expires_ms <= now_ms) {
            // Taken by an enrollment meanwhile: not ours to record.
            if self.store.take_token(hash.clone()).await.map_err(|e| store_status(&e))?.is_some() {
                let i = token_info(&hash, &t);
                gone.push(serde_json::json!({ "id": i.id, "role": i.role, "name": i.name, "expires_ms": i.expires_unix_ms }));
            }
        }
        if !gone.is_empty() {
            let n = gone.len();
            self.audit(vec![audit::Draft::new(
                "controller",
                "token.expire",
                "success",
                serde_json::json!({ "tokens": gone }),
            )])
            .await?;
            return Ok(n);
        }
        Ok(0)
    }

    /// Delete the outstanding join tokens for `id` (its revocation); returns how many.
    async fn revoke_tokens_of(&self, id: &Identity) -> Result<u32, Status> {
        let tokens = self.store.tokens().await.map_err(|e| store_status(&e))?;
        let mut n = 0;
        for (hash, t) in tokens {
            if t.role == id.role.as_str()
                && t.name == id.name
                && self.store.take_token(hash).await.map_err(|e| store_status(&e))?.is_some()
            {
                n += 1;
            }
        }
        Ok(n)
    }
}

/// The gRPC services, all sharing one [`Ctl`].
#[derive(Debug, Clone)]
pub struct Services(pub Arc<Ctl>);

#[tonic::async_trait]
impl Enrollment for Services {
    async fn enroll(&self, req: Request<pb::EnrollRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        let r = self.enroll_impl(req).await;
        self.0.count_call("Enrollment/Enroll", r.is_ok());
        r
    }

    async fn create_join_token(
        &self,
        req: Request<pb::CreateJoinTokenRequest>,
    ) -> Result<Response<pb::CreateJoinTokenResponse>, Status> {
        let who = self.0.authorize(&req, "Enrollment/CreateJoinToken").await?;
        let r = req.into_inner();
        parse_identity(&r.role, &r.name)?;
        let ttl = if r.ttl_seconds == 0 { 3600 } else { r.ttl_seconds.min(7 * 86400) };
        let cert_ttl = if r.cert_ttl_seconds == 0 {
            crate::pki::DEFAULT_CERT_TTL.as_secs()
        } else {
            r.cert_ttl_seconds.min(365 * 86400)
        };
        let mut secret = [0u8; 32];
        rustls::crypto::ring::default_provider()
            .secure_random
            .fill(&mut secret)
            .map_err(|_| Status::internal("no system randomness"))?;
        let token = format!(
            "ztseg-join-{}",
            base64::Engine::encode(&base64::engine::general_purpose::URL_SAFE_NO_PAD, secret)
        );
        let created_ms = crate::now_ms();
        let expires_ms = created_ms + i64::try_from(ttl * 1000).unwrap_or(i64::MAX);
        let hash = token_hash(&token);
        let id: String = hash.chars().take(TOKEN_ID_LEN).collect();
        self.0
            .store
            .put_token(
                hash,
                JoinToken {
                    role: r.role.clone(),
                    name: r.name.clone(),
                    expires_ms,
                    cert_ttl_s: cert_ttl,
                    created_by: who.to_string(),
                    created_ms,
                },
            )
            .await
            .map_err(|e| store_status(&e))?;
        self.0
            .audit(vec![audit::Draft::new(
                who.to_string(),
                "token.create",
                "success",
                serde_json::json!({ "id": id, "role": r.role, "name": r.name, "expires_ms": expires_ms }),
            )])
            .await?;
        Ok(Response::new(pb::CreateJoinTokenResponse { token, expires_unix: expires_ms / 1000, id }))
    }

    async fn renew(&self, req: Request<pb::RenewRequest>) -> Result<Response<pb::EnrollResponse>, Status> {
        self.renew_impl(req).await
    }

    async fn revoke(&self, req: Request<pb::RevokeRequest>) -> Result<Response<pb::RevokeResponse>, Status> {
        self.revoke_impl(req).await
    }

    async fn list_join_tokens(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        self.list_join_tokens_impl(req).await
    }

    async fn revoke_join_token(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        self.revoke_join_token_impl(req).await
    }
}

impl Services {
    /// Enrollment: the CSR is checked first (a malformed one leaves the token usable), then
    /// the token redeemed (once), then refused if its identity was revoked after the token
    /// was created.
    async fn enroll_impl(
        &self,
        req: Request<pb::EnrollRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let addr = peer_addr(&req);
        let r = req.into_inner();
        let fail = |why: &str| {
            audit::Draft::new(
                "anonymous",
                "enroll",
                "failure",
                serde_json::json!({ "peer": addr, "reason": why }),
            )
        };
        if let Err(e) = crate::pki::check_csr(&r.csr_der) {
            let msg = format!("{e:#}");
            self.0.audit_anonymous(&addr, fail(&msg)).await?;
            return Err(Status::invalid_argument(msg));
        }
        let tok = self.0.store.take_token(token_hash(&r.token)).await.map_err(|e| store_status(&e))?;
        let Some(tok) = tok.filter(|t| t.expires_ms > crate::now_ms()) else {
            self.0.audit_anonymous(&addr, fail("unknown, used or expired join token")).await?;
            return Err(Status::unauthenticated("join token unknown, already used or expired"));
        };
        let role: Role = tok.role.parse().map_err(|e| Status::internal(format!("{e}")))?;
        let id = Identity { role, name: tok.name.clone() };
        // Revoke deletes the identity's outstanding tokens; this also voids one it could not
        // see (created at the same time elsewhere, or stored without a creation time).
        if let Some(t) = self.0.revoked_at(&id).await?
            && tok.created_ms <= t
        {
            let msg = format!("the join token was created before {id} was revoked");
            let mut d = fail(&msg);
            d.detail["identity"] = id.to_string().into();
            // At most once per token: it is redeemed (deleted) by now.
            self.0.audit(vec![d]).await?;
            return Err(Status::unauthenticated(msg));
        }
        let signed = self.0.ca.sign_csr(&r.csr_der, role, &tok.name, Duration::from_secs(tok.cert_ttl_s));
        let (cert, not_after) = match signed {
            Ok(x) => x,
            Err(e) => {
                self.0.audit(vec![fail(&format!("{e:#}"))]).await?;
                return Err(Status::internal(format!("{e:#}")));
            }
        };
        let detail = serde_json::json!({ "peer": addr, "token_created_by": tok.created_by });
        self.issued(&id, "enroll", detail, cert, not_after).await
    }

    async fn list_join_tokens_impl(
        &self,
        req: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::ListJoinTokensResponse>, Status> {
        self.0.authorize(&req, "Enrollment/ListJoinTokens").await?;
        let mut tokens: Vec<pb::JoinTokenInfo> = self
            .0
            .store
            .tokens()
            .await
            .map_err(|e| store_status(&e))?
            .iter()
            .map(|(h, t)| token_info(h, t))
            .collect();
        tokens.sort_by(|a, b| (a.created_unix_ms, &a.id).cmp(&(b.created_unix_ms, &b.id)));
        Ok(Response::new(pb::ListJoinTokensResponse { tokens }))
    }

    async fn revoke_join_token_impl(
        &self,
        req: Request<pb::RevokeJoinTokenRequest>,
    ) -> Result<Response<pb::RevokeJoinTokenResponse>, Status> {
        let who = self.0.authorize(&req, "Enrollment/RevokeJoinToken").await?;
        let id = req.into_inner().id;
        if id.len() < TOKEN_ID_MIN
            || id.len() > 64
            || !id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(Status::invalid_argument(format!(
                "id: a token id from ListJoinTokens (at least {TOKEN_ID_MIN} lowercase hex digits), got {id:?}"
            )));
        }
        let tokens = self.0.store.tokens().await.map_err(|e| store_status(&e))?;
        let matching: Vec<&(String, JoinToken)> = tokens.iter().filter(|(h, _)| h.starts_with(&id)).collect();
        let (hash, _) = match matching.as_slice() {
            [] => return Err(Status::not_found(format!("no outstanding join token {id}"))),
            [one] => *one,
            more => {
                return Err(Status::invalid_argument(format!(
                    "id {id} names {} tokens: give more digits",
                    more.len()
                )));
            }
        };
        // Redeemed or expired meanwhile: gone either way, but not by this call.
        let Some(tok) = self.0.store.take_token(hash.clone()).await.map_err(|e| store_status(&e))? else {
            return Err(Status::not_found(format!("no outstanding join token {id}")));
        };
        let info = token_info(hash, &tok);
        self.0
            .audit(vec![audit::Draft::new(
                who.to_string(),
                "token.revoke",
                "success",
                serde_json::json!({ "id": info.id, "role": info.role, "name": info.name }),
            )])
            .await?;
        Ok(Response::new(pb::RevokeJoinTokenResponse { token: Some(info) }))
    }

    async fn renew_impl(
        &self,
        req: Request<pb::RenewRequest>,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let (who, (nb, na)) = self.0.authorize_cert(&req, "Enrollment/Renew").await?;
        let ttl = Duration::from_secs(u64::try_from(na - nb).unwrap_or(0));
        let (cert, not_after) = self
            .0
            .ca
            .sign_csr(&req.into_inner().csr_der, who.role, &who.name, ttl)
            .map_err(|e| Status::invalid_argument(format!("{e:#}")))?;
        self.issued(&who, "renew", serde_json::json!({}), cert, not_after).await
    }

    /// Audit a certificate issued to `id` (enrollment or renewal) and answer with it.
    async fn issued(
        &self,
        id: &Identity,
        action: &str,
        mut detail: serde_json::Value,
        certificate_pem: String,
        not_after: time::OffsetDateTime,
    ) -> Result<Response<pb::EnrollResponse>, Status> {
        let identity = format!("spiffe://{}/{}/{}", self.0.ca.trust_domain, id.role, id.name);
        detail["identity"] = identity.clone().into();
        detail["not_after"] = not_after.unix_timestamp().into();
        self.0.audit(vec![audit::Draft::new(id.to_string(), action, "success", detail)]).await?;
        Ok(Response::new(pb::EnrollResponse {
            certificate_pem,
            ca_pem: self.0.ca.cert_pem.clone(),
            identity,
            not_after_unix: not_after.unix_timestamp(),
        }))
    }

    async fn revoke_impl(
        &self,
        req: Request<pb::RevokeRequest>,
    ) -> Result<Response<pb::RevokeResponse>, Status> {
        let who = self.0.authorize(&req, "Enrollment/Revoke").await?;
        let r = req.into_inner();
        let id = parse_identity(&r.role, &r.name)?;
        let now = crate::now_ms();
        self.0.store.put_meta(revocation_key(&id), now.to_string()).await.map_err(|e| store_status(&e))?;
        self.0.revocations.send_modify(|n| *n += 1);
        // After the revocation is stored: a token created from now on is the admin's new
        // decision, one created before is deleted here or refused at enrollment.
        let tokens_revoked = self.0.revoke_tokens_of(&id).await?;
        self.0
            .audit(vec![audit::Draft::new(
                who.to_string(),
                "identity.revoke",
                "success",
                serde_json::json!({
                    "identity": id.to_string(), "revoked_at_ms": now, "tokens_revoked": tokens_revoked,
                }),
            )])
            .await?;
        Ok(Response::new(pb::RevokeResponse { revoked_at_unix_ms: now, tokens_revoked }))
    }
}

#[tonic::async_trait]
impl Policy for Services {
    async fn apply(&self, req: Request<pb::ApplyRequest>) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = self.0.authorize(&req, "Policy/Apply").await?;
        let r = req.into_inner();
        let docs = doc_map(r.documents)?;
        Ok(Response::new(self.0.commit(&who, docs, r.expected_version, r.message, 0, r.dry_run).await?))
    }

    async fn diff(&self, req: Request<pb::DiffRequest>) -> Result<Response<pb::DiffResponse>, Status> {
        self.0.authorize(&req, "Policy/Diff").await?;
        let r = req.into_inner();
        let docs = doc_map(r.documents)?;
        let (head, current) = self.0.current_docs().await?;
        let (against, base) = if r.against_version == 0 || r.against_version == head {
            (head, current)
        } else {
            (r.against_version, self.0.kept_version(r.against_version).await?)
        };
        Ok(Response::new(pb::DiffResponse {
            diff: docs::diff(&base.documents, &docs),
            against_version: against,
        }))
    }

    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        self.0.authorize(&req, "Policy/Get").await?;
        let want = req.into_inner().version;
        let (version, v) =
            if want == 0 { self.0.current_docs().await? } else { (want, self.0.kept_version(want).await?) };
        let documents =
            v.documents.iter().map(|(n, c)| pb::Document { name: n.clone(), content: c.clone() }).collect();
        Ok(Response::new(pb::GetResponse { version, documents }))
    }

    async fn history(
        &self,
        req: Request<pb::HistoryRequest>,
    ) -> Result<Response<pb::HistoryResponse>, Status> {
        self.0.authorize(&req, "Policy/History").await?;
        let limit = match req.into_inner().limit {
            0 => 100,
            n => n as usize,
        };
        let h = self.0.store.history(limit).await.map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::HistoryResponse {
            versions: h
                .into_iter()
                .map(|m| pb::VersionInfo {
                    version: m.version,
                    actor: m.actor,
                    time_unix_ms: m.time_ms,
                    message: m.message,
                    rolled_back_to: m.rolled_back_to,
                    documents: m.documents,
                    summary: m.summary,
                })
                .collect(),
        }))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::ApplyResponse>, Status> {
        let who = self.0.authorize(&req, "Policy/Rollback").await?;
        let r = req.into_inner();
        if r.to_version == 0 {
            return Err(Status::invalid_argument("to_version: name the version to return to"));
        }
        let v = self.0.kept_version(r.to_version).await?;
        let msg =
            if r.message.is_empty() { format!("rollback to version {}", r.to_version) } else { r.message };
        Ok(Response::new(self.0.commit(&who, v.documents.clone(), 0, msg, r.to_version, false).await?))
    }

    async fn prune(
        &self,
        req: Request<pb::PolicyPruneRequest>,
    ) -> Result<Response<pb::PolicyPruneResponse>, Status> {
        let who = self.0.authorize(&req, "Policy/Prune").await?;
        let done = self.0.prune_history(&who.to_string(), req.into_inner().keep).await?;
        Ok(Response::new(pb::PolicyPruneResponse {
            pruned: done.pruned,
            oldest_kept: done.oldest_kept,
            blobs_removed: done.blobs_removed,
        }))
    }
}

/// Longest time a policy stream of a revoked identity stays open when the revocation was made
/// at another controller sharing the store (one made here ends it at once).
pub const REVOCATION_RECHECK: std::time::Duration = std::time::Duration::from_secs(5);

#[tonic::async_trait]
impl Distribution for Services {
    type SubscribeStream = ReceiverStream<Result<pb::PolicyUpdate, Status>>;

    async fn subscribe(
        &self,
        req: Request<pb::SubscribeRequest>,
    ) -> Result<Response<Self::SubscribeStream>, Status> {
        let (who, (nb, _)) = self.0.authorize_cert(&req, "Distribution/Subscribe").await?;
        let r = req.into_inner();
        // A version of another history is no base for a delta, nor proof of being current.
        let mut have = if r.history.is_empty() || r.history == self.0.history_id().await? {
            r.from_version
        } else {
            u64::MAX
        };
        let ctl = self.0.clone();
        let (tx, rx) = mpsc::channel(4);
        let mut heads = ctl.store.watch_head();
        let mut revocations = ctl.revocations.subscribe();
        let open = Open::new(ctl.subscriptions.clone());
        tokio::spawn(async move {
            let _open = open;
            loop {
                // A revoked subscriber gets nothing more (checked on every change).
                match ctl.revoked_at(&who).await {
                    Ok(Some(t)) if issued_ms(nb) <= t => {
                        let _ = tx
                            .send(Err(Status::unauthenticated(format!(
                                "the certificate of {who} was revoked"
                            ))))
                            .await;
                        return;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                let head = *heads.borrow_and_update();
                if head != have && head > 0 {
                    let u = ctl.update(have, head).await;
                    let ok = u.is_ok();
                    if tx.send(u).await.is_err() || !ok {
                        return;
                    }
                    have = head;
                }
                tokio::select! {
                    r = heads.changed() => if r.is_err() { return },
                    r = revocations.changed() => if r.is_err() { return },
                    // A revocation made at another controller of an HA set is not signalled
                    // here: look again at least this often.
                    () = tokio::time::sleep(REVOCATION_RECHECK) => {}
                    () = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn report(&self, req: Request<pb::ReportRequest>) -> Result<Response<pb::ReportResponse>, Status> {
        let who = self.0.authorize(&req, "Distribution/Report").await?;
        let r = req.into_inner();
        if r.denied.len() > MAX_DENIED_PER_REPORT {
            return Err(Status::invalid_argument(format!(
                "denied: {} flows in one report, at most {MAX_DENIED_PER_REPORT}",
                r.denied.len()
            )));
        }
        // Status is written when it changes, and otherwise at most every STATUS_REFRESH (a
        // store write is an fsync or a consensus round; enforcers report every few seconds).
        let now = std::time::Instant::now();
        let due = {
            let seen = self.0.reported.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            seen.get(&who.name).is_none_or(|(v, err, at)| {
                *v != r.enforced_version
                    || *err != r.policy_error
                    || now.duration_since(*at) >= STATUS_REFRESH
            })
        };
        if due {
            self.0
                .store
                .put_enforcer(EnforcerRecord {
                    name: who.name.clone(),
                    enforced_version: r.enforced_version,
                    last_seen_ms: crate::now_ms(),
                    policy_error: r.policy_error.clone(),
                })
                .await
                .map_err(|e| store_status(&e))?;
            self.0
                .reported
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .insert(who.name.clone(), (r.enforced_version, r.policy_error, now));
        }
        if !r.denied.is_empty() {
            let actor = who.to_string();
            let now = std::time::Instant::now();
            let admitted: Vec<pb::DeniedFlow> = {
                let mut l = self.0.denied_flows.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                r.denied.into_iter().filter(|d| l.admit(&actor, u64::from(d.count), now)).collect()
            };
            let drafts: Vec<audit::Draft> = admitted
                .into_iter()
                .map(|d| {
                    // The record's time is the controller's (when it was told); what the
                    // enforcer says about when it first saw the flow is its claim, kept apart.
                    let mut detail = serde_json::json!({
                        "workload": d.workload, "peer": d.peer, "tenant": d.tenant,
                        "direction": d.direction, "src": d.src, "dst": d.dst, "dport": d.dport,
                        "protocol": d.protocol, "reason": d.reason, "count": d.count,
                    });
                    if d.time_unix_ms > 0 {
                        detail["first_seen_ms"] = d.time_unix_ms.into();
                    }
                    audit::Draft::new(who.to_string(), "flow.denied", "denied", detail)
                })
                .collect();
            if !drafts.is_empty() {
                self.0.audit(drafts).await?;
            }
        }
        Ok(Response::new(pb::ReportResponse {}))
    }

    async fn list_enforcers(
        &self,
        req: Request<pb::ListEnforcersRequest>,
    ) -> Result<Response<pb::ListEnforcersResponse>, Status> {
        self.0.authorize(&req, "Distribution/ListEnforcers").await?;
        let current_version = self.0.store.head().await.map_err(|e| store_status(&e))?;
        let enforcers = self
            .0
            .store
            .enforcers()
            .await
            .map_err(|e| store_status(&e))?
            .into_iter()
            .map(|e| pb::EnforcerInfo {
                name: e.name,
                enforced_version: e.enforced_version,
                last_seen_unix_ms: e.last_seen_ms,
                policy_error: e.policy_error,
            })
            .collect();
        Ok(Response::new(pb::ListEnforcersResponse { current_version, enforcers }))
    }
}

/// Verify the whole audit chain in `store`: from record 1, or from the stored base after a
/// prune (which the latest `audit.prune` record must confirm).
pub async fn verify_chain(
    store: &dyn Store,
) -> Result<Result<audit::Verified, audit::BadRecord>, StoreError> {
    verify_chain_anchored(store, Vec::new()).await
}

/// [`verify_chain`], also requiring the chain to hold each anchor (sequence, hash): see
/// [`audit::Verifier::anchored`].
pub async fn verify_chain_anchored(
    store: &dyn Store,
    anchors: Vec<(u64, String)>,
) -> Result<Result<audit::Verified, audit::BadRecord>, StoreError> {
    let base = store.audit_base().await?;
    let mut v = audit::Verifier::after(base.as_ref()).anchored(anchors);
    let mut from = v.next();
    loop {
        let page = store.audit_records(from, 1000).await?;
        let Some(last) = page.last().map(|(k, _)| *k) else { break };
        for (k, bytes) in &page {
            if let Err(e) = v.feed(*k, bytes) {
                return Ok(Err(e));
            }
        }
        from = last + 1;
    }
    let head = store.audit_head().await?;
    Ok(v.finish(&head))
}

/// The answer to `Audit/Verify` for the outcome of [`verify_chain`].
#[must_use]
pub fn verify_response(r: &Result<audit::Verified, audit::BadRecord>) -> pb::AuditVerifyResponse {
    match r {
        Ok(v) => pb::AuditVerifyResponse {
            ok: true,
            records: v.records,
            first_seq: v.first,
            last_seq: v.last,
            anchors: v.anchors,
            ..Default::default()
        },
        Err(b) => {
            pb::AuditVerifyResponse { ok: false, error: b.to_string(), bad_seq: b.seq, ..Default::default() }
        }
    }
}

fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

#[tonic::async_trait]
impl Audit for Services {
    async fn list(
        &self,
        req: Request<pb::AuditListRequest>,
    ) -> Result<Response<pb::AuditListResponse>, Status> {
        self.0.authorize(&req, "Audit/List").await?;
        let r = req.into_inner();
        let limit = if r.limit == 0 { 1000 } else { r.limit.min(10_000) as usize };
        let recs =
            self.0.store.audit_records(r.from_seq.max(1), limit).await.map_err(|e| store_status(&e))?;
        Ok(Response::new(pb::AuditListResponse {
            records: recs.into_iter().map(|(_, b)| String::from_utf8_lossy(&b).into_owned()).collect(),
        }))
    }

    async fn verify(
        &self,
        req: Request<pb::AuditVerifyRequest>,
    ) -> Result<Response<pb::AuditVerifyResponse>, Status> {
        self.0.authorize(&req, "Audit/Verify").await?;
        let anchors = req
            .into_inner()
            .anchors
            .into_iter()
            .map(|a| audit::parse_anchor(&format!("{}:{}", a.seq, a.hash)).map_err(Status::invalid_argument))
            .collect::<Result<Vec<_>, _>>()?;
        let r = verify_chain_anchored(self.0.store.as_ref(), anchors).await.map_err(|e| store_status(&e))?;
        Ok(Response::new(verify_response(&r)))
    }

    async fn prune(
        &self,
        req: Request<pb::AuditPruneRequest>,
    ) -> Result<Response<pb::AuditPruneResponse>, Status> {
        let who = self.0.authorize(&req, "Audit/Prune").await?;
        let r = req.into_inner();
        if !is_sha256_hex(&r.last_hash) {
            return Err(Status::invalid_argument(format!(
                "last_hash: the hash of record {} as archived (64 lowercase hex digits), got {:?}",
                r.before.saturating_sub(1),
                r.last_hash
            )));
        }
        if !is_sha256_hex(&r.archive_sha256) {
            return Err(Status::invalid_argument(format!(
                "archive_sha256: the SHA-256 of the archive (64 lowercase hex digits), got {:?}",
                r.archive_sha256
            )));
        }
        // Checked again in the store's transaction; here to answer a bad argument as one.
        let head = self.0.store.audit_head().await.map_err(|e| store_status(&e))?;
        let base = self.0.store.audit_base().await.map_err(|e| store_status(&e))?;
        audit::prune_start(base.as_ref(), &head, r.before).map_err(Status::invalid_argument)?;
        self.0.check_exported(r.before).await?;
        let draft = audit::Draft::new(
            who.to_string(),
            audit::PRUNE,
            "success",
            serde_json::json!({
                "before": r.before,
                "last_hash": r.last_hash,
                "archive_sha256": r.archive_sha256,
            }),
        );
        let (pruned, record) =
            self.0.store.prune_audit(r.before, r.last_hash, draft).await.map_err(|e| store_status(&e))?;
        self.0.appended.notify_one();
        Ok(Response::new(pb::AuditPruneResponse { pruned, record }))
    }
}

/// Counts an open stream while it lives.
struct Open(Arc<std::sync::atomic::AtomicU64>);

impl Open {
    fn new(n: Arc<std::sync::atomic::AtomicU64>) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Self(n)
    }
}

impl Drop for Open {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{contract, embedded::EmbeddedStore};

    /// Subscribers compare the history identity derived from version 1: pruning version 1
    /// does not change it, also for a controller that never computed it before.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_history_identity_survives_pruning_version_1() {
        let dir = std::env::temp_dir().join(format!("ztseg-history-id-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let store: Arc<dyn Store> = Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap());
        let ctl = || {
            let ca = Ca::generate("t.test").unwrap();
            Ctl::new(store.clone(), ca, crate::limit::RejectPolicy::default())
        };
        store.commit(0, contract::version(&[("a", "x")]), contract::draft()).await.unwrap();
        store.commit(1, contract::version(&[("a", "y")]), contract::draft()).await.unwrap();
        let id = ctl().history_id().await.unwrap();
        assert_eq!(id.len(), 32, "{id:?}");

        let done = ctl().prune_history("admin/t", 1).await.unwrap();
        assert_eq!((done.pruned, done.oldest_kept), (1, 2));
        assert!(store.version(1).await.unwrap().is_none());
        assert_eq!(ctl().history_id().await.unwrap(), id, "a fresh controller sees the same history");
        let e = ctl().prune_history("admin/t", 0).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
        let e = ctl().kept_version(1).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::NotFound, "{e:?}");
        assert_eq!(e.message(), "policy version 1 was pruned: the oldest kept version is 2");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
