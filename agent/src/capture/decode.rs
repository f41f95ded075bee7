//! Ring-buffer records ([`doppel_common::abi`]) -> [`CaptureEvent`]s. Pure functions: no
//! kernel, no IO. A malformed record is an error value, never a panic.

use doppel_common::abi::{
    FileRecord, KFileId, MissedKey, MissedRange, NsRecord, PathSlot, ATTR_NOFOLLOW, ATTR_XATTR,
    AT_REMOVEDIR, CHUNK_SIZE, FILE_RECORD_SIZE, KIND_ATTR, KIND_DATA, KIND_DIRTY, KIND_FALLOC,
    KIND_FTRUNCATE, KIND_LINK, KIND_MADE, KIND_MAPPED, KIND_MAP_DIRTY, KIND_MKDIR, KIND_OPEN,
    KIND_REMAPPED, KIND_RENAME, KIND_RESIZED, KIND_SYNCED, KIND_TOUCHED, KIND_TRUNCATE,
    KIND_UNLINK, KIND_WRITEBACK, NS_RECORD_SIZE, O_CREAT, O_TRUNC, PATH_CAP, WRITEBACK_END,
};
use doppel_common::event::{CaptureEvent, Captured, FileId, PathArg};

/// Why a record could not be decoded. Means the agent and the loaded program disagree
/// about the ABI (or memory corruption): the caller logs it and counts it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("ring record of {len} bytes is too short for kind {kind}")]
    Short { kind: u32, len: usize },
    #[error("ring record has unknown kind {0}")]
    UnknownKind(u32),
    #[error("ring record field out of range: {0}")]
    Invalid(&'static str),
}

/// Kernel `dev_t` (`major << 20 | minor`) -> `st_dev` encoding.
pub fn kernel_dev_to_user(kdev: u64) -> u64 {
    let major = ((kdev >> 20) & 0xfff) as u32;
    let minor = (kdev & 0xf_ffff) as u32;
    libc::makedev(major, minor)
}

/// `st_dev` encoding -> kernel `dev_t`; `None` if the number does not fit the kernel's
/// 12-bit major / 20-bit minor.
pub fn user_dev_to_kernel(dev: u64) -> Option<u64> {
    let major = u64::from(libc::major(dev));
    let minor = u64::from(libc::minor(dev));
    (major < (1 << 12) && minor < (1 << 20)).then_some((major << 20) | minor)
}

pub fn file_id(k: KFileId) -> FileId {
    FileId {
        dev: kernel_dev_to_user(k.dev),
        ino: k.ino,
    }
}

/// Copies a `#[repr(C)]` plain-integer struct out of the front of `bytes`.
fn read<T: Copy + Default>(bytes: &[u8], kind: u32) -> Result<T, DecodeError> {
    if bytes.len() < std::mem::size_of::<T>() {
        return Err(DecodeError::Short {
            kind,
            len: bytes.len(),
        });
    }
    // SAFETY: length checked above; T is one of the abi structs, made of integers only,
    // so every bit pattern is a valid value; read_unaligned has no alignment requirement.
    Ok(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<T>()) })
}

fn path_arg(
    rec: &[u8],
    slot: &PathSlot,
    at: usize,
    pid: u32,
    kind: u32,
) -> Result<PathArg, DecodeError> {
    let len = usize::from(slot.len);
    if len >= PATH_CAP {
        return Err(DecodeError::Invalid("path length"));
    }
    let bytes = rec.get(at..at + len).ok_or(DecodeError::Short {
        kind,
        len: rec.len(),
    })?;
    Ok(PathArg {
        base: (slot.has_base != 0).then(|| file_id(slot.base)),
        pid,
        dirfd: slot.dirfd,
        path: bytes.to_vec(),
        truncated: slot.truncated != 0,
    })
}

/// When the record's change was complete (its header's `ktime`; 0 if too short).
pub fn record_time(rec: &[u8]) -> u64 {
    rec.get(8..16)
        .and_then(|b| b.try_into().ok())
        .map_or(0, u64::from_ne_bytes)
}

/// Decodes one ring record, appending its event(s) to `out` (a creating, truncating
/// open yields two).
pub fn decode_record(rec: &[u8], out: &mut Vec<CaptureEvent>) -> Result<(), DecodeError> {
    if rec.len() < 8 {
        return Err(DecodeError::Short {
            kind: 0,
            len: rec.len(),
        });
    }
    let kind = u32::from_ne_bytes([rec[0], rec[1], rec[2], rec[3]]);
    match kind {
        KIND_RESIZED => {
            let r: FileRecord = read(rec, kind)?;
            out.push(CaptureEvent::Resized {
                file: file_id(r.file),
                parent: (r.parent.ino != 0).then(|| file_id(r.parent)),
            });
        }
        KIND_TOUCHED | KIND_SYNCED => {
            let r: FileRecord = read(rec, kind)?;
            let file = file_id(r.file);
            out.push(if kind == KIND_TOUCHED {
                CaptureEvent::Touched { file }
            } else {
                CaptureEvent::Synced { file }
            });
        }
        KIND_REMAPPED => {
            let r: FileRecord = read(rec, kind)?;
            out.push(CaptureEvent::Remapped {
                file: file_id(r.file),
                parent: file_id(r.parent),
                offset: r.offset,
                len: r.len,
            });
        }
        KIND_MAP_DIRTY | KIND_WRITEBACK => {
            let r: FileRecord = read(rec, kind)?;
            out.push(if kind == KIND_MAP_DIRTY {
                CaptureEvent::MapDirty {
                    file: file_id(r.file),
                    parent: file_id(r.parent),
                    offset: r.offset,
                    len: r.len,
                }
            } else {
                CaptureEvent::Writeback {
                    file: file_id(r.file),
                    end: r.len == WRITEBACK_END,
                }
            });
        }
        KIND_DATA | KIND_DIRTY => {
            let r: FileRecord = read(rec, kind)?;
            let file = file_id(r.file);
            let parent = file_id(r.parent);
            if kind == KIND_DIRTY {
                out.push(CaptureEvent::Dirty {
                    file,
                    parent: Some(parent),
                    offset: r.offset,
                    len: r.len,
                });
                return Ok(());
            }
            let len = usize::try_from(r.len).map_err(|_| DecodeError::Invalid("data length"))?;
            if len > CHUNK_SIZE {
                return Err(DecodeError::Invalid("data length"));
            }
            let data =
                rec.get(FILE_RECORD_SIZE..FILE_RECORD_SIZE + len)
                    .ok_or(DecodeError::Short {
                        kind,
                        len: rec.len(),
                    })?;
            out.push(CaptureEvent::Data {
                file,
                parent,
                offset: r.offset,
                data: data.to_vec(),
            });
        }
        KIND_OPEN | KIND_MKDIR | KIND_UNLINK | KIND_RENAME | KIND_TRUNCATE | KIND_FTRUNCATE
        | KIND_ATTR | KIND_LINK | KIND_MADE | KIND_FALLOC | KIND_MAPPED => {
            let r: NsRecord = read(rec, kind)?;
            let pid = r.hdr.pid;
            let path0 = || path_arg(rec, &r.paths[0], NS_RECORD_SIZE, pid, kind);
            let path1 = || path_arg(rec, &r.paths[1], NS_RECORD_SIZE + PATH_CAP, pid, kind);
            match kind {
                KIND_OPEN => {
                    let path = path0()?;
                    if r.flags & O_CREAT != 0 {
                        out.push(CaptureEvent::Created {
                            file: Some(file_id(r.file)),
                            parent: Some(file_id(r.parent)),
                            path,
                            is_dir: false,
                            mode: r.mode & 0o7777,
                        });
                    }
                    if r.flags & O_TRUNC != 0 {
                        out.push(CaptureEvent::Truncated {
                            file: Some(file_id(r.file)),
                            parent: Some(file_id(r.parent)),
                            path: None,
                            size: 0,
                        });
                    }
                }
                KIND_MKDIR => out.push(CaptureEvent::Created {
                    file: None,
                    parent: None,
                    path: path0()?,
                    is_dir: true,
                    mode: r.mode & 0o7777,
                }),
                KIND_UNLINK => out.push(CaptureEvent::Removed {
                    path: path0()?,
                    is_dir: r.flags & AT_REMOVEDIR != 0,
                }),
                KIND_RENAME => out.push(CaptureEvent::Renamed {
                    from: path0()?,
                    to: path1()?,
                    flags: r.flags,
                }),
                KIND_ATTR => {
                    let (file, parent, path) = if r.npaths == 0 {
                        (Some(file_id(r.file)), Some(file_id(r.parent)), None)
                    } else {
                        (None, None, Some(path0()?))
                    };
                    out.push(CaptureEvent::AttrChanged {
                        file,
                        parent,
                        path,
                        xattrs: r.flags & ATTR_XATTR != 0,
                        follow: r.flags & ATTR_NOFOLLOW == 0,
                    })
                }
                KIND_LINK => out.push(CaptureEvent::Linked {
                    from: path0()?,
                    to: path1()?,
                }),
                KIND_MADE => out.push(CaptureEvent::Made { path: path0()? }),
                KIND_FALLOC => out.push(CaptureEvent::Fallocated {
                    file: file_id(r.file),
                    parent: file_id(r.parent),
                    mode: r.flags,
                    offset: r.offset,
                    len: r.size,
                }),
                KIND_MAPPED => out.push(CaptureEvent::Mapped {
                    file: file_id(r.file),
                    parent: file_id(r.parent),
                    offset: r.offset,
                    len: r.size,
                }),
                KIND_TRUNCATE => out.push(CaptureEvent::Truncated {
                    file: None,
                    parent: None,
                    path: Some(path0()?),
                    size: r.size,
                }),
                _ => out.push(CaptureEvent::Truncated {
                    file: Some(file_id(r.file)),
                    parent: Some(file_id(r.parent)),
                    path: None,
                    size: r.size,
                }),
            }
        }
        other => return Err(DecodeError::UnknownKind(other)),
    }
    Ok(())
}

/// A drained `MISSED_RANGES` entry -> `Dirty` (the directory is unknown).
pub fn missed_to_event(key: &MissedKey, range: &MissedRange) -> CaptureEvent {
    CaptureEvent::Dirty {
        file: file_id(key.file),
        parent: None,
        offset: range.start,
        len: range.end.saturating_sub(range.start),
    }
}

/// Appends `fresh` missed-range events to `held`, a batch the consumer has not taken
/// yet. A file that already has a missed range waiting there gets one event, the union,
/// at the end: while the agent is behind, a write storm on a big file costs one re-read
/// of it per batch the consumer takes, not one per drain period (the kernel's range is
/// per file and drain generation, so a random-write storm makes each one the whole file).
/// Moving the re-read later is safe: it reads the file as it is then, as a later drain
/// would have.
pub fn coalesce_missed(held: &mut Vec<Captured>, fresh: Vec<Captured>) {
    if held.is_empty() {
        held.extend(fresh);
        return;
    }
    let mut union: std::collections::HashMap<FileId, (u64, u64, u64)> = fresh
        .iter()
        .filter_map(|c| match c.event {
            CaptureEvent::Dirty {
                file,
                parent: None,
                offset,
                len,
            } => Some((file, (offset, offset.saturating_add(len), c.time))),
            _ => None,
        })
        .collect();
    held.retain(|c| match c.event {
        CaptureEvent::Dirty {
            file,
            parent: None,
            offset,
            len,
        } => match union.get_mut(&file) {
            Some((start, end, _)) => {
                *start = (*start).min(offset);
                *end = (*end).max(offset.saturating_add(len));
                false
            }
            None => true,
        },
        _ => true,
    });
    for c in fresh {
        match c.event {
            CaptureEvent::Dirty {
                file, parent: None, ..
            } => {
                if let Some((start, end, time)) = union.remove(&file) {
                    held.push(Captured {
                        time,
                        event: CaptureEvent::Dirty {
                            file,
                            parent: None,
                            offset: start,
                            len: end - start,
                        },
                    });
                }
            }
            _ => held.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn missed(file: u64, offset: u64, len: u64, time: u64) -> Captured {
        Captured {
            time,
            event: CaptureEvent::Dirty {
                file: FileId { dev: 1, ino: file },
                parent: None,
                offset,
                len,
            },
        }
    }

    #[test]
    fn missed_ranges_of_a_held_batch_merge_into_one_at_the_end() {
        let other = Captured {
            time: 2,
            event: CaptureEvent::Lost { records: 1 },
        };
        let mut held = vec![missed(7, 100, 10, 1), other.clone(), missed(8, 0, 5, 1)];
        coalesce_missed(&mut held, vec![missed(7, 0, 50, 3), missed(9, 4, 4, 3)]);
        assert_eq!(
            held,
            vec![
                other.clone(),
                missed(8, 0, 5, 1),
                missed(7, 0, 110, 3),
                missed(9, 4, 4, 3)
            ]
        );
        // Nothing held: appended as they are.
        let mut empty = Vec::new();
        coalesce_missed(&mut empty, vec![missed(7, 0, 1, 5), missed(7, 9, 1, 5)]);
        assert_eq!(empty.len(), 2);
    }
    use doppel_common::abi::Header;
    use doppel_common::abi::WRITEBACK_BEGIN;

    fn as_bytes<T: Copy>(v: &T) -> Vec<u8> {
        // SAFETY: test helper over plain-integer repr(C) structs without padding holes
        // that matter (the bytes are only fed back to the decoder).
        unsafe {
            std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>())
        }
        .to_vec()
    }

    const KDEV: u64 = (8 << 20) | 3; // /dev/sda3 in kernel encoding

    fn kid(ino: u64) -> KFileId {
        KFileId { dev: KDEV, ino }
    }

    #[test]
    fn dev_encodings_round_trip() {
        let user = kernel_dev_to_user(KDEV);
        assert_eq!(user, libc::makedev(8, 3));
        assert_eq!(user_dev_to_kernel(user), Some(KDEV));
        // Large minor numbers use the high glibc bits.
        let big = (259 << 20) | 0x12345;
        assert_eq!(user_dev_to_kernel(kernel_dev_to_user(big)), Some(big));
        assert_eq!(user_dev_to_kernel(libc::makedev(5000, 1)), None);
    }

    #[test]
    fn decodes_data_and_dirty() {
        let rec = FileRecord {
            hdr: Header {
                kind: KIND_DATA,
                pid: 42,
                ktime: 5,
            },
            file: kid(10),
            parent: kid(2),
            offset: 4096,
            len: 5,
        };
        let mut bytes = as_bytes(&rec);
        bytes.extend_from_slice(b"hello");
        let mut out = Vec::new();
        decode_record(&bytes, &mut out).unwrap();
        let file = FileId {
            dev: libc::makedev(8, 3),
            ino: 10,
        };
        let parent = FileId {
            dev: libc::makedev(8, 3),
            ino: 2,
        };
        assert_eq!(
            out,
            vec![CaptureEvent::Data {
                file,
                parent,
                offset: 4096,
                data: b"hello".to_vec()
            }]
        );

        // Claims more data than present: an error, not a panic.
        bytes.truncate(bytes.len() - 1);
        assert!(matches!(
            decode_record(&bytes, &mut out),
            Err(DecodeError::Short { .. })
        ));

        let dirty = FileRecord {
            hdr: Header {
                kind: KIND_DIRTY,
                pid: 1,
                ktime: 0,
            },
            len: 1 << 20,
            ..rec
        };
        out.clear();
        decode_record(&as_bytes(&dirty), &mut out).unwrap();
        assert_eq!(
            out,
            vec![CaptureEvent::Dirty {
                file,
                parent: Some(parent),
                offset: 4096,
                len: 1 << 20
            }]
        );
    }

    fn ns(kind: u32, flags: u32) -> NsRecord {
        NsRecord {
            hdr: Header {
                kind,
                pid: 7,
                ktime: 0,
            },
            flags,
            mode: 0o100644,
            file: kid(11),
            parent: kid(2),
            size: 123,
            offset: 0,
            npaths: 1,
            _pad: 0,
            paths: [
                PathSlot {
                    base: kid(2),
                    dirfd: -100,
                    len: 3,
                    truncated: 0,
                    has_base: 1,
                },
                PathSlot {
                    base: KFileId::default(),
                    dirfd: 5,
                    len: 6,
                    truncated: 1,
                    has_base: 0,
                },
            ],
        }
    }

    #[test]
    fn decodes_namespace_records() {
        let user = |ino| FileId {
            dev: libc::makedev(8, 3),
            ino,
        };
        let rel = PathArg {
            base: Some(user(2)),
            pid: 7,
            dirfd: -100,
            path: b"a/b".to_vec(),
            truncated: false,
        };

        // creat(): O_CREAT | O_TRUNC -> Created + Truncated.
        let mut bytes = as_bytes(&ns(KIND_OPEN, O_CREAT | O_TRUNC | 1));
        bytes.extend_from_slice(b"a/b");
        let mut out = Vec::new();
        decode_record(&bytes, &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                CaptureEvent::Created {
                    file: Some(user(11)),
                    parent: Some(user(2)),
                    path: rel.clone(),
                    is_dir: false,
                    mode: 0o644
                },
                CaptureEvent::Truncated {
                    file: Some(user(11)),
                    parent: Some(user(2)),
                    path: None,
                    size: 0
                },
            ]
        );

        let mut bytes = as_bytes(&ns(KIND_UNLINK, AT_REMOVEDIR));
        bytes.extend_from_slice(b"a/b");
        out.clear();
        decode_record(&bytes, &mut out).unwrap();
        assert_eq!(
            out,
            vec![CaptureEvent::Removed {
                path: rel.clone(),
                is_dir: true
            }]
        );

        // rename: path 1 sits at NS_RECORD_SIZE + PATH_CAP.
        let mut r = ns(KIND_RENAME, 1);
        r.npaths = 2;
        let mut bytes = as_bytes(&r);
        bytes.extend_from_slice(b"a/b");
        bytes.resize(NS_RECORD_SIZE + PATH_CAP, 0);
        bytes.extend_from_slice(b"/x/y/z");
        out.clear();
        decode_record(&bytes, &mut out).unwrap();
        assert_eq!(
            out,
            vec![CaptureEvent::Renamed {
                from: rel.clone(),
                to: PathArg {
                    base: None,
                    pid: 7,
                    dirfd: 5,
                    path: b"/x/y/z".to_vec(),
                    truncated: true
                },
                flags: 1
            }]
        );
        // Target path cut off.
        bytes.truncate(bytes.len() - 2);
        assert!(decode_record(&bytes, &mut out).is_err());

        let mut bytes = as_bytes(&ns(KIND_TRUNCATE, 0));
        bytes.extend_from_slice(b"a/b");
        out.clear();
        decode_record(&bytes, &mut out).unwrap();
        assert_eq!(
            out,
            vec![CaptureEvent::Truncated {
                file: None,
                parent: None,
                path: Some(rel),
                size: 123
            }]
        );

        let mut r = ns(KIND_FTRUNCATE, 0);
        r.npaths = 0;
        out.clear();
        decode_record(&as_bytes(&r), &mut out).unwrap();
        assert_eq!(
            out,
            vec![CaptureEvent::Truncated {
                file: Some(user(11)),
                parent: Some(user(2)),
                path: None,
                size: 123
            }]
        );
    }

    #[test]
    fn decodes_attribute_link_and_fallocate_records() {
        let user = |ino| FileId {
            dev: libc::makedev(8, 3),
            ino,
        };
        let rel = PathArg {
            base: Some(user(2)),
            pid: 7,
            dirfd: -100,
            path: b"a/b".to_vec(),
            truncated: false,
        };
        let mut out = Vec::new();
        // fchmod: fd-based, no path.
        let mut r = ns(KIND_ATTR, 0);
        r.npaths = 0;
        decode_record(&as_bytes(&r), &mut out).unwrap();
        // lsetxattr: path-based, xattrs, not following.
        let mut bytes = as_bytes(&ns(KIND_ATTR, ATTR_XATTR | ATTR_NOFOLLOW));
        bytes.extend_from_slice(b"a/b");
        decode_record(&bytes, &mut out).unwrap();
        // link: both paths.
        let mut r = ns(KIND_LINK, 0);
        r.npaths = 2;
        let mut bytes = as_bytes(&r);
        bytes.extend_from_slice(b"a/b");
        bytes.resize(NS_RECORD_SIZE + PATH_CAP, 0);
        bytes.extend_from_slice(b"/x/y/z");
        decode_record(&bytes, &mut out).unwrap();
        let mut bytes = as_bytes(&ns(KIND_MADE, 0));
        bytes.extend_from_slice(b"a/b");
        decode_record(&bytes, &mut out).unwrap();
        let mut r = ns(KIND_FALLOC, 0x03);
        r.npaths = 0;
        r.offset = 4096;
        decode_record(&as_bytes(&r), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                CaptureEvent::AttrChanged {
                    file: Some(user(11)),
                    parent: Some(user(2)),
                    path: None,
                    xattrs: false,
                    follow: true
                },
                CaptureEvent::AttrChanged {
                    file: None,
                    parent: None,
                    path: Some(rel.clone()),
                    xattrs: true,
                    follow: false
                },
                CaptureEvent::Linked {
                    from: rel.clone(),
                    to: PathArg {
                        base: None,
                        pid: 7,
                        dirfd: 5,
                        path: b"/x/y/z".to_vec(),
                        truncated: true
                    },
                },
                CaptureEvent::Made { path: rel },
                CaptureEvent::Fallocated {
                    file: user(11),
                    parent: user(2),
                    mode: 0x03,
                    offset: 4096,
                    len: 123
                },
            ]
        );
    }

    #[test]
    fn decodes_mapping_records() {
        let user = |ino| FileId {
            dev: libc::makedev(8, 3),
            ino,
        };
        let page = |kind, len| FileRecord {
            hdr: Header {
                kind,
                pid: 3,
                ktime: 9,
            },
            file: kid(10),
            parent: kid(2),
            offset: 8192,
            len,
        };
        let mut out = Vec::new();
        decode_record(&as_bytes(&page(KIND_MAP_DIRTY, 16384)), &mut out).unwrap();
        decode_record(&as_bytes(&page(KIND_WRITEBACK, WRITEBACK_BEGIN)), &mut out).unwrap();
        decode_record(&as_bytes(&page(KIND_WRITEBACK, WRITEBACK_END)), &mut out).unwrap();
        let mut r = ns(KIND_MAPPED, 0);
        r.npaths = 0;
        r.offset = 4096;
        decode_record(&as_bytes(&r), &mut out).unwrap();
        assert_eq!(
            out,
            vec![
                CaptureEvent::MapDirty {
                    file: user(10),
                    parent: user(2),
                    offset: 8192,
                    len: 16384
                },
                CaptureEvent::Writeback {
                    file: user(10),
                    end: false
                },
                CaptureEvent::Writeback {
                    file: user(10),
                    end: true
                },
                CaptureEvent::Mapped {
                    file: user(11),
                    parent: user(2),
                    offset: 4096,
                    len: 123
                },
            ]
        );
    }

    #[test]
    fn rejects_malformed_records() {
        let mut out = Vec::new();
        assert!(decode_record(&[], &mut out).is_err());
        assert!(decode_record(&[1, 0, 0, 0], &mut out).is_err());
        assert_eq!(
            decode_record(&[99, 0, 0, 0, 0, 0, 0, 0], &mut out),
            Err(DecodeError::UnknownKind(99))
        );
        let mut r = ns(KIND_MKDIR, 0);
        r.paths[0].len = u16::MAX;
        assert!(decode_record(&as_bytes(&r), &mut out).is_err());
        let big = FileRecord {
            hdr: Header {
                kind: KIND_DATA,
                pid: 1,
                ktime: 0,
            },
            len: u64::MAX,
            ..Default::default()
        };
        assert!(decode_record(&as_bytes(&big), &mut out).is_err());
        assert!(out.is_empty());
    }

    #[test]
    fn missed_range_becomes_dirty() {
        let key = MissedKey {
            file: kid(9),
            gen: 3,
        };
        let ev = missed_to_event(
            &key,
            &MissedRange {
                start: 100,
                end: 300,
            },
        );
        assert_eq!(
            ev,
            CaptureEvent::Dirty {
                file: FileId {
                    dev: libc::makedev(8, 3),
                    ino: 9
                },
                parent: None,
                offset: 100,
                len: 200
            }
        );
    }
}
