//! The receiver in-process on 127.0.0.1, driven by a fake agent over real QUIC.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use doppel_common::wire::{Frame, Op, Record, RelPath, SetHello, PROTOCOL_VERSION};
use doppel_receiver::{Config, Server, SourceConfig};
use doppel_transport::{connect, keygen, FrameReceiver, FrameSender, FramedStream, Identity};

struct Fixture {
    dir: tempfile::TempDir,
    agent: Identity,
    receiver_fp: String,
    addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

fn identity(dir: &Path, name: &str) -> Identity {
    let d = dir.join("keys").join(name);
    keygen(&d, name).unwrap();
    Identity::load(&d.join("cert.pem"), &d.join("key.pem")).unwrap()
}

impl Fixture {
    async fn start() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let agent = identity(dir.path(), "agent");
        let receiver = identity(dir.path(), "receiver");
        let keys = dir.path().join("keys/receiver");
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            cert: keys.join("cert.pem"),
            key: keys.join("key.pem"),
            state_dir: dir.path().join("state"),
            fsync: true,
            log: Default::default(),
            metrics: Default::default(),
            sources: vec![SourceConfig {
                name: "web1".into(),
                fingerprint: agent.fingerprint(),
                root: dir.path().join("replica/web1"),
                sets: BTreeMap::from([("www".to_string(), dir.path().join("www"))]),
                monitor: Default::default(),
                failover: Default::default(),
                failback: None,
            }],
        };
        let server = Server::bind(config).unwrap();
        let addr = server.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel();
        let server = tokio::spawn(server.run(async {
            let _ = stopped.await;
        }));
        Fixture {
            dir,
            agent,
            receiver_fp: receiver.fingerprint(),
            addr,
            stop: Some(stop),
            server: Some(server),
        }
    }

    fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    async fn session(
        &self,
        source: &str,
        sets: &[(&str, u64)],
    ) -> (FrameSender, FrameReceiver, Frame) {
        let conn = connect(&self.agent, self.addr, &self.receiver_fp)
            .await
            .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let (mut tx, mut rx) = FramedStream::new(send, recv).split();
        tx.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            source: source.into(),
            sets: sets
                .iter()
                .map(|&(name, epoch)| SetHello {
                    name: name.into(),
                    epoch,
                })
                .collect(),
        })
        .await
        .unwrap();
        let first = timeout(rx.recv())
            .await
            .unwrap()
            .expect("an answer to Hello");
        (tx, rx, first)
    }

    async fn stop(mut self) {
        self.stop.take().unwrap().send(()).unwrap();
        timeout(self.server.take().unwrap()).await.unwrap().unwrap();
    }
}

async fn timeout<F: std::future::Future>(f: F) -> F::Output {
    tokio::time::timeout(Duration::from_secs(10), f)
        .await
        .expect("no answer within 10 s")
}

fn applied(welcome: Frame) -> BTreeMap<String, u64> {
    match welcome {
        Frame::Welcome {
            version, applied, ..
        } => {
            assert_eq!(version, PROTOCOL_VERSION);
            applied.into_iter().collect()
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The sets a Welcome says hold nothing, sorted.
fn empty(welcome: &Frame) -> Vec<String> {
    match welcome {
        Frame::Welcome { empty, .. } => {
            let mut e = empty.clone();
            e.sort();
            e
        }
        other => panic!("expected Welcome, got {other:?}"),
    }
}

/// The prior marks of a Welcome as (set, epoch, applied).
fn prior(welcome: &Frame) -> Vec<(String, u64, u64)> {
    match welcome {
        Frame::Welcome { prior, .. } => prior
            .iter()
            .map(|p| (p.set.clone(), p.epoch, p.applied))
            .collect(),
        other => panic!("expected Welcome, got {other:?}"),
    }
}

fn rec(seq: u64, op: Op) -> Record {
    Record { seq, op }
}

fn write(path: &str, offset: u64, data: &[u8]) -> Op {
    Op::Write {
        path: RelPath(path.as_bytes().to_vec()),
        offset,
        data: data.to_vec().into(),
    }
}

/// Reads frames until every set in `want` is acknowledged at least up to its sequence.
async fn wait_acks(rx: &mut FrameReceiver, want: &[(&str, u64)]) {
    let mut got: BTreeMap<String, u64> = BTreeMap::new();
    while want
        .iter()
        .any(|(s, q)| got.get(*s).copied().unwrap_or(0) < *q)
    {
        match timeout(rx.recv()).await.unwrap() {
            Some(Frame::Ack { set, seq }) => {
                let e = got.entry(set).or_default();
                assert!(seq >= *e, "acks go forward");
                *e = seq;
            }
            other => panic!("expected Ack, got {other:?}"),
        }
    }
}

async fn expect_refused(rx: &mut FrameReceiver, needle: &str) {
    loop {
        match timeout(rx.recv()).await {
            Ok(Some(Frame::Refused { reason })) => {
                assert!(reason.contains(needle), "{reason}");
                return;
            }
            Ok(Some(Frame::Ack { .. })) => continue,
            other => panic!("expected Refused, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn batches_are_applied_acknowledged_and_resumed() {
    let fx = Fixture::start().await;
    let (mut tx, mut rx, welcome) = fx.session("web1", &[("www", 1), ("logs", 1)]).await;
    // Both replicas hold nothing yet: the agent may send small files whole.
    assert_eq!(empty(&welcome), ["logs", "www"]);
    assert_eq!(
        applied(welcome),
        BTreeMap::from([("logs".into(), 0), ("www".into(), 0)])
    );
    tx.send(&Frame::Batch {
        set: "www".into(),
        records: vec![
            rec(1, write("index.html", 0, b"hello")),
            rec(
                2,
                Op::Mkdir {
                    path: RelPath(b"img".to_vec()),
                    mode: 0o755,
                },
            ),
            rec(
                3,
                Op::Rename {
                    from: RelPath(b"index.html".to_vec()),
                    to: RelPath(b"img/moved.html".to_vec()),
                    flags: 0,
                },
            ),
        ],
    })
    .await
    .unwrap();
    tx.send(&Frame::Batch {
        set: "logs".into(),
        records: vec![rec(1, write("a/b.log", 0, b"line\n"))],
    })
    .await
    .unwrap();
    wait_acks(&mut rx, &[("www", 3), ("logs", 1)]).await;
    assert_eq!(
        std::fs::read(fx.www().join("img/moved.html")).unwrap(),
        b"hello"
    );
    assert!(!fx.www().join("index.html").exists());
    let log = fx.dir.path().join("replica/web1/logs/a/b.log");
    assert_eq!(std::fs::read(log).unwrap(), b"line\n");
    tx.finish().unwrap();
    assert_eq!(timeout(rx.recv()).await.unwrap(), None, "clean end");

    // Reconnect: the receiver reports what it applied; a resend of 2..3 changes nothing.
    let (mut tx, mut rx, welcome) = fx.session("web1", &[("www", 1), ("logs", 1)]).await;
    assert!(empty(&welcome).is_empty(), "{welcome:?}");
    assert_eq!(
        applied(welcome),
        BTreeMap::from([("logs".into(), 1), ("www".into(), 3)])
    );
    tx.send(&Frame::Batch {
        set: "www".into(),
        records: vec![
            rec(
                2,
                Op::Mkdir {
                    path: RelPath(b"img".to_vec()),
                    mode: 0o755,
                },
            ),
            rec(
                3,
                Op::Rename {
                    from: RelPath(b"index.html".to_vec()),
                    to: RelPath(b"img/moved.html".to_vec()),
                    flags: 0,
                },
            ),
            rec(4, write("img/moved.html", 5, b", world")),
        ],
    })
    .await
    .unwrap();
    wait_acks(&mut rx, &[("www", 4)]).await;
    assert_eq!(
        std::fs::read(fx.www().join("img/moved.html")).unwrap(),
        b"hello, world"
    );

    // A gap is refused with the sequence the agent must resend from.
    tx.send(&Frame::Batch {
        set: "www".into(),
        records: vec![rec(5, write("x", 0, b"x")), rec(7, write("y", 0, b"y"))],
    })
    .await
    .unwrap();
    expect_refused(&mut rx, "expected record 6").await;
    assert!(fx.www().join("x").exists() && !fx.www().join("y").exists());
    drop((tx, rx));

    // What was applied before the gap is kept; a new epoch starts the set over.
    // The Welcome of a new epoch says where the replica stood in the one before (an
    // agent that restarted then compares only what changed meanwhile); the one after
    // it, in the same epoch, has nothing to say.
    let (_tx, _rx, welcome) = fx.session("web1", &[("www", 1)]).await;
    assert!(prior(&welcome).is_empty(), "{welcome:?}");
    assert_eq!(applied(welcome), BTreeMap::from([("www".into(), 5)]));
    let (_tx, _rx, welcome) = fx.session("web1", &[("www", 2)]).await;
    assert_eq!(prior(&welcome), [("www".to_string(), 1, 5)]);
    assert_eq!(applied(welcome), BTreeMap::from([("www".into(), 0)]));
    let (_tx, _rx, welcome) = fx.session("web1", &[("www", 2)]).await;
    assert!(prior(&welcome).is_empty(), "{welcome:?}");
    // A replica emptied behind the receiver's back holds nothing of the epoch before.
    std::fs::remove_dir_all(fx.www()).unwrap();
    std::fs::create_dir(fx.www()).unwrap();
    let (_tx, _rx, welcome) = fx.session("web1", &[("www", 3)]).await;
    assert!(prior(&welcome).is_empty(), "{welcome:?}");
    fx.stop().await;
}

#[tokio::test]
async fn hostile_paths_do_not_escape_and_do_not_stop_the_session() {
    let fx = Fixture::start().await;
    std::fs::create_dir_all(fx.www()).unwrap();
    let outside = fx.dir.path().join("outside");
    std::fs::create_dir(&outside).unwrap();
    std::os::unix::fs::symlink(&outside, fx.www().join("evil")).unwrap();
    let (mut tx, mut rx, _) = fx.session("web1", &[("www", 1)]).await;
    tx.send(&Frame::Batch {
        set: "www".into(),
        records: vec![
            rec(1, write("../escape", 0, b"x")),
            rec(2, write("evil/passwd", 0, b"x")),
            rec(3, write("ok", 0, b"fine")),
        ],
    })
    .await
    .unwrap();
    wait_acks(&mut rx, &[("www", 3)]).await;
    assert_eq!(std::fs::read(fx.www().join("ok")).unwrap(), b"fine");
    assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
    assert!(!fx.dir.path().join("escape").exists());
    fx.stop().await;
}

#[tokio::test]
async fn wrong_source_name_and_version_are_refused() {
    let fx = Fixture::start().await;
    let (_tx, _rx, answer) = fx.session("web2", &[("www", 1)]).await;
    match answer {
        Frame::Refused { reason } => assert!(reason.contains("\"web1\""), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    let (_tx, _rx, answer) = fx.session("web1", &[("../www", 1)]).await;
    assert!(matches!(answer, Frame::Refused { .. }), "{answer:?}");

    let conn = connect(&fx.agent, fx.addr, &fx.receiver_fp).await.unwrap();
    let (send, recv) = conn.open_bi().await.unwrap();
    let mut s = FramedStream::new(send, recv);
    s.send(&Frame::Hello {
        version: PROTOCOL_VERSION + 1,
        source: "web1".into(),
        sets: vec![],
    })
    .await
    .unwrap();
    match timeout(s.recv()).await.unwrap() {
        Some(Frame::Refused { reason }) => assert!(reason.contains("protocol version"), "{reason}"),
        other => panic!("expected Refused, got {other:?}"),
    }
    fx.stop().await;
}

#[tokio::test]
async fn unknown_client_certificate_is_refused() {
    let fx = Fixture::start().await;
    let intruder = identity(fx.dir.path(), "intruder");
    let attempt = async {
        let conn = connect(&intruder, fx.addr, &fx.receiver_fp).await?;
        let (send, recv) = conn.open_bi().await?;
        let mut s = FramedStream::new(send, recv);
        s.send(&Frame::Hello {
            version: PROTOCOL_VERSION,
            source: "web1".into(),
            sets: vec![SetHello {
                name: "www".into(),
                epoch: 1,
            }],
        })
        .await?;
        s.recv().await
    };
    let err = timeout(attempt).await.unwrap_err();
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
    assert!(!fx.www().exists(), "nothing was opened for the intruder");
    fx.stop().await;
}

#[tokio::test]
async fn a_new_connection_replaces_the_old_session() {
    let fx = Fixture::start().await;
    let (_tx1, mut rx1, w) = fx.session("web1", &[("www", 1)]).await;
    applied(w);
    let (mut tx2, mut rx2, w) = fx.session("web1", &[("www", 1)]).await;
    applied(w);
    assert!(
        timeout(rx1.recv()).await.is_err(),
        "the old session was closed"
    );
    tx2.send(&Frame::Batch {
        set: "www".into(),
        records: vec![rec(1, write("f", 0, b"1"))],
    })
    .await
    .unwrap();
    wait_acks(&mut rx2, &[("www", 1)]).await;
    fx.stop().await;
}
