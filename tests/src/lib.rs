//! Helpers for ztseg's root-only tests: a data plane in its own pin directory, network
//! namespaces with RAII clean-up, and a frame builder for `BPF_PROG_TEST_RUN`.
//!
//! These tests need root and a BPF-capable kernel. They never skip: without root they fail
//! with a message saying so (CI runs them as root).

#![allow(
    clippy::missing_panics_doc,
    clippy::must_use_candidate,
    reason = "test helpers fail the calling test by panicking"
)]

pub mod frame;
pub mod netns;
pub mod pair;
pub mod traffic;

use std::{
    net::IpAddr,
    path::{Path, PathBuf},
    sync::atomic::{AtomicU32, Ordering},
};

use aya::programs::{ProgramError, SchedClassifier, TestRun, TestRunOptions};
use enforcer::{Datapath, DatapathOptions, Workload};

/// Root of every test pin directory.
pub const TEST_PIN_ROOT: &str = "/sys/fs/bpf/ztseg-test";

/// TC verdicts.
pub const TC_ACT_OK: u32 = 0;
pub const TC_ACT_SHOT: u32 = 2;

/// Fail (never skip) when not root.
pub fn require_root() {
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "ztseg privileged tests need root and a BPF-capable kernel (run `cargo xtask test` as root)"
    );
    enforcer::datapath::ensure_bpffs(Path::new("/sys/fs/bpf")).expect("bpffs at /sys/fs/bpf");
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique, short name for test resources.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}{}x{}", std::process::id() % 100_000, SEQ.fetch_add(1, Ordering::Relaxed))
}

/// A data plane in its own pin directory, uninstalled (links and maps removed) on drop.
#[derive(Debug)]
pub struct TestDatapath {
    pub dp: Datapath,
    pub dir: PathBuf,
}

impl std::ops::Deref for TestDatapath {
    type Target = Datapath;
    fn deref(&self) -> &Datapath {
        &self.dp
    }
}

impl std::ops::DerefMut for TestDatapath {
    fn deref_mut(&mut self) -> &mut Datapath {
        &mut self.dp
    }
}

impl Drop for TestDatapath {
    fn drop(&mut self) {
        let _ = Datapath::uninstall(&self.dir);
    }
}

/// Small maps: many test instances run side by side.
#[must_use]
pub fn small_options() -> DatapathOptions {
    DatapathOptions {
        policy_entries: 4096,
        rule_slots: 4096,
        conntrack_entries: 4096,
        identity_entries: 4096,
        flow_events: true,
        ..DatapathOptions::default()
    }
}

impl TestDatapath {
    pub fn new(name: &str) -> Self {
        Self::with_options(name, &small_options())
    }

    pub fn with_options(name: &str, opts: &DatapathOptions) -> Self {
        require_root();
        let dir = Path::new(TEST_PIN_ROOT).join(unique(name));
        let _ = Datapath::uninstall(&dir);
        let dp = Datapath::open(&dir, opts).expect("open data plane");
        Self { dp, dir }
    }

    /// Run TC program `name` once on `frame` through `BPF_PROG_TEST_RUN`.
    pub fn run(&mut self, name: &'static str, frame: &[u8]) -> Result<u32, ProgramError> {
        self.run_repeat(name, frame, 1)
    }

    /// Run TC program `name` `repeat` times on `frame` (one syscall); the last verdict.
    pub fn run_repeat(&mut self, name: &'static str, frame: &[u8], repeat: u32) -> Result<u32, ProgramError> {
        let prog: &mut SchedClassifier =
            self.dp.program_mut(name).expect("program").try_into().expect("classifier");
        let mut opts = TestRunOptions::new();
        opts.data_in = Some(frame);
        opts.repeat = repeat;
        prog.test_run(opts).map(|r| r.return_value)
    }
}

/// A workload with the given identity/tenant and addresses.
#[must_use]
pub fn workload(identity: u32, tenant: u32, v4: Option<&str>, v6: Option<&str>) -> Workload {
    Workload {
        identity,
        tenant,
        ipv4: v4.map(|a| a.parse().expect("ipv4")),
        ipv6: v6.map(|a| a.parse().expect("ipv6")),
        audit: false,
    }
}

/// Parse an address literal.
#[must_use]
pub fn ip(s: &str) -> IpAddr {
    s.parse().expect("address")
}

/// Where the cgroup v2 hierarchy is mounted (`/sys/fs/cgroup` on a pure cgroup v2 host,
/// `/sys/fs/cgroup/unified` on a hybrid one).
#[must_use]
pub fn cgroup2_root() -> std::path::PathBuf {
    let mounts = std::fs::read_to_string("/proc/self/mounts").expect("read /proc/self/mounts");
    mounts
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[2] == "cgroup2")
        .map(|f| std::path::PathBuf::from(f[1]))
        .expect("cgroup v2 mounted")
}

/// A free TCP port on loopback (bound and released; good enough for tests).
#[must_use]
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("bind 127.0.0.1:0")
        .local_addr()
        .expect("local address")
        .port()
}

/// A command for `program` without any `ZTSEG_*` variable of the environment the tests run
/// in, and with stdin closed.
#[must_use]
pub fn clean_command(program: &str) -> std::process::Command {
    let mut cmd = std::process::Command::new(program);
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("ZTSEG_") {
            cmd.env_remove(k);
        }
    }
    cmd.stdin(std::process::Stdio::null());
    cmd
}
