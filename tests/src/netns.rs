//! Two network namespaces joined by a veth pair, so that a test can cut the link between
//! an agent and a receiver. Names carry the test process's pid and a counter, the
//! subnet is chosen per pair; dropping the pair deletes both namespaces (which destroys
//! the veth pair with them).

use std::ffi::OsString;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// One side of the pair: a namespace and its end of the veth pair.
#[derive(Debug, Clone)]
pub struct Side {
    pub ns: String,
    pub dev: String,
    pub addr: Ipv4Addr,
}

impl Side {
    /// A command prefix that runs a program in this namespace's network stack only
    /// (mounts, pids and the rest stay the host's; eBPF capture is host-wide anyway).
    /// `nsenter` execs the program in place, so the child's pid is the program's.
    pub fn wrapper(&self) -> Vec<OsString> {
        vec![
            "nsenter".into(),
            format!("--net=/run/netns/{}", self.ns).into(),
            "--".into(),
        ]
    }
}

#[derive(Debug)]
pub struct NetPair {
    pub a: Side,
    pub b: Side,
    /// Namespaces created so far (deleted on drop, also after a partial setup).
    created: Vec<String>,
}

fn ip(args: &[&str]) -> Result<()> {
    let o = Command::new("ip")
        .args(args)
        .output()
        .context("cannot run `ip` (iproute2)")?;
    if !o.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl NetPair {
    /// Creates namespaces `doppel-<pid>-<n>-a` and `-b`, a veth pair between them with
    /// 10.77.<x>.1/24 on side a and 10.77.<x>.2/24 on side b, and brings everything up.
    pub fn create() -> Result<NetPair> {
        let pid = std::process::id();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let x = ((pid.wrapping_mul(7).wrapping_add(n)) % 200 + 20) as u8;
        let side = |s: &str, host: u8| Side {
            ns: format!("doppel-{pid}-{n}-{s}"),
            // Interface names are at most 15 bytes: "dpl" + pid (<= 7 digits) + side + n.
            dev: format!("dpl{}{s}{}", pid % 10_000_000, n % 100),
            addr: Ipv4Addr::new(10, 77, x, host),
        };
        let mut pair = NetPair {
            a: side("a", 1),
            b: side("b", 2),
            created: Vec::new(),
        };
        for ns in [pair.a.ns.clone(), pair.b.ns.clone()] {
            ip(&["netns", "add", &ns])?;
            pair.created.push(ns);
        }
        let (a, b) = (&pair.a, &pair.b);
        ip(&[
            "link", "add", &a.dev, "netns", &a.ns, "type", "veth", "peer", "name", &b.dev, "netns",
            &b.ns,
        ])?;
        for s in [a, b] {
            ip(&["-n", &s.ns, "link", "set", "dev", "lo", "up"])?;
            ip(&[
                "-n",
                &s.ns,
                "addr",
                "add",
                &format!("{}/24", s.addr),
                "dev",
                &s.dev,
            ])?;
            ip(&["-n", &s.ns, "link", "set", "dev", &s.dev, "up"])?;
        }
        Ok(pair)
    }

    /// Takes side `s`'s end of the link down (both directions stop: the peer loses its
    /// carrier) or brings it back up.
    pub fn set_link(&self, s: &Side, up: bool) -> Result<()> {
        ip(&[
            "-n",
            &s.ns,
            "link",
            "set",
            "dev",
            &s.dev,
            if up { "up" } else { "down" },
        ])
    }
}

impl Drop for NetPair {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
