//! A close reaches the peer even when the congestion window is full at that moment.
//!
//! quinn-proto 0.11.19 gated the CONNECTION_CLOSE packet by the congestion window, and
//! a closed connection never opens it again: the peer only learnt of the close from its
//! idle timeout (quinn-rs/quinn#2785; doppel builds with the upstream fix, see
//! third_party/README.md). An agent that stops says goodbye with a close; a receiver
//! that does not hear it sees the source die and may fail over. This test keeps the
//! check when quinn is upgraded and the patch dropped.

mod common;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{identity, loopback_server};
use doppel_transport::{close, connect};
use tokio::net::UdpSocket;

/// A UDP relay between one client and `server` that can black-hole the client's packets.
async fn relay(server: SocketAddr, drop_client: Arc<AtomicBool>) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    tokio::spawn(async move {
        let mut client = None;
        let mut buf = vec![0u8; 70_000];
        while let Ok((n, from)) = sock.recv_from(&mut buf).await {
            if from == server {
                if let Some(c) = client {
                    let _ = sock.send_to(&buf[..n], c).await;
                }
            } else {
                client = Some(from);
                if !drop_client.load(Ordering::SeqCst) {
                    let _ = sock.send_to(&buf[..n], server).await;
                }
            }
        }
    });
    addr
}

#[tokio::test]
async fn a_close_reaches_the_peer_while_the_congestion_window_is_full() {
    let dir = tempfile::tempdir().unwrap();
    let server_id = identity(dir.path(), "receiver");
    let client_id = identity(dir.path(), "agent");
    let ep = loopback_server(&server_id, &client_id);
    let black_hole = Arc::new(AtomicBool::new(false));
    let via = relay(ep.local_addr().unwrap(), black_hole.clone()).await;

    let (accepted_tx, accepted_rx) = tokio::sync::oneshot::channel();
    let server = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        let (_send, mut recv) = conn.accept_bi().await.unwrap();
        let mut first = [0u8; 5];
        recv.read_exact(&mut first).await.unwrap();
        accepted_tx.send(()).unwrap();
        let reason = conn.closed().await;
        (reason, Instant::now())
    });

    let conn = connect(&client_id, via, &server_id.fingerprint())
        .await
        .unwrap();
    let (mut send, _recv) = conn.open_bi().await.unwrap();
    send.write_all(b"hello").await.unwrap();
    accepted_rx.await.unwrap();

    // Fill the window: the client's packets vanish, so nothing it sends is acknowledged
    // and what is in flight stays there.
    black_hole.store(true, Ordering::SeqCst);
    let before = conn.stats().udp_tx.bytes;
    let bulk = tokio::spawn(async move {
        let _ = send.write_all(&vec![7u8; 4 << 20]).await;
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stats = conn.stats();
    assert!(
        stats.udp_tx.bytes - before >= stats.path.cwnd,
        "the client sent {} bytes unacknowledged, less than its window of {}: the test proves nothing",
        stats.udp_tx.bytes - before,
        stats.path.cwnd
    );

    // The path works again; the close must go out now, not at the peer's idle timeout.
    black_hole.store(false, Ordering::SeqCst);
    let closed_at = Instant::now();
    conn.close(close::SHUTDOWN, b"the agent is stopping");
    let (reason, seen_at) = tokio::time::timeout(Duration::from_secs(5), server)
        .await
        .expect("the server did not see the close within 5 s (its idle timeout is 10 s)")
        .unwrap();
    match reason {
        quinn::ConnectionError::ApplicationClosed(c) => {
            assert_eq!(c.error_code, close::SHUTDOWN)
        }
        other => panic!("the server saw {other:?}, not the client's close"),
    }
    assert!(
        seen_at - closed_at < Duration::from_secs(1),
        "the close took {:?}",
        seen_at - closed_at
    );
    bulk.abort();
}
