//! `ztseg audit archive` and `ztseg audit verify --archive`: audit records moved out of the
//! controller into a file, verifiably.
//!
//! An archive is JSON lines: one stored audit record per line, byte for byte as the controller
//! keeps it (`Audit/List`), in sequence order. Its chain is checked when it is written and can
//! be checked again at any time on its own; its last hash and SHA-256 are what the
//! `audit.prune` record in the controller's log names.

use std::{
    fs::{File, OpenOptions},
    io::{BufRead as _, BufReader, BufWriter, Write as _},
    path::Path,
    process::ExitCode,
};

use anyhow::{Context as _, Result, bail};
use sha2::{Digest as _, Sha256};
use ztseg_api::controller::{self as pb};
use ztseg_controller::audit::{Record, Verifier};

/// Records of an archive checked in order: the chain inside it, from its first record (record
/// 1 must follow the genesis hash; a later first record starts where an earlier archive ended),
/// and the anchors it must hold.
#[derive(Debug, Default)]
struct Chain {
    v: Option<Verifier>,
    first: u64,
    records: u64,
    anchors: Vec<(u64, String)>,
}

impl Chain {
    /// Check the next line; returns its sequence number. `at` says where it came from.
    fn feed(&mut self, line: &str, at: &dyn Fn() -> String) -> Result<u64> {
        let r: Record = match serde_json::from_str(line) {
            Ok(r) => r,
            Err(e) => match &mut self.v {
                // Named by the sequence number it should have.
                Some(v) => {
                    return Err(v.feed(v.next(), line.as_bytes()).err().map_or_else(
                        || anyhow::anyhow!("{}: not an audit record ({e})", at()),
                        |b| anyhow::anyhow!("{b} ({})", at()),
                    ));
                }
                None => bail!("{}: not an audit record ({e})", at()),
            },
        };
        let v = self.v.get_or_insert_with(|| {
            self.first = r.seq;
            let v = if r.seq == 1 { Verifier::default() } else { Verifier::starting_at(r.seq, &r.prev) };
            v.anchored(std::mem::take(&mut self.anchors))
        });
        v.feed(r.seq, line.as_bytes()).map_err(|b| anyhow::anyhow!("{b} ({})", at()))?;
        self.records += 1;
        Ok(r.seq)
    }

    /// The next sequence number expected, and the hash of the last record.
    fn end(&self) -> Option<(u64, &str)> {
        self.v.as_ref().map(|v| (v.next(), v.last_hash()))
    }
}

/// What `ztseg audit archive` did.
#[derive(Debug)]
pub struct Archived {
    pub first: u64,
    pub last: u64,
    pub last_hash: String,
    pub sha256: String,
    pub pruned: u64,
    pub record: u64,
}

/// Fetch the records before `before`, check their chain, write them to `out` (a new file,
/// fsynced), then ask the controller to prune them (`Audit/Prune`, admin).
pub async fn archive(a: &crate::ctl::CtlArgs, before: u64, out: &Path) -> Result<Archived> {
    if before < 2 {
        bail!(
            "--before {before}: the first sequence number to keep; records before it are archived (at least 2)"
        );
    }
    let mut client =
        pb::audit_client::AuditClient::new(a.channel().await?).max_decoding_message_size(64 << 20);
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(out)
        .with_context(|| format!("creating the archive {} (it must not exist yet)", out.display()))?;
    let written = write(&mut client, before, &file, out).await.and_then(|w| {
        file.sync_all().with_context(|| format!("syncing {}", out.display()))?;
        sync_dir(out)?;
        Ok(w)
    });
    let (chain, sha256) = match written {
        Ok(w) => w,
        Err(e) => {
            drop(file);
            let _ = std::fs::remove_file(out);
            return Err(e.context(format!("nothing archived to {}, nothing pruned", out.display())));
        }
    };
    let (next, last_hash) = chain.end().map(|(n, h)| (n, h.to_owned())).unwrap_or_default();
    let r = client
        .prune(pb::AuditPruneRequest { before, archive_sha256: sha256.clone(), last_hash: last_hash.clone() })
        .await
        .map_err(crate::ctl::st)
        .with_context(|| {
            format!(
                "records {}..{} were archived to {} (sha256 {sha256}), but nothing was pruned",
                chain.first,
                next - 1,
                out.display()
            )
        })?
        .into_inner();
    Ok(Archived { first: chain.first, last: next - 1, last_hash, sha256, pruned: r.pruned, record: r.record })
}

/// Write the records before `before` to `file` as they are listed; returns their chain and
/// the SHA-256 of what was written.
async fn write(
    client: &mut pb::audit_client::AuditClient<tonic::transport::Channel>,
    before: u64,
    file: &File,
    out: &Path,
) -> Result<(Chain, String)> {
    let mut w = BufWriter::new(file);
    let mut sha = Sha256::new();
    let mut chain = Chain::default();
    let mut from = 1;
    while from < before {
        // Never more than the records before `before` (the log is contiguous; a gap is named).
        let limit = u32::try_from((before - from).min(10_000)).unwrap_or(10_000);
        let page = client
            .list(pb::AuditListRequest { from_seq: from, limit })
            .await
            .map_err(crate::ctl::st)?
            .into_inner()
            .records;
        if page.is_empty() {
            break;
        }
        for line in page {
            let seq = chain.feed(&line, &|| "as listed by the controller".to_owned())?;
            for part in [line.as_bytes(), b"\n"] {
                w.write_all(part).with_context(|| format!("writing {}", out.display()))?;
                sha.update(part);
            }
            from = seq + 1;
        }
    }
    w.flush().with_context(|| format!("writing {}", out.display()))?;
    drop(w);
    match chain.end() {
        Some((next, _)) if next == before => Ok((chain, hex::encode(sha.finalize()))),
        Some((next, _)) => {
            bail!("the controller's audit log has no record {next}: cannot archive up to {before}")
        }
        None => bail!("the controller's audit log has no records before {before} (already pruned?)"),
    }
}

/// Make the new file's directory entry durable too.
pub(crate) fn sync_dir(file: &Path) -> Result<()> {
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).with_context(|| format!("syncing {}", dir.display()))
}

/// `ztseg audit verify --archive FILE [--anchor SEQ:HASH]...`: the chain inside an archive,
/// its range, last hash and SHA-256 (to compare with the `audit.prune` record that names it);
/// each anchor must be a record of the archive with that hash.
pub fn verify(path: &Path, anchors: &[String]) -> Result<ExitCode> {
    let anchors = anchors
        .iter()
        .map(|s| ztseg_controller::audit::parse_anchor(s).map_err(anyhow::Error::msg))
        .collect::<Result<Vec<_>>>()?;
    let f = File::open(path).with_context(|| format!("opening the archive {}", path.display()))?;
    let mut sha = Sha256::new();
    let mut chain = Chain { anchors, ..Chain::default() };
    let mut reader = BufReader::new(f);
    let mut line = String::new();
    let mut n = 0u64;
    loop {
        line.clear();
        let len = reader.read_line(&mut line).with_context(|| format!("reading {}", path.display()))?;
        if len == 0 {
            break;
        }
        n += 1;
        sha.update(line.as_bytes());
        let Some(record) = line.strip_suffix('\n') else {
            eprintln!("archive {} FAILED verification: line {n} is cut short (no newline)", path.display());
            return Ok(ExitCode::FAILURE);
        };
        if let Err(e) = chain.feed(record, &|| format!("line {n} of {}", path.display())) {
            eprintln!("archive {} FAILED verification: {e}", path.display());
            return Ok(ExitCode::FAILURE);
        }
    }
    let Some((next, last_hash)) = chain.end() else {
        eprintln!("archive {} FAILED verification: it holds no records", path.display());
        return Ok(ExitCode::FAILURE);
    };
    let anchored = match chain.v.as_ref().map(|v| {
        v.check_anchors("it is in an earlier archive", "it is in a later archive or the retained log")
    }) {
        Some(Err(e)) => {
            eprintln!("archive {} FAILED verification: {e}", path.display());
            return Ok(ExitCode::FAILURE);
        }
        Some(Ok(n)) if n > 0 => format!("; {n} anchors found in it"),
        _ => String::new(),
    };
    println!(
        "archive {} intact: records {}..{} ({} records), hash chain verified; last hash {last_hash}; sha256 {}{anchored}",
        path.display(),
        chain.first,
        next - 1,
        chain.records,
        hex::encode(sha.finalize())
    );
    Ok(ExitCode::SUCCESS)
}
