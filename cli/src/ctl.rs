//! CLI commands that talk to (or run) the controller: `ztseg controller ...`, `ztseg enroll`,
//! `ztseg policy apply|diff|get|history|rollback|prune`, `ztseg audit list|verify`.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use ztseg_api::controller::{self as pb};
use ztseg_controller::pki::ClientFiles;

/// How to reach the controller and who we are.
#[derive(clap::Args, Debug, Clone)]
pub struct CtlArgs {
    /// Controller address (`host:port`).
    #[arg(long, env = "ZTSEG_CONTROLLER", default_value = "127.0.0.1:7443")]
    pub controller: String,
    /// Directory with `ca.pem`, `<identity>.pem` and `<identity>-key.pem`
    /// (default: `$HOME/.config/ztseg`).
    #[arg(long, env = "ZTSEG_IDENTITY_DIR")]
    pub identity_dir: Option<PathBuf>,
    /// File stem of the identity in the identity directory.
    #[arg(long, env = "ZTSEG_IDENTITY", default_value = "admin")]
    pub identity: String,
}

impl CtlArgs {
    #[must_use]
    pub fn files(&self) -> ClientFiles {
        let dir = self.identity_dir.clone().unwrap_or_else(default_identity_dir);
        ClientFiles::in_dir(&dir, &self.identity)
    }

    pub async fn channel(&self) -> Result<tonic::transport::Channel> {
        let f = self.files();
        if !f.cert.exists() {
            bail!(
                "no identity at {} (enroll with `ztseg enroll`, or pass --identity-dir/--identity)",
                f.cert.display()
            );
        }
        ztseg_controller::server::connect(&self.controller, &f).await
    }
}

fn default_identity_dir() -> PathBuf {
    std::env::var_os("HOME")
        .map_or_else(|| PathBuf::from("/etc/ztseg"), |h| PathBuf::from(h).join(".config/ztseg"))
}

/// Policy documents from files and directories: a directory contributes every `.yaml`/`.yml`
/// below it, named by its path relative to the directory; a file is named by its file name.
pub fn read_documents(paths: &[PathBuf]) -> Result<BTreeMap<String, String>> {
    fn walk(base: &Path, dir: &Path, out: &mut BTreeMap<String, String>) -> Result<()> {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .with_context(|| format!("reading {}", dir.display()))?
            .flatten()
            .map(|e| e.path())
            .collect();
        entries.sort();
        for p in entries {
            if p.is_dir() {
                walk(base, &p, out)?;
            } else if p.extension().is_some_and(|x| x == "yaml" || x == "yml") {
                let name = p.strip_prefix(base).unwrap_or(&p).to_string_lossy().into_owned();
                out.insert(
                    name,
                    std::fs::read_to_string(&p).with_context(|| format!("reading {}", p.display()))?,
                );
            }
        }
        Ok(())
    }
    let mut out = BTreeMap::new();
    for p in paths {
        if p.is_dir() {
            walk(p, p, &mut out)?;
        } else {
            let name = p.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            if out.insert(name.clone(), text).is_some() {
                bail!("two documents named {name:?}; put them in a directory instead");
            }
        }
    }
    Ok(out)
}

fn docs_pb(docs: BTreeMap<String, String>) -> Vec<pb::Document> {
    docs.into_iter().map(|(name, content)| pb::Document { name, content }).collect()
}

/// A gRPC status as an error that says what the controller said.
#[expect(clippy::needless_pass_by_value, reason = "used as `map_err(st)`")]
pub(crate) fn st(s: tonic::Status) -> anyhow::Error {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled => {
            anyhow::anyhow!("controller call failed ({:?}): {}", s.code(), s.message())
        }
        code => anyhow::anyhow!("controller refused ({code:?}): {}", s.message()),
    }
}

#[must_use]
pub fn time_str(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| ms.to_string())
}

pub async fn token(a: &CtlArgs, role: &str, name: &str, ttl: u64, cert_ttl: u64) -> Result<String> {
    Ok(create_token(a, role, name, ttl, cert_ttl).await?.token)
}

/// A new join token and its id.
pub async fn create_token(
    a: &CtlArgs,
    role: &str,
    name: &str,
    ttl: u64,
    cert_ttl: u64,
) -> Result<pb::CreateJoinTokenResponse> {
    pb::enrollment_client::EnrollmentClient::new(a.channel().await?)
        .create_join_token(pb::CreateJoinTokenRequest {
            role: role.into(),
            name: name.into(),
            ttl_seconds: ttl,
            cert_ttl_seconds: cert_ttl,
        })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn revoke(a: &CtlArgs, role: &str, name: &str) -> Result<pb::RevokeResponse> {
    pb::enrollment_client::EnrollmentClient::new(a.channel().await?)
        .revoke(pb::RevokeRequest { role: role.into(), name: name.into() })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

/// The outstanding join tokens (never their secrets).
pub async fn tokens(a: &CtlArgs) -> Result<Vec<pb::JoinTokenInfo>> {
    Ok(pb::enrollment_client::EnrollmentClient::new(a.channel().await?)
        .list_join_tokens(pb::ListJoinTokensRequest {})
        .await
        .map_err(st)?
        .into_inner()
        .tokens)
}

/// Delete one outstanding join token by its id (or a unique prefix of it).
pub async fn revoke_token(a: &CtlArgs, id: &str) -> Result<pb::JoinTokenInfo> {
    pb::enrollment_client::EnrollmentClient::new(a.channel().await?)
        .revoke_join_token(pb::RevokeJoinTokenRequest { id: id.into() })
        .await
        .map_err(st)?
        .into_inner()
        .token
        .context("the controller named no token")
}

pub async fn apply(
    a: &CtlArgs,
    paths: &[PathBuf],
    message: String,
    expected_version: u64,
    dry_run: bool,
) -> Result<pb::ApplyResponse> {
    let docs = read_documents(paths)?;
    if let Err(errors) = ztseg_controller::docs::validate(&docs) {
        bail!("policy rejected:\n{}", errors.join("\n"));
    }
    pb::policy_client::PolicyClient::new(a.channel().await?)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
        .apply(pb::ApplyRequest { documents: docs_pb(docs), expected_version, message, dry_run })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn diff(a: &CtlArgs, paths: &[PathBuf], against: u64) -> Result<pb::DiffResponse> {
    let docs = read_documents(paths)?;
    pb::policy_client::PolicyClient::new(a.channel().await?)
        .max_encoding_message_size(64 << 20)
        .max_decoding_message_size(64 << 20)
        .diff(pb::DiffRequest { documents: docs_pb(docs), against_version: against })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn get(a: &CtlArgs, version: u64) -> Result<pb::GetResponse> {
    pb::policy_client::PolicyClient::new(a.channel().await?)
        .max_decoding_message_size(64 << 20)
        .get(pb::GetRequest { version })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn history(a: &CtlArgs, limit: u32) -> Result<Vec<pb::VersionInfo>> {
    Ok(pb::policy_client::PolicyClient::new(a.channel().await?)
        .history(pb::HistoryRequest { limit })
        .await
        .map_err(st)?
        .into_inner()
        .versions)
}

pub async fn rollback(a: &CtlArgs, to_version: u64, message: String) -> Result<pb::ApplyResponse> {
    pb::policy_client::PolicyClient::new(a.channel().await?)
        .rollback(pb::RollbackRequest { to_version, message })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn prune(a: &CtlArgs, keep: u64) -> Result<pb::PolicyPruneResponse> {
    pb::policy_client::PolicyClient::new(a.channel().await?)
        .prune(pb::PolicyPruneRequest { keep })
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn enforcers(a: &CtlArgs) -> Result<pb::ListEnforcersResponse> {
    pb::distribution_client::DistributionClient::new(a.channel().await?)
        .list_enforcers(pb::ListEnforcersRequest {})
        .await
        .map_err(st)
        .map(tonic::Response::into_inner)
}

pub async fn audit_list(a: &CtlArgs, from: u64, limit: u32) -> Result<Vec<String>> {
    Ok(pb::audit_client::AuditClient::new(a.channel().await?)
        .max_decoding_message_size(64 << 20)
        .list(pb::AuditListRequest { from_seq: from, limit })
        .await
        .map_err(st)?
        .into_inner()
        .records)
}

/// Verify the audit chain through the controller, or offline in an embedded store file; each
/// anchor (`SEQ:HASH`) must be in the chain with that hash.
pub async fn audit_verify(a: &CtlArgs, data_dir: Option<&Path>, anchors: &[String]) -> Result<ExitCode> {
    let anchors = anchors
        .iter()
        .map(|s| ztseg_controller::audit::parse_anchor(s).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let r = if let Some(dir) = data_dir {
        let store = ztseg_controller::store::embedded::EmbeddedStore::open_existing(&dir.join("ztseg.redb"))?;
        ztseg_controller::service::verify_response(
            &ztseg_controller::service::verify_chain_anchored(&store, anchors).await?,
        )
    } else {
        let anchors = anchors.into_iter().map(|(seq, hash)| pb::AuditAnchor { seq, hash }).collect();
        pb::audit_client::AuditClient::new(a.channel().await?)
            .verify(pb::AuditVerifyRequest { anchors })
            .await
            .map_err(st)?
            .into_inner()
    };
    if r.ok {
        let pruned = if r.first_seq > 1 {
            format!(
                " (records {}..{}; those before {} archived and pruned, the base confirmed by the latest audit.prune record)",
                r.first_seq, r.last_seq, r.first_seq
            )
        } else {
            String::new()
        };
        let anchored =
            if r.anchors > 0 { format!("; {} anchors found in the chain", r.anchors) } else { String::new() };
        println!("audit log intact: {} records, hash chain verified{pruned}{anchored}", r.records);
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("audit log FAILED verification: {}", r.error);
        Ok(ExitCode::FAILURE)
    }
}

/// `ztseg controller run` options.
#[derive(clap::Args, Debug)]
pub struct RunArgs {
    /// Data directory (CA, server certificate, embedded store).
    #[arg(long, env = "ZTSEG_CONTROLLER_DATA_DIR", default_value = "/var/lib/ztseg/controller")]
    pub data_dir: PathBuf,
    #[arg(long, env = "ZTSEG_CONTROLLER_LISTEN", default_value = "127.0.0.1:7443")]
    pub listen: std::net::SocketAddr,
    /// `embedded` (one redb file in the data directory) or `etcd`.
    #[arg(long, env = "ZTSEG_CONTROLLER_STORE", value_parser = ["embedded", "etcd"], default_value = "embedded")]
    pub store: String,
    /// etcd endpoints, comma separated (`http://127.0.0.1:2379,...`).
    #[arg(long, env = "ZTSEG_ETCD_ENDPOINTS", value_delimiter = ',')]
    pub etcd_endpoints: Vec<String>,
    #[arg(long, env = "ZTSEG_ETCD_PREFIX", default_value = "/ztseg")]
    pub etcd_prefix: String,
    /// CA certificate of the etcd members (TLS; endpoints must be `https://`).
    #[arg(long, env = "ZTSEG_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// Client certificate for etcd's `--client-cert-auth` (with `--etcd-key`).
    #[arg(long, env = "ZTSEG_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    #[arg(long, env = "ZTSEG_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
    /// etcd store: every this many seconds the leader compacts etcd's history to the revision
    /// it saw one interval earlier (watchers less than that behind are never cut off). 0: off.
    #[arg(long, env = "ZTSEG_ETCD_COMPACTION_INTERVAL", default_value_t = ztseg_controller::store::etcd::DEFAULT_COMPACTION_INTERVAL.as_secs(), value_parser = clap::value_parser!(u64).range(0..=604_800))]
    pub etcd_compaction_interval: u64,
    /// Name of this controller instance.
    #[arg(long, env = "ZTSEG_CONTROLLER_NAME")]
    pub name: Option<String>,
    /// SIEM sink (repeatable): `file:PATH`, `syslog:HOST:PORT` (UDP), `syslog+tcp:HOST:PORT`,
    /// `http://HOST:PORT/PATH`.
    #[arg(long, env = "ZTSEG_SIEM", value_delimiter = ',')]
    pub siem: Vec<String>,
    /// Failed TLS handshakes, and refused anonymous calls, audited in full per source address
    /// and window, and refused calls of callers with a valid certificate (wrong role, revoked)
    /// per identity and window; further ones are counted into one `tls.rejected.suppressed` /
    /// `anonymous.suppressed` / `api.denied.suppressed` record when the window ends.
    #[arg(long, env = "ZTSEG_AUDIT_REJECTED_PER_PEER", default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_rejected_per_peer: u32,
    /// Length of that window in seconds.
    #[arg(long, env = "ZTSEG_AUDIT_REJECTED_WINDOW", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub audit_rejected_window: u64,
    /// Denied flows reported by one enforcer recorded in full (`flow.denied`) per window;
    /// further ones are counted into one `flow.denied.suppressed` record when it ends.
    #[arg(long, env = "ZTSEG_AUDIT_DENIED_FLOWS_PER_ENFORCER", default_value_t = 6000, value_parser = clap::value_parser!(u32).range(1..))]
    pub audit_denied_flows_per_enforcer: u32,
    /// Length of that window in seconds.
    #[arg(long, env = "ZTSEG_AUDIT_DENIED_FLOWS_WINDOW", default_value_t = 60, value_parser = clap::value_parser!(u64).range(1..=86_400))]
    pub audit_denied_flows_window: u64,
    /// Policy history retention: after each apply or rollback, keep the newest N versions and
    /// prune the rest (as `ztseg policy prune --keep N` would). 0 keeps every version.
    #[arg(long, env = "ZTSEG_KEEP_VERSIONS", default_value_t = 0)]
    pub keep_versions: u64,
    /// Serve Prometheus `/metrics`, `/healthz` and `/readyz` on this address (plain HTTP; keep
    /// it on a management network). Off unless set.
    #[arg(long, env = "ZTSEG_CONTROLLER_METRICS_ADDR")]
    pub metrics_addr: Option<std::net::SocketAddr>,
    /// Passphrase of an encrypted CA key (first line of the file).
    #[arg(long, env = "ZTSEG_CA_PASSPHRASE_FILE")]
    pub ca_passphrase_file: Option<PathBuf>,
}

pub fn run_controller(a: RunArgs) -> Result<ExitCode> {
    use ztseg_controller::pki::{CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY};
    for f in [CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY] {
        if !a.data_dir.join(f).is_file() {
            eprintln!(
                "error: --data-dir {} has no {f} (create it with `ztseg controller init --data-dir {}`)",
                a.data_dir.display(),
                a.data_dir.display()
            );
            return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
        }
    }
    // The CA must load before anything starts: a missing or wrong passphrase is a
    // configuration error, reported as one.
    let ca_passphrase =
        match a.ca_passphrase_file.as_deref().map(ztseg_controller::pki::Passphrase::from_file) {
            None => None,
            Some(Ok(p)) => Some(p),
            Some(Err(e)) => {
                eprintln!("error: --ca-passphrase-file: {e:#}");
                return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
            }
        };
    let ca = match ztseg_controller::pki::Ca::load(&a.data_dir, ca_passphrase.as_ref()) {
        Ok(ca) => ca,
        Err(e) => {
            eprintln!("error: {e:#}");
            return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
        }
    };
    if !ztseg_controller::pki::Ca::key_encrypted(&a.data_dir).unwrap_or(true) {
        eprintln!(
            "warning: the CA key in {} is stored unencrypted (protect it with `ztseg controller protect-ca-key`)",
            a.data_dir.display()
        );
    }
    let store = if a.store == "etcd" {
        if a.etcd_endpoints.is_empty() {
            eprintln!("error: --store etcd needs --etcd-endpoints");
            return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
        }
        if a.etcd_cert.is_some() && a.etcd_ca.is_none() {
            eprintln!("error: --etcd-cert needs --etcd-ca");
            return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
        }
        let tls = a
            .etcd_ca
            .map(|ca| ztseg_controller::store::etcd::EtcdTls { ca, identity: a.etcd_cert.zip(a.etcd_key) });
        ztseg_controller::server::StoreConfig::Etcd {
            endpoints: a.etcd_endpoints,
            prefix: a.etcd_prefix,
            tls,
            compaction_interval: std::time::Duration::from_secs(a.etcd_compaction_interval),
        }
    } else {
        ztseg_controller::server::StoreConfig::Embedded
    };
    for s in &a.siem {
        if let Err(e) = ztseg_controller::siem::Sink::parse(s) {
            eprintln!("error: --siem: {e}");
            return Ok(ExitCode::from(crate::daemon::EXIT_CONFIG));
        }
    }
    let name = a.name.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map_or_else(|_| "controller".into(), |h| h.trim().to_owned())
    });
    let cfg = ztseg_controller::server::Config {
        data_dir: a.data_dir,
        listen: a.listen,
        store,
        name,
        siem: a.siem,
        rejected_audit: ztseg_controller::limit::RejectPolicy {
            per_peer: a.audit_rejected_per_peer,
            window: std::time::Duration::from_secs(a.audit_rejected_window),
        },
        keep_versions: a.keep_versions,
        metrics_addr: a.metrics_addr,
        denied_flow_audit: ztseg_controller::limit::RejectPolicy {
            per_peer: a.audit_denied_flows_per_enforcer,
            window: std::time::Duration::from_secs(a.audit_denied_flows_window),
        },
        ca_passphrase,
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let shutdown = async {
            let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                () = async { if let Some(t) = term.as_mut() { t.recv().await; } else { std::future::pending::<()>().await } } => {}
            }
        };
        ztseg_controller::server::run_with_ca(cfg, ca, shutdown).await
    })?;
    Ok(ExitCode::SUCCESS)
}
