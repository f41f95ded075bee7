//! Seed inputs for each target: valid encodings (so the fuzzer starts from deep inside
//! the decoders) and a few near misses. Written to `corpus/` by the `seeds_are_committed`
//! test.

use doppel_common::abi::{
    FileRecord, Header, KFileId, NsRecord, PathSlot, AT_REMOVEDIR, KIND_ATTR, KIND_DATA,
    KIND_DIRTY, KIND_FALLOC, KIND_FTRUNCATE, KIND_LINK, KIND_MADE, KIND_MAPPED, KIND_MAP_DIRTY,
    KIND_MKDIR, KIND_OPEN, KIND_RENAME, KIND_TRUNCATE, KIND_UNLINK, KIND_WRITEBACK, O_CREAT,
    O_TRUNC, PATH_CAP, WRITEBACK_END,
};
use doppel_common::wire::{encode_frame, Frame, Op, PriorMark, Record, RelPath, SetHello};

/// (target, seed name, bytes).
pub fn all() -> Vec<(&'static str, &'static str, Vec<u8>)> {
    let mut out = Vec::new();
    for (name, bytes) in wire() {
        out.push(("wire_frames", name, bytes));
    }
    for (name, bytes) in capture() {
        out.push(("capture_records", name, bytes));
    }
    for (name, path) in [
        ("plain", &b"a/b/c.txt"[..]),
        ("dots", b"a..b/.c/d."),
        ("escape", b"a/../../x"),
        ("absolute", b"/etc/passwd"),
        ("nul", b"a\0b"),
        ("double-slash", b"a//b/"),
    ] {
        out.push(("receiver_apply_paths", name, path.to_vec()));
    }
    for (name, bytes) in journal() {
        out.push(("journal_records", name, bytes));
    }
    for (name, bytes) in namespace() {
        out.push(("namespace_events", name, bytes));
    }
    out
}

fn namespace() -> Vec<(&'static str, Vec<u8>)> {
    use doppel_agent::capture::fanotify::encode::{
        dir_name as fan_info, event as fan_event, DFID_NAME, NEW_DFID_NAME, OLD_DFID_NAME,
    };
    const CREATE: u64 = 0x100;
    const DELETE: u64 = 0x200;
    const ATTRIB: u64 = 0x4;
    const RENAME: u64 = 0x1000_0000;
    const ONDIR: u64 = 0x4000_0000;
    const OVERFLOW: u64 = 0x4000;
    let mut all = fan_event(CREATE, &[fan_info(DFID_NAME, 5, b"a")]);
    all.extend(fan_event(
        RENAME | ONDIR,
        &[
            fan_info(OLD_DFID_NAME, 5, b"a"),
            fan_info(NEW_DFID_NAME, 6, b"b"),
        ],
    ));
    all.extend(fan_event(
        CREATE | DELETE | ATTRIB,
        &[fan_info(DFID_NAME, 6, b"c")],
    ));
    all.extend(fan_event(ATTRIB | ONDIR, &[fan_info(DFID_NAME, 6, b".")]));
    all.extend(fan_event(OVERFLOW, &[]));
    vec![
        (
            "create",
            fan_event(CREATE, &[fan_info(DFID_NAME, 5, b"name")]),
        ),
        ("sequence", all),
        (
            "dotdot",
            fan_event(DELETE, &[fan_info(DFID_NAME, 5, b"..")]),
        ),
    ]
}

fn journal() -> Vec<(&'static str, Vec<u8>)> {
    let mut log = Vec::new();
    for f in frames() {
        if let Frame::Batch { records, .. } = f {
            for r in &records {
                doppel_agent::journal::encode_record(r, &mut log).unwrap();
            }
        }
    }
    let with = |mode: u8, body: &[u8]| [&[mode][..], body].concat();
    let mut bad_crc = log.clone();
    bad_crc[5] ^= 0xff;
    vec![
        ("records", with(0, &log)),
        ("records-fix-crc", with(1, &bad_crc)),
        ("bad-crc", with(0, &bad_crc)),
        ("torn", with(0, &log[..log.len() - 5])),
        ("zeroes", with(0, &[0; 64])),
    ]
}

fn p(s: &[u8]) -> RelPath {
    RelPath(s.to_vec())
}

pub fn ack(seq: u64) -> Frame {
    Frame::Ack {
        set: "data".into(),
        seq,
    }
}

fn frames() -> Vec<Frame> {
    let ops = vec![
        Op::Write {
            path: p(b"dir/f"),
            offset: 4096,
            data: b"hello".to_vec().into(),
        },
        Op::Truncate {
            path: p(b"dir/f"),
            size: 1 << 40,
        },
        Op::CreateFile {
            path: p(b"g"),
            mode: 0o644,
        },
        Op::Mkdir {
            path: p(b"dir/sub"),
            mode: 0o755,
        },
        Op::Remove { path: p(b"g") },
        Op::Rmdir {
            path: p(b"dir/sub"),
        },
        Op::Rename {
            from: p(b"dir/f"),
            to: p(b"h"),
            flags: 1,
        },
        Op::Sum {
            path: p(b"h"),
            job: 3,
            file: [1, 2],
            size: 200_000,
            offset: 65536,
            block: 65536,
            sums: vec![1, 2],
            attr: None,
        },
        Op::Prune {
            dir: Some(p(b"dir")),
            keep: vec![p(b"f")],
        },
        Op::List {
            dir: None,
            keep: vec![p(b"dir"), p(b"h")],
            job: 3,
        },
    ];
    vec![
        Frame::Hello {
            version: 1,
            source: "web1".into(),
            sets: vec![SetHello {
                name: "data".into(),
                epoch: 7,
            }],
        },
        Frame::Welcome {
            version: 2,
            applied: vec![("data".into(), 3)],
            resync: vec!["data".into()],
            empty: vec!["data".into()],
            prior: vec![PriorMark {
                set: "data".into(),
                epoch: 5,
                applied: 9,
            }],
        },
        Frame::Batch {
            set: "data".into(),
            records: ops
                .into_iter()
                .enumerate()
                .map(|(i, op)| Record {
                    seq: i as u64 + 1,
                    op,
                })
                .collect(),
        },
        ack(u64::MAX),
        Frame::Need {
            set: "data".into(),
            job: 0,
            file: [1, 2],
            path: p(b"h"),
            ranges: vec![(65536, 65536)],
            fine_block: 1024,
            fine: vec![vec![1, 2, 3]],
            missing: false,
            attr: true,
            listing: false,
            extra: false,
        },
        Frame::Refused {
            reason: "bye".into(),
        },
    ]
}

fn wire() -> Vec<(&'static str, Vec<u8>)> {
    let stream: Vec<u8> = frames().iter().flat_map(encode_frame).collect();
    let hostile = encode_frame(&Frame::Batch {
        set: "data".into(),
        records: [&b"../x"[..], b"/etc/passwd", b"a\0b", b"a/../../x"]
            .iter()
            .enumerate()
            .map(|(i, path)| Record {
                seq: i as u64 + 1,
                op: Op::Write {
                    path: p(path),
                    offset: u64::MAX - 1,
                    data: vec![0xaa; 3].into(),
                },
            })
            .collect(),
    });
    let with = |prefix: &[u8], body: &[u8]| [prefix, body].concat();
    vec![
        ("all-frames-whole", with(&[0], &stream)),
        ("all-frames-chunked", with(&[3, 0, 6, 2], &stream)),
        ("hostile-paths", with(&[1, 4], &hostile)),
        ("truncated", with(&[0], &stream[..stream.len() - 3])),
        ("too-large", with(&[0], &u32::MAX.to_le_bytes())),
        (
            "garbage",
            with(&[0], &[5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff]),
        ),
    ]
}

fn kid(ino: u64) -> KFileId {
    KFileId {
        dev: (8 << 20) | 3,
        ino,
    }
}

fn hdr(kind: u32) -> Header {
    Header {
        kind,
        pid: 42,
        ktime: 5,
    }
}

// The ABI structs have no padding (their sizes are pinned in abi.rs), so field by field
// in native order is exactly their memory image.
fn put_id(b: &mut Vec<u8>, k: KFileId) {
    b.extend_from_slice(&k.dev.to_ne_bytes());
    b.extend_from_slice(&k.ino.to_ne_bytes());
}

fn put_hdr(b: &mut Vec<u8>, h: Header) {
    b.extend_from_slice(&h.kind.to_ne_bytes());
    b.extend_from_slice(&h.pid.to_ne_bytes());
    b.extend_from_slice(&h.ktime.to_ne_bytes());
}

fn file_record(r: FileRecord, data: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    put_hdr(&mut b, r.hdr);
    put_id(&mut b, r.file);
    put_id(&mut b, r.parent);
    b.extend_from_slice(&r.offset.to_ne_bytes());
    b.extend_from_slice(&r.len.to_ne_bytes());
    assert_eq!(b.len(), doppel_common::abi::FILE_RECORD_SIZE);
    b.extend_from_slice(data);
    b
}

fn ns_record(r: NsRecord, path0: &[u8], path1: Option<&[u8]>) -> Vec<u8> {
    let mut b = Vec::new();
    put_hdr(&mut b, r.hdr);
    b.extend_from_slice(&r.flags.to_ne_bytes());
    b.extend_from_slice(&r.mode.to_ne_bytes());
    put_id(&mut b, r.file);
    put_id(&mut b, r.parent);
    b.extend_from_slice(&r.size.to_ne_bytes());
    b.extend_from_slice(&r.offset.to_ne_bytes());
    b.extend_from_slice(&r.npaths.to_ne_bytes());
    b.extend_from_slice(&r._pad.to_ne_bytes());
    for s in r.paths {
        put_id(&mut b, s.base);
        b.extend_from_slice(&s.dirfd.to_ne_bytes());
        b.extend_from_slice(&s.len.to_ne_bytes());
        b.extend_from_slice(&[s.truncated, s.has_base]);
    }
    assert_eq!(b.len(), doppel_common::abi::NS_RECORD_SIZE);
    let at = b.len();
    b.extend_from_slice(path0);
    if let Some(p1) = path1 {
        b.resize(at + PATH_CAP, 0);
        b.extend_from_slice(p1);
    }
    b
}

fn ns(kind: u32, flags: u32, path0: &[u8], path1: Option<&[u8]>) -> Vec<u8> {
    let slot = |path: &[u8], has_base| PathSlot {
        base: kid(2),
        dirfd: -100,
        len: path.len() as u16,
        truncated: 0,
        has_base,
    };
    let r = NsRecord {
        hdr: hdr(kind),
        flags,
        mode: 0o100644,
        file: kid(11),
        parent: kid(2),
        size: 123,
        offset: 4096,
        npaths: 1 + u32::from(path1.is_some()),
        _pad: 0,
        paths: [slot(path0, 1), slot(path1.unwrap_or_default(), 0)],
    };
    ns_record(r, path0, path1)
}

fn capture() -> Vec<(&'static str, Vec<u8>)> {
    let data = FileRecord {
        hdr: hdr(KIND_DATA),
        file: kid(10),
        parent: kid(2),
        offset: 4096,
        len: 5,
    };
    let dirty = FileRecord {
        hdr: hdr(KIND_DIRTY),
        len: 1 << 20,
        ..data
    };
    vec![
        ("data", file_record(data, b"hello")),
        ("dirty", file_record(dirty, b"")),
        ("creat", ns(KIND_OPEN, O_CREAT | O_TRUNC | 1, b"a/b", None)),
        ("mkdir", ns(KIND_MKDIR, 0, b"/abs/dir", None)),
        ("rmdir", ns(KIND_UNLINK, AT_REMOVEDIR, b"d", None)),
        ("rename", ns(KIND_RENAME, 1, b"a/b", Some(b"/x/y/z"))),
        ("truncate", ns(KIND_TRUNCATE, 0, b"f", None)),
        ("ftruncate", ns(KIND_FTRUNCATE, 0, b"", None)),
        ("chmod", ns(KIND_ATTR, 0, b"f", None)),
        ("lsetxattr", ns(KIND_ATTR, 3, b"/abs/f", None)),
        ("link", ns(KIND_LINK, 0, b"a", Some(b"b/c"))),
        ("symlink", ns(KIND_MADE, 0, b"l", None)),
        ("fallocate", ns(KIND_FALLOC, 0x03, b"", None)),
        ("mapped", ns(KIND_MAPPED, 0, b"", None)),
        (
            "map_dirty",
            file_record(
                FileRecord {
                    hdr: hdr(KIND_MAP_DIRTY),
                    len: 4096,
                    ..data
                },
                b"",
            ),
        ),
        (
            "writeback",
            file_record(
                FileRecord {
                    hdr: hdr(KIND_WRITEBACK),
                    len: WRITEBACK_END,
                    ..data
                },
                b"",
            ),
        ),
    ]
}
