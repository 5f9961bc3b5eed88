//! Crash test: kill -9 the process holding the programs while traffic flows, then start it
//! again. No denied probe may ever get through, the allowed established connection must
//! survive, and all state must be intact.

use std::{
    process::{Child, Command},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use enforcer::{Rule, Workload, writer::Action};
use enforcer_common::{DIR_EGRESS, DIR_INGRESS, Reason};
use ztseg_integration::{
    TestDatapath,
    frame::TCP,
    netns::Lab,
    traffic::{echo_once, tcp_connect, tcp_echo},
};

fn start_holder(lab: &Lab, dir: &std::path::Path, ready: &std::path::Path) -> Child {
    let _ = std::fs::remove_file(ready);
    let child = Command::new(env!("CARGO_BIN_EXE_ztseg-dataplane-holder"))
        .arg("--pin-dir")
        .arg(dir)
        .arg("--netns")
        .arg(lab.host.path())
        .args(["--iface", "hv0", "--iface", "hv1", "--ready-file"])
        .arg(ready)
        .spawn()
        .expect("start holder");
    let start = Instant::now();
    while !ready.exists() {
        assert!(start.elapsed() < Duration::from_secs(20), "holder did not become ready");
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}

#[test]
fn kill_dash_nine_keeps_enforcement_and_state() {
    crash(&Lab::new(2), "crash", false);
}

/// The same on routed pods, where the established flow takes local delivery: the restarted
/// holder loads a new delivery program into the pinned program array while the first
/// holder's programs stay attached.
#[test]
fn kill_dash_nine_keeps_local_delivery_enforcing() {
    crash(&Lab::routed(2), "crashld", true);
}

fn crash(lab: &Lab, name: &str, local: bool) {
    let dp = TestDatapath::new(name);
    let ia = lab.host.enter(|| enforcer::datapath::ifindex("hv0").unwrap());
    let ib = lab.host.enter(|| enforcer::datapath::ifindex("hv1").unwrap());
    let wl = |i: usize, id| Workload {
        identity: id,
        tenant: 1,
        ipv4: Some(Lab::v4(i).parse().unwrap()),
        ipv6: None,
        audit: false,
    };
    dp.writer().set_interface_workload(ia, &wl(0, 700)).unwrap();
    dp.writer().set_interface_workload(ib, &wl(1, 701)).unwrap();
    let rule = dp
        .writer()
        .install(&Rule {
            ranges: Vec::new(),
            keys: vec![
                Rule::key(DIR_EGRESS, 700, Some(701), TCP, 8080),
                Rule::key(DIR_INGRESS, 701, Some(700), TCP, 8080),
            ],
            action: Action::Allow,
            ttl: None,
        })
        .unwrap();
    tcp_echo(&lab.pods[1], "10.77.0.2:8080");
    tcp_echo(&lab.pods[1], "10.77.0.2:8081");

    let ready = std::env::temp_dir().join(ztseg_integration::unique("zt-ready-"));
    let mut holder = start_holder(lab, &dp.dir, &ready);

    if local {
        // A first connection resolves B's neighbour entry on the host; the next one is
        // delivered locally from its first packet on.
        drop(tcp_connect(&lab.pods[0], "10.77.0.2:8080", Duration::from_secs(2)).expect("allowed flow"));
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut conn = tcp_connect(&lab.pods[0], "10.77.0.2:8080", Duration::from_secs(2)).expect("allowed flow");
    assert!(echo_once(&mut conn, Duration::from_secs(1)));

    let stop = Arc::new(AtomicBool::new(false));
    let leaked = Arc::new(AtomicU64::new(0));
    let probes = Arc::new(AtomicU64::new(0));
    let pod_a = lab.pods[0].path();
    let probe_thread = {
        let (stop, leaked, probes) = (stop.clone(), leaked.clone(), probes.clone());
        std::thread::spawn(move || {
            let f = std::fs::File::open(pod_a).unwrap();
            // SAFETY: setns on this dedicated thread only.
            assert_eq!(unsafe { libc::setns(std::os::fd::AsRawFd::as_raw_fd(&f), libc::CLONE_NEWNET) }, 0);
            let addr = "10.77.0.2:8081".parse().unwrap();
            while !stop.load(Ordering::Relaxed) {
                if std::net::TcpStream::connect_timeout(&addr, Duration::from_millis(100)).is_ok() {
                    leaked.fetch_add(1, Ordering::Relaxed);
                }
                probes.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    let mut echoes = 0;
    let mut echo_for = |d: Duration, conn: &mut std::net::TcpStream| {
        let start = Instant::now();
        while start.elapsed() < d {
            assert!(echo_once(conn, Duration::from_secs(1)), "established flow broke");
            echoes += 1;
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    echo_for(Duration::from_millis(500), &mut conn);
    holder.kill().expect("SIGKILL holder");
    holder.wait().unwrap();
    echo_for(Duration::from_millis(1500), &mut conn);
    let mut holder = start_holder(lab, &dp.dir, &ready);
    echo_for(Duration::from_secs(1), &mut conn);
    stop.store(true, Ordering::Relaxed);
    probe_thread.join().unwrap();
    holder.kill().unwrap();
    holder.wait().unwrap();

    assert!(probes.load(Ordering::Relaxed) > 5, "denied probes ran");
    assert_eq!(leaked.load(Ordering::Relaxed), 0, "a denied probe got through");
    assert!(echoes > 20);
    // State intact: the same rule, conntrack, counters still moving.
    let again = enforcer::Datapath::open(&dp.dir, &ztseg_integration::small_options()).unwrap();
    let rules = again.writer().rules();
    assert_eq!(rules.len(), 1);
    assert_eq!(rules[0].cookie, rule.cookie);
    assert!(!again.writer().conntrack().unwrap().is_empty());
    let c = again.writer().counters().unwrap();
    assert!(c[&Reason::DropDefault] >= probes.load(Ordering::Relaxed), "{c:?}");
    if local {
        // Every echo of the established flow (two packets each) was delivered locally.
        assert!(c[&Reason::LocalDelivery] >= 2 * echoes, "{c:?}");
    }
    let _ = std::fs::remove_file(&ready);
}
