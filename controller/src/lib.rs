//! ztseg controller: the central policy authority.
//!
//! - [`pki`]: the controller's CA, server certificate and enrollment (CSR → certificate with
//!   the caller's role and name in a SPIFFE-style URI SAN).
//! - [`auth`]: roles and which RPCs each may call; identity from the mTLS peer certificate.
//! - [`store`]: one trait, two implementations — an embedded single-file store (redb) and etcd
//!   for HA — holding policy versions, the audit chain, join tokens and enforcer status.
//! - [`audit`]: the append-only, hash-chained audit record format and its verifier.
//! - [`siem`]: export of audit records as OCSF-style JSON lines to a file, syslog or HTTP.
//! - [`docs`]: validation and diffs of policy document sets.
//! - [`service`] / [`server`]: the gRPC services and the TLS listener.
//! - [`metrics`] / [`http`]: Prometheus metrics and health endpoints.

pub mod audit;
pub mod auth;
pub mod docs;
pub mod http;
pub mod limit;
pub mod metrics;
pub mod pki;
pub mod server;
pub mod service;
pub mod siem;
pub mod store;

/// Milliseconds since the Unix epoch (wall clock; audit and history timestamps).
#[must_use]
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}
