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

const CERT_FILE: &str = "cert.der";
const KEY_FILE: &str = "key.der";

impl Identity {
    /// Loads the identity kept in `dir`, creating it (and `dir`) on first
    /// use. The key file is readable by its owner only.
    pub fn load_or_create(dir: &Path) -> Result<Identity> {
        let (cert_path, key_path) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        match (fs::read(&cert_path), fs::read(&key_path)) {
            (Ok(cert), Ok(key)) => {
                return Ok(Identity {
                    cert: CertificateDer::from(cert),
                    key,
                })
            }
            (Err(e), _) | (_, Err(e)) if e.kind() != io::ErrorKind::NotFound => {
                return Err(NetError::Config(format!(
                    "{}: cannot read identity: {e}",
                    dir.display()
                )))
            }
            _ => {}
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
        // Key first: a certificate without its key would be useless.
        write_new(&key_path, &id.key, 0o600)?;
        write_new(&cert_path, &id.cert, 0o644)?;
        tracing::info!(dir = %dir.display(), fingerprint = %id.fingerprint(), "created a new identity");
        Ok(id)
    }

    /// The private key, for rustls.
    pub fn key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(self.key.clone()))
    }

    /// This identity's fingerprint.
    pub fn fingerprint(&self) -> String {
        fingerprint(&self.cert)
    }
}

fn cfg_err(p: &Path, e: io::Error) -> NetError {
    NetError::Config(format!("{}: {e}", p.display()))
}

/// Writes `data` to `path` atomically (temporary name, fsync, rename).
fn write_new(path: &Path, data: &[u8], mode: u32) -> Result<()> {
    let mut tmp = PathBuf::from(path);
    tmp.set_extension("tmp");
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .map_err(|e| cfg_err(&tmp, e))?;
    f.write_all(data)
        .and_then(|()| f.sync_all())
        .map_err(|e| cfg_err(&tmp, e))?;
    fs::rename(&tmp, path).map_err(|e| cfg_err(path, e))
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
        let mode = fs::metadata(dir.join(KEY_FILE)).expect("stat").permissions().mode();
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
