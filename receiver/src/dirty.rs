//! Descriptors whose changes must reach the disk before a sequence number is persisted.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;

#[cfg(test)]
pub type InodeSet = std::collections::HashSet<(u64, u64)>;

/// Files written and directories whose entries changed since the last sync. Holding the
/// descriptor (not the path) means a file renamed or unlinked later in the batch is still
/// synced, and the fd number is a unique key while we hold it open.
#[derive(Default)]
pub struct Dirty {
    files: HashMap<RawFd, Arc<OwnedFd>>,
    dirs: HashMap<RawFd, Arc<OwnedFd>>,
}

impl Dirty {
    pub fn file(&mut self, fd: &Arc<OwnedFd>) {
        self.files
            .entry(fd.as_raw_fd())
            .or_insert_with(|| fd.clone());
    }

    pub fn dir(&mut self, fd: &Arc<OwnedFd>) {
        self.dirs
            .entry(fd.as_raw_fd())
            .or_insert_with(|| fd.clone());
    }

    pub fn merge(&mut self, other: Dirty) {
        self.files.extend(other.files);
        self.dirs.extend(other.dirs);
    }

    pub fn is_empty(&self) -> bool {
        self.files.is_empty() && self.dirs.is_empty()
    }

    /// (device, inode) of every dirty file and directory, for tests.
    #[cfg(test)]
    pub fn inodes(&self) -> (InodeSet, InodeSet) {
        let ids = |m: &HashMap<RawFd, Arc<OwnedFd>>| {
            m.values()
                .map(|fd| {
                    let st = rustix::fs::fstat(fd).unwrap();
                    (st.st_dev, st.st_ino)
                })
                .collect()
        };
        (ids(&self.files), ids(&self.dirs))
    }

    /// `fdatasync` every file, then `fsync` every directory (new names point at inodes
    /// whose data is then already on disk).
    pub fn sync(&self) -> std::io::Result<()> {
        for fd in self.files.values() {
            rustix::fs::fdatasync(fd)?;
        }
        for fd in self.dirs.values() {
            rustix::fs::fsync(fd)?;
        }
        Ok(())
    }
}
