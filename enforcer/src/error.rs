//! Errors of the enforcer library: one variant per failure, with the object it concerns.

use std::path::PathBuf;

use enforcer_common::PolicyKey;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot prepare pin directory {path}")]
    PinDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not on a bpf filesystem (mount -t bpf bpf /sys/fs/bpf)")]
    NotBpffs { path: PathBuf },
    #[error(
        "pinned maps in {path} have layout version {found}, this enforcer needs {expected}; \
         run `ztseg enforcer uninstall` for that directory first"
    )]
    AbiMismatch { path: PathBuf, found: u32, expected: u32 },
    #[error("loading the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("program {name} is missing from the eBPF object")]
    MissingProgram { name: &'static str },
    #[error("map {name} is missing from the eBPF object")]
    MissingMap { name: &'static str },
    #[error("mapping ring buffer {name}")]
    RingMap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        source: Box<aya::programs::ProgramError>,
    },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: Box<aya::maps::MapError>,
    },
    #[error("pinning {what} at {path}")]
    Pin {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("interface {name}")]
    Interface {
        name: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cgroup {path}")]
    Cgroup {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("map {map} is full ({capacity} entries, {needed} more needed); nothing was applied")]
    MapFull { map: &'static str, capacity: u32, needed: u32 },
    #[error("no free rule slot ({capacity} in use); nothing was applied")]
    SlotsExhausted { capacity: u32 },
    #[error("policy key {key:?} already belongs to rule cookie {owner}; nothing was applied")]
    KeyOwned { key: PolicyKey, owner: u32 },
    #[error("port ranges under {key:?}: {reason}; nothing was applied")]
    RangeLimit { key: PolicyKey, reason: String },
    #[error("rule {field} is invalid: {reason}")]
    InvalidRule { field: &'static str, reason: String },
    #[error("no active rule or grant with cookie {cookie}")]
    UnknownCookie { cookie: u32 },
    #[error("reading CLOCK_MONOTONIC")]
    Clock(#[source] std::io::Error),
    #[error("waiting for events")]
    Poll(#[source] std::io::Error),
}

impl Error {
    pub(crate) fn map(name: &'static str) -> impl FnOnce(aya::maps::MapError) -> Error {
        move |e| Error::Map { name, source: Box::new(e) }
    }

    pub(crate) fn program(name: &'static str) -> impl FnOnce(aya::programs::ProgramError) -> Error {
        move |e| Error::Program { name, source: Box::new(e) }
    }
}
