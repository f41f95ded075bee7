//! IPv4 address takeover on the wire: ARP probes (RFC 5227) for the split-brain guard and
//! gratuitous ARP announcements so that neighbours repoint their caches at once.
//!
//! Linux updates an existing neighbour entry from a gratuitous ARP request (sender IP ==
//! target IP) even with `arp_accept` off, overriding the entry's lock time; that is what
//! moves clients over without waiting for their entries to go stale.

use std::mem::size_of;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use super::link::{owned, probe_round, wait_readable, Link};

const ETH_P_ARP: u16 = 0x0806;
const OP_REQUEST: u16 = 1;
const OP_REPLY: u16 = 2;
pub const LEN: usize = 28;

/// An Ethernet/IPv4 ARP packet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Arp {
    pub op: u16,
    pub sha: [u8; 6],
    pub spa: Ipv4Addr,
    pub tha: [u8; 6],
    pub tpa: Ipv4Addr,
}

impl Arp {
    /// "Who has `addr`?" from nobody (sender IP 0.0.0.0), so that no cache learns from it.
    pub fn probe(mac: [u8; 6], addr: Ipv4Addr) -> Arp {
        Arp {
            op: OP_REQUEST,
            sha: mac,
            spa: Ipv4Addr::UNSPECIFIED,
            tha: [0; 6],
            tpa: addr,
        }
    }

    /// "`addr` is at `mac`", as a request with sender IP == target IP.
    pub fn announcement(mac: [u8; 6], addr: Ipv4Addr) -> Arp {
        Arp {
            op: OP_REQUEST,
            sha: mac,
            spa: addr,
            tha: [0; 6],
            tpa: addr,
        }
    }

    pub fn encode(&self) -> [u8; LEN] {
        let mut b = [0u8; LEN];
        b[0..2].copy_from_slice(&1u16.to_be_bytes()); // Ethernet
        b[2..4].copy_from_slice(&0x0800u16.to_be_bytes()); // IPv4
        b[4] = 6;
        b[5] = 4;
        b[6..8].copy_from_slice(&self.op.to_be_bytes());
        b[8..14].copy_from_slice(&self.sha);
        b[14..18].copy_from_slice(&self.spa.octets());
        b[18..24].copy_from_slice(&self.tha);
        b[24..28].copy_from_slice(&self.tpa.octets());
        b
    }

    pub fn decode(b: &[u8]) -> Option<Arp> {
        if b.len() < LEN || b[0..2] != [0, 1] || b[2..4] != [8, 0] || b[4] != 6 || b[5] != 4 {
            return None;
        }
        let op = u16::from_be_bytes([b[6], b[7]]);
        if op != OP_REQUEST && op != OP_REPLY {
            return None;
        }
        let ip = |o: usize| Ipv4Addr::new(b[o], b[o + 1], b[o + 2], b[o + 3]);
        Some(Arp {
            op,
            sha: b[8..14].try_into().ok()?,
            spa: ip(14),
            tha: b[18..24].try_into().ok()?,
            tpa: ip(24),
        })
    }

    /// Whether this packet shows another host using `addr` (RFC 5227 §2.1.1: any ARP
    /// packet whose sender IP is the address, from a hardware address not ours).
    pub fn claims(&self, addr: Ipv4Addr, ours: [u8; 6]) -> bool {
        self.spa == addr && self.sha != ours
    }
}

/// An ARP socket bound to one interface.
pub struct Socket {
    fd: OwnedFd,
    link: Link,
}

fn sockaddr(link: &Link, dest: [u8; 6]) -> libc::sockaddr_ll {
    // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
    let mut sa: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sa.sll_family = libc::AF_PACKET as u16;
    sa.sll_protocol = ETH_P_ARP.to_be();
    sa.sll_ifindex = link.index as i32;
    sa.sll_halen = 6;
    sa.sll_addr[..6].copy_from_slice(&dest);
    sa
}

impl Socket {
    pub fn open(link: Link) -> Result<Socket> {
        // SAFETY: plain socket(2) call.
        let fd = unsafe {
            libc::socket(
                libc::AF_PACKET,
                libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
                ETH_P_ARP.to_be() as i32,
            )
        };
        let fd = owned(fd, "packet (ARP)")?;
        let sa = sockaddr(&link, [0; 6]);
        // SAFETY: `sa` is a valid sockaddr_ll of the size passed.
        let r = unsafe {
            libc::bind(
                fd.as_raw_fd(),
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r != 0 {
            return Err(std::io::Error::last_os_error()).context("cannot bind the ARP socket");
        }
        Ok(Socket { fd, link })
    }

    pub fn send(&self, p: &Arp) -> Result<()> {
        let b = p.encode();
        let sa = sockaddr(&self.link, [0xff; 6]);
        // SAFETY: `b` and `sa` are valid for the sizes passed.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                b.as_ptr() as *const libc::c_void,
                b.len(),
                0,
                &sa as *const _ as *const libc::sockaddr,
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        if r < 0 {
            return Err(std::io::Error::last_os_error()).context("cannot send an ARP packet");
        }
        Ok(())
    }

    /// The next ARP packet that reached the interface from elsewhere, or `None` at the
    /// deadline.
    pub fn recv(&self, deadline: Instant) -> Result<Option<Arp>> {
        let mut b = [0u8; 128];
        while wait_readable(&self.fd, deadline)? {
            // SAFETY: sockaddr_ll is plain data; all-zero is a valid value.
            let mut from: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
            let mut len = size_of::<libc::sockaddr_ll>() as u32;
            // SAFETY: `b` and `from` are valid for the sizes passed.
            let n = unsafe {
                libc::recvfrom(
                    self.fd.as_raw_fd(),
                    b.as_mut_ptr() as *mut libc::c_void,
                    b.len(),
                    libc::MSG_DONTWAIT,
                    &mut from as *mut _ as *mut libc::sockaddr,
                    &mut len,
                )
            };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::Interrupted
                {
                    continue;
                }
                return Err(e).context("cannot read from the ARP socket");
            }
            if from.sll_pkttype == libc::PACKET_OUTGOING {
                continue;
            }
            if let Some(p) = Arp::decode(&b[..n as usize]) {
                return Ok(Some(p));
            }
        }
        Ok(None)
    }
}

/// Probes each address twice, `wait` apart at most, and returns those another host
/// answered for, with the MAC that answered.
pub fn probe(link: Link, addrs: &[Ipv4Addr], wait: Duration) -> Result<Vec<(Ipv4Addr, [u8; 6])>> {
    if addrs.is_empty() {
        return Ok(Vec::new());
    }
    let sock = Socket::open(link)?;
    probe_round(
        addrs,
        wait,
        || {
            for &a in addrs {
                sock.send(&Arp::probe(link.mac, a))?;
            }
            Ok(())
        },
        |until| {
            Ok(sock.recv(until)?.map(|p| {
                addrs
                    .iter()
                    .find(|&&a| p.claims(a, link.mac))
                    .map(|&a| (a, p.sha))
            }))
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];

    #[test]
    fn announcement_is_a_gratuitous_request() {
        let a: Ipv4Addr = "10.1.2.3".parse().unwrap();
        let b = Arp::announcement(MAC, a).encode();
        assert_eq!(
            b,
            [
                0, 1, 8, 0, 6, 4, 0, 1, 2, 0, 0, 0, 0, 1, 10, 1, 2, 3, 0, 0, 0, 0, 0, 0, 10, 1, 2,
                3
            ]
        );
        assert_eq!(Arp::decode(&b), Some(Arp::announcement(MAC, a)));
    }

    #[test]
    fn probes_come_from_nobody_and_claims_exclude_ourselves() {
        let a: Ipv4Addr = "10.1.2.3".parse().unwrap();
        let p = Arp::probe(MAC, a);
        assert_eq!(p.spa, Ipv4Addr::UNSPECIFIED);
        assert!(!p.claims(a, MAC));
        let reply = Arp {
            op: OP_REPLY,
            sha: [2, 0, 0, 0, 0, 9],
            spa: a,
            tha: MAC,
            tpa: Ipv4Addr::UNSPECIFIED,
        };
        assert!(reply.claims(a, MAC));
        assert!(!Arp::announcement(MAC, a).claims(a, MAC));
        assert!(!reply.claims("10.1.2.4".parse().unwrap(), MAC));
    }

    #[test]
    fn garbage_does_not_decode() {
        assert_eq!(Arp::decode(&[0; 10]), None);
        let mut b = Arp::probe(MAC, Ipv4Addr::LOCALHOST).encode();
        b[7] = 9;
        assert_eq!(Arp::decode(&b), None);
    }
}
