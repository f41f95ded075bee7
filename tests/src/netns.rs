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

/// Several namespaces on one Ethernet segment: each has a veth whose peer is a port of a
/// bridge living in its own "switch" namespace, so that taking one host's link down
/// leaves the others connected. Host `i` (from 0) gets 10.78.<x>.<i+1>/24 and
/// fd78:<x>::<i+1>/64; [`Lan::extra_v4`] and [`Lan::extra_v6`] give free addresses of the
/// same subnets (for a service address that moves). Dropping it deletes every namespace.
#[derive(Debug)]
pub struct Lan {
    pub hosts: Vec<Side>,
    pub v6: Vec<std::net::Ipv6Addr>,
    x: u8,
    created: Vec<String>,
}

impl Lan {
    pub fn create(n: usize) -> Result<Lan> {
        let pid = std::process::id();
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let x = ((pid.wrapping_mul(11).wrapping_add(k)) % 200 + 20) as u8;
        let mut lan = Lan {
            hosts: Vec::new(),
            v6: Vec::new(),
            x,
            created: Vec::new(),
        };
        let sw = format!("doppel-{pid}-{k}-sw");
        ip(&["netns", "add", &sw])?;
        lan.created.push(sw.clone());
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        for i in 0..n {
            let side = Side {
                ns: format!("doppel-{pid}-{k}-h{i}"),
                dev: format!("dpl{}h{i}{}", pid % 1_000_000, k % 100),
                addr: Ipv4Addr::new(10, 78, x, i as u8 + 1),
            };
            let v6: std::net::Ipv6Addr = format!("fd78:{x}::{}", i + 1).parse()?;
            ip(&["netns", "add", &side.ns])?;
            lan.created.push(side.ns.clone());
            let port = format!("p{i}");
            ip(&[
                "link", "add", &side.dev, "netns", &side.ns, "type", "veth", "peer", "name", &port,
                "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&["-n", &side.ns, "link", "set", "dev", "lo", "up"])?;
            ip(&[
                "-n",
                &side.ns,
                "addr",
                "add",
                &format!("{}/24", side.addr),
                "dev",
                &side.dev,
            ])?;
            ip(&[
                "-n",
                &side.ns,
                "addr",
                "add",
                &format!("{v6}/64"),
                "dev",
                &side.dev,
                "nodad",
            ])?;
            ip(&["-n", &side.ns, "link", "set", "dev", &side.dev, "up"])?;
            lan.hosts.push(side);
            lan.v6.push(v6);
        }
        Ok(lan)
    }

    pub fn extra_v4(&self, host: u8) -> Ipv4Addr {
        Ipv4Addr::new(10, 78, self.x, host)
    }

    pub fn extra_v6(&self, host: u8) -> std::net::Ipv6Addr {
        format!("fd78:{}::{host}", self.x)
            .parse()
            .expect("a valid IPv6 address")
    }

    /// Runs `ip ARGS` in host `i`'s namespace.
    pub fn ip(&self, i: usize, args: &[&str]) -> Result<()> {
        let mut a = vec!["-n", self.hosts[i].ns.as_str()];
        a.extend_from_slice(args);
        ip(&a)
    }

    /// The MAC address of host `i`'s interface.
    pub fn mac(&self, i: usize) -> Result<String> {
        let h = &self.hosts[i];
        let o = Command::new("ip")
            .args(["-n", &h.ns, "-br", "link", "show", "dev", &h.dev])
            .output()?;
        let text = String::from_utf8_lossy(&o.stdout);
        text.split_whitespace()
            .nth(2)
            .map(str::to_string)
            .with_context(|| format!("no MAC in {text:?}"))
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for ns in self.created.drain(..) {
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("cleanup: {e:#}");
            }
        }
    }
}
