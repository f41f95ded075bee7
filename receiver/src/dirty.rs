//! Descriptors whose changes must reach the disk before a sequence number is persisted.
//!
//! Holding the descriptor (not the path) means a file renamed or unlinked later in the
//! batch is still synced, and the fd number is a unique key while we hold it open. But a
//! catch-up after an outage touches thousands of files before the next commit, and every
//! held descriptor counts against the process's open file limit. So the descriptors held
//! by all dirty sets together are capped ([`set_budget`]): a set that would go past the
//! cap syncs what it holds at once and lets it go. Syncing early is always safe; only
//! persisting a sequence number before its data is synced would not be.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

#[cfg(test)]
pub type InodeSet = std::collections::HashSet<(u64, u64)>;

/// Descriptors held by every [`Dirty`] in the process.
static HELD: AtomicUsize = AtomicUsize::new(0);
/// At most this many are held before a dirty set syncs early.
static BUDGET: AtomicUsize = AtomicUsize::new(256);
/// From this many dirty files and directories on, a sync flushes their filesystems
/// whole (`syncfs`) instead of each of them.
const SYNCFS_FROM: usize = 32;

/// Sets how many descriptors the dirty sets may hold together, given the process's open
/// file limit: a quarter of it, leaving the rest to sockets, caches and the state store.
pub fn set_budget(open_file_limit: u64) {
    let n = (open_file_limit / 4).clamp(16, 1 << 16) as usize;
    BUDGET.store(n, Ordering::Relaxed);
}

/// One held descriptor, counted in [`HELD`] for as long as it lives.
struct Held(Arc<OwnedFd>);

impl Held {
    fn new(fd: &Arc<OwnedFd>) -> Held {
        HELD.fetch_add(1, Ordering::Relaxed);
        Held(fd.clone())
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        HELD.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Files written and directories whose entries changed since the last sync.
pub struct Dirty {
    /// False when the receiver runs with `fsync = false`: nothing is held or synced.
    durable: bool,
    files: HashMap<RawFd, Held>,
    dirs: HashMap<RawFd, Held>,
    /// The first early sync that failed; [`sync`](Dirty::sync) reports it, so the
    /// sequence number covering those changes is never persisted.
    failed: Option<std::io::Error>,
}

impl Default for Dirty {
    fn default() -> Self {
        Dirty::new(true)
    }
}

impl Dirty {
    pub fn new(durable: bool) -> Dirty {
        Dirty {
            durable,
            files: HashMap::new(),
            dirs: HashMap::new(),
            failed: None,
        }
    }

    /// An empty set with the same durability.
    pub fn emptied(&self) -> Dirty {
        Dirty::new(self.durable)
    }

    pub fn file(&mut self, fd: &Arc<OwnedFd>) {
        if self.durable && !self.files.contains_key(&fd.as_raw_fd()) {
            self.make_room();
            self.files.insert(fd.as_raw_fd(), Held::new(fd));
        }
    }

    pub fn dir(&mut self, fd: &Arc<OwnedFd>) {
        if self.durable && !self.dirs.contains_key(&fd.as_raw_fd()) {
            self.make_room();
            self.dirs.insert(fd.as_raw_fd(), Held::new(fd));
        }
    }

    /// Over budget: sync and release what this set holds. (Other sets release theirs when
    /// they next grow or at their commit, so the total stays near the budget.)
    fn make_room(&mut self) {
        if HELD.load(Ordering::Relaxed) < BUDGET.load(Ordering::Relaxed) || self.is_empty() {
            return;
        }
        if let Err(e) = self.sync_held() {
            self.failed.get_or_insert(e);
        }
        self.files.clear();
        self.dirs.clear();
    }

    pub fn merge(&mut self, other: Dirty) {
        let Dirty {
            files,
            dirs,
            failed,
            ..
        } = other;
        // A descriptor in both sets is the same open file: the duplicate Held is dropped.
        self.files.extend(files);
        self.dirs.extend(dirs);
        if self.failed.is_none() {
            self.failed = failed;
        }
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// (device, inode) of every dirty file and directory, for tests.
    #[cfg(test)]
    pub fn inodes(&self) -> (InodeSet, InodeSet) {
        let ids = |m: &HashMap<RawFd, Held>| {
            m.values()
                .map(|fd| {
                    let st = rustix::fs::fstat(&*fd.0).unwrap();
                    (st.st_dev, st.st_ino)
                })
                .collect()
        };
        (ids(&self.files), ids(&self.dirs))
    }

    /// `fdatasync` every file, then `fsync` every directory (new names point at inodes
    /// whose data is then already on disk). Also fails if an early sync failed.
    pub fn sync(&mut self) -> std::io::Result<()> {
        if let Some(e) = self.failed.take() {
            return Err(e);
        }
        self.sync_held()
    }

    fn sync_held(&self) -> std::io::Result<()> {
        if self.files.len() + self.dirs.len() >= SYNCFS_FROM {
            return self.sync_filesystems();
        }
        for fd in self.files.values() {
            rustix::fs::fdatasync(&*fd.0)?;
        }
        for fd in self.dirs.values() {
            rustix::fs::fsync(&*fd.0)?;
        }
        Ok(())
    }

    /// One `syncfs` per filesystem the held descriptors are on: the same promise as a
    /// sync of each (the kernel reports a writeback error of any file to `syncfs`), for
    /// one device flush instead of one per file. A first mirror of many small files was
    /// bound by those flushes.
    fn sync_filesystems(&self) -> std::io::Result<()> {
        let mut seen: Vec<u64> = Vec::new();
        for fd in self.files.values().chain(self.dirs.values()) {
            let dev = rustix::fs::fstat(&*fd.0)?.st_dev;
            if !seen.contains(&dev) {
                seen.push(dev);
                rustix::fs::syncfs(&*fd.0)?;
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(p: &std::path::Path) -> Arc<OwnedFd> {
        Arc::new(std::fs::File::create(p).unwrap().into())
    }

    /// Far more dirty files than the budget: the sets never hold much more than the
    /// budget, and what they let go was synced (nothing to observe but the count).
    #[test]
    fn held_descriptors_stay_near_the_budget() {
        let d = tempfile::tempdir().unwrap();
        let budget = BUDGET.load(Ordering::Relaxed);
        let mut a = Dirty::new(true);
        let mut b = Dirty::new(true);
        for i in 0..budget * 3 {
            let fd = open(&d.path().join(format!("f{i}")));
            if i % 2 == 0 {
                a.file(&fd);
            } else {
                b.file(&fd);
            }
            // Other tests in this process may hold a few as well.
            assert!(HELD.load(Ordering::Relaxed) <= budget + 64);
        }
        a.merge(b);
        a.sync().unwrap();
        let not_durable = {
            let mut n = Dirty::new(false);
            n.file(&open(&d.path().join("x")));
            n
        };
        assert!(not_durable.is_empty());
    }
}
