//! Written bytes into the ring: `KIND_DATA` records of up to `CHUNK_SIZE` bytes, copied
//! from the writer's buffer (user memory, at syscall exit) or from the page cache or a
//! direct write's buffer (inside the filesystem). What cannot be copied degrades, never
//! blocks: a full ring to a missed range, unreadable memory to a dirty range the agent
//! reads back.

use aya_ebpf::helpers::{
    bpf_ktime_get_ns,
    generated::{bpf_probe_read_kernel, bpf_probe_read_user},
};
use doppel_common::abi::{
    FileRecord, Header, KFileId, CHUNK_SIZE, FILE_RECORD_SIZE, KIND_DATA, KIND_DIRTY, MAX_CHUNKS,
    STAT_DATA_BYTES, STAT_EVENTS,
};

use crate::maps::{bump, output, record_missed, RING};

/// Where the bytes are.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The writing process's memory.
    User,
    /// Kernel memory (a page-cache folio).
    Kernel,
}

#[inline(always)]
fn read(dst: *mut u8, len: u32, src: u64, from: Source) -> i64 {
    let dst = dst as *mut core::ffi::c_void;
    let src = src as *const core::ffi::c_void;
    // SAFETY: both helpers tolerate any source address; `dst` has room for `len`
    // (checked by each caller against its buffer).
    unsafe {
        match from {
            Source::User => bpf_probe_read_user(dst, len, src),
            Source::Kernel => bpf_probe_read_kernel(dst, len, src),
        }
    }
}

/// What became of a chunk [`send_chunk`] was given.
enum Chunk {
    Sent,
    /// The ring has no room: nothing was copied.
    RingFull,
    /// The memory could not be read (user pages not resident): nothing was sent.
    Unreadable,
}

/// Sends one full chunk (`CHUNK_SIZE` bytes at `src`) behind `record`, copied straight
/// into the ring: no pass through the scratch buffer, and no copy at all when the ring
/// is full (the reservation fails first).
#[inline(always)]
fn send_chunk(record: &FileRecord, src: u64, from: Source) -> Chunk {
    let Some(mut entry) = RING.reserve_bytes(FILE_RECORD_SIZE + CHUNK_SIZE, 0) else {
        return Chunk::RingFull;
    };
    let at = entry.as_mut_ptr();
    // SAFETY: the reservation is FILE_RECORD_SIZE + CHUNK_SIZE bytes, 8-aligned (ring
    // records are); the header fills the first FILE_RECORD_SIZE, the copy the rest.
    unsafe { core::ptr::write(at as *mut FileRecord, *record) };
    // SAFETY: the rest of the reservation is CHUNK_SIZE bytes.
    if read(
        unsafe { at.add(FILE_RECORD_SIZE) },
        CHUNK_SIZE as u32,
        src,
        from,
    ) != 0
    {
        entry.discard(0);
        return Chunk::Unreadable;
    }
    entry.submit(0);
    Chunk::Sent
}

/// Sends a record without data, built on the stack: for programs that can run in
/// interrupt context, on a CPU where another program is half-way through the per-CPU
/// scratch buffer. False when the ring is full.
#[inline(always)]
pub fn send_range(
    kind: u32,
    pid: u32,
    file: KFileId,
    parent: KFileId,
    offset: u64,
    len: u64,
) -> bool {
    let mut rec = FileRecord {
        hdr: Header {
            kind,
            pid,
            // SAFETY: helper without preconditions.
            ktime: unsafe { bpf_ktime_get_ns() },
        },
        file,
        parent,
        offset,
        len,
    };
    let ok = output(
        &mut rec as *mut FileRecord as *mut u8,
        FILE_RECORD_SIZE as u64,
    );
    if ok {
        bump(STAT_EVENTS, 1);
    }
    ok
}

/// Reports `[offset, offset + len)` of `fid` dirty (or, with the ring full, missed):
/// the agent reads those bytes from the file.
#[inline(always)]
pub fn report_dirty(tgid: u32, fid: &KFileId, parent: &KFileId, offset: u64, len: u64) {
    if !send_range(KIND_DIRTY, tgid, *fid, *parent, offset, len) {
        record_missed(fid, offset, offset.wrapping_add(len));
    }
}

/// Sends the `len` (at most `INLINE_CAP`) bytes at `src`, written at `offset` of `fid`,
/// as data records, using the per-CPU scratch buffer `s` for the last, short chunk.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
pub fn send_bytes(
    s: *mut u8,
    tgid: u32,
    fid: &KFileId,
    parent: &KFileId,
    offset: u64,
    src: u64,
    len: u64,
    from: Source,
) {
    let rec = s as *mut FileRecord;
    // SAFETY: `s` is the per-CPU scratch value, MAX_RECORD_SIZE >= FILE_RECORD_SIZE +
    // CHUNK_SIZE bytes long and 8-aligned.
    unsafe {
        (*rec).hdr = Header {
            kind: KIND_DATA,
            pid: tgid,
            ktime: bpf_ktime_get_ns(),
        };
        (*rec).file = *fid;
        (*rec).parent = *parent;
    }
    for i in 0..MAX_CHUNKS {
        let done = (i * CHUNK_SIZE) as u64;
        if done >= len {
            break;
        }
        let mut n = len - done;
        if n >= CHUNK_SIZE as u64 {
            n = CHUNK_SIZE as u64;
            // SAFETY: `rec` is the scratch record, its header set above.
            let record = unsafe {
                (*rec).offset = offset + done;
                (*rec).len = n;
                *rec
            };
            match send_chunk(&record, src + done, from) {
                Chunk::Sent => {
                    bump(STAT_EVENTS, 1);
                    bump(STAT_DATA_BYTES, n);
                    continue;
                }
                Chunk::RingFull => {
                    record_missed(fid, offset + done, offset + len);
                    return;
                }
                Chunk::Unreadable => {
                    report_dirty(tgid, fid, parent, offset + done, len - done);
                    return;
                }
            }
        }
        // SAFETY: as above; `n < CHUNK_SIZE` keeps the copy inside the scratch buffer.
        unsafe {
            (*rec).offset = offset + done;
            (*rec).len = n;
        }
        // SAFETY: the scratch buffer holds FILE_RECORD_SIZE + CHUNK_SIZE bytes.
        let at = unsafe { s.add(FILE_RECORD_SIZE) };
        if read(at, n as u32, src + done, from) != 0 {
            // The user pages are not resident any more (probe reads cannot fault them
            // in): tell the agent to read the rest from the file instead.
            report_dirty(tgid, fid, parent, offset + done, len - done);
            return;
        }
        if !output(s, FILE_RECORD_SIZE as u64 + n) {
            record_missed(fid, offset + done, offset + len);
            return;
        }
        bump(STAT_EVENTS, 1);
        bump(STAT_DATA_BYTES, n);
    }
}
