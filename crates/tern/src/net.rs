//! The command line's network side: `tern serve`, `tern fingerprint`, and
//! connecting to daemons named as copy/sync/check endpoints.

use std::ffi::OsStr;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context};
use tern_net::compress::Compression;
use tern_net::config::{self, Access, ServerConfig};
use tern_net::identity::Identity;
use tern_net::remote::{ConnectOptions, RemoteEndpoint, TransportChoice};
use tern_net::trust::{config_dir, TrustPolicy};
use tern_net::url::RemoteSpec;

use crate::cli::{Exit, RemoteArgs, ServeArgs};
use crate::credentials;
use crate::UsageError;

/// A copy/sync/check argument: a local path, a daemon location or an S3
/// bucket.
pub enum Loc {
    /// A local path.
    Local(std::ffi::OsString),
    /// A module on a daemon.
    Remote(RemoteSpec),
    /// A bucket, or a prefix in one.
    S3(tern_s3::S3Spec),
}

/// Tells local paths from remote locations.
pub fn parse_loc(arg: &OsStr) -> anyhow::Result<Loc> {
    if let Some(s3) = arg.to_str().and_then(tern_s3::S3Spec::parse) {
        return s3.map(Loc::S3).map_err(|e| UsageError(e.to_string()).into());
    }
    match arg.to_str().and_then(tern_net::url::parse) {
        None => Ok(Loc::Local(arg.to_os_string())),
        Some(Ok(spec)) => Ok(Loc::Remote(spec)),
        Some(Err(e)) => Err(UsageError(e.to_string()).into()),
    }
}

/// Which end of a run a daemon is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Read from.
    Source,
    /// Written to (or compared against).
    Dest,
}

/// The token for the daemon `spec` names, as the `role` it plays: its own
/// flag, else `--token-file`, else the credentials file's entry for it,
/// else `$TERN_TOKEN`.
fn token(spec: &RemoteSpec, r: &RemoteArgs, role: Role) -> anyhow::Result<Option<String>> {
    let own = match role {
        Role::Source => &r.src_token_file,
        Role::Dest => &r.dst_token_file,
    };
    if let Some(f) = own.as_ref().or(r.token_file.as_ref()) {
        return Ok(Some(config::read_token_file(f)?));
    }
    let creds = config_dir().join("credentials");
    if let Some(t) = credentials::lookup(&creds, spec)? {
        return Ok(Some(t));
    }
    Ok(std::env::var("TERN_TOKEN")
        .ok()
        .filter(|t| !t.trim().is_empty())
        .map(|t| t.trim().to_string()))
}

/// The `--compress` choice.
pub fn compression(r: &RemoteArgs) -> Compression {
    match r.compress.as_str() {
        "never" => Compression::Never,
        "always" => Compression::Always,
        _ => Compression::Auto,
    }
}

/// Connects to the module `spec` names.
pub fn connect(spec: &RemoteSpec, r: &RemoteArgs, role: Role, write: bool) -> anyhow::Result<RemoteEndpoint> {
    let opts = connect_options(spec, r, role, write)?;
    let ep = RemoteEndpoint::connect(spec, &opts).with_context(|| spec.display())?;
    // Streams for a listing, the queued changes and a first worker start
    // opening now, while the roots are looked at; the run tops them up to
    // its worker count.
    ep.open_streams_ahead(3);
    Ok(ep)
}

/// Connects to the bucket or prefix `spec` names, with the credentials and
/// store the flags, the environment and the AWS files give.
pub fn connect_s3(spec: &tern_s3::S3Spec, r: &RemoteArgs) -> anyhow::Result<tern_s3::S3Endpoint> {
    let opts = tern_s3::S3Options {
        endpoint: r.s3_endpoint.clone(),
        region: r.s3_region.clone(),
        profile: r.s3_profile.clone(),
    };
    let cfg = tern_s3::resolve(&opts, &|k| std::env::var(k).ok()).with_context(|| spec.display())?;
    // Journals of multipart uploads and objects' metadata, for later runs.
    let state = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .map(|d| d.join("tern"));
    Ok(tern_s3::S3Endpoint::connect(spec, &cfg, r.timeout_or(60), state)?)
}

/// The modules of the daemon `spec` names that this client may use.
pub fn list_modules(spec: &RemoteSpec, r: &RemoteArgs) -> anyhow::Result<Vec<tern_proto::ModuleInfo>> {
    let opts = connect_options(spec, r, Role::Source, false)?;
    tern_net::remote::list_modules(spec, &opts).with_context(|| format!("tern://{}/", spec.authority()))
}

fn connect_options(spec: &RemoteSpec, r: &RemoteArgs, role: Role, write: bool) -> anyhow::Result<ConnectOptions> {
    let transport = match r.transport.as_str() {
        "quic" => TransportChoice::Quic,
        "tcp" => TransportChoice::Tcp,
        _ => TransportChoice::Auto,
    };
    let dir = config_dir();
    Ok(ConnectOptions {
        transport,
        token: token(spec, r, role)?,
        ticket: None,
        trust: TrustPolicy {
            fingerprint: r.fingerprint.clone(),
            accept_new: r.accept_new_host,
            known_hosts: dir.join("known_hosts"),
        },
        identity_dir: Some(dir.join("identity")),
        timeout: r.timeout_or(60),
        write,
        compress: compression(r),
    })
}

/// `tern fingerprint`.
pub fn fingerprint(server: bool, state_dir: Option<&Path>) -> anyhow::Result<Exit> {
    let dir = match (server, state_dir) {
        (_, Some(d)) => d.to_path_buf(),
        (true, None) => config::default_state_dir(),
        (false, None) => config_dir().join("identity"),
    };
    let id = Identity::load_or_create(&dir)?;
    println!("{}", id.fingerprint());
    Ok(Exit::Ok)
}

/// `tern serve`.
pub fn serve(a: &ServeArgs) -> anyhow::Result<Exit> {
    let mut cfg = match &a.config {
        Some(p) => ServerConfig::from_file(p)?,
        None => ServerConfig::empty(),
    };
    if let Some(d) = &a.state_dir {
        cfg.state_dir = d.clone();
    }
    for l in &a.listen {
        cfg.listen
            .push(config::parse_listen(l).map_err(|e| UsageError(e.to_string()))?);
    }
    let access = if a.read_write { Access::ReadWrite } else { Access::Read };
    let mut cli_modules = Vec::new();
    for m in &a.module {
        let Some((name, path)) = m.split_once('=') else {
            return Err(UsageError(format!("--module takes NAME=PATH, not `{m}`")).into());
        };
        cfg.add_module(name, Path::new(path), access, None)?;
        if let Some(q) = &a.quota {
            let bytes = config::parse_size(q, "--quota").map_err(|e| UsageError(e.to_string()))?;
            if let Some(m) = cfg.modules.get_mut(name) {
                m.quota = Some(bytes);
            }
        }
        cli_modules.push(name.to_string());
    }
    for fp in &a.allow_key {
        let fp = tern_net::identity::normalize_fingerprint(fp).map_err(|e| UsageError(e.to_string()))?;
        let modules = if cli_modules.is_empty() {
            vec!["*".to_string()]
        } else {
            cli_modules.clone()
        };
        cfg.grants.push(config::Grant {
            token_hash: None,
            client: Some(fp),
            modules,
            access,
        });
    }
    if a.no_compress {
        cfg.compress = false;
    }
    for p in &a.pull_from {
        cfg.pull_from
            .push(config::PullPeer::parse(p).map_err(|e| UsageError(e.to_string()))?);
    }
    if cfg.modules.is_empty() {
        bail!(UsageError(
            "nothing to serve: give --module NAME=PATH or a --config with modules".into()
        ));
    }
    let id = Identity::load_or_create(&cfg.state_dir)?;
    // Modules from the command line get a token: the --token-file one, or
    // one generated into the state directory when no access is configured.
    let mut token_note = None;
    let token_file = match (&a.token_file, cfg.grants.is_empty()) {
        (Some(f), _) => Some(f.clone()),
        (None, true) => Some(cfg.state_dir.join("token")),
        (None, false) => None,
    };
    if let Some(f) = token_file.filter(|_| !cli_modules.is_empty() || cfg.grants.is_empty()) {
        let (t, created) = config::token_file_or_create(&f)?;
        let modules = if cli_modules.is_empty() {
            vec!["*".to_string()]
        } else {
            cli_modules.clone()
        };
        cfg.grants.push(config::Grant {
            token_hash: Some(blake3::hash(t.as_bytes())),
            client: None,
            modules,
            access,
        });
        token_note = Some((f, t, created));
    }
    let daemon = tern_net::daemon::Daemon::start(&cfg, &id)?;
    let mut o = std::io::stdout().lock();
    let addrs: Vec<String> = daemon.addrs().iter().map(|a| a.to_string()).collect();
    writeln!(o, "tern daemon listening on {} (QUIC and TCP)", addrs.join(", "))?;
    writeln!(o, "fingerprint: {}", id.fingerprint())?;
    for m in cfg.modules.values() {
        let rw = if m.access == Access::ReadWrite {
            "read-write"
        } else {
            "read-only"
        };
        let c = m.comment.as_deref().map(|c| format!(" - {c}")).unwrap_or_default();
        writeln!(o, "module {}: {} ({rw}){c}", m.name, m.path.display())?;
    }
    if !cfg.pull_from.is_empty() {
        let peers: Vec<String> = cfg
            .pull_from
            .iter()
            .map(|p| format!("{} ({})", p.authority(), p.fingerprint))
            .collect();
        writeln!(o, "pulls on request from: {}", peers.join(", "))?;
    }
    if let Some((f, t, created)) = &token_note {
        // Shown once, when made: at later starts the banner (often in a
        // log) names only the file.
        if *created {
            writeln!(o, "token (created {}): {t}", f.display())?;
        } else {
            writeln!(o, "token: in {}", f.display())?;
        }
        writeln!(o, "clients authenticate with --token-file FILE or TERN_TOKEN=<token>")?;
    }
    // A push to a module clients may write, else a listing of one.
    let writable = cfg.modules.iter().find(|(_, m)| m.access == config::Access::ReadWrite);
    let example = match (writable, cfg.modules.keys().next()) {
        (Some((m, _)), _) => Some(format!("tern copy FILE tern://{{a}}/{m}/")),
        (None, Some(m)) => Some(format!("tern ls tern://{{a}}/{m}/")),
        (None, None) => None,
    };
    if let (Some(a), Some(example)) = (daemon.addrs().first(), example) {
        writeln!(
            o,
            "try: {} --fingerprint {} --token-file TOKENFILE",
            example.replace("{a}", &a.to_string()),
            id.fingerprint()
        )?;
    }
    o.flush()?;
    drop(o);
    daemon.run_until_signal(Duration::from_secs(10))?;
    Ok(Exit::Ok)
}

/// The module-relative name a remote source is copied under.
pub fn remote_name(spec: &RemoteSpec) -> PathBuf {
    match spec.path.file_name() {
        Some(n) => PathBuf::from(n),
        None => PathBuf::from(&spec.module),
    }
}
