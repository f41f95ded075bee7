//! A malicious but authenticated agent against a real `doppel-receiver` process: paths
//! that climb out of the replica root, symlinks planted in the replica, absurd offsets,
//! oversized and garbage frames. After every attack nothing outside the replica root has
//! changed, the receiver logs a warning or error naming the problem, and it still runs
//! and applies a well-behaved session.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use doppel_common::wire::PROTOCOL_VERSION;
use doppel_common::wire::{encode_frame, Frame, FrameDecoder, Op, Record, RelPath, SetHello};
use doppel_tests::cluster::Cluster;
use doppel_tests::require_root;
use doppel_tests::tree::{snapshot, Snapshot};
use doppel_transport::{connect, FrameReceiver, FrameSender, FramedStream, Identity};

const SET: &str = "www";
/// Last component of every path that tries to escape.
const ESCAPED: &str = "ESCAPED";
const WAIT: Duration = Duration::from_secs(10);

/// What the attacks must not change: the directory outside the replica (with a file in
/// it), and which names exist next to the replica and next to the cluster's directory.
#[derive(Debug, PartialEq)]
struct World {
    outside: Snapshot,
    cluster_dir: BTreeSet<String>,
    replica_parent: BTreeSet<String>,
    escaped_in_tmp: bool,
}

struct Target {
    c: Cluster,
    agent: Identity,
    receiver_fp: String,
    addr: SocketAddr,
    outside: PathBuf,
    before: World,
}

fn names(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn rel(p: impl AsRef<[u8]>) -> RelPath {
    RelPath(p.as_ref().to_vec())
}

fn write(path: impl AsRef<[u8]>, offset: u64, data: &[u8]) -> Op {
    Op::Write {
        path: rel(path),
        offset,
        data: data.to_vec().into(),
    }
}

fn hello() -> Frame {
    Frame::Hello {
        version: PROTOCOL_VERSION,
        source: "src".into(),
        sets: vec![SetHello {
            name: SET.into(),
            epoch: 1,
        }],
    }
}

async fn timeout<F: std::future::Future>(what: &str, f: F) -> F::Output {
    tokio::time::timeout(WAIT, f)
        .await
        .unwrap_or_else(|_| panic!("{what}: nothing within {WAIT:?}"))
}

impl Target {
    /// A receiver with one source ("src", set "www"), an `outside` directory beside its
    /// replica, and one well-behaved session already applied.
    async fn start() -> Target {
        let mut c = Cluster::new(SET).unwrap();
        let d = c.dir.path().to_path_buf();
        let outside = d.join("outside");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("keep"), b"owned by the test").unwrap();
        std::fs::create_dir_all(&c.replica).unwrap();
        c.start_receiver().unwrap();
        let keys =
            |k: &str| Identity::load(&d.join(k).join("cert.pem"), &d.join(k).join("key.pem"));
        let mut t = Target {
            agent: keys("agent-keys").unwrap(),
            receiver_fp: keys("receiver-keys").unwrap().fingerprint(),
            addr: SocketAddr::from(([127, 0, 0, 1], c.port)),
            outside,
            before: World {
                outside: Snapshot::new(),
                cluster_dir: BTreeSet::new(),
                replica_parent: BTreeSet::new(),
                escaped_in_tmp: false,
            },
            c,
        };
        t.wait_log("receiver listening", false).await;
        // The first session creates the state directory; record the world after it.
        t.behaves("warmup").await;
        t.before = t.world();
        t
    }

    fn world(&self) -> World {
        let d = self.c.dir.path();
        World {
            outside: snapshot(&self.outside).unwrap(),
            cluster_dir: names(d),
            replica_parent: names(self.c.replica.parent().unwrap()),
            escaped_in_tmp: d.parent().unwrap().join(ESCAPED).exists(),
        }
    }

    /// Hello/Welcome on a fresh connection; the receiver's applied sequence for the set.
    async fn session(&self) -> (quinn::Connection, FrameSender, FrameReceiver, u64) {
        let conn = timeout(
            "connect",
            connect(&self.agent, self.addr, &self.receiver_fp),
        )
        .await
        .unwrap();
        let (send, recv) = conn.open_bi().await.unwrap();
        let (mut tx, mut rx) = FramedStream::new(send, recv).split();
        tx.send(&hello()).await.unwrap();
        match timeout("Welcome", rx.recv()).await.unwrap() {
            Some(Frame::Welcome { applied, .. }) => {
                let seq = applied.iter().find(|(s, _)| s == SET).map(|(_, q)| *q);
                (conn, tx, rx, seq.expect("Welcome names the set"))
            }
            other => panic!("expected Welcome, got {other:?}\n{}", self.c.logs()),
        }
    }

    /// Sends `ops` as one batch after what was applied and waits for the Ack of the last.
    async fn apply(&self, ops: Vec<Op>) {
        let (_conn, mut tx, mut rx, applied) = self.session().await;
        let last = applied + ops.len() as u64;
        let records = (applied + 1..).zip(ops).map(|(seq, op)| Record { seq, op });
        tx.send(&Frame::Batch {
            set: SET.into(),
            records: records.collect(),
        })
        .await
        .unwrap();
        loop {
            match timeout("Ack", rx.recv()).await {
                Ok(Some(Frame::Ack { seq, .. })) if seq >= last => break,
                Ok(Some(Frame::Ack { .. })) => {}
                other => panic!("expected Ack {last}, got {other:?}\n{}", self.c.logs()),
            }
        }
        // End cleanly: the receiver finishes its side once it has seen ours end.
        tx.finish().unwrap();
        let end = timeout("end of the session", rx.recv()).await;
        assert!(matches!(end, Ok(None)), "{end:?}\n{}", self.c.logs());
    }

    /// Opens a stream and sends `bytes` as they are, then waits for the receiver to end
    /// the session. `after_hello`: a proper Hello goes first (and its Welcome is read).
    async fn raw(&self, after_hello: bool, bytes: &[u8]) {
        let conn = timeout(
            "connect",
            connect(&self.agent, self.addr, &self.receiver_fp),
        )
        .await
        .unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let mut dec = FrameDecoder::new();
        if after_hello {
            send.write_all(&encode_frame(&hello())).await.unwrap();
            let first = timeout("Welcome", read_frame(&mut recv, &mut dec)).await;
            assert!(matches!(first, Some(Frame::Welcome { .. })), "{first:?}");
        }
        send.write_all(bytes).await.unwrap();
        let _ = send.finish();
        // The receiver answers with Refused (or just closes); either way the stream ends.
        timeout("end of the session", async {
            while read_frame(&mut recv, &mut dec).await.is_some() {}
        })
        .await;
    }

    /// A normal write after the attacks lands, and nothing outside the replica changed.
    async fn behaves(&self, tag: &str) {
        let name = format!("ok-{tag}");
        self.apply(vec![write(&name, 0, b"fine")]).await;
        assert_eq!(std::fs::read(self.c.replica.join(&name)).unwrap(), b"fine");
        let pid = self.c.receiver_pid().unwrap();
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let state = stat.rsplit(')').next().unwrap().trim_start().chars().next();
        assert!(
            !matches!(state, Some('Z' | 'X')),
            "the receiver exited\n{}",
            self.c.logs()
        );
    }

    fn assert_untouched(&self) {
        assert_eq!(
            self.world(),
            self.before,
            "something outside the replica changed"
        );
    }

    /// Waits for a receiver log line containing `needle` (at WARN or ERROR if `problem`).
    async fn wait_log(&self, needle: &str, problem: bool) {
        let start = Instant::now();
        loop {
            let found = self
                .c
                .log_lines("receiver.log", needle)
                .into_iter()
                .any(|l| !problem || l.contains(" WARN ") || l.contains(" ERROR "));
            if found {
                return;
            }
            assert!(
                start.elapsed() < WAIT,
                "no receiver log line with {needle:?}\n{}",
                self.c.logs()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

async fn read_frame(recv: &mut quinn::RecvStream, dec: &mut FrameDecoder) -> Option<Frame> {
    loop {
        match dec.next_frame() {
            Ok(Some(f)) => return Some(f),
            Ok(None) => {}
            Err(_) => return None,
        }
        match recv.read_chunk(64 << 10, true).await {
            Ok(Some(chunk)) => dec.push(&chunk.bytes),
            _ => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn escaping_paths_are_refused() {
    if !require_root() {
        return;
    }
    let t = Target::start().await;
    let outside = t.outside.display().to_string();
    let attacks: Vec<(Op, String)> = vec![
        (
            write(format!("../{ESCAPED}"), 0, b"x"),
            format!("refused path ../{ESCAPED}: path has an empty, '.' or '..' component"),
        ),
        (
            write(format!("../../{ESCAPED}"), 0, b"x"),
            format!("refused path ../../{ESCAPED}:"),
        ),
        (
            write(format!("a/../../{ESCAPED}"), 0, b"x"),
            format!("refused path a/../../{ESCAPED}:"),
        ),
        (
            write(format!("{outside}/{ESCAPED}"), 0, b"x"),
            format!("refused path {outside}/{ESCAPED}: absolute path"),
        ),
        (
            write(format!("nul\0/../../{ESCAPED}"), 0, b"x"),
            "path contains a NUL byte".into(),
        ),
        (
            Op::Truncate {
                path: rel("../../outside/keep"),
                size: 0,
            },
            "refused path ../../outside/keep:".into(),
        ),
        (
            Op::Remove {
                path: rel(format!("{outside}/keep")),
            },
            format!("refused path {outside}/keep: absolute path"),
        ),
        (
            Op::Rmdir {
                path: rel("../../outside/sub"),
            },
            "refused path ../../outside/sub:".into(),
        ),
        (
            Op::Mkdir {
                path: rel(format!("../../{ESCAPED}-dir")),
                mode: 0o755,
            },
            format!("refused path ../../{ESCAPED}-dir:"),
        ),
        (
            Op::Rename {
                from: rel("ok-warmup"),
                to: rel(format!("../{ESCAPED}-renamed")),
                flags: 0,
            },
            format!("refused path ../{ESCAPED}-renamed:"),
        ),
    ];
    let (ops, needles): (Vec<_>, Vec<_>) = attacks.into_iter().unzip();
    t.apply(ops).await;
    for n in &needles {
        t.wait_log(n, true).await;
    }
    t.assert_untouched();
    assert!(
        t.c.replica.join("ok-warmup").exists(),
        "the refused rename left its source alone"
    );
    t.behaves("after-paths").await;
    t.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn symlinks_in_the_replica_do_not_lead_out() {
    if !require_root() {
        return;
    }
    let t = Target::start().await;
    // Planted in the replica (as if someone on the target host had): one absolute, one
    // relative link to the directory outside.
    std::os::unix::fs::symlink(&t.outside, t.c.replica.join("link")).unwrap();
    std::os::unix::fs::symlink("../../outside", t.c.replica.join("rel")).unwrap();
    std::os::unix::fs::symlink(t.outside.join("keep"), t.c.replica.join("keeplink")).unwrap();
    t.apply(vec![
        write("link/file", 0, b"x"),
        write("rel/file", 0, b"x"),
        write("link/keep", 0, b"overwritten"),
        // The final component is a symlink to a file outside: never written through.
        write("keeplink", 0, b"overwritten"),
        Op::Truncate {
            path: rel("keeplink"),
            size: 0,
        },
        write("victim", 0, b"v"),
        Op::Rename {
            from: rel("victim"),
            to: rel("link/x"),
            flags: 0,
        },
        Op::Rename {
            from: rel("rel/keep"),
            to: rel("stolen"),
            flags: 0,
        },
        Op::Mkdir {
            path: rel("link/newdir"),
            mode: 0o755,
        },
        Op::Remove {
            path: rel("link/keep"),
        },
        Op::Rmdir {
            path: rel("rel/sub"),
        },
    ])
    .await;
    for needle in [
        "write link/file:",
        "write rel/file:",
        "write link/keep:",
        "write keeplink:",
        "truncate keeplink:",
        "rename link/x:",
        "rename rel/keep:",
        "mkdir link/newdir:",
        "remove link/keep:",
        "rmdir rel/sub:",
    ] {
        t.wait_log(needle, true).await;
    }
    t.assert_untouched();
    assert!(t.c.replica.join("victim").exists() && !t.c.replica.join("stolen").exists());
    t.behaves("after-symlinks").await;
    t.assert_untouched();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn huge_offsets_and_sizes_are_refused() {
    if !require_root() {
        return;
    }
    let t = Target::start().await;
    t.apply(vec![
        write("huge-write", u64::MAX - 2, b"abc"),
        write("huge-write2", 1 << 63, b"abc"),
        Op::Truncate {
            path: rel("huge-truncate"),
            size: u64::MAX,
        },
    ])
    .await;
    for needle in [
        "write huge-write:",
        "write huge-write2:",
        "truncate huge-truncate:",
    ] {
        t.wait_log(needle, true).await;
    }
    for f in ["huge-write", "huge-write2", "huge-truncate"] {
        let len = std::fs::metadata(t.c.replica.join(f)).map_or(0, |m| m.len());
        assert_eq!(len, 0, "{f} grew");
    }
    t.assert_untouched();
    t.behaves("after-huge").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_and_garbage_frames_end_only_their_session() {
    if !require_root() {
        return;
    }
    let t = Target::start().await;
    let cases: [(bool, Vec<u8>, &str); 4] = [
        // A length prefix claiming 4 GiB: refused from the header alone.
        (
            true,
            [&u32::MAX.to_le_bytes()[..], b"tiny"].concat(),
            "frame of 4294967295 bytes exceeds the 8388608 byte limit",
        ),
        // A complete frame whose body is not a Frame.
        (
            true,
            vec![5, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff],
            "session ended: bad frame from the peer: malformed frame",
        ),
        // Garbage instead of Hello.
        (
            false,
            vec![3, 0, 0, 0, 9, 9, 9],
            "session ended: reading Hello: bad frame from the peer: malformed frame",
        ),
        // A frame cut off by the end of the stream.
        (
            true,
            [&1000u32.to_le_bytes()[..], &[0u8; 100]].concat(),
            "in the middle of a frame (104 bytes left over)",
        ),
    ];
    for (i, (after_hello, bytes, needle)) in cases.into_iter().enumerate() {
        t.raw(after_hello, &bytes).await;
        t.wait_log(needle, true).await;
        t.behaves(&format!("after-frame-{i}")).await;
        t.assert_untouched();
    }
}
