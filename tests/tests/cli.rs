//! The command lines an operator meets first: keygen, config errors, --help.

use std::process::Command;

use doppel_tests::bin_dir;

fn run(bin: &str, args: &[&str]) -> (bool, String) {
    let o = Command::new(bin_dir().join(bin))
        .args(args)
        .output()
        .expect("binaries are built by `cargo xtask test`");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    (o.status.success(), text)
}

#[test]
fn keygen_prints_a_sha256_fingerprint_of_the_written_certificate() {
    let d = tempfile::tempdir().unwrap();
    for bin in ["doppel-agent", "doppel-receiver"] {
        let out = d.path().join(bin);
        let (ok, text) = run(bin, &["keygen", "--out", out.to_str().unwrap()]);
        assert!(ok, "{text}");
        let fp = text
            .lines()
            .find_map(|l| l.strip_prefix("fingerprint: "))
            .expect("a fingerprint line");
        assert_eq!(fp.len(), 64, "{fp}");
        assert!(fp.chars().all(|c| c.is_ascii_hexdigit()));
        assert!(out.join("cert.pem").exists() && out.join("key.pem").exists());
    }
}

#[test]
fn a_bad_agent_config_names_the_file_the_key_and_the_fix() {
    let d = tempfile::tempdir().unwrap();
    let cfg = d.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"name = "web1"
cert = "c.pem"
key = "k.pem"
[[target]]
name = "t"
address = "127.0.0.1:7443"
fingerprint = "{}"
[[set]]
name = "data"
root = "{}"
targets = ["nope"]
"#,
            "ab".repeat(32),
            d.path().display()
        ),
    )
    .unwrap();
    let (ok, text) = run(
        "doppel-agent",
        &["check-config", "--config", cfg.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(
        text.contains(cfg.to_str().unwrap()),
        "names the file: {text}"
    );
    assert!(text.contains("set[0].targets"), "names the key: {text}");
    assert!(
        text.contains("define it or fix the name"),
        "says the fix: {text}"
    );

    std::fs::write(&cfg, "name = \"web1\"\ncolour = \"blue\"\n").unwrap();
    let (ok, text) = run(
        "doppel-agent",
        &["check-config", "--config", cfg.to_str().unwrap()],
    );
    assert!(!ok);
    assert!(text.contains("colour"), "names the unknown key: {text}");
}

/// A set whose root holds a local receiver's replica would replicate what it receives
/// (and a receiver on the same host is common: two-way pairs, failback).
#[test]
fn a_set_containing_a_local_replica_root_is_refused_with_the_fix() {
    let d = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(d.path().join("replica/web2")).unwrap();
    let receiver = d.path().join("receiver.toml");
    std::fs::write(
        &receiver,
        format!(
            "listen = \"[::]:7443\"\ncert = \"c.pem\"\nkey = \"k.pem\"\n[[source]]\nname = \"web2\"\nfingerprint = \"{}\"\nroot = \"replica/web2\"\n",
            "cd".repeat(32)
        ),
    )
    .unwrap();
    let cfg = d.path().join("agent.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"name = "web1"
cert = "c.pem"
key = "k.pem"
local_receiver_config = "receiver.toml"
[[target]]
name = "t"
address = "127.0.0.1:7443"
fingerprint = "{}"
[[set]]
name = "data"
root = "{}"
targets = ["t"]
"#,
            "ab".repeat(32),
            d.path().display()
        ),
    )
    .unwrap();
    let (ok, text) = run(
        "doppel-agent",
        &["check-config", "--config", cfg.to_str().unwrap()],
    );
    assert!(!ok, "{text}");
    assert!(
        text.contains(cfg.to_str().unwrap()),
        "names the file: {text}"
    );
    assert!(text.contains("key `set[0].root`"), "names the key: {text}");
    assert!(
        text.contains("a replica root of the local receiver") && text.contains("move one of them"),
        "says what is wrong and the fix: {text}"
    );
}

#[test]
fn every_command_has_help_with_an_example() {
    for (bin, cmds) in [
        (
            "doppel-agent",
            &["keygen", "run", "check-config", "check", "verify", "status"][..],
        ),
        (
            "doppel-receiver",
            &["keygen", "run", "status", "failover", "failback"][..],
        ),
    ] {
        for cmd in cmds {
            let (ok, text) = run(bin, &[cmd, "--help"]);
            assert!(ok, "{bin} {cmd} --help: {text}");
            assert!(
                text.contains("Example"),
                "{bin} {cmd} --help has no example:\n{text}"
            );
        }
    }
}

/// `doppel-agent check`: every item passes on a working setup without disturbing the
/// running agent's session; then each planted fault is named with its fix.
#[test]
fn check_passes_and_then_names_each_fault_with_its_fix() {
    if !doppel_tests::require_root() {
        return;
    }
    use doppel_tests::cluster::Cluster;
    let mut c = Cluster::new("data").unwrap();
    c.start().unwrap();
    c.wait_synced(std::time::Duration::from_secs(20)).unwrap();
    let before = c.log_lines("receiver.log", "session started").len();
    assert_eq!(before, 1);
    let o = c.agent_command(&["check"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert!(o.status.success(), "{text}");
    for item in [
        "config",
        "privileges",
        "btf",
        "tracefs",
        "bpf",
        "state_dir",
        "set data",
        "keys",
        "target t",
    ] {
        assert!(
            text.contains(&format!("ok   {item}")),
            "{item} not ok:\n{text}"
        );
    }
    // The handshake-only probe did not replace the running session.
    std::thread::sleep(std::time::Duration::from_millis(300));
    assert_eq!(
        c.log_lines("receiver.log", "session started").len(),
        before,
        "{}",
        c.logs()
    );
    assert!(c
        .log_lines("receiver.log", "replaces the running session")
        .is_empty());

    // tracefs unmounted (in a private mount namespace, so nothing else notices).
    let config = c.dir.path().join("agent.toml");
    let o = Command::new("unshare")
        .args(["-m", "--propagation", "private", "sh", "-c"])
        .arg(format!(
            "umount -l /sys/kernel/tracing 2>/dev/null; umount -l /sys/kernel/debug/tracing 2>/dev/null; exec {} check --config {}",
            bin_dir().join("doppel-agent").display(),
            config.display()
        ))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(text.contains("FAIL tracefs"), "{text}");
    assert!(
        text.contains("mount -t tracefs tracefs /sys/kernel/tracing"),
        "{text}"
    );

    // The receiver is gone: the target fails, with what to check.
    c.kill_receiver();
    let o = c.agent_command(&["check", "--json"]);
    let items: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let t = items
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["item"] == "target t")
        .unwrap();
    assert_eq!(t["ok"], false, "{items}");
    assert!(
        t["fix"].as_str().unwrap().contains("doppel-receiver runs"),
        "{items}"
    );
    assert_eq!(o.status.code(), Some(1));

    // A planted config error: the file, the key, the fix.
    std::fs::write(
        &config,
        std::fs::read_to_string(&config).unwrap() + "colour = \"blue\"\n",
    )
    .unwrap();
    let o = c.agent_command(&["check"]);
    let text = String::from_utf8_lossy(&o.stdout).to_string();
    assert_eq!(o.status.code(), Some(1), "{text}");
    assert!(
        text.contains("FAIL config") && text.contains("colour"),
        "{text}"
    );
}

/// `[log] format = "json"`: every line the daemon logs is one JSON object; a bad level
/// is refused at start, naming the key.
#[test]
fn logs_are_json_lines_when_configured() {
    let d = tempfile::tempdir().unwrap();
    let afp = doppel_tests::cluster::keygen("doppel-agent", &d.path().join("a")).unwrap();
    doppel_tests::cluster::keygen("doppel-receiver", &d.path().join("r")).unwrap();
    let config = d.path().join("receiver.toml");
    let text = |level: &str| {
        format!(
            "listen = \"127.0.0.1:{}\"\ncert = \"r/cert.pem\"\nkey = \"r/key.pem\"\nstate_dir = \"state\"\n\
             [log]\nformat = \"json\"\nlevel = \"{level}\"\n\
             [[source]]\nname = \"s\"\nfingerprint = \"{afp}\"\nroot = \"replica\"\n",
            doppel_tests::cluster::free_port()
        )
    };
    std::fs::write(&config, text("info")).unwrap();
    let mut child = Command::new(bin_dir().join("doppel-receiver"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(child.stderr.take().unwrap()));
    let first = lines.next().unwrap().unwrap();
    let _ = child.kill();
    let _ = child.wait();
    let v: serde_json::Value =
        serde_json::from_str(&first).unwrap_or_else(|e| panic!("not JSON ({e}): {first}"));
    assert_eq!(v["level"], "INFO", "{first}");
    assert!(v["fields"]["message"].as_str().is_some(), "{first}");

    std::fs::write(&config, text("inof")).unwrap();
    let (ok, out) = run(
        "doppel-receiver",
        &["run", "--config", config.to_str().unwrap()],
    );
    assert!(!ok && out.contains("[log] level"), "{out}");
}
