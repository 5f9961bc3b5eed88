//! `cargo xtask demo`: a narrated run of the example lab in `policies/demo/`, driving the real
//! `ztseg` CLI: two simulated hosts each running `ztseg enforcer run`, a shop of tenant acme
//! and a scanner of tenant globex. Every step is checked against real traffic; the demo exits
//! non-zero if anything differs from what it narrates, and removes everything it created.
//!
//! Usage: `ztseg-demo PATH/TO/ztseg REPO_ROOT`
#![forbid(unsafe_code)]

use std::{
    io::{Read as _, Write as _},
    net::TcpStream,
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

struct Demo {
    ztseg: PathBuf,
    lab: PathBuf,
}

fn step(n: u32, text: &str) {
    println!("\n\x1b[1m[{n}] {text}\x1b[0m");
}

fn check(ok: bool, what: &str) -> Result<()> {
    if ok {
        println!("    ✔ {what}");
        Ok(())
    } else {
        bail!("unexpected: {what} did not hold")
    }
}

impl Demo {
    fn run(&self, args: &[&str]) -> Result<String> {
        println!("    $ ztseg {}", args.join(" "));
        self.run_quiet(args)
    }

    /// As [`Demo::run`] without echoing the command (polling).
    fn run_quiet(&self, args: &[&str]) -> Result<String> {
        let out = Command::new(&self.ztseg).args(args).output().context("running ztseg")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("ztseg {} failed: {text}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    }

    /// `ztseg` inside the lab controller's namespace, as the lab's admin identity.
    fn run_ctl(&self, args: &[&str]) -> Result<String> {
        println!("    $ ztseg {}", args.join(" "));
        let out = Command::new("ip")
            .args(["netns", "exec", "zl-demo-ctl"])
            .arg(&self.ztseg)
            .args(args)
            .env("ZTSEG_CONTROLLER", "10.75.0.1:7443")
            .env("ZTSEG_IDENTITY_DIR", "/run/ztseg/lab/demo/controller/admin")
            .output()
            .context("running ztseg in the controller's namespace")?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!("ztseg {} failed: {text}{}", args.join(" "), String::from_utf8_lossy(&out.stderr));
        }
        Ok(text)
    }

    fn lab_arg(&self) -> &str {
        self.lab.to_str().unwrap_or_default()
    }

    fn socket(host: &str) -> String {
        format!("/run/ztseg/lab/demo/{host}.sock")
    }
}

/// Namespace of pod `i` in the demo lab (pods in file order).
fn pod_ns(i: usize) -> String {
    format!("zl-demo-p{i}")
}

/// Open a TCP connection from pod `from` and read the server's greeting byte.
fn connect(from: usize, to: &str, timeout: Duration) -> Option<TcpStream> {
    let addr = to.parse().ok()?;
    ztseg::lab::in_netns(&pod_ns(from), || {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        let mut b = [0u8; 1];
        s.read_exact(&mut b)?;
        Ok(s)
    })
    .ok()
}

/// One echo round trip on an open connection.
fn alive(s: &mut TcpStream) -> bool {
    let mut b = [0u8; 4];
    s.write_all(b"ping").is_ok() && s.read_exact(&mut b).is_ok() && &b == b"ping"
}

fn main() -> Result<()> {
    let mut args = std::env::args().skip(1);
    let ztseg = PathBuf::from(args.next().context("usage: ztseg-demo ZTSEG_BINARY REPO_ROOT")?);
    let root = PathBuf::from(args.next().context("usage: ztseg-demo ZTSEG_BINARY REPO_ROOT")?);
    ztseg_integration::require_root();
    let demo = Demo { ztseg, lab: root.join("policies/demo/lab.yaml") };
    let _ = Command::new(&demo.ztseg).args(["lab", "down", "-f", demo.lab_arg()]).output();
    let result = run(&demo);
    let down = demo.run(&["lab", "down", "-f", demo.lab_arg()]);
    match (&result, down) {
        (Ok(()), Ok(_)) => {
            println!("\nztseg demo finished: every step held; lab, enforcers and pins removed.");
            where_next(demo.lab_arg());
        }
        (Err(e), _) => eprintln!("\nztseg demo FAILED: {e:#}"),
        (Ok(()), Err(e)) => eprintln!("\nztseg demo: cleanup failed: {e:#}"),
    }
    result
}

#[expect(clippy::too_many_lines, reason = "the narrated script, step by step")]
fn run(d: &Demo) -> Result<()> {
    println!("ztseg demo — zero-trust micro-segmentation on real traffic");
    let lab = d.lab_arg();

    step(
        1,
        "build the lab: a controller, 2 hosts each with its own enforcer (enrolled with one-time tokens), \
         4 pods; policies from policies/demo/policies applied at the controller",
    );
    print!("{}", d.run(&["lab", "up", "-f", lab])?);

    step(2, "default deny and the allowed paths: probe every pod pair on ports 80 and 5432");
    let out = d.run(&["lab", "probe", "-f", lab])?;
    print!("{out}");
    check(
        !out.contains('['),
        "the matrix matches the expected truth tables in lab.yaml ('.' allowed, 'X' blocked)",
    )?;
    println!("    shop pods reach web:80; only web reaches db:5432; everything else is denied by default");

    step(3, "tenant isolation: the web policy admits every namespace, yet globex's scanner stays out");
    check(
        connect(3, "10.77.0.1:80", Duration::from_millis(500)).is_none(),
        "globex/scanner -> shop/web:80 blocked (cross-tenant)",
    )?;
    check(
        connect(2, "10.77.0.1:80", Duration::from_secs(2)).is_some(),
        "shop/cache -> shop/web:80 allowed (same tenant)",
    )?;
    println!("    why? node1's enforcer explains both ends' decisions, probe by probe:");
    let out = d.run(&[
        "lab",
        "explain",
        "-f",
        lab,
        "--from",
        "globex/scanner",
        "--to",
        "shop/web",
        "--port",
        "80",
    ])?;
    for l in out.lines() {
        println!("      {l}");
    }
    check(
        out.contains("globex/scanner egress check")
            && out.contains("shop/web ingress check")
            && out.matches("(drop_cross_tenant)").count() == 2,
        "both ends' checks drop it for tenant isolation, before any policy rule is consulted",
    )?;

    step(4, "a 10-second grant: shop/cache -> shop/db:5432, opened through node2's enforcer API");
    check(connect(2, "10.77.1.1:5432", Duration::from_millis(500)).is_none(), "before the grant: blocked")?;
    print!(
        "{}",
        d.run(&[
            "grants",
            "open",
            "shop/cache",
            "shop/db",
            "--port",
            "5432",
            "--ttl",
            "10s",
            "--reason",
            "demo",
            "--socket",
            &Demo::socket("node2")
        ])?
    );
    let mut conn =
        connect(2, "10.77.1.1:5432", Duration::from_secs(2)).context("granted connection did not open")?;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(20) {
        conn.set_read_timeout(Some(Duration::from_millis(400)))?;
        if !alive(&mut conn) {
            break;
        }
        std::thread::sleep(Duration::from_millis(250));
    }
    let lived = start.elapsed();
    println!("    the established connection answered for {:.1}s", lived.as_secs_f64());
    check(
        lived > Duration::from_secs(8) && lived < Duration::from_secs(13),
        "the kernel closed it when the grant expired",
    )?;
    check(connect(2, "10.77.1.1:5432", Duration::from_millis(500)).is_none(), "after expiry: blocked again")?;

    step(5, "revocation: a 1-hour grant, a live connection, then `ztseg grants revoke`");
    let out = d.run(&[
        "-o",
        "json",
        "grants",
        "open",
        "shop/cache",
        "shop/db",
        "--port",
        "5432",
        "--ttl",
        "1h",
        "--socket",
        &Demo::socket("node2"),
    ])?;
    let v: serde_json::Value = serde_json::from_str(&out)?;
    let cookie = v[0]["cookie"].as_u64().context("grant cookie")?.to_string();
    let mut conn =
        connect(2, "10.77.1.1:5432", Duration::from_secs(2)).context("granted connection did not open")?;
    conn.set_read_timeout(Some(Duration::from_secs(1)))?;
    check(alive(&mut conn), "connection alive")?;
    d.run(&["grants", "revoke", &cookie, "--socket", &Demo::socket("node2")])?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))?;
    check(!alive(&mut conn), "revocation cut the established connection")?;

    step(6, "central policy: a change at the controller reaches both hosts; history, rollback, audit");
    check(
        connect(2, "10.77.1.1:5432", Duration::from_millis(500)).is_none(),
        "shop/cache -> shop/db:5432 blocked",
    )?;
    let dir = std::env::temp_dir().join(format!("ztseg-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    d.run_ctl(&["policy", "get", "--out", dir.to_str().unwrap_or_default()])?;
    std::fs::write(
        dir.join("cache-to-db.yaml"),
        "apiVersion: networking.k8s.io/v1\nkind: NetworkPolicy\nmetadata: {name: db-from-cache, namespace: shop}\n\
         spec:\n  podSelector: {matchLabels: {app: db}}\n  ingress:\n    - from: [{podSelector: {matchLabels: {app: cache}}}]\n\
         \x20     ports: [{port: 5432}]\n",
    )?;
    print!(
        "{}",
        d.run_ctl(&["policy", "apply", dir.to_str().unwrap_or_default(), "-m", "cache needs the db"])?
    );
    let _ = std::fs::remove_dir_all(&dir);
    let enforced = |v: u64| -> Result<bool> {
        Ok(["node1", "node2"].iter().all(|h| {
            d.run_quiet(&["-o", "json", "enforcer", "status", "--socket", &Demo::socket(h)])
                .ok()
                .and_then(|o| serde_json::from_str::<serde_json::Value>(&o).ok())
                .is_some_and(|s| s[0]["controller_version"] == v)
        }))
    };
    let t = Instant::now();
    while !enforced(2)? && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    check(
        enforced(2)?,
        &format!(
            "both enforcers enforce version 2 ({:.0} ms after the apply)",
            t.elapsed().as_secs_f64() * 1000.0
        ),
    )?;
    check(
        connect(2, "10.77.1.1:5432", Duration::from_secs(2)).is_some(),
        "shop/cache -> shop/db:5432 now allowed",
    )?;
    print!("{}", d.run_ctl(&["policy", "history"])?);
    print!("{}", d.run_ctl(&["policy", "rollback", "1", "-m", "back to the reviewed version"])?);
    let t = Instant::now();
    while !enforced(3)? && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    check(
        connect(2, "10.77.1.1:5432", Duration::from_millis(500)).is_none(),
        "after the rollback: blocked again",
    )?;
    print!("{}", d.run_ctl(&["audit", "verify"])?);
    let siem = std::fs::read_to_string("/run/ztseg/lab/demo/siem.jsonl").unwrap_or_default();
    let denied = siem.lines().filter(|l| l.contains("\"class_uid\":4001")).count();
    println!(
        "    SIEM export (OCSF JSON lines): {} records, {denied} of them denied flows",
        siem.lines().count()
    );
    check(denied > 0, "denied flows reached the SIEM sink")?;

    step(7, "what node2's enforcer saw");
    print!("{}", d.run(&["rules", "--socket", &Demo::socket("node2")])?);
    let stats = d.run(&["-o", "json", "stats", "--socket", &Demo::socket("node2")])?;
    let v: serde_json::Value = serde_json::from_str(&stats)?;
    let count = |r: &str| {
        v.as_array()
            .and_then(|a| a.iter().find(|c| c["reason"] == r))
            .and_then(|c| c["packets"].as_u64())
            .unwrap_or(0)
    };
    println!(
        "    drop_default={} allow_policy={} ct_invalidated={}",
        count("drop_default"),
        count("allow_policy"),
        count("ct_invalidated")
    );
    check(count("drop_default") > 0 && count("ct_invalidated") > 0, "drops and cut flows were counted")?;
    // cache and db share node2: the granted connections between them went straight from one
    // pod's namespace to the other's, both checks in one pass (docs/datapath.md).
    println!("    local_delivery={}", count("local_delivery"));
    check(
        count("local_delivery") > 0,
        "same-host traffic (cache -> db) took local delivery, checks included",
    )?;

    Ok(())
}

/// What to try next. The demo has taken its lab down by now: the commands start with
/// bringing it up again.
fn where_next(lab: &str) {
    println!("\nWhere to look next: the demo removed its lab; bring it up again first (as root):");
    println!("  up:       ztseg lab up -f {lab}");
    println!("  metrics:  ip netns exec zl-demo-h1 curl -s 127.0.0.1:9464/metrics   (readiness: /readyz)");
    println!("  flows:    ztseg flows --socket {} --verdict DROP", Demo::socket("node2"));
    println!("  status:   ztseg enforcer status --socket {}", Demo::socket("node2"));
    println!(
        "  why:      ztseg explain --socket {} --from shop/cache --to shop/db --port 5432",
        Demo::socket("node2")
    );
    println!("  policy:   ip netns exec zl-demo-ctl env ZTSEG_CONTROLLER=10.75.0.1:7443 \\");
    println!("              ZTSEG_IDENTITY_DIR=/run/ztseg/lab/demo/controller/admin ztseg policy history");
    println!("  audit:    /run/ztseg/lab/demo/siem.jsonl (OCSF JSON lines)   (docs/controller.md)");
    println!("  down:     ztseg lab down -f {lab}");
    println!("  your own: ztseg lab up|probe|explain|apply|label|down -f YOUR-LAB.yaml   (docs/lab.md)");
}
