//! SIEM export: audit records as OCSF-style JSON lines.
//!
//! An exporter follows the audit log from a cursor kept in the store (one cursor per sink, so
//! a restart neither loses nor repeats records beyond the last unacknowledged batch) and runs
//! only while this controller is the leader. It wakes on every append and at least once a
//! second, so a record reaches its sink within about a second of being written.
//!
//! Sinks: `file:PATH` (appended, fsynced per batch), `syslog:HOST:PORT` (RFC 5424 over UDP,
//! one record per datagram; UDP has no acknowledgement, a receiver that is down loses records),
//! `syslog+tcp:HOST:PORT` (RFC 5424 over TCP with octet-counting framing, RFC 6587: a batch
//! counts as delivered once the receiver has taken every byte and the connection closed
//! cleanly; otherwise it is sent again), `http://HOST:PORT/PATH` (HTTP/1.1 POST of a batch as
//! `application/x-ndjson`; any 2xx acknowledges it).

use std::{fmt::Write as _, io::Write as _, path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context as _, Result, bail};
use serde_json::{Value, json};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Notify,
};

use crate::{audit::Record, store::Store};

/// OCSF schema version the field names follow.
pub const OCSF_VERSION: &str = "1.3.0";

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Sink {
    File(PathBuf),
    Syslog(String),
    SyslogTcp(String),
    Http { authority: String, path: String },
}

impl Sink {
    pub fn parse(s: &str) -> Result<Self> {
        if let Some(p) = s.strip_prefix("file:") {
            if p.is_empty() {
                bail!("SIEM sink {s:?}: file: needs a path");
            }
            return Ok(Self::File(PathBuf::from(p)));
        }
        if let Some(a) = s.strip_prefix("syslog:") {
            if !a.contains(':') {
                bail!("SIEM sink {s:?}: syslog: needs HOST:PORT");
            }
            return Ok(Self::Syslog(a.to_owned()));
        }
        if let Some(a) = s.strip_prefix("syslog+tcp:") {
            if !a.contains(':') {
                bail!("SIEM sink {s:?}: syslog+tcp: needs HOST:PORT");
            }
            return Ok(Self::SyslogTcp(a.to_owned()));
        }
        if let Some(rest) = s.strip_prefix("http://") {
            let (authority, path) =
                rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
            if authority.is_empty() {
                bail!("SIEM sink {s:?}: http:// needs HOST:PORT");
            }
            return Ok(Self::Http { authority: authority.to_owned(), path });
        }
        bail!(
            "SIEM sink {s:?}: use file:PATH, syslog:HOST:PORT, syslog+tcp:HOST:PORT or http://HOST:PORT/PATH"
        )
    }

    /// The store meta key of this sink's cursor (the last record it has taken).
    #[must_use]
    pub fn cursor_key(&self) -> String {
        match self {
            Self::File(p) => format!("siem/file:{}", p.display()),
            Self::Syslog(a) => format!("siem/syslog:{a}"),
            Self::SyslogTcp(a) => format!("siem/syslog+tcp:{a}"),
            Self::Http { authority, path } => format!("siem/http://{authority}{path}"),
        }
    }
}

/// One RFC 5424 message: `<PRI>1 TIMESTAMP HOST APP PROCID MSGID SD MSG`, facility 13 (log
/// audit), severity informational; the timestamp is in the JSON.
fn syslog_message(host: &str, json_line: &str) -> String {
    format!("<110>1 - {host} ztseg-controller - audit - {json_line}")
}

/// OCSF `(class_uid, class_name, category_uid, category_name, activity_id, activity_name)`.
fn class_of(action: &str) -> (u32, &'static str, u32, &'static str, u32, &'static str) {
    match action {
        "flow.denied" | "flow.denied.suppressed" => {
            (4001, "Network Activity", 4, "Network Activity", 5, "Refuse")
        }
        "tls.rejected" | "enroll" | "renew" => {
            (3002, "Authentication", 3, "Identity & Access Management", 1, "Logon")
        }
        "identity.revoke" => (3001, "Account Change", 3, "Identity & Access Management", 5, "Disable"),
        "api.denied" | "api.denied.suppressed" => {
            (6003, "API Activity", 6, "Application Activity", 0, "Unknown")
        }
        "policy.apply" | "policy.rollback" => (6003, "API Activity", 6, "Application Activity", 3, "Update"),
        "token.create" => (6003, "API Activity", 6, "Application Activity", 1, "Create"),
        "token.revoke" | "token.expire" => (6003, "API Activity", 6, "Application Activity", 4, "Delete"),
        _ => (6003, "API Activity", 6, "Application Activity", 99, "Other"),
    }
}

/// One audit record in the export schema (documented in docs/controller.md).
#[must_use]
pub fn ocsf(r: &Record) -> Value {
    let (class_uid, class_name, category_uid, category_name, activity_id, activity_name) =
        class_of(&r.action);
    let success = r.outcome == "success";
    let (role, name) = r.actor.split_once('/').unwrap_or(("", &r.actor));
    let mut v = json!({
        "time": r.time_ms,
        "class_uid": class_uid,
        "class_name": class_name,
        "category_uid": category_uid,
        "category_name": category_name,
        "activity_id": activity_id,
        "activity_name": activity_name,
        "type_uid": class_uid * 100 + activity_id,
        "severity_id": if success { 1 } else { 3 },
        "severity": if success { "Informational" } else { "Medium" },
        "status_id": if success { 1 } else { 2 },
        "status": if success { "Success" } else { "Failure" },
        "message": format!("{} {}", r.action, r.outcome),
        "actor": { "user": { "name": name, "type": role, "uid": r.actor } },
        "metadata": {
            "version": OCSF_VERSION,
            "product": { "name": "ztseg", "vendor_name": "ztseg" },
            "log_name": "audit",
            "uid": r.seq.to_string(),
            "sequence": r.seq,
        },
        "unmapped": { "action": r.action, "outcome": r.outcome, "detail": r.detail, "hash": r.hash, "prev": r.prev },
    });
    if r.action == "flow.denied" {
        let d = &r.detail;
        v["action"] = "Denied".into();
        v["action_id"] = 2.into();
        v["disposition"] = "Blocked".into();
        v["disposition_id"] = 2.into();
        v["src_endpoint"] = json!({ "ip": d["src"], "name": d["workload"] });
        v["dst_endpoint"] = json!({ "ip": d["dst"], "port": d["dport"], "name": d["peer"] });
        v["connection_info"] = json!({ "protocol_name": d["protocol"], "direction": d["direction"] });
        v["count"] = d["count"].clone();
        if let Some(t) = d["first_seen_ms"].as_i64() {
            // When the reporting enforcer says it first saw the flow (`time` is the controller's).
            v["start_time"] = t.into();
        }
    }
    if r.action == "flow.denied.suppressed" {
        // Denied flows of one enforcer counted but not recorded one by one: their packets.
        v["action"] = "Denied".into();
        v["action_id"] = 2.into();
        v["disposition"] = "Blocked".into();
        v["disposition_id"] = 2.into();
        v["count"] = r.detail["packets"].clone();
    }
    if r.action == "api.denied" {
        v["src_endpoint"] = json!({ "ip": r.detail["peer"] });
        v["api"] = json!({ "operation": r.detail["rpc"] });
    }
    if r.action == "tls.rejected" {
        // A failed handshake never reached an RPC: the peer only.
        v["src_endpoint"] = json!({ "ip": r.detail["peer"] });
    }
    v
}

/// Follows the audit log and ships new records to one sink.
pub struct Exporter {
    sink: Sink,
    store: Arc<dyn Store>,
    wake: Arc<Notify>,
}

impl std::fmt::Debug for Exporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exporter").field("sink", &self.sink).finish_non_exhaustive()
    }
}

impl Exporter {
    pub fn new(spec: &str, store: Arc<dyn Store>, wake: Arc<Notify>) -> Result<Self> {
        Ok(Self { sink: Sink::parse(spec)?, store, wake })
    }

    pub async fn run(self) {
        let key = self.sink.cursor_key();
        let mut leader = self.store.leadership();
        loop {
            if !*leader.borrow_and_update() {
                if leader.changed().await.is_err() {
                    return;
                }
                continue;
            }
            if let Err(e) = self.pump(&key).await {
                eprintln!(
                    "{}",
                    crate::server::log_line(
                        "error",
                        "SIEM export failed; retrying",
                        &[("sink", &key), ("error", &format!("{e:#}"))]
                    )
                );
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
            tokio::select! {
                () = self.wake.notified() => {}
                () = tokio::time::sleep(Duration::from_secs(1)) => {}
                _ = leader.changed() => {}
            }
        }
    }

    /// Ship everything after the cursor.
    async fn pump(&self, key: &str) -> Result<()> {
        loop {
            let cursor: u64 = self
                .store
                .get_meta(key.to_owned())
                .await?
                .map_or(Ok(0), |s| s.parse())
                .context("SIEM cursor")?;
            let recs = self.store.audit_records(cursor + 1, 500).await?;
            let Some(last) = recs.last().map(|(k, _)| *k) else { return Ok(()) };
            let mut lines = String::new();
            for (seq, bytes) in &recs {
                let line = match serde_json::from_slice::<Record>(bytes) {
                    Ok(r) => ocsf(&r).to_string(),
                    // A record that no longer parses is exported as such, never skipped.
                    Err(e) => {
                        json!({ "metadata": { "log_name": "audit", "sequence": seq }, "status": "Failure",
                                      "message": format!("audit record {seq} is unreadable: {e}") })
                        .to_string()
                    }
                };
                lines.push_str(&line);
                lines.push('\n');
            }
            self.send(&lines).await?;
            self.store.put_meta(key.to_owned(), last.to_string()).await?;
        }
    }

    async fn send(&self, lines: &str) -> Result<()> {
        match &self.sink {
            Sink::File(p) => {
                let p = p.clone();
                let data = lines.to_owned();
                tokio::task::spawn_blocking(move || -> Result<()> {
                    let mut f = std::fs::OpenOptions::new()
                        .create(true)
                        .append(true)
                        .open(&p)
                        .with_context(|| format!("opening {}", p.display()))?;
                    f.write_all(data.as_bytes())?;
                    f.sync_data()?;
                    Ok(())
                })
                .await??;
            }
            Sink::Syslog(addr) => {
                let sock = tokio::net::UdpSocket::bind("0.0.0.0:0").await?;
                sock.connect(addr).await.with_context(|| format!("syslog {addr}"))?;
                let host = hostname();
                for l in lines.lines() {
                    sock.send(syslog_message(&host, l).as_bytes()).await?;
                }
            }
            Sink::SyslogTcp(addr) => {
                let mut s = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(addr.as_str()),
                )
                .await
                .context("syslog TCP connect timed out")?
                .with_context(|| format!("syslog+tcp {addr}"))?;
                let host = hostname();
                let mut framed = String::new();
                for l in lines.lines() {
                    // Octet counting: MSG-LEN SP SYSLOG-MSG.
                    let m = syslog_message(&host, l);
                    let _ = write!(framed, "{} {m}", m.len());
                }
                tokio::time::timeout(Duration::from_secs(10), async {
                    s.write_all(framed.as_bytes()).await?;
                    s.shutdown().await
                })
                .await
                .context("syslog TCP send timed out")?
                .with_context(|| format!("syslog+tcp {addr}"))?;
            }
            Sink::Http { authority, path } => {
                let mut s = tokio::time::timeout(
                    Duration::from_secs(5),
                    tokio::net::TcpStream::connect(authority.as_str()),
                )
                .await
                .context("SIEM HTTP connect timed out")??;
                let req = format!(
                    "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/x-ndjson\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{lines}",
                    lines.len()
                );
                s.write_all(req.as_bytes()).await?;
                let mut buf = vec![0u8; 64];
                let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                    .await
                    .context("SIEM HTTP response timed out")??;
                let head = String::from_utf8_lossy(&buf[..n]);
                let code = head.split_whitespace().nth(1).unwrap_or("");
                if !code.starts_with('2') {
                    bail!("SIEM HTTP endpoint answered {:?}", head.lines().next().unwrap_or(""));
                }
            }
        }
        Ok(())
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map_or_else(|_| "-".into(), |s| s.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sinks_parse_and_bad_ones_say_why() {
        assert_eq!(Sink::parse("file:/tmp/x").unwrap(), Sink::File("/tmp/x".into()));
        assert_eq!(Sink::parse("syslog:127.0.0.1:514").unwrap(), Sink::Syslog("127.0.0.1:514".into()));
        assert_eq!(
            Sink::parse("http://127.0.0.1:8080/ingest").unwrap(),
            Sink::Http { authority: "127.0.0.1:8080".into(), path: "/ingest".into() }
        );
        assert!(Sink::parse("ftp://x").unwrap_err().to_string().contains("file:PATH"));
        assert!(Sink::parse("syslog:nohost").is_err());
        assert_eq!(Sink::parse("syslog+tcp:10.0.0.9:6514").unwrap(), Sink::SyslogTcp("10.0.0.9:6514".into()));
        assert!(Sink::parse("syslog+tcp:nohost").is_err());
    }

    #[test]
    fn denied_flow_maps_to_network_activity() {
        let d = crate::audit::Draft::new(
            "enforcer/host-a",
            "flow.denied",
            "denied",
            json!({"src": "10.0.0.1", "dst": "10.0.0.2", "dport": 80, "protocol": "TCP", "workload": "a", "peer": "b", "direction": "egress", "count": 3}),
        );
        let (bytes, _) = crate::audit::seal(&d, 7, crate::audit::GENESIS);
        let r: Record = serde_json::from_slice(&bytes).unwrap();
        let v = ocsf(&r);
        assert_eq!(v["class_uid"], 4001);
        assert_eq!(v["type_uid"], 400_105);
        assert_eq!(v["disposition"], "Blocked");
        assert_eq!(v["dst_endpoint"]["port"], 80);
        assert_eq!(v["metadata"]["sequence"], 7);
        assert_eq!(v["actor"]["user"]["type"], "enforcer");
        assert_eq!(v["status"], "Failure");
        assert!(v.get("start_time").is_none(), "no first-seen time reported: {v}");
        let mut d = d;
        d.detail["first_seen_ms"] = 1_700_000_000_000_i64.into();
        let (bytes, _) = crate::audit::seal(&d, 8, crate::audit::GENESIS);
        let v = ocsf(&serde_json::from_slice(&bytes).unwrap());
        assert_eq!(v["start_time"], 1_700_000_000_000_i64, "{v}");
        assert_eq!(v["time"], d.time_ms, "the record's time stays the controller's: {v}");
    }

    /// Refused calls name their RPC and peer; failed handshakes, which never reached an RPC,
    /// name only the peer (no `api` object).
    #[test]
    fn refusals_map_rpc_and_peer() {
        let seal = |action: &str, detail: serde_json::Value| {
            let d = crate::audit::Draft::new("anonymous", action, "denied", detail);
            ocsf(&serde_json::from_slice(&crate::audit::seal(&d, 1, crate::audit::GENESIS).0).unwrap())
        };
        let v = seal(
            "api.denied",
            json!({"rpc": "/ztseg.controller.v1.Audit/List", "peer": "192.0.2.1:5000", "reason": "x"}),
        );
        assert_eq!(v["api"]["operation"], "/ztseg.controller.v1.Audit/List", "{v}");
        assert_eq!(v["src_endpoint"]["ip"], "192.0.2.1:5000", "{v}");
        let v = seal("tls.rejected", json!({"peer": "192.0.2.1:5001", "reason": "UnknownIssuer"}));
        assert!(v.get("api").is_none(), "{v}");
        assert_eq!(v["src_endpoint"]["ip"], "192.0.2.1:5001", "{v}");
        assert_eq!(v["class_uid"], 3002, "{v}");
        let v = seal("token.revoke", json!({"id": "0123456789abcdef", "role": "enforcer", "name": "n1"}));
        assert_eq!(
            (v["class_uid"].as_u64(), v["activity_name"].as_str()),
            (Some(6003), Some("Delete")),
            "{v}"
        );
    }
}
