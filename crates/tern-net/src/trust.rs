//! Knowing the server: a known-hosts file of pinned fingerprints, like SSH's.
//!
//! Each line is `HOST:PORT FINGERPRINT`; `#` starts a comment.

use std::fs;
use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};

use crate::error::{NetError, Result};

/// How to decide about a server whose key is not pinned yet.
#[derive(Debug, Clone)]
pub struct TrustPolicy {
    /// The fingerprint the user expects (`--fingerprint`), if any: it alone
    /// decides, and the known-hosts file is not consulted or changed.
    pub fingerprint: Option<String>,
    /// Pin a new host's key without asking (`--accept-new-host`).
    pub accept_new: bool,
    /// The known-hosts file.
    pub known_hosts: PathBuf,
}

/// tern's configuration directory: `$TERN_CONFIG_DIR`, else
/// `$XDG_CONFIG_HOME/tern`, else `~/.config/tern`.
pub fn config_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_CONFIG_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_CONFIG_HOME") {
        return PathBuf::from(d).join("tern");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".config/tern")
}

fn lookup(file: &Path, host: &str) -> Result<Option<(String, usize)>> {
    let f = match fs::File::open(file) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(NetError::Config(format!("{}: {e}", file.display()))),
    };
    for (n, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| NetError::Config(format!("{}: {e}", file.display())))?;
        let mut parts = line.split_whitespace();
        if let (Some(h), Some(fp)) = (parts.next(), parts.next()) {
            if !h.starts_with('#') && h == host {
                return Ok(Some((fp.to_string(), n + 1)));
            }
        }
    }
    Ok(None)
}

fn append(file: &Path, host: &str, fp: &str) -> Result<()> {
    if let Some(dir) = file.parent() {
        fs::create_dir_all(dir).map_err(|e| NetError::Config(format!("{}: {e}", dir.display())))?;
    }
    let mut f = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .map_err(|e| NetError::Config(format!("{}: {e}", file.display())))?;
    writeln!(f, "{host} {fp}").map_err(|e| NetError::Config(format!("{}: {e}", file.display())))
}

/// Decides whether the server at `host` (as `HOST:PORT`) presenting `fp` is
/// trusted; pins it on first use when the policy or the user allows.
pub fn check(policy: &TrustPolicy, host: &str, fp: &str) -> Result<()> {
    if let Some(want) = &policy.fingerprint {
        let want = crate::identity::normalize_fingerprint(want)?;
        if want != fp {
            return Err(NetError::Trust(format!(
                "the server at {host} presented key {fp}, not the expected {want} (--fingerprint): refusing to connect"
            )));
        }
        return Ok(());
    }
    match lookup(&policy.known_hosts, host)? {
        Some((known, _)) if known == fp => Ok(()),
        Some((known, line)) => Err(NetError::Trust(format!(
            "THE SERVER'S KEY HAS CHANGED: {host} now presents {fp}, but {}:{line} pins {known}. \
             Someone may be intercepting the connection, or the daemon's state directory was reset. \
             If you trust the new key, delete that line and connect again.",
            policy.known_hosts.display()
        ))),
        None => {
            let ok = policy.accept_new || ask(host, fp)?;
            if !ok {
                return Err(NetError::Trust(format!(
                    "{host} is not a known host (its key is {fp}). Pass --accept-new-host to trust it on first use, \
                     or --fingerprint {fp} if that is the key the daemon printed"
                )));
            }
            append(&policy.known_hosts, host, fp)?;
            tracing::info!(%host, fingerprint = %fp, file = %policy.known_hosts.display(), "pinned a new host key");
            Ok(())
        }
    }
}

/// Asks on the terminal, if there is one.
fn ask(host: &str, fp: &str) -> Result<bool> {
    let stdin = std::io::stdin();
    if !stdin.is_terminal() || !std::io::stderr().is_terminal() {
        return Ok(false);
    }
    eprint!(
        "The tern daemon at {host} is not known yet.\nIts key fingerprint is {fp}.\nTrust it and remember it? [y/N] "
    );
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer)?;
    Ok(matches!(answer.trim(), "y" | "Y" | "yes" | "YES" | "Yes"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_use_pins_then_a_change_is_refused() {
        let d = tempfile::tempdir().expect("tempdir");
        let kh = d.path().join("known_hosts");
        let a = format!("b3:{}", "a".repeat(64));
        let b = format!("b3:{}", "b".repeat(64));
        let mut p = TrustPolicy {
            fingerprint: None,
            accept_new: false,
            known_hosts: kh.clone(),
        };
        let e = check(&p, "h:1", &a).expect_err("unknown host without consent");
        assert!(e.to_string().contains("--accept-new-host"), "{e}");
        p.accept_new = true;
        check(&p, "h:1", &a).expect("pinned");
        check(&p, "h:1", &a).expect("known");
        let e = check(&p, "h:1", &b).expect_err("changed key");
        assert!(e.to_string().contains("KEY HAS CHANGED"), "{e}");
        check(&p, "h:2", &b).expect("another port is another host");
        p.fingerprint = Some(b.to_uppercase());
        check(&p, "h:1", &b).expect("explicit fingerprint decides");
        let e = check(&p, "h:1", &a).expect_err("mismatch with --fingerprint");
        assert!(e.to_string().contains("not the expected"), "{e}");
    }
}
