//! The daemon's configuration: a TOML file and/or command-line quick start.
//!
//! ```toml
//! listen = ["0.0.0.0:7373"]
//! state_dir = "/var/lib/tern"
//! # Daemons this one may pull from when a client asks it to copy from them
//! # directly (remote to remote): HOST:PORT or HOST (any port), each pinned
//! # to its key (`tern fingerprint --server` there). Empty (the default):
//! # never. The source daemon must also grant this daemon's key in its
//! # [[clients]], and the client must be allowed to read the source.
//! pull_from = ["nas.example:7373=b3:..."]
//! # zstd between this daemon and its clients: "auto" (the default: when a
//! # client's measurements, or its --compress always, ask for it) or
//! # "never" (this daemon neither compresses nor accepts compressed data).
//! compress = "auto"
//!
//! [modules.data]
//! path = "/srv/data"
//! access = "read-write"      # default "read-only"
//! comment = "shared data"
//! # What clients may set on what they write (the defaults are shown).
//! # Set-user-id and set-group-id bits are cleared (set-group-id is kept
//! # on directories, where it only makes new entries inherit the group):
//! setid = false
//! # When the daemon runs as root: owner and group of everything written,
//! # whatever the client asks (default: what it asks, with 0 replaced by
//! # the owner of `path`, or 65534 where that is root too):
//! # uid = 1000
//! # gid = 1000
//! root_owner = false        # true: owner or group 0 is kept
//! # Extended attribute namespaces clients may write and read, of
//! # "user", "trusted", "security" and "system"; others are dropped:
//! xattrs = ["user"]
//! # Bytes clients may keep in the module (files, partial uploads
//! # included; e.g. "500G", "1.5T"); default: no cap.
//! # quota = "500G"
//!
//! [[tokens]]
//! token_file = "/etc/tern/data.token"   # or token = "..." (16 bytes at least)
//! modules = ["data"]                   # or ["*"]
//! access = "read-write"                # or "read"
//!
//! [[clients]]
//! fingerprint = "b3:..."               # `tern fingerprint` on the client
//! modules = ["*"]
//! access = "read"
//!
//! [limits]
//! max_connections = 256          # authenticated connections
//! max_handshakes = 128           # connections not yet authenticated
//! max_handshakes_per_address = 32  # of those, from one address (IPv6: /64)
//! streams_per_connection = 64
//! handshake_timeout_secs = 10    # TLS, Hello and Auth, from the connect
//! idle_timeout_secs = 300
//! max_request_memory_mib = 1024  # buffers of all requests in progress
//! max_pulls = 4                  # remote-to-remote transfers at once
//! # max_open_files = 4096   # default: half the open-file limit, less 64
//! # Partial files and journals that interrupted uploads left and no rerun
//! # resumed are removed after this many days (checked at start, then
//! # hourly); 0 keeps them forever.
//! partial_max_age_days = 7
//! ```

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::error::{NetError, Result};
use crate::identity::normalize_fingerprint;
use crate::transport::Limits;

/// The port tern listens on unless told otherwise.
pub const DEFAULT_PORT: u16 = 7373;

/// Read or read-write.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "kebab-case")]
pub enum Access {
    /// Read only.
    #[default]
    #[serde(alias = "read-only")]
    Read,
    /// Read and write.
    ReadWrite,
}

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FileCfg {
    #[serde(default)]
    listen: Vec<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    modules: BTreeMap<String, ModuleCfg>,
    #[serde(default)]
    tokens: Vec<TokenCfg>,
    #[serde(default)]
    clients: Vec<ClientCfg>,
    #[serde(default)]
    pull_from: Vec<String>,
    compress: Option<String>,
    #[serde(default)]
    limits: LimitsCfg,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ModuleCfg {
    path: PathBuf,
    #[serde(default)]
    access: Access,
    comment: Option<String>,
    #[serde(default)]
    setid: bool,
    uid: Option<u32>,
    gid: Option<u32>,
    #[serde(default)]
    root_owner: bool,
    xattrs: Option<Vec<String>>,
    quota: Option<Size>,
}

/// A size in the config: a number of bytes, or a string such as `"500G"`,
/// `"1.5 TiB"` or `"200MB"` (K, M, G, T are powers of 1024).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Size {
    Bytes(u64),
    Text(String),
}

impl Size {
    fn bytes(&self, what: &str) -> Result<u64> {
        match self {
            Size::Bytes(n) => Ok(*n),
            Size::Text(t) => parse_size(t, what),
        }
    }
}

/// Parses a size such as `500G`, `1.5 TiB`, `200MB` or `4096` (K, M, G, T,
/// P are powers of 1024); `what` names the setting in the error.
pub fn parse_size(text: &str, what: &str) -> Result<u64> {
    let text = text.trim();
    let bad = || {
        NetError::Config(format!(
            "{what}: `{text}` is not a size (write e.g. 500G, 1.5T or 200M)"
        ))
    };
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (num, unit) = text.split_at(split);
    let num: f64 = num.parse().map_err(|_| bad())?;
    let unit = unit.trim().to_ascii_lowercase();
    let unit = unit.trim_end_matches('b').trim_end_matches('i');
    let scale: u64 = match unit {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        "t" => 1 << 40,
        "p" => 1 << 50,
        _ => return Err(bad()),
    };
    let bytes = num * scale as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenCfg {
    token: Option<String>,
    token_file: Option<PathBuf>,
    modules: Vec<String>,
    #[serde(default)]
    access: Access,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ClientCfg {
    fingerprint: String,
    modules: Vec<String>,
    #[serde(default)]
    access: Access,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct LimitsCfg {
    max_connections: usize,
    max_handshakes: usize,
    max_handshakes_per_address: usize,
    streams_per_connection: u32,
    handshake_timeout_secs: u64,
    idle_timeout_secs: u64,
    max_open_files: Option<usize>,
    max_request_memory_mib: u64,
    max_pulls: usize,
    partial_max_age_days: u64,
}

impl Default for LimitsCfg {
    fn default() -> Self {
        let d = Limits::default();
        LimitsCfg {
            max_connections: d.max_conns,
            max_handshakes: d.max_handshakes,
            max_handshakes_per_address: d.max_handshakes_per_addr,
            streams_per_connection: d.streams_per_conn,
            handshake_timeout_secs: d.handshake.as_secs(),
            idle_timeout_secs: d.idle.as_secs(),
            max_open_files: None,
            max_request_memory_mib: d.request_memory >> 20,
            max_pulls: d.max_pulls,
            partial_max_age_days: DEFAULT_PARTIAL_MAX_AGE_DAYS,
        }
    }
}

/// An exported directory.
#[derive(Debug, Clone)]
pub struct ModuleConfig {
    /// Its name in URLs.
    pub name: String,
    /// The directory.
    pub path: PathBuf,
    /// Whether it may be written at all.
    pub access: Access,
    /// Free text shown to clients.
    pub comment: Option<String>,
    /// Keep the set-user-id and set-group-id bits clients ask for
    /// (`setid = true`); else cleared, but for set-group-id on directories.
    pub setid: bool,
    /// Owner of everything clients write, when the daemon runs as root.
    pub uid: Option<u32>,
    /// Group of everything clients write, when the daemon runs as root.
    pub gid: Option<u32>,
    /// Let clients' entries be owned by uid or gid 0; else 0 becomes the
    /// owner (group) of the module's directory, or 65534 where that is 0.
    pub root_owner: bool,
    /// Extended attribute namespaces clients may write and read.
    pub xattrs: Vec<String>,
    /// Bytes clients may keep in the module, if capped.
    pub quota: Option<u64>,
}

impl ModuleConfig {
    /// What the daemon lets clients set in this module.
    pub fn meta_policy(&self) -> Result<tern_core::MetaPolicy> {
        use std::os::unix::fs::MetadataExt;
        let md =
            std::fs::metadata(&self.path).map_err(|e| NetError::Config(format!("{}: {e}", self.path.display())))?;
        Ok(tern_core::MetaPolicy {
            setid: self.setid,
            uid: self.uid,
            gid: self.gid,
            root_owner: self.root_owner,
            xattrs: self.xattrs.clone(),
            ..tern_core::MetaPolicy::strict((md.uid(), md.gid()))
        })
    }
}

/// Who may do what: a token or a client key, for some modules.
#[derive(Debug, Clone)]
pub struct Grant {
    /// BLAKE3 of the token, if this grant is for a token.
    pub token_hash: Option<blake3::Hash>,
    /// Client certificate fingerprint, if this grant is for a key.
    pub client: Option<String>,
    /// Module names, or `*` for all.
    pub modules: Vec<String>,
    /// What it allows.
    pub access: Access,
}

impl Grant {
    /// Whether the grant covers `module`.
    pub fn covers(&self, module: &str) -> bool {
        self.modules.iter().any(|m| m == "*" || m == module)
    }
}

/// Everything the daemon needs.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Addresses to listen on.
    pub listen: Vec<SocketAddr>,
    /// Where the identity (and a generated token) live.
    pub state_dir: PathBuf,
    /// Modules by name.
    pub modules: BTreeMap<String, ModuleConfig>,
    /// Grants.
    pub grants: Vec<Grant>,
    /// Daemons this one may pull from on a client's behalf.
    pub pull_from: Vec<PullPeer>,
    /// Per-client limits.
    pub limits: Limits,
    /// How old an abandoned partial file or journal gets before it is
    /// removed; `None`: never.
    pub partial_max_age: Option<Duration>,
    /// Whether zstd containers may cross with clients (`compress = "auto"`).
    pub compress: bool,
}

/// Days after which abandoned partial files are removed, unless configured.
const DEFAULT_PARTIAL_MAX_AGE_DAYS: u64 = 7;

fn days(n: u64) -> Option<Duration> {
    (n > 0).then(|| Duration::from_secs(n.saturating_mul(24 * 3600)))
}

/// A daemon this one may pull from: a host (any port) or host and port,
/// and the key it must show.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullPeer {
    /// Host name or address, compared without case.
    pub host: String,
    /// The port, or any.
    pub port: Option<u16>,
    /// The key fingerprint the daemon there must show.
    pub fingerprint: String,
}

impl PullPeer {
    /// Parses `HOST[:PORT]=FINGERPRINT` (`[V6]` and `[V6]:PORT` for IPv6).
    pub fn parse(s: &str) -> Result<PullPeer> {
        let bad = || {
            NetError::Config(format!(
                "pull_from: `{s}` is not HOST[:PORT]=FINGERPRINT (the source daemon's `tern fingerprint --server`)"
            ))
        };
        let Some((addr, fp)) = s.rsplit_once('=') else {
            return Err(NetError::Config(format!(
                "pull_from: `{s}` names no key: write `{s}=FINGERPRINT` with what `tern fingerprint --server` \
                 prints on that daemon, so this daemon never pulls from another that answers at that address"
            )));
        };
        let fingerprint = normalize_fingerprint(fp).map_err(|_| bad())?;
        let (host, port) = crate::url::split_authority(addr).ok_or_else(bad)?;
        let port = port.map(|p| p.parse::<u16>().map_err(|_| bad())).transpose()?;
        if host.is_empty() || host.contains(['/', ' ', '*']) {
            return Err(bad());
        }
        Ok(PullPeer {
            host: host.to_ascii_lowercase(),
            port,
            fingerprint,
        })
    }

    /// Whether this entry is for `host:port`.
    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.host.eq_ignore_ascii_case(host) && self.port.is_none_or(|p| p == port)
    }

    /// `HOST[:PORT]`, for messages.
    pub fn authority(&self) -> String {
        let host = if self.host.contains(':') {
            format!("[{}]", self.host)
        } else {
            self.host.clone()
        };
        match self.port {
            Some(p) => format!("{host}:{p}"),
            None => host,
        }
    }
}

/// The fewest bytes a token may have: shorter ones are guessable.
pub const MIN_TOKEN_LEN: usize = 16;

/// `token` if it is long enough to be a secret; `what` names it in the
/// error.
pub fn check_token(token: String, what: &str) -> Result<String> {
    if token.len() < MIN_TOKEN_LEN {
        return Err(NetError::Config(format!(
            "{what} has {} bytes; a token needs {MIN_TOKEN_LEN} at least (`tern serve` makes one of 48 when \
             its --token-file does not exist yet)",
            token.len()
        )));
    }
    Ok(token)
}

/// Reads a token from a file: its first line, trimmed; at least
/// [`MIN_TOKEN_LEN`] bytes. A file other users could read or change is
/// warned about (as ssh does for keys), not refused: a token file shared
/// with a group of client users is a choice an administrator may make.
pub fn read_token_file(p: &Path) -> Result<String> {
    let s =
        std::fs::read_to_string(p).map_err(|e| NetError::Config(format!("{}: cannot read token: {e}", p.display())))?;
    let t = s.lines().next().unwrap_or("").trim().to_string();
    if t.is_empty() {
        return Err(NetError::Config(format!("{}: the token file is empty", p.display())));
    }
    if let Some(mode) = open_to_others(p) {
        tracing::warn!(
            "{}: the token file can be read or changed by other users (mode {mode:04o}); run `chmod 600 {}`",
            p.display(),
            p.display()
        );
    }
    check_token(t, &format!("the token in {}", p.display()))
}

/// Reads the token in `p` ([`read_token_file`]), or, where there is no
/// such file, makes a random one (48 hex digits) and writes it there, only
/// its owner able to read it; true when it was made.
pub fn token_file_or_create(p: &Path) -> Result<(String, bool)> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if std::fs::symlink_metadata(p).is_ok() {
        return Ok((read_token_file(p)?, false));
    }
    let mut raw = [0u8; 24];
    crate::server::getrandom(&mut raw)?;
    let t: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    let err = |e: std::io::Error| NetError::Config(format!("{}: cannot create the token file: {e}", p.display()));
    if let Some(d) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(d).map_err(err)?;
    }
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(p)
        .map_err(err)?;
    writeln!(file, "{t}").map_err(err)?;
    Ok((t, true))
}

/// The permission bits of `p` if group or others have any access to it.
fn open_to_others(p: &Path) -> Option<u32> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p).ok()?.permissions().mode() & 0o7777;
    (mode & 0o077 != 0).then_some(mode)
}

/// Parses a listen address; a bare host gets the default port.
pub fn parse_listen(s: &str) -> Result<SocketAddr> {
    use std::net::{IpAddr, ToSocketAddrs};
    let bad = || {
        NetError::Config(format!(
            "`{s}` is not an address to listen on (try 127.0.0.1:{DEFAULT_PORT})"
        ))
    };
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let bare = s.strip_prefix('[').and_then(|x| x.strip_suffix(']')).unwrap_or(s);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, DEFAULT_PORT));
    }
    let found = match s.rsplit_once(':') {
        Some((_, port)) if port.parse::<u16>().is_ok() => s.to_socket_addrs(),
        Some(_) => return Err(bad()),
        None => (s, DEFAULT_PORT).to_socket_addrs(),
    };
    found.ok().and_then(|mut a| a.next()).ok_or_else(bad)
}

impl ServerConfig {
    /// Loads a TOML configuration file.
    pub fn from_file(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| NetError::Config(format!("{}: {e}", path.display())))?;
        Self::from_toml(&text, path.parent().unwrap_or(Path::new(".")))
            .map_err(|e| NetError::Config(format!("{}: {e}", path.display())))
    }

    /// Parses a configuration; relative paths are taken from `base`.
    pub fn from_toml(text: &str, base: &Path) -> Result<ServerConfig> {
        let f: FileCfg = toml::from_str(text).map_err(|e| NetError::Config(e.to_string()))?;
        let abs = |p: &Path| if p.is_absolute() { p.to_path_buf() } else { base.join(p) };
        let mut cfg = ServerConfig::empty();
        for l in &f.listen {
            cfg.listen.push(parse_listen(l)?);
        }
        if let Some(d) = &f.state_dir {
            cfg.state_dir = abs(d);
        }
        for (name, m) in f.modules {
            cfg.add_module(&name, &abs(&m.path), m.access, m.comment)?;
            let module = cfg
                .modules
                .get_mut(&name)
                .ok_or_else(|| NetError::Config(format!("module `{name}` vanished")))?;
            if let Some(x) = m.xattrs {
                if let Some(bad) = x
                    .iter()
                    .find(|n| !tern_core::policy::XATTR_NAMESPACES.contains(&n.as_str()))
                {
                    return Err(NetError::Config(format!(
                        "module `{name}`: xattrs: `{bad}` is not one of {}",
                        tern_core::policy::XATTR_NAMESPACES.join(", ")
                    )));
                }
                module.xattrs = x;
            }
            (module.setid, module.uid, module.gid, module.root_owner) = (m.setid, m.uid, m.gid, m.root_owner);
            module.quota = m
                .quota
                .map(|q| q.bytes(&format!("module `{name}`: quota")))
                .transpose()?;
        }
        for t in f.tokens {
            let token = match (t.token, t.token_file) {
                (Some(t), None) => check_token(t, "a `token` in [[tokens]]")?,
                (None, Some(p)) => {
                    let p = abs(&p);
                    let (t, created) = token_file_or_create(&p)?;
                    if created {
                        tracing::info!(file = %p.display(), "made a new random token (give it to the clients)");
                    }
                    t
                }
                _ => {
                    return Err(NetError::Config(
                        "each [[tokens]] needs exactly one of `token` and `token_file`".into(),
                    ))
                }
            };
            cfg.grants.push(Grant {
                token_hash: Some(blake3::hash(token.as_bytes())),
                client: None,
                modules: t.modules,
                access: t.access,
            });
        }
        for c in f.clients {
            cfg.grants.push(Grant {
                token_hash: None,
                client: Some(normalize_fingerprint(&c.fingerprint)?),
                modules: c.modules,
                access: c.access,
            });
        }
        for g in &cfg.grants {
            for m in &g.modules {
                if m != "*" && !cfg.modules.contains_key(m) {
                    return Err(NetError::Config(format!(
                        "a grant names module `{m}`, which is not defined"
                    )));
                }
            }
        }
        for p in &f.pull_from {
            cfg.pull_from.push(PullPeer::parse(p)?);
        }
        cfg.compress = match f.compress.as_deref() {
            None | Some("auto") => true,
            Some("never") => false,
            Some(other) => {
                return Err(NetError::Config(format!(
                    "compress: `{other}` is not \"auto\" or \"never\""
                )))
            }
        };
        let l = f.limits;
        cfg.limits = Limits {
            handshake: Duration::from_secs(l.handshake_timeout_secs.max(1)),
            idle: Duration::from_secs(l.idle_timeout_secs.max(1)),
            streams_per_conn: l.streams_per_connection.max(1),
            max_conns: l.max_connections.max(1),
            max_handshakes: l.max_handshakes.max(1),
            max_handshakes_per_addr: l.max_handshakes_per_address.max(1),
            open_files: l.max_open_files.map(|n| n.max(1)),
            // A chunk of the largest size must fit.
            request_memory: (l.max_request_memory_mib << 20).max(2 * crate::server::MAX_CHUNK),
            max_pulls: l.max_pulls,
        };
        cfg.partial_max_age = days(l.partial_max_age_days);
        Ok(cfg)
    }

    /// A configuration with nothing in it yet.
    pub fn empty() -> ServerConfig {
        ServerConfig {
            listen: Vec::new(),
            state_dir: default_state_dir(),
            modules: BTreeMap::new(),
            grants: Vec::new(),
            pull_from: Vec::new(),
            limits: Limits::default(),
            partial_max_age: days(DEFAULT_PARTIAL_MAX_AGE_DAYS),
            compress: true,
        }
    }

    /// Adds a module; its directory must exist.
    pub fn add_module(&mut self, name: &str, path: &Path, access: Access, comment: Option<String>) -> Result<()> {
        if name.is_empty()
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
            || name.starts_with('.')
        {
            return Err(NetError::Config(format!(
                "`{name}` is not a module name (letters, digits, `-`, `_` and `.`, not first)"
            )));
        }
        if !path.is_dir() {
            return Err(NetError::Config(format!(
                "module `{name}`: {} is not a directory",
                path.display()
            )));
        }
        if self.modules.contains_key(name) {
            return Err(NetError::Config(format!("module `{name}` is defined twice")));
        }
        let path = path
            .canonicalize()
            .map_err(|e| NetError::Config(format!("{}: {e}", path.display())))?;
        self.modules.insert(
            name.to_string(),
            ModuleConfig {
                name: name.to_string(),
                path,
                access,
                comment,
                setid: false,
                uid: None,
                gid: None,
                root_owner: false,
                xattrs: vec!["user".to_string()],
                quota: None,
            },
        );
        Ok(())
    }
}

/// The daemon's state directory unless configured: `$TERN_STATE_DIR`, else
/// `/var/lib/tern` for root, else `$XDG_STATE_HOME/tern` or
/// `~/.local/state/tern`.
pub fn default_state_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("TERN_STATE_DIR") {
        return PathBuf::from(d);
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return PathBuf::from("/var/lib/tern");
    }
    if let Some(d) = std::env::var_os("XDG_STATE_HOME") {
        return PathBuf::from(d).join("tern");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/state/tern")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_config_parses_and_bad_ones_are_named() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("data")).expect("mkdir");
        std::fs::write(d.path().join("short"), "s3cret\n").expect("write");
        std::fs::write(d.path().join("tok"), "s3cret-s3cret-s3cret\n").expect("write");
        let text = r#"
listen = ["127.0.0.1:9000", "[::1]"]
state_dir = "state"
pull_from = ["a.example:7000=b3:1111111111111111111111111111111111111111111111111111111111111111", "b.example=b3:2222222222222222222222222222222222222222222222222222222222222222", "[::1]:9=b3:3333333333333333333333333333333333333333333333333333333333333333"]
[modules.data]
path = "data"
access = "read-write"
comment = "x"
[[tokens]]
token_file = "tok"
modules = ["data"]
access = "read-write"
[[clients]]
fingerprint = "b3:0000000000000000000000000000000000000000000000000000000000000000"
modules = ["*"]
[limits]
idle_timeout_secs = 5
partial_max_age_days = 2
"#;
        let c = ServerConfig::from_toml(text, d.path()).expect("parse");
        assert_eq!(c.listen[0].port(), 9000);
        assert_eq!(c.listen[1].port(), DEFAULT_PORT);
        assert_eq!(c.state_dir, d.path().join("state"));
        assert_eq!(c.modules["data"].access, Access::ReadWrite);
        assert_eq!(c.grants.len(), 2);
        assert_eq!(c.grants[0].token_hash, Some(blake3::hash(b"s3cret-s3cret-s3cret")));
        assert_eq!(c.grants[1].access, Access::Read);
        assert_eq!(c.limits.idle, Duration::from_secs(5));
        assert_eq!(c.partial_max_age, Some(Duration::from_secs(2 * 86_400)));
        // A token file not there yet is made, as `--token-file` makes it:
        // random, readable by its owner only, and then used.
        let made = ServerConfig::from_toml(
            "[modules.data]\npath = \"data\"\n[[tokens]]\ntoken_file = \"new/tok\"\nmodules = [\"data\"]\n",
            d.path(),
        )
        .expect("parse");
        let tok = std::fs::read_to_string(d.path().join("new/tok")).expect("made");
        assert_eq!(tok.trim().len(), 48);
        assert_eq!(made.grants[0].token_hash, Some(blake3::hash(tok.trim().as_bytes())));
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(d.path().join("new/tok")).expect("stat").permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        let again = ServerConfig::from_toml(
            "[modules.data]\npath = \"data\"\n[[tokens]]\ntoken_file = \"new/tok\"\nmodules = [\"data\"]\n",
            d.path(),
        )
        .expect("parse");
        assert_eq!(again.grants[0].token_hash, made.grants[0].token_hash, "made again");
        let never = ServerConfig::from_toml("[limits]\npartial_max_age_days = 0\n", d.path()).expect("parse");
        assert_eq!(never.partial_max_age, None);
        assert_eq!(
            ServerConfig::empty().partial_max_age,
            Some(Duration::from_secs(7 * 86_400))
        );
        assert!(c.pull_from[0].allows("A.example", 7000) && !c.pull_from[0].allows("a.example", 7001));
        assert!(c.pull_from[1].allows("b.example", 1) && !c.pull_from[1].allows("c.example", 1));
        assert!(c.pull_from[2].allows("::1", 9) && !c.pull_from[2].allows("::1", 10));
        assert_eq!(c.pull_from[2].authority(), "[::1]:9");
        assert!(c.pull_from[1].fingerprint.starts_with("b3:2222"));

        let bad = [
            ("[modules.x]\npath = \"nope\"\n", "not a directory"),
            ("[modules.data]\npath = \"data\"\nacess = \"read\"\n", "unknown field"),
            (
                "[[tokens]]\ntoken = \"long-enough-token\"\nmodules = [\"other\"]\n",
                "not defined",
            ),
            (
                "[[tokens]]\ntoken = \"\"\nmodules = [\"*\"]\n",
                "has 0 bytes; a token needs 16",
            ),
            (
                "[[tokens]]\ntoken = \"fifteen-bytes!!\"\nmodules = [\"*\"]\n",
                "has 15 bytes",
            ),
            (
                "[[tokens]]\ntoken_file = \"short\"\nmodules = [\"*\"]\n",
                "the token in",
            ),
            ("[[tokens]]\nmodules = [\"*\"]\n", "exactly one"),
            ("listen = [\"nowhere:xx\"]\n", "not an address"),
            ("[modules.\"../x\"]\npath = \"data\"\n", "not a module name"),
            ("pull_from = [\"host:port\"]\n", "names no key"),
            ("pull_from = [\"host:port=b3:00\"]\n", "pull_from"),
            ("pull_from = [\"host:7=nope\"]\n", "pull_from"),
            (
                "pull_from = [\"*=b3:1111111111111111111111111111111111111111111111111111111111111111\"]\n",
                "pull_from",
            ),
            (
                "pull_from = [\"[::1=b3:1111111111111111111111111111111111111111111111111111111111111111\"]\n",
                "pull_from",
            ),
        ];
        for (t, want) in bad {
            let e = ServerConfig::from_toml(t, d.path()).expect_err(t).to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    #[test]
    fn compression_is_on_unless_the_config_says_never() {
        let d = tempfile::tempdir().expect("tempdir");
        let parse = |t: &str| ServerConfig::from_toml(t, d.path());
        assert!(parse("").expect("parse").compress);
        assert!(parse("compress = \"auto\"").expect("parse").compress);
        assert!(!parse("compress = \"never\"").expect("parse").compress);
        let e = parse("compress = \"always\"").expect_err("not a choice").to_string();
        assert!(e.contains("compress: `always`"), "{e}");
    }

    #[test]
    fn module_options_parse_and_default_to_what_keeps_clients_unprivileged() {
        let d = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(d.path().join("a")).expect("mkdir");
        let text = r#"
[modules.plain]
path = "a"
[modules.open]
path = "a"
setid = true
uid = 1000
gid = 100
root_owner = true
xattrs = ["user", "trusted", "security", "system"]
quota = "1.5 GiB"
[modules.counted]
path = "a"
quota = 4096
"#;
        let c = ServerConfig::from_toml(text, d.path()).expect("parse");
        let plain = &c.modules["plain"];
        assert!(!plain.setid && !plain.root_owner && plain.uid.is_none() && plain.gid.is_none());
        assert_eq!(plain.xattrs, vec!["user"]);
        let p = plain.meta_policy().expect("policy");
        assert_eq!(p, tern_core::MetaPolicy::strict(owner_of(&d.path().join("a"))));
        let open = &c.modules["open"];
        assert!(open.setid && open.root_owner);
        assert_eq!((open.uid, open.gid), (Some(1000), Some(100)));
        let p = open.meta_policy().expect("policy");
        assert_eq!((p.uid, p.gid, p.xattrs.len()), (Some(1000), Some(100), 4));
        assert_eq!((plain.quota, open.quota), (None, Some(3 << 29)));
        assert_eq!(c.modules["counted"].quota, Some(4096));

        let bad = [
            (
                "[modules.x]\npath = \"a\"\nxattrs = [\"user\", \"os2\"]\n",
                "`os2` is not one of",
            ),
            ("[modules.x]\npath = \"a\"\nuid = -1\n", "uid"),
            ("[modules.x]\npath = \"a\"\nsetuid = true\n", "unknown field"),
            (
                "[modules.x]\npath = \"a\"\nquota = \"lots\"\n",
                "module `x`: quota: `lots` is not a size",
            ),
            ("[modules.x]\npath = \"a\"\nquota = \"5 X\"\n", "is not a size"),
        ];
        for (t, want) in bad {
            let e = ServerConfig::from_toml(t, d.path()).expect_err(t).to_string();
            assert!(e.contains(want), "{t}: {e}");
        }
    }

    fn owner_of(p: &Path) -> (u32, u32) {
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(p).expect("stat");
        (md.uid(), md.gid())
    }
}
