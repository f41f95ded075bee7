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
    // Kept by policy: not a difference to verify, and a repair leaves it.
    for args in [&[][..], &["--repair"][..]] {
        let (code, r) = verify(&c, args);
        assert_eq!(code, 0, "{r}");
        assert_eq!(r["findings"], serde_json::json!([]), "{r}");
    }
    assert!(c.replica.join("orphan").exists());
}

/// `orphans = "move-aside"`: what only the replica has goes to
/// `.doppel-orphans/<mirror start>/`, intact and at its relative path, and stays there
/// through later mirrors; the rest of the replica is an exact copy.
#[test]
fn orphans_are_moved_aside_when_configured() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_agent_extra("data", "orphans = \"move-aside\"").unwrap();
    fs::create_dir_all(c.replica.join("olddir/deeper")).unwrap();
    fs::create_dir_all(c.replica.join("d")).unwrap();
    fs::create_dir_all(c.source.join("d")).unwrap();
    fs::write(c.replica.join("orphan"), b"written on the target").unwrap();
    fs::write(c.replica.join("olddir/deeper/x"), b"old x").unwrap();
    fs::write(c.replica.join("d/stale"), b"stale in a kept dir").unwrap();
    fs::write(c.source.join("a"), b"from the source").unwrap();
    fs::write(c.source.join("d/keep"), b"kept").unwrap();
    let before = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    c.start().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();

    let aside = c.replica.join(".doppel-orphans");
    let batches: Vec<_> = fs::read_dir(&aside)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(batches.len(), 1, "{batches:?}");
    let batch = &batches[0];
    let stamp: u64 = batch
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(
        stamp >= before && stamp <= before + 30,
        "{stamp} vs {before}"
    );
    assert_eq!(
        fs::read(batch.join("orphan")).unwrap(),
        b"written on the target"
    );
    assert_eq!(fs::read(batch.join("olddir/deeper/x")).unwrap(), b"old x");
    assert_eq!(
        fs::read(batch.join("d/stale")).unwrap(),
        b"stale in a kept dir"
    );
    for gone in ["orphan", "olddir", "d/stale"] {
        assert!(
            !c.replica.join(gone).exists(),
            "{gone} is still in the replica"
        );
    }
    assert_eq!(fs::read(c.replica.join("d/keep")).unwrap(), b"kept");

    // A later mirror (agent restart) keeps the earlier batch and moves new orphans to
    // a batch of its own; the source's own `.doppel-orphans`, if any, is not replicated.
    c.kill_agent();
    fs::write(c.replica.join("orphan2"), b"second").unwrap();
    fs::create_dir_all(c.source.join(".doppel-orphans")).unwrap();
    fs::write(c.source.join(".doppel-orphans/mine"), b"source-side").unwrap();
    std::thread::sleep(Duration::from_millis(1100)); // a new second: a new batch
    c.start_agent().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    let mut batches: Vec<_> = fs::read_dir(&aside)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    batches.sort();
    assert_eq!(batches.len(), 2, "{batches:?}");
    assert_eq!(
        fs::read(batches[0].join("orphan")).unwrap(),
        b"written on the target"
    );
    assert_eq!(fs::read(batches[1].join("orphan2")).unwrap(), b"second");
    assert!(!aside.join("mine").exists());
    assert_eq!(fs::read(c.replica.join("a")).unwrap(), b"from the source");
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

/// `doppel-agent status --json`, parsed.
fn status(c: &Cluster) -> serde_json::Value {
    let o = c.agent_command(&["status", "--json"]);
    assert!(
        o.status.success(),
        "status failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).expect("status is JSON")
}

/// Waits until the agent says every change is acknowledged and no comparison pends.
fn wait_synced(c: &Cluster) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let s = status(c);
        if s["synced"] == true {
            return s;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "not synced: {s}\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `doppel-agent verify --json ARGS`: its exit status and its report.
fn verify(c: &Cluster, args: &[&str]) -> (i32, serde_json::Value) {
    let mut all = vec!["verify", "--json"];
    all.extend_from_slice(args);
    let o = c.agent_command(&all);
    let out = String::from_utf8_lossy(&o.stdout);
    let report = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find_map(|v| v.get("report").cloned())
        .unwrap_or_else(|| {
            panic!(
                "verify printed no report: {out}\n{}\n{}",
                String::from_utf8_lossy(&o.stderr),
                c.logs()
            )
        });
    (o.status.code().unwrap_or(-1), report)
}

fn sent_bytes(s: &serde_json::Value) -> u64 {
    s["sets"][0]["sent_bytes"].as_u64().unwrap()
}

#[test]
fn verify_finds_a_flipped_byte_and_repair_sends_about_one_block() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(21);
    random_file(&c.source.join("big"), 100 * MIB, &mut rng);
    fs::write(c.source.join("small"), b"a small file").unwrap();
    fs::write(c.source.join("empty"), b"").unwrap();
    fs::create_dir(c.source.join("sub")).unwrap();
    fs::write(c.source.join("sub/kept"), b"in a directory").unwrap();
    fs::create_dir(c.source.join("sub/empty")).unwrap();
    c.start().unwrap();
    c.assert_identical(Duration::from_secs(60));
    // The mirror's progress: every byte queued for comparison was compared.
    let s = wait_synced(&c);
    let queued = s["mirror_queued_bytes"].as_u64().unwrap();
    assert!(queued >= 100 * MIB as u64, "{s}");
    assert_eq!(s["mirror_compared_bytes"].as_u64().unwrap(), queued, "{s}");

    let (code, r) = verify(&c, &[]);
    assert_eq!(code, 0, "{r}");
    assert_eq!(r["files"], 4, "{r}");
    assert_eq!(r["findings"].as_array().unwrap().len(), 0, "{r}");

    // Corruption planted on the replica: one flipped byte, one wrong mode, one lost
    // file, one lost (empty) directory, and entries the source does not have (a file, a
    // directory tree, a symlink in a subdirectory).
    let off = 37 * MIB as u64 + 12_345;
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(c.replica.join("big"))
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, off).unwrap();
    f.write_all_at(&[b[0] ^ 0x01], off).unwrap();
    drop(f);
    fs::set_permissions(c.replica.join("small"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(c.replica.join("empty")).unwrap();
    fs::write(c.replica.join("planted"), b"not on the source").unwrap();
    fs::create_dir_all(c.replica.join("stray/deeper")).unwrap();
    fs::write(c.replica.join("stray/deeper/x"), b"x").unwrap();
    std::os::unix::fs::symlink("/etc/passwd", c.replica.join("sub/link")).unwrap();
    fs::remove_dir(c.replica.join("sub/empty")).unwrap();

    let (code, r) = verify(&c, &[]);
    assert_eq!(code, 1, "{r}");
    let findings = r["findings"].as_array().unwrap();
    assert_eq!(findings.len(), 7, "{r}");
    let by_path = |p: &str| findings.iter().find(|f| f["path"] == p).unwrap().clone();
    let block = 64 * 1024;
    assert_eq!(
        by_path("big")["ranges"],
        serde_json::json!([[off / block * block, block]]),
        "{r}"
    );
    assert_eq!(by_path("small")["attr"], true, "{r}");
    assert_eq!(by_path("small")["ranges"], serde_json::json!([]), "{r}");
    assert_eq!(by_path("empty")["missing"], true, "{r}");
    assert_eq!(by_path("sub/empty")["missing"], true, "{r}");
    for extra in ["planted", "stray", "sub/link"] {
        assert_eq!(by_path(extra)["extra"], true, "{r}");
    }
    assert!(findings.iter().filter(|f| f["extra"] == true).count() == 3);
    // The replica is left as it was.
    assert!(!c.replica.join("empty").exists());
    assert!(c.replica.join("stray/deeper/x").exists());

    let before = sent_bytes(&wait_synced(&c));
    let (code, r) = verify(&c, &["--repair"]);
    assert_eq!(code, 0, "{r}");
    c.assert_identical(Duration::from_secs(30));
    let sent = sent_bytes(&wait_synced(&c)) - before;
    eprintln!("repair sent {sent} data bytes");
    assert_eq!(sent, block, "the repair sends the one differing block");
    let (code, r) = verify(&c, &[]);
    assert_eq!(code, 0, "{r}");
}

#[test]
fn after_a_journal_overflow_only_the_marked_entries_are_copied_again() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_options(
        "data",
        doppel_tests::cluster::Options {
            set_extra: "queue = \"store-and-forward\"".into(),
            agent_extra: "journal_budget_mib = 1\njournal_fsync = \"never\"".into(),
            ..Default::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(31);
    let src = c.source.clone();
    for d in ["a", "b", "c", "quiet"] {
        fs::create_dir_all(src.join(d)).unwrap();
    }
    random_file(&src.join("quiet/big"), 16 * MIB, &mut rng);
    fs::write(src.join("b/x"), b"renamed while the journal was full").unwrap();
    fs::write(src.join("c/gone"), b"deleted while the journal was full").unwrap();
    c.start().unwrap();
    c.assert_identical(Duration::from_secs(30));
    wait_synced(&c);

    // The receiver is away and the changes outgrow the 1 MiB journal.
    c.kill_receiver();
    random_file(&src.join("a/hot"), 4 * MIB, &mut rng);
    fs::rename(src.join("b/x"), src.join("b/y")).unwrap();
    fs::remove_file(src.join("c/gone")).unwrap();
    fs::create_dir_all(src.join("d/e")).unwrap();
    fs::write(src.join("d/e/new"), b"made while the journal was full").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    c.start_receiver().unwrap();
    c.assert_identical(Duration::from_secs(60));
    let log = c.log("agent.log");
    assert!(
        log.contains("journal budget reached"),
        "the journal never overflowed, so this proves nothing\n{}",
        c.logs()
    );
    assert!(
        log.contains("marked entries only") && !log.contains("comparing the whole set"),
        "{}",
        c.logs()
    );
}

#[test]
fn the_quick_check_skips_files_whose_size_and_mtime_match() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_agent_extra("data", "mirror_quick_check = true").unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(41);
    let (src, dst) = (c.source.clone(), c.replica.clone());
    fs::create_dir_all(&dst).unwrap();
    for n in ["same", "touched", "sneaky"] {
        random_file(&src.join(n), 8 * MIB, &mut rng);
        fs::copy(src.join(n), dst.join(n)).unwrap();
    }
    let stale = |n: &str, keep_mtime: bool| {
        let f = fs::OpenOptions::new()
            .write(true)
            .open(dst.join(n))
            .unwrap();
        f.write_all_at(b"stale", 5 * MIB as u64).unwrap();
        if keep_mtime {
            f.set_modified(fs::metadata(src.join(n)).unwrap().modified().unwrap())
                .unwrap();
        }
    };
    // Same size and mtime: skipped, and right to be.
    let f = fs::File::options()
        .write(true)
        .open(dst.join("same"))
        .unwrap();
    f.set_modified(fs::metadata(src.join("same")).unwrap().modified().unwrap())
        .unwrap();
    drop(f);
    // Stale content with another mtime: compared and fixed.
    stale("touched", false);
    // Stale content behind the source's size and mtime: the documented blind spot.
    stale("sneaky", true);
    c.start().unwrap();
    let s = wait_synced(&c);
    let start = Instant::now();
    while fs::read(dst.join("touched")).unwrap() != fs::read(src.join("touched")).unwrap() {
        assert!(start.elapsed() < Duration::from_secs(20), "{}", c.logs());
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        fs::read(dst.join("same")).unwrap(),
        fs::read(src.join("same")).unwrap()
    );
    assert_ne!(
        fs::read(dst.join("sneaky")).unwrap(),
        fs::read(src.join("sneaky")).unwrap(),
        "the quick check compares size and mtime only"
    );
    // Only the touched KiB crossed.
    assert!(sent_bytes(&wait_synced(&c)) <= 4096, "{s}");
    // verify compares every block, and --repair fixes what the quick check missed.
    let (code, r) = verify(&c, &[]);
    assert_eq!(code, 1, "{r}");
    assert_eq!(r["findings"][0]["path"], "sneaky", "{r}");
    let (code, _) = verify(&c, &["--repair"]);
    assert_eq!(code, 0);
    c.assert_identical(Duration::from_secs(20));
}
