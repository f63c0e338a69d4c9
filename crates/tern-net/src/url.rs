//! Remote endpoint syntax: `tern://HOST[:PORT]/MODULE[/PATH]` and the short
//! `HOST:MODULE[/PATH]` (or `HOST:PORT:MODULE[/PATH]`); IPv6 literals in
//! brackets. A local path containing `:` is written `./x:y`.

use std::path::PathBuf;

use crate::config::DEFAULT_PORT;
use crate::error::{NetError, Result};

/// A parsed remote location.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteSpec {
    /// Host name or IP literal (without brackets).
    pub host: String,
    /// Port.
    pub port: u16,
    /// Module name.
    pub module: String,
    /// Path inside the module (empty for its root).
    pub path: PathBuf,
    /// The argument ended in `/` (copy a directory's contents).
    pub trailing_slash: bool,
}

impl RemoteSpec {
    /// `HOST:PORT`, with brackets around IPv6 literals: the key in the
    /// known-hosts file, and what is resolved to connect.
    pub fn authority(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }

    /// How the location is shown in messages.
    pub fn display(&self) -> String {
        let p = self.path.display().to_string();
        if p.is_empty() {
            format!("{}:{}", self.authority(), self.module)
        } else {
            format!("{}:{}/{p}", self.authority(), self.module)
        }
    }
}

/// `None` if `arg` is a local path; else the remote location it names.
pub fn parse(arg: &str) -> Option<Result<RemoteSpec>> {
    parse_any(arg, true)
}

/// As [`parse`], but a daemon named without a module (`tern://HOST[:PORT]/`,
/// `HOST:` or `HOST:PORT:`) is taken too, with an empty module: what
/// `tern ls` lists the modules of.
pub fn parse_daemon(arg: &str) -> Option<Result<RemoteSpec>> {
    parse_any(arg, false)
}

fn parse_any(arg: &str, need_module: bool) -> Option<Result<RemoteSpec>> {
    if let Some(rest) = arg.strip_prefix("tern://") {
        return Some(parse_url(arg, rest, need_module));
    }
    // Local unless a `:` comes before any `/`.
    let colon = arg.find(':')?;
    if arg[..colon].contains('/') && !arg.starts_with('[') {
        return None;
    }
    Some(parse_short(arg, need_module))
}

fn bad(arg: &str, why: &str) -> NetError {
    NetError::Config(format!(
        "`{arg}`: {why} (expected tern://HOST[:PORT]/MODULE/PATH or HOST:MODULE/PATH; write a local path with a colon as ./{arg})"
    ))
}

/// `HOST`, `HOST:PORT`, `[V6]`, `[V6]:PORT` or a bare IPv6 address, as
/// the host (brackets removed) and the port as written, if there is one;
/// `None` for an unclosed `[` or anything but a port after the `]`.
pub fn split_authority(a: &str) -> Option<(&str, Option<&str>)> {
    if let Some(rest) = a.strip_prefix('[') {
        let (h, after) = rest.split_once(']')?;
        return match after.strip_prefix(':') {
            Some(p) => Some((h, Some(p))),
            None if after.is_empty() => Some((h, None)),
            None => None,
        };
    }
    Some(match a.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => (h, Some(p)),
        _ => (a, None),
    })
}

/// The host (brackets removed) and what follows it.
fn split_host<'a>(arg: &str, s: &'a str) -> Result<(String, &'a str)> {
    if let Some(r) = s.strip_prefix('[') {
        let (host, rest) = r.split_once(']').ok_or_else(|| bad(arg, "unclosed `[`"))?;
        return Ok((host.to_string(), rest));
    }
    let end = s.find([':', '/']).unwrap_or(s.len());
    Ok((s[..end].to_string(), &s[end..]))
}

fn module_and_path(arg: &str, s: &str, need_module: bool) -> Result<(String, PathBuf, bool)> {
    let s = s.trim_start_matches('/');
    let (module, path) = s.split_once('/').unwrap_or((s, ""));
    if module.is_empty() && !need_module {
        return Ok((String::new(), PathBuf::new(), true));
    }
    if module.is_empty() {
        return Err(bad(arg, "no module named"));
    }
    let trailing = path.ends_with('/') || (path.is_empty() && s.ends_with('/'));
    let clean: PathBuf = path.split('/').filter(|c| !c.is_empty() && *c != ".").collect();
    if clean.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(bad(arg, "`..` is not allowed in a remote path"));
    }
    Ok((module.to_string(), clean, trailing))
}

fn port(arg: &str, p: &str) -> Result<u16> {
    p.parse().map_err(|_| bad(arg, "bad port number"))
}

fn parse_url(arg: &str, rest: &str, need_module: bool) -> Result<RemoteSpec> {
    let (host, after) = split_host(arg, rest)?;
    let (port, after) = match after.strip_prefix(':') {
        Some(a) => {
            let end = a.find('/').unwrap_or(a.len());
            (port(arg, &a[..end])?, &a[end..])
        }
        None => (DEFAULT_PORT, after),
    };
    if host.is_empty() {
        return Err(bad(arg, "no host"));
    }
    if !after.starts_with('/') && (need_module || !after.is_empty()) {
        return Err(bad(arg, "no module named"));
    }
    let (module, path, trailing_slash) = module_and_path(arg, after, need_module)?;
    Ok(RemoteSpec {
        host,
        port,
        module,
        path,
        trailing_slash,
    })
}

fn parse_short(arg: &str, need_module: bool) -> Result<RemoteSpec> {
    let (host, after) = split_host(arg, arg)?;
    let after = after
        .strip_prefix(':')
        .ok_or_else(|| bad(arg, "expected `:` after the host"))?;
    if host.is_empty() {
        return Err(bad(arg, "no host"));
    }
    // HOST:PORT:MODULE/PATH
    let (port, after) = match after.split_once(':') {
        Some((p, a)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (port(arg, p)?, a),
        _ => (DEFAULT_PORT, after),
    };
    let (module, path, trailing_slash) = module_and_path(arg, after, need_module)?;
    Ok(RemoteSpec {
        host,
        port,
        module,
        path,
        trailing_slash,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(s: &str) -> RemoteSpec {
        parse(s).expect("remote").expect("valid")
    }

    #[test]
    fn both_forms_and_ipv6_parse() {
        let a = ok("tern://example.org:9000/data/a/b");
        assert_eq!(
            (a.host.as_str(), a.port, a.module.as_str()),
            ("example.org", 9000, "data")
        );
        assert_eq!(a.path, PathBuf::from("a/b"));
        assert!(!a.trailing_slash);
        let b = ok("example.org:data/a/b/");
        assert_eq!((b.port, b.module.as_str()), (DEFAULT_PORT, "data"));
        assert!(b.trailing_slash);
        let c = ok("tern://[::1]:7000/m");
        assert_eq!(
            (c.host.as_str(), c.port, c.path.as_os_str().is_empty()),
            ("::1", 7000, true)
        );
        assert_eq!(c.authority(), "[::1]:7000");
        let d = ok("[::1]:m/x");
        assert_eq!((d.host.as_str(), d.module.as_str()), ("::1", "m"));
        let e = ok("h:8000:m/x");
        assert_eq!((e.port, e.module.as_str()), (8000, "m"));
        let f = ok("h:m/");
        assert!(f.trailing_slash && f.path.as_os_str().is_empty());
        assert!(!ok("h:m").trailing_slash);
    }

    #[test]
    fn a_daemon_without_a_module_parses_only_where_asked() {
        for (arg, port) in [
            ("tern://h", DEFAULT_PORT),
            ("tern://h/", DEFAULT_PORT),
            ("tern://h:9/", 9),
            ("h:", DEFAULT_PORT),
            ("h:9:", 9),
        ] {
            let d = parse_daemon(arg).expect("remote").expect("valid");
            assert_eq!((d.host.as_str(), d.port, d.module.as_str()), ("h", port, ""), "{arg}");
            assert!(parse(arg).expect("remote").is_err(), "{arg}");
        }
        let m = parse_daemon("tern://h/m/x").expect("remote").expect("valid");
        assert_eq!((m.module.as_str(), m.path.as_path()), ("m", std::path::Path::new("x")));
        assert!(parse_daemon("tern://h:x/").expect("remote").is_err());
        assert!(parse_daemon("./h:").is_none());
    }

    #[test]
    fn local_paths_and_bad_remotes() {
        for local in ["./x:y", "/abs/x:y", "plain", "dir/sub:file"] {
            assert!(parse(local).is_none(), "{local}");
        }
        for bad in [
            "tern://h:70000/m",
            "tern://h",
            "tern:///m",
            "h:",
            "tern://[::1/m",
            "h:m/../x",
        ] {
            assert!(parse(bad).expect("remote").is_err(), "{bad}");
        }
    }
}
