//! The `ztseg` command line: clap definitions and dispatch.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};

use crate::lab;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};
use ztseg_controller::pki::Passphrase;

#[derive(Parser)]
#[command(name = "ztseg", version, about = "Zero-trust micro-segmentation for Linux")]
struct Cli {
    /// Output format of listings.
    #[arg(short = 'o', long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Commands,
}

#[derive(Clone, Copy, ValueEnum, PartialEq, Eq)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Commands {
    /// Network-namespace lab: pods on simulated hosts with real traffic and real enforcement.
    Lab {
        #[command(subcommand)]
        command: LabCommands,
    },
    /// Policy files.
    Policy {
        #[command(subcommand)]
        command: PolicyCommands,
    },
    /// The per-host enforcer daemon.
    Enforcer {
        #[command(subcommand)]
        command: EnforcerCommands,
    },
    /// Managed workloads of this host.
    Workloads(SocketArgs),
    /// Add or remove a workload at run time (kept across daemon restarts).
    Workload {
        #[command(subcommand)]
        command: WorkloadCommands,
    },
    /// Installed rules (policy and grants).
    Rules(SocketArgs),
    /// Short-lived perimeters between workloads, enforced (and expired) by the kernel.
    Grants {
        #[command(subcommand)]
        command: GrantCommands,
    },
    /// Follow flow events (drops, audits, new allowed flows).
    Flows {
        #[command(flatten)]
        socket: SocketArgs,
        /// Only this workload (`namespace/name`), as either end.
        #[arg(long)]
        workload: Option<String>,
        /// Only this tenant.
        #[arg(long)]
        tenant: Option<String>,
        /// Only this verdict.
        #[arg(long, value_parser = ["ALLOW", "DROP", "AUDIT"])]
        verdict: Option<String>,
        /// Stop after this many events.
        #[arg(long)]
        count: Option<usize>,
    },
    /// Why a new flow passes or is dropped: the data plane's decision at each local end of the
    /// flow (sender's egress check, receiver's ingress check), probe by probe, with rule owners.
    Explain {
        #[command(flatten)]
        socket: SocketArgs,
        /// Sender: an address or a workload (`namespace/name`).
        #[arg(long)]
        from: String,
        /// Receiver: an address or a workload (`namespace/name`).
        #[arg(long)]
        to: String,
        /// TCP, UDP, SCTP, ICMP or `ICMPv6`.
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// Destination port (ICMP/ICMPv6: the message type).
        #[arg(long)]
        port: u32,
    },
    /// Packet counters by verdict reason.
    Stats(SocketArgs),
    /// The central controller: CA and enrollment, policy store, distribution, audit.
    Controller {
        #[command(subcommand)]
        command: ControllerCommands,
    },
    /// Obtain a certificate from the controller with a one-time join token.
    Enroll {
        /// Controller address (`host:port`).
        #[arg(long, env = "ZTSEG_CONTROLLER", default_value = "127.0.0.1:7443")]
        controller: String,
        /// The controller's CA certificate (obtained out of band).
        #[arg(long)]
        ca: PathBuf,
        /// One-time join token (from `ztseg controller token`).
        #[arg(long, env = "ZTSEG_JOIN_TOKEN", hide_env_values = true)]
        token: String,
        /// Directory to write `ca.pem`, `<identity>.pem` and `<identity>-key.pem` to.
        #[arg(long)]
        out: PathBuf,
        /// File stem of the identity.
        #[arg(long, default_value = "admin")]
        identity: String,
    },
    /// Replace this identity's certificate with a fresh one (new key, same role and name).
    Renew(crate::ctl::CtlArgs),
    /// The controller's append-only, hash-chained audit log.
    Audit {
        #[command(subcommand)]
        command: AuditCommands,
    },
    /// Print shell completions.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand)]
enum LabCommands {
    /// Build the lab: namespaces, enforcers, servers, policies.
    Up(LabFileArgs),
    /// Probe every pod pair, port and protocol; print the reachability matrix.
    Probe {
        #[command(flatten)]
        file: LabFileArgs,
        #[command(flatten)]
        select: MatrixArgs,
    },
    /// Re-apply the lab file's policies and labels.
    Apply(LabFileArgs),
    /// Change labels of a pod (`ns/pod`) or namespace (`ns:NAME`) and re-apply policies, until
    /// the next `lab apply` (which sets the lab file's labels again).
    Label {
        #[command(flatten)]
        file: LabFileArgs,
        /// `namespace/pod` or `ns:NAMESPACE`.
        target: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// The enforcers' own account of a flow between two pods (`--from`, `--to`): each check,
    /// probe by probe. Without a pair: every cell for every port and protocol (or those given
    /// with `--port`/`--protocol`), from the data plane's maps instead of traffic, in the
    /// probe's matrix form (and against its expectations).
    Explain {
        #[command(flatten)]
        file: LabFileArgs,
        /// Sending pod (`namespace/name` or name).
        #[arg(long, requires_all = ["to", "port"])]
        from: Option<String>,
        /// Receiving pod.
        #[arg(long, requires = "from")]
        to: Option<String>,
        /// TCP, UDP, SCTP or ICMP (default TCP). Without a pair: only this protocol's
        /// matrices (repeatable).
        #[arg(long)]
        protocol: Vec<String>,
        /// Destination port (ICMP: the message type). Without a pair: only this port's
        /// matrices (repeatable).
        #[arg(long)]
        port: Vec<u32>,
    },
    /// Remove the lab: servers, enforcement, namespaces.
    Down(LabFileArgs),
    /// Cut a host's link to the lab controller (its enforcer keeps the last-known policy).
    Isolate {
        #[command(flatten)]
        file: LabFileArgs,
        host: String,
    },
    /// Restart a host's enforcer daemon (SIGTERM, or SIGKILL with `--kill`); its pinned
    /// enforcement stays in force meanwhile.
    Restart {
        #[command(flatten)]
        file: LabFileArgs,
        host: String,
        #[arg(long)]
        kill: bool,
    },
    /// Restore a host's link to the lab controller (it resumes from its policy version).
    Rejoin {
        #[command(flatten)]
        file: LabFileArgs,
        host: String,
    },
    /// (internal) serve a pod's ports.
    #[command(hide = true)]
    Serve {
        #[arg(long)]
        netns: String,
        #[arg(long, value_delimiter = ',')]
        ports: Vec<u16>,
        #[arg(long, value_delimiter = ',')]
        protocols: Vec<String>,
    },
}

#[derive(clap::Args)]
struct SocketArgs {
    /// Enforcer API socket.
    #[arg(long, env = "ZTSEG_SOCKET", default_value = crate::daemon::config::DEFAULT_SOCKET)]
    socket: PathBuf,
}

#[derive(Subcommand)]
enum EnforcerCommands {
    /// Run the daemon (exit code 64 on a configuration error).
    Run {
        /// TOML configuration (see docs/enforcer.example.toml).
        #[arg(long, short = 'c')]
        config: PathBuf,
    },
    /// Daemon status.
    Status(SocketArgs),
    /// Remove the data plane of a pin directory: links, maps, enforcement.
    Uninstall {
        #[arg(long, default_value = crate::daemon::config::DEFAULT_PIN_DIR)]
        pin_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum WorkloadCommands {
    /// Register a workload: a local one is attached before the command returns.
    Add {
        #[command(flatten)]
        socket: SocketArgs,
        /// `namespace/name`.
        workload: String,
        /// Label `key=value` (repeatable).
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        tenant: Option<String>,
        /// Host-side interface of a local workload.
        #[arg(long)]
        interface: Option<String>,
        #[arg(long)]
        ipv4: Option<String>,
        #[arg(long)]
        ipv6: Option<String>,
        #[arg(long, value_parser = ["enforce", "audit"], default_value = "enforce")]
        mode: String,
        /// Node it runs on (default: the enforcer's node).
        #[arg(long)]
        node: Option<String>,
    },
    /// Remove a workload added with `workload add`.
    Remove {
        #[command(flatten)]
        socket: SocketArgs,
        /// `namespace/name`.
        workload: String,
    },
}

#[derive(Subcommand)]
enum GrantCommands {
    /// Open a grant FROM → TO (workloads as namespace/name) on a port or a port range for a TTL.
    Open {
        #[command(flatten)]
        socket: SocketArgs,
        from: String,
        to: String,
        /// Destination port, or a range such as 8000-8100.
        #[arg(long, value_parser = parse_ports)]
        port: (u16, u16),
        #[arg(long, default_value = "TCP")]
        protocol: String,
        /// Lifetime, e.g. 30s, 10m, 2h (at most 24h).
        #[arg(long, value_parser = parse_ttl)]
        ttl: u64,
        /// Why (kept with the grant).
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// List grants.
    List(SocketArgs),
    /// Revoke a grant: its flows stop at the next packet.
    Revoke {
        #[command(flatten)]
        socket: SocketArgs,
        cookie: u32,
    },
}

/// `8080` or `8000-8100` → (first, last) destination port.
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| {
        p.trim().parse::<u16>().ok().filter(|p| *p != 0).ok_or(format!("{p:?}: not a port 1-65535"))
    };
    let (lo, hi) = match s.split_once('-') {
        Some((a, b)) => (port(a)?, port(b)?),
        None => (port(s)?, port(s)?),
    };
    if hi < lo {
        return Err(format!("{s}: the first port comes first"));
    }
    Ok((lo, hi))
}

/// `30s`, `10m`, `2h` or plain seconds → seconds.
fn parse_ttl(s: &str) -> Result<u64, String> {
    let (num, mult) = match s.chars().last() {
        Some('s') => (&s[..s.len() - 1], 1),
        Some('m') => (&s[..s.len() - 1], 60),
        Some('h') => (&s[..s.len() - 1], 3600),
        _ => (s, 1),
    };
    let n: u64 = num.parse().map_err(|_| format!("{s:?}: expected e.g. 30s, 10m, 2h"))?;
    let secs = n * mult;
    if secs == 0 || secs > 86_400 {
        return Err(format!("{s:?}: must be between 1s and 24h"));
    }
    Ok(secs)
}

#[derive(clap::Args)]
struct LabFileArgs {
    /// Lab file.
    #[arg(short = 'f', long = "file")]
    file: PathBuf,
}

#[derive(clap::Args)]
struct MatrixArgs {
    /// Only this port's matrices (repeatable; default: every lab port).
    #[arg(long)]
    port: Vec<u16>,
    /// Only this protocol's matrices (repeatable; default: every lab protocol).
    #[arg(long)]
    protocol: Vec<String>,
}

impl MatrixArgs {
    fn selection(self) -> lab::probe::Selection {
        lab::probe::Selection {
            ports: self.port,
            protocols: self.protocol.iter().map(|p| p.to_uppercase()).collect(),
        }
    }
}

/// The lab file's expectations for the selected matrices.
fn selected_expectations(
    lab_file: &lab::spec::LabFile,
    selection: &lab::probe::Selection,
) -> Vec<lab::spec::Expectation> {
    lab_file.expect.iter().filter(|e| selection.includes(e.port, &e.protocol)).cloned().collect()
}

#[derive(Subcommand)]
enum ControllerCommands {
    /// Create the CA, the controller's server certificate and a first admin identity
    /// (`<data-dir>/admin/`).
    Init {
        #[arg(long, env = "ZTSEG_CONTROLLER_DATA_DIR", default_value = "/var/lib/ztseg/controller")]
        data_dir: PathBuf,
        #[arg(long, default_value = "ztseg.local")]
        trust_domain: String,
        /// Extra DNS name or IP address for the server certificate (repeatable).
        #[arg(long)]
        san: Vec<String>,
        /// Store the CA key encrypted under the passphrase in this file (its first line);
        /// `controller run` then needs the same file.
        #[arg(long, env = "ZTSEG_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
    },
    /// Run the controller.
    Run(Box<crate::ctl::RunArgs>),
    /// Encrypt the CA key at rest, or change its passphrase (the controller must be restarted
    /// with the new passphrase file).
    ProtectCaKey {
        #[arg(long, env = "ZTSEG_CONTROLLER_DATA_DIR", default_value = "/var/lib/ztseg/controller")]
        data_dir: PathBuf,
        /// The new passphrase (first line of the file).
        #[arg(long)]
        new_passphrase_file: PathBuf,
        /// The current passphrase, when the key is already encrypted.
        #[arg(long, env = "ZTSEG_CA_PASSPHRASE_FILE")]
        ca_passphrase_file: Option<PathBuf>,
    },
    /// Create a one-time join token for `ztseg enroll` (admin).
    Token {
        #[command(flatten)]
        id: IdentityArgs,
        /// Token lifetime, e.g. 10m, 1h.
        #[arg(long, value_parser = parse_ttl, default_value = "1h")]
        ttl: u64,
        /// Certificate lifetime in days.
        #[arg(long, default_value_t = 30)]
        cert_days: u64,
    },
    /// Enforcers known to the controller and the policy version each enforces.
    Enforcers(crate::ctl::CtlArgs),
    /// Revoke every certificate issued so far to an identity, and its outstanding join tokens
    /// (admin). A token created afterwards enrolls it again.
    Revoke {
        #[command(flatten)]
        id: IdentityArgs,
    },
    /// Outstanding join tokens: id, role, name, creation, expiry, creator (never the token).
    Tokens(crate::ctl::CtlArgs),
    /// Delete an outstanding join token by its id (from `controller tokens`; a unique prefix
    /// of at least 8 digits will do) (admin).
    RevokeToken {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        id: String,
    },
}

/// An enrollable identity at the controller.
#[derive(clap::Args)]
struct IdentityArgs {
    #[command(flatten)]
    ctl: crate::ctl::CtlArgs,
    #[arg(long, value_parser = ["admin", "operator", "auditor", "enforcer"])]
    role: String,
    /// Name of the identity (e.g. the host name of an enforcer).
    #[arg(long)]
    name: String,
}

#[derive(Subcommand)]
enum AuditCommands {
    /// Records in sequence order.
    List {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        #[arg(long, default_value_t = 1)]
        from: u64,
        #[arg(long, default_value_t = 1000)]
        limit: u32,
    },
    /// Check the hash chain; names the first missing or modified record (exit 1).
    Verify {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        /// Verify the embedded store in this controller data directory directly (the
        /// controller must be stopped) instead of asking the controller.
        #[arg(long, conflicts_with = "archive")]
        data_dir: Option<PathBuf>,
        /// Verify an archive written by `ztseg audit archive` on its own (the chain inside it);
        /// prints its first and last record, last hash and SHA-256.
        #[arg(long)]
        archive: Option<PathBuf>,
        /// A record the chain must still hold, as `SEQ:HASH` (repeatable): kept outside the
        /// controller, e.g. the `metadata.sequence` and `unmapped.hash` of a SIEM line. Catches
        /// a log whose newest records were cut off and its head rewritten to match.
        #[arg(long = "anchor", value_name = "SEQ:HASH")]
        anchors: Vec<String>,
    },
    /// Move the records before `--before` into a new file (JSON lines, byte for byte as
    /// stored, chain checked, fsynced), then prune them from the controller (admin). The
    /// controller records the prune, with the archive's SHA-256, in an `audit.prune` record.
    Archive {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        /// First sequence number to keep; every record before it is archived and pruned.
        #[arg(long)]
        before: u64,
        /// The archive file to create (must not exist).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(Subcommand)]
enum PolicyCommands {
    /// Commit files/directories as the controller's next policy version.
    Apply {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        /// Change description kept in the history.
        #[arg(long, short = 'm', default_value = "")]
        message: String,
        /// Fail unless the controller is at this version (optimistic concurrency).
        #[arg(long, default_value_t = 0)]
        expected_version: u64,
        /// Validate and show the diff without committing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Diff files/directories against the controller's policy (current or `--against`).
    Diff {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long, default_value_t = 0)]
        against: u64,
    },
    /// Print (or write to a directory) the documents of a policy version.
    Get {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        /// Version (default: current).
        #[arg(long, default_value_t = 0)]
        version: u64,
        /// Write the documents under this directory instead of printing them.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Policy versions, newest first, with actor, time and change summary.
    History {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// Commit a new version equal to an earlier one.
    Rollback {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        version: u64,
        #[arg(long, short = 'm', default_value = "")]
        message: String,
    },
    /// Keep the current version and the `--keep - 1` before it; delete older versions (admin).
    /// Version numbers stay; pruned versions can no longer be read or rolled back to. The
    /// controller records the prune in a `policy.prune` audit record.
    Prune {
        #[command(flatten)]
        ctl: crate::ctl::CtlArgs,
        /// How many versions to keep, the current one included (at least 1).
        #[arg(long)]
        keep: u64,
    },
    /// Check policy files; report every error with file, position and field.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
    /// Run policy tests offline (docs/policy-test.md); exit 1 if a case fails, 2 if a file is invalid.
    Test {
        /// Test files or directories.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// More policy files or directories, loaded for every test (repeatable).
        #[arg(long)]
        policies: Vec<PathBuf>,
    },
}

/// Every environment variable an argument of the `ztseg` CLI reads (`ZTSEG_CONTROLLER`,
/// `ZTSEG_IDENTITY_DIR`, ...).
#[must_use]
pub fn client_env_vars() -> std::collections::BTreeSet<String> {
    fn walk(cmd: &clap::Command, out: &mut std::collections::BTreeSet<String>) {
        for arg in cmd.get_arguments() {
            if let Some(env) = arg.get_env() {
                out.insert(env.to_string_lossy().into_owned());
            }
        }
        for sub in cmd.get_subcommands() {
            walk(sub, out);
        }
    }
    let mut out = std::collections::BTreeSet::new();
    walk(&Cli::command(), &mut out);
    out
}

/// Parse the process arguments and run; the binary's whole `main`.
#[must_use]
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Commands::Completions { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "ztseg", &mut std::io::stdout());
            Ok(ExitCode::SUCCESS)
        }
        Commands::Policy { command: PolicyCommands::Validate { paths } } => validate(&paths),
        Commands::Policy { command: PolicyCommands::Test { files, policies } } => {
            let format = match cli.output {
                Output::Table => crate::policy_test::Format::Table,
                Output::Json => crate::policy_test::Format::Json,
                Output::Yaml => crate::policy_test::Format::Yaml,
            };
            Ok(crate::policy_test::command(&files, &policies, format))
        }
        Commands::Lab { command } => lab_cmd(command, cli.output),
        Commands::Controller {
            command: ControllerCommands::Init { data_dir, trust_domain, san, ca_passphrase_file },
        } => {
            let pass = ca_passphrase_file.as_deref().map(Passphrase::from_file).transpose()?;
            let files = ztseg_controller::server::init(&data_dir, &trust_domain, &san, pass.as_ref())?;
            println!(
                "controller CA and server certificate in {}; admin identity in {} (use --identity-dir {})",
                data_dir.display(),
                files.cert.display(),
                files.cert.parent().map_or_else(String::new, |p| p.display().to_string())
            );
            Ok(ExitCode::SUCCESS)
        }
        Commands::Controller { command: ControllerCommands::Run(a) } => crate::ctl::run_controller(*a),
        Commands::Controller {
            command: ControllerCommands::ProtectCaKey { data_dir, new_passphrase_file, ca_passphrase_file },
        } => {
            let old = ca_passphrase_file.as_deref().map(Passphrase::from_file).transpose()?;
            let new = Passphrase::from_file(&new_passphrase_file)?;
            let ca = ztseg_controller::pki::Ca::load(&data_dir, old.as_ref())?;
            ca.save_key(&data_dir, Some(&new))?;
            println!(
                "CA key in {} encrypted under the passphrase in {}",
                data_dir.display(),
                new_passphrase_file.display()
            );
            Ok(ExitCode::SUCCESS)
        }
        command @ (Commands::Controller { .. }
        | Commands::Enroll { .. }
        | Commands::Renew(_)
        | Commands::Audit { .. }
        | Commands::Policy { .. }) => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(controller_cmd(command, cli.output))
        }
        Commands::Enforcer { command: EnforcerCommands::Run { config } } => Ok(crate::daemon::run(&config)),
        Commands::Enforcer { command: EnforcerCommands::Uninstall { pin_dir } } => {
            enforcer::Datapath::uninstall(&pin_dir)?;
            println!("removed {}: enforcement stopped", pin_dir.display());
            Ok(ExitCode::SUCCESS)
        }
        command => {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(remote(command, cli.output))
        }
    }
}

/// Commands that talk to the controller.
#[expect(clippy::too_many_lines, reason = "one match arm per command, each a few lines")]
async fn controller_cmd(command: Commands, output: Output) -> Result<ExitCode> {
    use crate::ctl;
    match command {
        Commands::Controller {
            command: ControllerCommands::Token { id: IdentityArgs { ctl: a, role, name }, ttl, cert_days },
        } => {
            // The token is a secret: printed once, to stdout only. Its id (for `controller
            // tokens` and `revoke-token`) goes to stderr.
            let t = ctl::create_token(&a, &role, &name, ttl, cert_days * 86_400).await?;
            println!("{}", t.token);
            eprintln!(
                "join token {} for {role}/{name}, expires {}",
                t.id,
                ctl::time_str(t.expires_unix * 1000)
            );
        }
        Commands::Controller { command: ControllerCommands::Tokens(a) } => {
            let rows = ctl::tokens(&a)
                .await?
                .into_iter()
                .map(|t| {
                    vec![
                        ("id", t.id.into()),
                        ("role", t.role.into()),
                        ("name", t.name.into()),
                        (
                            "created",
                            if t.created_unix_ms == 0 {
                                serde_json::Value::Null
                            } else {
                                ctl::time_str(t.created_unix_ms).into()
                            },
                        ),
                        ("expires", ctl::time_str(t.expires_unix_ms).into()),
                        ("created_by", t.created_by.into()),
                        ("cert_days", (t.cert_ttl_seconds / 86_400).into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)?;
        }
        Commands::Controller { command: ControllerCommands::RevokeToken { ctl: a, id } } => {
            let t = ctl::revoke_token(&a, &id).await?;
            println!("revoked join token {} for {}/{}", t.id, t.role, t.name);
        }
        Commands::Controller { command: ControllerCommands::Enforcers(a) } => {
            let r = ctl::enforcers(&a).await?;
            let rows = r
                .enforcers
                .into_iter()
                .map(|e| {
                    vec![
                        ("enforcer", e.name.into()),
                        ("enforced_version", e.enforced_version.into()),
                        ("current_version", r.current_version.into()),
                        ("in_sync", (e.enforced_version == r.current_version).into()),
                        ("last_seen", ctl::time_str(e.last_seen_unix_ms).into()),
                        ("policy_error", e.policy_error.into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)?;
        }
        Commands::Enroll { controller, ca, token, out, identity } => {
            let files = ztseg_controller::pki::ClientFiles::in_dir(&out, &identity);
            let id = ztseg_controller::server::enroll(&controller, &ca, &token, &files).await?;
            println!("enrolled as {id}; certificate {}", files.cert.display());
        }
        Commands::Renew(a) => {
            let files = a.files();
            let id = ztseg_controller::server::renew(&a.controller, &files).await?;
            println!("renewed {id}; certificate {}", files.cert.display());
        }
        Commands::Controller {
            command: ControllerCommands::Revoke { id: IdentityArgs { ctl: a, role, name } },
        } => {
            let r = ctl::revoke(&a, &role, &name).await?;
            println!(
                "revoked every certificate of {role}/{name} issued up to {}; {} outstanding join tokens deleted",
                ctl::time_str(r.revoked_at_unix_ms),
                r.tokens_revoked
            );
        }
        Commands::Audit { command: AuditCommands::List { ctl: a, from, limit } } => {
            print_audit(&ctl::audit_list(&a, from, limit).await?, output)?;
        }
        Commands::Audit { command: AuditCommands::Verify { archive: Some(f), anchors, .. } } => {
            return crate::archive::verify(&f, &anchors);
        }
        Commands::Audit { command: AuditCommands::Verify { ctl: a, data_dir, archive: None, anchors } } => {
            return ctl::audit_verify(&a, data_dir.as_deref(), &anchors).await;
        }
        Commands::Audit { command: AuditCommands::Archive { ctl: a, before, out } } => {
            let r = crate::archive::archive(&a, before, &out).await?;
            println!(
                "archived records {}..{} to {}: sha256 {}, last hash {}",
                r.first,
                r.last,
                out.display(),
                r.sha256,
                r.last_hash
            );
            println!("pruned {} records; the prune is audit record {}", r.pruned, r.record);
        }
        Commands::Policy {
            command: PolicyCommands::Apply { ctl: a, paths, message, expected_version, dry_run },
        } => {
            let r = ctl::apply(&a, &paths, message, expected_version, dry_run).await?;
            print!("{}", r.diff);
            if dry_run {
                println!(
                    "dry run: version {} unchanged{}",
                    r.version,
                    if r.changed { "" } else { " (no difference)" }
                );
            } else if r.changed {
                println!("applied: policy version {} (audit record {})", r.version, r.audit_seq);
            } else {
                println!("no change: policy version {} already holds these documents", r.version);
            }
        }
        Commands::Policy { command: PolicyCommands::Diff { ctl: a, paths, against } } => {
            let r = ctl::diff(&a, &paths, against).await?;
            if r.diff.is_empty() {
                println!("no difference from version {}", r.against_version);
            } else {
                print!("{}", r.diff);
            }
        }
        Commands::Policy { command: PolicyCommands::Get { ctl: a, version, out } } => {
            let r = ctl::get(&a, version).await?;
            if let Some(dir) = out {
                for d in &r.documents {
                    ztseg_controller::docs::check_doc_name(&d.name).map_err(anyhow::Error::msg)?;
                    let p = dir.join(&d.name);
                    if let Some(parent) = p.parent() {
                        std::fs::create_dir_all(parent)?;
                    }
                    std::fs::write(&p, &d.content)?;
                }
                println!(
                    "version {}: {} documents written to {}",
                    r.version,
                    r.documents.len(),
                    dir.display()
                );
            } else {
                for d in &r.documents {
                    println!("# --- {} (version {})", d.name, r.version);
                    print!("{}", d.content);
                }
            }
        }
        Commands::Policy { command: PolicyCommands::History { ctl: a, limit } } => {
            let rows = ctl::history(&a, limit)
                .await?
                .into_iter()
                .map(|v| {
                    vec![
                        ("version", v.version.into()),
                        ("time", ctl::time_str(v.time_unix_ms).into()),
                        ("actor", v.actor.into()),
                        ("documents", v.documents.into()),
                        ("change", v.summary.into()),
                        (
                            "rolled_back_to",
                            if v.rolled_back_to == 0 {
                                serde_json::Value::Null
                            } else {
                                v.rolled_back_to.into()
                            },
                        ),
                        ("message", v.message.into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)?;
        }
        Commands::Policy { command: PolicyCommands::Rollback { ctl: a, version, message } } => {
            let r = ctl::rollback(&a, version, message).await?;
            print!("{}", r.diff);
            if r.changed {
                println!("rolled back: policy version {} has the documents of version {version}", r.version);
            } else {
                println!(
                    "no change: the current version {} already has the documents of version {version}",
                    r.version
                );
            }
        }
        Commands::Policy { command: PolicyCommands::Prune { ctl: a, keep } } => {
            let r = ctl::prune(&a, keep).await?;
            println!(
                "pruned {} policy versions; the oldest kept version is {}; {} document blobs removed",
                r.pruned, r.oldest_kept, r.blobs_removed
            );
        }
        _ => unreachable!("dispatched by run()"),
    }
    Ok(ExitCode::SUCCESS)
}

/// Audit records (JSON text, as stored): a table of their main fields; with `-o json` a JSON
/// array holding each record byte for byte as stored (so its hash can be recomputed); with
/// `-o yaml` the records as YAML.
fn print_audit(records: &[String], output: Output) -> Result<()> {
    match output {
        Output::Json => {
            println!("[");
            for (i, r) in records.iter().enumerate() {
                println!("{r}{}", if i + 1 < records.len() { "," } else { "" });
            }
            println!("]");
            Ok(())
        }
        Output::Table | Output::Yaml => {
            let parsed = records
                .iter()
                .map(|r| serde_json::from_str::<serde_json::Value>(r))
                .collect::<Result<Vec<_>, _>>()
                .context("the controller sent an audit record that is not JSON")?;
            if output == Output::Yaml {
                print!("{}", serde_yaml::to_string(&parsed)?);
                return Ok(());
            }
            let rows = parsed
                .into_iter()
                .map(|r| {
                    vec![
                        ("seq", r["seq"].clone()),
                        ("time", crate::ctl::time_str(r["time_ms"].as_i64().unwrap_or(0)).into()),
                        ("actor", r["actor"].clone()),
                        ("action", r["action"].clone()),
                        ("outcome", r["outcome"].clone()),
                        ("detail", shorten(&r["detail"].to_string(), 100).into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)
        }
    }
}

/// `s`, cut to at most `max` characters (an ellipsis marks the cut).
fn shorten(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((at, _)) => format!("{}…", &s[..at]),
        None => s.to_owned(),
    }
}

fn print_rows(rows: &crate::client::Rows, output: Output) -> Result<()> {
    match output {
        Output::Table => print!("{}", crate::client::table(rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&crate::client::json_value(rows))?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&crate::client::json_value(rows))?),
    }
    Ok(())
}

fn print_matrices(matrices: &[lab::probe::Matrix], mismatches: usize, output: Output) -> Result<()> {
    match output {
        Output::Table => {
            for m in matrices {
                println!("{}", lab::probe::render(m));
            }
            if mismatches > 0 {
                println!("{mismatches} cells differ from the expectation (bracketed)");
            }
        }
        Output::Json => println!("{}", serde_json::to_string_pretty(matrices)?),
        Output::Yaml => print!("{}", serde_yaml::to_string(matrices)?),
    }
    Ok(())
}

/// `explain` output: each check with its steps (table), or one row per check.
fn print_explain(checks: Vec<ztseg_api::enforcer::CheckExplanation>, output: Output) -> Result<()> {
    if output == Output::Table {
        for c in &checks {
            println!("{} {} check, peer {}: {}", c.workload, c.direction, c.peer, c.verdict);
            for s in &c.steps {
                println!("  {s}");
            }
        }
        return Ok(());
    }
    let rows = checks
        .into_iter()
        .map(|c| {
            vec![
                ("workload", c.workload.into()),
                ("direction", c.direction.into()),
                ("peer", c.peer.into()),
                ("peer_identity", c.peer_identity.into()),
                ("peer_tenant", c.peer_tenant.into()),
                ("peer_source", c.peer_source.into()),
                ("verdict", c.verdict.into()),
                ("reason", c.reason.into()),
                ("cookie", c.cookie.into()),
                ("owner", c.owner.into()),
                ("steps", c.steps.join("\n").into()),
            ]
        })
        .collect();
    print_rows(&rows, output)
}

fn ms(v: i64) -> String {
    if v < 0 { "never".into() } else { format!("{}.{}s", v / 1000, (v % 1000) / 100) }
}

/// Commands that talk to a running enforcer.
#[expect(clippy::too_many_lines, reason = "one match arm per command, each a few lines")]
async fn remote(command: Commands, output: Output) -> Result<ExitCode> {
    use ztseg_api::enforcer as pb;
    match command {
        Commands::Enforcer { command: EnforcerCommands::Status(s) } => {
            let st =
                crate::client::connect(&s.socket).await?.status(pb::StatusRequest {}).await?.into_inner();
            let rows = vec![vec![
                ("node", st.node.into()),
                ("ready", st.ready.into()),
                ("attached", st.attached.into()),
                ("policy_loaded", st.policy_loaded.into()),
                ("policy_version", st.policy_version.into()),
                ("workloads", st.workloads.into()),
                ("rules", st.rules.into()),
                ("grants", st.grants.into()),
                ("pin_dir", st.pin_dir.into()),
                ("policy_source", st.policy_source.into()),
                ("controller_version", st.controller_version.into()),
                ("controller_connected", st.controller_connected.into()),
                ("policy_stale", st.policy_stale.into()),
                ("controller_retry_ms", st.controller_retry_ms.into()),
                ("local_delivery", st.local_delivery.into()),
                ("event_rate_limit", st.event_rate_limit.into()),
                ("event_burst", st.event_burst.into()),
                ("event_rate_limit_total", st.event_rate_limit_total.into()),
                ("event_burst_total", st.event_burst_total.into()),
                ("policy_error", st.policy_error.into()),
                ("controller_error", st.controller_error.into()),
            ]];
            print_rows(&rows, output)?;
        }
        Commands::Workloads(s) => {
            let r = crate::client::connect(&s.socket)
                .await?
                .list_workloads(pb::ListWorkloadsRequest {})
                .await?
                .into_inner();
            let rows = r
                .workloads
                .into_iter()
                .map(|w| {
                    let mut labels: Vec<String> = w.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    labels.sort();
                    vec![
                        ("workload", format!("{}/{}", w.namespace, w.name).into()),
                        ("identity", w.identity.into()),
                        ("tenant", w.tenant.into()),
                        ("mode", w.mode.into()),
                        ("interface", w.interface.into()),
                        ("ipv4", w.ipv4.into()),
                        ("ipv6", w.ipv6.into()),
                        ("labels", labels.join(",").into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)?;
        }
        Commands::Workload { command } => match command {
            WorkloadCommands::Add { socket, workload, labels, tenant, interface, ipv4, ipv6, mode, node } => {
                let (namespace, name) = workload.split_once('/').unwrap_or(("default", workload.as_str()));
                let mut map = std::collections::HashMap::new();
                for l in &labels {
                    let (k, v) =
                        l.split_once('=').with_context(|| format!("--label {l:?}: expected key=value"))?;
                    map.insert(k.to_owned(), v.to_owned());
                }
                let w = crate::client::connect(&socket.socket)
                    .await?
                    .register_workload(pb::RegisterWorkloadRequest {
                        workload: Some(pb::Workload {
                            name: name.to_owned(),
                            namespace: namespace.to_owned(),
                            labels: map,
                            tenant: tenant.unwrap_or_default(),
                            identity: 0,
                            interface: interface.unwrap_or_default(),
                            ipv4: ipv4.unwrap_or_default(),
                            ipv6: ipv6.unwrap_or_default(),
                            mode,
                        }),
                        node: node.unwrap_or_default(),
                    })
                    .await?
                    .into_inner();
                println!(
                    "workload {}/{} registered (identity {}, {})",
                    w.namespace, w.name, w.identity, w.mode
                );
            }
            WorkloadCommands::Remove { socket, workload } => {
                crate::client::connect(&socket.socket)
                    .await?
                    .remove_workload(pb::RemoveWorkloadRequest { workload: workload.clone() })
                    .await?;
                println!("workload {workload} removed");
            }
        },
        Commands::Explain { socket, from, to, protocol, port } => {
            let r = crate::client::connect(&socket.socket)
                .await?
                .explain(pb::ExplainRequest { src: from, dst: to, protocol, port })
                .await?
                .into_inner();
            print_explain(r.checks, output)?;
        }
        Commands::Rules(s) => {
            let r = crate::client::connect(&s.socket)
                .await?
                .list_rules(pb::ListRulesRequest {})
                .await?
                .into_inner();
            let rows = r
                .rules
                .into_iter()
                .map(|r| {
                    vec![
                        ("cookie", r.cookie.into()),
                        ("owner", r.owner.into()),
                        ("action", r.action.into()),
                        ("keys", r.keys.into()),
                        ("port_ranges", r.port_ranges.into()),
                        ("expires_in", ms(r.expires_in_ms).into()),
                    ]
                })
                .collect();
            print_rows(&rows, output)?;
        }
        Commands::Grants { command } => match command {
            GrantCommands::Open { socket, from, to, port, protocol, ttl, reason } => {
                let g = crate::client::connect(&socket.socket)
                    .await?
                    .open_grant(pb::OpenGrantRequest {
                        from,
                        to,
                        protocol,
                        port: u32::from(port.0),
                        end_port: if port.1 == port.0 { 0 } else { u32::from(port.1) },
                        ttl_seconds: ttl,
                        reason,
                    })
                    .await?
                    .into_inner();
                print_rows(&vec![grant_row(g)], output)?;
            }
            GrantCommands::List(s) => {
                let r = crate::client::connect(&s.socket)
                    .await?
                    .list_grants(pb::ListGrantsRequest {})
                    .await?
                    .into_inner();
                print_rows(&r.grants.into_iter().map(grant_row).collect(), output)?;
            }
            GrantCommands::Revoke { socket, cookie } => {
                crate::client::connect(&socket.socket)
                    .await?
                    .revoke_grant(pb::RevokeGrantRequest { cookie })
                    .await?;
                println!("grant {cookie} revoked");
            }
        },
        Commands::Flows { socket, workload, tenant, verdict, count } => {
            let mut stream = crate::client::connect(&socket.socket)
                .await?
                .watch_flows(pb::WatchFlowsRequest {
                    workload: workload.unwrap_or_default(),
                    tenant: tenant.unwrap_or_default(),
                    verdict: verdict.unwrap_or_default(),
                })
                .await?
                .into_inner();
            let mut seen = 0;
            while let Some(ev) = stream.message().await? {
                match output {
                    Output::Table => println!(
                        "{} {:<5} {:<18} {} {}:{} -> {}:{} {} cookie={} ({})",
                        ev.ts_ns,
                        ev.verdict,
                        ev.reason,
                        ev.direction,
                        ev.src,
                        ev.sport,
                        ev.dst,
                        ev.dport,
                        ev.protocol,
                        ev.cookie,
                        ev.workload
                    ),
                    Output::Json | Output::Yaml => {
                        let v = serde_json::json!({"ts_ns": ev.ts_ns, "verdict": ev.verdict, "reason": ev.reason,
                            "cookie": ev.cookie, "workload": ev.workload, "peer": ev.peer, "tenant": ev.tenant,
                            "direction": ev.direction, "src": ev.src, "dst": ev.dst, "sport": ev.sport,
                            "dport": ev.dport, "protocol": ev.protocol});
                        // A stream: one JSON object per line, or one YAML document per event.
                        if output == Output::Json {
                            println!("{v}");
                        } else {
                            print!("---\n{}", serde_yaml::to_string(&v)?);
                        }
                    }
                }
                std::io::Write::flush(&mut std::io::stdout())?;
                seen += 1;
                if count.is_some_and(|c| seen >= c) {
                    break;
                }
            }
        }
        Commands::Stats(s) => {
            let r = crate::client::connect(&s.socket).await?.stats(pb::StatsRequest {}).await?.into_inner();
            let rows = r
                .counters
                .into_iter()
                .map(|c| vec![("reason", c.reason.into()), ("packets", c.packets.into())])
                .collect();
            print_rows(&rows, output)?;
        }
        _ => unreachable!("local commands are handled before"),
    }
    Ok(ExitCode::SUCCESS)
}

fn grant_row(g: ztseg_api::enforcer::Grant) -> Vec<(&'static str, serde_json::Value)> {
    vec![
        ("cookie", g.cookie.into()),
        ("from", g.from.into()),
        ("to", g.to.into()),
        ("protocol", g.protocol.into()),
        ("port", g.port.into()),
        ("end_port", if g.end_port == 0 { serde_json::Value::Null } else { g.end_port.into() }),
        ("expires_in", ms(g.expires_in_ms).into()),
        ("reason", g.reason.into()),
    ]
}

/// `ztseg policy validate`: the files as one set, as an enforcer loading them would check it.
fn validate(paths: &[PathBuf]) -> Result<ExitCode> {
    let files = lab::spec::yaml_files(paths)?;
    let mut texts = Vec::new();
    for f in &files {
        texts.push(std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?);
    }
    match ztseg_policy::parse_set(files.iter().map(PathBuf::as_path).zip(texts.iter().map(String::as_str))) {
        Ok(policies) => {
            println!("{} policies in {} files: valid", policies.len(), files.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for e in &errors {
                eprintln!("{e}");
            }
            eprintln!("{} errors", errors.len());
            Ok(ExitCode::FAILURE)
        }
    }
}

fn lab_cmd(cmd: LabCommands, output: Output) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    match cmd {
        LabCommands::Up(a) => {
            let state = lab::up(&a.file, &exe)?;
            println!(
                "lab {} up: {} hosts (one enforcer each), {} pods; enforcer sockets: {}",
                state.name,
                state.hosts.len(),
                state.pods.len(),
                state.hosts.iter().map(|h| h.socket.display().to_string()).collect::<Vec<_>>().join(", ")
            );
            if let Some(why) = &state.sctp_unavailable {
                println!("SCTP is neither served nor probed ({why}); its matrices will have no cells");
            }
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Probe { file, select } => {
            let lab_file = lab::spec::LabFile::load(&file.file)?;
            let state = lab::LabState::load(lab_file.name())?;
            let timeout = Duration::from_millis(lab_file.timeout_ms.unwrap_or(1000));
            let selection = select.selection();
            let mut matrices = lab::probe::probe(&state, timeout, &selection)?;
            let mismatches =
                lab::probe::compare(&mut matrices, &selected_expectations(&lab_file, &selection))?;
            print_matrices(&matrices, mismatches, output)?;
            Ok(if mismatches > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        LabCommands::Explain { file, from, to, protocol, port } => {
            let lab_file = lab::spec::LabFile::load(&file.file)?;
            let state = lab::LabState::load(lab_file.name())?;
            if let (Some(from), Some(to)) = (from, to) {
                let ([port], [] | [_]) = (&port[..], &protocol[..]) else {
                    anyhow::bail!("explain --from --to: one --port and at most one --protocol");
                };
                let protocol = protocol.first().map_or("TCP", String::as_str);
                let checks = lab::probe::explain_pair(&state, &from, &to, protocol, *port)?;
                print_explain(checks, output)?;
                return Ok(ExitCode::SUCCESS);
            }
            let ports = port
                .iter()
                .map(|p| u16::try_from(*p).with_context(|| format!("--port {p}: not a port")))
                .collect::<Result<_>>()?;
            let selection = MatrixArgs { port: ports, protocol }.selection();
            let mut matrices = lab::probe::explain_matrices(&state, &selection)?;
            let mismatches =
                lab::probe::compare(&mut matrices, &selected_expectations(&lab_file, &selection))?;
            print_matrices(&matrices, mismatches, output)?;
            Ok(if mismatches > 0 { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        LabCommands::Apply(a) => {
            let state = lab::apply(&a.file, &exe)?;
            println!("lab {}: policies applied on {} hosts", state.name, state.hosts.len());
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Label { file, target, changes } => {
            let state = lab::label(&file.file, &target, &changes, &exe)?;
            println!("lab {}: labels of {target} changed, policies re-applied", state.name);
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Down(a) => {
            let lab_file = lab::spec::LabFile::load(&a.file)?;
            lab::down(lab_file.name())?;
            println!("lab {} down", lab_file.name());
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Isolate { file, host } => {
            lab::set_controller_link(&file.file, &host, false)?;
            println!("host {host}: link to the controller cut");
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Restart { file, host, kill } => {
            lab::restart_host(&file.file, &host, kill, &exe)?;
            println!("host {host}: enforcer restarted");
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Rejoin { file, host } => {
            lab::set_controller_link(&file.file, &host, true)?;
            println!("host {host}: link to the controller restored");
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Serve { netns, ports, protocols } => {
            lab::serve::serve(&netns, &ports, &protocols)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
