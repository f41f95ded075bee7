//! The restart shortcut's wiring (the reasoning is in `stamps.rs`): stamps loaded and
//! checked against the targets' first Welcomes at start, taken while the agent runs
//! and when it stops.

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use doppel_common::event::monotonic_ns;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::Config;
use crate::resolve::{Resolver, Watcher};
use crate::send::{FirstWelcome, Shared};
use crate::stamps::{self, Checkpoint, Stamps};

/// Per set: the stamps the last run left, if any (the files are consumed: a new epoch
/// makes them stale, and the next checkpoint writes new ones).
pub fn load(config: &Config) -> Vec<Option<Stamps>> {
    config
        .sets
        .iter()
        .map(|set| {
            let file = Stamps::file(&config.state_dir, &set.name);
            let loaded = Stamps::load(&file, &set.root);
            Stamps::remove(&file);
            match loaded {
                Ok(s) => s.filter(|_| config.stamp_margin.is_some()),
                Err(e) => {
                    warn!(set = %set.name, error = %format!("{e:#}"), "ignoring the stamps of the last run: every file is compared");
                    None
                }
            }
        })
        .collect()
}

/// Whether a target's first Welcome vouches that its replica of `set` holds at least
/// what `stamps` were taken at: it holds something, and it reached their sequence in
/// their epoch, or the set goes on in that epoch (its journal was replayed: the
/// receiver resumes in it, and a gap there makes the set copied again in full).
fn vouches(said: &FirstWelcome, set: usize, stamps: &Stamps, queue_epoch: u64) -> bool {
    let reached = said
        .prior
        .iter()
        .any(|&(s, epoch, applied)| s == set && epoch == stamps.epoch && applied >= stamps.seq);
    !said.empty.contains(&set) && (queue_epoch == stamps.epoch || reached)
}

/// Hands the resolver the stamps every target of their set vouches for.
pub fn apply<W: Watcher>(
    shared: &Shared,
    said: &[Option<FirstWelcome>],
    loaded: Vec<Option<Stamps>>,
    resolver: &mut Resolver<W>,
) {
    for (set, stamps) in loaded.into_iter().enumerate() {
        let Some(stamps) = stamps else { continue };
        let name = &shared.set_names[set];
        let epoch = shared.queue(set).epoch;
        let targets = &shared.set_targets[set];
        let away: Vec<&str> = targets
            .iter()
            .filter(|&&t| {
                !said[t]
                    .as_ref()
                    .is_some_and(|w| vouches(w, set, &stamps, epoch))
            })
            .map(|&t| shared.target_names[t].as_str())
            .collect();
        if targets.is_empty() || !away.is_empty() {
            info!(set = %name, targets = ?away, "comparing every file: these targets did not say their replica holds what the last run left (away, emptied, failed over to, or behind)");
            continue;
        }
        info!(set = %name, files = stamps.len(), "restart: files unchanged since the last run are not compared again");
        resolver.set_stamps(set, stamps);
    }
}

/// Whether set `set` has nothing pending but acknowledgements: neither in the resolver
/// nor on the agent's side of the sessions. A running verify counts: a repair it is
/// about to ask for would come after the stamps.
fn settled<W: Watcher>(
    shared: &Shared,
    resolver: &Resolver<W>,
    set: usize,
    backlog_empty: bool,
) -> bool {
    let slots = shared.set_targets[set].len();
    resolver.settled()
        && !shared.scanning.load(Ordering::SeqCst)
        && backlog_empty
        && shared.jobs().is_empty()
        && shared.mirror_inflight[set].load(Ordering::SeqCst) == 0
        && (0..slots).all(|slot| shared.tracker().pending_for(set, slot) == 0)
        && !shared.queue(set).resync_pending()
        && (shared.capture_stats)().refused == 0
}

/// Checkpoints of every set while the agent runs.
pub struct Checkpoints {
    sets: Vec<Checkpoint>,
    files: Vec<PathBuf>,
    roots: Vec<PathBuf>,
    /// `stamp_margin_s` is not 0.
    enabled: bool,
    done_tx: mpsc::UnboundedSender<usize>,
    /// Sets whose checkpoint finished writing.
    pub done: mpsc::UnboundedReceiver<usize>,
}

impl Checkpoints {
    pub fn new(config: &Config) -> Checkpoints {
        let (done_tx, done) = mpsc::unbounded_channel();
        let margin = config.stamp_margin.unwrap_or_default();
        Checkpoints {
            sets: config
                .sets
                .iter()
                .map(|_| Checkpoint::new(Instant::now(), margin))
                .collect(),
            files: config
                .sets
                .iter()
                .map(|s| Stamps::file(&config.state_dir, &s.name))
                .collect(),
            roots: config.sets.iter().map(|s| s.root.clone()).collect(),
            enabled: config.stamp_margin.is_some(),
            done_tx,
            done,
        }
    }

    /// Asks for the checkpoints that are due (called on a timer).
    pub fn ask_due(&mut self, shared: &Shared) {
        if !self.enabled || shared.scanning.load(Ordering::SeqCst) {
            return;
        }
        let now = Instant::now();
        for (set, c) in self.sets.iter_mut().enumerate() {
            if c.wanted(now, shared.queue(set).last_seq()) {
                c.ask(monotonic_ns(), SystemTime::now());
            }
        }
    }

    /// The capture handed over everything before `complete_before` and it is resolved
    /// and queued: takes the checkpoints asked before then, in the background.
    pub fn take_ready<W: Watcher>(
        &mut self,
        complete_before: u64,
        shared: &Shared,
        resolver: &Resolver<W>,
        backlog_empty: bool,
    ) {
        for set in 0..self.sets.len() {
            let ready = self.sets[set].ready(complete_before, || {
                settled(shared, resolver, set, backlog_empty)
            });
            let Some(cutoff) = ready else { continue };
            let done = self.done_tx.clone();
            let seq = self.start(shared, resolver, set, cutoff, move || {
                let _ = done.send(set);
            });
            self.sets[set].began(Instant::now(), seq);
        }
    }

    pub fn written(&mut self, set: usize) {
        self.sets[set].writing = false;
    }

    /// At a clean stop, once every change captured before the stop (at `wall`) is
    /// queued: the checkpoint of every settled set, written before returning.
    pub async fn at_stop<W: Watcher>(
        &mut self,
        shared: &Shared,
        resolver: &Resolver<W>,
        backlog_empty: bool,
        wall: SystemTime,
    ) {
        if !self.enabled {
            return;
        }
        let mut written = Vec::new();
        for set in 0..self.sets.len() {
            if !settled(shared, resolver, set, backlog_empty) {
                info!(set = %shared.set_names[set], "not stamping at stop: work was pending, so the next start compares every file");
                continue;
            }
            let (tx, rx) = tokio::sync::oneshot::channel();
            let cutoff = self.sets[set].cutoff(wall);
            self.start(shared, resolver, set, cutoff, move || {
                let _ = tx.send(());
            });
            written.push(rx);
        }
        for w in written {
            let _ = w.await;
        }
    }

    /// Starts writing the stamps of `set` in the background at the queue's present
    /// sequence (returned), for files whose ctime is before `cutoff`; `then` runs once
    /// they are written (or failed to be).
    fn start<W: Watcher>(
        &self,
        shared: &Shared,
        resolver: &Resolver<W>,
        set: usize,
        cutoff: SystemTime,
        then: impl FnOnce() + Send + 'static,
    ) -> u64 {
        let (epoch, seq) = {
            let q = shared.queue(set);
            (q.epoch, q.last_seq())
        };
        let paths = resolver.stamp_candidates(set);
        let (file, root) = (self.files[set].clone(), self.roots[set].clone());
        let name = shared.set_names[set].clone();
        tokio::task::spawn_blocking(move || {
            write(&name, &file, &root, epoch, seq, &paths, cutoff);
            then();
        });
        seq
    }
}

fn write(
    name: &str,
    file: &std::path::Path,
    root: &std::path::Path,
    epoch: u64,
    seq: u64,
    paths: &stamps::PathList,
    cutoff: SystemTime,
) {
    let started = Instant::now();
    let taken = stamps::take(root, paths, cutoff);
    match Stamps::store(file, root, epoch, seq, &taken) {
        Ok(()) => info!(
            set = %name,
            stamped = taken.len(),
            entries = paths.len(),
            seq,
            took_ms = started.elapsed().as_millis() as u64,
            "stamps taken: a restart compares only what changes from now on"
        ),
        Err(e) => {
            warn!(set = %name, error = %format!("{e:#}"), "cannot write stamps: the next start compares every file")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_vouches_only_for_a_replica_at_or_past_the_stamps() {
        let stamps = Stamps::new(7, 100, Vec::new());
        let said = |prior: Vec<(usize, u64, u64)>, empty: Vec<usize>| FirstWelcome { empty, prior };
        // A new epoch (9): the replica must have reached 100 in epoch 7.
        assert!(vouches(&said(vec![(0, 7, 100)], vec![]), 0, &stamps, 9));
        assert!(vouches(&said(vec![(0, 7, 250)], vec![]), 0, &stamps, 9));
        assert!(
            !vouches(&said(vec![(0, 7, 99)], vec![]), 0, &stamps, 9),
            "behind"
        );
        assert!(
            !vouches(&said(vec![(0, 6, 500)], vec![]), 0, &stamps, 9),
            "another epoch"
        );
        assert!(
            !vouches(&said(vec![(1, 7, 100)], vec![]), 0, &stamps, 9),
            "another set"
        );
        assert!(
            !vouches(&said(vec![], vec![]), 0, &stamps, 9),
            "nothing said"
        );
        // The journal resumed epoch 7: the sequence continues.
        assert!(vouches(&said(vec![], vec![]), 0, &stamps, 7));
        // A replica that holds nothing never vouches.
        assert!(!vouches(&said(vec![(0, 7, 100)], vec![0]), 0, &stamps, 9));
        assert!(!vouches(&said(vec![], vec![0]), 0, &stamps, 7));
    }
}
