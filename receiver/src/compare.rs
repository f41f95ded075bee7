//! Block comparison for [`Op::Sum`](doppel_common::wire::Op::Sum): which byte ranges of
//! the replica's file differ from the source's, given the source's block checksums.
//!
//! Reads only; the caller decides what the answer is for (the mirror sends the ranges,
//! a verify reports them). Holes of the replica are not read: a block that lies wholly
//! in one has the checksum of zeros.

use std::os::fd::AsFd;

use doppel_common::wire::sums::{block_sum, zero_sum, FINE_BLOCK};
use rustix::fs::{seek, SeekFrom};
use rustix::io::Errno;

/// What the source said about one run of blocks.
pub struct Blocks<'a> {
    /// The source file's size.
    pub size: u64,
    pub offset: u64,
    pub block: u32,
    pub sums: &'a [u64],
}

/// Appends `(offset, len)` to `ranges`, merging it with the last range if they touch.
pub fn add_range(ranges: &mut Vec<(u64, u64)>, offset: u64, len: u64) {
    if len == 0 {
        return;
    }
    if let Some(last) = ranges.last_mut() {
        if last.0 + last.1 == offset {
            last.1 += len;
            return;
        }
    }
    ranges.push((offset, len));
}

/// The ranges of `fd` (a regular file of `target_size` bytes) whose blocks differ from
/// `b`. A block the replica does not have in full (it is shorter) differs.
pub fn differing(fd: impl AsFd, target_size: u64, b: &Blocks) -> Result<Vec<(u64, u64)>, Errno> {
    let fd = fd.as_fd();
    let block = b.block as u64;
    let mut ranges = Vec::new();
    let mut buf = vec![0u8; b.block as usize];
    // Where the next data of the replica starts at or after the current block
    // (u64::MAX: only a hole up to the end). Asked again once a block passes it.
    let mut data_at: Option<u64> = None;
    let sparse = rustix::fs::fstat(fd)
        .map(|st| (st.st_blocks as u64).saturating_mul(512) < target_size)
        .unwrap_or(false);
    let full_zero = zero_sum(b.block as usize);
    let to_read = target_size.min(b.sums.len() as u64 * block);
    let mut mapped = doppel_mapread::Reader::new(fd, to_read);
    for (i, &want) in b.sums.iter().enumerate() {
        let start = b.offset + i as u64 * block;
        let len = block.min(b.size.saturating_sub(start));
        if len == 0 {
            break;
        }
        if start + len > target_size {
            add_range(&mut ranges, start, len);
            continue;
        }
        if sparse {
            let next = match data_at {
                Some(d) if d >= start => d,
                _ => {
                    let d = match seek(fd, SeekFrom::Data(start)) {
                        Ok(d) => d,
                        Err(Errno::NXIO) => u64::MAX,
                        // No SEEK_DATA here: read everything.
                        Err(_) => start,
                    };
                    data_at = Some(d);
                    d
                }
            };
            if next >= start + len {
                let zero = if len == block {
                    full_zero
                } else {
                    zero_sum(len as usize)
                };
                if zero != want {
                    add_range(&mut ranges, start, len);
                }
                continue;
            }
        }
        // Hashed where the page cache holds it; read (and copied) only if the file
        // cannot be mapped or shrank meanwhile (then the short read shows a difference).
        let same = match mapped.with(start, len as usize, |b| block_sum(b) == want) {
            Ok(same) => same,
            Err(_) => {
                let got = read_full(fd, &mut buf[..len as usize], start)?;
                got == len as usize && block_sum(&buf[..got]) == want
            }
        };
        if !same {
            add_range(&mut ranges, start, len);
        }
    }
    Ok(ranges)
}

/// The blocks of `[offset, size)` of the source's file (`block` bytes each, the last one
/// clipped at `size`) in which the replica's file `fd` of `target_size` bytes has no data
/// at all: wholly in a hole, or past its end. Merged into ranges; the answer to a
/// [`LAYOUT_JOB`](doppel_common::wire::sums::LAYOUT_JOB) Sum. `offset` is a multiple of
/// `block`. Found with `SEEK_DATA`/`SEEK_HOLE`, two calls per extent: nothing is read.
pub fn dataless(
    fd: impl AsFd,
    target_size: u64,
    offset: u64,
    size: u64,
    block: u32,
) -> Result<Vec<(u64, u64)>, Errno> {
    let fd = fd.as_fd();
    let block = block as u64;
    // A file with as many blocks as bytes has no hole (on ext4 the extent tree counts
    // too, so a sparse file may pass for a dense one: it is then compared, never wrong).
    let sparse = rustix::fs::fstat(fd)
        .map(|st| (st.st_blocks as u64).saturating_mul(512) < target_size)
        .unwrap_or(true);
    let mut ranges = Vec::new();
    let mut pos = offset;
    while pos < size {
        // Where the replica's next data is, at or after `pos` (`size`: none before it).
        let data = if pos >= target_size {
            size
        } else if !sparse {
            pos
        } else {
            match seek(fd, SeekFrom::Data(pos)) {
                Ok(d) if d < target_size => d.min(size),
                Ok(_) | Err(Errno::NXIO) => size,
                // No SEEK_DATA here: take it all for data.
                Err(_) => pos,
            }
        };
        let free_end = if data >= size {
            size
        } else {
            data / block * block
        };
        add_range(&mut ranges, pos, free_end - pos);
        if data >= size {
            break;
        }
        // The data runs to the next hole (the end of the file is one).
        let hole = if sparse {
            seek(fd, SeekFrom::Hole(data)).unwrap_or(target_size)
        } else {
            target_size
        };
        pos = hole.div_ceil(block).max(data / block + 1) * block;
    }
    Ok(ranges)
}

/// The replica's checksums of each range in blocks of [`FINE_BLOCK`] (see
/// `Frame::Need::fine`): empty for a range the replica has no data in (a hole, or past
/// its end), which the agent then sends whole.
pub fn fine_sums(
    fd: impl AsFd,
    target_size: u64,
    ranges: &[(u64, u64)],
) -> Result<Vec<Vec<u64>>, Errno> {
    let fd = fd.as_fd();
    let fine = FINE_BLOCK as u64;
    let mut buf = vec![0u8; FINE_BLOCK as usize];
    let mut out = Vec::with_capacity(ranges.len());
    for &(start, len) in ranges {
        let end = start + len;
        let has_data = end <= target_size
            && match seek(fd, SeekFrom::Data(start)) {
                Ok(d) => d < end,
                Err(Errno::NXIO) => false,
                Err(_) => true,
            };
        if !has_data {
            out.push(Vec::new());
            continue;
        }
        let mut sums = Vec::with_capacity(len.div_ceil(fine) as usize);
        let mut pos = start;
        while pos < end {
            let n = fine.min(end - pos) as usize;
            let got = read_full(fd, &mut buf[..n], pos)?;
            sums.push(block_sum(&buf[..got]));
            pos += n as u64;
        }
        out.push(sums);
    }
    Ok(out)
}

/// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
fn read_full(fd: std::os::fd::BorrowedFd, buf: &mut [u8], offset: u64) -> Result<usize, Errno> {
    let mut done = 0;
    while done < buf.len() {
        match rustix::io::pread(fd, &mut buf[done..], offset + done as u64) {
            Ok(0) => break,
            Ok(n) => done += n,
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::fs::FileExt;

    const B: u32 = 4096;

    fn sums_of(data: &[u8]) -> Vec<u64> {
        data.chunks(B as usize).map(block_sum).collect()
    }

    fn file_with(data: &[u8]) -> (tempfile::NamedTempFile, u64) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(data).unwrap();
        (f, data.len() as u64)
    }

    fn diff(target: &[u8], source: &[u8]) -> Vec<(u64, u64)> {
        let (f, n) = file_with(target);
        let sums = sums_of(source);
        differing(
            f.as_file(),
            n,
            &Blocks {
                size: source.len() as u64,
                offset: 0,
                block: B,
                sums: &sums,
            },
        )
        .unwrap()
    }

    fn pattern(n: usize) -> Vec<u8> {
        (0..n).map(|i| (i * 7 + i / 4096) as u8).collect()
    }

    #[test]
    fn identical_files_need_nothing() {
        let d = pattern(10 * 4096 + 100);
        assert_eq!(diff(&d, &d), vec![]);
    }

    #[test]
    fn changed_blocks_are_found_and_merged() {
        let src = pattern(10 * 4096);
        let mut dst = src.clone();
        dst[5] ^= 1; // block 0
        dst[4096 + 9] ^= 1; // block 1: touches block 0's range
        dst[7 * 4096] ^= 1; // block 7
        assert_eq!(diff(&dst, &src), vec![(0, 8192), (7 * 4096, 4096)]);
    }

    #[test]
    fn a_shorter_replica_needs_its_missing_tail() {
        let src = pattern(5 * 4096 + 10);
        let dst = src[..2 * 4096 + 3].to_vec();
        // Block 2 is short on the replica; blocks 3, 4 and the 10-byte tail are missing.
        assert_eq!(diff(&dst, &src), vec![(2 * 4096, 3 * 4096 + 10)]);
    }

    #[test]
    fn holes_are_compared_without_reading_them() {
        let (f, _) = file_with(b"");
        let size = 64 * 4096u64;
        f.as_file().set_len(size).unwrap();
        f.as_file().write_at(b"x", 40 * 4096).unwrap();
        let mut src = vec![0u8; size as usize];
        src[40 * 4096] = b'x';
        src[3 * 4096] = 1; // the source has data where the replica has a hole
        let sums = sums_of(&src);
        let got = differing(
            f.as_file(),
            size,
            &Blocks {
                size,
                offset: 0,
                block: B,
                sums: &sums,
            },
        )
        .unwrap();
        assert_eq!(got, vec![(3 * 4096, 4096)]);
    }

    #[test]
    fn fine_sums_cover_ranges_with_data_only() {
        let (f, _) = file_with(b"");
        f.as_file().set_len(64 * 4096).unwrap();
        let data = pattern(3000);
        f.as_file().write_at(&data, 8 * 4096).unwrap();
        let got = fine_sums(
            f.as_file(),
            64 * 4096,
            &[(0, 4096), (8 * 4096, 2500), (60 * 4096, 8192)],
        )
        .unwrap();
        assert!(got[0].is_empty(), "a hole is sent whole");
        assert_eq!(
            got[1],
            vec![
                block_sum(&data[..1024]),
                block_sum(&data[1024..2048]),
                block_sum(&data[2048..2500])
            ]
        );
        assert!(got[2].is_empty());
        // Past the replica's end: nothing to compare with.
        assert!(fine_sums(f.as_file(), 64 * 4096, &[(64 * 4096, 10)]).unwrap()[0].is_empty());
    }

    #[test]
    fn dataless_blocks_are_holes_and_the_tail_past_the_replica() {
        let (f, _) = file_with(b"");
        // Replica: 20 blocks and 100 bytes; data in block 3 (partly) and blocks 9-10.
        let target = 20 * 4096 + 100;
        f.as_file().set_len(target).unwrap();
        f.as_file().write_at(b"x", 3 * 4096 + 7).unwrap();
        f.as_file().write_at(&[1u8; 8192], 9 * 4096).unwrap();
        let size = 30 * 4096 + 5; // the source is longer
        let got = dataless(f.as_file(), target, 0, size, B).unwrap();
        // tmpfs allocates whole pages; other filesystems may round data up to their own
        // block size, which only ever shrinks what is data-less.
        assert_eq!(
            got,
            vec![
                (0, 3 * 4096),
                (4 * 4096, 5 * 4096),
                (11 * 4096, size - 11 * 4096)
            ]
        );
        // From an offset, and a source that ends inside the replica's data.
        assert_eq!(
            dataless(f.as_file(), target, 4 * 4096, 9 * 4096 + 10, B).unwrap(),
            vec![(4 * 4096, 5 * 4096)]
        );
    }

    #[test]
    fn a_dense_replica_has_no_dataless_block_but_its_missing_tail() {
        let d = pattern(5 * 4096 + 10);
        let (f, n) = file_with(&d);
        assert_eq!(dataless(f.as_file(), n, 0, n, B).unwrap(), vec![]);
        // The source is longer: the replica's last, partial block still holds data.
        assert_eq!(
            dataless(f.as_file(), n, 0, 8 * 4096, B).unwrap(),
            vec![(6 * 4096, 2 * 4096)]
        );
        // An empty replica: everything.
        let (e, _) = file_with(b"");
        assert_eq!(dataless(e.as_file(), 0, 0, n, B).unwrap(), vec![(0, n)]);
    }

    #[test]
    fn a_run_at_an_offset_reports_absolute_ranges() {
        let src = pattern(8 * 4096);
        let mut dst = src.clone();
        dst[6 * 4096 + 1] ^= 0xff;
        let (f, n) = file_with(&dst);
        let sums = sums_of(&src[4 * 4096..]);
        let got = differing(
            f.as_file(),
            n,
            &Blocks {
                size: n,
                offset: 4 * 4096,
                block: B,
                sums: &sums,
            },
        )
        .unwrap();
        assert_eq!(got, vec![(6 * 4096, 4096)]);
    }
}
