//! A small LRU of open file descriptors, so that a stream of 4 KiB writes to the same
//! file costs one `pwrite` each instead of an `openat2` + `pwrite` + `close`.

use std::os::fd::OwnedFd;
use std::sync::Arc;

use doppel_common::wire::RelPath;

/// Most-recently-used last. A handful of entries covers the common cases (a log being
/// appended, a database writing a few files); a linear scan over them is cheaper than
/// hashing the path.
pub struct FdCache {
    cap: usize,
    entries: Vec<(RelPath, Arc<OwnedFd>)>,
}

impl FdCache {
    pub fn new(cap: usize) -> Self {
        FdCache {
            cap: cap.max(1),
            entries: Vec::with_capacity(cap),
        }
    }

    pub fn get(&mut self, path: &RelPath) -> Option<Arc<OwnedFd>> {
        let i = self.entries.iter().rposition(|(p, _)| p == path)?;
        let e = self.entries.remove(i);
        let fd = e.1.clone();
        self.entries.push(e);
        Some(fd)
    }

    /// Removes `path`'s entry and hands it out (to another applier context).
    pub fn take(&mut self, path: &RelPath) -> Option<Arc<OwnedFd>> {
        let i = self.entries.iter().rposition(|(p, _)| p == path)?;
        Some(self.entries.remove(i).1)
    }

    /// Every entry, least recently used first.
    pub fn into_entries(self) -> Vec<(RelPath, Arc<OwnedFd>)> {
        self.entries
    }

    pub fn insert(&mut self, path: RelPath, fd: Arc<OwnedFd>) {
        self.entries.retain(|(p, _)| *p != path);
        if self.entries.len() >= self.cap {
            self.entries.remove(0);
        }
        self.entries.push((path, fd));
    }

    /// Forgets `path` and everything beneath it: after a rename or removal the name may
    /// denote another file (or none).
    pub fn invalidate(&mut self, path: &RelPath) {
        let p = &path.0;
        self.entries.retain(|(e, _)| {
            let e = &e.0;
            !(e.starts_with(p) && (e.len() == p.len() || e[p.len()] == b'/'))
        });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fd() -> Arc<OwnedFd> {
        Arc::new(std::fs::File::open("/dev/null").unwrap().into())
    }

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn lru_evicts_oldest_and_invalidates_subtrees() {
        let mut c = FdCache::new(3);
        c.insert(p("a"), fd());
        c.insert(p("d/x"), fd());
        c.insert(p("dd"), fd());
        assert!(c.get(&p("a")).is_some()); // a is now the most recent
        c.insert(p("e"), fd()); // evicts d/x
        assert!(c.get(&p("d/x")).is_none());
        assert_eq!(c.len(), 3);
        c.insert(p("d/y"), fd()); // evicts dd
        c.invalidate(&p("d"));
        assert!(c.get(&p("d/y")).is_none());
        assert!(c.get(&p("a")).is_some() && c.get(&p("e")).is_some());
        assert!(c.take(&p("a")).is_some() && c.take(&p("a")).is_none());
        let left: Vec<_> = c.into_entries().into_iter().map(|(p, _)| p).collect();
        assert_eq!(left, vec![p("e")]);
    }
}
