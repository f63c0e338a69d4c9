//! `tern mount` and `tern unmount`: the CLI's side of tern-mount.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{Exit, MountArgs};
use crate::net::{self, Role};
use crate::UsageError;

/// The variable that tells a `--daemon` child which descriptor to report
/// on once mounted.
const READY_FD: &str = "TERN_MOUNT_READY_FD";

/// `--daemon`: the same command again, detached in its own session, its
/// output to a log; returns once it says it is mounted (or why not).
fn detach(a: &MountArgs) -> anyhow::Result<Exit> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    let log_dir = match &a.staging_dir {
        Some(d) => d.clone(),
        None => default_staging()?,
    };
    std::fs::create_dir_all(&log_dir).with_context(|| format!("{}: create", log_dir.display()))?;
    let log_path = log_dir.join("mount.log");
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .with_context(|| format!("{}: open", log_path.display()))?;
    let (mut ours, theirs) = std::os::unix::net::UnixStream::pair()?;
    let fd = theirs.as_raw_fd();
    let args: Vec<std::ffi::OsString> = std::env::args_os().skip(1).filter(|x| x != "--daemon").collect();
    let mut child = std::process::Command::new(std::env::current_exe()?);
    child
        .args(args)
        .env(READY_FD, fd.to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(log);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        child.pre_exec(move || {
            if libc::setsid() < 0 || libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let pid = child.spawn()?.id();
    drop(theirs);
    let mut said = String::new();
    ours.read_to_string(&mut said)?;
    match said.strip_prefix("ok") {
        Some(_) => {
            eprintln!(
                "tern: mounted on {} (pid {pid}, log {}); `tern unmount {}` to stop",
                a.dir.display(),
                log_path.display(),
                a.dir.display()
            );
            Ok(Exit::Ok)
        }
        None if said.is_empty() => anyhow::bail!("the mount ended before it was in place; see {}", log_path.display()),
        None => anyhow::bail!("{}", said.trim_start_matches("error: ")),
    }
}

/// The descriptor a `--daemon` parent waits on, if this is its child.
fn ready_pipe() -> Option<std::os::unix::net::UnixStream> {
    use std::os::fd::FromRawFd;
    let fd: i32 = std::env::var(READY_FD).ok()?.parse().ok()?;
    std::env::remove_var(READY_FD);
    // SAFETY: the parent passed this descriptor open for this process.
    Some(unsafe { std::os::unix::net::UnixStream::from_raw_fd(fd) })
}

/// Mounts and serves until unmounted or signalled.
pub fn run(a: &MountArgs) -> anyhow::Result<Exit> {
    if a.daemon {
        return detach(a);
    }
    let ready = std::sync::Mutex::new(ready_pipe());
    let r = serve(a, &ready);
    if let (Err(e), Some(mut p)) = (&r, ready.lock().ok().and_then(|mut p| p.take())) {
        let _ = std::io::Write::write_all(&mut p, format!("error: {e:#}").as_bytes());
    }
    r
}

fn serve(a: &MountArgs, ready: &std::sync::Mutex<Option<std::os::unix::net::UnixStream>>) -> anyhow::Result<Exit> {
    let arg = a.remote.to_str().context("the remote is not UTF-8")?;
    let spec = match tern_net::url::parse(arg) {
        Some(s) => s?,
        None => {
            return Err(UsageError(format!(
                "`{arg}`: tern mounts a daemon's module: tern://HOST[:PORT]/MODULE[/PATH] or HOST:MODULE[/PATH]"
            ))
            .into())
        }
    };
    if !(a.attr_timeout >= 0.0 && a.attr_timeout <= 86_400.0) {
        return Err(UsageError(format!("--attr-timeout {}: give 0 to 86400 seconds", a.attr_timeout)).into());
    }
    let mut r = a.remote_args.clone();
    r.timeout.get_or_insert(30);
    // Writable unless asked otherwise or the daemon says no.
    let mut write = !a.read_only;
    let first = match net::connect(&spec, &r, Role::Dest, write) {
        Err(e) if write && refused_write(&e) => {
            eprintln!("tern: {e:#}; mounting read-only");
            write = false;
            net::connect(&spec, &r, Role::Source, false)?
        }
        other => other?,
    };
    // One directory per mounted tree: a later mount of the same tree finds
    // what this one could not upload.
    let tree = blake3::hash(spec.display().as_bytes()).to_hex();
    let staging = match (&a.staging_dir, write) {
        (_, false) => None,
        (Some(d), true) => Some(d.join(&tree[..16])),
        (None, true) => Some(default_staging()?.join(&tree[..16])),
    };
    let cache = a.cache_dir.as_ref().map(|d| d.join(&tree[..16]));
    // Files inside the mount would be written through it.
    for (d, what, flag) in [(&staging, "staging", "--staging-dir"), (&cache, "cache", "--cache-dir")] {
        if let Some(d) = d {
            if resolved(d).starts_with(resolved(&a.dir)) {
                return Err(UsageError(format!(
                    "the {what} directory {} is inside the mount point {}; give {flag} elsewhere",
                    d.display(),
                    a.dir.display()
                ))
                .into());
            }
        }
    }
    let opts = tern_mount::MountOptions {
        attr_timeout: Duration::from_secs_f64(a.attr_timeout),
        source: format!("tern:{}", spec.display()),
        staging,
        write_back: a.write_back,
        allow_other: a.allow_other,
        cache: cache.map(|d| (d, a.cache_size)),
        ..Default::default()
    };
    let stop = Arc::new(tern_mount::Stopper::default());
    let on_signal = stop.clone();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let mut term = {
        let _enter = rt.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing signal handler")?
    };
    std::thread::Builder::new().name("tern-signals".into()).spawn(move || {
        rt.block_on(async {
            tokio::select! {
                _ = tokio::signal::ctrl_c() => {}
                _ = term.recv() => {}
            }
        });
        if let Err(e) = on_signal.stop() {
            eprintln!("tern: unmounting: {e}");
        }
    })?;
    // The first connection is the one made above; later ones reconnect.
    let first = std::sync::Mutex::new(Some(first));
    let role = if write { Role::Dest } else { Role::Source };
    let connect: tern_mount::Connect = Box::new(move || {
        if let Some(ep) = first.lock().ok().and_then(|mut f| f.take()) {
            return Ok(ep);
        }
        net::connect(&spec, &r, role, write).map_err(|e| tern_core::Error::Other {
            path: Default::default(),
            message: format!("{e:#}"),
        })
    });
    eprintln!(
        "tern: mounting {arg} on {} ({}); Ctrl-C or `tern unmount {}` to stop",
        a.dir.display(),
        if write { "read-write" } else { "read-only" },
        a.dir.display()
    );
    tern_mount::mount(connect, &a.dir, &opts, &stop, || {
        if let Some(mut p) = ready.lock().ok().and_then(|mut p| p.take()) {
            let _ = std::io::Write::write_all(&mut p, b"ok");
        }
    })?;
    Ok(Exit::Ok)
}

/// `p` absolute with its symlinks resolved as far as it exists.
fn resolved(p: &Path) -> std::path::PathBuf {
    let abs = std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf());
    let mut existing = abs.clone();
    let mut rest = Vec::new();
    while !existing.exists() {
        match (existing.file_name().map(|n| n.to_os_string()), existing.parent()) {
            (Some(n), Some(parent)) => {
                rest.push(n);
                existing = parent.to_path_buf();
            }
            _ => return abs,
        }
    }
    let mut out = std::fs::canonicalize(&existing).unwrap_or(existing);
    out.extend(rest.iter().rev());
    out
}

/// A login refused only because it asked to write.
fn refused_write(e: &anyhow::Error) -> bool {
    let m = format!("{e:#}");
    m.contains("is read-only") || m.contains("may only read")
}

/// `$XDG_CACHE_HOME/tern/mount`, or `~/.cache/tern/mount`.
fn default_staging() -> anyhow::Result<std::path::PathBuf> {
    let base = match (std::env::var_os("XDG_CACHE_HOME"), std::env::var_os("HOME")) {
        (Some(x), _) if !x.is_empty() => std::path::PathBuf::from(x),
        (_, Some(h)) if !h.is_empty() => std::path::PathBuf::from(h).join(".cache"),
        _ => anyhow::bail!("no $HOME or $XDG_CACHE_HOME for the staging directory; give --staging-dir"),
    };
    Ok(base.join("tern").join("mount"))
}

/// Unmounts `dir`.
pub fn unmount(dir: &Path) -> anyhow::Result<Exit> {
    if !tern_mount::is_mounted(dir) {
        eprintln!("tern: {}: not a mounted FUSE file system", dir.display());
        return Ok(Exit::Fatal);
    }
    tern_mount::unmount(dir).with_context(|| format!("{}: unmount", dir.display()))?;
    Ok(Exit::Ok)
}
