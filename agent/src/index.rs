//! The agent's picture of the watched namespace: which (dev, inode) is which path.
//!
//! The kernel identifies files by (dev, inode); paths exist only here, kept current
//! from the namespace events in capture order. Each node stores its parent and name,
//! like a dentry, so renaming a directory is one update however large its subtree.

use std::collections::{BTreeMap, HashMap};
use std::ffi::{OsStr, OsString};
use std::path::{Component, Path, PathBuf};

use doppel_common::event::FileId;

#[derive(Debug, Clone)]
struct Node {
    parent: FileId,
    name: OsString,
    is_dir: bool,
    /// When a directory scan registered this node (monotonic ns; 0 when a captured event
    /// did). Events that completed before it are already reflected in what the scan read.
    born: u64,
    /// Bytes of the file the scan saw (`u64::MAX`: not a file the scan read). A write
    /// is reported inside the filesystem before it extends the file's size, so one
    /// stamped before the scan but ending past what the scan saw is not reflected in it.
    seen_len: u64,
}

/// Where a file lives: set index and path relative to the set root (empty = the root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub set: usize,
    pub rel: PathBuf,
}

#[derive(Debug, Default)]
pub struct Index {
    /// Per set: the root's identity and canonical absolute path.
    roots: Vec<(FileId, PathBuf)>,
    nodes: HashMap<FileId, Node>,
    children: BTreeMap<(FileId, OsString), FileId>,
    /// Directories above the roots (so relative paths from them can be resolved).
    ancestors: HashMap<FileId, PathBuf>,
    /// Further names of hard-linked files (the node holds the first); only files with
    /// more than one known name have an entry.
    links: HashMap<FileId, Vec<(FileId, OsString)>>,
}

/// Deepest tree we walk; a longer chain means the index is corrupt (a cycle).
const MAX_DEPTH: usize = 4096;

impl Index {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add_root(&mut self, id: FileId, path: PathBuf) -> usize {
        self.roots.push((id, path));
        self.roots.len() - 1
    }

    pub fn add_ancestor(&mut self, id: FileId, path: PathBuf) {
        self.ancestors.insert(id, path);
    }

    /// Whether `path` is a known directory above a root.
    pub fn ancestor(&self, path: &Path) -> bool {
        self.ancestors.values().any(|p| p == path)
    }

    pub fn root(&self, set: usize) -> (FileId, &Path) {
        let (id, p) = &self.roots[set];
        (*id, p)
    }

    /// Forgets everything under the roots (before a full rescan).
    pub fn clear_nodes(&mut self) {
        self.nodes.clear();
        self.children.clear();
        self.links.clear();
    }

    /// Forgets everything under one set's root (before rescanning that set alone);
    /// returns the directories dropped.
    pub fn clear_set(&mut self, set: usize) -> Vec<FileId> {
        let root = self.roots[set].0;
        let kids = self.names(root);
        kids.iter().flat_map(|n| self.remove(root, n)).collect()
    }

    /// The names the index lists in directory `dir`.
    pub fn names(&self, dir: FileId) -> Vec<OsString> {
        self.children
            .range((dir, OsString::new())..)
            .take_while(|((p, _), _)| *p == dir)
            .map(|((_, n), _)| n.clone())
            .collect()
    }

    /// When a scan registered `id` (0: a captured event did, or it is a root/unknown).
    pub fn born(&self, id: FileId) -> u64 {
        self.nodes.get(&id).map_or(0, |n| n.born)
    }

    /// Bytes of `id` its scan saw (`u64::MAX` when not recorded).
    pub fn seen_len(&self, id: FileId) -> u64 {
        self.nodes.get(&id).map_or(u64::MAX, |n| n.seen_len)
    }

    /// The scan that registered `id` read `len` bytes of it.
    pub fn set_seen_len(&mut self, id: FileId, len: u64) {
        if let Some(n) = self.nodes.get_mut(&id) {
            n.seen_len = len;
        }
    }

    pub fn is_dir(&self, id: FileId) -> bool {
        self.roots.iter().any(|r| r.0 == id) || self.nodes.get(&id).is_some_and(|n| n.is_dir)
    }

    /// The location of a known file or directory.
    pub fn location(&self, id: FileId) -> Option<Location> {
        let mut names: Vec<&OsStr> = Vec::new();
        let mut cur = id;
        for _ in 0..MAX_DEPTH {
            if let Some(set) = self.roots.iter().position(|r| r.0 == cur) {
                let rel: PathBuf = names.iter().rev().collect();
                return Some(Location { set, rel });
            }
            let node = self.nodes.get(&cur)?;
            names.push(&node.name);
            cur = node.parent;
        }
        None
    }

    /// Absolute path of a known directory (inside a root, or an ancestor of one).
    pub fn dir_path(&self, id: FileId) -> Option<PathBuf> {
        if let Some(p) = self.ancestors.get(&id) {
            return Some(p.clone());
        }
        let loc = self.location(id)?;
        Some(self.abs(&loc))
    }

    pub fn abs(&self, loc: &Location) -> PathBuf {
        let root = &self.roots[loc.set].1;
        if loc.rel.as_os_str().is_empty() {
            root.clone()
        } else {
            root.join(&loc.rel)
        }
    }

    /// Which set an absolute, normalised path belongs to, if any.
    pub fn locate(&self, abs: &Path) -> Option<Location> {
        self.roots.iter().enumerate().find_map(|(set, (_, root))| {
            abs.strip_prefix(root).ok().map(|rel| Location {
                set,
                rel: rel.to_path_buf(),
            })
        })
    }

    /// The node at a location, if the index knows it.
    pub fn lookup(&self, loc: &Location) -> Option<FileId> {
        let mut cur = self.roots[loc.set].0;
        for c in loc.rel.components() {
            cur = *self.children.get(&(cur, c.as_os_str().to_owned()))?;
        }
        Some(cur)
    }

    /// Every location of file `id`: its first name, then its further ones (hard links).
    pub fn locations(&self, id: FileId) -> Vec<Location> {
        let Some(first) = self.location(id) else {
            return Vec::new();
        };
        let further = self.links.get(&id).into_iter().flatten();
        let further = further.filter_map(|(parent, name)| {
            let dir = self.location(*parent)?;
            Some(Location {
                set: dir.set,
                rel: dir.rel.join(name),
            })
        });
        std::iter::once(first).chain(further).collect()
    }

    /// Forgets the further names of file `id` (its node and first name stay): the
    /// replica's file under them is no longer the one the node stands for (a copy of
    /// the file was sent under a new name). Their later removal or rename is then
    /// resolved as that of a name the index does not know.
    pub fn forget_links(&mut self, id: FileId) {
        for (parent, name) in self.links.remove(&id).unwrap_or_default() {
            self.unlist(parent, &name, id);
        }
    }

    /// Records that the file `id` also has the name `name` in `parent` (a hard link).
    /// Without a node yet, this is its first name.
    pub fn insert_link(&mut self, parent: FileId, name: &OsStr, id: FileId) {
        let Some(node) = self.nodes.get(&id) else {
            return self.insert(parent, name, id, false);
        };
        if node.parent == parent && node.name == name {
            return;
        }
        let key = (parent, name.to_owned());
        if let Some(prev) = self.children.get(&key).copied() {
            if prev == id {
                return;
            }
            self.remove(parent, name);
        }
        self.children.insert(key, id);
        self.links
            .entry(id)
            .or_default()
            .push((parent, name.to_owned()));
    }

    /// Whether node `id`'s (first) name is `name` in `parent`.
    fn named(&self, id: FileId, parent: FileId, name: &OsStr) -> bool {
        self.nodes
            .get(&id)
            .is_some_and(|n| n.parent == parent && n.name == name)
    }

    /// Takes `(parent, name)` off `id`'s names if it is one of its further names (the
    /// node is untouched); if it is the first name and others exist, the next one
    /// becomes first. Returns whether the node lives on under another name.
    fn unlink_name(&mut self, id: FileId, parent: FileId, name: &OsStr) -> bool {
        let Some(names) = self.links.get_mut(&id) else {
            return false;
        };
        if let Some(i) = names.iter().position(|(p, n)| *p == parent && n == name) {
            names.remove(i);
        } else if let Some(node) = self.nodes.get_mut(&id) {
            // The first name goes: the next one takes its place.
            let (p, n) = names.remove(0);
            node.parent = p;
            node.name = n;
        }
        if names.is_empty() {
            self.links.remove(&id);
        }
        true
    }

    /// Records that `id` is `name` inside directory `parent`. A node that was known
    /// elsewhere moves (see [`Index::insert_link`] for a further name).
    pub fn insert(&mut self, parent: FileId, name: &OsStr, id: FileId, is_dir: bool) {
        self.insert_born(parent, name, id, is_dir, 0)
    }

    /// As [`Index::insert`], for a node found by a scan at time `born`.
    pub fn insert_born(
        &mut self,
        parent: FileId,
        name: &OsStr,
        id: FileId,
        is_dir: bool,
        born: u64,
    ) {
        if let Some(old) = self.nodes.remove(&id) {
            self.unlist(old.parent, &old.name, id);
        }
        // A further name that becomes the first is no longer a further one.
        if let Some(names) = self.links.get_mut(&id) {
            names.retain(|(p, n)| !(*p == parent && n == name));
            if names.is_empty() {
                self.links.remove(&id);
            }
        }
        let key = (parent, name.to_owned());
        // The file that held the name goes first: dropping it after the insert would
        // take the name's entry with it, leaving `id` a node no lookup finds (a later
        // rename of it would be missed, and its writes would follow the name it left).
        // A file with other names lives on under them (the next becomes its first).
        if let Some(prev) = self.children.get(&key).copied() {
            if prev != id && self.named(prev, parent, name) && !self.unlink_name(prev, parent, name)
            {
                self.drop_subtree(prev);
            }
        }
        self.children.insert(key, id);
        self.nodes.insert(
            id,
            Node {
                parent,
                name: name.to_owned(),
                is_dir,
                born,
                seen_len: u64::MAX,
            },
        );
    }

    /// Removes the entry `name` of `parent` and everything below it; returns the
    /// directories that were removed (to unwatch them in the kernel).
    pub fn remove(&mut self, parent: FileId, name: &OsStr) -> Vec<FileId> {
        match self.children.remove(&(parent, name.to_owned())) {
            Some(id) if self.unlink_name(id, parent, name) => Vec::new(),
            // A stale entry (its inode has moved on, or the number was reused): the node
            // lives elsewhere now and stays.
            Some(id) if !self.named(id, parent, name) => Vec::new(),
            Some(id) => self.drop_subtree(id),
            None => Vec::new(),
        }
    }

    fn drop_subtree(&mut self, id: FileId) -> Vec<FileId> {
        let mut dirs = Vec::new();
        let mut stack = vec![id];
        while let Some(cur) = stack.pop() {
            let Some(node) = self.nodes.remove(&cur) else {
                continue;
            };
            // Further names elsewhere stay in `children`; their lookups find no node and
            // fall back to reading the directory (see the resolver's file_location).
            self.links.remove(&cur);
            if node.is_dir {
                dirs.push(cur);
                let kids: Vec<(FileId, OsString)> = self
                    .children
                    .range((cur, OsString::new())..)
                    .take_while(|((p, _), _)| *p == cur)
                    .map(|(k, _)| k.clone())
                    .collect();
                for k in kids {
                    if let Some(child) = self.children.remove(&k) {
                        stack.push(child);
                    }
                }
            }
            // The entry may still be listed under its parent when called from insert.
            self.unlist(node.parent, &node.name, cur);
        }
        dirs
    }

    /// Takes `(parent, name)` out of the listing if it still names `id`; another file
    /// that has the name since keeps it.
    fn unlist(&mut self, parent: FileId, name: &OsStr, id: FileId) {
        let key = (parent, name.to_owned());
        if self.children.get(&key) == Some(&id) {
            self.children.remove(&key);
        }
    }

    /// Moves the entry `from` to `to` (replacing what was there). Returns the
    /// directories dropped by the replacement.
    pub fn rename(&mut self, from: (FileId, &OsStr), to: (FileId, &OsStr)) -> Vec<FileId> {
        let Some(id) = self.children.remove(&(from.0, from.1.to_owned())) else {
            return Vec::new();
        };
        let dropped = self.remove(to.0, to.1);
        if let Some(names) = self.links.get_mut(&id) {
            if let Some(n) = names.iter_mut().find(|(p, n)| *p == from.0 && n == from.1) {
                // A further name moved; the first stays where it is.
                *n = (to.0, to.1.to_owned());
                self.children.insert((to.0, to.1.to_owned()), id);
                return dropped;
            }
        }
        let (is_dir, born, seen_len) = self
            .nodes
            .get(&id)
            .map_or((false, 0, u64::MAX), |n| (n.is_dir, n.born, n.seen_len));
        self.insert_born(to.0, to.1, id, is_dir, born);
        self.set_seen_len(id, seen_len);
        dropped
    }

    /// Swaps two entries (RENAME_EXCHANGE). Only the names change places: each node
    /// keeps its subtree and its other names.
    pub fn exchange(&mut self, a: (FileId, &OsStr), b: (FileId, &OsStr)) {
        let (ka, kb) = ((a.0, a.1.to_owned()), (b.0, b.1.to_owned()));
        let ida = self.children.get(&ka).copied();
        let idb = self.children.get(&kb).copied();
        match (ida, idb) {
            // Two names of one file: nothing moves.
            (Some(ida), Some(idb)) if ida == idb => {}
            (Some(ida), Some(idb)) => {
                self.children.insert(ka.clone(), idb);
                self.children.insert(kb.clone(), ida);
                self.move_name(ida, &ka, &kb);
                self.move_name(idb, &kb, &ka);
            }
            (Some(id), None) => {
                self.children.remove(&ka);
                self.children.insert(kb.clone(), id);
                self.move_name(id, &ka, &kb);
            }
            (None, Some(id)) => {
                self.children.remove(&kb);
                self.children.insert(ka.clone(), id);
                self.move_name(id, &kb, &ka);
            }
            (None, None) => {}
        }
    }

    /// `id`'s name `from` (its first or a further one) is `to` now; the listing is the
    /// caller's. A node known under another name (a stale listing) stays where it is.
    fn move_name(&mut self, id: FileId, from: &(FileId, OsString), to: &(FileId, OsString)) {
        if let Some(names) = self.links.get_mut(&id) {
            if let Some(n) = names.iter_mut().find(|(p, n)| *p == from.0 && *n == from.1) {
                *n = to.clone();
                return;
            }
        }
        if let Some(node) = self.nodes.get_mut(&id) {
            if node.parent == from.0 && node.name == from.1 {
                node.parent = to.0;
                node.name = to.1.clone();
            }
        }
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Calls `f` with the path (relative to the root) and identity of every entry of set
    /// `set` that is no directory, every name of a hard-linked file included.
    pub fn walk_entries(&self, set: usize, mut f: impl FnMut(&Path, FileId)) {
        let mut stack = vec![(self.roots[set].0, PathBuf::new())];
        while let Some((dir, rel)) = stack.pop() {
            let kids = self
                .children
                .range((dir, OsString::new())..)
                .take_while(|((p, _), _)| *p == dir);
            for ((_, name), &id) in kids {
                let path = rel.join(name);
                if self.nodes.get(&id).is_some_and(|n| n.is_dir) {
                    stack.push((id, path));
                } else {
                    f(&path, id);
                }
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// Lexically normalises an absolute path: drops `.`, applies `..`. (A `..` through a
/// symlinked directory is resolved lexically: the kernel may have gone elsewhere.)
pub fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::from("/");
    for c in p.components() {
        match c {
            Component::RootDir | Component::Prefix(_) | Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            Component::Normal(n) => out.push(n),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> FileId {
        FileId { dev: 1, ino: n }
    }

    fn loc(set: usize, rel: &str) -> Location {
        Location {
            set,
            rel: rel.into(),
        }
    }

    #[test]
    fn paths_follow_renames_of_directories() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("a"), id(2), true);
        ix.insert(id(2), OsStr::new("f"), id(3), false);
        assert_eq!(ix.location(id(3)), Some(loc(0, "a/f")));
        ix.rename((id(1), OsStr::new("a")), (id(1), OsStr::new("b")));
        assert_eq!(ix.location(id(3)), Some(loc(0, "b/f")));
        assert_eq!(ix.lookup(&loc(0, "b/f")), Some(id(3)));
        assert_eq!(ix.lookup(&loc(0, "a/f")), None);
        assert_eq!(ix.dir_path(id(2)), Some("/data/b".into()));
    }

    #[test]
    fn removing_a_directory_drops_its_subtree() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("a"), id(2), true);
        ix.insert(id(2), OsStr::new("b"), id(3), true);
        ix.insert(id(3), OsStr::new("f"), id(4), false);
        let mut dirs = ix.remove(id(1), OsStr::new("a"));
        dirs.sort();
        assert_eq!(dirs, vec![id(2), id(3)]);
        assert!(ix.is_empty());
    }

    #[test]
    fn a_walk_lists_every_name_that_is_no_directory_of_one_set() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/a".into());
        ix.add_root(id(2), "/b".into());
        ix.insert(id(1), OsStr::new("d"), id(3), true);
        ix.insert(id(3), OsStr::new("f"), id(4), false);
        ix.insert(id(3), OsStr::new("e"), id(6), true);
        ix.insert(id(1), OsStr::new("top"), id(7), false);
        ix.insert_link(id(6), OsStr::new("f2"), id(4));
        ix.insert(id(2), OsStr::new("g"), id(5), false);
        let mut seen = Vec::new();
        ix.walk_entries(0, |p, id| seen.push((p.to_path_buf(), id.ino)));
        seen.sort();
        let want: Vec<(PathBuf, u64)> =
            vec![("d/e/f2".into(), 4), ("d/f".into(), 4), ("top".into(), 7)];
        assert_eq!(seen, want);
    }

    #[test]
    fn clearing_one_set_keeps_the_others() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/a".into());
        ix.add_root(id(2), "/b".into());
        ix.insert(id(1), OsStr::new("d"), id(3), true);
        ix.insert(id(3), OsStr::new("f"), id(4), false);
        ix.insert(id(2), OsStr::new("g"), id(5), false);
        assert_eq!(ix.clear_set(0), vec![id(3)]);
        assert_eq!(ix.location(id(4)), None);
        assert_eq!(ix.location(id(5)), Some(loc(1, "g")));
    }

    #[test]
    fn rename_over_an_existing_file_replaces_it() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("x"), id(2), false);
        ix.insert(id(1), OsStr::new("y"), id(3), false);
        ix.rename((id(1), OsStr::new("x")), (id(1), OsStr::new("y")));
        assert_eq!(ix.location(id(2)), Some(loc(0, "y")));
        assert_eq!(ix.location(id(3)), None);
        assert_eq!(ix.len(), 1);
        ix.insert(id(1), OsStr::new("z"), id(4), false);
        ix.exchange((id(1), OsStr::new("y")), (id(1), OsStr::new("z")));
        assert_eq!(ix.location(id(2)), Some(loc(0, "z")));
        assert_eq!(ix.location(id(4)), Some(loc(0, "y")));
    }

    #[test]
    fn a_file_entered_over_a_known_name_keeps_that_name() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("d"), id(2), true);
        ix.insert(id(2), OsStr::new("x"), id(3), false);
        // Another file is found at the same name (moved over it, seen by a copy before
        // the rename's event): the new file takes the name, the old one goes.
        ix.insert(id(2), OsStr::new("x"), id(4), false);
        assert_eq!(ix.lookup(&loc(0, "d/x")), Some(id(4)));
        assert_eq!(ix.location(id(3)), None);
        // Its later rename moves it, so no write follows it back to the old name.
        ix.rename((id(2), OsStr::new("x")), (id(1), OsStr::new("y")));
        assert_eq!(ix.location(id(4)), Some(loc(0, "y")));
        assert_eq!(ix.lookup(&loc(0, "d/x")), None);
    }

    #[test]
    fn exchanging_directories_keeps_both_subtrees() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("a"), id(2), true);
        ix.insert(id(2), OsStr::new("f"), id(3), false);
        ix.insert(id(1), OsStr::new("b"), id(4), true);
        ix.insert(id(4), OsStr::new("g"), id(5), false);
        ix.exchange((id(1), OsStr::new("a")), (id(1), OsStr::new("b")));
        assert_eq!(ix.location(id(3)), Some(loc(0, "b/f")));
        assert_eq!(ix.location(id(5)), Some(loc(0, "a/g")));
        assert_eq!(ix.lookup(&loc(0, "b/f")), Some(id(3)));
        assert_eq!(ix.lookup(&loc(0, "a/g")), Some(id(5)));
        assert_eq!(ix.len(), 4);
    }

    #[test]
    fn exchanging_a_further_name_keeps_the_first() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("a"), id(5), false);
        ix.insert_link(id(1), OsStr::new("b"), id(5));
        ix.insert(id(1), OsStr::new("c"), id(6), false);
        ix.exchange((id(1), OsStr::new("b")), (id(1), OsStr::new("c")));
        assert_eq!(ix.location(id(5)), Some(loc(0, "a")));
        assert_eq!(ix.lookup(&loc(0, "c")), Some(id(5)));
        assert_eq!(ix.location(id(6)), Some(loc(0, "b")));
        assert_eq!(ix.lookup(&loc(0, "b")), Some(id(6)));
        // Removing the first name promotes the exchanged one.
        ix.remove(id(1), OsStr::new("a"));
        assert_eq!(ix.location(id(5)), Some(loc(0, "c")));
    }

    #[test]
    fn hard_links_keep_every_name() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("d"), id(2), true);
        ix.insert(id(1), OsStr::new("a"), id(5), false);
        ix.insert_link(id(2), OsStr::new("b"), id(5));
        assert_eq!(ix.lookup(&loc(0, "d/b")), Some(id(5)));
        assert_eq!(ix.location(id(5)), Some(loc(0, "a")));
        // Moving the further name keeps the first.
        ix.rename((id(2), OsStr::new("b")), (id(2), OsStr::new("c")));
        assert_eq!(ix.lookup(&loc(0, "d/c")), Some(id(5)));
        assert_eq!(ix.location(id(5)), Some(loc(0, "a")));
        // Removing the first name promotes the other.
        ix.remove(id(1), OsStr::new("a"));
        assert_eq!(ix.location(id(5)), Some(loc(0, "d/c")));
        assert_eq!(ix.lookup(&loc(0, "a")), None);
        ix.remove(id(2), OsStr::new("c"));
        assert_eq!(ix.location(id(5)), None);
        assert_eq!(ix.len(), 1);
    }

    #[test]
    fn every_name_of_a_linked_file_is_listed_and_further_ones_can_be_forgotten() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("d"), id(2), true);
        ix.insert(id(1), OsStr::new("a"), id(5), false);
        ix.insert_link(id(2), OsStr::new("b"), id(5));
        ix.insert_link(id(1), OsStr::new("c"), id(5));
        assert_eq!(
            ix.locations(id(5)),
            vec![loc(0, "a"), loc(0, "d/b"), loc(0, "c")]
        );
        // A further name taking the node's place is its first name only.
        ix.insert(id(1), OsStr::new("c"), id(5), false);
        assert_eq!(ix.locations(id(5)), vec![loc(0, "c"), loc(0, "d/b")]);
        assert_eq!(ix.lookup(&loc(0, "a")), None);
        ix.forget_links(id(5));
        assert_eq!(ix.locations(id(5)), vec![loc(0, "c")]);
        assert_eq!(ix.lookup(&loc(0, "d/b")), None);
        // A full rescan forgets further names too.
        ix.insert_link(id(1), OsStr::new("e"), id(5));
        ix.clear_nodes();
        ix.insert(id(1), OsStr::new("c"), id(5), false);
        assert_eq!(ix.locations(id(5)), vec![loc(0, "c")]);
    }

    #[test]
    fn an_entry_registered_over_a_name_of_a_linked_file_keeps_the_file_under_its_others() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("a"), id(5), false);
        ix.insert_link(id(1), OsStr::new("b"), id(5));
        // A directory found at `a` (exchanged with the file there): the file is still `b`.
        ix.insert(id(1), OsStr::new("a"), id(6), true);
        assert_eq!(ix.lookup(&loc(0, "a")), Some(id(6)));
        assert_eq!(ix.locations(id(5)), vec![loc(0, "b")]);
        assert_eq!(ix.lookup(&loc(0, "b")), Some(id(5)));
    }

    #[test]
    fn a_stale_name_does_not_take_a_live_node_with_it() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/data".into());
        ix.insert(id(1), OsStr::new("old"), id(7), true);
        ix.insert(id(7), OsStr::new("f"), id(8), false);
        // Inode 7 shows up under another name (moved while unwatched, or reused)...
        ix.insert(id(1), OsStr::new("new"), id(7), true);
        // ...and the old name's removal arrives afterwards.
        assert!(ix.remove(id(1), OsStr::new("old")).is_empty());
        assert_eq!(ix.location(id(8)), Some(loc(0, "new/f")));
    }

    #[test]
    fn locate_and_normalize() {
        let mut ix = Index::new();
        ix.add_root(id(1), "/srv/a".into());
        ix.add_root(id(9), "/srv/b".into());
        assert_eq!(ix.locate(Path::new("/srv/b/x/y")), Some(loc(1, "x/y")));
        assert_eq!(ix.locate(Path::new("/srv/ab")), None);
        assert_eq!(
            normalize(Path::new("/srv/./a/../b//c/")),
            PathBuf::from("/srv/b/c")
        );
        assert_eq!(normalize(Path::new("/../..")), PathBuf::from("/"));
    }
}
