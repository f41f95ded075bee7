//! A tiny TCP service for failover tests, and its client.
//!
//! - `serve LISTEN LOG NAME [PIDFILE]`: each connection sends one line; `append N`
//!   appends "N\n" to LOG, fdatasyncs it, and answers `ok N NAME`; `ping` answers
//!   `pong NAME`. So an acknowledgement means "durable on this host".
//! - `probe ADDR`: exits 0 when the service at ADDR answers `ping`.
//! - `client ADDR`: starts a request every 10 ms (each on its own connection and thread,
//!   300 ms timeouts) and prints `N SENT_NS DONE_NS NAME` for each answered one, with
//!   CLOCK_MONOTONIC times, until killed.

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::OpenOptionsExt;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid timespec out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn serve(listen: &str, log: &str, name: &str, pidfile: Option<&String>) {
    let l = TcpListener::bind(listen).unwrap_or_else(|e| panic!("bind {listen}: {e}"));
    if let Some(p) = pidfile {
        std::fs::write(p, std::process::id().to_string()).expect("write the pid file");
    }
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o644)
        .open(log)
        .unwrap_or_else(|e| panic!("open {log}: {e}"));
    let file = Arc::new(Mutex::new(file));
    for s in l.incoming() {
        let Ok(s) = s else { continue };
        let file = file.clone();
        let name = name.to_string();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
            let mut line = String::new();
            let mut r = BufReader::new(&s);
            if r.read_line(&mut line).is_err() {
                return;
            }
            let reply = match line.split_whitespace().collect::<Vec<_>>()[..] {
                ["append", n] => {
                    let f = file.lock().unwrap();
                    let mut w: &std::fs::File = &f;
                    if w.write_all(format!("{n}\n").as_bytes()).is_err() || f.sync_data().is_err() {
                        return;
                    }
                    format!("ok {n} {name}\n")
                }
                ["ping"] => format!("pong {name}\n"),
                _ => return,
            };
            let _ = (&s).write_all(reply.as_bytes());
        });
    }
}

fn request(addr: SocketAddr, line: &str) -> Option<String> {
    let t = Duration::from_millis(300);
    let s = TcpStream::connect_timeout(&addr, t).ok()?;
    s.set_read_timeout(Some(t)).ok()?;
    s.set_write_timeout(Some(t)).ok()?;
    (&s).write_all(line.as_bytes()).ok()?;
    let mut reply = String::new();
    BufReader::new(&s).read_line(&mut reply).ok()?;
    Some(reply.trim().to_string())
}

fn client(addr: SocketAddr) {
    let inflight = Arc::new(AtomicUsize::new(0));
    let out = Arc::new(Mutex::new(std::io::stdout()));
    for n in 1u64.. {
        std::thread::sleep(Duration::from_millis(10));
        if inflight.load(Ordering::SeqCst) > 100 {
            continue;
        }
        inflight.fetch_add(1, Ordering::SeqCst);
        let (inflight, out) = (inflight.clone(), out.clone());
        std::thread::spawn(move || {
            let sent = mono_ns();
            if let Some(r) = request(addr, &format!("append {n}\n")) {
                let done = mono_ns();
                if let ["ok", m, name] = r.split_whitespace().collect::<Vec<_>>()[..] {
                    if m == n.to_string() {
                        let mut o = out.lock().unwrap();
                        let _ = writeln!(o, "{n} {sent} {done} {name}");
                        let _ = o.flush();
                    }
                }
            }
            inflight.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

fn main() {
    let a: Vec<String> = std::env::args().skip(1).collect();
    match a.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["serve", listen, log, name] => serve(listen, log, name, None),
        ["serve", listen, log, name, _] => serve(listen, log, name, a.get(4)),
        ["probe", addr] => {
            let addr: SocketAddr = addr.parse().expect("probe ADDR:PORT");
            let ok = request(addr, "ping\n").is_some_and(|r| r.starts_with("pong"));
            std::process::exit(if ok { 0 } else { 1 });
        }
        ["client", addr] => client(addr.parse().expect("client ADDR:PORT")),
        _ => {
            eprintln!("usage: doppel-test-service serve LISTEN LOG NAME [PIDFILE] | probe ADDR | client ADDR");
            std::process::exit(2);
        }
    }
}
