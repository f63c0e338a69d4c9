//! `tern`: the command-line tool.
//!
//! Parses arguments, resolves source and destination paths into engine
//! roots (rsync's trailing-slash rule), wires signals to the engine's cancel
//! flag, prints progress and the summary, and maps the outcome to an exit
//! status.

mod cli;
mod output;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use tern_core::filter::{Filter, Rule};
use tern_core::{LocalEndpoint, Mode, Options, Root, Summary};

use cli::{Cli, Command, Exit, OutputArgs, TransferArgs};
use output::Console;

fn main() -> ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches.subcommand().map(|(_, m)| m.clone()).unwrap_or_default();
    match run(cli, &sub) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("tern: {e:#}");
            let code = if e.is::<UsageError>() { Exit::Usage } else { Exit::Fatal };
            ExitCode::from(code as u8)
        }
    }
}

/// A bad option value: exits with the usage status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn init_logging(out: &OutputArgs) {
    let level = match (out.quiet, out.verbose) {
        (true, _) => tracing::Level::ERROR,
        (_, 0 | 1) => tracing::Level::WARN,
        (_, 2) => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .init();
}

/// Stops the engine cleanly on the first SIGINT/SIGTERM; a second one exits
/// at once.
fn cancel_flag() -> anyhow::Result<Arc<AtomicBool>> {
    let flag = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register_conditional_shutdown(sig, Exit::Interrupted as i32, flag.clone())
            .context("installing signal handler")?;
        signal_hook::flag::register(sig, flag.clone()).context("installing signal handler")?;
    }
    Ok(flag)
}

/// Builds the filter from --include/--exclude/--exclude-from in the order
/// they were given.
fn filter_from(m: &ArgMatches) -> anyhow::Result<Filter> {
    enum R {
        Pat(OsString, bool),
        File(PathBuf),
    }
    let mut rules: Vec<(usize, R)> = Vec::new();
    for (id, include) in [("exclude", false), ("include", true)] {
        if let (Some(vals), Some(idx)) = (m.get_many::<OsString>(id), m.indices_of(id)) {
            rules.extend(idx.zip(vals).map(|(i, v)| (i, R::Pat(v.clone(), include))));
        }
    }
    if let (Some(vals), Some(idx)) = (m.get_many::<PathBuf>("exclude_from"), m.indices_of("exclude_from")) {
        rules.extend(idx.zip(vals).map(|(i, v)| (i, R::File(v.clone()))));
    }
    rules.sort_by_key(|(i, _)| *i);
    let mut f = Filter::new();
    for (_, r) in rules {
        match r {
            R::Pat(p, include) => {
                let rule = Rule::from_bytes(p.as_bytes(), include)
                    .map_err(|e| UsageError(format!("bad pattern {:?}: {e}", p.to_string_lossy())))?;
                f.push(rule);
            }
            R::File(path) => f.add_file(&path)?,
        }
    }
    Ok(f)
}

fn options(t: &TransferArgs, m: &ArgMatches, cancel: Arc<AtomicBool>) -> anyhow::Result<Options> {
    if !(64 << 10..=256 << 20).contains(&t.chunk_size) || !t.chunk_size.is_power_of_two() {
        return Err(UsageError(format!(
            "--chunk-size must be a power of two from 64K to 256M, not {}",
            t.chunk_size
        ))
        .into());
    }
    if t.jobs == Some(0) {
        return Err(UsageError("--jobs must be at least 1".into()).into());
    }
    Ok(Options {
        dry_run: t.dry_run,
        checksum: t.checksum,
        filter: filter_from(m)?,
        jobs: t.jobs.unwrap_or_else(tern_core::engine::default_jobs),
        fsync: !t.no_fsync,
        verify: t.verify,
        chunk_size: t.chunk_size,
        hard_links: t.hard_links,
        xattrs: t.xattrs,
        bwlimit: t.bwlimit,
        cancel,
        ..Options::default()
    })
}

fn ends_with_slash(p: &OsStr) -> bool {
    let b = p.as_bytes();
    b.ends_with(b"/") || b.ends_with(b"/.") || b == b"."
}

fn is_dir(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_dir())
}

fn local_source(p: &OsStr) -> anyhow::Result<Arc<LocalEndpoint>> {
    if p.is_empty() {
        bail!("empty source path");
    }
    let path = PathBuf::from(p);
    if std::fs::symlink_metadata(&path).is_err() {
        // Follow a trailing-slash symlink like the shell would.
        std::fs::metadata(&path).with_context(|| format!("source {}", path.display()))?;
    }
    Ok(Arc::new(LocalEndpoint::new(path)))
}

/// Resolves `tern copy SRC... DST` into engine roots.
fn copy_roots(paths: &[OsString]) -> anyhow::Result<(LocalEndpoint, Vec<Root>)> {
    let (dst, srcs) = paths.split_last().context("need SRC... DST")?;
    if dst.is_empty() {
        bail!("empty destination path");
    }
    let dst_path = PathBuf::from(dst);
    let into_dir = srcs.len() > 1 || ends_with_slash(dst) || is_dir(&dst_path);
    let mut roots = Vec::new();
    for s in srcs {
        let src = local_source(s)?;
        let src_path = Path::new(s);
        let src_is_dir = is_dir(src_path)
            && (ends_with_slash(s) || !std::fs::symlink_metadata(src_path).is_ok_and(|m| m.file_type().is_symlink()));
        let dst_rel = if !into_dir && !src_is_dir {
            // A single file to a file name.
            PathBuf::new()
        } else if src_is_dir && ends_with_slash(s) {
            PathBuf::new()
        } else {
            match src_path.file_name() {
                Some(n) => PathBuf::from(n),
                None => PathBuf::new(), // `..`, `/`: contents
            }
        };
        check_not_inside(src_path, &dst_path.join(&dst_rel))?;
        roots.push(Root { src, dst_rel });
    }
    if into_dir && std::fs::symlink_metadata(&dst_path).is_ok() && !is_dir(&dst_path) {
        bail!("destination {} exists and is not a directory", dst_path.display());
    }
    Ok((LocalEndpoint::following_root(dst_path), roots))
}

/// `p` made absolute with symlinks resolved as far as it exists.
fn resolved(p: &Path) -> PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut head = abs.clone();
    let mut tail = Vec::new();
    loop {
        if let Ok(c) = head.canonicalize() {
            return tail.iter().rev().fold(c, |acc: PathBuf, n| acc.join(n));
        }
        match (head.file_name().map(|n| n.to_os_string()), head.parent()) {
            (Some(n), Some(parent)) => {
                tail.push(n);
                head = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
}

/// Refuses to copy a directory into itself, which would never end.
fn check_not_inside(src: &Path, dst: &Path) -> anyhow::Result<()> {
    if !is_dir(src) {
        return Ok(());
    }
    let (s, d) = (resolved(src), resolved(dst));
    if d.starts_with(&s) {
        return Err(UsageError(format!("cannot copy {} into itself ({})", src.display(), dst.display())).into());
    }
    Ok(())
}

fn exit_for(s: &Summary) -> Exit {
    if s.interrupted {
        Exit::Interrupted
    } else if s.errors > 0 {
        Exit::Partial
    } else if s.differences > 0 {
        Exit::Differences
    } else {
        Exit::Ok
    }
}

fn run(cli: Cli, m: &ArgMatches) -> anyhow::Result<Exit> {
    let cancel = cancel_flag()?;
    let (roots, dest, opts, out, verb) = match &cli.command {
        Command::Copy { paths, opts: t } => {
            let o = options(t, m, cancel)?;
            let (dest, roots) = copy_roots(paths)?;
            (roots, dest, o, &t.out, "copied")
        }
        Command::Sync {
            src,
            dst,
            delete,
            opts: t,
        } => {
            let mut o = options(t, m, cancel)?;
            o.delete = *delete;
            let source = local_source(src)?;
            if dst.is_empty() {
                bail!("empty destination path");
            }
            check_not_inside(Path::new(src), Path::new(dst))?;
            // A single file synced onto a directory goes inside it, as with
            // rsync; it never replaces the directory.
            let dst_rel = match Path::new(src).file_name() {
                Some(name) if !is_dir(Path::new(src)) && is_dir(Path::new(dst)) => PathBuf::from(name),
                _ => PathBuf::new(),
            };
            let roots = vec![Root { src: source, dst_rel }];
            (
                roots,
                LocalEndpoint::following_root(PathBuf::from(dst)),
                o,
                &t.out,
                "copied",
            )
        }
        Command::Check {
            src, dst, out, jobs, ..
        } => {
            let source = local_source(src)?;
            let dst_path = PathBuf::from(dst);
            std::fs::symlink_metadata(&dst_path).with_context(|| format!("destination {}", dst_path.display()))?;
            let o = Options {
                mode: Mode::Check,
                filter: filter_from(m)?,
                jobs: jobs.unwrap_or_else(tern_core::engine::default_jobs),
                cancel,
                ..Options::default()
            };
            let roots = vec![Root {
                src: source,
                dst_rel: PathBuf::new(),
            }];
            (roots, LocalEndpoint::following_root(dst_path), o, out, "checked")
        }
    };
    init_logging(out);
    let list = opts.dry_run || opts.mode == Mode::Check;
    let console = Arc::new(Console::new(out, list));
    let summary = tern_core::run(roots, Arc::new(dest), opts, console.clone());
    console.summary(verb, &summary);
    Ok(exit_for(&summary))
}
