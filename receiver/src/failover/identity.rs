//! Taking and giving back the source's identity on this host: its addresses (through
//! iproute2, as cluster managers do) and its hostname.

use std::net::IpAddr;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// `10.0.0.5/24`.
pub fn cidr((ip, len): &(IpAddr, u8)) -> String {
    format!("{ip}/{len}")
}

/// Adds `addr` to `dev`. IPv6 addresses skip duplicate address detection: the guard has
/// already probed, and DAD would keep the address unusable for a second or more.
/// Returns `false` when the interface already had it.
pub fn add_address(dev: &str, addr: &(IpAddr, u8)) -> Result<bool> {
    let c = cidr(addr);
    let mut cmd = Command::new("ip");
    cmd.args(["addr", "add", &c, "dev", dev]);
    if addr.0.is_ipv6() {
        cmd.arg("nodad");
    }
    let out = cmd.output().context("cannot run `ip` (install iproute2)")?;
    if out.status.success() {
        return Ok(true);
    }
    let err = String::from_utf8_lossy(&out.stderr);
    if err.contains("File exists") {
        return Ok(false);
    }
    bail!("ip addr add {c} dev {dev}: {}", err.trim())
}

/// Removes `addr` from `dev`; an address already gone is fine.
pub fn remove_address(dev: &str, addr: &(IpAddr, u8)) -> Result<()> {
    let c = cidr(addr);
    let out = Command::new("ip")
        .args(["addr", "del", &c, "dev", dev])
        .output()
        .context("cannot run `ip` (install iproute2)")?;
    let err = String::from_utf8_lossy(&out.stderr);
    if out.status.success() || err.contains("Cannot assign requested address") {
        return Ok(());
    }
    bail!("ip addr del {c} dev {dev}: {}", err.trim())
}

pub fn hostname() -> String {
    rustix::system::uname()
        .nodename()
        .to_string_lossy()
        .into_owned()
}

pub fn set_hostname(name: &str) -> Result<()> {
    rustix::system::sethostname(name.as_bytes())
        .with_context(|| format!("cannot set the hostname to {name:?}"))
}
