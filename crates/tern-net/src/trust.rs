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
             If you trust the new key, run `tern forget-host {host}` and connect again.",
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

/// Removes the pinned keys of `host` from the known-hosts file `file`:
/// `HOST:PORT` that entry alone, `HOST` the entries of every port. The file
/// is replaced atomically, comments and other entries kept. Returns the
/// lines removed.
pub fn forget(file: &Path, host: &str) -> Result<Vec<String>> {
    let err = |e: std::io::Error| NetError::Config(format!("{}: {e}", file.display()));
    let text = match fs::read_to_string(file) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(err(e)),
    };
    fn split(a: &str) -> (&str, Option<&str>) {
        crate::url::split_authority(a).unwrap_or((a, None))
    }
    let (want_host, want_port) = split(host);
    let matches = |entry: &str| {
        let (h, p) = split(entry);
        h == want_host && (want_port.is_none() || p == want_port)
    };
    let (mut kept, mut gone) = (String::new(), Vec::new());
    for line in text.lines() {
        let entry = line.split_whitespace().next().unwrap_or("");
        if !entry.starts_with('#') && !entry.is_empty() && matches(entry) {
            gone.push(line.to_string());
        } else {
            kept.push_str(line);
            kept.push('\n');
        }
    }
    if !gone.is_empty() {
        let tmp = file.with_extension("tmp");
        fs::write(&tmp, kept).map_err(err)?;
        fs::rename(&tmp, file).map_err(err)?;
    }
    Ok(gone)
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
    fn forgetting_a_host_removes_its_entries_only() {
        let d = tempfile::tempdir().expect("tempdir");
        let kh = d.path().join("known_hosts");
        let text = "# pinned\nnas:7373 aaa\nnas:9000 bbb\nnasty:7373 ccc\n[::1]:7373 ddd\n10.0.0.1:7373 eee\n";
        fs::write(&kh, text).expect("write");
        assert_eq!(forget(&kh, "nas:9000").expect("forget"), ["nas:9000 bbb"]);
        assert_eq!(forget(&kh, "nas").expect("forget"), ["nas:7373 aaa"]);
        assert_eq!(forget(&kh, "::1").expect("forget"), ["[::1]:7373 ddd"]);
        assert!(forget(&kh, "nas").expect("forget").is_empty());
        assert_eq!(
            fs::read_to_string(&kh).expect("read"),
            "# pinned\nnasty:7373 ccc\n10.0.0.1:7373 eee\n"
        );
        assert!(forget(&d.path().join("none"), "x").expect("no file").is_empty());
    }

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
