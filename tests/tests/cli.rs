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

#[test]
fn every_command_has_help_with_an_example() {
    for (bin, cmds) in [
        ("doppel-agent", &["keygen", "run", "check-config"][..]),
        ("doppel-receiver", &["keygen", "run"][..]),
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
