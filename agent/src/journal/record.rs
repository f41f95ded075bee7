//! The on-disk record codec: pure functions over byte slices, no IO.
//!
//! One record is `[u32 len][u32 crc][payload]`, both integers little-endian, where
//! `payload` is `postcard(Record)`, `len` its length and `crc` its CRC-32C. Records are
//! laid end to end; nothing separates or pads them. The checksum covers only the
//! payload: a damaged `len` shows up as a checksum mismatch (or a length out of range)
//! because the bytes it then points at are not the payload that was written.
//!
//! Everything read from disk is input: every malformed byte sequence decodes to a
//! [`DecodeError`], never a panic, which is what makes [`decode_records`] a fuzz target.

use doppel_common::wire::{Record, MAX_FRAME};

/// Bytes before each payload: length and checksum.
pub const HEADER_LEN: usize = 8;

/// Largest payload accepted. A record must fit in one wire frame anyway, so a longer
/// length field can only be damage, and refusing it keeps a corrupt length from making
/// a reader allocate or read gigabytes.
pub const MAX_PAYLOAD: usize = MAX_FRAME;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The bytes end inside a record (a torn write, or a read window that is too
    /// short): `need` bytes from `offset` would hold the whole record, as far as the
    /// header (if present) tells.
    #[error("record at byte {offset} is cut short: it needs {need} bytes")]
    Truncated { offset: usize, need: usize },
    /// The length field is 0 or larger than [`MAX_PAYLOAD`]. A zero length is what a
    /// zero-filled block (a crash before the data reached the disk) looks like.
    #[error("record at byte {offset} has an impossible length {len}")]
    BadLength { offset: usize, len: u32 },
    #[error("record at byte {offset} fails its checksum (stored {stored:#010x}, computed {actual:#010x})")]
    BadChecksum {
        offset: usize,
        stored: u32,
        actual: u32,
    },
    /// The checksum matches but the payload is not a `Record` of this version.
    #[error("record at byte {offset} has a valid checksum but does not decode: {reason}")]
    BadPayload { offset: usize, reason: String },
}

impl DecodeError {
    /// Where the bad record starts, relative to the decoded slice.
    pub fn offset(&self) -> usize {
        match self {
            DecodeError::Truncated { offset, .. }
            | DecodeError::BadLength { offset, .. }
            | DecodeError::BadChecksum { offset, .. }
            | DecodeError::BadPayload { offset, .. } => *offset,
        }
    }

    fn shifted(self, by: usize) -> Self {
        match self {
            DecodeError::Truncated { offset, need } => DecodeError::Truncated {
                offset: offset + by,
                need,
            },
            DecodeError::BadLength { offset, len } => DecodeError::BadLength {
                offset: offset + by,
                len,
            },
            DecodeError::BadChecksum {
                offset,
                stored,
                actual,
            } => DecodeError::BadChecksum {
                offset: offset + by,
                stored,
                actual,
            },
            DecodeError::BadPayload { offset, reason } => DecodeError::BadPayload {
                offset: offset + by,
                reason,
            },
        }
    }
}

/// The record's payload would be longer than [`MAX_PAYLOAD`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TooLarge {
    pub len: usize,
}

/// Appends the encoded record to `out` and returns its length on disk (header
/// included). On error `out` is left as it was.
pub fn encode_record(record: &Record, out: &mut Vec<u8>) -> Result<usize, TooLarge> {
    let start = out.len();
    out.extend_from_slice(&[0; HEADER_LEN]);
    doppel_common::wire::encode_into(record, out);
    let len = out.len() - start - HEADER_LEN;
    if len > MAX_PAYLOAD {
        out.truncate(start);
        return Err(TooLarge { len });
    }
    let crc = crc32c::crc32c(&out[start + HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    Ok(HEADER_LEN + len)
}

/// Decodes the record at the start of `bytes`: the record and its length on disk.
/// Error offsets are 0 (the start of `bytes`).
pub fn decode_record(bytes: &[u8]) -> Result<(Record, usize), DecodeError> {
    let Some(header) = bytes.get(..HEADER_LEN) else {
        return Err(DecodeError::Truncated {
            offset: 0,
            need: HEADER_LEN,
        });
    };
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let stored = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len == 0 || len as usize > MAX_PAYLOAD {
        return Err(DecodeError::BadLength { offset: 0, len });
    }
    let total = HEADER_LEN + len as usize;
    let Some(payload) = bytes.get(HEADER_LEN..total) else {
        return Err(DecodeError::Truncated {
            offset: 0,
            need: total,
        });
    };
    let actual = crc32c::crc32c(payload);
    if actual != stored {
        return Err(DecodeError::BadChecksum {
            offset: 0,
            stored,
            actual,
        });
    }
    match postcard::take_from_bytes::<Record>(payload) {
        Ok((record, [])) => Ok((record, total)),
        Ok((_, rest)) => Err(DecodeError::BadPayload {
            offset: 0,
            reason: format!("{} bytes left over after the record", rest.len()),
        }),
        Err(e) => Err(DecodeError::BadPayload {
            offset: 0,
            reason: e.to_string(),
        }),
    }
}

/// Decodes records laid end to end until the bytes end or one does not decode.
///
/// Returns the records, how many bytes they occupy (the offset at which decoding
/// stopped: everything before it is whole, checked records) and why it stopped, if
/// that was not a clean end. An error's offset is relative to `bytes`.
pub fn decode_records(bytes: &[u8]) -> (Vec<Record>, usize, Option<DecodeError>) {
    let mut records = Vec::new();
    let mut pos = 0;
    while pos < bytes.len() {
        match decode_record(&bytes[pos..]) {
            Ok((record, len)) => {
                records.push(record);
                pos += len;
            }
            Err(e) => return (records, pos, Some(e.shifted(pos))),
        }
    }
    (records, pos, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use doppel_common::wire::{Op, RelPath};

    fn rec(seq: u64, n: usize) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: RelPath(b"dir/file".to_vec()),
                offset: seq * 7,
                data: vec![seq as u8; n].into(),
            },
        }
    }

    #[test]
    fn records_round_trip() {
        let records = vec![
            rec(1, 0),
            rec(2, 4096),
            Record {
                seq: 3,
                op: Op::Rename {
                    from: RelPath(b"a".to_vec()),
                    to: RelPath(b"b".to_vec()),
                    flags: 1,
                },
            },
        ];
        let mut buf = Vec::new();
        let lens: Vec<usize> = records
            .iter()
            .map(|r| encode_record(r, &mut buf).unwrap())
            .collect();
        assert_eq!(lens.iter().sum::<usize>(), buf.len());
        let (out, used, err) = decode_records(&buf);
        assert_eq!((out, used, err), (records, buf.len(), None));
        // The framing overhead of a 4 KiB write is small: the point of the format.
        assert!(lens[1] < 4096 + 32, "{}", lens[1]);
    }

    #[test]
    fn every_truncation_is_reported_not_panicked() {
        let mut buf = Vec::new();
        let first = encode_record(&rec(1, 100), &mut buf).unwrap();
        encode_record(&rec(2, 100), &mut buf).unwrap();
        for cut in 0..buf.len() {
            let (out, used, err) = decode_records(&buf[..cut]);
            let whole = if cut >= first { 1 } else { 0 };
            assert_eq!(out.len(), whole, "cut at {cut}");
            assert_eq!(used, whole * first);
            match err {
                None => assert!(cut == 0 || cut == first),
                Some(DecodeError::Truncated { offset, .. }) => assert_eq!(offset, used),
                Some(e) => panic!("cut at {cut}: {e}"),
            }
        }
    }

    #[test]
    fn every_flipped_byte_is_caught() {
        let mut buf = Vec::new();
        encode_record(&rec(1, 50), &mut buf).unwrap();
        for i in 0..buf.len() {
            let mut bad = buf.clone();
            bad[i] ^= 0x40;
            let (out, used, err) = decode_records(&bad);
            assert!(out.is_empty() && used == 0, "flip at {i} decoded");
            assert!(err.is_some());
        }
    }

    #[test]
    fn zeros_and_huge_lengths_are_bad_lengths() {
        let (_, _, err) = decode_records(&[0; 64]);
        assert_eq!(err, Some(DecodeError::BadLength { offset: 0, len: 0 }));
        let mut bad = u32::MAX.to_le_bytes().to_vec();
        bad.extend_from_slice(&[0; 12]);
        assert!(matches!(
            decode_records(&bad).2,
            Some(DecodeError::BadLength { .. })
        ));
    }

    #[test]
    fn valid_checksum_over_garbage_is_a_payload_error() {
        let payload = [0xff_u8; 16];
        let mut buf = (payload.len() as u32).to_le_bytes().to_vec();
        buf.extend_from_slice(&crc32c::crc32c(&payload).to_le_bytes());
        buf.extend_from_slice(&payload);
        assert!(matches!(
            decode_records(&buf).2,
            Some(DecodeError::BadPayload { .. })
        ));
    }

    #[test]
    fn oversized_records_are_refused_on_encode() {
        let mut buf = vec![1, 2, 3];
        let r = rec(1, MAX_PAYLOAD);
        assert!(encode_record(&r, &mut buf).is_err());
        assert_eq!(buf, vec![1, 2, 3]);
    }

    #[test]
    fn random_bytes_never_panic() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let mut valid = Vec::new();
        for i in 1..20 {
            encode_record(&rec(i, i as usize * 3), &mut valid).unwrap();
        }
        for _ in 0..2000 {
            let mut bytes = valid.clone();
            for _ in 0..rng.gen_range(1..4) {
                let i = rng.gen_range(0..bytes.len());
                bytes[i] = rng.gen();
            }
            let cut = rng.gen_range(0..=bytes.len());
            let (out, used, _) = decode_records(&bytes[..cut]);
            assert!(used <= cut);
            // Whatever decodes cleanly is a prefix of what was written.
            for (j, r) in out.iter().enumerate() {
                assert_eq!(r.seq, j as u64 + 1);
            }
        }
    }
}
