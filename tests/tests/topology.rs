//! Several targets for one set, several sources into one receiver: real processes.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use doppel_tests::cluster::{free_port, keygen};
use doppel_tests::{bin_dir, require_root, tree, writer};

/// A daemon that is SIGKILLed when the test ends, however it ends.
struct Daemon(Child, PathBuf);

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(bin: &str, config: &Path) -> Daemon {
    let log = config.with_extension("log");
    let out = fs::File::create(&log).unwrap();
    let child = Command::new(bin_dir().join(bin))
        .args(["run", "--config"])
        .arg(config)
        .stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .spawn()
        .unwrap();
    Daemon(child, log)
}

fn start_agent(config: &Path) -> Daemon {
    let d = start("doppel-agent", config);
    let t = Instant::now();
    while !fs::read_to_string(&d.1)
        .unwrap_or_default()
        .contains("replicating live")
    {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "agent did not start: {}",
            fs::read_to_string(&d.1).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    d
}

fn receiver_config(
    dir: &Path,
    name: &str,
    sources: &[(&str, &str, &Path)],
) -> (PathBuf, u16, String) {
    let fp = keygen("doppel-receiver", &dir.join(format!("{name}-keys"))).unwrap();
    let port = free_port();
    let mut text = format!(
        "listen = \"127.0.0.1:{port}\"\ncert = \"{name}-keys/cert.pem\"\nkey = \"{name}-keys/key.pem\"\nstate_dir = \"{name}-state\"\n"
    );
    for (src, afp, root) in sources {
        text += &format!(
            "[[source]]\nname = \"{src}\"\nfingerprint = \"{afp}\"\nroot = \"{}\"\n",
            root.display()
        );
    }
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).unwrap();
    (path, port, fp)
}

fn agent_config(dir: &Path, name: &str, root: &Path, targets: &[(u16, &str)]) -> PathBuf {
    let mut text = format!(
        "name = \"{name}\"\ncert = \"{name}-keys/cert.pem\"\nkey = \"{name}-keys/key.pem\"\nstate_dir = \"{name}-state\"\n"
    );
    let mut names = Vec::new();
    for (i, (port, fp)) in targets.iter().enumerate() {
        text += &format!(
            "[[target]]\nname = \"t{i}\"\naddress = \"127.0.0.1:{port}\"\nfingerprint = \"{fp}\"\n"
        );
        names.push(format!("\"t{i}\""));
    }
    text += &format!(
        "[[set]]\nname = \"data\"\nroot = \"{}\"\ntargets = [{}]\n",
        root.display(),
        names.join(", ")
    );
    let path = dir.join(format!("{name}.toml"));
    fs::write(&path, text).unwrap();
    path
}

/// The test's directory: removed afterwards unless `DOPPEL_KEEP` is set (to look at
/// the daemons' logs after a failure).
fn scratch() -> tempfile::TempDir {
    let mut d = tempfile::Builder::new()
        .prefix("doppel-topo-")
        .tempdir()
        .unwrap();
    if std::env::var_os("DOPPEL_KEEP").is_some() {
        eprintln!("keeping {}", d.path().display());
        d.disable_cleanup(true);
    }
    d
}

fn converge(src: &Path, dst: &Path) {
    if let Err(d) = tree::wait_equal(src, dst, Duration::from_secs(10)) {
        panic!(
            "{} differs from {}: {:?}",
            dst.display(),
            src.display(),
            &d[..d.len().min(10)]
        );
    }
}

#[test]
fn one_set_replicates_to_two_targets() {
    if !require_root() {
        return;
    }
    let d = scratch();
    let d = d.path();
    let src = d.join("source");
    fs::create_dir(&src).unwrap();
    let afp = keygen("doppel-agent", &d.join("a-keys")).unwrap();
    let (r1, p1, f1) = receiver_config(d, "r1", &[("a", &afp, &d.join("replica1"))]);
    let (r2, p2, f2) = receiver_config(d, "r2", &[("a", &afp, &d.join("replica2"))]);
    let _r1 = start("doppel-receiver", &r1);
    let _r2 = start("doppel-receiver", &r2);
    let _a = start_agent(&agent_config(d, "a", &src, &[(p1, &f1), (p2, &f2)]));
    writer::run(&src, 100, 1500, 11).unwrap();
    converge(&src, &d.join("replica1/data"));
    converge(&src, &d.join("replica2/data"));
}

#[test]
fn two_sources_into_one_receiver_stay_apart() {
    if !require_root() {
        return;
    }
    let d = scratch();
    let d = d.path();
    let (sa, sb) = (d.join("source-a"), d.join("source-b"));
    fs::create_dir(&sa).unwrap();
    fs::create_dir(&sb).unwrap();
    let fa = keygen("doppel-agent", &d.join("a-keys")).unwrap();
    let fb = keygen("doppel-agent", &d.join("b-keys")).unwrap();
    let (r, port, rfp) = receiver_config(
        d,
        "r",
        &[
            ("a", &fa, &d.join("replica-a")),
            ("b", &fb, &d.join("replica-b")),
        ],
    );
    let _r = start("doppel-receiver", &r);
    let _a = start_agent(&agent_config(d, "a", &sa, &[(port, &rfp)]));
    let _b = start_agent(&agent_config(d, "b", &sb, &[(port, &rfp)]));
    writer::run(&sa, 60, 800, 21).unwrap();
    writer::run(&sb, 60, 800, 22).unwrap();
    converge(&sa, &d.join("replica-a/data"));
    converge(&sb, &d.join("replica-b/data"));
}
