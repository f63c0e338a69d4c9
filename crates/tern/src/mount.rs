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
    let opts = tern_mount::MountOptions {
        attr_timeout: Duration::from_secs_f64(a.attr_timeout),
        source: format!("tern:{}", spec.display()),
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
    let connect: tern_mount::Connect = Box::new(move || {
        net::connect(&spec, &r, Role::Source, false).map_err(|e| tern_core::Error::Other {
            path: Default::default(),
            message: format!("{e:#}"),
        })
    });
    eprintln!(
        "tern: mounting {arg} on {} (read-only); Ctrl-C or `tern unmount {}` to stop",
        a.dir.display(),
        a.dir.display()
    );
    tern_mount::mount(connect, &a.dir, &opts, &stop)?;
    Ok(Exit::Ok)
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
