//! The checks behind doppel's fuzz targets, one function per target (`fuzz_targets/*.rs`
//! only call them), plus the seed corpus in `corpus/<target>/`.
//!
//! A check panics when an invariant breaks; libFuzzer reports that as a crash. `cargo test`
//! (stable, in this directory) replays every committed corpus file through its check, so
//! a crash input kept as a regression seed fails the tests until the bug is fixed.

use doppel_agent::capture::decode::{decode_record, record_time};
use doppel_agent::journal::{decode_records, encode_record};
use doppel_common::abi::{CHUNK_SIZE, PATH_CAP};
use doppel_common::event::CaptureEvent;
use doppel_common::wire::{encode_frame, Frame, FrameDecoder, RelPath, WireError, MAX_PATH};
use doppel_receiver::beneath;

pub mod seeds;

/// Every fuzz target, as named in Cargo.toml and `corpus/`.
pub const TARGETS: &[&str] = &[
    "wire_frames",
    "capture_records",
    "receiver_apply_paths",
    "journal_records",
    "namespace_events",
];

/// Runs the check of `target` on `data`.
pub fn check(target: &str, data: &[u8]) {
    match target {
        "wire_frames" => wire_frames(data),
        "capture_records" => capture_records(data),
        "receiver_apply_paths" => receiver_apply_paths(data),
        "journal_records" => journal_records(data),
        "namespace_events" => namespace_events(data),
        other => panic!("unknown fuzz target {other}"),
    }
}

/// Input: `[n & 7][n chunk sizes (byte + 1 each, cycled)][stream]`; with no chunk sizes
/// the stream is pushed in one piece.
///
/// - Decoding does not panic, and the chunking does not change what is decoded.
/// - Every decoded frame re-encodes to at most the bytes it came from and decodes to
///   itself from exactly those bytes.
/// - Path validation of every op does not panic and agrees with the path model.
pub fn wire_frames(data: &[u8]) {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n & 7).min(rest.len());
    let (sizes, stream) = rest.split_at(n);
    let sizes: Vec<usize> = sizes.iter().map(|&b| usize::from(b) + 1).collect();

    let chunked = decode_stream(stream, &sizes);
    let whole = decode_stream(stream, &[]);
    assert_eq!(chunked, whole, "chunking changed the decoded stream");

    for frame in &chunked.frames {
        let bytes = encode_frame(frame);
        let mut dec = FrameDecoder::new();
        dec.push(&bytes);
        assert_eq!(
            dec.next_frame(),
            Ok(Some(frame.clone())),
            "re-encoded frame"
        );
        assert_eq!(dec.buffered(), 0, "re-encoded frame left bytes over");
        if let Frame::Batch { records, .. } = frame {
            for p in records.iter().flat_map(|r| r.op.paths()) {
                check_path(p);
            }
        }
    }
    // No size comparison with the input: a Compressed frame decodes to its inner frame,
    // whose plain encoding is legitimately larger than the compressed bytes.
}

#[derive(Debug, PartialEq)]
struct Decoded {
    frames: Vec<Frame>,
    error: Option<WireError>,
    /// Bytes left in the decoder when the stream ended without an error.
    left: usize,
}

fn decode_stream(mut stream: &[u8], sizes: &[usize]) -> Decoded {
    let mut dec = FrameDecoder::new();
    let mut frames = Vec::new();
    let mut i = 0;
    loop {
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => frames.push(f),
                Ok(None) => break,
                Err(e) => {
                    return Decoded {
                        frames,
                        error: Some(e),
                        left: 0,
                    }
                }
            }
        }
        if stream.is_empty() {
            let left = dec.buffered();
            return Decoded {
                frames,
                error: None,
                left,
            };
        }
        let n = match sizes {
            [] => stream.len(),
            s => s[i % s.len()].min(stream.len()),
        };
        dec.push(&stream[..n]);
        stream = &stream[n..];
        i += 1;
    }
}

/// `decode_record` on a ring record: no panic; an error adds no event; what it decodes
/// stays within the ABI's caps.
pub fn capture_records(data: &[u8]) {
    let _ = record_time(data);
    let mut out = Vec::new();
    match decode_record(data, &mut out) {
        Err(_) => assert!(out.is_empty(), "a failed decode added events: {out:?}"),
        Ok(()) => {
            assert!(out.len() <= 2, "one record gave {} events", out.len());
            for ev in &out {
                match ev {
                    CaptureEvent::Data { data: d, .. } => {
                        assert!(d.len() <= CHUNK_SIZE && d.len() <= data.len())
                    }
                    CaptureEvent::Created { path, .. } | CaptureEvent::Removed { path, .. } => {
                        assert!(path.path.len() < PATH_CAP)
                    }
                    CaptureEvent::Renamed { from, to, .. } => {
                        assert!(from.path.len() < PATH_CAP && to.path.len() < PATH_CAP)
                    }
                    CaptureEvent::Truncated { path: Some(p), .. } => {
                        assert!(p.path.len() < PATH_CAP)
                    }
                    _ => {}
                }
            }
        }
    }
}

/// fanotify's event stream (`capture::fanotify::parse`): no panic, every name is one
/// name in a directory (no slash, not ".."), and no more events than the buffer's
/// metadata records could carry (three per record at most, merged bits).
pub fn namespace_events(data: &[u8]) {
    let inode = |_fsid: [i32; 2], _ty: i32, h: &[u8]| {
        Some(doppel_common::event::FileId {
            dev: 1,
            ino: h.first().copied().unwrap_or(0) as u64,
        })
    };
    let mut events = Vec::new();
    let seen = doppel_agent::capture::fanotify::parse(data, &inode, &mut |e| events.push(e));
    assert!(seen <= data.len() / 24);
    assert!(
        events.len() <= 3 * seen,
        "{} events from {seen} records",
        events.len()
    );
    for e in &events {
        let names: Vec<&[u8]> = match e {
            CaptureEvent::Entry { name, .. } => vec![name],
            CaptureEvent::Moved {
                from_name, to_name, ..
            } => vec![from_name, to_name],
            _ => vec![],
        };
        for n in names {
            assert!(!n.contains(&b'/') && n != b"..", "bad name {n:?}");
        }
    }
}

/// Input: `[mode][journal bytes]`. With `mode & 1` the checksum of every record the
/// length fields lay out is fixed first, so that the fuzzer gets past the CRC to the
/// payload decoder.
///
/// - `decode_records` does not panic; it stops exactly where its error says, or at the
///   end of the input.
/// - The decoded records re-encode to at most the bytes they came from, and those
///   bytes decode to the same records with no error.
pub fn journal_records(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let mut bytes = rest.to_vec();
    if mode & 1 != 0 {
        fix_checksums(&mut bytes);
    }
    let (records, used, err) = decode_records(&bytes);
    match &err {
        None => assert_eq!(used, bytes.len(), "clean end before the end"),
        Some(e) => assert_eq!(e.offset(), used, "error offset {e}"),
    }
    let mut again = Vec::new();
    for r in &records {
        encode_record(r, &mut again).expect("a decoded record fits");
    }
    assert!(
        again.len() <= used,
        "re-encoding grew: {} > {used}",
        again.len()
    );
    let (decoded, n, e) = decode_records(&again);
    assert_eq!((decoded, n, e), (records, again.len(), None));
}

fn fix_checksums(b: &mut [u8]) {
    let mut pos = 0;
    while let Some(h) = b.get(pos..pos + 8) {
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let end = pos + 8 + len;
        if len == 0 || end > b.len() {
            return;
        }
        let crc = crc32c::crc32c(&b[pos + 8..end]);
        b[pos + 4..pos + 8].copy_from_slice(&crc.to_le_bytes());
        pos = end;
    }
}

/// The input is a path as an agent could send it: `RelPath::validate` agrees with a
/// model built on `std::path`, and for an accepted path the receiver's `beneath::split`
/// and `beneath::prefixes` only ever yield valid parents and single plain components.
pub fn receiver_apply_paths(data: &[u8]) {
    check_path(&RelPath(data.to_vec()));
}

fn check_path(p: &RelPath) {
    let valid = p.validate().is_ok();
    assert_eq!(valid, path_model(&p.0), "validate() disagrees for {p:?}");
    if !valid {
        return;
    }
    let plain = |c: &[u8]| !c.is_empty() && c != b"." && c != b".." && !c.contains(&b'/');

    let (parent, name) = beneath::split(&p.0);
    assert!(plain(name), "split of {p:?} gave name {name:?}");
    match parent {
        Some(dir) => {
            assert!(RelPath(dir.to_vec()).validate().is_ok(), "parent of {p:?}");
            assert_eq!([dir, b"/", name].concat(), p.0);
        }
        None => assert_eq!(name, &p.0[..]),
    }

    let mut last = None;
    for (prefix, component) in beneath::prefixes(&p.0) {
        assert!(plain(component), "prefixes of {p:?} gave {component:?}");
        assert!(RelPath(prefix.to_vec()).validate().is_ok());
        assert!(prefix.ends_with(component) && p.0.starts_with(prefix));
        last = Some(prefix);
    }
    assert_eq!(
        last,
        Some(&p.0[..]),
        "prefixes of {p:?} end at the path itself"
    );
}

/// Independent statement of the rule: a non-empty, NUL-free path of at most MAX_PATH bytes
/// whose every `/`-separated piece `std::path` sees as a normal component (so none are
/// dropped: no `//`, trailing `/` or `.`).
fn path_model(b: &[u8]) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::path::{Component, Path};
    if b.is_empty() || b.len() > MAX_PATH || b.contains(&0) {
        return false;
    }
    let pieces = b.iter().filter(|&&c| c == b'/').count() + 1;
    let comps: Vec<_> = Path::new(std::ffi::OsStr::from_bytes(b))
        .components()
        .collect();
    comps.len() == pieces && comps.iter().all(|c| matches!(c, Component::Normal(_)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    fn corpus() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("corpus")
    }

    /// Writes the seeds into `corpus/` (once per test run) when
    /// `DOPPEL_FUZZ_WRITE_SEEDS` is set.
    fn write_seeds_if_asked() {
        static ONCE: std::sync::Once = std::sync::Once::new();
        if std::env::var_os("DOPPEL_FUZZ_WRITE_SEEDS").is_none() {
            return;
        }
        ONCE.call_once(|| {
            for (target, name, bytes) in seeds::all() {
                let dir = corpus().join(target);
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(dir.join(format!("seed-{name}")), bytes).unwrap();
            }
        });
    }

    /// The generated seeds are committed. `DOPPEL_FUZZ_WRITE_SEEDS=1 cargo test` writes
    /// them after a change to the seeds or to the encodings.
    #[test]
    fn seeds_are_committed() {
        write_seeds_if_asked();
        for (target, name, bytes) in seeds::all() {
            let file = corpus().join(target).join(format!("seed-{name}"));
            let committed = std::fs::read(&file).unwrap_or_else(|e| {
                panic!(
                    "{}: {e}; run DOPPEL_FUZZ_WRITE_SEEDS=1 cargo test",
                    file.display()
                )
            });
            assert_eq!(committed, bytes, "{} is stale", file.display());
        }
    }

    /// Every committed input, seeds and kept crash inputs alike, passes its check.
    #[test]
    fn corpus_replays() {
        write_seeds_if_asked();
        let mut n = 0;
        for target in TARGETS {
            let dir = corpus().join(target);
            for e in std::fs::read_dir(&dir).unwrap() {
                let path = e.unwrap().path();
                eprintln!("{}", path.display());
                check(target, &std::fs::read(&path).unwrap());
                n += 1;
            }
        }
        assert!(n >= 3 * TARGETS.len(), "only {n} corpus files");
    }

    #[test]
    fn path_model_refuses_what_validate_must_refuse() {
        // The path model and validate() must both refuse these; the check would panic if
        // validate() accepted one.
        for bad in [&b"a//b"[..], b"a/", b"./a", b"a/..", b"/a", b"", b"a\0"] {
            assert!(!path_model(bad), "{bad:?}");
        }
        assert!(path_model(b"a/b..c/.d"));
    }
}
