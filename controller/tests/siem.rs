//! SIEM sinks against real receivers on loopback: a syslog UDP socket and an HTTP endpoint
//! that first fails, then accepts. Records appended to the audit log arrive as OCSF-style JSON
//! lines, in order, none lost and none skipped after a failed delivery.

use std::{sync::Arc, time::Duration};

use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    sync::Notify,
};
use ztseg_controller::{
    audit::Draft,
    siem::Exporter,
    store::{Store, embedded::EmbeddedStore},
};

fn store(name: &str) -> (Arc<dyn Store>, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!("ztseg-siem-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    (Arc::new(EmbeddedStore::open(&dir.join("s.redb")).unwrap()), dir)
}

fn denied(n: u32) -> Draft {
    Draft::new("operator/op", "api.denied", "denied", serde_json::json!({ "rpc": "/x/Y", "n": n }))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_sink_receives_each_record_as_rfc5424_with_ocsf_json() {
    let (store, dir) = store("syslog");
    let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = udp.local_addr().unwrap();
    let wake = Arc::new(Notify::new());
    tokio::spawn(Exporter::new(&format!("syslog:{addr}"), store.clone(), wake.clone()).unwrap().run());
    store.append_audit((0..3).map(denied).collect()).await.unwrap();
    wake.notify_one();
    let mut buf = vec![0u8; 65_536];
    for want in 1..=3u64 {
        let n = tokio::time::timeout(Duration::from_secs(5), udp.recv(&mut buf))
            .await
            .expect("syslog datagram")
            .unwrap();
        let msg = String::from_utf8_lossy(&buf[..n]).into_owned();
        assert!(msg.starts_with("<110>1 - "), "{msg}");
        let json = &msg[msg.find('{').unwrap()..];
        let v: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(v["metadata"]["sequence"], want, "{v}");
        assert_eq!(v["class_uid"], 6003);
        assert_eq!(v["unmapped"]["action"], "api.denied");
    }
    let _ = std::fs::remove_dir_all(dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_sink_retries_a_failed_batch_and_loses_nothing() {
    let (store, dir) = store("http");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut first = true;
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut req = Vec::new();
            let mut buf = [0u8; 8192];
            // Read headers and the announced body.
            loop {
                let n = s.read(&mut buf).await.unwrap();
                req.extend_from_slice(&buf[..n]);
                let text = String::from_utf8_lossy(&req).into_owned();
                if let Some(h) = text.find("\r\n\r\n") {
                    let len: usize = text
                        .lines()
                        .find_map(|l| l.strip_prefix("Content-Length: "))
                        .map_or(0, |v| v.trim().parse().unwrap());
                    if req.len() >= h + 4 + len || n == 0 {
                        break;
                    }
                }
            }
            let text = String::from_utf8_lossy(&req).into_owned();
            if first {
                // The first delivery fails: the batch must come again.
                first = false;
                s.write_all(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n").await.unwrap();
                continue;
            }
            s.write_all(b"HTTP/1.1 204 No Content\r\n\r\n").await.unwrap();
            assert!(text.starts_with("POST /ingest HTTP/1.1\r\n"), "{text}");
            assert!(text.contains("Content-Type: application/x-ndjson"), "{text}");
            let body = text.split_once("\r\n\r\n").unwrap().1.to_owned();
            tx.send(body).unwrap();
        }
    });
    let wake = Arc::new(Notify::new());
    tokio::spawn(Exporter::new(&format!("http://{addr}/ingest"), store.clone(), wake.clone()).unwrap().run());
    store.append_audit((0..5).map(denied).collect()).await.unwrap();
    wake.notify_one();
    let mut seqs = Vec::new();
    while seqs.len() < 5 {
        let body =
            tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.expect("HTTP batch").unwrap();
        for line in body.lines() {
            let v: serde_json::Value = serde_json::from_str(line).unwrap();
            seqs.push(v["metadata"]["sequence"].as_u64().unwrap());
        }
    }
    assert_eq!(seqs, vec![1, 2, 3, 4, 5], "in order, none lost, none repeated after acknowledgement");
    // The cursor moves past what was acknowledged (right after the 2xx is read).
    let key = format!("siem/http://{addr}/ingest");
    let t = std::time::Instant::now();
    while store.get_meta(key.clone()).await.unwrap().as_deref() != Some("5") {
        assert!(t.elapsed() < Duration::from_secs(5), "cursor did not reach 5");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let _ = std::fs::remove_dir_all(dir);
}

/// Split octet-counted syslog frames (`MSG-LEN SP MSG`, RFC 6587) into messages.
fn frames(mut data: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let sp = data.iter().position(|&b| b == b' ').expect("frame length");
        let len: usize = std::str::from_utf8(&data[..sp]).unwrap().parse().expect("numeric length");
        out.push(String::from_utf8(data[sp + 1..sp + 1 + len].to_vec()).unwrap());
        data = &data[sp + 1 + len..];
    }
    out
}

/// syslog over TCP: RFC 5424 messages in octet-counted frames. The receiver is down when the
/// records are written; the batch is sent again until it is taken, and every record arrives
/// in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn syslog_tcp_sink_frames_records_and_resends_until_taken() {
    let (store, dir) = store("syslog-tcp");
    let addr = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let wake = Arc::new(Notify::new());
    tokio::spawn(Exporter::new(&format!("syslog+tcp:{addr}"), store.clone(), wake.clone()).unwrap().run());
    store.append_audit((0..3).map(denied).collect()).await.unwrap();
    wake.notify_one();
    // At least one delivery attempt fails while nothing listens.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let mut msgs = Vec::new();
    while msgs.len() < 3 {
        let (mut c, _) = tokio::time::timeout(Duration::from_secs(10), listener.accept())
            .await
            .expect("a delivery")
            .unwrap();
        let mut data = Vec::new();
        c.read_to_end(&mut data).await.unwrap();
        msgs.extend(frames(&data));
    }
    assert_eq!(msgs.len(), 3, "{msgs:#?}");
    for (want, msg) in (1..=3u64).zip(&msgs) {
        assert!(msg.starts_with("<110>1 - "), "{msg}");
        let v: serde_json::Value = serde_json::from_str(&msg[msg.find('{').unwrap()..]).unwrap();
        assert_eq!(v["metadata"]["sequence"], want, "{v}");
        assert_eq!(v["unmapped"]["action"], "api.denied");
    }
    let _ = std::fs::remove_dir_all(dir);
}
