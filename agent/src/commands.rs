//! The commands that talk to the running daemon through its control socket: how they
//! show what it answers (a table or progress bar on a terminal, plain lines or JSON
//! otherwise).

use std::io::IsTerminal;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use doppel_agent::control::{call, Reply, Request, State, Status};
use doppel_agent::verify::{Progress, Report};
use indicatif::{ProgressBar, ProgressStyle};

/// How often progress is printed when stderr is not a terminal.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

/// `doppel-agent verify`: returns the exit status (0 identical or repaired, 1 differences).
pub fn verify(socket: &Path, set: Option<String>, json: bool, repair: bool) -> Result<u8> {
    let mut show = Shown::new(json);
    let mut report = None;
    let mut error = None;
    call(
        socket,
        &Request::Verify { set, repair },
        |reply| match reply {
            Reply::Progress(p) => show.progress(&p),
            Reply::Report(r) => report = Some(r),
            Reply::Error(e) => error = Some(e),
            Reply::Status(_) => {}
        },
    )?;
    show.done();
    if let Some(e) = error {
        bail!("{e}");
    }
    let Some(r) = report else {
        bail!("the agent ended the verify without a report; see its log");
    };
    if json {
        println!("{}", serde_json::to_string(&Reply::Report(r.clone()))?);
    } else {
        print_report(&r);
    }
    Ok(if r.findings.is_empty() || r.repaired {
        0
    } else {
        1
    })
}

fn print_report(r: &Report) {
    for f in &r.findings {
        let mut what = Vec::new();
        if f.missing {
            what.push("missing on the replica".to_string());
        }
        if f.extra {
            what.push("on the replica only (the source has no such entry)".to_string());
        }
        let bytes: u64 = f.ranges.iter().map(|r| r.1).sum();
        if !f.missing && !f.ranges.is_empty() {
            let shown: Vec<String> = f
                .ranges
                .iter()
                .take(4)
                .map(|(o, l)| format!("{o}+{l}"))
                .collect();
            let more = if f.ranges.len() > 4 { ", ..." } else { "" };
            what.push(format!(
                "{bytes} bytes differ in {} ranges ({}{more})",
                f.ranges.len(),
                shown.join(", ")
            ));
        }
        if f.attr {
            what.push("mode, owner or mtime differ".into());
        }
        println!("{}: {}/{}: {}", f.target, f.set, f.path, what.join("; "));
    }
    let verdict = match (r.findings.len(), r.repaired) {
        (0, _) => "identical".to_string(),
        (n, false) => format!("{n} differ"),
        (n, true) => format!("{n} differed and were repaired (only the differing blocks sent)"),
    };
    println!(
        "verify: {} files ({}) compared in {:.1} s: {verdict}",
        r.files,
        human_bytes(r.bytes),
        r.seconds
    );
}

/// `doppel-agent status`.
pub fn status(socket: &Path, json: bool) -> Result<()> {
    let s = fetch_status(socket)?;
    if json {
        println!("{}", serde_json::to_string(&s)?);
        return Ok(());
    }
    print!("{}", status_table(&s, SystemTime::now()));
    Ok(())
}

/// `doppel-agent status --watch`: follows the mirror (and verifies) until every change
/// is acknowledged and nothing is left to compare, then shows the table. A bar on a
/// terminal; a line every few seconds on a plain stderr; every status as a JSON line
/// with `--json`.
pub fn watch(socket: &Path, json: bool) -> Result<()> {
    let bar = terminal_bar("mirror", json);
    let mut last: Option<(Instant, u64)> = None;
    let mut printed: Option<Instant> = None;
    loop {
        let s = fetch_status(socket)?;
        let summary = state_summary(&s);
        if json {
            println!("{}", serde_json::to_string(&s)?);
        } else if let Some(b) = &bar {
            b.set_length(s.mirror_queued_bytes);
            b.set_position(s.mirror_compared_bytes);
            b.set_message(format!(
                "{}/{} files, {summary}",
                s.mirror_compared_files, s.mirror_queued_files
            ));
        } else if printed.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) || s.synced {
            let now = Instant::now();
            let rate = last.map_or(0.0, |(t, b)| {
                s.mirror_compared_bytes.saturating_sub(b) as f64
                    / now.duration_since(t).as_secs_f64().max(1e-3)
            });
            let left = s
                .mirror_queued_bytes
                .saturating_sub(s.mirror_compared_bytes);
            let eta = if rate > 0.0 {
                format!("{:.0} s", left as f64 / rate)
            } else {
                "-".into()
            };
            eprintln!(
                "mirror: {}/{} files, {} of {}, {}/s, ETA {eta}; {summary}",
                s.mirror_compared_files,
                s.mirror_queued_files,
                human_bytes(s.mirror_compared_bytes),
                human_bytes(s.mirror_queued_bytes),
                human_bytes(rate as u64)
            );
            last = Some((now, s.mirror_compared_bytes));
            printed = Some(now);
        }
        if s.synced {
            if let Some(b) = &bar {
                b.finish_and_clear();
            }
            if !json {
                print!("{}", status_table(&s, SystemTime::now()));
            }
            return Ok(());
        }
        std::thread::sleep(WATCH_EVERY);
    }
}

/// A progress bar of bytes named `what`, when stderr is a terminal and not `json`.
fn terminal_bar(what: &str, json: bool) -> Option<ProgressBar> {
    (!json && std::io::stderr().is_terminal()).then(|| {
        let b = ProgressBar::new(0);
        b.set_style(
            ProgressStyle::with_template(&format!(
                "{{spinner}} {what} [{{bar:30}}] {{bytes}}/{{total_bytes}} {{msg}} {{bytes_per_sec}} ETA {{eta}}"
            ))
            .expect("valid template")
            .progress_chars("=> "),
        );
        b
    })
}

/// How often `--watch` asks the daemon.
const WATCH_EVERY: Duration = Duration::from_millis(500);

/// "2 protected, 1 mirroring".
fn state_summary(s: &Status) -> String {
    let mut parts = Vec::new();
    for st in State::ALL {
        let n = s.sets.iter().filter(|t| t.state == st).count();
        if n > 0 {
            parts.push(format!("{n} {}", st.as_str()));
        }
    }
    parts.join(", ")
}

fn fetch_status(socket: &Path) -> Result<Status> {
    let mut status = None;
    let mut error = None;
    call(socket, &Request::Status, |reply| match reply {
        Reply::Status(s) => status = Some(s),
        Reply::Error(e) => error = Some(e),
        _ => {}
    })?;
    if let Some(e) = error {
        bail!("{e}");
    }
    status.context("the agent sent no status; see its log")
}

/// `status` for a person: one row per set and target, then what needs attention.
fn status_table(s: &Status, now: SystemTime) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "source {}: up {}, {}",
        s.source,
        humantime::format_duration(Duration::from_secs(s.uptime_seconds)),
        if s.synced {
            "all replicas in sync"
        } else {
            "replicating"
        }
    );
    let _ = writeln!(
        out,
        "{:<14} {:<14} {:<13} {:<16} {:>8} {:>10} {:>10} {:>10} {:>11} {:>8}",
        "SET", "TARGET", "STATE", "QUEUE", "LAG", "LAG DATA", "MEMORY", "JOURNAL", "RATE", "MIRROR"
    );
    for t in &s.sets {
        let queue = format!(
            "{}{}",
            t.queue.as_str(),
            if t.spilled { " (spilled)" } else { "" }
        );
        let _ = writeln!(
            out,
            "{:<14} {:<14} {:<13} {:<16} {:>8} {:>10} {:>10} {:>10} {:>11} {:>8}",
            t.set,
            t.target,
            t.state.as_str(),
            queue,
            format!("{:.1}s", t.lag_seconds),
            human_bytes(t.lag_bytes),
            human_bytes(t.memory_bytes),
            human_bytes(t.journal_bytes),
            format!("{}/s", human_bytes(t.bytes_per_sec as u64)),
            t.mirror_pending
        );
    }
    for t in s
        .sets
        .iter()
        .filter(|t| !t.reason.is_empty() && t.state != State::Mirroring)
    {
        let _ = writeln!(
            out,
            "{} -> {}: {}: {}",
            t.set,
            t.target,
            t.state.as_str(),
            t.reason
        );
    }
    for t in s.sets.iter().filter(|t| !t.crash_consistent) {
        let _ = writeln!(
            out,
            "{} -> {}: not crash-consistent: bytes read back from files (not copied as \
             they were written) are not all applied yet, so one file may be ahead of \
             another on the replica",
            t.set, t.target
        );
    }
    let mut shown = Vec::new();
    for t in &s.sets {
        let Some(e) = &t.last_error else { continue };
        if shown.contains(&&t.target) {
            continue;
        }
        shown.push(&t.target);
        let ago = now
            .duration_since(UNIX_EPOCH + Duration::from_millis(e.unix_ms))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "last error with {} ({} ago, {}; {} of {} sessions failed): {}",
            t.target,
            humantime::format_duration(Duration::from_secs(ago.as_secs())),
            e.at,
            t.failures,
            t.sessions + t.failures,
            e.message
        );
    }
    let c = &s.capture;
    if c.missed_ranges > 0 || c.lost > 0 {
        let _ = writeln!(
            out,
            "capture: {} changes re-read from files because the ring was full, {} lost",
            c.missed_ranges, c.lost
        );
    }
    if s.mirror_pending > 0 {
        let _ = writeln!(
            out,
            "mirror: {} of {} compared, {} comparisons pending",
            human_bytes(s.mirror_compared_bytes),
            human_bytes(s.mirror_queued_bytes),
            s.mirror_pending
        );
    }
    for v in &s.verifies {
        let _ = writeln!(
            out,
            "verify: {}/{} files, {} of {}",
            v.files_done,
            v.files,
            human_bytes(v.bytes_done),
            human_bytes(v.bytes)
        );
    }
    out
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}

/// Progress as the output allows: a bar on a terminal, a line every few seconds on a
/// plain stderr, JSON lines on stdout with `--json`.
struct Shown {
    json: bool,
    bar: Option<ProgressBar>,
    last_line: Option<Instant>,
}

impl Shown {
    fn new(json: bool) -> Self {
        let bar = terminal_bar("verify", json);
        Shown {
            json,
            bar,
            last_line: None,
        }
    }

    fn progress(&mut self, p: &Progress) {
        if self.json {
            if let Ok(s) = serde_json::to_string(&Reply::Progress(*p)) {
                println!("{s}");
            }
        } else if let Some(b) = &self.bar {
            b.set_length(p.bytes);
            b.set_position(p.bytes_done);
            b.set_message(format!("{}/{} files", p.files_done, p.files));
        } else if self.last_line.is_none_or(|t| t.elapsed() >= PLAIN_EVERY) {
            self.last_line = Some(Instant::now());
            eprintln!(
                "verify: {}/{} files, {}/{}",
                p.files_done,
                p.files,
                human_bytes(p.bytes_done),
                human_bytes(p.bytes)
            );
        }
    }

    fn done(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// The fanotify group alone, marking the filesystem of directory `path`, its events read
/// and dropped: `doppel-agent bench-floor --namespace-only`, what the namespace half of
/// capture inside the filesystem costs every write to that filesystem.
pub fn namespace_capture_only(path: &std::path::Path) -> anyhow::Result<impl Send> {
    let mut ns = doppel_agent::capture::fanotify::Namespace::new([path])?;
    let fd = ns.raw_fd();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let reader = std::thread::spawn(move || {
        let mut events = Vec::new();
        while !stopped.load(std::sync::atomic::Ordering::Relaxed) {
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd.
            unsafe { libc::poll(&mut pfd, 1, 100) };
            ns.read(&|_| false, &mut events);
            events.clear();
        }
    });
    /// Stops the reader (and so closes the group) when dropped.
    struct Running(
        std::sync::Arc<std::sync::atomic::AtomicBool>,
        Option<std::thread::JoinHandle<()>>,
    );
    impl Drop for Running {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
            if let Some(t) = self.1.take() {
                let _ = t.join();
            }
        }
    }
    Ok(Running(stop, Some(reader)))
}

/// The filesystem programs alone, for the filesystem of directory `path`, which is
/// marked (files made in it are captured; the records are read and dropped):
/// `doppel-agent bench-floor --filesystem-only`, what capture inside the filesystem
/// costs writers once no syscall hook is attached.
pub fn filesystem_capture_only(path: &std::path::Path) -> anyhow::Result<impl Send> {
    use doppel_agent::capture::{marks::marked_fs, Capture, CaptureOptions, SyscallCapture};
    let fs =
        marked_fs(path)?.with_context(|| format!("{} is not on ext4 or xfs", path.display()))?;
    let (capture, mut events) = Capture::start(CaptureOptions {
        mark_filesystems: vec![fs],
        set_roots: vec![path.to_path_buf()],
        syscall_capture: SyscallCapture::WhereNeeded,
        ..CaptureOptions::default()
    })?;
    if let Some(problem) = capture.filesystem_capture_problem() {
        anyhow::bail!("the filesystem programs are not attached: {problem}");
    }
    if capture.syscall_hook() {
        anyhow::bail!("the syscall hook is attached although the directory is on ext4 or xfs");
    }
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(path)?;
    capture.mark(doppel_common::event::FileId {
        dev: m.dev(),
        ino: m.ino(),
    });
    std::thread::spawn(move || while events.blocking_recv().is_some() {});
    Ok(capture)
}
