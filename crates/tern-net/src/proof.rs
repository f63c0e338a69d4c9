//! What a client proves to a daemon without handing over a secret: a token
//! (keyed to the daemon's key and the TLS session, so a daemon that sees
//! the proof can replay it nowhere), and the tickets one daemon grants
//! another to read on a client's behalf.

use tern_proto::Ticket;

/// The label of the TLS exporter value a login is bound to.
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-tern-login";

/// Proof of the token whose BLAKE3 is `token_hash` (all the daemon keeps)
/// to the daemon whose key has fingerprint `server`, over the TLS session
/// whose exporter value is `exporter`.
pub fn token_proof(token_hash: &[u8; 32], server: &str, exporter: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(token_hash);
    h.update(b"tern 2026-12-02 token proof\0");
    h.update(&(server.len() as u64).to_le_bytes());
    h.update(server.as_bytes());
    h.update(exporter);
    *h.finalize().as_bytes()
}

/// The MAC of a ticket's fields under the granting daemon's `key`.
pub fn ticket_mac(t: &Ticket, key: &[u8; 32]) -> [u8; 32] {
    let mut h = blake3::Hasher::new_keyed(key);
    h.update(b"tern 2026-12-02 ticket\0");
    for field in [t.module.as_bytes(), &t.path, t.holder.as_bytes()] {
        h.update(&(field.len() as u64).to_le_bytes());
        h.update(field);
    }
    h.update(&t.expires.to_le_bytes());
    *h.finalize().as_bytes()
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_proof_is_bound_to_the_daemon_and_the_session() {
        let token = *blake3::hash(b"a token of sixteen bytes or more").as_bytes();
        let p = token_proof(&token, "b3:aa", &[1; 32]);
        assert_ne!(p, token_proof(&token, "b3:ab", &[1; 32]), "another daemon");
        assert_ne!(p, token_proof(&token, "b3:aa", &[2; 32]), "another session");
        assert_ne!(p, token_proof(&[9; 32], "b3:aa", &[1; 32]), "another token");
        assert_eq!(p, token_proof(&token, "b3:aa", &[1; 32]));
    }

    #[test]
    fn a_ticket_mac_covers_every_field() {
        let t = Ticket {
            module: "m".into(),
            path: b"a/b".to_vec(),
            holder: "b3:01".into(),
            expires: 100,
            mac: [0; 32],
        };
        let key = [5; 32];
        let mac = ticket_mac(&t, &key);
        let changed = [
            Ticket {
                module: "n".into(),
                ..t.clone()
            },
            Ticket {
                path: b"a".to_vec(),
                ..t.clone()
            },
            Ticket {
                holder: "b3:02".into(),
                ..t.clone()
            },
            Ticket {
                expires: 101,
                ..t.clone()
            },
        ];
        for c in changed {
            assert_ne!(ticket_mac(&c, &key), mac, "{c:?}");
        }
        assert_ne!(ticket_mac(&t, &[6; 32]), mac, "another daemon's key");
    }
}
