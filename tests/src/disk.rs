//! Small filesystem images loop-mounted on temporary directories, for tests where a
//! separate filesystem matters (a full disk, a source on xfs). Unmounted and removed on
//! drop, lazily if something still holds the mount.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context};

/// The filesystems a [`LoopDisk`] can hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fs {
    Ext4,
    Xfs,
    /// xfs on a 64 GiB sparse image: its inode numbers span more than the capture's
    /// exact bitmap takes, so the capture uses a bloom filter and an exact map.
    XfsLarge,
}

impl Fs {
    /// The filesystem named by `DOPPEL_TEST_FS` (`ext4`, `xfs`), if set: end-to-end
    /// clusters then put their source root on such an image.
    pub fn from_env() -> Option<Fs> {
        match std::env::var("DOPPEL_TEST_FS").ok()?.as_str() {
            "xfs" => Some(Fs::Xfs),
            "xfs-large" => Some(Fs::XfsLarge),
            "ext4" => Some(Fs::Ext4),
            other => panic!("DOPPEL_TEST_FS={other}: expected ext4, xfs or xfs-large"),
        }
    }
}

pub struct LoopDisk {
    dir: tempfile::TempDir,
    /// Where the filesystem is mounted.
    pub mnt: PathBuf,
    mounted: bool,
}

fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let o = cmd
        .output()
        .with_context(|| format!("cannot run {cmd:?}"))?;
    if !o.status.success() {
        bail!(
            "{cmd:?} failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
    }
    Ok(())
}

impl LoopDisk {
    /// An ext4 image of `mib` MiB.
    pub fn new(mib: u64) -> anyhow::Result<LoopDisk> {
        Self::with_fs(Fs::Ext4, mib)
    }

    /// An image of `mib` MiB (xfs needs at least 300; `XfsLarge` takes 64 GiB whatever
    /// `mib` says, sparse) holding `fs`.
    pub fn with_fs(fs: Fs, mib: u64) -> anyhow::Result<LoopDisk> {
        let mib = if fs == Fs::XfsLarge { 64 << 10 } else { mib };
        let dir = tempfile::Builder::new()
            .prefix("doppel-e2e-disk-")
            .tempdir()?;
        let img = dir.path().join("disk.img");
        let mnt = dir.path().join("mnt");
        std::fs::create_dir(&mnt)?;
        std::fs::File::create(&img)?.set_len(mib << 20)?;
        match fs {
            // -m 0: no blocks reserved for root (the receiver runs as root). Inode
            // tables and journal written now, not by a kernel thread in the background
            // of what the test or bench measures.
            Fs::Ext4 => run(Command::new("mkfs.ext4")
                .args(["-q", "-F", "-m", "0"])
                .args(["-E", "lazy_itable_init=0,lazy_journal_init=0"])
                .arg(&img))?,
            Fs::Xfs | Fs::XfsLarge => run(Command::new("mkfs.xfs").args(["-q", "-f"]).arg(&img))
                .context("install xfsprogs (cargo xtask setup does)")?,
        }
        let mut disk = LoopDisk {
            dir,
            mnt,
            mounted: false,
        };
        run(Command::new("mount")
            .args(["-o", "loop"])
            .arg(&img)
            .arg(&disk.mnt))?;
        disk.mounted = true;
        Ok(disk)
    }

    /// Bytes free for an unprivileged writer.
    pub fn available(&self) -> u64 {
        let c = std::ffi::CString::new(self.mnt.as_os_str().as_encoded_bytes()).unwrap();
        let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
        assert_eq!(unsafe { libc::statvfs(c.as_ptr(), &mut st) }, 0);
        st.f_bavail as u64 * st.f_frsize as u64
    }
}

impl Drop for LoopDisk {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        if std::env::var_os("DOPPEL_KEEP").is_some() {
            // What a kept cluster directory on it holds stays readable.
            let dir = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir"));
            eprintln!(
                "keeping {} mounted (umount it, then remove {})",
                self.mnt.display(),
                dir.path().display()
            );
            std::mem::forget(dir);
            return;
        }
        for _ in 0..20 {
            if run(Command::new("umount").arg(&self.mnt)).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if let Err(e) = run(Command::new("umount").arg("-l").arg(&self.mnt)) {
            eprintln!("cleanup: {e:#} ({} stays)", self.dir.path().display());
        }
    }
}
