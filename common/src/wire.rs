//! The replication protocol between `doppel-agent` and `doppel-receiver`.
//!
//! A QUIC bidirectional stream carries length-prefixed frames (`u32` little-endian length,
//! then a postcard-encoded [`Frame`]). The agent opens with [`Frame::Hello`]; the receiver
//! answers [`Frame::Welcome`] with the last sequence number it applied durably for each
//! set, and the agent resumes right after it. Records carry a sequence number per
//! (source, set) so that a record sent twice changes nothing.
//!
//! Nothing here does IO: [`encode_frame`] and [`FrameDecoder`] turn frames into bytes and
//! back, and every decoding error is a value, never a panic.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// 4: `Op::Barrier`; 5: `Welcome::empty`; 6: `Welcome::prior`.
pub const PROTOCOL_VERSION: u32 = 6;
/// Largest frame either side accepts. Bigger lengths end the stream with an error.
pub const MAX_FRAME: usize = 8 << 20;
/// Largest path (bytes) accepted on the wire, as Linux's PATH_MAX.
pub const MAX_PATH: usize = 4096;
/// Largest data payload of one [`Op::Write`].
pub const MAX_WRITE: usize = 1 << 20;

/// A path relative to a replica root: `/`-separated, no empty, `.` or `..` components,
/// no NUL, not absolute. Filenames on Linux are bytes, so this is bytes too.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RelPath(#[serde(with = "serde_bytes")] pub Vec<u8>);

impl std::fmt::Debug for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", String::from_utf8_lossy(&self.0))
    }
}

impl std::fmt::Display for RelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&String::from_utf8_lossy(&self.0))
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("empty path")]
    Empty,
    #[error("path is {0} bytes, longer than {MAX_PATH}")]
    TooLong(usize),
    #[error("absolute path")]
    Absolute,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path has an empty, '.' or '..' component")]
    BadComponent,
}

impl RelPath {
    /// Checks the invariants above. The receiver calls this on every path it is sent,
    /// before it touches the filesystem (and then still resolves beneath the root).
    pub fn validate(&self) -> Result<(), PathError> {
        let b = &self.0;
        if b.is_empty() {
            return Err(PathError::Empty);
        }
        if b.len() > MAX_PATH {
            return Err(PathError::TooLong(b.len()));
        }
        if b[0] == b'/' {
            return Err(PathError::Absolute);
        }
        if b.contains(&0) {
            return Err(PathError::Nul);
        }
        if b.split(|&c| c == b'/')
            .any(|c| c.is_empty() || c == b"." || c == b"..")
        {
            return Err(PathError::BadComponent);
        }
        Ok(())
    }

    /// A valid single path component (a name inside a directory).
    pub fn validate_name(&self) -> Result<(), PathError> {
        self.validate()?;
        if self.0.contains(&b'/') {
            return Err(PathError::BadComponent);
        }
        Ok(())
    }

    pub fn from_os(p: &std::path::Path) -> Self {
        use std::os::unix::ffi::OsStrExt;
        RelPath(p.as_os_str().as_bytes().to_vec())
    }

    pub fn as_path(&self) -> &std::path::Path {
        use std::os::unix::ffi::OsStrExt;
        std::path::Path::new(std::ffi::OsStr::from_bytes(&self.0))
    }
}

/// One change to apply beneath a replica root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Op {
    /// pwrite `data` at `offset` (the file is created if missing).
    Write {
        path: RelPath,
        offset: u64,
        #[serde(with = "shared")]
        data: Bytes,
    },
    /// Set the file's size (created if missing).
    Truncate { path: RelPath, size: u64 },
    /// Make sure a regular file exists (`O_CREAT`, not `O_EXCL`).
    CreateFile { path: RelPath, mode: u32 },
    /// Make sure a directory exists.
    Mkdir { path: RelPath, mode: u32 },
    /// Remove a non-directory (missing is fine: the record may be a resend).
    Remove { path: RelPath },
    /// Remove a directory and whatever it still holds on the replica.
    Rmdir { path: RelPath },
    /// rename(2) `from` to `to`, with renameat2 flags.
    Rename {
        from: RelPath,
        to: RelPath,
        flags: u32,
    },
    /// Delete every entry of directory `dir` (`None`: the replica root) whose name is
    /// not in `keep`, with whatever is beneath it. Sent after the agent has scanned the
    /// directory, so that what the source lost while no agent was watching (deletions,
    /// renames, unacknowledged records of a killed agent) does not linger on the replica.
    Prune {
        dir: Option<RelPath>,
        /// Single path components (see [`RelPath::validate_name`]).
        keep: Vec<RelPath>,
    },
    // New variants go last: postcard encodes the variant index, and the journal keeps
    // records across upgrades.
    /// Set the entry's permission bits, owner and times (never following a symlink at
    /// the final component; a symlink's mode is left alone, Linux has no lchmod).
    SetAttr { path: RelPath, attr: Attr },
    /// Make the entry's extended attributes exactly `xattrs` (POSIX ACLs included, as
    /// `system.posix_acl_access` / `system.posix_acl_default`).
    SetXattrs { path: RelPath, xattrs: Vec<Xattr> },
    /// Make `to` another name of the file at `from` (a hard link), replacing what `to`
    /// was.
    Link { from: RelPath, to: RelPath },
    /// Make `path` a symlink holding `target` (never resolved by the receiver), replacing
    /// what `path` was.
    Symlink {
        path: RelPath,
        #[serde(with = "serde_bytes")]
        target: Vec<u8>,
    },
    /// Make `path` a FIFO or socket node (`mode` includes the file type bits). Device
    /// nodes are refused by the receiver.
    Mknod { path: RelPath, mode: u32, rdev: u64 },
    /// fallocate(2) on the file with the source's `mode` flags.
    Fallocate {
        path: RelPath,
        mode: u32,
        offset: u64,
        len: u64,
    },
    /// Compare blocks of the replica's file with the source's (the mirror and verify,
    /// see [`sums`]): nothing changes on the replica; the receiver answers a
    /// [`Frame::Need`] listing the ranges that differ, if any do.
    ///
    /// `sums[i]` is [`sums::block_sum`] of the source's bytes at
    /// `offset + i * block`, the last block clipped at `size` (the source's size when it
    /// was read). A file larger than [`sums::MAX_SUMS`] blocks takes several ops. A Sum
    /// without blocks compares the sizes only (an empty file, or a quick check).
    Sum {
        path: RelPath,
        /// Who asked: 0 for the mirror (the agent sends what differs), else a verify job.
        job: u64,
        /// The source's file, opaque to the receiver and echoed in the answer.
        file: [u64; 2],
        size: u64,
        offset: u64,
        block: u32,
        sums: Vec<u64>,
        /// With `Some`, mode, owner and mtime are compared too (verify).
        attr: Option<Attr>,
    },
    /// As [`Op::Prune`], but what the source does not have is moved, not deleted, to
    /// `<replica root>/`[`ORPHANS_DIR`]`/<batch>/<dir>/` (`batch`: the mirror's start,
    /// Unix seconds), where an operator can look at it and remove it.
    PruneAside {
        dir: Option<RelPath>,
        keep: Vec<RelPath>,
        batch: u64,
    },
    /// Verify: which entries of the replica's directory `dir` the source does not have
    /// there (it has `keep`, sorted). Nothing changes on the replica; the receiver
    /// answers each such entry with a [`Frame::Need`] marked `listing` and `extra`, and
    /// a replica without a directory at `dir` with one marked `listing` and `missing`,
    /// before the Ack that covers this record. [`ORPHANS_DIR`] at the root is never
    /// reported.
    List {
        dir: Option<RelPath>,
        keep: Vec<RelPath>,
        /// The verify job asking (never the mirror's).
        job: u64,
    },
    /// Nothing changes: the records before it are applied before the records after it
    /// (the receiver applies data ops on different files in parallel otherwise). Sent
    /// where the source fsynced a file, so that a log record reaches the replica before
    /// the data page written after it.
    Barrier,
}

/// Where [`Op::PruneAside`] puts orphans, at the root of each set's replica. Neither
/// prune ever touches it, and agents do not replicate a source entry of that name.
pub const ORPHANS_DIR: &str = ".doppel-orphans";

/// Seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The attributes [`Op::SetAttr`] carries: what `stat(2)` shows and `chmod`, `chown` and
/// `utimensat` can set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Attr {
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timestamp,
    pub mtime: Timestamp,
}

/// `fallocate(2)` mode bits an [`Op::Fallocate`] may carry (Linux values). Modes that
/// shift a file's contents (collapse, insert range) are sent as bytes instead.
pub mod falloc {
    pub const KEEP_SIZE: u32 = 0x01;
    pub const PUNCH_HOLE: u32 = 0x02;
    pub const ZERO_RANGE: u32 = 0x10;
    /// Unsharing copy-on-write extents: changes no byte, never sent.
    pub const UNSHARE_RANGE: u32 = 0x40;
    /// Every mode [`super::Op::Fallocate`] may have.
    pub const REPLICATED: u32 = KEEP_SIZE | PUNCH_HOLE | ZERO_RANGE;
}

/// Largest extended attribute name (Linux's XATTR_NAME_MAX) and value (XATTR_SIZE_MAX).
pub const MAX_XATTR_NAME: usize = 255;
pub const MAX_XATTR_VALUE: usize = 64 << 10;
/// Largest symlink target accepted (PATH_MAX).
pub const MAX_SYMLINK: usize = 4096;

/// One extended attribute.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Xattr {
    #[serde(with = "serde_bytes")]
    pub name: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
}

impl Op {
    /// Every path the op touches, for validation.
    /// The paths the op touches (not a Prune's `keep` names, which are components).
    pub fn paths(&self) -> impl Iterator<Item = &RelPath> {
        let pair = match self {
            Op::Write { path, .. }
            | Op::Truncate { path, .. }
            | Op::CreateFile { path, .. }
            | Op::Mkdir { path, .. }
            | Op::Remove { path }
            | Op::Rmdir { path }
            | Op::SetAttr { path, .. }
            | Op::SetXattrs { path, .. }
            | Op::Symlink { path, .. }
            | Op::Mknod { path, .. }
            | Op::Fallocate { path, .. }
            | Op::Sum { path, .. } => [Some(path), None],
            Op::Rename { from, to, .. } | Op::Link { from, to } => [Some(from), Some(to)],
            Op::Prune { dir, .. } | Op::PruneAside { dir, .. } | Op::List { dir, .. } => {
                [dir.as_ref(), None]
            }
            Op::Barrier => [None, None],
        };
        pair.into_iter().flatten()
    }

    /// Bytes of file data carried (for accounting).
    pub fn data_len(&self) -> usize {
        match self {
            Op::Write { data, .. } => data.len(),
            _ => 0,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    /// Sequence number within (source, set), starting at 1, without gaps.
    pub seq: u64,
    pub op: Op,
}

/// One replication set announced in [`Frame::Hello`].
///
/// `epoch` names the agent's sequence space for the set: sequence numbers are only
/// comparable within one epoch. An agent that lost its queue (restarted without a
/// journal) starts a new epoch and re-mirrors the set, so the receiver must not skip
/// its records because an older epoch had reached a higher sequence.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SetHello {
    pub name: String,
    pub epoch: u64,
}

/// Where a set's replica stood in the sequence space it followed before a new epoch
/// (see [`Frame::Welcome`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PriorMark {
    pub set: String,
    pub epoch: u64,
    pub applied: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Frame {
    /// Agent -> receiver, first frame: who is talking and which sets it replicates.
    Hello {
        version: u32,
        source: String,
        sets: Vec<SetHello>,
    },
    /// Receiver -> agent: the last sequence applied durably per set (0 = none) *in the
    /// epoch the agent announced*. A set whose epoch differs from the one the receiver
    /// stored starts over at 0 (the receiver stores the new epoch).
    Welcome {
        version: u32,
        applied: Vec<(String, u64)>,
        /// Sets whose announced epoch ended with a failover and failback: the replica was
        /// the primary copy meanwhile and the source got it back, so what the agent still
        /// holds of that sequence space is stale. It must drop it, start a new epoch and
        /// compare the whole set again.
        resync: Vec<String>,
        /// Sets whose replica holds nothing yet (a first mirror): rather than compare a
        /// small file there, the agent may send its bytes at once.
        empty: Vec<String>,
        /// Sets that started a new epoch with this Hello: the sequence space the replica
        /// followed until then, and how far it got. An agent that restarted knows from
        /// it whether the replica still holds what it last saw it acknowledge (its
        /// restart then compares only the files that changed meanwhile). Never given for
        /// a replica that holds nothing or was failed over to.
        prior: Vec<PriorMark>,
    },
    /// Agent -> receiver: records of one set, in sequence order.
    Batch { set: String, records: Vec<Record> },
    /// Receiver -> agent: every record of `set` up to `seq` is applied.
    Ack { set: String, seq: u64 },
    /// Either side: the session ends, and why.
    Refused { reason: String },
    /// Any frame, zstd-compressed: `data` is zstd of the postcard encoding (no length
    /// prefix) of one inner frame of exactly `raw_len` bytes. [`FrameDecoder`] unwraps it,
    /// so it never comes out of the decoder; [`encode_frame_compressed`] makes it.
    /// Last in the enum so that the other variants keep their encodings.
    Compressed {
        raw_len: u32,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// Receiver -> agent, the answer to an [`Op::Sum`] that found differences: sent
    /// before the Ack that covers the Sum's record, so an Ack without a Need before it
    /// means "identical". A Sum of [`sums::LAYOUT_JOB`] is always answered, and its
    /// `ranges` are where the replica has no data (see there).
    Need {
        set: String,
        job: u64,
        file: [u64; 2],
        path: RelPath,
        /// Differing byte ranges `(offset, len)`, in order, not overlapping. A size
        /// difference shows as the range between the two sizes.
        ranges: Vec<(u64, u64)>,
        /// For a mirror's comparison, a finer look at what differs: `fine[i]` holds the
        /// checksums of `ranges[i]` on the replica in blocks of `fine_block` bytes (the
        /// last one clipped at the range's end), so that the agent sends only the fine
        /// blocks that differ; empty when the replica has no data there (send it all).
        /// Either empty or as long as `ranges`.
        fine_block: u32,
        fine: Vec<Vec<u64>>,
        /// The replica has no regular file at `path`.
        missing: bool,
        /// Mode, owner or mtime differ (only asked for by a verify).
        attr: bool,
        /// The answer to an [`Op::List`] (about a directory's entries, not a file's
        /// contents; `file`, `ranges` and `fine` are empty).
        listing: bool,
        /// With `listing`: the replica has an entry at `path` that the source does not
        /// have.
        extra: bool,
    },
}

/// Serde for [`Op::Write`]'s data, a [`Bytes`] so that a sender hands queued data to the
/// transport without copying it ([`encode_batch_pieces`]). Encoded as a byte string (as
/// `serde_bytes` encodes a `Vec<u8>`, so the wire format is the same). Decoded as a view
/// of the frame's buffer inside [`shared::decode_in`] (what [`FrameDecoder`] does), and
/// as a copy otherwise (a journal's records).
///
/// Views keep their frame's buffer alive until the last one is dropped; a receiver frees
/// them on another thread, after applying. That is cheap only when the allocator keeps
/// freed memory for reuse (see the receiver's `keep_freed_memory`): with glibc's
/// defaults it was slower than copying.
pub mod shared {
    use bytes::Bytes;
    use serde::de::{Error, SeqAccess, Visitor};
    use std::cell::RefCell;

    thread_local! {
        /// The buffer the frame being decoded on this thread is in, if any.
        static FRAME: RefCell<Option<Bytes>> = const { RefCell::new(None) };
    }

    /// Runs `decode` (a postcard decode of a slice of `frame`) so that the byte strings
    /// it borrows from `frame` come out as views of it.
    pub fn decode_in<R>(frame: &Bytes, decode: impl FnOnce() -> R) -> R {
        struct Reset(Option<Bytes>);
        impl Drop for Reset {
            fn drop(&mut self) {
                FRAME.with(|f| *f.borrow_mut() = self.0.take());
            }
        }
        let _reset = Reset(FRAME.with(|f| f.borrow_mut().replace(frame.clone())));
        decode()
    }

    pub fn serialize<S: serde::Serializer>(data: &Bytes, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(data)
    }

    pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Bytes, D::Error> {
        d.deserialize_bytes(Data)
    }

    struct Data;

    impl<'de> Visitor<'de> for Data {
        type Value = Bytes;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a byte string")
        }

        fn visit_borrowed_bytes<E: Error>(self, v: &'de [u8]) -> Result<Bytes, E> {
            Ok(FRAME.with(|f| match &*f.borrow() {
                Some(frame) if within(frame, v) => frame.slice_ref(v),
                _ => Bytes::copy_from_slice(v),
            }))
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Bytes, E> {
            Ok(Bytes::copy_from_slice(v))
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Bytes, E> {
            Ok(Bytes::from(v))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Bytes, A::Error> {
            let mut v = Vec::with_capacity(seq.size_hint().unwrap_or(0).min(1 << 16));
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(Bytes::from(v))
        }
    }

    /// Whether `part` lies inside `whole`'s memory (`Bytes::slice_ref` panics otherwise).
    fn within(whole: &[u8], part: &[u8]) -> bool {
        let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
        p >= w && p + part.len() <= w + whole.len()
    }
}

/// Block checksums, as [`Op::Sum`] carries them.
pub mod sums {
    /// Most blocks one [`super::Op::Sum`] may carry (64 KiB of checksums).
    pub const MAX_SUMS: usize = 8192;
    /// Block sizes a Sum may use: powers of two in this range.
    pub const MIN_BLOCK: u32 = 4 << 10;
    pub const MAX_BLOCK: u32 = 16 << 20;
    pub const DEFAULT_BLOCK: u32 = 64 << 10;
    /// Block size of a `Need`'s finer checksums: a 100-byte change costs about 1 KiB on
    /// the wire instead of a whole block, for 8 bytes of checksum per KiB that differs.
    pub const FINE_BLOCK: u32 = 1 << 10;
    /// The job of the mirror's quick check: a Sum without blocks, with the attributes,
    /// so that only the size, mode, owner and mtime are compared; a file found different
    /// is then compared block by block (see the agent's `mirror_quick_check`).
    pub const QUICK_JOB: u64 = u64::MAX;
    /// The job of the mirror's first look at a file: a Sum without blocks that asks
    /// where the replica has no data at all (a hole, or past its end), in whole blocks of
    /// the Sum's size. The target always answers it; those ranges are then sent without
    /// any checksum (nothing there could match), and only the rest is compared block by
    /// block. A mirror to an empty target thus reads each source byte once, not twice.
    pub const LAYOUT_JOB: u64 = u64::MAX - 1;
    /// Whether `job` belongs to the mirror (its answers are acted on), not to a verify.
    pub fn is_mirror_job(job: u64) -> bool {
        job == 0 || job == QUICK_JOB || job == LAYOUT_JOB
    }

    /// The checksum of one block: XXH3-64 (seed 0). It finds accidental differences
    /// (stale or corrupted replicas), not adversarial ones: both ends are authenticated.
    /// twox-hash picks AVX2 at run time where the CPU has it: twice the speed of the
    /// SSE2 code a portable build gets otherwise, on every byte a mirror compares.
    pub fn block_sum(data: &[u8]) -> u64 {
        twox_hash::XxHash3_64::oneshot(data)
    }

    /// [`block_sum`] of `len` zero bytes (a hole), without a buffer of zeros per call.
    pub fn zero_sum(len: usize) -> u64 {
        use std::hash::Hasher;
        let mut h = twox_hash::XxHash3_64::new();
        let zeros = [0u8; 4096];
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len());
            h.write(&zeros[..n]);
            left -= n;
        }
        h.finish()
    }

    /// Checks a Sum's geometry before anything is read for it.
    pub fn check(size: u64, offset: u64, block: u32, count: usize) -> Result<(), String> {
        if !block.is_power_of_two() || !(MIN_BLOCK..=MAX_BLOCK).contains(&block) {
            return Err(format!(
                "block size {block} is not a power of two between {MIN_BLOCK} and {MAX_BLOCK}"
            ));
        }
        if count > MAX_SUMS {
            return Err(format!("{count} checksums in one op, more than {MAX_SUMS}"));
        }
        if !offset.is_multiple_of(block as u64) {
            return Err(format!(
                "offset {offset} is not a multiple of the block size"
            ));
        }
        let end = offset.saturating_add(count as u64 * block as u64);
        if offset > size || (count > 0 && end - (block as u64) >= size) {
            return Err(format!(
                "{count} blocks at {offset} do not fit a file of {size} bytes"
            ));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Appends the postcard encoding of `value` to `out`.
///
/// postcard's own `to_extend` pushes byte strings one byte at a time; this copies them
/// whole, which is most of the cost of encoding a batch of file data.
pub fn encode_into<T: Serialize + ?Sized>(value: &T, out: &mut Vec<u8>) {
    struct Append<'a>(&'a mut Vec<u8>);
    impl postcard::ser_flavors::Flavor for Append<'_> {
        type Output = ();
        fn try_push(&mut self, b: u8) -> postcard::Result<()> {
            self.0.push(b);
            Ok(())
        }
        fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
            self.0.extend_from_slice(b);
            Ok(())
        }
        fn finalize(self) -> postcard::Result<()> {
            Ok(())
        }
    }
    // Writing into a Vec cannot fail; the size is bounded by what we put in it.
    postcard::serialize_with_flavor(value, Append(out)).expect("postcard encoding into a Vec")
}

/// Encodes a frame with its length prefix.
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    encode_into(frame, &mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Encodes a frame with its length prefix, as [`Frame::Compressed`] when that pays off.
///
/// Only [`Frame::Batch`] is considered (the other frames are small). A sample is
/// compressed first: unless it shrinks by at least 10 %, the frame goes out plain. Else
/// the whole frame is compressed, and still sent plain if that is not smaller.
/// `level` is zstd's (1 fast ... 19 small); 0 or less means no compression.
pub fn encode_frame_compressed(frame: &Frame, level: i32) -> Vec<u8> {
    if level <= 0 || !matches!(frame, Frame::Batch { .. }) {
        return encode_frame(frame);
    }
    compress_frame(encode_frame(frame), level)
}

/// `Frame::Batch { set, records }` from borrowed records, for encoding without cloning
/// every record's data first.
struct BatchRef<'a> {
    set: &'a str,
    records: &'a [&'a Record],
}

impl Serialize for BatchRef<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStructVariant;
        // Frame::Batch is the enum's third variant.
        let mut v = s.serialize_struct_variant("Frame", 2, "Batch", 2)?;
        v.serialize_field("set", self.set)?;
        v.serialize_field("records", self.records)?;
        v.end()
    }
}

/// `Frame::Batch { set, records }` from borrowed records, encoded with its length prefix
/// exactly as [`encode_frame`] would (a test pins it): a sender encodes straight from its
/// queue instead of cloning every record's data first.
pub fn encode_batch(set: &str, records: &[&Record]) -> Vec<u8> {
    // Sized for the data up front: growing by doubling would copy a megabyte batch's
    // data once more on the way.
    let data: usize = records.iter().map(|r| r.op.data_len()).sum();
    let mut out = Vec::with_capacity(4 + set.len() + data + records.len() * 64);
    out.extend_from_slice(&[0; 4]);
    encode_into(&BatchRef { set, records }, &mut out);
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Writes at least this large are not copied into an encoded batch's pieces.
const SHARED_PIECE: usize = 4096;

/// [`encode_batch`] as pieces to send one after the other, whose concatenation is exactly
/// its bytes (a test pins it): the data of large writes is not copied into the frame but
/// goes out as views of the queued records' own buffers.
pub fn encode_batch_pieces(set: &str, records: &[&Record]) -> Vec<Bytes> {
    struct Pieces {
        done: Vec<Bytes>,
        head: Vec<u8>,
        /// The large writes' data, in the order the encoder meets it.
        shared: std::collections::VecDeque<Bytes>,
    }
    struct Flavor<'a>(&'a mut Pieces);
    impl postcard::ser_flavors::Flavor for Flavor<'_> {
        type Output = ();
        fn try_push(&mut self, b: u8) -> postcard::Result<()> {
            self.0.head.push(b);
            Ok(())
        }
        fn try_extend(&mut self, b: &[u8]) -> postcard::Result<()> {
            let p = &mut *self.0;
            // The very bytes of the next large write (same memory, same length): share it.
            match p.shared.front() {
                Some(d) if d.as_ptr() == b.as_ptr() && d.len() == b.len() => {
                    let d = p.shared.pop_front().expect("front exists");
                    let head = std::mem::take(&mut p.head);
                    p.done.push(Bytes::from(head));
                    p.done.push(d);
                }
                _ => p.head.extend_from_slice(b),
            }
            Ok(())
        }
        fn finalize(self) -> postcard::Result<()> {
            Ok(())
        }
    }
    let mut p = Pieces {
        done: Vec::new(),
        head: vec![0; 4],
        shared: records
            .iter()
            .filter_map(|r| match &r.op {
                Op::Write { data, .. } if data.len() >= SHARED_PIECE => Some(data.clone()),
                _ => None,
            })
            .collect(),
    };
    postcard::serialize_with_flavor(&BatchRef { set, records }, Flavor(&mut p))
        .expect("postcard encoding into memory");
    let tail = std::mem::take(&mut p.head);
    p.done.push(Bytes::from(tail));
    let len = (p.done.iter().map(|b| b.len()).sum::<usize>() - 4) as u32;
    // The length prefix goes into the first piece, which is never a shared one.
    let mut first = Vec::from(std::mem::take(&mut p.done[0]));
    first[..4].copy_from_slice(&len.to_le_bytes());
    p.done[0] = Bytes::from(first);
    p.done.retain(|b| !b.is_empty());
    p.done
}

/// How much of an encoded frame [`compress_frame`] compresses first to decide whether
/// compressing all of it is worth the CPU (already compressed or encrypted data does not
/// shrink, and zstd on it is pure cost).
pub const COMPRESS_SAMPLE: usize = 16 << 10;

/// Whether `sample` (a frame's first [`COMPRESS_SAMPLE`] bytes after its length prefix)
/// shrinks by 10 % or more at zstd `level`: the test [`compress_frame`] makes before
/// compressing a whole frame.
pub fn sample_compresses(sample: &[u8], level: i32) -> bool {
    // Shrinks by less than 10 %: compressed.len() > 0.9 * sample.len().
    matches!(zstd_compress(sample, level), Ok(c) if c.len() * 10 <= sample.len() * 9)
}

/// A Batch frame as [`encode_frame`] or [`encode_batch`] made it, as
/// [`Frame::Compressed`] when that pays off (see [`encode_frame_compressed`]); `level`
/// 0 or less leaves it as it is.
pub fn compress_frame(plain: Vec<u8>, level: i32) -> Vec<u8> {
    if level <= 0 {
        return plain;
    }
    let raw = &plain[4..];
    // A frame the peer refuses anyway goes out as it is: its error is then the clearer one.
    if raw.len() > MAX_FRAME {
        return plain;
    }
    if !sample_compresses(&raw[..raw.len().min(COMPRESS_SAMPLE)], level) {
        return plain;
    }
    let data = match zstd_compress(raw, level) {
        Ok(d) if d.len() < raw.len() => d,
        _ => return plain,
    };
    let packed = encode_frame(&Frame::Compressed {
        raw_len: raw.len() as u32,
        data,
    });
    if packed.len() < plain.len() {
        packed
    } else {
        plain
    }
}

thread_local! {
    /// One zstd context per thread and level, kept: making one per frame cost more
    /// than a tenth of the compression itself (allocating and zeroing its tables).
    static COMPRESSOR: std::cell::RefCell<Option<(i32, zstd::bulk::Compressor<'static>)>> =
        const { std::cell::RefCell::new(None) };
    static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

fn zstd_compress(data: &[u8], level: i32) -> std::io::Result<Vec<u8>> {
    COMPRESSOR.with(|c| {
        let mut c = c.borrow_mut();
        let c = match &mut *c {
            Some((l, c)) if *l == level => c,
            slot => &mut slot.insert((level, zstd::bulk::Compressor::new(level)?)).1,
        };
        c.compress(data)
    })
}

/// As `zstd::bulk::decompress`: fails rather than produce more than `capacity` bytes.
fn zstd_decompress(data: &[u8], capacity: usize) -> std::io::Result<Vec<u8>> {
    DECOMPRESSOR.with(|d| {
        let mut d = d.borrow_mut();
        let d = match &mut *d {
            Some(d) => d,
            slot => slot.insert(zstd::bulk::Decompressor::new()?),
        };
        d.decompress(data, capacity)
    })
}

/// The frame inside a [`Frame::Compressed`]. Untrusted input: the declared size is
/// bounded before anything is allocated, decompression cannot write past it, and a
/// compressed frame inside another is refused (no recursion, no amplification chains).
fn decompress_frame(raw_len: u32, data: &[u8]) -> Result<Frame, WireError> {
    let raw_len = raw_len as usize;
    if raw_len > MAX_FRAME {
        return Err(WireError::TooLarge(raw_len));
    }
    // bulk::decompress fails rather than grow past `raw_len`, so a bomb costs at most
    // MAX_FRAME bytes of memory.
    let raw = zstd_decompress(data, raw_len)
        .map_err(|e| WireError::Malformed(format!("compressed frame: {e}")))?;
    if raw.len() != raw_len {
        return Err(WireError::Malformed(format!(
            "compressed frame holds {} bytes, not the {raw_len} it declares",
            raw.len()
        )));
    }
    let raw = Bytes::from(raw);
    let (frame, rest): (Frame, _) = shared::decode_in(&raw, || postcard::take_from_bytes(&raw))
        .map_err(|e| WireError::Malformed(format!("compressed frame: {e}")))?;
    if !rest.is_empty() {
        return Err(WireError::Malformed(format!(
            "compressed frame has {} bytes after its inner frame",
            rest.len()
        )));
    }
    if matches!(frame, Frame::Compressed { .. }) {
        return Err(WireError::Malformed(
            "compressed frame inside a compressed frame".into(),
        ));
    }
    Ok(frame)
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
///
/// Each frame is gathered into a buffer of its own, allocated once its length prefix is
/// known, and decoded from there: the data of its writes comes out as views of that
/// buffer ([`shared::decode_in`]) instead of being copied a second time.
#[derive(Default)]
pub struct FrameDecoder {
    /// The frame being gathered: its length prefix, then as much of its body as arrived.
    cur: Vec<u8>,
    /// Complete frames (bodies), oldest first.
    ready: std::collections::VecDeque<Bytes>,
    /// A length prefix over [`MAX_FRAME`] was read: the stream cannot be resynchronised.
    too_large: Option<usize>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, mut bytes: &[u8]) {
        while !bytes.is_empty() && self.too_large.is_none() {
            if self.cur.len() < 4 {
                let take = (4 - self.cur.len()).min(bytes.len());
                self.cur.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.cur.len() == 4 {
                    let len = self.body_len();
                    if len > MAX_FRAME {
                        self.too_large = Some(len);
                        return;
                    }
                    self.cur.reserve_exact(len);
                }
            }
            let missing = 4 + self.body_len() - self.cur.len();
            let take = missing.min(bytes.len());
            self.cur.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            if self.cur.len() >= 4 && self.cur.len() == 4 + self.body_len() {
                let frame = Bytes::from(std::mem::take(&mut self.cur)).slice(4..);
                self.ready.push_back(frame);
            }
        }
    }

    /// The body length the gathered prefix announces (0 until it is complete).
    fn body_len(&self) -> usize {
        match self.cur[..] {
            [a, b, c, d, ..] => u32::from_le_bytes([a, b, c, d]) as usize,
            _ => 0,
        }
    }

    /// Bytes received but not yet decoded into a frame.
    pub fn buffered(&self) -> usize {
        self.cur.len() + self.ready.iter().map(|f| 4 + f.len()).sum::<usize>()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed. A
    /// [`Frame::Compressed`] is unwrapped: what comes out is its inner frame.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        let Some(body) = self.ready.pop_front() else {
            return match self.too_large {
                Some(len) => Err(WireError::TooLarge(len)),
                None => Ok(None),
            };
        };
        let frame: Frame = shared::decode_in(&body, || postcard::from_bytes(&body))
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        match frame {
            Frame::Compressed { raw_len, data } => decompress_frame(raw_len, &data).map(Some),
            frame => Ok(Some(frame)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The block checksum is part of the protocol: both ends must compute XXH3-64 with
    /// seed 0, whatever the implementation. Reference values from the xxHash algorithm.
    #[test]
    fn block_sums_are_xxh3_64() {
        use sums::{block_sum, zero_sum};
        let pattern: Vec<u8> = (0..65536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
            .collect();
        assert_eq!(block_sum(b""), 0x2d06800538d394c2);
        assert_eq!(block_sum(b"abc"), 0x78af5f94892f3950);
        assert_eq!(block_sum(&pattern[..1000]), 0xa067b58e6ea5d2f2);
        assert_eq!(block_sum(&pattern), 0x32152aa15c5ff65a);
        assert_eq!(block_sum(&[0; 65536]), 0x33b202d302b65caa);
        assert_eq!(zero_sum(65536), 0x33b202d302b65caa);
        assert_eq!(zero_sum(1000), block_sum(&[0; 1000]));
    }

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    #[test]
    fn paths_are_validated() {
        assert!(p("a/b/c").validate().is_ok());
        assert!(p("a..b/.c").validate().is_ok());
        assert_eq!(p("").validate(), Err(PathError::Empty));
        assert_eq!(p("/etc/passwd").validate(), Err(PathError::Absolute));
        assert_eq!(p("a/../../x").validate(), Err(PathError::BadComponent));
        assert_eq!(p("..").validate(), Err(PathError::BadComponent));
        assert_eq!(p("a//b").validate(), Err(PathError::BadComponent));
        assert_eq!(p("a/./b").validate(), Err(PathError::BadComponent));
        assert_eq!(p("a/").validate(), Err(PathError::BadComponent));
        assert_eq!(RelPath(b"a\0b".to_vec()).validate(), Err(PathError::Nul));
        assert!(matches!(
            RelPath(vec![b'a'; MAX_PATH + 1]).validate(),
            Err(PathError::TooLong(_))
        ));
    }

    #[test]
    fn frames_round_trip_in_pieces() {
        let frames = vec![
            Frame::Hello {
                version: 1,
                source: "db1".into(),
                sets: vec![SetHello {
                    name: "data".into(),
                    epoch: 7,
                }],
            },
            Frame::Batch {
                set: "data".into(),
                records: vec![
                    Record {
                        seq: 1,
                        op: Op::Write {
                            path: p("f"),
                            offset: 7,
                            data: vec![1, 2, 3].into(),
                        },
                    },
                    Record {
                        seq: 2,
                        op: Op::Rename {
                            from: p("f"),
                            to: p("g"),
                            flags: 0,
                        },
                    },
                ],
            },
            Frame::Ack {
                set: "data".into(),
                seq: 2,
            },
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(encode_frame).collect();
        let (out, left) = decode_in_pieces(&bytes, 3);
        assert_eq!(out, frames);
        assert_eq!(left, 0);
    }

    /// `bytes` fed to a decoder `piece` bytes at a time: the frames taken out after each
    /// piece, and the bytes left over.
    fn decode_in_pieces(bytes: &[u8], piece: usize) -> (Vec<Frame>, usize) {
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(piece) {
            dec.push(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        (out, dec.buffered())
    }

    #[test]
    fn large_writes_round_trip_in_packet_sized_pieces() {
        let data: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
        let write = |seq: u64, data: &[u8]| Record {
            seq,
            op: Op::Write {
                path: p("f"),
                offset: seq,
                data: Bytes::copy_from_slice(data),
            },
        };
        let frames = [
            Frame::Batch {
                set: "data".into(),
                records: vec![write(1, &data), write(2, &data[..5000])],
            },
            batch_of(data[..1000].to_vec()),
        ];
        let bytes: Vec<u8> = frames.iter().flat_map(encode_frame).collect();
        // In packet-sized pieces, the second frame starting inside a piece of the first.
        let (out, _) = decode_in_pieces(&bytes, 1200);
        assert_eq!(out, frames);
        // The two writes of the first frame are views of one buffer, at the distance
        // their data has in the encoded frame: decoding did not copy them.
        let Frame::Batch { records, .. } = &out[0] else {
            unreachable!()
        };
        let at = |r: &Record| match &r.op {
            Op::Write { data, .. } => data.as_ptr() as usize,
            _ => unreachable!(),
        };
        let find = |from: usize, d: &[u8]| {
            from + bytes[from..]
                .windows(d.len())
                .position(|w| w == d)
                .expect("the data is in the encoded frame")
        };
        let first = find(0, &data);
        let second = find(first + data.len(), &data[..5000]);
        assert_eq!(at(&records[1]) - at(&records[0]), second - first);
        // Decoded from a plain slice (a journal), the same.
        let plain: Frame = postcard::from_bytes(&bytes[4..]).unwrap();
        assert_eq!(plain, frames[0]);
    }

    #[test]
    fn batch_pieces_are_the_batch_with_large_writes_shared() {
        let big = Bytes::from(random_bytes(100_000));
        let records = [
            Record {
                seq: 1,
                op: Op::Write {
                    path: p("a"),
                    offset: 3,
                    data: big.clone(),
                },
            },
            Record {
                seq: 2,
                op: Op::Write {
                    path: p("b"),
                    offset: 0,
                    data: Bytes::from_static(b"small"),
                },
            },
            Record {
                seq: 3,
                op: Op::Truncate {
                    path: p("b"),
                    size: 9,
                },
            },
            Record {
                seq: 4,
                op: Op::Write {
                    path: p("c"),
                    offset: 1 << 40,
                    data: big.slice(5000..80_000),
                },
            },
        ];
        let refs: Vec<&Record> = records.iter().collect();
        let pieces = encode_batch_pieces("www", &refs);
        assert_eq!(pieces.concat(), encode_batch("www", &refs));
        // The two large writes went out as views of their own buffers.
        assert!(pieces.iter().any(|b| b.as_ptr() == big.as_ptr()));
        assert!(pieces.iter().any(|b| b.as_ptr() == big[5000..].as_ptr()));
        // Nothing large: one piece.
        let small = &refs[1..3];
        assert_eq!(
            encode_batch_pieces("www", small),
            vec![Bytes::from(encode_batch("www", small))]
        );
    }

    #[test]
    fn a_batch_encoded_from_borrowed_records_is_the_same_frame() {
        let records = vec![
            Record {
                seq: 7,
                op: Op::Write {
                    path: p("d/f"),
                    offset: 1 << 40,
                    data: random_bytes(3000).into(),
                },
            },
            Record {
                seq: 8,
                op: Op::Prune {
                    dir: None,
                    keep: vec![p("a")],
                },
            },
        ];
        let refs: Vec<&Record> = records.iter().collect();
        let frame = Frame::Batch {
            set: "www".into(),
            records: records.clone(),
        };
        assert_eq!(encode_batch("www", &refs), encode_frame(&frame));
        assert_eq!(
            encode_batch("x", &[]),
            encode_frame(&Frame::Batch {
                set: "x".into(),
                records: vec![]
            })
        );
        assert_eq!(
            compress_frame(encode_batch("www", &refs), 3),
            encode_frame_compressed(&frame, 3)
        );
    }

    fn batch_of(data: Vec<u8>) -> Frame {
        Frame::Batch {
            set: "data".into(),
            records: vec![Record {
                seq: 1,
                op: Op::Write {
                    path: p("f"),
                    offset: 0,
                    data: data.into(),
                },
            }],
        }
    }

    fn random_bytes(n: usize) -> Vec<u8> {
        // xorshift: incompressible enough for zstd, and no dev-dependency needed.
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    fn decode_all(bytes: &[u8]) -> Result<Vec<Frame>, WireError> {
        let mut dec = FrameDecoder::new();
        dec.push(bytes);
        let mut out = Vec::new();
        while let Some(f) = dec.next_frame()? {
            out.push(f);
        }
        assert_eq!(dec.buffered(), 0);
        Ok(out)
    }

    /// Encodes `Compressed { raw_len, data: zstd(inner) }` by hand, as a hostile peer would.
    fn packed(raw_len: u32, inner: &[u8]) -> Vec<u8> {
        encode_frame(&Frame::Compressed {
            raw_len,
            data: zstd::bulk::compress(inner, 1).unwrap(),
        })
    }

    #[test]
    fn compressible_batches_shrink_and_round_trip() {
        let text = b"INSERT INTO log VALUES (42, 'hello doppel');\n".repeat(20_000);
        let frame = batch_of(text);
        let plain = encode_frame(&frame);
        let bytes = encode_frame_compressed(&frame, 3);
        assert!(
            bytes.len() * 10 < plain.len(),
            "{} -> {}",
            plain.len(),
            bytes.len()
        );
        // Mixed with plain frames and fed in odd pieces, it comes out as the inner frame.
        let ack = Frame::Ack {
            set: "data".into(),
            seq: 1,
        };
        let mut stream = bytes.clone();
        stream.extend(encode_frame_compressed(&ack, 3));
        stream.extend(&bytes);
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in stream.chunks(1000) {
            dec.push(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, vec![frame.clone(), ack, frame]);
    }

    #[test]
    fn incompressible_or_small_frames_go_out_plain() {
        let random = batch_of(random_bytes(300_000));
        assert_eq!(encode_frame_compressed(&random, 3), encode_frame(&random));
        assert_eq!(
            decode_all(&encode_frame_compressed(&random, 3)).unwrap(),
            vec![random]
        );
        // Level 0 is off, and only batches are ever compressed.
        let zeros = batch_of(vec![0; 100_000]);
        assert_eq!(encode_frame_compressed(&zeros, 0), encode_frame(&zeros));
        let hello = Frame::Refused {
            reason: "x".repeat(10_000),
        };
        assert_eq!(encode_frame_compressed(&hello, 3), encode_frame(&hello));
        // A tiny batch does not shrink: plain.
        let tiny = batch_of(vec![1, 2, 3]);
        assert_eq!(encode_frame_compressed(&tiny, 3), encode_frame(&tiny));
    }

    #[test]
    fn compressed_frames_that_lie_are_errors_not_panics() {
        let inner = postcard::to_allocvec(&batch_of(vec![7; 100_000])).unwrap();
        let n = inner.len() as u32;
        // raw_len smaller than the content: decompression stops at the bound.
        assert!(matches!(
            decode_all(&packed(n - 1, &inner)),
            Err(WireError::Malformed(_))
        ));
        // raw_len larger than the content.
        assert!(matches!(
            decode_all(&packed(n + 1, &inner)),
            Err(WireError::Malformed(_))
        ));
        // raw_len beyond the frame limit is refused before any allocation.
        assert!(matches!(
            decode_all(&packed(u32::MAX, &inner)),
            Err(WireError::TooLarge(_))
        ));
        // A bomb: 32 MiB of zeros in a few KiB, declared as the largest allowed frame.
        let bomb = vec![0u8; 32 << 20];
        assert!(matches!(
            decode_all(&packed(MAX_FRAME as u32, &bomb)),
            Err(WireError::Malformed(_))
        ));
        // Not zstd at all.
        let junk = encode_frame(&Frame::Compressed {
            raw_len: 100,
            data: vec![0xff; 50],
        });
        assert!(matches!(decode_all(&junk), Err(WireError::Malformed(_))));
        // Bytes after the inner frame.
        let mut trailing = inner.clone();
        trailing.push(0);
        assert!(matches!(
            decode_all(&packed(n + 1, &trailing)),
            Err(WireError::Malformed(_))
        ));
        // A compressed frame inside a compressed frame.
        let nested = postcard::to_allocvec(&Frame::Compressed {
            raw_len: n,
            data: zstd::bulk::compress(&inner, 1).unwrap(),
        })
        .unwrap();
        let e = decode_all(&packed(nested.len() as u32, &nested)).unwrap_err();
        assert!(e.to_string().contains("inside"), "{e}");
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        let mut dec = FrameDecoder::new();
        dec.push(&[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]);
        assert!(matches!(dec.next_frame(), Err(WireError::Malformed(_))));
        let mut dec = FrameDecoder::new();
        dec.push(&u32::MAX.to_le_bytes());
        assert!(matches!(dec.next_frame(), Err(WireError::TooLarge(_))));
    }
}
