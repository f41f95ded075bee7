//! Failover in network namespaces: a source host dies, the target takes over its
//! address, hostname and service, and clients carry on (see `doppel_tests::takeover`).

use std::time::Duration;

use doppel_tests::require_root;
use doppel_tests::takeover::{mono_ns, Stage, TGT};

fn ms(ns: u64) -> f64 {
    ns as f64 / 1e6
}

/// The checks every successful failover must pass: the client is answered by the target,
/// no write the source acknowledged is missing, the identity moved.
fn check_takeover(s: &mut Stage, start_ns: u64, what: &str) {
    let first = s
        .wait_target_answer(start_ns, Duration::from_secs(20))
        .unwrap();
    let rto = ms(first.done_ns - start_ns);
    std::thread::sleep(Duration::from_millis(500));
    s.stop_client();
    let answers = s.answers().unwrap();
    let by_target = answers.iter().filter(|a| a.by == "target").count();
    let lost = s.lost_writes().unwrap();
    eprintln!(
        "{what}: RTO {rto:.0} ms; {} answers from the source, {by_target} from the target; RPO {} acknowledged writes missing {lost:?}",
        answers.len() - by_target,
        lost.len()
    );
    assert!(
        by_target >= 10,
        "the target answered only {by_target} requests"
    );
    // Replication is asynchronous: a write acknowledged in the last moment before the
    // link died may not have left. At 10 ms per request that is at most a couple.
    assert!(
        lost.len() <= 2,
        "{} acknowledged writes are missing on the target: {lost:?}\n{}",
        lost.len(),
        s.cluster.logs()
    );
    assert_eq!(s.receiver_hostname().unwrap(), "doppel-src-host");
    let tgt_mac = s.lan.mac(TGT).unwrap();
    let neigh = s.client_neighbour_v6();
    assert!(
        neigh.contains(&tgt_mac),
        "the client's IPv6 neighbour entry did not move to the target ({tgt_mac}): {neigh}"
    );
    assert!(
        s.health() == "failed-over",
        "status says {} after the failover",
        s.health()
    );
}

/// Manual failover after the source is declared lost: every step reported and timed,
/// the client answered by the target within a second of the command.
#[test]
fn manual_failover_takes_over_address_hostname_and_service() {
    if !require_root() {
        return;
    }
    let mut s = Stage::new(false).unwrap();
    s.start().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    // While the source answers heartbeats the failover refuses, and changes nothing.
    let (out, code) = s.failover(&[]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"refused\"") && out.contains("alive"),
        "{out}"
    );
    assert_eq!(s.health(), "alive");

    let death = s.kill_source().unwrap();
    let lost_after = s.wait_health("lost", Duration::from_secs(10)).unwrap();
    eprintln!("source lost {lost_after:?} after its death");
    let start = mono_ns();
    let (out, code) = s.failover(&[]).unwrap();
    let took = ms(mono_ns() - start);
    assert_eq!(code, 0, "{out}\n{}", s.cluster.logs());
    for step in [
        "heartbeat",
        "drain",
        "guard",
        "addresses",
        "hostname",
        "services",
    ] {
        assert!(
            out.contains(&format!("\"name\": \"{step}\"")),
            "{step} missing: {out}"
        );
    }
    eprintln!(
        "failover command took {took:.0} ms ({:.0} ms after the death)",
        ms(start - death)
    );
    check_takeover(&mut s, start, "manual failover");
    // A restarted agent on the source is refused: the target is the primary now.
    let (again, code) = s.failover(&[]).unwrap();
    assert_eq!(
        code, 1,
        "a second failover must refuse without --force: {again}"
    );
}

/// Automatic failover: nobody runs a command; the receiver notices the missed heartbeats.
#[test]
fn automatic_failover_after_missed_heartbeats() {
    if !require_root() {
        return;
    }
    let mut s = Stage::new(true).unwrap();
    s.start().unwrap();
    std::thread::sleep(Duration::from_secs(2));
    let death = s.kill_source().unwrap();
    check_takeover(&mut s, death, "automatic failover (from the death)");
    let log = s.cluster.log("receiver.log");
    assert!(log.contains("failing over automatically"), "{log}");
}

/// The split-brain guard: a source whose agent stopped but whose address still answers
/// is not taken over (and its changes are accepted again); `--dry-run` changes nothing.
#[test]
fn split_brain_guard_refuses_while_the_source_address_answers() {
    if !require_root() {
        return;
    }
    let mut s = Stage::new(false).unwrap();
    s.start().unwrap();
    // Stop the agent in an orderly way: the source is "stopped", not lost.
    let pid = s.cluster.agent_pid().unwrap();
    // SAFETY: plain kill(2).
    unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    s.wait_health("stopped", Duration::from_secs(10)).unwrap();

    let (out, code) = s.failover(&["--dry-run"]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("still in use") && out.contains(&s.vip.to_string()),
        "{out}"
    );

    let (out, code) = s.failover(&[]).unwrap();
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("\"refused\"") && out.contains("still in use"),
        "{out}"
    );
    let addrs = std::process::Command::new("ip")
        .args(["-n", &s.lan.hosts[TGT].ns, "addr", "show"])
        .output()
        .unwrap();
    let addrs = String::from_utf8_lossy(&addrs.stdout);
    assert!(
        !addrs.contains(&s.vip.to_string()),
        "the target took the address: {addrs}"
    );
    assert_ne!(s.health(), "failed-over");
    // The refusal undid the fence: a restarted agent replicates again.
    s.stop_client();
    s.cluster.start_agent().unwrap();
    std::fs::write(s.cluster.source.join("after-refusal"), b"still replicating").unwrap();
    s.cluster.assert_converges(Duration::from_secs(20));
}

/// The round trip: fail over, serve and change data on the target, fail back. Every
/// write the target acknowledged reaches the source; the target gives up the address
/// and hostname; the source takes its identity back and replicates again (its agent
/// starts over instead of replaying what it held from before the failover).
#[test]
fn failback_round_trip_loses_nothing_written_on_the_target() {
    if !require_root() {
        return;
    }
    // Store-and-forward: the agent's journal keeps its sequence space across the crash,
    // so the restarted agent announces the epoch the failover ended.
    let mut s = Stage::with_set(false, "queue = \"store-and-forward\"").unwrap();
    std::fs::write(s.cluster.source.join("keep.txt"), b"kept").unwrap();
    std::fs::write(s.cluster.source.join("old.txt"), b"deleted on the target").unwrap();
    s.start().unwrap();
    let hostname_before = s.receiver_hostname().unwrap();
    std::thread::sleep(Duration::from_secs(1));
    s.kill_source().unwrap();
    s.wait_health("lost", Duration::from_secs(10)).unwrap();
    let (out, code) = s.failover(&[]).unwrap();
    assert_eq!(code, 0, "{out}");
    let served = mono_ns();
    s.wait_target_answer(served, Duration::from_secs(10))
        .unwrap();
    // The target serves, and someone changes files there directly too.
    std::fs::write(
        s.cluster.replica.join("new-on-target.txt"),
        b"made while serving",
    )
    .unwrap();
    std::fs::remove_file(s.cluster.replica.join("old.txt")).unwrap();
    std::thread::sleep(Duration::from_secs(1));

    s.source_returns().unwrap();
    let (out, code) = s.failback(&["--dry-run"]).unwrap();
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("\"would\""), "{out}");
    let (out, code) = s.failback(&[]).unwrap();
    assert_eq!(
        code,
        0,
        "{out}\n{}\n--- failback agent ---\n{}\n--- source's receiver ---\n{}",
        s.cluster.logs(),
        s.failback_agent_log(),
        s.return_log()
    );
    for step in [
        "copy",
        "services",
        "final-sync",
        "addresses",
        "hostname",
        "release",
    ] {
        assert!(
            out.contains(&format!("\"name\": \"{step}\"")),
            "{step} missing: {out}"
        );
    }
    eprintln!("failback report:\n{out}");
    // Everything the target acknowledged or held is on the source now.
    let by_target = s
        .answers()
        .unwrap()
        .iter()
        .filter(|a| a.by == "target")
        .count();
    let missing = s
        .missing("target", &s.cluster.source.join("app.log"))
        .unwrap();
    assert!(
        by_target >= 10,
        "the target answered only {by_target} requests"
    );
    assert!(
        missing.is_empty(),
        "writes acknowledged by the target are missing on the source: {missing:?}"
    );
    let r = doppel_tests::tree::wait_equal(
        &s.cluster.replica,
        &s.cluster.source,
        Duration::from_secs(10),
    );
    assert!(
        r.is_ok(),
        "the source differs from the target's copy: {r:?}"
    );
    assert!(!s.cluster.source.join("old.txt").exists());
    assert_eq!(s.receiver_hostname().unwrap(), hostname_before);
    assert_eq!(s.health(), "unknown", "the source is accepted again");

    // The source takes its identity back (its receiver adopts the address and starts the
    // service), the client follows, and replication resumes source -> target.
    let back = mono_ns();
    let (out, code) = s.return_command(&["failover", "--source", "tgt-host"]);
    assert_eq!(code, 0, "{out}\n{}", s.return_log());
    let a = s
        .wait_answer("source", back, Duration::from_secs(10))
        .unwrap();
    eprintln!(
        "the source answers again {:.0} ms after taking its identity back",
        (a.done_ns - back) as f64 / 1e6
    );
    s.stop_client();
    s.cluster.start_agent().unwrap();
    std::fs::write(
        s.cluster.source.join("after-failback.txt"),
        b"replicated again",
    )
    .unwrap();
    s.cluster.assert_converges(Duration::from_secs(30));
    let log = s.cluster.log("agent.log");
    assert!(
        log.contains("failed over to it and back"),
        "the agent did not start over:\n{log}"
    );
}
