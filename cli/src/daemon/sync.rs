//! Controller session of the enforcer (controller mode).
//!
//! Subscribes with the version it enforces and receives a snapshot or a delta, then one
//! delta per new version. Each update becomes a complete document set that the engine applies
//! make-before-break and persists; the enforced version is reported back. When the controller
//! is unreachable the last-known policy stays in force and status/metrics show it as stale;
//! the session reconnects with backoff and resumes from its version. Denied flows seen in the
//! kernel are folded per second and forwarded to the controller's audit log; until the
//! controller acknowledges them they are checkpointed to `state_dir` (see [`Pending`]), so a
//! restart — SIGKILL included — sends them then (at least once: a crash between an
//! acknowledgement and the next checkpoint sends them again).

use std::{
    collections::BTreeMap,
    io::Write as _,
    path::{Path, PathBuf},
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

fn fold(d: &Mutex<DeniedFlows>) -> std::sync::MutexGuard<'_, DeniedFlows> {
    d.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Denied flows not yet reported, shared by the folding task and the sessions, and kept in
/// `state_dir` so that a restart, even after SIGKILL, keeps them: a checkpoint writes them
/// (atomically) at most a second after they change and right after a report is acknowledged.
#[derive(Clone, Debug)]
pub struct Pending {
    flows: Arc<Mutex<DeniedFlows>>,
    writer: Arc<Mutex<Checkpoint>>,
    acknowledged: Arc<tokio::sync::Notify>,
}

/// What the file under `state_dir` holds: the change count of the flows last written there.
#[derive(Debug)]
struct Checkpoint {
    path: PathBuf,
    written: u64,
}

/// File under `state_dir` holding the unreported denied flows (the last checkpoint).
const PENDING_FILE: &str = "denied-flows.json";

/// The longest a change to the pending flows waits before it is checkpointed.
const CHECKPOINT_EVERY: Duration = Duration::from_secs(1);

/// One pending flow as written to the file: key, (first seen ms, count).
type Entry = (FlowKey, (i64, u32));

impl Pending {
    /// The flows a previous run left in `state_dir`. The file stays until the next checkpoint
    /// replaces it; an unreadable one is logged and set aside as `.bad`.
    #[must_use]
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join(PENDING_FILE);
        let mut d = DeniedFlows::default();
        match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Entry>>(&bytes) {
                Ok(entries) => {
                    for (k, (t, n)) in entries {
                        d.add_count(k, t, n);
                    }
                }
                Err(e) => {
                    log::error(
                        "unreadable pending denied flows set aside",
                        &[("file", &path.display().to_string()), ("error", &e.to_string())],
                    );
                    let _ = std::fs::rename(&path, path.with_extension("json.bad"));
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => log::error(
                "reading pending denied flows",
                &[("file", &path.display().to_string()), ("error", &e.to_string())],
            ),
        }
        // What was just read is what the file holds.
        let writer = Checkpoint { path, written: d.changes };
        Self {
            flows: Arc::new(Mutex::new(d)),
            writer: Arc::new(Mutex::new(writer)),
            acknowledged: Arc::new(tokio::sync::Notify::new()),
        }
    }

    /// Flows not yet acknowledged by the controller (pending or in a report in flight).
    #[must_use]
    pub fn len(&self) -> usize {
        fold(&self.flows).unacknowledged()
    }

    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Write the unacknowledged flows to `state_dir` if they changed since the last write:
    /// `Some(count)` when written (0: the file removed), `None` when unchanged. Atomic
    /// (temporary file, fsync, rename, fsync of the directory); one writer at a time.
    pub fn checkpoint(&self) -> Result<Option<usize>> {
        let mut w = self.writer.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let (changes, entries) = {
            let d = fold(&self.flows);
            if d.changes == w.written {
                return Ok(None);
            }
            (d.changes, d.snapshot())
        };
        write_entries(&w.path, &entries)?;
        w.written = changes;
        Ok(Some(entries.len()))
    }

    /// At stop: write what the controller has not acknowledged yet for the next start (the
    /// checkpoint is usually up to date already; this adds the last second's changes).
    pub fn keep_for_next_start(&self) {
        match self.checkpoint() {
            Ok(_) if self.is_empty() => {}
            Ok(_) => log::info(
                "unreported denied flows kept for the next start",
                &[("flows", &self.len().to_string())],
            ),
            Err(e) => log::error("keeping unreported denied flows", &[("error", &format!("{e:#}"))]),
        }
    }

    /// A report carrying the flows in flight was accepted: drop them and checkpoint soon, so a
    /// restart does not send them again.
    fn acknowledge(&self) {
        if fold(&self.flows).acknowledged() {
            self.acknowledged.notify_one();
        }
    }

    /// Checkpoint forever: within [`CHECKPOINT_EVERY`] of a change and right after an
    /// acknowledged report. A failure is logged (once until a write succeeds again) and the
    /// write retried at the next tick.
    async fn checkpoints(self) {
        let mut tick = tokio::time::interval(CHECKPOINT_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failing = false;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                () = self.acknowledged.notified() => {}
            }
            let p = self.clone();
            let written = tokio::task::spawn_blocking(move || p.checkpoint()).await;
            match (written.map_err(anyhow::Error::from).and_then(|w| w), failing) {
                (Ok(_), true) => {
                    failing = false;
                    log::info("pending denied flows written again", &[]);
                }
                (Err(e), false) => {
                    failing = true;
                    log::error("writing pending denied flows", &[("error", &format!("{e:#}"))]);
                }
                _ => {}
            }
            // The next write comes a full interval after this one.
            tick.reset();
        }
    }
}

/// Replace the file at `path` by `entries` (remove it when there are none), durably.
fn write_entries(path: &Path, entries: &[Entry]) -> Result<()> {
    if entries.is_empty() {
        return match std::fs::remove_file(path) {
            Ok(()) => crate::archive::sync_dir(path),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
        };
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("json.tmp");
    let mut f = std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    f.write_all(&serde_json::to_vec(entries)?)?;
    f.sync_all().with_context(|| format!("syncing {}", tmp.display()))?;
    drop(f);
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    crate::archive::sync_dir(path)
}

/// Run the controller session forever.
pub async fn run(
    cfg: ControllerConfig,
    node: String,
    engine: Arc<Mutex<Engine>>,
    flows: broadcast::Sender<FlowEvent>,
    pending: Pending,
) {
    let files = ztseg_controller::pki::ClientFiles::in_dir(
        &cfg.identity_dir,
        cfg.identity.as_deref().unwrap_or(&node),
    );
    let mut wait = Duration::ZERO;
    tokio::spawn(pending.clone().checkpoints());
    // Denied flows are folded by their own task, so those seen while the controller is
    // unreachable (between sessions, or while a connection attempt hangs) are kept too.
    if cfg.report_denied {
        let mut rx = flows.subscribe();
        let denied = pending.flows.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(ev) if ev.verdict == "DROP" => {
                        let k = (
                            ev.workload,
                            ev.peer,
                            ev.tenant,
                            ev.direction,
                            ev.src,
                            ev.dst,
                            ev.dport,
                            ev.protocol,
                            ev.reason,
                        );
                        fold(&denied).add(k, ztseg_controller::now_ms());
                    }
                    Ok(_) => {}
                    Err(broadcast::error::RecvError::Lagged(n)) => {
                        log::error("denied-flow forwarding lagged", &[("lost", &n.to_string())]);
                    }
                    Err(broadcast::error::RecvError::Closed) => return,
                }
            }
        });
    }
    loop {
        let started = Instant::now();
        let ended = session(&cfg, &files, &engine, &pending).await;
        let refused = ended.as_ref().is_err_and(|e| e.downcast_ref::<Refused>().is_some());
        wait = next_wait(wait, started.elapsed(), refused);
        {
            let mut e = lock(&engine);
            e.controller_connected = false;
            e.controller_error = ended.as_ref().err().map(|e| format!("{e:#}"));
            e.controller_retry = wait;
        }
        if let Err(e) = ended {
            log::error(
                "controller session ended; the last-known policy stays in force",
                &[
                    ("endpoint", &cfg.endpoint),
                    ("error", &format!("{e:#}")),
                    ("retry_ms", &wait.as_millis().to_string()),
                ],
            );
        }
        tokio::time::sleep(wait).await;
    }
}

/// A call the controller refused because of who this enforcer is — its certificate revoked,
/// or an identity that may not subscribe — rather than because it could not answer: trying
/// again soon will not change the answer.
#[derive(Debug)]
pub struct Refused {
    what: &'static str,
    code: tonic::Code,
    message: String,
}

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} refused by the controller ({:?}): {}", self.what, self.code, self.message)
    }
}

impl std::error::Error for Refused {}

/// The error of a failed controller call: [`Refused`] for `UNAUTHENTICATED` and
/// `PERMISSION_DENIED`, which name the caller, not the controller's state.
fn call_error(what: &'static str, s: &tonic::Status) -> anyhow::Error {
    match s.code() {
        code @ (tonic::Code::Unauthenticated | tonic::Code::PermissionDenied) => {
            anyhow::Error::new(Refused { what, code, message: s.message().to_owned() })
        }
        code => anyhow::anyhow!("{what} failed ({code:?}): {}", s.message()),
    }
}

/// First wait before reconnecting after a failed session, doubled up to [`RETRY_MAX`].
const RETRY_FIRST: Duration = Duration::from_millis(200);
const RETRY_MAX: Duration = Duration::from_secs(2);
/// First wait after a refusal ([`Refused`]), doubled up to [`REFUSED_RETRY_MAX`]: a revoked
/// enforcer asks again at most once a minute instead of every 2 s.
const REFUSED_RETRY_FIRST: Duration = Duration::from_secs(5);
const REFUSED_RETRY_MAX: Duration = Duration::from_mins(1);

/// The wait before the next session, after one that lasted `lasted` and ended (refused or
/// not) when the wait before it was `previous`.
fn next_wait(previous: Duration, lasted: Duration, refused: bool) -> Duration {
    if refused {
        (previous * 2).clamp(REFUSED_RETRY_FIRST, REFUSED_RETRY_MAX)
    } else if lasted > Duration::from_secs(10) {
        // A session that held for a while: the next failure starts the backoff over.
        RETRY_FIRST
    } else {
        (previous * 2).clamp(RETRY_FIRST, RETRY_MAX)
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

/// Fold key of a denied flow: workload, peer, tenant, direction, source, destination,
/// destination port, protocol, reason.
type FlowKey = (String, String, String, String, String, String, u32, String, String);

/// Denied flows seen in the kernel, folded (one entry per distinct flow, with a count and the
/// time it was first seen) until a report to the controller takes them. Kept across sessions,
/// so flows denied while the controller is unreachable are reported once it is back.
///
/// Bounded: past [`Self::MAX_PENDING`] distinct flows, a new flow is folded into its
/// workload's summary entry (peer, addresses and protocol `*`, port 0) — every denied packet
/// is still counted, in a flow or a summary. Reports take the oldest entries first, at most
/// `MAX_DENIED_PER_REPORT` per report, so what a flood costs the controller's audit log is
/// bounded too.
///
/// A report's entries stay `in_flight` until the controller acknowledges them (then they are
/// dropped) or the report fails (then they are pending again); checkpoints hold both sets.
#[derive(Default, Debug)]
struct DeniedFlows {
    pending: BTreeMap<FlowKey, (i64, u32)>,
    in_flight: BTreeMap<FlowKey, (i64, u32)>,
    /// Counts changes to what a checkpoint holds (pending and in flight together).
    changes: u64,
}

/// Fold `count` packets first seen at `first_ms` into `key`'s entry.
fn merge(map: &mut BTreeMap<FlowKey, (i64, u32)>, key: FlowKey, first_ms: i64, count: u32) {
    let e = map.entry(key).or_insert((first_ms, 0));
    e.0 = e.0.min(first_ms);
    e.1 = e.1.saturating_add(count);
}

impl DeniedFlows {
    const MAX_PENDING: usize = 10_000;

    fn add(&mut self, key: FlowKey, now_ms: i64) {
        self.add_count(key, now_ms, 1);
    }

    fn add_count(&mut self, key: FlowKey, first_ms: i64, count: u32) {
        self.changes = self.changes.wrapping_add(1);
        self.fold_in(key, first_ms, count);
    }

    fn fold_in(&mut self, key: FlowKey, first_ms: i64, count: u32) {
        let key = if self.pending.len() >= Self::MAX_PENDING && !self.pending.contains_key(&key) {
            summary(key)
        } else {
            key
        };
        merge(&mut self.pending, key, first_ms, count);
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Distinct flows not yet acknowledged.
    fn unacknowledged(&self) -> usize {
        self.pending.len() + self.in_flight.len()
    }

    /// What a checkpoint writes: pending and in-flight entries, merged.
    fn snapshot(&self) -> Vec<Entry> {
        let mut all = self.pending.clone();
        for (k, (t, n)) in &self.in_flight {
            merge(&mut all, k.clone(), *t, *n);
        }
        all.into_iter().collect()
    }

    /// The `max` oldest entries, moved in flight (a report takes one batch at a time).
    fn take(&mut self, max: usize) -> Vec<pb::DeniedFlow> {
        self.restore();
        let mut by_age: Vec<(i64, &FlowKey)> = self.pending.iter().map(|(k, (t, _))| (*t, k)).collect();
        if by_age.len() > max {
            by_age.select_nth_unstable(max);
            by_age.truncate(max);
        }
        let keys: Vec<FlowKey> = by_age.into_iter().map(|(_, k)| k.clone()).collect();
        for k in keys {
            if let Some(v) = self.pending.remove(&k) {
                self.in_flight.insert(k, v);
            }
        }
        self.in_flight
            .iter()
            .map(|((workload, peer, tenant, direction, src, dst, dport, protocol, reason), (t, count))| {
                pb::DeniedFlow {
                    time_unix_ms: *t,
                    workload: workload.clone(),
                    peer: peer.clone(),
                    tenant: tenant.clone(),
                    direction: direction.clone(),
                    src: src.clone(),
                    dst: dst.clone(),
                    dport: *dport,
                    protocol: protocol.clone(),
                    reason: reason.clone(),
                    count: *count,
                }
            })
            .collect()
    }

    /// Put back what a failed report took.
    fn restore(&mut self) {
        for (k, (t, n)) in std::mem::take(&mut self.in_flight) {
            self.fold_in(k, t, n);
        }
    }

    /// The report in flight was accepted: its entries are gone (true if there were any).
    fn acknowledged(&mut self) -> bool {
        if self.in_flight.is_empty() {
            return false;
        }
        self.in_flight.clear();
        self.changes = self.changes.wrapping_add(1);
        true
    }
}

/// The summary entry a flow folds into when too many distinct flows are pending.
fn summary(k: FlowKey) -> FlowKey {
    let any = || "*".to_owned();
    (k.0, any(), k.2, k.3, any(), any(), 0, any(), k.8)
}

async fn session(
    cfg: &ControllerConfig,
    files: &ztseg_controller::pki::ClientFiles,
    engine: &Arc<Mutex<Engine>>,
    pending: &Pending,
) -> Result<()> {
    let denied = &pending.flows;
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
        .map_err(|s| call_error("subscribe", &s))?
        .into_inner();
    {
        let mut e = lock(engine);
        e.controller_connected = true;
        e.controller_last_contact = Some(Instant::now());
        e.controller_error = None;
        e.controller_retry = Duration::ZERO;
    }
    log::info("controller connected", &[("endpoint", &cfg.endpoint), ("from_version", &from.to_string())]);
    report(&mut client, engine, Vec::new()).await?;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    let mut last_report = Instant::now();
    let mut renewal_check = Instant::now();
    loop {
        tokio::select! {
            msg = stream.message() => {
                let u = msg.map_err(|s| call_error("policy stream", &s))?
                    .context("the controller closed the policy stream")?;
                apply_update(engine, u).await?;
                report(&mut client, engine, Vec::new()).await?;
                last_report = Instant::now();
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
                let waiting = !fold(denied).is_empty();
                if waiting || last_report.elapsed() >= Duration::from_secs(5) {
                    // One report per second at most, of the oldest pending flows.
                    // The batch stays in flight (and in checkpoints) until acknowledged.
                    let batch = fold(denied).take(ztseg_controller::service::MAX_DENIED_PER_REPORT);
                    if let Err(e) = report(&mut client, engine, batch).await {
                        fold(denied).restore();
                        return Err(e);
                    }
                    pending.acknowledge();
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
        .map_err(|s| call_error("report", &s))?;
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
        e.controller_last_update = Some((u.snapshot, u.base_version));
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use ztseg_controller::{
        auth::Role,
        pki::{self, Ca, ClientFiles},
        server,
    };

    use super::*;

    fn key(workload: &str, src: &str, dport: u32) -> FlowKey {
        let s = str::to_owned;
        (
            s(workload),
            s("peer"),
            s("t1"),
            s("ingress"),
            s(src),
            s("10.0.0.1"),
            dport,
            s("TCP"),
            s("drop_default"),
        )
    }

    /// Repeats fold into one entry; past the cap new flows fold into their workload's summary
    /// and no packet goes uncounted; reports take the oldest first, at most the maximum; a
    /// failed report's batch is put back.
    #[test]
    fn denied_flows_fold_bounded_and_oldest_first() {
        let mut d = DeniedFlows::default();
        d.add(key("a", "10.9.0.1", 80), 100);
        d.add(key("a", "10.9.0.1", 80), 150);
        assert_eq!(d.pending.len(), 1);
        assert_eq!(d.pending[&key("a", "10.9.0.1", 80)], (100, 2));

        // A scan from many sources on many ports: more distinct flows than the cap.
        let total = u32::try_from(DeniedFlows::MAX_PENDING).unwrap() + 5_000;
        for i in 0..total {
            d.add(key("b", &format!("10.8.{}.{}", i / 250, i % 250), 1000 + i % 3000), 200 + i64::from(i));
        }
        let counted: u64 = d.pending.values().map(|(_, n)| u64::from(*n)).sum();
        assert_eq!(counted, u64::from(total) + 2, "every denied packet counted");
        assert!(d.pending.len() <= DeniedFlows::MAX_PENDING + 1, "{}", d.pending.len());
        let sum = d.pending.get(&summary(key("b", "x", 0))).expect("summary entry");
        assert!(sum.1 > 0);

        let first = d.take(3);
        assert!(d.acknowledged());
        assert_eq!(first.len(), 3);
        assert_eq!(first.iter().map(|f| f.time_unix_ms).min(), Some(100));
        assert!(first.iter().all(|f| f.time_unix_ms <= 201), "oldest first: {first:?}");
        let before = d.pending.len();
        let batch = d.take(ztseg_controller::service::MAX_DENIED_PER_REPORT);
        assert_eq!(batch.len(), ztseg_controller::service::MAX_DENIED_PER_REPORT);
        assert_eq!(d.pending.len(), before - batch.len());
        d.restore();
        assert_eq!(d.pending.len(), before, "a failed report loses nothing");
        let mut left = 0;
        while !d.is_empty() {
            left += d.take(1000).iter().map(|f| u64::from(f.count)).sum::<u64>();
            assert!(d.acknowledged());
        }
        let taken: u64 = first.iter().map(|f| u64::from(f.count)).sum();
        assert_eq!(left + taken, u64::from(total) + 2);
    }

    /// Failures back off from 200 ms to 2 s and start over after a session that held; refusals
    /// (revoked, wrong role) back off from 5 s to a minute, whatever came before.
    #[test]
    fn refusals_back_off_to_a_minute_and_failures_to_two_seconds() {
        let ms = Duration::from_millis;
        let short = ms(50);
        let mut w = Duration::ZERO;
        let mut failures = Vec::new();
        for _ in 0..6 {
            w = next_wait(w, short, false);
            failures.push(w);
        }
        assert_eq!(failures, [ms(200), ms(400), ms(800), ms(1600), ms(2000), ms(2000)]);
        assert_eq!(next_wait(w, Duration::from_secs(11), false), ms(200), "a session that held");
        let mut refusals = Vec::new();
        for _ in 0..6 {
            w = next_wait(w, short, true);
            refusals.push(w.as_secs());
        }
        assert_eq!(refusals, [5, 10, 20, 40, 60, 60]);
        assert_eq!(next_wait(w, Duration::from_secs(11), true), Duration::from_mins(1), "still refused");
        assert_eq!(next_wait(Duration::ZERO, short, true), Duration::from_secs(5));
        // A refusal is told apart from a controller that cannot answer.
        for (status, refused) in [
            (tonic::Status::unauthenticated("the certificate of enforcer/n1 was revoked"), true),
            (tonic::Status::permission_denied("role operator may not call Distribution/Subscribe"), true),
            (tonic::Status::unavailable("store down"), false),
            (tonic::Status::internal("bug"), false),
        ] {
            let e = call_error("subscribe", &status);
            assert_eq!(e.downcast_ref::<Refused>().is_some(), refused, "{status:?}");
            assert!(format!("{e:#}").contains(status.message()), "{e:#}");
        }
    }

    fn scratch(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ztseg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    /// The checkpoint policy: written when the flows changed, not rewritten when they did not
    /// (moving a batch in flight changes nothing), replaced without the acknowledged entries,
    /// removed when nothing is left. A crash — a new load on the same directory, nothing
    /// saved — finds what the last checkpoint wrote, and the file stays until replaced.
    #[test]
    fn checkpoints_follow_changes_and_survive_a_crash() {
        let dir = scratch("checkpoint");
        let file = dir.join(PENDING_FILE);
        let p = Pending::load(&dir);
        assert_eq!(p.checkpoint().unwrap(), None, "nothing changed, nothing written");
        assert!(!file.exists());
        fold(&p.flows).add(key("a", "10.9.0.1", 80), 100);
        fold(&p.flows).add(key("a", "10.9.0.1", 80), 120);
        fold(&p.flows).add(key("b", "10.9.0.2", 81), 130);
        assert_eq!(p.checkpoint().unwrap(), Some(2));

        // Unchanged: not rewritten (a marker put in its place stays).
        let written = std::fs::read(&file).unwrap();
        std::fs::write(&file, b"marker").unwrap();
        assert_eq!(p.checkpoint().unwrap(), None);
        assert_eq!(std::fs::read(&file).unwrap(), b"marker");
        std::fs::write(&file, &written).unwrap();

        let crashed = Pending::load(&dir);
        assert_eq!(fold(&crashed.flows).pending.get(&key("a", "10.9.0.1", 80)), Some(&(100, 2)));
        assert_eq!(crashed.len(), 2);
        assert!(file.exists(), "kept until a checkpoint replaces it");
        assert_eq!(crashed.checkpoint().unwrap(), None, "what was read is what the file holds");

        // A report in flight: its flows are not acknowledged yet, so a crash still finds them.
        let batch = fold(&p.flows).take(1);
        assert_eq!(batch.len(), 1);
        assert_eq!(p.checkpoint().unwrap(), None, "in flight is still unreported");
        fold(&p.flows).add(key("c", "10.9.0.3", 82), 140);
        assert_eq!(p.checkpoint().unwrap(), Some(3));
        assert_eq!(Pending::load(&dir).len(), 3);

        // Acknowledged: the checkpoint drops the batch; a restart does not send it again.
        p.acknowledge();
        assert_eq!(p.checkpoint().unwrap(), Some(2));
        let after = Pending::load(&dir);
        assert!(!fold(&after.flows).pending.contains_key(&key("a", "10.9.0.1", 80)), "acknowledged");
        assert_eq!(after.len(), 2);

        // Everything acknowledged: the file is removed.
        let rest = fold(&p.flows).take(ztseg_controller::service::MAX_DENIED_PER_REPORT);
        assert_eq!(rest.len(), 2);
        p.acknowledge();
        assert_eq!(p.checkpoint().unwrap(), Some(0));
        assert!(!file.exists(), "removed when emptied");
        assert!(Pending::load(&dir).is_empty());
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// A failed report puts its batch back unchanged (nothing to write); an unreadable file is
    /// set aside, not trusted and not lost.
    #[test]
    fn failed_reports_and_unreadable_files() {
        let dir = scratch("unreadable");
        let p = Pending::load(&dir);
        fold(&p.flows).add(key("a", "10.9.0.1", 80), 100);
        assert_eq!(p.checkpoint().unwrap(), Some(1));
        let _ = fold(&p.flows).take(10);
        fold(&p.flows).restore();
        assert_eq!(p.checkpoint().unwrap(), None);
        assert_eq!(fold(&p.flows).pending.len(), 1, "put back");
        std::fs::write(dir.join(PENDING_FILE), b"{not json").unwrap();
        assert!(Pending::load(&dir).is_empty());
        assert!(dir.join("denied-flows.json.bad").exists(), "set aside");
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The checkpoint task writes a change within a second, and an acknowledgement at once
    /// (not an interval later).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_checkpoint_task_writes_changes_and_acknowledgements() {
        let dir = scratch("checkpoint-task");
        let file = dir.join(PENDING_FILE);
        let p = Pending::load(&dir);
        let task = tokio::spawn(p.clone().checkpoints());
        let wait = |present: bool| {
            let file = file.clone();
            async move {
                let t0 = Instant::now();
                while file.exists() != present {
                    assert!(t0.elapsed() < Duration::from_secs(5), "present={present} not reached");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                t0.elapsed()
            }
        };
        // Let the first (immediate) tick pass, then change something.
        tokio::time::sleep(Duration::from_millis(100)).await;
        fold(&p.flows).add(key("a", "10.9.0.1", 80), 100);
        let took = wait(true).await;
        assert!(took <= CHECKPOINT_EVERY + Duration::from_millis(300), "written after {took:?}");
        let _ = fold(&p.flows).take(10);
        p.acknowledge();
        let took = wait(false).await;
        assert!(took < Duration::from_millis(700), "removed {took:?} after the acknowledgement");
        task.abort();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn validity(files: &ClientFiles) -> (i64, i64) {
        let pem = std::fs::read_to_string(&files.cert).unwrap();
        pki::validity_of(&pki::cert_der(&pem).unwrap()).unwrap()
    }

    /// An enforcer whose certificate is in the last third of its lifetime renews it through
    /// the controller before connecting: same identity, new key, a later expiry. One that is
    /// not due keeps its files untouched. Real controller (embedded store) over mTLS.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_due_for_renewal_is_renewed_before_the_session() {
        let root = std::env::temp_dir().join(format!("ztseg-renew-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let data = root.join("controller");
        server::init(&data, "ztseg.local", &[], None).unwrap();
        let ca = Ca::load(&data, None).unwrap();
        let ca_pem = std::fs::read_to_string(data.join(pki::CA_CERT)).unwrap();
        // 2 h 30 min of lifetime, 2 h of it gone: due. And one issued just now: not due.
        let now = time::OffsetDateTime::now_utc();
        let old = ca
            .issue_client_at(Role::Enforcer, "n1", now - time::Duration::hours(2), Duration::from_mins(150))
            .unwrap();
        let fresh = ca.issue_client(Role::Enforcer, "n2", Duration::from_hours(24)).unwrap();
        let ids = root.join("identity");
        let due_files = ClientFiles::in_dir(&ids, "n1");
        due_files.save(&old, &ca_pem).unwrap();
        let fresh_files = ClientFiles::in_dir(&ids, "n2");
        fresh_files.save(&fresh, &ca_pem).unwrap();

        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let listen = listener.local_addr().unwrap();
        drop(listener);
        let cfg = server::Config {
            data_dir: data.clone(),
            listen,
            store: server::StoreConfig::Embedded,
            name: "test".into(),
            siem: Vec::new(),
            rejected_audit: ztseg_controller::limit::RejectPolicy::default(),
            denied_flow_audit: ztseg_controller::limit::FlowLimiter::DEFAULT,
            keep_versions: 0,
            metrics_addr: None,
            ca_passphrase: None,
        };
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let ctl = tokio::spawn(server::run(cfg, async move {
            let _ = stop_rx.await;
        }));
        let t0 = Instant::now();
        while tokio::net::TcpStream::connect(listen).await.is_err() {
            assert!(t0.elapsed() < Duration::from_secs(10), "controller did not start");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        let endpoint = listen.to_string();
        let cc = |id: &str| ControllerConfig {
            endpoint: endpoint.clone(),
            identity_dir: ids.clone(),
            identity: Some(id.into()),
            report_denied: false,
        };
        let (nb0, na0) = validity(&due_files);
        let key0 = std::fs::read(&due_files.key).unwrap();
        assert!(due(&due_files).unwrap());
        renew_if_due(&cc("n1"), &due_files).await.unwrap();
        let (nb1, na1) = validity(&due_files);
        assert!(nb1 > nb0 && na1 > na0, "renewed: {nb0}..{na0} -> {nb1}..{na1}");
        assert_ne!(std::fs::read(&due_files.key).unwrap(), key0, "a new key");
        let der = pki::cert_der(&std::fs::read_to_string(&due_files.cert).unwrap()).unwrap();
        let id = pki::identity_of(&der, "ztseg.local").unwrap();
        assert_eq!((id.role, id.name.as_str()), (Role::Enforcer, "n1"));
        assert!(!due(&due_files).unwrap(), "no longer due");
        // The renewed identity works for a session.
        server::connect(&endpoint, &due_files).await.unwrap();

        let before = (std::fs::read(&fresh_files.cert).unwrap(), std::fs::read(&fresh_files.key).unwrap());
        renew_if_due(&cc("n2"), &fresh_files).await.unwrap();
        let after = (std::fs::read(&fresh_files.cert).unwrap(), std::fs::read(&fresh_files.key).unwrap());
        assert_eq!(before, after, "not due: untouched");

        let _ = stop_tx.send(());
        let _ = ctl.await;
        let _ = std::fs::remove_dir_all(&root);
    }
}
