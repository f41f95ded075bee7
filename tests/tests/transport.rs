//! Transport options end to end: the bandwidth cap and zstd compression of batches, with
//! a real agent and receiver.
//!
//! Compression is observed through the cap: the throttle counts bytes as they go on the
//! wire (after compression), so a compressible file replicates much faster under the
//! same cap than its size allows uncompressed.

use std::io::Write;
use std::time::{Duration, Instant};

use doppel_tests::cluster::{Cluster, Options};
use doppel_tests::{require_root, tree};

const MIB: usize = 1 << 20;
/// The cap of both tests, bytes/s.
const LIMIT: f64 = 2_000_000.0;

fn cluster(target_extra: &str) -> Cluster {
    let mut c = Cluster::with_options(
        "data",
        Options {
            agent_target_extra: target_extra.to_string(),
            ..Options::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    c
}

/// Writes `mib` MiB made by `chunk(i)` (one MiB each) to `name` in the source.
fn write_file(c: &Cluster, name: &str, mib: usize, chunk: impl Fn(usize) -> Vec<u8>) {
    let mut f = std::fs::File::create(c.source.join(name)).unwrap();
    for i in 0..mib {
        let data = chunk(i);
        assert_eq!(data.len(), MIB);
        f.write_all(&data).unwrap();
    }
    f.sync_all().unwrap();
}

/// Waits for the replica to equal the source; returns the time since `start`.
fn converge(c: &Cluster, start: Instant, within: Duration) -> Duration {
    match tree::wait_equal(&c.source, &c.replica, within) {
        Ok(_) => start.elapsed(),
        Err(diffs) => panic!(
            "replica differs after {within:?}:\n{}\n{}",
            diffs.join("\n"),
            c.logs()
        ),
    }
}

#[test]
fn a_bandwidth_limit_slows_replication_to_the_rate() {
    if !require_root() {
        return;
    }
    let c = cluster("bandwidth_limit = 2000000");
    let start = Instant::now();
    // Random bytes do not compress, so wire bytes are file bytes (compression is on by
    // default and skips them).
    let mib = 10;
    write_file(&c, "random.bin", mib, |_| {
        (0..MIB).map(|_| rand::random::<u8>()).collect()
    });
    let took = converge(&c, start, Duration::from_secs(60));
    eprintln!("{mib} MiB at {LIMIT} bytes/s took {took:?}");
    // The bucket lets a quarter second's worth through at once, and the last frame's
    // cost is paid by no one: everything else waits for the rate.
    let least = ((mib * MIB) as f64 - LIMIT * 0.25 - MIB as f64) / LIMIT;
    assert!(
        took.as_secs_f64() >= least.min(4.0),
        "{mib} MiB replicated in {took:?}, faster than the {LIMIT} bytes/s cap allows ({least:.1} s)"
    );
}

#[test]
fn compressible_data_replicates_compressed() {
    if !require_root() {
        return;
    }
    let c = cluster("compression_level = 3\nbandwidth_limit = 2000000");
    let start = Instant::now();
    let mib = 50;
    // Log-like lines: zstd shrinks them many times over.
    write_file(&c, "log.txt", mib, |i| {
        let mut out = Vec::with_capacity(MIB);
        let mut n = i * MIB;
        while out.len() < MIB {
            let line = format!("{n:012} INFO request served: GET /index.html 200 OK\n");
            out.extend_from_slice(line.as_bytes());
            n += 1;
        }
        out.truncate(MIB);
        out
    });
    let took = converge(&c, start, Duration::from_secs(60));
    // Uncompressed, 50 MiB under the cap need about 26 s.
    let plain = (mib * MIB) as f64 / LIMIT;
    eprintln!(
        "{mib} MiB of text under a {LIMIT} bytes/s cap took {took:?} (uncompressed: {plain:.0} s)"
    );
    assert!(
        took.as_secs_f64() < plain * 0.6,
        "{mib} MiB took {took:?}: fewer bytes should cross the wire than the file holds\n{}",
        c.logs()
    );
}
