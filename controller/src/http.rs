//! A minimal HTTP/1.x responder for `/metrics` and health endpoints (plain text, one request
//! per connection), shared by the controller and the enforcer daemon. Requests are read for
//! at most 5 s and 4 KiB; only the path of the request line is used.

use std::{future::Future, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};

/// What a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reply {
    /// Status line text, e.g. `200 OK`.
    pub status: &'static str,
    pub body: String,
    pub content_type: &'static str,
}

impl Reply {
    /// `200 OK` with a Prometheus text exposition.
    #[must_use]
    pub fn metrics(body: String) -> Self {
        Self { status: "200 OK", body, content_type: "text/plain; version=0.0.4" }
    }

    /// A plain-text reply.
    #[must_use]
    pub fn text(status: &'static str, body: &str) -> Self {
        Self { status, body: format!("{body}\n"), content_type: "text/plain" }
    }

    /// `/readyz`: 200 when ready, 503 otherwise.
    #[must_use]
    pub fn ready(ready: bool) -> Self {
        if ready { Self::text("200 OK", "ready") } else { Self::text("503 Service Unavailable", "not ready") }
    }

    #[must_use]
    pub fn not_found() -> Self {
        Self::text("404 Not Found", "not found")
    }
}

/// Serve `listener` until the process ends; `route` answers a request path.
pub async fn serve<F, Fut>(listener: TcpListener, route: F)
where
    F: Fn(String) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Reply> + Send,
{
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let route = route.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            while n < buf.len() {
                match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf[n..])).await {
                    Ok(Ok(0) | Err(_)) | Err(_) => break,
                    Ok(Ok(k)) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("").to_owned();
            let r = route(path).await;
            let resp = format!(
                "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{}",
                r.status,
                r.content_type,
                r.body.len(),
                r.body
            );
            let _ = sock.write_all(resp.as_bytes()).await;
        });
    }
}
