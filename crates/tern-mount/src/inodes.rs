//! Inode numbers for the paths the kernel knows, and what was last seen of
//! each.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::path::{Path, PathBuf};
use std::time::Instant;

use tern_core::Entry;

/// The root's inode number, as FUSE has it.
pub const ROOT: u64 = 1;

/// A path the kernel holds a reference to.
pub struct Node {
    /// Its path below the mounted root.
    pub rel: PathBuf,
    /// Its parent's inode and its name there (none for the root).
    parent: Option<(u64, OsString)>,
    /// What the daemon said of it, and when.
    pub entry: Entry,
    /// When `entry` was fetched.
    pub seen: Instant,
    /// The kernel's lookups not yet forgotten.
    lookups: u64,
    /// The version (size, mtime) whose pages the kernel may keep cached.
    pub cached: Option<(u64, tern_core::entry::Time)>,
}

/// Every inode the kernel may name.
#[derive(Default)]
pub struct Inodes {
    nodes: HashMap<u64, Node>,
    by_name: HashMap<(u64, OsString), u64>,
    next: u64,
}

impl Inodes {
    /// A table holding the root, as `entry` describes it.
    pub fn new(root: Entry) -> Inodes {
        let mut t = Inodes {
            next: ROOT + 1,
            ..Default::default()
        };
        t.nodes.insert(
            ROOT,
            Node {
                rel: PathBuf::new(),
                parent: None,
                entry: root,
                seen: Instant::now(),
                // Never forgotten.
                lookups: 1,
                cached: None,
            },
        );
        t
    }

    /// The node of `ino` while a name holds it: an inode whose name was
    /// removed or replaced must not act on what has that name now.
    pub fn named(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino).filter(|n| ino == ROOT || n.parent.is_some())
    }

    /// The node of `ino`.
    pub fn get(&self, ino: u64) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    /// The node of `ino`, to update.
    pub fn get_mut(&mut self, ino: u64) -> Option<&mut Node> {
        self.nodes.get_mut(&ino)
    }

    /// The path of `name` in directory `parent`.
    pub fn child_path(&self, parent: u64, name: &OsStr) -> Option<PathBuf> {
        self.nodes.get(&parent).map(|p| p.rel.join(name))
    }

    /// Records that the kernel now holds one more reference to `name` in
    /// `parent`, described by `entry`: its inode, made if new. An entry of
    /// another kind than the one known under that name gets a new inode.
    pub fn remember(&mut self, parent: u64, name: &OsStr, entry: Entry) -> u64 {
        let key = (parent, name.to_os_string());
        if let Some(&ino) = self.by_name.get(&key) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                if n.entry.kind == entry.kind {
                    n.entry = entry;
                    n.seen = Instant::now();
                    n.lookups += 1;
                    return ino;
                }
                // Replaced by an entry of another kind: the old inode lives
                // on until the kernel forgets it, nameless.
                n.parent = None;
            }
        }
        let ino = self.next;
        self.next += 1;
        let rel = self
            .child_path(parent, name)
            .unwrap_or_else(|| Path::new(name).to_path_buf());
        self.nodes.insert(
            ino,
            Node {
                rel,
                parent: Some(key.clone()),
                entry,
                seen: Instant::now(),
                lookups: 1,
                cached: None,
            },
        );
        self.by_name.insert(key, ino);
        ino
    }

    /// The inode of the path `rel`, if the kernel holds it.
    pub fn find(&self, rel: &Path) -> Option<u64> {
        let mut ino = ROOT;
        for c in rel.iter() {
            ino = *self.by_name.get(&(ino, c.to_os_string()))?;
        }
        Some(ino)
    }

    /// The inode `name` in `parent` has, if the kernel holds one; without
    /// taking a reference (a plain readdir).
    pub fn peek(&self, parent: u64, name: &OsStr) -> Option<u64> {
        self.by_name.get(&(parent, name.to_os_string())).copied()
    }

    /// The name in `parent` is gone at the daemon: its inode loses its name.
    pub fn vanished(&mut self, parent: u64, name: &OsStr) {
        if let Some(ino) = self.by_name.remove(&(parent, name.to_os_string())) {
            if let Some(n) = self.nodes.get_mut(&ino) {
                n.parent = None;
            }
        }
    }

    /// `name` in `parent` is now `newname` in `newparent`: its inode, and
    /// those of everything beneath it, follow; what was at the new name
    /// loses it.
    pub fn rename(&mut self, parent: u64, name: &OsStr, newparent: u64, newname: &OsStr) {
        let Some(dst) = self.child_path(newparent, newname) else {
            return;
        };
        self.vanished(newparent, newname);
        let Some(ino) = self.by_name.remove(&(parent, name.to_os_string())) else {
            return;
        };
        let key = (newparent, newname.to_os_string());
        let Some(src) = self.nodes.get_mut(&ino).map(|n| {
            n.parent = Some(key.clone());
            std::mem::replace(&mut n.rel, dst.clone())
        }) else {
            return;
        };
        self.by_name.insert(key, ino);
        for n in self.nodes.values_mut() {
            if let Ok(rest) = n.rel.strip_prefix(&src) {
                if !rest.as_os_str().is_empty() {
                    n.rel = dst.join(rest);
                }
            }
        }
    }

    /// The kernel dropped `n` references to `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT {
            return;
        }
        let Some(node) = self.nodes.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        if let Some(node) = self.nodes.remove(&ino) {
            if let Some(key) = node.parent {
                if self.by_name.get(&key) == Some(&ino) {
                    self.by_name.remove(&key);
                }
            }
        }
    }

    /// How many inodes are held.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.nodes.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_core::Kind;

    fn entry(name: &str, kind: Kind) -> Entry {
        Entry {
            name: name.into(),
            kind,
            size: 0,
            meta: Default::default(),
            target: None,
            file_id: None,
            nlink: 1,
            allocated: 0,
            changed: Default::default(),
        }
    }

    #[test]
    fn lookups_share_an_inode_until_all_are_forgotten() {
        let mut t = Inodes::new(entry("", Kind::Dir));
        let a = t.remember(ROOT, OsStr::new("a"), entry("a", Kind::Dir));
        let b = t.remember(a, OsStr::new("b"), entry("b", Kind::File));
        assert_eq!(t.get(b).map(|n| n.rel.clone()), Some(PathBuf::from("a/b")));
        assert_eq!(t.remember(a, OsStr::new("b"), entry("b", Kind::File)), b);
        t.forget(b, 1);
        assert!(t.get(b).is_some(), "one reference is left");
        t.forget(b, 1);
        assert!(t.get(b).is_none() && t.peek(a, OsStr::new("b")).is_none());
        // A name that now is a directory gets a new inode.
        let f = t.remember(ROOT, OsStr::new("x"), entry("x", Kind::File));
        let d = t.remember(ROOT, OsStr::new("x"), entry("x", Kind::Dir));
        assert_ne!(f, d);
        assert_eq!(t.peek(ROOT, OsStr::new("x")), Some(d));
        t.forget(f, 1);
        assert_eq!(
            t.peek(ROOT, OsStr::new("x")),
            Some(d),
            "forgetting the old one keeps the new name"
        );
        t.forget(ROOT, 10);
        assert_eq!(t.len(), 3, "the root is never forgotten");
        // A renamed directory takes what is beneath it along.
        let c = t.remember(a, OsStr::new("c"), entry("c", Kind::File));
        t.rename(ROOT, OsStr::new("a"), d, OsStr::new("moved"));
        assert_eq!(t.get(c).map(|n| n.rel.clone()), Some(PathBuf::from("x/moved/c")));
        assert_eq!(t.peek(d, OsStr::new("moved")), Some(a));
        assert_eq!(t.peek(ROOT, OsStr::new("a")), None);
    }
}
