//! The store-and-forward journal of one replication set: the set's records on disk,
//! in sequence order, until every target has acknowledged them.
//!
//! ```text
//! DIR/meta                         the epoch (sequence space) the segments belong to
//! DIR/lock                         flock'ed while a Journal is open
//! DIR/00000000000000000001.seg     header, then records 1..=k
//! DIR/0000000000000000000k+1.seg   header, then records k+1..   <- the active segment
//! ```
//!
//! Each record is written exactly once, appended to the active segment (see
//! [`record`] for the framing); acknowledged records are dropped a whole segment at a
//! time by deleting the file. Nothing is ever rewritten, so the bytes written per byte
//! replicated is the framing overhead plus one 32-byte header per segment, and
//! [`Journal::written_bytes`] counts it so that benchmarks can check.
//!
//! Crash safety rests on three rules:
//! - a segment is created (header written, fsynced, directory fsynced) before any record
//!   goes into it, and the segment before it is fsynced first, so after a crash only the
//!   tail of the last segment can be missing or torn, and [`Journal::open`] cuts it;
//! - the last segment is never deleted by [`Journal::trim`], even when every record in
//!   it is acknowledged (it is replaced by an empty one first), so the name of the last
//!   segment always tells where the sequence stands and numbers are never reused
//!   within an epoch;
//! - [`Journal::reset`] writes the new epoch to `meta` before deleting segments, and
//!   segments carry their epoch in their header, so leftovers of an interrupted reset
//!   are recognised and deleted at open.
//!
//! With [`FsyncPolicy::Interval`] or [`FsyncPolicy::Never`], records appended since the
//! last sync are lost if the host (not just the agent) crashes. A target must not be
//! sent such a record before it is durable, or after the crash the journal would hand
//! out the same sequence number for a different op and the target would skip it as
//! already applied: send at most up to [`Journal::durable_seq`].

mod record;
mod segment;
#[cfg(test)]
mod tests;

pub use record::{decode_record, decode_records, encode_record, DecodeError, MAX_PAYLOAD};

use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use doppel_common::wire::Record;
use tracing::warn;

use segment::{Header, Next, Reader, Segment, SEGMENT_HEADER_LEN};

/// When appended records are made durable (fdatasync).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// After every [`Journal::append`]: nothing acknowledged to the pipeline is lost on
    /// power failure, at the price of one fdatasync per batch.
    Always,
    /// Records are at most this stale on disk: [`Journal::append`] syncs once the oldest
    /// unsynced record is this old, and the caller calls [`Journal::sync`] at
    /// [`Journal::sync_deadline`] so that a quiet set is synced too.
    Interval(Duration),
    /// Only on explicit [`Journal::sync`] and when a segment is finished (tests, tmpfs).
    Never,
}

#[derive(Debug, Clone)]
pub struct JournalOptions {
    /// A segment is finished once the next record would take it past this size (a
    /// record larger than this gets a segment of its own). Disk is reclaimed one whole
    /// segment at a time, so this is also how much acknowledged data may linger.
    pub segment_bytes: u64,
    pub fsync: FsyncPolicy,
    /// The most bytes the segment files may take; [`Journal::append`] refuses records
    /// beyond it with [`AppendError::Full`].
    pub budget_bytes: u64,
}

impl Default for JournalOptions {
    /// 64 MiB segments, a 100 ms fsync interval and a 4 GiB budget.
    ///
    /// Why 100 ms rather than [`FsyncPolicy::Always`]: an agent crash loses nothing
    /// either way (the data is in the page cache); only a host crash loses the last
    /// interval, and the sources' own unsynced writes go with it. One fdatasync per
    /// batch would instead cap the pipeline at the disk's flush rate (hundreds per
    /// second on SSDs, tens on disks) whenever batches are small. 100 ms keeps the
    /// window short and fsyncs to at most ten a second; senders wait for
    /// [`Journal::durable_seq`], so they see at most that much extra latency.
    fn default() -> Self {
        JournalOptions {
            segment_bytes: 64 << 20,
            fsync: FsyncPolicy::Interval(Duration::from_millis(100)),
            budget_bytes: 4 << 30,
        }
    }
}

/// What can go wrong opening or using a journal. Messages name the file and the fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("journal {}: {action}: {source}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        source: io::Error,
    },
    #[error(
        "journal segment {} is damaged at byte {offset}: {detail}. The journal cannot be \
         replayed past it: stop the agent and move this file and every older segment out \
         of {} (or remove the whole directory); the agent then starts after it, and \
         targets that needed the lost records are copied again",
        path.display(), dir.display()
    )]
    Corrupt {
        path: PathBuf,
        dir: PathBuf,
        offset: u64,
        detail: String,
    },
    #[error(
        "journal {}: {detail}. Stop the agent and move {} aside; the set then starts a new \
         epoch and is copied again",
        path.display(), dir.display()
    )]
    BadMeta {
        path: PathBuf,
        dir: PathBuf,
        detail: String,
    },
    #[error(
        "journal {} is in use by another process (is a second doppel-agent running with \
         the same state directory?)",
        dir.display()
    )]
    Locked { dir: PathBuf },
    #[error("invalid journal options: {0}")]
    Options(String),
    /// The caller asked for records this journal does not hold: trimmed already, or
    /// beyond the last one. The target must be resynced (a new epoch).
    #[error("records after {after} are not held (the journal holds {first_seq} to {last_seq})")]
    Gap {
        after: u64,
        first_seq: u64,
        last_seq: u64,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum AppendError {
    /// Appending would take the journal past its budget; nothing was written. The
    /// caller keeps tracking the changes another way until acks free segments.
    #[error(
        "journal budget of {budget} bytes is full ({used} used, {needed} more needed); \
         raise the budget or wait for targets to acknowledge"
    )]
    Full { needed: u64, used: u64, budget: u64 },
    /// The records do not continue the sequence; nothing was written (a caller bug).
    #[error("record {got} does not continue the journal, which expects {expected} next")]
    Sequence { expected: u64, got: u64 },
    /// A record too large for any reader to accept; nothing was written.
    #[error("record {seq} encodes to {len} bytes, more than the {MAX_PAYLOAD}-byte limit")]
    TooLarge { seq: u64, len: usize },
    /// The disk failed mid-append: a prefix of the records may have been appended
    /// ([`Journal::last_seq`] tells how far).
    #[error(transparent)]
    Io(#[from] Error),
}

/// Bytes read per window when replaying a segment at open.
const SCAN_CHUNK: usize = 1 << 20;
/// The active segment is replaced by an empty one once it is fully acknowledged and at
/// least this fraction of `segment_bytes`: smaller ones are kept, so that a quiet set
/// with prompt acks does not create (and fsync) a file per ack.
const ROLL_ACKED_DIVISOR: u64 = 4;
const META: &str = "meta";
const META_TMP: &str = "meta.tmp";
const LOCK: &str = "lock";

#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    opts: JournalOptions,
    epoch: u64,
    /// Ascending by `first_seq`, contiguous; the last one is the active segment, and
    /// only it may hold no records. Empty only after a failed reset (the next append
    /// creates the segment).
    segments: Vec<Segment>,
    next_seq: u64,
    bytes: u64,
    written: u64,
    acked: u64,
    durable_seq: u64,
    /// When the oldest record not yet fdatasynced was appended.
    dirty_since: Option<Instant>,
    /// Held for its flock: one process per journal.
    _lock: File,
}

impl Journal {
    /// Opens the journal in `dir` (created if missing), replaying it to find the records
    /// held. A new journal, or one without `meta`, gets `new_epoch`; otherwise the
    /// stored epoch is kept (see [`Journal::epoch`]).
    ///
    /// A torn or corrupt tail of the last segment is cut (with a warning: a crash
    /// mid-append leaves one); damage anywhere else is [`Error::Corrupt`].
    pub fn open(dir: &Path, opts: JournalOptions, new_epoch: u64) -> Result<Journal, Error> {
        if opts.segment_bytes <= SEGMENT_HEADER_LEN as u64 {
            return Err(Error::Options(format!(
                "segment_bytes must be more than {SEGMENT_HEADER_LEN} (the segment header), got {}",
                opts.segment_bytes
            )));
        }
        fs::create_dir_all(dir).map_err(io_err(dir, "creating the directory"))?;
        let lock = lock(dir)?;
        let mut written = 0;
        let tmp = dir.join(META_TMP);
        if let Err(e) = fs::remove_file(&tmp) {
            if e.kind() != io::ErrorKind::NotFound {
                return Err(io_err(&tmp, "removing a stale temporary file")(e));
            }
        }
        let epoch = match read_meta(dir)? {
            Some(epoch) => epoch,
            None => {
                written += write_meta(dir, new_epoch)?;
                new_epoch
            }
        };

        let found = list_segments(dir)?;
        // Segments of another epoch are leftovers of an interrupted reset (or of a
        // journal whose meta was lost): their records belong to a sequence space no
        // target will ask for again.
        let mut headers = Vec::with_capacity(found.len());
        for (first_seq, path) in found {
            let file = File::options()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_err(&path, "opening a segment"))?;
            let mut b = [0u8; SEGMENT_HEADER_LEN];
            let n = read_up_to(&file, &mut b, 0).map_err(io_err(&path, "reading"))?;
            match segment::decode_header(&b[..n]) {
                Ok(h) if h.epoch != epoch => {
                    warn!(
                        file = %path.display(),
                        "deleting a journal segment of epoch {} (the journal is at epoch {epoch})",
                        h.epoch
                    );
                    fs::remove_file(&path).map_err(io_err(&path, "deleting a stale segment"))?;
                }
                // The checksum holds, so this is no torn write: the file was renamed.
                Ok(h) if h.first_seq != first_seq => {
                    return Err(Error::Corrupt {
                        detail: format!(
                            "its header says it starts at sequence {} but its name says {first_seq}",
                            h.first_seq
                        ),
                        path,
                        dir: dir.to_owned(),
                        offset: 0,
                    });
                }
                h => headers.push((first_seq, path, file, h.map(|_| ()))),
            }
        }
        sync_dir(dir)?;

        let mut segments: Vec<Segment> = Vec::with_capacity(headers.len());
        let count = headers.len();
        for (i, (first_seq, path, file, header)) in headers.into_iter().enumerate() {
            let last = i + 1 == count;
            if let Some(prev) = segments.last() {
                if prev.next_seq != first_seq {
                    return Err(Error::Corrupt {
                        detail: format!(
                            "the segment before it ({}) ends at {}, so this one should start \
                             at {} but starts at {first_seq}",
                            prev.path.display(),
                            prev.next_seq - 1,
                            prev.next_seq
                        ),
                        path,
                        dir: dir.to_owned(),
                        offset: 0,
                    });
                }
            }
            let len = file
                .metadata()
                .map_err(io_err(&path, "reading metadata"))?
                .len();
            if let Err(detail) = header {
                if !last {
                    return Err(Error::Corrupt {
                        path,
                        dir: dir.to_owned(),
                        offset: 0,
                        detail,
                    });
                }
                // A crash while the segment was being created: it holds nothing that
                // was ever synced, so rewrite it empty.
                warn!(
                    file = %path.display(),
                    "journal segment header is damaged ({detail}); rewriting it empty ({len} bytes dropped)"
                );
                file.set_len(0).map_err(io_err(&path, "truncating"))?;
                write_header(&file, &path, epoch, first_seq)?;
                written += SEGMENT_HEADER_LEN as u64;
                segments.push(Segment {
                    path,
                    file,
                    first_seq,
                    next_seq: first_seq,
                    len: SEGMENT_HEADER_LEN as u64,
                    index: Vec::new(),
                    dirty: false,
                });
                continue;
            }
            segments.push(replay(dir, path, file, first_seq, len, last)?);
        }

        let mut journal = Journal {
            dir: dir.to_owned(),
            opts,
            epoch,
            bytes: segments.iter().map(|s| s.len).sum(),
            // No segment: new, or reset before crashing; the sequence starts over.
            next_seq: segments.last().map_or(1, |s| s.next_seq),
            segments,
            written,
            acked: 0,
            durable_seq: 0,
            dirty_since: None,
            _lock: lock,
        };
        match journal.segments.last() {
            // What was replayed may still be only in the page cache (the agent
            // crashed, the host did not): make it durable before anyone counts on it.
            Some(active) => active
                .file
                .sync_data()
                .map_err(io_err(&active.path, "fsyncing"))?,
            None => journal.create_segment(1)?,
        }
        journal.durable_seq = journal.last_seq();
        Ok(journal)
    }

    /// The sequence space the records belong to (see `wire::SetHello`).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The oldest record held; [`Journal::next_seq`] when none is.
    pub fn first_seq(&self) -> u64 {
        self.segments.first().map_or(self.next_seq, |s| s.first_seq)
    }

    /// The newest record appended (0 if none ever was in this epoch).
    pub fn last_seq(&self) -> u64 {
        self.next_seq() - 1
    }

    /// The sequence the next appended record must have.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// The newest record known to be on stable storage: send no further (see the
    /// module documentation).
    /// The disk budget, bytes.
    pub fn budget(&self) -> u64 {
        self.opts.budget_bytes
    }

    pub fn durable_seq(&self) -> u64 {
        self.durable_seq
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.first_seq() == self.next_seq()
    }

    /// Bytes the segment files take.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Bytes written to disk by this process (records, segment headers, meta), for
    /// measuring write amplification.
    pub fn written_bytes(&self) -> u64 {
        self.written
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Appends records whose sequences continue from [`Journal::last_seq`]. The batch
    /// goes in whole or not at all, except on an IO error (see [`AppendError::Io`]).
    pub fn append(&mut self, records: &[Record]) -> Result<(), AppendError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let expected = self.next_seq();
        for (i, r) in records.iter().enumerate() {
            if r.seq != expected + i as u64 {
                return Err(AppendError::Sequence {
                    expected: expected + i as u64,
                    got: r.seq,
                });
            }
        }
        let mut buf = Vec::new();
        let mut lens = Vec::with_capacity(records.len());
        for r in records {
            let len = encode_record(r, &mut buf).map_err(|e| AppendError::TooLarge {
                seq: r.seq,
                len: e.len,
            })?;
            lens.push(len as u64);
        }
        let mut needed = self.bytes_needed(&lens);
        if self.bytes + needed > self.opts.budget_bytes
            && self.acked == self.last_seq()
            && self.segments.last().is_some_and(|s| !s.is_empty())
        {
            // Everything held is acknowledged but sits in the active segment, which
            // `trim` keeps while it is small: give it back before refusing.
            self.roll()?;
            self.drop_acked_segments()?;
            needed = self.bytes_needed(&lens);
        }
        if self.bytes + needed > self.opts.budget_bytes {
            return Err(AppendError::Full {
                needed,
                used: self.bytes,
                budget: self.opts.budget_bytes,
            });
        }

        let mut seq = first.seq;
        let mut at = 0usize;
        let mut i = 0;
        while i < lens.len() {
            let limit = self.opts.segment_bytes;
            let s = self.writable(lens[i])?;
            // The run of records that fits in the segment (at least one).
            let mut end = i + 1;
            let mut run = lens[i];
            while end < lens.len() && s.len + run + lens[end] <= limit {
                run += lens[end];
                end += 1;
            }
            self.write_run(&buf[at..at + run as usize], &lens[i..end], seq)?;
            at += run as usize;
            seq += (end - i) as u64;
            i = end;
        }

        let due = match self.opts.fsync {
            FsyncPolicy::Always => true,
            FsyncPolicy::Interval(d) => self.dirty_since.is_some_and(|t| t.elapsed() >= d),
            FsyncPolicy::Never => false,
        };
        if due {
            self.sync()?;
        } else if self.opts.fsync == FsyncPolicy::Never {
            // Nothing is ever synced: what is written counts as durable (the policy is
            // for journals on tmpfs, which a host crash takes away whole).
            self.durable_seq = self.last_seq();
        }
        Ok(())
    }

    /// When the fsync policy wants [`Journal::sync`] called (`None`: not needed).
    pub fn sync_deadline(&self) -> Option<Instant> {
        match self.opts.fsync {
            FsyncPolicy::Interval(d) => self.dirty_since.map(|t| t + d),
            FsyncPolicy::Always | FsyncPolicy::Never => None,
        }
    }

    /// Makes every record appended so far durable (fdatasync), whatever the policy.
    pub fn sync(&mut self) -> Result<(), Error> {
        for s in self.segments.iter_mut().filter(|s| s.dirty) {
            s.file.sync_data().map_err(io_err(&s.path, "fsyncing"))?;
            s.dirty = false;
        }
        self.durable_seq = self.last_seq();
        self.dirty_since = None;
        Ok(())
    }

    /// Records with sequence above `after`, in order, about `max_bytes` of them on disk
    /// (at least one if any is held), read from the segment files. `after` must be
    /// between `first_seq() - 1` and `last_seq()`, else [`Error::Gap`].
    pub fn read_after(&self, after: u64, max_bytes: usize) -> Result<Vec<Record>, Error> {
        if after.saturating_add(1) < self.first_seq() || after > self.last_seq() {
            return Err(Error::Gap {
                after,
                first_seq: self.first_seq(),
                last_seq: self.last_seq(),
            });
        }
        let want = after + 1;
        if want == self.next_seq {
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        let mut size = 0usize;
        let start = self.segments.partition_point(|s| s.first_seq <= want) - 1;
        // Read windows sized to the request (plus the stride skipped after seeking), so
        // a small read does not pull in a whole segment.
        let chunk = max_bytes
            .saturating_add(segment::INDEX_STRIDE as usize)
            .clamp(64 << 10, 4 << 20);
        for s in &self.segments[start..] {
            let from = if s.first_seq < want {
                s.seek(want)
            } else {
                SEGMENT_HEADER_LEN as u64
            };
            let mut reader = Reader::new(&s.file, from, s.len, chunk);
            loop {
                match reader.next().map_err(io_err(&s.path, "reading"))? {
                    Next::Record(r, _, len) => {
                        if r.seq < want {
                            continue;
                        }
                        if !out.is_empty() && size + len > max_bytes {
                            return Ok(out);
                        }
                        size += len;
                        out.push(r);
                    }
                    Next::End => break,
                    // The segment checked out at open and only this process appends to
                    // it: it changed under us, or the disk returns something else now.
                    Next::Bad(offset, e) => {
                        return Err(Error::Corrupt {
                            path: s.path.clone(),
                            dir: self.dir.clone(),
                            offset,
                            detail: e.to_string(),
                        })
                    }
                }
            }
        }
        Ok(out)
    }

    /// Every record up to `acked` is acknowledged by every target: deletes the segments
    /// that hold nothing else. The active segment is replaced by an empty one when it is
    /// fully acknowledged and at least a quarter of `segment_bytes`; smaller, it is kept
    /// until it fills (or until the budget needs the room).
    pub fn trim(&mut self, acked: u64) -> Result<(), Error> {
        self.acked = self.acked.max(acked.min(self.last_seq()));
        if self.segments.last().is_some_and(|s| {
            !s.is_empty()
                && s.next_seq - 1 <= self.acked
                && s.len >= self.opts.segment_bytes / ROLL_ACKED_DIVISOR
        }) {
            self.roll()?;
        }
        self.drop_acked_segments()
    }

    /// Starts over in a new sequence space: every segment is deleted and the next
    /// record appended must be 1.
    pub fn reset(&mut self, epoch: u64) -> Result<(), Error> {
        self.reset_at(epoch, 1)
    }

    /// As [`Journal::reset`], with `next_seq` as the next record to append: a hybrid
    /// queue that spills again after draining continues its sequence here.
    pub fn reset_at(&mut self, epoch: u64, next_seq: u64) -> Result<(), Error> {
        let next_seq = next_seq.max(1);
        // meta first: if we crash before the segments are gone, open sees their old
        // epoch in their headers and deletes them. For the same reason a segment that
        // fails to be deleted here is only forgotten (and deleted at the next open).
        self.written += write_meta(&self.dir, epoch)?;
        self.epoch = epoch;
        self.next_seq = next_seq;
        self.bytes = 0;
        self.acked = next_seq - 1;
        self.durable_seq = next_seq - 1;
        self.dirty_since = None;
        let mut result = Ok(());
        for s in std::mem::take(&mut self.segments) {
            if let Err(e) = fs::remove_file(&s.path) {
                result = result.and(Err(io_err(&s.path, "deleting a segment")(e)));
            }
        }
        result?;
        sync_dir(&self.dir)?;
        self.create_segment(next_seq)
    }

    /// The segment a record of `record_len` bytes goes into: the active one, unless it
    /// is missing or the record would take it past `segment_bytes`.
    fn writable(&mut self, record_len: u64) -> Result<&mut Segment, Error> {
        match self.segments.last() {
            None => self.create_segment(self.next_seq)?,
            Some(s) if must_roll(s.len, record_len, self.opts.segment_bytes) => self.roll()?,
            Some(_) => {}
        }
        Ok(self.segments.last_mut().expect("just ensured"))
    }

    /// Disk bytes that appending records of these lengths takes, segment headers of
    /// the segments it starts included (mirrors `writable`).
    fn bytes_needed(&self, lens: &[u64]) -> u64 {
        let header = SEGMENT_HEADER_LEN as u64;
        let (mut len, mut needed) = match self.segments.last() {
            Some(s) => (s.len, 0),
            None => (header, header),
        };
        for &l in lens {
            if must_roll(len, l, self.opts.segment_bytes) {
                needed += header;
                len = header;
            }
            len += l;
            needed += l;
        }
        needed
    }

    /// Writes whole records to the end of the active segment (`writable` made sure
    /// there is one).
    fn write_run(&mut self, bytes: &[u8], lens: &[u64], first_seq: u64) -> Result<(), Error> {
        let Some(s) = self.segments.last_mut() else {
            return Ok(());
        };
        if let Err(e) = s.file.write_all_at(bytes, s.len) {
            // Leave no partial record behind: later appends would land after it and
            // replay would stop there. If even this fails, open cuts it.
            let _ = s.file.set_len(s.len);
            return Err(io_err(&s.path, "appending")(e));
        }
        let mut offset = s.len;
        for (i, &l) in lens.iter().enumerate() {
            s.note_record(first_seq + i as u64, offset);
            offset += l;
        }
        s.len = offset;
        s.next_seq = first_seq + lens.len() as u64;
        s.dirty = true;
        self.next_seq = s.next_seq;
        self.dirty_since.get_or_insert_with(Instant::now);
        self.bytes += bytes.len() as u64;
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Finishes the active segment (which holds records) and starts an empty one at
    /// the next sequence.
    fn roll(&mut self) -> Result<(), Error> {
        // The finished segment is made durable before any record can reach the next
        // one, so that a crash never leaves a hole between segments.
        if let Some(active) = self.segments.last_mut().filter(|s| s.dirty) {
            active
                .file
                .sync_data()
                .map_err(io_err(&active.path, "fsyncing"))?;
            active.dirty = false;
        }
        self.create_segment(self.next_seq)?;
        self.durable_seq = self.last_seq();
        self.dirty_since = None;
        Ok(())
    }

    /// Deletes the segments, except the active one, whose records are all acknowledged.
    fn drop_acked_segments(&mut self) -> Result<(), Error> {
        let n = self
            .segments
            .iter()
            .take(self.segments.len().saturating_sub(1))
            .take_while(|s| s.next_seq - 1 <= self.acked)
            .count();
        if n == 0 {
            return Ok(());
        }
        for s in self.segments.drain(..n) {
            fs::remove_file(&s.path).map_err(io_err(&s.path, "deleting a segment"))?;
            self.bytes -= s.len;
        }
        // Oldest first, and durably, so that a crash cannot bring back an older
        // segment without the newer ones (a hole that open would refuse).
        sync_dir(&self.dir)
    }

    fn create_segment(&mut self, first_seq: u64) -> Result<(), Error> {
        let path = self.dir.join(segment::file_name(first_seq));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(io_err(&path, "creating a segment"))?;
        write_header(&file, &path, self.epoch, first_seq)?;
        sync_dir(&self.dir)?;
        self.written += SEGMENT_HEADER_LEN as u64;
        self.bytes += SEGMENT_HEADER_LEN as u64;
        self.segments.push(Segment {
            path,
            file,
            first_seq,
            next_seq: first_seq,
            len: SEGMENT_HEADER_LEN as u64,
            index: Vec::new(),
            dirty: false,
        });
        Ok(())
    }
}

fn must_roll(segment_len: u64, record_len: u64, segment_bytes: u64) -> bool {
    segment_len > SEGMENT_HEADER_LEN as u64 && segment_len + record_len > segment_bytes
}

/// Reads a segment's records to find where they end and to index them; a bad tail of
/// the last segment is cut, anything else bad is an error.
fn replay(
    dir: &Path,
    path: PathBuf,
    file: File,
    first_seq: u64,
    len: u64,
    last: bool,
) -> Result<Segment, Error> {
    let corrupt = |offset, detail| Error::Corrupt {
        path: path.clone(),
        dir: dir.to_owned(),
        offset,
        detail,
    };
    let mut next_seq = first_seq;
    let mut end = SEGMENT_HEADER_LEN as u64;
    let mut index = Vec::new();
    let mut reader = Reader::new(&file, end, len, SCAN_CHUNK);
    let bad = loop {
        match reader.next().map_err(io_err(&path, "reading"))? {
            Next::Record(r, offset, n) => {
                if r.seq != next_seq {
                    // The checksum holds, so this is not a torn write: something else
                    // wrote here.
                    return Err(corrupt(
                        offset,
                        format!("record {} where {next_seq} was expected", r.seq),
                    ));
                }
                segment::note_record(&mut index, r.seq, offset);
                next_seq += 1;
                end = offset + n as u64;
            }
            Next::End => break None,
            Next::Bad(offset, e) => break Some((offset, e)),
        }
    };
    if let Some((offset, e)) = bad {
        if !last {
            return Err(corrupt(offset, e.to_string()));
        }
        warn!(
            file = %path.display(),
            offset,
            "cutting a torn or corrupt journal tail ({} bytes dropped; the last record kept is {}): {e}",
            len - offset,
            next_seq - 1
        );
        file.set_len(offset)
            .map_err(io_err(&path, "truncating a torn tail"))?;
        file.sync_data().map_err(io_err(&path, "fsyncing"))?;
    }
    Ok(Segment {
        path,
        file,
        first_seq,
        next_seq,
        len: end,
        index,
        dirty: false,
    })
}

fn io_err<'a>(path: &'a Path, action: &'static str) -> impl FnOnce(io::Error) -> Error + 'a {
    move |source| Error::Io {
        path: path.to_owned(),
        action,
        source,
    }
}

fn lock(dir: &Path) -> Result<File, Error> {
    let path = dir.join(LOCK);
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(io_err(&path, "opening the lock file"))?;
    // A process forking in another thread holds a copy of our descriptor (and so the
    // lock) for the instant until it execs; retry briefly before calling it taken.
    let deadline = Instant::now() + Duration::from_millis(500);
    loop {
        match rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => return Ok(file),
            Err(rustix::io::Errno::WOULDBLOCK) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            Err(rustix::io::Errno::WOULDBLOCK) => {
                return Err(Error::Locked {
                    dir: dir.to_owned(),
                })
            }
            Err(e) => return Err(io_err(&path, "locking")(e.into())),
        }
    }
}

/// The segment files in `dir`, ascending; other files are left alone.
fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, Error> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir).map_err(io_err(dir, "listing"))? {
        let entry = entry.map_err(io_err(dir, "listing"))?;
        if let Some(seq) = segment::parse_name(&entry.file_name()) {
            out.push((seq, entry.path()));
        }
    }
    out.sort_unstable_by_key(|&(seq, _)| seq);
    Ok(out)
}

fn write_header(file: &File, path: &Path, epoch: u64, first_seq: u64) -> Result<(), Error> {
    let h = segment::encode_header(Header { epoch, first_seq });
    file.write_all_at(&h, 0)
        .map_err(io_err(path, "writing a segment header"))?;
    file.sync_data().map_err(io_err(path, "fsyncing"))
}

/// Reads into `buf` from `offset` until it is full or the file ends; returns the count.
fn read_up_to(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read_at(&mut buf[n..], offset + n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir, "fsyncing the directory"))
}

fn meta_text(epoch: u64) -> String {
    format!("doppel-journal 1\nepoch {epoch}\n")
}

/// The stored epoch, `None` if there is no meta file.
fn read_meta(dir: &Path) -> Result<Option<u64>, Error> {
    let path = dir.join(META);
    let text = match fs::read(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path, "reading")(e)),
    };
    let bad = |detail: &str| Error::BadMeta {
        path: path.clone(),
        dir: dir.to_owned(),
        detail: detail.to_owned(),
    };
    let text = std::str::from_utf8(&text).map_err(|_| bad("meta is not text"))?;
    let mut lines = text.lines();
    if lines.next() != Some("doppel-journal 1") {
        return Err(bad("meta does not start with \"doppel-journal 1\""));
    }
    let epoch = lines
        .next()
        .and_then(|l| l.strip_prefix("epoch "))
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| bad("meta has no \"epoch <number>\" line"))?;
    if lines.next().is_some() {
        return Err(bad("meta has unexpected lines after the epoch"));
    }
    Ok(Some(epoch))
}

/// Replaces meta atomically (temp file, fsync, rename, fsync the directory); returns
/// the bytes written.
fn write_meta(dir: &Path, epoch: u64) -> Result<u64, Error> {
    let tmp = dir.join(META_TMP);
    let text = meta_text(epoch);
    let mut f = File::create(&tmp).map_err(io_err(&tmp, "creating"))?;
    f.write_all(text.as_bytes())
        .and_then(|()| f.sync_all())
        .map_err(io_err(&tmp, "writing"))?;
    let path = dir.join(META);
    fs::rename(&tmp, &path).map_err(io_err(&path, "renaming the new meta into place"))?;
    sync_dir(dir)?;
    Ok(text.len() as u64)
}
