//! The UDP socket under both endpoints: large kernel buffers, and GSO sends the kernel
//! accepts whatever the datagram size.
//!
//! quinn hands the socket up to ten datagrams of one size as a single GSO send. The
//! kernel refuses a GSO send whose payload passes 64 KiB, and quinn-udp then drops the
//! whole batch as if the network had. With datagrams of a few kilobytes (jumbo frames,
//! loopback) every batch would be refused, the losses would look like an MTU black hole,
//! and quinn would fall back to 1200-byte datagrams. [`GsoSplit`] sends such a batch as
//! several smaller GSO sends instead, so large datagrams and GSO work together.

use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, Runtime, UdpPoller};

use crate::endpoint::Tuning;

/// Kernel socket buffer each way. Linux's default (208 KiB) holds about 150 full-size
/// datagrams: a receiver that is off the CPU for a millisecond while a bulk copy
/// arrives at a gigabyte a second drops the rest, and every drop halves the congestion
/// window. Only memory a backlog actually fills is used.
const SOCKET_BUFFER: usize = 8 << 20;

/// The most payload one GSO send may carry: 65535 bytes of IP length, less the IPv6
/// header (40, the larger of the two) and the UDP header (8).
const MAX_GSO_PAYLOAD: usize = 65_535 - 40 - 8;

/// The kernel's cap on segments per GSO send (`UDP_MAX_SEGMENTS`).
const MAX_GSO_SEGMENTS: usize = 64;

/// A UDP socket on `addr` with [`SOCKET_BUFFER`] each way, ready for a quinn endpoint.
/// As root the size is forced past `net.core.{r,w}mem_max`; otherwise the kernel caps it
/// there, which still works, only with more drops under load. With
/// [`Tuning::QuinnDefaults`], the plain socket quinn would make.
pub(crate) fn bind(addr: SocketAddr, tuning: Tuning) -> io::Result<Arc<dyn AsyncUdpSocket>> {
    use rustix::net::sockopt;
    let socket = std::net::UdpSocket::bind(addr)?;
    if tuning == Tuning::QuinnDefaults {
        return quinn::TokioRuntime.wrap_udp_socket(socket);
    }
    if sockopt::set_socket_recv_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        sockopt::set_socket_recv_buffer_size(&socket, SOCKET_BUFFER)?;
    }
    if sockopt::set_socket_send_buffer_size_force(&socket, SOCKET_BUFFER).is_err() {
        sockopt::set_socket_send_buffer_size(&socket, SOCKET_BUFFER)?;
    }
    let inner = quinn::TokioRuntime.wrap_udp_socket(socket)?;
    Ok(Arc::new(GsoSplit(inner)))
}

/// How a transmit of `len` bytes in segments of `segment` bytes is cut into sends the
/// kernel takes: `(offset, length)` of each, every one a whole number of segments but
/// possibly the last.
fn pieces(len: usize, segment: usize) -> impl Iterator<Item = (usize, usize)> {
    let per_send = (MAX_GSO_PAYLOAD / segment.max(1)).clamp(1, MAX_GSO_SEGMENTS);
    let step = per_send * segment.max(1);
    (0..len)
        .step_by(step)
        .map(move |at| (at, step.min(len - at)))
}

/// Delegates to quinn's socket, cutting GSO sends the kernel would refuse.
#[derive(Debug)]
struct GsoSplit(Arc<dyn AsyncUdpSocket>);

impl AsyncUdpSocket for GsoSplit {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.0.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        let Some(segment) = transmit.segment_size else {
            return self.0.try_send(transmit);
        };
        if transmit.contents.len() <= MAX_GSO_PAYLOAD {
            return self.0.try_send(transmit);
        }
        // If a later piece would block, quinn retries the whole transmit and the pieces
        // already sent go out twice. The receiver discards duplicate packets; that is
        // cheaper and simpler than remembering how far a transmit got.
        for (at, len) in pieces(transmit.contents.len(), segment) {
            self.0.try_send(&Transmit {
                destination: transmit.destination,
                ecn: transmit.ecn,
                contents: &transmit.contents[at..at + len],
                segment_size: (len > segment).then_some(segment),
                src_ip: transmit.src_ip,
            })?;
        }
        Ok(())
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_recv(cx, bufs, meta)
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.0.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.0.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.0.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.0.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cut(len: usize, segment: usize) -> Vec<(usize, usize)> {
        pieces(len, segment).collect()
    }

    #[test]
    fn small_datagrams_stay_one_send() {
        assert_eq!(cut(10 * 1452, 1452), vec![(0, 14_520)]);
        assert_eq!(cut(9 * 1452 + 100, 1452), vec![(0, 13_168)]);
    }

    #[test]
    fn large_datagrams_are_cut_at_segment_boundaries_within_the_limit() {
        // Ten 9000-byte segments: seven fit in one send.
        assert_eq!(cut(90_000, 9000), vec![(0, 63_000), (63_000, 27_000)]);
        // Loopback-sized datagrams go one per send; the last may be short.
        assert_eq!(
            cut(2 * 65_000 + 10, 65_000),
            vec![(0, 65_000), (65_000, 65_000), (130_000, 10)]
        );
        for (len, seg) in [(650_000, 65_000), (123_457, 6550), (64 * 1000 + 1, 1000)] {
            let parts = cut(len, seg);
            assert_eq!(parts.iter().map(|p| p.1).sum::<usize>(), len);
            for &(at, n) in &parts {
                assert!(n <= MAX_GSO_PAYLOAD && n.div_ceil(seg) <= MAX_GSO_SEGMENTS);
                assert_eq!(at % seg, 0, "every piece starts on a segment boundary");
            }
        }
    }
}
