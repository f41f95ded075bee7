//! Durability under failure, end to end: processes SIGKILLed in the middle of a write
//! storm, a network link cut for longer than the QUIC idle timeout, a full target disk.
//! In every case the replica must end up byte-identical to the source by itself.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use doppel_tests::cluster::{Cluster, Options};
use doppel_tests::disk::LoopDisk;
use doppel_tests::netns::NetPair;
use doppel_tests::writer::{Stats, Writer};
use doppel_tests::{require_root, tree};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The random workload of `writer.rs` on a thread, about 100 files alive in 6
/// directories, `pace` of sleep after every step. Dropping it stops the thread.
struct Storm {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<std::io::Result<Stats>>>,
}

impl Storm {
    fn start(root: &Path, seed: u64, pace: Duration) -> Storm {
        let stop = Arc::new(AtomicBool::new(false));
        let root = root.to_path_buf();
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut w = Writer::new(&root, seed);
            for _ in 0..5 {
                w.mkdir()?;
            }
            while !flag.load(Ordering::Relaxed) {
                w.step()?;
                while w.files() < 90 {
                    w.create()?;
                }
                std::thread::sleep(pace);
            }
            Ok(w.stats)
        });
        Storm {
            stop,
            thread: Some(thread),
        }
    }

    /// Stops the writer and returns what it did; a failed write fails the test.
    fn finish(mut self) -> Stats {
        self.stop.store(true, Ordering::Relaxed);
        let t = self.thread.take().expect("joined once");
        t.join()
            .expect("the writer thread panicked")
            .expect("the writer failed")
    }
}

impl Drop for Storm {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn ms(rng: &mut StdRng, r: std::ops::Range<u64>) -> Duration {
    Duration::from_millis(rng.gen_range(r))
}

/// How long the storm of the kill tests runs (at least; it goes on until 20 kills).
const STORM: Duration = Duration::from_secs(16);
const MIN_KILLS: usize = 20;

/// SIGKILLs the receiver at random moments (at least 20 times) during a write storm.
/// Only a few kills can land in a running session: a killed receiver sends no
/// CONNECTION_CLOSE and its successor cannot send a stateless reset the agent accepts,
/// so the agent only notices at the QUIC idle timeout (10 s). The kills in between hit a
/// receiver that is starting, handshaking or idle.
#[test]
fn receiver_sigkill_during_write_storm() {
    if !require_root() {
        return;
    }
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    let storm = Storm::start(&c.source, seed, Duration::from_millis(1));
    let start = Instant::now();
    let (mut kills, mut in_session) = (0, 0);
    let mut log_at = 0;
    while start.elapsed() < STORM || kills < MIN_KILLS {
        std::thread::sleep(ms(&mut rng, 50..700));
        assert!(
            c.receiver_alive(),
            "the receiver died by itself\n{}",
            c.logs()
        );
        c.kill_receiver();
        kills += 1;
        // Did this receiver instance have a session with the agent when it was killed?
        let log = c.log("receiver.log");
        if log
            .get(log_at..)
            .is_some_and(|t| t.contains("session started"))
        {
            in_session += 1;
        }
        std::thread::sleep(ms(&mut rng, 0..300));
        log_at = c.log("receiver.log").len();
        c.start_receiver().unwrap();
    }
    let stats = storm.finish();
    eprintln!(
        "{kills} receiver kills in {:?} ({in_session} of them during a session); writer: {stats:?}",
        start.elapsed()
    );
    assert!(
        in_session >= 1,
        "no kill hit a running session:\n{}",
        c.logs()
    );
    c.assert_converges(Duration::from_secs(30));
    assert!(c.receiver_alive() && c.agent_alive(), "{}", c.logs());
}

/// Kills the agent at least 20 times during a write storm. Each restart copies the set
/// again (ending every directory with a Prune, so what the source lost while no agent
/// ran goes from the replica too); the replica must converge.
#[test]
fn agent_sigkill_during_write_storm_hybrid() {
    agent_sigkill_during_write_storm("hybrid");
}

/// In store-and-forward mode a restarted agent replays its journal in the same epoch:
/// the receiver resumes after what it applied instead of starting over.
#[test]
fn agent_sigkill_during_write_storm_store_and_forward() {
    agent_sigkill_during_write_storm("store-and-forward");
}

fn agent_sigkill_during_write_storm(mode: &str) {
    if !require_root() {
        return;
    }
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}, queue {mode}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut c = Cluster::with_agent_extra("data", &format!("queue = \"{mode}\"")).unwrap();
    c.start().unwrap();
    let storm = Storm::start(&c.source, seed, Duration::from_millis(1));
    let start = Instant::now();
    let mut kills = 0;
    while start.elapsed() < STORM || kills < MIN_KILLS {
        std::thread::sleep(ms(&mut rng, 50..700));
        assert!(c.agent_alive(), "the agent died by itself\n{}", c.logs());
        c.kill_agent();
        kills += 1;
        std::thread::sleep(ms(&mut rng, 0..300));
        c.start_agent().unwrap();
    }
    let stats = storm.finish();
    let epochs = c
        .log_lines("receiver.log", "new epoch: the agent starts the set over")
        .len();
    let replays = c.log_lines("agent.log", "journal replayed").len();
    eprintln!(
        "{kills} agent kills in {:?}; the receiver saw {epochs} new epochs, the agent replayed its journal {replays} times; writer: {stats:?}",
        start.elapsed()
    );
    if mode == "store-and-forward" {
        assert!(
            replays >= kills / 2 && epochs <= 2,
            "a restarted store-and-forward agent must resume its journal, not start over:\n{}",
            c.logs()
        );
    } else {
        assert!(
            epochs >= 1,
            "the receiver never saw a restarted agent:\n{}",
            c.logs()
        );
    }
    c.assert_converges(Duration::from_secs(30));
    assert!(c.receiver_alive() && c.agent_alive(), "{}", c.logs());
}

/// Agent and receiver in two network namespaces joined by a veth pair; the link goes
/// down for 30 s (three idle timeouts) while the source keeps changing.
#[test]
fn link_cut_for_30s_in_network_namespaces() {
    if !require_root() {
        return;
    }
    let seed = rand::random::<u64>();
    eprintln!("seed {seed}");
    // Declared before the cluster: dropped after it, once both processes are gone.
    let net = NetPair::create().unwrap();
    let (agent_side, receiver_side) = (&net.a, &net.b);
    let mut c = Cluster::with_options(
        "data",
        Options {
            listen: Some(SocketAddr::from((receiver_side.addr, 7443))),
            agent_wrapper: agent_side.wrapper(),
            receiver_wrapper: receiver_side.wrapper(),
            ..Options::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    let storm = Storm::start(&c.source, seed, Duration::from_millis(2));
    std::thread::sleep(Duration::from_secs(3));
    let failures_before = c.log_lines("agent.log", "replication session failed").len();
    let connects_before = c.log_lines("agent.log", "connected; resuming").len();
    assert!(connects_before >= 1, "never connected:\n{}", c.logs());

    net.set_link(agent_side, false).unwrap();
    let cut = Instant::now();
    std::thread::sleep(Duration::from_secs(30));
    // The cut outlasted the idle timeout: the agent noticed and is retrying.
    let failures = c.log_lines("agent.log", "replication session failed").len();
    assert!(
        failures > failures_before,
        "the agent did not notice a 30 s link cut:\n{}",
        c.logs()
    );
    net.set_link(agent_side, true).unwrap();
    eprintln!(
        "link down for {:?}; {} failed sessions meanwhile",
        cut.elapsed(),
        failures - failures_before
    );
    std::thread::sleep(Duration::from_secs(1));
    let stats = storm.finish();
    eprintln!("writer: {stats:?}");
    c.assert_converges(Duration::from_secs(30));
    let connects = c.log_lines("agent.log", "connected; resuming").len();
    assert!(
        connects > connects_before,
        "converged without a reconnect?\n{}",
        c.logs()
    );
    assert!(c.receiver_alive() && c.agent_alive(), "{}", c.logs());
}

/// The replica root is a 64 MiB ext4 image with 4 MiB free; the source gets 16 MiB.
/// The receiver must say so, stay up, and finish by itself once space returns.
#[test]
fn target_disk_full_then_space_returns() {
    if !require_root() {
        return;
    }
    // Declared before the cluster: unmounted after the receiver is gone.
    let disk = LoopDisk::new(64).unwrap();
    let mut c = Cluster::with_options(
        "data",
        Options {
            replica_root: Some(disk.mnt.clone()),
            ..Options::default()
        },
    )
    .unwrap();
    // Leave 4 MiB free: the filler takes the rest (allocated, not sparse).
    let filler = disk.mnt.join("filler");
    let free = 4 << 20;
    let f = std::fs::File::create(&filler).unwrap();
    let len = (disk.available() - free) as libc::off_t;
    assert_eq!(
        unsafe { libc::fallocate(std::os::fd::AsRawFd::as_raw_fd(&f), 0, 0, len) },
        0,
        "fallocate the filler: {}",
        std::io::Error::last_os_error()
    );
    f.sync_all().unwrap();
    drop(f);
    eprintln!("free on the target: {} KiB", disk.available() >> 10);

    c.start().unwrap();
    let receiver_pid = c.receiver_pid();
    // 16 MiB of incompressible data plus a few small files and a directory: 4 times what
    // fits.
    let mut rng = StdRng::seed_from_u64(rand::random());
    std::fs::create_dir(c.source.join("dir")).unwrap();
    for i in 0..16 {
        let mut data = vec![0u8; 1 << 20];
        rng.fill(&mut data[..]);
        std::fs::write(c.source.join(format!("big-{i:02}.bin")), &data).unwrap();
        std::fs::write(c.source.join(format!("dir/small-{i:02}")), &data[..100]).unwrap();
    }

    let start = Instant::now();
    let enospc = loop {
        let lines = c.log_lines("receiver.log", "No space left on device");
        if !lines.is_empty() {
            break lines;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the receiver did not report a full disk:\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    eprintln!("receiver reports: {}", enospc[0]);
    // Let the agent retry against the full disk for a while.
    std::thread::sleep(Duration::from_secs(3));
    assert!(
        c.receiver_alive(),
        "the receiver died on a full disk:\n{}",
        c.logs()
    );
    let tries = c.log_lines("receiver.log", "No space left on device").len();
    let agent_sees = c.log_lines("agent.log", "No space left on device");
    eprintln!(
        "{tries} receiver log lines about the full disk; the agent logged {} (first: {})",
        agent_sees.len(),
        agent_sees.first().map_or("none", |s| s.as_str())
    );
    assert!(
        tree::wait_equal(&c.source, &c.replica, Duration::ZERO).is_err(),
        "the replica cannot be complete on a full disk"
    );

    std::fs::remove_file(&filler).unwrap();
    c.assert_converges(Duration::from_secs(30));
    assert!(c.receiver_alive() && c.agent_alive(), "{}", c.logs());
    assert_eq!(
        c.receiver_pid(),
        receiver_pid,
        "the receiver was not restarted"
    );
}
