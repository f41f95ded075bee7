//! One replication set of one source: its applier and how far it got.
//!
//! The wire order only binds records of the same file and namespace ops, so
//! [`SetApplier::apply_batch`] applies data ops on different files in parallel:
//!
//! - Namespace ops (`Mkdir`, `Remove`, `Rmdir`, `Rename`, `Prune`) are barriers: they run
//!   on the calling thread, in sequence order, after everything before them is done.
//!   So is `Barrier`, which does nothing else: the agent sends it where the source
//!   fsynced a file, so that what was written before reaches the replica first.
//! - Between two barriers, the data ops (`Write`, `Truncate`, `CreateFile`: they only
//!   ever create a regular file and its missing parents) are grouped by path; a path and
//!   the paths beneath it (`a` and `a/b`, where one op's file is another's directory) are
//!   one group, so that which of them fails does not depend on timing. Each group is
//!   applied in sequence order by one worker (the calling thread and up to three scoped
//!   threads, each with its own [`Applier`] context forked over the same root); the
//!   workers' dirty sets and open descriptors are taken back before the next barrier.
//! - Runs with a single group or little work stay on the calling thread (a lone 4 KiB
//!   write costs what it always did).
//!
//! Errors are judged in sequence order, as if applied one by one: the earliest fatal
//! failure ends the batch and `applied` stops just before it. Workers stop taking
//! records beyond a fatal one, but records of other files with a higher sequence may
//! already be applied; they are data ops of the same run (`pwrite`/`ftruncate`/`O_CREAT`
//! of the same bytes), so applying them again on the resend gives the same file. The
//! contract towards the session, "everything up to `applied` is done, here is what to
//! sync", stays the same.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use doppel_common::wire::{Op, Record, RelPath};

use crate::apply::{Applier, ApplyError, Need};
use crate::dirty::Dirty;

/// Most threads applying one run of data ops, the calling thread included.
const MAX_WORKERS: usize = 4;
/// Estimated cost of an op besides copying its data (a syscall or two), in bytes of
/// copying.
const OP_COST: u64 = 4 << 10;
/// A run of data ops goes parallel only from this estimated cost on: below it, starting
/// threads costs more than it saves.
const PARALLEL_MIN_COST: u64 = 256 << 10;

pub struct SetApplier {
    pub source: String,
    pub name: String,
    pub epoch: u64,
    /// Highest sequence number applied (not necessarily durable yet).
    pub applied: u64,
    applier: Applier,
    /// Threads a run of data ops may use (1 = everything on the calling thread).
    workers: usize,
    parallel_min_cost: u64,
}

/// How a batch ended.
#[derive(Debug)]
pub enum BatchEnd {
    /// Every record was applied or skipped as already applied.
    Done,
    /// A record's sequence number skipped ahead: records are missing in between.
    Gap { expected: u64, got: u64 },
    /// The target host failed (disk full, I/O error): stop and let the agent resend.
    Fatal { seq: u64, err: ApplyError },
}

pub struct BatchOutcome {
    pub end: BatchEnd,
    /// What must be synced before `applied` may be persisted.
    pub dirty: Dirty,
    /// Answers to the batch's `Sum` ops that found differences.
    pub needs: Vec<Need>,
    /// Records applied now (not counting resends that were skipped).
    pub applied_now: usize,
}

/// The file a data op writes; `None` for namespace ops (barriers).
fn data_path(op: &Op) -> Option<&RelPath> {
    match op {
        Op::Write { path, .. }
        | Op::Truncate { path, .. }
        | Op::CreateFile { path, .. }
        | Op::Fallocate { path, .. }
        | Op::Sum { path, .. } => Some(path),
        // Attributes are barriers too: the receiver cannot tell a file's from a
        // directory's, and a directory's times change with every entry made in it.
        Op::SetAttr { .. }
        | Op::SetXattrs { .. }
        | Op::Link { .. }
        | Op::Symlink { .. }
        | Op::Mknod { .. }
        | Op::Mkdir { .. }
        | Op::Remove { .. }
        | Op::Rmdir { .. }
        | Op::Rename { .. }
        | Op::Prune { .. }
        | Op::PruneAside { .. }
        | Op::List { .. }
        | Op::Barrier => None,
    }
}

fn cost(records: &[&Record]) -> u64 {
    records
        .iter()
        .map(|r| {
            let read = match &r.op {
                Op::Sum { sums, block, .. } => sums.len() as u64 * *block as u64,
                _ => 0,
            };
            OP_COST + r.op.data_len() as u64 + read
        })
        .sum()
}

/// A group of data ops applied by one worker, with the cached descriptors of its paths.
struct Group<'a> {
    records: Vec<&'a Record>,
    cached: Vec<(RelPath, Arc<OwnedFd>)>,
}

impl SetApplier {
    pub fn new(source: String, name: String, epoch: u64, applied: u64, applier: Applier) -> Self {
        let workers = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(MAX_WORKERS);
        SetApplier {
            source,
            name,
            epoch,
            applied,
            applier,
            workers,
            parallel_min_cost: PARALLEL_MIN_COST,
        }
    }

    pub fn applier(&self) -> &Applier {
        &self.applier
    }

    pub fn apply_batch(&mut self, records: &[Record]) -> BatchOutcome {
        // Which records to apply: resends are skipped, a gap ends the batch.
        let mut todo = Vec::with_capacity(records.len());
        let mut gap = None;
        let mut expected = self.applied + 1;
        for r in records {
            if r.seq < expected {
                // A resend after a reconnect: already applied.
                continue;
            }
            if r.seq != expected {
                gap = Some(BatchEnd::Gap {
                    expected,
                    got: r.seq,
                });
                break;
            }
            todo.push(r);
            expected += 1;
        }

        let mut applied_now = 0;
        let mut fatal = None;
        let mut rest = &todo[..];
        while let Some(first) = rest.first() {
            let run = rest
                .iter()
                .take_while(|r| data_path(&r.op).is_some())
                .count();
            fatal = if run == 0 {
                rest = &rest[1..];
                let err = self.applier.apply(&first.op).err();
                self.settle(first.seq, err, &mut applied_now)
            } else {
                let (data, after) = rest.split_at(run);
                rest = after;
                self.apply_data(data, &mut applied_now)
            };
            if fatal.is_some() {
                break;
            }
        }
        let end = match fatal {
            Some((seq, err)) => BatchEnd::Fatal { seq, err },
            None => gap.unwrap_or(BatchEnd::Done),
        };
        BatchOutcome {
            end,
            dirty: self.applier.take_dirty(),
            needs: self.applier.take_needs(),
            applied_now,
        }
    }

    /// Books the outcome of record `seq`, all records before it being done. Returns the
    /// error if it is fatal (the record is then not applied).
    fn settle(
        &mut self,
        seq: u64,
        err: Option<ApplyError>,
        applied_now: &mut usize,
    ) -> Option<(u64, ApplyError)> {
        match err {
            None => {}
            Some(err) if err.is_fatal() => return Some((seq, err)),
            Some(err) => tracing::warn!(
                source = %self.source,
                set = %self.name,
                seq,
                "skipped record: {err}; the replica may differ from the source for this path"
            ),
        }
        self.applied = seq;
        *applied_now += 1;
        None
    }

    /// Applies a run of data ops (no barrier in between), in parallel when it pays.
    fn apply_data(
        &mut self,
        run: &[&Record],
        applied_now: &mut usize,
    ) -> Option<(u64, ApplyError)> {
        let Some(groups) = self.plan(run) else {
            for r in run {
                let err = self.applier.apply(&r.op).err();
                if let Some(fatal) = self.settle(r.seq, err, applied_now) {
                    return Some(fatal);
                }
            }
            return None;
        };
        let mut failed = self.apply_groups(groups);
        // Judge the outcomes in sequence order, as if applied one by one.
        for r in run {
            let err = failed.remove(&r.seq);
            if let Some(fatal) = self.settle(r.seq, err, applied_now) {
                return Some(fatal);
            }
        }
        None
    }

    /// Splits a run of data ops into groups that may be applied concurrently, or `None`
    /// if the run is better applied on the calling thread.
    fn plan<'a>(&mut self, run: &[&'a Record]) -> Option<Vec<Group<'a>>> {
        if self.workers < 2 || run.len() < 2 || cost(run) < self.parallel_min_cost {
            return None;
        }
        let path =
            |r: &&'a Record| -> &'a [u8] { data_path(&r.op).map_or(&[][..], |p| p.0.as_slice()) };
        let paths: HashSet<&[u8]> = run.iter().map(path).collect();
        if paths.len() < 2 {
            return None;
        }
        // A path's group is its shortest prefix (at a '/') that is itself a path of the
        // run: `a`, `a/b` and `a/b/c` go together (one may be the other's directory, and
        // which op fails must not depend on timing), `a/x` and `a/y` do not.
        let key = |p: &'a [u8]| -> &'a [u8] {
            p.iter()
                .enumerate()
                .find(|&(i, &c)| c == b'/' && paths.contains(&p[..i]))
                .map_or(p, |(i, _)| &p[..i])
        };
        let mut index: HashMap<&[u8], usize> = HashMap::new();
        let mut groups: Vec<Group<'a>> = Vec::new();
        for r in run {
            let g = *index.entry(key(path(r))).or_insert_with(|| {
                groups.push(Group {
                    records: Vec::new(),
                    cached: Vec::new(),
                });
                groups.len() - 1
            });
            groups[g].records.push(r);
        }
        if groups.len() < 2 {
            return None;
        }
        // Largest first, so that the groups taken last are small ones.
        groups.sort_by_key(|g| std::cmp::Reverse(cost(&g.records)));
        // Whoever applies a group gets the open descriptors of its files.
        for g in &mut groups {
            for r in &g.records {
                let Some(p) = data_path(&r.op) else { continue };
                if !g.cached.iter().any(|(q, _)| q == p) {
                    if let Some(fd) = self.applier.take_cached(p) {
                        g.cached.push((p.clone(), fd));
                    }
                }
            }
        }
        Some(groups)
    }

    /// Applies the groups concurrently; returns every failure by sequence number. After a
    /// fatal failure, records with a higher sequence are no longer started.
    fn apply_groups(&mut self, groups: Vec<Group<'_>>) -> BTreeMap<u64, ApplyError> {
        let next = AtomicUsize::new(0);
        let stop = AtomicU64::new(u64::MAX);
        let work = |ctx: &mut Applier| {
            let mut failed = Vec::new();
            while let Some(g) = groups.get(next.fetch_add(1, Ordering::Relaxed)) {
                for (p, fd) in &g.cached {
                    ctx.cache_file(p.clone(), fd.clone());
                }
                for r in &g.records {
                    if r.seq > stop.load(Ordering::Relaxed) {
                        break;
                    }
                    if let Err(err) = ctx.apply(&r.op) {
                        let fatal = err.is_fatal();
                        failed.push((r.seq, err));
                        if fatal {
                            stop.fetch_min(r.seq, Ordering::Relaxed);
                            break;
                        }
                    }
                }
            }
            failed
        };
        let work = &work;
        let helpers = self.workers.min(groups.len()) - 1;
        let mut failed = BTreeMap::new();
        std::thread::scope(|s| {
            let handles: Vec<_> = (0..helpers)
                .filter_map(|_| {
                    let mut ctx = self.applier.fork();
                    std::thread::Builder::new()
                        .name("doppel-apply".into())
                        .spawn_scoped(s, move || {
                            let failed = work(&mut ctx);
                            (ctx, failed)
                        })
                        // No thread: the calling thread takes its share.
                        .ok()
                })
                .collect();
            failed.extend(work(&mut self.applier));
            for h in handles {
                let (ctx, f) = h
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic));
                self.applier.absorb(ctx);
                failed.extend(f);
            }
        });
        failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustix::io::Errno;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    fn rec(seq: u64, data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: RelPath(b"f".to_vec()),
                offset: 0,
                data: data.to_vec().into(),
            },
        }
    }

    #[test]
    fn resends_are_skipped_and_gaps_stop() {
        let d = tempfile::tempdir().unwrap();
        let a = Applier::open(d.path()).unwrap();
        let mut s = SetApplier::new("src".into(), "set".into(), 1, 0, a);
        let o = s.apply_batch(&[rec(1, b"a"), rec(2, b"b")]);
        assert!(matches!(o.end, BatchEnd::Done));
        assert_eq!((s.applied, o.applied_now), (2, 2));
        let o = s.apply_batch(&[rec(2, b"X"), rec(3, b"c")]);
        assert_eq!((s.applied, o.applied_now), (3, 1));
        assert_eq!(std::fs::read(d.path().join("f")).unwrap(), b"c");
        let o = s.apply_batch(&[rec(4, b"d"), rec(6, b"f")]);
        assert!(matches!(
            o.end,
            BatchEnd::Gap {
                expected: 5,
                got: 6
            }
        ));
        assert_eq!(s.applied, 4);
    }

    fn p(s: &str) -> RelPath {
        RelPath(s.as_bytes().to_vec())
    }

    fn w(seq: u64, path: &str, offset: u64, data: &[u8]) -> Record {
        Record {
            seq,
            op: Op::Write {
                path: p(path),
                offset,
                data: data.to_vec().into(),
            },
        }
    }

    /// A set applier that parallelizes every run with two files or more.
    fn parallel(root: &Path) -> SetApplier {
        let mut s = SetApplier::new(
            "src".into(),
            "set".into(),
            1,
            0,
            Applier::open(root).unwrap(),
        );
        s.workers = MAX_WORKERS;
        s.parallel_min_cost = 0;
        s
    }

    /// Applies `records` one by one with a plain applier, as the receiver used to.
    fn sequential(root: &Path, records: &[Record]) -> Applier {
        let mut a = Applier::open(root).unwrap();
        for r in records {
            if let Err(e) = a.apply(&r.op) {
                assert!(!e.is_fatal(), "{e}");
            }
        }
        a
    }

    /// Every entry beneath `root`: kind, permission bits and a file's content.
    fn tree(root: &Path) -> BTreeMap<String, (char, u32, Vec<u8>)> {
        fn walk(root: &Path, dir: &Path, out: &mut BTreeMap<String, (char, u32, Vec<u8>)>) {
            for e in std::fs::read_dir(dir).unwrap() {
                let e = e.unwrap();
                let path = e.path();
                let md = std::fs::symlink_metadata(&path).unwrap();
                let rel = path.strip_prefix(root).unwrap().display().to_string();
                let mode = md.permissions().mode() & 0o7777;
                if md.is_dir() {
                    out.insert(rel, ('d', mode, Vec::new()));
                    walk(root, &path, out);
                } else {
                    out.insert(rel, ('f', mode, std::fs::read(&path).unwrap()));
                }
            }
        }
        let mut out = BTreeMap::new();
        walk(root, root, &mut out);
        out
    }

    /// Deterministic pseudo-random numbers (xorshift64*).
    struct Rng(u64);
    impl Rng {
        fn below(&mut self, n: u64) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n
        }
    }

    /// A batch over a small namespace, so that paths collide, get renamed away and back,
    /// and a path is sometimes a file and sometimes a directory of another path.
    fn random_batch(seed: u64, n: u64) -> Vec<Record> {
        const PATHS: &[&str] = &[
            "a",
            "b",
            "c",
            "e",
            "f",
            "g",
            "d0",
            "d1",
            "d0/x",
            "d0/y",
            "d0/z",
            "d1/x",
            "d1/y",
            "d0/s/t",
            "d2/deep/f",
        ];
        let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
        let pick = |rng: &mut Rng| p(PATHS[rng.below(PATHS.len() as u64) as usize]);
        (1..=n)
            .map(|seq| {
                let op = match rng.below(100) {
                    0..=59 => {
                        let len = rng.below(3000) as usize;
                        Op::Write {
                            path: pick(&mut rng),
                            offset: rng.below(8192),
                            data: (0..len).map(|i| (seq as usize + i) as u8).collect(),
                        }
                    }
                    60..=69 => Op::Truncate {
                        path: pick(&mut rng),
                        size: rng.below(6000),
                    },
                    70..=76 => Op::CreateFile {
                        path: pick(&mut rng),
                        mode: 0o600 + rng.below(0o100) as u32,
                    },
                    77..=86 => Op::Rename {
                        from: pick(&mut rng),
                        to: pick(&mut rng),
                        flags: rng.below(2) as u32, // 0 or RENAME_NOREPLACE
                    },
                    87..=90 => Op::Remove {
                        path: pick(&mut rng),
                    },
                    91..=94 => Op::Mkdir {
                        path: pick(&mut rng),
                        mode: 0o750,
                    },
                    95..=97 => Op::Rmdir {
                        path: pick(&mut rng),
                    },
                    _ => Op::Prune {
                        dir: None,
                        keep: vec![p("a"), p("b"), p("d0"), p("d1"), p("d2")],
                    },
                };
                Record { seq, op }
            })
            .collect()
    }

    #[test]
    fn parallel_batches_build_the_same_tree_as_sequential_application() {
        for seed in 0..40 {
            let records = random_batch(seed, 300);
            let d = tempfile::tempdir().unwrap();
            let mut s = parallel(&d.path().join("par"));
            // Batches of various sizes, so that cached descriptors cross batches.
            for chunk in records.chunks(7 + seed as usize * 5) {
                let o = s.apply_batch(chunk);
                assert!(matches!(o.end, BatchEnd::Done), "{:?}", o.end);
                assert_eq!(o.applied_now, chunk.len());
            }
            assert_eq!(s.applied, records.len() as u64);
            sequential(&d.path().join("seq"), &records);
            let (par, seq) = (tree(&d.path().join("par")), tree(&d.path().join("seq")));
            assert!(
                seq.len() > 2,
                "seed {seed}: the batch left too little to compare"
            );
            assert_eq!(par, seq, "seed {seed}");
        }
    }

    #[test]
    fn rename_between_writes_is_a_barrier() {
        let mut records = Vec::new();
        let mut seq = 0;
        let mut next = || {
            seq += 1;
            seq
        };
        // Many files, big enough to go parallel with the default threshold.
        let big = vec![b'x'; 64 << 10];
        for f in ["a", "b", "c", "d/e", "d/f"] {
            records.push(w(next(), f, 0, &big));
            records.push(w(next(), f, 10, f.as_bytes()));
        }
        // `a` has pending writes before the rename, `moved` gets writes after it, and a
        // new `a` is written again.
        records.push(Record {
            seq: next(),
            op: Op::Rename {
                from: p("a"),
                to: p("moved"),
                flags: 0,
            },
        });
        records.push(w(next(), "moved", 0, b"after"));
        records.push(w(next(), "a", 0, b"new a"));
        for f in ["b", "c", "d/e", "d/f"] {
            records.push(w(next(), f, 0, &big[..100]));
        }
        records.push(Record {
            seq: next(),
            op: Op::Rename {
                from: p("d"),
                to: p("d2"),
                flags: 0,
            },
        });
        records.push(w(next(), "d2/e", 1, b"E"));
        records.push(w(next(), "d/e", 0, b"fresh"));
        records.push(w(next(), "b", 2, b"B"));

        let d = tempfile::tempdir().unwrap();
        let mut s = SetApplier::new(
            "src".into(),
            "set".into(),
            1,
            0,
            Applier::open(&d.path().join("par")).unwrap(),
        );
        s.workers = MAX_WORKERS; // even on a one-CPU machine
        let o = s.apply_batch(&records);
        assert!(matches!(o.end, BatchEnd::Done), "{:?}", o.end);
        assert_eq!((s.applied, o.applied_now), (seq, records.len()));
        sequential(&d.path().join("seq"), &records);
        let par = d.path().join("par");
        assert_eq!(tree(&par), tree(&d.path().join("seq")));
        let moved = std::fs::read(par.join("moved")).unwrap();
        assert_eq!(&moved[..12], b"afterxxxxxax");
        assert_eq!(moved.len(), 64 << 10);
        assert_eq!(std::fs::read(par.join("a")).unwrap(), b"new a");
        assert_eq!(&std::fs::read(par.join("d2/e")).unwrap()[..3], b"xEx");
        assert_eq!(std::fs::read(par.join("d/e")).unwrap(), b"fresh");

        assert_dirty(&par, &o.dirty);
    }

    /// Every file of the tree is in the dirty set, by inode (descriptors of worker
    /// contexts included), and so is every directory, which all got entries.
    fn assert_dirty(root: &Path, dirty: &Dirty) {
        let (files, dirs) = dirty.inodes();
        for (rel, (kind, _, _)) in tree(root) {
            let md = std::fs::metadata(root.join(&rel)).unwrap();
            let id = (md.dev(), md.ino());
            match kind {
                'f' => assert!(files.contains(&id), "{rel} written but not dirty"),
                _ => assert!(dirs.contains(&id), "{rel} changed but not dirty"),
            }
        }
        let md = std::fs::metadata(root).unwrap();
        assert!(dirs.contains(&(md.dev(), md.ino())), "root not dirty");
    }

    #[test]
    fn parallel_runs_leave_everything_to_sync_in_the_dirty_set() {
        let d = tempfile::tempdir().unwrap();
        let mut s = parallel(d.path());
        let files = ["a", "b", "x/c", "x/d", "x/y/e", "z/f", "z/g"];
        let records: Vec<Record> = (0..files.len() * 3)
            .map(|k| w(k as u64 + 1, files[k % files.len()], k as u64, b"data"))
            .collect();
        let o = s.apply_batch(&records);
        assert!(matches!(o.end, BatchEnd::Done), "{:?}", o.end);
        assert_eq!(tree(d.path()).len(), files.len() + 3);
        assert_dirty(d.path(), &o.dirty);
        // The descriptors came back: the next batch writes without opening anything, and
        // its dirty set still names the files.
        let more: Vec<Record> = files
            .iter()
            .enumerate()
            .map(|(i, f)| w((records.len() + i + 1) as u64, f, 0, b"more"))
            .collect();
        let o = s.apply_batch(&more);
        assert!(matches!(o.end, BatchEnd::Done), "{:?}", o.end);
        assert_eq!(o.dirty.inodes().0.len(), files.len());
    }

    #[test]
    fn the_earliest_fatal_failure_ends_the_batch() {
        // Eight files, four writes each, interleaved: file i gets seq i+1, i+9, ...
        let records: Vec<Record> = (0..32u64)
            .map(|k| w(k + 1, &format!("f{}", k % 8), (k / 8) * 4, b"data"))
            .collect();
        for workers in [1, MAX_WORKERS] {
            let d = tempfile::tempdir().unwrap();
            let mut s = parallel(&d.path().join("par"));
            s.workers = workers;
            let faults = s.applier.faults.clone();
            *faults.lock().unwrap() = vec![
                (p("f6"), Errno::NOSPC),  // fatal from seq 7
                (p("f2"), Errno::IO),     // fatal from seq 3: the earliest
                (p("f1"), Errno::ISDIR),  // not fatal: seq 2 is skipped
                (p("f0"), Errno::NOTDIR), // not fatal: seq 1 is skipped
            ];
            let o = s.apply_batch(&records);
            match &o.end {
                BatchEnd::Fatal { seq: 3, err } => assert!(err.is_fatal()),
                other => panic!("workers {workers}: {other:?}"),
            }
            assert_eq!((s.applied, o.applied_now), (2, 2), "workers {workers}");
            // Once the disk is back, the resend from seq 3 ends in the same tree as
            // applying everything once (records after 3 may have been applied already).
            faults.lock().unwrap().clear();
            let o = s.apply_batch(&records);
            assert!(matches!(o.end, BatchEnd::Done), "{:?}", o.end);
            assert_eq!((s.applied, o.applied_now), (32, 30));
            // Seq 1 and 2 failed for good (skipped), everything else applied.
            let want = d.path().join("seq");
            sequential(&want, &records[2..]);
            assert_eq!(
                tree(&d.path().join("par")),
                tree(&want),
                "workers {workers}"
            );
        }
    }

    #[test]
    fn a_fatal_failure_before_a_gap_wins_and_barriers_after_it_do_not_run() {
        let d = tempfile::tempdir().unwrap();
        let mut s = parallel(d.path());
        *s.applier.faults.lock().unwrap() = vec![(p("b"), Errno::NOSPC)];
        let records = [
            w(1, "a", 0, b"a"),
            w(2, "b", 0, b"b"),
            w(3, "c", 0, b"c"),
            Record {
                seq: 4,
                op: Op::Remove { path: p("a") },
            },
            w(6, "x", 0, b"x"),
        ];
        let o = s.apply_batch(&records);
        assert!(
            matches!(o.end, BatchEnd::Fatal { seq: 2, .. }),
            "{:?}",
            o.end
        );
        assert_eq!(s.applied, 1);
        assert!(
            d.path().join("a").exists(),
            "the barrier after the failure ran"
        );
    }
}
