//! `tern mount` and `tern unmount`: the CLI's side of tern-mount.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;

use crate::cli::{Exit, MountArgs};
use crate::net::{self, Role};
use crate::UsageError;

/// Mounts and serves until unmounted or signalled.
pub fn run(a: &MountArgs) -> anyhow::Result<Exit> {
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
    let staging = match (&a.staging_dir, write) {
        (_, false) => None,
        (Some(d), true) => Some(d.clone()),
        (None, true) => Some(default_staging()?),
    };
    let opts = tern_mount::MountOptions {
        attr_timeout: Duration::from_secs_f64(a.attr_timeout),
        source: format!("tern:{}", spec.display()),
        staging,
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
    tern_mount::mount(connect, &a.dir, &opts, &stop)?;
    Ok(Exit::Ok)
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
