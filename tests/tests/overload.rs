//! Overload: a writer far faster than the agent drains, into a tiny capture ring. The
//! writer is never blocked; what did not fit is remembered by the kernel as ranges and
//! re-read. Afterwards the replica must be identical, and the counters must prove that
//! the overflow path was really taken.

use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use doppel_tests::cluster::{Cluster, Options};
use doppel_tests::require_root;

/// The largest value of `key=N` over the agent's status lines.
fn max_counter(c: &Cluster, key: &str) -> u64 {
    c.log_lines("agent.log", "status")
        .iter()
        .filter_map(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        })
        .max()
        .unwrap_or(0)
}

/// The largest `key=N` once one above zero shows up, waiting for status lines (they
/// come every 5 s) to cover the whole run; 0 if none does within 12 s.
fn wait_counter(c: &Cluster, key: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(12);
    loop {
        let n = max_counter(c, key);
        if n > 0 || Instant::now() >= deadline {
            return n;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// A cluster whose agent captures into a 16 KiB ring: four data records fill it.
/// A sysctl set for as long as the value lives, then put back (also when a test fails).
struct Sysctl {
    path: &'static str,
    old: String,
}

impl Sysctl {
    fn set(path: &'static str, value: &str) -> Sysctl {
        let old = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{path}: {e}"));
        std::fs::write(path, value).unwrap_or_else(|e| panic!("{path}: {e}"));
        Sysctl { path, old }
    }
}

impl Drop for Sysctl {
    fn drop(&mut self) {
        let _ = std::fs::write(self.path, self.old.trim());
    }
}

fn tiny_ring(set: &str) -> Cluster {
    let mut c = Cluster::with_options(
        set,
        Options {
            agent_extra: "capture_ring_kib = 16".into(),
            ..Options::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    c
}

#[test]
fn a_full_ring_loses_nothing() {
    if !require_root() {
        return;
    }
    let c = tiny_ring("data");

    // 64 files, random 4 KiB-aligned and unaligned pwrites as fast as one core goes,
    // for two seconds: several hundred thousand writes.
    let files: Vec<std::fs::File> = (0..64)
        .map(|i| {
            std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(c.source.join(format!("f{i:02}.bin")))
                .unwrap()
        })
        .collect();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut buf = vec![0u8; 8192];
    let start = Instant::now();
    let mut writes = 0u64;
    while start.elapsed() < Duration::from_secs(2) {
        for _ in 0..256 {
            let f = &files[(next() % 64) as usize];
            let len = 1 + (next() % 8192) as usize;
            let off = next() % (4 << 20);
            let fill = next();
            for (i, b) in buf[..len].iter_mut().enumerate() {
                *b = (fill as usize + i) as u8;
            }
            f.write_all_at(&buf[..len], off).unwrap();
            writes += 1;
        }
    }
    drop(files);
    let elapsed = start.elapsed();
    eprintln!(
        "{writes} writes in {elapsed:?} ({:.0}/s)",
        writes as f64 / elapsed.as_secs_f64()
    );

    let took = c.assert_converges(Duration::from_secs(60));
    eprintln!("converged {took:?} after the last write");
    c.assert_identical(Duration::from_secs(20));
    let missed = wait_counter(&c, "missed_ranges");
    let lost = max_counter(&c, "lost");
    eprintln!("missed_ranges={missed} lost={lost}");
    assert!(
        missed > 0,
        "the ring never overflowed, so the test proved nothing; agent log:\n{}",
        c.log("agent.log")
    );
}

/// Namespace changes (creates, renames, deletes, new directories) cannot be remembered
/// as ranges: when the ring is full they are lost, counted, and the agent rescans the
/// set. The rescan runs while the storm goes on and must still leave the replica equal
/// to the source: nothing the source deleted or renamed away may survive on the replica.
#[test]
fn lost_namespace_changes_are_recovered_by_a_rescan() {
    if !require_root() {
        return;
    }
    // Namespace changes of a set on ext4 come through fanotify, whose queue is sized
    // when the agent opens it: a small one for this agent, so that the storm overflows
    // it (the ring's own losses stand in on other filesystems).
    let c = {
        let _small = Sysctl::set("/proc/sys/fs/fanotify/max_queued_events", "64");
        tiny_ring("tree")
    };
    let start = std::time::Instant::now();
    let stats = doppel_tests::writer::run(&c.source, 200, 20_000, 11).unwrap();
    eprintln!("{} ops, {} bytes written", stats.ops, stats.bytes);
    let took = c.assert_converges(Duration::from_secs(60));
    eprintln!("converged {took:?} after the last change");
    c.assert_identical(Duration::from_secs(20));
    let lost = wait_counter(&c, "lost");
    assert!(
        lost > 0,
        "no change was lost, so the rescan path was not exercised; agent log:\n{}",
        c.log("agent.log")
    );
    // Full rescans are paced (agent/src/pacing.rs): at most one a second, however often
    // the ring overflows. Deferred ones still run: the replica is identical above.
    let log = c.log("agent.log");
    let at_once = log
        .matches("remember as ranges; rescanning every set")
        .count();
    let deferred = log
        .matches("rescanning every set for the change records")
        .count();
    let secs = start.elapsed().as_secs() as usize;
    eprintln!("full rescans: {at_once} at once, {deferred} deferred, in {secs} s");
    assert!(
        at_once + deferred <= 2 + secs,
        "{at_once} + {deferred} full rescans in {secs} s: pacing allows one a second"
    );
}
