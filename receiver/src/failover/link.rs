//! Raw link-layer plumbing shared by ARP and NDP: an interface's index and MAC address,
//! and waiting on a socket with a deadline.

use std::os::fd::{AsRawFd, OwnedFd};
use std::time::Instant;

use anyhow::{bail, Context, Result};

/// Index and hardware address of an interface.
#[derive(Debug, Clone, Copy)]
pub struct Link {
    pub index: u32,
    pub mac: [u8; 6],
}

impl Link {
    pub fn find(name: &str) -> Result<Link> {
        let c = std::ffi::CString::new(name).context("interface name contains a NUL byte")?;
        // SAFETY: `c` is a valid NUL-terminated string for the duration of the call.
        let index = unsafe { libc::if_nametoindex(c.as_ptr()) };
        if index == 0 {
            bail!(
                "interface {name:?} does not exist here (see `ip link`); fix `interface` in [source.failover]"
            );
        }
        let mac = hardware_address(name)?;
        Ok(Link { index, mac })
    }
}

/// The interface's Ethernet address, asked of the kernel through a socket, so that it is
/// this network namespace's interface (sysfs shows the namespace it was mounted in).
fn hardware_address(name: &str) -> Result<[u8; 6]> {
    // SAFETY: plain socket(2) call.
    let fd = owned(
        unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) },
        "UDP",
    )?;
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *d = s as libc::c_char;
    }
    // SAFETY: SIOCGIFHWADDR reads the name and fills ifru_hwaddr of a valid ifreq.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot read the MAC address of {name}"));
    }
    // SAFETY: the ioctl succeeded, so the hwaddr member is the one set.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    if sa.sa_family != libc::ARPHRD_ETHER {
        bail!(
            "interface {name} is not Ethernet (hardware type {})",
            sa.sa_family
        );
    }
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *d = *s as u8;
    }
    Ok(mac)
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(m: &[u8; 6]) -> String {
    m.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Waits until `fd` is readable or `deadline` passes; `false` on timeout.
pub fn wait_readable(fd: &OwnedFd, deadline: Instant) -> Result<bool> {
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e).context("poll");
        }
        if n > 0 {
            return Ok(true);
        }
    }
}

/// One split-brain probe round, the same for ARP and NDP: `send_all` probes every
/// address at once and again a third of the way through `wait` (a probe can be lost);
/// `recv` waits until a deadline for the next packet and says which address it shows
/// taken, by which MAC (`Ok(None)` at the deadline, `Ok(Some(None))` for an unrelated
/// packet). Returns the addresses someone answered for, once all did or `wait` is over.
pub fn probe_round<A: Copy + PartialEq>(
    addrs: &[A],
    wait: std::time::Duration,
    mut send_all: impl FnMut() -> Result<()>,
    mut recv: impl FnMut(Instant) -> Result<Option<Option<(A, [u8; 6])>>>,
) -> Result<Vec<(A, [u8; 6])>> {
    let start = Instant::now();
    let (second, deadline) = (start + wait / 3, start + wait);
    send_all()?;
    let mut sent_second = false;
    let mut found: Vec<(A, [u8; 6])> = Vec::new();
    while found.len() < addrs.len() {
        let until = if sent_second { deadline } else { second };
        match recv(until)? {
            Some(Some((a, mac))) => {
                if addrs.contains(&a) && !found.iter().any(|(f, _)| *f == a) {
                    found.push((a, mac));
                }
            }
            Some(None) => {}
            None if !sent_second => {
                send_all()?;
                sent_second = true;
            }
            None => break,
        }
    }
    Ok(found)
}

/// Wraps a raw descriptor returned by `socket(2)`.
pub fn owned(fd: libc::c_int, what: &str) -> Result<OwnedFd> {
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("cannot open a {what} socket (needs CAP_NET_RAW)"));
    }
    use std::os::fd::FromRawFd;
    // SAFETY: `fd` was just returned by socket(2) and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse_and_format() {
        let m = parse_mac("02:00:0a:ff:00:01").unwrap();
        assert_eq!(m, [2, 0, 10, 255, 0, 1]);
        assert_eq!(format_mac(&m), "02:00:0a:ff:00:01");
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
        assert_eq!(parse_mac("zz:00:0a:ff:00:01"), None);
    }
}
