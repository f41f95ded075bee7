//! The walking skeleton, end to end: real eBPF capture, real QUIC with mutual TLS, real
//! apply. A writer makes 200 files with random pwrite patterns; within 5 s of its last
//! write the replica must be byte-identical to the source.

use std::time::Duration;

use doppel_tests::cluster::Cluster;
use doppel_tests::{require_root, tree, writer};

#[test]
fn random_writes_to_200_files_replicate_exactly() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    // DOPPEL_SEED replays a failing run's workload.
    let seed = std::env::var("DOPPEL_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random::<u64>);
    eprintln!("writer seed {seed}");
    let stats = writer::run(&c.source, 200, 3000, seed).unwrap();
    eprintln!("writer: {stats:?}");
    let files = tree::snapshot(&c.source).unwrap().len();
    assert!(
        files >= 180,
        "the workload should leave about 200 files, found {files}"
    );
    c.assert_converges(Duration::from_secs(5));
}

#[test]
fn existing_files_are_copied_at_start_and_the_receiver_can_restart() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    // Present before the agent starts: the initial scan ships them.
    writer::run(&c.source, 50, 200, 1).unwrap();
    c.start().unwrap();
    c.assert_converges(Duration::from_secs(10));
    // The receiver goes away while the source keeps changing; the agent keeps the
    // records and reconnects with backoff.
    c.kill_receiver();
    let mut w = writer::Writer::new(&c.source, 2);
    for _ in 0..20 {
        w.create().unwrap();
    }
    std::thread::sleep(Duration::from_millis(500));
    c.start_receiver().unwrap();
    c.assert_converges(Duration::from_secs(15));
}

#[test]
fn writes_outside_watched_roots_are_not_replicated() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    let outside = c.dir.path().join("elsewhere");
    std::fs::create_dir(&outside).unwrap();
    std::fs::write(outside.join("secret"), b"not for the replica").unwrap();
    std::fs::write(c.source.join("inside"), b"for the replica").unwrap();
    c.assert_converges(Duration::from_secs(5));
    assert!(!c.dir.path().join("replica/elsewhere").exists());
}

/// A receiver killed and started again is back in the agent's session within a couple
/// of keep-alives: the new process answers the old connection's packets with a
/// stateless reset the agent can verify (the reset key survives restarts), instead of
/// the agent waiting out the 10 s idle timeout.
#[test]
fn a_restarted_receiver_is_reconnected_to_at_once() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    std::fs::write(c.source.join("before"), b"1").unwrap();
    c.assert_converges(Duration::from_secs(10));
    let sessions = |c: &Cluster| c.log_lines("agent.log", "connected; resuming").len();
    let before = sessions(&c);
    c.kill_receiver();
    c.start_receiver().unwrap();
    let t = std::time::Instant::now();
    while sessions(&c) == before {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "the agent did not reconnect within 5 s of the receiver's restart (the idle \
             timeout is 10 s: was the old connection reset?)\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!("reconnected {:?} after the restart", t.elapsed());
    std::fs::write(c.source.join("after"), b"2").unwrap();
    c.assert_converges(Duration::from_secs(5));
}
