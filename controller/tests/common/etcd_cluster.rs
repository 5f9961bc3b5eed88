//! Throwaway etcd clusters on loopback for tests.
//!
//! Uses only `std`, so any test crate can share it:
//! `#[path = "../../controller/tests/common/etcd_cluster.rs"] mod etcd_cluster;`
//!
//! [`EtcdCluster::start`] runs N `etcd` members (static `--initial-cluster`, random free
//! ports on 127.0.0.1, a fresh temporary data directory) and waits until every member reports
//! healthy. Dropping the cluster kills the members and removes the directory. A missing `etcd`
//! binary is a panic, never a skip: tests that need etcd fail without it. The binary is
//! `$ZTSEG_ETCD`, else `/usr/bin/etcd`, else `etcd` on `PATH`.

#![allow(dead_code)]

use std::{
    fmt::Write as _,
    io::{Read as _, Write as _},
    net::{TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    time::{Duration, Instant},
};

/// One member of a test cluster.
#[derive(Debug)]
pub struct Member {
    pub name: String,
    /// `http://127.0.0.1:PORT`, what clients connect to.
    pub client_url: String,
    pub peer_url: String,
    pub data_dir: PathBuf,
    pub log: PathBuf,
    child: Option<Child>,
}

/// A running etcd cluster; killed and deleted on drop.
#[derive(Debug)]
pub struct EtcdCluster {
    dir: PathBuf,
    pub members: Vec<Member>,
}

/// The etcd binary to run. Panics (failing the test) if there is none.
#[must_use]
pub fn etcd_binary() -> PathBuf {
    if let Some(p) = std::env::var_os("ZTSEG_ETCD") {
        return PathBuf::from(p);
    }
    let usr = Path::new("/usr/bin/etcd");
    if usr.exists() {
        return usr.to_path_buf();
    }
    for dir in std::env::split_paths(&std::env::var_os("PATH").unwrap_or_default()) {
        let p = dir.join("etcd");
        if p.is_file() {
            return p;
        }
    }
    panic!(
        "this test needs an `etcd` binary (Debian/Ubuntu: apt-get install etcd-server), or set ZTSEG_ETCD to one"
    );
}

/// `n` distinct free TCP ports on 127.0.0.1 (held together while choosing, then released).
#[must_use]
pub fn free_ports(n: usize) -> Vec<u16> {
    let listeners: Vec<TcpListener> =
        (0..n).map(|_| TcpListener::bind("127.0.0.1:0").expect("binding a free port")).collect();
    listeners.iter().map(|l| l.local_addr().expect("local address").port()).collect()
}

#[must_use]
pub fn unique_name() -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
    format!("{}-{}-{nanos}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

/// Whether the member at `client_url` answers `/health` with a leader.
#[must_use]
pub fn healthy(client_url: &str) -> bool {
    let addr = client_url.trim_start_matches("http://");
    let Ok(sock) = addr.parse() else { return false };
    let Ok(mut s) = TcpStream::connect_timeout(&sock, Duration::from_millis(500)) else { return false };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(format!("GET /health HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes()).is_err() {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

impl EtcdCluster {
    /// Start an `n`-member cluster and wait (up to a minute) until every member is healthy.
    #[must_use]
    pub fn start(n: usize) -> Self {
        assert!(n > 0, "a cluster needs at least one member");
        let bin = etcd_binary();
        let id = unique_name();
        let dir = std::env::temp_dir().join(format!("ztseg-etcd-{id}"));
        std::fs::create_dir_all(&dir).expect("creating the etcd test directory");
        let ports = free_ports(2 * n);
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", ports[2 * i]),
                peer_url: format!("http://127.0.0.1:{}", ports[2 * i + 1]),
                data_dir: dir.join(format!("m{i}.etcd")),
                log: dir.join(format!("m{i}.log")),
                child: None,
            })
            .collect();
        let initial =
            members.iter().map(|m| format!("{}={}", m.name, m.peer_url)).collect::<Vec<_>>().join(",");
        let mut cluster = Self { dir, members };
        for m in &mut cluster.members {
            let log = std::fs::File::create(&m.log).expect("creating the etcd log");
            let child = Command::new(&bin)
                .args(["--name", &m.name])
                .arg("--data-dir")
                .arg(&m.data_dir)
                .args(["--listen-client-urls", &m.client_url, "--advertise-client-urls", &m.client_url])
                .args(["--listen-peer-urls", &m.peer_url, "--initial-advertise-peer-urls", &m.peer_url])
                .args(["--initial-cluster", &initial, "--initial-cluster-state", "new"])
                .args(["--initial-cluster-token", &format!("ztseg-test-{id}")])
                .stdin(Stdio::null())
                .stdout(log.try_clone().expect("log handle"))
                .stderr(log)
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", bin.display()));
            m.child = Some(child);
        }
        cluster.wait_healthy(Duration::from_mins(1));
        cluster
    }

    /// Client URLs of all members (also the killed ones).
    #[must_use]
    pub fn endpoints(&self) -> Vec<String> {
        self.members.iter().map(|m| m.client_url.clone()).collect()
    }

    /// Wait until every running member is healthy; panics with the logs otherwise.
    pub fn wait_healthy(&mut self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            for (i, m) in self.members.iter_mut().enumerate() {
                if let Some(c) = m.child.as_mut()
                    && let Ok(Some(status)) = c.try_wait()
                {
                    let log = std::fs::read_to_string(&m.log).unwrap_or_default();
                    panic!("etcd member {i} exited ({status}):\n{log}");
                }
            }
            if self.members.iter().filter(|m| m.child.is_some()).all(|m| healthy(&m.client_url)) {
                return;
            }
            assert!(Instant::now() < deadline, "etcd did not become healthy:\n{}", self.logs());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// kill -9 member `i`.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    #[must_use]
    pub fn running(&self, i: usize) -> bool {
        self.members[i].child.is_some()
    }

    /// All member logs (for failure messages).
    #[must_use]
    pub fn logs(&self) -> String {
        let mut out = String::new();
        for m in &self.members {
            let _ =
                writeln!(out, "--- {} ---\n{}", m.name, std::fs::read_to_string(&m.log).unwrap_or_default());
        }
        out
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
