//! The `ztseg` command line: clap definitions and dispatch.

use std::{path::PathBuf, process::ExitCode, time::Duration};

use anyhow::{Context as _, Result};

use crate::lab;
use clap::{CommandFactory as _, Parser, Subcommand, ValueEnum};

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
    /// Packet counters by verdict reason.
    Stats(SocketArgs),
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
    Probe(LabFileArgs),
    /// Re-apply the lab file's policies and labels.
    Apply(LabFileArgs),
    /// Change labels of a pod (`ns/pod`) or namespace (`ns:NAME`) and re-apply policies.
    Label {
        #[command(flatten)]
        file: LabFileArgs,
        /// `namespace/pod` or `ns:NAMESPACE`.
        target: String,
        /// `key=value` to set, `key-` to remove.
        #[arg(required = true)]
        changes: Vec<String>,
    },
    /// Remove the lab: servers, enforcement, namespaces.
    Down(LabFileArgs),
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
    /// Open a grant FROM → TO (workloads as namespace/name) on one port for a TTL.
    Open {
        #[command(flatten)]
        socket: SocketArgs,
        from: String,
        to: String,
        #[arg(long)]
        port: u16,
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

#[derive(Subcommand)]
enum PolicyCommands {
    /// Check policy files; report every error with file, position and field.
    Validate {
        /// Files or directories.
        #[arg(required = true)]
        paths: Vec<PathBuf>,
    },
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
        Commands::Lab { command } => lab_cmd(command, cli.output),
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

fn print_rows(rows: &crate::client::Rows, output: Output) -> Result<()> {
    match output {
        Output::Table => print!("{}", crate::client::table(rows)),
        Output::Json => println!("{}", serde_json::to_string_pretty(&crate::client::json_value(rows))?),
        Output::Yaml => print!("{}", serde_yaml::to_string(&crate::client::json_value(rows))?),
    }
    Ok(())
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
                ("node", st.node),
                ("ready", st.ready.to_string()),
                ("attached", st.attached.to_string()),
                ("policy_loaded", st.policy_loaded.to_string()),
                ("policy_version", st.policy_version.to_string()),
                ("workloads", st.workloads.to_string()),
                ("rules", st.rules.to_string()),
                ("grants", st.grants.to_string()),
                ("pin_dir", st.pin_dir),
                ("policy_error", st.policy_error),
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
                        ("workload", format!("{}/{}", w.namespace, w.name)),
                        ("identity", w.identity.to_string()),
                        ("tenant", w.tenant),
                        ("mode", w.mode),
                        ("interface", w.interface),
                        ("ipv4", w.ipv4),
                        ("ipv6", w.ipv6),
                        ("labels", labels.join(",")),
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
                        ("cookie", r.cookie.to_string()),
                        ("owner", r.owner),
                        ("action", r.action),
                        ("keys", r.keys.to_string()),
                        ("expires_in", ms(r.expires_in_ms)),
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
                        port: u32::from(port),
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
                    _ => println!(
                        "{}",
                        serde_json::json!({"ts_ns": ev.ts_ns, "verdict": ev.verdict, "reason": ev.reason, "cookie": ev.cookie,
                            "workload": ev.workload, "peer": ev.peer, "tenant": ev.tenant, "direction": ev.direction,
                            "src": ev.src, "dst": ev.dst, "sport": ev.sport, "dport": ev.dport, "protocol": ev.protocol})
                    ),
                }
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
                .map(|c| vec![("reason", c.reason), ("packets", c.packets.to_string())])
                .collect();
            print_rows(&rows, output)?;
        }
        _ => unreachable!("local commands are handled before"),
    }
    Ok(ExitCode::SUCCESS)
}

fn grant_row(g: ztseg_api::enforcer::Grant) -> Vec<(&'static str, String)> {
    vec![
        ("cookie", g.cookie.to_string()),
        ("from", g.from),
        ("to", g.to),
        ("protocol", g.protocol),
        ("port", g.port.to_string()),
        ("expires_in", ms(g.expires_in_ms)),
        ("reason", g.reason),
    ]
}

fn validate(paths: &[PathBuf]) -> Result<ExitCode> {
    let files = lab::spec::yaml_files(paths)?;
    let mut errors = 0;
    let mut policies = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        match ztseg_policy::parse_documents(f, &text) {
            Ok(p) => policies += p.len(),
            Err(es) => {
                for e in &es {
                    eprintln!("{e}");
                }
                errors += es.len();
            }
        }
    }
    if errors == 0 {
        println!("{policies} policies in {} files: valid", files.len());
        Ok(ExitCode::SUCCESS)
    } else {
        eprintln!("{errors} errors");
        Ok(ExitCode::FAILURE)
    }
}

fn lab_cmd(cmd: LabCommands, output: Output) -> Result<ExitCode> {
    let exe = std::env::current_exe()?;
    match cmd {
        LabCommands::Up(a) => {
            let state = lab::up(&a.file, &exe).inspect_err(|_| {
                // Leave nothing half-built behind.
                if let Ok(l) = lab::spec::LabFile::load(&a.file) {
                    let _ = lab::down(l.name());
                }
            })?;
            println!(
                "lab {} up: {} hosts (one enforcer each), {} pods; enforcer sockets: {}",
                state.name,
                state.hosts.len(),
                state.pods.len(),
                state.hosts.iter().map(|h| h.socket.display().to_string()).collect::<Vec<_>>().join(", ")
            );
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Probe(a) => {
            let lab_file = lab::spec::LabFile::load(&a.file)?;
            let state = lab::LabState::load(lab_file.name())?;
            let timeout = Duration::from_millis(lab_file.timeout_ms.unwrap_or(1000));
            let mut matrices = lab::probe::probe(&state, timeout)?;
            let mismatches = lab::probe::compare(&mut matrices, &lab_file.expect)?;
            match output {
                Output::Table => {
                    for m in &matrices {
                        println!("{}", lab::probe::render(m));
                    }
                    if mismatches > 0 {
                        println!("{mismatches} cells differ from the expectation (bracketed)");
                    }
                }
                Output::Json => println!("{}", serde_json::to_string_pretty(&matrices)?),
                Output::Yaml => print!("{}", serde_yaml::to_string(&matrices)?),
            }
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
        LabCommands::Serve { netns, ports, protocols } => {
            lab::serve::serve(&netns, &ports, &protocols)?;
            Ok(ExitCode::SUCCESS)
        }
    }
}
