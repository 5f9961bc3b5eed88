//! Network namespaces for real-traffic tests.
//!
//! `ip netns exec` remounts `/sys` (hiding bpffs), so code that must run inside a namespace
//! (attaching to its interfaces, opening sockets) runs on a scoped thread that `setns`-es into
//! it. Sockets keep their namespace after the thread ends.

use std::{fs::File, os::fd::AsRawFd as _, path::PathBuf, process::Command};

use crate::unique;

/// A named network namespace, deleted on drop.
#[derive(Debug)]
pub struct Netns {
    pub name: String,
}

impl Netns {
    #[must_use]
    pub fn new(prefix: &str) -> Self {
        let name = unique(prefix);
        run("ip", &["netns", "add", &name]);
        let ns = Self { name };
        ns.sh("ip link set lo up");
        ns
    }

    #[must_use]
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Run a shell command inside the namespace; panics with its output on failure.
    pub fn sh(&self, cmd: &str) {
        run("ip", &["netns", "exec", &self.name, "sh", "-c", cmd]);
    }

    /// Run a shell command inside the namespace and return whether it succeeded.
    #[must_use]
    pub fn try_sh(&self, cmd: &str) -> bool {
        Command::new("ip")
            .args(["netns", "exec", &self.name, "sh", "-c", cmd])
            .output()
            .is_ok_and(|o| o.status.success())
    }

    /// Run `f` on a thread inside this namespace.
    pub fn enter<R: Send>(&self, f: impl FnOnce() -> R + Send) -> R {
        let file = File::open(self.path()).expect("open netns");
        std::thread::scope(|s| {
            s.spawn(|| {
                // SAFETY: setns on this thread only, with a namespace fd we hold open.
                let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("thread in netns panicked")
        })
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).output();
    }
}

/// Run a command, panicking with its output if it fails.
pub fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("{cmd}: {e}"));
    assert!(
        out.status.success(),
        "{cmd} {args:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A simulated host (its own namespace with a bridge) and pods hanging off it by veth pairs.
/// Pod `i` gets `10.77.0.(i+1)/24` and `fd77::(i+1)/64`; its host-side interface is `hv<i>`.
#[derive(Debug)]
pub struct Lab {
    pub host: Netns,
    pub pods: Vec<Netns>,
}

impl Lab {
    #[must_use]
    pub fn new(pods: usize) -> Self {
        let host = Netns::new("zth");
        host.sh("ip link add br0 type bridge && ip link set br0 up");
        let mut v = Vec::new();
        for i in 0..pods {
            let pod = Netns::new("ztp");
            host.sh(&format!(
                "ip link add hv{i} type veth peer name eth0 netns {pod} && \
                 ip link set hv{i} master br0 && ip link set hv{i} up",
                pod = pod.name
            ));
            pod.sh(&format!(
                "ip addr add 10.77.0.{n}/24 dev eth0 && ip -6 addr add fd77::{n}/64 dev eth0 nodad && \
                 ip link set eth0 up",
                n = i + 1
            ));
            v.push(pod);
        }
        Self { host, pods: v }
    }

    /// Routed pods, the way Calico- or Cilium-style CNIs wire them: no bridge; pod `i` has
    /// `10.77.0.(i+1)/32` and `fd77::(i+1)/128` with a default route via a link-local gateway
    /// on its host-side interface `hv<i>`, and the host routes each pod address to `hv<i>` and
    /// forwards between them.
    #[must_use]
    pub fn routed(pods: usize) -> Self {
        let host = Netns::new("zth");
        host.sh("sysctl -qw net.ipv4.ip_forward=1 && sysctl -qw net.ipv6.conf.all.forwarding=1");
        let mut v = Vec::new();
        for i in 0..pods {
            let pod = Netns::new("ztp");
            let n = i + 1;
            host.sh(&format!(
                "ip link add hv{i} type veth peer name eth0 netns {pod} && \
                 ip addr add 169.254.1.1/32 dev hv{i} && ip -6 addr add fe80::1/64 dev hv{i} nodad && \
                 ip link set hv{i} up && ip route add 10.77.0.{n}/32 dev hv{i} && \
                 ip -6 route add fd77::{n}/128 dev hv{i}",
                pod = pod.name
            ));
            pod.sh(&format!(
                "ip addr add 10.77.0.{n}/32 dev eth0 && ip -6 addr add fd77::{n}/128 dev eth0 nodad && \
                 ip link set eth0 up && ip route add 169.254.1.1 dev eth0 scope link && \
                 ip route add default via 169.254.1.1 dev eth0 && ip -6 route add default via fe80::1 dev eth0"
            ));
            v.push(pod);
        }
        Self { host, pods: v }
    }

    /// A namespace outside the lab's pods for a [`Self::routed`] lab: it holds `addrs` (IPv4,
    /// none of them the host's or a pod's) on `eth0`, routes everything via the host's
    /// link-local gateway, and the host routes `addrs` to its side `hx<n>`. Traffic from it is
    /// traffic from non-pod, non-host addresses.
    #[must_use]
    pub fn external(&self, n: usize, addrs: &[&str]) -> Netns {
        let ext = Netns::new("ztx");
        self.host.sh(&format!(
            "ip link add hx{n} type veth peer name eth0 netns {ext} && ip addr add 169.254.1.1/32 dev hx{n} && \
             ip link set hx{n} up",
            ext = ext.name
        ));
        for a in addrs {
            self.host.sh(&format!("ip route add {a}/32 dev hx{n}"));
            ext.sh(&format!("ip addr add {a}/32 dev eth0"));
        }
        ext.sh("ip link set eth0 up && ip route add 169.254.1.1 dev eth0 scope link && \
             ip route add default via 169.254.1.1 dev eth0");
        ext
    }

    #[must_use]
    pub fn v4(i: usize) -> String {
        format!("10.77.0.{}", i + 1)
    }

    #[must_use]
    pub fn v6(i: usize) -> String {
        format!("fd77::{}", i + 1)
    }

    #[must_use]
    pub fn iface(i: usize) -> String {
        format!("hv{i}")
    }
}
