//! A persistent key pair and self-signed certificate: the daemon's identity,
//! and the client's. Peers know each other by the certificate's fingerprint.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

use crate::error::{NetError, Result};

/// A certificate and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The self-signed certificate (DER).
    pub cert: CertificateDer<'static>,
    key: Vec<u8>,
}

/// One file holds both, so that they are created (and replaced) together.
const FILE: &str = "identity";
const MAGIC: &[u8; 8] = b"TERNID1\n";

impl Identity {
    /// Loads the identity kept in `dir`, creating it (and `dir`) on first
    /// use. The file is readable by its owner only; one that other users
    /// could read or change is refused, as ssh refuses such keys, and a
    /// symlink is never followed to it. Processes starting at once agree on
    /// one identity: the first to link its file in wins.
    pub fn load_or_create(dir: &Path) -> Result<Identity> {
        let path = dir.join(FILE);
        match read_private(&path) {
            Ok(bytes) => {
                return Self::decode(&bytes)
                    .ok_or_else(|| NetError::Config(format!("{}: not a tern identity file", path.display())))
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(NetError::Config(format!(
                    "{}: cannot use the identity: {e}",
                    path.display()
                )))
            }
            Err(_) => {}
        }
        let made = rcgen::generate_simple_self_signed(vec!["tern".to_string()])
            .map_err(|e| NetError::Config(format!("cannot generate a key pair: {e}")))?;
        let id = Identity {
            cert: made.cert.der().clone(),
            key: made.signing_key.serialize_der(),
        };
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .map_err(|e| cfg_err(dir, e))?;
        let mut tmp = PathBuf::from(dir);
        tmp.push(format!(".identity.{}.tmp", std::process::id()));
        let written = write_new(&tmp, &id.encode());
        let linked = written.and_then(|()| fs::hard_link(&tmp, &path).map_err(|e| cfg_err(&path, e)));
        let _ = fs::remove_file(&tmp);
        match linked {
            Ok(()) => {
                tracing::info!(dir = %dir.display(), fingerprint = %id.fingerprint(), "created a new identity");
                Ok(id)
            }
            // Another process made one first: use it.
            Err(_) if path.exists() => Self::load_or_create(dir),
            Err(e) => Err(e),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = MAGIC.to_vec();
        v.extend_from_slice(&(self.cert.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.cert);
        v.extend_from_slice(&self.key);
        v
    }

    fn decode(b: &[u8]) -> Option<Identity> {
        let rest = b.strip_prefix(MAGIC)?;
        let (len, rest) = rest.split_first_chunk::<4>()?;
        let n = u32::from_le_bytes(*len) as usize;
        if rest.len() <= n {
            return None;
        }
        Some(Identity {
            cert: CertificateDer::from(rest[..n].to_vec()),
            key: rest[n..].to_vec(),
        })
    }

    /// The private key, for rustls.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }

    /// A secret derived from the private key for `purpose`: the same for
    /// as long as the identity is kept, unrelated to the key itself.
    pub fn derive_secret(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(purpose, &self.key)
    }
}

fn cfg_err(p: &Path, e: io::Error) -> NetError {
    NetError::Config(format!("{}: {e}", p.display()))
}

/// Reads the key file at `path`, which must be a regular file (not
/// reached through a symlink) that neither group nor others can access.
fn read_private(path: &Path) -> io::Result<Vec<u8>> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut f = fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)?;
    let md = f.metadata()?;
    if !md.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    let mode = md.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(io::Error::other(format!(
            "the private key can be read or changed by other users (mode {mode:04o}); run `chmod 600 {}`",
            path.display()
        )));
    }
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// Writes `data` to a new private file and makes it durable. The name must
/// be free: nothing planted there (a symlink, a file another user opened
/// first) is written through.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    // A temporary file of an earlier process with our pid, dead before it
    // could clean up; removing a symlink removes only the link.
    let _ = fs::remove_file(path);
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
        .map_err(|e| cfg_err(path, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| cfg_err(path, e))
}

/// The fingerprint of a certificate: `b3:` and the BLAKE3 of its DER bytes
/// in hex.
pub fn fingerprint(cert: &[u8]) -> String {
    format!("b3:{}", blake3::hash(cert).to_hex())
}

/// Normalises a fingerprint given by a user (case, optional `b3:`).
pub fn normalize_fingerprint(s: &str) -> Result<String> {
    let t = s.trim().to_ascii_lowercase();
    let hex = t.strip_prefix("b3:").unwrap_or(&t);
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(NetError::Config(format!(
            "`{s}` is not a tern fingerprint (expected b3: followed by 64 hex digits)"
        )));
    }
    Ok(format!("b3:{hex}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_identity_is_created_once_and_then_kept() {
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("state");
        let a = Identity::load_or_create(&dir).expect("create");
        let b = Identity::load_or_create(&dir).expect("load");
        assert_eq!(a.fingerprint(), b.fingerprint());
        assert!(a.fingerprint().starts_with("b3:") && a.fingerprint().len() == 67);
        let other = Identity::load_or_create(&d.path().join("other")).expect("create");
        assert_ne!(a.fingerprint(), other.fingerprint());
        use std::os::unix::fs::PermissionsExt;
        let mode = fs::metadata(dir.join(FILE)).expect("stat").permissions().mode();
        assert_eq!(mode & 0o077, 0, "key must be private");
    }

    #[test]
    fn a_key_file_others_can_read_or_a_symlink_to_one_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().expect("tempdir");
        let dir = d.path().join("state");
        let a = Identity::load_or_create(&dir).expect("create");
        let key = dir.join(FILE);
        fs::set_permissions(&key, fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Identity::load_or_create(&dir)
            .expect_err("a readable key was used")
            .to_string();
        assert!(
            e.contains(&key.display().to_string()) && e.contains("mode 0644") && e.contains("chmod 600"),
            "{e}"
        );
        fs::set_permissions(&key, fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            Identity::load_or_create(&dir).expect("load").fingerprint(),
            a.fingerprint()
        );

        // A symlink at the key's name is not followed, whatever it points to.
        let other = d.path().join("other");
        fs::create_dir(&other).expect("mkdir");
        std::os::unix::fs::symlink(&key, other.join(FILE)).expect("symlink");
        assert!(
            Identity::load_or_create(&other).is_err(),
            "a key read through a symlink"
        );
        // Nor is one at the temporary name written through.
        let third = d.path().join("third");
        fs::create_dir(&third).expect("mkdir");
        let victim = d.path().join("victim");
        fs::write(&victim, b"keep").expect("write");
        let tmp = third.join(format!(".identity.{}.tmp", std::process::id()));
        std::os::unix::fs::symlink(&victim, &tmp).expect("symlink");
        Identity::load_or_create(&third).expect("create beside a planted link");
        assert_eq!(fs::read(&victim).expect("read"), b"keep");
    }

    #[test]
    fn fingerprints_are_normalised_and_checked() {
        let fp = format!("B3:{}", "AB".repeat(32));
        assert_eq!(
            normalize_fingerprint(&fp).expect("valid"),
            format!("b3:{}", "ab".repeat(32))
        );
        assert!(normalize_fingerprint(&"ab".repeat(32)).is_ok());
        assert!(normalize_fingerprint("b3:1234").is_err());
        assert!(normalize_fingerprint(&format!("b3:{}", "zz".repeat(32))).is_err());
    }
}
