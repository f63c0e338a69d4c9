//! The client's credentials file: a token for each daemon, or each module
//! of one, so that a command naming two daemons gives each its own.
//!
//! `credentials` in the client's configuration directory (beside
//! `known_hosts`), one entry a line, `#` starting a comment:
//!
//! ```text
//! nas.example:7373/photos   TOKEN
//! nas.example               TOKEN
//! ```
//!
//! For a daemon and module the most specific entry wins: `HOST:PORT/MODULE`,
//! then `HOST:PORT`, then `HOST/MODULE`, then `HOST`. Like an ssh key, the
//! file is refused when others may read it.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use anyhow::{bail, Context};
use tern_net::url::RemoteSpec;

/// The token the file at `path` holds for `spec`'s daemon and module; None
/// when there is no file or no entry for it.
pub fn lookup(path: &Path, spec: &RemoteSpec) -> anyhow::Result<Option<String>> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("{}: cannot read", path.display())),
    };
    let md = std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if md.mode() & 0o077 != 0 {
        bail!(
            "{}: others may read this file of tokens (mode {:o}); run `chmod 600 {}`",
            path.display(),
            md.mode() & 0o777,
            path.display()
        );
    }
    best(&text, spec).map_err(|(line, why)| anyhow::anyhow!("{}:{line}: {why}", path.display()))
}

/// The token of the most specific entry of `text` for `spec`.
fn best(text: &str, spec: &RemoteSpec) -> Result<Option<String>, (usize, String)> {
    let mut found: Option<(u8, String)> = None;
    for (i, line) in text.lines().enumerate() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(key), Some(token), None) = (fields.next(), fields.next(), fields.next()) else {
            return Err((i + 1, "expected `HOST[:PORT][/MODULE] TOKEN`".into()));
        };
        let (host, port, module) =
            parse_key(key).ok_or_else(|| (i + 1, format!("`{key}` is not HOST[:PORT][/MODULE]")))?;
        let fits = host.eq_ignore_ascii_case(&spec.host)
            && port.is_none_or(|p| p == spec.port)
            && module.is_none_or(|m| m == spec.module);
        if !fits {
            continue;
        }
        let rank = u8::from(port.is_some()) * 2 + u8::from(module.is_some());
        if found.as_ref().is_none_or(|(r, _)| rank > *r) {
            found = Some((rank, token.to_string()));
        }
    }
    Ok(found.map(|(_, t)| t))
}

/// `HOST[:PORT][/MODULE]`, IPv6 hosts in brackets.
fn parse_key(key: &str) -> Option<(&str, Option<u16>, Option<&str>)> {
    let (addr, module) = match key.split_once('/') {
        Some((a, m)) if !m.is_empty() && !m.contains('/') => (a, Some(m)),
        Some(_) => return None,
        None => (key, None),
    };
    let (host, port) = if let Some(rest) = addr.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        match after.strip_prefix(':') {
            Some(p) => (h, Some(p.parse().ok()?)),
            None if after.is_empty() => (h, None),
            None => return None,
        }
    } else {
        match addr.rsplit_once(':') {
            Some((h, p)) if !h.contains(':') => (h, Some(p.parse().ok()?)),
            _ => (addr, None),
        }
    };
    (!host.is_empty()).then_some((host, port, module))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(host: &str, port: u16, module: &str) -> RemoteSpec {
        RemoteSpec {
            host: host.into(),
            port,
            module: module.into(),
            path: Default::default(),
            trailing_slash: false,
        }
    }

    #[test]
    fn the_most_specific_entry_wins_and_others_are_not_used() {
        let text = "\
# comment
nas              t-host
nas/photos       t-host-module
nas:7000         t-port   # trailing comment
nas:7000/photos  t-port-module
[::1]:9          t-v6
";
        let got = |h, p, m| best(text, &spec(h, p, m)).expect("parses");
        assert_eq!(got("nas", 7000, "photos").as_deref(), Some("t-port-module"));
        assert_eq!(got("NAS", 7000, "music").as_deref(), Some("t-port"));
        assert_eq!(got("nas", 7373, "photos").as_deref(), Some("t-host-module"));
        assert_eq!(got("nas", 7373, "music").as_deref(), Some("t-host"));
        assert_eq!(got("::1", 9, "x").as_deref(), Some("t-v6"));
        assert_eq!(got("other", 7000, "photos"), None);
    }

    #[test]
    fn a_bad_line_is_named_and_a_readable_file_refused() {
        assert_eq!(
            best("ok t\nnas:xx/m t\n", &spec("nas", 1, "m")).map_err(|e| e.0),
            Err(2)
        );
        assert_eq!(best("nas\n", &spec("nas", 1, "m")).map_err(|e| e.0), Err(1));
        let d = tempfile::tempdir().expect("tempdir");
        let p = d.path().join("credentials");
        std::fs::write(&p, "nas t\n").expect("write");
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = lookup(&p, &spec("nas", 1, "m"))
            .expect_err("readable by others")
            .to_string();
        assert!(e.contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(lookup(&p, &spec("nas", 1, "m")).expect("private").as_deref(), Some("t"));
        assert_eq!(
            lookup(&d.path().join("none"), &spec("nas", 1, "m")).expect("no file"),
            None
        );
    }
}
