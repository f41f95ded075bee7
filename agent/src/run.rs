//! The daemon: capture -> resolve -> queue -> send, wired together.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, Result};
use doppel_common::event::FileId;
use doppel_transport::Identity;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::capture::{
    marks::marked_fs, Capture, CaptureOptions, MarkedFs, SyscallCapture, WatchMode,
};
use crate::config::Config;
use crate::control::{self, Reply};
use crate::journal::Journal;
use crate::mirror::{Tracker, Work};
use crate::queue::SetQueue;
use crate::resolve::{Resolver, SentWhole, SetOp, Watcher};
use crate::restart::{self, Checkpoints};
use crate::send::{run_target, FirstWelcome, Route, Shared, TargetState};
use crate::verify::Job;
use doppel_common::wire::sums::{is_mirror_job, LAYOUT_JOB, QUICK_JOB};
use doppel_common::wire::Op;

/// Installs watches in the kernel filter. A failure is logged: the directory's
/// changes are then missed until a rescan, which the log says.
struct KernelWatcher(Arc<Capture>);

impl Watcher for KernelWatcher {
    fn watch(&self, dir: FileId) {
        // Marked first: files made in it from now on are marked by the kernel.
        self.0.mark(dir);
        if let Err(e) = self.0.watch_dir(dir, WatchMode::Contents) {
            // Once: a full list refuses every further directory of a large tree.
            if self.0.first_dir_refusal() {
                tracing::error!(?dir, error = %format!("{e:#}"), "cannot watch a directory: changes in it and in further refused ones are not captured (the set is degraded; `status` counts them)");
            } else {
                debug!(?dir, error = %format!("{e:#}"), "cannot watch a directory");
            }
        }
    }
    fn watch_ancestor(&self, dir: FileId) {
        if let Err(e) = self.0.watch_dir(dir, WatchMode::Ancestor) {
            warn!(?dir, error = %format!("{e:#}"), "cannot watch an ancestor directory");
        }
    }
    fn unwatch(&self, dir: FileId) {
        tracing::trace!(?dir, "unwatch");
        // Its mark in the inode bitmap stays: by the time the agent learns that a
        // directory left, its inode number may belong to a new file the kernel marked
        // (it clears a mark itself when it frees the inode). A directory that left
        // alive keeps marking what is made in it; those writes resolve to nothing.
        let _ = self.0.unwatch_dir(dir);
    }
    fn watch_linked(&self, file: FileId) {
        self.0.watch_linked(file);
    }
    fn watch_file(&self, file: FileId) {
        self.0.mark(file);
    }
}

/// The set's queue, with its journal when the mode uses one.
fn open_queue(config: &Config, set: &crate::config::Set, targets: usize) -> Result<SetQueue> {
    let journal = if set.queue.uses_journal() {
        let dir = config.state_dir.join("journal").join(&set.name);
        let j = Journal::open(&dir, config.journal.clone(), new_epoch()).with_context(|| {
            format!(
                "cannot open the journal of set {:?} in {}",
                set.name,
                dir.display()
            )
        })?;
        Some(j)
    } else {
        None
    };
    Ok(SetQueue::with(
        set.queue,
        journal,
        new_epoch(),
        targets,
        config.queue_memory_bytes,
    ))
}

/// Data resolved but not yet queued, at most (bounds memory between the two stages).
const RESOLVE_BATCH_BYTES: usize = 4 << 20;

/// A fresh sequence space id: distinct across restarts of the agent.
fn new_epoch() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.as_nanos() as u64) ^ ((std::process::id() as u64) << 48)
}

/// The filesystems of the sets whose writes can be captured inside the filesystem
/// (ext4, xfs; the capture takes each device once). A set whose root cannot be looked at
/// is left to the syscall capture alone (its start reports the root's problem).
fn marked_filesystems(config: &Config) -> Vec<MarkedFs> {
    let mut out = Vec::new();
    for set in &config.sets {
        match marked_fs(&set.root) {
            Ok(fs) => out.extend(fs),
            Err(e) => {
                debug!(set = %set.name, error = %format!("{e:#}"), "cannot tell the set's filesystem")
            }
        }
    }
    out
}

pub async fn run(config: Config) -> Result<()> {
    let identity = Arc::new(Identity::load(&config.cert, &config.key).with_context(|| {
        format!(
            "cannot load this agent's key pair ({}, {}): create it with `doppel-agent keygen --out DIR`",
            config.cert.display(),
            config.key.display()
        )
    })?);
    doppel_transport::warm_up();
    let stamps = restart::load(&config);
    let marked = marked_filesystems(&config);
    let (capture, mut events) = Capture::start(CaptureOptions {
        ring_bytes: config.capture_ring_bytes,
        mark_filesystems: marked.clone(),
        set_roots: config.sets.iter().map(|s| s.root.clone()).collect(),
        syscall_capture: SyscallCapture::WhereNeeded,
        ..CaptureOptions::default()
    })?;
    let capture = Arc::new(capture);
    let mut fs_namespace = Vec::new();
    for set in &config.sets {
        let dev = std::fs::metadata(&set.root).map(|m| std::os::unix::fs::MetadataExt::dev(&m));
        let data = dev.as_ref().is_ok_and(|&d| capture.in_filesystem(d));
        let names = dev
            .as_ref()
            .is_ok_and(|&d| capture.namespace_in_filesystem(d));
        fs_namespace.push(names);
        let kind = dev
            .as_ref()
            .ok()
            .and_then(|&d| marked.iter().find(|f| f.dev == d))
            .map_or("", |f| f.kind.name());
        if data && names {
            info!(set = %set.name, "captured inside the filesystem ({kind}): every write whatever its door, namespace changes through fanotify");
        } else if data {
            warn!(set = %set.name, "writes are captured inside the filesystem ({kind}), namespace changes at the syscall door (see the fanotify warning above)");
        } else {
            warn!(set = %set.name, "captured at the syscall door (the set is not on ext4 or xfs, or its filesystem has more inode numbers than the capture's bitmap holds): every process on the host pays for the hook, and Linux AIO and 32-bit writes are not seen");
        }
    }
    ignore_local_receivers(&capture);

    let (pushed, _) = watch::channel(0u64);
    let (mirror_work, mut mirror_rx) = mpsc::unbounded_channel();
    let (acked, _) = watch::channel(0u64);
    let mut slots = vec![0usize; config.sets.len()];
    let mut routes: Vec<Vec<Route>> = vec![Vec::new(); config.targets.len()];
    for (s, set) in config.sets.iter().enumerate() {
        for &t in &set.targets {
            routes[t].push(Route {
                set: s,
                slot: slots[s],
            });
            slots[s] += 1;
        }
    }
    let ack_latency_family = doppel_control::metrics::latency_histograms();
    let ack_latency = config
        .sets
        .iter()
        .map(|set| {
            set.targets
                .iter()
                .map(|&t| {
                    let l = doppel_control::metrics::labels([
                        ("set", &set.name),
                        ("target", &config.targets[t].name),
                    ]);
                    ack_latency_family.get_or_create(&l).clone()
                })
                .collect()
        })
        .collect();
    let shared = Arc::new(Shared {
        source: config.name.clone(),
        set_names: config.sets.iter().map(|s| s.name.clone()).collect(),
        queues: config
            .sets
            .iter()
            .zip(&slots)
            .map(|(set, &n)| open_queue(&config, set, n).map(Mutex::new))
            .collect::<Result<_>>()?,
        pushed,
        acked,
        targets: config
            .targets
            .iter()
            .map(|_| Mutex::new(TargetState::default()))
            .collect(),
        mapped_hot_pages: Default::default(),
        reread_ranges: Default::default(),
        rescans_deferred: Default::default(),
        mirror: Mutex::new(Tracker::new(slots.clone())),
        mirror_work,
        mirror_inflight: config.sets.iter().map(|_| Default::default()).collect(),
        jobs: Default::default(),
        set_targets: config.sets.iter().map(|s| s.targets.clone()).collect(),
        target_names: config.targets.iter().map(|t| t.name.clone()).collect(),
        ack_latency,
        ack_latency_family,
        capture_stats: {
            let capture = capture.clone();
            Box::new(move || capture.stats())
        },
        scanning: std::sync::atomic::AtomicBool::new(true),
        degraded_lag: config.degraded_lag,
        started: std::time::SystemTime::now(),
    });
    if let Some(addr) = config.metrics.listen {
        let listener = doppel_control::metrics::bind(addr)?;
        let shared = shared.clone();
        let render = Arc::new(move || crate::metrics::render(&shared));
        tokio::spawn(doppel_control::metrics::serve(listener, render));
    }
    let (verify_tx, mut verify_rx) = mpsc::unbounded_channel();
    {
        let path = control::socket_path(&config.state_dir);
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = control::serve(path, shared, verify_tx).await {
                warn!(error = %format!("{e:#}"), "the control socket is down: status and verify cannot reach this agent");
            }
        });
    }
    let mut next_job = 1u64;
    // Mirror work waiting for queue room: pieces of answers, and whether each is the last
    // piece of its answer.
    let mut backlog: std::collections::VecDeque<(Work, bool)> = Default::default();

    let mut resolver = Resolver::new(config.sets.clone(), KernelWatcher(capture.clone()))
        .context("cannot open a set root")?;
    for (set, yes) in fs_namespace.into_iter().enumerate() {
        resolver.set_namespace_in_filesystem(set, yes);
    }
    let (gap_tx, mut gaps) = mpsc::unbounded_channel();
    let (stop, stopping) = tokio::sync::watch::channel(false);
    let mut senders = tokio::task::JoinSet::new();
    for (i, t) in config.targets.iter().enumerate() {
        senders.spawn(run_target(
            shared.clone(),
            identity.clone(),
            i,
            t.clone(),
            routes[i].clone(),
            gap_tx.clone(),
            stopping.clone(),
        ));
    }
    tokio::spawn(report(shared.clone(), capture.clone(), config.clone()));
    {
        let capture = capture.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(2));
            loop {
                tick.tick().await;
                ignore_local_receivers(&capture);
            }
        });
    }

    {
        // Scans hand their ops to the queues as they go (room is not waited for their
        // comparisons, which are small, and hybrid queues spill).
        let sink = shared.clone();
        resolver.set_scan_sink(Box::new(move |ops, whole| {
            queue_scan_ops(&sink, ops, whole)
        }));
        // The bytes a first mirror sends at once go only where there is room (briefly
        // waited for): a target that does not keep up gets comparisons instead.
        let room = shared.clone();
        resolver.set_scan_room(Box::new(move |set, bytes| {
            let deadline = std::time::Instant::now() + SEND_ROOM_WAIT;
            loop {
                if room.queue(set).mirror_room() as u64 >= bytes {
                    return true;
                }
                if std::time::Instant::now() >= deadline {
                    return false;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
        }));
    }
    let said = first_welcomes(&shared, FIRST_WELCOME_WAIT).await;
    for (set, targets) in shared.set_targets.iter().enumerate() {
        let yes = !targets.is_empty()
            && targets
                .iter()
                .all(|&t| said[t].as_ref().is_some_and(|w| w.empty.contains(&set)));
        if yes {
            info!(set = %config.sets[set].name, "the replica holds nothing yet: small files go with their bytes, not compared");
        }
        resolver.set_first_copy_sends(set, yes);
    }
    restart::apply(&shared, &said, stamps, &mut resolver);
    let mut ops = Vec::new();
    resolver.scan_all(&mut ops);
    info!(
        sets = config.sets.len(),
        entries = resolver.index().len(),
        unchanged = resolver.vouched,
        "initial scan done; replicating live"
    );
    let mut room = shared.acked.subscribe();
    push(&shared, &mut resolver, &mut ops, &mut room).await;
    shared.scanning.store(false, Ordering::SeqCst);

    let mut checkpoints = Checkpoints::new(&config);
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    // Journal fsyncs (records are sent once durable), resyncs after a journal overflow,
    // ranges and rescans waiting for their time, checkpoints.
    let mut housekept = tokio::time::Instant::now();
    let mut mapped_pass = tokio::time::interval(crate::mapped::PASS_INTERVAL);
    mapped_pass.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let mirror_room = (0..config.sets.len())
            .map(|s| shared.queue(s).mirror_room())
            .min()
            .unwrap_or(0);
        tokio::select! {
            // Acknowledgements freed room for the mirror's data: look again.
            r = room.changed(), if mirror_room == 0 && !backlog.is_empty() => {
                if r.is_err() {
                    break;
                }
            }
            // The mirror's data, a piece at a time, as far as the queues have room.
            _ = std::future::ready(()), if mirror_room > 0 && !backlog.is_empty() => {
                let mut left = mirror_room as u64;
                let mut answered = Vec::new();
                while left > 0 {
                    let Some((work, last)) = backlog.pop_front() else { break };
                    left = left.saturating_sub(work.bytes());
                    let compares = matches!(work, Work::CompareRest { .. } | Work::Resum { .. });
                    if last {
                        answered.push(work.set());
                    }
                    handle_mirror_work(&mut resolver, work, &mut ops);
                    // A file's comparisons go out before the next file is read, so
                    // that the target compares while this side reads.
                    if compares {
                        break;
                    }
                }
                resolver.finish(&mut ops);
                push(&shared, &mut resolver, &mut ops, &mut room).await;
                for set in answered {
                    shared.mirror_inflight[set].fetch_sub(1, Ordering::SeqCst);
                }
            }
            _ = mapped_pass.tick(), if resolver.has_mapped() => {
                resolver.mapped_pass(&mut ops);
                resolver.finish(&mut ops);
                publish(&shared, &resolver);
                push(&shared, &mut resolver, &mut ops, &mut room).await;
            }
            _ = tokio::time::sleep_until(next_housekeeping(&shared, &resolver, housekept)) => {
                housekept = tokio::time::Instant::now();
                let now = std::time::Instant::now();
                let mut durable = false;
                for s in 0..config.sets.len() {
                    let mut q = shared.queue(s);
                    durable |= q.sync_due(now);
                    if let Some(marks) = q.take_resync() {
                        drop(q);
                        if marks.whole {
                            warn!(set = %config.sets[s].name, "comparing the whole set again after a journal overflow (too many changes to remember which)");
                            resolver.scan_set(s, &mut ops);
                        } else {
                            warn!(set = %config.sets[s].name, entries = marks.entries.len(), directories = marks.dirs.len(), "copying again what changed while the journal was full (marked entries only)");
                            resolver.resync_marked(s, &marks, &mut ops);
                        }
                    }
                }
                if durable {
                    shared.pushed.send_modify(|g| *g += 1);
                }
                checkpoints.ask_due(&shared);
                if resolver.rescan_if_due(&mut ops) || resolver.has_deferred() {
                    resolver.finish(&mut ops);
                }
                push(&shared, &mut resolver, &mut ops, &mut room).await;
            }
            batch = events.recv() => {
                let Some(batch) = batch else {
                    anyhow::bail!("the capture thread stopped; see the log above for why");
                };
                let complete_before = batch.complete_before;
                resolve_batch(batch, &shared, &mut resolver, &mut ops, &mut room).await;
                checkpoints.take_ready(complete_before, &shared, &resolver, backlog.is_empty());
            }
            Some(set) = checkpoints.done.recv() => checkpoints.written(set),
            Some(set) = gaps.recv() => {
                let epoch = new_epoch();
                warn!(set = %config.sets[set].name, "a target needs records no longer queued: starting a new epoch and copying the set again");
                shared.queue(set).reset(epoch);
                shared.tracker().reset(set);
                resolver.scan_set(set, &mut ops);
                push(&shared, &mut resolver, &mut ops, &mut room).await;
            }
            Some(work) = mirror_rx.recv() => {
                // An answer counts as in flight until its last piece is queued.
                let answer = matches!(work, Work::Need(_));
                let mut pieces = crate::mirror::split(work, MIRROR_PIECE);
                let last = pieces.pop();
                backlog.extend(pieces.into_iter().map(|w| (w, false)));
                backlog.extend(last.map(|w| (w, answer)));
            }
            Some(req) = verify_rx.recv() => {
                let id = next_job;
                next_job += 1;
                let names: Vec<&str> = req.sets.iter().map(|&s| config.sets[s].name.as_str()).collect();
                info!(job = id, sets = ?names, repair = req.repair, "verify started");
                shared.jobs().insert(id, Job::new(req.repair, shared.sessions()));
                resolver.verify(&req.sets, id, req.repair, &mut ops);
                resolver.finish(&mut ops);
                push(&shared, &mut resolver, &mut ops, &mut room).await;
                if let Some(j) = shared.jobs().get_mut(&id) {
                    j.seal();
                }
                tokio::spawn(watch_job(shared.clone(), id, req.reply));
            }
            _ = tokio::signal::ctrl_c() => break,
            _ = term.recv() => break,
        }
    }
    info!("stopping");
    // What was captured until now is queued, acknowledged if the targets are quick, and
    // stamped, so that the next start compares only what changes meanwhile.
    let (asked, wall) = (
        doppel_common::event::monotonic_ns(),
        std::time::SystemTime::now(),
    );
    let deadline = tokio::time::Instant::now() + STOP_CAPTURE_WAIT;
    while let Ok(Some(batch)) = tokio::time::timeout_at(deadline, events.recv()).await {
        let complete_before = batch.complete_before;
        resolve_batch(batch, &shared, &mut resolver, &mut ops, &mut room).await;
        if complete_before >= asked {
            break;
        }
    }
    wait_acked(&shared, STOP_ACK_WAIT).await;
    checkpoints
        .at_stop(&shared, &resolver, backlog.is_empty(), wall)
        .await;
    // Each target's task says goodbye and ends; all at once, so that they drain side by
    // side (each waits at most half a second for an unresponsive target).
    let _ = stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(1), senders.join_all()).await;
    Ok(())
}

/// A receiver on this host (a demo, a test, or a host that is both source and target)
/// writes replicas; its I/O must never be captured, whatever the configuration, or a
/// replica root placed under a watched root would replicate itself in a loop.
fn ignore_local_receivers(capture: &Capture) {
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let is_receiver = std::fs::read_to_string(p.path().join("comm"))
            .is_ok_and(|c| c.trim_end() == "doppel-receiver");
        if is_receiver {
            if let Err(e) = capture.ignore_pid(pid) {
                warn!(pid, error = %format!("{e:#}"), "cannot exclude a local doppel-receiver from capture");
            }
        }
    }
}

/// Moves ops into their set queues, wakes the senders, then waits while a queue is over
/// its bound (the kernel keeps capturing meanwhile; what does not fit in the ring is
/// remembered as ranges and resent).
async fn push<W: Watcher>(
    shared: &Shared,
    resolver: &mut Resolver<W>,
    ops: &mut Vec<SetOp>,
    room: &mut watch::Receiver<u64>,
) {
    if ops.is_empty() {
        return;
    }
    queue_ops(shared, ops);
    // Bytes read back from files instead of captured at write time may be newer than
    // records queued after them: the replica is not crash-consistent until everything
    // up to here is applied with nothing newer pending.
    for set in resolver.take_read_back() {
        shared.queue(set).order_broken();
    }
    loop {
        room.borrow_and_update();
        let full = (0..shared.queues.len()).any(|s| shared.queue(s).full());
        if !full {
            return;
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), room.changed()).await;
    }
}

/// Moves ops into their set queues (tracking comparisons) and wakes the senders.
fn queue_ops(shared: &Shared, ops: &mut Vec<SetOp>) {
    queue_scan_ops(shared, ops, &mut Vec::new());
}

/// As [`queue_ops`], for a scan's ops, among which the files in `whole` went with their
/// bytes: each is tracked (progress, state) from its last record on.
fn queue_scan_ops(shared: &Shared, ops: &mut Vec<SetOp>, whole: &mut Vec<SentWhole>) {
    let mut notes = whole.drain(..).peekable();
    for (i, SetOp { set, mut op }) in ops.drain(..).enumerate() {
        // Writes joined from many small ones grew by doubling: give the slack back
        // before the queue holds them (its bound counts data, and glibc shrinks a
        // block in place).
        if let Op::Write { data, .. } = &mut op {
            // Back to the vector it was made from (not a copy: nothing else holds it yet).
            let mut v = Vec::from(std::mem::take(data));
            v.shrink_to_fit();
            *data = v.into();
        }
        let compared = match &op {
            Op::Sum {
                job,
                file,
                size,
                offset,
                block,
                sums,
                ..
            } => {
                // Progress counts a mirrored file and its bytes at its layout question;
                // the comparisons its answer leads to count nothing more.
                let (bytes, first) = match *job {
                    LAYOUT_JOB => (size - offset, true),
                    0 => (0, false),
                    _ => (
                        (sums.len() as u64 * *block as u64).min(size - offset),
                        *offset == 0,
                    ),
                };
                Some((
                    *job,
                    FileId {
                        dev: file[0],
                        ino: file[1],
                    },
                    bytes,
                    first,
                ))
            }
            // Its answers (entries the source lacks, a directory the replica lacks)
            // count nothing, but the job waits for its acknowledgement like for a
            // comparison's.
            Op::List { job, .. } => Some((*job, FileId { dev: 0, ino: 0 }, 0, false)),
            _ => None,
        };
        let mut q = shared.queue(set);
        if !q.push(op) {
            continue;
        }
        match compared {
            // Under the queue's lock: no sender can take the record, nor its Ack
            // arrive, before it is tracked.
            // The mirror's comparisons, whose answers must not be lost.
            Some((job, file, bytes, first)) if is_mirror_job(job) => {
                shared.tracker().sent(set, q.last_seq(), file, bytes, first)
            }
            Some((job, _, bytes, first)) => {
                if let Some(j) = shared.jobs().get_mut(&job) {
                    j.queued(set, q.last_seq(), bytes, first);
                }
            }
            None => {}
        }
        while let Some(n) = notes.next_if(|n| n.end <= i + 1) {
            shared
                .tracker()
                .sent_whole(n.set, q.last_seq(), n.file, n.bytes);
        }
    }
    // Notes whose last op was not queued (a full journal dropped it).
    for n in notes {
        let q = shared.queue(n.set);
        shared
            .tracker()
            .sent_whole(n.set, q.last_seq(), n.file, n.bytes);
    }
    shared.pushed.send_modify(|g| *g += 1);
}

/// Bytes of file ranges the mirror queues at a time (see `mirror::split`).
const MIRROR_PIECE: u64 = 256 << 10;

/// How long a stop waits for the capture to hand over what it caught before the stop.
const STOP_CAPTURE_WAIT: Duration = Duration::from_secs(2);

/// How long a stop waits for targets to acknowledge what is queued.
const STOP_ACK_WAIT: Duration = Duration::from_secs(5);

/// Housekeeping's period while something waits for its time (ranges to read again, a
/// rescan, a resync), and while nothing does: an idle agent wakes a few times a second.
const HOUSEKEEPING_BUSY: Duration = Duration::from_millis(20);
const HOUSEKEEPING_IDLE: Duration = Duration::from_millis(250);

/// When housekeeping runs next, having last run at `last`: a journal's fsync is never
/// later than its policy says (records are sent once durable).
fn next_housekeeping<W: Watcher>(
    shared: &Shared,
    resolver: &Resolver<W>,
    last: tokio::time::Instant,
) -> tokio::time::Instant {
    let mut busy = !resolver.settled();
    let mut next = None::<std::time::Instant>;
    for s in 0..shared.set_names.len() {
        let q = shared.queue(s);
        busy |= q.resync_pending();
        if let Some(d) = q.sync_deadline() {
            next = Some(next.map_or(d, |n| n.min(d)));
        }
    }
    let period = if busy {
        HOUSEKEEPING_BUSY
    } else {
        HOUSEKEEPING_IDLE
    };
    let due = last + period;
    // At least a millisecond apart: a journal whose fsync keeps failing stays due.
    match next {
        Some(d) => due.min(tokio::time::Instant::from_std(d).max(last + Duration::from_millis(1))),
        None => due,
    }
}

/// Resolves a batch of captured events and queues the ops.
async fn resolve_batch<W: Watcher>(
    batch: crate::capture::CaptureBatch,
    shared: &Shared,
    resolver: &mut Resolver<W>,
    ops: &mut Vec<SetOp>,
    room: &mut watch::Receiver<u64>,
) {
    let mut pending = 0;
    let complete_before = batch.complete_before;
    for ev in batch {
        let before = ops.len();
        resolver.resolve(ev, ops);
        pending += ops[before..].iter().map(|o| o.op.data_len()).sum::<usize>();
        // A range event can expand to a lot of data read from the file: hand it to the
        // queue (and its bound) as it accumulates.
        if pending > RESOLVE_BATCH_BYTES {
            push(shared, resolver, ops, room).await;
            pending = 0;
        }
    }
    resolver.events_complete_before(complete_before);
    resolver.finish(ops);
    publish(shared, resolver);
    push(shared, resolver, ops, room).await;
}

/// Waits up to `within` for every connected target to acknowledge every queued record.
async fn wait_acked(shared: &Shared, within: Duration) {
    let all_acked = || {
        shared.set_targets.iter().enumerate().all(|(s, targets)| {
            let q = shared.queue(s);
            targets.iter().enumerate().all(|(slot, &t)| {
                q.acked(slot) >= q.last_seq()
                    || !shared.targets[t].lock().expect("target lock").connected
            })
        })
    };
    wait_for(shared, within, all_acked).await;
}

/// Waits up to `within` for `done`, looked at again whenever a target's session
/// reports something (a Welcome, an acknowledgement).
async fn wait_for(shared: &Shared, within: Duration, done: impl Fn() -> bool) {
    let mut changed = shared.acked.subscribe();
    let deadline = tokio::time::Instant::now() + within;
    while !done() {
        match tokio::time::timeout_at(deadline, changed.changed()).await {
            Ok(Ok(())) => {}
            _ => break,
        }
    }
}

/// How long the start waits for every target's first Welcome, which says whether its
/// replicas hold anything (a target away then gets the comparisons of a restart).
const FIRST_WELCOME_WAIT: Duration = Duration::from_secs(2);

/// How long a first mirror's scan waits for queue room for a file's bytes before it
/// compares the file instead.
const SEND_ROOM_WAIT: Duration = Duration::from_millis(50);

/// What each target said at its first Welcome (`None`: it did not answer within
/// `within`).
async fn first_welcomes(shared: &Shared, within: Duration) -> Vec<Option<FirstWelcome>> {
    let said = |t: usize| -> Option<FirstWelcome> {
        shared.targets[t]
            .lock()
            .expect("target lock")
            .first_welcome
            .clone()
    };
    wait_for(shared, within, || {
        (0..shared.targets.len()).all(|t| said(t).is_some())
    })
    .await;
    (0..shared.targets.len()).map(said).collect()
}

/// A target's answer to a comparison (of the mirror, or of a verify that repairs), or
/// files to compare again.
fn handle_mirror_work<W: Watcher>(resolver: &mut Resolver<W>, work: Work, ops: &mut Vec<SetOp>) {
    match work {
        // A quick check found the file different: compare its blocks.
        Work::Need(a) if a.job == QUICK_JOB => resolver.resum(a.set, a.file, ops),
        Work::Need(a) => {
            let fine = (a.fine_block, a.fine.as_slice());
            resolver.mirror_need(a.set, a.file, &a.ranges, fine, a.missing, ops);
        }
        Work::Resum { set, files } => {
            for f in files {
                resolver.resum(set, f, ops);
            }
        }
        Work::CompareRest { set, file, sent } => resolver.compare_rest(set, file, &sent, ops),
    }
}

/// Reports a verify job's progress to its command until every target answered all of
/// its comparisons, then the report. A target that reconnected meanwhile may have lost
/// answers: the job then fails and says so.
async fn watch_job(shared: Arc<Shared>, id: u64, reply: mpsc::UnboundedSender<Reply>) {
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let mut last = None;
    loop {
        tick.tick().await;
        let acked: Vec<u64> = (0..shared.queues.len())
            .map(|s| shared.queue(s).min_acked())
            .collect();
        let sessions = shared.sessions();
        let mut jobs = shared.jobs();
        let Some(job) = jobs.get(&id) else { return };
        if reply.is_closed() {
            jobs.remove(&id);
            info!(job = id, "verify cancelled: its command went away");
            return;
        }
        if job.sessions != sessions {
            jobs.remove(&id);
            warn!(job = id, "verify failed: a target reconnected meanwhile");
            let _ = reply.send(Reply::Error(
                "a target reconnected during the verify, so some of its answers may be lost; run the verify again".into(),
            ));
            return;
        }
        if job.complete(|s| acked[s]) {
            let job = jobs.remove(&id).expect("job present");
            let report = job.report(|s| acked[s]);
            info!(
                job = id,
                files = report.files,
                bytes = report.bytes,
                differing = report.findings.len(),
                repaired = report.repaired,
                "verify done"
            );
            let _ = reply.send(Reply::Report(report));
            return;
        }
        let p = job.progress(|s| acked[s]);
        if last != Some(p) {
            last = Some(p);
            let _ = reply.send(Reply::Progress(p));
        }
    }
}

/// Hands the resolver's counters to the status report.
fn publish<W: Watcher>(shared: &Shared, resolver: &Resolver<W>) {
    let hot = resolver.mapped_hot_pages() as u64;
    shared.mapped_hot_pages.store(hot, Ordering::Relaxed);
    shared
        .reread_ranges
        .store(resolver.reread_ranges, Ordering::Relaxed);
    shared
        .rescans_deferred
        .store(resolver.rescans_deferred(), Ordering::Relaxed);
}

/// Logs a status line per target every few seconds.
async fn report(shared: Arc<Shared>, capture: Arc<Capture>, config: Config) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    loop {
        tick.tick().await;
        let stats = capture.stats();
        for (t, target) in config.targets.iter().enumerate() {
            let st = shared.targets[t].lock().expect("target lock").clone();
            for (s, set) in config.sets.iter().enumerate() {
                let Some(slot) = set.targets.iter().position(|&x| x == t) else {
                    continue;
                };
                let sent_bytes = shared.target_sent_bytes(t);
                let q = shared.queue(s);
                let (lag_records, lag_bytes) = q.lag(slot);
                info!(
                    target = %target.name,
                    set = %set.name,
                    connected = st.connected,
                    seq = q.last_seq(),
                    acked = q.acked(slot),
                    lag_records,
                    lag_bytes,
                    queue = ?q.mode(),
                    spilled = q.spilled(),
                    journal_bytes = q.journal_bytes(),
                    journal_written_bytes = q.journal_written_bytes(),
                    pushed_bytes = q.pushed_bytes,
                    dropped = q.dropped,
                    sent_bytes,
                    captured_events = stats.events,
                    missed_ranges = stats.missed_ranges,
                    lost = stats.lost,
                    mapped_hot_pages = shared.mapped_hot_pages.load(Ordering::Relaxed),
                    reread_ranges = shared.reread_ranges.load(Ordering::Relaxed),
                    rescans_deferred = shared.rescans_deferred.load(Ordering::Relaxed),
                    "status"
                );
            }
        }
    }
}
