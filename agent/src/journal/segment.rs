//! One segment file: its name, its header, and reading records out of it.
//!
//! A segment is `<first_seq, 20 digits>.seg`: a 32-byte header, then records
//! ([`super::record`]) with consecutive sequence numbers starting at `first_seq`. The
//! name alone tells where a segment starts, so an empty segment still records where the
//! sequence stands (the journal keeps one when everything else is trimmed).
//!
//! Header: `magic "doppel-j" | epoch u64 | first_seq u64 | version u32 | crc32c u32`,
//! little-endian, the CRC covering the 28 bytes before it. The epoch is there so that
//! segments left behind by an interrupted [`super::Journal::reset`] (which writes the new
//! epoch to `meta` first) are recognised as stale rather than replayed into the new
//! sequence space.

use std::ffi::OsStr;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;

use doppel_common::wire::Record;

use super::record::{self, DecodeError};

pub const SEGMENT_HEADER_LEN: usize = 32;
const MAGIC: [u8; 8] = *b"doppel-j";
const VERSION: u32 = 1;
const SUFFIX: &str = ".seg";

/// One sparse index entry is kept per this many bytes of records: a read seeks to the
/// entry at or before the wanted sequence and decodes forward at most this far.
/// 16 bytes per 64 KiB is 16 KiB of memory per 64 MiB segment.
pub const INDEX_STRIDE: u64 = 64 << 10;

pub fn file_name(first_seq: u64) -> String {
    format!("{first_seq:020}{SUFFIX}")
}

/// The first sequence a segment file name stands for; `None` for any other file.
pub fn parse_name(name: &OsStr) -> Option<u64> {
    let digits = name.to_str()?.strip_suffix(SUFFIX)?;
    if digits.len() != 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub epoch: u64,
    pub first_seq: u64,
}

pub fn encode_header(h: Header) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[..8].copy_from_slice(&MAGIC);
    b[8..16].copy_from_slice(&h.epoch.to_le_bytes());
    b[16..24].copy_from_slice(&h.first_seq.to_le_bytes());
    b[24..28].copy_from_slice(&VERSION.to_le_bytes());
    let crc = crc32c::crc32c(&b[..28]);
    b[28..].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a segment header; the error says what is wrong with it.
pub fn decode_header(b: &[u8]) -> Result<Header, String> {
    let Some(b) = b.get(..SEGMENT_HEADER_LEN) else {
        return Err(format!(
            "the {SEGMENT_HEADER_LEN}-byte header is cut short ({} bytes)",
            b.len()
        ));
    };
    let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    if b[..8] != MAGIC {
        return Err("not a doppel journal segment (bad magic)".into());
    }
    if crc32c::crc32c(&b[..28]) != u32_at(28) {
        return Err("the header fails its checksum".into());
    }
    let version = u32_at(24);
    if version != VERSION {
        return Err(format!(
            "segment format version {version}, this agent reads version {VERSION}"
        ));
    }
    Ok(Header {
        epoch: u64_at(8),
        first_seq: u64_at(16),
    })
}

/// A segment as the journal tracks it.
#[derive(Debug)]
pub struct Segment {
    pub path: PathBuf,
    pub file: File,
    pub first_seq: u64,
    /// One past the last record held (`first_seq` when empty).
    pub next_seq: u64,
    /// Bytes in the file, header included; everything below is whole, checked records.
    pub len: u64,
    /// `(seq, offset)` of some records, ascending; always the first one if any.
    pub index: Vec<(u64, u64)>,
    /// Written since the last fdatasync.
    pub dirty: bool,
}

impl Segment {
    pub fn is_empty(&self) -> bool {
        self.next_seq == self.first_seq
    }

    /// Notes a record appended at `offset` in the sparse index.
    pub fn note_record(&mut self, seq: u64, offset: u64) {
        note_record(&mut self.index, seq, offset);
    }

    /// Offset to start decoding from to find `seq` (held by this segment).
    pub fn seek(&self, seq: u64) -> u64 {
        match self.index.partition_point(|&(s, _)| s <= seq) {
            0 => SEGMENT_HEADER_LEN as u64,
            i => self.index[i - 1].1,
        }
    }
}

/// Adds `(seq, offset)` to a sparse index if it is the first record or
/// [`INDEX_STRIDE`] bytes past the last entry.
pub fn note_record(index: &mut Vec<(u64, u64)>, seq: u64, offset: u64) {
    if index
        .last()
        .is_none_or(|&(_, last)| offset - last >= INDEX_STRIDE)
    {
        index.push((seq, offset));
    }
}

/// What [`Reader::next`] found.
#[derive(Debug)]
pub enum Next {
    /// A whole, checked record, where it starts, and its length on disk.
    Record(Record, u64, usize),
    /// The end of the range was reached cleanly.
    End,
    /// The bytes at this file offset are not a record (the error's own offset is 0).
    Bad(u64, DecodeError),
}

/// Decodes records sequentially from `[pos, end)` of a file, reading windows of about
/// `chunk` bytes with pread, so that memory stays bounded whatever the segment's size.
pub struct Reader<'a> {
    file: &'a File,
    end: u64,
    pos: u64,
    buf: Vec<u8>,
    buf_start: u64,
    chunk: usize,
}

impl<'a> Reader<'a> {
    pub fn new(file: &'a File, pos: u64, end: u64, chunk: usize) -> Self {
        Reader {
            file,
            end,
            pos,
            buf: Vec::new(),
            buf_start: pos,
            chunk: chunk.max(record::HEADER_LEN),
        }
    }

    pub fn next(&mut self) -> io::Result<Next> {
        loop {
            if self.pos >= self.end {
                return Ok(Next::End);
            }
            let rel = (self.pos - self.buf_start) as usize;
            match record::decode_record(&self.buf[rel..]) {
                Ok((r, len)) => {
                    let at = self.pos;
                    self.pos += len as u64;
                    return Ok(Next::Record(r, at, len));
                }
                // The window ends inside the record but the file goes on: read a
                // window that starts at the record and holds all of it.
                Err(DecodeError::Truncated { need, .. })
                    if self.buf_start + (self.buf.len() as u64) < self.end =>
                {
                    let len = (need.max(self.chunk) as u64).min(self.end - self.pos) as usize;
                    self.buf.resize(len, 0);
                    self.file.read_exact_at(&mut self.buf, self.pos)?;
                    self.buf_start = self.pos;
                }
                Err(e) => return Ok(Next::Bad(self.pos, e)),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_sort_like_numbers() {
        assert_eq!(file_name(42), "00000000000000000042.seg");
        assert_eq!(parse_name(OsStr::new(&file_name(u64::MAX))), Some(u64::MAX));
        for bad in [
            "42.seg",
            "0000000000000000004x.seg",
            "meta",
            "00000000000000000042",
        ] {
            assert_eq!(parse_name(OsStr::new(bad)), None, "{bad}");
        }
        assert!(file_name(9) < file_name(10));
    }

    #[test]
    fn headers_round_trip_and_damage_is_named() {
        let h = Header {
            epoch: 7,
            first_seq: 99,
        };
        let b = encode_header(h);
        assert_eq!(decode_header(&b), Ok(h));
        assert!(decode_header(&b[..10]).unwrap_err().contains("cut short"));
        for i in 0..SEGMENT_HEADER_LEN {
            let mut bad = b;
            bad[i] ^= 1;
            assert!(decode_header(&bad).is_err(), "flip at {i}");
        }
    }
}
