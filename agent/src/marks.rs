//! What changed while a set's journal was full: the changes themselves were dropped, so
//! once the targets have caught up the agent copies again exactly the entries they
//! touched (by block comparison, see mirror.rs) instead of the whole set. Beyond
//! [`MAX_MARKS`] entries the marks are given up and the whole set is compared.

use std::collections::BTreeSet;

use doppel_common::wire::{Op, RelPath};

/// Most entries and directories remembered before the whole set is compared instead.
pub const MAX_MARKS: usize = 100_000;

#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Marks {
    /// Entries whose content, attributes or existence changed: each is mirrored again
    /// as it is now (a directory with everything beneath it).
    pub entries: BTreeSet<RelPath>,
    /// Directories that lost entries (`None`: the set root): their listing is sent
    /// again so that the replica drops what the source no longer has.
    pub dirs: BTreeSet<Option<RelPath>>,
    /// Too many marks: compare the whole set.
    pub whole: bool,
}

/// The directory holding `p` (`None`: the set root).
fn parent(p: &RelPath) -> Option<RelPath> {
    p.0.iter()
        .rposition(|&c| c == b'/')
        .map(|i| RelPath(p.0[..i].to_vec()))
}

impl Marks {
    pub fn is_empty(&self) -> bool {
        !self.whole && self.entries.is_empty() && self.dirs.is_empty()
    }

    /// Remembers what the dropped `op` changed.
    pub fn add(&mut self, op: &Op) {
        if self.whole {
            return;
        }
        match op {
            Op::Remove { path } | Op::Rmdir { path } => {
                self.dirs.insert(parent(path));
            }
            Op::Rename { from, to, .. } => {
                self.dirs.insert(parent(from));
                self.entries.insert(to.clone());
                // RENAME_EXCHANGE puts another entry at `from`.
                self.entries.insert(from.clone());
            }
            Op::Prune { dir, .. } | Op::PruneAside { dir, .. } => {
                self.dirs.insert(dir.clone());
            }
            // A verify's question and an ordering barrier change nothing: nothing to
            // copy again.
            Op::List { .. } | Op::Barrier => {}
            Op::Link { to: path, .. }
            | Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::CreateFile { path, .. }
            | Op::Mkdir { path, .. }
            | Op::SetAttr { path, .. }
            | Op::SetXattrs { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Sum { path, .. } => {
                self.entries.insert(path.clone());
            }
        }
        if self.entries.len() + self.dirs.len() > MAX_MARKS {
            *self = Marks {
                whole: true,
                ..Marks::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn dropped_ops_mark_their_entries_and_directories() {
        let mut m = Marks::default();
        assert!(m.is_empty());
        m.add(&Op::Write {
            path: p("a/f"),
            offset: 0,
            data: vec![1].into(),
        });
        m.add(&Op::Write {
            path: p("a/f"),
            offset: 9,
            data: vec![1].into(),
        });
        m.add(&Op::Remove { path: p("top") });
        m.add(&Op::Rename {
            from: p("a/old"),
            to: p("b/new"),
            flags: 0,
        });
        assert_eq!(
            m.entries,
            [p("a/f"), p("a/old"), p("b/new")].into_iter().collect()
        );
        assert_eq!(m.dirs, [None, Some(p("a"))].into_iter().collect());
        assert!(!m.whole);
    }

    #[test]
    fn too_many_marks_mean_the_whole_set() {
        let mut m = Marks::default();
        for i in 0..=MAX_MARKS {
            m.add(&Op::Truncate {
                path: p(&format!("f{i}")),
                size: 0,
            });
        }
        assert!(m.whole && m.entries.is_empty());
        m.add(&Op::Remove { path: p("x") });
        assert!(m.dirs.is_empty(), "nothing is remembered once whole");
    }
}
