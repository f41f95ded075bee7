//! A restart's shortcut: the initial scan skips files the last run stamped as the
//! replica has them (see `stamps.rs`), and the resolver says when stamps may be taken.

use super::*;

impl<W: Watcher> Resolver<W> {
    /// The initial scan of `set` skips the files `stamps` vouch for (every target of the
    /// set vouched for the stamps' epoch and sequence).
    pub fn set_stamps(&mut self, set: usize, stamps: Stamps) {
        if self.stamps.len() <= set {
            self.stamps.resize_with(set + 1, || None);
        }
        self.stamps[set] = Some(stamps);
    }

    /// Whether the file at `rel` of `set`, found with `m`, is as the replica has it.
    pub(super) fn vouched_for(&mut self, set: usize, rel: &Path, m: &Metadata) -> bool {
        let yes = self
            .stamps
            .get(set)
            .and_then(|s| s.as_ref())
            .is_some_and(|s| s.vouch(rel, m));
        self.vouched += yes as u64;
        yes
    }

    /// The initial scan is over: stamps are of no further use.
    pub(super) fn drop_stamps(&mut self) {
        self.stamps.clear();
    }

    /// Nothing is left to do about what was captured so far: no directory to read
    /// again, no range or size to look at again, no attribute to send, no rescan owed
    /// for lost records. (A checkpoint needs it: see `stamps.rs`.)
    pub fn settled(&self) -> bool {
        self.rescan.is_empty()
            && self.deferred.is_empty()
            && self.touched.is_empty()
            && self.resize_again.is_empty()
            && self.link_waits.is_empty()
            && !self.pacing.owed()
    }

    /// The entries of `set` that may be stamped: every name that is no directory,
    /// except files with pages mapped shared and writable (stores into them leave no
    /// trace in ctime while the page stays dirty).
    pub fn stamp_candidates(&self, set: usize) -> PathList {
        let mut list = PathList::default();
        self.index.walk_entries(set, |rel, id| {
            if !self.mapped.holds(id) {
                list.push(rel);
            }
        });
        list
    }
}
