//! Rough throughput check on loopback: framed `Batch`es of 1 MiB writes versus raw bytes
//! written to a quinn stream of the same connection.
//!
//! `cargo run --release -p doppel-transport --example throughput [MiB]`

use std::time::Instant;

use doppel_common::wire::{Frame, Op, Record, RelPath};
use doppel_transport::{connect, keygen, server_endpoint, FramedStream, Identity};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mib: usize = std::env::args().nth(1).map_or(Ok(1024), |s| s.parse())?;
    let dir = tempfile::tempdir()?;
    let id = |name: &str| -> anyhow::Result<Identity> {
        let d = dir.path().join(name);
        keygen(&d, name)?;
        Identity::load(&d.join("cert.pem"), &d.join("key.pem"))
    };
    let (server_id, client_id) = (id("server")?, id("client")?);
    let ep = server_endpoint(
        "127.0.0.1:0".parse()?,
        &server_id,
        vec![client_id.fingerprint()],
    )?;
    let addr = ep.local_addr()?;
    tokio::spawn(async move {
        let conn = ep.accept().await.unwrap().await.unwrap();
        // Stream 1: raw bytes; stream 2: frames.
        let (_s, mut r) = conn.accept_bi().await.unwrap();
        while r.read_chunk(1 << 20, true).await.unwrap().is_some() {}
        let (s, r) = conn.accept_bi().await.unwrap();
        let mut f = FramedStream::new(s, r);
        let mut n = 0;
        while let Some(Frame::Batch { records, .. }) = f.recv().await.unwrap() {
            n += records.len();
        }
        f.send(&Frame::Ack {
            set: "s".into(),
            seq: n as u64,
        })
        .await
        .unwrap();
        let (mut tx, _) = f.split();
        tx.finish().unwrap();
        tx.flushed().await.unwrap();
    });
    let conn = connect(&client_id, addr, &server_id.fingerprint()).await?;
    let chunk = vec![0x5a; 1 << 20];

    let (mut s, _r) = conn.open_bi().await?;
    let t = Instant::now();
    for _ in 0..mib {
        s.write_all(&chunk).await?;
    }
    s.finish()?;
    s.stopped().await?;
    let raw = mib as f64 / t.elapsed().as_secs_f64();

    let (s, r) = conn.open_bi().await?;
    let (mut tx, mut rx) = FramedStream::new(s, r).split();
    let t = Instant::now();
    for i in 0..mib {
        let records = (0..4)
            .map(|j| Record {
                seq: (i * 4 + j + 1) as u64,
                op: Op::Write {
                    path: RelPath(b"bench/file".to_vec()),
                    offset: ((i * 4 + j) << 18) as u64,
                    data: chunk[..1 << 18].to_vec().into(),
                },
            })
            .collect();
        tx.send(&Frame::Batch {
            set: "s".into(),
            records,
        })
        .await?;
    }
    tx.finish()?;
    let ack = rx.recv().await?;
    let framed = mib as f64 / t.elapsed().as_secs_f64();
    println!(
        "raw {raw:.0} MiB/s, framed {framed:.0} MiB/s, ratio {:.2} ({ack:?})",
        framed / raw
    );
    Ok(())
}
