//! `tern`: the command-line tool.
//!
//! Parses arguments, resolves source and destination paths into engine
//! roots (rsync's trailing-slash rule), wires signals to the engine's cancel
//! flag, prints progress and the summary, and maps the outcome to an exit
//! status.

mod bench;
mod cli;
mod credentials;
mod defaults;
mod ls;
mod mount;
mod net;
mod output;

use std::ffi::{OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{ArgMatches, CommandFactory, FromArgMatches};
use tern_core::filter::{Filter, Rule};
use tern_core::{Dest, LocalEndpoint, Mode, Options, Root, Source, Summary};
use tern_net::remote::RemoteEndpoint;
use tern_proto::{PullRequest, PullSource};

use cli::{Cli, Command, Exit, OutputArgs, RemoteArgs, TransferArgs};
use net::Loc;
use output::Console;

fn main() -> ExitCode {
    keep_freed_buffers();
    let args = defaults::apply(
        std::env::args_os().collect(),
        &tern_net::trust::config_dir().join("defaults"),
    );
    let matches = Cli::command().get_matches_from(args);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    let sub = matches.subcommand().map(|(_, m)| m.clone()).unwrap_or_default();
    let json = sub.try_get_one::<bool>("json").ok().flatten().copied().unwrap_or(false);
    match run(cli, &sub) {
        Ok(code) => ExitCode::from(code as u8),
        Err(e) => {
            eprintln!("tern: {e:#}");
            let code = if e.is::<UsageError>() { Exit::Usage } else { Exit::Fatal };
            if json {
                // A script reading --json gets an answer either way.
                let v = serde_json::json!({ "error": format!("{e:#}"), "exit": code as u8 });
                println!("{v}");
            }
            ExitCode::from(code as u8)
        }
    }
}

/// Chunk buffers are megabytes each and are freed and allocated again for
/// every chunk. By default glibc serves such sizes with mmap and unmaps them
/// on free, so every chunk paid for page faults and page zeroing (a tenth of
/// the CPU time of a transfer, measured with perf). Serving them from the
/// heap and not trimming it keeps freed buffers for reuse; memory stays
/// bounded by the transfer window.
fn keep_freed_buffers() {
    // Each arena keeps up to the trim threshold of freed memory; glibc's
    // default of 8 arenas per core let a daemon serving 64 clients sit at
    // 1 GiB (tools/load.sh). Four bound what is kept to 256 MiB.
    const ARENAS: libc::c_int = 4;
    // SAFETY: mallopt only changes allocator tunables; called before any
    // other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        libc::mallopt(libc::M_ARENA_MAX, ARENAS);
    }
}

/// A bad option value: exits with the usage status.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct UsageError(String);

fn init_logging(out: &OutputArgs) {
    init_logging_at(out, tracing::Level::WARN);
}

/// Logs at `base` by default; -v/-vv raise it, -q lowers it to errors.
fn init_logging_at(out: &OutputArgs, base: tracing::Level) {
    let level = match (out.quiet, out.verbose, base) {
        (true, _, _) => tracing::Level::ERROR,
        (_, 0 | 1, b) => b,
        (_, 2, tracing::Level::WARN) => tracing::Level::INFO,
        _ => tracing::Level::DEBUG,
    };
    init_log_level(level);
}

fn init_log_level(level: tracing::Level) {
    use std::io::IsTerminal;
    tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        // Colours only for a terminal, not into a log file or a pipe.
        .with_ansi(std::io::stderr().is_terminal())
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
        delta: t.no_whole_file,
        prune_empty_dirs: t.prune_empty_dirs,
        select: tern_core::engine::Select {
            size_only: t.size_only,
            ignore_existing: t.ignore_existing,
            update: t.update,
            modify_window: t.modify_window,
            min_size: t.min_size,
            max_size: t.max_size,
        },
        cancel,
        ..Options::default()
    })
}

/// `tern man`: the page for tern on stdout, or pages for tern and each of
/// its commands written to `dir`.
fn man(dir: Option<&Path>) -> anyhow::Result<Exit> {
    let cmd = Cli::command();
    let Some(dir) = dir else {
        let mut page = Vec::new();
        clap_mangen::Man::new(cmd).render(&mut page)?;
        std::io::Write::write_all(&mut std::io::stdout(), &page).context("writing the page")?;
        return Ok(Exit::Ok);
    };
    std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
    let write = |name: &str, c: clap::Command| -> anyhow::Result<()> {
        let path = dir.join(format!("{name}.1"));
        let mut out = Vec::new();
        clap_mangen::Man::new(c).title(name.to_string()).render(&mut out)?;
        std::fs::write(&path, out).with_context(|| format!("{}", path.display()))?;
        Ok(())
    };
    write("tern", cmd.clone())?;
    for sub in cmd.get_subcommands() {
        let name = format!("tern-{}", sub.get_name());
        write(&name, sub.clone())?;
    }
    Ok(Exit::Ok)
}

/// Whether the command's destination is a daemon (what `-i` marks `<`).
fn pushes(cmd: &Command) -> bool {
    let dst = match cmd {
        Command::Copy { paths, .. } => paths.last(),
        Command::Sync { dst, .. } => Some(dst),
        _ => None,
    };
    dst.is_some_and(|d| matches!(net::parse_loc(d), Ok(Loc::Remote(_))))
}

/// The `--files-from` list, read whole (from stdin for `-`): its bytes,
/// whether it is NUL-separated, and how to name it in errors.
fn read_list(t: &TransferArgs) -> anyhow::Result<Option<(Vec<u8>, bool, String)>> {
    let Some(f) = &t.files_from else {
        return Ok(None);
    };
    let (data, name) = if f.as_os_str() == "-" {
        let mut v = Vec::new();
        std::io::Read::read_to_end(&mut std::io::stdin(), &mut v).context("--files-from -: reading stdin")?;
        (v, "--files-from (stdin)".to_string())
    } else {
        let v = std::fs::read(f).with_context(|| format!("--files-from {}", f.display()))?;
        (v, f.display().to_string())
    };
    Ok(Some((data, t.from0, name)))
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

/// A source, opened, and what the trailing-slash rule needs to know of it.
struct Src {
    ep: Arc<dyn Source>,
    /// A directory (not a symlink to one named without a trailing slash).
    is_dir: bool,
    slash: bool,
    /// The name it is copied under when it is not copied as contents.
    name: Option<PathBuf>,
    local: Option<PathBuf>,
    remote: Option<RemoteEndpoint>,
}

fn open_source(arg: &OsStr, r: &RemoteArgs, remotes: &mut Vec<RemoteEndpoint>) -> anyhow::Result<Src> {
    match net::parse_loc(arg)? {
        Loc::Local(p) => {
            let ep = local_source(&p)?;
            let path = PathBuf::from(&p);
            let slash = ends_with_slash(&p);
            let is_dir =
                is_dir(&path) && (slash || !std::fs::symlink_metadata(&path).is_ok_and(|m| m.file_type().is_symlink()));
            Ok(Src {
                ep,
                is_dir,
                slash,
                name: path.file_name().map(PathBuf::from),
                local: Some(path),
                remote: None,
            })
        }
        Loc::S3(spec) => {
            let ep = net::connect_s3(&spec, r)?;
            let Some(root) = ep.stat(Path::new(""))? else {
                bail!("source {}: no such object or prefix", spec.display());
            };
            Ok(Src {
                ep: Arc::new(ep),
                is_dir: root.kind == tern_core::Kind::Dir,
                slash: spec.trailing_slash,
                name: Some(spec.name()),
                local: None,
                remote: None,
            })
        }
        Loc::Remote(spec) => {
            let ep = net::connect(&spec, r, net::Role::Source, false)?;
            let root = ep.stat_root()?;
            let Some(root) = root else {
                bail!("source {}: no such file or directory", spec.display());
            };
            remotes.push(ep.clone());
            Ok(Src {
                ep: Arc::new(ep.clone()),
                is_dir: root.kind == tern_core::Kind::Dir,
                slash: spec.trailing_slash,
                name: Some(net::remote_name(&spec)),
                local: None,
                remote: Some(ep),
            })
        }
    }
}

/// What `--backup`, `--backup-dir` and `--suffix` ask for.
struct BackupArgs {
    dir: Option<PathBuf>,
    suffix: OsString,
}

fn backup_args(t: &TransferArgs) -> anyhow::Result<Option<BackupArgs>> {
    if !t.backup && t.backup_dir.is_none() {
        if t.suffix.is_some() {
            return Err(UsageError("--suffix needs --backup or --backup-dir".into()).into());
        }
        return Ok(None);
    }
    let suffix = t
        .suffix
        .clone()
        .unwrap_or_else(|| if t.backup_dir.is_some() { "" } else { "~" }.into());
    if suffix.as_bytes().contains(&b'/') {
        return Err(UsageError(format!("--suffix {suffix:?}: a suffix cannot hold `/`")).into());
    }
    if suffix.is_empty() && t.backup_dir.is_none() {
        return Err(
            UsageError("--suffix cannot be empty without --backup-dir: the backup would be the file".into()).into(),
        );
    }
    if t.backup_dir.as_ref().is_some_and(|d| d.as_os_str().is_empty()) {
        return Err(UsageError("--backup-dir cannot be empty".into()).into());
    }
    Ok(Some(BackupArgs {
        dir: t.backup_dir.clone(),
        suffix,
    }))
}

/// `base.join(rel)` with `.` and `..` taken away, or None if it climbs
/// above `base`'s own root (a daemon's module).
fn within(base: &Path, rel: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in base.join(rel).components() {
        match c {
            std::path::Component::Normal(n) => out.push(n),
            std::path::Component::CurDir => {}
            std::path::Component::ParentDir => {
                if !out.pop() {
                    return None;
                }
            }
            std::path::Component::RootDir | std::path::Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

/// A destination, opened.
struct Dst {
    ep: Arc<dyn Dest>,
    /// What the run leaves alone there: the backups it keeps.
    protect: tern_core::engine::Protect,
    /// What is at the root now.
    root: Option<tern_core::Entry>,
    slash: bool,
    local: Option<PathBuf>,
    shown: String,
    remote: Option<RemoteEndpoint>,
}

fn open_dest(
    arg: &OsStr,
    r: &RemoteArgs,
    write: bool,
    backup: Option<&BackupArgs>,
    remotes: &mut Vec<RemoteEndpoint>,
) -> anyhow::Result<Dst> {
    if arg.is_empty() {
        bail!("empty destination path");
    }
    // A dry run keeps nothing, but shows the backups as left alone.
    let mut protect = tern_core::engine::Protect::default();
    match net::parse_loc(arg)? {
        Loc::Local(p) => {
            let path = PathBuf::from(&p);
            let mut ep = LocalEndpoint::following_root(path.clone());
            let root = ep.stat(Path::new(""))?;
            if let Some(b) = backup {
                // Relative to the directory things land in, as rsync has it.
                let base = match &root {
                    Some(e) if e.kind != tern_core::Kind::Dir => {
                        path.parent().map(Path::to_path_buf).unwrap_or_default()
                    }
                    _ => path.clone(),
                };
                let dir = match &b.dir {
                    Some(d) => Some(
                        std::path::absolute(base.join(d)).with_context(|| format!("--backup-dir {}", d.display()))?,
                    ),
                    None => None,
                };
                protect.dir = dir
                    .as_ref()
                    .and_then(|d| resolved(d).strip_prefix(resolved(&path)).ok().map(Path::to_path_buf));
                protect.suffix = dir.is_none().then(|| b.suffix.clone());
                if write {
                    ep = ep.with_backup(tern_core::local::Backup {
                        dir,
                        base: PathBuf::new(),
                        suffix: b.suffix.clone(),
                    });
                }
            }
            // A destination nothing can be written to fails the run at once
            // (exit 1), not each file in turn.
            if let (true, Some(e)) = (write, &root) {
                let dir = match e.kind {
                    tern_core::Kind::Dir => path.clone(),
                    _ => path.parent().map(Path::to_path_buf).unwrap_or_default(),
                };
                if let Err(why) = writable(&dir) {
                    bail!("destination {}: cannot be written to: {why}", path.display());
                }
            }
            // Missing parents are made, as rsync's --mkpath does, whether
            // a directory or a single file lands there.
            if let (true, None, Some(parent)) = (write, &root, path.parent()) {
                if !parent.as_os_str().is_empty() {
                    if let Some(file) = parent.ancestors().find(|a| a.exists()).filter(|a| !a.is_dir()) {
                        bail!("destination {}: {} is not a directory", path.display(), file.display());
                    }
                    std::fs::create_dir_all(parent)
                        .with_context(|| format!("destination {}: making its parent directories", path.display()))?;
                }
            }
            Ok(Dst {
                ep: Arc::new(ep),
                protect,
                root,
                slash: ends_with_slash(&p),
                shown: path.display().to_string(),
                local: Some(path),
                remote: None,
            })
        }
        Loc::S3(spec) => {
            if backup.is_some() {
                return Err(UsageError("--backup and --backup-dir are not for s3:// destinations yet".into()).into());
            }
            let ep = net::connect_s3(&spec, r)?;
            ep.as_destination();
            let root = ep.stat(Path::new(""))?;
            Ok(Dst {
                ep: Arc::new(ep),
                protect,
                root,
                slash: spec.trailing_slash,
                shown: spec.display(),
                local: None,
                remote: None,
            })
        }
        Loc::Remote(spec) => {
            let ep = net::connect(&spec, r, net::Role::Dest, write)?;
            let root = ep.stat_root()?;
            if let Some(b) = backup {
                let base = match &root {
                    Some(e) if e.kind != tern_core::Kind::Dir => spec.path.parent().unwrap_or(Path::new("")),
                    _ => spec.path.as_path(),
                };
                let dir = match &b.dir {
                    Some(d) if d.is_absolute() => {
                        return Err(UsageError(format!(
                            "--backup-dir {}: for a daemon destination give a path relative to it, inside module `{}`",
                            d.display(),
                            spec.module
                        ))
                        .into())
                    }
                    Some(d) => {
                        let Some(m) = within(base, d).filter(|m| !m.as_os_str().is_empty()) else {
                            return Err(UsageError(format!(
                                "--backup-dir {}: leads outside module `{}`",
                                d.display(),
                                spec.module
                            ))
                            .into());
                        };
                        Some(m)
                    }
                    None => None,
                };
                if write {
                    ep.keep_backups(dir.as_deref(), base, &b.suffix)?;
                }
                protect.dir = dir
                    .as_ref()
                    .and_then(|d| d.strip_prefix(&spec.path).ok().map(Path::to_path_buf));
                protect.suffix = dir.is_none().then(|| b.suffix.clone());
            }
            remotes.push(ep.clone());
            Ok(Dst {
                ep: Arc::new(ep.clone()),
                protect,
                root,
                slash: spec.trailing_slash,
                shown: spec.display(),
                local: None,
                remote: Some(ep),
            })
        }
    }
}

/// Whether the directory `dir` ("" for the current one) may be written
/// to, as the kernel decides (a read-only mount, permissions).
fn writable(dir: &Path) -> std::io::Result<()> {
    let dir = if dir.as_os_str().is_empty() {
        Path::new(".")
    } else {
        dir
    };
    let c = std::ffi::CString::new(dir.as_os_str().as_bytes())?;
    // SAFETY: a valid NUL-terminated path; access only reads it.
    match unsafe { libc::access(c.as_ptr(), libc::W_OK) } {
        0 => Ok(()),
        _ => Err(std::io::Error::last_os_error()),
    }
}

fn dst_is_dir(d: &Dst) -> bool {
    d.root.as_ref().is_some_and(|e| e.kind == tern_core::Kind::Dir)
}

/// The endpoints of a run.
struct Plan {
    dest: Arc<dyn Dest>,
    /// What the run leaves alone at the destination.
    protect: tern_core::engine::Protect,
    roots: Vec<Root>,
    /// Set when the destination and every source are on daemons: the
    /// destination daemon may then run the transfer itself (remote to
    /// remote, the data not passing through here).
    direct: Option<(RemoteEndpoint, Vec<PullSource>, Vec<tern_proto::Ticket>)>,
    /// `sync` of a directory named without a trailing slash onto an
    /// existing directory of another name: (source as given, destination
    /// as shown, the source's name). With `--delete` that makes the
    /// destination itself the source, which an rsync user does not mean.
    renamed: Option<(String, String, PathBuf)>,
}

impl Plan {
    fn new(d: Dst, roots: Vec<(Root, Option<RemoteEndpoint>)>) -> Plan {
        let direct = d.remote.filter(|dr| dr.supports_pull()).and_then(|dr| {
            let mut sources = Vec::new();
            let mut tickets = Vec::new();
            for (root, src) in &roots {
                let src = src.as_ref()?;
                let spec = src.spec();
                // The source lets the destination daemon read what this
                // client may read there, and no more.
                match src.ticket(&dr.server_fingerprint()) {
                    Ok(t) => tickets.push(t),
                    Err(e) => {
                        tracing::info!(source = %spec.display(), error = %e, "no ticket: the data goes through here");
                        return None;
                    }
                }
                sources.push(PullSource {
                    host: spec.host.clone(),
                    port: spec.port,
                    module: spec.module.clone(),
                    path: spec.path.as_os_str().as_bytes().to_vec(),
                    fingerprint: src.server_fingerprint(),
                    dst_rel: dr.spec().path.join(&root.dst_rel).as_os_str().as_bytes().to_vec(),
                });
            }
            Some((dr, sources, tickets))
        });
        Plan {
            dest: d.ep,
            protect: d.protect,
            roots: roots.into_iter().map(|(r, _)| r).collect(),
            direct,
            renamed: None,
        }
    }
}

/// Resolves `tern copy SRC... DST` into engine roots.
fn copy_roots(
    paths: &[OsString],
    r: &RemoteArgs,
    write: bool,
    backup: Option<&BackupArgs>,
    remotes: &mut Vec<RemoteEndpoint>,
) -> anyhow::Result<Plan> {
    let (dst, srcs) = paths.split_last().context("need SRC... DST")?;
    let d = open_dest(dst, r, write, backup, remotes)?;
    let into_dir = srcs.len() > 1 || d.slash || dst_is_dir(&d);
    let mut roots = Vec::new();
    for s in srcs {
        let src = open_source(s, r, remotes)?;
        let dst_rel = if !into_dir && !src.is_dir {
            // A single file to a file name.
            PathBuf::new()
        } else if src.is_dir && src.slash {
            PathBuf::new()
        } else {
            src.name.clone().unwrap_or_default() // `..`, `/`: contents
        };
        if let (Some(sp), Some(dp)) = (&src.local, &d.local) {
            check_not_inside(sp, &dp.join(&dst_rel))?;
        }
        roots.push((Root { src: src.ep, dst_rel }, src.remote));
    }
    if into_dir && d.root.is_some() && !dst_is_dir(&d) {
        bail!("destination {} exists and is not a directory", d.shown);
    }
    Ok(Plan::new(d, roots))
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
    match &cli.command {
        Command::Serve(a) => {
            init_log_level(match (a.quiet, a.verbose) {
                (true, _) => tracing::Level::ERROR,
                (_, 0) => tracing::Level::INFO,
                _ => tracing::Level::DEBUG,
            });
            return net::serve(a);
        }
        Command::Fingerprint { server, state_dir } => return net::fingerprint(*server, state_dir.as_deref()),
        Command::Completions { shell } => {
            // Into memory first: the generator panics on a write error
            // (a closed pipe).
            let mut script = Vec::new();
            clap_complete::generate(*shell, &mut Cli::command(), "tern", &mut script);
            std::io::Write::write_all(&mut std::io::stdout(), &script).context("writing the script")?;
            return Ok(Exit::Ok);
        }
        Command::Man { dir } => return man(dir.as_deref()),
        Command::ForgetHost { host } => {
            let file = tern_net::trust::config_dir().join("known_hosts");
            let gone = tern_net::trust::forget(&file, host)?;
            if gone.is_empty() {
                eprintln!("tern: no key pinned for {host} in {}", file.display());
                return Ok(Exit::Fatal);
            }
            for line in gone {
                println!("forgot {line}");
            }
            return Ok(Exit::Ok);
        }
        Command::Ls(a) => {
            init_log_level(tracing::Level::WARN);
            if let Some(spec) = a
                .path
                .to_str()
                .and_then(tern_net::url::parse_daemon)
                .transpose()?
                .filter(|s| s.module.is_empty())
            {
                let list = net::list_modules(&spec, &a.remote)?;
                if list.is_empty() {
                    eprintln!(
                        "tern: tern://{}/ has no module this client may use: pass --token-file, set TERN_TOKEN, \
                         or have the daemon grant this client's key (`tern fingerprint`)",
                        spec.authority()
                    );
                    return Ok(Exit::Fatal);
                }
                let mut out = std::io::stdout().lock();
                ls::modules(&list, &mut out)?;
                std::io::Write::flush(&mut out)?;
                return Ok(Exit::Ok);
            }
            let src = open_source(&a.path, &a.remote, &mut Vec::new())?;
            let name = src.name.clone().unwrap_or_else(|| PathBuf::from(&a.path));
            let mut out = std::io::stdout().lock();
            let failed = ls::list(&*src.ep, &name, a.long, a.recursive, &mut out)?;
            std::io::Write::flush(&mut out)?;
            return Ok(if failed > 0 { Exit::Partial } else { Exit::Ok });
        }
        Command::Mount(a) => {
            init_log_level(match a.verbose {
                0 => tracing::Level::WARN,
                1 => tracing::Level::INFO,
                2 => tracing::Level::DEBUG,
                _ => tracing::Level::TRACE,
            });
            return mount::run(a);
        }
        Command::Unmount { dir } => return mount::unmount(dir),
        Command::Bench(a) => {
            init_log_level(tracing::Level::WARN);
            return bench::run(a);
        }
        _ => {}
    }
    let cancel = cancel_flag()?;
    let (opts, out, remote, verb) = match &cli.command {
        Command::Copy { opts: t, .. } => (options(t, m, cancel.clone())?, &t.out, &t.remote, "copied"),
        Command::Sync {
            delete,
            delete_excluded,
            max_delete,
            opts: t,
            ..
        } => {
            let mut o = options(t, m, cancel.clone())?;
            o.delete = *delete || *delete_excluded;
            o.delete_excluded = *delete_excluded;
            o.max_delete = *max_delete;
            (o, &t.out, &t.remote, "copied")
        }
        Command::Check { out, jobs, remote, .. } => {
            let o = Options {
                mode: Mode::Check,
                filter: filter_from(m)?,
                jobs: jobs.unwrap_or_else(tern_core::engine::default_jobs),
                cancel: cancel.clone(),
                ..Options::default()
            };
            (o, out, remote, "checked")
        }
        // The other commands returned above.
        _ => unreachable!("handled above"),
    };
    let whole_file = match &cli.command {
        Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } => t.whole_file,
        _ => true,
    };
    let jobs_given = match &cli.command {
        Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } => t.jobs.is_some(),
        Command::Check { jobs, .. } => jobs.is_some(),
        _ => true,
    };
    init_logging(out);
    let write = !opts.dry_run && opts.mode == Mode::Transfer;
    let list = opts.dry_run || opts.mode == Mode::Check;
    let rsync_p =
        matches!(&cli.command, Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } if t.partial_progress);
    let (stats, itemize) = match &cli.command {
        Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } => (t.stats, t.itemize_changes),
        _ => (false, false),
    };
    let console = Arc::new(
        Console::new(out, list, rsync_p)
            .with_stats(stats)
            .with_itemize(itemize, pushes(&cli.command)),
    );
    let files_from = match &cli.command {
        Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } => read_list(t)?,
        _ => None,
    };
    let backup = match &cli.command {
        Command::Copy { opts: t, .. } | Command::Sync { opts: t, .. } => backup_args(t)?,
        _ => None,
    };
    let mut attempt = 0;
    loop {
        let mut remotes = Vec::new();
        let resolved = resolve(&cli.command, remote, write, backup.as_ref(), &mut remotes);
        let plan = match resolved {
            Ok(x) => x,
            Err(e) if attempt < remote.retries && retryable(&e, attempt) && !cancel.load(Ordering::Relaxed) => {
                attempt += 1;
                retry_pause(attempt, remote.retries, &e);
                continue;
            }
            Err(e) => return Err(e),
        };
        let mut opts = jobs_for_path(&opts, jobs_given, &remotes);
        opts.protect = plan.protect.clone();
        if opts.delete_excluded {
            // As rsync: --delete-excluded deletes old backups beside files.
            opts.protect.suffix = None;
        }
        // Like rsync: a delta where bytes cross a network, unless -W.
        opts.delta |= !remotes.is_empty() && !whole_file;
        if let Some((list, nul, name)) = &files_from {
            let [root] = plan.roots.as_slice() else {
                return Err(UsageError("--files-from takes one source, whose paths it lists".into()).into());
            };
            opts.filter
                .only_from(list, *nul, &root.dst_rel, name)
                .map_err(|e| UsageError(e.to_string()))?;
        }
        if opts.delete && !opts.dry_run {
            if let Some((src, dst, name)) = &plan.renamed {
                refuse_renamed_mirror(&plan, &opts, src, dst, name)?;
            }
        }
        for r in &remotes {
            // A stream per worker, one per listing and one for queued
            // changes, opened while the run starts rather than each when
            // first needed.
            r.open_streams_ahead(opts.jobs + 2);
        }
        // What the daemons' run does not take yet.
        let here = opts.select.any()
            || opts.filter.has_list()
            || opts.delete_excluded
            || opts.max_delete.is_some()
            || opts.prune_empty_dirs
            || itemize
            || backup.is_some();
        if plan.direct.is_some() && here {
            console.note(
                "--files-from, --delete-excluded, --max-delete, --prune-empty-dirs, --itemize-changes, --size-only, \
                 --ignore-existing, --update, --modify-window, --min-size, --max-size and --backup are applied \
                 here: the data goes through this machine",
            );
        }
        if let Some((dr, sources, tickets)) = plan.direct.filter(|_| !here) {
            let req = PullRequest {
                sources,
                opts: tern_net::pull::run_options(&opts),
                transport: match remote.transport.as_str() {
                    "quic" => 1,
                    "tcp" => 2,
                    _ => 0,
                },
            };
            let extra = tern_proto::PullExtra {
                delta: opts.delta,
                compress: net::compression(remote).to_wire(),
            };
            match dr.pull(req, extra, tickets, &*console, &cancel) {
                Ok(mut out) => {
                    if out.paths.is_empty() && !out.transport.is_empty() {
                        out.paths.push(tern_net::path::PathReport {
                            transport: out.transport.clone(),
                            ..Default::default()
                        });
                    }
                    console.summary(verb, &out.summary, &out.paths, true);
                    return Ok(exit_for(&out.summary));
                }
                Err(tern_net::NetError::Remote(e)) if direct_refusal(e.code) => {
                    console.note(&format!(
                        "{} cannot pull from the source itself ({}); the data goes through this machine",
                        dr.spec().display(),
                        e.message
                    ));
                }
                Err(e) => {
                    let e = anyhow::Error::from(e).context(dr.spec().display());
                    if attempt < remote.retries && retryable(&e, attempt) && !cancel.load(Ordering::Relaxed) {
                        attempt += 1;
                        retry_pause(attempt, remote.retries, &e);
                        continue;
                    }
                    return Err(e);
                }
            }
        }
        let watched = remotes.clone();
        console.watch_connections(Box::new(move || watched.iter().any(|r| r.connection_lost())));
        let summary = tern_core::run(plan.roots, plan.dest, opts.clone(), console.clone());
        let lost = remotes.iter().any(|r| r.connection_lost());
        if lost && attempt < remote.retries && !summary.interrupted {
            attempt += 1;
            let held = console.retrying();
            let what = match held {
                0 => "the connection dropped".to_string(),
                n => format!(
                    "the connection dropped ({n} {} to redo)",
                    if n == 1 { "failure" } else { "failures" }
                ),
            };
            retry_pause(attempt, remote.retries, &anyhow::anyhow!(what));
            continue;
        }
        let mut paths: Vec<_> = remotes.iter().map(|r| r.path_report()).collect();
        let (requests, sent, received) = tern_s3::traffic();
        if requests > 0 {
            paths.push(tern_net::path::PathReport {
                transport: "s3".into(),
                requests,
                wire_bytes_sent: sent,
                wire_bytes_received: received,
                ..Default::default()
            });
        }
        console.summary(verb, &summary, &paths, false);
        return Ok(exit_for(&summary));
    }
}

/// Counts what a run would delete, and keeps the first such path.
#[derive(Default)]
struct Deletions(std::sync::Mutex<(u64, Option<PathBuf>)>);

impl tern_core::Observer for Deletions {
    fn action(&self, action: tern_core::Action, path: &Path, _size: u64) {
        if action == tern_core::Action::Delete {
            if let Ok(mut d) = self.0.lock() {
                d.0 += 1;
                d.1.get_or_insert_with(|| path.to_path_buf());
            }
        }
    }
}

/// `tern sync photos /backup --delete`: rsync would make /backup/photos;
/// tern makes /backup itself equal to photos. Where that would delete
/// anything, refuse and say both ways to write what is meant.
fn refuse_renamed_mirror(plan: &Plan, opts: &Options, src: &str, dst: &str, name: &Path) -> anyhow::Result<()> {
    let seen = Arc::new(Deletions::default());
    let dry = Options {
        dry_run: true,
        ..opts.clone()
    };
    tern_core::run(plan.roots.clone(), plan.dest.clone(), dry, seen.clone());
    let (n, first) = seen.0.lock().map(|d| d.clone()).unwrap_or_default();
    if n == 0 {
        return Ok(());
    }
    let first = first.map(|p| format!(" (such as {})", p.display())).unwrap_or_default();
    let into = format!("{}/{}", dst.trim_end_matches('/'), name.display());
    bail!(UsageError(format!(
        "not syncing: `sync {src} {dst} --delete` makes {dst} itself equal to {src}, which would delete \
         {n} {} of {dst} that {src} lacks{first}.\n  \
         to sync into {into}:  tern sync {src} {into} --delete\n  \
         to make {dst} equal to {src}:  tern sync {}/ {dst} --delete",
        if n == 1 { "entry" } else { "entries" },
        src.trim_end_matches('/'),
    )))
}

/// Round trips from which more QUIC streams pay off.
const LONG_PATH_RTT_MS: f64 = 10.0;
/// Workers on a long QUIC path unless `--jobs` says otherwise.
const LONG_PATH_JOBS: usize = 8;

/// On a long path each QUIC stream's window (2 MiB, see tern-net's
/// transport), not the link, limits its rate, so the default worker count
/// is raised to keep more streams going. bench/wan.sh, 1 Gbit/s at 50 ms
/// with 1 % loss: 4 QUIC streams 8.5 s, 8 streams 5.9 s for 512 MiB; 16
/// were no faster and lost 20 % of their packets. TCP windows grow with the
/// kernel's autotuning, and more connections only overshoot more: 4 took
/// 5.85-5.97 s with 10 % of segments resent, 8 took 6.01-6.18 s with 15 %.
fn jobs_for_path(opts: &Options, jobs_given: bool, remotes: &[RemoteEndpoint]) -> Options {
    let mut o = opts.clone();
    if !jobs_given {
        for r in remotes {
            let p = r.path_report();
            o.jobs = jobs_for(o.jobs, p.rtt_ms.unwrap_or(0.0), &p.transport);
        }
    }
    o
}

/// The default worker count for a daemon `rtt_ms` away over `transport`.
pub(crate) fn jobs_for(jobs: usize, rtt_ms: f64, transport: &str) -> usize {
    if transport == "quic" && rtt_ms >= LONG_PATH_RTT_MS {
        jobs.max(LONG_PATH_JOBS)
    } else {
        jobs
    }
}

/// Refusals of a direct (daemon to daemon) run after which relaying the data
/// through the client may still work.
fn direct_refusal(code: tern_proto::ErrorCode) -> bool {
    use tern_proto::ErrorCode as C;
    matches!(code, C::Forbidden | C::Unauthorized | C::Unavailable | C::NotFound)
}

/// Whether a failure to connect is worth another attempt: a connection
/// that broke, or one refused after the first attempt got through (a
/// daemon restarting). Refused at once, nothing listens there: say so now.
fn retryable(e: &anyhow::Error, attempt: u32) -> bool {
    let refused = e.chain().any(|c| {
        matches!(
            c.downcast_ref::<tern_net::NetError>(),
            Some(tern_net::NetError::Refused(_))
        )
    });
    is_connect_failure(e) || (refused && attempt > 0)
}

fn is_connect_failure(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<tern_net::NetError>().is_some_and(|n| {
            matches!(
                n,
                tern_net::NetError::Io(_)
                    | tern_net::NetError::Timeout(_)
                    | tern_net::NetError::Closed
                    | tern_net::NetError::Quic(_)
            )
        })
    })
}

/// Waits before retry `attempt` (1, 2, 4... seconds, at most 30).
fn retry_pause(attempt: u32, of: u32, why: &anyhow::Error) {
    let secs = (1u64 << (attempt - 1).min(5)).min(30);
    eprintln!("tern: {why:#}; retrying in {secs} s (attempt {attempt} of {of})");
    std::thread::sleep(std::time::Duration::from_secs(secs));
}

/// Opens the endpoints of a copy, sync or check.
fn resolve(
    cmd: &Command,
    r: &RemoteArgs,
    write: bool,
    backup: Option<&BackupArgs>,
    remotes: &mut Vec<RemoteEndpoint>,
) -> anyhow::Result<Plan> {
    match cmd {
        Command::Copy { paths, .. } => copy_roots(paths, r, write, backup, remotes),
        Command::Sync { src, dst, .. } => {
            let s = open_source(src, r, remotes)?;
            let d = open_dest(dst, r, write, backup, remotes)?;
            if let (Some(sp), Some(dp)) = (&s.local, &d.local) {
                check_not_inside(sp, dp)?;
            }
            // A single file synced onto a directory goes inside it, as with
            // rsync; it never replaces the directory.
            let dst_rel = match &s.name {
                Some(name) if !s.is_dir && dst_is_dir(&d) => name.clone(),
                _ => PathBuf::new(),
            };
            let dst_name = match (&d.local, &d.remote) {
                (Some(p), _) => resolved(p).file_name().map(PathBuf::from),
                (None, Some(r)) => Some(net::remote_name(r.spec())),
                _ => None,
            };
            let renamed = match &s.name {
                Some(name) if s.is_dir && !s.slash && dst_is_dir(&d) && dst_name.as_ref() != Some(name) => {
                    Some((src.to_string_lossy().into_owned(), d.shown.clone(), name.clone()))
                }
                _ => None,
            };
            let mut plan = Plan::new(d, vec![(Root { src: s.ep, dst_rel }, s.remote)]);
            plan.renamed = renamed;
            Ok(plan)
        }
        Command::Check { src, dst, .. } => {
            let s = open_source(src, r, remotes)?;
            let d = open_dest(dst, r, false, None, remotes)?;
            if d.root.is_none() {
                bail!("destination {}: no such file or directory", d.shown);
            }
            let root = Root {
                src: s.ep,
                dst_rel: PathBuf::new(),
            };
            Ok(Plan::new(d, vec![(root, s.remote)]))
        }
        _ => bail!("not a transfer"),
    }
}
