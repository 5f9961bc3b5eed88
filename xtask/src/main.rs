//! `cargo xtask`: set-up, demo, tests and benchmarks for ztseg.
//!
//! Every task first runs `setup`, which is idempotent and installs only what is missing:
//! Debian packages, `rust-src` for the nightly toolchain that builds the eBPF object,
//! `bpf-linker` built against that toolchain's own LLVM (in `.tools/`), and bpffs at
//! `/sys/fs/bpf`. A fresh Debian machine with rustup (stable + nightly) and cargo needs nothing
//! else.
#![forbid(unsafe_code)]

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

/// Debian packages the tests, demo and benchmarks use.
const APT_PACKAGES: &[&str] = &[
    "iproute2",
    "bpftool",
    "mold",
    "iperf3",
    "iptables",
    "nftables",
    "iputils-ping",
    "netcat-openbsd",
    "procps",
    // protoc for the gRPC API types (crate ztseg-api).
    "protobuf-compiler",
    // setpriv, for the test that the API socket refuses non-root callers.
    "util-linux",
    // etcd (server and etcdctl) for the controller's HA store tests.
    "etcd-server",
    "etcd-client",
    // openssl, to show an encrypted CA key opens with standard tooling.
    "openssl",
    // modprobe, which loads the sctp module for the lab's SCTP servers and probes (the
    // kernel's own module autoload runs it too).
    "kmod",
];
/// Toolchain that compiles the eBPF crate (aya-build runs `rustup run nightly cargo ...`).
const EBPF_TOOLCHAIN: &str = "nightly";
const BPF_LINKER_VERSION: &str = "0.13.0";
/// Project-local tools directory (git-ignored); `.cargo/config.toml` points the bpfel
/// linker at `.tools/bin/bpf-linker`.
const TOOLS_DIR: &str = ".tools";
const BPFFS: &str = "/sys/fs/bpf";

#[derive(Parser)]
#[command(about = "ztseg developer tasks")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Install what is missing (packages, rust-src, bpf-linker, bpffs). Idempotent.
    Setup,
    /// Run the enforcement demo in network namespaces (root).
    Demo,
    /// Format check, clippy, unit tests, then the root-only data-plane tests.
    Test {
        /// Extra arguments for the privileged test run (e.g. a test name filter).
        #[arg(trailing_var_arg = true)]
        args: Vec<String>,
    },
    /// Benchmarks (root): `datapath`, `throughput`, `control`.
    Bench {
        #[arg(value_parser = ["datapath", "throughput", "control"])]
        which: String,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    let root = workspace_root()?;
    std::env::set_current_dir(&root)?;
    match cli.command {
        Cmd::Setup => setup(&root),
        Cmd::Demo => {
            setup(&root)?;
            require_root("the demo")?;
            cargo(
                &root,
                &[
                    "build",
                    "--release",
                    "-p",
                    "ztseg-integration",
                    "--bin",
                    "ztseg-demo",
                    "-p",
                    "ztseg",
                    "--bin",
                    "ztseg",
                ],
            )?;
            let mut cmd = Command::new(root.join("target/release/ztseg-demo"));
            cmd.arg(root.join("target/release/ztseg")).arg(&root);
            run(cmd)
        }
        Cmd::Test { args } => {
            setup(&root)?;
            test(&root, &args)
        }
        Cmd::Bench { which } => {
            setup(&root)?;
            require_root("benchmarks")?;
            match which.as_str() {
                "datapath" => {
                    cargo(&root, &["build", "--release", "-p", "ztseg-benches", "--bin", "bench-datapath"])?;
                    let mut cmd = Command::new(root.join("target/release/bench-datapath"));
                    cmd.arg(&root);
                    run(cmd)
                }
                "throughput" => {
                    cargo(
                        &root,
                        &["build", "--release", "-p", "ztseg-benches", "--bin", "bench-throughput"],
                    )?;
                    let mut cmd = Command::new(root.join("target/release/bench-throughput"));
                    cmd.arg(&root);
                    run(cmd)
                }
                "control" => {
                    cargo(
                        &root,
                        &[
                            "build",
                            "--release",
                            "-p",
                            "ztseg-benches",
                            "--bin",
                            "bench-control",
                            "-p",
                            "ztseg",
                            "--bin",
                            "ztseg",
                        ],
                    )?;
                    let mut cmd = Command::new(root.join("target/release/bench-control"));
                    cmd.arg(&root).arg(root.join("target/release/ztseg"));
                    run(cmd)
                }
                other => bail!("unknown benchmark {other} (datapath, throughput, control)"),
            }
        }
    }
}

fn workspace_root() -> Result<PathBuf> {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    Ok(manifest.parent().context("xtask has no parent directory")?.to_path_buf())
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn require_root(what: &str) -> Result<()> {
    if !is_root() {
        bail!("{what} needs root (network namespaces, BPF programs): run `sudo -E cargo xtask ...`");
    }
    Ok(())
}

fn run(mut cmd: Command) -> Result<()> {
    let status = cmd.status().with_context(|| format!("starting {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Run cargo with the fast linker when it is installed.
fn cargo(root: &Path, args: &[&str]) -> Result<()> {
    run(cargo_command(root, args))
}

fn cargo_command(root: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.current_dir(root).args(args);
    if Path::new("/usr/bin/mold").exists() {
        cmd.env("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_RUSTFLAGS", "-C link-arg=-fuse-ld=mold");
    }
    cmd
}

fn test(root: &Path, extra: &[String]) -> Result<()> {
    cargo(root, &["fmt", "--all", "--", "--check"])?;
    cargo(
        root,
        &["clippy", "--workspace", "--exclude", "enforcer-ebpf", "--all-targets", "--", "-D", "warnings"],
    )?;
    // Unit tests: no root needed.
    cargo(
        root,
        &[
            "test",
            "--workspace",
            "--exclude",
            "enforcer-ebpf",
            "--exclude",
            "ztseg-integration",
            "--exclude",
            "ztseg-benches",
        ],
    )?;
    // Privileged data-plane tests: these run, never skip; without root they fail.
    require_root("the data-plane tests")?;
    let mut args = vec!["test", "-p", "ztseg-integration"];
    if !extra.is_empty() {
        args.push("--");
        args.extend(extra.iter().map(String::as_str));
    }
    with_deadline(cargo_command(root, &args), integration_deadline()?)
}

/// How long the root-only tests may take before they count as hung:
/// `ZTSEG_TEST_TIMEOUT_MIN` minutes, default 60 (they take a few minutes).
fn integration_deadline() -> Result<Duration> {
    let min = match std::env::var("ZTSEG_TEST_TIMEOUT_MIN") {
        Ok(v) => v.parse::<u64>().with_context(|| format!("ZTSEG_TEST_TIMEOUT_MIN={v:?}: not a number"))?,
        Err(_) => 60,
    };
    Ok(Duration::from_secs(min * 60))
}

/// Run `cmd` in its own process group; if it is still running at `deadline`, kill the whole
/// group — test binaries and every daemon, controller and etcd they started — and remove the
/// tests' pinned data planes, then fail. A hung test thus ends the run with a message instead
/// of holding CI until its own limit, and leaves no enforcement behind. (libtest names tests
/// running for over 60 s in the output above.)
fn with_deadline(mut cmd: Command, deadline: Duration) -> Result<()> {
    use std::os::unix::process::CommandExt as _;
    let mut child = cmd.process_group(0).spawn().with_context(|| format!("starting {cmd:?}"))?;
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait()? {
            if !status.success() {
                bail!("{cmd:?} failed: {status}");
            }
            return Ok(());
        }
        if start.elapsed() >= deadline {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let pgid = child.id();
    eprintln!("xtask: the tests did not finish within {} min; stopping them", deadline.as_secs() / 60);
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pgid}")]).status();
    let _ = child.wait();
    // Pinned programs of the killed tests would otherwise keep enforcing in their namespaces.
    let _ = fs::remove_dir_all(TEST_PIN_ROOT);
    bail!(
        "tests hung: killed after {} min (see the tests named as running for over 60 s above)",
        deadline.as_secs() / 60
    )
}

/// Pin directories of the root-only tests (`ztseg_integration::TEST_PIN_ROOT`).
const TEST_PIN_ROOT: &str = "/sys/fs/bpf/ztseg-test";

fn setup(root: &Path) -> Result<()> {
    apt(&APT_PACKAGES.iter().copied().filter(|p| !dpkg_installed(p)).collect::<Vec<_>>())?;
    rust_src()?;
    bpf_linker(root)?;
    bpffs()
}

fn dpkg_installed(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn apt(missing: &[&str]) -> Result<()> {
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing Debian packages {missing:?}");
    let sudo: &[&str] = if is_root() { &[] } else { &["sudo"] };
    let mut update = Command::new(sudo.first().copied().unwrap_or("apt-get"));
    if !sudo.is_empty() {
        update.arg("apt-get");
    }
    update.args(["update", "-qq"]);
    run(update)?;
    let mut install = Command::new(sudo.first().copied().unwrap_or("apt-get"));
    if !sudo.is_empty() {
        install.arg("apt-get");
    }
    install
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y", "-qq", "--no-install-recommends"])
        .args(missing);
    run(install)
}

fn rust_src() -> Result<()> {
    let installed = output(Command::new("rustup").args(["component", "list", "--installed", "--toolchain", EBPF_TOOLCHAIN]))
        .with_context(|| format!("the {EBPF_TOOLCHAIN} toolchain is needed for the eBPF object: rustup toolchain install {EBPF_TOOLCHAIN}"))?;
    if installed.lines().any(|l| l.starts_with("rust-src")) {
        return Ok(());
    }
    eprintln!("xtask: adding rust-src to {EBPF_TOOLCHAIN}");
    run({
        let mut c = Command::new("rustup");
        c.args(["component", "add", "rust-src", "--toolchain", EBPF_TOOLCHAIN]);
        c
    })
}

/// Build bpf-linker against the eBPF toolchain's own libLLVM unless the stamp says the one in
/// `.tools/` already matches that toolchain.
fn bpf_linker(root: &Path) -> Result<()> {
    let tools = root.join(TOOLS_DIR);
    let vv = output(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "-vV"]))?;
    let field = |name: &str| vv.lines().find_map(|l| l.strip_prefix(name)).map(str::trim).map(str::to_owned);
    let commit = field("commit-hash:").context("rustc -vV: no commit-hash")?;
    let llvm = field("LLVM version:").context("rustc -vV: no LLVM version")?;
    let major = llvm.split('.').next().unwrap_or_default().to_owned();
    let stamp = format!("bpf-linker {BPF_LINKER_VERSION} llvm-{major} rustc {commit}\n");
    let stamp_path = tools.join("bpf-linker.stamp");
    let bin = tools.join("bin/bpf-linker");
    if bin.exists() && fs::read_to_string(&stamp_path).is_ok_and(|s| s == stamp) {
        return Ok(());
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {llvm} of the {EBPF_TOOLCHAIN} toolchain"
    );
    let sysroot =
        output(Command::new("rustup").args(["run", EBPF_TOOLCHAIN, "rustc", "--print", "sysroot"]))?;
    let sysroot_lib = PathBuf::from(sysroot.trim()).join("lib");
    let lib = fs::read_dir(&sysroot_lib)?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM in {}", sysroot_lib.display()))?;
    let prefix = tools.join("llvm");
    let prefix_lib = prefix.join("lib");
    let _ = fs::remove_dir_all(&prefix);
    // A stale symlinked bin/ from an older layout would redirect the install.
    if fs::symlink_metadata(tools.join("bin")).is_ok_and(|m| m.file_type().is_symlink()) {
        fs::remove_file(tools.join("bin"))?;
    }
    fs::create_dir_all(&prefix_lib)?;
    std::os::unix::fs::symlink(sysroot_lib.join(&lib), prefix_lib.join("libLLVM.so"))?;
    std::os::unix::fs::symlink(sysroot_lib.join(&lib), prefix_lib.join(&lib))?;
    let mut cmd = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
    cmd.env("LLVM_PREFIX", &prefix)
        .args(["install", "bpf-linker", "--locked", "--force", "--version", BPF_LINKER_VERSION])
        .args(["--no-default-features", "--features", &format!("llvm-{major}")])
        .arg("--root")
        .arg(&tools)
        .arg("--target-dir")
        .arg(root.join("target/bpf-linker"));
    run(cmd)?;
    fs::write(&stamp_path, stamp)?;
    Ok(())
}

fn bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").unwrap_or_default();
    if mounts
        .lines()
        .any(|l| l.split_whitespace().nth(1) == Some(BPFFS) && l.split_whitespace().nth(2) == Some("bpf"))
    {
        return Ok(());
    }
    if !is_root() {
        eprintln!("xtask: bpffs is not mounted at {BPFFS} (root needed to mount it)");
        return Ok(());
    }
    fs::create_dir_all(BPFFS)?;
    run({
        let mut c = Command::new("mount");
        c.args(["-t", "bpf", "bpf", BPFFS]);
        c
    })
}
