//! Compares two directory trees byte for byte: names, types, sizes, contents.

use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Entry {
    Dir,
    File { size: u64, hash: [u8; 32] },
    Symlink(PathBuf),
    Other(u32),
}

pub type Snapshot = BTreeMap<PathBuf, Entry>;

/// Every entry below `root` (not the root itself), keyed by relative path.
pub fn snapshot(root: &Path) -> std::io::Result<Snapshot> {
    let mut out = BTreeMap::new();
    walk(root, Path::new(""), &mut out)?;
    Ok(out)
}

fn walk(abs: &Path, rel: &Path, out: &mut Snapshot) -> std::io::Result<()> {
    for e in std::fs::read_dir(abs)? {
        let e = e?;
        let child = abs.join(e.file_name());
        let crel = rel.join(e.file_name());
        let m = match std::fs::symlink_metadata(&child) {
            Ok(m) => m,
            // Raced with a deletion on a live tree; the next snapshot sees it.
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
            Err(err) => return Err(err),
        };
        let entry = if m.is_dir() {
            walk(&child, &crel, out)?;
            Entry::Dir
        } else if m.is_file() {
            match hash_file(&child) {
                Ok((size, hash)) => Entry::File { size, hash },
                Err(err) if err.kind() == std::io::ErrorKind::NotFound => continue,
                Err(err) => return Err(err),
            }
        } else if m.file_type().is_symlink() {
            Entry::Symlink(std::fs::read_link(&child)?)
        } else {
            Entry::Other(m.mode())
        };
        out.insert(crel, entry);
    }
    Ok(())
}

pub fn hash_file(p: &Path) -> std::io::Result<(u64, [u8; 32])> {
    let mut f = std::fs::File::open(p)?;
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut size = 0u64;
    loop {
        let n = f.read(&mut buf)?;
        if n == 0 {
            break;
        }
        size += n as u64;
        h.update(&buf[..n]);
    }
    Ok((size, *h.finalize().as_bytes()))
}

/// Human-readable differences between two snapshots (empty = identical).
pub fn diff(src: &Snapshot, dst: &Snapshot) -> Vec<String> {
    let mut out = Vec::new();
    for (p, e) in src {
        match dst.get(p) {
            None => out.push(format!("missing on replica: {}", p.display())),
            Some(d) if d != e => out.push(format!(
                "differs: {} (source {}, replica {})",
                p.display(),
                describe(e),
                describe(d)
            )),
            _ => {}
        }
    }
    for p in dst.keys() {
        if !src.contains_key(p) {
            out.push(format!("extra on replica: {}", p.display()));
        }
    }
    out
}

fn describe(e: &Entry) -> String {
    match e {
        Entry::Dir => "directory".into(),
        Entry::File { size, hash } => format!("{size} bytes, blake3 {}", hex8(hash)),
        Entry::Symlink(t) => format!("symlink -> {}", t.display()),
        Entry::Other(m) => format!("special file mode {m:o}"),
    }
}

fn hex8(h: &[u8; 32]) -> String {
    h[..4].iter().map(|b| format!("{b:02x}")).collect()
}

/// Waits until `dst` equals `src` (both snapshotted anew each try) or `timeout` passes.
/// Returns how long it took, or the last differences.
pub fn wait_equal(
    src: &Path,
    dst: &Path,
    timeout: std::time::Duration,
) -> Result<std::time::Duration, Vec<String>> {
    let start = std::time::Instant::now();
    let want = snapshot(src).map_err(|e| vec![format!("cannot read source: {e}")])?;
    loop {
        let diffs = match snapshot(dst) {
            Ok(got) => diff(&want, &got),
            Err(e) => vec![format!("cannot read replica: {e}")],
        };
        if diffs.is_empty() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > timeout {
            return Err(diffs);
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
