//! `ztseg lab probe`: try every ordered pod pair × port × protocol and build the reachability
//! matrix. A TCP or SCTP probe succeeds when the server's byte arrives, a UDP probe when the
//! echo does. A pod reaching itself goes over its own loopback, which no network policy
//! governs, so the diagonal is always allowed (as in the upstream e2e truth tables). A protocol
//! the kernel lacks (SCTP) is not probed: its matrices carry the reason and no cells.

use std::{
    collections::BTreeMap,
    io::Read as _,
    net::{SocketAddr, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use serde::Serialize;

use super::{LabState, in_netns, sctp, spec::Expectation};

#[derive(Debug, Clone, Serialize)]
pub struct Matrix {
    pub port: u16,
    pub protocol: String,
    /// Pod ids in row/column order.
    pub pods: Vec<String>,
    /// `allowed[from][to]`; empty when the protocol could not be probed.
    pub allowed: Vec<Vec<bool>>,
    /// Why this matrix was not probed (the kernel lacks the protocol); it then has no cells.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub unavailable: Option<String>,
    /// Cells that differ from the expectation: (from, to, expected).
    pub mismatches: Vec<(String, String, bool)>,
}

/// The matrices to probe or explain: every lab port and protocol, or only those named.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    pub ports: Vec<u16>,
    pub protocols: Vec<String>,
}

impl Selection {
    #[must_use]
    pub fn includes(&self, port: u16, protocol: &str) -> bool {
        (self.ports.is_empty() || self.ports.contains(&port))
            && (self.protocols.is_empty() || self.protocols.iter().any(|p| p.eq_ignore_ascii_case(protocol)))
    }

    /// (port, protocol) of every selected matrix, in the lab's order; naming a port or
    /// protocol the lab does not serve is an error.
    fn cases(&self, state: &LabState) -> Result<Vec<(u16, String)>> {
        if let Some(p) = self.ports.iter().find(|p| !state.ports.contains(p)) {
            bail!("port {p} is not served in lab {} (ports: {:?})", state.name, state.ports);
        }
        if let Some(p) =
            self.protocols.iter().find(|p| !state.protocols.iter().any(|x| x.eq_ignore_ascii_case(p)))
        {
            bail!("protocol {p} is not served in lab {} (protocols: {:?})", state.name, state.protocols);
        }
        Ok(state
            .ports
            .iter()
            .flat_map(|p| state.protocols.iter().map(move |pr| (*p, pr.clone())))
            .filter(|(p, pr)| self.includes(*p, pr))
            .collect())
    }
}

fn probe_one(proto: &str, addr: SocketAddr, timeout: Duration) -> bool {
    let mut b = [0u8; 16];
    match proto {
        "UDP" => {
            let Ok(s) = UdpSocket::bind("0.0.0.0:0") else { return false };
            if s.set_read_timeout(Some(timeout)).is_err() || s.send_to(b"probe", addr).is_err() {
                return false;
            }
            matches!(s.recv_from(&mut b), Ok((5, _)))
        }
        "SCTP" => sctp::connect(addr, timeout).is_ok_and(|mut c| matches!(c.read(&mut b[..1]), Ok(1))),
        _ => {
            let Ok(mut c) = TcpStream::connect_timeout(&addr, timeout) else { return false };
            let _ = c.set_read_timeout(Some(timeout));
            matches!(c.read(&mut b[..1]), Ok(1))
        }
    }
}

/// Probe the selected matrices; one thread per ordered pair.
pub fn probe(state: &LabState, timeout: Duration, selection: &Selection) -> Result<Vec<Matrix>> {
    let n = state.pods.len();
    let pods: Vec<String> = state.pods.iter().map(super::PodState::id).collect();
    let selected = selection.cases(state)?;
    let cases: Vec<&(u16, String)> =
        selected.iter().filter(|(_, proto)| state.unavailable(proto).is_none()).collect();
    let results: Vec<Vec<Vec<bool>>> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .flat_map(|from| (0..n).map(move |to| (from, to)))
            .map(|(from, to)| {
                let cases = &cases;
                s.spawn(move || -> Result<Vec<bool>> {
                    if from == to {
                        return Ok(vec![true; cases.len()]);
                    }
                    let dst = state.pods[to].ipv4;
                    in_netns(&state.pods[from].netns, || {
                        Ok(cases
                            .iter()
                            .map(|(port, proto)| probe_one(proto, SocketAddr::from((dst, *port)), timeout))
                            .collect())
                    })
                })
            })
            .collect();
        let mut flat = Vec::with_capacity(n * n);
        for h in handles {
            flat.push(h.join().map_err(|_| anyhow::anyhow!("probe thread panicked"))??);
        }
        Ok::<_, anyhow::Error>(flat.chunks(n).map(<[Vec<bool>]>::to_vec).collect())
    })?;
    // `results` holds the available cases' cells, in `selected` order.
    let mut next = 0;
    Ok(selected
        .iter()
        .map(|(port, proto)| {
            let unavailable = state.unavailable(proto).map(str::to_owned);
            let mut allowed = Vec::new();
            if unavailable.is_none() {
                allowed = (0..n).map(|f| (0..n).map(|t| results[f][t][next]).collect()).collect();
                next += 1;
            }
            Matrix {
                port: *port,
                protocol: proto.clone(),
                pods: pods.clone(),
                allowed,
                unavailable,
                mismatches: Vec::new(),
            }
        })
        .collect())
}

/// Parse a truth table: first row `-` then destination ids; each further row a source id
/// then `.` (allowed) or `X` (blocked) per column.
pub fn parse_table(e: &Expectation) -> Result<BTreeMap<(String, String), bool>> {
    let mut lines = e.table.lines().map(str::split_whitespace).filter_map(|mut w| {
        let first = w.next()?;
        Some((first.to_owned(), w.map(str::to_owned).collect::<Vec<_>>()))
    });
    let (_, cols) = lines.next().context("expect table: empty")?;
    let mut out = BTreeMap::new();
    for (row, cells) in lines {
        if cells.len() != cols.len() {
            bail!(
                "expect table {}/{}: row {row} has {} cells for {} columns",
                e.protocol,
                e.port,
                cells.len(),
                cols.len()
            );
        }
        for (col, cell) in cols.iter().zip(cells) {
            let allowed = match cell.as_str() {
                "." => true,
                "X" | "x" => false,
                other => {
                    bail!("expect table {}/{}: row {row}: cell {other:?} is not . or X", e.protocol, e.port)
                }
            };
            out.insert((row.clone(), col.clone()), allowed);
        }
    }
    Ok(out)
}

/// Mark cells that differ from the lab file's expectations.
pub fn compare(matrices: &mut [Matrix], expect: &[Expectation]) -> Result<usize> {
    let mut total = 0;
    for e in expect {
        let table = parse_table(e)?;
        let Some(m) =
            matrices.iter_mut().find(|m| m.port == e.port && m.protocol.eq_ignore_ascii_case(&e.protocol))
        else {
            bail!("expect: {}/{} is not probed in this lab", e.protocol, e.port);
        };
        if m.unavailable.is_some() {
            continue;
        }
        for ((from, to), want) in table {
            let f = m
                .pods
                .iter()
                .position(|p| *p == from)
                .with_context(|| format!("expect: unknown pod {from}"))?;
            let t =
                m.pods.iter().position(|p| *p == to).with_context(|| format!("expect: unknown pod {to}"))?;
            if m.allowed[f][t] != want {
                m.mismatches.push((from, to, want));
                total += 1;
            }
        }
    }
    Ok(total)
}

/// Render one matrix like the upstream e2e truth tables; mismatching cells are bracketed.
#[must_use]
pub fn render(m: &Matrix) -> String {
    use std::fmt::Write as _;
    if let Some(why) = &m.unavailable {
        return format!("{} {}: not probed (no cells): {why}\n", m.protocol, m.port);
    }
    let w = m.pods.iter().map(String::len).max().unwrap_or(1).max(4);
    let mut s = format!("{} {}\n{:w$}", m.protocol, m.port, "-");
    for p in &m.pods {
        let _ = write!(s, " {p:^w$}");
    }
    s.push('\n');
    for (f, from) in m.pods.iter().enumerate() {
        let _ = write!(s, "{from:w$}");
        for (t, to) in m.pods.iter().enumerate() {
            let c = if m.allowed[f][t] { "." } else { "X" };
            let cell = if m.mismatches.iter().any(|(a, b, _)| a == from && b == to) {
                format!("[{c}]")
            } else {
                c.to_owned()
            };
            let _ = write!(s, " {cell:^w$}");
        }
        s.push('\n');
    }
    s
}

/// `ztseg lab explain` without a pair: every cell from the enforcers' `Explain` instead of
/// traffic — what the data plane's maps decide for the first packet at both ends (a cell is
/// allowed when no check drops it), in the probe's matrix shape, so the two can be compared.
pub fn explain_matrices(state: &LabState, selection: &Selection) -> Result<Vec<Matrix>> {
    let n = state.pods.len();
    let cases = selection.cases(state)?;
    let pods: Vec<String> = state.pods.iter().map(super::PodState::id).collect();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut clients = Vec::new();
        for h in &state.hosts {
            clients.push(crate::client::connect(&h.socket).await?);
        }
        let mut out = Vec::new();
        for (port, proto) in cases {
            let mut allowed = vec![vec![true; n]; n];
            for (f, row) in allowed.iter_mut().enumerate() {
                for (t, cell) in row.iter_mut().enumerate() {
                    if f != t {
                        let checks = explain_with(&mut clients, state, f, t, &proto, u32::from(port)).await?;
                        *cell = checks.iter().all(|c| c.verdict != "DROP");
                    }
                }
            }
            out.push(Matrix {
                port,
                protocol: proto,
                pods: pods.clone(),
                allowed,
                unavailable: None,
                mismatches: Vec::new(),
            });
        }
        Ok(out)
    })
}

/// The checks of a flow from pod `from` to pod `to` (`namespace/name` or name), from the
/// enforcers of both pods' hosts.
pub fn explain_pair(
    state: &LabState,
    from: &str,
    to: &str,
    protocol: &str,
    port: u32,
) -> Result<Vec<ztseg_api::enforcer::CheckExplanation>> {
    let find = |p: &str| -> Result<usize> {
        if let Some(i) = state.pods.iter().position(|x| x.id() == p) {
            return Ok(i);
        }
        let named: Vec<usize> = (0..state.pods.len()).filter(|i| state.pods[*i].spec.name == p).collect();
        match named[..] {
            [i] => Ok(i),
            [] => bail!("no pod {p:?} in lab {}", state.name),
            _ => bail!(
                "pod name {p:?} is ambiguous in lab {}: {}",
                state.name,
                named.iter().map(|i| state.pods[*i].id()).collect::<Vec<_>>().join(", ")
            ),
        }
    };
    let (f, t) = (find(from)?, find(to)?);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut clients = Vec::new();
        for h in &state.hosts {
            clients.push(crate::client::connect(&h.socket).await?);
        }
        explain_with(&mut clients, state, f, t, protocol, port).await
    })
}

async fn explain_with(
    clients: &mut [crate::client::Client],
    state: &LabState,
    f: usize,
    t: usize,
    protocol: &str,
    port: u32,
) -> Result<Vec<ztseg_api::enforcer::CheckExplanation>> {
    let (pf, pt) = (&state.pods[f], &state.pods[t]);
    let mut hosts = vec![pf.host];
    if pt.host != pf.host {
        hosts.push(pt.host);
    }
    let mut checks = Vec::new();
    for h in hosts {
        let req = ztseg_api::enforcer::ExplainRequest {
            src: pf.ipv4.to_string(),
            dst: pt.ipv4.to_string(),
            protocol: protocol.to_owned(),
            port,
        };
        match clients[h].explain(req).await {
            Ok(r) => checks.extend(r.into_inner().checks),
            // Neither end is managed by this host's enforcer.
            Err(s) if s.code() == tonic::Code::NotFound => {}
            Err(s) => {
                bail!("host {}: explain {} -> {}: {}", state.hosts[h].name, pf.id(), pt.id(), s.message())
            }
        }
    }
    Ok(checks)
}
