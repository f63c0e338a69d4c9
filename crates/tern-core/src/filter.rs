//! Include/exclude rules with rsync's glob semantics.
//!
//! Rules are tried in order and the first that matches decides. A path that
//! no rule matches is included. Paths are relative to the transfer root, as
//! they will appear under the destination, and are matched as bytes, so
//! names that are not UTF-8 work too.
//!
//! Pattern rules, as in rsync:
//! - a leading `/` anchors the pattern at the transfer root;
//! - a trailing `/` makes it match directories only;
//! - a pattern with a `/` (other than a trailing one) or `**` is matched
//!   against the whole path (unanchored: against any trailing run of whole
//!   components); otherwise against the last component only;
//! - `*` matches within one component, `**` across components, `?` one
//!   byte other than `/`, `[...]` a class (`[!...]` or `[^...]` negated),
//!   `\` quotes the next byte;
//! - `dir/***` matches `dir` itself and everything beneath it.
//!
//! An excluded directory is not descended into, so everything under it is
//! excluded too.

use std::path::Path;

/// A malformed rule.
#[derive(Debug, thiserror::Error)]
pub enum FilterError {
    /// The pattern was empty.
    #[error("empty pattern")]
    Empty,
    /// A `[` class was never closed.
    #[error("unclosed '[' in pattern {0:?}")]
    UnclosedClass(String),
    /// A line of a rules file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        /// The rules file.
        path: std::path::PathBuf,
        /// Why.
        source: std::io::Error,
    },
}

#[derive(Debug, Clone, PartialEq)]
enum Tok {
    Byte(u8),
    AnyByte,
    Star,
    DoubleStar,
    Class { negated: bool, ranges: Vec<(u8, u8)> },
}

#[derive(Debug, Clone)]
struct Pattern {
    toks: Vec<Tok>,
    anchored: bool,
    dir_only: bool,
    full_path: bool,
}

/// One include or exclude rule.
#[derive(Debug, Clone)]
pub struct Rule {
    include: bool,
    pats: Vec<Pattern>,
    text: String,
    raw: Vec<u8>,
}

impl Rule {
    /// Parses an include (`include == true`) or exclude rule.
    pub fn new(pattern: &str, include: bool) -> Result<Rule, FilterError> {
        Self::from_bytes(pattern.as_bytes(), include)
    }

    /// Parses a rule given as raw bytes.
    pub fn from_bytes(pattern: &[u8], include: bool) -> Result<Rule, FilterError> {
        if pattern.is_empty() {
            return Err(FilterError::Empty);
        }
        let text = String::from_utf8_lossy(pattern).into_owned();
        let mut p = pattern;
        let dir_only = p.len() > 1 && p.ends_with(b"/");
        if dir_only {
            p = &p[..p.len() - 1];
        }
        let anchored = p.starts_with(b"/");
        if anchored {
            p = &p[1..];
        }
        let mut pats = Vec::new();
        if let Some(base) = p.strip_suffix(b"/***") {
            // `dir/***`: the directory itself and all beneath it.
            let mut all = base.to_vec();
            all.extend_from_slice(b"/**");
            pats.push(compile(base, anchored, dir_only, &text)?);
            pats.push(compile(&all, anchored, false, &text)?);
        } else {
            pats.push(compile(p, anchored, dir_only, &text)?);
        }
        Ok(Rule {
            include,
            pats,
            text,
            raw: pattern.to_vec(),
        })
    }

    /// Whether this is an include rule.
    pub fn is_include(&self) -> bool {
        self.include
    }

    /// The pattern as written.
    pub fn pattern(&self) -> &str {
        &self.text
    }

    /// The pattern's bytes as written (`pattern` is lossy for non-UTF-8).
    pub fn pattern_bytes(&self) -> &[u8] {
        &self.raw
    }

    fn matches(&self, path: &[u8], is_dir: bool) -> bool {
        self.pats.iter().any(|p| p.matches(path, is_dir))
    }
}

fn compile(p: &[u8], anchored: bool, dir_only: bool, text: &str) -> Result<Pattern, FilterError> {
    if p.is_empty() {
        return Err(FilterError::Empty);
    }
    let mut toks = Vec::new();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            b'*' if p.get(i + 1) == Some(&b'*') => {
                while p.get(i) == Some(&b'*') {
                    i += 1;
                }
                toks.push(Tok::DoubleStar);
                continue;
            }
            b'*' => toks.push(Tok::Star),
            b'?' => toks.push(Tok::AnyByte),
            b'\\' if i + 1 < p.len() => {
                i += 1;
                toks.push(Tok::Byte(p[i]));
            }
            b'[' => {
                let (tok, next) = class(p, i).ok_or_else(|| FilterError::UnclosedClass(text.into()))?;
                toks.push(tok);
                i = next;
                continue;
            }
            b => toks.push(Tok::Byte(b)),
        }
        i += 1;
    }
    let full_path = anchored || p.contains(&b'/') || toks.contains(&Tok::DoubleStar);
    Ok(Pattern {
        toks,
        anchored,
        dir_only,
        full_path,
    })
}

/// Parses a `[...]` class starting at `p[start] == b'['`; returns the token
/// and the index just past the closing `]`.
fn class(p: &[u8], start: usize) -> Option<(Tok, usize)> {
    let mut i = start + 1;
    let negated = matches!(p.get(i), Some(b'!') | Some(b'^'));
    if negated {
        i += 1;
    }
    let mut ranges = Vec::new();
    let mut first = true;
    loop {
        let mut b = *p.get(i)?;
        if b == b']' && !first {
            return Some((Tok::Class { negated, ranges }, i + 1));
        }
        first = false;
        if b == b'\\' {
            i += 1;
            b = *p.get(i)?;
        }
        if p.get(i + 1) == Some(&b'-') && p.get(i + 2).is_some_and(|&c| c != b']') {
            ranges.push((b, p[i + 2]));
            i += 3;
        } else {
            ranges.push((b, b));
            i += 1;
        }
    }
}

impl Pattern {
    fn matches(&self, path: &[u8], is_dir: bool) -> bool {
        if self.dir_only && !is_dir {
            return false;
        }
        if !self.full_path {
            let name = match path.iter().rposition(|&b| b == b'/') {
                Some(i) => &path[i + 1..],
                None => path,
            };
            return glob(&self.toks, name);
        }
        if self.anchored {
            return glob(&self.toks, path);
        }
        if glob(&self.toks, path) {
            return true;
        }
        path.iter()
            .enumerate()
            .filter(|&(_, &b)| b == b'/')
            .any(|(i, _)| glob(&self.toks, &path[i + 1..]))
    }
}

/// Glob match by dynamic programming: O(pattern × text), never exponential.
fn glob(toks: &[Tok], s: &[u8]) -> bool {
    // prev[j]: toks[..i] matches s[..j].
    let mut prev = vec![false; s.len() + 1];
    prev[0] = true;
    let mut cur = vec![false; s.len() + 1];
    for tok in toks {
        cur.iter_mut().for_each(|c| *c = false);
        match tok {
            Tok::Star | Tok::DoubleStar => {
                let crosses = matches!(tok, Tok::DoubleStar);
                let mut carry = false;
                for j in 0..=s.len() {
                    // A star extends a match over bytes it may consume.
                    if j > 0 && !(crosses || s[j - 1] != b'/') {
                        carry = false;
                    }
                    carry |= prev[j];
                    cur[j] = carry;
                }
            }
            _ => {
                for j in 1..=s.len() {
                    cur[j] = prev[j - 1] && byte_matches(tok, s[j - 1]);
                }
            }
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[s.len()]
}

fn byte_matches(tok: &Tok, b: u8) -> bool {
    match tok {
        Tok::Byte(c) => *c == b,
        Tok::AnyByte => b != b'/',
        Tok::Class { negated, ranges } => b != b'/' && (ranges.iter().any(|&(lo, hi)| lo <= b && b <= hi) != *negated),
        Tok::Star | Tok::DoubleStar => false,
    }
}

/// An ordered list of rules, and perhaps a list of the only paths to
/// transfer (`--files-from`).
#[derive(Debug, Clone, Default)]
pub struct Filter {
    rules: Vec<Rule>,
    only: Option<std::sync::Arc<Only>>,
}

/// The paths a `--files-from` list names, relative to the transfer root:
/// a named file, a named directory and everything beneath it, and the
/// directories on the way to them (entered, but only for what is named).
#[derive(Debug, Default)]
struct Only {
    named: std::collections::HashSet<Vec<u8>>,
    on_the_way: std::collections::HashSet<Vec<u8>>,
}

/// A line of a `--files-from` list that names no path inside the source.
#[derive(Debug, thiserror::Error)]
#[error("{file}, line {line}: {why}")]
pub struct ListError {
    /// The list.
    pub file: String,
    /// Where in it, from 1.
    pub line: usize,
    /// What is wrong.
    pub why: String,
}

impl Filter {
    /// A filter that includes everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends a rule; earlier rules take precedence.
    pub fn push(&mut self, rule: Rule) {
        self.rules.push(rule);
    }

    /// Appends the exclude rules of a file: one pattern a line; blank lines
    /// and lines starting with `#` or `;` are skipped; a line starting with
    /// `+ ` is an include and `- ` an exclude.
    pub fn add_file(&mut self, path: &Path) -> Result<(), FilterError> {
        let data = std::fs::read(path).map_err(|source| FilterError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        for line in data.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.is_empty() || line[0] == b'#' || line[0] == b';' {
                continue;
            }
            let rule = if let Some(p) = line.strip_prefix(b"+ ") {
                Rule::from_bytes(p, true)?
            } else if let Some(p) = line.strip_prefix(b"- ") {
                Rule::from_bytes(p, false)?
            } else {
                Rule::from_bytes(line, false)?
            };
            self.rules.push(rule);
        }
        Ok(())
    }

    /// The rules, in order.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    /// True when there are no rules.
    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    /// Whether the path (relative to the transfer root) is transferred.
    pub fn included(&self, path: &Path, is_dir: bool) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let bytes = path.as_os_str().as_bytes();
        self.only.as_ref().is_none_or(|o| o.holds(bytes, is_dir))
            && self
                .rules
                .iter()
                .find(|r| r.matches(bytes, is_dir))
                .is_none_or(|r| r.include)
    }

    /// Transfers only the paths `list` names, besides what the rules say
    /// (rsync's `--files-from`): one path a line (or a NUL-separated
    /// list with `nul`), relative to the source, blank lines and lines
    /// starting with `#` or `;` skipped; a leading `/` or `./` is dropped.
    /// `under` is where the source lands under the transfer root. `file`
    /// names the list in errors.
    pub fn only_from(&mut self, list: &[u8], nul: bool, under: &Path, file: &str) -> Result<(), ListError> {
        use std::os::unix::ffi::OsStrExt;
        let mut only = Only::default();
        let sep = if nul { 0 } else { b'\n' };
        for (i, line) in list.split(|&b| b == sep).enumerate() {
            let line = if nul {
                line
            } else {
                line.strip_suffix(b"\r").unwrap_or(line)
            };
            if line.is_empty() || (!nul && (line[0] == b'#' || line[0] == b';')) {
                continue;
            }
            let bad = |why: &str| ListError {
                file: file.to_string(),
                line: i + 1,
                why: why.to_string(),
            };
            let mut rel = under.to_path_buf();
            for c in Path::new(std::ffi::OsStr::from_bytes(line)).components() {
                match c {
                    std::path::Component::Normal(n) => rel.push(n),
                    std::path::Component::RootDir | std::path::Component::CurDir => {}
                    _ => return Err(bad("a path that leaves the source (\"..\")")),
                }
            }
            let named = rel.as_os_str().as_bytes().to_vec();
            if named.is_empty() {
                return Err(bad("the source itself: name what is inside it"));
            }
            for a in rel.ancestors().skip(1) {
                let a = a.as_os_str().as_bytes();
                if !a.is_empty() {
                    only.on_the_way.insert(a.to_vec());
                }
            }
            only.named.insert(named);
        }
        self.only = Some(std::sync::Arc::new(only));
        Ok(())
    }

    /// Whether a `--files-from` list restricts the paths.
    pub fn has_list(&self) -> bool {
        self.only.is_some()
    }
}

impl Only {
    fn holds(&self, path: &[u8], is_dir: bool) -> bool {
        if is_dir && self.on_the_way.contains(path) {
            return true;
        }
        // The path itself or a directory above it is named.
        let mut at = path.len();
        loop {
            if self.named.contains(&path[..at]) {
                return true;
            }
            match path[..at].iter().rposition(|&b| b == b'/') {
                Some(i) => at = i,
                None => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn f(rules: &[(&str, bool)]) -> Filter {
        let mut f = Filter::new();
        for (p, inc) in rules {
            f.push(Rule::new(p, *inc).expect("valid"));
        }
        f
    }

    fn inc(f: &Filter, p: &str, dir: bool) -> bool {
        f.included(Path::new(p), dir)
    }

    #[test]
    fn a_list_names_files_trees_and_the_way_to_them() {
        let mut x = f(&[("*.log", false)]);
        let list = b"a/b/file.txt\n# a comment\n\n./tree/\n/top.log\r\n";
        x.only_from(list, false, Path::new(""), "list").expect("list");
        assert!(inc(&x, "a", true) && inc(&x, "a/b", true));
        assert!(inc(&x, "a/b/file.txt", false));
        assert!(!inc(&x, "a/b/other.txt", false), "not named");
        assert!(!inc(&x, "a/b", false), "a file where the way goes");
        assert!(inc(&x, "tree", true) && inc(&x, "tree/deep/x", false));
        assert!(!inc(&x, "top.log", false), "named, but the rules exclude it");
        assert!(!inc(&x, "treetop", false));
        // Under a root that lands in a directory of the destination.
        let mut y = Filter::new();
        y.only_from(b"x\0y/z", true, Path::new("src"), "list").expect("list");
        assert!(inc(&y, "src", true) && inc(&y, "src/x", false) && inc(&y, "src/y/z", false));
        assert!(!inc(&y, "src/y/w", false));
        let e = Filter::new()
            .only_from(b"ok\n../etc/passwd\n", false, Path::new(""), "list")
            .expect_err("leaves");
        assert_eq!(e.line, 2);
        assert!(e.to_string().contains("list, line 2"), "{e}");
        assert!(Filter::new().only_from(b"./\n", false, Path::new(""), "l").is_err());
    }

    #[test]
    fn basename_patterns() {
        let x = f(&[("*.o", false)]);
        assert!(!inc(&x, "a.o", false));
        assert!(!inc(&x, "src/deep/a.o", false));
        assert!(inc(&x, "a.c", false));
        assert!(inc(&x, "a.o/b", false), "only the last component is matched");
    }

    #[test]
    fn anchored_and_dir_only() {
        let x = f(&[("/build", false), ("tmp/", false)]);
        assert!(!inc(&x, "build", true));
        assert!(inc(&x, "src/build", true));
        assert!(!inc(&x, "a/tmp", true));
        assert!(inc(&x, "a/tmp", false), "dir-only rule skips files");
    }

    #[test]
    fn slash_patterns_match_trailing_components() {
        let x = f(&[("foo/*.txt", false)]);
        assert!(!inc(&x, "foo/a.txt", false));
        assert!(!inc(&x, "x/foo/a.txt", false));
        assert!(inc(&x, "xfoo/a.txt", false));
        assert!(inc(&x, "foo/sub/a.txt", false), "* does not cross /");
    }

    #[test]
    fn double_star_and_triple_star() {
        let x = f(&[("foo/**/z", false)]);
        assert!(!inc(&x, "foo/a/b/z", false));
        let y = f(&[("/keep/***", true), ("*", false)]);
        assert!(inc(&y, "keep", true));
        assert!(inc(&y, "keep/a/b", false));
        assert!(!inc(&y, "other", false));
    }

    #[test]
    fn first_match_wins() {
        let x = f(&[("*.rs", true), ("*/", true), ("*", false)]);
        assert!(inc(&x, "src/main.rs", false));
        assert!(inc(&x, "src", true));
        assert!(!inc(&x, "README.md", false));
    }

    #[test]
    fn classes_and_escapes() {
        let x = f(&[("file[0-9].[!c]", false), ("lit\\*", false)]);
        assert!(!inc(&x, "file3.h", false));
        assert!(inc(&x, "file3.c", false));
        assert!(inc(&x, "filex.h", false));
        assert!(!inc(&x, "lit*", false));
        assert!(inc(&x, "lits", false));
        assert!(Rule::new("[abc", false).is_err());
        assert!(Rule::new("", false).is_err());
    }

    #[test]
    fn non_utf8_names() {
        use std::os::unix::ffi::OsStrExt;
        let x = f(&[("*.bin", false)]);
        let p = std::ffi::OsStr::from_bytes(b"caf\xe9.bin");
        assert!(!x.included(Path::new(p), false));
    }

    #[test]
    fn star_heavy_patterns_stay_fast() {
        let x = f(&[("*a*a*a*a*a*a*a*a*a*a*b", false)]);
        let long = "a".repeat(4000);
        assert!(inc(&x, &long, false));
    }

    #[test]
    fn rules_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let p = dir.path().join("rules");
        std::fs::write(&p, "# comment\n\n*.log\n+ keep.tmp\n*.tmp\n").expect("write");
        let mut x = Filter::new();
        x.add_file(&p).expect("parse");
        assert!(!inc(&x, "a.log", false));
        assert!(inc(&x, "keep.tmp", false));
        assert!(!inc(&x, "b.tmp", false));
        assert!(x.add_file(&dir.path().join("missing")).is_err());
    }
}

#[cfg(test)]
mod robustness {
    use super::*;

    #[test]
    fn arbitrary_patterns_and_paths_never_panic() {
        let alphabet = b"ab*?[]!^-\\/.";
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..5000 {
            let plen = (next() % 12) as usize;
            let pat: Vec<u8> = (0..plen)
                .map(|_| alphabet[(next() % alphabet.len() as u64) as usize])
                .collect();
            let slen = (next() % 16) as usize;
            let path: Vec<u8> = (0..slen).map(|_| alphabet[(next() % 5) as usize + 6]).collect();
            if let Ok(rule) = Rule::from_bytes(&pat, next() % 2 == 0) {
                let mut f = Filter::new();
                f.push(rule);
                use std::os::unix::ffi::OsStrExt;
                let _ = f.included(Path::new(std::ffi::OsStr::from_bytes(&path)), next() % 2 == 0);
            }
        }
    }
}
