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
    /// use. The file is readable by its owner only. Processes starting at
    /// once agree on one identity: the first to link its file in wins.
    pub fn load_or_create(dir: &Path) -> Result<Identity> {
        let path = dir.join(FILE);
        match fs::read(&path) {
            Ok(bytes) => {
                return Self::decode(&bytes)
                    .ok_or_else(|| NetError::Config(format!("{}: not a tern identity file", path.display())))
            }
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(NetError::Config(format!(
                    "{}: cannot read identity: {e}",
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

/// Writes `data` to a new private file and makes it durable.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
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
