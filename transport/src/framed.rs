//! [`Frame`]s over a QUIC bidirectional stream.
//!
//! The byte format and its limits live in [`doppel_common::wire`]; this module only moves
//! bytes between the stream and the sans-IO [`FrameDecoder`].

use anyhow::{bail, Context};
use bytes::Bytes;
use doppel_common::wire::{
    compress_frame, encode_frame_compressed, sample_compresses, Frame, FrameDecoder,
    COMPRESS_SAMPLE,
};

/// Most received pieces taken from quinn per read. quinn keeps what arrived as one piece
/// per packet (about 1.2 kB); taking many per call saves a lock and a wake-up per packet.
const READ_PIECES: usize = 64;

/// Both halves of a framed stream. Use [`split`](Self::split) to send and receive from
/// different tasks.
pub struct FramedStream {
    tx: FrameSender,
    rx: FrameReceiver,
}

impl FramedStream {
    pub fn new(send: quinn::SendStream, recv: quinn::RecvStream) -> Self {
        FramedStream {
            tx: FrameSender {
                send,
                compression: 0,
                sent: 0,
            },
            rx: FrameReceiver {
                recv,
                dec: FrameDecoder::new(),
            },
        }
    }

    pub async fn send(&mut self, f: &Frame) -> anyhow::Result<()> {
        self.tx.send(f).await
    }

    /// The next frame; `None` when the peer finished the stream cleanly between frames.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        self.rx.recv().await
    }

    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.tx, self.rx)
    }
}

/// The sending half of a [`FramedStream`].
pub struct FrameSender {
    send: quinn::SendStream,
    /// zstd level for batches; 0 = off (the default).
    compression: i32,
    /// Bytes handed to the stream so far (after compression): what a bandwidth cap counts.
    sent: u64,
}

impl FrameSender {
    /// Compress batches from now on with zstd at `level` (0 = off). Batches that do not
    /// compress still go out plain. Any peer whose decoder knows `Frame::Compressed`
    /// reads either form, so this needs no negotiation.
    pub fn set_compression(&mut self, level: i32) {
        self.compression = level.max(0);
    }

    pub async fn send(&mut self, f: &Frame) -> anyhow::Result<()> {
        // One buffer with the length prefix; handing it to quinn as a chunk avoids copying
        // it again. Level 0 is exactly encode_frame.
        self.write(encode_frame_compressed(f, self.compression))
            .await
    }

    /// Sends a Batch frame already encoded, in pieces (`wire::encode_batch_pieces`),
    /// compressed as the stream's level says. Uncompressed, the pieces go to quinn as
    /// they are: the data they share with the queue is not copied again.
    pub async fn send_encoded_batch(&mut self, mut pieces: Vec<Bytes>) -> anyhow::Result<()> {
        if self.compression > 0 && worth_compressing(&pieces, self.compression) {
            return self
                .write(compress_frame(pieces.concat(), self.compression))
                .await;
        }
        let len: u64 = pieces.iter().map(|p| p.len() as u64).sum();
        self.send
            .write_all_chunks(&mut pieces)
            .await
            .context("cannot send to the peer")?;
        self.sent += len;
        Ok(())
    }

    async fn write(&mut self, bytes: Vec<u8>) -> anyhow::Result<()> {
        let len = bytes.len() as u64;
        self.send
            .write_chunk(Bytes::from(bytes))
            .await
            .context("cannot send to the peer")?;
        self.sent += len;
        Ok(())
    }

    /// Frame bytes sent on this stream so far, as they went on the wire (compressed
    /// frames count their compressed size; QUIC and TLS overhead is not included).
    pub fn bytes_sent(&self) -> u64 {
        self.sent
    }

    /// Tells the peer no more frames follow. Frames already sent are still delivered.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.send
            .finish()
            .context("cannot finish the stream: it is already closed")
    }

    /// Waits until the peer acknowledged everything sent before [`finish`](Self::finish),
    /// so that closing the connection right after does not discard the last frames.
    pub async fn flushed(&mut self) -> anyhow::Result<()> {
        self.send
            .stopped()
            .await
            .context("the peer did not take the last frames")?;
        Ok(())
    }
}

/// The receiving half of a [`FramedStream`].
pub struct FrameReceiver {
    recv: quinn::RecvStream,
    dec: FrameDecoder,
}

impl FrameReceiver {
    /// The next frame; `None` when the peer finished the stream cleanly between frames.
    /// Malformed or oversized frames are errors: the stream cannot be resynchronised.
    pub async fn recv(&mut self) -> anyhow::Result<Option<Frame>> {
        loop {
            if let Some(frame) = self.dec.next_frame().context("bad frame from the peer")? {
                return Ok(Some(frame));
            }
            let mut pieces: [Bytes; READ_PIECES] = std::array::from_fn(|_| Bytes::new());
            match self
                .recv
                .read_chunks(&mut pieces)
                .await
                .context("cannot receive from the peer")?
            {
                Some(n) => pieces[..n].iter().for_each(|p| self.dec.push(p)),
                None if self.dec.buffered() == 0 => return Ok(None),
                None => bail!(
                    "the peer ended the stream in the middle of a frame ({} bytes left over)",
                    self.dec.buffered()
                ),
            }
        }
    }
}

/// Whether a frame in `pieces` passes [`compress_frame`]'s sample test, asked before its
/// pieces are joined for it: most file data does not compress, and is then sent without
/// being copied into one buffer first.
fn worth_compressing(pieces: &[Bytes], level: i32) -> bool {
    let mut sample = Vec::with_capacity(COMPRESS_SAMPLE + 4);
    for p in pieces {
        let take = (COMPRESS_SAMPLE + 4 - sample.len()).min(p.len());
        sample.extend_from_slice(&p[..take]);
        if sample.len() == COMPRESS_SAMPLE + 4 {
            break;
        }
    }
    sample.len() > 4 && sample_compresses(&sample[4..], level)
}
