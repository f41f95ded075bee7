//! `cargo xtask bench [NAME...] --json FILE`: measured figures, baselines in the same
//! run, medians of several runs, a table on stdout and a flat JSON object in FILE.
//!
//! Benchmarks:
//! - `capture`: `syscall_tax_pct`, `per_write_hook_floor_pct`,
//!   `unwatched_write_over_floor_pct`, `watched_write_cpu_tax_ns`,
//!   `watched_write_tax_over_floor_ratio` — what capture costs other processes and
//!   writers, in thread CPU time, against no agent and against an empty per-write
//!   program in the same run (see `capture.rs`).
//! - `lag`: `lag_p50_ms`, `lag_p99_ms` — a 4 KiB pwrite on the source until the same
//!   bytes are readable on the target, 1,000 writes/s for 20 s over loopback.
//! - `throughput`: `throughput_mb_s`, `quic_baseline_mb_s`, `throughput_ratio_vs_quic` —
//!   2 GiB of 1 MiB sequential writes replicated end to end (until the replica holds
//!   every byte), against a plain quinn bulk transfer of the same bytes (quinn's default
//!   transport settings, doppel's mutual TLS), on loopback in the same run. Also against
//!   quinn with doppel's own transport settings (64 KiB datagrams on loopback, wide
//!   windows), which no file IO slows: `quic_tuned_baseline_mb_s`,
//!   `throughput_ratio_vs_tuned_quic`.
//! - `journal`: `journal_write_amplification` — bytes the agent wrote to its journal
//!   per byte of file data replicated, store-and-forward mode, 128 MiB in 64 KiB writes
//!   (read from the agent's status line).
//! - `rss`: `agent_rss_mib_storm` — the agent's peak RSS (VmHWM) after a write storm with
//!   the default queue settings.
//! - `slowdown`: `watched_write_slowdown_pct`, `unwatched_write_slowdown_pct` — a
//!   4 KiB write(2) loop's throughput with the agent running versus no agent (median
//!   of 3 each, interleaved), in a watched and in an unwatched directory.
//! - `events`: `capture_events_per_s` — the highest rate of 4 KiB pwrites into 16
//!   watched files that the agent takes in with no record missing the ring (each
//!   write's bytes copied at write time): rates are stepped up, 3 s each, until the ring
//!   overflows (`missed_ranges` or `lost` grow) or the writer cannot go faster. The
//!   floor in the same run, `writer_4k_writes_per_s_no_agent`: what one thread writes
//!   with no agent at all; `writer_4k_writes_per_s_agent`: with the agent, unpaced.
//! - `mirror`, `resync`: the mirror against rsync (see `mirror.rs`).
//! - `failover`: failover RTO and RPO, manual and automatic, against keepalived (see
//!   `failover.rs`).
//! - `scale`: a server-sized tree (a million files by default) mirrored against rsync,
//!   and the agent's memory (see `scale.rs`).
//!
//! On virtual machines that report freed memory to the hypervisor, that reporting is
//! off while benchmarks run (`host.rs`): it made runs that write much page cache vary by
//! up to 2x.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use doppel_tests::cluster::Cluster;

mod capture;
mod failover;
mod host;
mod mirror;
mod scale;

type Figures = BTreeMap<String, f64>;

const ALL: &[&str] = &[
    "capture",
    "lag",
    "throughput",
    "journal",
    "rss",
    "slowdown",
    "events",
    "mirror",
    "resync",
    "failover",
    "scale",
];

pub fn run(names: &[String], json: &Path) -> Result<()> {
    if unsafe { libc::geteuid() } != 0 {
        bail!("benchmarks load eBPF programs: run `cargo xtask bench` as root");
    }
    crate::setup::ensure()?;
    crate::compile::release()?;
    std::env::set_var("DOPPEL_BIN_DIR", crate::compile::bin_dir());
    let names: Vec<&str> = if names.is_empty() {
        ALL.to_vec()
    } else {
        names.iter().map(String::as_str).collect()
    };
    let mut figures = Figures::new();
    let _still = host::NoPageReporting::new();
    for n in &names {
        eprintln!("bench: running {n} ...");
        match *n {
            "capture" => capture::capture(&mut figures)?,
            "lag" => lag(&mut figures)?,
            "slowdown" => slowdown(&mut figures)?,
            "throughput" => throughput(&mut figures)?,
            "rss" => rss(&mut figures)?,
            "journal" => journal(&mut figures)?,
            "events" => events(&mut figures)?,
            "mirror" => mirror::mirror(&mut figures)?,
            "resync" => mirror::resync(&mut figures)?,
            "failover" => failover::failover(&mut figures)?,
            "scale" => scale::scale(&mut figures)?,
            other => bail!("unknown benchmark {other:?}; known: {}", ALL.join(", ")),
        }
    }
    println!("\n{:<34} {:>12}  goal", "figure", "value");
    for (k, v) in &figures {
        println!("{k:<34} {v:>12.3}  {}", goal(k));
    }
    let obj: serde_json::Map<String, serde_json::Value> = figures
        .iter()
        .map(|(k, v)| (k.clone(), serde_json::json!(v)))
        .collect();
    std::fs::write(json, serde_json::to_string_pretty(&obj)? + "\n")
        .with_context(|| format!("cannot write {}", json.display()))?;
    println!("\nwrote {}", json.display());
    Ok(())
}

fn goal(name: &str) -> &'static str {
    match name {
        "syscall_tax_pct" => "<= 2",
        "unwatched_write_over_floor_pct" => "<= 2",
        "watched_write_tax_over_floor_ratio" => "<= 5",
        "lag_p50_ms" => "<= 1",
        "lag_p99_ms" => "<= 5",
        "watched_write_slowdown_pct" => "<= 15",
        "unwatched_write_slowdown_pct" => "<= 2",
        "throughput_ratio_vs_quic" => ">= 0.7",
        "journal_write_amplification" => "<= 1.1",
        "agent_rss_beyond_queue_mib" => "<= 64",
        "mirror_empty_time_ratio_vs_rsync" => "<= 1.0",
        "resync_wire_bytes_ratio_vs_rsync" => "<= 1.0",
        "resync_time_ratio_vs_rsync" => "<= 1.0",
        "failover_rto_ms_p50" => "<= 1000",
        "auto_failover_rto_ms_p50" => "<= 2000",
        "auto_failover_rto_ratio_vs_keepalived" => "<= 1.0",
        "scale_mirror_time_ratio_vs_rsync" => "<= 1.0",
        "scale_agent_rss_mib" => "<= 300",
        "scale_restart_bytes_read_ratio" => "<= 0.03",
        "scale_verify_time_ratio_vs_rsync_checksum" => "<= 1.0",
        "scale_idle_agent_cpu_pct" => "<= 0.5",
        _ => "",
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    percentile(&v, 0.5)
}

/// 1,000 pwrites/s of 4 KiB into 1,024 slots of one file; a reader on the replica
/// notes when each write's bytes become visible.
fn lag(figures: &mut Figures) -> Result<()> {
    const SLOTS: u64 = 1024;
    const RATE: u64 = 1000;
    const SECONDS: u64 = 20;
    let mut c = Cluster::new("bench")?;
    let src_path = c.source.join("lag.bin");
    let f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .read(true)
        .write(true)
        .open(&src_path)?;
    f.set_len(SLOTS * 4096)?;
    c.start()?;
    let replica = c.replica.join("lag.bin");
    // Wait for the initial copy.
    let t = Instant::now();
    while std::fs::metadata(&replica).map(|m| m.len()).unwrap_or(0) != SLOTS * 4096 {
        if t.elapsed() > Duration::from_secs(10) {
            bail!("the replica of lag.bin did not appear:\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let total = RATE * SECONDS;
    let written: Arc<Vec<AtomicU64>> = Arc::new((0..total).map(|_| AtomicU64::new(0)).collect());
    let epoch = Instant::now();
    let reader = {
        let written = written.clone();
        std::thread::spawn(move || -> Result<Vec<f64>> {
            let r = std::fs::File::open(&replica)?;
            let mut lags = Vec::with_capacity(total as usize);
            let mut buf = [0u8; 8];
            let mut i = 0u64;
            let give_up = Instant::now() + Duration::from_secs(SECONDS + 30);
            while i < total {
                let w = written[i as usize].load(Ordering::Acquire);
                if w == 0 {
                    std::thread::sleep(Duration::from_micros(20));
                    continue;
                }
                r.read_exact_at(&mut buf, (i % SLOTS) * 4096)?;
                let v = u64::from_le_bytes(buf);
                // Write i stores i + 1 (a zeroed slot never matches); a later write to
                // the same slot also proves write i arrived (apply is in order).
                if v > i && (v - (i + 1)).is_multiple_of(SLOTS) {
                    let now = epoch.elapsed().as_nanos() as u64;
                    lags.push((now.saturating_sub(w)) as f64 / 1e6);
                    i += 1;
                    continue;
                }
                if Instant::now() > give_up {
                    bail!("write {i} never became visible on the replica");
                }
                std::thread::sleep(Duration::from_micros(20));
            }
            Ok(lags)
        })
    };
    let mut block = vec![0u8; 4096];
    for i in 0..total {
        let due = Duration::from_micros(i * 1_000_000 / RATE);
        let now = epoch.elapsed();
        if due > now {
            std::thread::sleep(due - now);
        }
        block[..8].copy_from_slice(&(i + 1).to_le_bytes());
        block[4088..].copy_from_slice(&(i + 1).to_le_bytes());
        let t = epoch.elapsed().as_nanos() as u64;
        f.write_all_at(&block, (i % SLOTS) * 4096)?;
        written[i as usize].store(t.max(1), Ordering::Release);
    }
    let mut lags = reader
        .join()
        .map_err(|_| anyhow::anyhow!("reader panicked"))??;
    lags.sort_by(|a, b| a.total_cmp(b));
    figures.insert("lag_p50_ms".into(), percentile(&lags, 0.5));
    figures.insert("lag_p99_ms".into(), percentile(&lags, 0.99));
    figures.insert("lag_max_ms".into(), percentile(&lags, 1.0));
    Ok(())
}

/// Writes per second of a 4 KiB write(2) loop over a 16 MiB file for about a second.
fn write_loop(dir: &Path) -> Result<f64> {
    const WRITES: u64 = 100_000;
    let path = dir.join("loop.bin");
    let mut f = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    let block = vec![0x5au8; 4096];
    let t = Instant::now();
    for i in 0..WRITES {
        if i % 4096 == 0 {
            f.seek(SeekFrom::Start(0))?;
        }
        f.write_all(&block)?;
    }
    let rate = WRITES as f64 / t.elapsed().as_secs_f64();
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(rate)
}

fn slowdown(figures: &mut Figures) -> Result<()> {
    let mut c = Cluster::new("bench")?;
    let unwatched = c.dir.path().join("unwatched");
    std::fs::create_dir_all(&unwatched)?;
    c.start_receiver()?;
    let (mut base_w, mut base_u, mut agent_w, mut agent_u) = (vec![], vec![], vec![], vec![]);
    for round in 0..3 {
        base_w.push(write_loop(&c.source)?);
        base_u.push(write_loop(&unwatched)?);
        c.start_agent()?;
        // Let the agent's initial activity settle.
        std::thread::sleep(Duration::from_millis(300));
        // Unwatched first: after the watched loop, the agent and the receiver spend
        // seconds replicating its 400 MB, on the same two cores as the writer, and an
        // unwatched loop run then measures that work instead of the filter's cost.
        agent_u.push(write_loop(&unwatched)?);
        agent_w.push(write_loop(&c.source)?);
        // The replica must have received the watched loop's writes.
        doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(30))
            .map_err(|d| anyhow::anyhow!("replica did not converge in round {round}: {d:?}"))?;
        c.kill_agent();
        eprintln!(
            "bench: round {round}: watched {:.0}/s vs {:.0}/s, unwatched {:.0}/s vs {:.0}/s (agent vs none)",
            agent_w[round], base_w[round], agent_u[round], base_u[round]
        );
    }
    let (bw, bu, aw, au) = (
        median(base_w),
        median(base_u),
        median(agent_w),
        median(agent_u),
    );
    figures.insert("write_loop_baseline_per_s".into(), bw);
    figures.insert("write_loop_watched_per_s".into(), aw);
    figures.insert("watched_write_slowdown_pct".into(), (1.0 - aw / bw) * 100.0);
    figures.insert(
        "unwatched_write_slowdown_pct".into(),
        (1.0 - au / bu) * 100.0,
    );
    Ok(())
}

const THROUGHPUT_BYTES: u64 = 2 << 30;

/// The baseline's server: accepts one connection from the pinned client, reads one
/// stream to its end, prints the byte count. Runs as its own process (`xtask
/// bench-sink`), as doppel-receiver does, so both sides of both measurements get a
/// process and a runtime of their own.
pub fn sink(keys: &Path, client_fp: &str, quinn_defaults: bool) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(async {
        let id = doppel_transport::Identity::load(&keys.join("cert.pem"), &keys.join("key.pem"))?;
        let ep = doppel_transport::server_endpoint_tuned(
            "127.0.0.1:0".parse()?,
            &id,
            vec![client_fp.to_string()],
            tuning(quinn_defaults),
        )?;
        println!("listening {}", ep.local_addr()?.port());
        let conn = ep.accept().await.context("no connection")?.await?;
        let mut r = conn.accept_uni().await?;
        let mut n = 0u64;
        while let Some(c) = r.read_chunk(1 << 20, true).await? {
            n += c.bytes.len() as u64;
        }
        println!("received {n}");
        conn.close(0u32.into(), b"done");
        ep.wait_idle().await;
        Ok(())
    })
}

fn tuning(quinn_defaults: bool) -> doppel_transport::Tuning {
    if quinn_defaults {
        doppel_transport::Tuning::QuinnDefaults
    } else {
        doppel_transport::Tuning::Doppel
    }
}

/// Plain quinn: one stream, `bytes` written in 1 MiB pieces to a sink process that
/// reads and drops them, with doppel's TLS configuration and either quinn's default
/// transport settings or doppel's.
fn quic_baseline(bytes: u64, quinn_defaults: bool) -> Result<f64> {
    use std::io::BufRead;
    let dir = tempfile::tempdir()?;
    let keys = |name: &str| -> Result<doppel_transport::Identity> {
        let d = dir.path().join(name);
        doppel_transport::keygen(&d, name)?;
        doppel_transport::Identity::load(&d.join("cert.pem"), &d.join("key.pem"))
    };
    let (server, client) = (keys("server")?, keys("client")?);
    let mut child = std::process::Command::new(std::env::current_exe()?)
        .arg("bench-sink")
        .arg(dir.path().join("server"))
        .arg(client.fingerprint())
        .args(quinn_defaults.then_some("--quinn-defaults"))
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let mut out = std::io::BufReader::new(child.stdout.take().context("sink stdout")?);
    let mut line = String::new();
    out.read_line(&mut line)?;
    let port: u16 = line
        .trim()
        .strip_prefix("listening ")
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("bench sink said {line:?}"))?;
    let rt = tokio::runtime::Runtime::new()?;
    let secs = rt.block_on(async {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
        let conn = doppel_transport::connect_tuned(
            &client,
            addr,
            &server.fingerprint(),
            tuning(quinn_defaults),
        )
        .await?;
        let buf = bytes::Bytes::from(vec![0x5au8; 1 << 20]);
        let t = Instant::now();
        let mut s = conn.open_uni().await?;
        let mut sent = 0;
        while sent < bytes {
            s.write_chunk(buf.clone()).await?;
            sent += buf.len() as u64;
        }
        s.finish()?;
        // The sink closes the connection once it has read everything.
        conn.closed().await;
        anyhow::Ok(t.elapsed().as_secs_f64())
    })?;
    line.clear();
    out.read_line(&mut line)?;
    child.wait()?;
    anyhow::ensure!(
        line.trim() == format!("received {bytes}"),
        "baseline sink: {line:?}, expected {bytes} bytes"
    );
    Ok(bytes as f64 / secs / 1e6)
}

/// doppel end to end: 1 MiB sequential writes into one file until `bytes`, timed until
/// the replica holds all of them (then checked byte for byte, untimed).
fn replicate_bulk(bytes: u64) -> Result<f64> {
    let mut c = Cluster::new("bench")?;
    c.start()?;
    let src = c.source.join("bulk.bin");
    let dst = c.replica.join("bulk.bin");
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&src)?;
    let mut block = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut written = 0u64;
    while written < bytes {
        block[..8].copy_from_slice(&written.to_le_bytes());
        f.write_all(&block)?;
        written += block.len() as u64;
    }
    drop(f);
    let (src_size, src_hash) = doppel_tests::tree::hash_file(&src)?;
    loop {
        if std::fs::metadata(&dst).map(|m| m.len()).unwrap_or(0) == src_size {
            // The size is right; the bytes may still be landing: compare.
            let secs = t.elapsed().as_secs_f64();
            if doppel_tests::tree::hash_file(&dst)?.1 == src_hash {
                return Ok(bytes as f64 / secs / 1e6);
            }
        }
        if t.elapsed() > Duration::from_secs(300) {
            bail!(
                "the replica did not receive {bytes} bytes within 300 s:\n{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Source and replica live on tmpfs for the headline figure: on one machine they would
/// otherwise share one disk (4 GiB written and fsynced for 2 GiB replicated), while the
/// quinn baseline touches no disk at all. The same run on disk is reported beside it.
fn throughput(figures: &mut Figures) -> Result<()> {
    let (mut doppel, mut quic, mut disk) = (Vec::new(), Vec::new(), Vec::new());
    let mut tuned = Vec::new();
    let old_tmp = std::env::var_os("TMPDIR");
    for round in 0..3 {
        quic.push(quic_baseline(THROUGHPUT_BYTES, true)?);
        tuned.push(quic_baseline(THROUGHPUT_BYTES, false)?);
        std::env::set_var("TMPDIR", "/dev/shm");
        let on_tmpfs = replicate_bulk(THROUGHPUT_BYTES);
        match &old_tmp {
            Some(t) => std::env::set_var("TMPDIR", t),
            None => std::env::remove_var("TMPDIR"),
        }
        doppel.push(on_tmpfs?);
        disk.push(replicate_bulk(THROUGHPUT_BYTES)?);
        eprintln!(
            "bench: round {round}: doppel {:.0} MB/s (tmpfs), {:.0} MB/s (disk); plain quinn {:.0} MB/s, with doppel's settings {:.0} MB/s",
            doppel[round], disk[round], quic[round], tuned[round]
        );
    }
    let (d, q, t) = (median(doppel), median(quic), median(tuned));
    figures.insert("quic_tuned_baseline_mb_s".into(), t);
    figures.insert("throughput_ratio_vs_tuned_quic".into(), d / t);
    figures.insert("throughput_mb_s".into(), d);
    figures.insert("throughput_disk_mb_s".into(), median(disk));
    figures.insert("quic_baseline_mb_s".into(), q);
    figures.insert("throughput_ratio_vs_quic".into(), d / q);
    Ok(())
}

/// Peak RSS of the agent after a storm of random writes over 200 files plus 512 MiB of
/// large writes, with default queue settings: the median of three runs.
fn rss(figures: &mut Figures) -> Result<()> {
    let mut peaks = Vec::new();
    for round in 0..3 {
        let mib = rss_storm()?;
        eprintln!("bench: round {round}: agent peak RSS {mib:.1} MiB");
        peaks.push(mib);
    }
    let mib = median(peaks);
    figures.insert("agent_rss_mib_storm".into(), mib);
    // The default memory queue bound (64 MiB) is what the goal allows on top.
    figures.insert("agent_rss_beyond_queue_mib".into(), mib - 64.0);
    Ok(())
}

/// The error for a replica that did not converge: the first differences and the logs.
fn diverged(c: &Cluster, differences: &[String]) -> anyhow::Error {
    anyhow::anyhow!(
        "replica did not converge: {:?}\n{}",
        &differences[..differences.len().min(5)],
        c.logs()
    )
}

/// One storm; the agent's peak RSS in MiB (VmHWM).
fn rss_storm() -> Result<f64> {
    let mut c = Cluster::new("bench")?;
    c.start()?;
    doppel_tests::writer::run(&c.source, 200, 20_000, 7)?;
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(c.source.join("big.bin"))?;
    let block = vec![0x33u8; 1 << 20];
    for _ in 0..512 {
        f.write_all(&block)?;
    }
    drop(f);
    doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(120))
        .map_err(|d| diverged(&c, &d))?;
    peak_rss_mib(c.agent_pid().context("agent not running")?)
}

/// Peak RSS (VmHWM) of process `pid`, MiB.
fn peak_rss_mib(pid: u32) -> Result<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("no VmHWM in /proc/PID/status")?;
    Ok(kib / 1024.0)
}

/// Bytes per write of the events bench.
const EVENT_WRITE: usize = 4096;

/// `rate` pwrites/s of 4 KiB spread over `files`, for `secs` (`rate` infinite: as fast
/// as one thread can); returns the rate achieved.
fn paced_writes(files: &[std::fs::File], rate: f64, secs: f64) -> Result<f64> {
    let buf = [0x42u8; EVENT_WRITE];
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= secs {
            return Ok(n as f64 / elapsed);
        }
        // Catch up with the schedule in bursts; sleep when ahead of it.
        let due = if rate.is_finite() {
            (elapsed * rate) as u64
        } else {
            n + 1000
        };
        if n >= due {
            std::thread::sleep(Duration::from_micros(200));
            continue;
        }
        for _ in 0..(due - n).min(1000) {
            let f = &files[(n % files.len() as u64) as usize];
            // 256 blocks per file: page-cache writes, rewritten in place.
            let block = n / files.len() as u64 % 256;
            f.write_all_at(&buf, block * EVENT_WRITE as u64)?;
            n += 1;
        }
    }
}

/// The 16 files of the events bench, in `dir`.
fn event_files(dir: &std::path::Path) -> Result<Vec<std::fs::File>> {
    (0..16)
        .map(|i| {
            OpenOptions::new()
                .create(true)
                .truncate(true)
                .write(true)
                .open(dir.join(format!("ev{i:02}.bin")))
                .map_err(Into::into)
        })
        .collect()
}

fn events(figures: &mut Figures) -> Result<()> {
    let mut c = Cluster::new("bench")?;
    // The floor, in the same run: how many 4 KiB writes per second one thread makes
    // here with no agent at all (median of 3).
    let floor_dir = c.dir.path().join("floor");
    std::fs::create_dir_all(&floor_dir)?;
    let floor_files = event_files(&floor_dir)?;
    let floor = median(
        (0..3)
            .map(|_| paced_writes(&floor_files, f64::INFINITY, 2.0))
            .collect::<Result<Vec<_>>>()?,
    );
    drop(floor_files);
    eprintln!("bench: events: one thread writes {floor:.0} 4 KiB writes/s with no agent");
    c.start()?;
    let files = event_files(&c.source)?;
    // Status lines come every 5 s: wait for one after each step.
    let counters = |c: &Cluster| {
        (
            status_field(c, "missed_ranges").unwrap_or(0.0),
            status_field(c, "lost").unwrap_or(0.0),
        )
    };
    std::thread::sleep(Duration::from_millis(5_500));
    let mut best = 0.0f64;
    let mut top = 0.0f64;
    for rate in [
        50_000.0,
        100_000.0,
        200_000.0,
        400_000.0,
        800_000.0,
        1_600_000.0,
        f64::INFINITY,
    ] {
        let before = counters(&c);
        let achieved = paced_writes(&files, rate, 3.0)?;
        std::thread::sleep(Duration::from_millis(5_500));
        let after = counters(&c);
        let overflowed = after.0 > before.0 || after.1 > before.1;
        eprintln!(
            "bench: events: asked {rate:.0}/s, wrote {achieved:.0}/s, {}",
            if overflowed {
                "ring overflowed"
            } else {
                "no overflow"
            }
        );
        top = top.max(achieved);
        if overflowed {
            break;
        }
        best = best.max(achieved);
        if achieved < rate * 0.9 {
            break; // the writer is the limit
        }
    }
    doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(120))
        .map_err(|d| diverged(&c, &d))?;
    figures.insert("capture_events_per_s".into(), best);
    figures.insert("writer_4k_writes_per_s_no_agent".into(), floor);
    figures.insert("writer_4k_writes_per_s_agent".into(), top);
    figures.insert("capture_events_over_writer_floor".into(), best / floor);
    Ok(())
}

/// The last value of `key=` in the agent's status lines.
fn status_field(c: &Cluster, key: &str) -> Option<f64> {
    let needle = format!("{key}=");
    c.log_lines("agent.log", " status ")
        .iter()
        .rev()
        .find_map(|l| {
            let rest = &l[l.find(&needle)? + needle.len()..];
            rest.split_whitespace().next()?.parse().ok()
        })
}

fn journal(figures: &mut Figures) -> Result<()> {
    let mut c = Cluster::with_agent_extra("bench", "queue = \"store-and-forward\"")?;
    c.start()?;
    let mut f = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(c.source.join("j.bin"))?;
    let mut block = vec![0u8; 64 << 10];
    for i in 0..2048u64 {
        block[..8].copy_from_slice(&i.to_le_bytes());
        f.write_all(&block)?;
    }
    drop(f);
    doppel_tests::tree::wait_equal(&c.source, &c.replica, Duration::from_secs(120))
        .map_err(|d| diverged(&c, &d))?;
    // Status lines come every 5 s; wait for one written after convergence.
    let before = c.log_lines("agent.log", " status ").len();
    let t = Instant::now();
    while c.log_lines("agent.log", " status ").len() == before {
        if t.elapsed() > Duration::from_secs(15) {
            bail!("no agent status line:\n{}", c.logs());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let written =
        status_field(&c, "journal_written_bytes").context("journal_written_bytes in status")?;
    let pushed = status_field(&c, "pushed_bytes").context("pushed_bytes in status")?;
    anyhow::ensure!(
        pushed > 0.0,
        "no data went through the queue:\n{}",
        c.logs()
    );
    figures.insert("journal_written_mib".into(), written / (1u64 << 20) as f64);
    figures.insert("journal_write_amplification".into(), written / pushed);
    Ok(())
}
