//! `s3://BUCKET[/PREFIX]`: an S3-compatible object store as a tern source
//! or destination.
//!
//! Keys below the prefix stand for paths, `/` for the directory separator;
//! a directory is there while a key is beneath it. Each object tern writes
//! carries its file's modification time, mode and BLAKE3 (the `b3sum`
//! string) in its metadata (`x-amz-meta-tern-*`, and rclone's `mtime`), so
//! a later run decides what changed from listings and metadata, and a
//! download is checked against the BLAKE3 the file had when it went up.
//! Every upload carries `Content-MD5`, checked by the store. Reads are
//! ranged GETs pinned with `If-Match` to the ETag listed, so a file
//! replaced meanwhile is an error, never a mix of two versions.
//!
//! Requests are signed by `rusty-s3` (sans-IO SigV4 and S3's XML) and sent
//! by `ureq` (blocking, rustls), as tern's engine calls its endpoints from
//! worker threads.

mod config;
mod imds;
mod journal;

use std::collections::{BTreeMap, HashMap};
use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use md5::Digest as _;
use rusty_s3::actions::{CreateMultipartUpload, ListObjectsV2};
use rusty_s3::S3Action;
use tern_core::endpoint::{BatchBody, BatchItem, BatchOptions, FileSpec, ReadFile, WriteFile, Xattrs};
use tern_core::entry::{Meta, Time};
use tern_core::{Dest, Entry, Kind, Source};

pub use config::{resolve, Resolved, S3Options};

/// How long a signature is good for: one request, retried.
const SIGNED_FOR: Duration = Duration::from_secs(900);
/// S3's limits on multipart uploads.
const MIN_PART: u64 = 5 << 20;
const MAX_PARTS: u64 = 10_000;
/// The largest object one copy request can make (metadata rewritten in
/// place past it is left as it was uploaded).
const MAX_COPY: u64 = 5 << 30;
/// Objects up to this size are read whole where their metadata is asked
/// for: one GET instead of a HEAD and then a GET.
const PREFETCH_MAX: u64 = 64 << 10;
/// The most such bytes kept, waiting to be read.
const PREFETCH_BUDGET: usize = 64 << 20;
/// Keys one `DeleteObjects` request may carry.
const DELETE_BATCH: usize = 1000;
/// Requests in flight at once for a directory's metadata or a batch.
const WINDOW: usize = 32;
/// Attempts for a request that failed on the way or with a 5xx.
const ATTEMPTS: u32 = 4;

/// Metadata keys, after `x-amz-meta-`.
const META_MTIME: &str = "tern-mtime";
const META_MODE: &str = "tern-mode";
const META_BLAKE3: &str = "tern-blake3";
/// rclone's, read and written too.
const META_RCLONE_MTIME: &str = "mtime";

/// What can go wrong before a request is made.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Credentials, endpoint or region.
    #[error("{0}")]
    Config(String),
    /// The `s3://` URL.
    #[error("`{url}`: {why}")]
    Url {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
}

/// A parsed `s3://BUCKET[/PREFIX]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Spec {
    /// The bucket.
    pub bucket: String,
    /// The key prefix, no `/` at either end; empty for the whole bucket.
    pub prefix: String,
    /// The URL ended with `/` (rsync's rule: the contents, not the name).
    pub trailing_slash: bool,
}

impl S3Spec {
    /// `Some` when `arg` is an `s3://` URL (then valid or not).
    pub fn parse(arg: &str) -> Option<Result<S3Spec, Error>> {
        let rest = arg.strip_prefix("s3://")?;
        let bad = |why: &str| {
            Err(Error::Url {
                url: arg.to_string(),
                why: why.to_string(),
            })
        };
        let (bucket, path) = rest.split_once('/').unwrap_or((rest, ""));
        if bucket.is_empty() {
            return Some(bad("no bucket: give s3://BUCKET[/PREFIX]"));
        }
        let valid = bucket.len() <= 63
            && bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.' || b == b'_');
        if !valid {
            return Some(bad("not a bucket name (lower-case letters, digits, `-`, `.`)"));
        }
        let trailing_slash = path.ends_with('/') || (path.is_empty() && rest.ends_with('/'));
        let parts: Vec<&str> = path.split('/').filter(|c| !c.is_empty()).collect();
        if parts.iter().any(|c| *c == "." || *c == "..") {
            return Some(bad("`.` and `..` have no meaning in a key"));
        }
        Some(Ok(S3Spec {
            bucket: bucket.to_string(),
            prefix: parts.join("/"),
            trailing_slash: trailing_slash || parts.is_empty(),
        }))
    }

    /// As the user would write it.
    pub fn display(&self) -> String {
        match self.prefix.is_empty() {
            true => format!("s3://{}/", self.bucket),
            false => format!("s3://{}/{}", self.bucket, self.prefix),
        }
    }

    /// The last component of the prefix (what a copy without a trailing
    /// slash lands as), or the bucket's name.
    pub fn name(&self) -> PathBuf {
        PathBuf::from(
            self.prefix
                .rsplit('/')
                .next()
                .filter(|n| !n.is_empty())
                .unwrap_or(&self.bucket),
        )
    }
}

/// An object's metadata, as a HEAD or a write gave it.
#[derive(Debug, Clone)]
struct Head {
    size: u64,
    etag: String,
    mtime: Time,
    mode: u32,
    blake3: Option<blake3::Hash>,
    /// `LastModified` as a listing showed it: with the ETag and size, it
    /// tells this version from any other (every write of an object, its
    /// metadata's too, changes it). None until a listing shows it.
    listed: Option<String>,
}

struct Inner {
    agent: ureq::Agent,
    bucket: rusty_s3::Bucket,
    creds: rusty_s3::Credentials,
    /// Where the credentials came from, for messages.
    creds_from: String,
    /// The store and the key used there: two endpoints with the same can
    /// copy between each other's keys at the store.
    store_id: String,
    spec: S3Spec,
    /// What HEADs and writes said of each key.
    heads: Mutex<HashMap<String, Head>>,
    /// Where the journals of multipart uploads are kept, for a later run
    /// to resume them; None: uploads are not resumed.
    journals: Option<PathBuf>,
    /// Where what HEADs said is kept for later runs; None: not kept.
    meta_cache: Option<PathBuf>,
    /// Small objects are read whole while listed (a source's); false for
    /// a destination, whose objects are seldom read.
    prefetch: std::sync::atomic::AtomicBool,
    /// Keys this run listed or found as objects (files, not directories).
    files_seen: Mutex<std::collections::HashSet<String>>,
    /// Keys `remove` queued, and the path each was removed as.
    doomed: Mutex<Vec<(String, PathBuf)>>,
    /// What deleting them failed with, for `settle`.
    delete_errors: Mutex<Vec<tern_core::Error>>,
    /// Held while queued deletions are sent.
    flushing: Mutex<()>,
    /// Small objects read whole while listing (bytes held, and by key
    /// their ETag and bytes), for the read that follows.
    bodies: Mutex<(usize, HashMap<String, Kept>)>,
    /// Directories listed ahead by one recursive listing, by their prefix:
    /// the objects directly in each, and its subdirectories' prefixes.
    walked: Mutex<HashMap<String, DirListing>>,
}

/// A small object's bytes read ahead, and the ETag they are of.
type Kept = (String, Vec<u8>);

/// What one directory holds: objects, and subdirectory prefixes.
type DirListing = (Vec<Listed>, Vec<String>);

impl Drop for Inner {
    fn drop(&mut self) {
        if let (Some(p), Ok(heads)) = (&self.meta_cache, self.heads.lock()) {
            if let Err(e) = save_heads(p, &heads) {
                tracing::debug!(file = %p.display(), error = %e, "object metadata not kept for later runs");
            }
        }
    }
}

const CACHE_MAGIC: &str = "tern-s3-meta 1";

/// Keeps what is known of each version seen, for a later run: a line per
/// object, the key in hex. Written beside and renamed.
fn save_heads(path: &Path, heads: &HashMap<String, Head>) -> std::io::Result<()> {
    let mut text = format!("{CACHE_MAGIC}\n");
    for (k, h) in heads {
        // Written by this run and not listed since: its ETag and size
        // stand for it until a listing gives its time too.
        let listed = h.listed.as_deref().unwrap_or("-");
        let hexkey = tern_core::hash::hex(k.as_bytes());
        let hash = h.blake3.map_or("-".to_string(), |x| x.to_hex().to_string());
        text.push_str(&format!(
            "{hexkey}\t{}\t{}\t{listed}\t{}\t{:o}\t{hash}\n",
            unquote_etag(&h.etag),
            h.size,
            format_time(h.mtime),
            h.mode
        ));
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension(format!("new-{}", std::process::id()));
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// What [`save_heads`] kept, for keys beginning with `prefix`.
fn load_heads(path: &Path, prefix: &str) -> HashMap<String, Head> {
    let mut out = HashMap::new();
    let Ok(text) = std::fs::read_to_string(path) else {
        return out;
    };
    let mut lines = text.lines();
    if lines.next() != Some(CACHE_MAGIC) {
        return out;
    }
    for line in lines {
        let f: Vec<&str> = line.split('\t').collect();
        let [hexkey, etag, size, listed, mtime, mode, hash] = f[..] else {
            continue;
        };
        let Some(key) = tern_core::hash::unhex(hexkey).and_then(|k| String::from_utf8(k).ok()) else {
            continue;
        };
        if !key.starts_with(prefix) {
            continue;
        }
        let (Ok(size), Some(mtime), Ok(mode)) = (size.parse(), parse_time(mtime), u32::from_str_radix(mode, 8)) else {
            continue;
        };
        out.insert(
            key,
            Head {
                size,
                etag: etag.to_string(),
                mtime,
                mode,
                blake3: blake3::Hash::from_hex(hash).ok(),
                listed: (listed != "-").then(|| listed.to_string()),
            },
        );
    }
    out
}

/// A bucket, or a prefix in one, as an endpoint.
#[derive(Clone)]
pub struct S3Endpoint {
    inner: Arc<Inner>,
}

/// An object as a listing shows it: key, size, ETag, `LastModified`.
type Listed = (String, u64, String, String);

/// Requests made to stores by this process, and the bytes of their bodies.
static REQUESTS: AtomicU64 = AtomicU64::new(0);
static BYTES_SENT: AtomicU64 = AtomicU64::new(0);
static BYTES_RECEIVED: AtomicU64 = AtomicU64::new(0);

/// What this process asked of S3 stores: requests, and the bytes sent and
/// received in their bodies.
pub fn traffic() -> (u64, u64, u64) {
    (
        REQUESTS.load(Ordering::Relaxed),
        BYTES_SENT.load(Ordering::Relaxed),
        BYTES_RECEIVED.load(Ordering::Relaxed),
    )
}

/// A response: its status, headers and body.
struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: ureq::Body,
}

impl Reply {
    fn header(&self, name: &str) -> Option<String> {
        self.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_string)
    }

    /// The body as text, or why it could not be read.
    fn text_checked(mut self, rel: &Path) -> tern_core::Result<String> {
        let t = self
            .body
            .with_config()
            .limit(16 << 20)
            .read_to_string()
            .map_err(|e| tern_core::Error::Other {
                path: rel.to_path_buf(),
                message: format!("the store's answer was cut off: {e}"),
            })?;
        BYTES_RECEIVED.fetch_add(t.len() as u64, Ordering::Relaxed);
        Ok(t)
    }

    /// The body as text; empty if it cannot be read (for messages, and
    /// answers whose failure shows as what is missing from them).
    fn text(self) -> String {
        self.text_checked(Path::new("")).unwrap_or_default()
    }
}

/// The text of an XML element, the first of its name.
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = xml[start..].find(&close)? + start;
    Some(xml[start..end].to_string())
}

/// `SEC.NANOS`, as tern and rclone write modification times.
fn format_time(t: Time) -> String {
    format!("{}.{:09}", t.sec, t.nsec)
}

fn parse_time(s: &str) -> Option<Time> {
    let s = s.trim();
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    let digits: String = frac.chars().take(9).collect();
    if !digits.chars().all(|c| c.is_ascii_digit()) {
        return None;
    }
    let nsec = if digits.is_empty() {
        0
    } else {
        digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
    };
    Some(Time { sec, nsec })
}

/// An HTTP date (`Last-Modified`) or an ISO 8601 one (listings).
fn parse_date(s: &str) -> Option<Time> {
    let ts: jiff::Timestamp = s
        .parse()
        .ok()
        .or_else(|| jiff::fmt::rfc2822::parse(s).ok().map(|z| z.timestamp()))?;
    Some(Time {
        sec: ts.as_second(),
        nsec: ts.subsec_nanosecond().max(0) as u32,
    })
}

fn md5_b64(data: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(md5::Md5::digest(data))
}

impl S3Endpoint {
    /// The bucket or prefix `spec` names, on the store `cfg` resolves to,
    /// keeping the journals of multipart uploads and what it learns of
    /// objects' metadata in `state` (tern's cache directory) for later
    /// runs. Checks the bucket is there and the credentials are taken.
    pub fn connect(
        spec: &S3Spec,
        cfg: &Resolved,
        timeout: Duration,
        state: Option<PathBuf>,
    ) -> tern_core::Result<S3Endpoint> {
        let shown = PathBuf::from(spec.display());
        let other = |message: String| tern_core::Error::Other {
            path: shown.clone(),
            message,
        };
        let style = match cfg.path_style {
            true => rusty_s3::UrlStyle::Path,
            false => rusty_s3::UrlStyle::VirtualHost,
        };
        let bucket = rusty_s3::Bucket::new(cfg.endpoint.clone(), style, spec.bucket.clone(), cfg.region.clone())
            .map_err(|e| other(format!("bucket `{}` at {}: {e}", spec.bucket, cfg.endpoint)))?;
        let creds = match &cfg.token {
            Some(t) => rusty_s3::Credentials::new_with_token(cfg.key.clone(), cfg.secret.clone(), t.clone()),
            None => rusty_s3::Credentials::new(cfg.key.clone(), cfg.secret.clone()),
        };
        // Deadlines on silence (connecting, each read and write), not on a
        // whole exchange: a large part on a slow link takes what it takes.
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_connect(Some(timeout))
            .timeout_per_read(Some(timeout))
            .timeout_per_write(Some(timeout))
            .max_idle_connections_per_host(WINDOW * 2)
            .max_idle_connections(WINDOW * 4)
            .build();
        let ep = S3Endpoint {
            inner: Arc::new(Inner {
                agent: ureq::Agent::new_with_config(config),
                bucket,
                creds,
                creds_from: cfg.from.clone(),
                store_id: format!("{}\0{}", cfg.endpoint, cfg.key),
                spec: spec.clone(),
                heads: Mutex::default(),
                walked: Mutex::default(),
                bodies: Mutex::default(),
                files_seen: Mutex::default(),
                prefetch: std::sync::atomic::AtomicBool::new(true),
                doomed: Mutex::default(),
                delete_errors: Mutex::default(),
                flushing: Mutex::default(),
                journals: state.as_ref().map(|d| d.join("s3-uploads")),
                meta_cache: state.as_ref().map(|d| {
                    let id = format!("{}\0{}", cfg.endpoint, spec.bucket);
                    let h = blake3::hash(id.as_bytes()).to_hex();
                    d.join("s3-meta").join(format!("{}.meta", &h[..32]))
                }),
            }),
        };
        if let (Some(p), Ok(mut heads)) = (&ep.inner.meta_cache, ep.inner.heads.lock()) {
            *heads = load_heads(p, &spec.prefix);
        }
        // Within the prefix: a key may be granted no more than that.
        let mut probe = ep.inner.bucket.list_objects_v2(Some(&ep.inner.creds));
        probe.with_max_keys(1);
        if !spec.prefix.is_empty() {
            probe.with_prefix(spec.prefix.as_str());
        }
        let url = probe.sign(SIGNED_FOR);
        let r = ep.send("GET", &url, &[], None, Path::new(""))?;
        if r.status != 200 {
            return Err(ep.status_error(Path::new(""), r, "list"));
        }
        Ok(ep)
    }

    /// Used as a destination: objects listed are not read ahead.
    pub fn as_destination(&self) {
        self.inner.prefetch.store(false, Ordering::Relaxed);
    }

    /// The key `rel` stands for.
    fn key(&self, rel: &Path) -> String {
        let rel = rel.to_string_lossy();
        let rel = rel.trim_matches('/');
        match (self.inner.spec.prefix.is_empty(), rel.is_empty()) {
            (true, _) => rel.to_string(),
            (false, true) => self.inner.spec.prefix.clone(),
            (false, false) => format!("{}/{rel}", self.inner.spec.prefix),
        }
    }

    /// The key `rel` is written to: refused for a name that is not UTF-8,
    /// which no key can hold.
    fn write_key(&self, rel: &Path) -> tern_core::Result<String> {
        match rel.to_str() {
            Some(_) => Ok(self.key(rel)),
            None => Err(tern_core::Error::Other {
                path: rel.to_path_buf(),
                message: "S3 keys are UTF-8 and this name is not; not copied".into(),
            }),
        }
    }

    /// The prefix of what is beneath the directory `rel`.
    fn dir_prefix(&self, rel: &Path) -> String {
        let k = self.key(rel);
        match k.is_empty() {
            true => k,
            false => format!("{k}/"),
        }
    }

    fn shown(&self, rel: &Path) -> PathBuf {
        PathBuf::from(self.describe(rel))
    }

    /// One request, tried again after a failure on the way or a 5xx.
    fn send(
        &self,
        method: &str,
        url: &url::Url,
        headers: &[(&str, String)],
        body: Option<&[u8]>,
        rel: &Path,
    ) -> tern_core::Result<Reply> {
        let mut last = String::new();
        for attempt in 0..ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(Duration::from_millis(100 << attempt));
            }
            REQUESTS.fetch_add(1, Ordering::Relaxed);
            BYTES_SENT.fetch_add(body.map_or(0, |b| b.len() as u64), Ordering::Relaxed);
            let a = &self.inner.agent;
            macro_rules! with_headers {
                ($b:expr) => {{
                    let mut b = $b;
                    for (k, v) in headers {
                        b = b.header(*k, v.as_str());
                    }
                    b
                }};
            }
            let got = match method {
                "GET" => with_headers!(a.get(url.as_str())).call(),
                "HEAD" => with_headers!(a.head(url.as_str())).call(),
                "DELETE" => with_headers!(a.delete(url.as_str())).call(),
                "PUT" => with_headers!(a.put(url.as_str())).send(body.unwrap_or_default()),
                _ => with_headers!(a.post(url.as_str())).send(body.unwrap_or_default()),
            };
            match got {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let (parts, body) = r.into_parts();
                    let reply = Reply {
                        status,
                        headers: parts.headers,
                        body,
                    };
                    if status >= 500 && attempt + 1 < ATTEMPTS {
                        last = format!("{status}: {}", reply.text().lines().next().unwrap_or(""));
                        tracing::debug!(status, %method, key = %self.key(rel), "retrying");
                        continue;
                    }
                    return Ok(reply);
                }
                Err(e) => {
                    last = e.to_string();
                    tracing::debug!(error = %e, %method, key = %self.key(rel), "retrying");
                }
            }
        }
        Err(tern_core::Error::Other {
            path: self.shown(rel),
            message: format!("the store did not answer {method}: {last}"),
        })
    }

    /// What an unexpected status says, for the user: the store's own code
    /// and message, and what to check.
    fn status_error(&self, rel: &Path, r: Reply, what: &str) -> tern_core::Error {
        let status = r.status;
        let region = r.header("x-amz-bucket-region");
        let text = r.text();
        let code = xml_field(&text, "Code").unwrap_or_default();
        let message = xml_field(&text, "Message").unwrap_or_default();
        let bucket = &self.inner.spec.bucket;
        let hint = match (status, code.as_str()) {
            (_, "NoSuchBucket") => format!("no such bucket `{bucket}`"),
            (_, "InvalidAccessKeyId") => format!(
                "the store does not know the access key (from {})",
                self.inner.creds_from
            ),
            (_, "SignatureDoesNotMatch") => format!(
                "the secret key does not match the access key (from {})",
                self.inner.creds_from
            ),
            (301, _) | (_, "PermanentRedirect") | (_, "AuthorizationHeaderMalformed") => match region {
                Some(r) => format!("bucket `{bucket}` is in region {r}: give --s3-region {r}"),
                None => format!("bucket `{bucket}` is in another region: give --s3-region"),
            },
            (403, _) | (_, "AccessDenied") => format!(
                "access denied to {} (credentials from {}); check the key's policy for this bucket and prefix",
                what, self.inner.creds_from
            ),
            (404, _) => format!("not found ({what})"),
            _ => format!("{what} failed"),
        };
        let detail = match (code.is_empty(), message.is_empty()) {
            (true, _) => format!("HTTP {status}"),
            (false, true) => format!("HTTP {status} {code}"),
            (false, false) => format!("HTTP {status} {code}: {message}"),
        };
        tern_core::Error::Other {
            path: self.shown(rel),
            message: format!("{hint} ({detail})"),
        }
    }

    /// The object `key`'s metadata, asked of the store; None if absent.
    fn head(&self, key: &str, rel: &Path) -> tern_core::Result<Option<Head>> {
        let url = self
            .inner
            .bucket
            .head_object(Some(&self.inner.creds), key)
            .sign(SIGNED_FOR);
        let r = self.send("HEAD", &url, &[], None, rel)?;
        match r.status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.status_error(rel, r, "read metadata")),
        }
        let head = self.head_from(&r, rel)?;
        self.remember(key, &head);
        Ok(Some(head))
    }

    /// An object's metadata from the headers of a HEAD or a whole GET.
    fn head_from(&self, r: &Reply, rel: &Path) -> tern_core::Result<Head> {
        let meta = |k: &str| r.header(&format!("x-amz-meta-{k}"));
        let size = r
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| tern_core::Error::Other {
                path: self.shown(rel),
                message: "the store gave no length for the object".into(),
            })?;
        let stored = meta(META_MTIME)
            .or_else(|| meta(META_RCLONE_MTIME))
            .and_then(|t| parse_time(&t));
        Ok(Head {
            size,
            etag: r.header("etag").unwrap_or_default(),
            mtime: stored
                .or_else(|| r.header("last-modified").and_then(|d| parse_date(&d)))
                .unwrap_or_default(),
            mode: meta(META_MODE)
                .and_then(|m| u32::from_str_radix(&m, 8).ok())
                .map_or(0o644, |m| m & 0o7777),
            blake3: meta(META_BLAKE3).and_then(|h| blake3::Hash::from_hex(h.trim()).ok()),
            listed: None,
        })
    }

    /// A small object's metadata and bytes in one GET, where a HEAD would
    /// cost as much: the bytes are kept (within a budget) for the read that
    /// is likely to follow. None if it is gone.
    fn get_small(&self, key: &str, size: u64, rel: &Path) -> tern_core::Result<Option<Head>> {
        let url = self
            .inner
            .bucket
            .get_object(Some(&self.inner.creds), key)
            .sign(SIGNED_FOR);
        let r = self.send("GET", &url, &[], None, rel)?;
        match r.status {
            200 => {}
            404 => return Ok(None),
            _ => return Err(self.status_error(rel, r, "read")),
        }
        let head = self.head_from(&r, rel)?;
        let mut body = r.body;
        let mut data = Vec::with_capacity(size as usize);
        body.as_reader()
            .take(PREFETCH_MAX + 1)
            .read_to_end(&mut data)
            .map_err(|e| tern_core::Error::io(&self.shown(rel), "read", e))?;
        BYTES_RECEIVED.fetch_add(data.len() as u64, Ordering::Relaxed);
        if data.len() as u64 == head.size {
            if let Ok(mut b) = self.inner.bodies.lock() {
                if b.0 + data.len() <= PREFETCH_BUDGET {
                    b.0 += data.len();
                    b.1.insert(key.to_string(), (head.etag.clone(), data));
                }
            }
        }
        self.remember(key, &head);
        Ok(Some(head))
    }

    /// The bytes [`Self::get_small`] kept of `key` at ETag `etag`, taken.
    fn prefetched(&self, key: &str, etag: &str) -> Option<Vec<u8>> {
        let mut b = self.inner.bodies.lock().ok()?;
        let (e, data) = b.1.remove(key)?;
        b.0 -= data.len();
        (e == etag).then_some(data)
    }

    fn remember(&self, key: &str, h: &Head) {
        if let Ok(mut m) = self.inner.heads.lock() {
            m.insert(key.to_string(), h.clone());
        }
    }

    fn cached(&self, key: &str) -> Option<Head> {
        self.inner.heads.lock().ok().and_then(|m| m.get(key).cloned())
    }

    fn forget(&self, key: &str) {
        if let Ok(mut m) = self.inner.heads.lock() {
            m.remove(key);
        }
    }

    /// Everything `ListObjectsV2` gives beneath `prefix`, page by page:
    /// objects (key, size, ETag) and, with `delimiter`, the common prefixes.
    fn list(&self, prefix: &str, delimiter: bool, rel: &Path) -> tern_core::Result<(Vec<Listed>, Vec<String>)> {
        let (mut objects, mut prefixes) = (Vec::new(), Vec::new());
        let mut token: Option<String> = None;
        loop {
            let mut a: ListObjectsV2<'_> = self.inner.bucket.list_objects_v2(Some(&self.inner.creds));
            if !prefix.is_empty() {
                a.with_prefix(prefix);
            }
            if delimiter {
                a.with_delimiter("/");
            }
            if let Some(t) = &token {
                a.with_continuation_token(t.clone());
            }
            let url = a.sign(SIGNED_FOR);
            let r = self.send("GET", &url, &[], None, rel)?;
            if r.status != 200 {
                return Err(self.status_error(rel, r, "list"));
            }
            let text = r.text();
            let page = ListObjectsV2::parse_response(&text).map_err(|e| tern_core::Error::Other {
                path: self.shown(rel),
                message: format!("the store's listing is not S3's XML: {e}"),
            })?;
            for c in page.contents {
                objects.push((
                    c.key,
                    c.size.unwrap_or(0),
                    c.etag.unwrap_or_default(),
                    c.last_modified.unwrap_or_default(),
                ));
            }
            prefixes.extend(page.common_prefixes.into_iter().map(|p| p.prefix));
            match page.next_continuation_token {
                // A store that gives the same token again would loop.
                Some(t) if !t.is_empty() && token.as_deref() != Some(t.as_str()) => token = Some(t),
                _ => break,
            }
        }
        Ok((objects, prefixes))
    }

    fn file_entry(name: OsString, h: &Head) -> Entry {
        Entry {
            name,
            kind: Kind::File,
            size: h.size,
            meta: Meta {
                mode: h.mode,
                uid: 0,
                gid: 0,
                mtime: h.mtime,
                atime: h.mtime,
            },
            target: None,
            file_id: None,
            nlink: 1,
            allocated: h.size,
            changed: h.mtime,
        }
    }

    /// The metadata headers an object written for `meta` carries.
    fn meta_headers(meta: &Meta, hash: Option<&blake3::Hash>) -> Vec<(String, String)> {
        let mut h = vec![
            (format!("x-amz-meta-{META_MTIME}"), format_time(meta.mtime)),
            (format!("x-amz-meta-{META_RCLONE_MTIME}"), format_time(meta.mtime)),
            (format!("x-amz-meta-{META_MODE}"), format!("{:o}", meta.mode & 0o7777)),
        ];
        if let Some(x) = hash {
            h.push((format!("x-amz-meta-{META_BLAKE3}"), x.to_hex().to_string()));
        }
        h
    }

    /// Sends a signed action whose headers are `headers` (signed with it).
    fn signed<'a, A: S3Action<'a>>(
        &self,
        mut action: A,
        method: &str,
        headers: &'a [(String, String)],
        body: Option<&[u8]>,
        rel: &Path,
    ) -> tern_core::Result<Reply> {
        for (k, v) in headers {
            action.headers_mut().insert(k.as_str(), v.as_str());
        }
        let url = action.sign(SIGNED_FOR);
        let hs: Vec<(&str, String)> = headers.iter().map(|(k, v)| (k.as_str(), v.clone())).collect();
        self.send(method, &url, &hs, body, rel)
    }

    /// PUTs `data` whole as `key`, with `meta` and its BLAKE3.
    /// A key about to be written is not deleted after it: the queue of
    /// deletions is flushed first if it holds the key.
    fn not_doomed(&self, key: &str) {
        // Under the flush lock: a flush in flight (which took the queue
        // already) ends before the key is looked for.
        let one = self.inner.flushing.lock();
        let queued = self.inner.doomed.lock().is_ok_and(|d| d.iter().any(|(k, _)| k == key));
        if queued {
            self.flush_deletes_held();
        }
        drop(one);
    }

    fn put(&self, key: &str, rel: &Path, data: &[u8], meta: &Meta, hash: blake3::Hash) -> tern_core::Result<()> {
        self.not_doomed(key);
        let mut headers = Self::meta_headers(meta, Some(&hash));
        headers.push(("content-md5".into(), md5_b64(data)));
        let action = self.inner.bucket.put_object(Some(&self.inner.creds), key);
        let r = self.signed(action, "PUT", &headers, Some(data), rel)?;
        if r.status != 200 {
            return Err(self.status_error(rel, r, "write"));
        }
        let etag = r.header("etag").unwrap_or_default();
        self.remember(
            key,
            &Head {
                size: data.len() as u64,
                etag,
                mtime: meta.mtime,
                mode: meta.mode & 0o7777,
                blake3: Some(hash),
                listed: None,
            },
        );
        Ok(())
    }

    /// Rewrites `key`'s metadata in place (a copy onto itself).
    fn rewrite_meta(
        &self,
        key: &str,
        rel: &Path,
        meta: &Meta,
        hash: Option<&blake3::Hash>,
        etag: Option<&str>,
    ) -> tern_core::Result<()> {
        let mut headers = Self::meta_headers(meta, hash);
        // Only onto the version meant: another writer's is left alone.
        if let Some(e) = etag.filter(|e| !e.is_empty()) {
            headers.push(("x-amz-copy-source-if-match".into(), format!("\"{e}\"")));
        }
        let source = format!("/{}/{}", self.inner.spec.bucket, encode_key(key));
        headers.push(("x-amz-copy-source".into(), source));
        headers.push(("x-amz-metadata-directive".into(), "REPLACE".into()));
        let action = self.inner.bucket.put_object(Some(&self.inner.creds), key);
        let r = self.signed(action, "PUT", &headers, Some(&[]), rel)?;
        let status = r.status;
        if status == 412 {
            return Err(tern_core::Error::Changed(self.shown(rel)));
        }
        let text = r.text_checked(rel)?;
        // A copy can fail with 200 and an error document.
        if status != 200 || text.contains("<Error>") {
            return Err(tern_core::Error::Other {
                path: self.shown(rel),
                message: format!(
                    "cannot set the object's metadata (HTTP {status} {})",
                    xml_field(&text, "Code").unwrap_or_default()
                ),
            });
        }
        self.forget(key);
        Ok(())
    }

    /// A multipart upload of `key` for `spec`: the one an earlier run left
    /// for this version of the file if the store still has it (with the
    /// parts it holds), else a new one. An earlier run's upload of another
    /// version is aborted.
    fn start_parts(&self, key: &str, rel: &Path, spec: &FileSpec) -> tern_core::Result<Body> {
        let jpath = match (&self.inner.journals, spec.resumable) {
            (Some(d), true) => Some(journal::path_for(
                d,
                &format!("{}\0{key}", self.inner.bucket.base_url()),
            )),
            _ => None,
        };
        if let Some(found) = jpath.as_deref().and_then(|p| journal::read(p, spec)) {
            let listed = match found.same_version {
                true => match self.list_parts(key, &found.upload_id, rel) {
                    Ok(l) => l,
                    Err(e) => {
                        // Not listable (a policy without ListMultipartUploadParts,
                        // say): given up, and the file sent again.
                        tracing::warn!(error = %e, key, "an earlier upload cannot be resumed; starting again");
                        self.abort_upload(key, &found.upload_id, rel);
                        None
                    }
                },
                false => None,
            };
            match listed {
                Some(listed) => {
                    let mut etags = BTreeMap::new();
                    let mut resumed = Vec::new();
                    for (n, cv, etag) in found.parts {
                        if n >= 1 && listed.get(&n) == Some(&unquote_etag(&etag)) {
                            etags.insert(n, etag);
                            resumed.push((u64::from(n) - 1, cv));
                        }
                    }
                    let journal = jpath.as_deref().and_then(|p| journal::Journal::reopen(p).ok());
                    tracing::info!(key, parts = resumed.len(), "resuming a multipart upload");
                    return Ok(Body::Parts {
                        upload_id: found.upload_id,
                        etags: Mutex::new(etags),
                        resumed,
                        journal,
                    });
                }
                None => {
                    if !found.same_version {
                        self.abort_upload(key, &found.upload_id, rel);
                    }
                    if let Some(p) = &jpath {
                        let _ = std::fs::remove_file(p);
                    }
                }
            }
        }
        let headers = Self::meta_headers(&spec.source_meta, None);
        let action: CreateMultipartUpload<'_> = self.inner.bucket.create_multipart_upload(Some(&self.inner.creds), key);
        let r = self.signed(action, "POST", &headers, Some(&[]), rel)?;
        if r.status != 200 {
            return Err(self.status_error(rel, r, "start an upload"));
        }
        let text = r.text();
        // Only the id matters, and stores name the answer's root element
        // differently (rclone's is not AWS's).
        let upload_id = xml_field(&text, "UploadId")
            .map(|u| u.trim().to_string())
            .filter(|u| !u.is_empty())
            .ok_or_else(|| tern_core::Error::Other {
                path: self.shown(rel),
                message: "the store's answer to a new upload holds no UploadId".into(),
            })?;
        let journal = jpath.and_then(|p| match journal::Journal::create(&p, &upload_id, spec) {
            Ok(j) => Some(j),
            Err(e) => {
                tracing::warn!(file = %p.display(), error = %e, "no upload journal; an interrupted upload starts again");
                None
            }
        });
        Ok(Body::Parts {
            upload_id,
            etags: Mutex::default(),
            resumed: Vec::new(),
            journal,
        })
    }

    /// The parts the store holds of upload `upload_id` (number to ETag), or
    /// None if it has no such upload any more.
    fn list_parts(&self, key: &str, upload_id: &str, rel: &Path) -> tern_core::Result<Option<HashMap<u16, String>>> {
        let mut out = HashMap::new();
        let mut marker = None;
        loop {
            let mut a = self.inner.bucket.list_parts(Some(&self.inner.creds), key, upload_id);
            if let Some(m) = marker {
                a.set_part_number_marker(m);
            }
            let url = a.sign(SIGNED_FOR);
            let r = self.send("GET", &url, &[], None, rel)?;
            match r.status {
                200 => {}
                404 => return Ok(None),
                _ => return Err(self.status_error(rel, r, "list an upload's parts")),
            }
            // Read leniently: stores differ (moto's root element is not
            // AWS's), and only numbers and ETags matter here.
            let text = r.text();
            let mut last = None;
            for part in text.split("<Part>").skip(1) {
                let n = xml_field(part, "PartNumber").and_then(|n| n.trim().parse::<u16>().ok());
                let etag = xml_field(part, "ETag").map(|e| unquote_etag(&e));
                if let (Some(n), Some(etag)) = (n, etag) {
                    out.insert(n, etag);
                    last = Some(n);
                }
            }
            let truncated = xml_field(&text, "IsTruncated").is_some_and(|t| t.trim() == "true");
            let next = xml_field(&text, "NextPartNumberMarker")
                .and_then(|m| m.trim().parse::<u16>().ok())
                .or(last);
            match next {
                Some(m) if truncated && marker != Some(m) => marker = Some(m),
                _ => return Ok(Some(out)),
            }
        }
    }

    /// Gives up a multipart upload at the store (its parts are freed).
    fn abort_upload(&self, key: &str, upload_id: &str, rel: &Path) {
        let url = self
            .inner
            .bucket
            .abort_multipart_upload(Some(&self.inner.creds), key, upload_id)
            .sign(SIGNED_FOR);
        match self.send("DELETE", &url, &[], None, rel) {
            Ok(r) if matches!(r.status, 200 | 204 | 404) => {}
            Ok(r) => tracing::warn!(key, status = r.status, "could not abort a multipart upload"),
            Err(e) => tracing::warn!(error = %e, key, "could not abort a multipart upload"),
        }
    }

    /// Deletes what `remove` queued: `DeleteObjects` of up to 1,000 keys a
    /// request, one by one for a key that request cannot carry or a store
    /// without it. Failures are kept for `settle`.
    fn flush_deletes(&self) {
        let _one = self.inner.flushing.lock();
        self.flush_deletes_held();
    }

    /// [`Self::flush_deletes`], the flush lock held.
    fn flush_deletes_held(&self) {
        let queued = match self.inner.doomed.lock() {
            Ok(mut d) => std::mem::take(&mut *d),
            Err(_) => return,
        };
        let mut failed = Vec::new();
        for batch in queued.chunks(DELETE_BATCH) {
            // S3 refuses a whole batch for one key with control characters.
            let (odd, plain): (Vec<_>, Vec<_>) = batch
                .iter()
                .partition(|(k, _)| k.chars().any(|c| c.is_control() && !matches!(c, '\t' | '\n' | '\r')));
            let mut one_by_one: Vec<&(String, PathBuf)> = odd;
            if let Err(rest) = self.delete_many(&plain, &mut failed) {
                one_by_one.extend(rest);
            }
            for r in Self::parallel(&one_by_one, |(k, rel)| self.delete_key(k, rel)) {
                if let Err(e) = r {
                    failed.push(e);
                }
            }
        }
        if let Ok(mut e) = self.inner.delete_errors.lock() {
            e.extend(failed);
        }
    }

    /// One `DeleteObjects` request for `items`; the keys the store said it
    /// could not delete go to `failed`. Err(items) when the store does not
    /// take the request at all, for them to be deleted one by one.
    fn delete_many<'a>(
        &self,
        items: &[&'a (String, PathBuf)],
        failed: &mut Vec<tern_core::Error>,
    ) -> Result<(), Vec<&'a (String, PathBuf)>> {
        if items.is_empty() {
            return Ok(());
        }
        let ids: Vec<rusty_s3::actions::ObjectIdentifier> = items
            .iter()
            .map(|(k, _)| rusty_s3::actions::ObjectIdentifier::new(k.clone()))
            .collect();
        let mut action = self.inner.bucket.delete_objects(Some(&self.inner.creds), ids.iter());
        action.set_quiet(true);
        let url = action.sign(SIGNED_FOR);
        let (body, md5) = action.body_with_md5();
        let rel = items[0].1.as_path();
        let reply = self.send("POST", &url, &[("content-md5", md5)], Some(body.as_bytes()), rel);
        let text = match reply {
            Ok(r) if r.status == 200 => r.text(),
            _ => return Err(items.to_vec()),
        };
        for key in items.iter().map(|(k, _)| k) {
            self.forget(key);
        }
        for err in text.split("<Error>").skip(1) {
            let key = xml_field(err, "Key").unwrap_or_default();
            let code = xml_field(err, "Code").unwrap_or_default();
            let path = items
                .iter()
                .find(|(k, _)| *k == key)
                .map_or_else(|| PathBuf::from(&key), |(_, r)| self.shown(r));
            failed.push(tern_core::Error::Other {
                path,
                message: format!("not deleted: {code} {}", xml_field(err, "Message").unwrap_or_default()),
            });
        }
        Ok(())
    }

    fn delete_key(&self, key: &str, rel: &Path) -> tern_core::Result<()> {
        let url = self
            .inner
            .bucket
            .delete_object(Some(&self.inner.creds), key)
            .sign(SIGNED_FOR);
        let r = self.send("DELETE", &url, &[], None, rel)?;
        self.forget(key);
        match r.status {
            200 | 204 | 404 => Ok(()),
            _ => Err(self.status_error(rel, r, "delete")),
        }
    }

    /// Runs `f` over `items` with up to [`WINDOW`] in flight.
    fn parallel<T: Sync, R: Send>(items: &[T], f: impl Fn(&T) -> R + Sync) -> Vec<R> {
        let next = AtomicUsize::new(0);
        let out: Mutex<Vec<Option<R>>> = Mutex::new((0..items.len()).map(|_| None).collect());
        std::thread::scope(|s| {
            for _ in 0..WINDOW.min(items.len()) {
                s.spawn(|| loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(item) = items.get(i) else { return };
                    let r = f(item);
                    if let Ok(mut o) = out.lock() {
                        o[i] = Some(r);
                    }
                });
            }
        });
        out.into_inner().unwrap_or_default().into_iter().flatten().collect()
    }
}

/// An ETag without its quotes, as XML or a header gives it.
fn unquote_etag(e: &str) -> String {
    e.replace("&quot;", "\"")
        .replace("&#34;", "\"")
        .trim()
        .trim_matches('"')
        .to_string()
}

/// A key as a URL path, `/` kept.
fn encode_key(key: &str) -> String {
    key.split('/')
        .map(|seg| {
            seg.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
                    _ => format!("%{b:02X}"),
                })
                .collect::<String>()
        })
        .collect::<Vec<_>>()
        .join("/")
}

impl Source for S3Endpoint {
    fn describe(&self, rel: &Path) -> String {
        let k = self.key(rel);
        format!("s3://{}/{k}", self.inner.spec.bucket)
    }

    fn stat(&self, rel: &Path) -> tern_core::Result<Option<Entry>> {
        let key = self.key(rel);
        let name = rel.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        if key.is_empty() {
            return Ok(Some(Entry::bare_dir(name)));
        }
        let found = match self.head(&key, rel) {
            Ok(h) => h,
            // The root with a policy granting only what is beneath it: the
            // listing below says what it is.
            Err(e) if rel.as_os_str().is_empty() => {
                tracing::debug!(error = %e, "the root is not an object one may read");
                None
            }
            Err(e) => return Err(e),
        };
        if let Some(h) = found {
            if let Ok(mut seen) = self.inner.files_seen.lock() {
                seen.insert(key.clone());
            }
            return Ok(Some(Self::file_entry(name, &h)));
        }
        let mut a = self.inner.bucket.list_objects_v2(Some(&self.inner.creds));
        let prefix = format!("{key}/");
        a.with_prefix(prefix.as_str());
        a.with_max_keys(1);
        let url = a.sign(SIGNED_FOR);
        let r = self.send("GET", &url, &[], None, rel)?;
        if r.status != 200 {
            return Err(self.status_error(rel, r, "list"));
        }
        let text = r.text();
        let any =
            ListObjectsV2::parse_response(&text).is_ok_and(|p| !p.contents.is_empty() || !p.common_prefixes.is_empty());
        Ok(any.then(|| Entry::bare_dir(name)))
    }

    fn read_dir(&self, rel: &Path) -> tern_core::Result<Vec<Entry>> {
        let prefix = self.dir_prefix(rel);
        let ahead = self.inner.walked.lock().ok().and_then(|mut w| w.remove(&prefix));
        let (objects, prefixes) = match ahead {
            Some(listed) => listed,
            None => self.list(&prefix, true, rel)?,
        };
        let mut dirs: BTreeMap<Vec<u8>, Entry> = BTreeMap::new();
        for p in prefixes {
            let Some(name) = p.strip_prefix(prefix.as_str()).map(|n| n.trim_end_matches('/')) else {
                continue;
            };
            if name.is_empty() || name.contains('/') || name == "." || name == ".." {
                continue;
            }
            dirs.insert(name.as_bytes().to_vec(), Entry::bare_dir(name.into()));
        }
        // Objects whose name is a path here; "dir/" markers and names no
        // file can have are left out.
        let files: Vec<Listed> = objects
            .into_iter()
            .filter(|(k, _, _, _)| {
                let Some(name) = k.strip_prefix(prefix.as_str()) else {
                    return false;
                };
                !name.is_empty()
                    && !name.contains('/')
                    && name != "."
                    && name != ".."
                    && !dirs.contains_key(name.as_bytes())
            })
            .collect();
        // Their times and modes are in their metadata: asked for many at
        // once, and only for objects the listing shows changed since.
        // What an earlier HEAD, write or run said of the same version
        // stands: a no-change sync makes no request per object.
        let heads = Self::parallel(&files, |(key, size, etag, modified)| {
            let known = self.cached(key).filter(|h| {
                !etag.is_empty()
                    && unquote_etag(&h.etag) == unquote_etag(etag)
                    && h.size == *size
                    && h.listed.as_ref().is_none_or(|l| l == modified)
            });
            let asked = match known {
                Some(h) => Some(h),
                None if *size <= PREFETCH_MAX && self.inner.prefetch.load(Ordering::Relaxed) => {
                    self.get_small(key, *size, rel)?
                }
                None => self.head(key, rel)?,
            };
            let Some(mut h) = asked else { return Ok(None) };
            if h.listed.as_deref() != Some(modified.as_str()) && !modified.is_empty() {
                h.listed = Some(modified.clone());
                self.remember(key, &h);
            }
            Ok(Some(h))
        });
        let mut out: Vec<Entry> = dirs.into_values().collect();
        for ((key, _, _, _), h) in files.iter().zip(heads) {
            // Gone since it was listed: not there.
            match h? {
                Some(h) => {
                    if let Ok(mut seen) = self.inner.files_seen.lock() {
                        seen.insert(key.clone());
                    }
                    out.push(Self::file_entry(key[prefix.len()..].into(), &h));
                }
                None => tracing::warn!(key, "listed, then gone before its metadata was read; left out"),
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn open(&self, rel: &Path, expect: &Entry) -> tern_core::Result<Box<dyn ReadFile>> {
        let key = self.key(rel);
        let head = match self.cached(&key) {
            Some(h) => Some(h),
            None => self.head(&key, rel)?,
        };
        let Some(h) = head else {
            return Err(tern_core::Error::Vanished(self.shown(rel)));
        };
        if h.size != expect.size || h.mtime != expect.meta.mtime {
            return Err(tern_core::Error::Changed(self.shown(rel)));
        }
        Ok(Box::new(S3ReadFile {
            ep: self.clone(),
            key,
            rel: rel.to_path_buf(),
            etag: h.etag,
            size: h.size,
        }))
    }

    fn xattrs(&self, _rel: &Path) -> tern_core::Result<Xattrs> {
        Ok(Vec::new())
    }

    fn walk_ahead(&self, rel: &Path, _filter: &tern_core::filter::Filter, _as_path: &Path) {
        // One listing of everything beneath (a request per 1,000 keys), cut
        // into directories, instead of a request per directory. Excluded
        // directories are listed too, and never used.
        let top = self.dir_prefix(rel);
        let objects = match self.list(&top, false, rel) {
            Ok((o, _)) => o,
            Err(e) => {
                tracing::debug!(error = %e, "no listing ahead; each directory is listed on its own");
                return;
            }
        };
        let mut dirs: HashMap<String, (Vec<Listed>, std::collections::BTreeSet<String>)> = HashMap::new();
        dirs.entry(top.clone()).or_default();
        for o in objects {
            let Some(rest) = o.0.strip_prefix(top.as_str()) else {
                continue;
            };
            // Each directory on the way is a subdirectory of the one above.
            let mut at = top.clone();
            let parts: Vec<&str> = rest.split('/').collect();
            for seg in &parts[..parts.len() - 1] {
                let sub = format!("{at}{seg}/");
                dirs.entry(at.clone()).or_default().1.insert(sub.clone());
                dirs.entry(sub.clone()).or_default();
                at = sub;
            }
            // A "dir/" marker is its directory; anything else an object there.
            if parts.last().is_some_and(|l| !l.is_empty()) {
                dirs.entry(at).or_default().0.push(o);
            }
        }
        if let Ok(mut w) = self.inner.walked.lock() {
            w.extend(dirs.into_iter().map(|(k, (o, d))| (k, (o, d.into_iter().collect()))));
        }
    }

    fn file_hash(&self, rel: &Path, expect: &Entry) -> Option<tern_core::Result<blake3::Hash>> {
        self.known_hash(rel, expect).map(Ok)
    }

    fn known_hash(&self, rel: &Path, expect: &Entry) -> Option<blake3::Hash> {
        // The BLAKE3 the file had when tern uploaded it, for this version.
        let h = self.cached(&self.key(rel))?;
        (h.size == expect.size && h.mtime == expect.meta.mtime)
            .then_some(h.blake3)
            .flatten()
    }

    fn read_files(
        &self,
        items: &[(&Path, &Entry)],
        bases: &[Option<&tern_core::delta::Signature>],
        _xattrs: bool,
    ) -> Vec<tern_core::Result<tern_core::endpoint::SmallFile>> {
        // Many GETs in flight, each checked against the BLAKE3 stored with
        // its object.
        let got = Self::parallel(items, |(rel, e)| {
            let key = self.key(rel);
            let kept = self
                .cached(&key)
                .filter(|h| h.size == e.size && h.mtime == e.meta.mtime)
                .and_then(|h| self.prefetched(&key, &h.etag));
            let data = match kept {
                Some(d) => d,
                None => {
                    let f = self.open(rel, e)?;
                    let mut data = vec![0u8; e.size as usize];
                    f.read_exact_at(0, &mut data)?;
                    data
                }
            };
            if let Some(k) = self.known_hash(rel, e) {
                let found = blake3::hash(&data);
                if found != k {
                    return Err(tern_core::Error::VerifyFailed {
                        path: self.shown(rel),
                        expected: k.to_hex().to_string(),
                        found: found.to_hex().to_string(),
                    });
                }
            }
            Ok(tern_core::endpoint::SmallFile {
                data,
                holes: Vec::new(),
                xattrs: Vec::new(),
                delta: None,
            })
        });
        got.into_iter()
            .enumerate()
            .map(|(i, r)| r.map(|f| f.against(bases.get(i).copied().flatten())))
            .collect()
    }
}

/// An object being read: ranged GETs of the version listed.
struct S3ReadFile {
    ep: S3Endpoint,
    key: String,
    rel: PathBuf,
    etag: String,
    size: u64,
}

impl ReadFile for S3ReadFile {
    fn describe(&self) -> PathBuf {
        self.ep.shown(&self.rel)
    }

    fn read_exact_at(&self, offset: u64, buf: &mut [u8]) -> tern_core::Result<()> {
        if buf.is_empty() {
            return Ok(());
        }
        let end = offset + buf.len() as u64;
        if end > self.size {
            return Err(tern_core::Error::Changed(self.describe()));
        }
        let url = self
            .ep
            .inner
            .bucket
            .get_object(Some(&self.ep.inner.creds), &self.key)
            .sign(SIGNED_FOR);
        let mut headers = vec![("range", format!("bytes={offset}-{}", end - 1))];
        if !self.etag.is_empty() {
            headers.push(("if-match", format!("\"{}\"", unquote_etag(&self.etag))));
        }
        let mut r = self.ep.send("GET", &url, &headers, None, &self.rel)?;
        match r.status {
            200 | 206 => {}
            // Replaced since it was listed.
            412 | 416 => return Err(tern_core::Error::Changed(self.describe())),
            404 => return Err(tern_core::Error::Vanished(self.describe())),
            _ => return Err(self.ep.status_error(&self.rel, r, "read")),
        }
        // The version listed, whatever the store made of If-Match.
        let served = r.header("etag").map(|e| unquote_etag(&e));
        let total = r
            .header("content-range")
            .and_then(|cr| cr.rsplit('/').next().and_then(|t| t.trim().parse::<u64>().ok()));
        if served.is_some_and(|e| !self.etag.is_empty() && e != unquote_etag(&self.etag))
            || total.is_some_and(|t| t != self.size)
        {
            return Err(tern_core::Error::Changed(self.describe()));
        }
        // Where the body starts: the range's start by its Content-Range
        // (some stores answer a range with 200 and one), else the object's.
        let start = match r.header("content-range") {
            Some(cr) => cr
                .strip_prefix("bytes ")
                .and_then(|x| x.split('-').next())
                .and_then(|x| x.trim().parse::<u64>().ok())
                .filter(|&st| st <= offset)
                .ok_or_else(|| tern_core::Error::Other {
                    path: self.describe(),
                    message: format!("the store answered a range with `Content-Range: {cr}`"),
                })?,
            None if r.status == 206 => offset,
            None => 0,
        };
        let skip = offset - start;
        let mut reader = r.body.as_reader();
        if skip > 0 {
            std::io::copy(&mut (&mut reader).take(skip), &mut std::io::sink())
                .map_err(|e| tern_core::Error::io(&self.describe(), "read", e))?;
        }
        reader
            .read_exact(buf)
            .map_err(|e| tern_core::Error::io(&self.describe(), "read", e))?;
        BYTES_RECEIVED.fetch_add(buf.len() as u64, Ordering::Relaxed);
        r.headers.clear();
        Ok(())
    }

    fn check_unchanged(&self) -> tern_core::Result<()> {
        // Every read is pinned to the ETag listed.
        Ok(())
    }

    fn as_any(&self) -> Option<&dyn std::any::Any> {
        Some(self)
    }
}

/// An object being written: one PUT at publish for a file of one chunk,
/// else a multipart upload with a part per chunk.
struct S3WriteFile {
    ep: S3Endpoint,
    /// Made by a copy at the store: nothing is left to publish.
    copied: std::sync::atomic::AtomicBool,
    key: String,
    rel: PathBuf,
    spec: FileSpec,
    meta: Mutex<Meta>,
    hash: Mutex<Option<blake3::Hash>>,
    body: Body,
}

enum Body {
    Whole(Mutex<Vec<u8>>),
    Parts {
        upload_id: String,
        /// The ETag of each part the store holds, resumed ones included.
        etags: Mutex<BTreeMap<u16, String>>,
        /// Parts an earlier run sent, with the chaining value of their bytes.
        resumed: Vec<(u64, [u8; 32])>,
        journal: Option<journal::Journal>,
    },
}

impl S3WriteFile {
    fn other(&self, message: String) -> tern_core::Error {
        tern_core::Error::Other {
            path: self.ep.shown(&self.rel),
            message,
        }
    }
}

impl WriteFile for S3WriteFile {
    fn resumed(&self) -> Vec<(u64, blake3::hazmat::ChainingValue)> {
        match &self.body {
            Body::Parts { resumed, .. } => resumed.clone(),
            Body::Whole(_) => Vec::new(),
        }
    }

    fn write_chunk(
        &self,
        index: u64,
        offset: u64,
        data: &[u8],
        _holes: &[(u64, u64)],
        cv: Option<&blake3::hazmat::ChainingValue>,
    ) -> tern_core::Result<()> {
        match &self.body {
            Body::Whole(buf) => {
                let mut b = buf.lock().map_err(|_| self.other("buffer lock poisoned".into()))?;
                let end = offset as usize + data.len();
                if end > b.len() {
                    b.resize(end, 0);
                }
                b[offset as usize..end].copy_from_slice(data);
                Ok(())
            }
            Body::Parts {
                upload_id,
                etags,
                journal,
                ..
            } => {
                let part = u16::try_from(index + 1).map_err(|_| self.other("more than 10,000 parts".into()))?;
                let action = self
                    .ep
                    .inner
                    .bucket
                    .upload_part(Some(&self.ep.inner.creds), &self.key, part, upload_id);
                let headers = [("content-md5".to_string(), md5_b64(data))];
                let r = self.ep.signed(action, "PUT", &headers, Some(data), &self.rel)?;
                if r.status != 200 {
                    return Err(self.ep.status_error(&self.rel, r, "upload a part"));
                }
                let etag = r
                    .header("etag")
                    .ok_or_else(|| self.other("the store gave no ETag for a part".into()))?;
                if let (Some(j), Some(cv)) = (journal, cv) {
                    if let Err(e) = j.part(part, cv, &etag) {
                        tracing::warn!(error = %e, "cannot record a part; a later run sends it again");
                    }
                }
                etags
                    .lock()
                    .map_err(|_| self.other("part lock poisoned".into()))?
                    .insert(part, etag);
                Ok(())
            }
        }
    }

    fn set_meta(&self, meta: &Meta, _owner: bool, _xattrs: &Xattrs) -> tern_core::Result<()> {
        if let Ok(mut m) = self.meta.lock() {
            *m = meta.clone();
        }
        Ok(())
    }

    fn sync(&self) -> tern_core::Result<()> {
        Ok(())
    }

    fn verify(&self, expected: &blake3::Hash) -> tern_core::Result<()> {
        if let Body::Whole(buf) = &self.body {
            let found = blake3::hash(&buf.lock().map_err(|_| self.other("buffer lock poisoned".into()))?);
            if found != *expected {
                return Err(tern_core::Error::VerifyFailed {
                    path: self.ep.shown(&self.rel),
                    expected: expected.to_hex().to_string(),
                    found: found.to_hex().to_string(),
                });
            }
        }
        self.expect_hash(expected);
        Ok(())
    }

    fn expect_hash(&self, hash: &blake3::Hash) {
        if let Ok(mut h) = self.hash.lock() {
            *h = Some(*hash);
        }
    }

    fn copy_within(&self, src: &dyn ReadFile) -> tern_core::Result<bool> {
        let Some(from) = src.as_any().and_then(|a| a.downcast_ref::<S3ReadFile>()) else {
            return Ok(false);
        };
        // One copy request makes at most 5 GiB, and only on one store.
        if from.ep.inner.store_id != self.ep.inner.store_id || from.size > MAX_COPY || from.etag.is_empty() {
            return Ok(false);
        }
        let meta = self.meta.lock().map(|m| m.clone()).unwrap_or_default();
        let hash = from.ep.cached(&from.key).and_then(|h| h.blake3);
        let mut headers = S3Endpoint::meta_headers(&meta, hash.as_ref());
        headers.push((
            "x-amz-copy-source".into(),
            format!("/{}/{}", from.ep.inner.spec.bucket, encode_key(&from.key)),
        ));
        headers.push((
            "x-amz-copy-source-if-match".into(),
            format!("\"{}\"", unquote_etag(&from.etag)),
        ));
        headers.push(("x-amz-metadata-directive".into(), "REPLACE".into()));
        let action = self.ep.inner.bucket.put_object(Some(&self.ep.inner.creds), &self.key);
        let r = self.ep.signed(action, "PUT", &headers, Some(&[]), &self.rel)?;
        let status = r.status;
        if status == 412 {
            return Err(tern_core::Error::Changed(from.describe()));
        }
        let text = r.text_checked(&self.rel)?;
        if status != 200 || text.contains("<Error>") {
            tracing::debug!(status, "the store would not copy; the bytes cross instead");
            return Ok(false);
        }
        // The upload started for the bytes is not needed.
        if let Body::Parts { upload_id, journal, .. } = &self.body {
            self.ep.abort_upload(&self.key, upload_id, &self.rel);
            if let Some(j) = journal {
                j.remove();
            }
        }
        self.ep.forget(&self.key);
        self.copied.store(true, Ordering::Release);
        Ok(true)
    }

    fn publish(self: Box<Self>) -> tern_core::Result<()> {
        if self.copied.load(Ordering::Acquire) {
            return Ok(());
        }
        let meta = self.meta.lock().map(|m| m.clone()).unwrap_or_default();
        let hash = self.hash.lock().ok().and_then(|h| *h);
        match &self.body {
            Body::Whole(buf) => {
                let data = std::mem::take(&mut *buf.lock().map_err(|_| self.other("buffer lock poisoned".into()))?);
                if data.len() as u64 != self.spec.size {
                    return Err(self.other(format!("{} of {} bytes written", data.len(), self.spec.size)));
                }
                // Hashed here only where the engine did not say (verify
                // checked this buffer against it when it did).
                let h = hash.unwrap_or_else(|| blake3::hash(&data));
                self.ep.put(&self.key, &self.rel, &data, &meta, h)
            }
            Body::Parts {
                upload_id,
                etags,
                journal,
                ..
            } => {
                let done = self.complete(upload_id, etags, hash.as_ref(), &meta);
                if done.is_err() && journal.is_none() {
                    // Nothing would resume it: its parts are freed now.
                    self.ep.abort_upload(&self.key, upload_id, &self.rel);
                }
                if done.is_ok() {
                    if let Some(j) = journal {
                        j.remove();
                    }
                }
                done
            }
        }
    }

    fn abort(self: Box<Self>, keep: bool) {
        if let Body::Parts { upload_id, journal, .. } = &self.body {
            // Kept for a later run to finish, where a journal says what it holds.
            if keep && journal.is_some() {
                return;
            }
            self.ep.abort_upload(&self.key, upload_id, &self.rel);
            if let Some(j) = journal {
                j.remove();
            }
        }
    }
}

impl S3WriteFile {
    /// Completes a multipart upload with every part in, then records its
    /// BLAKE3 by a copy in place (for the object completed, not another).
    fn complete(
        &self,
        upload_id: &str,
        etags: &Mutex<BTreeMap<u16, String>>,
        hash: Option<&blake3::Hash>,
        meta: &Meta,
    ) -> tern_core::Result<()> {
        {
            let etags = etags
                .lock()
                .map_err(|_| self.other("part lock poisoned".into()))?
                .clone();
            let parts = tern_core::hash::chunk_count(self.spec.size, self.spec.chunk_size);
            let numbered = etags.keys().copied().map(u64::from).eq(1..=parts);
            if !numbered {
                return Err(self.other(format!("{} of {parts} parts uploaded", etags.len())));
            }
            let action = self.ep.inner.bucket.complete_multipart_upload(
                Some(&self.ep.inner.creds),
                &self.key,
                upload_id,
                etags.values().map(String::as_str),
            );
            let url = action.sign(SIGNED_FOR);
            let body = action.body();
            let r = self.ep.send("POST", &url, &[], Some(body.as_bytes()), &self.rel)?;
            let status = r.status;
            let text = r.text_checked(&self.rel)?;
            // The store answers 200 at once and may still fail in the
            // body: only an answer with the object's ETag is success.
            let etag = xml_field(&text, "ETag").filter(|_| status == 200 && !text.contains("<Error>"));
            let Some(etag) = etag else {
                return Err(self.other(format!(
                    "the store did not complete the upload (HTTP {status} {})",
                    xml_field(&text, "Code").unwrap_or_default()
                )));
            };
            // The BLAKE3 is known only now: written into the metadata by
            // a copy in place, where the store allows one so large.
            if hash.is_some() && self.spec.size <= MAX_COPY {
                self.ep
                    .rewrite_meta(&self.key, &self.rel, meta, hash, Some(&unquote_etag(&etag)))?;
            } else {
                self.ep.forget(&self.key);
            }
            Ok(())
        }
    }
}

impl Dest for S3Endpoint {
    fn make_dir(&self, _rel: &Path) -> tern_core::Result<()> {
        // Directories are the keys beneath them; an empty one has no form.
        Ok(())
    }

    fn keeps_symlinks(&self) -> bool {
        false
    }

    fn create(&self, rel: &Path, spec: &FileSpec) -> tern_core::Result<Box<dyn WriteFile>> {
        let key = self.write_key(rel)?;
        self.not_doomed(&key);
        if key.is_empty() {
            return Err(tern_core::Error::Other {
                path: self.shown(rel),
                message: "a file needs a key: give s3://BUCKET/NAME".into(),
            });
        }
        let parts = tern_core::hash::chunk_count(spec.size, spec.chunk_size);
        let body = if parts <= 1 {
            Body::Whole(Mutex::new(Vec::with_capacity(spec.size as usize)))
        } else {
            if parts > MAX_PARTS || spec.chunk_size < MIN_PART {
                return Err(tern_core::Error::Other {
                    path: self.shown(rel),
                    message: format!(
                        "S3 takes 10,000 parts of at least 5 MiB: give --chunk-size {} or more",
                        spec.size.div_ceil(MAX_PARTS).max(MIN_PART).next_power_of_two()
                    ),
                });
            }
            self.start_parts(&key, rel, spec)?
        };
        Ok(Box::new(S3WriteFile {
            ep: self.clone(),
            copied: std::sync::atomic::AtomicBool::new(false),
            key,
            rel: rel.to_path_buf(),
            spec: spec.clone(),
            meta: Mutex::new(spec.source_meta.clone()),
            hash: Mutex::new(None),
            body,
        }))
    }

    fn symlink(&self, rel: &Path, _target: &Path, _meta: &Meta, _owner: bool) -> tern_core::Result<()> {
        Err(tern_core::Error::Other {
            path: self.shown(rel),
            message: "S3 has no symlinks".into(),
        })
    }

    fn hard_link(&self, _existing: &Path, rel: &Path) -> tern_core::Result<bool> {
        Err(tern_core::Error::Other {
            path: self.shown(rel),
            message: "S3 has no hard links".into(),
        })
    }

    fn set_meta(
        &self,
        rel: &Path,
        kind: Kind,
        meta: &Meta,
        _owner: bool,
        _xattrs: Option<&Xattrs>,
    ) -> tern_core::Result<()> {
        if kind != Kind::File {
            return Ok(());
        }
        let key = self.key(rel);
        let head = match self.cached(&key) {
            Some(h) => Some(h),
            None => self.head(&key, rel)?,
        };
        let Some(head) = head else {
            return Err(tern_core::Error::Vanished(self.shown(rel)));
        };
        if head.size > MAX_COPY {
            // A copy request cannot make it: the time and mode it was
            // uploaded with stay.
            tracing::warn!(
                key,
                "over 5 GiB: its metadata cannot be rewritten in place; left as uploaded"
            );
            return Ok(());
        }
        self.rewrite_meta(&key, rel, meta, head.blake3.as_ref(), Some(&unquote_etag(&head.etag)))
    }

    fn remove(&self, rel: &Path) -> tern_core::Result<()> {
        // Queued, and deleted a thousand a request (`settle` reports what
        // failed), as a daemon queues its removals.
        let key = self.key(rel);
        let mut keys = Vec::new();
        // An object listed as a file is one key; anything else may be a
        // directory: every key beneath it.
        let listed_file = self.inner.files_seen.lock().is_ok_and(|f| f.contains(&key));
        if key.is_empty() || !listed_file {
            let (objects, _) = self.list(&self.dir_prefix(rel), false, rel)?;
            keys.extend(objects.into_iter().map(|o| o.0));
        }
        if !key.is_empty() {
            keys.push(key);
        }
        let full = match self.inner.doomed.lock() {
            Ok(mut d) => {
                d.extend(keys.into_iter().map(|k| (k, rel.to_path_buf())));
                d.len() >= DELETE_BATCH
            }
            Err(_) => return Err(tern_core::Error::Internal("delete queue lock poisoned".into())),
        };
        if full {
            self.flush_deletes();
        }
        Ok(())
    }

    fn barrier(&self) -> tern_core::Result<()> {
        self.flush_deletes();
        Ok(())
    }

    fn settle(&self) -> Vec<tern_core::Error> {
        self.flush_deletes();
        self.inner
            .delete_errors
            .lock()
            .map(|mut e| std::mem::take(&mut *e))
            .unwrap_or_default()
    }

    fn can_chown(&self) -> bool {
        false
    }

    fn write_batch(&self, items: Vec<BatchItem>, opts: &BatchOptions) -> Vec<tern_core::Result<()>> {
        Self::parallel(&items, |item| {
            if opts.cancel.load(Ordering::Relaxed) {
                return Err(tern_core::Error::Interrupted);
            }
            match &item.body {
                // The hash is the engine's, of these very bytes.
                BatchBody::File { hash, data, .. } => {
                    self.put(&self.write_key(&item.rel)?, &item.rel, data, &item.meta, *hash)
                }
                _ => tern_core::endpoint::write_batch_each(self, vec![item.clone()], opts)
                    .pop()
                    .unwrap_or(Err(tern_core::Error::Internal(
                        "a batch of one answered nothing".into(),
                    ))),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_name_a_bucket_and_a_prefix() {
        let s = S3Spec::parse("s3://b/x/y/").expect("s3").expect("valid");
        assert_eq!(
            (s.bucket.as_str(), s.prefix.as_str(), s.trailing_slash),
            ("b", "x/y", true)
        );
        assert_eq!(s.name(), PathBuf::from("y"));
        let s = S3Spec::parse("s3://b").expect("s3").expect("valid");
        assert_eq!((s.prefix.as_str(), s.trailing_slash), ("", true));
        assert_eq!(s.display(), "s3://b/");
        assert!(S3Spec::parse("/local/path").is_none());
        assert!(S3Spec::parse("s3://").expect("s3").is_err());
        assert!(S3Spec::parse("s3://Bad_Bucket!/x").expect("s3").is_err());
        assert!(S3Spec::parse("s3://b/../x").expect("s3").is_err());
    }

    #[test]
    fn times_cross_as_seconds_and_nanoseconds() {
        let t = Time {
            sec: 1_700_000_000,
            nsec: 5,
        };
        assert_eq!(parse_time(&format_time(t)), Some(t));
        // rclone's, with fewer digits.
        assert_eq!(
            parse_time("1700000000.5"),
            Some(Time {
                sec: 1_700_000_000,
                nsec: 500_000_000
            })
        );
        assert_eq!(parse_time("12"), Some(Time { sec: 12, nsec: 0 }));
        assert_eq!(parse_time("x.1"), None);
        assert_eq!(
            parse_date("2026-12-04T02:45:23.250Z").map(|t| t.nsec),
            Some(250_000_000)
        );
        assert!(parse_date("Fri, 04 Dec 2026 02:45:23 GMT").is_some());
    }

    #[test]
    fn keys_are_encoded_for_copy_sources() {
        assert_eq!(encode_key("a b/c+d/é"), "a%20b/c%2Bd/%C3%A9");
    }
}
