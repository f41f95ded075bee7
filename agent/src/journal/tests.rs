use std::fs;
use std::path::{Path, PathBuf};
use std::time::Duration;

use doppel_common::wire::{Op, Record, RelPath};
use rand::{Rng, SeedableRng};

use super::*;

fn opts(segment_bytes: u64, budget_bytes: u64) -> JournalOptions {
    JournalOptions {
        segment_bytes,
        fsync: FsyncPolicy::Never,
        budget_bytes,
    }
}

fn small() -> JournalOptions {
    opts(1024, u64::MAX)
}

fn rec(seq: u64, n: usize) -> Record {
    Record {
        seq,
        op: Op::Write {
            path: RelPath(format!("d/f{}", seq % 7).into_bytes()),
            offset: seq * 100,
            data: vec![seq as u8; n].into(),
        },
    }
}

fn recs(from: u64, count: u64, n: usize) -> Vec<Record> {
    (from..from + count).map(|s| rec(s, n)).collect()
}

fn segment_files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn disk_bytes(dir: &Path) -> u64 {
    segment_files(dir)
        .iter()
        .map(|p| fs::metadata(p).unwrap().len())
        .sum()
}

fn seqs(records: &[Record]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

/// Everything the journal holds, read in batches of about `max` bytes.
fn read_all(j: &Journal, max: usize) -> Vec<Record> {
    let mut out = Vec::new();
    let mut after = j.first_seq() - 1;
    loop {
        let batch = j.read_after(after, max).unwrap();
        let Some(last) = batch.last() else {
            return out;
        };
        after = last.seq;
        out.extend(batch);
    }
}

#[test]
fn append_read_and_trim_across_segments() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 5).unwrap();
    assert_eq!((j.epoch(), j.first_seq(), j.last_seq()), (5, 1, 0));
    assert!(j.is_empty());
    assert!(j.read_after(0, 100).unwrap().is_empty());
    let all = recs(1, 30, 150);
    for batch in all.chunks(4) {
        j.append(batch).unwrap();
    }
    assert_eq!((j.first_seq(), j.last_seq()), (1, 30));
    assert!(segment_files(dir.path()).len() >= 5);
    assert_eq!(j.bytes(), disk_bytes(dir.path()));

    assert_eq!(j.read_after(0, usize::MAX).unwrap(), all);
    assert_eq!(read_all(&j, 1), all, "one record per call");
    assert_eq!(read_all(&j, 500), all);
    let one = j.read_after(10, 1).unwrap();
    assert_eq!(seqs(&one), vec![11]);
    let some = j.read_after(10, 600).unwrap();
    assert!((2..=4).contains(&some.len()), "{}", some.len());
    assert_eq!(some, all[10..10 + some.len()]);
    assert!(j.read_after(30, 100).unwrap().is_empty());
    assert!(matches!(j.read_after(31, 100), Err(Error::Gap { .. })));

    let before = segment_files(dir.path()).len();
    j.trim(12).unwrap();
    let first = j.first_seq();
    assert!(first > 1 && first <= 13, "first {first}");
    assert!(segment_files(dir.path()).len() < before);
    assert_eq!(j.bytes(), disk_bytes(dir.path()));
    assert_eq!(
        j.read_after(first - 1, usize::MAX).unwrap(),
        all[first as usize - 1..]
    );
    assert!(matches!(
        j.read_after(first - 2, 100),
        Err(Error::Gap { first_seq, .. }) if first_seq == first
    ));
    // Trimming is idempotent and never goes backwards.
    j.trim(3).unwrap();
    assert_eq!(j.first_seq(), first);
}

#[test]
fn reopening_resumes_where_it_was() {
    let dir = tempfile::tempdir().unwrap();
    let all = recs(1, 40, 100);
    {
        let mut j = Journal::open(dir.path(), small(), 77).unwrap();
        j.append(&all[..25]).unwrap();
        j.trim(9).unwrap();
        j.append(&all[25..]).unwrap();
    }
    let mut j = Journal::open(dir.path(), small(), 1234).unwrap();
    assert_eq!(j.epoch(), 77, "the stored epoch wins over new_epoch");
    assert_eq!(j.last_seq(), 40);
    assert_eq!(j.durable_seq(), 40);
    let first = j.first_seq();
    assert!(first > 1 && first <= 10);
    assert_eq!(read_all(&j, 300), all[first as usize - 1..]);
    assert!(matches!(
        j.append(&[rec(40, 1)]),
        Err(AppendError::Sequence {
            expected: 41,
            got: 40
        })
    ));
    j.append(&recs(41, 2, 10)).unwrap();
    drop(j);
    let j = Journal::open(dir.path(), small(), 0).unwrap();
    assert_eq!((j.first_seq(), j.last_seq()), (first, 42));
}

#[test]
fn a_fully_acked_journal_keeps_its_sequence() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    j.append(&recs(1, 20, 100)).unwrap();
    j.trim(20).unwrap();
    // The active segment was large enough to be replaced by an empty one.
    assert!(j.is_empty());
    assert_eq!((j.first_seq(), j.last_seq()), (21, 20));
    let files = segment_files(dir.path());
    assert_eq!(files.len(), 1);
    assert!(files[0].ends_with(segment::file_name(21)));
    assert_eq!(j.bytes(), segment::SEGMENT_HEADER_LEN as u64);
    drop(j);
    // Sequence numbers are never handed out twice in one epoch.
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    assert_eq!((j.first_seq(), j.next_seq()), (21, 21));
    j.append(&recs(21, 1, 10)).unwrap();
    assert_eq!(seqs(&j.read_after(20, 10).unwrap()), vec![21]);
}

#[test]
fn a_small_acked_active_segment_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    j.append(&recs(1, 1, 10)).unwrap();
    j.trim(1).unwrap();
    assert_eq!(j.first_seq(), 1, "a tiny segment is not worth a new file");
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[test]
fn a_torn_tail_is_cut_and_the_journal_goes_on() {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    for case in 0..40 {
        let dir = tempfile::tempdir().unwrap();
        let all = recs(1, 12, 120);
        {
            let mut j = Journal::open(dir.path(), small(), 3).unwrap();
            j.append(&all).unwrap();
        }
        let last = segment_files(dir.path()).pop().unwrap();
        let len = fs::metadata(&last).unwrap().len();
        let header = segment::SEGMENT_HEADER_LEN as u64;
        match case % 3 {
            // Cut anywhere inside the records (a write that never finished).
            0 => {
                let cut = rng.gen_range(header + 1..len);
                let f = fs::OpenOptions::new().write(true).open(&last).unwrap();
                f.set_len(cut).unwrap();
            }
            // Flip a byte of the last record.
            1 => {
                let mut b = fs::read(&last).unwrap();
                let i = rng.gen_range(len as usize - 100..len as usize);
                b[i] ^= 0x10;
                fs::write(&last, b).unwrap();
            }
            // The file grew but its data never reached the disk.
            _ => {
                let mut b = fs::read(&last).unwrap();
                b.extend(std::iter::repeat_n(0, rng.gen_range(1..5000)));
                fs::write(&last, b).unwrap();
            }
        }
        let mut j = Journal::open(dir.path(), small(), 3).unwrap();
        let kept = j.last_seq();
        assert!(kept <= 12, "case {case}");
        if case % 3 != 0 {
            assert!(kept >= 11, "case {case}: only the damaged record goes");
        }
        assert_eq!(read_all(&j, 1000), all[..kept as usize], "case {case}");
        assert_eq!(j.bytes(), disk_bytes(dir.path()));
        j.append(&recs(kept + 1, 3, 50)).unwrap();
        drop(j);
        let j = Journal::open(dir.path(), small(), 3).unwrap();
        assert_eq!(
            j.last_seq(),
            kept + 3,
            "case {case}: clean after the repair"
        );
    }
}

#[test]
fn a_damaged_header_of_the_last_segment_is_rewritten() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), small(), 3).unwrap();
        j.append(&recs(1, 12, 120)).unwrap();
    }
    let last = segment_files(dir.path()).pop().unwrap();
    let first_of_last: u64 = last.file_stem().unwrap().to_str().unwrap().parse().unwrap();
    // A crash right after the file was created.
    fs::write(&last, b"dopp").unwrap();
    let mut j = Journal::open(dir.path(), small(), 3).unwrap();
    assert_eq!(j.last_seq(), first_of_last - 1);
    j.append(&recs(first_of_last, 1, 1)).unwrap();
}

#[test]
fn damage_in_an_older_segment_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), small(), 3).unwrap();
        j.append(&recs(1, 30, 120)).unwrap();
    }
    let files = segment_files(dir.path());
    let mut b = fs::read(&files[1]).unwrap();
    b[100] ^= 1;
    fs::write(&files[1], b).unwrap();
    let err = Journal::open(dir.path(), small(), 3).unwrap_err();
    assert!(matches!(err, Error::Corrupt { ref path, .. } if *path == files[1]));
    let msg = err.to_string();
    assert!(msg.contains(files[1].to_str().unwrap()), "{msg}");
    assert!(
        msg.contains("move this file and every older segment"),
        "{msg}"
    );

    // Following the advice works: the journal starts after the damaged segment.
    fs::remove_file(&files[0]).unwrap();
    fs::remove_file(&files[1]).unwrap();
    let j = Journal::open(dir.path(), small(), 3).unwrap();
    let first_of_2: u64 = files[2]
        .file_stem()
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!((j.first_seq(), j.last_seq()), (first_of_2, 30));
}

#[test]
fn a_renamed_segment_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), small(), 3).unwrap();
        j.append(&recs(1, 3, 10)).unwrap();
    }
    let files = segment_files(dir.path());
    let renamed = dir.path().join(segment::file_name(2));
    fs::rename(&files[0], &renamed).unwrap();
    let err = Journal::open(dir.path(), small(), 3).unwrap_err();
    assert!(matches!(err, Error::Corrupt { ref path, .. } if *path == renamed));
    assert!(err.to_string().contains("its name says 2"), "{err}");
}

#[test]
fn a_missing_segment_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), small(), 3).unwrap();
        j.append(&recs(1, 30, 120)).unwrap();
    }
    let files = segment_files(dir.path());
    fs::remove_file(&files[2]).unwrap();
    let err = Journal::open(dir.path(), small(), 3).unwrap_err();
    assert!(matches!(err, Error::Corrupt { ref path, .. } if *path == files[3]));
    assert!(err.to_string().contains("should start at"), "{err}");
}

#[test]
fn the_budget_is_enforced() {
    let dir = tempfile::tempdir().unwrap();
    let budget = 3000;
    let mut j = Journal::open(dir.path(), opts(1024, budget), 1).unwrap();
    let mut seq = 1;
    let err = loop {
        match j.append(&recs(seq, 2, 100)) {
            Ok(()) => seq += 2,
            Err(e) => break e,
        }
        assert!(seq < 1000, "the budget never filled");
    };
    let AppendError::Full {
        needed,
        used,
        budget: b,
    } = err
    else {
        panic!("{err}");
    };
    assert_eq!((used, b), (j.bytes(), budget));
    assert!(used + needed > budget && used <= budget);
    assert_eq!(j.last_seq(), seq - 1, "a refused batch writes nothing");
    assert_eq!(j.bytes(), disk_bytes(dir.path()));
    // Acks free whole segments, and appends go on.
    j.trim(seq - 1 - 4).unwrap();
    assert!(j.bytes() < used);
    j.append(&recs(seq, 2, 100)).unwrap();
}

#[test]
fn a_full_budget_reclaims_an_acked_active_segment() {
    let dir = tempfile::tempdir().unwrap();
    // The active segment never reaches a quarter of the segment size, so trim keeps it.
    let mut j = Journal::open(dir.path(), opts(1 << 20, 600), 1).unwrap();
    j.append(&recs(1, 3, 100)).unwrap();
    j.trim(3).unwrap();
    assert_eq!(j.first_seq(), 1);
    j.append(&recs(4, 3, 100)).unwrap();
    assert_eq!(j.first_seq(), 4);
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[test]
fn reset_starts_a_new_sequence_space() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    j.append(&recs(1, 30, 100)).unwrap();
    j.reset(2).unwrap();
    assert_eq!(
        (j.epoch(), j.first_seq(), j.last_seq(), j.durable_seq()),
        (2, 1, 0, 0)
    );
    assert_eq!(segment_files(dir.path()).len(), 1);
    assert_eq!(j.bytes(), disk_bytes(dir.path()));
    j.append(&recs(1, 2, 10)).unwrap();
    drop(j);
    let j = Journal::open(dir.path(), small(), 9).unwrap();
    assert_eq!((j.epoch(), j.first_seq(), j.last_seq()), (2, 1, 2));
}

#[test]
fn an_interrupted_reset_is_finished_at_open() {
    let dir = tempfile::tempdir().unwrap();
    {
        let mut j = Journal::open(dir.path(), small(), 1).unwrap();
        j.append(&recs(1, 30, 100)).unwrap();
    }
    // reset() writes meta first; pretend it crashed right after.
    fs::write(dir.path().join("meta"), "doppel-journal 1\nepoch 2\n").unwrap();
    let j = Journal::open(dir.path(), small(), 9).unwrap();
    assert_eq!((j.epoch(), j.first_seq(), j.last_seq()), (2, 1, 0));
    assert_eq!(segment_files(dir.path()).len(), 1);
}

#[test]
fn a_bad_meta_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    drop(Journal::open(dir.path(), small(), 1).unwrap());
    fs::write(dir.path().join("meta"), "doppel-journal 1\nepoch x\n").unwrap();
    let err = Journal::open(dir.path(), small(), 1).unwrap_err();
    assert!(matches!(err, Error::BadMeta { .. }), "{err}");
    assert!(err.to_string().contains("move"), "{err}");
}

#[test]
fn one_process_per_journal() {
    let dir = tempfile::tempdir().unwrap();
    let _j = Journal::open(dir.path(), small(), 1).unwrap();
    assert!(matches!(
        Journal::open(dir.path(), small(), 1),
        Err(Error::Locked { .. })
    ));
}

#[test]
fn bad_appends_write_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    let written = j.written_bytes();
    assert!(matches!(
        j.append(&[rec(1, 1), rec(3, 1)]),
        Err(AppendError::Sequence {
            expected: 2,
            got: 3
        })
    ));
    assert!(matches!(
        j.append(&[rec(1, MAX_PAYLOAD)]),
        Err(AppendError::TooLarge { seq: 1, .. })
    ));
    assert_eq!((j.last_seq(), j.written_bytes()), (0, written));
    j.append(&[]).unwrap();
}

#[test]
fn a_record_larger_than_a_segment_gets_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), small(), 1).unwrap();
    let all = vec![rec(1, 10), rec(2, 5000), rec(3, 10)];
    j.append(&all).unwrap();
    assert_eq!(segment_files(dir.path()).len(), 3);
    assert_eq!(read_all(&j, 1), all);
    drop(j);
    let j = Journal::open(dir.path(), small(), 1).unwrap();
    assert_eq!(read_all(&j, 100_000), all);
}

#[test]
fn the_interval_policy_tracks_durability() {
    let dir = tempfile::tempdir().unwrap();
    let mut o = small();
    o.fsync = FsyncPolicy::Interval(Duration::from_secs(3600));
    let mut j = Journal::open(dir.path(), o, 1).unwrap();
    assert_eq!(j.sync_deadline(), None);
    j.append(&recs(1, 2, 10)).unwrap();
    assert_eq!((j.durable_seq(), j.last_seq()), (0, 2));
    assert!(j.sync_deadline().is_some());
    j.sync().unwrap();
    assert_eq!(j.durable_seq(), 2);
    assert_eq!(j.sync_deadline(), None);

    o = small();
    o.fsync = FsyncPolicy::Always;
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), o, 1).unwrap();
    j.append(&recs(1, 2, 10)).unwrap();
    assert_eq!(j.durable_seq(), 2);
}

#[test]
fn write_amplification_is_small() {
    let dir = tempfile::tempdir().unwrap();
    let mut j = Journal::open(dir.path(), opts(1 << 20, u64::MAX), 1).unwrap();
    let start = j.written_bytes();
    let mut data = 0;
    for i in 0..200u64 {
        let batch = recs(i * 10 + 1, 10, 4096);
        data += batch.iter().map(|r| r.op.data_len() as u64).sum::<u64>();
        j.append(&batch).unwrap();
        j.trim(i * 10).unwrap();
    }
    let ratio = (j.written_bytes() - start) as f64 / data as f64;
    assert!(ratio <= 1.01, "{ratio}");
}

/// Random appends, trims, reads, reopens, tail damage and resets against a model.
#[test]
fn random_operations_match_a_model() {
    for seed in 0..12 {
        run_model(seed);
    }
}

fn run_model(seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let o = opts(rng.gen_range(200..3000), rng.gen_range(2000..20_000));
    let mut j = Journal::open(dir.path(), o.clone(), 1).unwrap();
    // Every record of the epoch, from seq 1: the journal holds a suffix of it.
    let mut model: Vec<Record> = Vec::new();
    let mut acked = 0;
    let mut epoch = 1;
    for step in 0..300 {
        let ctx = format!("seed {seed} step {step}");
        match rng.gen_range(0..100) {
            0..=49 => {
                let n = rng.gen_range(1..5);
                let batch: Vec<Record> = (0..n)
                    .map(|i| rec(model.len() as u64 + 1 + i, rng.gen_range(0..400)))
                    .collect();
                match j.append(&batch) {
                    Ok(()) => model.extend(batch),
                    Err(AppendError::Full { .. }) => {}
                    Err(e) => panic!("{ctx}: {e}"),
                }
            }
            50..=69 => {
                acked = rng.gen_range(acked..=model.len() as u64);
                j.trim(acked).unwrap();
            }
            70..=84 => {
                let after = rng.gen_range(j.first_seq() - 1..=j.last_seq());
                let got = j.read_after(after, rng.gen_range(1..2000)).unwrap();
                let want = &model[after as usize..];
                assert_eq!(got.is_empty(), want.is_empty(), "{ctx}");
                assert_eq!(got, want[..got.len()], "{ctx}");
            }
            85..=93 => {
                drop(j);
                j = Journal::open(dir.path(), o.clone(), 99).unwrap();
            }
            94..=97 => {
                // A crash mid-append: the last segment loses some tail bytes.
                drop(j);
                let last = segment_files(dir.path()).pop().unwrap();
                let len = fs::metadata(&last).unwrap().len();
                let header = segment::SEGMENT_HEADER_LEN as u64;
                let f = fs::OpenOptions::new().write(true).open(&last).unwrap();
                f.set_len(rng.gen_range(header..=len)).unwrap();
                j = Journal::open(dir.path(), o.clone(), 99).unwrap();
                model.truncate(j.last_seq() as usize);
                acked = acked.min(j.last_seq());
            }
            _ => {
                epoch += 1;
                j.reset(epoch).unwrap();
                model.clear();
                acked = 0;
            }
        }
        assert_eq!(j.epoch(), epoch, "{ctx}");
        assert_eq!(j.last_seq(), model.len() as u64, "{ctx}");
        assert!(
            j.first_seq() <= acked + 1,
            "{ctx}: unacknowledged records were dropped"
        );
        assert!(j.bytes() <= o.budget_bytes, "{ctx}");
        assert_eq!(j.bytes(), disk_bytes(dir.path()), "{ctx}");
        assert_eq!(
            read_all(&j, 700),
            model[j.first_seq() as usize - 1..],
            "{ctx}"
        );
    }
}
