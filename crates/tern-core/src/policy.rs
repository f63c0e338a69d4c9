//! What a destination written on behalf of untrusted clients lets them set.
//!
//! A daemon running as root that applied every mode, owner and extended
//! attribute a client sends would let any read-write client publish a
//! set-user-id root program or one with file capabilities. A
//! [`MetaPolicy`] given to a [`LocalEndpoint`](crate::LocalEndpoint) is
//! applied by the endpoint itself, so every way into it (single files,
//! batches, symlinks, metadata of existing entries, a daemon's pull) goes
//! through the same rules.

use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;

use crate::endpoint::Xattrs;
use crate::entry::Kind;

/// The uid and gid of `nobody`, what owner 0 becomes when the module root
/// itself belongs to root.
pub const NOBODY: u32 = 65534;

/// The extended attribute namespaces Linux knows, the part of a name
/// before its first dot.
pub const XATTR_NAMESPACES: [&str; 4] = ["user", "trusted", "security", "system"];

const SETUID: u32 = 0o4000;
const SETGID: u32 = 0o2000;

/// Which modes, owners and extended attributes writers get.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaPolicy {
    /// Keep the set-user-id and set-group-id bits writers ask for. When
    /// false both are cleared on files and set-user-id on directories; a
    /// directory keeps set-group-id, which only makes new entries inherit
    /// its group (a group a writer could give them directly), and shared
    /// directories rely on it.
    pub setid: bool,
    /// The owner of everything written, whatever the writer asks, when
    /// this process may change owners.
    pub uid: Option<u32>,
    /// The group of everything written, likewise.
    pub gid: Option<u32>,
    /// Let entries be owned by uid or gid 0, asked for by a writer or left
    /// by this process creating them as root. When false, 0 becomes
    /// `fallback`.
    pub root_owner: bool,
    /// What uid and gid 0 become unless `root_owner`.
    pub fallback: (u32, u32),
    /// Extended attribute namespaces writers may set and readers are shown;
    /// attributes of any other are dropped.
    pub xattrs: Vec<String>,
}

impl MetaPolicy {
    /// The policy of a directory exported with nothing configured: no
    /// set-id bits, no owner 0, only `user.*` attributes. `root_owner` is
    /// the owner and group of the exported directory: 0 becomes those,
    /// or [`NOBODY`] where they are 0 too.
    pub fn strict(root_owner: (u32, u32)) -> MetaPolicy {
        let not_root = |id: u32| if id == 0 { NOBODY } else { id };
        MetaPolicy {
            setid: false,
            uid: None,
            gid: None,
            root_owner: false,
            fallback: (not_root(root_owner.0), not_root(root_owner.1)),
            xattrs: vec!["user".to_string()],
        }
    }

    /// The permission bits to give an entry of `kind` a writer wants
    /// `mode` for.
    pub fn mode(&self, kind: Kind, mode: u32) -> u32 {
        if self.setid {
            return mode;
        }
        match kind {
            Kind::Dir => mode & !SETUID,
            _ => mode & !(SETUID | SETGID),
        }
    }

    /// The owner and group an entry now owned by `current` ends up with,
    /// when the writer asks for `asked` (`None`: it asked to keep none).
    pub fn owner(&self, current: (u32, u32), asked: Option<(u32, u32)>) -> (u32, u32) {
        let (uid, gid) = asked.unwrap_or(current);
        let map = |id: u32, to: u32| if id == 0 && !self.root_owner { to } else { id };
        (
            self.uid.unwrap_or_else(|| map(uid, self.fallback.0)),
            self.gid.unwrap_or_else(|| map(gid, self.fallback.1)),
        )
    }

    /// Whether an attribute called `name` may be set and shown.
    pub fn xattr_allowed(&self, name: &OsStr) -> bool {
        let b = name.as_bytes();
        let ns = b.iter().position(|&c| c == b'.').map_or(b, |dot| &b[..dot]);
        self.xattrs.iter().any(|allowed| allowed.as_bytes() == ns)
    }

    /// `xattrs` without the attributes this policy drops; each dropped one
    /// is logged at debug level (a writer asking for them is no error, so
    /// that copying from a source that has them still works).
    pub fn filter_xattrs<'a>(&self, xattrs: &'a Xattrs) -> std::borrow::Cow<'a, Xattrs> {
        if xattrs.iter().all(|(n, _)| self.xattr_allowed(n)) {
            return std::borrow::Cow::Borrowed(xattrs);
        }
        let kept = xattrs
            .iter()
            .filter(|(n, _)| {
                let ok = self.xattr_allowed(n);
                if !ok {
                    tracing::debug!(name = ?n, "extended attribute not allowed here; dropped");
                }
                ok
            })
            .cloned()
            .collect();
        std::borrow::Cow::Owned(kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_strict_policy_clears_set_id_maps_root_and_keeps_only_user_attributes() {
        let p = MetaPolicy::strict((0, 0));
        assert_eq!(p.fallback, (NOBODY, NOBODY));
        assert_eq!(p.mode(Kind::File, 0o6755), 0o755);
        assert_eq!(p.mode(Kind::File, 0o1777), 0o1777);
        assert_eq!(p.mode(Kind::Dir, 0o6775), 0o2775);
        assert_eq!(p.owner((0, 0), Some((0, 0))), (NOBODY, NOBODY));
        assert_eq!(p.owner((0, 0), None), (NOBODY, NOBODY));
        assert_eq!(p.owner((0, 0), Some((1000, 0))), (1000, NOBODY));
        assert_eq!(p.owner((5, 6), None), (5, 6));
        assert_eq!(MetaPolicy::strict((1000, 0)).fallback, (1000, NOBODY));
        let x: Xattrs = [
            "user.a",
            "trusted.b",
            "security.capability",
            "system.posix_acl_access",
            "userx.c",
        ]
        .iter()
        .map(|n| (n.into(), vec![1]))
        .collect();
        let kept: Vec<_> = p.filter_xattrs(&x).iter().map(|(n, _)| n.clone()).collect();
        assert_eq!(kept, vec![std::ffi::OsString::from("user.a")]);
    }

    #[test]
    fn a_module_can_allow_more() {
        let p = MetaPolicy {
            setid: true,
            uid: Some(7),
            gid: None,
            root_owner: true,
            fallback: (NOBODY, NOBODY),
            xattrs: vec!["user".into(), "security".into()],
        };
        assert_eq!(p.mode(Kind::File, 0o4755), 0o4755);
        assert_eq!(p.owner((3, 3), Some((0, 0))), (7, 0));
        assert!(p.xattr_allowed(OsStr::new("security.capability")));
        assert!(!p.xattr_allowed(OsStr::new("trusted.x")));
    }
}
