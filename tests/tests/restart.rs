//! A restart compares only the files that changed while no agent watched (stamps, see
//! agent/src/stamps.rs): after a clean stop and after a crash; and everything again when
//! the replica cannot vouch for what the last run left (emptied).

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use doppel_tests::cluster::{Cluster, Options};
use doppel_tests::require_root;
use rand::{RngCore, SeedableRng};

const FILES: usize = 120;

/// The `unchanged` count of the agent's latest "initial scan done" line, waiting for
/// the `nth` such line (1-based) of its log.
fn unchanged_at_start(c: &Cluster, nth: usize) -> u64 {
    let start = Instant::now();
    loop {
        let lines = c.log_lines("agent.log", "initial scan done");
        if lines.len() >= nth {
            return lines[nth - 1]
                .split_whitespace()
                .find_map(|w| w.strip_prefix("unchanged="))
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("no unchanged= in {}", lines[nth - 1]));
        }
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the agent did not finish its scan\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn stamped(c: &Cluster) -> usize {
    c.log_lines("agent.log", "stamps taken").len()
}

/// Waits for more than `before` "stamps taken" lines in the agent's log.
fn wait_stamped(c: &Cluster, before: usize) {
    let start = Instant::now();
    while stamped(c) <= before {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "no stamps taken\n{}",
            c.logs()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn rewrite_keeping_size_and_mtime(p: &Path) {
    let before = fs::metadata(p).unwrap();
    let mut data = fs::read(p).unwrap();
    data[0] ^= 0xff;
    fs::write(p, &data).unwrap();
    let f = fs::File::options().write(true).open(p).unwrap();
    f.set_modified(before.modified().unwrap()).unwrap();
}

#[test]
fn a_restart_compares_only_what_changed_while_no_agent_watched() {
    if !require_root() {
        return;
    }
    let mut c = Cluster::with_options(
        "data",
        Options {
            agent_extra: "stamp_margin_s = 1".into(),
            ..Options::default()
        },
    )
    .unwrap();
    let mut rng = rand::rngs::StdRng::seed_from_u64(23);
    let src = c.source.clone();
    for d in 0..4 {
        fs::create_dir_all(src.join(format!("d{d}"))).unwrap();
    }
    for i in 0..FILES {
        let mut data = vec![0u8; 4096 + i * 97];
        rng.fill_bytes(&mut data);
        fs::write(src.join(format!("d{}/f{i}", i % 4)), data).unwrap();
    }
    fs::hard_link(src.join("d0/f0"), src.join("d1/link")).unwrap();
    std::os::unix::fs::symlink("d0/f4", src.join("sym")).unwrap();
    // Older than the margin by the time stamps are taken.
    std::thread::sleep(Duration::from_millis(1500));

    c.start().unwrap();
    assert_eq!(unchanged_at_start(&c, 1), 0, "a first run has no stamps");
    c.wait_synced(Duration::from_secs(60)).unwrap();
    c.assert_identical(Duration::from_secs(20));

    // Clean stop; while no agent watches: an append, a rewrite that keeps size and
    // mtime (what a quick check would miss), a chmod, a removal, a new file, and a
    // directory renamed (its files keep their ctime, not their paths).
    let before = stamped(&c);
    c.stop_agent();
    wait_stamped(&c, before);
    fs::OpenOptions::new()
        .append(true)
        .open(src.join("d1/f1"))
        .map(|mut f| std::io::Write::write_all(&mut f, b"appended").unwrap())
        .unwrap();
    rewrite_keeping_size_and_mtime(&src.join("d2/f2"));
    fs::set_permissions(src.join("d3/f3"), fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(src.join("d0/f8")).unwrap();
    fs::write(src.join("d0/new"), b"made while stopped").unwrap();
    fs::rename(src.join("d3"), src.join("d3-moved")).unwrap();
    let moved = FILES / 4;
    std::thread::sleep(Duration::from_millis(1500));
    let before = stamped(&c);
    c.start_agent().unwrap();
    // The files unchanged: all but the three changed, the removed one and those moved
    // with their directory (the new one had no stamp). The hard link's second name is
    // linked, not compared.
    let skipped = unchanged_at_start(&c, 2);
    assert_eq!(
        skipped,
        (FILES - 3 - 1 - (moved - 1)) as u64,
        "{}",
        c.log("agent.log")
    );
    c.wait_synced(Duration::from_secs(60)).unwrap();
    c.assert_identical(Duration::from_secs(20));

    // A crash: the stamps of the checkpoint taken once the restart's copy was complete.
    wait_stamped(&c, before);
    c.kill_agent();
    rewrite_keeping_size_and_mtime(&src.join("d0/f0"));
    std::thread::sleep(Duration::from_millis(1500));
    c.start_agent().unwrap();
    let skipped = unchanged_at_start(&c, 3);
    // The set holds FILES files again (one removed, one made): all but d0/f0 (whose
    // second name is linked). Nothing changed within the margin before that checkpoint.
    assert_eq!(skipped, (FILES - 1) as u64, "{}", c.log("agent.log"));
    c.wait_synced(Duration::from_secs(60)).unwrap();
    c.assert_identical(Duration::from_secs(20));

    // A replica emptied behind the receiver's back cannot vouch: every file is sent.
    c.stop_agent();
    c.kill_receiver();
    fs::remove_dir_all(&c.replica).unwrap();
    fs::create_dir_all(&c.replica).unwrap();
    c.start().unwrap();
    assert_eq!(unchanged_at_start(&c, 4), 0, "{}", c.log("agent.log"));
    c.wait_synced(Duration::from_secs(60)).unwrap();
    c.assert_identical(Duration::from_secs(20));
}
