//! The client's defaults file: options a user always wants, as they would
//! be typed, in `defaults` in the configuration directory (beside
//! `credentials` and `known_hosts`):
//!
//! ```text
//! # copy and sync
//! --transport tcp --bwlimit 50M
//! --exclude .cache/
//! sync: --delete
//! check: -j 4
//! ```
//!
//! A line without a prefix applies to `copy` and `sync`; `copy:`, `sync:`,
//! `check:`, `ls:` and `bench:` to that command alone. Words are split at
//! whitespace, `#` starts a comment. The options go before the command
//! line's, so what is typed wins (filter rules from here are tried first).

use std::ffi::OsString;
use std::path::Path;

/// `args` (the program's, from `argv[0]`) with the defaults in `file`
/// for its command put just after the command's name; as they are when
/// there is no file or no line for the command.
pub fn apply(args: Vec<OsString>, file: &Path) -> Vec<OsString> {
    let Some(cmd) = args.get(1).and_then(|c| c.to_str()).map(str::to_string) else {
        return args;
    };
    if !["copy", "sync", "check", "ls", "bench"].contains(&cmd.as_str()) {
        return args;
    }
    let Ok(text) = std::fs::read_to_string(file) else {
        return args;
    };
    let words = words_for(&text, &cmd);
    if words.is_empty() {
        return args;
    }
    let mut out = Vec::with_capacity(args.len() + words.len());
    out.extend(args[..2].iter().cloned());
    out.extend(words.into_iter().map(OsString::from));
    out.extend(args[2..].iter().cloned());
    out
}

/// The words of `text`'s lines that apply to `cmd`.
fn words_for(text: &str, cmd: &str) -> Vec<String> {
    let mut words = Vec::new();
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        let (only, rest) = match line.split_once(':') {
            Some((c, rest)) if !c.contains(char::is_whitespace) && !c.starts_with('-') => (Some(c.trim()), rest),
            _ => (None, line),
        };
        let applies = match only {
            Some(c) => c == cmd,
            None => cmd == "copy" || cmd == "sync",
        };
        if applies {
            words.extend(rest.split_whitespace().map(str::to_string));
        }
    }
    words
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_apply_to_their_command_and_the_command_line_comes_last() {
        let text = "# mine\n--transport tcp   --bwlimit 5M\nsync: --delete # always\ncheck: -j 2\n\n";
        assert_eq!(words_for(text, "copy"), ["--transport", "tcp", "--bwlimit", "5M"]);
        assert_eq!(
            words_for(text, "sync"),
            ["--transport", "tcp", "--bwlimit", "5M", "--delete"]
        );
        assert_eq!(words_for(text, "check"), ["-j", "2"]);
        assert!(words_for(text, "ls").is_empty());
        let d = tempfile::tempdir().expect("tempdir");
        let f = d.path().join("defaults");
        std::fs::write(&f, text).expect("write");
        let args: Vec<OsString> = ["tern", "copy", "-j", "3", "a", "b"]
            .iter()
            .map(OsString::from)
            .collect();
        let got: Vec<String> = apply(args.clone(), &f)
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "tern",
                "copy",
                "--transport",
                "tcp",
                "--bwlimit",
                "5M",
                "-j",
                "3",
                "a",
                "b"
            ]
        );
        // Other commands, and no file, leave the arguments alone.
        let serve: Vec<OsString> = ["tern", "serve"].iter().map(OsString::from).collect();
        assert_eq!(apply(serve.clone(), &f), serve);
        assert_eq!(apply(args.clone(), &d.path().join("none")), args);
    }
}
