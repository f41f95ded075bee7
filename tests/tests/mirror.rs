//! The mirror compares files with the replica by block checksums and sends only what
//! differs: a stale replica converges, live writes during the mirror are not overwritten
//! by older mirror blocks, and orphans are deleted or kept as configured.

use std::fs;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::Path;
use std::time::{Duration, Instant};

use doppel_tests::cluster::Cluster;
use doppel_tests::require_root;
use rand::{Rng, RngCore, SeedableRng};

const MIB: usize = 1 << 20;

fn random_file(p: &Path, len: usize, rng: &mut impl RngCore) {
    let mut data = vec![0u8; len];
    rng.fill_bytes(&mut data);
    fs::write(p, data).unwrap();
}

/// The agent's latest status line's `key=value` for `key`, once one is logged.
fn status_value(c: &Cluster, key: &str, within: Duration) -> u64 {
    let start = Instant::now();
    loop {
        let lines = c.log_lines("agent.log", "status");
        if let Some(v) = lines.last().and_then(|l| {
            l.split_whitespace()
                .find_map(|w| w.strip_prefix(&format!("{key}=")))
                .and_then(|v| v.parse().ok())
        }) {
            return v;
        }
        assert!(
            start.elapsed() < within,
            "no status line with {key} within {within:?}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Waits for a status line logged after now.
fn next_status_value(c: &Cluster, key: &str) -> u64 {
    let before = c.log_lines("agent.log", "status").len();
    let start = Instant::now();
    while c.log_lines("agent.log", "status").len() == before {
        assert!(start.elapsed() < Duration::from_secs(15), "no status line");
        std::thread::sleep(Duration::from_millis(200));
    }
    status_value(c, key, Duration::from_secs(1))
}

#[test]
fn a_stale_replica_converges_and_only_differences_cross_the_wire() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let (src, dst) = (c.source.clone(), c.replica.clone());
    fs::create_dir_all(src.join("dir")).unwrap();
    fs::create_dir_all(&dst).unwrap();
    // Eight 8 MiB files: copies on the replica, then made stale in different ways.
    let names = [
        "same",
        "midfile",
        "truncated",
        "extended",
        "mode",
        "owner",
        "dir/deep",
        "gone",
    ];
    for n in names {
        random_file(&src.join(n), 8 * MIB, &mut rng);
    }
    fs::create_dir_all(dst.join("dir")).unwrap();
    for n in names {
        if n != "gone" {
            fs::copy(src.join(n), dst.join(n)).unwrap();
        }
    }
    // Bytes changed in the middle of a file (one 64 KiB block).
    fs::OpenOptions::new()
        .write(true)
        .open(dst.join("midfile"))
        .unwrap()
        .write_all_at(b"stale bytes", 3 * MIB as u64 + 17)
        .unwrap();
    // A replica shorter than the source, and one longer.
    fs::OpenOptions::new()
        .write(true)
        .open(dst.join("truncated"))
        .unwrap()
        .set_len(5 * MIB as u64 + 100)
        .unwrap();
    let f = fs::OpenOptions::new()
        .append(true)
        .open(dst.join("extended"))
        .unwrap();
    f.write_all_at(&vec![7u8; MIB], 8 * MIB as u64).unwrap();
    // Wrong mode and owner.
    fs::set_permissions(dst.join("mode"), fs::Permissions::from_mode(0o600)).unwrap();
    std::os::unix::fs::chown(dst.join("owner"), Some(1234), Some(4321)).unwrap();
    // Orphans: a file and a directory tree only the replica has.
    fs::write(dst.join("orphan"), b"only on the replica").unwrap();
    fs::create_dir_all(dst.join("old/tree")).unwrap();
    fs::write(dst.join("old/tree/x"), b"x").unwrap();

    c.start().unwrap();
    c.assert_identical(Duration::from_secs(30));
    let total = (names.len() * 8 * MIB) as u64;
    // What had to cross: "gone" (8 MiB), "truncated"'s missing tail (3 MiB), one block
    // of "midfile". A whole copy would be 64 MiB.
    let sent = next_status_value(&c, "sent_bytes");
    eprintln!("sent {sent} data bytes of {total}");
    assert!(
        sent < 12 * MIB as u64,
        "the mirror sent {sent} bytes for about 11 MiB of differences\n{}",
        c.logs()
    );
    assert!(
        sent >= 11 * MIB as u64,
        "sent {sent}: the differences must be sent"
    );
    assert!(!dst.join("orphan").exists() && !dst.join("old").exists());
}

#[test]
fn orphans_are_kept_when_configured() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_agent_extra("data", "orphans = \"keep\"").unwrap();
    fs::create_dir_all(&c.replica).unwrap();
    fs::write(c.replica.join("orphan"), b"written on the target").unwrap();
    fs::write(c.source.join("a"), b"from the source").unwrap();
    c.start().unwrap();
    let start = Instant::now();
    while fs::read(c.replica.join("a")).ok().as_deref() != Some(b"from the source".as_slice()) {
        assert!(start.elapsed() < Duration::from_secs(10), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(50));
    }
    fs::write(c.source.join("b"), b"later").unwrap();
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        fs::read(c.replica.join("orphan")).unwrap(),
        b"written on the target"
    );
}

#[test]
fn writes_during_the_mirror_of_a_large_file_end_up_correct() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    let big = c.source.join("big.img");
    random_file(&big, 192 * MIB, &mut rng);
    // A stale replica: every comparison finds some blocks to send.
    fs::create_dir_all(&c.replica).unwrap();
    fs::copy(&big, c.replica.join("big.img")).unwrap();
    let f = fs::OpenOptions::new()
        .write(true)
        .open(c.replica.join("big.img"))
        .unwrap();
    for i in 0..192 {
        f.write_all_at(b"stale", (i * MIB + 4096) as u64).unwrap();
    }
    drop(f);
    // A writer hammers the file while the agent starts and mirrors it.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let big = big.clone();
        std::thread::spawn(move || {
            let f = fs::OpenOptions::new().write(true).open(&big).unwrap();
            let mut rng = rand::rngs::StdRng::seed_from_u64(12);
            let mut buf = vec![0u8; 64 << 10];
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let len = rng.gen_range(1..buf.len());
                rng.fill_bytes(&mut buf[..len]);
                let off = rng.gen_range(0..(192 * MIB - len)) as u64;
                f.write_all_at(&buf[..len], off).unwrap();
                n += 1;
            }
            n
        })
    };
    c.start().unwrap();
    std::thread::sleep(Duration::from_secs(3));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let writes = writer.join().unwrap();
    eprintln!("{writes} writes during the mirror");
    assert!(writes > 100);
    c.assert_identical(Duration::from_secs(60));
}
