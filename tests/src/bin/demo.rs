//! `cargo xtask demo`: a narrated enforcement demo in network namespaces.
//!
//! Three pods on one simulated host: `web` and `db` of tenant acme, `scanner` of tenant globex.
//! Every step is checked against real traffic; the demo exits non-zero if the kernel does
//! anything other than what it narrates, and removes everything it created.
#![forbid(unsafe_code)]

use std::{
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};
use enforcer::{Datapath, DatapathOptions, Rule, TcHook, Workload, writer::Action};
use enforcer_common::{DIR_EGRESS, DIR_INGRESS, Reason};
use ztseg_integration::{
    frame::TCP,
    netns::Lab,
    traffic::{echo_once, tcp_connect, tcp_echo},
};

const PIN_DIR: &str = "/sys/fs/bpf/ztseg-demo";
const WEB: u32 = 1000;
const DB: u32 = 1001;
const SCANNER: u32 = 2000;
const ACME: u32 = 1;
const GLOBEX: u32 = 2;
const OPEN: Duration = Duration::from_secs(2);
const DENIED: Duration = Duration::from_millis(500);

fn step(n: u32, text: &str) {
    println!("\n[{n}] {text}");
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("    ✔ {what}");
        Ok(())
    } else {
        bail!("unexpected: {what} did not hold")
    }
}

fn flow(src: u32, dst: u32, port: u16, ttl: Option<Duration>) -> Rule {
    Rule {
        keys: vec![
            Rule::key(DIR_EGRESS, src, Some(dst), TCP, port),
            Rule::key(DIR_INGRESS, dst, Some(src), TCP, port),
        ],
        action: Action::Allow,
        ttl,
    }
}

fn main() -> Result<()> {
    ztseg_integration::require_root();
    let _ = Datapath::uninstall(Path::new(PIN_DIR));
    let result = demo();
    let _ = Datapath::uninstall(Path::new(PIN_DIR));
    match &result {
        Ok(()) => println!("\nztseg demo finished: every step held; namespaces and pins removed."),
        Err(e) => eprintln!("\nztseg demo FAILED: {e:#}"),
    }
    result
}

fn demo() -> Result<()> {
    println!("ztseg demo — kernel-enforced micro-segmentation on real traffic");
    let lab = Lab::new(3);
    let mut dp = Datapath::open(Path::new(PIN_DIR), &DatapathOptions::default())?;
    let names = ["web", "db", "scanner"];
    let ids = [(WEB, ACME), (DB, ACME), (SCANNER, GLOBEX)];
    step(
        1,
        "pods web (10.77.0.1, acme), db (10.77.0.2, acme), scanner (10.77.0.3, globex); TCX programs on each host-side veth",
    );
    for (i, (id, tenant)) in ids.iter().enumerate() {
        let ifindex = lab.host.enter(|| -> Result<u32> {
            dp.attach_tc(&Lab::iface(i), TcHook::FromWorkload)?;
            dp.attach_tc(&Lab::iface(i), TcHook::ToWorkload)?;
            Ok(enforcer::datapath::ifindex(&Lab::iface(i))?)
        })?;
        let w = Workload {
            identity: *id,
            tenant: *tenant,
            ipv4: Some(Lab::v4(i).parse()?),
            ipv6: None,
            audit: false,
        };
        dp.writer().set_interface_workload(ifindex, &w)?;
        println!(
            "    {} → identity {id}, tenant {tenant}, interface {} (ifindex {ifindex})",
            names[i],
            Lab::iface(i)
        );
    }
    for port in [5432, 9000, 22] {
        tcp_echo(&lab.pods[1], &format!("10.77.0.2:{port}"));
    }
    tcp_echo(&lab.pods[0], "10.77.0.1:8080");
    let (web, scanner) = (&lab.pods[0], &lab.pods[2]);

    step(2, "default deny: no policy yet");
    check(tcp_connect(web, "10.77.0.2:5432", DENIED).is_none(), "web → db:5432 is dropped")?;

    step(3, "allow web → db on tcp/5432 only");
    let rule = dp.writer().install(&flow(WEB, DB, 5432, None))?;
    println!("    rule cookie {}", rule.cookie);
    let mut conn = tcp_connect(web, "10.77.0.2:5432", OPEN);
    check(conn.as_mut().is_some_and(|c| echo_once(c, OPEN)), "web → db:5432 connects and replies come back")?;
    check(tcp_connect(web, "10.77.0.2:22", DENIED).is_none(), "web → db:22 stays closed")?;

    step(4, "tenant isolation: globex's scanner gets a tenant-level allow to web:8080");
    dp.writer().install(&flow(SCANNER, WEB, 8080, None))?;
    check(
        tcp_connect(scanner, "10.77.0.1:8080", DENIED).is_none(),
        "cross-tenant stays denied: only the admin tier can open it",
    )?;

    step(5, "a 5-second grant web → db:9000; the kernel closes it on expiry, userspace stays idle");
    let grant = dp.writer().install(&flow(WEB, DB, 9000, Some(Duration::from_secs(5))))?;
    let mut g = tcp_connect(web, "10.77.0.2:9000", OPEN);
    check(g.is_some(), "granted connection opened")?;
    let start = Instant::now();
    if let Some(c) = g.as_mut() {
        while start.elapsed() < Duration::from_secs(10) && echo_once(c, Duration::from_millis(300)) {
            std::thread::sleep(Duration::from_millis(250));
        }
    }
    let lived = start.elapsed();
    println!("    established connection answered for {:.1}s", lived.as_secs_f64());
    check(
        lived > Duration::from_secs(4) && lived < Duration::from_secs(7),
        "the kernel cut it when the grant expired",
    )?;
    check(
        dp.writer().rules().iter().any(|r| r.cookie == grant.cookie),
        "the expired grant is still in the map: expiry needed no userspace",
    )?;

    step(6, "revoke the web → db:5432 rule while its connection is live");
    check(conn.as_mut().is_some_and(|c| echo_once(c, OPEN)), "connection alive before revocation")?;
    dp.writer().revoke(rule.cookie)?;
    check(conn.as_mut().is_some_and(|c| !echo_once(c, DENIED)), "revocation cut the established connection")?;

    step(7, "what the kernel counted");
    let counters = dp.writer().counters()?;
    for (r, n) in &counters {
        if *n > 0 {
            println!("    {:<20} {n}", r.name());
        }
    }
    check(
        counters[&Reason::DropCrossTenant] > 0 && counters[&Reason::CtInvalidated] > 0,
        "cross-tenant drops and cut flows were counted",
    )?;
    println!(
        "\nNext: the same data plane survives its holder being killed (`ztseg-dataplane --pin-dir ... --iface ...`);"
    );
    println!(
        "pinned maps live under {PIN_DIR} while it runs (bpftool map show pinned {PIN_DIR}/ZT_COUNTERS)."
    );
    Ok(())
}
