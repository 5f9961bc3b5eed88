//! CLI side of the local API: connect to the enforcer's unix socket and render replies as
//! table, JSON or YAML.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use hyper_util::rt::TokioIo;
use tonic::transport::{Channel, Endpoint};
use ztseg_api::enforcer::enforcer_client::EnforcerClient;

/// A connected local API client.
pub type Client = EnforcerClient<Channel>;

/// Connect to the enforcer at `socket`.
pub async fn connect(socket: &Path) -> Result<Client> {
    let path: PathBuf = socket.to_owned();
    // The URI is required by the API but unused: the connector dials the unix socket.
    let channel = Endpoint::try_from("http://enforcer.local")?
        .connect_with_connector(tower::service_fn(move |_| {
            let path = path.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(path).await?)) }
        }))
        .await
        .with_context(|| {
            format!("connecting to the enforcer at {} (is it running? are you root?)", socket.display())
        })?;
    Ok(EnforcerClient::new(channel))
}

/// Rows of (column, value) in column order. Values keep their type (numbers, booleans,
/// strings; `null` for "none") in JSON and YAML; a table shows them as text.
pub type Rows = Vec<Vec<(&'static str, serde_json::Value)>>;

/// A value as a table shows it: strings as they are, `null` as nothing.
fn text(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::String(s) => s.clone(),
        serde_json::Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// Render rows as an aligned table.
#[must_use]
pub fn table(rows: &Rows) -> String {
    let Some(first) = rows.first() else { return "(none)\n".into() };
    let cols: Vec<&str> = first.iter().map(|(c, _)| *c).collect();
    let cells: Vec<Vec<String>> = rows.iter().map(|r| r.iter().map(|(_, v)| text(v)).collect()).collect();
    let widths: Vec<usize> = cols
        .iter()
        .enumerate()
        .map(|(i, c)| cells.iter().map(|r| r[i].len()).max().unwrap_or(0).max(c.len()))
        .collect();
    let mut out = String::new();
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect::<Vec<_>>()
            .join("  ")
            .trim_end()
            .to_owned()
            + "\n"
    };
    let header: Vec<String> = cols.iter().map(|c| c.to_uppercase()).collect();
    out.push_str(&line(header.iter().map(String::as_str).collect()));
    for r in &cells {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
    out
}

/// Rows as a JSON array of objects.
#[must_use]
pub fn json_value(rows: &Rows) -> serde_json::Value {
    serde_json::Value::Array(
        rows.iter()
            .map(|r| serde_json::Value::Object(r.iter().map(|(k, v)| ((*k).to_owned(), v.clone())).collect()))
            .collect(),
    )
}
