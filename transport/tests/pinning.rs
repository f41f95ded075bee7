//! Real QUIC connections on 127.0.0.1: pinned peers talk, anyone else is refused.

mod common;

use std::time::Duration;

use common::{identity, loopback_server};
use doppel_common::wire::{Frame, Op, Record, RelPath, SetHello};
use doppel_transport::{connect, peer_fingerprint, server_endpoint, FramedStream};

fn hello() -> Frame {
    Frame::Hello {
        version: 1,
        source: "web1".into(),
        sets: vec![SetHello {
            name: "www".into(),
            epoch: 1,
        }],
    }
}

#[tokio::test]
async fn pinned_pair_exchanges_frames() {
    let dir = tempfile::tempdir().unwrap();
    let server_id = identity(dir.path(), "receiver");
    let client_id = identity(dir.path(), "agent");
    let ep = server_endpoint(
        "127.0.0.1:0".parse().unwrap(),
        &server_id,
        vec![client_id.fingerprint().to_uppercase()],
    )
    .unwrap();
    let addr = ep.local_addr().unwrap();
    let client_fp = client_id.fingerprint();

    let server = tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        assert_eq!(peer_fingerprint(&conn).as_deref(), Some(client_fp.as_str()));
        let (send, recv) = conn.accept_bi().await.unwrap();
        let mut s = FramedStream::new(send, recv);
        let mut got = Vec::new();
        while let Some(f) = s.recv().await.unwrap() {
            got.push(f);
        }
        s.send(&Frame::Ack {
            set: "www".into(),
            seq: 2,
        })
        .await
        .unwrap();
        let (mut tx, _rx) = s.split();
        tx.finish().unwrap();
        tx.flushed().await.unwrap();
        got
    });

    let conn = connect(&client_id, addr, &server_id.fingerprint())
        .await
        .unwrap();
    assert_eq!(peer_fingerprint(&conn), Some(server_id.fingerprint()));
    let (send, recv) = conn.open_bi().await.unwrap();
    let (mut tx, mut rx) = FramedStream::new(send, recv).split();
    let big = Frame::Batch {
        set: "www".into(),
        records: vec![Record {
            seq: 1,
            op: Op::Write {
                path: RelPath(b"a/b".to_vec()),
                offset: 0,
                data: vec![7; 1 << 20].into(),
            },
        }],
    };
    tx.send(&hello()).await.unwrap();
    tx.send(&big).await.unwrap();
    tx.finish().unwrap();
    assert_eq!(
        rx.recv().await.unwrap(),
        Some(Frame::Ack {
            set: "www".into(),
            seq: 2
        })
    );
    assert_eq!(rx.recv().await.unwrap(), None);
    assert_eq!(server.await.unwrap(), vec![hello(), big]);
}

#[tokio::test]
async fn client_with_unknown_cert_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_id = identity(dir.path(), "receiver");
    let allowed = identity(dir.path(), "agent");
    let intruder = identity(dir.path(), "intruder");
    let ep = loopback_server(&server_id, &allowed);
    let addr = ep.local_addr().unwrap();
    let server = tokio::spawn(async move { ep.accept().await.unwrap().await });

    // In TLS 1.3 the client finishes its side of the handshake before the server has
    // judged the client certificate, so the refusal may show up on first use instead.
    let outcome = async {
        let conn = connect(&intruder, addr, &server_id.fingerprint()).await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(b"x").await?;
        recv.read_to_end(16).await?;
        anyhow::Ok(())
    };
    let err = tokio::time::timeout(Duration::from_secs(5), outcome)
        .await
        .expect("refusal takes less than 5 s")
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.to_lowercase().contains("certificate"), "{msg}");
    let server_err = server.await.unwrap().unwrap_err().to_string();
    assert!(server_err.contains(&intruder.fingerprint()), "{server_err}");
}

#[tokio::test]
async fn server_with_wrong_fingerprint_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let server_id = identity(dir.path(), "receiver");
    let impostor = identity(dir.path(), "impostor");
    let client_id = identity(dir.path(), "agent");
    let ep = loopback_server(&impostor, &client_id);
    let addr = ep.local_addr().unwrap();
    tokio::spawn(async move {
        if let Some(inc) = ep.accept().await {
            let _ = inc.await;
        }
    });
    let err = connect(&client_id, addr, &server_id.fingerprint())
        .await
        .unwrap_err();
    let msg = format!("{err:#}");
    assert!(msg.contains(&impostor.fingerprint()), "{msg}");
    assert!(msg.contains("not pinned"), "{msg}");
}
