//! Control messages and version negotiation.

use serde::{Deserialize, Serialize};

use crate::ProtoError;

/// First bytes of every Hello: "TERN".
pub const MAGIC: [u8; 4] = *b"TERN";
/// Lowest protocol version this build speaks.
pub const VERSION_MIN: u16 = 1;
/// Highest protocol version this build speaks.
pub const VERSION_MAX: u16 = 1;
/// Feature bits this build offers (none are defined yet). Unknown bits from a
/// peer are ignored.
pub const FEATURES: u64 = 0;

/// A control message.
///
/// New variants are only ever appended, and only sent to a peer whose
/// negotiated version knows them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Msg {
    /// First message of each side.
    Hello(Hello),
    /// A request failed, or the connection is being closed.
    Error(ErrorMsg),
}

/// What a side speaks.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Always [`MAGIC`].
    pub magic: [u8; 4],
    /// Lowest version spoken.
    pub version_min: u16,
    /// Highest version spoken.
    pub version_max: u16,
    /// Feature bits offered.
    pub features: u64,
    /// Free text naming the software, for logs ("tern 0.1.0").
    pub agent: String,
}

impl Hello {
    /// This build's Hello.
    pub fn ours(agent: &str) -> Hello {
        Hello {
            magic: MAGIC,
            version_min: VERSION_MIN,
            version_max: VERSION_MAX,
            features: FEATURES,
            agent: agent.into(),
        }
    }
}

/// The outcome of a successful negotiation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Agreed {
    /// The version both speak, the highest such.
    pub version: u16,
    /// Features both offer.
    pub features: u64,
}

/// Picks the highest common version and the common features.
pub fn negotiate(ours: &Hello, theirs: &Hello) -> Result<Agreed, ProtoError> {
    if theirs.magic != MAGIC {
        return Err(ProtoError::BadMagic);
    }
    let version = ours.version_max.min(theirs.version_max);
    if version < ours.version_min.max(theirs.version_min) || theirs.version_min > theirs.version_max {
        return Err(ProtoError::NoCommonVersion {
            ours_min: ours.version_min,
            ours_max: ours.version_max,
            theirs_min: theirs.version_min,
            theirs_max: theirs.version_max,
        });
    }
    Ok(Agreed {
        version,
        features: ours.features & theirs.features,
    })
}

/// Why a request failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// Malformed or unexpected message.
    Protocol,
    /// Authentication failed or missing.
    Unauthorized,
    /// Authenticated, but not allowed to do this.
    Forbidden,
    /// No such module or path.
    NotFound,
    /// The server could not do it (disk full, I/O error...).
    Server,
}

/// An error sent to the peer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorMsg {
    /// Category.
    pub code: ErrorCode,
    /// One line for the user.
    pub message: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(min: u16, max: u16, features: u64) -> Hello {
        Hello {
            magic: MAGIC,
            version_min: min,
            version_max: max,
            features,
            agent: "t".into(),
        }
    }

    #[test]
    fn a_newer_peer_is_met_at_our_highest_version() {
        let ours = hello(1, 1, 0b011);
        let newer = hello(1, 5, 0b110 | 1 << 40);
        let a = negotiate(&ours, &newer).expect("common version");
        assert_eq!(a.version, 1);
        assert_eq!(a.features, 0b010);
        // Symmetric: the newer side picks the older one's version too.
        assert_eq!(negotiate(&newer, &ours).expect("common").version, 1);
    }

    #[test]
    fn no_overlap_and_bad_magic_are_refused() {
        assert!(matches!(
            negotiate(&hello(1, 2, 0), &hello(3, 4, 0)),
            Err(ProtoError::NoCommonVersion { .. })
        ));
        assert!(matches!(
            negotiate(&hello(3, 4, 0), &hello(1, 2, 0)),
            Err(ProtoError::NoCommonVersion { .. })
        ));
        let mut h = hello(1, 1, 0);
        h.magic = *b"RSYN";
        assert_eq!(negotiate(&hello(1, 1, 0), &h), Err(ProtoError::BadMagic));
        assert!(negotiate(&hello(1, 1, 0), &hello(2, 1, 0)).is_err(), "inverted range");
    }
}
