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
    }
}

fn validate(paths: &[PathBuf]) -> Result<ExitCode> {
    let mut files = Vec::new();
    for p in paths {
        if p.is_dir() {
            let mut v: Vec<PathBuf> = std::fs::read_dir(p)?
                .flatten()
                .map(|e| e.path())
                .filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml"))
                .collect();
            v.sort();
            files.extend(v);
        } else {
            files.push(p.clone());
        }
    }
    let mut errors = 0;
    let mut policies = 0;
    for f in &files {
        let text = std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))?;
        match ztseg_policy::parse_file(f, &text) {
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
                "lab {} up: {} hosts, {} pods, {} rules installed",
                state.name,
                state.hosts.len(),
                state.pods.len(),
                state.rules.len()
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
            let state = lab::apply(&a.file)?;
            println!("lab {}: policies applied ({} rules)", state.name, state.rules.len());
            Ok(ExitCode::SUCCESS)
        }
        LabCommands::Label { file, target, changes } => {
            let state = lab::label(&file.file, &target, &changes)?;
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
