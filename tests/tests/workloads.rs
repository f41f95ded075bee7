//! Real programs as workloads, each checked on the replica with its own tool: sqlite3
//! (WAL and rollback journal), git, tar (hard links, symlinks, a fifo, xattrs, modes,
//! mtimes), fio (random writes with checksummed blocks).
//!
//! Every test first waits for the replica's content to converge, then records whether it
//! is identical in strict mode, then runs the program's own check on the replica, and
//! fails at the end if the strict comparison did: a failure shows both what the program
//! thinks of the replica and every attribute that differs.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use doppel_tests::cluster::Cluster;
use doppel_tests::fsops::*;
use doppel_tests::{require_root, tree};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// How long the replica may take to converge after the workload ends.
const WITHIN: Duration = Duration::from_secs(30);

fn started() -> Cluster {
    let mut c = Cluster::new("work").unwrap();
    c.start().unwrap();
    c
}

/// A scratch directory in the cluster's temp dir, outside the set.
fn scratch(c: &Cluster, name: &str) -> PathBuf {
    let d = c.dir.path().join("scratch").join(name);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// The strict comparison's result, as a message for the end of the test.
fn strict(c: &Cluster) -> Result<(), String> {
    match tree::wait_identical(&c.source, &c.replica, Duration::from_secs(10)) {
        Ok(t) => {
            eprintln!("replica strictly identical after {t:?}");
            Ok(())
        }
        Err(d) => Err(format!(
            "the replica is not identical in strict mode ({} differences):\n{}{}",
            d.len(),
            d.iter().take(60).cloned().collect::<Vec<_>>().join("\n"),
            if d.len() > 60 { "\n..." } else { "" }
        )),
    }
}

fn finish(c: &Cluster, strict: Result<(), String>) {
    if let Err(e) = strict {
        panic!("{e}\n{}", c.logs());
    }
}

/// `cp -a` of the files of `dir` whose names start with `prefix` into `to`.
fn copy_prefixed(dir: &Path, prefix: &str, to: &Path) {
    for e in std::fs::read_dir(dir).unwrap() {
        let e = e.unwrap();
        if e.file_name().to_string_lossy().starts_with(prefix) {
            run(Command::new("cp").arg("-a").arg(e.path()).arg(to));
        }
    }
}

fn sqlite(db: &Path, sql: &str) -> String {
    run(Command::new("sqlite3").arg(db).arg(sql))
        .trim()
        .to_string()
}

/// 3000 transactions (each statement its own) of inserts, updates and deletes, run by
/// one sqlite3 process in `journal_mode`; then the replica's database must pass
/// `PRAGMA integrity_check` and hold the same rows as the source's.
fn sqlite_workload(journal_mode: &str) {
    require_tool("sqlite3", "sqlite3");
    let c = started();
    let dir = c.source.join("db");
    std::fs::create_dir(&dir).unwrap();
    let db = dir.join("test.db");
    let seed = rand::random::<u64>();
    eprintln!("sqlite workload seed {seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let mut sql = format!(
        ".bail on\nPRAGMA journal_mode={journal_mode};\n\
         CREATE TABLE t(id INTEGER PRIMARY KEY, x INTEGER NOT NULL, s TEXT NOT NULL);\n\
         CREATE INDEX t_x ON t(x);\n"
    );
    let mut next_id = 0u64;
    for _ in 0..3000 {
        let k: u32 = rng.gen_range(0..10);
        if k < 5 || next_id < 10 {
            next_id += 1;
            let len = rng.gen_range(10..600);
            sql += &format!(
                "INSERT INTO t(id, x, s) VALUES({next_id}, {}, hex(randomblob({len})));\n",
                rng.gen_range(0..1_000_000)
            );
        } else if k < 8 {
            sql += &format!(
                "UPDATE t SET x = x + {}, s = s || 'u' WHERE id = {};\n",
                rng.gen_range(1..100),
                rng.gen_range(1..=next_id)
            );
        } else {
            let a = rng.gen_range(1..=next_id);
            sql += &format!("DELETE FROM t WHERE id BETWEEN {a} AND {};\n", a + 2);
        }
    }
    let script = scratch(&c, "sql").join("workload.sql");
    std::fs::write(&script, sql).unwrap();
    let start = std::time::Instant::now();
    let st = Command::new("sqlite3")
        .arg(&db)
        .stdin(std::fs::File::open(&script).unwrap())
        .stdout(Stdio::null())
        .status()
        .unwrap();
    assert!(st.success(), "sqlite3 workload failed: {st}");
    eprintln!(
        "sqlite3 ({journal_mode}): 3000 transactions in {:?}",
        start.elapsed()
    );

    c.assert_converges(WITHIN);
    let strict = strict(&c);
    // Check copies, so that neither tree gets -wal/-shm files from the checks.
    let src_copy = scratch(&c, "source-copy");
    let rep_copy = scratch(&c, "replica-copy");
    copy_prefixed(&dir, "test.db", &src_copy);
    copy_prefixed(&c.replica.join("db"), "test.db", &rep_copy);
    let check = sqlite(&rep_copy.join("test.db"), "PRAGMA integrity_check;");
    assert_eq!(check, "ok", "integrity_check of the replica's database");
    let q = "SELECT count(*), sum(x), total(length(s)), sum(id) FROM t;";
    let want = sqlite(&src_copy.join("test.db"), q);
    let got = sqlite(&rep_copy.join("test.db"), q);
    eprintln!("rows: source {want}, replica {got}");
    assert_eq!(got, want, "count(*), sum(x), total(length(s)), sum(id)");
    finish(&c, strict);
}

#[test]
fn sqlite_wal() {
    if !require_root() {
        return;
    }
    sqlite_workload("WAL");
}

#[test]
fn sqlite_rollback_journal() {
    if !require_root() {
        return;
    }
    sqlite_workload("DELETE");
}

/// git with no system or global config and a fixed identity.
fn git(c: &Cluster, repo: &Path) -> Command {
    let mut cmd = Command::new("git");
    cmd.env("GIT_CONFIG_NOSYSTEM", "1")
        .env("GIT_CONFIG_GLOBAL", "/dev/null")
        .env("HOME", scratch(c, "home"))
        .env("GIT_AUTHOR_NAME", "doppel")
        .env("GIT_AUTHOR_EMAIL", "doppel@example.invalid")
        .env("GIT_COMMITTER_NAME", "doppel")
        .env("GIT_COMMITTER_EMAIL", "doppel@example.invalid")
        .env("GIT_OPTIONAL_LOCKS", "0")
        .args([
            "-c",
            "safe.directory=*",
            "-c",
            "gc.auto=0",
            "-c",
            "gc.autoDetach=false",
            "-c",
            "maintenance.auto=false",
            "-c",
            "init.defaultBranch=main",
            "-C",
        ])
        .arg(repo);
    cmd
}

/// 50 commits (new, changed, deleted and executable files, a gc halfway), then
/// `git fsck --full`, the commit count, HEAD and a clean status on the replica.
#[test]
fn git_commits() {
    if !require_root() {
        return;
    }
    require_tool("git", "git");
    let c = started();
    let repo = c.source.join("repo");
    std::fs::create_dir(&repo).unwrap();
    run(git(&c, &repo).args(["init", "-q"]));
    let mut rng = StdRng::seed_from_u64(7);
    for round in 0..50 {
        let d = repo.join(format!("dir{}", round % 5));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(
            d.join(format!("file{round}.txt")),
            pattern(round, 2000 + round as usize * 50),
        )
        .unwrap();
        let log = repo.join("changelog");
        let mut text = std::fs::read_to_string(&log).unwrap_or_default();
        text += &format!("round {round}: {}\n", rng.gen::<u64>());
        std::fs::write(&log, text).unwrap();
        if round % 7 == 3 {
            let old = repo.join(format!("dir{}/file{}.txt", (round - 3) % 5, round - 3));
            let _ = std::fs::remove_file(old);
        }
        if round % 10 == 0 {
            let script = d.join(format!("run{round}.sh"));
            std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        run(git(&c, &repo).args(["add", "-A"]));
        run(git(&c, &repo).args(["commit", "-q", "-m", &format!("round {round}")]));
        if round == 25 {
            run(git(&c, &repo).args(["gc", "-q"]));
        }
    }
    c.assert_converges(WITHIN);
    let strict = strict(&c);
    let rrepo = c.replica.join("repo");
    run(git(&c, &rrepo).args(["fsck", "--full", "--strict"]));
    let count = |r: &Path| run(git(&c, r).args(["log", "--oneline"])).lines().count();
    assert_eq!(count(&rrepo), count(&repo), "git log --oneline | wc -l");
    assert_eq!(count(&rrepo), 50);
    let head = |r: &Path| run(git(&c, r).args(["rev-parse", "HEAD"]));
    assert_eq!(head(&rrepo), head(&repo), "HEAD");
    let status = run(git(&c, &rrepo).args(["status", "--porcelain"]));
    assert!(
        status.is_empty(),
        "git status on the replica is not clean:\n{status}"
    );
    finish(&c, strict);
}

/// An archive with hard links, symlinks, a fifo, a sparse file, user xattrs, owners,
/// modes and mtimes, extracted into the source root with `tar -xp --xattrs`.
#[test]
fn tar_extract() {
    if !require_root() {
        return;
    }
    require_tool("tar", "tar");
    let c = started();
    let t = scratch(&c, "tarsrc");
    std::fs::create_dir_all(t.join("data/sub")).unwrap();
    std::fs::create_dir_all(t.join("private")).unwrap();
    std::fs::create_dir_all(t.join("shared")).unwrap();
    std::fs::write(t.join("data/h1"), pattern(1, 30_000)).unwrap();
    std::fs::hard_link(t.join("data/h1"), t.join("data/sub/h2")).unwrap();
    std::fs::hard_link(t.join("data/h1"), t.join("h3")).unwrap();
    std::fs::write(t.join("secret"), b"0600").unwrap();
    std::fs::write(t.join("tool"), b"#!/bin/sh\n").unwrap();
    std::fs::write(t.join("setuid"), b"setuid").unwrap();
    std::fs::write(t.join("readonly"), b"0444").unwrap();
    std::fs::write(t.join("owned"), b"owned by 1234:5678").unwrap();
    std::fs::write(t.join("private/p"), b"in a 0700 dir").unwrap();
    {
        let fd = open(t.join("sparse"), libc::O_CREAT | libc::O_WRONLY, 0o644);
        pwrite_all(&fd, &pattern(2, 8192), 0);
        pwrite_all(&fd, &pattern(3, 8192), 20 << 20);
    }
    std::os::unix::fs::symlink("data/h1", t.join("sym-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/passwd", t.join("sym-abs")).unwrap();
    std::os::unix::fs::symlink("nowhere", t.join("sym-dangling")).unwrap();
    std::os::unix::fs::symlink("data", t.join("sym-dir")).unwrap();
    check(
        unsafe { libc::mkfifo(cstr(t.join("pipe")).as_ptr(), 0o640) },
        "mkfifo",
    );
    setxattr(t.join("data/h1"), "user.origin", b"tar test", 0);
    setxattr(t.join("shared"), "user.dir", b"\x00\x01\x02", 0);
    for (p, mode) in [
        ("secret", 0o600),
        ("tool", 0o755),
        ("setuid", 0o4755),
        ("readonly", 0o444),
        ("private", 0o700),
        ("shared", 0o2775),
    ] {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(t.join(p), std::fs::Permissions::from_mode(mode)).unwrap();
    }
    std::os::unix::fs::lchown(t.join("owned"), Some(1234), Some(5678)).unwrap();
    std::os::unix::fs::lchown(t.join("sym-rel"), Some(4321), Some(8765)).unwrap();
    std::os::unix::fs::lchown(t.join("shared"), Some(1000), Some(1000)).unwrap();
    // Times last, directories after their contents.
    let mut secs = 1_500_000_000;
    for p in [
        "data/h1",
        "secret",
        "tool",
        "setuid",
        "readonly",
        "owned",
        "sparse",
        "private/p",
        "sym-rel",
        "sym-abs",
        "sym-dangling",
        "sym-dir",
        "pipe",
        "data/sub",
        "data",
        "private",
        "shared",
    ] {
        secs += 86_400 + 1;
        utimens(
            t.join(p),
            None,
            Some((secs, 123_456_789)),
            libc::AT_SYMLINK_NOFOLLOW,
        );
    }
    let archive = scratch(&c, "archive").join("test.tar");
    let xattrs = ["--xattrs", "--xattrs-include=*", "--numeric-owner"];
    run(Command::new("tar")
        .args(xattrs)
        .args(["-S", "-cpf"])
        .arg(&archive)
        .arg("-C")
        .arg(&t)
        .arg("."));
    let dest = c.source.join("unpacked");
    std::fs::create_dir(&dest).unwrap();
    run(Command::new("tar")
        .args(xattrs)
        .arg("-xpf")
        .arg(&archive)
        .arg("-C")
        .arg(&dest));
    // tar itself must have reproduced the tree, or this test checks less than it says.
    let made = tree::diff_full(
        &tree::snapshot_full(&t).unwrap(),
        &tree::snapshot_full(&dest).unwrap(),
    );
    assert!(
        made.is_empty(),
        "tar did not reproduce the tree:\n{}",
        made.join("\n")
    );
    c.assert_converges(WITHIN);
    let strict = strict(&c);
    finish(&c, strict);
}

/// fio random 4 KiB writes with crc32c-checksummed blocks, verified on the replica by a
/// verify-only run of the same job.
#[test]
fn fio_randwrite_verify() {
    fio_verify(&[("psync", &["--ioengine=psync", "--size=64m"])]);
}

/// The same through io_uring, one job per way a ring writes: IORING_OP_WRITEV,
/// IORING_OP_WRITE, IORING_OP_WRITE_FIXED (registered buffers), a kernel SQPOLL thread
/// doing the submitting, and O_DIRECT (completed asynchronously).
#[test]
fn fio_io_uring_verify() {
    let uring = ["--ioengine=io_uring", "--size=24m", "--iodepth=16"];
    let with = |extra: &'static [&'static str]| -> Vec<&'static str> {
        uring.iter().chain(extra).copied().collect()
    };
    let jobs = [
        ("writev", with(&["--nonvectored=0"])),
        ("write", with(&["--nonvectored=1"])),
        ("write-fixed", with(&["--fixedbufs=1"])),
        ("sqpoll", with(&["--sqthread_poll=1"])),
        ("direct", with(&["--direct=1"])),
    ];
    let jobs: Vec<(&str, &[&str])> = jobs.iter().map(|(n, a)| (*n, a.as_slice())).collect();
    fio_verify(&jobs);
}

/// The same through Linux native AIO (`io_submit`, as InnoDB and QEMU `aio=native`
/// write), buffered and O_DIRECT.
#[test]
fn fio_libaio_verify() {
    let aio = ["--ioengine=libaio", "--size=24m", "--iodepth=16"];
    let with = |extra: &'static [&'static str]| -> Vec<&'static str> {
        aio.iter().chain(extra).copied().collect()
    };
    let jobs = [
        ("libaio", with(&[])),
        ("libaio-direct", with(&["--direct=1"])),
    ];
    let jobs: Vec<(&str, &[&str])> = jobs.iter().map(|(n, a)| (*n, a.as_slice())).collect();
    fio_verify(&jobs);
}

/// The same through a `MAP_SHARED` mapping (fio's mmap engine stores into the mapping
/// and msyncs at the end of the job).
#[test]
fn fio_mmap_verify() {
    fio_verify(&[("mmap", &["--ioengine=mmap", "--size=32m"])]);
}

/// Runs each (name, fio options) job into its own directory of the source, then checks
/// the replica strictly and with fio's own verify pass over each directory.
fn fio_verify(jobs: &[(&str, &[&str])]) {
    if !require_root() {
        return;
    }
    require_tool("fio", "fio");
    let c = started();
    let job = |dir: &Path, opts: &[&str], verify_only: bool| {
        let mut cmd = Command::new("fio");
        cmd.current_dir(scratch(&c, "fio-cwd"))
            .args([
                "--name=v",
                "--rw=randwrite",
                "--bs=4k",
                "--randrepeat=1",
                "--verify=crc32c",
                "--verify_fatal=1",
                "--verify_state_save=0",
                "--output-format=terse",
            ])
            .args(opts)
            .arg(format!("--directory={}", dir.display()));
        if verify_only {
            cmd.arg("--verify_only");
        } else {
            cmd.arg("--do_verify=0");
        }
        cmd
    };
    for (name, opts) in jobs {
        let src = c.source.join(format!("fio-{name}"));
        std::fs::create_dir(&src).unwrap();
        let start = std::time::Instant::now();
        run(&mut job(&src, opts, false));
        eprintln!("fio {name} wrote in {:?}", start.elapsed());
    }
    c.assert_converges(WITHIN);
    let strict = strict(&c);
    for (name, opts) in jobs {
        // The verify pass itself, against the source first (proves the job can be
        // verified), then against the replica.
        run(&mut job(&c.source.join(format!("fio-{name}")), opts, true));
        run(&mut job(&c.replica.join(format!("fio-{name}")), opts, true));
    }
    finish(&c, strict);
}
