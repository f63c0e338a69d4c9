//! What the user sees: progress bar, per-change lines, errors, summary.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use indicatif::{HumanBytes, ProgressBar, ProgressDrawTarget, ProgressStyle};
use tern_core::{Action, Diff, Error, Kind, Observer, Summary};
use tern_net::path::PathReport;

use crate::cli::OutputArgs;

/// Prints to the terminal as the engine reports.
pub struct Console {
    bar: Option<ProgressBar>,
    list: bool,
    quiet: bool,
    /// Change lines go to stderr when stdout carries JSON.
    json: bool,
    /// `--stats`.
    stats: bool,
    /// `-i`, and whether the files are sent to a daemon.
    itemize: Option<bool>,
    /// -v: explain the network's part in every summary.
    verbose: bool,
    files_planned: AtomicU64,
    files_done: AtomicU64,
    bytes_planned: AtomicU64,
    bytes_done: AtomicU64,
    /// The file last started.
    current: Mutex<String>,
    /// Progress lines without a bar: when the last was printed.
    plain: Option<Mutex<Option<Instant>>>,
    /// With `--json`, the changes listed (check, dry runs, -v), for the
    /// summary's `changes`.
    changes: Mutex<Vec<serde_json::Value>>,
    /// Whether a connection of this attempt broke: its errors are then
    /// held, to be dropped if the run is retried.
    lost: Mutex<Option<LostHook>>,
    /// Errors held since a connection broke.
    held: Mutex<Vec<String>>,
    /// Attempts retried after a lost connection.
    retries: AtomicU64,
}

/// Tells whether a connection of the current attempt broke.
pub type LostHook = Box<dyn Fn() -> bool + Send + Sync>;

impl Console {
    /// Sets up output for the given options. `list` forces the per-change
    /// lines (dry runs and check); `progress` asks for the bar as
    /// `--progress` does (rsync's `-P`).
    pub fn new(out: &OutputArgs, list: bool, progress: bool) -> Console {
        let tty = std::io::stderr().is_terminal();
        let wanted = !out.quiet && !out.no_progress && (out.progress || progress || tty);
        // A bar needs a terminal; asked for without one, a line a second.
        let show_bar = wanted && tty;
        let bar = show_bar.then(|| {
            // Drawn from the first planned file on, not as a full bar of
            // nothing while the scan starts.
            let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::hidden());
            let style = ProgressStyle::with_template(
                "{bar:20.cyan/blue} {bytes:>10}/{total_bytes:<10} {binary_bytes_per_sec:>11} ETA {eta:>3} {wide_msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        Console {
            bar,
            list: !out.quiet && (list || out.verbose > 0),
            quiet: out.quiet,
            json: out.json,
            stats: false,
            itemize: None,
            verbose: out.verbose > 0,
            files_planned: AtomicU64::new(0),
            files_done: AtomicU64::new(0),
            bytes_planned: AtomicU64::new(0),
            bytes_done: AtomicU64::new(0),
            current: Mutex::new(String::new()),
            plain: (wanted && !tty).then(|| Mutex::new(None)),
            changes: Mutex::new(Vec::new()),
            lost: Mutex::new(None),
            held: Mutex::new(Vec::new()),
            retries: AtomicU64::new(0),
        }
    }

    /// From now on, errors reported after `lost` says a connection broke
    /// are held back: a retry makes them moot, and [`Console::summary`]
    /// prints those that stand.
    pub fn watch_connections(&self, lost: LostHook) {
        if let Ok(mut l) = self.lost.lock() {
            *l = Some(lost);
        }
    }

    /// The run is retried after a lost connection: the errors held are
    /// dropped (returned: how many), and the progress starts again.
    pub fn retrying(&self) -> usize {
        self.retries.fetch_add(1, Ordering::Relaxed);
        let dropped = self.held.lock().map(|mut h| std::mem::take(&mut *h).len()).unwrap_or(0);
        for c in [
            &self.files_planned,
            &self.files_done,
            &self.bytes_planned,
            &self.bytes_done,
        ] {
            c.store(0, Ordering::Relaxed);
        }
        if let Ok(mut c) = self.changes.lock() {
            c.clear();
        }
        if let Some(bar) = &self.bar {
            bar.set_length(0);
            bar.set_position(0);
            bar.reset_eta();
        }
        dropped
    }

    /// Prints the errors held back, which no retry will undo.
    fn release_held(&self) {
        let held = self
            .held
            .lock()
            .map(|mut h| std::mem::take(&mut *h))
            .unwrap_or_default();
        for e in held {
            print_line(false, &e);
        }
    }

    /// Files done of planned.
    fn counts(&self) -> String {
        let (d, n) = (
            self.files_done.load(Ordering::Relaxed),
            self.files_planned.load(Ordering::Relaxed),
        );
        format!("{d}/{n} {}", plural(n, "file", "files"))
    }

    /// The progress message: the counts and the file being written.
    fn message(&self) -> String {
        let name = self.current.lock().map(|c| c.clone()).unwrap_or_default();
        format!("{} {name}", self.counts())
    }

    /// The bar shows the counts and as much of the name as fits.
    fn redraw_text(&self, bar: &ProgressBar) {
        bar.set_message(self.message());
    }

    /// Without a terminal, with progress asked for: a line at most a second.
    fn plain_line(&self) {
        let Some(last) = &self.plain else {
            return;
        };
        let Ok(mut last) = last.lock() else {
            return;
        };
        if last.is_some_and(|t: Instant| t.elapsed() < Duration::from_secs(1)) {
            return;
        }
        *last = Some(Instant::now());
        let (done, total) = (
            self.bytes_done.load(Ordering::Relaxed),
            self.bytes_planned.load(Ordering::Relaxed),
        );
        let pct = (done.min(total) * 100).checked_div(total).unwrap_or(100);
        eprintln!("{}/{} ({pct}%) {}", HumanBytes(done), HumanBytes(total), self.message());
    }

    /// Also prints rsync's `--stats` block after the summary.
    pub fn with_stats(mut self, stats: bool) -> Console {
        self.stats = stats;
        self
    }

    /// Prints each change as rsync's `--itemize-changes` does, instead of
    /// the `-v` lines; `push` when the files go to a daemon (`<`, sent).
    pub fn with_itemize(mut self, itemize: bool, push: bool) -> Console {
        self.itemize = itemize.then_some(push);
        if itemize {
            self.list = false;
        }
        self
    }

    fn line(&self, to_stdout: bool, s: &str) {
        match (&self.bar, to_stdout) {
            (Some(bar), _) => bar.suspend(|| print_line(to_stdout, s)),
            (None, _) => print_line(to_stdout, s),
        }
    }

    /// Removes the progress bar.
    pub fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }

    /// Tells the user something worth knowing about how the run goes (on
    /// stderr, unless quiet).
    pub fn note(&self, s: &str) {
        if !self.quiet {
            self.line(false, &format!("tern: {s}"));
        }
    }

    /// Prints the closing summary (on stderr, or as JSON on stdout).
    /// `paths`: what each network connection saw; `direct`: the
    /// destination daemon fetched the data from the source daemon itself,
    /// and `paths` are its connections to the sources.
    pub fn summary(&self, verb: &str, s: &Summary, paths: &[PathReport], direct: bool) {
        self.finish();
        self.release_held();
        let transport = paths.first().map(|p| p.transport.as_str());
        if self.json {
            let mut out = std::io::stdout().lock();
            let mut v = serde_json::to_value(s).unwrap_or_default();
            if let (Some(o), Ok(changes)) = (v.as_object_mut(), self.changes.lock()) {
                if self.list {
                    o.insert("changes".into(), serde_json::Value::Array(changes.clone()));
                }
            }
            if let (Some(t), Some(o)) = (transport, v.as_object_mut()) {
                o.insert("transport".into(), t.into());
                o.insert("direct".into(), direct.into());
                o.insert("paths".into(), serde_json::to_value(paths).unwrap_or_default());
                o.insert("requests".into(), paths.iter().map(|p| p.requests).sum::<u64>().into());
                o.insert("waits".into(), paths.iter().map(|p| p.waits).sum::<u64>().into());
            }
            let _ = serde_json::to_writer(&mut out, &v);
            let _ = writeln!(out);
            return;
        }
        if self.quiet {
            return;
        }
        let mut parts = Vec::new();
        if verb == "checked" {
            parts.push(format!("checked {} files", s.files));
            parts.push(format!(
                "{} {}",
                s.differences,
                plural(s.differences, "difference", "differences")
            ));
        } else {
            let what = if s.dry_run { "would copy" } else { verb };
            parts.push(format!(
                "{what} {} of {} {} ({})",
                s.copied,
                s.files,
                plural(s.files, "file", "files"),
                HumanBytes(s.bytes_total)
            ));
            if s.interrupted && s.bytes_written > s.bytes_total {
                // Only the files in place count as copied; what large files
                // got before the stop is kept for the resume.
                parts.push(format!(
                    "{} written in all, the unfinished part kept for the resume",
                    HumanBytes(s.bytes_written)
                ));
            }
            if s.unchanged > 0 {
                parts.push(format!("{} unchanged", s.unchanged));
            }
            if s.bytes_resumed > 0 {
                parts.push(format!("{} resumed", HumanBytes(s.bytes_resumed)));
            }
            if s.bytes_cloned > 0 {
                parts.push(format!("{} reflinked", HumanBytes(s.bytes_cloned)));
            }
            if s.bytes_matched > 0 || s.bytes_deduplicated > 0 {
                let mut from = Vec::new();
                if s.bytes_matched > 0 {
                    from.push(format!("{} taken from the old versions", HumanBytes(s.bytes_matched)));
                }
                if s.bytes_deduplicated > 0 {
                    from.push(format!(
                        "{} from other files (copies sent in the run, or old names at the destination)",
                        HumanBytes(s.bytes_deduplicated)
                    ));
                }
                parts.push(format!(
                    "{} sent as a delta ({})",
                    HumanBytes(s.bytes_written),
                    from.join(", ")
                ));
            }
            for (n, one, many) in [
                (s.dirs_created, "dir created", "dirs created"),
                (s.symlinks, "symlink", "symlinks"),
                (s.hard_links, "hard link", "hard links"),
                (s.meta_updated, "metadata updated", "metadata updated"),
                (s.deleted, "deleted", "deleted"),
                (s.skipped_special, "special file skipped", "special files skipped"),
                (s.skipped, "left alone by a rule", "left alone by a rule"),
            ] {
                if n > 0 {
                    parts.push(format!("{n} {}", plural(n, one, many)));
                }
            }
            if !s.dry_run {
                parts.push(format!(
                    "{:.2}s, {}/s",
                    s.elapsed_secs,
                    HumanBytes(s.bytes_per_sec as u64)
                ));
            }
            if s.verified {
                parts.push("verified".into());
            }
        }
        if s.errors > 0 {
            parts.push(format!("{} {}", s.errors, plural(s.errors, "error", "errors")));
        }
        let retries = self.retries.load(Ordering::Relaxed);
        if retries > 0 {
            parts.push(format!(
                "after {retries} {} on a new connection",
                plural(retries, "retry", "retries")
            ));
        }
        if s.interrupted {
            parts.push("INTERRUPTED: rerun the same command to resume".into());
        }
        if s.deletions_skipped {
            parts.push("deletions skipped because of errors".into());
        }
        match transport {
            Some(t) if direct => parts.push(format!("daemon to daemon via {t}")),
            Some(t) => parts.push(format!("via {t}")),
            None => {}
        }
        eprintln!("{}", parts.join(", "));
        if self.stats && verb != "checked" {
            print_stats(s, paths);
        }
        let slow = s.bytes_total >= SLOW_BYTES && s.bytes_per_sec < SLOW_RATE;
        if self.verbose || slow {
            for p in paths.iter().filter(|p| p.packets_sent > 0) {
                eprintln!("  {}", describe_path(p));
            }
        }
    }
}

/// rsync's `--stats` block, on stdout, with the lines scripts parse named
/// and counted as rsync does: literal data is what was sent of the files,
/// matched data what was built from what the destination had. Without a
/// daemon the bytes sent are the file data written.
fn print_stats(s: &Summary, paths: &[PathReport]) {
    let n = |v: u64| {
        let d = v.to_string();
        let mut out = String::new();
        for (i, c) in d.chars().enumerate() {
            if i > 0 && (d.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    };
    let (sent, received) = match paths.is_empty() {
        true => (s.bytes_written, 0),
        false => (
            paths.iter().map(|p| p.wire_bytes_sent).sum(),
            paths.iter().map(|p| p.wire_bytes_received).sum(),
        ),
    };
    let mut out = std::io::stdout().lock();
    let _ = writeln!(
        out,
        "\nNumber of files: {}\nNumber of created directories: {}\nNumber of deleted files: {}\n\
         Number of regular files transferred: {}\nTotal transferred file size: {} bytes\n\
         Literal data: {} bytes\nMatched data: {} bytes\nTotal bytes sent: {}\nTotal bytes received: {}\n",
        n(s.files),
        n(s.dirs_created),
        n(s.deleted),
        n(s.copied),
        n(s.bytes_total),
        n(s.bytes_written),
        n(s.bytes_matched + s.bytes_deduplicated + s.bytes_resumed + s.bytes_cloned),
        n(sent),
        n(received)
    );
}

/// A transfer this large moving slower than this gets the network's part
/// explained even without -v.
const SLOW_BYTES: u64 = 16 << 20;
const SLOW_RATE: f64 = 50e6;

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 {
        one
    } else {
        many
    }
}

/// One line on what a connection saw: enough to tell a long path, a lossy
/// one and a slow one apart.
pub fn describe_path(p: &PathReport) -> String {
    let (streams, lost) = if p.transport == "tcp" {
        ("TCP connections", "segments sent again")
    } else {
        ("streams", "packets lost")
    };
    let mut s = p.transport.clone();
    if !p.congestion.is_empty() {
        s.push_str(&format!(" ({})", p.congestion));
    }
    s.push_str(&format!(": {} {streams}", p.streams));
    if let Some(rtt) = p.rtt_ms {
        s.push_str(&format!(", RTT {rtt:.1} ms"));
    }
    s.push_str(&format!(
        ", {:.2} % {lost} ({} of {}), on the wire {} sent, {} received",
        p.loss_ratio() * 100.0,
        p.packets_lost,
        p.packets_sent,
        HumanBytes(p.wire_bytes_sent),
        HumanBytes(p.wire_bytes_received)
    ));
    if p.requests > 0 {
        s.push_str(&format!(
            ", {} {}, {} {} with nothing else in flight",
            p.requests,
            plural(p.requests, "request", "requests"),
            p.waits,
            plural(p.waits, "wait", "waits")
        ));
    }
    if p.bytes_compressed > 0 {
        s.push_str(&format!(
            ", {} compressed to {}",
            HumanBytes(p.bytes_compressed),
            HumanBytes(p.bytes_compressed_wire)
        ));
    }
    s
}

fn print_line(to_stdout: bool, s: &str) {
    if to_stdout {
        let mut o = std::io::stdout().lock();
        let _ = writeln!(o, "{s}");
    } else {
        eprintln!("{s}");
    }
}

fn label(a: Action) -> &'static str {
    match a {
        Action::New => "new",
        Action::Update => "update",
        Action::Meta => "meta",
        Action::Dir => "dir",
        Action::Symlink => "symlink",
        Action::HardLink => "hardlink",
        Action::Delete => "delete",
        Action::SkipSpecial => "skip-special",
        Action::Skip => "skip",
        Action::Missing => "missing",
        Action::Extra => "extra",
        Action::Differ => "differ",
    }
}

impl Observer for Console {
    fn planned(&self, files: u64, bytes: u64) {
        let before = self.files_planned.fetch_add(files, Ordering::Relaxed);
        self.bytes_planned.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            if before == 0 && files > 0 {
                bar.set_draw_target(ProgressDrawTarget::stderr_with_hz(4));
            }
            bar.inc_length(bytes);
            self.redraw_text(bar);
        }
    }

    fn progress(&self, bytes: u64) {
        self.bytes_done.fetch_add(bytes, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            bar.inc(bytes);
        }
        self.plain_line();
    }

    fn file_done(&self) {
        self.files_done.fetch_add(1, Ordering::Relaxed);
        if let Some(bar) = &self.bar {
            self.redraw_text(bar);
        }
        self.plain_line();
    }

    fn action(&self, action: Action, path: &Path, _size: u64) {
        if matches!(action, Action::New | Action::Update) {
            if let Ok(mut c) = self.current.lock() {
                use std::os::unix::ffi::OsStrExt;
                // A name's control characters would garble the bar.
                *c = crate::ls::escape(path.as_os_str().as_bytes());
            }
        }
        if self.list {
            let shown = if path.as_os_str().is_empty() {
                Path::new(".")
            } else {
                path
            };
            use std::os::unix::ffi::OsStrExt;
            // Escaped as rsync does, so that each line is one change.
            let path = crate::ls::escape(shown.as_os_str().as_bytes());
            self.line(!self.json, &format!("{:<8} {path}", label(action)));
            if self.json {
                if let Ok(mut c) = self.changes.lock() {
                    c.push(serde_json::json!({ "action": label(action), "path": path }));
                }
            }
        }
    }

    fn itemize(&self, action: Action, kind: Kind, path: &Path, diff: Diff) {
        use std::os::unix::ffi::OsStrExt;
        let Some(push) = self.itemize else {
            return;
        };
        let mut name = crate::ls::escape(path.as_os_str().as_bytes());
        if name.is_empty() {
            name.push('.');
        }
        if kind == Kind::Dir && action != Action::Delete {
            name.push('/');
        }
        self.line(!self.json, &format!("{} {name}", item_code(action, kind, diff, push)));
    }

    fn error(&self, e: &Error) {
        let line = format!("error: {e}");
        let lost = self.lost.lock().is_ok_and(|l| l.as_ref().is_some_and(|f| f()));
        if lost {
            if let Ok(mut h) = self.held.lock() {
                h.push(line);
                return;
            }
        }
        self.line(false, &line);
    }
}

/// rsync's eleven-letter `YXcstpoguax` code for a change: `>f+++++++++` a
/// file received new, `<f.st......` one sent with another size and time,
/// `cd+++++++++` a directory made, `.f..t......` a time fixed, `*deleting`.
fn item_code(action: Action, kind: Kind, d: Diff, push: bool) -> String {
    if action == Action::Delete {
        return "*deleting  ".into();
    }
    let x = match kind {
        Kind::File => 'f',
        Kind::Dir => 'd',
        Kind::Symlink => 'L',
        Kind::Special => 'S',
    };
    let y = match action {
        Action::HardLink => 'h',
        Action::Meta => '.',
        _ if kind == Kind::File => {
            if push {
                '<'
            } else {
                '>'
            }
        }
        _ => 'c',
    };
    if d.new {
        return format!("{y}{x}+++++++++");
    }
    let f = |on: bool, c: char| if on { c } else { '.' };
    format!(
        "{y}{x}{}{}{}{}{}{}...",
        f(d.content, 'c'),
        f(d.size, 's'),
        f(d.time, 't'),
        f(d.perms, 'p'),
        f(d.owner, 'o'),
        f(d.group, 'g')
    )
}
