//! `ztseg controller init` and `ztseg controller run`: the TLS listener and the services.
//!
//! TLS 1.3 only, ALPN h2. Client certificates are verified against the controller's CA
//! (chain, validity period, client-auth usage) during the handshake; a connection may come
//! without one (enrollment), and every other RPC then refuses it. Failed handshakes — unknown
//! CA, expired certificate, wrong usage, or anything else — are recorded in the audit log as
//! `tls.rejected` with the peer's address.

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject as _};
use tokio::sync::mpsc;
use ztseg_api::controller::{
    audit_server::AuditServer, distribution_server::DistributionServer, enrollment_server::EnrollmentServer,
    policy_server::PolicyServer,
};

use crate::{
    audit,
    auth::Role,
    pki::{self, Ca, ClientFiles},
    service::{Ctl, Services},
    store::Store,
};

/// Store backend selection.
#[derive(Debug, Clone)]
pub enum StoreConfig {
    /// `<data-dir>/ztseg.redb`.
    Embedded,
    /// etcd endpoints (`http://127.0.0.1:2379`, or `https://` with `tls`), key prefix, and how
    /// far behind the present the leader compacts etcd's history (zero: never).
    Etcd {
        endpoints: Vec<String>,
        prefix: String,
        tls: Option<crate::store::etcd::EtcdTls>,
        compaction_interval: std::time::Duration,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub data_dir: PathBuf,
    pub listen: SocketAddr,
    pub store: StoreConfig,
    /// Name of this controller instance (leader election, logs).
    pub name: String,
    /// SIEM sinks (`file:PATH`, `syslog:HOST:PORT`, `http://HOST:PORT/PATH`).
    pub siem: Vec<String>,
    /// How many rejected handshakes and refused anonymous calls per source address, and
    /// refused calls per identity, are audited in full per window.
    pub rejected_audit: crate::limit::RejectPolicy,
    /// How many `flow.denied` records per enforcer and window are audited in full.
    pub denied_flow_audit: crate::limit::RejectPolicy,
    /// Policy versions kept after each commit (0: all).
    pub keep_versions: u64,
    /// Prometheus `/metrics`, `/healthz` and `/readyz` (plain HTTP), if set.
    pub metrics_addr: Option<SocketAddr>,
    /// Decrypts the CA key when it is stored encrypted.
    pub ca_passphrase: Option<pki::Passphrase>,
}

/// `ztseg controller init`: create the CA, the server certificate and a first admin identity
/// (written to `<data-dir>/admin/`). Refuses to overwrite an existing CA. With a passphrase
/// the CA key is stored encrypted (PKCS#8, PBES2).
pub fn init(
    data_dir: &Path,
    trust_domain: &str,
    sans: &[String],
    passphrase: Option<&pki::Passphrase>,
) -> Result<ClientFiles> {
    if data_dir.join(pki::CA_KEY).exists() {
        bail!("{} already holds a CA; refusing to replace it", data_dir.display());
    }
    std::fs::create_dir_all(data_dir)?;
    let ca = Ca::generate(trust_domain)?;
    ca.save(data_dir, passphrase)?;
    let mut names: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    names.extend(sans.iter().cloned());
    names.dedup();
    let server = ca.issue_server(&names, Duration::from_hours(365 * 24))?;
    std::fs::write(data_dir.join(pki::SERVER_CERT), &server.cert_pem)?;
    pki::write_private(&data_dir.join(pki::SERVER_KEY), server.key_pem.as_bytes())?;
    let admin = ca.issue_client(Role::Admin, "admin", pki::DEFAULT_CERT_TTL)?;
    let files = ClientFiles::in_dir(&data_dir.join("admin"), "admin");
    files.save(&admin, &ca.cert_pem)?;
    Ok(files)
}

fn tls_config(data_dir: &Path) -> Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(data_dir.join(pki::CA_CERT)).context("reading ca.pem")? {
        roots.add(c.context("parsing ca.pem")?)?;
    }
    let inner =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
            .allow_unauthenticated()
            .build()
            .context("building the client verifier")?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(data_dir.join(pki::SERVER_CERT))
        .context("reading server.pem")?
        .collect::<Result<_, _>>()?;
    let key =
        PrivateKeyDer::from_pem_file(data_dir.join(pki::SERVER_KEY)).context("reading server-key.pem")?;
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(inner)
        .with_single_cert(certs, key)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(cfg)
}

/// Open the configured store.
pub async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>> {
    Ok(match &cfg.store {
        StoreConfig::Embedded => {
            Arc::new(crate::store::embedded::EmbeddedStore::open(&cfg.data_dir.join("ztseg.redb"))?)
        }
        StoreConfig::Etcd { endpoints, prefix, tls, compaction_interval } => {
            let s = crate::store::etcd::EtcdStore::connect_with(endpoints, prefix, &cfg.name, tls.as_ref())
                .await?;
            s.compact_history_every(*compaction_interval);
            Arc::new(s)
        }
    })
}

/// Serve until `shutdown` resolves.
pub async fn run(
    cfg: Config,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let ca = Ca::load(&cfg.data_dir, cfg.ca_passphrase.as_ref())?;
    run_with_ca(cfg, ca, shutdown).await
}

/// [`run`] with the CA already loaded (by a caller that checked it before starting; an
/// encrypted key then costs one key derivation, not two).
pub async fn run_with_ca(
    cfg: Config,
    ca: Ca,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let store = open_store(&cfg).await?;
    let ctl = Ctl::new(store, ca, cfg.rejected_audit);
    ctl.set_denied_flow_audit(cfg.denied_flow_audit);
    ctl.set_keep_versions(cfg.keep_versions);
    if let Some(addr) = cfg.metrics_addr {
        let l =
            tokio::net::TcpListener::bind(addr).await.with_context(|| format!("binding metrics {addr}"))?;
        let ctl = ctl.clone();
        tokio::spawn(crate::http::serve(l, move |path: String| {
            let ctl = ctl.clone();
            async move {
                use crate::http::Reply;
                match path.as_str() {
                    "/metrics" => Reply::metrics(crate::metrics::render(&ctl).await),
                    "/healthz" => Reply::text("200 OK", "ok"),
                    "/readyz" => Reply::ready(ctl.store.head().await.is_ok()),
                    _ => Reply::not_found(),
                }
            }
        }));
    }
    spawn_housekeeping(&ctl);
    let (rej_tx, rej_rx) = mpsc::unbounded_channel::<(SocketAddr, String)>();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls_config(&cfg.data_dir)?));
    let listener =
        tokio::net::TcpListener::bind(cfg.listen).await.with_context(|| format!("binding {}", cfg.listen))?;

    spawn_reject_auditor(ctl.clone(), rej_rx, cfg.rejected_audit);
    for sink in &cfg.siem {
        let exporter = crate::siem::Exporter::new(sink, ctl.store.clone(), ctl.appended.clone())?;
        tokio::spawn(exporter.run());
    }
    ctl.set_siem_sinks(&cfg.siem)?;

    let (conn_tx, conn_rx) = mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(crate::limit::MAX_PENDING_HANDSHAKES));
    tokio::spawn(async move {
        loop {
            let Ok((tcp, peer)) = listener.accept().await else { continue };
            let Ok(permit) = pending.clone().try_acquire_owned() else {
                drop(tcp);
                let _ = rej_tx.send((peer, "too many TLS handshakes in progress".into()));
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = acceptor.clone();
            let conn_tx = conn_tx.clone();
            let rej_tx = rej_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                match tokio::time::timeout(Duration::from_secs(10), acceptor.accept(tcp)).await {
                    Ok(Ok(tls)) => {
                        let _ = conn_tx.send(Ok::<_, std::io::Error>(tls)).await;
                    }
                    // Certificate failures (unknown CA, expired, wrong usage) and every other
                    // failed handshake are audited with the peer's address.
                    // A connection closed before any TLS was spoken (a port check) is not one.
                    Ok(Err(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {}
                    Ok(Err(e)) => {
                        let _ = rej_tx.send((peer, e.to_string()));
                    }
                    Err(_) => {
                        let _ = rej_tx.send((peer, "TLS handshake timed out".into()));
                    }
                }
            });
        }
    });
    eprintln!(
        "{}",
        log_line("info", "controller serving", &[("listen", &cfg.listen.to_string()), ("name", &cfg.name)])
    );
    let s = Services(ctl);
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)))
        .add_service(EnrollmentServer::new(s.clone()))
        .add_service(
            PolicyServer::new(s.clone())
                .max_decoding_message_size(64 << 20)
                .max_encoding_message_size(64 << 20),
        )
        .add_service(DistributionServer::new(s.clone()).max_encoding_message_size(64 << 20))
        .add_service(AuditServer::new(s).max_encoding_message_size(64 << 20))
        .serve_with_incoming_shutdown(tokio_stream::wrappers::ReceiverStream::new(conn_rx), shutdown)
        .await?;
    Ok(())
}

/// Periodic work of a running controller: the summaries of refusals and denied flows counted
/// but not recorded, as their windows end (every second), and, on the leader, the deletion of
/// expired join tokens (every [`crate::service::TOKEN_SWEEP`]).
fn spawn_housekeeping(ctl: &Arc<Ctl>) {
    // Summaries of refused calls (anonymous, and of identities) and of denied flows counted but
    // not recorded, as their windows end.
    {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                let drafts = ctl.suppressed_summaries();
                if !drafts.is_empty()
                    && let Err(e) = ctl.audit(drafts).await
                {
                    eprintln!("{}", log_line("error", "audit append failed", &[("error", e.message())]));
                }
            }
        });
    }
    // Expired join tokens are deleted by the leader.
    {
        let ctl = ctl.clone();
        tokio::spawn(async move {
            let leader = ctl.store.leadership();
            let mut tick = tokio::time::interval(crate::service::TOKEN_SWEEP);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                if !*leader.borrow() {
                    continue;
                }
                match ctl.expire_tokens(crate::now_ms()).await {
                    Ok(0) => {}
                    Ok(n) => eprintln!(
                        "{}",
                        log_line("info", "expired join tokens deleted", &[("tokens", &n.to_string())])
                    ),
                    Err(e) => eprintln!(
                        "{}",
                        log_line("error", "deleting expired join tokens failed", &[("error", e.message())])
                    ),
                }
            }
        });
    }
}

/// Audit rejected handshakes: batched, at most `policy.per_peer` records per source address
/// and window; the rest are counted into one `tls.rejected.suppressed` record per window.
fn spawn_reject_auditor(
    ctl: Arc<Ctl>,
    mut rej_rx: mpsc::UnboundedReceiver<(SocketAddr, String)>,
    policy: crate::limit::RejectPolicy,
) {
    let mut limiter = crate::limit::RejectLimiter::new(policy);
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut drafts = Vec::new();
            tokio::select! {
                first = rej_rx.recv() => {
                    let Some(first) = first else { break };
                    let mut batch = vec![first];
                    while let Ok(m) = rej_rx.try_recv() {
                        batch.push(m);
                    }
                    let now = std::time::Instant::now();
                    for (peer, reason) in batch {
                        if limiter.admit(peer.ip(), now) {
                            drafts.push(audit::Draft::new(
                                "anonymous",
                                "tls.rejected",
                                "denied",
                                serde_json::json!({ "peer": peer.to_string(), "reason": reason }),
                            ));
                        }
                    }
                }
                _ = tick.tick() => {
                    drafts = limiter.summaries("tls.rejected.suppressed", std::time::Instant::now());
                }
            }
            if drafts.is_empty() {
                continue;
            }
            if let Err(e) = ctl.audit(drafts).await {
                eprintln!("{}", log_line("error", "audit append failed", &[("error", &e.to_string())]));
            }
        }
    });
}

/// One structured JSON log line.
#[must_use]
pub fn log_line(level: &str, msg: &str, fields: &[(&str, &str)]) -> String {
    let mut m = serde_json::Map::new();
    m.insert("ts_ms".into(), crate::now_ms().into());
    m.insert("level".into(), level.into());
    m.insert("msg".into(), msg.into());
    for (k, v) in fields {
        m.insert((*k).into(), (*v).into());
    }
    serde_json::Value::Object(m).to_string()
}

/// A client channel to the controller with the identity in `files`.
pub async fn connect(endpoint: &str, files: &ClientFiles) -> Result<tonic::transport::Channel> {
    files.recover()?;
    let read = |p: &Path| std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()));
    let ca = read(&files.ca)?;
    let mut tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(ca));
    if files.cert.exists() {
        tls = tls.identity(tonic::transport::Identity::from_pem(read(&files.cert)?, read(&files.key)?));
    }
    connect_with(endpoint, tls).await
}

/// A client channel with an explicit TLS configuration (enrollment: no identity yet).
pub async fn connect_with(
    endpoint: &str,
    tls: tonic::transport::ClientTlsConfig,
) -> Result<tonic::transport::Channel> {
    let url = if endpoint.contains("://") { endpoint.to_owned() } else { format!("https://{endpoint}") };
    let ep = tonic::transport::Endpoint::from_shared(url.clone())
        .with_context(|| format!("controller endpoint {endpoint:?}"))?
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        // Short keep-alives: a lost controller is noticed (and shown as stale) in seconds.
        .http2_keep_alive_interval(Duration::from_secs(2))
        .keep_alive_timeout(Duration::from_secs(3))
        .keep_alive_while_idle(true);
    ep.connect().await.with_context(|| format!("connecting to the controller at {url}"))
}

/// Enroll: create a key and CSR, redeem `token`, write the identity to `files`.
pub async fn enroll(endpoint: &str, ca_file: &Path, token: &str, files: &ClientFiles) -> Result<String> {
    let ca = std::fs::read_to_string(ca_file).with_context(|| format!("reading {}", ca_file.display()))?;
    let tls =
        tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(&ca));
    let ch = connect_with(endpoint, tls).await?;
    let (csr, key_pem) = pki::new_csr()?;
    let r = ztseg_api::controller::enrollment_client::EnrollmentClient::new(ch)
        .enroll(ztseg_api::controller::EnrollRequest { token: token.to_owned(), csr_der: csr })
        .await
        .map_err(|s| anyhow::anyhow!("enrollment refused: {}", s.message()))?
        .into_inner();
    files.save(&pki::Issued { cert_pem: r.certificate_pem, key_pem }, &r.ca_pem)?;
    Ok(r.identity)
}

/// Renew the identity in `files` through the controller (same role and name, new key).
pub async fn renew(endpoint: &str, files: &ClientFiles) -> Result<String> {
    let ch = connect(endpoint, files).await?;
    let (csr, key_pem) = pki::new_csr()?;
    let r = ztseg_api::controller::enrollment_client::EnrollmentClient::new(ch)
        .renew(ztseg_api::controller::RenewRequest { csr_der: csr })
        .await
        .map_err(|s| anyhow::anyhow!("renewal refused: {}", s.message()))?
        .into_inner();
    files.save(&pki::Issued { cert_pem: r.certificate_pem, key_pem }, &r.ca_pem)?;
    Ok(r.identity)
}
