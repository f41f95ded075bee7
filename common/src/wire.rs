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

use serde::{Deserialize, Serialize};

pub const PROTOCOL_VERSION: u32 = 1;
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
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
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
            | Op::Rmdir { path } => [Some(path), None],
            Op::Rename { from, to, .. } => [Some(from), Some(to)],
            Op::Prune { dir, .. } => [dir.as_ref(), None],
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
    },
    /// Agent -> receiver: records of one set, in sequence order.
    Batch { set: String, records: Vec<Record> },
    /// Receiver -> agent: every record of `set` up to `seq` is applied.
    Ack { set: String, seq: u64 },
    /// Either side: the session ends, and why.
    Refused { reason: String },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("frame of {0} bytes exceeds the {MAX_FRAME} byte limit")]
    TooLarge(usize),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// Encodes a frame with its length prefix.
pub fn encode_frame(frame: &Frame) -> Vec<u8> {
    let mut out = vec![0u8; 4];
    // Writing into a Vec cannot fail; the frame size is bounded by what we put in it.
    out = postcard::to_extend(frame, out).expect("postcard encoding into a Vec");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_le_bytes());
    out
}

/// Incremental decoder: feed it bytes as they arrive, take frames out.
#[derive(Default)]
pub struct FrameDecoder {
    buf: Vec<u8>,
}

impl FrameDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn push(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// Bytes received but not yet decoded into a frame.
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// The next complete frame, `Ok(None)` if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, WireError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > MAX_FRAME {
            return Err(WireError::TooLarge(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame: Frame = postcard::from_bytes(&self.buf[4..4 + len])
            .map_err(|e| WireError::Malformed(e.to_string()))?;
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
                            data: vec![1, 2, 3],
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
        let mut dec = FrameDecoder::new();
        let mut out = Vec::new();
        for chunk in bytes.chunks(3) {
            dec.push(chunk);
            while let Some(f) = dec.next_frame().unwrap() {
                out.push(f);
            }
        }
        assert_eq!(out, frames);
        assert_eq!(dec.buffered(), 0);
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
