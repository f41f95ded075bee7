//! What an operator watches: `status` follows what really happens (a receiver that goes
//! away, a link too slow), and the metrics endpoints parse as Prometheus text with
//! counters equal to what was replicated.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use doppel_tests::cluster::{Cluster, Options};

/// The agent's status, as `doppel-agent status --json` gives it.
fn status(c: &Cluster) -> serde_json::Value {
    c.status().expect("the agent answers status")
}

/// The first set's row (one set, one target in these tests).
fn row(c: &Cluster) -> serde_json::Value {
    status(c)["sets"][0].clone()
}

fn f64_of(v: &serde_json::Value, key: &str) -> f64 {
    v[key].as_f64().unwrap_or_else(|| panic!("{key} in {v}"))
}

/// Polls the row until `ok` holds; panics with the last row and the logs otherwise.
fn wait_row(
    c: &Cluster,
    within: Duration,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let start = Instant::now();
    loop {
        let r = row(c);
        if ok(&r) {
            return r;
        }
        if start.elapsed() > within {
            panic!(
                "{what} not seen within {within:?}; last status row: {r}\n{}",
                c.logs()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn lag_rises_while_the_receiver_is_down_and_falls_to_zero_after_it_returns() {
    if !doppel_tests::require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    let r = wait_row(&c, Duration::from_secs(5), "protected", |r| {
        r["state"] == "protected"
    });
    assert_eq!(r["queue"], "hybrid", "the default queue mode: {r}");
    assert_eq!(f64_of(&r, "lag_seconds"), 0.0, "{r}");
    assert!(r["last_error"].is_null(), "{r}");

    c.kill_receiver();
    let down = Instant::now();
    let mut samples = Vec::new();
    for i in 0..30 {
        std::fs::write(c.source.join(format!("f{i}")), vec![i as u8; 4096]).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        let r = row(&c);
        samples.push((down.elapsed(), f64_of(&r, "lag_seconds")));
    }
    let r = wait_row(&c, Duration::from_secs(10), "disconnected", |r| {
        r["state"] == "disconnected"
    });
    assert_eq!(r["connected"], false, "{r}");
    assert!(r["lag_records"].as_u64().unwrap() >= 30, "{r}");
    // The oldest unacknowledged change is the first file, written ~3 s ago; the lag is
    // never less than the truth and at most a stamp's step (50 ms) more.
    let (t_last, lag_last) = *samples.last().unwrap();
    assert!(
        lag_last >= 2.7 && lag_last <= t_last.as_secs_f64() + 0.1,
        "{samples:?}"
    );
    let (_, lag_mid) = samples[15];
    assert!(lag_last - lag_mid >= 1.2, "lag keeps rising: {samples:?}");
    let err = &r["last_error"];
    assert!(
        err["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{r}"
    );
    assert!(err["at"].as_str().is_some_and(|t| t.ends_with('Z')), "{r}");

    // The table says the same, with the error and how long ago it was.
    let o = c.agent_command(&["status"]);
    let table = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success(), "{table}");
    assert!(
        table.contains("disconnected") && table.contains("last error with t ("),
        "{table}"
    );

    c.start_receiver().unwrap();
    let back = Instant::now();
    let r = wait_row(&c, Duration::from_secs(30), "lag back to zero", |r| {
        r["state"] == "protected" && r["lag_records"] == 0 && f64_of(r, "lag_seconds") == 0.0
    });
    assert_eq!(r["connected"], true, "{r}");
    eprintln!("caught up {:?} after the receiver returned", back.elapsed());
    c.assert_identical(Duration::from_secs(10));
}

#[test]
fn a_link_too_slow_shows_the_set_degraded_with_why_then_protected() {
    if !doppel_tests::require_root() {
        return;
    }
    let mut c = Cluster::with_options(
        "data",
        Options {
            agent_extra: "degraded_lag_s = 1".into(),
            agent_target_extra: "bandwidth_limit = 400000".into(),
            ..Options::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    // Batches are up to 1 MiB: the first goes at once, each next one waits for the
    // limit (400 kB/s), ~5 s in all. Incompressible, so the limit holds.
    let data = noise(2_500_000, 1);
    std::fs::write(c.source.join("big"), &data).unwrap();
    let r = wait_row(&c, Duration::from_secs(10), "degraded", |r| {
        r["state"] == "degraded"
    });
    assert!(
        r["reason"].as_str().unwrap().contains("degraded_lag_s = 1"),
        "{r}"
    );
    assert_eq!(r["connected"], true, "{r}");
    let r = wait_row(&c, Duration::from_secs(30), "protected again", |r| {
        r["state"] == "protected"
    });
    // Over the last 10 s (or since the start, if younger), which hold the whole
    // transfer: at most the limit plus the first batch (1 MiB) sent ahead of it over the
    // ~5 s it took, at least 2.5 MB over 10 s.
    let rate = f64_of(&r, "bytes_per_sec");
    assert!(
        (200_000.0..=650_000.0).contains(&rate),
        "the rate shown ({rate}) is not what the link allowed: {r}"
    );
    c.assert_identical(Duration::from_secs(10));
}

/// `len` bytes that zstd cannot shrink (xorshift64*).
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E3779B97F4A7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545F4914F6CDD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

/// A TCP port on loopback that was free a moment ago.
fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap()
}

/// GET /metrics: (content type, body).
fn scrape(port: u16) -> (String, String) {
    let mut s =
        std::net::TcpStream::connect(("127.0.0.1", port)).expect("the metrics endpoint listens");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let ctype = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-type: ")
                .map(str::to_string)
        })
        .unwrap_or_default();
    (ctype, body.to_string())
}

/// Parses exposition text with the Prometheus project's Python client: strictly as
/// OpenMetrics, and with its Prometheus text-format parser. Returns each sample's
/// value by `name{k="v",...}` (labels sorted).
fn parse(text: &str) -> HashMap<String, f64> {
    const SCRIPT: &str = r##"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om
from prometheus_client.parser import text_string_to_metric_families as prom
text = sys.stdin.read()
out = {}
for fam in om(text):
    for s in fam.samples:
        labels = ",".join('%s="%s"' % (k, v) for k, v in sorted(s.labels.items()))
        out["%s{%s}" % (s.name, labels)] = s.value
# The classic text parser must read it too (it ignores the "# EOF" line).
n = sum(len(f.samples) for f in prom(text))
assert n == len(out), (n, len(out))
print(json.dumps(out))
"##;
    let mut child = std::process::Command::new("/usr/bin/python3")
        .args(["-c", SCRIPT])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("python3 with prometheus_client (installed by `cargo xtask setup`)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(
        o.status.success(),
        "not valid exposition text: {}\n{text}",
        String::from_utf8_lossy(&o.stderr)
    );
    serde_json::from_slice(&o.stdout).unwrap()
}

fn sample(m: &HashMap<String, f64>, key: &str) -> f64 {
    *m.get(key).unwrap_or_else(|| {
        let mut keys: Vec<&String> = m.keys().collect();
        keys.sort();
        panic!("no sample {key}; have {keys:#?}")
    })
}

#[test]
fn metrics_parse_as_prometheus_text_and_count_the_bytes_replicated() {
    if !doppel_tests::require_root() {
        return;
    }
    let (ap, rp) = (free_tcp_port(), free_tcp_port());
    let mut c = Cluster::with_options(
        "data",
        Options {
            agent_extra: format!("[metrics]\nlisten = \"127.0.0.1:{ap}\""),
            receiver_extra: format!("\n[metrics]\nlisten = \"127.0.0.1:{rp}\""),
            ..Options::default()
        },
    )
    .unwrap();
    c.start().unwrap();
    c.wait_synced(Duration::from_secs(20)).unwrap();
    let mut written = 0u64;
    for i in 0..5u32 {
        let data = noise((1 << 20) + i as usize * 777, i as u64 + 1);
        std::fs::write(c.source.join(format!("file{i}")), &data).unwrap();
        written += data.len() as u64;
    }
    c.wait_synced(Duration::from_secs(30)).unwrap();
    c.assert_identical(Duration::from_secs(10));
    let st = row(&c);

    let (ctype, text) = scrape(ap);
    assert!(ctype.starts_with("application/openmetrics-text"), "{ctype}");
    let a = parse(&text);
    let set = r#"set="data",target="t""#;
    let sent = sample(&a, &format!("doppel_sent_bytes_total{{{set}}}"));
    assert_eq!(sent, st["set_sent_bytes"].as_u64().unwrap() as f64, "{st}");
    assert!(
        sent >= written as f64 && sent < 2.0 * written as f64,
        "sent {sent}, written {written}"
    );
    assert_eq!(
        sample(
            &a,
            r#"doppel_state{set="data",state="protected",target="t"}"#
        ),
        1.0
    );
    assert_eq!(
        sample(
            &a,
            r#"doppel_state{set="data",state="degraded",target="t"}"#
        ),
        0.0
    );
    assert_eq!(sample(&a, &format!("doppel_lag_records{{{set}}}")), 0.0);
    assert_eq!(sample(&a, "doppel_synced{}"), 1.0);
    assert_eq!(sample(&a, r#"doppel_connected{target="t"}"#), 1.0);
    // Large writes may reach the agent as ranges it reads back, not as ring data.
    assert!(sample(&a, "doppel_capture_events_total{}") >= 5.0);
    assert!(sample(&a, &format!("doppel_ack_latency_seconds_count{{{set}}}")) >= 1.0);
    assert!(sample(&a, r#"doppel_queued_bytes_total{set="data"}"#) >= written as f64);

    let (_, text) = scrape(rp);
    let r = parse(&text);
    let src = r#"source="src""#;
    // Every byte the agent sent was applied once: nothing was resent in this run.
    assert_eq!(
        sample(&r, &format!("doppel_applied_bytes_total{{{src}}}")),
        sent
    );
    assert_eq!(
        sample(&r, &format!("doppel_apply_errors_total{{{src}}}")),
        0.0
    );
    assert_eq!(
        sample(
            &r,
            &format!(r#"doppel_source_health{{health="alive",{src}}}"#)
        ),
        1.0
    );
    assert!(sample(&r, &format!("doppel_heartbeats_answered_total{{{src}}}")) >= 1.0);
    assert!(sample(&r, &format!("doppel_heartbeat_rtt_seconds_count{{{src}}}")) >= 1.0);
    assert_eq!(
        sample(&r, &format!(r#"doppel_applied_seq{{set="data",{src}}}"#)),
        st["acked"].as_u64().unwrap() as f64
    );
}

/// `status --watch` follows the initial mirror: progress lines (files, bytes, rate,
/// ETA) while it runs, the table once every file is compared and acknowledged, and the
/// replica is then complete. `--json` gives one status per line.
#[test]
fn status_watch_follows_the_mirror_until_it_is_done() {
    if !doppel_tests::require_root() {
        return;
    }
    let mut c = Cluster::with_options(
        "data",
        Options {
            // ~3 s of mirror, so that progress is seen while it runs.
            agent_target_extra: "bandwidth_limit = 4000000".into(),
            ..Options::default()
        },
    )
    .unwrap();
    for i in 0..24u64 {
        std::fs::write(c.source.join(format!("f{i:02}")), noise(512 << 10, i + 7)).unwrap();
    }
    c.start().unwrap();
    let o = c.agent_command(&["status", "--watch"]);
    let (out, err) = (
        String::from_utf8_lossy(&o.stdout).to_string(),
        String::from_utf8_lossy(&o.stderr).to_string(),
    );
    assert!(o.status.success(), "{out}{err}");
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("mirror: ")).collect();
    assert!(lines.len() >= 2, "progress lines while mirroring: {err}");
    assert!(lines.iter().any(|l| l.contains("ETA")), "{err}");
    assert!(
        lines.last().unwrap().starts_with("mirror: 24/24 files"),
        "{err}"
    );
    assert!(out.contains("protected"), "the table at the end: {out}");
    c.assert_identical(Duration::from_secs(1));

    // JSON lines: each a whole status; the last one synced with every file compared.
    let o = c.agent_command(&["status", "--watch", "--json"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    let last: serde_json::Value = serde_json::from_str(text.lines().last().unwrap()).unwrap();
    assert_eq!(last["synced"], true, "{text}");
    assert_eq!(last["mirror_compared_files"], 24, "{text}");
    assert_eq!(last["mirror_queued_files"], 24, "{text}");
}

/// A kernel map that is full is not a silent loss: more hard-linked files than the map
/// of them holds (writes through their names outside the sets would go unseen) make
/// the set degraded, with the reason in `status` and a metric.
#[test]
fn a_full_kernel_map_shows_the_set_degraded_with_why() {
    if !doppel_tests::require_root() {
        return;
    }
    let mut c = Cluster::new("data").unwrap();
    let over = doppel_common::abi::LINKED_FILES_MAX as usize + 100;
    let (a, b) = (c.source.join("a"), c.source.join("b"));
    std::fs::create_dir_all(&a).unwrap();
    std::fs::create_dir_all(&b).unwrap();
    for i in 0..over {
        let f = a.join(format!("{i}"));
        std::fs::write(&f, b"x").unwrap();
        std::fs::hard_link(&f, b.join(format!("{i}"))).unwrap();
    }
    c.start_receiver().unwrap();
    c.start_agent_within(Duration::from_secs(120)).unwrap();
    let r = wait_row(&c, Duration::from_secs(60), "degraded", |r| {
        r["state"] == "degraded"
    });
    assert!(
        r["reason"].as_str().unwrap().contains("maps were full"),
        "{r}"
    );
    // Each of the 100 files left out, once per name.
    let st = c.status().unwrap();
    assert_eq!(st["capture"]["refused"], 200, "{st}");
}
