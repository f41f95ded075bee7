//! A random file-system workload with the patterns that break naive replication:
//! overlapping pwrites, holes, O_APPEND, shrinking and growing truncates, renames
//! (within and across directories, over existing files), deletions, new directories.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[derive(Debug, Default, Clone, Copy)]
pub struct Stats {
    pub ops: u64,
    pub bytes: u64,
}

pub struct Writer {
    root: PathBuf,
    rng: StdRng,
    files: Vec<PathBuf>,
    dirs: Vec<PathBuf>,
    next: u64,
    pub stats: Stats,
}

impl Writer {
    pub fn new(root: &Path, seed: u64) -> Self {
        Writer {
            root: root.to_path_buf(),
            rng: StdRng::seed_from_u64(seed),
            files: Vec::new(),
            dirs: vec![PathBuf::new()],
            next: 0,
            stats: Stats::default(),
        }
    }

    fn data(&mut self, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.rng.fill(&mut v[..]);
        self.stats.bytes += len as u64;
        v
    }

    fn data_in(&mut self, r: std::ops::Range<usize>) -> Vec<u8> {
        let len = self.rng.gen_range(r);
        self.data(len)
    }

    fn pick_file(&mut self) -> Option<PathBuf> {
        if self.files.is_empty() {
            return None;
        }
        let i = self.rng.gen_range(0..self.files.len());
        Some(self.files[i].clone())
    }

    fn abs(&self, rel: &Path) -> PathBuf {
        self.root.join(rel)
    }

    /// Creates a file in a random directory with some initial content.
    pub fn create(&mut self) -> std::io::Result<PathBuf> {
        let d = self.dirs[self.rng.gen_range(0..self.dirs.len())].clone();
        self.next += 1;
        let rel = d.join(format!("file-{:04}.bin", self.next));
        let len = self.rng.gen_range(0..20_000);
        let data = self.data(len);
        std::fs::write(self.abs(&rel), data)?;
        self.files.push(rel.clone());
        self.stats.ops += 1;
        Ok(rel)
    }

    pub fn mkdir(&mut self) -> std::io::Result<()> {
        let parent = self.dirs[self.rng.gen_range(0..self.dirs.len())].clone();
        self.next += 1;
        let rel = parent.join(format!("dir-{:04}", self.next));
        std::fs::create_dir(self.abs(&rel))?;
        self.dirs.push(rel);
        self.stats.ops += 1;
        Ok(())
    }

    /// One random operation on the tree.
    pub fn step(&mut self) -> std::io::Result<()> {
        let Some(rel) = self.pick_file() else {
            self.create()?;
            return Ok(());
        };
        let path = self.abs(&rel);
        let size = std::fs::metadata(&path)?.len();
        match self.rng.gen_range(0..100) {
            // Overlapping pwrite inside or across the end.
            0..=34 => {
                let off = self.rng.gen_range(0..=size + 100);
                let len = self.rng.gen_range(1..9000);
                let data = self.data(len);
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .write_all_at(&data, off)?;
            }
            // pwrite far beyond the end: a hole.
            35..=44 => {
                let off = size + self.rng.gen_range(4096..300_000);
                let data = self.data_in(1..5000);
                OpenOptions::new()
                    .write(true)
                    .open(&path)?
                    .write_all_at(&data, off)?;
            }
            // Appends with O_APPEND (write(2) lands at the end, whatever f_pos said).
            45..=59 => {
                let mut f = OpenOptions::new().append(true).open(&path)?;
                for _ in 0..self.rng.gen_range(1..4) {
                    let data = self.data_in(1..3000);
                    f.write_all(&data)?;
                }
            }
            // Sequential write(2) from a seek position.
            60..=64 => {
                use std::io::{Seek, SeekFrom};
                let mut f = OpenOptions::new().write(true).open(&path)?;
                f.seek(SeekFrom::Start(size / 2))?;
                let data = self.data_in(1..20_000);
                f.write_all(&data)?;
            }
            // ftruncate: shrink or grow.
            65..=71 => {
                let new = self.rng.gen_range(0..=size + 50_000);
                OpenOptions::new().write(true).open(&path)?.set_len(new)?;
            }
            // truncate(2) by path.
            72..=74 => {
                let c = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
                let new = self.rng.gen_range(0..=size) as libc::off_t;
                if unsafe { libc::truncate(c.as_ptr(), new) } != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            // O_TRUNC rewrite.
            75..=77 => {
                let data = self.data_in(0..8000);
                File::create(&path)?.write_all(&data)?;
            }
            // Rename, maybe into another directory, maybe over another file.
            78..=87 => {
                let target = if self.rng.gen_bool(0.2) && self.files.len() > 1 {
                    self.pick_file().expect("non-empty")
                } else {
                    let d = self.dirs[self.rng.gen_range(0..self.dirs.len())].clone();
                    self.next += 1;
                    d.join(format!("renamed-{:04}.bin", self.next))
                };
                if target != rel {
                    std::fs::rename(&path, self.abs(&target))?;
                    self.files.retain(|f| f != &rel && f != &target);
                    self.files.push(target);
                }
            }
            // Delete.
            88..=92 => {
                std::fs::remove_file(&path)?;
                self.files.retain(|f| f != &rel);
            }
            93..=95 => self.mkdir()?,
            _ => {
                self.create()?;
            }
        }
        self.stats.ops += 1;
        Ok(())
    }

    pub fn files(&self) -> usize {
        self.files.len()
    }
}

/// The end-to-end workload: `dirs` directories, `files` files, then `steps` random
/// operations, keeping about `files` files alive.
pub fn run(root: &Path, files: usize, steps: usize, seed: u64) -> std::io::Result<Stats> {
    let mut w = Writer::new(root, seed);
    for _ in 0..5 {
        w.mkdir()?;
    }
    for _ in 0..files {
        w.create()?;
    }
    for _ in 0..steps {
        w.step()?;
        while w.files() < files * 9 / 10 {
            w.create()?;
        }
    }
    Ok(w.stats)
}
