//! What both daemons offer an operator locally: the control socket (one JSON-line
//! request per connection, answered by JSON lines until the daemon closes; see
//! README.md), where [`listen`] and [`Conn`] are the daemon's side and [`call`] is the
//! command's; and [`log`], their logging setup.

pub mod log;
pub mod metrics;

use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::{UnixListener, UnixStream};

/// Longest request line accepted.
const MAX_REQUEST: usize = 64 << 10;

/// Where a daemon with state directory `state_dir` listens.
pub fn socket_path(state_dir: &Path) -> PathBuf {
    state_dir.join("control.sock")
}

/// Binds the control socket at `path`, readable and writable by root only. A socket left
/// by an earlier run of the daemon (it was killed) is replaced.
pub fn listen(path: &Path) -> Result<UnixListener> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create state directory {}", dir.display()))?;
    }
    let _ = std::fs::remove_file(path);
    let listener = UnixListener::bind(path)
        .with_context(|| format!("cannot listen on control socket {}", path.display()))?;
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .with_context(|| format!("cannot restrict {} to root", path.display()))?;
    Ok(listener)
}

/// The daemon's end of one accepted connection.
pub struct Conn {
    write: OwnedWriteHalf,
}

impl Conn {
    /// Reads the request line. A malformed request comes back as `Err` with a message
    /// meant for the command's user.
    pub async fn accept<R: DeserializeOwned>(
        stream: UnixStream,
    ) -> Result<(std::result::Result<R, String>, Conn)> {
        let (read, write) = stream.into_split();
        let mut line = Vec::new();
        let mut reader = tokio::io::BufReader::new(read).take(MAX_REQUEST as u64);
        reader.read_until(b'\n', &mut line).await?;
        let req = serde_json::from_slice(&line).map_err(|e| {
            format!(
                "malformed request: {e}; this daemon and the command must be the same doppel release"
            )
        });
        Ok((req, Conn { write }))
    }

    /// Sends one reply line.
    pub async fn reply<T: Serialize>(&mut self, reply: &T) -> Result<()> {
        let mut text = serde_json::to_vec(reply)?;
        text.push(b'\n');
        self.write.write_all(&text).await?;
        Ok(())
    }

    /// Ends the request.
    pub async fn close(mut self) -> Result<()> {
        self.write.shutdown().await?;
        Ok(())
    }
}

/// Sends `req` to the daemon (`daemon` names it in errors, e.g. "the agent") listening at
/// `path`, and hands each reply to `on_reply` until the daemon is done.
pub fn call<Q: Serialize, A: DeserializeOwned>(
    path: &Path,
    daemon: &str,
    req: &Q,
    mut on_reply: impl FnMut(A),
) -> Result<()> {
    let mut stream = std::os::unix::net::UnixStream::connect(path).with_context(|| {
        format!(
            "cannot reach {daemon} at {}: is it running with this config (and are you root)?",
            path.display()
        )
    })?;
    let mut line = serde_json::to_vec(req)?;
    line.push(b'\n');
    stream.write_all(&line)?;
    let mut got = false;
    for line in BufReader::new(stream).lines() {
        let line = line.with_context(|| format!("reading the reply of {daemon}"))?;
        let reply: A = serde_json::from_str(&line)
            .with_context(|| format!("unreadable reply from {daemon}: {line}"))?;
        got = true;
        on_reply(reply);
    }
    if !got {
        bail!("{daemon} closed the control connection without replying; see its log");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_gets_every_reply_and_the_socket_is_root_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = socket_path(dir.path());
        let listener = listen(&path).unwrap();
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let daemon = tokio::spawn(async move {
            for _ in 0..2 {
                let (s, _) = listener.accept().await.unwrap();
                let (req, mut conn) = Conn::accept::<u32>(s).await.unwrap();
                match req {
                    Ok(n) => {
                        for i in 0..n {
                            conn.reply(&i).await.unwrap();
                        }
                    }
                    Err(e) => conn.reply(&e).await.unwrap(),
                }
                conn.close().await.unwrap();
            }
        });
        let p = path.clone();
        let got = tokio::task::spawn_blocking(move || {
            let mut got = Vec::new();
            call(&p, "the test daemon", &3u32, |r: u32| got.push(r)).unwrap();
            let mut err = String::new();
            call(&p, "the test daemon", &"x", |r: String| err = r).unwrap();
            (got, err)
        })
        .await
        .unwrap();
        assert_eq!(got.0, vec![0, 1, 2]);
        assert!(got.1.contains("malformed request"), "{}", got.1);
        daemon.await.unwrap();
        drop(dir);
        let e = call(&path, "the test daemon", &1u32, |_: u32| {}).unwrap_err();
        assert!(format!("{e:#}").contains("cannot reach the test daemon"));
    }
}
