//! Files mapped shared and writable: their hot pages, read on a timer until a
//! writeback after their last store has ended (see `crate::mapped`).

use super::*;

impl<W: Watcher> Resolver<W> {
    /// Whether files with hot mapped pages exist (then [`Resolver::mapped_pass`] is due
    /// every [`crate::mapped::PASS_INTERVAL`]).
    pub fn has_mapped(&self) -> bool {
        !self.mapped.is_empty()
    }

    /// Pages of shared mappings being re-read.
    pub fn mapped_hot_pages(&self) -> usize {
        self.mapped.hot_pages()
    }

    /// Reads every hot page of every file mapped shared and sends those whose content
    /// changed since they were last sent (see `mapped.rs`).
    pub fn mapped_pass(&mut self, out: &mut Vec<SetOp>) {
        let started = monotonic_ns();
        let mut buf = Vec::new();
        for (file, parent, runs) in self.mapped.runs() {
            let Some(loc) = self.file_location(file, Some(parent), out) else {
                self.mapped.forget(file); // gone from every set
                continue;
            };
            if !self.sets[loc.set].rules.file(&loc.rel) {
                self.mapped.forget(file);
                continue;
            }
            let abs = self.index.abs(&loc);
            let f = match File::open(&abs) {
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue, // events will say
                Err(e) => {
                    warn!(path = %abs.display(), "cannot read pages of a mapped file: {e}");
                    continue;
                }
            };
            match f.metadata() {
                Ok(m) if file_id(&m) == file => {}
                _ => continue, // renamed or replaced: the index catches up first
            }
            let path = rel_path(&loc.rel);
            let mut sent = false;
            for run in runs {
                self.keep_dirty_pages_hot(file, run, &f, &abs);
                buf.resize((run.count * PAGE) as usize, 0);
                let n = match f.read_at(&mut buf, run.first * PAGE) {
                    Ok(n) => {
                        self.overlaps
                            .read(file, run.first * PAGE, n as u64, started);
                        n
                    }
                    Err(e) => {
                        warn!(path = %abs.display(), "cannot read pages of a mapped file: {e}");
                        break;
                    }
                };
                // Changed pages, joined into one write per consecutive stretch.
                let mut pending: Option<(u64, Vec<u8>)> = None;
                for (i, page) in buf[..n].chunks(PAGE as usize).enumerate() {
                    let idx = run.first + i as u64;
                    let hash = doppel_common::wire::sums::block_sum(page);
                    // A page in a hole of the source reads as zeros: not data to send.
                    let hole = page.iter().all(|&b| b == 0) && {
                        let at = idx * PAGE;
                        next_data(&f, at, at + PAGE).0 >= at + PAGE
                    };
                    if !self.mapped.read(file, idx, hash) || hole {
                        if let Some((offset, data)) = pending.take() {
                            out.push(write_op(loc.set, &path, offset, data));
                            sent = true;
                        }
                        continue;
                    }
                    match &mut pending {
                        Some((_, data)) => data.extend_from_slice(page),
                        None => pending = Some((idx * PAGE, page.to_vec())),
                    }
                }
                if let Some((offset, data)) = pending.take() {
                    out.push(write_op(loc.set, &path, offset, data));
                    sent = true;
                }
            }
            if sent {
                // Stores through a mapping are only ever read back.
                self.note_read_back(loc.set);
                self.touch(Some(file), false);
            }
        }
        self.mapped.end_pass();
    }

    /// A writeback of the file ended since the run's pages were reported, but it may
    /// have covered only part of the file (`sync_file_range`, `msync` of a part, the
    /// flusher's chunks): pages it left dirty stay hot, since a store into them would
    /// leave no trace. Asked before the pages are read, so that a page found clean
    /// reports every store after the read.
    pub(super) fn keep_dirty_pages_hot(&mut self, file: FileId, run: Run, f: &File, abs: &Path) {
        let retiring = self.mapped.retiring(file, run);
        if retiring.is_empty() {
            return;
        }
        match dirty_pages(f, abs, run.first * PAGE, run.count * PAGE) {
            Some(0) | None => return,
            Some(_) => {}
        }
        for idx in retiring {
            if dirty_pages(f, abs, idx * PAGE, PAGE).is_none_or(|n| n > 0) {
                self.mapped.still_dirty(file, idx);
            }
        }
    }

    /// A range of `file` was mapped shared. Its pages that are dirty already (written by
    /// `write(2)` before) would not report stores: write them back now, so that from
    /// here on every store does, and read the range once for the stores made meanwhile.
    pub(super) fn mapped_range(
        &mut self,
        file: FileId,
        parent: FileId,
        offset: u64,
        len: u64,
        time: u64,
        out: &mut Vec<SetOp>,
    ) {
        let Some(loc) = self.file_location(file, Some(parent), out) else {
            return;
        };
        if !self.sets[loc.set].rules.file(&loc.rel) {
            return;
        }
        let abs = self.index.abs(&loc);
        let Ok(f) = File::open(&abs) else {
            return; // gone already: its events follow
        };
        let size = match f.metadata() {
            Ok(m) if file_id(&m) == file => m.len(),
            _ => return,
        };
        let len = len.min(size.saturating_sub(offset));
        if len == 0 {
            return;
        }
        write_back(&f, &abs, offset, len);
        debug!(path = %abs.display(), offset, len, "mapped shared: reading the range once");
        self.mapped.read_once(file, parent, offset, len, time);
    }
}
