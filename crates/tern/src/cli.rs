//! Command-line definitions.

use std::ffi::OsString;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Exit status of a run, documented in `tern --help`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Everything was done.
    Ok = 0,
    /// The run could not start (bad source, unusable destination...).
    Fatal = 1,
    /// The command line was wrong.
    Usage = 2,
    /// Some entries failed; the others were done.
    Partial = 3,
    /// `check` found differences.
    Differences = 4,
    /// Stopped by a signal; rerun the same command to resume.
    Interrupted = 130,
}

const AFTER_HELP: &str = "\
Exit status:
  0    everything was done
  1    the run could not start (missing source, unusable destination)
  2    usage error
  3    partial failure: some entries failed, the rest were done
  4    check: the trees differ
  130  interrupted (SIGINT/SIGTERM); rerun the same command to resume";

/// tern moves files between disks and machines as fast as the hardware
/// allows, verified end to end with BLAKE3, and resumable after any
/// interruption.
#[derive(Debug, Parser)]
#[command(
    name = "tern",
    version,
    about = "Copy, sync and check files fast, verified end to end with BLAKE3, resumable after any interruption",
    after_help = AFTER_HELP,
    propagate_version = true,
    // An option given again (after the defaults file's) takes the new value.
    args_override_self = true
)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Copy files and directory trees.
    ///
    /// As in rsync, a source directory with a trailing slash (`src/`) copies
    /// its contents into DST; without one (`src`) it copies the directory
    /// itself, as DST/src. Several sources need DST to be a directory (it is
    /// created if missing). Files already at the destination with the same
    /// size and modification time are skipped, so rerunning an interrupted
    /// copy continues it.
    #[command(after_help = AFTER_HELP, override_usage = "tern copy [OPTIONS] SRC... DST")]
    Copy {
        /// Sources, then the destination.
        #[arg(required = true, num_args = 2.., value_name = "PATH")]
        paths: Vec<OsString>,
        #[command(flatten)]
        opts: TransferArgs,
    },
    /// Make DST an exact copy of SRC; only what changed is written.
    ///
    /// DST receives the contents of SRC (a trailing slash makes no
    /// difference); a single file synced onto an existing directory goes
    /// inside it. With --delete, entries SRC does not have are removed from
    /// DST, but only after all new data is safely in place, and not at all if
    /// anything failed.
    #[command(after_help = AFTER_HELP)]
    Sync {
        /// The source directory or file.
        src: OsString,
        /// The destination.
        dst: OsString,
        /// Remove destination entries that the source does not have (and
        /// replace entries of the wrong kind).
        #[arg(long)]
        delete: bool,
        /// Also remove destination entries the filters exclude (implies
        /// --delete), as rsync does: `--exclude '*.o' --delete-excluded`
        /// clears old object files out of a mirror.
        #[arg(long)]
        delete_excluded: bool,
        /// With --delete, delete nothing (and fail) if more than N entries
        /// would go, everything inside a directory counted: a guard against
        /// a wrong source. (rsync deletes the first N.)
        #[arg(long, value_name = "N")]
        max_delete: Option<u64>,
        #[command(flatten)]
        opts: TransferArgs,
    },
    /// Compare two trees by content (BLAKE3) and list the differences.
    ///
    /// Prints one line per difference: `differ`, `missing` (only in SRC) or
    /// `extra` (only in DST). Exits with status 4 if there is any.
    #[command(after_help = AFTER_HELP)]
    Check {
        /// The reference tree.
        src: OsString,
        /// The tree to compare with it.
        dst: OsString,
        #[command(flatten)]
        filter: FilterArgs,
        #[command(flatten)]
        out: OutputArgs,
        #[command(flatten)]
        remote: RemoteArgs,
        /// Files hashed in parallel.
        #[arg(short = 'j', long, value_name = "N")]
        jobs: Option<usize>,
    },
    /// Run a daemon that exports directories ("modules") to tern clients
    /// over QUIC and TCP+TLS (the same port for both).
    ///
    /// Quick start: `tern serve --module data=./dir --read-write --token-file tok`
    /// prints the address, modules, the server's key fingerprint and how
    /// clients authenticate. Nothing is writable unless configured so.
    /// SIGINT/SIGTERM stop it; files being written stay resumable.
    Serve(ServeArgs),
    /// Measure what limits a transfer: disk write and read, BLAKE3 hashing
    /// and, given a daemon (tern://HOST[:PORT]/MODULE), the round trip and
    /// throughput of each transport; then say which transport and how many
    /// workers a copy would use, and why.
    Bench(BenchArgs),
    /// List what a local path or a daemon's path (tern://HOST[:PORT]/MODULE/PATH)
    /// holds: a directory's entries, directories with a trailing `/`.
    ///
    /// Names are printed with rsync's escapes (`\#012` for a newline), so
    /// every line is one entry. A daemon named without a module
    /// (tern://HOST[:PORT]/ or HOST:) lists the modules this client may use,
    /// with `rw` or `ro` and each one's comment. Examples: `tern ls -l
    /// tern://nas/photos/2024`, `tern ls -R ./src`, `tern ls tern://nas/`.
    Ls(LsArgs),
    /// Mount a daemon's module (or a directory in it) at DIR until `tern
    /// unmount DIR`, Ctrl-C or SIGTERM: every byte read is checked against
    /// the BLAKE3 chaining value the daemon sent with it (a mismatch is
    /// EIO), the xattr `user.tern.blake3` holds a file's `b3sum` hash, and a
    /// file written is staged here and published at the daemon atomically
    /// when it is closed or fsync'd. Example: `tern mount nas:photos ~/photos`.
    Mount(MountArgs),
    /// Unmount a `tern mount` (as `fusermount3 -u DIR` does).
    Unmount {
        /// The mount point.
        dir: PathBuf,
    },
    /// Forget the pinned key of a daemon (HOST:PORT, or HOST for every
    /// port), after its key changed for a known reason: the next connection
    /// asks again, or takes --accept-new-host / --fingerprint.
    ForgetHost {
        /// The daemon, as in its tern:// URLs.
        host: String,
    },
    /// Print a shell completion script: `tern completions bash >
    /// /etc/bash_completion.d/tern`, or for zsh, fish, elvish, powershell.
    Completions {
        /// The shell.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print tern's man page (roff) on stdout, or with DIR write tern.1 and a
    /// page per command (tern-copy.1, ...) there: `tern man | man -l -`.
    Man {
        /// Directory to write the pages to.
        dir: Option<PathBuf>,
    },
    /// Print a key fingerprint: this client's (presented to daemons that
    /// authorize keys), or with --server / --state-dir a daemon's. The key
    /// is created if it does not exist yet.
    Fingerprint {
        /// The daemon's identity (in its default state directory).
        #[arg(long)]
        server: bool,
        /// The daemon's identity in DIR.
        #[arg(long, value_name = "DIR")]
        state_dir: Option<PathBuf>,
    },
}

/// `tern ls` options.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// What to list.
    pub path: OsString,
    /// Also show permissions, size and modification time (UTC).
    #[arg(short = 'l', long)]
    pub long: bool,
    /// List everything beneath, as paths relative to PATH.
    #[arg(short = 'R', long)]
    pub recursive: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// `tern mount` options.
#[derive(Debug, Args)]
pub struct MountArgs {
    /// The daemon's tree: tern://HOST[:PORT]/MODULE[/PATH] or HOST:MODULE[/PATH].
    pub remote: OsString,
    /// The directory to mount it on.
    pub dir: PathBuf,
    /// Seconds the kernel trusts names and attributes before asking the
    /// daemon again (a file opened is always asked for).
    #[arg(long, value_name = "SECS", default_value_t = 1.0)]
    pub attr_timeout: f64,
    /// Log what the mount does: -v connections and uploads, -vv failed
    /// operations, -vvv every request from the kernel.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Run in the background once mounted (its log goes to the staging
    /// directory's mount.log); stop it with `tern unmount DIR`.
    #[arg(long)]
    pub daemon: bool,
    /// Upload closed files in the background, many small ones a request
    /// (for trees written file by file, such as an archive extracted): close
    /// then returns at once and no longer reports an upload's failure;
    /// fsync of a file waits for its upload, fsync of a directory (`sync
    /// DIR`) for every upload before it, and unmount for all.
    #[arg(long)]
    pub write_back: bool,
    /// Mount read-only (also what a read-only module or grant gives).
    #[arg(long)]
    pub read_only: bool,
    /// Let other local users use the mount, the kernel checking the
    /// permission bits the daemon reports against its numeric owners (FUSE's
    /// allow_other and default_permissions; a user other than root needs
    /// user_allow_other in /etc/fuse.conf).
    #[arg(long)]
    pub allow_other: bool,
    /// Where files being written wait until they are published
    /// [default: $XDG_CACHE_HOME/tern/mount, or ~/.cache/tern/mount].
    #[arg(long, value_name = "DIR")]
    pub staging_dir: Option<PathBuf>,
    /// Keep the blocks read in DIR (one subdirectory per mounted tree), for
    /// later opens and mounts; each is checked again when it is used.
    #[arg(long, value_name = "DIR")]
    pub cache_dir: Option<PathBuf>,
    /// The most --cache-dir keeps for this tree; the least recently used
    /// blocks go first.
    #[arg(long, value_name = "BYTES", default_value = "4G", value_parser = parse_size, requires = "cache_dir")]
    pub cache_size: u64,
    #[command(flatten)]
    pub remote_args: RemoteArgs,
}

/// `tern bench` options.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// A daemon's module to measure the network to (tern://HOST[:PORT]/MODULE).
    pub remote: Option<OsString>,
    /// Directory whose disk is measured (a temporary file is written there
    /// and removed).
    #[arg(long, value_name = "DIR", default_value = ".")]
    pub dir: PathBuf,
    /// Bytes written and read back on the disk.
    #[arg(long, value_name = "BYTES", default_value = "256M", value_parser = parse_size)]
    pub disk_size: u64,
    /// Bytes sent each way per transport (at most 1G).
    #[arg(long, value_name = "BYTES", default_value = "64M", value_parser = parse_size)]
    pub net_size: u64,
    /// Parallel streams for the throughput test [default: what a copy would use].
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Print one JSON object on stdout instead of the report.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub remote_args: RemoteArgs,
}

/// `tern serve` options.
#[derive(Debug, Args)]
pub struct ServeArgs {
    /// A TOML configuration file (see docs/serve.md).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Address to listen on (repeatable) [default: 0.0.0.0:7373].
    #[arg(long, value_name = "ADDR:PORT")]
    pub listen: Vec<String>,
    /// Export PATH as module NAME (repeatable).
    #[arg(long, value_name = "NAME=PATH")]
    pub module: Vec<String>,
    /// Make the --module modules writable (by the --token-file token).
    #[arg(long)]
    pub read_write: bool,
    /// Cap the bytes clients may keep in each --module module, partial
    /// uploads included (e.g. 500G, 1.5T).
    #[arg(long, value_name = "SIZE")]
    pub quota: Option<String>,
    /// The token clients must present for the --module modules; created
    /// (random) if the file does not exist.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Also let the client (or daemon) with this key fingerprint use the
    /// --module modules, as the token does (repeatable).
    #[arg(long, value_name = "FP")]
    pub allow_key: Vec<String>,
    /// Let clients ask this daemon to copy from the daemon at HOST[:PORT]
    /// directly (remote to remote; repeatable), if it shows the key
    /// FINGERPRINT (`tern fingerprint --server` there).
    #[arg(long, value_name = "HOST[:PORT]=FINGERPRINT")]
    pub pull_from: Vec<String>,
    /// Never compress what crosses with clients, nor accept it compressed
    /// (the config's `compress = "never"`).
    #[arg(long)]
    pub no_compress: bool,
    /// Where the daemon keeps its identity [default: $TERN_STATE_DIR, or
    /// /var/lib/tern for root, or ~/.local/state/tern].
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log debug detail too.
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Log errors only.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// How to reach tern daemons.
#[derive(Debug, Clone, Args)]
pub struct RemoteArgs {
    /// Transport to a daemon: auto picks TCP on a LAN-like path (RTT under
    /// 2 ms) or when the side that sends (this machine for a push, the
    /// daemon for a pull) paces its TCP with BBR, QUIC otherwise (`tern
    /// bench` shows the choice and why).
    #[arg(long, value_name = "auto|quic|tcp", default_value = "auto", value_parser = ["auto", "quic", "tcp"])]
    pub transport: String,
    /// File holding the token for the daemons named (else the credentials
    /// file's entry for each, else $TERN_TOKEN). A token is proved to a
    /// daemon, never sent to it.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// File holding the token for the source daemon only.
    #[arg(long, value_name = "FILE")]
    pub src_token_file: Option<PathBuf>,
    /// File holding the token for the destination daemon only.
    #[arg(long, value_name = "FILE")]
    pub dst_token_file: Option<PathBuf>,
    /// The daemon's key fingerprint, as `tern serve` prints it: trusted
    /// without consulting or changing the known-hosts file.
    #[arg(long, value_name = "FP", env = "TERN_FINGERPRINT")]
    pub fingerprint: Option<String>,
    /// Trust a daemon seen for the first time and pin its key.
    #[arg(long)]
    pub accept_new_host: bool,
    /// Reconnect and resume this many times when the connection drops.
    #[arg(long, value_name = "N", default_value_t = 3)]
    pub retries: u32,
    /// Seconds to wait for a daemon before giving up on a request
    /// [default: 60; 30 for mount, where an application waits on it].
    #[arg(long, value_name = "SECS")]
    pub timeout: Option<u64>,
    /// zstd compression of what crosses to and from daemons, both ways:
    /// auto compresses when the measured link is slower than compressing
    /// (so not on a LAN or loopback) at a level chosen from both rates;
    /// always compresses whatever compresses; data that does not compress
    /// is always sent as it is.
    #[arg(long, value_name = "auto|never|always", default_value = "auto", value_parser = ["auto", "never", "always"])]
    pub compress: String,
    /// The S3 store for s3:// locations, when not AWS: MinIO, Ceph, Garage,
    /// R2... (else $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, the profile's
    /// endpoint_url). Plain http:// only when named so.
    #[arg(long, value_name = "URL")]
    pub s3_endpoint: Option<String>,
    /// The region to sign s3:// requests for [default: $AWS_REGION,
    /// $AWS_DEFAULT_REGION, the profile's, else us-east-1].
    #[arg(long, value_name = "REGION")]
    pub s3_region: Option<String>,
    /// The profile of ~/.aws/credentials and ~/.aws/config for s3://
    /// locations [default: $AWS_PROFILE, else default; keys in the
    /// environment come first unless this is given].
    #[arg(long, value_name = "NAME")]
    pub s3_profile: Option<String>,
}

impl RemoteArgs {
    /// `--timeout`, or `default` seconds.
    pub fn timeout_or(&self, default: u64) -> std::time::Duration {
        std::time::Duration::from_secs(self.timeout.unwrap_or(default).max(1))
    }
}

/// Options shared by copy and sync.
#[derive(Debug, Args)]
pub struct TransferArgs {
    /// rsync's archive mode, accepted for rsync habits: tern always copies
    /// recursively and keeps symlinks, permissions, times, and owners when
    /// run as root (devices and FIFOs are skipped and counted).
    #[arg(short = 'a', long)]
    pub archive: bool,
    /// rsync's recursive mode, accepted for rsync habits: tern always is.
    #[arg(short = 'r', long)]
    pub recursive: bool,
    /// rsync's --partial --progress: shows progress; partial files are always
    /// kept for a resume (large files, with their journal).
    #[arg(short = 'P')]
    pub partial_progress: bool,
    /// rsync's --partial, accepted for rsync habits: tern always keeps what
    /// an interrupted run wrote of a large file (`.NAME.tern.tmp` beside it,
    /// with a journal of its verified chunks; no --partial-dir is needed)
    /// and resumes it on the next run.
    #[arg(long)]
    pub partial: bool,
    /// Show what would be done; change nothing.
    #[arg(short = 'n', long)]
    pub dry_run: bool,
    /// Decide what changed by comparing BLAKE3 hashes instead of size and
    /// modification time.
    #[arg(short = 'c', long)]
    pub checksum: bool,
    /// Files of the same size at the destination are unchanged, whatever
    /// their modification times (their times are then updated).
    #[arg(long)]
    pub size_only: bool,
    /// Leave alone every file the destination already has; send only new
    /// ones.
    #[arg(long)]
    pub ignore_existing: bool,
    /// Leave alone files modified later at the destination than at the
    /// source (one of the same time but another size is still sent).
    #[arg(short = 'u', long)]
    pub update: bool,
    /// Modification times at most SECS apart count as the same, compared
    /// in whole seconds (e.g. 2 for FAT and exFAT); by default only equal
    /// times do, nanoseconds included.
    #[arg(short = '@', long, value_name = "SECS")]
    pub modify_window: Option<u64>,
    /// Make a new directory only when something lands in or beneath it,
    /// so a filtered copy brings no empty directory chains.
    #[arg(short = 'm', long)]
    pub prune_empty_dirs: bool,
    /// Print each change as rsync's `-i` does, on stdout: `YXcstpoguax
    /// PATH`, e.g. `>f+++++++++ new.txt`, `>f.st...... changed.txt`,
    /// `cd+++++++++ dir/`, `*deleting   old.txt` (`<` for files sent to a
    /// daemon).
    #[arg(short = 'i', long)]
    pub itemize_changes: bool,
    /// After the run, print rsync's statistics block on stdout (files
    /// transferred, literal and matched data, bytes sent and received).
    #[arg(long, conflicts_with = "json")]
    pub stats: bool,
    /// Keep each file the run replaces or deletes: renamed with --suffix
    /// beside it, or moved to --backup-dir. A deleted directory is kept
    /// whole. With --delete, sync never deletes the backups beside files.
    #[arg(short = 'b', long)]
    pub backup: bool,
    /// Keep backups in DIR, each at its path below the destination
    /// (implies --backup); a relative DIR is relative to the destination,
    /// and for a daemon must stay inside its module. A run neither deletes
    /// nor writes into a DIR inside the destination.
    #[arg(long, value_name = "DIR")]
    pub backup_dir: Option<PathBuf>,
    /// Appended to each backup's name [default: `~`; nothing with
    /// --backup-dir].
    #[arg(long, value_name = "SUFFIX")]
    pub suffix: Option<std::ffi::OsString>,
    /// Transfer only the paths FILE lists, one a line, relative to the
    /// source (`-` reads stdin; `#` and `;` lines are comments); a listed
    /// directory comes with everything in it. The filters still apply.
    #[arg(long, value_name = "FILE")]
    pub files_from: Option<PathBuf>,
    /// The --files-from list is separated by NUL bytes, not lines (as
    /// `find -print0` writes).
    #[arg(short = '0', long, requires = "files_from")]
    pub from0: bool,
    /// Leave alone files smaller than SIZE (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub min_size: Option<u64>,
    /// Leave alone files larger than SIZE (suffixes K, M, G, T).
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_size: Option<u64>,
    #[command(flatten)]
    pub filter: FilterArgs,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Number of parallel workers [default: twice the CPUs, 4 to 16; at least
    /// 8 over QUIC to a daemon 10 ms or more away].
    #[arg(short = 'j', long, value_name = "N")]
    pub jobs: Option<usize>,
    /// Do not fsync written data before renaming it into place: faster, but
    /// a power cut may leave recently copied files empty or short.
    #[arg(long)]
    pub no_fsync: bool,
    /// Read every written file back from the disk and check it against the
    /// source's BLAKE3 before it is put in place.
    #[arg(long)]
    pub verify: bool,
    /// Preserve hard links between source files.
    #[arg(short = 'H', long)]
    pub hard_links: bool,
    /// Preserve extended attributes.
    #[arg(short = 'X', long)]
    pub xattrs: bool,
    /// Chunk size for large files: a power of two from 64K to 256M.
    #[arg(long, value_name = "SIZE", value_parser = parse_size, default_value = "8M")]
    pub chunk_size: u64,
    /// Limit the write rate, in bytes per second (suffixes K, M, G).
    #[arg(long, value_name = "RATE", value_parser = parse_size)]
    pub bwlimit: Option<u64>,
    /// Send changed files whole, never as the difference from the
    /// destination's old version (the default between local paths).
    #[arg(short = 'W', long)]
    pub whole_file: bool,
    /// Send a changed file of 16 KiB or more as its difference from the old
    /// version also between local paths (the default when a local file goes
    /// to a daemon).
    #[arg(long, conflicts_with = "whole_file")]
    pub no_whole_file: bool,
    #[command(flatten)]
    pub remote: RemoteArgs,
}

/// Include/exclude rules.
#[derive(Debug, Args)]
pub struct FilterArgs {
    /// Skip paths matching PATTERN (rsync glob rules; repeatable). Rules are
    /// tried in the order given, with --include; the first match decides.
    #[arg(long, value_name = "PATTERN")]
    pub exclude: Vec<OsString>,
    /// Do not skip paths matching PATTERN (repeatable).
    #[arg(long, value_name = "PATTERN")]
    pub include: Vec<OsString>,
    /// Read exclude patterns from FILE, one a line (`+ PAT` includes; `#`
    /// and `;` start comments).
    #[arg(long, value_name = "FILE")]
    pub exclude_from: Vec<PathBuf>,
}

/// Output options.
#[derive(Debug, Args)]
pub struct OutputArgs {
    /// Show a progress bar (default when stderr is a terminal).
    #[arg(long, overrides_with = "no_progress")]
    pub progress: bool,
    /// Never show a progress bar.
    #[arg(long)]
    pub no_progress: bool,
    /// Print one JSON summary on stdout (and nothing else there).
    #[arg(long)]
    pub json: bool,

    /// List each change (-v); add log messages (-vv, -vvv).
    #[arg(short, long, action = clap::ArgAction::Count)]
    pub verbose: u8,
    /// Print errors only.
    #[arg(short, long, conflicts_with = "verbose")]
    pub quiet: bool,
}

/// Parses `8M`, `64K`, `1G` or a plain number of bytes (powers of 1024).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let (num, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1u64 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return Err(format!("unknown size suffix {c:?} in {s:?} (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a size (examples: 65536, 64K, 8M)"))?;
    n.checked_mul(mult).ok_or_else(|| format!("{s:?} is too large"))
}
