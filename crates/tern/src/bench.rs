//! `tern bench`: measures what limits a transfer on this machine and, with
//! a daemon, on the path to it, and says what a copy would choose.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use indicatif::HumanBytes;
use serde::Serialize;
use tern_net::path::PathReport;
use tern_net::remote::{auto_transport, probe_path, resolve, LAN_RTT};
use tern_net::url::RemoteSpec;

use crate::cli::{BenchArgs, Exit, RemoteArgs};
use crate::net::{self, Loc};
use crate::output::describe_path;
use crate::UsageError;

/// Everything measured, as `--json` prints it.
#[derive(Debug, Serialize)]
struct Report {
    disk: Disk,
    hash: Hash,
    #[serde(skip_serializing_if = "Option::is_none")]
    remote: Option<Remote>,
}

#[derive(Debug, Serialize)]
struct Disk {
    dir: PathBuf,
    bytes: u64,
    /// Written and fsync'd, MiB/s.
    write_mib_s: f64,
    /// Read back after the cache was dropped, MiB/s.
    read_mib_s: f64,
}

#[derive(Debug, Serialize)]
struct Hash {
    /// BLAKE3 on one core, MiB/s.
    one_core_mib_s: f64,
    /// BLAKE3 on every core at once, MiB/s.
    all_cores_mib_s: f64,
    cores: usize,
}

#[derive(Debug, Serialize)]
struct Remote {
    location: String,
    /// The TCP connect time `--transport auto` decides by.
    probe_connect_ms: f64,
    transports: Vec<TransportResult>,
    /// What `--transport auto` picks to push to this daemon.
    push_picks: String,
    /// What `--transport auto` picks to pull from it.
    pull_picks: String,
    /// Workers (streams) a push would use by default.
    push_jobs: usize,
    /// Workers (streams) a pull would use by default.
    pull_jobs: usize,
    advice: String,
}

#[derive(Debug, Serialize)]
struct TransportResult {
    transport: String,
    connect_ms: f64,
    /// Least round trip of a request.
    request_rtt_ms: f64,
    upload_mbit_s: f64,
    download_mbit_s: f64,
    streams: usize,
    /// What the transport saw during the two transfers.
    path: PathReport,
}

fn mib_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / (1 << 20) as f64 / d.as_secs_f64().max(1e-9)
}

fn mbit_s(bytes: u64, d: Duration) -> f64 {
    bytes as f64 * 8.0 / 1e6 / d.as_secs_f64().max(1e-9)
}

/// Runs `tern bench`.
pub fn run(a: &BenchArgs) -> anyhow::Result<Exit> {
    if a.net_size > tern_proto::BENCH_MAX_BYTES {
        return Err(UsageError(format!("--net-size may be at most 1G, not {}", a.net_size)).into());
    }
    if a.net_size == 0 || a.disk_size == 0 {
        return Err(UsageError("--net-size and --disk-size must be more than 0".into()).into());
    }
    if a.jobs == Some(0) {
        return Err(UsageError("--jobs must be at least 1".into()).into());
    }
    let spec = match a.remote.as_deref().map(net::parse_loc).transpose()? {
        Some(Loc::Remote(s)) => Some(s),
        Some(Loc::Local(p)) => {
            return Err(UsageError(format!(
                "{}: not a daemon location (tern://HOST[:PORT]/MODULE); the disk measured is --dir's",
                p.to_string_lossy()
            ))
            .into())
        }
        Some(Loc::S3(s)) => {
            return Err(UsageError(format!(
                "{}: tern bench measures the network to a daemon (tern://HOST[:PORT]/MODULE)",
                s.display()
            ))
            .into())
        }
        None => None,
    };
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };
    let disk = disk(&a.dir, a.disk_size)?;
    say(format!(
        "disk ({}): write {:.0} MiB/s (fsync'd), read {:.0} MiB/s (cache dropped), {}",
        disk.dir.display(),
        disk.write_mib_s,
        disk.read_mib_s,
        HumanBytes(disk.bytes)
    ));
    let hash = hashing();
    say(format!(
        "BLAKE3: {:.0} MiB/s on one core, {:.0} MiB/s on {} cores",
        hash.one_core_mib_s, hash.all_cores_mib_s, hash.cores
    ));
    let remote = match spec {
        Some(spec) => Some(remote(&spec, a, &say)?),
        None => None,
    };
    if let Some(r) = &remote {
        say(format!(
            "a push would use {} with {} workers, a pull {} with {}: {}",
            r.push_picks, r.push_jobs, r.pull_picks, r.pull_jobs, r.advice
        ));
    }
    if a.json {
        let report = Report { disk, hash, remote };
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(Exit::Ok)
}

/// Writes `bytes` to a new file in `dir` with fsync, drops it from the
/// page cache and reads it back; the file is removed either way.
fn disk(dir: &Path, bytes: u64) -> anyhow::Result<Disk> {
    let dir = dir.canonicalize().with_context(|| format!("--dir {}", dir.display()))?;
    let path = dir.join(format!(".tern-bench-{}", std::process::id()));
    struct Remove<'a>(&'a Path);
    impl Drop for Remove<'_> {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(self.0);
        }
    }
    let mut f = OpenOptions::new()
        .write(true)
        .read(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("creating a test file in {}", dir.display()))?;
    let _remove = Remove(&path);
    // Incompressible, so no file system or device shortcut applies.
    let mut block = vec![0u8; 1 << 20];
    blake3::Hasher::new().finalize_xof().fill(&mut block);
    let t = Instant::now();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(block.len() as u64) as usize;
        f.write_all(&block[..n])
            .with_context(|| format!("writing {}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all().with_context(|| format!("fsync of {}", path.display()))?;
    let write = t.elapsed();
    drop(f);
    let mut f = File::open(&path).with_context(|| format!("opening {}", path.display()))?;
    tern_core::drop_cache(&f);
    let t = Instant::now();
    let mut read = 0u64;
    loop {
        let n = f
            .read(&mut block)
            .with_context(|| format!("reading {}", path.display()))?;
        if n == 0 {
            break;
        }
        read += n as u64;
    }
    let took = t.elapsed();
    if read != bytes {
        bail!("{}: read back {read} bytes of {bytes}", path.display());
    }
    Ok(Disk {
        dir,
        bytes,
        write_mib_s: mib_s(bytes, write),
        read_mib_s: mib_s(bytes, took),
    })
}

/// BLAKE3 over an in-memory buffer, on one core and on all at once.
fn hashing() -> Hash {
    const BUF: usize = 64 << 20;
    const ROUNDS: u64 = 4;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let buf = vec![0xa5u8; BUF];
    let one = || {
        let t = Instant::now();
        for _ in 0..ROUNDS {
            std::hint::black_box(blake3::hash(std::hint::black_box(&buf)));
        }
        t.elapsed()
    };
    let single = one();
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..cores {
            s.spawn(one);
        }
    });
    let all = t.elapsed();
    Hash {
        one_core_mib_s: mib_s(BUF as u64 * ROUNDS, single),
        all_cores_mib_s: mib_s(BUF as u64 * ROUNDS * cores as u64, all),
        cores,
    }
}

fn with_transport(r: &RemoteArgs, t: &str) -> RemoteArgs {
    RemoteArgs {
        transport: t.to_string(),
        ..r.clone()
    }
}

fn remote(spec: &RemoteSpec, a: &BenchArgs, say: &dyn Fn(String)) -> anyhow::Result<Remote> {
    say(format!("{}:", spec.display()));
    let mut results = Vec::new();
    let default_jobs = tern_core::engine::default_jobs();
    let mut daemon_bbr = false;
    for t in ["tcp", "quic"] {
        let start = Instant::now();
        let ep = match net::connect(spec, &with_transport(&a.remote_args, t), net::Role::Dest, false) {
            Ok(ep) => ep,
            Err(e) => {
                say(format!("  {t}: cannot connect: {e:#}"));
                continue;
            }
        };
        let connect = start.elapsed();
        daemon_bbr |= ep.daemon_tcp_bbr();
        if !ep.supports_bench() {
            bail!("{}: the daemon is too old to answer bench requests", spec.display());
        }
        let rtt = ep.ping(5).with_context(|| format!("{} over {t}", spec.display()))?;
        let est = ep.path_report().rtt_ms.unwrap_or(0.0);
        let streams = a.jobs.unwrap_or_else(|| crate::jobs_for(default_jobs, est, t));
        let up = ep
            .bench_transfer(true, a.net_size, streams)
            .with_context(|| format!("upload to {} over {t}", spec.display()))?;
        let down = ep
            .bench_transfer(false, a.net_size, streams)
            .with_context(|| format!("download from {} over {t}", spec.display()))?;
        let r = TransportResult {
            transport: t.to_string(),
            connect_ms: connect.as_secs_f64() * 1e3,
            request_rtt_ms: rtt.as_secs_f64() * 1e3,
            upload_mbit_s: mbit_s(a.net_size, up),
            download_mbit_s: mbit_s(a.net_size, down),
            streams,
            path: ep.path_report(),
        };
        say(format!(
            "  {t}: connect {:.1} ms, request round trip {:.2} ms, upload {:.0} Mbit/s, download {:.0} Mbit/s ({} streams)",
            r.connect_ms, r.request_rtt_ms, r.upload_mbit_s, r.download_mbit_s, streams
        ));
        say(format!("    {}", describe_path(&r.path)));
        results.push(r);
    }
    if results.is_empty() {
        bail!("{}: no transport could connect", spec.display());
    }
    // The same probe `--transport auto` makes.
    let addr = resolve(spec).with_context(|| spec.display())?;
    let probe = probe_path(addr, a.remote_args.timeout_or(60))
        .with_context(|| format!("{}: TCP does not connect", spec.display()))?;
    let rtt_ms = probe.connect.as_secs_f64() * 1e3;
    let lan = probe.connect < LAN_RTT;
    let bbr = probe.tcp_bbr;
    let push = auto_transport(lan, bbr).name().to_string();
    let pull = auto_transport(lan, daemon_bbr).name().to_string();
    // Workers follow the transport's own round-trip estimate, as in a copy.
    let est = |t: &str| {
        results
            .iter()
            .find(|r| r.transport == t)
            .and_then(|r| r.path.rtt_ms)
            .unwrap_or(rtt_ms)
    };
    let workers = |t: &str| a.jobs.unwrap_or_else(|| crate::jobs_for(default_jobs, est(t), t));
    let (push_jobs, pull_jobs) = (workers(&push), workers(&pull));
    let advice = advice(&push, &pull, rtt_ms, (bbr, daemon_bbr), &results);
    Ok(Remote {
        location: spec.display(),
        probe_connect_ms: rtt_ms,
        transports: results,
        push_picks: push,
        pull_picks: pull,
        push_jobs,
        pull_jobs,
        advice,
    })
}

/// Why auto picks what it picks, and whether the figures disagree.
/// `bbr`: whether this machine's TCP and the daemon's pace with BBR.
fn advice(push: &str, pull: &str, rtt_ms: f64, bbr: (bool, bool), results: &[TransportResult]) -> String {
    let has = |b: bool| {
        if b {
            "paces with BBR"
        } else {
            "has no BBR (CUBIC collapses with loss)"
        }
    };
    let mut s = if rtt_ms < LAN_RTT.as_secs_f64() * 1e3 {
        format!("the path looks like a LAN (TCP connect {rtt_ms:.2} ms, under 2 ms), where TCP costs least CPU")
    } else {
        format!(
            "the path is long (TCP connect {rtt_ms:.1} ms); this machine's TCP {}, so pushes use {push}; \
             the daemon's TCP {}, so pulls, where it sends, use {pull}",
            has(bbr.0),
            has(bbr.1)
        )
    };
    for (dir, picked, rate) in [
        (
            "upload",
            push,
            &(|r: &TransportResult| r.upload_mbit_s) as &dyn Fn(&TransportResult) -> f64,
        ),
        ("download", pull, &|r: &TransportResult| r.download_mbit_s),
    ] {
        let best = results.iter().max_by(|a, b| rate(a).total_cmp(&rate(b)));
        let chosen = results.iter().find(|r| r.transport == picked);
        if let (Some(best), Some(chosen)) = (best, chosen) {
            if best.transport != picked && rate(best) > rate(chosen) * 1.2 {
                s.push_str(&format!(
                    "; measured here, {} was {:.0}% faster for the {dir}: consider --transport {}",
                    best.transport,
                    (rate(best) / rate(chosen).max(1e-9) - 1.0) * 100.0,
                    best.transport
                ));
            }
        }
    }
    s
}
