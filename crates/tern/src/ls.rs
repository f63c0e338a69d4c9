//! `tern ls`: what a local path or a daemon's path holds, listed as
//! `ls` and `rsync --list-only` users expect.

use std::io::Write;
use std::path::{Path, PathBuf};

use tern_core::{Entry, Kind, Source};

/// Lists `ep`'s root into `out`: a file as itself, a directory's entries
/// (all beneath it with `recursive`), directories with a trailing `/`;
/// with `long`, permissions, size and modification time (UTC) too.
/// Names are escaped ([`escape`]) so that every line is one entry. Returns
/// how many directories could not be listed (each reported on stderr).
/// `name` is what a file given as the path is listed as.
pub fn list(ep: &dyn Source, name: &Path, long: bool, recursive: bool, out: &mut dyn Write) -> anyhow::Result<u64> {
    let root = ep
        .stat(Path::new(""))?
        .ok_or_else(|| anyhow::anyhow!("{}: no such file or directory", ep.describe(Path::new(""))))?;
    if root.kind != Kind::Dir {
        line(out, &root, name, long)?;
        return Ok(0);
    }
    let mut failed = 0;
    // Depth-first, each directory's contents right after it, in name order.
    let mut stack: Vec<(PathBuf, std::vec::IntoIter<Entry>)> = Vec::new();
    let open = |dir: PathBuf, failed: &mut u64| match ep.read_dir(&dir) {
        Ok(v) => Some((dir, v.into_iter())),
        Err(e) => {
            eprintln!("tern: {e}");
            *failed += 1;
            None
        }
    };
    stack.extend(open(PathBuf::new(), &mut failed));
    while let Some((dir, entries)) = stack.last_mut() {
        let Some(e) = entries.next() else {
            stack.pop();
            continue;
        };
        let rel = dir.join(&e.name);
        line(out, &e, &rel, long)?;
        if recursive && e.kind == Kind::Dir {
            stack.extend(open(rel, &mut failed));
        }
    }
    Ok(failed)
}

/// A daemon's modules, one a line: the name, `rw` or `ro` for what this
/// client may do there, and the module's comment.
pub fn modules(list: &[tern_proto::ModuleInfo], out: &mut dyn Write) -> std::io::Result<()> {
    let width = list
        .iter()
        .map(|m| escape(m.name.as_bytes()).chars().count())
        .max()
        .unwrap_or(0);
    for m in list {
        let access = if m.write { "rw" } else { "ro" };
        let line = format!(
            "{:<width$}  {access}  {}",
            escape(m.name.as_bytes()),
            escape(m.comment.as_bytes())
        );
        writeln!(out, "{}", line.trim_end())?;
    }
    Ok(())
}

fn line(out: &mut dyn Write, e: &Entry, rel: &Path, long: bool) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let mut name = escape(rel.as_os_str().as_bytes());
    if e.kind == Kind::Dir {
        name.push('/');
    }
    if let (Kind::Symlink, Some(t)) = (e.kind, &e.target) {
        if long {
            name = format!("{name} -> {}", escape(t.as_os_str().as_bytes()));
        }
    }
    match long {
        false => writeln!(out, "{name}"),
        true => writeln!(
            out,
            "{} {:>15} {} {name}",
            mode_string(e.kind, e.meta.mode),
            e.size,
            utc(e.meta.mtime.sec)
        ),
    }
}

/// A name as rsync prints it: bytes that are not printable UTF-8 (control
/// characters, invalid sequences) and the backslash as `\#` and three octal
/// digits, so a name with a newline stays on its line and the output parses.
pub fn escape(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len());
    for chunk in b.utf8_chunks() {
        for c in chunk.valid().chars() {
            if c.is_control() || c == '\\' {
                let mut buf = [0u8; 4];
                for byte in c.encode_utf8(&mut buf).bytes() {
                    s.push_str(&format!("\\#{byte:03o}"));
                }
            } else {
                s.push(c);
            }
        }
        for byte in chunk.invalid() {
            s.push_str(&format!("\\#{byte:03o}"));
        }
    }
    s
}

/// `drwxr-xr-x` and the like, setuid, setgid and sticky bits included.
fn mode_string(kind: Kind, mode: u32) -> String {
    let t = match kind {
        Kind::Dir => 'd',
        Kind::Symlink => 'l',
        Kind::File => '-',
        Kind::Special => '?',
    };
    let mut s = String::from(t);
    for (shift, special, set, unset) in [(6, 0o4000, 's', 'S'), (3, 0o2000, 's', 'S'), (0, 0o1000, 't', 'T')] {
        let bits = (mode >> shift) & 7;
        s.push(if bits & 4 != 0 { 'r' } else { '-' });
        s.push(if bits & 2 != 0 { 'w' } else { '-' });
        s.push(match (bits & 1 != 0, mode & special != 0) {
            (true, true) => set,
            (false, true) => unset,
            (true, false) => 'x',
            (false, false) => '-',
        });
    }
    s
}

/// `YYYY-MM-DD HH:MM:SS` in UTC for seconds since the epoch.
fn utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Howard Hinnant's civil_from_days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_escape_what_would_break_a_line() {
        assert_eq!(escape(b"plain name.txt"), "plain name.txt");
        assert_eq!(escape(b"new\nline"), "new\\#012line");
        assert_eq!(escape(b"back\\slash"), "back\\#134slash");
        assert_eq!(escape(b"bad-\xff-byte"), "bad-\\#377-byte");
        assert_eq!(escape("caf\u{e9}".as_bytes()), "caf\u{e9}");
    }

    #[test]
    fn modes_and_times_read_as_ls_prints_them() {
        assert_eq!(mode_string(Kind::Dir, 0o755), "drwxr-xr-x");
        assert_eq!(mode_string(Kind::File, 0o4754), "-rwsr-xr--");
        assert_eq!(mode_string(Kind::Dir, 0o1777), "drwxrwxrwt");
        assert_eq!(mode_string(Kind::File, 0o2640), "-rw-r-S---");
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_764_720_000), "2025-12-03 00:00:00");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00");
        assert_eq!(utc(-1), "1969-12-31 23:59:59");
    }
}
