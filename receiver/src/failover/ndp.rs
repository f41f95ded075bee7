//! IPv6 address takeover on the wire: unsolicited neighbour advertisements (RFC 4861
//! §7.2.6, Override set) so that neighbours repoint their caches at once, and neighbour
//! solicitations for the split-brain guard.
//!
//! ICMPv6 raw sockets get their checksum from the kernel, and neighbour discovery
//! requires hop limit 255 (receivers drop anything else as possibly off-link).

use std::mem::size_of;
use std::net::Ipv6Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::link::{owned, probe_round, wait_readable, Link};

const NS: u8 = 135;
const NA: u8 = 136;
const FLAG_OVERRIDE: u8 = 0x20;
const OPT_SOURCE_LL: u8 = 1;
const OPT_TARGET_LL: u8 = 2;
pub const ALL_NODES: Ipv6Addr = Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1);

/// Unsolicited advertisement: "`addr` is at `mac`", Override set, Solicited clear.
pub fn advertisement(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0] = NA;
    b[4] = FLAG_OVERRIDE;
    b[8..24].copy_from_slice(&addr.octets());
    b[24] = OPT_TARGET_LL;
    b[25] = 1;
    b[26..32].copy_from_slice(&mac);
    b
}

/// "Who has `addr`?", with our link-layer address so the owner can answer directly.
pub fn solicitation(mac: [u8; 6], addr: Ipv6Addr) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[0] = NS;
    b[8..24].copy_from_slice(&addr.octets());
    b[24] = OPT_SOURCE_LL;
    b[25] = 1;
    b[26..32].copy_from_slice(&mac);
    b
}

/// ff02::1:ffXX:XXXX, where the owner of `addr` listens.
pub fn solicited_node(addr: Ipv6Addr) -> Ipv6Addr {
    let o = addr.octets();
    Ipv6Addr::new(
        0xff02,
        0,
        0,
        0,
        0,
        1,
        0xff00 | o[13] as u16,
        u16::from_be_bytes([o[14], o[15]]),
    )
}

/// The target of a neighbour advertisement and the link-layer address it carries.
pub fn parse_advertisement(b: &[u8]) -> Option<(Ipv6Addr, Option<[u8; 6]>)> {
    if b.len() < 24 || b[0] != NA || b[1] != 0 {
        return None;
    }
    let target = Ipv6Addr::from(<[u8; 16]>::try_from(&b[8..24]).ok()?);
    let mut opts = &b[24..];
    let mut mac = None;
    while opts.len() >= 8 {
        let len = opts[1] as usize * 8;
        if len == 0 || len > opts.len() {
            break;
        }
        if opts[0] == OPT_TARGET_LL && len >= 8 {
            mac = opts[2..8].try_into().ok();
        }
        opts = &opts[len..];
    }
    Some((target, mac))
}

pub struct Socket {
    fd: OwnedFd,
    link: Link,
}

fn setsockopt_int(fd: &OwnedFd, level: i32, name: i32, v: i32) -> Result<()> {
    // SAFETY: `v` is a valid int for the size passed.
    let r = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            &v as *const i32 as *const libc::c_void,
            size_of::<i32>() as u32,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error()).context("setsockopt on the ICMPv6 socket");
    }
    Ok(())
}

fn sockaddr(addr: Ipv6Addr, scope: u32) -> libc::sockaddr_in6 {
    // SAFETY: sockaddr_in6 is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_in6 = unsafe { std::mem::zeroed() };
    sa.sin6_family = libc::AF_INET6 as u16;
    sa.sin6_addr.s6_addr = addr.octets();
    sa.sin6_scope_id = scope;
    sa
}

impl Socket {
    /// A socket that sends on `link` from `source` (one of our addresses) or, with
    /// `None`, from whatever address the kernel picks for the link.
    pub fn open(link: Link, source: Option<Ipv6Addr>) -> Result<Socket> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_INET6,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                libc::IPPROTO_ICMPV6,
            )
        };
        let fd = owned(fd, "raw ICMPv6")?;
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
        setsockopt_int(&fd, libc::IPPROTO_IPV6, libc::IPV6_UNICAST_HOPS, 255)?;
        setsockopt_int(
            &fd,
            libc::IPPROTO_IPV6,
            libc::IPV6_MULTICAST_IF,
            link.index as i32,
        )?;
        if let Some(src) = source {
            let sa = sockaddr(src, 0);
            // SAFETY: `sa` is a valid sockaddr_in6 of the size passed.
            let r = unsafe {
                libc::bind(
                    fd.as_raw_fd(),
                    &sa as *const _ as *const libc::sockaddr,
                    size_of::<libc::sockaddr_in6>() as u32,
                )
            };
            if r != 0 {
                return Err(std::io::Error::last_os_error())
                    .with_context(|| format!("cannot send from {src}"));
            }
        }
        Ok(Socket { fd, link })
    }

    pub fn send(&self, to: Ipv6Addr, msg: &[u8]) -> Result<()> {
        let sa = sockaddr(to, self.link.index);
        // SAFETY: `msg` and `sa` are valid for the sizes passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                msg.as_ptr() as *const libc::c_void,
                msg.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_in6>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("cannot send ICMPv6 to {to}"));
        }
        Ok(())
    }

    fn recv(&self, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let mut b = vec![0u8; 1500];
        while wait_readable(&self.fd, deadline)? {
            // SAFETY: `b` is valid for its length.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    b.len(),
                    libc::MSG_DONTWAIT,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return Err(e).context("cannot read from the ICMPv6 socket");
            }
            b.truncate(n as usize);
            return Ok(Some(b));
        }
        Ok(None)
    }
}

/// Solicits each address (twice) and returns those another host advertised, with its MAC.
pub fn probe(link: Link, addrs: &[Ipv6Addr], wait: Duration) -> Result<Vec<(Ipv6Addr, [u8; 6])>> {
    if addrs.is_empty() {
        return Ok(Vec::new());
    }
    let sock = Socket::open(link, None)?;
    probe_round(
        addrs,
        wait,
        || {
            for &a in addrs {
                sock.send(solicited_node(a), &solicitation(link.mac, a))?;
            }
            Ok(())
        },
        |until| {
            Ok(sock.recv(until)?.map(|b| {
                parse_advertisement(&b)
                    .map(|(target, mac)| (target, mac.unwrap_or([0; 6])))
                    .filter(|(_, mac)| *mac != link.mac)
            }))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn advertisement_overrides_and_carries_our_address() {
        let a: Ipv6Addr = "fd00::1:2".parse().unwrap();
        let b = advertisement(MAC, a);
        assert_eq!(b[0], 136);
        assert_eq!(b[4], 0x20, "Override set, Solicited and Router clear");
        assert_eq!(parse_advertisement(&b), Some((a, Some(MAC))));
        assert_eq!(parse_advertisement(&solicitation(MAC, a)), None);
        assert_eq!(parse_advertisement(&b[..20]), None);
    }

    #[test]
    fn solicited_node_address_takes_the_last_24_bits() {
        let a: Ipv6Addr = "fd00::12:3456".parse().unwrap();
        assert_eq!(
            solicited_node(a),
            "ff02::1:ff12:3456".parse::<Ipv6Addr>().unwrap()
        );
    }

    #[test]
    fn malformed_options_end_parsing_without_panicking() {
        let a: Ipv6Addr = "fd00::1".parse().unwrap();
        let mut b = advertisement(MAC, a).to_vec();
        b[25] = 0;
        assert_eq!(parse_advertisement(&b), Some((a, None)));
        b[25] = 9;
        assert_eq!(parse_advertisement(&b), Some((a, None)));
    }
}
